"""Tasks: a string-keyed registry (colaft.tasks.base), one file per task (sc, clm, ic)."""
from colaft.tasks import clm, ic, sc
from colaft.tasks.base import TASKS, Recipe, Task, get_task, loader, register_task

BUILT_IN = (clm, ic, sc)  # imported for their registration
__all__ = ["BUILT_IN", "TASKS", "Recipe", "Task", "get_task", "loader", "register_task"]
