"""The training loop: one function, `train(config)`, configured by a frozen `TrainConfig`.

Reading order: configuration -> data (examples to token ids, batches) -> the task model
(model + objective, the unit DDP wraps) -> evaluation -> `train()` itself, top to bottom.

Tasks (``TrainConfig.task``), the architectures and data kinds they take, and what they learn:

==========  =======================  ================  ===============================================
task        arch                     data kind         objective (modeling/objectives.py)
==========  =======================  ================  ===============================================
causal-lm   decoder, prefix-lm       text (*)          next-token NLL on ``<s> doc </s>``
mlm         encoder                  text (*)          BERT masking (+ next-sentence pairs with nsp)
denoise     encoder-decoder          text              BART: permute sentences, infill spans -> original
seq2seq     encoder-decoder          seq2seq           target NLL given the source
sft         decoder, prefix-lm       seq2seq           NLL of the continuation given the prompt
prefix-lm   prefix-lm                seq2seq, text     as sft; on text, a random split per example
classify    encoder                  classification    cross-entropy of the pooled [CLS] head
==========  =======================  ================  ===============================================

(*) or classification data, whose texts are used without labels (domain-adaptive pretraining
before fine-tuning a classifier on the same texts).

Determinism and resume: the sample at global position p (p = step * global batch + offset)
is ``permutation(seed, epoch)[p % n]`` and its random noise (masking, denoising, split points)
comes from a generator seeded by (seed, p). Data order and noise are therefore functions of
the seed and the step alone, independent of the number of processes; with the optimizer,
schedule and RNG state restored, ``--resume`` continues exactly where an uninterrupted run
would be.

Distributed: run the same command under ``torchrun``; each process takes its slice of every
global batch, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA),
and only rank 0 evaluates and writes. ``batch_size`` is per process.

Shape letters: B batch, T encoder/decoder tokens, U decoder tokens of an encoder-decoder, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import PRESETS, ModelConfig
from .data import TaskData, TextExample, format_continuation, format_prompt, load_task_data, parse_continuation
from .model import Transformer
from .objectives import (
    IGNORE_INDEX,
    continuation_mask,
    classification_loss,
    denoise,
    mask_tokens,
    mlm_loss,
    next_sentence_pairs,
    next_token_labels,
    prompt_mask,
    seq2seq_labels,
    shift_right,
    token_cross_entropy,
)
from .peft import LoRAConfig, apply_bitfit, apply_lora, trainable_parameters
from .tokenizer import load_tokenizer, special_token_ids, train_tokenizer

logger = logging.getLogger(__name__)

# ============================================================================================
# Configuration
# ============================================================================================

TASKS = ("causal-lm", "mlm", "denoise", "seq2seq", "sft", "prefix-lm", "classify")
TASK_ARCHS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("decoder", "prefix-lm"),
    "mlm": ("encoder",),
    "denoise": ("encoder-decoder",),
    "seq2seq": ("encoder-decoder",),
    "sft": ("decoder", "prefix-lm"),
    "prefix-lm": ("prefix-lm",),
    "classify": ("encoder",),
}
TASK_DATA_KINDS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("text", "classification"),  # classification data: its texts, labels unused
    "mlm": ("text", "classification"),
    "denoise": ("text",),
    "seq2seq": ("seq2seq",),
    "sft": ("seq2seq",),
    "prefix-lm": ("seq2seq", "text"),
    "classify": ("classification",),
}
GENERATIVE_TASKS = ("seq2seq", "sft", "prefix-lm")  # evaluated by exact match of greedy output


class TaskDefaults(NamedTuple):
    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int


# Defaults per task, tuned on 2 CPU cores for the tiny preset and the built-in data
# (benchmarks/TRAINING.md); every one can be overridden.
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "causal-lm": TaskDefaults(steps=600, batch_size=32, lr=3e-3, warmup=50, eval_every=200),
    "mlm": TaskDefaults(steps=600, batch_size=32, lr=2e-3, warmup=50, eval_every=200),
    "denoise": TaskDefaults(steps=600, batch_size=32, lr=2e-3, warmup=50, eval_every=200),
    "seq2seq": TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
    "sft": TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
    "prefix-lm": TaskDefaults(steps=600, batch_size=64, lr=3e-3, warmup=50, eval_every=200),
    "classify": TaskDefaults(steps=1000, batch_size=32, lr=2e-3, warmup=60, eval_every=250),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Fields left at None take the task's default (TASK_DEFAULTS)."""

    arch: str  # encoder | decoder | encoder-decoder | prefix-lm
    task: str  # one of TASKS
    data: str  # builtin:NAME, shared:NAME, or a training file (.txt, .jsonl, .tsv)
    out_dir: str  # run directory: checkpoints, metrics.jsonl
    valid_data: str | None = None  # validation file; default: hold out 5% of a training file
    preset: str = "tiny"  # model size, a key of PRESETS (ignored with from_checkpoint)
    vocab_size: int = 1024  # upper bound for the trained tokenizer
    max_len: int = 128  # longest tokenized sequence; longer ones are cut (also to the model's max_seq_len)
    dropout: float = 0.0  # model dropout while training (also applied to from_checkpoint models)
    # Optimisation
    steps: int | None = None  # optimizer steps
    batch_size: int | None = None  # examples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float | None = None  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int | None = None  # linear warmup steps
    weight_decay: float = 0.01  # AdamW, on matrices and embeddings only
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    bf16: bool = False  # bfloat16 autocast (CPU or CUDA)
    seed: int = 0  # model init, data order, noise
    data_seed: int = 0  # built-in data generation and validation hold-out
    # Objectives
    nsp: bool = False  # mlm: add next-sentence prediction (pairs with token types 0/1)
    # Parameter-efficient fine-tuning (needs from_checkpoint to make sense, but does not require it)
    lora_rank: int = 0  # > 0 turns LoRA on
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    bitfit: bool = False  # train biases (and the task head) only
    from_checkpoint: str | None = None  # start from these weights (+ tokenizer); a run dir or checkpoint dir
    resume: bool = False  # continue out_dir's latest checkpoint
    # Evaluation, checkpoints, logging
    eval_every: int | None = None  # steps between evaluations on the validation split
    eval_examples: int = 500  # validation examples per periodic evaluation (final: all)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = all
    log_every: int = 10  # steps between train-loss lines in metrics.jsonl
    device: str = "auto"  # auto | cpu | cuda
    # CPU threads for torch ops; 0 = torch's default (one per core). Tiny models run
    # fastest on one: their ops are too small to split, and OpenMP workers spin-waiting on
    # cores shared with other processes slow training down by up to 10x (benchmarks/TRAINING.md).
    threads: int = 1
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.arch not in TASK_ARCHS[self.task]:
            raise ValueError(
                f"task {self.task!r} trains arch {' or '.join(map(repr, TASK_ARCHS[self.task]))}; "
                f"got arch {self.arch!r}"
            )
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        defaults = TASK_DEFAULTS[self.task]
        for name in ("steps", "batch_size", "lr"):
            if getattr(self, name) is None:
                set_(name, getattr(defaults, name))
        if self.warmup is None:  # scaled down for short runs
            set_("warmup", min(defaults.warmup, self.steps // 10) if isinstance(self.steps, int) else 0)
        if self.eval_every is None:
            set_("eval_every", min(defaults.eval_every, self.steps) if isinstance(self.steps, int) else 1)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_examples", "log_every", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("warmup", "save_every", "keep_checkpoints", "lora_rank", "seed", "data_seed", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay ({self.weight_decay}) and grad_clip ({self.grad_clip}) must be >= 0"
            )
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
        if self.nsp and self.task != "mlm":
            raise ValueError(f"nsp adds next-sentence prediction to task 'mlm'; got task {self.task!r}")
        set_("lora_targets", tuple(self.lora_targets))
        if self.lora_rank and self.bitfit:
            raise ValueError("choose LoRA (lora_rank > 0) or BitFit, not both")
        if self.lora_rank:
            self.lora_config()  # validates alpha, dropout, targets
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {self.device!r}")

    def lora_config(self) -> LoRAConfig | None:
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the final checkpoint folder (load_model / export take it or run_dir)
    step: int  # optimizer steps done
    metrics: dict[str, float]  # final evaluation: "valid/loss", "test/accuracy", "test/exact_match", ...
    first_loss: float  # training loss of the first step of this run (fresh runs: the untrained model)
    last_loss: float  # training loss of the last step
    wall_time_s: float


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (config.lr - floor)


# ============================================================================================
# Data: examples -> token ids (once), sample order and noise as functions of (seed, position)
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


def _mix(seed: int, stream: int, position: int) -> int:
    """A 63-bit generator seed from (seed, stream, position); stream 0 = train, 1 = eval."""
    return ((seed * 1_000_003 + stream) * 2_147_483_647 + position) % (2**63 - 1)


def example_generator(seed: int, position: int, *, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, stream, position))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 2, epoch))).tolist())


