"""The task registry and its kinds: `single`, `hierarchical`, `pairs`, and the `ensemble` wrapper
over any kind that supports it. Generic code asks here once and never compares task names:

    task_of(spec)          the Task of a settings section (an EnsembleTask around it where asked)
    task_of_meta(meta)     the Task a model.json describes
    load_predictor(folder) that Task's predictor for a trained model folder
    get_task(name), list_tasks(), FEATURES

Adding a task kind is one module with a `Task` subclass and `register(...)`, imported below.
"""

from toolkit.tasks import single  # noqa: F401, I001  (each registers itself, in this order)
from toolkit.tasks import pairs  # noqa: F401, I001
from toolkit.tasks import ensemble, hierarchical  # noqa: F401, I001
from toolkit.tasks.base import FEATURES, Task
from toolkit.tasks.registry import (
    TASKS,
    WRAPPERS,
    all_keys,
    cached_predictor,
    get_task,
    key_owners,
    list_tasks,
    load_predictor,
    task_of,
    task_of_meta,
)

__all__ = ["FEATURES", "TASKS", "WRAPPERS", "Task", "all_keys", "cached_predictor", "get_task", "key_owners",
           "list_tasks", "load_predictor", "task_of", "task_of_meta"]
