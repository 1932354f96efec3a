"""`toolkit` commands. The model stages: train, sweep, evaluate, predict, check, explain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from toolkit.cli.base import DATA, EXIT_FAILED, EXIT_OK, NAME, arg, checked_overrides, command, emit, log, spec_of
from toolkit.core.errors import ToolkitError


@command("train", NAME, DATA, *(arg(flag, type=kind, help=f"override the section's {flag[2:].replace('-', '_')}")
                               for flag, kind in (("--arch", str), ("--size", int), ("--epochs", int),
                                                  ("--freeze-epochs", int), ("--lr", float), ("--bs", int))),
         arg("--head-only", action="store_true",
             help="retrain only the head of the trained model on cached body features (seconds)"),
         arg("--processes", type=int, default=1,
             help="data-parallel training in N processes (Accelerate; gloo on CPU); --bs is per process"))
def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune the classifier and write models/NAME/ (--head-only: retrain its head only)."""
    from toolkit import distributed
    from toolkit.tasks import task_of

    spec = spec_of(args).with_overrides(**checked_overrides(args, ("arch", "size", "epochs", "freeze_epochs", "lr",
                                                                   "bs")))
    task = task_of(spec)
    if args.processes < 1:
        raise ToolkitError("train --processes needs 1 or more")
    if args.head_only:
        from toolkit.stages.train import retrain_head

        if args.processes > 1 or distributed.world_size() > 1:
            raise ToolkitError("train --head-only runs in one process (it takes seconds); leave out --processes")
        metrics = retrain_head(spec, args.data, progress=not args.quiet, log=log)
        previous = metrics.get("previous_accuracy")
        return emit(args, {k: metrics[k] for k in (*task.result_keys(), "previous_accuracy", "features_computed",
                                                   "features_reused", "wall_seconds") if k in metrics},
                    [f"valid accuracy {metrics['accuracy']:.2%} on {metrics['n']}"
                     + (f" (before: {previous:.2%})" if isinstance(previous, (int, float)) else "")
                     + f"; head retrained in {metrics['wall_seconds']} s"])
    if args.processes > 1 and distributed.world_size() == 1:
        task.require("distributed", spec.name)
        if args.data is not None and not Path(args.data).is_dir():
            raise ToolkitError(f"training data folder {args.data} not found")
        return distributed.launch(args.processes, _without_processes(getattr(args, "argv", sys.argv[1:])), log=log)
    if distributed.world_size() > 1:
        task.require("distributed", spec.name)
    metrics = task.train(spec, args.data, progress=not args.quiet, log=log)
    if not distributed.is_main():
        return EXIT_OK  # rank 0 alone prints the result
    return emit(args, {k: metrics[k] for k in (*task.result_keys(), "world_size") if k in metrics},
                [f"valid accuracy {metrics['accuracy']:.2%} on {metrics['n']}; plots: "
                 + ", ".join(str(spec.models_dir / n) for n in task.plot_names())])


def _without_processes(argv: list[str]) -> list[str]:
    """The command line minus --processes N (the launched processes each run one share)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--processes":
            skip = True
        elif not item.startswith("--processes="):
            out.append(item)
    return out


@command("sweep", NAME, DATA,
         arg("--grid", help='values to try, e.g. "lr=1e-3,3e-3 size=96,128 arch=resnet18,efficientnet_lite0"'),
         arg("--best", action="store_true", help="write the best run's values into settings.ini"))
def cmd_sweep(args: argparse.Namespace) -> int:
    """Train every combination of --grid into models/NAME/sweep/ (TensorBoard, CSV, table, plot);
    --best writes the winner's values into settings.ini."""
    from toolkit.stages.sweep import CSV_NAME, PLOT_NAME, TABLE_NAME, apply_best, parse_grid, ranked, sweep

    spec = spec_of(args)
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

    spec = spec_of(args)
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

    rows, failed = predict(spec_of(args), [*(args.pair or []), *args.files], on_error=lambda m: log(f"error: {m}"))
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
    results = check(spec_of(args), args.data, n=args.n, steps=args.steps, lr=args.lr, threshold=args.threshold,
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

    path, prediction = explain_file(spec_of(args), args.file, target=args.target, out=args.out)
    return emit(args, {"file": str(args.file), "png": str(path), **prediction.as_dict()},
                [f"{args.file}\t{prediction.line()}\twrote {path}"])
