"""Ensembles: members that differ in image size and/or backbone, each trained like any classifier,
combined by averaging probabilities (`mean`) or per class by validation recall (`class_weighted`).

    models/NAME/members/<member>/  a complete model folder per member (model.safetensors, model.json,
                                   metrics.json, plots), trained by `train.train` on the same split
    models/NAME/model.json         {"format_version", "task": "single", "classes", "size", ...,
                                    "ensemble": {"mode", "members": [{"name", "folder", "arch", "size"}],
                                                 "weights": {member: {class: weight}}, "weights_from"}}
    models/NAME/metrics.json       validation figures of the ensemble (its mode), of both modes and of
                                   every member (`members`: {member: metrics})

class_weighted: member m's weight for class c is its recall on c (validation accuracy on the images
of class c) divided by the sum over members of their recall on c. The ensemble's probability of c
is the weighted sum of the members' probabilities of c (rows renormalised to sum to 1).

Honesty: weights fitted on the validation images would inflate a figure reported on those same
images, so the class_weighted validation figures in metrics.json are 2-fold cross-fitted (weights
from one stratified half of validation score the other half, and back). The weights saved for
prediction are fitted on all of validation; `toolkit evaluate --data DIR` scores them honestly as
long as DIR holds images other than the training data's validation split.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.core.images import ImageSource, open_image
from toolkit.evaluate import confusion, metrics_from_probs, plot_confusion, predict_files
from toolkit.model_io import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, Prediction, Predictor, read_meta, versions
from toolkit.settings import ClassifierSpec

MEMBERS_DIR = "members"
CROSS_FIT_FOLDS = 2


def member_name(overrides: Mapping[str, Any]) -> str:
    """{'size': 100, 'arch': 'resnet34', 'pretrained': False} -> 'size100-resnet34-pretrainedno'."""

    def text(value: Any) -> str:
        return ("yes" if value else "no") if isinstance(value, bool) else str(value)

    parts = [text(value) if key == "arch" else f"{key}{text(value)}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(parts)) or "member"


def member_specs(spec: ClassifierSpec) -> list[tuple[str, ClassifierSpec]]:
    """(name, spec) per member: the section's settings with the member's overrides, no ensemble."""
    if not spec.ensemble:
        raise ToolkitError(f"[{spec.name}] has no ensemble key (e.g. ensemble = size=75 | size=100)")
    members = []
    for overrides in spec.ensemble:
        name = member_name(overrides)
        if name in (n for n, _ in members):
            raise ToolkitError(f"settings [{spec.name}] ensemble: two members are both named {name!r}")
        members.append((name, replace(spec, ensemble=[], **overrides)))
    return members


def class_weights(confusions: Sequence[np.ndarray]) -> np.ndarray:
    """(members, classes) weights from each member's validation confusion matrix (rows: actual):
    recall of member m on class c over the members' summed recall on c; equal where all are 0."""
    matrices = np.asarray(confusions, dtype=float)
    support = matrices.sum(axis=2)
    diagonal = np.diagonal(matrices, axis1=1, axis2=2)
    recall = np.divide(diagonal, support, out=np.zeros_like(diagonal), where=support > 0)
    total = recall.sum(axis=0, keepdims=True)
    equal = np.full_like(recall, 1 / len(matrices))
    return np.divide(recall, total, out=equal, where=total > 0)


def combine(member_probs: Sequence[np.ndarray], mode: str, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, classes) ensemble probabilities from each member's (N, classes) probabilities."""
    stack = np.asarray(member_probs, dtype=np.float64)
    if mode == "mean":
        return stack.mean(axis=0)
    if mode != "class_weighted":
        raise ValueError(f"unknown ensemble mode {mode!r}")
    if weights is None or weights.shape != (stack.shape[0], stack.shape[2]):
        raise ValueError("class_weighted needs (members, classes) weights")
    weighted = (stack * weights[:, None, :]).sum(axis=0)
    return weighted / np.clip(weighted.sum(axis=1, keepdims=True), 1e-12, None)


