"""Adapter file size at an equal number of trainable parameters: spielft vs peft LoRA and SHiRA.

    python bench/adapter_size.py [--rank 16] [--model default]

Writes bench/results/adapter_size.json. No training is needed: sizes depend only on the
number and dtype of what is stored.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import peft
import torch

from spielft import SpielConfig, get_spiel_model
from spielft.default_model import load_model_and_tokenizer

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def weights_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "shira", "spielft"):
            base, _ = load_model_and_tokenizer(args.model)
            if method == "spielft":
                model = get_spiel_model(base, SpielConfig(num_tunable_weights=rows["lora"]["params"],
                                                          target_modules=LINEARS))
            elif method == "lora":
                model = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, target_modules=LINEARS))
            else:
                model = peft.get_peft_model(base, peft.ShiraConfig(r=args.rank, target_modules=LINEARS))
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out = Path(tmp) / method
            model.save_pretrained(out)
            size = weights_file(out).stat().st_size
            rows[method] = {"params": params, "bytes": size, "bytes_per_param": size / params}
            del model, base
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for row in rows.values():
        row["ratio_to_lora"] = row["bytes"] / rows["lora"]["bytes"]
    result = {"command": f"python bench/adapter_size.py --rank {args.rank}",
              "model": args.model or "SmolLM2-135M-Instruct", "lora_rank": args.rank, "rows": rows}
    path = Path(__file__).parent / "results" / "adapter_size.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':8} {'params':>12} {'file MB':>9} {'B/param':>8} {'x LoRA':>7}")
    for name, row in rows.items():
        print(f"{name:8} {row['params']:12,d} {row['bytes'] / 1e6:9.2f} {row['bytes_per_param']:8.2f} "
              f"{row['ratio_to_lora']:7.2f}")


if __name__ == "__main__":
    main()
