"""`onnxformer report RUN_DIR`: the PNG and the HTML page of a training run (modeling/report.py).

One real training run (20 steps of the tiny preset on the built-in sentiment set, ~3 s) is
drawn and its page checked against metrics.jsonl read here with json alone; the other tests
write metrics.jsonl files by hand (the shapes train.py writes, and broken ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report needs the [report] extra (matplotlib)")
pytest.importorskip("jinja2", reason="the report needs the [report] extra (jinja2)")
import matplotlib.image  # noqa: E402

from onnxformer.modeling import report  # noqa: E402
from onnxformer.runtime.cli import main  # noqa: E402
from onnxformer.runtime.errors import CheckpointError, ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class _Page(HTMLParser):
    """The <img> sources and the final-metrics table (#final) of a report page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._in_final = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table" and attrs.get("id") == "final":
            self._in_final = True
        elif self._in_final and tag == "tr":
            self.rows.append([])
        elif self._in_final and tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_final = False
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_final and self._in_cell:
            self.rows[-1][-1] += data

    def final(self) -> dict[str, dict[str, str]]:
        header, *rows = self.rows
        return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _last_records(metrics: Path) -> dict[str, dict]:
    """split -> its last record, straight from the file."""
    last: dict[str, dict] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["step"] >= last.get(record["split"], {"step": -1})["step"]:
            last[record["split"]] = record
    return last


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="the training run needs the [train] extra (torch)")
    from onnxformer.modeling.train import TrainConfig, train

    out = tmp_path_factory.mktemp("report") / "sentiment"
    train(TrainConfig(arch="encoder", task="classify", data="builtin:sentiment", out_dir=str(out), steps=20,
                      batch_size=4, vocab_size=300, log_every=2, eval_every=5, eval_examples=16, progress=False))
    return out


@pytest.mark.slow
def test_report_of_a_real_run(run_dir, tmp_path, capsys):
    out = tmp_path / "pages" / "run.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    html, png = (Path(p) for p in capsys.readouterr().out.split())
    assert (html, png) == (out, tmp_path / "pages" / "run.png")

    image = matplotlib.image.imread(png)  # decodes: (rows, columns, RGBA)
    panels = 3  # loss, accuracy (the classifier's metric), learning rate
    assert image.shape[1] == 750 and image.shape[0] > panels * 150, image.shape
    assert image[..., :3].std() > 0.05  # drawn, not blank

    page = _page(html)
    assert page.images == ["run.png"]
    table = page.final()
    last = _last_records(run_dir / "metrics.jsonl")
    assert set(table) == set(last) == {"train", "valid", "test"}
    for split, record in last.items():
        assert int(table[split]["step"]) == record["step"] == 20
        for key in ("loss", "accuracy", "lr"):
            if key in record:
                assert float(table[split][key]) == pytest.approx(record[key], rel=1e-5), (split, key)
    text = html.read_text(encoding="utf-8")
    assert "<th>task</th><td>classify</td>" in text and "step-000020" in text
    assert sorted(p.name for p in html.parent.iterdir()) == ["run.html", "run.png"]  # no temporaries


