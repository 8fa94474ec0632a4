"""Mixed precision must not materialise an fp32 copy of the full logits (issue 28): gpt2's training loss under bf16
autocast, forward and backward, recorded op by op.

Measured (V=50,257, 512 rows, CPU bf16 autocast, torch 2.14): ``F.cross_entropy(logits.float(), targets)`` makes
four fp32 [rows, V] tensors (the cast, log_softmax's output kept for backward, nll_loss's and log_softmax's
gradients), 98 MiB each; the step's peak live memory is 354 MiB, 157 MiB with the loss taken over row chunks under
activation checkpointing. Dropping ``.float()`` alone changes nothing: autocast runs cross_entropy in fp32. So the loss
is taken in row chunks under checkpointing (``tasks/gpt2.chunked_cross_entropy``); these tests make the chunks small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lawa_suite import registry
from lawa_suite.tasks import gpt2
from lawa_suite.config import resolve


class FullLogitsInFp32(TorchDispatchMode):
    """Records every op that makes an fp32 tensor with as many elements as the full logits."""

    def __init__(self, elements: int) -> None:
        super().__init__()
        self.elements, self.makers = elements, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.elements:
                self.makers.append(str(func))
        return out


def gpt2_loss_under_bf16(record: FullLogitsInFp32 | None = None) -> tuple[int, list[str]]:
    cfg = resolve(["task=gpt2", "preset=tiny"])
    task = registry.tasks.get("gpt2")(cfg.task, cfg.run)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.train_stream(4, 0, 1).next_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = task.logits_and_targets(model, batch)
    record = FullLogitsInFp32(logits.numel())
    with torch.autocast("cpu", dtype=torch.bfloat16), record:
        loss = task.loss(model, batch, 0)
    with record:
        loss.backward()
    return logits.numel(), record.makers


def test_the_recorder_sees_an_fp32_copy_of_the_logits():
    # negative control: the recorder must see the cast a plain .float() makes
    logits = torch.zeros(8, 16, dtype=torch.bfloat16)
    record = FullLogitsInFp32(logits.numel())
    with record:
        logits.float()
    assert record.makers == ["aten._to_copy.default"]


def test_gpt2_bf16_loss_makes_no_fp32_copy_of_the_full_logits(monkeypatch):
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ROWS", 64)  # the tiny preset's 4 x 32 rows: two chunks
    elements, makers = gpt2_loss_under_bf16()
    assert elements == 128 * 256
    assert makers == [], f"fp32 tensors of the full logits' size made by {makers}"


def test_negative_control_one_chunk_is_the_full_logits(monkeypatch):
    # with every row in one chunk the fp32 copies are of the full logits again: the test above can fail
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ROWS", 128)
    _, makers = gpt2_loss_under_bf16()
    assert "aten._to_copy.default" in makers and "aten._log_softmax.default" in makers


def test_the_chunked_loss_and_gradient_equal_the_whole_one_to_fp32_rounding(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(100, 37, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (100,))
    whole = F.cross_entropy(logits, targets)
    (expected,) = torch.autograd.grad(whole, logits)
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ROWS", 16)  # 7 chunks, the last short
    chunked = gpt2.chunked_cross_entropy(logits, targets)
    (got,) = torch.autograd.grad(chunked, logits)
    assert chunked.dtype == torch.float32 and got.dtype == torch.float64
    torch.testing.assert_close(chunked.double(), whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)


def test_fp32_logits_are_taken_in_one_piece(monkeypatch):
    # no mixed precision, no cast copy to save: the recompute of a checkpointed chunk would only cost time
    torch.manual_seed(0)
    logits = torch.randn(100, 37, requires_grad=True)
    targets = torch.randint(0, 37, (100,))
    monkeypatch.setattr(gpt2, "LOSS_CHUNK_ROWS", 16)
    assert torch.equal(gpt2.chunked_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    chunk_sums = sum(F.cross_entropy(rows, wanted, reduction="sum")
                     for rows, wanted in zip(logits.split(16), targets.split(16))) / 100
    assert not torch.equal(chunk_sums, F.cross_entropy(logits, targets))  # so the check above tells the two apart