def fold_of(true_idx: np.ndarray, folds: int = CROSS_FIT_FOLDS, seed: int = 42) -> np.ndarray:
    """A stratified fold number (0..folds-1) per image: each class is dealt round-robin, shuffled."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(true_idx), dtype=int)
    for c in np.unique(true_idx):
        index = np.flatnonzero(true_idx == c)
        rng.shuffle(index)
        fold[index] = np.arange(len(index)) % folds
    return fold


def cross_fitted(member_probs: Sequence[np.ndarray], true_idx: np.ndarray, n_classes: int,
                 folds: int = CROSS_FIT_FOLDS, seed: int = 42) -> np.ndarray:
    """class_weighted probabilities where every image is combined with weights fitted on the other
    folds only, so a figure computed from them is not inflated by fitting on the scored images."""
    stack = np.asarray(member_probs)
    fold = fold_of(true_idx, folds, seed)
    out = np.zeros(stack.shape[1:], dtype=np.float64)
    for k in range(folds):
        fit, score = fold != k, fold == k
        if not score.any():
            continue
        weights = class_weights([confusion(true_idx[fit], p[fit].argmax(axis=1), n_classes) for p in stack])
        out[score] = combine(stack[:, score], "class_weighted", weights)
    return out


class EnsemblePredictor:
    """Loads models/NAME (an ensemble) and its members; the same interface as `Predictor`
    (classes, size, meta, predict, predict_images) plus `members`, `mode`, `combine`."""

    def __init__(self, folder: str | Path, device: str | None = None, optimize: bool = False):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        spec = self.meta.get("ensemble") or {}
        try:
            entries = spec["members"]
            self.mode: str = spec["mode"]
            self.members: dict[str, Predictor] = {
                m["name"]: Predictor(self.folder / m["folder"], device=device, optimize=optimize) for m in entries}
        except (KeyError, TypeError) as exc:
            raise ToolkitError(f"{self.folder / META_FILE}: the ensemble block lacks {exc}; retrain") from None
        self.classes: list[str] = list(self.meta["classes"])
        for name, member in self.members.items():
            if member.classes != self.classes:
                raise ToolkitError(f"ensemble member {name} has classes {member.classes}, not {self.classes}; "
                                   f"retrain {self.folder.name}")
        self.size = max(member.size for member in self.members.values())
        self.weights = np.array([[spec.get("weights", {}).get(name, {}).get(c, 1 / len(self.members))
                                  for c in self.classes] for name in self.members])

    def combine(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each member's (N, classes) probabilities -> the ensemble's, by this ensemble's mode."""
        return combine([member_probs[name] for name in self.members], self.mode, self.weights)

    def predict_members(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> dict[str, np.ndarray]:
        return {name: member.predict_images(images, bs=bs, tta=tta) for name, member in self.members.items()}

    def predict_images(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> np.ndarray:
        return self.combine(self.predict_members(images, bs=bs, tta=tta)).astype(np.float32)

    def predict(self, src: ImageSource | Image.Image, name: str | None = None) -> Prediction:
        """One image (path, bytes, file object or PIL image) -> the ensemble's label and probabilities."""
        img = src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size)
        probs = self.predict_images([img.convert("RGB")])[0]
        return Prediction(self.classes[int(probs.argmax())], dict(zip(self.classes, probs.tolist(), strict=True)))


def write_ensemble_meta(spec: ClassifierSpec, folder: Path, classes: list[str], members: dict[str, Predictor],
                        weights: np.ndarray, data: dict[str, Any]) -> Path:
    """models/NAME/model.json of an ensemble of the trained `members` (in models/NAME/members/)."""
    meta = {"format_version": FORMAT_VERSION, "task": "single", "name": spec.name, "title": spec.display_title,
            "description": spec.description, "classes": classes, "size": max(m.size for m in members.values()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
            "group": spec.group, "data": data,
            "ensemble": {
                "mode": spec.ensemble_mode,
                "members": [{"name": name, "folder": f"{MEMBERS_DIR}/{name}", "arch": m.meta["arch"],
                             "size": m.size} for name, m in members.items()],
                "weights": {name: {c: round(float(w), 6) for c, w in zip(classes, row)}
                            for name, row in zip(members, weights)},
                "weights_from": "validation recall per class, all validation images"}}
    for stale in (WEIGHTS_FILE, "export.pkl"):  # a single model trained here before
        (folder / stale).unlink(missing_ok=True)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder / META_FILE


def train_ensemble(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Train every member into models/NAME/members/<member>/ on the same split, then write the
    ensemble's model.json and metrics.json; returns the ensemble's validation metrics."""
    from toolkit.data import load_dataset
    from toolkit.train import data_fingerprint, train

    folder = spec.models_dir
    members = member_specs(spec)
    dataset = load_dataset(spec, data, progress=progress)
    fingerprint = data_fingerprint(dataset)
    for index, (name, member) in enumerate(members, 1):
        log(f"member {index}/{len(members)} {name}: {member.arch}, {member.size} px, "
            f"{member.freeze_epochs}+{member.epochs} epochs")
        metrics = train(member, data, progress=progress, log=lambda line, n=name: log(f"  [{n}] {line}"),
                        out=folder / MEMBERS_DIR / name)
        if metrics["data_fingerprint"] != fingerprint:  # members must share one split
            raise ToolkitError(f"ensemble member {name} trained on other data than {spec.name}; "
                               "were the data changed while training?")
    predictors = {name: Predictor(folder / MEMBERS_DIR / name, device="cpu") for name, _ in members}
    files, labels = dataset.subset(valid=True)
    classes = dataset.classes
    true_idx = np.array([classes.index(y) for y in labels], dtype=int)
    probs = {name: predict_files(p, files, progress=progress) for name, p in predictors.items()}
    stack = list(probs.values())
    member_metrics = {name: metrics_from_probs(p, labels, classes, files, spec.group) for name, p in probs.items()}
    weights = class_weights([np.array(m["confusion"]) for m in member_metrics.values()])
    modes = {"mean": metrics_from_probs(combine(stack, "mean"), labels, classes, files, spec.group),
             "class_weighted": metrics_from_probs(cross_fitted(stack, true_idx, len(classes), seed=spec.seed),
                                                  labels, classes, files, spec.group)}
    data_info = {"dir": str(dataset.root), "fingerprint": fingerprint, "n_train": dataset.n_train,
                 "n_valid": dataset.n_valid}
    write_ensemble_meta(spec, folder, classes, predictors, weights, data_info)
    result = dict(modes[spec.ensemble_mode])
    result.update({
        "name": spec.name, "ensemble_mode": spec.ensemble_mode, "members": member_metrics,
        "modes": {mode: {"accuracy": m["accuracy"], "per_class": m["per_class"]} for mode, m in modes.items()},
        "class_weighted_scoring": f"{CROSS_FIT_FOLDS}-fold cross-fitted on validation (weights never fitted "
                                  "on the images they score)",
        "weights": {name: dict(zip(classes, map(float, row))) for name, row in zip(predictors, weights)},
        "n_train": dataset.n_train, "n_valid": dataset.n_valid, "data": str(dataset.root),
        "data_fingerprint": fingerprint,
    })
    (folder / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_confusion(result, folder / "confusion_matrix.png", title=f"{spec.name} ensemble ({spec.ensemble_mode})")
    summary = ", ".join(f"{name} {m['accuracy']:.2%}" for name, m in member_metrics.items())
    log(f"valid accuracy: members {summary}; ensemble mean {modes['mean']['accuracy']:.2%}, class_weighted "
        f"{modes['class_weighted']['accuracy']:.2%} (cross-fitted); wrote {folder}")
    return result
