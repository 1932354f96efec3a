"""task = hierarchical: classes are paths (`shoes/female/sandals`), one flat model over the leaves.

The network is the ordinary single-label classifier whose classes are the leaf paths; a node's
probability at any level is the sum of its leaves' probabilities. Predictions are decoded top
down: the most probable node at level 1, then the most probable of its children, and so on, so
the path shown is always one consistent path (a leaf never contradicts its parent) with a
probability per level. Paths may differ in depth: at levels deeper than a path, the path stays
its own node (`dress` is `dress` at level 1 and at level 2).

Labels come from nested folders (`DIR/shoes/female/sandals/*.jpg`) or, through the `hierarchy`
key, from a flat data set's class folders (`hierarchy = tops/t-shirt, tops/shirt, footwear/shoes`,
or `womens sandals: shoes/female/sandals` where the folder name is not the path's last part).
See docs/ARCHITECTURE.md ("hierarchical") for why one flat model rather than a cascade.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.core.config import ClassifierSpec, Key
from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.core.metrics import metrics_from_probs, plot_confusion
from toolkit.core.names import BadName, check_label_path
from toolkit.data import Dataset, class_folders, list_labelled_images
from toolkit.predict import Prediction
from toolkit.tasks.base import FEATURES, Task
from toolkit.tasks.registry import register

SEP = "/"


def split_path(path: str) -> list[str]:
    """'shoes / female/sandals' -> ['shoes', 'female', 'sandals'] (ValueError on empty parts)."""
    parts = [part.strip() for part in path.split(SEP)]
    if not path.strip() or any(not part for part in parts):
        raise ValueError(f"{path!r} is not a path such as tops/shirt (empty part)")
    return parts


def check_paths(paths: Sequence[str]) -> None:
    """ValueError when a class is also the parent of another class (its images would have no leaf)."""
    leaves = set(paths)
    for path in sorted(leaves):  # the same message every run
        parts = path.split(SEP)
        for depth in range(1, len(parts)):
            parent = SEP.join(parts[:depth])
            if parent in leaves:
                raise ValueError(f"{parent!r} is both a class and the parent of {path!r}; "
                                 f"move its images into a sub-class such as {parent}/other")


def parse_hierarchy(value: str) -> dict[str, str]:
    """`PATH` or `FOLDER: PATH` items, comma or line separated -> {folder: path}.

    The folder defaults to the path's last part. Parts are trimmed; a folder listed twice and a
    class that is also a parent are errors (ValueError, which settings turns into one line)."""
    mapping: dict[str, str] = {}
    for item in (item.strip() for item in re.split(r"[,\n]", value)):
        if not item:
            continue
        folder, _, path = item.rpartition(":")
        parts = split_path(path)
        folder = folder.strip() or parts[-1]
        if folder in mapping:
            raise ValueError(f"folder {folder!r} is mapped twice")
        mapping[folder] = SEP.join(parts)
    check_paths(list(mapping.values()))
    return mapping


def to_paths(labels: Sequence[str], mapping: dict[str, str], where: str) -> list[str]:
    """Folder labels -> their paths through `mapping`; an unmapped folder is a one-line error."""
    missing = sorted(set(labels) - set(mapping))
    if missing:
        raise ToolkitError(f"{where}: class folder(s) {missing} are not in the hierarchy; add them as "
                           f"'{missing[0]}: parent/{missing[0]}' items")
    return [mapping[label] for label in labels]


def list_paths(folder: Path, mapping: dict[str, str] | None = None) -> tuple[list[Path], list[str]]:
    """Images of `folder` with path labels: through `mapping` when every class folder is in it
    (a flat data set), else from the nested folders (`folder/shoes/female/sandals/x.jpg`)."""
    if mapping and {p.name for p in class_folders(folder)} <= set(mapping):
        files, labels = list_labelled_images(folder)
        return files, to_paths(labels, mapping, str(folder))
    files, labels = list_labelled_images(folder, nested=True)
    try:
        check_paths(labels)
    except ValueError as exc:
        raise ToolkitError(f"{folder}: {exc}") from None
    return files, labels


# ---------------------------------------------------------------- levels


def depth(classes: Sequence[str]) -> int:
    return max(len(c.split(SEP)) for c in classes) if classes else 0


def node_at(path: str, level: int) -> str:
    """The path's node at `level` (1 = top): its first `level` parts."""
    return SEP.join(path.split(SEP)[:level])


