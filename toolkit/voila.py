"""Starting Voilà on a notebook: one small function the `clean` and `serve` commands share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch_voila(notebook: str | Path, port: int = 8866, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, *, log_file: str | Path | None = None,
                 open_browser: bool = False) -> tuple[subprocess.Popen, str]:
    """Start `voila NOTEBOOK` in its own session; returns (process, URL).

    `env` is added to this process's environment (the kernel inherits it). Output goes to
    `log_file` (or this process's stdout/stderr). Stop it with `stop_voila(process)`.
    """
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "voila", str(notebook), f"--port={port}", f"--Voila.ip={host}",
           "--Voila.port_retries=0"]
    if not open_browser:
        cmd.append("--no-browser")
    out = open(log_file, "w") if log_file else None  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT if out else None,
                               start_new_session=True)
    return process, f"http://{host}:{port}/"


def stop_voila(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM (Voilà stops its kernels), then kill the whole session if it lingers."""
    import signal

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=5)
