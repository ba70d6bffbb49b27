"""The step protocol: what every search asks of a model, token by token. numpy only.

A step model holds a batch of rows; a row is one sequence being decoded. The search
(runtime/generation.py: greedy, sample, beam) drives it through five operations and never sees
padding, positions, masks or the cache layout, which are the step model's business:

    prefill(prompts) -> StepResult   start len(prompts) new rows after the running ones (the
                                     first call starts the batch; later calls admit rows into a
                                     running batch); the result covers the new rows only
    advance(tokens)  -> StepResult   tokens (N,): one more token per running row; (N, K): K more
                                     (verification of K proposed tokens); logits (N, V) after
                                     the token, or (N, K, V) after each of the K tokens
    select(rows)                     row r becomes old row rows[r]: reorder (beam search), copy
                                     (several sequences per prompt) or drop rows
    release(rows)                    drop the given rows (finished requests); the rest keep order
    rewind(counts)                   forget the last counts[r] tokens of row r (counts (N,)): the
                                     next advance continues from there (speculative decoding
                                     rolls back past a rejected draft token)
    sequence_start(prompt)           the tokens a row's sequence starts with, which the logits
                                     processors count: the prompt itself, or for an encoder-
                                     decoder the decoder's start token (the prompt is the source)

Every result carries the greedy choice (``next_token``, ``next_logprob``): a model whose graph
computes it returns the graph's; otherwise it is computed from the logits on first use, by
:func:`greedy_choice`. A plain greedy search reads only those two numbers per row.

Shape letters:

    N   running rows        T   prompt tokens (the longest of a prefill)
    K   tokens per row in one advance                     V   vocabulary size
    P   cached tokens (columns of an aligned cache)       S   source tokens (encoder-decoder)

:class:`AlignedSteps` is the bookkeeping shared by step models whose cache has the same number
of columns for every row (left pads masked out): the traced ONNX decoder graph and the eager
PyTorch model. The "shared" ONNX layout (right-padded rows with lengths) has its own
(runtime/session_steps.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import numpy as np

from .errors import InputError


def greedy_choice(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax (lowest id among ties) and its log-softmax value, for logits (..., V).

    The token is the row maximum, so its shifted logit is 0 and its log-probability is
    -log(sum(exp(logits - max))): the same float values as log_softmax, in one pass over V.
    A row of all -inf gives token 0 and log-prob -inf."""
    x = np.asarray(logits)
    flat = x.reshape(-1, x.shape[-1])  # (M, V)
    tokens = np.argmax(flat, axis=1)  # (M,)
    top = flat[np.arange(flat.shape[0]), tokens]  # (M,) the row maxima
    if np.isfinite(top).all():  # the usual case: no errstate, no masking, one temporary
        shifted = flat - top[:, None]
        lse = np.log(np.sum(np.exp(shifted, out=shifted), axis=1))  # (M,)
        logprobs = (-lse).astype(x.dtype, copy=False)
    else:
        finite = np.isfinite(top)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = np.log(np.sum(np.exp(flat - np.where(finite, top, 0)[:, None]), axis=1))
        logprobs = np.where(finite & np.isfinite(lse), -lse, -np.inf).astype(x.dtype, copy=False)
    shape = x.shape[:-1]
    return tokens.astype(np.int64).reshape(shape), logprobs.reshape(shape)


class StepResult:
    """One step's output for each row it ran: logits and the greedy choice.

    ``logits`` (N, V) float32, or (N, K, V) after a K-token advance. It may be the model's
    output buffer: read it before the next call on the model, and never write to it. The
    greedy choice ``next_token`` (N,) / (N, K) int64 and ``next_logprob`` float32 is the
    graph's when the model computes it, else computed from the logits on first use.
    """

    __slots__ = ("_logits", "_choice")

    def __init__(self, logits: Any, next_token: np.ndarray | None = None, next_logprob: np.ndarray | None = None):
        self._logits = logits  # an array, or a callable returning one (read only when needed)
        self._choice = None if next_token is None else (next_token, next_logprob)

    @property
    def logits(self) -> np.ndarray:
        if callable(self._logits):
            self._logits = self._logits()
        return np.asarray(self._logits, dtype=np.float32)

    @property
    def next_token(self) -> np.ndarray:
        return self._greedy()[0]

    @property
    def next_logprob(self) -> np.ndarray:
        return self._greedy()[1]

    def _greedy(self) -> tuple[np.ndarray, np.ndarray]:
        if self._choice is None:
            self._choice = greedy_choice(self.logits)
        return self._choice

    def take(self, rows: np.ndarray) -> "StepResult":
        """The result of rows ``rows`` (N',) (copied)."""
        token, logprob = self._greedy()
        return StepResult(self.logits[rows], token[rows], logprob[rows])


