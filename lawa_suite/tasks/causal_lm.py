"""The Hugging Face causal-LM evaluation task (``hf-causal-lm``): held-out loss and perplexity of causal-LM folders
of any architecture on a text source, scored on the one path every task takes (``analysis.Evaluation``).

``suite eval`` and ``suite average ... eval=true`` select it when the checkpoints are Hugging Face model folders
(``checkpoint-N/``, ``step-N/``: ``config.json`` and the weights) whose ``config.json`` describes a causal LM that
``AutoModelForCausalLM`` builds (GPT-NeoX/Pythia, Llama, GPT-2, ...) and no suite run ``config.yaml`` lies above
them (``lawa_suite/causal_lm.py`` finds the folders and checks the keys). One model is built from ``model``'s
``config.json`` (in float32, on the evaluation's device) and every set of weights, raw or averaged, is fitted to it
the way ``from_pretrained`` reads a checkpoint (``fit_weights``) and scored by the ``perplexity`` evaluator on the
same batches. It scores; it does not train (``build_optimizer`` and ``train_stream`` refuse in one line).

The text (``data.path``: a file, or a folder of ``.txt``/``.md`` files, read as the ``text`` source reads them) is
held out as a whole: give text the models did not train on. It is tokenized once, documents joined by the
tokenizer's end-of-text token where it has one, and cut into fixed windows of ``seq_len + 1`` tokens starting every
``seq_len`` tokens (each token after the first is predicted once), evenly spaced when ``eval.batches`` limits them:
the windows of the ``gpt2`` task, with no randomness. The tokenizer is the folder's own (``tokenizer=auto``:
``AutoTokenizer`` from the folder, offline), or, chosen by name, tiktoken's ``gpt2`` or ``bytes``; a model folder
without tokenizer files is an error rather than a guess, since the wrong tokenizer gives a plausible-looking number.

Keys: the task's own ``model`` (the folder whose ``config.json`` and tokenizer are used), ``seq_len`` (0: the model's
maximum positions) and ``tokenizer`` (``auto``, ``gpt2``, ``bytes``); and the run keys ``data.path``,
``eval.batches`` (0 = every window), ``batch_size`` (windows per forward pass; the preset's 4) and
``mixed_precision`` (``no``, ``bf16``, ``fp16``: autocast; the weights stay float32).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.averagers.base import find_aliases
from lawa_suite.config import ConfigError, choice, require
from lawa_suite.data.text import BytesTokenizer, Gpt2Tokenizer, encode_all, text_source_files
from lawa_suite.errors import AnalysisError, DataUnavailable
from lawa_suite.files import first_line
from lawa_suite.tasks.base import Task
from lawa_suite.tasks.gpt2 import held_out_starts, windows

__all__ = ["NAME", "CausalLMConfig", "CausalLMTask", "check_causal_lm", "CONFIG_FILE", "TOKENIZER_FILES"]

NAME = "hf-causal-lm"
CONFIG_FILE = "config.json"  # a Hugging Face model folder's config (posthoc.modelfolder reads the same name)
# files that make a folder's tokenizer loadable by AutoTokenizer (a tokenizer_config.json alone is not enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
CAUSAL_ENDINGS = ("ForCausalLM", "LMHeadModel")  # class names of causal LMs: LlamaForCausalLM, GPT2LMHeadModel


@dataclass
class CausalLMConfig:
    """The task's own keys (what ``config.yaml`` of the evaluation records under ``hf-causal-lm``)."""
    model: str = ""                       # the folder whose config.json (and tokenizer) are used; set by the suite
    seq_len: int = 0                      # tokens each window predicts; 0 = the model's maximum positions
    tokenizer: str = choice("auto", "auto", "gpt2", "bytes")  # auto: the model folder's own tokenizer

    def __post_init__(self) -> None:
        require(self.seq_len >= 0, "seq_len", "an integer >= 1 (or 0: the model's maximum positions)", self.seq_len)


# -- the model folder ---------------------------------------------------------------------------------------
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



