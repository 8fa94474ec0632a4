"""Fréchet Inception Distance of generated samples, through torch-fidelity, plus a held-out denoising loss.

What a generative task supplies (``ddpm`` does):

- ``config.fid``: a ``FidConfig`` (``fid.samples=...`` on the command line);
- ``eval_batches()`` holding sampling batches (``{"kind": "sample", ...}``: which noise to start from) and
  held-out loss batches (anything else);
- ``sample_images(model, batch)`` -> uint8 ``(B, 3, H, W)``; ``eval_loss(model, batch)`` -> ``(sum, count)``;
- ``fid_reference_key(count)`` and ``fid_reference_batches(count, batch, rank, world)``: the real images the
  reference statistics come from (uint8 batches) and a key naming them (dataset, resolution, count).

Features come from a feature extractor registered with torch-fidelity and created the way torch-fidelity
creates it: ``inception-v3-compat`` (the standard FID network; its weights,
``weights-inception-2015-12-05-6726825d.pth``, are ``fid.weights`` or the file in torch's hub cache where
torch-fidelity keeps them, downloaded there when missing; either is accepted only with the published sha256,
checked before torch-fidelity, which unpickles it with ``weights_only=False``, is handed its path) or ``standin``
(registered by this file: a fixed random conv net for machines without the Inception
weights; its scores rank samples but are not comparable with published FIDs). The Fréchet distance itself is
torch-fidelity's (``fid_statistics_to_metric``). The metric is named after its features, so the two never share
a curve: ``fid`` with Inception, ``fid_standin`` with the stand-in (``fid_<extractor>`` for any other).

What the run holds comes in the evaluator's ``EvaluationContext`` (never read off ``task.run``): the data cache,
the run folder, the run's length and evaluation interval.

Sample count per evaluation: ``fid.samples`` at every evaluation; with ``fid.final_samples`` set, the first
evaluation at or after each fraction of ``fid.final_at`` (e.g. ``0.5,1.0``) draws that many instead. The larger
set begins with the smaller (the task's sampling batches say where each starts; the first N share their noise),
so a point of either count compares with the others, raw and every averager always draw the same noise, and each
FID's count is recorded beside it (``fid_samples``).

The reference statistics (mean and covariance of the real images' features) are computed once and cached
in ``<context.cache>/fid/`` (not at all without a cache) under a name holding the dataset key, the resolution, the
count and the extractor.
With several processes, each extracts features of its share of the images and the first and second moments
are summed over processes (float64) before the mean and covariance are formed: exactly the statistics of
the whole set, identical on every rank.

Sample grids: each evaluation writes ``<context.out>/samples/step-NNNNNNNN-<weights>.png`` (the first ``fid.grid``
samples; the same noise for raw weights and every averager), named from ``begin(step, weights_name)``, which the
loop calls before each score; a caller that does not call it gets no grid.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.config import ConfigError, require
from lawa_suite.data import DataUnavailable
from lawa_suite.errors import DataPathError
from lawa_suite.evaluators.base import EvaluationContext, Evaluator, reduce_sums
from lawa_suite.files import first_line, write_atomic, write_npz_atomic

__all__ = ["FidConfig", "FID", "FeatureStats", "INCEPTION", "STANDIN", "inception_weights_path", "create_extractor",
           "inception_weights", "check_inception_weights", "register_standin", "frechet_distance", "fid_metric",
           "write_grid"]

INCEPTION = "inception-v3-compat"        # torch-fidelity's name for the standard FID network
STANDIN = "standin"                      # the offline stand-in registered below
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# The sha256 of that file (95,628,359 bytes; the same bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth).
# torch-fidelity 0.4.0 carries no hash (it loads the file unchecked), so this is the digest published for the file
# elsewhere; the file name holds its first 8 hex digits (torch.hub's naming), which alone would be forgeable.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


@dataclass
class FidConfig:
    samples: int = 10_000        # generated images per FID (for raw and for each averager); "FID-10K"
    final_samples: int = 0       # images per FID at the evaluations of final_at (a superset: the first `samples`
    #                              of them are the ones every other evaluation draws); 0 = `samples` everywhere
    final_at: list[float] = field(default_factory=lambda: [1.0])  # fractions of the run (0.5,1.0): the first
    #                              evaluation at or after each draws final_samples
    reference: int = 50_000      # real training images behind the reference statistics (all, if fewer); cached
    extractor: str = INCEPTION   # torch-fidelity feature extractor; "standin" = offline random convnet;
    #                              "auto" = Inception when its weights are on disk, else the stand-in
    weights: str = ""            # a local Inception weights file (.pth); empty = torch hub cache (torch-fidelity's).
    #                              Only the published file (INCEPTION_SHA256) is accepted: torch-fidelity reads
    #                              it with torch.load(weights_only=False), which would run a pickle's code
    batch_size: int = 100        # images per feature-extractor call
    grid: int = 64               # samples in each PNG grid (per weights, per evaluation); 0 = no grids

    def __post_init__(self) -> None:
        require(self.samples >= 2, "fid.samples", "an integer >= 2 (a covariance needs two samples)", self.samples)
        require(self.final_samples == 0 or self.final_samples >= self.samples, "fid.final_samples",
                f"0 (off) or an integer >= fid.samples={self.samples}", self.final_samples)
        require(bool(self.final_at) and all(0.0 < f <= 1.0 for f in self.final_at), "fid.final_at",
                "one or more fractions of the run in (0, 1], e.g. 0.5,1.0", self.final_at)
        require(self.reference >= 2, "fid.reference", "an integer >= 2", self.reference)
        require(bool(self.extractor.strip()), "fid.extractor",
                f"auto, {INCEPTION}, {STANDIN} or another torch-fidelity feature extractor", self.extractor)
        require(self.batch_size >= 1, "fid.batch_size", "an integer >= 1", self.batch_size)
        require(self.grid >= 0, "fid.grid", "an integer >= 0 (0 = no grids)", self.grid)


# -- the offline stand-in (its class lives in _standin.py: importing torch-fidelity costs seconds) ---------
def register_standin() -> None:
    """Register the stand-in with torch-fidelity (once: its registry refuses a name twice)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    from lawa_suite.evaluators._standin import StandinFeatures

    if STANDIN not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(STANDIN, StandinFeatures)


