"""The GPU check's CPU-side parts (benchmarks/gpu): arguments, MFU arithmetic against nanoGPT's formula, the table
from canned part results, the rows of parts that fail or run out of time, and a dry run through check.sh, whose
parts run on the CUDA stand-in's "cuda" (benchmarks/gpu/standin_run.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "benchmarks" / "gpu"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = _load("gpu_check", GPU / "check.py")
figures = check.figures


# -- arguments -----------------------------------------------------------------------------------------------
def test_defaults_run_every_part_on_cuda_and_write_to_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = check.parse_args([])
    assert (args.device, args.quick, args.dry_run, args.budget, args.out) == ("cuda", False, False, 390.0, tmp_path)
    assert args.parts == list(check.PARTS) and args.parts[0] == "smoke"  # the smoke first: a crash shows at once
    assert sum(check.CAPS[p] for p in check.PARTS) + check.RESERVE <= args.budget  # the caps fit the budget


def test_the_default_budget_keeps_the_whole_check_under_seven_minutes():
    text = (GPU / "check.sh").read_text()
    budget = int(text.split("BUDGET=${GPU_CHECK_BUDGET:-")[1].split("}")[0])
    assert budget + 10 <= 7 * 60  # timeout's --kill-after=10 on top
    assert "--kill-after=10" in text and check.BUDGET == budget - 20  # check.sh keeps 20 s back from the driver
    dry = int(text.split("BUDGET=${GPU_CHECK_BUDGET:-")[2].split("}")[0])  # a dry run's: the quick caps fit it
    assert check.QUICK_BUDGET == dry - 20 == check.parse_args(["--dry-run", "--out", "/tmp/unused"]).budget
    assert sum(check.QUICK_CAPS.get(p, check.QUICK_CAP) for p in check.PARTS) + check.RESERVE <= check.QUICK_BUDGET


def test_a_dry_run_is_quick_on_the_stand_ins_cuda(tmp_path):
    args = check.parse_args(["--dry-run", "--out", str(tmp_path)])
    assert (args.device, args.quick, args.dry_run) == ("cuda", True, True)
    parts = check.build_parts(args, tmp_path)
    wrapper = str(GPU / "standin_run.py")
    for name in ("smoke", "averagers-124M", "ddpm-cifar32", "loop-gpt2", "averagers-774M"):
        assert parts[name].command[1] == wrapper, name  # the script runs inside the stand-in
    assert wrapper not in parts["cuda-tests"].command  # its tests enter the stand-in themselves
    assert parts["averagers-124M"].command[parts["averagers-124M"].command.index("--device") + 1] == "cuda"
    assert "--quick" in parts["smoke"].command
    real = check.build_parts(check.parse_args(["--out", str(tmp_path)]), tmp_path)
    assert all(wrapper not in p.command for p in real.values())  # on a GPU: the scripts as they are
    assert "--quick" not in real["smoke"].command


def test_without_out_a_real_run_writes_under_benchmarks_and_a_quick_one_to_a_temporary_folder(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert check.parse_args([]).out == ROOT / "benchmarks" / "results" / "gpu"
    quick = check.parse_args(["--device", "cpu", "--quick", "--parts", "loop-gpt2, cuda-tests"])
    assert quick.parts == ["loop-gpt2", "cuda-tests"] and "gpu-check-" in quick.out.name
    quick.out.rmdir()


@pytest.mark.parametrize("argv, expected", [
    (["--parts", "cuda-tests,nope"], "--parts: unknown part nope; expected a comma list of smoke, cuda-tests, "),
    (["--dry-run", "--device", "cpu"], "--dry-run: runs the parts on the stand-in's cuda; leave out --device"),
    (["--parts", ","], "--parts: unknown part (none given)"),
    (["--budget", "3"], "--budget: expected seconds > 5, got 3"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_are_one_line_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        check.parse_args(argv)
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error


def test_the_cuda_tests_part_runs_the_files_that_mention_cuda_and_never_its_own_tests():
    files = check.cuda_test_files()
    assert "tests/test_averagers.py" in files
    assert "tests/test_gpu_check.py" not in files


# -- arithmetic ----------------------------------------------------------------------------------------------
def nanogpt_estimate_mfu(n_params, n_layer, n_head, n_embd, block_size, fwdbwd_per_iter, dt, promised):
    """nanoGPT's model.py estimate_mfu, written out again (its get_num_params leaves out wpe)."""
    N = n_params
    L, H, Q, T = n_layer, n_head, n_embd // n_head, block_size
    flops_per_token = 6 * N + 12 * L * H * Q * T
    flops_per_fwdbwd = flops_per_token * T
    flops_per_iter = flops_per_fwdbwd * fwdbwd_per_iter
    flops_achieved = flops_per_iter * (1.0 / dt)
    return flops_achieved / promised


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("Tesla T4", None), ("cpu", None)])
def test_bf16_peaks_by_device_name(name, peak):
    assert figures.bf16_peak(name) == peak