def sample_positions(step: int, micro: int, *, config: TrainConfig, rank: int, world_size: int) -> range:
    """Global sample positions of this process's micro-batch: a contiguous slice of the
    step's global batch (grad_accum * world_size * batch_size samples), rank r at slice r."""
    b = config.batch_size
    start = ((step * config.grad_accum + micro) * world_size + rank) * b
    return range(start, start + b)


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists -> ids (B, T) and mask (B, T)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class TaskDataset:
    """A split of a task as token ids, and the batches built from it.

    ``examples(epoch)`` is fixed for every task but mlm+nsp, whose pairs are redrawn each
    epoch (seeded). ``train_batch(positions)`` builds a Batch from global sample positions;
    ``eval_batches()`` walks the split in order with fixed noise.
    """

    def __init__(self, config: TrainConfig, tokenizer, data: TaskData, split: str, model_config: ModelConfig):
        self.config, self.tokenizer, self.split, self.model_config = config, tokenizer, split, model_config
        self.special = special_token_ids(tokenizer)
        self.raw = list(getattr(data, split))
        self.label_names = data.label_names
        self._encoded: list[Encoded] | None = None if (config.nsp and config.task == "mlm") else self._encode(self.raw)
        self._nsp_epoch: tuple[int, list[Encoded]] | None = None
        self._len = len(self._encoded) if self._encoded is not None else sum(
            max(0, len(r.sentences) - 1) for r in self.raw  # one NSP pair per sentence with a successor
        )

    def __len__(self) -> int:
        return self._len

    # Encoding ---------------------------------------------------------------------------------
    def _cut(self, ids: list[int]) -> list[int]:
        return ids[: min(self.config.max_len, self.model_config.max_seq_len)]

    def _encode(self, raw: list) -> list[Encoded]:
        task, tok, eos = self.config.task, self.tokenizer, self.special["eos"]
        if task == "classify":
            return [Encoded(self._cut(e.ids), label=self.label_names.index(r.label))
                    for e, r in zip(tok.encode_batch([r.text for r in raw]), raw)]
        if task == "mlm":
            return [Encoded(self._cut(e.ids)) for e in tok.encode_batch([r.text for r in raw])]
        if task == "causal-lm":
            return [Encoded(self._cut(e.ids + [eos])) for e in tok.encode_batch([r.text for r in raw])]
        if task == "seq2seq":
            sources = tok.encode_batch([r.source for r in raw])
            targets = tok.encode_batch([r.target for r in raw])
            return [Encoded(self._cut(s.ids), target=self._cut(t.ids), text=r.target)
                    for s, t, r in zip(sources, targets, raw)]
        if task in ("sft", "prefix-lm") and raw and not isinstance(raw[0], TextExample):
            prompts = tok.encode_batch([format_prompt(r.source) for r in raw])
            conts = tok.encode_batch([format_continuation(r.target) for r in raw], add_special_tokens=False)
            out = []
            for p, c, r in zip(prompts, conts, raw):
                ids = self._cut(p.ids + c.ids + [eos])
                out.append(Encoded(ids, prompt_len=min(len(p.ids), len(ids) - 1), text=r.target))
            return out
        # denoise, prefix-lm on text: sentences as token lists; later sentences keep their leading space
        out = []
        for r in raw:
            sentences = r.sentences or [r.text]
            texts = [s if i == 0 else " " + s for i, s in enumerate(sentences)]
            encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
            out.append(Encoded([], sentences=encoded))
        return out

    def examples(self, epoch: int) -> list[Encoded]:
        if self._encoded is not None:
            return self._encoded
        if self._nsp_epoch is None or self._nsp_epoch[0] != epoch:
            documents = [r.sentences for r in self.raw]
            pairs = next_sentence_pairs(documents, generator=example_generator(self.config.seed, epoch, stream=3))
            encoded = self.tokenizer.encode_batch([(p.first, p.second) for p in pairs])
            self._nsp_epoch = (epoch, [
                Encoded(self._cut(e.ids), label=p.label, type_ids=self._cut(e.type_ids))
                for e, p in zip(encoded, pairs)
            ])
        return self._nsp_epoch[1]

    # Batches ----------------------------------------------------------------------------------
    def train_batch(self, positions: Sequence[int]) -> Batch:
        """The batch at global sample positions (train: shuffled order, fresh noise per position)."""
        n = len(self)
        chosen = []
        for p in positions:
            epoch = p // n
            index = _epoch_order(n, self.config.seed, epoch)[p % n]
            chosen.append((self.examples(epoch)[index], example_generator(self.config.seed, p)))
        return self.collate(chosen)

    def eval_batches(self, limit: int | None = None, batch_size: int = 128):
        """Fixed batches over the first `limit` examples, with fixed noise (stream 1)."""
        examples = self.examples(0)[: limit or None]
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            yield chunk, self.collate(
                [(e, example_generator(self.config.seed, start + i, stream=1)) for i, e in enumerate(chunk)]
            )

    def collate(self, items: Sequence[tuple[Encoded, torch.Generator]]) -> Batch:
        task, s, cfg = self.config.task, self.special, self.model_config
        examples = [e for e, _ in items]
        if task == "classify":
            ids, mask = _pad([e.ids for e in examples], s["pad"])
            return Batch(ids, mask, torch.tensor([e.label for e in examples]))
        if task == "mlm":
            specials = [i for i in s.values() if i >= 0]
            rows, labels = [], []
            for e, gen in items:  # masking per example: independent of how batches are cut
                masked = mask_tokens(torch.tensor([e.ids]), mask_token_id=s["mask"], special_token_ids=specials,
                                     vocab_size=cfg.vocab_size, generator=gen)
                rows.append(masked.input_ids[0].tolist())
                labels.append(masked.labels[0].tolist())
            ids, mask = _pad(rows, s["pad"])
            label_ids, _ = _pad(labels, IGNORE_INDEX)
            if not self.config.nsp:
                return Batch(ids, mask, label_ids)
            types, _ = _pad([e.type_ids for e in examples], 0)
            return Batch(ids, mask, label_ids, token_type_ids=types, nsp_labels=torch.tensor([e.label for e in examples]))
        if task == "causal-lm":
            ids, mask = _pad([e.ids for e in examples], s["pad"])
            prefix = torch.zeros_like(mask, dtype=torch.bool) if cfg.arch == "prefix-lm" else None
            return Batch(ids, mask, next_token_labels(ids, mask.bool()), prefix_mask=prefix)
        if task in ("seq2seq", "denoise"):
            if task == "denoise":
                noised = [denoise(e.sentences, mask_token_id=s["mask"], generator=gen) for e, gen in items]
                sources = [self._cut(n.source + [s["eos"]]) for n in noised]
                targets = [self._cut(n.target + [s["eos"]]) for n in noised]
            else:
                sources, targets = [e.ids for e in examples], [e.target for e in examples]
            ids, mask = _pad(sources, s["pad"])
            target, target_mask = _pad(targets, s["pad"])
            decoder_ids = shift_right(target, start_token_id=cfg.start_token_id, pad_token_id=s["pad"])
            decoder_mask = torch.cat([torch.ones_like(target_mask[:, :1]), target_mask[:, :-1]], dim=1)
            return Batch(ids, mask, seq2seq_labels(target, target_mask),
                         decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
        # sft, prefix-lm
        rows, prompt_lens = [], []
        for e, gen in items:
            if e.sentences:  # prefix-lm on text: split <s> doc </s> at a random point
                row = self._cut([s["bos"]] + [t for sent in e.sentences for t in sent] + [s["eos"]])
                split = 1 + int(torch.randint(max(1, len(row) - 1), (), generator=gen))
                rows.append(row)
                prompt_lens.append(min(split, len(row) - 1))
            else:
                rows.append(e.ids)
                prompt_lens.append(e.prompt_len)
        ids, mask = _pad(rows, s["pad"])
        lens = torch.tensor(prompt_lens)
        labels = next_token_labels(ids, continuation_mask(lens, mask))
        prefix = prompt_mask(lens, ids.shape[1]) if cfg.arch == "prefix-lm" else None
        return Batch(ids, mask, labels, prefix_mask=prefix)


# ============================================================================================
# The task model: model + objective in one forward, the unit DDP wraps
# ============================================================================================


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, what is optimised: mean over this batch's targets (+ NSP loss for mlm+nsp)
    main_loss: Tensor  # scalar, the task's own loss without NSP (= loss for every other task)
    targets: Tensor  # scalar int: tokens (or rows, for classification) main_loss averages over
    correct: Tensor  # scalar int: correct class predictions (classify, NSP); 0 otherwise


class TaskModel(nn.Module):
    """forward(batch) -> LossOutput for the configured task."""

    def __init__(self, model: Transformer, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Batch) -> LossOutput:
        m, zero = self.model, torch.zeros((), dtype=torch.long, device=batch.input_ids.device)
        if self.task in ("classify", "mlm"):
            hidden = m.encode(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)  # (B, T, D)
            if self.task == "classify":
                logits = m.classify(hidden)  # (B, C)
                correct = (logits.argmax(-1) == batch.labels).sum()
                loss = classification_loss(logits, batch.labels)
                return LossOutput(loss, loss, zero + len(batch.labels), correct)
            loss = mlm_loss(m.mlm_logits(hidden), batch.labels)
            targets = (batch.labels != IGNORE_INDEX).sum()
            if batch.nsp_labels is None:
                return LossOutput(loss, loss, targets, zero)
            nsp = m.nsp_logits(hidden)  # (B, 2)
            correct = (nsp.argmax(-1) == batch.nsp_labels).sum()
            return LossOutput(loss + classification_loss(nsp, batch.nsp_labels), loss, targets, correct)
        if batch.decoder_input_ids is not None:  # encoder-decoder
            hidden = m.encode(batch.input_ids, batch.attention_mask)  # (B, T, D)
            out = m.decode(
                batch.decoder_input_ids, attention_mask=batch.decoder_attention_mask,
                cross_kv=m.cross_kv(hidden), encoder_attention_mask=batch.attention_mask,
            )  # logits (B, U, V)
        else:
            out = m.decode(batch.input_ids, attention_mask=batch.attention_mask, prefix_mask=batch.prefix_mask)
        loss = token_cross_entropy(out.logits, batch.labels)
        return LossOutput(loss, loss, (batch.labels != IGNORE_INDEX).sum(), zero)


# ============================================================================================
# Evaluation
# ============================================================================================


@torch.no_grad()
def evaluate(
    task_model: TaskModel, dataset: TaskDataset, *, device: torch.device, limit: int | None = None,
    generate_outputs: bool = True, autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Loss (token-weighted), perplexity for token tasks, accuracy for classification and
    NSP, exact match of greedy generation for generative tasks. Keys are unprefixed."""
    task = dataset.config.task
    was_training = task_model.training
    task_model.eval()
    loss_sum, targets, correct, rows, nsp_sum = 0.0, 0, 0, 0, 0.0
    for _, batch in dataset.eval_batches(limit):
        with autocast():
            out = task_model(batch.to(device))
        n, b = int(out.targets), len(batch.input_ids)
        loss_sum += float(out.main_loss) * n
        nsp_sum += float(out.loss - out.main_loss) * b
        targets, rows, correct = targets + n, rows + b, correct + int(out.correct)
    metrics: dict[str, float] = {"loss": loss_sum / max(1, targets), "examples": float(rows)}
    if task == "classify":
        metrics["accuracy"] = correct / max(1, rows)
    else:
        metrics["perplexity"] = math.exp(min(50.0, metrics["loss"]))
    if task == "mlm" and dataset.config.nsp:
        metrics["nsp_loss"] = nsp_sum / max(1, rows)
        metrics["nsp_accuracy"] = correct / max(1, rows)
    if generate_outputs and task in GENERATIVE_TASKS and not dataset.examples(0)[0].sentences:
        metrics["exact_match"] = exact_match(task_model.model, dataset, limit=limit)
    task_model.train(was_training)
    return metrics


def exact_match(model: Transformer, dataset: TaskDataset, *, limit: int | None = None) -> float:
    """Share of examples whose greedy output (modeling.generate, KV cache), decoded, equals
    the expected target text. Prompts: the source (encoder-decoder) or ``<s> prompt``."""
    from onnxformer.runtime.generation import GenerationConfig

    from .generate import generate

    examples = dataset.examples(0)[: limit or None]
    s = dataset.special
    longest = max(len(e.target) if e.target else len(e.ids) - e.prompt_len for e in examples)
    gen_config = GenerationConfig(
        strategy="greedy", max_new_tokens=longest + 2, eos_token_ids=(s["eos"],), pad_token_id=s["pad"]
    )
    hits = 0
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        prompts = [e.ids if e.target else e.ids[: e.prompt_len] for e in chunk]
        outputs = generate(model, prompts, gen_config)
        for e, out in zip(chunk, outputs):
            text = dataset.tokenizer.decode(out[0], skip_special_tokens=True)
            hits += parse_continuation(text) == e.text.strip()
    return hits / len(examples)


# ============================================================================================
# Building the run: distributed setup, tokenizer, model
# ============================================================================================


class Distributed(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(config: TrainConfig) -> Distributed:
    """Single process, or one process of a torchrun launch (WORLD_SIZE > 1)."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(0, 1, torch.device("cuda" if use_cuda else "cpu"), False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, initialized_here)


def _broadcast_text(text: str | None, env: Distributed) -> str:
    """Rank 0's string on every rank (as a uint8 tensor: no pickling)."""
    if env.world_size == 1:
        assert text is not None
        return text
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    payload = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8) if env.is_main else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buffer = payload.to(device) if payload is not None else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode("utf-8")


def tokenizer_texts(config: TrainConfig, data: TaskData):
    """What the tokenizer trains on: the training split, as the model will see it."""
    if config.task in ("sft", "prefix-lm") and data.kind == "seq2seq":
        return (format_prompt(e.source) + format_continuation(e.target) for e in data.train)
    return data.texts(("train",))


def build_model_config(config: TrainConfig, tokenizer, data: TaskData) -> ModelConfig:
    s = special_token_ids(tokenizer)
    classify = config.task == "classify"
    return ModelConfig(
        arch=config.arch,
        vocab_size=tokenizer.get_vocab_size(),
        **PRESETS[config.preset],
        type_vocab_size=2 if config.nsp else 0,
        dropout=config.dropout,
        num_labels=len(data.label_names) if classify else 0,
        label_names=data.label_names if classify else (),
        pad_token_id=s["pad"],
        bos_token_id=s["bos"],
        eos_token_id=s["eos"],
        decoder_start_token_id=s["bos"] if config.arch == "encoder-decoder" else -1,
    )


TASK_HEADS: dict[str, tuple[str, ...]] = {"classify": ("classifier.", "pooler."), "mlm": ("mlm_transform.",)}


def _fine_tune_config(source: ModelConfig, config: TrainConfig, data: TaskData) -> ModelConfig:
    if source.arch != config.arch:
        raise ValueError(
            f"from_checkpoint holds a {source.arch!r} model but arch is {config.arch!r}; pass --arch {source.arch}"
        )
    if config.task == "classify":
        return source.replace(num_labels=len(data.label_names), label_names=data.label_names, dropout=config.dropout)
    return source.replace(dropout=config.dropout)


def _dedupe(state: dict[str, Tensor]) -> dict[str, Tensor]:
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    return out


def _decay_groups(named: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (dim >= 2), none on biases and norms."""
    decay = [p for p in named.values() if p.dim() >= 2]
    no_decay = [p for p in named.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ordered_names(named: dict[str, nn.Parameter]) -> list[str]:
    """Parameter names in the optimizer's order (decay group first), for optimizer state."""
    return [n for n, p in named.items() if p.dim() >= 2] + [n for n, p in named.items() if p.dim() < 2]


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


# ============================================================================================
# Building the run: what to resume, the tokenizer, the model
# ============================================================================================

METRICS_FILE = "metrics.jsonl"
RESUME_MAY_CHANGE = ("resume", "progress", "threads", "device", "out_dir")  # a moved run dir still resumes


def _resume_state(config: TrainConfig, env: Distributed) -> ckpt.TrainingState | None:
    """The checkpoint to resume (resume=True), after checking the run's settings match."""
    run_dir = Path(config.out_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if not config.resume:
        if latest is not None:
            raise FileExistsError(
                f"{run_dir} already holds a run (its {ckpt.LATEST!r} is {latest.name}); pass resume=True "
                "(--resume) to continue it, or choose another out_dir"
            )
        return None
    if latest is None:
        raise FileNotFoundError(f"resume: {run_dir} has no checkpoint yet; drop --resume to start a new run")
    state = ckpt.load_training_state(latest)
    saved, now = state.trainer_state["train_config"], config.to_dict()
    diff = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if diff:
        raise ValueError(
            "resume: the run was started with different settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in diff)
            + "; resume with the original settings or start a new out_dir"
        )
    if state.trainer_state["world_size"] != env.world_size:
        raise ValueError(
            f"resume: the run used {state.trainer_state['world_size']} processes, this launch has "
            f"{env.world_size}; the data order depends on it, so launch with the same number"
        )
    return state


def _tokenizer(config: TrainConfig, data: TaskData, source: Path | None, env: Distributed):
    """The source checkpoint's tokenizer, or a new one trained by rank 0 on the training split."""
    from tokenizers import Tokenizer

    if source is not None:
        return load_tokenizer(source / ckpt.TOKENIZER_FILE)
    text = None
    if env.is_main:
        text = train_tokenizer(tokenizer_texts(config, data), arch=config.arch, vocab_size=config.vocab_size).to_str()
    return Tokenizer.from_str(_broadcast_text(text, env))


def build_model(
    config: TrainConfig, data: TaskData, tokenizer, *, source: Path | None, resume: ckpt.TrainingState | None
) -> Transformer:
    """A new model, or one loaded from `source` (from_checkpoint, or the checkpoint being
    resumed), with LoRA or BitFit applied. Fine-tuning a classifier adds a fresh head."""
    if resume is not None:
        model_config = ModelConfig.load(resume.folder / ckpt.CONFIG_FILE)
    elif source is not None:
        model_config = _fine_tune_config(ModelConfig.load(source / ckpt.CONFIG_FILE), config, data)
    else:
        model_config = build_model_config(config, tokenizer, data)
    model = Transformer(model_config)
    if source is not None:
        tensors, fresh_head = ckpt.load_file(str(source / ckpt.MODEL_FILE)), ()
        if resume is None and config.task == "classify":
            tensors = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
            fresh_head = ("classifier.",)
        ckpt.load_plain_state_dict(model, tensors, source=str(source / ckpt.MODEL_FILE), allow_missing=fresh_head)
    head = TASK_HEADS.get(config.task, ())
    if config.lora_rank:
        apply_lora(model, config.lora_config(), trainable=head)
    elif config.bitfit:
        apply_bitfit(model, trainable=head)
    if resume is not None and config.lora_rank:  # the exact unmerged weights, not the merged export
        unmerged = {k[len("model/"):]: v for k, v in resume.tensors.items() if k.startswith("model/")}
        model.load_state_dict(unmerged, strict=False)
    return model


def _trainer_state(config: TrainConfig, env: Distributed, step: int, optimizer_meta, rng, metrics, counts) -> dict[str, Any]:
    return {
        "step": step,
        "train_config": config.to_dict(),
        "world_size": env.world_size,
        "parameters": counts,  # total (incl. LoRA adapters) and trainable
        "optimizer": optimizer_meta,
        "scheduler": {"kind": "linear-warmup-cosine", "step": step, "lr": learning_rate(min(step, config.steps - 1), config)},
        "data": {
            "samples_seen": step * config.grad_accum * env.world_size * config.batch_size,
            "order": "epoch permutation seeded by (seed, epoch); noise seeded by (seed, sample position)",
        },
        "rng": rng,
        "metrics": metrics,
    }


# ============================================================================================
# train()
# ============================================================================================


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume, or fine-tune) one model; returns the final metrics and checkpoint."""
    started = time.perf_counter()
    env = setup_distributed(config)
    threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        return _train(config, env, started)
    finally:
        torch.set_num_threads(threads)  # process-wide: give the caller its setting back
        if env.initialized_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, env: Distributed, started: float) -> TrainResult:
    run_dir = Path(config.out_dir)
    metrics_file = run_dir / METRICS_FILE
    resume = _resume_state(config, env)
    torch.manual_seed(config.seed)

    # Data, tokenizer, model ----------------------------------------------------------------------
    data = load_task_data(config.data, valid=config.valid_data, seed=config.data_seed)
    if data.kind not in TASK_DATA_KINDS[config.task]:
        raise ValueError(
            f"task {config.task!r} needs {' or '.join(TASK_DATA_KINDS[config.task])} data; "
            f"{config.data} holds {data.kind} data"
        )
    if config.nsp and data.kind != "text":
        raise ValueError(f"nsp needs documents of several sentences (text data); {config.data} holds {data.kind} data")
    source = resume.folder if resume else ckpt.resolve_checkpoint(config.from_checkpoint) if config.from_checkpoint else None
    tokenizer = _tokenizer(config, data, source, env)
    model = build_model(config, data, tokenizer, source=source, resume=resume).to(env.device)
    model_config = model.config
    named = trainable_parameters(model)
    names = _ordered_names(named)
    counts = {"total": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in named.values())}
    logger.info("model: %s, %d parameters (%d trainable)", model_config.arch, counts["total"], counts["trainable"])
    train_set = TaskDataset(config, tokenizer, data, "train", model_config)
    valid_set = TaskDataset(config, tokenizer, data, "valid", model_config) if data.valid else None
    test_set = TaskDataset(config, tokenizer, data, "test", model_config) if data.test else None

    # Optimizer, and the state of the run being resumed ---------------------------------------------
    task_model = TaskModel(model, config.task)
    optimizer = torch.optim.AdamW(_decay_groups(named, config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    start_step = 0
    if resume is not None:
        ckpt.load_optimizer_state(optimizer, names, resume.tensors, resume.trainer_state["optimizer"])
        ckpt.set_rng_state(resume.tensors, resume.trainer_state["rng"])
        start_step = int(resume.trainer_state["step"])
        logger.info("resuming %s at step %d", resume.folder, start_step)
        if start_step >= config.steps:
            logger.info("the run already finished (step %d of %d)", start_step, config.steps)
            return TrainResult(run_dir, resume.folder, start_step, resume.trainer_state["metrics"],
                               float("nan"), float("nan"), time.perf_counter() - started)
    trained = task_model
    if env.world_size > 1:
        trained = nn.parallel.DistributedDataParallel(
            task_model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=config.arch == "encoder",  # heads the task does not use (nsp, pooler, mlm)
        )
    autocast = functools.partial(torch.autocast, device_type=env.device.type, dtype=torch.bfloat16, enabled=config.bf16)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            _truncate_metrics(metrics_file, start_step)  # lines written after that checkpoint
        else:
            metrics_file.unlink(missing_ok=True)  # left by a run that died before its first checkpoint
            if valid_set is not None:  # where the losses start
                first = evaluate(task_model, valid_set, device=env.device, limit=config.eval_examples,
                                 generate_outputs=False, autocast=autocast)
                _append_metrics(metrics_file, {"step": 0, "split": "valid", **first})

    def save(step: int, metrics: dict[str, float]) -> Path:
        opt_tensors, opt_meta = ckpt.optimizer_state(optimizer, names)
        rng_tensors, rng_scalars = ckpt.rng_state()
        training_tensors = {**opt_tensors, **rng_tensors}
        if config.lora_rank:
            training_tensors.update({f"model/{k}": v for k, v in _dedupe(model.state_dict()).items()})
        files = ckpt.CheckpointFiles(
            model_config, ckpt.plain_state_dict(model), tokenizer.to_str(),
            _trainer_state(config, env, step, opt_meta, rng_scalars, metrics, counts), training_tensors,
        )
        return ckpt.save_checkpoint(run_dir, step, files, keep=config.keep_checkpoints)

    # The loop ----------------------------------------------------------------------------------------
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not (env.is_main and config.progress), desc=config.task, dynamic_ncols=True)
    first_loss = last_loss = float("nan")
    last_metrics: dict[str, float] = {}
    tick, tokens = time.perf_counter(), 0
    task_model.train()
    for step in bar:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(config.grad_accum):
            positions = sample_positions(step, micro, config=config, rank=env.rank, world_size=env.world_size)
            batch = train_set.train_batch(positions).to(env.device)
            tokens += batch.num_tokens()
            sync = env.world_size == 1 or micro == config.grad_accum - 1  # all-reduce on the last micro-step
            with (contextlib.nullcontext() if sync else trained.no_sync()), autocast():
                out = trained(batch)
            (out.loss / config.grad_accum).backward()
            step_loss += out.loss.item() / config.grad_accum
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(named.values(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if env.world_size > 1:  # the logged loss is the mean over processes
            reduced = torch.tensor([step_loss], device=env.device)
            dist.all_reduce(reduced)
            step_loss = float(reduced) / env.world_size
        first_loss = step_loss if step == start_step else first_loss
        last_loss = step_loss
        if env.is_main and (done % config.log_every == 0 or done == config.steps):
            rate = tokens * env.world_size / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}")
            _append_metrics(metrics_file, {"step": done, "split": "train", "loss": step_loss, "lr": lr, "tokens_per_s": rate})
            tick, tokens = time.perf_counter(), 0
        if env.is_main and valid_set is not None and done % config.eval_every == 0 and done < config.steps:
            last_metrics = evaluate(task_model, valid_set, device=env.device, limit=config.eval_examples, autocast=autocast)
            _append_metrics(metrics_file, {"step": done, "split": "valid", **last_metrics})
            logger.info("step %d valid %s", done, _format(last_metrics))
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            if env.is_main:
                save(done, last_metrics)
            if env.world_size > 1:
                dist.barrier()
    bar.close()

    # Final evaluation (valid, and the held-out test split) and checkpoint -----------------------------
    final: dict[str, float] = {}
    checkpoint = run_dir / ckpt.checkpoint_name(config.steps)
    if env.is_main:
        for name, dataset in (("valid", valid_set), ("test", test_set)):
            if dataset is not None:
                result = evaluate(task_model, dataset, device=env.device, autocast=autocast)
                _append_metrics(metrics_file, {"step": config.steps, "split": name, **result})
                final.update({f"{name}/{k}": v for k, v in result.items()})
        logger.info("final %s", _format(final))
        checkpoint = save(config.steps, final)
    if env.world_size > 1:
        dist.barrier()
    return TrainResult(
        run_dir=run_dir, checkpoint=checkpoint, step=config.steps, metrics=final,
        first_loss=first_loss, last_loss=last_loss, wall_time_s=time.perf_counter() - started,
    )


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


__all__ = [
    "TASKS", "TASK_ARCHS", "TASK_DATA_KINDS", "TASK_DEFAULTS", "Batch", "LossOutput", "TaskDataset",
    "TaskModel", "TrainConfig", "TrainResult", "build_model", "evaluate", "learning_rate", "sample_positions", "train",
]
