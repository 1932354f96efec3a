"""Rankings over a classifier's raw images: what a person should look at first.

1. top losses from a trained model (models/NAME), train and valid splits;
2. out-of-fold label issues: k-fold logistic-regression heads on pretrained embeddings give
   out-of-fold probabilities, ranked by cleanlab (no prior training needed);
3. duplicates: exact (sha256) and near (perceptual hash, embedding cosine), as groups, tagged
   within class / across classes / across train and valid (leaks);
4. outliers, "not any of these classes": kNN distance in embedding space, distance to the nearest
   class centroid and a low out-of-fold top probability, combined as percentile ranks;
5. broken or odd images: verification failures and non-ok lines of scrape/NAME/manifest.jsonl.

Files are named by their path relative to the raw root (scrape/NAME or the `data` folder).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.config import ClassifierSpec
from toolkit.core.images import COPY_HASH_BITS, verify_images
from toolkit.data import find_data_dir, labelled_split
from toolkit.stages.clean.confusion import confusion_pairs
from toolkit.stages.clean.embeddings import embed
from toolkit.stages.clean.neighbours import Neighbours, knn_disagreement, knn_graph, knn_label_probs
from toolkit.stages.clean.quality import quality_table
from toolkit.tasks import load_predictor, task_of, task_of_meta

OK_STATUSES = {"ok", "downloaded", "kept", "ingested", "saved"}


@dataclass
class RawImages:
    """The raw images of a classifier, named relative to `root`, with their given labels and split."""

    root: Path
    files: list[Path]
    labels: list[str]
    is_valid: list[bool]
    classes: list[str]
    broken: list[dict[str, str]] = field(default_factory=list)

    @property
    def rel(self) -> list[str]:
        return [relname(self.root, f) for f in self.files]

    def split_of(self, i: int) -> str:
        return "valid" if self.is_valid[i] else "train"


def relname(root: Path, path: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def raw_root(spec: ClassifierSpec, data: Path | None = None) -> Path:
    """--data, else the `data` key, else scrape/NAME (never cleaned_data: that is derived)."""
    return find_data_dir(spec, data, raw=True, accept=Path.is_dir)


def read_manifest(root: Path) -> list[dict[str, Any]]:
    path = root / "manifest.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def list_raw_images(spec: ClassifierSpec, data: Path | None = None, *, verify: bool = True) -> RawImages:
    """Labelled raw images and their split; undecodable files go to `broken`, with the reason."""
    task_of(spec).require("clean", spec.name, "clean")
    root = raw_root(spec, data)
    files, labels, split = labelled_split(spec, root)
    is_valid = split or []
    broken: list[dict[str, str]] = []
    if verify:
        _, bad = verify_images(files)
        bad_set = {b.path for b in bad}
        broken = [{"file": relname(root, b.path), "reason": b.reason, "source": "verify"} for b in bad]
        keep = [i for i, f in enumerate(files) if f not in bad_set]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        is_valid = [is_valid[i] for i in keep] if is_valid else []
    if not is_valid:
        is_valid = spec.split_rule.assign(files, spec.valid_pct, spec.seed)
    known = {b["file"] for b in broken}
    for row in read_manifest(root):
        status = str(row.get("status", "ok")).lower()
        if row.get("file") and status not in OK_STATUSES and row["file"] not in known:
            broken.append({"file": str(row["file"]), "reason": f"manifest status {status}"
                           + (f": {row['error']}" if row.get("error") else ""), "source": "manifest"})
    return RawImages(root, files, labels, is_valid, sorted(set(labels)), broken)


# ---------------------------------------------------------------- out-of-fold label issues


MIN_PER_CLASS = 2  # a class needs two images for out-of-fold scoring (one to learn from, one to score)


def scorable_classes(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Indices of the classes with at least MIN_PER_CLASS images, when two or more such classes exist."""
    counts = np.bincount(labels, minlength=n_classes)
    ok = np.flatnonzero(counts >= MIN_PER_CLASS)
    return ok if len(ok) >= 2 else np.array([], dtype=int)


