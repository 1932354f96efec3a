"""Loaded by every Python subprocess the tests start: any non-loopback connection fails."""

import socket

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) \
            and self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"network disabled in tests: {host}")
    return _connect(self, address)


socket.socket.connect = _loopback_only
