"""Ensembles (two sizes and/or two backbones, both combining modes) trained for real on real car and
clothing photos, evaluated per member, explained with Grad-CAM from Python, the CLI and the dashboard."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, cli_env, copy_subset, run_cli
from PIL import Image

from toolkit.core.errors import SettingsError
from toolkit.settings import load_settings

CARS = ["SUV", "Sedan"]
CARS_SETTINGS = ("[cars]\ntitle = Cars\nensemble = size=64 | size=80\nensemble_mode = class_weighted\n"
                 "epochs = 1\nfreeze_epochs = 1\nbs = 16\nlr = 5e-3\nlr_find_iters = 20\n")


# ------------------------------------------------------------------ settings and arithmetic (no training)


def test_ensemble_settings_parse_through_the_keys_table(tmp_path):
    ini = tmp_path / "settings.ini"
    ini.write_text("[a]\nsize = 90\nensemble = size=75 | size=100 arch=resnet34 lr=1e-3\nensemble_mode = mean\n"
                   "[b]\n")
    settings = load_settings(ini)
    a = settings.get("a")
    assert a.ensemble == [{"size": 75}, {"size": 100, "arch": "resnet34", "lr": 1e-3}] and a.ensemble_mode == "mean"
    assert settings.get("b").ensemble == [] and settings.get("b").ensemble_mode == "auto"
    from toolkit.tasks.ensemble import member_specs

    members = member_specs(a)
    assert [name for name, _ in members] == ["size75", "size100-resnet34-lr0.001"]
    assert [(m.size, m.arch, m.ensemble) for _, m in members] == [(75, "efficientnet_lite0", []), (100, "resnet34", [])]
    assert all(m.split == a.split and m.seed == a.seed and m.data == a.data for _, m in members)  # one split


@pytest.mark.parametrize("value, expected", [
    ("size=75 | size=abc", "[a] ensemble = 'size=75 | size=abc': member 'size=abc': size = 'abc'"),
    ("size=75 | split=random", "'split' cannot differ between members"),
    ("size=75 | arch=alexnet", "unknown backbone 'alexnet'"),
    ("size=75 | size 100", "write KEY=VALUE pairs"),
    ("size=75", "at least 2 members"),
    ("size=75 | size=75", "listed twice"),
])
def test_bad_ensemble_is_one_line_naming_section_and_key(tmp_path, value, expected):
    ini = tmp_path / "settings.ini"
    ini.write_text(f"[a]\nensemble = {value}\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(ini)
    assert expected in str(caught.value) and "[a] ensemble" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    ini.write_text("[a]\nensemble_mode = median\n")
    with pytest.raises(SettingsError, match=r"\[a\] ensemble_mode = 'median': use one of"):
        load_settings(ini)


def test_class_weights_are_recall_normalised_over_members():
    from toolkit.tasks.ensemble import class_weights, combine

    first = np.array([[8, 2, 0], [1, 4, 5], [0, 0, 0]])  # recall 0.8, 0.4, (no images)
    second = np.array([[5, 5, 0], [0, 10, 0], [0, 0, 0]])  # recall 0.5, 1.0, (no images)
    weights = class_weights([first, second])
    assert weights == pytest.approx(np.array([[0.8 / 1.3, 0.4 / 1.4, 0.5], [0.5 / 1.3, 1.0 / 1.4, 0.5]]))
    zero = class_weights([np.array([[0, 3], [0, 3]]), np.array([[0, 3], [1, 2]])])  # class 0: nobody right
    assert zero[:, 0] == pytest.approx([0.5, 0.5]) and zero[:, 1] == pytest.approx([0.6, 0.4])

    p1 = np.array([[0.6, 0.3, 0.1]])
    p2 = np.array([[0.2, 0.7, 0.1]])
    assert combine([p1, p2], "mean") == pytest.approx(np.array([[0.4, 0.5, 0.1]]))
    raw = np.array([0.6 * 0.8 / 1.3 + 0.2 * 0.5 / 1.3, 0.3 * 0.4 / 1.4 + 0.7 * 1.0 / 1.4, 0.1 * 0.5 + 0.1 * 0.5])
    assert combine([p1, p2], "class_weighted", weights)[0] == pytest.approx(raw / raw.sum())


def test_cross_fitting_scores_each_fold_with_the_other_folds_weights():
    from toolkit.core.metrics import confusion
    from toolkit.tasks.ensemble import class_weights, combine, cross_fitted, fold_of

    rng = np.random.default_rng(0)
    true = np.repeat([0, 1, 2], [10, 7, 5])
    fold = fold_of(true, 2, seed=3)
    for c in range(3):  # stratified: each class split as evenly as it can be
        assert abs(int((fold[true == c] == 0).sum()) - int((fold[true == c] == 1).sum())) <= 1
    members = [rng.dirichlet(np.ones(3), size=len(true)) for _ in range(3)]
    out = cross_fitted(members, true, 3, folds=2, seed=3)
    for k in (0, 1):
        fit = fold != k
        weights = class_weights([confusion(true[fit], p[fit].argmax(1), 3) for p in members])
        assert out[fold == k] == pytest.approx(combine([p[fold == k] for p in members], "class_weighted", weights))
    everything = class_weights([confusion(true, p.argmax(1), 3) for p in members])
    assert not np.allclose(out, combine(members, "class_weighted", everything))  # not fitted on what it scores


def test_repo_settings_have_the_cars_ensemble_and_its_app():
    import nbformat

    from toolkit.ui.apps import app_notebook

    cars = load_settings(REPO / "settings.ini").get("cars")
    assert cars.classes == ["sedan", "coupe", "SUV", "truck"] and len(cars.queries) >= 2
    assert cars.ensemble == [{"size": 75}, {"size": 100}] and cars.ensemble_mode == "auto"
    committed = nbformat.read(REPO / "apps" / "cars.ipynb", as_version=4)
    assert committed.cells[0].source == app_notebook("cars").cells[0].source


# ------------------------------------------------------------------ a real two-size ensemble on car photos


@pytest.fixture(scope="module")
def cars_project(tmp_path_factory, cars):
    """scrape/cars/ with 35 real photos per class and held_out/ with the other 15; the ensemble
    (64 and 80 px) trained through the CLI."""
    root = tmp_path_factory.mktemp("cars")
    copy_subset(cars, root / "scrape" / "cars", CARS, 35)
    for name in CARS:
        (root / "held_out" / name).mkdir(parents=True)
        taken = {f.name for f in (root / "scrape" / "cars" / name).iterdir()}
        for file in sorted((cars / name).iterdir()):
            if file.name not in taken:
                shutil.copy2(file, root / "held_out" / name / file.name)
    (root / "settings.ini").write_text(CARS_SETTINGS)
    result = run_cli("train", "cars", "--json", "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["members"]) == {"size64", "size80"} and set(summary["modes"]) == {"mean", "class_weighted"}
    assert summary["combination"]["used"] is False and "member size80" in summary["combination"]["candidates"]
    return root


def test_each_member_trains_like_a_classifier_on_one_split(cars_project):
    from toolkit.tasks.ensemble import class_weights

    out = cars_project / "models" / "cars"
    fingerprints = set()
    for name, size in (("size64", 64), ("size80", 80)):
        member = out / "members" / name
        for artifact in ("model.safetensors", "model.json", "metrics.json", "confusion_matrix.png", "losses.png"):
            assert (member / artifact).is_file(), (name, artifact)
        meta = json.loads((member / "model.json").read_text())
        assert meta["size"] == size and meta["classes"] == CARS
        fingerprints.add(meta["data"]["fingerprint"])
    assert len(fingerprints) == 1  # the same train/valid split for every member
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "single" and meta["ensemble"]["mode"] == "class_weighted"
    assert [m["name"] for m in meta["ensemble"]["members"]] == ["size64", "size80"]
    assert not (out / "model.safetensors").exists() and (out / "confusion_matrix.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == metrics["n_valid"] == 14 and "cross-fitted" in metrics["class_weighted_scoring"]
    expected = class_weights([np.array(metrics["members"][n]["confusion"]) for n in ("size64", "size80")])
    saved = np.array([[meta["ensemble"]["weights"][n][c] for c in CARS] for n in ("size64", "size80")])
    assert saved == pytest.approx(expected, abs=1e-5)
    assert saved.sum(axis=0) == pytest.approx([1, 1], abs=1e-5)


def test_evaluate_reports_every_member_and_the_ensemble_per_class(cars_project):
    from toolkit.predict import ImagePredictor as Predictor
    from toolkit.tasks import load_predictor
    from toolkit.tasks.ensemble import EnsemblePredictor, combine

    held_out = cars_project / "held_out"
    result = run_cli("evaluate", "cars", "--data", held_out, "--json", "--quiet", cwd=cars_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 30 and metrics["ensemble_mode"] == "class_weighted"
    assert set(metrics["members"]) == {"size64", "size80"}
    for m in [metrics, *metrics["members"].values()]:
        assert set(m["per_class"]) == set(CARS) and m["n"] == 30 and 0 <= m["accuracy"] <= 1
    # the same figures, recomputed here from each member's own predictions and the saved weights
    ensemble = load_predictor(cars_project / "models" / "cars", device="cpu")
    assert isinstance(ensemble, EnsemblePredictor)
    files = sorted(held_out.glob("*/*"))
    labels = [f.parent.name for f in files]
    probs = []
    for name in ("size64", "size80"):
        member = Predictor(cars_project / "models" / "cars" / "members" / name, device="cpu")
        probs.append(member.predict_files(files, progress=False))
        correct = np.mean([CARS[i] == y for i, y in zip(probs[-1].argmax(1), labels)])
        assert metrics["members"][name]["accuracy"] == pytest.approx(correct, abs=1e-4)
    combined = combine(probs, "class_weighted", ensemble.weights)
    assert metrics["accuracy"] == pytest.approx(np.mean([CARS[i] == y for i, y in zip(combined.argmax(1), labels)]),
                                                abs=1e-4)
    text = run_cli("evaluate", "cars", "--data", held_out, "--quiet", cwd=cars_project).stdout
    assert "recall per class, each member and the ensemble" in text and "ensemble (class_weighted)" in text
    assert "size64" in text and "size80" in text


def test_mean_mode_and_predict_through_load_predictor(cars_project, tmp_path):
    from toolkit.tasks import load_predictor

    photo = sorted((cars_project / "held_out" / "SUV").iterdir())[0]
    result = run_cli("predict", "cars", photo, "--json", cwd=cars_project)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert set(row["probs"]) == set(CARS) and sum(row["probs"].values()) == pytest.approx(1, abs=1e-3)
    ensemble = load_predictor(cars_project / "models" / "cars", device="cpu")
    assert row["probs"]["SUV"] == pytest.approx(ensemble.predict(photo).probs["SUV"], abs=1e-4)
    img = Image.open(photo).convert("RGB")
    members = ensemble.predict_members([img])
    ensemble.mode = "mean"
    assert ensemble.predict(img).probs["SUV"] == pytest.approx((members["size64"][0][0] + members["size80"][0][0]) / 2,
                                                               abs=1e-5)


def test_gradcam_per_member_differs_between_classes(cars_project):
    from toolkit.stages.explain import explain, gradcams
    from toolkit.tasks import load_predictor

    ensemble = load_predictor(cars_project / "models" / "cars", device="cpu")
    img = Image.open(sorted((cars_project / "held_out" / "Sedan").iterdir())[0]).convert("RGB").resize((120, 90))
    suv, sedan = gradcams(ensemble, img, "SUV"), gradcams(ensemble, img, "Sedan")
    assert list(suv) == ["size64", "size80"]
    for name in suv:
        for heat in (suv[name], sedan[name]):
            assert heat.shape == (90, 120) and heat.min() >= 0 and heat.max() <= 1
        assert np.abs(suv[name] - sedan[name]).mean() > 1e-3, name
    strip = explain(ensemble, img)
    assert strip.size == (2 * 120 + 4, 90)  # the members side by side


def test_explain_cli_writes_a_png_and_bad_input_is_one_line(cars_project, tmp_path):
    photo = sorted((cars_project / "held_out" / "SUV").iterdir())[0]
    out = tmp_path / "why.png"
    result = run_cli("explain", "cars", photo, "--target", "Sedan", "--out", out, cwd=cars_project)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # the image and one overlay per member
    default = run_cli("explain", "cars", photo, cwd=cars_project)
    assert default.returncode == 0
    assert (cars_project / "models" / "cars" / "explanations" / f"{photo.stem}.png").is_file()
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    cases = [((text,), f"error: {text}: not an image (unknown format)"),
             ((photo, "--target", "truck"), "error: --target 'truck' is not a class of this model (SUV, Sedan)"),
             ((photo, "--out", tmp_path / "why.jpg"), "give a .png file name")]
    for args, expected in cases:
        bad = run_cli("explain", "cars", *args, cwd=cars_project)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and expected in bad.stderr, bad.stderr


def test_dashboard_and_cars_app_serve_the_ensemble(cars_project, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from test_dashboard import upload_item

    from toolkit.ui.apps import write_apps
    from toolkit.ui.dashboard import ClassifierDashboard

    board = ClassifierDashboard("cars", cars_project / "settings.ini")
    assert "2 members, class_weighted" in board.card.value and "member size80" in board.card.value
    data = (sorted((cars_project / "held_out" / "SUV").iterdir())[0]).read_bytes()
    board.upload.value = (upload_item("car.jpg", data),)
    assert len(board.results) == 1 and set(board.results[0].probs) == set(CARS)
    board.cam_toggle.value = True
    assert "toolkit-error" not in board.status.value, board.status.value
    with Image.open(io.BytesIO(board.results[0].cam.value)) as cam, Image.open(io.BytesIO(data)) as original:
        aspect = original.width / original.height
        assert cam.width / cam.height == pytest.approx(2 * aspect, rel=0.05)  # both members side by side

    code = ("import sys; from toolkit.ui.dashboard import dashboard; d = dashboard('cars'); "
            "print(type(d.predictor).__name__, 'fastai' in sys.modules)")
    kernel = subprocess.run([sys.executable, "-c", code], cwd=cars_project, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert kernel.stdout.split() == ["EnsemblePredictor", "False"], kernel.stderr  # no fastai in a dashboard

    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.delenv("TOOLKIT_SETTINGS", raising=False)
    path = next(p for p in write_apps(cars_project / "settings.ini") if p.name == "cars.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs


# ------------------------------------------------------------------ two backbones on clothing photos


def test_two_backbones_at_two_sizes_on_clothing(tmp_path, clothing_small):
    """efficientnet_lite0 (pretrained, 1+1 epochs) at 64 px + resnet18 (from scratch, 1 epoch) at 72 px,
    on a train/ + validation/ folder split."""
    from toolkit.stages.explain import gradcams
    from toolkit.stages.train import train as train_ensemble  # the section has an ensemble key
    from toolkit.tasks import load_predictor

    classes = ["pants", "shoes", "t-shirt"]
    copy_subset(clothing_small / "train", tmp_path / "data" / "train", classes, 20)
    copy_subset(clothing_small / "validation", tmp_path / "data" / "validation", classes, 8)
    (tmp_path / "settings.ini").write_text(
        f"[clothes]\ndata = {tmp_path / 'data'}\nensemble = size=64 | size=72 arch=resnet18 pretrained=no "
        "freeze_epochs=0\nensemble_mode = auto\nepochs = 1\nfreeze_epochs = 1\nbs = 16\nlr = 5e-3\n"
        "lr_find_iters = 20\n")
    spec = load_settings(tmp_path / "settings.ini").get("clothes")
    metrics = train_ensemble(spec, progress=False, log=lambda line: None)
    assert list(metrics["members"]) == ["size64", "size72-resnet18-pretrainedno-freeze_epochs0"]
    assert metrics["n"] == 24
    best = max(m["accuracy"] for m in metrics["members"].values())
    assert metrics["accuracy"] >= best and metrics["combination"]["used"]  # auto never loses to a member
    assert metrics["combination"]["choice"] in {"mean", "weighted", "class_weighted", *(
        f"member {n}" for n in metrics["members"])} and "out of fold" in metrics["combination"]["reason"]
    ensemble = load_predictor(tmp_path / "models" / "clothes", device="cpu")
    assert [m.meta["arch"] for m in ensemble.members.values()] == ["efficientnet_lite0", "resnet18"]
    img = Image.open(sorted((tmp_path / "data" / "validation" / "shoes").iterdir())[0])
    heats = gradcams(ensemble, img, "shoes")
    assert all(h.shape == (img.height, img.width) for h in heats.values())


def _probs(true: np.ndarray, right: np.ndarray, confidence: float, n_classes: int, rng) -> np.ndarray:
    """Probabilities that put `confidence` on the true class where `right`, else on another class."""
    out = rng.uniform(0, 0.1, (len(true), n_classes))
    top = np.where(right, true, (true + 1 + rng.integers(0, n_classes - 1, len(true))) % n_classes)
    out[np.arange(len(true)), top] = confidence
    return out / out.sum(axis=1, keepdims=True)


def test_auto_picks_the_member_that_is_better_everywhere():
    from toolkit.tasks.ensemble import choose_combination

    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(4), 50)
    strong = _probs(true, rng.random(200) < 0.95, 0.9, 4, rng)  # right on 95%, confident
    weak, rows = strong.copy(), np.arange(200)
    weak[rows, true] *= 0.4  # below strong on the true class of every image, the rest on a wrong class
    weak[rows, (true + 1 + rng.integers(0, 3, 200)) % 4] += 0.6 * strong[rows, true]
    assert (weak[np.arange(200), true] < strong[np.arange(200), true]).all()
    chosen = choose_combination([weak, strong], true, ["weak", "strong"])
    assert chosen["choice"] == "member strong" and "no combination beat" in chosen["reason"]
    assert chosen["weights"] == pytest.approx(np.array([[0.0] * 4, [1.0] * 4]))
    assert (chosen["probs"].argmax(1) == true).mean() == chosen["candidates"]["member strong"]["accuracy"]
    assert set(chosen["candidates"]) == {"member weak", "member strong", "mean", "weighted", "class_weighted"}


def test_auto_combines_complementary_members_and_never_reports_below_the_best():
    from toolkit.tasks.ensemble import choose_combination, member_weights

    rng = np.random.default_rng(1)
    true = np.repeat(np.arange(3), 60)
    half = np.arange(180) % 2 == 0
    a = _probs(true, half | (rng.random(180) < 0.5), 0.9, 3, rng)  # sure and right on even images
    b = _probs(true, ~half | (rng.random(180) < 0.5), 0.9, 3, rng)
    a[~half] = 0.5 * a[~half] + 0.5 / 3  # unsure where it is often wrong
    b[half] = 0.5 * b[half] + 0.5 / 3
    chosen = choose_combination([a, b], true, ["a", "b"])
    best_member = max(chosen["candidates"][f"member {n}"]["accuracy"] for n in "ab")
    assert chosen["choice"] in ("mean", "weighted", "class_weighted")
    assert chosen["candidates"][chosen["choice"]]["accuracy"] > best_member
    w = member_weights([a, a * 0 + 1 / 3], true)  # a uniform member gets (almost) no weight
    assert w.sum() == pytest.approx(1) and w[0] > 0.9
