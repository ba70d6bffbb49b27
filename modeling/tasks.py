"""Training tasks: one `Objective` per task, registered once in `OBJECTIVES[task]`.

An objective is everything the trainer knows about a task: which architectures and data it
takes, its default settings, and four functions. The trainer looks it up once
(`objective_for(task, nsp=...)`) and never asks for the task's name again::

    encode(context, raw, epoch)  -> Encoding      a split's raw examples -> token ids (once per run,
                                                  or once per epoch where the objective redraws them),
                                                  and a CutReport of what did not fit max_len
    collate(context, items)      -> Batch         [(Encoded, noise generator)] -> one micro-batch
    loss(model, batch)           -> LossOutput    the model's forward and the task's loss
    metrics(sums)                -> {name: value} figures of a validation pass beyond its loss
    generation_metrics(model, context, examples)  what greedy generation scores (generative tasks)

The losses are the pure functions of objectives.py; this module only wires each task's
batches to the model and to them.

==========  =======================  ================  ===============================================
task        arch                     data kind         objective (modeling/objectives.py)
==========  =======================  ================  ===============================================
causal-lm   decoder, prefix-lm       text (*)          next-token NLL on ``<s> doc </s>``
mlm         encoder                  text (*)          BERT masking (+ next-sentence pairs with nsp)
denoise     encoder-decoder          text              BART: permute sentences, infill spans -> original
seq2seq     encoder-decoder          seq2seq           target NLL given the source
sft         decoder, prefix-lm       seq2seq, chat     NLL of the continuation given the prompt; on chat
                                                       data, of the assistant turns (modeling/chat_sft.py)
prefix-lm   prefix-lm                seq2seq, text     as sft; on text, a random split per example
classify    encoder                  classification    cross-entropy of the pooled [CLS] head
distill     decoder, prefix-lm,      text, seq2seq     a teacher's distributions: KL at a temperature +
            encoder-decoder                            the hard-label NLL (text as causal-lm, seq2seq
                                                       data as sft / seq2seq); `distill_objective`
==========  =======================  ================  ===============================================

(*) or classification data, whose texts are used without labels (domain-adaptive pretraining
before fine-tuning a classifier on the same texts).

Nothing is cut silently. Language modelling (causal-lm, mlm) splits a document longer than
``max_len`` into windows (causal-lm windows share one token, so that every token of the document
is predicted exactly once); denoise and prefix-lm on text group a document's sentences into
windows. Other tasks cut an example that does not fit and count it; an sft / prefix-lm example
whose prompt alone fills ``max_len`` (no target token left) is dropped and counted. Every encode
returns a ``CutReport``, which the trainer logs per split (``CutReport.describe``).

Noise (masking, denoising, split points) comes from a generator per sample, seeded by
(seed, stream, position): `example_generator`. Streams: 0 training samples, 1 validation
samples, 2 the epoch's sample order, 3 the epoch's next-sentence pairs.

Shape letters: B batch, T encoder/decoder tokens, U decoder tokens of an encoder-decoder,
D model width, V vocab, C classes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor

from onnxformer.runtime.errors import ConfigError
from onnxformer.runtime.generation import GenerationConfig

from .chat_sft import ChatFormat, chat_exact_match, tokenizer_texts as chat_tokenizer_texts
from .config import ModelConfig
from .data import PROMPT_FORMAT, ChatExample, Example, TaskData, TextExample, format_continuation, format_prompt
from .generate import generate
from .model import Transformer
from .objectives import (
    IGNORE_INDEX,
    classification_loss,
    continuation_mask,
    denoise,
    distillation_loss,
    mask_tokens,
    mlm_loss,
    next_sentence_pairs,
    next_token_labels,
    prompt_mask,
    seq2seq_labels,
    shift_right,
    token_cross_entropy,
)

logger = logging.getLogger(__name__)

# ============================================================================================
# What flows between the data, the objective and the trainer
# ============================================================================================


class Encoded(NamedTuple):
    """One example as token ids. Fields a task does not use stay empty."""

    ids: list[int]  # encoder input (encoder, encoder-decoder) or the whole decoder row
    target: list[int] = []  # encoder-decoder: target ending with eos
    prompt_len: int = 0  # sft / prefix-lm: tokens of ids that belong to the prompt
    label: int = -1  # classify: class id; mlm+nsp: IS_NEXT / IS_RANDOM
    type_ids: list[int] = []  # mlm+nsp: segment ids of the pair
    sentences: list[list[int]] = []  # denoise / prefix-lm on text: sentences (no special tokens)
    text: str = ""  # generative tasks: the expected output text (exact match)
    source: str = ""  # generative tasks: the source text as a user passes it to generate()
    loss_mask: list[int] = []  # sft on chat data: 1 on the tokens trained on (the assistant turns)


class Batch(NamedTuple):
    """Model inputs and labels of one micro-batch; None where the task has no such input."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = token, 0 = pad (right padding)
    labels: Tensor  # (B, T) or (B, U) token labels with IGNORE_INDEX, or (B,) class ids
    token_type_ids: Tensor | None = None  # (B, T) mlm+nsp
    prefix_mask: Tensor | None = None  # (B, T) prefix-lm: True on the bidirectional prompt
    decoder_input_ids: Tensor | None = None  # (B, U) encoder-decoder
    decoder_attention_mask: Tensor | None = None  # (B, U)
    nsp_labels: Tensor | None = None  # (B,) mlm+nsp

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))

    def num_tokens(self) -> int:
        n = int(self.attention_mask.sum())
        return n + (int(self.decoder_attention_mask.sum()) if self.decoder_attention_mask is not None else 0)


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, what is optimised: mean over this batch's targets (+ NSP loss for mlm+nsp)
    main_loss: Tensor  # scalar, the task's own loss without NSP (= loss for every other task)
    targets: Tensor  # scalar int: tokens (or rows, for classification) main_loss averages over
    correct: Tensor  # scalar int: correct class predictions (classify, NSP); 0 otherwise