# -- creating an extractor the way torch-fidelity does ----------------------------------------------------
def inception_weights_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` keeps the Inception weights: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_extractor(cfg: FidConfig) -> str:
    """``auto`` -> Inception if its weights are on disk (or ``fid.weights`` is set), else the stand-in."""
    if cfg.extractor != "auto":
        return cfg.extractor
    return INCEPTION if cfg.weights or inception_weights_path().is_file() else STANDIN


def create_extractor(cfg: FidConfig) -> tuple[nn.Module, str, str]:
    """``(extractor on the CPU, its name, its feature layer for FID)``; a clear one-line error offline."""
    import torch_fidelity.registry as tf_registry
    from torch_fidelity.utils import create_feature_extractor

    register_standin()
    name = resolve_extractor(cfg)
    if name not in tf_registry.FEATURE_EXTRACTORS_REGISTRY:
        known = ", ".join(["auto", *tf_registry.FEATURE_EXTRACTORS_REGISTRY])
        raise ConfigError(f"fid.extractor: expected one of {known}, got {name!r}")
    layer = tf_registry.FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    kwargs: dict[str, Any] = {"verbose": False}
    if cfg.weights and name == STANDIN:  # its weights are fixed random numbers: the file is never opened
        print(f"fid: fid.weights={cfg.weights} is ignored: the {STANDIN} extractor has no weights to load",
              file=sys.stderr, flush=True)
    elif cfg.weights and name != INCEPTION:  # torch-fidelity would torch.load it unchecked too, running its code
        raise ConfigError(f"fid.weights: expected fid.extractor={INCEPTION} (or auto), the only extractor "
                          f"whose weights file can be verified, got fid.extractor={name}")
    elif name == INCEPTION:
        # Always the path of a file checked here: torch-fidelity never loads (or downloads) one on its own.
        kwargs["feature_extractor_weights_path"] = str(inception_weights(cfg))
    try:
        with torch.random.fork_rng(devices=[]):  # default inits must not move the training run's global RNG
            extractor = create_feature_extractor(name, [layer], cuda=False, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise DataUnavailable(f"fid.extractor: cannot create {name!r}: {first_line(exc)}") from None
    return extractor, name, layer


def inception_weights(cfg: FidConfig) -> Path:
    """The Inception weights file to hand torch-fidelity, checked: ``fid.weights``, else the file in torch's hub
    cache that torch-fidelity itself would load (``load_state_dict_from_url``: ``inception_weights_path()``),
    downloaded there first when missing. torch-fidelity reads either with ``torch.load(weights_only=False)``, so
    no file reaches it but the published one: the caller passes the returned path on explicitly, and torch-fidelity
    neither looks in its cache nor downloads on its own."""
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise DataPathError(f"fid.weights: {cfg.weights} does not exist (or is not a file); expected the "
                                f"Inception weights {INCEPTION_FILE} (from {_inception_url()}), or leave "
                                f"fid.weights empty to use torch's hub cache")
        check_inception_weights(path, "fid.weights")
        return path
    path = inception_weights_path()
    if not path.exists():
        _download_inception(path)
    elif not path.is_file():
        raise DataPathError(f"fid: {path} (torch hub's cache, where torch-fidelity keeps the Inception weights) "
                            f"is not a file; remove it to download {INCEPTION_FILE} again from {_inception_url()}")
    check_inception_weights(path, "fid")
    return path


def _download_inception(path: Path) -> None:
    """Download the Inception weights to ``path`` as torch-fidelity would, but with their sha256 checked before
    the file is moved into place (torch.hub writes a partial file beside it and removes it on a mismatch)."""
    print(f"fid: downloading {_inception_url()} to {path}", file=sys.stderr, flush=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(_inception_url(), str(path), hash_prefix=INCEPTION_SHA256, progress=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError and HTTPError are OSErrors; a bad hash, Runtime
        raise DataUnavailable(
            f"fid: the Inception weights {path} are missing and could not be downloaded ({first_line(exc)}); "
            f"fetch {_inception_url()} into {path.parent} (torch hub cache: $TORCH_HOME/hub/checkpoints), or set "
            f"fid.weights=<file>, or use fid.extractor={STANDIN} to score offline with the stand-in") from None


def check_inception_weights(path: Path, key: str = "fid.weights") -> None:
    """Refuse any file but the published Inception weights, before anything reads it as a pickle:
    torch-fidelity loads its weights with ``torch.load(weights_only=False)``, which runs a pickle's code. ``key``
    names where the file came from: ``fid.weights``, or ``fid`` for torch hub's cache."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):  # 1 MiB at a time: the real file is 96 MB
                digest.update(chunk)
    except OSError as exc:
        raise DataUnavailable(f"{key}: cannot read {path} ({first_line(exc)})") from None
    if digest.hexdigest() != INCEPTION_SHA256:
        where = "" if key == "fid.weights" else " (torch hub's cache, where torch-fidelity loads them from)"
        fix = ("" if key == "fid.weights" else
               "; delete it to download the right one, or set fid.weights=<the right file>")
        raise ConfigError(f"{key}: {path}{where} is not the published Inception weights (sha256 "
                          f"{digest.hexdigest()}); expected {INCEPTION_FILE} from {_inception_url()} (sha256 "
                          f"{INCEPTION_SHA256}){fix}: torch-fidelity would run code held in any other file")


def _inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3



# -- statistics ------------------------------------------------------------------------------------------
class FeatureStats:
    """Running first and second moments of features (float64), summable over processes; the mean and the
    unbiased covariance (``np.cov``'s) come out at the end."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def add(self, features: Tensor) -> None:
        f = features.detach().double()
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def reduce(self, accelerator: Any, dim: int, device: torch.device) -> None:
        """Sum over processes. Every rank takes part, even one that saw no images (it adds zeros)."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        if self.total is None:
            self.total = torch.zeros(dim, dtype=torch.float64, device=device)
            self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.total = accelerator.reduce(self.total.to(device), "sum")
        self.outer = accelerator.reduce(self.outer.to(device), "sum")
        self.count = int(accelerator.reduce(torch.tensor([self.count], dtype=torch.float64, device=device), "sum"))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.total is None or self.count < 2:
            raise ValueError(f"fid: {self.count} images are too few for a covariance (need at least 2)")
        n = self.count
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(reference: dict[str, np.ndarray], generated: dict[str, np.ndarray]) -> float:
    """torch-fidelity's Fréchet distance between two ``{"mu", "sigma"}`` statistics."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(reference, generated, False)[KEY_METRIC_FID])


# -- the evaluator -----------------------------------------------------------------------------------------
def _is_sample_batch(batch: Any) -> bool:
    return isinstance(batch, dict) and batch.get("kind") == "sample"


def _first_of(batch: dict[str, Any], wanted: int) -> dict[str, Any] | None:
    """A sampling batch cut to the images among the first ``wanted`` of the whole set (None: it holds none of
    them). A batch without ``start`` (a task that draws exactly fid.samples) is used whole."""
    if "start" not in batch:
        return batch
    take = min(int(batch["count"]), wanted - int(batch["start"]))
    return None if take <= 0 else batch if take == batch["count"] else {**batch, "count": take}


def _read_reference(path: Path) -> dict[str, np.ndarray] | None:
    """The cached reference statistics, or None (with a warning) when the file is damaged: a run killed while
    writing it once (before writes were atomic) left a truncated .npz that failed every later run; it is computed
    again and rewritten."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {"mu": npz["mu"], "sigma": npz["sigma"]}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        print(f"warning: fid: the cached reference statistics {path} cannot be read ({type(exc).__name__}); "
              f"computing them again", file=sys.stderr)
        return None


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


@registry.evaluators.register("fid")
class FID(Evaluator):
    """``fid`` (Fréchet distance of ``fid.samples`` samples to the real data's reference statistics; named
    ``fid_standin`` when the stand-in network made the features) and ``loss`` (the denoising objective on
    held-out images, with fixed timesteps and noise)."""

    name = "fid"
    metrics = {"fid": "min", f"fid_{STANDIN}": "min", "loss": "min"}
    notes = {f"fid_{STANDIN}": "Fréchet distance in the features of lawa-suite's offline stand-in network, not "
                               "Inception's: it ranks sample sets but is not comparable with published FIDs "
                               "(the Inception weights, or fid.extractor=inception-v3-compat, give the standard "
                               "FID)"}

    def __init__(self, task: Any, context: EvaluationContext | None = None) -> None:
        super().__init__(task, context)
        self.cfg: FidConfig = task.config.fid
        # Created now, before any training step, so a missing Inception file stops the run at once.
        self.extractor, self.extractor_name, self.layer = create_extractor(self.cfg)
        self.device = torch.device("cpu")  # where the extractor is (it may have no parameters to ask)
        self.reference: dict[str, np.ndarray] | None = None
        self._context: tuple[int, str] | None = None
        self._details: dict[str, float] = {}
        if self.cfg.extractor == "auto":
            note = f" (auto: {inception_weights_path()} not found)" if self.extractor_name == STANDIN else " (auto)"
            print(f"fid: features from {self.extractor_name}{note}", file=sys.stderr, flush=True)

    @property
    def metric(self) -> str:
        """The FID's name in metrics.jsonl: which network made the features is part of it."""
        return fid_metric(self.extractor_name)

    def begin(self, step: int, weights_name: str) -> None:
        """Say which step and weights the next ``evaluate`` scores (names the sample grid, sets the sample count)."""
        self._context = (step, weights_name)

    def details(self) -> dict[str, float]:
        """``fid_samples``: how many generated images the last FID is of; ``images``: how many held-out images its
        denoising loss is of (both over every process)."""
        return dict(self._details)

    def samples_at(self, step: int | None) -> int:
        """How many samples the FID at ``step`` is of: ``fid.final_samples`` at the first evaluation at or after
        each fraction of ``fid.final_at`` (evaluations fall every ``eval_every`` steps and at the last), else
        ``fid.samples``. Decided by the step alone, so a resumed run draws what an uninterrupted one does."""
        steps, every = self.context.steps, self.context.eval_every
        if not self.cfg.final_samples or step is None or steps <= 0 or every <= 0:
            return self.cfg.samples
        previous = (step - 1) // every * every  # the evaluation before this one (step 0 has none)
        if any(previous < math.ceil(f * steps - 1e-9) <= step for f in self.cfg.final_at):
            return self.cfg.final_samples
        return self.cfg.samples

    # -- features --
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features of uint8 images, in float32 whatever autocast the caller runs under."""
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for chunk in images.split(self.cfg.batch_size):
                out.append(self.extractor(chunk.to(self.device))[0].float())
        return torch.cat(out)

    def _dim(self) -> int:
        return int(self.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])

    def reference_stats(self, accelerator: Any, device: torch.device) -> dict[str, np.ndarray]:
        """The real images' statistics: from the cache, or computed (over every process) and cached."""
        if self.reference is not None:
            return self.reference
        weights_tag = f"-{hashlib.sha1(self.cfg.weights.encode()).hexdigest()[:8]}" if self.cfg.weights else ""
        key = f"{self.task.fid_reference_key(self.cfg.reference)}-{self.extractor_name}{weights_tag}-{self.layer}"
        path = self.context.cache / "fid" / f"{key}.npz" if self.context.cache is not None else None
        loaded = _read_reference(path) if path is not None and path.is_file() else None
        if accelerator is not None and accelerator.num_processes > 1:  # rank 0's statistics for all ranks
            from accelerate.utils import broadcast_object_list
            loaded = broadcast_object_list([loaded])[0]
        if loaded is not None:
            self.reference = loaded
            return self.reference
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        stats = FeatureStats()
        for images in self.task.fid_reference_batches(self.cfg.reference, self.cfg.batch_size, rank, world):
            stats.add(self.features(images))
        stats.reduce(accelerator, self._dim(), device)
        mu, sigma = stats.mean_cov()
        self.reference = {"mu": mu, "sigma": sigma}
        if path is not None and _is_main(accelerator):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_npz_atomic(path, durable=False, mu=mu, sigma=sigma, count=stats.count)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return self.reference

    # -- scoring --
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Any], accelerator: Any = None) -> dict[str, float]:
        context, self._context = self._context, None
        wanted = self.samples_at(context[0] if context is not None else None)
        device = next(model.parameters()).device
        self.extractor.to(device)
        self.device = device
        reference = self.reference_stats(accelerator, device)
        generated, grid = FeatureStats(), []
        loss_sum, loss_count = 0.0, 0
        for batch in batches:
            if _is_sample_batch(batch):
                batch = _first_of(batch, wanted)
                if batch is None:
                    continue
                images = self.task.sample_images(model, batch)
                generated.add(self.features(images))
                if sum(len(g) for g in grid) < self.cfg.grid:
                    grid.append(images[:self.cfg.grid - sum(len(g) for g in grid)].cpu())
            else:
                total, count = self.task.eval_loss(model, batch)
                loss_sum, loss_count = loss_sum + float(total), loss_count + int(count)
        generated.reduce(accelerator, len(reference["mu"]), device)
        sums = reduce_sums({"loss": loss_sum, "count": float(loss_count)}, accelerator, device)
        mu, sigma = generated.mean_cov()
        scores = {self.metric: frechet_distance(reference, {"mu": mu, "sigma": sigma})}
        self._details = {"fid_samples": float(generated.count)}
        if sums["count"] > 0:
            scores["loss"] = sums["loss"] / sums["count"]
            self._details["images"] = float(sums["count"])  # held-out images of the denoising loss, every process's
        if grid and context is not None and self.context.out is not None and _is_main(accelerator):
            step, weights_name = context
            write_grid(torch.cat(grid), self.context.out / "samples" / f"step-{step:08d}-{weights_name}.png",
                       label=f"step {step}: {weights_name}")
        return scores


LABEL_HEIGHT = 16  # pixels of white band above a labelled grid, for one line of PIL's default font


def fid_metric(extractor: str) -> str:
    """``fid`` for Inception's features, ``fid_<extractor>`` for any other network's (``fid_standin``)."""
    return "fid" if extractor == INCEPTION else "fid_" + re.sub(r"\W", "_", extractor)


def write_grid(images: Tensor, path: Path, min_tile: int = 64, label: str = "") -> None:
    """uint8 ``(N, 3, H, W)`` -> a square-ish PNG grid; small images are enlarged (nearest) to ``min_tile`` px.
    ``label`` (the step and weights) is written in a band above the grid, so a grid shown alone says what it is."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    scale = max(1, min_tile // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = Image.fromarray(make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2,
                                     pad_value=255).permute(1, 2, 0).numpy())
    if label:
        labelled = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
        labelled.paste(grid, (0, LABEL_HEIGHT))
        ImageDraw.Draw(labelled).text((4, 2), label, fill="black")
        grid = labelled
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: grid.save(p, format="PNG"), durable=False)
