"""The CLI's building blocks: registering a command and its arguments, and printing its result
(stdout for results only, stderr for progress and logs)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], list]] = {}
STDOUT = sys.stdout  # results only; everything else printed while a command runs goes to stderr


def out(text: str = "") -> None:
    print(text, file=STDOUT, flush=True)


def emit(args: argparse.Namespace, value: Any, lines: list[str], code: int = 0) -> int:
    """The command's result on stdout: one JSON document with --json, else the lines."""
    out(json.dumps(value)) if args.json else [out(line) for line in lines]
    return code


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # progress and logs: never stdout


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a command, as `ArgumentParser.add_argument` takes it."""
    return flags, options


NAME, DATA = arg("name", help="the classifier: a section of settings.ini"), arg("--data", type=Path)
BIND = [arg("--port", type=int, default=8866), arg("--host", default="127.0.0.1", help="default: loopback only"),
        arg("--no-token", action="store_true", help="serve without a token (loopback only)"),
        arg("--allow-host", action="append", metavar="NAME", help="also accept this Host name (repeatable)")]


def command(name: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    """Register `toolkit NAME`: the decorated function runs it with these arguments parsed."""
    def register(handler: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (handler, list(arguments))
        return handler
    return register


def checked_overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings keys given as options (`--freeze-epochs 2` for freeze_epochs), each parsed by its settings
    key's own check: a bad value is a one-line error naming the option, as a bad settings.ini value names its key."""
    from toolkit.core.config import GENERIC_KEYS
    from toolkit.core.errors import ToolkitError

    given = {}
    for key in keys:
        value = getattr(args, key)
        if value is None:
            continue
        try:
            given[key] = GENERIC_KEYS[key].parse(str(value))
        except ValueError as exc:
            raise ToolkitError(f"--{key.replace('_', '-')} {value}: {exc}") from None
    return given


def spec_of(args: argparse.Namespace):
    """The ClassifierSpec of the command's NAME in its --settings."""
    from toolkit.settings import load_settings
    return load_settings(args.settings).get(args.name)
