"""`onnxformer serve` under load: throughput, time to first token (TTFT) and per-token latency
at concurrency 1, 4, 16, 64 against the same requests sent one after another to the runtime's
generate() in-process, on the benchmark decoder (benchmarks/workspace.py CASES["decoder"]:
LLaMA-style, 33.5M parameters, fp32 package).

    python benchmarks/bench_serve.py [--requests 64] [--new-tokens 64] [--concurrency 1 4 16 64]
                                     [--package DIR] [--json out.json]

A bounded load generator: a fixed list of requests (prompt 32 tokens of the benchmark's
workload text, greedy, max_tokens --new-tokens), each concurrency level sends them all with that
many client threads, streamed (TTFT = request sent -> first token's chunk; per-token latency =
the gaps between a stream's later chunks), to a server on 127.0.0.1 (a child process, rows = the
highest concurrency). Throughput = generated tokens / wall time. The sequential baseline runs
the same prompts through Model.generate_ids one after another in this process (no HTTP), with
the same onnxruntime threads; the machine's load drifts, so each level's ratio is against a
sequential run of --baseline-requests prompts measured right before it. Answers must equal the
baseline's tokens (greedy). --in-process
adds the same requests through the scheduler without HTTP (what the batching itself gives).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_WORK_DIR, load_average, markdown_table, write_json  # noqa: E402

COLUMNS = [("mode", "mode"), ("concurrency", "concurrency"), ("tok_s", "tok/s"),
           ("sequential_tok_s", "sequential tok/s just before"), ("speedup", "vs sequential"),
           ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("tpot_p50_ms", "per-token p50 ms"),
           ("tpot_p99_ms", "per-token p99 ms"), ("wall_s", "wall s"), ("load_1min", "load (1 min)")]


def _package(args) -> Path:
    if args.package:
        return args.package
    from benchmarks.common import Settings
    from benchmarks.workspace import prepare

    case_dir = prepare("decoder", args.work, Settings(), variants=("fp32",))
    return case_dir / "pkg-fp32"


def _prompts(model, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens cut from the benchmark corpus's text (distinct windows)."""
    from benchmarks.workspace import _corpus
    import random

    _, texts = _corpus(random.Random(0))
    ids = [t for enc in model.tokenizer.encode_batch(texts[:2000]) for t in enc.ids]
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def sequential(model, prompts, new_tokens: int) -> tuple[dict, list[list[int]]]:
    config = model.generation_config(max_new_tokens=new_tokens, strategy="greedy")
    model.generate_ids([prompts[0]], config)  # warm-up
    outputs, ttft, start = [], [], time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        [g] = model.generate_ids([prompt], config)
        outputs.append(g.token_ids[0])
        ttft.append(time.perf_counter() - t0)  # the whole answer: generate() returns once
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"mode": "generate() one after another", "concurrency": 1, "tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": None, "ttft_p99_ms": None,
            "tpot_p50_ms": round(1000 * wall / tokens, 2), "tpot_p99_ms": None,
            "wall_s": round(wall, 2), "tokens": tokens}, outputs


