"""Damaged and hostile training checkpoints: loading, resuming and exporting one gives a
CheckpointError (code E_CHECKPOINT; `onnxformer export` and `train --resume` print
`error[E_CHECKPOINT]: ...` and exit 2) that names the file, and a `latest` pointer can only name
a folder of its own run directory."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch", reason="checkpoints need the [train] extra")

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.runtime.errors import CheckpointError  # noqa: E402
from reliability_support import run_cli  # noqa: E402

# (case id, file in the latest checkpoint, new content, message pattern)
DAMAGE = [
    ("config.json not JSON", ckpt.CONFIG_FILE, b"{oops", "config.json is not valid JSON"),
    ("config.json a list", ckpt.CONFIG_FILE, b"[1]", "config.json is not a valid model config"),
    ("config.json wrong types", ckpt.CONFIG_FILE, None, "config.json is not a valid model config"),
    ("config.json unknown field", ckpt.CONFIG_FILE, "extra", "unknown model config fields: surprise"),
    ("model.safetensors garbage", ckpt.MODEL_FILE, b"\x00" * 64, "model.safetensors is not a valid safetensors file"),
    ("model.safetensors truncated", ckpt.MODEL_FILE, "truncate", "model.safetensors is not a valid safetensors file"),
    ("model.safetensors empty", ckpt.MODEL_FILE, b"", "model.safetensors is not a valid safetensors file"),
]
RESUME_DAMAGE = [
    ("trainer_state.json not JSON", ckpt.TRAINER_STATE_FILE, b"\xff\xfe", "trainer_state.json is not valid JSON"),
    ("trainer_state.json without step", ckpt.TRAINER_STATE_FILE, "drop-step", "trainer_state.json lacks step"),
    ("training_state.safetensors garbage", ckpt.TRAINING_STATE_FILE, b"garbage", "not a valid safetensors file"),
]


def _damage(folder, name, content) -> None:
    path = folder / name
    if content is None:  # wrong types for real fields
        data = json.loads(path.read_text())
        data.update(d_model="wide", n_layers=[2])
        path.write_text(json.dumps(data))
    elif content == "extra":
        data = json.loads(path.read_text())
        data["surprise"] = 1
        path.write_text(json.dumps(data))
    elif content == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "drop-step":
        data = json.loads(path.read_text())
        del data["step"]
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("case", DAMAGE + RESUME_DAMAGE, ids=[c[0] for c in DAMAGE + RESUME_DAMAGE])
def test_damaged_checkpoint_names_the_file(trained_run, tmp_path, case):
    _, name, content, pattern = case
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _damage(ckpt.latest_checkpoint(run), name, content)
    if case in DAMAGE:
        with pytest.raises(CheckpointError, match=pattern) as excinfo:
            ckpt.load_model(run)
        assert excinfo.value.code == "E_CHECKPOINT"
        result = run_cli(["export", str(run), str(tmp_path / "package")])
        assert result.rc == 2 and result.err.startswith("error[E_CHECKPOINT]: ") and "Traceback" not in result.err
        assert pattern.split(" ")[0] in result.err
        assert not (tmp_path / "package").exists()
    if name != ckpt.MODEL_FILE:  # resuming reads everything else (and the weights through ckpt.load_file)
        with pytest.raises(CheckpointError, match=pattern):
            ckpt.load_training_state(run)
        result = run_cli(["train", "--arch", "decoder", "--task", "causal-lm", "--data", "unused.txt", "--out", str(run),
                          "--resume", "--no-progress"])
        assert result.rc == 2 and result.err.startswith("error[E_CHECKPOINT]: ") and "Traceback" not in result.err, result
        assert name in result.err


@pytest.mark.parametrize("pointer", ["../elsewhere/step-000002", "/tmp/step-000002", "..", "step-000002/../..",
                                     "\xff\xfe"])
def test_latest_pointer_cannot_leave_the_run_directory(trained_run, tmp_path, pointer):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    elsewhere = tmp_path / "elsewhere"  # a real checkpoint the pointer could reach
    shutil.copytree(ckpt.latest_checkpoint(run), elsewhere / "step-000002")
    (run / ckpt.LATEST).write_bytes(pointer.encode("utf-8", "surrogateescape") if pointer != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(CheckpointError, match="refused|not a text file"):
        ckpt.load_model(run)


def test_figures(figures):
    figures.record("security", "checkpoint `latest` pointer naming a folder "
                   "outside its run directory ('../x', an absolute path, '..', 'a/../..') or binary", 5,
                   "5 refused with CheckpointError; load_model never followed the pointer")
    figures.record("nothing lost", "damaged checkpoints: config.json (not JSON, a list, wrong types, unknown field), "
                   "model.safetensors (garbage, truncated, empty), trainer_state.json (not UTF-8, no step), "
                   "training_state.safetensors (garbage); load_model / load_training_state / `onnxformer export` / "
                   "`onnxformer train --resume`",
                   len(DAMAGE) + len(RESUME_DAMAGE),
                   f"{len(DAMAGE) + len(RESUME_DAMAGE)} CheckpointError naming the file; export and train --resume "
                   "exit 2 with a one-line error[E_CHECKPOINT] naming it; export writes nothing")
