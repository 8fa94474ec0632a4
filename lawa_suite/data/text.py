"""Language-modelling data: tokenizers and token corpora, each split into train and val token arrays.

Sources (the values of ``data=`` the ``gpt2`` task accepts):

- ``embedded``: Tiny Shakespeare (Karpathy's char-rnn corpus, public-domain text, 1.1 MB) shipped gzipped inside
  the package, so the default works on any installed machine with no network.
- ``text``: ``data.path`` is a UTF-8 text file or a folder of them (``.txt``, ``.md``, ``.rst``, ``.text``,
  searched recursively, in sorted order). Each file is split by tokens: its first ``1 - val_fraction`` go to
  train, the rest to val (nanoGPT's Shakespeare split, applied per file so every file is in both). Tokens are
  written once into the cache as uint16 ``train.bin`` / ``val.bin`` and memory-mapped after.
- ``openwebtext``: nanoGPT's preparation (HuggingFace ``datasets`` -> tiktoken ``gpt2`` -> ``train.bin`` /
  ``val.bin``), done once into ``<cache>/openwebtext-gpt2/`` (or ``data.path``), resumable shard by shard. A
  folder that already holds the two files (prepared elsewhere, e.g. by nanoGPT) is used as it is.

Tokenizers: ``bytes`` (UTF-8 bytes, vocabulary 256, nothing to download) and ``gpt2`` (tiktoken's GPT-2 BPE,
vocabulary 50257; its two vocabulary files come from tiktoken's cache, ``$TIKTOKEN_CACHE_DIR``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from lawa_suite.data import DataUnavailable
from lawa_suite.errors import DataPathError
from lawa_suite.files import first_line, write_atomic, write_text_atomic

__all__ = ["Tokenizer", "BytesTokenizer", "Gpt2Tokenizer", "get_tokenizer", "VOCAB_SIZES", "TokenSplits",
           "load_tokens", "embedded_text", "write_token_file", "prepare_openwebtext", "TEXT_SUFFIXES", "encode_all",
           "text_source_files"]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
VOCAB_SIZES = {"bytes": 256, "gpt2": 50257}
TOKEN_DTYPE = np.uint16          # both vocabularies fit (GPT-2's 50257 < 65536), as in nanoGPT
CACHE_FORMAT = 1                 # bump when the token-cache layout changes, so stale caches are ignored

# tiktoken fetches the GPT-2 BPE from these URLs and caches each as <cache dir>/<sha1 of its URL>.
GPT2_VOCAB_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


# -- tokenizers ---------------------------------------------------------------------------------------
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot: int | None              # the end-of-text token put between documents, if the vocabulary has one

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: list[int] | np.ndarray) -> str: ...


class BytesTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no download, no end-of-text token."""

    name, vocab_size, eot = "bytes", 256, None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiktoken_cache_dir() -> Path:
    """Where tiktoken keeps downloaded vocabularies (the same rule as ``tiktoken.load.read_file_cached``)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def gpt2_vocab_files() -> dict[str, Path]:
    """``{"vocab.bpe": path, "encoder.json": path}``: where tiktoken looks for the GPT-2 BPE files."""
    cache = tiktoken_cache_dir()
    return {name: cache / hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_VOCAB_URLS.items()}


class Gpt2Tokenizer:
    """tiktoken's ``gpt2`` encoding. Offline without its cached files: one line naming them and where they go."""

    name, vocab_size, eot = "gpt2", 50257, 50256

    def __init__(self) -> None:
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # noqa: BLE001 - a network error, or a corrupt cache tiktoken could not re-fetch
            files = gpt2_vocab_files()
            missing = [f"{path.name} ({name}, from {GPT2_VOCAB_URLS[name]})"
                       for name, path in files.items() if not path.is_file()]
            what = f"missing {' and '.join(missing)}" if missing else "its cached files could not be read"
            raise DataUnavailable(
                f"tokenizer gpt2: tiktoken could not load its vocabulary ({type(exc).__name__}); {what} in "
                f"{tiktoken_cache_dir()}: download them there, or set TIKTOKEN_CACHE_DIR to a folder holding them, "
                f"or use tokenizer=bytes") from None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode_ordinary(text), dtype=TOKEN_DTYPE)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=TOKEN_DTYPE)
                for ids in self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.encoding.decode([int(i) for i in ids])


def get_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return BytesTokenizer()
    if name == "gpt2":
        return Gpt2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(VOCAB_SIZES)}")


# -- corpora ------------------------------------------------------------------------------------------
@dataclass
class TokenSplits:
    """Train and val token arrays (uint16; in memory or memory-mapped) and where they came from."""
    train: np.ndarray
    val: np.ndarray
    description: str


