"""Scrape: search backends -> candidates -> bounded concurrent download -> verified JPEGs + manifest.

    scrape(spec) fills scrape/NAME/<class>/<file>.jpg and appends one line per candidate to
    scrape/NAME/manifest.jsonl (accepted or not). Plain functions; the CLI is a thin face.

Sources: `ddgs` (web image search through `ddgs.DDGS().images`), `folder:PATH` (an existing
class-folder data set), `urls:FILE` (lines `class<TAB>url`), `fashion-mnist[:DIR]` (delegates to
toolkit.stages.scrape.fashion_mnist.ingest). Any callable `search(query, *, max_results, **options) -> list[dict]`
returning ddgs-shaped dicts (title, image, thumbnail, url, height, width, source) can be injected.

Resume: a file is written to a temporary name and renamed, then its manifest line is appended and
flushed. At start a torn last manifest line is cut off, temporary files are removed and files that
no manifest line names (killed between rename and append) are removed, so the folder and the
manifest always agree and a rerun never downloads a recorded URL twice.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import random
import re
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit, urlunsplit

from PIL import Image

from toolkit.core.errors import ImageError, ToolkitError
from toolkit.core.images import IMAGE_EXTENSIONS, open_image, perceptual_hash

RESULT_FIELDS = ("title", "image", "thumbnail", "url", "height", "width", "source")
MANIFEST = "manifest.jsonl"
PARTIAL_SUFFIXES = (".part", ".tmp")
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) toolkit-scrape/0.1"
MAGIC = [(b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff")]


class ScrapeError(ToolkitError):
    """A scrape that cannot go on (bad source, search failing after retries); the message is one line."""


class TransientError(Exception):
    """A failure worth retrying (rate limit, timeout, 5xx)."""


# ---------------------------------------------------------------- search backends


class SearchBackend(Protocol):
    """`backend(query, max_results=N, **options)` -> list of dicts with RESULT_FIELDS."""

    name: str

    def __call__(self, query: str, *, max_results: int, **options: Any) -> list[dict[str, Any]]: ...


def map_ddgs_result(raw: dict[str, Any]) -> dict[str, Any]:
    """One `DDGS().images` result -> our result dict (same field names; missing ones are None)."""
    result = {key: raw.get(key) for key in RESULT_FIELDS}
    for key in ("height", "width"):
        try:
            result[key] = int(result[key]) if result[key] not in (None, "") else None
        except (TypeError, ValueError):
            result[key] = None
    return result


class DdgsBackend:
    """Web image search through the `ddgs` package (the successor of duckduckgo-search)."""

    name = "ddgs"

    def __init__(self, timeout: int = 10):
        self.timeout = timeout

    def __call__(self, query: str, *, max_results: int, region: str = "wt-wt", safesearch: str = "moderate",
                 size: str | None = None, type_image: str | None = None, layout: str | None = None,
                 license_image: str | None = None) -> list[dict[str, Any]]:
        from ddgs import DDGS
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

        try:
            raw = DDGS(timeout=self.timeout).images(
                query, region=region, safesearch=safesearch, size=size or None, type_image=type_image or None,
                layout=layout or None, license_image=license_image or None, max_results=max_results)
        except (RatelimitException, TimeoutException):
            raise
        except DDGSException as exc:
            if "no results" in str(exc).lower():
                return []
            raise
        return [map_ddgs_result(r) for r in raw or []]


def _retryable() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [TransientError, TimeoutError, ConnectionError]
    try:
        from ddgs.exceptions import DDGSException

        kinds.append(DDGSException)
    except ImportError:  # pragma: no cover - ddgs is a dependency
        pass
    return tuple(kinds)


def backoff_delays(retries: int, base: float, cap: float, rng: random.Random | None = None) -> list[float]:
    """Exponential backoff with 'equal jitter': try i waits between half and all of min(cap, base*2**i)."""
    rng = rng or random.Random()
    delays = []
    for attempt in range(retries):
        ceiling = min(cap, base * 2**attempt)
        delays.append(ceiling / 2 + rng.uniform(0, ceiling / 2))
    return delays


def with_backoff(call: Callable[[], Any], *, what: str, retries: int = 4, base: float = 2.0, cap: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep, hint: str = "") -> Any:
    """call() with bounded retries on rate limits, timeouts and HTTP errors; then one ScrapeError line."""
    kinds = _retryable()
    delays = backoff_delays(retries, base, cap)
    for attempt in range(retries + 1):
        try:
            return call()
        except kinds as exc:
            if attempt == retries:
                first = (str(exc).splitlines() or [""])[0][:200]
                raise ScrapeError(f"{what} failed after {retries + 1} tries ({type(exc).__name__}: {first}); "
                                  f"{hint or 'wait a few minutes and rerun'}") from None
            sleep(delays[attempt])
    raise AssertionError("unreachable")


def cached_search(backend: Callable[..., list[dict[str, Any]]], backend_name: str, query: str, *, max_results: int,
                  options: dict[str, Any], cache_dir: Path, **backoff: Any) -> list[dict[str, Any]]:
    """Search results from cache_dir/<hash>.json, or from the backend (with backoff) then cached."""
    key = json.dumps([backend_name, query, max_results, sorted(options.items())])
    path = cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["results"]
        except (ValueError, KeyError):
            pass  # a damaged cache entry is simply redone
    results = with_backoff(lambda: backend(query, max_results=max_results, **options),
                           what=f"{backend_name} search {query!r}", **backoff)
    results = [map_ddgs_result(r) for r in results]
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"query": query, "backend": backend_name, "max_results": max_results,
                                    "options": options, "time": _now(), "results": results}).encode())
    return results


# ---------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One image to try for one class."""

    cls: str
    url: str  # image URL (or the original path for folder:)
    backend: str
    rank: int
    query: str | None = None
    page_url: str | None = None
    title: str | None = None
    source: str | None = None  # folder: the original file; ddgs: the engine name
    local: bool = False


