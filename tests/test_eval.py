"""`onnxformer eval` (runtime/evaluate.py): the metrics against hand-computed values and
sacrebleu's own, then the command end to end on the committed artifacts (--json), then bad
input. Torch-free: runs in CI's runtime-only venv (the BLEU/chrF tests skip without sacrebleu)."""

from __future__ import annotations

import json
import re

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


# ------------------------------------------------------------------------------------------------
# The command, end to end on the committed artifacts
# ------------------------------------------------------------------------------------------------
# Sentences of builtin:sentiment's test split and numbers of builtin:numbers' test split, which
# the artifacts get right (test_artifacts.py checks they solve their tasks).
SENTIMENT = [
    ("all in all i did not adore the lecture", "negative"),
    ("honestly the waiter is so lousy but it is a charming book", "positive"),
    ("i think the music is so superb", "positive"),
    ("i do not think the game is excellent", "negative"),
    ("overall the hotel was not truly annoying", "positive"),
    ("honestly i did not love the book", "negative"),
]
NUMBERS = [("one", "1"), ("ninety one", "9 1"), ("ninety four", "9 4"), ("six hundred ninety", "6 9 0"),
           ("eight hundred twenty eight", "8 2 8"), ("eight hundred forty one", "8 4 1")]


def _eval(capsys, *argv):
    """`onnxformer eval ...` in this process: (exit status, stdout, stderr)."""
    from onnxformer.runtime.cli import main

    status = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


def _write(path, header, rows, sep="\t"):
    path.write_text("\n".join([sep.join(header), *(sep.join(r) for r in rows)]) + "\n", encoding="utf-8")
    return path


def test_classifier_accuracy_and_per_class_counts(tmp_path, capsys):
    rows = list(SENTIMENT)
    rows[0] = (rows[0][0], "positive")  # two gold labels flipped: the model (right) disagrees with them
    rows[2] = (rows[2][0], "negative")
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    status, out, err = _eval(capsys, ARTIFACTS / "encoder", data, "--json", "--batch-size", 4)
    assert status == 0, err
    report = json.loads(out)
    assert (report["task"], report["examples"], report["fields"]) == ("classify", 6, {"text": "text", "label": "label"})
    assert report["metrics"]["accuracy"] == pytest.approx(4 / 6)
    # gold negative: rows 2, 3, 5 (predicted negative: 0, 3, 5); gold positive: rows 0, 1, 4 (predicted: 1, 2, 4)
    neg, pos = report["per_class"]["negative"], report["per_class"]["positive"]
    assert (neg["support"], neg["predicted"], neg["correct"]) == (3, 3, 2)
    assert (pos["support"], pos["predicted"], pos["correct"]) == (3, 3, 2)
    assert report["metrics"]["macro_f1"] == pytest.approx(2 / 3)
    # the table, a CSV with other column names named by flags, --limit
    csv = _write(tmp_path / "reviews.csv", ["id", "review", "stars"], [(str(i), t, y) for i, (t, y) in enumerate(rows)], ",")
    status, out, err = _eval(capsys, ARTIFACTS / "encoder", csv, "--text-field", "review", "--label-field", "stars",
                             "--limit", 2)
    assert status == 0, err
    assert "accuracy   50.00%" in out and "examples  2 in" in out and "text='review', label='stars'" in out


