"""Nothing lost: `onnxformer train` and `onnxformer export` killed in the middle of writing.

Each run is a real subprocess of the real CLI, paused at a known moment of the write by
tests/reliability/interrupt.py (a write of a tiny model takes milliseconds, so the pause is
what makes "mid-write" certain rather than lucky) and then sent a real SIGKILL or SIGTERM.
Afterwards the previous checkpoint or package must be byte-for-byte intact and loadable,
`--resume` must continue the run, and the next write must clean up what the killed one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="training and export need the [train] extra")

import onnxformer.runtime as rt  # noqa: E402
from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling.data import load_builtin  # noqa: E402
from onnxformer.runtime.atomic import exchange  # noqa: E402
from reliability_support import run_cli  # noqa: E402

INTERRUPT = Path(__file__).with_name("interrupt.py")
STEPS, SAVE_EVERY = 6, 2


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def start(point: str, marker: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(INTERRUPT), point, str(marker), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pause(proc: subprocess.Popen, marker: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (status {proc.returncode}) before the write:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the process never reached the write")
        time.sleep(0.05)
    return Path(marker.read_text())


def kill(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("atomic") / "corpus.txt"
    path.write_text("\n\n".join(e.text for e in load_builtin("corpus").train[:60]) + "\n", encoding="utf-8")
    return path


def train_args(corpus: Path, run: Path) -> list[str]:
    return ["train", "--arch", "decoder", "--task", "causal-lm", "--data", str(corpus), "--out", str(run),
            "--steps", str(STEPS), "--batch-size", "4", "--vocab-size", "300", "--max-len", "32",
            "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "0", "--eval-examples", "4", "--no-progress"]


@pytest.fixture(scope="module")
def killed_training(corpus, tmp_path_factory, figures):
    """A run SIGKILLed while saving checkpoint 4, then resumed; what each stage looked like."""
    root = tmp_path_factory.mktemp("train-kill")
    run, marker = root / "run", root / "marker"
    proc = start(f"checkpoint:{2 * SAVE_EVERY}", marker, train_args(corpus, run))
    partial = wait_for_pause(proc, marker)
    before = digests(run / "step-000002")
    status = kill(proc, signal.SIGKILL)
    after_kill = {
        "status": status, "latest": (run / "latest").read_text().strip(), "partial": partial,
        "partial_files": sorted(p.name for p in partial.iterdir()), "previous_before": before,
        "previous_after": digests(run / "step-000002"), "folders": sorted(p.name for p in run.iterdir()),
    }
    model, _ = ckpt.load_model(run)  # the previous checkpoint loads ...
    state = ckpt.load_training_state(run)  # ... and can be resumed
    after_kill.update(loaded_params=sum(p.numel() for p in model.parameters()), resumable_step=state.trainer_state["step"])
    resumed = run_cli([*train_args(corpus, run), "--resume"])
    return run, after_kill, resumed


def test_training_killed_mid_checkpoint_keeps_the_previous_one(killed_training):
    run, seen, _ = killed_training
    assert seen["status"] == -signal.SIGKILL
    assert seen["latest"] == "step-000002"
    assert "step-000004" not in seen["folders"]
    # The kill landed mid-write: the temporary folder holds part of checkpoint 4.
    assert seen["partial"].name.startswith(".step-000004.") and seen["partial"].parent == run
    assert "model.safetensors" in seen["partial_files"] and ckpt.TRAINING_STATE_FILE not in seen["partial_files"]
    assert seen["previous_after"] == seen["previous_before"]  # byte-for-byte
    assert sorted(seen["previous_after"]) == sorted(ckpt.CHECKPOINT_FILES)
    assert seen["resumable_step"] == 2 and seen["loaded_params"] > 0


def test_resume_continues_after_the_kill(killed_training, figures):
    run, seen, resumed = killed_training
    assert resumed.rc == 0, resumed.err
    assert (run / "latest").read_text().strip() == f"step-{STEPS:06d}"
    state = ckpt.load_training_state(run)
    assert state.trainer_state["step"] == STEPS
    assert not list(run.glob(".step-*")), "the killed save's temporary folder was not cleaned up"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)), "metrics were duplicated by the resume"
    figures.record("nothing lost", "`onnxformer train` (real subprocess) paused while writing checkpoint 4 "
                   "(model.safetensors written, training state not yet), then SIGKILL", 1,
                   f"`latest` still names step-000002, its {len(seen['previous_after'])} files byte-for-byte "
                   f"intact, it loads and resumes; `--resume` trained steps 3-{STEPS} and wrote step-{STEPS:06d}; "
                   "the half-written folder was removed by the next save; metrics not duplicated")


def test_export_killed_at_every_stage_keeps_the_previous_package(killed_training, tmp_path, figures):
    run, _, _ = killed_training
    out = tmp_path / "package"
    args = ["export", str(run), str(out), "--skip-generation-check"]
    first = run_cli(args)
    assert first.rc == 0, first.err
    previous = digests(out)
    outcomes = []
    points = [("export:graphs", signal.SIGKILL), ("export:replace", signal.SIGTERM)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if exchange(tmp_path / "a", tmp_path / "b"):  # this file system swaps folders atomically
        points.append(("export:swapped", signal.SIGKILL))
    for point, sig in points:
        marker = tmp_path / f"marker-{point.split(':')[1]}"
        proc = start(point, marker, args)
        tmp = wait_for_pause(proc, marker)
        assert kill(proc, sig) == -sig
        assert tmp.is_dir() and tmp.parent == out.parent and tmp.name.startswith(".package.tmp-")
        if point == "export:swapped":  # the new package is in place, the previous one in the temporary folder
            assert digests(tmp) == previous
            rt.load(out)  # complete and verified
        else:
            assert digests(out) == previous, f"{point}: the previous package changed"
        model = rt.load(out)
        assert model.generate("the cat", max_new_tokens=3)[0].token_ids
        outcomes.append(f"{point.split(':')[1]} + {signal.Signals(sig).name}")
    last = run_cli(args)
    assert last.rc == 0, last.err
    leftovers = sorted(p.name for p in out.parent.glob(".package.*"))
    assert leftovers == [], f"not cleaned up: {leftovers}"
    rt.load(out)
    figures.record("nothing lost", "`onnxformer export` (real subprocess) over an existing package, killed: "
                   + ", ".join(outcomes) + " (graphs: after writing the graphs; replace: the new package complete "
                   "but not in place; swapped: right after the atomic exchange)", len(outcomes),
                   "every time OUT_DIR held a complete package that verifies and generates (the previous one "
                   f"byte-for-byte, or the new one after the exchange); the next export removed the {len(outcomes)} "
                   "leftover temporary folders")
