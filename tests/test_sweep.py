"""`toolkit sweep`: grid validation, a real 2x1 sweep through the CLI (CSV, table, plot,
TensorBoard scalars and hparams), and `--best` writing the winner into settings.ini."""

import csv

import pytest
from conftest import copy_subset, run_cli

from toolkit.core.errors import ToolkitError
from toolkit.settings import load_settings
from toolkit.stages.sweep import combinations, combo_name, parse_grid

SETTINGS = ("# sweep test project\n[DEFAULT]\nseed = 1\n\n[s]\n# tuned by hand, then by a sweep\ndata = data\n"
            "size = 64\nepochs = 1\nfreeze_epochs = 1\nbs = 16\nlr_find_iters = 20\n\n[other]\nsize = 96\n")


def test_parse_grid_values_go_through_the_settings_parsers():
    grid = parse_grid("lr=1e-3,auto size=64,96 arch=resnet18")
    assert grid["lr"] == [("1e-3", 1e-3), ("auto", None)] and grid["size"] == [("64", 64), ("96", 96)]
    names = [combo_name(c) for c in combinations(grid)]
    assert len(names) == 4 and names[0] == "lr=1e-3_size=64_arch=resnet18"
    for bad, expected in [("size=big", "--grid size=big: invalid literal"), ("lr=20", "--grid lr=20: must be"),
                          ("colour=red", "'colour' is not a settings key"),
                          ("split=random", "'split' is a settings key a sweep can vary; use:"),
                          ("lr", "write KEY=VALUE"), ("size=64 size=96", "given twice"), ("", "--grid is empty")]:
        with pytest.raises(ToolkitError, match=None) as info:
            parse_grid(bad)
        assert expected in str(info.value), (bad, str(info.value))


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "settings.ini").write_text(SETTINGS)
    for args, expected in [(("--grid", "arch=alexnet"), "--grid arch=alexnet: unknown backbone 'alexnet'"),
                           ((), "sweep needs --grid"), (("--best",), "no sweep results in"),
                           (("--grid", "size=0"), "--grid size=0: must be a positive whole number")]:
        result = run_cli("sweep", "s", *args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0], lines[0]
    assert not (tmp_path / "models").exists()  # nothing trained before the grid was checked


def test_sweep_2x1_end_to_end_and_best(tmp_path, clothing_small):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copy_subset(clothing_small / "train", tmp_path / "data" / "train", ["pants", "shoes"], 16)
    copy_subset(clothing_small / "validation", tmp_path / "data" / "validation", ["pants", "shoes"], 6)
    (tmp_path / "settings.ini").write_text(SETTINGS)
    result = run_cli("sweep", "s", "--grid", "lr=1e-3,5e-3 size=64", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "models" / "s" / "sweep"
    with open(folder / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["combo"] for r in rows] == ["lr=1e-3_size=64", "lr=5e-3_size=64"]
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["lr_used"]) == float(row["lr"])
        assert row["params"] == f"lr={row['lr']} size=64"
        run = folder / row["combo"]
        assert (run / "model.json").is_file() and (run / "metrics.json").is_file()
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert {"train_loss", "accuracy", "hparam/accuracy"} <= set(scalars), scalars
        assert events.Scalars("hparam/accuracy")[0].value == pytest.approx(float(row["accuracy"]), abs=1e-4)
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    table = (folder / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| rank | lr | size | accuracy") and len(table) == 4
    assert (folder / "sweep.png").stat().st_size > 1000
    assert not (tmp_path / "models" / "s" / "model.json").exists()  # runs live in sweep/, not the model folder

    winner = max(rows, key=lambda r: float(r["accuracy"]))  # the first of a tie, as the sweep ranks
    best = run_cli("sweep", "s", "--best", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    assert f"lr = {winner['lr']}" in best.stdout
    text = (tmp_path / "settings.ini").read_text()
    assert "# sweep test project" in text and "# tuned by hand, then by a sweep" in text
    settings = load_settings(tmp_path / "settings.ini")
    assert settings.get("s").lr == float(winner["lr"]) and settings.get("s").size == 64
    assert settings.get("other").lr is None and settings.get("other").size == 96
