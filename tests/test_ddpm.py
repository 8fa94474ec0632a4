"""The ddpm task, the fid evaluator and the streaming image reader. Offline: nothing here downloads.

FID runs on the stand-in feature extractor (and on a pixel extractor registered here), both through
torch-fidelity's ``register_feature_extractor``; the Inception path is tested for its offline error.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lawa_suite import checkpoints as ckpt
from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve
from lawa_suite.data import DataUnavailable
from lawa_suite.data import images as images_module
from lawa_suite.data.images import load_imagefolder
from lawa_suite.data.imagestream import FileImageStream
from lawa_suite.data.stream import IndexStream
from lawa_suite.evaluators import fid as fid_module
from lawa_suite.evaluators.fid import (FID, INCEPTION, INCEPTION_FILE, STANDIN, FeatureStats, FidConfig,
                                       create_extractor, resolve_extractor)
from lawa_suite.files import sha256_file
from lawa_suite.tasks.base import parameter_count
from lawa_suite.tasks.ddpm import ADM_IMAGENET128_PARAMS, DdpmTask, build_unet
from lawa_suite.training.loop import train

from helpers import assert_same, read_metrics

from helpers import ddpm_tiny_config, ddpm_tiny_task

runner = CliRunner()


# -- helpers ----------------------------------------------------------------------------------------
class _Zero(torch.nn.Module):
    """A "UNet" that predicts no noise at all: DDIM then only rescales its starting noise."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return type("Out", (), {"sample": torch.zeros_like(x) + self.anchor})()


class _FakeAccelerator:
    """Two processes that happened to hold the same data: reduce doubles, rank 0 is main."""
    num_processes, process_index, is_main_process = 2, 0, True

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * 2

    def wait_for_everyone(self):
        pass


# -- model ------------------------------------------------------------------------------------------
def test_presets_build_the_published_unets():
    shapes = {}
    for preset in ("tiny", "cpu", "cifar32", "imagenet128"):
        cfg = resolve(["task=ddpm", f"preset={preset}"])
        with torch.device("meta"):  # counting only: no memory, no init
            shapes[preset] = parameter_count(build_unet(cfg.task))
    assert shapes["cifar32"] == 35_746_307                       # Ho et al. 2020: 35.7M
    assert abs(shapes["imagenet128"] / ADM_IMAGENET128_PARAMS - 1) < 0.02  # ADM ImageNet-128: 421.5M
    # the ADM count includes its 1000-class embedding (1000 x 1024); unconditional, this is the rest of it exactly
    assert shapes["imagenet128"] + 1000 * 1024 == pytest.approx(ADM_IMAGENET128_PARAMS, abs=25_000)
    assert shapes["tiny"] < 100_000 and 500_000 < shapes["cpu"] < 2_000_000


def test_config_errors_name_the_key_and_what_is_allowed(tmp_path):
    cases = {"ddpm.channels=[8,10]": "ddpm.channels: expected a list of widths, each a multiple of norm_groups=4",
             "ddpm.attention=[true]": "ddpm.attention: expected 2 true/false values",
             "ddpm.sample_steps=0": "ddpm.sample_steps: expected an integer in [1, timesteps=1000]",
             "ddpm.image_size=4": "ddpm.image_size: expected an integer >= 8 divisible by 2^(levels-1) = 2",
             "fid.samples=1": "ddpm.fid.samples: expected an integer >= 2",
             "ddpm.beta_schedule=cosine":
                 "ddpm.beta_schedule: expected one of linear, scaled_linear, squaredcos_cap_v2",
             "ddpm.loader=disk": "ddpm.loader: expected one of auto, memory, stream"}
    for override, message in cases.items():
        with pytest.raises(ConfigError) as error:
            resolve(["task=ddpm", "preset=tiny", override])
        assert message in str(error.value) and "\n" not in str(error.value), override
    with pytest.raises(ConfigError, match="ddpm.loader: stream reads data=imagefolder only"):
        ddpm_tiny_task(tmp_path, "ddpm.loader=stream")
    with pytest.raises(ConfigError, match="fid.extractor: expected one of auto, .*standin.*, got 'nope'"):
        create_extractor(FidConfig(extractor="nope"))


