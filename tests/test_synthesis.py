"""Post-hoc EMA (EDM2's reconstruction) from the averages phema stores: the math against numerical integration, the
whole pipeline on one-hot trajectories (so the output *is* its profile), refusals, and the loop's stored files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lawa_suite.averagers.phema import (PowerEMA, gamma_to_sigma, profile_inner, sigma_to_gamma,
                                        synthesis_coefficients)
from lawa_suite.checkpoints import save_tensors_atomic
from lawa_suite.errors import PosthocError
from lawa_suite.posthoc import average, parse_jobs
from lawa_suite.averagers.weight_profiles import profile


def numeric_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """<p_a, p_b> by the midpoint rule, p(t) = (g+1) t^g / T^(g+1) on [0, T]."""
    m = min(t_a, t_b)
    t = (np.arange(200_000) + 0.5) / 200_000 * m
    p_a = (g_a + 1) * t ** g_a / t_a ** (g_a + 1)
    p_b = (g_b + 1) * t ** g_b / t_b ** (g_b + 1)
    return float((p_a * p_b).sum() * m / 200_000)


@pytest.mark.parametrize(("t_a", "s_a", "t_b", "s_b"), [(100, 0.05, 100, 0.05), (60, 0.10, 100, 0.05),
                                                        (100, 0.20, 35, 0.10), (1e6, 0.05, 5e5, 0.2)])
def test_profile_inner_product_against_numerical_integration(t_a, s_a, t_b, s_b) -> None:
    g_a, g_b = sigma_to_gamma(s_a), sigma_to_gamma(s_b)
    got = float(profile_inner(np.float64(t_a), np.float64(g_a), np.float64(t_b), np.float64(g_b)))
    assert got == pytest.approx(numeric_inner(t_a, g_a, t_b, g_b), rel=1e-4)


def test_a_stored_profile_is_reconstructed_exactly_from_itself() -> None:
    steps = [25, 50, 75, 100] * 2
    gammas = [sigma_to_gamma(0.05)] * 4 + [sigma_to_gamma(0.10)] * 4
    x, error = synthesis_coefficients(steps, gammas, 100, sigma_to_gamma(0.10))
    assert error < 1e-6 and x.sum() == pytest.approx(1.0)
    assert x[7] == pytest.approx(1.0, abs=1e-6)


# -- the whole pipeline on a one-hot trajectory ---------------------------------------------------------------
def stored_run(tmp_path: Path, total: int, snapshot_every: int, sigmas: list[float], every: int = 1) -> Path:
    """A run folder whose phema stored its tracks while observing one-hot vectors: any output made from these
    files is a vector of weights over the run's steps, its profile."""
    run = tmp_path / "run"
    (run / "averages" / "phema").mkdir(parents=True)
    (run / "config.yaml").write_text("task: gpt2\n")
    phema = PowerEMA(sigma_rel=sigmas, every=every, snapshot_every=snapshot_every)
    for step in range(1, total + 1):
        one_hot = torch.zeros(total, dtype=torch.float64)
        one_hot[step - 1] = 1.0
        phema.observe(step, {"w": one_hot, "count": torch.tensor([step])}, checked=True)
        for stored in phema.stored_averages(step):
            save_tensors_atomic(run / "averages" / "phema" / f"{stored.label}.safetensors", stored.tensors,
                                stored.metadata)
    return run


def test_reconstructed_ema_is_the_online_ema_of_that_length_up_to_the_stated_error(tmp_path: Path) -> None:
    total = 800
    run = stored_run(tmp_path, total, snapshot_every=50, sigmas=[0.05, 0.10])
    result = average(run, parse_jobs(["phema"], {"phema.sigma_rel": "0.07,0.10,0.15"}), tmp_path / "out",
                     interval=400)
    assert result.outputs == {f"phema-sigma_rel{s}": [400, 800] for s in ("0.07", "0.1", "0.15")}
    for sigma in (0.07, 0.10, 0.15):
        folder = tmp_path / "out" / f"phema-sigma_rel{sigma}"
        manifest = json.loads((folder / "manifest.json").read_text())
        entry = manifest["outputs"][-1]
        assert entry["step"] == 800 and sum(entry["coefficients"].values()) == pytest.approx(1.0)
        got = load_file(folder / "step-00000800.safetensors")
        assert got["count"].tolist() == [800]  # non-float tensors: from the newest stored average it uses
        online = profile(PowerEMA, {"sigma_rel": [sigma]}, total)
        distance = np.linalg.norm(got["w"].numpy() - online.weights) / np.linalg.norm(online.weights)
        # the discrete profiles differ by about the continuous profiles' stated error
        assert distance <= max(2 * entry["profile_error"], 1e-9), (sigma, distance, entry["profile_error"])
        assert entry["profile_error"] < 0.02
        assert gamma_to_sigma(entry["gamma"]) == pytest.approx(sigma)
    tracked = load_file(tmp_path / "out" / "phema-sigma_rel0.1" / "step-00000800.safetensors")["w"]
    stored = load_file(run / "averages" / "phema" / "step-00000800-sigma-0.1000.safetensors")["w"]
    torch.testing.assert_close(tracked, stored, rtol=0, atol=1e-9)  # a stored track comes back as itself


@pytest.mark.parametrize(("keys", "interval", "message"), [
    ({"phema.sigma_rel": "0.25"}, None, "relative error"),
    ({"phema.sigma_rel": "0.1"}, 300, "interval=300 asks for step(s) 300, 900"),
    ({"phema.sigma_rel": "0.08", "phema.max_error": "1e-9"}, None, "max_error=1e-09"),
])
def test_a_request_the_stored_averages_cannot_answer_is_refused(tmp_path: Path, keys, interval, message) -> None:
    run = stored_run(tmp_path, 1000, snapshot_every=200, sigmas=[0.05, 0.10])
    with pytest.raises(PosthocError, match="nothing was written") as caught:
        average(run, parse_jobs(["phema"], keys), tmp_path / "out", interval=interval)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_reconstruction_and_trajectory_replay_are_two_commands(tmp_path: Path) -> None:
    run = stored_run(tmp_path, 100, snapshot_every=50, sigmas=[0.05, 0.10])
    with pytest.raises(PosthocError, match="lawa replay the saved trajectory, while phema are reconstructed"):
        average(run, parse_jobs(["phema", "lawa"], {}), tmp_path / "out")


def test_the_loop_stores_every_track_with_its_step_sigma_and_gamma(tmp_path: Path) -> None:
    from lawa_suite.config import resolve
    from lawa_suite.training.loop import train

    cfg = resolve(["task=gpt2", "preset=tiny", "averager=phema", "phema.sigma_rel=0.05,0.1", "phema.every=2",
                   "phema.snapshot_every=10", "steps=20", "eval.every=20", f"out={tmp_path / 'run'}",
                   "progress=false"])
    train(cfg)
    folder = tmp_path / "run" / "averages" / "phema"
    stored = [f"step-000000{s}-sigma-{x}.safetensors" for s in (10, 20) for x in ("0.0500", "0.1000")]
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS"] + stored  # and the sha256 of each
    with safe_open(str(folder / "step-00000020-sigma-0.0500.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float32}
    assert (meta["step"], meta["sigma_rel"], meta["every"], meta["averager"]) == ("20", "0.05", "2", "phema")
    assert float(meta["gamma"]) == pytest.approx(sigma_to_gamma(0.05))
    out = average(tmp_path / "run", parse_jobs(["phema"], {"phema.sigma_rel": "0.07"}), tmp_path / "ph")
    assert out.outputs == {"phema-sigma_rel0.07": [20]}
