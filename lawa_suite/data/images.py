"""Image classification data: every source returns the same ``ImageSet`` of uint8 tensors.

Sources (the values of ``data=`` that image tasks accept):

- ``embedded``: a class-balanced CIFAR-10 subset shipped inside the package (10,000 training and 2,000 test
  JPEGs, 1,000 and 200 of each class, 3.9 MB; made by ``scripts/make_cifar10_subset.py`` from the CIFAR-10 JPEGs),
  read like an ``imagefolder`` archive: real images with no download.
- ``digits``: scikit-learn's bundled digits (1,797 8x8 grayscale images, no download), upsampled to the task's
  size and repeated to 3 channels; a fixed stratified split of 1,497 train / 300 test images. Seconds to train:
  what the ``tiny`` presets use.
- ``imagefolder``: ``data.path`` is a folder holding ``train/<class>/*`` and ``test/<class>/*`` (``val/`` is
  accepted for test), or a ``.tar.gz``/``.tgz``/``.tar`` of one. Archives are extracted once, safely, into the
  cache; images are decoded once (both cores) into an ``.npz`` in the cache, so later loads take a second.
  Images are squashed to the square size by default; ``crop=True`` resizes the short side and takes the
  centre square instead (ADM's ``center_crop_arr``, what diffusion models on ImageNet use). Sets too big to
  hold in memory are read file by file instead (``imagefolder_files`` + ``decode_image``; see ``imagestream.py``).
- ``cifar10`` / ``cifar100``: the original pickled batches, downloaded with torchvision into the cache (or
  read from ``data.path`` when set). Offline, the error names the missing file, the URL and where to put it.

Images are stored once as uint8 ``(N, C, H, W)`` (CIFAR-10 is 150 MB so); tasks convert per batch.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lawa_suite.data import DataUnavailable
from lawa_suite.data.cifar_batches import read_cifar
from lawa_suite.errors import DataPathError
from lawa_suite.files import write_npz_atomic

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageSet", "ImageFiles", "EMBEDDED", "load_image_set", "load_digits", "load_imagefolder",
           "imagefolder_files", "decode_image", "load_cifar", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
LAYOUT = "train/<class>/*.jpg|png and test/<class>/*.jpg|png (val/ also accepted for test)"
CACHE_FORMAT = 1           # bump when the decoded-cache layout changes, so stale caches are ignored
POOL_THRESHOLD = 2_000     # below this many files a process pool costs more than it saves
CHUNK = 500                # files per worker task: big enough to amortise pickling, small for a live bar
EMBEDDED = Path(__file__).resolve().parent / "images" / "cifar10-subset.tar.gz"  # data=embedded


@dataclass
class ImageSet:
    """A labelled train/test split held in memory as uint8 ``(N, C, H, W)`` images and int64 labels."""
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    description: str       # where it came from, for the run's summary line

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class ImageFiles:
    """An imagefolder's files, listed but not decoded: ``(path, label)`` pairs of each split, sorted."""
    root: Path
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    description: str


def load_image_set(source: str, path: str, cache: str, image_size: int = 32, crop: bool = False) -> ImageSet:
    """Load ``source`` (embedded | digits | imagefolder | cifar10 | cifar100) at ``image_size`` pixels, RGB.
    ``crop`` (imagefolder only) centre-crops instead of squashing non-square images."""
    if source == "embedded":
        found = load_imagefolder(str(EMBEDDED), cache, image_size)
        found.description = "embedded CIFAR-10 subset (10,000 train / 2,000 test JPEGs)"
        return found
    if source == "digits":
        return load_digits(image_size)
    if source == "imagefolder":
        return load_imagefolder(path, cache, image_size, crop)
    if source in ("cifar10", "cifar100"):  # data.path is read as it is; only the cache is downloaded into
        return load_cifar(source, path or os.path.join(cache, source), image_size, download=not path)
    raise ValueError(f"unknown image source {source!r}; known: embedded, digits, imagefolder, cifar10, cifar100")


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 at ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


