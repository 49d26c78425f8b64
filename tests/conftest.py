"""Shared offline fixtures: a tiny ChatML tokenizer and a tiny random Llama built to match it."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

import tiny_models

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: one token per byte, so lengths are predictable and
    any text round-trips exactly. Special tokens first, then the 256 byte symbols (260 in all)."""
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (about 0.1M parameters) in eval mode, identical for a given seed."""
    return tiny_models.tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        initializer_range=0.2,  # peaky logits: greedy decoding has no near-ties
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    ).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_tiny_llama(tiny_tokenizer)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one thread avoids OpenMP thrashing on a busy 2-core machine (bitsandbytes'
    CPU kernels share torch's pool: a 64x128 dequantize took 15 ms with 2 threads, 20 us with 1).

    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
