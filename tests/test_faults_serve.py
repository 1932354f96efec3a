"""Faults for serving (issue 13, items 4, 7 and 11), on real files and real Voilà servers on 127.0.0.1.

- 4: a dashboard user can never break feedback for others: hostile labels (reserved names, `..`,
  separators, control characters, links out) are refused in one line and write nothing; a full
  quota answers one line; a torn feedback.jsonl line is ended before the next save.
- 7: `toolkit serve` / `toolkit clean` ask for the token the printed URL carries; a Host header
  other than loopback or an allowed name gets 403; the websocket limit fits the upload limit; a
  kernel cap answers 503.
- 11: kill -9, or TERM then KILL 3 s later, of the toolkit process leaves no Voilà, no kernel and
  a free port.

Voilà is probed with cheap endpoints (`/voila/api/contents`, `/voila/tree`, `/login`); the only
page GETs are of apps/probe.ipynb, a one-cell notebook whose kernel costs no model load.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from conftest import cli_env, run_cli
from PIL import Image

from toolkit.core.errors import ToolkitError

psutil = pytest.importorskip("psutil")

FAULTS: dict[str, int] = {"tried": 0, "files_lost": 0, "tracebacks": 0}


def _fault() -> None:
    FAULTS["tried"] += 1


def _image(seed: int = 0) -> Image.Image:
    return Image.new("RGB", (40, 30), (seed * 40 % 256, 90, 160))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------- feedback (item 4)

BAD_LABELS = ["feedback.jsonl", "FEEDBACK.JSONL", "../x", "..", ".", "a/b", "a\\b", "x\x00y", "x\ry", "x\ny",
              "\x1b[31mred", ".hidden", "_x", "é" * 150, "", "   ", "/etc"]
BAD_PATHS = ["tops/../x", "tops/feedback.jsonl", "/tops", "tops//shirt", "tops/.git", "tops/\x00"]


def test_feedback_hostile_labels_are_refused_in_one_line(tmp_path):
    from toolkit.stages.feedback import save_feedback

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "feedback" / "tiny"
    for label in BAD_LABELS:
        _fault()
        with pytest.raises(ToolkitError) as info:
            save_feedback(root, _image(), label, "up.jpg", {"a": 0.9, "b": 0.1})
        assert "\n" not in str(info.value) and str(info.value), label
    for label in BAD_PATHS:
        _fault()
        with pytest.raises(ToolkitError) as info:
            save_feedback(root, _image(), label, "up.jpg", hierarchical=True)
        assert "\n" not in str(info.value), label
    assert [p for p in _tree(tmp_path / "feedback") if p != "tiny" and p != "tiny/feedback.jsonl"] == []
    assert not (root / "feedback.jsonl").exists() or (root / "feedback.jsonl").read_bytes() == b""
    assert _tree(outside) == [] and set(os.listdir(tmp_path)) <= {"feedback", "outside"}
    path = save_feedback(root, _image(), "shoes", "../../evil name.png", {"shoes": 0.2, "pants": 0.8})
    assert path.parent == root / "shoes" and path.name.endswith("_evil-name.jpg")
    assert (root / "feedback.jsonl").is_file()  # never a folder: every later save still works
    record = json.loads((root / "feedback.jsonl").read_text())
    assert record["label"] == "shoes" and record["file"] == f"shoes/{path.name}" and record["predicted"] == "pants"
    nested = save_feedback(root, _image(), "tops/shirt", "x.jpg", hierarchical=True)
    assert nested.parent == root / "tops" / "shirt"


def test_feedback_links_out_and_files_in_the_way_are_refused(tmp_path):
    from toolkit.stages.feedback import save_feedback

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "feedback" / "tiny"
    root.mkdir(parents=True)
    (root / "evil").symlink_to(outside, target_is_directory=True)
    _fault()
    with pytest.raises(ToolkitError, match="outside"):
        save_feedback(root, _image(), "evil", "a.jpg")
    first = save_feedback(root, _image(), "shoes", "a.jpg")
    _fault()
    with pytest.raises(ToolkitError, match="is a file"):
        save_feedback(root, _image(), f"shoes/{first.name}", "b.jpg", hierarchical=True)
    assert _tree(outside) == [] and first.is_file()
    assert len((root / "feedback.jsonl").read_text().splitlines()) == 1


def test_feedback_quota_answers_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from toolkit.stages.feedback import FeedbackFull, save_feedback, usage

    root = tmp_path / "feedback" / "tiny"
    monkeypatch.setenv("TOOLKIT_FEEDBACK_MAX_FILES", "4")  # feedback.jsonl counts: 3 images
    for i in range(3):
        save_feedback(root, _image(i), "shoes", f"{i}.jpg")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for _ in range(3):
        _fault()
        with pytest.raises(FeedbackFull) as info:
            save_feedback(root, _image(9), "pants", "9.jpg")
        assert "\n" not in str(info.value) and "full" in str(info.value)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / "pants").exists()
    monkeypatch.setenv("TOOLKIT_FEEDBACK_MAX_FILES", "100")
    monkeypatch.setenv("TOOLKIT_FEEDBACK_MAX_MB", "1")
    big = Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3))  # noise: a JPEG of some 100s of kB
    _fault()
    with pytest.raises(FeedbackFull):
        for i in range(20):
            save_feedback(root, big, "noise", f"n{i}.jpg")
    assert 0 < usage(root)[1] <= 1_000_000
    monkeypatch.setenv("TOOLKIT_FEEDBACK_MAX_MB", "lots")
    _fault()
    with pytest.raises(ToolkitError, match="TOOLKIT_FEEDBACK_MAX_MB"):
        save_feedback(root, _image(), "shoes", "x.jpg")


def test_feedback_after_a_torn_line_keeps_both_lines(tmp_path):
    from toolkit.stages.feedback import read_feedback, save_feedback

    root = tmp_path / "feedback" / "tiny"
    save_feedback(root, _image(1), "shoes", "one.jpg")
    log = root / "feedback.jsonl"
    for torn in (b'{"label": "pants", "file": "pa', '{"label": "caf\u00e9'.encode()[:-1]):  # mid-line, mid-UTF-8
        _fault()
        with open(log, "ab") as handle:
            handle.write(torn)  # a crash mid-write: no newline
        save_feedback(root, _image(2), "pants", "two.jpg")
    rows = read_feedback(root)
    assert [r["original_name"] for r in rows] == ["one.jpg", "two.jpg", "two.jpg"]
    assert all((root / r["file"]).is_file() for r in rows)
    assert log.read_bytes().endswith(b"\n")


def test_feedback_saves_at_once_lose_nothing(tmp_path):
    from toolkit.stages.feedback import read_feedback, save_feedback

    root = tmp_path / "feedback" / "tiny"
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            save_feedback(root, _image(i), "shoes", "same.jpg")
        except BaseException as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _fault()
    assert not errors
    rows = read_feedback(root)
    files = sorted(p.name for p in (root / "shoes").iterdir())
    assert len(rows) == 12 and len(files) == 12 and sorted(r["file"].split("/")[1] for r in rows) == files
    assert not [p for p in root.rglob(".tmp-*")]


def test_dashboard_shows_feedback_faults_in_one_line(tmp_path, monkeypatch):
    """The page's own control: bad labels and a full quota are one line in the page."""
    from toolkit.ui.dashboard import ClassifierDashboard, ImageResult

    (tmp_path / "settings.ini").write_text("[tiny]\ntitle = Tiny\n")
    board = ClassifierDashboard("tiny", tmp_path / "settings.ini")
    board.classes = ["pants", "shoes"]
    result = ImageResult(board, "up.jpg", _image(), {"pants": 0.7, "shoes": 0.3}, 0.01, 0.01)
    for label in ["feedback.jsonl", "../x", "a\x07b", ""]:
        _fault()
        result.right.value = label
        result.save.click()
        assert "toolkit-error" in result.saved.value and "<br" not in result.saved.value, label
    assert _tree(tmp_path / "feedback") in ([], ["tiny"], ["tiny", "tiny/feedback.jsonl"])
    result.right.value = "shoes"
    result.save.click()
    assert "saved as shoes" in result.saved.value
    monkeypatch.setenv("TOOLKIT_FEEDBACK_MAX_FILES", "2")
    _fault()
    result.save.click()
    assert "toolkit-error" in result.saved.value and "is full" in result.saved.value
    assert len(list((board.feedback_dir / "shoes").iterdir())) == 1