def test_mfu_of_a_gpt2_small_step_is_nanogpts_estimate():
    result = {"preset": "small", "mixed_precision": "bf16", "batch_size": 128, "ms_per_step": 312.5,
              "tokens_per_s": 128 * 1024 / 0.3125, "examples_per_s": 128 / 0.3125, "peak_bytes": 30 * 2**30,
              "parameters": 124_439_808, "device": "NVIDIA H100 80GB HBM3",
              "task_config": {"n_layer": 12, "n_head": 12, "n_embd": 768, "seq_len": 1024}}
    rows = figures.loop_rows("loop-gpt2", result, "compiled")
    (row,) = [r for r in rows if r.figure.startswith("MFU")]
    expected = nanogpt_estimate_mfu(124_439_808 - 1024 * 768, 12, 12, 768, 1024, fwdbwd_per_iter=128, dt=0.3125,
                                    promised=989e12)
    assert row.value == f"{expected:.1%}" == "36.3%"
    assert (row.goal, row.met) == (">= 40%", False)
    assert {r.figure: r.value for r in rows}["peak memory allocated while training"] == "30.00 GiB"
    faster = figures.loop_rows("loop-gpt2", {**result, "tokens_per_s": result["tokens_per_s"] * 1.2}, "compiled")
    assert [r.met for r in faster if r.figure.startswith("MFU")] == [True]  # 43.5%


def test_mfu_is_not_judged_without_bf16_or_a_known_peak():
    result = {"preset": "small", "mixed_precision": "no", "batch_size": 8, "ms_per_step": 10.0, "tokens_per_s": 1e5,
              "examples_per_s": 800.0, "peak_bytes": None, "parameters": 124_439_808, "device": "NVIDIA H200",
              "task_config": {"n_layer": 12, "n_head": 12, "n_embd": 768, "seq_len": 1024}}
    (fp32,) = [r for r in figures.loop_rows("g", result, "") if r.figure.startswith("MFU")]
    assert fp32.met is None and fp32.value.endswith("%")
    (unknown,) = [r for r in figures.loop_rows("g", {**result, "device": "Tesla T4"}, "") if r.figure.startswith("MFU")]
    assert (unknown.value, unknown.met) == ("not measured: no bf16 peak known for Tesla T4", None)


def test_nanogpts_published_figure_in_its_own_terms():
    ref = figures.nanogpt_reference()
    assert ref["params"] == 123_689_472  # nanoGPT prints "number of parameters: 123.69M"
    assert ref["tokens_per_s"] == pytest.approx(12 * 1024 / 0.135)
    assert ref["mfu"] == pytest.approx(nanogpt_estimate_mfu(123_689_472, 12, 12, 768, 1024, 12, 0.135, 312e12))
    assert round(ref["mfu"], 4) == 0.2495


