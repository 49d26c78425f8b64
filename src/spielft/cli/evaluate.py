"""``spielft eval``: held-out loss and exact-match accuracy, with or without an adapter."""

from __future__ import annotations

from pathlib import Path

from ..data import CausalLMCollator, tokenize_records
from ..evaluation import evaluate_exact_match, evaluate_loss, get_extractor
from .common import (
    add_model_arguments,
    apply_adapter,
    default_extractor,
    default_max_new_tokens,
    eval_records,
    load_model,
    parse_fields,
    write_json,
)

HELP = "Held-out loss and exact-match accuracy of a model, with or without an adapter."


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", default=None, help="JSONL/JSON/CSV file or datasets folder (default: the demo test split)")
    parser.add_argument("--fields", default=None, help="PROMPT,COMPLETION field names for other formats (e.g. question,answer)")
    parser.add_argument("--split", default=None, help="split of a datasets folder (default: test, else validation)")
    parser.add_argument("--max-examples", type=int, default=200, help="evaluate on the first N records")
    parser.add_argument("--extractor", default=None,
                        help="exact, last_number, iso_date or regex:PATTERN (default: iso_date on the demo "
                             "task, else last_number; text answers are compared whole)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512, help="truncation for the loss")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-generate", action="store_true", help="loss only (generation is slow on a CPU)")
    parser.add_argument("--output", default=None, help="write the metrics (and per-example records) as JSON here")


def evaluate(model, tokenizer, records, *, extractor, max_new_tokens, max_length, batch_size,
             generate: bool = True) -> dict:
    dataset, stats = tokenize_records(records, tokenizer, max_length=max_length)
    collator = CausalLMCollator.from_tokenizer(tokenizer)
    # The loss covers the examples whose prompt leaves room for the answer within max_length.
    metrics = {"examples": len(records), "loss_examples": stats.num_examples,
               "loss": evaluate_loss(model, dataset, collator, batch_size=batch_size)}
    if generate:
        result = evaluate_exact_match(model, tokenizer, records, extractor=extractor,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size)
        metrics["exact_match"] = result.accuracy
        metrics["records"] = result.records
    return metrics


def run(args) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():  # before the slow part, not after it
        raise FileNotFoundError(f"--output {output}: folder {output.parent} does not exist")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be at least 1, got {args.max_examples}")
    extractor = args.extractor or default_extractor(args.data)
    get_extractor(extractor)  # an unknown one fails now, not after the generations
    fields = parse_fields(args.fields)
    records = eval_records(args.data, fields, args.max_examples, args.split)
    model, tokenizer = load_model(args.model, args.dtype, args.quantize, args.adapter)
    model = apply_adapter(model, args.adapter)
    metrics = evaluate(
        model, tokenizer, records,
        extractor=extractor,
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(args.data),
        max_length=args.max_length, batch_size=args.batch_size, generate=not args.no_generate,
    )
    line = f"examples: {metrics['examples']}  loss: {metrics['loss']:.4f}"
    if metrics["loss_examples"] != metrics["examples"]:
        line += f" (on {metrics['loss_examples']}: the others' prompts fill --max-length)"
    if "exact_match" in metrics:
        line += f"  exact match: {100 * metrics['exact_match']:.1f}%"
    print(line)
    if output is not None:
        write_json(output, metrics)
    return 0
