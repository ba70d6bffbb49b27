"""The training loop, checkpoints, resume, fine-tuning, DDP and the `train` CLI.

Every run is a few steps of the tiny preset on small files cut from the built-in data, so
the whole module takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="training tests need the [train] extra (torch)")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling.data import load_builtin  # noqa: E402
from onnxformer.modeling.tasks import MLM_NSP, OBJECTIVES, objective_for  # noqa: E402
from onnxformer.modeling.train import (  # noqa: E402
    TASK_ARCHS,
    TASK_DATA_KINDS,
    TASK_DEFAULTS,
    TASKS,
    TrainConfig,
    learning_rate,
    sample_positions,
    train,
)
from onnxformer.runtime.errors import CheckpointError, ConfigError, TrainingError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --- small data files -----------------------------------------------------------------------


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    numbers, sentiment, corpus = load_builtin("numbers"), load_builtin("sentiment"), load_builtin("corpus")
    out = {}
    for name, data, fields in (("numbers", numbers, ("source", "target")), ("sentiment", sentiment, ("text", "label"))):
        out[name] = str(_jsonl(root / f"{name}.jsonl", [{f: getattr(e, f) for f in fields} for e in data.train[:160]]))
        out[name + "_valid"] = str(_jsonl(root / f"{name}_valid.jsonl", [{f: getattr(e, f) for f in fields} for e in data.valid[:12]]))
    text = root / "corpus.txt"
    text.write_text("\n\n".join(e.text for e in corpus.train[:120]) + "\n", encoding="utf-8")
    out["corpus"] = str(text)
    return out


DATA_OF = {"causal-lm": "corpus", "mlm": "corpus", "denoise": "corpus", "seq2seq": "numbers",
           "sft": "numbers", "prefix-lm": "numbers", "classify": "sentiment"}


def config(files, out: Path, task: str, arch: str | None = None, **overrides) -> TrainConfig:
    name = DATA_OF[task]
    kwargs = dict(
        arch=arch or TASK_ARCHS[task][0], task=task, data=files[name], valid_data=files.get(name + "_valid"),
        out_dir=str(out), steps=3, batch_size=4, vocab_size=300, eval_examples=12, progress=False, threads=1,
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


# --- configuration ------------------------------------------------------------------------


def test_train_config_validates_with_the_values_in_the_message(tmp_path):
    with pytest.raises(ValueError, match="task 'classify' trains arch 'encoder'; got arch 'decoder'"):
        TrainConfig(arch="decoder", task="classify", data="builtin:sentiment", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"warmup \(50\) must be smaller than steps \(10\)"):
        TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", steps=10, warmup=50)
    with pytest.raises(ValueError, match="LoRA.*or BitFit, not both"):
        TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", lora_rank=4, bitfit=True)
    with pytest.raises(ValueError, match="nsp adds next-sentence prediction to task 'mlm'"):
        TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", nsp=True)
    short = TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", steps=20)
    assert short.warmup == 2 and short.eval_every == 20  # defaults shrink with short runs


def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = TrainConfig(arch="decoder", task="causal-lm", data="x", out_dir="y", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_sample_positions_split_each_global_batch_across_ranks():
    c = TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", batch_size=4, grad_accum=2)
    single = TrainConfig(arch="encoder", task="classify", data="x", out_dir="y", batch_size=8, grad_accum=2)
    for step in range(3):
        for micro in range(2):
            r0, r1 = (sample_positions(step, micro, config=c, rank=r, world_size=2) for r in (0, 1))
            assert not set(r0) & set(r1)
            assert list(r0) + list(r1) == list(sample_positions(step, micro, config=single, rank=0, world_size=1))


# --- the objective registry -------------------------------------------------------------------


def test_every_task_is_one_registered_objective():
    assert tuple(OBJECTIVES) == TASKS
    for name, objective in OBJECTIVES.items():
        assert objective.name == name and objective_for(name) is objective
        assert (TASK_ARCHS[name], TASK_DATA_KINDS[name], TASK_DEFAULTS[name]) == (
            objective.archs, objective.data_kinds, objective.defaults)
    nsp = objective_for("mlm", nsp=True)
    assert nsp is MLM_NSP and nsp.redraws_each_epoch and nsp.name == "mlm" and nsp.loss is not OBJECTIVES["mlm"].loss
    with pytest.raises(ConfigError, match="nsp adds next-sentence prediction to task 'mlm'; got task 'sft'") as err:
        objective_for("sft", nsp=True)
    assert err.value.code == "E_CONFIG"


def test_the_trainer_never_names_a_task():
    """What differs between tasks lives in their Objective (modeling/tasks.py): no string
    constant in train.py's code is a task name, so nothing there branches on one."""
    tree = ast.parse((REPO / "modeling" / "train.py").read_text())
    named = [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in TASKS]
    assert not named, f"modeling/train.py names tasks at (line, task) {named}; put the difference in the Objective"


