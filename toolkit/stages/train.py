"""`toolkit train NAME`: the classifier's task kind trains it (the shared fastai recipe by default,
toolkit/tasks/base.py; each member for an ensemble) into models/NAME/ or `out`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from toolkit.core.config import ClassifierSpec
from toolkit.tasks import task_of


def train(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True,
          log: Callable[[str], None] = print, out: Path | None = None, callbacks: Sequence = ()) -> dict:
    """Train spec's classifier; write models/NAME/ (or `out`) and return its metrics (also in
    metrics.json). `callbacks` are extra fastai callbacks for the fit (e.g. TensorBoard in sweeps)."""
    return task_of(spec).train(spec, data, out=out, progress=progress, log=log, callbacks=callbacks)
