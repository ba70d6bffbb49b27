"""Timing, process and reporting helpers shared by every benchmark script.

Every engine runs in its own process (the peers in their own virtual environments) and
writes one JSON document, {"rows": [...], "tokens": {...}, "meta": {...}}, which the parent
merges. This module is imported by the main environment and by the peer scripts alike, so
it imports only the standard library at module level (numpy, onnxruntime and torch inside
the functions that need them).

The keys of a row:

    batch                  rows per call
    prefill_ms             prompt processing + the first token (generation cases)
    decode_ms_per_step     the other new tokens, per step (see decode_figures)
    decode_tok_s           batch * (new tokens - 1) / decode time
    ms_per_batch, seq_s    classifier
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
DEFAULT_WORK_DIR = BENCH_DIR / ".work"
PEER_VENVS = {"optimum": REPO / ".venv-bench-optimum", "genai": REPO / ".venv-bench-genai"}


# --------------------------------------------------------------------------------------------
# Settings: how long each measurement runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Repeats and sizes of one run; `--quick` shrinks them for a smoke run."""

    rounds: int = 2  # round-robin passes over the engines; the best round per row is kept
    warmup: int = 1  # untimed calls before the timed ones
    repeats: int = 3  # timed calls per round; the median is reported
    decoder_new_tokens: int = 128
    encdec_new_tokens: int = 64
    cold_start_runs: int = 3
    floor_repeats: int = 50
    threads: int | None = None  # intra-op threads of every engine (suite: nproc); None = engine default

    @classmethod
    def quick(cls, **changes: Any) -> "Settings":
        smoke = dict(rounds=1, warmup=1, repeats=2, decoder_new_tokens=16, encdec_new_tokens=8,
                     cold_start_runs=1, floor_repeats=10)
        return cls(**{**smoke, **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Wall-clock seconds of repeated calls."""

    median: float
    min: float
    max: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int) -> tuple[Stats, Any]:
    """Call fn `warmup` times untimed, then `repeats` times timed; (stats, last result).

    The garbage collector is run before, and disabled during, each timed call.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return Stats(statistics.median(times), min(times), max(times), len(times)), result


def decode_figures(batch: int, new_tokens: int, first: list[float], full: list[float]) -> dict[str, Any]:
    """Prefill and decode figures from paired end-to-end timings of the same call.

    first[i] generates 1 token (prompt processing + the first token) and full[i] generates
    `new_tokens`, run back to back, so a change of machine load hits both of a pair. The
    decode phase is the other new_tokens - 1 steps:
        decode time = median_i(full[i] - first[i])
        decode tok/s = batch * (new_tokens - 1) / decode time
    Engines whose API exposes the phases (genai) time them directly with the same meaning.
    A non-positive decode time (noise larger than the signal) is reported as None.
    """
    steps = new_tokens - 1
    decode_s = statistics.median(b - a for a, b in zip(first, full))
    valid = decode_s > 0 and steps > 0
    return {
        "prefill_ms": statistics.median(first) * 1e3,
        "decode_ms_per_step": decode_s / steps * 1e3 if valid else None,
        "decode_tok_s": batch * steps / decode_s if valid else None,
        "total_ms": statistics.median(full) * 1e3,
        "total_tok_s": batch * new_tokens / statistics.median(full),
        "prefill_spread_ms": [min(first) * 1e3, max(first) * 1e3],
        "total_spread_ms": [min(full) * 1e3, max(full) * 1e3],
        "repeats": len(full),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other jobs on the machine distort the figures)."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB).

    /proc/self/status VmHWM where it exists: getrusage's ru_maxrss of a child started with
    fork + exec can report the parent's peak instead of the child's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(packages: Iterable[str]) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def peer_python(venv: str) -> Path | None:
    """The interpreter of a peer environment made by setup_peers.sh, or None if absent."""
    exe = PEER_VENVS[venv] / "bin" / "python"
    return exe if exe.is_file() else None


def run_child(argv: Sequence[str | os.PathLike], out: Path, *, timeout: float, label: str) -> dict[str, Any]:
    """Run one benchmark process that writes a JSON document to `out`; return it.

    A failure is returned as {"error": ...} with the tail of the process output, never raised:
    one broken peer must not cost the other figures.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{label}: timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        return {"error": f"{label}: exit code {proc.returncode}\n{tail}"}
    data = json.loads(out.read_text())
    data.setdefault("wall_s", wall)
    return data


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def dir_size_mb(path: Path, pattern: str = "*") -> float:
    """Total size of the files under `path` matching `pattern` (MiB)."""
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file()) / 2**20


# --------------------------------------------------------------------------------------------
# Token checks and tables
# --------------------------------------------------------------------------------------------


def compare_tokens(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Exact comparison of greedy sequences: equal rows, and where the first difference is."""
    rows = len(reference)
    equal = sum(list(a) == list(b) for a, b in zip(reference, other))
    first = None
    for r, (a, b) in enumerate(zip(reference, other)):
        for t, (x, y) in enumerate(zip(a, b)):
            if x != y:
                if first is None or t < first[1]:
                    first = (r, t)
                break
    same = sum(x == y for a, b in zip(reference, other) for x, y in zip(a, b))
    total = sum(max(len(a), len(b)) for a, b in zip(reference, other))
    return {
        "rows_equal": equal,
        "rows": rows,
        "token_agreement": same / max(total, 1),
        "first_difference": None if first is None else {"row": first[0], "step": first[1]},
        "equal": equal == rows and len(reference) == len(other),
    }


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a markdown table; `columns` is [(key, header)]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def child_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a benchmark child process: `--job JOB.json --out OUT.json`.

    The job document carries the case directory, the engine and the settings; the child
    writes {"rows": [...], "tokens": {...}, "meta": {...}} to OUT.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    job = read_json(args.job)
    result = run(job)
    result.setdefault("meta", {})
    result["meta"].update(load_average_end=load_average(), peak_rss_mb=peak_rss_mb())
    write_json(args.out, result)


def log(message: str) -> None:
    """Progress on stderr (the CLIs print their tables on stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measurements shared by several engines (numpy / onnxruntime imported lazily)
# --------------------------------------------------------------------------------------------


def classification_result(stats: Stats, logits: Any, seq_len: int) -> dict[str, Any]:
    """One batch's classification figures from `measure`; logits (B, num_labels), numpy or torch."""
    batch = len(logits)
    return {
        "rows": [{"batch": batch, "seq_len": seq_len, "ms_per_batch": stats.median * 1e3,
                  "seq_s": batch / stats.median, "spread_ms": [stats.min * 1e3, stats.max * 1e3]}],
        "labels": logits.argmax(-1).tolist(),
        "logits": logits.tolist(),
    }


def time_generation(generate: Callable[[int], list[list[int]]], batch: int, new_tokens: int,
                    settings: Settings) -> tuple[dict[str, Any], list[list[int]]]:
    """Decoder figures of one engine at one batch size: `generate(n)` runs greedy generation of
    n new tokens on the batch's prompts and returns the generated ids per row. Calls of 1 and
    of `new_tokens` tokens alternate (see decode_figures)."""
    for _ in range(settings.warmup):
        generate(1)
        tokens = generate(new_tokens)
    first, full = [], []
    for _ in range(settings.repeats):
        one, _ = measure(lambda: generate(1), warmup=0, repeats=1)
        all_, tokens = measure(lambda: generate(new_tokens), warmup=0, repeats=1)
        first.append(one.median)
        full.append(all_.median)
    return decode_figures(batch, new_tokens, first, full), [list(map(int, row)) for row in tokens]


def set_torch_threads(settings: Settings) -> None:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)


def ort_session_options(settings: Settings):
    """onnxruntime SessionOptions with the suite's thread count (None when left to the default)."""
    if not settings.threads:
        return None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    return options


def step_floor(session, past: int, repeats: int, capacity: int | None = None) -> dict[str, float]:
    """One decode step of a decoder session (batch 1, one new token after `past` cached ones),
    inputs prepared in advance: the floor any Python loop around this session sits on.

    run_ms: session.run(None, numpy feeds) (outputs copied to numpy);
    iobinding_ms: run_with_iobinding on a prebound binding (outputs left in ORT buffers).
    Works for any session with input_ids / attention_mask / position_ids and
    past_key_values.* inputs shaped (B, Hkv, P, Dh) (ours "concat" and Optimum's), and for
    our "shared" layout (sequence_lengths; buffers of capacity `capacity`, bound in place for
    iobinding_ms as the runtime binds them).
    """
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {}
    shared = any(inp.name == "sequence_lengths" for inp in session.get_inputs())
    for inp in session.get_inputs():
        if shared and inp.name == "sequence_lengths":
            feeds[inp.name] = np.array([past + 1], dtype=np.int64)
        elif shared and inp.name.startswith("past_key_values"):
            _, heads, _, head_size = inp.shape
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal((1, heads, max(capacity or 0, past + 1), head_size)).astype(dtype)
        elif inp.name == "input_ids":
            feeds[inp.name] = np.array([[7]], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, past + 1), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.array([[past]], dtype=np.int64)
        elif inp.name.startswith("past_key_values"):
            _, heads, _, head_size = inp.shape
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal((1, heads, past, head_size)).astype(dtype)
        else:
            raise ValueError(f"step_floor does not know how to fill input {inp.name!r}")
    plain, _ = measure(lambda: session.run(None, feeds), warmup=5, repeats=repeats)
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(value, "cpu", 0) for name, value in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        past_name = out.name.replace("present", "past_key_values", 1)
        if shared and past_name in values:
            binding.bind_ortvalue_output(out.name, values[past_name])  # the same buffer: in place
        else:
            binding.bind_output(out.name, "cpu")
    bound, _ = measure(lambda: session.run_with_iobinding(binding), warmup=5, repeats=repeats)
    return {"past": past, "batch": 1, "run_ms": plain.median * 1e3, "iobinding_ms": bound.median * 1e3,
            "run_spread_ms": [plain.min * 1e3, plain.max * 1e3]}
