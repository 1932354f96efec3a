"""task = single: one label per image, the book's classifier. Every default of `Task` is its own."""

from __future__ import annotations

from toolkit.tasks.base import FEATURES, Task
from toolkit.tasks.registry import register


class SingleTask(Task):
    name = "single"
    summary = "one label per image (the default)"
    supports = frozenset(FEATURES)


register(SingleTask())
