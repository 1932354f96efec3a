"""Fetching: one GET with bounded redirects, size and time; every hop's address checked and pinned.

Each hop (the first URL and every redirect) resolves its host once; the request is refused when any
address is loopback, private, link-local, multicast, reserved or unspecified (unless private URLs
are allowed), and the connection goes to the address that was checked, never to a second lookup
(the Host header and TLS SNI still carry the name). A deadline covers an attempt with its
redirects: every read gets a socket timeout no longer than the time left, and a watchdog shuts the
socket at the deadline, so a server that drips one byte a second cannot hold a download longer.
`Downloads.stop()` shuts every open connection of a run at once (Ctrl-C).
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) toolkit-scrape/0.1"
MAGIC = [(b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff")]
PRIVATE_HINT = "set allow_private_urls = yes in the section to fetch it"


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


def backoff_delays(retries: int, base: float, cap: float, rng: random.Random | None = None) -> list[float]:
    """Exponential backoff with 'equal jitter': try i waits between half and all of min(cap, base*2**i)."""
    rng = rng or random.Random()
    delays = []
    for attempt in range(retries):
        ceiling = min(cap, base * 2**attempt)
        delays.append(ceiling / 2 + rng.uniform(0, ceiling / 2))
    return delays


# ---------------------------------------------------------------- addresses


def address_kind(ip: str) -> str | None:
    """Why an address must not be fetched ('loopback', 'private', ...), or None for a public one."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if not address.is_global:
        return "non-global"
    return None


class Refused(Exception):
    """A hop that must not be fetched; str() is the one-line reason."""


Address = tuple[int, tuple[Any, ...]]  # (socket family, socket address)


