"""The `toolkit` command: one subcommand per stage function, errors as one line, never a traceback.

Each command is argument parsing, one stage call, and printing. The contract a script relies on:
options go anywhere (`toolkit predict NAME --settings S FILE`); the result goes to stdout (with
`--json`, exactly one JSON document) while progress bars and logs go to stderr; exit 0 ok, 1 some
inputs failed, 2 usage or settings error (also any other error a user can act on: one line).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from toolkit.cli import base, data, info, model, serve  # noqa: F401  (each module registers its commands)
from toolkit.cli.base import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, log
from toolkit.core.errors import ToolkitError, os_error_line


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command: its own options plus --settings, --quiet and --json."""
    handler, arguments = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"toolkit {name}", description=handler.__doc__)
    parser.add_argument("--settings", type=Path, default=Path("settings.ini"),
                        help="the project's settings file (default ./settings.ini)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout")
    for flags, options in arguments:
        parser.add_argument(*flags, **options)
    return parser


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command word wherever it stands among the options (`--settings S` takes a value)."""
    for i, word in enumerate(argv):
        if word in COMMANDS and not (i > 0 and argv[i - 1] == "--settings"):
            return word, argv[:i] + argv[i + 1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = split_command(argv)
    if name is None:  # no command: the list of them (on stdout when asked for with --help)
        rows = "\n".join(f"  {n:<10} {(h.__doc__ or '').splitlines()[0]}" for n, (h, _) in COMMANDS.items())
        asked = argv[:1] in (["-h"], ["--help"])
        print(f"usage: toolkit COMMAND [options] (toolkit COMMAND --help)\n\ncommands:\n{rows}",
              file=sys.stdout if asked else sys.stderr)
        return EXIT_OK if asked else EXIT_USAGE
    args = build_parser(name).parse_intermixed_args(rest)  # argparse exits 2 on usage errors
    args.argv = argv  # the command line as given (train --processes relaunches it)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    base.STDOUT = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress bars and library prints: stderr
            return COMMANDS[name][0](args)
    except ToolkitError as exc:
        log(f"error: {exc}")
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return EXIT_OK
    except OSError as exc:  # disk full, permission denied, a name too long: one line naming the file
        log(f"error: {os_error_line(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
