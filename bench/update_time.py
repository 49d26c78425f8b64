"""Time of one drop-and-regrow update against one training step (SmolLM2-135M, batch 4 x 256).

    python bench/update_time.py --densities 0.01 0.184
    python bench/update_time.py --densities 0.184 --structure rows --output bench/results/update_time_rows.json

For each density and regrowth: one ordinary step, then a one-step AG window (dense gradient
captured), then the update itself, timed alone. Writes bench/results/update_time.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spielft import SpielConfig, get_spiel_model
from spielft.default_model import load_model_and_tokenizer

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.184])
    parser.add_argument("--structure", choices=["unstructured", "rows", "columns"],
                        default="unstructured", help="SpielConfig.structure")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "update_time.json"))
    args = parser.parse_args()
    rows = []
    for density in args.densities:
        for regrowth in ("ag", "ma"):
            base, _ = load_model_and_tokenizer()
            config = SpielConfig(density=density, regrowth=regrowth, target_modules=LINEARS,
                                 reselection_steps=2, accumulation_steps=1,
                                 full_first_reselection=False, structure=args.structure)
            model = get_spiel_model(base, config)
            optimizer = model.create_optimizer()
            selector = model.create_selector(optimizer, total_steps=1000)
            batch = torch.randint(0, base.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
            step_times = []
            for _ in range(2):  # step 1: ordinary; step 2: the AG window (dense gradient)
                start = time.perf_counter()
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                step_times.append(time.perf_counter() - start)
                if selector.step_count == 0:
                    selector.step()
            selector.step_count += 1  # step 2 done: run its update alone, timed
            start = time.perf_counter()
            stats = selector.update()
            update = time.perf_counter() - start
            rows.append({"density": density, "regrowth": regrowth, "structure": args.structure,
                         "ordinary_step_s": step_times[0],
                         "window_step_s": step_times[1], "update_s": update,
                         "indices_changed": stats["spiel/indices_changed"]})
            print(f"density {density:.3%} {regrowth}: step {step_times[0]:.2f}s, window step "
                  f"{step_times[1]:.2f}s, update {update:.2f}s ({int(stats['spiel/indices_changed']):,} regrown)",
                  flush=True)
            del model, base, optimizer, selector
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    Path(args.output).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
