"""Finding a classifier's images, splitting them, and fastai DataLoaders over a decoded cache.

Layouts understood (DIR is `--data`, the `data` key, `cleaned_data/NAME` or `scrape/NAME`):
  DIR/<class>/<image>                          -> split by the `split` rule
  DIR/train/<class>/ + DIR/valid|validation|val/<class>/  -> the data set's own validation set
Images are verified first; bad files are reported and left out, never modified.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.config import ClassifierSpec
from toolkit.core.errors import ToolkitError
from toolkit.core.images import BadImage, is_image_name, load_squished, sha256_file, verify_images
from toolkit.core.progress import progress_iter

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


def class_folders(folder: Path) -> list[Path]:
    """The class folders of `folder`: its sub-folders, less hidden ones and those starting with '_'."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and bool(class_folders(folder))


def list_labelled_images(folder: Path, nested: bool = False) -> tuple[list[Path], list[str]]:
    """Files of `folder/<class>/...`, sorted. Nested folders count for their top class, or with
    `nested` (task = hierarchical) are the label path: `shoes/female/sandals/x.jpg` ->
    `shoes/female/sandals`."""
    files, labels = [], []
    for class_dir in class_folders(folder):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and is_image_name(path):
                files.append(path)
                labels.append(path.parent.relative_to(folder).as_posix() if nested else class_dir.name)
    return files, labels


def find_data_dir(spec: ClassifierSpec, data: Path | None = None, *, raw: bool = False,
                  accept: Callable[[Path], bool] = has_class_folders, expected: str = "DIR/<class>/<image>") -> Path:
    """The one rule for a classifier's data folder: --data, else the `data` key, else
    cleaned_data/NAME (unless `raw`: cleaning reads raw data only), else scrape/NAME; the first that
    `accept`s (default: it has class folders)."""
    given = Path(data).resolve() if data else spec.data_dir
    candidates = [given] if given else ([spec.scrape_dir] if raw else [spec.cleaned_dir, spec.scrape_dir])
    for folder in candidates:
        if accept(folder):
            return folder
    if given:
        what = "not found" if not given.is_dir() else f"has no class folders (expected {expected})"
        raise ToolkitError(f"data folder {given} {what}: fix the `data` key of [{spec.name}] or --data")
    tried = " or ".join(str(c) for c in candidates)
    raise ToolkitError(f"no images for [{spec.name}] in {tried}: run `toolkit scrape {spec.name}` or pass --data DIR")


def valid_folder(root: Path) -> Path | None:
    """root/valid (or validation, val) when the data set brings its own validation folder."""
    return next((root / name for name in VALID_FOLDER_NAMES if (root / name).is_dir()), None)


def leak_warning(files: Sequence[Path], is_valid: Sequence[bool]) -> str | None:
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


Lister = Callable[[Path], tuple[list[Path], list[str]]]


def _keep(items: Sequence, keep: Sequence[int]) -> list:
    return [items[i] for i in keep]


def labelled_split(spec: ClassifierSpec, root: Path, list_images: Lister = list_labelled_images,
                   ) -> tuple[list[Path], list[str], list[bool] | None]:
    """Files and folder labels of `root`, filtered to spec.classes, with the data's own split when it has
    train/ + valid/ folders and the split rule uses them (else None: the rule assigns it later)."""
    train_root = root / "train" if (root / "train").is_dir() else None
    valid_root = valid_folder(root)
    rule = spec.split_rule
    is_valid: list[bool] | None = None
    if train_root and valid_root and rule.uses_folders:
        train_files, train_labels = list_images(train_root)
        valid_files, valid_labels = list_images(valid_root)
        files, labels = train_files + valid_files, train_labels + valid_labels
        is_valid = [False] * len(train_files) + [True] * len(valid_files)
    else:
        if rule.kind == "folder":
            raise ToolkitError(f"split = folder but {root} has no train/ and valid/ folders")
        files, labels = list_images(train_root or root)
    if spec.classes:
        known = set(spec.classes)
        keep = [i for i, y in enumerate(labels) if y in known]
        files, labels = _keep(files, keep), _keep(labels, keep)
        is_valid = _keep(is_valid, keep) if is_valid is not None else None
        missing = known - set(labels)
        if missing:
            raise ToolkitError(f"[{spec.name}] classes {sorted(missing)} have no images in {root}")
    if not files:
        raise ToolkitError(f"no image files in {root} (expected {root}/<class>/<image>)")
    return files, labels, is_valid


def load_dataset(spec: ClassifierSpec, data: Path | None = None, *, list_images: Lister = list_labelled_images,
                 to_labels: Callable[[list[str], Path], list[str]] | None = None, progress: bool = True) -> Dataset:
    """Find, verify and split the classifier's images; bad files are listed and left out. A task
    kind lists its own images (`list_images`) and turns folder labels into its labels (`to_labels`)."""
    root = find_data_dir(spec, data)
    files, labels, is_valid = labelled_split(spec, root, list_images)
    if to_labels is not None:
        labels = to_labels(labels, root)
    good, bad = verify_images(files, progress=progress)
    good_set = set(good)
    keep = [i for i, f in enumerate(files) if f in good_set]
    files, labels = _keep(files, keep), _keep(labels, keep)
    is_valid = _keep(is_valid, keep) if is_valid is not None else spec.split_rule.assign(files, spec.valid_pct,
                                                                                           spec.seed)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ToolkitError(f"[{spec.name}] needs at least 2 classes with images in {root}; found {classes}")
    dataset = Dataset(root, files, labels, is_valid, classes, bad)
    leak = leak_warning(files, is_valid)
    if leak:
        dataset.warnings.append(leak)
    return dataset


def balanced(items: list, key: Callable, n: int, seed: int) -> list:
    """`n` items (seeded) spread evenly over the values of key(item)."""
    rng = random.Random(seed)
    by_key: dict = {}
    for item in items:
        by_key.setdefault(key(item), []).append(item)
    for values in by_key.values():
        rng.shuffle(values)
    picked, round_ = [], 0
    while len(picked) < n and any(round_ < len(v) for v in by_key.values()):
        picked += [v[round_] for _, v in sorted(by_key.items(), key=lambda kv: str(kv[0])) if round_ < len(v)]
        round_ += 1
    return picked[:n]


def count_by_class(labels: Sequence[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))


# ---------------------------------------------------------------- decoding, once


class DecodedCache:
    """Images decoded and resized once, kept in memory: each epoch then costs no JPEG decoding."""

    def __init__(self, files: Sequence[Path], size: int, *, progress: bool = True, threads: int = 2):
        self.size = size
        with ThreadPoolExecutor(max_workers=threads) as pool:
            arrays = pool.map(lambda p: load_squished(p, size), files)
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
        return PILImage.create(array if array is not None else load_squished(path, self.size))


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