@pytest.mark.slow
def test_the_default_output_is_in_the_run_dir_and_needs_no_torch(run_dir):
    """In a fresh interpreter where torch cannot be imported: report.html and report.png in RUN_DIR."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from onnxformer.runtime.cli import main\n"
            f"raise SystemExit(main(['report', {str(run_dir)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(run_dir / "report.html"), str(run_dir / "report.png")]
    assert matplotlib.image.imread(run_dir / "report.png").shape[1] == 750


# --- hand-written metrics files -----------------------------------------------------------------


def _write(run: Path, *lines: str, newline: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if newline else "")
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run


SEQ2SEQ = [  # what a seq2seq run writes: step-0 valid without exact match, then periodic and final
    '{"examples": 12.0, "loss": 5.6, "perplexity": 270.4, "split": "valid", "step": 0}',
    '{"loss": 5.1, "lr": 0.001, "split": "train", "step": 5, "tokens_per_s": 900.0}',
    '{"exact_match": 0.0, "examples": 12.0, "loss": 3.2, "perplexity": 24.5, "split": "valid", "step": 5}',
    '{"loss": 2.0, "lr": 0.0001, "split": "train", "step": 10, "tokens_per_s": 950.0}',
    '{"exact_match": 0.25, "examples": 40.0, "loss": 1.9, "perplexity": 6.69, "split": "valid", "step": 10}',
]


def test_every_logged_metric_gets_a_panel_and_a_column(tmp_path):
    run = _write(tmp_path / "s2s", *SEQ2SEQ)
    result = report.write_report(run)
    table = _page(result.html).final()
    assert table["valid"]["exact_match"] == "0.25" and table["valid"]["perplexity"] == "6.69"
    assert table["train"]["loss"] == "2" and table["train"]["exact_match"] == ""
    assert report.metric_names(report.read_metrics(run)) == ["exact_match", "perplexity"]
    five = matplotlib.image.imread(result.png).shape  # loss, exact match, perplexity, lr
    three = matplotlib.image.imread(report.write_report(_write(tmp_path / "cls", *SEQ2SEQ[1:2])).png).shape
    assert five[1] == three[1] and five[0] > three[0]
    assert "No checkpoint yet" in result.html.read_text(encoding="utf-8")  # no `latest`: a run before its first save


def test_the_page_escapes_what_it_shows(tmp_path):
    run = _write(tmp_path / "<b>run&", *SEQ2SEQ)
    text = report.write_report(run).html.read_text(encoding="utf-8")
    assert "<b>run" not in text and "&lt;b&gt;run&amp;" in text


def test_an_unfinished_last_line_is_skipped(tmp_path):
    """The trainer may be appending right now: a last line without its newline that does not parse."""
    run = _write(tmp_path / "live", *SEQ2SEQ, '{"loss": 1.8, "lr"', newline=False)
    assert [r.line for r in report.read_metrics(run)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("case", ["missing", "file", "no-metrics", "empty", "damaged", "no-step", "not-object"])
def test_bad_run_dirs_name_the_path_and_the_fix(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case == "file":
        run.write_text("x")
    elif case == "no-metrics":
        run.mkdir()
    elif case == "empty":
        _write(run, "")
    elif case == "damaged":
        _write(run, SEQ2SEQ[0], '{"loss": 5.1, "lr": 0.0', SEQ2SEQ[2])
    elif case == "no-step":
        _write(run, SEQ2SEQ[0], '{"loss": 5.1, "split": "train"}')
    elif case == "not-object":
        _write(run, "[1, 2]")
    with pytest.raises(CheckpointError) as caught:
        report.write_report(run)
    metrics = run / "metrics.jsonl"
    where, code, fix = {  # the start of the message, the code, the fix it gives
        "missing": (f"{run} does not exist", "E_MISSING_FILE", "pass the --out folder of `onnxformer train`"),
        "file": (f"{run} is a file", "E_MISSING_FILE", "pass the --out folder of `onnxformer train`"),
        "no-metrics": (f"{run} has no metrics.jsonl", "E_MISSING_FILE", "pass the --out folder of a run"),
        "empty": (f"{metrics} holds no records", "E_MISSING_FILE", "wait for the run's first log line"),
        "damaged": (f"{metrics}:2: a damaged line", "E_CHECKPOINT", "delete that line"),
        "no-step": (f"{metrics}:2: a record", "E_CHECKPOINT", "delete the line"),
        "not-object": (f"{metrics}:1: a record", "E_CHECKPOINT", "delete the line"),
    }[case]
    assert str(caught.value).startswith(where) and fix in str(caught.value), str(caught.value)
    assert caught.value.code == code
    assert main(["report", str(run)]) == 2  # the CLI: error[CODE] message, exit 2
    assert f"error[{code}]: {where}" in capsys.readouterr().err
    assert not run.is_dir() or not (run / "report.html").exists()


def test_a_damaged_checkpoint_pointer_is_named(tmp_path):
    run = _write(tmp_path / "run", *SEQ2SEQ)
    (run / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="latest does not name a checkpoint folder"):
        report.write_report(run)


def test_out_must_name_a_page_or_a_folder(tmp_path):
    run = _write(tmp_path / "run", *SEQ2SEQ)
    with pytest.raises(ConfigError, match="ending in .html"):
        report.write_report(run, tmp_path / "report.txt")
    folder = tmp_path / "pages"
    folder.mkdir()
    assert report.write_report(run, folder).html == folder / "report.html"


def test_a_failed_write_keeps_the_previous_report(tmp_path, monkeypatch):
    run = _write(tmp_path / "run", *SEQ2SEQ[:2])
    first = report.write_report(run)
    before = first.html.read_bytes(), first.png.read_bytes()
    _write(run, *SEQ2SEQ)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(CheckpointError) as caught:
        report.write_report(run)
    assert caught.value.code == "E_DISK" and "No space left" in str(caught.value)
    monkeypatch.undo()
    assert (first.html.read_bytes(), first.png.read_bytes()) == before
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "report.html", "report.png"]


@pytest.mark.parametrize("missing", ["matplotlib", "jinja2"])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, missing):
    run = _write(tmp_path / "run", *SEQ2SEQ)
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ConfigError, match=r"not installed: pip install 'onnxformer\[report\]'") as caught:
        report.write_report(run)
    assert missing in str(caught.value)
    assert not (run / "report.html").exists()


# --- benchmarks/charts.py ---------------------------------------------------------------------------


def test_benchmark_charts_draw_every_case_of_the_results(tmp_path):
    """From the committed benchmarks/results.json: one small PNG per case, drawn bars = table rows."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import charts
    finally:
        sys.path.remove(str(REPO))
    results = json.loads((REPO / "benchmarks" / "results.json").read_text())
    run = {"info": {"started": "2026-12-04 20:31:44 UTC"}, "folder": {"size": "small"}, "engines": {
        "onnxformer/fp32": {"export": {"wall_s": 3.0, "peak_rss_mb": 900.0},
                            "decode": {"rows": [{"batch": 1, "decode_tok_s": 50.0}, {"batch": 8, "decode_tok_s": 300.0}]}},
        "genai/fp32": {"export": {"wall_s": 1.0, "peak_rss_mb": 500.0}, "decode": {"rows": [{"batch": 1, "decode_tok_s": 55.0}]}},
        "optimum/int4": {"skipped": "no venv"},
    }}
    (tmp_path / "run1.json").write_text(json.dumps(run))
    written = charts.draw_all(results, tmp_path / "charts", [tmp_path / "run1.json"])
    assert sorted(p.name for p in written) == sorted([name for name, _, _ in charts.CASES.values()] + ["import.png"])
    for path in written:
        assert path.stat().st_size < 100 * 1024, path
        rows, columns, _ = matplotlib.image.imread(path).shape
        assert columns >= 700 and rows >= 250, (path.name, rows, columns)
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == sorted(p.name for p in written)  # no temporaries
    rows = results["results"]["decoder"]["rows"]
    groups, series = charts._by_engine(rows, "decode_ms_per_step", lambda r: f"batch {r['batch']}")
    assert sum(v is not None for values in series.values() for v in values) == len(rows)
    assert series["batch 1"][groups.index("genai")] == next(
        r["decode_ms_per_step"] for r in rows if (r["engine"], r["precision"], r["batch"]) == ("genai", "fp32", 1))
