"""Post-hoc averaging: replay the saved checkpoints of a trajectory, in step order, through registered averagers.

The averagers are the classes that run online (plugins included); only the clock differs, and each averager
plans its own replay (``Averager.plan_replay``): by default it observes the saved checkpoints only, so
``every``, ``start`` and ``decay`` count observations (as Algorithm 2 of Sanyal et al. 2024 applies EMA and SWA
to a list of checkpoints); an averager whose window is in steps keeps that meaning (``averagers/lawa.py``). A
derived checkpoint is written at every saved step divisible by ``interval``; without it, one per averager: the
state the online averager would end the run with (a windowed average over a run's trajectory equals the online
one bit for bit). Memory stays constant however long the trajectory: inputs are memory-mapped, tensors streamed
in slices. Nothing is written unless everything checks out, and then atomically, with manifests. Inputs whose
weights hold NaN or Inf are left out (refused, as online), and each is named with the outputs not written for it.

This package names no averager. Its files, in the order data flows (each imports only those before it)::

    limits.py    the tunable sizes (one object passed down)
    discover.py  which files of a folder hold which step
    peers.py     where the weights lie in other tools' torch checkpoints, and the prefixes they add
    reader.py    headers and zero-copy tensor views of the mapped files
    checks.py    layouts against each other; NaN/Inf, each slice just before the averagers see it
    jobs.py      the command's words -> averager jobs (a grid), out, interval, eval
    plan.py      each job's replays (from the averager class) and the outputs they write
    writer.py    output files written slice by slice and hashed; input hashes
    replay.py    the one pass over every tensor through every replay
    run.py       the entry point: check, average, write manifests, commit
    load.py      whole checkpoints into memory, for scoring and analysis
"""

from __future__ import annotations

from lawa_suite.errors import PosthocError
from lawa_suite.posthoc.checks import nonfinite_keys
from lawa_suite.posthoc.discover import Found, Snapshot, discover
from lawa_suite.posthoc.jobs import Command, Job, parse_command, parse_jobs
from lawa_suite.posthoc.limits import Limits
from lawa_suite.posthoc.load import load_snapshot, read_checkpoint
from lawa_suite.posthoc.peers import WeightsAt, weights_at
from lawa_suite.posthoc.reader import Reader
from lawa_suite.posthoc.replay import DERIVED_FORMAT
from lawa_suite.posthoc.run import FORMAT, PosthocResult, average, is_average_output
from lawa_suite.posthoc.writer import hash_input

__all__ = ["PosthocError", "Snapshot", "Found", "discover", "Reader", "nonfinite_keys", "Job", "parse_jobs", "Command",
           "parse_command", "Limits", "PosthocResult", "average", "hash_input", "read_checkpoint", "load_snapshot",
           "FORMAT", "DERIVED_FORMAT", "WeightsAt", "weights_at", "is_average_output"]
