"""Under load: thousands of calls in one process with bounded memory and no leaked files, a
package loaded and dropped over and over, and one model shared by many threads giving exactly
the results of sequential calls.

The soak runs in a fresh process that cannot import torch (tests/reliability/soak.py), so its
memory figures are the runtime's own. Counts are sized for about 10 s on 2 busy CPU cores;
ONNXFORMER_SOAK_SCALE multiplies them (RESULTS.md reports scale 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packages are exported on the spot")

import onnxformer.runtime as rt  # noqa: E402
from soak import PROMPTS  # noqa: E402

SCALE = float(os.environ.get("ONNXFORMER_SOAK_SCALE", "1"))
SOAK = Path(__file__).with_name("soak.py")
RSS_GROWTH_LIMIT_MB = 32  # after warm-up; allocator and onnxruntime arena noise is a few MB


@pytest.fixture(scope="module")
def soak(package_paths) -> dict:
    """tests/reliability/soak.py in a fresh torch-free process: its figures."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    calls, warmup, loads = int(5000 * SCALE), 300, int(30 * SCALE)
    paths = [str(package_paths[name]) for name in ("decoder", "encoder", "encoder-decoder")]
    proc = subprocess.run([sys.executable, str(SOAK), str(calls), str(warmup), str(loads), *paths],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout), "calls": calls, "warmup": warmup, "loads": loads}


def test_soak_memory_and_files_stay_flat(soak, figures):
    s = soak["soak"]
    assert soak["torch_free"]
    assert s["fds_end"] == s["fds_start"], f"open files grew from {s['fds_start']} to {s['fds_end']}"
    assert s["rss_end_mb"] - s["rss_start_mb"] < RSS_GROWTH_LIMIT_MB, s
    assert s["rss_quarters_mb"][-1] - s["rss_quarters_mb"][1] < RSS_GROWTH_LIMIT_MB / 2, f"RSS still climbing: {s}"
    figures.record("load", f"soak: {soak['calls']} calls in one torch-free process after {soak['warmup']} warm-up "
                   "calls: 40% greedy generation, 40% classify (batches of 1-3), 10% embed, 5% streaming, 5% sampled "
                   "or beam generation; 3 packages", soak["calls"],
                   f"RSS {s['rss_start_mb']} MB -> {s['rss_end_mb']} MB (at each quarter: "
                   f"{', '.join(map(str, s['rss_quarters_mb']))}; {soak['rss_process_start_mb']} MB before loading); "
                   f"open files {s['fds_start']} -> {s['fds_end']}; {s['ms_per_call']} ms per call",
                   rss_start_mb=s["rss_start_mb"], rss_end_mb=s["rss_end_mb"], fds_start=s["fds_start"],
                   fds_end=s["fds_end"])


def test_loading_and_dropping_packages_releases_files_and_memory(soak, figures):
    r = soak["reload"]
    assert r["fds_end"] == r["fds_start"], f"open files grew from {r['fds_start']} to {r['fds_end']}"
    assert r["rss_end_mb"] - r["rss_start_mb"] < RSS_GROWTH_LIMIT_MB, r
    figures.record("load", "load and drop packages repeatedly (decoder, encoder, encoder-decoder in turn), same "
                   "process", soak["loads"],
                   f"RSS {r['rss_start_mb']} MB -> {r['rss_end_mb']} MB; open files {r['fds_start']} -> {r['fds_end']}")


def _tasks(models):
    decoder, encoder, seq2seq = models["decoder"], models["encoder"], models["encoder-decoder"]
    tasks = []
    for i in range(240):
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = i % 6
        if kind == 0:
            tasks.append(("greedy", lambda p=prompt: [g.token_ids for g in decoder.generate(p, max_new_tokens=5)]))
        elif kind == 1:
            tasks.append(("sample", lambda p=prompt, s=i: [g.token_ids for g in decoder.generate(
                [p, "one"], strategy="sample", top_k=20, top_p=0.9, seed=s, max_new_tokens=5, num_return_sequences=2)]))
        elif kind == 2:
            tasks.append(("beam", lambda p=prompt: [g.token_ids for g in seq2seq.generate(
                p, strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=5)]))
        elif kind == 3:
            tasks.append(("stream", lambda p=prompt: "".join(decoder.stream(p, max_new_tokens=5))))
        elif kind == 4:
            tasks.append(("classify", lambda p=prompt: [(c.label, c.probabilities) for c in encoder.classify([p, "ok"])]))
        else:
            tasks.append(("embed", lambda p=prompt: encoder.embed([p, "a quick fox"])))
    return tasks


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-6))
    if isinstance(a, list) and a and isinstance(a[0], tuple):  # classify: labels equal, probabilities within 1e-6
        return all(x[0] == y[0] and all(abs(x[1][k] - y[1][k]) <= 1e-6 for k in x[1]) for x, y in zip(a, b))
    return a == b


def test_one_model_shared_by_threads_matches_sequential_calls(package_paths, figures):
    models = {name: rt.load(path) for name, path in package_paths.items()}  # onnxruntime's default thread pool
    tasks = _tasks(models)
    expected = [call() for _, call in tasks]
    mismatches, rounds, threads = [], 2, 8
    started = time.perf_counter()
    for r in range(rounds):
        order = list(range(len(tasks)))[::1 if r == 0 else -1]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = {i: pool.submit(tasks[i][1]) for i in order}
            got = {i: f.result(timeout=120) for i, f in futures.items()}
        mismatches += [(tasks[i][0], i) for i in order if not _same(got[i], expected[i])]
    elapsed = time.perf_counter() - started
    assert not mismatches, mismatches[:10]
    total = rounds * len(tasks)
    figures.record("load", f"concurrency: one loaded model per package shared by {threads} threads; greedy, seeded "
                   "sampling, beam, streaming, classify, embed (forward and reverse submission order)", total,
                   f"{total} results identical to sequential calls (token ids exact; probabilities and embeddings "
                   f"within 1e-6); 0 errors; {elapsed:.1f} s")


def test_the_server_carries_its_burst_tests(figures):
    """The long-running server (`onnxformer serve`, issue 17) has its burst, soak and queue-full
    tests in tests/test_serve.py, against a live process on loopback."""
    from onnxformer.runtime.cli import SUBCOMMANDS

    assert "serve" in SUBCOMMANDS
    figures.record("load", "burst of requests to a long-running server on loopback", "see tests/test_serve.py",
                   "onnxformer serve: 2000 small requests at concurrency 8 with flat RSS; 24 at once on one row and "
                   "a queue of one: the rest answered 429 with Retry-After; SIGTERM drains (tests/test_serve.py)")
