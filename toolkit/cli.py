"""The `toolkit` command: one subcommand per stage function, errors as one line, never a traceback.

Each command is argument parsing, one stage call, and printing. The contract a script relies on:
options go anywhere (`toolkit predict NAME --settings S FILE`); the result goes to stdout (with
`--json`, exactly one JSON document) while progress bars and logs go to stderr; exit 0 ok, 1 some
inputs failed, 2 usage or settings error (also any other error a user can act on: one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError, os_error_line

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


def _spec(args: argparse.Namespace):
    from toolkit.settings import load_settings
    return load_settings(args.settings).get(args.name)




@command("backbones")
def cmd_backbones(args: argparse.Namespace) -> int:
    """List the registry's backbones and whether their pretrained weights are on this machine."""
    from toolkit.core.backbones import describe_backbones

    return emit(args, *describe_backbones())


@command("tasks")
def cmd_tasks(args: argparse.Namespace) -> int:
    """List the task kinds, the settings keys each owns, and the features each supports."""
    from toolkit.tasks.registry import describe_tasks

    return emit(args, *describe_tasks())


@command("scrape", NAME,
         arg("--source", help="ddgs, folder:PATH, urls:FILE (class<TAB>url lines), fashion-mnist[:DIR] (default: "
             "the section's source key; auto = fashion-mnist for [fashion-mnist], else ddgs)"),
         arg("--classes", help="comma-separated classes to scrape (default: all of the section's)"),
         arg("--per-class", type=int, help="accepted images per class (default: per_class)"),
         arg("--add-class", help="add this class to the section's classes in settings.ini and scrape it"),
         arg("--workers", type=int, default=32, help="downloads in flight at once (default 32)"),
         arg("--test-split", action="store_true", help="also write the test images to scrape/NAME-test/"),
         arg("--test-per-class", type=int, default=None))
def cmd_scrape(args: argparse.Namespace) -> int:
    """Fill scrape/NAME/<class>/ from ddgs search, folder:PATH, urls:FILE or fashion-mnist[:DIR]."""
    from toolkit.stages.scrape.section import scrape_section

    report, result, folder = scrape_section(args.settings, args.name, source=args.source, classes=args.classes,
                                    per_class=args.per_class, add_class=args.add_class, workers=args.workers,
                                    test_split=args.test_split, test_per_class=args.test_per_class,
                                    progress=not args.quiet, log=log)
    return emit(args, result, [report.format(), f"scraped into {folder} (provenance: {folder / 'manifest.jsonl'})"])


@command("train", NAME, DATA, *(arg(flag, type=kind, help=f"override the section's {flag[2:].replace('-', '_')}")
                               for flag, kind in (("--arch", str), ("--size", int), ("--epochs", int),
                                                  ("--freeze-epochs", int), ("--lr", float), ("--bs", int))))
def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune the classifier and write models/NAME/."""
    from toolkit.tasks import task_of

    spec = _spec(args).with_overrides(arch=args.arch, size=args.size, epochs=args.epochs, lr=args.lr,
                                      bs=args.bs, freeze_epochs=args.freeze_epochs)
    task = task_of(spec)
    metrics = task.train(spec, args.data, progress=not args.quiet, log=log)
    return emit(args, {k: metrics[k] for k in task.result_keys() if k in metrics},
                [f"valid accuracy {metrics['accuracy']:.2%} on {metrics['n']}; plots: "
                 + ", ".join(str(spec.models_dir / n) for n in task.plot_names())])


@command("sweep", NAME, DATA,
         arg("--grid", help='values to try, e.g. "lr=1e-3,3e-3 size=96,128 arch=resnet18,efficientnet_lite0"'),
         arg("--best", action="store_true", help="write the best run's values into settings.ini"))
def cmd_sweep(args: argparse.Namespace) -> int:
    """Train every combination of --grid into models/NAME/sweep/ (TensorBoard, CSV, table, plot);
    --best writes the winner's values into settings.ini."""
    from toolkit.stages.sweep import CSV_NAME, PLOT_NAME, TABLE_NAME, apply_best, parse_grid, ranked, sweep

    spec = _spec(args)
    if not args.grid and not args.best:
        raise ToolkitError('sweep needs --grid "KEY=V1,V2 ..." (e.g. --grid "lr=1e-3,3e-3 size=96"), --best, or both')
    result: dict[str, Any] = {}
    if args.grid:
        grid = parse_grid(args.grid)  # a bad key or value fails before any training
        result["runs"] = ranked(sweep(spec, grid, args.data, progress=not args.quiet, log=log))
        folder = spec.models_dir / "sweep"
        log(f"wrote {folder / CSV_NAME}, {folder / TABLE_NAME} and {folder / PLOT_NAME}")
    lines = [f"{row['combo']}\taccuracy {row['accuracy']}" for row in result.get("runs", [])]
    if args.best:
        result["best"] = apply_best(Path(args.settings).resolve(), spec)
        lines.append(f"best: set {' '.join(f'{k} = {v}' for k, v in result['best'].items())} in [{spec.name}] "
                     f"of {args.settings}")
    return emit(args, result["runs"] if "runs" in result and "best" not in result else result, lines)


