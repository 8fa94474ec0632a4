"""Averagers: one file per method, each registering itself with ``registry.averagers``."""

from lawa_suite.averagers.base import Averager, Layout, NonFiniteWarning, accumulation_dtype, all_finite, named_tensors

__all__ = ["Averager", "Layout", "NonFiniteWarning", "accumulation_dtype", "all_finite", "named_tensors"]
