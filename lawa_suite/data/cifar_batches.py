"""CIFAR-10/100's original pickled batches, read as data and never as code.

torchvision downloads the archive (its md5 checked); the batches are read with an unpickler that admits numpy
arrays and plain containers only (``CIFAR_GLOBALS``), and each batch is checked to hold what a CIFAR batch does:
a hostile or malformed file is a one-line ``DataPathError`` naming it, before any of its code runs.
"""

from __future__ import annotations

import pickle
import struct
import urllib.error
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from lawa_suite.data import DataUnavailable
from lawa_suite.errors import DataPathError
from lawa_suite.files import first_line

__all__ = ["read_cifar", "CIFAR_GLOBALS"]


def _cifar_spec(name: str) -> type:
    from torchvision import datasets

    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def read_cifar(name: str, root: str, download: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], Path]:
    """CIFAR-10/100 as ``(train images (N, 3, 32, 32) uint8, train labels, test images, test labels, class names,
    folder)`` from ``root/<base_folder>``, downloading torchvision's archive there when it is missing.

    torchvision's own dataset class also re-checks every batch's md5 on each load; we trust files already
    extracted (the archive's md5 is checked on download) to be data, not to be harmless: the batches are read
    with an unpickler that admits numpy arrays and plain containers only (``_CifarUnpickler``), and each batch is
    checked to hold what a CIFAR batch does (``_batch``). ``download=False`` (``data.path`` set: a folder the user
    named) fetches nothing: a missing file is a ``DataPathError``.
    """
    spec = _cifar_spec(name)
    folder = Path(root) / spec.base_folder
    missing = _missing_cifar_files(spec, folder)
    if missing and download:
        try:
            from torchvision.datasets import utils as tv_utils

            tv_utils.download_and_extract_archive(spec.url, root, filename=spec.filename, md5=spec.tgz_md5)
        except (OSError, urllib.error.URLError, RuntimeError, ValueError) as exc:
            raise DataUnavailable(
                f"{name}: {folder / missing[0]} is missing and the download failed ({first_line(exc)}); "
                f"fetch {spec.url} "
                f"and put it in {root} (it is extracted on the next run), or use data=imagefolder") from None
        missing = _missing_cifar_files(spec, folder)
    if missing:
        error = DataUnavailable if download else DataPathError  # without a download: a path the user named
        raise error(f"{name}: {folder / missing[0]} is missing; expected {root} to hold {spec.base_folder}/ with "
                    f"{', '.join(_cifar_files(spec))} (fetch {spec.url} and extract it in {root})")
    train_images, train_labels = _read_batches(folder, [f for f, _ in spec.train_list], name)
    test_images, test_labels = _read_batches(folder, [f for f, _ in spec.test_list], name)
    classes = _read_classes(folder / spec.meta["filename"], spec.meta["key"], name)
    return train_images, train_labels, test_images, test_labels, classes, folder


def _cifar_files(spec: type) -> list[str]:
    return [f for f, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]


def _missing_cifar_files(spec: type, folder: Path) -> list[str]:
    return [n for n in _cifar_files(spec) if not (folder / n).is_file()]


