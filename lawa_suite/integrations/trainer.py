"""``AveragingCallback``: the suite's averagers inside a Hugging Face ``transformers.Trainer`` run.

::

    averaging = AveragingCallback({"ema": {"decay": 0.999}, "lawa": {"k": 5, "nu": 100}})
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[averaging])
    averaging.attach(trainer)
    trainer.train()        # log_history gains eval_ema_loss, eval_lawa_loss, ... next to eval_loss

After every optimizer step (``on_step_end``; ``state.global_step`` counts optimizer steps, so gradient accumulation
is handled by the Trainer) every averager that wants the step observes the model's weights, after one shared
NaN/Inf check, as in the suite's own loop. Averagers are passive: training is the same with or without them.

At every evaluation (``on_evaluate``, after the Trainer has scored the raw weights) each ready averager's weights
go into the model (``averaged_weights``: bit-exact swap back), the Trainer's own ``evaluation_loop`` runs on the
same eval dataloader (same batches, same loss, same ``compute_metrics``), and the metrics are logged with the
averager's name after the prefix (``eval_ema_loss``; ``eval_<set>_ema_loss`` for a dict of eval sets) through
``trainer.log`` (so ``state.log_history`` and every ``report_to`` tracker get them) and added to the metrics that
``trainer.evaluate()`` returns. ``evaluation_loop``, unlike ``evaluate``, fires no ``on_evaluate``, so scoring
never recurses (a guard makes sure) and other callbacks (early stopping, best-model tracking) see raw weights only.

Why ``attach``: a callback is handed the model and dataloaders, never the Trainer, and the Trainer's evaluation loop
is what makes the averages' scores comparable to ``eval_loss``. ``attach(trainer)`` gives it the Trainer (and adds
the callback if it was not passed in ``callbacks=``); training refuses to start without it.

Checkpoints: at every Trainer save (``on_save``) every averager's state goes into the checkpoint folder the Trainer
just wrote, as ``averagers.safetensors`` + ``averagers.json`` (the format of the suite's own checkpoints). A run
resumed with ``resume_from_checkpoint`` reads it back from ``<output_dir>/checkpoint-<step>/`` (or
``args.resume_from_checkpoint`` when that names a folder) and continues each average as if never interrupted; where
there is none (a checkpoint written without the callback) averaging starts again at the resumed step, and a warning
says so.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.averagers.base import Averager, NonFiniteWarning, all_finite
from lawa_suite.config import averager_bases, build_section
from lawa_suite.errors import ConfigError
from lawa_suite.integrations.loops import averaged_weights
from lawa_suite.training.scoring import forked_rng
from lawa_suite.tasks.base import has_batchnorm

__all__ = ["AveragingCallback", "build_averagers", "AVERAGER_STATE"]

AVERAGER_STATE = "averagers"  # averagers.safetensors + averagers.json in each Trainer checkpoint folder

AveragerSpec = Mapping[str, Mapping[str, Any] | Averager | None] | Sequence[str]


def build_averagers(spec: AveragerSpec, where: str = "AveragingCallback") -> dict[str, Averager]:
    """Averagers by name from ``{"ema": {"decay": 0.999}, "swa_late": {"of": "swa", "start": 0.75}}`` (a named
    instance runs the registered averager its ``of`` gives), from a list of names (defaults), or from ready
    averager instances (``{"ema": my_ema}``, renamed to the key). Settings are checked as ``suite run`` checks
    ``ema.decay=...``: one line naming the key and what is allowed."""
    if isinstance(spec, str) or not isinstance(spec, (Mapping, Sequence)):
        raise ConfigError(f"{where}: averagers must be a dict of name -> settings or a list of names, "
                          f"got {spec!r}")
    items = dict(spec) if isinstance(spec, Mapping) else {name: None for name in spec}
    if not items:
        raise ConfigError(f"{where}: no averagers given; known: {', '.join(registry.averagers.names())}")
    bad = [name for name in items if not isinstance(name, str) or not name]
    if bad or (not isinstance(spec, Mapping) and len(items) != len(spec)):
        raise ConfigError(f"{where}: averager names must be distinct non-empty strings, got {list(spec)!r}")
    settings: dict[str, dict[str, Any]] = {}
    for name, value in items.items():
        if value is None or isinstance(value, Averager):
            settings[name] = {}
        elif isinstance(value, Mapping):
            settings[name] = dict(value)
        else:
            raise ConfigError(f"{where}: averager '{name}': expected a dict of settings or an averager instance, "
                              f"got {type(value).__name__}")
    built: dict[str, Averager] = {name: value for name, value in items.items() if isinstance(value, Averager)}
    others = [name for name in items if name not in built]
    bases = averager_bases(others, {f"{name}.of": settings[name].get("of") for name in others})
    for name in others:
        cls = registry.averagers.get(bases[name])
        config = build_section(name, cls.Config, {k: v for k, v in settings[name].items() if k != "of"})
        built[name] = cls(**dataclasses.asdict(config))
    for name, averager in built.items():
        averager.name = name  # metrics, warnings and errors use the name it runs under
    return {name: built[name] for name in items}


class AveragingCallback(TrainerCallback):
    """Feeds averagers after every optimizer step and scores them at every evaluation, next to the raw weights.

    Args:
        averagers: ``{"name": {settings}}`` (named instances with ``"of"``), a list of names, or
            ``{"name": averager}`` instances; see ``build_averagers``.
        calibration: for a model with BatchNorm, batches as the Trainer's data collator makes them, to recompute
            the running statistics of each average before it is scored. Without them, the averaged running
            statistics are used (a warning says so once).

    ``averagers`` (a dict) holds the live averagers: ``averaged_weights(trainer.model, callback.averagers["ema"])``
    puts one into the model, e.g. to ``trainer.save_model`` it.
    """

    def __init__(self, averagers: AveragerSpec, calibration: Iterable[Any] | None = None) -> None:
        self.averagers = build_averagers(averagers)
        self.calibration = None if calibration is None else list(calibration)
        self.trainer: Trainer | None = None
        self._started = False
        self._scoring = False
        self._warned_bn = False

    def attach(self, trainer: Trainer) -> "AveragingCallback":
        """Give the callback its Trainer (whose evaluation loop scores the averages); adds it if not yet added."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"AveragingCallback.attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    # -- training: observe every optimizer step -----------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None or self not in self.trainer.callback_handler.callbacks:
            raise ConfigError("AveragingCallback is not attached to the Trainer running it: call "
                              "callback.attach(trainer) after building the Trainer")
        if self._started:
            return
        self._started = True
        for averager in self.averagers.values():
            averager.start_run(state.max_steps)  # fractions (swa start=0.75) are of the run's optimizer steps
        if state.global_step > 0:
            self._resume(args, state.global_step)

    def _resume(self, args: Any, step: int) -> None:
        """Read every averager's state back from the checkpoint of ``step``; warn for those it does not hold."""
        places = [Path(args.output_dir) / f"checkpoint-{step}"]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            places.insert(0, Path(args.resume_from_checkpoint))
        folder = next((p for p in places if (p / f"{AVERAGER_STATE}.json").is_file()), None)
        saved = ckpt.read_state(folder, AVERAGER_STATE) if folder is not None else {}
        for name, averager in self.averagers.items():
            if name in saved:
                averager.load_state_dict(saved[name])
        fresh = [name for name in self.averagers if name not in saved]
        if fresh:
            where = folder if folder is not None else " or ".join(str(p) for p in places)
            warnings.warn(f"AveragingCallback: training resumes at step {step}; {where} holds no state for "
                          f"{', '.join(fresh)}, so those averages start from this step", stacklevel=3)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every averager's state into the checkpoint folder the Trainer has just written (rank 0 only: in DDP every
        process holds the same averages)."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        writers = ckpt.state_writers(AVERAGER_STATE, {name: avg.state_dict() for name, avg in self.averagers.items()})
        for file_name, write in writers.items():  # each file whole or not at all
            partial = folder / f".{file_name}.partial"
            write(partial)
            os.replace(partial, folder / file_name)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step
        wanting = [avg for avg in self.averagers.values() if avg.wants(step)]
        if not wanting:
            return
        # One NaN/Inf check for all averagers, as the suite's loop does: on a memory-bound update it costs as much
        # as the update itself.
        if not all_finite([t for t in model.state_dict().values() if t.is_floating_point()]):
            warnings.warn(f"AveragingCallback: the weights after step {step} hold NaN or Inf; no averager sees them",
                          NonFiniteWarning, stacklevel=2)
            for avg in wanting:
                avg.refuse(step)
            return
        for avg in wanting:
            avg.observe(step, model, checked=True)

    # -- evaluation: score every ready average on the raw weights' batches ---------------------------------------
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: nn.Module | None = None, eval_dataloader: Any = None, **kwargs: Any) -> None:
        if self._scoring:  # an evaluation started from inside the scoring below: it scores raw weights only
            return
        trainer = self.trainer
        if trainer is None:
            raise ConfigError("AveragingCallback is not attached to the Trainer running it: call "
                              "callback.attach(trainer) after building the Trainer")
        ready = {name: avg for name, avg in self.averagers.items() if avg.ready}
        if not ready:
            return
        model = model if model is not None else trainer.model
        prefix = _metric_prefix(metrics or {})
        dataloader = eval_dataloader if eval_dataloader is not None else trainer.get_eval_dataloader()
        self._warn_uncalibrated(model)
        scores: dict[str, float] = {}
        self._scoring = True
        try:
            with forked_rng():
                for name, avg in ready.items():
                    with averaged_weights(model, avg, self.calibration, forward=self._forward):
                        output = trainer.evaluation_loop(
                            dataloader, description=f"Evaluation ({name})",
                            prediction_loss_only=True if trainer.compute_metrics is None else None,
                            metric_key_prefix=f"{prefix}_{name}")
                    output.metrics.pop(f"{prefix}_{name}_model_preparation_time", None)
                    scores.update(output.metrics)
        finally:
            self._scoring = False
            self._close_progress_bars(args, state, control)
        if metrics is not None:
            metrics.update(scores)  # what trainer.evaluate() returns
        if scores:
            trainer.log(dict(scores))

    def _forward(self, model: nn.Module, batch: Any) -> Any:
        """A calibration forward pass as the Trainer makes one (its input preparation, its autocast)."""
        assert self.trainer is not None
        with self.trainer.compute_loss_context_manager():
            return model(**self.trainer._prepare_inputs(batch))

    def _warn_uncalibrated(self, model: nn.Module) -> None:
        if self.calibration is None and not self._warned_bn and has_batchnorm(model):
            self._warned_bn = True
            warnings.warn("AveragingCallback: the model has BatchNorm and no calibration batches were given; averages "
                          "are scored with averaged running statistics (pass calibration=[batches] to recompute them)",
                          stacklevel=3)

    def _close_progress_bars(self, args: Any, state: Any, control: Any) -> None:
        """The scoring loops open a progress bar that the Trainer closes at the end of an evaluation: close it."""
        for callback in self.trainer.callback_handler.callbacks if self.trainer else []:
            if isinstance(callback, ProgressCallback):
                callback.on_evaluate(args, state, control)


def _metric_prefix(metrics: Mapping[str, float]) -> str:
    """The prefix the Trainer gave this evaluation's metrics (``eval``, ``eval_<set>``): every evaluation reports
    ``<prefix>_runtime`` and ``<prefix>_samples_per_second``."""
    prefixes = [key.removesuffix("_runtime") for key in metrics if key.endswith("_runtime")]
    prefixes = [p for p in prefixes if f"{p}_samples_per_second" in metrics]
    return prefixes[0] if len(prefixes) == 1 else "eval"
