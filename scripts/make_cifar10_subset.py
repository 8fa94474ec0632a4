"""Make the CIFAR-10 subset shipped in the package (``lawa_suite/data/images/cifar10-subset.tar.gz``), once.

    python scripts/make_cifar10_subset.py ../shared/data/cifar10-jpg.tar.gz

Class-balanced: 1,000 training and 200 test images of each of the 10 classes, drawn with a fixed seed from the
CIFAR-10 JPEGs (``train/<class>/*.jpg``, ``test/<class>/*.jpg``; quality 75, the original 32x32 images
re-encoded). The JPEG bytes are copied unchanged into a tar with sorted members and fixed metadata, gzipped with no
time stamp (11 MB of JPEGs whose headers repeat become 3.9 MB), so the output is byte-identical whenever it is made
from the same input.
"""

from __future__ import annotations

import gzip
import io
import random
import sys
import tarfile
from pathlib import Path

PER_CLASS = {"train": 1000, "test": 200}
SEED = 0
OUT = Path(__file__).resolve().parent.parent / "lawa_suite" / "data" / "images" / "cifar10-subset.tar.gz"


def main(source: str) -> None:
    names: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    with tarfile.open(source) as archive:  # one pass for the names: a gzip stream cannot seek back cheaply
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] in names and parts[2].endswith(".jpg"):
                names[parts[0]].setdefault(parts[1], []).append(member.name)
    rng = random.Random(SEED)
    chosen: set[str] = set()
    for split, classes in names.items():
        if len(classes) != 10:
            raise SystemExit(f"{source}: expected 10 classes under {split}/, found {len(classes)}")
        for name in sorted(classes):
            chosen.update(rng.sample(sorted(classes[name]), PER_CLASS[split]))
    data: dict[str, bytes] = {}
    with tarfile.open(source) as archive:  # a second pass for the bytes, in stream order
        for member in archive:
            if member.name in chosen:
                data[member.name] = archive.extractfile(member).read()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name in sorted(data):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data[name]), 0, 0o644, 0, 0
            out.addfile(info, io.BytesIO(data[name]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buffer.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB, {len(data)} images)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpg.tar.gz")