def _cores() -> int:
    """The cores this process may use, or fewer where OMP_NUM_THREADS says so (the test suite's workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS") or cores)))
    except ValueError:
        return cores


def _unit_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows] as float32, each row L2-normalised (a copy; zero rows stay zero)."""
    out = np.asarray(x[rows], dtype=np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def out_of_fold_probs(emb: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5,
                      seed: int = 0, C: float = 1.0, *, warnings: list[str] | None = None,
                      class_names: Sequence[str] | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold predicted probabilities from k logistic-regression heads (stratified folds).

    `emb` is any (n, d) feature matrix (`Embedded.features`: final and inner-stage features); the heads
    see its rows L2-normalised. `exclude` (a bool mask) keeps those images out of every head's training
    part (they are still predicted, out of fold): `cleaned_out_of_fold_probs` uses it to refit without
    the suspects.

    k drops to the smallest class's size (at least 2). Classes with fewer than MIN_PER_CLASS images
    take no part in the folds: their images are predicted by a head fitted on the other classes (they
    are out-of-sample too), and a line saying so goes to `warnings`. With fewer than two classes
    left, the probabilities are uniform and label issues are not scored."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    counts = np.bincount(labels, minlength=n_classes)
    probs = np.full((len(labels), n_classes), 1.0 / max(1, n_classes), dtype=np.float64)
    ok = scorable_classes(labels, n_classes)
    small = [c for c in range(n_classes) if 0 < counts[c] < MIN_PER_CLASS]
    if len(ok) < 2:
        if warnings is not None:
            warnings.append(f"label issues not scored: out-of-fold scoring needs two classes with at least "
                            f"{MIN_PER_CLASS} images each (image counts: "
                            + ", ".join(f"{names[c]} {counts[c]}" for c in range(n_classes)) + ")")
        return probs
    if small and warnings is not None:
        warnings.append(f"label issues not scored for {len(small)} class(es) with fewer than {MIN_PER_CLASS} "
                        "images: " + ", ".join(f"{names[c]} ({counts[c]})" for c in small)
                        + "; add images to score them")
    inside = np.isin(labels, ok)
    idx = np.flatnonzero(inside)
    k = int(max(2, min(folds, counts[ok].min())))
    probs[idx] = 0.0
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)

    def fold(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        train_idx, test_idx = split
        if exclude is not None:
            kept = train_idx[~exclude[idx[train_idx]]]
            if len(np.unique(labels[idx[kept]])) >= 2:  # else this fold trains on all its part
                train_idx = kept
        head = LogisticRegression(C=C, max_iter=300)
        head.fit(_unit_rows(emb, idx[train_idx]), labels[idx[train_idx]])
        return idx[test_idx], head.classes_, head.predict_proba(_unit_rows(emb, idx[test_idx]))

    # one BLAS thread per head: these fits are small, and multi-threaded BLAS on a busy 2-core machine
    # spins (measured: 61 s with the default threads vs 0.5 s with one, 1,000 images x 1,280 features);
    # the folds are independent, so they run side by side, one per core (1.75x on 2 cores, same result)
    splits = list(splitter.split(np.zeros((len(idx), 1)), labels[idx]))  # no copy of emb
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=min(len(splits), _cores())) as pool:
        for rows, classes, predicted in pool.map(fold, splits):
            probs[np.ix_(rows, classes)] = predicted
        rest = np.flatnonzero(~inside)
        if len(rest):
            head = LogisticRegression(C=C, max_iter=300)
            head.fit(_unit_rows(emb, idx), labels[idx])
            probs[rest] = 0.0
            probs[np.ix_(rest, head.classes_)] = head.predict_proba(_unit_rows(emb, rest))
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(axis=1, keepdims=True)


HEAD_C = 3.0  # the heads' inverse regularisation in `cleaned_out_of_fold_probs` (bench/clean_rank.py)
CLEANING_ROUNDS = 3  # head fits in `cleaned_out_of_fold_probs`: one on every label, then two refits
MIN_DROP, MAX_DROP = 0.05, 0.5  # the share the refits leave out: the estimated noise rate, kept in this range
MAX_DROP_PER_CLASS = 0.5  # never more than this share of one class's images
PAIR_PRIOR = 1.0  # images: `noise_aware_quality`'s pseudo-count for every (given, true) class pair


def noise_aware_quality(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, float]:
    """P(the given label is right | the photo, its given label), and the estimated share of wrong labels.

    Real label noise is asymmetric: a class flips into a few neighbours, at its own rate. cleanlab's
    `estimate_joint` (the calibrated confident joint) estimates Q[given, true] from the out-of-fold
    probabilities; with P(given | true) from its columns, Bayes' rule gives each image's posterior over
    its true class, P(true = j | x, given = y) ~ probs[j] * P(given = y | true = j). So a photo the heads
    find ambiguous between its label and a class that rarely flips into that label stays trusted, and
    one between its label and a class that often does is suspected (bench/clean.py, held out: precision@k
    0.797 / 0.815 at 20% / 40% asymmetric noise against 0.749 / 0.774 for normalized margin on the same
    probabilities). Classes must be 0..K-1,
    each present in `y`. Falls back to the given-class probability (rate: the argmax disagreement)
    where the joint cannot be estimated."""
    rows = np.arange(len(y))
    try:
        from cleanlab.count import estimate_joint

        joint = np.asarray(estimate_joint(y, probs), dtype=np.float64)  # rows: given, columns: true
        # a pseudo-count per class pair (Laplace): a pair the joint saw no flips in is unlikely, not impossible,
        # else on a small or clean set every posterior would be 1 and the ranking gone
        counts = joint * len(y) + PAIR_PRIOR
        given_if_true = counts / counts.sum(axis=0, keepdims=True)
        posterior = given_if_true[y] * probs
        posterior /= np.maximum(posterior.sum(axis=1, keepdims=True), 1e-12)
        return posterior[rows, y], float(1.0 - np.trace(joint))
    except Exception:  # noqa: BLE001 - tiny or degenerate sets
        return np.asarray(probs[rows, y], dtype=np.float64), float(np.mean(probs.argmax(axis=1) != y))


def leave_out_mask(labels: np.ndarray, most_suspicious: np.ndarray, n: int) -> np.ndarray:
    """The images a cleaning round's heads do not learn from: the first `n` of `most_suspicious` (indices, most
    suspicious first), never more than MAX_DROP_PER_CLASS of one class's images."""
    budget = (MAX_DROP_PER_CLASS * np.bincount(labels)).astype(int)
    exclude = np.zeros(len(labels), dtype=bool)
    for i in most_suspicious[:n]:
        if budget[labels[i]] > 0:
            exclude[i] = True
            budget[labels[i]] -= 1
    return exclude


def cleaned_out_of_fold_probs(emb: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0,
                              *, C: float = HEAD_C, rounds: int = CLEANING_ROUNDS,
                              warnings: list[str] | None = None,
                              class_names: Sequence[str] | None = None) -> np.ndarray:
    """Out-of-fold probabilities by iterative cleaning: round 1 fits the k-fold heads on every label; each
    later round estimates the noise (`noise_aware_quality`: which labels are likely wrong, and how many),
    refits the same folds without that many of the most suspicious (MIN_DROP..MAX_DROP of all, at most
    MAX_DROP_PER_CLASS of a class), so flipped labels no longer pull the heads towards them, and predicts
    every image out of fold again. Chosen on bench/clean_rank.py / bench/clean.py (seed 0) and checked on
    held-out seeds and on Fashion-MNIST (BENCHMARKS.md "clean")."""
    probs = out_of_fold_probs(emb, labels, n_classes, folds=folds, seed=seed, C=C, warnings=warnings,
                              class_names=class_names)
    ok = scorable_classes(labels, n_classes)
    inside = np.flatnonzero(np.isin(labels, ok))
    if rounds <= 1 or len(inside) < 2:
        return probs
    remap = np.full(n_classes, -1)
    remap[ok] = np.arange(len(ok))
    for _ in range(rounds - 1):
        sub = probs[inside][:, ok]
        quality, rate = noise_aware_quality(remap[labels[inside]], sub / sub.sum(axis=1, keepdims=True))
        exclude = leave_out_mask(labels, inside[np.argsort(quality, kind="stable")],
                                 int(np.clip(rate, MIN_DROP, MAX_DROP) * len(inside)))
        probs = out_of_fold_probs(emb, labels, n_classes, folds=folds, seed=seed, C=C, exclude=exclude)
    return probs


SCORES = ("noise_aware", "self_confidence", "normalized_margin", "knn_disagreement", "combined")
DEFAULT_SCORE = "noise_aware"  # the winner on bench/clean.py (BENCHMARKS.md): asymmetric noise, held-out seeds
BATCHED_ABOVE = 20000  # images: label issues found by cleanlab's batched finder (bounded memory)


def mixed_probs(probs: np.ndarray, knn_probs: np.ndarray | None, weight: float = 0.5) -> np.ndarray:
    """The `combined` score's probabilities: out-of-fold head probabilities averaged with the cosine-weighted
    class shares among the k nearest neighbours (`weight` of the latter)."""
    if knn_probs is None:
        return probs
    mixed = (1 - weight) * probs + weight * knn_probs
    return mixed / mixed.sum(axis=1, keepdims=True)


def label_scores(y: np.ndarray, probs: np.ndarray, knn_probs: np.ndarray | None = None,
                 disagreement: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every label-quality score in SCORES (low = suspicious; knn_disagreement as 1 - the fraction of
    neighbours that disagree) over scorable labels `y` and probabilities `probs` (rows sum to 1)."""
    from cleanlab.rank import get_label_quality_scores

    out = {"noise_aware": noise_aware_quality(y, probs)[0]}
    for method in ("self_confidence", "normalized_margin"):
        out[method] = get_label_quality_scores(y, probs, method=method)
    out["knn_disagreement"] = 1 - disagreement if disagreement is not None else out["self_confidence"].copy()
    out["combined"] = (get_label_quality_scores(y, mixed_probs(probs, knn_probs), method="self_confidence")
                       if knn_probs is not None else out["self_confidence"].copy())
    return out


def find_issues(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's label-issue mask: `find_label_issues` (prune by noise rate), or above BATCHED_ABOVE
    images its streaming `find_label_issues_batched` (bounded memory, same confident-learning rule)."""
    if len(y) > BATCHED_ABOVE:
        from cleanlab.experimental.label_issues_batched import find_label_issues_batched

        found = find_label_issues_batched(labels=y, pred_probs=probs, batch_size=10000, n_jobs=1, verbose=False)
        mask = np.zeros(len(y), dtype=bool)
        mask[found] = True
        return mask
    from cleanlab.filter import find_label_issues

    return find_label_issues(y, probs, filter_by="prune_by_noise_rate")


def label_issue_table(rel: Sequence[str], labels: Sequence[str], classes: Sequence[str], probs: np.ndarray,
                      splits: Sequence[str], *, knn_probs: np.ndarray | None = None,
                      disagreement: np.ndarray | None = None, score: str = DEFAULT_SCORE) -> list[dict[str, Any]]:
    """Every image with given, predicted, prob, score (label quality under `score`, one of SCORES:
    low = suspicious), each score of SCORES by name, and issue (cleanlab's flag), most suspicious first;
    images of classes too small to score come last with `scored` false and no issue.

    `knn_probs` (class shares among the k nearest neighbours) and `disagreement` (fraction of them with
    another label) come from the kNN graph (neighbours.py); without them the kNN scores fall back to
    self-confidence."""
    if score not in SCORES:
        raise ValueError(f"score {score!r}: one of {', '.join(SCORES)}")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels], dtype=np.int64)
    ok = scorable_classes(y, len(classes))
    inside = np.isin(y, ok)
    plain = probs[np.arange(len(y)), y].astype(np.float64)
    table = {name: plain.copy() for name in SCORES}
    flagged = np.zeros(len(y), dtype=bool)
    if inside.any():
        remap = np.full(len(classes), -1)
        remap[ok] = np.arange(len(ok))
        y_sub = remap[y[inside]]
        p_sub = probs[inside][:, ok]
        p_sub = p_sub / p_sub.sum(axis=1, keepdims=True)
        k_sub = None
        if knn_probs is not None:
            k_sub = knn_probs[inside][:, ok] + 1e-6
            k_sub = k_sub / k_sub.sum(axis=1, keepdims=True)
        try:
            for name, values in label_scores(y_sub, p_sub, k_sub, None if disagreement is None
                                             else disagreement[inside]).items():
                table[name][inside] = values
        except Exception:  # noqa: BLE001 - keep the plain given-class probability
            pass
        try:
            flagged[inside] = find_issues(y_sub, mixed_probs(p_sub, k_sub) if score == "combined" else p_sub)
        except Exception:  # tiny or degenerate sets: fall back to "the prediction disagrees"
            flagged[inside] = p_sub.argmax(1) != y_sub
    scores = table[score]
    order = np.lexsort((scores, ~inside))
    pred = probs.argmax(axis=1)
    rows = []
    for i in order.tolist():
        rows.append({"file": rel[i], "given": labels[i], "predicted": classes[pred[i]],
                     "prob": round(float(probs[i, pred[i]]), 5), "given_prob": round(float(probs[i, y[i]]), 5),
                     "score": round(float(scores[i]), 5), "issue": bool(flagged[i]), "split": splits[i],
                     "scored": bool(inside[i]),
                     **{name: round(float(table[name][i]), 5) for name in SCORES}})
    return rows


