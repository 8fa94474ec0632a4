"""The gpt2 task, its text data and tokenizers, the perplexity evaluator and export. Offline: nothing downloads.

Tests that need the real GPT-2 BPE files read ``tiktoken-cache/`` of the local test data (``helpers.local_data``:
``$LAWA_SUITE_TEST_DATA``) and are skipped (with the reason) where it is absent; everything else builds its own data.
"""

from __future__ import annotations

import contextlib
import io
import re
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lawa_suite import registry
from lawa_suite.cli import app
from lawa_suite.config import ConfigError, resolve
from lawa_suite.data import DataUnavailable
from lawa_suite.data import text as textdata
from lawa_suite.data.text import (BytesTokenizer, embedded_text, load_tokens, prepare_openwebtext, write_token_file)
from lawa_suite.tasks.base import parameter_count
from lawa_suite.tasks.gpt2 import Gpt2Task, WindowStream, held_out_starts

from helpers import local_data, read_metrics

LOCAL_TIKTOKEN = local_data() / "tiktoken-cache"
needs_gpt2_vocab = pytest.mark.skipif(not (LOCAL_TIKTOKEN / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").is_file(),
                                      reason=f"the GPT-2 BPE files are not in {LOCAL_TIKTOKEN} (set "
                                             "LAWA_SUITE_TEST_DATA; nothing downloads in tests)")
runner = CliRunner()


def tiny_task(tmp_path: Path, *overrides: str) -> Gpt2Task:
    cfg = resolve(["task=gpt2", "preset=tiny", f"data.cache={tmp_path / 'cache'}", f"out={tmp_path / 'run'}",
                   *overrides])
    task = Gpt2Task(cfg.task, cfg.run)
    task.setup()
    return task


# The tiny example through the CLI, with all three averagers (conftest's tiny_run)
TINY_RUN = ["task=gpt2", "preset=tiny", "averager=lawa,ema,swa"]


# -- the task end to end ------------------------------------------------------------------------------
def test_tiny_run_scores_raw_and_every_averager_on_the_same_windows(tiny_run):
    rows = [r for r in read_metrics(tiny_run) if r.get("split") == "val"]
    final = {r["weights"]: r for r in rows if r["step"] == 16}
    assert set(final) == {"raw", "lawa", "ema", "swa"}
    for row in final.values():
        assert math.isclose(row["perplexity"], math.exp(row["loss"]), rel_tol=1e-9)
    first_raw = min((r for r in rows if r["weights"] == "raw"), key=lambda r: r["step"])
    assert final["raw"]["loss"] < first_raw["loss"] < math.log(256) + 0.5  # it learns from a near-uniform start
    assert "gpt2" in (tiny_run / "config.yaml").read_text()


def test_parameter_count_is_printed_at_start(tmp_path):
    result = runner.invoke(app, ["run", "task=gpt2", "preset=tiny", "steps=2", "warmup=0", "averager=",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}", "progress=false"])
    assert result.exit_code == 0, result.output
    assert "34,688 parameters" in result.output and "embedded Tiny Shakespeare" in result.output


# -- data: embedded, text files and folders, caching ------------------------------------------------------
def test_embedded_corpus_ships_with_the_package_and_splits_by_tail():
    text = embedded_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    splits = load_tokens("embedded", "", "", BytesTokenizer(), 0.1)
    assert len(splits.train) + len(splits.val) == len(text.encode())
    assert len(splits.val) == round(0.1 * len(text.encode()))
    assert bytes(splits.val[-20:].astype(np.uint8)) == text.encode()[-20:]  # the tail is held out


def write_corpus(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha " * 100)
    (root / "sub" / "b.md").write_text("beta " * 200)
    (root / ".hidden.txt").write_text("hidden " * 50)   # hidden files are not read
    (root / "data.bin").write_bytes(b"\x00\x01" * 100)   # nor files of other kinds


def test_text_folder_is_split_per_file_and_cached(tmp_path, monkeypatch):
    root, cache = tmp_path / "corpus", tmp_path / "cache"
    write_corpus(root)
    splits = load_tokens("text", str(root), str(cache), BytesTokenizer(), 0.1)
    assert (len(splits.train), len(splits.val)) == (540 + 900, 60 + 100)   # every file gives its last 10%
    assert bytes(splits.val.astype(np.uint8)) == b"alpha " * 10 + b"beta " * 20
    assert isinstance(splits.train, np.memmap) and len(list(cache.glob("text/*/train.bin"))) == 1

    # a second load reads the cache: it does not tokenize again
    monkeypatch.setattr(BytesTokenizer, "encode", lambda self, text: pytest.fail("tokenized twice"))
    again = load_tokens("text", str(root), str(cache), BytesTokenizer(), 0.1)
    assert np.array_equal(again.train, splits.train) and np.array_equal(again.val, splits.val)
    monkeypatch.undo()

    # an edited file is a different corpus
    (root / "a.txt").write_text("gamma " * 100)
    edited = load_tokens("text", str(root), str(cache), BytesTokenizer(), 0.1)
    assert bytes(edited.val[:6].astype(np.uint8)) == b"gamma " and len(list(cache.glob("text/*/meta.json"))) == 2


def test_text_file_through_the_task(tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    task = tiny_task(tmp_path, "data=text", f"data.path={corpus}")
    assert "play.txt (1 file, bytes tokens)" in task.tokens.description
    assert len(task.tokens.val) == round(0.1 * len(corpus.read_bytes()))


@pytest.mark.parametrize("path, expected", [
    ("", "data.path: data=text needs data.path="),
    ("missing.txt", "does not exist"),
    ("empty-folder", "holds no text files (looked for .txt, .md, .rst, .text)"),
])
def test_text_source_bad_paths_say_what_is_wrong(tmp_path, path, expected):
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DataUnavailable, match=re.escape(expected)) as err:
        load_tokens("text", str(tmp_path / path) if path else "", str(tmp_path / "cache"), BytesTokenizer(), 0.1)
    assert "\n" not in str(err.value)


def test_too_little_text_for_one_window_is_a_config_error(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("x" * 200)   # 20 val bytes < a window of seq_len + 1 = 33
    with pytest.raises(ConfigError, match=r"gpt2\.seq_len: the val split has 20 tokens.*expected seq_len <= 19"):
        tiny_task(tmp_path, "data=text", f"data.path={corpus}")


def test_openwebtext_needs_gpt2_tokens(tmp_path):
    with pytest.raises(ConfigError, match="gpt2.tokenizer: data=openwebtext is stored as gpt2 tokens"):
        tiny_task(tmp_path, "data=openwebtext")


def test_unknown_data_source_is_refused():
    with pytest.raises(ConfigError, match="data: task 'gpt2' reads embedded, text, openwebtext; got 'wiki'"):
        resolve(["task=gpt2", "data=wiki"])


# -- tokenizers --------------------------------------------------------------------------------------------
def test_gpt2_tokenizer_offline_without_cache_names_the_missing_files(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def offline(url: str) -> bytes:
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})   # forget an encoding loaded by an earlier test
    with pytest.raises(DataUnavailable) as err:
        textdata.get_tokenizer("gpt2")
    message = str(err.value)
    assert "\n" not in message
    for needed in ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee (vocab.bpe",
                   "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6 (encoder.json", str(tmp_path / "empty-cache"),
                   "TIKTOKEN_CACHE_DIR", "tokenizer=bytes"):
        assert needed in message


@needs_gpt2_vocab
def test_gpt2_tokenizer_reads_tiktoken_cache_dir(monkeypatch):
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LOCAL_TIKTOKEN))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tokenizer = textdata.get_tokenizer("gpt2")
    assert tokenizer.encode("Hello world").tolist() == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_bytes_tokenizer_round_trips_utf8():
    tokenizer = BytesTokenizer()
    ids = tokenizer.encode("naïve café")
    assert ids.max() < 256 and tokenizer.decode(ids) == "naïve café"


# -- OpenWebText preparation (on a local dataset: no download) --------------------------------------------
class EotBytes(BytesTokenizer):
    """Bytes with byte 0 as end-of-text, to see the document separators prepare_openwebtext writes."""
    eot = 0


def test_openwebtext_prepare_writes_train_and_val_like_nanogpt(tmp_path):
    datasets = pytest.importorskip("datasets", reason="HuggingFace datasets is the test extra's")
    docs = [f"document number {i} " * (1 + i % 3) for i in range(100)]
    prepare_openwebtext(tmp_path / "owt", EotBytes(), datasets.Dataset.from_dict({"text": docs}), num_proc=1)
    train = np.memmap(tmp_path / "owt" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tmp_path / "owt" / "val.bin", dtype=np.uint16, mode="r")
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)          # every document once, plus its EOT
    assert int((val == 0).sum()) == 1 and int((train == 0).sum()) == 99    # test_size 0.0005 of 100: one document
    held_out = bytes(val[:-1].astype(np.uint8)).decode()
    assert held_out in docs and val[-1] == 0
    assert not list((tmp_path / "owt").glob("*.partial")) and not list((tmp_path / "owt").glob("*.progress.json"))


