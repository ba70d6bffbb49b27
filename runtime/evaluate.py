"""`onnxformer eval PACKAGE DATA`: score a package on labelled data, through the runtime. Torch-free.

What is measured is what a user gets: the package is loaded with `onnxformer.runtime.load` and
called with `classify()` or `generate()` (its prompt format, tokenizer and generation defaults
apply), in batches::

    onnxformer eval runs/sst2-package sst2_dev.tsv                # accuracy, macro-F1, per-class counts
    onnxformer eval packages/multi30k test2016.jsonl --json       # exact match, chrF, BLEU

- A classifier (an encoder package with a classification head) reads text/label data. Every
  label of the data must be one of the package's label names (a label it does not know is a
  DataError naming it). Accuracy, macro-F1 (the unweighted mean of the per-class F1 over the
  classes that occur in the data or in the predictions, scikit-learn's default) and per-class
  counts (support, predicted, correct, precision, recall, F1).
- A package with a chat template also reads conversations (`messages` data): each one's last
  assistant turn is the reference, and the turns before it are answered as `Model.chat` answers
  them (the template, then generation with the package's defaults); scored as below.
- A generator (decoder, prefix-LM or encoder-decoder package) reads source/target data.
  Decoding is greedy unless `--strategy` / `--num-beams` say otherwise; every other setting is
  the package's (`manifest.json` -> `generation`), `--max-new-tokens` overrides its limit.
  Exact match (hypothesis and reference equal after stripping surrounding whitespace), and
  corpus chrF and BLEU from sacrebleu (its defaults: BLEU with the 13a tokenizer, chrF with
  character 6-grams and beta 2; the signatures are part of the result). sacrebleu is an
  optional dependency (`pip install 'onnxformer[eval]'`), imported on first use.

Scales: accuracy, macro-F1, exact match and the per-class figures are fractions in [0, 1];
BLEU and chrF are on sacrebleu's 0-100 scale, as papers report them.

Data files are read by `runtime/datafiles.py` (the formats and field mapping training uses).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .datafiles import ChatExample, DataFile, Example, FieldMap, read_examples
from .errors import ConfigError, DataError, InputError

EVAL_EXTRA = "pip install 'onnxformer[eval]'"


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassCounts:
    """One class: how often it is the gold label, how often predicted, how often both."""

    label: str
    support: int  # examples whose gold label is this class
    predicted: int  # examples predicted as this class
    correct: int  # both (true positives)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.support if self.support else 0.0

    @property
    def f1(self) -> float:  # 2PR/(P+R) = 2TP / (2TP + FP + FN); 0 when the class is never right
        total = self.support + self.predicted
        return 2 * self.correct / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"support": self.support, "predicted": self.predicted, "correct": self.correct,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass(frozen=True)
class ClassificationScores:
    examples: int
    accuracy: float
    macro_f1: float  # mean F1 over the classes in gold or predictions (scikit-learn's default)
    per_class: tuple[ClassCounts, ...]  # in the package's label order; classes absent from both left out

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}


def classification_scores(gold: Sequence[str], predicted: Sequence[str],
                          labels: Sequence[str] = ()) -> ClassificationScores:
    """Accuracy, macro-F1 and per-class counts of `predicted` against `gold` (equal lengths).

    `labels` orders the per-class rows (the package's label names); a class not in it comes
    after them, sorted. Macro-F1 averages over the classes that occur in `gold` or `predicted`."""
    if len(gold) != len(predicted):
        raise ConfigError(f"gold ({len(gold)}) and predicted ({len(predicted)}) must have the same length")
    if not gold:
        raise DataError("no examples to score; pass data with at least one example")
    support, guessed = Counter(gold), Counter(predicted)
    hits = Counter(g for g, p in zip(gold, predicted) if g == p)
    present = set(support) | set(guessed)
    order = [name for name in labels if name in present] + sorted(present - set(labels))
    rows = tuple(ClassCounts(name, support[name], guessed[name], hits[name]) for name in order)
    return ClassificationScores(
        examples=len(gold),
        accuracy=sum(hits.values()) / len(gold),
        macro_f1=sum(row.f1 for row in rows) / len(rows),
        per_class=rows,
    )


@dataclass(frozen=True)
class GenerationScores:
    examples: int
    exact_match: float  # share of hypotheses equal to their reference (surrounding whitespace stripped)
    bleu: float  # sacrebleu corpus BLEU, 0-100
    chrf: float  # sacrebleu corpus chrF, 0-100
    signatures: dict[str, str] = field(default_factory=dict)  # sacrebleu's, per metric

    def metrics(self) -> dict[str, float]:
        return {"exact_match": self.exact_match, "bleu": self.bleu, "chrf": self.chrf}


def _sacrebleu():
    try:  # an optional dependency of the runtime (the [eval] extra), imported on first use
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise ConfigError(f"BLEU and chrF need sacrebleu, which is not installed: {EVAL_EXTRA}") from None
    return BLEU, CHRF


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> GenerationScores:
    """Exact match, corpus BLEU and chrF (sacrebleu's defaults, one reference per hypothesis)."""
    if len(hypotheses) != len(references):
        raise ConfigError(f"hypotheses ({len(hypotheses)}) and references ({len(references)}) must have the same length")
    if not hypotheses:
        raise DataError("no examples to score; pass data with at least one example")
    BLEU, CHRF = _sacrebleu()
    hyps, refs = [h.strip() for h in hypotheses], [r.strip() for r in references]
    bleu, chrf = BLEU(), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return GenerationScores(
        examples=len(hyps),
        exact_match=sum(h == r for h, r in zip(hyps, refs)) / len(hyps),
        bleu=float(bleu_score.score),
        chrf=float(chrf_score.score),
        signatures={"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
    )


# ------------------------------------------------------------------------------------------------
# Running a package over examples
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    """What `evaluate_classifier` / `evaluate_generator` measured."""

    task: str  # "classify" | "generate"
    scores: ClassificationScores | GenerationScores
    predictions: list[str]  # predicted label / generated text per example, in data order
    seconds: float  # wall time of the model calls (loading and reading data not included)
    settings: dict[str, Any] = field(default_factory=dict)  # generate: the generation settings used
    cut_at_limit: int = 0  # generate: outputs that stopped at max_new_tokens without eos

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "examples": self.scores.examples, "metrics": self.scores.metrics()}
        if isinstance(self.scores, ClassificationScores):
            out["per_class"] = {row.label: row.to_dict() for row in self.scores.per_class}
        else:
            out["signatures"] = dict(self.scores.signatures)
            out["generation"] = dict(self.settings)
            out["cut_at_limit"] = self.cut_at_limit
        out["seconds"] = self.seconds
        out["examples_per_s"] = self.scores.examples / self.seconds if self.seconds > 0 else None
        return out


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r:.40}")
    return batch_size


def match_labels(labels: Sequence[Any], names: Sequence[str], lines: Sequence[int | None] = (),
                 path: str | None = None) -> list[str]:
    """The data's labels as the package's label names. A label is matched by its text (an int
    label 1 is "1"); a package without label names (LABEL_0, LABEL_1, ...) also takes class
    ids. A label the package does not know is a DataError naming it, its line and the names."""
    known, generic = set(names), all(n == f"LABEL_{j}" for j, n in enumerate(names))
    out = []
    for i, label in enumerate(labels):
        text = str(label).strip() if not isinstance(label, bool) else None
        if text in known:
            out.append(text)
            continue
        if generic and text is not None and text.isdigit() and int(text) < len(names):
            out.append(names[int(text)])
            continue
        line = lines[i] if i < len(lines) else None
        where = f"{path}:{line}: " if path and line else f"{path}: " if path else ""
        shown = ", ".join(map(repr, names[:20])) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise DataError(f"{where}label {label!r} is not one of this package's labels ({shown}); the data must use "
                        "the label names the model was trained with")
    return out


def evaluate_classifier(model, texts: Sequence[str], labels: Sequence[str], *, batch_size: int = 32,
                        truncate: bool = False) -> EvalResult:
    """`model.classify` over `texts` in batches, scored against `labels` (package label names)."""
    batch_size = _check_batch_size(batch_size)
    if not model.can_classify:
        raise InputError(f"this package is a {model.arch!r} model without a classification head; text/label data "
                         "needs a classifier package (an encoder trained with --task classify)", code="E_WRONG_KIND")
    start = time.perf_counter()
    predicted = [r.label for chunk in _batches(list(texts), batch_size)
                 for r in model.classify(chunk, batch_size=batch_size, truncate=truncate)]
    seconds = time.perf_counter() - start
    return EvalResult("classify", classification_scores(labels, predicted, model.label_names), predicted, seconds)


def _search_config(model, overrides: dict[str, Any]):
    """Greedy unless `overrides` say otherwise, the package's defaults for the rest; one output each."""
    if "num_beams" in overrides and overrides["num_beams"] > 1:
        overrides.setdefault("strategy", "beam")
    overrides.setdefault("strategy", "greedy")
    config = model.generation_config(**overrides)
    if config.num_return_sequences != 1:
        raise ConfigError(f"evaluation scores one output per source; num_return_sequences is "
                          f"{config.num_return_sequences}. Pass num_return_sequences=1")
    return config


def _scored(generations: Sequence[Any], targets: Sequence[str], config, seconds: float) -> EvalResult:
    hypotheses = [g.texts[0] for g in generations]
    cut = sum(g.finish_reasons[0] == "length" for g in generations)
    settings = {name: value for name, value in asdict(config).items() if value is not None}
    return EvalResult("generate", generation_scores(hypotheses, targets), hypotheses, seconds, settings, cut)


def evaluate_generator(model, sources: Sequence[str], targets: Sequence[str], *, batch_size: int = 32,
                       truncate: bool = False, **overrides: Any) -> EvalResult:
    """`model.generate` over `sources` in batches (greedy unless `overrides` say otherwise; the
    package's generation defaults for the rest), scored against `targets`."""
    batch_size = _check_batch_size(batch_size)
    if not model.can_generate:
        raise InputError(f"this package is a {model.arch!r} model that does not generate; source/target data needs "
                         "a generating package (decoder, prefix-lm or encoder-decoder)", code="E_WRONG_KIND")
    config = _search_config(model, overrides)
    start = time.perf_counter()
    generations = [g for chunk in _batches(list(sources), batch_size) for g in model.generate(chunk, config, truncate=truncate)]
    return _scored(generations, targets, config, time.perf_counter() - start)


def evaluate_chat(model, conversations: Sequence[ChatExample], *, batch_size: int = 32,
                  **overrides: Any) -> EvalResult:
    """Each conversation's last assistant turn answered by the package, as `model.chat` answers
    it: the turns before it rendered with the package's chat template, then generation with its
    defaults (its eos ids end the answer); scored against that turn's content."""
    batch_size = _check_batch_size(batch_size)
    if model.chat_template is None:
        raise InputError("this package has no chat template; messages data needs a package that chats (a model "
                         "fine-tuned with --task sft on messages data, or an imported chat model)", code="E_WRONG_KIND")
    config = _search_config(model, overrides)
    prompts, targets = [], []
    for conversation in conversations:
        turns = [{"role": m.role, "content": m.content} for m in conversation.messages]
        prompts.append(model.render_chat(turns[:-1]).token_ids)
        targets.append(turns[-1]["content"])
    start = time.perf_counter()
    generations = [g for chunk in _batches(prompts, batch_size) for g in model.generate_ids(chunk, config)]
    return _scored(generations, targets, config, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="package directory (manifest.json, tokenizer.json, *.onnx)")
    parser.add_argument("data", help="labelled data: text/label for a classifier, source/target for a generator "
                                     "(.jsonl, .json, .csv, .tsv, .parquet; the fields as training reads them)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="score the first N examples only")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per model call (default 32)")
    parser.add_argument("--truncate", action="store_true", help="truncate inputs longer than the model's maximum")
    fields = parser.add_argument_group("fields (default: detected from the file's columns)")
    for name in ("text", "label", "source", "target", "messages"):
        fields.add_argument(f"--{name}-field", default=None, metavar="NAME", help=f"the column holding the {name}")
    g = parser.add_argument_group("generation (default: greedy, the rest from the package)")
    g.add_argument("--strategy", choices=["greedy", "beam"], default=None, help="decoding strategy (default greedy)")
    g.add_argument("--num-beams", type=int, default=None, help="beams for --strategy beam (implies it when > 1)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: the package's)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--trust-store", action="append", default=None, metavar="PATH",
                        help="allow the package's files to be links into this content store (repeatable)")


def _fmt(value: float, scale: str) -> str:
    return f"{100 * value:6.2f}%" if scale == "fraction" else f"{value:7.2f}"


def print_table(result: EvalResult, package: str, data: str, mapping: str = "", *, classes_shown: int = 12) -> None:
    """The human-readable report: the headline metrics, then per-class rows for a classifier
    (every class up to `classes_shown`, else the lowest-F1 ones)."""
    s = result.scores
    print(f"package   {package}")
    print(f"data      {data}" + (f" ({mapping})" if mapping else ""))
    print(f"examples  {s.examples} in {result.seconds:.1f} s ({s.examples / max(result.seconds, 1e-9):.1f} examples/s)")
    if isinstance(s, ClassificationScores):
        print(f"accuracy  {_fmt(s.accuracy, 'fraction')}")
        print(f"macro-F1  {_fmt(s.macro_f1, 'fraction')}  (over {len(s.per_class)} classes)")
        rows = list(s.per_class)
        note = ""
        if len(rows) > classes_shown:
            rows = sorted(rows, key=lambda r: (r.f1, r.label))[:classes_shown]
            note = f" (the {classes_shown} lowest F1 of {len(s.per_class)}; --json for all)"
        width = max(5, *(len(r.label) for r in rows))
        print(f"\n{'class':{width}s}  support  predicted  correct  precision  recall      F1{note}")
        for r in rows:
            print(f"{r.label:{width}s}  {r.support:7d}  {r.predicted:9d}  {r.correct:7d}  "
                  f"{100 * r.precision:8.1f}%  {100 * r.recall:5.1f}%  {100 * r.f1:5.1f}%")
        return
    settings = result.settings
    decoding = settings.get("strategy", "greedy")
    if decoding == "beam":
        decoding += f" {settings.get('num_beams')} beams"
    print(f"decoding  {decoding}, max_new_tokens {settings.get('max_new_tokens')}"
          + (f" ({result.cut_at_limit} outputs stopped there without eos)" if result.cut_at_limit else ""))
    print(f"exact     {_fmt(s.exact_match, 'fraction')}")
    print(f"BLEU      {_fmt(s.bleu, 'score')}  ({s.signatures['bleu']})")
    print(f"chrF      {_fmt(s.chrf, 'score')}  ({s.signatures['chrf']})")


def _generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in ("strategy", "num_beams", "max_new_tokens")
                 if getattr(args, name) is not None}
    if overrides.get("strategy") == "beam" and "num_beams" not in overrides:
        raise ConfigError("--strategy beam needs --num-beams N (N > 1)")
    return overrides