# ---------------------------------------------------------------- duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(rel: Sequence[str], labels: Sequence[str], splits: Sequence[str], sha: Sequence[str],
                     phash: Sequence[str], emb: np.ndarray, *, same_hash_bits: int = COPY_HASH_BITS,
                     max_hamming: int = 6, close_percentile: float = 99.0, min_cosine: float = 0.97,
                     neighbours: Neighbours | None = None) -> list[dict[str, Any]]:
    """Groups of exact (same sha256) or near copies; each says whether it crosses classes or train/valid.

    Near: embedding cosine >= `min_cosine`, or perceptual hashes within `same_hash_bits` bits, or within
    `max_hamming` bits for a pair whose cosine is above `close_percentile` of the set's nearest-neighbour
    cosines (unusually close for this data). A hash within 6 bits alone grouped different garments shot on
    the same floor (12 false groups in clothing-small, 82 in 3,000 Fashion-MNIST images; now none and 10), while
    resized and re-encoded copies keep hashes within 2 bits (BENCHMARKS.md).

    Near copies are looked for among each image's k nearest embedding neighbours (`neighbours`, the
    kNN graph; computed here when not given): O(n k) pairs, never all pairs."""
    n = len(rel)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, h in enumerate(sha):
        if h in first:
            uf.union(first[h], i)
        else:
            first[h] = i
    graph = neighbours if neighbours is not None else knn_graph(emb)
    if graph.k and n:
        codes = np.array([int(p, 16) if p else 0 for p in phash], dtype=np.uint64)
        has = np.array([bool(p) for p in phash])
        bits = np.bitwise_count(codes[:, None] ^ codes[graph.index])
        close = graph.cosine >= np.percentile(graph.cosine[:, 0], close_percentile)
        near = (graph.cosine >= min_cosine) | (bits <= same_hash_bits) | ((bits <= max_hamming) & close)
        near &= has[:, None] & has[graph.index]
        for a, j in zip(*np.nonzero(near), strict=True):
            uf.union(int(a), int(graph.index[a, j]))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    groups = []
    for idx in members.values():
        if len(idx) < 2:
            continue
        exact = len({sha[i] for i in idx}) == 1
        groups.append({"files": [rel[i] for i in idx], "labels": [labels[i] for i in idx],
                       "splits": [splits[i] for i in idx], "kind": "exact" if exact else "near",
                       "cross_class": len({labels[i] for i in idx}) > 1,
                       "leak": len({splits[i] for i in idx}) > 1})
    groups.sort(key=lambda g: (not g["leak"], not g["cross_class"], g["kind"] != "exact", g["files"][0]))
    return groups


