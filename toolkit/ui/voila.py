"""Start and stop Voilà: one process group, a log file, readiness by log line and TCP connect.

Facts this follows (measured, see the project's notes): `--Voila.port_retries=0` or Voilà moves
to another port silently; readiness is the `running at` log line plus a TCP connect (a page GET
would start a kernel); output goes to a file (an unread pipe can block); Voilà stops its kernels
on SIGTERM, and a killpg of its own session cleans up whatever is left.

Voilà's lifetime is tied to the process that launched it: on Linux the child asks the kernel for
SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), so a `kill -9` of `toolkit serve` or
`toolkit clean`, or a service manager's TERM then KILL, still stops Voilà, and its kernels follow
(ipykernel exits when its parent, Voilà, is gone).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from toolkit.core.errors import ToolkitError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> object | None:
    """A preexec_fn for Popen: SIGTERM this child when the launching process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


VOILA = "voila"
WITH_API = "toolkit.ui.api"  # Voilà's app plus the JSON prediction API (toolkit.ui.api)
TEMPLATE = "toolkit"  # toolkit/ui/jupyter/voila/templates/toolkit: Voilà's lab template + a named loading state
TEMPLATE_ROOT = Path(__file__).resolve().parent / "jupyter"  # a Jupyter data folder, put first on $JUPYTER_PATH


def voila_command(path: str | Path, port: int, host: str = "127.0.0.1",
                  extra_args: Sequence[str] = (), module: str = VOILA) -> list[str]:
    """The command line: `python -m voila` or, with module=WITH_API, Voilà with the API; pages use
    the toolkit template (its environment needs `template_env`)."""
    return [sys.executable, "-m", module, str(path), "--no-browser", f"--port={port}", f"--Voila.ip={host}",
            "--Voila.port_retries=0", "--strip_sources=True", f"--template={TEMPLATE}", *extra_args]


def template_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) with the toolkit template's folder first on
    $JUPYTER_PATH, where Voilà looks for `--template=toolkit`.

    The template is Voilà 0.5's lab template with its spinner macro replaced: "Loading TITLE..."
    and what runs, from Voilà's first byte until the notebook has run (measured: Voilà's own shows
    "Running ..." without the title, and nothing at all before the kernel process is started)."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("JUPYTER_PATH", "").split(os.pathsep) if p and Path(p) != TEMPLATE_ROOT]
    env["JUPYTER_PATH"] = os.pathsep.join([str(TEMPLATE_ROOT), *paths])
    return env


def preheat_args(preheated: Sequence[str], others: Sequence[str]) -> list[str]:
    """Voila options for one warm kernel per notebook in `preheated` (names without .ipynb) and
    none for `others` (they start a kernel when a page opens)."""
    if not preheated:
        return []
    return ["--preheat_kernel=True", "--pool_size=1",
            *[f"--VoilaKernelManager.preheat_denylist={name}.ipynb" for name in others]]


def launch_voila(path: str | Path, port: int, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 *, log_path: str | Path | None = None, extra_args: Sequence[str] = (),
                 timeout: float = 120, cwd: str | Path | None = None, module: str = VOILA) -> subprocess.Popen:
    """Start Voilà on a notebook or folder and return once it accepts connections.

    The process runs in its own session (`stop_voila` can kill the whole group) and gets SIGTERM
    when this process dies (Linux: PR_SET_PDEATHSIG); its output goes
    to `log_path` (default: a temporary file), which is `proc.log_path`. Raises ToolkitError
    with the log's last lines when Voilà exits or is not ready within `timeout` seconds.
    """
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix=f"voila-{port}-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(voila_command(path, port, host, extra_args, module), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=template_env(env), cwd=cwd,
                                start_new_session=True, preexec_fn=_die_with_parent())
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ToolkitError(f"Voilà exited with code {proc.returncode} before it was ready: {_tail(log_path)}")
            text = log_path.read_text(errors="replace")
            if "running at" in text and f":{port}/" in text and _connects(connect_host, port):
                return proc
            time.sleep(0.2)
    except BaseException:  # Ctrl-C or SIGTERM while Voilà starts: stop it before going on
        stop_voila(proc, grace=5)
        raise
    stop_voila(proc)
    raise ToolkitError(f"Voilà was not ready on port {port} within {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_voila(proc: subprocess.Popen, grace: float = 10) -> int | None:
    """SIGTERM (Voilà then stops its kernels), wait, then SIGKILL the process group and any
    kernel left (kernels run in sessions of their own)."""
    children = []
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or the process is gone
        pass
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # kernels or helpers left in Voilà's session
    except (ProcessLookupError, PermissionError):
        pass
    for child in children:
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode
