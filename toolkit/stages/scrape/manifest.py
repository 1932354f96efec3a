"""The state of scrape/NAME: the manifest (one JSON line per candidate), its repair, the lock and
the quarantine. Nothing here deletes a file.

- `load_manifest` keeps every line that parses (a last line without its newline too); lines that
  do not parse are set aside in manifest.rejected (under the lock) and the manifest rewritten
  without them; a torn last line is ended before the next append.
- `ManifestWriter` appends a batch of lines, flushes and fsyncs it.
- `quarantine` moves what the manifest does not name (killed between rename and append, or a
  partial file) from the classes being scraped to _quarantine/<UTC time>/<class>/; folders
  starting with '_' are never listed as classes, so it is never trained on.
- `scrape_lock` (scrape/NAME/.lock, fcntl.flock) lets one scrape of a classifier run at a time;
  the kernel releases it when the process ends, kill -9 included.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError

MANIFEST = "manifest.jsonl"
REJECTED = "manifest.rejected"
LOCK = ".lock"
QUARANTINE = "_quarantine"
PARTIAL_SUFFIXES = (".part", ".tmp")
RESERVED_NAMES = (MANIFEST, REJECTED)  # files of scrape/NAME that a class folder must not shadow


class ScrapeError(ToolkitError):
    """A scrape that cannot go on (bad source, search failing after retries); the message is one line."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to a temporary name beside path, fsync, rename over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def scrape_lock(root: Path) -> Iterator[Path]:
    """Hold scrape/NAME/.lock for the block, or a one-line ScrapeError naming who holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScrapeError(f"{root}: another scrape of this classifier is running ({_holder(path)}); "
                              f"wait for it to end or stop it (lock file {path})") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        yield path
    finally:
        os.close(fd)  # releases the flock (the kernel does the same when the process dies)


def _try_lock(root: Path) -> int | None:
    """An fd holding the lock now, or None when a scrape holds it."""
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# ---------------------------------------------------------------- the manifest


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("class"), str) else None


def read_manifest(root: Path) -> tuple[list[dict[str, Any]], list[bytes], bool]:
    """(records, lines that do not parse, whether the last line lacks its newline); writes nothing."""
    path = root / MANIFEST
    if not path.is_file():
        return [], [], False
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    bad: list[bytes] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            bad.append(line)
        else:
            records.append(record)
    return records, bad, bool(raw) and not raw.endswith(b"\n")


def repair_manifest(root: Path) -> tuple[list[dict[str, Any]], int]:
    """The manifest's records, the file made whole: unparsable lines moved to manifest.rejected (appended
    and fsynced first), a last line without newline ended. Call it holding the lock. Returns
    (records, lines set aside)."""
    path = root / MANIFEST
    records, bad, unterminated = read_manifest(root)
    if bad:
        with open(root / REJECTED, "ab") as handle:
            handle.write(b"".join(line + b"\n" for line in bad))
            handle.flush()
            os.fsync(handle.fileno())
        kept = [line for line in path.read_bytes().split(b"\n") if line.strip() and _parse(line) is not None]
        atomic_write(path, b"".join(line + b"\n" for line in kept))  # the good lines, byte for byte
    elif unterminated:
        with open(path, "ab") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    return records, len(bad)


def load_manifest(root: Path, *, repair: bool | None = None) -> list[dict[str, Any]]:
    """The manifest's records (every line that parses). `repair`: True (the caller holds the lock)
    mends the file (see repair_manifest); None mends it only when no scrape is running; False reads."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return []
    if repair is None:
        fd = _try_lock(root)
        if fd is None:
            return read_manifest(root)[0]
        try:
            return repair_manifest(root)[0]
        finally:
            os.close(fd)
    return repair_manifest(root)[0] if repair else read_manifest(root)[0]


class ManifestWriter:
    """Appends batches of records to the manifest: one write, flush and fsync per batch."""

    def __init__(self, root: Path):
        self.handle = open(root / MANIFEST, "ab")

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in records)  # ASCII: a tear never splits a character
        if data:
            self.handle.write(data)
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


# ---------------------------------------------------------------- quarantine


def _unrecorded(path: Path, root: Path, named: set[str]) -> bool:
    if path.name.endswith(PARTIAL_SUFFIXES):
        return True
    return path.name.startswith("s-") and path.suffix == ".jpg" and path.relative_to(root).as_posix() not in named


def quarantine(root: Path, records: list[dict[str, Any]], classes: Iterable[str]) -> tuple[int, Path | None]:
    """Move the scraper's files that no manifest line names (and partial files) out of the given
    class folders into _quarantine/<UTC time>/<class>/. Returns (files moved, the folder)."""
    named = {r["file"] for r in records if isinstance(r.get("file"), str)}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = root / QUARANTINE / stamp
    moved = 0
    for cls in classes:
        class_dir = root / cls
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or path.is_symlink() or not _unrecorded(path, root, named):
                continue
            dest = folder / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            number = 0
            while dest.exists():
                number += 1
                dest = dest.with_name(f"{path.name}.{number}")
            os.rename(path, dest)  # same file system: a move, never a copy and delete
            moved += 1
    if moved:
        _fsync_dir(root)
    return moved, folder if moved else None


# ---------------------------------------------------------------- class folders


def check_class(raw: str, what: str = "class name") -> str:
    """A class name as toolkit.core.names.check_name checks it, and not one of scrape/NAME's own files."""
    from toolkit.core.names import BadName, check_name

    name = check_name(raw, what)
    if name in RESERVED_NAMES:
        raise BadName(f"{what} {name!r} is the name of the scraper's own file; choose another name")
    return name


def class_dir(root: Path, cls: str) -> Path:
    """scrape/NAME/<class>: one checked name, one folder, never outside root."""
    path = root / check_class(cls)
    if path.resolve().parent != root.resolve():  # belt and braces: never outside scrape/NAME
        raise ScrapeError(f"class name {cls!r} would write outside {root}")
    return path
