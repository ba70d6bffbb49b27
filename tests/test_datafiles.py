"""Data files in (runtime/datafiles.py, through modeling/data.py and `onnxformer train`): every
format, the field mapping and its detection, the .txt layout, the sanity warnings, labels, and
bad input as `path:line: what is wrong` with a fix that works (each fix is applied here)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import pytest

from onnxformer.modeling.data import load_task_data
from onnxformer.runtime.datafiles import (
    FORMATS,
    ChatExample,
    FieldMap,
    LabeledExample,
    Message,
    PairExample,
    TextExample,
    read_examples,
)
from onnxformer.runtime.errors import ConfigError, DataError

runtime_only = pytest.mark.runtime_only  # the readers need only the base install (CI's torch-free venv)
SST2_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2_dev.tsv"
ROWS = [{"text": f"the film was {'good' if i % 2 else 'bad'} number {i}", "label": "pos" if i % 2 else "neg"}
        for i in range(40)]
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _jsonl(path: Path, rows) -> Path:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _csv(path: Path, header, rows, delimiter=",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _raises(pattern: str, path: Path, line: int | None, call):
    with pytest.raises(DataError, match=pattern) as info:
        call()
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(info.value).startswith(where), str(info.value)
    assert (info.value.path, info.value.line) == (str(path), line)
    return info.value


# Formats: the same examples from every format --------------------------------------------------------
@runtime_only
def test_every_format_reads_the_same_examples(tmp_path):
    expected = [LabeledExample(r["text"], r["label"]) for r in ROWS]
    files = {
        "csv": _csv(tmp_path / "d.csv", ["text", "label"], [[r["text"], r["label"]] for r in ROWS]),
        "tsv": _csv(tmp_path / "d.tsv", ["text", "label"], [[r["text"], r["label"]] for r in ROWS], "\t"),
        "jsonl": _jsonl(tmp_path / "d.jsonl", ROWS),
        "json": _write(tmp_path / "d.json", json.dumps(ROWS, indent=2)),
    }
    for fmt, path in files.items():
        data = read_examples(path)
        assert (data.format, data.kind, data.mapping) == (fmt, "classification", FieldMap(text="text", label="label"))
        assert list(data) == expected == list(data), fmt  # iterating reads the file afresh
    assert set(FORMATS.values()) == {"csv", "tsv", "jsonl", "json", "parquet", "txt"}


@runtime_only
def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs the [data] extra (pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", None], "n": [1, 2, 3]}), path,
                   row_group_size=2)
    data = read_examples(path)
    assert data.kind == "seq2seq" and data.unused_fields == ("n",)
    _raises(r"field 'answer' must be a string; got NoneType", path, 3, lambda: list(data))
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 7]}), path)
    assert list(read_examples(path)) == [LabeledExample("a", "0"), LabeledExample("b", "7")]
    _raises("not a readable Parquet file", path, None, lambda: list(read_examples(_write(path, "not parquet"))))


@runtime_only
def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = _write(tmp_path / "d.parquet", b"PAR1")
    _raises(r"reading Parquet needs pyarrow: pip install 'onnxformer\[data\]'", path, None, lambda: read_examples(path))


@runtime_only
def test_csv_quoting_bom_crlf_and_a_quoted_line_break(tmp_path):
    path = _write(tmp_path / "q.csv", b'\xef\xbb\xbftext,label\r\n"a, b ""quoted""",x\r\n"two\r\nlines",y\r\n\r\nlast,x\r\n')
    assert list(read_examples(path).numbered()) == [
        (2, LabeledExample('a, b "quoted"', "x")), (3, LabeledExample("two\nlines", "y")), (6, LabeledExample("last", "x"))]
    tsv = _write(tmp_path / "c.tsv", b"\xef\xbb\xbftext\tlabel\r\nsay \"hi\"\tx\r\n")  # TSV: quotes are text
    assert list(read_examples(tsv)) == [LabeledExample('say "hi"', "x")]


