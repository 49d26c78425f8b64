"""What keeping the linear layers' inputs for backward costs, with no weight gradient at all.

Any adapter that trains a linear layer's weights (LoRA's A, SpIEL's deltas) must keep that
layer's input until backward; the floor of `bench/speed.py` (frozen weights) does not. This
times, interleaved on SmolLM2-135M-Instruct (batch 4 x 256 random tokens), the floor, the
floor through a Python autograd.Function per targeted layer (what a custom op's call costs),
and the same Function that also saves its input (what keeping it alive costs):

    python bench/saved_inputs.py --output bench/results/saved_inputs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spielft.default_model import load_model_and_tokenizer

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FrozenLinear(torch.autograd.Function):
    """``x @ W.T`` with the input gradient only; ``save_input`` keeps x as a weight grad would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, save_input: bool) -> torch.Tensor:
        ctx.weight = weight
        if save_input:
            ctx.save_for_backward(x)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight, None, None


def build(variant: str) -> nn.Module:
    model, _ = load_model_and_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    if variant != "floor":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
                assert module.bias is None
                module.forward = (lambda m: lambda x: FrozenLinear.apply(
                    x, m.weight, variant == "function_saving_input"))(module)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "saved_inputs.json"))
    args = parser.parse_args()
    variants = ["floor", "function", "function_saving_input"]
    models = {v: build(v) for v in variants}
    batch = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for step in range(args.steps + 1):
        for v in variants:
            start = time.perf_counter()
            embeds = models[v].get_input_embeddings()(batch).detach().requires_grad_(True)
            models[v](inputs_embeds=embeds, labels=batch).loss.backward()
            if step:  # the first round warms up
                times[v].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    result = {"command": " ".join(["bench/saved_inputs.py", *sys.argv[1:]]), "batch": [4, 256],
              "step_seconds": {v: statistics.median(t) for v, t in times.items()},
              "all_step_seconds": times}
    for v in variants:
        median = result["step_seconds"][v]
        print(f"{v:24} {median:.3f} s  {median / floor:.3f}x the floor  +{median - floor:.3f} s")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