def in_process(model, prompts, new_tokens: int, levels: list[int], expected: list[list[int]], baseline) -> list[dict]:
    """The same requests through the scheduler in this process (no HTTP): what the batching
    itself gives; `level` requests in flight at a time, on `level` rows."""
    import queue

    from onnxformer.runtime.scheduler import Done, Request, Scheduler, SchedulerConfig

    config = model.generation_config(max_new_tokens=new_tokens, strategy="greedy")
    rows = []
    for level in levels:
        adjacent = baseline()
        scheduler = Scheduler(model, SchedulerConfig(rows=level, max_queue=len(prompts)))
        events: queue.Queue = queue.Queue()
        stamps: dict[int, list[float]] = {}
        sent: dict[int, float] = {}
        outputs: dict[int, list[int]] = {}

        def submit(i: int) -> None:
            sent[i], stamps[i] = time.perf_counter(), []
            scheduler.submit(Request(prompts[i], config, lambda e, i=i: events.put((i, e, time.perf_counter())),
                                     top_logprobs=0))

        start = time.perf_counter()
        following = min(level, len(prompts))
        for i in range(following):
            submit(i)
        while len(outputs) < len(prompts):
            i, event, at = events.get()
            if isinstance(event, Done):
                outputs[i] = list(event.token_ids)
                if following < len(prompts):
                    submit(following)
                    following += 1
            else:
                stamps[i].append(at)
        wall = time.perf_counter() - start
        scheduler.close()
        if [outputs[i] for i in range(len(prompts))] != expected:
            raise RuntimeError(f"in-process concurrency {level}: tokens differ from generate()'s")
        tokens = sum(len(o) for o in outputs.values())
        ttft = [stamps[i][0] - sent[i] for i in stamps if stamps[i]]
        gaps = [b - a for st in stamps.values() for a, b in zip(st, st[1:])]
        rows.append({"mode": "scheduler in-process (no HTTP)", "concurrency": level, "tok_s": round(tokens / wall, 1),
                     "sequential_tok_s": adjacent, "load_1min": load_average()[0],
                     "ttft_p50_ms": round(1000 * _percentile(ttft, 50), 1),
                     "ttft_p99_ms": round(1000 * _percentile(ttft, 99), 1),
                     "tpot_p50_ms": round(1000 * _percentile(gaps, 50), 2),
                     "tpot_p99_ms": round(1000 * _percentile(gaps, 99), 2), "wall_s": round(wall, 2), "tokens": tokens})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(package: Path, prompts, new_tokens: int, levels: list[int], threads: int | None,
           expected: list[list[int]], baseline) -> list[dict]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "onnxformer.runtime.cli", "serve", f"bench={package}", "--port", str(port),
               "--rows", str(max(levels)), "--max-queue", str(4 * len(prompts))]
    if threads:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        local = threading.local()

        def one(prompt):
            if not hasattr(local, "http"):
                local.http = httpx.Client(timeout=600)
            body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "logprobs": 0}
            sent = time.perf_counter()
            stamps, tokens = [], []
            with local.http.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        lp = chunk["choices"][0]["logprobs"] if chunk["choices"] else None
                        if lp and lp["tokens"]:
                            stamps.append(time.perf_counter())
                            tokens += lp["tokens"]
            return sent, stamps, len(tokens)

        one(prompts[0])  # warm-up
        rows = []
        for level in levels:
            adjacent = baseline()
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                results = list(pool.map(one, prompts))
            wall = time.perf_counter() - start
            tokens = sum(n for _, _, n in results)
            expected_tokens = sum(len(e) for e in expected)
            if tokens != expected_tokens:
                raise RuntimeError(f"concurrency {level}: {tokens} tokens, generate() gave {expected_tokens}")
            ttft = [stamps[0] - sent for sent, stamps, _ in results if stamps]
            gaps = [b - a for _, stamps, _ in results for a, b in zip(stamps, stamps[1:])]
            rows.append({"mode": "serve (HTTP, streamed)", "concurrency": level, "tok_s": round(tokens / wall, 1),
                         "sequential_tok_s": adjacent, "load_1min": load_average()[0],
                         "ttft_p50_ms": round(1000 * _percentile(ttft, 50), 1),
                         "ttft_p99_ms": round(1000 * _percentile(ttft, 99), 1),
                         "tpot_p50_ms": round(1000 * _percentile(gaps, 50), 2),
                         "tpot_p99_ms": round(1000 * _percentile(gaps, 99), 2), "wall_s": round(wall, 2),
                         "tokens": tokens})
        return rows
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--package", type=Path, default=None, help="a decoder package (default: the benchmark decoder)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: onnxruntime's)")
    p.add_argument("--baseline-requests", type=int, default=8,
                   help="prompts of the sequential run measured right before each level (default 8)")
    p.add_argument("--in-process", action="store_true",
                   help="also run the requests through the scheduler in this process (no HTTP)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import onnxformer.runtime as rt

    package = _package(args)
    model = rt.load(package, threads=args.threads)
    prompts = _prompts(model, args.requests, args.prompt_len)
    load_before = load_average()
    base, outputs = sequential(model, prompts, args.new_tokens)
    base.update(sequential_tok_s=base["tok_s"], load_1min=load_average()[0])

    def baseline() -> float:
        """Sequential tok/s on the first --baseline-requests prompts, measured right before a
        level: the machine's load drifts between levels, so each ratio is against its neighbour."""
        return sequential(model, prompts[:args.baseline_requests], args.new_tokens)[0]["tok_s"]

    rows = [base, *served(package, prompts, args.new_tokens, args.concurrency, args.threads, outputs, baseline)]
    if args.in_process:
        rows += in_process(model, prompts, args.new_tokens, args.concurrency, outputs, baseline)
    for row in rows:
        row["speedup"] = f"{row['tok_s'] / row['sequential_tok_s']:.2f}x"
    out = {"package": str(package), "requests": args.requests, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(), "load_average_before": load_before,
           "load_average_after": load_average(), "rows": rows}
    print(f"\n## Serve: {args.requests} requests, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy "
          f"({package.name})\n")
    print(markdown_table(rows, COLUMNS))
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {out['load_average_after']}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
