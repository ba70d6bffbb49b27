"""`onnxformer report RUN_DIR`: a training run's curves as a PNG and a short HTML page around it.

Reads what `onnxformer train` wrote into its run directory (modeling/train.py):

* ``metrics.jsonl``, one JSON object a line, each with an integer ``step`` and a ``split``:
  ``train`` lines every ``log_every`` steps (``loss``, ``lr``, ``tokens_per_s``), ``valid``
  records at step 0, every ``eval_every`` steps and at the end (``loss``, ``examples`` and the
  task's metrics: ``accuracy``, ``perplexity``, ``exact_match``, ``nsp_*``), and a final
  ``test`` record where the data has a test split;
* the latest checkpoint's ``trainer_state.json`` (the TrainConfig, parameter counts) and
  ``config.json`` (the model's sizes), for the page's summary; a run still before its first
  save has none, and the page says so.

The PNG has one panel for the loss (train and validation), one per task metric and one for
the learning rate, all over optimizer steps. The page holds the run's settings, the final
value of every metric per split, and the image. Both files are written atomically (a
temporary file beside the target, renamed over it).

No torch here: a report can be drawn beside a running training, or on a machine with only
the plotting extra. matplotlib (Agg, no display) and jinja2 come from the [report] extra,
imported on first use.

    onnxformer report runs/sentiment                    # runs/sentiment/report.html + report.png
    onnxformer report runs/sentiment --out /tmp/a.html  # /tmp/a.html + /tmp/a.png
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxformer.runtime import atomic
from onnxformer.runtime.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

REPORT_EXTRA = "pip install 'onnxformer[report]'"
METRICS_FILE = "metrics.jsonl"  # modeling/train.py's METRICS_FILE (that module imports torch)
LATEST = "latest"  # modeling/checkpoint.py's pointer to the newest checkpoint folder
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
REPORT_NAME = "report"  # default output: RUN_DIR/report.html and RUN_DIR/report.png

# Numbers of a record that are not a task metric: the loss has its own panel, lr its own, the
# rest are bookkeeping (shown in the table, not drawn).
NOT_METRICS = {"loss", "lr", "examples", "tokens_per_s"}
# The panels' order: the common task metrics first, any other in name order after them.
METRIC_ORDER = ("accuracy", "exact_match", "perplexity", "nsp_accuracy", "nsp_loss")
SPLIT_ORDER = ("train", "valid", "test")
# The run settings the page shows (where the run's TrainConfig has them), then the model's.
TRAIN_FIELDS = (
    "arch", "task", "data", "valid_data", "preset", "from_checkpoint", "steps", "batch_size", "grad_accum",
    "lr", "warmup", "min_lr_ratio", "weight_decay", "max_len", "lora_rank", "bitfit", "bf16", "seed",
)
MODEL_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "n_decoder_layers", "d_ff",
                "max_seq_len", "pos_encoding", "norm", "activation")


@dataclass(frozen=True)
class Record:
    """One line of metrics.jsonl: where it is, its step and split, and its numbers."""

    line: int  # 1-based line number in the file
    step: int
    split: str
    values: dict[str, float]


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote."""

    html: Path
    png: Path


# ============================================================================================
# Reading the run directory
# ============================================================================================


