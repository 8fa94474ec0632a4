"""Scoring saved weights outside a training run, exactly as a run scores them.

- ``evaluate_posthoc``: every derived checkpoint of a ``suite average`` output and the raw checkpoint of the
  same step, on the same held-out batches, written as ``metrics.jsonl``, ``report.md`` (a summary and a row per
  step and weights) and ``curves.png`` (raw versus averaged against the step, like the LAWA paper's Figures 4-8);
  ``evaluate_checkpoints``: every checkpoint of a folder, the same way, without averages;
- ``lmc``: the linear path ``alpha * A + (1 - alpha) * B`` between two checkpoints (the paper's Figure 13:
  is there a barrier?), and ``disagreement``: how often A and B predict differently on held-out data (the
  paper's diversity measure).

The task and its settings come from the ``config.yaml`` of the run the inputs lie in, or from ``task=`` and
overrides; checkpoints that are Hugging Face causal-LM folders outside any run are scored by perplexity on a text,
by the ``hf-causal-lm`` task (``tasks/causal_lm.py``; ``causal_lm.py`` finds the folders and its settings): every
task is scored the same way, through its ``fit_weights`` and ``describe_scoring``. Scoring follows the training
loop: the model in eval mode under the run's autocast, the task's evaluator on the task's fixed held-out batches,
and, for averaged (and interpolated) weights of a model with BatchNorm, running statistics recomputed on
``eval.bn_batches`` training batches first; raw checkpoints keep the statistics they were saved with.

Raw weights of a schedule-free run (``tasks/schedule_free.py``) are what its own raw evaluation scored: a checkpoint's
eval sequence ``x``, computed from its ``y`` and optimizer state (``export.EvalWeights``), BatchNorm statistics
recomputed for it as the run did. A ``trajectory/`` file holds only ``y`` (no optimizer state): it is scored as ``y``,
the iterate the averagers observed and ``suite average`` averages, so a post-hoc average of a trajectory is compared
with what it averaged, rather than refused. Which sequence was scored is logged and written in the report.

Predictions for the disagreement rate come from the task: ``predictions(model, batch)`` if it defines one,
else the arg-max of ``logits_and_targets(model, batch)``'s logits (classes for images, next tokens for text).
A task with neither (a diffusion model) gets the curve but no disagreement rate, and is told why.

Folders these commands write (``suite eval out=``, ``suite analyze lmc out=``) follow ``rundir.claim_out``: never
an input or a folder holding one; ``--force`` replaces only a folder the same command made, known by the
``suite-output.json`` it wrote there (``files.mark_output``), and never one holding a run. A scored folder of
checkpoints holds ``config.yaml`` and ``metrics.jsonl`` like a run; its mark is what tells the two apart.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite import posthoc, registry
from lawa_suite.averagers.base import accumulation_dtype
from lawa_suite.causal_lm import causal_lm_config, causal_lm_folder
from lawa_suite.config import ResolvedConfig, dotted, parse_overrides, resolve
from lawa_suite.errors import AnalysisError, ConfigError
from lawa_suite.export import (EVAL_SEQUENCE, TRAIN_SEQUENCE, EvalWeights, holds_schedule_free_state,
                               trains_schedule_free)
from lawa_suite.files import commit_folder, mark_output, staged_folder, write_text_atomic
from lawa_suite.report import comparison_table, load_metrics, plot_curves, summarise
from lawa_suite.report.curves import fmt
from lawa_suite.plotting import figure, save
from lawa_suite.rundir import claim_out, find_run_config, read_saved, write_metrics_meta
from lawa_suite.training.scoring import Scorer, forked_rng, score_line, seed_everything
from lawa_suite.tasks.base import has_batchnorm

__all__ = ["AnalysisError", "Evaluation", "eval_config", "evaluate", "evaluate_posthoc", "evaluate_checkpoints",
           "step_table", "interpolate", "lmc", "disagreement",
           "lmc_lines", "write_lmc", "check_out", "default_out"]


# -- configuration ---------------------------------------------------------------------------------------
def eval_config(near: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ResolvedConfig:
    """The config to score weights lying at ``near``: its run's ``config.yaml`` (the nearest one above it) plus
    ``overrides``; with ``task=<another task>``, the overrides alone; where no run config exists and the
    checkpoints are Hugging Face causal-LM folders, the ``hf-causal-lm`` task's (``causal_lm.py``)."""
    if not Path(near).exists():  # as every command says it (exit 2), not as a path without a run config
        raise ConfigError(f"{near}: does not exist (expected checkpoints: a run's, a folder of them, or Hugging Face "
                          f"causal-LM folders)")
    pairs = parse_overrides(list(overrides))
    try:
        config_file: Path | None = find_run_config(Path(near))
    except ConfigError:  # no run config.yaml at or above near
        config_file = None
    saved: dict[str, Any] | None = None
    unreadable: ConfigError | None = None
    if config_file is not None:
        try:
            saved = read_saved(config_file)
        except ConfigError as exc:  # a damaged, foreign or hostile config.yaml: its own line, unless not needed
            unreadable = exc
    if saved is not None and pairs.get("task", saved["task"]) == saved["task"]:
        base, values = dotted(saved), {**pairs, "progress": "false"}
    elif "task" in pairs:
        base, values = {}, {**pairs, "progress": "false"}
    elif (folder := causal_lm_folder(near)) is not None:
        return causal_lm_config(folder, pairs)
    elif unreadable is not None:
        raise unreadable
    else:
        raise ConfigError(f"task: no run config.yaml at {near} or above it, nor Hugging Face causal-LM folders; pass "
                          f"task=<name> (and its keys, e.g. preset=, data.path=)")
    return resolve(values, base=base)


