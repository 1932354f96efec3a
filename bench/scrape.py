"""Benchmark: toolkit's scraper vs fastai's download_images on the same URLs from a slow local server.

A local HTTP server (its own process) adds 100 ms of latency to every request and serves 500 real
photos of ../shared/datasets/clothing-small plus broken URLs (404, HTML labelled image/jpeg,
truncated JPEGs) and duplicates (the same photo under a second URL). Each contender runs in its own
child process, so its peak memory (ru_maxrss) is its own. Last line: `RESULT {json}`.

    python bench/scrape.py [--images 500] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets" / "clothing-small" / "train"
N_BROKEN_EACH = 5  # x3 kinds: 404, HTML as image/jpeg, truncated JPEG
N_DUPLICATES = 10

SERVER = r'''
import sys, time, json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
routes = json.load(open(sys.argv[1]))
latency = float(sys.argv[2])
cache = {file: open(file, "rb").read() for _, file, _ in routes.values() if file}  # warm for both contenders
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        time.sleep(latency)
        entry = routes.get(self.path.split("?")[0])
        if entry is None:
            body, status, kind = b"<html>404</html>", 404, "text/html"
        else:
            kind, file, cut = entry
            if kind == "html":
                body, status, kind = b"<!DOCTYPE html><html><body>not a photo</body></html>" * 30, 200, "image/jpeg"
            else:
                body, status = cache[file][:cut] if cut else cache[file], 200
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


def build_urls(n_images: int) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """routes {path: [content-type, file, cut]} and (class, path) pairs, seeded and class-balanced-ish."""
    classes = sorted(d.name for d in SHARED.iterdir() if d.is_dir())
    per_class = {c: sorted((SHARED / c).iterdir()) for c in classes}
    routes: dict[str, list] = {}
    pairs: list[tuple[str, str]] = []
    index = 0
    while len(pairs) < n_images:
        for cls in classes:
            files = per_class[cls]
            if index < len(files) and len(pairs) < n_images:
                path = f"/img/{cls}/{files[index].name}"
                routes[path] = ["image/jpeg", str(files[index]), 0]
                pairs.append((cls, path))
        index += 1
    photos = list(pairs)
    for i in range(N_BROKEN_EACH):
        cls = classes[i % len(classes)]
        pairs.append((cls, f"/gone/{i}.jpg"))
        routes[f"/html/{i}.jpg"] = ["html", "", 0]
        pairs.append((cls, f"/html/{i}.jpg"))
        source = routes[photos[(i * 7) % len(photos)][1]]
        routes[f"/cut/{i}.jpg"] = ["image/jpeg", source[1], 3000]
        pairs.append((cls, f"/cut/{i}.jpg"))
    for i in range(N_DUPLICATES):
        cls, original = photos[(i * 11) % len(photos)]
        routes[f"/again/{i}.jpg"] = list(routes[original])
        pairs.append((cls, f"/again/{i}.jpg"))
    return routes, pairs


def count_kept(files: list[Path]) -> dict[str, int]:
    """Files kept, how many are broken (do not fully decode) and how many duplicate another kept file."""
    sys.path.insert(0, str(REPO))
    from toolkit.core.errors import ImageError
    from toolkit.core.images import open_image, perceptual_hash

    broken, duplicates, shas, hashes = 0, 0, set(), []
    for file in sorted(files):
        try:
            img = open_image(file)
        except ImageError:
            broken += 1
            continue
        sha = hashlib.sha256(img.tobytes()).hexdigest()
        ph = int(perceptual_hash(img), 16)
        if sha in shas or any(bin(ph ^ other).count("1") <= 4 for other in hashes):
            duplicates += 1
        shas.add(sha)
        hashes.append(ph)
    return {"kept": len(files), "broken_kept": broken, "duplicates_kept": duplicates}


def child(kind: str, url_file: Path, out: Path) -> None:
    """Run one contender; print one JSON line with its time and memory."""
    lines = [line.split("\t") for line in url_file.read_text().splitlines()]
    if kind == "fastai":
        from fastai.vision.utils import download_images
    else:
        sys.path.insert(0, str(REPO))
        from toolkit.settings import load_settings
        from toolkit.stages.scrape import scrape

        (out / "settings.ini").write_text("[bench]\nmax_size = 400\nallow_private_urls = yes\n")  # a 127.0.0.1 server
        spec = load_settings(out / "settings.ini").get("bench")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if kind == "fastai":
        download_images(out / "images", urls=[url for _, url in lines])  # its defaults: 8 threads, 4 s timeout
        files = [p for p in (out / "images").iterdir() if p.is_file()]
    else:
        scrape(spec, source=f"urls:{url_file}", per_class=10_000)
        records = [json.loads(line) for line in (spec.scrape_dir / "manifest.jsonl").read_text().splitlines()]
        files = [spec.scrape_dir / r["file"] for r in records if r["status"] == "ok"]
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": elapsed, "files": [str(f) for f in files], "peak_rss_mb": usage.ru_maxrss / 1024,
                      "rss_before_mb": rss_before / 1024, "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "URL_FILE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: the benchmark needs ../shared/datasets beside the repository")
    work = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    routes, pairs = build_urls(args.images)
    (work / "routes.json").write_text(json.dumps(routes))
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(work / "routes.json"), str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        url_file = work / "urls.tsv"
        url_file.write_text("".join(f"{cls}\thttp://127.0.0.1:{port}{path}\n" for cls, path in pairs))
        results = {}
        for kind in ("toolkit", "fastai"):
            out = work / kind
            out.mkdir()
            done = subprocess.run([sys.executable, __file__, "--child", kind, str(url_file), str(out)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                sys.exit(f"{kind} failed:\n{done.stderr[-2000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            kept = count_kept([Path(f) for f in figures.pop("files")])
            good = kept["kept"] - kept["broken_kept"]
            results[kind] = {**figures, **kept, "images_per_s": good / figures["seconds"]}
            print(f"{kind:8} {figures['seconds']:6.2f} s  {results[kind]['images_per_s']:6.1f} good images/s  "
                  f"kept {kept['kept']} (broken {kept['broken_kept']}, duplicates {kept['duplicates_kept']})  "
                  f"CPU {figures['cpu_s']:.1f} s  peak RSS {figures['peak_rss_mb']:.0f} MB "
                  f"(after imports {figures['rss_before_mb']:.0f} MB)",
                  flush=True)
    finally:
        server.kill()
        server.wait()
    ours, base = results["toolkit"], results["fastai"]
    summary = {
        "urls": len(pairs), "photos": args.images, "broken_urls": 3 * N_BROKEN_EACH, "duplicate_urls": N_DUPLICATES,
        "latency_s": args.latency,
        "images_per_s": round(ours["images_per_s"], 1), "baseline_images_per_s": round(base["images_per_s"], 1),
        "speedup": round(ours["images_per_s"] / base["images_per_s"], 2),
        "seconds": round(ours["seconds"], 2), "baseline_seconds": round(base["seconds"], 2),
        "peak_rss_mb": round(ours["peak_rss_mb"]), "baseline_peak_rss_mb": round(base["peak_rss_mb"]),
        "rss_after_imports_mb": round(ours["rss_before_mb"]),
        "baseline_rss_after_imports_mb": round(base["rss_before_mb"]),
        "cpu_s": round(ours["cpu_s"], 2), "baseline_cpu_s": round(base["cpu_s"], 2),
        "load_average_1min": round(os.getloadavg()[0], 1), "cpu_cores": os.cpu_count(),
        "broken_kept": ours["broken_kept"], "baseline_broken_kept": base["broken_kept"],
        "duplicates_kept": ours["duplicates_kept"], "baseline_duplicates_kept": base["duplicates_kept"],
        "kept": ours["kept"], "baseline_kept": base["kept"],
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
