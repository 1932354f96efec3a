"""Ensembles (two backbones at two sizes, every combining mode) trained for real, once, on real car
photos, evaluated per member, explained with Grad-CAM from Python, the CLI and the dashboard; the
auto mode's choice recomputed from the members' own validation predictions."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import REPO, cli_env, run_cli
from PIL import Image

from toolkit.core.errors import SettingsError
from toolkit.settings import load_settings

CARS = ["SUV", "Sedan"]
# one small real ensemble for every trained test here: EfficientNet-Lite0 (ImageNet, 1 cached frozen + 1 unfrozen
# epoch) at 48 px and a ResNet-18 from scratch (1 epoch) at 40 px; ensemble_mode left at its default, auto
MEMBERS = ["size48", "size40-resnet18-pretrainedno-freeze_epochs0"]
CARS_SETTINGS = ("[cars]\ntitle = Cars\ndata = {data}\nensemble = size=48 | size=40 arch=resnet18 pretrained=no "
                 "freeze_epochs=0\nepochs = 1\nfreeze_epochs = 1\nbs = 16\nlr = 5e-3\nlr_find_iters = 10\n")


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


# ------------------------------------------------------------------ one real two-backbone ensemble on car photos


@pytest.fixture(scope="module")
def cars_project(tmp_path_factory, cars):
    """data/train/ (25 real photos per class) + data/validation/ (10 per class) and held_out/ with the
    other 15; the ensemble trained once through the CLI."""
    root = tmp_path_factory.mktemp("cars")
    for name in CARS:
        files = sorted((cars / name).iterdir())
        for folder, chosen in (("data/train", files[:25]), ("data/validation", files[25:35]),
                               ("held_out", files[35:])):
            (root / folder / name).mkdir(parents=True)
            for file in chosen:
                shutil.copy2(file, root / folder / name / file.name)
    (root / "settings.ini").write_text(CARS_SETTINGS.format(data=root / "data"))
    result = run_cli("train", "cars", "--json", "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["members"]) == MEMBERS and set(summary["modes"]) == {"mean", "class_weighted"}
    assert summary["ensemble_mode"] == "auto" and summary["combination"]["used"] is True
    return root


def _member_validation_probs(root):
    """Each member's probabilities on the validation split, recomputed here from its exported model."""
    from toolkit.predict import ImagePredictor
    from toolkit.tasks import task_of

    spec = load_settings(root / "settings.ini").get("cars")
    files, labels = task_of(spec).load_data(spec, progress=False).subset(valid=True)
    probs = [ImagePredictor(root / "models" / "cars" / "members" / n, device="cpu").predict_files(files, progress=False)
             for n in MEMBERS]
    return spec, probs, np.array([CARS.index(y) for y in labels])