def load_tokens(source: str, path: str, cache: str, tokenizer: Tokenizer, val_fraction: float) -> TokenSplits:
    if source == "embedded":
        return _split_documents([embedded_text()], tokenizer, val_fraction, "embedded Tiny Shakespeare")
    if source == "text":
        return load_text(path, cache, tokenizer, val_fraction)
    if source == "openwebtext":
        return load_openwebtext(path, cache, tokenizer)
    raise ValueError(f"unknown text source {source!r}; known: embedded, text, openwebtext")


def embedded_text() -> str:
    data = resources.files("lawa_suite.data").joinpath("corpora/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def _split_documents(texts: list[str], tokenizer: Tokenizer, val_fraction: float, description: str) -> TokenSplits:
    train, val = [], []
    for ids in encode_all(texts, tokenizer):
        cut = len(ids) - int(round(len(ids) * val_fraction))
        train.append(ids[:cut])
        val.append(ids[cut:])
    return _checked(TokenSplits(np.concatenate(train), np.concatenate(val), description))


def encode_all(texts: list[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each text's tokens (in parallel where the tokenizer can)."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    return encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]


def _checked(splits: TokenSplits, minimum: int = 2) -> TokenSplits:
    for split in ("train", "val"):
        if len(getattr(splits, split)) < minimum:
            raise DataUnavailable(f"{splits.description}: the {split} split has {len(getattr(splits, split))} "
                                  f"tokens; give more text (or a different gpt2.val_fraction)")
    return splits


def text_files(path: Path) -> list[Path]:
    """The text files under ``path`` (itself, if a file), in sorted order; hidden ones skipped."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataPathError(f"data.path: {path} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    return files


def text_source_files(path: str) -> list[Path]:
    """The files ``data=text`` reads from ``data.path`` (itself, or the text files of a folder); a missing path,
    or a folder without text, is a one-line DataPathError."""
    if not path:
        raise DataPathError("data.path: data=text needs data.path=<a text file or a folder of .txt/.md files>")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataPathError(f"data.path: {root} does not exist (data=text reads a text file or a folder)")
    return text_files(root)


def load_text(path: str, cache: str, tokenizer: Tokenizer, val_fraction: float) -> TokenSplits:
    """Tokenize a file or folder once into ``<cache>/text/<key>/``; later runs memory-map the result."""
    files = text_source_files(path)
    root = Path(path).expanduser()
    folder = Path(cache) / "text" / _text_key(root, files, tokenizer.name, val_fraction)
    description = f"{root} ({len(files)} file{'s' * (len(files) != 1)}, {tokenizer.name} tokens)"
    if not (folder / "meta.json").is_file():
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in tqdm(files, desc="reading text",
                                                                                 disable=len(files) < 100)]
        splits = _split_documents(texts, tokenizer, val_fraction, description)
        _write_splits(folder, splits, {"files": [str(f) for f in files], "tokenizer": tokenizer.name,
                                       "val_fraction": val_fraction})
    return _checked(TokenSplits(*_open_splits(folder), description))


def _text_key(root: Path, files: list[Path], tokenizer: str, val_fraction: float) -> str:
    """Names the cache entry: the files' paths, sizes and modification times plus the tokenization settings."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, str(root.resolve()), tokenizer, val_fraction]).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{root.stem[:40]}-{digest.hexdigest()[:16]}"


def _write_splits(folder: Path, splits: TokenSplits, meta: dict) -> None:
    """Both files, then ``meta.json`` last: a folder without it is an unfinished write and is redone."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens = np.ascontiguousarray(getattr(splits, split), dtype=TOKEN_DTYPE)
        write_atomic(folder / f"{split}.bin", tokens.tofile, durable=False)
    meta = {**meta, "format": CACHE_FORMAT, "train_tokens": int(len(splits.train)), "val_tokens": int(len(splits.val))}
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1))


def _open_splits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.memmap(folder / "train.bin", dtype=TOKEN_DTYPE, mode="r"),
            np.memmap(folder / "val.bin", dtype=TOKEN_DTYPE, mode="r"))


# -- OpenWebText (nanoGPT's prepare.py, resumable) ------------------------------------------------------
OPENWEBTEXT_SHARDS = 1024        # nanoGPT writes each split in 1024 contiguous shards
OPENWEBTEXT_VAL_FRACTION = 0.0005
OPENWEBTEXT_SPLIT_SEED = 2357    # nanoGPT's: the same val documents as every nanoGPT run


def openwebtext_folder(path: str, cache: str) -> Path:
    return Path(path).expanduser() if path else Path(cache) / "openwebtext-gpt2"


def load_openwebtext(path: str, cache: str, tokenizer: Tokenizer) -> TokenSplits:
    if tokenizer.name != "gpt2":
        raise DataPathError(f"data=openwebtext is stored as gpt2 tokens; use tokenizer=gpt2 (got {tokenizer.name})")
    folder = openwebtext_folder(path, cache)
    if not ((folder / "train.bin").is_file() and (folder / "val.bin").is_file()):
        prepare_openwebtext(folder, tokenizer)
    return _checked(TokenSplits(*_open_splits(folder), f"OpenWebText ({folder}, gpt2 tokens)"))


def prepare_openwebtext(folder: Path, tokenizer: Tokenizer, dataset: object | None = None,
                        num_proc: int | None = None) -> None:
    """Download OpenWebText with HuggingFace ``datasets``, tokenize it and write ``train.bin`` / ``val.bin``.

    ``dataset`` (a ``datasets.Dataset`` with a ``text`` column) replaces the download: tests and users with a
    local copy pass it. Every stage resumes: ``datasets`` caches the download and the tokenized map, and
    ``write_token_file`` continues from the last finished shard.
    """
    try:
        import datasets
    except ImportError:
        raise DataUnavailable("data=openwebtext needs HuggingFace datasets: pip install 'lawa-suite[openwebtext]' "
                              f"(or put nanoGPT's prepared train.bin and val.bin in {folder})") from None
    num_proc = num_proc or max(1, (os.cpu_count() or 2) // 2)
    if dataset is None:
        try:
            dataset = datasets.load_dataset("openwebtext", num_proc=num_proc)["train"]
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each becomes the one-line fix
            raise DataUnavailable(
                f"data=openwebtext: could not download 'openwebtext' with HuggingFace datasets "
                f"({type(exc).__name__}: {first_line(exc)[:160]}); "
                f"go online once, or put prepared train.bin and val.bin in {folder}") from None
    split = dataset.train_test_split(test_size=OPENWEBTEXT_VAL_FRACTION, seed=OPENWEBTEXT_SPLIT_SEED, shuffle=True)
    eot = tokenizer.eot if tokenizer.eot is not None else None

    def tokenize(example: dict) -> dict:
        ids = tokenizer.encode(example["text"]).tolist()
        if eot is not None:
            ids.append(eot)  # documents are separated by end-of-text, as nanoGPT does
        return {"ids": ids, "len": len(ids)}

    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", split["train"]), ("val", split["test"])):
        tokens = part.map(tokenize, remove_columns=part.column_names, desc=f"tokenizing {name}", num_proc=num_proc)
        lengths = np.asarray(tokens["len"], dtype=np.int64)
        shards = min(OPENWEBTEXT_SHARDS, len(tokens))

        def shard_tokens(index: int, tokens=tokens, shards=shards) -> np.ndarray:
            piece = tokens.shard(num_shards=shards, index=index, contiguous=True).with_format("numpy")
            return np.concatenate(list(piece["ids"])).astype(TOKEN_DTYPE) if len(piece) else np.zeros(0, TOKEN_DTYPE)

        write_token_file(folder / f"{name}.bin", int(lengths.sum()), shards, shard_tokens, desc=f"writing {name}.bin")


def write_token_file(path: Path, total: int, shards: int, shard_tokens: Callable[[int], np.ndarray],
                     desc: str = "writing tokens") -> None:
    """Write ``total`` tokens, produced shard by shard, into ``path`` (uint16), resuming an interrupted write.

    Tokens go into ``<path>.partial`` (a memmap of the final size); after each shard its index and the tokens
    written so far are recorded in ``<path>.progress.json``. A restart continues from the recorded shard; the
    finished file is renamed into place, so ``path`` exists only when it is complete.
    """
    partial, progress = path.with_name(path.name + ".partial"), path.with_name(path.name + ".progress.json")
    done, offset = 0, 0
    if partial.is_file() and progress.is_file():
        record = json.loads(progress.read_text())
        if record.get("total") == total and record.get("shards") == shards:
            done, offset = int(record["done"]), int(record["offset"])
    mode = "r+" if done else "w+"
    out = np.memmap(partial, dtype=TOKEN_DTYPE, mode=mode, shape=(total,))
    for index in tqdm(range(done, shards), desc=desc, initial=done, total=shards, unit="shard"):
        tokens = shard_tokens(index)
        if offset + len(tokens) > total:
            raise ValueError(f"{path.name}: shard {index} overruns the expected {total:,} tokens")
        out[offset:offset + len(tokens)] = tokens
        offset += len(tokens)
        out.flush()
        write_text_atomic(progress, json.dumps({"total": total, "shards": shards, "done": index + 1, "offset": offset}))
    del out
    if offset != total:
        raise ValueError(f"{path.name}: wrote {offset:,} tokens, expected {total:,}")
    os.replace(partial, path)
    progress.unlink(missing_ok=True)
