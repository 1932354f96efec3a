"""Decisions are data: cleaned_data/NAME/decisions.jsonl, and the cleaned set derived from it.

Each line is one event, appended and fsynced the moment it is made:
  {"id", "time", "session", "action": "keep"|"delete"|"relabel", "file", "label"?, "reason", "source"}
  {"id", "time", "session", "action": "undo", "target": ID}            cancels one earlier decision
  {"id", "time", "session", "action": "undo_all", "target_session": S} cancels every decision of session S
The last live decision for a file wins. `file` is relative to the raw root (scrape/NAME). A session
is one DecisionLog: one widget, one CLI run (or `--session ID`); undo only ever cancels the
decisions of the session it is asked for. Lines from before sessions have none ("legacy"), and an
old `undo_all` without `target_session` still cancels everything before it.

Reading is line by line in binary: a line that does not decode or parse (a crash mid-write, a tear
inside a UTF-8 character) is skipped and counted in `bad_lines`, never fatal. Before appending, a
torn last line is ended, so the next decision is never glued to it.

`apply_decisions` materialises cleaned_data/NAME/<class>/ (or train|valid/<class>/ when the raw
data has its own split) from the raw files plus decisions: copies (a reflink where the file system
can), never links to the raw files, so a write in cleaned_data can never reach scrape/. Relabel
labels pass the name check and must stay inside the build folder, else the decision is refused
in one line and the file keeps its given label. It builds the new set in a temporary folder beside
it and swaps the two folders in one rename, so a crash (even kill -9) leaves either the old or the
new set. One lock per classifier (cleaned_data/.apply-NAME.lock) keeps two applies apart: the second
says who holds it and stops. Raw files are only ever read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from toolkit.core.errors import ToolkitError
from toolkit.core.names import BadName, check_label_path
from toolkit.stages.clean.rank import RawImages

ACTIONS = ("keep", "delete", "relabel")
DECISIONS_FILE = "decisions.jsonl"
APPLIED_FILE = "applied.json"
LEGACY_SESSION = "legacy"
RESERVED_LABELS = {DECISIONS_FILE, APPLIED_FILE, "report.json"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_session_id() -> str:
    """A fresh session id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def _encode(entry: dict[str, Any]) -> bytes:
    """One JSON line; names that are not valid UTF-8 (surrogate escapes) are written as \\u escapes."""
    try:
        return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(entry, ensure_ascii=True) + "\n").encode("ascii")


