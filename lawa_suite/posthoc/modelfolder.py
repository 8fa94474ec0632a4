"""Model folders in, model folders out: when every input is a Hugging Face model folder (transformers'
``checkpoint-N/`` with ``config.json`` and ``model.safetensors``, its shards, or ``pytorch_model.bin``; a diffusers
model folder with ``diffusion_pytorch_model.*``), each derived checkpoint is written as a folder of the same kind,
``step-N/``, that ``from_pretrained`` loads: the averaged weights as one (unsharded) safetensors file of the
input's name, and the small files that describe the model (``config.json``, generation config, tokenizer,
scheduler or preprocessor configs) carried over from the newest input the output averages. Training state
(optimizer, lr scheduler, RNG, trainer state) is not carried: it does not belong to the averaged weights. The
tensors keep the input's names, so weights tied in the input (GPT-2's ``lm_head`` left out by ``save_pretrained``)
stay tied in the output.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lawa_suite.posthoc.discover import Snapshot

__all__ = ["ModelFolders", "model_folders", "carried_files", "copy_carried"]

CONFIG_FILE = "config.json"
# the weights file an output folder gets, by the input's weights file (torch files become safetensors)
OUTPUT_WEIGHTS = {"model.safetensors": "model.safetensors", "pytorch_model.bin": "model.safetensors",
                  "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.safetensors",
                  "diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors"}
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")  # configs, vocabularies, remote code
NOT_CARRIED = {"trainer_state.json"}  # the Trainer's bookkeeping: it describes the run, not these weights


@dataclass(frozen=True)
class ModelFolders:
    """How outputs are written when the inputs are model folders: the weights file's name in each output folder,
    and each input step's folder (whose describing files an output carries over)."""
    weights_name: str
    folders: dict[int, Path]

    def output_path(self, job_folder: Path, step: int) -> Path:
        return job_folder / f"step-{step:08d}" / self.weights_name


def _weights_name(snapshot: Snapshot) -> str | None:
    name = snapshot.index.name.removesuffix(".index.json") if snapshot.index is not None else snapshot.files[0].name
    return OUTPUT_WEIGHTS.get(name)


def model_folders(snapshots: Sequence[Snapshot]) -> ModelFolders | None:
    """``ModelFolders`` when every input is a model folder with a ``config.json`` and all share one weights kind;
    None otherwise (outputs are then plain safetensors files, as the inputs were)."""
    names, folders = set(), {}
    for s in snapshots:
        folder = (s.index or s.files[0]).parent
        name = _weights_name(s)
        if name is None or not (folder / CONFIG_FILE).is_file():
            return None
        names.add(name)
        folders[s.step] = folder
    if len(names) != 1:
        return None
    return ModelFolders(names.pop(), folders)


def carried_files(folder: Path) -> list[Path]:
    """The files of a model folder that describe the model (configs, tokenizer, scheduler), in name order;
    weights, shard indexes and training state are left out."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(CARRIED_SUFFIXES)
                  and p.name not in NOT_CARRIED and not p.name.endswith(".index.json"))


def copy_carried(source: Path, target: Path) -> list[str]:
    """Copy ``carried_files(source)`` into ``target``; returns their names (for the manifest)."""
    copied = []
    for file in carried_files(source):
        shutil.copyfile(file, target / file.name)
        copied.append(file.name)
    return copied