@runtime_only
def test_headerless_tsv_two_columns(tmp_path):
    path = _write(tmp_path / "h.tsv", "it 's a charming film .\t1\nbleak and desperate\t0\n")
    data = read_examples(path, kinds=("classification",))
    assert list(data) == [LabeledExample("it 's a charming film .", "1"), LabeledExample("bleak and desperate", "0")]
    assert list(read_examples(path, kinds=("seq2seq",))) == [PairExample("it 's a charming film .", "1"),
                                                              PairExample("bleak and desperate", "0")]
    # Without a task it could be either: the fix (a header line) works
    _raises(r"names no known fields .*add a header line naming the columns, e\.g\. text<TAB>label", path, 1,
            lambda: read_examples(path))
    _write(path, "text\tlabel\n" + path.read_text())
    assert read_examples(path).kind == "classification"


@runtime_only
def test_sst2_dev_file():
    if not SST2_DEV.is_file():
        pytest.skip(f"shared data not found at {SST2_DEV}")
    data = read_examples(SST2_DEV, kinds=("classification",))
    examples = list(data)
    assert (data.format, data.mapping, len(examples)) == ("tsv", FieldMap(text="text", label="label"), 872)
    assert {e.label for e in examples} == {"0", "1"}
    assert examples[0] == LabeledExample("it 's a charming and often affecting journey .", "1")


@runtime_only
def test_unknown_extension_lists_the_known_ones_and_renaming_works(tmp_path):
    path = _jsonl(tmp_path / "d.data", ROWS)
    _raises(r"unknown file type '\.data'; known: \.csv, \.tsv, \.jsonl, \.json, \.parquet, \.txt", path, None,
            lambda: read_examples(path))
    assert read_examples(path.rename(tmp_path / "d.jsonl")).kind == "classification"


@runtime_only
def test_json_array_errors_and_empty_array(tmp_path):
    path = _write(tmp_path / "a.json", '[\n {"text": "a", "label": "x"},\n {"text": "b"}\n]')
    _raises(r"missing field 'label'", path, 3, lambda: list(read_examples(path)))
    path = _write(tmp_path / "b.json", '[{"text": "a", "label": "x"}\n {"text": "b", "label": "y"}]')
    _raises(r"expected ',' or '\]'", path, 2, lambda: list(read_examples(path)))
    _raises("no examples", path, None, lambda: read_examples(_write(path, "[ ]")))


# Field mapping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record,kind,example", [
    ({"sentence": "a b", "label": 1, "idx": 0}, "classification", LabeledExample("a b", "1")),
    ({"source": "one", "target": "1"}, "seq2seq", PairExample("one", "1")),
    ({"prompt": "2+2=", "completion": " 4"}, "seq2seq", PairExample("2+2=", "4")),
    ({"instruction": "add", "input": "2 2", "output": "4"}, "seq2seq", PairExample("add\n\n2 2", "4")),
    ({"instruction": "say hi", "input": "", "output": "hi"}, "seq2seq", PairExample("say hi", "hi")),
    ({"question": "why?", "answer": "because"}, "seq2seq", PairExample("why?", "because")),
    (CHAT, "chat", ChatExample((Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello")))),
    ({"text": "just text"}, "text", TextExample("just text")),
])
@runtime_only
def test_schemas_are_detected(tmp_path, record, kind, example):
    data = read_examples(_jsonl(tmp_path / "d.jsonl", [record]))
    assert data.kind == kind and list(data) == [example] and data.unused_fields == ()


@runtime_only
def test_named_fields_complete_the_detection(tmp_path):
    path = _csv(tmp_path / "r.csv", ["review", "stars", "label"], [["great", "5", "pos"], ["awful", "1", "neg"]])
    _raises(r"lacks column 'text'; classification data needs 'text' \+ 'label'.*--text-field NAME", path, 1,
            lambda: read_examples(path, kinds=("classification",)))
    data = read_examples(path, kinds=("classification",), fields=FieldMap(text="review"))  # the fix
    assert list(data) == [LabeledExample("great", "pos"), LabeledExample("awful", "neg")]
    assert data.unused_fields == ("stars",)
    data = read_examples(path, fields=FieldMap(text="review", label="stars"))
    assert [e.label for e in data] == ["5", "1"] and data.unused_fields == ("label",)
    assert FieldMap(source="instruction,input").source == ("instruction", "input")
    with pytest.raises(ConfigError, match="different kinds of data"):
        FieldMap(text="a", source="b")


@runtime_only
def test_a_named_field_that_is_missing(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    error = _raises(r"missing field 'review' \(named by --text-field\); the fields found are 'text', 'label'",
                    path, 1, lambda: read_examples(path, fields=FieldMap(text="review")))
    assert "pass --text-field with one of them" in str(error)
    assert read_examples(path, fields=FieldMap(text="text")).kind == "classification"


@runtime_only
def test_a_csv_without_a_header_line(tmp_path):
    path = _write(tmp_path / "n.csv", "good,positive\nbad,negative\n")
    _raises(r"cannot tell the task kind from fields \['good', 'positive'\].*needs one naming the columns, e\.g\. "
            "text,label", path, 1, lambda: read_examples(path, kinds=("classification",)))
    _write(path, "text,label\n" + path.read_text())  # the fix
    assert list(read_examples(path)) == [LabeledExample("good", "positive"), LabeledExample("bad", "negative")]


@runtime_only
def test_unknown_fields_name_the_schemas_and_the_flags(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "a b", "tag": "x"}, {"body": "c d", "tag": "y"}])
    _raises(r"cannot tell the task kind from fields \['body', 'tag'\]: known schemas are text\+label, .*"
            r"--text-field, --label-field", path, 1, lambda: read_examples(path, kinds=("classification",)))
    data = read_examples(path, kinds=("classification",), fields=FieldMap(text="body", label="tag"))
    assert list(data) == [LabeledExample("a b", "x"), LabeledExample("c d", "y")]


