"""Do a SpIEL adapter's indices sit on high-magnitude input features?

For each targeted matrix of trained SpIEL adapters, the mean input RMS of the columns its indices
address, divided by the mean input RMS of all columns (1.0 for a random index set). Input RMS is
measured on GSM8K training examples through the base SmolLM2-135M-Instruct. Adam moves every
delta by about the learning rate whatever its gradient, so a ratio above 1 means each step moves
the layer's output that much more than the same step on random positions.

    python bench/index_columns.py random=runs/A/weights ag=runs/B/weights   # LABEL=ADAPTER_DIR

(the adapter folders come from ``bench/quality.py --keep-weights`` or ``spielft train``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # the benchmark's data split


def input_rms(model: torch.nn.Module, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per-input-column RMS of every linear layer of the blocks, over all tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return {n: (sums[n] / counts[n]).sqrt() for n in sums}


def column_ratios(adapter_dir: Path, rms: dict[str, torch.Tensor]) -> list[float]:
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    ratios = []
    for name, column_rms in rms.items():
        indices = tensors[f"{name}.indices"].long()
        ratios.append((column_rms[indices % column_rms.numel()].mean() / column_rms.mean()).item())
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapters", nargs="+", metavar="LABEL=ADAPTER_DIR")
    p.add_argument("--examples", type=int, default=8, help="GSM8K training examples to measure on")
    p.add_argument("--output", default=None, help="write the summary as JSON here")
    args = p.parse_args()
    from spielft.cli.common import load_model
    from spielft.data import tokenize_records

    model, tokenizer = load_model(None)
    train, _, _ = quality.load_data({"data": "gsm8k", "gsm8k_dir": str(quality.GSM8K_DIR),
                                     "val_examples": 16, "train_examples": 1000})
    dataset, _ = tokenize_records(train[: args.examples], tokenizer, max_length=384)
    rms = input_rms(model, [example["input_ids"] for example in dataset])
    summary = {}
    for item in args.adapters:
        label, _, folder = item.partition("=")
        ratios = column_ratios(Path(folder), rms)
        summary[label] = {"median": statistics.median(ratios), "mean": statistics.fmean(ratios),
                          "max": max(ratios), "matrices": len(ratios)}
        print(f"{label}: chosen-column input RMS / mean column RMS over {len(ratios)} matrices: "
              f"median {summary[label]['median']:.2f}, mean {summary[label]['mean']:.2f}, "
              f"max {summary[label]['max']:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"command": sys.argv, "adapters": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
