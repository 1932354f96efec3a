"""task = hierarchical: paths as labels, per-level metrics, consistent paths on real photos, the app."""

import json
import shutil

import numpy as np
import pytest
from conftest import REPO, cli_env, copy_subset, run_cli

from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.data import list_labelled_images
from toolkit.settings import load_settings, set_keys
from toolkit.tasks import load_predictor, task_of
from toolkit.tasks.hierarchical import decode, hierarchical_metrics, level_matrix, parse_hierarchy

# five clothing-small classes in two levels; `shoes` is a one-level path (paths may differ in depth)
HIERARCHY = "tops/t-shirt, tops/shirt, bottoms/pants, bottoms/shorts, shoes"
FOLDERS = ["t-shirt", "shirt", "pants", "shorts", "shoes"]
PATHS = {"t-shirt": "tops/t-shirt", "shirt": "tops/shirt", "pants": "bottoms/pants", "shorts": "bottoms/shorts",
         "shoes": "shoes"}


def _write(tmp_path, text):
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ parsing


def test_parse_hierarchy_items_and_errors():
    assert parse_hierarchy("tops/t-shirt, tops / shirt,\n womens sandals: shoes/female/sandals, dress") == {
        "t-shirt": "tops/t-shirt", "shirt": "tops/shirt", "womens sandals": "shoes/female/sandals", "dress": "dress"}
    with pytest.raises(ValueError, match="'shoes' is both a class and the parent of 'shoes/female/sandals'"):
        parse_hierarchy("shoes, shoes/female/sandals")
    with pytest.raises(ValueError, match="mapped twice"):
        parse_hierarchy("a/shirt, b/shirt")
    with pytest.raises(ValueError, match="empty part"):
        parse_hierarchy("tops//shirt")


def test_settings_errors_name_section_and_key(tmp_path):
    cases = [
        ("[f]\ntask = hierarchical\nhierarchy = tops//shirt\n", "settings [f] hierarchy = 'tops//shirt'"),
        ("[f]\nhierarchy = tops/shirt\n", "hierarchy is set but task = single"),
        ("[f]\ntask = hierarchical\nclasses = shirt, hat\nhierarchy = tops/shirt\n", "no path for class(es) hat"),
        ("[f]\ntask = tree\n", "unknown task 'tree'; known: single, pairs, hierarchical"),
    ]
    for text, expected in cases:
        with pytest.raises(SettingsError, match=None) as info:
            load_settings(_write(tmp_path, text))
        assert expected in str(info.value) and "\n" not in str(info.value), (text, str(info.value))
    spec = load_settings(_write(tmp_path, "[f]\ntask = hierarchical\nhierarchy = tops/shirt, dress\n")).get("f")
    assert spec.hierarchy == {"shirt": "tops/shirt", "dress": "dress"}


def test_fashion_items_section_of_the_project():
    spec = load_settings(REPO / "settings.ini").get("fashion-items")
    assert spec.task == "hierarchical" and len(spec.queries) >= 2
    assert {p.split("/")[0] for p in spec.hierarchy.values()} == {"glasses", "trousers", "shoes"}
    assert spec.hierarchy["womens sandals"] == "shoes/female/sandals"
    assert {p.split("/")[1] for p in spec.hierarchy.values() if p.startswith("shoes/")} == {"female", "male"}
    assert (REPO / "apps" / "fashion-items.ipynb").is_file()


def test_set_keys_keeps_comments_and_validates(tmp_path):
    path = _write(tmp_path, "# project\n[a]\n# tuned by hand\nsize = 96\nclasses = x,\n  y\n\n[b]\nsize = 64\n")
    set_keys(path, "a", {"size": "128", "lr": "3e-3", "classes": "x, y, z"})
    text = path.read_text()
    assert "# project" in text and "# tuned by hand" in text and "size = 128\n" in text
    assert text.index("lr = 3e-3") < text.index("[b]") and "[b]\nsize = 64\n" in text
    spec = load_settings(path).get("a")
    assert (spec.size, spec.lr, spec.classes) == (128, 3e-3, ["x", "y", "z"])
    with pytest.raises(SettingsError, match=r"settings \[a\] size = 'big'"):
        set_keys(path, "a", {"size": "big"})
    with pytest.raises(SettingsError, match=r"no \[c\] section"):
        set_keys(path, "c", {"size": "64"})
    assert load_settings(path).get("a").size == 128  # a refused edit leaves the file alone



def path_of(predictor, probs):
    """The decoded path of one image's leaf probabilities, as the task describes it."""
    return predictor.task.describe(predictor.classes, probs).path


# ------------------------------------------------------------------ labels and metrics


