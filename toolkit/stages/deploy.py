"""`toolkit deploy NAME --out DIR` (or `--all`): a self-contained folder that serves the dashboards
and the JSON API with nothing of the project around it:

    DIR/bundle.json        what this is: {"toolkit_bundle": 1, "classifiers": [...], "created", ...}
    DIR/settings.ini       the deployed classifiers' sections (no data paths)
    DIR/models/NAME/       the pickle-free model files (model.json, *.safetensors, metrics JSON)
    DIR/apps/NAME.ipynb    the dashboards' notebooks and apps/index.ipynb
    DIR/toolkit/           the toolkit modules serving imports, and nothing else (found by importing
                           them in a child process with fastai blocked: serving is fastai-free),
                           and the Voilà page template (toolkit/ui/jupyter: the loading state)
    DIR/requirements.txt   the distributions serving imports, pinned to the versions installed here
    DIR/start.sh           Voilà + API on $HOST:$PORT (default 0.0.0.0:8866); a token only with $TOKEN
    DIR/Dockerfile         python slim + CPU torch;  DIR/README.md

Names are checked against settings.ini (no path escapes). The folder is built in a temporary folder
beside DIR and renamed into place; an existing DIR is replaced only when it is a bundle (or empty).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.core.artifacts import META_FILE, write_json
from toolkit.core.config import read_sections
from toolkit.core.errors import ToolkitError
from toolkit.ui.dashboard import EXAMPLES_DIR

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 1
MODEL_SUFFIXES = (".json", ".safetensors")  # never pickles (export.pkl, best.pth)
DROPPED_KEYS = ("data", "preheat")  # paths of the project; kernels are not preheated in a bundle
NOT_PINNED_PREFIXES = ("nvidia-", "triton", "cuda-")  # GPU wheels come with torch's own index
SERVING_MODULES = ("toolkit.ui.dashboard", "toolkit.ui.api", "toolkit.ui.serve", "toolkit.ui.voila",
                   "toolkit.ui.kernel_cap", "toolkit.stages.explain", "toolkit.stages.feedback",
                   "toolkit.tasks.pairs.dashboard", "voila.app", "ipykernel.kernelapp", "ipywidgets", "psutil")
TEMPLATE_DIR = "ui/jupyter"  # toolkit.ui.voila.TEMPLATE_ROOT inside the package: Voila's page template
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
Log = Callable[[str], None]

_PROBE = r"""
import importlib, json, sys
sys.modules["fastai"] = None  # serving must not need fastai: any import of it fails here
for name in sys.argv[2:]:
    importlib.import_module(name)
from toolkit.tasks import load_predictor
for folder in json.loads(sys.argv[1]):
    load_predictor(folder, device="cpu", optimize=True)
from importlib.metadata import packages_distributions, version
dists = packages_distributions()
tops = {n.split(".")[0] for n, m in list(sys.modules.items()) if m is not None} - set(sys.stdlib_module_names)
pins = {}
for top in sorted(tops):
    for dist in dists.get(top, []):
        try:
            pins[dist] = version(dist)
        except Exception:
            pass
files = sorted({m.__file__ for n, m in list(sys.modules.items())
                if (n == "toolkit" or n.startswith("toolkit.")) and getattr(m, "__file__", None)})
