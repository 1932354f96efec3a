"""The cleaning stage on real photos: rankings, decisions, apply/undo/crash, the widget, the CLI,
and one browser test through Voilà. Raw files under scrape/ are hashed before and after: they
never change."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import OFFLINE, REPO, copy_subset, run_cli
from PIL import Image, ImageDraw

from toolkit.core.images import sha256_file

CLASSES = ["hat", "pants", "shoes", "t-shirt"]


def raw_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def make_text_image(path: Path) -> None:
    img = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(img)
    for y in range(10, 290, 22):
        draw.text((10, y), "Lorem ipsum dolor sit amet, consectetur adipiscing", fill="black")
    img.save(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory, clothing_small):
    """scrape/c/: 4 real classes x 40 photos, 10% moved to a wrong class (seeded), two near-copies
    (one resized into another class, one re-encoded), a blank image and a text image."""
    root = tmp_path_factory.mktemp("clean")
    raw = root / "scrape" / "c"
    copy_subset(clothing_small / "train", raw, CLASSES, 40, seed=1)
    rng = random.Random(7)
    files = sorted(raw.rglob("*.jpg"))
    flipped = []
    for path in rng.sample(files, 16):
        new_class = rng.choice([c for c in CLASSES if c != path.parent.name])
        shutil.move(path, raw / new_class / path.name)
        flipped.append(f"{new_class}/{path.name}")
    originals = sorted((raw / "pants").glob("*.jpg"))
    originals = [p for p in originals if f"pants/{p.name}" not in flipped][:2]
    img = Image.open(originals[0])
    img.resize((img.width // 2, img.height // 2)).save(raw / "shoes" / "copy-small.jpg", quality=70)
    Image.open(originals[1]).save(raw / "pants" / "copy-reencoded.jpg", quality=40)
    Image.new("RGB", (300, 300), "white").save(raw / "hat" / "blank.png")
    make_text_image(raw / "t-shirt" / "text.png")
    (root / "settings.ini").write_text("[c]\nsize = 64\n")
    return {"root": root, "raw": raw, "flipped": flipped, "hashes": raw_hashes(raw),
            "copies": [(f"pants/{originals[0].name}", "shoes/copy-small.jpg"),
                       (f"pants/{originals[1].name}", "pants/copy-reencoded.jpg")]}


@pytest.fixture(scope="module")
def spec(project):
    from toolkit.settings import load_settings

    return load_settings(project["root"] / "settings.ini").get("c")


@pytest.fixture(scope="module")
def ranked(project, spec):
    from toolkit.stages.clean.rank import list_raw_images, rank

    raw = list_raw_images(spec)
    start = time.perf_counter()
    rankings = rank(spec, raw=raw)
    return raw, rankings, time.perf_counter() - start


def test_out_of_fold_ranking_puts_flipped_images_first(project, ranked):
    _, rankings, seconds = ranked
    k = len(project["flipped"])
    top = {row["file"] for row in rankings.label_issues[:k]}
    precision = len(top & set(project["flipped"])) / k
    assert precision >= 0.5, f"precision at k={k} is {precision:.2f} (flip rate 0.10)"
    first = rankings.label_issues[0]
    assert set(first) >= {"file", "given", "predicted", "prob", "score"}
    scores = [row["score"] for row in rankings.label_issues]
    assert scores == sorted(scores)
    assert seconds < 120, f"ranking 164 images took {seconds:.0f} s"


def test_near_copies_are_duplicate_groups(project, ranked):
    _, rankings, _ = ranked
    groups = {frozenset(g["files"]): g for g in rankings.duplicates}
    for original, copy in project["copies"]:
        match = [g for files, g in groups.items() if {original, copy} <= files]
        assert match, f"{copy} not grouped with {original}; groups: {list(groups)}"
    cross = next(g for files, g in groups.items() if "shoes/copy-small.jpg" in files)
    assert cross["cross_class"] and cross["kind"] == "near"
    assert len(rankings.duplicates) <= 4, "few false duplicate groups on distinct photos"


def test_blank_and_text_images_are_outliers(ranked):
    _, rankings, _ = ranked
    flagged = {row["file"] for row in rankings.outliers if row["outlier"]}
    top5 = [row["file"] for row in rankings.outliers[:5]]
    for odd in ("hat/blank.png", "t-shirt/text.png"):
        assert odd in flagged and odd in top5, (odd, top5)
    assert len(flagged) <= 10


# different garments shot on the same floor by the same contributor: perceptual hashes 4-6 bits apart
LOOK_ALIKES = [("pants/a88db2dc-9282-4e0f-a412-9a126b4c1b02.jpg", "pants/d12a6fde-d34a-4521-9752-b7a077510e41.jpg"),
               ("pants/8571627a-1599-4c45-a7c8-aac55576e4b8.jpg", "pants/8db4d594-4688-4447-a5b9-cd5c68b1870e.jpg"),
               ("t-shirt/c614a09e-9683-4d53-8387-de6db3d5e306.jpg", "t-shirt/fd3361c0-a56f-46db-9012-6ee55840447b.jpg"),
               ("longsleeve/0142c777-baf8-4500-add9-6641b95b90ec.jpg",
                "longsleeve/5d11e46b-e897-4d03-bc7d-455e49800edf.jpg")]


def test_look_alike_photos_are_not_near_copies_but_resized_ones_are(tmp_path, clothing_small):
    """Real look-alikes (same floor, same framing, another garment) stay apart; a half-size re-encoded copy, a
    quality-40 copy and a brightened copy of a photo are grouped with it."""
    import numpy as np
    from PIL import ImageEnhance

    from toolkit.stages.clean.embeddings import embed
    from toolkit.stages.clean.rank import duplicate_groups

    train = clothing_small / "train"
    look_alikes = [(train / a, train / b) for a, b in LOOK_ALIKES]
    others = sorted(set(train.glob("*/*.jpg")) - {f for pair in look_alikes for f in pair})
    random.Random(1).shuffle(others)
    files = [f for pair in look_alikes for f in pair] + others[:80]
    original = Image.open(others[0]).convert("RGB")
    original.resize((original.width // 2, original.height // 2)).save(tmp_path / "half.jpg", quality=70)
    original.save(tmp_path / "q40.jpg", quality=40)
    ImageEnhance.Brightness(original).enhance(1.2).save(tmp_path / "bright.jpg", quality=90)
    files += [tmp_path / "half.jpg", tmp_path / "q40.jpg", tmp_path / "bright.jpg"]
    rel = [str(f) for f in files]
    out = embed(files, size=160, cache_dir=tmp_path / "cache")
    groups = duplicate_groups(rel, [f.parent.name for f in files], ["train"] * len(files),
                              [sha256_file(f) for f in files], out.phash, np.asarray(out.embeddings))
    grouped = [set(g["files"]) for g in groups]
    for a, b in look_alikes:
        assert not any({str(a), str(b)} <= g for g in grouped), f"look-alikes grouped: {a.name}, {b.name}"
    copies = {str(others[0]), *(str(tmp_path / n) for n in ("half.jpg", "q40.jpg", "bright.jpg"))}
    assert copies in grouped, grouped
    assert len(groups) == 1, f"false near-copy groups: {grouped}"


def test_duplicates_across_train_and_valid_are_leaks():
    import numpy as np

    from toolkit.stages.clean.rank import duplicate_groups

    emb = np.eye(4, dtype=np.float32)
    groups = duplicate_groups(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["x", "x", "y", "y"],
                              ["train", "valid", "train", "train"], ["h1", "h1", "h2", "h3"],
                              ["", "", "", ""], emb)
    assert groups == [{"files": ["a.jpg", "b.jpg"], "labels": ["x", "x"], "splits": ["train", "valid"],
                       "kind": "exact", "cross_class": False, "leak": True}]


def test_embeddings_come_from_the_cache(project, spec, ranked, monkeypatch):
    import toolkit.stages.clean.embeddings as embeddings

    raw, rankings, _ = ranked
    monkeypatch.setattr(embeddings, "_model", lambda arch: pytest.fail("the cache was not used"))
    emb, phash, sha = embeddings.compute_embeddings(raw.files[:10], arch=spec.arch, size=spec.clean_size,
                                                    cache_dir=spec.cleaned_dir / ".cache")
    assert emb.shape == (10, 1280) and all(phash) and len(sha) == 10


def test_embedding_rows_hold_the_final_and_inner_stage_features(project, spec, ranked):
    """A cached row: the final 1280 features, then Lite's stride-16 (112) and stride-32 (192) stages, each
    part L2-normalised; `embeddings` is the first part itself (no copy), `features` the whole row."""
    import numpy as np

    import toolkit.stages.clean.embeddings as embeddings

    raw, rankings, _ = ranked
    out = embeddings.embed(raw.files, arch=spec.arch, size=spec.clean_size, cache_dir=spec.cleaned_dir / ".cache")
    assert out.features.shape == (len(raw.files), 1280 + 112 + 192)
    assert np.shares_memory(out.embeddings, out.features)
    for part in (out.features[:, :1280], out.features[:, 1280:1392], out.features[:, 1392:]):
        assert np.allclose(np.linalg.norm(part, axis=1), 1, atol=1e-4)
    assert not np.allclose(out.features[0, 1280:1392], out.features[1, 1280:1392])
    assert np.array_equal(rankings.embeddings, out.embeddings)


def test_clean_size_setting_is_shared_by_the_cli_and_the_app(tmp_path, clothing_small, monkeypatch):
    """`clean_size` in settings.ini: `toolkit clean --report` embeds at it, and the app's rank (no size
    given) then reads the same cache instead of computing the images again at another size."""
    import toolkit.stages.clean.embeddings as embeddings
    from toolkit.settings import load_settings
    from toolkit.stages.clean.rank import list_raw_images, rank

    copy_subset(clothing_small / "train", tmp_path / "scrape" / "c", CLASSES[:3], 8, seed=3)
    (tmp_path / "settings.ini").write_text("[c]\nclean_size = 48\n")
    done = run_cli("clean", "c", "--report", "--json", "--quiet", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    cache = tmp_path / "cleaned_data" / "c" / ".cache"
    assert [p.name for p in cache.glob("embeddings-*.f32")] == ["embeddings-ms-efficientnet_lite0-48.f32"]
    spec = load_settings(tmp_path / "settings.ini").get("c")
    assert spec.clean_size == 48
    monkeypatch.setattr(embeddings, "_model", lambda arch: pytest.fail("the app computed the embeddings again"))
    rankings = rank(spec, raw=list_raw_images(spec), with_model=False)
    assert rankings.embeddings.shape == (24, 1280)


def test_broken_files_and_manifest(tmp_path, clothing_small):
    from toolkit.settings import load_settings
    from toolkit.stages.clean.rank import list_raw_images

    raw = copy_subset(clothing_small / "train", tmp_path / "scrape" / "b", ["hat", "skirt"], 3)
    (raw / "hat" / "cut.jpg").write_bytes((next((raw / "skirt").iterdir())).read_bytes()[:500])
    (raw / "manifest.jsonl").write_text(json.dumps({"file": "skirt/gone.jpg", "status": "failed",
                                                    "error": "HTTP 404"}) + "\n")
    (tmp_path / "settings.ini").write_text("[b]\n")
    images = list_raw_images(load_settings(tmp_path / "settings.ini").get("b"))
    broken = {b["file"]: b["reason"] for b in images.broken}
    assert "cannot decode" in broken["hat/cut.jpg"].lower() and "404" in broken["skirt/gone.jpg"]
    assert len(images.files) == 6


def test_top_losses_from_a_trained_model(project, spec, ranked, tmp_path):
    from toolkit.core.artifacts import write_model
    from toolkit.core.backbones import create_model
    from toolkit.stages.clean.rank import top_losses

    raw, _, _ = ranked
    write_model(tmp_path, create_model("efficientnet_lite0", 4, pretrained=False), task="single", meta=
                 {"arch": "efficientnet_lite0", "classes": CLASSES, "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    rows = top_losses(spec, raw, model_dir=tmp_path)
    assert len(rows) == len(raw.files) and {r["split"] for r in rows} == {"train", "valid"}
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses, reverse=True)
    assert top_losses(spec, raw, model_dir=tmp_path / "none") == []


# ---------------------------------------------------------------- decisions, apply, undo, crash


@pytest.fixture
def small(tmp_path, clothing_small):
    """2 classes x 4 photos with one name present in both classes (for relabel collisions)."""
    from toolkit.settings import load_settings
    from toolkit.stages.clean.decisions import DecisionLog
    from toolkit.stages.clean.rank import list_raw_images

    raw_dir = copy_subset(clothing_small / "train", tmp_path / "scrape" / "s", ["hat", "skirt"], 4)
    shutil.copy(next((raw_dir / "hat").iterdir()), raw_dir / "skirt" / "same.jpg")
    shutil.copy(next((raw_dir / "hat").iterdir()), raw_dir / "hat" / "same.jpg")
    (tmp_path / "settings.ini").write_text("[s]\n")
    spec = load_settings(tmp_path / "settings.ini").get("s")
    return spec, list_raw_images(spec), DecisionLog(spec.cleaned_dir), raw_hashes(raw_dir)


def cleaned_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not p.relative_to(folder).as_posix().startswith((".", "report"))
            and p.name not in ("decisions.jsonl", "applied.json")}


def test_apply_undo_and_last_decision_wins(small):
    from toolkit.stages.clean.decisions import apply_decisions, dry_run, pending

    spec, raw, log, before = small
    hat = sorted(f for f in raw.rel if f.startswith("hat/") and f != "hat/same.jpg")
    log.record(hat[0], "delete", reason="blurry")
    log.record(hat[1], "delete")
    log.record(hat[1], "keep")  # the last decision wins
    log.record("skirt/same.jpg", "relabel", "hat", reason="wrong class")
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [d["action"] for d in lines] == ["delete", "delete", "keep", "relabel"] and lines[0]["reason"] == "blurry"
    assert all("time" in d and "file" in d for d in lines)
    diff = dry_run(raw, log)
    assert len(diff["add"]) == len(raw.files) - 1 and not cleaned_files(spec.cleaned_dir)
    result = apply_decisions(raw, log)
    files = cleaned_files(spec.cleaned_dir)
    assert hat[0].split("/")[1] not in {f.split("/")[1] for f in files if f.startswith("hat/")}
    assert hat[1] in files and "hat/same.jpg" in files and "hat/same-2.jpg" in files, files
    assert not any(f.startswith("skirt/same") for f in files)
    assert result["deleted"] == 1 and result["relabelled"] == 1 and result["copied"] == len(files)
    assert pending(log) == {}
    assert (spec.cleaned_dir / hat[1]).stat().st_ino != (raw.root / hat[1]).stat().st_ino  # copies, never links
    # undo the relabel, then everything
    assert log.undo()["action"] == "relabel"
    assert set(pending(log)) == {"skirt/same.jpg"}
    assert dry_run(raw, log)["move"] == [["hat/same-2.jpg", "skirt/same.jpg"]]
    apply_decisions(raw, log)
    assert "skirt/same.jpg" in cleaned_files(spec.cleaned_dir)
    assert log.undo_all() == 2
    apply_decisions(raw, log)
    assert len(cleaned_files(spec.cleaned_dir)) == len(raw.files)
    assert log.path.is_file() and (spec.cleaned_dir / "applied.json").is_file()
    with open(log.path, "a") as handle:
        handle.write('{"id": "torn", "act')  # a crash mid-write
    assert log.state() == {}
    assert raw_hashes(raw.root) == before


def test_crash_during_apply_leaves_the_old_set(small, monkeypatch):
    import toolkit.stages.clean.decisions as decisions

    spec, raw, log, before = small
    log.record(raw.rel[0], "delete")
    decisions.apply_decisions(raw, log)
    old = cleaned_files(spec.cleaned_dir)
    log.record(raw.rel[1], "delete")
    real_copy, calls = decisions._copy, []

    def crashing_copy(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_copy(src, dst)

    monkeypatch.setattr(decisions, "_copy", crashing_copy)
    with pytest.raises(RuntimeError):
        decisions.apply_decisions(raw, log)
    assert cleaned_files(spec.cleaned_dir) == old
    assert not list(spec.cleaned_dir.parent.glob(".s.*")), "no half-built folder left behind"
    # the fallback (two renames) path: a crash between them is recovered on the next read
    monkeypatch.setattr(decisions, "_copy", real_copy)
    monkeypatch.setattr(decisions, "_exchange", lambda a, b: False)
    decisions.apply_decisions(raw, log)
    assert cleaned_files(spec.cleaned_dir) == old - {raw.rel[1]}
    spec.cleaned_dir.rename(spec.cleaned_dir.parent / ".s.old-123")
    assert log.state()[raw.rel[1]]["action"] == "delete"
    assert cleaned_files(spec.cleaned_dir) == old - {raw.rel[1]}
    assert raw_hashes(raw.root) == before


# ---------------------------------------------------------------- the widget, from Python


def test_widget_choices_survive_switching_and_restart(project, spec, ranked):
    from toolkit.ui.clean_app import CleanerWidget

    raw, rankings, _ = ranked
    shutil.rmtree(spec.cleaned_dir / "decisions.jsonl", ignore_errors=True)
    (spec.cleaned_dir / "decisions.jsonl").unlink(missing_ok=True)
    w = CleanerWidget(spec, raw=raw, rankings=rankings, page_size=8)
    assert w.error.value == ""
    assert w.n_pages == -(-len(raw.files) // 8) and len(w.tiles) == 8
    w.class_select.value = "hat"
    hat_first = w.tiles[0].file
    w.tiles[0].decision.value = "delete"
    w.tiles[1].decision.value = "relabel to pants"
    relabelled = w.tiles[1].file
    w.split_select.value = "valid"
    w.view_select.value = "outliers"
    w.class_select.value = "t-shirt"
    w.go(1)
    page2 = [t.file for t in w.tiles]
    w.bulk("keep")
    w.class_select.value = "(all classes)"
    w.split_select.value = "all"
    w.view_select.value = "duplicates"
    assert w.tiles and all(t.file for t in w.tiles)
    w.tiles[0].owner.keep_one(w.tiles[0])
    kept_one = w.tiles[0].file
    w.view_select.value = "top losses"
    assert "no trained model" in w.grid.children[0].value
    w.view_select.value = "label issues"
    w.split_select.value = "all"
    w.class_select.value = "hat"
    values = {t.file: t.decision.value for t in w.tiles}
    assert values[hat_first] == "delete" and values[relabelled] == "relabel to pants"
    assert "pending" in w.summary.value
    # a new widget (as after a kernel restart) reads the same state from decisions.jsonl
    w2 = CleanerWidget(spec, raw=raw, rankings=rankings, page_size=8)
    state = w2.decisions.state()
    assert state[hat_first]["action"] == "delete" and state[relabelled]["label"] == "pants"
    assert all(state[f]["action"] == "keep" for f in page2 if f not in (hat_first, relabelled))
    assert state[kept_one]["action"] == "keep"
    w2.class_select.value = "hat"
    assert {t.file: t.decision.value for t in w2.tiles}[hat_first] == "delete"
    assert w2.tiles[0].file == hat_first
    w2.tiles[0].decision.value = "—"
    assert hat_first not in w2.decisions.state()
    w2.tiles[0].decision.value = "keep"
    w2.undo()
    assert hat_first not in w2.decisions.state() and w2.tiles[0].decision.value == "—"
    w2.tiles[0].decision.value = "delete"
    result = w2.apply()
    assert result and w2.error.value == ""
    assert not (spec.cleaned_dir / hat_first).exists() and (project["raw"] / hat_first).exists()
    assert (spec.cleaned_dir / "pants" / Path(relabelled).name).exists()
    assert "pending</b>: <span class='clean-pending'>0" in w2.summary.value
    assert raw_hashes(project["raw"]) == project["hashes"]


def test_widget_shows_errors_inside_callbacks(spec, ranked, monkeypatch):
    from toolkit.ui import clean_app as widget_module

    raw, rankings, _ = ranked
    w = widget_module.CleanerWidget(spec, raw=raw, rankings=rankings)
    monkeypatch.setattr(widget_module, "apply_decisions", lambda *a, **k: 1 / 0)
    w.apply()
    assert "ZeroDivisionError" in w.error.value or "division by zero" in w.error.value


# ---------------------------------------------------------------- CLI and notebook


def test_cli_report_json_and_apply(project, ranked):
    done = run_cli("clean", "c", "--report", "--json", "--quiet", cwd=project["root"], timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out) == {"label_issues", "duplicates", "outliers", "quality", "confusion"}
    scores = [row["score"] for row in out["label_issues"]]
    assert scores == sorted(scores) and out["label_issues"]
    for row in out["label_issues"]:
        assert set(row) == {"file", "given", "predicted", "prob", "score"}
        assert (project["raw"] / row["file"]).is_file()
    assert any({"shoes/copy-small.jpg"} <= set(group) for group in out["duplicates"])
    assert "hat/blank.png" in {row["file"] for row in out["outliers"]}
    for name in ("report.json", "report-label_issues.csv", "report-duplicates.csv", "report-outliers.csv"):
        assert (project["root"] / "cleaned_data" / "c" / name).is_file()
    done = run_cli("clean", "c", "--apply", cwd=project["root"])
    assert done.returncode == 0 and "applied" in done.stdout, done.stderr
    assert raw_hashes(project["raw"]) == project["hashes"]


def test_clean_notebook_is_thin(tmp_path):
    import nbformat

    from toolkit.ui.clean_notebook import write_clean_notebook

    nb = nbformat.read(str(write_clean_notebook(tmp_path / "clean.ipynb")), as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and "TOOLKIT_CLASSIFIER" in code[0] and "CleanerWidget" in code[0]
    assert len(code[0].splitlines()) < 12
    committed = nbformat.read(str(REPO / "apps" / "clean.ipynb"), as_version=4)
    assert [c.source for c in committed.cells if c.cell_type == "code"] == code


# ---------------------------------------------------------------- one browser test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_browser_mark_switch_back_apply(project, spec, ranked, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed")
    from toolkit.ui.clean_notebook import write_clean_notebook
    from toolkit.ui.voila import launch_voila, stop_voila

    (spec.cleaned_dir / "decisions.jsonl").unlink(missing_ok=True)
    notebook = write_clean_notebook(project["root"] / "apps" / "clean.ipynb")
    port = _free_port()
    log_file = tmp_path / "voila.log"
    env = {"TOOLKIT_CLASSIFIER": "c", "TOOLKIT_SETTINGS": str(project["root"] / "settings.ini"),
           "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": f"{OFFLINE}:{REPO}"}
    process = launch_voila(notebook, port, "127.0.0.1", dict(os.environ, **env), log_path=log_file)
    try:
        deadline = time.time() + 120
        while f"http://127.0.0.1:{port}/" not in log_file.read_text():
            assert process.poll() is None and time.time() < deadline, log_file.read_text()
            time.sleep(0.3)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        errors = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                    ("http://127.0.0.1", "ws://127.0.0.1", "data:")) else route.abort())
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.locator(".clean-tile-0").wait_for(timeout=150_000)
                page.locator(".clean-class select").select_option("hat")
                tile = page.locator(".clean-tile-0", has_text="given: hat")
                tile.wait_for(timeout=30_000)
                name = tile.locator("b").first.inner_text(timeout=30_000)
                tile.locator(".clean-decision select").select_option("delete")
                decisions = spec.cleaned_dir / "decisions.jsonl"
                deadline = time.time() + 30
                while not (decisions.is_file() and f"hat/{name}" in decisions.read_text()):
                    assert time.time() < deadline, (name, decisions.read_text() if decisions.is_file() else "")
                    time.sleep(0.2)
                page.locator(".clean-class select").select_option("pants")
                page.locator(".clean-tile-0", has_text="given: pants").wait_for(timeout=30_000)
                page.locator(".clean-class select").select_option("hat")
                marked = page.locator(".clean-tile", has_text=name)
                marked.wait_for(timeout=30_000)
                assert marked.locator(".clean-decision select").input_value() == "delete"
                page.locator("button.clean-apply").click()
                page.locator(".clean-applied").wait_for(timeout=60_000)
            finally:
                browser.close()
        assert not errors, errors
        assert not (spec.cleaned_dir / "hat" / name).exists()
        assert (project["raw"] / "hat" / name).exists()
        assert len(list((spec.cleaned_dir / "hat").iterdir())) > 10
        assert raw_hashes(project["raw"]) == project["hashes"]
    finally:
        stop_voila(process)


def test_cli_clean_opens_voila_and_stops_on_ctrl_c(project, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import cli_env

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "clean", "c", "--port", str(port)],
                               cwd=project["root"], env=cli_env(JUPYTER_DATA_DIR=str(tmp_path)),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               # a terminal's Ctrl-C: SIGINT at its default even when this test run
                               # itself was started in the background (where the shell ignores it)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "Voila did not start"
                time.sleep(0.5)
        assert (project["root"] / "apps" / "clean.ipynb").is_file()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130  # stop_voila: 10 s grace + kill; slack for a loaded machine
        deadline = time.time() + 15  # Voila's children may take a moment to release the port
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                break
            time.sleep(0.5)
        import psutil

        listeners = [(c.pid, " ".join(psutil.Process(c.pid).cmdline())[:200]) for c in psutil.net_connections("tcp")
                     if c.laddr and c.laddr.port == port and c.status == "LISTEN" and c.pid]
        assert not listeners, listeners
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