def test_nested_folders_are_paths_only_for_hierarchical(tmp_path, clothing_small):
    root = tmp_path / "nested"
    copy_subset(clothing_small / "train", root / "shoes" / "female", ["shoes"], 3)
    copy_subset(clothing_small / "train", root / "tops", ["shirt", "t-shirt"], 3)
    files, labels = list_labelled_images(root, nested=True)
    assert sorted(set(labels)) == ["shoes/female/shoes", "tops/shirt", "tops/t-shirt"] and len(files) == 9
    assert sorted(set(list_labelled_images(root)[1])) == ["shoes", "tops"]  # single: the top class, unchanged
    spec = load_settings(_write(tmp_path, "[h]\ntask = hierarchical\nsplit = random:0.3\n")).get("h")
    assert sorted(set(task_of(spec).load_data(spec, root, progress=False).labels)) == [
        "shoes/female/shoes", "tops/shirt", "tops/t-shirt"]
    (root / "tops" / "loose.jpg").write_bytes(next((root / "tops" / "shirt").iterdir()).read_bytes())
    with pytest.raises(ToolkitError, match="'tops' is both a class and the parent of 'tops/shirt'"):
        task_of(spec).load_data(spec, root, progress=False)


def test_unmapped_folder_is_a_one_line_error(tmp_path, clothing_small):
    root = copy_subset(clothing_small / "train", tmp_path / "flat", ["hat", "shirt"], 3)
    spec = load_settings(_write(tmp_path, "[h]\ntask = hierarchical\nhierarchy = tops/shirt\n")).get("h")
    with pytest.raises(ToolkitError, match=r"\[h\] hierarchy .*class folder\(s\) \['hat'\] are not in the hierarchy"):
        task_of(spec).load_data(spec, root, progress=False)


def test_top_down_decoding_and_level_metrics_by_hand():
    classes = ["bottoms/pants", "dress", "tops/shirt", "tops/t-shirt"]
    nodes, matrix = level_matrix(classes, 1)
    assert nodes == ["bottoms", "dress", "tops"] and matrix.sum(axis=0).tolist() == [1, 1, 2]
    probs = np.array([[0.35, 0.05, 0.30, 0.30],   # leaf argmax says pants, but tops holds 0.60
                      [0.10, 0.60, 0.20, 0.10],
                      [0.50, 0.00, 0.20, 0.30]])
    leaf, per_level = decode(probs, classes)
    assert leaf.tolist() == [2, 1, 0]  # tops -> shirt (first of the tie), dress, bottoms -> pants
    assert per_level[:, 0].tolist() == pytest.approx([0.60, 0.60, 0.50])
    assert per_level[:, 1].tolist() == pytest.approx([0.30, 0.60, 0.50])
    metrics = hierarchical_metrics(probs, ["tops/t-shirt", "dress", "tops/shirt"], classes)
    assert metrics["decode"] == "top-down" and metrics["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    level1, level2 = metrics["levels"]["level1"], metrics["levels"]["level2"]
    assert level1["accuracy"] == pytest.approx(2 / 3, abs=1e-4) and level1["classes"] == ["bottoms", "dress", "tops"]
    assert level1["confusion"] == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert level2["classes"] == classes and level2["accuracy"] == pytest.approx(1 / 3, abs=1e-4)


# ------------------------------------------------------------------ a real model


@pytest.fixture(scope="module")
def hier_project(tmp_path_factory, clothing_small):
    """[fashion-items] over 5 clothing-small classes (flat folders mapped by `hierarchy`), trained for real."""
    from toolkit.stages.train import train

    root = tmp_path_factory.mktemp("hier")
    copy_subset(clothing_small / "train", root / "data" / "train", FOLDERS, 28)
    copy_subset(clothing_small / "validation", root / "data" / "validation", FOLDERS, 8)
    (root / "settings.ini").write_text(
        "[fashion-items]\n# a test hierarchy\ntitle = Fashion items\ntask = hierarchical\ndata = data\n"
        f"hierarchy = {HIERARCHY}\nsize = 64\nepochs = 1\nfreeze_epochs = 1\nbs = 16\nlr = 5e-3\n"
        "lr_find_iters = 20\n")
    spec = load_settings(root / "settings.ini").get("fashion-items")
    train(spec, progress=False, log=lambda line: None)
    return root


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, clothing_small):
    return copy_subset(clothing_small / "validation", tmp_path_factory.mktemp("held"), FOLDERS, 10, seed=5)