@dataclass(frozen=True)
class TaskContext:
    """What encoding and batching read: the tokenizer, its special ids, the model's settings."""

    tokenizer: Tokenizer
    special: dict[str, int]  # special_token_ids(tokenizer): pad, bos, eos, mask, ... (-1: none)
    model_config: ModelConfig
    max_len: int  # token rows are cut to this many tokens
    label_names: tuple[str, ...] = ()  # classify: class i is label_names[i]
    seed: int = 0  # TrainConfig.seed; objectives that redraw examples per epoch seed from it
    chat: ChatFormat | None = None  # chat data: the template conversations are rendered with (chat_sft.py)

    def cut(self, ids: list[int]) -> list[int]:
        return ids[: self.max_len]


@dataclass
class CutReport:
    """What encoding did to a split's lengths, added up batch by batch (``merge``).

    ``tokens`` counts the examples' tokens as tokenized (special tokens included), ``used``
    those that reach a row (a token shared by two windows counts once)."""

    examples: int = 0  # raw examples read
    rows: int = 0  # encoded rows kept (windows, for a split into windows)
    tokens: int = 0
    used: int = 0
    split_examples: int = 0  # examples longer than max_len split into several windows
    cut_examples: int = 0  # examples longer than max_len cut (tokens lost)
    dropped: int = 0  # examples dropped: nothing left to train on once cut (sft: the prompt fills max_len)
    longest: int = 0  # tokens of the longest example

    def merge(self, other: "CutReport") -> "CutReport":
        for field in dataclasses.fields(self):
            name = field.name
            value = max if name == "longest" else (lambda a, b: a + b)
            setattr(self, name, value(getattr(self, name), getattr(other, name)))
        return self

    def example(self, tokens: int, used: int, *, rows: int = 1, dropped: bool = False) -> None:
        """Count one example of `tokens` tokens of which `used` reach its `rows` rows."""
        self.examples += 1
        self.rows += 0 if dropped else rows
        self.tokens += tokens
        self.used += 0 if dropped else used
        self.split_examples += rows > 1
        self.cut_examples += used < tokens and not dropped
        self.dropped += dropped
        self.longest = max(self.longest, tokens)

    def describe(self, what: str, max_len: int, *, limit: int | None = None) -> tuple[int, str]:
        """(logging level, message) for the log: INFO when every token is used, else WARNING with
        the fix. `limit`: the context of a loaded model, which --max-len cannot pass (None: a new
        model, whose context grows with --max-len)."""
        share = lambda n: f"{n:,} of {self.tokens:,} tokens ({100 * n / max(1, self.tokens):.1f}%)"  # noqa: E731
        examples, rows = ("documents", "windows") if self.split_examples else ("examples", "rows")
        text = f"{what}: {self.examples:,} {examples}, {self.tokens:,} tokens -> {self.rows:,} {rows} of <= {max_len} tokens"
        if self.split_examples:
            text += f" ({self.split_examples:,} documents longer than {max_len} tokens split into windows)"
        text += f"; tokens used: {share(self.used)}"
        if self.used == self.tokens:
            return logging.INFO, text
        if limit is None or self.longest <= limit:
            fix = f"to keep them, raise --max-len to {self.longest} (the longest example)"
        elif max_len < limit:
            fix = (f"the longest example has {self.longest:,} tokens and the model's context is {limit} (max_seq_len): "
                   f"pass --max-len {limit} to keep the most, or shorten the examples")
        else:
            fix = (f"the model's context is {limit} tokens (max_seq_len), so the longest ({self.longest:,} tokens) "
                   "cannot be kept whole: shorten the examples, or train a new model with a larger --max-len")
        if self.cut_examples:
            text += f"; {self.cut_examples:,} examples longer than --max-len {max_len} were cut"
        if self.dropped:
            text += (f"; {self.dropped:,} examples were dropped: their prompt fills --max-len {max_len}, "
                     "leaving no target token")
        return logging.WARNING, f"{text}; {fix}"


