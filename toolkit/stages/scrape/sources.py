"""Search backends and other sources of candidates: ddgs web search (cached, with backoff),
folder:PATH (a class-folder data set), urls:FILE (lines `class<TAB>url`) and the glue to
fashion-mnist[:DIR] (toolkit.stages.scrape.fashion_mnist). Any callable
`search(query, *, max_results, **options) -> list[dict]` returning ddgs-shaped dicts (title, image,
thumbnail, url, height, width, source) can be injected. Class names from a folder or a URL file
are checked (toolkit.core.names) before they touch a path."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from toolkit.core.errors import ToolkitError
from toolkit.core.images import IMAGE_EXTENSIONS
from toolkit.stages.scrape.http import TransientError, backoff_delays
from toolkit.stages.scrape.manifest import ScrapeError, atomic_write, check_class, now

RESULT_FIELDS = ("title", "image", "thumbnail", "url", "height", "width", "source")
WEB_SOURCES = ("ddgs",)


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
    atomic_write(path, json.dumps({"query": query, "backend": backend_name, "max_results": max_results,
                                   "options": options, "time": now(), "results": results}).encode())
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
    """`class<TAB>url` lines (blank lines and # comments skipped) -> {class: [(line, url)]}; every class
    name checked (one line naming file:line when one is bad)."""
    if not path.is_file():
        raise ScrapeError(f"--source urls:{path}: file not found (lines of class<TAB>url)")
    by_class: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ScrapeError(f"{path}:{number}: expected class<TAB>url, got {line[:80]!r}")
        try:
            cls = check_class(parts[0])
        except ToolkitError as exc:
            raise ScrapeError(f"{path}:{number}: {exc}") from None
        by_class.setdefault(cls, []).append((number, parts[1].strip()))
    return by_class


def folder_classes(path: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """{class: image files} of a class-folder data set, and the folders skipped as not classes
    (names starting with '_'; hidden '.' folders are skipped without a word)."""
    if not path.is_dir():
        raise ScrapeError(f"--source folder:{path}: not a folder (it needs one sub-folder of images per class)")
    found: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for folder in sorted(path.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        if folder.name.startswith("_"):
            skipped.append(folder.name)
            continue
        try:
            cls = check_class(folder.name, "class folder")
        except ToolkitError as exc:
            raise ScrapeError(f"--source folder:{path}: {exc}") from None
        if cls in found:
            raise ScrapeError(f"--source folder:{path}: two folders are the class {cls!r} (written two ways); "
                              "merge them")
        found[cls] = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise ScrapeError(f"--source folder:{path}: no class sub-folders found")
    return found, skipped


def file_stem_from_url(url: str) -> str:
    stem = Path(unquote(urlsplit(url).path)).stem if "://" in url else Path(url).stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return stem[:40] or "image"


def resolve_source(spec: Any, source: str | None) -> str:
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


def ingest_fashion_mnist(root: Path, source: str, *, per_class: int, seed: int, progress: bool) -> dict[str, int]:
    """fashion-mnist[:DIR] -> root/<class>/*.png through toolkit.stages.scrape.fashion_mnist."""
    from toolkit.stages.scrape import fashion_mnist

    folder = Path(source.split(":", 1)[1]) if ":" in source else fashion_mnist.FASHION_MNIST_DIR
    return fashion_mnist.ingest(root, split="train", per_class=per_class, seed=seed, folder=folder,
                                progress=progress)