def resolve_checked(host: str, port: int, *, allow_private: bool) -> Address:
    """The one address to connect to for host:port, after checking every address the name has."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc}") from None
    if not infos:
        raise ConnectionError(f"cannot resolve {host}: no address")
    if not allow_private:
        for info in infos:
            kind = address_kind(info[4][0])
            if kind:
                raise Refused(f"{host} resolves to {info[4][0]}, a {kind} address; {PRIVATE_HINT}")
    return infos[0][0], infos[0][4]


def _connect(address: Address, timeout: float | None, source_address: Any) -> socket.socket:
    """A TCP socket connected to exactly this address (no lookup of any kind)."""
    sock = socket.socket(address[0], socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect(address[1])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a checked address; the Host header stays the name."""

    def __init__(self, host: str, port: int | None = None, *, address: Address, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = _connect(self.address, self.timeout, self.source_address)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate and SNI are checked against the name."""

    def __init__(self, host: str, port: int | None = None, *, address: Address, timeout: float,
                 context: ssl.SSLContext | None = None):
        self.pinned_context = context or ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.pinned_context)
        self.address = address

    def connect(self) -> None:
        sock = _connect(self.address, self.timeout, self.source_address)
        self.sock = self.pinned_context.wrap_socket(sock, server_hostname=self.host)


# ---------------------------------------------------------------- deadlines and interrupts


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: safe from another thread
        except OSError:
            pass


class Downloads:
    """The open connections of one run, so that an interrupt closes them all at once."""

    def __init__(self) -> None:
        self.stopped = False
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    def add(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.add(conn)
        if self.stopped:
            _shutdown(conn)

    def discard(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)

    def stop(self) -> None:
        """No new hop starts; every open connection is shut now (blocked reads return at once)."""
        self.stopped = True
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            _shutdown(conn)


class _Watch:
    """Shuts conn's socket at the deadline (a blocked read then returns), registered with downloads."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float, downloads: Downloads | None):
        self.conn, self.downloads, self.expired = conn, downloads, False
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self.timer.daemon = True

    def _expire(self) -> None:
        self.expired = True
        _shutdown(self.conn)

    def __enter__(self) -> _Watch:
        if self.downloads is not None:
            self.downloads.add(self.conn)
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        if self.downloads is not None:
            self.downloads.discard(self.conn)
        self.conn.close()


# ---------------------------------------------------------------- one URL


def fetch(url: str, *, timeout: float = 10.0, max_bytes: int = 10 * 1024 * 1024, max_redirects: int = 5,
          retries: int = 2, retry_base: float = 0.5, sleep: Callable[[float], None] = time.sleep,
          allow_private: bool = False, trusted_hosts: Collection[str] = (),
          downloads: Downloads | None = None, context: ssl.SSLContext | None = None) -> Fetched:
    """GET an http(s) URL: checked and pinned addresses at every hop, bounded redirects, a deadline per
    attempt (redirects included), streamed size cap, 5xx retries, sniffing.

    `trusted_hosts`: host names, as written in URLs, whose addresses are not checked (intranet hosts);
    `context`: the TLS context for https (default: the system's certificates, names checked).
    """
    delays = backoff_delays(retries, retry_base, 10.0)
    current = url
    redirects = 0
    attempt = 0
    deadline = time.monotonic() + timeout
    while True:
        if downloads is not None and downloads.stopped:
            return Fetched(reason="interrupted", detail="the run was interrupted")
        try:
            parts = urlsplit(current)
            port = parts.port
        except ValueError:
            return Fetched(reason="bad-url", detail=f"not a valid URL: {current[:100]}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Fetched(reason="bad-scheme", detail=f"only http(s) URLs are fetched: {current[:100]}")
        host = parts.hostname
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            address = resolve_checked(host, port, allow_private=allow_private or host in trusted_hosts)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Fetched(reason="timeout", detail=f"no answer within {timeout} s")
            if parts.scheme == "https":
                conn: http.client.HTTPConnection = PinnedHTTPSConnection(host, port, address=address,
                                                                         timeout=remaining, context=context)
            else:
                conn = PinnedHTTPConnection(host, port, address=address, timeout=remaining)
        except Refused as exc:
            hop = "" if current == url else f" (redirected to {current[:100]})"
            return Fetched(reason="private-address", detail=f"{exc}{hop}")
        except ConnectionError as exc:
            if attempt < retries:
                sleep(delays[attempt])
                attempt += 1
                deadline = time.monotonic() + timeout
                continue
            return Fetched(reason="connection-error", detail=str(exc)[:160])
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        watch = _Watch(conn, deadline, downloads)
        with watch:
            try:
                outcome = _one_hop(conn, target, deadline, timeout=timeout, max_bytes=max_bytes)
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
                if watch.expired or isinstance(exc, TimeoutError):
                    return Fetched(reason="timeout", detail=f"no complete answer within {timeout} s")
                if downloads is not None and downloads.stopped:
                    return Fetched(reason="interrupted", detail="the run was interrupted")
                if attempt < retries and not isinstance(exc, ssl.SSLError):
                    sleep(delays[attempt])
                    attempt += 1
                    deadline = time.monotonic() + timeout
                    continue
                return Fetched(reason="connection-error", detail=f"{type(exc).__name__}: {str(exc)[:120]}")
        if watch.expired:  # the watchdog shut the socket: whatever came back is cut short
            return Fetched(reason="timeout", detail=f"no complete answer within {timeout} s")
        if isinstance(outcome, _Redirect):
            redirects += 1
            if redirects > max_redirects:
                return Fetched(reason="too-many-redirects", detail=f"more than {max_redirects} redirects")
            current = urljoin(current, outcome)
            continue
        status = outcome.http_status or 0
        if (status >= 500 or status == 429) and outcome.data is None:
            if attempt < retries:
                sleep(delays[attempt])
                attempt += 1
                deadline = time.monotonic() + timeout
                continue
            outcome.detail = f"HTTP {status} after {attempt + 1} tries"
        if outcome.data is not None:
            outcome.final_url = current
        return outcome


class _Redirect(str):
    """A Location to follow."""


def _one_hop(conn: http.client.HTTPConnection, target: str, deadline: float, *, timeout: float,
             max_bytes: int) -> Fetched | _Redirect:
    conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    resp = conn.getresponse()
    status = resp.status
    if status in (301, 302, 303, 307, 308):
        location = resp.getheader("Location")
        if not location:
            return Fetched(http_status=status, reason=f"http-{status}", detail="redirect without Location")
        return _Redirect(location)
    if status != 200:
        return Fetched(http_status=status, reason=f"http-{status}", detail=f"HTTP {status}")
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        return Fetched(http_status=status, reason="too-large",
                       detail=f"Content-Length {length} is over the {max_bytes} byte limit")
    chunks: list[bytes] = []
    total, sniffed = 0, False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Fetched(http_status=status, reason="timeout", detail=f"body took over {timeout} s")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)  # one read never outlives the deadline
        chunk = resp.read1(min(65536, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if not sniffed and total >= 16:
            sniffed = True
            if sniff(b"".join(chunks)[:16]) is None:
                kind = resp.getheader("Content-Type", "?")
                return Fetched(http_status=status, reason="not-an-image",
                               detail=f"content is not an image (served as {kind})")
        if total > max_bytes:
            return Fetched(http_status=status, reason="too-large",
                           detail=f"body over the {max_bytes} byte limit (stopped reading)")
    if length and length.isdigit() and total < int(length):
        raise http.client.IncompleteRead(b"", int(length) - total)
    data = b"".join(chunks)
    if sniff(data[:16]) is None:
        kind = resp.getheader("Content-Type", "?")
        return Fetched(http_status=status, reason="not-an-image", detail=f"not an image (served as {kind})")
    return Fetched(data=data, http_status=status)


def read_local(path: Path, max_bytes: int) -> Fetched:
    """A local file as a Fetched (folder: sources), with the same size cap."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Fetched(reason="too-large", detail=f"{size} bytes is over the {max_bytes} byte limit")
        return Fetched(data=path.read_bytes())
    except OSError as exc:
        return Fetched(reason="unreadable", detail=str(exc)[:120])


class TransientError(Exception):
    """A failure worth retrying (rate limit, timeout, 5xx)."""
