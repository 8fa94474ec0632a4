"""Files a run reads but must not run: CIFAR batch pickles (``data.path``) and the Inception weights
(``fid.weights``). A hostile file is refused with a one-line error before any of its code runs."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lawa_suite.cli import app
from lawa_suite.data.images import load_cifar
from lawa_suite.errors import ConfigError, DataPathError
from lawa_suite.evaluators import fid
from lawa_suite.evaluators.fid import INCEPTION, INCEPTION_FILE, STANDIN, FidConfig, create_extractor

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
