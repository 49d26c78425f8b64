"""Tests for spielft.data: reading, validation, tokenisation, packing, collation, splitting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from spielft.data import (
    HELD_OUT_SPLITS,
    IGNORE_INDEX,
    CausalLMCollator,
    DataError,
    detect_format,
    load_records,
    normalize_records,
    pack_examples,
    split_prompt_completion,
    tokenize_example,
    tokenize_records,
    train_val_split,
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def conversation(prompt: str, completion: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [
        *head,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": completion},
    ]


# ---------------------------------------------------------------------------------- formats


def test_jsonl_chat_messages(tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}, {"messages": msgs[1:3]}])
    records = load_records(path)
    assert records == [{"messages": msgs}, {"messages": msgs[1:3]}]
    assert split_prompt_completion(records[0]) == (msgs[:-1], "4")


def test_json_list_and_hf_style_data_key(tmp_path):
    rows = [{"prompt": " What is 2+2? ", "completion": " 4\n"}]
    expected = [{"messages": conversation("What is 2+2?", "4")}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "hf.json").write_text(json.dumps({"version": 1, "data": rows}))
    assert load_records(tmp_path / "list.json") == expected
    assert load_records(tmp_path / "hf.json") == expected


def test_alpaca_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye", "system": "You are terse."},
    ]
    records = load_records(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert records[0]["messages"] == conversation("Translate to French.\n\ncat", "chat")
    assert records[1]["messages"] == conversation("Say hi.", "hi")
    assert records[2]["messages"] == conversation("Say bye.", "bye", system="You are terse.")


def test_fields_mapping_gsm8k_style(tmp_path):
    rows = [{"question": "Tom has 3 apples and eats 1. How many?", "answer": "3-1=2\n#### 2"}]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    records = load_records(path, fields=("question", "answer"))
    assert records[0]["messages"] == conversation(rows[0]["question"], rows[0]["answer"])
    with pytest.raises(DataError, match="cannot tell the record format"):
        load_records(path)


def test_csv(tmp_path):
    path = write_csv(
        tmp_path / "data.csv",
        ["prompt", "completion"],
        [["Capital of France?", "Paris"], ["Multi\nline prompt", "ok"]],
    )
    records = load_records(path)
    assert [split_prompt_completion(r)[1] for r in records] == ["Paris", "ok"]
    assert records[1]["messages"][0]["content"] == "Multi\nline prompt"


def test_unicode_line_separators_inside_values(tmp_path):
    """U+2028/U+2029/U+0085 are valid unescaped in JSON strings and CSV cells: not line ends."""
    text = "a\u2028b\u2029c\u0085d"
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": text, "completion": "x"}, ensure_ascii=False) + "\r\n",
                    encoding="utf-8")
    csv_path = write_csv(tmp_path / "data.csv", ["prompt", "completion"], [[text, "x"]])
    for source in (path, csv_path):
        (record,) = load_records(source)
        assert split_prompt_completion(record) == ([{"role": "user", "content": text}], "x")


def test_csv_messages_column_holding_json(tmp_path):
    msgs = conversation("Hi", "Hello")
    path = write_csv(tmp_path / "chat.csv", ["messages"], [[json.dumps(msgs)]])
    assert load_records(path) == [{"messages": msgs}]


def test_saved_dataset_folder_and_splits(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert [r["messages"][-1]["content"] for r in load_records(tmp_path / "single")] == [
        "c0",
        "c1",
        "c2",
    ]
    DatasetDict(
        {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict")) == 3
    assert len(load_records(tmp_path / "dict", split="test")) == 1
    with pytest.raises(
        DataError, match=r"no split 'validation'; available splits: \['test', 'train'\]"
    ):
        load_records(tmp_path / "dict", split="validation")
    # Evaluation's default: the first held-out split present, never silently "train".
    assert len(load_records(tmp_path / "dict", split=HELD_OUT_SPLITS)) == 1
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(DataError, match=r"no split 'test' or 'validation'.*available splits: \['train'\]"):
        load_records(tmp_path / "train_only", split=HELD_OUT_SPLITS)


def test_trl_conversational_prompt_completion():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    completion = [{"role": "assistant", "content": "Done."}]
    records = load_records([{"prompt": prompt, "completion": completion}])
    assert records == [{"messages": prompt + completion}]
    with pytest.raises(DataError, match="'completion' must be one too"):
        load_records([{"prompt": [{"role": "user", "content": "Hi"}], "completion": "Done."}])


def test_in_memory_records_and_system_prompt():
    records = normalize_records(
        [{"messages": conversation("a", "b")}, {"messages": conversation("c", "d", system="own")}],
        system_prompt="Default system.",
    )
    assert records[0]["messages"][0] == {"role": "system", "content": "Default system."}
    assert records[1]["messages"][0] == {"role": "system", "content": "own"}
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"q": "x", "a": "y"}, fields=("q", "a")) == "fields"


def test_mixed_formats_are_validated_against_the_first_record():
    # The second record is a valid chat record, but the file's format is prompt/completion.
    with pytest.raises(
        DataError, match=r"record index 1: missing field 'prompt'.*detected from record index 0"
    ):
        normalize_records(
            [{"prompt": "a", "completion": "b"}, {"messages": conversation("c", "d")}]
        )


# ------------------------------------------------------------------------------ bad inputs

BAD_JSONL_CASES = [
    # (lines of the file, expected location, expected message fragment)
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": }'], "line 2", "invalid JSON"),
    (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a"}'], "line 3", "missing field 'completion'; this format expects fields 'prompt' and 'completion'"),
    (['{"prompt": "a", "completion": "  "}'], "line 1", "empty completion (field 'completion')"),
    (['{"prompt": "", "completion": "b"}'], "line 1", "empty prompt"),
    (['{"prompt": "a", "completion": 42}'], "line 1", "field 'completion' must be a string, got int (42)"),
    (['{"prompt": "a", "completion": null}'], "line 1", "missing field 'completion'"),
    (['{"text": "a"}'], "line 1", "cannot tell the record format from its fields ['text']"),
    (['["a", "b"]'], "line 1", "expected an object/dict, got list"),
    (['{"messages": []}'], "line 1", "'messages' must be a non-empty list"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1", "last message must be the assistant's completion"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}'], "line 1", "empty completion"),
    (['{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}'], "line 1", "messages[0] has role 'human'"),
    (['{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}'], "line 1", "messages[0]['content'] must be a string, got int"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}'], "line 1", "only the first may be one"),
    (['{"messages": [{"role": "assistant", "content": "b"}]}'], "line 1", "no user message"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "input": 3, "output": "b"}'], "line 2", "field 'input' must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "where", "fragment"), BAD_JSONL_CASES)
def test_bad_jsonl_names_file_line_and_problem(tmp_path, lines, where, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}, {where}: ")
    assert fragment in message


def test_bad_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]'
    )
    with pytest.raises(DataError, match=r"bad\.json, line 3: invalid JSON"):
        load_records(path)
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a"}]))
    with pytest.raises(DataError, match=r"bad\.json, record index 1: missing field 'completion'"):
        load_records(path)
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"records in a 'data' list \(found keys \['rows'\]\)"):
        load_records(path)


def test_bad_csv(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["prompt", "completion"], [["a", "b"], ["a", "b", "c"]])
    with pytest.raises(DataError, match=r"bad\.csv, line 3: row has more values than the header"):
        load_records(path)
    path = write_csv(tmp_path / "short.csv", ["prompt", "completion"], [["a", "b"], ["a"]])
    with pytest.raises(DataError, match=r"short\.csv, line 3: missing field 'completion'"):
        load_records(path)
    path = write_csv(tmp_path / "empty.csv", ["prompt", "completion"], [["a", ""]])
    with pytest.raises(DataError, match=r"empty\.csv, line 2: empty completion"):
        load_records(path)


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        load_records(tmp_path / "data.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records found"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset written by datasets' save_to_disk"):
        load_records(tmp_path / "folder")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_records(tmp_path / "latin1.jsonl")


# ---------------------------------------------------------------------------- tokenisation


def test_labels_mask_exactly_the_prompt(tiny_tokenizer):
    messages = conversation("What is 2+2?", "4", system="Be brief.")
    input_ids, labels, prompt_len = tokenize_example(messages, tiny_tokenizer)
    prompt_text = tiny_tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    full_text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert input_ids == tiny_tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert prompt_len == len(tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == input_ids[prompt_len:]
    assert tiny_tokenizer.decode(labels[prompt_len:]) == "4<|im_end|>\n"

    all_ids, all_labels, _ = tokenize_example(messages, tiny_tokenizer, train_on_prompt=True)
    assert all_ids == input_ids and all_labels == input_ids


def test_every_assistant_turn_of_a_chat_gets_the_loss(tiny_tokenizer):
    """As trl's assistant_only_loss: both answers are labelled, the user turns are not."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
    input_ids, labels, prompt_len = tokenize_example(messages, tiny_tokenizer)
    labelled = [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(labelled) == "4<|im_end|>\n6<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(input_ids, labels, strict=True))
    first_prompt = tiny_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True,
                                                      tokenize=False)
    assert prompt_len == len(tiny_tokenizer(first_prompt, add_special_tokens=False)["input_ids"])
    # A single-turn example is labelled as before: its last (only) answer.
    single, single_labels, _ = tokenize_example(messages[:3], tiny_tokenizer)
    kept = [t for t, label in zip(single, single_labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(kept) == "4<|im_end|>\n"


class _DummyPrefixTokenizer:
    """A SentencePiece-like tokenizer: every call's text starts with an extra marker token."""

    def __init__(self, inner, marker: int):
        self.inner, self.marker = inner, marker
        self.chat_template = inner.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.marker, *self.inner(text, add_special_tokens=False)["input_ids"]]}