# --- every task -----------------------------------------------------------------------------

# (tasks that need a teacher train in tests/test_distill.py)
TASK_CASES = [(task, arch) for task in TASKS if not OBJECTIVES[task].needs_teacher
              for arch in TASK_ARCHS[task]] + [("mlm+nsp", "encoder")]


@pytest.mark.parametrize("task,arch", TASK_CASES, ids=[f"{t}-{a}" for t, a in TASK_CASES])
def test_every_task_trains_and_saves_a_loadable_checkpoint(files, tmp_path, task, arch):
    nsp = task == "mlm+nsp"
    task = task.removesuffix("+nsp")
    result = train(config(files, tmp_path / "run", task, arch, nsp=nsp))
    assert result.step == 3 and result.checkpoint == tmp_path / "run" / "step-000003"
    assert ckpt.latest_checkpoint(tmp_path / "run") == result.checkpoint
    assert sorted(p.name for p in result.checkpoint.iterdir()) == sorted(ckpt.CHECKPOINT_FILES)
    model, model_config = ckpt.load_model(tmp_path / "run")
    assert model_config.arch == arch and not model.training
    metric_keys = {"valid/loss"}
    metric_keys |= {"classify": {"valid/accuracy"}, "mlm": {"valid/perplexity"}}.get(task, {"valid/perplexity"})
    if task in ("seq2seq", "sft", "prefix-lm"):
        metric_keys.add("valid/exact_match")
    if nsp:
        metric_keys |= {"valid/nsp_accuracy", "valid/nsp_loss"}
        assert model_config.type_vocab_size == 2
    assert metric_keys <= set(result.metrics)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["split"] == "valid"  # the starting loss
    assert [line["step"] for line in lines if line["split"] == "train"] == [3]


def test_prefix_lm_pretrains_on_plain_text(files, tmp_path):
    result = train(config(files, tmp_path / "run", "prefix-lm", data=files["corpus"], valid_data=None))
    assert "valid/perplexity" in result.metrics and "valid/exact_match" not in result.metrics


# --- checkpoints --------------------------------------------------------------------------------

PICKLE_MAGIC = b"\x80"  # every pickle protocol >= 2 starts with PROTO (0x80)


def test_checkpoint_holds_only_safetensors_and_json(files, tmp_path):
    run = tmp_path / "run"
    train(config(files, run, "sft", "decoder", lora_rank=2))
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not data.startswith(PICKLE_MAGIC), f"{path} looks like a pickle"
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:  # parses as safetensors
                assert list(f.keys())
        elif path.name == "metrics.jsonl":
            [json.loads(line) for line in data.decode().splitlines()]
        elif path.name == ckpt.LATEST:
            assert data.decode().strip() == "step-000003"
        elif path.parent.parent == run / "cache" and path.suffix in (".i32", ".i64", ".u8"):
            pass  # the token cache: raw arrays (modeling/token_cache.py), its cache.json checked below
        else:
            assert path.suffix == ".json", f"unexpected file {path}"
            json.loads(data)
    for source in ("checkpoint.py", "train.py", "peft.py"):
        text = (REPO / "modeling" / source).read_text()
        for banned in ("import pickle", "torch.save(", "torch.load("):
            assert banned not in text, f"{banned} in modeling/{source}"