class DecisionLog:
    """The append-only decisions file of one classifier (cleaned_data/NAME/decisions.jsonl).

    `session` names who decides (default: a new id per DecisionLog, i.e. per widget or CLI run)."""

    def __init__(self, folder: Path, session: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / DECISIONS_FILE
        self.session = session or new_session_id()
        self.bad_lines = 0

    # -- reading
    def entries(self) -> list[dict[str, Any]]:
        """Every event in order; lines that do not decode or parse are skipped and counted in `bad_lines`."""
        _recover(self.folder)
        self.bad_lines = 0
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, "rb") as handle:
            for raw_line in handle:
                if not raw_line.strip():
                    continue
                try:
                    entry = json.loads(raw_line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.bad_lines += 1
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("action"), str) and (
                        entry["action"] not in ACTIONS or (isinstance(entry.get("id"), str)
                                                           and isinstance(entry.get("file"), str))):
                    out.append(entry)
                else:
                    self.bad_lines += 1
        return out

    def live(self) -> list[dict[str, Any]]:
        """Decisions not undone, in order."""
        live: dict[str, dict[str, Any]] = {}
        for entry in self.entries():
            action = entry["action"]
            if action == "undo":
                live.pop(entry.get("target"), None)
            elif action == "undo_all":
                if "target_session" not in entry:  # a line from before sessions: everything
                    live.clear()
                else:
                    target = entry["target_session"]
                    live = {k: d for k, d in live.items() if session_of(d) != target}
            elif action in ACTIONS:
                live[entry["id"]] = entry
        return list(live.values())

    def state(self) -> dict[str, dict[str, Any]]:
        """file -> its winning decision (the last live one)."""
        state: dict[str, dict[str, Any]] = {}
        for entry in self.live():
            state[entry["file"]] = entry
        return state

    def sessions(self) -> dict[str, int]:
        """session -> how many live decisions it has, the most recently active session last."""
        counts: dict[str, int] = {}
        for entry in self.live():
            session = session_of(entry)
            counts[session] = counts.pop(session, 0) + 1  # re-inserted: the latest session ends last
        return counts

    def known_sessions(self) -> set[str]:
        """Every session that ever wrote a line (undone or not)."""
        return {session_of(e) for e in self.entries()}

    # -- writing
    def _append_many(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the lines in one write and fsync; a torn last line is ended first."""
        if not entries:
            return entries
        _recover(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = b"".join(_encode(e) for e in entries)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers of this file, one at a time (readers need no lock)
            size = os.fstat(fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                data = b"\n" + data  # end a line torn by a crash, so this one is not glued to it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return entries

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        return self._append_many([entry])[0]

    def _decision(self, file: str, action: str, label: str | None, reason: str, source: str) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ToolkitError(f"unknown decision {action!r}; use one of {', '.join(ACTIONS)}")
        entry = {"id": uuid.uuid4().hex[:12], "time": _now(), "session": self.session, "action": action,
                 "file": str(file), "reason": reason, "source": source}
        if action == "relabel":
            if not label:
                raise ToolkitError("a relabel decision needs the new label")
            entry["label"] = check_relabel(label)
        return entry

    def record(self, file: str, action: str, label: str | None = None, *, reason: str = "",
               source: str = "python") -> dict[str, Any]:
        """Append one keep / delete / relabel decision for `file` (relative to the raw root)."""
        return self._append(self._decision(file, action, label, reason, source))

    def record_many(self, files: Iterable[str], action: str, label: str | None = None, *, reason: str = "",
                    source: str = "python") -> list[dict[str, Any]]:
        """One decision per file, appended as one batch (one fsync)."""
        return self._append_many([self._decision(f, action, label, reason, source) for f in files])

    def undo(self, session: str | None = None) -> dict[str, Any] | None:
        """Cancel the last live decision of `session` (default: this log's own); returns it, or None."""
        session = session or self.session
        mine = [d for d in self.live() if session_of(d) == session]
        if not mine:
            return None
        target = mine[-1]
        self._append({"id": uuid.uuid4().hex[:12], "time": _now(), "session": self.session, "action": "undo",
                      "target": target["id"], "file": target["file"]})
        return target

    def clear(self, file: str) -> int:
        """Cancel every live decision for one file (back to undecided), whoever made it; returns how many."""
        targets = [d for d in self.live() if d["file"] == file]
        self._append_many([{"id": uuid.uuid4().hex[:12], "time": _now(), "session": self.session,
                            "action": "undo", "target": t["id"], "file": file} for t in targets])
        return len(targets)

    def undo_all(self, session: str | None = None) -> int:
        """Cancel every decision of `session` (default: this log's own); returns how many files had one."""
        session = session or self.session
        files = {d["file"] for d in self.live() if session_of(d) == session}
        if files:
            self._append({"id": uuid.uuid4().hex[:12], "time": _now(), "session": self.session,
                          "action": "undo_all", "target_session": session})
        return len(files)


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)


def session_of(entry: dict[str, Any]) -> str:
    """The session that made a decision ("legacy" for lines written before sessions)."""
    session = entry.get("session")
    return session if isinstance(session, str) and session else LEGACY_SESSION


def check_relabel(label: str) -> str:
    """A relabel label as one checked class name, or a label path `tops/shirt` of checked names."""
    label = check_label_path(label, "relabel label")
    if label.split("/", 1)[0] in RESERVED_LABELS or label.startswith("report-"):
        raise BadName(f"relabel label {label!r} is a name cleaned_data keeps for itself; choose another")
    return label


def undo_report(log: DecisionLog, session: str | None = None, *, everything: bool = False) -> list[str]:
    """`clean --undo` / `--undo-all`: undo in `session`, default the most recently active session that
    has live decisions; returns the lines to print (the session chosen, and any others left)."""
    sessions = log.sessions()
    if session and session not in log.known_sessions():
        known = ", ".join(sessions) or "none"
        raise ToolkitError(f"{log.path}: no decisions of session {session!r}; sessions with decisions: {known}")
    target = session or (list(sessions)[-1] if sessions else None)
    lines = []
    if target is None:
        lines.append("nothing to undo")
    elif everything:
        n = log.undo_all(session=target)
        lines.append(f"undid {n} decision(s) of session {target}")
    else:
        undone = log.undo(session=target)
        lines.append(f"undid {undone['action']} {undone['file']} (session {target}, {undone.get('source', '?')}, "
                     f"{undone.get('time', '?')})" if undone else f"nothing to undo in session {target}")
    others = {s: n for s, n in log.sessions().items() if s != target}
    if others and not session:
        lines.append("other sessions with decisions: " + ", ".join(f"{s} ({n})" for s, n in others.items())
                     + "; choose one with --session ID")
    if log.bad_lines:
        lines.append(f"warning: skipped {log.bad_lines} unreadable line(s) in {log.path}")
    return lines


# ---------------------------------------------------------------- the plan


def _split_prefix(raw: RawImages, rel: str) -> str:
    """'train/' or 'valid/...' when the raw data has its own split folders, else ''."""
    first = rel.split("/", 1)[0]
    return first + "/" if first in ("train", "valid", "validation", "val") and rel.count("/") >= 2 else ""


def _describe(decision: dict[str, Any]) -> str:
    return (f"decision {decision.get('id', '?')} (relabel {decision.get('file', '?')!r} to "
            f"{decision.get('label')!r}, session {session_of(decision)})")


def _inside(target: str) -> bool:
    """A relative POSIX path with no '..', '.', empty or absolute parts (it stays inside the build folder)."""
    path = PurePosixPath(target)
    return not path.is_absolute() and "\\" not in target and all(part not in ("", ".", "..") for part in path.parts)


def plan(raw: RawImages, state: dict[str, dict[str, Any]], refused: list[str] | None = None) -> dict[str, str]:
    """raw file (relative) -> path in the cleaned set (relative), for every file that stays.

    A relabel whose label fails the name check is refused (a line appended to `refused`): the file
    keeps its given label."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    broken = {b["file"] for b in raw.broken}
    for rel, label in sorted(zip(raw.rel, raw.labels, strict=False)):
        if rel in broken:
            continue
        decision = state.get(rel)
        if decision and decision["action"] == "delete":
            continue
        name = rel.rsplit("/", 1)[-1]
        if decision and decision["action"] == "relabel":
            try:
                new_label = check_relabel(decision.get("label"))
                if not _inside(f"{new_label}/{name}"):
                    raise ToolkitError(f"{new_label!r} leaves the build folder")
                label = new_label
            except ToolkitError as exc:
                if refused is not None:
                    refused.append(f"{_describe(decision)} refused: {exc}; the file stays in {label}")
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
    """cleaned_data/NAME/applied.json (what the last apply built); empty when missing or unreadable."""
    path = Path(folder) / APPLIED_FILE
    empty: dict[str, Any] = {"files": {}, "decisions": {}}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return empty
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return empty
    data.setdefault("decisions", {})
    return data


def dry_run(raw: RawImages, log: DecisionLog) -> dict[str, list]:
    """What `apply` would change in cleaned_data/NAME: files added, removed and moved (relabelled),
    and the decisions it would refuse."""
    refused: list[str] = []
    new = plan(raw, log.state(), refused)
    old = read_applied(log.folder)["files"]
    return {
        "add": sorted(new[f] for f in new if f not in old),
        "remove": sorted(str(old[f]) for f in old if f not in new),
        "move": sorted([old[f], new[f]] for f in new if f in old and old[f] != new[f]),
        "refused": refused,
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

FICLONE = 0x40049409  # Linux ioctl: make dst a copy-on-write clone of src (btrfs, XFS, ...)


def _copy(src: Path, dst: Path) -> str:
    """A copy of src at dst that shares nothing writable with src: a reflink where the file system
    can, else a byte copy (copy_file_range, else read/write); returns 'reflink' or 'copy'."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    how = "copy"
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            how = "reflink"
        except OSError:
            size = os.fstat(fin.fileno()).st_size
            try:
                offset = 0
                while offset < size:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), size - offset)
                    if n == 0:
                        break
                    offset += n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                fin.seek(0)
                fout.seek(0)
                fout.truncate()
                shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dst)
    return how


