"""Benchmark: head-only probes, backbone x image size, on clothing-small (which body to default to).

For each (backbone, size): pooled body features (concat max + average pooling, as the fastai head
sees them; channels-last, bf16 where the CPU has it) of N training photos per class and of every
validation photo, squished to size; a logistic regression (scikit-learn, standardised features)
on them. Prints validation accuracy, a second check that does not use validation (2-fold
cross-validation on the training subset, seeded) and the body's images/s. The baseline is the
first configuration (the current default backbone), measured in the same run; ratios are of its
images/s. Last line: RESULT {json}.

Usage: python bench/probe.py [--per-class 60] [--configs efficientnet_lite0@224,efficientnet_lite2@260]
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


def load(files: list[Path], size: int):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files])


def features(arch: str, pixels, bs: int = 32):
    import torch

    from toolkit.core.backbones import get_backbone
    from toolkit.learn import pooled_features

    backbone = get_backbone(arch)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std).view(1, 3, 1, 1) * 255
    batches = []
    for i in range(0, len(pixels), bs):
        x = torch.from_numpy(pixels[i:i + bs]).permute(0, 3, 1, 2).float()
        batches.append(((x - mean) / std, torch.zeros(len(x), dtype=torch.long)))
    body = backbone.create_body(pretrained=True)
    started = time.time()
    feats, _ = pooled_features(body, batches)
    return feats.numpy(), time.time() - started


def probe(x_train, y_train, x_valid, y_valid, seed: int = 0) -> tuple[float, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(x, y):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(x, y)

    valid = float((fit(x_train, y_train).predict(x_valid) == y_valid).mean())
    folds = StratifiedKFold(2, shuffle=True, random_state=seed).split(x_train, y_train)
    cv = [float((fit(x_train[a], y_train[a]).predict(x_train[b]) == y_train[b]).mean()) for a, b in folds]
    return valid, float(np.mean(cv))


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--configs", default="efficientnet_lite0@224,efficientnet_lite0@288,efficientnet_lite1@240,"
                                             "efficientnet_lite1@288,efficientnet_lite2@260,efficientnet_lite2@288")
    args = parser.parse_args()
    classes = sorted(p.name for p in (DATA / "train").iterdir())
    rng = random.Random(0)
    train, valid = [], []
    for index, name in enumerate(classes):
        files = sorted((DATA / "train" / name).iterdir())
        rng.shuffle(files)
        train += [(f, index) for f in files[:args.per_class]]
        valid += [(f, index) for f in sorted((DATA / "validation" / name).iterdir())]
    y_train, y_valid = np.array([y for _, y in train]), np.array([y for _, y in valid])
    print(f"clothing-small: {len(train)} train ({args.per_class} per class), {len(valid)} validation", flush=True)
    rows = []
    for config in args.configs.split(","):
        arch, size = config.split("@")
        pixels_train, pixels_valid = load([f for f, _ in train], int(size)), load([f for f, _ in valid], int(size))
        x_train, t_train = features(arch, pixels_train)
        x_valid, t_valid = features(arch, pixels_valid)
        accuracy, cv = probe(x_train, y_train, x_valid, y_valid)
        speed = (len(train) + len(valid)) / (t_train + t_valid)
        rows.append({"arch": arch, "size": int(size), "valid_accuracy": round(accuracy, 4),
                     "train_cv_accuracy": round(cv, 4), "body_images_per_s": round(speed, 1)})
        base = rows[0]
        print(f"{arch:<20} {size:>4} px  valid {accuracy:.2%}  train 2-fold {cv:.2%}  body {speed:.1f} img/s "
              f"({speed / base['body_images_per_s']:.2f}x the baseline's, "
              f"{(accuracy - base['valid_accuracy']) * 100:+.1f} points)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB; baseline {rows[0]['arch']} @ {rows[0]['size']} px")
    print("RESULT " + json.dumps({"per_class": args.per_class, "n_valid": len(valid), "rows": rows,
                                  "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
