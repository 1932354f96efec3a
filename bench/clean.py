"""Benchmark: finding flipped labels in clothing-small, the fastai way vs the toolkit's out-of-fold ranking.

clothing-small train, a seeded random subsample (default 1,000 images, to stay within ~15 minutes on
2 CPU cores), 10% of labels flipped to another class (seeded). Both methods see the same noisy
labels at the same image size and report precision and recall at k = number flipped, and wall time.

(a) fastai: Learner (the toolkit's EfficientNet-Lite0 body + fastai head, as `vision_learner`
    builds it) `fine_tune(1)` on a random 80/20 split, then the losses of every image in train and
    valid (what ImageClassifierCleaner shows), highest first;
(b) toolkit: pretrained embeddings (cold: no cache) + 5-fold logistic-regression heads ->
    out-of-fold probabilities -> cleanlab label quality scores, lowest first.

Usage: python bench/clean.py [--n 1000] [--size 128] [--seed 0] [--skip-fastai]. Last line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolkit.data import list_labelled_images  # noqa: E402
from toolkit.stages.clean.embeddings import compute_embeddings  # noqa: E402
from toolkit.stages.clean.rank import flip_labels, label_issue_table, out_of_fold_probs  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "clothing-small" / "train"


def precision_recall(ranked: list[int], flipped: set[int]) -> tuple[float, float]:
    k = len(flipped)
    hits = len(set(ranked[:k]) & flipped)
    return hits / k, hits / k  # at k = #flipped, precision equals recall


def fastai_way(files, labels, classes, size: int, seed: int) -> list[int]:
    import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fine_tune)
    import torch
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from toolkit.core.backbones import body_head_split, create_model, get_backbone
    from toolkit.core.config import split_random
    from toolkit.data import Dataset, make_dataloaders

    torch.manual_seed(seed)
    is_valid = split_random(len(files), 0.2, seed)
    dataset = Dataset(Path(DATA), list(files), list(labels), is_valid, list(classes))
    backbone = get_backbone("efficientnet_lite0")
    dls = make_dataloaders(dataset, size, 32, backbone.mean, backbone.std, seed=seed, progress=False)
    learn = Learner(dls, create_model("efficientnet_lite0", len(classes)), loss_func=CrossEntropyLossFlat(),
                    metrics=accuracy, splitter=body_head_split)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, base_lr=2e-3)
        losses = {}
        for ds_idx, idx in ((0, [i for i, v in enumerate(is_valid) if not v]),
                            (1, [i for i, v in enumerate(is_valid) if v])):
            dl = learn.dls[ds_idx].new(shuffle=False, drop_last=False)
            _, _, loss = learn.get_preds(dl=dl, with_loss=True)
            order = [files.index(f) for f in dl.items] if len(dl.items) == len(idx) else idx
            for i, value in zip(order, loss.tolist(), strict=True):
                losses[i] = value
    return sorted(losses, key=lambda i: -losses[i])


def toolkit_way(files, labels, classes, size: int, seed: int) -> list[int]:
    emb, _, _ = compute_embeddings(files, arch="efficientnet_lite0", size=size, cache_dir=None)
    y = np.array([classes.index(c) for c in labels])
    probs = out_of_fold_probs(emb, y, len(classes), folds=5, seed=seed)
    rel = [str(i) for i in range(len(files))]
    rows = label_issue_table(rel, labels, classes, probs, ["train"] * len(files))
    return [int(r["file"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fastai", action="store_true", help="time only the out-of-fold ranking")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    files, labels = list_labelled_images(DATA)
    rng = random.Random(args.seed)
    pick = sorted(rng.sample(range(len(files)), min(args.n, len(files))))
    files, true = [files[i] for i in pick], [labels[i] for i in pick]
    classes = sorted(set(true))
    noisy, flipped_idx = flip_labels(true, classes, 0.10, seed=args.seed)
    flipped = set(flipped_idx)
    print(f"{len(files)} images of clothing-small train, {len(classes)} classes, {len(flipped)} labels flipped, "
          f"{args.size}px", flush=True)

    start = time.perf_counter()
    ranked_b = toolkit_way(files, noisy, classes, args.size, args.seed)
    time_b = time.perf_counter() - start
    pb, rb = precision_recall(ranked_b, flipped)
    print(f"(b) out-of-fold: precision@k {pb:.3f} recall@k {rb:.3f} in {time_b:.1f} s", flush=True)

    if args.skip_fastai:
        print("RESULT " + json.dumps({"n": len(files), "flipped": len(flipped), "size": args.size, "out_of_fold": {
            "precision_at_k": round(pb, 3), "recall_at_k": round(rb, 3), "seconds": round(time_b, 1)}}))
        return
    start = time.perf_counter()
    ranked_a = fastai_way(files, noisy, classes, args.size, args.seed)
    time_a = time.perf_counter() - start
    pa, ra = precision_recall(ranked_a, flipped)
    print(f"(a) fastai fine_tune(1) + top losses: precision@k {pa:.3f} recall@k {ra:.3f} in {time_a:.1f} s",
          flush=True)

    result = {"n": len(files), "classes": len(classes), "flipped": len(flipped), "size": args.size,
              "fastai": {"precision_at_k": round(pa, 3), "recall_at_k": round(ra, 3), "seconds": round(time_a, 1)},
              "out_of_fold": {"precision_at_k": round(pb, 3), "recall_at_k": round(rb, 3),
                              "seconds": round(time_b, 1), "seconds_per_1000": round(time_b * 1000 / len(files), 1)},
              "time_ratio_fastai_over_oof": round(time_a / time_b, 2)}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