@runtime_only
def test_the_task_is_known_before_the_kind_is_guessed(tmp_path, caplog):
    """Issue 16: text, label, source and target under --task classify used to be 'seq2seq data'."""
    path = _jsonl(tmp_path / "d.jsonl", [{**r, "source": "s", "target": "t"} for r in ROWS])
    with caplog.at_level(logging.WARNING):
        data = read_examples(path, kinds=("classification",))
    assert data.kind == "classification" and data.unused_fields == ("source", "target")
    assert "fields 'source', 'target' not used by classification data" in caplog.text
    assert read_examples(path, kinds=("seq2seq",)).kind == "seq2seq"
    error = _raises(r"fit several schemas: text='text', label='label' \(classification\); source='source', "
                    r"target='target' \(seq2seq\); name the fields to read, e\.g\. --text-field text --label-field label",
                    path, 1, lambda: read_examples(path))
    assert "--text-field text --label-field label" in str(error)
    assert read_examples(path, fields=FieldMap(text="text", label="label")).kind == "classification"  # the fix


@runtime_only
def test_two_seq2seq_schemas_in_one_record(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "question": "q", "answer": "a"}])
    _raises("fit several schemas", path, 1, lambda: read_examples(path, kinds=("seq2seq",)))
    data = read_examples(path, kinds=("seq2seq",), fields=FieldMap(source="question", target="answer"))
    assert list(data) == [PairExample("q", "a")]


