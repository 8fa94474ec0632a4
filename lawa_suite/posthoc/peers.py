"""Checkpoints other tools write: where the weights lie in a loaded torch checkpoint, and the names they wrap.

A training checkpoint is rarely a bare state_dict: nanoGPT saves ``{"model": sd, "optimizer": ..., "iter_num": ...}``,
timm ``{"state_dict": sd, "state_dict_ema": sd_ema, "args": ...}``, Lightning ``{"state_dict": sd, "optimizer_states":
[...], ...}``, plainLM ``{"state_dict": sd, ...}``. Rather than a list of known keys, the weights are found by shape:
every nested mapping (string keys, at most ``DEPTH`` levels down) whose values are all tensors, at least one of them
floating point, is a candidate. That skips an optimizer's state (keyed by parameter index), RNG states (bytes) and
hyperparameters (no tensors). One candidate is taken; several (timm's weights and their EMA) need ``key=``.

Names: ``module.`` (DDP, DataParallel) and ``_orig_mod.`` (torch.compile), in either order, are stripped when every
key has them, as timm's ``clean_state_dict`` does. Any other prefix is stripped only when asked (``prefix=model``):
a Hugging Face model saved with tied embeddings has every key under ``model.``, and that is its real name. With
``prefix=``, keys without it are left out (a LightningModule's other attributes) and the log says which.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lawa_suite.errors import ConfigError

__all__ = ["WeightsAt", "NoWeights", "weights_at", "find_weights", "rename", "load_torch", "torch_error",
           "WRAPPERS"]

WRAPPERS = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
DEPTH = 4                             # how deep candidates are looked for: {"model": {"ema": sd}} is 2
SAFE_GLOBALS = [argparse.Namespace]   # timm's train.py saves its args (as timm's own loader allows)
TOP = "(the top level)"


@dataclass(frozen=True)
class WeightsAt:
    """Where the weights are inside each checkpoint: ``key`` names the mapping that holds them in a torch checkpoint
    (None: the only candidate there is), ``prefix`` a prefix to strip from every key (None: only wrappers')."""
    key: str | None = None
    prefix: str | None = None

    def given(self) -> dict[str, str]:
        """The words that were given, for a manifest (and for reading the same inputs again)."""
        return {k: v for k, v in (("key", self.key), ("prefix", self.prefix)) if v is not None}


def weights_at(pairs: MutableMapping[str, str]) -> WeightsAt:
    """Take ``key=`` and ``prefix=`` out of a command's words."""
    found = {}
    for word, what in (("key", "the mapping that holds the weights in a torch checkpoint, e.g. key=model"),
                       ("prefix", "the prefix to strip from every weight name, e.g. prefix=model")):
        if word in pairs:
            value = pairs.pop(word).strip()
            if not value or value == ".":
                raise ConfigError(f"{word}: expected {what}, got {value!r}")
            found[word] = value
    prefix = found.get("prefix")
    return WeightsAt(found.get("key"), prefix if prefix is None or prefix.endswith(".") else prefix + ".")


class NoWeights(ValueError):
    """The weights of a torch checkpoint cannot be told apart; the message says what it holds and what to pass."""


def _candidates(obj: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Mapping[str, Tensor]]]:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return
    values = list(obj.values())
    if all(isinstance(v, Tensor) for v in values):
        if any(v.is_floating_point() for v in values):
            yield path, obj
        return
    if len(path) < DEPTH:
        for k, v in obj.items():
            yield from _candidates(v, (*path, k))


