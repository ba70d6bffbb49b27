"""Built-in datasets (determinism, splits, labels that need context, exact answers) and readers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from onnxformer.modeling.data import (
    SENTIMENT_LEXICON,
    DataError,
    LabeledExample,
    PairExample,
    TaskData,
    TextExample,
    format_continuation,
    format_prompt,
    infer_kind,
    load_builtin,
    load_task_data,
    number_to_words,
    parse_continuation,
    read_jsonl,
    read_label_names,
    read_text_file,
    read_tsv,
    sorted_label_names,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


@pytest.fixture(scope="module")
def builtins() -> dict[str, TaskData]:
    return {name: load_builtin(name) for name in ("corpus", "sentiment", "numbers")}


def _fingerprint(data: TaskData) -> str:
    return hashlib.sha256(repr((data.train, data.valid, data.test, data.label_names)).encode()).hexdigest()


# Built-ins: determinism and splits ---------------------------------------------------------------
def test_same_seed_same_data_other_seed_other_data(builtins):
    for name, data in builtins.items():
        assert load_builtin(name, seed=0) == data
        assert load_builtin(f"builtin:{name}", seed=0) == data
        assert load_builtin(name, seed=1) != data


def test_builtins_do_not_depend_on_the_hash_seed(builtins):
    script = (
        "import hashlib, json; from onnxformer.modeling.data import load_builtin\n"
        "print(json.dumps({n: hashlib.sha256(repr((d.train, d.valid, d.test, d.label_names)).encode()).hexdigest()"
        " for n in ('corpus', 'sentiment', 'numbers') for d in [load_builtin(n)]}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
    assert json.loads(out.stdout) == {name: _fingerprint(data) for name, data in builtins.items()}


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="builtin:corpus, builtin:sentiment, builtin:numbers"):
        load_builtin("builtin:sentimnet")


def test_builtin_splits_are_disjoint(builtins):
    keys = {
        "corpus": lambda e: e.text,
        "sentiment": lambda e: e.text,
        "numbers": lambda e: e.source,
    }
    for name, data in builtins.items():
        splits = [[keys[name](e) for e in split] for split in (data.train, data.valid, data.test)]
        for k, split in enumerate(splits):
            if name == "numbers" and k == 0:
                continue  # training repeats short numbers on purpose (test_numbers_length_balance)
            assert len(set(split)) == len(split), f"{name} has duplicates within a split"
        train, valid, test = map(set, splits)
        assert not train & valid and not train & test and not valid & test, name


def test_builtin_sizes(builtins):
    sizes = {name: tuple(map(len, (d.train, d.valid, d.test))) for name, d in builtins.items()}
    assert sizes == {"corpus": (3600, 200, 200), "sentiment": (6000, 500, 500), "numbers": (10430, 500, 500)}


# Corpus ---------------------------------------------------------------------------------------------
def test_corpus_documents_are_short_stories(builtins):
    data = builtins["corpus"]
    assert data.kind == "text"
    documents = data.train + data.valid + data.test
    sentence_counts = [len(doc.sentences) for doc in documents]
    assert set(sentence_counts) <= {2, 3, 4}
    assert 5000 <= sum(sentence_counts) <= 20000
    for doc in documents[:200]:
        assert " ".join(doc.sentences) == doc.text
        assert all(s.endswith(".") and s == s.lower() for s in doc.sentences)


_WORD_VALUES = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_WORD_VALUES.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})


def test_corpus_arithmetic_is_consistent(builtins):
    pattern = re.compile(r"has (\w+) \w+\. \w+ (buys|loses) (\w+)( more)?\. now \w+ has (\w+) \w+\.")
    checked = 0
    for doc in builtins["corpus"].train:
        match = pattern.search(doc.text)
        if match:
            before, verb, change, _, after = match.groups()
            sign = 1 if verb == "buys" else -1
            assert _WORD_VALUES[before] + sign * _WORD_VALUES[change] == _WORD_VALUES[after], doc.text
            checked += 1
    assert checked > 300


def test_corpus_gift_moves_the_thing(builtins):
    pattern = re.compile(r"^(\w+) has a (\w+) (\w+)\. \w+ gives the \3 to (\w+)\. now (\w+) has the (\w+) \3\.")
    checked = 0
    for doc in builtins["corpus"].train:
        match = pattern.search(doc.text)
        if match:
            giver, adjective, _, receiver, holder, adjective_after = match.groups()
            assert holder == receiver != giver and adjective_after == adjective
            checked += 1
    assert checked > 300


def test_text_example_sentences():
    doc = TextExample("First Citizen:\nBefore we proceed, hear me speak. All: Speak!  Speak? yes")
    assert doc.sentences == ["First Citizen:", "Before we proceed, hear me speak.", "All: Speak!", "Speak?", "yes"]


# Sentiment ------------------------------------------------------------------------------------------
def _rule_label(text: str) -> str:
    """Independent labeller: the last clause (after 'but'/'and') decides; each 'not' flips."""
    clause = re.split(r" but | and ", text)[-1].split()
    polarity_words = [w for w in clause if w in SENTIMENT_LEXICON]
    assert len(polarity_words) == 1, text
    polarity = SENTIMENT_LEXICON[polarity_words[0]] * (-1) ** clause.count("not")
    return "positive" if polarity > 0 else "negative"


def test_sentiment_labels_follow_the_rule(builtins):
    data = builtins["sentiment"]
    assert data.label_names == ("negative", "positive")
    for example in data.train + data.valid + data.test:
        assert example.label == _rule_label(example.text), example.text


def test_sentiment_labels_are_balanced(builtins):
    data = builtins["sentiment"]
    for split in (data.train, data.valid, data.test):
        share = Counter(e.label for e in split)["positive"] / len(split)
        assert 0.4 < share < 0.6


def test_negation_flips_the_label(builtins):
    data = builtins["sentiment"]
    label = {e.text: e.label for e in data.train + data.valid + data.test}
    pairs = 0
    for text, negated_label in label.items():
        if " not " in text:
            plain = text.replace(" did not think ", " thought ").replace(" do not think ", " think ")
            plain = plain.replace(" not ", " ", 1)
            plain = re.sub(r"^(.*)\bdid not (\w+) the", lambda m: m.group(1) + m.group(2) + "d the", plain)
            if plain in label:
                assert label[plain] != negated_label, (plain, text)
                pairs += 1
    assert pairs > 1000


def test_but_joins_opposite_clauses_so_bag_of_words_fails(builtins):
    data = builtins["sentiment"]
    but = [e for e in data.train if " but " in e.text]
    assert len(but) > 800
    for example in but:
        first, second = example.text.split(" but ")
        assert _rule_label(first) != _rule_label(second) == example.label


def test_sentiment_vocabulary_is_modest(builtins):
    words = {w for e in builtins["sentiment"].train for w in e.text.split()}
    assert 80 <= len(words) <= 200


# Numbers --------------------------------------------------------------------------------------------
def _parse_number_words(words: str) -> int:
    """Independent parser: English number words (0..9999, no 'and') -> int."""
    total = current = 0
    for word in words.split():
        if word == "thousand":
            total, current = total + current * 1000, 0
        elif word == "hundred":
            current *= 100
        else:
            current += _WORD_VALUES[word]
    return total + current


def test_numbers_targets_are_exact(builtins):
    data = builtins["numbers"]
    assert data.kind == "seq2seq"
    seen = []
    for example in data.train + data.valid + data.test:
        assert re.fullmatch(r"\d( \d)*", example.target), example.target
        value = int(example.target.replace(" ", ""))
        assert value == _parse_number_words(example.source), example
        assert str(value) == example.target.replace(" ", "")  # no leading zeros
        seen.append(value)
    assert sorted(set(seen)) == list(range(10000))  # every number once or more


def test_numbers_length_balance(builtins):
    """Short numbers are repeated in training so a tiny model learns them too."""
    data = builtins["numbers"]
    digits = [len(e.target.split()) for e in data.train]
    assert digits.count(2) >= 600 and digits.count(3) >= 1500  # uniform sampling would give ~80 / ~800
    held_out = {e.source for e in data.valid + data.test}
    assert held_out.isdisjoint(e.source for e in data.train)
    assert sum(len(e.target.split()) <= 2 for e in data.test) >= 4  # small numbers are tested too


def test_number_to_words_spot_checks():
    assert number_to_words(0) == "zero"
    assert number_to_words(342) == "three hundred forty two"
    assert number_to_words(2040) == "two thousand forty"
    assert number_to_words(9999) == "nine thousand nine hundred ninety nine"
    with pytest.raises(ValueError, match="got 10000"):
        number_to_words(10000)


def test_prompt_and_continuation_convention():
    assert format_prompt("three hundred forty two") == "three hundred forty two ="
    assert format_continuation("3 4 2") == " 3 4 2"
    assert parse_continuation(" 3 4 2 ") == "3 4 2"


# Task data container ----------------------------------------------------------------------------------
def test_task_data_validates():
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskData("regression", [TextExample("a")], [], [])
    with pytest.raises(ValueError, match=r"train\[0\] is a TextExample; kind 'seq2seq' needs PairExample"):
        TaskData("seq2seq", [TextExample("a")], [], [])
    with pytest.raises(ValueError, match=r"valid\[0\] has label 'maybe'"):
        TaskData("classification", [LabeledExample("a", "no")], [LabeledExample("b", "maybe")], [], ("no", "yes"))
    data = TaskData("seq2seq", [PairExample("one", "1")], [], [])
    assert list(data.texts()) == ["one", "1"]


# Readers: errors name the file and the line ------------------------------------------------------------
def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "content,line,message",
    [
        ('{"text": "ok", "label": "a"}\n{"text": "no label"}\n', 2, "missing field 'label'"),
        ('{"text": "ok", "label": "a"}\n\n{"text": 5, "label": "a"}\n', 3, "field 'text' must be a string; got int 5"),
        ('{"text": "ok", "label": "a"}\n{"text": "ok", "label": null}\n', 2, "field 'label' must be a string; got NoneType"),
        ('{"text": "ok", "label": "a"}\n{"text": "ok", "label": "a"\n', 2, "invalid JSON"),
        ('{"text": "ok", "label": "a"}\n["text", "label"]\n', 2, "expected a JSON object"),
        ('{"text": "  ", "label": "a"}\n', 1, "field 'text' is empty"),
        (b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n', 2, r"invalid UTF-8 \(byte 0xe9 at column 14\)"),
        (b'{"text": "ok", "label": "a"}\n{"text": "x\x00", "label": "a"}\n', 2, "binary data"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, message):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=rf"bad\.jsonl:{line}: .*{message}") as info:
        read_jsonl(path, ("text", "label"))
    assert info.value.line == line and info.value.path == str(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_files_are_errors(tmp_path, content):
    for name, read in (("e.jsonl", read_jsonl), ("e.tsv", read_tsv), ("e.txt", read_text_file)):
        path = _write(tmp_path / name, content)
        with pytest.raises(DataError, match=rf"{re.escape(name)}: empty file"):
            read(path)


def test_binary_and_non_utf8_text_files(tmp_path):
    path = _write(tmp_path / "b.txt", b"line one\nline two\n\x89PNG\x00\x00\n")
    with pytest.raises(DataError, match=r"b\.txt:3: binary data \(NUL byte\)"):
        read_text_file(path)
    path = _write(tmp_path / "latin1.txt", "first\n\nsecond\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:4: invalid UTF-8 .*re-save the file as UTF-8"):
        read_text_file(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a file"):
        read_text_file(tmp_path)


def test_tsv_errors(tmp_path):
    path = _write(tmp_path / "h.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"h\.tsv:1: header \['sentence', 'label'\] lacks column 'text'"):
        read_tsv(path)
    path = _write(tmp_path / "c.tsv", "text\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataError, match=r"c\.tsv:3: 3 tab-separated columns, but the header has 2"):
        read_tsv(path)


def test_unknown_label_in_valid_file_names_its_line(tmp_path):
    train = _write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    valid = _write(tmp_path / "valid.jsonl", '{"text": "c", "label": "x"}\n{"text": "d", "label": "z"}\n')
    with pytest.raises(DataError, match=r"valid\.jsonl:2: unknown label 'z'; known labels: x, y"):
        load_task_data(train, valid=valid)


def test_fields_must_be_a_known_layout(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"text": "a"}\n')
    with pytest.raises(ValueError, match="fields must be one of"):
        read_jsonl(path, ("sentence", "label"))


# Readers: happy paths ----------------------------------------------------------------------------------
def test_read_jsonl_kinds_and_integer_labels(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"source": " one ", "target": "1", "id": 7}\n\n{"source": "two", "target": "2"}\n')
    assert read_jsonl(path, ("source", "target")) == [PairExample("one", "1"), PairExample("two", "2")]
    path = _write(tmp_path / "c.jsonl", '{"text": "a", "label": 10}\n{"text": "b", "label": 2}\n')
    examples = read_jsonl(path)
    assert examples == [LabeledExample("a", "10"), LabeledExample("b", "2")]
    assert sorted_label_names([e.label for e in examples]) == ("2", "10")
    assert sorted_label_names(["b", "a", "b"]) == ("a", "b")


def test_read_text_file_paragraphs_and_lines(tmp_path):
    path = _write(tmp_path / "t.txt", "\ufeffA: hi.\nB: hello.\r\n\r\n\n  second doc  \nline\n")
    assert read_text_file(path) == [TextExample("A: hi.\nB: hello."), TextExample("second doc\nline")]
    assert [d.text for d in read_text_file(path, split="lines")] == ["A: hi.", "B: hello.", "second doc", "line"]


def test_load_task_data_from_files(tmp_path):
    lines = [json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(100)]
    train = _write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    data = load_task_data(train)
    assert data.kind == "classification" and data.label_names == ("a", "b")
    assert (len(data.train), len(data.valid), len(data.test)) == (95, 5, 0)
    assert not {e.text for e in data.train} & {e.text for e in data.valid}
    assert load_task_data(train) == data  # deterministic split
    assert load_task_data(train, seed=1).valid != data.valid
    data = load_task_data(train, valid=train, test=train, label_names=("b", "a", "c"))
    assert data.label_names == ("b", "a", "c") and len(data.train) == len(data.test) == 100
    with pytest.raises(ValueError, match="is a seq2seq task, not text"):
        load_task_data("builtin:numbers", "text")
    assert infer_kind(_write(tmp_path / "s.tsv", "source\ttarget\na\tb\n")) == "seq2seq"
    assert infer_kind(tmp_path / "anything.txt") == "text"


def test_load_task_data_builtin():
    assert load_task_data("builtin:numbers") == load_builtin("numbers")


def test_shared_shortcut_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="choose one of shared:sst2"):
        load_task_data("shared:imdb")
    monkeypatch.setenv("ONNXFORMER_SHARED_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="shared:sst2 needs the shared data folder.*ONNXFORMER_SHARED_DATA"):
        load_task_data("shared:sst2")


# The real shared files ------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize(
    "name,kind,sizes,n_labels",
    [
        ("sst2", "classification", (67349, 872, 0), 2),
        ("banking77", "classification", (9503, 500, 3080), 77),
        ("multi30k", "seq2seq", (29000, 1014, 1000), 0),
        ("tico19", "seq2seq", (1800, 300, 0), 0),
        ("tinyshakespeare", "text", None, 0),
    ],
)
def test_shared_datasets(name, kind, sizes, n_labels):
    data = load_task_data(f"shared:{name}")
    assert data.kind == kind and len(data.label_names) == n_labels
    if sizes is not None:
        assert (len(data.train), len(data.valid), len(data.test)) == sizes
    if name == "banking77":
        assert data.label_names == read_label_names(SHARED_DATA / "banking77_labels.txt")
        assert data.label_names[0] == "card_arrival"
    if name == "sst2":
        assert data.label_names == ("0", "1")
    if name == "tinyshakespeare":
        first = data.train[0]
        assert first.text.startswith("First Citizen:\nBefore we proceed any further")
        assert first.sentences[:2] == ["First Citizen:", "Before we proceed any further, hear me speak."]
        assert len(data.valid) == round(0.05 * (len(data.train) + len(data.valid)))


@needs_shared
def test_shared_files_read_directly():
    examples = read_tsv(SHARED_DATA / "sst2_dev.tsv")
    assert len(examples) == 872 and {e.label for e in examples} == {"0", "1"}
    pairs = read_jsonl(SHARED_DATA / "tico19_en_fr_dev.jsonl", ("source", "target"))
    assert pairs[0] == PairExample("and besides do you have difficulty breathing", "avez-vous également des difficultés à respirer?")