# ---------------------------------------------------------------- outliers


def _percentile_rank(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks / max(1, len(values) - 1)


def outlier_table(rel: Sequence[str], labels: Sequence[str], classes: Sequence[str], emb: np.ndarray,
                  probs: np.ndarray, splits: Sequence[str], *, k: int = 5, z: float = 2.5,
                  neighbours: Neighbours | None = None) -> list[dict[str, Any]]:
    """Every image with an outlier score (0..1, high = unlike any class), most unusual first;
    `outlier` is true where the kNN distance is a robust-z > `z` above the median."""
    n = len(rel)
    graph = neighbours if neighbours is not None else knn_graph(emb, k)
    kk = min(k, graph.k)
    knn = 1 - graph.cosine[:, :kk].mean(axis=1) if kk else np.zeros(n)
    y = np.array([classes.index(c) for c in labels])
    sums = np.zeros((len(classes), emb.shape[1]))
    for start in range(0, n, 512):  # class sums in chunks: a memory-mapped matrix is read once
        np.add.at(sums, y[start : start + 512], np.asarray(emb[start : start + 512], np.float64))
    centroids = sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-9)
    centroid_dist = np.concatenate([1 - (np.asarray(emb[s_ : s_ + 512]) @ centroids.T).max(axis=1)
                                    for s_ in range(0, n, 512)]) if n else np.zeros(0)
    low_conf = 1 - probs.max(axis=1)
    score = 0.5 * _percentile_rank(knn) + 0.25 * _percentile_rank(centroid_dist) + 0.25 * _percentile_rank(low_conf)
    med = np.median(knn)
    mad = np.median(np.abs(knn - med)) * 1.4826 + 1e-9
    robust = (knn - med) / mad
    rows = [{"file": rel[i], "given": labels[i], "predicted": classes[int(probs[i].argmax())],
             "prob": round(float(probs[i].max()), 5), "score": round(float(score[i]), 5),
             "knn_distance": round(float(knn[i]), 5), "centroid_distance": round(float(centroid_dist[i]), 5),
             "outlier": bool(robust[i] > z), "split": splits[i]} for i in range(n)]
    rows.sort(key=lambda r: (-r["outlier"], -r["score"]))
    return rows


