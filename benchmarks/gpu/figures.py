"""The GPU check's figures: model FLOPs utilisation, the GPUs' bf16 peaks, nanoGPT's published figure, the rows each
part's results become, and the one Markdown table they make. Pure functions of the parts' JSON: tested on the CPU."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared GPT-2 shapes
from _shapes import gpt2_small_shapes  # noqa: E402

# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), matched in this order against
# torch.cuda.get_device_name(): the first name contained in it wins, so "H100 PCIe" comes before "H100".
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
)

# nanoGPT's README (karpathy/nanoGPT, Dec 29 2022): "cutting down iteration time from ~250ms / iter to 135ms / iter"
# with torch.compile, on its A100 40GB. The README does not restate the batch; train.py's micro-batch of the time was
# 12 sequences of 1024 tokens, taken here as one iteration. Its model: GPT-2 124M with the vocabulary padded to
# 50304, whose get_num_params() (no position embedding) is 123.69M; its estimate_mfu divides by 312 TFLOPS.
NANOGPT_MS_PER_ITER = 135.0
NANOGPT_TOKENS_PER_ITER = 12 * 1024
NANOGPT_PEAK_FLOPS = 312e12
GOAL_MFU = 0.40           # issue 20: GPT-2 124M at 40% MFU or more in bf16
GOAL_EMA = 1.10           # EMA update within 1.10x of the foreach lerp floor
GOAL_SWA = 1.15           # issue 9's target for SWA, kept beside it
GOAL_OFF_STREAM = 0.05    # a snapshot "off the training stream": under 5% of a device-to-host copy's stream time
GOAL_SYNCS = 1            # host synchronisations in a plain training step (the loop's one read a step)
STANDIN_TIME = "not measured through the CUDA stand-in (host time is no GPU figure)"


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its torch name (``None`` for one not in the list)."""
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def nanogpt_flops_per_token(n_params: int, n_layer: int, n_head: int, n_embd: int, seq_len: int) -> float:
    """nanoGPT's ``estimate_mfu``: ``6 N + 12 L H Q T`` a token, N without the position embedding (PaLM, App. B)."""
    return 6 * n_params + 12 * n_layer * n_head * (n_embd // n_head) * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops


def nanogpt_reference() -> dict[str, float]:
    """nanoGPT's published iteration time as tokens/s and MFU, by its own formula and model."""
    shapes = gpt2_small_shapes(12, 768, vocab=50304)
    params = sum(math.prod(s) for s in shapes.values()) - math.prod(shapes["transformer.wpe.weight"])
    tokens_per_s = NANOGPT_TOKENS_PER_ITER / (NANOGPT_MS_PER_ITER / 1e3)
    flops = nanogpt_flops_per_token(params, 12, 12, 768, 1024)
    return {"params": params, "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops, NANOGPT_PEAK_FLOPS)}


# -- rows ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    part: str
    figure: str
    value: str
    goal: str = ""              # empty: a figure to read, with no goal
    met: bool | None = None     # None with a goal: not measured


def failed_row(part: str, why: str) -> Row:
    """The one row of a part that failed, timed out or did not run."""
    return Row(part, "(whole part)", why, "", None)


def cuda_test_rows(part: str, counts: dict[str, int], dry_run: bool = False) -> list[Row]:
    """From pytest's junit counts: every CUDA test ran (none skipped) and none failed. In a dry run the tests run
    as they are (they enter the CUDA stand-in themselves) and those needing a real GPU skip: the row says so."""
    ran = counts["tests"] - counts["skipped"]
    bad = counts["failures"] + counts["errors"]
    skipped = f"{counts['skipped']} skipped" + (": they need a real GPU" if dry_run and counts["skipped"] else "")
    return [Row(part, "CUDA tests run" + (" (on the CPU: the stand-in tests enter it themselves)" if dry_run else ""),
                f"{ran} of {counts['tests']} ({skipped})", "all run (none skipped)",
                counts["tests"] > 0 and counts["skipped"] == 0),
            Row(part, "CUDA tests failed or errored", str(bad), "0", counts["tests"] > 0 and bad == 0)]


def smoke_rows(part: str, data: dict[str, Any]) -> list[Row]:
    """From ``smoke.py --json``: per task and precision, the run end to end, its host syncs a step, its resume."""
    rows: list[Row] = []
    for r in data["results"]:
        tag = f"{r['task']} {'fp32' if r['precision'] == 'no' else r['precision']}"
        where = f"{r['device'] or 'no step taken'} ({data['device_name']})"
        rows.append(Row(part, f"{tag}: suite run, tiny, 6 averagers, stopped at 12, resume=auto to 16",
                        f"ok on {where}" if r["ok"] else f"failed on {where}: {'; '.join(r['problems'])}",
                        "ok", r["ok"]))
        if r["syncs_median"] is None:
            rows.append(Row(part, f"{tag}: host syncs a step", "not measured: no two steps ran", "1", None))
        else:
            rows.append(Row(part, f"{tag}: host syncs a step, median (max, a step with an evaluation or checkpoint)",
                            f"{r['syncs_median']:g} ({r['syncs_max']}; {r['syncs_counted_by']})",
                            f"<= {GOAL_SYNCS}", r["syncs_median"] <= GOAL_SYNCS))
        resumed = (f"yes: from the step-{r['resumed_at']} checkpoint to step {r['last_evaluation']}" if r["resumed"]
                   else f"no (checkpoints: {', '.join(r['checkpoints']) or 'none'}; last evaluation: "
                        f"{r['last_evaluation']})")
        rows.append(Row(part, f"{tag}: resume=auto", resumed, "yes", r["resumed"]))
    return rows


def _ms(x: float) -> str:
    return f"{x:,.2f} ms"


def averager_rows(part: str, data: dict[str, Any]) -> list[Row]:
    """From ``averagers.py --json``: the floors, each suite averager against its floor, LAWA on the stream."""
    rows: list[Row] = []
    for res in data["results"]:
        dtype = res["dtype"]
        tag = f"{res['parameters'] / 1e6:,.0f}M {dtype}"
        standin = res.get("standin", False)
        if "device" in res:
            rows.append(Row(part, f"{tag}: ran on", f"{res['device']} ({res.get('device_name', '?')})"
                            + ("; its times are host times, no GPU figure" if standin else "")))
        by_name = {r["candidate"]: r for r in res["rows"]}
        for name, floor in (("floor: _foreach_lerp_", "lerp"), ("floor: _foreach_copy_", "copy")):
            if name in by_name:
                rows.append(Row(part, f"{tag}: {floor} floor", _ms(by_name[name]["median_ms"])))
        for name, r in by_name.items():
            if not name.startswith("suite"):
                continue
            value = f"{r['ratio']:.2f}x ({_ms(r['median_ms'])})"
            goal, met = "", None
            if dtype == "fp32" and name == "suite ema, in the loop":
                goal, met = f"<= {GOAL_EMA:.2f}x lerp", r["ratio"] <= GOAL_EMA
            elif dtype == "fp32" and name == "suite swa, in the loop":
                goal, met = f"<= {GOAL_SWA:.2f}x lerp", r["ratio"] <= GOAL_SWA
            rows.append(Row(part, f"{tag}: {name} / {r['floor']} floor", value, goal, met))
        stream = res.get("lawa_stream")
        if stream and stream.get("standin"):  # no device timing there; its sync count says whether a call waits
            rows.append(Row(part, f"{tag}: LAWA snapshot, device time on the training stream", STANDIN_TIME,
                            f"<= {GOAL_OFF_STREAM:.2f}x (off the stream)", None))
            rows.append(Row(part, f"{tag}: LAWA snapshot calls that waited for the device",
                            f"{stream['host_waited']} of {stream['n']} (the stand-in's count of blocking reads and "
                            f"copies; {stream['event_waits']} waited on an event, which a GPU may have passed)", "0",
                            stream["host_waited"] == 0))
        elif stream:
            ratio = stream["ratio_to_floor"]
            rows.append(Row(part, f"{tag}: LAWA snapshot, device time on the training stream",
                            f"{_ms(stream['snapshot_stream_ms'])} = {ratio:.2f}x a D2H copy "
                            f"({_ms(stream['floor_d2h_stream_ms'])})",
                            f"<= {GOAL_OFF_STREAM:.2f}x (off the stream)", ratio <= GOAL_OFF_STREAM))
            rows.append(Row(part, f"{tag}: LAWA snapshot calls that waited for the device",
                            f"{stream['host_waited']} of {stream['n']} (host {_ms(stream['snapshot_host_ms'])})",
                            "0", stream["host_waited"] == 0))
        else:
            rows.append(Row(part, f"{tag}: LAWA snapshot on the training stream", "not measured (CUDA only)",
                            f"<= {GOAL_OFF_STREAM:.2f}x (off the stream)", None))
    return rows


def loop_rows(part: str, result: dict[str, Any], compile_note: str) -> list[Row]:
    """From ``loop.py --throughput --json`` (one result): speed, tokens/s and, for GPT-2, MFU beside nanoGPT's."""
    unit = "tokens" if result.get("tokens_per_s") is not None else "images"
    rate = result["tokens_per_s"] if unit == "tokens" else result["examples_per_s"]
    settings = f"preset {result['preset']}, mixed_precision={result['mixed_precision']}" + \
        (f"; {compile_note}" if compile_note else "")
    standin = result.get("standin", False)
    host = " (host time through the CUDA stand-in: no GPU figure)" if standin else ""
    rows = [Row(part, f"ms per step ({result['batch_size']} examples; {settings})", _ms(result["ms_per_step"]) + host),
            Row(part, f"{unit}/s", f"{rate:,.0f}{host}")]
    if "param_device" in result:
        rows.insert(0, Row(part, "ran on", f"{result['param_device']} ({result['device']})"))
    if standin:
        rows.append(Row(part, "peak memory allocated while training", "not measured through the CUDA stand-in"))
    elif result.get("peak_bytes") is not None:
        rows.append(Row(part, "peak memory allocated while training", f"{result['peak_bytes'] / 2**30:,.2f} GiB"))
    if unit == "tokens":
        cfg = result["task_config"]
        peak = bf16_peak(result["device"])
        params = result["parameters"] - cfg["seq_len"] * cfg["n_embd"]  # nanoGPT leaves out the position embedding
        flops = nanogpt_flops_per_token(params, cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["seq_len"])
        goal = f">= {GOAL_MFU:.0%}"
        if standin:
            rows.append(Row(part, "MFU", STANDIN_TIME, goal, None))
        elif peak is None:
            rows.append(Row(part, "MFU", f"not measured: no bf16 peak known for {result['device']}", goal, None))
        else:
            value = mfu(rate, flops, peak)
            rows.append(Row(part, f"MFU (nanoGPT's estimate_mfu, {peak / 1e12:,.0f} TFLOPS bf16 peak of "
                            f"{result['device']})", f"{value:.1%}", goal,
                            value >= GOAL_MFU if result["mixed_precision"] == "bf16" else None))
        ref = nanogpt_reference()
        rows.append(Row(part, "nanoGPT's published figure (README: 135 ms/iter compiled, A100; 12 x 1024 tokens "
                        "an iter assumed)", f"{ref['tokens_per_s']:,.0f} tokens/s, {ref['mfu']:.1%} MFU"))
    return rows


# -- the table -------------------------------------------------------------------------------------------------
def met_text(row: Row, judged: bool) -> str:
    if not row.goal:
        return "-"
    if not judged:
        return "not judged (dry run)"
    if row.met is None:
        return "not measured"
    return "yes" if row.met else "**no**"


def markdown(rows: list[Row], header: list[str], judged: bool = True) -> str:
    """One table: every figure and its goal. ``judged=False`` (a CPU dry run) leaves the goals unjudged."""
    lines = [*header, "", "| part | figure | value | goal | met |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r.part, r.figure, r.value, r.goal or "-", met_text(r, judged)]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
