"""Encoder-decoder generation (BART-style, 33.6M parameters): source 64 tokens, 64 new tokens,
greedy, batch 1; prefill (encoder + cross-attention K/V + first token) and decode timed apart.

    python benchmarks/bench_encoder_decoder.py [--quick] [--tiny] [--engines ...]

Engines: onnxformer, torch-eager (our modeling, modeling/generate.py); with the peer
environments: hf-eager (BartForConditionalGeneration.generate) and optimum
(ORTModelForSeq2SeqLM). onnxruntime-genai has no BART-style model. HF BART computes the same
function as our post-norm learned-position model (hf_convert checks the logits), so tokens
are compared like the decoder's. The storage table shows how many bytes of ONNX files each
package takes against the float32 parameters (1.0 = no weight stored twice).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite  # noqa: E402
from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.suite import Engine  # noqa: E402

CASE = "encoder-decoder"
ENGINES = [
    *suite.our_engines(CASE),
    Engine("torch-eager", "ours.py"),
    Engine("hf-eager", "peers/run_hf.py", venvs=("genai", "optimum")),
    Engine("optimum", "peers/run_optimum.py", venvs=("optimum",)),
]
REFERENCE = "torch-eager/fp32"
STORAGE_COLUMNS = [("engine", "engine"), ("files", "files"), ("package_mb", "ONNX files MB"),
                   ("param_mb", "fp32 parameters MB"), ("stored_ratio", "stored / parameters")]


def storage(results: dict[str, dict[str, Any]], num_parameters: int) -> list[dict[str, Any]]:
    param_mb = num_parameters * 4 / 2**20
    rows = []
    for label, result in results.items():
        art = result.get("artifacts", {})
        if art.get("package_mb") and label.startswith(("onnxformer", "optimum")):
            files = [f for f in art.get("files", []) if ".onnx" in f]
            rows.append({"engine": label, "files": ", ".join(files), "package_mb": art["package_mb"],
                         "param_mb": param_mb, "stored_ratio": art["package_mb"] / param_mb})
    return rows


def run(args) -> dict[str, Any]:
    from benchmarks.workspace import prepare

    settings = suite.settings_from(args)
    case_dir = prepare(CASE, args.work, settings, tiny=args.tiny, rebuild=args.rebuild)
    results = suite.run_engines(suite.select(ENGINES, args), case_dir, settings)
    summary = suite.generation_report(results, REFERENCE)
    case = json.loads((case_dir / "case.json").read_text())
    summary["storage"] = storage(results, case["num_parameters"])
    title = (f"Encoder-decoder ({case_dir.name}): source {case['workload']['source_len']}, "
             f"{settings.encdec_new_tokens} new tokens, greedy")
    columns = [c for c in suite.GENERATION_COLUMNS if c[0] != "x_genai"]
    suite.print_report(title, markdown_table(summary["rows"], columns), suite.errors_of(results))
    print("\nStorage:\n")
    print(markdown_table(summary["storage"], STORAGE_COLUMNS))
    return suite.case_output(CASE, case_dir, settings, results, summary, args.json)


def main() -> None:
    suite.case_main(__doc__, CASE, run)


if __name__ == "__main__":
    main()
