"""Averager profiles: every registered averager (plugins included) against its documented formula, and the
built-ins against the papers' formulas implemented here independently (EDM2, WSM, BEMA, timm's warm-up)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.averagers.base import Averager
from lawa_suite.averagers.phema import PowerEMA, gamma_to_sigma, sigma_to_gamma
from lawa_suite.cli import app
from lawa_suite.averagers.weight_profiles import profile

TOTAL = 1000  # steps: every built-in's defaults are ready by then


# -- the contract, for every registered averager -------------------------------------------------------------
def contract_names() -> list[str]:
    """Every registered averager but the test suite's own stand-ins (the never-ready ``spy`` of conftest, registered
    only while a test that asks for it runs, and any a test module registers), which users could not pick."""
    return [n for n in registry.averagers.names()
            if not registry.averagers.get(n).__module__.split(".")[-1].startswith(("test_", "conftest"))]


@pytest.mark.parametrize("name", contract_names())
def test_profile_matches_the_documented_formula_and_sums_to_one(name: str) -> None:
    """Fed one-hot observations, the class's own update code gives the weight of each step; it must be the formula
    the class documents (``documented_profile``) and, for an average, sum to 1."""
    cls = registry.averagers.get(name)
    found = profile(cls, {}, TOTAL)
    assert found is not None, f"{name} is not ready after {TOTAL} steps with its defaults"
    if cls.is_average:
        assert found.total_weight == pytest.approx(1.0, abs=1e-12)
    documented = cls.documented_profile(cls.Config(), TOTAL)
    if documented is not None:
        np.testing.assert_allclose(found.weights, documented, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "config"), [
    ("ema", {"decay": 0.99, "every": 3, "start": 10}),
    ("ema", {"decay": 0.999, "warmup": True, "power": 0.75}),
    ("swa", {"start": 0.5, "every": 2}),
    ("lawa", {"k": 3, "nu": 7}),
    ("phema", {"sigma_rel": [0.05], "every": 4}),
    ("wma", {"k": 4, "nu": 50, "shape": "cosine"}),
    ("bema", {"every": 5, "start": 20, "eta": 0.0}),
])
def test_profile_matches_the_documented_formula_off_the_defaults(name: str, config: dict[str, Any]) -> None:
    cls = registry.averagers.get(name)
    found = profile(cls, config, 900)
    assert found is not None
    np.testing.assert_allclose(found.weights, cls.documented_profile(cls.Config(**config), 900), rtol=0, atol=1e-12)


def test_binned_profile_is_the_exact_profile_summed_per_bin() -> None:
    exact = profile(PowerEMA, {"sigma_rel": [0.08]}, 1200)
    binned = profile(PowerEMA, {"sigma_rel": [0.08]}, 1200, bins=40)
    assert binned is not None and exact is not None and binned.binned and len(binned.weights) == 40
    np.testing.assert_allclose(binned.weights, exact.weights.reshape(40, 30).sum(axis=1), atol=1e-12)


# -- the papers' formulas, implemented here ------------------------------------------------------------------
def edm2_gamma(sigma_rel: float) -> float:
    """EDM2 Algorithm 2 by bisection on the closed form of sigma_rel(gamma) (Eq. 123), not by polynomial roots."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("sigma_rel", [0.02, 0.05, 0.10, 0.20, 0.28])
