"""A child process for tests/test_reliability.py: runs `suite` on the toy task with hooks set by environment.

    python tests/_reliability_child.py run <suite run arguments...>     # the real CLI, exit codes included
    python tests/_reliability_child.py crash <out> <point>...           # one forked child per fault point

Hooks (environment variables, all optional):
    REL_KILL_AT=N         SIGKILL this process when step N+1 starts (between checkpoints)
    REL_CONSUMED=FILE     append the sample ids of every batch to FILE as they are consumed (unbuffered)
    REL_PRINT_STEPS=S     print "step N" when step N+1 starts, then sleep S seconds (the parent times signals)
    REL_TERM_DURING_SAVE  a signal number: during the preemption save, send it to the whole process group again
    REL_FSIZE=N:BYTES     before the checkpoint of step N, limit file sizes to BYTES (RLIMIT_FSIZE)
    REL_TERM_AT=N:RANK    send SIGTERM to the process of that rank when step N+1 starts
    REL_READS=FILE        the loop's host reads per optimizer step, to FILE.rank<r>.json at exit
    REL_COMMITS=FILE      append "rank step" for every checkpoint commit, and each rank's averager states; at
                          exit, FILE.rank<r>.group_at_exit says whether a process group was still open

The ``toyloader`` task is the toy task fed by DataLoader workers (the streaming image loader's code path).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from conftest import ToyTask  # noqa: E402  (registers the toy task)
from lawa_suite import checkpoints as ckpt, registry  # noqa: E402
from lawa_suite.training import loop as train_module  # noqa: E402
from lawa_suite.data import imagestream  # noqa: E402
from lawa_suite.data.stream import IndexStream  # noqa: E402
from lawa_suite.training.checkpointing import RunCheckpointer  # noqa: E402


class _Rows(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class _LoaderStream(imagestream.FileImageStream):
    """The streaming image loader (DataLoader workers, resumable position) over the toy task's rows."""

    def __init__(self, x: torch.Tensor, micro_batch: int, seed: int, rank: int, world: int) -> None:
        self.dataset = _Rows(x)
        self.args = (len(x), micro_batch, seed, rank, world)
        self.indices = IndexStream(*self.args)
        self.workers, self.prefetch, self._batches = 2, 2, None


class ToyLoaderTask(ToyTask):
    """The toy task, its batches produced by 2 DataLoader worker processes."""
    name = "toyloader"

    def train_stream(self, micro_batch: int, rank: int, world: int):
        return _Adapt(_LoaderStream(self.x, micro_batch, self.run.seed, rank, world), self.y)


class _Adapt:
    def __init__(self, stream, y) -> None:
        self.stream, self.y = stream, y

    def next_batch(self):
        batch = self.stream.next_batch()
        return batch["images"], self.y[batch["indices"]], batch["indices"]

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


if "toyloader" not in registry.tasks._builtins:
    registry.tasks.register("toyloader")(ToyLoaderTask)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def count_reads(path: str) -> None:
    """Count the suite's host reads (``.tolist()``, ``.item()``, ``bool()``/``float()`` of a tensor, called from
    ``lawa_suite`` code) per optimizer step; write them to ``path.rank<r>.json`` at exit. The finite check's host
    form is left out: in this CPU run the weights are host tensors, which it reads in place (no device behind
    them); on a GPU the same check runs on the device and is read with the step's one read (tests/test_host_sync.py
    counts that through the CUDA stand-in, in one process: it does not model process groups)."""
    import atexit
    import sys as _sys

    from lawa_suite.averagers import _tensors

    counts: list[int] = []
    paused = [False]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if counts and not paused[0] and "/lawa_suite/" in _sys._getframe(1).f_code.co_filename:
                counts[-1] += 1
            return original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)

    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        counting(name)
    host_finite = _tensors._finite_on_host

    def uncounted(t):
        paused[0] = True
        try:
            return host_finite(t)
        finally:
            paused[0] = False

    _tensors._finite_on_host = uncounted
    step = train_module.Run.optimizer_step

    def stepped(self):
        counts.append(0)
        return step(self)

    train_module.Run.optimizer_step = stepped
    atexit.register(lambda: Path(f"{path}.rank{_rank()}.json").write_text(json.dumps(counts)))


