"""Tests for spielft.evaluation: completion loss, batched greedy generation, extraction, scoring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spielft.data import CausalLMCollator, tokenize_records
from spielft.evaluation import (
    ExactMatchResult,
    evaluate_exact_match,
    evaluate_loss,
    exact,
    exact_match_accuracy,
    generate_answers,
    get_extractor,
    last_number,
    normalize_number,
    regex_extractor,
)

# ------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("#### 1,000", "1000"),
        ("She pays $5.00 in total", "5"),
        ("2.50", "2.5"),
        ("-3 degrees", "-3"),
        ("It went from 10 to -7.", "-7"),
        ("3-1=2", "2"),  # a minus between numbers is subtraction, not a sign
        ("on 2021-03-05", "5"),
        ("48/2 = 24\n#### 72\nthen 15 more", "72"),  # '####' wins over the last number
        ("#### no number here, but 9 before", "9"),
        ("#### none at all", None),
        ("3, 4, 5", "5"),
        ("x = 12,345,678 units", "12345678"),
        ("Answer: 5.", "5"),
        ("v2 of 7x", "7"),
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,000", "1000"), ("5.0", "5"), ("-0.0", "0"), ("0.50", "0.5"), ("007", "7"), ("abc", "abc")],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_exact_and_regex_extractors():
    assert exact("  Paris \n") == "Paris"
    grouped = regex_extractor(r"answer is (\w+)")
    assert grouped("The answer is B, not answer is C") == "B"
    assert regex_extractor(r"answer is (\w+)", last=True)("answer is B, answer is C") == "C"
    assert regex_extractor(r"[A-D]\b")("Pick: C") == "C"  # no group: the whole match
    assert grouped("nothing") is None
    assert get_extractor("regex:=(\\d+)")("x=17") == "17"
    assert get_extractor("iso_date")("It is 2021-03-05.") == "2021-03-05"
    assert get_extractor(str.upper)("a") == "A"
    with pytest.raises(ValueError, match="Unknown answer extractor 'nope'"):
        get_extractor("nope")
    with pytest.raises(ValueError, match="Invalid extractor regex"):
        get_extractor("regex:(")


def test_exact_match_accuracy_records():
    result = exact_match_accuracy(
        ["So #### 18", "I think 20", "no idea"],
        ["16 - 3 - 4 = 9 eggs; 9 * 2 = 18\n#### 18", "#### 21", "#### 3"],
        "last_number",
        prompts=["q1", "q2", "q3"],
    )
    assert isinstance(result, ExactMatchResult)
    accuracy, records = result
    assert accuracy == pytest.approx(1 / 3)
    assert [r["correct"] for r in records] == [True, False, False]
    assert records[0] == {
        "index": 0,
        "prompt": "q1",
        "prediction": "So #### 18",
        "reference": "16 - 3 - 4 = 9 eggs; 9 * 2 = 18\n#### 18",
        "extracted": "18",
        "expected": "18",
        "correct": True,
    }
    assert records[2]["extracted"] is None
    # A reference the extractor finds nothing in (a text answer) is compared as stripped text
    # with the stripped prediction: a perfect model scores 100%, not 0%.
    assert exact_match_accuracy(["none"], [" none "], "iso_date").accuracy == 1.0
    assert exact_match_accuracy(["blue", "It is blue."], ["blue", "blue"], "last_number").accuracy == 0.5
    assert exact_match_accuracy([" Paris"], ["Paris "]).accuracy == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match_accuracy(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------- loss


def completion_dataset(tokenizer, n: int = 6):
    records = [
        {"prompt": f"Question {i}?", "completion": "Answer " + "z" * (i % 3)} for i in range(n)
    ]
    from spielft.data import normalize_records

    dataset, _ = tokenize_records(normalize_records(records), tokenizer, max_length=128)
    return dataset


def test_evaluate_loss_is_token_weighted_and_restores_mode(tiny_tokenizer, tiny_llama):
    dataset = completion_dataset(tiny_tokenizer)
    collator = CausalLMCollator.from_tokenizer(tiny_tokenizer)
    tiny_llama.train()
    modes = []
    tiny_llama.register_forward_hook(lambda module, args, out: modes.append(module.training))

    loss_all = evaluate_loss(tiny_llama, dataset, collator, batch_size=len(dataset))
    assert tiny_llama.training and modes == [False]
    assert all(p.grad is None for p in tiny_llama.parameters())
    # With one batch, the token-weighted mean is exactly what the model's own loss computes.
    with torch.no_grad():
        tiny_llama.eval()
        expected = tiny_llama(**collator([dataset[i] for i in range(len(dataset))])).loss.item()
    assert loss_all == pytest.approx(expected, rel=1e-5)
    # Uneven batches must not change the mean (a per-batch mean would).
    assert evaluate_loss(tiny_llama, dataset, collator, batch_size=4) == pytest.approx(
        loss_all, rel=1e-5
    )


def test_evaluate_loss_on_packed_rows(tiny_tokenizer, tiny_llama):
    records = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(6)]
    from spielft.data import normalize_records

    recs = normalize_records(records)
    plain, _ = tokenize_records(recs, tiny_tokenizer, max_length=64)
    packed, _ = tokenize_records(recs, tiny_tokenizer, max_length=64, packing=True)
    collator = CausalLMCollator.from_tokenizer(tiny_tokenizer)
    assert len(packed) < len(plain)
    assert evaluate_loss(tiny_llama, packed, collator) == pytest.approx(
        evaluate_loss(tiny_llama, plain, collator), rel=1e-4
    )


def test_evaluate_loss_rejects_empty_or_unlabelled(tiny_tokenizer, tiny_llama):
    collator = CausalLMCollator.from_tokenizer(tiny_tokenizer)
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate_loss(tiny_llama, [], collator)
    with pytest.raises(ValueError, match="no completion tokens"):
        evaluate_loss(tiny_llama, [{"input_ids": [5, 6], "labels": [-100, -100]}], collator)


# ------------------------------------------------------------------------------- generation

PROMPTS = [
    "Hi",
    "What is the date today? Please answer briefly.",
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}],
    "A much longer prompt, so that the batch needs plenty of left padding for the others.",
    "2+2=",
]


def reference_generation(model, tokenizer, prompt, max_new_tokens):
    """Plain single-prompt greedy generation, written independently of spielft."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_batched_left_padded_generation_equals_unbatched(tiny_tokenizer, tiny_llama):
    expected = [reference_generation(tiny_llama, tiny_tokenizer, p, 12) for p in PROMPTS]
    assert len(set(expected)) > 1  # the prompts really lead to different outputs
    one_by_one = generate_answers(tiny_llama, tiny_tokenizer, PROMPTS, 12, batch_size=1)
    batched = generate_answers(tiny_llama, tiny_tokenizer, PROMPTS, 12, batch_size=3)
    assert one_by_one == expected
    assert batched == expected
    assert tiny_tokenizer.padding_side == "right"  # not changed behind the caller's back


