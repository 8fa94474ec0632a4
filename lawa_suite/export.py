"""Pick one set of weights out of a run (raw or averaged, from a checkpoint or a saved snapshot) and hand
it to the task, which writes it in its domain's standard format (``Task.export``).

Where the weights come from:

- a run folder: its newest valid checkpoint;
- a checkpoint folder (``checkpoints/step-NNNNNNNN``): the raw weights, or with ``weights=<averager>`` that
  averager's average, rebuilt from the state the checkpoint holds;
- a ``.safetensors`` file (a ``trajectory/`` snapshot, a post-hoc derived checkpoint): the weights in it.

The task and its settings come from the ``config.yaml`` of the run the path lies in (or ``config=``).

``out`` is never an input, nor a folder holding one (``rundir.claim_out``). The export marks the folder it writes
with ``suite-output.json`` (``files.mark_output``: the command, the source, the weights): that mark is how a later
``--force`` knows the folder is an earlier export, the only kind of folder it replaces. Its files get the modes a plain
``open()`` gives (``files.plain_modes``): safetensors writes its files 0600.

A model of the suite's own (not a timm, Hugging Face or diffusers one: the image task's PreAct-ResNet-18) is
exported as a folder of its weights (``model.safetensors``), the builder that makes the network and its arguments
(``config.json``), and a README with the lines that load it (``write_module_folder``; ``load_model`` reads it).
"""

from __future__ import annotations

import importlib
import json
import shutil
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lawa_suite import checkpoints as ckpt
from lawa_suite import registry
from lawa_suite.config import ResolvedConfig
from lawa_suite.rundir import claim_out, find_run_config, load_resolved
from lawa_suite.errors import CheckpointError, ConfigError
from lawa_suite.files import commit_folder, mark_output, plain_modes, staged_folder
from lawa_suite.sharded_checkpoints import is_sharded_checkpoint, read_whole

__all__ = ["select_weights", "export", "MODULE_FORMAT", "write_module_folder", "load_model"]


def _checkpoint_folder(path: Path) -> Path:
    if (path / ckpt.MANIFEST).is_file():
        return path
    found = ckpt.latest_valid(path / "checkpoints", warn=lambda message: None)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder (manifest.json) nor a run folder "
                              f"holding a valid checkpoint in checkpoints/")
    return found.path


def select_weights(path: Path, weights_name: str, cfg: ResolvedConfig) -> tuple[dict[str, Tensor], str]:
    """``(state_dict, description)`` of the weights named ``weights_name`` ("raw" or an averager of the run) found
    at ``path``: a weights file, a checkpoint folder, or a run folder (its newest valid checkpoint)."""
    from safetensors.torch import load_file

    if path.is_file():
        if weights_name != "raw":
            raise ConfigError(f"weights: {path} is a single weights file; weights=raw is the only choice, "
                              f"got {weights_name!r}")
        return load_file(str(path)), str(path)
    folder = _checkpoint_folder(path)
    problems = ckpt.verify(folder)
    if problems:
        raise CheckpointError(problems[0])
    sharded = is_sharded_checkpoint(folder)  # distributed=fsdp: every rank's shards, assembled whole here
    raw, saved = read_whole(folder) if sharded else (None, None)
    if weights_name == "raw":
        return (raw if sharded else load_file(str(folder / "model.safetensors"))), f"{folder} (raw)"
    if not sharded:
        saved = ckpt.read_state(folder, "state")["averagers"]
    if weights_name not in saved:
        raise ConfigError(f"weights: {folder} holds raw, {', '.join(sorted(saved)) or '(no averagers)'}; "
                          f"got {weights_name!r}")
    if weights_name not in cfg.averagers:
        raise ConfigError(f"weights: averager {weights_name!r} is not in the run's config.yaml")
    averager = cfg.build_averagers()[weights_name]
    averager.load_state_dict(saved[weights_name])
    average = averager.average()
    if average is None:
        raise ConfigError(f"weights: averager {weights_name!r} was not ready yet at {folder.name} (no average to "
                          f"export)")
    return average, f"{folder} ({weights_name})"


def export(path: Path, out: Path, weights_name: str = "raw", config: Path | None = None, force: bool = False) -> str:
    """Export the chosen weights to ``out``; returns a one-line description of what was written."""
    path, out = Path(path), Path(out)
    if not path.exists():
        raise ConfigError(f"path: {path} does not exist")
    config = Path(config) if config else find_run_config(path)
    claim_out(out, "suite export", [path, config], force)
    cfg = load_resolved(config)
    state, source = select_weights(path, weights_name, cfg)
    task = registry.tasks.get(cfg.run.task)(cfg.task, cfg.run)
    # Written next to the target and renamed into place: a failed export leaves nothing half-written.
    staging = staged_folder(out)
    try:
        task.export(state, staging)
        mark_output(staging, "suite export", source=path, weights=weights_name, config=config)
        plain_modes(staging)
        commit_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return f"exported {source} as a {cfg.run.task} model to {out}"


# -- a model of the suite's own --------------------------------------------------------------------------------
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
