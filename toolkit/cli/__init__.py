"""The `toolkit` command: one subcommand per stage function, errors as one line, never a traceback.

Each command is argument parsing, one stage call, and printing. The contract a script relies on:
options go anywhere (`toolkit predict NAME --settings S FILE`); the result goes to stdout (with
`--json`, exactly one JSON document, also when the command fails: {"error": the line, "exit_code": N})
while progress bars and logs go to stderr; exit 0 ok, 1 some inputs failed, 2 usage or settings error (also
any other error a user can act on: one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from toolkit.cli import base, data, info, model, serve  # noqa: F401  (each module registers its commands)
from toolkit.cli.base import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, log
from toolkit.core.errors import ToolkitError, os_error_line


class Parser(argparse.ArgumentParser):
    """argparse's parser; with --json on the command line a usage error is also the JSON document on stdout."""

    json_errors = False

    def error(self, message: str):  # argparse prints the usage and exits 2
        if self.json_errors:
            fail_json(f"{self.prog}: {message}", EXIT_USAGE)
        super().error(message)


def fail_json(line: str, code: int) -> None:
    """A failed command's one JSON document: the error line (also on stderr) and the exit code."""
    base.out(json.dumps({"error": line, "exit_code": code}))


def build_parser(name: str, json_errors: bool = False) -> argparse.ArgumentParser:
    """The parser of one command: its own options plus --settings, --quiet and --json."""
    handler, arguments = COMMANDS[name]
    parser = Parser(prog=f"toolkit {name}", description=handler.__doc__)
    parser.json_errors = json_errors
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
    base.STDOUT = sys.stdout
    args = build_parser(name, json_errors="--json" in rest).parse_intermixed_args(rest)  # usage errors exit 2
    args.argv = argv  # the command line as given (train --processes relaunches it)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress bars and library prints: stderr
            return COMMANDS[name][0](args)
    except ToolkitError as exc:
        return failed(args, str(exc), EXIT_USAGE)
    except BrokenPipeError:  # output piped into `head` and the like
        return EXIT_OK
    except OSError as exc:  # disk full, permission denied, a name too long: one line naming the file
        return failed(args, os_error_line(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        log("interrupted")
        return 130


def failed(args: argparse.Namespace, line: str, code: int) -> int:
    """A command that stopped on an error a user can act on: one line on stderr (and the JSON document)."""
    log(f"error: {line}")
    if args.json:
        fail_json(line, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