def test_token_file_write_resumes_from_the_last_finished_shard(tmp_path):
    shards = [np.arange(i * 10, i * 10 + 10, dtype=np.uint16) for i in range(5)]
    calls: list[int] = []

    def crash_at_three(index: int) -> np.ndarray:
        calls.append(index)
        if index == 3:
            raise KeyboardInterrupt
        return shards[index]

    path = tmp_path / "train.bin"
    with pytest.raises(KeyboardInterrupt):
        write_token_file(path, 50, 5, crash_at_three)
    assert not path.exists() and calls == [0, 1, 2, 3]
    calls.clear()
    write_token_file(path, 50, 5, lambda index: calls.append(index) or shards[index])
    assert calls == [3, 4]                                   # shards 0-2 were not redone
    assert np.fromfile(path, dtype=np.uint16).tolist() == list(range(50))


def test_openwebtext_without_datasets_or_network_says_so(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="HuggingFace datasets is the test extra's")

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataUnavailable, match="could not download 'openwebtext'.*put prepared train.bin and val.bin"):
        prepare_openwebtext(tmp_path / "owt", EotBytes())


# -- windows: training stream and held-out set --------------------------------------------------------------
def test_window_stream_resumes_exactly_and_splits_over_processes():
    tokens = np.arange(1000, dtype=np.uint16)
    whole = WindowStream(tokens, 9, micro_batch=4, seed=7)
    batches = [whole.next_batch()["tokens"] for _ in range(5)]
    resumed = WindowStream(tokens, 9, micro_batch=4, seed=7)
    resumed.load_state_dict({"batches": 3})
    assert torch.equal(resumed.next_batch()["tokens"], batches[3])
    halves = [WindowStream(tokens, 9, micro_batch=4, seed=7, rank=r, world=2) for r in (0, 1)]
    merged = torch.cat([h.next_batch()["tokens"] for h in halves])
    assert sorted(merged[:, 0].tolist()) == sorted(batches[0][:, 0].tolist())
    assert all(torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 8, dtype=torch.int64)) for b in batches)  # contiguous
    assert not torch.equal(WindowStream(tokens, 9, 4, seed=8).next_batch()["tokens"], batches[0])


