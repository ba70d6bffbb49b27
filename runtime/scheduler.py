"""Continuous batching: one scheduler per generating package, for a server (runtime/server.py).
onnxruntime + numpy + tokenizers only.

    scheduler = Scheduler(model, SchedulerConfig(rows=16))
    handle = scheduler.submit(Request(prompt_ids, config, on_event=events.put))
    ...                     # events: Token (one per generated token), then Done or Failed
    scheduler.close()

Requests join the running batch at step boundaries and leave when they finish (eos,
max_new_tokens / max_length, a stop string) or are cancelled (a client gone): one thread runs

    admit   waiting requests take free rows
    step    one decode step for every running row (one token each)
    prefill prompt tokens into the cache, at most ``prefill_tokens`` between two decode steps
            (older prompts first; in pieces where the engine allows it, else one whole prompt
            at least)
    choose  every row with fresh logits picks its next token with its own settings, through
            the runtime's own processing and sampling (runtime/generation.py: process_logits,
            sampling_filters, sample_tokens, greedy_choice; its stop-string search and
            hold-back, find_stop and stable_text), and finished rows leave

Two engines, chosen by the package's layout (FORMAT.md 4.4, 7.7):

* :class:`RowPool` (decoder-only "shared" packages on CPU): per layer ONE key and one value
  buffer (R, Hkv, C, Dh), allocated once when the scheduler starts; a free-row pool (a request
  takes the lowest free row, and gives it back when it leaves: nothing is copied or
  reallocated, ever). What onnxruntime's GroupQueryAttention takes, and nothing else:
  - a prompt enters the cache apart from the decode steps, at most ``prefill_tokens`` prompt
    tokens per iteration: first pieces of new prompts together on a view of their rows (each
    row's cache empty: GroupQueryAttention's "first prompt", right-padded, T = the longest
    piece, ``sequence_lengths`` = each piece's length; rows that are not neighbours in
    separate calls); a later piece of a long prompt alone on its row (a batch of one may
    continue its prompt: chunked prefill, the same logits as the whole prompt at once);
  - a decode step runs rows [0, hi) (hi = 1 + the highest running row) with one token each
    and per-row ``sequence_lengths``; a row inside the range that is not running is fed a pad
    one past its cache (it writes the column its next prompt piece, or a free row's first
    prefill, overwrites).
  A step that mixes prompt pieces (T > 1) with rows decoding is not taken: for a batch of
  more than one row GroupQueryAttention refuses T > 1 with a past (tests/test_serve.py).
* :class:`StepEngine` (every other package: traced "concat" decoders, prefix-LM, encoder-
  decoder of either layout, CUDA): the package's own step model (``Model.step_model()``),
  whose ``prefill`` admits rows into the running batch and ``release`` drops them
  (runtime/steps.py; AlignedSteps joins caches with left padding). Correct and continuously
  batched, but admitting or releasing a row copies the batch's cache.

A request's tokens are what ``Model.generate_ids`` gives for its prompt alone: the same
processing order and the same random draws (its own ``numpy.random.default_rng(seed)``, one
``random()`` per token, as ``sample`` draws for one prompt); greedy rows are equal whatever
else runs (tests/test_serve.py), up to float rounding between batch sizes.

Shape letters: R rows of the pool, C tokens per row, T tokens in a call, V vocabulary,
Hkv key/value heads, Dh head size.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from . import generation as gen
from .contract import DECODER, INPUT_IDS, LOGITS, NEXT_TOKEN, NEXT_TOKEN_LOGPROB, SEQUENCE_LENGTHS
from .errors import ConfigError, InputError, OnnxformerError, RunError
from .generation import GenerationConfig
from .session_steps import aligned_zeros
from .steps import StepModel, StepResult

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    rows: int = 16  # R: requests decoded together (the KV pool's rows)
    max_queue: int = 64  # requests waiting for a row; one more is refused (QueueFull)
    prefill_tokens: int = 512  # prompt tokens into the cache between two decode steps (row pool: in pieces;
    # step-model engine: whole prompts, at least one)
    context: int | None = None  # C: tokens per row (prompt + generated); None = the package's max_seq_len

    def __post_init__(self) -> None:
        for name, minimum in (("rows", 1), ("max_queue", 0), ("prefill_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"scheduler {name} must be an integer >= {minimum}; got {value!r}")
        if self.context is not None and (not isinstance(self.context, int) or self.context < 2):
            raise ConfigError(f"scheduler context must be None or an integer >= 2; got {self.context!r}")


class QueueFull(OnnxformerError):
    """The scheduler's queue is full, or it is closing: retry later (HTTP 429 / 503)."""

    default_code = "E_BUSY"


