"""`onnxformer eval` (runtime/evaluate.py): the metrics against hand-computed values and
sacrebleu's own, then the command end to end on the committed artifacts (--json), then bad
input. Torch-free: runs in CI's runtime-only venv (the BLEU/chrF tests skip without sacrebleu)."""

from __future__ import annotations

import json
import math

import pytest

from onnxformer.runtime import evaluate as ev
from onnxformer.runtime.errors import ConfigError, DataError, InputError
from support import ARTIFACTS

pytestmark = pytest.mark.runtime_only


def _sacrebleu():
    return pytest.importorskip("sacrebleu", reason="BLEU/chrF need sacrebleu (pip install 'onnxformer[eval]')")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def test_classification_scores_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    s = ev.classification_scores(gold, pred, labels=("c", "b", "a"))
    assert s.examples == 5 and s.accuracy == pytest.approx(3 / 5)
    rows = {r.label: r for r in s.per_class}
    assert [r.label for r in s.per_class] == ["c", "b", "a"]  # the package's label order
    # a: TP 1, FP 1, FN 1 -> F1 2/4; b: TP 2, FP 1, FN 0 -> 4/5; c: never predicted -> 0
    assert (rows["a"].support, rows["a"].predicted, rows["a"].correct) == (2, 2, 1)
    assert (rows["b"].precision, rows["b"].recall, rows["b"].f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (rows["c"].precision, rows["c"].recall, rows["c"].f1) == (0.0, 0.0, 0.0)
    assert s.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_counts_classes_in_gold_or_predictions_only():
    # scikit-learn's default: a package label that neither occurs nor is predicted is left out;
    # a predicted class absent from gold counts (F1 0).
    s = ev.classification_scores(["x", "x"], ["x", "y"], labels=("x", "y", "z"))
    assert [r.label for r in s.per_class] == ["x", "y"]
    assert s.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)


def test_bleu_and_chrf_by_hand():
    _sacrebleu()
    # one sentence, 13a tokens: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty
    s = ev.generation_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert s.bleu == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert s.exact_match == 0.0
    # chrF is corpus-level: character n-gram counts summed over sentences (spaces dropped), F-beta=2
    # per order 1..6, averaged over the orders both sides have. Orders 1-3 exist here:
    # 1: 4 of 5 chars match (P = R = 0.8); 2: "xy", "yz" of "ab", "xy", "yz" (2/3); 3: "xyz" (1).
    s = ev.generation_scores(["ab", "xyz"], ["ac", "xyz"])
    assert s.chrf == pytest.approx(100 * (0.8 + 2 / 3 + 1.0) / 3)
    assert s.exact_match == 0.5
    assert s.signatures["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_generation_scores_equal_sacrebleu_and_strip_whitespace():
    sacrebleu = _sacrebleu()
    hyps = ["ein Hund läuft im Park", "zwei Männer stehen", " eine Frau liest ein Buch ", "Kinder"]
    refs = ["ein Hund rennt im Park", "zwei Männer stehen", "eine Frau liest ein Buch", "drei Kinder spielen"]
    s = ev.generation_scores(hyps, refs)
    stripped = [h.strip() for h in hyps]
    assert s.bleu == pytest.approx(sacrebleu.corpus_bleu(stripped, [refs]).score)
    assert s.chrf == pytest.approx(sacrebleu.corpus_chrf(stripped, [refs]).score)
    assert s.exact_match == 0.5  # the third matches once its surrounding spaces are stripped
    perfect = ev.generation_scores(refs, refs)
    assert (perfect.bleu, perfect.chrf, perfect.exact_match) == pytest.approx((100.0, 100.0, 1.0))


def test_metric_argument_errors():
    with pytest.raises(DataError, match="no examples"):
        ev.classification_scores([], [])
    with pytest.raises(ConfigError, match="same length"):
        ev.classification_scores(["a"], ["a", "b"])


def test_missing_sacrebleu_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sacrebleu(name, *args, **kwargs):
        if name.split(".")[0] == "sacrebleu":
            raise ImportError("No module named 'sacrebleu'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sacrebleu)
    with pytest.raises(ConfigError, match=r"onnxformer\[eval\]"):
        ev.generation_scores(["a"], ["a"])


def test_match_labels():
    assert ev.match_labels(["1", 0, " 1 "], ("0", "1")) == ["1", "0", "1"]
    assert ev.match_labels([2], ("LABEL_0", "LABEL_1", "LABEL_2")) == ["LABEL_2"]  # generic names take ids
    with pytest.raises(DataError, match=r"d\.tsv:7: label 'neutral' is not one of .*'negative', 'positive'"):
        ev.match_labels(["positive", "neutral"], ("negative", "positive"), [3, 7], "d.tsv")
    with pytest.raises(DataError, match="label 1 is not one of"):  # no id fallback with real names
        ev.match_labels([1], ("negative", "positive"))
