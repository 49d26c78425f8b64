"""Activation memory: the bytes autograd holds for backward at the end of one forward.

    python bench/saved_activations.py                 # SmolLM2-135M-Instruct, batch 4 x 256
    python bench/saved_activations.py --methods floor lora spiel-ma-columns

Counts every distinct storage saved for backward (``torch.autograd.graph.saved_tensors_hooks``)
that is not a parameter or buffer of the model: exact and noise-free, where peak RSS mixes in
the allocator's retained pages. Methods are built as in ``bench/speed.py`` at LoRA r's count.
Writes bench/results/saved_activations.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from speed import CHOICES, RESULTS, Method


def saved_bytes(method: Method, batch: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages saved during one forward of ``method``."""
    model = method.model
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if method.name == "floor":
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=batch).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
    del loss
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", choices=CHOICES,
                        default=["floor", "lora", "spiel-ma", "spiel-ma-rows", "spiel-ma-columns"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--output", default=str(RESULTS / "saved_activations.json"))
    args = parser.parse_args()
    build = argparse.Namespace(model="default", hidden=0, layers=0, rank=args.rank,
                               batch=args.batch, seq=args.seq, quantize=None)
    rows = {}
    for name in args.methods:
        torch.manual_seed(0)
        method = Method(name, build, None, total_steps=100)
        vocab = method.model.config.vocab_size
        batch = torch.randint(0, vocab, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(0))
        mib = saved_bytes(method, batch) / 2**20
        method.summary()
        rows[name] = {"saved_activations_mib": mib}
        print(f"{name:24} {mib:8.1f} MiB saved for backward", flush=True)
    base = rows.get("floor", {}).get("saved_activations_mib")
    for row in rows.values():
        if base:
            row["over_floor_mib"] = row["saved_activations_mib"] - base
    result = {"command": "python bench/saved_activations.py " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k != "output"), "batch": [args.batch, args.seq], "rank": args.rank, "methods": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