# --------------------------------------------------------------------------- servers (items 7, 11)

def _get(port: int, path: str, host: str | None = None, timeout: float = 60) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
        response = conn.getresponse()
        return response.status, response.getheader("Location") or "", response.read()
    finally:
        conn.close()


def _free_port() -> int:
    from toolkit.ui.voila import free_port

    return free_port()


def _project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.ini").write_text("[tiny]\ntitle = Tiny clothing\n")
    apps = root / "apps"
    apps.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('probe-' + 'ok')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, apps / "probe.ipynb")  # not generated: `toolkit serve` leaves it alone
    return root


class Served:
    """`toolkit ARGS` started in a subprocess, its output in a file."""

    def __init__(self, root: Path, *args: str, ready: str):
        self.port = _free_port()
        self.log = root / f"cli-{self.port}.log"
        jupyter = root / "jupyter"
        env = cli_env(JUPYTER_DATA_DIR=str(jupyter / "data"), JUPYTER_CONFIG_DIR=str(jupyter / "config"),
                      JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"))
        env.pop("TOOLKIT_SETTINGS", None)
        env.pop("JUPYTER_TOKEN", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "toolkit", *args, "--port", str(self.port)],
                                         cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 120
        while ready not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.2)
        match = re.search(r"\?token=([0-9a-f]+)", self.text())
        self.token = match.group(1) if match else ""
        self.tree = self.processes()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tracebacks(self) -> int:
        """Tracebacks in the command's output and in Voilà's log."""
        logs = [self.text(), *(p.read_text(errors="replace") for p in self.log.parent.glob("apps/.voila-*.log"))]
        return sum(text.count("Traceback") for text in logs)

    def stop(self) -> None:
        if not getattr(self, "counted", False):
            FAULTS["tracebacks"] += self.tracebacks()
            self.counted = True
        for proc in reversed(self.processes()):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _alive(procs) -> list:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _assert_no_orphans(served: Served, procs: list, within: float = 10) -> float:
    """Every process of the tree gone and the port free within `within` seconds; returns the time."""
    started = time.monotonic()
    while _alive(procs[1:]) or not _port_free(served.port):
        if time.monotonic() - started > within:
            left = _alive(procs[1:])
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            raise AssertionError(f"left after {within} s: {left}, port free: {_port_free(served.port)}")
        time.sleep(0.2)
    return time.monotonic() - started


