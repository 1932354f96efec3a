"""Decisions are data: cleaned_data/NAME/decisions.jsonl, and the cleaned set derived from it.

Each line is one event, appended and flushed to disk the moment it is made:
  {"id", "time", "action": "keep"|"delete"|"relabel", "file", "label"?, "reason", "source"}
  {"id", "time", "action": "undo", "target": ID}      cancels one earlier decision
  {"id", "time", "action": "undo_all"}                 cancels every earlier decision
The last live decision for a file wins. `file` is relative to the raw root (scrape/NAME).

`apply_decisions` materialises cleaned_data/NAME/<class>/ (or train|valid/<class>/ when the raw
data has its own split) from the raw files plus decisions: hard links where possible, else
copies, with unique names. It builds the new set in a temporary folder beside it and swaps the
two folders in one rename, so a crash leaves either the old or the new set. Raw files are only
ever read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError
from toolkit.stages.clean.rank import RawImages

ACTIONS = ("keep", "delete", "relabel")
DECISIONS_FILE = "decisions.jsonl"
APPLIED_FILE = "applied.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class DecisionLog:
    """The append-only decisions file of one classifier (cleaned_data/NAME/decisions.jsonl)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / DECISIONS_FILE

    # -- reading
    def entries(self) -> list[dict[str, Any]]:
        """Every event in order; a torn last line (a crash mid-write) is ignored."""
        _recover(self.folder)
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "action" in entry:
                out.append(entry)
        return out

    def live(self) -> list[dict[str, Any]]:
        """Decisions not undone, in order."""
        live: dict[str, dict[str, Any]] = {}
        for entry in self.entries():
            action = entry["action"]
            if action == "undo":
                live.pop(entry.get("target"), None)
            elif action == "undo_all":
                live.clear()
            elif action in ACTIONS:
                live[entry["id"]] = entry
        return list(live.values())

    def state(self) -> dict[str, dict[str, Any]]:
        """file -> its winning decision (the last live one)."""
        state: dict[str, dict[str, Any]] = {}
        for entry in self.live():
            state[entry["file"]] = entry
        return state

    # -- writing
    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        _recover(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return entry

    def record(self, file: str, action: str, label: str | None = None, *, reason: str = "",
               source: str = "python") -> dict[str, Any]:
        """Append one keep / delete / relabel decision for `file` (relative to the raw root)."""
        if action not in ACTIONS:
            raise ToolkitError(f"unknown decision {action!r}; use one of {', '.join(ACTIONS)}")
        if action == "relabel" and not label:
            raise ToolkitError("a relabel decision needs the new label")
        entry = {"id": uuid.uuid4().hex[:12], "time": _now(), "action": action, "file": str(file),
                 "reason": reason, "source": source}
        if action == "relabel":
            entry["label"] = label
        return self._append(entry)

    def record_many(self, files: Iterable[str], action: str, label: str | None = None, **kwargs) -> list[dict]:
        return [self.record(f, action, label, **kwargs) for f in files]

    def undo(self) -> dict[str, Any] | None:
        """Cancel the last live decision; returns it (None when there is nothing to undo)."""
        live = self.live()
        if not live:
            return None
        target = live[-1]
        self._append({"id": uuid.uuid4().hex[:12], "time": _now(), "action": "undo", "target": target["id"],
                      "file": target["file"]})
        return target

    def clear(self, file: str) -> int:
        """Cancel every live decision for one file (back to undecided); returns how many."""
        targets = [d for d in self.live() if d["file"] == file]
        for target in targets:
            self._append({"id": uuid.uuid4().hex[:12], "time": _now(), "action": "undo", "target": target["id"],
                          "file": file})
        return len(targets)

    def undo_all(self) -> int:
        """Cancel every decision so far; returns how many files had one."""
        n = len(self.state())
        if n:
            self._append({"id": uuid.uuid4().hex[:12], "time": _now(), "action": "undo_all"})
        return n


# ---------------------------------------------------------------- the plan


def _split_prefix(raw: RawImages, rel: str) -> str:
    """'train/' or 'valid/...' when the raw data has its own split folders, else ''."""
    first = rel.split("/", 1)[0]
    return first + "/" if first in ("train", "valid", "validation", "val") and rel.count("/") >= 2 else ""


def plan(raw: RawImages, state: dict[str, dict[str, Any]]) -> dict[str, str]:
    """raw file (relative) -> path in the cleaned set (relative), for every file that stays."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    broken = {b["file"] for b in raw.broken}
    for rel, label in sorted(zip(raw.rel, raw.labels, strict=False)):
        if rel in broken:
            continue
        decision = state.get(rel)
        if decision and decision["action"] == "delete":
            continue
        if decision and decision["action"] == "relabel":
            label = decision["label"]
        name = rel.rsplit("/", 1)[-1]
        target = f"{_split_prefix(raw, rel)}{label}/{name}"
        stem, dot, ext = name.rpartition(".")
        n = 2
        while target.lower() in taken:
            target = f"{_split_prefix(raw, rel)}{label}/{stem or ext}-{n}{dot}{ext if stem else ''}"
            n += 1
        taken.add(target.lower())
        out[rel] = target
    return out


def read_applied(folder: Path) -> dict[str, Any]:
    path = Path(folder) / APPLIED_FILE
    if not path.is_file():
        return {"files": {}, "decisions": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def dry_run(raw: RawImages, log: DecisionLog) -> dict[str, list]:
    """What `apply` would change in cleaned_data/NAME: files added, removed and moved (relabelled)."""
    new = plan(raw, log.state())
    old = read_applied(log.folder)["files"]
    return {
        "add": sorted(new[f] for f in new if f not in old),
        "remove": sorted(old[f] for f in old if f not in new),
        "move": sorted([old[f], new[f]] for f in new if f in old and old[f] != new[f]),
    }


def pending(log: DecisionLog) -> dict[str, dict[str, Any]]:
    """Decisions made since the last apply (file -> decision), including undone ones ("undone")."""
    applied = read_applied(log.folder).get("decisions", {})
    state = log.state()
    out = {f: d for f, d in state.items() if applied.get(f, {}).get("id") != d["id"]}
    for f, d in applied.items():
        if f not in state:
            out[f] = {**d, "action": "undone"}
    return out


# ---------------------------------------------------------------- materialising, atomically


def _link(src: Path, dst: Path) -> str:
    """Hard link src to dst, else copy; returns 'link' or 'copy'."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _recover(folder: Path) -> None:
    """After a crash between the two renames of the fallback swap, put the old set back."""
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
    if olds:
        os.rename(olds[-1], folder)


def _carry_over(old: Path, new: Path, dataset_dirs: set[str]) -> None:
    """Everything in cleaned_data/NAME that is not the data set (decisions, cache, reports) goes along."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in (APPLIED_FILE,) or (entry.is_dir() and entry.name in dataset_dirs):
            continue
        if entry.is_dir():
            for path in entry.rglob("*"):
                if path.is_file():
                    _link(path, new / path.relative_to(old))
        elif entry.is_file():
            _link(entry, new / entry.name)


def apply_decisions(raw: RawImages, log: DecisionLog, *, dry: bool = False) -> dict[str, Any]:
    """Materialise cleaned_data/NAME from raw files + decisions; returns counts and the diff."""
    folder = log.folder
    _recover(folder)
    diff = dry_run(raw, log)
    if dry:
        return {"dry_run": True, **diff}
    state = log.state()
    mapping = plan(raw, state)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{folder.name}.apply-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{folder.name}.apply-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        old_dirs = {p.split("/", 1)[0] for p in read_applied(folder)["files"].values()}
        new_dirs = {p.split("/", 1)[0] for p in mapping.values()}
        _carry_over(folder, tmp, old_dirs | new_dirs | set(raw.classes))
        files = dict(zip(raw.rel, raw.files, strict=False))
        how = {"link": 0, "copy": 0}
        for rel, target in mapping.items():
            how[_link(files[rel], tmp / target)] += 1
        applied = {"time": _now(), "root": str(raw.root), "files": mapping,
                   "decisions": {f: d for f, d in state.items()}}
        (tmp / APPLIED_FILE).write_text(json.dumps(applied, indent=1) + "\n", encoding="utf-8")
        if folder.exists():
            if not _exchange(tmp, folder):
                old = parent / f".{folder.name}.old-{os.getpid()}"
                os.rename(folder, old)
                os.rename(tmp, folder)
                tmp = old
        else:
            os.rename(tmp, folder)
            tmp = None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    for target in mapping.values():
        label = target.rsplit("/", 2)[-2]
        counts[label] = counts.get(label, 0) + 1
    return {"dry_run": False, "folder": str(folder), "kept": len(mapping), "per_class": counts,
            "deleted": sum(1 for d in state.values() if d["action"] == "delete"),
            "relabelled": sum(1 for d in state.values() if d["action"] == "relabel"),
            "linked": how["link"], "copied": how["copy"], **diff}
