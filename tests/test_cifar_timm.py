"""timm models in the image task (issue 17, part 5): `cifar.model=<timm name>` trains with every averager, exports
timm's own Hub folder that `timm.create_model` loads with the same outputs; bad names and arguments are one-line
errors. The suite's PreAct-ResNet-18 stays the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve

runner = CliRunner()


def run_tiny(tmp_path: Path, *words: str) -> Path:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "task=cifar", "preset=tiny", "steps=8", "eval.every=4", "averager=lawa,ema",
                                 "lawa.k=2", "lawa.nu=2", f"out={out}", "progress=false", *words])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name, words", [("test_resnet", ()), ("test_vit", ("cifar.patch_size=8",))])
def test_a_timm_model_trains_and_exports_a_folder_timm_loads_with_the_same_outputs(tmp_path, name, words):
    import timm

    from lawa_suite import registry
    from lawa_suite.export import select_weights
    from lawa_suite.rundir import load_resolved

    run = run_tiny(tmp_path, f"cifar.model={name}", *words)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["weights"] for r in rows if r.get("split") == "val" and r["step"] == 8} == {"raw", "lawa", "ema"}

    result = runner.invoke(app, ["export", str(run), f"out={tmp_path / 'timm'}", "weights=ema"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 10
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()

    cfg = load_resolved(run)
    task = registry.tasks.get("cifar")(cfg.task, cfg.run)
    task.setup()
    suite_model = task.build_model().eval()
    weights, _ = select_weights(run, "ema", cfg)
    suite_model.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), suite_model(x))
    if words:  # the patch size it was trained with travels in config.json
        assert config["model_args"]["patch_size"] == 8 and config["model_args"]["img_size"] in (32, [32, 32])


def test_the_default_stays_the_papers_preact_resnet_and_exports_the_suites_own_folder(tmp_path):
    cfg = resolve(["task=cifar", "preset=tiny"])
    assert cfg.task.model == "preact_resnet18"
    run = run_tiny(tmp_path)
    result = runner.invoke(app, ["export", str(run), f"out={tmp_path / 'x'}"])
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in (tmp_path / "x").iterdir()}


def test_bad_model_names_and_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"model: expected 'preact_resnet18' .* got 'resnet_18'; did you mean .*"
                                          r"'resnet18'"):
        resolve(["task=cifar", "cifar.model=resnet_18"])
    with pytest.raises(ConfigError, match=r"patch_size: expected 0 for resnet18 \(it has no patches"):
        resolve(["task=cifar", "cifar.model=resnet18", "cifar.patch_size=4"])
    with pytest.raises(ConfigError, match=r"patch_size: expected 0 for preact_resnet18"):
        resolve(["task=cifar", "cifar.patch_size=4"])
    with pytest.raises(ConfigError, match=r"patch_size: expected an integer >= 0"):
        resolve(["task=cifar", "cifar.model=vit_tiny_patch16_224", "cifar.patch_size=-1"])
    result = runner.invoke(app, ["run", "task=cifar", "cifar.model=resnet_18"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_a_layout_onednn_hangs_on_is_refused_before_any_work(tmp_path):
    """cifar.width 4 in channels-last (or compiled) on CPU hangs inside oneDNN (#6035): one line, exit 2, no run."""
    if torch.cuda.is_available():
        pytest.skip("the refusal applies to CPU runs only")
    result = runner.invoke(app, ["run", "task=cifar", "preset=tiny", "cifar.channels_last=true",
                                 f"out={tmp_path / 'r'}"])
    assert result.exit_code == 2 and "cifar.width: expected >= 8 with compile=true" in result.output
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
