"""The one training loop. It names no task and no averager: both come from the registries.

Per optimizer step: ``grad_accum`` micro-batches (gradients synchronised only on the last), a finite check
of loss and gradient norm (a bad step is skipped, counted, and never reaches the averagers), the optimizer
step, then every averager observes the new weights. Every ``eval.every`` steps the raw weights and each ready
averager are scored on the same held-out batches: averaged weights are copied into the model, BatchNorm
statistics are recomputed for them if the model has BatchNorm, and the raw weights are copied back, bit for
bit; evaluation runs under a forked RNG so it never changes training. Checkpoints hold everything needed to
continue an uninterrupted run exactly (raw weights, optimizer, data position, RNG, every averager), and
a checkpoint whose state holds NaN or Inf is never written. SIGTERM (to the process or its whole group) ends
the current step, saves and exits with 143. With several processes only rank 0 writes checkpoints, the
processes stop together, each one's RNG is saved, and rank 0's buffers are shared after every step (as DDP
does before every forward pass) so that every process's averagers hold the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.averagers.base import Averager, all_finite, find_aliases
from lawa_suite.config import ConfigError, ResolvedConfig, RunConfig, dotted
from lawa_suite.tasks.base import Task, has_batchnorm, parameter_count

__all__ = ["train", "RunResult", "NonFiniteTraining", "Preempted", "lr_factor", "EXIT_NONFINITE", "EXIT_PREEMPTED"]

EXIT_NONFINITE = 3      # too many non-finite steps in a row
EXIT_PREEMPTED = 143    # SIGTERM: state saved, run again with resume=auto (128 + SIGTERM, so schedulers requeue)
# Keys that may change between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = {"resume", "reset_averagers", "progress", "trackers", "out", "data.cache"}


class NonFiniteTraining(RuntimeError):
    """More than ``max_bad_steps`` consecutive steps had a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was committed before stopping."""


@dataclass
class RunResult:
    out: Path
    step: int
    skipped_steps: int


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken
    skipped: int = 0         # steps skipped for non-finite loss or gradients, in total
    bad_in_a_row: int = 0    # consecutive skipped steps


# -- learning-rate schedule (a pure function of the step: nothing to save, nothing to drift) -------------
def lr_factor(step: int, run: RunConfig) -> float:
    """Multiplier of ``run.lr`` for the optimizer step that follows ``step`` completed steps."""
    if step < run.warmup:
        return (step + 1) / run.warmup
    if run.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - run.warmup) / max(1, run.steps - run.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if run.schedule == "cosine" else 1.0 - progress
    return run.min_lr + (1 - run.min_lr) * shape


# -- RNG -----------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def nonfinite_parts(state: Any) -> list[str]:
    """Paths (``optimizer/state/0/exp_avg``) of the floating tensors in a nested state that hold NaN or Inf."""
    tensors, _ = ckpt.flatten_state(state)
    floats = {path: t for path, t in tensors.items() if t.is_floating_point() and t.numel()}
    if all_finite(list(floats.values())):
        return []
    return [path.lstrip("/") for path, t in floats.items() if not bool(torch.isfinite(t).all())]


# -- run directory -----------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, flushed as it goes; non-finite numbers become null."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (they belong to the part of the run a resume recomputes)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    ckpt.write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def config_differences(saved: dict[str, Any], now: dict[str, Any], reset_averagers: bool = False) -> list[str]:
    """Keys whose values differ; with ``reset_averagers`` the averager list and sections may change."""
    a, b = dotted(saved), dotted(now)
    averager_keys = {"averager"} | {f"{n}." for n in list(saved.get("averager", [])) + list(now.get("averager", []))}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        if reset_averagers and (key == "averager" or any(key.startswith(p) for p in averager_keys if p.endswith("."))):
            continue
        diffs.append(key)
    return diffs


def prepare_run_dir(cfg: ResolvedConfig, is_main: bool) -> Path:
    """Create ``out``; refuse to overwrite an earlier run unless resuming it with the same config."""
    out = Path(cfg.run.out)
    config_file = out / "config.yaml"
    # A run that stopped before its first step (missing data, a bad tokenizer) left only config.yaml: starting
    # again there loses nothing, so it is allowed and the config is rewritten.
    never_started = out.is_dir() and {p.name for p in out.iterdir()} == {"config.yaml"} and not cfg.run.resume
    if config_file.exists() and not never_started:
        if not cfg.run.resume:
            raise ConfigError(f"out: {out} already holds a run; pass resume=auto to continue it, or another out=")
        saved = yaml.safe_load(config_file.read_text())
        diffs = config_differences(saved, cfg.as_dict(), cfg.run.reset_averagers)
        if diffs:
            averager_names = set(saved.get("averager", [])) | set(cfg.averagers)
            touches_averagers = any(k == "averager" or k.split(".")[0] in averager_names for k in diffs)
            hint = "; to add, drop or retune averagers on resume pass reset_averagers=true" if touches_averagers else ""
            raise ConfigError(f"resume: the config differs from the saved run's in {', '.join(diffs)}; "
                              f"resume with the same settings or start a new out={hint}")
        if cfg.run.reset_averagers and is_main:  # the run's record follows the averagers it now has
            ckpt.write_atomic(config_file, lambda p: p.write_text(cfg.to_yaml()))
    elif out.exists() and any(out.iterdir()) and not cfg.run.resume and not never_started:
        raise ConfigError(f"out: {out} exists and is not empty; choose another out=")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not config_file.exists() or never_started:
            ckpt.write_atomic(config_file, lambda p: p.write_text(cfg.to_yaml()))
    return out


# -- evaluation ----------------------------------------------------------------------------------------------
@contextmanager
def forked_rng() -> Iterator[None]:
    """Evaluation may draw random numbers (dropout in calibration, samplers); training must not notice."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, task: Task, batches: list[Any]) -> None:
    """Recompute BatchNorm running statistics as a plain average over ``batches`` (like swa_utils.update_bn)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for batch in batches:
        task.loss(model, batch, step=-1)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


class WeightSwap:
    """Puts other weights into a model and the raw ones back, by fused copies into the model's own tensors (each
    tied tensor once): no state_dict clones, and the raw copy is a buffer reused between evaluations."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: list[str] = []
        self.live: list[Tensor] = []
        self.raw: list[Tensor] = []

    def save_raw(self) -> None:
        state = self.model.state_dict()  # looked up each time: a resume or a move may have replaced tensors
        aliased = {alias for alias, _ in find_aliases(state)}
        self.names = [n for n in state if n not in aliased]
        self.live = [state[n] for n in self.names]
        if len(self.raw) != len(self.live) or any(r.shape != t.shape or r.dtype != t.dtype or r.device != t.device
                                                  for r, t in zip(self.raw, self.live)):
            self.raw = [torch.empty_like(t) for t in self.live]
        torch._foreach_copy_(self.raw, self.live)

    def load(self, averager: Averager) -> None:
        """The averager's weights into the model, copied from its own tensors (no new set of weights)."""
        averager.load_average_into(dict(zip(self.names, self.live)))

    def restore_raw(self) -> None:
        torch._foreach_copy_(self.live, self.raw)