def read_metrics(run_dir: str | os.PathLike) -> list[Record]:
    """Every record of RUN_DIR/metrics.jsonl, in file order.

    A missing run directory or metrics file, or one without a record, is a CheckpointError; so
    is a line that is not a JSON object with an integer "step" and a string "split" (named as
    path:line). A last line without its newline that does not parse is one the trainer is
    writing right now: it is skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"{run_dir} {what}: pass the --out folder of `onnxformer train`", code="E_MISSING_FILE")
    path = run_dir / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{run_dir} has no {METRICS_FILE}: it is not the --out folder of `onnxformer train`, or its run has not "
            f"logged yet (the first lines come after the first evaluation or log_every steps); pass the --out "
            f"folder of a run", code="E_MISSING_FILE") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            if number == len(lines):  # no newline after it: a line being appended right now
                logger.info("%s:%d: skipping the unfinished last line", path, number)
                continue
            raise CheckpointError(
                f"{path}:{number}: a damaged line, not JSON ({raw[:60]!r}); a write cut short by a full disk or "
                f"a killed run leaves one: delete that line (`--resume` of the run drops such lines too)"
            ) from None
        records.append(_record(record, path, number))
    if not records:
        raise CheckpointError(f"{path} holds no records yet: wait for the run's first log line or evaluation, "
                              f"or pass the --out folder of a run that has logged", code="E_MISSING_FILE")
    return records


def _record(record: Any, path: Path, number: int) -> Record:
    step = record.get("step") if isinstance(record, dict) else None
    split = record.get("split") if isinstance(record, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(split, str) or not split:
        raise CheckpointError(
            f"{path}:{number}: a record of metrics.jsonl is a JSON object with an integer \"step\" (>= 0) and a "
            f"string \"split\"; got {json.dumps(record)[:80]}: delete the line, or point at the --out folder "
            f"of `onnxformer train`"
        )
    values = {k: float(v) for k, v in record.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Record(number, step, split, values)


def final_metrics(records: list[Record]) -> dict[str, Record]:
    """split -> its last record (the highest step; of equal steps, the later line), splits in
    SPLIT_ORDER then by name."""
    last: dict[str, Record] = {}
    for record in records:
        if record.split not in last or record.step >= last[record.split].step:
            last[record.split] = record
    return {split: last[split] for split in _ordered(last, SPLIT_ORDER)}


def metric_names(records: list[Record]) -> list[str]:
    """The task metrics the run logged, in panel order."""
    return _ordered({k for r in records for k in r.values if k not in NOT_METRICS}, METRIC_ORDER)


def _ordered(names, first: tuple[str, ...]) -> list[str]:
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path} is damaged (not JSON); the checkpoint is broken: point `latest` at an "
                              f"intact step-N folder, or report on another run") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is broken: point `latest` at an "
                              f"intact step-N folder, or report on another run")
    return data


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The page's summary: the latest checkpoint's name, step, settings, parameter counts and
    model sizes; {"checkpoint": None} before the first save."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return {"checkpoint": None}
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    folder = run_dir / name
    if not name or name != os.path.basename(name) or name in (".", "..") or not (folder / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} does not name a checkpoint folder of {run_dir} ({name[:80]!r}); the run "
                              f"directory is damaged: write the name of an intact step-N folder into it")
    state = _read_json(folder / TRAINER_STATE_FILE)
    model = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    train_config = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    parameters = state.get("parameters") if isinstance(state.get("parameters"), dict) else {}
    return {
        "checkpoint": name,
        "step": state.get("step"),
        "world_size": state.get("world_size"),
        "train": {k: train_config[k] for k in TRAIN_FIELDS if k in train_config},
        "model": {k: model[k] for k in MODEL_FIELDS if model.get(k) is not None
                  and (k != "n_decoder_layers" or model.get("arch") == "encoder-decoder")},
        "parameters": {k: parameters[k] for k in ("total", "trainable") if k in parameters},
    }


# ============================================================================================
# Drawing and writing
# ============================================================================================


def _matplotlib():
    try:
        # A bare Figure (no pyplot): saved through the Agg canvas, no display, and the caller's
        # pyplot backend and figures are left alone.
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"onnxformer report draws with matplotlib, which is not installed: {REPORT_EXTRA}") from None
    return Figure


def _jinja():
    try:
        import jinja2
    except ImportError:
        raise ConfigError(f"onnxformer report writes its page with jinja2, which is not installed: {REPORT_EXTRA}") from None
    return jinja2


def _series(records: list[Record], split: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((r.step, r.values[key]) for r in records if r.split == split and key in r.values)
    return [s for s, _ in points], [v for _, v in points]


def _minor_log_label(value: float, _position) -> str:
    """Minor ticks of a log axis: 20, 50, 200, 500 labelled (plainly), the others not."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def _is_fraction(key: str) -> bool:
    """A metric that is a share of examples (accuracy, exact match, F1), drawn from 0 to 1."""
    return key in ("accuracy", "exact_match") or key.endswith(("_accuracy", "_f1")) or key in ("f1", "macro_f1")


SPLIT_STYLE = {"train": dict(color="tab:blue", lw=1.2), "valid": dict(color="tab:orange", marker="o", ms=3.5, lw=1.5),
               "test": dict(color="tab:green", marker="s", ms=5, lw=0)}