# -- the table from canned results ----------------------------------------------------------------------------
def averagers_json(ema_ratio: float, swa_ratio: float, stream: dict | None) -> dict:
    rows = [{"candidate": "floor: _foreach_lerp_", "median_ms": 0.52, "ratio": 1.0, "floor": "lerp"},
            {"candidate": "floor: _foreach_copy_", "median_ms": 0.4, "ratio": 1.0, "floor": "copy"},
            {"candidate": "suite ema, in the loop", "median_ms": 0.52 * ema_ratio, "ratio": ema_ratio, "floor": "lerp"},
            {"candidate": "suite swa, in the loop", "median_ms": 0.52 * swa_ratio, "ratio": swa_ratio, "floor": "lerp"},
            {"candidate": "suite lawa, training thread (slide)", "median_ms": 12.0, "ratio": 30.0, "floor": "copy"},
            {"candidate": "torch AveragedModel EMA", "median_ms": 0.6, "ratio": 1.15, "floor": "lerp"}]
    result = {"dtype": "fp32", "parameters": 124_439_808, "rows": rows}
    if stream is not None:
        result["lawa_stream"] = stream
    return {"results": [result, {**result, "dtype": "bf16", "lawa_stream": None}]}


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| part "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[f"{cells[0]} :: {cells[1]}"] = cells[2:]
    return rows


def test_the_table_from_canned_results_says_which_goals_are_met():
    stream = {"snapshot_stream_ms": 0.2, "snapshot_stream_max_ms": 0.3, "snapshot_host_ms": 1.0, "sleep_ms": 200.0,
              "host_waited": 1, "n": 7, "floor_d2h_stream_ms": 10.0, "ratio_to_floor": 0.02}
    rows = (figures.cuda_test_rows("cuda-tests", {"tests": 3, "failures": 1, "errors": 0, "skipped": 0})
            + figures.averager_rows("averagers-124M", averagers_json(1.04, 1.30, stream))
            + [figures.failed_row("loop-gpt2", "timed out after its cap of 180 s")])
    text = figures.markdown(rows, ["GPU check: NVIDIA H200"])
    table = table_rows(text)
    assert text.startswith("GPU check: NVIDIA H200\n\n| part | figure | value | goal | met |\n|---|---|---|---|---|\n")
    assert table["cuda-tests :: CUDA tests run"] == ["3 of 3 (0 skipped)", "all run (none skipped)", "yes"]
    assert table["cuda-tests :: CUDA tests failed or errored"] == ["1", "0", "**no**"]
    assert table["averagers-124M :: 124M fp32: lerp floor"] == ["0.52 ms", "-", "-"]
    assert table["averagers-124M :: 124M fp32: suite ema, in the loop / lerp floor"] == [
        "1.04x (0.54 ms)", "<= 1.10x lerp", "yes"]
    assert table["averagers-124M :: 124M fp32: suite swa, in the loop / lerp floor"] == [
        "1.30x (0.68 ms)", "<= 1.15x lerp", "**no**"]
    assert table["averagers-124M :: 124M fp32: LAWA snapshot, device time on the training stream"] == [
        "0.20 ms = 0.02x a D2H copy (10.00 ms)", "<= 0.05x (off the stream)", "yes"]
    assert table["averagers-124M :: 124M fp32: LAWA snapshot calls that waited for the device"] == [
        "1 of 7 (host 1.00 ms)", "0", "**no**"]
    # bf16: the floor is an fp32 lerp (no fused bf16 -> fp32 kernel), so its ratios carry no goal; no stream figure
    assert table["averagers-124M :: 124M bf16: suite ema, in the loop / lerp floor"][1:] == ["-", "-"]
    assert table["averagers-124M :: 124M bf16: LAWA snapshot on the training stream"] == [
        "not measured (CUDA only)", "<= 0.05x (off the stream)", "not measured"]
    assert not any("AveragedModel" in key for key in table)  # libraries stay in check.log's full tables
    assert table["loop-gpt2 :: (whole part)"] == ["timed out after its cap of 180 s", "-", "-"]