class Encoding(NamedTuple):
    """What `Objective.encode` returns: the rows, and what did not fit max_len."""

    examples: list[Encoded]
    report: CutReport


@dataclass
class EvalSums:
    """Totals of a validation pass, added batch by batch (train.evaluate)."""

    loss: float = 0.0  # main_loss summed over targets (token-weighted)
    targets: int = 0
    rows: int = 0
    correct: int = 0
    extra_loss: float = 0.0  # (loss - main_loss) summed over rows: the NSP loss of mlm+nsp

    def add(self, out: LossOutput, rows: int) -> None:
        n = int(out.targets)
        self.loss += float(out.main_loss) * n
        self.extra_loss += float(out.loss - out.main_loss) * rows
        self.targets, self.rows, self.correct = self.targets + n, self.rows + rows, self.correct + int(out.correct)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.targets)


class TaskDefaults(NamedTuple):
    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int


def _train_split_texts(data: TaskData) -> Iterable[str]:
    return data.texts(("train",))


def _no_head_config(data: TaskData) -> dict[str, Any]:
    return {"prompt_format": None}  # a fine-tuned sft checkpoint's format does not carry over


@dataclass(frozen=True)
class Objective:
    """A training task: what it trains on what data, and the functions the trainer calls."""

    name: str  # the task, TrainConfig.task
    archs: tuple[str, ...]  # architectures it trains
    data_kinds: tuple[str, ...]  # TaskData kinds it reads
    # Steps, batch size, lr, warmup, eval interval: tuned on 2 CPU cores for the tiny preset and
    # the built-in data (benchmarks/TRAINING.md); TrainConfig fields left at None take them.
    defaults: TaskDefaults
    encode: Callable[[TaskContext, Sequence[Example], int], Encoding]  # (context, raw, epoch)
    collate: Callable[[TaskContext, Sequence[tuple[Encoded, torch.Generator]]], Batch]
    loss: Callable[[Transformer, Batch], LossOutput]
    metrics: Callable[[EvalSums], dict[str, float]]
    generation_metrics: Callable[[Transformer, TaskContext, Sequence[Encoded]], dict[str, float]] | None = None
    redraws_each_epoch: bool = False  # encode depends on the epoch (fresh NSP pairs); else it runs once
    heads: tuple[str, ...] = ()  # parameter prefixes of the task head: trained under LoRA and BitFit
    fresh_head: tuple[str, ...] = ()  # prefixes a fine-tuned model (from_checkpoint) does not load
    head_config: Callable[[TaskData], dict[str, Any]] = _no_head_config  # ModelConfig fields of the head
    tokenizer_texts: Callable[[TaskData], Iterable[str]] = _train_split_texts  # a new tokenizer's corpus
    needs_teacher: bool = False  # distill: trains on a teacher's outputs (TrainConfig.teacher, distill_objective)


# ============================================================================================
# Shared pieces: noise generators, padding, the three model forwards
# ============================================================================================

TRAIN_STREAM, EVAL_STREAM, ORDER_STREAM, PAIRS_STREAM = 0, 1, 2, 3


def _mix(seed: int, stream: int, position: int) -> int:
    """A 63-bit generator seed from (seed, stream, position)."""
    return ((seed * 1_000_003 + stream) * 2_147_483_647 + position) % (2**63 - 1)


def example_generator(seed: int, position: int, *, stream: int = TRAIN_STREAM) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, stream, position))


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists -> ids (B, T) and mask (B, T)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _zero(batch: Batch) -> Tensor:
    return torch.zeros((), dtype=torch.long, device=batch.input_ids.device)


def _token_targets(batch: Batch) -> Tensor:
    return (batch.labels != IGNORE_INDEX).sum()


def _windows(ids: list[int], width: int, *, overlap: int = 0) -> list[list[int]]:
    """`ids` in consecutive windows of at most `width` tokens, each sharing `overlap` tokens with
    the one before; one window when it fits. Every token is in a window."""
    step = width - overlap
    return [ids[start : start + width] for start in range(0, max(1, len(ids) - overlap), step)]


