"""Issue 14: nothing goes wrong quietly when the text is not what the tokenizer learned.

- A WordPiece tokenizer trained on lowercase text lowercases what it reads (and folds
  full-width forms), so ``THE FOOD WAS GOOD`` is ``the food was good``, not four ``[UNK]``;
  cased data keeps a cased tokenizer; ``lowercase=`` chooses. Byte-level BPE covers every byte.
- A tokenizer trained before (NFC, cased) keeps its behaviour when loaded.
- Every classification says how much of its text was unknown (``unknown_fraction``), the
  CLI prints it with --json and warns, with what to do, when most of a text is unknown.
- Export refuses a tokenizer that is not the model's (ids beyond its vocabulary, other
  special tokens, a checkpoint's tokenizer of another size): E_TOKENIZER naming both values.

The runtime cases run on artifacts/encoder: they hold for its committed tokenizer (cased, the
one trained before this change) and for a regenerated one (uncased), since they check the
figure against the tokenizer's own tokens and use texts that are unknown to both.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer, normalizers

from reliability_support import run_cli
from support import ARTIFACTS, HAS_TORCH

from onnxformer.modeling.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from onnxformer.runtime.errors import ConfigError

LOWERCASE_TEXTS = ["the food was good", "the film was bad", "a good meal", "the service was slow"] * 5
UNSEEN = ["😀", "الطعام جيد", "日本語"]  # characters no training text of the tests or artifacts holds


def _tokens(tokenizer: Tokenizer, text: str) -> list[str]:
    return tokenizer.encode(text, add_special_tokens=False).tokens


# --- the tokenizer learns a normaliser that matches its data ------------------------------------


def test_lowercase_data_gives_an_uncased_wordpiece():
    tok = train_tokenizer(LOWERCASE_TEXTS, arch="encoder", vocab_size=80)
    assert _tokens(tok, "THE FOOD WAS GOOD") == _tokens(tok, "the food was good") == ["the", "food", "was", "good"]
    assert _tokens(tok, "The Food") == ["the", "food"]
    assert _tokens(tok, "ＧＯＯＤ") == ["good"]  # full-width forms fold (NFKC)


def test_cased_data_keeps_a_cased_wordpiece_and_lowercase_chooses():
    cased = ["The food was good", "the film was bad"] * 5
    tok = train_tokenizer(cased, arch="encoder", vocab_size=80)
    assert tok.token_to_id("The") is not None and _tokens(tok, "The") != _tokens(tok, "the")
    uncased = train_tokenizer(cased, arch="encoder", vocab_size=80, lowercase=True)
    assert _tokens(uncased, "THE FOOD") == _tokens(uncased, "the food") == ["the", "food"]
    kept = train_tokenizer(LOWERCASE_TEXTS, arch="encoder", vocab_size=80, lowercase=False)
    assert _tokens(kept, "THE") == ["[UNK]"]  # asked for cased: upper case was never seen


def test_an_unknown_character_costs_only_its_own_run():
    """WordPiece has no byte fallback: a run of characters without a token is a word of its own,
    so the known part of the word is kept (was: the whole word one [UNK])."""
    tok = train_tokenizer(LOWERCASE_TEXTS, arch="encoder", vocab_size=80)
    assert _tokens(tok, "good😀") == ["good", "[UNK]"]
    assert _tokens(tok, "😀😀good!") == ["[UNK]", "good", "[UNK]"]  # '!' was never seen either
    assert _tokens(tok, "the [MASK] was good") == ["the", "[MASK]", "was", "good"]  # special tokens kept whole
    # characters the regex syntax treats specially are members like any other
    tok = train_tokenizer(["a-b [x] \\ ^z"] * 3, arch="encoder", vocab_size=60)
    assert "[UNK]" not in _tokens(tok, "a-b [x] \\ ^z") and _tokens(tok, "a+b") == ["a", "[UNK]", "b"]


def test_lowercase_option_is_checked():
    with pytest.raises(ConfigError, match="lowercase must be True, False or None"):
        train_tokenizer(LOWERCASE_TEXTS, arch="encoder", vocab_size=80, lowercase="yes")
    with pytest.raises(ConfigError, match="byte-level BPE .* never normalises"):
        train_tokenizer(LOWERCASE_TEXTS, arch="decoder", vocab_size=300, lowercase=True)
    # the fix the message names: leave it unset
    assert train_tokenizer(LOWERCASE_TEXTS, arch="decoder", vocab_size=300).get_vocab_size() > 0


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_byte_level_bpe_covers_every_character(arch):
    tok = train_tokenizer(LOWERCASE_TEXTS, arch=arch, vocab_size=300)
    for text in ["THE FOOD WAS GOOD", *UNSEEN]:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.token_to_id("<unk>") not in enc.ids
        assert tok.decode(enc.ids) == text  # no normaliser: the text comes back as written


def test_an_old_tokenizer_keeps_its_behaviour(tmp_path):
    """A tokenizer.json from before this change (NFC, cased) loads and encodes as it did."""
    tok = train_tokenizer(LOWERCASE_TEXTS, arch="encoder", vocab_size=80)
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False),
    ])
    save_tokenizer(tok, tmp_path)
    before = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    loaded = load_tokenizer(tmp_path)
    assert _tokens(loaded, "THE FOOD") == ["[UNK]", "[UNK]"]
    assert json.loads(loaded.to_str())["normalizer"] == json.loads(before)["normalizer"]
    # the committed package is read as it is: its tokenizer.json is the tokenizer
    package_tok = ARTIFACTS / "encoder" / "tokenizer.json"
    expected = json.loads(package_tok.read_text(encoding="utf-8"))["normalizer"]
    import onnxformer.runtime as rt

    assert json.loads(rt.load(ARTIFACTS / "encoder").tokenizer.to_str())["normalizer"] == expected


# --- the runtime says how much of a text was unknown --------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    import onnxformer.runtime as rt

    return rt.load(ARTIFACTS / "encoder", threads=1)


def _unknown_share(tokenizer: Tokenizer, text: str) -> float:
    """Independently of the runtime: the [UNK] strings among the tokens between [CLS] and [SEP]."""
    tokens = tokenizer.encode(text).tokens
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    body = tokens[1:-1]
    return body.count("[UNK]") / len(body) if body else 0.0


def test_classify_reports_the_unknown_fraction(encoder):
    texts = ["the food was good", "THE FOOD WAS GOOD", "zzzz qqqq", "the food xq", *UNSEEN]
    results = encoder.classify(texts)
    for text, result in zip(texts, results):
        assert result.unknown_fraction == pytest.approx(_unknown_share(encoder.tokenizer, text)), text
    assert results[0].unknown_fraction == 0.0
    assert [r.unknown_fraction for r in results[-3:]] == [1.0, 1.0, 1.0]
    assert encoder.unknown_fractions(texts) == [r.unknown_fraction for r in results]
    # truncation does not change the share of the text: it is the text's, not the window's
    long = "the food was good " * 200
    assert encoder.classify([long], truncate=True)[0].unknown_fraction == 0.0


def test_unknown_fractions_of_generation_packages_are_zero():
    import onnxformer.runtime as rt

    decoder = rt.load(ARTIFACTS / "decoder", threads=1)
    assert decoder.unknown_fractions(["THE FOOD WAS GOOD", *UNSEEN]) == [0.0] * 4  # byte-level BPE


def test_cli_json_carries_it_and_text_output_warns():
    package = str(ARTIFACTS / "encoder")
    out = run_cli(["classify", package, "😀", "the food was good", "--json"])
    assert out.rc == 0, out
    rows = json.loads(out.out)
    assert [r["unknown_fraction"] for r in rows] == [1.0, 0.0]
    out = run_cli(["embed", package, "😀", "the food was good", "--json"])
    assert [r["unknown_fraction"] for r in json.loads(out.out)] == [1.0, 0.0]

    out = run_cli(["classify", package, "😀"])
    assert out.rc == 0 and out.out.startswith(("positive\t", "negative\t"))
    assert "warning: text 0: 100% of its tokens are unknown to this model's tokenizer" in out.err
    assert "its label is a guess" in out.err and "Write the text the way the training data is written" in out.err
    out = run_cli(["embed", package, "الطعام جيد"])
    assert "warning: text 0: 100%" in out.err and "its embedding says little about it" in out.err
    # the advice applied: the same request written as the training data is written
    out = run_cli(["classify", package, "the food was good"])
    assert out.rc == 0 and out.err == ""
    # a text mostly known is not flagged: 1 of its 4 tokens unknown is under the 30% line
    out = run_cli(["classify", package, "the food was xq"])
    assert out.rc == 0 and "warning" not in out.err


# --- export refuses a tokenizer that is not the model's -----------------------------------------

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="exporting needs torch")


@needs_torch
def test_export_refuses_other_special_tokens(tmp_path):
    from onnxformer.export.exporter import ExportError, ExportOptions, export_model
    from support import make_model, tiny_tokenizer

    model, tok = make_model("decoder")
    save_tokenizer(tiny_tokenizer("encoder"), tmp_path / "wordpiece.json")  # another family's tokenizer
    with pytest.raises(ExportError) as err:
        export_model(model, tmp_path / "wordpiece.json", tmp_path / "pkg")
    assert err.value.code == "E_TOKENIZER"
    assert "bos token id -1" in str(err.value) and "bos_token_id=1" in str(err.value)
    assert "export the checkpoint with the tokenizer it was trained with" in str(err.value)
    assert not (tmp_path / "pkg").exists()
    # the fix: the model's own tokenizer
    save_tokenizer(tok, tmp_path / "own.json")
    export_model(model, tmp_path / "own.json", tmp_path / "pkg", ExportOptions(validate_generation=False))
    assert (tmp_path / "pkg" / "manifest.json").is_file()


@needs_torch
def test_export_refuses_ids_beyond_the_vocabulary(tmp_path):
    from onnxformer.export.exporter import ExportError, export_model
    from support import make_model

    model, tok = make_model("decoder", vocab_size=200)  # fewer rows than the tokenizer's 320 ids
    save_tokenizer(tok, tmp_path / "tok.json")
    with pytest.raises(ExportError, match=r"token ids up to \d+ but the model's vocabulary has 200 entries") as err:
        export_model(model, tmp_path / "tok.json", tmp_path / "pkg")
    assert err.value.code == "E_TOKENIZER" and not (tmp_path / "pkg").exists()


@needs_torch
def test_export_checkpoint_refuses_a_swapped_tokenizer(trained_run, tmp_path):
    """The issue's case: a checkpoint whose tokenizer.json was replaced by another decoder's
    (same special tokens, another vocabulary): refused, not exported to print empty lines."""
    from onnxformer.export.exporter import ExportError, ExportOptions, export_checkpoint
    from onnxformer.modeling.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    own = latest_checkpoint(run) / "tokenizer.json"
    original = own.read_bytes()
    vocab = load_tokenizer(own).get_vocab_size()
    other = train_tokenizer(["completely different words here"] * 4, arch="decoder", vocab_size=270)
    assert other.get_vocab_size() != vocab
    save_tokenizer(other, own)
    with pytest.raises(ExportError) as err:
        export_checkpoint(run, tmp_path / "pkg", ExportOptions(validate_generation=False))
    assert err.value.code == "E_TOKENIZER"
    assert f"has {other.get_vocab_size()} tokens but the checkpoint's model has vocab_size {vocab}" in str(err.value)
    assert not (tmp_path / "pkg").exists()
    out = run_cli(["export", str(run), str(tmp_path / "pkg")])
    assert out.rc == 2 and out.err.startswith("error[E_TOKENIZER]: ") and "Traceback" not in out.err
    # the fix the message names: the tokenizer the checkpoint was trained with
    own.write_bytes(original)
    export_checkpoint(run, tmp_path / "pkg", ExportOptions(validate_generation=False))
    assert (tmp_path / "pkg" / "manifest.json").is_file()


@needs_torch
def test_a_classifier_trained_on_lowercase_text_reads_upper_case(tmp_path):
    """The issue's case end to end: `onnxformer train` on builtin:sentiment (all lowercase),
    exported; `THE FOOD WAS GOOD` is now the same input as `the food was good`, with nothing
    unknown, while an emoji is still reported as unknown."""
    import onnxformer.runtime as rt
    from onnxformer.export.exporter import export_checkpoint
    from onnxformer.modeling.train import TrainConfig, train

    train(TrainConfig(arch="encoder", task="classify", data="builtin:sentiment", out_dir=str(tmp_path / "run"),
                      steps=4, batch_size=8, preset="tiny", progress=False, eval_examples=8))
    export_checkpoint(tmp_path / "run", tmp_path / "pkg")
    model = rt.load(tmp_path / "pkg", threads=1)
    upper, lower, emoji = model.classify(["THE FOOD WAS GOOD", "the food was good", "😀"])
    assert upper.probabilities == lower.probabilities
    assert upper.unknown_fraction == lower.unknown_fraction == 0.0 and emoji.unknown_fraction == 1.0
