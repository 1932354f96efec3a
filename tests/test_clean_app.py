"""The cleaning app's parts without a browser: the embedding map and similarity search
(toolkit.stages.clean.explore) on real photo embeddings, feedback import, and the widget driven from
Python (background ranking, keys, map selection, feedback tab)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.stages.clean import explore


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_similar_streams_and_matches_the_full_product():
    rng = np.random.default_rng(3)
    emb = _unit(rng.normal(size=(1000, 32)).astype(np.float32))
    idx, sims = explore.similar(emb, 17, k=10, chunk=128)
    full = emb @ emb[17]
    full[17] = -np.inf
    expected = np.argsort(-full)[:10]
    assert list(idx) == list(expected)
    assert np.allclose(sims, full[expected], atol=1e-5)
    assert 17 not in idx and np.all(np.diff(sims) <= 1e-7)
    idx2, _ = explore.similar(emb, vector=emb[17], k=3, chunk=100)
    assert idx2[0] == 17  # a vector query keeps the row itself
    with pytest.raises(IndexError):
        explore.similar(emb, 1000, k=3)


def test_projection_separates_classes_and_box_selects_all_points():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(3, 64)))
    labels = np.repeat(np.arange(3), 400)
    emb = _unit(centres[labels] + 0.15 * rng.normal(size=(1200, 64))).astype(np.float32)
    coords = explore.project_2d(emb, fit_cap=300)
    assert coords.shape == (1200, 2) and coords.dtype == np.float32
    means = np.stack([coords[labels == c].mean(0) for c in range(3)])
    spread = max(coords[labels == c].std(0).max() for c in range(3))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread
    c0 = coords[labels == 0]
    box = explore.in_box(coords, (c0[:, 0].min(), c0[:, 0].max()), (c0[:, 1].max(), c0[:, 1].min()))
    assert set(np.flatnonzero(labels == 0)) <= set(box.tolist())
    drawn = explore.sample_points(1200, cap=100, include=[5, 1199])
    assert 100 <= len(drawn) <= 102 and {5, 1199} <= set(drawn.tolist())
    assert list(explore.sample_points(50, cap=100)) == list(range(50))


def test_label_next_prefers_uncertain_and_spread_out():
    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(300, 16)).astype(np.float32))
    emb[:20] = emb[0]  # 20 copies of one uncertain image
    probs = np.full((300, 3), [0.98, 0.01, 0.01])
    probs[:40] = [0.4, 0.3, 0.3]
    chosen = explore.label_next(probs, emb, k=10, pool=40)
    assert len(chosen) == 10 and all(i < 40 for i in chosen)
    assert sum(i < 20 for i in chosen) <= 2  # copies are not picked again and again


# ---------------------------------------------------------------- feedback back into the data


@pytest.fixture
def fb_project(tmp_path, clothing_small):
    from conftest import copy_subset

    copy_subset(clothing_small / "train", tmp_path / "scrape" / "f", ["pants", "shoes"], 6)
    (tmp_path / "settings.ini").write_text("[f]\nsize = 64\n")
    from toolkit.settings import load_settings

    return load_settings(tmp_path / "settings.ini").get("f")


def test_accepted_feedback_becomes_a_raw_file_with_provenance(fb_project, clothing_small):
    import json

    from PIL import Image
    from test_clean import raw_hashes

    from toolkit.core.errors import ToolkitError
    from toolkit.stages.clean.decisions import DecisionLog
    from toolkit.stages.clean.rank import list_raw_images
    from toolkit.stages.feedback import feedback_status, import_feedback, reject_feedback, save_feedback

    spec = fb_project
    before = raw_hashes(spec.scrape_dir)
    photos = sorted((clothing_small / "train" / "shoes").iterdir())[-2:]
    save_feedback(spec.feedback_dir, Image.open(photos[0]), "shoes", "my shoe.jpg", {"shoes": 0.3, "pants": 0.7})
    save_feedback(spec.feedback_dir, Image.open(photos[1]), "pants", "odd.jpg", {"shoes": 0.9, "pants": 0.1})
    items = feedback_status(spec)
    assert [i["status"] for i in items] == ["pending", "pending"]
    log = DecisionLog(spec.cleaned_dir)
    result = import_feedback(spec, items[0], log=log)
    assert result["new"] and result["file"].startswith("shoes/fb-") and "my-shoe" in result["file"]
    assert (spec.scrape_dir / result["file"]).read_bytes() == (spec.feedback_dir / items[0]["file"]).read_bytes()
    line = json.loads((spec.scrape_dir / "manifest.jsonl").read_text().splitlines()[-1])
    assert line["source"] == "dashboard" and line["label"] == "shoes" and line["file"] == result["file"]
    assert line["status"] == "ok" and line["time"] and line["feedback_file"] == items[0]["file"]
    assert log.state()[result["file"]]["action"] == "keep"
    again = import_feedback(spec, items[0], log=log)  # the same image twice: imported once
    assert not again["new"] and len((spec.scrape_dir / "manifest.jsonl").read_text().splitlines()) == 1
    reject_feedback(spec, items[1], log=log)
    assert [i["status"] for i in feedback_status(spec)] == ["accepted", "rejected"]
    with pytest.raises(ToolkitError):
        import_feedback(spec, {**items[1], "label": "../escape"}, log=log)
    with pytest.raises(ToolkitError):
        import_feedback(spec, {**items[1], "file": "../../settings.ini"}, log=log)
    after = raw_hashes(spec.scrape_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # no existing raw file changed
    assert set(after) - set(before) == {result["file"], "manifest.jsonl", ".lock"}
    raw = list_raw_images(spec)  # the next cleaning and training see it
    assert result["file"] in raw.rel and raw.labels[raw.rel.index(result["file"])] == "shoes"


# ---------------------------------------------------------------- the widget, from Python


@pytest.fixture(scope="module")
def app_project(tmp_path_factory, clothing_small):
    from conftest import copy_subset

    root = tmp_path_factory.mktemp("app")
    copy_subset(clothing_small / "train", root / "scrape" / "a", ["hat", "pants", "shoes", "t-shirt"], 25, seed=2)
    (root / "settings.ini").write_text("[a]\nsize = 64\n")
    from toolkit.settings import load_settings

    return load_settings(root / "settings.ini").get("a")


def test_widget_paints_first_then_ranks_in_the_background(app_project):
    import time

    from toolkit.ui.clean_app import CleanerWidget

    spec = app_project
    heard = []
    start = time.perf_counter()
    w = CleanerWidget(spec, size=64)
    painted = time.perf_counter() - start
    w.progress_text.observe(lambda c: heard.append(c["new"]), names="value")
    assert painted < 1.0 and not w.ready.is_set() and w.progress in w.children
    assert w.wait(240) and w.error.value == "", w.error.value
    assert any("%" in h and "embedding" in h for h in heard), heard
    assert w.tiles and w.map is not None and w.progress.layout.display == "none"
    assert w.rankings.embeddings.shape[0] == len(w.raw.files)
    # keys: select, delete, relabel, undo, next page
    first = w.tiles[0].file
    w.select(0)
    w.press("d")
    assert w.decisions.state()[first]["action"] == "delete" and w.selected == 1
    second = w.tiles[1].file
    target = next(i for i, c in enumerate(w.classes) if c != w.tiles[1].row["given"])
    w.press(str(target + 1))
    assert w.decisions.state()[second] == {**w.decisions.state()[second], "action": "relabel",
                                           "label": w.classes[target]}
    w.press("u")
    assert second not in w.decisions.state() and first in w.decisions.state()
    assert w.selected == 2  # a decision moves on to the next tile; undo stays
    w.press("ArrowRight")
    assert w.selected == 3 and "clean-selected" in w.tiles[3]._dom_classes
    assert "clean-selected" not in w.tiles[2]._dom_classes
    w.press("k")
    assert w.decisions.state()[w.tiles[3].file]["action"] == "keep"
    w.press("Enter")
    assert w.page == 1
    # the map: a box around one class's points filters the grid to exactly the images inside it
    coords = w.map.coords
    hats = np.array([i for i, c in enumerate(w.raw.labels) if c == "hat"])
    x, y = coords[hats, 0], coords[hats, 1]
    box = ((np.percentile(x, 10), np.percentile(x, 90)), (np.percentile(y, 10), np.percentile(y, 90)))
    w.map.select_box(*box)
    inside = {w.raw.rel[i] for i in explore.in_box(coords, *box)}
    assert inside and {r["file"] for r in w.rows()} == inside and w.page == 0
    assert f"{len(inside)} images picked" in w.map.count.value
    w.map.bulk("delete")
    assert all(w.decisions.state()[f]["action"] == "delete" for f in inside)
    w.map.select(None)
    assert len(w.rows()) == len(w.raw.files)
    # more like this, and the larger view
    w.show_similar(first)
    rows = w.rows()
    assert rows[0]["file"] == first and len(rows) > 12
    sims = [r["similarity"] for r in rows[1:]]
    assert sims == sorted(sims, reverse=True)
    w.show_preview(first)
    assert w.preview.layout.display == "flex" and len(w.preview_image.value) > 1000
    w.clear_query()
    w.view_select.value = "label next"
    assert len(w.rows()) == min(len(w.raw.files), 48)
    for view in ("label issues", "outliers", "duplicates", "top losses"):
        w.view_select.value = view
    assert w.error.value == ""


def test_feedback_tab_accepts_and_rejects(app_project, clothing_small):
    from PIL import Image

    from toolkit.stages.clean.rank import list_raw_images, rank
    from toolkit.stages.feedback import save_feedback
    from toolkit.ui.clean_app import CleanerWidget

    spec = app_project
    photos = sorted((clothing_small / "train" / "pants").iterdir())[-2:]
    for photo in photos:
        save_feedback(spec.feedback_dir, Image.open(photo), "pants", photo.name, {"pants": 0.4, "hat": 0.6})
    raw = list_raw_images(spec)
    w = CleanerWidget(spec, raw=raw, rankings=rank(spec, raw=raw, size=64), size=64)
    panel = w.feedback
    assert panel.n_pending == 2 and "(2)" in w.tabs.titles[1]
    items = [i for i in __import__("toolkit.stages.feedback", fromlist=["x"]).feedback_status(spec)]
    panel.accept(items[0], "pants")
    assert "imported" in panel.message.value and w.error.value == ""
    imported = [p for p in (spec.scrape_dir / "pants").iterdir() if p.name.startswith("fb-")]
    assert len(imported) == 1
    panel.reject(items[1])
    assert panel.n_pending == 0 and "(0)" in w.tabs.titles[1]
    panel.similar(items[1])
    assert w.error.value == "" and w.query and w.rows()[0]["file"].startswith("pants/")
