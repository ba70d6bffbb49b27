"""The benchmark harness (benchmarks/), on a tiny model: no timing is asserted, only that the
suite measures what it says and compares tokens correctly."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the benchmark cases are built with torch")

from benchmarks import ours, suite  # noqa: E402
from benchmarks.common import Settings, compare_tokens, decode_figures  # noqa: E402
from benchmarks.workspace import prepare  # noqa: E402


def test_decode_figures_pair_the_calls():
    figures = decode_figures(batch=2, new_tokens=11, first=[0.010, 0.012, 0.011], full=[0.110, 0.112, 0.131])
    assert figures["prefill_ms"] == pytest.approx(11.0)
    assert figures["decode_ms_per_step"] == pytest.approx(10.0)  # median of 0.100, 0.100, 0.120 over 10 steps
    assert figures["decode_tok_s"] == pytest.approx(200.0)
    noisy = decode_figures(batch=1, new_tokens=2, first=[0.02], full=[0.01])
    assert noisy["decode_tok_s"] is None  # noise larger than the signal is not a figure


def test_compare_tokens_reports_the_first_difference():
    same = compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same["equal"] and same["token_agreement"] == 1.0
    diff = compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 6]])
    assert not diff["equal"] and diff["rows_equal"] == 0
    assert diff["first_difference"] == {"row": 1, "step": 1}


@pytest.mark.slow
def test_tiny_decoder_runtime_and_eager_agree(tmp_path):
    settings = Settings(warmup=0, repeats=1, decoder_new_tokens=4, floor_repeats=2)
    case_dir = prepare("decoder", tmp_path, settings, tiny=True, variants=("fp32",))
    job = {"case_dir": str(case_dir), "mode": "bench", "options": {"variant": "fp32"}, "settings": settings.to_dict()}
    results = {
        "onnxformer/fp32": ours.run({**job, "engine": "onnxformer"}),
        "torch-eager/fp32": ours.run({**job, "engine": "torch-eager"}),
    }
    report = suite.generation_report(results, "torch-eager/fp32")
    assert [r["batch"] for r in report["rows"]] == [1, 8, 1, 8]
    assert all(c["equal"] for checks in report["token_checks"].values() for c in checks.values())
    assert len(results["onnxformer/fp32"]["tokens"]["b8"]) == 8
    assert all(len(row) == 4 for row in results["onnxformer/fp32"]["tokens"]["b8"])
    assert report["floors"][0]["past"] == 100