print(json.dumps({"pins": pins, "files": files}))
"""


def check_names(settings, names: Sequence[str], everything: bool) -> list[str]:
    """The classifiers to deploy: NAMEs of settings.ini (or all of them), each with a trained model."""
    if everything == bool(names):
        raise ToolkitError("give a classifier NAME or --all (not both)")
    chosen = list(settings.classifiers) if everything else list(dict.fromkeys(names))
    for name in chosen:
        settings.get(name)  # unknown name: one line listing the known ones (never a path)
    if not chosen:
        raise ToolkitError(f"{settings.path} has no classifiers to deploy")
    missing = [n for n in chosen if not model_folders(settings.get(n).models_dir)]
    if missing and not everything:
        raise ToolkitError(f"no trained model for {', '.join(missing)}: run `toolkit train {missing[0]}` first")
    chosen = [n for n in chosen if n not in missing]
    if not chosen:
        raise ToolkitError("no classifier has a trained model yet: run `toolkit train NAME` first")
    return chosen


def model_folders(folder: Path) -> list[Path]:
    """Folders under models/NAME/ (itself included) that hold a model.json."""
    if not folder.is_dir():
        return []
    return sorted({p.parent for p in folder.rglob(META_FILE)})


def _copy_model(source: Path, dest: Path) -> int:
    """The pickle-free model files of models/NAME/ (any depth: ensemble members, pair approaches)."""
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix in MODEL_SUFFIXES and not path.is_symlink():
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            count += 1
    return count


def _copy_examples(spec, dest: Path) -> int:
    """The dashboard's example images (a few per class) into the bundle's models/NAME/examples/."""
    from toolkit.core.artifacts import read_meta
    from toolkit.ui.dashboard import example_files

    try:
        classes = list(read_meta(model_folders(spec.models_dir)[0])["classes"])
    except (ToolkitError, IndexError, KeyError):
        return 0
    examples = example_files(spec, classes)
    for label, path in examples:
        (dest / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / label / path.name)
    return len(examples)


def _settings_text(path: Path, names: Sequence[str]) -> str:
    defaults, sections = read_sections(path)
    lines = ["# written by `toolkit deploy`: the deployed classifiers' settings (no data paths)", ""]
    for name in names:
        lines.append(f"[{name}]")
        for key, value in {**defaults, **sections[name]}.items():
            if key not in DROPPED_KEYS:
                lines.append(f"{key} = " + value.replace("\n", "\n    "))
        lines.append("")
    return "\n".join(lines)


def probe_serving(model_folders: Sequence[Path], timeout: float = 300) -> dict[str, Any]:
    """Import what serving imports (fastai blocked) and load each model in a child process;
    returns {"pins": {distribution: version}, "files": [toolkit module files]}."""
    package_root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([str(f) for f in model_folders]),
                             *SERVING_MODULES], capture_output=True, text=True, env=env, timeout=timeout,
                            cwd=tempfile.gettempdir())
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolkitError(f"serving cannot be imported without fastai here: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def requirements_text(pins: dict[str, str]) -> str:
    """requirements.txt: each distribution == the version installed here (local tags such as
    +cu130 dropped: the CPU wheel of the same version comes from torch's CPU index)."""
    lines = ["# serving's imports, pinned to the versions `toolkit deploy` found installed",
             f"--extra-index-url {TORCH_CPU_INDEX}"]
    for dist, ver in sorted(pins.items(), key=lambda kv: kv[0].lower()):
        if dist.lower() in ("toolkit",) or dist.lower().startswith(NOT_PINNED_PREFIXES):
            continue
        lines.append(f"{dist}=={ver.split('+')[0]}")
    return "\n".join(lines) + "\n"


START_SH = """#!/bin/sh
# Serve this bundle's dashboards and JSON API with Voila on $HOST:$PORT (default 0.0.0.0:8866).
# Public by default; set TOKEN=... to require a token. PYTHON=... picks the interpreter.
set -eu
cd "$(dirname "$0")"
export TOOLKIT_SETTINGS="$PWD/settings.ini"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -c "from toolkit.ui.serve import serve_bundle; raise SystemExit(serve_bundle('.'))"
"""

DOCKERFILE = """FROM python:{python}-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV HOST=0.0.0.0 PORT=8866 PYTHON=python
EXPOSE 8866
CMD ["sh", "start.sh"]
"""


def readme_text(names: Sequence[str]) -> str:
    rows = "\n".join(f"- `{n}`: dashboard `/voila/render/{n}.ipynb`, API `POST /api/predict/{n}`" for n in names)
    return f"""# Classifier bundle (made by `toolkit deploy`)

{rows}

Run on any host with Python {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}:

    pip install -r requirements.txt
    PORT=8866 sh start.sh          # prints the URLs; HOST defaults to 0.0.0.0

or with Docker: `docker build -t classifier . && docker run -p 8866:8866 classifier`.

The dashboards and the API are public; set `TOKEN=secret` to require `?token=secret` on pages and
`Authorization: token secret` on API calls. API:

    curl --data-binary @photo.jpg http://HOST:8866/api/predict/NAME
    curl -F file=@photo.jpg http://HOST:8866/api/predict/NAME
    -> {{"label": ..., "probs": {{...}}, "ms": ...}}   (400 {{"error"}} for a non-image, 404 for an unknown NAME)

A two-image kind takes the fields `first` and `second`. Files: `models/` (pickle-free weights and
model.json), `apps/` (the notebooks), `toolkit/` (the serving code), `settings.ini`.
"""


def _is_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / BUNDLE_FILE).read_text()).get("toolkit_bundle") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def deploy(settings, names: Sequence[str] = (), out: str | Path = "deploy", *, everything: bool = False,
           log: Log = print) -> dict[str, Any]:
    """Build the bundle of `names` (or every trained classifier with everything=True) into `out`."""
    import nbformat

    from toolkit.ui.apps import app_notebook, index_notebook

    chosen = check_names(settings, names, everything)
    skipped = [n for n in settings.classifiers if n not in chosen] if everything else []
    if skipped:
        log(f"skipping {', '.join(skipped)}: no trained model")
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and (_is_bundle(out) or not any(out.iterdir()))):
        raise ToolkitError(f"{out} exists and is not a bundle made by `toolkit deploy`; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    folders = {n: settings.get(n).models_dir for n in chosen}
    log(f"checking that serving {', '.join(chosen)} needs no fastai ...")
    probe = probe_serving([f for folder in folders.values() for f in model_folders(folder)])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n_files = 0
        for name, folder in folders.items():
            n_files += _copy_model(folder, tmp / "models" / name)
            _copy_examples(settings.get(name), tmp / "models" / name / EXAMPLES_DIR)
        package = Path(__file__).resolve().parents[1]
        for file in map(Path, probe["files"]):
            target = tmp / "toolkit" / file.resolve().relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
        shutil.copytree(package / TEMPLATE_DIR, tmp / "toolkit" / TEMPLATE_DIR)  # the page template: not a module
        (tmp / "settings.ini").write_text(_settings_text(settings.path, chosen), encoding="utf-8")
        from toolkit.settings import load_settings

        bundled = load_settings(tmp / "settings.ini")  # the bundle's own settings must read back
        (tmp / "apps").mkdir()
        for name in chosen:
            nbformat.write(app_notebook(name, bundled.get(name).display_title), tmp / "apps" / f"{name}.ipynb")
        nbformat.write(index_notebook(bundled, cleaning=False), tmp / "apps" / "index.ipynb")
        (tmp / "requirements.txt").write_text(requirements_text(probe["pins"]), encoding="utf-8")
        (tmp / "start.sh").write_text(START_SH, encoding="utf-8")
        (tmp / "start.sh").chmod(0o755)
        py = ".".join(platform.python_version_tuple()[:2])
        (tmp / "Dockerfile").write_text(DOCKERFILE.format(python=py), encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(chosen), encoding="utf-8")
        info = {"toolkit_bundle": BUNDLE_FORMAT, "classifiers": chosen,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": str(settings.path), "python": platform.python_version()}
        write_json(tmp / BUNDLE_FILE, info)
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: {len(chosen)} classifier(s), {n_files} model file(s), "
        f"{len(probe['files'])} toolkit module(s); start it with `PORT=8866 sh {out}/start.sh`")
    return {**info, "skipped": skipped, "out": str(out), "model_files": n_files, "modules": len(probe["files"]),
            "requirements": sorted(probe["pins"])}
