"""The soak run of test_load.py, in a fresh process that cannot import torch: the runtime as
users run it, so the memory figures are the runtime's own.

    python tests/reliability/soak.py CALLS WARMUP LOADS DECODER_DIR ENCODER_DIR SEQ2SEQ_DIR

Phase 1: WARMUP calls, then CALLS calls, mixed as CYCLE says, recording resident memory
(VmRSS) at each quarter and the open file descriptors before and after. Phase 2: LOADS
packages loaded and dropped in turn. Prints one JSON object with the figures.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

PROMPTS = ["the cat sat", "one two three four five", "héllo wörld 你好", "a quick brown fox jumps over the lazy dog",
           "x", "the dog ran after it and the cat sat on the mat", "seven eight", "naïve café 🙂"]
# One cycle of 20 calls: 8 greedy generations, 8 classifications, 2 embeddings, 1 stream and
# 1 sampled (odd cycles: beam-search seq2seq) generation.
CYCLE = "GCGCGCGCEGCGCGCGCESX"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def calls(decoder, encoder, seq2seq, n: int):
    """n mixed calls, cycling through prompts of different lengths and batch sizes."""
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = CYCLE[i % len(CYCLE)]
        if kind == "G":
            yield lambda: decoder.generate(prompt, max_new_tokens=2)
        elif kind == "C":
            yield lambda: encoder.classify([prompt] * (1 + i % 3))
        elif kind == "E":
            yield lambda: encoder.embed(prompt)
        elif kind == "S":
            yield lambda: "".join(decoder.stream(prompt, max_new_tokens=2))
        elif (i // len(CYCLE)) % 2:
            yield lambda: seq2seq.generate(prompt, strategy="beam", num_beams=2, max_new_tokens=2)
        else:
            yield lambda: decoder.generate([prompt, "one two"], strategy="sample", seed=i, max_new_tokens=2)


def main(n_calls: int, warmup: int, loads: int, paths: list[str]) -> dict:
    import onnxformer.runtime as rt

    rss_process_start = rss_mb()
    models = [rt.load(p, threads=1) for p in paths]
    for call in calls(*models, warmup):
        call()
    gc.collect()
    rss_start, fds_start = rss_mb(), open_fds()
    quarters, started = [], time.perf_counter()
    for i, call in enumerate(calls(*models, n_calls), start=1):
        call()
        if i % max(n_calls // 4, 1) == 0:
            gc.collect()
            quarters.append(round(rss_mb(), 1))
    elapsed = time.perf_counter() - started
    soak = dict(rss_start_mb=round(rss_start, 1), rss_end_mb=quarters[-1], rss_quarters_mb=quarters,
                fds_start=fds_start, fds_end=open_fds(), ms_per_call=round(elapsed / n_calls * 1e3, 2))

    del models
    gc.collect()
    rss_start, fds_start = rss_mb(), open_fds()
    for i in range(loads):
        model = rt.load(paths[i % len(paths)], threads=1)
        del model
    gc.collect()
    reload = dict(rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_mb(), 1), fds_start=fds_start,
                  fds_end=open_fds())
    torch_free = "torch" not in [k for k, v in sys.modules.items() if v is not None]
    return dict(rss_process_start_mb=round(rss_process_start, 1), soak=soak, reload=reload, torch_free=torch_free)


if __name__ == "__main__":
    sys.modules["torch"] = None  # type: ignore[assignment]  # any import of torch now fails
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:7])))
