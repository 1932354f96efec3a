"""settings.ini -> typed specs; every error is one line naming the section and key."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path


def test_project_settings_parse_with_required_sections():
    settings = load_settings(REPO / "settings.ini")
    assert {"fashion-mnist", "clothing"} <= set(settings.classifiers)
    clothing = settings.get("clothing")
    assert clothing.classes == ["t-shirts", "shirts", "jeans", "socks", "shoes", "polo-shirts"]
    assert clothing.arch == "resnet34"
    assert all("{class}" in q for q in clothing.queries) and len(clothing.queries) >= 2
    assert settings.get("fashion-mnist").arch == "efficientnet_lite0"


def test_minimal_section_gets_defaults_and_paths_resolve_from_the_file(tmp_path):
    settings = load_settings(write(tmp_path, "[DEFAULT]\nsize = 96\n\n[cats]\n"))
    spec = settings.get("cats")
    assert spec.classes == [] and spec.task == "single" and spec.pretrained is True
    assert spec.size == 96 and spec.lr is None and spec.split == "auto"
    assert spec.scrape_dir == tmp_path / "scrape" / "cats"
    assert spec.models_dir == tmp_path / "models" / "cats"
    assert spec.cleaned_dir == tmp_path / "cleaned_data" / "cats"


def test_values_are_typed(tmp_path):
    spec = load_settings(write(tmp_path, "[x]\nlr = 3e-3\nepochs = 2\npretrained = no\n"
                                         "split = group:^(u\\d+)_\ngroup = _([mw])\\.\ndata = sub/dir\n")).get("x")
    assert spec.lr == pytest.approx(3e-3) and spec.epochs == 2 and spec.pretrained is False
    assert spec.split == "group:^(u\\d+)_" and spec.group == "_([mw])\\."
    assert spec.data_dir == (tmp_path / "sub" / "dir").resolve()


@pytest.mark.parametrize("text, expected", [
    ("[x]\ncolour = red\n", "settings [x] has unknown key 'colour'"),
    ("[DEFAULT]\nepoch = 3\n[x]\n", "settings [DEFAULT] has unknown key 'epoch'"),
    ("[x]\nepochs = many\n", "settings [x] epochs = 'many'"),
    ("[x]\nepochs = -1\n", "settings [x] epochs = '-1': must be 0 or more"),
    ("[x]\narch = resnet9000\n", "settings [x] arch = 'resnet9000': unknown backbone 'resnet9000'"),
    ("[x]\npretrained = maybe\n", "settings [x] pretrained = 'maybe': use yes or no"),
    ("[x]\nsplit = halves\n", "settings [x] split = 'halves'"),
    ("[x]\ntask = dance\n", "settings [x] task = 'dance': unknown task"),
    ("[x]\nqueries = photo of cats\n", "settings [x] queries"),
    ("[x]\ngroup = (unclosed\n", "settings [x] group"),
    ("[x]\nlr = -1\n", "settings [x] lr"),
    ("[x]\nbody_bn = sometimes\n", "settings [x] body_bn = 'sometimes': use one of: 'frozen', 'adapt'"),
])
def test_bad_settings_are_one_line_errors_naming_section_and_key(tmp_path, text, expected):
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_unknown_classifier_and_missing_file(tmp_path):
    settings = load_settings(write(tmp_path, "[a]\n"))
    with pytest.raises(SettingsError, match=r"no classifier \[b\]; known: a"):
        settings.get("b")
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.ini")


def test_cli_reports_settings_errors_in_one_line(tmp_path):
    path = write(tmp_path, "[x]\nsize = huge\n")
    result = run_cli("train", "x", "--settings", path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: settings [x] size = 'huge': invalid literal for int() with base 10: 'huge'"
    result = run_cli("train", "nope", "--settings", path.with_name("missing.ini"))
    assert result.returncode == 2 and "settings file" in result.stderr and "Traceback" not in result.stderr


def test_cli_options_are_checked_as_their_settings_keys_and_json_errors_are_one_document(tmp_path):
    path = write(tmp_path, "[x]\n")
    for args, expected in ((("--epochs", "-3"), "--epochs -3: must be 0 or more"),
                           (("--bs", "0"), "--bs 0: must be a positive whole number"),
                           (("--lr", "20"), "--lr 20.0: must be 'auto' or a learning rate"),
                           (("--arch", "nope"), "--arch nope: unknown backbone 'nope'")):
        result = run_cli("train", "x", *args, "--settings", path, "--json")
        assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {expected}"), result.stderr
        assert "\n" not in result.stderr.strip() and "Traceback" not in result.stderr
        document = json.loads(result.stdout)  # exactly one JSON document, also on failure
        assert document["exit_code"] == 2 and document["error"].startswith(expected), result.stdout
    usage = run_cli("train", "x", "--epochs", "many", "--settings", path, "--json")  # argparse's own error
    assert usage.returncode == 2 and json.loads(usage.stdout) == {
        "error": "toolkit train: argument --epochs: invalid int value: 'many'", "exit_code": 2}
    plain = run_cli("train", "x", "--epochs", "-3", "--settings", path)
    assert plain.returncode == 2 and plain.stdout == "" and plain.stderr.startswith("error: --epochs -3")
    scrape = run_cli("scrape", "x", "--test-per-class", "5", "--settings", path, "--json")
    assert scrape.returncode == 2 and "--test-split" in json.loads(scrape.stdout)["error"]


@pytest.mark.parametrize("text, expected", [
    ("[x]\nwd = -0.1\n", "settings [x] wd = '-0.1': must be a weight decay"),
    ("[x]\nwd = lots\n", "settings [x] wd = 'lots'"),
    ("[x]\ndropout = 1\n", "settings [x] dropout = '1': must be a dropout probability"),
    ("[x]\ntime_budget = -1\n", "settings [x] time_budget = '-1': must be minutes"),
    ("[x]\ntime_budget = soon\n", "settings [x] time_budget = 'soon'"),
    ("[x]\nhead_features = all\n", "settings [x] head_features = 'all': use one of: 'multi_stage', 'final'"),
])
def test_wd_dropout_time_budget_and_head_features_are_checked(tmp_path, text, expected):
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, text))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_wd_and_dropout_are_sweepable_member_keys(tmp_path):
    from toolkit.stages.sweep import parse_grid
    from toolkit.tasks.ensemble import parse_ensemble

    spec = load_settings(write(tmp_path, "[x]\nwd = 0.1\ndropout = 0.2\n[y]\n"))
    assert (spec.get("x").wd, spec.get("x").dropout) == (0.1, 0.2)
    assert (spec.get("y").wd, spec.get("y").dropout) == (0.01, 0.5)  # fastai's own defaults
    assert parse_grid("wd=0,1e-2 dropout=0.1")["wd"] == [("0", 0.0), ("1e-2", 0.01)]
    assert parse_ensemble("wd=0.1 dropout=0.25 | size=100") == [{"wd": 0.1, "dropout": 0.25}, {"size": 100}]
    assert spec.get("y").head_features == "multi_stage"
    assert parse_grid("head_features=final,multi_stage")["head_features"] == [("final", "final"),
                                                                              ("multi_stage", "multi_stage")]
    assert parse_ensemble("head_features=final | size=100") == [{"head_features": "final"}, {"size": 100}]


@pytest.mark.parametrize("epochs,top_epochs", [(1, 1), (0, 0)])
def test_wd_and_dropout_reach_the_learner(tmp_path, clothing_small, epochs, top_epochs):
    """A real fastai fit (cached frozen head, the top phase, then unfrozen) runs with the settings' wd and
    dropout in every phase; epochs = 0 and top_epochs = 0 is the quick mode: the head on cached features only."""
    from conftest import TINY_CLASSES, copy_subset
    from fastai.callback.core import Callback
    from torch import nn

    from toolkit.core.backbones import create_model, get_backbone
    from toolkit.data import make_dataloaders
    from toolkit.learn import fit_learner, make_learner
    from toolkit.tasks import get_task

    copy_subset(clothing_small / "train", tmp_path / "data", TINY_CLASSES, 6)
    (tmp_path / "settings.ini").write_text(f"[x]\ndata = data\nsize = 32\nbs = 8\nepochs = {epochs}\n"
                                           f"top_epochs = {top_epochs}\nfreeze_epochs = 1\nlr = 1e-3\n"
                                           "lr_find_iters = 2\nwd = 0.123\ndropout = 0.3\n")
    spec = load_settings(tmp_path / "settings.ini").get("x")
    dataset = get_task(spec.task).load_data(spec, progress=False)
    backbone = get_backbone(spec.arch)
    dls = make_dataloaders(dataset, spec.size, spec.bs, backbone.mean, backbone.std, progress=False, cache=False)
    learn = make_learner(dls, create_model(spec.arch, len(dataset.classes)), tmp_path, progress=False)
    seen = []

    class Record(Callback):
        def before_fit(self):
            ps = [m.p for m in self.learn.model.modules() if isinstance(m, nn.Dropout)]
            seen.append(({h["wd"] for h in self.learn.opt.hypers}, ps))

    fitted = fit_learner(learn, spec, tmp_path, log=lambda line: None, progress=False, callbacks=[Record()])
    # the cached head's fit, the top phase's, then the unfrozen one
    assert seen == [({0.123}, [0.15, 0.3])] * (1 + (top_epochs > 0) + (epochs > 0))
    assert len(fitted["values"]) == 1 + top_epochs + epochs and fitted["top_epochs_run"] == top_epochs
    assert learn.model(dls.one_batch()[0]).shape == (8, len(TINY_CLASSES))
    if not epochs:
        with pytest.raises(ToolkitError, match="nothing would train"):
            fit_learner(learn, spec.with_overrides(freeze_epochs=0), tmp_path, log=lambda line: None, progress=False)


def test_time_budget_runs_only_the_epochs_that_fit(tmp_path, clothing_small):
    """A real fastai fit with top_epochs = 1 and epochs = 2: a budget already spent leaves the top and both
    unfrozen epochs out (the cached head is the model, and the log says why); time_budget = 0 and a roomy budget
    run them all. Timing a training step (3 tries) leaves the weights and batch-norm statistics as they were."""
    import time

    import torch
    from conftest import TINY_CLASSES, copy_subset

    from toolkit.core.backbones import create_model, get_backbone
    from toolkit.data import make_dataloaders
    from toolkit.learn import fit_learner, make_learner, training_step_seconds
    from toolkit.tasks import get_task

    copy_subset(clothing_small / "train", tmp_path / "data", TINY_CLASSES, 6)
    (tmp_path / "settings.ini").write_text("[x]\ndata = data\nsize = 32\nbs = 8\nepochs = 2\nfreeze_epochs = 1\n"
                                           "top_epochs = 1\nlr = 1e-3\nlr_find_iters = 2\nbody_bn = adapt\n")
    spec = load_settings(tmp_path / "settings.ini").get("x")
    assert spec.time_budget == 15.0
    dataset = get_task(spec.task).load_data(spec, progress=False)
    backbone = get_backbone(spec.arch)
    dls = make_dataloaders(dataset, spec.size, spec.bs, backbone.mean, backbone.std, progress=False, cache=False)

    def learner():
        return make_learner(dls, create_model(spec.arch, len(dataset.classes)), tmp_path, progress=False,
                            keep_bn_stats=False)

    learn = learner()
    learn.unfreeze()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert training_step_seconds(learn) > 0
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in learn.model.parameters())

    lines = []
    spent = fit_learner(learner(), spec, tmp_path, log=lines.append, progress=False, started=time.time() - 15 * 60)
    assert spent["epochs_run"] == spent["top_epochs_run"] == 0 and len(spent["values"]) == 1  # the head alone
    assert any("time_budget 15 min: 0 of 1 top epoch(s) fit" in line for line in lines)
    assert any("time_budget 15 min: 0 of 2 unfrozen epoch(s) fit" in line for line in lines)
    for budget in (0, 600):
        lines.clear()
        fitted = fit_learner(learner(), spec.with_overrides(time_budget=budget), tmp_path, log=lines.append,
                             progress=False, started=time.time() - 15 * 60)
        assert fitted["epochs_run"] == 2 and fitted["top_epochs_run"] == 1 and len(fitted["values"]) == 4
        assert not any("time_budget" in line for line in lines)
