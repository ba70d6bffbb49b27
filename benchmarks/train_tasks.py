"""Rerun the training benchmarks recorded in benchmarks/TRAINING.md.

Every benchmark is an `onnxformer train` command (run as a subprocess, timed from start to
exit, so the time includes Python and torch start-up, data generation, tokenizer training,
training, the final evaluation and the checkpoint). Results are read back from each run's
metrics.jsonl and checked against the targets of the training issue; a few checks
(LoRA merge, resume after a kill, DDP) run Python code on the checkpoints.

    python benchmarks/train_tasks.py                    # everything (about 6-8 minutes on 2 cores)
    python benchmarks/train_tasks.py --only seq2seq sft # a subset
    python benchmarks/train_tasks.py --out /tmp/bench   # where the runs go (default runs/bench)

Exit status 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "onnxformer.runtime.cli", "train"]


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    args: tuple[str, ...]
    targets: tuple[tuple[str, str, float], ...] = ()  # (metric, "<=" | ">=", value)
    needs: tuple[str, ...] = ()  # benchmarks whose runs this one starts from
    shows: tuple[str, ...] = ()  # further metrics to report (no target)
    extra: dict = field(default_factory=dict)


BENCHES = [
    Bench("classify", "encoder classifier from scratch, builtin:sentiment",
          ("--arch", "encoder", "--task", "classify", "--data", "builtin:sentiment"),
          targets=(("test/accuracy", ">=", 0.95),)),
    Bench("seq2seq", "encoder-decoder, number words -> digits, builtin:numbers",
          ("--arch", "encoder-decoder", "--task", "seq2seq", "--data", "builtin:numbers"),
          targets=(("test/exact_match", ">=", 0.90),)),
    Bench("sft", "decoder-only, prompt -> continuation, builtin:numbers",
          ("--arch", "decoder", "--task", "sft", "--data", "builtin:numbers"),
          targets=(("test/exact_match", ">=", 0.90),)),
    Bench("prefix-lm", "prefix-LM, prompt -> continuation, builtin:numbers",
          ("--arch", "prefix-lm", "--task", "prefix-lm", "--data", "builtin:numbers"),
          targets=(("test/exact_match", ">=", 0.90),)),
    Bench("causal-lm", "decoder causal-LM pretraining, builtin:corpus",
          ("--arch", "decoder", "--task", "causal-lm", "--data", "builtin:corpus"),
          targets=(("loss_ratio", "<=", 0.25),)),
    Bench("mlm", "encoder MLM pretraining, builtin:corpus",
          ("--arch", "encoder", "--task", "mlm", "--data", "builtin:corpus"),
          targets=(("loss_ratio", "<=", 0.5),)),
    Bench("mlm-nsp", "encoder MLM + next-sentence prediction, builtin:corpus",
          ("--arch", "encoder", "--task", "mlm", "--nsp", "--data", "builtin:corpus", "--steps", "1000"),
          targets=(("loss_ratio", "<=", 0.5),), shows=("test/nsp_accuracy",)),
    Bench("denoise", "encoder-decoder BART denoising, builtin:corpus",
          ("--arch", "encoder-decoder", "--task", "denoise", "--data", "builtin:corpus"),
          targets=(("loss_ratio", "<=", 0.25),)),
    Bench("mlm-sentiment", "encoder MLM on the sentiment texts (labels unused)",
          ("--arch", "encoder", "--task", "mlm", "--data", "builtin:sentiment"),
          targets=(("loss_ratio", "<=", 0.5),)),
    Bench("finetune", "classifier fine-tuned on the MLM checkpoint (fresh head, reused tokenizer)",
          ("--arch", "encoder", "--task", "classify", "--data", "builtin:sentiment", "--from-checkpoint", "{mlm-sentiment}",
           "--steps", "400"),
          targets=(("test/accuracy", ">=", 0.95),), needs=("mlm-sentiment",)),
    Bench("lora", "LoRA r=8 alpha=16 (q,k,v,o,up,down) + head on the MLM checkpoint",
          ("--arch", "encoder", "--task", "classify", "--data", "builtin:sentiment", "--from-checkpoint", "{mlm-sentiment}",
           "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj",
           "--lr", "1e-3", "--steps", "2000"),
          targets=(("merge_max_abs_diff", "<=", 1e-4), ("frozen_changed", "<=", 0)),
          shows=("test/accuracy", "trainable_share"), needs=("mlm-sentiment",)),
    Bench("bitfit", "BitFit (biases + head) on the MLM checkpoint",
          ("--arch", "encoder", "--task", "classify", "--data", "builtin:sentiment", "--from-checkpoint", "{mlm-sentiment}",
           "--bitfit", "--lr", "1e-2", "--steps", "2000"),
          targets=(("frozen_changed", "<=", 0),), shows=("test/accuracy", "trainable_share"), needs=("mlm-sentiment",)),
    Bench("resume", "seq2seq killed (SIGKILL) after its first checkpoint, then --resume",
          ("--arch", "encoder-decoder", "--task", "seq2seq", "--data", "builtin:numbers", "--steps", "400",
           "--save-every", "100", "--dropout", "0.1"),
          targets=(("resume_max_abs_diff", "<=", 0.0),)),
    Bench("seq2seq-bf16", "encoder-decoder with bfloat16 autocast on CPU, builtin:numbers",
          ("--arch", "encoder-decoder", "--task", "seq2seq", "--data", "builtin:numbers", "--bf16"),
          targets=(("test/exact_match", ">=", 0.90),)),
    Bench("ddp", "classifier under torchrun, 2 CPU processes (gloo), 2 x 16 = 32 per step",
          ("--arch", "encoder", "--task", "classify", "--data", "builtin:sentiment", "--batch-size", "16"),
          targets=(("test/accuracy", ">=", 0.95),), extra={"torchrun": 2}),
]


def command(bench: Bench, out: Path) -> list[str]:
    args = [a.format(**{n: str(out / n) for n in bench.needs}) if "{" in a else a for a in bench.args]
    base = CLI
    if bench.extra.get("torchrun"):
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(bench.extra["torchrun"]), "-m", "onnxformer.runtime.cli", "train"]
    return [*base, *args, "--out", str(out / bench.name), "--no-progress"]


def shown(cmd: list[str]) -> str:
    """The command as a reader would type it."""
    text = " ".join(cmd)
    text = text.replace(f"{sys.executable} -m onnxformer.runtime.cli train", "onnxformer train")
    return text.replace(f"{sys.executable} -m torch.distributed.run", "torchrun")


def read_metrics(run: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last_step = max(x["step"] for x in lines)
    metrics: dict[str, float] = {}
    for x in lines:
        if x["step"] == last_step and x["split"] in ("valid", "test"):
            metrics.update({f"{x['split']}/{k}": v for k, v in x.items() if k not in ("step", "split")})
    start = next(x for x in lines if x["step"] == 0 and x["split"] == "valid")
    metrics["start_loss"] = start["loss"]
    metrics["loss_ratio"] = metrics["valid/loss"] / start["loss"]
    train = [x for x in lines if x["split"] == "train"]
    metrics["tokens_per_s"] = sum(x["tokens_per_s"] for x in train) / len(train)
    return metrics


def peft_checks(run: Path, source: Path) -> dict[str, float]:
    """Frozen weights unchanged; LoRA: merged logits == unmerged logits."""
    import torch
    from safetensors.torch import load_file

    from onnxformer.modeling import checkpoint as ckpt
    from onnxformer.modeling.model import Transformer
    from onnxformer.modeling.peft import LoRAConfig, apply_lora

    final, base = ckpt.resolve_checkpoint(run), ckpt.resolve_checkpoint(source)
    state = json.loads((final / ckpt.TRAINER_STATE_FILE).read_text())["train_config"]
    before, after = load_file(str(base / ckpt.MODEL_FILE)), load_file(str(final / ckpt.MODEL_FILE))
    head = ("classifier.", "pooler.")
    if state["lora_rank"]:
        may_change = tuple(f"{t}.weight" for t in state["lora_targets"])
    else:
        may_change = (".bias",)
    frozen_changed = sum(
        1 for n, v in before.items() if not n.startswith(head) and not n.endswith(may_change) and not torch.equal(after[n], v)
    )
    counts = json.loads((final / ckpt.TRAINER_STATE_FILE).read_text())["parameters"]
    out = {"frozen_changed": float(frozen_changed), "trainable_share": counts["trainable"] / counts["total"],
           "changed_tensors": float(sum(1 for n, v in before.items() if not torch.equal(after[n], v)))}
    if state["lora_rank"]:
        merged, config = ckpt.load_model(final)
        unmerged = Transformer(config)
        apply_lora(unmerged, LoRAConfig(rank=state["lora_rank"], alpha=state["lora_alpha"], targets=tuple(state["lora_targets"])))
        tensors = load_file(str(final / ckpt.TRAINING_STATE_FILE))
        # The frozen base of every adapted projection is bit-identical to the source checkpoint.
        bases = {k[len("model/"):].replace(".base.", "."): v for k, v in tensors.items() if ".base." in k}
        out["frozen_changed"] += sum(1 for n, v in bases.items() if not torch.equal(before[n], v))
        unmerged.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=False)
        unmerged.eval()
        ids = torch.randint(5, config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = merged.classify(merged.encode(ids))
            b = unmerged.classify(unmerged.encode(ids))
        out["merge_max_abs_diff"] = float((a - b).abs().max())
    return out


def resume_check(bench: Bench, out: Path) -> tuple[dict[str, float], float]:
    """Uninterrupted run vs. a run killed after its first checkpoint and resumed."""
    from safetensors.torch import load_file

    full_cmd = command(bench, out)
    t0 = time.perf_counter()
    subprocess.run(full_cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    killed_dir = out / (bench.name + "-killed")
    killed_cmd = [a if a != str(out / bench.name) else str(killed_dir) for a in full_cmd]
    proc = subprocess.Popen(killed_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed_dir / "latest").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = (killed_dir / "latest").read_text().strip()
    subprocess.run([*killed_cmd, "--resume"], check=True, capture_output=True)
    a = load_file(str(out / bench.name / "step-000400" / "model.safetensors"))
    b = load_file(str(killed_dir / "step-000400" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    metrics = read_metrics(out / bench.name)
    metrics.update({"resume_max_abs_diff": diff, "killed_at_step": float(killed_at.split("-")[1])})
    return metrics, seconds


def check(metrics: dict[str, float], targets) -> list[str]:
    missed = []
    for name, op, value in targets:
        got = metrics.get(name)
        if got is None or not (got <= value if op == "<=" else got >= value):
            missed.append(f"{name} {op} {value} (got {got})")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="folder for the runs (replaced)")
    parser.add_argument("--only", nargs="*", help=f"benchmarks to run, from {' '.join(b.name for b in BENCHES)}")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    wanted = {b.name for b in chosen} | {n for b in chosen for n in b.needs}
    results = []
    for bench in (b for b in BENCHES if b.name in wanted):
        for leftover in (out / bench.name, out / (bench.name + "-killed")):
            shutil.rmtree(leftover, ignore_errors=True)
        cmd = command(bench, out)
        if bench.name == "resume":
            metrics, seconds = resume_check(bench, out)
        else:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{bench.name} failed: {shown(cmd)}")
            metrics = read_metrics(out / bench.name)
            if bench.name in ("lora", "bitfit"):
                metrics.update(peft_checks(out / bench.name, out / "mlm-sentiment"))
        missed = check(metrics, bench.targets)
        results.append({"name": bench.name, "what": bench.what, "command": shown(cmd), "seconds": round(seconds, 1),
                        "metrics": metrics, "missed": missed})
        status = "ok" if not missed else "MISSED " + "; ".join(missed)
        names = [k for k, _, _ in bench.targets] + list(bench.shows)
        key = ", ".join(f"{k}={metrics[k]:.4g}" for k in names if k in metrics)
        print(f"{bench.name:14s} {seconds:6.1f}s  {key}  [{status}]", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'}")
    return 1 if any(r["missed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
