"""The scraper against a real local HTTP server serving real photos and the faults of the web."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.settings import load_settings
from toolkit.stages.scrape import ScrapeError, add_class_to_settings, load_manifest, scrape
from toolkit.stages.scrape.dedupe import normalise_url
from toolkit.stages.scrape.http import fetch
from toolkit.stages.scrape.sources import DdgsBackend

LOCAL = "allow_private_urls = yes\n"  # the test server is on 127.0.0.1, refused by default
NO_SLEEP = {"sleep": lambda seconds: None, "backoff_base": 0.001, "backoff_cap": 0.01}


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header declares a 100000 x 100000 canvas."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


class Site:
    """Routes of the test server; `hits` counts requests per path."""

    def __init__(self, photos: list[bytes]):
        self.photos = photos
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.latency = 0.0
        self.slow = 4.0
        self.hold_after: int | None = None  # requests after this many wait for `gate` (at most 60 s)
        self.gate = threading.Event()
        near = Image.open(io.BytesIO(photos[0])).convert("RGB")
        near = near.resize((near.width * 3 // 4, near.height * 3 // 4))
        buffer = io.BytesIO()
        near.save(buffer, format="JPEG", quality=80)
        self.near = buffer.getvalue()

    def route(self, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, delay) for a path."""
        jpeg = {"Content-Type": "image/jpeg"}
        if path.startswith("/photo/"):
            index = int(path.split("/")[2].split(".")[0])
            return 200, jpeg, self.photos[index], 0
        if path == "/missing.jpg":
            return 404, {"Content-Type": "text/html"}, b"<html>not found</html>", 0
        if path.startswith("/flaky/"):
            if self.hits[path] == 1:
                return 500, {"Content-Type": "text/plain"}, b"oops", 0
            return 200, jpeg, self.photos[1], 0
        if path == "/slow.jpg":
            return 200, jpeg, self.photos[2], self.slow
        if path == "/page.jpg":
            return 200, jpeg, b"<!DOCTYPE html><html><body>a web page, not a photo</body></html>" * 20, 0
        if path == "/truncated.jpg":
            return 200, jpeg, self.photos[3][: len(self.photos[3]) // 2], 0
        if path == "/bomb.png":
            return 200, {"Content-Type": "image/png"}, _bomb_png(), 0
        if path in ("/loop-a", "/loop-b"):
            return 302, {"Location": "/loop-b" if path == "/loop-a" else "/loop-a"}, b"", 0
        if path == "/redirect.jpg":
            return 301, {"Location": "/photo/4.jpg"}, b"", 0
        if path in ("/huge.jpg", "/huge-no-length.jpg"):
            return 200, jpeg, self.photos[5] + b"\0" * (3 * 1024 * 1024), 0
        if path == "/wrong-type.bin":
            return 200, {"Content-Type": "text/plain"}, self.photos[6], 0
        if path in ("/copy-a.jpg", "/copy-b.jpg"):
            return 200, jpeg, self.photos[7], 0
        if path == "/near-copy.jpg":
            return 200, jpeg, self.near, 0
        if path in ("/look-alike-a.jpg", "/look-alike-b.jpg"):
            return 200, jpeg, self.photos[40 if path.endswith("a.jpg") else 41], 0
        if "evil" in path:
            return 200, jpeg, self.photos[8], 0
        return 404, {}, b"", 0


@pytest.fixture(scope="module")
def photos(clothing_small) -> list[bytes]:
    files = sorted((clothing_small / "train" / "t-shirt").iterdir())[:10]
    files += sorted((clothing_small / "train" / "pants").iterdir())[:30]
    files += [clothing_small / "train" / "dress" / name for name in LOOK_ALIKES]
    return [f.read_bytes() for f in files]


# two different dresses shot on one floor: perceptual hashes 4 bits apart (photos[40] and photos[41])
LOOK_ALIKES = ["6e143162-9472-43c3-8db1-04eeea838ae8.jpg", "6eaff8d0-517f-4fad-ad54-4249b8c53ff9.jpg"]


@pytest.fixture()
def site(photos):
    state = Site(photos)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path
            with state.lock:
                state.hits[path] = state.hits.get(path, 0) + 1
                held = state.hold_after is not None and sum(state.hits.values()) > state.hold_after
            if held:
                state.gate.wait(60)
            status, headers, body, delay = state.route(path)
            time.sleep(delay + state.latency)
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "no-length" not in path:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for start in range(0, len(body), 65536):
                    self.wfile.write(body[start:start + 65536])
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def make_spec(tmp_path: Path, body: str = "[web]\nclasses = shirts\nmax_size = 128\n" + LOCAL):
    (tmp_path / "settings.ini").write_text(body)
    return load_settings(tmp_path / "settings.ini").get(body.split("]")[0].lstrip("["))


class FakeSearch:
    """A search backend returning ddgs-shaped results pointing at the test server."""

    name = "fake"

    def __init__(self, urls: list[str], fail_times: int = 0):
        self.urls, self.fail_times, self.calls = urls, fail_times, []

    def __call__(self, query, *, max_results, **options):
        self.calls.append((query, max_results, options))
        if len(self.calls) <= self.fail_times:
            from ddgs.exceptions import RatelimitException

            raise RatelimitException("202 Ratelimit")
        return [{"title": f"{query} {i}", "image": url, "thumbnail": url, "url": f"https://example.org/page{i}",
                 "height": 533, "width": 400, "source": "Fake"} for i, url in enumerate(self.urls[:max_results])]


FAULTS = {
    "/missing.jpg": "rejected:http-404",
    "/slow.jpg": "rejected:timeout",
    "/page.jpg": "rejected:not-an-image",
    "/truncated.jpg": "rejected:truncated",
    "/bomb.png": "rejected:too-many-pixels",
    "/loop-a": "rejected:too-many-redirects",
    "/huge.jpg": "rejected:too-large",
    "/copy-b.jpg": "duplicate-of:",
    "/near-copy.jpg": "duplicate-of:",
}
GOOD = ["/photo/0.jpg", "/flaky/1.jpg", "/redirect.jpg", "/wrong-type.bin", "/copy-a.jpg",
        "/img/..%2F..%2Fevil.jpg", "/look-alike-a.jpg", "/look-alike-b.jpg"]  # look-alikes: not copies


def test_faults_of_the_web(site, tmp_path):
    spec = make_spec(tmp_path)
    urls = [site.base + p for p in ["/photo/0.jpg", "/missing.jpg", "/flaky/1.jpg", "/slow.jpg", "/page.jpg",
                                    "/truncated.jpg", "/bomb.png", "/loop-a", "/redirect.jpg", "/huge.jpg",
                                    "/wrong-type.bin", "/copy-a.jpg", "/copy-b.jpg", "/near-copy.jpg",
                                    "/img/..%2F..%2Fevil.jpg", "/look-alike-a.jpg", "/look-alike-b.jpg"]]
    urls += ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg"]
    search = FakeSearch(urls)
    report = scrape(spec, search=search, per_class=20, timeout=1.5, max_bytes=2 * 1024 * 1024, **NO_SLEEP)
    records = load_manifest(spec.scrape_dir)
    by_path = {r["url"].replace(site.base, ""): r for r in records}
    assert len(records) == len(urls)
    for path, status in FAULTS.items():
        assert by_path[path]["status"].startswith(status), (path, by_path[path])
    for path in GOOD:
        assert by_path[path]["status"] == "ok", (path, by_path[path])
    assert by_path["file:///etc/passwd"]["status"] == "rejected:bad-scheme"
    assert by_path["ftp://127.0.0.1/x.jpg"]["status"] == "rejected:bad-scheme"
    assert site.hits["/flaky/1.jpg"] == 2  # a 500, then the retry succeeded
    assert site.hits["/loop-a"] + site.hits["/loop-b"] <= 7  # bounded redirects
    assert by_path["/copy-b.jpg"]["status"] == f"duplicate-of:{by_path['/copy-a.jpg']['file']}"
    assert by_path["/near-copy.jpg"]["status"] == f"duplicate-of:{by_path['/photo/0.jpg']['file']}"
    # every ok line: a real RGB JPEG with long side <= max_size, inside the class folder, all fields present
    for record in records:
        assert {"class", "query", "backend", "rank", "url", "page_url", "title", "time", "http_status", "bytes",
                "sha256", "phash", "width", "height", "file", "status"} <= set(record)
    ok = [r for r in records if r["status"] == "ok"]
    for record in ok:
        path = spec.scrape_dir / record["file"]
        assert path.parent == spec.scrape_dir / "shirts"
        img = Image.open(path)
        assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 128
        assert (record["width"], record["height"]) == img.size
        assert record["query"] == "shirts" and record["page_url"].startswith("https://example.org/")
    files = {p.relative_to(spec.scrape_dir).as_posix() for p in (spec.scrape_dir / "shirts").iterdir()}
    assert files == {r["file"] for r in ok}
    rep = report.classes["shirts"]
    assert rep.ok == len(GOOD) and rep.duplicates == 2 and rep.shortfall == 20 - len(GOOD)
    assert rep.rejected["timeout"] == 1 and sum(rep.rejected.values()) == 9
    assert "shortfall" in report.format()


def test_rerun_uses_cached_queries_and_downloads_nothing_twice(site, tmp_path):
    spec = make_spec(tmp_path)
    search = FakeSearch([f"{site.base}/photo/{i}.jpg" for i in range(10, 16)])
    scrape(spec, search=search, per_class=4, **NO_SLEEP)
    calls, hits = len(search.calls), dict(site.hits)
    assert len([r for r in load_manifest(spec.scrape_dir) if r["status"] == "ok"]) == 4
    scrape(spec, search=search, per_class=4, **NO_SLEEP)
    assert len(search.calls) == calls and site.hits == hits  # nothing searched or fetched again
    scrape(spec, search=search, per_class=6, **NO_SLEEP)  # a bigger quota fetches only the new ones
    assert all(n == 1 for n in site.hits.values())
    assert len(search.calls) == calls
    assert len(list((spec.scrape_dir / ".cache" / "queries").glob("*.json"))) >= 1


def test_ratelimit_backoff_then_success(site, tmp_path):
    spec = make_spec(tmp_path)
    search = FakeSearch([f"{site.base}/photo/{i}.jpg" for i in range(10, 13)], fail_times=2)
    delays: list[float] = []
    report = scrape(spec, search=search, per_class=3, sleep=delays.append, backoff_base=1.0, backoff_cap=60)
    assert report.classes["shirts"].ok == 3
    assert len(search.calls) == 3 and len(delays) == 2
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # exponential, with jitter


def test_ratelimit_gives_up_with_one_line_and_resumes(site, tmp_path):
    spec = make_spec(tmp_path, "[web]\nclasses = shirts, pants\nmax_size = 64\n" + LOCAL)
    urls = [f"{site.base}/photo/{i}.jpg" for i in range(10, 13)]

    class PantsLimited(FakeSearch):
        def __call__(self, query, *, max_results, **options):
            if query == "pants":
                from ddgs.exceptions import RatelimitException

                raise RatelimitException("202 Ratelimit")
            return super().__call__(query, max_results=max_results, **options)

    with pytest.raises(ScrapeError) as info:
        scrape(spec, search=PantsLimited(urls), per_class=2, search_retries=2, **NO_SLEEP)
    message = str(info.value)
    assert "\n" not in message and "3 tries" in message and "RatelimitException" in message and "rerun" in message
    search = FakeSearch(urls + [f"{site.base}/photo/{i}.jpg" for i in range(20, 23)])
    report = scrape(spec, search=search, per_class=2, **NO_SLEEP)
    assert [q for q, _, _ in search.calls] == ["pants"]  # shirts' query came from the cache
    assert report.classes["shirts"].ok == 2 and report.classes["pants"].ok == 2


def test_same_image_in_two_classes_is_a_conflict(site, tmp_path):
    spec = make_spec(tmp_path, "[web]\nclasses = shirts, pants\nmax_size = 64\n" + LOCAL)
    urls = tmp_path / "urls.tsv"
    urls.write_text(f"shirts\t{site.base}/photo/0.jpg\nshirts\t{site.base}/photo/11.jpg\n"
                    f"pants\t{site.base}/photo/12.jpg\npants\t{site.base}/copy-a.jpg\npants\t{site.base}/photo/7.jpg\n"
                    f"pants\t{site.base}/photo/0.jpg\n")
    report = scrape(spec, source=f"urls:{urls}", per_class=5, **NO_SLEEP)
    records = load_manifest(spec.scrape_dir)
    conflicts = [r for r in records if r.get("conflict")]
    assert len(conflicts) == 1  # photo 0 listed for pants too (photo 7 under two URLs is a plain duplicate)
    first = [r for r in records if r["url"].endswith("/photo/0.jpg") and r["class"] == "shirts"][0]
    assert {"status": f"duplicate-of:{first['file']}", "conflict": "shirts"}.items() <= \
        [r for r in conflicts if r["url"].endswith("/photo/0.jpg")][0].items()
    assert report.classes["pants"].conflicts == 1 and report.classes["pants"].duplicates == 2
    assert records[0]["backend"] == "urls" and records[0]["rank"] == 1


def test_class_names_cannot_escape(site, tmp_path):
    """One name, one folder: names that are not one plain folder are refused, never rewritten."""
    spec = make_spec(tmp_path, "[web]\nmax_size = 64\n" + LOCAL)
    search = FakeSearch([f"{site.base}/photo/{i}.jpg" for i in range(10, 12)])
    for bad in ["../../etc", "/abs", ".cache", "..", "a/b", "_private", "manifest.jsonl"]:
        with pytest.raises(ToolkitError) as info:
            scrape(spec, search=search, classes=[bad], per_class=1, **NO_SLEEP)
        assert "\n" not in str(info.value) and repr(bad.strip()) in str(info.value)
    assert not list(tmp_path.rglob("*.jpg")) and not (tmp_path / "etc").exists() and not search.calls
    scrape(spec, search=search, classes=["ok"], per_class=1, **NO_SLEEP)
    for record in load_manifest(spec.scrape_dir):
        if record["file"]:
            assert ".." not in Path(record["file"]).parts and record["file"].startswith("ok/")


def test_folder_source_keeps_original_paths(cars, tmp_path):
    spec = make_spec(tmp_path, "[cars]\nmax_size = 96\n")
    report = scrape(spec, source=f"folder:{cars}", per_class=3, **NO_SLEEP)
    assert set(report.classes) == {"SUV", "Sedan"}
    records = load_manifest(spec.scrape_dir)
    assert len(records) == 6 and all(r["status"] == "ok" and r["backend"] == "folder" for r in records)
    for record in records:
        assert Path(record["source"]).is_file() and Path(record["source"]).parent.name == record["class"]
        assert max(Image.open(spec.scrape_dir / record["file"]).size) <= 96
    scrape(spec, source=f"folder:{cars}", per_class=3, **NO_SLEEP)
    assert len(load_manifest(spec.scrape_dir)) == 6


def test_ddgs_adapter_maps_recorded_results(monkeypatch):
    recorded = [
        {"title": "Red cotton t-shirt", "image": "https://cdn.example.com/tee.jpg",
         "thumbnail": "https://tse2.mm.bing.net/th?id=OIP.abc", "url": "https://shop.example.com/tee",
         "height": 1200, "width": 900, "source": "Bing"},
        {"title": "Blue tee", "image": "https://img.example.net/blue.png", "thumbnail": "https://t/x",
         "url": "https://example.net/blue", "height": "640", "width": "", "source": "Bing"},
    ]
    seen = {}

    class FakeDDGS:
        def __init__(self, **kwargs):
            seen["init"] = kwargs

        def images(self, query, **kwargs):
            seen["query"], seen["kwargs"] = query, kwargs
            return recorded

    import ddgs

    monkeypatch.setattr(ddgs, "DDGS", FakeDDGS)
    results = DdgsBackend()("t-shirt photo", max_results=20, region="us-en", safesearch="off", size="Large",
                            type_image="photo", layout="Square", license_image="Public")
    assert seen["query"] == "t-shirt photo"
    assert seen["kwargs"] == {"region": "us-en", "safesearch": "off", "size": "Large", "type_image": "photo",
                              "layout": "Square", "license_image": "Public", "max_results": 20}
    assert results[0] == recorded[0]
    assert results[1]["height"] == 640 and results[1]["width"] is None and results[1]["image"].endswith(".png")


def test_fetch_streams_no_more_than_the_limit(site):
    result = fetch(f"{site.base}/huge.jpg", max_bytes=100_000, allow_private=True)
    assert result.reason == "too-large" and "Content-Length" in result.detail
    # no header: stop reading at the limit
    result = fetch(f"{site.base}/huge-no-length.jpg", max_bytes=100_000, allow_private=True)
    assert result.reason == "too-large" and "stopped reading" in result.detail and result.data is None
    result = fetch(f"{site.base}/wrong-type.bin", allow_private=True)
    assert result.data is not None and result.http_status == 200


def test_torn_manifest_line_and_stray_files_are_cleaned(site, tmp_path):
    spec = make_spec(tmp_path)
    search = FakeSearch([f"{site.base}/photo/{i}.jpg" for i in range(10, 14)])
    scrape(spec, search=search, per_class=2, **NO_SLEEP)
    root = spec.scrape_dir
    manifest = root / "manifest.jsonl"
    good = manifest.read_bytes()
    manifest.write_bytes(good + b'{"class": "shirts", "url": "http://torn')  # killed mid-line
    (root / "shirts" / "s-orphan-0123456789ab.jpg").write_bytes(b"x")  # renamed, never recorded
    (root / "shirts" / "s-x.jpg.part").write_bytes(b"x")
    (root / "shirts" / "mine.jpg").write_bytes(b"x")  # not the scraper's: left alone
    assert len(load_manifest(root)) == 2 and manifest.read_bytes() == good
    assert b"http://torn" in (root / "manifest.rejected").read_bytes()  # set aside, not dropped
    report = scrape(spec, search=search, per_class=3, **NO_SLEEP)
    names = sorted(p.name for p in (root / "shirts").iterdir())
    assert "mine.jpg" in names and not any("orphan" in n or n.endswith(".part") for n in names)
    assert len(load_manifest(root)) == 3
    moved = sorted(p.name for p in (root / "_quarantine").rglob("*") if p.is_file())  # moved, never deleted
    assert moved == ["s-orphan-0123456789ab.jpg", "s-x.jpg.part"]
    assert "moved 2 file(s)" in report.format()


def test_normalise_url():
    assert normalise_url("HTTP://Example.COM:80/a%7Eb.jpg?b=2&a=1&utm_source=x#frag") == \
        "http://example.com/a~b.jpg?a=1&b=2"


def test_add_class_keeps_comments(tmp_path):
    settings = tmp_path / "settings.ini"
    settings.write_text("# project\n[DEFAULT]\nseed = 1\n\n[clothing]\n# six classes\nclasses = t-shirts, jeans"
                        "  \nqueries = {class} | {class} photo\n\n[other]\nclasses = a\n")
    assert add_class_to_settings(settings, "clothing", "polo shirt")
    text = settings.read_text()
    assert "# project" in text and "# six classes" in text and "classes = a\n" in text
    assert load_settings(settings).get("clothing").classes == ["t-shirts", "jeans", "polo shirt"]
    assert not add_class_to_settings(settings, "clothing", "polo shirt")
    with pytest.raises(ToolkitError, match="no \\[nope\\] section"):
        add_class_to_settings(settings, "nope", "x")


# ------------------------------------------------------------------ the CLI


def _project(tmp_path: Path, body: str) -> Path:
    (tmp_path / "settings.ini").write_text(body)
    return tmp_path


def test_cli_urls_source_and_add_class(site, tmp_path):
    root = _project(tmp_path, "# my project\n[shop]\n# what we sell\nclasses = shirts\nmax_size = 64\n" + LOCAL)
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"shirts\t{site.base}/photo/{i}.jpg\n" for i in range(10, 13)) +
                    "".join(f"polo shirt\t{site.base}/photo/{i}.jpg\n" for i in range(20, 23)))
    done = run_cli("scrape", "shop", "--source", f"urls:{urls}", "--per-class", "2", "--quiet", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"shirts": {"candidates": 2, "ok": 2, "duplicates": 0, "conflicts": 0, "rejected": {},
                                  "shortfall": 0, "skipped": 1}}
    assert "candidates" in done.stdout  # the table
    done = run_cli("scrape", "shop", "--source", f"urls:{urls}", "--add-class", "polo shirt", "--per-class", "3",
                   "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    text = (root / "settings.ini").read_text()
    assert "# what we sell" in text and "classes = shirts, polo shirt" in text
    assert len(list((root / "scrape" / "shop" / "polo shirt").glob("*.jpg"))) == 3
    assert len(list((root / "scrape" / "shop" / "shirts").glob("*.jpg"))) == 2  # only the new class scraped


@pytest.mark.parametrize(("settings", "args", "message"), [
    ("[web]\nclasses = a\n", ["--source", "urls:nope.tsv"], "urls:nope.tsv: file not found"),
    ("[web]\nclasses = a\n", ["--source", "folder:nowhere"], "folder:nowhere: not a folder"),
    ("[web]\nclasses = a\n", ["--source", "gopher"], "--source gopher: unknown source"),
    ("[web]\nclasses = a\n", ["--per-class", "0"], "--per-class 0: must be a positive"),
    ("[web]\n", ["--source", "ddgs"], "settings [web] classes: no classes"),
    ("[web]\nsafesearch = maybe\n", [], "settings [web] safesearch = 'maybe'"),
    ("[web]\nregion = Germany\n", [], "settings [web] region = 'Germany'"),
    ("[web]\nclasses = a\n", ["--source", "urls:bad.tsv"], "bad.tsv:2: expected class<TAB>url"),
    ("[web]\nclasses = zebra\n", ["--source", "urls:one.tsv"], "has no class 'zebra'"),
    ("[web]\nclasses = a\n", ["--source", "urls:good.tsv", "--test-split"], "--test-split: only the fashion-mnist"),
    ("[web]\nclasses = a\n", ["--add-class", "x,y"], "--add-class 'x,y': a class name must"),
])
def test_cli_errors_are_one_line(tmp_path, settings, args, message):
    root = _project(tmp_path, settings)
    (root / "bad.tsv").write_text("a\thttp://127.0.0.1:9/x.jpg\nno tab here\n")
    (root / "good.tsv").write_text("# empty on purpose\n")
    (root / "one.tsv").write_text("a\thttp://127.0.0.1:9/x.jpg\n")
    done = run_cli("scrape", "web", "--quiet", *args, cwd=root)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_cli_ratelimit_error_is_one_line(tmp_path):
    """The real ddgs backend offline: the network guard makes every search fail; one clear line."""
    root = _project(tmp_path, "[web]\nclasses = a\n")
    code = ("import sys; from toolkit import cli; from toolkit.stages.scrape import run as scrape\n"
            "from ddgs.exceptions import RatelimitException\n"
            "def boom(self, q, **k): raise RatelimitException('202 Ratelimit')\n"
            "scrape.DdgsBackend.__call__ = boom; scrape.time.sleep = lambda s: None\n"
            "sys.exit(cli.main(['scrape', 'web', '--quiet']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ddgs search 'a' failed after 5 tries (RatelimitException")
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_fashion_mnist_keeps_test_split(tmp_path):
    from toolkit.stages.scrape.fashion_mnist import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    root = _project(tmp_path, "[fashion-mnist]\nper_class = 2\n")
    done = run_cli("scrape", "fashion-mnist", "--test-split", "--test-per-class", "1", cwd=root)  # with bars
    assert done.returncode == 0, done.stderr
    assert len(list((root / "scrape" / "fashion-mnist").rglob("*.png"))) == 20
    assert len(list((root / "scrape" / "fashion-mnist-test").rglob("*.png"))) == 10


def test_sigkill_then_rerun_is_consistent(site, tmp_path):
    site.latency = 0.05
    site.hold_after = 10  # the rest wait until after the kill, so it lands mid-run however loaded the machine
    root = _project(tmp_path, "[web]\nclasses = pants, shirts\nmax_size = 64\n" + LOCAL)
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"pants\t{site.base}/photo/{i}.jpg\n" for i in range(10, 30)) +
                    f"pants\t{site.base}/copy-a.jpg\npants\t{site.base}/copy-b.jpg\n" +
                    "".join(f"shirts\t{site.base}/photo/{i}.jpg\n" for i in range(0, 7)))
    manifest = root / "scrape" / "web" / "manifest.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "scrape", "web", "--source", f"urls:{urls}",
                                "--per-class", "30", "--workers", "2", "--quiet"], cwd=root, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    site.gate.set()
    first_lines = manifest.read_bytes().count(b"\n")
    assert 6 <= first_lines < 29, "the kill should land mid-run"
    hits_before = dict(site.hits)
    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--per-class", "30", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    records = load_manifest(root / "scrape" / "web")
    urls_seen = [(r["class"], r["url"]) for r in records]
    assert len(urls_seen) == len(set(urls_seen)) == 29  # one line per candidate, none twice
    # a URL recorded before the kill is never fetched again
    recorded_before = {r["url"] for r in records[:first_lines]}
    for url in recorded_before:
        path = url.replace(site.base, "")
        assert site.hits[path] == hits_before[path]
    ok = [r for r in records if r["status"] == "ok"]
    files = {p.relative_to(root / "scrape" / "web").as_posix()
             for p in (root / "scrape" / "web").rglob("*") if p.is_file() and ".cache" not in p.parts
             and "_quarantine" not in p.parts and p.name not in ("manifest.jsonl", ".lock")}
    assert files == {r["file"] for r in ok}  # no partial, no unrecorded file; every ok file exists
    assert len({r["sha256"] for r in ok}) == len(ok) == 28


