"""`toolkit serve` and `toolkit clean NAME`: Voila serving the dashboards or the cleaning app until
Ctrl-C or SIGTERM, which stop Voila and its kernels too (`toolkit.ui.voila`)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from toolkit.core.artifacts import META_FILE
from toolkit.core.config import ClassifierSpec, Settings
from toolkit.ui.apps import CLEAN_APP, write_apps
from toolkit.ui.clean_notebook import write_clean_notebook
from toolkit.ui.voila import launch_voila, preheat_args, stop_voila

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(proc, lines: list[str], out: Callable[[str], None]) -> int:
    """Print `lines`, wait for Voila; Ctrl-C or SIGTERM at any moment stops it and its kernels."""
    try:
        signal.signal(signal.SIGTERM, _interrupt)
        for line in lines:
            out(line)
        proc.wait()
    except KeyboardInterrupt:
        print("stopping Voila ...", file=sys.stderr)
    finally:
        stop_voila(proc)
    return 0 if proc.returncode in (0, -15, None) else 1


def _warning(host: str) -> list[str]:
    return [] if host in LOOPBACK else [
        f"warning: bound to {host}: anyone who can reach this machine can use the dashboards"]


def serve_dashboards(settings: Settings, host: str, port: int, *, timeout: float = 120,
                     out: Callable[[str], None] = print) -> int:
    """Every classifier's dashboard, the index and the cleaning app, on host:port."""
    write_apps(settings)
    apps = settings.root / "apps"
    preheated = [name for name, spec in settings.classifiers.items() if spec.preheat]
    extra = preheat_args(preheated, [n for n in settings.classifiers if n not in preheated] + ["index", "clean"])
    env = dict(os.environ, TOOLKIT_SETTINGS=str(settings.path))
    log = apps / f".voila-{port}.log"
    print(f"starting Voila on {apps} (log: {log}) ...", file=sys.stderr, flush=True)
    proc = launch_voila(apps, port, host, env, log_path=log, extra_args=extra, cwd=settings.root, timeout=timeout)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{port}"
    lines = [f"serving {len(settings.classifiers)} dashboard(s); open:",
             f"  {'index':<12} {base}/voila/render/index.ipynb"]
    for name, spec in settings.classifiers.items():
        state = "" if (spec.models_dir / META_FILE).is_file() else f"  (no model yet: toolkit train {name})"
        lines.append(f"  {name:<12} {base}/voila/render/{name}.ipynb{state}")
    clean_state = "" if (apps / CLEAN_APP).is_file() else "  (not installed yet)"
    lines.append(f"  {'cleaning':<12} {base}/voila/render/{CLEAN_APP}{clean_state}")
    lines += _warning(host)
    if preheated:
        lines.append(f"preheated kernels: {', '.join(preheated)}")
    lines.append("Ctrl-C stops the server.")
    return _run(proc, lines, out)


def serve_cleaner(spec: ClassifierSpec, settings_path: Path, data: Path | None, host: str, port: int, *,
                  out: Callable[[str], None] = print) -> int:
    """The cleaning app for one classifier on host:port."""
    notebook = spec.paths.apps / CLEAN_APP
    if not notebook.is_file():
        write_clean_notebook(notebook)
    env = dict(os.environ, TOOLKIT_CLASSIFIER=spec.name, TOOLKIT_SETTINGS=str(settings_path))
    if data:
        env["TOOLKIT_DATA"] = str(Path(data).resolve())
    proc = launch_voila(notebook, port, host, env, log_path=notebook.parent / f".voila-{port}.log", cwd=spec.root)
    return _run(proc, [f"cleaning [{spec.name}] at http://{host}:{port}/ (Ctrl-C to stop)", *_warning(host)], out)
