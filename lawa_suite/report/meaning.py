"""What a saved run means, read from its folder alone: the report imports no task, no trainer and no config code.

A run's ``config.yaml`` is fully resolved when the run starts, so it says everything the run computed, except keys
the suite gained later: ``ADDED_KEYS`` gives each the value that reproduces what a run made before it did (the
default it was added with), so runs made by two versions of the suite compare as one experiment. The metric
directions of the built-in tasks' evaluators are here too (``METRICS``; ``tests/test_report_imports.py`` holds them
equal to the evaluators'); a plugin's metrics fall back on their order in the records and a guess from the name.
"""

from __future__ import annotations

from lawa_suite.rundir import ADDED_KEYS, with_added_keys  # below the report: resuming reads them too

__all__ = ["ADDED_KEYS", "METRICS", "NOTES", "with_added_keys"]

# task -> its evaluator's metrics, "max" or "min" each; the first is the headline
METRICS: dict[str, dict[str, str]] = {
    "cifar": {"accuracy": "max", "loss": "min"},
    "gpt2": {"loss": "min", "perplexity": "min"},
    "ddpm": {"fid": "min", "fid_standin": "min", "loss": "min"},
}

# metric -> the sentence a report prints beside a metric whose name alone could mislead
NOTES: dict[str, str] = {
    "fid_standin": "Fréchet distance in the features of lawa-suite's offline stand-in network, not Inception's: it "
                   "ranks sample sets but is not comparable with published FIDs (the Inception weights, or "
                   "fid.extractor=inception-v3-compat, give the standard FID)",
}