def _sentence_windows(sentences: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive sentences grouped into windows of at most `budget` tokens; a sentence longer
    than that is split into pieces first. One window when the document fits."""
    groups: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for sentence in sentences:
        for piece in _windows(sentence, budget):
            if current and size + len(piece) > budget:
                groups.append(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece)
    return groups + [current] if current or not groups else groups


def _encode_sentences(context: TaskContext, raw: Sequence[Example], *, reserve: int) -> Encoding:
    """Documents as sentences of token ids without special tokens; noise and split points
    are drawn per batch. Later sentences keep their leading space. A document longer than
    max_len - `reserve` (the special tokens collate adds) is split into windows of whole sentences."""
    out, report = [], CutReport()
    budget = max(1, context.max_len - reserve)
    for r in raw:
        sentences = r.sentences or [r.text]
        texts = [s if i == 0 else " " + s for i, s in enumerate(sentences)]
        encoded = [e.ids for e in context.tokenizer.encode_batch(texts, add_special_tokens=False)]
        windows = _sentence_windows(encoded, budget)
        out += [Encoded([], sentences=w) for w in windows]
        tokens = sum(map(len, encoded)) + reserve
        report.example(tokens, tokens, rows=len(windows))
    return Encoding(out, report)


def _cut_rows(context: TaskContext, rows: Sequence[list[int]], report: CutReport) -> list[list[int]]:
    """`rows` cut to max_len, each counted as one example (cut ones too)."""
    for row in rows:
        report.example(len(row), min(len(row), context.max_len))
    return [context.cut(row) for row in rows]


def _decoder_loss(model: Transformer, batch: Batch) -> LossOutput:
    """Decoder-only (causal-lm, sft, prefix-lm): NLL of the labelled next tokens."""
    zero = _zero(batch)
    out = model.decode(batch.input_ids, attention_mask=batch.attention_mask, prefix_mask=batch.prefix_mask)  # logits (B, T, V)
    loss = token_cross_entropy(out.logits, batch.labels)
    return LossOutput(loss, loss, _token_targets(batch), zero)


def _encoder_decoder_loss(model: Transformer, batch: Batch) -> LossOutput:
    """Encoder-decoder (seq2seq, denoise): NLL of the target given the source."""
    zero = _zero(batch)
    hidden = model.encode(batch.input_ids, batch.attention_mask)  # (B, T, D)
    out = model.decode(
        batch.decoder_input_ids, attention_mask=batch.decoder_attention_mask,
        cross_kv=model.cross_kv(hidden), encoder_attention_mask=batch.attention_mask,
    )  # logits (B, U, V)
    loss = token_cross_entropy(out.logits, batch.labels)
    return LossOutput(loss, loss, _token_targets(batch), zero)


def _perplexity(sums: EvalSums) -> dict[str, float]:
    return {"perplexity": math.exp(min(50.0, sums.mean_loss))}


# ============================================================================================
# classify: cross-entropy of the pooled [CLS] head
# ============================================================================================


def _classify_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """The text cut to max_len (counted in the report) and its class id."""
    report = CutReport()
    rows = _cut_rows(context, [e.ids for e in context.tokenizer.encode_batch([r.text for r in raw])], report)
    return Encoding([Encoded(ids, label=context.label_names.index(r.label)) for ids, r in zip(rows, raw)], report)


def _classify_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    ids, mask = _pad([e.ids for e, _ in items], context.special["pad"])
    return Batch(ids, mask, torch.tensor([e.label for e, _ in items]))


def _classify_loss(model: Transformer, batch: Batch) -> LossOutput:
    zero = _zero(batch)
    hidden = model.encode(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)  # (B, T, D)
    logits = model.classify(hidden)  # (B, C)
    correct = (logits.argmax(-1) == batch.labels).sum()
    loss = classification_loss(logits, batch.labels)
    return LossOutput(loss, loss, zero + len(batch.labels), correct)


def _accuracy(sums: EvalSums) -> dict[str, float]:
    return {"accuracy": sums.correct / max(1, sums.rows)}


def _classify_head_config(data: TaskData) -> dict[str, Any]:
    return {"num_labels": len(data.label_names), "label_names": data.label_names, "prompt_format": None}


# ============================================================================================
# mlm: BERT masking; with nsp, next-sentence pairs redrawn every epoch
# ============================================================================================


def _mlm_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """Each document as the tokenizer encodes it (``[CLS] doc [SEP]``); a longer one than max_len
    split into windows of its text tokens, each between the same special tokens."""
    out, report = [], CutReport()
    for e in context.tokenizer.encode_batch([r.text for r in raw]):
        ids, special = e.ids, e.special_tokens_mask
        head = next((i for i, s in enumerate(special) if not s), len(ids))  # leading special tokens
        tail = next((i for i, s in enumerate(reversed(special)) if not s), 0) if head < len(ids) else 0
        width = context.max_len - head - tail
        if len(ids) <= context.max_len or width < 1:  # fits (or no room for text between the specials)
            out += [Encoded(row) for row in _cut_rows(context, [ids], report)]
            continue
        prefix, body, suffix = ids[:head], ids[head : len(ids) - tail], ids[len(ids) - tail :]
        windows = _windows(body, width)
        out += [Encoded(prefix + w + suffix) for w in windows]
        report.example(len(ids), len(ids), rows=len(windows))
    return Encoding(out, report)


def _masked(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> tuple[Tensor, Tensor, Tensor]:
    """Masked ids, attention mask and labels (B, T); masking per example, so independent of
    how batches are cut."""
    s = context.special
    specials = [i for i in s.values() if i >= 0]
    rows, labels = [], []
    for e, gen in items:
        masked = mask_tokens(torch.tensor([e.ids]), mask_token_id=s["mask"], special_token_ids=specials,
                             vocab_size=context.model_config.vocab_size, generator=gen)
        rows.append(masked.input_ids[0].tolist())
        labels.append(masked.labels[0].tolist())
    ids, mask = _pad(rows, s["pad"])
    label_ids, _ = _pad(labels, IGNORE_INDEX)
    return ids, mask, label_ids


def _mlm_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    return Batch(*_masked(context, items))


def _mlm_loss(model: Transformer, batch: Batch) -> LossOutput:
    zero = _zero(batch)
    hidden = model.encode(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)  # (B, T, D)
    loss = mlm_loss(model.mlm_logits(hidden), batch.labels)  # logits (B, T, V)
    return LossOutput(loss, loss, _token_targets(batch), zero)


def _nsp_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """This epoch's sentence pairs, ``[CLS] a [SEP] b [SEP]`` with token types 0/1, cut to
    max_len (counted: each pair is an example of the report)."""
    generator = example_generator(context.seed, epoch, stream=PAIRS_STREAM)
    pairs = next_sentence_pairs([r.sentences for r in raw], generator=generator)
    encoded = context.tokenizer.encode_batch([(p.first, p.second) for p in pairs])
    report = CutReport()
    rows = _cut_rows(context, [e.ids for e in encoded], report)
    return Encoding([Encoded(ids, label=p.label, type_ids=context.cut(e.type_ids))
                     for ids, e, p in zip(rows, encoded, pairs)], report)


def _nsp_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    ids, mask, labels = _masked(context, items)
    types, _ = _pad([e.type_ids for e, _ in items], 0)
    return Batch(ids, mask, labels, token_type_ids=types, nsp_labels=torch.tensor([e.label for e, _ in items]))


def _nsp_loss(model: Transformer, batch: Batch) -> LossOutput:
    """Masked-LM loss plus the next-sentence classification loss (main_loss: the MLM part)."""
    hidden = model.encode(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)  # (B, T, D)
    loss = mlm_loss(model.mlm_logits(hidden), batch.labels)  # logits (B, T, V)
    targets = _token_targets(batch)
    nsp = model.nsp_logits(hidden)  # (B, 2)
    correct = (nsp.argmax(-1) == batch.nsp_labels).sum()
    return LossOutput(loss + classification_loss(nsp, batch.nsp_labels), loss, targets, correct)


def _nsp_metrics(sums: EvalSums) -> dict[str, float]:
    rows = max(1, sums.rows)
    return {**_perplexity(sums), "nsp_loss": sums.extra_loss / rows, "nsp_accuracy": sums.correct / rows}


# ============================================================================================
# causal-lm: next-token NLL on <s> doc </s>
# ============================================================================================


def _causal_lm_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """``<s> doc </s>`` in windows of max_len tokens; consecutive windows share one token (the
    last of one is the first of the next), so that every token after ``<s>`` is predicted once."""
    out, report = [], CutReport()
    eos = context.special["eos"]
    for e in context.tokenizer.encode_batch([r.text for r in raw]):
        row = e.ids + [eos]
        windows = _windows(row, context.max_len, overlap=1)
        out += [Encoded(w) for w in windows]
        report.example(len(row), len(row), rows=len(windows))
    return Encoding(out, report)


def _causal_lm_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    ids, mask = _pad([e.ids for e, _ in items], context.special["pad"])
    # A prefix-LM trained as a plain LM: an empty prefix, every position causal.
    prefix = torch.zeros_like(mask, dtype=torch.bool) if context.model_config.arch == "prefix-lm" else None
    return Batch(ids, mask, next_token_labels(ids, mask.bool()), prefix_mask=prefix)


# ============================================================================================
# sft and prefix-lm: NLL of the continuation given the prompt
# ============================================================================================


def _prompted_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """seq2seq data: ``<s> prompt continuation </s>`` and the prompt's length, cut to max_len
    (counted); an example whose prompt fills max_len has no target token left and is dropped
    (counted). Text data (prefix-lm): sentences, split at a random point per batch."""
    if not raw or isinstance(raw[0], TextExample):
        return _encode_sentences(context, raw, reserve=2)  # <s> ... </s>
    if isinstance(raw[0], ChatExample):
        return _chat_encode(context, raw)
    tok, eos = context.tokenizer, context.special["eos"]
    prompts = tok.encode_batch([format_prompt(r.source) for r in raw])
    continuations = tok.encode_batch([format_continuation(r.target) for r in raw], add_special_tokens=False)
    out, report = [], CutReport()
    for p, c, r in zip(prompts, continuations, raw):
        full = p.ids + c.ids + [eos]
        if len(p.ids) >= context.max_len:
            report.example(len(full), 0, dropped=True)
            continue
        ids = context.cut(full)
        report.example(len(full), len(ids))
        out.append(Encoded(ids, prompt_len=len(p.ids), text=r.target, source=r.source))
    return Encoding(out, report)


def _chat_encode(context: TaskContext, raw: Sequence[ChatExample]) -> Encoding:
    """Conversations in the chat template, the loss mask on their assistant turns
    (ChatFormat.encode), cut to max_len (counted); one with no assistant token left is dropped."""
    if context.chat is None:
        raise ConfigError("chat data needs TaskContext.chat, the template to render conversations with")
    out, report, differ = [], CutReport(), 0
    for r in raw:
        row = context.chat.encode(r)
        ids, mask = context.cut(row.ids), row.loss_mask[: context.max_len]
        if not any(mask[1:]):  # the first token is never predicted
            report.example(len(row.ids), 0, dropped=True)
            continue
        report.example(len(row.ids), len(ids))
        differ += not row.consistent
        out.append(Encoded(ids, prompt_len=min(row.prompt_len, len(ids)), text=row.answer, loss_mask=mask))
    if differ:
        logger.warning("%d of %d conversations tokenize differently at the end of their last prompt than chat() "
                       "tokenizes that prompt alone (a token merges across it); their exact match may differ", differ,
                       len(raw))
    return Encoding(out, report)


def _prompted_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    s = context.special
    rows, prompt_lens = [], []
    for e, gen in items:
        if e.sentences:  # prefix-lm on text: split <s> doc </s> at a random point
            row = context.cut([s["bos"]] + [t for sent in e.sentences for t in sent] + [s["eos"]])
            split = 1 + int(torch.randint(max(1, len(row) - 1), (), generator=gen))
            rows.append(row)
            prompt_lens.append(min(split, len(row) - 1))
        else:
            rows.append(e.ids)
            prompt_lens.append(e.prompt_len)
    ids, mask = _pad(rows, s["pad"])
    lens = torch.tensor(prompt_lens)
    trained = continuation_mask(lens, mask)
    if items and items[0][0].loss_mask:  # chat: the assistant turns (a prefix-LM: those after its prefix)
        chat_mask, _ = _pad([e.loss_mask for e, _ in items], 0)
        trained = chat_mask.bool() & (trained if context.model_config.arch == "prefix-lm" else mask.bool())
    labels = next_token_labels(ids, trained)
    prefix = prompt_mask(lens, ids.shape[1]) if context.model_config.arch == "prefix-lm" else None
    return Batch(ids, mask, labels, prefix_mask=prefix)


def _prompted_head_config(data: TaskData) -> dict[str, Any]:
    """seq2seq data trains on formatted prompts: the format goes into the config, the package and
    the runtimes (runtime/prompt_format.py). Text data (prefix-lm) is continued as it is."""
    return {"prompt_format": PROMPT_FORMAT if data.kind == "seq2seq" else None}


def _prompted_tokenizer_texts(data: TaskData) -> Iterable[str]:
    """seq2seq data as the decoder will read it: prompt and continuation in one string."""
    if data.kind == "seq2seq":
        return (format_prompt(e.source) + format_continuation(e.target) for e in data.train)
    if data.kind == "chat":
        return chat_tokenizer_texts(data)
    return data.texts(("train",))


# ============================================================================================
# seq2seq and denoise: teacher forcing on the target
# ============================================================================================


def _seq2seq_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """Source and target as the tokenizer encodes them, each cut to max_len (counted); a target
    the tokenizer does not end with eos (an imported tokenizer without that template) gets it,
    so the model learns to stop."""
    eos = context.special["eos"]
    sources = context.tokenizer.encode_batch([r.source for r in raw])
    targets = [t.ids if eos < 0 or t.ids[-1:] == [eos] else t.ids + [eos]
               for t in context.tokenizer.encode_batch([r.target for r in raw])]
    out, report = [], CutReport()
    for s, t, r in zip(sources, targets, raw):
        report.example(len(s.ids) + len(t), min(len(s.ids), context.max_len) + min(len(t), context.max_len))
        out.append(Encoded(context.cut(s.ids), target=context.cut(t), text=r.target, source=r.source))
    return Encoding(out, report)


def _teacher_forcing(context: TaskContext, sources: list[list[int]], targets: list[list[int]]) -> Batch:
    pad = context.special["pad"]
    ids, mask = _pad(sources, pad)
    target, target_mask = _pad(targets, pad)
    decoder_ids = shift_right(target, start_token_id=context.model_config.start_token_id, pad_token_id=pad)
    decoder_mask = torch.cat([torch.ones_like(target_mask[:, :1]), target_mask[:, :-1]], dim=1)  # (B, U)
    return Batch(ids, mask, seq2seq_labels(target, target_mask),
                 decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)


def _seq2seq_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    return _teacher_forcing(context, [e.ids for e, _ in items], [e.target for e, _ in items])


def _denoise_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    return _encode_sentences(context, raw, reserve=1)  # source and target end with </s>


def _denoise_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    s = context.special
    noised = [denoise(e.sentences, mask_token_id=s["mask"], generator=gen) for e, gen in items]
    return _teacher_forcing(context, [context.cut(n.source + [s["eos"]]) for n in noised],
                            [context.cut(n.target + [s["eos"]]) for n in noised])


# ============================================================================================
# Generative tasks: exact match of greedy output, as a user of the model would call it
# ============================================================================================


def exact_match(model: Transformer, context: TaskContext, examples: Sequence[Encoded]) -> float:
    """Share of examples whose greedy output (modeling.generate, KV cache), decoded, equals
    the expected target text, computed as the package's runtime will answer
    ``generate(source)``: the raw source text through the model's ``prompt_format`` (none:
    the text as is), tokenized with the tokenizer's template, the output parsed back by
    the same format."""
    s, fmt = context.special, model.config.prompt_format
    longest = max(len(e.target) if e.target else len(e.ids) - e.prompt_len for e in examples)
    gen_config = GenerationConfig(
        strategy="greedy", max_new_tokens=longest + 2, eos_token_ids=(s["eos"],), pad_token_id=s["pad"]
    )
    hits = 0
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        texts = [fmt.format(e.source) if fmt else e.source for e in chunk]
        prompts = [context.cut(enc.ids) for enc in context.tokenizer.encode_batch(texts)]
        outputs = generate(model, prompts, gen_config)
        for e, out in zip(chunk, outputs):
            text = context.tokenizer.decode(out[0], skip_special_tokens=True)
            hits += (fmt.parse(text) if fmt else text) == e.text.strip()
    return hits / len(examples)


def _exact_match_metrics(model: Transformer, context: TaskContext, examples: Sequence[Encoded]) -> dict[str, float]:
    """Exact match where the examples carry a target text; none on plain text (prefix-lm)."""
    if examples[0].sentences:
        return {}
    if examples[0].loss_mask:  # chat: the last answer, given its prompt as chat() renders it
        longest = max(len(e.ids) - e.prompt_len for e in examples)
        return {"exact_match": chat_exact_match(model, context.chat, context.special["pad"],
                                                [e.ids[: e.prompt_len] for e in examples],
                                                [e.text for e in examples], longest + 2)}
    return {"exact_match": exact_match(model, context, examples)}


# ============================================================================================
# distill: a student on a teacher's token distributions
# ============================================================================================


def _distill_encode(context: TaskContext, raw: Sequence[Example], epoch: int) -> Encoding:
    """The rows the student and the teacher both read: seq2seq for an encoder-decoder, causal-lm
    windows on text, sft rows (prompt + continuation) on seq2seq data."""
    if context.model_config.arch == "encoder-decoder":
        return _seq2seq_encode(context, raw, epoch)
    if not raw or isinstance(raw[0], TextExample):
        return _causal_lm_encode(context, raw, epoch)
    return _prompted_encode(context, raw, epoch)


def _distill_collate(context: TaskContext, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
    if context.model_config.arch == "encoder-decoder":
        return _seq2seq_collate(context, items)
    if items and (items[0][0].prompt_len or items[0][0].loss_mask):
        return _prompted_collate(context, items)
    return _causal_lm_collate(context, items)


def _logits_of(model: Transformer, batch: Batch) -> Tensor:
    """The model's logits on the batch: (B, T, V), or (B, U, V) for an encoder-decoder."""
    if model.config.arch == "encoder-decoder":
        hidden = model.encode(batch.input_ids, batch.attention_mask)  # (B, T, D)
        return model.decode(batch.decoder_input_ids, attention_mask=batch.decoder_attention_mask,
                            cross_kv=model.cross_kv(hidden), encoder_attention_mask=batch.attention_mask).logits
    prefix = batch.prefix_mask if model.config.arch == "prefix-lm" else None
    return model.decode(batch.input_ids, attention_mask=batch.attention_mask, prefix_mask=prefix).logits


