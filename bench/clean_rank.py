"""Ranking study for issue 14: which label-error score finds asymmetric flips best on clothing-small.

Features: pooled body features of all of clothing-small train (3,068 photos), computed once and kept
as .npy under --features (the default `toolkit clean` embedding = efficientnet_lite0 @ 128, average
pooling; variants: horizontal-flip TTA, max pooling, 224 px, efficientnet_lite2, concatenations).
Noise: bench/clean.py's `asymmetric_noise` (each class into its 1 or 2 nearest class centroids of the
default embedding, seeded), so every variant sees the same flipped labels for a seed.

Scores (suspicion, high = flipped): the toolkit's out-of-fold normalized margin (the default before
this study) and self-confidence, kNN disagreement, cleanlab's default `find_label_issues` (a set:
precision / recall), and the variants named in CONFIGS (head C, standardisation, folds, iterative
cleaning: drop the round's top flagged from the heads' training folds, refit, re-score).

Protocol (not tuned to one split): `--select-seeds 0` chooses the best config by mean precision@k over
both noise rates; `--seeds 1,2` reports every config held out. Last line: RESULT {json}.
Usage: python bench/clean_rank.py [--features DIR] [--variants a,b] [--configs x,y] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from clean import DATA, asymmetric_noise, figures  # noqa: E402

from toolkit.data import list_labelled_images  # noqa: E402

BASE = "efficientnet_lite0_128_avg"


def compute_features(out: Path, arch: str, size: int) -> None:
    """avg / max pooled body features of every photo and of its horizontal flip (favg / fmax), as .npy."""
    import torch

    from toolkit.core.images import load_squished
    from toolkit.stages.clean.embeddings import _model

    name = f"{arch}_{size}"
    if (out / f"{name}_avg.npy").exists():
        return
    files, _ = list_labelled_images(DATA)
    t0 = time.perf_counter()
    body, mean, std = _model(arch)
    res: dict[str, list[np.ndarray]] = {k: [] for k in ("avg", "max", "favg", "fmax")}
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for s in range(0, len(files), 32):
            x = torch.from_numpy(np.stack(list(pool.map(lambda f: load_squished(f, size), files[s : s + 32]))))
            x = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
            for pre, inp in (("", x), ("f", torch.flip(x, dims=[3]))):
                fm = body(inp)
                res[pre + "avg"].append(fm.mean(dim=(2, 3)).numpy())
                res[pre + "max"].append(fm.amax(dim=(2, 3)).numpy())
    for k, v in res.items():
        np.save(out / f"{name}_{k}.npy", np.concatenate(v).astype(np.float32))
    print(f"features {name}: {time.perf_counter() - t0:.1f} s for {len(files)} photos and their flips", flush=True)


def l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


def variant(out: Path, spec: str) -> np.ndarray:
    """A feature variant: parts joined by '+', each ARCH_SIZE_POOL with POOL in avg, max, tta (avg of the
    photo and its flip), tta2 (avg and max of both); every part L2-normalised, then the whole."""
    parts = []
    for part in spec.split("+"):
        stem, pool = part.rsplit("_", 1)
        load = lambda k, stem=stem: l2(np.load(out / f"{stem}_{k}.npy"))  # noqa: E731
        if pool == "tta":
            parts.append(l2(load("avg") + load("favg")))
        elif pool == "tta2":
            parts.append(l2(np.hstack([l2(load("avg") + load("favg")), l2(load("max") + load("fmax"))])))
        else:
            parts.append(load(pool))
    return l2(np.hstack(parts)).astype(np.float32)


def oof(x: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = 5, C: float = 1.0, seed: int = 0,
        standardise: bool = False, exclude: np.ndarray | None = None, balanced: bool = False) -> np.ndarray:
    """Out-of-fold probabilities of logistic-regression heads; `exclude` (bool mask) rows never train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        if exclude is not None:
            tr = tr[~exclude[tr]]
        head = LogisticRegression(C=C, max_iter=500, class_weight="balanced" if balanced else None)
        model = make_pipeline(StandardScaler(), head) if standardise else head
        model.fit(x[tr], y[tr])
        probs[np.ix_(te, head.classes_)] = model.predict_proba(x[te])
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(1, keepdims=True)


