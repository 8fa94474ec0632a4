"""gpt2's training step with its loss over checkpointed row chunks (``tasks/gpt2.chunked_cross_entropy``, issue 28)
against the loss in one piece (``F.cross_entropy(logits.float(), targets)``, before), side by side on the CPU.

Both variants train their own copy of one model on the same batches; they take turns one optimizer step at a time
(forward, loss, backward, AdamW), each step timed by the thread's CPU clock, and the ratio is the median of the
pairs, so the machine's load of the moment cancels. Shapes: the ``cpu`` preset (bytes, V=256, 1,024 rows a step:
one chunk) and the same model on GPT-2's BPE vocabulary (V=50,257; ``--rows`` 2,048 is two chunks of 1,024).

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache .venv/bin/python benchmarks/gpt2_loss_chunks.py --steps 12

Result (2 vCPUs shared with other jobs, load average 6.6 before, 6.1 after; one torch thread; torch 2.15 CPU):

| shape | rows | whole ms/step | chunked ms/step | chunked / whole (median of pairs) | final loss diff |
|---|---|---|---|---|---|
| cpu preset (bytes, V=256) | 1024 | 76.6 | 77.2 | 1.009 | 0.0e+00 |
| cpu preset model, BPE V=50,257 | 2048 | 1776.4 | 2329.4 | 1.307 | 9.5e-07 |
| cpu preset model, BPE V=50,257, bf16 autocast | 2048 | 1507.8 | 2027.9 | 1.395 | 9.5e-07 |

The ``cpu`` preset's step is unchanged (one chunk of a 256-wide vocabulary). Where the vocabulary dominates the step
(a 128-wide model with V=50,257), checkpointing's price shows: the backward recomputes each chunk's fp32 cast and
log-softmax, about half the loss's own work again, for at most one chunk's fp32 logits alive at once (the memory
``tests/test_mixed_precision_logits.py`` measures: 354 MiB peak in one piece, 157 MiB in chunks, at 512 rows).
Since then (c120232) fp32 logits are taken in one piece, as no cast copies them: the second row's price is gone by
construction and only mixed precision (the third) pays it, for its memory. On a GPU, where the loss is a smaller part
of a GPT-2 step, the price is not measured yet.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lawa_suite import registry
from lawa_suite.config import resolve
from lawa_suite.tasks import gpt2


def whole_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)  # the loss before issue 28


def setting(words: list[str], rows: int):
    cfg = resolve(["task=gpt2", "preset=cpu", f"batch_size={rows // 64}", *words])
    task = registry.tasks.get("gpt2")(cfg.task, cfg.run)
    task.setup()
    torch.manual_seed(0)
    return task, task.build_model(), task.train_stream(rows // 64, 0, 1)


def side_by_side(words: list[str], rows: int, steps: int, bf16: bool) -> dict[str, float]:
    task, model, stream = setting(words, rows)
    variants = {"chunked": gpt2.chunked_cross_entropy, "whole": whole_loss}
    models = {name: copy.deepcopy(model) for name in variants}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for step in range(steps + 1):  # the first step of each warms up and is not counted
        batch = stream.next_batch()
        for name, loss_of in (variants.items() if step % 2 else reversed(list(variants.items()))):
            started = time.thread_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, targets = task.logits_and_targets(models[name], batch)
                loss = loss_of(logits, targets)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                times[name].append(time.thread_time() - started)
            losses[name] = loss.item()
    ratio = statistics.median(c / w for c, w in zip(times["chunked"], times["whole"]))
    return {"whole_ms": 1e3 * statistics.median(times["whole"]),
            "chunked_ms": 1e3 * statistics.median(times["chunked"]),
            "ratio": ratio, "loss_difference": abs(losses["chunked"] - losses["whole"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each variant")
    parser.add_argument("--rows", type=int, default=2048, help="rows a step for the BPE vocabulary")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("cpu preset (bytes, V=256)", [], 1024, False),
             ("cpu preset model, BPE V=50,257", ["gpt2.tokenizer=gpt2"], args.rows, False),
             ("cpu preset model, BPE V=50,257, bf16 autocast", ["gpt2.tokenizer=gpt2"], args.rows, True)]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.steps} steps each; LOSS_CHUNK_ROWS={gpt2.LOSS_CHUNK_ROWS}\n")
    print("| shape | rows | whole ms/step | chunked ms/step | chunked / whole (median of pairs) | final loss diff |")
    print("|---|---|---|---|---|---|")
    for label, words, rows, bf16 in cases:
        r = side_by_side(words, rows, args.steps, bf16)
        print(f"| {label} | {rows} | {r['whole_ms']:.1f} | {r['chunked_ms']:.1f} | {r['ratio']:.3f} | "
              f"{r['loss_difference']:.1e} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
