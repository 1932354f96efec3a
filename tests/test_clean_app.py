"""The cleaning app's parts without a browser: the embedding map and similarity search
(toolkit.stages.clean.explore) on real photo embeddings, feedback import, and the widget driven from
Python (background ranking, keys, map selection, feedback tab)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.stages.clean import explore


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_similar_streams_and_matches_the_full_product():
    rng = np.random.default_rng(3)
    emb = _unit(rng.normal(size=(1000, 32)).astype(np.float32))
    idx, sims = explore.similar(emb, 17, k=10, chunk=128)
    full = emb @ emb[17]
    full[17] = -np.inf
    expected = np.argsort(-full)[:10]
    assert list(idx) == list(expected)
    assert np.allclose(sims, full[expected], atol=1e-5)
    assert 17 not in idx and np.all(np.diff(sims) <= 1e-7)
    idx2, _ = explore.similar(emb, vector=emb[17], k=3, chunk=100)
    assert idx2[0] == 17  # a vector query keeps the row itself
    with pytest.raises(IndexError):
        explore.similar(emb, 1000, k=3)


def test_projection_separates_classes_and_box_selects_all_points():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(3, 64)))
    labels = np.repeat(np.arange(3), 400)
    emb = _unit(centres[labels] + 0.15 * rng.normal(size=(1200, 64))).astype(np.float32)
    coords = explore.project_2d(emb, fit_cap=300)
    assert coords.shape == (1200, 2) and coords.dtype == np.float32
    means = np.stack([coords[labels == c].mean(0) for c in range(3)])
    spread = max(coords[labels == c].std(0).max() for c in range(3))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread
    c0 = coords[labels == 0]
    box = explore.in_box(coords, (c0[:, 0].min(), c0[:, 0].max()), (c0[:, 1].max(), c0[:, 1].min()))
    assert set(np.flatnonzero(labels == 0)) <= set(box.tolist())
    drawn = explore.sample_points(1200, cap=100, include=[5, 1199])
    assert 100 <= len(drawn) <= 102 and {5, 1199} <= set(drawn.tolist())
    assert list(explore.sample_points(50, cap=100)) == list(range(50))


def test_label_next_prefers_uncertain_and_spread_out():
    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(300, 16)).astype(np.float32))
    emb[:20] = emb[0]  # 20 copies of one uncertain image
    probs = np.full((300, 3), [0.98, 0.01, 0.01])
    probs[:40] = [0.4, 0.3, 0.3]
    chosen = explore.label_next(probs, emb, k=10, pool=40)
    assert len(chosen) == 10 and all(i < 40 for i in chosen)
    assert sum(i < 20 for i in chosen) <= 2  # copies are not picked again and again