PACKAGE_KINDS = {  # task -> (the data kind it scores, what the package is, the fields it reads)
    "classify": ("classification", "a classifier", "text/label"),
    "generate": ("seq2seq", "a generator", "source/target"),
    "chat": ("chat", "a chat model", "messages"),
}


def read_data(path: str, task: str, fields: FieldMap | None = None, limit: int | None = None
              ) -> tuple[DataFile, list[tuple[int, Example]]]:
    """The file's (line, example) pairs for `task`, read by runtime/datafiles.py (the first
    `limit` only). Data of the other kind is an InputError (E_WRONG_KIND) naming both."""
    kind, what, needs = PACKAGE_KINDS[task]
    try:
        data = read_examples(path, kinds=(kind,), fields=fields)
    except DataError as err:
        try:  # say so plainly when the file is fine but holds the other kind of data
            other = read_examples(path, fields=fields)
        except (DataError, ConfigError):
            raise err from None
        if other.kind == kind:
            raise
        raise InputError(f"{path} holds {other.kind} data ({other.mapping.describe()}); this package is {what}, "
                         f"which eval scores on {needs} data. Pass such a file, or the package that goes with "
                         "this data", code="E_WRONG_KIND") from None
    examples = []
    for numbered in data.numbered():
        if limit is not None and len(examples) >= limit:
            break
        examples.append(numbered)
    return data, examples


