"""Feedback from the dashboards: an image saved under the label a user says is right.

    feedback/NAME/<label>/<UTC timestamp>_<original stem>.jpg   the upright RGB image (JPEG)
    feedback/NAME/feedback.jsonl                                 one JSON line per saved image

Nothing a user types can break feedback for others or reach outside feedback/NAME:

- the label passes `toolkit.core.names.check_name` (`check_label_path` for hierarchical labels
  such as tops/shirt): NFC, no separators or control characters, no leading '.' or '_'; a label
  part equal to a reserved name (`feedback.jsonl`, see `RESERVED`) is refused, and the folder's
  resolved path must lie inside feedback/NAME;
- the image is written to a temporary name, fsynced and renamed; the jsonl line is appended under
  an exclusive lock with flush + fsync, and a torn last line (a crash mid-write) is ended first;
- a quota per classifier: at most `TOOLKIT_FEEDBACK_MAX_FILES` files (default
  `MAX_FEEDBACK_FILES` = 5000) and `TOOLKIT_FEEDBACK_MAX_MB` megabytes (default
  `MAX_FEEDBACK_MB` = 1000) in feedback/NAME; a full folder refuses the save with one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from toolkit.core.errors import ToolkitError
from toolkit.core.names import BadName, check_label_path, check_name

FEEDBACK_LOG = "feedback.jsonl"
RESERVED = frozenset({FEEDBACK_LOG, "feedback.jsonl.tmp", "manifest.jsonl", "decisions.jsonl"})
MAX_FEEDBACK_FILES = 5000
MAX_FEEDBACK_MB = 1000
FILES_ENV = "TOOLKIT_FEEDBACK_MAX_FILES"
MB_ENV = "TOOLKIT_FEEDBACK_MAX_MB"
JPEG_QUALITY = 90


class FeedbackFull(ToolkitError):
    """The classifier's feedback folder reached its quota."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ToolkitError(f"${name} = {raw!r}: give a whole number (default {default})") from None
    if value <= 0:
        raise ToolkitError(f"${name} = {raw!r}: must be positive (default {default})")
    return value


def quota() -> tuple[int, int]:
    """(max files, max bytes) per classifier: the environment's values or the defaults."""
    return _env_int(FILES_ENV, MAX_FEEDBACK_FILES), _env_int(MB_ENV, MAX_FEEDBACK_MB) * 1_000_000


def check_feedback_label(raw: str, hierarchical: bool = False) -> str:
    """The checked label (a path of names for hierarchical classifiers), or a one-line BadName."""
    if not isinstance(raw, str) or not raw.strip():
        raise ToolkitError("type or pick the right label first")
    if hierarchical:
        try:
            label = check_label_path(raw, "label")
        except BadName as exc:
            raise BadName(f"{exc} (a label is a path such as tops/shirt)") from None
    else:
        label = check_name(raw, "label")
    for part in label.split("/"):
        if part.casefold() in RESERVED:
            raise ToolkitError(f"label {part!r} is a reserved name in the feedback folder; pick another label")
    return label


def usage(feedback_dir: Path) -> tuple[int, int]:
    """(files, bytes) under feedback_dir, temporary files included."""
    files = size = 0
    for folder, _, names in os.walk(feedback_dir):
        for name in names:
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
            files += 1
    return files, size


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(name)).stem).strip("-.") or "image"
    return stem[:60]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}{path.suffix}")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _append_locked(handle, record: dict[str, Any]) -> None:
    """Append one JSON line to an open, locked 'a+b' handle: end a torn last line first."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    prefix = b""
    if end:
        handle.seek(end - 1)
        if handle.read(1) != b"\n":
            prefix = b"\n"
    handle.write(prefix + json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    handle.flush()
    os.fsync(handle.fileno())


def read_feedback(feedback_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable line of feedback.jsonl (torn or undecodable lines are skipped)."""
    return list(_lines(Path(feedback_dir) / FEEDBACK_LOG))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(row, dict):
                yield row