def _link(src: Path, dst: Path) -> None:
    """cleaned_data's own files (decisions, cache, reports) go to the new set as hard links (one inode:
    a decision appended during the apply is in both), else copies. Never used for raw files."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


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


def _sync_tree(folder: Path) -> None:
    """Flush the new set to disk before it is swapped in (syncfs of its file system, else sync)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock_path(folder: Path) -> Path:
    """The apply lock of cleaned_data/NAME: cleaned_data/.apply-NAME.lock (outside the swapped folder)."""
    folder = Path(folder)
    return folder.parent / f".apply-{folder.name}.lock"


@contextlib.contextmanager
def apply_lock(folder: Path) -> Iterator[None]:
    """Hold the classifier's apply lock (fcntl.flock; the kernel drops it when the process dies, even
    on kill -9); a second holder gets a ToolkitError saying who holds it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            raise ToolkitError(f"{path}: another apply of {Path(folder).name} is running ({holder}); "
                               "wait for it to finish, then apply again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _recover(folder: Path, *, locked: bool = False) -> None:
    """After a crash between the two renames of the fallback swap, put the old set back (never while
    another process holds the apply lock: that apply is between its renames and finishes them)."""
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
    if not olds:
        return
    if not locked:
        fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        try:
            _recover(folder, locked=True)
        finally:
            os.close(fd)
        return
    os.rename(olds[-1], folder)


def _carry_over(old: Path, new: Path, dataset_dirs: set[str]) -> None:
    """Everything in cleaned_data/NAME that is not the data set (decisions, cache, reports) goes along;
    symbolic links are not followed."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name == APPLIED_FILE or entry.is_symlink() or (entry.is_dir() and entry.name in dataset_dirs):
            continue
        if entry.is_dir():
            for dirpath, _dirs, names in os.walk(entry):
                for fname in names:
                    path = Path(dirpath) / fname
                    if path.is_file() and not path.is_symlink():
                        _link(path, new / path.relative_to(old))
        elif entry.is_file():
            _link(entry, new / entry.name)


