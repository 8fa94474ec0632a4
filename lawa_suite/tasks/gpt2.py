"""GPT-2 language modelling (the LAWA paper's main domain), scored by held-out loss and perplexity.

The model is ``transformers``' ``GPT2LMHeadModel`` built from a ``GPT2Config`` (nothing downloaded): sdpa
attention, input embedding tied to the output head, and the GPT-2 initialisation (normal(0, 0.02), residual
projections scaled by 1/sqrt(2 * layers)) that the class applies itself. The ``small`` / ``medium`` / ``large``
presets are the paper's nanoGPT-2 runs (Sanyal et al., COLM 2024, code ``sanyalsunny111/Early_Weight_Avg``):
OpenWebText, sequence 1024, 128 sequences (131,072 tokens) per optimizer step, AdamW (0.9, 0.95), weight
decay 0.1, clipping 1.0, 2K warm-up and cosine decay over 70K steps to the code's ``min_lr``, bf16 autocast
on a GPU, attention scaled by the inverse layer index; peak learning rates 6e-3 / 3e-3 / 2e-3 (the tuned
baseline is ``lr=6e-4``). One difference: HF's GPT-2 keeps biases where nanoGPT's config turns them off.

Training reads random windows of ``seq_len + 1`` tokens (nanoGPT's sampler); window offsets of micro-batch
``b`` come from a generator seeded by ``(seed, b)`` alone, so a resumed run reads the same windows. The
held-out windows are fixed: evenly spaced, non-overlapping windows of the val split, the same for raw
weights and every averager at every evaluation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lawa_suite import registry
from lawa_suite.config import SCHEDULE_FREE, ConfigError, choice, require
from lawa_suite.data.text import (VOCAB_SIZES, TokenSplits, get_tokenizer, gpt2_vocab_files, load_tokens,
                                  tiktoken_cache_dir)
from lawa_suite.errors import CheckpointError, DataUnavailable
from lawa_suite.tasks import schedule_free
from lawa_suite.tasks.base import Task, parameter_count

Batch = dict[str, Tensor]  # {"tokens": int64 (B, seq_len + 1)}


@dataclass
class Gpt2Config:
    n_layer: int = 12                 # transformer blocks (GPT-2 small: 12)
    n_head: int = 12                  # attention heads
    n_embd: int = 768                 # width
    seq_len: int = 1024               # tokens a window predicts (the model's context length)
    tokenizer: str = choice("gpt2", "gpt2", "bytes")
    dropout: float = 0.0              # embedding, attention and residual dropout (0 for pre-training, as nanoGPT)
    scale_attn_by_inverse_layer_idx: bool = False  # the LAWA paper's nanoGPT-2 runs set it
    attention: str = choice("sdpa", "sdpa", "eager")
    optimizer: str = choice("adamw", "adamw", "schedulefree")  # schedulefree: schedule-free AdamW, same betas
    weight_decay: float = 0.1         # AdamW, on matrices and embeddings only (not biases or LayerNorm)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    val_fraction: float = 0.1         # data=text/embedded: the tail of each file held out for evaluation
    eval_batch_size: int = 8          # held-out windows per evaluation batch

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "seq_len", "eval_batch_size"):
            require(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        require(self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head={self.n_head}", self.n_embd)
        require(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)", self.dropout)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(0.0 <= self.beta1 < 1.0, "beta1", "a number in [0, 1)", self.beta1)
        require(self.beta1 > 0 or self.optimizer != SCHEDULE_FREE, "beta1",
                "a number in (0, 1) with optimizer=schedulefree (its eval weights divide by it)", self.beta1)
        require(0.0 <= self.beta2 < 1.0, "beta2", "a number in [0, 1)", self.beta2)
        require(self.eps > 0, "eps", "a number > 0", self.eps)
        require(0.0 < self.val_fraction < 1.0, "val_fraction", "a fraction in (0, 1)", self.val_fraction)


def _paper(n_layer: int, n_head: int, n_embd: int, lr: float, min_lr: float, lawa_nu: int,
           grad_accum: int = 8) -> dict[str, Any]:
    """A nanoGPT-2 run of the LAWA paper (``train_{small,medium,large}.py`` in its code)."""
    return {"data.source": "openwebtext", "gpt2.tokenizer": "gpt2", "gpt2.n_layer": n_layer, "gpt2.n_head": n_head,
            "gpt2.n_embd": n_embd, "gpt2.seq_len": 1024, "gpt2.scale_attn_by_inverse_layer_idx": True,
            # 128 sequences x 1024 tokens = 131,072 tokens a step, as 8 micro-batches of 16 on one GPU; grad_accum
            # is divided by the number of processes (nanoGPT's rule): on 8 GPUs one micro-batch of 16 each
            "batch_size": 128, "grad_accum": grad_accum, "steps": 70_000, "warmup": 2_000, "schedule": "cosine",
            "lr": lr, "min_lr": min_lr, "grad_clip": 1.0, "mixed_precision": "bf16",
            "eval.every": 1_000, "eval.batches": 25, "gpt2.eval_batch_size": 8, "checkpoint.every": 1_000,
            # the code's averaging: LAWA over k=5 checkpoints saved every eval_interval steps, EMA 0.9 every step,
            # SWA every 10 steps from 75% of the run ("SWA late")
            "lawa.k": 5, "lawa.nu": lawa_nu, "ema.decay": 0.9, "swa.start": 0.75, "swa.every": 10}


#: rows of logits whose loss is taken at once (``chunked_cross_entropy``): at GPT-2's vocabulary, 196 MiB in fp32
LOSS_CHUNK_ROWS = 1024


def _chunk_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")  # fp32 softmax: bf16 logits lose the loss


def chunked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (rows, vocab) in fp32, taken over ``LOSS_CHUNK_ROWS`` rows at a time under
    activation checkpointing, so at most one chunk's fp32 logits exist at once, forward or backward (issue 28):
    in one piece, bf16 autocast made four fp32 copies of the full logits (the cast, log_softmax's output kept for
    backward, both gradients; 354 MiB peak against 157 MiB at V=50,257 x 512 rows). The backward recomputes each
    chunk's softmax (no RNG in it: nothing to preserve); the logits' gradient is one bf16 tensor (split's backward).
    That recompute costs 1.3-1.4x a CPU step at V=50,257 (benchmarks/gpt2_loss_chunks.py), so fp32 logits, which
    mixed precision did not make and which no cast copies, and logits of one chunk are taken in one piece."""
    from torch.utils.checkpoint import checkpoint

    if logits.dtype == torch.float32 or len(logits) <= LOSS_CHUNK_ROWS:
        return F.cross_entropy(logits.float(), targets)  # .float(): a no-op for fp32, and bf16 would lose the loss

    sums = [checkpoint(_chunk_loss_sum, rows, wanted, use_reentrant=False, preserve_rng_state=False)
            for rows, wanted in zip(logits.split(LOSS_CHUNK_ROWS), targets.split(LOSS_CHUNK_ROWS))]
    return torch.stack(sums).sum() / targets.numel()