def save_feedback(feedback_dir: str | Path, img: Image.Image, label: str, original_name: str,
                  probs: dict[str, float] | None = None, model_created: str | None = None, *,
                  hierarchical: bool = False, now: datetime | None = None) -> Path:
    """Write feedback_dir/<label>/<timestamp>_<stem>.jpg (atomically) and a feedback.jsonl line.

    Raises ToolkitError (one line) for a bad label, a label folder outside feedback_dir, or a full
    quota (`FeedbackFull`); nothing is written then."""
    label = check_feedback_label(label, hierarchical)
    root = Path(feedback_dir)
    max_files, max_bytes = quota()
    now = now or datetime.now(timezone.utc)
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / FEEDBACK_LOG, "a+b") as log:
            fcntl.flock(log.fileno(), fcntl.LOCK_EX)  # one save at a time per classifier (kernels, users)
            files, size = usage(root)
            if files + 1 > max_files or size + len(data) > max_bytes:
                raise FeedbackFull(f"feedback for {root.name} is full ({files} files, {size / 1e6:.0f} MB in {root}; "
                                   f"limits {max_files} files, {max_bytes / 1e6:.0f} MB): move them into the "
                                   f"training data or raise ${FILES_ENV} / ${MB_ENV}")
            folder = root / label
            resolved_root = root.resolve()
            if not folder.resolve().is_relative_to(resolved_root) or folder.resolve() == resolved_root:
                raise ToolkitError(f"label {label!r} leads outside {root}; pick another label")
            parts = folder.relative_to(root).parts
            for i in range(1, len(parts) + 1):
                here = root.joinpath(*parts[:i])
                if here.exists() and not here.is_dir():
                    raise ToolkitError(f"label {label!r}: {here} is a file, not a label folder; pick another label")
            folder.mkdir(parents=True, exist_ok=True)
            if not folder.resolve().is_relative_to(resolved_root):  # a link planted meanwhile
                raise ToolkitError(f"label {label!r} leads outside {root}; pick another label")
            stem = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}_{_safe_stem(original_name)}"
            path = folder / f"{stem}.jpg"
            counter = 1
            while path.exists():
                path = folder / f"{stem}-{counter}.jpg"
                counter += 1
            _write_atomic(path, data)
            predicted = max(probs, key=probs.get) if probs else None
            _append_locked(log, {
                "time": now.isoformat(timespec="seconds"), "file": path.relative_to(root).as_posix(),
                "label": label, "predicted": predicted,
                "probability": round(probs[predicted], 5) if predicted else None,
                "probs": {k: round(v, 5) for k, v in (probs or {}).items()},
                "original_name": str(original_name), "sha256": hashlib.sha256(data).hexdigest(),
                "model_created": model_created})
    except OSError as exc:
        raise ToolkitError(f"cannot save feedback in {root}: {exc.strerror or exc}") from exc
    return path


# ---------------------------------------------------------------- back into the data (the cleaning app)

FEEDBACK_KEY = "feedback:"  # decisions about feedback items are keyed "feedback:<file>" in decisions.jsonl


def feedback_status(spec, log=None) -> list[dict[str, Any]]:
    """Every feedback item of the classifier with `status`: pending, accepted or rejected (from decisions.jsonl)."""
    from toolkit.stages.clean.decisions import DecisionLog

    state = (log or DecisionLog(spec.cleaned_dir)).state()
    out = []
    for item in read_feedback(spec.feedback_dir):
        if not isinstance(item.get("file"), str):
            continue
        decision = state.get(FEEDBACK_KEY + item["file"])
        status = {"keep": "accepted", "delete": "rejected"}.get(decision["action"], "pending") if decision \
            else "pending"
        out.append({**item, "status": status})
    return out


def _feedback_path(spec, item: dict[str, Any]) -> Path:
    root = Path(spec.feedback_dir)
    rel = item.get("file")
    if not isinstance(rel, str) or not rel:
        raise ToolkitError("feedback item without a file")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
        raise ToolkitError(f"feedback file {rel!r} is not in {root}")
    return path


