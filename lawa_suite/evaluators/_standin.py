"""The offline stand-in feature extractor for FID, registered with torch-fidelity as ``standin``.

Kept apart from ``fid.py`` because importing torch-fidelity (and torchvision under it) takes seconds, and the
registry imports every evaluator module for ``suite list``; this private module is imported only when an
extractor is created.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

STANDIN_SEED = 20_240_601  # fixes the stand-in's random weights: the same features on every machine


class StandinFeatures(FeatureExtractorBase):
    """A stand-in for Inception where its weights cannot be had: three 3x3 conv + ReLU layers with fixed
    random weights (He-normal, seeded), on the image resized to 32x32, global-average-pooled to 64 features.

    Random conv features are a known, if weaker, basis for Fréchet distances (Naeem et al. 2020): they
    separate real images from noise and blur by a wide margin and rank sample sets consistently, but the
    numbers mean nothing outside this suite. Deterministic: the weights depend only on ``STANDIN_SEED``.
    """

    SIZE = 32

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(STANDIN_SEED)
        widths = (3, 32, 64, 64)
        self.convs = nn.ModuleList()
        for cin, cout in zip(widths, widths[1:]):
            conv = nn.Conv2d(cin, cout, 3, padding=1, device="meta")  # no default init: global RNG stays untouched
            conv.to_empty(device="cpu")
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("64",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "64"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, StandinFeatures.SIZE, StandinFeatures.SIZE, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"standin features: expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        x = F.interpolate(x.float(), size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False,
                          antialias=True) / 127.5 - 1.0
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2)
        return (x.mean(dim=(2, 3)) * 10.0,)  # x10: distances in a readable range (noise ~400 on digits)