def test_settings_source_key_is_relative_to_settings(cars, tmp_path):
    (tmp_path / "data").symlink_to(cars)
    root = _project(tmp_path, "[cars]\nsource = folder:data\nmax_size = 48\nper_class = 2\n")
    done = run_cli("scrape", "cars", "--settings", root / "settings.ini", "--classes", "SUV",
                   cwd=root.parent)  # another working folder, progress bars on
    assert done.returncode == 0, done.stderr
    assert "SUV" in done.stdout and len(list((root / "scrape" / "cars" / "SUV").glob("*.jpg"))) == 2
    assert not (root / "scrape" / "cars" / "Sedan").exists()


def test_rerun_retries_transient_failures_only(site, tmp_path):
    spec = make_spec(tmp_path)
    search = FakeSearch([f"{site.base}/slow.jpg", f"{site.base}/missing.jpg", f"{site.base}/photo/10.jpg"])
    report = scrape(spec, search=search, per_class=3, timeout=0.3, **NO_SLEEP)
    assert report.classes["shirts"].rejected == {"timeout": 1, "http-404": 1}
    site.slow = 0.0  # the server recovered
    report = scrape(spec, search=search, per_class=3, timeout=2, **NO_SLEEP)
    assert site.hits["/slow.jpg"] == 2 and site.hits["/missing.jpg"] == 1 and site.hits["/photo/10.jpg"] == 1
    rep = report.classes["shirts"]
    assert (rep.candidates, rep.ok, dict(rep.rejected), rep.shortfall) == (3, 2, {"http-404": 1}, 1)
    assert [r["status"] for r in load_manifest(spec.scrape_dir)].count("rejected:timeout") == 1


def test_add_class_without_classes_key(tmp_path):
    settings = tmp_path / "settings.ini"
    settings.write_text("[web]\n# found from the folders\nmax_size = 64\n")
    assert add_class_to_settings(settings, "web", "polo shirt", existing=["shirts", "pants"])
    assert load_settings(settings).get("web").classes == ["shirts", "pants", "polo shirt"]
    assert "# found from the folders" in settings.read_text()
