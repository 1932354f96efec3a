"""Fault injection for the scraper (issue 13: items 1, 5, 6, 8's --add-class, 9, 10), on real files
and a real HTTP server on 127.0.0.1: torn manifests, two runs at once, kill -9, loopback and
redirects to it, a drip-feeding server, Ctrl-C, folder imports over the default quota, bad class
names. Each asserts that no file is lost and that a bad input gets one line, never a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from PIL import Image

from toolkit.settings import load_settings
from toolkit.stages.scrape import load_manifest, scrape
from toolkit.stages.scrape.http import address_kind, fetch
from toolkit.stages.scrape.manifest import read_manifest, scrape_lock

LOCAL = "allow_private_urls = yes\n"


def jpeg(seed: int, size: int = 48) -> bytes:
    """A real JPEG of seeded noise: every seed a different picture (and perceptual hash)."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Server:
    """Routes: /photo/N.jpg, /slow/N.jpg (latency), /to-localhost (302 to localhost), /drip-body,
    /drip-head (one byte every `drip` seconds), /hang (answers nothing for 30 s)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.hosts: list[str] = []
        self.lock = threading.Lock()
        self.latency = 0.0
        self.drip = 0.2
        self.gate = threading.Event()  # /slow/ answers wait for it (at most 60 s) once `gated` is set
        self.gated = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with outer.lock:
                    outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                    outer.hosts.append(self.headers.get("Host", ""))
                try:
                    outer.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path.startswith(("/photo/", "/slow/")):
            if path.startswith("/slow/"):
                if self.gated:
                    self.gate.wait(60)
                time.sleep(self.latency)
            body = jpeg(int(path.rsplit("/", 1)[1].split(".")[0]))
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif path == "/to-localhost":
            h.send_response(302)
            h.send_header("Location", f"http://localhost:{self.port}/photo/1.jpg")
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif path == "/drip-body":
            body = jpeg(2)
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for byte in body:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(self.drip)
        elif path == "/drip-head":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"x" * 1000:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(self.drip)
        elif path.startswith("/hang"):
            time.sleep(30)
        else:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def server():
    state = Server()
    yield state
    state.close()


def project(tmp_path: Path, body: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "settings.ini").write_text(body)
    return tmp_path


def url_file(path: Path, base: str, plan: dict[str, range], route: str = "photo") -> Path:
    path.write_text("".join(f"{cls}\t{base}/{route}/{i}.jpg\n" for cls, numbers in plan.items() for i in numbers))
    return path


def contents(root: Path) -> dict[str, str]:
    """sha256 of every image-ish file under root (class folders and quarantine) -> one path."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and ".cache" not in path.parts and path.name not in ("manifest.jsonl", ".lock",
                                                                              "manifest.rejected"):
            found[hashlib.sha256(path.read_bytes()).hexdigest()] = path.relative_to(root).as_posix()
    return found


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# ------------------------------------------------------------------ item 1: nothing lost


@pytest.mark.parametrize("tear", ["no-newline", "torn-json", "torn-utf8"])
def test_torn_manifest_then_scrape_one_class_deletes_nothing(server, tmp_path, tear):
    root = project(tmp_path, "[web]\nclasses = a, b\nmax_size = 64\n" + LOCAL)
    urls = url_file(tmp_path / "urls.tsv", server.base, {"a": range(0, 4), "b": range(10, 14)})
    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--per-class", "3", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    scraped = root / "scrape" / "web"
    manifest = scraped / "manifest.jsonl"
    good = manifest.read_bytes()
    if tear == "no-newline":  # a valid last line that lost its newline: it must be kept
        manifest.write_bytes(good[:-1])
    elif tear == "torn-json":
        manifest.write_bytes(good + b'{"class": "b", "url": "http://to')
    else:  # a tear inside a UTF-8 character
        manifest.write_bytes(good + '{"class": "b", "title": "caf\u00e9'.encode()[:-1])
    stray_a, stray_b = scraped / "a" / "s-stray-000000000000.jpg", scraped / "b" / "s-stray-111111111111.jpg"
    stray_a.write_bytes(jpeg(90))
    stray_b.write_bytes(jpeg(91))
    before = contents(scraped)
    b_before = sorted(p.name for p in (scraped / "b").iterdir())

    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--classes", "a", "--per-class", "4", "--quiet",
                   cwd=root)
    assert done.returncode == 0, done.stderr
    after = contents(scraped)
    assert set(before) <= set(after), "a file was lost"
    assert sorted(p.name for p in (scraped / "b").iterdir()) == b_before  # --classes a never touches b
    assert not stray_a.exists() and after[hashlib.sha256(jpeg(90)).hexdigest()].startswith("_quarantine/")
    assert "_quarantine" in done.stdout and "nothing was deleted" in done.stdout
    records, bad, unterminated = read_manifest(scraped)
    assert not bad and not unterminated
    assert len([r for r in records if r["status"] == "ok"]) == 7  # 3 + 3 before, 1 more for a
    if tear == "no-newline":
        assert manifest.read_bytes().startswith(good) and not (scraped / "manifest.rejected").exists()
    else:
        assert (scraped / "manifest.rejected").read_bytes().startswith(b'{"class": "b"')
        assert "manifest.rejected" in done.stdout


