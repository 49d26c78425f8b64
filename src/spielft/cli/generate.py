"""``spielft generate``: try a model (and adapter) from the terminal."""

from __future__ import annotations

import sys

from ..evaluation import generate_answers
from .common import add_model_arguments, apply_adapter, load_model

HELP = "Generate with a model and an optional adapter: one-shot --prompt, or a multi-turn chat on stdin."


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a one-shot user message (repeat for several, each answered on its own); "
                             "without it, chat on stdin: one user turn a line, the whole conversation kept")
    parser.add_argument("--max-new-tokens", type=int, default=128)


def run(args) -> int:
    model, tokenizer = load_model(args.model, args.dtype, args.quantize, args.adapter)
    model = apply_adapter(model, args.adapter)
    if args.prompt:
        for answer in generate_answers(model, tokenizer, args.prompt, args.max_new_tokens, batch_size=len(args.prompt)):
            print(answer)
        return 0
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []  # the conversation so far: each answer sees all of it
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            messages.append({"role": "user", "content": line.strip()})
            answer = generate_answers(model, tokenizer, [messages], args.max_new_tokens, batch_size=1)[0]
            messages.append({"role": "assistant", "content": answer})
            print(f"model> {answer}" if interactive else answer, flush=True)