@runtime_only
def test_a_kind_preference_picks_text_for_language_modelling(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    assert read_examples(path, kinds=("text", "classification")).kind == "text"  # causal-lm: labels unused
    assert read_examples(path).kind == "classification"  # no task: the schema with more fields


@runtime_only
def test_fields_of_another_kind_say_so(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [CHAT])
    error = _raises(r"fields 'messages' hold chat data \(messages='messages'\), but classification data is needed",
                    path, 1, lambda: read_examples(path, kinds=("classification",)))
    assert [m.kind for m in error.fits] == ["chat"]


# Text layout ---------------------------------------------------------------------------------------------
@runtime_only
def test_text_layout_is_detected_and_logged(tmp_path, caplog):
    """Issue 16: a .txt of one example per line was one document ('only 1 example')."""
    lines = _write(tmp_path / "lines.txt", "".join(f"line number {i}\r\n" for i in range(2000)))
    with caplog.at_level(logging.INFO, logger="onnxformer"):
        data = read_examples(lines)
    assert data.text_layout == "lines" and len(list(data)) == 2000
    assert "text layout lines (detected)" in caplog.text
    docs = _write(tmp_path / "docs.txt", "\ufeffA: hi.\nB: hello.\n\n\n  second doc  \nline\n")
    data = read_examples(docs)
    assert data.text_layout == "blank-line-documents"
    assert list(data) == [TextExample("A: hi.\nB: hello."), TextExample("second doc\nline")]
    assert len(list(read_examples(docs, text_layout="lines"))) == 4
    assert len(load_task_data(lines).train) == 1900


@runtime_only
def test_the_one_example_message_gives_fixes_that_work(tmp_path):
    one = _write(tmp_path / "one.txt", "first line\nsecond line\nthird line\n")
    _raises(r"only 1 example \(read as blank-line-documents; if each line is an example, pass --text-layout lines\)",
            one, None, lambda: load_task_data(one, text_layout="blank-line-documents"))
    assert len(load_task_data(one, text_layout="lines").train) == 2  # the fix: 3 lines, 1 held out
    single = _write(tmp_path / "single.txt", "only line\n")
    _raises(r"only 1 example; need at least 2 .*add examples, or pass a validation file \(--valid PATH\)",
            single, None, lambda: load_task_data(single))
    valid = _write(tmp_path / "valid.txt", "a validation line\n")
    data = load_task_data(single, valid=valid)  # the fix
    assert (len(data.train), len(data.valid)) == (1, 1)


@runtime_only
def test_txt_for_a_labelled_task_and_layout_for_a_table(tmp_path):
    path = _write(tmp_path / "d.txt", "just some text\n")
    _raises(r"cannot read classification data from a \.txt file.*use \.csv, \.tsv, \.jsonl", path, None,
            lambda: read_examples(path, kinds=("classification",)))
    with pytest.raises(ConfigError, match="--text-layout applies to .txt files"):
        read_examples(_jsonl(tmp_path / "d.jsonl", ROWS), text_layout="lines")


# Sanity warnings and labels ---------------------------------------------------------------------------------
@runtime_only
def test_swapped_columns_warn_and_the_suggested_flags_fix_it(tmp_path, caplog):
    """Issue 16: label and text columns swapped gave 285 classes from 300 rows and no warning."""
    rows = [{"text": ROWS[i % 40]["label"], "label": f"a sentence about film {i} that is long"} for i in range(300)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        load_task_data(path, "classification")
    assert "the labels look like text" in caplog.text and "are the text and label fields swapped?" in caplog.text
    assert caplog.text.rstrip().endswith("pass --text-field label --label-field text")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = load_task_data(path, "classification", fields=FieldMap(text="label", label="text"))  # the fix
    assert data.label_names == ("neg", "pos") and not caplog.text


@runtime_only
def test_more_classes_than_half_the_rows_warns(tmp_path, caplog):
    rows = [{"text": r["text"], "id_code": f"c{i}", "label": r["label"]} for i, r in enumerate(ROWS)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        load_task_data(path, "classification", fields=FieldMap(label="id_code"))
    assert "40 distinct labels in 40 training rows" in caplog.text and "--label-field NAME" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_task_data(path, "classification", fields=FieldMap(label="label"))  # the fix
    assert "distinct labels" not in caplog.text


@runtime_only
def test_labels_are_strings_or_integers_and_valid_labels_must_be_seen(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "label": i % 3} for i in range(30)])
    data = load_task_data(train)
    assert data.label_names == ("0", "1", "2")
    valid = _jsonl(tmp_path / "valid.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "7"}])
    _raises(r"unknown label '7'; known labels: 0, 1, 2", valid, 2, lambda: load_task_data(train, valid=valid))
    _jsonl(valid, [{"text": "a", "label": 1}, {"text": "b", "label": 2}])  # the fix: only seen labels
    assert len(load_task_data(train, valid=valid).valid) == 2
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1.5}])
    _raises(r"field 'label' must be a string; got float 1\.5", bad, 1, lambda: list(read_examples(bad)))


# Bad input: path:line, what is wrong, and a fix that works -----------------------------------------------------
@runtime_only
def test_mixed_schemas_in_one_file(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [*ROWS[:3], {"prompt": "p", "completion": "c"}])
    _raises(r"this record holds prompt\+completion fields .* but the file's first record \(line 1\) holds "
            r"text='text', label='label': one file holds one schema; split the file in two", path, 4,
            lambda: list(read_examples(path)))
    first = _jsonl(tmp_path / "m1.jsonl", ROWS[:3])  # the fix
    second = _jsonl(tmp_path / "m2.jsonl", [{"prompt": "p", "completion": "c"}])
    assert read_examples(first).kind == "classification" and read_examples(second).kind == "seq2seq"


