"""Hyperparameter sweeps: `toolkit sweep NAME --grid "lr=1e-3,3e-3 size=96,128"` and `--best`.

Every combination of the grid trains like `toolkit train` (the classifier's settings with the
combination's values) into models/NAME/sweep/<combo>/, with fastai's TensorBoardCallback logging
per-batch and per-epoch scalars and `SummaryWriter.add_hparams` logging the combination and its
final metrics into models/NAME/sweep/<combo>/tensorboard/ (`tensorboard --logdir
models/NAME/sweep`, HPARAMS tab). Each finished run becomes a row of models/NAME/sweep/sweep.csv
(a rerun of a combination replaces its row); sweep.md (table, best first) and sweep.png (plot)
are rewritten from the CSV after each run. `--best` writes the winning values into the
classifier's section of settings.ini (`settings.set_keys`, comments kept).
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from toolkit.core.config import TRAINING_KEYS, ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.settings import keys, set_keys
from toolkit.stages.train import train
from toolkit.tasks import task_of

# keys that change how a model trains; the others (scraping, titles, the validation split) would
# make the runs incomparable or do nothing
SWEEP_KEYS = TRAINING_KEYS
CSV_NAME, TABLE_NAME, PLOT_NAME = "sweep.csv", "sweep.md", "sweep.png"


def parse_grid(grid: str) -> dict[str, list[tuple[str, Any]]]:
    """'lr=1e-3,3e-3 size=96' -> {key: [(as written, parsed), ...]}, each value through its key's parser."""
    known = keys()
    parsed: dict[str, list[tuple[str, Any]]] = {}
    for item in grid.split():
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ToolkitError(f"--grid item {item!r}: write KEY=VALUE,VALUE (e.g. lr=1e-3,3e-3 size=96,128)")
        if key not in SWEEP_KEYS:
            what = "a settings key" if key in known else "not a settings key"
            raise ToolkitError(f"--grid key {key!r} is {what} a sweep can vary; use: {', '.join(SWEEP_KEYS)}")
        if key in parsed:
            raise ToolkitError(f"--grid key {key!r} is given twice; list its values once: {key}=A,B")
        raws = [v.strip() for v in values.split(",") if v.strip()]
        if not raws:
            raise ToolkitError(f"--grid {key}=: give at least one value")
        parsed[key] = []
        for raw in raws:
            try:
                parsed[key].append((raw, known[key].parse(raw)))
            except ValueError as exc:
                raise ToolkitError(f"--grid {key}={raw}: {exc}") from None
    if not parsed:
        raise ToolkitError('--grid is empty: e.g. --grid "lr=1e-3,3e-3 size=96,128"')
    return parsed


