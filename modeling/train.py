"""The training loop: one function, `train(config)`, configured by a frozen `TrainConfig`.

Reading order: configuration -> data (a split as token ids, batches at sample positions) ->
the task model (model + objective, the unit DDP wraps) -> evaluation -> building the run ->
`train()` itself, top to bottom: setup, the step loop, evaluation, save.

What each task trains, on which architectures and data, lives in one place: its `Objective`
in ``modeling/tasks.py`` (``OBJECTIVES[task]``: encode, collate, loss, metrics). The trainer
looks the objective up once and never branches on the task's name.

Starting points: a new model (its tokenizer trained on the data), one of our checkpoints, or a
local Hugging Face model folder (`import_hf`, modeling/hf_import.py): its tokenizer.json, the
special token ids its import read (a model without a pad token is padded with eos), and its
PackageInfo, kept in every checkpoint as package.json so that resume and export have it.

Determinism and resume: the sample at global position p (p = step * global batch + offset)
is ``permutation(seed, epoch)[p % n]`` and its random noise (masking, denoising, split points)
comes from a generator seeded by (seed, p). Data order and noise are therefore functions of
the seed and the step alone, independent of the number of processes; with the optimizer,
schedule and RNG state restored, ``--resume`` continues exactly where an uninterrupted run
would be. (Resume may also change the schedule, RESUME_MAY_CHANGE: a lower lr after a
divergence, more steps for a finished run.)

Safety: rank 0 holds the run directory's lock for the whole run (a second writer gets
E_LOCKED); a NaN/inf loss or gradient stops the run before the update (E_NOT_FINITE) and
non-finite weights are never saved, so ``latest`` always names good weights; every failed write
(disk full, permissions) is one E_DISK error that leaves the previous checkpoint in place.

Distributed: run the same command under ``torchrun``; each process takes its slice of every
global batch, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA),
and only rank 0 evaluates and writes. ``batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from onnxformer.runtime import atomic
from onnxformer.runtime.datafiles import TEXT_LAYOUTS, FieldMap, data_error
from onnxformer.runtime.errors import CheckpointError, ConfigError, DataError, TrainingError

from . import chat_sft
from . import checkpoint as ckpt
from . import data as data_module
from . import token_cache
from .config import PRESETS, ModelConfig
from .data import SHARED_DATASETS, Example, TaskData, load_task_data, shared_data_dir
from .hf_import import HFImport, PackageInfo, dropped_report, is_hf_dir, load_hf, read_hf_config
from .model import Transformer
from .peft import LoRAConfig, apply_bitfit, apply_lora, trainable_parameters
from .tasks import (
    EVAL_STREAM,
    OBJECTIVES,
    ORDER_STREAM,
    TASKS,
    Batch,
    CutReport,
    Encoded,
    EvalSums,
    LossOutput,
    Objective,
    TaskContext,
    TaskDefaults,
    distill_objective,
    example_generator,
    objective_for,
)
from .tokenizer import load_tokenizer, special_token_ids, train_tokenizer

logger = logging.getLogger(__name__)

# ============================================================================================
# Configuration
# ============================================================================================

# Views of the registry, by task name (the CLI, quickstart and benchmarks read them).
TASK_ARCHS: dict[str, tuple[str, ...]] = {name: o.archs for name, o in OBJECTIVES.items()}
TASK_DATA_KINDS: dict[str, tuple[str, ...]] = {name: o.data_kinds for name, o in OBJECTIVES.items()}
TASK_DEFAULTS: dict[str, TaskDefaults] = {name: o.defaults for name, o in OBJECTIVES.items()}


_MAX_LR = 3.4e37  # AdamW's first step size, lr / (1 - 0.9), must fit float32 (torch raises otherwise)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Fields left at None take the task's default (TASK_DEFAULTS)."""

    arch: str  # encoder | decoder | encoder-decoder | prefix-lm
    task: str  # one of TASKS
    data: str  # builtin:NAME, shared:NAME, or a training file (.txt, .jsonl, .tsv)
    out_dir: str  # run directory: checkpoints, metrics.jsonl
    valid_data: str | None = None  # validation file; default: hold out 5% of a training file
    # Which file field is what (runtime/datafiles.py); None: detected from the common schemas.
    text_field: str | None = None
    label_field: str | None = None
    source_field: str | None = None  # several joined by a blank line: "instruction,input"
    target_field: str | None = None
    messages_field: str | None = None  # chat data: a list of {role, content}
    text_layout: str | None = None  # .txt: lines | blank-line-documents; None: detected
    preset: str = "tiny"  # model size, a key of PRESETS (ignored with from_checkpoint)
    vocab_size: int = 1024  # upper bound for the trained tokenizer
    # Longest tokenized row. Language modelling splits longer documents into windows of max_len;
    # other tasks cut a longer example (counted in the log). None: 128, or the model's max_seq_len
    # if that is shorter. A new model's max_seq_len is raised to max_len; a loaded model's is a limit.
    max_len: int | None = None
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
    # Start from these weights (+ tokenizer): a run dir, a checkpoint dir or a local Hugging Face model folder.
    from_checkpoint: str | None = None
    # task distill: the teacher (a run dir, checkpoint or local Hugging Face folder; its tokenizer
    # is the student's), the softmax temperature of the KL term and its weight (the hard-label
    # NLL gets 1 - distill_kl_weight)
    teacher: str | None = None
    distill_temperature: float = 2.0
    distill_kl_weight: float = 0.5
    resume: bool = False  # continue out_dir's latest checkpoint
    # Evaluation, checkpoints, logging
    eval_every: int | None = None  # steps between evaluations on the validation split
    eval_examples: int = 500  # validation examples per periodic evaluation
    final_eval_examples: int | str | None = None  # the final one's, per split: None = eval_examples, or "all"
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
        objective = objective_for(self.task)  # an unknown task is a ConfigError naming the choices
        if self.arch not in objective.archs:
            raise ConfigError(
                f"task {self.task!r} trains arch {' or '.join(map(repr, objective.archs))}; got arch {self.arch!r}"
            )
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        defaults = objective.defaults
        for name in ("steps", "batch_size", "lr"):
            if getattr(self, name) is None:
                set_(name, getattr(defaults, name))
        if self.warmup is None:  # scaled down for short runs
            set_("warmup", min(defaults.warmup, self.steps // 10) if isinstance(self.steps, int) else 0)
        if self.eval_every is None:
            set_("eval_every", min(defaults.eval_every, self.steps) if isinstance(self.steps, int) else 1)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_examples", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        for name in ("warmup", "save_every", "keep_checkpoints", "lora_rank", "seed", "data_seed", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0; got {value!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or isinstance(self.max_len, bool)):
            raise ConfigError(f"max_len must be a positive integer; got {self.max_len!r}")
        if self.max_len is not None and self.max_len < 2:  # a prompt and one token to predict (or a source and a target)
            raise ConfigError(f"max_len (--max-len) must be at least 2, the shortest sequence every task can "
                              f"train on; got {self.max_len}; pass --max-len 128 (the default) or leave it unset")
        final = self.final_eval_examples
        if final not in (None, "all") and (not isinstance(final, int) or isinstance(final, bool) or final <= 0):
            raise ConfigError(f"final_eval_examples (--final-eval-examples) must be a positive integer or 'all'; "
                              f"got {final!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not 0 < self.lr < _MAX_LR:
            raise ConfigError(f"lr must be > 0 and below {_MAX_LR:.3g} (AdamW divides it by 1 - beta1 = 0.1, and "
                              f"that must fit float32); got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"weight_decay ({self.weight_decay}) and grad_clip ({self.grad_clip}) must be >= 0"
            )
        if self.warmup >= self.steps:
            raise ConfigError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
        objective_for(self.task, nsp=self.nsp)  # nsp belongs to one task
        if objective.needs_teacher != (self.teacher is not None):
            teachers = ", ".join(repr(t) for t, o in OBJECTIVES.items() if o.needs_teacher)
            raise ConfigError(f"task {self.task!r} needs a teacher (--teacher CKPT_OR_HF_DIR)" if objective.needs_teacher
                              else f"teacher (--teacher) is for task {teachers}; got task {self.task!r}: drop --teacher")
        if not (isinstance(self.distill_temperature, (int, float)) and 0 < self.distill_temperature < 1e3):
            raise ConfigError(f"distill_temperature (--distill-temperature) must be > 0; got {self.distill_temperature!r}")
        if not (isinstance(self.distill_kl_weight, (int, float)) and 0.0 <= self.distill_kl_weight <= 1.0):
            raise ConfigError(f"distill_kl_weight (--distill-kl-weight) must be in [0, 1]; got {self.distill_kl_weight!r}")
        set_("lora_targets", tuple(self.lora_targets))
        if self.lora_rank and self.bitfit:
            raise ConfigError("choose LoRA (lora_rank > 0) or BitFit, not both")
        if self.lora_rank:
            self.lora_config()  # validates alpha, dropout, targets
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda'; got {self.device!r}")
        if self.text_layout is not None and self.text_layout not in TEXT_LAYOUTS:
            raise ConfigError(f"text_layout (--text-layout) must be one of {', '.join(TEXT_LAYOUTS)}; "
                              f"got {self.text_layout!r}")
        self.field_map()  # fields of one kind of data

    @property
    def objective(self) -> Objective:
        """What this run trains: its task's entry of OBJECTIVES (masked LM + NSP with nsp)."""
        return objective_for(self.task, nsp=self.nsp)

    @property
    def final_eval_limit(self) -> int | None:
        """Examples per split of the final evaluation (None: all)."""
        if self.final_eval_examples == "all":
            return None
        return self.final_eval_examples or self.eval_examples

    def field_map(self) -> FieldMap | None:
        """The file fields named by text_field, label_field, ... (None: all detected)."""
        named = {role: getattr(self, f"{role}_field") for role in ("text", "label", "source", "target", "messages")}
        return FieldMap(**named) if any(named.values()) else None

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
    already_finished: bool = False  # resume of a run that had reached its steps: nothing was trained


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (config.lr - floor)


# ============================================================================================
# Data: a split as token ids (once), sample order and noise as functions of (seed, position)
# ============================================================================================


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's sample order, (n,) int64 (8 bytes a row, however large the split)."""
    return torch.randperm(n, generator=example_generator(seed, epoch, stream=ORDER_STREAM))


def sample_positions(step: int, micro: int, *, config: TrainConfig, rank: int, world_size: int) -> range:
    """Global sample positions of this process's micro-batch: a contiguous slice of the
    step's global batch (grad_accum * world_size * batch_size samples), rank r at slice r."""
    b = config.batch_size
    start = ((step * config.grad_accum + micro) * world_size + rank) * b
    return range(start, start + b)


class TaskDataset:
    """A split of the task as token ids, and the batches the objective builds from it.

    The rows come encoded (``rows``: the token cache's memory-mapped split, modeling/token_cache.py),
    or are encoded here from ``raw`` in memory, again each epoch where the objective redraws its
    examples (mlm+nsp: fresh sentence pairs, seeded). ``report`` says what did not fit max_len.
    ``train_batch(positions)`` builds a Batch from global sample positions; ``eval_batches()``
    walks the split in order with fixed noise.
    """

    def __init__(self, objective: Objective, context: TaskContext, raw: Sequence[Example] | None = None, *,
                 rows: Sequence[Encoded] | None = None, report: CutReport | None = None):
        if (raw is None) == (rows is None):
            raise ValueError("pass raw examples or encoded rows")
        self.objective, self.context = objective, context
        raw = raw if raw is None or isinstance(raw, Sequence) else list(raw)
        self.raw = raw if raw is not None and objective.redraws_each_epoch else None
        if rows is None:
            encoding = objective.encode(context, raw, 0)
            rows, report = encoding.examples, encoding.report
        self._epoch, self._examples, self.report = 0, rows, report or CutReport()
        self._len = len(self._examples)  # the same every epoch (NSP: a pair per sentence with a successor)

    def __len__(self) -> int:
        return self._len

    def examples(self, epoch: int) -> Sequence[Encoded]:
        if self.raw is not None and epoch != self._epoch:
            self._epoch, self._examples = epoch, self.objective.encode(self.context, self.raw, epoch).examples
        return self._examples

    def train_batch(self, positions: Sequence[int]) -> Batch:
        """The batch at global sample positions (train: shuffled order, fresh noise per position)."""
        n, seed = len(self), self.context.seed
        chosen = []
        for p in positions:
            epoch = p // n
            index = int(_epoch_order(n, seed, epoch)[p % n])
            chosen.append((self.examples(epoch)[index], example_generator(seed, p)))
        return self.objective.collate(self.context, chosen)

    def eval_batches(self, limit: int | None = None, batch_size: int = 128):
        """Fixed batches over the first `limit` examples, with fixed noise (the eval stream)."""
        examples = self.examples(0)[: limit or None]
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            items = [(e, example_generator(self.context.seed, start + i, stream=EVAL_STREAM)) for i, e in enumerate(chunk)]
            yield chunk, self.objective.collate(self.context, items)


# ============================================================================================
# The task model: model + objective in one forward, the unit DDP wraps
# ============================================================================================


class TaskModel(nn.Module):
    """forward(batch) -> LossOutput: the objective's loss of the model on the batch."""

    def __init__(self, model: Transformer, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch) -> LossOutput:
        return self.objective.loss(self.model, batch)


# ============================================================================================
# Evaluation
# ============================================================================================


@torch.no_grad()
def evaluate(
    task_model: TaskModel, dataset: TaskDataset, *, device: torch.device, limit: int | None = None,
    generate_outputs: bool = True, autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Loss (token-weighted) and the objective's metrics (perplexity, accuracy, NSP), plus
    what generation scores (exact match) unless generate_outputs is False. Keys are unprefixed."""
    was_training = task_model.training
    task_model.eval()
    sums = EvalSums()
    for _, batch in dataset.eval_batches(limit):
        with autocast():
            sums.add(task_model(batch.to(device)), rows=len(batch.input_ids))
    metrics: dict[str, float] = {"loss": sums.mean_loss, "examples": float(sums.rows), **dataset.objective.metrics(sums)}
    generation_metrics = dataset.objective.generation_metrics
    if generate_outputs and generation_metrics is not None:
        metrics.update(generation_metrics(task_model.model, dataset.context, dataset.examples(0)[: limit or None]))
    task_model.train(was_training)
    return metrics


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
        raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto")
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


DEFAULT_MAX_LEN = 128  # TrainConfig.max_len None: this, or a loaded model's max_seq_len if shorter


def run_max_len(config: TrainConfig, model_config: ModelConfig, source: Path | None = None) -> int:
    """The rows' length limit of a run on a model of `model_config`: max_len (None: DEFAULT_MAX_LEN,
    or the model's max_seq_len if shorter). A max_len beyond the model's context is refused: a
    new model is built with that context (build_model_config), a loaded one cannot change it."""
    limit = model_config.max_seq_len
    if config.max_len is None:
        return min(DEFAULT_MAX_LEN, limit)
    if config.max_len > limit:
        where = f"the model of {source}" if source is not None else "the model"
        raise ConfigError(
            f"max_len (--max-len) {config.max_len} is longer than the context of {where}: max_seq_len {limit}. A "
            f"loaded model's context is fixed by its weights and config; pass --max-len {limit} or less (or leave "
            f"it unset), or train a new model (without --from-checkpoint) with --max-len {config.max_len}"
        )
    return config.max_len


def build_model_config(config: TrainConfig, tokenizer, data: TaskData) -> ModelConfig:
    """A new model: the preset's size, the tokenizer's vocabulary and special ids, the task's
    head; its max_seq_len raised to max_len when that is longer than the preset's."""
    s = special_token_ids(tokenizer)
    preset = dict(PRESETS[config.preset])
    if config.max_len is not None and config.max_len > preset["max_seq_len"]:
        logger.info("model context: max_seq_len %d for --max-len %d (preset %s: %d)", config.max_len,
                    config.max_len, config.preset, preset["max_seq_len"])
        preset["max_seq_len"] = config.max_len
    return ModelConfig(
        arch=config.arch,
        vocab_size=tokenizer.get_vocab_size(),
        **preset,
        type_vocab_size=2 if config.nsp else 0,
        dropout=config.dropout,
        pad_token_id=s["pad"],
        bos_token_id=s["bos"],
        eos_token_id=s["eos"],
        decoder_start_token_id=s["bos"] if config.arch == "encoder-decoder" else -1,
        **config.objective.head_config(data),
    )


def _fine_tune_config(source: ModelConfig, config: TrainConfig, data: TaskData) -> ModelConfig:
    _check_arch(source.arch, config)
    return source.replace(**config.objective.head_config(data), dropout=config.dropout)


def _check_arch(arch: str, config: TrainConfig) -> None:
    if arch != config.arch:
        raise ConfigError(
            f"from_checkpoint holds a {arch!r} model but arch is {config.arch!r}; pass --arch {arch}"
        )


def import_hf(config: TrainConfig, data: TaskData, directory: Path) -> HFImport:
    """A local Hugging Face model folder (from_checkpoint) imported for this run: the task's head
    settings and the run's dropout applied, a fresh head (objective.fresh_head) left at its
    initialisation, the checkpoint's own head tensors dropped."""
    _, _, converted = read_hf_config(directory)  # cheap: config.json only, before any tensor is read
    _check_arch(converted.arch, config)
    run_max_len(config, converted, directory)
    imported = load_hf(directory, overrides={**config.objective.head_config(data), "dropout": config.dropout},
                       fresh=config.objective.fresh_head)
    for line in dropped_report(imported.dropped):
        logger.info("%s: %s", directory, line)
    return imported


def _is_import(source: Path | None, resume: ckpt.TrainingState | None) -> bool:
    """Does the run start from a Hugging Face folder (a resumed run starts from its own checkpoint)?"""
    return resume is None and source is not None and is_hf_dir(source)


def build_model(
    config: TrainConfig, data: TaskData, tokenizer, *, source: Path | None, resume: ckpt.TrainingState | None,
    imported: HFImport | None = None,
) -> Transformer:
    """A new model, or one loaded from `source` (from_checkpoint: one of our checkpoints or a
    local Hugging Face folder, or the checkpoint being resumed), with LoRA or BitFit applied.
    Fine-tuning a classifier adds a fresh head. `imported`: the import of a Hugging Face
    `source` when the caller has made it already (import_hf); else it is made here."""
    objective = config.objective
    if _is_import(source, resume):
        model = (imported or import_hf(config, data, source)).model.train()
    else:
        if resume is not None:
            model_config = ModelConfig.load(resume.folder / ckpt.CONFIG_FILE)
        elif source is not None:
            model_config = _fine_tune_config(ModelConfig.load(source / ckpt.CONFIG_FILE), config, data)
            run_max_len(config, model_config, source)
        else:
            model_config = build_model_config(config, tokenizer, data)
        model = Transformer(model_config)
        if source is not None:
            tensors = ckpt.load_file(str(source / ckpt.MODEL_FILE))
            fresh_head = objective.fresh_head if resume is None else ()
            tensors = {k: v for k, v in tensors.items() if not k.startswith(fresh_head)} if fresh_head else tensors
            ckpt.load_plain_state_dict(model, tensors, source=str(source / ckpt.MODEL_FILE), allow_missing=fresh_head)
    if config.lora_rank:
        apply_lora(model, config.lora_config(), trainable=objective.heads)
    elif config.bitfit:
        if source is not None and not any(n.rsplit(".", 1)[-1] == "bias" for n, _ in model.named_parameters()):
            raise ConfigError(f"BitFit trains the bias vectors, and the model of {source} has none; fine-tune it "
                              "with LoRA (--lora-rank 8) or in full (drop --bitfit)")
        apply_bitfit(model, trainable=objective.heads)
    if resume is not None and config.lora_rank:  # the exact unmerged weights, not the merged export
        unmerged = {k[len("model/"):]: v for k, v in resume.tensors.items() if k.startswith("model/")}
        model.load_state_dict(unmerged, strict=False)
    return model


def task_special_ids(tokenizer: Tokenizer, package: PackageInfo | None) -> dict[str, int]:
    """The special token ids batches are built with: our tokenizers' by name
    (tokenizer.special_token_ids); an imported model's as its import read them (package.json),
    since a Hugging Face tokenizer names them its own way. A model without a pad token (most
    decoders) is padded with its eos id (else 0): padded positions are masked out of attention
    and loss, so the id never matters; the package keeps the model's own (none)."""
    if package is None or not package.special_tokens:
        return special_token_ids(tokenizer)
    ids = {role: int(value) for role, value in package.special_tokens.items()}
    if ids.get("pad", -1) < 0:
        ids["pad"] = ids["eos"] if ids.get("eos", -1) >= 0 else 0
        logger.info("the model has no pad token: training pads batches with id %d (%s); padded positions are masked",
                    ids["pad"], "its eos" if ids.get("eos", -1) >= 0 else "no eos either")
    return ids


def _check_special_ids(ids: dict[str, int], model_config: ModelConfig, source: Path | None) -> None:
    """Generative tasks end every target with eos (and generation stops at it): a model with a
    decoder must have one."""
    if model_config.has_decoder and ids.get("eos", -1) < 0:
        raise ConfigError(f"the model of {source} has no eos token, which every task on a decoder ends its examples "
                          "with: set eos_token_id in its config.json (or eos_token in tokenizer_config.json)")


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _write_error(run_dir: Path, err: OSError) -> CheckpointError:
    """A write into the run directory failed (disk full, permissions, a file in the way)."""
    where = f" ({err.filename})" if err.filename else ""
    return CheckpointError(f"cannot write to the run directory {run_dir}: {err.strerror or err}{where}; "
                           "free disk space or pass a writable --out", code="E_DISK")


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line; a failed write (disk full) is cut back off, so the file keeps whole lines."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write can be undone here
            end = f.seek(0, os.SEEK_END)
            try:
                rest = memoryview(line)
                while rest:
                    rest = rest[f.write(rest):]  # a short write, then the error
            except OSError:
                f.truncate(end)  # needs no space
                raise
    except OSError as err:
        raise _write_error(path.parent, err) from err


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a full disk or a kill
            logger.warning("%s: dropping a damaged line %r", path, line[:80])
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    try:
        atomic.replace_text(path, "".join(line + "\n" for line in kept))
    except OSError as err:
        raise _write_error(path.parent, err) from err


METRICS_FILE = "metrics.jsonl"
# What --resume may change. The data order and noise (batch size, seeds, data), the model and
# the optimizer's parameters must stay; the schedule may change (a lower lr after divergence,
# more steps for a finished run: the cosine then ends at the new step count), and so may
# logging, evaluation and checkpointing. A moved run dir still resumes.
RESUME_MAY_CHANGE = (
    "resume", "progress", "threads", "device", "out_dir", "steps", "lr", "min_lr_ratio", "warmup", "grad_clip",
    "eval_every", "eval_examples", "save_every", "keep_checkpoints", "log_every",
)


def _resume_state(config: TrainConfig, env: Distributed) -> ckpt.TrainingState | None:
    """The checkpoint to resume (resume=True), after checking the run's settings match."""
    run_dir = Path(config.out_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if not config.resume:
        if latest is not None:
            raise CheckpointError(
                f"{run_dir} already holds a run (its {ckpt.LATEST!r} is {latest.name}); pass resume=True "
                "(--resume) to continue it, or choose another out_dir"
            )
        return None
    if latest is None:
        raise CheckpointError(f"resume: {run_dir} has no checkpoint yet; drop --resume to start a new run")
    state = ckpt.load_training_state(latest)
    saved, now = state.trainer_state["train_config"], config.to_dict()
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_MAY_CHANGE[5:] if saved.get(k) != now[k]]
    if changed and env.is_main:
        logger.warning("resume: continuing with changed settings: %s", ", ".join(changed))
    diff = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if diff:
        raise ConfigError(
            "resume: the run was started with different settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in diff)
            + "; resume with the original settings or start a new out_dir"
        )
    if state.trainer_state["world_size"] != env.world_size:
        raise ConfigError(
            f"resume: the run used {state.trainer_state['world_size']} processes, this launch has "
            f"{env.world_size}; the data order depends on it, so launch with the same number"
        )
    return state


def _load_data(config: TrainConfig, objective: Objective) -> TaskData:
    # A large training file streams (data.stream_task_data): its splits are read as they are tokenized.
    large = os.path.isfile(config.data) and os.path.getsize(config.data) >= data_module.STREAM_BYTES
    load = data_module.stream_task_data if large else load_task_data
    try:
        data = load(config.data, kinds=objective.data_kinds, fields=config.field_map(),
                    text_layout=config.text_layout, valid=config.valid_data, seed=config.data_seed)
    except DataError as exc:  # fields that fit another task's data: name the tasks that read it
        if not getattr(exc, "fits", ()):
            raise
        kind, mapping = exc.fits[0].kind, exc.fits[0]
        readers = [f"{o.name} (--task {o.name} --arch {o.archs[0]})" for o in OBJECTIVES.values() if kind in o.data_kinds]
        what = "plain text" if str(exc.path).lower().endswith(".txt") else f"fields {mapping.describe()}"
        raise data_error(
            f"task {config.task!r} needs {' or '.join(objective.data_kinds)} data, but the file holds {kind} data "
            f"({what}); "
            + (f"tasks that train on {kind} data: {', '.join(readers)}" if readers else
               f"no task trains on {kind} data yet"), exc.path, exc.line) from None
    if data.kind not in objective.data_kinds:
        raise DataError(
            f"task {config.task!r} needs {' or '.join(objective.data_kinds)} data; "
            f"{config.data} holds {data.kind} data"
        )
    if config.nsp and data.kind != "text":
        raise DataError(f"nsp needs documents of several sentences (text data); {config.data} holds {data.kind} data")
    return data


def _tokenizer(config: TrainConfig, objective: Objective, data: TaskData, source: Path | None, env: Distributed) -> Tokenizer:
    """The source checkpoint's tokenizer, or a new one trained by rank 0 on the training split."""
    if source is not None:
        return load_tokenizer(source / ckpt.TOKENIZER_FILE)
    text = None
    if env.is_main:
        streamed = data.train if isinstance(data.train, data_module.StreamedSplit) else None
        size = streamed.file.path.stat().st_size if streamed is not None else 0
        texts = _tokenizer_sample(objective.tokenizer_texts(data), size=size)
        text = train_tokenizer(texts, arch=config.arch, vocab_size=config.vocab_size,
                               extra_special_tokens=chat_sft.new_tokenizer_special_tokens(data)).to_str()
    return Tokenizer.from_str(_broadcast_text(text, env))


TOKENIZER_SAMPLE_CHARS = 50_000_000  # a new tokenizer learns from at most this many characters of text


def _tokenizer_sample(texts: Iterable[str], limit: int = TOKENIZER_SAMPLE_CHARS, *, size: int = 0) -> Iterator[str]:
    """The texts a new tokenizer trains on, streamed, up to `limit` characters: all of them, or
    (a training file of `size` bytes larger than that) every k-th text, spread over the file
    (a file sorted by label or topic would otherwise give only its first part). Logged when cut."""
    every = -(-size // limit) if size > limit else 1
    total = count = 0
    for position, text in enumerate(texts):
        if position % every:
            continue
        if total >= limit:
            break
        total, count = total + len(text), count + 1
        yield text
    else:
        if every == 1:
            return
    logger.info("tokenizer: trained on %s texts (%s characters), %s of the training split: a sample is enough "
                "for the vocabulary", f"{count:,}", f"{total:,}",
                f"1 text in {every}" if every > 1 else "the first ones")


CACHE_DIR = "cache"  # RUN/cache/KEY: the token cache (modeling/token_cache.py)
# TrainConfig fields the encoded rows do not depend on; every other field (a new one too) is
# part of the token cache's key. vocab_size and from_checkpoint count through the tokenizer's
# hash, preset through max_len, seed only in what collate draws.
_NOT_IN_CACHE_KEY = frozenset(RESUME_MAY_CHANGE) | {
    "preset", "vocab_size", "dropout", "batch_size", "grad_accum", "weight_decay", "bf16", "seed", "lora_rank",
    "lora_alpha", "lora_dropout", "lora_targets", "bitfit", "from_checkpoint", "final_eval_examples",
}


def _data_files(fields: dict[str, Any]) -> list[Path]:
    """The files a run's rows come from: every setting naming an existing file, and the files
    of a shared:NAME dataset."""
    files = []
    for value in fields.values():
        if not isinstance(value, str):
            continue
        if value.startswith("shared:") and value.removeprefix("shared:") in SHARED_DATASETS:
            shared = SHARED_DATASETS[value.removeprefix("shared:")]
            names = (shared.train, shared.valid, shared.test, shared.labels)
            files += [shared_data_dir() / n for n in names if n and (shared_data_dir() / n).is_file()]
        elif os.path.isfile(value):
            files.append(Path(value))
    return files


def _cached_rows(
    config: TrainConfig, env: Distributed, objective: Objective, context: TaskContext, splits: dict[str, Any],
) -> dict[str, tuple[token_cache.CachedSplit, CutReport]]:
    """The splits' rows from the run's token cache, built by rank 0 if it is not there yet."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_CACHE_KEY}
    inputs = {
        "config": fields, "objective": objective.name, "max_len": context.max_len,
        "tokenizer": hashlib.sha256(context.tokenizer.to_str().encode("utf-8")).hexdigest(),
        "special": context.special, "labels": list(context.label_names),
        "files": [token_cache.file_fingerprint(p) for p in _data_files(fields)],
        **({"chat_template": context.chat.template} if context.chat is not None else {}),
    }
    root, key = Path(config.out_dir) / CACHE_DIR, token_cache.cache_key(inputs)
    result = None
    if env.is_main:
        try:
            result = token_cache.open_or_build(root, key, splits, lambda batch: objective.encode(context, batch, 0), inputs)
        except OSError as err:
            raise _write_error(root, err) from err
    if env.world_size > 1:
        dist.barrier()  # rank 0 has built it
        if not env.is_main:
            result = token_cache.load(root / key)
    return result


def _datasets(
    config: TrainConfig, env: Distributed, objective: Objective, context: TaskContext, data: TaskData,
) -> tuple[TaskDataset | None, TaskDataset | None, TaskDataset | None]:
    """Train, valid and test as token rows (None: no such split): memory-mapped from the token
    cache, or encoded in memory where the objective redraws its rows each epoch (mlm+nsp).
    What did not fit max_len is logged per split; a split left without rows is an error."""
    splits = {name: getattr(data, name) for name in ("train", "valid", "test") if getattr(data, name)}
    if objective.redraws_each_epoch:
        sets = {name: TaskDataset(objective, context, raw) for name, raw in splits.items()}
    else:
        sets = {name: TaskDataset(objective, context, rows=rows, report=report)
                for name, (rows, report) in _cached_rows(config, env, objective, context, splits).items()}
    limit = context.model_config.max_seq_len if config.from_checkpoint is not None else None  # a loaded model's context
    for name, dataset in sets.items():
        level, message = dataset.report.describe(f"{config.task} {name}", context.max_len, limit=limit)
        if env.is_main:
            logger.log(level, message)
        if len(dataset) == 0:
            raise DataError(f"no {name} example fits max_len (--max-len) {context.max_len}: {message}")
    return sets.get("train"), sets.get("valid"), sets.get("test")


@dataclass(frozen=True)
class _Run:
    """What one training run works with, built once by `_build_run`."""

    config: TrainConfig
    env: Distributed
    objective: Objective
    resume: ckpt.TrainingState | None  # the checkpoint being resumed
    start_step: int  # 0, or the resumed checkpoint's step
    tokenizer: Tokenizer
    model: Transformer
    task_model: TaskModel  # model + objective (evaluation calls it; DDP wraps it for training)
    trainable: dict[str, nn.Parameter]
    names: list[str]  # trainable parameter names in the optimizer's order
    counts: dict[str, int]  # parameters: total (incl. LoRA adapters) and trainable
    optimizer: torch.optim.Optimizer
    train_set: TaskDataset
    valid_set: TaskDataset | None
    test_set: TaskDataset | None
    autocast: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast, or a no-op
    package: PackageInfo | None = None  # an imported model's (chat template, eos ids, ...): saved as package.json

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / METRICS_FILE


def _source(config: TrainConfig, resume: ckpt.TrainingState | None) -> Path | None:
    """The folder the run's weights come from: the checkpoint being resumed, from_checkpoint (a
    local Hugging Face folder, one of our checkpoints, or a run directory's latest), or None."""
    if resume is not None:
        return resume.folder
    if config.from_checkpoint is None:
        return None
    if is_hf_dir(config.from_checkpoint):
        return Path(config.from_checkpoint)
    return ckpt.resolve_checkpoint(config.from_checkpoint)


def _teacher(config: TrainConfig) -> tuple[Transformer, Tokenizer, PackageInfo | None]:
    """task distill: the teacher model (eval mode), its tokenizer and what its package needs."""
    path = Path(config.teacher)
    if is_hf_dir(path):
        imported = load_hf(path)
        return imported.model.eval(), load_tokenizer(imported.tokenizer_file), imported.package
    folder = ckpt.resolve_checkpoint(path)
    model, _ = ckpt.load_model(folder)
    return model, load_tokenizer(folder / ckpt.TOKENIZER_FILE), ckpt.read_package(folder)


def _build_run(config: TrainConfig, env: Distributed, resume: ckpt.TrainingState | None) -> _Run:
    """Data, tokenizer, model, datasets and optimizer; a resumed run's optimizer and RNG state."""
    objective = config.objective
    data = _load_data(config, objective)
    source = _source(config, resume)
    teacher = None
    if objective.needs_teacher:  # the student reads the teacher's tokens
        teacher, teacher_tokenizer, teacher_package = _teacher(config)
        if teacher.config.arch != config.arch:
            raise ConfigError(f"the teacher {config.teacher} is a {teacher.config.arch!r} model; distill a student "
                              f"of the same arch: pass --arch {teacher.config.arch}")
        objective = distill_objective(teacher.to(env.device), temperature=float(config.distill_temperature),
                                      kl_weight=float(config.distill_kl_weight))
    if _is_import(source, resume):  # a Hugging Face folder: its tokenizer and what its package needs
        imported = import_hf(config, data, source)
        tokenizer, package = load_tokenizer(imported.tokenizer_file), imported.package
    elif teacher is not None and source is None:  # a new student: the teacher's tokenizer
        imported, tokenizer, package = None, teacher_tokenizer, teacher_package
    else:  # our checkpoint (package.json: one fine-tuned from an import), or a new model
        imported, package = None, ckpt.read_package(source) if source is not None else None
        tokenizer = _tokenizer(config, objective, data, source, env)
    model = build_model(config, data, tokenizer, source=source, resume=resume, imported=imported).to(env.device)
    if teacher is not None and source is None:  # a new student prompts as its teacher (the format is metadata)
        model.config = model.config.replace(prompt_format=teacher.config.prompt_format)
    trainable = trainable_parameters(model)
    counts = {"total": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable.values())}
    logger.info("model: %s, %d parameters (%d trainable)", model.config.arch, counts["total"], counts["trainable"])

    special = task_special_ids(tokenizer, package)
    _check_special_ids(special, model.config, source)
    chat = None
    if data.kind == "chat":  # the template conversations train in, saved in package.json for export (chat_sft.py)
        package = chat_sft.chat_package(tokenizer, package)
        chat = chat_sft.ChatFormat.of(tokenizer, package)
    context = TaskContext(
        tokenizer, special, model.config, max_len=run_max_len(config, model.config, source),
        label_names=data.label_names, seed=config.seed, chat=chat,
    )
    train_set, valid_set, test_set = _datasets(config, env, objective, context, data)
    names = _ordered_names(trainable)
    optimizer = torch.optim.AdamW(_decay_groups(trainable, config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    start_step = 0
    if resume is not None:
        ckpt.load_optimizer_state(optimizer, names, resume.tensors, resume.trainer_state["optimizer"])
        ckpt.set_rng_state(resume.tensors, resume.trainer_state["rng"])
        start_step = int(resume.trainer_state["step"])
        logger.info("resuming %s at step %d", resume.folder, start_step)
    autocast = functools.partial(torch.autocast, device_type=env.device.type, dtype=torch.bfloat16, enabled=config.bf16)
    return _Run(
        config, env, objective, resume, start_step, tokenizer, model, TaskModel(model, objective), trainable, names,
        counts, optimizer, train_set, valid_set, test_set, autocast, package,
    )


def _trainer_state(run: _Run, step: int, optimizer_meta, rng, metrics) -> dict[str, Any]:
    config, env = run.config, run.env
    return {
        "step": step,
        "train_config": config.to_dict(),
        "world_size": env.world_size,
        "parameters": run.counts,  # total (incl. LoRA adapters) and trainable
        "optimizer": optimizer_meta,
        "scheduler": {"kind": "linear-warmup-cosine", "step": step, "lr": learning_rate(min(step, config.steps - 1), config)},
        "data": {
            "samples_seen": step * config.grad_accum * env.world_size * config.batch_size,
            "order": "epoch permutation seeded by (seed, epoch); noise seeded by (seed, sample position)",
        },
        "rng": rng,
        "metrics": metrics,
    }


def _write_checkpoint(run: _Run, step: int, metrics: dict[str, float]) -> Path:
    """Rank 0: the model, tokenizer, optimizer and RNG state at `step` (checkpoint.py: atomic)."""
    opt_tensors, opt_meta = ckpt.optimizer_state(run.optimizer, run.names)
    rng_tensors, rng_scalars = ckpt.rng_state()
    training_tensors = {**opt_tensors, **rng_tensors}
    if run.config.lora_rank:  # the exact unmerged weights, for resume
        training_tensors.update({f"model/{k}": v for k, v in _dedupe(run.model.state_dict()).items()})
    weights = ckpt.plain_state_dict(run.model)
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # never written: `latest` keeps naming the last good checkpoint
        raise TrainingError(
            f"the weights are not finite (NaN or infinite) after step {step}, in {len(bad)} tensors "
            f"({', '.join(bad[:3])}); they were not saved. {_divergence_advice(run)}", code="E_NOT_FINITE",
        )
    files = ckpt.CheckpointFiles(
        run.model.config, weights, run.tokenizer.to_str(),
        _trainer_state(run, step, opt_meta, rng_scalars, metrics), training_tensors, run.package,
    )
    try:
        return ckpt.save_checkpoint(run.run_dir, step, files, keep=run.config.keep_checkpoints)
    except OSError as err:
        raise _write_error(run.run_dir, err) from err


# ============================================================================================
# train(): setup, the step loop, evaluation, save
# ============================================================================================


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume, or fine-tune) one model; returns the final metrics and checkpoint."""
    started = time.perf_counter()
    env = setup_distributed(config)
    threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        with _run_lock(config, env):
            return _train(config, env, started)
    finally:
        torch.set_num_threads(threads)  # process-wide: give the caller its setting back
        if env.initialized_here:
            dist.destroy_process_group()


@contextlib.contextmanager
def _run_lock(config: TrainConfig, env: Distributed):
    """Rank 0 holds the run directory's lock for the whole run (created here if new: removed
    again if the run stops before writing anything into it). Under torchrun every process
    learns whether rank 0 got it, so none waits for a rank 0 that gave up."""
    stack, refused = contextlib.ExitStack(), None
    if env.is_main:
        try:
            _lock_run_dir(Path(config.out_dir), stack)
        except CheckpointError as err:
            refused = err
    if env.world_size > 1:
        device = env.device if env.device.type == "cuda" else torch.device("cpu")
        flag = torch.tensor([int(refused is not None)], device=device)
        dist.broadcast(flag, 0)
        if int(flag) and refused is None:
            refused = CheckpointError(f"rank 0 could not lock the run directory {config.out_dir} (its error says "
                                      "why); wait for the run holding it to finish, or pass another --out",
                                      code="E_LOCKED")
    if refused is not None:
        raise refused
    with stack:
        yield


def _lock_run_dir(run_dir: Path, stack: contextlib.ExitStack) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"out_dir (--out) {run_dir} is a file, not a directory; pass a new directory "
                              "or the directory of a run to --out", code="E_DISK")
    if not run_dir.exists():  # runs last, once the lock (and its file) is gone
        stack.callback(_remove_if_empty, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(atomic.lock_dir(run_dir))
    except atomic.FolderLocked as err:
        stack.close()
        raise CheckpointError(
            f"{run_dir} is in use by another training run (process {err.holder}); wait for it to finish, "
            "or pass another --out", code="E_LOCKED",
        ) from None
    except OSError as err:
        stack.close()
        raise _write_error(run_dir, err) from err


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: the run wrote something there
        folder.rmdir()


def _train(config: TrainConfig, env: Distributed, started: float) -> TrainResult:
    resume = _resume_state(config, env)
    torch.manual_seed(config.seed)  # model init; a resumed run then restores its saved RNG state
    run = _build_run(config, env, resume)
    if resume is not None and run.start_step >= config.steps:
        logger.info("the run already finished (step %d of %d)", run.start_step, config.steps)
        return TrainResult(run.run_dir, resume.folder, run.start_step, resume.trainer_state["metrics"],
                           float("nan"), float("nan"), time.perf_counter() - started, already_finished=True)
    trained = _distributed(run)
    _start_metrics(run)
    first_loss, last_loss = _step_loop(run, trained)
    final = _final_evaluation(run)
    checkpoint = _save(run, config.steps, final)
    return TrainResult(
        run_dir=run.run_dir, checkpoint=checkpoint, step=config.steps, metrics=final,
        first_loss=first_loss, last_loss=last_loss, wall_time_s=time.perf_counter() - started,
    )


def _distributed(run: _Run) -> nn.Module:
    """What the step loop calls: the task model, wrapped in DDP under torchrun."""
    if run.env.world_size == 1:
        return run.task_model
    device = run.env.device
    return nn.parallel.DistributedDataParallel(
        run.task_model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=run.config.arch == "encoder",  # heads the task does not use (nsp, pooler, mlm)
    )


def _start_metrics(run: _Run) -> None:
    """Rank 0: metrics.jsonl keeps a resumed run's lines up to its checkpoint; a new run
    starts it afresh with the untrained model's validation loss at step 0."""
    if not run.env.is_main:
        return
    if run.resume is not None:
        _truncate_metrics(run.metrics_file, run.start_step)  # lines written after that checkpoint
        return
    run.metrics_file.unlink(missing_ok=True)  # left by a run that died before its first checkpoint
    if run.valid_set is not None:
        first = evaluate(run.task_model, run.valid_set, device=run.env.device, limit=run.config.eval_examples,
                         generate_outputs=False, autocast=run.autocast)
        _append_metrics(run.metrics_file, {"step": 0, "split": "valid", **first})


def _step_loop(run: _Run, trained: nn.Module) -> tuple[float, float]:
    """Optimizer steps from start_step to config.steps, with train-loss lines, periodic
    evaluation and checkpoints. Returns the first and the last step's training loss."""
    config, env = run.config, run.env
    bar = tqdm(range(run.start_step, config.steps), initial=run.start_step, total=config.steps,
               disable=not (env.is_main and config.progress), desc=config.task, dynamic_ncols=True)
    first_loss = last_loss = float("nan")
    last_metrics: dict[str, float] = {}
    tick, tokens = time.perf_counter(), 0
    run.task_model.train()
    for step in bar:
        lr = learning_rate(step, config)
        last_loss, step_tokens = _optimizer_step(run, trained, step, lr)
        first_loss = last_loss if step == run.start_step else first_loss
        tokens += step_tokens
        done = step + 1
        if env.is_main and (done % config.log_every == 0 or done == config.steps):
            rate = tokens * env.world_size / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{rate:,.0f}")
            _append_metrics(run.metrics_file, {"step": done, "split": "train", "loss": last_loss, "lr": lr, "tokens_per_s": rate})
            tick, tokens = time.perf_counter(), 0
        # Periodic evaluation and checkpoints; the last step's follow the loop (_final_evaluation).
        if done < config.steps and done % config.eval_every == 0 and env.is_main and run.valid_set is not None:
            last_metrics = _validate(run, done)
        if done < config.steps and config.save_every and done % config.save_every == 0:
            _save(run, done, last_metrics)
    bar.close()
    return first_loss, last_loss


def _validate(run: _Run, step: int) -> dict[str, float]:
    """Rank 0: the first eval_examples of the validation split, logged at `step`."""
    metrics = evaluate(run.task_model, run.valid_set, device=run.env.device, limit=run.config.eval_examples,
                       autocast=run.autocast)
    _append_metrics(run.metrics_file, {"step": step, "split": "valid", **metrics})
    logger.info("step %d valid %s", step, _format(metrics))
    return metrics


def _optimizer_step(run: _Run, trained: nn.Module, step: int, lr: float) -> tuple[float, int]:
    """One optimizer step over grad_accum micro-batches; returns its loss (the mean over
    processes) and the tokens this process read."""
    config, env = run.config, run.env
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss, tokens = 0.0, 0
    for micro in range(config.grad_accum):
        positions = sample_positions(step, micro, config=config, rank=env.rank, world_size=env.world_size)
        batch = run.train_set.train_batch(positions).to(env.device)
        tokens += batch.num_tokens()
        sync = env.world_size == 1 or micro == config.grad_accum - 1  # all-reduce on the last micro-step
        with (contextlib.nullcontext() if sync else trained.no_sync()), run.autocast():
            out = trained(batch)
        (out.loss / config.grad_accum).backward()
        loss += out.loss.item() / config.grad_accum
    if env.world_size > 1:
        reduced = torch.tensor([loss], device=env.device)
        dist.all_reduce(reduced)
        loss = float(reduced) / env.world_size
    params = list(run.trainable.values())
    # The global gradient norm (gradients are all-reduced: the same on every process), clipped if asked.
    norm = float(nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip > 0
                 else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if not (math.isfinite(loss) and math.isfinite(norm)):  # checked before the update: the weights stay good
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4g})"
        raise TrainingError(
            f"the training {what} at step {step + 1} (lr {lr:.3g}): training diverged and stopped before "
            f"applying that step. {_divergence_advice(run)}", code="E_NOT_FINITE",
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, tokens


def _divergence_advice(run: _Run) -> str:
    """What to change after a NaN/inf: a lower peak lr, from the last good checkpoint if any."""
    config = run.config
    default = config.objective.defaults.lr
    lower = config.lr / 10 if config.lr <= default else default
    clip = "" if config.grad_clip else " and --grad-clip 1"
    try:
        latest = ckpt.latest_checkpoint(run.run_dir)
    except CheckpointError:
        latest = None
    if latest is None:
        return f"No checkpoint was written; start again with a lower --lr (peak now {config.lr:g}), e.g. --lr {lower:g}{clip}"
    return (f"The last good checkpoint, {latest}, is intact; continue from it with a lower --lr (peak now "
            f"{config.lr:g}): --resume --lr {lower:g}{clip}")


def _final_evaluation(run: _Run) -> dict[str, float]:
    """Rank 0: the validation and test splits, as "valid/loss", "test/...", each bounded like
    the periodic evaluations (final_eval_examples: None = eval_examples, "all": every example);
    {} on the other processes."""
    final: dict[str, float] = {}
    if not run.env.is_main:
        return final
    for name, dataset in (("valid", run.valid_set), ("test", run.test_set)):
        if dataset is not None:
            limit = run.config.final_eval_limit
            if limit is not None and len(dataset) > limit:
                logger.info("final evaluation: the first %s of %s %s rows (--final-eval-examples all for every one)",
                            f"{limit:,}", f"{len(dataset):,}", name)
            result = evaluate(run.task_model, dataset, device=run.env.device, limit=limit, autocast=run.autocast)
            _append_metrics(run.metrics_file, {"step": run.config.steps, "split": name, **result})
            final.update({f"{name}/{k}": v for k, v in result.items()})
    logger.info("final %s", _format(final))
    return final


def _save(run: _Run, step: int, metrics: dict[str, float]) -> Path:
    """Rank 0 writes the checkpoint of `step`; every process waits for it. Returns its folder."""
    folder = run.run_dir / ckpt.checkpoint_name(step)
    if run.env.is_main:
        folder = _write_checkpoint(run, step, metrics)
    if run.env.world_size > 1:
        dist.barrier()
    return folder


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


__all__ = [
    "OBJECTIVES", "TASKS", "TASK_ARCHS", "TASK_DATA_KINDS", "TASK_DEFAULTS", "Batch", "Encoded", "LossOutput",
    "TaskDataset", "TaskDefaults", "TaskModel", "TrainConfig", "TrainResult", "build_model", "evaluate",
    "import_hf", "learning_rate", "sample_positions", "task_special_ids", "train",
]
