"""Instruction data: read, validate, normalise to chat messages, tokenise, pack and collate.

Every source (JSONL, JSON, CSV, a ``datasets.save_to_disk`` folder, or records in memory) and every
record format (chat ``messages``, ``prompt``/``completion``, Alpaca, or any two fields named by
the caller) is normalised to one shape, ``{"messages": [{"role", "content"}, ...]}``, whose last
message is the assistant completion. The whole file is validated before anything is tokenised,
so a bad record fails in seconds with its file and line, not hours into a run.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

__all__ = [
    "HELD_OUT_SPLITS",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "DataError",
    "TokenizeStats",
    "detect_format",
    "load_records",
    "normalize_records",
    "pack_examples",
    "split_prompt_completion",
    "tokenize_example",
    "tokenize_records",
    "train_val_split",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the causal-LM loss ignores (prompt tokens, padding, pack boundaries)."""

HELD_OUT_SPLITS = ("test", "validation", "valid", "dev")
"""Split names evaluation takes from a DatasetDict when none is named, in this order."""

ROLES = ("system", "user", "assistant")
FORMAT_DESCRIPTIONS = {
    "messages": "chat ('messages': a list of {'role', 'content'} ending with an assistant message)",
    "prompt_completion": "'prompt' + 'completion' (strings, or trl's lists of messages)",
    "alpaca": "Alpaca ('instruction', optional 'input', 'output')",
    "fields": "the two fields given with fields=(PROMPT_FIELD, COMPLETION_FIELD)",
}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_T = TypeVar("_T")


class DataError(ValueError):
    """A data file or record is unusable; the message names the file, the line and the problem."""


# --------------------------------------------------------------------------------------- reading