def margin(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    from cleanlab.rank import get_label_quality_scores

    return 1 - get_label_quality_scores(y, probs, method="normalized_margin")


def knn_dis(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    from toolkit.stages.clean.neighbours import knn_disagreement, knn_graph

    return knn_disagreement(knn_graph(x, k), y)


def pct(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r / max(1, len(v) - 1)


def run_config(name: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """The suspicion of config `name` (see CONFIGS)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    kw = dict(CONFIGS[name])
    kind = kw.pop("kind", "margin")
    rounds = kw.pop("rounds", 1)
    drop = kw.pop("drop", "cleanlab")
    alpha, k = kw.pop("alpha", 0.3), kw.pop("k", 10)
    probs = oof(x, y, n_classes, seed=seed, **kw) if kind != "knn" else None
    if kind == "selfconf":
        return 1 - get_label_quality_scores(y, probs, method="self_confidence")
    if kind == "knn":
        return knn_dis(x, y, k)
    if kind == "smooth":  # each image's probabilities averaged with its neighbours' (out-of-fold too)
        from toolkit.stages.clean.neighbours import knn_graph

        graph = knn_graph(x, 10)
        probs = (1 - alpha) * probs + alpha * probs[graph.index].mean(axis=1)
    s = margin(y, probs)
    if kind == "margin+knn":
        return 0.5 * pct(s) + 0.5 * pct(knn_dis(x, y, 10))
    for _ in range(rounds - 1):
        if drop == "cleanlab":
            excl = find_label_issues(y, probs)
        else:  # a fraction of the ranking
            excl = np.zeros(len(y), bool)
            excl[np.argsort(-s)[: int(float(drop) * len(y))]] = True
        probs = oof(x, y, n_classes, seed=seed, exclude=excl, **kw)
        s = margin(y, probs)
    return s


CONFIGS: dict[str, dict] = {
    "margin_C1": {},  # the toolkit's default before this study (rank.out_of_fold_probs, C=1, 5 folds)
    "selfconf_C1": {"kind": "selfconf"},
    "knn10": {"kind": "knn", "k": 10},
    "margin+knn10": {"kind": "margin+knn"},
    "margin_C3": {"C": 3.0},
    "margin_C10": {"C": 10.0},
    "margin_C0.3": {"C": 0.3},
    "margin_std_C0.05": {"standardise": True, "C": 0.05},
    "margin_C1_10fold": {"folds": 10},
    "iter2_C1": {"rounds": 2},
    "iter3_C1": {"rounds": 3},
    "iter2_C3": {"rounds": 2, "C": 3.0},
    "iter2_C3_drop0.1": {"rounds": 2, "C": 3.0, "drop": "0.1"},
    "iter2_C3_drop0.05": {"rounds": 2, "C": 3.0, "drop": "0.05"},
    "iter2_C3_drop0.2": {"rounds": 2, "C": 3.0, "drop": "0.2"},
    "iter3_C3_drop0.1": {"rounds": 3, "C": 3.0, "drop": "0.1"},
    "iter2_C1_drop0.1": {"rounds": 2, "drop": "0.1"},
    "iter2_C1_drop0.2": {"rounds": 2, "drop": "0.2"},
    "margin_C3_10fold": {"C": 3.0, "folds": 10},
    "margin_C3_balanced": {"C": 3.0, "balanced": True},
    "smooth0.3_C3": {"kind": "smooth", "C": 3.0, "alpha": 0.3},
    "smooth0.5_C3": {"kind": "smooth", "C": 3.0, "alpha": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", default="/tmp/rank-feats")
    parser.add_argument("--compute", default="efficientnet_lite0@128", help="ARCH@SIZE,... to compute if absent")
    parser.add_argument("--variants", default=BASE)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rates", default="0.2,0.4")
    args = parser.parse_args()
    import torch
    from cleanlab.filter import find_label_issues
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(2)
    out = Path(args.features)
    out.mkdir(parents=True, exist_ok=True)
    for item in filter(None, args.compute.split(",")):
        arch, size = item.split("@")
        compute_features(out, arch, int(size))
    _, labels = list_labelled_images(DATA)
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    base = variant(out, BASE)
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            noisy, flipped, _ = asymmetric_noise(y, base, len(classes), rate, seed)
            for vname in args.variants.split(","):
                x = variant(out, vname)
                for cname in args.configs.split(","):
                    t0 = time.perf_counter()
                    with threadpool_limits(1):
                        s = run_config(cname, x, noisy, len(classes), seed)
                    f = figures(s, flipped)
                    row = {"rate": rate, "seed": seed, "variant": vname, "config": cname, **f,
                           "seconds": round(time.perf_counter() - t0, 2)}
                    if cname == "margin_C1":  # cleanlab's default find_label_issues on the same probabilities
                        with threadpool_limits(1):
                            mask = find_label_issues(noisy, oof(x, noisy, len(classes), seed=seed))
                        hits = int(mask[flipped].sum())
                        row["cleanlab_set"] = {"flagged": int(mask.sum()),
                                               "precision": round(hits / max(1, int(mask.sum())), 3),
                                               "recall": round(hits / len(flipped), 3)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        key = f"{r['variant']} | {r['config']}"
        table.setdefault(key, {}).setdefault(str(r["rate"]), [])
        table[key][str(r["rate"])].append(r["precision_at_k"])
    mean = {k: {rate: round(float(np.mean(v)), 3) for rate, v in d.items()} for k, d in table.items()}
    for k, d in sorted(mean.items(), key=lambda kv: -np.mean(list(kv[1].values()))):
        print(f"{k:60s} " + "  ".join(f"{rate}: {v:.3f}" for rate, v in d.items()))
    print("RESULT " + json.dumps({"seeds": args.seeds, "mean_precision_at_k": mean, "rows": rows}))


if __name__ == "__main__":
    main()
