"""Issue 14, training: nothing goes wrong quietly.

- a run directory is locked while a run writes to it (two real processes; a crashed holder's
  lock is taken over, and of several takers exactly one wins);
- divergence (NaN/inf loss or gradients) stops the run before the update, never saves
  non-finite weights, and the advice it prints (`--resume --lr X`, `--lr X`) works;
- export refuses non-finite weights up front;
- a full disk (a real tmpfs, or RLIMIT_FSIZE) at any training write is one E_DISK line that
  keeps the previous checkpoint, and `--resume` works once there is space;
- CLI messages for --out naming a file, --max-len 1, --vocab-size with --from-checkpoint and
  resuming a finished run name the option, and the fix they suggest works.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="training tests need torch")
from safetensors.torch import load_file  # noqa: E402

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling.data import load_builtin  # noqa: E402
from onnxformer.modeling.train import TaskModel, TrainConfig, train  # noqa: E402
from onnxformer.runtime import atomic  # noqa: E402
from onnxformer.runtime.errors import ExportError, TrainingError  # noqa: E402

from reliability_support import REPO, run_cli  # noqa: E402

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX processes, signals and rlimits")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    sentiment = load_builtin("sentiment")
    out = {}
    for split, rows in (("train", sentiment.train[:160]), ("valid", sentiment.valid[:12])):
        path = root / f"sentiment_{split}.jsonl"
        path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows), encoding="utf-8")
        out[split] = str(path)
    return out


def args(data, out: Path, *extra: str) -> list[str]:
    return ["train", "--arch", "encoder", "--task", "classify", "--data", data["train"], "--valid", data["valid"],
            "--out", str(out), "--vocab-size", "300", "--batch-size", "4", "--eval-examples", "12",
            "--no-progress", "--threads", "1", *extra]


def config(data, out: Path, **overrides) -> TrainConfig:
    kw = dict(arch="encoder", task="classify", data=data["train"], valid_data=data["valid"], out_dir=str(out),
              vocab_size=300, batch_size=4, eval_examples=12, progress=False, threads=1, steps=4)
    return TrainConfig(**{**kw, **overrides})


def cli(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """`onnxformer ARGV` as a real process."""
    return subprocess.run([sys.executable, "-m", "onnxformer.runtime.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=ENV, **kw)


def one_error_line(proc, code: str) -> str:
    """The process failed with exactly one `error[CODE]: ...` line and no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error[")]
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), proc.stderr[-2000:]
    return lines[0]


def finite_weights(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(folder / ckpt.MODEL_FILE).values())


def no_debris(run: Path) -> bool:
    return not [p.name for p in run.iterdir() if p.name.startswith(".")]


# --- the run directory's lock ----------------------------------------------------------------


