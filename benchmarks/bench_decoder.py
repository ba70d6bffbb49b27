"""Decoder-only generation (LLaMA-style, 33.5M parameters): greedy, prompt 32, 128 new tokens,
batch 1 and 8, prefill and decode timed separately.

    python benchmarks/bench_decoder.py [--quick] [--tiny] [--engines onnxformer torch-eager ...]

Engines: onnxformer (each export variant of workspace.CASES["decoder"]), torch-eager (our
PyTorch modeling with its KV cache, modeling/generate.py), the raw onnxruntime step floor of
each of our packages (one decode step at past 100, batch 1, no Python loop); and, when
benchmarks/setup_peers.sh made their environments, hf-eager (LlamaForCausalLM.generate),
optimum (ORTModelForCausalLM) and genai (onnxruntime-genai fp32 / int8 / int4).

Greedy tokens of every fp32 engine must equal torch-eager's (our PyTorch reference).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite  # noqa: E402
from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.suite import Engine  # noqa: E402

CASE = "decoder"
ENGINES = [
    *suite.our_engines(CASE),
    Engine("torch-eager", "ours.py"),
    Engine("hf-eager", "peers/run_hf.py", venvs=("genai", "optimum")),
    Engine("optimum", "peers/run_optimum.py", venvs=("optimum",)),
    Engine("genai", "peers/run_genai.py", "fp32", venvs=("genai",)),
    Engine("genai", "peers/run_genai.py", "int8", venvs=("genai",)),
    Engine("genai", "peers/run_genai.py", "int4", venvs=("genai",)),
]
REFERENCE = "torch-eager/fp32"


def run(args) -> dict[str, Any]:
    from benchmarks.workspace import prepare

    settings = suite.settings_from(args)
    case_dir = prepare(CASE, args.work, settings, tiny=args.tiny, rebuild=args.rebuild)
    results = suite.run_engines(suite.select(ENGINES, args), case_dir, settings)
    summary = suite.generation_report(results, REFERENCE)
    title = f"Decoder ({case_dir.name}): prompt 32, {settings.decoder_new_tokens} new tokens, greedy"
    suite.print_report(title, markdown_table(summary["rows"], suite.GENERATION_COLUMNS), suite.errors_of(results))
    if summary["floors"]:
        print("\nRaw decode-step floor (batch 1) and the runtime's per-step time over it:\n")
        print(markdown_table(summary["floors"], suite.FLOOR_COLUMNS))
    return suite.case_output(CASE, case_dir, settings, results, summary, args.json)


def main() -> None:
    suite.case_main(__doc__, CASE, run)


if __name__ == "__main__":
    main()
