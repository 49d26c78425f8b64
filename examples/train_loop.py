"""The plain SpIEL training loop on a tiny random Llama: no Trainer, nothing downloaded.

    python examples/train_loop.py [--regrowth ag|ma] [--steps 200]

It memorises a small fixed corpus and prints the loss falling and the indices changing.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spielft import SpielConfig, get_spiel_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--regrowth", choices=["ag", "ma"], default="ag")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model = get_spiel_model(base, SpielConfig(density=0.05, regrowth=args.regrowth,
                                              reselection_steps=20, accumulation_steps=5))
    model.print_trainable_parameters()
    optimizer = model.create_optimizer(lr=1e-2 if args.regrowth == "ag" else 5e-2, weight_decay=0.0)
    selector = model.create_selector(optimizer, total_steps=args.steps)

    # A small fixed corpus with a learnable rule: token_t = (7 * start + stride * t) mod 64.
    starts, strides = torch.arange(16)[:, None], torch.tensor([1, 2, 3, 5] * 4)[:, None]
    corpus = (starts * 7 + strides * torch.arange(16)[None]) % 64
    first_indices = {name: d.indices.clone() for name, d in model.sparse_deltas().items()}

    with model.applied_deltas():  # deltas stay written into W between steps; restored on exit
        for step in range(1, args.steps + 1):
            for batch in corpus.chunk(args.grad_accum):  # gradient accumulation
                loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                loss.backward()
            optimizer.step()
            stats = selector.step()  # drop and regrow every reselection_steps optimizer steps
            optimizer.zero_grad()
            if stats or step == 1 or step % 50 == 0:
                extra = f"  reselected {int(stats['spiel/indices_changed'])} indices" if stats else ""
                print(f"step {step:4d}  loss {loss.item() * args.grad_accum:.3f}{extra}")

    moved = sum(int((first_indices[n] != d.indices).sum()) for n, d in model.sparse_deltas().items())
    print(f"{moved} of {model.get_nb_trainable_parameters()[0]} index slots differ from the start")


if __name__ == "__main__":
    main()
