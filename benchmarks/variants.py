"""Accuracy of the export variants (fp32, int8, int4, fp16, int8-dynamic) on the built-in tasks.

Takes the checkpoints `onnxformer quickstart` trained (default runs/quickstart/<arch>/run),
exports each variant, scores the full test split through the runtime, and prints a Markdown
table (the ones in benchmarks/VARIANTS.md):

    onnxformer quickstart            # once, to train the four checkpoints
    python benchmarks/variants.py    # then this

`--classifier RUN DATA` adds an encoder classifier trained elsewhere, scored on DATA's test
split (e.g. `shared:banking77`); `--arch` and `--variants` select rows and columns.
int8-dynamic applies to encoder models only (n/a elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from onnxformer.export.exporter import DYNAMIC_QUANT_ARCHS, ExportOptions, export_checkpoint
from onnxformer.export.quickstart import JOBS, Job, package_megabytes, score_package

VARIANTS = {
    "fp32": ExportOptions(),
    "int8": ExportOptions(quantize="int8"),
    "int4": ExportOptions(quantize="int4"),
    "fp16": ExportOptions(dtype="float16"),
    "int8-dynamic": ExportOptions(quantize="int8-dynamic"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/quickstart", help="quickstart output directory")
    parser.add_argument("--arch", action="append", choices=[j.arch for j in JOBS], default=None,
                        help="only the quickstart checkpoints of these architectures (repeatable; default all)")
    parser.add_argument("--classifier", nargs=2, action="append", default=[], metavar=("RUN", "DATA"),
                        help="also score this encoder classifier run on DATA's test split (repeatable)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="only these variants (default all)")
    args = parser.parse_args()
    rows = [(job, Path(args.runs) / job.arch / "run") for job in JOBS if args.arch is None or job.arch in args.arch]
    rows += [(Job("encoder", "classify", data, "accuracy"), Path(run)) for run, data in args.classifier]
    default_data = {job.arch: job.data for job in JOBS}
    print("| arch | task | metric | " + " | ".join(args.variants) + " | sizes (MB) |")
    print("|---|---|---|" + "---|" * len(args.variants) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (job, checkpoint) in enumerate(rows):
            scores, sizes = [], []
            for name in args.variants:
                options = VARIANTS[name]
                if options.quantize == "int8-dynamic" and job.arch not in DYNAMIC_QUANT_ARCHS:
                    scores.append("n/a")
                    sizes.append("-")
                    continue
                started = time.perf_counter()
                report = export_checkpoint(checkpoint, Path(tmp) / f"{n}-{name}", options)
                score = score_package(report.path, job)
                scores.append(f"{score.metric:.1%}")
                sizes.append(f"{package_megabytes(report.path):.2f}")
                print(f"  {job.arch} {job.data} {name}: {score.metric:.4f} ({time.perf_counter() - started:.0f}s)",
                      flush=True, file=sys.stderr)
            task = job.task if job.data == default_data[job.arch] else f"{job.task} ({job.data})"
            print(f"| {job.arch} | {task} | {job.metric} | " + " | ".join(scores) + f" | {' / '.join(sizes)} |")


if __name__ == "__main__":
    main()
