"""The cifar task, its image data sources and the accuracy evaluator. Offline: nothing here downloads."""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lawa_suite import registry
from lawa_suite.config import ConfigError, DataConfig, EvalConfig, RunConfig, resolve
from lawa_suite.data import images
from lawa_suite.data.images import EMBEDDED, load_cifar, load_digits, load_image_set, load_imagefolder
from lawa_suite.evaluators.accuracy import Accuracy
from lawa_suite.tasks.base import DataUnavailable, parameter_count
from lawa_suite.tasks.cifar import CifarConfig, CifarTask, PreActResNet18, batch_generator, random_crop_flip

from helpers import local_data

LOCAL_CIFAR = local_data() / "cifar10-jpg.tar.gz"
CLASSES = ["cat", "dog", "frog"]


# -- helpers ----------------------------------------------------------------------------------------
def make_run(tmp_path: Path, source: str = "digits", path: str = "", **kwargs) -> RunConfig:
    return RunConfig(data=DataConfig(source, path, str(tmp_path / "cache")), **kwargs)


def make_task(tmp_path: Path, config: CifarConfig | None = None, **run_kwargs) -> CifarTask:
    task = CifarTask(config or CifarConfig(width=4, eval_batch_size=100), make_run(tmp_path, **run_kwargs))
    task.setup()
    return task


def write_tree(root: Path, train_per_class: int = 3, test_per_class: int = 2, test_name: str = "test") -> None:
    """A tiny imagefolder: PNG and JPEG files, one 40x40 and one grayscale (both must come out 3x32x32)."""
    for split, count in (("train", train_per_class), (test_name, test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                value = 40 * label + 10 * i
                if i == 1:
                    Image.new("L", (40, 40), value).save(folder / f"{i}.jpg", quality=95)
                else:
                    Image.new("RGB", (32, 32), (value, 255 - value, 7)).save(folder / f"{i}.png")
    (root / "train" / "notes.txt").write_text("not a class folder, not an image")


def make_tarball(tree: Path, archive: Path, arcname: str = "imgs") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=arcname)
    return archive


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("images were decoded again instead of read from the cache")
    monkeypatch.setattr(images, "_decode_all", fail)


# -- model ------------------------------------------------------------------------------------------
def test_preact_resnet18_parameter_count_and_forward():
    # kuangliu's PreActResNet18 (11,171,146) plus the final BatchNorm of He et al. (2 x 512)
    assert parameter_count(PreActResNet18(10, width=64)) == 11_172_170
    model = PreActResNet18(num_classes=7, width=4)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [b.conv1.out_channels for b in model.blocks] == [4, 4, 8, 8, 16, 16, 32, 32]


# -- embedded and digits -------------------------------------------------------------------------------
def test_the_embedded_cifar10_subset_is_class_balanced_real_and_offline(tmp_path):
    found = load_image_set("embedded", "", str(tmp_path / "cache"))
    assert found.train_images.shape == (10_000, 3, 32, 32) and found.test_images.shape == (2_000, 3, 32, 32)
    assert found.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(found.train_labels).tolist() == [1000] * 10
    assert torch.bincount(found.test_labels).tolist() == [200] * 10
    assert found.train_images.float().std() > 40 and "CIFAR-10 subset" in found.description  # colour photos
    assert EMBEDDED.stat().st_size < 5_000_000  # shipped in the package: a few MB


def test_digits_shape_labels_and_deterministic_split():
    first = load_digits()
    torch.manual_seed(123), np.random.seed(123)  # the split must not depend on global RNG
    second = load_digits()
    assert first.train_images.shape == (1497, 3, 32, 32) and first.test_images.shape == (300, 3, 32, 32)
    assert first.train_images.dtype == torch.uint8 and first.train_labels.dtype == torch.int64
    assert first.classes == [str(d) for d in range(10)]
    assert torch.equal(first.test_labels.bincount(), second.test_labels.bincount())
    assert first.test_labels.bincount().min() >= 29  # stratified: about 30 of each digit
    assert int(first.train_images.max()) == 255 and torch.equal(first.train_images[:, 0], first.train_images[:, 2])
    assert torch.equal(first.train_images, second.train_images) and torch.equal(first.test_labels, second.test_labels)


# -- imagefolder ------------------------------------------------------------------------------------
def test_imagefolder_from_folder_decodes_once_then_reads_the_cache(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    data = load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "cache"))
    assert data.classes == CLASSES
    assert data.train_images.shape == (9, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.train_images[3, :, 0, 0].tolist() == [40, 215, 7]           # class dog, file 0.png: exact pixels
    gray = data.train_images[1].float()                                      # the 40x40 grayscale JPEG
    assert torch.allclose(gray, torch.full_like(gray, 10), atol=2)
    assert list((tmp_path / "cache" / "images").glob("*.npz"))

    forbid_decoding(monkeypatch)
    again = load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "cache"))
    assert torch.equal(again.train_images, data.train_images) and torch.equal(again.test_labels, data.test_labels)


