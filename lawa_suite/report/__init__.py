"""Reports: what a run, or many runs, say about averaging. They read run folders only: no task, trainer or config
code is imported (``meaning.py`` holds what a saved config and a metric mean), and figures are drawn through
``lawa_suite.plotting`` (no pyplot, no backend switch).

Modules, each importing only those above it: ``meaning.py`` (tables: keys added later, built-in metrics),
``curves.py`` (a run's curves and metric helpers), ``records.py`` (``RunRecord``, ``Band``, ``LrSummary``,
``Verdict``, ``experiment_key``), ``paired.py``, ``targets.py``, ``lrs.py``, ``sweeps.py``, ``connectivity.py``
(claim e), ``diffusion.py`` (claim f), ``schedules.py`` (g), ``schedulefree.py`` (h), ``claims.py`` (the claims a
bench tests), ``matrix.py`` (the verdict matrix), ``gainplots.py`` (forest plots, gain curves with bands),
``glance.py`` (the report's opening), ``findings.py`` and ``run.py`` (one run's page: ``report.md`` and
``curves.png``), ``bench.py`` (the cross-run report), ``html.py`` (Markdown -> one HTML page).
"""

from __future__ import annotations

from lawa_suite.report.bench import seed_band, summarise_lr, write_bench_report
from lawa_suite.report.curves import best_point, first_reaching, load_metrics, metric_directions
from lawa_suite.report.html import to_html
from lawa_suite.report.records import read_run
from lawa_suite.report.run import comparison_table, find_runs, is_run_dir, plot_curves, summarise, write_report

__all__ = ["load_metrics", "metric_directions", "summarise", "comparison_table", "plot_curves", "write_report",
           "write_bench_report", "find_runs", "is_run_dir", "read_run", "seed_band", "summarise_lr",
           "first_reaching", "best_point", "to_html"]