def test_model_json_metrics_and_plots_per_level(hier_project):
    out = hier_project / "models" / "fashion-items"
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "hierarchical" and meta["levels"] == 2
    assert meta["classes"] == sorted(PATHS.values()) and meta["hierarchy"] == PATHS
    metrics = json.loads((out / "metrics.json").read_text())
    level1, level2 = metrics["levels"]["level1"], metrics["levels"]["level2"]
    assert level1["classes"] == ["bottoms", "shoes", "tops"] and np.array(level1["confusion"]).sum() == 40
    assert level2["classes"] == sorted(PATHS.values()) and level2["accuracy"] == metrics["accuracy"]
    assert level1["accuracy"] >= level2["accuracy"]  # a right leaf always has the right parent
    for name in ("confusion_level1.png", "confusion_level2.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 1000, name


def test_paths_are_consistent_on_real_photos(hier_project, held_out):
    from toolkit.core.images import open_image

    predictor = load_predictor(hier_project / "models" / "fashion-items")
    files, folders = list_labelled_images(held_out)
    # one batch (a busy CPU makes many single forwards slow), decoded as predict() decodes
    all_probs = predictor.predict_images([open_image(f, draft_size=predictor.size) for f in files])
    right_top = 0
    for probs, folder in zip(all_probs, folders):
        path = path_of(predictor, probs)
        assert path[-1][0] in predictor.classes
        for (parent, p_parent), (child, p_child) in zip(path, path[1:]):
            assert child.startswith(parent + "/") and p_child <= p_parent + 1e-6
        for node, p in path:  # a node's probability is the sum of its leaves'
            leaves = [i for i, c in enumerate(predictor.classes) if c == node or c.startswith(node + "/")]
            assert p == pytest.approx(float(probs[leaves].sum()), abs=1e-5)
        right_top += path[0][0] == PATHS[folder].split("/")[0]
    assert right_top / len(files) >= 0.6, right_top  # tops / bottoms / shoes: chance is about 1/3
    prediction = predictor.predict(files[0])  # the one-image API gives the same path
    expected = path_of(predictor, all_probs[0])
    assert [n for n, _ in prediction.path] == [n for n, _ in expected]
    assert [p for _, p in prediction.path] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert prediction.label == prediction.path[-1][0]


def test_evaluate_and_predict_cli_report_levels(hier_project, held_out, tmp_path):
    flat = run_cli("evaluate", "fashion-items", "--data", held_out, "--json", "--quiet", cwd=hier_project)
    assert flat.returncode == 0, flat.stderr
    metrics = json.loads(flat.stdout)
    assert metrics["n"] == 50 and set(metrics["levels"]) == {"level1", "level2"}
    assert metrics["levels"]["level1"]["accuracy"] >= metrics["levels"]["level2"]["accuracy"]
    assert (hier_project / "models" / "fashion-items" / "evaluation" / "confusion_level1.png").is_file()
    nested = tmp_path / "nested"  # the same photos as nested path folders give the same figures
    for folder, path in PATHS.items():
        shutil.copytree(held_out / folder, nested / path)
    again = run_cli("evaluate", "fashion-items", "--data", nested, "--json", "--quiet", cwd=hier_project)
    assert json.loads(again.stdout)["levels"] == metrics["levels"]
    photo = sorted((held_out / "shoes").iterdir())[0]
    shown = run_cli("predict", "fashion-items", photo, "--json", cwd=hier_project)
    row = json.loads(shown.stdout)[0]
    assert row["path"][-1]["node"] == row["label"] and len(row["path"]) in (1, 2)


def test_dashboard_shows_the_path_and_the_app_executes(hier_project, held_out, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from toolkit.ui.apps import write_apps
    from toolkit.ui.dashboard import ClassifierDashboard

    board = ClassifierDashboard("fashion-items", hier_project / "settings.ini")
    photo = sorted((held_out / "pants").iterdir())[0]
    (result,) = board.handle_files([{"name": photo.name, "content": photo.read_bytes()}])
    assert 'class="toolkit-path"' in result.preds.value and result.label in board.classes
    assert "accuracy per level" in board.card.value
    result.right.value = "bottoms/pants"  # feedback on a path lands in nested folders, trainable as is
    saved = result.save_feedback()
    assert saved.parent == hier_project / "feedback" / "fashion-items" / "bottoms" / "pants"
    result.right.value = "bottoms/../x"
    with pytest.raises(ToolkitError, match="a path such as tops/shirt"):
        result.save_feedback()
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.delenv("TOOLKIT_SETTINGS", raising=False)
    generated = next(p for p in write_apps(hier_project / "settings.ini") if p.name == "fashion-items.ipynb")
    nb = nbformat.read(REPO / "apps" / "fashion-items.ipynb", as_version=4)  # the project's app, as committed
    assert nb.cells[0].source == nbformat.read(generated, as_version=4).cells[0].source
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(generated.parent)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    bundles = [o.get("data", {}) for o in outputs if o.output_type == "execute_result"]
    assert any("application/vnd.jupyter.widget-view+json" in b for b in bundles), outputs


def test_sweep_of_a_hierarchical_classifier_logs_each_level(hier_project):
    from toolkit.stages.sweep import sweep

    spec = load_settings(hier_project / "settings.ini").get("fashion-items")
    (row,) = sweep(spec, "size=48", progress=False, log=lambda line: None)
    assert row["combo"] == "size=48" and float(row["level1_accuracy"]) >= float(row["level2_accuracy"])
    folder = hier_project / "models" / "fashion-items" / "sweep"
    assert "level1_accuracy | level2_accuracy" in (folder / "sweep.md").read_text()
    assert json.loads((folder / "size=48" / "model.json").read_text())["task"] == "hierarchical"


def test_clean_top_losses_speak_in_class_folders(hier_project):
    from toolkit.stages.clean.rank import list_raw_images, top_losses

    spec = load_settings(hier_project / "settings.ini").get("fashion-items")
    raw = list_raw_images(spec)
    rows = top_losses(spec, raw)
    assert len(rows) == len(raw.files) == 5 * (28 + 8)
    assert {r["given"] for r in rows} == set(FOLDERS) and {r["predicted"] for r in rows} <= set(FOLDERS)
