"""The task registry: one door from a task name (settings' `task` key, model.json's "task") to the
`Task` that owns that kind, as timm's `create_model` is for models.

`register(task)` adds a kind; `register_wrapper(wrapper)` adds a wrapper that applies to any kind
supporting its feature when its key is set (the ensemble: `ensemble = size=75 | size=100`).
`task_of(spec)` / `task_of_meta(meta)` return the kind, wrapped where a wrapper applies, or a
one-line SettingsError naming the section and key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.core.artifacts import META_FILE, read_meta
from toolkit.core.config import ClassifierSpec, Key
from toolkit.core.errors import SettingsError, ToolkitError
from toolkit.tasks.base import Task

TASKS: dict[str, Task] = {}
WRAPPERS: list[Any] = []  # classes with .feature, .key, .keys, .applies(spec), .applies_to_meta(meta), (inner)


def register(task: Task) -> Task:
    if not task.name or task.name in TASKS:
        raise ValueError(f"task {task.name!r} is unnamed or registered twice")
    TASKS[task.name] = task
    return task


def register_wrapper(wrapper: Any) -> Any:
    WRAPPERS.append(wrapper)
    return wrapper


def list_tasks() -> list[str]:
    return list(TASKS)


def describe_tasks() -> tuple[list[dict], list[str]]:
    """`toolkit tasks`: a row per kind (its keys, the features it supports and refuses) and text lines."""
    from toolkit.tasks.base import FEATURES

    rows = [{"task": t.name, "summary": t.summary, "keys": list(t.keys), "supports": sorted(t.supports),
             "refuses": sorted(set(FEATURES) - t.supports)} for t in TASKS.values()]
    return rows, [f"{r['task']:<13} {r['summary']}\n{'':<13} keys: {', '.join(r['keys']) or '-'}; supports: "
                  f"{', '.join(r['supports'])}; refuses: {', '.join(r['refuses']) or '-'}" for r in rows]


def get_task(name: str, where: str = "task") -> Task:
    """The registered kind `name`, or a one-line error listing the known kinds."""
    if name not in TASKS:
        raise SettingsError(f"{where} = {name!r}: unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def all_keys(generic: dict[str, Key]) -> dict[str, Key]:
    """Every settings key: the generic ones, each kind's and each wrapper's."""
    keys = dict(generic)
    for owner in [*TASKS.values(), *WRAPPERS]:
        keys.update(owner.keys)
    return keys


def key_owners() -> dict[str, list[str]]:
    """Settings key -> the kinds (or wrapper features) that own it."""
    owners: dict[str, list[str]] = {}
    for task in TASKS.values():
        for key in task.keys:
            owners.setdefault(key, []).append(f"task = {task.name}")
    for wrapper in WRAPPERS:
        for key in wrapper.keys:
            owners.setdefault(key, []).append(f"a task that supports {wrapper.feature}")
    return owners


def _wrapped(task: Task, applies: Callable[[Any], bool], where: str) -> Task:
    for wrapper in WRAPPERS:
        if applies(wrapper):
            task.require(wrapper.feature, where, wrapper.key)
            task = wrapper(task)
    return task


def task_of(spec: ClassifierSpec) -> Task:
    """The kind of spec's classifier, wrapped (an ensemble) where the section asks for it."""
    task = get_task(spec.task, f"settings [{spec.name}] task")
    return _wrapped(task, lambda w: w.applies(spec), spec.name)


def task_of_meta(meta: dict[str, Any], where: str = "model.json") -> Task:
    """The kind a model.json describes (its "task", default single), wrapped where it has a block."""
    name = meta.get("task", "single")
    if name not in TASKS:
        raise ToolkitError(f"{where}: task {name!r} is not known to this toolkit (known: {', '.join(TASKS)}); "
                           "retrain with this toolkit")
    return _wrapped(TASKS[name], lambda w: w.applies_to_meta(meta), where)


def load_predictor(folder: str | Path, device: str | None = None, optimize: bool = False) -> Any:
    """The predictor of a model folder, as the kind its model.json names builds it (a `Predictor`)."""
    folder = Path(folder)
    meta = read_meta(folder)
    return task_of_meta(meta, str(folder / META_FILE)).predictor(folder, meta, device=device, optimize=optimize)


_PREDICTORS: dict[tuple[str, int], Any] = {}


def cached_predictor(folder: str | Path) -> Any:
    """`load_predictor` on the CPU, once per process (the dashboards' kernels), reloaded when
    model.json (written after the weights by every training) changes."""
    folder = Path(folder).resolve()
    meta = folder / META_FILE
    if not meta.is_file():
        raise ToolkitError(f"no trained model in {folder}")
    key = (str(folder), meta.stat().st_mtime_ns)
    if key not in _PREDICTORS:
        for old in [k for k in _PREDICTORS if k[0] == key[0]]:
            del _PREDICTORS[old]
        _PREDICTORS[key] = load_predictor(folder, device="cpu", optimize=True)
    return _PREDICTORS[key]
