"""Sandbox tasks with a programmatic gold reward; `load_task("toy")` or `load_task("path/spec.yaml")`."""

from .task import Task, load_task

__all__ = ["Task", "load_task"]