def read_url_file(path: Path) -> dict[str, list[tuple[int, str]]]:
    """`class<TAB>url` lines (blank lines and # comments skipped) -> {class: [(line, url)]}."""
    if not path.is_file():
        raise ScrapeError(f"--source urls:{path}: file not found (lines of class<TAB>url)")
    by_class: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ScrapeError(f"{path}:{number}: expected class<TAB>url, got {line[:80]!r}")
        by_class.setdefault(parts[0].strip(), []).append((number, parts[1].strip()))
    return by_class


def folder_classes(path: Path) -> dict[str, list[Path]]:
    if not path.is_dir():
        raise ScrapeError(f"--source folder:{path}: not a folder (it needs one sub-folder of images per class)")
    found = {d.name: sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
             for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not found:
        raise ScrapeError(f"--source folder:{path}: no class sub-folders found")
    return found


# ---------------------------------------------------------------- names and paths


def safe_name(name: str, fallback: str = "_") -> str:
    """A single safe path component: no separators, no control characters, no leading dots."""
    text = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]", "_", name).strip().lstrip(".").strip()
    return text[:100] or fallback


def class_dir(root: Path, cls: str) -> Path:
    path = root / safe_name(cls)
    if path.resolve().parent != root.resolve():  # belt and braces: never outside scrape/NAME
        raise ScrapeError(f"class name {cls!r} would write outside {root}")
    return path


def file_stem_from_url(url: str) -> str:
    stem = Path(unquote(urlsplit(url).path)).stem if "://" in url else Path(url).stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return stem[:40] or "image"


