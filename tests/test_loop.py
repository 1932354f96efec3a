"""Closing the loop (#15): "label next" ranks the pending feedback and the unlabelled images
(feedback/NAME/_unlabelled/) by the current model's uncertainty (1 - normalized margin) and spreads
them out on the embeddings, measured on real photos with the session's trained model. (The
end-to-end browser test of the loop is in test_dashboard.py, beside the server it reuses.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TINY_CLASSES
from PIL import Image

SIZE = 64  # embedding size for the test (the app passes its own)


def _uncertainty(probs: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2) / p1, written out again here (not the module's function) to check it."""
    top = np.sort(probs, axis=1)[:, ::-1]
    return 1 - (top[:, 0] - top[:, 1]) / top[:, 0]


@pytest.fixture(scope="module")
def loop_project(trained_project, tmp_path_factory, clothing_small):
    """A project beside the trained one (its model linked): 21 real unlabelled photos (12 of the
    model's 3 classes, 9 of 3 classes it never saw), 3 copies of the most uncertain one, 2 feedback
    items sent from a dashboard; and the model's measured uncertainty for each."""
    from toolkit.settings import load_settings
    from toolkit.stages.feedback import UNLABELLED, save_feedback
    from toolkit.tasks import cached_predictor

    root = tmp_path_factory.mktemp("loop")
    shutil.copy2(trained_project / "settings.ini", root / "settings.ini")
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(trained_project / "models" / "tiny", target_is_directory=True)
    spec = load_settings(root / "settings.ini").get("tiny")
    folder = spec.feedback_dir / UNLABELLED
    folder.mkdir(parents=True)
    picks = [(c, 4) for c in TINY_CLASSES] + [(c, 3) for c in ("hat", "dress", "outwear")]
    for label, n in picks:
        for photo in sorted((clothing_small / "validation" / label).iterdir())[:n]:
            shutil.copy2(photo, folder / f"{label}-{photo.name}")
    predictor = cached_predictor(spec.models_dir)
    files = sorted(folder.iterdir())
    unc = _uncertainty(predictor.predict_images([Image.open(f).convert("RGB") for f in files]))
    most = files[int(np.argmax(unc))]
    for i in range(3):
        shutil.copy2(most, folder / f"copy{i}-{most.name}")
    for label, index in (("shoes", 9), ("pants", 9)):
        photo = sorted((clothing_small / "validation" / label).iterdir())[index]
        save_feedback(spec.feedback_dir, Image.open(photo), label, photo.name, {"shoes": 0.5, "pants": 0.3,
                                                                                  "t-shirt": 0.2})
    return spec, most


def test_label_next_puts_uncertain_and_diverse_images_first(loop_project):
    from toolkit.stages.clean.embeddings import compute_embeddings
    from toolkit.stages.feedback import UNLABELLED, label_next
    from toolkit.tasks import cached_predictor

    spec, most = loop_project
    order = label_next(spec, size=SIZE)
    assert len(order) == 21 + 3 + 2 and [r["rank"] for r in order] == list(range(1, 27))
    assert sum(r.get("unlabelled", False) for r in order) == 24 and all(r["status"] == "pending" for r in order)
    paths = [spec.feedback_dir / r["file"] for r in order]
    # the uncertainty it ranks by is the current model's, measured here again
    predictor = cached_predictor(spec.models_dir)
    unc = _uncertainty(predictor.predict_images([Image.open(p).convert("RGB") for p in paths]))
    assert np.allclose([r["uncertainty"] for r in order], unc, atol=1e-4)
    assert all(r["guess"] in TINY_CLASSES for r in order)
    group = {f"{UNLABELLED}/{most.name}", *(f"{UNLABELLED}/copy{i}-{most.name}" for i in range(3))}
    by_uncertainty = [order[i]["file"] for i in np.argsort(-unc, kind="stable")]
    assert set(by_uncertainty[:4]) == group  # uncertainty alone would show the same photo four times first
    assert order[0]["file"] in group  # the most uncertain image comes first ...
    assert sum(r["file"] in group for r in order[:13]) == 1  # ... and its copies not again in the first half
    n = 6
    top = unc[:n]
    # the first 6 are more uncertain than the typical image, and, the copies left aside, than the rest
    # (by how much depends on how confident the model trained happens to be)
    assert top.mean() > 2 * np.median(unc), (top, unc)
    others = np.array([u for r, u in zip(order, unc) if r["file"] not in group])
    assert others[:n].mean() > others[n:].mean(), others
    emb, _, _ = compute_embeddings(paths, arch=spec.arch, size=SIZE, cache_dir=spec.cleaned_dir / ".cache")
    emb = np.asarray(emb)

    def radius(chosen: list[int]) -> float:  # k-center cost: farthest image from the nearest shown one
        return float((1 - emb @ emb[chosen].T).min(axis=1).max())

    by_unc = list(np.argsort(-unc, kind="stable")[:n])
    assert radius(list(range(n))) < radius(by_unc)  # the first 6 cover the images better than uncertainty's 6
    # the labelled data counts: with the most uncertain photo already labelled, its group goes back
    again = label_next(spec, size=SIZE, reference=emb[[0]])
    assert again[0]["file"] not in group and sum(r["file"] in group for r in again[:13]) == 0


def test_feedback_tab_label_next_view_and_accepting_an_unlabelled_image(loop_project):
    """The feedback tab's "label next" view shows that order; accepting an unlabelled card (its label
    choice starts at the model's guess) imports it with its provenance and takes it off the list.
    The panel is driven for real; its owner is the part of the cleaning app it reads (spec,
    decisions, classes, size, its error box), without a ranking of raw images."""
    import json
    from types import SimpleNamespace

    import ipywidgets as W

    from toolkit.stages.clean.decisions import DecisionLog
    from toolkit.stages.feedback import label_next
    from toolkit.ui.clean_feedback import LABEL_NEXT, FeedbackPanel

    spec, _ = loop_project
    owner = SimpleNamespace(spec=spec, decisions=DecisionLog(spec.cleaned_dir), classes=list(TINY_CLASSES), size=SIZE,
                            error=W.HTML(""))
    panel = FeedbackPanel(owner)
    assert panel.n_pending == 26
    panel.order.value = LABEL_NEXT
    expected = label_next(spec, size=SIZE)
    assert [i["file"] for i in panel.items] == [r["file"] for r in expected]
    card = panel.list.children[0]
    caption, choice = card.children[1].value, card.children[2]
    assert "#1</span>" in caption and "no label" in caption and choice.value == expected[0]["guess"]
    card.children[3].children[0].click()  # accept with the model's guess
    assert "imported" in panel.message.value and owner.error.value == "", owner.error.value
    line = json.loads((spec.scrape_dir / "manifest.jsonl").read_text().splitlines()[-1])
    assert line["source"] == "unlabelled" and line["label"] == expected[0]["guess"] and line["time"]
    assert line["feedback_file"] == expected[0]["file"] and (spec.scrape_dir / line["file"]).is_file()
    assert panel.n_pending == 25 and expected[0]["file"] not in [i["file"] for i in panel.items]
