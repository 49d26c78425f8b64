"""``spielft merge``: write base + adapter as one standalone model folder."""

from __future__ import annotations

from .common import apply_adapter, atomic_output_dir, check_output_dir, load_model

HELP = "Merge an adapter into its base model and save a standalone Hugging Face model folder."


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="base model: HF folder or .gguf (default: the base model the adapter "
                             "records if that folder is here, else the embedded model)")
    parser.add_argument("--adapter", required=True, help="adapter folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder for the merged model (safetensors)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def run(args) -> int:
    check_output_dir(args.output, args.overwrite)  # before loading anything: fail in seconds
    model, tokenizer = load_model(args.model, args.dtype, adapter=args.adapter)
    merged = apply_adapter(model, args.adapter).merge_and_unload()
    with atomic_output_dir(args.output, args.overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {args.output}")
    return 0
