"""Helpers shared by the reliability tests (imported as `reliability_support`)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
# Where onnxformer's own code is installed (the repository folders in an editable install).
OWN_CODE = tuple(
    os.path.join(location, "")
    for package in ("onnxformer.runtime", "onnxformer.modeling", "onnxformer.export")
    for location in (importlib.util.find_spec(package).submodule_search_locations or [])
)


def rewrite_manifest(directory: Path, change: Callable[[dict], Any]) -> dict:
    """Apply `change` to manifest.json in place (the graph files stay as they are)."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    return data


def refresh_checksums(directory: Path) -> None:
    """Make the manifest's sizes and checksums match the files again (a forger's last step),
    so a test reaches the checks that come after verification."""
    from onnxformer.runtime.manifest import sha256_file

    def fix(entry: dict) -> None:
        path = directory / entry["file"]
        if path.is_file():
            entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)

    def change(data: dict) -> None:
        fix(data["tokenizer"])
        for graph in data["graphs"].values():
            fix(graph)
            for extra in graph.get("external_data", []):
                fix(extra)

    rewrite_manifest(directory, change)


# --- error origin ----------------------------------------------------------------------------


def raised_by_us(excinfo: pytest.ExceptionInfo) -> bool:
    """The innermost frame of the traceback is onnxformer's own code (runtime/, modeling/,
    export/): the error was raised on purpose, not leaked from onnxruntime, torch or numpy."""
    frames = traceback.extract_tb(excinfo.tb)
    return bool(frames) and frames[-1].filename.startswith(OWN_CODE)


# --- the CLI, in-process ---------------------------------------------------------------------


class CliResult:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self) -> str:
        return f"CliResult(rc={self.rc}, err={self.err[-300:]!r})"


def run_cli(argv: list[str], stdin: str | bytes | None = None) -> CliResult:
    """`onnxformer ARGV` in this process: exit status, stdout, stderr. Uncaught exceptions
    propagate (that is what the tests look for); argparse's SystemExit becomes the status."""
    from onnxformer.runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    if isinstance(stdin, bytes):
        stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    else:
        stream = io.StringIO(stdin if stdin is not None else "")
    saved = sys.stdin
    sys.stdin = stream
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        sys.stdin = saved
    return CliResult(rc, out.getvalue(), err.getvalue())


# --- a watchdog against hangs ----------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise Hang in the main thread if the block runs longer than `seconds` (SIGALRM)."""

    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fails_with_advice(call, needle: str, code: str | None = None):
    """`call()` raises one of our errors whose message contains the fix `needle` (and `code`)."""
    import pytest

    from onnxformer.runtime.errors import OnnxformerError

    with pytest.raises(OnnxformerError) as excinfo:
        call()
    err = excinfo.value
    assert needle in str(err), f"the advice {needle!r} is not in the message: {err}"
    if code:
        assert err.code == code
    return err