def test_load_manifest_repairs_only_what_does_not_parse(tmp_path):
    lines = [json.dumps({"class": "a", "url": f"http://x/{i}", "status": "ok"}).encode() for i in range(3)]
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(lines[0] + b"\n" + b"\xff\xfe not json\n" + b"[1, 2]\n" + lines[1] + b"\n" + lines[2])
    assert [r["url"] for r in load_manifest(tmp_path, repair=False)] == ["http://x/0", "http://x/1", "http://x/2"]
    assert len(load_manifest(tmp_path)) == 3  # no scrape running: repaired
    assert path.read_bytes() == b"\n".join(lines) + b"\n"
    assert (tmp_path / "manifest.rejected").read_bytes() == b"\xff\xfe not json\n[1, 2]\n"
    path.write_bytes(path.read_bytes() + b'{"class": "a", "ur')
    with scrape_lock(tmp_path):  # a scrape is running: read, never touch the file it appends to
        assert len(load_manifest(tmp_path)) == 3
        assert path.read_bytes().endswith(b'"ur')


def test_two_scrapes_at_once_second_exits_2_with_one_line(server, tmp_path):
    server.gated = True  # the first scrape stays mid-download until the second has been refused
    root = project(tmp_path, "[web]\nclasses = a\nmax_size = 64\n" + LOCAL)
    urls = url_file(tmp_path / "urls.tsv", server.base, {"a": range(0, 30)}, route="slow")
    first = subprocess.Popen([sys.executable, "-m", "toolkit", "scrape", "web", "--source", f"urls:{urls}",
                              "--workers", "1", "--quiet"], cwd=root, env=cli_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not server.hits:
            time.sleep(0.02)
        assert server.hits, "the first scrape never started"
        done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--quiet", cwd=root)
        assert done.returncode == 2
        line = one_error_line(done)
        assert "another scrape" in line and f"pid {first.pid}" in line
    finally:
        first.kill()
        server.gate.set()
        first.wait()
    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--quiet", cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr  # kill -9 released the lock


def test_kill_9_mid_scrape_then_rerun_loses_nothing(server, tmp_path):
    server.latency = 0.03
    root = project(tmp_path, "[web]\nclasses = a, b\nmax_size = 64\n" + LOCAL)
    urls = url_file(tmp_path / "urls.tsv", server.base, {"a": range(0, 25), "b": range(100, 125)}, route="slow")
    scraped = root / "scrape" / "web"
    lost = 0
    for kill_after in (4, 15, 30):
        process = subprocess.Popen([sys.executable, "-m", "toolkit", "scrape", "web", "--source", f"urls:{urls}",
                                    "--workers", "4", "--quiet"], cwd=root, env=cli_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest = scraped / "manifest.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.is_file() and manifest.read_bytes().count(b"\n") >= kill_after:
                break
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        before = contents(scraped)
        assert read_manifest(scraped)[0], "the kill should land after some lines"
        done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--per-class", "1", "--quiet", cwd=root)
        assert done.returncode == 0, done.stderr
        lost += len(set(before) - set(contents(scraped)))
    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--quiet", cwd=root)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert lost == 0
    records, bad, unterminated = read_manifest(scraped)
    assert not unterminated and not bad
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 50 and all((scraped / r["file"]).is_file() for r in ok)
    in_classes = {p.relative_to(scraped).as_posix() for c in ("a", "b") for p in (scraped / c).iterdir()}
    assert in_classes == {r["file"] for r in ok}  # the class folders hold exactly the recorded files


# ------------------------------------------------------------------ item 5: SSRF


def test_loopback_and_private_urls_are_refused_by_default(server, tmp_path):
    port = server.port
    refused = [f"http://127.0.0.1:{port}/photo/1.jpg", f"http://localhost:{port}/photo/2.jpg",
               f"http://[::1]:{port}/photo/3.jpg", f"http://0.0.0.0:{port}/photo/4.jpg",
               f"http://[::ffff:127.0.0.1]:{port}/photo/5.jpg", f"http://2130706433:{port}/photo/6.jpg",
               f"http://127.1:{port}/photo/7.jpg", "http://10.1.2.3/x.jpg", "http://192.168.0.1/x.jpg",
               "http://169.254.169.254/latest/meta-data/", "http://224.0.0.1/x.jpg", "http://[fe80::1]/x.jpg",
               "http://100.64.0.1/x.jpg", "http://240.0.0.1/x.jpg"]
    root = project(tmp_path, "[web]\nclasses = a\nmax_size = 64\n")
    (tmp_path / "urls.tsv").write_text("".join(f"a\t{url}\n" for url in refused))
    done = run_cli("scrape", "web", "--source", f"urls:{tmp_path / 'urls.tsv'}", "--quiet", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    assert not server.hits  # nothing reached the server
    records = load_manifest(root / "scrape" / "web")
    assert len(records) == len(refused)
    for record in records:
        assert record["status"] == "rejected:private-address", record
        assert record["http_status"] is None and "allow_private_urls = yes" in record["error"]
    assert json.loads(done.stdout.strip().splitlines()[-1])["a"]["rejected"] == {"private-address": len(refused)}
    assert address_kind("93.184.216.34") is None and address_kind("2606:2800:220:1::") is None
    # the same section opted in fetches them (tests, intranets), and the refusals are retried
    (root / "settings.ini").write_text("[web]\nclasses = a\nmax_size = 64\n" + LOCAL)
    (tmp_path / "urls.tsv").write_text("".join(f"a\t{url}\n" for url in refused[:2]))
    done = run_cli("scrape", "web", "--source", f"urls:{tmp_path / 'urls.tsv'}", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    assert server.hits == {"/photo/1.jpg": 1, "/photo/2.jpg": 1}


def test_redirect_to_loopback_is_refused(server, tmp_path):
    result = fetch(f"{server.base}/to-localhost", trusted_hosts={"127.0.0.1"})  # the first hop trusted
    assert result.reason == "private-address" and result.data is None and result.http_status is None
    assert "localhost resolves to 127.0.0.1" in result.detail and "redirected to" in result.detail
    assert server.hits == {"/to-localhost": 1}  # the redirect target was never fetched
    spec = load_settings(project(tmp_path, "[web]\nclasses = a\nmax_size = 64\n") / "settings.ini").get("web")
    (tmp_path / "urls.tsv").write_text(f"a\t{server.base}/to-localhost\n")
    report = scrape(spec, source=f"urls:{tmp_path / 'urls.tsv'}", trusted_hosts={"127.0.0.1"})
    assert report.classes["a"].rejected == {"private-address": 1}
    [record] = load_manifest(spec.scrape_dir)
    assert record["http_status"] is None and record["status"] == "rejected:private-address"


def test_connects_to_the_checked_address_without_a_second_lookup(server, monkeypatch):
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    result = fetch(f"http://localhost:{server.port}/photo/3.jpg", allow_private=True)
    assert result.data == jpeg(3)
    assert lookups == ["localhost"]  # one lookup, then a connection to its checked address
    assert server.hosts == [f"localhost:{server.port}"]  # the Host header is still the name


# ------------------------------------------------------------------ item 6: drip-feed, Ctrl-C


@pytest.mark.parametrize("path", ["/drip-body", "/drip-head"])
def test_drip_feed_download_ends_within_its_timeout(server, path):
    start = time.monotonic()
    result = fetch(server.base + path, timeout=1.0, allow_private=True, retries=0)
    elapsed = time.monotonic() - start
    assert result.reason == "timeout" and result.data is None, result
    assert elapsed < 1.8, f"a 1 s download took {elapsed:.1f} s"


def test_ctrl_c_does_not_wait_for_hanging_downloads(server, tmp_path):
    root = project(tmp_path, "[web]\nclasses = a\nmax_size = 64\n" + LOCAL)
    (tmp_path / "urls.tsv").write_text("".join(f"a\t{server.base}/hang?{i}\n" for i in range(8)))
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "scrape", "web", "--source",
                                f"urls:{tmp_path / 'urls.tsv'}", "--workers", "4", "--quiet"], cwd=root,
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(server.hits.values()) < 4:
        time.sleep(0.02)
    assert sum(server.hits.values()) == 4  # four downloads hang in flight
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert process.returncode == 130 and "Traceback" not in stderr, (process.returncode, stderr)
    assert elapsed < 3.0, f"Ctrl-C took {elapsed:.1f} s (the download timeout is 10 s)"
    records, bad, _ = read_manifest(root / "scrape" / "web")
    assert not bad


# ------------------------------------------------------------------ item 10: no silent truncation


def test_folder_import_over_the_default_quota_takes_all_and_says_so(tmp_path):
    source = tmp_path / "photos"
    for cls, count in (("daisy", 160), ("tulip", 3)):
        (source / cls).mkdir(parents=True)
        for i in range(count):
            (source / cls / f"{i:04d}.jpg").write_bytes(jpeg(1000 * len(cls) + i, size=32))
    (source / "_extras").mkdir()
    root = project(tmp_path, "[flowers]\nmax_size = 32\n")
    done = run_cli("scrape", "flowers", "--source", f"folder:{source}", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    assert len(list((root / "scrape" / "flowers" / "daisy").glob("*.jpg"))) == 160  # not 150
    assert "took every image of the source (163 candidate(s)); no quota" in done.stdout
    assert "_extras" in done.stdout and "query templates" not in done.stdout
    # a quota the user wrote in settings.ini is honoured, and what it left out is said
    other = project(tmp_path / "quota", "[flowers]\nmax_size = 32\nper_class = 100\n")
    done = run_cli("scrape", "flowers", "--source", f"folder:{source}", "--quiet", cwd=other)
    assert done.returncode == 0, done.stderr
    assert len(list((other / "scrape" / "flowers" / "daisy").glob("*.jpg"))) == 100
    assert "skipped 60 image(s) beyond the quota of 100 per class (daisy 60)" in done.stdout
    assert "tulip" in done.stdout and "holds fewer usable images than the quota" in done.stdout
    assert "query templates" not in done.stdout
    third = project(tmp_path / "cli", "[flowers]\nmax_size = 32\n")
    done = run_cli("scrape", "flowers", "--source", f"folder:{source}", "--per-class", "2", "--classes", "tulip",
                   "--quiet", cwd=third)
    assert done.returncode == 0, done.stderr
    assert "skipped 1 image(s) beyond the quota of 2" in done.stdout


def test_url_list_import_takes_all_without_a_quota(server, tmp_path):
    root = project(tmp_path, "[web]\nmax_size = 32\n" + LOCAL)
    urls = url_file(tmp_path / "urls.tsv", server.base, {"a": range(0, 170)})
    done = run_cli("scrape", "web", "--source", f"urls:{urls}", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    assert len(list((root / "scrape" / "web" / "a").glob("*.jpg"))) == 170
    assert "URL list import: took every image" in done.stdout


# ------------------------------------------------------------------ items 8 and 9: class names


EMOJI = "\U0001f600" * 100


@pytest.mark.parametrize(("settings", "args", "message"), [
    ("[web]\nclasses = dogs\n", ["--add-class", "dogs\rdata = /etc"], "holds control characters"),
    ("[web]\nclasses = dogs\n", ["--add-class", "dogs\ndata = /etc"], "holds control characters"),
    ("[web]\nclasses = dogs\n", ["--add-class", "../escaped"], "holds a path separator"),
    ("[web]\nclasses = dogs\n", ["--add-class", "_hidden"], "starts with '_'"),
    ("[web]\nclasses = dogs\n", ["--add-class", ".."], "is not a folder name"),
    ("[web]\nclasses = dogs\n", ["--add-class", "Dogs"], "'dogs' and 'Dogs' would be one folder"),
    ("[web]\nclasses = dogs\n", ["--add-class", EMOJI], "bytes long"),
    ("[web]\nclasses = dogs\n", ["--add-class", "manifest.jsonl"], "the scraper's own file"),
    ("[web]\nclasses = dogs\n", ["--classes", "a/b"], "holds a path separator"),
    ("[web]\nclasses = dogs\n", ["--classes", "a_b,A_B"], "would be one folder"),
    ("[web]\nclasses = a, _b\n", [], "settings [web] classes = 'a, _b': class name '_b' starts with '_'"),
    ("[web]\nclasses = dogs\n", ["--source", "urls:bad.tsv"], "bad.tsv:2: class name 'x/y' holds a path"),
    ("[web]\n", ["--source", "folder:twins"], "two folders are the class 'caf\u00e9'"),
])
def test_bad_class_names_are_refused_in_one_line(tmp_path, settings, args, message):
    root = project(tmp_path, settings)
    (root / "bad.tsv").write_text("dogs\thttp://127.0.0.1:9/x.jpg\nx/y\thttp://127.0.0.1:9/y.jpg\n")
    for name in ("caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")):  # two ways to write one name
        (root / "twins" / name).mkdir(parents=True)
    before = (root / "settings.ini").read_bytes()
    done = run_cli("scrape", "web", "--quiet", *args, cwd=root)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done)
    assert message in line, line
    assert (root / "settings.ini").read_bytes() == before  # nothing written, no `data = /etc` key
    assert not (root / "scrape" / "web").exists() or not any(
        p.is_dir() for p in (root / "scrape" / "web").iterdir())
    assert not (root / "escaped").exists() and not (root / "scrape" / "escaped").exists()


def test_one_name_written_two_ways_is_one_folder(server, tmp_path):
    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    root = project(tmp_path, f"[web]\nclasses = {nfc}\nmax_size = 32\n" + LOCAL)
    (tmp_path / "urls.tsv").write_text(f"{nfd}\t{server.base}/photo/1.jpg\n{nfc}\t{server.base}/photo/2.jpg\n")
    done = run_cli("scrape", "web", "--source", f"urls:{tmp_path / 'urls.tsv'}", "--classes", nfd, "--quiet",
                   cwd=root)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (root / "scrape" / "web").iterdir() if p.is_dir()] == [nfc]
    assert len(list((root / "scrape" / "web" / nfc).glob("*.jpg"))) == 2
    done = run_cli("scrape", "web", "--source", f"urls:{tmp_path / 'urls.tsv'}", "--add-class", nfd, "--quiet",
                   cwd=root)
    assert done.returncode == 0, done.stderr
    assert load_settings(root / "settings.ini").get("web").classes == [nfc]  # already listed: not added twice


def test_https_goes_to_the_checked_address_and_checks_the_name(tmp_path):
    """TLS to the pinned address: the certificate and SNI are checked against the URL's name."""
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    state = Server()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    state.server.socket = server_context.wrap_socket(state.server.socket, server_side=True)
    client = ssl.create_default_context(cafile=str(cert))
    try:
        result = fetch(f"https://localhost:{state.port}/photo/4.jpg", allow_private=True, context=client)
        assert result.data == jpeg(4), result
        assert state.hosts == [f"localhost:{state.port}"]
        result = fetch(f"https://127.0.0.1:{state.port}/photo/4.jpg", allow_private=True, context=client, retries=0)
        assert result.data is None and "certificate" in result.detail.lower()  # the cert names localhost only
        result = fetch(f"https://localhost:{state.port}/photo/4.jpg", context=client)
        assert result.reason == "private-address"  # https is checked the same way
    finally:
        state.close()
