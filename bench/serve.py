"""Serving benchmark: the dashboard's predictor against fastai's learn.predict, and Voilà.

Same model, same images, same run:
- p50/p95 latency of one prediction (file bytes -> label and probabilities) through the
  dashboard's cached pickle-free predictor, through the JSON API (`POST /api/predict/NAME` over
  one keep-alive HTTP connection to a running `toolkit serve`, the same predictor in the server
  process) and through `load_learner(export.pkl).predict` (the baseline; the toolkit itself
  never uses load_learner), and their ratios, interleaved image by image;
- time from starting `toolkit serve` to the first rendered dashboard in headless chromium, and
  from an upload to its prediction in the page;
- memory (RSS) of the dashboard's kernel process.

Trains a small model first (3 clothing-small classes, 96 px) in a temporary project. The last
line is `RESULT {json}`. Usage: python bench/serve.py [--images 30] [--repeats 3] [--no-browser]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"
CLASSES = ["pants", "shoes", "t-shirt"]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def make_project(root: Path, per_class: int, size: int) -> Path:
    rng = random.Random(0)
    for name in CLASSES:
        files = sorted((DATA / "train" / name).iterdir())
        rng.shuffle(files)
        (root / "scrape" / "bench" / name).mkdir(parents=True)
        for file in files[:per_class]:
            shutil.copy2(file, root / "scrape" / "bench" / name / file.name)
    (root / "settings.ini").write_text(
        f"[bench]\ntitle = Serving benchmark\ndescription = Three clothing-small classes.\nsize = {size}\n"
        "epochs = 1\nfreeze_epochs = 1\nbs = 16\nlr_find_iters = 20\n")
    return root / "settings.ini"


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


class ApiServer:
    """`toolkit serve --no-token` on loopback in the benchmark's project (the API's server)."""

    def __init__(self, root: Path, threads: int):
        from toolkit.ui.voila import free_port

        self.port = free_port()
        jupyter = root / ".jupyter-api"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   PYTHONWARNINGS="ignore", TOOLKIT_THREADS=str(threads), JUPYTER_DATA_DIR=str(jupyter / "d"),
                   JUPYTER_CONFIG_DIR=str(jupyter / "c"), JUPYTER_RUNTIME_DIR=str(jupyter / "r"))
        self.log = root / "serve-api.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", "--no-token", "--port",
                                          str(self.port)], cwd=root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while "Ctrl-C stops the server" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError(f"toolkit serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def predict(self, name: str, data: bytes) -> dict:
        self.conn.request("POST", f"/api/predict/{name}", body=data, headers={"Content-Type": "image/jpeg"})
        response = self.conn.getresponse()
        body = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"API answered {response.status}: {body}")
        return body

    def stop(self) -> None:
        from toolkit.ui.voila import stop_voila

        self.conn.close()
        stop_voila(self.proc, grace=30)


def bench_latency(models: Path, images: list[Path], repeats: int, threads: int, api: ApiServer | None = None,
                  name: str = "bench") -> dict:
    import torch
    from fastai.learner import load_learner

    from toolkit.ui.dashboard import get_predictor

    torch.set_num_threads(threads)  # process-wide: the same for both paths
    predictor = get_predictor(models)
    learn = load_learner(models / "export.pkl", cpu=True)  # the baseline only
    datas = [(p, p.read_bytes()) for p in images]
    for path, data in datas[:3]:  # warm-up, both paths
        predictor.predict(data, name=path.name)
        learn.predict(path)
        if api is not None:
            api.predict(name, data)
    ours, theirs, agree, http, server_ms, api_agree = [], [], 0, [], [], 0
    for _ in range(repeats):
        for path, data in datas:  # interleaved, so both see the same machine load
            started = time.perf_counter()
            mine = predictor.predict(data, name=path.name)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            label, _, _ = learn.predict(path)
            theirs.append(time.perf_counter() - started)
            agree += mine.label == str(label)
            if api is not None:
                started = time.perf_counter()
                answer = api.predict(name, data)
                http.append(time.perf_counter() - started)
                server_ms.append(answer["ms"])
                api_agree += answer["label"] == mine.label
    p50, p95 = percentiles(ours)
    b50, b95 = percentiles(theirs)
    extra = {}
    if http:
        a50, a95 = percentiles(http)
        extra = {"api_p50_ms": round(a50, 2), "api_p95_ms": round(a95, 2),
                 "api_server_side_p50_ms": round(float(np.percentile(server_ms, 50)), 2),
                 "api_vs_predictor_ratio": round(a50 / p50, 3), "api_vs_learn_predict_ratio": round(a50 / b50, 3),
                 "api_label_agreement": round(api_agree / len(http), 3)}
    return {**extra, "predictor_p50_ms": round(p50, 2), "predictor_p95_ms": round(p95, 2),
            "learn_predict_p50_ms": round(b50, 2), "learn_predict_p95_ms": round(b95, 2),
            "latency_ratio": round(p50 / b50, 3), "label_agreement": round(agree / len(ours), 3),
            "predictions": len(ours)}


def kernel_rss_mb(pid: int) -> list[float]:
    import psutil

    kernels = [p for p in psutil.Process(pid).children(recursive=True)
               if "ipykernel" in " ".join(p.cmdline())]
    return [round(p.memory_info().rss / 2**20, 1) for p in kernels]


def bench_browser(root: Path, photos: list[Path], name: str = "bench") -> dict:
    from playwright.sync_api import sync_playwright

    from toolkit.ui.voila import free_port

    port = free_port()
    jupyter = root / ".jupyter"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", JUPYTER_DATA_DIR=str(jupyter / "data"),
               JUPYTER_CONFIG_DIR=str(jupyter / "config"), JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"))
    log_path = root / "serve.log"
    result: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.route("**/*", lambda r: r.continue_() if "//127.0.0.1" in r.request.url or
                   r.request.url.startswith(("data:", "blob:")) else r.abort())
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", "--port", str(port)], cwd=root,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while "Ctrl-C stops the server" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() - started > 120:
                    raise RuntimeError(f"toolkit serve did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
            result["serve_ready_s"] = round(time.monotonic() - started, 2)
            page.goto(f"http://127.0.0.1:{port}/voila/render/{name}.ipynb", wait_until="domcontentloaded",
                      timeout=240_000)
            page.wait_for_selector(".toolkit-upload", state="visible", timeout=240_000)
            result["serve_to_first_render_s"] = round(time.monotonic() - started, 2)
            result["kernel_rss_mb_after_render"] = kernel_rss_mb(proc.pid)
            uploads = []
            for photo in photos:
                with page.expect_file_chooser() as chooser:
                    page.locator(".toolkit-upload").click()
                t0 = time.monotonic()
                chooser.value.set_files(files=[{"name": photo.name, "mimeType": "image/jpeg",
                                                "buffer": photo.read_bytes()}])
                page.locator(".toolkit-result .toolkit-name", has_text=photo.name).wait_for(timeout=60_000)
                uploads.append(time.monotonic() - t0)
            result["upload_to_result_s"] = [round(u, 3) for u in uploads]
            rss = kernel_rss_mb(proc.pid)
            result["kernel_rss_mb"] = max(rss) if rss else None
        finally:
            from toolkit.ui.voila import stop_voila

            stop_voila(proc, grace=30)  # SIGTERM: `toolkit serve` stops Voila and its kernels
            browser.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (a dashboard kernel uses 1, see toolkit.ui.dashboard)")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-api", action="store_true", help="skip the JSON API's latency")
    parser.add_argument("--project", type=Path, help="use this project's trained classifier (--name) instead of "
                        "training one (a short run)")
    parser.add_argument("--name", default="bench", help="the classifier of --project")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from toolkit.settings import load_settings
    from toolkit.stages.train import train

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        if args.project:
            spec = load_settings(args.project / "settings.ini").get(args.name)
            print(f"using the trained {spec.name} of {args.project} ({spec.arch}, {spec.size} px)", flush=True)
        else:
            spec = load_settings(make_project(root, args.per_class, args.size)).get("bench")
            started = time.monotonic()
            metrics = train(spec, progress=False, log=lambda line: None)
            print(f"trained {spec.arch} at {spec.size} px in {time.monotonic() - started:.0f} s "
                  f"(valid accuracy {metrics['accuracy']:.1%})", flush=True)
        images = [p for c in CLASSES for p in sorted((DATA / "validation" / c).iterdir())]
        random.Random(1).shuffle(images)
        images = images[: args.images]
        result = {"arch": spec.arch, "size": spec.size, "images": len(images), "torch_threads": args.threads}
        api = None if args.no_api else ApiServer(spec.root, args.threads)
        try:
            result.update(bench_latency(spec.models_dir, images, args.repeats, args.threads, api, spec.name))
        finally:
            if api is not None:
                api.stop()
        print(f"latency p50/p95: predictor {result['predictor_p50_ms']:.1f}/{result['predictor_p95_ms']:.1f} ms, "
              f"learn.predict {result['learn_predict_p50_ms']:.1f}/{result['learn_predict_p95_ms']:.1f} ms, "
              f"ratio {result['latency_ratio']:.3f}", flush=True)
        if api is not None:
            print(f"JSON API over HTTP p50/p95 {result['api_p50_ms']:.1f}/{result['api_p95_ms']:.1f} ms "
                  f"(server side {result['api_server_side_p50_ms']:.1f} ms): "
                  f"x{result['api_vs_predictor_ratio']:.2f} the in-process predictor, "
                  f"x{result['api_vs_learn_predict_ratio']:.2f} learn.predict", flush=True)
        if not args.no_browser:
            result.update(bench_browser(spec.root, images[:3], spec.name))
            print(f"serve -> first rendered dashboard {result['serve_to_first_render_s']} s "
                  f"(Voila ready {result['serve_ready_s']} s); upload -> result {result['upload_to_result_s']} s; "
                  f"kernel RSS {result['kernel_rss_mb']} MB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import resource

    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS of this process (predictor + learner): {result['peak_rss_mb']} MB", flush=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
