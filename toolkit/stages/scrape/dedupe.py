"""The index of what a classifier's manifest already holds: URLs tried (per class) and accepted
images by sha256 and perceptual hash (across classes), so a rerun never fetches a recorded URL
twice and a copy of an accepted image is recorded as its duplicate."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

# failures worth trying again in a later run: the server or the policy may have changed
RETRIED_REASONS = ("timeout", "connection-error", "http-429", "private-address", "interrupted")


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


def record_key(record: dict[str, Any]) -> str | None:
    """The normalised URL (or, for folder imports, the original path) a manifest line is about."""
    key = record.get("url") or (record.get("source") if record.get("backend") == "folder" else None)
    return normalise_url(key) if key else None


def transient(record: dict[str, Any]) -> bool:
    """A failure the next run tries again (timeout, 5xx, refused address ...)."""
    reason = str(record.get("status", "")).partition("rejected:")[2]
    return reason in RETRIED_REASONS or bool(re.fullmatch(r"http-5\d\d", reason))


class Index:
    """What is already accepted: by URL, sha256 and perceptual hash, across classes."""

    def __init__(self, records: list[dict[str, Any]], distance: int):
        self.distance = distance
        self.urls: dict[str, set[str]] = {}
        self.accepted: list[tuple[int, dict[str, Any]]] = []  # (phash as int, record)
        for record in records:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        key = record_key(record)
        if key and not transient(record):  # a timeout or a 5xx is tried again by the next run
            self.urls.setdefault(record.get("class"), set()).add(key)
        if record.get("status") == "ok" and record.get("file"):
            try:
                value = int(record["phash"], 16) if record.get("phash") else -1
            except (TypeError, ValueError):
                value = -1
            self.accepted.append((value, record))

    def seen_url(self, cls: str, url: str) -> bool:
        return normalise_url(url) in self.urls.get(cls, set())

    def twin(self, cls: str, sha: str, phash: str) -> dict[str, Any] | None:
        """An accepted record that is the same image (sha256) or a near copy (phash), same class first."""
        best, wanted = None, int(phash, 16)
        for value, record in self.accepted:
            same = record.get("sha256") == sha or (value >= 0 and (value ^ wanted).bit_count() <= self.distance)
            if same:
                if record.get("class") == cls:
                    return record
                best = best or record
        return best