# -- training objective and sampling ----------------------------------------------------------------
def test_loss_depends_on_seed_step_and_examples_only(tmp_path):
    task = ddpm_tiny_task(tmp_path, "ddpm.flip=true")
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.train_stream(16, 0, 1).next_batch()
    with torch.no_grad():
        torch.manual_seed(1)
        first = task.loss(model, batch, step=3)
        torch.manual_seed(2)  # global RNG must not matter: resume repeats t, the noise and the flips
        assert torch.equal(first, task.loss(model, batch, step=3))
        assert not torch.equal(first, task.loss(model, batch, step=4))


def test_tiny_model_learns_to_denoise_a_fixed_batch(tmp_path):
    cfg = ddpm_tiny_config(tmp_path)
    task = DdpmTask(cfg.task, cfg.run)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = task.build_optimizer(model, 3e-3)
    batch = task.eval_batches()[-1]  # a held-out batch: eval_loss scores it with fixed t and noise
    before = task.eval_loss(model, batch)[0].item()
    stream = task.train_stream(16, 0, 1)
    for step in range(60):
        loss = task.loss(model, stream.next_batch(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.eval_loss(model, batch)[0].item()
    assert after < 0.7 * before, (before, after)


def test_samples_start_from_the_same_noise_for_every_weights(tmp_path):
    task = ddpm_tiny_task(tmp_path)
    sample_batches = [b for b in task.eval_batches() if b["kind"] == "sample"]
    assert [b["count"] for b in sample_batches] == [16, 16]  # fid.samples=32 in batches of 16
    torch.manual_seed(5)
    first = task.sample_images(_Zero(), sample_batches[0])
    torch.manual_seed(6)
    assert torch.equal(first, task.sample_images(_Zero(), sample_batches[0]))
    assert not torch.equal(first, task.sample_images(_Zero(), sample_batches[1]))
    assert first.dtype == torch.uint8 and first.shape == (16, 3, 16, 16)
    # with eps = 0, DDIM maps x_T to x_T * sqrt(abar_0 / abar_T): the starting noise, scaled and clipped
    ddim = task.sampler()
    noise = torch.randn((16, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    scale = math.sqrt(1.0 / ddim.alphas_cumprod[int(ddim.timesteps[0])])  # the last step goes to alpha = 1
    expected = (noise * scale).clamp(-1, 1).add(1).mul(127.5).round()
    assert (first.float() - expected).abs().max() <= 1


# -- FID ----------------------------------------------------------------------------------------------
def test_feature_stats_equal_torch_fidelity_statistics_and_reduce_exactly():
    from torch_fidelity.metric_fid import fid_features_to_statistics

    g = torch.Generator().manual_seed(0)
    features = torch.randn(50, 6, generator=g, dtype=torch.float64) * 3 + 1
    stats = FeatureStats()
    for chunk in features.split(7):  # in pieces, as batches arrive
        stats.add(chunk)
    mu, sigma = stats.mean_cov()
    reference = fid_features_to_statistics(features)
    assert np.allclose(mu, reference["mu"]) and np.allclose(sigma, reference["sigma"])
    stats.reduce(_FakeAccelerator(), 6, torch.device("cpu"))  # = the stats of the features seen twice
    mu2, sigma2 = stats.mean_cov()
    doubled = fid_features_to_statistics(torch.cat([features, features]))
    assert stats.count == 100 and np.allclose(mu2, doubled["mu"]) and np.allclose(sigma2, doubled["sigma"])


class _Oracle(DdpmTask):
    """Samples that are real held-out digits, or uniform noise: what a perfect and a useless model draw."""
    noise = False

    def sample_images(self, model, batch):
        if self.noise:
            g = torch.Generator().manual_seed(batch["index"])
            return torch.randint(0, 256, (batch["count"], 3, 16, 16), generator=g, dtype=torch.uint8)
        start = batch["index"] * self.config.eval_batch_size
        return self.data.test_images[start:start + batch["count"]]


def test_fid_separates_real_samples_from_noise(tmp_path):
    cfg = ddpm_tiny_config(tmp_path, "fid.samples=128", "fid.reference=1000")
    task = _Oracle(cfg.task, cfg.run)
    task.setup()
    fid = FID(task)
    assert fid.extractor_name == STANDIN
    real = fid.evaluate(_Zero(), task.eval_batches())
    task.noise = True
    noise = fid.evaluate(_Zero(), task.eval_batches())
    assert set(real) == {"fid_standin", "loss"}  # the stand-in's distance is never called plain "fid"
    assert noise["fid_standin"] > 100 * real["fid_standin"] and noise["fid_standin"] > 100, (real, noise)
    assert real["loss"] == noise["loss"] > 0  # the held-out loss does not depend on the samples


class _PixelFeatures:
    """A test-only extractor registered with torch-fidelity: the 4x4 average-pooled gray image (16 numbers)."""

    @staticmethod
    def make():
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase

        class PixelFeatures(FeatureExtractorBase):
            def __init__(self, name, features_list, **kwargs):
                super().__init__(name, features_list)

            @staticmethod
            def get_provided_features_list():
                return ("16",)

            @staticmethod
            def get_default_feature_layer_for_metric(metric):
                return "16"

            @staticmethod
            def can_be_compiled():
                return False

            @staticmethod
            def get_dummy_input_for_compile():
                return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

            def forward(self, x):
                return (F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 4).flatten(1),)

        return PixelFeatures


def test_fid_equals_torch_fidelity_calculate_metrics_with_a_registered_extractor(tmp_path):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if "test-pixels" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("test-pixels", _PixelFeatures.make())
    cfg = ddpm_tiny_config(tmp_path, "fid.extractor=test-pixels", "fid.samples=64", "fid.reference=300")
    task = _Oracle(cfg.task, cfg.run)
    task.setup()
    task.noise = True
    ours = FID(task).evaluate(_Zero(), task.eval_batches())["fid_test_pixels"]

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    generated = torch.cat([task.sample_images(None, b) for b in task.eval_batches() if b["kind"] == "sample"])
    real = torch.cat(list(task.fid_reference_batches(300, 100)))
    theirs = torch_fidelity.calculate_metrics(input1=Images(generated), input2=Images(real), fid=True,
                                              feature_extractor="test-pixels", cuda=False, cache=False,
                                              save_cpu_ram=True, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_reference_statistics_are_computed_once_and_cached_by_count(tmp_path, monkeypatch):
    task = ddpm_tiny_task(tmp_path)
    first = FID(task).reference_stats(None, torch.device("cpu"))
    files = list((tmp_path / "cache" / "fid").glob("*.npz"))
    assert len(files) == 1 and "digits-16px-256-" in files[0].name and STANDIN in files[0].name
    monkeypatch.setattr(DdpmTask, "fid_reference_batches", lambda *a, **k: pytest.fail("recomputed, not cached"))
    again = FID(task).reference_stats(None, torch.device("cpu"))
    assert np.array_equal(first["mu"], again["mu"]) and np.array_equal(first["sigma"], again["sigma"])
    monkeypatch.undo()
    other = ddpm_tiny_task(tmp_path, "fid.reference=200")
    FID(other).reference_stats(None, torch.device("cpu"))
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 2  # another count, another file


def test_a_truncated_reference_cache_is_computed_again_not_a_traceback_on_every_run(tmp_path, capsys):
    task = ddpm_tiny_task(tmp_path)
    first = FID(task).reference_stats(None, torch.device("cpu"))
    cached = next((tmp_path / "cache" / "fid").glob("*.npz"))
    cached.write_bytes(cached.read_bytes()[:100])  # a kill while it was written (was: BadZipFile every run after)
    again = FID(task).reference_stats(None, torch.device("cpu"))
    assert np.array_equal(first["mu"], again["mu"]) and "computing them again" in capsys.readouterr().err
    assert FID(task).reference_stats(None, torch.device("cpu"))["sigma"].shape == first["sigma"].shape  # rewritten


def test_inception_offline_names_the_missing_file_and_where_to_put_it(offline_hub):
    with pytest.raises(DataUnavailable) as error:
        create_extractor(FidConfig(extractor=INCEPTION))
    message = str(error.value)
    assert "\n" not in message
    assert str(offline_hub / INCEPTION_FILE) in message and f"into {offline_hub}" in message
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE in message
    assert "fid.extractor=standin" in message and "network is unreachable" in message
    with pytest.raises(DataUnavailable, match="fid.weights: /nowhere.pth does not exist"):
        create_extractor(FidConfig(extractor=INCEPTION, weights="/nowhere.pth"))
    # auto: the stand-in while the file is missing, Inception once it is where torch-fidelity looks
    assert resolve_extractor(FidConfig(extractor="auto")) == STANDIN
    offline_hub.mkdir(parents=True, exist_ok=True)
    (offline_hub / INCEPTION_FILE).write_bytes(b"")
    assert resolve_extractor(FidConfig(extractor="auto")) == INCEPTION


def test_a_run_fails_before_training_without_the_inception_weights(tmp_path, offline_hub):
    result = runner.invoke(app, ["run", "task=ddpm", "preset=tiny", f"fid.extractor={INCEPTION}", "averager=",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 1 and INCEPTION_FILE in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def random_inception_weights(path: Path) -> None:
    """An Inception file of the right shapes with random values (the real one cannot be had offline)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    original = (inception.load_state_dict_from_url, cls.load_state_dict)
    inception.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, state: None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = cls(INCEPTION, ["2048"]).state_dict()
    finally:
        inception.load_state_dict_from_url, cls.load_state_dict = original
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_auto_uses_inception_once_its_file_is_in_the_hub_cache(tmp_path, offline_hub, monkeypatch):
    """torch-fidelity's own Inception code path, offline, with random weights in the file: the evaluator picks
    it, feeds it the task's uint8 images and caches 2048-feature reference statistics under its name. (The
    Fréchet distance itself is checked against torch-fidelity above; on 2048 features it costs ~10 s here.)
    The random file stands in for the published one, so its digest is the one expected (a file with any other
    digest is refused unread: tests/test_hostile_files.py)."""
    random_inception_weights(offline_hub / INCEPTION_FILE)
    monkeypatch.setattr(fid_module, "INCEPTION_SHA256", sha256_file(offline_hub / INCEPTION_FILE))
    # few images: Inception takes ~0.2 s an image on one CPU core
    task = ddpm_tiny_task(tmp_path, "fid.extractor=auto", "fid.reference=8")
    fid = FID(task)
    assert fid.extractor_name == INCEPTION and fid.layer == "2048"
    sample = task.sample_images(_Zero(), {"kind": "sample", "index": 0, "count": 3})
    features = fid.features(sample)
    assert features.shape == (3, 2048) and torch.isfinite(features).all() and features.std() > 0
    stats = fid.reference_stats(None, torch.device("cpu"))
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    cached = [p.name for p in (tmp_path / "cache" / "fid").glob("*.npz")]
    assert len(cached) == 1 and "digits-16px-8-" in cached[0] and f"{INCEPTION}-2048" in cached[0]


# -- the whole loop -----------------------------------------------------------------------------------
# `suite run task=ddpm averager=lawa,ema,swa preset=tiny`, once for the tests below (conftest's tiny_run)
TINY_RUN = ["task=ddpm", "averager=lawa,ema,swa", "preset=tiny", "checkpoint.every=4"]


def test_tiny_run_scores_every_weights_and_writes_sample_grids(tiny_run):
    evals = [r for r in read_metrics(tiny_run) if r["split"] == "val"]
    assert {(r["step"], r["weights"]) for r in evals} == {(s, w) for s in (4, 8) for w in ("raw", "lawa", "ema", "swa")}
    assert all(r["fid_standin"] > 0 and math.isfinite(r["fid_standin"]) and r["loss"] > 0 for r in evals)
    assert not any("fid" in r for r in evals)  # offline: the stand-in made the features, and the name says so
    grids = sorted(p.name for p in (tiny_run / "samples").iterdir())
    assert grids == [f"step-{s:08d}-{w}.png" for s in (4, 8) for w in ("ema", "lawa", "raw", "swa")]
    raw, ema = (np.asarray(Image.open(tiny_run / "samples" / f"step-00000008-{w}.png")) for w in ("raw", "ema"))
    assert raw.shape == ema.shape and raw.shape[0] >= 4 * 64 and not np.array_equal(raw, ema)
    report = (tiny_run / "report.md").read_text()
    assert "| raw |" in report and "final fid_standin" in report and "not Inception's" in report


def test_a_sample_grid_is_labelled_with_its_step_and_weights(tmp_path):
    from lawa_suite.evaluators.fid import LABEL_HEIGHT, write_grid

    images = torch.full((4, 3, 16, 16), 255, dtype=torch.uint8)
    write_grid(images, tmp_path / "plain.png")
    write_grid(images, tmp_path / "labelled.png", label="step 8: lawa")
    plain, labelled = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "labelled"))
    assert labelled.shape[0] == plain.shape[0] + LABEL_HEIGHT and labelled.shape[1] == plain.shape[1]
    assert (labelled[:LABEL_HEIGHT] < 128).any()               # text in the band
    assert np.array_equal(labelled[LABEL_HEIGHT:], plain)      # the samples themselves untouched


class _Crash(Exception):
    """Stands in for a process dying mid-run."""


def test_resume_of_a_ddpm_run_is_bit_exact(tiny_run, tmp_path, monkeypatch):
    real_loss = DdpmTask.loss

    def crash_at_step_6(self, model, batch, step):
        if step == 6:
            raise _Crash("simulated crash")
        return real_loss(self, model, batch, step)
    overrides = ["task=ddpm", "averager=lawa,ema,swa", "preset=tiny", f"out={tmp_path / 'run'}",
                 f"data.cache={tiny_run.parent / 'cache'}", "progress=false", "checkpoint.every=4"]
    monkeypatch.setattr(DdpmTask, "loss", crash_at_step_6)
    with pytest.raises(_Crash):
        train(resolve(overrides))
    monkeypatch.undo()
    train(resolve(overrides + ["resume=auto"]))  # from step 4: the noise, timesteps and data order must repeat
    final = [p / "checkpoints" / "step-00000008" for p in (tiny_run, tmp_path / "run")]
    assert_same(*(load_file(str(f / "model.safetensors")) for f in final))
    assert_same(*(ckpt.read_state(f, "state")["averagers"] for f in final))
    assert_same(*(ckpt.read_state(f, "state")["optimizer"] for f in final))
    evals = [[(r["step"], r["weights"], r["fid_standin"]) for r in read_metrics(p) if r["split"] == "val"]
             for p in (tiny_run, tmp_path / "run")]
    assert evals[0] == evals[1]


def test_export_writes_a_diffusers_pipeline_that_loads_and_samples(tiny_run, tmp_path):
    from diffusers import DDIMPipeline, DDPMPipeline

    from lawa_suite.rundir import load_resolved
    from lawa_suite.export import select_weights

    out = tmp_path / "lawa-pipeline"
    # a checkpoint folder: the task and its settings come from the run's own config.yaml above it
    result = runner.invoke(app, ["export", str(tiny_run / "checkpoints" / "step-00000008"), f"out={out}",
                                 "weights=lawa"])
    assert result.exit_code == 0, result.output
    pipeline = DDPMPipeline.from_pretrained(str(out))
    images = pipeline(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    # the pipeline holds exactly the LAWA average of the final checkpoint, not the raw weights
    cfg = load_resolved(tiny_run / "config.yaml")
    lawa, _ = select_weights(tiny_run, "lawa", cfg)
    raw, _ = select_weights(tiny_run, "raw", cfg)
    exported = pipeline.unet.state_dict()
    assert exported.keys() == lawa.keys() and all(torch.equal(exported[k], lawa[k]) for k in lawa)
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)
    assert DDIMPipeline.from_pretrained(str(out)).scheduler.config.num_train_timesteps == 1000


def test_export_of_a_copied_checkpoint_with_a_hand_written_config(tiny_run, tmp_path):
    """A checkpoint moved out of its run needs config=; a user's short config (task + preset) is enough."""
    from diffusers import DDPMPipeline

    moved = tmp_path / "step-00000008"
    shutil.copytree(tiny_run / "checkpoints" / "step-00000008", moved)
    result = runner.invoke(app, ["export", str(moved), f"out={tmp_path / 'raw'}", "weights=raw"])
    assert result.exit_code == 2 and "no config.yaml" in result.output
    assert "pass config=<run>/config.yaml" in result.output
    config = tmp_path / "configs" / "config.yaml"  # not above the checkpoint: only config= finds it
    config.parent.mkdir()
    config.write_text("task: ddpm\npreset: tiny\naverager: [lawa, ema, swa]\n")
    result = runner.invoke(app, ["export", str(moved), f"out={tmp_path / 'raw'}", "weights=raw",
                                 f"config={config}"])
    assert result.exit_code == 0, result.output
    unet = DDPMPipeline.from_pretrained(str(tmp_path / "raw")).unet
    raw = load_file(str(moved / "model.safetensors"))
    assert all(torch.equal(unet.state_dict()[k], raw[k]) for k in raw)


# -- image folders: centre crop, memory vs stream, resume ------------------------------------------------
def write_tree(root: Path) -> None:
    """2 classes, 6 train and 2 test images each, in mixed sizes and modes (non-square ones get centre-cropped)."""
    sizes = [(40, 24), (24, 40), (32, 32), (50, 30), (16, 16), (33, 47)]
    for split, count in (("train", 6), ("test", 2)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng(100 * label + 10 * i + (split == "test"))
                w, h = sizes[i % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).convert("L" if i == 4 else "RGB").save(folder / f"{i}.png")


def test_center_crop_keeps_the_middle_square():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 255, 0), (16, 0, 48, 32))  # the middle half is green, the outer quarters red
    out = images_module._center_crop(image, 16)
    pixels = np.asarray(out)
    assert out.size == (16, 16) and (pixels[..., 1] > 250).all() and (pixels[..., 0] < 5).all()


def test_streamed_folder_matches_the_in_memory_one_and_resumes(tmp_path):
    write_tree(tmp_path / "tree")
    memory = load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "cache"), 16, crop=True)
    files = [f for f, _ in images_module.imagefolder_files(str(tmp_path / "tree"), str(tmp_path / "cache")).train]
    stream = FileImageStream(files, 16, micro_batch=4, seed=3, workers=2)
    indices = IndexStream(len(files), 4, 3)
    for _ in range(4):  # crosses an epoch boundary (12 images, 3 batches an epoch)
        batch = stream.next_batch()
        expected = indices.next_indices()
        assert torch.equal(batch["indices"], expected) and torch.equal(batch["images"], memory.train_images[expected])
    state = stream.state_dict()
    following = [stream.next_batch()["images"] for _ in range(3)]
    resumed = FileImageStream(files, 16, micro_batch=4, seed=3, workers=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()["images"]) for a in following)


def test_task_streams_a_big_folder_and_keeps_a_small_one_in_memory(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    common = ["data=imagefolder", f"data.path={tmp_path / 'tree'}", "ddpm.workers=0"]
    small = ddpm_tiny_task(tmp_path, *common)
    assert small.data is not None and small.files is None
    big = ddpm_tiny_task(tmp_path, *common, "ddpm.memory_gb=1e-6")  # "bigger than memory": stream it
    assert big.data is None and isinstance(big.train_stream(4, 0, 1), FileImageStream)
    assert torch.equal(big.eval_images, small.eval_images)  # the same held-out images, decoded the same way
    streamed = torch.cat(list(big.fid_reference_batches(8, 3)))
    assert torch.equal(streamed, torch.cat(list(small.fid_reference_batches(8, 3))))
    assert big.fid_reference_key(8).startswith("imagefolder-stream-16px-8-")
    assert small.fid_reference_key(8).startswith("imagefolder-16px-8-")


# -- paper scale --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_imagenet128_preset_builds_the_422m_unet_and_takes_an_optimizer_step(tmp_path, capsys):
    """The ADM-shaped UNet at 128 px, one AdamW step at batch 1 on the CPU (~40 s, ~7.5 GB peak RSS)."""
    started = time.perf_counter()
    cfg = resolve(["task=ddpm", "preset=imagenet128", "batch_size=1", "grad_accum=1", "mixed_precision='no'"])
    assert cfg.run.data.source == "imagefolder" and cfg.task.loader == "stream"
    task = DdpmTask(cfg.task, cfg.run)
    torch.manual_seed(0)
    model = task.build_model()
    params = parameter_count(model)
    assert abs(params / ADM_IMAGENET128_PARAMS - 1) < 0.02
    optimizer = task.build_optimizer(model, cfg.run.lr)
    probe = model.conv_in.weight.detach().clone()
    image = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = {"images": image, "indices": torch.tensor([0]), "augment": True}
    loss = task.loss(model, batch, step=0)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and 0.3 < loss.item() < 3  # an untrained UNet predicts noise poorly, not wildly
    assert not torch.equal(probe, model.conv_in.weight) and torch.isfinite(model.conv_in.weight).all()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with capsys.disabled():
        print(f"\nimagenet128: {params:,} parameters; build + one step {time.perf_counter() - started:.1f} s; "
              f"peak RSS {peak_gb:.1f} GB")