def test_imagefolder_parallel_decoding_equals_serial(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    serial = load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "serial"))
    monkeypatch.setattr(images, "POOL_THRESHOLD", 0)  # force the process pool on a tiny tree
    monkeypatch.setattr(images, "CHUNK", 2)
    pooled = load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "pooled"))
    assert torch.equal(serial.train_images, pooled.train_images) and torch.equal(serial.test_images, pooled.test_images)


def test_imagefolder_accepts_val_and_rejects_unknown_test_class(tmp_path):
    write_tree(tmp_path / "tree", test_name="val")
    assert load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "cache")).test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    (tmp_path / "tree" / "val" / "zebra").mkdir()
    with pytest.raises(DataUnavailable, match="classes not in train/: zebra"):
        load_imagefolder(str(tmp_path / "tree"), str(tmp_path / "cache"))


def test_imagefolder_from_tar_gz_extracts_once_and_caches(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    archive = make_tarball(tmp_path / "tree", tmp_path / "imgs.tar.gz")
    data = load_imagefolder(str(archive), str(tmp_path / "cache"))
    assert data.classes == CLASSES and data.train_images.shape == (9, 3, 32, 32)
    assert len(list((tmp_path / "cache" / "extracted").iterdir())) == 1

    forbid_decoding(monkeypatch)
    monkeypatch.setattr(images.tarfile, "open", lambda *a, **k: pytest.fail("the archive was extracted again"))
    again = load_imagefolder(str(archive), str(tmp_path / "cache"))
    assert torch.equal(again.test_images, data.test_images)


UNSAFE_MEMBERS = [("../evil.txt", tarfile.REGTYPE, ""), ("/tmp/evil.txt", tarfile.REGTYPE, ""),
                  ("train/cat/x.png", tarfile.SYMTYPE, "../../../../etc/passwd")]


@pytest.mark.parametrize("name,kind,link", UNSAFE_MEMBERS)
def test_unsafe_tar_member_is_refused(tmp_path, name, kind, link):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo(name)
        member.type, member.linkname, member.size = kind, link, 0 if link else 4
        tar.addfile(member, None if link else io.BytesIO(b"evil"))
    with pytest.raises(DataUnavailable, match="refusing to extract"):
        load_imagefolder(str(archive), str(tmp_path / "cache"))
    assert not (tmp_path / "evil.txt").exists()
    assert not list((tmp_path / "cache" / "extracted").iterdir())  # nothing half-extracted left behind


def test_imagefolder_missing_path_and_layout_errors(tmp_path):
    with pytest.raises(DataUnavailable) as missing:
        load_imagefolder(str(tmp_path / "nowhere"), str(tmp_path / "cache"))
    message = str(missing.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "train/<class>" in message
    with pytest.raises(DataUnavailable, match="data.path is empty"):
        load_imagefolder("", str(tmp_path / "cache"))
    (tmp_path / "only-train" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataUnavailable, match="holds no images"):
        load_imagefolder(str(tmp_path / "only-train"), str(tmp_path / "cache"))
    Image.new("RGB", (32, 32)).save(tmp_path / "only-train" / "train" / "cat" / "0.png")
    with pytest.raises(DataUnavailable, match=r"only-train has no test/ \(or val/\) folder; expected train/<class>"):
        load_imagefolder(str(tmp_path / "only-train"), str(tmp_path / "cache"))


# -- cifar10 / cifar100 (fake local batches; the download is made to fail, never attempted) -----------
@pytest.fixture
def offline(monkeypatch):
    """Every download path raises URLError: the real torchvision function and urllib underneath it."""
    import torchvision.datasets.utils as tv_utils

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cifar10_offline_error_names_the_file_the_url_and_the_place(tmp_path, offline):
    root = tmp_path / "cache" / "cifar10"
    with pytest.raises(DataUnavailable) as error:
        load_cifar("cifar10", str(root))
    message = str(error.value)
    assert "\n" not in message
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"put it in {root}" in message and "download failed" in message


def write_fake_cifar(root: Path, hundred: bool = False, per_batch: int = 4) -> None:
    """Pickles in the real layout: dicts with b"data" uint8 (N, 3072) and b"labels" (b"fine_labels")."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    label_key = b"fine_labels" if hundred else b"labels"
    for b, name in enumerate(names):
        data = np.full((per_batch, 3072), b, dtype=np.uint8)
        data[:, 1024:2048] = 100  # the green plane
        entry = {b"data": data, label_key: [(b + i) % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta_name, meta_key = ("meta", b"fine_label_names") if hundred else ("batches.meta", b"label_names")
    names = [f"c{i}".encode() for i in range(100 if hundred else 10)]
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: names}))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_local_batches(tmp_path, offline, name):
    root = tmp_path / name
    write_fake_cifar(root, hundred=name == "cifar100")
    data = load_cifar(name, str(root))
    train_batches = 1 if name == "cifar100" else 5
    assert data.train_images.shape == (4 * train_batches, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.classes == [f"c{i}" for i in range(len(data.classes))]
    assert len(data.classes) == (100 if name == "cifar100" else 10)
    assert data.train_labels.tolist() == [(b + i) % 10 for b in range(train_batches) for i in range(4)]
    assert int(data.train_images[0, 1, 5, 5]) == 100 and int(data.train_images[-1, 0, 0, 0]) == train_batches - 1


def test_cifar_task_reads_cifar10_from_the_cache(tmp_path, offline):
    write_fake_cifar(tmp_path / "cache" / "cifar10", per_batch=8)
    task = make_task(tmp_path, source="cifar10", batch_size=8)
    assert "40 train / 8 test images" in task.summary(task.build_model())


# -- the task ---------------------------------------------------------------------------------------
def test_augmentation_is_seeded_by_step_and_indices_only(tmp_path):
    task = make_task(tmp_path, batch_size=32)
    batch = task.train_stream(32, 0, 1).next_batch()
    images_, indices = batch["images"], batch["indices"]
    torch.manual_seed(1)
    same = random_crop_flip(images_, 4, batch_generator(0, 7, indices))
    torch.manual_seed(2)  # global RNG must not matter
    assert torch.equal(same, random_crop_flip(images_, 4, batch_generator(0, 7, indices)))
    assert not torch.equal(same, random_crop_flip(images_, 4, batch_generator(0, 8, indices)))
    assert not torch.equal(same, random_crop_flip(images_, 4, batch_generator(1, 7, indices)))
    assert same.dtype == torch.uint8 and same.shape == images_.shape


def test_random_crop_flip_matches_reflect_padding_reference():
    images_ = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images_, 4, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the same draws
    offsets, flip = torch.randint(0, 9, (16, 2), generator=g), torch.rand(16, generator=g) < 0.5
    padded = F.pad(images_.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(16):
        y, x = offsets[i].tolist()
        crop = padded[i, :, y:y + 32, x:x + 32]
        assert torch.equal(out[i].float(), crop.flip(-1) if flip[i] else crop)


def test_batches_are_fixed_bounded_and_resumable(tmp_path):
    task = make_task(tmp_path, batch_size=16, eval=EvalConfig(batches=2))
    evals = task.eval_batches()
    assert len(evals) == 2 and all(len(b["labels"]) == 100 for b in evals)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(evals, task.eval_batches()))
    assert len(torch.cat([b["labels"] for b in evals]).unique()) == 10  # a shuffled prefix: every class
    calib = task.calibration_batches(3)
    assert len(calib) == 3 and not any(b["augment"] for b in calib)
    assert all(torch.equal(a["indices"], b["indices"]) for a, b in zip(calib, task.calibration_batches(3)))

    stream = task.train_stream(16, 0, 1)
    for _ in range(95):  # cross an epoch boundary (1,497 // 16 = 93 batches an epoch)
        stream.next_batch()
    state = stream.state_dict()
    expected = [stream.next_batch()["indices"] for _ in range(2)]
    resumed = task.train_stream(16, 0, 1)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.next_batch()["indices"]) for e in expected)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError, match="nesterov"):
        CifarConfig(momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="cifar.optimizer: expected one of sgd, adamw"):
        resolve(["task=cifar", "preset=tiny", "cifar.optimizer=lion"])
    tiny = resolve(["task=cifar", "preset=tiny"])
    assert tiny.task.width == 4 and tiny.run.eval.every == 4 and tiny.run.data.source == "digits"
    assert tiny.run.steps >= 15  # `preset=tiny lawa.k=3 lawa.nu=5` must see LAWA ready
    cpu, paper = resolve(["task=cifar"]), resolve(["task=cifar", "preset=paper"])
    # the default (cpu) preset works offline: the README's main job needs no download
    assert cpu.run.preset == "cpu" and cpu.run.data.source == "embedded" and cpu.run.eval.batches > 0
    assert paper.run.data.source == "cifar10"
    assert (paper.task.width, paper.run.steps, paper.run.batch_size, paper.task.nesterov) == (64, 78_000, 128, True)
    assert resolve(["task=cifar", "preset=cpu", "data=imagefolder"]).run.data.source == "imagefolder"


def test_tiny_preset_trains_and_reduces_the_loss_on_a_fixed_batch(tmp_path):
    cfg = resolve(["task=cifar", "preset=tiny", f"data.cache={tmp_path}"])
    run = cfg.run
    task = registry.tasks.get("cifar")(cfg.task, run)
    task.setup()
    torch.manual_seed(run.seed)
    model = task.build_model()
    optimizer = task.build_optimizer(model, run.lr)
    fixed = task.calibration_batches(1)[0]
    model.train()
    with torch.no_grad():
        before = task.loss(model, fixed, -1).item()
    stream = task.train_stream(run.micro_batch, 0, 1)
    for step in range(run.steps):  # the preset's own steps over the stream: they must run and stay finite
        loss = task.loss(model, stream.next_batch(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
    for step in range(run.steps, run.steps + 8):  # then fit the fixed batch
        loss = task.loss(model, fixed, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = task.loss(model, fixed, -1).item()
    assert after < 0.8 * before, (before, after)
    model.eval()
    scores = Accuracy(task).evaluate(model, task.eval_batches())
    assert 0.0 <= scores["accuracy"] <= 1.0 and math.isfinite(scores["loss"])


# -- the accuracy evaluator ---------------------------------------------------------------------------
class _FixedLogits:
    """A stand-in task whose batches are (logits, targets) and whose model is ignored."""

    def logits_and_targets(self, model, batch):
        return batch


class _TwoIdenticalProcesses:
    """An accelerator stand-in: two processes that happened to see the same batches."""
    num_processes, device = 2, torch.device("cpu")

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor * 2


def test_accuracy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (7, 13, 1)]
    hits = sum(int(logits[i].argmax() == t[i]) for logits, t in batches for i in range(len(t)))
    nll = sum(-torch.log_softmax(logits[i], 0)[t[i]].item() for logits, t in batches for i in range(len(t)))
    scores = Accuracy(_FixedLogits()).evaluate(None, batches)
    assert scores["accuracy"] == pytest.approx(hits / 21) and scores["loss"] == pytest.approx(nll / 21)
    assert Accuracy(_FixedLogits()).evaluate(None, batches, _TwoIdenticalProcesses()) == pytest.approx(scores)
    assert Accuracy.metrics == {"accuracy": "max", "loss": "min"} and "accuracy" in registry.evaluators.names()


# -- optional: real CIFAR-10 JPEGs from the local test data (helpers.local_data) --------------------
@pytest.mark.skipif(not LOCAL_CIFAR.exists(),
                    reason=f"the CIFAR-10 JPEGs are not at {LOCAL_CIFAR} (set LAWA_SUITE_TEST_DATA)")
def test_real_cifar10_jpegs_subset(tmp_path):
    """200 real images (15 train + 5 test a class), copied out of the archive without extracting it."""
    wanted = {"train": 15, "test": 5}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(LOCAL_CIFAR, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts[-3:]
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) < wanted[parts[0]]:
                taken[key] = taken.get(key, 0) + 1
                dest = tmp_path / "subset" / Path(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
            if len(taken) == 20 and all(n == wanted[s] for (s, _), n in taken.items()):
                break
    data = load_imagefolder(str(tmp_path / "subset"), str(tmp_path / "cache"))
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert data.train_images.shape == (150, 3, 32, 32) and data.test_images.shape == (50, 3, 32, 32)
    assert 60 < data.train_images.float().mean() < 190 and data.train_images.float().std() > 30
