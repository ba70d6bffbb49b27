"""Cold start: a new process imports its engine, loads the decoder model (and its
tokenizer) and generates 8 tokens for one prompt; plus the import cost of the libraries.

    python benchmarks/bench_cold_start.py [--quick] [--tiny] [--engines ...]

`wall s` is measured by the parent from process start to exit (interpreter start included);
the child reports its own import / load / generate split and its peak resident memory.
Files are in the OS page cache (the models were loaded before), so this is a warm-disk
cold start.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite  # noqa: E402
from benchmarks.common import REPO, log, markdown_table, peer_python, write_json  # noqa: E402
from benchmarks.suite import Engine  # noqa: E402

CASE = "decoder"
ENGINES = [
    Engine("onnxformer", "ours.py", "fp32", options={"variant": "fp32"}),
    Engine("hf-eager", "peers/run_hf.py", venvs=("genai", "optimum")),
    Engine("optimum", "peers/run_optimum.py", venvs=("optimum",)),
    Engine("genai", "peers/run_genai.py", "fp32", venvs=("genai",)),
]
# (label, environment, modules): the import cost of each engine's libraries, in a new process.
IMPORTS = [
    ("python (nothing)", None, []),
    ("numpy + onnxruntime + tokenizers", None, ["numpy", "onnxruntime", "tokenizers"]),
    ("onnxformer.runtime", None, ["onnxformer.runtime"]),
    ("torch", None, ["torch"]),
    ("transformers + torch", "genai", ["torch", "transformers"]),
    ("optimum.onnxruntime", "optimum", ["optimum.onnxruntime"]),
    ("onnxruntime_genai", "genai", ["onnxruntime_genai"]),
]
COLUMNS = [("engine", "engine"), ("wall_s", "wall s (median)"), ("import_s", "import s"), ("load_s", "load s"),
           ("generate_s", "generate 8 s"), ("peak_rss_mb", "peak RSS MB"), ("x_onnxformer", "wall / onnxformer")]
IMPORT_COLUMNS = [("what", "import"), ("environment", "environment"), ("wall_s", "process wall s (median)"),
                  ("over_bare_s", "over bare python s")]


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def import_costs(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for what, env, modules in IMPORTS:
        exe = sys.executable if env is None else peer_python(env)
        if exe is None:
            continue
        code = "; ".join(f"import {m}" for m in modules) or "pass"
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([str(exe), "-c", code], cwd=REPO, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        rows.append({"what": what, "environment": env or "main", "wall_s": statistics.median(times)})
    bare = {r["environment"]: r["wall_s"] for r in rows if r["what"] == "python (nothing)"}
    for r in rows:
        base = bare.get("main")
        r["over_bare_s"] = r["wall_s"] - base if base is not None else None
    return rows


def _compile_bytecode() -> None:
    """Byte-compile onnxformer's sources, as `pip install` does for every package (the peers'
    site-packages included). Without it, a checkout with PYTHONDONTWRITEBYTECODE=1 (as on the
    benchmark machine) recompiles our modules from source in every new process: ~25 ms of
    the cold start that no installed package pays."""
    import compileall

    for folder in ("modeling", "export", "runtime"):
        compileall.compile_dir(str(REPO / folder), quiet=1, maxlevels=0)


def run(args) -> dict[str, Any]:
    from benchmarks.workspace import prepare

    _compile_bytecode()
    settings = suite.settings_from(args)
    case_dir = prepare(CASE, args.work, settings, tiny=args.tiny, rebuild=args.rebuild)
    results: dict[str, Any] = {}
    for engine in suite.select(ENGINES, args):
        prepared = suite.run_engine(engine, case_dir, "prepare", settings)
        if "skipped" in prepared or "error" in prepared:
            results[engine.label] = prepared
            continue
        log(f"cold start: {engine.label} x {settings.cold_start_runs}")
        runs = [suite.run_engine(engine, case_dir, "cold", settings) for _ in range(settings.cold_start_runs)]
        failed = [r for r in runs if "error" in r]
        if failed:
            results[engine.label] = failed[0]
            continue
        results[engine.label] = {
            "runs": runs,
            "wall_s": _median(runs, "wall_s"), "import_s": _median(runs, "import_s"),
            "load_s": _median(runs, "load_s"), "generate_s": _median(runs, "generate_s"),
            "peak_rss_mb": statistics.median(r["meta"]["peak_rss_mb"] for r in runs),
        }
    ours = results.get("onnxformer/fp32", {}).get("wall_s")
    rows = [{"engine": label, **{k: v for k, v in r.items() if k != "runs"},
             "x_onnxformer": suite.ratio(r.get("wall_s"), ours)}
            for label, r in results.items() if "wall_s" in r]
    imports = import_costs(max(settings.cold_start_runs, 3))
    suite.print_report(f"Cold start ({case_dir.name}): new process, import + load + generate 8 tokens",
                       markdown_table(rows, COLUMNS), suite.errors_of(results))
    print("\nImport cost (new process, `python -c 'import ...'`):\n")
    print(markdown_table(imports, IMPORT_COLUMNS))
    out = {"case": "cold-start", "case_dir": str(case_dir), "settings": settings.to_dict(), "engines": results,
           "rows": rows, "imports": imports}
    if args.json:
        write_json(args.json, out)
    return out


def main() -> None:
    args = suite.parser(__doc__.splitlines()[0]).parse_args()
    log("cold start: start")
    run(args)


if __name__ == "__main__":
    main()
