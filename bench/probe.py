"""Benchmark: head-only probes, backbone x image size, on clothing-small (which body to default to).

For each (backbone, size): pooled body features (concat max + average pooling, as the fastai head
sees them; channels-last, bf16 where the CPU has it) of the training photos (N per class, or all
with --per-class 0) and of every validation photo, squished to size as the predictor loads them
(`toolkit.learn.image_features`: each image and its mirror image); a standardised logistic
regression on them. With --flip the mirrored training features are extra training rows (what
`toolkit train`'s cached frozen phase trains on) and the evaluation also reports flip TTA (the
mean of the plain and mirrored probabilities). Second check that does not use validation:
--folds-fold stratified cross-validation on the training photos (seeded; an image's mirror stays in
its fold). Also the body's images/s. The baseline is the first configuration, measured in the same
run; ratios are of its figures. --cache DIR keeps the features (npz per configuration) so a second
run only refits. Last line: RESULT {json}.

Usage: python bench/probe.py [--per-class 60] [--folds 2] [--flip] [--cache DIR]
                             [--configs efficientnet_lite0@224,efficientnet_lite2@260]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"


def features(arch: str, files: list[Path], size: int, cache: Path | None, tag: str):
    """(plain, mirrored) pooled features of `files` and the seconds the body took (0 when cached)."""
    import numpy as np

    path = cache / f"{arch}@{size}-{tag}-{len(files)}.npz" if cache else None
    if path is not None and path.is_file():
        saved = np.load(path)
        return saved["plain"], saved["flip"], 0.0
    import torch

    from toolkit.core.backbones import ConcatPool, FlattenBatch, get_backbone
    from toolkit.learn import image_features

    backbone = get_backbone(arch)
    body = backbone.create_body(pretrained=True)
    started = time.time()
    pool = torch.nn.Sequential(ConcatPool(), FlattenBatch())  # the final features alone (head_features = final)
    plain, flip = image_features(body, pool, files, size, backbone.mean, backbone.std)
    seconds = time.time() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, plain=plain, flip=flip)
        tmp.replace(path)  # atomic: a killed run leaves no half file
    return plain, flip, seconds


def probe(train: tuple, y_train, valid: tuple, y_valid, *, flip: bool, folds: int, c: float,
          seed: int = 0) -> dict[str, float]:
    """Validation accuracy (plain and flip TTA) and the train cross-validation figures."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(rows):
        x = np.concatenate([train[0][rows], train[1][rows]]) if flip else train[0][rows]
        y = np.concatenate([y_train[rows], y_train[rows]]) if flip else y_train[rows]
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)

    def score(model, x_plain, x_flip, y):
        p = model.predict_proba(x_plain)
        tta = (p + model.predict_proba(x_flip)) / 2
        return float((p.argmax(1) == y).mean()), float((tta.argmax(1) == y).mean())

    model = fit(np.arange(len(y_train)))
    valid_plain, valid_tta = score(model, valid[0], valid[1], y_valid)
    cv_plain, cv_tta = [], []
    for a, b in StratifiedKFold(folds, shuffle=True, random_state=seed).split(train[0], y_train):
        plain, tta = score(fit(a), train[0][b], train[1][b], y_train[b])
        cv_plain.append(plain)
        cv_tta.append(tta)
    return {"valid": valid_plain, "valid_tta": valid_tta, "cv": float(np.mean(cv_plain)),
            "cv_tta": float(np.mean(cv_tta))}


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60, help="training photos per class (0: all)")
    parser.add_argument("--folds", type=int, default=2, help="cross-validation folds on the training photos")
    parser.add_argument("--flip", action="store_true", help="mirrored training rows, and flip TTA figures")
    parser.add_argument("--c", type=float, default=0.05, help="logistic regression's inverse regularisation")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the features (npz per config)")
    parser.add_argument("--configs", default="efficientnet_lite0@224,efficientnet_lite0@288,efficientnet_lite1@240,"
                                             "efficientnet_lite1@288,efficientnet_lite2@260,efficientnet_lite2@288")
    args = parser.parse_args()
    classes = sorted(p.name for p in (DATA / "train").iterdir())
    rng = random.Random(0)
    train, valid = [], []
    for index, name in enumerate(classes):
        files = sorted((DATA / "train" / name).iterdir())
        rng.shuffle(files)
        train += [(f, index) for f in (files[:args.per_class] if args.per_class else files)]
        valid += [(f, index) for f in sorted((DATA / "validation" / name).iterdir())]
    y_train, y_valid = np.array([y for _, y in train]), np.array([y for _, y in valid])
    print(f"clothing-small: {len(train)} train ({args.per_class or 'all'} per class), {len(valid)} validation; "
          f"{args.folds}-fold CV on train, C {args.c}, flip {args.flip}", flush=True)
    rows = []
    for config in args.configs.split(","):
        arch, size = config.split("@")
        started = time.time()
        *x_train, t_train = features(arch, [f for f, _ in train], int(size), args.cache, "train")
        *x_valid, t_valid = features(arch, [f for f, _ in valid], int(size), args.cache, "valid")
        body_s = t_train + t_valid
        figures = probe(x_train, y_train, x_valid, y_valid, flip=args.flip, folds=args.folds, c=args.c)
        speed = 2 * (len(train) + len(valid)) / body_s if body_s else None
        rows.append({"arch": arch, "size": int(size), **{k: round(v, 4) for k, v in figures.items()},
                     "body_images_per_s": round(speed, 1) if speed else None, "body_s": round(body_s, 1),
                     "wall_s": round(time.time() - started, 1)})
        base = rows[0]
        print(f"{arch:<20} {size:>4} px  valid {figures['valid']:.2%} (flip TTA {figures['valid_tta']:.2%})  "
              f"train {args.folds}-fold {figures['cv']:.2%} (TTA {figures['cv_tta']:.2%})  "
              f"body {speed or 0:.1f} img/s, {body_s:.0f} s; vs baseline: valid "
              f"{(figures['valid'] - base['valid']) * 100:+.1f}, CV {(figures['cv'] - base['cv']) * 100:+.1f} "
              f"points", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB; baseline {rows[0]['arch']} @ {rows[0]['size']} px")
    print("RESULT " + json.dumps({"per_class": args.per_class, "n_train": len(train), "n_valid": len(valid),
                                  "folds": args.folds, "flip": args.flip, "c": args.c, "rows": rows,
                                  "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