def load_records(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    fields: tuple[str, str] | None = None,
    system_prompt: str | None = None,
    split: str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read and validate instruction data; return records as ``{"messages": [...]}``.

    ``source``: a ``.jsonl``/``.ndjson``, ``.json`` (a list of objects, or ``{"data": [...]}``) or
    ``.csv`` file, a ``datasets.save_to_disk`` folder (``split`` picks from a DatasetDict, default
    ``"train"``; a sequence of names takes the first one present, e.g. `HELD_OUT_SPLITS`), or an
    iterable of dicts. ``fields=(prompt_field, completion_field)`` reads any
    other pair of fields, e.g. ``("question", "answer")`` for GSM8K. ``system_prompt`` is added to
    records that have no system message. Raises :class:`DataError` on the first bad record.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        raw, name = _read_path(path, split=split), str(path)
    else:
        raw, name = [(f"record index {i}", r) for i, r in enumerate(source)], "<records>"
    if not raw:
        raise DataError(f"{name}: no records found.")
    return _normalize(raw, name, fields=fields, system_prompt=system_prompt)


def normalize_records(
    records: Iterable[Mapping[str, Any]],
    *,
    fields: tuple[str, str] | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Validate in-memory records of any supported format and return them as ``messages``."""
    return load_records(records, fields=fields, system_prompt=system_prompt)


def _read_path(path: Path, *, split: str | Sequence[str] | None) -> list[tuple[str, Any]]:
    """``(location, raw record)`` pairs; the location is what error messages cite."""
    if not path.exists():
        raise DataError(f"Data file '{path}' does not exist.")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(
        f"{path}: unsupported data file type '{suffix}'. Use .jsonl, .json, .csv, "
        "or a folder written by datasets.Dataset.save_to_disk."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}).") from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+2029 or U+0085 unescaped.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}, line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}). "
                "Each line of a JSONL file must be one complete JSON object."
            ) from None
    return out


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})."
        ) from None
    if isinstance(data, Mapping):
        if not isinstance(data.get("data"), list):
            raise DataError(
                f"{path}: a JSON object at the top level must hold the records in a 'data' list "
                f"(found keys {sorted(data)}); or make the file a JSON list of records."
            )
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records (or {{'data': [...]}}), "
            f"got {type(data).__name__}."
        )
    return [(f"{path}, record index {i}", r) for i, r in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[str, Any]]:
    # The csv module finds the line ends itself (as with newline=""); splitlines() would also
    # split quoted cells at U+2028, U+2029 or U+0085.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (expected a header row naming the fields).")
    out = []
    start = reader.line_num + 1
    try:
        for row in reader:
            where = f"{path}, line {start}"
            if None in row:
                raise DataError(
                    f"{where}: row has more values than the header's {len(reader.fieldnames)} "
                    f"columns {reader.fieldnames}."
                )
            out.append((where, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc}).") from None
    return out


def _read_saved_dataset(path: Path, split: str | Sequence[str] | None) -> list[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path} is a folder but not a dataset written by datasets' save_to_disk ({exc})."
        ) from None
    if isinstance(ds, DatasetDict):
        wanted = [split or "train"] if split is None or isinstance(split, str) else list(split)
        present = [name for name in wanted if name in ds]
        if not present:
            raise DataError(
                f"{path}: no split {' or '.join(map(repr, wanted))}; available splits: "
                f"{sorted(ds)}. Name one (split=..., or --split / --eval-split on the CLI)."
            )
        ds, path = ds[present[0]], path / present[0]
    elif isinstance(split, str):
        logger.warning("%s holds a single dataset; ignoring split=%r", path, split)
    return [(f"{path}, record index {i}", r) for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------------- validation


def detect_format(record: Mapping[str, Any], *, fields: tuple[str, str] | None = None) -> str:
    """Name of the record format: ``messages``, ``prompt_completion``, ``alpaca`` or ``fields``.

    Raises :class:`DataError` (without a location) when the keys match no format.
    """
    if fields is not None:
        return "fields"
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    expected = "; ".join(v for k, v in FORMAT_DESCRIPTIONS.items() if k != "fields")
    raise DataError(
        f"cannot tell the record format from its fields {sorted(map(str, record))}. Expected one "
        f"of: {expected}. For other field names pass fields=(PROMPT_FIELD, COMPLETION_FIELD) "
        "(on the command line: --fields PROMPT_FIELD,COMPLETION_FIELD)."
    )


def _normalize(
    raw: list[tuple[str, Any]],
    name: str,
    *,
    fields: tuple[str, str] | None,
    system_prompt: str | None,
) -> list[dict[str, Any]]:
    if fields is not None and (
        len(fields) != 2 or not all(isinstance(f, str) and f for f in fields)
    ):
        raise ValueError(f"fields must be two field names (prompt, completion), got {fields!r}.")
    first_where, first = raw[0]
    if not isinstance(first, Mapping):
        raise DataError(f"{first_where}: expected an object/dict, got {type(first).__name__}.")
    try:
        fmt = detect_format(first, fields=fields)
    except DataError as exc:
        raise DataError(f"{first_where}: {exc}") from None
    detected = f"(format {fmt!r} was detected from {first_where.removeprefix(name + ', ')})"

    out = []
    for where, record in raw:
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object/dict, got {type(record).__name__}.")
        try:
            messages = _to_messages(record, fmt, fields)
        except DataError as exc:
            raise DataError(f"{where}: {exc} {detected}") from None
        if system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        out.append({"messages": messages})
    return out


def _to_messages(
    record: Mapping[str, Any], fmt: str, fields: tuple[str, str] | None
) -> list[dict[str, str]]:
    if fmt == "messages":
        return _check_messages(record.get("messages"))
    if fmt == "prompt_completion" and isinstance(record.get("prompt"), list):
        # trl's conversational prompt-completion: two lists of messages, read as one chat.
        completion = record.get("completion")
        if not isinstance(completion, list):
            raise DataError(
                f"'prompt' is a list of messages, so 'completion' must be one too (trl's "
                f"conversational format), got {type(completion).__name__} ({_short(completion)})."
            )
        return _check_messages([*record["prompt"], *completion])
    if fmt == "prompt_completion":
        prompt_key, completion_key, extra = "prompt", "completion", None
    elif fmt == "alpaca":
        prompt_key, completion_key, extra = "instruction", "output", "input"
    else:
        assert fields is not None
        prompt_key, completion_key, extra = fields[0], fields[1], None

    missing = [k for k in (prompt_key, completion_key) if record.get(k) is None]
    if missing:
        raise DataError(
            f"missing field {missing[0]!r}; this format expects fields "
            f"{prompt_key!r} and {completion_key!r} (found {sorted(map(str, record))})."
        )
    prompt = _string_field(record, prompt_key).strip()
    completion = _string_field(record, completion_key).strip()
    if extra is not None and record.get(extra) is not None:
        extra_text = _string_field(record, extra).strip()
        if extra_text:
            prompt = f"{prompt}\n\n{extra_text}"
    if not prompt:
        raise DataError(f"empty prompt (field {prompt_key!r}).")
    if not completion:
        raise DataError(f"empty completion (field {completion_key!r}); there is nothing to learn.")

    messages = []
    if fmt != "fields" and record.get("system") is not None:
        system = _string_field(record, "system").strip()
        if system:
            messages.append({"role": "system", "content": system})
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": completion},
    ]
    return messages


def _string_field(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"field {key!r} must be a string, got {type(value).__name__} ({_short(value)}); "
            "quote it in the data file."
        )
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if isinstance(messages, str):  # e.g. a CSV cell holding JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError("field 'messages' is a string that is not a JSON list.") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"field 'messages' must be a non-empty list of {{'role', 'content'}} objects, "
            f"got {_short(messages)}."
        )
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DataError(
                f"messages[{i}] must be an object with 'role' and 'content', got {_short(msg)}."
            )
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"messages[{i}] has role {role!r}; expected one of {list(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(
                f"messages[{i}]['content'] must be a string, got {type(content).__name__}."
            )
        if role == "system" and i != 0:
            raise DataError(f"messages[{i}] is a system message; only the first may be one.")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"the last message must be the assistant's completion, but it is a "
            f"{out[-1]['role']!r} message."
        )
    if not out[-1]["content"].strip():
        raise DataError("empty completion (the last assistant message has no content).")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise DataError("no user message before the assistant's completion.")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_prompt_completion(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """``(prompt messages, reference completion)`` of a normalised record (for evaluation)."""
    messages = record["messages"]
    return [dict(m) for m in messages[:-1]], messages[-1]["content"]


# -------------------------------------------------------------------------------- tokenisation


@dataclass
class TokenizeStats:
    """What tokenisation did to the data; logged, and worth showing to the user."""

    num_records: int = 0
    num_examples: int = 0  # kept after dropping
    num_truncated: int = 0  # kept, but cut at max_length
    num_dropped: int = 0  # prompt alone filled max_length: no completion token left
    num_sequences: int = 0  # rows of the dataset (fewer than examples when packing)
    num_label_tokens: int = 0


def tokenize_example(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on_prompt: bool = False,
) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, prompt_length)`` of one conversation, untruncated.

    The prompt is tokenised exactly as generation will see it (chat template with
    ``add_generation_prompt=True``), and the completion is the rest of the rendered conversation
    (including the end-of-turn token, so the model learns to stop). The completion's tokens are
    those of the whole conversation after the prompt's, as the model meets them in context;
    only if the tokenizer merges across the boundary (the prompt's tokens are then not a prefix)
    is the completion tokenised on its own.

    In a multi-turn conversation every assistant turn gets the loss (as trl's
    ``assistant_only_loss``), each found the same way, as the tokens between the conversation
    up to it with a generation prompt and the conversation through it; ``prompt_length`` is
    then where the first assistant turn starts. If a template or tokenizer breaks that prefix
    property for an earlier turn, only the last turn gets the loss.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template, so conversations cannot be formatted. "
            "Use an instruction/chat model, or set tokenizer.chat_template."
        )
    messages = [dict(m) for m in messages]
    prompt_text = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The tokenizer's chat template renders the prompt differently when the answer "
            "follows it, so the completion cannot be separated from the prompt.\n"
            f"prompt: {prompt_text[-200:]!r}\nfull:   {full_text[: len(prompt_text) + 50][-250:]!r}"
        )
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
    if full_ids[: len(prompt_ids)] == prompt_ids:
        completion_ids = full_ids[len(prompt_ids) :]
    else:  # e.g. a SentencePiece dummy prefix or a merge across the boundary
        completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)[
            "input_ids"
        ]
    input_ids = prompt_ids + list(completion_ids)
    if train_on_prompt:
        return input_ids, list(input_ids), len(prompt_ids)
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    earlier = _earlier_assistant_spans(messages, tokenizer, input_ids)
    for start, end in earlier:
        labels[start:end] = input_ids[start:end]
    return input_ids, labels, earlier[0][0] if earlier else len(prompt_ids)


def _earlier_assistant_spans(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, input_ids: list[int]
) -> list[tuple[int, int]]:
    """Token spans of the assistant turns before the last one, or [] where they cannot be
    found as exact token prefixes of ``input_ids`` (then only the last turn is trained)."""
    spans = []
    for i, message in enumerate(messages[:-1]):
        if message["role"] != "assistant" or i == 0:  # an opening greeting has no prompt
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        start_ids = list(tokenizer(before, add_special_tokens=False)["input_ids"])
        end_ids = list(tokenizer(through, add_special_tokens=False)["input_ids"])
        if (
            not through.startswith(before)
            or input_ids[: len(start_ids)] != start_ids
            or input_ids[: len(end_ids)] != end_ids
        ):
            return []
        spans.append((len(start_ids), len(end_ids)))
    return spans


def tokenize_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    packing: bool = False,
) -> tuple[Dataset, TokenizeStats]:
    """Tokenise records (any format :func:`load_records` accepts) into a ``datasets.Dataset``.

    Columns: ``input_ids`` and ``labels`` (``-100`` on the prompt unless ``train_on_prompt``), plus
    ``position_ids`` when ``packing``. Sequences longer than ``max_length`` are cut at the end
    (the prompt's start is kept); examples whose completion is cut entirely are dropped (unless
    ``train_on_prompt``: their prompt still carries the loss). With
    ``packing``, examples are combined into rows of at most ``max_length`` tokens (see
    :func:`pack_examples`). Use :class:`CausalLMCollator` to batch the result.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    stats = TokenizeStats()
    examples: list[dict[str, list[int]]] = []
    for record in normalize_records(records):
        stats.num_records += 1
        input_ids, labels, prompt_len = tokenize_example(
            record["messages"], tokenizer, train_on_prompt=train_on_prompt
        )
        if prompt_len >= max_length and not train_on_prompt:  # no label would be left
            stats.num_dropped += 1
            continue
        if len(input_ids) > max_length:
            stats.num_truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        examples.append({"input_ids": input_ids, "labels": labels})

    stats.num_examples = len(examples)
    if stats.num_truncated:
        logger.warning(
            "%d of %d examples were longer than max_length=%d and were truncated.",
            stats.num_truncated,
            stats.num_records,
            max_length,
        )
    if stats.num_dropped:
        logger.warning(
            "Dropped %d of %d examples whose prompt alone fills max_length=%d.",
            stats.num_dropped,
            stats.num_records,
            max_length,
        )
    if not examples:
        raise DataError(
            f"No usable examples: all {stats.num_records} prompts are at least max_length="
            f"{max_length} tokens long (or there were no records). Increase max_length."
        )

    rows = pack_examples(examples, max_length) if packing else examples
    stats.num_sequences = len(rows)
    stats.num_label_tokens = sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    return Dataset.from_list(rows), stats


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], max_length: int
) -> list[dict[str, list[int]]]:
    """Combine tokenised examples into rows of at most ``max_length`` tokens.

    Each row gets ``position_ids`` that restart at 0 for every example: transformers uses them to
    keep attention within each example (when no attention mask is passed and the model is run
    without a KV cache, as in training). The first label of every example is set to ``-100``, so
    no token is ever trained to be predicted from the previous example's last token.
    """
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) > max_length:
            raise ValueError(
                f"example {i} has {len(ex['input_ids'])} tokens, more than max_length="
                f"{max_length}; truncate before packing."
            )
    # Best-fit decreasing: O(n log n), deterministic, and close to optimal for this use.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
        else:
            space, b = max_length, len(bins)
            bins.append([i])
        if space - n > 0:
            bisect.insort(free, (space - n, b))

    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):  # keep the data's order inside a row
            ids, labels = list(examples[i]["input_ids"]), list(examples[i]["labels"])
            labels[0] = IGNORE_INDEX
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += list(range(len(ids)))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------- collation