def test_tied_embeddings_are_stored_once_and_tied_after_loading(files, tmp_path):
    result = train(config(files, tmp_path / "run", "causal-lm", "decoder"))
    stored = load_file(str(result.checkpoint / ckpt.MODEL_FILE))
    assert "tok_emb.weight" in stored and "lm_head.weight" not in stored
    model, _ = ckpt.load_model(result.checkpoint)
    assert model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(model.tok_emb.weight.detach(), stored["tok_emb.weight"])
    tok = ckpt.tokenizer_path(tmp_path / "run")
    assert tok == result.checkpoint / "tokenizer.json"
    assert json.loads((result.checkpoint / "config.json").read_text())["eos_token_id"] == 2  # from the tokenizer


# Saves a checkpoint of the run in argv[1] as step 9 under a real fault (argv[2]):
#   disk-full  files may not grow past 4 KiB (RLIMIT_FSIZE): config.json is written, then
#              model.safetensors fails with the kernel's EFBIG, as on a full disk
#   power-cut  the process is SIGKILLed the moment `latest` is renamed into place (a Python
#              audit hook on os.rename): the new folder is published, the pointer not yet moved
FAULTY_SAVE = """
import os, resource, signal, sys
from pathlib import Path
from onnxformer.modeling import checkpoint as ckpt

run, fault = Path(sys.argv[1]), sys.argv[2]
state = ckpt.load_training_state(run)
model, model_config = ckpt.load_model(run)
files = ckpt.CheckpointFiles(model_config, ckpt.plain_state_dict(model),
                             (state.folder / ckpt.TOKENIZER_FILE).read_text(), state.trainer_state, state.tensors)
if fault == "disk-full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
else:
    def power_cut(event, args):
        if event == "os.rename" and Path(args[1]).name == ckpt.LATEST:
            os.kill(os.getpid(), signal.SIGKILL)
    sys.addaudithook(power_cut)
ckpt.save_checkpoint(run, 9, files)
"""


def _save_under_fault(run: Path, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULTY_SAVE, str(run), fault], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE and SIGKILL are POSIX")
def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(files, tmp_path):
    run = tmp_path / "run"
    first = train(config(files, run, "classify")).checkpoint
    before = _digests(first)

    disk_full = _save_under_fault(run, "disk-full")
    assert disk_full.returncode == 1 and "File too large" in disk_full.stderr, disk_full.stderr[-2000:]
    assert ckpt.latest_checkpoint(run) == first and _digests(first) == before
    assert sorted(p.name for p in run.iterdir()) == ["cache", "latest", "metrics.jsonl", "step-000003"]  # no debris

    power_cut = _save_under_fault(run, "power-cut")
    assert power_cut.returncode == -signal.SIGKILL, power_cut.stderr[-2000:]
    assert ckpt.latest_checkpoint(run) == first and _digests(first) == before
    assert (run / "step-000009" / ckpt.TRAINER_STATE_FILE).is_file()  # published, never pointed at

    # The next save of that step replaces the stale folder, then moves `latest`.
    state = ckpt.load_training_state(run)
    model, model_config = ckpt.load_model(run)
    files_ = ckpt.CheckpointFiles(model_config, ckpt.plain_state_dict(model), (first / ckpt.TOKENIZER_FILE).read_text(),
                                  state.trainer_state, state.tensors)
    assert ckpt.save_checkpoint(run, 9, files_) == ckpt.latest_checkpoint(run) == run / "step-000009"
    reloaded, _ = ckpt.load_model(run)
    torch.testing.assert_close(reloaded.classifier.weight, model.classifier.weight)