@pytest.mark.parametrize("package", ["encoder-decoder", "decoder"])
def test_generator_exact_match_bleu_chrf(tmp_path, capsys, package):
    sacrebleu = _sacrebleu()
    given = [list(r) for r in NUMBERS]
    given[0][1] = "1 1"  # one wrong reference: the model answers "1"
    data = _write(tmp_path / "numbers.tsv", ["source", "target"], given)
    status, out, err = _eval(capsys, ARTIFACTS / package, data, "--json", "--batch-size", 4)
    assert status == 0, err
    report = json.loads(out)
    answers, references = [t for _, t in NUMBERS], [t for _, t in given]
    assert report["task"] == "generate" and report["examples"] == 6
    assert report["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert report["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)
    assert report["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, [references]).score)
    assert report["generation"]["strategy"] == "greedy" and report["cut_at_limit"] == 0
    assert report["generation"]["max_new_tokens"] == 32  # the package's default
    # beam search and a tight limit through the flags: the three-digit answers are cut to two digits
    status, out, err = _eval(capsys, ARTIFACTS / package, data, "--json", "--num-beams", 2, "--max-new-tokens", 2)
    assert status == 0, err
    report = json.loads(out)
    assert report["generation"]["strategy"] == "beam" and report["generation"]["num_beams"] == 2
    assert report["cut_at_limit"] >= 3 and report["metrics"]["exact_match"] == pytest.approx(2 / 6)


def test_bad_input_is_named(tmp_path, capsys):
    sentiment = _write(tmp_path / "s.tsv", ["text", "label"], [SENTIMENT[0], ("a fine meal", "neutral")])
    numbers = _write(tmp_path / "n.tsv", ["source", "target"], NUMBERS[:2])
    cases = [
        ((ARTIFACTS / "encoder", sentiment), "E_DATA", r"s\.tsv:3: label 'neutral' is not one of this package's labels"),
        ((ARTIFACTS / "encoder", numbers), "E_WRONG_KIND", "holds seq2seq data .* this package is a classifier"),
        ((ARTIFACTS / "encoder-decoder", sentiment), "E_WRONG_KIND", "holds classification data .* is a generator"),
        ((ARTIFACTS / "encoder", sentiment, "--label-field", "stars"), "E_DATA", "lacks column 'stars'"),
        ((ARTIFACTS / "encoder", sentiment, "--num-beams", 2), "E_CONFIG", "--num-beams apply to generation"),
        ((ARTIFACTS / "encoder", tmp_path / "missing.tsv"), "E_", "missing.tsv"),
        ((ARTIFACTS / "encoder", sentiment, "--limit", 0), "E_CONFIG", "--limit must be at least 1"),
    ]
    for argv, code, message in cases:
        status, out, err = _eval(capsys, *argv)
        assert status == 2 and out == "", (argv, out, err)
        assert err.startswith(f"error[{code}") and re.search(message, err), (argv, err)


def test_evaluate_functions_refuse_the_wrong_package():
    import onnxformer.runtime as rt

    encoder, decoder = rt.load(ARTIFACTS / "encoder"), rt.load(ARTIFACTS / "decoder")
    with pytest.raises(InputError, match="does not generate") as err:
        ev.evaluate_generator(encoder, ["a"], ["b"])
    assert err.value.code == "E_WRONG_KIND"
    with pytest.raises(InputError, match="without a classification head"):
        ev.evaluate_classifier(decoder, ["a"], ["b"])
    with pytest.raises(ConfigError, match="batch_size"):
        ev.evaluate_classifier(encoder, ["a"], ["negative"], batch_size=0)


def _chat_package(tmp_path):
    """artifacts/decoder with a chat template that renders the last user turn in its prompt
    format ("<s>{prompt} ="): a chat model whose answers are the decoder's own."""
    import shutil

    package = tmp_path / "chat-decoder"
    shutil.copytree(ARTIFACTS / "decoder", package)
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    manifest["chat_template"] = "{{ bos_token }}{{ messages[-1]['content'] }} ="
    manifest["chat_tokens"] = {"bos_token": "<s>", "eos_token": "</s>"}
    (package / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return package


def test_chat_data_scores_each_conversations_last_assistant_turn(tmp_path, capsys):
    import onnxformer.runtime as rt

    sacrebleu = _sacrebleu()
    package = _chat_package(tmp_path)
    given = [list(r) for r in NUMBERS]
    given[0][1] = "1 1"  # one wrong reference: the model answers "1"
    earlier = [{"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]
    conversations = [[*earlier[: 2 * (i % 2)], {"role": "user", "content": s}, {"role": "assistant", "content": t}]
                     for i, (s, t) in enumerate(given)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    status, out, err = _eval(capsys, package, data, "--json", "--batch-size", 4)
    assert status == 0, err
    report = json.loads(out)
    # independent of the template: the plain decoder's answers to the sources in its prompt format
    answers = [g.texts[0].strip() for g in rt.load(ARTIFACTS / "decoder").generate([s for s, _ in NUMBERS])]
    assert answers == [t for _, t in NUMBERS]
    assert (report["task"], report["examples"], report["fields"]) == ("generate", 6, {"messages": "messages"})
    assert report["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert report["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [[t for _, t in given]]).score)
    # a package without a template refuses conversations, naming the kind
    status, out, err = _eval(capsys, ARTIFACTS / "decoder", data)
    assert status == 2 and err.startswith("error[E_WRONG_KIND") and "holds chat data" in err, err
