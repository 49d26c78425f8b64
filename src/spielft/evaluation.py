"""Model-agnostic evaluation: completion loss, batched greedy generation, answer extraction.

Nothing here knows about sparse fine-tuning: it only calls ``model(...)`` and
``model.generate(...)``, so it works on any Hugging Face causal LM, wrapped or not, and gives
the same numbers for the base model and the fine-tuned one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from spielft.data import IGNORE_INDEX, normalize_records, split_prompt_completion
from spielft.demo_data import extract_iso_date

__all__ = [
    "EXTRACTORS",
    "ExactMatchResult",
    "Extractor",
    "evaluate_exact_match",
    "evaluate_loss",
    "exact",
    "exact_match_accuracy",
    "generate_answers",
    "get_extractor",
    "last_number",
    "normalize_number",
    "regex_extractor",
]

Extractor = Callable[[str], str | None]
"""Maps a model output (or a reference answer) to the answer to compare; ``None``: no answer."""

Prompt = str | Sequence[Mapping[str, str]]
"""A user message, or a list of chat messages ending where the assistant should answer."""


# ------------------------------------------------------------------------------------- loss


def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_loss(
    model: Any,
    dataset: Sequence[Mapping[str, Any]],
    collator: Callable[[list[Mapping[str, Any]]], dict[str, Any]],
    batch_size: int = 8,
) -> float:
    """Mean cross-entropy per completion token (labels != -100) over ``dataset``.

    Token-weighted, so the result does not depend on the batch size. The model is put in eval
    mode (no dropout) and its previous train/eval mode is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("evaluate_loss got an empty dataset.")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in collator(features).items()}
            labels = batch.pop("labels")
            if "position_ids" in batch:  # packed rows: per-example attention needs no KV cache
                batch["use_cache"] = False
            output = model(**batch)
            logits = output.logits if hasattr(output, "logits") else output[0]
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:]
            total += F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss found no completion tokens (every label is -100).")
    return total / count


# ------------------------------------------------------------------------------- generation


def _as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the model's configured ones plus the tokenizer's (e.g. ``<|im_end|>``)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    *,
    chat: bool = True,
) -> list[str]:
    """Greedy completions for ``prompts`` (decoded, without the prompt, whitespace-stripped).

    Prompts go through the chat template (``chat=False`` uses them as raw text). Batches are
    left-padded, with prompts of similar length batched together, and the result is in the input
    order; left padding with an attention mask makes each answer the same as generating it alone.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has no pad or eos token to pad batched prompts with.")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template; pass chat=False to use prompts as raw text."
        )
    encoded = []
    for prompt in prompts:
        text = (
            tokenizer.apply_chat_template(
                _as_messages(prompt), add_generation_prompt=True, tokenize=False
            )
            if chat
            else str(prompt)
        )
        encoded.append(list(tokenizer(text, add_special_tokens=not chat)["input_ids"]))

    device = _device_of(model)
    eos_ids = _eos_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.tensor(
                [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device
            )
            attention_mask = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk],
                device=device,
            )
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=eos_ids or None,
                use_cache=True,
            )
            for row, i in zip(output[:, width:], chunk, strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


# ------------------------------------------------------------------------------- extraction

_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Canonical spelling of a number: ``"1,000"`` -> ``"1000"``, ``"5.0"`` -> ``"5"``, ``"-0"`` -> ``"0"``."""
    cleaned = text.strip().replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    """GSM8K-style answer: the first number after the last ``####``, else the last number."""
    if "####" in text:
        match = _NUMBER_RE.search(text.rsplit("####", 1)[1])
        if match:
            return normalize_number(match.group())
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def exact(text: str) -> str:
    """The whole text, stripped of surrounding whitespace."""
    return text.strip()


def regex_extractor(pattern: str | re.Pattern[str], *, last: bool = False) -> Extractor:
    """Extractor returning the first (or ``last``) match of ``pattern``: group 1 if it has one."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        match = matches[-1] if last else matches[0]
        return (match.group(1) if compiled.groups else match.group()).strip()

    extract.__name__ = f"regex:{compiled.pattern}"
    return extract


EXTRACTORS: dict[str, Extractor] = {
    "exact": exact,
    "last_number": last_number,
    "iso_date": extract_iso_date,
}


def get_extractor(spec: str | Extractor) -> Extractor:
    """An extractor by name (``exact``, ``last_number``, ``iso_date``), ``regex:PATTERN``, or as is."""
    if callable(spec):
        return spec
    if spec.startswith("regex:"):
        try:
            return regex_extractor(spec.removeprefix("regex:"))
        except re.error as exc:
            raise ValueError(f"Invalid extractor regex {spec!r}: {exc}.") from None
    if spec not in EXTRACTORS:
        raise ValueError(
            f"Unknown answer extractor {spec!r}; choose one of {sorted(EXTRACTORS)} "
            "or 'regex:PATTERN'."
        )
    return EXTRACTORS[spec]


# ------------------------------------------------------------------------------ exact match


class ExactMatchResult(NamedTuple):
    """``accuracy`` in [0, 1] and one dict per example (prediction, reference, extracted, correct)."""

    accuracy: float
    records: list[dict[str, Any]]


def exact_match_accuracy(
    predictions: Sequence[str],
    references: Sequence[str],
    extractor: str | Extractor = "exact",
    *,
    prompts: Sequence[Any] | None = None,
) -> ExactMatchResult:
    """Share of predictions whose extracted answer equals the reference's extracted answer.

    The reference goes through the same extractor (so ``"... #### 72"`` becomes ``"72"``); if
    nothing can be extracted from it (a text answer under ``last_number``), the stripped
    prediction is compared with the stripped reference instead.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must match."
        )
    if prompts is not None and len(prompts) != len(predictions):
        raise ValueError(f"{len(prompts)} prompts but {len(predictions)} predictions.")
    if not predictions:
        raise ValueError("exact_match_accuracy needs at least one prediction.")
    extract = get_extractor(extractor)
    records = []
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        predicted = extract(prediction)
        expected = extract(reference)
        if expected is None:
            predicted, expected = prediction.strip(), reference.strip()
        record: dict[str, Any] = {"index": i}
        if prompts is not None:
            record["prompt"] = prompts[i]
        record.update(
            prediction=prediction,
            reference=reference,
            extracted=predicted,
            expected=expected,
            correct=predicted is not None and predicted == expected,
        )
        records.append(record)
    accuracy = sum(r["correct"] for r in records) / len(records)
    return ExactMatchResult(accuracy, records)


def evaluate_exact_match(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Mapping[str, Any]],
    *,
    extractor: str | Extractor = "exact",
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> ExactMatchResult:
    """Generate greedily for each record's prompt and score it against its completion.

    ``records`` may be in any format :func:`spielft.data.load_records` accepts.
    """
    get_extractor(extractor)  # a bad one fails before the (slow) generation, not after it
    normalized = normalize_records(records)
    pairs = [split_prompt_completion(r) for r in normalized]
    prompts = [p for p, _ in pairs]
    predictions = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    user_prompts = [p[-1]["content"] for p in prompts]
    return exact_match_accuracy(predictions, [c for _, c in pairs], extractor, prompts=user_prompts)
