"""The cleaning app's time to first paint and to tiles, in a real browser (Voilà + headless Debian
chromium), on Fashion-MNIST (8,000 images, the `make run` default), cold (no embedding cache) and
warm (cached), against the blocking app's blank time measured in the same run.

The old app ranked inside the notebook's only cell, so its page stayed blank until rank() had
finished: its first paint = its tiles = import + rank(). Cold, that is the new app's time to tiles
(the same work: the embeddings dominate); warm it is measured here in-process (import + rank with
the cache). Times are seconds after `page.goto` starts (Voilà start excluded; the page GET, kernel
start and the notebook's one cell included), and after DOMContentLoaded.

Usage: python bench/clean_app.py [--n 8000] [--keep DIR]. Last line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the moment the percentage bar is in the DOM, by a MutationObserver (no polling delay), in ms from
# the navigation's start (performance.now())
PAINT_PROBE = """
new MutationObserver((_, obs) => {
  if (document.querySelector('.clean-progress-text')) { window.__cleanPaint = performance.now(); obs.disconnect(); }
}).observe(document, {childList: true, subtree: true});
"""


def open_page(browser, url: str, *, tiles: bool = True) -> dict[str, float]:
    """Seconds after `page.goto` starts: DOMContentLoaded, the percentage bar, tiles (unless not `tiles`);
    and the browser's own navigation timing (request sent -> first byte, DOMContentLoaded, load, paint)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script(PAINT_PROBE)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1", "ws://127.0.0.1", "data:")) else route.abort())
    t0 = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded", timeout=300_000)
    dom = time.perf_counter() - t0
    page.locator(".clean-progress-text").first.wait_for(timeout=300_000)
    paint = time.perf_counter() - t0
    text = page.locator(".clean-progress-text").first.inner_text()
    nav = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
        return {first_byte: n.responseStart, response_end: n.responseEnd, dom: n.domContentLoadedEventEnd,
                load: n.loadEventEnd, paint: window.__cleanPaint || null}; }""")
    browser_s = {k: round(v / 1000, 2) for k, v in nav.items() if v}
    if "load" in browser_s and "paint" in browser_s:
        browser_s["paint_after_load"] = round(browser_s["paint"] - browser_s["load"], 2)
    if not tiles:
        page.close()
        return {"dom_s": round(dom, 2), "paint_s": round(paint, 2), "paint_after_dom_s": round(paint - dom, 2),
                "first_text": text, "browser": browser_s}
    page.locator(".clean-tile-0").wait_for(timeout=900_000)
    tiles = time.perf_counter() - t0
    page.locator(".clean-map-figure").wait_for(timeout=60_000)
    shot = Path(tempfile.gettempdir()) / f"clean-app-bench-{int(t0)}.png"
    page.screenshot(path=str(shot))
    page.close()
    return {"dom_s": round(dom, 2), "paint_s": round(paint, 2), "paint_after_dom_s": round(paint - dom, 2),
            "tiles_s": round(tiles, 2), "first_text": text, "screenshot": str(shot), "browser": browser_s}


def blocking_baseline(root: Path) -> float:
    """The old app's blank time, warm: a fresh interpreter imports the toolkit and runs rank()."""
    code = ("import time; t=time.perf_counter()\n"
            "from toolkit.settings import load_settings\nfrom toolkit.stages.clean.rank import rank\n"
            f"rank(load_settings({str(root / 'settings.ini')!r}).get('fm'))\n"
            "print(time.perf_counter()-t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    return float(done.stdout.strip().splitlines()[-1])


def paint_only(args, root: Path, notebook: Path, raw: Path) -> None:
    """Each mode, `--loads` times: a fresh Voila, `--settle` s, one page to the percentage bar, stop."""
    from playwright.sync_api import sync_playwright

    from toolkit.ui.voila import launch_voila, preheat_args, stop_voila

    env = dict(os.environ, TOOLKIT_CLASSIFIER="fm", TOOLKIT_SETTINGS=str(root / "settings.ini"),
               JUPYTER_DATA_DIR=str(root / "jupyter"), PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    runs: dict[str, list[dict]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        try:
            for mode in args.modes.split(","):
                for i in range(args.loads):
                    port = free_port()
                    log = root / f"voila-{mode}-{i}.log"
                    extra = preheat_args(["clean"], []) if mode.startswith("preheat") else []
                    wait = "0" if mode in ("before", "preheat-nowait") else "1"
                    process = launch_voila(notebook, port, "127.0.0.1", dict(env, TOOLKIT_CLEAN_WAIT_PAGE=wait),
                                           log_path=log, timeout=180, extra_args=extra)
                    try:
                        time.sleep(args.settle)
                        run = open_page(browser, f"http://127.0.0.1:{port}/", tiles=False)
                    finally:
                        stop_voila(process)
                    runs.setdefault(mode, []).append(run)
                    print(f"{mode} {i}: {run}", file=sys.stderr, flush=True)
        finally:
            browser.close()
    n = sum(1 for _ in raw.rglob("*.png"))
    summary = {mode: {key: round(float(sorted(r[key] for r in rs)[len(rs) // 2]), 2)
                      for key in ("dom_s", "paint_s", "paint_after_dom_s")} for mode, rs in runs.items()}
    for mode, rs in runs.items():
        after_load = [r["browser"].get("paint_after_load") for r in rs if "paint_after_load" in r["browser"]]
        if after_load:
            summary[mode]["paint_after_load_s"] = sorted(after_load)[len(after_load) // 2]
    print(f"median of {args.loads} loads at {n} images: {summary}")
    result = {"n": n, "paint_only": True, "settle_s": args.settle, "median": summary, "runs": runs}
    for mode in summary:
        if mode != "before" and "before" in summary:  # ratio of the median paint to the baseline's
            result[f"{mode}_paint_vs_before"] = round(summary[mode]["paint_s"] / summary["before"]["paint_s"], 3)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--keep", type=Path, default=None, help="project folder to reuse (warm cache)")
    parser.add_argument("--paint-only", action="store_true",
                        help="time the first paint only, --loads times per mode, each on a fresh Voila "
                             "(a previous page's kernel would go on ranking beside the next)")
    parser.add_argument("--modes", default="before,wait,preheat", help="with --paint-only: before (as toolkit "
                        "clean before: imports at once, TOOLKIT_CLEAN_WAIT_PAGE=0), wait (imports after the page "
                        "fetched the shell), preheat (wait + a preheated kernel: Voila's preheat_kernel, "
                        "pool_size 1), preheat-nowait")
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds between Voila's ready line and the page (both modes)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from playwright.sync_api import sync_playwright

    from toolkit.stages.scrape import fashion_mnist
    from toolkit.ui.clean_notebook import write_clean_notebook
    from toolkit.ui.voila import launch_voila, stop_voila

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-clean-app-"))
    raw = root / "scrape" / "fm"
    if not raw.is_dir():
        fashion_mnist.ingest(raw, split="train", per_class=args.n // 10, seed=0, progress=False)
    (root / "settings.ini").write_text("[fm]\ntitle = Fashion-MNIST\n")
    cold = not (root / "cleaned_data" / "fm" / ".cache").is_dir()
    notebook = write_clean_notebook(root / "apps" / "clean.ipynb")
    if args.paint_only:
        paint_only(args, root, notebook, raw)
        return
    port = free_port()
    log = root / "voila.log"
    env = dict(os.environ, TOOLKIT_CLASSIFIER="fm", TOOLKIT_SETTINGS=str(root / "settings.ini"),
               JUPYTER_DATA_DIR=str(root / "jupyter"), PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    process = launch_voila(notebook, port, "127.0.0.1", env, log_path=log, timeout=180)
    runs = {}
    try:
        deadline = time.time() + 180
        while f"http://127.0.0.1:{port}/" not in log.read_text():
            assert process.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            try:
                for label in (["cold"] if cold else []) + ["warm"]:
                    runs[label] = open_page(browser, f"http://127.0.0.1:{port}/")
                    print(f"{label}: {runs[label]}", file=sys.stderr, flush=True)
            finally:
                browser.close()
    finally:
        stop_voila(process)
    baseline_warm = blocking_baseline(root)
    n = sum(1 for _ in raw.rglob("*.png"))
    result = {"n": n, "runs": runs, "baseline_blocking_warm_s": round(baseline_warm, 2),
              "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
              "project": str(root)}
    if "cold" in runs:
        result["cold_paint_vs_blocking"] = round(runs["cold"]["paint_s"] / runs["cold"]["tiles_s"], 3)
        print(f"cold: paint {runs['cold']['paint_s']} s (old app: blank until {runs['cold']['tiles_s']} s), "
              f"tiles {runs['cold']['tiles_s']} s")
    result["warm_paint_vs_blocking"] = round(runs["warm"]["paint_s"] / baseline_warm, 3)
    print(f"warm: paint {runs['warm']['paint_s']} s, tiles {runs['warm']['tiles_s']} s "
          f"(old app: blank for {baseline_warm:.1f} s + page and kernel start)")
    print(f"peak RSS: bench {result['peak_rss_mb_self']} MB, Voila + kernels {result['peak_rss_mb_children']} MB")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
