"""Optimum (optimum-onnx): ORTModelForCausalLM / ORTModelForSeq2SeqLM /
ORTModelForSequenceClassification, exported by Optimum from the HF models hf_convert builds.

Run by the suite inside .venv-bench-optimum: run_optimum.py --job JOB.json --out OUT.json.
Precisions: fp32 (Optimum's export as users get it: `from_pretrained(export=True)`), int8
(classifier only: ORTQuantizer dynamic quantization, per-tensor, of the fp32 export).
The decoder bench also times one raw session.run of Optimum's decode step (past 100, batch 1).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (  # noqa: E402
    Settings,
    child_main,
    dir_size_mb,
    log,
    ort_session_options,
    read_json,
    set_torch_threads,
    step_floor,
    versions,
)

ORT_CLASSES = {"decoder": "ORTModelForCausalLM", "encoder-decoder": "ORTModelForSeq2SeqLM",
               "classifier": "ORTModelForSequenceClassification"}


def _export_dir(case_dir: Path, precision: str) -> Path:
    return case_dir / f"optimum-{precision}-{importlib.metadata.version('optimum-onnx')}"


def _cls(case_name: str):
    import optimum.onnxruntime

    return getattr(optimum.onnxruntime, ORT_CLASSES[case_name])


def _prepare(case_dir: Path, case: dict[str, Any], precision: str) -> dict[str, Any]:
    from benchmarks.hf_convert import ensure_hf_dir, is_current, mark_current

    hf_dir, info = ensure_hf_dir(case_dir)
    fp32 = _export_dir(case_dir, "fp32")
    if not is_current(fp32, info):
        log(f"optimum: exporting {case_dir.name}")
        shutil.rmtree(fp32, ignore_errors=True)
        _cls(case["case"]).from_pretrained(hf_dir, export=True).save_pretrained(fp32)
        mark_current(fp32, info)
    out = fp32
    if precision == "int8":
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        out = _export_dir(case_dir, "int8")
        if not is_current(out, info):
            log(f"optimum: quantizing {case_dir.name}")
            shutil.rmtree(out, ignore_errors=True)
            quantizer = ORTQuantizer.from_pretrained(fp32)
            config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
            quantizer.quantize(save_dir=out, quantization_config=config)
            mark_current(out, info)
    return {"path": out.name, "package_mb": dir_size_mb(out, "*.onnx*"),
            "files": sorted(p.name for p in out.iterdir()), "conversion": info}


def _load(case_dir: Path, case_name: str, precision: str, settings: Settings):
    path = _export_dir(case_dir, precision)
    onnx_files = sorted(p.name for p in path.glob("*.onnx"))
    kwargs = {"file_name": onnx_files[0]} if case_name == "classifier" and precision == "int8" else {}
    options = ort_session_options(settings)
    if options is not None:
        kwargs["session_options"] = options
    return _cls(case_name).from_pretrained(path, **kwargs)


def run(job: dict[str, Any]) -> dict[str, Any]:
    case_dir = Path(job["case_dir"])
    case = read_json(case_dir / "case.json")
    precision = job["precision"]
    if job["mode"] == "cold":
        start = time.perf_counter()
        import optimum.onnxruntime  # noqa: F401
        import transformers

        from benchmarks.peers.hf_api import cold_generate
        imported = time.perf_counter()
        model = _load(case_dir, case["case"], precision, Settings.from_dict(job["settings"]))
        transformers.AutoTokenizer.from_pretrained(case_dir / f"hf-transformers-{transformers.__version__}")
        loaded = time.perf_counter()
        cold_generate(model, case)
        return {"import_s": imported - start, "load_s": loaded - imported, "generate_s": time.perf_counter() - loaded}
    if job["mode"] == "prepare":
        return {"artifacts": _prepare(case_dir, case, precision)}

    from benchmarks.peers import hf_api

    settings = Settings.from_dict(job["settings"])
    set_torch_threads(settings)
    model = _load(case_dir, case["case"], precision, settings)
    bench = hf_api.bench_classifier if case["case"] == "classifier" else hf_api.bench_generation
    result = bench(model, case, settings)
    if case["case"] == "decoder":
        result["floor"] = step_floor(model.session, case["workload"]["floor_past"], settings.floor_repeats)
    result["meta"] = {"versions": versions(["optimum", "optimum-onnx", "transformers", "onnxruntime", "torch"]),
                      "use_io_binding": getattr(model, "use_io_binding", None)}
    return result


if __name__ == "__main__":
    child_main(run)
