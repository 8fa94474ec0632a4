"""Averaging Hugging Face model folders writes model folders that `from_pretrained` loads (issue 17, part 2):
transformers GPT-2 (tied lm_head left out by save_pretrained) and GPT-NeoX (Pythia's architecture, sharded),
a diffusers UNet2DModel; the describing files carried over, training state not; `suite export` of such an average.
Every model here is built locally and tiny."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()
STEPS = (10, 20, 30)


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The oracle: the plain mean of every float tensor, accumulated in float64."""
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def save_checkpoints(build, root: Path, **save_kwargs) -> list[dict[str, torch.Tensor]]:
    """checkpoint-N/ folders as the Trainer writes them: the model, its describing files, and training state."""
    states = []
    for step in STEPS:
        torch.manual_seed(step)
        model = build()
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder, **save_kwargs)
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "step": step}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({"state": {}}, folder / "optimizer.pt")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def assert_same_logits(loaded: torch.nn.Module, oracle: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``loaded`` (from the output folder) gives the logits of ``oracle`` holding ``state``."""
    oracle.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, oracle.eval()(input_ids=tokens).logits,
                                   rtol=1e-5, atol=1e-5)


def average_folders(source: Path, out: Path, *words: str) -> None:
    result = runner.invoke(app, ["average", str(source), *words, f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "the inputs are model folders" in result.output


def test_gpt2_folders_average_into_a_folder_from_pretrained_loads_with_tied_weights(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    states = save_checkpoints(lambda: GPT2LMHeadModel(config), tmp_path / "ckpts")
    average_folders(tmp_path / "ckpts", tmp_path / "out", "averager=lawa", "lawa.k=3", "lawa.nu=10")

    folder = tmp_path / "out" / "lawa-k3-nu10" / "step-00000030"
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer_config.json"]  # no optimizer,
    # no trainer state; SHA256SUMS: the weights file's sha256, size and mtime as written
    assert json.loads((folder / "tokenizer_config.json").read_text())["step"] == 30  # from the newest input
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied in the input, so left out as the input had it
        assert f.metadata()["format"] == "pt"
    manifest = json.loads((tmp_path / "out" / "lawa-k3-nu10" / "manifest.json").read_text())
    assert manifest["outputs"][0]["file"] == "step-00000030/model.safetensors"
    assert manifest["outputs"][0]["carried"] == ["config.json", "generation_config.json", "tokenizer_config.json"]

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert_same_logits(loaded, GPT2LMHeadModel(config), mean_state(states))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_sharded_gpt_neox_folders_average_into_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                           vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    states = save_checkpoints(lambda: GPTNeoXForCausalLM(config), tmp_path / "ckpts", max_shard_size="4KB")
    assert (tmp_path / "ckpts" / "checkpoint-10" / "model.safetensors.index.json").is_file()  # really sharded
    average_folders(tmp_path / "ckpts", tmp_path / "out", "averager=swa", "swa.start=0")

    folder = tmp_path / "out" / "swa-start0.0" / "step-00000030"
    assert not any(p.name.endswith(".index.json") for p in folder.iterdir())  # one file, the index not carried
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert_same_logits(loaded, GPTNeoXForCausalLM(config), mean_state(states))


def test_diffusers_unet_folders_average_into_a_loadable_folder(tmp_path):
    from diffusers import UNet2DModel

    def build() -> UNet2DModel:
        return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"))

    states = save_checkpoints(build, tmp_path / "ckpts")
    average_folders(tmp_path / "ckpts", tmp_path / "out", "averager=swa", "swa.start=0")

    folder = tmp_path / "out" / "swa-start0.0" / "step-00000030"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2DModel.from_pretrained(folder).eval()
    oracle = build().eval()
    oracle.load_state_dict(mean_state(states))
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 5).sample, oracle(x, 5).sample, rtol=1e-5, atol=1e-5)


def test_suite_export_takes_an_average_of_folders_without_the_tied_lm_head(tmp_path):
    """The issue's crash: an average of save_pretrained folders lacks lm_head.weight; export ties it again."""
    from transformers import AutoModelForCausalLM

    from lawa_suite import registry
    from lawa_suite.config import resolve

    cfg = resolve(["task=gpt2", "preset=tiny", f"out={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    task = registry.tasks.get("gpt2")(cfg.task, cfg.run)
    states = save_checkpoints(task.build_model, tmp_path / "ckpts")
    average_folders(tmp_path / "ckpts", tmp_path / "out", "averager=swa", "swa.start=0")
    average = tmp_path / "out" / "swa-start0.0" / "step-00000030" / "model.safetensors"

    result = runner.invoke(app, ["export", str(average), f"config={tmp_path / 'run' / 'config.yaml'}",
                                 f"out={tmp_path / 'hf'}"])
    assert result.exit_code == 0, result.output
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = mean_state(states)
    torch.testing.assert_close(loaded.lm_head.weight, expected["transformer.wte.weight"], rtol=1e-6, atol=1e-6)

    left_out = ("transformer.h.0.mlp.c_fc.weight", "lm_head.weight")  # a real weight, not only the tied one
    save_file({k: v.contiguous() for k, v in expected.items() if k not in left_out}, str(tmp_path / "bad.safetensors"))
    result = runner.invoke(app, ["export", str(tmp_path / "bad.safetensors"),
                                 f"config={tmp_path / 'run' / 'config.yaml'}", f"out={tmp_path / 'hf2'}"])
    assert result.exit_code != 0 and "transformer.h.0.mlp.c_fc.weight" in result.output
    assert not (tmp_path / "hf2").exists()