def _needs_teacher(model: Transformer, batch: Batch) -> LossOutput:
    raise ConfigError("task 'distill' needs a teacher: pass --teacher CKPT_OR_HF_DIR (TrainConfig.teacher)")


def _distill_generation_metrics(model: Transformer, context: TaskContext, examples: Sequence[Encoded]) -> dict[str, float]:
    return _exact_match_metrics(model, context, examples) if examples and examples[0].text else {}


def distill_objective(teacher: Transformer, *, temperature: float, kl_weight: float) -> Objective:
    """The distill objective bound to its teacher (frozen, in eval mode; not a parameter of the
    trained module): ``kl_weight * T^2 * KL + (1 - kl_weight) * NLL`` (objectives.distillation_loss).
    ``main_loss`` is the hard-label NLL, so validation loss and perplexity compare with a
    model trained from scratch."""
    teacher.eval().requires_grad_(False)

    def loss(model: Transformer, batch: Batch) -> LossOutput:
        logits = _logits_of(model, batch)
        with torch.no_grad():
            teacher_logits = _logits_of(teacher, batch)
        total, hard = distillation_loss(logits, teacher_logits, batch.labels, temperature=temperature,
                                        kl_weight=kl_weight)
        return LossOutput(total, hard, _token_targets(batch), _zero(batch))

    return dataclasses.replace(OBJECTIVES["distill"], loss=loss)