def smoke_json(**changes) -> dict:
    ok = {"task": "gpt2", "precision": "bf16", "ok": True, "problems": [], "device": "cuda:0", "standin": False,
          "syncs_median": 1, "syncs_max": 312, "syncs_counted_by": 'set_sync_debug_mode("warn") warnings',
          "resumed": True, "resumed_at": 12, "last_evaluation": 16, "checkpoints": ["step-00000012", "step-00000016"]}
    bad = {**ok, "task": "ddpm", "precision": "no", "ok": False, "syncs_median": 3, "resumed": False,
           "resumed_at": None, "last_evaluation": 8, "checkpoints": ["step-00000008"],
           "problems": ["first run: RuntimeError: Expected all tensors to be on the same device"], **changes}
    return {"device_name": "NVIDIA H100 80GB HBM3", "results": [ok, bad]}


def test_the_smoke_rows_say_per_task_what_ran_its_syncs_and_its_resume():
    table = table_rows(figures.markdown(figures.smoke_rows("smoke", smoke_json()), ["h"]))
    assert table["smoke :: gpt2 bf16: suite run, tiny, 6 averagers, stopped at 12, resume=auto to 16"] == [
        "ok on cuda:0 (NVIDIA H100 80GB HBM3)", "ok", "yes"]
    assert table["smoke :: gpt2 bf16: host syncs a step, median (max, a step with an evaluation or checkpoint)"] == [
        '1 (312; set_sync_debug_mode("warn") warnings)', "<= 1", "yes"]
    assert table["smoke :: gpt2 bf16: resume=auto"] == ["yes: from the step-12 checkpoint to step 16", "yes", "yes"]
    assert table["smoke :: ddpm fp32: suite run, tiny, 6 averagers, stopped at 12, resume=auto to 16"] == [
        "failed on cuda:0 (NVIDIA H100 80GB HBM3): first run: RuntimeError: Expected all tensors to be on the same "
        "device", "ok", "**no**"]
    assert table["smoke :: ddpm fp32: resume=auto"] == [
        "no (checkpoints: step-00000008; last evaluation: 8)", "yes", "**no**"]
    crashed = table_rows(figures.markdown(figures.smoke_rows("smoke", smoke_json(device=None, syncs_median=None)),
                                          ["h"]))
    assert crashed["smoke :: ddpm fp32: host syncs a step"] == ["not measured: no two steps ran", "1",
                                                               "not measured"]


def test_the_smokes_settings_resolve_for_every_task_and_precision(tmp_path):
    """What smoke.py passes to `suite run` resolves here, and every averager has weights by the end."""
    from lawa_suite.config import resolve
    from lawa_suite.averagers._readiness import never_ready
    smoke = _load("gpu_check_smoke", GPU / "smoke.py")
    for task in smoke.TASKS:
        for precision, quick in zip(smoke.PRECISIONS, (False, True)):
            cfg = resolve([f"task={task}", *smoke.settings(quick), f"mixed_precision={precision}", f"out={tmp_path}"])
            assert (cfg.run.steps, cfg.run.data.source, sorted(cfg.averagers)) == (
                smoke.STEPS, "embedded", sorted(smoke.AVERAGERS))
            assert never_ready(cfg.averagers, cfg.averager_of, cfg.run.steps) == {}, task
            # an evaluation before the stop at 12 and one after the resume, a checkpoint at the stop
            assert 0 < cfg.run.eval.every < smoke.STOP_AT and smoke.STOP_AT % cfg.run.checkpoint.every == 0


def test_a_part_over_its_cap_keeps_the_results_it_wrote(tmp_path):
    code = ("import json, time; json.dump(" + repr(smoke_json()) + ", open('OUTFILE', 'w')); time.sleep(60)")
    out = tmp_path / "smoke.json"
    slow = check.Part("smoke", [sys.executable, "-c", code.replace("OUTFILE", str(out))], out,
                      lambda p: figures.smoke_rows("smoke", json.loads(p.read_text())))
    with open(tmp_path / "log", "w") as log:
        rows, _ = check.run_part(slow, 4, log)
    assert rows[0].value == "ok on cuda:0 (NVIDIA H100 80GB HBM3)"
    assert (rows[-1].figure, rows[-1].value) == ("(whole part)", "timed out after its cap of 4 s")