def import_feedback(spec, item: dict[str, Any], *, label: str | None = None, log=None) -> dict[str, Any]:
    """Accept a feedback item: copy its image into scrape/NAME/<label>/ as a new raw file (existing raw
    files are never touched; the same image twice is imported once), append a manifest line with its
    provenance (source "dashboard", or "unlabelled" for feedback/NAME/_unlabelled/; time, label) and
    record the decision in decisions.jsonl.
    Returns {"file": path relative to scrape/NAME, "label", "new": bool}."""
    from toolkit.core.images import open_image, perceptual_hash
    from toolkit.stages.clean.decisions import DecisionLog
    from toolkit.stages.scrape.manifest import ManifestWriter, atomic_write, class_dir, now, scrape_lock

    source = _feedback_path(spec, item)
    label = label or item.get("label")
    if not isinstance(label, str) or "/" in label:
        raise ToolkitError(f"feedback label {label!r}: import needs one class name (a path label goes in by hand)")
    data = source.read_bytes()
    img = open_image(source)
    sha = hashlib.sha256(data).hexdigest()
    root = Path(spec.scrape_dir)
    with scrape_lock(root):
        folder = class_dir(root, label)  # a checked class name, never outside scrape/NAME
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"fb-{_safe_stem(source.stem)}-{sha[:12]}.jpg"
        new = not path.exists()
        if new:
            atomic_write(path, data)
            writer = ManifestWriter(root)
            try:
                origin = "unlabelled" if item.get("unlabelled") else "dashboard"  # feedback/NAME/_unlabelled/
                writer.append([{
                    "class": label, "query": None, "backend": origin, "rank": None, "url": None,
                    "page_url": None, "title": item.get("original_name"), "time": now(), "http_status": None,
                    "bytes": len(data), "sha256": sha, "phash": perceptual_hash(img), "width": img.width,
                    "height": img.height, "file": path.relative_to(root).as_posix(), "status": "ok",
                    "source": origin, "label": label, "feedback_file": item["file"],
                    "feedback_time": item.get("time"), "predicted": item.get("predicted")}])
            finally:
                writer.close()
    rel = path.relative_to(root).as_posix()
    log = log or DecisionLog(spec.cleaned_dir)
    log.record_many([rel, FEEDBACK_KEY + item["file"]], "keep", reason=f"accepted feedback {item['file']} as {label}",
                    source="feedback")
    return {"file": rel, "label": label, "new": new}


def reject_feedback(spec, item: dict[str, Any], *, log=None) -> dict[str, Any]:
    """Reject a feedback item: recorded in decisions.jsonl; the image stays in feedback/NAME, nothing is imported."""
    from toolkit.stages.clean.decisions import DecisionLog

    _feedback_path(spec, item)
    log = log or DecisionLog(spec.cleaned_dir)
    return log.record(FEEDBACK_KEY + item["file"], "delete", reason="feedback rejected", source="feedback")


# ---------------------------------------------------------------- what to label next (active learning)

