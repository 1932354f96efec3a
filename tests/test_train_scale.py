"""Training past one process: the head-only retrain on body features cached on disk, and
data-parallel training in 2 processes (Accelerate, gloo on CPU), on real photos."""

import json
import shutil

import pytest
from conftest import TINY_CLASSES, run_cli

from toolkit.predict import ImagePredictor
from toolkit.settings import load_settings


@pytest.fixture
def project_copy(trained_project, tmp_path):
    """A copy of the trained tiny project (settings, data, model), so retraining leaves the original."""
    root = tmp_path / "project"
    shutil.copytree(trained_project / "scrape", root / "scrape")
    shutil.copytree(trained_project / "models" / "tiny", root / "models" / "tiny")
    shutil.copy(trained_project / "settings.ini", root / "settings.ini")
    return root


def test_head_only_retrain_reuses_cached_features_and_keeps_the_previous_accuracy(project_copy, clothing_small):
    from toolkit.stages.train import retrain_head

    folder = project_copy / "models" / "tiny"
    full = json.loads((folder / "metrics.json").read_text())
    first = run_cli("train", "tiny", "--head-only", "--json", "--quiet", cwd=project_copy)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["features_computed"] == 120 and result["features_reused"] == 0
    assert result["previous_accuracy"] == full["accuracy"] and result["accuracy"] >= full["accuracy"] - 0.15
    cache = next((folder / "features").iterdir())
    assert {p.suffix for p in cache.iterdir()} == {".npy", ".json"} and not (folder / "export.pkl").exists()

    spec = load_settings(project_copy / "settings.ini").get("tiny")
    second = retrain_head(spec, progress=False, log=lambda line: None)
    assert second["features_computed"] == 0 and second["features_reused"] == 120  # no body forward at all
    written = json.loads((folder / "metrics.json").read_text())
    assert written["head_only"] and written["previous_accuracy"] == result["accuracy"]
    assert written["accuracy"] == second["accuracy"] and 0 <= written["accuracy"] <= 1
    meta = json.loads((folder / "model.json").read_text())
    assert meta["head_only"]["previous_accuracy"] == result["accuracy"] and meta["classes"] == TINY_CLASSES

    # a cleaning pass: 2 images deleted, 1 new one: only the new one runs through the body
    data = project_copy / "cleaned"
    shutil.copytree(project_copy / "scrape" / "tiny", data)
    for gone in sorted((data / "pants").iterdir())[:2]:
        gone.unlink()
    new = next(f for f in sorted((clothing_small / "train" / "pants").iterdir())
               if not (project_copy / "scrape" / "tiny" / "pants" / f.name).exists())
    shutil.copy(new, data / "pants" / new.name)
    third = retrain_head(spec, data, progress=False, log=lambda line: None)
    assert third["features_computed"] == 1 and third["features_reused"] == 118
    assert third["n_train"] + third["n_valid"] == 119
    prediction = ImagePredictor(folder).predict(new)
    assert prediction.label in TINY_CLASSES


def test_head_only_is_refused_in_one_line_where_it_cannot_run(tmp_path):
    from toolkit.core.errors import ToolkitError
    from toolkit.stages.train import retrain_head

    settings = load_settings(_write(tmp_path, "[p]\ntask = pairs\n[s]\n"))
    for name, expected in (("p", "task = pairs does not support toolkit train --head-only"),
                           ("s", "no trained model in")):
        with pytest.raises(ToolkitError) as error:
            retrain_head(settings.get(name), progress=False, log=lambda line: None, out=tmp_path / name)
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_two_processes_train_as_well_as_one_and_rank_zero_alone_writes(project_copy, trained_project):
    one = json.loads((trained_project / "models" / "tiny" / "metrics.json").read_text())
    folder = project_copy / "models" / "tiny"
    shutil.rmtree(folder)
    result = run_cli("train", "tiny", "--processes", "2", "--json", "--quiet", cwd=project_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)  # one JSON document: rank 1 prints nothing
    metrics = json.loads((folder / "metrics.json").read_text())
    assert printed["world_size"] == 2 and metrics["world_size"] == 2
    assert metrics["bs_per_process"] == 16 and metrics["global_bs"] == 32
    assert abs(metrics["accuracy"] - one["accuracy"]) <= 0.125, (metrics["accuracy"], one["accuracy"])  # 3 of 24
    history = [row for row in (folder / "history.csv").read_text().splitlines() if not row.startswith("epoch")]
    ones = [row for row in (trained_project / "models" / "tiny" / "history.csv").read_text().splitlines()
            if not row.startswith("epoch")]
    # the CSV log written once (rank 0), not once per process; the top phase runs in one process only
    assert metrics["top_epochs_run"] == 0 and "skipped under --processes" in result.stderr
    assert len(history) == len(ones) - one["top_epochs_run"] == metrics["freeze_epochs"] + metrics["epochs_run"]
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [] and not (folder / "best.pth").exists()
    assert ImagePredictor(folder).classes == TINY_CLASSES


def test_distributed_and_head_only_are_refused_in_one_line_where_unsupported(tmp_path):
    _write(tmp_path, "[p]\ntask = pairs\n")
    for flag, expected in (("--processes", "task = pairs does not support toolkit train --processes N"),):
        result = run_cli("train", "p", flag, "2", cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    result = run_cli("train", "p", "--head-only", "--processes", "2", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "error: " in result.stderr


def _write(tmp_path, text):
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path


def test_the_cleaning_apps_retrain_button_retrains_on_the_applied_decisions(project_copy):
    """Delete two images in the cleaning app, apply, press "retrain head": the new model learned from
    the cleaned data (118 images) and the status line shows its accuracy beside the old one."""
    from toolkit.ui.clean_app import CleanerWidget

    spec = load_settings(project_copy / "settings.ini").get("tiny")
    app = CleanerWidget(spec, size=64, background=False)
    assert app.error.value == "", app.error.value
    for row in app.rankings.label_issues[:2]:
        app.decide(row["file"], "delete")
    assert app.apply()["deleted"] == 2
    app.retrain_button.click()  # a person's click: the retrain runs in a background thread
    import time

    deadline = time.time() + 300
    while "retrained" not in app.status.value and not app.error.value and time.time() < deadline:
        time.sleep(0.5)
    assert app.error.value == "" and "retrained" in app.status.value and "(was " in app.status.value
    metrics = json.loads((project_copy / "models" / "tiny" / "metrics.json").read_text())
    assert metrics["head_only"] and metrics["n_train"] + metrics["n_valid"] == 118
    assert not app.retrain_button.disabled
