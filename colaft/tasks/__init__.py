"""Tasks: a string-keyed registry, one file per task (sc, clm, ic)."""
from colaft.tasks.base import TASKS, Recipe, Task, get_task, register_task
from colaft.tasks import clm, ic, sc  # noqa: F401  (registration)

__all__ = ["TASKS", "Recipe", "Task", "get_task", "register_task"]
