"""Scoring Hugging Face causal-LM folders of any architecture by perplexity on a text (issue 17, part 4): `suite eval`
on a folder of checkpoints, `suite average ... eval=true` (raw versus LAWA on the same windows), and one-line
errors. Tiny GPT-NeoX (Pythia's architecture) and GPT-2 (tied lm_head) checkpoints with a word-level tokenizer
are built here; the losses are checked against a computation that shares no code with the suite's."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lawa_suite.cli import app

runner = CliRunner()
STEPS = (10, 20, 30, 40)
SEQ_LEN = 16
WORDS = "the cat sat on a mat and dog ran far away while birds sang old songs of rain".split()


def corpus(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + "\n")
    return path


def save_tokenizer(folder: Path, text: str) -> None:
    """A word-level tokenizer trained on the text, saved the way transformers saves any fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                            eos_token="<|endoftext|>").save_pretrained(folder)


def neox(vocab: int = 64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                            intermediate_size=32, vocab_size=vocab, max_position_embeddings=32,
                                            tie_word_embeddings=False))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))


def checkpoints(root: Path, build, text: str | None) -> Path:
    """checkpoint-N/ folders as the Trainer writes them, each with other weights (and the tokenizer, given text)."""
    for step in STEPS:
        torch.manual_seed(step)
        folder = root / f"checkpoint-{step}"
        build().save_pretrained(folder)
        if text is not None:
            save_tokenizer(folder, text)
    return root


@pytest.fixture(scope="module")
def neox_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("neox")
    text = corpus(root / "corpus.txt")
    return checkpoints(root / "ckpts", neox, text.read_text()), text