@pytest.mark.parametrize("messages,pattern", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
     r"messages\[1\]: unknown role 'bot'; a turn's role is one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}], r"no assistant turn \(user\); add the assistant's reply"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}],
     r"ends with a user turn \(user, assistant, user\); the last turn must be the assistant's reply: add it, or drop "
     "the trailing turns"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "assistant turn has no content"),
    ([{"role": "user"}], r"messages\[0\] must be an object with 'role' and 'content'"),
    ("not a list", r"field 'messages' is not a JSON list of turns"),
])
@runtime_only
def test_bad_conversations(tmp_path, messages, pattern):
    path = _jsonl(tmp_path / "c.jsonl", [CHAT, {"messages": messages}])
    _raises(pattern, path, 2, lambda: list(read_examples(path)))


@runtime_only
def test_dropping_the_trailing_turn_fixes_a_conversation(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": turns[:2]}])
    assert list(read_examples(path)) == [ChatExample((Message("user", "hi"), Message("assistant", "yo")))]


@runtime_only
def test_malformed_csv_row_and_its_fix(tmp_path):
    path = _write(tmp_path / "m.csv", 'text,label\ngood,pos\n"say "hi" now",pos\n')
    _raises(r"malformed CSV row .*must be quoted, e\.g\. \"a, b\", with its quotes doubled", path, 3,
            lambda: list(read_examples(path)))
    _write(path, 'text,label\ngood,pos\n"say ""hi"" now",pos\n')  # the fix
    assert list(read_examples(path))[1] == LabeledExample('say "hi" now', "pos")
    path = _write(tmp_path / "n.csv", 'text,label\ngood,pos\nhello, world,pos\n')
    _raises(r"3 comma-separated columns, but the header has 2; quote fields that contain commas", path, 3,
            lambda: list(read_examples(path)))
    _write(path, 'text,label\ngood,pos\n"hello, world",pos\n')  # the fix
    assert len(list(read_examples(path))) == 2
    path = _write(tmp_path / "u.csv", 'text,label\ngood,pos\n"never closed,pos\n')
    _raises("malformed CSV row", path, 3, lambda: list(read_examples(path)))


@runtime_only
def test_non_utf8_and_its_fix(tmp_path):
    text = 'text,label\ngood,pos\ncafé,neg\n'
    path = _write(tmp_path / "l.csv", text.encode("latin-1"))
    _raises(r"invalid UTF-8 \(byte 0xe9 at column 4\); re-save the file as UTF-8", path, 3,
            lambda: list(read_examples(path)))
    _write(path, text.encode("utf-8"))  # the fix
    assert list(read_examples(path))[1] == LabeledExample("café", "neg")
    _raises(r"binary data \(NUL byte\)", path, 1, lambda: read_examples(_write(path, "text,label\n".encode("utf-16"))))


@runtime_only
def test_empty_and_header_only_files(tmp_path):
    for name in ("e.csv", "e.jsonl", "e.txt", "e.tsv"):
        path = _write(tmp_path / name, "\r\n  \n")
        _raises("empty file", path, None, lambda: list(read_examples(path)))
    path = _write(tmp_path / "h.csv", "text,label\r\n")
    _raises("no examples below the header", path, None, lambda: list(read_examples(path)))
    path = _write(tmp_path / "e.csv", "text,label\ngood,\n")
    _raises(r"field 'label' is empty; remove the line or fill it in", path, 2, lambda: list(read_examples(path)))
    path = _write(tmp_path / "d.csv", "text,text\na,b\n")
    _raises("the header names a column twice", path, 1, lambda: read_examples(path))


# Issue 16's reproductions through `onnxformer train` ------------------------------------------------------------
def _train(tmp_path, capsys, caplog, name, *args) -> tuple[int, str, str, Path]:
    """`onnxformer train ARGS` in this process: status, stderr, the log, the run directory."""
    from onnxformer.runtime.cli import main

    out = tmp_path / name
    caplog.clear()  # no caplog.at_level: the train command raises its data loggers to INFO itself (no -v)
    rc = main(["train", *args, "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--no-progress",
               "--out", str(out)])
    return rc, capsys.readouterr().err, caplog.text, out


@pytest.mark.slow
def test_train_on_a_csv_with_a_header(tmp_path, capsys, caplog):
    """Issue 16: a CSV with a text,label header was read as plain-text documents."""
    pytest.importorskip("torch", reason="the train command needs the [train] extra")
    path = _csv(tmp_path / "reviews.csv", ["text", "label"], [[r["text"], r["label"]] for r in ROWS])
    rc, err, log, out = _train(tmp_path, capsys, caplog, "csv", "--arch", "encoder", "--task", "classify",
                               "--data", str(path))
    assert rc == 0, err
    assert f"{path}: csv, classification data: text='text', label='label' (detected)" in log
    assert f"loaded {path} (classification): 38/2/0 examples, 2 labels" in log
    assert (out / "latest").exists()


@pytest.mark.slow
def test_train_sft_on_prompt_completion_jsonl_and_bad_data_writes_nothing(tmp_path, capsys, caplog):
    """Issue 16: prompt/completion JSONL was 'cannot tell the task kind from fields'."""
    pytest.importorskip("torch", reason="the train command needs the [train] extra")
    rows = [{"prompt": f"count to {i}", "completion": " ".join(str(k) for k in range(i % 5 + 1))} for i in range(30)]
    path = _jsonl(tmp_path / "pc.jsonl", rows)
    rc, err, log, out = _train(tmp_path, capsys, caplog, "sft", "--arch", "decoder", "--task", "sft", "--data", str(path))
    assert rc == 0, err
    assert "seq2seq data: source='prompt', target='completion' (detected)" in log
    # The same file under classify names the tasks that read it; nothing is written
    rc, err, log, out = _train(tmp_path, capsys, caplog, "bad", "--arch", "encoder", "--task", "classify",
                               "--data", str(path))
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"error[E_DATA]: {path}:1: task 'classify' needs classification data, but the file "
                                 "holds seq2seq data (fields source='prompt', target='completion'); tasks that "
                                 "train on seq2seq data: seq2seq (--task seq2seq --arch encoder-decoder), sft (--task "
                                 "sft --arch decoder)"), err
    assert not (out / "latest").exists()


