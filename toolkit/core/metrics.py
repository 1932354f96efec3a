"""Figures and plots: accuracy, per-class precision/recall/F1, confusion matrix, per-group results.

`metrics_from_probs` is the one place figures are computed, whether the probabilities come from
a Learner's validation set (at train time) or from the pickle-free predictor on a folder; tasks
add their own figures on top (levels, members, kinds of pair).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit.core.errors import ToolkitError


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = pyplot()
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


def format_report(metrics: dict) -> str:
    """A plain-text table: overall, per class, per group."""
    lines = [f"accuracy {metrics['accuracy']:.2%} on {metrics['n']} images",
             f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>6}"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>6}")
    for name, row in metrics.get("groups", {}).items():
        lines.append(f"group {name:<14} accuracy {row['accuracy']:.2%} (n={row['n']})")
    return "\n".join(lines)


def plot_losses(history, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if history.train:
        steps, losses = zip(*history.train)
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid") if len(losses) >= 5 else losses
        ax.plot(steps[len(steps) - len(smooth):], smooth, label="train (smoothed)")
    if history.valid:
        steps, losses = zip(*history.valid)
        ax.plot(steps, losses, "o-", label="valid")
    ax.set_xlabel("mini-batch")
    ax.set_ylabel("loss")
    ax.set_title("Losses (frozen then unfrozen)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_top_losses(images: list[np.ndarray], given: list[str], probs: np.ndarray, classes: list[str],
                    path: Path, k: int = 9) -> Path:
    """The k validation images the model gets most wrong: given, predicted, probability, loss."""
    plt = pyplot()
    index = {c: i for i, c in enumerate(classes)}
    true_p = np.array([probs[i, index[y]] for i, y in enumerate(given)])
    losses = -np.log(np.clip(true_p, 1e-12, 1))
    order = np.argsort(-losses)[:k]
    cols = 3
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), order):
        predicted = classes[int(probs[i].argmax())]
        ax.imshow(images[i])
        ax.set_title(f"{given[i]} -> {predicted}\np={probs[i].max():.2f} loss={losses[i]:.2f}", fontsize=9)
    fig.suptitle("Top losses (given -> predicted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
