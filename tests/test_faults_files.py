"""Issue 13, item 8: bad settings and corrupt model files give one line and a nonzero exit, never a
traceback; model files are written atomically; an OSError in a command is one line naming the file."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli
from PIL import Image

from toolkit.core.artifacts import META_FILE, WEIGHTS_FILE, write_model
from toolkit.core.backbones import inference_model

TRACEBACK = "Traceback"


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert TRACEBACK not in result.stderr
    return lines[0]


@pytest.mark.parametrize(("text", "expected"), [
    (b"[x]\ntitle = caf\xe9\n", "line 2 is not UTF-8"),
    (b"[x]\nvalid_pct = 7\n", "settings [x] valid_pct = '7'"),
    (b"[x]\nclasses = cats, dogs, cats\n", "'cats' and 'cats' would be one folder"),
    (b"[x]\nclasses = Cats, cats\n", "would be one folder"),
    (b"[x]\nclasses = a/b, a_b\n", "path separator"),
    (b"[x]\nclasses = .., shirts\n", "is not a folder name"),
    (b"[x]\nclasses = ok, " + ("\U0001F600" * 100).encode() + b"\n", "bytes long"),
    (b"[x]\ntask = pairs\nensemble = size=64 | size=96\n", "task = pairs does not support"),
    (b"[x]\npair_rule = (?P<person>x)\n", "pair_rule is set but task = single"),
])
def test_bad_settings_are_one_line(tmp_path, text, expected):
    (tmp_path / "settings.ini").write_bytes(text)
    result = run_cli("predict", "x", "a.jpg", cwd=tmp_path)
    assert result.returncode == 2
    assert expected in one_line(result)


def test_nfc_and_nfd_class_names_are_one_class(tmp_path):
    from toolkit.settings import load_settings

    (tmp_path / "settings.ini").write_text("[x]\nclasses = caf\u00e9, shirts\n", encoding="utf-8")
    assert load_settings(tmp_path / "settings.ini").get("x").classes[0] == "caf\u00e9"
    (tmp_path / "settings.ini").write_text("[x]\nclasses = caf\u00e9, cafe\u0301\n", encoding="utf-8")
    result = run_cli("predict", "x", "a.jpg", cwd=tmp_path)
    assert "would be one folder" in one_line(result)


@pytest.fixture()
def model_project(tmp_path):
    (tmp_path / "settings.ini").write_text("[m]\nsize = 32\n")
    folder = tmp_path / "models" / "m"
    write_model(folder, inference_model("efficientnet_lite0", 3), {"arch": "efficientnet_lite0",
                "classes": ["a", "b", "c"], "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, "single")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.jpg")
    return tmp_path


def test_a_good_model_predicts(model_project):
    result = run_cli("predict", "m", "--json", "red.jpg", cwd=model_project)  # options anywhere
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["label"] in ("a", "b", "c")


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda f: (f / META_FILE).write_bytes(b"\x89PNG\x00\xff"), "not valid JSON"),
    (lambda f: (f / META_FILE).write_text("[]"), "not a JSON object"),
    (lambda f: _meta(f, classes=None), "'classes' must list"),
    (lambda f: _meta(f, size="abc"), "'size' must be a whole number"),
    (lambda f: _meta(f, classes=["a", "b", "c", "d"]), "does not match model.json"),
    (lambda f: _meta(f, format_version=7), "format_version 7"),
    (lambda f: _meta(f, task="tree"), "task 'tree' is not known"),
    (lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:5000]), "not a readable safetensors"),
    (lambda f: (f / WEIGHTS_FILE).write_bytes(b""), "not a readable safetensors"),
    (lambda f: (f / WEIGHTS_FILE).unlink(), "is missing"),
])
def test_corrupt_model_files_are_one_line(model_project, damage, expected):
    damage(model_project / "models" / "m")
    commands = (("predict", "m", "red.jpg"), ("evaluate", "m", "--data", "."), ("explain", "m", "red.jpg"))
    for args in commands if "safetensors" in expected else commands[:1]:  # model.json faults: one reader
        result = run_cli(*args, cwd=model_project)
        assert expected in one_line(result), args


def _meta(folder, **changes):
    meta = json.loads((folder / META_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / META_FILE).write_text(json.dumps(meta))


def test_model_files_are_written_atomically(tmp_path):
    folder = tmp_path / "m"
    meta = {"arch": "efficientnet_lite0", "classes": ["a", "b"], "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    write_model(folder, inference_model("efficientnet_lite0", 2), meta, "single")
    inode = (folder / WEIGHTS_FILE).stat().st_ino
    write_model(folder, inference_model("efficientnet_lite0", 2), meta, "single")
    assert (folder / WEIGHTS_FILE).stat().st_ino != inode  # a new file renamed over the old, never rewritten
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, WEIGHTS_FILE]  # no temp files left


@pytest.mark.skipif(os.geteuid() == 0 and not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_and_permission_denied_are_one_line(model_project, tmp_path):
    from toolkit.core.errors import os_error_line

    with pytest.raises(OSError) as info:
        with open("/dev/full", "w") as handle:
            handle.write("x" * 65536)
            handle.flush()
    assert "free some disk space" in os_error_line(info.value)
    models = model_project / "models" / "m"
    (models / "evaluation").mkdir()
    (models / "evaluation" / "metrics.json").mkdir()  # a folder where the file must go: IsADirectoryError
    (model_project / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(model_project / "data" / "a" / "x.jpg")
    result = run_cli("evaluate", "m", "--data", "data", "--quiet", cwd=model_project)
    assert result.returncode == 1 and "metrics.json" in one_line(result)