def install_hooks() -> None:
    kill_at = int(os.environ.get("REL_KILL_AT", "-1"))
    consumed = os.environ.get("REL_CONSUMED")
    pause = float(os.environ.get("REL_PRINT_STEPS", "-1"))
    fd = os.open(consumed, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if consumed else None
    loss = ToyTask.loss

    def hooked(self, model, batch, step):
        if step >= 0 and len(batch) > 2:
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if fd is not None:
                os.write(fd, (json.dumps(batch[2].tolist()) + "\n").encode())
            if pause >= 0:
                print(f"step {step}", flush=True)
                time.sleep(pause)
        return loss(self, model, batch, step)

    ToyTask.loss = hooked
    reads = os.environ.get("REL_READS")
    if reads:
        count_reads(reads)

    term_at = os.environ.get("REL_TERM_AT")  # "N:RANK": SIGTERM to this process during step N+1, on one rank
    if term_at and int(term_at.split(":")[1]) == _rank():
        ToyTask.sigterm_at = int(term_at.split(":")[0])

    fsize = os.environ.get("REL_FSIZE")
    term_during_save = int(os.environ.get("REL_TERM_DURING_SAVE", "0"))  # the signal to send again while saving
    commits = os.environ.get("REL_COMMITS")
    save = RunCheckpointer.save
    if commits:  # registered first, so it runs after every other exit handler: what the interpreter is left with
        import atexit

        atexit.register(lambda: Path(f"{commits}.rank{_rank()}.group_at_exit").write_text(
            str(torch.distributed.is_initialized())))

    def hooked_save(self, run):
        if fsize and run.state.step == int(fsize.split(":")[0]):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            limit = int(fsize.split(":")[1])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if commits:
            tensors, _ = ckpt.flatten_state({n: a.state_dict() for n, a in run.averagers.items()})
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      f"{commits}.rank{_rank()}.step{run.state.step}.safetensors")
        if term_during_save and run.stop.raised:
            real_fault = ckpt.fault_point

            def second_term(name, step):
                if name == "after_first_file":
                    os.killpg(os.getpgrp(), term_during_save)
                    time.sleep(0.3)  # let it land everywhere while the save is still going on
                real_fault(name, step)
            ckpt.fault_point = second_term
        return save(self, run)

    RunCheckpointer.save = hooked_save
    if commits:
        commit = ckpt.commit_checkpoint

        def logged(root, step, *args, **kwargs):
            path = commit(root, step, *args, **kwargs)
            with open(commits, "a") as f:
                f.write(f"{_rank()} {step}\n")
            return path
        ckpt.commit_checkpoint = logged


def crash(out: str, points: list[str]) -> None:
    """Per fault point, a forked child trains until SIGKILL at that point; print each child's wait status."""
    from lawa_suite.config import resolve

    # Warm up once (lazy imports: accelerate, the optimizer's compiler hooks, the report's plotting) so that
    # each forked child only trains. One intra-op thread: forking after this is safe.
    train_module.train(resolve(["task=toy", f"out={out}/warmup", "steps=2", "eval.every=2"]))
    commit = ckpt.commit_checkpoint

    def logged(root, step, *args, **kwargs):  # the "nothing lost" oracle: each commit's file hashes, as it happens
        path = commit(root, step, *args, **kwargs)
        files = {p.name: ckpt.sha256_file(p) for p in sorted(path.iterdir())}
        with open(Path(root).parent / "commits.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "files": files}) + "\n")
        return path
    ckpt.commit_checkpoint = logged
    statuses = {}
    for point in points:
        step = 5 if point == "during_retention_delete" else 15  # retention at step 15 deletes step 5
        pid = os.fork()
        if pid == 0:
            os.environ["SUITE_FAULT"] = f"{point}@{step}"
            try:
                train_module.train(resolve(["task=toy", f"out={out}/{point}", "steps=15", "checkpoint.every=5",
                                            "checkpoint.keep=2", "eval.every=15"]))
            finally:
                os._exit(0)  # reaching here means the fault never fired
        statuses[point] = os.waitpid(pid, 0)[1]
    print(json.dumps({p: {"signal": os.WTERMSIG(s) if os.WIFSIGNALED(s) else None,
                          "exit": os.WEXITSTATUS(s) if os.WIFEXITED(s) else None} for p, s in statuses.items()}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "crash":
        crash(sys.argv[2], sys.argv[3:])
    else:
        install_hooks()
        from lawa_suite.cli import app, end_process
        try:
            app(["run", *sys.argv[2:]], prog_name="suite")
        except SystemExit as exc:  # as `suite` ends a process of a distributed run (cli.main)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                end_process(exc.code)
            raise
