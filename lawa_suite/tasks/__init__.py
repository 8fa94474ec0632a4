"""Tasks: one file per domain, each registering itself with ``registry.tasks``."""

from lawa_suite.tasks.base import BatchStream, DataUnavailable, Task

__all__ = ["BatchStream", "DataUnavailable", "Task"]