def test_a_loss_that_is_not_finite_stops_the_run(files, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"training loss is (nan|inf|-inf) at step 2 .* lower --lr") as err:
        train(config(files, run, "classify", lr=1e30, steps=4, save_every=1, keep_checkpoints=0))
    assert err.value.code == "E_NOT_FINITE"
    assert ckpt.latest_checkpoint(run) == run / "step-000001"  # the checkpoints before it stay


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        ckpt.load_model(tmp_path)


# --- resume ---------------------------------------------------------------------------------------

RESUME_CASES = {
    "mlm-nsp-dropout-accum": dict(task="mlm", nsp=True, dropout=0.1, grad_accum=2),
    "sft-lora-dropout": dict(task="sft", arch="decoder", lora_rank=4, lora_dropout=0.1, dropout=0.1),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_reproduces_the_uninterrupted_run(files, tmp_path, case):
    kw = dict(RESUME_CASES[case], steps=6, save_every=3, keep_checkpoints=0, log_every=1)
    full = tmp_path / "full"
    train(config(files, full, **kw))
    # The interrupted run: only what was on disk at step 3 survives.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "step-000003", part / "step-000003")
    (part / "latest").write_text("step-000003\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")  # includes lines after step 3: dropped on resume
    resumed = train(config(files, part, resume=True, **kw))
    assert resumed.step == 6
    a, b = load_file(str(full / "step-000006" / "model.safetensors")), load_file(str(part / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = load_file(str(full / "step-000006" / ckpt.TRAINING_STATE_FILE))
    sb = load_file(str(part / "step-000006" / ckpt.TRAINING_STATE_FILE))
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name

    def losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x["split"], x["loss"]) for x in lines]

    assert losses(full) == losses(part)


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_an_existing_run(files, tmp_path):
    run = tmp_path / "run"
    train(config(files, run, "classify"))
    with pytest.raises(ValueError, match=r"batch_size=4 \(now 8\)"):  # the data order depends on it
        train(config(files, run, "classify", resume=True, batch_size=8))
    with pytest.raises(CheckpointError, match="--resume"):
        train(config(files, run, "classify"))
    with pytest.raises(CheckpointError, match="drop --resume"):
        train(config(files, tmp_path / "empty", "classify", resume=True))


# --- fine-tuning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_run(files, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mlm") / "run"
    train(config(files, run, "mlm", data=files["sentiment"], valid_data=files["sentiment_valid"]))
    return run


def _body(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith(("classifier.", "pooler."))}


def test_classifier_fine_tunes_on_top_of_an_mlm_checkpoint(files, tmp_path, mlm_run):
    source = ckpt.resolve_checkpoint(mlm_run)
    result = train(config(files, tmp_path / "ft", "classify", from_checkpoint=str(mlm_run), lr=1e-9, weight_decay=0.0))
    cfg = json.loads((result.checkpoint / "config.json").read_text())
    assert cfg["num_labels"] == 2 and cfg["label_names"] == ["negative", "positive"]
    assert (result.checkpoint / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    before, after = load_file(str(source / "model.safetensors")), load_file(str(result.checkpoint / "model.safetensors"))
    assert "classifier.weight" in after and "classifier.weight" not in before  # a fresh head
    for name, value in _body(before).items():
        torch.testing.assert_close(after[name], value, atol=1e-6, rtol=0)  # the pretrained body was loaded


def test_lora_fine_tuning_changes_only_adapted_projections(files, tmp_path, mlm_run):
    source = ckpt.resolve_checkpoint(mlm_run)
    result = train(config(files, tmp_path / "lora", "classify", from_checkpoint=str(mlm_run),
                          lora_rank=4, lora_targets=("q_proj", "v_proj"), lr=1e-2))
    before, after = load_file(str(source / "model.safetensors")), load_file(str(result.checkpoint / "model.safetensors"))
    assert set(_body(after)) == set(_body(before))  # plain names: LoRA merged into the export
    changed = {n for n, v in _body(before).items() if not torch.equal(after[n], v)}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
    # The unmerged training state (for resume) holds the adapters and the untouched base.
    state = load_file(str(result.checkpoint / ckpt.TRAINING_STATE_FILE))
    base = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/") and ".base." in k}
    assert base and all(torch.equal(v, before[k.replace(".base.", ".")]) for k, v in base.items())
    assert any(k.endswith("lora_B") for k in state)


def test_bitfit_fine_tuning_changes_only_biases_and_the_head(files, tmp_path, mlm_run):
    source = ckpt.resolve_checkpoint(mlm_run)
    result = train(config(files, tmp_path / "bitfit", "classify", from_checkpoint=str(mlm_run), bitfit=True, lr=1e-2))
    before, after = load_file(str(source / "model.safetensors")), load_file(str(result.checkpoint / "model.safetensors"))
    changed = {n for n, v in _body(before).items() if not torch.equal(after[n], v)}
    assert changed and all(n.endswith(".bias") for n in changed), changed


def test_fine_tuning_checks_the_architecture(files, tmp_path, mlm_run):
    with pytest.raises(ValueError, match="holds a 'encoder' model but arch is 'decoder'"):
        train(config(files, tmp_path / "x", "sft", "decoder", from_checkpoint=str(mlm_run)))


# --- distributed ---------------------------------------------------------------------------------


def _cli_args(files, out: Path, batch_size: int) -> list[str]:
    return ["train", "--arch", "encoder", "--task", "classify", "--data", files["sentiment"],
            "--valid", files["sentiment_valid"], "--out", str(out), "--steps", "3", "--batch-size", str(batch_size),
            "--vocab-size", "300", "--eval-examples", "12", "--no-progress", "--threads", "1"]


@pytest.mark.slow  # two torchrun processes: 6.5 CPU seconds
def test_ddp_two_processes_train_on_different_shards(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "onnxformer.runtime.cli", *_cli_args(files, tmp_path / "ddp", 4)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained 3 steps") == 1  # rank 0 reports
    state = json.loads((tmp_path / "ddp" / "step-000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["samples_seen"] == 3 * 2 * 4
    # Two ranks x 4 examples with averaged gradients == one process with the 8-example global
    # batch: true only if the ranks took the two different halves of each global batch.
    from onnxformer.runtime.cli import main

    assert main(_cli_args(files, tmp_path / "single", 8)) == 0
    a = load_file(str(tmp_path / "ddp" / "step-000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "step-000003" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "onnxformer.runtime.cli", "train", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from onnxformer.modeling.cli import _FIELD_OF

    flag_of = {field: dest for dest, field in _FIELD_OF.items()}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + flag_of.get(f.name, f.name).replace("_", "-")
        assert flag in proc.stdout, f"{flag} (TrainConfig.{f.name}) missing from train --help"


def test_cli_module_is_torch_free_and_in_sync_with_the_trainer():
    code = "import sys, onnxformer.modeling.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    from onnxformer.modeling import cli, peft, train as train_module
    from onnxformer.modeling.config import ARCHITECTURES

    assert cli.TASKS == train_module.TASKS and cli.ARCHS == ARCHITECTURES
    assert cli.LORA_TARGETS == peft.LORA_TARGET_CHOICES


def test_cli_data_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n', encoding="utf-8")
    from onnxformer.runtime.cli import main

    rc = main(["train", "--arch", "encoder", "--task", "classify", "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "label" in err


def test_cli_rejects_a_task_for_the_wrong_data(files, tmp_path, capsys):
    from onnxformer.runtime.cli import main

    rc = main(["train", "--arch", "encoder-decoder", "--task", "seq2seq", "--data", files["corpus"],
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "task 'seq2seq' needs seq2seq data" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_nothing(files, tmp_path):
    run = tmp_path / "run"
    first = train(config(files, run, "classify"))
    metrics = (run / "metrics.jsonl").read_text()
    again = train(config(files, run, "classify", resume=True))
    assert again.checkpoint == first.checkpoint and again.step == 3
    assert again.metrics == pytest.approx(first.metrics)
    assert (run / "metrics.jsonl").read_text() == metrics