def test_completion_tokens_come_from_the_whole_conversation(tiny_tokenizer):
    """The answer is tokenised in context: no second dummy prefix at the prompt/answer boundary."""
    tokenizer = _DummyPrefixTokenizer(tiny_tokenizer, marker=7)
    messages = conversation("What is 2+2?", "4")
    input_ids, labels, prompt_len = tokenize_example(messages, tokenizer)
    full_text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert input_ids == tokenizer(full_text)["input_ids"]  # one marker, at the start
    assert tiny_tokenizer.decode(labels[prompt_len:]) == "4<|im_end|>\n"


def test_tokenize_requires_chat_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_example(conversation("a", "b"), tiny_tokenizer)


def test_tokenize_records_truncates_and_drops(tiny_tokenizer):
    records = [
        {"messages": conversation("short", "fits")},
        {"messages": conversation("short", "a long completion that will be cut")},
        {"messages": conversation("p" * 60, "never seen")},
    ]
    _, _, prompt_len = tokenize_example(records[0]["messages"], tiny_tokenizer)
    max_length = prompt_len + 10  # "fits<|im_end|>\n" is 6 tokens: fits; the long one does not
    dataset, stats = tokenize_records(records, tiny_tokenizer, max_length=max_length)
    assert isinstance(dataset, Dataset)
    counts = (stats.num_records, stats.num_examples, stats.num_truncated, stats.num_dropped)
    assert counts == (3, 2, 1, 1)
    assert len(dataset[1]["input_ids"]) == max_length
    # The truncated example keeps its prompt intact and the start of its completion.
    kept = [t for t in dataset[1]["labels"] if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(kept) == "a long completion that will be cut"[: len(kept)]
    with pytest.raises(DataError, match="No usable examples"):
        tokenize_records(records[2:], tiny_tokenizer, max_length=max_length)
    # With the loss on the prompt too, a long prompt still teaches something: kept, cut.
    _, stats = tokenize_records(records, tiny_tokenizer, max_length=max_length, train_on_prompt=True)
    assert (stats.num_examples, stats.num_truncated, stats.num_dropped) == (3, 2, 0)


def make_examples(tokenizer, n: int = 7) -> list[dict]:
    records = [
        {"messages": conversation("q" * (i % 4 + 1), "answer " + "x" * (i * 3 % 11))}
        for i in range(n)
    ]
    dataset, _ = tokenize_records(records, tokenizer, max_length=512)
    return [dict(row) for row in dataset]


def test_packing_keeps_examples_and_isolates_boundaries(tiny_tokenizer):
    examples = make_examples(tiny_tokenizer)
    max_length = 90
    rows = pack_examples(examples, max_length)
    assert len(rows) < len(examples)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_length
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True):
            ids = row["input_ids"][a:b]
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
            original = next(e for e in examples if e["input_ids"] == ids)
            assert row["labels"][a + 1 : b] == original["labels"][1:]
            seen.append(ids)
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)


