"""Reports: what a run, or many runs, say about averaging.

- ``run.py``: one run's page: ``metrics.jsonl`` -> ``report.md`` (a comparison table) and ``curves.png``.
- ``bench.py``: the cross-run report: runs grouped by task and learning rate, seed means, steps to target.
- ``claims.py``: the four claims a bench tests, judged per task and learning rate.
- ``html.py``: the Markdown those pages use -> one self-contained HTML page, PNGs embedded.
"""

from __future__ import annotations

from lawa_suite.report.bench import read_run, seed_band, summarise_lr, write_bench_report
from lawa_suite.report.html import to_html
from lawa_suite.report.run import (
    best_point,
    comparison_table,
    find_runs,
    first_reaching,
    is_run_dir,
    load_metrics,
    metric_directions,
    plot_curves,
    summarise,
    write_report,
)

__all__ = ["load_metrics", "metric_directions", "summarise", "comparison_table", "plot_curves", "write_report",
           "write_bench_report", "find_runs", "is_run_dir", "read_run", "seed_band", "summarise_lr",
           "first_reaching", "best_point", "to_html"]
