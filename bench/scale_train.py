"""Benchmark: training throughput in 1 and 2 processes on the same data (`toolkit train NAME` vs
`toolkit train NAME --processes 2`, Accelerate + gloo on CPU), and the head-only retrain
(`toolkit train NAME --head-only`, cold and warm feature cache) against the full training it
replaces, all in the same run, each as the CLI a user runs.

Data: the first --per-class photos of --classes of ../shared/datasets/clothing-small/train
(symlinks), a random 20% validation split. Prints images/s, seconds, accuracy, the ratios and the
peak RSS of the largest process; last line: RESULT {json}.

Usage: flock /tmp/bench.lock python bench/scale_train.py [--per-class N] [--size N] [--classes a,b,c]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "clothing-small" / "train"


def toolkit(root: Path, *args: str) -> tuple[dict, float]:
    """Run `toolkit ARGS --json --quiet` in `root`; its JSON and wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "toolkit", *args, "--json", "--quiet"], cwd=root, env=env,
                          capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode != 0:
        sys.exit(f"toolkit {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", default="pants,shoes,t-shirt,dress,hat,skirt")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scale_train_"))
    for name in args.classes.split(","):
        (root / "scrape" / "bench" / name).mkdir(parents=True)
        for f in sorted((DATA / name).iterdir())[: args.per_class]:
            (root / "scrape" / "bench" / name / f.name).symlink_to(f)
    (root / "settings.ini").write_text(f"[bench]\nsize = {args.size}\nepochs = 1\nfreeze_epochs = 2\nbs = 16\n"
                                       "split = random:0.2\nlr_find_iters = 20\n")
    metrics_path = root / "models" / "bench" / "metrics.json"
    print(f"data: {args.per_class} x {args.classes} at {args.size} px in {root}", flush=True)

    runs = {}
    for label, extra in (("processes_2", ("--processes", "2")), ("processes_1", ())):
        printed, wall = toolkit(root, "train", "bench", *extra)
        metrics = json.loads(metrics_path.read_text())
        runs[label] = {"accuracy": metrics["accuracy"], "wall_s": round(wall, 1), "fit_s": metrics["fit_seconds"],
                       "images_per_s": metrics["train_images_per_second"], "world_size": metrics["world_size"],
                       "bs_per_process": metrics["bs_per_process"]}
        print(f"{label}: {runs[label]}", flush=True)
    # the head-only retrain on the 1-process model: a cold cache, then a warm one
    for label in ("head_only_cold", "head_only_warm"):
        printed, wall = toolkit(root, "train", "bench", "--head-only")
        runs[label] = {"accuracy": printed["accuracy"], "wall_s": round(wall, 1),
                       "inside_s": printed["wall_seconds"], "features_computed": printed["features_computed"]}
        print(f"{label}: {runs[label]}", flush=True)
    one, two = runs["processes_1"], runs["processes_2"]
    ratio = round(two["images_per_s"] / one["images_per_s"], 2)
    head_ratio = round(runs["head_only_warm"]["wall_s"] / one["wall_s"], 3)
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(f"train images/s: 1 process {one['images_per_s']}, 2 processes {two['images_per_s']} "
          f"(ratio {ratio}x; {os.cpu_count()} CPU cores); accuracy {one['accuracy']:.2%} vs {two['accuracy']:.2%}")
    print(f"head-only retrain: {runs['head_only_warm']['wall_s']} s warm ({runs['head_only_cold']['wall_s']} s cold) "
          f"vs a full train {one['wall_s']} s (ratio {head_ratio}); peak RSS {peak_mb} MB (largest process)")
    print("RESULT " + json.dumps({"runs": runs, "throughput_ratio_2_vs_1": ratio,
                                  "head_only_vs_full_wall_ratio": head_ratio, "peak_rss_mb": peak_mb,
                                  "cpus": os.cpu_count(), "n_images": args.per_class * len(args.classes.split(",")),
                                  "size": args.size}))


if __name__ == "__main__":
    main()