def test_packing_fills_rows_tightly():
    lengths = [20, 60, 30, 40, 20, 30]
    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in lengths]
    rows = pack_examples(examples, 100)
    assert sorted(len(r["input_ids"]) for r in rows) == [100, 100]  # the optimum: 2 full rows
    assert pack_examples(examples, 100) == rows  # deterministic


def test_packing_with_train_on_prompt_masks_boundary_labels(tiny_tokenizer):
    records = [{"messages": conversation("a" * i, "b")} for i in range(1, 5)]
    dataset, stats = tokenize_records(
        records, tiny_tokenizer, max_length=60, train_on_prompt=True, packing=True
    )
    assert stats.num_sequences == len(dataset) == 2 and stats.num_examples == 4
    for row in dataset:
        for i, p in enumerate(row["position_ids"]):
            assert (row["labels"][i] == IGNORE_INDEX) == (p == 0)
    with pytest.raises(ValueError, match="more than max_length"):
        pack_examples(make_examples(tiny_tokenizer), 10)


def token_loss_sum(model, batch) -> float:
    labels = batch.pop("labels")
    logits = model(**batch).logits  # as the Trainer calls it: the batch alone says use_cache
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    ).item()


def test_packed_batch_loss_equals_unpacked(tiny_tokenizer, tiny_llama):
    """Packed rows (with padding) give exactly the per-example losses: no attention across examples.

    In train mode with the config's default ``use_cache=True``, as under the Trainer.
    """
    assert tiny_llama.config.use_cache
    tiny_llama.train()
    examples = make_examples(tiny_tokenizer)
    collator = CausalLMCollator.from_tokenizer(tiny_tokenizer)
    with torch.no_grad():
        separate = sum(token_loss_sum(tiny_llama, collator([e])) for e in examples)
        packed = token_loss_sum(tiny_llama, collator(pack_examples(examples, 90)))
        padded = token_loss_sum(tiny_llama, collator(examples))
    assert packed == pytest.approx(separate, rel=1e-4)
    assert padded == pytest.approx(separate, rel=1e-4)