def oracle_loss(folder: Path, text: Path, seq_len: int = SEQ_LEN) -> float:
    """Mean next-token cross-entropy over every window of seq_len + 1 tokens starting at 0, seq_len, 2 seq_len, ...
    with the model from_pretrained loads and the tokenizer saved beside it, one window at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text.read_text(), add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len, seq_len):
            window = torch.tensor([ids[start:start + seq_len + 1]])
            logits = model(input_ids=window[:, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), window[0, 1:], reduction="sum").item()
            count += seq_len
    return total / count


def records(out: Path) -> dict[tuple[int, str], dict]:
    return {(r["step"], r["weights"]): r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_suite_eval_scores_every_gpt_neox_checkpoint_against_an_independent_loss(neox_ckpts, tmp_path):
    ckpts, text = neox_ckpts
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", str(ckpts), f"data.path={text}", f"seq_len={SEQ_LEN}", "batch_size=3",
                                 f"out={out}"])
    assert result.exit_code == 0, result.output
    scored = records(out)
    assert set(scored) == {(s, "raw") for s in STEPS}
    losses = {s: scored[s, "raw"]["loss"] for s in STEPS}
    for step in STEPS:
        assert losses[step] == pytest.approx(oracle_loss(ckpts / f"checkpoint-{step}", text), rel=1e-5)
        assert scored[step, "raw"]["perplexity"] == pytest.approx(math.exp(losses[step]), rel=1e-12)
    assert len(set(losses.values())) == len(STEPS)  # other weights, other losses: each checkpoint was loaded
    report = (out / "report.md").read_text()
    assert "GPTNeoXForCausalLM (gpt_neox, config.json of checkpoint-40)" in report
    assert f"windows of {SEQ_LEN} tokens from {text}" in report
    assert all(f"| {s} | raw | {losses[s]:.4f} |" in report for s in STEPS)
    config = (out / "config.yaml").read_text()
    assert "task: hf-causal-lm" in config and f"seq_len: {SEQ_LEN}" in config

    again = runner.invoke(app, ["eval", str(ckpts), f"data.path={text}", f"seq_len={SEQ_LEN}", f"out={out}"])
    one_line_error(again, str(out))  # a non-empty out is refused without --force
    forced = runner.invoke(app, ["eval", str(ckpts), f"data.path={text}", f"seq_len={SEQ_LEN}", "batch_size=8",
                                 f"out={out}", "--force"])
    assert forced.exit_code == 0, forced.output
    # the batch size changes how windows are grouped, not which: the same losses (to float rounding)
    assert all(records(out)[s, "raw"]["loss"] == pytest.approx(losses[s], rel=1e-6) for s in STEPS)


def test_suite_average_eval_writes_the_raw_versus_lawa_table_on_the_same_windows(neox_ckpts, tmp_path):
    ckpts, text = neox_ckpts
    out = tmp_path / "lawa"
    result = runner.invoke(app, ["average", str(ckpts), "averager=lawa", "lawa.k=2", "lawa.nu=10", "interval=20",
                                 f"out={out}", "eval=true", f"data.path={text}", f"seq_len={SEQ_LEN}",
                                 "eval.batches=0"])
    assert result.exit_code == 0, result.output
    scored = records(out)
    assert set(scored) == {(s, w) for s in (20, 40) for w in ("raw", "lawa-k2-nu10")}
    for step in (20, 40):
        raw = oracle_loss(ckpts / f"checkpoint-{step}", text)
        lawa = oracle_loss(out / "lawa-k2-nu10" / f"step-{step:08d}", text)  # the output folder from_pretrained loads
        assert scored[step, "raw"]["loss"] == pytest.approx(raw, rel=1e-5)
        assert scored[step, "lawa-k2-nu10"]["loss"] == pytest.approx(lawa, rel=1e-5)
        assert abs(raw - lawa) > 1e-3  # the average is other weights than the raw checkpoint
    report = (out / "report.md").read_text()
    for step in (20, 40):
        raw, lawa = scored[step, "raw"], scored[step, "lawa-k2-nu10"]
        assert f"| {step} | raw | {raw['loss']:.4f} | {raw['perplexity']:.4f} |  |" in report
        assert (f"| {step} | lawa-k2-nu10 | {lawa['loss']:.4f} | {lawa['perplexity']:.4f} | "
                f"{lawa['loss'] - raw['loss']:+.4f} |") in report

    rescored = runner.invoke(app, ["eval", str(out), f"data.path={text}", f"seq_len={SEQ_LEN}"])
    assert rescored.exit_code == 0, rescored.output
    assert records(out) == scored  # deterministic: the same windows, the same numbers, bit for bit


def test_tied_gpt2_checkpoints_score_with_the_lm_head_save_pretrained_left_out(tmp_path):
    text = corpus(tmp_path / "corpus.txt")
    ckpts = checkpoints(tmp_path / "ckpts", gpt2, text.read_text())
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", str(ckpts), f"data.path={text}", "eval.batches=2", "batch_size=2",
                                 f"out={out}"])
    assert result.exit_code == 0, result.output
    # seq_len defaults to the model's 32 positions; eval.batches=2 x batch_size=2 = 4 evenly spaced windows
    from transformers import AutoTokenizer

    count = len(AutoTokenizer.from_pretrained(ckpts / "checkpoint-10")(text.read_text())["input_ids"])
    assert (count - 1) // 32 > 4  # so the limit really picks a subset
    assert "4 windows of 32 tokens" in (out / "report.md").read_text()
    assert set(records(out)) == {(s, "raw") for s in STEPS}


def test_analyze_lmc_between_two_hugging_face_folders(neox_ckpts, tmp_path):
    ckpts, text = neox_ckpts
    a, b = ckpts / "checkpoint-40", ckpts / "checkpoint-30"
    result = runner.invoke(app, ["analyze", "lmc", str(a), str(b), "points=3", f"out={tmp_path / 'lmc'}",
                                 f"data.path={text}", f"seq_len={SEQ_LEN}"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "lmc" / "lmc.json").read_text())["rows"]
    assert rows[0]["loss"] == pytest.approx(oracle_loss(b, text), rel=1e-5)   # alpha 0 is B
    assert rows[-1]["loss"] == pytest.approx(oracle_loss(a, text), rel=1e-5)  # alpha 1 is A


def test_folders_that_are_not_causal_lms_are_one_line_errors_naming_the_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    text = corpus(tmp_path / "corpus.txt")
    config = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=64, max_position_embeddings=32)
    bert = checkpoints(tmp_path / "bert", lambda: BertForMaskedLM(config), None)
    one_line_error(runner.invoke(app, ["eval", str(bert), f"data.path={text}", f"out={tmp_path / 'o'}"]),
                   "BertForMaskedLM", "has no causal language-model head")
    (bert / "checkpoint-40" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    one_line_error(runner.invoke(app, ["eval", str(bert), f"data.path={text}", f"out={tmp_path / 'o'}"]),
                   "UNet2DModel", "not a causal LM")
    assert not (tmp_path / "o").exists()


def test_bad_settings_text_and_tokenizers_are_one_line_errors_before_any_work(neox_ckpts, tmp_path, monkeypatch):
    ckpts, text = neox_ckpts
    out = tmp_path / "o"

    def run(*words: str):
        return runner.invoke(app, ["eval", str(ckpts), f"out={out}", *words])

    one_line_error(run(f"seq_len={SEQ_LEN}"), "data.path: data=text needs data.path=")
    one_line_error(run(f"data.path={tmp_path / 'nope.txt'}"), "does not exist")
    one_line_error(run(f"data.path={text}", "seq_lenn=4"), "seq_lenn: not a key", "data.path, eval.batches, seq_len")
    one_line_error(run(f"data.path={text}", "seq_len=64"), "at most the model's 32 positions")
    one_line_error(run(f"data.path={text}", "tokenizer=sentencepiece"), "tokenizer: expected one of auto, gpt2, bytes")
    one_line_error(run(f"data.path={text}", "batch_size=0"), "batch_size: expected an integer >= 1")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    one_line_error(run(f"data.path={short}", f"seq_len={SEQ_LEN}"), "gives 3", "fewer than one window")
    bare = checkpoints(tmp_path / "bare", neox, None)  # no tokenizer files
    result = runner.invoke(app, ["eval", str(bare), f"data.path={text}", f"out={out}"])
    assert result.exit_code == 1 and "holds no tokenizer files" in result.output and "tokenizer=gpt2" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # bytes reach id 255; the model reads 64: another tokenizer's ids are refused, not scored
    wrong = runner.invoke(app, ["eval", str(bare), f"data.path={text}", "tokenizer=bytes", f"seq_len={SEQ_LEN}",
                                f"out={out}"])
    assert wrong.exit_code == 1 and "beyond the model's vocabulary of 64" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1

    import tiktoken.load
    import tiktoken.registry

    def offline(url: str) -> bytes:
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    missing = runner.invoke(app, ["eval", str(bare), f"data.path={text}", "tokenizer=gpt2", f"seq_len={SEQ_LEN}",
                                  f"out={out}"])
    assert missing.exit_code == 1 and "tokenizer gpt2: tiktoken could not load its vocabulary" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not out.exists()  # nothing was written by any of them


def test_average_with_eval_checks_the_scoring_settings_before_averaging(neox_ckpts, tmp_path):
    ckpts, text = neox_ckpts
    out = tmp_path / "never"
    result = runner.invoke(app, ["average", str(ckpts), "averager=lawa", "lawa.k=2", "lawa.nu=10", f"out={out}",
                                 "eval=true", f"data.path={tmp_path / 'missing.txt'}"])
    one_line_error(result, "missing.txt does not exist")
    assert not out.exists()


def test_old_pythia_keys_are_read_as_from_pretrained_reads_them_and_strangers_are_refused(neox_ckpts, tmp_path):
    """Pythia's revisions on the Hub carry per-layer attention masks and rotary inv_freq buffers that today's
    GPTNeoX no longer saves, and name the output layer embed_out: scored as from_pretrained would load them."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpts, text = neox_ckpts
    source = ckpts / "checkpoint-10"
    weights = load_file(str(source / "model.safetensors"))
    assert "embed_out.weight" in weights  # the checkpoint's name; the model's own is lm_head.weight
    for layer in range(2):
        prefix = f"gpt_neox.layers.{layer}.attention."
        weights[prefix + "bias"] = torch.tril(torch.ones(32, 32, dtype=torch.bool))[None, None]
        weights[prefix + "masked_bias"] = torch.tensor(-1e9)
        weights[prefix + "rotary_emb.inv_freq"] = torch.rand(4)
    for name, extra in (("old", {}), ("strange", {"gpt_neox.adapter.weight": torch.zeros(2)})):
        folder = tmp_path / name / "checkpoint-10"
        shutil.copytree(source, folder)
        save_file({**weights, **extra}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "scores"
    result = runner.invoke(app, ["eval", str(tmp_path / "old"), f"data.path={text}", f"seq_len={SEQ_LEN}",
                                 f"out={out}"])
    assert result.exit_code == 0, result.output
    assert records(out)[10, "raw"]["loss"] == pytest.approx(oracle_loss(source, text), rel=1e-5)
    one_line_error(runner.invoke(app, ["eval", str(tmp_path / "strange"), f"data.path={text}", f"seq_len={SEQ_LEN}",
                                       f"out={tmp_path / 'o'}"]),
                   "unexpected gpt_neox.adapter.weight", "architecture of")
