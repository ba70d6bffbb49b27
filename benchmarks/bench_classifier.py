"""Encoder classification throughput (BERT-style, 384 wide, 6 layers): batch 32 x 128 tokens.

    python benchmarks/bench_classifier.py [--quick] [--tiny] [--engines ...]

Engines: onnxformer fp32, int8 (weight-only MatMulNBits) and int8-dynamic (int8 weights and
activations) (`model.classify(texts)`, tokenization included; the raw encoder session.run on
the same ids is reported beside it), torch-eager (our modeling);
with the peer environments: hf-eager (BertForSequenceClassification) and optimum
(ORTModelForSequenceClassification, fp32 and dynamic int8 by ORTQuantizer). The peers are
timed on token ids (no tokenizer). Labels and logits are compared with torch-eager's.
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

CASE = "classifier"
ENGINES = [
    *suite.our_engines(CASE),
    Engine("torch-eager", "ours.py"),
    Engine("hf-eager", "peers/run_hf.py", venvs=("genai", "optimum")),
    Engine("optimum", "peers/run_optimum.py", "fp32", venvs=("optimum",)),
    Engine("optimum", "peers/run_optimum.py", "int8", venvs=("optimum",)),
]
REFERENCE = "torch-eager/fp32"
COLUMNS = [("engine", "engine"), ("precision", "precision"), ("batch", "batch"), ("seq_len", "tokens"),
           ("ms_per_batch", "ms/batch"), ("seq_s", "seq/s"), ("session_seq_s", "seq/s (session only)"),
           ("x_torch", "x torch-eager fp32"), ("x_hf", "x hf-eager fp32"), ("x_optimum", "x optimum (same prec.)"),
           ("labels", "labels vs torch-eager"), ("max_logit_diff", "max |logit diff|"), ("package_mb", "files MB"),
           ("load", "load 1m")]


def classifier_report(results: dict[str, dict[str, Any]], reference: str = REFERENCE) -> dict[str, Any]:
    import math

    ref = results.get(reference, {})
    speed = {label: r["rows"][0]["seq_s"] for label, r in results.items() if r.get("rows")}
    rows = []
    for label, result in results.items():
        if not result.get("rows"):
            continue
        name, precision = label.split("/")
        row = dict(result["rows"][0])
        labels_note, diff = "-", None
        if ref.get("labels") and label != reference:
            same = sum(a == b for a, b in zip(ref["labels"], result["labels"]))
            labels_note = f"{same}/{len(ref['labels'])}"
            diff = max(abs(a - b) for ra, rb in zip(ref["logits"], result["logits"]) for a, b in zip(ra, rb))
            diff = diff if math.isfinite(diff) else None
        elif label == reference:
            labels_note = "reference"
        rows.append({
            "engine": name, "precision": precision, **row,
            "x_torch": suite.ratio(row["seq_s"], speed.get("torch-eager/fp32")),
            "x_hf": suite.ratio(row["seq_s"], speed.get("hf-eager/fp32")),
            "x_optimum": suite.ratio(row["seq_s"], speed.get(f"optimum/{precision}")),
            "labels": labels_note, "max_logit_diff": diff,
            "package_mb": result.get("artifacts", {}).get("package_mb"),
            "load": (row.get("load_average_start") or [None])[0],
        })
    return {"rows": rows}


def run(args) -> dict[str, Any]:
    from benchmarks.workspace import prepare

    settings = suite.settings_from(args)
    case_dir = prepare(CASE, args.work, settings, tiny=args.tiny, rebuild=args.rebuild)
    results = suite.run_engines(suite.select(ENGINES, args), case_dir, settings)
    summary = classifier_report(results)
    suite.print_report(f"Classifier ({case_dir.name}): batch 32 x 128 tokens", markdown_table(summary["rows"], COLUMNS),
                       suite.errors_of(results))
    return suite.case_output(CASE, case_dir, settings, results, summary, args.json)


def main() -> None:
    suite.case_main(__doc__, CASE, run)


if __name__ == "__main__":
    main()
