"""Benchmark: an ensemble of two image sizes vs each of its members, on clothing-small validation.

`toolkit train` of a section with `ensemble = size=96 | size=128` (same backbone, EfficientNet-
Lite0, same split: train -> validation): each member, the `mean` ensemble and the
`class_weighted` ensemble (its weights 2-fold cross-fitted on validation, so they never score the
images they were fitted on) and the `auto` ensemble (the combination, or the best member alone,
chosen out of fold by `choose_combination`), accuracy overall and per class. Prints the figures and
the gain of each mode over the best member. Last line: RESULT {json} with `ensemble_accuracy` (the
mode set by --mode, auto by default), `auto_choice` and `member_<name>_accuracy` per member.

Usage: python bench/ensemble.py [--sizes 96,128] [--archs efficientnet_lite0,efficientnet_lite1]
                                [--epochs 3] [--freeze-epochs 1] [--mode auto]
                                [--subset N]   (N training images per class; validation stays whole)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train import DATA, subset  # noqa: E402  (bench/train.py: the clothing-small subset helper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="96,128", help="comma-separated member image sizes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--archs", default="", help="comma-separated member backbones (default: the settings')")
    parser.add_argument("--mode", default="auto", choices=["auto", "mean", "class_weighted"])
    parser.add_argument("--subset", type=int, default=0,
                        help="train images per class (0: all); validation is always all 341 images")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"bench/ensemble.py needs {DATA}")
    from toolkit.settings import load_settings
    from toolkit.stages.train import train as train_ensemble  # the section has an ensemble key

    sizes = [int(s) for s in args.sizes.split(",")]
    archs = [a for a in args.archs.split(",") if a] or [""] * len(sizes)
    if len(archs) != len(sizes):
        sys.exit("--archs needs one backbone per --sizes entry")
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(DATA, Path(tmp) / "data", args.subset)
        if args.subset:  # fewer training images, but every validation image: the figures compared
            shutil.rmtree(data / "validation")
            (data / "validation").symlink_to(DATA / "validation")
        (Path(tmp) / "settings.ini").write_text(
            "[clothing-small]\nensemble = "
            + " | ".join(f"size={s}" + (f" arch={a}" if a else "") for s, a in zip(sizes, archs))
            + f"\nensemble_mode = {args.mode}\n"
            f"epochs = {args.epochs}\nfreeze_epochs = {args.freeze_epochs}\nbs = {args.bs}\n")
        spec = load_settings(Path(tmp) / "settings.ini").get("clothing-small")
        print(f"clothing-small from {data}: members at {sizes} px, {args.archs or 'efficientnet_lite0'}, "
              f"{args.freeze_epochs}+{args.epochs} epochs, bs {args.bs}", flush=True)
        started = time.time()
        metrics = train_ensemble(spec, data, progress=False, log=lambda line: print(" ", line, flush=True))
        wall = time.time() - started

    members = metrics["members"]
    modes = metrics["modes"]
    columns = {**members, **{f"ens-{mode}": m for mode, m in modes.items()},
               **({"ens-auto": metrics} if args.mode == "auto" else {})}
    print(f"\n{'class':<12}" + "".join(f"{name:>20}" for name in columns))
    for cls in metrics["classes"]:
        print(f"{cls:<12}" + "".join(f"{m['per_class'][cls]['recall']:>20.3f}" for m in columns.values()))
    print(f"{'accuracy':<12}" + "".join(f"{m['accuracy']:>20.2%}" for m in columns.values()))
    best_name = max(members, key=lambda n: members[n]["accuracy"])
    best = members[best_name]["accuracy"]
    modes = {**modes, "auto": {"accuracy": metrics["accuracy"]}} if args.mode == "auto" else modes
    print(f"auto: {metrics['combination']['reason']}")
    for mode, m in modes.items():
        print(f"{mode}: {m['accuracy']:.2%} vs best member {best_name} {best:.2%}: "
              f"{(m['accuracy'] - best) * 100:+.2f} points, error ratio {(1 - m['accuracy']) / (1 - best):.3f}")
    print(f"wall time {wall:.0f} s for {len(members)} members on {metrics['n_train']} train / "
          f"{metrics['n_valid']} validation images")
    result = {"sizes": sizes, "epochs": args.epochs, "freeze_epochs": args.freeze_epochs, "bs": args.bs,
              "subset": args.subset, "mode": args.mode, "ensemble_accuracy": modes[args.mode]["accuracy"],
              "ensemble_mean_accuracy": modes["mean"]["accuracy"],
              "ensemble_class_weighted_accuracy": modes["class_weighted"]["accuracy"],
              **{f"member_{name}_accuracy": m["accuracy"] for name, m in members.items()},
              "best_member_accuracy": best, "gain_points": round((modes[args.mode]["accuracy"] - best) * 100, 2),
              "auto_choice": metrics["combination"]["choice"], "n_valid": metrics["n_valid"], "wall_s": round(wall, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(f"peak RSS {result['peak_rss_mb']} MB")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
