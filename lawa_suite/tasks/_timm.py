"""timm models for the image task (``cifar.model=<timm name>``): built with ``timm.create_model(...,
pretrained=False)`` for the data's classes and channels, adapted to small inputs where timm's own arguments allow
it (``img_size`` for models with a fixed input size, such as ViTs and DeiTs, and ``patch_size`` when asked), and
exported as timm's own Hub folder (``config.json`` + ``model.safetensors``, via ``timm.models.save_for_hf``) that
``timm.create_model("local-dir:<folder>", pretrained=True)`` loads. Only timm's arguments are used, never edits of
the built network, so what timm loads back is exactly what was trained.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lawa_suite.errors import ConfigError

__all__ = ["PREACT", "check_model_name", "has_patches", "model_args", "create", "classes_and_channels", "export_folder"]

PREACT = "preact_resnet18"   # the suite's own network (the LAWA paper's CIFAR study), not a timm model


def check_model_name(name: str) -> None:
    """A one-line error unless ``name`` is the suite's PreAct-ResNet-18 or a model timm knows."""
    if name == PREACT:
        return
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, [PREACT, *timm.list_models()], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"model: expected {PREACT!r} (the default) or a timm model name (timm.list_models()), "
                      f"got {name!r}{hint}")


def has_patches(name: str) -> bool:
    """Whether timm builds ``name`` for a fixed input size (ViT-like models: patches and position embeddings)."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def model_args(name: str, num_classes: int, in_chans: int, image_size: int, patch_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` arguments for ``name`` on this data: classes and channels always; the input size
    for models built for a fixed one (their position embeddings depend on it); the patch size when set."""
    args: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if has_patches(name):
        args["img_size"] = image_size
    if patch_size:
        args["patch_size"] = patch_size
    return args


def create(name: str, args: Mapping[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **args)
    except TypeError as exc:  # an argument this model family does not take (patch_size for a ResNet)
        extra = ", ".join(sorted(set(args) - {"num_classes", "in_chans"}))
        raise ConfigError(f"model: timm's {name!r} does not take {extra} ({exc}); leave cifar.patch_size at 0 for "
                          f"models without patches") from None


def classes_and_channels(name: str, weights: Mapping[str, Tensor]) -> tuple[int, int]:
    """The classes and input channels a model's weights were built for, read at the classifier and the first
    convolution timm names in the model's pretrained config."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    try:
        return weights[f"{cfg.classifier}.weight"].shape[0], weights[f"{cfg.first_conv}.weight"].shape[1]
    except (AttributeError, KeyError):
        raise ConfigError(f"model: these weights are not timm's {name!r} (no {getattr(cfg, 'classifier', '?')}.weight "
                          f"or {getattr(cfg, 'first_conv', '?')}.weight)") from None


def export_folder(name: str, args: Mapping[str, Any], weights: Mapping[str, Tensor], out: Path,
                  normalisation: str) -> None:
    """timm's Hub folder for ``weights``; a README says how to load it and how inputs were normalised."""
    from timm.models import save_for_hf

    with torch.device("meta"):
        model = create(name, args)
    model.load_state_dict(dict(weights), strict=True, assign=True)
    extra = {k: v for k, v in args.items() if k not in ("num_classes", "in_chans")}
    save_for_hf(model, str(out), model_args={**extra, "in_chans": args["in_chans"]}, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    (out / "README.md").write_text(README.format(name=name, classes=config["num_classes"], norm=normalisation,
                                                 size=args.get("img_size", "any")))


README = """# A lawa-suite image classifier: timm `{name}`, {classes} classes

```python
import timm
model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()
# or: timm.create_model("{name}", pretrained=True, num_classes={classes},
#         pretrained_cfg_overlay=dict(file="<this folder>/model.safetensors", num_classes={classes}), <model_args>)
```

`config.json` holds the `model_args` it was built with. Input size: {size}. Inputs: images scaled to [0, 1], then
{norm}.
"""