def test_held_out_windows_are_fixed_evenly_spaced_and_bounded(tmp_path):
    task = tiny_task(tmp_path, "eval.batches=3")
    first, second = task.eval_batches(), task.eval_batches()
    assert len(first) == 3 and all(b["tokens"].shape == (8, 33) for b in first)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, second))
    starts = held_out_starts(len(task.tokens.val), 32, 24)
    assert np.all(np.diff(starts) >= 32) and starts[-1] + 33 <= len(task.tokens.val)
    assert len(held_out_starts(100, 32, None)) == 3     # eval.batches=0: every whole window


# -- perplexity -----------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_token_cross_entropy(tmp_path):
    task = tiny_task(tmp_path, "eval.batches=2")
    torch.manual_seed(0)
    model = task.build_model().eval()
    full, part = task.eval_batches()
    batches = [full, {"tokens": part["tokens"][:3]}]   # unequal batches: a mean of batch means would differ
    scores = registry.evaluators.create("perplexity", task=task).evaluate(model, batches)
    with torch.no_grad():   # brute force: every token's loss, one window at a time
        losses = [F.cross_entropy(model(input_ids=w[None, :-1]).logits[0], w[1:], reduction="none")
                  for b in batches for w in b["tokens"]]
    mean = torch.cat(losses).double().mean().item()
    assert scores["loss"] == pytest.approx(mean, rel=1e-6)
    assert scores["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert 4.5 < scores["loss"] < 6.5    # an untrained byte model is near log(256) = 5.55


# -- model --------------------------------------------------------------------------------------------------
def test_model_is_gpt2_with_tied_embeddings_sdpa_and_its_init(tmp_path):
    task = tiny_task(tmp_path)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    # transformers' sdpa under the suite's name: no mask built, so no host read of position ids (gpt2.causal_sdpa)
    assert model.config._attn_implementation == "lawa-suite-causal-sdpa"
    proj = model.transformer.h[0].attn.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.15)   # residual projections scaled
    groups = task.build_optimizer(model, 1e-3).param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[0]["betas"] == (0.9, 0.95)
    assert sum(p.numel() for g in groups for p in g["params"]) == parameter_count(model) == 34_688