def _label(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else TOP


def _describe(found: list[tuple[tuple[str, ...], Mapping[str, Tensor]]]) -> str:
    return ", ".join(f"{_label(p)} ({len(m)} tensors)" for p, m in found)


def find_weights(obj: Any, key: str | None) -> tuple[str, Mapping[str, Tensor]]:
    """``(where, state_dict)`` in a loaded torch checkpoint; ``where`` is "" for a bare state_dict. Raises NoWeights."""
    found = list(_candidates(obj))
    if key is not None:
        for path, mapping in found:
            if _label(path) == key:
                return key, mapping
        held = "it holds no mapping of name -> tensor" if _lookup(obj, key) is not None else "no such key"
        where = f"the weights can be under {_describe(found)}" if found else "no mapping of name -> tensor is in it"
        raise NoWeights(f"key={key}: {held}; {where}")
    if len(found) == 1:
        path, mapping = found[0]
        return ".".join(path), mapping
    if not found:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        inside = f" (its keys: {', '.join(map(str, keys))})" if keys else f" (it holds a {type(obj).__name__})"
        raise NoWeights(f"no mapping of name -> tensor (a state_dict) in it{inside}")
    raise NoWeights(f"weights under {len(found)} keys: {_describe(found)}; pass key=<name> to choose one "
                    f"(e.g. key={_label(found[0][0])})")


def _lookup(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def rename(names: Iterable[str], prefix: str | None) -> tuple[dict[str, str], list[str], str | None]:
    """``(new name -> stored name, what was done, problem)``: wrappers stripped where every key has them, then
    ``prefix`` (keys without it left out), then wrappers again (``module.model._orig_mod.``)."""
    done: list[str] = []
    current = _strip_wrappers({n: n for n in names}, done)
    if prefix is not None:
        kept = {n[len(prefix):]: old for n, old in current.items() if n.startswith(prefix) and len(n) > len(prefix)}
        if not kept:
            heads = sorted({n.partition(".")[0] + "." for n in current if "." in n})
            return {}, done, (f"prefix={prefix.rstrip('.')}: no key starts with {prefix!r}"
                              + (f" (they start with {', '.join(heads[:6])})" if heads else ""))
        left = sorted(current.keys() - {prefix + n for n in kept})
        done.append(f"only the keys under {prefix!r}, stripped of it" +
                    (f" ({len(left)} other key(s) left out: {_short(left)})" if left else ""))
        current = _strip_wrappers(kept, done)
    return current, done, None


def _strip_wrappers(current: dict[str, str], done: list[str]) -> dict[str, str]:
    stripped = ""
    while current:
        wrapper = next((w for w in WRAPPERS if all(n.startswith(w) and len(n) > len(w) for n in current)), None)
        if wrapper is None:
            break
        current = {n[len(wrapper):]: old for n, old in current.items()}
        stripped += wrapper
    if stripped:
        done.append(f"every key stripped of {stripped!r} (the prefix DDP and torch.compile wrappers add)")
    return current


def _short(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def lightning_hint(obj: Any, names: Iterable[str]) -> str | None:
    """A LightningModule's weights are named after its attributes (``model.``); stripping that is the user's choice
    (prefix=), which this names when every key shares one."""
    heads = {n.partition(".")[0] for n in names}
    if isinstance(obj, Mapping) and "pytorch-lightning_version" in obj and len(heads) == 1:
        head = heads.pop()
        return f"every key starts with {head + '.'!r} (the LightningModule's attribute); prefix={head} strips it"
    return None


def load_torch(file: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy format: cannot be mapped


_REFUSED = re.compile(r"WeightsUnpickler error:\s*([^\n]*?)\s*(?:Please use|\n|$)")


def torch_error(exc: BaseException) -> str:
    """One line that keeps the cause of a ``torch.load`` failure (torch's own message spans many lines, the cause
    is in the middle, and its advice, to allowlist the class or drop weights_only, is not ours to give)."""
    text = str(exc)
    refused = _REFUSED.search(text) if isinstance(exc, pickle.UnpicklingError) else None
    if refused and refused.group(1).startswith("Unsupported global"):
        return (f"torch.load(weights_only=True) refuses it: {' '.join(refused.group(1).split())} It pickles objects "
                f"beyond tensors and plain containers; save the weights alone (torch.save(model.state_dict())) or "
                f"convert them to safetensors")
    if refused:  # "Unsupported operand 110": bytes no torch.save writes
        return f"not a torch.save file, or a damaged one (torch.load(weights_only=True): {refused.group(1).strip()})"
    folded = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    if not re.search(r"[A-Za-z]{3}", folded):  # KeyError(101) from a file that is no pickle at all: name the error
        folded = f"{type(exc).__name__}: {folded}".rstrip(": ")
    return (folded[:400] + "...") if len(folded) > 400 else folded
