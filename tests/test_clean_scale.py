"""The cleaning report stays bounded as data grows: near-duplicates from the kNN graph (no all-pairs
matrix), planted exact and near copies found among 3,000 real Fashion-MNIST images, and the
embeddings cache appends only new images and ignores a tail cut by a crash."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_subset
from PIL import Image

from toolkit.core.images import perceptual_hash

N = 3000


@pytest.fixture(scope="module")
def fashion():
    """3,000 real Fashion-MNIST training images (raw pixels, L2-normalised, as the embeddings) with 20
    planted exact copies and 20 near copies (pixels +-3 grey levels: a re-encode)."""
    from toolkit.stages.scrape.fashion_mnist import FASHION_MNIST_DIR, load_split

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    images, labels = load_split("train")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(images), N - 40, replace=False)
    pixels = [images[i] for i in pick]
    names = [str(int(labels[i])) for i in pick]
    sha = [f"sha{i}" for i in range(len(pixels))]
    exact, near = [], []
    for j, src in enumerate(rng.choice(len(pixels) - 40, 40, replace=False)):
        src = int(src)
        if j < 20:
            pixels.append(pixels[src].copy())
            sha.append(sha[src])
            exact.append((src, len(pixels) - 1))
        else:
            noise = rng.integers(-3, 4, pixels[src].shape)
            pixels.append(np.clip(pixels[src].astype(int) + noise, 0, 255).astype(np.uint8))
            sha.append(f"near{j}")
            near.append((src, len(pixels) - 1))
        names.append(names[src])
    emb = np.stack(pixels).reshape(N, -1).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    phash = [perceptual_hash(Image.fromarray(p).resize((64, 64))) for p in pixels]
    return {"emb": emb, "labels": names, "sha": sha, "phash": phash, "exact": exact, "near": near}


def test_duplicates_and_outliers_without_an_all_pairs_matrix(fashion):
    from threadpoolctl import threadpool_limits

    from toolkit.stages.clean.neighbours import knn_graph
    from toolkit.stages.clean.rank import duplicate_groups, outlier_table

    emb = fashion["emb"]
    rel = [f"{lab}/{i}.png" for i, lab in enumerate(fashion["labels"])]
    splits = ["valid" if i % 5 == 0 else "train" for i in range(N)]
    classes = sorted(set(fashion["labels"]))
    probs = np.full((N, len(classes)), 1 / len(classes))
    tracemalloc.start()
    with threadpool_limits(1):
        graph = knn_graph(emb)
        groups = duplicate_groups(rel, fashion["labels"], splits, fashion["sha"], fashion["phash"], emb,
                                  neighbours=graph, min_cosine=0.995)  # raw pixels: closer than embeddings
        outliers = outlier_table(rel, fashion["labels"], classes, emb, probs, splits, neighbours=graph)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    all_pairs = N * N * 4  # one float32 n x n similarity matrix: 36 MB
    assert peak < all_pairs / 3, f"peak traced memory {peak / 1e6:.1f} MB: an n x n matrix is being built"
    assert graph.index.shape == (N, 10) and (graph.index != np.arange(N)[:, None]).all()
    member = {f: g for g in groups for f in g["files"]}
    for kind in ("exact", "near"):
        for a, b in fashion[kind]:
            group = member.get(rel[a])
            assert group is not None and rel[b] in group["files"], f"{kind} copy {rel[b]} of {rel[a]} not grouped"
            if kind == "exact":
                assert group["kind"] == "exact" or len(group["files"]) > 2
    in_groups = sum(len(g["files"]) for g in groups)
    assert in_groups < N * 0.2, f"{in_groups} of {N} images in duplicate groups: the threshold is too loose"
    assert len(outliers) == N and 0 < sum(r["outlier"] for r in outliers) < N * 0.2


def test_the_cache_appends_new_images_and_ignores_a_torn_tail(tmp_path, clothing_small):
    from toolkit.stages.clean import embeddings
    from toolkit.stages.clean.embeddings import Store, embed

    files = sorted(copy_subset(clothing_small / "train", tmp_path / "raw", ["hat", "shoes"], 6).rglob("*.jpg"))
    cache = tmp_path / "cache"
    first = embed(files[:8], size=64, cache_dir=cache)
    assert isinstance(first.embeddings, np.memmap) and first.embeddings.shape == (8, 1280)
    assert not np.isnan(first.stats).any()
    store = Store(cache, "efficientnet_lite0", 64)
    assert len(store.rows) == 8
    with open(store.index, "a", encoding="ascii") as handle:  # a crash in the middle of an index line
        handle.write("deadbeef\tffff")
    computed = []
    real_model = embeddings._model
    embeddings._model = lambda arch: computed.append(arch) or real_model(arch)
    try:
        both = embed(files, size=64, cache_dir=cache)
    finally:
        embeddings._model = real_model
    assert computed == ["efficientnet_lite0"], "the model ran once, for the 4 new images"
    assert Store(cache, "efficientnet_lite0", 64).data.stat().st_size == 12 * (1280 + 112 + 192) * 4
    assert np.allclose(both.embeddings[:8], first.embeddings, atol=1e-5) and both.phash[:8] == first.phash
    again = embed(list(reversed(files)), size=64, cache_dir=cache)  # reordered: gathered, same rows
    assert np.allclose(np.asarray(again.embeddings)[::-1], both.embeddings, atol=1e-5)
    assert [Path(f).name for f in files] and len(Store(cache, "efficientnet_lite0", 64).rows) == 12


def test_two_processes_embed_the_same_rows_as_one(tmp_path, clothing_small):
    """--processes 2: the new images are embedded in two shards (one of them a spawned process), both
    appending to the same store under its lock; the result equals one process's, row for row."""
    from toolkit.stages.clean.embeddings import Store, embed

    files = sorted(copy_subset(clothing_small / "train", tmp_path / "raw", ["hat", "shoes"], 20).rglob("*.jpg"))
    seen = []
    two = embed(files, size=64, bs=8, cache_dir=tmp_path / "two", processes=2,
                progress=lambda done, total: seen.append((done, total)))
    one = embed(files, size=64, bs=8, cache_dir=tmp_path / "one")
    assert len(Store(tmp_path / "two", "efficientnet_lite0", 64).rows) == len(files) == 40
    assert np.allclose(np.asarray(two.embeddings), np.asarray(one.embeddings), atol=1e-4)
    assert two.phash == one.phash and seen[-1] == (40, 40)


def test_the_hnsw_index_finds_the_exact_searchs_neighbours(fashion):
    """Above EXACT_UP_TO images the kNN graph comes from a faiss HNSW index: forced here on the 3,000
    images, it agrees with the exact search (recall@10) and finds every planted copy."""
    pytest.importorskip("faiss")
    from toolkit.stages.clean.neighbours import knn_graph

    emb = fashion["emb"]
    exact = knn_graph(emb, exact_up_to=10**9)
    approx = knn_graph(emb, exact_up_to=0)
    recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact.index, approx.index, strict=True)])
    assert recall > 0.95, f"HNSW recall@10 {recall:.3f}"
    assert (approx.index != np.arange(N)[:, None]).all() and (np.diff(approx.cosine, axis=1) <= 1e-6).all()
    for a, b in fashion["exact"] + fashion["near"]:
        assert b in approx.index[a] or a in approx.index[b], f"planted copy {b} of {a} not a neighbour"
