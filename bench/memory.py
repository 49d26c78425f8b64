"""Peak memory of fine-tuning SmolLM2-135M-Instruct: fp32 vs NF4 base, SpIEL vs (Q)LoRA.

    python bench/memory.py [--rank 16] [--batch 4] [--seq 256]

Each configuration runs a few training steps (including an AG accumulation window and a
reselection) in its own process, so peak RSS is its own; SpIEL gets LoRA rank r's number of
trainable parameters. Also reports the bytes of training state per trainable parameter (values,
indices, gradients, optimizer state). Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SPEED = Path(__file__).with_name("speed.py")
CONFIGS = [(None, "floor"), (None, "full"), (None, "lora"), (None, "spiel-ag"), (None, "spiel-ma"),
           ("nf4", "floor"), ("nf4", "lora"), ("nf4", "spiel-ag"), ("nf4", "spiel-ma")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    rows = []
    for quantize, method in CONFIGS:
        cmd = [sys.executable, str(SPEED), "--memory", method, "--rank", str(args.rank),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        if quantize:
            cmd += ["--quantize", quantize]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        row = json.loads(out[-2])
        row["base"] = quantize or "fp32"
        rows.append(row)
        print(f"{row['base']:5} {method:9} peak RSS {row['peak_rss_mib']:7.0f} MiB  "
              f"{row['state_bytes_per_param']:5.1f} B/param  {row['trainable_params']:,} params", flush=True)
    result = {"command": f"python bench/memory.py --rank {args.rank} --batch {args.batch} --seq {args.seq}",
              "model": "SmolLM2-135M-Instruct", "batch": [args.batch, args.seq], "lora_rank": args.rank,
              "rows": rows}
    path = Path(__file__).parent / "results" / "memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
