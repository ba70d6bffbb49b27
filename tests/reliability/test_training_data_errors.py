"""Bad training data: a DataError (code E_DATA) that names the file and the line
(`path:line: problem; fix`), from the readers and from `onnxformer train`, which exits 2 with
that one line (`error[E_DATA]: path:line: ...`)."""

from __future__ import annotations

import json

import pytest

from onnxformer.modeling.data import DataError, load_task_data
from reliability_support import run_cli

DEEP = "[" * 50_000 + "]" * 50_000
OK_LINES = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]


def _jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# (case id, file name, bytes, line named in the message or None, message pattern)
CASES = [
    ("jsonl: missing field", "d.jsonl", _jsonl([*OK_LINES, {"text": "no label here"}]), 3, "missing field 'label'"),
    ("jsonl: text is a number", "d.jsonl", _jsonl([*OK_LINES, {"text": 5, "label": "pos"}]), 3,
     "field 'text' must be a string; got int 5"),
    ("jsonl: label is null", "d.jsonl", _jsonl([*OK_LINES, {"text": "x", "label": None}]), 3,
     "field 'label' must be a string"),
    ("jsonl: label is a list", "d.jsonl", _jsonl([*OK_LINES, {"text": "x", "label": ["pos"]}]), 3,
     "must be a string; got list"),
    ("jsonl: label is a float", "d.jsonl", _jsonl([*OK_LINES, {"text": "x", "label": 1.5}]), 3,
     "must be a string; got float"),
    ("jsonl: empty text", "d.jsonl", _jsonl([*OK_LINES, {"text": "  ", "label": "pos"}]), 3, "field 'text' is empty"),
    ("jsonl: invalid JSON", "d.jsonl", _jsonl([OK_LINES[0], '{"text": "x", "label": ', OK_LINES[1]]), 2, "invalid JSON"),
    ("jsonl: a list, not an object", "d.jsonl", _jsonl([*OK_LINES, "[1, 2]"]), 3, "expected a JSON object .* got list"),
    ("jsonl: nested 50000 deep", "d.jsonl", _jsonl([*OK_LINES, '{"text": ' + DEEP + ', "label": "pos"}']), 3,
     "JSON nested too deeply"),
    ("jsonl: first line nested 50000 deep", "d.jsonl", _jsonl([DEEP, *OK_LINES]), 1, "JSON nested too deeply"),
    ("jsonl: only blank lines", "d.jsonl", b"\n  \n\n", None, "empty file"),
    ("jsonl: unknown fields", "d.jsonl", _jsonl([{"foo": "a", "bar": "b"}] * 3), 1, "cannot tell the task kind"),
    ("tsv: header lacks a column", "d.tsv", b"text\tlabl\ngood\tpos\n", 1, "lacks column 'label'"),
    ("tsv: wrong column count", "d.tsv", b"text\tlabel\ngood\tpos\nbad\tneg\nworse\tneg\textra\n", 4,
     "3 tab-separated columns, but the header has 2"),
    ("tsv: empty label", "d.tsv", b"text\tlabel\ngood\tpos\nbad\t \n", 3, "field 'label' is empty"),
    ("tsv: header only", "d.tsv", b"text\tlabel\n", None, "no examples below the header"),
    ("empty file", "d.jsonl", b"", None, "empty file"),
    ("binary file", "d.jsonl", _jsonl(OK_LINES) + b"\x00\x01\x02garbage", 3, r"binary data \(NUL byte\)"),
    ("PNG image as text", "d.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 3, r"binary data \(NUL byte\)"),
    ("Latin-1, not UTF-8", "d.jsonl", _jsonl([OK_LINES[0]]) + '{"text": "café", "label": "pos"}\n'.encode("latin-1"), 2,
     "invalid UTF-8 .*byte 0xe9.*re-save the file as UTF-8"),
    ("UTF-16 text", "d.txt", "hello world\n".encode("utf-16"), 1, "(invalid UTF-8|binary data)"),
    ("classification from .txt", "d.txt", b"just some text\n\nmore text\n", None,
     "cannot read classification data from a .txt"),
    ("one example only", "d.jsonl", _jsonl(OK_LINES[:1]), None, "only 1 example; need at least 2"),
]
KINDS = {"classification from .txt": "classification", "tsv: header lacks a column": "classification"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_training_file_names_file_and_line(tmp_path, case):
    name, filename, content, line, pattern = case
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as excinfo:
        load_task_data(path, KINDS.get(name))
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(excinfo.value).startswith(where), str(excinfo.value)
    assert (excinfo.value.path, excinfo.value.line) == (str(path), line)
    assert excinfo.value.code == "E_DATA"


def test_unknown_label_in_the_validation_file(tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_bytes(_jsonl(OK_LINES * 3))
    valid.write_bytes(_jsonl([OK_LINES[0], {"text": "meh", "label": "neutral"}]))
    with pytest.raises(DataError, match=f"^{valid}:2: unknown label 'neutral'; known labels: neg, pos"):
        load_task_data(train, valid=valid)


@pytest.mark.parametrize("spec", ["missing.jsonl", "a-directory"])
def test_missing_file_or_directory(tmp_path, spec):
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(DataError, match="file not found|not a file") as excinfo:
        load_task_data(tmp_path / spec)
    assert str(excinfo.value).startswith(f"{tmp_path / spec}: ")


def test_valid_edge_files_load(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + _jsonl(OK_LINES * 2))
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(b"text\tlabel\r\ngood\tpos\r\nbad\tneg\r\nok\tpos\r\n")
    assert len(load_task_data(bom).train) + len(load_task_data(bom).valid) == 4
    assert load_task_data(crlf).label_names == ("neg", "pos")


CLI_CASES = [CASES[0], CASES[7], CASES[17], CASES[19]]


def test_train_cli_reports_file_and_line_and_exits_2(tmp_path, figures):
    pytest.importorskip("torch", reason="the train command needs the [train] extra")
    for i, (name, filename, content, line, _) in enumerate(CLI_CASES):
        path = tmp_path / f"{i}-{filename}"
        path.write_bytes(content)
        result = run_cli(["train", "--arch", "encoder", "--task", "classify", "--data", str(path),
                          "--out", str(tmp_path / f"run{i}"), "--steps", "2", "--no-progress"])
        assert result.rc == 2, (name, result)
        assert result.err.startswith(f"error[E_DATA]: {path}:{line}: ") and "Traceback" not in result.err, (name, result)
        assert not (tmp_path / f"run{i}" / "latest").exists()
    figures.record("training data", "bad files: missing fields, wrong types, null/list/float labels, invalid or "
                   "50,000-deep JSON, bad TSV columns, empty, binary (NUL, PNG), Latin-1 and UTF-16 text, unknown "
                   "labels, missing file, a directory", len(CASES) + 3,
                   f"{len(CASES) + 3} DataError starting `path:line:` (or `path:` for whole-file problems); "
                   f"`onnxformer train` exits 2 with that line ({len(CLI_CASES)} checked), no traceback")
