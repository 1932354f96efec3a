"""The `toolkit` command: one subcommand per stage function, errors as one line, never a traceback.

Each `cmd_*` is a thin face: parse arguments, call the stage's function, print its result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from toolkit.core.errors import ToolkitError

EXIT_ERROR = 2


def _settings(args: argparse.Namespace):
    from toolkit.settings import load_settings

    return load_settings(args.settings)


def _spec(args: argparse.Namespace):
    return _settings(args).get(args.name)


def cmd_backbones(args: argparse.Namespace) -> int:
    """List the registry's backbones and whether their pretrained weights are on this machine."""
    from toolkit.core.backbones import BACKBONES

    rows = [{"name": b.name, "weights_available": b.weights_available(),
             "weights": str(b.weights_path() or ""), "source": b.source} for b in BACKBONES.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'backbone':<20} {'weights here':<13} source")
    for row in rows:
        print(f"{row['name']:<20} {'yes' if row['weights_available'] else 'no':<13} {row['source']}")
        if not row["weights_available"]:
            print(f"{'':<20} {'':<13} (missing: {row['weights']})")
    return 0


def cmd_scrape(args: argparse.Namespace) -> int:
    """Fill scrape/NAME/<class>/ from ddgs search, folder:PATH, urls:FILE or fashion-mnist[:DIR]."""
    from toolkit.stages.scrape import fashion_mnist
    from toolkit.stages.scrape.run import add_class_to_settings, load_manifest, resolve_source, scrape

    settings = _settings(args)
    spec = settings.get(args.name)
    if args.workers <= 0:
        raise ToolkitError(f"--workers {args.workers}: must be a positive whole number")
    if args.per_class is not None and args.per_class <= 0:
        raise ToolkitError(f"--per-class {args.per_class}: must be a positive whole number")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.classes is not None and not classes:
        raise ToolkitError("--classes: give comma-separated class names, e.g. --classes cats,dogs")
    if args.add_class:
        existing = spec.classes or sorted({r["class"] for r in load_manifest(spec.scrape_dir)})
        if add_class_to_settings(settings.path, spec.name, args.add_class, existing):
            print(f"added class {args.add_class.strip()!r} to [{spec.name}] in {settings.path}")
            from toolkit.settings import load_settings

            spec = load_settings(settings.path).get(args.name)
        classes = [args.add_class.strip()]
    source = resolve_source(spec, args.source)
    if args.test_split and not source.startswith("fashion-mnist"):
        raise ToolkitError(f"--test-split: only the fashion-mnist source has a test split, not {source}")
    report = scrape(spec, source=source, classes=classes, per_class=args.per_class, progress=not args.quiet,
                    workers=args.workers, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.format())
    print(f"scraped into {spec.scrape_dir} (provenance: {spec.scrape_dir / 'manifest.jsonl'})")
    if args.test_split:
        folder = Path(source.split(":", 1)[1]) if ":" in source else fashion_mnist.FASHION_MNIST_DIR
        test_dir = spec.root / "scrape" / f"{spec.name}-test"
        counts = fashion_mnist.ingest(test_dir, split="test", per_class=args.test_per_class, seed=spec.seed,
                                      folder=folder, progress=not args.quiet)
        print(f"test images: {sum(counts.values())} in {test_dir}")
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune the classifier and write models/NAME/."""
    from toolkit.train import train

    spec = _spec(args).with_overrides(arch=args.arch, size=args.size, epochs=args.epochs, lr=args.lr,
                                      bs=args.bs, freeze_epochs=args.freeze_epochs)
    metrics = train(spec, args.data, progress=not args.quiet, log=lambda line: print(line, flush=True))
    if spec.ensemble:  # train() trained every member, then the ensemble
        print(f"members: {spec.models_dir / 'members'}; ensemble: {spec.models_dir / 'confusion_matrix.png'}")
        if args.json:
            print(json.dumps({k: metrics[k] for k in ("accuracy", "n", "per_class", "groups", "ensemble_mode",
                                                      "members", "modes")}))
        return 0
    out = spec.models_dir
    print(f"plots: {out / 'lr_find.png'}, {out / 'losses.png'}, {out / 'confusion_matrix.png'}, "
          f"{out / 'top_losses.png'}")
    if args.json:
        print(json.dumps({k: metrics[k] for k in ("accuracy", "n", "per_class", "groups", "levels") if k in metrics}))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train every combination of --grid into models/NAME/sweep/ (TensorBoard, CSV, table, plot);
    --best writes the winner's values into settings.ini."""
    from toolkit.sweep import CSV_NAME, PLOT_NAME, TABLE_NAME, apply_best, parse_grid, ranked, sweep

    settings = _settings(args)
    spec = settings.get(args.name)
    if not args.grid and not args.best:
        raise ToolkitError('sweep needs --grid "KEY=V1,V2 ..." (e.g. --grid "lr=1e-3,3e-3 size=96"), --best, or both')
    if args.grid:
        grid = parse_grid(args.grid)  # a bad key or value fails before any training
        rows = sweep(spec, grid, args.data, progress=not args.quiet, log=lambda line: print(line, flush=True))
        folder = spec.models_dir / "sweep"
        print(f"wrote {folder / CSV_NAME}, {folder / TABLE_NAME} and {folder / PLOT_NAME}")
        if args.json:
            print(json.dumps(ranked(rows)))
    if args.best:
        values = apply_best(settings.path, spec)
        print(f"best: set {' '.join(f'{k} = {v}' for k, v in values.items())} in [{spec.name}] of {settings.path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the trained model on DIR/<class>/ images; confusion matrix as PNG and JSON."""
    from toolkit.evaluate import evaluate_folder, format_report, plot_confusion
    from toolkit.model_io import load_predictor

    spec = _spec(args)
    predictor = load_predictor(spec.models_dir)
    data = args.data or spec.data_dir
    pairs = predictor.meta.get("task") == "pairs"
    if data is None:
        raise ToolkitError("evaluate needs --data DIR (" + ("a folder of photos named by pair_rule)" if pairs
                                                            else "a folder of <class>/ image folders)"))
    if pairs:  # shoe pairs: pairs built from the folder's photos, scored per group and per kind
        from toolkit.pairs import evaluate_pairs, format_pairs_report

        metrics = evaluate_pairs(predictor, Path(data), spec, progress=not args.quiet)
    else:
        metrics = evaluate_folder(predictor, Path(data), tta=args.tta, group=spec.group, progress=not args.quiet)
    out = spec.models_dir / "evaluation"
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion(metrics, out / "confusion_matrix.png", title=f"{spec.name} on {Path(data).name}")
    if metrics.get("levels"):  # task = hierarchical: one confusion matrix per level
        from toolkit.hierarchy import plot_levels

        plot_levels(metrics, out, f"{spec.name} on {Path(data).name}")
    for bad in metrics["bad_files"]:
        print(f"skipped: {bad['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_pairs_report(metrics) if pairs else format_report(metrics))
        print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Label and probabilities per file; a bad file is one line on stderr, the rest still run."""
    from toolkit.model_io import load_predictor

    spec = _spec(args)
    predictor = load_predictor(spec.models_dir)
    if predictor.meta.get("task") == "pairs" or args.pair:
        return _predict_pair(args, spec, predictor)
    if not args.files:
        raise ToolkitError("predict needs image files: toolkit predict NAME FILE...")
    results, failed = [], 0
    for file in args.files:
        try:
            prediction = predictor.predict(Path(file), name=file)
        except ToolkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        row = {"file": file, "label": prediction.label, "probs": {k: round(v, 5) for k, v in prediction.probs.items()}}
        path = getattr(prediction, "path", None)  # task = hierarchical: (node, probability) per level
        if path:
            row["path"] = [{"node": node, "probability": round(p, 5)} for node, p in path]
        results.append(row)
        if not args.json:
            shown = " > ".join(f"{node} {p:.3f}" for node, p in path) if path else ""
            print(f"{file}\t{prediction.label}\t{prediction.probability:.3f}" + (f"\t{shown}" if shown else ""),
                  flush=True)
    if args.json:
        print(json.dumps(results))
    return 1 if failed else 0


def _predict_pair(args: argparse.Namespace, spec, predictor) -> int:
    if predictor.meta.get("task") != "pairs":
        raise ToolkitError(f"[{spec.name}] is a {predictor.meta.get('task', 'single')} classifier: "
                           f"use toolkit predict {spec.name} FILE... (--pair is for task = pairs)")
    if not args.pair or args.files:
        raise ToolkitError(f"[{spec.name}] compares two photos: toolkit predict {spec.name} --pair A B")
    a, b = args.pair
    prediction = predictor.predict_pair(Path(a), Path(b), names=(a, b))
    if args.json:
        print(json.dumps({"a": a, "b": b, **prediction.as_dict()}))
    else:
        print(f"{a}\t{b}\t{prediction.label}\tp(same)={prediction.probability:.3f}\t({prediction.approach})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Sanity check: can a fresh model overfit one small batch? PASS (exit 0) or FAIL (exit 1)."""
    from toolkit.check import check

    spec = _spec(args)
    if args.n < 2 or args.steps < 1:
        raise ToolkitError("check needs --n 2 or more and --steps 1 or more")
    results = check(spec, args.data, n=args.n, steps=args.steps, lr=args.lr, threshold=args.threshold,
                    labels=args.labels, approach=args.approach, progress=not args.quiet)
    for result in results:
        print(json.dumps(result.as_dict()) if args.json else result.line(), flush=True)
    return 0 if all(r.passed for r in results) else 1


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM of FILE as a PNG: the image and a heatmap overlay per model (per member of an ensemble)."""
    from toolkit.core.images import open_image
    from toolkit.explain import explanation_png
    from toolkit.model_io import load_predictor

    spec = _spec(args)
    predictor = load_predictor(spec.models_dir)
    img = open_image(args.file, name=str(args.file))
    out = args.out or spec.models_dir / "explanations" / f"{args.file.stem}.png"
    if out.suffix.lower() != ".png":
        raise ToolkitError(f"--out {out}: give a .png file name")
    explanation_png(predictor, img, out, target=args.target)
    prediction = predictor.predict(img)
    print(f"{args.file}\t{prediction.label}\t{prediction.probability:.3f}\twrote {out}")
    return 0


def cmd_apps(args: argparse.Namespace) -> int:
    """Write apps/NAME.ipynb for every classifier of settings.ini, and apps/index.ipynb."""
    from toolkit.ui.apps import write_apps

    for path in write_apps(_settings(args)):
        print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve every classifier's dashboard and the cleaning app with Voila (until Ctrl-C)."""
    from toolkit.ui.serve import serve_dashboards

    return serve_dashboards(_settings(args), args.host, args.port, token=not args.no_token, timeout=args.timeout,
                            allowed_hosts=args.allow_host or (), max_kernels=args.max_kernels)


def cmd_clean(args: argparse.Namespace) -> int:
    """Rank and clean a classifier's raw images: the Voila widget, --report [--json] or --apply."""
    spec = _spec(args)
    if args.report or args.apply or args.dry_run or args.undo or args.undo_all:
        from toolkit.stages.clean.decisions import DecisionLog, apply_decisions
        from toolkit.stages.clean.rank import list_raw_images

        log = DecisionLog(spec.cleaned_dir)
        if args.undo or args.undo_all:
            if args.undo_all:
                print(f"undid {log.undo_all()} decision(s)")
            else:
                undone = log.undo()
                print(f"undid {undone['action']} {undone['file']}" if undone else "nothing to undo")
        if args.report:
            from toolkit.stages.clean.rank import rank, write_report

            rankings = rank(spec, args.data, size=args.size, with_model=not args.no_model)
            written = write_report(rankings, spec.cleaned_dir)
            if args.json:
                print(json.dumps(rankings.summary()))
            else:
                summary = rankings.summary()
                print(f"{len(summary['label_issues'])} label issues, {len(summary['duplicates'])} duplicate groups, "
                      f"{len(summary['outliers'])} outliers, {len(rankings.broken)} broken; "
                      f"wrote {written['json']} and CSVs beside it")
        if args.apply or args.dry_run:
            result = apply_decisions(list_raw_images(spec, args.data), log, dry=args.dry_run)
            if args.json and not args.report:
                print(json.dumps(result))
            elif args.dry_run:
                print(f"apply would add {len(result['add'])}, remove {len(result['remove'])} and move "
                      f"{len(result['move'])} file(s)")
                for kind in ("add", "remove", "move"):
                    for item in result[kind]:
                        print(f"  {kind} {' -> '.join(item) if isinstance(item, list) else item}")
            else:
                print(f"applied: {result['kept']} images in {result['folder']} ({result['deleted']} deleted, "
                      f"{result['relabelled']} relabelled; {result['linked']} hard links, {result['copied']} copies)")
        return 0
    from toolkit.ui.serve import serve_cleaner

    return serve_cleaner(spec, args.settings, args.data, args.host, args.port, token=not args.no_token,
                         allowed_hosts=args.allow_host or ())


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-token", action="store_true", help="serve without a token (loopback only; any local "
                   "program can then use the pages)")
    p.add_argument("--allow-host", action="append", metavar="NAME", help="also accept this Host name "
                   "(repeatable; loopback and localhost always work)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--settings", type=Path, default=Path("settings.ini"),
                        help="the project's settings file (default ./settings.ini)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=handler.__doc__, description=handler.__doc__, **kwargs)
        p.set_defaults(handler=handler)
        return p

    p = add("backbones", cmd_backbones)
    p.add_argument("--json", action="store_true")

    p = add("scrape", cmd_scrape)
    p.add_argument("name")
    p.add_argument("--source", help="ddgs, folder:PATH, urls:FILE (class<TAB>url lines), fashion-mnist[:DIR] "
                   "(default: the section's source key; auto = fashion-mnist for [fashion-mnist], else ddgs)")
    p.add_argument("--classes", help="comma-separated classes to scrape (default: all of the section's)")
    p.add_argument("--per-class", type=int, help="accepted images per class (default: per_class)")
    p.add_argument("--add-class", help="add this class to the section's classes in settings.ini and scrape it")
    p.add_argument("--workers", type=int, default=32, help="downloads in flight at once (default 32)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.add_argument("--test-split", action="store_true",
                   help="also write the source's test images to scrape/NAME-test/")
    p.add_argument("--test-per-class", type=int, default=None)

    p = add("train", cmd_train)
    p.add_argument("name")
    p.add_argument("--data", type=Path, help="class folders, or train/ + valid/ class folders")
    p.add_argument("--arch")
    p.add_argument("--size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--freeze-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--bs", type=int)
    p.add_argument("--json", action="store_true")

    p = add("sweep", cmd_sweep)
    p.add_argument("name")
    p.add_argument("--grid", help='values to try, e.g. "lr=1e-3,3e-3 size=96,128 arch=resnet18,efficientnet_lite0"')
    p.add_argument("--best", action="store_true", help="write the best run's values into settings.ini")
    p.add_argument("--data", type=Path, help="class folders, or train/ + valid/ class folders")
    p.add_argument("--json", action="store_true", help="print every run's row as JSON, best first")

    p = add("evaluate", cmd_evaluate)
    p.add_argument("name")
    p.add_argument("--data", type=Path)
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--json", action="store_true")

    p = add("clean", cmd_clean)
    p.add_argument("name")
    p.add_argument("--data", type=Path, help="raw class folders (default: the data key, else scrape/NAME)")
    p.add_argument("--report", action="store_true", help="write the rankings as CSV and JSON, no UI")
    p.add_argument("--json", action="store_true", help="with --report: print one JSON object")
    p.add_argument("--apply", action="store_true", help="materialise cleaned_data/NAME from the decisions")
    p.add_argument("--dry-run", action="store_true", help="show what --apply would change")
    p.add_argument("--undo", action="store_true", help="undo the last decision")
    p.add_argument("--undo-all", action="store_true", help="undo every decision")
    p.add_argument("--size", type=int, default=128, help="embedding image size (default 128)")
    p.add_argument("--no-model", action="store_true", help="skip top losses even if models/NAME exists")
    p.add_argument("--port", type=int, default=8866)
    p.add_argument("--host", default="127.0.0.1")
    _serving_args(p)

    p = add("predict", cmd_predict)
    p.add_argument("name")
    p.add_argument("files", nargs="*")
    p.add_argument("--pair", nargs=2, metavar=("A", "B"), help="task = pairs: are these two photos one pair?")
    p.add_argument("--json", action="store_true")

    p = add("check", cmd_check)
    p.add_argument("name")
    p.add_argument("--data", type=Path)
    p.add_argument("--n", type=int, default=16, help="items in the batch (default 16)")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps (default 30)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--threshold", type=float, default=0.1, help="pass when the loss ends below this (default 0.1)")
    p.add_argument("--labels", choices=("real", "shuffled", "random"), default="real",
                   help="real; shuffled (one fixed permutation); random (new at every step: must fail)")
    p.add_argument("--approach", choices=("stacked", "siamese"), help="task = pairs: one approach only")
    p.add_argument("--json", action="store_true")

    p = add("explain", cmd_explain)
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p.add_argument("--target", help="the class to explain (default: the predicted class)")
    p.add_argument("--out", type=Path, help="the PNG to write (default models/NAME/explanations/FILE-STEM.png)")

    add("apps", cmd_apps)

    p = add("serve", cmd_serve)
    p.add_argument("--port", type=int, default=8866)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for Voila to start")
    p.add_argument("--max-kernels", type=int, default=8, help="dashboard kernels alive at once (default 8)")
    _serving_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    try:
        return args.handler(args)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