def _paused_run(data, out: Path, marker: Path, step: int = 2) -> subprocess.Popen:
    """`onnxformer train` into `out`, paused (holding the lock) while saving checkpoint `step`."""
    argv = [sys.executable, str(REPO / "tests" / "reliability" / "interrupt.py"), f"checkpoint:{step}", str(marker),
            *args(data, out, "--steps", "4", "--save-every", "2")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the paused run never reached its pause point"
        time.sleep(0.1)
    return proc


@POSIX
def test_a_second_run_into_a_locked_out_is_refused_with_the_holders_pid(data, tmp_path):
    run = tmp_path / "run"
    holder = _paused_run(data, run, tmp_path / "marker")
    try:
        before = (run / "metrics.jsonl").read_text()
        second = cli(args(data, run, "--steps", "4"))
        line = one_error_line(second, "E_LOCKED")
        assert f"process {holder.pid} on " in line and str(run) in line and "pass another --out" in line
        assert (run / "metrics.jsonl").read_text() == before  # the second run wrote nothing there
        # The advice: another --out works while the first run goes on.
        other = cli(args(data, tmp_path / "other", "--steps", "2"))
        assert other.returncode == 0, other.stderr[-2000:]
    finally:
        holder.kill()  # a crash: the lock file stays behind, naming a dead process
        holder.wait()
    assert (run / atomic.LOCK_FILE).read_text().split()[0] == str(holder.pid)
    # The advice's other half: once the holder is gone, the directory is usable again.
    third = cli(args(data, run, "--steps", "4", "--save-every", "2"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the lock of process" in third.stderr
    assert ckpt.latest_checkpoint(run) == run / "step-000004" and not (run / atomic.LOCK_FILE).exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(0) == 1  # one run's lines, not two interleaved


# Tries to take the stale lock of argv[1] at the wall-clock time argv[2]; holds it 1.5 s if it wins.
TAKER = """
import sys, time
from pathlib import Path
from onnxformer.runtime import atomic
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    with atomic.lock_dir(folder):
        print("won", flush=True)
        time.sleep(1.5)
except atomic.FolderLocked as err:
    print("refused", err.holder, flush=True)
"""


@POSIX
def test_of_several_processes_taking_over_a_stale_lock_exactly_one_wins(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / atomic.LOCK_FILE).write_text(f"{dead.stdout.strip()} on {socket.gethostname()}\n")  # a crash's
    for attempt in range(3):
        start = time.time() + 2.0
        takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                                   text=True, env=ENV) for _ in range(4)]
        outcomes = [p.communicate(timeout=60)[0].split() for p in takers]
        assert [o[0] for o in outcomes].count("won") == 1, outcomes
        assert all(o[1] in {str(p.pid) for p in takers} for o in outcomes if o[0] == "refused"), outcomes
        assert not (tmp_path / atomic.LOCK_FILE).exists()  # the winner released it


def test_the_lock_is_released_when_the_run_fails(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError):
        train(config(data, run, lr=1e30, steps=3))
    assert not (run / atomic.LOCK_FILE).exists()
    assert train(config(data, run, steps=2)).step == 2  # not refused as locked


# --- divergence -------------------------------------------------------------------------------


def _nan_gradients_at(monkeypatch, step: int) -> None:
    """Forward passes of step `step` add sqrt(0 * w): the loss stays finite, the gradient is NaN."""
    real, calls = TaskModel.forward, {"n": 0}

    def forward(self, batch):
        out = real(self, batch)
        calls["n"] += self.training  # training forwards only (one per step here)
        if calls["n"] == step and self.training:
            weight = next(self.parameters())
            return out._replace(loss=out.loss + torch.sqrt(weight.sum() * 0.0))
        return out

    monkeypatch.setattr(TaskModel, "forward", forward)


def test_nan_gradients_stop_the_run_and_the_advice_resumes_it(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_gradients_at(monkeypatch, step=3)
    with pytest.raises(TrainingError) as err:
        train(config(data, run, steps=5, save_every=1, keep_checkpoints=0, eval_every=100))
    message = str(err.value)
    assert err.value.code == "E_NOT_FINITE"
    assert re.match(r"the training gradient norm is nan \(loss [0-9.]+\) at step 3 ", message), message
    assert ckpt.latest_checkpoint(run) == run / "step-000002" and finite_weights(run / "step-000002")
    assert not (run / "step-000003").exists() and no_debris(run)
    lr = float(re.search(r"--resume --lr (\S+)", message)[1])
    assert str(run / "step-000002") in message
    monkeypatch.undo()
    result = train(config(data, run, steps=5, save_every=1, keep_checkpoints=0, eval_every=100, resume=True, lr=lr))
    assert result.step == 5 and finite_weights(result.checkpoint)
    assert json.loads((result.checkpoint / ckpt.TRAINER_STATE_FILE).read_text())["train_config"]["lr"] == lr


def test_a_huge_lr_stops_the_cli_and_its_advice_trains(data, tmp_path):
    run = tmp_path / "run"
    diverged = run_cli(args(data, run, "--lr", "1e6", "--steps", "6"))  # the case
    assert diverged.rc == 2, diverged
    line = diverged.err.strip().splitlines()[-1]
    assert re.match(r"error\[E_NOT_FINITE\]: the training (loss|gradient norm) is (nan|inf).* at step \d ", line), line
    assert ckpt.latest_checkpoint(run) is None  # nothing non-finite saved
    lr = re.search(r"start again with a lower --lr \(peak now 1e\+06\), e\.g\. --lr (\S+)", line)[1]
    shutil.rmtree(run)
    again = run_cli(args(data, run, "--lr", lr, "--steps", "6"))
    assert again.rc == 0, again
    assert finite_weights(ckpt.latest_checkpoint(run))


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    from onnxformer.modeling import train as train_module

    real = train_module._optimizer_step

    def poisoned(run, trained, step, lr):  # the update of step 3 overflows one weight
        out = real(run, trained, step, lr)
        if step == 2:
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(train_module, "_optimizer_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"weights are not finite .* after step 3, .* not saved") as err:
        train(config(data, run, steps=5, save_every=1, keep_checkpoints=0, eval_every=100))
    assert err.value.code == "E_NOT_FINITE"
    assert ckpt.latest_checkpoint(run) == run / "step-000002" and finite_weights(run / "step-000002")
    assert not (run / "step-000003").exists() and no_debris(run)


@pytest.mark.parametrize("lr", [1e39, float("inf"), float("nan"), 0.0])
def test_an_lr_torch_cannot_use_is_refused_before_anything_is_created(data, tmp_path, lr):
    with pytest.raises(ValueError, match=r"lr must be > 0 and below 3\.4e\+37 .* got") as err:
        train(config(data, tmp_path / "run", lr=lr))  # 1e39 made AdamW raise a bare RuntimeError
    assert err.value.code == "E_CONFIG" and not (tmp_path / "run").exists()


def test_export_refuses_non_finite_weights_and_an_earlier_checkpoint_exports(data, tmp_path):
    from onnxformer.export.exporter import export_checkpoint

    run = tmp_path / "run"
    train(config(data, run, steps=2, save_every=1, keep_checkpoints=0))
    # A checkpoint written (through save_checkpoint, as a trainer without the guard would) with a NaN weight.
    state = ckpt.load_training_state(run)
    model, model_config = ckpt.load_model(run)
    tensors = ckpt.plain_state_dict(model)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    ckpt.save_checkpoint(run, 3, ckpt.CheckpointFiles(model_config, tensors, (state.folder / ckpt.TOKENIZER_FILE).read_text(),
                                                       state.trainer_state, state.tensors))
    with pytest.raises(ExportError, match=r"weights are NaN or infinite in 1 tensors .*export an earlier checkpoint") as err:
        export_checkpoint(run, tmp_path / "pkg")
    assert err.value.code == "E_NOT_FINITE" and not (tmp_path / "pkg").exists()
    printed = run_cli(["export", str(run), str(tmp_path / "pkg")])
    assert printed.rc == 2 and "error[E_NOT_FINITE]" in printed.err and "NaN" in printed.err, printed
    # The advice: the earlier checkpoint exports.
    report = export_checkpoint(run / "step-000001", tmp_path / "pkg")
    assert (report.path / "manifest.json").is_file()


# --- a full disk ------------------------------------------------------------------------------


def _tmpfs(mount: Path, size: int) -> None:
    mount.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the RLIMIT_FSIZE tests cover the same writes")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@POSIX
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_keeps_the_last_checkpoint_and_resume_works_after_freeing_space(data, tmp_path):
    # How big one checkpoint is, measured on an ordinary disk.
    probe = train(config(data, tmp_path / "probe", steps=2, save_every=0)).checkpoint
    size = _folder_bytes(probe)
    mount = tmp_path / "small-disk"
    _tmpfs(mount, int(size * 1.6) + 64 * 1024)  # one checkpoint fits, a second one does not
    try:
        run = mount / "run"
        full = cli(args(data, run, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "0"))
        line = one_error_line(full, "E_DISK")
        assert "No space left on device" in line and str(run) in line and "free disk space or pass a writable --out" in line
        assert ckpt.latest_checkpoint(run) == run / "step-000002" and finite_weights(run / "step-000002")
        assert sorted(p.name for p in run.iterdir()) == ["cache", "latest", "metrics.jsonl", "step-000002"]  # no debris
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)  # whole lines only
        # Free space, then resume: it continues from step 2 and finishes.
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(mount)], check=True)
        resumed = cli(args(data, run, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--resume"))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "trained 4 steps" in resumed.stdout and ckpt.latest_checkpoint(run) == run / "step-000004"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


@POSIX
def test_a_write_limit_at_the_checkpoint_is_one_clear_error_and_another_out_trains(data, tmp_path):
    run = tmp_path / "run"
    limited = cli(args(data, run, "--steps", "2"), preexec_fn=_limited(64 * 1024))  # model.safetensors is larger
    line = one_error_line(limited, "E_DISK")
    assert "File too large" in line and "model.safetensors" in line and "pass a writable --out" in line
    assert sorted(p.name for p in run.iterdir()) == ["cache", "metrics.jsonl"]  # no checkpoint, no half-written folder
    again = cli(args(data, tmp_path / "elsewhere", "--steps", "2"))  # the advice, without the limit
    assert again.returncode == 0, again.stderr[-2000:]


# Appends a metrics line to argv[1] with the file limited to its size + 10 bytes.
APPEND = """
import resource, signal, sys
from pathlib import Path
from onnxformer.modeling.train import _append_metrics
from onnxformer.runtime.errors import CheckpointError
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    _append_metrics(path, {"step": 7, "split": "train", "loss": 1.25, "note": "x" * 100})
except CheckpointError as err:
    print(err.code, err)
"""


@POSIX
def test_a_metrics_line_that_does_not_fit_is_cut_back_off(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "split": "valid", "loss": 2.0}\n')
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", APPEND, str(path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.stdout.startswith("E_DISK ") and "free disk space" in done.stdout, done.stderr[-2000:]
    assert path.read_bytes() == before  # no half line left behind


def test_resume_drops_a_damaged_metrics_line(data, tmp_path):
    run = tmp_path / "run"
    train(config(data, run, steps=2, save_every=1, keep_checkpoints=0))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')  # cut short by a full disk or a kill
    result = train(config(data, run, steps=3, save_every=1, keep_checkpoints=0, resume=True))
    assert result.step == 3
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


# --- CLI messages -----------------------------------------------------------------------------


def test_out_naming_a_file_is_refused_and_a_directory_works(data, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    refused = run_cli(args(data, a_file, "--steps", "2"))
    assert refused.rc == 2 and "--out" in refused.err and "is a file, not a directory" in refused.err, refused
    assert "Errno" not in refused.err and a_file.read_text() == "keep me\n"
    assert run_cli(args(data, tmp_path / "run", "--steps", "2")).rc == 0


def test_max_len_1_names_the_option_creates_nothing_and_the_suggested_value_works(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--arch", "decoder", "--task", "sft", "--data", "builtin:numbers", "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--eval-examples", "8", "--no-progress", "--vocab-size", "300"]
    refused = run_cli(base + ["--max-len", "1"])
    assert refused.rc == 2 and "--max-len" in refused.err and "got 1" in refused.err, refused
    assert not out.exists()  # validated before anything was created
    value = re.search(r"pass --max-len (\d+)", refused.err)[1]
    assert run_cli(base + ["--max-len", value]).rc == 0


def test_vocab_size_with_from_checkpoint_is_refused_naming_both(data, tmp_path):
    source = tmp_path / "source"
    train(config(data, source, steps=2))
    argv = args(data, tmp_path / "tuned", "--steps", "2", "--from-checkpoint", str(source))  # includes --vocab-size 300
    refused = run_cli(argv)
    assert refused.rc == 2 and "--vocab-size" in refused.err and "--from-checkpoint" in refused.err, refused
    assert "drop --vocab-size" in refused.err and not (tmp_path / "tuned").exists()
    i = argv.index("--vocab-size")
    assert run_cli(argv[:i] + argv[i + 2:]).rc == 0  # the advice


def test_resuming_a_finished_run_says_so_and_how_to_train_further(data, tmp_path):
    run = tmp_path / "run"
    assert run_cli(args(data, run, "--steps", "2")).rc == 0
    again = run_cli(args(data, run, "--steps", "2", "--resume"))
    assert again.rc == 0 and "already finished at step 2" in again.out and "trained 2 steps" not in again.out, again.out
    further = re.search(r"--resume --steps (\d+)", again.out)[1]
    more = run_cli(args(data, run, "--resume", "--steps", further))
    assert more.rc == 0 and f"trained {further} steps" in more.out, more
    assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_name(int(further))


@POSIX
@pytest.mark.slow  # two torchrun processes
def test_under_torchrun_every_process_stops_when_the_run_dir_is_locked(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "onnxformer.runtime.cli", *args(data, run, "--steps", "2")]
    with atomic.lock_dir(run):  # this process holds it
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)  # no rank waits forever
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f'File "{REPO}' not in out, out[-4000:]  # torchrun's own report, no frame of ours
    assert f"error[E_LOCKED]: {run} is in use by another training run (process {os.getpid()} on" in out, out[-3000:]
    # Rank 1 stops too: with its own E_LOCKED line, or terminated by torchrun once rank 0 exited first.
    assert "error[E_LOCKED]: rank 0 could not lock the run directory" in out or "SIGTERM" in out, out[-3000:]
    assert list(run.iterdir()) == []  # nothing written (and this process released its lock)