class Scorer:
    """Scores raw weights and every ready averager on the same batches, restoring the raw weights after."""

    def __init__(self, task: Task, accelerator: Any, model: nn.Module, batches: list[Any], calibration: list[Any]):
        self.task, self.accelerator, self.model = task, accelerator, model
        self.evaluator = registry.evaluators.create(task.evaluator, task=task)
        self.batches = batches[accelerator.process_index::accelerator.num_processes]
        self.calibration = calibration  # empty when the model has no BatchNorm (the caller decides)
        self.swap = WeightSwap(model)

    def _score(self, step: int, weights: str) -> dict[str, float]:
        self.evaluator.begin(step, weights)
        self.model.eval()
        with self.accelerator.autocast():
            return self.evaluator.evaluate(self.model, self.batches, self.accelerator)

    @torch.no_grad()
    def score_all(self, averagers: dict[str, Averager], step: int) -> dict[str, dict[str, float]]:
        was_training = self.model.training
        with forked_rng():
            scores = {"raw": self._score(step, "raw")}
            ready = {name: avg for name, avg in averagers.items() if avg.ready}
            if ready:
                self.swap.save_raw()
                for name, avg in ready.items():
                    self.swap.load(avg)
                    if self.calibration and avg.needs_bn_recalibration:
                        with self.accelerator.autocast():
                            recalibrate_batchnorm(self.model, self.task, self.calibration)
                    scores[name] = self._score(step, name)
                self.swap.restore_raw()
        self.model.train(was_training)
        return scores


