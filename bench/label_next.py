"""Benchmark: "label next" (toolkit.stages.feedback: uncertainty = 1 - normalized margin, spread out by
weighted k-center away from the labelled images) against two baselines measured in the same run:
uncertainty alone (most uncertain first) and random picks.

Pool-based active learning on clothing-small (10 classes): embeddings of N training photos per class
(the cleaning app's embedder and cache, `compute_embeddings`); 2 labelled photos per class to start;
each round a logistic-regression head on the labelled embeddings (bench/probe.py's) stands in for
"the current model",
each strategy picks the next K photos to label from the pool, and validation accuracy (every
validation photo) is measured after each round. The figure of merit is the mean validation
accuracy over the rounds (the area under the learning curve), averaged over --seeds start sets;
ratios are against random.
Last line: RESULT {json}.

Usage: python bench/label_next.py [--per-class 40] [--rounds 5] [--k 20] [--size 96] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"


def head(x, y):
    """bench/probe.py's head: standardised features, a logistic regression (C=0.05)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(x, y)


def run(strategy: str, emb, y, x_valid, y_valid, start: list[int], rounds: int, k: int, seed: int) -> list[float]:
    import numpy as np

    from toolkit.stages.feedback import diverse_order, margins

    rng = np.random.default_rng(seed)
    labelled = list(start)
    curve = []
    for _ in range(rounds + 1):
        model = head(emb[labelled], y[labelled])
        curve.append(float((model.predict(x_valid) == y_valid).mean()))
        pool = np.setdiff1d(np.arange(len(y)), labelled)
        if strategy == "random":
            picks = rng.choice(pool, size=k, replace=False)
        else:
            uncertainty = 1.0 - margins(model.predict_proba(emb[pool]))
            if strategy == "uncertainty":
                picks = pool[np.argsort(-uncertainty, kind="stable")[:k]]
            else:  # label next, as the app orders the images
                picks = pool[diverse_order(emb[pool], uncertainty + 1e-3, emb[labelled])[:k]]
        labelled += [int(i) for i in picks]
    return curve


def main() -> None:
    import numpy as np

    from toolkit.stages.clean.embeddings import compute_embeddings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=5, help="start sets (and random picks) averaged over")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench-label-next-cache"),
                        help="the embedding cache (a rerun embeds nothing)")
    args = parser.parse_args()
    classes = sorted(p.name for p in (DATA / "train").iterdir())
    rng = random.Random(0)
    pool, valid = [], []
    for index, name in enumerate(classes):
        files = sorted((DATA / "train" / name).iterdir())
        rng.shuffle(files)
        pool += [(f, index) for f in files[:args.per_class]]
        valid += [(f, index) for f in sorted((DATA / "validation" / name).iterdir())]
    y, y_valid = np.array([c for _, c in pool]), np.array([c for _, c in valid])
    started = time.time()
    emb, _, _ = compute_embeddings([f for f, _ in pool] + [f for f, _ in valid], size=args.size,
                                   cache_dir=Path(args.cache))
    emb = np.array(emb)
    x, x_valid = emb[:len(pool)], emb[len(pool):]
    print(f"clothing-small: pool {len(pool)} ({args.per_class} per class), {len(valid)} validation; embedded in "
          f"{time.time() - started:.0f} s at {args.size} px", flush=True)
    curves: dict[str, list] = {"label next": [], "uncertainty": [], "random": []}
    for seed in range(args.seeds):  # each seed: another start set (2 photos per class), other random picks
        pick = np.random.default_rng(seed)
        start = [int(i) for c in range(len(classes)) for i in pick.choice(np.flatnonzero(y == c), 2, replace=False)]
        for name, strategy in (("label next", "label_next"), ("uncertainty", "uncertainty"), ("random", "random")):
            curves[name].append(run(strategy, x, y, x_valid, y_valid, start, args.rounds, args.k, seed))
    curves = {name: [float(v) for v in np.mean(runs, axis=0)] for name, runs in curves.items()}
    base = float(np.mean(curves["random"]))
    rows = []
    for name, curve in curves.items():
        area = float(np.mean(curve))
        rows.append({"strategy": name, "curve": [round(v, 4) for v in curve], "mean_accuracy": round(area, 4),
                     "final_accuracy": round(curve[-1], 4), "vs_random": round(area / base, 3)})
        print(f"{name:<12} labelled {len(start)}..{len(start) + args.rounds * args.k} (mean of {args.seeds} starts): "
              + " ".join(f"{v:.1%}" for v in curve)
              + f"  mean {area:.2%} ({area / base:.3f}x random's)", flush=True)
    print("RESULT " + json.dumps({"per_class": args.per_class, "rounds": args.rounds, "k": args.k, "size": args.size,
                                  "seeds": args.seeds,
                                  "n_valid": len(valid), "rows": rows}))


if __name__ == "__main__":
    main()
