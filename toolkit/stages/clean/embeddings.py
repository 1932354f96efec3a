"""Pretrained-backbone embeddings, batched, cached on disk by file sha256 + backbone + size.

Inputs are prepared exactly like training: `load_squished` (squish to size x size) and the
backbone's mean/std. A row is the body's output, global-average pooled and L2-normalised, followed by
the same for each of the backbone's `embedding_taps` (inner stages; Lite: the stride-16 and the first
stride-32 stage). `Embedded.embeddings` is the first part (unit rows: similarity, neighbours, the map,
duplicates); `Embedded.features` is the whole row, the input of the label-issue heads, where the inner
stages add +0.036 / +0.027 precision@k at 20% / 40% asymmetric noise on held-out seeds at no extra
forward cost (BENCHMARKS.md "clean: multi-stage embedding").

The cache (one per backbone and size, under `cache_dir`) is two append-only files, so memory stays
bounded as the data set grows and a later visit computes only the new images:

- `embeddings-ms-ARCH-SIZE.f32`: raw float32 rows, `dim` values each, opened with `np.memmap`;
- `embeddings-ms-ARCH-SIZE.index`: a header line `# dim=D`, then one line per row, in row order:
  `sha256 TAB phash TAB quality stats` (see `QUALITY_STATS`; computed from the same decoded thumbnail).

Rows are appended in chunks (data first, fsync, then the index lines, fsync) under an flock, so a
crash leaves at most a tail the next reader ignores (rows = complete index lines backed by data).
Older caches are not read: `embeddings-ARCH-SIZE.npz` (every row in one dict) and
`embeddings-ARCH-SIZE.f32` (the final features only, before the inner stages joined them).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.core.config import GENERIC_KEYS
from toolkit.core.images import load_squished, perceptual_hash, sha256_file

DEFAULT_SIZE = GENERIC_KEYS["clean_size"].default_value()  # a section's `clean_size` overrides it
FLUSH_ROWS = 1024  # rows appended to the cache at a time (bounds the memory of a long first visit)
# per image, from the size x size thumbnail (grey = ITU-R 601 luma), plus the file's own pixel size
QUALITY_STATS = ("brightness", "blur", "entropy", "colourfulness", "width", "height")


def cache_path(cache_dir: Path, arch: str, size: int) -> Path:
    """The float32 rows file of one backbone and size (its index is the same name with `.index`)."""
    return Path(cache_dir) / f"embeddings-ms-{arch}-{size}.f32"


def image_stats(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """QUALITY_STATS of one uint8 HWC RGB thumbnail: mean brightness 0..1, variance of the Laplacian
    (grey 0..255), grey-level entropy in bits (0..8), mean channel spread 0..1, file width, height."""
    rgb = array.astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    spread = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
              + np.abs(rgb[..., 0] - rgb[..., 2])).mean() / (3 * 255)
    return np.array([grey.mean() / 255, lap.var() if lap.size else 0.0, -(p * np.log2(p)).sum(), spread,
                     width, height], np.float32)


class Store:
    """The append-only cache of one backbone and size (see the module docstring)."""

    def __init__(self, cache_dir: Path, arch: str, size: int):
        self.data = cache_path(cache_dir, arch, size)
        self.index = self.data.with_suffix(".index")
        self.dim = 0
        self.rows: dict[str, int] = {}
        self.phash: list[str] = []
        self.stats: list[str] = []
        self._read()

    def _read(self) -> None:
        self.rows, self.phash, self.stats, self.dim = {}, [], [], 0
        if not (self.index.is_file() and self.data.is_file()):
            return
        try:
            with open(self.index, encoding="ascii") as handle:
                header = handle.readline()
                if not header.startswith("# dim=") or not header.endswith("\n"):
                    return
                self.dim = int(header[6:])
                backed = self.data.stat().st_size // (4 * self.dim)
                for line in handle:
                    if not line.endswith("\n") or len(self.phash) >= backed:
                        break  # a tail cut by a crash
                    sha, phash, stats = line.rstrip("\n").split("\t")
                    self.rows.setdefault(sha, len(self.phash))
                    self.phash.append(phash)
                    self.stats.append(stats)
        except (OSError, ValueError, UnicodeDecodeError):  # a damaged cache is rebuilt, never trusted
            self.rows, self.phash, self.stats, self.dim = {}, [], [], 0

    def matrix(self) -> np.ndarray:
        """Every stored row, memory-mapped read-only: (rows, dim) float32."""
        if not self.phash:
            return np.zeros((0, max(self.dim, 1)), np.float32)
        return np.memmap(self.data, dtype=np.float32, mode="r", shape=(len(self.phash), self.dim))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, shas: Sequence[str], feats: np.ndarray, phashes: Sequence[str], stats: np.ndarray) -> None:
        """Add rows (data, fsync, then index lines, fsync), after re-reading what another process added."""
        if not len(shas):
            return
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        with self._locked():
            self._read()
            if self.dim and self.dim != feats.shape[1]:
                self.rows, self.phash, self.stats, self.dim = {}, [], [], 0  # another backbone body: start again
            fresh = not self.dim
            if fresh:
                self.dim = feats.shape[1]
                tmp = self.index.with_name(self.index.name + f".tmp{os.getpid()}")
                tmp.write_text(f"# dim={self.dim}\n", encoding="ascii")
                with open(self.data, "wb"):
                    pass
                os.replace(tmp, self.index)
            n = len(self.phash)
            with open(self.data, "r+b") as handle:
                handle.truncate(n * 4 * self.dim)  # drop a tail no index line names
                handle.seek(0, os.SEEK_END)
                handle.write(feats.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            lines = []
            for sha, phash, row in zip(shas, phashes, stats, strict=True):
                text = ",".join(f"{v:.6g}" for v in row)
                lines.append(f"{sha}\t{phash}\t{text}\n")
                self.rows.setdefault(sha, len(self.phash))
                self.phash.append(phash)
                self.stats.append(text)
            with open(self.index, "r+b") as handle:
                for _ in range(n + 1):  # the header and the n rows read: a torn tail after them goes
                    handle.readline()
                end = handle.tell()
                handle.truncate(end)
                handle.seek(end)
                handle.write("".join(lines).encode("ascii"))
                handle.flush()
                os.fsync(handle.fileno())


def _model(arch: str):
    import torch

    from toolkit.core.backbones import get_backbone

    backbone = get_backbone(arch)
    body = backbone.create_body(pretrained=True).eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return body, mean, std


def _embedder(arch: str) -> Callable:
    """(N, 3, H, W) pixels 0..1 -> (N, D) float32 rows: the pooled final features, then each tap's, every
    part L2-normalised (see the module docstring)."""
    import torch

    from toolkit.core.backbones import TapBody, get_backbone

    body, mean, std = _model(arch)
    body = TapBody(body, get_backbone(arch).embedding_taps)  # (final map, tap maps...), as the multi-stage head

    def features(x: torch.Tensor) -> np.ndarray:
        parts = body((x - mean) / std)
        pooled = [torch.nn.functional.normalize(part.mean(dim=(2, 3)), dim=1) for part in parts]
        return torch.cat(pooled, dim=1).numpy()

    return features


def head_dim(arch: str) -> int:
    """How many leading columns of a cached row are the final features (`Embedded.embeddings`)."""
    from toolkit.core.backbones import get_backbone

    return get_backbone(arch).n_features


def _decode(path: Path, size: int) -> tuple[np.ndarray | None, str, np.ndarray | None]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
        array = load_squished(path, size)
    except Exception:
        return None, "", None
    return array, perceptual_hash(Image.fromarray(array)), image_stats(array, width, height)


@dataclass
class Embedded:
    """compute_embeddings' result with the per-image quality stats (row i = files[i]; NaN where undecodable).
    `embeddings`: the final features (unit rows); `features`: the whole rows, final then inner stages."""

    embeddings: np.ndarray
    phash: list[str]
    sha256: list[str]
    stats: np.ndarray
    features: np.ndarray | None = None


def embed(files: Sequence[Path], *, arch: str = "efficientnet_lite0", size: int = DEFAULT_SIZE,
          cache_dir: Path | None = None, bs: int = 32, hashes: Sequence[str] | None = None,
          progress: Callable[[int, int], None] | None = None, processes: int = 1) -> Embedded:
    """Embeddings, perceptual hashes, sha256 and quality stats per file; only images not in the cache are
    decoded and run through the backbone. Without `cache_dir` the store lives in a temporary folder.
    `processes` > 1 shards the new images across that many processes (each appends to the same store
    under its lock; see `_compute_sharded`)."""
    import tempfile

    files = [Path(f) for f in files]
    if hashes is None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            hashes = list(pool.map(sha256_file, files))
    hashes = list(hashes)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="toolkit-emb-") as tmp:
            out = embed(files, arch=arch, size=size, cache_dir=Path(tmp), bs=bs, hashes=hashes, progress=progress,
                        processes=processes)
            full = np.array(out.features)
            return Embedded(full[:, : out.embeddings.shape[1]], out.phash, out.sha256, out.stats, full)
    store = Store(cache_dir, arch, size)
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h not in store.rows:
            first.setdefault(h, i)
    todo = list(first.values())
    if todo and processes > 1 and len(todo) >= 2 * bs:
        _compute_sharded(files, hashes, todo, store, arch, size, bs, progress, processes)
    elif todo:
        _compute(files, hashes, todo, store, arch, size, bs, progress)
    mat = store.matrix()
    rows = np.array([store.rows.get(h, -1) for h in hashes], dtype=np.int64)
    n, dim = len(hashes), mat.shape[1]
    if n and rows[0] >= 0 and (rows == np.arange(rows[0], rows[0] + n)).all():
        emb = mat[rows[0] : rows[0] + n]  # the common case (same files, same order): no copy at all
    else:
        emb = np.zeros((n, dim), np.float32)
        for start in range(0, n, 4096):  # gather in chunks: no index array over the whole matrix twice
            part = rows[start : start + 4096]
            ok = part >= 0
            emb[start : start + 4096][ok] = mat[part[ok]]
    stats = np.full((n, len(QUALITY_STATS)), np.nan, np.float32)
    for i, r in enumerate(rows):
        if r >= 0:
            stats[i] = np.array(store.stats[r].split(","), np.float32)
    final = emb[:, : min(head_dim(arch), dim)]  # a view: no copy
    return Embedded(final, [store.phash[r] if r >= 0 else "" for r in rows], hashes, stats, emb)


def _compute(files: list[Path], hashes: list[str], todo: list[int], store: Store, arch: str, size: int, bs: int,
             progress: Callable[[int, int], None] | None) -> None:
    import torch

    features = _embedder(arch)
    threads = torch.get_num_threads()
    pending: tuple[list[str], list[np.ndarray], list[str], list[np.ndarray]] = ([], [], [], [])

    def flush() -> None:
        if pending[0]:
            store.append(pending[0], np.stack(pending[1]), pending[2], np.stack(pending[3]))
            for part in pending:
                part.clear()

    try:
        with ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode():
            for start in range(0, len(todo), bs):
                chunk = todo[start : start + bs]
                decoded = list(pool.map(lambda i: _decode(files[i], size), chunk))
                ok = [k for k, d in enumerate(decoded) if d[0] is not None]
                if ok:
                    x = torch.from_numpy(np.stack([decoded[k][0] for k in ok])).permute(0, 3, 1, 2).float() / 255
                    feats = features(x)
                    for j, k in enumerate(ok):
                        pending[0].append(hashes[chunk[k]])
                        pending[1].append(feats[j])
                        pending[2].append(decoded[k][1])
                        pending[3].append(decoded[k][2])
                if len(pending[0]) >= FLUSH_ROWS:
                    flush()
                if progress:
                    progress(min(start + bs, len(todo)), len(todo))
        flush()
    finally:
        torch.set_num_threads(threads)


def _shard_worker(files: list[str], hashes: list[str], cache_dir: str, arch: str, size: int, bs: int,
                  threads: int) -> None:
    """One shard, in a process of its own: embed every file given and append it to the shared store."""
    import torch

    torch.set_num_threads(threads)
    store = Store(Path(cache_dir), arch, size)
    _compute([Path(f) for f in files], hashes, list(range(len(files))), store, arch, size, bs, None)


def _compute_sharded(files: list[Path], hashes: list[str], todo: list[int], store: Store, arch: str, size: int,
                     bs: int, progress: Callable[[int, int], None] | None, processes: int) -> None:
    """The new images in `processes` interleaved shards: shard 0 here (it reports progress, scaled to
    the whole), the others in spawned processes, each with its share of the CPU threads; the store's
    lock serialises their appends. A failed shard is one error line; its finished rows stay cached."""
    import multiprocessing

    import torch

    from toolkit.core.errors import ToolkitError

    threads = max(1, (os.cpu_count() or 1) // processes)
    shards = [todo[k::processes] for k in range(processes)]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    workers = [context.Process(target=_shard_worker, name=f"embed-shard-{k}",
                               args=([str(files[i]) for i in shard], [hashes[i] for i in shard],
                                     str(store.data.parent), arch, size, bs, threads))
               for k, shard in enumerate(shards[1:], start=1)]
    for worker in workers:
        worker.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scaled = (lambda done, total: progress(min(done * processes, len(todo)), len(todo))) if progress else None
        _compute(files, hashes, shards[0], store, arch, size, bs, scaled)
    finally:
        torch.set_num_threads(before)
        for worker in workers:
            worker.join()
    failed = [w.name for w in workers if w.exitcode != 0]
    if failed:
        raise ToolkitError(f"embedding shard(s) {', '.join(failed)} failed; run the report again (finished rows "
                           "are cached) or with --processes 1")
    store._read()  # the rows the other shards appended
    if progress:
        progress(len(todo), len(todo))


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
    """(N, features) L2-normalised float32 embeddings (the final features; possibly memory-mapped, read-only),
    perceptual hashes and sha256 per file. Files that cannot be decoded get a zero vector and an empty
    perceptual hash."""
    out = embed(files, arch=arch, size=size, cache_dir=cache_dir, bs=bs, hashes=hashes, progress=progress)
    return out.embeddings, out.phash, out.sha256
