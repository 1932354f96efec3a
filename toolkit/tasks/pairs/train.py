"""task = pairs, training: each approach is a fastai Learner over the registry's pretrained body,
trained with the shared `make_learner` / `fit_learner` (lr_find, fine_tune, best epoch, CSV log);
with approach = both, the better one on held-out people is copied up for serving.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from toolkit.core import artifacts
from toolkit.core.artifacts import META_FILE, WEIGHTS_FILE
from toolkit.core.backbones import body_head_split, get_backbone, head_taps
from toolkit.core.config import ClassifierSpec
from toolkit.core.metrics import plot_confusion, plot_losses, plot_top_losses
from toolkit.learn import fit_learner, make_learner
from toolkit.tasks.pairs.data import APPROACHES, LABELS, PairData, load_pair_data
from toolkit.tasks.pairs.model import create_pair_model, decode_pairs, pair_dataloaders, siamese_split, stack_pair
from toolkit.tasks.pairs.predictor import PairPredictor, score_pairs

# ---------------------------------------------------------------- training


def _summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "n", "groups", "kinds", "kinds_by_group", "learner_accuracy",
                                    "fit_seconds",
                                    "wall_seconds", "lr") if k in metrics}


def train_approach(spec: ClassifierSpec, approach: str, pair_data: PairData, out: Path,
                   arrays: dict[Path, np.ndarray] | None = None, *, progress: bool = True,
                   log: Callable[[str], None] = print, callbacks: Sequence = ()) -> dict:
    """Train one approach into `out`: lr_find, fine_tune, pickle-free export, plots, metrics.json.
    `arrays` are the photos decoded at spec.size (decoded here when not given)."""
    from fastai.torch_core import set_seed


    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    backbone = get_backbone(spec.arch)
    set_seed(spec.seed)
    pairs = pair_data.train + pair_data.valid
    is_valid = [False] * len(pair_data.train) + [True] * len(pair_data.valid)
    arrays = arrays if arrays is not None else decode_pairs(pairs, spec.size, progress=progress)
    dls = pair_dataloaders(pairs, is_valid, approach, spec.size, spec.bs, backbone.mean, backbone.std,
                           arrays=arrays, seed=spec.seed, progress=progress)
    taps = head_taps(spec.arch, spec.head_features)
    model = create_pair_model(approach, spec.arch, spec.pretrained, taps)
    splitter = siamese_split if approach == "siamese" else body_head_split
    learn = make_learner(dls, model, out, splitter=splitter, pretrained=spec.pretrained, progress=progress)
    log(f"{approach}: training on {len(pair_data.train)} pairs, validating on {len(pair_data.valid)}")
    fitted = fit_learner(learn, spec, out, log, progress=progress, callbacks=callbacks, started=started)
    meta = {"task": "pairs", "approach": approach, "name": spec.name, "title": spec.display_title,
            "description": spec.description, "arch": spec.arch, "taps": list(taps), "pretrained": spec.pretrained,
            "classes": LABELS,
            "size": spec.size, "mean": list(backbone.mean), "std": list(backbone.std),
            "pair_rule": spec.pair_rule, "symmetric": approach == "stacked",
            "data": {"dir": str(pair_data.root), **pair_data.summary()}}
    artifacts.write_model(out, learn.model, meta, "pairs")
    # The figures come from the exported model through the serving path (symmetric for stacked).
    predictor = PairPredictor(out, device="cpu")
    metrics = score_pairs(predictor, pair_data.valid, arrays)
    values = learn.recorder.values
    metrics.update({
        "name": spec.name, "approach": approach, "arch": spec.arch, "size": spec.size, "epochs": spec.epochs,
        "epochs_run": fitted["epochs_run"], "freeze_epochs": spec.freeze_epochs,
        "top_epochs_run": fitted["top_epochs_run"], "bs": spec.bs, "lr": fitted["lr"],
        "lr_mult": spec.lr_mult,
        "lr_find": fitted["lr_find"], "n_train": len(pair_data.train), "n_valid": len(pair_data.valid),
        "learner_accuracy": round(float(max(v[2] for v in values)), 4) if values else None,
        "data": str(pair_data.root), **pair_data.summary(), "bad_files": len(pair_data.bad),
        "fit_seconds": round(fitted["fit_seconds"], 1), "wall_seconds": round(time.time() - started, 1),
        "history": [list(map(float, v)) for v in values],
    })
    artifacts.write_metrics(out, metrics)
    plot_confusion(metrics, out / "confusion_matrix.png", title=f"{spec.name} {approach} validation pairs")
    plot_losses(fitted["history"], out / "losses.png")
    valid = pair_data.valid
    probs = predictor.predict_arrays([arrays[p.a] for p in valid], [arrays[p.b] for p in valid])
    plot_top_losses([stack_pair(arrays[p.a], arrays[p.b], spec.size) for p in valid],
                    [p.label for p in valid], probs, LABELS, out / "top_losses.png")
    log(f"{approach}: valid accuracy {metrics['accuracy']:.2%} on {metrics['n']} pairs; groups "
        + ", ".join(f"{g} {r['accuracy']:.1%}" for g, r in metrics["groups"].items()) + "; kinds "
        + ", ".join(f"{k} {r['accuracy']:.1%}" for k, r in metrics["kinds"].items()))
    return metrics


CHOSEN_FILES = (WEIGHTS_FILE, META_FILE, "lr_find.png", "losses.png", "confusion_matrix.png", "top_losses.png",
                "history.csv")


def train_pairs(spec: ClassifierSpec, data: Path | None = None, *, out: Path | None = None, progress: bool = True,
                log: Callable[[str], None] = print, callbacks: Sequence = ()) -> dict:
    """Train `spec.approach` (or both, each into models/NAME/<approach>/, the better one copied to
    models/NAME/ for serving); returns the served model's metrics (also in models/NAME/metrics.json)."""
    started = time.time()
    pair_data = load_pair_data(spec, data, progress=progress)
    summary = pair_data.summary()
    log(f"data: {pair_data.root} - {summary['photos']} photos of {summary['people']} people; "
        f"{summary['train_pairs']} train pairs, {summary['valid_pairs']} valid pairs "
        f"({summary['valid_people']} people held out)")
    if pair_data.bad:
        log(f"warning: left out {len(pair_data.bad)} unreadable file(s); first: {pair_data.bad[0].reason}")
    out = Path(out) if out is not None else spec.models_dir
    out.mkdir(parents=True, exist_ok=True)
    arrays = decode_pairs(pair_data.train + pair_data.valid, spec.size, progress=progress)
    if spec.approach != "both":
        return train_approach(spec, spec.approach, pair_data, out, arrays, progress=progress, log=log,
                              callbacks=callbacks)
    results = {a: train_approach(spec, a, pair_data, out / a, arrays, progress=progress, log=log,
                                 callbacks=callbacks)
               for a in APPROACHES}
    # The better validation accuracy wins; ties go to the siamese model (order-free, one pass).
    chosen = max(APPROACHES, key=lambda a: (results[a]["accuracy"], a == "siamese"))
    for name in CHOSEN_FILES:
        if (out / chosen / name).is_file():
            shutil.copy2(out / chosen / name, out / name)
    metrics = dict(results[chosen])
    metrics.update({"chosen": chosen, "approaches": {a: _summary(r) for a, r in results.items()},
                    "wall_seconds": round(time.time() - started, 1)})
    artifacts.write_metrics(out, metrics)
    log(f"chosen: {chosen} (" + ", ".join(f"{a} {r['accuracy']:.2%}" for a, r in results.items())
        + f"); wrote {out}")
    return metrics