def level_matrix(classes: Sequence[str], level: int) -> tuple[list[str], np.ndarray]:
    """The level's nodes (sorted) and the (leaves, nodes) 0/1 matrix: level probs = probs @ matrix."""
    nodes = sorted({node_at(c, level) for c in classes})
    index = {n: i for i, n in enumerate(nodes)}
    matrix = np.zeros((len(classes), len(nodes)), dtype=np.float32)
    for i, c in enumerate(classes):
        matrix[i, index[node_at(c, level)]] = 1
    return nodes, matrix


def decode(probs: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Top-down decoding of (N, leaves) probabilities -> (leaf index (N,), probability per level
    (N, levels)): at each level the most probable node among the children of the node chosen
    above. The leaf is the one leaf under the deepest chosen node."""
    probs = np.asarray(probs, dtype=np.float64)
    n, levels = len(probs), depth(classes)
    allowed = np.ones((n, len(classes)), dtype=bool)  # leaves under the nodes chosen so far
    per_level = np.zeros((n, levels))
    for level in range(1, levels + 1):
        _, matrix = level_matrix(classes, level)
        node_probs = probs @ matrix  # (N, nodes)
        reachable = (allowed.astype(np.float64) @ matrix) > 0  # nodes with an allowed leaf
        choice = np.where(reachable, node_probs, -1).argmax(axis=1)
        per_level[:, level - 1] = node_probs[np.arange(n), choice]
        allowed &= matrix[:, choice].T.astype(bool)
    leaf = np.where(allowed, probs, -1).argmax(axis=1)
    return leaf, per_level


def hierarchical_metrics(probs: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                         files: Sequence[Path] | None = None, group: str = "", decoding: str = "top-down") -> dict:
    """`metrics_from_probs` over the leaves plus `levels`: one metrics_from_probs per level
    (accuracy, per-class, confusion) and `decode`. `decoding` is "top-down" (what predictions
    show) or "leaf" (the most probable leaf, collapsed to its parents: a flat classifier's view)."""
    if decoding not in ("top-down", "leaf"):
        raise ValueError(f"decoding {decoding!r}: use 'top-down' or 'leaf'")
    if not len(labels):
        leaf = np.zeros(0, dtype=int)
    else:
        leaf = decode(probs, classes)[0] if decoding == "top-down" else np.asarray(probs).argmax(axis=1)
    metrics = metrics_from_probs(probs, labels, classes, files, group, predicted=leaf)
    metrics["decode"] = decoding
    metrics["levels"] = {}
    for level in range(1, depth(classes) + 1):
        nodes, matrix = level_matrix(classes, level)
        index = {n: i for i, n in enumerate(nodes)}
        predicted = np.array([index[node_at(classes[i], level)] for i in leaf], dtype=int)
        level_metrics = metrics_from_probs(probs @ matrix, [node_at(y, level) for y in labels], nodes,
                                           predicted=predicted)
        level_metrics.pop("groups", None)
        metrics["levels"][f"level{level}"] = level_metrics
    return metrics


def plot_levels(metrics: dict, folder: Path, title: str) -> list[Path]:
    """confusion_level1.png, confusion_level2.png, ... (one confusion matrix per level)."""
    return [plot_confusion(m, folder / f"confusion_{name}.png", title=f"{title}, {name}")
            for name, m in metrics.get("levels", {}).items()]


def format_levels(metrics: dict) -> str:
    return "\n".join(f"{name}: accuracy {m['accuracy']:.2%} over {len(m['classes'])} classes"
                     for name, m in metrics.get("levels", {}).items())


# ---------------------------------------------------------------- prediction


@dataclass
class HierarchicalPrediction(Prediction):
    """A prediction whose `label` is the decoded leaf, with `path`: (node, probability) per level."""

    path: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "path": [{"node": node, "probability": round(p, 5)} for node, p in self.path]}

    def line(self) -> str:
        return super().line() + "\t" + " > ".join(f"{node} {p:.3f}" for node, p in self.path)


def decode_path(classes: Sequence[str], probs: np.ndarray) -> list[tuple[str, float]]:
    """One image's leaf probabilities -> [(node, probability)] from the top level down."""
    leaf, per_level = decode(np.asarray(probs)[None], classes)
    leaf_path = classes[int(leaf[0])]
    path: list[tuple[str, float]] = []
    for level in range(1, per_level.shape[1] + 1):
        node = node_at(leaf_path, level)
        if not path or path[-1][0] != node:  # a short path stays its own node deeper down
            path.append((node, float(per_level[0, level - 1])))
    return path


def path_html(path: list[tuple[str, float]]) -> str:
    """The decoded path as HTML for the dashboard: `tops 93% > shirt 71%`."""
    steps = [f'<span class="toolkit-level"><b>{html.escape(node.split(SEP)[-1])}</b> {p:.0%}</span>'
             for node, p in path]
    return '<div class="toolkit-path">' + " &rsaquo; ".join(steps) + "</div>"


# ---------------------------------------------------------------- the task kind


class HierarchicalTask(Task):
    """Classes are label paths; one flat leaf model, decoded top down, figures per level."""

    name = "hierarchical"
    summary = "label paths such as shoes/female/sandals: one consistent path, a probability per level"
    keys = {"hierarchy": Key(parse_hierarchy, "", "task = hierarchical: data folders as label paths, 'tops/shirt' "
                             "or 'FOLDER: tops/shirt' items (default: nested folders shoes/female/sandals/ are the "
                             "paths)")}
    supports = frozenset(FEATURES)

    def check_spec(self, spec: ClassifierSpec) -> None:
        missing = [c for c in spec.classes if c not in spec.hierarchy] if spec.hierarchy else []
        if missing:
            raise SettingsError(f"settings [{spec.name}] hierarchy has no path for class(es) {', '.join(missing)}; "
                                f"add e.g. '{missing[0]}: parent/{missing[0]}'")

    def list_images(self, folder: Path, spec: ClassifierSpec) -> tuple[list[Path], list[str]]:
        return list_labelled_images(folder, nested=not spec.hierarchy)

    def to_labels(self, folder_labels: list[str], spec: ClassifierSpec, where: str) -> list[str]:
        mapping = spec.hierarchy
        labels = to_paths(folder_labels, mapping, f"[{spec.name}] hierarchy ({where})") if mapping else folder_labels
        try:
            check_paths(labels)
        except ValueError as exc:
            raise ToolkitError(f"[{spec.name}] {where}: {exc}") from None
        return labels

    def eval_images(self, folder: Path, meta: dict) -> tuple[list[Path], list[str]]:
        return list_paths(folder, meta.get("hierarchy"))

    def folder_classes(self, meta: dict) -> dict[str, str]:
        return dict(meta.get("hierarchy") or {})

    def model_meta(self, spec: ClassifierSpec, dataset: Dataset) -> dict:
        return {"levels": depth(dataset.classes), "hierarchy": spec.hierarchy}

    def result_keys(self) -> tuple[str, ...]:
        return (*super().result_keys(), "levels")

    def metrics(self, probs, labels, classes, files=None, group: str = "") -> dict:
        return hierarchical_metrics(probs, labels, classes, files, group)

    def plots(self, metrics: dict, folder: Path, title: str) -> list[Path]:
        return [*super().plots(metrics, folder, title), *plot_levels(metrics, folder, title)]

    def report_extra(self, metrics: dict) -> list[str]:
        return [line for line in format_levels(metrics).splitlines() if line]

    def describe(self, classes, probs) -> HierarchicalPrediction:
        path = decode_path(classes, probs)
        return HierarchicalPrediction(path[-1][0], dict(zip(classes, map(float, probs), strict=True)), path)

    def prediction_html(self, prediction: Prediction) -> str:
        return path_html(getattr(prediction, "path", []))

    def card_rows(self, meta: dict, metrics: dict) -> list[tuple[str, str]]:
        levels = metrics.get("levels") or {}
        return [("accuracy per level", ", ".join(f"{name} {m['accuracy']:.1%}" for name, m in levels.items()))] \
            if levels else []

    def check_feedback_label(self, label: str) -> str:
        try:
            return check_label_path(label, "label")
        except BadName as exc:
            raise BadName(f"{exc} (a label is a path such as tops/shirt)") from None


register(HierarchicalTask())
