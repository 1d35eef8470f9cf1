"""Tasks: one declarative ``Task`` per task (prompts, target builder, parser, metrics), by name.

>>> from avmt.tasks import get_task, list_tasks
>>> task = get_task("avqa", reasoning=True)
>>> sample = task.build(clip, random.Random(0))          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from avmt.tasks.base import Task, TaskSample

__all__ = ["TASKS", "register_task", "get_task", "list_tasks", "all_words", "Task", "TaskSample"]

#: Registered task classes, name -> class.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a Task subclass under its ``name`` (names must be unique)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no task name (set the class attribute `name`)")
    if name in TASKS and TASKS[name] is not cls:
        raise ValueError(f"task name {name!r} is already registered by {TASKS[name].__name__}")
    TASKS[name] = cls
    return cls


def list_tasks() -> list[str]:
    """Sorted names of the registered tasks."""
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered as ``name`` with ``kwargs`` (e.g. ``reasoning=False``).

    Raises:
        ValueError: unknown name (the message lists the available tasks).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(list_tasks())}")
    return TASKS[name](**kwargs)


def all_words() -> list[str]:
    """Sorted union of ``words()`` over all registered tasks (input of the offline tokenizer)."""
    out: set[str] = set()
    for name in list_tasks():
        out |= TASKS[name]().words()
    return sorted(out)


# Task modules register themselves on import (after the registry exists).
from avmt.tasks import action, ave, avcap, avqa, avvp, emotion  # noqa: E402,F401