# Events a request receives, in order: Token per generated token, then Done or Failed ------
@dataclass(frozen=True)
class Token:
    token_id: int
    text: str  # the new text this token releases (held back: an incomplete character, a stop string's start)
    logprob: float  # under the distribution the token was drawn from (the runtime's scores)
    top: tuple[tuple[int, float], ...] = ()  # the top_logprobs alternatives (id, logprob), best first


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled"
    text: str  # the whole generated text, cut at a stop string
    tail: str  # the end of text that no Token carried (what a stream sends last)
    token_ids: tuple[int, ...]
    prompt_tokens: int
    score: float  # sum of the tokens' log-probs (Generation.scores)
    queued_s: float  # submit -> prefill start
    first_token_s: float | None  # submit -> first token
    total_s: float


@dataclass(frozen=True)
class Failed:
    error: OnnxformerError


Event = Token | Done | Failed


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``config`` is resolved with the package's defaults
    (``Model.generation_config``); strategy greedy or sample, one sequence."""

    prompt: list[int]
    config: GenerationConfig
    on_event: Callable[[Event], None]  # called on the scheduler's thread; must not block
    rng: np.random.Generator | None = None  # sample: None = numpy.random.default_rng(config.seed)
    top_logprobs: int = 0  # alternatives reported with each token
    live_text: bool = True  # Token.text per token (streaming); stop strings decode per token anyway
    # set by the scheduler --------------------------------------------------------------------
    cancelled: bool = False  # set by anyone (a client gone); the row is freed at the next step boundary
    submitted: float = field(default_factory=time.perf_counter)
    _generated: list[int] = field(default_factory=list)
    _history: list[int] = field(default_factory=list)
    _limit: int = 0
    _score: float = 0.0
    _text: str = ""
    _sent: str = ""
    _stop_at: int | None = None
    _slot: int = -1
    _prefilled: int = 0  # prompt tokens in the cache
    _started: float = 0.0
    _first: float | None = None
    _feed: int = 0

    def cancel(self) -> None:
        self.cancelled = True


# Engines ------------------------------------------------------------------------------------
class RowPool:
    """Fixed KV buffers (R, Hkv, C, Dh) per layer of a decoder-only "shared" package, on CPU
    (see the module docstring); calls run views of contiguous rows."""

    def __init__(self, model: "Model", rows: int, capacity: int):
        self.model, self.rows, self.capacity = model, rows, capacity
        self.session = model.sessions[DECODER]
        dims = model.dims
        self.vocab_size = dims.vocab_size
        shape = (rows, dims.n_kv_heads, capacity, dims.d_head)  # (R, Hkv, C, Dh)
        self._present_of = {past: present for present, past in model._self_cache}
        self.buffers = {past: aligned_zeros(shape, model.float_dtype) for past in self._present_of}
        self._free = list(range(rows))  # ascending: a request takes the lowest free row
        self._busy: set[int] = set()
        self._decode: dict[int, tuple[Any, ...]] = {}  # hi -> binding and its arrays

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        taken, self._free = self._free[:count], self._free[count:]
        self._busy.update(taken)
        return taken

    def give_back(self, slot: int) -> None:
        self._busy.discard(slot)
        self._free.append(slot)
        self._free.sort()

    def _bind(self, lo: int, hi: int, ids: np.ndarray, lengths: np.ndarray) -> tuple[Any, ...]:
        """A binding of rows [lo, hi) of the buffers (views: the same memory), ids (hi-lo, T)."""
        binding = self.session.io_binding()
        for past, buffer in self.buffers.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer[lo:hi], "cpu", 0)  # (hi-lo, Hkv, C, Dh) view
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(self._present_of[past], value)  # updated in place
        n = hi - lo
        logits = aligned_zeros((n, self.vocab_size), self.model.float_dtype)  # (n, V), written by onnxruntime
        token, logprob = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
        ids_value = ort.OrtValue.ortvalue_from_numpy(ids, "cpu", 0)
        lengths_value = ort.OrtValue.ortvalue_from_numpy(lengths, "cpu", 0)
        binding.bind_ortvalue_input(INPUT_IDS, ids_value)
        binding.bind_ortvalue_input(SEQUENCE_LENGTHS, lengths_value)
        for name, array in ((LOGITS, logits), (NEXT_TOKEN, token), (NEXT_TOKEN_LOGPROB, logprob)):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0))
        return binding, ids_value, lengths_value, logits, token, logprob

    def prefill(self, lo: int, prompts: Sequence[Sequence[int]]) -> StepResult:
        """Rows lo .. lo+len(prompts)-1 start from their prompts (their caches empty)."""
        longest = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), longest), dtype=np.int64)  # (B, T) right-padded
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = prompt
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        binding, _, _, logits, token, logprob = self._bind(lo, lo + len(prompts), ids, lengths)
        self.session.run_with_iobinding(binding)
        return StepResult(logits, token, logprob)

    def extend(self, slot: int, ids: Sequence[int], length: int) -> StepResult:
        """The next piece of row ``slot``'s prompt, alone (batch 1): the row holds ``length``
        tokens afterwards."""
        tokens = np.asarray([ids], dtype=np.int64)  # (1, T)
        binding, _, _, logits, token, logprob = self._bind(slot, slot + 1, tokens, np.array([length], dtype=np.int64))
        self.session.run_with_iobinding(binding)
        return StepResult(logits, token, logprob)

    def step(self, hi: int, tokens: np.ndarray, lengths: np.ndarray) -> StepResult:
        """One token per row of [0, hi): tokens (hi,), lengths (hi,) after the step. The result
        is valid until the next step over the same hi."""
        if hi not in self._decode:
            self._decode[hi] = self._bind(0, hi, np.zeros((hi, 1), dtype=np.int64), np.ones(hi, dtype=np.int64))
        binding, ids_value, lengths_value, logits, token, logprob = self._decode[hi]
        ids_value.update_inplace(np.ascontiguousarray(tokens.reshape(hi, 1)))
        lengths_value.update_inplace(np.ascontiguousarray(lengths))
        self.session.run_with_iobinding(binding)
        return StepResult(logits, token, logprob)


class _PoolEngine:
    """The scheduler's view of a RowPool: requests by row; prompts may be prefilled in chunks."""

    chunked = True  # a prompt may enter the cache in pieces (GroupQueryAttention continues one row's prompt)

    def __init__(self, model: "Model", rows: int, capacity: int):
        self.pool = RowPool(model, rows, capacity)
        self._lengths = np.zeros(rows, dtype=np.int64)  # tokens in each row's cache; 0 for a free row

    def admit(self, requests: list[Request]) -> None:
        for request, slot in zip(requests, self.pool.take(len(requests))):
            request._slot = slot
            self._lengths[slot] = 0

    def prefill(self, work: list[tuple[Request, int]]) -> list[tuple[Request, StepResult, int]]:
        """Bring each request's cache to ``end`` prompt tokens; (request, result, its row) each.
        First pieces run together (neighbouring rows in one call, their caches empty); a later
        piece of a prompt runs alone on its row (batch 1 with a cache: what the graph takes)."""
        later = [(r, end) for r, end in work if r._prefilled > 0]
        first = sorted([(r, end) for r, end in work if r._prefilled == 0], key=lambda item: item[0]._slot)
        out, start = [], 0
        while start < len(first):  # runs of neighbouring rows, one call each
            stop = start + 1
            while stop < len(first) and first[stop][0]._slot == first[stop - 1][0]._slot + 1:
                stop += 1
            run = first[start:stop]
            result = self.pool.prefill(run[0][0]._slot, [r.prompt[:end] for r, end in run])
            out += [(r, result, i) for i, (r, _) in enumerate(run)]
            start = stop
        for request, end in later:
            out.append((request, self.pool.extend(request._slot, request.prompt[request._prefilled:end], end), 0))
        for request, end in work:
            request._prefilled = end
            self._lengths[request._slot] = end
        return out

    def step(self, requests: list[Request]) -> tuple[StepResult, list[int]]:
        hi = 1 + max(r._slot for r in requests)
        tokens = np.zeros(hi, dtype=np.int64)
        # A row inside [0, hi) that is not running is fed a pad one past its cache: it writes the
        # column its next prompt piece (or a free row's first prefill) overwrites.
        lengths = self._lengths[:hi] + 1
        for r in requests:
            tokens[r._slot] = r._feed
            self._lengths[r._slot] += 1
        return self.pool.step(hi, tokens, lengths), [r._slot for r in requests]

    def leave(self, request: Request) -> None:
        if request._slot != -1:
            self.pool.give_back(request._slot)
            self._lengths[request._slot] = 0
            request._slot = -1


