"""Benchmark (clean part): `toolkit clean NAME --report --json` over growing Fashion-MNIST training sets.

For each size (default 10,000, 30,000 and 60,000 images: per_class = size / 10) a temp project gets
`[fashion-mnist] per_class = size/10` and `toolkit scrape fashion-mnist` (as the tests do), then the
report runs in its own child process, measured with os.wait4 (that child's peak RSS, not the
benchmark's) and wall time: seconds, seconds per 1,000 images, peak RSS, and the report's own
per-step seconds. `--warm` runs the report a second time (embeddings from the cache).

Baseline: `--code DIR` runs another checkout's toolkit (e.g. /work/main, the all-pairs version) on the
same sizes; pass `--baseline DIR` to measure it in the same run (use small sizes: it is quadratic).

Usage: python bench/scale.py [--sizes 10000,30000,60000] [--work /tmp/scale] [--warm] [--plot out.png]
       [--baseline /work/main --baseline-sizes 2000,5000]. Last line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "fashion-mnist"


def project(work: Path, size: int) -> Path:
    """A project root with `size` Fashion-MNIST training images scraped (reused when already there)."""
    root = work / f"fm-{size}"
    raw = root / "scrape" / NAME
    if raw.is_dir() and sum(1 for _ in raw.rglob("*.png")) >= size:
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.ini").write_text(f"[{NAME}]\nper_class = {size // 10}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "toolkit", "scrape", NAME, "--quiet"], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return root


def report_once(root: Path, code: Path, timeout: float) -> dict:
    """One `clean --report --json` in a child process: seconds, peak RSS (MB), exit code, step seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with open(root / "clean.out", "w") as out, open(root / "clean.err", "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "toolkit", "clean", NAME, "--report", "--json"], cwd=root,
                                 env=env, stdout=out, stderr=err)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    code_ = os.waitstatus_to_exitcode(status)
    steps = {}
    report = root / "cleaned_data" / NAME / "report.json"
    if code_ == 0 and report.is_file():
        steps = json.loads(report.read_text())["seconds"]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "exit": code_,
            "steps": steps}


def measure(work: Path, sizes: list[int], code: Path, *, warm: bool, timeout: float, label: str) -> list[dict]:
    rows = []
    for size in sizes:
        root = project(work / label, size)
        cache = root / "cleaned_data" / NAME / ".cache"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        cold = report_once(root, code, timeout)
        row = {"n": size, "cold": cold, "s_per_1000": round(cold["seconds"] * 1000 / size, 2)}
        print(f"[{label}] {size:>6} images: cold {cold['seconds']:.1f} s ({row['s_per_1000']:.2f} s/1000), "
              f"peak RSS {cold['peak_rss_mb']} MB, exit {cold['exit']}, steps {cold['steps']}", flush=True)
        if warm and cold["exit"] == 0:
            again = report_once(root, code, timeout)
            row["warm"] = again
            row["warm_s_per_1000"] = round(again["seconds"] * 1000 / size, 2)
            print(f"[{label}] {size:>6} images: warm {again['seconds']:.1f} s ({row['warm_s_per_1000']:.2f} s/1000), "
                  f"peak RSS {again['peak_rss_mb']} MB, steps {again['steps']}", flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], base: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for data, name, style in ((rows, "toolkit", "o-"), (base, "baseline", "s--")):
        ok = [r for r in data if r["cold"]["exit"] == 0]
        if ok:
            a.plot([r["n"] for r in ok], [r["s_per_1000"] for r in ok], style, label=f"{name} cold")
            b.plot([r["n"] for r in ok], [r["cold"]["peak_rss_mb"] / 1024 for r in ok], style, label=name)
        warm = [r for r in ok if "warm" in r]
        if warm:
            a.plot([r["n"] for r in warm], [r["warm_s_per_1000"] for r in warm], style, alpha=0.5,
                   label=f"{name} warm")
    a.set(xlabel="images", ylabel="seconds per 1,000 images", title="clean --report: time")
    b.set(xlabel="images", ylabel="peak RSS (GB)", title="clean --report: memory")
    b.axhline(3, color="grey", lw=0.8, ls=":")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,30000,60000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/toolkit-scale"))
    parser.add_argument("--warm", action="store_true", help="run each report twice (second from the cache)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure on --baseline-sizes")
    parser.add_argument("--baseline-sizes", default="2000,5000")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--plot", type=Path, help="PNG of s/1000 and peak RSS vs size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    base = []
    if args.baseline:
        base = measure(args.work, [int(s) for s in args.baseline_sizes.split(",") if s], args.baseline,
                       warm=False, timeout=args.timeout, label="baseline")
    rows = measure(args.work, sizes, REPO, warm=args.warm, timeout=args.timeout, label="toolkit")
    result = {"sizes": sizes, "toolkit": rows, "baseline": base}
    same = [(r, b) for r in rows for b in base if r["n"] == b["n"] and b["cold"]["exit"] == 0]
    for r, b in same:
        ratio_t = b["cold"]["seconds"] / max(r["cold"]["seconds"], 1e-9)
        ratio_m = b["cold"]["peak_rss_mb"] / max(r["cold"]["peak_rss_mb"], 1)
        print(f"{r['n']} images: baseline / toolkit = {ratio_t:.2f}x time, {ratio_m:.2f}x peak RSS")
        result.setdefault("ratio_vs_baseline", {})[str(r["n"])] = {"time": round(ratio_t, 2),
                                                                 "peak_rss": round(ratio_m, 2)}
    if args.plot:
        plot(rows, base, args.plot)
        print(f"plot: {args.plot}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
