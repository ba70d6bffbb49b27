"""Token generation in numpy, driven by a step model. No torch, no onnxruntime here.

The runtime's ONNX decoder implements :class:`StepModel`; tests use a tiny numpy model.

Shape letters:

    B   prompts
    K   beams per prompt (beam search)
    N   rows run through the model: B, B * num_return_sequences (sample) or B * K (beam)
    T   tokens fed in one step (the padded prompt length on the first step, then 1)
    P   tokens already in the cache
    V   vocabulary size

Batching: prompts of different lengths are left-padded with ``pad_token_id``;
``attention_mask`` is 0 on the pads and ``position_ids = clip(cumsum(mask) - 1, 0)``, so a
padded prompt sees the same positions as it would alone. Each later step feeds one token per
row at position ``previous + 1`` and appends a column of ones to ``attention_mask``.
Rows that have finished keep being fed ``pad_token_id``; their outputs are ignored.

Logits processing, in this order (the PyTorch reference implements the same spec):

    1. apply_repetition_penalty   every strategy, when repetition_penalty != 1
    2. ban_repeated_ngrams        every strategy, when no_repeat_ngram_size > 0
    3. suppress_eos               every strategy, while fewer than min_new_tokens are generated
    4. apply_temperature          sample only
    5. top_k_filter               sample only, when top_k > 0
    6. top_p_filter               sample only, when top_p < 1
    7. sample_tokens              sample: softmax, then inverse-CDF with one rng.random() per row
       argmax                     greedy (lowest token id among ties)
       log_softmax + beam step    beam (see beam_search)

Logits are float32 through steps 1-6 and in ``log_softmax``; sampling probabilities and the
CDF are float64. Scores: greedy and sample report the sum of the chosen tokens' log-probs
under the distribution actually used (after steps 1-6); beam search reports the
length-normalised hypothesis score.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from .errors import ConfigError, InputError, OnnxformerError

logger = logging.getLogger(__name__)

STRATEGIES = ("greedy", "sample", "beam")
FINISH_REASONS = ("eos", "length", "stop")

Decode = Callable[[Sequence[int]], str]
"""Token ids -> text, e.g. ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``."""


# Configuration -----------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationConfig:
    """Search parameters: frozen, validated at construction, JSON round-trippable.

    The strategy is named, never inferred: sampling parameters (temperature, top_k, top_p)
    only act with ``strategy="sample"``; ``num_beams`` > 1 requires ``strategy="beam"``.
    """

    strategy: str = "greedy"  # one of STRATEGIES
    max_new_tokens: int = 32  # generated tokens at most (eos included)
    min_new_tokens: int = 0  # eos is suppressed until this many tokens are generated
    temperature: float = 1.0  # sample: logits / temperature; must be > 0
    top_k: int = 0  # sample: keep the k highest logits (ties kept); 0 = off
    top_p: float = 1.0  # sample: nucleus; keep the smallest prefix with prob mass >= top_p; 1 = off
    seed: int | None = None  # sample: seed of numpy.random.default_rng when no rng is passed
    num_beams: int = 1  # beam: beams per prompt (K)
    length_penalty: float = 1.0  # beam: hypothesis score = sum logprob / length ** length_penalty
    early_stopping: bool = False  # beam: a prompt is done as soon as it has K finished hypotheses
    num_return_sequences: int = 1  # sequences per prompt; greedy: 1; beam: <= num_beams
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the sequence; 1 = off
    no_repeat_ngram_size: int = 0  # ban tokens completing an n-gram already seen; 0 = off
    eos_token_ids: tuple[int, ...] = ()  # generating one of these finishes a row; () = none
    stop_strings: tuple[str, ...] = ()  # finish when the generated text contains one (needs decode)
    pad_token_id: int = 0  # fed to left pads and finished rows

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}; got {self.strategy!r}")
        set_("max_new_tokens", _check_int("max_new_tokens", self.max_new_tokens, 0))
        set_("min_new_tokens", _check_int("min_new_tokens", self.min_new_tokens, 0))
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens}); "
                f"lower min_new_tokens or raise max_new_tokens"
            )
        set_("temperature", _check_float("temperature", self.temperature))
        if self.strategy == "sample" and self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0 for strategy 'sample'; got {self.temperature!r}. "
                f"Use strategy 'greedy' for deterministic decoding."
            )
        set_("top_k", _check_int("top_k", self.top_k, 0))
        set_("top_p", _check_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1]; got {self.top_p!r}. Use 1.0 to turn nucleus filtering off.")
        if self.seed is not None:
            set_("seed", _check_int("seed", self.seed, 0))
        set_("num_beams", _check_int("num_beams", self.num_beams, 1))
        if self.num_beams > 1 and self.strategy != "beam":
            raise ConfigError(
                f"num_beams ({self.num_beams}) > 1 needs strategy 'beam'; got strategy {self.strategy!r}"
            )
        set_("length_penalty", _check_float("length_penalty", self.length_penalty))
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ConfigError(f"early_stopping must be a bool; got {self.early_stopping!r}")
        set_("early_stopping", bool(self.early_stopping))
        nrs = _check_int("num_return_sequences", self.num_return_sequences, 1)
        set_("num_return_sequences", nrs)
        if self.strategy == "greedy" and nrs != 1:
            raise ConfigError(
                f"num_return_sequences must be 1 for strategy 'greedy' (it is deterministic); got {nrs}. "
                f"Use strategy 'sample' or 'beam' for several sequences."
            )
        if self.strategy == "beam" and nrs > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({nrs}) must be <= num_beams ({self.num_beams}) for strategy 'beam'"
            )
        set_("repetition_penalty", _check_float("repetition_penalty", self.repetition_penalty))
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0; got {self.repetition_penalty!r}. Use 1.0 to turn it off."
            )
        set_("no_repeat_ngram_size", _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0))
        eos = self.eos_token_ids
        eos = (eos,) if _is_int(eos) else eos
        if not isinstance(eos, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in eos):
            raise ConfigError(
                f"eos_token_ids must be a tuple of token ids >= 0 (empty = none); got {self.eos_token_ids!r}"
            )
        set_("eos_token_ids", tuple(int(t) for t in eos))
        stops = self.stop_strings
        stops = (stops,) if isinstance(stops, str) else stops
        if not isinstance(stops, (tuple, list)) or not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_strings must be a tuple of non-empty strings; got {self.stop_strings!r}")
        set_("stop_strings", tuple(stops))
        if self.stop_strings and self.strategy == "beam":
            raise ConfigError(
                f"stop_strings ({self.stop_strings!r}) are not supported with strategy 'beam'; "
                f"use eos_token_ids, or strategy 'greedy' / 'sample'"
            )
        set_("pad_token_id", _check_int("pad_token_id", self.pad_token_id, 0))

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["stop_strings"] = list(self.stop_strings)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"generation parameters must be a mapping {{name: value}}; got {type(data).__name__}")
        _reject_unknown(data)
        return cls(**data)

    def replace(self, **changes: Any) -> "GenerationConfig":
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)


def _reject_unknown(data: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(GenerationConfig)]
    unknown = sorted(set(data) - set(known), key=repr)  # key=repr: a key need not be a str
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown generation parameter(s): {', '.join(hints)}; valid: {', '.join(known)}")


# The step model ----------------------------------------------------------------------------
class StepResult(NamedTuple):
    logits: np.ndarray  # (N, V) logits of the LAST position of each row; may be the model's
    #                     output buffer: read it before the next step, do not write to it
    cache: Any  # the updated cache, opaque to generation
    # Optional, from models that compute the greedy choice themselves (a "shared" layout graph):
    # (N,) int64 argmax of each logits row (lowest id among ties) and (N,) float32 its
    # log-softmax value. Used by greedy steps without logits processing; same buffer rules.
    choice: tuple[np.ndarray, np.ndarray] | None = None


class StepModel(Protocol):
    """What generation needs from a model. The ONNX runtime implements it with sessions.

    The cache is opaque and functional: ``step`` returns a new one (an implementation may
    reuse buffers, e.g. with onnxruntime I/O binding, as long as the old cache is not read
    again). Generation calls, in order: ``init_cache(B)``, ``step`` on the padded prompts
    (T = longest prompt, P = 0), then per token ``step`` with T = 1, and for beam search and
    multi-sample generation ``reorder_cache`` between steps.
    """

    vocab_size: int  # V: prompts, eos and pad ids are checked against it before any step

    def init_cache(self, batch_size: int) -> Any:
        """An empty cache (P = 0) for ``batch_size`` rows (encoder-decoder: plus the encoder K/V)."""
        ...

    def step(
        self,
        input_ids: np.ndarray,  # (N, T) int64
        position_ids: np.ndarray,  # (N, T) int64
        attention_mask: np.ndarray,  # (N, P+T) int64, 0 = left pad
        cache: Any,
    ) -> StepResult:
        """Run T new tokens per row against the cache; logits of the last position only."""
        ...

    def reorder_cache(self, cache: Any, indices: np.ndarray) -> Any:
        """Gather rows: new row r = old row ``indices[r]``; ``indices`` (N',) int64, N' may differ from N."""
        ...

    # Optional: ``advance(tokens, cache) -> StepResult``, one new token per row (N,) int64
    # after the prompt step, every row one token longer. Greedy and sample call it instead of
    # ``step`` when a model has it (a model that tracks its rows' lengths needs neither the
    # positions nor the mask); it must give what ``step`` gives for the same tokens.


class PaddedBatch(NamedTuple):
    input_ids: np.ndarray  # (B, T) int64, left-padded
    attention_mask: np.ndarray  # (B, T) int64, 0 on pads
    position_ids: np.ndarray  # (B, T) int64, clip(cumsum(mask) - 1, 0)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> PaddedBatch:
    """Left-pad token id lists into a batch with its attention mask and position ids."""
    rows = check_prompts(prompts)
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)  # (B, T)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row):] = row
        attention_mask[b, width - len(row):] = 1
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)  # (B, T)
    return PaddedBatch(input_ids, attention_mask, position_ids)


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__") or not _sized(prompts):
        raise InputError(f"prompts must be a non-empty list of token id lists; got {prompts!r:.80}")
    rows = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__") or _is_int(prompt):
            raise InputError(f"prompt {b} must be a list of token ids; got {prompt!r:.80}. Tokenize it first.")
        row = list(prompt)
        bad = [t for t in row if not _is_int(t)]
        if bad:
            raise InputError(f"prompt {b} holds {bad[0]!r:.40}, which is not a token id; token ids are integers")
        row = [int(t) for t in row]
        if not row:
            raise InputError(f"prompt {b} is empty; every prompt needs at least one token (e.g. bos)")
        if min(row) < 0:
            raise InputError(f"prompt {b} has a negative token id ({min(row)})")
        rows.append(row)
    return rows


def _sized(items: Any) -> bool:
    """True if ``items`` has a length > 0 (a 0-d numpy array has no length)."""
    try:
        return len(items) > 0
    except TypeError:
        return False


def _step(model: StepModel, input_ids, position_ids, attention_mask, cache) -> StepResult:
    return _checked(model, model.step(input_ids, position_ids, attention_mask, cache), input_ids.shape[0])


def _checked(model: StepModel, result: StepResult, n: int) -> StepResult:
    """The step's result as float32 logits (N, V) and, if any, a well-formed choice."""
    logits, cache, choice = result[0], result[1], getattr(result, "choice", None)
    logits = np.asarray(logits, dtype=np.float32)
    if logits.shape != (n, model.vocab_size):
        raise OnnxformerError(
            f"step() must return logits of shape (N={n}, V={model.vocab_size}) for the last position; got {logits.shape}"
        )
    if choice is not None and (len(choice) != 2 or choice[0].shape != (n,) or choice[1].shape != (n,)):
        raise OnnxformerError(f"step() must return choice as ((N={n},) token ids, (N={n},) log-probs) or None")
    return StepResult(logits, cache, choice)


def _check_vocab(vocab_size: int, prompts: list[list[int]], config: GenerationConfig) -> None:
    """Token ids must index the vocabulary; checked before the model runs."""
    top = max(max(p) for p in prompts)
    if top >= vocab_size:
        raise InputError(f"prompt token id {top} is out of range for vocab_size {vocab_size}")
    for name, ids in (("eos_token_ids", config.eos_token_ids), ("pad_token_id", (config.pad_token_id,))):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ConfigError(f"{name} {bad} out of range for vocab_size {vocab_size}")


# Logits processing (pure; inputs are never modified) --------------------------------------
def apply_repetition_penalty(logits: np.ndarray, seqs: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """CTRL penalty: for each token id in row n's sequence (prompt + generated, no pads),
    ``logit / penalty`` if the logit is > 0 else ``logit * penalty``.  logits (N, V)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    lengths = [len(s) for s in seqs]
    if sum(lengths) == 0:
        return out
    rows = np.repeat(np.arange(len(seqs)), lengths)  # (sum L,)
    toks = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])  # (sum L,)
    picked = out[rows, toks]  # duplicates read the original value, so writing twice is harmless
    out[rows, toks] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def ban_repeated_ngrams(logits: np.ndarray, seqs: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """Set to -inf every token that would complete an n-gram already present in the row's sequence."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if n <= 0:
        return out
    for row, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < n:
            continue
        grams = np.lib.stride_tricks.sliding_window_view(seq, n)  # (L-n+1, n)
        prefix = seq[len(seq) - n + 1:]  # the last n-1 tokens, (n-1,)
        hits = np.all(grams[:, :-1] == prefix, axis=1)
        out[row, grams[hits, -1]] = -np.inf
    return out


def suppress_eos(logits: np.ndarray, eos_token_ids: Sequence[int]) -> np.ndarray:
    """Set the eos logits to -inf (used while fewer than min_new_tokens are generated)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if eos_token_ids:
        out[:, list(eos_token_ids)] = -np.inf
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(logits, dtype=np.float32) / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep logits >= the k-th largest of the row (ties at the boundary are all kept); others -inf."""
    out = np.array(logits, dtype=np.float32, copy=True)
    vocab = out.shape[1]
    if k <= 0 or k >= vocab:
        return out
    kth = np.partition(out, vocab - k, axis=1)[:, vocab - k: vocab - k + 1]  # (N, 1)
    out[out < kth] = -np.inf
    return out


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: sort by probability descending (stable: lower id first among ties) and keep
    a token iff the probability mass BEFORE it is < p; the top token is always kept."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if p >= 1.0:
        return out
    probs = softmax(out)  # (N, V) float64
    order = np.argsort(-probs, axis=1, kind="stable")  # (N, V)
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_probs, axis=1) - sorted_probs  # mass strictly before each token
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    out[~keep] = -np.inf
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in the input's float type; a row of all -inf stays all -inf (no NaN)."""
    x = np.asarray(logits)
    top = np.max(x, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    finite = np.isfinite(lse)
    return np.where(finite, shifted - np.where(finite, lse, 0), -np.inf).astype(x.dtype, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; a row of all -inf gives all zeros."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(top), top, 0))
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def sample_tokens(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row by inverse CDF: ``u = rng.random(N)``; pick the first token whose
    cumulative probability exceeds ``u * total``. Zero-probability tokens are never picked
    (a row with every token banned picks 0, as argmax would).  logits (N, V) -> (N,) int64."""
    probs = softmax(logits)  # (N, V)
    cdf = np.cumsum(probs, axis=1)  # (N, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]  # (N,)
    tokens = np.sum(cdf <= u[:, None], axis=1)  # first index with cdf > u
    nonzero = probs > 0
    last = probs.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)  # rounding guard
    tokens = np.minimum(tokens, last)
    if not nonzero.any(axis=1).all():
        logger.warning("every token of a row was banned; emitting token 0")
        tokens = np.where(nonzero.any(axis=1), tokens, 0)
    return tokens.astype(np.int64)


def process_logits(
    logits: np.ndarray, seqs: Sequence[Sequence[int]], config: GenerationConfig, n_generated: int
) -> np.ndarray:
    """Steps 1-3 of the processing order (every strategy)."""
    out = np.asarray(logits, dtype=np.float32)
    if config.repetition_penalty != 1.0:
        out = apply_repetition_penalty(out, seqs, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        out = ban_repeated_ngrams(out, seqs, config.no_repeat_ngram_size)
    if n_generated < config.min_new_tokens:
        out = suppress_eos(out, config.eos_token_ids)
    return out


def sampling_filters(logits: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """Steps 4-6 of the processing order (sample only)."""
    out = apply_temperature(logits, config.temperature)
    if config.top_k > 0:
        out = top_k_filter(out, config.top_k)
    if config.top_p < 1.0:
        out = top_p_filter(out, config.top_p)
    return out


# Output ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationOutput:
    """Indexed ``[prompt][returned sequence]`` for every strategy (greedy returns 1 per prompt)."""

    sequences: list[list[list[int]]]  # generated ids only (no prompt), eos included if produced
    scores: list[list[float]]  # greedy/sample: sum of log-probs; beam: length-normalised score
    finish_reasons: list[list[str]]  # "eos" | "length" | "stop"
    texts: list[list[str]] | None = None  # decoded text (cut at a stop string); None without decode


# Greedy and sample: one loop, two token choosers -------------------------------------------
@dataclass
class _Rows:
    """Per-row state of the greedy/sample loop (N rows)."""

    history: list[list[int]]  # prompt (no pads) + generated, for the logits processors
    generated: list[list[int]]
    finished: np.ndarray  # (N,) bool
    reasons: list[str]
    scores: np.ndarray  # (N,) float64
    texts: list[str | None]
    stop_at: list[int | None]  # text index where a stop string starts


def _find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found) if found else None


Chooser = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # logits (N, V) -> tokens, logprobs


def _decode_loop(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    choose: Chooser,
    decode: Decode | None,
    copies: int,
    live_text: bool = False,
) -> tuple[_Rows, Iterator[None]]:
    """Validate, then return the row state and a generator that advances it one token per
    ``next()``. Row r continues prompt r // copies. ``state.texts`` is kept current after
    every token when there are stop strings or ``live_text`` (streaming)."""
    if config.stop_strings and decode is None:
        raise ConfigError(f"stop_strings {config.stop_strings!r} need a decode function; pass decode=")
    rows = check_prompts(prompts)
    _check_vocab(model.vocab_size, rows, config)
    n = len(rows) * copies
    empty_text = decode([]) if decode is not None else None
    state = _Rows(
        history=[list(rows[r // copies]) for r in range(n)],
        generated=[[] for _ in range(n)],
        finished=np.zeros(n, dtype=bool),
        reasons=["length"] * n,
        scores=np.zeros(n, dtype=np.float64),
        texts=[empty_text] * n,
        stop_at=[None] * n,
    )
    live_decode = decode if (config.stop_strings or live_text) else None
    return state, _advance(model, rows, config, choose, live_decode, copies, state)


def _advance(
    model: StepModel,
    rows: list[list[int]],
    config: GenerationConfig,
    choose: Chooser,
    decode: Decode | None,
    copies: int,
    state: _Rows,
) -> Iterator[None]:
    if config.max_new_tokens == 0:
        return
    n = len(state.generated)
    batch = left_pad(rows, config.pad_token_id)
    cache = model.init_cache(len(rows))
    logits, cache, choice = _step(model, batch.input_ids, batch.position_ids, batch.attention_mask, cache)
    mask, positions = batch.attention_mask, batch.position_ids[:, -1]  # (B, T), (B,)
    if copies > 1:  # run each prompt once, then copy its rows
        expand = np.repeat(np.arange(len(rows)), copies)  # (N,)
        logits, mask, positions = logits[expand], mask[expand], positions[expand]
        choice = None if choice is None else (choice[0][expand], choice[1][expand])
        cache = model.reorder_cache(cache, expand)
    # Greedy without logits processing takes the model's own choice when it has one (the
    # argmax and its log-prob computed in the graph): nothing of size V is read per token.
    model_choice = choose is _greedy_chooser and config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
    # The mask of every step is a prefix of one array: no concatenation per step.
    width = mask.shape[1]
    full_mask = np.ones((n, width + config.max_new_tokens), dtype=np.int64)  # (N, P_max)
    full_mask[:, :width] = mask
    eos_ids = set(config.eos_token_ids)
    # One new token per row: a model with advance() is handed the tokens alone (it knows each
    # row's length); otherwise step() gets positions and the mask.
    advance = getattr(model, "advance", None)
    # Per token: the choice, then the bookkeeping. While no row has finished (the usual case)
    # it is plain Python over N ints: the per-token work is what a fast graph step waits on.
    pad, last, n_finished = config.pad_token_id, config.max_new_tokens - 1, 0
    for t in range(config.max_new_tokens):
        if model_choice and choice is not None and t >= config.min_new_tokens and np.isfinite(choice[1]).all():
            tokens, logprobs = choice  # (N,), (N,): the model's output buffers, read before the next step
        else:
            tokens, logprobs = choose(process_logits(logits, state.history, config, t))  # (N,), (N,)
        if n_finished == 0:
            state.scores += logprobs  # float32 log-probs summed in float64
            chosen = tokens.tolist()
            active = range(n)
        else:
            running = ~state.finished
            tokens = np.where(running, tokens, pad)  # rows finished before this step are fed pads
            state.scores[running] += logprobs[running]
            chosen = tokens.tolist()
            active = np.flatnonzero(running).tolist()
        for r in active:
            state.generated[r].append(chosen[r])
            state.history[r].append(chosen[r])
            if chosen[r] in eos_ids:
                state.finished[r], state.reasons[r] = True, "eos"
                n_finished += 1
        if decode is not None:
            for r in active:
                state.texts[r] = decode(state.generated[r])
                stop = _find_stop(state.texts[r], config.stop_strings) if config.stop_strings else None
                if stop is not None and not state.finished[r]:
                    state.finished[r], state.reasons[r], state.stop_at[r] = True, "stop", stop
                    n_finished += 1
                    logger.debug("row %d hit a stop string at text index %d", r, stop)
        yield None
        if n_finished == n or t == last:
            return
        if advance is not None:
            logits, cache, choice = _checked(model, advance(np.array(chosen, dtype=np.int64), cache), n)
        else:
            positions = positions + 1
            ids = np.array(chosen, dtype=np.int64)[:, None]  # (N, 1)
            logits, cache, choice = _step(model, ids, positions[:, None], full_mask[:, :width + t + 1], cache)


def _final_text(state: _Rows, r: int, decode: Decode) -> str:
    """Row r's text, cut where a stop string starts (the text was decoded when it stopped)."""
    if state.stop_at[r] is not None:
        return (state.texts[r] or "")[: state.stop_at[r]]
    return decode(state.generated[r])


def _collect(
    state: _Rows, steps: Iterator[None], n_prompts: int, copies: int, decode: Decode | None
) -> GenerationOutput:
    for _ in steps:
        pass
    group = lambda items: [list(items[b * copies:(b + 1) * copies]) for b in range(n_prompts)]  # noqa: E731
    texts = None
    if decode is not None:
        texts = group([_final_text(state, r, decode) for r in range(len(state.generated))])
    return GenerationOutput(
        sequences=group(state.generated),
        scores=group([float(s) for s in state.scores]),
        finish_reasons=group(state.reasons),
        texts=texts,
    )


def _require_strategy(config: GenerationConfig, strategy: str) -> None:
    if config.strategy != strategy:
        raise ConfigError(
            f"{strategy}() got a config with strategy {config.strategy!r}; "
            f"call {'beam_search' if config.strategy == 'beam' else config.strategy}() or generate()"
        )


def _greedy_chooser(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax and its log-probability: log_softmax(logits)[token] computed for the chosen token
    only (the token is the row maximum, so its shifted logit is 0 and its log-prob is
    -log(sum(exp(logits - max)))): the same float32 values as log_softmax, in one pass over V."""
    x = np.asarray(logits)
    tokens = np.argmax(x, axis=1)  # (N,) lowest id among ties
    top = x[np.arange(x.shape[0]), tokens]  # (N,) the row maxima
    if np.isfinite(top).all():  # the usual case: no errstate, no masking, one temporary
        shifted = x - top[:, None]
        lse = np.log(np.sum(np.exp(shifted, out=shifted), axis=1))  # (N,)
        return tokens.astype(np.int64), (-lse).astype(x.dtype, copy=False)
    finite = np.isfinite(top)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(np.sum(np.exp(x - np.where(finite, top, 0)[:, None]), axis=1))
    logprobs = np.where(finite & np.isfinite(lse), -lse, -np.inf).astype(x.dtype, copy=False)
    return tokens.astype(np.int64), logprobs


def _sample_chooser(config: GenerationConfig, rng: np.random.Generator) -> Chooser:
    def choose(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        filtered = sampling_filters(logits, config)
        tokens = sample_tokens(filtered, rng)
        logprobs = np.take_along_axis(log_softmax(filtered), tokens[:, None], axis=1)[:, 0]
        return tokens, logprobs

    return choose


def greedy(
    model: StepModel, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, decode: Decode | None = None
) -> GenerationOutput:
    """Pick the highest processed logit at every step (lowest id among ties)."""
    _require_strategy(config, "greedy")
    state, steps = _decode_loop(model, prompts, config, _greedy_chooser, decode, copies=1)
    return _collect(state, steps, len(state.generated), 1, decode)


def sample(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    rng: np.random.Generator | None = None,
    decode: Decode | None = None,
) -> GenerationOutput:
    """Sample ``num_return_sequences`` continuations per prompt.

    ``rng`` defaults to ``numpy.random.default_rng(config.seed)``; every step draws
    ``rng.random(N)`` once (N = prompts * num_return_sequences, finished rows included), so a
    seed fixes the output for a given batch.
    """
    _require_strategy(config, "sample")
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    copies = config.num_return_sequences
    state, steps = _decode_loop(model, prompts, config, _sample_chooser(config, rng), decode, copies)
    return _collect(state, steps, len(state.generated) // copies, copies, decode)


# Beam search -------------------------------------------------------------------------------
class _Hypothesis(NamedTuple):
    score: float
    order: int  # insertion counter: earlier wins ties
    tokens: list[int]
    reason: str


def _add_hypothesis(hyps: list[_Hypothesis], hyp: _Hypothesis, keep: int) -> None:
    hyps.append(hyp)
    hyps.sort(key=lambda h: (-h.score, h.order))
    del hyps[keep:]


def beam_search(
    model: StepModel, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, decode: Decode | None = None
) -> GenerationOutput:
    """Beam search with K = num_beams beams per prompt.

    Spec (the PyTorch reference mirrors it exactly):

    * The prompts run once (B rows); logits and cache are then copied to B*K rows. Beam
      scores start at [0, -inf, ..., -inf] per prompt.
    * Step t = 0 .. max_new_tokens-1: ``logprobs = log_softmax(process_logits(...))`` (N, V)
      (repetition penalty, no-repeat n-gram, min_new_tokens eos suppression; no temperature,
      top-k or top-p); ``cand = scores[:, None] + logprobs`` reshaped (B, K*V); take the first
      C = max(2, 1 + len(eos_token_ids)) * K candidates of a stable sort of ``-cand`` (C = 2K for
      at most one eos id; lower flat index first among ties), capped at K*V.
    * For each prompt not done, walk the candidates in order: ``beam = flat // V``,
      ``tok = flat % V``. An eos token adds the finished hypothesis ``beam's tokens + [tok]``
      with score ``cand / (t+1) ** length_penalty`` if its rank among the C candidates is < K,
      and is otherwise skipped; any other token becomes the next running beam. Stop after K
      running beams (if the candidates run out first, the remaining slots copy beam 0 with
      ``pad_token_id`` and score -inf). A prompt keeps its K best hypotheses (score descending,
      earlier added first among ties).
    * After the step, a prompt with K hypotheses is done if ``early_stopping``, or else if its
      worst hypothesis score >= best running raw score / (t+1) ** length_penalty.
    * Rows of done prompts are fed ``pad_token_id`` and ignored. The cache is reordered with
      the chosen beam rows every step. Stop when every prompt is done or after
      max_new_tokens steps; prompts not done then add all K running beams as hypotheses
      (reason "length") with score ``raw / generated_length ** length_penalty``.
    * Return the ``num_return_sequences`` best hypotheses per prompt.

    All scores are float32 arithmetic. ``max_new_tokens == 0`` returns empty sequences with
    the initial raw scores (0, -inf, ...) and calls no model.
    """
    _require_strategy(config, "beam")
    rows = check_prompts(prompts)
    _check_vocab(model.vocab_size, rows, config)
    n_prompts, k = len(rows), config.num_beams
    n = n_prompts * k
    keep = config.num_return_sequences
    if config.max_new_tokens == 0:
        initial = [0.0] + [-math.inf] * (k - 1)
        return GenerationOutput(
            sequences=[[[] for _ in range(keep)] for _ in rows],
            scores=[initial[:keep] for _ in rows],
            finish_reasons=[["length"] * keep for _ in rows],
            texts=[[decode([])] * keep for _ in rows] if decode is not None else None,
        )

    batch = left_pad(rows, config.pad_token_id)
    cache = model.init_cache(n_prompts)
    logits, cache, _ = _step(model, batch.input_ids, batch.position_ids, batch.attention_mask, cache)
    vocab = model.vocab_size
    expand = np.repeat(np.arange(n_prompts), k)  # (N,) row -> prompt
    logits, cache = logits[expand], model.reorder_cache(cache, expand)
    mask, positions = batch.attention_mask[expand], batch.position_ids[expand, -1]  # (N, T), (N,)

    eos = set(config.eos_token_ids)
    n_cand = min(max(2, 1 + len(eos)) * k, k * vocab)
    lp = np.float32(config.length_penalty)
    history = [list(rows[b]) for b in expand]
    beams: list[list[int]] = [[] for _ in range(n)]
    scores = np.full(n, -np.inf, dtype=np.float32)  # (N,)
    scores[::k] = 0.0
    hyps: list[list[_Hypothesis]] = [[] for _ in range(n_prompts)]
    done = np.zeros(n_prompts, dtype=bool)
    counter = 0
    last_t = 0
    for t in range(config.max_new_tokens):
        last_t = t
        logprobs = log_softmax(process_logits(logits, history, config, t))  # (N, V) float32
        cand = (scores[:, None] + logprobs).reshape(n_prompts, k * vocab)  # (B, K*V)
        top = np.argsort(-cand, axis=1, kind="stable")[:, :n_cand]  # (B, C)
        norm = np.float32(t + 1) ** lp
        next_rows = np.repeat(np.arange(n_prompts) * k, k)  # (N,) default: copy beam 0
        next_tokens = np.full(n, config.pad_token_id, dtype=np.int64)
        next_scores = np.full(n, -np.inf, dtype=np.float32)
        for b in range(n_prompts):
            base = b * k
            if done[b]:
                next_rows[base:base + k] = np.arange(base, base + k)
                continue
            filled = 0
            for rank, flat in enumerate(top[b]):
                beam, tok = divmod(int(flat), vocab)
                score = cand[b, flat]
                if tok in eos:
                    if rank < k:
                        hyp = _Hypothesis(float(score / norm), counter, beams[base + beam] + [tok], "eos")
                        _add_hypothesis(hyps[b], hyp, k)
                        counter += 1
                    continue
                next_rows[base + filled], next_tokens[base + filled] = base + beam, tok
                next_scores[base + filled] = score
                filled += 1
                if filled == k:
                    break
            if len(hyps[b]) == k:
                done[b] = config.early_stopping or hyps[b][-1].score >= float(next_scores[base] / norm)
        beams = [beams[r] + [int(tok)] for r, tok in zip(next_rows, next_tokens)]
        history = [history[r] + [int(tok)] for r, tok in zip(next_rows, next_tokens)]
        scores = next_scores
        if done.all() or t == config.max_new_tokens - 1:
            break
        cache = model.reorder_cache(cache, next_rows)
        mask = np.concatenate([mask[next_rows], np.ones((n, 1), dtype=np.int64)], axis=1)  # (N, P+T+1)
        positions = positions[next_rows] + 1
        logits, cache, _ = _step(model, next_tokens[:, None], positions[:, None], mask, cache)

    norm = np.float32(last_t + 1) ** lp
    for b in np.flatnonzero(~done):
        for r in range(b * k, (b + 1) * k):
            hyp = _Hypothesis(float(scores[r] / norm), counter, beams[r], "length")
            _add_hypothesis(hyps[b], hyp, k)
            counter += 1
    best = [h[:keep] for h in hyps]
    return GenerationOutput(
        sequences=[[h.tokens for h in hs] for hs in best],
        scores=[[h.score for h in hs] for hs in best],
        finish_reasons=[[h.reason for h in hs] for hs in best],
        texts=[[decode(h.tokens) for h in hs] for hs in best] if decode is not None else None,
    )


# Entry points ------------------------------------------------------------------------------
def generate(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    rng: np.random.Generator | None = None,
    decode: Decode | None = None,
) -> GenerationOutput:
    """Run ``config.strategy`` (greedy, sample or beam_search)."""
    if config.strategy == "greedy":
        return greedy(model, prompts, config, decode=decode)
    if config.strategy == "sample":
        return sample(model, prompts, config, rng=rng, decode=decode)
    return beam_search(model, prompts, config, decode=decode)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    held = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


def stream(
    model: StepModel,
    prompt: Sequence[int],
    config: GenerationConfig,
    decode: Decode,
    *,
    rng: np.random.Generator | None = None,
) -> Iterator[str]:
    """Yield text deltas of one prompt's continuation as tokens are generated (greedy or sample).

    Each step decodes the whole generated id list and yields the new suffix only. Text ending
    in U+FFFD (an incomplete UTF-8 character split across byte-level tokens) is held back until
    the character completes, and so is a tail that could be the start of a stop string. The
    concatenated deltas equal the final text (cut at a stop string). Arguments are checked
    when ``stream`` is called, not at the first ``next()``.
    """
    if config.strategy == "beam":
        raise ConfigError("stream() supports strategy 'greedy' or 'sample'; got 'beam'. Use beam_search().")
    if config.num_return_sequences != 1:
        raise ConfigError(
            f"stream() yields one sequence; got num_return_sequences={config.num_return_sequences}. Use sample()."
        )
    if config.strategy == "greedy":
        chooser = _greedy_chooser
    else:
        chooser = _sample_chooser(config, rng if rng is not None else np.random.default_rng(config.seed))
    state, steps = _decode_loop(model, [prompt], config, chooser, decode, copies=1, live_text=True)
    return _text_deltas(state, steps, config.stop_strings, decode)


def _text_deltas(state: _Rows, steps: Iterator[None], stop_strings: Sequence[str], decode: Decode) -> Iterator[str]:
    sent = ""
    for _ in steps:
        if state.stop_at[0] is not None:
            break
        stable = (state.texts[0] or "").rstrip("\ufffd")  # hold back an incomplete character
        stable = stable[: len(stable) - _held_back(stable, stop_strings)]
        if len(stable) > len(sent) and stable.startswith(sent):
            yield stable[len(sent):]
            sent = stable
    final = _final_text(state, 0, decode)
    if not final.startswith(sent):  # decode() revised text already sent; send from where they differ
        logger.warning("decode() is not prefix-stable; streamed text differs from the final text")
        sent = sent[: len(os.path.commonprefix([sent, final]))]
    if len(final) > len(sent):
        yield final[len(sent):]


__all__ = [
    "STRATEGIES", "FINISH_REASONS", "Decode", "GenerationConfig", "StepResult", "StepModel",
    "PaddedBatch", "left_pad", "GenerationOutput",
    "apply_repetition_penalty", "ban_repeated_ngrams", "suppress_eos", "apply_temperature",
    "top_k_filter", "top_p_filter", "log_softmax", "softmax", "sample_tokens",
    "process_logits", "sampling_filters",
    "greedy", "sample", "beam_search", "generate", "stream",
]
