"""The task registry: every kind declares its keys and features; combinations work or refuse in one
line when settings are read; an ensemble wraps any kind that supports it and keeps its reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from toolkit.core.errors import SettingsError
from toolkit.settings import load_settings
from toolkit.tasks import FEATURES, TASKS, get_task, task_of


def _settings(tmp_path, text):
    (tmp_path / "settings.ini").write_text(text)
    return load_settings(tmp_path / "settings.ini")


def test_every_kind_is_registered_with_known_features():
    assert list(TASKS) == ["single", "pairs", "hierarchical"]
    for task in TASKS.values():
        assert task.supports <= set(FEATURES) and task.summary
    assert get_task("pairs").n_inputs == 2 and "explain" not in get_task("pairs").supports


def test_an_ensemble_of_a_hierarchical_section_keeps_its_paths(tmp_path):
    spec = _settings(tmp_path, "[h]\ntask = hierarchical\nensemble = size=64 | size=96\n").get("h")
    task = task_of(spec)
    assert type(task).__name__ == "EnsembleTask" and task.name == "hierarchical" and "ensemble" not in task.supports
    prediction = task.describe(["shoes/boots", "shoes/sandals", "tops/shirt"], np.array([0.3, 0.3, 0.4]))
    assert prediction.label == "shoes/boots" or prediction.label == "shoes/sandals"  # top-down: shoes holds 0.6
    assert [node for node, _ in prediction.path][0] == "shoes"


@pytest.mark.parametrize(("text", "expected"), [
    ("[p]\ntask = pairs\nensemble = size=64 | size=96\n", "settings [p] ensemble: task = pairs does not support"),
    ("[s]\nhierarchy = tops/shirt\n", "settings [s] hierarchy is set but task = single"),
    ("[s]\napproach = both\n", "settings [s] approach is set but task = single"),
    ("[s]\ntask = tree\n", "settings [s] task = 'tree': unknown task"),
])
def test_unsupported_combinations_refuse_when_settings_are_read(tmp_path, text, expected):
    with pytest.raises(SettingsError) as info:
        _settings(tmp_path, text)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_default_key_of_another_kind_applies_to_its_kind_only(tmp_path):
    settings = _settings(tmp_path, "[DEFAULT]\napproach = siamese\n[s]\n[p]\ntask = pairs\n")
    assert settings.get("p").approach == "siamese"
    with pytest.raises(AttributeError):
        settings.get("s").approach  # noqa: B018


def test_tasks_command_lists_kinds_as_one_json_document(tmp_path):
    (tmp_path / "settings.ini").write_text("[s]\n")
    result = run_cli("tasks", "--json", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    rows = {row["task"]: row for row in json.loads(result.stdout)}
    assert rows["pairs"]["refuses"] == ["clean", "distributed", "ensemble", "explain", "head_only", "tta"]
    assert "hierarchy" in rows["hierarchical"]["keys"]
