"""Image classification with a PreAct-ResNet-18 for 32 px inputs (the LAWA paper's CIFAR study), or any timm model
(``cifar.model=resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224 cifar.patch_size=4``: ``_timm.py``).

The model is He et al.'s pre-activation ResNet-18 ("Identity Mappings in Deep Residual Networks", 2016) in
its CIFAR form: a 3x3 stem convolution and no max-pool, four stages of two pre-activation basic blocks with
widths w, 2w, 4w, 8w (w=64 is the real network, 11.2M parameters), a final BatchNorm-ReLU, global average
pooling and a linear head. ``cifar.width`` scales it down for CPU presets.

Data is held once as uint8 ``(N, 3, H, W)``; each batch is converted on the model's device and normalised
with the training split's per-channel mean and std. Augmentation (a random crop of the reflect-padded
image and a horizontal flip, the standard CIFAR recipe) is drawn from a generator seeded by the run seed,
the step and the batch's example indices, never from global RNG, so a resumed run repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.config import SCHEDULE_FREE, ConfigError, choice, require
from lawa_suite.data.batches import batch_generator  # noqa: F401  (its public path before data/ held it)
from lawa_suite.data.images import ImageSet, load_image_set
from lawa_suite.data.stream import IndexStream, TensorStream
from lawa_suite.errors import CheckpointError
from lawa_suite.module_folders import write_module_folder
from lawa_suite.tasks import _timm
from lawa_suite.tasks import schedule_free
from lawa_suite.tasks.base import Task, parameter_count

NORMALISATION = ("normalised per channel with the training split's mean and std (computed from the training images "
                 "at the start of every run; CIFAR-10's: mean 0.4914, 0.4822, 0.4465, std 0.2470, 0.2435, 0.2616)")
EVAL_ORDER_SEED = 1234  # fixes which test images a bounded evaluation (eval.batches > 0) sees, whatever the run seed
Batch = dict[str, Any]  # {"images": uint8 (B, C, H, W), "labels": int64 (B,), "indices": int64 (B,), "augment": bool}


# -- model ------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the identity (or a strided 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # the projection sees the pre-activated input, as in the paper (and kuangliu's PreActBlock)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for small images: 3x3 stem, [2, 2, 2, 2] blocks at widths w, 2w, 4w, 8w."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        blocks, channels = [], width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(channels, out_channels, stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels)  # pre-activation blocks end un-normalised: normalise once before pooling
        self.head = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        x = F.relu(self.bn(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def preact_args(weights: Mapping[str, Tensor]) -> dict[str, int]:
    """The ``PreActResNet18`` arguments ``weights`` were built with, read off the stem and the head."""
    try:
        stem, head = weights["stem.weight"], weights["head.weight"]
    except KeyError:
        raise CheckpointError("weights: these are not the suite's PreAct-ResNet-18 (no stem.weight or "
                              "head.weight)") from None
    return {"num_classes": int(head.shape[0]), "width": int(stem.shape[0]), "in_channels": int(stem.shape[1])}


PREACT_NOTES = ("Inputs: {channels}-channel images of {size} px (any size works: the network pools globally), scaled "
                "to [0, 1], then {norm}. The BatchNorm statistics are those of the weights exported (an averager's are "
                "its average of them); the run scored averaged weights after recomputing them on a few training "
                "batches (eval.bn_batches), so this model's scores may differ a little from the run's.")


# -- augmentation -----------------------------------------------------------------------------------
def _reflect(index: Tensor, size: int) -> Tensor:
    """Map coordinates of a reflect-padded axis (``F.pad(mode="reflect")``) back into ``[0, size)``."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Crop each image at a random offset of its ``padding``-px reflect-padded copy, and flip half of them.

    One gather on the (uint8) batch: the padding is never materialised, the crop indexes through it.
    """
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = _reflect(offsets[:, :1] + torch.arange(h) - padding, h)           # (n, h)
    cols = _reflect(offsets[:, 1:] + torch.arange(w) - padding, w)           # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return images[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


# -- task -------------------------------------------------------------------------------------------
@dataclass
class CifarConfig:
    model: str = _timm.PREACT        # the paper's PreAct-ResNet-18, or a timm model name (built untrained)
    width: int = 64                  # PreAct only: base channels; 64 is the real PreAct-ResNet-18 (11.2M parameters)
    patch_size: int = 0              # timm models with patches (ViT, DeiT): their patch size; 0 keeps the model's
    image_size: int = 32             # images are resized to this once, when loaded
    optimizer: str = choice("sgd", "sgd", "adamw", "schedulefree")  # schedulefree: schedule-free SGD
    momentum: float = 0.9            # SGD only (schedulefree: its interpolation beta)
    nesterov: bool = True            # SGD only
    weight_decay: float = 5e-4       # on every parameter, BatchNorm included, as the standard recipe does
    augment: bool = True             # random crop + horizontal flip of training batches
    crop_padding: int = 4            # reflect padding of the random crop
    label_smoothing: float = 0.0     # training loss only; evaluation reports plain cross-entropy
    eval_batch_size: int = 500       # examples per held-out batch
    channels_last: bool = False      # NHWC memory format (faster convolutions on recent GPUs)

    def __post_init__(self) -> None:
        _timm.check_model_name(self.model)
        require(self.width >= 1, "width", "an integer >= 1", self.width)
        require(self.patch_size >= 0, "patch_size", "an integer >= 0 (0: the model's own)", self.patch_size)
        require(self.patch_size == 0 or (self.model != _timm.PREACT and _timm.has_patches(self.model)), "patch_size",
                f"0 for {self.model} (it has no patches; patch_size is for ViT-like timm models)", self.patch_size)
        require(self.image_size >= 8, "image_size", "an integer >= 8", self.image_size)
        require(0.0 <= self.momentum < 1.0, "momentum", "a number in [0, 1)", self.momentum)
        require(not (self.nesterov and self.optimizer == "sgd" and self.momentum == 0), "nesterov",
                "false when momentum is 0 (Nesterov needs momentum)", self.nesterov)
        require(self.momentum > 0 or self.optimizer != SCHEDULE_FREE, "momentum",
                "a number in (0, 1) with optimizer=schedulefree (its eval weights divide by it)", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(0 <= self.crop_padding < self.image_size, "crop_padding", f"an integer in [0, {self.image_size})",
                self.crop_padding)
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "a number in [0, 1)", self.label_smoothing)
        require(self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1", self.eval_batch_size)


@registry.tasks.register("cifar")
class CifarTask(Task):
    """PreAct-ResNet-18 image classification, scored by top-1 accuracy and cross-entropy on the test split."""

    name = "cifar"
    Config = CifarConfig
    evaluator = "accuracy"
    data_sources = ("embedded", "digits", "imagefolder", "cifar10", "cifar100")
    default_preset = "cpu"
    presets: dict[str, dict[str, Any]] = {
        # seconds: scikit-learn's digits, a 4-wide net, 16 steps: long enough for LAWA windows up to k*nu = 15
        # (e.g. lawa.k=3 lawa.nu=5) to fill
        "tiny": {"data.source": "digits", "steps": 16, "lr": 0.05, "batch_size": 16, "schedule": "constant",
                 "cifar.width": 4, "cifar.eval_batch_size": 150, "eval.every": 4, "eval.bn_batches": 2,
                 "lawa.k": 2, "lawa.nu": 2, "ema.decay": 0.9, "swa.start": 0.5},
        # the README's main job: about 5 minutes on 2 CPU cores (0.33 s a 64-image step on the machine of
        # 2026-12-02, ~4 s per 4-weight-set evaluation of 1,000 test images). The default data is the CIFAR-10 subset
        # in the package (10,000 training images: 3.2 epochs); at lr 0.1 LAWA and EMA run visibly ahead of raw in
        # the first three quarters (LAWA +0.04 accuracy early, +0.03 mid, measured). Averaging windows of ~100 steps
        # (LAWA 5 x 20, EMA 0.99), SWA over the last quarter; 10 evaluations, so each phase holds several.
        "cpu": {"steps": 500, "lr": 0.1, "batch_size": 64, "warmup": 25,
                "schedule": "cosine", "cifar.width": 16, "eval.every": 50, "eval.batches": 2,
                "eval.bn_batches": 2, "lawa.k": 5, "lawa.nu": 20, "ema.decay": 0.99, "swa.start": 0.75},
        # the standard recipe: 200 epochs of CIFAR-10 at batch 128 (390 steps an epoch), SGD + Nesterov, cosine;
        # LAWA over the latest 5 end-of-epoch weights (Kaddour 2022), EMA of a ~5-epoch horizon
        "paper": {"data.source": "cifar10", "steps": 78_000, "lr": 0.1, "batch_size": 128, "warmup": 0,
                  "schedule": "cosine", "cifar.width": 64, "cifar.optimizer": "sgd", "cifar.momentum": 0.9,
                  "cifar.nesterov": True, "cifar.weight_decay": 5e-4, "eval.every": 390,
                  "lawa.k": 5, "lawa.nu": 390, "ema.decay": 0.9995, "swa.start": 0.75},
    }

    def __init__(self, config: CifarConfig, run: Any) -> None:
        super().__init__(config, run)
        # oneDNN (CPU) hangs or crashes on the 1x1 stride-2 shortcut convolutions when they see fewer than 8 input
        # channels in channels-last layout, which compiled code picks too (uxlfoundation/oneDNN#6035): refuse it
        # before any work rather than hang a run
        layout_risk = config.channels_last or getattr(run, "compile", False)
        if config.model == _timm.PREACT and config.width < 8 and layout_risk and not torch.cuda.is_available():
            raise ConfigError(f"cifar.width: expected >= 8 with compile=true or cifar.channels_last=true on CPU "
                              f"(oneDNN hangs on convolutions of fewer than 8 channels: oneDNN#6035), got "
                              f"{config.width}")
        self.data: ImageSet | None = None
        self.mean = self.std = torch.zeros(0)
        self._normalisation: tuple[Tensor, Tensor] | None = None
        self._eval: list[Batch] | None = None

    # -- data ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        data = self.run.data
        self.data = load_image_set(data.source, data.path, data.cache, self.config.image_size)
        self.mean, self.std = channel_stats(self.data.train_images)
        self._eval = None

    def _require_data(self) -> ImageSet:
        if self.data is None:
            raise RuntimeError("CifarTask.setup() must run before the model or data are used")
        return self.data

    def _batch(self, images: Tensor, labels: Tensor, indices: Tensor, augment: bool) -> Batch:
        return {"images": images[indices], "labels": labels[indices], "indices": indices, "augment": augment}

    def train_stream(self, micro_batch: int, rank: int, world: int) -> TensorStream:
        data = self._require_data()
        indices = IndexStream(len(data.train_labels), micro_batch, self.run.seed, rank, world)
        return TensorStream(indices, lambda idx: self._batch(data.train_images, data.train_labels, idx,
                                                             self.config.augment))

    def eval_batches(self) -> list[Batch]:
        """The test split, ``eval_batch_size`` at a time (the first ``eval.batches`` when > 0), in one fixed
        shuffled order: test folders are sorted by class, so an unshuffled prefix would hold two classes only.
        The order is the same for every run seed, so runs are scored on the same images."""
        if self._eval is None:
            data = self._require_data()
            order = torch.randperm(len(data.test_labels), generator=torch.Generator().manual_seed(EVAL_ORDER_SEED))
            chunks = order.split(self.config.eval_batch_size)
            if self.run.eval.batches > 0:
                chunks = chunks[:self.run.eval.batches]
            self._eval = [self._batch(data.test_images, data.test_labels, c, False) for c in chunks]
        return list(self._eval)

    def calibration_batches(self, count: int) -> list[Batch]:
        """``count`` un-augmented training micro-batches: the same ones every call (a permutation seeded by the run
        seed), so every weight set is recalibrated on identical data."""
        data = self._require_data()
        n = len(data.train_labels)
        size = min(self.run.micro_batch, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.run.seed + 7_777_777))
        starts = [(i * size) % (n - size + 1) for i in range(count)]
        return [self._batch(data.train_images, data.train_labels, order[s:s + size], False) for s in starts]

    # -- model --------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        data = self._require_data()
        if self.config.model == _timm.PREACT:
            model = PreActResNet18(data.num_classes, self.config.width, data.train_images.shape[1])
        else:
            model = _timm.create(self.config.model, self._timm_args(data.num_classes, data.train_images.shape[1]))
        return model.to(memory_format=torch.channels_last) if self.config.channels_last else model

    def _timm_args(self, num_classes: int, in_chans: int) -> dict[str, Any]:
        return _timm.model_args(self.config.model, num_classes, in_chans, self.config.image_size,
                                self.config.patch_size)

    def export(self, weights: Mapping[str, Tensor], out: Path) -> None:
        """A timm model trained here: timm's Hub folder (``_timm.export_folder``). The suite's PreAct-ResNet-18: its
        weights, builder and arguments, and a README with the lines that load it
        (``module_folders.write_module_folder``). The classes and channels come from the weights (export runs without
        the data)."""
        if self.config.model == _timm.PREACT:
            args = preact_args(weights)
            write_module_folder(PreActResNet18, args, weights, out,
                                f"A lawa-suite image classifier: PreAct-ResNet-18 of width {args['width']}, "
                                f"{args['num_classes']} classes",
                                PREACT_NOTES.format(size=self.config.image_size, channels=args["in_channels"],
                                                    norm=NORMALISATION),
                                task=self.name, image_size=self.config.image_size, inputs=NORMALISATION)
            return
        classes, channels = _timm.classes_and_channels(self.config.model, weights)
        _timm.export_folder(self.config.model, self._timm_args(classes, channels), weights, out, NORMALISATION)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.config
        fused = torch.cuda.is_available()  # one kernel for every parameter on CUDA; the CPU keeps its foreach form
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=fused)
        if cfg.optimizer == SCHEDULE_FREE:  # (no Nesterov form; no fused kernel: foreach everywhere)
            return schedule_free.sgd(model.parameters(), lr, self.run.schedulefree, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)

    # -- forward ------------------------------------------------------------------------------------
    def normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The per-channel mean and std on ``device``, uploaded once (a blocking upload every micro-batch was a
        device sync each)."""
        if self._normalisation is None or self._normalisation[0].device != device:
            self._normalisation = (self.mean.to(device, non_blocking=True), self.std.to(device, non_blocking=True))
        return self._normalisation

    def inputs(self, images: Tensor, device: torch.device) -> Tensor:
        """uint8 images -> normalised float on ``device`` (the transfer stays uint8: 4x fewer bytes)."""
        x = images.to(device, non_blocking=True).float().div_(255.0)
        mean, std = self.normalisation(device)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def logits_and_targets(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        device = next(model.parameters()).device
        return model(self.inputs(batch["images"], device)), batch["labels"].to(device, non_blocking=True)

    def loss(self, model: nn.Module, batch: Batch, step: int) -> Tensor:
        if batch["augment"]:
            generator = batch_generator(self.run.seed, step, batch["indices"])
            batch = {**batch, "images": random_crop_flip(batch["images"], self.config.crop_padding, generator)}
        logits, targets = self.logits_and_targets(model, batch)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing)

    def summary(self, model: nn.Module) -> str:
        data = self._require_data()
        name = f"PreActResNet18 width {getattr(model, 'width', self.config.width)}" \
            if self.config.model == _timm.PREACT else f"timm {self.config.model}"
        return (f"{self.name}: {name}, {parameter_count(model):,} parameters; "
                f"{data.description}: {len(data.train_labels):,} train / {len(data.test_labels):,} test images, "
                f"{data.num_classes} classes, {'x'.join(map(str, data.train_images.shape[1:]))}")


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images in [0, 1] units, shaped ``(C, 1, 1)``.
    Chunked in float64, so CIFAR-10 never needs a 600 MB float copy."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for block in images.split(chunk):
        x = block.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)