def test_gamma_is_edm2s_root(sigma_rel: float) -> None:
    assert sigma_to_gamma(sigma_rel) == pytest.approx(edm2_gamma(sigma_rel), rel=1e-9)
    assert gamma_to_sigma(sigma_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two tracks
    assert sigma_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


@pytest.mark.parametrize("every", [1, 3, 10])
def test_phema_online_equals_edm2s_update_rule(every: int) -> None:
    """avg = lerp(avg, w, 1 - (1 - dt/t)^(gamma+1)) per update, in float64 here, two tracks at once."""
    torch.manual_seed(0)
    weights = [torch.randn(5, dtype=torch.float64) for _ in range(60)]
    phema = PowerEMA(sigma_rel=[0.05, 0.10], every=every)
    oracles: list[Any] = [None, None]
    last = 0
    for t, w in enumerate(weights, start=1):
        phema.observe(t, {"w": w})
        if t % every:
            continue
        for i, s in enumerate((0.05, 0.10)):
            g = edm2_gamma(s)
            beta = (1 - (t - last) / t) ** (g + 1)
            oracles[i] = w.clone() if oracles[i] is None else beta * oracles[i] + (1 - beta) * w
        last = t
    torch.testing.assert_close(phema.average()["w"], oracles[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phema._tracks[1][0], oracles[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("every", [1, 10, 100])
def test_phema_profile_has_the_requested_sigma_rel_whatever_every(every: int) -> None:
    """The check ema-pytorch's KarrasEMA fails: its per-update beta ignores update_every."""
    found = profile(PowerEMA, {"sigma_rel": [0.10], "every": every}, 20_000)
    assert found is not None
    assert found.sigma_rel == pytest.approx(0.10, abs=1e-3)
    assert found.centre == pytest.approx(0.888, abs=5e-3)  # EDM2's profile t^6.94 on [0, T]: mean (g+1)/(g+2)


class KarrasEMALike(PowerEMA):
    """ema-pytorch 0.8.3's rule: beta = (1 - 1/(n + 1))^(gamma + 1) with n the calls so far, every update_every."""
    name = "karras-like"

    def _update(self, step: int, floats: list[torch.Tensor]) -> None:
        self._updated = step - 1  # dt = 1 whatever the update interval
        super()._update(step, floats)


def test_the_profile_check_catches_ema_pytorchs_update_every_mistake() -> None:
    """Both checks fail for the ema-pytorch rule: its sigma_rel and centre, and its documented (EDM2) profile."""
    found = profile(KarrasEMALike, {"sigma_rel": [0.10], "every": 100}, 20_000)
    assert found is not None
    assert found.centre < 0.2 and abs(found.sigma_rel - 0.10) > 0.05  # centred near 7% of training, not 89%
    exact = profile(KarrasEMALike, {"sigma_rel": [0.10], "every": 100}, 4000)
    documented = KarrasEMALike.documented_profile(KarrasEMALike.Config(sigma_rel=[0.10], every=100), 4000)
    assert np.abs(exact.weights - np.asarray(documented)).max() > 0.01


def wsm_coefficients(k: int, decay: Any) -> list[float]:
    """WSM (arXiv 2507.17634): c_0 = 1 - w_1, c_j = w_j - w_(j+1), c_last = w_last, with w_j = decay(j / k)."""
    w = [decay(j / k) for j in range(k)]
    return [1 - w[1]] + [w[j] - w[j + 1] for j in range(1, k - 1)] + [w[k - 1]]


@pytest.mark.parametrize(("shape", "decay"), [
    ("1-sqrt", lambda x: 1 - math.sqrt(x)),
    ("cosine", lambda x: (1 + math.cos(math.pi * x)) / 2),
    ("linear", lambda x: 1 - x),
])
def test_wma_weights_are_wsms_coefficients(shape: str, decay: Any) -> None:
    k, nu = 5, 20
    found = profile(registry.averagers.get("wma"), {"k": k, "nu": nu, "shape": shape}, 230)
    assert found is not None
    expected = np.zeros(230)
    for j, c in enumerate(wsm_coefficients(k, decay)):
        expected[220 - (k - 1 - j) * nu - 1] = c  # window 140, 160, ..., 220, oldest first
    np.testing.assert_allclose(found.weights, expected, atol=1e-12)
    assert (found.weights >= 0).all()


def test_wma_uniform_and_linear_are_lawa() -> None:
    lawa = profile(registry.averagers.get("lawa"), {"k": 4, "nu": 25}, 300)
    for shape in ("uniform", "linear"):
        wma = profile(registry.averagers.get("wma"), {"k": 4, "nu": 25, "shape": shape}, 300)
        np.testing.assert_allclose(wma.weights, lawa.weights, atol=1e-12)


def test_bema_equals_trls_formula() -> None:
    """TRL's BEMACallback: ema <- (1 - b) ema + b w with b = (rho + gamma t)^-kappa; output alpha (w - w0) + ema."""
    torch.manual_seed(1)
    weights = [torch.randn(4, dtype=torch.float64) for _ in range(40)]
    rho, gamma, kappa, eta = 10.0, 1.0, 0.5, 0.2
    bema = registry.averagers.create("bema", rho=rho, gamma=gamma, kappa=kappa, eta=eta, every=1, start=3)
    w0 = ema = None
    for step, w in enumerate(weights, start=1):
        bema.observe(step, {"w": w})
        if step < 3:
            continue
        if w0 is None:
            w0, ema, out = w.clone(), w.clone(), w.clone()
            continue
        t = step - 3
        b = (rho + gamma * t) ** -kappa
        ema = (1 - b) * ema + b * w
        out = (rho + gamma * t) ** -eta * (w - w0) + ema
    torch.testing.assert_close(bema.average()["w"], out, rtol=1e-12, atol=1e-12)


def test_ema_warmup_is_timms_decay() -> None:
    """timm ModelEmaV3 / diffusers EMAModel: decay_t = min(decay, 1 - (1 + t / inv_gamma)^-power)."""
    torch.manual_seed(2)
    weights = [torch.randn(3, dtype=torch.float64) for _ in range(30)]
    ema = registry.averagers.create("ema", decay=0.95, warmup=True, inv_gamma=2.0, power=0.75)
    oracle = None
    for step, w in enumerate(weights, start=1):
        ema.observe(step, {"w": w})
        if oracle is None:
            oracle = w.clone()
            continue
        d = min(0.95, 1 - (1 + (step - 1) / 2.0) ** -0.75)
        oracle = d * oracle + (1 - d) * w
    torch.testing.assert_close(ema.average()["w"], oracle, rtol=1e-12, atol=1e-12)


# -- a plugin is held to the same contract ----------------------------------------------------------------
class HalfLast(Averager):
    """A plugin that documents 'the mean of the last two observations' but keeps only the newest."""
    name = "half-last"

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: list[torch.Tensor] = []

    @property
    def ready(self) -> bool:
        return bool(self._last)

    def wants(self, step: int) -> bool:
        return True

    def _update(self, step: int, floats: list[torch.Tensor]) -> None:
        self._last = [t.clone() for t in floats]

    def _averaged_floats(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._last]

    @classmethod
    def documented_profile(cls, config: Any, total: int) -> list[float] | None:
        return [0.5 if s >= total - 1 else 0.0 for s in range(1, total + 1)]

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Any) -> None:
        pass


def test_a_plugin_that_breaks_its_documented_profile_fails_the_contract() -> None:
    found = profile(HalfLast, {}, 10)
    assert found is not None and found.total_weight == pytest.approx(1.0)
    documented = np.asarray(HalfLast.documented_profile(HalfLast.Config(), 10))
    assert np.abs(found.weights - documented).max() == pytest.approx(0.5)  # what the contract test would flag


# -- suite profile ------------------------------------------------------------------------------------------
def test_suite_profile_draws_every_averager_and_reports_sigma_rel(tmp_path) -> None:
    out = tmp_path / "p.png"
    result = CliRunner().invoke(app, ["profile", "averager=lawa,phema,wma", "steps=2000", "phema.sigma_rel=0.05,0.1",
                                      f"out={out}"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    lines = [line for line in result.output.splitlines() if "sigma_rel" in line]
    assert len(lines) == 4 and "phema-sigma_rel0.05: weights sum to 1.000000" in result.output
    assert "sigma_rel 0.0500" in result.output and "sigma_rel 0.1000" in result.output


@pytest.mark.parametrize(("words", "message"), [
    (["steps=0"], "steps: expected an integer in 1..100000"),
    (["out=p.jpg"], "out: expected a .png file"),
    (["averager=lawq"], "lawa"),
    (["averager=lawa", "lawa.k=0"], "lawa.k: expected an integer >= 1"),
    (["averager=lawa", "steps=10"], "no averager is ready after 10 steps"),
])
def test_suite_profile_bad_input_is_one_line(words: list[str], message: str, tmp_path) -> None:
    result = CliRunner().invoke(app, ["profile", *words], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output