# -- digits: scikit-learn's ------------------------------------------------------------------------
def load_digits(image_size: int = 32, test_size: int = 300) -> ImageSet:
    """sklearn's digits as 3-channel ``image_size`` px images; the split is fixed (seeded locally)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).unsqueeze(1)  # values 0..16 -> 0..255
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=digits.target,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return ImageSet(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                    [str(d) for d in range(10)], "digits (scikit-learn)")


# -- imagefolder: a folder or an archive of train/<class>/* and test/<class>/* ------------------------
def load_imagefolder(path: str, cache: str, image_size: int = 32, crop: bool = False) -> ImageSet:
    """Decode (once, into the cache) a ``train/<class>/*`` + ``test/<class>/*`` tree, a folder or an archive."""
    files = imagefolder_files(path, cache)
    key = _cache_key(files.root, files.train + files.test, image_size) + ("-crop" if crop else "")
    cache_file = Path(cache) / "images" / f"{files.root.name}-{image_size}px-{key}.npz"
    if not cache_file.exists():
        _write_cache(cache_file, files.train, files.test, files.classes, image_size, crop)
    return _read_cache(cache_file, files.description)


def imagefolder_files(path: str, cache: str) -> ImageFiles:
    """List (without decoding) the files of a ``train/<class>/*`` + ``test/<class>/*`` folder or archive."""
    if not path:
        raise DataPathError(f"imagefolder: data.path is empty; set data.path to a folder or .tar.gz holding {LAYOUT}")
    source = Path(path).expanduser()
    if not source.exists():
        raise DataPathError(f"imagefolder: {source} does not exist; expected a folder or .tar.gz holding {LAYOUT}")
    folder = extract_archive(source, Path(cache) / "extracted") if source.is_file() else source
    root = _split_root(folder, source)
    train_files, classes = _list_split(root / "train", None)
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if test_dir is None:
        raise DataPathError(f"imagefolder: {root} has no test/ (or val/) folder; expected {LAYOUT}")
    test_files, _ = _list_split(test_dir, classes)
    return ImageFiles(root, train_files, test_files, classes, f"imagefolder {source}")


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def extract_archive(archive: Path, into: Path) -> Path:
    """Extract ``archive`` once into ``into/<name>-<size>-<mtime>`` and return that folder.

    Members that would land outside the target (absolute paths, ``..``, links out) are refused before
    anything is written; ``filter="data"`` guards the extraction itself. Extraction goes to a temporary
    folder renamed into place, so an interrupted run never leaves a half tree that looks complete.
    """
    if not _is_archive(archive):
        raise DataPathError(f"imagefolder: {archive} is a file but not a .tar.gz/.tgz/.tar archive; "
                              f"expected a folder or archive holding {LAYOUT}")
    stat = archive.stat()
    stem = archive.name.split(".")[0]
    target = into / f"{stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if target.is_dir():
        return target
    into.mkdir(parents=True, exist_ok=True)
    tmp = into / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, tmp, archive)
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, target)
    except tarfile.TarError as exc:
        raise DataUnavailable(f"imagefolder: cannot extract {archive}: {exc}") from None
    except OSError:
        if not target.is_dir():  # another process may have renamed its copy into place first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    """Refuse a member whose path, or link target, lands outside ``target`` (pure path arithmetic: fast)."""
    base = os.path.normpath(target)

    def inside(path: str) -> bool:
        full = os.path.normpath(os.path.join(base, path))
        return not os.path.isabs(path) and (full == base or full.startswith(base + os.sep))

    ok = inside(member.name) and not member.isdev()
    if member.issym():  # relative to the link's own folder
        ok = ok and inside(os.path.join(os.path.dirname(member.name), member.linkname))
    elif member.islnk():  # relative to the archive root
        ok = ok and inside(member.linkname)
    if not ok:
        raise DataUnavailable(f"imagefolder: refusing to extract {archive}: member {member.name!r} "
                              f"would be written outside {target} (or is a device)")


def _split_root(folder: Path, source: Path) -> Path:
    """The folder holding ``train/``: ``folder`` itself or its single sub-folder (archives often wrap one)."""
    if (folder / "train").is_dir():
        return folder
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    raise DataPathError(f"imagefolder: {source} has no train/ folder; expected {LAYOUT}")


def _list_split(split: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(file, label)`` pairs of one split, sorted; classes are the sorted sub-folders of train/ (ImageFolder)."""
    if not split.is_dir():
        raise DataPathError(f"imagefolder: {split} is missing; expected {LAYOUT}")
    found = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataPathError(f"imagefolder: {split} has classes not in train/: {', '.join(unknown)}")
    files = [(str(split / name / f), label) for label, name in enumerate(classes) if (split / name).is_dir()
             for f in sorted(os.listdir(split / name)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataPathError(f"imagefolder: {split} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                              f"expected {LAYOUT}")
    return files, classes


def _cache_key(root: Path, files: list[tuple[str, int]], image_size: int) -> str:
    """Changes when the tree's path, file count, total size or the image size change."""
    total = sum(os.path.getsize(f) for f, _ in files)
    text = f"{CACHE_FORMAT}|{root.resolve()}|{len(files)}|{total}|{image_size}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _decode_one(path: str, size: int, crop: bool = False) -> np.ndarray:
    """One image file -> uint8 ``(size, size, 3)``: squashed (bilinear) to the square, or with ``crop`` the
    short side resized to ``size`` and the centre square cut out; untouched when already that size."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = _center_crop(image, size) if crop else image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except OSError as exc:
        raise DataUnavailable(f"imagefolder: cannot decode {path}: {exc}") from None


def decode_image(path: str, size: int, crop: bool = True) -> np.ndarray:
    """Public form of the decoder: one file -> uint8 ``(size, size, 3)`` (centre-cropped by default)."""
    return _decode_one(path, size, crop)


def _center_crop(image: "Image.Image", size: int) -> "Image.Image":
    """ADM's ``center_crop_arr`` (guided-diffusion): halve with a box filter while the short side is at least
    twice ``size`` (cheap, alias-free), resize the short side to ``size`` (bicubic), cut out the centre."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode_chunk(paths: list[str], size: int, crop: bool = False) -> np.ndarray:
    return np.stack([_decode_one(p, size, crop) for p in paths])


def _decode_all(paths: list[str], size: int, desc: str, crop: bool = False) -> np.ndarray:
    """Decode ``paths`` into uint8 ``(N, 3, size, size)``, on every core for big sets, with a progress bar."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    workers = min(len(os.sched_getaffinity(0)), len(chunks))
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as bar:
        if len(paths) < POOL_THRESHOLD or workers < 2:
            decoded = (_decode_chunk(c, size, crop) for c in chunks)
            _fill(out, decoded, bar)
        else:
            # fork: workers only run PIL and numpy, and skip re-importing torch as spawn would.
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                _fill(out, pool.imap(partial(_decode_chunk, size=size, crop=crop), chunks), bar)
    return out.transpose(0, 3, 1, 2)


def _fill(out: np.ndarray, decoded: Iterable[np.ndarray], bar: tqdm) -> None:
    start = 0
    for block in decoded:
        out[start:start + len(block)] = block
        start += len(block)
        bar.update(len(block))


def _write_cache(cache_file: Path, train: list[tuple[str, int]], test: list[tuple[str, int]], classes: list[str],
                 size: int, crop: bool = False) -> None:
    """Decode both splits and save them as one uncompressed .npz (written to a temp file, then renamed)."""
    arrays = {}
    for split, files in (("train", train), ("test", test)):
        arrays[f"{split}_images"] = _decode_all([f for f, _ in files], size, f"decoding {split} images", crop)
        arrays[f"{split}_labels"] = np.asarray([label for _, label in files], dtype=np.int64)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(cache_file, durable=False, classes=np.asarray(classes, dtype=str), **arrays)


def _read_cache(cache_file: Path, description: str) -> ImageSet:
    with np.load(cache_file, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items() if k != "classes"}
    return ImageSet(tensors["train_images"], tensors["train_labels"], tensors["test_images"], tensors["test_labels"],
                    [str(c) for c in arrays["classes"]], description)


# -- cifar10 / cifar100: the original pickled batches (cifar_batches.py) -------------------------------------
def load_cifar(name: str, root: str, image_size: int = 32, download: bool = True) -> ImageSet:
    """CIFAR-10/100 from ``root/<base_folder>``, downloading torchvision's archive there when it is missing
    (``download=False``, ``data.path`` set: nothing is fetched); the batches are read as data only, never as code
    (``cifar_batches.read_cifar``)."""
    train_images, train_labels, test_images, test_labels, classes, folder = read_cifar(name, root, download)
    return ImageSet(_resize(train_images, image_size), train_labels, _resize(test_images, image_size), test_labels,
                    classes, f"{name} {folder}")
