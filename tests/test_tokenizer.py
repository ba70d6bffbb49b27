"""Tokenizer contract: templates, special ids, exact byte-level round trips, determinism, files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from onnxformer.modeling.data import format_continuation, format_prompt, load_builtin
from onnxformer.runtime.errors import CheckpointError
from onnxformer.modeling.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

UNICODE_TEXTS = [
    "Crème brûlée à la française, naïve café",
    "Cre\u0300me bru\u0302le\u0301e (decomposed accents)",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 and a family 👨\u200d👩\u200d👧",
    "tabs\tbetween\twords\nand\nnew lines\r\nwith CRLF",
    "  leading and trailing spaces  ",
    "multiple   spaces,   punctuation!?... and «quotes»",
    "",
]


def _training_texts() -> list[str]:
    return list(load_builtin("corpus").texts()) + UNICODE_TEXTS[:5]


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(_training_texts(), arch="encoder", vocab_size=400)


@pytest.fixture(scope="module", params=["decoder", "encoder-decoder"])
def bpe(request):
    return request.param, train_tokenizer(_training_texts(), arch=request.param, vocab_size=600)


# Special tokens ---------------------------------------------------------------------------------
def test_wordpiece_special_token_ids(wordpiece):
    assert special_token_ids(wordpiece) == {
        "pad": 0, "unk": 1, "bos": -1, "eos": -1, "mask": 4, "cls": 2, "sep": 3,
    }  # fmt: skip
    assert [wordpiece.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_bpe_special_token_ids(bpe):
    _, tok = bpe
    assert special_token_ids(tok) == {
        "pad": 0, "unk": 3, "bos": 1, "eos": 2, "mask": 4, "cls": -1, "sep": -1,
    }  # fmt: skip


# Templates (the runtime's contract) -------------------------------------------------------------
def test_wordpiece_single_and_pair_templates(wordpiece):
    single = wordpiece.encode("tom has a red ball.")
    assert single.tokens[0] == "[CLS]" and single.tokens[-1] == "[SEP]"
    assert single.tokens.count("[SEP]") == 1
    assert set(single.type_ids) == {0}

    pair = wordpiece.encode("tom has a ball.", "he gives it to anna.")
    first = wordpiece.encode("tom has a ball.", add_special_tokens=False).tokens
    second = wordpiece.encode("he gives it to anna.", add_special_tokens=False).tokens
    assert pair.tokens == ["[CLS]", *first, "[SEP]", *second, "[SEP]"]
    assert pair.type_ids == [0] * (len(first) + 2) + [1] * (len(second) + 1)


def test_bpe_templates(bpe):
    arch, tok = bpe
    ids = special_token_ids(tok)
    plain = tok.encode("tom has a red ball.", add_special_tokens=False).ids
    single = tok.encode("tom has a red ball.").ids
    pair = tok.encode("tom has a ball.", "he gives it away.")
    a = tok.encode("tom has a ball.", add_special_tokens=False).ids
    b = tok.encode("he gives it away.", add_special_tokens=False).ids
    if arch == "decoder":  # prompt starts with bos, no eos
        assert single == [ids["bos"], *plain]
        assert pair.ids == [ids["bos"], *a, *b]
        assert pair.type_ids == [0] * (len(a) + 1) + [1] * len(b)
    else:  # encoder-decoder: source ends with eos, no bos
        assert single == [*plain, ids["eos"]]
        assert pair.ids == [*a, ids["eos"], *b, ids["eos"]]
        assert pair.type_ids == [0] * (len(a) + 1) + [1] * (len(b) + 1)


def test_prefix_lm_uses_decoder_template():
    tok = train_tokenizer(["a b c", "b c d"], arch="prefix-lm", vocab_size=300)
    assert tok.encode("a b").ids[0] == special_token_ids(tok)["bos"]


def test_padding_is_left_to_callers(wordpiece, bpe):
    for tok in (wordpiece, bpe[1]):
        assert tok.padding is None and tok.truncation is None
        assert len({len(e.ids) for e in tok.encode_batch(["a", "a much longer text here"])}) == 2


# Round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_byte_level_round_trip_is_exact(bpe, text):
    _, tok = bpe
    encoding = tok.encode(text)
    assert tok.decode(encoding.ids, skip_special_tokens=True) == text
    assert special_token_ids(tok)["unk"] not in encoding.ids


def test_byte_level_round_trip_of_unseen_bytes(bpe):
    _, tok = bpe
    text = "".join(map(chr, range(1, 1024)))  # every control char and much never seen in training
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_wordpiece_round_trip_and_unknown_words(wordpiece):
    text = "on monday anna goes to the park"
    assert wordpiece.decode(wordpiece.encode(text).ids, skip_special_tokens=True) == text
    # Known accented text survives (NFC, no accent stripping, no lowercasing).
    assert wordpiece.decode(wordpiece.encode("Crème brûlée").ids, skip_special_tokens=True) == "Crème brûlée"
    unk = special_token_ids(wordpiece)["unk"]
    assert unk in wordpiece.encode("tom has a ☃ ball").ids
    assert unk not in wordpiece.encode(text).ids


def test_literal_special_tokens_are_recognised(wordpiece, bpe):
    assert special_token_ids(wordpiece)["mask"] in wordpiece.encode("the film was [MASK].").ids
    _, tok = bpe
    assert special_token_ids(tok)["mask"] in tok.encode("the film was <mask>.").ids


def test_prompt_tokens_are_a_prefix_of_prompt_plus_continuation():
    data = load_builtin("numbers")
    tok = train_tokenizer(
        (format_prompt(e.source) + format_continuation(e.target) for e in data.train),
        arch="decoder",
        vocab_size=400,
    )
    for example in data.test[:200]:
        prompt = tok.encode(format_prompt(example.source)).ids
        full = tok.encode(format_prompt(example.source) + format_continuation(example.target)).ids
        assert full[: len(prompt)] == prompt
        continuation = tok.decode(full[len(prompt) :], skip_special_tokens=True)
        assert continuation == format_continuation(example.target)
        assert len(full) - len(prompt) == len(example.target.split())  # one token per digit


# Vocabulary size and errors ---------------------------------------------------------------------
@pytest.mark.parametrize("arch,vocab_size", [("encoder", 40), ("encoder", 2000), ("decoder", 300)])
def test_vocab_size_is_an_upper_bound(arch, vocab_size):
    texts = UNICODE_TEXTS * 3 + ["".join(chr(0x4E00 + i) for i in range(200))]
    tok = train_tokenizer(texts, arch=arch, vocab_size=vocab_size)
    assert tok.get_vocab_size() <= vocab_size
    assert len(set(tok.get_vocab().values())) == tok.get_vocab_size()


def test_training_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        train_tokenizer(["a"], arch="gpt", vocab_size=300)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 261 .* got 100"):
        train_tokenizer(["a"], arch="decoder", vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer > 5 .* got 5"):
        train_tokenizer(["a"], arch="encoder", vocab_size=5)
    with pytest.raises(ValueError, match="texts was empty"):
        train_tokenizer([], arch="encoder", vocab_size=100)
    with pytest.raises(TypeError, match="item 1 is bytes"):
        train_tokenizer(["a", b"b"], arch="encoder", vocab_size=100)


# Determinism ------------------------------------------------------------------------------------
def test_training_is_deterministic_in_process():
    texts = _training_texts()
    for arch in ("encoder", "decoder"):
        first = train_tokenizer(texts, arch=arch, vocab_size=500).to_str()
        assert train_tokenizer(iter(texts), arch=arch, vocab_size=500).to_str() == first


def test_training_is_deterministic_across_processes():
    # Hash seeds differ per process; tokenizers' own WordPiece trainer breaks ties in hash
    # order, which this guards against.
    script = textwrap.dedent(
        """
        import hashlib, json
        from onnxformer.modeling.data import load_builtin
        from onnxformer.modeling.tokenizer import train_tokenizer
        texts = list(load_builtin("sentiment").texts())
        print(json.dumps({a: hashlib.sha256(train_tokenizer(texts, arch=a, vocab_size=300).to_str().encode()).hexdigest()
                          for a in ("encoder", "decoder")}))
        """
    )
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# Files ------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path, wordpiece, bpe):
    for name, tok in (("wp", wordpiece), ("bpe", bpe[1])):
        path = save_tokenizer(tok, tmp_path / name / "tokenizer.json")
        assert path == tmp_path / name / "tokenizer.json"
        loaded = load_tokenizer(path)
        assert loaded.to_str() == tok.to_str()
        text = "anna has three red apples. 🎉"
        assert loaded.encode(text).ids == tok.encode(text).ids
        assert special_token_ids(loaded) == special_token_ids(tok)
        # A folder works too, and nothing but tokenizer.json is left behind.
        assert load_tokenizer(tmp_path / name).to_str() == tok.to_str()
        assert [p.name for p in (tmp_path / name).iterdir()] == ["tokenizer.json"]


def test_save_overwrites_atomically(tmp_path, wordpiece, bpe):
    path = save_tokenizer(wordpiece, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    save_tokenizer(bpe[1], tmp_path)
    assert load_tokenizer(tmp_path).to_str() == bpe[1].to_str()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer file at .*missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"model": {"type": "BPE"', encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(corrupt)
