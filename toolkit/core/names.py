"""Names from outside (classes, labels, uploaded file names) are checked once, here, before they
touch a path: one name is one folder, never sanitised into another name.

A class name is NFC-normalised (so `café` typed two ways is one class) and refused when it could
not be one plain folder: empty, a path separator, a control character, `.`/`..`, a leading `.` or
`_` (data listings skip such folders, so the class would never be trained) or longer than
`MAX_NAME_BYTES` in UTF-8 (file systems stop at 255 bytes). `check_unique` refuses names that one
case-insensitive file system would fold into one folder.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from toolkit.core.errors import ToolkitError

MAX_NAME_BYTES = 200
PATH_SEP = "/"


class BadName(ToolkitError, ValueError):
    """A name that cannot be one folder; a ValueError too, so settings parsers quote it."""


def check_name(raw: str, what: str = "class name") -> str:
    """The NFC-normalised, stripped name, or BadName saying what is wrong and what to do."""
    if not isinstance(raw, str):
        raise BadName(f"{what} {raw!r}: not text")
    name = unicodedata.normalize("NFC", raw).strip()
    if not name:
        raise BadName(f"{what} is empty: give a name such as 'shirts'")
    bad = sorted({c for c in name if unicodedata.category(c)[0] == "C"})
    if bad:
        raise BadName(f"{what} {name!r} holds control characters ({', '.join(repr(c) for c in bad)}); remove them")
    if "/" in name or "\\" in name:
        raise BadName(f"{what} {name!r} holds a path separator ('/' or '\\'); use '-' instead")
    if name in (".", ".."):
        raise BadName(f"{what} {name!r} is not a folder name; use letters or digits")
    if name[0] in "._":
        raise BadName(f"{what} {name!r} starts with {name[0]!r}: folders so named are skipped as hidden; "
                      "start it with a letter or digit")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise BadName(f"{what} {name[:20]!r}... is {len(name.encode('utf-8'))} bytes long; "
                      f"keep it under {MAX_NAME_BYTES} bytes")
    return name


def check_label_path(raw: str, what: str = "label") -> str:
    """A hierarchical label `tops/shirt`: every part a checked name, joined by '/'."""
    if not isinstance(raw, str) or not raw.strip():
        raise BadName(f"{what} is empty: give a label such as 'tops/shirt'")
    parts = unicodedata.normalize("NFC", raw).strip().split(PATH_SEP)
    return PATH_SEP.join(check_name(part, f"{what} part") for part in parts)


def check_unique(names: Iterable[str], where: str = "classes") -> list[str]:
    """The names, checked; BadName when two of them would be one folder (same after case folding)."""
    seen: dict[str, str] = {}
    out = []
    for raw in names:
        name = check_name(raw)
        key = name.casefold()
        if key in seen:
            raise BadName(f"{where}: {seen[key]!r} and {name!r} would be one folder; keep one of them")
        seen[key] = name
        out.append(name)
    return out