CAUSAL_SDPA = "lawa-suite-causal-sdpa"


def causal_sdpa() -> str:
    """transformers' own sdpa attention under a name its mask builder does not know, so it builds no mask and
    attention is causal by SDPA's ``is_causal`` (flash kernels allowed). The suite's sequences are whole windows
    (no padding, no packing), and the mask builder reads its position ids on the host to look for packed sequences:
    a device synchronisation every forward pass (transformers 5). Set on the built model, not in exported configs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    return CAUSAL_SDPA


@registry.tasks.register("gpt2")
class Gpt2Task(Task):
    """Causal language modelling with GPT-2, scored by mean held-out cross-entropy and perplexity."""

    name = "gpt2"
    Config = Gpt2Config
    evaluator = "perplexity"
    data_sources = ("embedded", "text", "openwebtext")
    default_preset = "cpu"
    presets: dict[str, dict[str, Any]] = {
        # seconds: a 2-layer, 32-wide model on bytes of the embedded corpus; 16 steps fill LAWA windows k*nu <= 16
        "tiny": {"steps": 16, "lr": 3e-3, "batch_size": 8, "warmup": 2, "schedule": "constant",
                 "gpt2.tokenizer": "bytes", "gpt2.n_layer": 2, "gpt2.n_head": 2, "gpt2.n_embd": 32,
                 "gpt2.seq_len": 32, "gpt2.eval_batch_size": 8, "eval.every": 4, "eval.batches": 2,
                 "lawa.k": 2, "lawa.nu": 2, "ema.decay": 0.9, "swa.start": 0.5},
        # a 4-layer, 128-wide GPT-2 on the embedded Tiny Shakespeare, 1,024 tokens a step, at a high learning rate
        # (the paper's regime; lr=1e-3 is the tenth). Bytes (0.8M parameters): about a minute on 2 CPU cores;
        # tokenizer=gpt2 (7.2M parameters, 6.4M of them the 50,257-row embedding): about 10 minutes, nearly all of it
        # the output layer. LAWA k=5 snapshots 10 steps apart, EMA 0.98 (both ~50 steps), SWA over the last quarter.
        "cpu": {"steps": 600, "lr": 1e-2, "batch_size": 16, "warmup": 30, "schedule": "cosine", "min_lr": 0.1,
                "grad_clip": 1.0, "gpt2.tokenizer": "bytes", "gpt2.n_layer": 4, "gpt2.n_head": 4,
                "gpt2.n_embd": 128, "gpt2.seq_len": 64, "gpt2.eval_batch_size": 16, "eval.every": 50,
                "eval.batches": 8, "lawa.k": 5, "lawa.nu": 10, "ema.decay": 0.98, "swa.start": 0.75},
        "small": _paper(12, 12, 768, lr=6e-3, min_lr=0.1, lawa_nu=200),       # 124M
        "medium": _paper(24, 16, 1024, lr=3e-3, min_lr=0.1, lawa_nu=2_000),   # 355M
        # 774M: micro-batches of 8 (16 need ~96 GiB on one GPU by `suite run ... --dry-run`)
        "large": _paper(36, 20, 1280, lr=2e-3, min_lr=0.005, lawa_nu=1_000, grad_accum=16),
    }

    def __init__(self, config: Gpt2Config, run: Any) -> None:
        super().__init__(config, run)
        self.tokens: TokenSplits | None = None
        self._eval: list[Batch] | None = None

    # -- data ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        if self.run.data.source == "openwebtext" and self.config.tokenizer != "gpt2":
            raise ConfigError(f"gpt2.tokenizer: data=openwebtext is stored as gpt2 tokens; expected gpt2, "
                              f"got {self.config.tokenizer!r}")
        tokenizer = get_tokenizer(self.config.tokenizer)
        data = self.run.data
        self.tokens = load_tokens(data.source, data.path, data.cache, tokenizer, self.config.val_fraction)
        window = self.config.seq_len + 1
        for split in ("train", "val"):
            size = len(getattr(self.tokens, split))
            if size < window:
                raise ConfigError(f"gpt2.seq_len: the {split} split has {size:,} tokens, fewer than one window of "
                                  f"seq_len+1={window}; expected seq_len <= {size - 1}")
        self._eval = None

    def _require_tokens(self) -> TokenSplits:
        if self.tokens is None:
            raise RuntimeError("Gpt2Task.setup() must run before the data is used")
        return self.tokens

    def train_stream(self, micro_batch: int, rank: int, world: int) -> "WindowStream":
        """Random windows of the train split. A micro-batch of more tokens than the split holds is refused here,
        before the run writes anything (its window offsets alone would take 8 bytes each: a huge ``batch_size``
        was a MemoryError, or the kernel's kill, at the first step)."""
        train, window = self._require_tokens().train, self.config.seq_len + 1
        if micro_batch * window > len(train):
            most = len(train) // window
            raise ConfigError(f"batch_size: a micro-batch of {micro_batch} sequences of seq_len+1={window} tokens "
                              f"(batch_size / grad_accum) needs {micro_batch * window:,} tokens, more than the "
                              f"training split holds ({len(train):,} tokens); expected at most {most:,} sequences, "
                              f"or a larger grad_accum")
        return WindowStream(train, window, micro_batch, self.run.seed, rank, world)

    def eval_batches(self) -> list[Batch]:
        if self._eval is None:
            val = self._require_tokens().val
            count = self.run.eval.batches * self.config.eval_batch_size if self.run.eval.batches > 0 else None
            starts = held_out_starts(len(val), self.config.seq_len, count)
            self._eval = [{"tokens": windows(val, chunk, self.config.seq_len + 1)}
                          for chunk in np.array_split(starts, max(1, -(-len(starts) // self.config.eval_batch_size)))]
        return list(self._eval)

    def calibration_batches(self, count: int) -> list[Batch]:
        """GPT-2 has no BatchNorm; the loop never asks, but the batches would be the first ``count`` train windows."""
        train, size = self._require_tokens().train, self.config.seq_len + 1
        starts = np.arange(count * self.run.micro_batch, dtype=np.int64) * size % (len(train) - size + 1)
        return [{"tokens": windows(train, chunk, size)} for chunk in np.array_split(starts, max(1, count))]

    # -- model --------------------------------------------------------------------------------------
    def hf_config(self) -> Any:
        from transformers import GPT2Config

        cfg = self.config
        hf = GPT2Config(vocab_size=VOCAB_SIZES[cfg.tokenizer], n_positions=cfg.seq_len, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
                        tie_word_embeddings=True, use_cache=False,
                        bos_token_id=VOCAB_SIZES[cfg.tokenizer] - 1, eos_token_id=VOCAB_SIZES[cfg.tokenizer] - 1)
        hf._attn_implementation = cfg.attention
        return hf

    def build_model(self) -> nn.Module:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(self.hf_config())  # applies GPT-2's init from the (seeded) global RNG
        if self.config.attention == "sdpa":
            model.config._attn_implementation = causal_sdpa()
        return model

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """AdamW (or its schedule-free form); weight decay on matrices and embeddings, none on biases and LayerNorm
        (nanoGPT's groups)."""
        cfg = self.config
        params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == SCHEDULE_FREE:
            return schedule_free.adamw(groups, lr, self.run.schedulefree, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        # fused on CUDA (one kernel for every parameter, nanoGPT's choice); on the CPU the foreach form the CPU
        # reference was measured with
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 fused=torch.cuda.is_available())

    # -- forward ------------------------------------------------------------------------------------
    def logits_and_targets(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """Next-token logits ``(B * seq_len, vocab)`` and targets ``(B * seq_len,)``."""
        device = next(model.parameters()).device
        tokens = batch["tokens"].to(device, non_blocking=True)
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        return logits.flatten(0, 1), tokens[:, 1:].flatten()

    def loss(self, model: nn.Module, batch: Batch, step: int) -> Tensor:
        logits, targets = self.logits_and_targets(model, batch)
        return chunked_cross_entropy(logits, targets)

    def summary(self, model: nn.Module) -> str:
        cfg, tokens = self.config, self._require_tokens()
        return (f"{self.name}: GPT-2 {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, context "
                f"{cfg.seq_len}, {parameter_count(model):,} parameters; {tokens.description}: "
                f"{len(tokens.train):,} train / {len(tokens.val):,} val tokens")

    # -- export -------------------------------------------------------------------------------------
    def export(self, weights: Mapping[str, Tensor], out: Path) -> None:
        """A Hugging Face model folder (config.json + model.safetensors) for ``AutoModelForCausalLM``, with what
        encodes its text: the GPT-2 tokenizer files (vocab.json, merges.txt) for tokenizer=gpt2, a README saying
        how to encode bytes for tokenizer=bytes (no Hugging Face tokenizer maps byte i to token i)."""
        from transformers import GPT2LMHeadModel

        if self.config.tokenizer == "gpt2":
            files = gpt2_tokenizer_files()  # before the model is written: a missing vocabulary writes nothing
        with torch.device("meta"):
            model = GPT2LMHeadModel(self.hf_config())
        # weights saved by save_pretrained (a Hugging Face checkpoint, or an average of such) leave the tied
        # lm_head out; tie_weights() restores it. Anything else missing or extra is an error.
        result = model.load_state_dict(dict(weights), strict=False, assign=True)
        missing = set(result.missing_keys) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        if missing or result.unexpected_keys:
            raise CheckpointError(f"weights do not fit this run's GPT-2 ({model.config.n_layer} layers, "
                                  f"{model.config.n_embd} wide): missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(result.unexpected_keys)[:3]}")
        model.tie_weights()
        model.save_pretrained(out, safe_serialization=True)
        if self.config.tokenizer == "gpt2":
            write_gpt2_tokenizer(files, out)
        (out / "README.md").write_text(TOKENIZER_NOTES[self.config.tokenizer].format(ctx=self.config.seq_len))


TOKENIZER_NOTES = {
    "bytes": """# A lawa-suite GPT-2 trained on UTF-8 bytes

Token ids are the bytes of the UTF-8 text: token `i` is byte `i` (vocabulary 256, no special tokens), so no
Hugging Face tokenizer file comes with it. Context: {ctx} tokens.

```python
from transformers import AutoModelForCausalLM
import torch
model = AutoModelForCausalLM.from_pretrained("<this folder>")
ids = torch.tensor([list("To be, or not".encode("utf-8"))])
new = min(50, model.config.n_positions - ids.shape[1])  # no further than its context
out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
```
""",
    "gpt2": """# A lawa-suite GPT-2 trained on GPT-2 BPE tokens

The tokenizer files (vocab.json, merges.txt) are GPT-2's, the ones tiktoken's `gpt2` encoding reads; end of
text is token 50256. Context: {ctx} tokens. `AutoTokenizer.from_pretrained("<this folder>")` loads them.
""",
}


def gpt2_tokenizer_files() -> dict[str, Path]:
    """tiktoken's GPT-2 BPE files, fetched into its cache if they are not there yet (which needs the network
    once); offline and absent, one line naming them and where they go."""
    files = gpt2_vocab_files()
    if not all(p.is_file() for p in files.values()):
        get_tokenizer("gpt2")  # downloads into tiktoken's cache, or raises the one-line DataUnavailable
    files = gpt2_vocab_files()
    if not all(p.is_file() for p in files.values()):  # tiktoken loaded them without caching them where we look
        raise DataUnavailable(f"export: GPT-2's vocabulary files {', '.join(p.name for p in files.values())} are "
                              f"not in {tiktoken_cache_dir()}; set TIKTOKEN_CACHE_DIR to the folder tiktoken "
                              f"cached them in when this run trained")
    return files


def write_gpt2_tokenizer(files: Mapping[str, Path], out: Path) -> None:
    """tiktoken's GPT-2 BPE files as Hugging Face's vocab.json / merges.txt (they are the same files)."""
    shutil.copyfile(files["encoder.json"], out / "vocab.json")
    shutil.copyfile(files["vocab.bpe"], out / "merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=1))


# -- windows --------------------------------------------------------------------------------------------
def windows(tokens: np.ndarray, starts: np.ndarray, size: int) -> Tensor:
    """int64 ``(len(starts), size)``: the windows ``tokens[s:s+size]``."""
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + size], dtype=np.int64) for s in starts]))


def held_out_starts(length: int, seq_len: int, count: int | None) -> np.ndarray:
    """Starts of ``count`` evenly spaced, non-overlapping windows of ``seq_len + 1`` tokens (all when None)."""
    available = (length - 1) // seq_len
    chosen = np.arange(available) if count is None or count >= available else \
        np.linspace(0, available - 1, count).round().astype(np.int64)
    return chosen.astype(np.int64) * seq_len


class WindowStream:
    """Endless training micro-batches of random windows; batch ``b`` depends only on ``(seed, b)``."""

    def __init__(self, tokens: np.ndarray, size: int, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        if micro_batch % world:
            raise ValueError(f"a micro-batch of {micro_batch} windows does not split evenly over {world} processes")
        self.tokens, self.size, self.micro_batch = tokens, size, micro_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.batches = 0

    def next_batch(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.batches])
        starts = rng.integers(0, len(self.tokens) - self.size + 1, size=self.micro_batch)[self.rank::self.world]
        self.batches += 1
        return {"tokens": windows(self.tokens, starts, self.size)}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
