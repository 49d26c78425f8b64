"""Where a SpIEL training step spends its time: torch.profiler over a few steps.

    python bench/profile_step.py --method spiel-ma --density 0.195   # LoRA r=64's budget
    python bench/profile_step.py --method spiel-ma --density 0.01
    python bench/profile_step.py --method spiel-ma --density 0.184 --weight-grad-dtype bfloat16
    python bench/profile_step.py --method spiel-ma --density 0.184 --structure rows

Prints the top operators by self CPU time (SmolLM2-135M-Instruct, batch 4 x 256).
``--applied`` runs the steps inside ``SpielModel.applied_deltas()`` (the deltas stay written
into W between steps instead of being written and restored in every forward and backward).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from spielft import SpielConfig, get_spiel_model
from spielft.default_model import load_model_and_tokenizer

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["spiel-ag", "spiel-ma"], default="spiel-ma")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--weight-grad-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--applied", action="store_true", help="train inside applied_deltas()")
    parser.add_argument("--structure", choices=["unstructured", "rows", "columns"],
                        default="unstructured", help="SpielConfig.structure")
    args = parser.parse_args()
    base, _ = load_model_and_tokenizer()
    model = get_spiel_model(base, SpielConfig(density=args.density, regrowth=args.method[-2:],
                                              target_modules=LINEARS,
                                              weight_grad_dtype=args.weight_grad_dtype,
                                              structure=args.structure))
    optimizer = model.create_optimizer()
    selector = model.create_selector(optimizer, total_steps=1000)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                          generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        selector.step()
        optimizer.zero_grad(set_to_none=True)

    with model.applied_deltas() if args.applied else contextlib.nullcontext():
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
