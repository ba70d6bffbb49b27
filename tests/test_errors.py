"""One error tree (runtime/errors.py): every code raised is in CODES, an error pickles with its
code, and the three CLIs (runtime, `train`, `export`) print `error[CODE]: message` and exit 2 on
a user's mistake, while a real bug (a plain exception from a public function the CLI calls)
keeps its traceback and exit status 1.

The CLIs run in real processes (`python -m onnxformer.runtime.cli`), as a user runs them."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from onnxformer.runtime import errors
from onnxformer.runtime.errors import CODES, OnnxformerError
from support import ARTIFACTS, HAS_TORCH, REPO

ERROR_CLASSES = [getattr(errors, name) for name in errors.__all__ if name != "CODES"]
SOURCES = sorted(p for layer in ("runtime", "modeling", "export") for p in (REPO / layer).rglob("*.py")
                 if "node_modules" not in p.parts and p != REPO / "runtime" / "errors.py")  # errors.py: the mechanism
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="train and export need the [train] extra (torch)")


# --- the table -------------------------------------------------------------------------------


def _codes_in_source(path: Path) -> list[tuple[int, str | None]]:
    """(line, code) of every `code=...` keyword in a call; None where it is not a string literal
    (or a choice between literals), which this test could not check."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg != "code":
                continue
            literals = [n.value for n in ast.walk(keyword.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            found += [(node.lineno, code) for code in literals] or [(node.lineno, None)]
    return found


@pytest.mark.runtime_only
def test_every_code_raised_is_in_the_table():
    raised = {}
    for path in SOURCES:
        for line, code in _codes_in_source(path):
            where = f"{path.relative_to(REPO)}:{line}"
            assert code is not None, f"{where}: pass code= a string literal (from CODES), so this test can check it"
            assert code in CODES, f"{where}: code {code!r} is not in onnxformer.runtime.errors.CODES"
            raised.setdefault(code, where)
    assert len(raised) >= 10, raised  # the scan found the raise sites
    for cls in ERROR_CLASSES:
        assert cls.default_code in CODES, cls


@pytest.mark.runtime_only
def test_the_table_is_well_formed_and_a_typo_is_a_bug():
    assert all(code.startswith("E_") and code == code.upper() and text for code, text in CODES.items())
    assert len({cls.default_code for cls in ERROR_CLASSES}) == len(ERROR_CLASSES)  # one default per class
    with pytest.raises(AssertionError, match="unknown error code 'E_NO_SUCH_CODE'"):
        errors.PackageError("x", code="E_NO_SUCH_CODE")


@pytest.mark.runtime_only
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_errors_pickle_with_their_code(cls):
    for code in (None, "E_DISK"):
        error = cls("the value and the fix", code=code)
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls and str(copy) == "the value and the fix"
        assert copy.code == (code or cls.default_code)
        assert isinstance(copy, OnnxformerError)


def test_data_errors_are_the_trees_and_pickle(tmp_path):
    from onnxformer.modeling.data import DataError, load_task_data

    assert DataError is errors.DataError
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(errors.DataError) as excinfo:
        load_task_data(bad, "classification")
    copy = pickle.loads(pickle.dumps(excinfo.value))
    assert (type(copy), str(copy), copy.code) == (errors.DataError, str(excinfo.value), "E_DATA")
    assert str(copy).startswith(f"{bad}:1: missing field 'label'")


# --- the CLIs: a user's mistake --------------------------------------------------------------


def cli(*argv: str, setup: str = "") -> subprocess.CompletedProcess:
    """`onnxformer ARGV` in a fresh interpreter, after running `setup` (Python) in it."""
    script = "\n".join(["import sys", setup, "from onnxformer.runtime.cli import main", "sys.exit(main(sys.argv[1:]))"])
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)


def assert_user_error(run: subprocess.CompletedProcess, code: str, *phrases: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"error[{code}]: "), run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    for phrase in phrases:
        assert phrase in run.stderr, run.stderr


@pytest.mark.runtime_only
def test_runtime_cli_user_errors(tmp_path):
    assert_user_error(cli("generate", str(tmp_path / "nope"), "x"), "E_MISSING_FILE", "nope", "does not exist")
    assert_user_error(cli("inspect", str(tmp_path)), "E_MANIFEST", "manifest.json", "not an onnxformer package")
    package = ARTIFACTS / "decoder"
    if (package / "manifest.json").is_file():
        assert_user_error(cli("generate", str(package), "x", "--top-p", "2"), "E_CONFIG", "top_p")
        assert_user_error(cli("generate", str(package), "x", "--max-new-tokens", "-1"), "E_CONFIG", "max_new_tokens")


@needs_torch
def test_train_cli_user_errors(tmp_path):
    assert_user_error(cli("train", "--arch", "decoder", "--task", "causal-lm", "--data", str(tmp_path / "none.txt"),
                          "--out", str(tmp_path / "run")), "E_DATA", "none.txt", "file not found")
    assert_user_error(cli("train", "--arch", "decoder", "--task", "causal-lm", "--data", "builtin:corpus",
                          "--steps", "0", "--out", str(tmp_path / "run")), "E_CONFIG", "steps must be a positive integer")
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    assert_user_error(cli("train", "--arch", "decoder", "--task", "causal-lm", "--data", "builtin:corpus",
                          "--steps", "1", "--no-progress", "--out", str(in_the_way / "run")),
                      "E_DISK", str(in_the_way / "run"), "--out")


@needs_torch
def test_export_cli_user_errors(tmp_path):
    assert_user_error(cli("export", str(tmp_path / "no-run"), str(tmp_path / "package")),
                      "E_MISSING_FILE", "no-run", "does not exist")
    (tmp_path / "not-a-run").mkdir()
    assert_user_error(cli("export", str(tmp_path / "not-a-run"), str(tmp_path / "package")),
                      "E_CHECKPOINT", "not-a-run", "neither a checkpoint folder")


@needs_torch
def test_export_cli_unwritable_output(tmp_path):
    from onnxformer.modeling.train import TrainConfig, train

    run = train(TrainConfig(arch="decoder", task="causal-lm", data="builtin:corpus", steps=1, out_dir=str(tmp_path / "run"),
                            progress=False)).run_dir
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    assert_user_error(cli("export", str(run), str(in_the_way / "package")), "E_DISK", "a-file", "writable folder")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


# --- the CLIs: a real bug keeps its traceback ------------------------------------------------


def assert_bug(run: subprocess.CompletedProcess, error: str) -> None:
    assert run.returncode == 1, run.stderr
    assert "Traceback (most recent call last)" in run.stderr and f"{error}: a bug" in run.stderr, run.stderr
    assert "error[" not in run.stderr, run.stderr


@pytest.mark.runtime_only
def test_runtime_cli_bug_keeps_its_traceback(tmp_path):
    # ValueError used to be caught by the CLI as if the user had made a mistake.
    setup = "import onnxformer.runtime as rt\ndef load(*a, **k): raise ValueError('a bug')\nrt.load = load"
    assert_bug(cli("generate", str(tmp_path), "x", setup=setup), "ValueError")
    setup = "import onnxformer.runtime.manifest as m\nm.Manifest.load = classmethod(lambda c, d: 1 / 0 or 'a bug')"
    run = cli("inspect", str(tmp_path), setup=setup)
    assert run.returncode == 1 and "ZeroDivisionError" in run.stderr and "Traceback" in run.stderr, run.stderr


@needs_torch
def test_train_and_export_cli_bugs_keep_their_traceback(tmp_path):
    setup = "import onnxformer.modeling.train as t\ndef train(config): raise ZeroDivisionError('a bug')\nt.train = train"
    assert_bug(cli("train", "--arch", "decoder", "--task", "causal-lm", "--data", "builtin:corpus",
                   "--out", str(tmp_path / "run"), setup=setup), "ZeroDivisionError")
    # OSError used to be caught by `export` as an unwritable output folder.
    setup = ("import onnxformer.export.exporter as e\n"
             "def export_checkpoint(*a): raise OSError('a bug')\ne.export_checkpoint = export_checkpoint")
    assert_bug(cli("export", str(tmp_path / "run"), str(tmp_path / "package"), setup=setup), "OSError")


@pytest.mark.runtime_only
def test_verbose_shows_where_a_user_error_came_from(tmp_path):
    run = cli("-v", "generate", str(tmp_path / "nope"), "x")
    assert run.returncode == 1 and "Traceback" in run.stderr, run.stderr
    assert "onnxformer.runtime.errors.PackageError: package directory" in run.stderr, run.stderr
