"""The one place that opens images: robust decoding to RGB, verification, hashes.

Every stage (training, cleaning, scraping, serving) opens images through `open_image`, so the
quirks of real files are handled once: EXIF orientation; palette, alpha, CMYK, greyscale and
16-bit modes; a PNG named `.jpg`; truncated files; decompression bombs; animated images.
Files are only ever read, never modified.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from toolkit.core.errors import ImageError
from toolkit.core.progress import progress_iter

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # a 40-megapixel photo is fine; a bomb declaring more is refused
MAX_BYTES = 50 * 1024 * 1024

ImageSource = str | Path | bytes | BinaryIO


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _describe(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, Path)):
        return str(src)
    return "uploaded image"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, CMYK (Pillow undoes Adobe's inversion), YCbCr, 1, ...


def open_image(
    src: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Open `src` (path, bytes or file object) as an upright RGB image, fully decoded.

    Raises ImageError with a one-line message naming the file for empty, non-image, truncated,
    oversized or undecodable input. `draft_size` lets JPEG decoding shrink early (faster) while
    keeping at least that many pixels on the short side. Animated images give their first frame.
    """
    label = _describe(src, name)
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{label}: file not found")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"{label}: empty file (0 bytes)")
        if size > max_bytes:
            raise ImageError(f"{label}: {size} bytes is over the {max_bytes} byte limit")
        data: bytes | BinaryIO = path.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"{label}: empty file (0 bytes)")
        if len(data) > max_bytes:
            raise ImageError(f"{label}: {len(data)} bytes is over the {max_bytes} byte limit")
    else:
        data = src.read()
        if not data:
            raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels is over the {max_pixels:,} pixel limit "
                    "(a decompression bomb or a huge scan: resize it first)"
                )
            if getattr(img, "is_animated", False):
                img.seek(0)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unknown format)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: decompression bomb refused (over the pixel limit)") from None
    except Image.DecompressionBombWarning:
        raise ImageError(f"{label}: decompression bomb refused (over the pixel limit)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in reason:
            reason = "truncated file (the download or copy was cut short)"
        raise ImageError(f"{label}: cannot decode image: {reason}") from None


@dataclass(frozen=True)
class BadImage:
    """A file left out, and why."""

    path: Path
    reason: str


def verify_images(
    paths: Iterable[Path], *, progress: bool = False, threads: int = 2
) -> tuple[list[Path], list[BadImage]]:
    """Fully decode each file; return (good files, bad files with reasons). Nothing is modified."""
    paths = list(paths)

    def check(path: Path) -> str | None:
        try:
            open_image(path, draft_size=64)
        except ImageError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(check, paths)
        reasons = list(progress_iter(results, len(paths), "verifying images", progress))
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [BadImage(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# bits within which the perceptual hashes of an image and its resized or re-encoded copy stay; at 4, distinct
# garments shot on one floor matched (BENCHMARKS.md "clean: ... near copies"): the scraper and the cleaner share it
COPY_HASH_BITS = 2


def perceptual_hash(img: Image.Image) -> str:
    """A 64-bit perceptual hash (hex) that survives resizing and re-encoding (within COPY_HASH_BITS)."""
    import imagehash

    return str(imagehash.phash(img))


# ---------------------------------------------------------------- pixels for a model


def squish(img: Image.Image, size: int) -> np.ndarray:
    """An RGB image squished to size x size (bilinear), uint8 HWC: what training and serving see."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def load_squished(path: Path, size: int) -> np.ndarray:
    """An image file opened with `open_image` and squished to size x size (uint8 HWC)."""
    return squish(open_image(path, draft_size=size), size)


def to_batch(arrays: Sequence[np.ndarray], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             device: Any = None):
    """uint8 HWC arrays -> one float tensor (N, 3, H, W) in 0..1, normalised when mean and std are
    given: the one place pixels become model input."""
    import torch

    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    if device is not None:
        batch = batch.to(device)
    batch = batch / 255
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
        std_t = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
        batch = (batch - mean_t) / std_t
    return batch
