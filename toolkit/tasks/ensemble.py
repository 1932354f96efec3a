"""Ensembles: members that differ in image size and/or backbone, each trained like any classifier,
combined by averaging probabilities (`mean`), per class by validation recall (`class_weighted`), or
(`auto`, the default) by whichever of those, log-loss-optimal member weights or the best member
alone wins out of fold on validation (`choose_combination`): an auto ensemble never loses to its
best member on cross-fitted validation figures, and metrics.json's `combination` says why.

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

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.core import artifacts
from toolkit.core.artifacts import META_FILE, WEIGHTS_FILE, read_meta
from toolkit.core.config import GENERIC_KEYS, MEMBER_KEYS, ClassifierSpec, Key, choice
from toolkit.core.errors import ToolkitError
from toolkit.core.images import ImageSource, open_image
from toolkit.core.metrics import confusion
from toolkit.learn import data_fingerprint
from toolkit.predict import ImagePredictor, Prediction
from toolkit.tasks.base import Task
from toolkit.tasks.registry import register_wrapper

MEMBERS_DIR = "members"
CROSS_FIT_FOLDS = 2
ENSEMBLE_MODES = ("auto", "mean", "class_weighted")
CHOICE_FOLDS = 5
LOSS_MARGIN = 0.02  # at equal out-of-fold accuracy, a combination must cut the log loss by 2% to be chosen

def parse_ensemble(value: str) -> list[dict[str, Any]]:
    """'size=75 | size=100 arch=resnet34' -> [{'size': 75}, {'size': 100, 'arch': 'resnet34'}]:
    members ('|' or one per line), each a set of KEY=VALUE overrides of the section's settings."""
    members: list[dict[str, Any]] = []
    for text in (item.strip() for item in re.split(r"[|\n]", value)):
        if not text:
            continue
        overrides: dict[str, Any] = {}
        for pair in text.split():
            key, sep, raw = pair.partition("=")
            if not sep or not raw:
                raise ValueError(f"member {text!r}: write KEY=VALUE pairs such as size=100 arch=resnet34")
            if key not in MEMBER_KEYS:
                raise ValueError(f"member {text!r}: {key!r} cannot differ between members; "
                                 f"use {', '.join(MEMBER_KEYS)}")
            try:
                overrides[key] = GENERIC_KEYS[key].parse(raw)
            except ValueError as exc:
                raise ValueError(f"member {text!r}: {key} = {raw!r}: {exc}") from None
        if overrides in members:
            raise ValueError(f"member {text!r} is listed twice")
        members.append(overrides)
    if len(members) == 1:
        raise ValueError("an ensemble needs at least 2 members, e.g. size=75 | size=100")
    return members


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
        members.append((name, replace(spec, options={**spec.options, "ensemble": []}, **overrides)))
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
    if mode not in ("class_weighted", "auto"):  # auto: the chosen (members, classes) weights
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


def log_loss(probs: np.ndarray, true_idx: np.ndarray) -> float:
    """Mean negative log probability of the true class (probabilities clipped at 1e-7)."""
    return float(-np.log(np.clip(probs[np.arange(len(true_idx)), true_idx], 1e-7, 1)).mean())


def member_weights(member_probs: Sequence[np.ndarray], true_idx: np.ndarray) -> np.ndarray:
    """Log-loss-optimal weights, one per member (non-negative, summing to 1: a softmax of free
    parameters, fitted with scipy's L-BFGS), for the weighted mean of the members' probabilities."""
    from scipy.optimize import minimize

    stack = np.asarray(member_probs, dtype=np.float64)
    true_p = stack[:, np.arange(len(true_idx)), true_idx]  # (members, N)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(theta - theta.max())
        w /= w.sum()
        mix = np.clip(w @ true_p, 1e-7, None)
        grad_w = -(true_p / mix).mean(axis=1)  # d loss / d w
        return float(-np.log(mix).mean()), w * (grad_w - w @ grad_w)  # through the softmax

    theta = minimize(loss, np.zeros(len(stack)), jac=True, method="L-BFGS-B").x
    w = np.exp(theta - theta.max())
    return w / w.sum()


