"""Finding a classifier's images, splitting them, and fastai DataLoaders over a decoded cache.

Layouts understood (DIR is `--data`, the `data` key, `cleaned_data/NAME` or `scrape/NAME`):
  DIR/<class>/<image>                          -> split by the `split` rule
  DIR/train/<class>/ + DIR/valid|validation|val/<class>/  -> the data set's own validation set
Images are verified first; bad files are reported and left out, never modified.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.core.images import BadImage, is_image_name, open_image, sha256_file, verify_images
from toolkit.core.progress import progress_iter
from toolkit.settings import ClassifierSpec

VALID_FOLDER_NAMES = ("valid", "validation", "val")


@dataclass
class Dataset:
    """Labelled image files and which of them are held out for validation."""

    root: Path
    files: list[Path]
    labels: list[str]
    is_valid: list[bool]
    classes: list[str]
    bad: list[BadImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        return len(self.files) - sum(self.is_valid)

    @property
    def n_valid(self) -> int:
        return sum(self.is_valid)

    def subset(self, valid: bool) -> tuple[list[Path], list[str]]:
        picked = [(f, y) for f, y, v in zip(self.files, self.labels, self.is_valid) if v == valid]
        return [f for f, _ in picked], [y for _, y in picked]


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def list_labelled_images(folder: Path, nested: bool = False) -> tuple[list[Path], list[str]]:
    """Files of `folder/<class>/...`, sorted. Nested folders count for their top class, or with
    `nested` (task = hierarchical) are the label path: `shoes/female/sandals/x.jpg` ->
    `shoes/female/sandals`."""
    files, labels = [], []
    for class_dir in _class_folders(folder):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and is_image_name(path):
                files.append(path)
                labels.append(path.parent.relative_to(folder).as_posix() if nested else class_dir.name)
    return files, labels


def find_data_dir(spec: ClassifierSpec, data: Path | None = None) -> Path:
    """--data, else the `data` key, else cleaned_data/NAME, else scrape/NAME."""
    candidates = [Path(data).resolve()] if data else []
    if not candidates and spec.data_dir:
        candidates = [spec.data_dir]
    if not candidates:
        candidates = [spec.cleaned_dir, spec.scrape_dir]
    for folder in candidates:
        if folder.is_dir() and _class_folders(folder):
            return folder
    if data or spec.data_dir:
        raise ToolkitError(f"data folder {candidates[0]} has no class folders (expected DIR/<class>/<image>)")
    raise ToolkitError(
        f"no images for [{spec.name}] in {spec.cleaned_dir} or {spec.scrape_dir}: "
        f"run `toolkit scrape {spec.name}` or pass --data DIR"
    )


def _valid_folder(root: Path) -> Path | None:
    for name in VALID_FOLDER_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def _split_random(n: int, fraction: float, seed: int) -> list[bool]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(n * fraction))]) if n > 1 else set()
    return [i in held for i in range(n)]


def _split_groups(files: Sequence[Path], pattern: str, fraction: float, seed: int) -> list[bool]:
    regex = re.compile(pattern)
    groups = []
    for path in files:
        match = regex.search(path.name)
        if not match:
            raise ToolkitError(f"split group:{pattern} does not match file {path}; fix the regex in settings.ini")
        groups.append(match.group(1))
    names = sorted(set(groups))
    held = {names[i] for i, v in enumerate(_split_random(len(names), fraction, seed)) if v}
    return [g in held for g in groups]


def _leak_warning(files: Sequence[Path], is_valid: Sequence[bool]) -> str | None:
    """Identical files in train and valid make validation figures lie: say how many."""
    by_hash: dict[str, set[bool]] = defaultdict(set)
    hashes = {}
    for path, valid in zip(files, is_valid):
        digest = hashes[path] = sha256_file(path)
        by_hash[digest].add(valid)
    leaks = [d for d, sides in by_hash.items() if len(sides) == 2]
    if not leaks:
        return None
    examples = [str(p) for p in files if hashes[p] == leaks[0]][:2]
    return (f"{len(leaks)} identical file(s) are in both train and valid (e.g. {' and '.join(examples)}); "
            "validation accuracy is optimistic: remove them with `toolkit clean`")


def load_dataset(spec: ClassifierSpec, data: Path | None = None, *, progress: bool = True) -> Dataset:
    """Find, verify and split the classifier's images; bad files are listed and left out."""
    root = find_data_dir(spec, data)
    train_root = root / "train" if (root / "train").is_dir() else None
    valid_root = _valid_folder(root)
    nested = spec.task == "hierarchical" and not spec.hierarchy
    if train_root and valid_root and spec.split in ("auto", "folder"):
        train_files, train_labels = list_labelled_images(train_root, nested)
        valid_files, valid_labels = list_labelled_images(valid_root, nested)
        files = train_files + valid_files
        labels = train_labels + valid_labels
        is_valid = [False] * len(train_files) + [True] * len(valid_files)
    else:
        if spec.split == "folder":
            raise ToolkitError(f"split = folder but {root} has no train/ and valid/ folders")
        files, labels = list_labelled_images(train_root or root, nested)
        is_valid = []
    if spec.classes:
        known = set(spec.classes)
        keep = [i for i, y in enumerate(labels) if y in known]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if is_valid:
            is_valid = [is_valid[i] for i in keep]
        missing = known - set(labels)
        if missing:
            raise ToolkitError(f"[{spec.name}] classes {sorted(missing)} have no images in {root}")
    if not files:
        raise ToolkitError(f"no image files in {root} (expected {root}/<class>/<image>)")
    if spec.task == "hierarchical":  # labels become paths such as tops/shirt
        from toolkit.hierarchy import check_paths, to_paths

        if spec.hierarchy:
            labels = to_paths(labels, spec.hierarchy, f"[{spec.name}] hierarchy ({root})")
        try:
            check_paths(labels)
        except ValueError as exc:
            raise ToolkitError(f"[{spec.name}] {root}: {exc}") from None

    good, bad = verify_images(files, progress=progress)
    good_set = set(good)
    keep = [i for i, f in enumerate(files) if f in good_set]
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    if is_valid:
        is_valid = [is_valid[i] for i in keep]
    else:
        fraction = float(spec.split.split(":", 1)[1]) if spec.split.startswith("random:") else spec.valid_pct
        if spec.split.startswith("group:"):
            is_valid = _split_groups(files, spec.split.split(":", 1)[1], spec.valid_pct, spec.seed)
        else:
            is_valid = _split_random(len(files), fraction, spec.seed)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ToolkitError(f"[{spec.name}] needs at least 2 classes with images in {root}; found {classes}")
    dataset = Dataset(root, files, labels, is_valid, classes, bad)
    leak = _leak_warning(files, is_valid)
    if leak:
        dataset.warnings.append(leak)
    return dataset