# -- scoring ---------------------------------------------------------------------------------------------
def _short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Evaluation:
    """A task's model, fixed held-out batches, calibration batches and evaluator, built once from a config;
    ``score`` then rates any state_dict of that model as the training loop would (``scoring.Scorer``)."""

    def __init__(self, cfg: ResolvedConfig) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
        self.name, self.bn_batches = f"task '{cfg.run.task}'", cfg.run.eval.bn_batches
        self.task.setup()
        seed_everything(cfg.run.seed)
        self.accelerator = Accelerator(mixed_precision=cfg.run.mixed_precision)
        self.model = self.task.build_model().to(self.accelerator.device)
        calibration = self.task.calibration_batches(self.bn_batches) if has_batchnorm(self.model) else []
        self.scorer = Scorer(self.task, self.accelerator, self.model, self.task.eval_batches(), calibration)
        self._expected = {n: (tuple(t.shape), t.dtype.is_floating_point) for n, t in self.model.state_dict().items()}

    @property
    def metrics(self) -> dict[str, str]:
        """Metric -> "max"|"min" (the first is the headline)."""
        return self.scorer.metrics

    @property
    def batches(self) -> list[Any]:
        """The fixed held-out batches every weights are scored on."""
        return self.scorer.batches

    @property
    def recalibrates(self) -> bool:
        """Whether averaged weights get fresh BatchNorm statistics before they are scored."""
        return bool(self.scorer.calibration)

    @property
    def description(self) -> str:
        """What scores the weights, for reports: the task and preset, or the causal LM, tokenizer and text."""
        return self.task.describe_scoring()

    def load(self, weights: Mapping[str, Tensor]) -> None:
        """Copy ``weights`` into the model; a key or shape the model does not have is a one-line error."""
        weights = self.task.fit_weights(self.model, weights)  # a Hugging Face model reads checkpoints its own way
        missing = sorted(set(self._expected) - set(weights))
        extra = sorted(set(weights) - set(self._expected))
        shapes = sorted(n for n in set(weights) & set(self._expected)
                        if tuple(weights[n].shape) != self._expected[n][0])
        if missing or extra or shapes:
            parts = [f"{what} {_short(names)}" for what, names in
                     (("missing", missing), ("unexpected", extra), ("other shapes for", shapes)) if names]
            raise AnalysisError(f"the weights do not fit {self.name}'s model ({'; '.join(parts)}); "
                                f"{self.task.weights_hint}")
        self.model.load_state_dict(dict(weights))

    @torch.no_grad()
    def score(self, weights: Mapping[str, Tensor], recalibrate: bool) -> dict[str, float]:
        """The evaluator's metrics for ``weights``; ``recalibrate`` recomputes BatchNorm statistics first (as the
        loop does for averaged weights)."""
        with forked_rng():
            self.load(weights)
            if recalibrate:
                self.scorer.recalibrate()
            return self.scorer.score()

    def predictor(self) -> Any:
        """``(model, batch) -> discrete predictions``, from the task; an AnalysisError says what is missing."""
        if callable(getattr(self.task, "predictions", None)):
            return self.task.predictions
        if callable(getattr(self.task, "logits_and_targets", None)):
            return lambda model, batch: self.task.logits_and_targets(model, batch)[0].argmax(dim=-1)
        raise AnalysisError(f"{self.name} defines neither predictions(model, batch) nor "
                            f"logits_and_targets(model, batch), so its predictions cannot be compared")

    @torch.no_grad()
    def predictions(self, weights: Mapping[str, Tensor]) -> Tensor:
        """Every held-out prediction of ``weights`` (as saved: no recalibration), flattened, on the CPU."""
        predict = self.predictor()
        with forked_rng():
            self.load(weights)
            self.model.eval()
            with self.accelerator.autocast():
                return torch.cat([predict(self.model, batch).reshape(-1).cpu() for batch in self.batches])


