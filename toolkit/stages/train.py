"""`toolkit train NAME`: the classifier's task kind trains it (the shared fastai recipe by default,
toolkit/tasks/base.py; each member for an ensemble) into models/NAME/ or `out`.

`retrain_head` is the fast retrain after a cleaning pass (`toolkit train NAME --head-only`, and the
cleaning app's retrain button): the trained model's body stays as it is, its pooled features come
from the on-disk cache (toolkit/feature_cache.py: only images it has not seen run through the body),
and a fresh head is fitted on them in seconds. The new model replaces the old one in models/NAME/
atomically (weights, then model.json, then metrics.json with `previous_accuracy`), so a dashboard
picks it up on its next kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from toolkit.core.config import ClassifierSpec
from toolkit.tasks import task_of

FEATURES_DIR = "features"
_NOT_META = ("format_version", "task", "resize", "created", "versions")


def train(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True,
          log: Callable[[str], None] = print, out: Path | None = None, callbacks: Sequence = ()) -> dict:
    """Train spec's classifier; write models/NAME/ (or `out`) and return its metrics (also in
    metrics.json). `callbacks` are extra fastai callbacks for the fit (e.g. TensorBoard in sweeps)."""
    return task_of(spec).train(spec, data, out=out, progress=progress, log=log, callbacks=callbacks)


def retrain_head(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print, out: Path | None = None, epochs: int | None = None) -> dict:
    """Retrain only the head of the model in models/NAME/ (or `out`) on the current data (the
    cleaned data set by default) and replace the model there; returns the new metrics, with
    `previous_accuracy`, `features_computed` (images run through the body this time) and
    `features_reused`. `epochs` defaults to freeze_epochs + epochs. A kind without a body + head
    refuses in one line (Task FEATURES "head_only"); so does a folder without a trained model.

    The cleaning app's button calls this with the classifier's spec (progress=False, log=its
    status line) and shows `metrics["accuracy"]` beside `metrics["previous_accuracy"]`."""
    import numpy as np
    import torch
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed

    from toolkit.core import artifacts
    from toolkit.core.backbones import create_model, has_fastai_head, model_taps
    from toolkit.core.errors import ToolkitError
    from toolkit.core.images import sha256_file
    from toolkit.feature_cache import FeatureCache, body_digest
    from toolkit.learn import data_fingerprint, find_lr, head_learner, image_features

    started = time.time()
    task = task_of(spec)
    task.require("head_only", spec.name)
    folder = Path(out) if out is not None else spec.models_dir
    old_meta = artifacts.read_meta(folder)
    old_metrics = artifacts.read_json(folder / artifacts.METRICS_FILE)
    arch, size, mean, std = old_meta["arch"], old_meta["size"], old_meta["mean"], old_meta["std"]
    taps = model_taps(old_meta)
    old = artifacts.load_weights(create_model(arch, len(old_meta["classes"]), pretrained=False, taps=taps), folder)
    if not has_fastai_head(old):
        raise ToolkitError(f"{folder}: the model has no body + fastai head to retrain; run `toolkit train {spec.name}`")
    dataset = task.load_data(spec, data, progress=progress)
    classes = dataset.classes
    log(f"data: {dataset.root} - {dataset.n_train} train, {dataset.n_valid} valid; head only, "
        f"the body of {folder / artifacts.WEIGHTS_FILE} ({arch}, {size} px)")
    set_seed(spec.seed)
    if classes == old_meta["classes"]:  # the trained head goes on learning from the cleaned data
        model, start = old, "the trained head"
    else:  # classes added or removed: a fresh head on the trained body
        model = create_model(arch, len(classes), pretrained=False, taps=taps)
        start = "a fresh head (the classes changed)"
        model[0].load_state_dict(old[0].state_dict())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    body = model[0].to(device)
    cache = FeatureCache(folder / FEATURES_DIR, {"arch": arch, "size": size, "mean": list(mean), "std": list(std),
                                                 "resize": "squish", "body": body_digest(body), "taps": list(taps)})
    shas = [sha256_file(f) for f in dataset.files]
    missing = cache.missing(shas)
    first_file = dict(zip(reversed(shas), reversed(dataset.files)))
    if missing:
        plain, flip = image_features(body, model[1][:2], [first_file[s] for s in missing], size, mean, std,
                                     bs=max(spec.bs, 32), progress=progress)
        cache.add(missing, plain, flip)
    log(f"body features: {len(missing)} computed, {len(set(shas)) - len(missing)} reused from {cache.folder}; "
        f"training {start}")
    index = {c: i for i, c in enumerate(classes)}
    train_shas = [s for s, v in zip(shas, dataset.is_valid) if not v]
    valid_shas = [s for s, v in zip(shas, dataset.is_valid) if v]
    y_train = np.array([index[y] for y, v in zip(dataset.labels, dataset.is_valid) if not v])
    y_valid = np.array([index[y] for y, v in zip(dataset.labels, dataset.is_valid) if v])
    x_train = np.concatenate([cache.get(train_shas, "plain"), cache.get(train_shas, "flip")])
    learn = head_learner(model[1], x_train, np.concatenate([y_train, y_train]), cache.get(valid_shas, "plain"),
                         y_valid, spec.bs, folder, CrossEntropyLossFlat(), progress=progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head's small matrices: threads only add waiting on a busy machine
    try:
        found = find_lr(learn, spec.lr_find_iters, folder / "lr_find.png") if spec.lr is None else {}
        lr = spec.lr if spec.lr is not None else found["valley"]
        n_epochs = epochs if epochs is not None else max(1, spec.freeze_epochs + spec.epochs)
        fit_started = time.time()
        learn.fit_one_cycle(n_epochs, lr)
        fit_seconds = time.time() - fit_started
        probs = learn.get_preds(ds_idx=1)[0].numpy()
    finally:
        torch.set_num_threads(threads)
    valid_files, valid_labels = dataset.subset(valid=True)
    metrics = task.metrics(probs, valid_labels, classes, valid_files, spec.group)
    fingerprint = data_fingerprint(dataset)
    meta = {k: v for k, v in old_meta.items() if k not in _NOT_META}
    meta.update({"classes": classes, "name": spec.name,
                 "data": {"dir": str(dataset.root), "fingerprint": fingerprint, "n_train": dataset.n_train,
                          "n_valid": dataset.n_valid},
                 "head_only": {"body_from": old_meta.get("created"), "previous_accuracy": old_metrics.get("accuracy")}})
    artifacts.write_model(folder, model.cpu(), meta, old_meta.get("task", task.name))
    (folder / "export.pkl").unlink(missing_ok=True)  # fastai's export would describe the old head
    task.plots(metrics, folder, f"{spec.name} validation (head retrained)")
    metrics.update({
        "name": spec.name, "task": task.name, "arch": arch, "size": size, "head_only": True,
        "previous_accuracy": old_metrics.get("accuracy"), "previous_n": old_metrics.get("n"),
        "previous_data_fingerprint": old_metrics.get("data_fingerprint"), "epochs": n_epochs, "bs": spec.bs,
        "lr": lr, "lr_find": found, "n_train": dataset.n_train, "n_valid": dataset.n_valid,
        "bad_files": len(dataset.bad), "warnings": dataset.warnings, "data": str(dataset.root),
        "data_fingerprint": fingerprint, "features_computed": len(missing),
        "features_reused": len(set(shas)) - len(missing), "fit_seconds": round(fit_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        "history": [list(map(float, v)) for v in learn.recorder.values],
    })
    artifacts.write_metrics(folder, metrics)
    previous = old_metrics.get("accuracy")
    log(f"valid accuracy {metrics['accuracy']:.2%} on {metrics['n']} images"
        + (f" (before: {previous:.2%})" if isinstance(previous, (int, float)) else "")
        + f"; head retrained in {metrics['wall_seconds']} s; wrote {folder}")
    return metrics
