"""The one writer and reader of what training leaves in models/NAME/: the pickle-free model
(`model.safetensors`: tensors only, no code; `model.json`: classes, backbone, size, normalisation,
task, versions, provenance) and `metrics.json`. Every write is atomic (temp file + rename), so a
crash leaves the old file or the new one, never half of one; the weights are renamed into place
before model.json, so a model.json always describes weights that are there.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
METRICS_FILE = "metrics.json"
REQUIRED_META = ("arch", "classes", "size", "mean", "std")


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    """`obj` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or not a JSON object (for display only)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def versions() -> dict[str, str]:
    import fastai
    import timm
    import torch
    import torchvision

    from toolkit import __version__

    return {"toolkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fastai": fastai.__version__, "timm": timm.__version__}


def model_meta(meta: dict[str, Any], task: str) -> dict[str, Any]:
    """model.json's content: `meta` plus the format version, task, resize rule, time and versions."""
    return {"format_version": FORMAT_VERSION, "task": task, "resize": "squish",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(), **meta}


def write_model(folder: Path, model: Any, meta: dict[str, Any], task: str) -> Path:
    """Weights (safetensors) then model.json, each atomically; `meta` needs arch, classes, size, mean, std.
    `model` is a torch module, or None for a model.json alone (an ensemble: its members hold weights)."""
    missing = [key for key in REQUIRED_META if key not in meta] if model is not None else []
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_bytes_atomic(folder / WEIGHTS_FILE, save(state))
    return write_json(folder / META_FILE, model_meta(meta, task))


def write_metrics(folder: Path, metrics: dict[str, Any]) -> Path:
    return write_json(Path(folder) / METRICS_FILE, metrics)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """models/NAME/model.json, checked field by field, or a one-line ToolkitError saying what to do."""
    folder = Path(folder)
    path = folder / META_FILE
    retrain = f"retrain with `toolkit train {folder.name}`"
    if not path.is_file():
        raise ToolkitError(f"no trained model in {folder} ({META_FILE} missing): run `toolkit train {folder.name}` "
                           "first")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolkitError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {retrain}") from None
    except OSError as exc:
        raise ToolkitError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if not isinstance(meta, dict):
        raise ToolkitError(f"{path}: holds a {type(meta).__name__}, not a JSON object; {retrain}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ToolkitError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}; {retrain}")
    classes = meta.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ToolkitError(f"{path}: 'classes' must list at least 2 distinct class names; {retrain}")
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise ToolkitError(f"{path}: 'size' must be a whole number of pixels (8..4096), not {size!r}; {retrain}")
    if not isinstance(meta.get("task", ""), str):
        raise ToolkitError(f"{path}: 'task' must be a name such as single; {retrain}")
    for key in ("mean", "std"):
        if key in meta and not (isinstance(meta[key], list) and len(meta[key]) == 3
                                and all(isinstance(v, (int, float)) for v in meta[key])):
            raise ToolkitError(f"{path}: '{key}' must be 3 numbers; {retrain}")
    return meta


def load_weights(model: Any, folder: Path) -> Any:
    """Load models/NAME/model.safetensors into `model` (strict); a missing, truncated or mismatched
    file is a one-line ToolkitError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    retrain = f"retrain with `toolkit train {Path(folder).name}`"
    if not path.is_file():
        raise ToolkitError(f"{path} is missing (model.json has no weights beside it); {retrain}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ToolkitError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                           f"{retrain}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))[:160]
        raise ToolkitError(f"{path} does not match {META_FILE} ({detail}); {retrain}") from None
    return model
