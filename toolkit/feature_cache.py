"""Pooled body features on disk, for `toolkit train NAME --head-only`: one row per image, keyed by
the image's sha256, in memory-mapped .npy files under models/NAME/features/<key>/, where <key>
hashes the backbone, the image size, the normalisation and the body's weights (a new full training
changes the body, so it gets a new folder). A later run computes rows only for images the cache has
not seen (a cleaning pass that relabels or deletes images computes nothing; new images only
themselves). Writes are atomic: new .npy files under new names, then index.json renamed into place,
then the old files removed, so a crash leaves the old cache or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core import artifacts

INDEX = "index.json"
CHUNK_ROWS = 4096  # rows copied at a time when the cache grows (memory bounded as data grows)


def body_digest(body: Any) -> str:
    """sha256 over the body's tensors (names, shapes, bytes): the features' dependence on weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(body.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Rows of (plain, mirrored) pooled body features by image sha256, in `root`/<key hash>/."""

    def __init__(self, root: Path, key: dict[str, Any]):
        self.key = key
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / f"{key.get('arch', 'body')}-{key.get('size', '')}-{name}"
        index = artifacts.read_json(self.folder / INDEX)
        self.rows: dict[str, int] = index.get("rows", {}) if index.get("key") == key else {}
        self.files: dict[str, str] = index.get("files", {}) if self.rows else {}

    def missing(self, shas: Sequence[str]) -> list[str]:
        """The distinct sha256s that have no row yet, in first-seen order."""
        return [s for s in dict.fromkeys(shas) if s not in self.rows]

    def _arrays(self) -> dict[str, np.ndarray]:
        return {kind: np.load(self.folder / name, mmap_mode="r") for kind, name in self.files.items()}

    def add(self, shas: Sequence[str], plain: np.ndarray, flip: np.ndarray) -> None:
        """Append rows for `shas` (new ones): new files beside the old, index renamed in, old removed."""
        if not len(shas):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        old = self._arrays()
        n_old = len(self.rows)
        n_new = n_old + len(shas)
        files = {}
        for kind, new_rows in (("plain", plain), ("flip", flip)):
            name = f"{kind}-{n_new}-{hashlib.sha256(''.join(shas).encode()).hexdigest()[:8]}.npy"
            tmp = self.folder / f".{name}.tmp"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_new, new_rows.shape[1]))
            for start in range(0, n_old, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, n_old)
                out[start:stop] = old[kind][start:stop]
            out[n_old:] = new_rows
            out.flush()
            del out
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.folder / name)
            files[kind] = name
        rows = dict(self.rows)
        rows.update({sha: n_old + i for i, sha in enumerate(shas)})
        artifacts.write_json(self.folder / INDEX, {"key": self.key, "files": files, "rows": rows})
        stale = set(self.files.values()) - set(files.values())
        self.rows, self.files = rows, files
        del old
        for name in stale:
            (self.folder / name).unlink(missing_ok=True)

    def get(self, shas: Sequence[str], kind: str = "plain") -> np.ndarray:
        """Rows of `shas` (all present) as one in-memory float32 array."""
        array = self._arrays()[kind]
        return np.asarray(array[np.array([self.rows[s] for s in shas], dtype=np.int64)], dtype=np.float32)
