"""Tiny random models and a short training loop, shared by the tests.

A plain module (no pytest), so that tests/distributed_worker.py, which torchrun and
`accelerate launch` run as a script from this folder, can import it too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spielft import SpielModel, SpielSelector

TINY_LLAMA_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_llama(seed: int = 0, vocab_size: int = 128, **config: Any) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden size 64, 4 heads, 2 KV heads), identical for a given seed.

    ``config`` holds further `LlamaConfig` fields (they may also override the sizes).
    """
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA_SIZES, "vocab_size": vocab_size, **config}))


def train_steps(
    spiel: SpielModel,
    optimizer: torch.optim.Optimizer,
    selector: SpielSelector,
    data: torch.Tensor,
    steps: int,
    forward: Any = None,
) -> list[float]:
    """Put ``spiel`` in train mode and take ``steps`` optimizer steps on the fixed batch ``data``
    (token ids, also the labels), stepping ``selector`` after each; returns the step losses.
    ``forward`` runs the model instead of ``spiel`` itself (e.g. ``torch.compile(spiel)``)."""
    losses = []
    spiel.train()
    forward = spiel if forward is None else forward
    for _ in range(steps):
        loss = forward(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        selector.step()
        losses.append(loss.item())
    return losses