def test_generate_answers_restores_mode_and_checks_template(tiny_tokenizer, tiny_llama):
    tiny_llama.train()
    generate_answers(tiny_llama, tiny_tokenizer, ["Hi"], 2)
    assert tiny_llama.training
    raw = generate_answers(tiny_llama, tiny_tokenizer, ["Hi"], 3, chat=False)
    assert isinstance(raw[0], str)
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        generate_answers(tiny_llama, tiny_tokenizer, ["Hi"], 2)


class CannedModel(nn.Module):
    """A wrapped 'model' that only offers generate(): it answers with fixed text."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            answer = next(a for q, a in self.answers.items() if q in prompt)
            new = self.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + new[:max_new_tokens])
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_evaluate_exact_match_with_a_wrapped_model(tiny_tokenizer):
    model = CannedModel(
        tiny_tokenizer,
        {"March 5, 2021": "It is 2021-03-05.", "July 4, 1999": "1999-04-07", "1 May": "no idea"},
    )
    records = [
        {"prompt": "Convert to ISO 8601: March 5, 2021", "completion": "2021-03-05"},
        {"prompt": "Convert to ISO 8601: July 4, 1999", "completion": "1999-07-04"},
        {"prompt": "Convert to ISO 8601: 1 May 2000", "completion": "2000-05-01"},
    ]
    result = evaluate_exact_match(
        model, tiny_tokenizer, records, extractor="iso_date", batch_size=2
    )
    assert result.accuracy == pytest.approx(1 / 3)
    assert [r["prediction"] for r in result.records] == [
        "It is 2021-03-05.",
        "1999-04-07",
        "no idea",
    ]
    assert [r["prompt"] for r in result.records] == [r["prompt"] for r in records]
