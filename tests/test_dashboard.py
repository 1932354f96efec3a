"""The serving stage: app notebooks, the dashboard driven from Python, Grad-CAM, and the real
thing in headless chromium (`toolkit serve` + Voilà), with one server and page per module."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_CLASSES, cli_env, run_cli
from PIL import Image

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")


# ------------------------------------------------------------------ helpers


def upload_item(name: str, data: bytes, mime: str = "image/jpeg") -> dict:
    """One entry of ipywidgets 8 `FileUpload.value`."""
    return {"name": name, "type": mime, "size": len(data), "content": memoryview(data),
            "last_modified": datetime.now(timezone.utc)}


def photo(clothing_small: Path, label: str = "shoes", index: int = 0) -> Path:
    return sorted((clothing_small / "validation" / label).iterdir())[index]


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def board(trained_project, tmp_path_factory):
    from toolkit.ui.dashboard import ClassifierDashboard

    dashboard = ClassifierDashboard("tiny", trained_project / "settings.ini")
    dashboard.feedback_dir = tmp_path_factory.mktemp("feedback") / "tiny"
    return dashboard


def upload(board, *items: dict):
    board.upload.value = tuple(items)
    return board.results, [c.value for c in board.output.children if hasattr(c, "value")]


# ------------------------------------------------------------------ apps/ notebooks


def test_write_apps_creates_thin_notebooks_and_index(tmp_path):
    import nbformat

    from toolkit.ui.apps import write_apps

    (tmp_path / "settings.ini").write_text("[alpha]\ntitle = Alpha\n\n[beta]\n")
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "clean.ipynb").write_text("not mine")
    paths = write_apps(tmp_path / "settings.ini")
    assert sorted(p.name for p in paths) == ["alpha.ipynb", "beta.ipynb", "index.ipynb"]
    code = nbformat.read(tmp_path / "apps" / "alpha.ipynb", as_version=4).cells[0].source
    assert "from toolkit.ui.dashboard import dashboard" in code and "dashboard('alpha')" in code
    assert len(code.splitlines()) <= 4
    index = nbformat.read(tmp_path / "apps" / "index.ipynb", as_version=4).cells[0].source
    assert "(alpha.ipynb)" in index and "/voila/render/beta.ipynb" in index and "(clean.ipynb)" in index
    assert "toolkit train alpha" in index  # no model yet: says how to train it
    # refresh: a classifier removed from settings.ini loses its generated app; clean.ipynb stays
    (tmp_path / "settings.ini").write_text("[alpha]\n")
    write_apps(tmp_path / "settings.ini")
    assert sorted(p.name for p in (tmp_path / "apps").iterdir()) == ["alpha.ipynb", "clean.ipynb", "index.ipynb"]
    assert (tmp_path / "apps" / "clean.ipynb").read_text() == "not mine"


def test_cli_apps(tmp_path):
    (tmp_path / "settings.ini").write_text("[gamma]\n")
    result = run_cli("apps", "--settings", tmp_path / "settings.ini")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apps" / "gamma.ipynb").is_file() and "gamma.ipynb" in result.stdout


def test_preheat_setting_and_voila_args(tmp_path):
    from toolkit.settings import load_settings
    from toolkit.ui.voila import preheat_args

    (tmp_path / "settings.ini").write_text("[a]\npreheat = yes\n\n[b]\n")
    settings = load_settings(tmp_path / "settings.ini")
    assert settings.get("a").preheat and not settings.get("b").preheat
    args = preheat_args(["a"], ["b", "index"])
    assert "--preheat_kernel=True" in args and "--pool_size=1" in args
    assert "--VoilaKernelManager.preheat_denylist=b.ipynb" in args
    assert preheat_args([], ["b"]) == []


def test_every_app_notebook_executes_headlessly(trained_project, monkeypatch):
    """nbclient runs each generated notebook in a real kernel, with the cwd Voilà uses (apps/)."""
    import nbformat
    from nbclient import NotebookClient

    from toolkit.ui.apps import write_apps

    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.delenv("TOOLKIT_SETTINGS", raising=False)  # found as ../settings.ini
    for path in write_apps(trained_project / "settings.ini"):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"], outputs
        if path.name != "index.ipynb":
            bundles = [o.get("data", {}) for o in outputs if o.output_type == "execute_result"]
            assert any("application/vnd.jupyter.widget-view+json" in b for b in bundles), outputs
            assert not any("toolkit-error" in b.get("text/html", "") for b in bundles)


# ------------------------------------------------------------------ the dashboard from Python


def test_dashboard_header_and_model_card(board):
    assert "Tiny clothing" in board.header.value and "Three clothing classes" in board.header.value
    card = board.card.value
    for text in ("pants, shoes, t-shirt", "efficientnet_lite0", "96 px", "trained", "validation accuracy",
                 "frozen (cached features) + "):
        assert text in card


def test_model_card_says_when_time_budget_left_epochs_out(tmp_path):
    import json

    from toolkit.settings import load_settings
    from toolkit.ui.dashboard import model_card_html

    (tmp_path / "settings.ini").write_text("[x]\n")
    spec = load_settings(tmp_path / "settings.ini").get("x")
    spec.models_dir.mkdir(parents=True)
    (spec.models_dir / "metrics.json").write_text(json.dumps(
        {"accuracy": 0.9, "n": 10, "epochs": 2, "epochs_run": 0, "freeze_epochs": 8, "time_budget": 15.0}))
    card = model_card_html(spec, {"classes": ["a", "b"]})
    assert "8 frozen (cached features) + 0 unfrozen epoch(s) of 2 (time_budget 15.0 min)" in card


def test_predicts_a_real_photo(board, clothing_small):
    file = photo(clothing_small)
    results, _ = upload(board, upload_item(file.name, file.read_bytes()))
    assert len(results) == 1
    result = results[0]
    assert result.label in TINY_CLASSES
    assert abs(sum(result.probs.values()) - 1) < 1e-4
    assert f"{result.probs[result.label]:.1%}" in result.preds.value and result.label in result.preds.value
    assert "inference" in result.timing.value and " ms" in result.timing.value
    assert result.thumb.value  # a thumbnail
    assert board.upload.value == ()  # cleared so that the same file can be uploaded again


def test_predictor_is_loaded_once_per_process(trained_project, board):
    from toolkit.ui.dashboard import get_predictor

    assert get_predictor(trained_project / "models" / "tiny") is board.predictor


def _bad_uploads() -> dict[str, bytes]:
    good = encoded(Image.new("RGB", (80, 60), (200, 30, 30)), "JPEG")
    return {
        "text named .jpg": b"this is not an image at all\n" * 10,
        "zero bytes": b"",
        "truncated JPEG": good[: len(good) // 2],
        "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_upload_is_one_line_and_next_upload_works(board, clothing_small, case):
    results, lines = upload(board, upload_item(f"{case.replace(' ', '_')}.jpg", _bad_uploads()[case]))
    assert results == [] and len(lines) == 1
    assert "toolkit-error" in lines[0] and "Traceback" not in lines[0] and len(lines[0].splitlines()) == 1
    assert board.status.value == ""  # the per-file line says it; no callback crashed
    file = photo(clothing_small, "pants")
    results, _ = upload(board, upload_item(file.name, file.read_bytes()))
    assert len(results) == 1 and results[0].label in TINY_CLASSES


def test_size_and_pixel_limits(board, clothing_small, monkeypatch):
    import toolkit.ui.dashboard as dashboard

    data = photo(clothing_small).read_bytes()
    monkeypatch.setattr(dashboard, "MAX_UPLOAD_BYTES", 1000)
    _, lines = upload(board, upload_item("big.jpg", data))
    assert "byte limit" in lines[0]
    monkeypatch.setattr(dashboard, "MAX_UPLOAD_BYTES", 10**8)
    monkeypatch.setattr(dashboard, "MAX_PIXELS", 1000)
    _, lines = upload(board, upload_item("many-pixels.jpg", data))
    assert "pixel limit" in lines[0]


def test_odd_but_valid_images_are_handled(board):
    """Animated GIF, CMYK, alpha, 16-bit, EXIF-rotated: each gets a prediction, upright."""
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgba = Image.new("RGBA", (64, 48), (0, 128, 0, 0))
    wide16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    items = [
        upload_item("anim.gif", gif.getvalue(), "image/gif"),
        upload_item("cmyk.jpg", encoded(Image.new("CMYK", (64, 48), (0, 200, 200, 0)), "JPEG")),
        upload_item("alpha.png", encoded(rgba, "PNG"), "image/png"),
        upload_item("sixteen.png", encoded(wide16, "PNG"), "image/png"),
        upload_item("rotated.jpg", encoded(Image.new("RGB", (64, 48), (9, 9, 9)), "JPEG", exif=exif.tobytes())),
    ]
    results, lines = upload(board, *items)
    assert [r.name for r in results] == [i["name"] for i in items], lines
    assert "animated" in results[0].box.children[2].children[0].value
    assert results[2].img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert results[4].img.size == (48, 64)  # EXIF orientation applied


def test_several_files_in_one_upload(board, clothing_small):
    good = [photo(clothing_small, label) for label in TINY_CLASSES]
    items = [upload_item(f.name, f.read_bytes()) for f in good] + [upload_item("notes.jpg", b"text")]
    results, lines = upload(board, *items)
    assert len(results) == 3 and sum("toolkit-error" in line for line in lines) == 1


def test_gradcam_toggle(board, clothing_small):
    file = photo(clothing_small, "t-shirt")
    results, _ = upload(board, upload_item(file.name, file.read_bytes()))
    assert results[0].cam.layout.display == "none"
    board.cam_toggle.value = True
    try:
        assert results[0].cam.value and results[0].cam.layout.display is None
        assert board.status.value == ""
        results, _ = upload(board, upload_item(file.name, file.read_bytes()))  # new uploads too
        assert results[0].cam.value and results[0].cam.layout.display is None
    finally:
        board.cam_toggle.value = False
    assert results[0].cam.layout.display == "none"


def test_feedback_saves_the_image_with_the_right_label(board, clothing_small, trained_project):
    scrape_before = sorted(p for p in (trained_project / "scrape").rglob("*"))
    file = photo(clothing_small, "shoes", 1)
    results, _ = upload(board, upload_item(file.name, file.read_bytes()))
    result = results[0]
    result.save.click()
    assert "toolkit-error" in result.saved.value and "label" in result.saved.value  # nothing chosen yet
    result.right.value = "../etc"
    result.save.click()
    assert "toolkit-error" in result.saved.value
    result.right.value = "shoes"
    result.save.click()
    assert "saved as shoes" in result.saved.value
    saved = list((board.feedback_dir / "shoes").glob("*.jpg"))
    assert len(saved) == 1 and saved[0].name.endswith("_" + file.stem + ".jpg")
    assert Image.open(saved[0]).size == result.img.size
    lines = (board.feedback_dir / "feedback.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["label"] == "shoes" and record["file"] == f"shoes/{saved[0].name}"
    assert record["predicted"] == result.label and record["original_name"] == file.name
    assert sorted(p for p in (trained_project / "scrape").rglob("*")) == scrape_before  # raw data untouched


def test_no_model_shows_how_to_train(tmp_path):
    from toolkit.ui.dashboard import ClassifierDashboard, dashboard

    (tmp_path / "settings.ini").write_text("[fresh]\ntitle = Fresh\n")
    board = ClassifierDashboard("fresh", tmp_path / "settings.ini")
    assert "toolkit train fresh" in board.card.value and board.upload.disabled
    board.upload.value = (upload_item("a.jpg", b"x"),)  # even so: a line, not a traceback
    assert "toolkit train fresh" in board.status.value
    missing = dashboard("nope", tmp_path / "settings.ini")
    assert "toolkit-error" in missing.value and "no classifier [nope]" in missing.value


def test_broken_model_folder_is_one_line(tmp_path):
    from toolkit.ui.dashboard import ClassifierDashboard

    (tmp_path / "settings.ini").write_text("[broken]\n")
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"")
    board = ClassifierDashboard("broken", tmp_path / "settings.ini")
    assert "toolkit-error" in board.card.value and "cannot load the model" in board.card.value


# ------------------------------------------------------------------ Grad-CAM


def test_gradcam_shape_range_and_class_dependence(board, clothing_small):
    from toolkit.stages.explain import gradcam, overlay

    img = Image.open(photo(clothing_small)).convert("RGB").resize((100, 70))
    maps = [gradcam(board.predictor, img, target) for target in range(len(board.classes))]
    for heat in maps:
        assert heat.shape == (70, 100) and heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0
    assert np.abs(maps[0] - maps[1]).mean() > 1e-3
    assert np.allclose(gradcam(board.predictor, img, board.classes[0]), maps[0], atol=1e-5)
    predicted = board.predictor.predict(img).label
    assert np.allclose(gradcam(board.predictor, img), maps[board.classes.index(predicted)], atol=1e-5)
    shown = overlay(img, maps[0])
    assert shown.size == img.size and shown.mode == "RGB"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "efficientnet_lite0"])
def test_gradcam_works_for_every_backbone(arch, tmp_path):
    from toolkit.core.artifacts import write_model
    from toolkit.core.backbones import create_model, get_backbone
    from toolkit.predict import ImagePredictor as Predictor
    from toolkit.stages.explain import gradcam

    backbone = get_backbone(arch)
    model = create_model(arch, 2, pretrained=False)
    write_model(tmp_path, model, task="single", meta={"arch": arch, "classes": ["a", "b"], "size": 64,
                                   "mean": list(backbone.mean), "std": list(backbone.std)})
    predictor = Predictor(tmp_path, device="cpu")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    heat = gradcam(predictor, img, 1)
    assert heat.shape == (50, 80) and 0 <= heat.min() and heat.max() <= 1


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_inference_model_matches_create_model_without_fastai(arch):
    import torch

    from toolkit.core.backbones import create_model, inference_model

    reference = create_model(arch, 3, pretrained=False).eval()
    lean = inference_model(arch, 3).eval()
    lean.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(x), lean(x), atol=1e-6)


def test_optimized_predictor_matches_the_eager_model(trained_project, clothing_small):
    from toolkit.predict import ImagePredictor as Predictor

    eager = Predictor(trained_project / "models" / "tiny", device="cpu")
    fast = Predictor(trained_project / "models" / "tiny", device="cpu", optimize=True)
    assert fast.fast_model is not None and eager.fast_model is None
    images = [Image.open(photo(clothing_small, c)).convert("RGB") for c in TINY_CLASSES]
    assert np.allclose(eager.predict_images(images), fast.predict_images(images), atol=1e-4)


def test_dashboard_kernel_does_not_import_fastai(trained_project):
    (trained_project / "apps").mkdir(exist_ok=True)
    code = ("import sys; from toolkit.ui.dashboard import dashboard; d = dashboard('tiny'); "
            "assert d.predictor is not None; print('fastai' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=trained_project / "apps", env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------ in a real browser


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def server(trained_project, tmp_path_factory):
    """`toolkit serve` on a free loopback port, stopped (with Voilà and its kernels) at the end."""
    from toolkit.ui.voila import free_port

    jupyter = tmp_path_factory.mktemp("jupyter")
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = cli_env(JUPYTER_DATA_DIR=str(jupyter / "data"), JUPYTER_CONFIG_DIR=str(jupyter / "config"),
                  JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"))
    env.pop("TOOLKIT_SETTINGS", None)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", "--port", str(port)],
                                cwd=trained_project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while "Ctrl-C stops the server" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() - started < 120, log_path.read_text()
            time.sleep(0.2)
        token = re.search(r"\?token=([0-9a-f]+)", log_path.read_text()).group(1)  # the printed URLs carry it
        yield {"url": f"http://127.0.0.1:{port}", "log": log_path, "started": started, "query": f"?token={token}"}
    finally:
        from toolkit.ui.voila import stop_voila

        stop_voila(proc, grace=30)  # SIGTERM: `toolkit serve` stops Voila and its kernels
        _kill_tree(proc.pid)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("Debian chromium is not installed (make install installs it)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    playwright = playwright_api.sync_playwright().start()
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


def _offline_page(browser, errors: list[str]):
    page = browser.new_page(viewport={"width": 1200, "height": 900})

    def route(r):
        host = r.request.url.split("/")[2].split(":")[0] if "://" in r.request.url else ""
        if r.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def open_with_loading_state(page, url: str, title: str) -> float:
    """Open a Voila page and check its loading state: "Loading TITLE..." is on screen while the kernel
    starts and runs the notebook (the toolkit template), and gone once the widgets are drawn. Returns
    the seconds to the first widget."""
    started = time.monotonic()
    page.goto(url, wait_until="commit", timeout=180_000)
    loading = page.wait_for_selector("#loading.toolkit-loading", state="visible", timeout=180_000)
    assert page.locator(".toolkit-upload, .clean-widget").count() == 0  # before the widgets
    text = loading.inner_text()
    assert f"Loading {title}..." in text and "starting Python" in text, text
    page.wait_for_selector(".toolkit-upload", state="visible", timeout=180_000)
    assert page.locator("#loading").count() == 0 and "Loading" not in page.inner_text("body")
    return time.monotonic() - started


def _open_dashboard(page, server, name: str = "tiny", title: str = "Tiny clothing") -> float:
    return open_with_loading_state(page, f"{server['url']}/voila/render/{name}.ipynb{server['query']}", title)


def _upload(page, name: str, data: bytes, mime: str = "image/jpeg") -> None:
    with page.expect_file_chooser() as chooser:
        page.locator(".toolkit-upload").click()
    chooser.value.set_files(files=[{"name": name, "mimeType": mime, "buffer": data}])


@pytest.fixture(scope="module")
def page(browser, server):
    errors: list[str] = []
    page = _offline_page(browser, errors)
    server["first_render_s"] = _open_dashboard(page, server)
    page.errors = errors
    yield page
    page.close()


@pytest.mark.browser
def test_browser_upload_good_bad_good(page, clothing_small):
    page.wait_for_selector(".toolkit-title")
    assert "Tiny clothing" in page.inner_text(".toolkit-title")
    assert "toolkit-model-card" in page.content()
    good = photo(clothing_small)
    _upload(page, good.name, good.read_bytes())
    page.wait_for_selector(".toolkit-result .toolkit-prob", timeout=60_000)
    label = page.inner_text(".toolkit-result .toolkit-label >> nth=0")
    prob = page.inner_text(".toolkit-result .toolkit-prob >> nth=0")
    assert label in TINY_CLASSES and prob.endswith("%")
    assert "inference" in page.inner_text(".toolkit-result .toolkit-time")

    _upload(page, "notes.jpg", b"this is a text file, not a photo\n")
    page.wait_for_selector(".toolkit-results .toolkit-error", timeout=60_000)
    assert "notes.jpg: not an image" in page.inner_text(".toolkit-results .toolkit-error")
    assert page.locator(".toolkit-result").count() == 0

    again = photo(clothing_small, "pants")
    _upload(page, again.name, again.read_bytes())
    page.wait_for_selector(".toolkit-result .toolkit-prob", timeout=60_000)
    assert page.inner_text(".toolkit-result .toolkit-label >> nth=0") in TINY_CLASSES
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert not page.errors, page.errors


@pytest.mark.browser
def test_browser_gradcam_toggle(page, clothing_small):
    file = photo(clothing_small, "t-shirt")
    _upload(page, file.name, file.read_bytes())
    page.locator(".toolkit-result .toolkit-name", has_text=file.name).wait_for(timeout=60_000)
    assert not page.locator(".toolkit-result .toolkit-cam").is_visible()
    page.locator(".toolkit-cam-toggle input").check()
    page.wait_for_selector(".toolkit-result .toolkit-cam", state="visible", timeout=60_000)
    page.locator(".toolkit-cam-toggle input").uncheck()
    page.wait_for_selector(".toolkit-result .toolkit-cam", state="hidden", timeout=60_000)
    assert not page.errors, page.errors


@pytest.mark.browser
def test_browser_sources_are_stripped_and_index_links(page, browser, server):
    assert "generated by `toolkit apps`" not in page.content()
    assert "from toolkit.ui.dashboard import" not in page.content()
    errors: list[str] = []
    index = _offline_page(browser, errors)
    try:
        index.goto(f"{server['url']}/voila/render/index.ipynb{server['query']}", wait_until="domcontentloaded",
                   timeout=120_000)
        link = index.wait_for_selector("a[href='tiny.ipynb']", timeout=120_000)
        assert link.get_attribute("href") == "tiny.ipynb"  # relative: /voila/render/tiny.ipynb
        assert index.locator("a[href='clean.ipynb']").count() == 1
    finally:
        index.close()


@pytest.mark.browser
def test_browser_four_sessions_at_once(browser, server, clothing_small):
    """Four pages (four kernels) opened together each get their own prediction."""
    errors: list[str] = []
    pages = [_offline_page(browser, errors) for _ in range(4)]
    try:
        for p in pages:  # start all four renders before waiting on any
            p.goto(f"{server['url']}/voila/render/tiny.ipynb{server['query']}", wait_until="commit", timeout=180_000)
        files = [photo(clothing_small, label, i) for i, label in enumerate(TINY_CLASSES + ["shoes"])]
        for p in pages:
            p.wait_for_selector(".toolkit-upload", state="visible", timeout=240_000)
        for p, file in zip(pages, files, strict=True):
            _upload(p, file.name, file.read_bytes())
        for p, file in zip(pages, files, strict=True):
            p.wait_for_selector(".toolkit-result .toolkit-prob", timeout=60_000)
            assert file.name in p.inner_text(".toolkit-result .toolkit-name")
        assert not errors, errors
    finally:
        for p in pages:
            p.close()


@pytest.mark.browser
def test_serve_binds_loopback_and_prints_urls(server):
    text = Path(server["log"]).read_text()
    port = server["url"].rsplit(":", 1)[1]
    query = server["query"]
    assert len(query) == len("?token=") + 48
    assert f"http://127.0.0.1:{port}/voila/render/tiny.ipynb{query}" in text
    assert f"http://127.0.0.1:{port}/voila/render/clean.ipynb{query}" in text
    assert f"http://127.0.0.1:{port}/voila/render/index.ipynb{query}" in text
    assert os.path.isfile(Path(server["log"]))


@pytest.mark.browser
def test_api_under_serve_needs_the_token_and_a_known_host(server, clothing_small):
    """`toolkit serve`'s JSON API: refused without the token or with a foreign Host, answered with it."""
    from test_deploy import post

    data = photo(clothing_small, "shoes").read_bytes()
    url = f"{server['url']}/api/predict/tiny"
    token = server["query"].split("=", 1)[1]
    assert post(url, data)[0] == 403
    assert post(url, data, {"Authorization": "token wrong"})[0] == 403
    assert post(url, data, {"Authorization": f"token {token}", "Host": "evil.example.com"})[0] == 403
    status, body = post(url, data, {"Authorization": f"token {token}"})
    assert status == 200 and body["label"] in TINY_CLASSES
    assert post(f"{server['url']}/api/predict/nope", data, {"Authorization": f"token {token}"})[0] == 404
    assert "/api/predict/NAME" in Path(server["log"]).read_text()


