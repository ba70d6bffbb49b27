"""Our engines, run by the suite as child processes (ours.py --job JOB.json --out OUT.json):

    onnxformer   the torch-free runtime (onnxformer.runtime.load) on a package of
                 workspace.CASES[case].variants; this process never imports torch
    torch-eager  our PyTorch modeling with its KV cache (modeling/generate.py), eager mode

Modes: prepare (report the artifacts; workspace.prepare built them), bench, cold.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workspace import EOS, PAD  # noqa: E402  (torch is imported lazily there)
from benchmarks.common import (  # noqa: E402
    Settings,
    child_main,
    classification_result,
    dir_size_mb,
    measure,
    read_json,
    set_torch_threads,
    step_floor,
    time_generation,
    versions,
)


def _package(job: dict[str, Any], case: dict[str, Any]) -> Path:
    return Path(job["case_dir"]) / case["packages"][job["options"]["variant"]]


def _generation_config(case: dict[str, Any], new_tokens: int):
    from onnxformer.runtime import GenerationConfig

    sp = case["special"]
    return GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(sp["eos"],), pad_token_id=sp["pad"])


def _inputs(case: dict[str, Any], settings: Settings) -> tuple[list[list[int]], int]:
    """(prompts or sources, new tokens) of a generation case."""
    w = case["workload"]
    if case["case"] == "encoder-decoder":
        return w["sources"], settings.encdec_new_tokens
    return w["prompts"], settings.decoder_new_tokens


# --------------------------------------------------------------------------------------------
# onnxformer
# --------------------------------------------------------------------------------------------


def split_per_step(model, prompts, new_tokens: int, repeats: int) -> dict[str, float]:
    """Per decode step (ms), measured on the same generate_ids calls: the total, onnxruntime's
    run_with_iobinding (the C++ run), the rest of the step model's prefill() / advance()
    (binding, OrtValues, logits copy) and the generation loop around it. Wraps the session's
    run_with_iobinding and the step model's prefill and advance in this process only, for the
    duration of the call."""
    import statistics

    from onnxformer.runtime import GenerationConfig
    from onnxformer.runtime import session_steps

    session = model.sessions["decoder"]
    clock = collections.defaultdict(float)
    original_run = session.run_with_iobinding
    step_class = session_steps.SharedSteps if model.manifest.kv_cache == "shared" else session_steps.ConcatSteps
    # the search calls prefill() for the prompts and advance() per token
    originals = {name: getattr(step_class, name) for name in ("prefill", "advance")}

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_run(*args, **kwargs)
        finally:
            clock["run"] += time.perf_counter() - start

    def timed(method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                clock["step"] += time.perf_counter() - start
        return wrapper

    config = {n: GenerationConfig(max_new_tokens=n, eos_token_ids=(EOS,), pad_token_id=PAD) for n in (1, new_tokens)}
    session.run_with_iobinding = timed_run
    for name, method in originals.items():
        setattr(step_class, name, timed(method))
    try:
        model.generate_ids(prompts, config[new_tokens])  # warm-up
        figures = []
        for _ in range(repeats):
            per = {}
            for n in (1, new_tokens):
                clock.clear()
                start = time.perf_counter()
                model.generate_ids(prompts, config[n])
                per[n] = {"total": time.perf_counter() - start, **clock}
            figures.append({k: (per[new_tokens][k] - per[1][k]) / (new_tokens - 1) * 1e3
                            for k in ("total", "run", "step")})
    finally:
        del session.run_with_iobinding
        for name, method in originals.items():
            setattr(step_class, name, method)
    med = {k: statistics.median(f[k] for f in figures) for k in ("total", "run", "step")}
    return {
        "ms_per_step": med["total"],
        "session_run_ms": med["run"],
        "step_extras_ms": med["step"] - med["run"],
        "generation_loop_ms": med["total"] - med["step"],
        "overhead": med["total"] / med["run"] - 1,
    }


def _onnxformer_generation(job, case, settings: Settings) -> dict[str, Any]:
    import onnxformer.runtime as rt

    model = rt.load(_package(job, case), threads=settings.threads)
    inputs, new_tokens = _inputs(case, settings)
    configs = {n: _generation_config(case, n) for n in (1, new_tokens)}
    rows, tokens = [], {}
    for batch in case["workload"]["batches"]:
        rows_in = inputs[:batch]
        generate = lambda n: [g.token_ids[0] for g in model.generate_ids(rows_in, configs[n])]  # noqa: E731
        figures, tokens[f"b{batch}"] = time_generation(generate, batch, new_tokens, settings)
        rows.append({"batch": batch, **figures})
    result: dict[str, Any] = {"rows": rows, "tokens": tokens}
    if case["case"] == "decoder":
        capacity = case["workload"]["prompt_len"] + new_tokens  # what generate allocates for these calls
        result["floor"] = step_floor(model.sessions["decoder"], case["workload"]["floor_past"], settings.floor_repeats,
                                     capacity=capacity)
        # The same split on the generation calls themselves (robust to load changing between
        # the floor and the generation timings): batch 1, as the floor.
        result["floor"]["in_loop"] = split_per_step(model, inputs[:1], new_tokens, settings.repeats)
    return result


def _onnxformer_classifier(job, case, settings: Settings) -> dict[str, Any]:
    import numpy as np

    import onnxformer.runtime as rt

    model = rt.load(_package(job, case), threads=settings.threads)
    w = case["workload"]
    texts = w["texts"]
    stats, out = measure(lambda: model.classify(texts, batch_size=len(texts)), warmup=settings.warmup,
                         repeats=settings.repeats)
    session = model.sessions["encoder"]
    ids = np.asarray(w["input_ids"], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.asarray(w["token_type_ids"])}
    raw, logits = measure(lambda: session.run(["logits"], feeds)[0], warmup=settings.warmup, repeats=settings.repeats)
    batch = len(texts)
    labels = list(model.label_names)
    return {
        "rows": [{"batch": batch, "seq_len": ids.shape[1], "ms_per_batch": stats.median * 1e3,
                  "seq_s": batch / stats.median, "session_ms_per_batch": raw.median * 1e3,
                  "session_seq_s": batch / raw.median, "spread_ms": [stats.min * 1e3, stats.max * 1e3]}],
        "labels": [labels.index(c.label) for c in out],
        "logits": logits.tolist(),
    }


def _onnxformer_cold(job, case) -> dict[str, Any]:
    start = time.perf_counter()
    import onnxformer.runtime as rt

    imported = time.perf_counter()
    model = rt.load(_package(job, case), threads=Settings.from_dict(job["settings"]).threads)
    loaded = time.perf_counter()
    inputs, _ = _inputs(case, Settings())
    model.generate_ids(inputs[:1], _generation_config(case, 8))
    return {"import_s": imported - start, "load_s": loaded - imported, "generate_s": time.perf_counter() - loaded}


# --------------------------------------------------------------------------------------------
# torch-eager
# --------------------------------------------------------------------------------------------


def _torch_generation(job, case, settings: Settings) -> dict[str, Any]:
    import torch

    from benchmarks.workspace import load_state_dict
    from onnxformer.modeling.generate import generate as torch_generate

    model, _ = load_state_dict(Path(job["case_dir"]))
    inputs, new_tokens = _inputs(case, settings)
    configs = {n: _generation_config(case, n) for n in (1, new_tokens)}
    rows, tokens = [], {}
    with torch.inference_mode():
        for batch in case["workload"]["batches"]:
            rows_in = inputs[:batch]
            generate = lambda n: [s[0] for s in torch_generate(model, rows_in, configs[n])]  # noqa: E731
            figures, tokens[f"b{batch}"] = time_generation(generate, batch, new_tokens, settings)
            rows.append({"batch": batch, **figures})
    return {"rows": rows, "tokens": tokens}


def _torch_classifier(job, case, settings: Settings) -> dict[str, Any]:
    import torch

    from benchmarks.workspace import load_state_dict

    model, _ = load_state_dict(Path(job["case_dir"]))
    w = case["workload"]
    ids = torch.tensor(w["input_ids"], dtype=torch.long)
    mask, types = torch.ones_like(ids), torch.tensor(w["token_type_ids"], dtype=torch.long)

    def forward():
        return model.classify(model.encode(ids, mask, token_type_ids=types))

    with torch.inference_mode():
        stats, logits = measure(forward, warmup=settings.warmup, repeats=settings.repeats)
    return classification_result(stats, logits, ids.shape[1])


# --------------------------------------------------------------------------------------------


def run(job: dict[str, Any]) -> dict[str, Any]:
    case = read_json(Path(job["case_dir"]) / "case.json")
    settings = Settings.from_dict(job["settings"])
    engine, mode, kind = job["engine"], job["mode"], case["case"]
    if mode == "prepare":
        if engine == "onnxformer":
            variant = job["options"]["variant"]
            if variant not in case["packages"]:
                raise RuntimeError(f"no package for variant {variant!r}: {case.get('package_errors', {}).get(variant)}")
            package = _package(job, case)
            return {"artifacts": {"path": package.name, "package_mb": dir_size_mb(package, "*.onnx*"),
                                  "files": sorted(p.name for p in package.iterdir())}}
        return {"artifacts": {}}
    if mode == "cold":
        return _onnxformer_cold(job, case)
    if engine == "onnxformer":
        result = _onnxformer_classifier(job, case, settings) if kind == "classifier" else \
            _onnxformer_generation(job, case, settings)
        result["meta"] = {"versions": versions(["onnxruntime", "numpy", "tokenizers"]),
                          "torch_imported": "torch" in sys.modules}
        return result
    if engine == "torch-eager":
        import torch

        set_torch_threads(settings)
        result = _torch_classifier(job, case, settings) if kind == "classifier" else \
            _torch_generation(job, case, settings)
        result["meta"] = {"versions": versions(["torch"]), "torch_threads": torch.get_num_threads()}
        return result
    raise ValueError(f"unknown engine {engine!r}")


if __name__ == "__main__":
    child_main(run)
