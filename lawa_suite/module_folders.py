"""A model of the suite's own, as a folder anyone can load: its weights (``model.safetensors``), the builder that
makes the network and its keyword arguments (``config.json``), and a README with the lines that load it.

Only the image task's PreAct-ResNet-18 needs it (timm, Hugging Face and diffusers models have folder formats of their
own). It sits below the tasks, which write such folders in ``Task.export``; ``suite export`` (``export.py``) picks the
weights and re-exports ``load_model``.
"""

from __future__ import annotations

import importlib
import json
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lawa_suite.errors import CheckpointError, ConfigError

__all__ = ["MODULE_FORMAT", "write_module_folder", "load_model"]


MODULE_FORMAT = "lawa-suite-module/1"


def _builder_path(builder: Callable[..., nn.Module]) -> str:
    path = f"{builder.__module__}.{builder.__qualname__}"
    if "<" in path or builder.__module__ == "__main__":  # a local class or a script's: nothing could import it
        raise ValueError(f"{path}: a model folder needs a builder importable by name")
    return path


def write_module_folder(builder: Callable[..., nn.Module], args: Mapping[str, Any], weights: Mapping[str, Tensor],
                        out: Path, title: str, notes: str = "", **details: Any) -> None:
    """``model.safetensors`` (``weights``), ``config.json`` (the builder's import path, its keyword ``args`` and
    ``details``) and ``README.md`` (``title``, the lines that load the model, then ``notes``, one paragraph) in the
    folder ``out``.
    Weights that do not fit ``builder(**args)`` exactly are refused before anything is written."""
    from safetensors.torch import save_file

    path = _builder_path(builder)
    with torch.device("meta"):  # the network's shapes, without initialising weights about to be replaced
        model = builder(**args)
    try:
        model.load_state_dict(dict(weights), strict=True, assign=True)
    except RuntimeError as exc:  # "Error(s) in loading state_dict for X:" then a line per kind of problem
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"weights do not fit {builder.__qualname__}({_call_args(args)}): "
                              f"{'; '.join(lines[1:3]) or lines[0]}") from None
    # copies: names that share one tensor (an averager hands aliases back so) are refused by safetensors
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": MODULE_FORMAT})
    config = {"format": MODULE_FORMAT, "builder": path, "args": dict(args), **details}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    module, name = path.rsplit(".", 1)
    text = MODULE_README.format(title=title, module=module, name=name, args=_call_args(args),
                                notes="\n" + textwrap.fill(notes, 116) + "\n" if notes else "")
    (out / "README.md").write_text(text, encoding="utf-8")


def _call_args(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def load_model(folder: str | Path) -> nn.Module:
    """The model a ``write_module_folder`` folder holds, in eval mode: the README's lines, read from its
    config.json (the builder, a network class of lawa_suite, is imported by name)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("format") != MODULE_FORMAT:
        raise ConfigError(f"{folder}: not a lawa-suite model folder (config.json format {config.get('format')!r}, "
                          f"expected {MODULE_FORMAT!r})")
    # the builder is called as config.json names it: only the suite's own network classes, never any callable a
    # folder from elsewhere might name ("os.system")
    path = str(config.get("builder", ""))
    module, _, name = path.rpartition(".")
    builder: Any = None
    if module.split(".")[0] == "lawa_suite":
        try:
            builder = getattr(importlib.import_module(module), name, None)
        except ImportError:
            pass
    if not (isinstance(builder, type) and issubclass(builder, nn.Module) and builder.__module__ == module):
        raise ConfigError(f"{folder}: config.json's builder {path!r} is not a network class of lawa_suite")
    model = builder(**config["args"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


MODULE_README = """# {title}

```python
from safetensors.torch import load_file
from {module} import {name}
model = {name}({args}).eval()
model.load_state_dict(load_file("<this folder>/model.safetensors"))
```

Or, the same in one call: `from lawa_suite.export import load_model; model = load_model("<this folder>")`.
`config.json` holds the builder and its arguments; the weights are `model.safetensors`. Loading needs lawa-suite
installed (the network is its own code, not a timm or Hugging Face model).
{notes}"""