def run(args: argparse.Namespace) -> int:
    from . import load

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1; got {args.limit}")
    overrides = _generation_overrides(args)
    model = load(args.package, provider=args.provider, threads=args.threads, trusted_roots=args.trust_store)
    task = "classify" if model.can_classify else "generate" if model.can_generate else None
    if task is None:
        raise InputError(f"{args.package} is a {model.arch!r} package without a classification head or a decoder; "
                         "eval scores classifiers and generators", code="E_WRONG_KIND")
    if task == "classify" and overrides:
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in overrides)} apply to generation; "
                          "this package is a classifier. Drop them")
    fields = FieldMap(text=args.text_field, label=args.label_field, source=args.source_field or (),
                      target=args.target_field, messages=args.messages_field)
    if task == "generate" and model.chat_template is not None and read_examples(args.data, fields=fields).kind == "chat":
        task = "chat"  # a package that chats, on conversations: each one's last assistant turn
    data, examples = read_data(args.data, task, fields, args.limit)
    lines = [line for line, _ in examples]
    if task == "classify":
        names = model.label_names or tuple(f"LABEL_{i}" for i in range(model.dims.num_labels))  # as classify() names them
        labels = match_labels([e.label for _, e in examples], names, lines, args.data)
        result = evaluate_classifier(model, [e.text for _, e in examples], labels, batch_size=args.batch_size,
                                     truncate=args.truncate)
    elif task == "chat":
        result = evaluate_chat(model, [e for _, e in examples], batch_size=args.batch_size, **overrides)
    else:
        result = evaluate_generator(model, [e.source for _, e in examples], [e.target for _, e in examples],
                                    batch_size=args.batch_size, truncate=args.truncate, **overrides)
    if args.json:
        print(json.dumps({"package": str(args.package), "data": str(args.data),
                          "fields": dict(data.mapping.items()), **result.to_dict()}, ensure_ascii=False))
    else:
        print_table(result, args.package, args.data, data.mapping.describe())
    return 0