@command("evaluate", NAME, DATA, arg("--tta", action="store_true", help="average with the horizontally flipped image"))
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the trained model on DIR/<class>/ images; confusion matrix as PNG and JSON."""
    from toolkit.stages.evaluate import evaluate
    from toolkit.tasks import task_of

    spec = _spec(args)
    metrics = evaluate(spec, args.data, tta=args.tta, progress=not args.quiet)
    for bad in metrics.get("bad_files", []):
        log(f"skipped: {bad['reason']}")
    return emit(args, metrics, [task_of(spec).report(metrics),
                                f"wrote {spec.models_dir / 'evaluation' / 'metrics.json'} and the plots beside it"])


@command("predict", NAME, arg("files", nargs="*", help="images (task = pairs: two per prediction)"),
         arg("--pair", nargs=2, metavar=("A", "B"), help="task = pairs: are these two photos one pair?"))
def cmd_predict(args: argparse.Namespace) -> int:
    """Label and probabilities per file; a bad file is one line on stderr, the rest still run."""
    from toolkit.stages.evaluate import predict

    rows, failed = predict(_spec(args), [*(args.pair or []), *args.files], on_error=lambda m: log(f"error: {m}"))
    return emit(args, rows[0] if args.pair and len(rows) == 1 else rows,
                [row["line"] if "a" in row else f"{row['file']}\t{row['line']}" for row in rows],
                EXIT_FAILED if failed else EXIT_OK)


@command("check", NAME, DATA, arg("--n", type=int, default=16, help="items in the batch (default 16)"),
         arg("--steps", type=int, default=30, help="optimiser steps (default 30)"),
         arg("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)"),
         arg("--threshold", type=float, default=0.1, help="pass when the loss ends below this (default 0.1)"),
         arg("--labels", choices=("real", "shuffled", "random"), default="real",
             help="real; shuffled (one fixed permutation); random (new at every step: must fail)"),
         arg("--approach", choices=("stacked", "siamese"), help="task = pairs: one approach only"))
def cmd_check(args: argparse.Namespace) -> int:
    """Sanity check: can a fresh model overfit one small batch? PASS (exit 0) or FAIL (exit 1)."""
    from toolkit.stages.check import check

    if args.n < 2 or args.steps < 1:
        raise ToolkitError("check needs --n 2 or more and --steps 1 or more")
    results = check(_spec(args), args.data, n=args.n, steps=args.steps, lr=args.lr, threshold=args.threshold,
                    labels=args.labels, approach=args.approach, progress=not args.quiet)
    rows = [r.as_dict() for r in results]
    return emit(args, rows[0] if len(rows) == 1 else rows, [r.line() for r in results],
                EXIT_OK if all(r.passed for r in results) else EXIT_FAILED)


@command("explain", NAME, arg("file", type=Path),
         arg("--target", help="the class to explain (default: the predicted class)"),
         arg("--out", type=Path, help="the PNG to write (default models/NAME/explanations/FILE-STEM.png)"))
def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM of FILE as a PNG: the image and a heatmap overlay per model (per member of an ensemble)."""
    from toolkit.stages.explain import explain_file

    path, prediction = explain_file(_spec(args), args.file, target=args.target, out=args.out)
    return emit(args, {"file": str(args.file), "png": str(path), **prediction.as_dict()},
                [f"{args.file}\t{prediction.line()}\twrote {path}"])


@command("apps")
def cmd_apps(args: argparse.Namespace) -> int:
    """Write apps/NAME.ipynb for every classifier of settings.ini, and apps/index.ipynb."""
    from toolkit.ui.apps import write_apps

    paths = write_apps(args.settings)
    return emit(args, [str(p) for p in paths], [f"wrote {p}" for p in paths])


@command("serve", *BIND, arg("--timeout", type=float, default=120, help="seconds to wait for Voila to start"),
         arg("--max-kernels", type=int, default=8, help="dashboard kernels alive at once (default 8)"))
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve every classifier's dashboard and the cleaning app with Voila (until Ctrl-C)."""
    from toolkit.settings import load_settings
    from toolkit.ui.serve import serve_dashboards

    return serve_dashboards(load_settings(args.settings), args.host, args.port, token=not args.no_token, out=out,
                            timeout=args.timeout, allowed_hosts=args.allow_host or (), max_kernels=args.max_kernels)


@command("clean", NAME, arg("--data", type=Path, help="raw class folders (default: the data key, else scrape/NAME)"),
         arg("--report", action="store_true", help="write the rankings as CSV and JSON, no UI"),
         arg("--apply", action="store_true", help="materialise cleaned_data/NAME from the decisions"),
         arg("--dry-run", action="store_true", help="show what --apply would change"),
         arg("--undo", action="store_true", help="undo the last decision of one session (default: the one that "
             "decided last; it is printed)"), arg("--undo-all", action="store_true", help="undo all of one session's"),
         arg("--session", help="with --undo/--undo-all: the session whose decisions to undo"),
         arg("--size", type=int, default=128, help="embedding image size (default 128)"),
         arg("--no-model", action="store_true", help="skip top losses even if models/NAME exists"), *BIND)
def cmd_clean(args: argparse.Namespace) -> int:
    """Rank and clean a classifier's raw images: the Voila widget, --report [--json] or --apply."""
    from toolkit.stages.clean.run import clean_batch
    from toolkit.ui.serve import serve_cleaner

    spec = _spec(args)
    if not (args.report or args.apply or args.dry_run or args.undo or args.undo_all):
        return serve_cleaner(spec, Path(args.settings).resolve(), args.data, args.host, args.port, out=out,
                             token=not args.no_token, allowed_hosts=args.allow_host or ())
    result, lines, code = clean_batch(spec, args.data, report=args.report, apply=args.apply, dry_run=args.dry_run,
                                      undo=args.undo, undo_all=args.undo_all, session=args.session, size=args.size,
                                      with_model=not args.no_model, warn=log)
    return emit(args, result, lines, code)


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
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    global STDOUT
    STDOUT = sys.stdout
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
