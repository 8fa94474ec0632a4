"""Files a run reads but must not run: CIFAR batch pickles (``data.path``) and the Inception weights
(``fid.weights``, and the file in torch hub's cache that torch-fidelity loads by default). A hostile file is refused
with a one-line error before any of its code runs; a malformed but harmless one with a one-line error naming the
file and what it should hold (never a traceback)."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.data.images import load_cifar, load_image_set
from lawa_suite.errors import ConfigError, DataPathError
from lawa_suite.evaluators import fid
from lawa_suite.evaluators.fid import (INCEPTION, INCEPTION_FILE, STANDIN, FidConfig, create_extractor,
                                       inception_weights_path)

runner = CliRunner()


class Hostile:
    """Unpickling it calls ``how`` (a global the pickle names) to create ``marker``."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return builtins.open, (self.marker, "w")


# -- CIFAR batches ----------------------------------------------------------------------------------------
class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it (the CIFAR originals): a ``str`` (here ``bytes``) as BINSTRING, which
    Python 3 reads back with ``encoding="latin1"``, not as ``_codecs.encode`` as Python 3 writes bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 and numpy 1.x wrote the CIFAR batches (numpy.core, not numpy 2's numpy._core)."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_codecs" not in data  # as in the originals: no global but numpy's
    return data


BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_py2_cifar10(root: Path, per_batch: int = 3, hostile: object = None, at: str = "data_batch_3") -> Path:
    """CIFAR-10's folder as the loader expects it, each file shaped like the original (keys and values);
    ``hostile`` replaces the labels of batch ``at`` (the file with it is refused, earlier ones loaded)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate(BATCHES):
        labels = [(b + i) % 10 for i in range(per_batch)]
        entry = {b"batch_label": f"batch {b}".encode(), b"labels": labels,
                 b"data": np.full((per_batch, 3072), 10 * b, dtype=np.uint8),
                 b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}
        if hostile is not None and name == at:
            entry[b"labels"] = hostile
        (folder / name).write_bytes(py2_pickle(entry))
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / name).read_bytes()  # numpy 1.x's name
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [f"c{i}".encode() for i in range(10)],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def test_batches_shaped_like_the_python2_originals_still_load_and_a_hostile_one_does_not(tmp_path):
    folder = write_py2_cifar10(tmp_path / "c10")
    data = load_cifar("cifar10", str(tmp_path / "c10"), download=False)
    assert data.train_images.shape == (15, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert data.classes == [f"c{i}" for i in range(10)] and int(data.test_images[0, 0, 0, 0]) == 50
    assert data.train_labels.tolist() == [(b + i) % 10 for b in range(5) for i in range(3)]
    marker = tmp_path / "ran"
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": Hostile(marker, "open")}))
    with pytest.raises(DataPathError, match="batches.meta is not a CIFAR batch"):
        load_cifar("cifar10", str(tmp_path / "c10"), download=False)
    assert not marker.exists()


@pytest.mark.parametrize("how, refused", [("os.system", "posix.system"), ("exec", "__builtin__.exec"),
                                          ("open", "io.open")])
def test_a_hostile_cifar_batch_is_refused_before_its_code_runs(tmp_path, how, refused):
    marker = tmp_path / "ran"
    folder = write_py2_cifar10(tmp_path / "c10", hostile=Hostile(marker, how))
    assert f"{refused.split('.')[0]}\n{refused.split('.')[1]}".encode() in (folder / "data_batch_3").read_bytes()
    with pytest.raises(DataPathError) as error:
        load_cifar("cifar10", str(tmp_path / "c10"), download=False)
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2
    assert str(folder / "data_batch_3") in message and f"{refused} (refused, nothing run)" in message
    assert "numpy arrays" in message  # what is allowed
    assert not marker.exists()


def test_a_python2_builtin_global_is_refused_by_its_raw_name(tmp_path):
    """``__builtin__.eval`` (what fix_imports maps to builtins.eval) is checked before that mapping."""
    marker = tmp_path / "ran"
    folder = write_py2_cifar10(tmp_path / "c10")
    code = f"open({str(marker)!r}, 'w')".encode()
    (folder / "test_batch").write_bytes(b"\x80\x02c__builtin__\neval\nq\x00U" + bytes([len(code)]) + code
                                        + b"\x85R.")
    with pytest.raises(DataPathError, match=r"test_batch is not a CIFAR batch: it would call __builtin__\.eval "):
        load_cifar("cifar10", str(tmp_path / "c10"), download=False)
    assert not marker.exists()


def test_a_hostile_cifar_batch_through_the_cli_is_one_line_and_exit_2(tmp_path):
    marker = tmp_path / "ran"
    write_py2_cifar10(tmp_path / "c10", hostile=Hostile(marker, "exec"), at="data_batch_1")
    result = runner.invoke(app, ["run", "task=cifar", "data=cifar10", f"data.path={tmp_path / 'c10'}", "averager=",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cifar10: ") and "__builtin__.exec" in lines[0]
    assert not marker.exists()


def no_downloads(monkeypatch) -> None:
    """Every download path raises URLError: torchvision's and urllib underneath it (nothing here goes online)."""
    import torchvision.datasets.utils as tv_utils

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def rewrite(folder: Path, name: str, change) -> None:
    """Replace the batch ``name`` with ``change(its entry)`` (pickled as the originals were)."""
    labels = [i % 10 for i in range(3)]
    entry = {b"batch_label": b"spoilt", b"labels": labels, b"data": np.full((3, 3072), 7, dtype=np.uint8)}
    (folder / name).write_bytes(py2_pickle(change(entry)))


def without(key: bytes):
    return lambda entry: {k: v for k, v in entry.items() if k != key}


def setting(key: bytes, value):
    return lambda entry: {**entry, key: value}


A_BATCH = "a CIFAR-10 batch is a dict with b'data' (a uint8 numpy array, N x 3072: N 32x32 RGB images) and " \
          "b'labels' (N ints in 0..9)"
BAD_DTYPE = b"\x80\x02cnumpy\ndtype\nq\x00U\x04nopeq\x01\x85q\x02Rq\x03."  # numpy.dtype("nope"): a TypeError

MALFORMED = {  # case: (file, how it is spoilt, what the message says was wrong, what it says a file holds)
    "no data": ("data_batch_3", without(b"data"), "it has no b'data' (its keys: batch_label, labels)", A_BATCH),
    "data of the wrong size": ("data_batch_3", setting(b"data", np.arange(35, dtype=np.uint8)),
                               "b'data' is a uint8 array of shape (35,)", A_BATCH),
    "data of 3 x 3071": ("data_batch_3", setting(b"data", np.zeros((3, 3071), np.uint8)),
                         "b'data' is a uint8 array of shape (3, 3071)", A_BATCH),
    "data not uint8": ("data_batch_3", setting(b"data", np.zeros((3, 3072), np.int64)),
                       "b'data' is a int64 array of shape (3, 3072)", A_BATCH),
    "data as a string": ("data_batch_3", setting(b"data", bytes(3 * 3072)), "b'data' is a str", A_BATCH),
    "no images": ("test_batch", lambda e: {**e, b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
                  "b'data' holds no images", A_BATCH),
    "string labels": ("data_batch_3", setting(b"labels", [b"cat", b"dog", b"cat"]),
                      "b'labels' is a list of <U3, not a list of ints", A_BATCH),
    "float labels": ("data_batch_3", setting(b"labels", [0.0, 1.0, 2.0]),
                     "b'labels' is a list of float64, not a list of ints", A_BATCH),
    "labels a number": ("data_batch_3", setting(b"labels", 3), "b'labels' is a int, not a list of ints", A_BATCH),
    "no labels": ("data_batch_1", without(b"labels"), "it has no b'labels' (its keys: batch_label, data)",
                  A_BATCH),
    "a label of 10": ("data_batch_3", setting(b"labels", [0, 10, 1]), "b'labels' holds 10 (label 1)", A_BATCH),
    "a label of -1": ("test_batch", setting(b"labels", [0, 1, -1]), "b'labels' holds -1 (label 2)", A_BATCH),
    "fewer labels than images": ("data_batch_5", setting(b"labels", [0, 1]),
                                 "b'data' holds 3 images but b'labels' 2 labels", A_BATCH),
    "more labels than images": ("data_batch_5", setting(b"labels", [0, 1, 2, 3]),
                                "b'data' holds 3 images but b'labels' 4 labels", A_BATCH),
    "a list, not a dict": ("data_batch_2", lambda e: [e[b"data"], e[b"labels"]], "it holds a list, expected a dict",
                           A_BATCH),
    "meta without names": ("batches.meta", without(b"label_names"), "is not a CIFAR meta file: it holds no "
                           "b'label_names'", "expected a dict with b'label_names' (a list of 10 class names)"),
    "meta with 9 names": ("batches.meta", lambda e: {b"label_names": [b"c"] * 9},
                          "is not a CIFAR meta file: it holds 9 names", "(a list of 10 class names)"),
}
DAMAGED = {  # case: (file, its new bytes or None to delete it, what the message says)
    "a truncated batch": ("data_batch_2", lambda raw: raw[:len(raw) // 2], "cannot unpickle it (UnpicklingError"),
    "an empty batch": ("data_batch_2", lambda raw: b"", "cannot unpickle it (EOFError"),
    "numpy given a bad dtype": ("data_batch_4", lambda raw: BAD_DTYPE, "cannot unpickle it (TypeError"),
    "a missing batch": ("data_batch_4", None, "data_batch_4 is missing; expected"),
    "a missing meta file": ("batches.meta", None, "batches.meta is missing; expected"),
}


@pytest.mark.parametrize("case", [*MALFORMED, *DAMAGED])
def test_a_malformed_cifar_folder_is_one_line_naming_the_file_and_what_it_holds(tmp_path, monkeypatch, case):
    """data.path=DIR with batches that are harmless but not CIFAR-10's shape: a one-line DataPathError (exit 2)
    naming the file, what was wrong and what a batch holds; nothing downloaded into the user's folder."""
    no_downloads(monkeypatch)
    folder = write_py2_cifar10(tmp_path / "c10")
    if case in MALFORMED:
        name, change, wrong, holds = MALFORMED[case]
        if name == "batches.meta":
            meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
            (folder / name).write_bytes(py2_pickle(change(meta)))
        else:
            rewrite(folder, name, change)
    else:
        name, damage, wrong = DAMAGED[case]
        holds = "fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" if damage is None else A_BATCH
        if damage is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(damage((folder / name).read_bytes()))
    before = sorted(p.name for p in (tmp_path / "c10").rglob("*"))
    with pytest.raises(DataPathError) as error:
        load_image_set("cifar10", str(tmp_path / "c10"), str(tmp_path / "cache"))
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2
    assert message.startswith(f"cifar10: {folder / name} "), message
    assert wrong in message and holds in message, message
    assert sorted(p.name for p in (tmp_path / "c10").rglob("*")) == before  # nothing added to data.path


@pytest.mark.parametrize("case", ["no data", "data of the wrong size", "string labels", "a label of 10"])
def test_a_malformed_cifar_batch_through_the_cli_is_one_line_and_exit_2(tmp_path, monkeypatch, case):
    no_downloads(monkeypatch)
    name, change, wrong, _ = MALFORMED[case]
    rewrite(write_py2_cifar10(tmp_path / "c10"), name, change)
    result = runner.invoke(app, ["run", "task=cifar", "data=cifar10", f"data.path={tmp_path / 'c10'}", "averager=",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cifar10: {tmp_path / 'c10'}") and wrong in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


# -- fid.weights ------------------------------------------------------------------------------------------
@pytest.fixture
def handed(monkeypatch):
    """Every call torch-fidelity gets to create a feature extractor (passed on to the real function)."""
    import torch_fidelity.utils

    calls = []
    real = torch_fidelity.utils.create_feature_extractor

    def spy(name, layers, **kwargs):
        calls.append((name, kwargs.get("feature_extractor_weights_path")))
        return real(name, layers, **kwargs)
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", spy)
    return calls


def hostile_pth(path: Path, marker: Path) -> Path:
    torch.save({"Conv2d_1a_3x3.conv.weight": Hostile(marker, "exec")}, path)
    return path


def test_the_expected_sha256_is_the_one_the_file_name_carries():
    assert fid.INCEPTION_SHA256.startswith(INCEPTION_FILE.rsplit("-", 1)[1].removesuffix(".pth"))
    assert len(fid.INCEPTION_SHA256) == 64


def test_hostile_inception_weights_are_refused_before_torch_fidelity_sees_them(tmp_path, handed):
    marker = tmp_path / "ran"
    weights = hostile_pth(tmp_path / INCEPTION_FILE, marker)  # the right name does not help
    for extractor in (INCEPTION, "auto"):
        with pytest.raises(ConfigError) as error:
            create_extractor(FidConfig(extractor=extractor, weights=str(weights)))
        message = str(error.value)
        assert "\n" not in message and error.value.exit_code == 2
        assert message.startswith(f"fid.weights: {weights} is not the published Inception weights")
        assert hashlib.sha256(weights.read_bytes()).hexdigest() in message and fid.INCEPTION_SHA256 in message
    assert not marker.exists() and handed == []


def test_only_the_file_with_the_expected_sha256_is_handed_on(tmp_path, monkeypatch, handed):
    import torch_fidelity.utils

    good = tmp_path / "weights.pth"
    good.write_bytes(b"stands in for the Inception weights")
    monkeypatch.setattr(fid, "INCEPTION_SHA256", hashlib.sha256(good.read_bytes()).hexdigest())
    made = torch.nn.Identity()
    real = torch_fidelity.utils.create_feature_extractor
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", lambda name, layers, **kwargs: (
        handed.append((name, kwargs.get("feature_extractor_weights_path"))) or made))
    assert create_extractor(FidConfig(extractor=INCEPTION, weights=str(good)))[:2] == (made, INCEPTION)
    assert handed == [(INCEPTION, str(good))]
    tampered = tmp_path / "tampered.pth"
    tampered.write_bytes(good.read_bytes() + b" ")
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", real)
    with pytest.raises(ConfigError, match="fid.weights: .*tampered.pth is not the published Inception weights"):
        create_extractor(FidConfig(extractor=INCEPTION, weights=str(tampered)))
    assert handed == [(INCEPTION, str(good))]


def test_weights_for_another_torch_fidelity_extractor_are_refused_unread(tmp_path, handed):
    marker = tmp_path / "ran"
    weights = hostile_pth(tmp_path / "vgg.pth", marker)
    with pytest.raises(ConfigError, match=f"fid.weights: expected fid.extractor={INCEPTION} .*got fid.extractor="
                                          "vgg16"):
        create_extractor(FidConfig(extractor="vgg16", weights=str(weights)))
    assert not marker.exists() and handed == []


def test_the_standin_says_it_ignores_fid_weights_and_never_reads_them(tmp_path, handed, capsys):
    marker = tmp_path / "ran"
    weights = hostile_pth(tmp_path / "any.pth", marker)
    extractor, name, _ = create_extractor(FidConfig(extractor=STANDIN, weights=str(weights)))
    assert name == STANDIN and handed == [(STANDIN, None)]
    assert f"fid: fid.weights={weights} is ignored" in capsys.readouterr().err
    assert not marker.exists()


def test_hostile_weights_through_the_cli_are_one_line_and_exit_2(tmp_path, handed):
    marker = tmp_path / "ran"
    weights = hostile_pth(tmp_path / "w.pth", marker)
    result = runner.invoke(app, ["run", "task=ddpm", "preset=tiny", f"fid.extractor={INCEPTION}",
                                 f"fid.weights={weights}", "averager=", f"out={tmp_path / 'run'}",
                                 f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 2, result.output
    # the task's summary line, then the error (the evaluator is made after the task, before any step)
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ddpm: ") and "Traceback" not in result.output
    assert lines[1].startswith(f"error: fid.weights: {weights} is not the published Inception weights")
    assert not marker.exists() and handed == []
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- torch hub's cache: the file torch-fidelity loads when fid.weights is empty ---------------------------------
def test_the_file_checked_is_the_one_torch_fidelity_would_load(offline_hub):
    """torch-fidelity's default: ``load_state_dict_from_url(URL_INCEPTION_V3)``, which keeps the file in
    ``torch.hub.get_dir()/checkpoints`` under the URL's last path component."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert os.path.basename(urlparse(URL_INCEPTION_V3).path) == INCEPTION_FILE
    loaded_by_torch_fidelity = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    assert inception_weights_path() == loaded_by_torch_fidelity == offline_hub / INCEPTION_FILE


@pytest.mark.parametrize("extractor", [INCEPTION, "auto"])
def test_a_hostile_file_in_the_hub_cache_is_refused_before_torch_fidelity_reads_it(offline_hub, tmp_path, handed,
                                                                                  extractor):
    marker = tmp_path / "ran"
    offline_hub.mkdir(parents=True)
    cached = hostile_pth(offline_hub / INCEPTION_FILE, marker)
    with pytest.raises(ConfigError) as error:
        create_extractor(FidConfig(extractor=extractor))
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2
    assert message.startswith(f"fid: {cached} (torch hub's cache, where torch-fidelity loads them from) is not the "
                              f"published Inception weights (sha256 {hashlib.sha256(cached.read_bytes()).hexdigest()})")
    assert fid.INCEPTION_SHA256 in message and fid._inception_url() in message and "delete it" in message
    assert not marker.exists() and handed == []


def test_a_hostile_file_in_the_hub_cache_through_the_cli_is_one_line_and_exit_2(offline_hub, tmp_path, handed):
    marker = tmp_path / "ran"
    offline_hub.mkdir(parents=True)
    cached = hostile_pth(offline_hub / INCEPTION_FILE, marker)
    result = runner.invoke(app, ["run", "task=ddpm", "preset=tiny", f"fid.extractor={INCEPTION}", "averager=",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ddpm: ") and "Traceback" not in result.output
    assert lines[1].startswith(f"error: fid: {cached} (torch hub's cache")
    assert not marker.exists() and handed == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_hub_cache_file_with_the_expected_sha256_is_handed_on_by_path(offline_hub, monkeypatch, handed):
    """torch-fidelity gets the checked file's path, so it never opens (or downloads) one on its own."""
    import torch_fidelity.utils

    offline_hub.mkdir(parents=True)
    (offline_hub / INCEPTION_FILE).write_bytes(b"stands in for the Inception weights")
    digest = hashlib.sha256((offline_hub / INCEPTION_FILE).read_bytes()).hexdigest()
    monkeypatch.setattr(fid, "INCEPTION_SHA256", digest)
    made = torch.nn.Identity()
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", lambda name, layers, **kwargs: (
        handed.append((name, kwargs.get("feature_extractor_weights_path"))) or made))
    assert create_extractor(FidConfig(extractor="auto"))[:2] == (made, INCEPTION)
    assert handed == [(INCEPTION, str(offline_hub / INCEPTION_FILE))]


def test_a_missing_hub_file_is_downloaded_with_its_sha256_checked_before_anything_reads_it(offline_hub, tmp_path,
                                                                                         monkeypatch, handed):
    """The download is made here, with the published sha256 (torch.hub checks it before moving the file into
    place); a download that is not the published file (a stand-in for torch.hub here) is refused unread."""
    import torch.hub

    marker = tmp_path / "ran"
    asked = []

    def download(url, dst, hash_prefix=None, progress=True):
        asked.append((url, dst, hash_prefix))
        hostile_pth(Path(dst), marker)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    refused = f"fid: {offline_hub / INCEPTION_FILE} .* is not the published Inception weights"
    with pytest.raises(ConfigError, match=refused):
        create_extractor(FidConfig(extractor=INCEPTION))
    assert asked == [(fid._inception_url(), str(offline_hub / INCEPTION_FILE), fid.INCEPTION_SHA256)]
    assert not marker.exists() and handed == []


@pytest.mark.parametrize("extractor", [INCEPTION, "auto"])
def test_a_missing_fid_weights_file_is_a_config_error(tmp_path, extractor, handed):
    with pytest.raises(DataPathError) as error:
        create_extractor(FidConfig(extractor=extractor, weights=str(tmp_path / "nope.pth")))
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2
    assert message.startswith(f"fid.weights: {tmp_path / 'nope.pth'} does not exist") and INCEPTION_FILE in message
    assert handed == []


def test_a_missing_fid_weights_file_through_the_cli_is_one_line_and_exit_2(tmp_path, handed):
    result = runner.invoke(app, ["run", "task=ddpm", "preset=tiny", f"fid.extractor={INCEPTION}",
                                 "fid.weights=/nonexistent", "averager=", f"out={tmp_path / 'run'}",
                                 f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ddpm: ") and "Traceback" not in result.output
    assert lines[1].startswith("error: fid.weights: /nonexistent does not exist")
    assert not (tmp_path / "run" / "checkpoints").exists()
