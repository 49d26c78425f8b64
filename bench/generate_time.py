"""Greedy generation with an unmerged adapter: deltas patched per forward against kept applied.

``SpielModel.generate`` runs inside ``applied_deltas()``: each new token's forward writes the
deltas' values into W once (and only the first token's forward: the values do not change
while generating) instead of writing and restoring every targeted weight. This times both on
SmolLM2-135M-Instruct (random deltas, random prompts), interleaved with the base model alone
(adapter disabled: the least generation can cost), and checks that the two adapter runs
generate the same tokens.

    python bench/generate_time.py --densities 0.01 0.184
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from spielft import SpielConfig, get_spiel_model
from spielft.default_model import load_model_and_tokenizer

RESULTS = Path(__file__).parent / "results"


def time_density(args: argparse.Namespace, density: float) -> dict[str, float | bool]:
    base, _ = load_model_and_tokenizer()
    model = get_spiel_model(base, SpielConfig(density=density))
    with torch.no_grad():
        for delta in model.sparse_deltas().values():
            delta.values.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
    model.eval()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    def without_adapter() -> torch.Tensor:  # the floor: the base model's own generation
        with model.disable_adapter():
            return model.base_model.generate(**kwargs)

    runs = {"per_use": lambda: model.base_model.generate(**kwargs),  # the layers patch per use
            "applied": lambda: model.generate(**kwargs),
            "no_adapter": without_adapter}
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the same tokens?
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    row: dict[str, float | bool] = {name: statistics.median(t) for name, t in times.items()}
    row["speedup"] = row["per_use"] / row["applied"]
    row["applied_over_no_adapter"] = row["applied"] / row["no_adapter"]
    row["same_tokens"] = torch.equal(outputs["per_use"], outputs["applied"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.184])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "generate_time.json"))
    args = parser.parse_args()
    result = {"command": " ".join(["bench/generate_time.py", *sys.argv[1:]]),
              "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
              "by_density": {}}
    for density in args.densities:
        row = time_density(args, density)
        result["by_density"][str(density)] = row
        print(f"density {density:g}: per use {row['per_use']:.2f} s, applied {row['applied']:.2f} s "
              f"({row['speedup']:.2f}x faster), no adapter {row['no_adapter']:.2f} s (applied "
              f"{row['applied_over_no_adapter']:.2f}x that), same tokens: {row['same_tokens']}",
              flush=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