def test_the_suites_causal_attention_scores_as_transformers_masked_sdpa(tmp_path):
    """The model attends by SDPA's is_causal instead of a mask transformers builds (which read position ids on the
    host every forward): the same logits as the stock sdpa model, and stock sdpa again in an exported folder."""
    task = tiny_task(tmp_path)
    torch.manual_seed(0)
    model = task.build_model().eval()
    stock = type(model)(task.hf_config()).eval()
    stock.load_state_dict(model.state_dict())
    assert stock.config._attn_implementation == "sdpa"
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, stock(input_ids=tokens).logits, rtol=1e-5,
                                   atol=1e-6)
    assert "lawa-suite" not in task.hf_config().to_json_string()


@pytest.mark.parametrize("preset, params", [("small", 124_439_808), ("medium", 354_823_168), ("large", 774_030_080)])
def test_paper_presets_resolve_to_the_nanogpt2_runs(preset, params):
    cfg = resolve(["task=gpt2", f"preset={preset}"])
    run, task = cfg.run, cfg.task
    assert run.batch_size * task.seq_len == 131_072 and run.data.source == "openwebtext"
    assert (run.steps, run.warmup, run.schedule, run.grad_clip, run.mixed_precision) == \
        (70_000, 2_000, "cosine", 1.0, "bf16")
    assert (task.beta1, task.beta2, task.weight_decay, task.tokenizer) == (0.9, 0.95, 0.1, "gpt2")
    assert run.lr == {"small": 6e-3, "medium": 3e-3, "large": 2e-3}[preset]
    assert resolve(["task=gpt2", f"preset={preset}", "lr=6e-4"]).run.lr == 6e-4
    with torch.device("meta"):   # the shape, without allocating it
        model = Gpt2Task(task, run).build_model()
    assert parameter_count(model) == params


class FakeGpt2Tokenizer(BytesTokenizer):
    """GPT-2's vocabulary size without its BPE files (bytes map to the first 256 ids): the model is the real one."""
    name, vocab_size, eot = "gpt2", 50257, 50256


@pytest.mark.slow
def test_small_preset_builds_124m_and_takes_one_real_optimizer_step(tmp_path, monkeypatch):
    monkeypatch.setattr("lawa_suite.tasks.gpt2.get_tokenizer", lambda name: FakeGpt2Tokenizer())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(600)))
    result = runner.invoke(app, [
        "run", "task=gpt2", "preset=small", "data=text", f"data.path={corpus}", f"data.cache={tmp_path / 'cache'}",
        f"out={tmp_path / 'run'}", "steps=1", "warmup=0", "batch_size=1", "grad_accum=1", "mixed_precision=no",
        "averager=lawa", "eval.batches=1", "gpt2.eval_batch_size=1", "progress=false", "log_every=1"])
    assert result.exit_code == 0, result.output
    assert "12 layers x 768 wide, 12 heads, context 1024, 124,439,808 parameters" in result.output
    rows = read_metrics(tmp_path / "run")
    train_loss = next(r["loss"] for r in rows if r.get("split") == "train" and r["step"] == 1)
    val_loss = next(r["loss"] for r in rows if r.get("split") == "val" and r["weights"] == "raw")
    assert math.isfinite(train_loss) and abs(train_loss - math.log(50257)) < 1.0   # GPT-2 init: near uniform
    assert val_loss < train_loss - 0.05     # one AdamW step at 6e-3 already moves it


