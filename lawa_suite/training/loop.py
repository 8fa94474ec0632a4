"""The one training loop. It names no task and no averager: both come from the registries.

Per optimizer step: ``grad_accum`` micro-batches (gradients synchronised only on the last), a finite check
of loss and gradient norm (a bad step is skipped, counted, and never reaches the averagers), the optimizer
step, then every averager observes the new weights, after a check that they hold no NaN or Inf. One host
synchronisation a step decides all of that: the loss, the gradient norm and the previous step's weights' finite
flag are read together (``Run.optimizer_step``), so the averagers observe a step's weights during the next step,
before its optimizer step changes them (its forward pass changes only buffers, which are kept aside); anything that
needs the averages at once (an evaluation, a checkpoint, the end, a stop) first settles them (``Run.settle``),
which costs a second read on those steps only. ``compile=true`` compiles the model in place, so every name the
averagers, checkpoints and exports see is the model's own. Every ``eval.every`` steps the raw weights and each ready
averager are scored on the same held-out batches: averaged weights are copied into the model, BatchNorm
statistics are recomputed for them if the model has BatchNorm, and the raw weights are copied back, bit for
bit; evaluation runs under a forked RNG so it never changes training. A schedule-free optimizer's raw score is of
its eval sequence, put in inside the same swap; its averagers observe the live (train-sequence) weights
(``tasks/schedule_free.py`` says why). Checkpoints hold everything needed to continue an uninterrupted run
exactly (raw weights, optimizer, data position, RNG, every averager), and
a checkpoint whose state holds NaN or Inf is never written. SIGTERM (to the process or its whole group) ends
the current step, saves and exits with 143. With several processes only rank 0 writes checkpoints
(``distributed=fsdp``: every rank writes its shards and rank 0 commits them; ``sharding.py``,
``sharded_checkpoints.py``), the processes stop together, each one's RNG is saved, and rank 0's buffers are shared
after every step (as DDP does before every forward pass) so that every process's averagers hold the same weights.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.averagers._readiness import never_ready
from lawa_suite.averagers.base import Averager, finite_flag, named_tensors
from lawa_suite.config import ResolvedConfig, accumulation, dotted
from lawa_suite.errors import EXIT_NONFINITE, EXIT_PREEMPTED, ConfigError, Interrupted, NonFiniteTraining, Preempted
from lawa_suite.report import write_report
from lawa_suite.run_lock import FolderLock, reserve_folder
from lawa_suite.rundir import MetricsLog, prepare_run_dir, write_metrics_meta
from lawa_suite.tasks import schedule_free
from lawa_suite.tasks.base import Task, has_batchnorm, parameter_count
from lawa_suite.training.checkpointing import RunCheckpointer, resume_source
from lawa_suite.training.preemption import StopFlag
from lawa_suite.training.progress import ProgressBar
from lawa_suite.training.scoring import Scorer, score_line, seed_everything
from lawa_suite.training.settings import cuda_settings, lr_factor
from lawa_suite.training.sharding import agree_finite, gather_full, shard_model
from lawa_suite.training.state import TrainState

__all__ = ["train", "Run", "RunResult", "NonFiniteTraining", "Preempted", "EXIT_NONFINITE", "EXIT_PREEMPTED"]


@dataclass
class RunResult:
    out: Path
    step: int
    skipped_steps: int


# -- the run ---------------------------------------------------------------------------------------------------
class Run:
    """One training run: built from a resolved config, driven by ``train``. Holds no task or averager logic."""

    def __init__(self, cfg: ResolvedConfig) -> None:
        from accelerate import Accelerator

        self.cfg, rc = cfg, cfg.run  # rc: the RunConfig, as in train()
        if rc.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
        # Launched as several processes (torchrun, accelerate launch) on a machine without a GPU: accelerate
        # joins them over gloo only when told to use the CPU; otherwise each would train alone into one folder.
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        on_cpu = world > 1 and not torch.cuda.is_available() and not has_xpu
        # A process group this run starts is this run's to end (``release_process_group``); one the caller
        # started before (to gather results after training, say) stays the caller's.
        self.owns_process_group = world > 1 and not (torch.distributed.is_available()
                                                     and torch.distributed.is_initialized())
        if world == 1 and not torch.distributed.is_initialized():
            # accelerate keeps the first Accelerator's settings in a process-wide singleton and refuses another
            # mixed_precision: a second run in one process (a notebook, a sweep, the tests) starts it afresh
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=rc.mixed_precision, log_with=rc.trackers or None,
                                       project_dir=rc.out, cpu=on_cpu)
        if self.accelerator.num_processes != world:
            raise ConfigError(f"launched as {world} processes (WORLD_SIZE), but accelerate joined "
                              f"{self.accelerator.num_processes}; check the launcher and its backend")
        self.is_main = self.accelerator.is_main_process
        # Every process checks the folder before the main one writes to it (else the others would find its
        # fresh config.yaml and refuse to overwrite "an earlier run"); the main one writes it once everything that
        # can refuse the config (data, tokenizer, model, averagers and their folders, the checkpoint to resume) has
        # said yes: a refused command creates nothing.
        self.out = prepare_run_dir(cfg, is_main=False)
        self.accelerator.wait_for_everyone()

        self.task: Task = registry.tasks.get(rc.task)(cfg.task, rc)
        self.task.setup()
        seed_everything(rc.seed)
        model = self.task.build_model()
        if rc.compile:
            # In place (nn.Module.compile), not torch.compile(model): the module stays itself, so state_dict names
            # (averagers, weight swap, checkpoints, trajectory, exports) never gain the wrapper's `_orig_mod.`, and
            # evaluation, which copies averaged weights into the module's own tensors, runs the compiled code too.
            model.compile()
        unique = parameter_count(model)
        tied = sum(p.numel() for p in model.parameters()) - unique
        self.log(self.task.summary(model) + (f" ({unique:,} unique: {tied:,} tied)" if tied else ""))
        # distributed=fsdp: FSDP2 shards the parameters (training/sharding.py) before the optimizer is built on them;
        # accelerate then prepares only the optimizer (on CPU it would wrap the model in DDP as well).
        self.sharded = rc.distributed == "fsdp" and self.accelerator.num_processes > 1
        if rc.distributed == "fsdp" and not self.sharded:
            self.log("distributed=fsdp on one process: nothing to shard; the model trains whole")
        if self.sharded:
            model = shard_model(model, self.accelerator.device)
        optimizer = self.task.build_optimizer(model, rc.lr)
        self.schedule_free = schedule_free.prepare(optimizer, rc)  # raw scores: its eval sequence
        if self.sharded:
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped: nn.Module = self.accelerator.unwrap_model(self.model)
        seed_everything(rc.seed + self.accelerator.process_index)  # per-process dropout streams
        world = self.accelerator.num_processes
        self.accumulation, micro_batch = accumulation(rc.batch_size, rc.grad_accum, world)
        if world > 1 and self.accumulation != rc.grad_accum:
            self.log(f"grad_accum={rc.grad_accum} on {world} processes: {self.accumulation} micro-batch(es) of "
                     f"{micro_batch // world} per process and step (the global batch stays {rc.batch_size})")
        self.stream = self.task.train_stream(micro_batch, self.accelerator.process_index, world)
        self.averagers: dict[str, Averager] = cfg.build_averagers()
        self.folders: list[FolderLock] = []  # locks of the averagers' snapshot folders, until an averager adopts one
        try:
            self.check_snapshot_folders()
            self._set_up(cfg)
        except BaseException:  # refused: another run may use those folders now
            self.release_folders()
            raise

    def _set_up(self, cfg: ResolvedConfig) -> None:
        """The rest of ``__init__``: what can still refuse the config, then the run folder, written last."""
        rc = cfg.run
        for avg in self.averagers.values():
            avg.start_run(rc.steps)
        self.state = TrainState()
        self.pending: int | None = None  # a step whose weights the averagers want and have not yet observed
        self.parameter_names = {name for name, _ in self.unwrapped.named_parameters(remove_duplicate=False)}
        self.scorer = Scorer(self.task, self.accelerator, self.unwrapped, self.task.eval_batches(),
                             self.task.calibration_batches(rc.eval.bn_batches) if has_batchnorm(self.unwrapped) else [],
                             schedule_free.EvalSequence(self.optimizer) if self.schedule_free else None)
        # the checkpoint to resume, checked against the model, optimizer and averagers just built (every process)
        self.resume_from = resume_source(self) if rc.resume else None
        if self.is_main:
            prepare_run_dir(cfg, is_main=True)
            # what the records' metrics mean, beside them: a report of a plugin evaluator's run need not guess
            write_metrics_meta(self.out, self.task.evaluator, self.scorer.metrics,
                               getattr(self.scorer.evaluator, "notes", None) or {})
        self.accelerator.wait_for_everyone()
        # said before the minutes of training, not found missing from the report after them
        for name, why in never_ready(cfg.averagers, cfg.averager_of, rc.steps).items():
            self.log(f"warning: averager {name} will have no weights to evaluate in this run: {why}")
        self.checkpoints = RunCheckpointer(self.out / "checkpoints", self.is_main)
        self.stop = StopFlag()
        # several processes: the stop vote of the previous step, summed over the group, read with the next step's
        self.vote = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        self.stop_voted = False

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    # -- the averagers' own resources --
    def check_snapshot_folders(self) -> None:
        """Refuse folders the averagers name for their files (``Averager.snapshot_folder``) that would mix them: one
        shared by two averagers (each would delete the other's files), the run folder itself (its files and lock are
        the run's), any in a run of several processes (each would write its files into it; with distributed=fsdp its
        shards), and one another run uses: its lock (``run_lock.reserve_folder``) is taken here, before the run writes
        anything, for the averager to adopt when it first writes there (``release_folders`` lets go of the rest)."""
        owners: dict[str, str] = {}  # folder -> the averager keeping its files there
        keys: dict[str, str] = {}    # folder -> the key naming it (lawa.dir)
        out = Path(self.cfg.run.out).resolve()
        for name, avg in self.averagers.items():
            named = avg.snapshot_folder()
            if named is None:
                continue
            key, folder = f"{name}.{named.key}", os.path.abspath(named.path)
            if self.sharded:
                raise ConfigError(f"{key}: one folder would mix every rank's shards with distributed=fsdp; leave it "
                                  f"empty (a temporary folder per process), got {str(named.path)!r}")
            if self.accelerator.num_processes > 1:
                raise ConfigError(f"{key}: each of the {self.accelerator.num_processes} processes would keep its "
                                  f"files in this one folder; leave it empty (a temporary folder per process), got "
                                  f"{str(named.path)!r}")
            if folder in owners:
                raise ConfigError(f"{key}: {str(named.path)!r} is {owners[folder]}'s snapshot folder too; give each "
                                  f"averager its own folder, or leave it empty")
            if Path(named.path).resolve() == out:
                raise ConfigError(f"{key}: {str(named.path)!r} is the run folder itself (out=); its files would mix "
                                  f"with the run's; give it a folder of its own (a subfolder such as "
                                  f"{os.path.join(self.cfg.run.out, name + '-snapshots')} is fine), or leave it empty "
                                  f"for a temporary one")
            owners[folder], keys[folder] = name, key
        for folder, key in keys.items():
            if Path(folder).resolve().parent.is_dir():  # (else no other run can hold it: the averager locks it later)
                self.folders.append(reserve_folder(Path(folder), lambda holder, key=key, folder=folder: ConfigError(
                    f"{key}: {folder} is in use by another run's averager (held by {holder}); give each run its own "
                    f"folder, or leave it empty for a temporary one")))

    def release_folders(self) -> None:
        """Let go of the snapshot-folder locks ``check_snapshot_folders`` took that no averager adopted."""
        for lock in self.folders:
            lock.release()
        self.folders = []

    def close_averagers(self) -> list[BaseException]:
        """End every averager's background work as the run ends (``Averager.close``: LAWA's and wma's threads, their
        queued file writes); a plugin written before ``close`` existed has none. Every averager is closed whatever
        another's close raised: the errors are said here and returned, for a run that ended well to raise."""
        errors = []
        for name, avg in self.averagers.items():
            try:
                getattr(avg, "close", lambda: None)()
            except Exception as exc:  # noqa: BLE001 - said and returned: the caller raises it on a clean end
                self.log(f"warning: closing averager {name} failed: {type(exc).__name__}: {exc}")
                errors.append(exc)
        return errors

    # -- several processes --
    def stop_requested(self) -> bool:
        """Whether to stop after this step: one process, as soon as it got SIGTERM or SIGINT. Several: all decide
        together, or one would save while the others step on, and without a read of their own: each step ends by
        summing every process's flag over the group (``cast_stop_vote``, queued on the device), and the next step's
        one host read carries the sum. So they stop one step after the signal lands, all after the same step."""
        if self.accelerator.num_processes == 1:
            return self.stop.poll()
        self.cast_stop_vote()
        return self.stop_voted

    def cast_stop_vote(self) -> None:
        self.vote.fill_(float(self.stop.poll()))  # (fill_ with a Python number: no upload to wait for)
        torch.distributed.all_reduce(self.vote, op=torch.distributed.ReduceOp.SUM)

    def sync_buffers(self) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics) after each step.

        DDP broadcasts them from rank 0 at the start of every forward pass anyway, so training does not change;
        without this, each process's averagers (and its share of the evaluation) would see its own buffers.
        """
        if self.accelerator.num_processes == 1 or not (self.sharded or getattr(self.model, "broadcast_buffers", False)):
            return
        buffers = [b for b in self.unwrapped.buffers() if b.numel()]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in buffers:
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in group])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for b in group:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    # -- one step --
    def feed_averagers(self, step: int, weights: dict[str, torch.Tensor] | None = None,
                       finite: bool | None = None) -> None:
        """Give the weights after ``step`` (the model's, unless ``weights`` is given) to every averager that wants
        them, after one shared NaN/Inf check (not one per averager: on a memory-bound update that check costs as
        much as the average itself). ``finite``: that check's answer, already read with the step's loss."""
        wanting = [avg for avg in self.averagers.values() if avg.wants(step)]
        if not wanting:
            return
        observed = self.unwrapped if weights is None else weights
        if finite is None:
            values = named_tensors(observed).values()
            finite = bool(self.agree([t for t in values if t.is_floating_point()]))
        if not finite:
            self.log(f"warning: the weights after step {step} hold NaN or Inf; no averager sees them")
            for avg in wanting:
                avg.refuse(step)
            return
        for avg in wanting:
            avg.observe(step, observed, checked=True)

    def defer(self, step: int) -> None:
        """Leave the weights after ``step`` for the next step's one host read (nothing if no averager wants them)."""
        self.pending = step if any(avg.wants(step) for avg in self.averagers.values()) else None

    def settle(self) -> None:
        """Let the averagers observe the deferred step now (its own finite check: one extra read), before anything
        that uses them: an evaluation, a checkpoint, the end of the run."""
        if self.pending is not None:
            step, self.pending = self.pending, None
            self.feed_averagers(step)
            self.store_averages(step)

    def hold_deferred(self) -> tuple[int, dict[str, torch.Tensor], torch.Tensor] | None:
        """The deferred step, its weights as the averagers will see them and their finite flag on the device, taken
        before this step's first forward pass: parameters live (only the optimizer step changes them), buffers
        (BatchNorm statistics, which the forward pass updates) copied. None when no step is deferred."""
        if self.pending is None:
            return None
        step, self.pending = self.pending, None
        weights = {name: (t if name in self.parameter_names else t.clone())
                   for name, t in named_tensors(self.unwrapped).items()}  # a sharded model's: this rank's shards
        return step, weights, self.agree([t for t in weights.values() if t.is_floating_point()])

    def agree(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``finite_flag`` of ``tensors``; of a sharded model, the minimum over all ranks (each checks its own
        shards), so NaN in one rank's shard is refused by every rank. On the device: read with the step's loss."""
        flag = finite_flag(tensors)
        return agree_finite(flag.to(self.accelerator.device)) if self.sharded else flag

    def store_averages(self, step: int) -> None:
        """Write the averages the averagers ask to keep (``Averager.stored_averages``: EDM2's snapshots) into
        ``averages/<averager>/``. Every process asks (the averagers are alike); the main one writes."""
        for name, avg in self.averagers.items():
            for stored in avg.stored_averages(step):
                if self.sharded:  # rank 0 alone would write its own shards as if they were the model
                    raise ConfigError(f"{name}: stored averages (snapshots) of a sharded model are not supported yet "
                                      f"with distributed=fsdp; turn its snapshots off")
                if self.is_main:
                    path = self.out / "averages" / name / f"{stored.label}.safetensors"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    ckpt.save_tensors_atomic(path, stored.tensors, {**stored.metadata, "averager": name})

    def optimizer_step(self) -> float | None:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss, or None if skipped."""
        rc = self.cfg.run
        factor = lr_factor(self.state.step, rc)
        for group in self.optimizer.param_groups:
            group["lr"] = rc.lr * factor
        held = self.hold_deferred()
        # summed on the device: one host sync per step (below), not one per micro-batch
        total = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        for micro in range(self.accumulation):
            batch = self.stream.next_batch()
            sync = micro == self.accumulation - 1
            if self.sharded:  # FSDP2's no_sync: keep unsharded gradients until the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or self.sharded else self.accelerator.no_sync(self.model)), \
                    self.accelerator.autocast():
                loss = self.task.loss(self.model, batch, self.state.step)
                self.accelerator.backward(loss / self.accumulation)
            total += loss.detach().double()
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), rc.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a sharded model's norm is a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        norm_tensor = torch.as_tensor(grad_norm, dtype=torch.float64, device=total.device)
        flags = [held[2].to(total.device)] if held is not None else []
        votes = [self.vote] if self.accelerator.num_processes > 1 else []
        loss_sum, norm, *rest = torch.stack([total, norm_tensor, *votes, *flags]).tolist()  # the step's one host read
        if votes:
            self.stop_voted = self.stop_voted or rest.pop(0) > 0
        finite = rest
        if held is not None:  # before the optimizer step: the parameters are still the deferred step's
            self.feed_averagers(held[0], held[1], finite=finite[0] == 1.0)
            self.store_averages(held[0])
        mean_loss = loss_sum / self.accumulation
        if not (math.isfinite(mean_loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def record_skip(self, metrics: MetricsLog) -> None:
        """Count a step skipped for a non-finite loss or gradient; too many in a row stop the run."""
        self.state.skipped += 1
        self.state.bad_in_a_row += 1
        metrics.write({"step": self.state.step, "weights": "raw", "split": "train", "skipped": True,
                       "skipped_total": self.state.skipped})
        limit = self.cfg.run.max_bad_steps
        if self.state.bad_in_a_row >= limit:
            raise NonFiniteTraining(f"{self.state.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                    f"(after step {self.state.step}); stopping (max_bad_steps={limit})")

    def evaluate(self, metrics: MetricsLog) -> dict[str, dict[str, float]]:
        scores = self.scorer.score_all(self.averagers, self.state.step)
        for weights_name, values in scores.items():
            metrics.write({"step": self.state.step, "weights": weights_name, "split": "val", **values})
        if self.cfg.run.trackers:  # val/<metric>/<weights>: one metric's series side by side
            self.accelerator.log({f"val/{k}/{w}": v for w, vals in scores.items() for k, v in vals.items()},
                                 step=self.state.step)
        return scores

    def start_trackers(self) -> None:
        """accelerate's trackers with the resolved config as hyperparameters. TensorBoard also gets a chart per
        metric with raw and every averager overlaid (its custom-scalars layout), the comparison a run is for."""
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in dotted(self.cfg.as_dict()).items()}
        self.accelerator.init_trackers(Path(self.cfg.run.out).name, config=hparams)
        if self.is_main and "tensorboard" in self.cfg.run.trackers:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_custom_scalars({"raw and averaged weights": {
                metric: ["Multiline", [rf"val/{metric}/.*"]] for metric in self.scorer.metrics}})

    def release_process_group(self) -> None:
        """End the process group this run started, once every process has got here. Left to interpreter exit,
        gloo's worker threads are torn down during finalization and a process dies now and then with "terminate
        called without an active exception" (SIGABRT) after finishing its work; NCCL warns of the same. Only on an
        end all processes reach together: after an error on one, the others may be inside a collective, and
        destroying the group would hang them."""
        if not (self.owns_process_group and torch.distributed.is_initialized()):
            return
        from accelerate.state import AcceleratorState

        self.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # a later Run in this process starts a new group

    def save_trajectory(self) -> None:
        # a sharded model's weights are gathered whole for the file (a collective: every rank takes part)
        weights = (gather_full(named_tensors(self.unwrapped), self.unwrapped) if self.sharded
                   else self.unwrapped.state_dict())
        if self.is_main:
            path = self.out / "trajectory" / f"step-{self.state.step:08d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            ckpt.save_tensors_atomic(path, weights, {"step": str(self.state.step), "format": "lawa-suite-trajectory/1"})


def due(step: int, every: int) -> bool:
    """Whether something done every ``every`` steps (0: never) is due after ``step``."""
    return every > 0 and step % every == 0


def train(cfg: ResolvedConfig) -> RunResult:
    """Run (or resume) training as configured; returns where the run lives and how far it got."""
    with cuda_settings(cfg.run):
        return _train(cfg)


def _train(cfg: ResolvedConfig) -> RunResult:
    run = Run(cfg)
    rc = cfg.run
    if rc.resume:
        try:
            run.checkpoints.resume(run, run.resume_from)
        except BaseException:  # (a file unreadable since it was checked): nothing of this run lives on
            run.close_averagers()
            run.release_folders()
            raise
    if rc.trackers:
        run.start_trackers()
    metrics = MetricsLog(run.out / "metrics.jsonl", run.is_main)
    bar = ProgressBar(rc.steps, run.state.step, rc.eval.every, rc.task, run.is_main and rc.progress)
    run.stop.install()
    ended_together = False  # every process reached the end, or a stop all of them agreed on
    unclosed: list[BaseException] = []  # errors of the averagers' close(), raised only if nothing else is
    try:
        while run.state.step < rc.steps:
            loss = run.optimizer_step()
            if loss is None:
                run.record_skip(metrics)
                continue
            run.state.bad_in_a_row = 0
            run.state.step += 1
            run.sync_buffers()
            step = run.state.step
            run.defer(step)
            lr = rc.lr * lr_factor(step - 1, rc)
            if due(step, rc.log_every) or step == 1:
                metrics.write({"step": step, "weights": "raw", "split": "train", "loss": loss, "lr": lr})
                if rc.trackers:
                    run.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
            bar.stepped(step, loss, lr)
            if due(step, rc.trajectory.every):
                run.save_trajectory()
            if due(step, rc.eval.every) or step == rc.steps:
                run.settle()
                started = time.perf_counter()
                scores = run.evaluate(metrics)
                bar.evaluated(time.perf_counter() - started, score_line(step, scores, run.scorer.metrics))
            saved = due(step, rc.checkpoint.every) or step == rc.steps
            if saved:
                run.settle()
                run.checkpoints.save(run)
            bar.paused()
            if run.stop_requested():
                run.settle()
                if not saved:
                    run.checkpoints.save(run)
                where = f"checkpoint saved in {run.checkpoints.folder}; continue with resume=auto"
                ended_together = True
                if run.stop.signal == signal.SIGINT:
                    raise Interrupted(f"interrupted at step {step}; {where}")
                raise Preempted(f"stopped by SIGTERM after step {step}; {where}")
        run.settle()  # (the final evaluation has settled the last step already)
        ended_together = True
    finally:
        unclosed = run.close_averagers()  # success, error or stop: no averager's thread outlives its run
        run.release_folders()  # (an averager that adopted its folder's lock lets go of it itself)
        run.stop.uninstall()
        bar.close()
        metrics.close()
        for tracker in run.accelerator.trackers:  # (accelerate's end_training would also end the process group)
            tracker.finish()
        if ended_together:
            run.release_process_group()
    if unclosed:
        raise unclosed[0]
    if run.is_main:
        write_report(run.out)
    return RunResult(run.out, run.state.step, run.state.skipped)
