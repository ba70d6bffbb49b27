"""The committed packages in artifacts/: they load, their checksums match, and they still
solve their built-in task through the runtime. Runs without torch (CI's runtime-only venv
selects these with `-m runtime_only`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import ARTIFACTS

pytestmark = pytest.mark.runtime_only

PACKAGES = sorted(p.parent for p in ARTIFACTS.glob("*/manifest.json"))
EXPECTED = {"encoder", "decoder", "prefix-lm", "encoder-decoder"}


def test_every_architecture_has_a_committed_package():
    assert {p.name for p in PACKAGES} == EXPECTED


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_artifact_loads_verifies_and_is_small(package):
    import onnxformer.runtime as rt

    model = rt.load(package)  # manifest, sha256 of every file, session I/O vs the contract
    assert model.arch == package.name
    assert sum(f.stat().st_size for f in package.iterdir()) < 8e6
    figures = model.manifest.validation["float32"]
    assert figures["passed"] and figures["worst_abs_diff"] <= 1e-4


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_artifact_solves_its_task_through_the_runtime(package):
    from onnxformer.export.quickstart import JOBS, score_package

    job = next(j for j in JOBS if j.arch == package.name)
    score = score_package(package, job, limit=200)
    assert score.metric >= 0.9, f"{package.name}: {job.metric} {score.metric:.3f} on 200 test examples"


def test_cli_on_artifacts():
    run = lambda *a: subprocess.run([sys.executable, "-m", "onnxformer.runtime.cli", *a],  # noqa: E731
                                    capture_output=True, text=True)
    formatted = json.loads((ARTIFACTS / "decoder" / "manifest.json").read_text()).get("prompt_format")
    # the user's prompt: bare once the package carries its prompt format (issue 14), else formatted by hand
    out = run("generate", str(ARTIFACTS / "decoder"), "three hundred forty two" + ("" if formatted else " ="), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["texts"][0] == ("3 4 2" if formatted else " 3 4 2")
    out = run("generate", str(ARTIFACTS / "decoder"), "three hundred forty two =", "--raw")  # as given, both ways
    assert out.stdout.strip() == "3 4 2", out.stderr
    out = run("generate", str(ARTIFACTS / "encoder-decoder"), "seventeen")
    assert out.stdout.strip() == "1 7"
    out = run("classify", str(ARTIFACTS / "encoder"), "the food was not good", "--json")
    assert json.loads(out.stdout)[0]["label"] == "negative"
    out = run("embed", str(ARTIFACTS / "encoder"), "a sentence", "--json")
    assert len(json.loads(out.stdout)[0]["embedding"]) == 64
