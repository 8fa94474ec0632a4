"""The cross-run report on hand-written runs (no training): seed means and bands, steps to target, the
learning-rate gap, the four claims, and the HTML page with its PNGs embedded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.report import find_runs, read_run, seed_band, summarise_lr, to_html, write_bench_report
from lawa_suite.report.claims import swa_like
from lawa_suite.report.targets import crossing, saved_fractions, steps_table

from helpers import REPORT_CURVES, report_run, report_bench

runner = CliRunner()

def test_seed_band_is_the_mean_and_range_over_common_steps(tmp_path):
    runs = [read_run(p) for p in find_runs([report_bench(tmp_path)]) if "lr0.1-" in p.name]
    band = seed_band(runs, "raw", "loss")
    assert band.steps == [10, 20, 30, 40, 50] and band.seeds == 2
    assert band.mean[0] == 3.1 and band.low[0] == 3.0 and band.high[0] == 3.2
    assert seed_band(runs, "swa", "loss").steps == [40, 50]


def test_steps_to_target_interpolates_crossings_of_each_runs_own_raw_targets(tmp_path):
    runs = [read_run(p) for p in find_runs([report_bench(tmp_path)]) if "lr0.1-" in p.name]
    # seed 0: raw 3.0 2.5 2.4 2.2 2.3 at steps 10..50; smoothed final mean(2.4, 2.2, 2.3) = 2.3, first reached
    # between step 30 (2.4) and 40 (2.2): at 35. LAWA is at 2.3 at its first evaluation, step 20: 1 - 20/35 saved.
    # Best 2.2 (raw at 40); LAWA crosses it between 20 (2.3) and 30 (2.1): at 25, so 1 - 25/40. Seed 1 is seed 0
    # shifted by +0.2 throughout: the same fractions.
    assert crossing([(10, 3.0), (20, 2.5), (30, 2.4), (40, 2.2)], 2.3, "min") == pytest.approx(35.0)
    assert crossing([(10, 0.5), (20, 0.9)], 0.6, "max") == pytest.approx(12.5)
    assert crossing([(10, 3.0)], 2.0, "min") is None
    saved, never = saved_fractions(runs, "lawa", "loss", "min", "final")
    assert saved == pytest.approx([1 - 20 / 35] * 2) and never == 0
    saved, never = saved_fractions(runs, "lawa", "loss", "min", "best")
    assert saved == pytest.approx([1 - 25 / 40] * 2)
    # swa_early never reaches raw's best (2.2 / 2.4): it counts the whole run, 50 steps, against raw's 40
    saved, never = saved_fractions(runs, "swa_early", "loss", "min", "best")
    assert saved == pytest.approx([1 - 50 / 40] * 2) and never == 2
    table = steps_table(runs, ["lawa", "swa_early"], "loss", "min")
    # the same fraction in both seeds: a zero-width interval, no spread to judge by
    assert "| lawa | +43% [+43%, +43%] over 2 seeds: inconclusive | +38% [" in table  # (rounding: +37.5% both)
    assert "not reached in 2 seed(s)" in table


def test_swa_instances_are_found_by_of_not_by_name(tmp_path):
    run = report_run(tmp_path, 0.1, 0, {"raw": [3.0, 2.5, 2.4, 2.2, 2.3], "swa": [None, None, 2.4, 2.2, 2.1],
                                      "late": [None, None, None, 2.2, 2.15], "swap_thing": [None, 2.6, 2.4, 2.3, 2.2]})
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(swa={"start": 0.5}, late={"of": "swa", "start": 0.8}, swap_thing={"start": 0.2})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    s = summarise_lr(0.1, [read_run(run)], "loss", "min")
    # `late` is an instance of swa whatever its name; `swap_thing` only looks like one
    assert swa_like(s) == [(0.5, "swa"), (0.8, "late")]


def test_bench_report_markdown_html_and_claims(tmp_path):
    folder = report_bench(tmp_path)
    result = runner.invoke(app, ["report", str(folder), "title=synthetic"])
    assert result.exit_code == 0, result.output
    text = (folder / "report.md").read_text()
    assert text.startswith("# synthetic") and "![gpt2 (cpu)](gpt2-cpu.png)" in text
    assert "### lr=0.1" in text and "### lr=0.01" in text and "| lawa | 2.1000 (2.0000-2.2000) |" in text
    assert "| lawa | +43% [+43%, +43%] over 2 seeds: inconclusive |" in text  # steps saved; seeds alike: no spread
    # (a) pairs seed 0 at both lrs: LAWA's early-mid gain (steps 20 and 30 of 50) is (0.2+0.3)/2 at lr=0.1 and
    # (-0.1-0.05)/2 at lr=0.01, a difference of +0.325 from one seed: no interval, so inconclusive
    assert "(a) LAWA's gain over raw is larger at the higher learning rate (early-mid: the first 75%): " \
           "1 inconclusive (of 1)." in text
    assert "at lr=0.1 minus at lr=0.01: +0.3250 (1 seed, no interval)" in text
    # (c) at lr=0.1: swa's final advantage over swa_early is 0.2 in both seeds
    assert "final loss advantage of swa (from 75%) over swa_early (from 20%): +0.2000 [+0.2000, +0.2000] over " \
           "2 seeds" in text
    assert "swa not yet averaging" in text                             # (b) compares only what is averaging
    # phases: lawa not ready at step 10 (raw was scored there); the same gain in both seeds: no spread
    assert "| lawa | not ready yet | +0.2500 [+0.2500, +0.2500] over 2 seeds: inconclusive |" in text
    page = (folder / "report.html").read_text()
    # four PNGs embedded (forest plot, gain curves, curves, gain against lr), none left as a link
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page and 'src="gpt2-cpu.png"' not in page
    assert (folder / "gpt2-cpu.png").stat().st_size > 1000


def test_report_of_several_run_dirs_and_single_run_unchanged(tmp_path):
    folder = report_bench(tmp_path)
    runs = sorted(str(p) for p in (folder / "gpt2").iterdir())
    out = tmp_path / "together"
    result = runner.invoke(app, ["report", *runs, f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "3 run(s)" in (out / "report.md").read_text() and (out / "report.html").is_file()
    single = runner.invoke(app, ["report", runs[0]])
    assert single.exit_code == 0 and (Path(runs[0]) / "report.md").is_file()
    assert not (Path(runs[0]) / "report.html").exists()  # one run keeps its own report.md + curves.png


def test_report_refuses_a_folder_without_runs(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_html_escapes_and_keeps_unknown_images_as_links(tmp_path):
    page = to_html("# a <b>\n\n- **x** `y`\n  - z\n\n![p](missing.png)\n", tmp_path, "t")
    assert "<h1>a &lt;b&gt;</h1>" in page and "<strong>x</strong> <code>y</code>" in page
    assert 'src="missing.png"' in page and "class=sub" in page


def test_write_bench_report_without_runs_raises(tmp_path):
    try:
        write_bench_report([tmp_path], tmp_path / "out")
    except ValueError as exc:
        assert "no run folders" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_an_unfinished_run_is_left_out_of_the_means_and_flagged(tmp_path):
    folder = report_bench(tmp_path)
    partial = report_run(folder / "gpt2", 0.1, 7, {"raw": [9.0, 9.0, None, None, None]})  # stopped at step 20 of 50
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    text = (folder / "report.md").read_text()
    assert "| raw | 2.4000 (2.3000-2.5000) |" in text                  # seeds 0 and 1 only; seed 7 would add 9.0
    assert f"`{partial}`: gpt2 lr=0.1 seed=7, 20/50 steps" in text and "unfinished: left out of the means" in text


def test_only_true_replicates_are_averaged_as_seeds(tmp_path):
    from lawa_suite.report.bench import group_runs

    def run(folder: str, seed: int, **changes: object) -> Path:
        path = report_run(tmp_path / folder, 0.1, seed, REPORT_CURVES[(0.1, 0)])
        config = yaml.safe_load((path / "config.yaml").read_text())
        config.update(changes, out=str(path), progress=seed % 2 == 0)  # where a run lives is not the experiment
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        return path

    digits = run("digits", 0, data={"source": "embedded", "path": ""})
    cifar = [run("cifar", seed, data={"source": "imagefolder", "path": "c.tgz"}) for seed in (0, 1)]
    again = run("again", 1, data={"source": "imagefolder", "path": "c.tgz"})  # seed 1 a second time
    groups = group_runs([read_run(p) for p in (digits, *cifar, again)])
    seeds = {label: sorted(r.seed for r in by_lr[0.1]) for label, by_lr in groups.items()}
    assert seeds == {"gpt2 (cpu) [data.path=, data.source=embedded]": [0],
                     "gpt2 (cpu) [data.path=c.tgz, data.source=imagefolder]": [0, 1],
                     f"gpt2 (cpu) [data.path=c.tgz, data.source=imagefolder] [{again}]": [1]}
    report = write_bench_report([tmp_path], tmp_path / "out").read_text()
    assert "## gpt2 (cpu) [data.path=, data.source=embedded]" in report
    assert len(list((tmp_path / "out").glob("gpt2-cpu-????????.png"))) == 3  # a figure each, none overwritten


def test_a_single_runs_fewer_steps_compare_with_raws_own_step(tmp_path):
    # raw reaches its final accuracy (0.9) at step 500 of 1000; EMA reaches it at 300: 40% fewer, not 70%
    run = tmp_path / "run"
    run.mkdir()
    config = {"task": "cifar", "preset": "cpu", "lr": 0.1, "seed": 0, "steps": 1000, "averager": ["ema"]}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    raw = {100: 0.5, 300: 0.8, 500: 0.9, 700: 0.9, 1000: 0.9}
    ema = {100: 0.6, 300: 0.9, 500: 0.92, 700: 0.93, 1000: 0.93}
    lines = [{"step": s, "weights": w, "split": "val", "accuracy": v, "loss": 1 - v}
             for w, curve in (("raw", raw), ("ema", ema)) for s, v in curve.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    table = (run / "report.md").read_text().split("## What this run found")[0]  # the comparison table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| raw") or line.startswith("| ema")}
    assert rows["ema"].rstrip(" |").endswith("300 (40% fewer)") and rows["raw"].rstrip(" |").endswith("500")


def test_a_paired_interval_is_students_t_over_seeds():
    from lawa_suite.report.paired import t_interval

    interval = t_interval([0.10, 0.12, 0.11])
    half = 4.302652729911275 * 0.01 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) * sd / sqrt(n)
    assert interval.n == 3 and abs(interval.mean - 0.11) < 1e-12
    assert abs(interval.low - (0.11 - half)) < 1e-9 and abs(interval.high - (0.11 + half)) < 1e-9
    assert t_interval([]) is None and t_interval([0.2]).verdict == "inconclusive"  # one seed: no interval


GAINS = {"positive": [0.10, 0.12, 0.11], "negative": [-0.10, -0.12, -0.11], "zero": [0.0, 0.0, 0.0],
         "noisy": [0.05, -0.04, 0.01]}


def gains_bench(root: Path, per_seed: dict[str, list[float]]) -> Path:
    """Three seeds of one lr; averager <case> is raw's held-out loss minus that seed's gain, at every evaluation
    (raw's own curve differs per seed, as seeds do: only the paired gain is fixed)."""
    for seed in range(3):
        raw = [3.0 - 0.2 * i + 0.3 * seed for i in range(5)]
        curves = {"raw": raw, **{case: [v - g[seed] for v in raw] for case, g in per_seed.items()}}
        report_run(root / "gpt2", 0.1, seed, curves)
    return root


def test_paired_gains_are_labelled_held_not_held_or_inconclusive(tmp_path):
    from lawa_suite.report.paired import phase_gains, t_interval

    runs = [read_run(p) for p in find_runs([gains_bench(tmp_path, GAINS)])]
    labels = {case: t_interval(phase_gains(runs, "raw", case, "loss", "min", 0.25, 0.75)).verdict for case in GAINS}
    assert labels == {"positive": "held", "negative": "did not hold", "zero": "inconclusive",
                      "noisy": "inconclusive"}
    report = write_bench_report([tmp_path], tmp_path / "out").read_text()
    assert "| positive | +0.1100 [+0.0852, +0.1348] over 3 seeds: held |" in report  # early: the step-10 evaluation
    assert "| negative | -0.1100 [-0.1348, -0.0852] over 3 seeds: did not hold |" in report


def test_claim_b_is_judged_on_paired_early_mid_gains_whichever_way_they_fall(tmp_path):
    from lawa_suite.report.bench import summarise_lr
    from lawa_suite.report.claims import claim_b

    for name, lawa_gain, expected in (("ahead", [0.10, 0.12, 0.11], "held"),
                                      ("behind", [-0.10, -0.12, -0.11], "did not hold"),
                                      ("tied", [0.05, -0.04, 0.01], "inconclusive")):
        root = gains_bench(tmp_path / name, {"lawa": lawa_gain, "ema": [0.0, 0.0, 0.0]})
        runs = [read_run(p) for p in find_runs([root])]
        verdict, = claim_b("gpt2 lr=0.1", summarise_lr(0.1, runs, "loss", "min"))
        assert verdict.outcome == expected, verdict.evidence
        assert "LAWA over ema:" in verdict.evidence and "at the end" in verdict.evidence


def test_the_tuned_lr_is_raws_best_final_and_gains_are_drawn_against_lr(tmp_path):
    report = write_bench_report([report_bench(tmp_path)], tmp_path / "out")
    text = report.read_text()
    # raw's seed-mean final: 2.4 at lr=0.1 (2.3, 2.5), 2.6 at lr=0.01: 0.1 is tuned, 0.01 lies 8.3% off it
    assert "### Gain against the learning rate (tuned lr = 0.1: raw's best final loss)" in text
    assert "| 0.01 | 2.6000 | lower, raw 8.3% off the tuned: trains worse |" in text
    assert "| 0.1 | 2.4000 | tuned (raw's best final) | +0.2500 [+0.2500, +0.2500] over 2 seeds / +0.3000" in text
    assert (tmp_path / "out" / "gpt2-cpu-lrs.png").stat().st_size > 5_000


def test_claim_g_sets_a_constant_runs_averagers_against_the_cosine_runs_raw(tmp_path):
    root = tmp_path / "bench"
    for seed, shift in ((0, 0.0), (1, 0.1)):  # seed 1's cosine raw a little higher at step 40: a spread over seeds
        cosine = report_run(root / "cosine", 0.1, seed, {"raw": [3.0 + shift, 2.6 + shift, 2.3 + shift,
                                                                 2.1 + shift + 0.2 * shift, 2.0 + shift]})
        constant = report_run(root / "constant", 0.1, seed,
                              {"raw": [3.0 + shift, 2.7 + shift, 2.5 + shift, 2.45 + shift, 2.4 + shift],
                               "lawa": [None, 2.4 + shift, 2.1 + shift, 2.0 + shift, 1.9 + shift]})
        for run, schedule in ((cosine, "cosine"), (constant, "constant")):
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["schedule"] = schedule
            (run / "config.yaml").write_text(yaml.safe_dump(config))
    text = write_bench_report([root], tmp_path / "out").read_text()
    # cosine raw: smoothed final mean(2.3, 2.1, 2.0) = 2.1333, reached between step 30 (2.3) and 40 (2.1) at 38.33;
    # the constant run's LAWA gets there between 20 (2.4) and 30 (2.1) at 28.89: 1 - 28.89/38.33 = +25% saved
    assert "averaging replaces learning-rate decay" in text
    assert "gpt2 lr=0.1, constant run's lawa: held; steps saved to reach the cosine run's raw smoothed final loss, " \
           "as a fraction of that run's own: +25% [" in text
    assert "constant run's raw: did not hold" in text  # the constant run's own raw weights never get there
    assert "never reached in 2 seed(s) (counted as needing the whole run)" in text  # so its figure is a bound


def test_a_single_run_report_names_the_phase_where_averaging_helped_or_says_it_did_not(tmp_path):
    from lawa_suite.report.run import write_report

    # steps 10..50 of 50: early = step 10, mid = 20 and 30, late = 40 and 50
    helped = report_run(tmp_path / "a", 0.1, 0, {"raw": [3.0, 2.8, 2.6, 2.3, 2.2], "lawa": [3.1, 2.6, 2.5, 2.3, 2.25]})
    text = write_report(helped).read_text()
    assert "Averaging helped most in the mid phase (25%-75% of the steps): lawa was ahead of raw at 2 of 2 " \
           "evaluations, by +0.1500 loss on average" in text
    assert "| lawa | -0.1000 (ahead at 0/1) | +0.1500 (ahead at 2/2) | -0.0250 (ahead at 0/2) |" in text
    assert (helped / "gains.png").stat().st_size > 5_000
    did_not = report_run(tmp_path / "b", 0.1, 0, {"raw": [3.0, 2.8, 2.6, 2.3, 2.2], "lawa": [3.1, 2.9, 2.7, 2.4, 2.2]})
    text = write_report(did_not).read_text()
    assert "In this run no averager was ahead of raw in loss on average in any phase" in text


def test_claim_a_compares_the_highest_lr_that_still_trains_with_the_lowest(tmp_path):
    root = report_bench(tmp_path)
    report_run(root / "gpt2", 1.0, 0, {"raw": [3.5, 3.2, 3.0, 2.9, 2.9], "lawa": [None, 2.9, 2.7, 2.6, 2.6],
                                     "swa": [None, None, None, 2.8, 2.8], "swa_early": [None, 3.1, 2.9, 2.8, 2.8]})
    text = write_bench_report([root], tmp_path / "out").read_text()
    # lr=1.0 ends at 2.9, 21% worse than the tuned lr=0.1 (2.4): another regime, left out of (a)
    assert "LAWA's early-mid gain at lr=0.1 minus at lr=0.01" in text
    assert "(lr 1 left out: raw trains more than 5% worse there than at the tuned lr=0.1)" in text
    assert "| 1 | 2.9000 | higher, raw 20.8% off the tuned: trains worse |" in text


def test_claim_f_judges_each_averagers_fid_against_raw_where_no_loss_was_recorded(tmp_path):
    root = tmp_path / "bench"
    for seed, shift in ((0, 0.0), (1, 3.0)):  # final gains 4.0 and 4.1: seeds differ, so the interval means something
        run = report_run(root, 1e-3, seed, {"raw": [90 + shift, 70 + shift, 60 + shift, 55 + shift, 52 + shift],
                                          "lawa": [None, 65 + shift, 55 + shift, 50 + shift, 48 + shift - shift / 30]})
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.update(task="ddpm", averager=["lawa"])
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = (run / "metrics.jsonl").read_text().replace('"loss"', '"fid_standin"')
        (run / "metrics.jsonl").write_text(metrics)
    text = write_bench_report([root], tmp_path / "out").read_text()
    # at the end and early-mid (steps 20, 30: gains 5 and 5 in both seeds: no spread, inconclusive)
    assert "held, 1 inconclusive (of 2); carried by fid_standin in 1, no metric (inconclusive on all) in 1.**" in text
    assert "ddpm (cpu) lr=0.001, lawa, end: held; gain over raw at the end, fid_standin (its sample count not saved) " \
           "through the offline random-feature stand-in network, not Inception: +4.05 [+3.41, +4.69] over 2 seeds " \
           "(held)" in text


def test_a_key_added_to_the_suite_later_counts_at_its_default_so_old_and_new_runs_stay_one_experiment():
    """A reference bench run over several sittings: cells written before `compile`/`distributed` existed group with
    cells written after (their defaults keep the old behaviour); a non-default value is another experiment."""
    from lawa_suite.config import resolve
    from lawa_suite.report.bench import RunRecord, experiment_key

    new = yaml.safe_load(resolve(["task=cifar", "preset=tiny"]).to_yaml())
    old = {k: v for k, v in new.items() if k not in ("compile", "distributed")}

    def record(config):
        return RunRecord(Path("x"), "cifar", "tiny", 0.05, 0, 16, config, {}, [])

    assert experiment_key(record(old)) == experiment_key(record(new))
    assert experiment_key(record(old)) != experiment_key(record({**new, "compile": True}))
