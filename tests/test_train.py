"""A real fine-tune of pretrained EfficientNet-Lite0 on real photos, its exports, evaluate and predict."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CLASSES, copy_subset, run_cli

from toolkit.data import list_labelled_images, load_dataset
from toolkit.predict import ImagePredictor as Predictor
from toolkit.settings import load_settings


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, clothing_small):
    """Validation photos of the tiny classes: images the model never trained on."""
    return copy_subset(clothing_small / "validation", tmp_path_factory.mktemp("held_out"), TINY_CLASSES, 15)


def test_training_writes_every_artifact(trained_project):
    out = trained_project / "models" / "tiny"
    for name in ("model.safetensors", "model.json", "export.pkl", "metrics.json", "history.csv",
                 "lr_find.png", "losses.png", "confusion_matrix.png", "top_losses.png", "bad_images.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == TINY_CLASSES and meta["arch"] == "efficientnet_lite0" and meta["size"] == 96
    assert meta["mean"] == pytest.approx([127 / 255] * 3) and len(meta["data"]["fingerprint"]) == 64
    assert {"torch", "fastai", "toolkit"} <= set(meta["versions"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_valid"] == 120 and metrics["lr"] > 0
    assert metrics["train_images_per_second"] > 0 and "valley" in metrics["lr_find"]
    assert not (out / "best.pth").exists()
    # 2 frozen epochs (the head on cached body features) + 5 top-phase (the default top_epochs) + 1 unfrozen
    assert metrics["top_epochs_run"] == metrics["top_epochs"] == 5
    assert len(metrics["history"]) == 8 and metrics["accuracy"] >= max(v[2] for v in metrics["history"]) - 1e-4


def test_no_frozen_phase_trains_unfrozen_straight_away(tiny_project, tmp_path):
    from toolkit.stages.train import train

    spec = load_settings(tiny_project / "settings.ini").get("tiny").with_overrides(freeze_epochs=0, size=64)
    metrics = train(spec, progress=False, log=lambda line: None, out=tmp_path / "model")
    assert len(metrics["history"]) == 1 and (tmp_path / "model" / "model.json").is_file()
    assert not (tmp_path / "model" / "best.pth").exists()


def test_top_phase_trains_the_top_stages_on_cached_stem_maps(tiny_project, tmp_path):
    """top_epochs: after the cached head, the body's top stages (the registry's top_start) and the head train on
    the stem's cached maps; the stem keeps its ImageNet weights, the epochs are in the history, the model kept is
    the best epoch across the phases, and the memory-mapped maps are removed after the fit."""
    import os
    import subprocess

    import torch

    from toolkit.core.backbones import create_model, split_body
    from toolkit.stages.train import train

    spec = load_settings(tiny_project / "settings.ini").get("tiny").with_overrides(
        size=64, epochs=0, freeze_epochs=1, top_epochs=2, lr=1e-2)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a finished process: the maps a killed run of it left are removed, a live run's are not
    (tmp_path / "top" / f"stem-maps-{gone.pid}-x").mkdir(parents=True)
    (tmp_path / "top" / f"stem-maps-{os.getppid()}-x").mkdir()
    lines = []
    metrics = train(spec, progress=False, log=lines.append, out=tmp_path / "top")
    assert metrics["top_epochs_run"] == 2 and len(metrics["history"]) == 1 + 2
    assert any(line.startswith("top phase: 2 epoch(s)") for line in lines)
    assert metrics["accuracy"] == pytest.approx(max(v[2] for v in metrics["history"]), abs=1e-4)
    assert [p.name for p in (tmp_path / "top").glob("stem-maps-*")] == [f"stem-maps-{os.getppid()}-x"]
    assert not (tmp_path / "top" / "best_top.pth").exists()
    trained = Predictor(tmp_path / "top", device="cpu").model[0]
    pretrained = create_model("efficientnet_lite0", 3, taps=("2.4", "2.5"))[0]
    (stem, top), (stem0, top0) = split_body(trained, "2.5"), split_body(pretrained, "2.5")
    assert all(torch.equal(a, b) for a, b in zip(stem.state_dict().values(), stem0.state_dict().values()))
    moved = [not torch.equal(a, b) for a, b in zip(top.state_dict().values(), top0.state_dict().values())]
    best_is_top = metrics["accuracy"] > metrics["history"][0][2] + 1e-6
    assert any(moved) == best_is_top  # the top stages moved only if a top epoch was the best kept


def test_head_reads_inner_stages_by_default_and_final_features_on_request(trained_project, tiny_project, tmp_path,
                                                                          held_out):
    """The default head (head_features = multi_stage) reads the body's final features and its inner stages;
    model.json names the taps and the fastai-free predictor rebuilds that network. head_features = final
    gives the earlier layout (no taps), which still trains, exports and serves."""
    from toolkit.core.backbones import MultiPool, TapBody, get_backbone
    from toolkit.stages.train import train

    default = Predictor(trained_project / "models" / "tiny", device="cpu")
    assert default.meta["taps"] == list(get_backbone("efficientnet_lite0").embedding_taps) == ["2.4", "2.5"]
    assert isinstance(default.model[0], TapBody) and isinstance(default.model[1][0], MultiPool)
    assert default.model[1][2].num_features == 2 * 1280 + 112 + 192
    spec = load_settings(tiny_project / "settings.ini").get("tiny").with_overrides(
        head_features="final", size=64, epochs=0, freeze_epochs=2)
    metrics = train(spec, progress=False, log=lambda line: None, out=tmp_path / "final")
    final = Predictor(tmp_path / "final", device="cpu")
    assert final.meta["taps"] == [] and not isinstance(final.model[0], TapBody)
    assert final.model[1][2].num_features == 2 * 1280
    files, _ = list_labelled_images(held_out)
    probs = final.predict_files(files[:6])
    assert metrics["accuracy"] > 1 / 3 and probs.shape == (6, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_fine_tuned_model_beats_chance_on_unseen_photos(trained_project, held_out):
    result = run_cli("evaluate", "tiny", "--data", held_out, "--json", "--quiet", cwd=trained_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 45 and set(metrics["per_class"]) == set(TINY_CLASSES)
    assert metrics["accuracy"] >= 0.7, metrics  # chance is 1/3
    assert (trained_project / "models" / "tiny" / "evaluation" / "confusion_matrix.png").is_file()


def test_pickle_free_export_predicts_like_the_learner(trained_project, held_out):
    from fastai.learner import load_learner

    files, _ = list_labelled_images(held_out)
    learn = load_learner(trained_project / "models" / "tiny" / "export.pkl")
    learner_probs, _ = learn.get_preds(dl=learn.dls.test_dl(files, num_workers=0))
    predictor = Predictor(trained_project / "models" / "tiny")
    ours = np.stack([list(predictor.predict(f).probs.values()) for f in files])
    assert list(learn.dls.vocab) == predictor.classes
    assert np.abs(ours - learner_probs.numpy()).max() < 1e-4


def test_predict_cli_json_and_bad_files(trained_project, held_out, tmp_path):
    good = sorted((held_out / "shoes").iterdir())[0]
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    result = run_cli("predict", "tiny", good, text, "--json", cwd=trained_project)
    assert result.returncode == 1
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [str(good)]
    assert set(rows[0]["probs"]) == set(TINY_CLASSES) and sum(rows[0]["probs"].values()) == pytest.approx(1, abs=1e-3)
    assert result.stderr.strip() == f"error: {text}: not an image (unknown format)"


def test_cli_errors_are_one_line(trained_project, tmp_path):
    cases = [
        (("train", "ghost"), "has no classifier [ghost]"),
        (("evaluate", "tiny"), "evaluate needs --data DIR"),
        (("evaluate", "tiny", "--data", tmp_path / "nowhere"), "not found"),
        (("predict", "tiny", tmp_path / "missing.jpg"), "file not found"),
        (("train", "tiny", "--data", tmp_path), "has no class folders"),
        (("train", "tiny", "--arch", "alexnet"), "unknown backbone 'alexnet'"),
    ]
    for args, expected in cases:
        result = run_cli(*args, cwd=trained_project)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("error: "), (args, result.stderr)
    empty = tmp_path / "project"
    empty.mkdir()
    (empty / "settings.ini").write_text("[fresh]\n")
    result = run_cli("evaluate", "fresh", "--data", tmp_path, cwd=empty)
    assert "no trained model" in result.stderr and "toolkit train fresh" in result.stderr


def test_bad_files_are_reported_and_left_out_never_touched(tmp_path, clothing_small):
    root = copy_subset(clothing_small / "train", tmp_path / "data", ["hat", "skirt"], 6)
    (root / "hat" / "broken.jpg").write_bytes(b"")
    (root / "skirt" / "page.jpg").write_text("<html>")
    shutil.copy(sorted((root / "hat").glob("*.jpg"))[1], root / "skirt" / "copy.jpg")
    spec = load_settings(_write(tmp_path, "[d]\nsplit = random:0.5\n")).get("d")
    dataset = load_dataset(spec, root, progress=False)
    assert sorted(b.path.name for b in dataset.bad) == ["broken.jpg", "page.jpg"]
    assert len(dataset.files) == 13 and (root / "hat" / "broken.jpg").exists()
    assert dataset.n_valid > 0 and dataset.n_train > 0


def test_split_rules(tmp_path, shoe_pairs):
    spec = load_settings(_write(tmp_path, "[s]\nsplit = group:^(u\\d+)_\nvalid_pct = 0.25\n")).get("s")
    root = tmp_path / "pairs"
    for side in ("left", "right"):
        (root / side).mkdir(parents=True)
        for f in sorted((shoe_pairs / "train").glob(f"u0[0-2]*_{side}_*.jpg")):
            (root / side / f.name).symlink_to(f)
    dataset = load_dataset(spec, root, progress=False)
    person = {f: f.name.split("_")[0] for f in dataset.files}
    valid_people = {person[f] for f, v in zip(dataset.files, dataset.is_valid) if v}
    train_people = {person[f] for f, v in zip(dataset.files, dataset.is_valid) if not v}
    assert valid_people and train_people and not (valid_people & train_people)


def test_folder_split_and_leak_warning(tmp_path, clothing_small):
    root = tmp_path / "ds"
    copy_subset(clothing_small / "train", root / "train", ["hat", "skirt"], 5)
    copy_subset(clothing_small / "validation", root / "validation", ["hat", "skirt"], 3)
    leaked = sorted((root / "train" / "hat").iterdir())[0]
    shutil.copy(leaked, root / "validation" / "hat" / "leak.jpg")
    spec = load_settings(_write(tmp_path, "[d]\n")).get("d")
    dataset = load_dataset(spec, root, progress=False)
    assert dataset.n_train == 10 and dataset.n_valid == 7
    assert len(dataset.warnings) == 1 and "1 identical file(s) are in both train and valid" in dataset.warnings[0]


def _write(tmp_path, text):
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path
