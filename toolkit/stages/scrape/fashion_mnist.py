"""Fashion-MNIST, the embedded default: idx files -> PNG class folders with a manifest.

The Debian package `dataset-fashion-mnist` installs the files under FASHION_MNIST_DIR; elsewhere
put the four upstream `.gz` files in a folder and pass it (`--source fashion-mnist:DIR`).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import struct
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.core.images import sha256_file
from toolkit.core.progress import progress_iter

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ToolkitError(
            f"Fashion-MNIST file {path} not found: `apt-get install dataset-fashion-mnist` "
            "(or `make install`), or pass --source fashion-mnist:DIR with the upstream .gz files"
        ) from None
    except (OSError, EOFError) as exc:
        raise ToolkitError(f"{path}: not a readable gzip idx file ({exc})") from None
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ToolkitError(f"{path}: not an idx file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, folder: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) of 'train' or 'test'."""
    images_name, labels_name = FILES[split]
    images, labels = _read_idx(folder / images_name), _read_idx(folder / labels_name)
    if len(images) != len(labels):
        raise ToolkitError(f"{folder}: {images_name} and {labels_name} hold different counts")
    return images, labels


def ingest(dest: Path, *, split: str = "train", per_class: int | None = None, seed: int = 42,
           folder: Path = FASHION_MNIST_DIR, progress: bool = True) -> dict[str, int]:
    """Write a balanced, seeded sample as dest/<class>/<split>_<index>.png plus dest/manifest.jsonl.

    Existing files are kept (a rerun writes nothing twice). Returns images per class.
    """
    images, labels = load_split(split, folder)
    rng = random.Random(seed)
    chosen: list[int] = []
    for class_index in range(len(CLASSES)):
        indices = np.flatnonzero(labels == class_index).tolist()
        rng.shuffle(indices)
        chosen += sorted(indices[:per_class] if per_class else indices)
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "manifest.jsonl"
    done = set()
    if manifest_path.exists():
        done = {json.loads(line)["file"] for line in manifest_path.read_text().splitlines() if line.strip()}
    iterator = progress_iter(chosen, len(chosen), f"Fashion-MNIST {split} -> {dest}", progress)
    counts: dict[str, int] = {}
    with open(manifest_path, "a") as manifest:
        for index in iterator:
            label = CLASSES[labels[index]]
            counts[label] = counts.get(label, 0) + 1
            relative = f"{label}/{split}_{index:05d}.png"
            if relative in done:
                continue
            target = dest / relative
            target.parent.mkdir(exist_ok=True)
            partial = target.with_suffix(".part")
            Image.fromarray(images[index], "L").save(partial, format="PNG")
            os.replace(partial, target)
            record = {"file": relative, "class": label, "backend": "fashion-mnist",
                      "source": f"{folder / FILES[split][0]}#{index}", "status": "ok",
                      "sha256": sha256_file(target), "width": 28, "height": 28,
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            manifest.write(json.dumps(record) + "\n")
    return counts
