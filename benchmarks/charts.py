"""Draw the benchmark tables of RESULTS.md as charts: one PNG per case, in benchmarks/charts/.

    python benchmarks/charts.py                                   # from benchmarks/results.json
    python benchmarks/charts.py --results /tmp/bench.json --out /tmp/charts
    python benchmarks/charts.py --import-results WORK/results-tinyllama-run1.json WORK/results-tinyllama-run2.json

Reads the JSON that `run_all.py` writes (the decoder, encoder-decoder, classifier and cold-start
cases: their "rows" lists, the same figures as the markdown tables) and, with
--import-results, the results files of `bench_import.py` (issue 15; one file per run, each
drawn as its own bar). Every chart is grouped bars: one group per engine (and precision),
one bar per batch size, run or phase; a panel per figure. A case missing from the JSON is
skipped. Needs matplotlib (the [report] extra). Only reads the results: nothing is measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.json"
CHARTS_DIR = BENCH_DIR / "charts"
DPI = 80  # small files (< 100 KB each) that still read at a glance
SERIES_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def _figure(panels: int, *, columns: int = 1, width: float = 9.0, height: float = 2.9):
    try:
        from matplotlib.figure import Figure  # no pyplot: drawn through the Agg canvas, no display
    except ImportError:
        raise SystemExit("benchmarks/charts.py draws with matplotlib: pip install 'onnxformer[report]'") from None
    rows = -(-panels // columns)
    fig = Figure(figsize=(width, height * rows + 0.5), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]], *, ylabel: str,
                 title: str = "", better: str = "") -> None:
    """One group of bars per entry of `groups`, one bar per series (None: no bar), the value
    written on each bar; `better` ("lower"/"higher") goes into the axis label."""
    n = max(len(series), 1)
    width = 0.8 / n
    peak = max((v for values in series.values() for v in values if v is not None), default=1.0)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not shown:
            continue
        bars = ax.bar([x for x, _ in shown], [v for _, v in shown], width * 0.92, label=name,
                      color=SERIES_COLORS[i % len(SERIES_COLORS)])
        ax.bar_label(bars, labels=[_short(v) for _, v in shown], fontsize=6, padding=1)
    _style(ax, groups, ylabel=ylabel, title=title, better=better, peak=peak, legend=len(series) > 1)


def _style(ax, groups: Sequence[str], *, ylabel: str, title: str, better: str, peak: float, legend: bool) -> None:
    """Engine names under the groups (ours in bold), the axis label, headroom for the values."""
    long = max(map(len, groups), default=0) > 10
    ax.set_xticks(range(len(groups)), groups, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
    for label in ax.get_xticklabels():
        if label.get_text().startswith("onnxformer"):
            label.set_fontweight("bold")
    ax.set_ylabel(ylabel + (f"\n({better} is better)" if better else ""), fontsize=8)
    ax.set_ylim(0, peak * 1.15)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, frameon=False, ncols=4)


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _label(row: dict[str, Any]) -> str:
    return row["engine"] if row.get("precision", "fp32") == "fp32" else f"{row['engine']} {row['precision']}"


def _by_engine(rows: list[dict[str, Any]], key: str, series_of: Callable[[dict[str, Any]], str]):
    """(groups, {series: values}) from rows: groups are engine labels in table order."""
    groups = list(dict.fromkeys(_label(r) for r in rows))
    names = list(dict.fromkeys(series_of(r) for r in rows))
    table = {(_label(r), series_of(r)): r.get(key) for r in rows}
    return groups, {name: [table.get((g, name)) for g in groups] for name in names}


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# One function per case: results["results"][case] -> a Figure
# --------------------------------------------------------------------------------------------


def decoder(case: dict[str, Any], title: str):
    rows = case["rows"]
    fig, (step, prefill) = _figure(2)
    batch = lambda r: f"batch {r['batch']}"  # noqa: E731
    grouped_bars(step, *_by_engine(rows, "decode_ms_per_step", batch), ylabel="decode ms/step", better="lower",
                 title="decode step")
    grouped_bars(prefill, *_by_engine(rows, "prefill_ms", batch), ylabel="prefill ms", better="lower",
                 title="prefill (prompt + first token)")
    fig.suptitle(title, fontsize=10)
    return fig


def encoder_decoder(case: dict[str, Any], title: str):
    rows = case["rows"]
    fig, axes = _figure(3, columns=3, width=11.0, height=3.4)
    one = lambda r: f"batch {r['batch']}"  # noqa: E731
    for ax, key, label in zip(axes, ("decode_ms_per_step", "prefill_ms"), ("decode ms/step", "prefill ms")):
        grouped_bars(ax, *_by_engine(rows, key, one), ylabel=label, better="lower", title=label.split()[0])
    storage = case.get("storage", [])
    groups = [s["engine"] for s in storage]
    grouped_bars(axes[2], groups, {"ONNX files": [s["package_mb"] for s in storage],
                                   "fp32 parameters": [s["param_mb"] for s in storage]},
                 ylabel="MB", better="lower", title="storage")
    fig.suptitle(title, fontsize=10)
    return fig


def classifier(case: dict[str, Any], title: str):
    rows = case["rows"]
    fig, (ax,) = _figure(1, height=3.6)
    groups = [_label(r) for r in rows]
    grouped_bars(ax, groups, {"seq/s (model.classify: tokenization included)": [r.get("seq_s") for r in rows],
                              "seq/s (session only)": [r.get("session_seq_s") for r in rows]},
                 ylabel="sequences/s", better="higher")
    fig.suptitle(title, fontsize=10)
    return fig


def cold_start(case: dict[str, Any], title: str):
    rows = case["rows"]
    fig, (times, rss) = _figure(2, columns=2, width=10.0, height=3.4)
    groups = [r["engine"] for r in rows]
    # Per engine: the wall time, and beside it the three phases the child timed, stacked.
    width, xs = 0.38, range(len(rows))
    wall = times.bar([x - width / 2 for x in xs], [r["wall_s"] for r in rows], width * 0.92, label="wall (median)",
                     color=SERIES_COLORS[0])
    times.bar_label(wall, labels=[_short(r["wall_s"]) for r in rows], fontsize=6, padding=1)
    bottom = [0.0] * len(rows)
    for i, (name, key) in enumerate((("import", "import_s"), ("load", "load_s"), ("generate 8", "generate_s")), 1):
        values = [r.get(key) or 0.0 for r in rows]
        bars = times.bar([x + width / 2 for x in xs], values, width * 0.92, bottom=bottom, label=name,
                         color=SERIES_COLORS[i])
        bottom = [b + v for b, v in zip(bottom, values)]
    times.bar_label(bars, labels=[_short(b) for b in bottom], fontsize=6, padding=1)
    _style(times, groups, ylabel="seconds", better="lower", title="new process: wall, and import + load + 8 tokens",
           peak=max(max(r["wall_s"] for r in rows), max(bottom)), legend=True)
    grouped_bars(rss, groups, {"peak RSS": [r.get("peak_rss_mb") for r in rows]}, ylabel="peak RSS MB",
                 better="lower", title="memory")
    fig.suptitle(title, fontsize=10)
    return fig


def import_runs(runs: list[dict[str, Any]], names: list[str], title: str):
    """bench_import.py (issue 15): export time and memory, decode speed; one bar per run."""
    engines = list(dict.fromkeys(label for run in runs for label, e in run["engines"].items() if "export" in e))
    groups = [e.replace("/", " ") for e in engines]

    def figure(get) -> dict[str, list[float | None]]:
        return {name: [_get(run["engines"].get(e, {}), get) for e in engines] for name, run in zip(names, runs)}

    fig, axes = _figure(4, columns=2, width=10.0, height=3.0)
    grouped_bars(axes[0], groups, figure(("export", "wall_s")), ylabel="export s", better="lower", title="export time")
    grouped_bars(axes[1], groups, figure(("export", "peak_rss_mb")), ylabel="export peak RSS MiB", better="lower",
                 title="export memory")
    for ax, batch in zip(axes[2:], (1, 8)):
        grouped_bars(ax, groups, figure(("decode", "rows", batch, "decode_tok_s")), ylabel="decode tok/s",
                     better="higher", title=f"decode, batch {batch}")
    fig.suptitle(title, fontsize=10)
    return fig


def _get(entry: dict[str, Any], path: tuple) -> float | None:
    value: Any = entry
    for key in path:
        if isinstance(key, int):  # a batch size: the row of that batch
            value = next((r for r in value if r.get("batch") == key), None) if isinstance(value, list) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return None
    return float(value) if isinstance(value, (int, float)) else None


CASES = {  # case in results.json -> (PNG name, drawing function, chart title)
    "decoder": ("decoder.png", decoder, "Decoder-only (LLaMA-style, 33.5M): prompt 32, 128 new tokens, greedy"),
    "encoder-decoder": ("encoder-decoder.png", encoder_decoder, "Encoder-decoder (BART-style, 33.6M): batch 1"),
    "classifier": ("classifier.png", classifier, "Encoder classification (BERT-style): batch 32 x 128 tokens"),
    "cold-start": ("cold-start.png", cold_start, "Cold start: new process, decoder fp32"),
}


def draw_all(results: dict[str, Any], out: Path, import_files: Sequence[Path] = ()) -> list[Path]:
    """Every chart the inputs allow; returns the PNGs written."""
    written = []
    started = results.get("info", {}).get("started", "")
    for case, (name, draw, title) in CASES.items():
        if case in results.get("results", {}):
            written.append(_save(draw(results["results"][case], f"{title} ({started})" if started else title),
                                 out / name))
    if import_files:
        runs = [json.loads(Path(p).read_text()) for p in import_files]
        names = [f"run {i} ({r.get('info', {}).get('started', '?')[11:16]})" for i, r in enumerate(runs, 1)]
        size = runs[0].get("folder", {}).get("size", "")
        written.append(_save(import_runs(runs, names, f"Importing a Hugging Face checkpoint ({size} shape)"),
                             out / "import.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"run_all.py's JSON (default {RESULTS})")
    parser.add_argument("--import-results", type=Path, nargs="*", default=[],
                        help="bench_import.py results files, one per run (drawn as import.png)")
    parser.add_argument("--out", type=Path, default=CHARTS_DIR, help=f"folder for the PNGs (default {CHARTS_DIR})")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if not results and not args.import_results:
        print(f"nothing to draw: {args.results} does not exist and no --import-results", file=sys.stderr)
        return 2
    for path in draw_all(results, args.out, args.import_results):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
