"""Exploring the cached embeddings: a 2D map, "more like this", and what to label next.

Pure functions over an (n, d) array whose row i is raw image i (`Rankings.embeddings`, L2-normalised;
a memory-mapped array works too): nothing here builds an n x n matrix, so memory stays bounded at
60,000 images and more.

- `project_2d`: PCA (scikit-learn, randomized SVD) fitted on at most `fit_cap` rows, applied to all
  rows in chunks. Why not UMAP: umap-learn pulls numba and llvmlite and JIT-compiles on its first
  call in every kernel (tens of seconds on 2 cores), which breaks the "paint at once" goal; PCA of
  60,000 x 512 takes about a second (BENCHMARKS.md).
- `sample_points`: the points to draw (a seeded sample, capped), so the browser draws a few thousand
  SVG points while a box selection still covers every image (`in_box` on all coordinates).
- `similar`: cosine similarity to one row (or a vector) streamed in chunks, top k by argpartition.
- `farthest_points` / `label_next`: uncertainty (low top probability) times diversity (greedy
  farthest-point over the embeddings), for an active-learning queue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FIT_CAP = 20_000  # rows PCA is fitted on; every row is projected
CHUNK = 8_192  # rows per streamed block
PLOT_CAP = 3_000  # points drawn in the map


def _rows(embeddings: np.ndarray, start: int, stop: int) -> np.ndarray:
    block = np.asarray(embeddings[start:stop], dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def project_2d(embeddings: np.ndarray, *, seed: int = 0, fit_cap: int = FIT_CAP) -> np.ndarray:
    """(n, 2) float32 coordinates: PCA fitted on at most `fit_cap` rows (seeded sample), all rows projected."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n = len(embeddings)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n < 3:
        return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, dtype=np.float32)])
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, size=min(n, fit_cap), replace=False))
    with threadpool_limits(1):  # small products: one BLAS thread is fastest on a busy machine
        pca = PCA(n_components=2, svd_solver="randomized", random_state=seed)
        pca.fit(np.asarray(embeddings[fit_idx], dtype=np.float32))
        out = np.empty((n, 2), dtype=np.float32)
        for start in range(0, n, CHUNK):
            out[start : start + CHUNK] = pca.transform(np.asarray(embeddings[start : start + CHUNK], dtype=np.float32))
    return out


def sample_points(n: int, cap: int = PLOT_CAP, *, seed: int = 0, include: Sequence[int] = ()) -> np.ndarray:
    """Sorted indices of the points to draw: all when n <= cap, else a seeded sample plus `include`."""
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(n, size=cap, replace=False).tolist()) | {int(i) for i in include if 0 <= i < n}
    return np.array(sorted(chosen), dtype=int)


def in_box(coords: np.ndarray, x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the points inside the box x[0]..x[1], y[0]..y[1] (either order)."""
    x0, x1 = sorted(float(v) for v in x)
    y0, y1 = sorted(float(v) for v in y)
    inside = (coords[:, 0] >= x0) & (coords[:, 0] <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] <= y1)
    return np.flatnonzero(inside)


def similar(embeddings: np.ndarray, index: int | None = None, k: int = 50, *, vector: np.ndarray | None = None,
            chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of the k rows most like row `index` (itself excluded) or like
    `vector`, most similar first; streamed in chunks, no n x n matrix."""
    n = len(embeddings)
    if vector is None:
        if index is None or not 0 <= index < n:
            raise IndexError(f"row {index} is not among the {n} embeddings")
        query = _rows(embeddings, index, index + 1)[0]
    else:
        query = np.asarray(vector, dtype=np.float32).ravel()
        query = query / max(float(np.linalg.norm(query)), 1e-12)
    k = max(0, min(k, n - (1 if vector is None else 0)))
    best_idx = np.empty(0, dtype=int)
    best_sim = np.empty(0, dtype=np.float32)
    for start in range(0, n, chunk):
        sims = _rows(embeddings, start, start + chunk) @ query
        idx = np.arange(start, start + len(sims))
        if vector is None and start <= index < start + len(sims):
            keep = idx != index
            sims, idx = sims[keep], idx[keep]
        best_idx = np.concatenate([best_idx, idx])
        best_sim = np.concatenate([best_sim, sims.astype(np.float32)])
        if len(best_sim) > k:
            top = np.argpartition(-best_sim, k - 1)[:k] if k else np.empty(0, dtype=int)
            best_idx, best_sim = best_idx[top], best_sim[top]
    order = np.lexsort((best_idx, -best_sim))
    return best_idx[order], best_sim[order]


def farthest_points(embeddings: np.ndarray, candidates: Sequence[int], k: int, *,
                    weights: np.ndarray | None = None, seed: int = 0) -> list[int]:
    """Greedy farthest-point selection of k of `candidates` (cosine distance); with `weights`, each
    step takes the candidate with the largest weight x distance to those already picked."""
    cand = np.asarray(list(candidates), dtype=int)
    if len(cand) == 0 or k <= 0:
        return []
    emb = np.asarray(embeddings[cand], dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    w = np.ones(len(cand)) if weights is None else np.asarray(weights, dtype=float)
    first = int(np.argmax(w)) if weights is not None else int(np.random.default_rng(seed).integers(len(cand)))
    picked = [first]
    dist = 1.0 - emb @ emb[first]
    dist[first] = -np.inf
    while len(picked) < min(k, len(cand)):
        nxt = int(np.argmax(w * dist))
        picked.append(nxt)
        dist = np.minimum(dist, 1.0 - emb @ emb[nxt])
        dist[picked] = -np.inf
    return [int(cand[i]) for i in picked]


def label_next(probs: np.ndarray, embeddings: np.ndarray, k: int = 24, *, pool: int = 500) -> list[int]:
    """Rows to label next: the `pool` least certain (lowest top probability), then k of them spread
    out by farthest-point selection weighted by uncertainty (1 - max probability)."""
    probs = np.asarray(probs, dtype=float)
    if len(probs) == 0:
        return []
    top = probs.max(axis=1)
    order = np.argsort(top, kind="stable")[: max(k, min(pool, len(top)))]
    return farthest_points(embeddings, order, k, weights=1.0 - top[order])