def combinations(grid: dict[str, list[tuple[str, Any]]]) -> list[dict[str, tuple[str, Any]]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def combo_name(combo: dict[str, tuple[str, Any]]) -> str:
    """{'lr': ('1e-3', 0.001), 'size': ('96', 96)} -> 'lr=1e-3_size=96' (a folder and run name)."""
    return "_".join(f"{key}={raw}" for key, (raw, _) in combo.items())


def _hparam(value: Any) -> Any:
    return "auto" if value is None else value


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def record(folder: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Add (or replace, by combo) one row of sweep.csv; rewrite sweep.md and sweep.png; all rows."""
    rows = [r for r in read_rows(folder / CSV_NAME) if r.get("combo") != row["combo"]] + [row]
    _write_rows(folder / CSV_NAME, rows)
    write_table(rows, folder / TABLE_NAME)
    plot_sweep(rows, folder / PLOT_NAME)
    return rows


def _score(row: dict[str, Any]) -> float:
    try:
        return float(row.get("accuracy", ""))
    except ValueError:
        return -1.0


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=_score, reverse=True)


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return ["accuracy", *[c for c in columns if c.endswith("_accuracy")], "valid_loss", "lr_used", "fit_seconds"]


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """sweep.md: one line per run, best accuracy first."""
    params = list(dict.fromkeys(k for row in rows for k in str(row.get("params", "")).split() if k))
    keys = list(dict.fromkeys(p.split("=", 1)[0] for p in params))
    metrics = _metric_columns(rows)
    head = ["rank", *keys, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in enumerate(ranked(rows), 1):
        cells = [str(rank), *[str(row.get(k, "")) for k in keys], *[str(row.get(m, "")) for m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    """sweep.png: validation accuracy (and accuracy per level) of every run, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = ranked(rows)[::-1]
    levels = [c for c in _metric_columns(rows) if c.endswith("_accuracy")]
    series = levels or ["accuracy"]  # hierarchical: the deepest level's accuracy is `accuracy`
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(order) * max(1, len(series) / 2)))
    height = 0.8 / len(series)
    y = np.arange(len(order))
    for i, column in enumerate(series):
        values = [float(r.get(column) or 0) for r in order]
        bars = ax.barh(y + i * height, values, height=height, label=column)
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=7, padding=2)
    ax.set_yticks(y + height * (len(series) - 1) / 2, [r["combo"] for r in order], fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("validation accuracy")
    ax.set_title("Sweep: validation accuracy per combination")
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(spec: ClassifierSpec, grid: str | dict, data: Path | None = None, *, progress: bool = True,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every combination of `grid` (see `parse_grid`); returns every row of sweep.csv."""
    from fastai.callback.tensorboard import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter

    task_of(spec).require("sweep", spec.name)
    grid = parse_grid(grid) if isinstance(grid, str) else grid
    folder = spec.models_dir / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    combos = combinations(grid)
    rows: list[dict[str, Any]] = []
    for i, combo in enumerate(combos, 1):
        name = combo_name(combo)
        log(f"sweep {i}/{len(combos)}: {name}")
        run_spec = replace(spec, **{key: value for key, (_, value) in combo.items()})  # lr=auto is None
        out = folder / name
        board = out / "tensorboard"
        callback = TensorBoardCallback(log_dir=str(board), trace_model=False, log_preds=False)
        metrics = train(run_spec, data, progress=progress, log=lambda line: log(f"  {line}"), out=out,
                        callbacks=[callback])
        history = metrics.get("history") or [[]]
        valid_loss = float(history[-1][1]) if len(history[-1]) > 1 else float("nan")
        final = {"accuracy": metrics["accuracy"], "valid_loss": round(valid_loss, 4),
                 **{f"{level}_accuracy": m["accuracy"] for level, m in metrics.get("levels", {}).items()}}
        with SummaryWriter(log_dir=str(board)) as writer:
            writer.add_hparams({key: _hparam(value) for key, (_, value) in combo.items()},
                               {f"hparam/{k}": v for k, v in final.items()}, run_name=".")
        row = {"combo": name, "params": " ".join(f"{k}={raw}" for k, (raw, _) in combo.items()),
               **{key: raw for key, (raw, _) in combo.items()}, **final,
               "lr_used": f"{metrics['lr']:.3g}" if metrics.get("lr") else "",
               "fit_seconds": metrics.get("fit_seconds", metrics.get("wall_seconds", "")),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rows = record(folder, row)
        log(f"  -> accuracy {metrics['accuracy']:.2%}")
    log(f"wrote {folder / CSV_NAME}, {folder / TABLE_NAME}, {folder / PLOT_NAME} "
        f"(tensorboard --logdir {folder})")
    return rows


def best(spec: ClassifierSpec) -> dict[str, Any]:
    """The best row of models/NAME/sweep/sweep.csv (highest validation accuracy)."""
    path = spec.models_dir / "sweep" / CSV_NAME
    rows = read_rows(path)
    if not rows:
        raise ToolkitError(f"no sweep results in {path}: run `toolkit sweep {spec.name} --grid ...` first")
    return ranked(rows)[0]


def apply_best(settings_path: Path, spec: ClassifierSpec) -> dict[str, str]:
    """Write the best run's values into [NAME] of settings.ini (comments kept); returns them."""
    winner = best(spec)
    values = dict(item.split("=", 1) for item in winner["params"].split())
    set_keys(settings_path, spec.name, values)
    return values
