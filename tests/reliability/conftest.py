"""Fixtures of the reliability suite: tiny packages and loaded models, package copies to
damage, a finished training run, and a recorder for the figures that RESULTS.md reports.
Helpers shared by the tests live in reliability_support.py.

The figures are written only when ONNXFORMER_RELIABILITY_FIGURES names a file (report.py
sets it); a plain `pytest` run records nothing and writes nothing into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

FIGURES_ENV = "ONNXFORMER_RELIABILITY_FIGURES"


class Figures:
    """Append one JSON line per measurement: area, what was tried, cases, outcome, numbers."""

    def __init__(self, path: str | None):
        self.path = path

    def record(self, area: str, tried: str, cases: int | str, outcome: str, **numbers: Any) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"area": area, "tried": tried, "cases": cases, "outcome": outcome, **numbers}) + "\n")


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures(os.environ.get(FIGURES_ENV))


# --- packages --------------------------------------------------------------------------------
# The same (arch, pos) keys as tests/test_runtime.py, so a full run exports each package once.
PACKAGES = {
    "decoder": ("decoder", "rope"), "encoder": ("encoder", "learned"), "encoder-decoder": ("encoder-decoder", "rope"),
}


@pytest.fixture(scope="session")
def package_paths(package_factory) -> dict[str, Path]:
    return {name: package_factory(*key)[2].path for name, key in PACKAGES.items()}


@pytest.fixture(scope="session")
def models(package_paths):
    """One loaded model per package, single-threaded: onnxruntime's default intra-op pool
    spin-waits, which makes tiny models ~3x slower on CPU cores shared with other work."""
    import onnxformer.runtime as rt

    return {name: rt.load(path, threads=1) for name, path in package_paths.items()}


@pytest.fixture
def package_copy(package_paths, tmp_path) -> Callable[[str], Path]:
    """A writable copy of a package: package_copy("decoder") -> directory."""

    count = iter(range(1000))

    def copy(name: str) -> Path:
        target = tmp_path / f"copy-{next(count)}-{name}"
        shutil.copytree(package_paths[name], target)
        return target

    return copy


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-step decoder run (checkpoint at step 1 and 2)."""
    pytest.importorskip("torch")
    from onnxformer.modeling.data import load_builtin
    from onnxformer.modeling.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained-run")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(e.text for e in load_builtin("corpus").train[:40]) + "\n", encoding="utf-8")
    config = TrainConfig(arch="decoder", task="causal-lm", data=str(text), out_dir=str(root / "run"), steps=2,
                         batch_size=4, vocab_size=300, max_len=32, save_every=1, keep_checkpoints=0,
                         eval_examples=4, progress=False)
    train(config)
    return root / "run"