class StepEngine:
    """Any package's step model as the scheduler's engine: prefill admits rows at the end of
    the running batch (whole prompts: a prefix-LM prompt is one bidirectional block), release
    drops rows (the others keep their order)."""

    chunked = False

    def __init__(self, model: "Model", rows: int, capacity: int):
        self.steps: StepModel = model.step_model(capacity=capacity)
        self._order: list[Request] = []  # running row r is self._order[r]

    def admit(self, requests: list[Request]) -> None:
        pass

    def prefill(self, work: list[tuple[Request, int]]) -> list[tuple[Request, StepResult, int]]:
        requests = [r for r, _ in work]
        result = self.steps.prefill([r.prompt for r in requests])
        result = result.take(np.arange(len(requests)))  # a copy: the next call may reuse the buffers
        for request in requests:
            request._prefilled = len(request.prompt)
        self._order += requests
        return [(r, result, i) for i, r in enumerate(requests)]

    def step(self, requests: list[Request]) -> tuple[StepResult, list[int]]:
        row = {id(r): i for i, r in enumerate(self._order)}
        tokens = np.array([r._feed for r in self._order], dtype=np.int64)
        result = self.steps.advance(tokens).take(np.arange(len(tokens)))  # a copy: a prefill follows before it is read
        return result, [row[id(r)] for r in requests]

    def leave(self, request: Request) -> None:
        index = next((i for i, r in enumerate(self._order) if r is request), None)
        if index is not None:  # admitted and prefilled
            self.steps.release([index])
            del self._order[index]