def _kernels(procs) -> list:
    return [p for p in procs if "ipykernel" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`toolkit serve --max-kernels 1` on a tmp project (no trained model, one probe notebook)."""
    root = _project(tmp_path_factory.mktemp("serve"))
    server = Served(root, "serve", "--max-kernels", "1", ready="Ctrl-C stops the server")
    try:
        yield server
    finally:
        server.stop()


def test_serve_printed_urls_carry_the_token_and_it_is_required(served):
    text = served.text()
    assert len(served.token) == 48, text
    for name in ("index", "tiny", "clean"):
        assert f"http://127.0.0.1:{served.port}/voila/render/{name}.ipynb?token={served.token}" in text
    assert "Traceback" not in text
    token = f"?token={served.token}"
    for path in ("/voila/api/contents/", "/voila/api/contents/tiny.ipynb", "/voila/tree"):
        _fault()
        status, location, _ = _get(served.port, path)
        assert status in (302, 403), (path, status)
        if status == 302:
            assert "/login" in location
        _fault()
        assert _get(served.port, path + "?token=wrong")[0] in (302, 403)
        assert _get(served.port, path + token)[0] == 200, path
    status, location, _ = _get(served.port, "/voila/render/probe.ipynb")  # a page: login, never a kernel
    assert status == 302 and "/login" in location


def test_serve_host_check_refuses_foreign_hosts(served):
    token = f"?token={served.token}"
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1.evil.example", "10.0.0.1"):
        for path in ("/login", "/voila/api/contents/" + token, "/voila/tree" + token):
            _fault()
            assert _get(served.port, path, host=host)[0] == 403, (host, path)
    for host in (f"127.0.0.1:{served.port}", f"localhost:{served.port}", "localhost"):
        assert _get(served.port, "/voila/api/contents/" + token, host=host)[0] == 200, host


def test_websocket_limit_fits_the_upload_limit(served):
    from toolkit.ui import dashboard, serve

    assert (serve.UPLOAD_FILES, serve.UPLOAD_FILE_BYTES) == (dashboard.MAX_FILES, dashboard.MAX_UPLOAD_BYTES)
    assert serve.WEBSOCKET_MAX_MESSAGE_BYTES >= dashboard.MAX_FILES * dashboard.MAX_UPLOAD_BYTES
    voila = [p for p in served.tree if "-m toolkit.ui.api" in " ".join(p.cmdline())]  # Voila with the JSON API
    assert voila, served.tree
    line = " ".join(voila[0].cmdline())
    match = re.search(r"'websocket_max_message_size': (\d+)", line)
    assert match and int(match.group(1)) == serve.WEBSOCKET_MAX_MESSAGE_BYTES, line
    assert "'allow_remote_access': False" in line and "CappedKernelManager.max_kernels=1" in line
    assert served.token not in line  # the token travels in the environment, not on the command line


def test_kernel_cap_answers_503(served):
    status, _, body = _get(served.port, f"/voila/render/probe.ipynb?token={served.token}", timeout=120)
    assert status == 200 and b"probe-ok" in body
    _fault()
    status, _, body = _get(served.port, f"/voila/render/probe.ipynb?token={served.token}", timeout=120)
    assert status == 503 and b"Too many pages open (limit 1)" in body, body[-600:]
    assert len(_kernels(served.processes())) == 1


def test_kill_9_of_serve_leaves_no_voila_and_no_kernel(tmp_path):
    root = _project(tmp_path / "p")
    served = Served(root, "serve", "--no-token", ready="Ctrl-C stops the server")
    try:
        assert "?token=" not in served.text()
        status, _, body = _get(served.port, "/voila/render/probe.ipynb", timeout=120)  # --no-token: open
        assert status == 200 and b"probe-ok" in body
        procs = served.processes()
        assert _kernels(procs), procs
        _fault()
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
        _assert_no_orphans(served, procs)
    finally:
        served.stop()


def test_term_then_kill_of_serve_on_all_addresses_leaves_nothing(tmp_path):
    root = _project(tmp_path / "p")
    served = Served(root, "serve", "--host", "0.0.0.0", "--allow-host", "toolkit.test",
                    ready="Ctrl-C stops the server")
    try:
        text = served.text()
        assert "warning: bound to 0.0.0.0" in text and served.token, text
        token = f"?token={served.token}"
        assert _get(served.port, "/voila/api/contents/" + token, host=f"toolkit.test:{served.port}")[0] == 200
        _fault()
        assert _get(served.port, "/voila/api/contents/" + token, host="evil.example")[0] == 403
        _fault()
        assert _get(served.port, "/voila/api/contents/")[0] == 403
        status, _, body = _get(served.port, f"/voila/render/probe.ipynb{token}", timeout=120)
        assert status == 200 and b"probe-ok" in body
        procs = served.processes()
        assert _kernels(procs), procs
        _fault()
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(3)
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
        assert _assert_no_orphans(served, procs) < 10
    finally:
        served.stop()


def test_term_stops_serve_within_seconds(tmp_path):
    root = _project(tmp_path / "p")
    served = Served(root, "serve", ready="Ctrl-C stops the server")
    try:
        _get(served.port, f"/voila/render/probe.ipynb?token={served.token}", timeout=120)
        procs = served.processes()
        _fault()
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(15) == 0
        assert time.monotonic() - started < 8
        _assert_no_orphans(served, procs, within=5)
        assert "Traceback" not in served.text()
    finally:
        served.stop()


def test_clean_app_token_host_check_and_kill_9(tmp_path):
    root = _project(tmp_path / "p")
    served = Served(root, "clean", "tiny", ready="(Ctrl-C to stop)")
    try:
        url = f"http://127.0.0.1:{served.port}/?token={served.token}"
        assert url in served.text() and len(served.token) == 48, served.text()
        _fault()
        status, location, _ = _get(served.port, "/")  # no token: login, no kernel
        assert status == 302 and "/login" in location
        _fault()
        assert _get(served.port, "/login", host="evil.example")[0] == 403
        assert _get(served.port, "/login")[0] == 200
        procs = served.processes()
        _fault()
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(10)
        _assert_no_orphans(served, procs)
    finally:
        served.stop()


@pytest.mark.parametrize("command", [["serve"], ["clean", "tiny"]])
def test_no_token_on_a_non_loopback_address_is_refused(tmp_path, command):
    root = _project(tmp_path / "p")
    _fault()
    result = run_cli(*command, "--host", "0.0.0.0", "--no-token", "--port", str(_free_port()), cwd=root, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-token" in lines[0] and "Traceback" not in result.stderr
    _fault()
    result = run_cli(*command, "--allow-host", "http://x:1", "--port", str(_free_port()), cwd=root, timeout=120)
    assert result.returncode == 2 and "--allow-host" in result.stderr and "Traceback" not in result.stderr


def test_report_fault_counts(served):
    """Runs last in this module: the counts for docs/SERVING.md (the module's server counted here)."""
    if not getattr(served, "counted", False):
        FAULTS["tracebacks"] += served.tracebacks()
        served.counted = True
    print(f"\nserve faults: tried {FAULTS['tried']}, files lost {FAULTS['files_lost']}, "
          f"tracebacks {FAULTS['tracebacks']}")
    assert FAULTS["files_lost"] == 0 and FAULTS["tracebacks"] == 0
