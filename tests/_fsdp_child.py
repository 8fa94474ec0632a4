"""A child process for tests/test_fsdp.py, launched twice by torchrun: a ``distributed=fsdp`` run of the flat toy
task, then each averager's average gathered whole and the bytes each rank's averagers hold.

    [FSDP_NAN_AT=STEP:RANK] torchrun --nproc_per_node 2 tests/_fsdp_child.py RESULT_DIR <suite run arguments...>

Writes ``RESULT_DIR/averages.safetensors`` (rank 0: ``<averager>/<name>`` full tensors, ``raw/<name>`` the final
weights) and ``RESULT_DIR/rank<r>.json`` (each averager's state bytes on that rank). The test imports this module
for ``FlatToyTask`` and ``run_and_capture`` (its one-process reference run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import ToyTask  # noqa: E402
from lawa_suite import checkpoints as ckpt, registry  # noqa: E402
from lawa_suite.training import loop as train_module  # noqa: E402
from lawa_suite.averagers.base import Averager, named_tensors  # noqa: E402
from lawa_suite.config import resolve  # noqa: E402


class FlatToyTask(ToyTask):
    """The toy task without BatchNorm or dropout: a batch split over two processes then gives the same gradient as
    the whole batch in one (BatchNorm's statistics and the dropout streams are per process)."""
    name = "toyflat"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, self.config.hidden), nn.ReLU(), nn.Linear(self.config.hidden, 4))


if "toyflat" not in registry.tasks._builtins:
    registry.tasks.register("toyflat")(FlatToyTask)


def state_bytes(averager: Averager) -> int:
    """Bytes of the tensors an averager keeps (its method state: accumulators, copies), on this rank."""
    tensors, _ = ckpt.flatten_state(averager.state_dict()["state"])
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_and_capture(args: list[str], nan_at: tuple[int, int] | None = None) -> Any:
    """``train`` as ``suite run`` would, returning the finished ``Run`` (its model and averagers). ``nan_at=(step,
    rank)``: the weights after that step hold NaN in that rank's shard while the loop checks them (put back before
    anything else reads them), so every rank's averagers must refuse that step and training goes on unchanged."""
    captured = []
    original_init, original_hold = train_module.Run.__init__, train_module.Run.hold_deferred

    def keep(self, cfg):
        original_init(self, cfg)
        captured.append(self)

    def poisoned_hold(self):
        if nan_at is None or self.pending != nan_at[0] or self.accelerator.process_index != nan_at[1]:
            return original_hold(self)
        first = next(iter(named_tensors(self.unwrapped).values()))  # this rank's shard of the first weight
        kept = first.reshape(-1)[0].clone()
        first.reshape(-1)[0] = float("nan")
        held = original_hold(self)  # the flag is computed (and agreed over ranks) here
        held[2].item()  # on an accelerator the flag is computed asynchronously: wait before putting the value back
        first.reshape(-1)[0] = kept
        return held

    train_module.Run.__init__, train_module.Run.hold_deferred = keep, poisoned_hold
    try:
        train_module.train(resolve(args))
    finally:
        train_module.Run.__init__, train_module.Run.hold_deferred = original_init, original_hold
    return captured[0]


def main() -> None:
    from safetensors.torch import save_file

    from lawa_suite.training.sharding import gather_full

    result = Path(sys.argv[1])
    nan_at = os.environ.get("FSDP_NAN_AT")  # "step:rank"
    # This process gathers the averages after training, so it starts the process group itself (the run then
    # leaves it alone) and ends it before exiting (left to interpreter exit, gloo aborts a process now and then).
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several:
        torch.distributed.init_process_group("gloo")
    run = run_and_capture(sys.argv[2:], tuple(int(v) for v in nan_at.split(":")) if nan_at else None)
    tensors: dict[str, torch.Tensor] = {}
    for name, avg in run.averagers.items():  # collective: every rank gathers, rank 0 keeps
        for key, value in gather_full(avg.average() or {}, run.unwrapped).items():
            tensors[f"{name}/{key}"] = value.contiguous()
    for key, value in gather_full(named_tensors(run.unwrapped), run.unwrapped).items():
        tensors[f"raw/{key}"] = value.contiguous()
    rank = run.accelerator.process_index
    (result / f"rank{rank}.json").write_text(json.dumps(
        {"bytes": {name: state_bytes(avg) for name, avg in run.averagers.items()},
         "refused": {name: avg.refused for name, avg in run.averagers.items()},
         "sharded": run.sharded, "param_types": sorted({type(p).__name__ for p in run.unwrapped.parameters()}),
         "eval_batches": len(run.scorer.batches)}))
    if rank == 0:
        save_file(tensors, str(result / "averages.safetensors"))
    if several:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from lawa_suite.cli import end_process

    torch.set_num_threads(1)
    main()
    end_process(0)  # as `suite` does in a distributed run: no interpreter finalization (see end_process)