def uses_row_pool(model: "Model") -> bool:
    """The fixed-buffer engine applies: a decoder-only "shared" package on CPU."""
    return model.manifest.kv_cache == "shared" and model.arch == "decoder" and model.device == "cpu"


# The scheduler ------------------------------------------------------------------------------
class Scheduler:
    """One thread that admits, decodes and retires requests of one package (module docstring)."""

    def __init__(self, model: "Model", config: SchedulerConfig | None = None):
        if not model.can_generate:
            raise InputError(f"a scheduler needs a generating package; {model.directory.name} is a {model.arch!r} "
                             "model", code="E_WRONG_KIND")
        self.model, self.config = model, config or SchedulerConfig()
        limit = model.manifest.max_seq_len
        self.context = min(self.config.context or limit, limit)  # C
        self.engine_name = "row-pool" if uses_row_pool(model) else "step-model"
        self.engine = self._new_engine()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # decoding: one token per step
        self._prefilling: list[Request] = []  # admitted: a row, the prompt (partly) not yet in the cache
        self._cv = threading.Condition()
        self._closing = False
        self.generated_tokens = 0  # counters for /metrics
        self.steps_run = 0
        self.cancelled_requests = 0
        self._thread = threading.Thread(target=self._loop, name=f"onnxformer-scheduler-{model.directory.name}",
                                        daemon=True)
        self._thread.start()
        log.info("scheduler for %s: %s engine, %d rows of %d tokens", model.directory, self.engine_name,
                 self.config.rows, self.context)

    def _new_engine(self) -> "_PoolEngine | StepEngine":
        engine = _PoolEngine if self.engine_name == "row-pool" else StepEngine
        return engine(self.model, self.config.rows, self.context)

    # what callers see ------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in use: decoding, or their prompt entering the cache."""
        return len(self._running) + len(self._prefilling)

    def check(self, prompt: Sequence[int], config: GenerationConfig) -> list[int]:
        """The prompt checked as ``Model.generate_ids`` checks it, and against the row's
        capacity C: InputError / ConfigError (before anything is queued)."""
        if config.strategy not in ("greedy", "sample"):
            raise ConfigError(f"the scheduler runs strategy 'greedy' or 'sample'; got {config.strategy!r}. "
                              f"Pass {gen.option('strategy', 'greedy')} or 'sample'")
        if config.num_return_sequences != 1:
            raise ConfigError(f"a scheduler request is one sequence; got num_return_sequences="
                              f"{config.num_return_sequences}. Submit one request per sequence")
        [row] = self.model._check_ids([prompt], config)
        rows_tokens = 1 + config.max_new_tokens if self.model.arch == "encoder-decoder" else len(row) + config.max_new_tokens
        if rows_tokens > self.context:
            raise InputError(f"prompt of {len(row)} tokens + max_tokens {config.max_new_tokens} exceeds the "
                             f"server's context of {self.context} tokens per request; shorten the prompt or lower "
                             "max_tokens", code="E_TOO_LONG")
        return row

    def submit(self, request: Request) -> Request:
        """Queue a request (checked with :meth:`check` first); QueueFull when the queue is
        full or the scheduler is closing."""
        request.prompt = self.check(request.prompt, request.config)
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down; retry on another instance")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting for "
                                f"{self.config.rows} rows); retry later")
            request.submitted = time.perf_counter()
            self._waiting.append(request)
            self._cv.notify()
        return request

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish the queued and running ones (at most ``timeout``
        seconds, then the rest are cancelled), then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                for request in (*self._waiting, *self._running, *self._prefilling):
                    request.cancel()
                self._cv.notify()
            self._thread.join(10)

    # the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._busy and not self._closing:
                    self._cv.wait()
                if self._closing and not self._waiting and not self._busy:
                    return
                admitted = self._admissions()
            try:
                self._iterate(admitted)
            except Exception as err:  # noqa: BLE001 - onnxruntime failing mid-batch: fail the batch, keep serving
                if isinstance(err, OnnxformerError):
                    error = err
                else:
                    log.exception("scheduler step failed")
                    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                    error = RunError(f"onnxruntime failed while running the generation graphs: {first}")
                for request in {id(r): r for r in (*admitted, *self._running, *self._prefilling)}.values():
                    self._send(request, Failed(error))
                self._running, self._prefilling = [], []
                self.engine = self._new_engine()  # fresh buffers: the old ones may be half-written

    @property
    def _busy(self) -> bool:
        return bool(self._running or self._prefilling)

    def _admissions(self) -> list[Request]:
        """Waiting requests that get a row now (cancelled ones are dropped)."""
        admitted = []
        free = self.config.rows - len(self._running) - len(self._prefilling)
        while self._waiting and len(admitted) < free:
            request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
            else:
                admitted.append(request)
        return admitted

    def _iterate(self, admitted: list[Request]) -> None:
        """Admit; cancelled rows leave; one decode step for the running rows; then prompt tokens
        into the cache, at most ``prefill_tokens`` of them (older prompts first; a prompt is
        cut into pieces where the engine allows it, else one whole prompt at least): after the
        step, as a row that is not running inside the step's range is written by it; then
        every row with fresh logits picks its token."""
        now = time.perf_counter()
        self.engine.admit(admitted)
        for request in admitted:
            request._started = now
            start = self._sequence_start(request.prompt)
            request._history = list(start)
            [request._limit] = gen.new_token_limits([start], request.config)
            if request._limit == 0:  # nothing to generate: no model call (as generate())
                self._leave(request, "length")
            else:
                self._prefilling.append(request)
        for group in (self._running, self._prefilling):
            for request in [r for r in group if r.cancelled]:
                group.remove(request)
                self._leave(request, "cancelled")
        ready = []
        if self._running:
            result, rows = self.engine.step(self._running)
            self.steps_run += 1
            ready = [(request, result, row) for request, row in zip(self._running, rows)]
        work, budget = [], self.config.prefill_tokens
        for request in self._prefilling:
            remaining = len(request.prompt) - request._prefilled
            if budget <= 0 or (not self.engine.chunked and work and remaining > budget):
                break
            take = min(remaining, budget) if self.engine.chunked else remaining
            work.append((request, request._prefilled + take))
            budget -= take
        if work:
            ready += [(r, result, row) for r, result, row in self.engine.prefill(work) if r._prefilled == len(r.prompt)]
            self._prefilling = [r for r in self._prefilling if r._prefilled < len(r.prompt)]
        self._running = [request for request, result, row in ready if self._choose(request, result, row)]

    def _sequence_start(self, prompt: list[int]) -> list[int]:
        if self.model.arch == "encoder-decoder":
            return [self.model.manifest.special("decoder_start")]
        return list(prompt)

    def _choose(self, request: Request, result: StepResult, row: int) -> bool:
        """Pick the request's next token from its row of ``result``, send it, and say whether
        the request goes on (else it has left)."""
        if request.cancelled:
            self._leave(request, "cancelled")
            return False
        config, t = request.config, len(request._generated)
        eos = config.eos_token_ids
        plain = (config.strategy == "greedy" and config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
                 and (t >= config.min_new_tokens or not eos) and not request.top_logprobs
                 and not (config.forced_bos_token_id >= 0 and t == 0)
                 and not (config.forced_eos_token_id and t == request._limit - 1))
        token = logprob = None
        if plain:  # the graph's own greedy choice, as generate() takes it
            token, logprob = int(result.next_token[row]), float(result.next_logprob[row])
            if not np.isfinite(logprob):
                token = None
        top: tuple[tuple[int, float], ...] = ()
        if token is None:
            logits = result.logits[row:row + 1]  # (1, V)
            processed = gen.process_logits(logits, [request._history], config, t, [request._limit])
            if config.strategy == "sample":
                if request.rng is None:
                    request.rng = np.random.default_rng(config.seed)
                dist = gen.sampling_filters(processed, config)
                tokens = gen.sample_tokens(dist, request.rng)
                logprobs = gen.log_softmax(dist)[0]  # (V,)
                token = int(tokens[0])
                logprob = float(logprobs[token])
            else:
                tokens, chosen = gen.greedy_choice(processed)
                token, logprob = int(tokens[0]), float(chosen[0])
                logprobs = gen.log_softmax(processed)[0] if request.top_logprobs else None
            if request.top_logprobs:
                best = np.argsort(-logprobs, kind="stable")[:request.top_logprobs]
                top = tuple((int(i), float(logprobs[i])) for i in best)
        if request._first is None:
            request._first = time.perf_counter()
        request._generated.append(token)
        request._history.append(token)
        request._score += logprob
        self.generated_tokens += 1
        reason = None
        if token in eos:
            reason = "eos"
        decode = self.model._decode
        delta = ""
        if config.stop_strings or request.live_text:
            request._text = decode(request._generated)
            stop = gen.find_stop(request._text, config.stop_strings) if config.stop_strings else None
            if stop is not None and reason is None:
                reason, request._stop_at = "stop", stop
            if reason is None:
                stable = gen.stable_text(request._text, config.stop_strings)
                if len(stable) > len(request._sent) and stable.startswith(request._sent):
                    delta = stable[len(request._sent):]
                    request._sent = stable
        if reason is None and len(request._generated) >= request._limit:
            reason = "length"
        self._send(request, Token(token, delta, logprob, top))
        if reason is not None:
            self._leave(request, reason)
            return False
        request._feed = token
        return True

    @staticmethod
    def _send(request: Request, event: Event) -> None:
        """Deliver an event; a receiver that fails (its client's event loop closed) cancels its own
        request and nothing else."""
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - the receiver's bug or a closed loop must not stop the batch
            log.exception("a request's event receiver failed; cancelling the request")
            request.cancel()

    def _leave(self, request: Request, reason: str) -> None:
        self.engine.leave(request)
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        self.cancelled_requests += reason == "cancelled"
        if request._stop_at is not None:
            text = request._text[:request._stop_at]
        else:
            text = self.model._decode(request._generated)
        now = time.perf_counter()
        started = request._started or now
        tail = text[len(request._sent):] if text.startswith(request._sent) else text[len(
            os.path.commonprefix([request._sent, text])):]  # decode() revised sent text: the rest from where they differ
        self._send(request, Done(reason, text, tail, tuple(request._generated), len(request.prompt), request._score,
                              started - request.submitted,
                              None if request._first is None else request._first - request.submitted,
                              now - request.submitted))


__all__ = ["SchedulerConfig", "Scheduler", "Request", "Token", "Done", "Failed", "QueueFull", "RowPool",
           "StepEngine", "uses_row_pool"]