def test_each_member_trains_like_a_classifier_on_one_split(cars_project):
    out = cars_project / "models" / "cars"
    fingerprints = set()
    for name, size, arch in zip(MEMBERS, (48, 40), ("efficientnet_lite0", "resnet18")):
        member = out / "members" / name
        for artifact in ("model.safetensors", "model.json", "metrics.json", "confusion_matrix.png", "losses.png"):
            assert (member / artifact).is_file(), (name, artifact)
        meta = json.loads((member / "model.json").read_text())
        assert meta["size"] == size and meta["arch"] == arch and meta["classes"] == CARS
        fingerprints.add(meta["data"]["fingerprint"])
    assert len(fingerprints) == 1  # the same train/valid split for every member
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "single" and meta["ensemble"]["mode"] == "auto"
    assert [m["name"] for m in meta["ensemble"]["members"]] == MEMBERS
    assert [m["arch"] for m in meta["ensemble"]["members"]] == ["efficientnet_lite0", "resnet18"]
    assert not (out / "model.safetensors").exists() and (out / "confusion_matrix.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == metrics["n_valid"] == 20 and metrics["n_train"] == 50  # the train/ + validation/ split
    assert "cross-fitted" in metrics["class_weighted_scoring"]
    saved = np.array([[meta["ensemble"]["weights"][n][c] for c in CARS] for n in MEMBERS])
    assert saved.sum(axis=0) == pytest.approx([1, 1], abs=1e-5) and (saved >= 0).all()
    assert saved == pytest.approx(np.array([[metrics["weights"][n][c] for c in CARS] for n in MEMBERS]), abs=1e-5)


def test_auto_choice_is_recomputed_from_the_members_and_never_loses(cars_project):
    """metrics.json's auto choice, its out-of-fold figures and the saved weights agree with
    choose_combination on the members' own validation probabilities, and with every mode's figure."""
    from toolkit.tasks.ensemble import choose_combination, combine, cross_fitted

    spec, probs, true = _member_validation_probs(cars_project)
    out = cars_project / "models" / "cars"
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "model.json").read_text())
    for name, p in zip(MEMBERS, probs):
        assert metrics["members"][name]["accuracy"] == pytest.approx((p.argmax(1) == true).mean(), abs=1e-4)
    chosen = choose_combination(probs, true, MEMBERS, seed=spec.seed)
    combination = metrics["combination"]
    assert combination["choice"] == chosen["choice"] and combination["used"] is True
    assert "out of fold" in combination["reason"] and "5-fold" in combination["scoring"]
    assert set(combination["candidates"]) == {*(f"member {n}" for n in MEMBERS), "mean", "weighted", "class_weighted"}
    for candidate, figures in chosen["candidates"].items():
        assert combination["candidates"][candidate]["accuracy"] == pytest.approx(figures["accuracy"], abs=1e-4)
    saved = np.array([[meta["ensemble"]["weights"][n][c] for c in CARS] for n in MEMBERS])
    assert saved == pytest.approx(chosen["weights"], abs=1e-3)
    assert chosen["choice"] in meta["ensemble"]["weights_from"]
    assert metrics["accuracy"] == pytest.approx((chosen["probs"].argmax(1) == true).mean(), abs=1e-4)
    best = max(m["accuracy"] for m in metrics["members"].values())
    assert metrics["accuracy"] >= best  # auto never loses to its best member
    assert metrics["modes"]["mean"]["accuracy"] == pytest.approx((combine(probs, "mean").argmax(1) == true).mean(),
                                                                 abs=1e-4)
    cross = cross_fitted(probs, true, len(CARS), seed=spec.seed)  # class_weighted, cross-fitted
    assert metrics["modes"]["class_weighted"]["accuracy"] == pytest.approx((cross.argmax(1) == true).mean(), abs=1e-4)


def _in_process(monkeypatch, root) -> None:
    """Run `toolkit.cli.main` in this process as `toolkit` runs in ROOT; what main sets is restored after."""
    from toolkit.cli import base

    monkeypatch.chdir(root)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.setattr(base, "STDOUT", base.STDOUT)