# -- post-hoc outputs: raw versus averaged ----------------------------------------------------------------
def evaluate(path: str | os.PathLike[str], overrides: Sequence[str] = (), allow_torch_load: bool = False,
             log: Callable[[str], None] = lambda message: None, at: posthoc.WeightsAt | None = None,
             out: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """``suite eval``: a ``suite average`` output is scored against its raw checkpoints, in place
    (``evaluate_posthoc``); any other folder of checkpoints (a run's trajectory, Hugging Face ``checkpoint-N/``
    folders) has each checkpoint scored, into ``out`` (``evaluate_checkpoints``). Returns the report."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"path: {path} does not exist")
    if posthoc.is_average_output(path):  # by what suite average writes: its mark, or its manifest's format
        if out is not None:
            raise ConfigError(f"out: {path} is a suite average output, scored in place (its report.md and "
                              f"metrics.jsonl); out= is for a folder of checkpoints")
        return evaluate_posthoc(path, overrides, allow_torch_load, log, at)
    if posthoc.discover(path, allow_torch_load=True).snapshots:
        return evaluate_checkpoints(path, out or default_out("eval"), overrides, allow_torch_load, log, at, force)
    if _is_checkpoint(path):
        raise AnalysisError(f"{path}: one checkpoint of a run (its manifest.json is a checkpoint's), not a suite "
                            f"average output nor a folder of checkpoints; suite eval scores every checkpoint of a "
                            f"folder: pass {path.parent} (and out=DIR for its scores)")
    return evaluate_posthoc(path, overrides, allow_torch_load, log, at)  # says what the folder is not


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder a run wrote: its ``manifest.json`` is ``checkpoints.commit_checkpoint``'s
    (a step and the files it lists), not an average output's."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and "step" in manifest


def evaluate_posthoc(out: str | os.PathLike[str], overrides: Sequence[str] = (), allow_torch_load: bool = False,
                     log: Callable[[str], None] = lambda message: None, at: posthoc.WeightsAt | None = None) -> Path:
    """Score every derived checkpoint in a ``suite average`` output and the raw checkpoint of its step; write
    ``metrics.jsonl``, ``config.yaml``, ``report.md`` and ``curves.png`` into ``out``. Returns the report. The raw
    checkpoints are read as the averaging read them (its manifest's ``key``/``prefix``) unless ``at`` says else."""
    out = Path(out)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        # the run, when the outputs were reconstructed from the averages it stored: its raw weights are compared
        source, folders = Path(manifest.get("run") or manifest["source"]), [a["folder"] for a in manifest["averagers"]]
        assert manifest["format"] == posthoc.FORMAT
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise AnalysisError(f"{out}: not a suite average output (no readable manifest.json of format "
                            f"{posthoc.FORMAT}), nor a folder of checkpoints named by step") from None
    evaluation = Evaluation(eval_config(source, overrides))
    read = RawReader(evaluation, at or posthoc.WeightsAt(manifest.get("key"), manifest.get("prefix")), log)
    derived: dict[int, dict[str, Path]] = {}
    for folder in folders:
        entries = json.loads((out / folder / "manifest.json").read_text())["outputs"]
        for entry in entries:
            derived.setdefault(int(entry["step"]), {})[folder] = out / folder / entry["file"]
    _, snapshots, problems, _ = posthoc.discover(source, allow_torch_load)
    by_step = {s.step: s for s in snapshots}
    lost = sorted(set(derived) - set(by_step))
    if problems or lost:
        raise AnalysisError(f"{source}: the raw checkpoints are needed for comparison: "
                            + "; ".join(problems + ([f"steps {', '.join(map(str, lost))} are gone"] if lost else [])))
    records = []
    for step in sorted(derived):
        scores = {"raw": evaluation.score(*read(by_step[step]))}
        for folder, path in sorted(derived[step].items()):
            scores[folder] = evaluation.score(posthoc.read_checkpoint(path), recalibrate=True)
        records += [{"step": step, "weights": name, "split": "val", **values} for name, values in scores.items()]
        log(score_line(step, scores, evaluation.metrics))
    return _write_scores(out, records, evaluation, source, sorted(by_step), folders, notes=read.notes)


def evaluate_checkpoints(source: str | os.PathLike[str], out: str | os.PathLike[str], overrides: Sequence[str] = (),
                         allow_torch_load: bool = False, log: Callable[[str], None] = lambda message: None,
                         at: posthoc.WeightsAt | None = None, force: bool = False) -> Path:
    """Score every checkpoint in ``source`` as saved, each on the same held-out batches; write ``metrics.jsonl``,
    ``config.yaml``, ``report.md`` and ``curves.png`` into ``out`` (new or empty unless ``force``). Returns the
    report."""
    source, out = Path(source), Path(out)
    evaluation_config = eval_config(source, overrides)
    try:
        inputs = [source, find_run_config(source)]
    except ConfigError:  # scored by task= or as Hugging Face folders: the checkpoints are the only input
        inputs = [source]
    check_out(out, force, "suite eval", inputs)  # before the work, which may take long
    _, snapshots, problems, _ = posthoc.discover(source, allow_torch_load)
    if problems:
        raise AnalysisError(f"{source}: " + "; ".join(problems))
    evaluation = Evaluation(evaluation_config)
    read = RawReader(evaluation, at or posthoc.WeightsAt(), log)
    records = []
    for snapshot in snapshots:
        scores = {"raw": evaluation.score(*read(snapshot))}
        records.append({"step": snapshot.step, "weights": "raw", "split": "val", **scores["raw"]})
        log(score_line(snapshot.step, scores, evaluation.metrics))
    # Written beside out and renamed into place (replacing, with --force, the earlier scores claim_out allowed)
    staging = staged_folder(out, log=log)  # (what killed evals left beside it goes first)
    try:
        _write_scores(staging, records, evaluation, source, [s.step for s in snapshots], [], name=out.name,
                      notes=read.notes)
        mark_output(staging, "suite eval", source=source)
        commit_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out / "report.md"


class RawReader:
    """Reads raw checkpoints as ``(weights, recalibrate)`` for ``Evaluation.score``: as saved, or, for a schedule-free
    run, the weights its raw evaluation scored (the module's docstring says which). What is the same for every
    checkpoint (where its weights were found, which sequence they are) is logged once and kept in ``notes`` for the
    report."""

    def __init__(self, evaluation: Evaluation, at: posthoc.WeightsAt, log: Callable[[str], None]) -> None:
        self.at, self.log = at, log
        self.notes: list[str] = []
        self.schedule_free = trains_schedule_free(evaluation.cfg)
        self.eval_weights = EvalWeights(evaluation.task, evaluation.cfg.run.lr)

    def once(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)
            self.log(line)

    def __call__(self, snapshot: posthoc.Snapshot) -> tuple[dict[str, Tensor], bool]:
        weights = posthoc.load_snapshot(snapshot, self.at, self.once)
        folder = snapshot.files[0].parent  # a suite checkpoint's folder, where its optimizer state lies
        if snapshot.dcp and self.schedule_free:
            raise AnalysisError(f"{snapshot.label}: a distributed=fsdp checkpoint of a schedule-free run; its raw "
                                f"weights (the eval sequence x) need the optimizer state, which it holds in shards, "
                                f"and reading those whole is not supported; score the run's trajectory/ (the "
                                f"training sequence y) instead")
        if not snapshot.dcp and holds_schedule_free_state(folder):
            self.once(f"raw: {EVAL_SEQUENCE}, computed from each checkpoint's weights and optimizer state, with "
                      f"BatchNorm statistics recomputed for it (as the run's raw evaluation)")
            return self.eval_weights(folder, weights), True
        if self.schedule_free:
            self.once(f"raw: {TRAIN_SEQUENCE}, as the files hold it ({snapshot.label}: no optimizer state beside it, "
                      f"so not the eval sequence x the run scored as raw; its checkpoints/ give x)")
        return weights, False


def _write_scores(out: Path, records: list[dict[str, Any]], evaluation: Evaluation, source: Path, steps: list[int],
                  folders: list[str], name: str | None = None, notes: Sequence[str] = ()) -> Path:
    """``metrics.jsonl``, ``config.yaml``, then ``report.md`` (and ``curves.png``) from them; ``name``: the
    folder's name in the report (``out`` may be a staging folder); ``notes``: how the raw checkpoints were read."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(out / "config.yaml", evaluation.cfg.to_yaml())
    # what the records' metrics mean, as a run records it: numbers beside them (FID's fid_samples) are no metric
    write_metrics_meta(out, evaluation.task.evaluator, evaluation.metrics,
                       getattr(evaluation.scorer.evaluator, "notes", None) or {})
    curves, _ = load_metrics(out / "metrics.jsonl")
    metrics, rows = summarise(curves, evaluation.metrics)
    headline = metrics[0] if metrics else None
    bn = (f" Averaged weights get BatchNorm statistics recomputed on {evaluation.bn_batches} training batches "
          f"first; raw checkpoints keep theirs." if evaluation.recalibrates and folders else "")
    compared = (f"averagers: {', '.join(folders)}. Each derived checkpoint and the raw checkpoint of its step are "
                f"scored on the same held-out batches.{bn} Config: `config.yaml`; inputs and hashes: `manifest.json`."
                if folders else "every checkpoint is scored as saved, on the same held-out batches. Config: "
                                "`config.yaml`.")
    kind = "Post-hoc averaging report" if folders else "Checkpoint scores"
    lines = [f"# {kind}: {name or out.name}", "",
             f"Source: `{source}` ({len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}); "
             f"{evaluation.description}, evaluator {evaluation.task.evaluator}; {compared}", "",
             *(f"- {note}" for note in notes), *([""] if notes else [])]
    if rows:
        lines += [comparison_table(metrics, rows, headline), "", "## Every scored step", "",
                  step_table(records, metrics), ""]
        plot_curves(curves, [], metrics, out / "curves.png", f"{kind.lower()}: {evaluation.name} from {source.name}")
        lines += ["![metrics vs step](curves.png)", ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report


def step_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """A Markdown row per step and weights (raw first): every metric and, for averaged weights, the headline
    metric's difference from the raw checkpoint of the same step (the LAWA paper's tables, step by step)."""
    headline = metrics[0]
    raw = {r["step"]: r for r in records if r["weights"] == "raw"}
    compare = any(r["weights"] != "raw" for r in records)
    header = ["step", "weights", *metrics] + ([f"{headline} - raw"] if compare else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["step"], r["weights"] != "raw", r["weights"])):
        cells = [str(r["step"]), r["weights"], *(fmt(r[m]) if isinstance(r.get(m), (int, float)) else "-"
                                                 for m in metrics)]
        if compare:
            base = raw.get(r["step"], {}).get(headline)
            value = r.get(headline)
            cells.append(f"{value - base:+.4f}" if r["weights"] != "raw" and isinstance(base, (int, float))
                         and isinstance(value, (int, float)) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- linear mode connectivity and disagreement --------------------------------------------------------------
def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``alpha * a + (1 - alpha) * b`` per float tensor, computed in float32 (float64 for float64) and cast
    back; exact at ``alpha`` 0 and 1. Integer tensors come from the nearer endpoint."""
    if a.keys() != b.keys():
        raise AnalysisError(f"the checkpoints hold different keys (only in A: {_short(sorted(set(a) - set(b)))}; "
                            f"only in B: {_short(sorted(set(b) - set(a)))})")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise AnalysisError(f"key {name}: A is {list(ta.shape)} {ta.dtype}, B is {list(tb.shape)} {tb.dtype}")
        if ta.is_floating_point():
            acc = accumulation_dtype(ta.dtype)
            out[name] = torch.lerp(tb.to(acc), ta.to(acc), alpha).to(ta.dtype)
        else:
            out[name] = (ta if alpha >= 0.5 else tb).clone()
    return out


def disagreement(evaluation: Evaluation, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, int]:
    """``(fraction of held-out predictions where A and B differ, number of predictions)``."""
    pa, pb = evaluation.predictions(a), evaluation.predictions(b)
    if pa.numel() == 0:
        raise AnalysisError("no held-out predictions to compare (the task returned no evaluation batches)")
    return float((pa != pb).double().mean()), pa.numel()


def _barrier(values: list[float], alphas: list[float], direction: str) -> float:
    """The largest gap between the path and the straight line joining its ends, in the worse direction."""
    v_b, v_a = values[0], values[-1]
    gaps = [(v - (al * v_a + (1 - al) * v_b)) * (1 if direction == "min" else -1) for al, v in zip(alphas, values)]
    return max(0.0, max(gaps))


def lmc(evaluation: Evaluation, a: Mapping[str, Tensor], b: Mapping[str, Tensor], points: int = 6) -> dict[str, Any]:
    """Scores along ``alpha * A + (1 - alpha) * B`` for ``points`` evenly spaced alphas in [0, 1] (6: 0, 0.2, ...,
    1), each metric's barrier, and the disagreement rate of A and B. Interpolated weights of a BatchNorm
    model are recalibrated at every alpha, ends included, so the curve compares like with like."""
    if points < 2:
        raise AnalysisError(f"points: expected an integer >= 2, got {points}")
    alphas = [round(i / (points - 1), 10) for i in range(points)]
    rows = [{"alpha": alpha, **evaluation.score(interpolate(a, b, alpha), recalibrate=True)} for alpha in alphas]
    barriers = {m: _barrier([r[m] for r in rows], alphas, d) for m, d in evaluation.metrics.items() if m in rows[0]}
    result: dict[str, Any] = {"alphas": alphas, "rows": rows, "barrier": barriers,
                              "recalibrated": evaluation.recalibrates}
    try:
        rate, count = disagreement(evaluation, a, b)
        result["disagreement"] = {"rate": rate, "predictions": count}
    except AnalysisError as exc:
        result["disagreement"] = {"rate": None, "why": str(exc)}
    return result


def lmc_lines(result: dict[str, Any], metrics: Mapping[str, str]) -> list[str]:
    """A markdown table of the curve plus the barrier and disagreement lines (also what the CLI prints)."""
    names = [m for m in metrics if m in result["rows"][0]]
    lines = ["| alpha | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join([f"{r['alpha']:.2f}"] + [f"{r[m]:.4f}" for m in names]) + " |" for r in result["rows"]]
    lines += ["", "barrier (worst gap to the straight line between the ends): "
              + ", ".join(f"{m} {result['barrier'][m]:.4f}" for m in names)]
    d = result["disagreement"]
    lines.append(f"disagreement of A and B: they predict differently on {round(d['rate'] * d['predictions'])} of "
                 f"{d['predictions']} held-out predictions ({d['rate']:.1%})"
                 if d["rate"] is not None else f"disagreement: not available ({d['why']})")
    return lines


def check_out(out: str | os.PathLike[str], force: bool, command: str = "suite analyze lmc",
              inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse an ``out`` that is, holds or lies in one of ``inputs``, and a non-empty ``out`` unless ``force`` and
    ``command`` made it (``rundir.claim_out``)."""
    claim_out(Path(out), command, [Path(i) for i in inputs], force, AnalysisError)


def write_lmc(out: str | os.PathLike[str], result: dict[str, Any], metrics: Mapping[str, str], labels: tuple[str, str],
              force: bool = False) -> Path:
    """``lmc.json``, ``lmc.md`` and ``lmc.png`` in ``out`` (new or empty unless ``force``). Returns ``lmc.md``."""
    out = Path(out)
    check_out(out, force)  # (the inputs were checked before the work: labels need not be paths)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "suite analyze lmc", a=labels[0], b=labels[1])
    names = [m for m in metrics if m in result["rows"][0]]
    alphas = result["alphas"]
    fig, axes = figure(1, len(names), (5 * len(names), 3.8))
    for ax, m in zip(axes[0], names):
        values = [r[m] for r in result["rows"]]
        ax.plot(alphas, values, marker="o", color="black", label="path")
        ax.plot([0, 1], [values[0], values[-1]], ls="--", color="grey", label="straight line")
        ax.set_xlabel("alpha (weight of A)")
        ax.set_title(f"{m} (barrier {result['barrier'][m]:.4g})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"alpha * A + (1 - alpha) * B; A = {labels[0]}, B = {labels[1]}")
    save(fig, out / "lmc.png", dpi=110)
    write_text_atomic(out / "lmc.json", json.dumps({"a": labels[0], "b": labels[1], **result}, indent=1) + "\n")
    text = ["# Linear path between two checkpoints", "", f"A = `{labels[0]}`, B = `{labels[1]}`; alpha is A's weight.",
            "BatchNorm statistics were recomputed at every alpha." if result["recalibrated"] else "", "",
            *lmc_lines(result, metrics), "", "![scores along the path](lmc.png)", ""]
    write_text_atomic(out / "lmc.md", "\n".join(text))
    return out / "lmc.md"


def default_out(prefix: str) -> str:
    return os.path.join("runs", f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")