def apply_decisions(raw: RawImages, log: DecisionLog, *, dry: bool = False) -> dict[str, Any]:
    """Materialise cleaned_data/NAME from raw files + decisions; returns counts, the diff and the
    refused decisions / unreadable raw files (`refused`). ToolkitError when another apply runs."""
    folder = log.folder
    _recover(folder)
    if dry:
        return {"dry_run": True, **dry_run(raw, log)}
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with apply_lock(folder):
        _recover(folder, locked=True)
        diff = dry_run(raw, log)
        state = log.state()
        refused: list[str] = []
        mapping = plan(raw, state, refused)
        # only one apply runs (the lock): what a killed apply left behind can go
        for stale in [*parent.glob(f".{folder.name}.apply-*"), *parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp: Path | None = parent / f".{folder.name}.apply-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        root = tmp.resolve()
        try:
            if folder.is_dir() and not log.path.exists():
                log.path.touch()  # so a decision made during this apply lands in the carried-over file
            old_dirs = {str(p).split("/", 1)[0] for p in read_applied(folder)["files"].values()}
            new_dirs = {p.split("/", 1)[0] for p in mapping.values()}
            _carry_over(folder, tmp, old_dirs | new_dirs | set(raw.classes))
            files = dict(zip(raw.rel, raw.files, strict=False))
            how = {"reflink": 0, "copy": 0}
            for rel, target in list(mapping.items()):
                dst = tmp / target
                if not dst.parent.resolve().is_relative_to(root):  # belt and braces: never outside
                    refused.append(f"{rel}: destination {target!r} leaves {folder}; left out")
                    del mapping[rel]
                    continue
                try:
                    how[_copy(files[rel], dst)] += 1
                except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
                    refused.append(f"{files[rel]}: cannot read it ({exc.strerror}); left out")
                    del mapping[rel]
                    dst.unlink(missing_ok=True)
            applied = {"time": _now(), "root": str(raw.root), "files": mapping,
                       "decisions": {f: d for f, d in state.items()}}
            (tmp / APPLIED_FILE).write_text(json.dumps(applied, indent=1) + "\n", encoding="utf-8")
            _sync_tree(tmp)
            if folder.exists():
                if not _exchange(tmp, folder):
                    old = parent / f".{folder.name}.old-{os.getpid()}"
                    os.rename(folder, old)
                    os.rename(tmp, folder)
                    tmp = old
            else:
                os.rename(tmp, folder)
                tmp = None
            _fsync_dir(parent)
        except OSError as exc:  # disk full, permission denied: the previous set is untouched
            where = exc.filename or tmp
            raise ToolkitError(f"{where}: {exc.strerror or exc} while building {folder}; "
                               "the previous cleaned set is untouched: free space or fix permissions, "
                               "then apply again") from None
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    for target in mapping.values():
        label = target.rsplit("/", 2)[-2]
        counts[label] = counts.get(label, 0) + 1
    return {"dry_run": False, "folder": str(folder), "kept": len(mapping), "per_class": counts,
            "deleted": sum(1 for d in state.values() if d["action"] == "delete"),
            "relabelled": sum(1 for d in state.values() if d["action"] == "relabel") - len(diff["refused"]),
            "copied": how["reflink"] + how["copy"], "reflinked": how["reflink"], **diff, "refused": refused}
