"""Every objective learns: a short run of the tiny preset on built-in data clears a stated bar.

Each case trains a few hundred steps (a few seconds on 2 CPU cores; every other setting at
the task's default) and checks that the validation loss falls by a stated factor from the
untrained model's (the step-0 line of metrics.jsonl), or that a metric on the held-out test
split passes a stated bar. The value measured when the bar was set (seed 0, torch 2.13 CPU,
one thread) is in the comment beside it; the bars leave room for other CPUs and math
libraries, not for a broken objective. benchmarks/TRAINING.md has the full-length runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("torch", reason="training needs the [train] extra (torch)")

from onnxformer.modeling.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    arch: str
    task: str
    data: str
    steps: int
    nsp: bool = False
    loss_falls_by: float | None = None  # untrained / final validation loss, at least
    bars: dict[str, float] = field(default_factory=dict)  # final metric -> its minimum


CASES = {
    # valid loss 6.573 -> 1.123: 5.85x
    "causal-lm": Case("decoder", "causal-lm", "builtin:corpus", steps=150, loss_falls_by=4.0),
    # valid masked-token loss 6.110 -> 2.828: 2.16x
    "mlm": Case("encoder", "mlm", "builtin:corpus", steps=250, loss_falls_by=1.8),
    # valid masked-token loss 6.144 -> 3.559: 1.73x; test NSP accuracy 0.615 (chance: 0.5)
    "mlm+nsp": Case("encoder", "mlm", "builtin:corpus", steps=250, nsp=True, loss_falls_by=1.5,
                    bars={"test/nsp_accuracy": 0.57}),
    # valid loss 6.603 -> 1.356: 4.87x
    "denoise": Case("encoder-decoder", "denoise", "builtin:corpus", steps=150, loss_falls_by=3.5),
    # test exact match 0.880
    "seq2seq": Case("encoder-decoder", "seq2seq", "builtin:numbers", steps=150, bars={"test/exact_match": 0.7}),
    # test exact match 0.846
    "sft": Case("decoder", "sft", "builtin:numbers", steps=250, bars={"test/exact_match": 0.7}),
    # test exact match 0.822
    "prefix-lm": Case("prefix-lm", "prefix-lm", "builtin:numbers", steps=250, bars={"test/exact_match": 0.7}),
    # test accuracy 0.880 (two classes)
    "classify": Case("encoder", "classify", "builtin:sentiment", steps=250, bars={"test/accuracy": 0.8}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_objective_learns(name, tmp_path):
    case = CASES[name]
    out = tmp_path / "run"
    result = train(TrainConfig(
        arch=case.arch, task=case.task, data=case.data, nsp=case.nsp, steps=case.steps,
        eval_every=case.steps, out_dir=str(out), progress=False,  # evaluations: untrained and final only
    ))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    untrained = next(line["loss"] for line in lines if line["step"] == 0 and line["split"] == "valid")
    final = result.metrics["valid/loss"]
    measured = f"{name}: valid loss {untrained:.3f} -> {final:.3f} ({untrained / final:.2f}x), " + ", ".join(
        f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("test/") and "examples" not in k
    )
    if case.loss_falls_by is not None:
        assert untrained / final >= case.loss_falls_by, measured
    for key, minimum in case.bars.items():
        assert result.metrics[key] >= minimum, measured
