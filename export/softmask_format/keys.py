"""Importance key scheme: the accumulated importance under its own name, task k's under
`task.{k}.{name}`, the general importance (DAS) under `general.{name}`."""

from __future__ import annotations

TASK_PREFIX = "task."
GENERAL_PREFIX = "general."  # DAS's general importance (format 2)


def task_key(task: int, name: str) -> str:
    """Key of task `task`'s importance of `name` (a parameter or a DAS unit tensor)."""
    return f"{TASK_PREFIX}{task}.{name}"
