"""Large training files: peak memory and throughput of `onnxformer train` on big synthetic corpora.

Generates the corpora under --root (default /tmp/onnxformer-bench-data, reused when present),
then trains the tiny preset for a few steps on each with `onnxformer train` in a subprocess,
under `/usr/bin/time -v` (peak RSS of the training process, its children included). Read
back from the run: the token cache's build time (cache.json) and report, the training
tokens/s (metrics.jsonl). Results are printed as a Markdown table and written to
--root/results.json; benchmarks/TRAINING.md ("Issue 16: large files") records them.

    python benchmarks/bench_data.py                      # text-200mb and jsonl-200mb
    python benchmarks/bench_data.py --only text-1gb      # the 1 GB corpus (several minutes on 2 cores)
    python benchmarks/bench_data.py --steps 20 --only text-200mb

Cases:

- text-200mb, text-1gb: plain text, documents of 8-40 sentences separated by blank lines
  (a few hundred tokens each), causal-lm on a decoder with --max-len 128: every document is
  split into windows, so every token is trained on.
- jsonl-200mb: JSON Lines of {"text", "label"} rows (about 1.4 M rows, as in issue 16), classify
  on an encoder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "onnxformer.runtime.cli", "train"]
WORDS = ("the a tom anna ben mia cat dog bird fox ball apple bread milk red blue green small big old new "
         "gives eats sees finds holds likes runs jumps sleeps reads and then but so because after before "
         "in on under near with from to of one two three four five many some every no").split()
MB = 1_000_000


def _sentence_pool(rng: np.random.Generator, n: int = 50_000) -> list[str]:
    lengths = rng.integers(5, 16, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    out, at = [], 0
    for length in lengths:
        chosen = [WORDS[i] for i in words[at : at + length]]
        at += length
        out.append(" ".join(chosen).capitalize() + ".")
    return out


def write_text_corpus(path: Path, size: int, seed: int = 0) -> None:
    """Documents of 8-40 random sentences from a pool, separated by blank lines, until `size` bytes."""
    rng = np.random.default_rng(seed)
    pool = _sentence_pool(rng)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            counts = rng.integers(8, 41, 1000)
            picks = rng.integers(0, len(pool), int(counts.sum()))
            at, docs = 0, []
            for count in counts:
                docs.append(" ".join(pool[i] for i in picks[at : at + count]))
                at += count
            chunk = "\n\n".join(docs) + "\n\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    tmp.replace(path)


def write_jsonl_rows(path: Path, size: int, seed: int = 0) -> None:
    """{"text": 1-2 sentences, "label": one of 4} rows until `size` bytes."""
    rng = np.random.default_rng(seed)
    pool = _sentence_pool(rng)
    labels = ("world", "sports", "business", "science")
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            picks = rng.integers(0, len(pool), (10_000, 2))
            two = rng.random(10_000) < 0.5
            label = rng.integers(0, len(labels), 10_000)
            lines = [json.dumps({"text": pool[a] + (" " + pool[b] if t else ""), "label": labels[k]})
                     for (a, b), t, k in zip(picks, two, label)]
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    tmp.replace(path)


CASES = {
    "text-200mb": ("corpus-200mb.txt", 200 * MB, write_text_corpus, ("--arch", "decoder", "--task", "causal-lm")),
    "text-1gb": ("corpus-1gb.txt", 1000 * MB, write_text_corpus, ("--arch", "decoder", "--task", "causal-lm")),
    "jsonl-200mb": ("rows-200mb.jsonl", 200 * MB, write_jsonl_rows, ("--arch", "encoder", "--task", "classify")),
}


def _peak_rss_mb(stderr: str) -> float:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(match.group(1)) / 1024 if match else float("nan")


def run_case(name: str, root: Path, steps: int, batch_size: int) -> dict:
    filename, size, write, task_args = CASES[name]
    data = root / filename
    if not data.is_file():
        started = time.perf_counter()
        write(data, size)
        print(f"{name}: wrote {data} ({data.stat().st_size / MB:.0f} MB) in {time.perf_counter() - started:.0f}s",
              flush=True)
    out = root / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command = [*CLI, *task_args, "--data", str(data), "--out", str(out), "--steps", str(steps),
               "--batch-size", str(batch_size), "--max-len", "128", "--eval-examples", "256",
               "--eval-every", str(steps), "--no-progress", "-v"]
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    [cache] = [p for p in (out / "cache").iterdir() if p.is_dir()]
    meta = json.loads((cache / "cache.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [line["tokens_per_s"] for line in lines if line["split"] == "train"]
    report = meta["splits"]["train"]["report"]
    cache_bytes = sum(p.stat().st_size for p in cache.iterdir())
    tokenizer_line = next((line for line in proc.stderr.splitlines() if "tokenizer: trained on" in line), "")
    result = {
        "case": name, "file_mb": data.stat().st_size / MB, "peak_rss_mb": _peak_rss_mb(proc.stderr), "wall_s": wall,
        "cache_build_s": meta["build_s"], "cache_mb_per_s": data.stat().st_size / MB / meta["build_s"],
        "cache_mb": cache_bytes / MB, "train_examples": report["examples"], "train_rows": report["rows"],
        "train_tokens": report["tokens"], "tokens_used": report["used"],
        "valid_rows": meta["splits"].get("valid", {}).get("rows", 0),
        "train_tokens_per_s": sum(rates) / max(1, len(rates)), "steps": steps,
        "tokenizer_sample": tokenizer_line.split("tokenizer: ", 1)[-1] if tokenizer_line else "all texts",
        "command": " ".join(command[3:]),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/onnxformer-bench-data"))
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=["text-200mb", "jsonl-200mb"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep-runs", action="store_true", help="keep the run folders (and their token caches)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    results_file = args.root / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.only:
        results[name] = run_case(name, args.root, args.steps, args.batch_size)
        if not args.keep_runs:
            shutil.rmtree(args.root / f"run-{name}", ignore_errors=True)
        results_file.write_text(json.dumps(results, indent=1))
    print("\n| case | file | peak RSS | wall | cache build | cache | train rows (tokens, used) | train tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['case']} | {r['file_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['wall_s']:.0f} s | "
              f"{r['cache_build_s']:.0f} s ({r['cache_mb_per_s']:.1f} MB/s) | {r['cache_mb']:.0f} MB | "
              f"{r['train_rows']:,} ({r['train_tokens']:,}, {100 * r['tokens_used'] / r['train_tokens']:.0f}%) | "
              f"{r['train_tokens_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