@dataclass
class CausalLMCollator:
    """Right-pad a list of tokenised examples into a causal-LM batch of tensors.

    Returns ``input_ids``, ``labels`` (padding is ``-100``) and ``attention_mask``. For packed rows
    (they carry ``position_ids``) it returns ``position_ids`` instead of an attention mask: each
    padding run gets its own positions starting at 0, so transformers treats it as one more
    sequence and the block-diagonal causal mask keeps the real tokens unaffected. Packed batches
    also carry ``use_cache=False``: transformers only builds that per-example mask when the
    forward pass has no KV cache, and ``config.use_cache`` is on by default, in training too.
    Rows without ``labels`` are labelled with their own ``input_ids`` (train on everything).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, *, pad_to_multiple_of: int | None = None
    ) -> CausalLMCollator:
        """A collator that pads with the tokenizer's pad token (which must be set)."""
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token) before building the collator."
            )
        return cls(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        packed = ["position_ids" in f for f in features]
        if any(packed) and not all(packed):
            raise ValueError("A batch mixes packed rows (with position_ids) and unpacked rows.")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids, labels, attention, positions = [], [], [], []
        for f in features:
            ids = list(f["input_ids"])
            lab = list(f["labels"]) if "labels" in f else list(ids)
            if len(lab) != len(ids):
                raise ValueError(
                    f"labels has {len(lab)} entries but input_ids has {len(ids)} in a batch row."
                )
            pad = length - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [self.label_pad_token_id] * pad)
            attention.append([1] * len(ids) + [0] * pad)
            if packed[0]:
                positions.append(list(f["position_ids"]) + list(range(pad)))

        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed[0]:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        return batch


# ------------------------------------------------------------------------------------ splits


def train_val_split(
    records: Sequence[_T], val_size: int | float, *, seed: int = 0
) -> tuple[list[_T], list[_T]]:
    """Hold out a deterministic validation set: ``val_size`` records (int) or a fraction (float).

    The same records and seed always give the same split; both parts keep the input order.
    """
    n = len(records)
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"A fractional val_size must be between 0 and 1, got {val_size}.")
        k = max(1, round(n * val_size))
    else:
        k = int(val_size)
    if not 0 < k < n:
        raise ValueError(
            f"val_size={val_size} would hold out {k} of {n} records; "
            "both the training and the validation part must be non-empty."
        )
    held = set(random.Random(seed).sample(range(n), k))
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val
