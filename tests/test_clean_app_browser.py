"""The cleaning app in a real browser (Voilà + Playwright + Debian chromium) on ~160 real photos,
opened cold (no embedding cache): the progress percentage shows first, then tiles; a click and `d`
record a delete; a box on the embedding map filters the grid; a feedback image is accepted into
scrape/NAME with its manifest line. Screenshots go to /tmp/clean-app-*.png."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import OFFLINE, REPO, copy_subset
from PIL import Image

pytestmark = pytest.mark.browser

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, what
        time.sleep(0.2)


@pytest.fixture(scope="module")
def app(tmp_path_factory, clothing_small):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed")
    from toolkit.settings import load_settings
    from toolkit.stages.feedback import save_feedback
    from toolkit.ui.clean_notebook import write_clean_notebook
    from toolkit.ui.voila import launch_voila, stop_voila

    root = tmp_path_factory.mktemp("cleanapp")
    copy_subset(clothing_small / "train", root / "scrape" / "b", ["hat", "pants", "shoes", "t-shirt"], 40, seed=3)
    (root / "settings.ini").write_text("[b]\nsize = 64\n")
    spec = load_settings(root / "settings.ini").get("b")
    photo = sorted((clothing_small / "train" / "shoes").iterdir())[-1]
    save_feedback(spec.feedback_dir, Image.open(photo), "shoes", "from-dashboard.jpg", {"shoes": 0.2, "hat": 0.8})
    notebook = write_clean_notebook(root / "apps" / "clean.ipynb")
    port = _free_port()
    log_file = root / "voila.log"
    env = {"TOOLKIT_CLASSIFIER": "b", "TOOLKIT_SETTINGS": str(root / "settings.ini"),
           "JUPYTER_DATA_DIR": str(root / "jupyter"), "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{OFFLINE}:{REPO}"}
    process = launch_voila(notebook, port, "127.0.0.1", dict(os.environ, **env), log_path=log_file)
    try:
        _until(lambda: f"http://127.0.0.1:{port}/" in log_file.read_text() or process.poll() is not None, 120,
               "voila did not start")
        assert process.poll() is None, log_file.read_text()
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                    ("http://127.0.0.1", "ws://127.0.0.1", "data:")) else route.abort())
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120_000)
                yield {"page": page, "spec": spec, "errors": errors, "start": start, "log": log_file,
                       "dom": time.perf_counter() - start}
            finally:
                browser.close()
    finally:
        stop_voila(process)


def test_cold_open_progress_then_tiles_then_d_deletes(app):
    page, spec = app["page"], app["spec"]
    progress = page.locator(".clean-progress-text").first
    progress.wait_for(timeout=120_000)
    painted = time.perf_counter() - app["start"]
    seen = _until(lambda: re.search(r"\d+%", progress.inner_text() if progress.count() else "") and
                  progress.inner_text(), 60, "no percentage shown")
    page.screenshot(path="/tmp/clean-app-progress.png")
    page.locator(".clean-tile-0").wait_for(timeout=180_000)
    tiles = time.perf_counter() - app["start"]
    print(f"DOMContentLoaded {app['dom']:.1f} s, paint {painted:.1f} s, tiles {tiles:.1f} s after goto; "
          f"progress seen: {seen!r}")
    page.locator(".clean-legend").wait_for()
    tile = page.locator(".clean-tile-2")
    name = tile.locator("b").first.inner_text()
    given = re.search(r"given: (\S+)", tile.inner_text()).group(1)
    tile.locator(".clean-thumb").click()
    page.locator(".clean-tile-2.clean-selected").wait_for(timeout=10_000)
    page.keyboard.press("d")
    decisions = spec.cleaned_dir / "decisions.jsonl"
    line = _until(lambda: decisions.is_file() and next((json.loads(x) for x in decisions.read_text().splitlines()
                                                        if f"{given}/{name}" in x), None), 20, "no delete recorded")
    assert line["action"] == "delete" and line["file"] == f"{given}/{name}" and line["source"] == "widget"
    page.locator(".clean-tile-2.clean-marked-delete").wait_for(timeout=10_000)
    page.locator(".clean-tile-3.clean-selected").wait_for(timeout=10_000)  # moved on to the next tile
    page.keyboard.press("u")  # undo: the tile loses its mark
    _until(lambda: page.locator(".clean-tile-2.clean-marked-delete").count() == 0, 10, "undo did not show")
    page.locator(".clean-tile-4 .clean-thumb").dblclick()
    page.locator(".clean-preview img").wait_for(timeout=10_000)
    assert page.locator(".clean-preview").is_visible()
    page.screenshot(path="/tmp/clean-app-tiles.png", full_page=True)
    page.keyboard.press("d")  # the double-clicked tile is selected: d deletes it again
    assert not app["errors"], app["errors"]


def test_box_on_the_map_filters_the_grid(app):
    page = app["page"]
    figure = page.locator(".clean-map-figure")
    figure.wait_for(timeout=30_000)
    before = page.locator(".clean-page").inner_text()
    box = figure.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    count = page.locator(".clean-map-n", has_text="images picked")
    count.wait_for(timeout=20_000)
    n = int(re.search(r"(\d+) images picked", count.inner_text()).group(1))
    assert 0 < n < 160, count.inner_text()
    label = page.locator(".clean-page", has_text="picked on the map")
    label.wait_for(timeout=20_000)
    assert f"({n} images, filtered" in label.inner_text() and label.inner_text() != before
    assert page.locator(".clean-tile").count() == min(n, 12)
    page.screenshot(path="/tmp/clean-app-map.png", full_page=True)
    page.locator(".clean-map-clear").click()
    page.locator(".clean-page", has_text="(160 images)").wait_for(timeout=20_000)
    assert not app["errors"], app["errors"]


def test_accept_feedback_imports_it(app):
    page, spec = app["page"], app["spec"]
    page.locator(".clean-tabs .lm-TabBar-tab", has_text="feedback").click()
    item = page.locator(".clean-fb-item-0")
    item.wait_for(timeout=20_000)
    assert "shoes" in item.inner_text()
    item.locator("button.clean-fb-accept").click()
    page.locator(".clean-fb-imported").wait_for(timeout=20_000)
    imported = [p for p in (spec.scrape_dir / "shoes").iterdir() if p.name.startswith("fb-")]
    assert len(imported) == 1
    lines = [json.loads(x) for x in (spec.scrape_dir / "manifest.jsonl").read_text().splitlines()]
    assert lines[-1]["file"] == f"shoes/{imported[0].name}" and lines[-1]["source"] == "dashboard"
    assert lines[-1]["label"] == "shoes"
    page.screenshot(path="/tmp/clean-app-feedback.png", full_page=True)
    assert not app["errors"], app["errors"]
