"""Evaluators: one file per metric family, each registering itself with ``registry.evaluators``."""

from lawa_suite.evaluators.base import Evaluator, reduce_sums

__all__ = ["Evaluator", "reduce_sums"]
