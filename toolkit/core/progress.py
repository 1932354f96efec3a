"""Progress bars for anything that takes more than a few seconds (fastprogress, as fastai uses)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_iter(items: Iterable[T], total: int | None = None, label: str = "", enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (console or notebook) when enabled; plain iteration otherwise."""
    if not enabled:
        yield from items
        return
    from fastprogress.fastprogress import progress_bar

    bar = progress_bar(items, total=total)
    bar.comment = label  # the console bar (fastprogress 1.1) takes no comment argument
    yield from bar
