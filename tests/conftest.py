"""Shared fixtures: no network, the real photo data sets in ../shared, the CLI as a subprocess,
and one small real model trained once per session."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
OFFLINE = Path(__file__).resolve().parent / "offline"

# With `pytest -n N` each worker (and every CLI it starts) gets its share of the cores for torch's
# and OpenMP's thread pools: N workers with a pool each as wide as the machine oversubscribe it, and
# spinning OpenMP threads then wait on each other (measured: the suite 17 min 47 s on 2 cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))


def _is_loopback(host) -> bool:
    return isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection to a non-loopback address fails (subprocesses get the same via sitecustomize)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(host):
            raise OSError(f"network disabled in tests: {host}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def shared_dataset(name: str) -> Path:
    """../shared/datasets/NAME, or a skip with the reason (a failure in CI, where it must exist)."""
    path = SHARED / name
    if not path.is_dir():
        if os.environ.get("TOOLKIT_REQUIRE_SHARED"):
            pytest.fail(f"{path} is missing: CI must have ../shared/datasets beside the repository")
        pytest.skip(f"{path} is missing (the real photo data sets live in ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def clothing_small() -> Path:
    return shared_dataset("clothing-small")


@pytest.fixture(scope="session")
def shoe_pairs() -> Path:
    return shared_dataset("shoe-pairs")


@pytest.fixture(scope="session")
def cars() -> Path:
    return shared_dataset("cars-sedan-suv")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `python -m toolkit` subprocess: this checkout's package, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(OFFLINE), str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `toolkit ARGS` in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def copy_subset(source: Path, dest: Path, classes: list[str], per_class: int, seed: int = 0) -> Path:
    """dest/<class>/ with `per_class` files picked (seeded) from source/<class>/."""
    rng = random.Random(seed)
    for name in classes:
        files = sorted((source / name).iterdir())
        rng.shuffle(files)
        (dest / name).mkdir(parents=True, exist_ok=True)
        for file in files[:per_class]:
            shutil.copy2(file, dest / name / file.name)
    return dest


TINY_CLASSES = ["pants", "shoes", "t-shirt"]


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, clothing_small) -> Path:
    """A project root with settings.ini, scrape/tiny/ (3 real clothing classes, 40 photos each)
    and cleaned_data-free layout; the model is trained by the `trained_project` fixture."""
    root = tmp_path_factory.mktemp("project")
    copy_subset(clothing_small / "train", root / "scrape" / "tiny", TINY_CLASSES, 40)
    (root / "settings.ini").write_text(
        "[tiny]\ntitle = Tiny clothing\ndescription = Three clothing classes for tests.\n"
        "size = 96\nepochs = 1\nfreeze_epochs = 2\nbs = 16\nlr = 5e-3\nlr_find_iters = 20\n"
    )
    return root


@pytest.fixture(scope="session")
def trained_project(tiny_project) -> Path:
    """tiny_project with models/tiny/ trained for real (EfficientNet-Lite0, pretrained, 64 px)."""
    from toolkit.settings import load_settings
    from toolkit.stages.train import train

    spec = load_settings(tiny_project / "settings.ini").get("tiny")
    train(spec, progress=False, log=lambda line: None)
    return tiny_project