# -- export -------------------------------------------------------------------------------------------------
def test_export_loads_with_auto_model_and_gives_the_same_logits(tiny_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lawa_suite.rundir import load_resolved
    from lawa_suite.export import select_weights

    out = tmp_path / "hf-lawa"
    result = runner.invoke(app, ["export", str(tiny_run), f"out={out}", "weights=lawa"])
    assert result.exit_code == 0, result.output
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = load_resolved(tiny_run)
    task = Gpt2Task(cfg.task, cfg.run)
    weights, _ = select_weights(tiny_run, "lawa", cfg)
    suite_model = task.build_model()
    suite_model.load_state_dict(weights)
    suite_model.eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=tokens).logits, suite_model(input_ids=tokens).logits)
    raw = load_file(next((tiny_run / "checkpoints").glob("*/model.safetensors")))
    assert not torch.equal(weights["transformer.wte.weight"], raw["transformer.wte.weight"])  # the average, not raw


@needs_gpt2_vocab
def test_export_with_gpt2_tokens_carries_a_matching_tokenizer(tmp_path, monkeypatch):
    import tiktoken.registry
    from transformers import AutoTokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LOCAL_TIKTOKEN))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    cfg = resolve(["task=gpt2", "preset=tiny", "gpt2.tokenizer=gpt2", f"out={tmp_path / 'run'}"])
    task = Gpt2Task(cfg.task, cfg.run)
    with torch.device("meta"):
        weights = task.build_model().state_dict()
    task.export({k: torch.zeros(v.shape) for k, v in weights.items()}, tmp_path / "hf")
    text = "Weight averaging, early and often."
    ours = textdata.get_tokenizer("gpt2").encode(text).tolist()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == ours


def test_export_without_the_gpt2_vocabulary_fails_naming_it_and_writes_nothing(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def offline(url: str) -> bytes:
        raise ConnectionError(f"no network for {url}")

    cfg = resolve(["task=gpt2", "preset=tiny", "gpt2.tokenizer=gpt2", f"out={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    task = Gpt2Task(cfg.task, cfg.run)
    with torch.device("meta"):
        shapes = task.build_model().state_dict()
    from safetensors.torch import save_file
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items() if k != "lm_head.weight"},
              str(tmp_path / "run" / "weights.safetensors"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    weights = tmp_path / "run" / "weights.safetensors"
    result = runner.invoke(app, ["export", str(weights), f"out={tmp_path / 'hf'}"])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "vocab.bpe" in line and "encoder.json" in line and "TIKTOKEN_CACHE_DIR" in line
    assert not (tmp_path / "hf").exists()


def test_a_byte_level_export_says_how_to_encode_text_and_the_recipe_works(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert runner.invoke(app, ["export", str(tiny_run), f"out={out}"]).exit_code == 0
    readme = (out / "README.md").read_text()
    assert "token `i` is byte `i`" in readme
    recipe = readme.split("```python\n")[1].split("```")[0].replace('"<this folder>"', repr(str(out)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(recipe, {"AutoModelForCausalLM": AutoModelForCausalLM})  # the README's example, as written
    assert printed.getvalue().startswith("To be, or not")


def test_a_data_path_that_does_not_exist_is_a_configuration_error(tmp_path):
    result = runner.invoke(app, ["run", "task=gpt2", "preset=tiny", "data=text", f"data.path={tmp_path / 'nope.txt'}",
                                 f"out={tmp_path / 'run'}", f"data.cache={tmp_path / 'cache'}"])
    assert result.exit_code == 2, result.output  # README: configuration errors exit with 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: data.path:") and "nope.txt does not exist" in line