# ---------------------------------------------------------------- top losses from a trained model


def top_losses(spec: ClassifierSpec, raw: RawImages, *, model_dir: Path | None = None) -> list[dict[str, Any]]:
    """In-sample losses of the trained model (models/NAME), highest first; [] when there is no model."""
    from toolkit.core.artifacts import META_FILE
    from toolkit.core.images import open_image

    folder = Path(model_dir) if model_dir else spec.models_dir
    if not (folder / META_FILE).is_file():
        return []
    predictor = load_predictor(folder, device="cpu")  # a model or an ensemble
    paths = task_of_meta(predictor.meta).folder_classes(predictor.meta)  # class folder -> model class
    folder_of = {path: name for name, path in paths.items()}
    idx = [i for i, y in enumerate(raw.labels) if paths.get(y, y) in predictor.classes]
    rows = []
    for start in range(0, len(idx), 64):
        chunk = idx[start : start + 64]
        images = [open_image(raw.files[i], draft_size=predictor.size) for i in chunk]
        probs = predictor.predict_images(images)
        for i, p in zip(chunk, probs, strict=False):
            given = predictor.classes.index(paths.get(raw.labels[i], raw.labels[i]))
            pred = int(p.argmax())
            predicted = predictor.classes[pred]
            rows.append({"file": relname(raw.root, raw.files[i]), "given": raw.labels[i],
                         "predicted": folder_of.get(predicted, predicted), "prob": round(float(p[pred]), 5),
                         "loss": round(float(-np.log(max(float(p[given]), 1e-12))), 5),
                         "score": round(float(p[given]), 5), "split": raw.split_of(i)})
    rows.sort(key=lambda r: -r["loss"])
    return rows


