"""Denoising diffusion (DDPM, Ho et al. 2020) with a diffusers ``UNet2DModel``, scored by FID of DDIM samples.

Training is the epsilon-prediction objective: an image x0 scaled to [-1, 1], a timestep t ~ U{0..T-1} and
noise eps ~ N(0, I) give x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (diffusers' ``DDPMScheduler``: T=1000,
betas linear from 1e-4 to 0.02); the UNet predicts eps from (x_t, t) and the loss is the mean squared error.
t, eps and the horizontal flip are drawn from generators seeded by (run seed, step, the batch's example
indices), never from global RNG, so a resumed run repeats them exactly.

Evaluation (the ``fid`` evaluator) scores the same things for raw weights and every averager:

- ``fid``: ``fid.samples`` images drawn with DDIM (``ddpm.sample_steps`` steps, eta ``ddpm.sample_eta``) from
  initial noise seeded by ``ddpm.sample_seed`` and the batch number alone, so every weights set, at every
  evaluation, starts from the same noise; their Fréchet distance to the real training images' statistics. With
  ``fid.final_samples``, the evaluations at ``fid.final_at`` draw that many, the first ``fid.samples`` of them from
  the same noise as the others (``fid_samples`` in metrics.jsonl says how many each FID is of);
- ``loss``: the training objective on held-out images with fixed timesteps (stratified over [0, T)) and
  fixed noise: cheap (one forward per image) and smooth, so it is worth having at every evaluation;
- a PNG grid of the first ``fid.grid`` samples per weights: ``<run>/samples/step-NNNNNNNN-<weights>.png``.

The UNet is configured level by level (``ddpm.channels``, ``ddpm.attention``); the presets give Ho et al.'s
35.7M CIFAR-10 network (``cifar32``) and the 421.5M ADM ImageNet-128 network of Dhariwal & Nichol 2021
(``imagenet128``: widths 256 x (1, 1, 2, 3, 4), two ResNet blocks a level, attention at 32, 16 and 8 px with
64-channel heads, BigGAN-style ResNet up/down-sampling, scale-shift timestep conditioning). The ADM count
includes its 1000-class embedding (1,024,000 parameters); this task is unconditional, so it builds 420.5M.

Data: ``digits`` (scikit-learn's, offline, what ``tiny`` and ``cpu`` train on), ``embedded`` (the CIFAR-10 subset
shipped in the package), ``cifar10``, and
``imagefolder`` (``train/<class>/*`` + ``test/<class>/*``; short side resized and centre-cropped, as ADM).
A folder that fits in ``ddpm.memory_gb`` is decoded once into memory; a bigger one (ImageNet: 63 GB at
128 px) is streamed from its files by DataLoader workers (``ddpm.loader=stream``), resumable and in the same
deterministic order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.config import SCHEDULE_FREE, ConfigError, choice, require
from lawa_suite.data.images import ImageFiles, ImageSet, imagefolder_files, load_image_set, load_imagefolder
from lawa_suite.data.batches import batch_generator, generator_seed
from lawa_suite.data.imagestream import FileImageStream, decode_batches, fixed_subset
from lawa_suite.data.stream import IndexStream, TensorStream
from lawa_suite.evaluators.fid import FidConfig
from lawa_suite.tasks import schedule_free
from lawa_suite.tasks.base import Task, parameter_count

EVAL_ORDER_SEED = 1234            # which held-out images a bounded evaluation sees, whatever the run seed
EVAL_NOISE_SEED = 4321            # the held-out loss's timesteps and noise
FID_REFERENCE_SEED = 2020         # which training images make the FID reference when not all of them do
ADM_IMAGENET128_PARAMS = 421_500_000  # Dhariwal & Nichol 2021, Table 11 (class-conditional)
Batch = dict[str, Any]


# -- model ------------------------------------------------------------------------------------------
def build_unet(cfg: "DdpmConfig") -> nn.Module:
    """A diffusers UNet2DModel shaped by ``cfg``: one down block and one up block per entry of ``channels``."""
    from diffusers import UNet2DModel

    def block(attention: bool, direction: str) -> str:
        if attention:  # ResNet up/down-sampling inside attention blocks is set by down/upsample_type below
            return f"Attn{direction}Block2D"
        sample = "sample" if cfg.resnet_updown else ""
        return f"Resnet{direction}{sample}Block2D" if cfg.resnet_updown else f"{direction}Block2D"

    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(block(a, "Down") for a in cfg.attention),
        up_block_types=tuple(block(a, "Up") for a in reversed(cfg.attention)),
        downsample_type="resnet" if cfg.resnet_updown else "conv",
        upsample_type="resnet" if cfg.resnet_updown else "conv",
        attention_head_dim=cfg.head_dim or None,  # None: one head as wide as the layer (Ho et al.)
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
        norm_num_groups=cfg.norm_groups, dropout=cfg.dropout,
    )


# -- config -----------------------------------------------------------------------------------------
@dataclass
class DdpmConfig:
    image_size: int = 32                 # training and sampling resolution (square)
    channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])  # UNet width per level (Ho et al.)
    attention: list[bool] = field(default_factory=lambda: [False, True, False, False])  # self-attention per level
    layers_per_block: int = 2            # ResNet blocks per level going down (one more going up)
    head_dim: int = 0                    # channels per attention head; 0 = one head per layer
    resnet_updown: bool = False          # BigGAN-style ResNet blocks for down/up-sampling (ADM)
    scale_shift: bool = False            # the timestep scales and shifts the normalised activations (ADM's AdaGN)
    norm_groups: int = 32                # GroupNorm groups
    dropout: float = 0.1                 # in every ResNet block (Ho et al. CIFAR-10: 0.1)
    timesteps: int = 1000                # diffusion steps T
    beta_start: float = 1e-4             # noise schedule: beta_1 ...
    beta_end: float = 0.02               # ... to beta_T
    beta_schedule: str = choice("linear", "linear", "scaled_linear", "squaredcos_cap_v2")
    optimizer: str = choice("adamw", "adamw", "schedulefree")  # schedulefree: schedule-free AdamW, same betas
    adam_beta2: float = 0.999            # AdamW's second-moment decay
    weight_decay: float = 0.0            # AdamW weight decay (0 = Adam, as Ho et al. and ADM)
    flip: bool = True                    # random horizontal flips of training images
    sample_steps: int = 50               # DDIM steps per evaluation sample
    sample_eta: float = 0.0              # DDIM noise; 0 = deterministic given the initial noise
    sample_seed: int = 0                 # seeds the initial noise of evaluation samples (not the run seed)
    eval_batch_size: int = 100           # images per held-out loss batch and per sampling batch
    loader: str = choice("auto", "auto", "memory", "stream")  # imagefolder: decode once into memory, or stream files
    memory_gb: float = 8.0               # loader=auto streams folders whose decoded train split is bigger than this
    workers: int = 8                     # DataLoader workers decoding files (loader=stream)
    fid: FidConfig = field(default_factory=FidConfig)

    def __post_init__(self) -> None:
        levels = len(self.channels)
        require(8 <= self.image_size and self.image_size % 2 ** (levels - 1) == 0, "image_size",
                f"an integer >= 8 divisible by 2^(levels-1) = {2 ** (levels - 1)}", self.image_size)
        require(levels >= 1 and all(c >= 1 and c % self.norm_groups == 0 for c in self.channels), "channels",
                f"a list of widths, each a multiple of norm_groups={self.norm_groups}", self.channels)
        require(len(self.attention) == levels, "attention", f"{levels} true/false values, one per level of channels",
                self.attention)
        require(self.layers_per_block >= 1, "layers_per_block", "an integer >= 1", self.layers_per_block)
        require(self.head_dim >= 0 and all(not a or self.head_dim == 0 or c % self.head_dim == 0
                                           for c, a in zip(self.channels, self.attention)),
                "head_dim", "0 (one head) or a divisor of every attention level's width", self.head_dim)
        require(self.norm_groups >= 1, "norm_groups", "an integer >= 1", self.norm_groups)
        require(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)", self.dropout)
        require(self.timesteps >= 2, "timesteps", "an integer >= 2", self.timesteps)
        require(0.0 < self.beta_start < self.beta_end < 1.0, "beta_end",
                f"a number in (beta_start={self.beta_start}, 1)", self.beta_end)
        require(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "a number in [0, 1)", self.adam_beta2)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(1 <= self.sample_steps <= self.timesteps, "sample_steps",
                f"an integer in [1, timesteps={self.timesteps}]", self.sample_steps)
        require(0.0 <= self.sample_eta <= 1.0, "sample_eta", "a number in [0, 1]", self.sample_eta)
        require(self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1", self.eval_batch_size)
        require(self.memory_gb > 0, "memory_gb", "a number > 0", self.memory_gb)
        require(self.workers >= 0, "workers", "an integer >= 0 (0 = decode in the main process)", self.workers)


# -- task -------------------------------------------------------------------------------------------
@registry.tasks.register("ddpm")
class DdpmTask(Task):
    """DDPM on images: epsilon-prediction MSE, FID of DDIM samples and a held-out denoising loss."""

    name = "ddpm"
    Config = DdpmConfig
    evaluator = "fid"
    data_sources = ("embedded", "digits", "imagefolder", "cifar10")
    default_preset = "cpu"
    presets: dict[str, dict[str, Any]] = {
        # seconds: 16 px digits, a 2-level 45K-parameter UNet, FID of 32 four-step samples by the stand-in
        "tiny": {"data.source": "digits", "steps": 8, "lr": 2e-3, "batch_size": 16, "schedule": "constant",
                 "eval.every": 4, "eval.batches": 2, "ddpm.image_size": 16, "ddpm.channels": [8, 16],
                 "ddpm.attention": [False, True], "ddpm.layers_per_block": 1, "ddpm.norm_groups": 4,
                 "ddpm.dropout": 0.0, "ddpm.flip": False, "ddpm.sample_steps": 4, "ddpm.eval_batch_size": 16,
                 "fid.samples": 32, "fid.reference": 256, "fid.extractor": "standin", "fid.grid": 16,
                 "lawa.k": 2, "lawa.nu": 2, "ema.decay": 0.9, "swa.start": 0.5},
        # ~10 minutes on 2 CPU cores: 16 px digits (offline; flips off, digits are not symmetric),
        # a 3-level 1.1M-parameter UNet, constant LR after warm-up (diffusion practice: the averages do the
        # annealing). FID of 256 twenty-step DDIM samples against all 1,497 training digits, by Inception when
        # its weights are on disk, else by the stand-in. Averaging windows of ~250 steps.
        "cpu": {"data.source": "digits", "steps": 1500, "lr": 1e-3, "batch_size": 64, "warmup": 100,
                "schedule": "constant",
                "grad_clip": 1.0, "eval.every": 250, "eval.batches": 3, "ddpm.image_size": 16,
                "ddpm.channels": [32, 64, 64], "ddpm.attention": [False, False, True], "ddpm.layers_per_block": 1,
                "ddpm.norm_groups": 8, "ddpm.head_dim": 32, "ddpm.dropout": 0.0, "ddpm.flip": False,
                "ddpm.sample_steps": 20, "ddpm.eval_batch_size": 128, "fid.samples": 256, "fid.reference": 1497,
                "fid.extractor": "auto", "fid.grid": 64, "lawa.k": 5, "lawa.nu": 50, "ema.decay": 0.995,
                "swa.start": 0.5},
        # Ho et al. 2020 on CIFAR-10: 35.7M parameters, Adam 2e-4, batch 128, 800K steps, 5K warm-up, dropout
        # 0.1, clip 1, flips, EMA 0.9999. FID-10K of 100-step DDIM samples against the 50K training images.
        "cifar32": {"data.source": "cifar10", "steps": 800_000, "lr": 2e-4, "batch_size": 128, "warmup": 5000,
                    "schedule": "constant", "grad_clip": 1.0, "eval.every": 20_000, "eval.batches": 10,
                    "ddpm.image_size": 32, "ddpm.channels": [128, 256, 256, 256],
                    "ddpm.attention": [False, True, False, False], "ddpm.layers_per_block": 2, "ddpm.head_dim": 0,
                    "ddpm.dropout": 0.1, "ddpm.flip": True, "ddpm.sample_steps": 100, "fid.samples": 10_000,
                    "fid.reference": 50_000, "lawa.k": 5, "lawa.nu": 2000, "ema.decay": 0.9999, "swa.start": 0.5},
        # ADM's ImageNet-128 UNet (unconditional: 420.5M), Adam 1e-4, batch 256, bf16, ImageNet train streamed
        # from its files (data.path=<folder with train/<class>/*.JPEG and val/<class>/*.JPEG>). Micro-batches of 32
        # images (~1.3 GB of activations an image in bf16: 256 at once need ~350 GB): 8 a step on one GPU (57 GiB
        # of 80 by `suite run ... --dry-run`), one a GPU on 8 (grad_accum is divided by the number of processes).
        "imagenet128": {"data.source": "imagefolder", "steps": 500_000, "lr": 1e-4, "batch_size": 256, "grad_accum": 8,
                        "warmup": 0, "schedule": "constant", "mixed_precision": "bf16", "eval.every": 25_000,
                        "eval.batches": 10, "ddpm.image_size": 128, "ddpm.channels": [256, 256, 512, 768, 1024],
                        "ddpm.attention": [False, False, True, True, True], "ddpm.layers_per_block": 2,
                        "ddpm.head_dim": 64, "ddpm.resnet_updown": True, "ddpm.scale_shift": True,
                        "ddpm.dropout": 0.0, "ddpm.flip": True, "ddpm.sample_steps": 50, "ddpm.loader": "stream",
                        "fid.samples": 10_000, "fid.reference": 50_000, "lawa.k": 5, "lawa.nu": 2000,
                        "ema.decay": 0.9999, "swa.start": 0.5},
    }

    def __init__(self, config: DdpmConfig, run: Any) -> None:
        super().__init__(config, run)
        self.data: ImageSet | None = None    # in memory (embedded, cifar10, small image folders)
        self.files: ImageFiles | None = None  # streamed from files (big image folders)
        self.eval_images: Tensor | None = None
        self._eval: list[Batch] | None = None
        self.scheduler = self.noise_scheduler()

    def noise_scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        cfg = self.config
        return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                             beta_schedule=cfg.beta_schedule, prediction_type="epsilon", clip_sample=True)

    # -- data ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, data = self.config, self.run.data
        self.data = self.files = None
        self._eval = None
        if data.source == "imagefolder":
            files = imagefolder_files(data.path, data.cache)
            decoded_gb = len(files.train) * 3 * cfg.image_size ** 2 / 2 ** 30
            if cfg.loader == "stream" or (cfg.loader == "auto" and decoded_gb > cfg.memory_gb):
                self.files = files
                self.eval_images = self._decode_eval_files(files)
                return
            self.data = load_imagefolder(data.path, data.cache, cfg.image_size, crop=True)
        else:
            if cfg.loader == "stream":
                raise ConfigError(f"ddpm.loader: stream reads data=imagefolder only; got data={data.source}")
            self.data = load_image_set(data.source, data.path, data.cache, cfg.image_size)
        self.eval_images = self._eval_order(self.data.test_images)

    def _eval_count(self, available: int) -> int:
        bound = self.run.eval.batches * self.config.eval_batch_size
        return min(available, bound) if bound else available

    def _eval_order(self, images: Tensor) -> Tensor:
        """Held-out images in one fixed shuffled order (folders are sorted by class), bounded by eval.batches."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(EVAL_ORDER_SEED))
        return images[order[:self._eval_count(len(images))]]

    def _decode_eval_files(self, files: ImageFiles) -> Tensor:
        order = torch.randperm(len(files.test), generator=torch.Generator().manual_seed(EVAL_ORDER_SEED))
        chosen = [files.test[i][0] for i in order[:self._eval_count(len(files.test))].tolist()]
        batches = decode_batches(chosen, self.config.image_size, self.config.eval_batch_size, self.config.workers)
        return torch.cat(list(batches))

    def _require_setup(self) -> None:
        if self.data is None and self.files is None:
            raise RuntimeError("DdpmTask.setup() must run before the data are used")

    def train_stream(self, micro_batch: int, rank: int, world: int) -> TensorStream | FileImageStream:
        self._require_setup()
        if self.files is not None:
            return FileImageStream([f for f, _ in self.files.train], self.config.image_size, micro_batch,
                                   self.run.seed, rank, world, self.config.workers)
        images = self.data.train_images
        indices = IndexStream(len(images), micro_batch, self.run.seed, rank, world)
        return TensorStream(indices, lambda idx: {"images": images[idx], "indices": idx, "augment": True})

    def eval_batches(self) -> list[Batch]:
        """Sampling batches, then held-out loss batches. Sampling: ``fid.samples`` images ``eval_batch_size`` at a
        time, then up to ``fid.final_samples`` the same way; each batch says where it starts, and none straddles
        ``fid.samples``, so an evaluation of either count draws whole batches and the larger set begins with exactly
        the smaller one. Both kinds hold no randomness of their own: seeds derived from their position fix the noise."""
        if self._eval is None:
            self._require_setup()
            size, fid = self.config.eval_batch_size, self.config.fid
            starts = [*range(0, fid.samples, size), *range(fid.samples, max(fid.samples, fid.final_samples), size)]
            ends = [*starts[1:], max(fid.samples, fid.final_samples)]
            sample = [{"kind": "sample", "index": i, "start": start, "count": min(size, end - start)}
                      for i, (start, end) in enumerate(zip(starts, ends))]
            held_out = [{"kind": "loss", "index": i, "images": chunk}
                        for i, chunk in enumerate(self.eval_images.split(size))]
            self._eval = sample + held_out
        return list(self._eval)

    def calibration_batches(self, count: int) -> list[Batch]:
        """Un-augmented training batches (the UNet has GroupNorm, not BatchNorm: the loop asks only if it had)."""
        stream = self.train_stream(self.run.micro_batch, 0, 1)
        return [{**stream.next_batch(), "augment": False} for _ in range(count)]

    # -- FID reference ------------------------------------------------------------------------------
    def _reference_indices(self, count: int) -> np.ndarray:
        n = len(self.files.train) if self.files is not None else len(self.data.train_images)
        return fixed_subset(n, count, FID_REFERENCE_SEED)

    def fid_reference_key(self, count: int) -> str:
        """Names the reference images: the dataset (its content, or its folder and size), resolution, count."""
        self._require_setup()
        chosen = self._reference_indices(count)
        if self.files is not None:
            text = f"{self.files.root.resolve()}|{len(self.files.train)}|" + ",".join(map(str, chosen[:100]))
            name = "imagefolder-stream"
        else:
            # hashing the pixels (a fraction of a second for CIFAR-10) keys on what the images are, not where
            text = hashlib.sha1(self.data.train_images[torch.from_numpy(chosen)].numpy().tobytes()).hexdigest()
            name = self.run.data.source
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        return f"{name}-{self.config.image_size}px-{len(chosen)}-{digest}"

    def fid_reference_batches(self, count: int, batch: int, rank: int = 0, world: int = 1) -> Iterator[Tensor]:
        """This process's share of the reference images (un-flipped training images), as uint8 batches."""
        self._require_setup()
        chosen = self._reference_indices(count)[rank::world]
        if self.files is not None:
            return decode_batches([self.files.train[i][0] for i in chosen], self.config.image_size, batch,
                                  self.config.workers)
        return iter(self.data.train_images[torch.from_numpy(chosen)].split(batch))

    # -- model --------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return build_unet(self.config)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        # fused: one kernel over all parameters, on the CPU as on GPUs (8x faster than foreach at 420M parameters
        # on a CPU, and none of foreach's parameter-sized temporaries)
        if self.config.optimizer == SCHEDULE_FREE:  # (no fused kernel exists: foreach)
            return schedule_free.adamw(model.parameters(), lr, self.run.schedulefree,
                                       betas=(0.9, self.config.adam_beta2), weight_decay=self.config.weight_decay)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, self.config.adam_beta2),
                                 weight_decay=self.config.weight_decay, fused=True)

    # -- forward ------------------------------------------------------------------------------------
    @staticmethod
    def to_model(images: Tensor, device: torch.device) -> Tensor:
        """uint8 -> float in [-1, 1] on ``device`` (the transfer stays uint8: 4x fewer bytes)."""
        return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

    def _noised(self, x0: Tensor, generator: torch.Generator,
                stratified: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, t, eps)`` for a batch; t uniform, or ``stratified`` (one per equal slice of [0, T))."""
        n, steps = x0.shape[0], self.config.timesteps
        device = generator.device
        if stratified:
            offset = torch.rand((), generator=generator, device=device)
            t = ((torch.arange(n, device=device) + offset) * steps / n).long().clamp_(max=steps - 1)
        else:
            t = torch.randint(0, steps, (n,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t, noise = t.to(x0.device), noise.to(x0.device)
        schedule = self.scheduler.alphas_cumprod
        if schedule.device != x0.device:  # diffusers would move it with a blocking upload, a device sync, on first use
            # (back to the host, as for the held-out loss, the copy must be waited for: it is read at once)
            self.scheduler.alphas_cumprod = schedule.to(x0.device, non_blocking=x0.device.type != "cpu")
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def loss(self, model: nn.Module, batch: Batch, step: int) -> Tensor:
        images = batch["images"]
        device = next(model.parameters()).device
        seed = generator_seed(batch_generator(self.run.seed, step, batch["indices"]))
        if batch["augment"] and self.config.flip:
            flip = torch.rand(len(images), generator=torch.Generator().manual_seed(seed)) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        x0 = self.to_model(images, device)
        # timesteps and noise drawn where the model lives: no 50 MB host-to-device copy per ImageNet batch
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        xt, t, noise = self._noised(x0, generator)
        return F.mse_loss(model(xt, t).sample.float(), noise)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        """The summed per-image denoising loss of a held-out batch, and its image count. The timesteps and
        noise come from a CPU generator seeded by the batch's position: identical on every device."""
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED * 1_000_003 + batch["index"])
        xt, t, noise = self._noised(batch["images"].float().div(127.5).sub(1.0), generator, stratified=True)
        prediction = model(xt.to(device), t.to(device)).sample.float()
        per_image = (prediction - noise.to(device)).square().mean(dim=(1, 2, 3))
        return per_image.sum(), len(per_image)

    def sampler(self) -> Any:
        """DDIM over ``sample_steps`` steps, "trailing" spacing (starting at t=T-1: Lin et al. 2024 show the
        default "leading" spacing never starts from pure noise)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        ddim.set_timesteps(self.config.sample_steps)
        return ddim

    @torch.no_grad()
    def sample_images(self, model: nn.Module, batch: Batch) -> Tensor:
        """``batch["count"]`` images as uint8 ``(B, 3, S, S)``, from noise fixed by (sample_seed, batch index)."""
        cfg = self.config
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(cfg.sample_seed * 1_000_003 + batch["index"])
        x = torch.randn((batch["count"], 3, cfg.image_size, cfg.image_size), generator=generator).to(device)
        ddim = self.sampler()
        for t in ddim.timesteps:
            eps = model(x, t.to(device)).sample.float()
            x = ddim.step(eps, t, x, eta=cfg.sample_eta, generator=generator).prev_sample
        return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()

    # -- export -------------------------------------------------------------------------------------
    def export(self, weights: Mapping[str, Tensor], out: Path) -> None:
        """A diffusers pipeline folder: ``DDPMPipeline.from_pretrained(out)`` loads it and samples (its own
        1000-step ancestral sampler; ``DDIMPipeline.from_pretrained(out)`` gives the fast one used here)."""
        from diffusers import DDPMPipeline

        with torch.device("meta"):  # no random init of weights about to be replaced (seconds at 420M)
            unet = self.build_model()
        unet.load_state_dict(dict(weights), assign=True)
        DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(str(out), safe_serialization=True)

    def summary(self, model: nn.Module) -> str:
        self._require_setup()
        cfg = self.config
        params = parameter_count(model)
        if self.files is not None:
            data = f"{self.files.description} (streamed): {len(self.files.train):,} train images"
        else:
            data = f"{self.data.description}: {len(self.data.train_images):,} train images"
        final = (f", {cfg.fid.final_samples:,} at {','.join(f'{f:g}' for f in cfg.fid.final_at)} of the run"
                 if cfg.fid.final_samples else "")
        adm = ""
        if cfg.image_size == 128 and cfg.channels == [256, 256, 512, 768, 1024]:
            adm = (f" ({params / ADM_IMAGENET128_PARAMS - 1:+.2%} vs ADM ImageNet-128's 421.5M, "
                   f"class embedding included)")
        return (f"{self.name}: UNet2DModel {params:,} parameters{adm}, {cfg.image_size}px, widths {cfg.channels}; "
                f"{data}, {len(self.eval_images):,} held-out; T={cfg.timesteps} {cfg.beta_schedule} betas; "
                f"FID of {cfg.fid.samples:,} {cfg.sample_steps}-step DDIM samples ({cfg.fid.extractor}){final}")
