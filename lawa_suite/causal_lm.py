"""Scoring Hugging Face causal-LM folders of any architecture: held-out loss and perplexity on a text source.

``suite eval`` and ``suite average ... eval=true`` score this way when the checkpoints are Hugging Face model folders
(``checkpoint-N/``, ``step-N/``: ``config.json`` and the weights) whose ``config.json`` describes a causal LM that
``AutoModelForCausalLM`` builds (GPT-NeoX/Pythia, Llama, GPT-2, ...) and no suite run ``config.yaml`` lies above
them. One model is built from the newest folder's ``config.json`` (in float32, on the evaluation's device) and every
set of weights, raw or averaged, is copied into it and scored by the ``perplexity`` evaluator on the same batches.

The text (``data.path``: a file, or a folder of ``.txt``/``.md`` files, read as the ``text`` source reads them) is
held out as a whole: give text the models did not train on. It is tokenized once, documents joined by the
tokenizer's end-of-text token where it has one, and cut into fixed windows of ``seq_len + 1`` tokens starting every
``seq_len`` tokens (each token after the first is predicted once), evenly spaced when ``eval.batches`` limits them:
the windows of the ``gpt2`` task, with no randomness. The tokenizer is the folder's own (``tokenizer=auto``:
``AutoTokenizer`` from the folder, offline), or, chosen by name, tiktoken's ``gpt2`` or ``bytes``; a model folder
without tokenizer files is an error rather than a guess, since the wrong tokenizer gives a plausible-looking number.

Keys (``key=value`` words): ``data.path``, ``eval.batches`` (0 = every window), ``seq_len`` (default: the model's
maximum positions), ``batch_size`` (windows per forward pass), ``tokenizer`` (``auto``, ``gpt2``, ``bytes``),
``mixed_precision`` (``no``, ``bf16``, ``fp16``: autocast; the weights stay float32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from lawa_suite.averagers.base import find_aliases
from lawa_suite.config import build_section, choice, require
from lawa_suite.data.text import BytesTokenizer, Gpt2Tokenizer, encode_all, text_source_files
from lawa_suite.errors import AnalysisError, ConfigError, DataUnavailable
from lawa_suite.files import first_line
from lawa_suite.posthoc.discover import discover
from lawa_suite.posthoc.modelfolder import CONFIG_FILE, model_folders

__all__ = ["CausalLMConfig", "CausalLMTask", "causal_lm_folder", "causal_lm_config", "KEYS"]

# files that make a folder's tokenizer loadable by AutoTokenizer (a tokenizer_config.json alone is not enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
CAUSAL_ENDINGS = ("ForCausalLM", "LMHeadModel")  # class names of causal LMs: LlamaForCausalLM, GPT2LMHeadModel


@dataclass
class TextData:
    source: str = choice("text", "text")  # `data=`: only local text is scored here
    path: str = ""                        # `data.path=`: a text file or a folder of them


@dataclass
class Windows:
    batches: int = 0                      # `eval.batches=`: at most this many batches of windows; 0 = every window

    def __post_init__(self) -> None:
        require(self.batches >= 0, "eval.batches", "an integer >= 0 (0 = every window of the text)", self.batches)


@dataclass
class CausalLMConfig:
    """How Hugging Face causal-LM folders are scored (what ``config.yaml`` of the evaluation records)."""
    model: str = ""                       # the folder whose config.json (and tokenizer) are used; set by the suite
    seq_len: int = 0                      # tokens each window predicts; 0 = the model's maximum positions
    batch_size: int = 4                   # windows per forward pass
    tokenizer: str = choice("auto", "auto", "gpt2", "bytes")  # auto: the model folder's own tokenizer
    mixed_precision: str = choice("no", "no", "bf16", "fp16")
    data: TextData = field(default_factory=TextData)
    eval: Windows = field(default_factory=Windows)

    def __post_init__(self) -> None:
        require(self.seq_len >= 0, "seq_len", "an integer >= 1 (or 0: the model's maximum positions)", self.seq_len)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create({"scorer": "hf-causal-lm", **dataclasses.asdict(self)}),
                                 sort_keys=False)


KEYS = ("data.path", "eval.batches", "seq_len", "batch_size", "tokenizer", "mixed_precision", "data.source")


# -- which folders --------------------------------------------------------------------------------------------
def causal_lm_folder(near: str | os.PathLike[str]) -> Path | None:
    """The model folder whose ``config.json`` describes the checkpoints at ``near`` (itself when it is a model
    folder; else the newest of the Hugging Face model folders it holds), checked to be a causal LM; None when
    ``near`` holds no model folders. A model folder of another kind is a one-line AnalysisError naming it."""
    near = Path(near)
    if (near / CONFIG_FILE).is_file():
        folder = near
    else:
        found = discover(near, allow_torch_load=True)  # only lists files: nothing is loaded here
        folders = model_folders(found.snapshots) if found.snapshots else None
        if folders is None:
            return None
        folder = folders.folders[max(folders.folders)]
    check_causal_lm(folder)
    return folder


def check_causal_lm(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder`` as a dict, when it is a causal LM that AutoModelForCausalLM builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError):
        raise AnalysisError(f"{path}: unreadable (expected the JSON config of a Hugging Face model)") from None
    model_type, architectures = config.get("model_type"), list(config.get("architectures") or [])
    found = ", ".join(architectures) or config.get("_class_name") or "no architectures"
    if model_type not in CAUSAL:
        what = f"model_type {model_type!r}" if model_type else "no model_type (not a transformers model)"
        raise AnalysisError(f"{path}: {found} ({what}) is not a causal LM that AutoModelForCausalLM builds; "
                            f"scoring by perplexity needs one (e.g. gpt2, gpt_neox, llama), or pass task=<name>")
    if architectures and not any(a == CAUSAL[model_type] or a.endswith(CAUSAL_ENDINGS) for a in architectures):
        raise AnalysisError(f"{path}: {found} (model_type {model_type!r}) has no causal language-model head; "
                            f"scoring by perplexity needs one such as {CAUSAL[model_type]}")
    return config


def causal_lm_config(folder: Path, pairs: Mapping[str, str]) -> CausalLMConfig:
    """The scoring settings from ``key=value`` pairs, checked before any work: known keys and values, the text
    present, the tokenizer at hand, ``seq_len`` resolved against the model's maximum positions."""
    from lawa_suite.config import parse_value

    unknown = sorted(k for k in pairs if k not in KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a key for scoring Hugging Face causal-LM folders; known: "
                          f"{', '.join(KEYS[:-1])} (or task=<name> to score with a suite task)")
    values = {k: parse_value(k, v) for k, v in pairs.items()}
    cfg = build_section("", CausalLMConfig, {**values, "model": str(folder)})
    text_source_files(cfg.data.path)
    maximum = max_positions(folder)
    if cfg.seq_len == 0:
        if maximum is None:
            raise ConfigError(f"seq_len: {folder / CONFIG_FILE} gives no maximum positions; pass seq_len=<tokens>")
        cfg.seq_len = maximum
    elif maximum is not None and cfg.seq_len > maximum:
        raise ConfigError(f"seq_len: expected at most the model's {maximum} positions, got {cfg.seq_len}")
    check_tokenizer(folder, cfg.tokenizer)
    return cfg


