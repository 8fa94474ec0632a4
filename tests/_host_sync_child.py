"""A child process for tests/test_host_sync_ranks.py, launched by torchrun: runs the loop through the CUDA stand-in
on each of several processes and counts each rank's host synchronisations per optimizer step.

    torchrun --nproc_per_node 2 tests/_host_sync_child.py RESULT_DIR RUNS_JSON

``RUNS_JSON``: a list of ``{"name": ..., "args": [suite run overrides...], "second_read": false}``, run one after
another in this process (one launch, several runs: a torchrun start costs seconds). The process group is this
script's, started once (gloo: what the stand-in gives where accelerate asks for nccl) and shared by the runs: a
default group started again under torchrun waits forever for its store. Writes ``RESULT_DIR/<name>.rank<r>.json``:
``{"loop": [...], "ddp_setup": [...]}``, the stand-in's syncs between the starts of consecutive optimizer steps
(the last step's evaluation left out), split into what DDP's forward pre-hook did (``ddp_setup``: DDP rebuilds
its gradient buckets once, in the second step's forward, and reads their order back to the host; a GPU does the
same) and all the rest (``loop``). ``second_read``: the negative control, each step's weights observed at once
with their own finite check (the second read the loop avoids).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from lawa_suite.config import resolve  # noqa: E402
from lawa_suite.testing.cuda_standin import cuda_standin  # noqa: E402
from lawa_suite.training.loop import Run, train  # noqa: E402


def count_run(args: list[str], second_read: bool) -> dict[str, list[int]]:
    """Train once through the stand-in; the syncs of each step, the loop's and DDP's pre-forward's apart."""
    loop_starts: list[int] = []
    ddp: list[int] = []
    step, pre_forward, defer = Run.optimizer_step, DistributedDataParallel._pre_forward, Run.defer
    with cuda_standin() as device:
        def counted_step(self):
            loop_starts.append(device.syncs)
            ddp.append(0)
            return step(self)

        def counted_pre_forward(self, *inputs, **kwargs):
            before = device.syncs
            try:
                return pre_forward(self, *inputs, **kwargs)
            finally:
                ddp[-1] += device.syncs - before

        Run.optimizer_step, DistributedDataParallel._pre_forward = counted_step, counted_pre_forward
        if second_read:
            Run.defer = lambda self, at: (defer(self, at), self.settle())
        try:
            train(resolve(args))
        finally:
            Run.optimizer_step, DistributedDataParallel._pre_forward, Run.defer = step, pre_forward, defer
    per_step = [b - a for a, b in zip(loop_starts, loop_starts[1:])]
    return {"loop": [n - d for n, d in zip(per_step, ddp)], "ddp_setup": ddp[:len(per_step)]}


def main() -> None:
    results, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    from accelerate.state import AcceleratorState

    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    try:
        for spec in runs:
            # accelerate keeps its first run's settings while a group is up; each run here starts it afresh
            AcceleratorState._reset_state(reset_partial_state=True)
            counts = count_run(spec["args"], spec.get("second_read", False))
            (results / f"{spec['name']}.rank{rank}.json").write_text(json.dumps(counts))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
