"""Tasks: one declarative ``Task`` per task (inputs, prompts, answer, parser, dense targets, metrics), by name.

>>> from avmt.tasks import get_task, list_tasks
>>> task = get_task("avqa", reasoning=True)
>>> sample = task.build(clip, random.Random(0))          # doctest: +SKIP

Every task has a stable ``task_id`` (:func:`task_ids`): a new task takes the next free id, so
the ids that checkpoints and task-gated adapters hold never shift.
"""

from __future__ import annotations

from typing import Any

from avmt.data.sample import TaskSample
from avmt.errors import UserError
from avmt.tasks.base import Task
from avmt.tasks.formats import AnswerFormat

__all__ = ["TASKS", "register_task", "get_task", "list_tasks", "task_ids", "num_task_ids", "all_words",
           "Task", "TaskSample"]

#: Registered task classes, name -> class.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a Task subclass under its ``name`` (names and ``task_id`` s must be unique)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no task name (set the class attribute `name`)")
    if name in TASKS and TASKS[name] is not cls:
        raise ValueError(f"task name {name!r} is already registered by {TASKS[name].__name__}")
    task_id = getattr(cls, "task_id", -1)
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
        raise ValueError(f"task {name!r} ({cls.__name__}) needs a stable task_id >= 0, got {task_id!r}")
    owner = next((other for other, c in TASKS.items() if c.task_id == task_id and other != name), None)
    if owner is not None:
        free = max(c.task_id for c in TASKS.values()) + 1
        raise ValueError(f"task {name!r}: task_id {task_id} is already the id of {owner!r}; the next free id is {free}")
    TASKS[name] = cls
    return cls


def list_tasks() -> list[str]:
    """Sorted names of the registered tasks."""
    return sorted(TASKS)


def task_ids() -> dict[str, int]:
    """Task name -> its stable id, for every registered task."""
    return {name: TASKS[name].task_id for name in list_tasks()}


def num_task_ids() -> int:
    """One more than the largest task id: the size of a table indexed by task id."""
    return max(task_ids().values()) + 1


def get_task(name: str, answer_format: AnswerFormat | None = None, **kwargs: Any) -> Task:
    """Instantiate the task registered as ``name`` with ``kwargs`` (e.g. ``reasoning=False``).

    Args:
        answer_format: how the task writes and reads ranges, boxes and masks
            (:mod:`avmt.tasks.formats`); None keeps the task's default, ``TaggedText``.

    Raises:
        UserError: unknown name (the message lists the available tasks).
    """
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; available tasks: {', '.join(list_tasks())}")
    task = TASKS[name](**kwargs)
    if answer_format is not None:
        task.format = answer_format
    return task


def all_words() -> list[str]:
    """Sorted union of ``words()`` over all registered tasks (input of the offline tokenizer)."""
    out: set[str] = set()
    for name in list_tasks():
        out |= TASKS[name]().words()
    return sorted(out)


# Task modules register themselves on import (after the registry exists).
from avmt.tasks import action, arig, ave, avcap, avqa, avss, avvp, avvp_weak, emotion, instruct, matching, ms3, ref_avs, s4, ssu, unav  # noqa: E402,F401
