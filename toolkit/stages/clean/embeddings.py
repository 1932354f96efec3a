"""Pretrained-backbone embeddings, batched, cached on disk by file sha256 + backbone + size.

Inputs are prepared exactly like training: `load_squished` (squish to size x size) and the
backbone's mean/std. Features are the body's output, global-average pooled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from toolkit.core.images import load_squished, perceptual_hash, sha256_file

DEFAULT_SIZE = 128


def cache_path(cache_dir: Path, arch: str, size: int) -> Path:
    return Path(cache_dir) / f"embeddings-{arch}-{size}.npz"


def _read_cache(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, phashes = data["sha256"].tolist(), data["phash"].tolist()
            return {h: (e, p) for h, e, p in zip(keys, data["embeddings"], phashes, strict=True)}
    except Exception:  # a damaged cache is rebuilt, never trusted
        return {}


def _write_cache(path: Path, entries: dict[str, tuple[np.ndarray, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(entries)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, sha256=np.array(keys), embeddings=np.stack([entries[k][0] for k in keys]).astype(np.float32),
             phash=np.array([entries[k][1] for k in keys]))
    os.replace(tmp, path)


def _model(arch: str):
    import torch

    from toolkit.core.backbones import get_backbone

    backbone = get_backbone(arch)
    body = backbone.create_body(pretrained=True).eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return body, mean, std


def _decode(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    from PIL import Image

    try:
        array = load_squished(path, size)
    except Exception:
        return None, ""
    return array, perceptual_hash(Image.fromarray(array))


def compute_embeddings(
    files: Sequence[Path],
    *,
    arch: str = "efficientnet_lite0",
    size: int = DEFAULT_SIZE,
    cache_dir: Path | None = None,
    bs: int = 32,
    hashes: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """(N, features) L2-normalised float32 embeddings, perceptual hashes and sha256 per file.

    Files that cannot be decoded get a zero vector and an empty perceptual hash.
    """
    import torch

    files = [Path(f) for f in files]
    if hashes is None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            hashes = list(pool.map(sha256_file, files))
    hashes = list(hashes)
    path = cache_path(cache_dir, arch, size) if cache_dir else None
    cached = _read_cache(path) if path else {}
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    fresh: dict[str, tuple[np.ndarray, str]] = {}
    if todo:
        body, mean, std = _model(arch)
        threads = torch.get_num_threads()
        with ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode():
            for start in range(0, len(todo), bs):
                chunk = todo[start : start + bs]
                decoded = list(pool.map(lambda i: _decode(files[i], size), chunk))
                ok = [k for k, (a, _) in enumerate(decoded) if a is not None]
                feats = None
                if ok:
                    x = torch.from_numpy(np.stack([decoded[k][0] for k in ok])).permute(0, 3, 1, 2).float() / 255
                    feats = body((x - mean) / std).mean(dim=(2, 3))
                    feats = torch.nn.functional.normalize(feats, dim=1).numpy()
                n_features = feats.shape[1] if feats is not None else 1
                for k, i in enumerate(chunk):
                    array, phash = decoded[k]
                    if array is None:
                        fresh[hashes[i]] = (np.zeros(n_features, np.float32), "")
                    else:
                        fresh[hashes[i]] = (feats[ok.index(k)], phash)
                if progress:
                    progress(min(start + bs, len(todo)), len(todo))
        torch.set_num_threads(threads)
        if path:
            _write_cache(path, {**cached, **{h: v for h, v in fresh.items() if v[1]}})
    entries = {**cached, **fresh}
    dims = {entries[h][0].shape[0] for h in hashes if entries[h][1]}
    dim = dims.pop() if dims else 1
    emb = np.stack([entries[h][0] if entries[h][0].shape[0] == dim else np.zeros(dim, np.float32)
                    for h in hashes]) if hashes else np.zeros((0, dim), np.float32)
    return emb.astype(np.float32), [entries[h][1] for h in hashes], hashes
