"""Benchmark: task = hierarchical on clothing-small, accuracy per level.

A hierarchy over clothing-small's 10 class folders (no copying: the `hierarchy` key maps them):
tops (t-shirt, shirt, longsleeve, outwear), bottoms (pants, shorts, skirt), dress, footwear
(shoes), headwear (hat). One `toolkit train` (EfficientNet-Lite0, 128 px, 1+3 epochs by default)
on train/, scored on validation/ with the pickle-free predictor, decoded two ways from the same
probabilities:
  top-down : what `toolkit predict` and the dashboard show (the most probable level-1 node, then
             its most probable child): consistent paths;
  leaf     : the most probable of the 10 leaves collapsed to its parents: exactly what a flat
             10-class classifier (`task = single`, the same network) says about each level.
Prints accuracy per level for both, and the ratio of their errors at level 1. Last line: RESULT {json}.

Usage: python bench/hierarchy.py [--size 128] [--epochs 3] [--freeze-epochs 1] [--lr 4e-3] [--subset N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"
HIERARCHY = ("tops/t-shirt, tops/shirt, tops/longsleeve, tops/outwear, bottoms/pants, bottoms/shorts, "
             "bottoms/skirt, dress, footwear/shoes, headwear/hat")


def main() -> None:
    from train import subset  # bench/train.py: all of clothing-small or N per class (symlinks)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--lr", default="4e-3")
    parser.add_argument("--subset", type=int, default=0, help="train images per class (0: all)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"bench/hierarchy.py needs {DATA}")
    from toolkit.data import list_labelled_images
    from toolkit.settings import load_settings
    from toolkit.stages.train import train
    from toolkit.tasks import load_predictor
    from toolkit.tasks.hierarchical import hierarchical_metrics, to_paths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = subset(DATA, root / "data", args.subset)
        (root / "settings.ini").write_text(
            f"[clothing-tree]\ntask = hierarchical\nhierarchy = {HIERARCHY}\nsize = {args.size}\n"
            f"epochs = {args.epochs}\nfreeze_epochs = {args.freeze_epochs}\nbs = {args.bs}\nlr = {args.lr}\n")
        spec = load_settings(root / "settings.ini").get("clothing-tree")
        print(f"clothing-small from {data}: {args.size} px, {args.freeze_epochs}+{args.epochs} epochs, lr {args.lr}",
              flush=True)
        started = time.time()
        metrics = train(spec, data, progress=False, log=lambda line: print("  train:", line, flush=True))
        train_s = time.time() - started
        predictor = load_predictor(spec.models_dir)
        files, folders = list_labelled_images(data / "validation")
        labels = to_paths(folders, spec.hierarchy, "clothing-small validation")
        probs = predictor.predict_files(files, progress=False)
    figures = {}
    for decoding in ("top-down", "leaf"):
        result = hierarchical_metrics(probs, labels, predictor.classes, decoding=decoding)
        figures[decoding] = {name: m["accuracy"] for name, m in result["levels"].items()}
        per_class = {c: v["recall"] for c, v in result["levels"]["level1"]["per_class"].items()}
        print(f"{decoding:>8}: " + ", ".join(f"{k} {v:.2%}" for k, v in figures[decoding].items())
              + f"; level-1 recall {json.dumps(per_class)}", flush=True)
    top, flat = figures["top-down"], figures["leaf"]
    error_ratio = (1 - top["level1"]) / (1 - flat["level1"]) if flat["level1"] < 1 else 1.0
    print(f"level-1 errors top-down / leaf-collapsed: {error_ratio:.2f}; training {train_s:.0f} s "
          f"(validation accuracy at train time {metrics['accuracy']:.2%})")
    out = {"size": args.size, "epochs": args.epochs, "freeze_epochs": args.freeze_epochs, "lr": args.lr,
           "subset": args.subset, "n_valid": len(files), "level1_classes": len(result["levels"]["level1"]["classes"]),
           **{f"{k}_accuracy": v for k, v in top.items()},
           **{f"flat_{k}_accuracy": v for k, v in flat.items()},
           "level1_error_ratio": round(error_ratio, 3), "train_wall_s": round(train_s, 1)}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
