"""settings.ini -> typed classifier specs for every registered task kind, with one-line errors naming
the section and key; the door above `toolkit.core.config` (the machinery) and the task registry.

`[DEFAULT]` holds values every classifier shares; each other section is one classifier. A
minimal section is just `[NAME]`: its classes then come from its data folders. A key that a task
kind owns (`pair_rule` is task = pairs') is an error in a section of another kind; in [DEFAULT] it
applies to the sections of its kind only. An unsupported combination (an ensemble of shoe pairs)
is an error here, when settings are read, never a silent fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.config import (
    GENERIC_KEYS,
    SPEC_FIELDS,
    ClassifierSpec,
    Key,
    Settings,
    check_value,
    read_config,
    read_sections,
)
from toolkit.core.config import set_keys as set_keys_with
from toolkit.core.errors import SettingsError
from toolkit.tasks import WRAPPERS, all_keys, get_task, key_owners, task_of

__all__ = ["ClassifierSpec", "Settings", "keys", "load_settings", "read_config", "set_keys"]


def keys() -> dict[str, Key]:
    """Every settings key: generic, each task kind's and each wrapper's (the ensemble's)."""
    return all_keys(GENERIC_KEYS)


def _unknown(section: str, key: str, known: dict[str, Key]) -> SettingsError:
    return SettingsError(f"settings [{section}] has unknown key {key!r}; known: {', '.join(known)}")


def load_settings(path: str | Path = "settings.ini") -> Settings:
    """Read and validate settings.ini; every error names the section and key."""
    path = Path(path).resolve()
    known, owners = keys(), key_owners()
    defaults, sections = read_sections(path)
    for key in defaults:
        if key not in known:
            raise _unknown("DEFAULT", key, known)
    classifiers = {}
    for section, own in sections.items():
        for key in own:
            if key not in known:
                raise _unknown(section, key, known)
        raw = {**defaults, **own}
        task = get_task(raw.get("task", "single").strip(), f"settings [{section}] task")
        mine = {**task.keys, **{k: v for w in WRAPPERS for k, v in w.keys.items()}}
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key not in GENERIC_KEYS and key not in mine:
                if key in own:
                    raise SettingsError(f"settings [{section}] {key} is set but task = {task.name} ({key} belongs "
                                        f"to {' or '.join(owners[key])}): remove {key} or set task")
                continue  # a [DEFAULT] value for sections of another kind
            values[key] = check_value(section, key, text, known)
        options = {key: spec_key.default_value() for key, spec_key in mine.items()}
        options.update({k: v for k, v in values.items() if k not in SPEC_FIELDS})
        generic = {k: v for k, v in values.items() if k in SPEC_FIELDS}
        spec = ClassifierSpec(name=section, root=path.parent, **generic, options=options, explicit=frozenset(raw))
        task_of(spec).check_spec(spec)  # an unsupported combination (e.g. an ensemble of pairs) fails here
        classifiers[section] = spec
    return Settings(path=path, classifiers=classifiers)


def set_keys(path: str | Path, section: str, values: dict[str, str]) -> None:
    """Set `key = value` lines of [section] in settings.ini, comments kept (see core.config.set_keys)."""
    set_keys_with(path, section, values, keys())
