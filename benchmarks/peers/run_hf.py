"""Hugging Face transformers, PyTorch eager (the models hf_convert builds from our weights).

Run by the suite inside a peer environment: run_hf.py --job JOB.json --out OUT.json.
Modes: prepare (convert + check logits), bench (the case's timings), cold (fresh process:
import, load model and tokenizer, generate 8 tokens).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import Settings, child_main, dir_size_mb, read_json, set_torch_threads, versions  # noqa: E402

AUTO_CLASSES = {"decoder": "AutoModelForCausalLM", "encoder-decoder": "AutoModelForSeq2SeqLM",
                "classifier": "AutoModelForSequenceClassification"}


def _hf_dir(case_dir: Path) -> Path:
    import transformers

    return case_dir / f"hf-transformers-{transformers.__version__}"


def _load(case_dir: Path, case_name: str):
    import torch
    import transformers

    cls = getattr(transformers, AUTO_CLASSES[case_name])
    return cls.from_pretrained(_hf_dir(case_dir), dtype=torch.float32).eval()


def run(job: dict[str, Any]) -> dict[str, Any]:
    case_dir = Path(job["case_dir"])
    case = read_json(case_dir / "case.json")
    if job["mode"] == "cold":
        start = time.perf_counter()
        import torch  # noqa: F401
        import transformers

        from benchmarks.peers.hf_api import cold_generate
        imported = time.perf_counter()
        set_torch_threads(Settings.from_dict(job["settings"]))
        model = _load(case_dir, case["case"])
        transformers.AutoTokenizer.from_pretrained(_hf_dir(case_dir))
        loaded = time.perf_counter()
        cold_generate(model, case)
        return {"import_s": imported - start, "load_s": loaded - imported, "generate_s": time.perf_counter() - loaded}

    from benchmarks.hf_convert import ensure_hf_dir

    if job["mode"] == "prepare":
        hf_dir, info = ensure_hf_dir(case_dir)
        return {"artifacts": {"path": hf_dir.name, "package_mb": dir_size_mb(hf_dir, "*.safetensors"),
                              "conversion": info}}

    import torch

    from benchmarks.peers import hf_api

    settings = Settings.from_dict(job["settings"])
    set_torch_threads(settings)
    model = _load(case_dir, case["case"])
    bench = hf_api.bench_classifier if case["case"] == "classifier" else hf_api.bench_generation
    result = bench(model, case, settings)
    result["meta"] = {"versions": versions(["torch", "transformers"]), "torch_threads": torch.get_num_threads(),
                      "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    return result


if __name__ == "__main__":
    child_main(run)
