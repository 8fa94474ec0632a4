"""``suite bench``: a matrix of runs (tasks x learning rates x seeds) and what runs after each.

``spec.py`` reads a bench (its YAML file and words) into cells, ``runner.py`` runs them, resumably, ``sweeps.py``
runs the post-hoc sweeps and linear paths after a cell, ``cluster.py`` writes the same cells as accelerate or SLURM
jobs. The names here are the package's public ones.
"""

from __future__ import annotations

from lawa_suite.bench.runner import BenchResult, after_run, cell_status, run_bench
from lawa_suite.bench.spec import BENCH_FILE, Bench, Cell, cell_config, cells, load_bench, validate, write_spec

__all__ = ["Bench", "Cell", "BenchResult", "BENCH_FILE", "load_bench", "cells", "cell_config", "cell_status",
           "run_bench", "after_run", "validate", "write_spec"]