def plot(records: list[Record], *, title: str = "") -> bytes:
    """The PNG: the loss per split, one panel per task metric, the learning rate; over steps."""
    Figure = _matplotlib()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    splits = _ordered({r.split for r in records}, SPLIT_ORDER)
    panels = ["loss", *metric_names(records), "lr"]
    fig = Figure(figsize=(7.5, 1.9 * len(panels) + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, panels):
        drawn = False
        for split in splits:
            steps, values = _series(records, split, key)
            if steps:
                style = SPLIT_STYLE.get(split, dict(marker="^", ms=4, lw=1))
                ax.plot(steps, values, label=split, **style)
                drawn = True
        label = {"lr": "learning rate", "exact_match": "exact match"}.get(key, key.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        finite = [v for r in records for k, v in r.values.items() if k == key and math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 20 and key != "lr":
            ax.set_yscale("log")  # a perplexity from ~vocab size down to ~10
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        elif finite and _is_fraction(key) and 0.0 <= min(finite) and max(finite) <= 1.0:
            ax.set_ylim(-0.03, 1.03)  # a share: drawn on its whole scale
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if drawn and key != "lr":
            ax.legend(loc="best", fontsize="small", frameon=False)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>onnxformer run: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 0.2em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p>Run directory <code>{{ run_dir }}</code>, {{ n_records }} records in <code>metrics.jsonl</code>{% if summary.checkpoint %}, latest checkpoint <code>{{ summary.checkpoint }}</code> (step {{ summary.step }}){% endif %}.</p>
<h2>Run</h2>
{% if summary.checkpoint %}
<table>
{% for key, value in summary.train.items() %}<tr><th>{{ key }}</th><td>{{ value if value is not none else "-" }}</td></tr>
{% endfor %}{% for key, value in summary.parameters.items() %}<tr><th>parameters ({{ key }})</th><td class="num">{{ "{:,}".format(value) }}</td></tr>
{% endfor %}{% if summary.world_size %}<tr><th>processes</th><td>{{ summary.world_size }}</td></tr>
{% endif %}</table>
{% if summary.model %}<h3>Model</h3>
<table>
{% for key, value in summary.model.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>{% endif %}
{% else %}
<p>No checkpoint yet: the run is still before its first save, or stopped before it. The curves below are what it logged.</p>
{% endif %}
<h2>Final metrics</h2>
<p>The last record of each split; <em>examples</em> is how many the evaluation read.</p>
<table id="final">
<tr><th>split</th><th>step</th>{% for name in columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for split, record in final.items() %}<tr><th>{{ split }}</th><td class="num">{{ record.step }}</td>{% for name in columns %}<td class="num">{{ fmt(record.values[name]) if name in record.values else "" }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Curves</h2>
<p><img src="{{ image }}" alt="loss, task metrics and learning rate over optimizer steps" width="{{ width }}"></p>
</body>
</html>
"""


def format_value(value: float) -> str:
    """How the page writes a number: 6 significant digits."""
    return f"{value:.6g}"


def render_html(run_dir: Path, records: list[Record], summary: dict[str, Any], image: str, *, width: int = 750) -> str:
    jinja2 = _jinja()
    final = final_metrics(records)
    keys = {k for r in final.values() for k in r.values}
    columns = _ordered(keys, ("loss", *METRIC_ORDER)) if keys else []
    columns = [c for c in columns if c not in ("lr", "tokens_per_s", "examples")] + \
              [c for c in ("examples", "lr", "tokens_per_s") if c in keys]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(PAGE).render(
        title=_title(run_dir, summary), run_dir=str(run_dir), n_records=len(records), summary=summary,
        final=final, columns=columns, fmt=format_value, image=image, width=width,
    )


def _title(run_dir: Path, summary: dict[str, Any]) -> str:
    train = summary.get("train") or {}
    what = " ".join(str(train[k]) for k in ("task", "arch") if train.get(k))
    return f"{run_dir.resolve().name}" + (f": {what}" if what else "")


def _replace_bytes(path: Path, data: bytes) -> None:
    """atomic.replace_text for bytes: a temporary file beside `path` (named so that
    atomic.remove_stale_temporaries knows it), fsync'ed, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        atomic.make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic.fsync_dir(path.parent)


def _outputs(run_dir: Path, out: str | os.PathLike | None) -> Report:
    if out is None:
        html = run_dir / f"{REPORT_NAME}.html"
    else:
        html = Path(out)
        if html.is_dir():
            html = html / f"{REPORT_NAME}.html"
        elif html.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--out names the HTML page (the PNG goes beside it); got {str(html)!r}: pass a path "
                              f"ending in .html, or a folder")
    return Report(html=html, png=html.with_suffix(".png"))


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Report:
    """Draw RUN_DIR's curves and write the PNG and the HTML page (default RUN_DIR/report.html,
    RUN_DIR/report.png); returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    summary = run_summary(run_dir)
    report = _outputs(run_dir, out)
    png = plot(records, title=_title(run_dir, summary))
    html = render_html(run_dir, records, summary, image=report.png.name)
    try:
        report.html.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(report.html.parent, f"{report.html.stem}.*")
        _replace_bytes(report.png, png)  # first: the page never names an image that is not there
        atomic.replace_text(report.html, html)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise CheckpointError(f"cannot write the report to {report.html.parent}: {err.strerror or err}{where}; "
                              f"free disk space or pass a writable --out", code="E_DISK") from None
    logger.info("report of %d records: %s, %s", len(records), report.html, report.png)
    return report


# ============================================================================================
# The subcommand
# ============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Draw a training run's loss, task metric and learning rate over steps (a PNG) and write a short "
        "HTML page around it (the run's settings, the final metrics). Needs the [report] extra: "
        f"{REPORT_EXTRA}."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `onnxformer train`")
    parser.add_argument("--out", metavar="PATH", default=None,
                        help="the HTML page to write (the PNG goes beside it, same name, .png); a folder: "
                             "report.html in it (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    report = write_report(args.run_dir, args.out)
    print(report.html)
    print(report.png)
    return 0


__all__ = ["Record", "Report", "final_metrics", "format_value", "metric_names", "plot", "read_metrics",
           "render_html", "run_summary", "write_report"]