def normalise_url(url: str) -> str:
    """Same resource, same string: lower-case scheme and host, default port, fragment and tracking
    parameters dropped, query parameters sorted, path escapes made canonical."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return url.strip()
    port = port if port and (scheme, port) not in (("http", 80), ("https", 443)) else None
    netloc = f"{host}:{port}" if port else host
    path = quote(unquote(parts.path or "/"), safe="/%:@!$&'()*+,;=-._~")
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                             if not k.lower().startswith("utm_")))
    return urlunsplit((scheme, netloc, path, query, ""))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- fetching


@dataclass
class Fetched:
    """What came back for one URL: the body, or why not."""

    data: bytes | None = None
    http_status: int | None = None
    reason: str | None = None  # short token for `rejected:<reason>`
    detail: str = ""
    final_url: str | None = None


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes, or None (an HTML page is never an image)."""
    for magic, kind in MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def fetch(url: str, *, timeout: float = 10.0, max_bytes: int = 10 * 1024 * 1024, max_redirects: int = 5,
          retries: int = 2, retry_base: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """GET an http(s) URL: bounded redirects, per-request timeout, streamed size cap, 5xx retries, sniffing."""
    delays = backoff_delays(retries, retry_base, 10.0)
    current = url
    redirects = 0
    attempt = 0
    while True:
        try:
            parts = urlsplit(current)
            port = parts.port
        except ValueError:
            return Fetched(reason="bad-url", detail=f"not a valid URL: {current[:100]}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Fetched(reason="bad-scheme", detail=f"only http(s) URLs are fetched: {current[:100]}")
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kwargs: dict[str, Any] = {"timeout": timeout}
        if parts.scheme == "https":
            kwargs["context"] = ssl.create_default_context()
        conn = conn_class(parts.hostname, port, **kwargs)
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        deadline = time.monotonic() + timeout
        try:
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
            resp = conn.getresponse()
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    return Fetched(http_status=status, reason=f"http-{status}", detail="redirect without Location")
                redirects += 1
                if redirects > max_redirects:
                    return Fetched(http_status=status, reason="too-many-redirects",
                                   detail=f"more than {max_redirects} redirects")
                current = urljoin(current, location)
                continue
            if status >= 500 or status == 429:
                if attempt < retries:
                    sleep(delays[attempt])
                    attempt += 1
                    continue
                return Fetched(http_status=status, reason=f"http-{status}",
                               detail=f"HTTP {status} after {attempt + 1} tries")
            if status != 200:
                return Fetched(http_status=status, reason=f"http-{status}", detail=f"HTTP {status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                return Fetched(http_status=status, reason="too-large",
                               detail=f"Content-Length {length} is over the {max_bytes} byte limit")
            chunks, total = [], 0
            while True:
                chunk = resp.read(min(65536, max_bytes + 1 - total))
                if not chunk:
                    break
                if not chunks and sniff(chunk[:16]) is None and len(chunk) >= 12:
                    kind = resp.getheader("Content-Type", "?")
                    return Fetched(http_status=status, reason="not-an-image",
                                   detail=f"content is not an image (served as {kind})")
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    return Fetched(http_status=status, reason="too-large",
                                   detail=f"body over the {max_bytes} byte limit (stopped reading)")
                if time.monotonic() > deadline:
                    return Fetched(http_status=status, reason="timeout", detail=f"body took over {timeout} s")
            data = b"".join(chunks)
            if sniff(data[:16]) is None:
                kind = resp.getheader("Content-Type", "?")
                return Fetched(http_status=status, reason="not-an-image", detail=f"not an image (served as {kind})")
            return Fetched(data=data, http_status=status, final_url=current)
        except TimeoutError:
            return Fetched(reason="timeout", detail=f"no answer within {timeout} s")
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            if attempt < retries and not isinstance(exc, ssl.SSLError):
                sleep(delays[attempt])
                attempt += 1
                continue
            return Fetched(reason="connection-error", detail=f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            conn.close()


def read_local(path: Path, max_bytes: int) -> Fetched:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Fetched(reason="too-large", detail=f"{size} bytes is over the {max_bytes} byte limit")
        return Fetched(data=path.read_bytes())
    except OSError as exc:
        return Fetched(reason="unreadable", detail=str(exc)[:120])


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


# ---------------------------------------------------------------- manifest


def load_manifest(root: Path) -> list[dict[str, Any]]:
    """Manifest lines; a torn last line (killed mid-write) is cut off the file."""
    path = root / MANIFEST
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, good_end, offset = [], 0, 0
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            if offset == len(raw):
                break
            raise ScrapeError(f"{path}: line {len(records) + 1} is not JSON; fix or remove it") from None
        good_end = offset
    if good_end != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return records


def tidy(root: Path, records: list[dict[str, Any]]) -> int:
    """Remove temporary files and downloaded files that no manifest line names; returns how many."""
    named = {r["file"] for r in records if r.get("file")}
    removed = 0
    for path in root.rglob("*"):
        if not path.is_file() or ".cache" in path.relative_to(root).parts:
            continue
        relative = path.relative_to(root).as_posix()
        if path.name.endswith(PARTIAL_SUFFIXES) or (path.suffix == ".jpg" and path.parent != root
                                                    and relative not in named and path.name.startswith("s-")):
            path.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------- the run


@dataclass
class ClassReport:
    cls: str
    quota: int
    candidates: int = 0
    ok: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: Counter = field(default_factory=Counter)

    @property
    def shortfall(self) -> int:
        return max(0, self.quota - self.ok)


@dataclass
class ScrapeReport:
    root: Path
    classes: dict[str, ClassReport]

    def format(self) -> str:
        header = f"{'class':<20} {'candidates':>10} {'ok':>5} {'dups':>5} {'conflicts':>9} {'short':>5}  rejected"
        lines = [header]
        for rep in self.classes.values():
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(rep.rejected.items())) or "-"
            lines.append(f"{rep.cls[:20]:<20} {rep.candidates:>10} {rep.ok:>5} {rep.duplicates:>5} "
                         f"{rep.conflicts:>9} {rep.shortfall:>5}  {rejected}")
        short = {c: r.shortfall for c, r in self.classes.items() if r.shortfall}
        if short:
            lines.append("shortfall: " + ", ".join(f"{c} {n}" for c, n in short.items()) +
                         " (add query templates, raise the source's size or accept fewer)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {c: {"candidates": r.candidates, "ok": r.ok, "duplicates": r.duplicates, "conflicts": r.conflicts,
                    "rejected": dict(r.rejected), "shortfall": r.shortfall} for c, r in self.classes.items()}


class _Index:
    """What is already accepted: by URL, sha256 and perceptual hash, across classes."""

    def __init__(self, records: list[dict[str, Any]], distance: int):
        self.distance = distance
        self.urls: dict[str, set[str]] = {}
        self.accepted: list[tuple[int, dict[str, Any]]] = []  # (phash as int, record)
        for record in records:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        key = _record_key(record)
        if key and not _transient(record):  # a timeout or a 5xx is tried again by the next run
            self.urls.setdefault(record["class"], set()).add(key)
        if record.get("status") == "ok" and record.get("file"):
            self.accepted.append((int(record["phash"], 16) if record.get("phash") else -1, record))

    def seen_url(self, cls: str, url: str) -> bool:
        return normalise_url(url) in self.urls.get(cls, set())

    def twin(self, cls: str, sha: str, phash: str) -> dict[str, Any] | None:
        """An accepted record that is the same image (sha256) or a near copy (phash), same class first."""
        best, wanted = None, int(phash, 16)
        for value, record in self.accepted:
            same = record.get("sha256") == sha or (value >= 0 and (value ^ wanted).bit_count() <= self.distance)
            if same:
                if record["class"] == cls:
                    return record
                best = best or record
        return best


def _progress(total: int, comment: str, enabled: bool):
    if not enabled:
        return None
    from fastprogress.fastprogress import progress_bar

    bar = progress_bar(range(total), total=total, leave=True)
    bar.comment = comment  # the console bar (fastprogress 1.1) takes no comment argument
    bar.update(0)
    return bar


def resolve_source(spec, source: str | None) -> str:
    """The source to use: the given one (paths relative to the working folder), else the section's
    `source` key (paths relative to settings.ini), where auto means fashion-mnist for a section
    named fashion-mnist and ddgs for any other."""
    if source:
        return source
    source = getattr(spec, "source", "auto") or "auto"
    if source == "auto":
        return "fashion-mnist" if spec.name == "fashion-mnist" else "ddgs"
    kind, _, path = source.partition(":")
    if path and not Path(path).expanduser().is_absolute():
        return f"{kind}:{spec.root / path}"
    return source


def scrape(spec, *, source: str | None = None, classes: list[str] | None = None, per_class: int | None = None,
           search: Callable[..., list[dict[str, Any]]] | None = None, backend_name: str | None = None,
           workers: int = 32, timeout: float = 10.0, max_bytes: int = 10 * 1024 * 1024, max_redirects: int = 5,
           fetch_retries: int = 2, search_retries: int = 4, backoff_base: float = 2.0, backoff_cap: float = 60.0,
           max_pixels: int = 40_000_000, phash_distance: int = 4, sleep: Callable[[float], None] | None = None,
           progress: bool = False, log: Callable[[str], None] = lambda line: None) -> ScrapeReport:
    """Fill spec.scrape_dir with up to per_class verified, de-duplicated JPEGs per class, with provenance.

    `search` injects a search backend (see SearchBackend); otherwise `source` (or the spec's) picks one.
    """
    per_class = per_class or spec.per_class
    sleep = sleep or time.sleep
    if per_class <= 0:
        raise ScrapeError(f"--per-class {per_class}: must be a positive whole number")
    source = "ddgs" if search is not None and source is None else resolve_source(spec, source)
    root = spec.scrape_dir
    if source.startswith("fashion-mnist"):
        from toolkit.stages.scrape import fashion_mnist

        folder = Path(source.split(":", 1)[1]) if ":" in source else fashion_mnist.FASHION_MNIST_DIR
        counts = fashion_mnist.ingest(root, split="train", per_class=per_class, seed=spec.seed, folder=folder,
                                      progress=progress)
        return ScrapeReport(root, {c: ClassReport(c, per_class, candidates=n, ok=n) for c, n in counts.items()})

    # candidates per class, lazily
    url_lines: dict[str, list[tuple[int, str]]] = {}
    folder_files: dict[str, list[Path]] = {}
    if source.startswith("urls:"):
        url_lines = read_url_file(Path(source[5:]).expanduser())
        available = list(url_lines)
    elif source.startswith("folder:"):
        folder_files = folder_classes(Path(source[7:]).expanduser())
        available = list(folder_files)
    elif source == "ddgs":
        available = []
        if search is None:
            search = DdgsBackend(timeout=int(max(timeout, 1)))
        backend_name = backend_name or getattr(search, "name", "ddgs")
    else:
        raise ScrapeError(f"--source {source}: unknown source; use ddgs, fashion-mnist[:DIR], folder:PATH "
                          "or urls:FILE")
    wanted = list(classes or spec.classes or available)
    if not wanted:
        raise ScrapeError(f"settings [{spec.name}] classes: no classes to scrape; add `classes = a, b` to "
                          f"[{spec.name}] or pass --classes a,b")
    if available:
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ScrapeError(f"--source {source}: has no class {', '.join(map(repr, missing))}; "
                              f"it has: {', '.join(available)}")

    root.mkdir(parents=True, exist_ok=True)
    records = load_manifest(root)
    removed = tidy(root, records)
    if removed:
        log(f"removed {removed} unrecorded or partial file(s) left by an interrupted run")
    index = _Index(records, phash_distance)
    cache_dir = root / ".cache" / "queries"
    options = {"region": spec.region, "safesearch": spec.safesearch, "size": spec.image_size or None,
               "type_image": spec.type_image or None, "layout": spec.layout or None,
               "license_image": spec.license_image or None}
    backoff = {"retries": search_retries, "base": backoff_base, "cap": backoff_cap, "sleep": sleep,
               "hint": f"wait a few minutes and rerun `toolkit scrape {spec.name}`: accepted images are kept in "
                       f"{root / MANIFEST} and finished queries are cached in {cache_dir}"}
    fetch_options = {"timeout": timeout, "max_bytes": max_bytes, "max_redirects": max_redirects,
                     "retries": fetch_retries, "retry_base": min(backoff_base, 0.5), "sleep": sleep}

    def candidates_for(cls: str) -> Iterator[Candidate]:
        if url_lines:
            for number, url in url_lines[cls]:
                yield Candidate(cls, url, "urls", number, source=source[5:])
        elif folder_files:
            for rank, path in enumerate(folder_files[cls], 1):
                yield Candidate(cls, str(path.resolve()), "folder", rank, source=str(path.resolve()), local=True)
        else:
            templates = spec.queries or ["{class}"]
            for max_results in (max(2 * per_class, 30), max(6 * per_class, 90)):
                for template in templates:
                    query = template.replace("{class}", cls)
                    results = cached_search(search, backend_name, query, max_results=max_results, options=options,
                                            cache_dir=cache_dir, **backoff)
                    for rank, result in enumerate(results, 1):
                        if result.get("image"):
                            yield Candidate(cls, result["image"], backend_name, rank, query=query,
                                            page_url=result.get("url"), title=result.get("title"),
                                            source=result.get("source"))

    # One pool for all classes, results handled in submission order (deterministic dedupe): while a
    # class waits for its last answers the next class's downloads already run. A class never has
    # more downloads in flight than it still needs, so nothing is fetched only to be thrown away.
    states: dict[str, _ClassState] = {}
    for cls in wanted:
        report = _report_from(records, cls, per_class)
        states[cls] = _ClassState(report, iter(candidates_for(cls)), class_dir(root, cls))
    limit = 2 * max(1, workers)
    fifo: deque[tuple[str, Future]] = deque()
    manifest = open(root / MANIFEST, "a", encoding="utf-8")
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        while True:
            for cls, st in states.items():
                while len(fifo) < limit and not st.exhausted and st.in_flight < per_class - st.report.ok:
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
                        st.bar = _progress(per_class, cls, progress)
                        st.bar.update(min(st.report.ok, per_class))
                    st.dir.mkdir(exist_ok=True)
                    fifo.append((cls, pool.submit(prepare, candidate, max_size=spec.max_size,
                                                  fetch_options=fetch_options, max_pixels=max_pixels)))
                if len(fifo) >= limit:
                    break
            if not fifo:
                break
            cls, future = fifo.popleft()
            st = states[cls]
            st.in_flight -= 1
            record = _accept(future.result(), root, st.dir, index)
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            index.add(record)
            records.append(record)
            _count(st.report, record)
            if st.bar is not None:
                st.bar.update(min(st.report.ok, per_class))
                if st.exhausted and not st.in_flight and st.report.ok < per_class:
                    print(flush=True)  # end the unfinished bar's line (a shortfall)
                    st.bar = None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        manifest.close()
    for cls, st in states.items():
        if st.report.shortfall and not st.error:
            log(f"{cls}: {st.report.ok} of {per_class} images (shortfall {st.report.shortfall})")
    errors = [st.error for st in states.values() if st.error]
    if errors:
        raise errors[0]
    return ScrapeReport(root, {cls: _report_from(records, cls, per_class) for cls in wanted})


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


def _record_key(record: dict[str, Any]) -> str | None:
    key = record.get("url") or (record.get("source") if record.get("backend") == "folder" else None)
    return normalise_url(key) if key else None


def _transient(record: dict[str, Any]) -> bool:
    reason = record.get("status", "").partition("rejected:")[2]
    return reason in ("timeout", "connection-error", "http-429") or bool(re.fullmatch(r"http-5\d\d", reason))


def _report_from(records: list[dict[str, Any]], cls: str, quota: int) -> ClassReport:
    """Counts of a class, one per candidate: a URL retried after a transient failure counts once."""
    report = ClassReport(cls, quota)
    latest: dict[str, dict[str, Any]] = {}
    for number, record in enumerate(records):
        if record.get("class") == cls:
            latest[_record_key(record) or f"#{number}"] = record
    for record in latest.values():
        _count(report, record)
    return report


def _count(report: ClassReport, record: dict[str, Any]) -> None:
    report.candidates += 1
    status = record.get("status", "")
    if status == "ok":
        report.ok += 1
    elif status.startswith("duplicate-of:"):
        report.duplicates += 1
        report.conflicts += bool(record.get("conflict"))
    elif status.startswith("rejected:"):
        report.rejected[status.split(":", 1)[1]] += 1


def _accept(outcome: Outcome, root: Path, target_dir: Path, index: _Index) -> dict[str, Any]:
    """Decide ok / duplicate / rejected; write the file atomically when ok. Returns the manifest line."""
    c = outcome.candidate
    record: dict[str, Any] = {
        "class": c.cls, "query": c.query, "backend": c.backend, "rank": c.rank,
        "url": None if c.local else c.url, "page_url": c.page_url, "title": c.title, "time": _now(),
        "http_status": outcome.fetched.http_status,
        "bytes": len(outcome.fetched.data) if outcome.fetched.data is not None else None,
        "sha256": outcome.sha256, "phash": outcome.phash, "width": outcome.width, "height": outcome.height,
        "file": None, "status": "", "source": c.source,
    }
    if c.local:
        record["url"] = None
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


def add_class_to_settings(settings_path: Path, section: str, cls: str, existing: Iterable[str] = ()) -> bool:
    """Append `cls` to [section]'s `classes` in settings.ini (`settings.set_keys`: comments stay).

    Returns False when the class is already listed. Without a `classes` key one is added holding
    `existing` (the classes found so far) and the new one.
    """
    from toolkit.core.config import parse_list as _parse_list
    from toolkit.core.config import read_config
    from toolkit.settings import set_keys

    cls = cls.strip()
    if not cls or "," in cls or "\n" in cls:
        raise ScrapeError(f"--add-class {cls!r}: a class name must be non-empty and hold no comma")
    config = read_config(Path(settings_path))
    if not config.has_section(section):
        raise ScrapeError(f"{settings_path}: no [{section}] section to add {cls!r} to")
    if config.has_option(section, "classes"):
        current = _parse_list(config.get(section, "classes"))
        if cls in current:
            return False
    else:
        current = list(existing)
    set_keys(settings_path, section, {"classes": ", ".join(dict.fromkeys([*current, cls]))})
    return True
