"""Engines, child processes and the per-case report shared by bench_*.py and run_all.py.

An Engine is one column of a comparison: a script run as a child process (`--job --out`),
in this interpreter or in a peer environment, with options (our export variant, the genai
precision). Every engine of a case goes through the same steps:

    prepare  build its artifacts once (our packages are built by workspace.prepare; the
             peers convert to HF, export with Optimum, build with the genai builder), untimed
    bench    time the case and return rows + generated tokens
    cold     (run by bench_cold_start) a fresh process: import, load, generate 8 tokens

To add a variant of ours, add an entry to workspace.CASES[...].variants; to add a peer
variant, add an Engine to the case's ENGINES list.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import (
    BENCH_DIR,
    DEFAULT_WORK_DIR,
    Settings,
    compare_tokens,
    load_average,
    log,
    peer_python,
    run_child,
    write_json,
)


@dataclass(frozen=True)
class Engine:
    name: str  # "onnxformer", "torch-eager", "hf-eager", "optimum", "genai"
    script: str  # relative to benchmarks/
    precision: str = "fp32"
    tag: str = ""  # a variant of the same engine and precision (e.g. "mha": fused attention)
    venvs: tuple[str, ...] = ()  # peer environments to try in order; () = this interpreter
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 1200.0

    @property
    def label(self) -> str:
        return f"{self.name}{'+' + self.tag if self.tag else ''}/{self.precision}"

    def python(self) -> tuple[Path | None, str]:
        """(interpreter, environment name); (None, reason) when no environment has it."""
        if not self.venvs:
            return Path(sys.executable), "main"
        for venv in self.venvs:
            exe = peer_python(venv)
            if exe is not None:
                return exe, venv
        return None, f"no environment {' or '.join('.venv-bench-' + v for v in self.venvs)} (run benchmarks/setup_peers.sh)"


def our_engines(case_name: str) -> list[Engine]:
    """One onnxformer engine per export variant of workspace.CASES[case_name]."""
    from benchmarks.workspace import CASES, variant_precision

    engines = []
    for variant, options in CASES[case_name].variants.items():
        precision = variant_precision(options)
        engines.append(Engine("onnxformer", "ours.py", precision, tag="" if variant == precision else variant,
                              options={"variant": variant}))
    return engines


def run_engine(engine: Engine, case_dir: Path, mode: str, settings: Settings, **extra: Any) -> dict[str, Any]:
    exe, env_name = engine.python()
    if exe is None:
        return {"skipped": env_name}
    tag = engine.label.replace("/", "-")
    job = {"case_dir": str(case_dir), "engine": engine.name, "precision": engine.precision, "mode": mode,
           "options": engine.options, "settings": settings.to_dict(), **extra}
    job_file = case_dir / "jobs" / f"{tag}.{mode}.json"
    write_json(job_file, job)
    out = case_dir / "jobs" / f"{tag}.{mode}.out.json"
    load_before = load_average()
    result = run_child([exe, BENCH_DIR / engine.script, "--job", job_file, "--out", out], out,
                       timeout=engine.timeout, label=f"{engine.label} {mode}")
    result.setdefault("meta", {}).update(environment=env_name, load_average_start=load_before)
    return result


def run_engines(engines: Sequence[Engine], case_dir: Path, settings: Settings) -> dict[str, dict[str, Any]]:
    """prepare once, then `settings.rounds` rounds of bench over all engines (one process
    each, the order reversed every other round); {label: merged result}.

    Other jobs on the machine come and go within minutes, and engines are measured minutes
    apart; a round-robin with the best round per row (see merge_rounds) keeps a burst of
    load from landing on one engine only.
    """
    prepared: dict[str, dict[str, Any]] = {}
    for engine in engines:
        log(f"{case_dir.name}: {engine.label} prepare")
        prepared[engine.label] = run_engine(engine, case_dir, "prepare", settings)
        if "skipped" in prepared[engine.label] or "error" in prepared[engine.label]:
            log(f"  {engine.label}: {prepared[engine.label].get('skipped') or prepared[engine.label].get('error')}")
    ready = [e for e in engines if not {"skipped", "error"} & set(prepared[e.label])]
    rounds: dict[str, list[dict[str, Any]]] = {e.label: [] for e in ready}
    for r in range(settings.rounds):
        for engine in (ready if r % 2 == 0 else ready[::-1]):
            log(f"{case_dir.name}: {engine.label} bench (round {r + 1}/{settings.rounds}, load {load_average()[0]})")
            result = run_engine(engine, case_dir, "bench", settings)
            if "error" in result:
                log(f"  {engine.label}: {result['error']}")
            rounds[engine.label].append(result)
    results = {label: prepared[label] for label in prepared if label not in rounds}
    for engine in engines:
        if engine.label in rounds:
            merged = merge_rounds(rounds[engine.label])
            merged["artifacts"] = prepared[engine.label].get("artifacts", {})
            merged.setdefault("meta", {}).update(prepare_meta=prepared[engine.label].get("meta", {}))
            results[engine.label] = merged
    return results


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the rounds of an engine: per row (batch) the round with the best figure
    (highest decode_tok_s or seq_s: extra load only ever slows a run down), the floor with the
    lowest run_ms, tokens of the first round (`tokens_stable` says whether every round
    produced the same); every round is kept under "rounds"."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    merged = dict(ok[0])
    key = lambda row: row.get("decode_tok_s") or row.get("seq_s") or 0.0  # noqa: E731
    rows = []
    for i, row in enumerate(ok[0].get("rows", [])):
        candidates = [(r["rows"][i], n) for n, r in enumerate(ok) if len(r.get("rows", [])) > i]
        best, n = max(candidates, key=lambda c: key(c[0]))
        rows.append({**best, "round": n + 1, "load_average_start": ok[n]["meta"].get("load_average_start")})
    merged["rows"] = rows
    first = next((row["round"] for row in rows if row.get("batch") == 1), None)
    if first is not None and ok[first - 1].get("floor"):
        merged["floor"] = ok[first - 1]["floor"]  # measured in the same process as the batch-1 row
    merged["tokens_stable"] = all(r.get("tokens") == ok[0].get("tokens") for r in ok)
    merged["rounds"] = [{k: v for k, v in r.items() if k not in ("tokens", "logits")} for r in runs]
    return merged


# --------------------------------------------------------------------------------------------
# Token checks and ratios
# --------------------------------------------------------------------------------------------


def check_tokens(results: dict[str, dict[str, Any]], reference: str) -> dict[str, Any]:
    """Every engine's greedy tokens against `reference`'s (per batch key)."""
    ref = results.get(reference, {}).get("tokens")
    if not ref:
        return {}
    checks = {}
    for label, result in results.items():
        tokens = result.get("tokens")
        if label == reference or not tokens:
            continue
        checks[label] = {key: compare_tokens(ref[key], tokens[key]) for key in ref if key in tokens}
    return checks


def token_note(checks: dict[str, Any], label: str, key: str) -> str:
    c = checks.get(label, {}).get(key)
    if c is None:
        return "-"
    if c["equal"]:
        return "equal"
    return f"{c['rows_equal']}/{c['rows']} rows, {100 * c['token_agreement']:.0f}% tokens"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def generation_report(results: dict[str, dict[str, Any]], reference: str) -> dict[str, Any]:
    """Rows with ratios and token checks, the floor figures and the overhead over them."""
    checks = check_tokens(results, reference)
    by_key = {(label, row["batch"]): row for label, r in results.items() for row in r.get("rows", [])}
    rows = []
    for label, result in results.items():
        name, precision = label.split("/")
        for row in result.get("rows", []):
            b = row["batch"]
            tok_s = row["decode_tok_s"]
            get = lambda other: by_key.get((other, b), {}).get("decode_tok_s")  # noqa: E731
            note = "reference" if label == reference else token_note(checks, label, f"b{b}")
            if precision != "fp32" and note != "-":
                note = f"({precision}) {note}"
            rows.append({
                "engine": name, "precision": precision, "batch": b,
                "prefill_ms": row["prefill_ms"], "decode_ms_per_step": row["decode_ms_per_step"],
                "decode_tok_s": tok_s,
                "x_torch": ratio(tok_s, get("torch-eager/fp32")),
                "x_hf": ratio(tok_s, get("hf-eager/fp32")),
                "x_optimum": ratio(tok_s, get("optimum/fp32")),
                "x_genai": ratio(tok_s, get(f"genai/{precision}")),
                "tokens": note,
                "package_mb": result.get("artifacts", {}).get("package_mb"),
                "load": (row.get("load_average_start") or [None])[0],
            })
    floors = []
    for label, result in results.items():
        floor = result.get("floor")
        if not floor:
            continue
        step = by_key.get((label, 1), {}).get("decode_ms_per_step")
        in_loop = floor.get("in_loop", {})
        floors.append({"engine": label, "past": floor["past"], "run_ms": floor["run_ms"],
                       "iobinding_ms": floor["iobinding_ms"], "loop_ms_per_step": step,
                       "overhead_vs_run": ratio(step, floor["run_ms"]) - 1 if step else None,
                       "in_loop_ms": in_loop.get("ms_per_step"), "in_loop_run_ms": in_loop.get("session_run_ms"),
                       "in_loop_step_extras_ms": in_loop.get("step_extras_ms"),
                       "in_loop_generation_ms": in_loop.get("generation_loop_ms"),
                       "in_loop_overhead": in_loop.get("overhead")})
    return {"rows": rows, "floors": floors, "token_checks": checks}


GENERATION_COLUMNS = [
    ("engine", "engine"), ("precision", "precision"), ("batch", "batch"), ("prefill_ms", "prefill ms"),
    ("decode_ms_per_step", "decode ms/step"), ("decode_tok_s", "decode tok/s"), ("x_torch", "x torch-eager"),
    ("x_hf", "x hf-eager"), ("x_optimum", "x optimum"), ("x_genai", "x genai (same prec.)"),
    ("tokens", "tokens vs torch-eager"), ("package_mb", "files MB"), ("load", "load 1m"),
]
FLOOR_COLUMNS = [
    ("engine", "engine"), ("past", "past"), ("run_ms", "floor: session.run ms"), ("iobinding_ms", "floor: iobinding ms"),
    ("loop_ms_per_step", "generate ms/step (b1)"), ("overhead_vs_run", "vs floor"),
    ("in_loop_ms", "in loop: ms/step"), ("in_loop_run_ms", "of which session run"),
    ("in_loop_step_extras_ms", "prefill()/advance() extras"), ("in_loop_generation_ms", "generation loop"),
    ("in_loop_overhead", "in-loop overhead"),
]


# --------------------------------------------------------------------------------------------
# CLI shared by the bench_*.py scripts
# --------------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repeats and new tokens (a smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny models instead of the issue's shapes (harness check)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK_DIR, help="where models, packages and exports live")
    p.add_argument("--engines", nargs="*", default=None,
                   help="run only these engines (names or name/precision, e.g. onnxformer genai/int4)")
    p.add_argument("--no-peers", action="store_true", help="only the engines of the main environment")
    p.add_argument("--rebuild", action="store_true", help="re-export our packages even if they are current")
    p.add_argument("--rounds", type=int, default=None,
                   help="round-robin passes over the engines, best round per row (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for every engine (default: the number of CPUs)")
    p.add_argument("--json", type=Path, default=None, help="also write this case's results here")
    return p


def select(engines: Sequence[Engine], args: argparse.Namespace) -> list[Engine]:
    chosen = [e for e in engines if not (args.no_peers and e.venvs)]
    if args.engines:
        chosen = [e for e in chosen if e.name in args.engines or e.label in args.engines]
    return chosen


def settings_from(args: argparse.Namespace) -> Settings:
    """Every engine gets the same intra-op thread count, all cores unless --threads says
    otherwise: engines' own defaults differ (onnxruntime-genai 0.18 runs 1 thread on this
    2-core VM, the others 2)."""
    threads = args.threads or os.cpu_count()
    changes = {"threads": threads, **({"rounds": args.rounds} if args.rounds else {})}
    return Settings.quick(**changes) if args.quick else Settings(**changes)


def print_report(title: str, table: str, notes: Sequence[str] = ()) -> None:
    print(f"\n## {title}\n")
    print(table)
    for note in notes:
        print(f"\n{note}")


def case_output(case: str, case_dir: Path, settings: Settings, results: dict[str, dict[str, Any]],
                summary: dict[str, Any], json_path: Path | None) -> dict[str, Any]:
    """A case's result (what run_all collects), also written to `json_path` when given."""
    out = {"case": case, "case_dir": str(case_dir), "settings": settings.to_dict(), "engines": results, **summary}
    if json_path:
        write_json(json_path, out)
    return out


def case_main(doc: str, case: str, run) -> None:
    """The command line of one case's script: its docstring's first line is the description."""
    args = parser(doc.splitlines()[0]).parse_args()
    log(f"{case}: start")
    run(args)


def errors_of(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for label, result in results.items():
        if "error" in result:
            out.append(f"{label}: FAILED: {result['error'].splitlines()[0]}")
        elif "skipped" in result:
            out.append(f"{label}: skipped ({result['skipped']})")
    return out

