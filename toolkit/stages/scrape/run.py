"""The scrape run: candidates -> bounded concurrent download -> verified JPEGs + manifest, and its report.

    scrape(spec) fills scrape/NAME/<class>/<file>.jpg and appends one line per candidate to
    scrape/NAME/manifest.jsonl (accepted or not). Plain functions; the CLI is a thin face.

A run holds scrape/NAME/.lock (a second one says who holds it). Resume: a file is written to a
temporary name and renamed, then its manifest line is appended, flushed and fsynced (per batch).
At start the manifest is repaired (toolkit.stages.scrape.manifest) and the scraper's files that no
line names, in the classes being scraped, are moved to _quarantine/, so the class folders and the
manifest agree, nothing is deleted and a rerun never downloads a recorded URL twice.

Quota: web search stops at per_class images per class. A folder or URL-list import takes
everything unless a quota is set (per_class given, or written in settings.ini), and the summary
says what it skipped.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from toolkit.core.errors import ImageError, ToolkitError
from toolkit.core.images import COPY_HASH_BITS, open_image, perceptual_hash
from toolkit.stages.scrape.dedupe import Index, normalise_url, record_key
from toolkit.stages.scrape.http import Downloads, Fetched, fetch, read_local
from toolkit.stages.scrape.manifest import (
    MANIFEST,
    REJECTED,
    ManifestWriter,
    ScrapeError,
    check_class,
    class_dir,
    now,
    quarantine,
    repair_manifest,
    scrape_lock,
)
from toolkit.stages.scrape.sources import (
    Candidate,
    DdgsBackend,
    cached_search,
    file_stem_from_url,
    folder_classes,
    ingest_fashion_mnist,
    read_url_file,
    resolve_source,
)

BATCH = 64  # manifest lines per append + fsync at most

# ---------------------------------------------------------------- one candidate -> outcome


@dataclass
class Outcome:
    candidate: Candidate
    fetched: Fetched
    jpeg: bytes | None = None
    sha256: str | None = None
    phash: str | None = None
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    detail: str = ""


def _image_reason(message: str) -> str:
    text = message.lower()
    if "pixel limit" in text or "bomb" in text:
        return "too-many-pixels"
    if "truncated" in text:
        return "truncated"
    if "not an image" in text:
        return "not-an-image"
    return "undecodable"


_CPU_SLOTS = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))


def prepare(candidate: Candidate, *, max_size: int, fetch_options: dict[str, Any], max_pixels: int) -> Outcome:
    """Fetch, fully decode (toolkit.core.images.open_image), RGB, shrink to max_size, JPEG, hashes.

    Many threads wait on the network; only as many as there are cores decode at once (more
    threads decoding under the GIL made the whole run several times slower on 2 cores).
    """
    max_bytes = fetch_options.get("max_bytes", 10 * 1024 * 1024)
    fetched = read_local(Path(candidate.url), max_bytes) if candidate.local else fetch(candidate.url, **fetch_options)
    if fetched.data is None:
        return Outcome(candidate, fetched, reason=fetched.reason, detail=fetched.detail)
    with _CPU_SLOTS:
        return _decode(candidate, fetched, max_size=max_size, max_bytes=max_bytes, max_pixels=max_pixels)


def _decode(candidate: Candidate, fetched: Fetched, *, max_size: int, max_bytes: int, max_pixels: int) -> Outcome:
    try:
        img = open_image(fetched.data, name=candidate.url[:200], max_pixels=max_pixels, max_bytes=max_bytes,
                         draft_size=max_size)
    except ImageError as exc:
        return Outcome(candidate, fetched, reason=_image_reason(str(exc)), detail=str(exc)[:200])
    if min(img.size) < 16:
        return Outcome(candidate, fetched, reason="too-small", detail=f"{img.size[0]}x{img.size[1]} pixels")
    img.thumbnail((max_size, max_size), resample=Image.Resampling.BILINEAR)  # fastai's resize_image default
    phash = perceptual_hash(img)  # of the saved pixels (phash survives the resize; 4x cheaper)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return Outcome(candidate, fetched, jpeg=buffer.getvalue(), sha256=hashlib.sha256(fetched.data).hexdigest(),
                   phash=phash, width=img.size[0], height=img.size[1])


# ---------------------------------------------------------------- the report


@dataclass
class ClassReport:
    cls: str
    quota: int | None  # None: a folder or URL-list import without a quota (take everything)
    candidates: int = 0
    ok: int = 0
    duplicates: int = 0
    conflicts: int = 0
    skipped: int = 0  # candidates of a folder or URL list left untried because the quota was reached
    rejected: Counter = field(default_factory=Counter)

    @property
    def shortfall(self) -> int:
        return max(0, self.quota - self.ok) if self.quota else 0


@dataclass
class ScrapeReport:
    root: Path
    classes: dict[str, ClassReport]
    web: bool = True  # a web search (the shortfall advice is about queries)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        header = (f"{'class':<20} {'candidates':>10} {'ok':>5} {'dups':>5} {'conflicts':>9} {'short':>5} "
                  f"{'skipped':>7}  rejected")
        lines = [header]
        for rep in self.classes.values():
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(rep.rejected.items())) or "-"
            lines.append(f"{rep.cls[:20]:<20} {rep.candidates:>10} {rep.ok:>5} {rep.duplicates:>5} "
                         f"{rep.conflicts:>9} {rep.shortfall:>5} {rep.skipped:>7}  {rejected}")
        short = {c: r.shortfall for c, r in self.classes.items() if r.shortfall}
        if short:
            advice = ("add query templates, raise the source's size or accept fewer" if self.web else
                      "the source holds fewer usable images than the quota; add images or lower the quota")
            lines.append("shortfall: " + ", ".join(f"{c} {n}" for c, n in short.items()) + f" ({advice})")
        return "\n".join(lines + self.notes)

    def as_dict(self) -> dict[str, Any]:
        return {c: {"candidates": r.candidates, "ok": r.ok, "duplicates": r.duplicates, "conflicts": r.conflicts,
                    "rejected": dict(r.rejected), "shortfall": r.shortfall, "skipped": r.skipped}
                for c, r in self.classes.items()}


def _report_from(records: list[dict[str, Any]], cls: str, quota: int | None) -> ClassReport:
    """Counts of a class, one per candidate: a URL retried after a transient failure counts once."""
    report = ClassReport(cls, quota)
    latest: dict[str, dict[str, Any]] = {}
    for number, record in enumerate(records):
        if record.get("class") == cls:
            latest[record_key(record) or f"#{number}"] = record
    for record in latest.values():
        _count(report, record)
    return report


def _count(report: ClassReport, record: dict[str, Any]) -> None:
    report.candidates += 1
    status = str(record.get("status", ""))
    if status == "ok":
        report.ok += 1
    elif status.startswith("duplicate-of:"):
        report.duplicates += 1
        report.conflicts += bool(record.get("conflict"))
    elif status.startswith("rejected:"):
        report.rejected[status.split(":", 1)[1]] += 1


def _accept(outcome: Outcome, root: Path, target_dir: Path, index: Index) -> dict[str, Any]:
    """Decide ok / duplicate / rejected; write the file atomically when ok. Returns the manifest line."""
    c = outcome.candidate
    record: dict[str, Any] = {
        "class": c.cls, "query": c.query, "backend": c.backend, "rank": c.rank,
        "url": None if c.local else c.url, "page_url": c.page_url, "title": c.title, "time": now(),
        "http_status": outcome.fetched.http_status,
        "bytes": len(outcome.fetched.data) if outcome.fetched.data is not None else None,
        "sha256": outcome.sha256, "phash": outcome.phash, "width": outcome.width, "height": outcome.height,
        "file": None, "status": "", "source": c.source,
    }
    if outcome.reason:
        record["status"] = f"rejected:{outcome.reason}"
        record["error"] = outcome.detail
        return record
    assert outcome.sha256 and outcome.phash and outcome.jpeg is not None
    twin = index.twin(c.cls, outcome.sha256, outcome.phash)
    if twin is not None:
        record["status"] = f"duplicate-of:{twin['file']}"
        if twin["class"] != c.cls:
            record["conflict"] = twin["class"]  # the same image under two labels: the cleaner shows it
        return record
    name = f"s-{file_stem_from_url(c.url)}-{outcome.sha256[:12]}.jpg"
    path = target_dir / name
    partial = path.with_name(name + ".part")
    with open(partial, "wb") as handle:
        handle.write(outcome.jpeg)
    os.replace(partial, path)
    record["file"] = path.relative_to(root).as_posix()
    record["status"] = "ok"
    return record


# ---------------------------------------------------------------- the run


def _progress(total: int, comment: str, enabled: bool):
    if not enabled:
        return None
    from fastprogress.fastprogress import progress_bar

    bar = progress_bar(range(total), total=total, leave=True)
    bar.comment = comment  # the console bar (fastprogress 1.1) takes no comment argument
    bar.update(0)
    return bar


def per_class_written(spec: Any, settings_path: Path | None = None) -> bool:
    """Whether settings.ini sets per_class for the section (or in [DEFAULT]): a quota the user chose
    (`ClassifierSpec.explicit` holds the keys the file sets)."""
    return "per_class" in spec.explicit


def _checked_classes(spec: Any, classes: list[str] | None, available: list[str]) -> list[str]:
    from toolkit.core.names import check_unique

    if classes:
        given = [check_class(c) for c in classes]
        return check_unique(given, "--classes")
    if spec.classes:
        try:
            return check_unique([check_class(c) for c in spec.classes], "classes")
        except ToolkitError as exc:
            raise ScrapeError(f"settings [{spec.name}] classes: {exc}") from None
    return list(available)


@dataclass
class _ClassState:
    report: ClassReport
    stream: Iterator[Candidate]
    dir: Path
    queued: set[str] = field(default_factory=set)
    in_flight: int = 0
    exhausted: bool = False
    bar: Any = None
    error: ScrapeError | None = None

    def wanted(self) -> float:
        quota = self.report.quota
        return (quota - self.report.ok) if quota else math.inf


def scrape(spec: Any, *, source: str | None = None, classes: list[str] | None = None, per_class: int | None = None,
           search: Callable[..., list[dict[str, Any]]] | None = None, backend_name: str | None = None,
           workers: int = 32, timeout: float = 10.0, max_bytes: int = 10 * 1024 * 1024, max_redirects: int = 5,
           fetch_retries: int = 2, search_retries: int = 4, backoff_base: float = 2.0, backoff_cap: float = 60.0,
           max_pixels: int = 40_000_000, phash_distance: int = COPY_HASH_BITS,
           sleep: Callable[[float], None] | None = None,
           allow_private_urls: bool | None = None, trusted_hosts: Collection[str] = (),
           settings_path: Path | None = None, progress: bool = False,
           log: Callable[[str], None] = lambda line: None) -> ScrapeReport:
    """Fill spec.scrape_dir with verified, de-duplicated JPEGs per class, with provenance; see the module.

    `search` injects a search backend (see sources.SearchBackend); otherwise `source` (or the spec's)
    picks one. `allow_private_urls` (default: the section's key) lets loopback and private addresses
    be fetched. `settings_path` tells whether per_class is written in settings.ini (see per_class_written).
    `phash_distance`: a download whose perceptual hash is this many bits from an accepted one is its copy (kept tight:
    a rejected photo is lost to the data set, while a copy let through still shows in the cleaner's duplicates).
    """
    sleep = sleep or time.sleep
    if per_class is not None and per_class <= 0:
        raise ScrapeError(f"--per-class {per_class}: must be a positive whole number")
    source = "ddgs" if search is not None and source is None else resolve_source(spec, source)
    root = spec.scrape_dir
    if source.startswith("fashion-mnist"):
        quota = per_class or spec.per_class
        with scrape_lock(root):
            counts = ingest_fashion_mnist(root, source, per_class=quota, seed=spec.seed, progress=progress)
        return ScrapeReport(root, {c: ClassReport(c, quota, candidates=n, ok=n) for c, n in counts.items()},
                            web=False)

    # candidates per class, lazily
    url_lines: dict[str, list[tuple[int, str]]] = {}
    folder_files: dict[str, list[Path]] = {}
    notes: list[str] = []
    if source.startswith("urls:"):
        url_lines = read_url_file(Path(source[5:]).expanduser())
        available = list(url_lines)
    elif source.startswith("folder:"):
        folder_files, not_classes = folder_classes(Path(source[7:]).expanduser())
        available = list(folder_files)
        if not_classes:
            notes.append(f"folder(s) {', '.join(not_classes)} of {source[7:]} skipped: names starting with '_' "
                         "are not classes")
    elif source == "ddgs":
        available = []
        if search is None:
            search = DdgsBackend(timeout=int(max(timeout, 1)))
        backend_name = backend_name or getattr(search, "name", "ddgs")
    else:
        raise ScrapeError(f"--source {source}: unknown source; use ddgs, fashion-mnist[:DIR], folder:PATH "
                          "or urls:FILE")
    web = not (url_lines or folder_files)
    if web:
        quota: int | None = per_class or spec.per_class
    elif per_class:
        quota = per_class
    else:
        quota = spec.per_class if per_class_written(spec, settings_path) else None
    wanted = _checked_classes(spec, classes, available)
    if not wanted:
        raise ScrapeError(f"settings [{spec.name}] classes: no classes to scrape; add `classes = a, b` to "
                          f"[{spec.name}] or pass --classes a,b")
    if available:
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ScrapeError(f"--source {source}: has no class {', '.join(map(repr, missing))}; "
                              f"it has: {', '.join(available)}")
    allow_private = getattr(spec, "allow_private_urls", False) if allow_private_urls is None else allow_private_urls

    with scrape_lock(root):
        records, set_aside = repair_manifest(root)
        if set_aside:
            notes.append(f"set aside {set_aside} unreadable manifest line(s) in {root / REJECTED}")
        moved, folder = quarantine(root, records, wanted)
        if moved:
            line = (f"moved {moved} file(s) that the manifest does not name (left by an interrupted run) to "
                    f"{folder}; nothing was deleted")
            notes.append(line)
            log(line)
        report = _run(spec, root, records, wanted, quota, web=web, url_lines=url_lines, folder_files=folder_files,
                      source=source, search=search, backend_name=backend_name, workers=workers,
                      fetch_options={"timeout": timeout, "max_bytes": max_bytes, "max_redirects": max_redirects,
                                     "retries": fetch_retries, "retry_base": min(backoff_base, 0.5), "sleep": sleep,
                                     "allow_private": allow_private, "trusted_hosts": tuple(trusted_hosts)},
                      backoff={"retries": search_retries, "base": backoff_base, "cap": backoff_cap, "sleep": sleep},
                      max_pixels=max_pixels, phash_distance=phash_distance, progress=progress, log=log)
    report.notes[:0] = notes
    return report


def _run(spec: Any, root: Path, records: list[dict[str, Any]], wanted: list[str], quota: int | None, *, web: bool,
         url_lines: dict[str, list[tuple[int, str]]], folder_files: dict[str, list[Path]], source: str,
         search: Callable[..., list[dict[str, Any]]] | None, backend_name: str | None, workers: int,
         fetch_options: dict[str, Any], backoff: dict[str, Any], max_pixels: int, phash_distance: int,
         progress: bool, log: Callable[[str], None]) -> ScrapeReport:
    index = Index(records, phash_distance)
    cache_dir = root / ".cache" / "queries"
    options = {"region": spec.region, "safesearch": spec.safesearch, "size": spec.image_size or None,
               "type_image": spec.type_image or None, "layout": spec.layout or None,
               "license_image": spec.license_image or None}
    backoff["hint"] = (f"wait a few minutes and rerun `toolkit scrape {spec.name}`: accepted images are kept in "
                       f"{root / MANIFEST} and finished queries are cached in {cache_dir}")
    downloads = Downloads()
    fetch_options = {**fetch_options, "downloads": downloads}

    def candidates_for(cls: str) -> Iterator[Candidate]:
        if url_lines:
            for number, url in url_lines[cls]:
                yield Candidate(cls, url, "urls", number, source=source[5:])
        elif folder_files:
            for rank, path in enumerate(folder_files[cls], 1):
                yield Candidate(cls, str(path.resolve()), "folder", rank, source=str(path.resolve()), local=True)
        else:
            templates = spec.queries or ["{class}"]
            for max_results in (max(2 * quota, 30), max(6 * quota, 90)):
                for template in templates:
                    query = template.replace("{class}", cls)
                    results = cached_search(search, backend_name, query, max_results=max_results, options=options,
                                            cache_dir=cache_dir, **backoff)
                    for rank, result in enumerate(results, 1):
                        if result.get("image"):
                            yield Candidate(cls, result["image"], backend_name, rank, query=query,
                                            page_url=result.get("url"), title=result.get("title"),
                                            source=result.get("source"))

    def bar_total(cls: str) -> int:
        if quota:
            return quota
        return len(url_lines.get(cls, ())) or len(folder_files.get(cls, ()))

    # One pool for all classes, results handled in submission order (deterministic dedupe): while a
    # class waits for its last answers the next class's downloads already run. A class never has
    # more downloads in flight than it still needs, so nothing is fetched only to be thrown away.
    states: dict[str, _ClassState] = {}
    for cls in wanted:
        states[cls] = _ClassState(_report_from(records, cls, quota), iter(candidates_for(cls)), class_dir(root, cls))
    limit = 2 * max(1, workers)
    fifo: deque[tuple[str, Future]] = deque()
    manifest = ManifestWriter(root)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    batch: list[dict[str, Any]] = []
    try:
        while True:
            for cls, st in states.items():
                while len(fifo) < limit and not st.exhausted and st.in_flight < st.wanted():
                    try:
                        candidate = next(st.stream, None)
                    except ScrapeError as exc:  # search gave up: finish the other classes, then report
                        st.error, candidate = exc, None
                    if candidate is None:
                        st.exhausted = True
                        break
                    key = normalise_url(candidate.url)
                    if key in st.queued or index.seen_url(cls, candidate.url):
                        continue
                    st.queued.add(key)
                    st.in_flight += 1
                    if st.bar is None and progress:
                        st.bar = _progress(bar_total(cls), cls, progress)
                        st.bar.update(st.report.ok)
                    st.dir.mkdir(exist_ok=True)
                    fifo.append((cls, pool.submit(prepare, candidate, max_size=spec.max_size,
                                                  fetch_options=fetch_options, max_pixels=max_pixels)))
                if len(fifo) >= limit:
                    break
            if not fifo:
                break
            batch = []
            while fifo and (not batch or (fifo[0][1].done() and len(batch) < BATCH)):
                cls, future = fifo.popleft()
                st = states[cls]
                st.in_flight -= 1
                record = _accept(future.result(), root, st.dir, index)
                index.add(record)
                batch.append(record)
            manifest.append(batch)
            done, batch = batch, []
            for record in done:
                st = states[record["class"]]
                records.append(record)
                _count(st.report, record)
                if st.bar is not None:
                    st.bar.update(min(st.report.ok, bar_total(record["class"])))
                    if st.exhausted and not st.in_flight and st.report.shortfall:
                        print(flush=True)  # end the unfinished bar's line (a shortfall)
                        st.bar = None
    except BaseException:
        downloads.stop()  # Ctrl-C or a failure: close every connection now, wait for none
        pool.shutdown(wait=False, cancel_futures=True)
        try:
            manifest.append(batch)  # files already written get their lines
        except OSError:
            pass
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        manifest.close()
    notes = _quota_notes(spec, states, index, quota, web, folder_files)
    for cls, st in states.items():
        if st.report.shortfall and not st.error:
            log(f"{cls}: {st.report.ok} of {quota} images (shortfall {st.report.shortfall})")
    errors = [st.error for st in states.values() if st.error]
    if errors:
        raise errors[0]
    report = ScrapeReport(root, {cls: _report_from(records, cls, quota) for cls in wanted}, web=web, notes=notes)
    for cls, st in states.items():
        report.classes[cls].skipped = st.report.skipped
    return report


def _quota_notes(spec: Any, states: dict[str, _ClassState], index: Index, quota: int | None, web: bool,
                 folder_files: dict[str, list[Path]]) -> list[str]:
    """Say what a folder or URL-list import left out because of its quota, or that it took everything."""
    if web:
        return []
    kind = "folder" if folder_files else "URL list"
    if quota is None:
        total = sum(st.report.candidates for st in states.values())
        return [f"{kind} import: took every image of the source ({total} candidate(s)); no quota is set "
                f"(pass --per-class N or set per_class in [{spec.name}] to take fewer)"]
    for cls, st in states.items():
        if not st.exhausted:  # the quota stopped it: count what is left untried
            st.report.skipped = sum(1 for c in st.stream if normalise_url(c.url) not in st.queued
                                    and not index.seen_url(cls, c.url))
    skipped = {cls: st.report.skipped for cls, st in states.items() if st.report.skipped}
    if not skipped:
        return []
    return [f"{kind} import: skipped {sum(skipped.values())} image(s) beyond the quota of {quota} per class "
            f"({', '.join(f'{c} {n}' for c, n in skipped.items())}); the quota comes from --per-class or "
            f"per_class in [{spec.name}]: raise it, or leave both unset to take everything"]


def add_class_to_settings(settings_path: Path, section: str, cls: str, existing: Iterable[str] = ()) -> bool:
    """Append `cls` to [section]'s `classes` in settings.ini (`settings.set_keys`: comments stay).

    The name is checked first (toolkit.core.names: no control characters, separators, leading '.'
    or '_'; NFC), so nothing but one class name can reach the file. Returns False when the class is
    already listed. Without a `classes` key one is added holding `existing` (the classes found so
    far) and the new one.
    """
    from toolkit.core.config import parse_list as _parse_list
    from toolkit.core.config import read_config
    from toolkit.core.names import check_unique
    from toolkit.settings import set_keys

    if "," in str(cls):
        raise ScrapeError(f"--add-class {cls.strip()!r}: a class name must be non-empty and hold no comma")
    cls = check_class(cls, "--add-class")
    config = read_config(Path(settings_path))
    if not config.has_section(section):
        raise ScrapeError(f"{settings_path}: no [{section}] section to add {cls!r} to")
    if config.has_option(section, "classes"):
        current = _parse_list(config.get(section, "classes"))
        if cls in current:
            return False
    else:
        current = list(existing)
    check_unique([*current, cls], f"[{section}] classes with --add-class {cls!r}")
    set_keys(settings_path, section, {"classes": ", ".join(dict.fromkeys([*current, cls]))})
    return True
