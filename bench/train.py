"""Benchmark: `toolkit train` at its defaults vs a plain fastai script written the book's way.

Both on ../shared/datasets/clothing-small (train -> validation), same backbone (EfficientNet-
Lite0, ImageNet weights), image size, batch size and epochs, in the same run. Prints validation
accuracy, wall time and training images/s of each, and the ratios. Last line: RESULT {json}.

With --baseline-epochs / --baseline-freeze-epochs the plain script runs other epochs than the
toolkit (e.g. the toolkit's quick mode, `--epochs 0`, against a plain script that passes the
training images through the body as often: 2 frozen epochs, the toolkit's plain + mirrored features).

Usage: python bench/train.py [--size N] [--epochs N] [--freeze-epochs N] [--subset N]
                             [--baseline-epochs N] [--baseline-freeze-epochs N] [--skip-baseline]
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
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"


def subset(source: Path, dest: Path, per_class: int | None) -> Path:
    """All of clothing-small, or the first N per class of train and validation (symlinks)."""
    if not per_class:
        return source
    for split in ("train", "validation"):
        for class_dir in sorted((source / split).iterdir()):
            target = dest / split / class_dir.name
            target.mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[: per_class if split == "train" else max(per_class // 4, 5)]:
                (target / f.name).symlink_to(f)
    return dest


def run_toolkit(data: Path, root: Path, size: int, epochs: int, freeze_epochs: int, bs: int,
                extra: str = "") -> dict:
    from toolkit.settings import load_settings
    from toolkit.stages.train import train

    (root / "settings.ini").write_text(f"[clothing-small]\nsize = {size}\nepochs = {epochs}\n{extra}"
                                       f"freeze_epochs = {freeze_epochs}\nbs = {bs}\n")
    spec = load_settings(root / "settings.ini").get("clothing-small")
    started = time.time()
    metrics = train(spec, data, progress=False, log=lambda line: print("  toolkit:", line, flush=True))
    return {"accuracy": metrics["accuracy"], "wall_s": round(time.time() - started, 1),
            "fit_s": metrics["fit_seconds"], "images_per_s": metrics["train_images_per_second"],
            "lr": metrics["lr"]}


def run_plain_fastai(data: Path, size: int, epochs: int, freeze_epochs: int, bs: int) -> dict:
    """The book's way: ImageDataLoaders.from_folder + vision_learner + lr_find + fine_tune."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Resize,
        accuracy,
        aug_transforms,
        default_split,
        model_meta,
        nn,
        vision_learner,
    )

    from toolkit.core.backbones import LITE_MEAN, LITE_STD, get_backbone

    def efficientnet_lite0(pretrained: bool = True):
        return nn.Sequential(get_backbone("efficientnet_lite0").create_body(pretrained), nn.AdaptiveAvgPool2d(1))

    model_meta[efficientnet_lite0] = {"cut": -1, "split": default_split, "stats": (LITE_MEAN, LITE_STD)}
    started = time.time()
    dls = ImageDataLoaders.from_folder(data, train="train", valid="validation", bs=bs,
                                       item_tfms=Resize(size, method="squish"), batch_tfms=aug_transforms())
    learn = vision_learner(dls, efficientnet_lite0, metrics=accuracy)
    learn.no_bar()
    lr = learn.lr_find(num_it=40, show_plot=False).valley
    fit_started = time.time()
    if epochs:
        learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
    else:  # the head alone (vision_learner's model starts frozen), as fine_tune's first half does it
        learn.fit_one_cycle(freeze_epochs, slice(lr), pct_start=0.99)
    fit_s = time.time() - fit_started
    accuracy_value = float(learn.validate()[1])
    n_train = len(dls.train_ds)
    return {"accuracy": round(accuracy_value, 4), "wall_s": round(time.time() - started, 1),
            "fit_s": round(fit_s, 1), "images_per_s": round(n_train * (epochs + freeze_epochs) / fit_s, 2),
            "lr": float(lr)}


def main() -> None:
    from toolkit.settings import ClassifierSpec

    defaults = ClassifierSpec(name="defaults", root=REPO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--freeze-epochs", type=int, default=defaults.freeze_epochs)
    parser.add_argument("--bs", type=int, default=defaults.bs)
    parser.add_argument("--subset", type=int, default=0, help="train images per class (0: all)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="plain script's (default: --epochs)")
    parser.add_argument("--baseline-freeze-epochs", type=int, default=None,
                        help="plain script's frozen epochs (default: --freeze-epochs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra settings for the toolkit run (e.g. lr=4e-3)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"bench/train.py needs {DATA}")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = subset(DATA, Path(tmp) / "data", args.subset)
        print(f"clothing-small from {data}: size {args.size}, epochs {args.freeze_epochs}+{args.epochs}, "
              f"bs {args.bs}, {torch.get_num_threads()} threads", flush=True)
        ours = run_toolkit(data, Path(tmp), args.size, args.epochs, args.freeze_epochs, args.bs,
                           "".join(f"{item.replace('=', ' = ', 1)}\n" for item in args.set))
        print(f"toolkit train : {json.dumps(ours)}", flush=True)
        result = {"size": args.size, "epochs": args.epochs, "freeze_epochs": args.freeze_epochs,
                  "bs": args.bs, "subset": args.subset, "settings": args.set, "toolkit_accuracy": ours["accuracy"],
                  "toolkit_wall_s": ours["wall_s"], "toolkit_images_per_s": ours["images_per_s"]}
        if not args.skip_baseline:
            b_epochs = args.epochs if args.baseline_epochs is None else args.baseline_epochs
            b_freeze = args.freeze_epochs if args.baseline_freeze_epochs is None else args.baseline_freeze_epochs
            plain = run_plain_fastai(data, args.size, b_epochs, b_freeze, args.bs)
            print(f"plain fastai  : {json.dumps(plain)} ({b_freeze}+{b_epochs} epochs)", flush=True)
            print(f"toolkit vs plain: accuracy {(ours['accuracy'] - plain['accuracy']) * 100:+.2f} points, wall "
                  f"{ours['wall_s'] / plain['wall_s']:.2f}x", flush=True)
            result.update({"baseline_epochs": b_epochs, "baseline_freeze_epochs": b_freeze,
                           "baseline_accuracy": plain["accuracy"], "baseline_wall_s": plain["wall_s"],
                           "baseline_images_per_s": plain["images_per_s"],
                           "throughput_ratio": round(ours["images_per_s"] / plain["images_per_s"], 2),
                           "wall_ratio": round(ours["wall_s"] / plain["wall_s"], 2)})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
