"""onnxruntime-genai: models built by its model builder from the HF LLaMA directory that
hf_convert makes (`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION
-e cpu`), run with its Generator (preallocated KV buffer shared between past and present).

Run by the suite inside .venv-bench-genai: run_genai.py --job JOB.json --out OUT.json.
Decoder case only. The phases are timed directly: prefill = Generator creation +
append_tokens (the prompt) + the first generate_next_token; decode = the other new tokens.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import Settings, child_main, dir_size_mb, log, read_json, versions  # noqa: E402


def _open(og, path: Path, settings: Settings):
    config = og.Config(str(path))
    if settings.threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": settings.threads}}}}))
    return og.Model(config)


def _model_dir(case_dir: Path, precision: str) -> Path:
    import onnxruntime_genai as og

    return case_dir / f"genai-{precision}-{og.__version__}"


def _prepare(case_dir: Path, case: dict[str, Any], precision: str) -> dict[str, Any]:
    if case["case"] != "decoder":
        raise SystemExit(f"onnxruntime-genai has no {case['case']} model here")
    from benchmarks.hf_convert import ensure_hf_dir, is_current, mark_current

    hf_dir, info = ensure_hf_dir(case_dir)
    out = _model_dir(case_dir, precision)
    if not is_current(out, info):
        log(f"genai: building {case_dir.name} {precision}")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(case_dir / "genai-cache")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"genai builder failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        mark_current(out, info)
    return {"path": out.name, "package_mb": dir_size_mb(out, "*.onnx*"),
            "files": sorted(p.name for p in out.iterdir()), "conversion": info}


def _generate(og, model, prompts, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill s, decode s, generated ids per row) of one greedy generation."""
    import numpy as np

    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompts.shape[1] + new_tokens, do_sample=False, batch_size=prompts.shape[0])
    generator = og.Generator(model, params)
    generator.append_tokens(prompts)
    generator.generate_next_token()
    first = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    done = time.perf_counter()
    rows = [np.asarray(generator.get_sequence(i))[prompts.shape[1]:].tolist() for i in range(prompts.shape[0])]
    return first - start, done - first, rows


def _bench(case_dir: Path, case: dict[str, Any], precision: str, settings: Settings) -> dict[str, Any]:
    import gc

    import numpy as np
    import onnxruntime_genai as og

    model = _open(og, _model_dir(case_dir, precision), settings)
    w = case["workload"]
    n = settings.decoder_new_tokens
    rows, tokens = [], {}
    for batch in w["batches"]:
        prompts = np.asarray(w["prompts"][:batch], dtype=np.int32)
        for _ in range(settings.warmup):
            _generate(og, model, prompts, n)
        runs = []
        for _ in range(settings.repeats):
            gc.collect()
            runs.append(_generate(og, model, prompts, n))
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        total = statistics.median(r[0] + r[1] for r in runs)
        rows.append({"batch": batch, "prefill_ms": prefill * 1e3, "decode_ms_per_step": decode / (n - 1) * 1e3,
                     "decode_tok_s": batch * (n - 1) / decode, "total_ms": total * 1e3,
                     "total_tok_s": batch * n / total})
        tokens[f"b{batch}"] = runs[-1][2]
    return {"rows": rows, "tokens": tokens, "meta": {"versions": versions(["onnxruntime-genai", "onnxruntime"])}}


def run(job: dict[str, Any]) -> dict[str, Any]:
    case_dir = Path(job["case_dir"])
    case = read_json(case_dir / "case.json")
    precision = job["precision"]
    if job["mode"] == "prepare":
        return {"artifacts": _prepare(case_dir, case, precision)}
    if job["mode"] == "cold":
        import numpy as np

        start = time.perf_counter()
        import onnxruntime_genai as og
        imported = time.perf_counter()
        model = _open(og, _model_dir(case_dir, precision), Settings.from_dict(job["settings"]))
        og.Tokenizer(model)
        loaded = time.perf_counter()
        _generate(og, model, np.asarray(case["workload"]["prompts"][:1], dtype=np.int32), 8)
        return {"import_s": imported - start, "load_s": loaded - imported, "generate_s": time.perf_counter() - loaded}
    return _bench(case_dir, case, precision, Settings.from_dict(job["settings"]))


if __name__ == "__main__":
    child_main(run)
