"""The ``spielft`` command line: recipes built on the library (train, eval, generate, merge)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

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


def _config_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """``value`` from the YAML file as the flag would give it: converted with the option's
    ``type`` and checked against its ``choices``, or a `ValueError` naming the key."""
    where = f"--config {path}: {key}"
    if action.nargs == "?" and value is False:
        return None  # e.g. ``resume: false``: the flag left out
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs == "?" and value is True and action.const is not None:
        return action.const  # e.g. ``resume: true``, like the bare flag
    several = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
    items = value if several and isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, (bool, list, dict)):
            raise ValueError(f"{where}: expected {_type_name(action)}, got {item!r}")
        try:  # from the text, as on the command line: no silent int(0.5) == 0
            item = action.type(str(item)) if action.type is not None else str(item)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {_type_name(action)}, got {item!r}") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: {item!r} is not one of {list(action.choices)}")
        converted.append(item)
    return converted if several else converted[0]


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "string") if action.type is not None else "string"


def apply_config_file(
    parser: argparse.ArgumentParser, command: argparse.ArgumentParser, argv: list[str] | None, args
) -> argparse.Namespace:
    """Use a ``--config`` YAML file's values as defaults, so that explicit flags still win.

    Each value is checked like the flag's (``type``, ``choices``); unknown keys are refused.
    """
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    # A key left empty (``output:``) keeps the option's default, as leaving it out would.
    values = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
    actions = {a.dest: a for a in command._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}; options are {sorted(actions)}")
    command.set_defaults(**{k: _config_value(actions[k], k, v, path) for k, v in values.items()})
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
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"spielft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