# The only globals a CIFAR batch may name: what numpy needs to rebuild an ndarray. The originals (Python 2,
# numpy 1.x, protocol 2) name numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; numpy 2 writes
# numpy._core.*, and protocol 5 _frombuffer; Python 3 writes bytes at protocol 2 as _codecs.encode (data only).
# Dicts, lists, strings, bytes and ints need no global. Anything else would be a call made while loading.
CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits ``CIFAR_GLOBALS`` only: a hostile batch is refused before any of its
    code runs (plain ``pickle.load`` calls whatever a pickle names)."""

    def __init__(self, file: BinaryIO, path: Path, source: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: the Python 2 originals' str (what torchvision uses)
        self.path, self.source = path, source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_GLOBALS:  # raw names: checked before fix_imports maps Python 2 ones
            raise DataPathError(f"{self.source}: {self.path} is not a CIFAR batch: it would call {module}.{name} "
                                f"(refused, nothing run); a CIFAR pickle holds only dicts, lists, strings, numbers "
                                f"and numpy arrays")
        return super().find_class(module, name)


def _unpickle(path: Path, source: str = "cifar") -> dict[str, object]:
    """One CIFAR pickle, keys as str, read by ``_CifarUnpickler``."""
    with open(path, "rb") as f:
        try:
            entry = _CifarUnpickler(f, path, source).load()
        except DataPathError:
            raise
        # What the admitted globals and opcodes raise on malformed (not hostile) input: a truncated file, numpy's
        # reconstructors given the wrong arguments or state, a bad memo reference, undecodable text.
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                LookupError, OverflowError, MemoryError, struct.error) as exc:
            raise DataPathError(f"{source}: {path} is not a CIFAR batch: cannot unpickle it "
                                f"({type(exc).__name__}: {first_line(exc)}); {_cifar_holds(source)}") from None
    if not isinstance(entry, dict):
        raise DataPathError(f"{source}: {path} is not a CIFAR batch: it holds a {type(entry).__name__}, "
                            f"expected a dict; {_cifar_holds(source)}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_label_key(source: str) -> str:
    return "fine_labels" if source == "cifar100" else "labels"


def _cifar_classes(source: str) -> int:
    return 100 if source == "cifar100" else 10


def _cifar_holds(source: str) -> str:
    """What a batch of ``source`` holds, for the end of every message about a malformed one."""
    title = "CIFAR-100" if source == "cifar100" else "CIFAR-10"
    return (f"a {title} batch is a dict with b'data' (a uint8 numpy array, N x 3072: N 32x32 RGB images) and "
            f"b'{_cifar_label_key(source)}' (N ints in 0..{_cifar_classes(source) - 1})")


def _batch(path: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch's ``(data (N, 3, 32, 32) uint8, labels (N,) int64)``, each checked; a malformed batch is a one-line
    ``DataPathError`` naming the file and what a batch holds (never a KeyError or reshape traceback)."""
    entry = _unpickle(path, source)
    key = _cifar_label_key(source)

    def refuse(problem: str) -> DataPathError:
        return DataPathError(f"{source}: {path} is not a CIFAR batch: {problem}; {_cifar_holds(source)}")

    missing = [k for k in ("data", key) if k not in entry]
    if missing:
        raise refuse(f"it has no {' or '.join(repr(k.encode()) for k in missing)} (its keys: "
                     f"{', '.join(sorted(map(str, entry))) or 'none'})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise refuse(f"b'data' is {what}")
    if len(data) == 0:
        raise refuse("b'data' holds no images")
    raw = entry[key]
    labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        what = f"a {type(raw).__name__}" if labels is None else (
            f"a list of {labels.dtype}" if labels.ndim == 1 else f"of shape {labels.shape}")
        raise refuse(f"b'{key}' is {what}, not a list of ints")
    if len(labels) != len(data):
        raise refuse(f"b'data' holds {len(data)} images but b'{key}' {len(labels)} labels")
    bad = (labels < 0) | (labels >= _cifar_classes(source))
    if bad.any():
        raise refuse(f"b'{key}' holds {int(labels[bad][0])} (label {int(np.argmax(bad))})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_batches(folder: Path, names: list[str], source: str = "cifar") -> tuple[Tensor, Tensor]:
    batches = [_batch(folder / name, source) for name in names]
    return (torch.from_numpy(np.concatenate([d for d, _ in batches])),
            torch.from_numpy(np.concatenate([lab for _, lab in batches])))


def _read_classes(path: Path, key: str, source: str) -> list[str]:
    """The class names in a CIFAR meta file (``batches.meta``: b'label_names'; ``meta``: b'fine_label_names')."""
    meta = _unpickle(path, source)
    names, count = meta.get(key), _cifar_classes(source)
    if (not isinstance(names, (list, tuple)) or len(names) != count
            or not all(isinstance(n, (str, bytes)) for n in names)):
        what = f"{len(names)} names" if isinstance(names, (list, tuple)) else (
            f"no b'{key}'" if names is None else f"a {type(names).__name__} as b'{key}'")
        raise DataPathError(f"{source}: {path} is not a CIFAR meta file: it holds {what}; expected a dict with "
                            f"b'{key}' (a list of {count} class names)")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