class StepModel(ABC):
    """What a search needs from a model (see the module docstring). ``release`` and
    ``sequence_start`` have defaults; the rest is the model's."""

    vocab_size: int  # V: prompts and token ids are checked against it before any step

    @property
    @abstractmethod
    def rows(self) -> int:
        """N, the running rows."""

    @abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        """Start one row per prompt after the running rows; the result covers the new rows."""

    @abstractmethod
    def advance(self, tokens: np.ndarray) -> StepResult:
        """Append tokens (N,) or (N, K) int64 to every running row."""

    @abstractmethod
    def select(self, rows: np.ndarray) -> None:
        """Row r becomes old row ``rows[r]``; ``rows`` (N',) int64, N' may differ from N."""

    def release(self, rows: Sequence[int]) -> None:
        """Drop ``rows``; the others keep their order."""
        keep = np.ones(self.rows, dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = False
        self.select(np.flatnonzero(keep))

    def sequence_start(self, prompt: Sequence[int]) -> list[int]:
        """The tokens the row's sequence starts with (what repetition penalties count)."""
        return list(prompt)

    def rewind(self, counts: Sequence[int]) -> None:
        """Forget the last ``counts[r]`` tokens fed to row r (never more than its advanced tokens)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewind rows (speculative decoding needs it)")


def rewind_counts(counts: Sequence[int], rows: int) -> np.ndarray:
    """rewind()'s counts as an (N,) int64 array >= 0; another shape is the caller's bug (ValueError)."""
    array = np.asarray(counts, dtype=np.int64).reshape(-1)
    if array.shape != (rows,) or (array.size and array.min() < 0):
        raise ValueError(f"rewind() takes (N={rows},) counts >= 0; got {counts!r:.80}")
    return array


class PaddedBatch(NamedTuple):
    input_ids: np.ndarray  # (B, T) int64, left-padded
    attention_mask: np.ndarray  # (B, T) int64, 0 on pads
    position_ids: np.ndarray  # (B, T) int64, clip(cumsum(mask) - 1, 0)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> PaddedBatch:
    """Left-pad token id lists into a batch with its attention mask and position ids: a padded
    prompt sees the same positions as it would alone."""
    width = max(len(r) for r in prompts)
    input_ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)  # (B, T)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)  # (B, T)
    for b, row in enumerate(prompts):
        input_ids[b, width - len(row):] = row
        attention_mask[b, width - len(row):] = 1
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)  # (B, T)
    return PaddedBatch(input_ids, attention_mask, position_ids)


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompts as lists of int token ids, each non-empty and >= 0; InputError otherwise."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__") or not _sized(prompts):
        raise InputError(f"prompts must be a non-empty list of token id lists; got {prompts!r:.80}")
    rows = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__") or is_int(prompt):
            raise InputError(f"prompt {b} must be a list of token ids; got {prompt!r:.80}. Tokenize it first.")
        row = list(prompt)
        bad = [t for t in row if not is_int(t)]
        if bad:
            raise InputError(f"prompt {b} holds {bad[0]!r:.40}, which is not a token id; token ids are integers",
                             code="E_TOKEN_ID")
        row = [int(t) for t in row]
        if not row:
            raise InputError(f"prompt {b} is empty; every prompt needs at least one token (e.g. bos)")
        if min(row) < 0:
            raise InputError(f"prompt {b} has a negative token id ({min(row)})", code="E_TOKEN_ID")
        rows.append(row)
    return rows


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _sized(items: Any) -> bool:
    """True if ``items`` has a length > 0 (a 0-d numpy array has no length)."""
    try:
        return len(items) > 0
    except TypeError:
        return False


def as_tokens(tokens: Any, rows: int, vocab_size: int) -> np.ndarray:
    """advance()'s tokens as an (N, K) int64 array. Another shape, or ids outside the
    vocabulary, break the protocol: a bug of the caller (a search, a scheduler), so a plain
    ValueError with its traceback."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
        raise ValueError(f"advance() takes (N={rows},) or (N={rows}, K) token ids; got shape {np.shape(tokens)}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"advance() got token ids in [{array.min()}, {array.max()}]; the vocabulary is [0, {vocab_size})")
    return array


def prefill_rows(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """prefill()'s prompts checked (InputError: they may come straight from a caller)."""
    rows = check_prompts(prompts)
    top = max(max(r) for r in rows)
    if top >= vocab_size:
        raise InputError(f"prompt token id {top} is out of range for vocab_size {vocab_size}", code="E_TOKEN_ID")
    return rows


class AlignedSteps(StepModel):
    """Row bookkeeping for a cache with the same number P of columns in every row.

    Prompts of different lengths are left-padded; ``attention_mask`` (N, P) is 0 on the pads
    and positions count each row's real tokens, so a padded row computes what it would alone.
    Rows admitted into a running batch are prefilled on their own, then joined: the batch with
    fewer columns is left-padded (masked) to the other's. Subclasses supply the model:

        _start(prompts)          -> (cache, decoder prompts): an empty cache (P = 0) for the
                                    prompts' rows (encoder-decoder: with their encoder K/V)
        _forward(ids, positions, mask, cache, last_only)
                                 -> (logits (N, V) if last_only else (N, T, V), cache)
        _gather(cache, rows)     -> the cache of rows ``rows``
        _join(a, b, pad_a, pad_b)-> rows of a then b, a's cached columns left-padded by pad_a
                                    columns and b's by pad_b (and their sources aligned)

    ``bidirectional_block``: the model treats the tokens of one call as one bidirectional
    block (a prefix-LM graph); K-token advances then run as K one-token steps.
    """

    bidirectional_block = False

    def __init__(self) -> None:
        self._cache: Any = None
        self._mask = np.zeros((0, 16), dtype=np.int64)  # (N, capacity): columns [0, P) in use
        self._width = 0  # P
        self._last = np.zeros(0, dtype=np.int64)  # (N,) position of each row's last token

    @property
    def rows(self) -> int:
        return len(self._last)

    # subclass hooks -----------------------------------------------------------------------
    @abstractmethod
    def _start(self, prompts: list[list[int]]) -> tuple[Any, list[list[int]]]: ...

    @abstractmethod
    def _forward(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: Any,
                 last_only: bool) -> tuple[np.ndarray, Any]: ...

    @abstractmethod
    def _gather(self, cache: Any, rows: np.ndarray) -> Any: ...

    @abstractmethod
    def _join(self, a: Any, b: Any, pad_a: int, pad_b: int) -> Any: ...

    # the protocol -------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        cache, starts = self._start(prefill_rows(prompts, self.vocab_size))
        batch = left_pad(starts)
        logits, cache = self._forward(batch.input_ids, batch.position_ids, batch.attention_mask, cache, True)
        t = batch.input_ids.shape[1]
        if not self.rows:
            self._cache, self._width = cache, 0
            self._mask = np.zeros((len(starts), max(16, 2 * t)), dtype=np.int64)
            self._last = np.zeros(0, dtype=np.int64)
            self._write_mask(slice(None), batch.attention_mask)
        else:  # admission: join the new rows' cache to the running rows' cache, left-padded
            width = max(self._width, t)
            self._cache = self._join(self._cache, cache, width - self._width, width - t)
            old = self._mask[:, :self._width]
            self._mask = np.zeros((self.rows + len(starts), max(self._mask.shape[1], 2 * width)), dtype=np.int64)
            self._mask[:len(old), width - old.shape[1]:width] = old
            self._mask[len(old):, width - t:width] = batch.attention_mask
            self._width = width
        self._last = np.concatenate([self._last, batch.position_ids[:, -1]])
        return StepResult(logits)

    def _write_mask(self, rows: slice, columns: np.ndarray) -> None:
        k = columns.shape[1]
        self._ensure(self._width + k)
        self._mask[rows, self._width:self._width + k] = columns
        self._width += k

    def _ensure(self, width: int) -> None:
        if width > self._mask.shape[1]:
            grown = np.zeros((self._mask.shape[0], max(width, 2 * self._mask.shape[1])), dtype=np.int64)
            grown[:, :self._width] = self._mask[:, :self._width]
            self._mask = grown

    def advance(self, tokens: np.ndarray) -> StepResult:
        ids = as_tokens(tokens, self.rows, self.vocab_size)  # (N, K)
        k = ids.shape[1]
        if k > 1 and self.bidirectional_block:  # one token at a time, each causal
            steps = [self.advance(ids[:, j]).logits.copy() for j in range(k)]
            return StepResult(np.stack(steps, axis=1))  # (N, K, V)
        self._ensure(self._width + k)
        self._mask[:, self._width:self._width + k] = 1
        self._width += k
        positions = self._last[:, None] + np.arange(1, k + 1)  # (N, K)
        logits, self._cache = self._forward(ids, positions, self._mask[:, :self._width], self._cache, k == 1)
        self._last = positions[:, -1]
        return StepResult(logits)

    def _trim(self, cache: Any, width: int) -> Any:
        """The cache cut to its first ``width`` columns, or None where the subclass cannot cut
        it (rewind then masks the dropped columns out instead)."""
        return None

    def rewind(self, counts: Sequence[int]) -> None:
        """Equal counts cut the cache's last columns (where ``_trim`` can); otherwise the
        dropped columns stay in the cache, masked out. Positions go back either way."""
        counts = rewind_counts(counts, self.rows)
        if not counts.any():
            return
        if (counts == counts[0]).all():
            trimmed = self._trim(self._cache, self._width - int(counts[0]))
            if trimmed is not None:
                self._cache, self._width = trimmed, self._width - int(counts[0])
                self._last = self._last - counts
                return
        for r, c in enumerate(counts.tolist()):
            if c:
                real = np.flatnonzero(self._mask[r, :self._width])  # the row's real columns, in order
                self._mask[r, real[len(real) - c:]] = 0
        self._last = self._last - counts

    def select(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self._cache = self._gather(self._cache, rows)
        self._mask = self._mask[rows]
        self._last = self._last[rows]


__all__ = [
    "greedy_choice", "StepResult", "StepModel", "PaddedBatch", "left_pad", "check_prompts", "is_int",
    "as_tokens", "prefill_rows", "rewind_counts", "AlignedSteps",
]