def auto_config(folder: Path) -> Any:
    """transformers' config object of the folder (offline); one line when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; each becomes one line
        raise AnalysisError(f"{folder / CONFIG_FILE}: transformers could not read it ({type(exc).__name__}: "
                            f"{first_line(exc)[:160]})") from None


def max_positions(folder: Path) -> int | None:
    config = auto_config(folder)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return None


def check_tokenizer(folder: Path, choice_: str) -> None:
    """The tokenizer is at hand: the folder's files for ``tokenizer=auto``, tiktoken's cached vocabulary for
    ``gpt2`` (the one-line errors come before any averaging or scoring)."""
    if choice_ == "gpt2":
        Gpt2Tokenizer()
    elif choice_ == "auto" and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise DataUnavailable(f"tokenizer: {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                              f"copy the model's tokenizer there, or pass tokenizer=gpt2 (tiktoken's GPT-2 BPE) or "
                              f"tokenizer=bytes if the model was trained on those")


def saved_names(model: nn.Module, architecture: str) -> dict[str, str]:
    """``{name in a checkpoint: name in model.state_dict()}`` where they differ. transformers 5 renames some tensors
    between the two (GPT-NeoX's ``lm_head`` is saved as ``embed_out``, as Pythia's checkpoints have it); the names
    ``save_pretrained`` would write are read off the model itself. A tensor it converts rather than renames (fused
    or split on loading) is a one-line error: those checkpoints are not scored here."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 saves tensors under the model's own names
        return {}
    state = model.state_dict()
    own = {id(tensor): name for name, tensor in state.items()}
    saved = revert_weight_conversion(model, dict(state))
    converted = sorted(name for name, tensor in saved.items() if id(tensor) not in own)
    if converted:
        raise AnalysisError(f"{architecture}: transformers converts its checkpoint tensors on loading (e.g. "
                            f"{converted[0]}), not only renames them; scoring its checkpoints is not supported here")
    return {name: own[id(tensor)] for name, tensor in saved.items() if own[id(tensor)] != name}