# -- preemption ----------------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM asks the loop to save and stop at the end of the current step; nothing else happens in a handler.

    While installed, SIGTERM is also *blocked* in the main thread, so every process forked from it afterwards
    (DataLoader workers, in particular) inherits the block: a SIGTERM sent to the whole process group (as
    SLURM does) stays pending in the workers instead of killing them under the loop, and the loop can still
    fetch its batches and save. The main thread notices its own pending SIGTERM in ``poll`` (a SIGTERM that
    lands on another, unblocked thread runs the handler instead). A second SIGTERM while saving changes
    nothing: signals of one kind do not queue up. ``uninstall`` discards a pending SIGTERM, since the run
    is already stopping for it.
    """

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None
        self._blocked = False

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: the caller handles its own signals
            self._previous = None
            return
        if hasattr(signal, "pthread_sigmask"):
            self._blocked = signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def poll(self) -> bool:
        """True once SIGTERM has arrived (delivered to a handler, or pending on the blocked main thread)."""
        if self._blocked and not self.raised and signal.SIGTERM in signal.sigpending():
            self.raised = True
        return self.raised

    def uninstall(self) -> None:
        if self._blocked:
            if self.poll():
                signal.sigtimedwait({signal.SIGTERM}, 0)  # consume it: unblocking must not deliver it again
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            self._blocked = False
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# -- the run ---------------------------------------------------------------------------------------------------
class Run:
    """One training run: built from a resolved config, driven by ``train``. Holds no task or averager logic."""

    def __init__(self, cfg: ResolvedConfig) -> None:
        from accelerate import Accelerator

        self.cfg, run = cfg, cfg.run
        if run.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
        # Launched as several processes (torchrun, accelerate launch) on a machine without a GPU: accelerate
        # joins them over gloo only when told to use the CPU; otherwise each would train alone into one folder.
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        on_cpu = world > 1 and not torch.cuda.is_available() and not has_xpu
        self.accelerator = Accelerator(mixed_precision=run.mixed_precision, log_with=run.trackers or None,
                                       project_dir=run.out, cpu=on_cpu)
        if self.accelerator.num_processes != world:
            raise ConfigError(f"launched as {world} processes (WORLD_SIZE), but accelerate joined "
                              f"{self.accelerator.num_processes}; check the launcher and its backend")
        self.is_main = self.accelerator.is_main_process
        # Every process checks the folder before the main one writes to it (else the others would find its
        # fresh config.yaml and refuse to overwrite "an earlier run").
        self.out = prepare_run_dir(cfg, is_main=False)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            prepare_run_dir(cfg, is_main=True)
        self.accelerator.wait_for_everyone()
        self.ckpt_dir = self.out / "checkpoints"
        if self.is_main:
            ckpt.clean_leftovers(self.ckpt_dir)

        self.task: Task = registry.tasks.get(run.task)(cfg.task, run)
        self.task.setup()
        seed_everything(run.seed)
        model = self.task.build_model()
        unique = parameter_count(model)
        tied = sum(p.numel() for p in model.parameters()) - unique
        self.log(self.task.summary(model) + (f" ({unique:,} unique: {tied:,} tied)" if tied else ""))
        optimizer = self.task.build_optimizer(model, run.lr)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped: nn.Module = self.accelerator.unwrap_model(self.model)
        seed_everything(run.seed + self.accelerator.process_index)  # per-process dropout streams
        self.stream = self.task.train_stream(run.micro_batch, self.accelerator.process_index,
                                             self.accelerator.num_processes)
        self.averagers: dict[str, Averager] = {
            name: registry.averagers.create(name, **dataclasses.asdict(c)) for name, c in cfg.averagers.items()}
        for avg in self.averagers.values():
            avg.start_run(run.steps)
            avg.check_finite = False  # the loop checks the weights once per step for all of them (feed_averagers)
        self.state = TrainState()
        self.scorer = Scorer(self.task, self.accelerator, self.unwrapped, self.task.eval_batches(),
                             self.task.calibration_batches(run.eval.bn_batches) if has_batchnorm(model) else [])
        self.stop = StopFlag()

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    # -- checkpoints --
    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "train": dataclasses.asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "averagers": {name: avg.state_dict() for name, avg in self.averagers.items()},
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def save_checkpoint(self) -> None:
        step = self.state.step
        weights = self.unwrapped.state_dict()
        if not all_finite([t for t in weights.values() if t.is_floating_point()]):
            raise NonFiniteTraining(f"the raw weights at step {step} hold NaN or Inf; no checkpoint was written")
        rngs = self.rng_states_of_all_processes()
        if self.is_main:
            state = self.checkpoint_state()
            if rngs is not None:
                state["rng_ranks"] = rngs
            poisoned = nonfinite_parts(state)
            if poisoned:  # a checkpoint that would poison every resumed run is never committed
                raise NonFiniteTraining(f"the training state at step {step} holds NaN or Inf in "
                                        f"{', '.join(poisoned)}; no checkpoint was written")
            files = {"model.safetensors": ckpt.tensor_writer(weights, {"step": str(step)}),
                     **ckpt.state_writers("state", state)}
            info = {"averagers": sorted(self.averagers), "task": self.cfg.run.task}
            ckpt.commit_checkpoint(self.ckpt_dir, step, files, info)
            ckpt.apply_retention(self.ckpt_dir, self.cfg.run.checkpoint.keep, warn=self.log)
        self.accelerator.wait_for_everyone()

    def resume(self) -> None:
        run = self.cfg.run
        if run.resume == "auto":
            found = ckpt.latest_valid(self.ckpt_dir, warn=self.log)
            if found is None:
                self.log(f"resume=auto: no valid checkpoint in {self.ckpt_dir}; starting from step 0")
                if self.is_main:
                    truncate_metrics(self.out / "metrics.jsonl", 0)
                return
            path = found.path
        else:
            path = Path(run.resume)
            problems = ckpt.verify(path)
            if problems:
                raise ckpt.CheckpointError(f"resume: {problems[0]}")
        self.load_checkpoint(path)
        self.log(f"resumed from {path} at step {self.state.step}")

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = ckpt.read_state(path, "state")
        self.unwrapped.load_state_dict(load_file(str(path / "model.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        self.state = TrainState(**state["train"])
        missing = sorted(set(self.averagers) - set(state["averagers"]))
        if missing and not self.cfg.run.reset_averagers:
            raise ckpt.CheckpointError(f"resume: {path} holds no state for averager(s) {', '.join(missing)}; "
                                       f"pass reset_averagers=true to start them afresh at step {self.state.step}")
        for name, avg in self.averagers.items():
            if name not in state["averagers"]:
                self.log(f"resume: averager {name} starts afresh at step {self.state.step} (reset_averagers=true)")
                continue
            try:
                avg.load_state_dict(state["averagers"][name])
            except ValueError as exc:  # saved with other settings
                if not self.cfg.run.reset_averagers:
                    raise ckpt.CheckpointError(f"resume: {exc}") from None
                self.log(f"resume: averager {name} starts afresh at step {self.state.step} (its settings changed)")
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.accelerator.num_processes:
            set_rng_state(ranks[self.accelerator.process_index])
        else:
            set_rng_state(state["rng"])
            if self.accelerator.num_processes > 1:
                self.log(f"resume: {path} was saved by {max(len(ranks), 1)} process(es), not "
                         f"{self.accelerator.num_processes}: every process continues rank 0's random streams")
        if self.is_main:
            truncate_metrics(self.out / "metrics.jsonl", self.state.step)

    # -- several processes --
    def rng_states_of_all_processes(self) -> list[dict[str, Any]] | None:
        """Each process's RNG state (its own dropout stream), gathered for the checkpoint; None for one process."""
        if self.accelerator.num_processes == 1:
            return None
        from accelerate.utils import gather_object
        return gather_object([rng_state()])

    def stop_requested(self) -> bool:
        """Whether any process got SIGTERM: all decide together, or one would save while the others step on."""
        local = self.stop.poll()
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([float(local)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def sync_buffers(self) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics) after each step.

        DDP broadcasts them from rank 0 at the start of every forward pass anyway, so training does not change;
        without this, each process's averagers (and its share of the evaluation) would see its own buffers.
        """
        if self.accelerator.num_processes == 1 or not getattr(self.model, "broadcast_buffers", False):
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
    def feed_averagers(self, step: int) -> None:
        """Give the weights after ``step`` to every averager that wants them, after one shared NaN/Inf check (not
        one per averager: on a memory-bound update that check costs as much as the average itself)."""
        wanting = [avg for avg in self.averagers.values() if avg.wants(step)]
        if not wanting:
            return
        if not all_finite([t for t in self.unwrapped.state_dict().values() if t.is_floating_point()]):
            self.log(f"warning: the weights after step {step} hold NaN or Inf; no averager sees them")
            for avg in wanting:
                avg.refused += 1
            return
        for avg in wanting:
            avg.observe(step, self.unwrapped)

    def optimizer_step(self) -> float | None:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss, or None if skipped."""
        run = self.cfg.run
        factor = lr_factor(self.state.step, run)
        for group in self.optimizer.param_groups:
            group["lr"] = run.lr * factor
        # summed on the device: one host sync per step (below), not one per micro-batch
        total = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        for micro in range(run.grad_accum):
            batch = self.stream.next_batch()
            sync = micro == run.grad_accum - 1
            with (nullcontext() if sync else self.accelerator.no_sync(self.model)), self.accelerator.autocast():
                loss = self.task.loss(self.model, batch, self.state.step)
                self.accelerator.backward(loss / run.grad_accum)
            total += loss.detach().double()
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), run.grad_clip or float("inf"))
        norm_tensor = torch.as_tensor(grad_norm, dtype=torch.float64, device=total.device)
        loss_sum, norm = torch.stack([total, norm_tensor]).tolist()
        mean_loss = loss_sum / run.grad_accum
        if not (math.isfinite(mean_loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def evaluate(self, metrics: MetricsLog) -> dict[str, dict[str, float]]:
        scores = self.scorer.score_all(self.averagers, self.state.step)
        for weights, values in scores.items():
            metrics.write({"step": self.state.step, "weights": weights, "split": "val", **values})
        if self.cfg.run.trackers:
            self.accelerator.log({f"val/{w}/{k}": v for w, vals in scores.items() for k, v in vals.items()},
                                 step=self.state.step)
        return scores

    def save_trajectory(self) -> None:
        if self.is_main:
            path = self.out / "trajectory" / f"step-{self.state.step:08d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            ckpt.save_tensors_atomic(path, self.unwrapped.state_dict(),
                                     {"step": str(self.state.step), "format": "lawa-suite-trajectory/1"})


def _progress(run: Run) -> Any:
    from tqdm.auto import tqdm
    cfg = run.cfg.run
    return tqdm(total=cfg.steps, initial=run.state.step, disable=not (run.is_main and cfg.progress),
                dynamic_ncols=True, desc=f"{cfg.task}", unit="step")


def train(cfg: ResolvedConfig) -> RunResult:
    """Run (or resume) training as configured; returns where the run lives and how far it got."""
    run = Run(cfg)
    rc = cfg.run
    if rc.resume:
        run.resume()
    if rc.trackers:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dotted(cfg.as_dict()).items()}
        run.accelerator.init_trackers(Path(rc.out).name, config=hparams)
    metrics = MetricsLog(run.out / "metrics.jsonl", run.is_main)
    bar = _progress(run)
    run.stop.install()
    try:
        while run.state.step < rc.steps:
            loss = run.optimizer_step()
            if loss is None:
                run.state.skipped += 1
                run.state.bad_in_a_row += 1
                metrics.write({"step": run.state.step, "weights": "raw", "split": "train", "skipped": True,
                               "skipped_total": run.state.skipped})
                if run.state.bad_in_a_row >= rc.max_bad_steps:
                    raise NonFiniteTraining(f"{run.state.bad_in_a_row} steps in a row had a non-finite loss or "
                                            f"gradient (after step {run.state.step}); stopping (max_bad_steps="
                                            f"{rc.max_bad_steps})")
                continue
            run.state.bad_in_a_row = 0
            run.state.step += 1
            run.sync_buffers()
            step = run.state.step
            run.feed_averagers(step)
            lr = rc.lr * lr_factor(step - 1, rc)
            if step % rc.log_every == 0 or step == 1:
                metrics.write({"step": step, "weights": "raw", "split": "train", "loss": loss, "lr": lr})
                if rc.trackers:
                    run.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if rc.trajectory.every and step % rc.trajectory.every == 0:
                run.save_trajectory()
            if step % rc.eval.every == 0 or step == rc.steps:
                scores = run.evaluate(metrics)
                if run.is_main and rc.progress:
                    bar.write(_score_line(step, scores))
            if (rc.checkpoint.every and step % rc.checkpoint.every == 0) or step == rc.steps:
                run.save_checkpoint()
            if run.stop_requested():
                run.save_checkpoint()
                raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint saved in {run.ckpt_dir} "
                                f"(continue with resume=auto)")
    finally:
        run.stop.uninstall()
        bar.close()
        metrics.close()
        if rc.trackers:
            run.accelerator.end_training()
    if run.is_main:
        from lawa_suite.report import write_report
        write_report(run.out)
    return RunResult(run.out, run.state.step, run.state.skipped)


def _score_line(step: int, scores: dict[str, dict[str, float]]) -> str:
    parts = [f"{w}: " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()) for w, vals in scores.items()]
    return f"step {step} | " + " | ".join(parts)