def test_parity_thumbnail_aspect_feedback_choice_and_table(board, clothing_small):
    """A 28x28 image is drawn square (not a strip); the right label is a choice of the classes plus
    'a new class...'; several uploads get a summary table."""
    from toolkit.ui.dashboard import NEW_CLASS

    tiny = encoded(Image.new("RGB", (28, 28), (120, 40, 40)), "PNG")
    tall = encoded(Image.new("RGB", (30, 90), (40, 40, 120)), "PNG")
    results, _ = upload(board, upload_item("tiny.png", tiny, "image/png"), upload_item("tall.png", tall, "image/png"))
    square, upright = results[0].thumb.layout, results[1].thumb.layout
    assert square.width == square.height and int(square.width[:-2]) >= 150
    assert int(upright.height[:-2]) == 3 * int(upright.width[:-2])
    assert "toolkit-summary" in board.output.children[0].value and "tall.png" in board.output.children[0].value
    result = results[0]
    assert list(result.choice.options)[1:] == [*[(c, c) for c in TINY_CLASSES], (NEW_CLASS, NEW_CLASS)]
    assert result.right.layout.display == "none"
    result.choice.value = NEW_CLASS
    assert result.right.layout.display is None
    result.choice.value = "pants"
    assert result.save_feedback().parent.name == "pants"