# ---------------------------------------------------------------- everything at once


@dataclass
class Rankings:
    root: Path
    classes: list[str]
    label_issues: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    broken: list[dict[str, str]]
    top_losses: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # row i = the i-th raw image (RawImages.files order): L2-normalised, for maps and similarity
    # (may be a read-only np.memmap over the embeddings cache)
    embeddings: np.ndarray | None = None
    # every image with `issues` (list of quality.KINDS) and its stats, flagged first: see quality.py
    quality: list[dict[str, Any]] = field(default_factory=list)
    # class pairs mixed up in the confident joint, largest mass first, with `merge` hints: see confusion.py
    confusion: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The CLI's --json object: files relative to the raw root. `quality`: flagged images only
        ({file, issues}); `confusion`: the pairs ({classes, a_as_b, b_as_a, merge})."""
        return {
            "label_issues": [{k: r[k] for k in ("file", "given", "predicted", "prob", "score")}
                             for r in self.label_issues if r["issue"]],
            "duplicates": [g["files"] for g in self.duplicates],
            "outliers": [{"file": r["file"], "score": r["score"]} for r in self.outliers if r["outlier"]],
            "quality": [{"file": r["file"], "issues": r["issues"]} for r in self.quality if r["issues"]],
            "confusion": [{k: p[k] for k in ("classes", "a_as_b", "b_as_a", "merge")} for p in self.confusion],
        }


def rank(spec: ClassifierSpec, data: Path | None = None, *, size: int | None = None, arch: str | None = None,
         folds: int = 5, with_model: bool = True, raw: RawImages | None = None,
         progress: Callable[[str], None] | None = None,
         on_progress: Callable[[float, str], None] | None = None, processes: int = 1) -> Rankings:
    """Compute every ranking for the classifier's raw images (embeddings cached under cleaned_data/NAME/.cache;
    `size` defaults to the section's `clean_size`).

    `progress(message)` hears each step; `on_progress(fraction, message)` also hears how far the whole
    computation is (0..1; the embeddings are most of it), for a percentage bar. `processes` > 1 shards
    the embedding of new images across that many processes (`toolkit clean NAME --report --processes N`)."""
    import time

    def say(message: str, fraction: float | None = None) -> None:
        if progress:
            progress(message)
        if on_progress and fraction is not None:
            on_progress(fraction, message)

    say("listing and verifying images", 0.0)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = raw or list_raw_images(spec, data)
    times["list_verify"] = time.perf_counter() - t0
    rel = raw.rel
    splits = ["valid" if v else "train" for v in raw.is_valid]
    t0 = time.perf_counter()
    say(f"embedding {len(raw.files)} images", 0.02)

    def embedded(done: int, total: int) -> None:
        if on_progress:
            on_progress(0.02 + 0.83 * done / max(total, 1), f"embedding images: {done} of {total} new")

    out = embed(raw.files, arch=arch or spec.arch, size=size or spec.clean_size, cache_dir=spec.cleaned_dir / ".cache",
                progress=embedded, processes=processes)
    emb, phash, sha = out.embeddings, out.phash, out.sha256
    times["embeddings"] = time.perf_counter() - t0
    y = np.array([raw.classes.index(c) for c in raw.labels], dtype=np.int64)
    warnings: list[str] = []
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # small matrix products: one BLAS thread is fastest on a busy machine
        t0 = time.perf_counter()
        say("nearest neighbours", 0.85)
        graph = knn_graph(emb, seed=spec.seed)
        times["neighbours"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say("out-of-fold label issues", 0.88)
        probs = cleaned_out_of_fold_probs(out.features, y, len(raw.classes), folds=folds, seed=spec.seed,
                                          warnings=warnings, class_names=raw.classes)
        issues = label_issue_table(rel, raw.labels, raw.classes, probs, splits,
                                   knn_probs=knn_label_probs(graph, y, len(raw.classes)),
                                   disagreement=knn_disagreement(graph, y))
        confusion = confusion_pairs(rel, y, raw.classes, probs, scorable_classes(y, len(raw.classes)))
        times["label_issues"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say("duplicates", 0.92)
        dups = duplicate_groups(rel, raw.labels, splits, sha, phash, emb, neighbours=graph)
        times["duplicates"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = outlier_table(rel, raw.labels, raw.classes, emb, probs, splits, neighbours=graph)
        quality = quality_table(rel, raw.labels, splits, out.stats)
        times["outliers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say("top losses of the trained model", 0.95)
    losses = top_losses(spec, raw) if with_model else []
    times["top_losses"] = time.perf_counter() - t0
    say("done", 1.0)
    return Rankings(raw.root, raw.classes, issues, dups, outs, raw.broken, losses, times, warnings, embeddings=emb,
                    quality=quality, confusion=confusion)


def write_report(rankings: Rankings, folder: Path) -> dict[str, Path]:
    """CSV per ranking plus one report.json under `folder` (cleaned_data/NAME)."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"label_issues": rankings.label_issues, "outliers": rankings.outliers,
              "top_losses": rankings.top_losses, "broken": rankings.broken,
              "duplicates": [{"group": g, "file": f, "label": lab, "split": s, "kind": d["kind"],
                              "cross_class": d["cross_class"], "leak": d["leak"]}
                             for g, d in enumerate(rankings.duplicates)
                             for f, lab, s in zip(d["files"], d["labels"], d["splits"], strict=False)],
              "quality": [{**r, "issues": ";".join(r["issues"])} for r in rankings.quality],
              "confusion": [{**p, "classes": " / ".join(p["classes"]),
                             "examples_a_as_b": ";".join(p["examples_a_as_b"]),
                             "examples_b_as_a": ";".join(p["examples_b_as_a"])} for p in rankings.confusion]}
    for name, rows in tables.items():
        path = folder / f"report-{name}.csv"
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            if rows:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, path)  # a reader (or a crash) sees the old report or the new one
        written[name] = path
    full = {**rankings.summary(), "all": {"label_issues": rankings.label_issues, "outliers": rankings.outliers,
                                          "top_losses": rankings.top_losses, "broken": rankings.broken,
                                          "quality": rankings.quality},
            "duplicate_groups": rankings.duplicates, "confusion_pairs": rankings.confusion,
            "root": str(rankings.root), "classes": rankings.classes,
            "seconds": {k: round(v, 2) for k, v in rankings.seconds.items()}, "warnings": rankings.warnings}
    path = folder / "report.json"
    tmp = folder / f".report.json.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:  # streamed: no second copy of the report as one string
        json.dump(full, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)
    written["json"] = path
    return written


def flip_labels(labels: Sequence[str], classes: Sequence[str], fraction: float,
                seed: int) -> tuple[list[str], list[int]]:
    """A copy of `labels` with `fraction` of them changed to another class at random (seeded)."""
    rng = random.Random(seed)
    n = max(1, round(len(labels) * fraction))
    idx = sorted(rng.sample(range(len(labels)), n))
    out = list(labels)
    for i in idx:
        out[i] = rng.choice([c for c in classes if c != labels[i]])
    return out, idx
