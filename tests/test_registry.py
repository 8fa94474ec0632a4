"""Registry: built-ins, lazy entry-point plugins from fake distributions, and every way a plugin can be broken."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.cli import app
from lawa_suite.registry import PluginError, UnknownNameError

from conftest import PLUGIN_AVERAGER

GOOD_AVERAGER = PLUGIN_AVERAGER  # class Thing

# What the registry accepted before it checked the whole contract: the four methods of the design's public API,
# but none of what the loop also calls (wants, start_run, ready, refuse, load_average_into, post-hoc hooks).
DUCK_AVERAGER = '''
from dataclasses import dataclass
class Duck:
    @dataclass
    class Config:
        alpha: float = 0.5
    def __init__(self, **kw): self.config = self.Config(**kw)
    def observe(self, step, weights): return False
    def average(self): return None
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
'''


def make_distribution(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, dict[str, str]]) -> None:
    """A fake installed distribution: ``<dist>-1.0.dist-info`` with ``entry_points.txt``, plus its modules."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; registries forget plugins before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    for reg in (registry.averagers, registry.tasks, registry.evaluators):
        reg.reset()
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[module]
    for reg in (registry.averagers, registry.tasks, registry.evaluators):
        reg.reset()


def test_builtins_are_registered():
    assert {"ema", "lawa", "swa"} <= set(registry.averagers.names())
    assert "cifar" in registry.tasks.names()
    assert "accuracy" in registry.evaluators.names()


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(UnknownNameError) as err:
        registry.averagers.get("lawq")
    message = str(err.value)
    assert "unknown averager 'lawq'" in message and "did you mean 'lawa'" in message
    assert all(name in message.split("known: ")[1] for name in ("ema", "lawa", "swa"))
    assert "\n" not in message


def test_plugin_is_lazy_and_usable(plugin_path):
    make_distribution(plugin_path, "fancy_avg", {"fake_fancy": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"fancy": "fake_fancy:Thing"}})
    assert "fancy" in registry.averagers.names()
    assert "fake_fancy" not in sys.modules, "listing names must not import the plugin"
    avg = registry.averagers.create("fancy", alpha=0.25)
    assert avg.config.alpha == 0.25
    assert "fake_fancy" in sys.modules


@pytest.mark.parametrize("body, expected", [
    ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    ("def broken(:\n", "SyntaxError"),
    ("import sys\nsys.exit(3)\n", "SystemExit"),
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
])
def test_broken_plugin_is_reported_and_breaks_nothing(plugin_path, body, expected):
    make_distribution(plugin_path, "broken_dist", {"fake_broken": body},
                      {"lawa_suite.averagers": {"broken": "fake_broken:Thing"}})
    make_distribution(plugin_path, "fancy_avg", {"fake_fancy": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"fancy": "fake_fancy:Thing"}})
    assert "broken" in registry.averagers.names()
    with pytest.raises(PluginError) as err:
        registry.averagers.get("broken")
    assert expected in str(err.value) and "broken_dist 1.0" in str(err.value)
    assert registry.averagers.create("fancy").config.alpha == 0.5  # the other plugin still works
    assert registry.averagers.create("lawa", k=2, nu=1) is not None  # and the built-ins
    rows = {info.name: info for info in registry.averagers.describe()}
    assert not rows["broken"].ok and rows["fancy"].ok and rows["lawa"].ok


def test_wrong_interface_is_refused(plugin_path):
    make_distribution(plugin_path, "shapeless", {"fake_shapeless": "class NotAnAverager:\n    pass\n"},
                      {"lawa_suite.averagers": {"shapeless": "fake_shapeless:NotAnAverager"}})
    with pytest.raises(PluginError, match="lacks the averager interface .*observe"):
        registry.averagers.get("shapeless")


def test_a_duck_typed_averager_fails_at_selection_naming_its_distribution_and_what_it_lacks(plugin_path):
    make_distribution(plugin_path, "duck_dist", {"fake_duck": DUCK_AVERAGER},
                      {"lawa_suite.averagers": {"duck": "fake_duck:Duck"}})
    with pytest.raises(PluginError) as err:
        registry.averagers.get("duck")
    message = str(err.value)
    assert "duck_dist 1.0" in message and "lacks the averager interface" in message and "\n" not in message
    assert all(member in message for member in ("wants", "start_run", "refuse", "load_average_into", "plan_replay"))
    result = CliRunner().invoke(app, ["run", "task=toy", "averager=duck", "--dry-run"])
    assert result.exit_code == 2 and "duck_dist 1.0" in result.output and "Traceback" not in result.output


def test_an_averager_that_leaves_a_method_abstract_is_refused(plugin_path):
    body = GOOD_AVERAGER.replace("    def _update(self, step, floats): pass\n", "")
    make_distribution(plugin_path, "half_dist", {"fake_half": body},
                      {"lawa_suite.averagers": {"half": "fake_half:Thing"}})
    with pytest.raises(PluginError, match=r"does not implement _update .*half_dist 1\.0"):
        registry.averagers.get("half")


def test_name_claimed_twice_names_both(plugin_path):
    make_distribution(plugin_path, "first_dist", {"fake_first": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"dup": "fake_first:Thing"}})
    make_distribution(plugin_path, "second_dist", {"fake_second": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"dup": "fake_second:Thing"}})
    with pytest.raises(PluginError) as err:
        registry.averagers.get("dup")
    assert "first_dist 1.0" in str(err.value) and "second_dist 1.0" in str(err.value)


def test_plugin_cannot_take_a_builtin_name(plugin_path):
    make_distribution(plugin_path, "usurper", {"fake_usurper": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"lawa": "fake_usurper:Thing"}})
    with pytest.raises(PluginError) as err:
        registry.averagers.get("lawa")
    assert "built-in lawa_suite.averagers.lawa" in str(err.value) and "usurper 1.0" in str(err.value)


def test_same_distribution_seen_twice_is_not_a_conflict(plugin_path, tmp_path_factory, monkeypatch):
    make_distribution(plugin_path, "fancy_avg", {"fake_fancy": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"fancy": "fake_fancy:Thing"}})
    again = tmp_path_factory.mktemp("again")
    make_distribution(again, "fancy_avg", {"fake_fancy": GOOD_AVERAGER},
                      {"lawa_suite.averagers": {"fancy": "fake_fancy:Thing"}})
    monkeypatch.syspath_prepend(str(again))
    registry.averagers.reset()
    assert registry.averagers.create("fancy").config.alpha == 0.5


def test_cli_survives_broken_plugins(plugin_path):
    make_distribution(plugin_path, "broken_dist", {"fake_broken": "import sys\nsys.exit(1)\n"},
                      {"lawa_suite.averagers": {"broken": "fake_broken:Thing"},
                       "lawa_suite.tasks": {"brokentask": "fake_broken:Task"}})
    runner = CliRunner()
    assert runner.invoke(app, ["--help"]).exit_code == 0
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0, listing.output
    assert "broken" in listing.output and "BROKEN" in listing.output and "broken_dist 1.0" in listing.output
    assert "lawa" in listing.output and "cifar" in listing.output
    selected = runner.invoke(app, ["run", "averager=broken", "--dry-run"])
    assert selected.exit_code == 2
    assert "broken_dist 1.0" in selected.output and "SystemExit" in selected.output


def test_decorator_refuses_a_second_owner():
    class Other:
        pass
    Other.__module__ = "somewhere_else"
    with pytest.raises(PluginError, match="registered twice"):
        registry.averagers.register("lawa")(Other)