def test_chat_data_is_read_and_a_task_that_cannot_use_it_says_which_can(tmp_path):
    pytest.importorskip("torch", reason="the trainer needs the [train] extra")
    from onnxformer.modeling.tasks import OBJECTIVES
    from onnxformer.modeling.train import TrainConfig, _load_data

    path = _jsonl(tmp_path / "chat.jsonl", [CHAT] * 4)
    readers = [name for name, o in OBJECTIVES.items() if "chat" in o.data_kinds]
    config = TrainConfig(arch="encoder", task="classify", data=str(path), out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"task 'classify' needs classification data, but the file holds chat data") as info:
        _load_data(config, config.objective)
    if readers:
        assert f"tasks that train on chat data: {readers[0]} (--task {readers[0]}" in str(info.value)
    else:
        assert "no task trains on chat data yet" in str(info.value)
    assert load_task_data(path, "chat").kind == "chat"


def test_train_config_field_flags_reach_the_reader(tmp_path):
    pytest.importorskip("torch", reason="the trainer needs the [train] extra")
    from onnxformer.modeling.train import TrainConfig, _load_data

    path = _csv(tmp_path / "r.csv", ["review", "stars"], [[r["text"], r["label"]] for r in ROWS])
    config = TrainConfig(arch="encoder", task="classify", data=str(path), out_dir=str(tmp_path / "o"),
                         text_field="review", label_field="stars")
    assert config.field_map() == FieldMap(text="review", label="stars")
    assert _load_data(config, config.objective).label_names == ("neg", "pos")
    with pytest.raises(ConfigError, match="text_layout"):
        TrainConfig(arch="encoder", task="classify", data=str(path), out_dir="o", text_layout="paragraphs")
    with pytest.raises(ConfigError, match="different kinds of data"):
        TrainConfig(arch="encoder", task="classify", data=str(path), out_dir="o", text_field="a", target_field="b")