def ignored_keys(model: nn.Module) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    """``(unexpected key to drop?, missing key to keep from the model?)``, by the rules ``from_pretrained`` applies:
    the class's ``_keys_to_ignore_on_load_*`` patterns; a buffer the model no longer saves (non-persistent now);
    per-layer rotary ``inv_freq`` and ``position_ids`` of old checkpoints where the model has such buffers."""
    buffers = {name for name, _ in model.named_buffers()}
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.append(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.append(r"(^|\.)position_ids$")
    unexpected = [re.compile(p) for p in patterns]
    missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    return (lambda key: key in buffers or any(p.search(key) for p in unexpected),
            lambda key: any(p.search(key) for p in missing))


# -- the task-like scorer ---------------------------------------------------------------------------------------
class HfTokenizer:
    """A folder's ``AutoTokenizer`` (offline) with the suite's ``Tokenizer`` interface."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; each becomes the one-line fix
            raise DataUnavailable(f"tokenizer: could not load the tokenizer in {folder} offline ({type(exc).__name__}: "
                                  f"{first_line(exc)[:160]}); pass tokenizer=gpt2 or tokenizer=bytes") from None
        self.tokenizer.model_max_length = sys.maxsize  # whole documents are encoded, then cut into windows
        self.name = f"{type(self.tokenizer).__name__} of {folder.name}"
        self.vocab_size = len(self.tokenizer)
        self.eot = self.tokenizer.eos_token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


class CausalLMTask:
    """What ``analysis.Evaluation`` and the ``perplexity`` evaluator need of a task, for a Hugging Face causal LM:
    ``setup``, ``build_model``, ``eval_batches``, ``logits_and_targets``, ``loss``, and ``fit_weights`` (a
    checkpoint's tensors as the model's state_dict, the way ``from_pretrained`` reads them)."""

    evaluator = "perplexity"

    def __init__(self, config: CausalLMConfig) -> None:
        self.config = config
        self.folder = Path(config.model)
        self.model_config = check_causal_lm(self.folder)
        self.architecture = (self.model_config.get("architectures") or [self.model_config["model_type"]])[0]
        self.name = f"the causal LM {self.architecture} of {self.folder.name}"
        self.weights_hint = (f"every checkpoint must have the architecture of {self.folder / CONFIG_FILE}, from which "
                             f"the model is built")
        self._eval: list[dict[str, Tensor]] | None = None
        self._renamed: dict[str, str] | None = None
        self.summary_line = ""

    def make_tokenizer(self) -> Any:
        choice_ = self.config.tokenizer
        return HfTokenizer(self.folder) if choice_ == "auto" else Gpt2Tokenizer() if choice_ == "gpt2" else \
            BytesTokenizer()

    def setup(self) -> None:
        cfg = self.config
        tokenizer = self.make_tokenizer()
        files = text_source_files(cfg.data.path)
        documents = encode_all([f.read_text(encoding="utf-8", errors="replace") for f in files], tokenizer)
        if tokenizer.eot is not None:  # documents are separated by end-of-text, as nanoGPT's data preparation does
            documents = [np.append(ids, tokenizer.eot) if i < len(documents) - 1 else ids
                         for i, ids in enumerate(documents)]
        tokens = np.concatenate(documents).astype(np.int64)
        if len(tokens) < cfg.seq_len + 1:
            raise ConfigError(f"seq_len: {cfg.data.path} gives {len(tokens):,} {tokenizer.name} tokens, fewer than one "
                              f"window of seq_len+1={cfg.seq_len + 1}; expected seq_len <= {len(tokens) - 1}, or more "
                              f"text")
        vocab = int(self.model_config.get("vocab_size") or 0)
        if vocab and int(tokens.max()) >= vocab:
            raise DataUnavailable(f"tokenizer: {tokenizer.name} gives token ids up to {int(tokens.max())}, beyond the "
                                  f"model's vocabulary of {vocab} ({self.folder / CONFIG_FILE}); the model reads "
                                  f"another tokenizer's ids")
        self._eval = self._windows(tokens)
        count = sum(len(b["tokens"]) for b in self._eval)
        self.summary_line = (f"{self.architecture} ({self.model_config['model_type']}, config.json of "
                             f"{self.folder.name}), tokenizer {tokenizer.name}; {count:,} windows of {cfg.seq_len} "
                             f"tokens from {cfg.data.path} ({len(tokens):,} tokens)")

    def _windows(self, tokens: np.ndarray) -> list[dict[str, Tensor]]:
        from lawa_suite.tasks.gpt2 import held_out_starts, windows

        cfg = self.config
        count = cfg.eval.batches * cfg.batch_size if cfg.eval.batches > 0 else None
        starts = held_out_starts(len(tokens), cfg.seq_len, count)
        chunks = np.array_split(starts, max(1, -(-len(starts) // cfg.batch_size)))
        return [{"tokens": windows(tokens, chunk, cfg.seq_len + 1)} for chunk in chunks]

    def eval_batches(self) -> list[dict[str, Tensor]]:
        if self._eval is None:
            raise RuntimeError("CausalLMTask.setup() must run before the data is used")
        return list(self._eval)

    def calibration_batches(self, count: int) -> list[dict[str, Tensor]]:
        return []  # transformers' causal LMs have no BatchNorm: nothing to recalibrate

    def describe(self) -> str:
        return self.summary_line

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = auto_config(self.folder)
        # float32 whatever the checkpoints' dtype (Pythia's are float16): averages are scored at full precision;
        # mixed_precision= autocasts the forward pass
        return AutoModelForCausalLM.from_config(config).float()

    def fit_weights(self, model: nn.Module, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``weights`` as ``model``'s state_dict, as ``from_pretrained`` reads a checkpoint: a tied tensor saved once
        (GPT-2's ``lm_head`` left out by ``save_pretrained``) fills its twin, and keys the class ignores on loading
        (old checkpoints' attention masks, rotary ``inv_freq``) are dropped, and names transformers changed are
        mapped (``saved_names``). Anything else that does not fit is left for the caller's one-line error."""
        state = model.state_dict()
        if self._renamed is None:
            self._renamed = saved_names(model, self.architecture)
        unexpected, missing = ignored_keys(model)
        fitted = {self._renamed.get(k, k): v for k, v in weights.items()}
        fitted = {k: v for k, v in fitted.items() if k in state or not unexpected(k)}
        fitted.update({k: v for k, v in state.items() if k not in fitted and missing(k)})
        for alias, source in find_aliases(state):
            if alias in fitted and source in fitted and not torch.equal(fitted[alias], fitted[source]):
                raise AnalysisError(f"{alias} and {source} differ in the weights, but {self.architecture} ties them "
                                    f"(tie_word_embeddings in {self.folder / CONFIG_FILE})")
            for missing, present in ((alias, source), (source, alias)):
                if missing not in fitted and present in fitted:
                    fitted[missing] = fitted[present]
        return fitted

    # -- forward ----------------------------------------------------------------------------------------------
    def logits_and_targets(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Next-token logits ``(B * seq_len, vocab)`` and targets ``(B * seq_len,)``."""
        device = next(model.parameters()).device
        tokens = batch["tokens"].to(device, non_blocking=True)
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        return logits.flatten(0, 1), tokens[:, 1:].flatten()

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        logits, targets = self.logits_and_targets(model, batch)
        return F.cross_entropy(logits.float(), targets)
