"""`toolkit deploy`: a bundle built for a small trained model, copied to a fresh folder with nothing
of the project around it, served by its own start.sh, used in headless chromium and by the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import OFFLINE, TINY_CLASSES, run_cli
from test_dashboard import (  # noqa: F401 (browser: a fixture)
    _kill_tree,
    _offline_page,
    _upload,
    browser,
    open_with_loading_state,
    photo,
)


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def bundle(trained_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "bundle"
    result = run_cli("deploy", "tiny", "--out", out, "--json", cwd=trained_project)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["classifiers"] == ["tiny"] and Path(info["out"]) == out
    return out


def test_bundle_contents(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert {"bundle.json", "settings.ini", "models", "apps", "toolkit", "requirements.txt", "start.sh",
            "Dockerfile", "README.md"} <= names
    model = {p.name for p in (bundle / "models" / "tiny").iterdir()}
    assert {"model.json", "model.safetensors"} <= model and not [m for m in model if m.endswith((".pkl", ".pth"))]
    requirements = (bundle / "requirements.txt").read_text().lower()
    pins = {line.split("==")[0]: line.split("==")[1] for line in requirements.splitlines() if "==" in line}
    assert "fastai" not in pins and "torch" in pins and "voila" in pins and "ipywidgets" in pins
    import torch

    assert pins["torch"] == torch.__version__.split("+")[0]
    assert "download.pytorch.org/whl/cpu" in requirements
    assert (bundle / "apps" / "tiny.ipynb").is_file() and (bundle / "apps" / "index.ipynb").is_file()
    assert "FROM python:" in (bundle / "Dockerfile").read_text()
    assert os.access(bundle / "start.sh", os.X_OK)
    code = {p.relative_to(bundle / "toolkit").as_posix() for p in (bundle / "toolkit").rglob("*.py")}
    assert "ui/api.py" in code and "ui/dashboard.py" in code
    assert "stages/scrape/run.py" not in code and "cli/model.py" not in code  # only what serving imports
    assert (bundle / "toolkit/ui/jupyter/voila/templates/toolkit/spinner.macro.html.j2").is_file()  # loading state


def test_names_checked_and_non_bundle_refused(trained_project, tmp_path):
    from toolkit.core.errors import ToolkitError
    from toolkit.settings import load_settings
    from toolkit.stages.deploy import deploy

    result = run_cli("deploy", "../tiny", "--out", tmp_path / "b", cwd=trained_project)
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    settings = load_settings(trained_project / "settings.ini")
    for names, everything, message in ((["nope"], False, r"no classifier \[nope\]"), ([], False, "--all"),
                                       (["tiny"], True, "not both")):
        with pytest.raises(ToolkitError, match=message):
            deploy(settings, names, tmp_path / "b", everything=everything, log=lambda line: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ToolkitError, match="not a bundle"):
        deploy(settings, ["tiny"], tmp_path / "mine", log=lambda line: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing else written, no temporary folder


@pytest.fixture(scope="module")
def bundle_server(bundle, tmp_path_factory):
    """The bundle copied to a fresh folder and started with its own start.sh (no project on the path)."""
    from toolkit.ui.voila import free_port

    fresh = tmp_path_factory.mktemp("elsewhere") / "copy"
    shutil.copytree(bundle, fresh)
    port = free_port()
    jupyter = tmp_path_factory.mktemp("jupyter")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOOLKIT_", "JUPYTER_", "PYTHONPATH"))}
    env.update(PORT=str(port), HOST="127.0.0.1", PYTHON=sys.executable, PYTHONPATH=str(OFFLINE),
               JUPYTER_DATA_DIR=str(jupyter / "d"), JUPYTER_CONFIG_DIR=str(jupyter / "c"),
               JUPYTER_RUNTIME_DIR=str(jupyter / "r"))
    log_path = fresh.parent / "start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["sh", str(fresh / "start.sh")], cwd=tmp_path_factory.mktemp("cwd"), env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        while "running at" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() - started < 120, log_path.read_text()
            time.sleep(0.2)
        yield {"url": f"http://127.0.0.1:{port}", "log": log_path, "root": fresh}
    finally:
        from toolkit.ui.voila import stop_voila

        stop_voila(proc, grace=20)
        _kill_tree(proc.pid)


def test_start_sh_prints_the_urls_first(bundle_server):
    lines = Path(bundle_server["log"]).read_text().splitlines()
    port = bundle_server["url"].rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in lines[0]
    assert any(f"{bundle_server['url']}/voila/render/tiny.ipynb" == line.split(": ", 1)[-1] for line in lines[:4])


def test_bundle_api_predicts_and_refuses_bad_input(bundle_server, clothing_small):
    file = photo(clothing_small, "shoes")
    url = f"{bundle_server['url']}/api/predict/tiny"
    status, body = post(url, file.read_bytes(), {"Host": "classifier.example.org"})  # public, any Host
    assert status == 200, body
    assert body["label"] in TINY_CLASSES and set(body["probs"]) == set(TINY_CLASSES) and body["ms"] > 0
    boundary = "toolkitboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, multipart = post(url, form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and multipart["label"] == body["label"]
    status, error = post(url, b"just some text, not a photo\n", {"Content-Type": "text/plain"})
    assert status == 400 and "not an image" in error["error"]
    assert post(url, b"")[0] == 400
    status, error = post(f"{bundle_server['url']}/api/predict/nope", file.read_bytes())
    assert status == 404 and "unknown classifier" in error["error"]
    assert post(f"{bundle_server['url']}/api/predict/..%2F..%2Fetc", file.read_bytes())[0] == 404


@pytest.mark.browser
def test_bundle_dashboard_predicts_an_upload_and_agrees_with_the_api(bundle_server, browser, clothing_small):  # noqa: F811 (the imported fixture)
    errors: list[str] = []
    page = _offline_page(browser, errors)
    try:
        open_with_loading_state(page, f"{bundle_server['url']}/voila/render/tiny.ipynb", "Tiny clothing")
        file = photo(clothing_small, "pants")
        _upload(page, file.name, file.read_bytes())
        page.wait_for_selector(".toolkit-result .toolkit-prob", timeout=60_000)
        label = page.inner_text(".toolkit-result .toolkit-label >> nth=0")
        assert label in TINY_CLASSES
        status, body = post(f"{bundle_server['url']}/api/predict/tiny", file.read_bytes())
        assert status == 200 and body["label"] == label
        page.screenshot(path=str(Path("/tmp") / "bundle-dashboard.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()


def test_bundle_carries_examples(bundle):
    examples = bundle / "models" / "tiny" / "examples"
    assert sorted(p.name for p in examples.iterdir()) == TINY_CLASSES
    assert all(len(list((examples / c).iterdir())) == 2 for c in TINY_CLASSES)
