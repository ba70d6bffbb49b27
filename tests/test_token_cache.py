"""Nothing is cut silently, and a split is tokenized once into a memory-mapped cache.

Token counts are checked against the tokenizer's own output (``tokenizer.encode``), counted
here independently of the encoders: a long document is split into windows and every one of
its tokens is predicted once; an example that does not fit is counted with the tokens it
loses; an sft example whose prompt fills max_len is dropped and counted. The cache
(modeling/token_cache.py) round-trips every field, is reused on resume and rebuilt when the
data changes. Peak memory on large files is for benchmarks/bench_data.py, not a test.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="training tests need the [train] extra (torch)")

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling import token_cache  # noqa: E402
from onnxformer.modeling.config import ModelConfig  # noqa: E402
from onnxformer.modeling.data import LabeledExample, PairExample, TextExample  # noqa: E402
from onnxformer.modeling.objectives import IGNORE_INDEX  # noqa: E402
from onnxformer.modeling.tasks import OBJECTIVES, CutReport, Encoded, TaskContext, example_generator  # noqa: E402
from onnxformer.modeling.tokenizer import load_tokenizer, special_token_ids, train_tokenizer  # noqa: E402
from onnxformer.modeling.train import TrainConfig, train  # noqa: E402
from onnxformer.runtime.errors import ConfigError, DataError  # noqa: E402

WORDS = "tom anna ball red blue gives eats the a cat dog apple runs sees and then".split()


def _document(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(sentences))


@pytest.fixture(scope="module")
def documents() -> list[str]:
    rng = random.Random(0)
    return [_document(rng, n) for n in (60, 3, 25, 1, 90)]  # long and short documents


def _context(arch: str, texts: list[str], max_len: int, label_names=()) -> TaskContext:
    tokenizer = train_tokenizer(texts, arch=arch, vocab_size=300)
    s = special_token_ids(tokenizer)
    config = ModelConfig(arch=arch, vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=2, n_layers=1, d_ff=64,
                         pad_token_id=s["pad"], bos_token_id=s["bos"], eos_token_id=s["eos"],
                         decoder_start_token_id=s["bos"] if arch == "encoder-decoder" else -1)
    return TaskContext(tokenizer, s, config, max_len=max_len, label_names=tuple(label_names))


def _predicted(objective, context, rows) -> int:
    """Tokens the loss is taken over, batching every row once."""
    items = [(row, example_generator(0, i)) for i, row in enumerate(rows)]
    batch = objective.collate(context, items)
    return int((batch.labels != IGNORE_INDEX).sum())


# --- windows: every token trained on --------------------------------------------------------------


def test_causal_lm_splits_long_documents_and_predicts_every_token_once(documents):
    context = _context("decoder", documents, max_len=32)
    encoding = OBJECTIVES["causal-lm"].encode(context, [TextExample(d) for d in documents], 0)
    eos = context.special["eos"]
    rows = [context.tokenizer.encode(d).ids + [eos] for d in documents]  # the independent count
    assert max(map(len, rows)) > 4 * 32  # really long
    assert all(len(e.ids) <= 32 for e in encoding.examples)
    # Windows share one token: dropping each later window's first token gives the documents back.
    pieces, k = [], 0
    for row in rows:
        rebuilt = []
        while len(rebuilt) < len(row):
            ids = encoding.examples[k].ids
            rebuilt += ids if not rebuilt else ids[1:]
            k += 1
        pieces.append(rebuilt)
    assert pieces == rows and k == len(encoding.examples)
    # Every token after <s> is a target exactly once: the loss counts them all.
    assert _predicted(OBJECTIVES["causal-lm"], context, encoding.examples) == sum(len(r) - 1 for r in rows)
    report = encoding.report
    assert (report.examples, report.tokens, report.used) == (5, sum(map(len, rows)), sum(map(len, rows)))
    assert report.rows == len(encoding.examples) and report.split_examples == sum(len(r) > 32 for r in rows) and not report.cut_examples
    level, message = report.describe("causal-lm train", 32)
    assert level == logging.INFO and "tokens used" in message and "(100.0%)" in message


def test_mlm_windows_keep_the_special_tokens_and_every_text_token(documents):
    context = _context("encoder", documents, max_len=24)
    encoding = OBJECTIVES["mlm"].encode(context, [TextExample(d) for d in documents], 0)
    s = context.special
    assert all(len(e.ids) <= 24 and e.ids[0] == s["cls"] and e.ids[-1] == s["sep"] for e in encoding.examples)
    body = [t for e in encoding.examples for t in e.ids[1:-1]]
    expected = [t for d in documents for t in context.tokenizer.encode(d, add_special_tokens=False).ids]
    assert body == expected
    assert encoding.report.used == encoding.report.tokens


@pytest.mark.parametrize("task,arch,reserve", [("denoise", "encoder-decoder", 1), ("prefix-lm", "prefix-lm", 2)])
def test_sentence_tasks_group_whole_sentences_into_windows(documents, task, arch, reserve):
    context = _context(arch, documents, max_len=40)
    encoding = OBJECTIVES[task].encode(context, [TextExample(d) for d in documents], 0)
    assert all(sum(map(len, e.sentences)) <= 40 - reserve for e in encoding.examples)
    tokens = [t for e in encoding.examples for sentence in e.sentences for t in sentence]
    expected = []
    for d in documents:  # sentences as the encoder tokenizes them: later ones keep their leading space
        sentences = TextExample(d).sentences
        for i, sentence in enumerate(sentences):
            expected += context.tokenizer.encode(sentence if i == 0 else " " + sentence, add_special_tokens=False).ids
    assert tokens == expected
    assert encoding.report.used == encoding.report.tokens and encoding.report.rows > len(documents)


# --- what does not fit is counted ---------------------------------------------------------------


def test_classify_counts_the_examples_it_cuts_and_their_tokens(documents):
    texts = [documents[1], documents[3], documents[0], "tom sees a cat."]
    context = _context("encoder", documents, max_len=16, label_names=("a", "b"))
    encoding = OBJECTIVES["classify"].encode(context, [LabeledExample(t, "a") for t in texts], 0)
    lengths = [len(context.tokenizer.encode(t).ids) for t in texts]
    report = encoding.report
    assert report.cut_examples == sum(n > 16 for n in lengths) >= 2
    assert report.tokens - report.used == sum(max(0, n - 16) for n in lengths)
    assert report.longest == max(lengths)
    level, message = report.describe("classify train", 16)
    assert level == logging.WARNING
    assert f"{report.cut_examples} examples longer than --max-len 16 were cut" in message
    assert f"raise --max-len to {max(lengths)}" in message  # the fix names the length to ask for
    # A loaded model's context bounds the fix: up to it, or (already there) shorten the examples.
    assert f"pass --max-len {max(lengths) - 1} to keep the most" in report.describe("c", 16, limit=max(lengths) - 1)[1]
    assert "cannot be kept whole" in report.describe("c", 16, limit=16)[1]
    assert f"raise --max-len to {max(lengths)}" in report.describe("c", 16, limit=512)[1]


def test_sft_drops_an_example_whose_prompt_fills_max_len_and_counts_cut_targets(documents):
    pairs = [PairExample("tom sees a cat", "1 2 3"), PairExample(documents[2], "4 5"),
             PairExample("anna", documents[1])]
    context = _context("decoder", documents + ["1 2 3 4 5"], max_len=20)
    encoding = OBJECTIVES["sft"].encode(context, pairs, 0)
    assert [e.source for e in encoding.examples] == ["tom sees a cat", "anna"]  # the long prompt is dropped
    report = encoding.report
    assert (report.examples, report.rows, report.dropped, report.cut_examples) == (3, 2, 1, 1)
    kept = encoding.examples[1]
    assert len(kept.ids) == 20 and kept.prompt_len < 20  # cut, but its target starts inside the row
    assert "1 examples were dropped" in report.describe("sft train", 20)[1]


def test_report_merges_batches():
    a, b = CutReport(), CutReport()
    a.example(10, 10)
    b.example(30, 20)
    b.example(50, 0, dropped=True)
    merged = a.merge(b)
    assert (merged.examples, merged.rows, merged.tokens, merged.used, merged.cut_examples, merged.dropped,
            merged.longest) == (3, 2, 90, 30, 1, 1, 50)


# --- the cache ---------------------------------------------------------------------------------


def test_cached_split_round_trips_every_field(tmp_path):
    rows = [
        Encoded([1, 2, 3], target=[4, 5], prompt_len=2, label=1, type_ids=[0, 0, 1], text="é x", source="src"),
        Encoded([], sentences=[[7, 8], [], [9]]),
        Encoded([6]),
    ]
    report = CutReport(examples=3, rows=3, tokens=9, used=9)
    encode = lambda batch: __import__("onnxformer.modeling.tasks", fromlist=["Encoding"]).Encoding(batch, report)  # noqa: E731
    splits = token_cache.build(tmp_path / "k", {"train": rows, "valid": rows[2:]}, encode, {"x": 1})
    train_rows, train_report = splits["train"]
    assert list(train_rows) == rows and train_rows[0:2] == rows[:2] and train_rows[-1] == rows[-1]
    assert list(splits["valid"][0]) == rows[2:] and train_report == report
    assert train_rows.tokens() == 4
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left


def _text_file(path: Path, documents) -> str:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return str(path)


def _config(data: str, out: Path, **overrides) -> TrainConfig:
    kw = dict(arch="decoder", task="causal-lm", data=data, out_dir=str(out), steps=2, batch_size=4, vocab_size=300,
              eval_examples=4, progress=False, threads=1, max_len=32, save_every=1, keep_checkpoints=0)
    return TrainConfig(**{**kw, **overrides})


def _cache_folders(run: Path) -> list[Path]:
    return sorted(p for p in (run / "cache").iterdir() if p.is_dir())


def test_the_cache_is_reused_on_resume_and_rebuilt_when_the_data_changes(tmp_path, documents, caplog):
    rng = random.Random(1)
    data = _text_file(tmp_path / "docs.txt", documents + [_document(rng, 4) for _ in range(30)])
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="onnxformer.modeling"):
        train(_config(data, run))
    assert "causal-lm train:" in caplog.text and "(100.0%)" in caplog.text
    [first] = _cache_folders(run)
    built = (first / token_cache.META_FILE).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxformer.modeling"):
        train(_config(data, run, resume=True, steps=3))
    assert "token cache: reusing" in caplog.text and "causal-lm train:" in caplog.text  # the report again
    assert _cache_folders(run) == [first] and (first / token_cache.META_FILE).stat().st_mtime_ns == built
    # Changed data under the same path: a new key, a new cache; the old one is removed.
    Path(data).write_text(Path(data).read_text(encoding="utf-8") + "\n" + _document(rng, 5) + "\n", encoding="utf-8")
    train(_config(data, run, resume=True, steps=4))
    [second] = _cache_folders(run)
    assert second != first
    meta = json.loads((second / token_cache.META_FILE).read_text())
    reports = [meta["splits"][split]["report"] for split in ("train", "valid")]
    assert all(r["used"] == r["tokens"] for r in reports)
    # Against the run's tokenizer, counted here: every document of the file (train + held out), <s> doc </s>.
    tokenizer = load_tokenizer(ckpt.tokenizer_path(run))
    text = Path(data).read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    assert sum(r["tokens"] for r in reports) == sum(len(tokenizer.encode(d).ids) + 1 for d in docs)
    assert sum(r["examples"] for r in reports) == len(docs)


def test_max_len_raises_a_new_models_context_and_is_refused_beyond_a_loaded_ones(tmp_path, documents):
    data = _text_file(tmp_path / "docs.txt", documents * 4)
    run = tmp_path / "run"
    train(_config(data, run, max_len=160, save_every=0))  # tiny preset: max_seq_len 128
    assert ckpt.load_model(run)[1].max_seq_len == 160
    with pytest.raises(ConfigError, match=r"--max-len\) 200 is longer than .*max_seq_len 160.*--max-len 160 or less"):
        train(_config(data, tmp_path / "ft", max_len=200, from_checkpoint=str(run)))
    assert not (tmp_path / "ft").exists()


def test_a_split_left_without_rows_is_an_error_naming_max_len(tmp_path):
    rows = [{"source": "tom sees a red ball and anna sees a blue cat", "target": "1 2"}] * 6
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"no train example fits max_len \(--max-len\) 4.*dropped"):
        train(_config(str(data), tmp_path / "run", task="sft", max_len=4))


def test_the_final_evaluation_is_bounded_like_the_periodic_ones(tmp_path, documents):
    rng = random.Random(2)
    data = _text_file(tmp_path / "docs.txt", [_document(rng, 2) for _ in range(40)])
    valid = _text_file(tmp_path / "valid.txt", [_document(rng, 2) for _ in range(9)])
    result = train(_config(data, tmp_path / "a", valid_data=valid, save_every=0))
    assert result.metrics["valid/examples"] == 4  # eval_examples
    result = train(_config(data, tmp_path / "b", valid_data=valid, save_every=0, final_eval_examples="all"))
    assert result.metrics["valid/examples"] == 9
    with pytest.raises(ConfigError, match="final_eval_examples"):
        _config(data, tmp_path / "c", final_eval_examples=0)


def test_a_large_file_streams_into_the_cache_with_a_seeded_hold_out(tmp_path, monkeypatch, caplog):
    from onnxformer.modeling import data as data_module

    monkeypatch.setattr(data_module, "STREAM_BYTES", 0)  # every file counts as large
    rng = random.Random(3)
    rows = [{"text": _document(rng, 1), "label": rng.choice(["pos", "neg"])} for _ in range(200)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    streamed = data_module.stream_task_data(path, kinds=("classification",), seed=5)
    assert list(data_module.stream_task_data(path, seed=6).valid) != list(streamed.valid)  # the seed picks them
    assert isinstance(streamed.train, data_module.StreamedSplit) and streamed.label_names == ("neg", "pos")
    train_rows, valid_rows = list(streamed.train), list(streamed.valid)
    assert sorted(e.text for e in train_rows + valid_rows) == sorted(r["text"] for r in rows)  # a partition
    assert 2 <= len(valid_rows) <= 25 and list(streamed.valid) == valid_rows  # ~5%, the same every pass
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="onnxformer.modeling"):
        train(_config(str(path), run, arch="encoder", task="classify", save_every=0, data_seed=5))
    assert "streaming" in caplog.text
    [folder] = _cache_folders(run)
    meta = json.loads((folder / token_cache.META_FILE).read_text())
    assert meta["splits"]["train"]["rows"] == len(train_rows) and meta["splits"]["valid"]["rows"] == len(valid_rows)


def test_cli_final_eval_examples_takes_a_count_or_all(tmp_path):
    import argparse

    from onnxformer.modeling.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--arch", "decoder", "--task", "causal-lm", "--data", "x.txt", "--out", str(tmp_path)]
    assert config_from_args(parser.parse_args(base + ["--final-eval-examples", "all"])).final_eval_limit is None
    assert config_from_args(parser.parse_args(base + ["--final-eval-examples", "40"])).final_eval_limit == 40
    assert config_from_args(parser.parse_args(base + ["--eval-examples", "30"])).final_eval_limit == 30
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--final-eval-examples", "some"])


def test_a_streamed_validation_file_names_a_label_training_never_saw(tmp_path, monkeypatch):
    from onnxformer.modeling import data as data_module

    monkeypatch.setattr(data_module, "STREAM_BYTES", 0)
    write = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # noqa: E731
    write(tmp_path / "train.jsonl", [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)])
    write(tmp_path / "valid.jsonl", [{"text": "one", "label": "a"}, {"text": "two", "label": "zz"}])
    with pytest.raises(DataError, match=r"valid.jsonl:2: unknown label 'zz'"):
        train(_config(str(tmp_path / "train.jsonl"), tmp_path / "run", arch="encoder", task="classify",
                      valid_data=str(tmp_path / "valid.jsonl")))
    assert not (tmp_path / "run" / "cache").exists() or not _cache_folders(tmp_path / "run")  # nothing half-written


def test_a_large_files_tokenizer_sample_is_spread_over_it_and_bounded(caplog):
    from onnxformer.modeling.train import _tokenizer_sample

    texts = [f"text {i:03d}" for i in range(100)]  # 8 characters each
    with caplog.at_level(logging.INFO, logger="onnxformer.modeling"):
        assert list(_tokenizer_sample(texts, limit=10_000)) == texts and not caplog.text  # all of it, silently
        spread = list(_tokenizer_sample(texts, limit=200, size=800))
    assert spread == texts[::4] and "25 texts (200 characters), 1 text in 4" in caplog.text
    assert list(_tokenizer_sample(texts, limit=80)) == texts[:10]  # an in-memory split: the first ones
