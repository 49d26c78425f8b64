"""The ``spielft`` command line: recipes built on the library (train, eval, generate, merge)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

# bitsandbytes (imported by peft/transformers below) suggests an optional CPU kernel that it
# would download from the hub, on every import: not for an offline tool.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from . import evaluate, generate, merge, train  # noqa: E402

COMMANDS = {"train": train, "eval": evaluate, "generate": generate, "merge": merge}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="spielft",
        description="Sparse fine-tuning of LLMs with SpIEL (dynamic sparse deltas).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, module in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(commands[name])
    return parser, commands


def apply_config_file(
    parser: argparse.ArgumentParser, command: argparse.ArgumentParser, argv: list[str] | None, args
) -> argparse.Namespace:
    """Use a ``--config`` YAML file's values as defaults, so that explicit flags still win."""
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {a.dest for a in command._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}; options are {sorted(known - {'help'})}")
    command.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        args = apply_config_file(parser, commands[args.command], argv, args)
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"spielft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