def test_evaluate_reports_every_member_and_the_ensemble_per_class(cars_project, capsys, monkeypatch):
    from toolkit.cli import main
    from toolkit.predict import ImagePredictor as Predictor
    from toolkit.tasks import load_predictor
    from toolkit.tasks.ensemble import EnsemblePredictor, combine

    held_out = cars_project / "held_out"
    result = run_cli("evaluate", "cars", "--data", held_out, "--json", "--quiet", cwd=cars_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 30 and metrics["ensemble_mode"] == "auto"
    assert list(metrics["members"]) == MEMBERS
    for m in [metrics, *metrics["members"].values()]:
        assert set(m["per_class"]) == set(CARS) and m["n"] == 30 and 0 <= m["accuracy"] <= 1
    # the same figures, recomputed here from each member's own predictions and the saved weights
    ensemble = load_predictor(cars_project / "models" / "cars", device="cpu")
    assert isinstance(ensemble, EnsemblePredictor) and ensemble.mode == "auto"
    files = sorted(held_out.glob("*/*"))
    labels = [f.parent.name for f in files]
    probs = []
    for name in MEMBERS:
        member = Predictor(cars_project / "models" / "cars" / "members" / name, device="cpu")
        probs.append(member.predict_files(files, progress=False))
        correct = np.mean([CARS[i] == y for i, y in zip(probs[-1].argmax(1), labels)])
        assert metrics["members"][name]["accuracy"] == pytest.approx(correct, abs=1e-4)
    combined = combine(probs, "auto", ensemble.weights)
    assert metrics["accuracy"] == pytest.approx(np.mean([CARS[i] == y for i, y in zip(combined.argmax(1), labels)]),
                                                abs=1e-4)
    _in_process(monkeypatch, cars_project)  # the text report, from the CLI's own entry point in this process
    capsys.readouterr()
    assert main(["evaluate", "cars", "--data", str(held_out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "recall per class, each member and the ensemble" in text and "ensemble (auto)" in text
    assert all(name in text for name in MEMBERS)


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
    assert ensemble.predict(img).probs["SUV"] == pytest.approx((members[MEMBERS[0]][0][0] + members[MEMBERS[1]][0][0])
                                                               / 2, abs=1e-5)


def test_gradcam_per_member_differs_between_classes(cars_project):
    from toolkit.stages.explain import explain, gradcams
    from toolkit.tasks import load_predictor

    ensemble = load_predictor(cars_project / "models" / "cars", device="cpu")
    img = Image.open(sorted((cars_project / "held_out" / "Sedan").iterdir())[0]).convert("RGB").resize((120, 90))
    suv, sedan = gradcams(ensemble, img, "SUV"), gradcams(ensemble, img, "Sedan")
    assert list(suv) == MEMBERS
    for name in suv:
        for heat in (suv[name], sedan[name]):
            assert heat.shape == (90, 120) and heat.min() >= 0 and heat.max() <= 1
        assert np.abs(suv[name] - sedan[name]).mean() > 1e-3, name
    strip = explain(ensemble, img)
    assert strip.size == (2 * 120 + 4, 90)  # the members side by side
    full = Image.open(sorted((cars_project / "held_out" / "SUV").iterdir())[0])
    assert all(h.shape == (full.height, full.width) for h in gradcams(ensemble, full, "SUV").values())


def test_explain_cli_writes_a_png_and_bad_input_is_one_line(cars_project, tmp_path, capsys, monkeypatch):
    from toolkit.cli import main

    photo = sorted((cars_project / "held_out" / "SUV").iterdir())[0]
    out = tmp_path / "why.png"
    result = run_cli("explain", "cars", photo, "--target", "Sedan", "--out", out, cwd=cars_project)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # the image and one overlay per member
    _in_process(monkeypatch, cars_project)  # the rest from the CLI's entry point here (no interpreter start-up)
    assert main(["explain", "cars", str(photo)]) == 0
    assert (cars_project / "models" / "cars" / "explanations" / f"{photo.stem}.png").is_file()
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    cases = [((text,), f"error: {text}: not an image (unknown format)"),
             ((photo, "--target", "truck"), "error: --target 'truck' is not a class of this model (SUV, Sedan)"),
             ((photo, "--out", tmp_path / "why.jpg"), "give a .png file name")]
    for args, expected in cases:
        capsys.readouterr()
        code = main(["explain", "cars", *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_dashboard_and_cars_app_serve_the_ensemble(cars_project, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell
    from test_dashboard import upload_item

    from toolkit.ui.apps import write_apps
    from toolkit.ui.dashboard import ClassifierDashboard

    board = ClassifierDashboard("cars", cars_project / "settings.ini")
    assert "2 members, auto" in board.card.value and f"member {MEMBERS[1]}" in board.card.value
    reason = json.loads((cars_project / "models" / "cars" / "metrics.json").read_text())["combination"]["reason"]
    assert "ensemble choice" in board.card.value and reason in board.card.value  # what auto chose, and why
    data = (sorted((cars_project / "held_out" / "SUV").iterdir())[0]).read_bytes()
    board.upload.value = (upload_item("car.jpg", data),)
    assert len(board.results) == 1 and set(board.results[0].probs) == set(CARS)
    board.cam_toggle.value = True
    assert "toolkit-error" not in board.status.value, board.status.value
    with Image.open(io.BytesIO(board.results[0].cam.value)) as cam, Image.open(io.BytesIO(data)) as original:
        aspect = original.width / original.height
        assert cam.width / cam.height == pytest.approx(2 * aspect, rel=0.05)  # both members side by side

    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.delenv("TOOLKIT_SETTINGS", raising=False)
    path = next(p for p in write_apps(cars_project / "settings.ini") if p.name == "cars.ipynb")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(new_code_cell("import sys\nprint(type(dashboard('cars').predictor).__name__, "
                                  "'fastai' in sys.modules)"))  # the app's own kernel: no fastai in a dashboard
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    assert nb.cells[-1].outputs[0]["text"].split() == ["EnsemblePredictor", "False"], nb.cells[-1].outputs


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