# -- the task -----------------------------------------------------------------------------------------------
@registry.tasks.register(NAME)
class CausalLMTask(Task):
    """Scores Hugging Face causal-LM folders by perplexity: ``settle`` checks the settings before any work,
    ``setup`` cuts the text into windows, ``fit_weights`` reads a checkpoint's tensors as ``from_pretrained`` does."""

    name = NAME
    Config = CausalLMConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {"eval": {"batch_size": 4, "averager": [], "progress": False}}
    default_preset = "eval"
    evaluator = "perplexity"
    data_sources = ("text",)  # only local text is scored here

    def __init__(self, config: CausalLMConfig, run: Any) -> None:
        super().__init__(config, run)
        self.folder = Path(config.model)
        self._model_config: dict[str, Any] | None = None
        self._eval: list[dict[str, Tensor]] | None = None
        self._renamed: dict[str, str] | None = None
        self.summary_line = ""

    @property
    def model_config(self) -> dict[str, Any]:
        if self._model_config is None:
            if not self.config.model:
                raise ConfigError(f"{NAME}.model: expected a Hugging Face causal-LM folder (config.json and "
                                  f"weights), got ''")
            self._model_config = check_causal_lm(self.folder)
        return self._model_config

    @property
    def architecture(self) -> str:
        return (self.model_config.get("architectures") or [self.model_config["model_type"]])[0]

    @property
    def weights_hint(self) -> str:  # type: ignore[override]
        return (f"every checkpoint must have the architecture of {self.folder / CONFIG_FILE}, from which the model "
                f"is built")

    def settle(self) -> None:
        """Check the settings before any work: a causal LM in ``model``, the text present, ``seq_len`` resolved
        against the model's maximum positions (0: that maximum), the tokenizer at hand."""
        self.model_config  # noqa: B018 - reading it checks the folder
        text_source_files(self.run.data.path)
        maximum = max_positions(self.folder)
        if self.config.seq_len == 0:
            if maximum is None:
                raise ConfigError(f"seq_len: {self.folder / CONFIG_FILE} gives no maximum positions; pass "
                                  f"seq_len=<tokens>")
            self.config.seq_len = maximum
        elif maximum is not None and self.config.seq_len > maximum:
            raise ConfigError(f"seq_len: expected at most the model's {maximum} positions, got {self.config.seq_len}")
        check_tokenizer(self.folder, self.config.tokenizer)

    def make_tokenizer(self) -> Any:
        choice_ = self.config.tokenizer
        return HfTokenizer(self.folder) if choice_ == "auto" else Gpt2Tokenizer() if choice_ == "gpt2" else \
            BytesTokenizer()

    def setup(self) -> None:
        self.settle()
        cfg, path = self.config, self.run.data.path
        tokenizer = self.make_tokenizer()
        documents = encode_all([f.read_text(encoding="utf-8", errors="replace") for f in text_source_files(path)],
                               tokenizer)
        if tokenizer.eot is not None:  # documents are separated by end-of-text, as nanoGPT's data preparation does
            documents = [np.append(ids, tokenizer.eot) if i < len(documents) - 1 else ids
                         for i, ids in enumerate(documents)]
        tokens = np.concatenate(documents).astype(np.int64)
        if len(tokens) < cfg.seq_len + 1:
            raise ConfigError(f"seq_len: {path} gives {len(tokens):,} {tokenizer.name} tokens, fewer than one window "
                              f"of seq_len+1={cfg.seq_len + 1}; expected seq_len <= {len(tokens) - 1}, or more text")
        vocab = int(self.model_config.get("vocab_size") or 0)
        if vocab and int(tokens.max()) >= vocab:
            raise DataUnavailable(f"tokenizer: {tokenizer.name} gives token ids up to {int(tokens.max())}, beyond the "
                                  f"model's vocabulary of {vocab} ({self.folder / CONFIG_FILE}); the model reads "
                                  f"another tokenizer's ids")
        self._eval = self._windows(tokens)
        count = sum(len(b["tokens"]) for b in self._eval)
        self.summary_line = (f"{self.architecture} ({self.model_config['model_type']}, config.json of "
                             f"{self.folder.name}), tokenizer {tokenizer.name}; {count:,} windows of {cfg.seq_len} "
                             f"tokens from {path} ({len(tokens):,} tokens)")

    def _windows(self, tokens: np.ndarray) -> list[dict[str, Tensor]]:
        size, limit = self.run.batch_size, self.run.eval.batches
        starts = held_out_starts(len(tokens), self.config.seq_len, limit * size if limit > 0 else None)
        chunks = np.array_split(starts, max(1, -(-len(starts) // size)))
        return [{"tokens": windows(tokens, chunk, self.config.seq_len + 1)} for chunk in chunks]

    def eval_batches(self) -> list[dict[str, Tensor]]:
        if self._eval is None:
            raise RuntimeError("CausalLMTask.setup() must run before the data is used")
        return list(self._eval)

    def calibration_batches(self, count: int) -> list[dict[str, Tensor]]:
        return []  # transformers' causal LMs have no BatchNorm: nothing to recalibrate

    def describe_scoring(self) -> str:
        return self.summary_line

    def _no_training(self) -> ConfigError:
        return ConfigError(f"task: {NAME} scores Hugging Face causal-LM folders (suite eval, suite average "
                           f"eval=true) and does not train; train a language model with task=gpt2")

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise self._no_training()

    def train_stream(self, micro_batch: int, rank: int, world: int) -> Any:
        raise self._no_training()

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = auto_config(self.folder)
        # float32 whatever the checkpoints' dtype (Pythia's are float16): averages are scored at full precision;
        # mixed_precision= autocasts the forward pass
        return AutoModelForCausalLM.from_config(config).float()

    def fit_weights(self, model: nn.Module, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
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
            for absent, present in ((alias, source), (source, alias)):
                if absent not in fitted and present in fitted:
                    fitted[absent] = fitted[present]
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

    def summary(self, model: nn.Module) -> str:
        return self.summary_line or super().summary(model)