def test_examples_strip_predicts_on_click(board):
    """A few images per class from the data set; a click predicts one."""
    examples = board.examples.children[1:]
    assert 3 <= len(examples) <= 6 and all("toolkit-example" in e._dom_classes for e in examples)
    thumb, button = examples[0].children
    assert thumb.value and thumb.layout.display is None and int(thumb.layout.width[:-2]) <= 72
    button.click()
    assert len(board.results) == 1 and board.results[0].label in TINY_CLASSES


@pytest.mark.browser
def test_browser_feedback_goes_into_the_next_training_data(page, trained_project, clothing_small, tmp_path):
    """The loop, end to end: a real photo uploaded in chromium, its right label picked and the
    dashboard's own feedback button pressed; the item accepted in the cleaning app's feedback tab
    (its widgets driven in-process) and applied; the next training's data set holds it with that
    label, and the manifest line says where it came from."""
    import shutil

    from toolkit.settings import load_settings
    from toolkit.stages.clean.rank import list_raw_images, rank
    from toolkit.tasks import task_of
    from toolkit.ui.clean_app import CleanerWidget

    file = photo(clothing_small, "shoes", 3)
    _upload(page, file.name, file.read_bytes())
    result = page.locator(".toolkit-result", has=page.locator(".toolkit-name", has_text=file.name))
    result.locator(".toolkit-prob").first.wait_for(timeout=60_000)
    result.locator(".toolkit-right-choice select").select_option("shoes")
    result.locator(".toolkit-save-feedback").click()
    result.locator(".toolkit-feedback-status", has_text="saved as shoes").wait_for(timeout=60_000)
    assert not page.errors, page.errors
    served = trained_project / "feedback" / "tiny"
    # the cleaning app opens a copy of the project (its settings, the feedback the server saved and 8
    # raw photos per class, so that ranking stays cheap): the session's trained project stays as later
    # tests expect it
    root = tmp_path / "project"
    try:
        shutil.copytree(served, root / "feedback" / "tiny")
    finally:
        shutil.rmtree(served)
    shutil.copy2(trained_project / "settings.ini", root / "settings.ini")
    for label in TINY_CLASSES:
        (root / "scrape" / "tiny" / label).mkdir(parents=True)
        for raw_file in sorted((trained_project / "scrape" / "tiny" / label).iterdir())[:8]:
            shutil.copy2(raw_file, root / "scrape" / "tiny" / label / raw_file.name)
    spec = load_settings(root / "settings.ini").get("tiny")
    raw = list_raw_images(spec)
    n_raw = len(raw.files)
    app = CleanerWidget(spec, raw=raw, rankings=rank(spec, raw=raw, size=64, with_model=False), size=64)
    assert app.feedback.n_pending == 1 and app.tabs.titles[1] == "feedback (1)"
    card = app.feedback.list.children[0]
    caption = card.children[1].value
    assert file.stem in caption and "user's label: <b>shoes</b>" in caption
    card.children[2].value = "shoes"
    card.children[3].children[0].click()  # accept
    assert "imported" in app.feedback.message.value and app.error.value == "", app.error.value
    assert app.feedback.n_pending == 0 and app.tabs.titles[1] == "feedback (0)"
    imported = [p for p in (spec.scrape_dir / "shoes").iterdir() if p.name.startswith("fb-")]
    assert len(imported) == 1 and Image.open(imported[0]).size == Image.open(file).size
    manifest = [json.loads(line) for line in (spec.scrape_dir / "manifest.jsonl").read_text().splitlines()]
    line = next(m for m in manifest if m["file"] == f"shoes/{imported[0].name}")
    assert line["source"] == "dashboard" and line["label"] == "shoes" and line["time"]
    assert line["feedback_time"] and line["feedback_file"].startswith("shoes/") and line["title"] == file.name
    app.apply()  # the app's apply button: cleaned_data/tiny, which the next `toolkit train` reads
    assert "applied" in app.status.value and app.error.value == ""
    dataset = task_of(spec).load_data(spec, progress=False)  # what train and retrain_head read
    assert dataset.root == spec.cleaned_dir
    by_name = {Path(f).name: label for f, label in zip(dataset.files, dataset.labels, strict=True)}
    assert by_name[imported[0].name] == "shoes" and len(by_name) == n_raw + 1 == 25