def _candidate_weights(kind: str, stack: np.ndarray, true_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(members, classes) weights of one candidate combination, fitted on (stack, true_idx)."""
    n_members = len(stack)
    if kind.startswith("member:"):
        weights = np.zeros((n_members, n_classes))
        weights[int(kind.split(":")[1])] = 1
        return weights
    if kind == "mean":
        return np.full((n_members, n_classes), 1 / n_members)
    if kind == "weighted":
        return np.repeat(member_weights(stack, true_idx)[:, None], n_classes, axis=1)
    return class_weights([confusion(true_idx, p.argmax(axis=1), n_classes) for p in stack])  # class_weighted


def choose_combination(member_probs: Sequence[np.ndarray], true_idx: np.ndarray, names: Sequence[str],
                       folds: int = CHOICE_FOLDS, seed: int = 42) -> dict[str, Any]:
    """The combination that does not lose to the best member, chosen out of fold.

    Candidates: each member alone, the mean, log-loss-optimal member weights (`weighted`) and
    per-class recall weights (`class_weighted`). Every candidate is cross-fitted: each stratified
    fold is combined with weights fitted on the other folds. The best member (out-of-fold accuracy,
    then log loss) is the baseline; a combination replaces it only when its out-of-fold accuracy is
    higher, or equal with a log loss lower by LOSS_MARGIN. The chosen candidate's weights are then
    refitted on all of validation. Returns choice, reason, weights (members, classes), candidates
    (out-of-fold accuracy and log loss of each) and `probs` (the chosen candidate, out of fold)."""
    stack = np.asarray(member_probs, dtype=np.float64)
    n_classes = stack.shape[2]
    fold = fold_of(true_idx, folds, seed)
    kinds = [f"member:{i}" for i in range(len(stack))] + ["mean", "weighted", "class_weighted"]
    oof: dict[str, np.ndarray] = {}
    for kind in kinds:
        out = np.zeros(stack.shape[1:])
        for k in range(folds):
            fit, score = fold != k, fold == k
            if score.any():
                out[score] = combine(stack[:, score], "auto", _candidate_weights(kind, stack[:, fit],
                                                                                 true_idx[fit], n_classes))
        oof[kind] = out

    def label(kind: str) -> str:
        return f"member {names[int(kind.split(':')[1])]}" if kind.startswith("member:") else kind

    scores = {kind: {"accuracy": float((p.argmax(axis=1) == true_idx).mean()), "log_loss": log_loss(p, true_idx)}
              for kind, p in oof.items()}
    best_member = min(kinds[:len(stack)], key=lambda k: (-scores[k]["accuracy"], scores[k]["log_loss"]))
    base = scores[best_member]
    better = [k for k in kinds[len(stack):] if scores[k]["accuracy"] > base["accuracy"]
              or (scores[k]["accuracy"] == base["accuracy"]
                  and scores[k]["log_loss"] < base["log_loss"] * (1 - LOSS_MARGIN))]
    chosen = min(better, key=lambda k: (-scores[k]["accuracy"], scores[k]["log_loss"])) if better else best_member
    b = f"best member {label(best_member)} ({base['accuracy']:.2%}, log loss {base['log_loss']:.3f})"
    if chosen == best_member:
        reason = f"no combination beat the {b} out of fold; using that member alone"
    else:
        c = scores[chosen]
        reason = f"{chosen} ({c['accuracy']:.2%}, log loss {c['log_loss']:.3f}) beat the {b} out of fold"
    return {"choice": label(chosen), "reason": reason, "folds": folds,
            "weights": _candidate_weights(chosen, stack, true_idx, n_classes), "probs": oof[chosen],
            "candidates": {label(k): v for k, v in scores.items()}}


class EnsemblePredictor:
    """Loads models/NAME (an ensemble) and its members; the same interface as `ImagePredictor`
    (classes, size, meta, predict, predict_images, predict_files) plus `members`, `mode`, `combine`.
    `task` is the members' kind: it reads the combined probabilities (a hierarchical path, say)."""

    n_inputs = 1

    def __init__(self, folder: str | Path, device: str | None = None, optimize: bool = False, task: Any = None,
                 meta: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.meta = meta if meta is not None else read_meta(self.folder)
        self.task = task
        block = self.meta.get("ensemble")
        try:
            entries = block["members"]
            self.mode: str = block["mode"]
            self.members: dict[str, ImagePredictor] = {
                m["name"]: ImagePredictor(self.folder / m["folder"], device=device, optimize=optimize, task=task)
                for m in entries}
        except (KeyError, TypeError) as exc:
            raise ToolkitError(f"{self.folder / META_FILE}: the ensemble block lacks {exc}; retrain") from None
        if self.mode not in ENSEMBLE_MODES or not self.members:
            raise ToolkitError(f"{self.folder / META_FILE}: ensemble mode {self.mode!r} or members are not valid; "
                               "retrain")
        self.classes: list[str] = list(self.meta["classes"])
        for name, member in self.members.items():
            if member.classes != self.classes:
                raise ToolkitError(f"ensemble member {name} has classes {member.classes}, not {self.classes}; "
                                   f"retrain {self.folder.name}")
        self.size = max(member.size for member in self.members.values())
        self.weights = np.array([[block.get("weights", {}).get(name, {}).get(c, 1 / len(self.members))
                                  for c in self.classes] for name in self.members])

    def combine(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each member's (N, classes) probabilities -> the ensemble's, by this ensemble's mode."""
        return combine([member_probs[name] for name in self.members], self.mode, self.weights).astype(np.float32)

    def predict_members(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> dict[str, np.ndarray]:
        return {name: member.predict_images(images, bs=bs, tta=tta) for name, member in self.members.items()}

    def predict_images(self, images: Sequence[Image.Image], bs: int = 64, tta: bool = False) -> np.ndarray:
        return self.combine(self.predict_members(images, bs=bs, tta=tta))

    def predict_member_files(self, files: Sequence[Path], *, tta: bool = False, bs: int = 64,
                             progress: bool = True) -> dict[str, np.ndarray]:
        return {name: m.predict_files(files, tta=tta, bs=bs, progress=progress) for name, m in self.members.items()}

    def predict_files(self, files: Sequence[Path], *, tta: bool = False, bs: int = 64,
                      progress: bool = True) -> np.ndarray:
        return self.combine(self.predict_member_files(files, tta=tta, bs=bs, progress=progress))

    def predict(self, src: ImageSource | Image.Image, name: str | None = None) -> Prediction:
        """One image (path, bytes, file object or PIL image) -> the ensemble's label and probabilities."""
        img = src if isinstance(src, Image.Image) else open_image(src, name=name, draft_size=self.size)
        probs = self.predict_images([img.convert("RGB")])[0]
        return self.task.describe(self.classes, probs)

    def predict_sources(self, sources, names=None) -> Prediction:
        (src,) = sources
        return self.predict(src, name=(names or [None])[0])


def ensemble_meta(spec: ClassifierSpec, classes: list[str], members: dict[str, ImagePredictor],
                  weights: np.ndarray, data: dict[str, Any], extra: dict[str, Any],
                  chosen: dict[str, Any] | None = None) -> dict[str, Any]:
    """model.json's content for an ensemble of the trained `members` (in models/NAME/members/)."""
    return {"name": spec.name, "title": spec.display_title, "description": spec.description, "classes": classes,
            "size": max(m.size for m in members.values()), "group": spec.group, "data": data, **extra,
            "ensemble": {
                "mode": spec.ensemble_mode,
                "members": [{"name": name, "folder": f"{MEMBERS_DIR}/{name}", "arch": m.meta["arch"],
                             "size": m.size} for name, m in members.items()],
                "weights": {name: {c: round(float(w), 6) for c, w in zip(classes, row)}
                            for name, row in zip(members, weights)},
                "weights_from": (f"{chosen['choice']}, fitted on all validation images: {chosen['reason']}"
                                 if chosen else "validation recall per class, all validation images")}}


def train_ensemble(inner: Task, spec: ClassifierSpec, data: Path | None = None, *, out: Path | None = None,
                   progress: bool = True, log: Callable[[str], None] = print, callbacks: Sequence = ()) -> dict:
    """Train every member (as the `inner` kind) into OUT/members/<member>/ on the same split, then
    write the ensemble's model.json and metrics.json into OUT (default models/NAME/); returns the
    ensemble's validation metrics."""
    folder = Path(out) if out is not None else spec.models_dir
    members = member_specs(spec)
    dataset = inner.load_data(spec, data, progress=progress)
    fingerprint = data_fingerprint(dataset)
    for index, (name, member) in enumerate(members, 1):
        log(f"member {index}/{len(members)} {name}: {member.arch}, {member.size} px, "
            f"{member.freeze_epochs}+{member.epochs} epochs")
        metrics = inner.train(member, data, progress=progress, log=lambda line, n=name: log(f"  [{n}] {line}"),
                              out=folder / MEMBERS_DIR / name, callbacks=callbacks)
        if metrics["data_fingerprint"] != fingerprint:  # members must share one split
            raise ToolkitError(f"ensemble member {name} trained on other data than {spec.name}; "
                               "were the data changed while training?")
    predictors = {name: ImagePredictor(folder / MEMBERS_DIR / name, device="cpu", task=inner) for name, _ in members}
    files, labels = dataset.subset(valid=True)
    classes = dataset.classes
    true_idx = np.array([classes.index(y) for y in labels], dtype=int)
    probs = {name: p.predict_files(files, progress=progress) for name, p in predictors.items()}
    stack = list(probs.values())
    member_metrics = {name: inner.metrics(p, labels, classes, files, spec.group) for name, p in probs.items()}
    weights = class_weights([np.array(m["confusion"]) for m in member_metrics.values()])
    chosen = choose_combination(stack, true_idx, list(probs), seed=spec.seed)
    auto = spec.ensemble_mode == "auto"
    if auto:
        weights = chosen["weights"]
    modes = {"mean": inner.metrics(combine(stack, "mean"), labels, classes, files, spec.group),
             "class_weighted": inner.metrics(cross_fitted(stack, true_idx, len(classes), seed=spec.seed),
                                             labels, classes, files, spec.group)}
    data_info = {"dir": str(dataset.root), "fingerprint": fingerprint, "n_train": dataset.n_train,
                 "n_valid": dataset.n_valid}
    for stale in (WEIGHTS_FILE, "export.pkl"):  # a single model trained here before
        (folder / stale).unlink(missing_ok=True)
    artifacts.write_model(folder, None, ensemble_meta(spec, classes, predictors, weights, data_info,
                                                      inner.model_meta(spec, dataset), chosen if auto else None),
                          inner.name)
    result = dict(inner.metrics(chosen["probs"], labels, classes, files, spec.group) if auto
                  else modes[spec.ensemble_mode])
    result.update({
        "name": spec.name, "task": inner.name, "ensemble_mode": spec.ensemble_mode, "members": member_metrics,
        "modes": {mode: {"accuracy": m["accuracy"], "per_class": m["per_class"]} for mode, m in modes.items()},
        "class_weighted_scoring": f"{CROSS_FIT_FOLDS}-fold cross-fitted on validation (weights never fitted "
                                  "on the images they score)",
        "weights": {name: dict(zip(classes, map(float, row))) for name, row in zip(predictors, weights)},
        "combination": {"choice": chosen["choice"], "reason": chosen["reason"], "candidates": chosen["candidates"],
                        "scoring": f"{chosen['folds']}-fold cross-fitted on validation (out of fold)",
                        "used": auto},
        "n_train": dataset.n_train, "n_valid": dataset.n_valid, "data": str(dataset.root),
        "data_fingerprint": fingerprint,
    })
    artifacts.write_metrics(folder, result)
    inner.plots(result, folder, f"{spec.name} ensemble ({spec.ensemble_mode})")
    summary = ", ".join(f"{name} {m['accuracy']:.2%}" for name, m in member_metrics.items())
    log(f"valid accuracy: members {summary}; ensemble mean {modes['mean']['accuracy']:.2%}, class_weighted "
        f"{modes['class_weighted']['accuracy']:.2%} (cross-fitted); auto: {chosen['reason']}; wrote {folder}")
    return result


def members_report(metrics: dict) -> list[str]:
    """Recall per class of every member beside the ensemble's, as text lines."""
    members = metrics.get("members")
    if not members:
        return []
    names = [*members, f"ensemble ({metrics.get('ensemble_mode', '?')})"]
    rows = [*members.values(), metrics]
    widths = [max(9, len(n) + 2) for n in names]
    lines = ["", "recall per class, each member and the ensemble",
             f"{'class':<20}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for name in metrics["per_class"]:
        lines.append(f"{name:<20}" + "".join(f"{r['per_class'][name]['recall']:>{w}.3f}"
                                              for r, w in zip(rows, widths)))
    lines.append(f"{'accuracy':<20}" + "".join(f"{r['accuracy']:>{w}.2%}" for r, w in zip(rows, widths)))
    return lines


class EnsembleTask(Task):
    """A wrapper over any kind that supports ensembles: members trained as that kind, combined."""

    feature = "ensemble"
    key = "ensemble"
    keys = {
        "ensemble": Key(parse_ensemble, "", "members of an ensemble, '|'-separated, each KEY=VALUE overrides of "
                        "this section's " + ", ".join(MEMBER_KEYS) + " (e.g. size=75 | size=100); empty: one model"),
        "ensemble_mode": Key(choice(*ENSEMBLE_MODES), "auto",
                             "how an ensemble combines probabilities: auto (the mean, log-loss-optimal member "
                             "weights or per-class weights, whichever beats the best member out of fold on "
                             "validation, else that member alone), mean, or class_weighted (per class by each "
                             "member's validation recall)"),
    }

    def __init__(self, inner: Task):
        self.inner = inner
        self.name = inner.name
        self.summary = f"an ensemble of {inner.name} models"
        self.supports = inner.supports - {"ensemble", "head_only", "distributed"}  # members train one by one

    @staticmethod
    def applies(spec: ClassifierSpec) -> bool:
        return bool(spec.options.get("ensemble"))

    @staticmethod
    def applies_to_meta(meta: dict[str, Any]) -> bool:
        return "ensemble" in meta

    # the members' kind decides how data are labelled and figures computed
    def check_spec(self, spec):
        self.inner.check_spec(spec)
        member_specs(spec)

    def list_images(self, folder, spec):
        return self.inner.list_images(folder, spec)

    def to_labels(self, folder_labels, spec, where):
        return self.inner.to_labels(folder_labels, spec, where)

    def eval_images(self, folder, meta):
        return self.inner.eval_images(folder, meta)

    def folder_classes(self, meta):
        return self.inner.folder_classes(meta)

    def load_data(self, spec, data=None, *, progress=True):
        return self.inner.load_data(spec, data, progress=progress)

    def metrics(self, probs, labels, classes, files=None, group=""):
        return self.inner.metrics(probs, labels, classes, files, group)

    def plots(self, metrics, folder, title):
        return self.inner.plots(metrics, folder, title)

    def describe(self, classes, probs):
        return self.inner.describe(classes, probs)

    def prediction_html(self, prediction):
        return self.inner.prediction_html(prediction)

    def check_feedback_label(self, label):
        return self.inner.check_feedback_label(label)

    def check_batches(self, spec, data, n, approach, progress=False):
        return self.inner.check_batches(spec, data, n, approach, progress)

    def report_extra(self, metrics):
        return [*self.inner.report_extra(metrics), *members_report(metrics)]

    def result_keys(self):
        return (*self.inner.result_keys(), "ensemble_mode", "members", "modes", "combination")

    def plot_names(self):
        return ("confusion_matrix.png",)

    # what makes it an ensemble
    def train(self, spec, data=None, *, out=None, progress=True, log=print, callbacks=()):
        return train_ensemble(self.inner, spec, data, out=out, progress=progress, log=log, callbacks=callbacks)

    def predictor(self, folder, meta, *, device=None, optimize=False):
        return EnsemblePredictor(folder, device=device, optimize=optimize, task=self.inner, meta=meta)

    def score_files(self, predictor, files, labels, group, *, tta=False, progress=True):
        member_probs = predictor.predict_member_files(files, tta=tta, progress=progress)
        metrics = self.inner.metrics(predictor.combine(member_probs), labels, predictor.classes, files, group)
        metrics["ensemble_mode"] = predictor.mode
        metrics["members"] = {name: self.inner.metrics(p, labels, predictor.classes, files, group)
                              for name, p in member_probs.items()}
        return metrics

    def card_rows(self, meta, metrics):
        block, members = meta.get("ensemble", {}), metrics.get("members", {})
        rows = [("ensemble", f"{len(block.get('members', []))} members, {block.get('mode', '?')}")]
        if block.get("mode") == "auto" and metrics.get("combination"):
            rows.append(("ensemble choice", metrics["combination"]["reason"]))
        rows += [(f"member {m['name']}", f"{m['arch']}, {m['size']} px"
                  + (f", validation {members[m['name']]['accuracy']:.1%}" if m["name"] in members else ""))
                 for m in block.get("members", [])]
        return rows + self.inner.card_rows(meta, metrics)


register_wrapper(EnsembleTask)