# ============================================================================================
# The registry
# ============================================================================================

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective(
        "causal-lm", archs=("decoder", "prefix-lm"), data_kinds=("text", "classification"),
        defaults=TaskDefaults(steps=600, batch_size=32, lr=3e-3, warmup=50, eval_every=200),
        encode=_causal_lm_encode, collate=_causal_lm_collate, loss=_decoder_loss, metrics=_perplexity,
    ),
    Objective(
        "mlm", archs=("encoder",), data_kinds=("text", "classification"),
        defaults=TaskDefaults(steps=600, batch_size=32, lr=2e-3, warmup=50, eval_every=200),
        encode=_mlm_encode, collate=_mlm_collate, loss=_mlm_loss, metrics=_perplexity,
        heads=("mlm_transform.",),
    ),
    Objective(
        "denoise", archs=("encoder-decoder",), data_kinds=("text",),
        defaults=TaskDefaults(steps=600, batch_size=32, lr=2e-3, warmup=50, eval_every=200),
        encode=_denoise_encode, collate=_denoise_collate, loss=_encoder_decoder_loss, metrics=_perplexity,
    ),
    Objective(
        "seq2seq", archs=("encoder-decoder",), data_kinds=("seq2seq",),
        defaults=TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
        encode=_seq2seq_encode, collate=_seq2seq_collate, loss=_encoder_decoder_loss, metrics=_perplexity,
        generation_metrics=_exact_match_metrics,
    ),
    Objective(
        "sft", archs=("decoder", "prefix-lm"), data_kinds=("seq2seq", "chat"),
        defaults=TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
        encode=_prompted_encode, collate=_prompted_collate, loss=_decoder_loss, metrics=_perplexity,
        generation_metrics=_exact_match_metrics, tokenizer_texts=_prompted_tokenizer_texts,
        head_config=_prompted_head_config,
    ),
    Objective(
        "prefix-lm", archs=("prefix-lm",), data_kinds=("seq2seq", "text"),
        defaults=TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
        encode=_prompted_encode, collate=_prompted_collate, loss=_decoder_loss, metrics=_perplexity,
        generation_metrics=_exact_match_metrics, tokenizer_texts=_prompted_tokenizer_texts,
        head_config=_prompted_head_config,
    ),
    Objective(
        "classify", archs=("encoder",), data_kinds=("classification",),
        defaults=TaskDefaults(steps=1000, batch_size=32, lr=2e-3, warmup=60, eval_every=250),
        encode=_classify_encode, collate=_classify_collate, loss=_classify_loss, metrics=_accuracy,
        heads=("classifier.", "pooler."), fresh_head=("classifier.",), head_config=_classify_head_config,
    ),
    Objective(
        "distill", archs=("decoder", "prefix-lm", "encoder-decoder"), data_kinds=("text", "seq2seq"),
        defaults=TaskDefaults(steps=600, batch_size=32, lr=3e-3, warmup=50, eval_every=200),
        encode=_distill_encode, collate=_distill_collate, loss=_needs_teacher, metrics=_perplexity,
        generation_metrics=_distill_generation_metrics, needs_teacher=True,
    ),
)}