# ------------------------------------------------------------------------------- collation


def test_collator_pads_right_with_ignored_labels():
    collator = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)
    batch = collator(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9, 9, 9], [4, 5, 6, 7, 8, 9, 9, 9]]
    assert batch["labels"].tolist() == [
        [-100, 2, 3, -100, -100, -100, -100, -100],
        [4, 5, 6, 7, 8, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
    assert "position_ids" not in batch and "use_cache" not in batch


def test_collator_packed_rows_get_position_ids_not_mask():
    collator = CausalLMCollator(pad_token_id=0)
    batch = collator(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [5], "labels": [-100], "position_ids": [0]},
        ]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert "attention_mask" not in batch
    assert batch["use_cache"] is False  # transformers separates packed examples only without a cache
    with pytest.raises(ValueError, match="mixes packed rows"):
        collator([{"input_ids": [1], "position_ids": [0]}, {"input_ids": [1]}])
    with pytest.raises(ValueError, match="labels has 1 entries but input_ids has 2"):
        collator([{"input_ids": [1, 2], "labels": [1]}])


def test_collator_needs_a_pad_token(tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        CausalLMCollator.from_tokenizer(tiny_tokenizer)


def test_dataset_trains_with_transformers_trainer(tmp_path, tiny_tokenizer, tiny_llama):
    from transformers import Trainer, TrainingArguments

    records = [{"messages": conversation(f"q{i}", f"a{i}")} for i in range(8)]
    for packing in (False, True):
        dataset, _ = tokenize_records(records, tiny_tokenizer, max_length=64, packing=packing)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out{packing}"),
            per_device_train_batch_size=4,
            max_steps=2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=tiny_llama,
            args=args,
            train_dataset=dataset,
            data_collator=CausalLMCollator.from_tokenizer(tiny_tokenizer),
        )
        result = trainer.train()
        assert torch.isfinite(torch.tensor(result.training_loss))


# ---------------------------------------------------------------------------------- splits


def test_train_val_split_is_deterministic_and_disjoint():
    records = list(range(100))
    train, val = train_val_split(records, 10, seed=3)
    assert (train, val) == train_val_split(records, 10, seed=3)
    assert len(val) == 10 and sorted(train + val) == records
    assert train == sorted(train) and val == sorted(val)  # input order kept
    assert val != train_val_split(records, 10, seed=4)[1]
    assert len(train_val_split(records, 0.25)[1]) == 25


@pytest.mark.parametrize("size", [0, 100, 1.0, 0.0, -1])
def test_train_val_split_rejects_empty_parts(size):
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(list(range(100)), size)
