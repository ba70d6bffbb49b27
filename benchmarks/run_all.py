"""Run the whole benchmark suite and check the issue's goals.

    bash benchmarks/setup_peers.sh          # once: the peer environments (optional)
    python benchmarks/run_all.py            # ~15 min on 2 cores; writes benchmarks/results.json
    python benchmarks/run_all.py --quick    # smoke run: fewer repeats and new tokens
    python benchmarks/run_all.py --cases decoder --engines onnxformer genai   # a subset

Builds the models (random weights, fixed seed) and exports them with onnxformer (cached in
benchmarks/.work/, rebuilt when the export or modeling source changes), converts them for
the peers, runs every engine in its own process (the peers in their own environments; a peer
whose environment is missing is skipped), prints one table per case and the goals, and
writes the JSON (every figure, token check, version and load average) and a markdown copy
of the tables.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_classifier, bench_cold_start, bench_decoder, bench_encoder_decoder, suite  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BENCH_DIR,
    load_average,
    log,
    machine_info,
    markdown_table,
    peer_python,
    versions,
    write_json,
)

CASES = {
    "decoder": bench_decoder,
    "encoder-decoder": bench_encoder_decoder,
    "classifier": bench_classifier,
    "cold-start": bench_cold_start,
}
GOAL_COLUMNS = [("goal", "goal"), ("measured", "measured"), ("target", "target"), ("status", "status")]


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _peer_versions() -> dict[str, Any]:
    import subprocess

    found = {}
    for venv, packages in (("optimum", ["torch", "transformers", "optimum", "optimum-onnx", "onnxruntime"]),
                           ("genai", ["torch", "transformers", "onnxruntime-genai", "onnxruntime", "onnx"])):
        exe = peer_python(venv)
        if exe is None:
            found[venv] = "absent"
            continue
        code = ("import json, importlib.metadata as m; "
                f"print(json.dumps({{p: m.version(p) for p in {packages!r}}}))")
        out = subprocess.run([str(exe), "-c", code], capture_output=True, text=True)
        found[venv] = json.loads(out.stdout) if out.returncode == 0 else out.stderr[-300:]
    return found


# --------------------------------------------------------------------------------------------
# Goals (the targets)
# --------------------------------------------------------------------------------------------


def _goal(goal: str, value: float | None, target: float, *, at_most: bool = False, unit: str = "x") -> dict[str, Any]:
    if value is None:
        status = "not measured"
    else:
        met = value <= target if at_most else value >= target
        status = "MET" if met else "not met"
    fmt = (lambda v: f"{v:.2f}{unit}") if unit == "x" else (lambda v: f"{100 * v:.1f}%")
    return {"goal": goal, "measured": "-" if value is None else fmt(value),
            "target": ("<= " if at_most else ">= ") + fmt(target), "status": status, "value": value}


def _best(speed: dict, precision: str, batch: int | None = None) -> tuple[str | None, float | None]:
    """The fastest onnxformer variant at a precision: (engine column, figure)."""
    found = [(engine, v) for (engine, p, *b), v in speed.items()
             if engine.startswith("onnxformer") and p == precision and (batch is None or b == [batch]) and v]
    return max(found, key=lambda e: e[1]) if found else (None, None)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each met by the fastest onnxformer variant at that precision."""
    out = []
    dec = results.get("decoder", {})
    speed = {(r["engine"], r["precision"], r["batch"]): r["decode_tok_s"] for r in dec.get("rows", [])}
    for batch in (1, 8):
        for p in ("fp32", "int8", "int4"):
            engine, ours = _best(speed, p, batch)
            out.append(_goal(f"decoder b{batch} {p} ({engine}): decode tok/s vs genai {p}",
                             suite.ratio(ours, speed.get(("genai", p, batch))), 1.0))
        engine, ours = _best(speed, "fp32", batch)
        for peer, name, target in (("optimum", "Optimum", 2.0), ("hf-eager", "HF transformers eager", 3.5),
                                   ("torch-eager", "our PyTorch eager", 3.5)):
            out.append(_goal(f"decoder b{batch} fp32 ({engine}): vs {name}",
                             suite.ratio(ours, speed.get((peer, "fp32", batch))), target))
    encdec = results.get("encoder-decoder", {})
    espeed = {(r["engine"], r["precision"], r["batch"]): r["decode_tok_s"] for r in encdec.get("rows", [])}
    engine, ours = _best(espeed, "fp32", 1)
    out.append(_goal(f"enc-dec b1 ({engine}): decode tok/s vs Optimum", suite.ratio(ours, espeed.get(("optimum", "fp32", 1))), 2.0))
    stored = {r["engine"]: r["stored_ratio"] for r in encdec.get("storage", [])}
    out.append(_goal("enc-dec: ONNX bytes / fp32 parameter bytes (1.0 = no weight stored twice)",
                     stored.get("onnxformer/fp32"), 1.01, at_most=True))
    floors = {f["engine"]: f for f in dec.get("floors", [])}
    ours_floor = floors.get("onnxformer/fp32", {})
    out.append(_goal("decoder b1 fp32: runtime time per step over its own session runs (same calls)",
                     ours_floor.get("in_loop_overhead"), 0.10, at_most=True, unit="%"))
    out.append(_goal("decoder b1 fp32: runtime ms/step over one prepared session.run at past 100",
                     ours_floor.get("overhead_vs_run"), 0.10, at_most=True, unit="%"))
    cold = {r["engine"]: r["wall_s"] for r in results.get("cold-start", {}).get("rows", [])}
    out.append(_goal("cold start: onnxformer wall / genai wall", suite.ratio(cold.get("onnxformer/fp32"), cold.get("genai/fp32")),
                     1.0, at_most=True))
    cls = {(r["engine"], r["precision"]): r["seq_s"] for r in results.get("classifier", {}).get("rows", [])}
    engine, int8 = _best(cls, "int8")
    for peer, name in (("hf-eager", "HF transformers"), ("torch-eager", "our PyTorch")):
        out.append(_goal(f"classifier ({engine} int8): seq/s vs {name} fp32", suite.ratio(int8, cls.get((peer, "fp32"))), 2.5))
    return out


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = suite.parser(__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results.json; .work/results-smoke.json with --quick/--tiny)")
    args = p.parse_args()
    smoke = args.quick or args.tiny
    out_path = args.out or (args.work / "results-smoke.json" if smoke else BENCH_DIR / "results.json")
    markdown_path = out_path.with_suffix(".md") if args.out or smoke else args.work / "results-latest.md"

    buffer = io.StringIO()
    start = time.perf_counter()
    info = {"machine": machine_info(), "versions": versions(["onnxruntime", "numpy", "tokenizers", "torch", "onnx",
                                                             "onnxformer"]),
            "peer_versions": _peer_versions(), "command": " ".join(["python", *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        print(f"# onnxformer benchmark suite ({info['started']})\n")
        print(f"machine: {info['machine']['nproc']} x {info['machine']['cpu']}; load average at start "
              f"{info['machine']['load_average']}")
        print(f"main: {info['versions']}")
        print(f"peers: {info['peer_versions']}")
        for name in args.cases:
            log(f"== {name} (load average {load_average()})")
            load_before = load_average()
            results[name] = CASES[name].run(args)
            results[name]["load_average"] = {"start": load_before, "end": load_average()}
        table = goals(results)
        suite.print_report("Goals of the issue", markdown_table(table, GOAL_COLUMNS))
        elapsed = time.perf_counter() - start
        print(f"\nfinished in {elapsed / 60:.1f} min; load average at the end {load_average()}")
    info.update(elapsed_s=elapsed, load_average_end=load_average())
    write_json(out_path, {"info": info, "goals": table, "results": results})
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(buffer.getvalue())
    log(f"wrote {out_path} and {markdown_path}")


if __name__ == "__main__":
    main()