# mlm with next-sentence prediction (TrainConfig.nsp): the same task, its examples are
# sentence pairs drawn afresh each epoch, and the loss adds the NSP head's.
MLM_NSP = dataclasses.replace(
    OBJECTIVES["mlm"], encode=_nsp_encode, collate=_nsp_collate, loss=_nsp_loss, metrics=_nsp_metrics,
    redraws_each_epoch=True,
)

TASKS = tuple(OBJECTIVES)


def objective_for(task: str, *, nsp: bool = False) -> Objective:
    """The objective a run trains: its task's, or masked LM + next-sentence prediction."""
    if not isinstance(task, str) or task not in OBJECTIVES:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if not nsp:
        return OBJECTIVES[task]
    if task != MLM_NSP.name:
        raise ConfigError(f"nsp adds next-sentence prediction to task {MLM_NSP.name!r}; got task {task!r}: "
                          f"leave nsp off (drop --nsp), or train an encoder with it (--arch {MLM_NSP.archs[0]} --task "
                          f"{MLM_NSP.name} --nsp)")
    return MLM_NSP


__all__ = [
    "MLM_NSP", "OBJECTIVES", "TASKS", "Batch", "CutReport", "Encoded", "Encoding", "EvalSums", "LossOutput", "Objective", "TaskContext",
    "TaskDefaults", "distill_objective", "exact_match", "example_generator", "objective_for",
]
