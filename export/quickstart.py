"""`onnxformer quickstart`: the main job end to end, on built-in data.

For each architecture: train a tiny model on a built-in task, export it to a validated
package, then score the same held-out test split twice, in PyTorch (training's own
evaluation) and through the torch-free runtime, and print one table. `--artifacts DIR`
copies the packages there (that is how `artifacts/` is rebuilt).

Torch-free at import (the CLI lists it without torch); training imports torch in run().
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class Job(NamedTuple):
    arch: str
    task: str
    data: str
    metric: str  # "accuracy" | "exact_match"


JOBS = (
    Job("encoder", "classify", "builtin:sentiment", "accuracy"),
    Job("decoder", "sft", "builtin:numbers", "exact_match"),
    Job("prefix-lm", "prefix-lm", "builtin:numbers", "exact_match"),
    Job("encoder-decoder", "seq2seq", "builtin:numbers", "exact_match"),
)


@dataclass(frozen=True)
class RuntimeScore:
    metric: float
    examples: int
    throughput: float  # generated tokens/s, or sequences/s for classification
    unit: str


def score_package(package: str | Path, job: Job, *, limit: int | None = None, batch_size: int = 64) -> RuntimeScore:
    """Score a package on the job's test split with the runtime only (no torch)."""
    from onnxformer.modeling.data import format_prompt, load_task_data, parse_continuation
    import onnxformer.runtime as rt

    model = rt.load(package)
    test = list(load_task_data(job.data).test)[: limit or None]
    start = time.perf_counter()
    if job.metric == "accuracy":
        results = model.classify([e.text for e in test], batch_size=batch_size)
        hits = sum(r.label == e.label for r, e in zip(results, test))
        elapsed = time.perf_counter() - start
        return RuntimeScore(hits / len(test), len(test), len(test) / elapsed, "seq/s")
    # As a user calls it: the source text as it is, in the package's prompt format (the runtime
    # applies it), with the package's generation defaults, the answer as returned.
    prompts, parse = [e.source for e in test], (lambda text: text)
    if model.prompt_format is None and job.arch != "encoder-decoder":
        # a package exported before prompt_format existed: its users must format prompts themselves
        logging.getLogger(__name__).warning("%s has no prompt_format (exported before it existed); scoring with "
                                            "prompts formatted here. Re-export it", package)
        prompts, parse = [format_prompt(p) for p in prompts], parse_continuation
    hits, tokens = 0, 0
    for i in range(0, len(test), batch_size):
        out = model.generate(prompts[i:i + batch_size])
        for g, e in zip(out, test[i:i + batch_size]):
            hits += parse(g.text) == e.target
            tokens += len(g.token_ids[0])
    elapsed = time.perf_counter() - start
    return RuntimeScore(hits / len(test), len(test), tokens / elapsed, "tok/s")


def package_megabytes(package: Path) -> float:
    return sum(p.stat().st_size for p in package.iterdir() if p.is_file()) / 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="working directory: runs and packages (default runs/quickstart)")
    parser.add_argument("--arch", action="append", choices=[j.arch for j in JOBS], default=None,
                        help="only these architectures (repeatable; default all four)")
    parser.add_argument("--artifacts", default=None, metavar="DIR",
                        help="also copy each package to DIR/<arch> (rebuilds the committed artifacts/)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every task's default training steps (e.g. 0.1 for a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the results table as JSON")


def run(args: argparse.Namespace) -> int:
    from onnxformer.modeling.train import TASK_DEFAULTS, TrainConfig, train

    from .exporter import export_checkpoint

    out = Path(args.out)
    jobs = [j for j in JOBS if args.arch is None or j.arch in args.arch]
    rows = []
    for n, job in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job.arch}: {job.task} on {job.data}", flush=True)
        steps = max(10, round(TASK_DEFAULTS[job.task].steps * args.steps_scale))
        run_dir = out / job.arch / "run"
        if run_dir.exists():  # quickstart's own scratch run: start fresh every time
            shutil.rmtree(run_dir)
        started = time.perf_counter()
        result = train(TrainConfig(arch=job.arch, task=job.task, data=job.data, out_dir=str(run_dir),
                                   steps=steps, seed=args.seed, progress=not args.no_progress))
        train_s = time.perf_counter() - started
        print("      exporting and validating ...", flush=True)
        report = export_checkpoint(result.checkpoint, out / job.arch / "package")
        score = score_package(report.path, job)
        figures = report.validation["float32"]
        rows.append({
            "arch": job.arch, "task": job.task, "metric": job.metric,
            "pytorch": result.metrics[f"test/{job.metric}"], "runtime": score.metric,
            "examples": score.examples, "throughput": round(score.throughput, 1), "unit": score.unit,
            "package_mb": round(package_megabytes(report.path), 2), "train_s": round(train_s, 1),
            "max_abs_diff": figures["worst_abs_diff"], "steps": steps,
        })
        if args.artifacts:
            target = Path(args.artifacts) / job.arch
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(report.path, target)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print()
        print(f"{'arch':16s} {'task':10s} {'metric':12s} {'PyTorch':>8s} {'runtime':>8s} {'package':>9s} "
              f"{'speed':>12s} {'train':>7s} {'|onnx-torch|':>12s}")
        for r in rows:
            print(f"{r['arch']:16s} {r['task']:10s} {r['metric']:12s} {r['pytorch']:8.1%} {r['runtime']:8.1%} "
                  f"{r['package_mb']:7.2f}MB {r['throughput']:8.0f} {r['unit']:5s} {r['train_s']:6.0f}s "
                  f"{r['max_abs_diff']:12.1e}")
    disagree = [r["arch"] for r in rows if abs(r["pytorch"] - r["runtime"]) > 1e-9]
    if disagree:
        print(f"\nPyTorch and the runtime disagree for: {', '.join(disagree)}")
        return 1
    return 0