def test_a_dry_run_leaves_goals_unjudged_and_cells_cannot_break_the_table():
    rows = [figures.Row("p", "a | b", "x\ny", "goal", True)]
    last = figures.markdown(rows, ["h"], judged=False).splitlines()[-1]
    assert last == "| p | a / b | x y | goal | not judged (dry run) |"


# -- running parts: caps, failures ------------------------------------------------------------------------------
def part(tmp_path: Path, code: str, name: str = "averagers-124M") -> check.Part:
    out = tmp_path / f"{name}.json"
    return check.Part(name, [sys.executable, "-c", code.replace("OUTFILE", str(out))], out,
                      lambda p: figures.averager_rows(name, json.loads(p.read_text())))


def test_a_part_over_its_cap_is_killed_with_its_children_and_becomes_a_row(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('started', flush=True); time.sleep(60)"
    with open(tmp_path / "log", "w") as log:
        started = time.monotonic()
        rows, seconds = check.run_part(part(tmp_path, code), 1.5, log)
    assert time.monotonic() - started < 15
    assert [(r.figure, r.value) for r in rows] == [("(whole part)", "timed out after its cap of 2 s")]
    assert "started" in (tmp_path / "log").read_text()


def test_a_failing_part_shows_its_last_line_and_an_unreadable_result_says_so(tmp_path):
    with open(tmp_path / "log", "w") as log:
        failed, _ = check.run_part(part(tmp_path, "import sys; print('noise'); print('boom: no GPU'); sys.exit(3)"),
                                   30, log)
        garbled, _ = check.run_part(part(tmp_path, "open('OUTFILE', 'w').write('{not json')"), 30, log)
        good, _ = check.run_part(part(tmp_path, f"import json; json.dump({averagers_json(1.0, 1.0, None)!r}, "
                                                "open('OUTFILE', 'w'))"), 30, log)
    assert [r.value for r in failed] == ["failed (exit 3): boom: no GPU"]
    assert garbled[0].value.startswith("could not read its results: JSONDecodeError: ")
    assert any(r.figure.endswith("suite ema, in the loop / lerp floor") and r.met for r in good)


def test_the_check_prints_one_table_whatever_its_parts_do(tmp_path, monkeypatch, capsys):
    def fake_parts(args, work):
        return {"cuda-tests": part(tmp_path, "import sys; sys.exit(1)", "cuda-tests"),
                "averagers-124M": part(tmp_path, f"import json; json.dump({averagers_json(1.2, 1.0, None)!r}, "
                                                 "open('OUTFILE', 'w'))"),
                "loop-gpt2": part(tmp_path, "import time; time.sleep(60)", "loop-gpt2"),
                "ddpm-cifar32": part(tmp_path, "pass", "ddpm-cifar32")}
    monkeypatch.setattr(check, "build_parts", fake_parts)
    monkeypatch.setattr(check, "environment", lambda device, standin=False: {
        "torch": "x", "cuda": "13.0", "available": True, "gpu": "NVIDIA H200", "device": device})
    monkeypatch.setitem(check.CAPS, "loop-gpt2", 2)
    code = check.main(["--parts", "cuda-tests,averagers-124M,loop-gpt2,ddpm-cifar32", "--budget", "15",
                       "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    table = table_rows(printed)
    assert code == 0 and printed.startswith("GPU check: NVIDIA H200; torch x (CUDA 13.0)")
    assert table["cuda-tests :: (whole part)"][0] == "failed (exit 1): no output"
    assert table["averagers-124M :: 124M fp32: suite ema, in the loop / lerp floor"][2] == "**no**"
    assert table["loop-gpt2 :: (whole part)"][0] == "timed out after its cap of 2 s"
    assert table["ddpm-cifar32 :: (whole part)"][0] == "wrote no results: no output"
    assert (tmp_path / "out" / "check.md").read_text() == printed
    saved = json.loads((tmp_path / "out" / "check.json").read_text())
    assert saved["environment"]["gpu"] == "NVIDIA H200" and "averagers-124M" in saved["details"]


def test_no_cuda_device_and_a_spent_budget_become_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "build_parts", lambda args, work: {})
    monkeypatch.setattr(check, "environment", lambda device, standin=False: {
        "torch": "2.11", "cuda": None, "available": False, "gpu": None, "device": device})
    check.main(["--parts", "loop-gpt2", "--out", str(tmp_path)])
    assert table_rows(capsys.readouterr().out)["loop-gpt2 :: (whole part)"][0] == \
        "not run: torch sees no CUDA device (torch 2.11)"
    monkeypatch.setattr(check, "build_parts", lambda args, work: {
        "cuda-tests": part(tmp_path, "import time; time.sleep(60)", "cuda-tests"),
        "ddpm-cifar32": part(tmp_path, "pass", "ddpm-cifar32")})
    check.main(["--device", "cpu", "--parts", "cuda-tests,ddpm-cifar32", "--budget", "8", "--out", str(tmp_path)])
    table = table_rows(capsys.readouterr().out)  # 8 s less 5 kept for the table: the first part gets 3 s, not 60
    assert table["cuda-tests :: (whole part)"][0] == "timed out after its cap of 3 s"
    assert table["ddpm-cifar32 :: (whole part)"][0] == "not run: the check's time budget was spent"


def test_sigterm_stops_the_running_part_and_still_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "build_parts", lambda args, work: {
        "cuda-tests": part(tmp_path, "import time; time.sleep(60)", "cuda-tests")})
    monkeypatch.setattr(check, "environment", lambda device, standin=False: {
        "torch": "x", "cuda": None, "available": False, "gpu": None, "device": device})
    previous = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        check.main(["--device", "cpu", "--parts", "cuda-tests,averagers-124M", "--out", str(tmp_path)])
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the check's only while it runs
    table = table_rows(capsys.readouterr().out)
    assert table["cuda-tests :: (whole part)"][0] == "not run: the check was stopped (time budget)"
    assert table["averagers-124M :: (whole part)"][0] == "not run: the check was stopped (time budget)"


# -- end to end on the CPU --------------------------------------------------------------------------------------
def test_averagers_py_help_runs():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "averagers.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--device" in done.stdout


@pytest.mark.slow
def test_check_sh_dry_run_runs_its_parts_on_the_stand_ins_cuda(tmp_path):
    """Three parts through check.sh --dry-run, each script inside the CUDA stand-in: the smoke of one task (a run
    stopped at step 12 and resumed), averagers.py --device cuda and loop.py. About a minute on a busy 2-core
    machine; the whole dry run (every task, both precisions, the CUDA tests) takes several."""
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(GPU / "check.sh"), "--dry-run", "--parts", "smoke,averagers-124M,loop-gpt2",
                           "--smoke-tasks", "gpt2", "--smoke-precisions", "no"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = table_rows(done.stdout)
    assert done.stdout.startswith("GPU check: CUDA stand-in;") and "device cuda (stand-in)" in done.stdout
    # the smoke: a suite run on the stand-in's cuda, its checkpoint, resume=auto; host syncs counted by the stand-in
    assert table["smoke :: gpt2 fp32: suite run, tiny, 6 averagers, stopped at 12, resume=auto to 16"][0] == \
        "ok on cuda:0 (CUDA stand-in (host CPU))", done.stdout
    assert table["smoke :: gpt2 fp32: resume=auto"][0] == "yes: from the step-12 checkpoint to step 16"
    syncs = table["smoke :: gpt2 fp32: host syncs a step, median (max, a step with an evaluation or checkpoint)"]
    assert syncs[0].endswith("; CUDA stand-in's count)")
    assert table["averagers-124M :: 2M fp32: ran on"][0].startswith("cuda:0 (CUDA stand-in)")
    assert any(k.endswith("suite ema, in the loop / lerp floor") for k in table), done.stdout
    assert table["loop-gpt2 :: ran on"][0] == "cuda:0 (CUDA stand-in)"
    assert table["loop-gpt2 :: MFU"][0].startswith("not measured through the CUDA stand-in")
    assert all(v[2] in ("-", "not judged (dry run)") for v in table.values())
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["environment"]["device"] == "cuda (stand-in)"
    (smoke,) = saved["details"]["smoke"]["results"]
    assert (smoke["ok"], smoke["device"], smoke["standin"], smoke["last_evaluation"]) == (True, "cuda:0", True, 16)
    assert len(set(smoke["raw_scores"])) > 1  # it trained: raw's loss moved
    assert saved["details"]["loop-gpt2"]["results"][0]["param_device"] == "cuda:0"
    assert saved["details"]["averagers-124M"]["results"][0]["device"] == "cuda:0"
    assert (tmp_path / "check.md").read_text() == done.stdout
    log = (tmp_path / "check.log").read_text()
    assert "===== smoke" in log and "standin_run.py" in log


def test_the_full_runs_settings_resolve_to_valid_configs(tmp_path):
    """What the GPU parts pass to loop.py resolves here (a bad key or value would cost a GPU part its run)."""
    from lawa_suite.config import resolve
    loop = _load("gpu_check_loop", ROOT / "benchmarks" / "loop.py")
    parts = check.build_parts(check.parse_args(["--out", str(tmp_path)]), tmp_path)
    for name, task, preset in (("loop-gpt2", "gpt2", "small"), ("ddpm-cifar32", "ddpm", "cifar32")):
        command = parts[name].command
        assert command[command.index("--preset") + 1] == preset
        extra = tuple(command[i + 1] for i, word in enumerate(command) if word == "--override")
        assert "data=embedded" in extra  # nothing downloads
        steps = int(command[command.index("--steps") + 1])
        cfg = resolve(loop.overrides(task, steps, "lawa,ema,swa", tmp_path / "run", preset, extra))
        assert (cfg.run.task, cfg.run.steps, cfg.run.data.source) == (task, steps, "embedded")
    gpt2 = parts["loop-gpt2"].command
    assert "mixed_precision=bf16" in gpt2 or gpt2[gpt2.index("--mixed-precision") + 1] == "bf16"


def test_time_left_by_early_parts_goes_to_later_ones_but_never_the_time_kept_for_the_rest():
    args = check.parse_args(["--parts", "cuda-tests,loop-gpt2,averagers-774M", "--out", "/tmp/unused"])
    caps = check.CAPS
    assert check.part_cap(args, 0, 440) == 440 - caps["loop-gpt2"] - caps["averagers-774M"]  # all but theirs
    assert check.part_cap(args, 0, 200) == caps["cuda-tests"]          # short of time: its own cap still
    assert check.part_cap(args, 1, 400) == 400 - caps["averagers-774M"]  # cuda-tests finished early
    assert check.part_cap(args, 1, 100) == 100                          # never past the budget
    assert check.part_cap(args, 2, 300) == 300                          # the last part: what is left


# -- what the GPU machine gets installed ----------------------------------------------------------------------
def _wheels_and_needs() -> tuple[list[str], list[str]]:
    """The distributions wheels.sh downloads and the modules check.sh makes sure of, read from the scripts."""
    import ast
    import re
    wheels_py = re.search(r"WHEELS = (\(.*?\))", (GPU / "wheels.sh").read_text(), re.S)
    need_py = re.search(r"need = (\[.*?\])", (GPU / "check.sh").read_text(), re.S)
    assert wheels_py and need_py, "wheels.sh's WHEELS or check.sh's need list moved; update this reader"
    return list(ast.literal_eval(wheels_py.group(1))), ast.literal_eval(need_py.group(1))


def test_schedulefree_a_core_dependency_travels_with_the_gpu_check():
    wheels, need = _wheels_and_needs()
    assert "schedulefree" in wheels and "schedulefree" in need


def test_every_wheel_the_check_ships_is_a_module_it_checks_for():
    wheels, need = _wheels_and_needs()
    backports = {"importlib-metadata"}  # needed by another wheel, imported by no part itself
    assert [w for w in wheels if w not in backports and w.replace("-", "_") not in need] == []
