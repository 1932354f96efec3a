"""Shoe pairs (task = pairs) on the real shoe-pairs photos: pair building, person-level splits, the
stacked image, a real training of both approaches judged on people it never saw, the pickle-free
PairPredictor, the CLI (evaluate, predict --pair, check) and the pairs dashboard notebook."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, run_cli
from PIL import Image

from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.settings import load_settings
from toolkit.tasks.pairs import DEFAULT_PAIR_RULE
from toolkit.tasks.pairs.data import build_pairs, complete_pairs, load_pair_data, parse_photos
from toolkit.tasks.pairs.model import stack_pair
from toolkit.tasks.pairs.predictor import PairPredictor, evaluate_pairs

TRAIN_PEOPLE = range(1, 25)  # u001..u024 train and validate the test model
UNSEEN_PEOPLE = range(90, 114)  # u090..u113: never seen by it


def _link_people(source: Path, dest: Path, people) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for number in people:
        for file in sorted(source.glob(f"u{number:03d}_*")):
            (dest / file.name).symlink_to(file)
    return dest


def _settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def photos(shoe_pairs):
    found, bad = parse_photos(shoe_pairs / "train", DEFAULT_PAIR_RULE)
    assert not bad
    return found


@pytest.fixture(scope="module")
def pairs_project(tmp_path_factory, shoe_pairs) -> Path:
    """A project whose [shoes] section trains both approaches for real on 24 people (64 px)."""
    from toolkit.stages.train import train

    root = tmp_path_factory.mktemp("pairs-project")
    _link_people(shoe_pairs / "train", root / "data", TRAIN_PEOPLE)
    _link_people(shoe_pairs / "train", root / "unseen", UNSEEN_PEOPLE)
    (root / "settings.ini").write_text(
        "[shoes]\ntask = pairs\ntitle = Shoe pairs\ndata = data\napproach = both\nsize = 64\nepochs = 1\n"
        "freeze_epochs = 1\nbs = 16\nlr = 2e-3\nlr_find_iters = 20\nvalid_pct = 0.25\n")
    train(load_settings(root / "settings.ini").get("shoes"), progress=False, log=lambda line: None)
    return root


# ------------------------------------------------------------------ photos, pairs, splits


def test_pairs_from_the_real_photos_are_balanced_and_seeded(photos):
    assert len(photos) == 678 and len({p.person for p in photos}) == 113
    assert Counter(p.group for p in photos) == {"m": 544, "w": 134}
    pairs = build_pairs(photos, negatives=1, hard_share=0.5, seed=7)
    kinds = Counter((p.kind, p.group) for p in pairs)
    assert kinds[("positive", "m")] == 272 and kinds[("positive", "w")] == 67
    for group in ("m", "w"):  # balanced within each group: as many negatives as positives, half hard
        negatives = kinds[("hard", group)] + kinds[("easy", group)]
        assert negatives == kinds[("positive", group)]
        assert abs(kinds[("hard", group)] - negatives / 2) <= 1
    side = {p.path: p.side for p in photos}
    person = {p.path: p.person for p in photos}
    pair_of = {p.path: p.pair for p in photos}
    for pair in pairs:
        assert side[pair.a] == "left" and side[pair.b] == "right"
        if pair.kind == "positive":
            assert person[pair.a] == person[pair.b] and pair_of[pair.a] == pair_of[pair.b] and pair.same
        elif pair.kind == "hard":
            assert person[pair.a] == person[pair.b] and pair_of[pair.a] != pair_of[pair.b] and not pair.same
        else:
            assert person[pair.a] != person[pair.b] and not pair.same
    assert len(set((p.a, p.b) for p in pairs)) == len(pairs)
    assert build_pairs(photos, seed=7) == pairs and build_pairs(photos, seed=8) != pairs
    more = build_pairs(photos, negatives=2, hard_share=1.0, seed=7)
    assert sum(not p.same for p in more) == 2 * 339 and Counter(p.kind for p in more)["hard"] > 339


def test_hard_negatives_weighted_in_training_only(tmp_path, shoe_pairs, photos):
    from toolkit.tasks.pairs.data import weight_hard

    pairs = build_pairs(photos, seed=7)
    weighted = weight_hard(pairs, 3, seed=7)
    count, more = Counter(p.kind for p in pairs), Counter(p.kind for p in weighted)
    assert more == {"positive": count["positive"], "hard": 3 * count["hard"], "easy": count["easy"]}
    assert set(weighted) == set(pairs) and weight_hard(pairs, 1) == pairs
    _link_people(shoe_pairs / "train", tmp_path / "few", range(1, 13))
    text = f"[s]\ntask = pairs\ndata = {tmp_path / 'few'}\n"
    plain = load_pair_data(load_settings(_settings(tmp_path, text)).get("s"), progress=False)
    heavy = load_pair_data(load_settings(_settings(tmp_path, text + "hard_weight = 2\n")).get("s"), progress=False)
    assert heavy.valid == plain.valid  # validation is never weighted
    hard = Counter(p.kind for p in plain.train)["hard"]
    assert hard > 0 and Counter(p.kind for p in heavy.train)["hard"] == 2 * hard


def test_person_level_split_never_shares_a_person(tmp_path, shoe_pairs):
    spec = load_settings(_settings(tmp_path, f"[s]\ntask = pairs\ndata = {shoe_pairs / 'train'}\n")).get("s")
    data = load_pair_data(spec, progress=False)
    train_people = {person for p in data.train for person in p.people}
    valid_people = {person for p in data.valid for person in p.people}
    assert valid_people == data.valid_people and not (train_people & valid_people)
    assert len(valid_people) == pytest.approx(0.2 * 113, abs=2)
    assert {p.group for p in data.valid} == {"m", "w"} and {p.kind for p in data.valid} == {"positive", "hard", "easy"}
    grouped = load_settings(_settings(tmp_path, f"[s]\ntask = pairs\ndata = {shoe_pairs / 'train'}\n"
                                                "split = group:^u0*(\\d)\n")).get("s")
    data = load_pair_data(grouped, progress=False)  # units: the person number's first digit
    assert not ({x for p in data.train for x in p.people} & {x for p in data.valid for x in p.people})
    leaky = load_settings(_settings(tmp_path, f"[s]\ntask = pairs\ndata = {shoe_pairs / 'train'}\n"
                                              "split = random\n")).get("s")
    with pytest.raises(ToolkitError, match="one person's shoes in train and valid"):
        load_pair_data(leaky, progress=False)


def test_stacked_image_has_the_right_size_and_order(photos):
    from toolkit.core.images import load_squished as load_resized

    left, right = complete_pairs(photos)[("u001", "1")]
    a, b = load_resized(left.path, 64), load_resized(right.path, 64)
    a = 255 - a  # make the two halves unmistakable: a negative on the left
    stacked = stack_pair(a, b, 64)
    assert stacked.shape == (64, 64, 3) and stacked.dtype == np.uint8
    half_a = np.asarray(Image.fromarray(a).resize((32, 64), Image.BILINEAR)).astype(float)
    half_b = np.asarray(Image.fromarray(b).resize((32, 64), Image.BILINEAR)).astype(float)
    assert np.abs(stacked[:, :32] - half_a).mean() < 3 and np.abs(stacked[:, 32:] - half_b).mean() < 3
    assert np.abs(stack_pair(b, a, 64)[:, :32] - half_b).mean() < 3  # order matters, as given


def test_pair_rule_and_data_errors_name_the_key(tmp_path, shoe_pairs):
    with pytest.raises(SettingsError, match=r"\[s\] pair_rule .*named groups \(\?P<side>"):
        load_settings(_settings(tmp_path, "[s]\ntask = pairs\n"
                                          "pair_rule = (?P<person>u\\d+)_(?P<pair>\\d)_(?P<group>m)\n"))
    with pytest.raises(SettingsError, match=r"\[s\] approach"):
        load_settings(_settings(tmp_path, "[s]\ntask = pairs\napproach = triplet\n"))
    data = _link_people(shoe_pairs / "train", tmp_path / "data", [1, 2])
    (data / "IMG_0001.jpg").symlink_to(next(data.iterdir()).resolve())
    _settings(tmp_path, "[s]\ntask = pairs\ndata = data\n")
    result = run_cli("train", "s", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "do not match [s] pair_rule (e.g. IMG_0001.jpg)" in lines[0] and lines[0].startswith("error: ")


# ------------------------------------------------------------------ training, predicting, evaluating


def test_both_approaches_are_exported_and_compared(pairs_project):
    out = pairs_project / "models" / "shoes"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["approaches"]) == {"stacked", "siamese"} and metrics["chosen"] in metrics["approaches"]
    for approach in ("stacked", "siamese"):
        meta = json.loads((out / approach / "model.json").read_text())
        assert meta["task"] == "pairs" and meta["approach"] == approach and meta["classes"] == ["different", "same"]
        for name in ("model.safetensors", "lr_find.png", "losses.png", "confusion_matrix.png", "top_losses.png"):
            assert (out / approach / name).stat().st_size > 0, (approach, name)
        summary = metrics["approaches"][approach]
        assert set(summary["kinds"]) == {"positive", "hard", "easy"} and summary["groups"]
        assert {"positive/m", "hard/m", "easy/m", "positive/w", "hard/w", "easy/w"} <= set(summary["kinds_by_group"])
    from toolkit.tasks import get_task

    card = dict(get_task("pairs").card_rows({}, metrics))
    assert set(card) == {"group m by kind", "group w by kind"}
    hard_w = metrics["kinds_by_group"]["hard/w"]
    assert f"hard {hard_w['accuracy']:.1%} (n={hard_w['n']})" in card["group w by kind"]
    served = json.loads((out / "model.json").read_text())
    assert served["approach"] == metrics["chosen"] and not (out / "export.pkl").exists()


def test_each_approach_beats_chance_on_people_it_never_saw(pairs_project):
    spec = load_settings(pairs_project / "settings.ini").get("shoes")
    for approach in ("stacked", "siamese"):
        metrics = evaluate_pairs(PairPredictor(pairs_project / "models" / "shoes" / approach), pairs_project / "unseen",
                                 spec, progress=False)
        assert metrics["n"] == 132 and metrics["kinds"]["positive"]["n"] == 66  # 22 people (numbers skip)
        # chance is 50% (balanced); 62% on 132 pairs is 2.75 standard errors above it
        assert metrics["accuracy"] >= 0.62, (approach, metrics["accuracy"], metrics["kinds"])


def test_cli_evaluate_and_predict_pair(pairs_project):
    result = run_cli("evaluate", "shoes", "--data", "unseen", "--json", "--quiet", cwd=pairs_project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics["groups"]) == {"m", "w"} and set(metrics["kinds"]) == {"positive", "hard", "easy"}
    assert (pairs_project / "models" / "shoes" / "evaluation" / "confusion_matrix.png").is_file()
    text = run_cli("evaluate", "shoes", "--data", "unseen", "--quiet", cwd=pairs_project)
    assert "group w" in text.stdout and "kind hard" in text.stdout and "easy negatives" in text.stdout

    a, b = "unseen/u100_2_left_m.jpg", "unseen/u100_2_right_m.jpg"
    result = run_cli("predict", "shoes", "--pair", a, b, "--json", cwd=pairs_project)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["label"] in ("same pair", "different pairs") and 0 <= row["probability_same"] <= 1
    assert row["same"] == (row["probability_same"] >= 0.5)
    plain = run_cli("predict", "shoes", "--pair", a, b, cwd=pairs_project)
    assert plain.stdout.startswith(f"{a}\t{b}\t") and "p(same)=" in plain.stdout
    # a usage error exits 2; an input that fails exits 1 (the CLI contract), each in one line
    for args, expected, code in ((("predict", "shoes", a), "toolkit predict shoes --pair A B", 2),
                                 (("predict", "shoes", "--pair", a, "unseen/missing.jpg"), "file not found", 1)):
        result = run_cli(*args, cwd=pairs_project)
        assert result.returncode == code and result.stderr.strip().startswith("error: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_pair_predictor_is_fastai_free_and_the_siamese_model_order_free(pairs_project):
    folder = pairs_project / "models" / "shoes" / "siamese"
    code = ("import sys, json; from toolkit.tasks.pairs.predictor import PairPredictor; "
            f"p = PairPredictor({str(folder)!r}, device='cpu'); "
            f"r = p.predict_pair({str(pairs_project / 'unseen' / 'u101_2_left_m.jpg')!r}, "
            f"{str(pairs_project / 'unseen' / 'u101_3_right_m.jpg')!r}); "
            "print(json.dumps([r.probability, 'fastai' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    probability, fastai_loaded = json.loads(result.stdout)
    assert 0 <= probability <= 1 and not fastai_loaded
    predictor = PairPredictor(folder, device="cpu")
    a, b = pairs_project / "unseen" / "u102_1_left_m.jpg", pairs_project / "unseen" / "u102_1_right_m.jpg"
    assert predictor.predict_pair(a, b).probability == pytest.approx(predictor.predict_pair(b, a).probability,
                                                                       abs=1e-5)


# ------------------------------------------------------------------ toolkit check


def test_check_passes_for_real_labels_and_fails_for_random_ones(pairs_project):
    args = ("check", "shoes", "--approach", "stacked", "--n", "16", "--steps", "20", "--quiet")
    passed = run_cli(*args, cwd=pairs_project)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    line = passed.stdout.strip().splitlines()[-1]
    assert line.startswith("PASS shoes (stacked): loss ") and "real labels" in line
    before, after = (float(x) for x in line.split("loss ")[1].split(" after")[0].split(" -> "))
    assert after < 0.1 < before
    failed = run_cli(*args, "--labels", "random", "--json", cwd=pairs_project)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    result = json.loads(failed.stdout.strip().splitlines()[-1])
    assert not result["passed"] and result["loss_after"] > 0.3 and result["labels"] == "random"


def test_check_works_for_a_single_label_classifier(tiny_project):
    result = run_cli("check", "tiny", "--n", "12", "--steps", "20", "--quiet", cwd=tiny_project)
    assert result.returncode == 0 and result.stdout.startswith("PASS tiny: loss "), result.stdout + result.stderr


# ------------------------------------------------------------------ dashboard


def _upload(path: Path) -> dict:
    data = path.read_bytes()
    return {"name": path.name, "type": "image/png", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.now(timezone.utc)}


def test_pairs_dashboard_compares_two_uploads(pairs_project):
    from toolkit.tasks.pairs.dashboard import PairDashboard
    from toolkit.ui.dashboard import dashboard

    board = dashboard("shoes", pairs_project / "settings.ini")
    assert isinstance(board, PairDashboard)
    assert set(board.approach.options) == {"stacked", "siamese"}
    assert board.card.value.count("toolkit-approach-row") == 2 and "hard" in board.card.value
    unseen = pairs_project / "unseen"
    board.uploads[0].value = (_upload(unseen / "u103_1_left_m.jpg"),)
    assert "upload the other shoe" in board.result.value and board.thumbs[0].value
    board.uploads[1].value = (_upload(unseen / "u103_1_right_m.jpg"),)
    assert "toolkit-verdict" in board.result.value and "%" in board.result.value
    for approach in ("stacked", "siamese"):
        board.approach.value = approach
        assert f"{approach} model" in board.result.value and not board.status.value
    board.uploads[1].value = ({**_upload(unseen / "u103_1_right_m.jpg"), "name": "notes.jpg",
                               "content": memoryview(b"not a photo")},)
    assert "notes.jpg: not an image" in board.status.value and board.result.value == ""


def test_pairs_app_notebook_executes(pairs_project, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from toolkit.ui.apps import write_apps

    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.delenv("TOOLKIT_SETTINGS", raising=False)
    path = next(p for p in write_apps(pairs_project / "settings.ini") if p.name == "shoes.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    bundles = [o.get("data", {}) for o in outputs if o.output_type == "execute_result"]
    assert any("application/vnd.jupyter.widget-view+json" in b for b in bundles), outputs


# ------------------------------------------------------------------ cross-cutting features (the task registry)


def test_pairs_refuse_explain_clean_tta_and_ensembles_in_one_line(pairs_project, tmp_path):
    photo = sorted((pairs_project / "unseen").iterdir())[0]
    for args, expected in ((("explain", "shoes", photo), "task = pairs does not support toolkit explain"),
                           (("clean", "shoes", "--report"), "task = pairs does not support toolkit clean"),
                           (("evaluate", "shoes", "--data", "unseen", "--tta"), "does not support evaluate --tta")):
        result = run_cli(*args, cwd=pairs_project)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, result.stderr)
    (tmp_path / "settings.ini").write_text("[shoes]\ntask = pairs\nensemble = size=64 | size=96\n")
    result = run_cli("train", "shoes", cwd=tmp_path)
    assert result.returncode == 2 and "settings [shoes] ensemble: task = pairs does not support" in result.stderr


def test_a_pairs_sweep_trains_into_its_own_folders_and_never_overwrites_the_model(pairs_project):
    served = pairs_project / "models" / "shoes"
    before = {name: (served / name).read_bytes() for name in ("model.json", "model.safetensors", "metrics.json")}
    result = run_cli("sweep", "shoes", "--grid", "lr=1e-3", "--json", "--quiet", cwd=pairs_project, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["combo"] for r in rows] == ["lr=1e-3"] and 0 <= float(rows[0]["accuracy"]) <= 1
    assert (served / "sweep" / "lr=1e-3" / "siamese" / "model.json").is_file()
    assert {name: (served / name).read_bytes() for name in before} == before
