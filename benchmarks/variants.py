"""Accuracy of the export variants (fp32, int8, int4, fp16) on the built-in tasks.

Takes the checkpoints `onnxformer quickstart` trained (default runs/quickstart/<arch>/run),
exports each variant, scores the full test split through the runtime, and prints a Markdown
table (the one in benchmarks/VARIANTS.md):

    onnxformer quickstart            # once, to train the four checkpoints
    python benchmarks/variants.py    # then this
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from onnxformer.export.exporter import ExportOptions, export_checkpoint
from onnxformer.export.quickstart import JOBS, package_megabytes, score_package

VARIANTS = {
    "fp32": ExportOptions(),
    "int8": ExportOptions(quantize="int8"),
    "int4": ExportOptions(quantize="int4"),
    "fp16": ExportOptions(dtype="float16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/quickstart", help="quickstart output directory")
    args = parser.parse_args()
    print("| arch | task | metric | " + " | ".join(VARIANTS) + " | sizes (MB) |")
    print("|---|---|---|" + "---|" * len(VARIANTS) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for job in JOBS:
            checkpoint = Path(args.runs) / job.arch / "run"
            scores, sizes = [], []
            for name, options in VARIANTS.items():
                started = time.perf_counter()
                report = export_checkpoint(checkpoint, Path(tmp) / f"{job.arch}-{name}", options)
                score = score_package(report.path, job)
                scores.append(f"{score.metric:.1%}")
                sizes.append(f"{package_megabytes(report.path):.2f}")
                print(f"  {job.arch} {name}: {score.metric:.4f} ({time.perf_counter() - started:.0f}s)", flush=True,
                      file=__import__("sys").stderr)
            print(f"| {job.arch} | {job.task} | {job.metric} | " + " | ".join(scores) + f" | {' / '.join(sizes)} |")


if __name__ == "__main__":
    main()
