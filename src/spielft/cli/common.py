"""Pieces shared by the CLI recipes: loading a model with or without an adapter, eval data."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..data import HELD_OUT_SPLITS, load_records
from ..default_model import DEFAULT_MODEL_NAME, is_default_model_folder, load_model_and_tokenizer
from ..demo_data import DEMO_EXTRACTOR, DEMO_MAX_NEW_TOKENS, demo_dataset
from ..files import apply_umask_mode, atomic_write
from ..hub import resolve_adapter_dir
from ..model import ADAPTER_CONFIG_NAME, SpielModel

DEMO = "demo"
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def add_model_arguments(parser, *, adapter: bool = True) -> None:
    parser.add_argument("--model", default=None,
                        help="local Hugging Face folder or .gguf file (default: the base model "
                             "the --adapter records if that folder is here, else the embedded "
                             "SmolLM2-135M-Instruct)")
    if adapter:
        parser.add_argument("--adapter", default=None,
                            help="adapter to apply (spielft or peft LoRA): a folder or a Hub repo id")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="load the base model quantized with bitsandbytes")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def quantization_config(kind: str | None, dtype: torch.dtype) -> Any:
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)


def load_model(model: str | None, dtype_name: str = "float32", quantize: str | None = None,
               adapter: str | None = None):
    """``--model`` (None: the default model), or, when only ``adapter`` is given, the local
    base model it records, if that folder is here (an adapter trained with ``--model X``)."""
    if model is None and adapter is not None:
        model = base_for_adapter(adapter)
    dtype = getattr(torch, dtype_name)
    return load_model_and_tokenizer(model, dtype=dtype,
                                    quantization_config=quantization_config(quantize, dtype))


def base_for_adapter(adapter: str) -> str | None:
    """The base model folder a spielft or peft adapter records if it is here, else None (the
    embedded model), saying so when the adapter was trained on another model."""
    config_path = resolve_adapter_dir(adapter) / ADAPTER_CONFIG_NAME
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # apply_adapter reports a missing or malformed adapter
    if not isinstance(base, str) or not base or is_default_model_folder(base):
        return None
    if Path(base).is_dir():
        print(f"--model not given: using the adapter's base model {base}", file=sys.stderr)
        return base
    print(f"--model not given: the adapter was trained on {base}, which is not a folder on this "
          f"machine; using the embedded {DEFAULT_MODEL_NAME} (pass --model to choose)", file=sys.stderr)
    return None


def apply_adapter(model: torch.nn.Module, adapter_dir: str | None) -> torch.nn.Module:
    """Wrap ``model`` with a saved spielft or peft adapter, from a folder or a Hub repo id."""
    if adapter_dir is None:
        return model
    folder = resolve_adapter_dir(adapter_dir)
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_CONFIG_NAME}: not an adapter folder")
    config = json.loads(config_path.read_text())
    if config.get("adapter_type") == "spielft":
        return SpielModel.from_pretrained(model, folder)
    if "peft_type" in config:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    raise ValueError(f"{config_path} is neither a spielft nor a peft adapter config")


def eval_records(
    data: str | None, fields: tuple[str, str] | None, n: int | None, split: str | None = None
) -> list[dict]:
    """Held-out records: the demo test split, or a user's file (first ``n``); from a datasets
    folder, ``split`` or else its test (or validation) split, never silently its training split."""
    if data in (None, DEMO):
        if fields is not None or split is not None:
            raise ValueError("--fields and --split are for --data FILE; the demo task has its own")
        return load_records(demo_dataset("test", n))
    records = load_records(data, fields=fields, split=split or HELD_OUT_SPLITS)
    return records[:n] if n else records


def default_extractor(data: str | None) -> str:
    return DEMO_EXTRACTOR if data in (None, DEMO) else "last_number"


def default_max_new_tokens(data: str | None) -> int:
    return DEMO_MAX_NEW_TOKENS if data in (None, DEMO) else 256


def parse_fields(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--fields takes 'PROMPT_FIELD,COMPLETION_FIELD' (e.g. question,answer), got {value!r}")
    return parts[0], parts[1]


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``--output`` that is a file, or a non-empty folder without ``overwrite``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--output {target} is a file, not a folder: choose another --output")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite or choose another --output")


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` that replaces it only if the block succeeds.

    An existing ``path`` is renamed aside first and deleted only once the new folder is in
    place (and put back if that fails), so no crash leaves neither of the two.
    """
    target = Path(path)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    apply_umask_mode(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = tmp.with_name(tmp.name + ".old")  # hidden, unique (as tmp is), same filesystem
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` as indented JSON at ``path``, written atomically (never half a file)."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