UNLABELLED = "_unlabelled"  # feedback/NAME/_unlabelled/: images without a label (never a label: no leading '_')
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def unlabelled_items(spec, log=None) -> list[dict[str, Any]]:
    """The images in feedback/NAME/_unlabelled/ (put there by hand or a script: photos the model met
    with no label) as feedback items with label None and their status from decisions.jsonl."""
    from toolkit.stages.clean.decisions import DecisionLog

    folder = Path(spec.feedback_dir) / UNLABELLED
    if not folder.is_dir():
        return []
    state = (log or DecisionLog(spec.cleaned_dir)).state()
    out = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        rel = path.relative_to(spec.feedback_dir).as_posix()
        decision = state.get(FEEDBACK_KEY + rel)
        status = {"keep": "accepted", "delete": "rejected"}.get(decision["action"], "pending") if decision \
            else "pending"
        out.append({"file": rel, "label": None, "predicted": None, "probability": None, "probs": {},
                    "original_name": path.name, "unlabelled": True, "status": status,
                    "time": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")})
    return out


def margins(probs: Any) -> Any:
    """The normalized margin of each row of class probabilities: (top1 - top2) / top1, in [0, 1]
    (0: the two best classes tie; 1: one class has all the probability). One class: 1."""
    import numpy as np

    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        return np.ones(len(p))
    top2 = -np.sort(-p, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]) / np.maximum(top2[:, 0], 1e-12)


def diverse_order(embeddings: Any, weights: Any, reference: Any = None) -> list[int]:
    """Every row, ordered by greedy weighted k-center: each step takes the row whose weight x (cosine
    distance to the nearest row already taken, or to the `reference` rows: the labelled data) is
    largest. With equal weights it is farthest-point sampling; a copy of a taken row scores 0."""
    import numpy as np

    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    if n == 0:
        return []
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    w = np.asarray(weights, dtype=float)
    nearest = np.ones(n)  # no reference: every row is 1 (orthogonal) away, so the first pick is the max weight
    if reference is not None and len(reference):
        ref = np.asarray(reference, dtype=np.float32)
        ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        for start in range(0, len(ref), 4096):
            nearest = np.minimum(nearest, 1.0 - (emb @ ref[start:start + 4096].T).max(axis=1))
    nearest = np.clip(nearest, 0.0, 2.0)
    order: list[int] = []
    taken = np.zeros(n, dtype=bool)
    for _ in range(n):
        score = np.where(taken, -np.inf, w * nearest + 1e-9 * w)  # ties (all copies): the more uncertain
        pick = int(np.argmax(score))
        order.append(pick)
        taken[pick] = True
        nearest = np.minimum(nearest, np.clip(1.0 - emb @ emb[pick], 0.0, 2.0))
    return order


def label_next(spec, *, log=None, predictor=None, reference: Any = None, size: int | None = None,
               progress: bool = False) -> list[dict[str, Any]]:
    """Pending feedback items and unlabelled images (feedback/NAME/_unlabelled/), most useful to label
    first: uncertainty = 1 - the current model's normalized margin (models/NAME; without a model, the
    probabilities the dashboard recorded), spread out by `diverse_order` on the cleaning app's cached
    embeddings (cleaned_data/NAME/.cache), away from `reference` (embeddings of the labelled images,
    e.g. the app's rankings) when given. Each item gains `uncertainty`, `margin`, `guess` (the model's
    label) and `rank` (1 = first)."""
    import numpy as np

    from toolkit.core.images import open_image
    from toolkit.stages.clean.embeddings import compute_embeddings

    items = [i for i in feedback_status(spec, log) + unlabelled_items(spec, log) if i["status"] == "pending"]
    paths, kept = [], []
    for item in items:
        try:
            paths.append(_feedback_path(spec, item))
            kept.append(item)
        except ToolkitError:
            continue
    if not kept:
        return []
    if predictor is None and (Path(spec.models_dir) / "model.json").is_file():
        from toolkit.tasks import cached_predictor

        predictor = cached_predictor(spec.models_dir)
    classes: list[str] = list(predictor.classes) if predictor is not None else []
    probs = np.zeros((len(kept), max(len(classes), 2)))
    if predictor is not None:
        for start in range(0, len(paths), 32):
            images = [open_image(p) for p in paths[start:start + 32]]  # decoded as the dashboard does
            probs[start:start + len(images)] = predictor.predict_images(images)
    else:
        recorded = sorted({c for item in kept for c in (item.get("probs") or {})})
        classes = recorded
        probs = np.array([[float((item.get("probs") or {}).get(c, 0.0)) for c in recorded] or [0.5, 0.5]
                          for item in kept])
    margin = margins(probs)
    emb, _, _ = compute_embeddings(paths, arch=spec.arch, size=size or spec.clean_size,
                                   cache_dir=Path(spec.cleaned_dir) / ".cache")
    order = diverse_order(emb, 1.0 - margin + 1e-3, reference)  # + a little: a sure image still spreads out
    out = []
    for rank, i in enumerate(order, 1):
        guess = classes[int(np.argmax(probs[i]))] if classes and probs.shape[1] == len(classes) else None
        out.append({**kept[i], "uncertainty": round(float(1.0 - margin[i]), 5), "margin": round(float(margin[i]), 5),
                    "guess": guess, "rank": rank})
    return out
