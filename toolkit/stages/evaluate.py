"""`toolkit evaluate` and `toolkit predict`: a trained model on images it has not seen.

`evaluate(spec, data)` scores models/NAME on a folder (the task kind lists and labels it, and
computes its figures), writes models/NAME/evaluation/metrics.json and the plots, and returns the
metrics. `predict(spec, files)` runs the model on files (two per prediction for task = pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolkit.core import artifacts
from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.tasks import load_predictor, task_of_meta

EVALUATION_DIR = "evaluation"


def evaluate(spec: ClassifierSpec, data: Path | None = None, *, tta: bool = False, progress: bool = True) -> dict:
    """Score models/NAME on `data` (default: the section's `data` key); write evaluation/ beside it."""
    predictor = load_predictor(spec.models_dir)
    task = task_of_meta(predictor.meta, str(spec.models_dir / artifacts.META_FILE))
    folder = Path(data) if data else spec.data_dir
    if folder is None:
        raise ToolkitError(f"evaluate needs --data DIR ({task.data_hint})")
    if tta:
        task.require("tta", spec.name, "--tta")
    metrics = task.evaluate(predictor, folder, spec, tta=tta, progress=progress)
    out = spec.models_dir / EVALUATION_DIR
    out.mkdir(exist_ok=True)
    artifacts.write_metrics(out, metrics)
    task.plots(metrics, out, f"{spec.name} on {folder.name}")
    return metrics


def predict(spec: ClassifierSpec, files: Sequence[str], *,
            on_error: Callable[[str], None] = lambda line: None) -> tuple[list[dict[str, Any]], int]:
    """One row per prediction ({"file" or "files", label, probabilities, ...}) and the number of
    inputs that failed (each reported through `on_error` in one line; the rest still run)."""
    predictor = load_predictor(spec.models_dir)
    n = predictor.n_inputs
    if not files:
        raise ToolkitError(f"predict needs image files: toolkit predict {spec.name} FILE" + (" FILE" * (n - 1))
                           + "...")
    if len(files) % n:
        raise ToolkitError(f"[{spec.name}] compares two photos: toolkit predict {spec.name} --pair A B "
                           f"(or files in groups of {n}; got {len(files)})")
    rows, failed = [], 0
    for start in range(0, len(files), n):
        group = list(files[start : start + n])
        try:
            prediction = predictor.predict_sources([Path(f) for f in group], names=group)
        except ToolkitError as exc:
            on_error(str(exc))
            failed += 1
            continue
        where = {"file": group[0]} if n == 1 else dict(zip("ab", group))
        rows.append({**where, **prediction.as_dict(), "line": "\t".join([*group, prediction.line()])})
    return rows, failed
