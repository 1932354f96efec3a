"""Honest evaluation: accuracy, per-class precision/recall/F1, confusion matrix, per-group results.

`metrics_from_probs` is the one place figures are computed, whether the probabilities come from
a Learner's validation set (at train time) or from the pickle-free predictor on a folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit.core.errors import ToolkitError
from toolkit.core.images import verify_images
from toolkit.core.progress import progress_iter
from toolkit.data import list_labelled_images
from toolkit.model_io import Predictor


def confusion(true_idx: np.ndarray, pred_idx: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (true_idx, pred_idx), 1)
    return matrix


def accuracy_by(correct: Sequence[bool], names: Sequence[str]) -> dict[str, dict]:
    """{name: {accuracy, n}} over the items that carry each name, sorted by name."""
    by_name: dict[str, list[bool]] = {}
    for name, ok in zip(names, correct):
        by_name.setdefault(name, []).append(bool(ok))
    return {g: {"accuracy": round(float(np.mean(v)), 4), "n": len(v)} for g, v in sorted(by_name.items())}


def metrics_from_probs(probs: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                       files: Sequence[Path] | None = None, group: str = "",
                       group_names: Sequence[str] | None = None, predicted: np.ndarray | None = None) -> dict:
    """accuracy, n, per_class {precision, recall, f1, support}, confusion, groups {name: accuracy}.

    Groups come from `group_names` (one per item) or from the `group` regex on the file names.
    `predicted` (class indices) replaces the argmax of `probs` where a task decodes otherwise
    (task = hierarchical decodes top down)."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ToolkitError(f"labels {unknown} are not classes of this model ({', '.join(classes)})")
    true_idx = np.array([index[y] for y in labels], dtype=int)
    if predicted is not None:
        pred_idx = np.asarray(predicted, dtype=int)
    else:
        pred_idx = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=int)
    matrix = confusion(true_idx, pred_idx, len(classes))
    per_class = {}
    for i, name in enumerate(classes):
        tp, n_predicted, actual = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
        precision = tp / n_predicted if n_predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(actual)}
    correct = true_idx == pred_idx
    result = {"accuracy": round(float(correct.mean()), 4) if len(labels) else 0.0, "n": len(labels),
              "per_class": per_class, "classes": list(classes), "confusion": matrix.tolist(), "groups": {}}
    if group_names is None and group and files is not None:
        regex = re.compile(group)
        group_names = [match.group(1) if (match := regex.search(Path(path).name)) else "(no match)"
                       for path in files]
    if group_names is not None:
        result["groups"] = accuracy_by(correct, group_names)
    return result


def plot_confusion(metrics: dict, path: Path, title: str = "Confusion matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion"])
    classes = metrics["classes"]
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title} (accuracy {metrics['accuracy']:.1%}, n={metrics['n']})")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > threshold else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def predict_files(predictor: Predictor, files: Sequence[Path], *, tta: bool = False, bs: int = 64,
                  progress: bool = True) -> np.ndarray:
    """(N, classes) probabilities of image files, in batches, preprocessed as validation is."""
    import torch

    from toolkit.data import load_resized

    out = [np.zeros((0, len(predictor.classes)), dtype=np.float32)]
    for start in progress_iter(range(0, len(files), bs), label="evaluating", enabled=progress):
        arrays = [load_resized(f, predictor.size) for f in files[start : start + bs]]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        out.append(predictor.predict_tensors(batch, tta=tta))
    return np.concatenate(out)


def evaluate_folder(predictor: Predictor, folder: Path, *, tta: bool = False, group: str = "",
                    bs: int = 64, progress: bool = True) -> dict:
    """Predict every image of folder/<class>/ and score it; bad files are listed, not fatal.
    For an ensemble the result also holds `members`: {member: metrics} and `ensemble_mode`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolkitError(f"evaluation folder {folder} not found")
    hierarchical = predictor.meta.get("task") == "hierarchical"
    if hierarchical:
        from toolkit.hierarchy import list_paths

        files, labels = list_paths(folder, predictor.meta.get("hierarchy"))
    else:
        files, labels = list_labelled_images(folder)
    if not files:
        raise ToolkitError(f"no images in {folder} (expected {folder}/<class>/<image>)")
    unknown = sorted(set(labels) - set(predictor.classes))
    if unknown:
        raise ToolkitError(f"{folder} has class folders {unknown} that the model does not know "
                           f"(its classes: {', '.join(predictor.classes)})")
    good, bad = verify_images(files, progress=progress)
    good_set = set(good)
    labels = [y for f, y in zip(files, labels) if f in good_set]
    files = good
    members = getattr(predictor, "members", None)
    if members:  # an ensemble (toolkit.ensemble): every member is scored, then the combination
        member_probs = {name: predict_files(member, files, tta=tta, bs=bs, progress=progress)
                        for name, member in members.items()}
        probs = predictor.combine(member_probs)
    else:
        probs = predict_files(predictor, files, tta=tta, bs=bs, progress=progress)
    if hierarchical:
        from toolkit.hierarchy import hierarchical_metrics

        metrics = hierarchical_metrics(probs, labels, predictor.classes, files, group)
    else:
        metrics = metrics_from_probs(probs, labels, predictor.classes, files, group)
    if members:
        metrics["ensemble_mode"] = predictor.mode
        metrics["members"] = {name: metrics_from_probs(p, labels, predictor.classes, files, group)
                              for name, p in member_probs.items()}
    metrics["bad_files"] = [{"file": str(b.path), "reason": b.reason} for b in bad]
    metrics["data"] = str(folder)
    metrics["tta"] = tta
    return metrics


def format_report(metrics: dict) -> str:
    """A plain-text table: overall, per class, per group."""
    lines = [f"accuracy {metrics['accuracy']:.2%} on {metrics['n']} images",
             f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>6}"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>6}")
    for name, row in metrics.get("groups", {}).items():
        lines.append(f"group {name:<14} accuracy {row['accuracy']:.2%} (n={row['n']})")
    for name, row in metrics.get("levels", {}).items():  # task = hierarchical
        lines.append(f"{name:<20} accuracy {row['accuracy']:.2%} over {len(row['classes'])} classes")
    members = metrics.get("members")
    if members:  # an ensemble: recall per class of every member beside the ensemble's
        names = [*members, f"ensemble ({metrics.get('ensemble_mode', '?')})"]
        rows = [*members.values(), metrics]
        widths = [max(9, len(n) + 2) for n in names]
        lines += ["", "recall per class, each member and the ensemble",
                  f"{'class':<20}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        for name in metrics["per_class"]:
            lines.append(f"{name:<20}" + "".join(f"{r['per_class'][name]['recall']:>{w}.3f}"
                                                  for r, w in zip(rows, widths)))
        lines.append(f"{'accuracy':<20}" + "".join(f"{r['accuracy']:>{w}.2%}" for r, w in zip(rows, widths)))
    return "\n".join(lines)
