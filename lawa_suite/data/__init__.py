"""Data sources shared by tasks: resumable streams, caches, downloads and the embedded offline sets."""

from lawa_suite.errors import DataUnavailable

__all__ = ["DataUnavailable"]