def count_by_class(labels: Sequence[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))


# ---------------------------------------------------------------- decoding, once


def load_resized(path: Path, size: int) -> np.ndarray:
    """The image squished to size x size (uint8 HWC): what training and prediction both see."""
    img = open_image(path, draft_size=size)
    return np.asarray(img.resize((size, size), Image.BILINEAR))


class DecodedCache:
    """Images decoded and resized once, kept in memory: each epoch then costs no JPEG decoding."""

    def __init__(self, files: Sequence[Path], size: int, *, progress: bool = True, threads: int = 2):
        self.size = size
        with ThreadPoolExecutor(max_workers=threads) as pool:
            arrays = pool.map(lambda p: load_resized(p, size), files)
            self.arrays = dict(zip(files, progress_iter(arrays, len(files), f"decoding at {size}px", progress)))


_CACHES: dict[int, DecodedCache] = {}


class CachedImage:
    """A picklable get_x: path -> fastai PILImage from a cache (decodes the file if not cached)."""

    def __init__(self, cache: DecodedCache | None, size: int):
        self.key = id(cache) if cache else None
        self.size = size
        if cache is not None:
            _CACHES[self.key] = cache

    def __call__(self, path: Path):
        from fastai.vision.core import PILImage

        cache = _CACHES.get(self.key)
        array = cache.arrays.get(path) if cache is not None else None
        return PILImage.create(array if array is not None else load_resized(path, self.size))


class LabelOf:
    """A picklable get_y: path -> its label."""

    def __init__(self, files: Sequence[Path], labels: Sequence[str]):
        self.labels = dict(zip(files, labels))

    def __call__(self, path: Path) -> str:
        return self.labels[path]


def batch_transforms(size: int, mean, std, augment: bool = True) -> list:
    """The per-batch transforms on the GPU/CPU batch: flips, small rotations, zoom, lighting
    (training only, when augment), then normalisation with the backbone's statistics."""
    import torch
    from fastai.vision.augment import Normalize, aug_transforms

    tfms = aug_transforms(size=size, max_rotate=10.0, max_warp=0.0, min_scale=0.85) if augment else []
    return [*tfms, Normalize.from_stats(torch.tensor(mean), torch.tensor(std))]


def make_dataloaders(dataset: Dataset, size: int, bs: int, mean, std, *, seed: int = 42,
                     augment: bool = True, progress: bool = True, cache: bool = True):
    """fastai DataLoaders: squish to size (cached), flips/rotations/lighting on train, normalise."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter
    from fastai.vision.data import ImageBlock

    decoded = DecodedCache(dataset.files, size, progress=progress) if cache else None
    valid_idx = [i for i, v in enumerate(dataset.is_valid) if v]
    batch_tfms = batch_transforms(size, mean, std, augment)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=dataset.classes)),
        get_x=CachedImage(decoded, size),
        get_y=LabelOf(dataset.files, dataset.labels),
        splitter=IndexSplitter(valid_idx),
        batch_tfms=batch_tfms,
    )
    return block.dataloaders(list(dataset.files), bs=bs, num_workers=0, seed=seed)
