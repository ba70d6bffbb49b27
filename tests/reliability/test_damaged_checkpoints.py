"""Damaged and hostile training checkpoints: loading, resuming and exporting one gives a
CheckpointError (code E_CHECKPOINT; `onnxformer export` and `train --resume` print
`error[E_CHECKPOINT]: ...` and exit 2) that names the file, and a `latest` pointer can only name
a folder of its own run directory."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="checkpoints need the [train] extra")

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.runtime.errors import CODES, CheckpointError, OnnxformerError  # noqa: E402
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


# --- a generated corpus: random damage to the files load_model reads --------------------------
# Each case raises a CheckpointError with a code, or is provably fine: load_model gives the
# undamaged config and bitwise-equal weights. A silent success is a damaged checkpoint that
# loads with other weights or config (`onnxformer export` would ship it); checksums.json (the
# sha256 of each file, written last) is what refuses a changed weight byte that still parses.
CKPT_SEED, CKPT_CASES = 14, 60  # about 2 s


def _weights(folder):
    model, config = ckpt.load_model(folder)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    import torch

    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_generated_checkpoint_damage_corpus(trained_run, tmp_path, figures):
    rng = np.random.default_rng(CKPT_SEED)
    source = ckpt.latest_checkpoint(trained_run)
    expected = _weights(source)
    outcomes, codes, silent, leaks = collections.Counter(), collections.Counter(), [], []
    for case in range(CKPT_CASES):
        folder = tmp_path / f"case-{case}"
        shutil.copytree(source, folder)
        name = [ckpt.CONFIG_FILE, ckpt.MODEL_FILE, ckpt.MODEL_FILE, ckpt.CHECKSUMS_FILE][case % 4]
        path = folder / name
        data = bytearray(path.read_bytes())
        how = rng.choice(["flip", "char", "truncate", "append", "empty"])
        if how in ("flip", "char"):
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] = int(rng.integers(32, 127) if how == "char" else rng.integers(256))
        elif how == "truncate":
            data = data[: int(rng.integers(len(data)))]
        elif how == "append":
            data += b"\x00" * int(rng.integers(1, 32))
        else:
            data = bytearray()
        path.write_bytes(bytes(data))
        label = f"{name} {how}"
        try:
            got = _weights(folder)
        except OnnxformerError as err:
            assert err.code in CODES and err.code != "E_ONNXFORMER", (label, err.code)
            outcomes["error"] += 1
            codes[err.code] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            leaks.append(f"{label}: {type(err).__name__}: {err}")
            continue
        if _same(got, expected):
            outcomes["fine"] += 1
        else:
            silent.append(label)
        shutil.rmtree(folder)
    assert not leaks, "\n".join(leaks)
    assert not silent, f"damaged checkpoints that load with other weights or config: {silent}"
    assert outcomes["error"] + outcomes["fine"] == CKPT_CASES
    figures.record("damaged checkpoints (issue 14)", "generated corpus: random damage to config.json, "
                   "model.safetensors or checksums.json of a trained checkpoint (1-3 bytes changed, printable characters, truncated, "
                   "zero bytes appended, emptied); load_model", CKPT_CASES,
                   f"{outcomes['error']} CheckpointError with a code ({', '.join(f'{k} {v}' for k, v in codes.items())}), "
                   f"{outcomes['fine']} provably fine (the undamaged config and bitwise-equal weights); 0 raw foreign "
                   "exceptions, 0 silent successes (an earlier run before checksums.json: 12 of 60 loaded with other weights)")


def test_a_changed_weight_byte_is_refused(trained_run, tmp_path):
    """A changed weight byte still parses; the digest refuses it, and `onnxformer export` with it."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(ckpt.latest_checkpoint(trained_run), folder)
    path = folder / ckpt.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the low mantissa bits of the last weight: finite, slightly different
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256 in checksums.json"):
        ckpt.load_model(folder)
    result = run_cli(["export", str(folder), str(tmp_path / "package")])
    assert result.rc == 2 and result.err.startswith("error[E_CHECKPOINT]: ") and "sha256" in result.err
    assert not (tmp_path / "package").exists()
