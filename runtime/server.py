"""`onnxformer serve`: an OpenAI-compatible HTTP server over packages, with continuous batching
(runtime/scheduler.py). Torch-free; starlette, uvicorn and prometheus_client are the optional
`serve` extra (``pip install 'onnxformer[serve]'``), imported on first use.

    onnxformer serve artifacts/decoder enc=artifacts/encoder --port 8000 [--api-key KEY]

Routes (request and answer fields as OpenAI's; every answer carries ``usage``):

    POST /v1/completions        decoder, prefix-LM and encoder-decoder packages; the prompt is sent
                                as given (text with the tokenizer's special-token template, or
                                token ids): no prompt format
    POST /v1/chat/completions   the package's chat template (runtime/chat.py); a package without one
                                takes a single user message, in its prompt format when it has one
                                (the answer's header ``x-onnxformer-chat`` says which)
    POST /v1/embeddings         encoder packages (the package's pooling and normalisation)
    POST /v1/classify           encoder packages with a classifier (our own): {"model", "input":
                                text or texts} -> data[i] = {"index", "label", "score", "probabilities"}
    GET  /v1/models, /health, /metrics (Prometheus text: onnxformer_queue_depth, _running_rows,
         _tokens_per_second, _generated_tokens_total, _cancelled_requests_total per model;
         _time_to_first_token_seconds, _time_per_output_token_seconds, _request_latency_seconds
         histograms; _requests_total by route and status)

Sampling: ``temperature`` 0 is greedy, > 0 samples; unset, the package's default strategy
(greedy for our packages), or sampling at temperature 1 when ``top_p`` / ``top_k`` are given.
``top_k`` and ``min_tokens`` (eos is suppressed until that many tokens: the runtime's
``min_new_tokens``) are extensions, as in vLLM. ``n`` > 1 needs sampling; choice j > 0 draws from ``default_rng([seed, j])``, choice 0 from
``default_rng(seed)``, the same numbers as ``Model.generate(..., seed=seed)`` alone.
``logprobs`` are the log-probabilities under the distribution the token was drawn from (after
temperature, top-k, top-p: the runtime's scores). A field the server does not implement is a
400 naming it (E_UNKNOWN_PARAMETER), never ignored.

Errors are ``{"error": {"message", "type", "code", "param"}}`` with the project's codes
(runtime/errors.py): 400 for bad input (E_INPUT, E_CONFIG, E_TOO_LONG, ...), 401 E_UNAUTHORIZED,
404 E_NOT_FOUND, 413 E_TOO_LONG (body), 429 E_BUSY with Retry-After (queue full), 503 E_BUSY
(shutting down), 500 E_RUN. SIGTERM stops accepting, lets in-flight requests finish (at most
``--drain-timeout`` seconds), then exits.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import numpy as np

from .errors import ConfigError, InputError, OnnxformerError
from .scheduler import Done, Failed, QueueFull, Request, Scheduler, SchedulerConfig, Token

log = logging.getLogger(__name__)

SERVE_EXTRA = "pip install 'onnxformer[serve]'"
API_KEY_ENV = "ONNXFORMER_API_KEY"
MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = {"completions": 5, "chat": 20}


@dataclass(frozen=True)
class ServeConfig:
    rows: int = 16  # rows decoded together per package (the scheduler's KV pool)
    max_queue: int = 64  # requests waiting per package; one more gets 429
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps
    context: int | None = None  # tokens per request (prompt + max_tokens); None = the package's max_seq_len
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    api_key: str | None = None  # bearer token required on every route but /health

    def __post_init__(self) -> None:
        for name, minimum in (("max_tokens", 1), ("max_body_bytes", 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"serve {name} must be an integer >= {minimum}; got {value!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError(f"the API key is empty; pass a non-empty --api-key or unset {API_KEY_ENV}")

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(rows=self.rows, max_queue=self.max_queue, prefill_tokens=self.prefill_tokens,
                               context=self.context)


class ApiError(Exception):
    """An HTTP error answer: status, message, code (runtime/errors.py CODES), the field."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, err: OnnxformerError, param: str | None = None) -> "ApiError":
        if isinstance(err, QueueFull):
            closing = "shutting down" in err.message
            return cls(503 if closing else 429, err.message, err.code, headers={"Retry-After": "1"})
        status = {"E_RUN": 500, "E_NOT_FOUND": 404, "E_UNAUTHORIZED": 401}.get(err.code, 400)
        return cls(status, err.message, err.code, param)

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


class _Inbox:
    """Events from the scheduler's thread to the event loop's queues, handed over in batches: one
    wake-up of the loop per batch (a step's tokens for every row), not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.scheduled = loop, [], False
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, choice: Any, event: Any) -> None:  # on the scheduler's thread
        with self.lock:
            self.items.append((queue, choice, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # on the loop
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, choice, event in items:
            queue.put_nowait((choice, event))


class _Inboxes:
    def __init__(self):
        self.by_loop: dict[int, _Inbox] = {}

    def get(self, loop: asyncio.AbstractEventLoop) -> _Inbox:
        inbox = self.by_loop.get(id(loop))
        if inbox is None or inbox.loop is not loop:
            inbox = self.by_loop[id(loop)] = _Inbox(loop)
        return inbox


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


# Served packages -------------------------------------------------------------------------------
@dataclass
class Served:
    name: str
    model: Any  # onnxformer.runtime.Model
    scheduler: Scheduler | None  # generating packages

    @property
    def chat_mode(self) -> str | None:
        """How /v1/chat/completions renders a conversation: "template", "prompt_format", "raw"."""
        if self.scheduler is None:
            return None
        if self.model.chat_template is not None:
            return "template"
        return "prompt_format" if self.model.prompt_format is not None else "raw"

    def describe(self) -> dict[str, Any]:
        m = self.model
        routes = (["/v1/completions", "/v1/chat/completions"] if self.scheduler else
                  ["/v1/embeddings"] + (["/v1/classify"] if m.can_classify else []))
        fmt = m.prompt_format.template if m.prompt_format is not None else None
        return {"id": self.name, "object": "model", "created": int(m.directory.stat().st_mtime),
                "owned_by": "onnxformer", "arch": m.arch, "kv_cache": m.manifest.kv_cache,
                "max_seq_len": m.manifest.max_seq_len, "routes": routes, "chat": self.chat_mode,
                "prompt_format": fmt, "engine": self.scheduler.engine_name if self.scheduler else None}


def parse_packages(specs: list[str]) -> dict[str, Path]:
    """``PACKAGE`` or ``NAME=PACKAGE`` each -> {name: path}; a bare package is named by its folder."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise InputError(f"a package is PACKAGE or NAME=PACKAGE; got {spec!r}")
        if name in out:
            raise InputError(f"two packages are named {name!r}; give one another name (NAME=PACKAGE)")
        out[name] = Path(path)
    if not out:
        raise InputError("serve needs at least one package: onnxformer serve PACKAGE [NAME=PACKAGE ...]")
    return out


def load_served(packages: Mapping[str, Path], config: ServeConfig, **load_options: Any) -> dict[str, Served]:
    from .model import load

    served = {}
    for name, path in packages.items():
        model = load(path, **load_options)
        scheduler = Scheduler(model, config.scheduler()) if model.can_generate else None
        served[name] = Served(name, model, scheduler)
    return served


# Request fields -----------------------------------------------------------------------------
COMMON_FIELDS = {"model", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs",
                 "stream", "stream_options"}
FIELDS = {
    "completions": COMMON_FIELDS | {"prompt"},
    "chat": COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens"},
    "embeddings": {"model", "input", "encoding_format"},
    "classify": {"model", "input"},
}


def _check_fields(body: Any, kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {type(body).__name__}", "E_INPUT")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise ApiError(400, f"unsupported field(s) {', '.join(map(repr, unknown))}; this server takes "
                            f"{', '.join(sorted(FIELDS[kind]))}", "E_UNKNOWN_PARAMETER", unknown[0])
    return {k: v for k, v in body.items() if v is not None}  # null = not given, as OpenAI's API


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}]; got {value!r:.40}", "E_CONFIG", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name} must be an integer {bound}; got {value!r:.40}", "E_CONFIG", name)
    return value


@dataclass(frozen=True)
class Sampling:
    overrides: dict[str, Any]  # GenerationConfig fields
    n: int
    top_logprobs: int | None  # None: no logprobs
    stream: bool
    include_usage: bool


def _sampling(body: dict, kind: str, served: Served, config: ServeConfig) -> Sampling:
    overrides: dict[str, Any] = {}
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, max_name, 1)
    if max_tokens is not None:
        if max_tokens > config.max_tokens:
            raise ApiError(400, f"{max_name} ({max_tokens}) is above this server's limit of {config.max_tokens}; "
                                f"pass {config.max_tokens} or less", "E_TOO_LONG", max_name)
        overrides["max_new_tokens"] = max_tokens
    min_tokens = _integer(body, "min_tokens", 0, max_tokens if max_tokens is not None else config.max_tokens)
    if min_tokens:
        overrides["min_new_tokens"] = min_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be in (0, 1]; got 0. Pass temperature 0 for greedy decoding", "E_CONFIG", "top_p")
    top_k = _integer(body, "top_k", 0)
    seed = _integer(body, "seed", 0)
    if temperature == 0.0:
        overrides["strategy"] = "greedy"
    elif temperature is not None or (top_p is not None and top_p < 1) or top_k:
        overrides.update(strategy="sample", temperature=1.0 if temperature is None else temperature)
    for name, value in (("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            overrides[name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP}; got {stop!r:.80}",
                           "E_CONFIG", "stop")
        if stops:
            overrides["stop_strings"] = tuple(stops)
    n = _integer(body, "n", 1, MAX_N) or 1
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false; got {stream!r:.40}", "E_CONFIG", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options needs stream: true", "E_CONFIG", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, f"stream_options takes only include_usage (true or false); got {options!r:.80}",
                           "E_CONFIG", "stream_options")
        include_usage = options.get("include_usage", False)
    top = None
    if kind == "completions":
        top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS[kind])
    else:
        wanted = body.get("logprobs", False)
        if not isinstance(wanted, bool):
            raise ApiError(400, f"logprobs must be true or false; got {wanted!r:.40}", "E_CONFIG", "logprobs")
        count = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS[kind])
        if count is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", "E_CONFIG", "top_logprobs")
        top = (count or 0) if wanted else None
    try:
        resolved = served.model.generation_config(**overrides)
    except OnnxformerError as err:
        raise ApiError.of(err) from None
    if n > 1 and resolved.strategy != "sample":
        raise ApiError(400, f"n ({n}) > 1 needs sampling (greedy gives n equal answers); pass a temperature > 0, "
                            "or n 1", "E_CONFIG", "n")
    return Sampling(overrides, n, top, stream, include_usage)


def _prompts(body: dict, served: Served) -> list[list[int]]:
    """/v1/completions' prompt: text, texts, token ids or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, f"prompt must be a string, a list of strings or a list of token ids; got {prompt!r:.60}",
                       "E_INPUT", "prompt")
    if all(isinstance(p, str) for p in prompt):
        try:
            return served.model.encode(prompt)
        except OnnxformerError as err:
            raise ApiError.of(err, "prompt") from None
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   "E_INPUT", "prompt")


def _chat_prompt(body: dict, served: Served) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty list of {{role, content}} objects; got {messages!r:.60}",
                       "E_INPUT", "messages")
    model = served.model
    try:
        if served.chat_mode == "template":
            return model.render_chat(messages).token_ids
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if len(messages) != 1 or len(users) != 1 or not isinstance(users[0].get("content"), str) \
                or set(users[0]) - {"role", "content"}:
            how = f"in its prompt format {model.prompt_format.template!r}" if served.chat_mode == "prompt_format" else "as is"
            raise ApiError(400, f"{served.name} has no chat template: it answers one user message {{\"role\": \"user\", "
                                f"\"content\": text}}, put {how}; got {len(messages)} message(s)", "E_INPUT", "messages")
        text = users[0]["content"]
        if served.chat_mode == "prompt_format":
            text = model.prompt_format.format(text)
        return model.encode([text])[0]
    except OnnxformerError as err:
        raise ApiError.of(err, "messages") from None


# Answers -----------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class _Strip:
    """PromptFormat.parse on a stream of deltas, one delta at a time (leading whitespace dropped,
    trailing whitespace held until more text follows)."""

    def __init__(self, strip: bool):
        self.strip, self.started, self.held = strip, False, ""

    def push(self, piece: str) -> str:
        if not self.strip:
            return piece
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        return body


class _Choice:
    """One sequence being generated: its scheduler request and what it has produced."""

    def __init__(self, index: int, prompt: list[int], strip: bool):
        self.index, self.prompt = index, prompt
        self.strip = _Strip(strip)
        self.tokens: list[Token] = []
        self.text = ""
        self.done: Done | None = None
        self.request: Request | None = None


def _token_text(model: Any, token_id: int) -> str:
    return model.tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(model: Any, tokens: list[Token], offset: int) -> dict[str, Any]:
    texts = [_token_text(model, t.token_id) for t in tokens]
    offsets = np.cumsum([0] + [len(t) for t in texts[:-1]]).tolist() if texts else []
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(model, i): lp for i, lp in t.top} for t in tokens],
            "text_offset": [offset + o for o in offsets]}


def _chat_logprobs(model: Any, tokens: list[Token]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(model, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompts = {id(c.prompt): len(c.prompt) for c in choices}
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


# The app -----------------------------------------------------------------------------------
class _Metrics:
    def __init__(self, served: Mapping[str, Served]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("onnxformer_requests", "HTTP requests answered", ["route", "status"], registry=registry)
        self.ttft = Histogram("onnxformer_time_to_first_token_seconds", "submit -> first token", ["model"],
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=registry)
        self.latency = Histogram("onnxformer_request_latency_seconds", "request received -> answer complete",
                                 ["route"], buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=registry)
        self.per_token = Histogram("onnxformer_time_per_output_token_seconds", "decode time per token after the first",
                                   ["model"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1),
                                   registry=registry)
        registry.register(_SchedulerCollector(served))

    def done(self, model: str, done: Done) -> None:
        if done.first_token_s is not None:
            self.ttft.labels(model=model).observe(done.first_token_s)
            if len(done.token_ids) > 1:
                self.per_token.labels(model=model).observe((done.total_s - done.first_token_s) / (len(done.token_ids) - 1))


class _SchedulerCollector:
    """What the schedulers count, read at each scrape: queue depth, running rows, tokens generated
    (cancelled requests' included), cancelled requests, and tokens/s since the previous scrape."""

    def __init__(self, served: Mapping[str, Served]):
        self.schedulers = {name: s.scheduler for name, s in served.items() if s.scheduler is not None}
        self.last = {name: (time.monotonic(), 0) for name in self.schedulers}
        self.rate = {name: 0.0 for name in self.schedulers}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        queue = GaugeMetricFamily("onnxformer_queue_depth", "requests waiting for a row", labels=["model"])
        running = GaugeMetricFamily("onnxformer_running_rows", "rows being decoded", labels=["model"])
        rate = GaugeMetricFamily("onnxformer_tokens_per_second", "tokens generated per second since the previous "
                                 "scrape (at least 1 s before)", labels=["model"])
        tokens = CounterMetricFamily("onnxformer_generated_tokens", "tokens generated", labels=["model"])
        cancelled = CounterMetricFamily("onnxformer_cancelled_requests", "requests cancelled (their client went away)",
                                        labels=["model"])
        now = time.monotonic()
        for name, scheduler in self.schedulers.items():
            count = scheduler.generated_tokens
            then, before = self.last[name]
            if now - then >= 1.0:
                self.rate[name] = (count - before) / (now - then)
                self.last[name] = (now, count)
            queue.add_metric([name], scheduler.waiting)
            running.add_metric([name], scheduler.running)
            rate.add_metric([name], self.rate[name])
            tokens.add_metric([name], count)
            cancelled.add_metric([name], scheduler.cancelled_requests)
        yield from (queue, running, rate, tokens, cancelled)


def create_app(served: Mapping[str, Served], config: ServeConfig):
    """The starlette app over loaded packages. Its lifespan closes the schedulers."""
    try:
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError as err:
        raise ConfigError(f"onnxformer serve needs the serve extra ({err.name} is missing): {SERVE_EXTRA}") from None

    metrics = _Metrics(served)
    state = {"draining": False}
    inboxes = _Inboxes()

    def error_response(err: ApiError, route: str) -> Response:
        metrics.requests.labels(route=route, status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def authorized(request) -> bool:
        if config.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), config.api_key.encode())

    async def read_json(request) -> Any:
        length = request.headers.get("content-length")
        limit = config.max_body_bytes
        too_big = ApiError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                           "E_TOO_LONG")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object", "E_INPUT") from None

    def lookup(body: dict, want: str) -> Served:
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, f"model must be the name of a served package ({', '.join(served)}); got {name!r:.40}",
                           "E_INPUT", "model")
        if name not in served:
            raise ApiError(404, f"no model {name!r} on this server; served: {', '.join(served)}", "E_NOT_FOUND", "model")
        s = served[name]
        ok = {"generate": s.scheduler is not None, "embed": "encoder" in s.model.sessions,
              "classify": s.model.can_classify}[want]
        if not ok:
            raise ApiError(400, f"model {name!r} is a {s.model.arch!r} package: it cannot {want}; "
                                f"{s.describe()['routes']} are its routes", "E_WRONG_KIND", "model")
        return s

    def endpoint(route: str, handler):
        async def wrapped(request):
            started = time.perf_counter()
            try:
                if not authorized(request):
                    raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                                   "E_UNAUTHORIZED", headers={"WWW-Authenticate": "Bearer"})
                response = await handler(request)
            except ApiError as err:
                return error_response(err, route)
            except OnnxformerError as err:
                return error_response(ApiError.of(err), route)
            except (ClientDisconnect, ClientGone):
                metrics.requests.labels(route=route, status="499").inc()
                return Response(status_code=499)
            metrics.requests.labels(route=route, status=str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):
                metrics.latency.labels(route=route).observe(time.perf_counter() - started)
            return response

        return wrapped

    # generation ------------------------------------------------------------------------------
    async def generate(request, kind: str) -> Response:
        received = time.perf_counter()
        body = _check_fields(await read_json(request), kind)
        s = lookup(body, "generate")
        sampling = _sampling(body, kind, s, config)
        prompts = _prompts(body, s) if kind == "completions" else [_chat_prompt(body, s)]
        strip = kind == "chat" and s.chat_mode == "prompt_format" and s.model.prompt_format.strip
        inbox = inboxes.get(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()
        choices = [_Choice(p * sampling.n + j, prompt, strip) for p, prompt in enumerate(prompts)
                   for j in range(sampling.n)]
        gen_config = s.model.generation_config(**sampling.overrides)
        try:
            for choice in choices:
                j = choice.index % sampling.n
                seed = gen_config.seed
                rng = (np.random.default_rng(seed if j == 0 else [seed, j]) if seed is not None else None) \
                    if gen_config.strategy == "sample" else None
                choice.request = s.scheduler.submit(Request(
                    choice.prompt, gen_config,
                    on_event=functools.partial(inbox.put, events, choice),
                    rng=rng, top_logprobs=sampling.top_logprobs or 0, live_text=sampling.stream))
        except OnnxformerError as err:
            for choice in choices:
                if choice.request is not None:
                    choice.request.cancel()
            raise ApiError.of(err, "prompt" if kind == "completions" else "messages") from None
        ident = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        headers = {"x-onnxformer-chat": s.chat_mode} if kind == "chat" else {}
        if sampling.stream:
            stream = _stream(kind, s, choices, events, sampling, ident, created, metrics, received)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"},
                                     background=BackgroundTask(_cancel_unfinished, choices))
        try:
            await _collect(choices, events, request, metrics, s.name)
        finally:
            for choice in choices:
                if choice.done is None and choice.request is not None:
                    choice.request.cancel()  # the client is gone: free the rows
        out = []
        for c in choices:
            text = c.strip.push(c.done.text) if strip else c.done.text
            entry: dict[str, Any] = {"index": c.index, "finish_reason": FINISH[c.done.finish_reason]}
            if kind == "completions":
                entry["text"] = text
                entry["logprobs"] = None if sampling.top_logprobs is None else _completion_logprobs(s.model, c.tokens, 0)
            else:
                entry["message"] = {"role": "assistant", "content": text}
                entry["logprobs"] = None if sampling.top_logprobs is None else _chat_logprobs(s.model, c.tokens)
            out.append(entry)
        answer = {"id": ident, "object": "text_completion" if kind == "completions" else "chat.completion",
                  "created": created, "model": s.name, "choices": out, "usage": _usage(choices)}
        return JSONResponse(answer, headers=headers)

    async def completions(request) -> Response:
        return await generate(request, "completions")

    async def chat(request) -> Response:
        return await generate(request, "chat")

    # encoders --------------------------------------------------------------------------------
    def _texts(body: dict) -> list[str]:
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"input must be a string or a non-empty list of strings; got {texts!r:.60}",
                           "E_INPUT", "input")
        return texts

    def _tokens(s: Served, texts: list[str]) -> int:
        return sum(len(e.ids) for e in s.model.tokenizer.encode_batch(texts))

    async def embeddings(request) -> Response:
        body = _check_fields(await read_json(request), "embeddings")
        s = lookup(body, "embed")
        texts = _texts(body)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64'; got {fmt!r:.40}", "E_CONFIG",
                           "encoding_format")
        vectors = await run_in_threadpool(s.model.embed, texts)  # (B, D)
        data = []
        for i, v in enumerate(np.asarray(vectors, dtype=np.float32)):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = _tokens(s, texts)
        return JSONResponse({"object": "list", "model": s.name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(request) -> Response:
        body = _check_fields(await read_json(request), "classify")
        s = lookup(body, "classify")
        texts = _texts(body)
        results = await run_in_threadpool(s.model.classify, texts)
        data = [{"index": i, "label": r.label, "score": r.score, "probabilities": r.probabilities}
                for i, r in enumerate(results)]
        tokens = _tokens(s, texts)
        return JSONResponse({"object": "list", "model": s.name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # the rest --------------------------------------------------------------------------------
    async def models(request) -> Response:
        return JSONResponse({"object": "list", "data": [s.describe() for s in served.values()]})

    async def health(request) -> Response:
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(served)})

    async def metrics_route(request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request, exc) -> Response:
        err = ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models", "E_NOT_FOUND")
        if getattr(exc, "status_code", 404) == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", "E_INPUT")
        return JSONResponse(err.body(), status_code=err.status)

    async def health_open(request) -> Response:  # /health needs no key
        return await health(request)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        state["draining"] = True
        for s in served.values():
            if s.scheduler is not None:
                await run_in_threadpool(s.scheduler.close, config.drain_timeout)

    routes = [
        Route("/v1/completions", endpoint("/v1/completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", chat), methods=["POST"]),
        Route("/v1/embeddings", endpoint("/v1/embeddings", embeddings), methods=["POST"]),
        Route("/v1/classify", endpoint("/v1/classify", classify), methods=["POST"]),
        Route("/v1/models", endpoint("/v1/models", models), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", metrics_route), methods=["GET"]),
        Route("/health", health_open, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.serve = state  # {"draining": bool}: set by SIGTERM (serve()) and the lifespan's end
    return app


def _cancel_unfinished(choices: list[_Choice]) -> None:
    """After a stream's response (also one cut short before its first chunk): free the rows of
    the choices still generating."""
    for choice in choices:
        if choice.done is None and choice.request is not None:
            choice.request.cancel()


async def _collect(choices: list[_Choice], events: asyncio.Queue, request: Any, metrics: _Metrics, model: str) -> None:
    """Wait for every choice's Done; a client gone (checked every 0.1 s) stops the wait."""
    pending = len(choices)
    while pending:
        try:
            choice, event = await asyncio.wait_for(events.get(), timeout=0.1)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None
            continue
        pending -= _apply(choice, event, metrics, model)


def _apply(choice: _Choice, event: Any, metrics: _Metrics, model: str) -> int:
    """Record one event; 1 when the choice is done."""
    if isinstance(event, Token):
        choice.tokens.append(event)
        return 0
    if isinstance(event, Failed):
        raise ApiError.of(event.error)
    choice.done = event
    metrics.done(model, event)
    return 1


async def _stream(kind: str, s: Served, choices: list[_Choice], events: asyncio.Queue, sampling: Sampling,
                  ident: str, created: int, metrics: _Metrics, received: float) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta (stop strings and incomplete characters held
    back by the scheduler), a last chunk per choice with its finish_reason, the usage chunk when
    asked, then [DONE]. A client gone cancels the generator: the rows are freed at the next step."""
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"

    def chunk(choice_entries: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": s.name,
                                   "choices": choice_entries}
        if sampling.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def entry(c: _Choice, text: str, tokens: list[Token], finish: str | None, first: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"index": c.index}
        logprobs = None
        if sampling.top_logprobs is not None and tokens:
            logprobs = (_completion_logprobs(s.model, tokens, len(c.text)) if kind == "completions"
                        else _chat_logprobs(s.model, tokens))
        if kind == "completions":
            out.update(text=text, logprobs=logprobs, finish_reason=finish)
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            out.update(delta=delta, logprobs=logprobs, finish_reason=finish)
        return out

    pending = len(choices)
    try:
        if kind == "chat":
            yield chunk([entry(c, "", [], None, first=True) for c in choices])
        unsent: dict[int, list[Token]] = {c.index: [] for c in choices}
        while pending:
            choice, event = await events.get()
            if isinstance(event, Failed):
                err = ApiError.of(event.error)
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if isinstance(event, Token):
                choice.tokens.append(event)
                unsent[choice.index].append(event)
                text = choice.strip.push(event.text)
                if text or sampling.top_logprobs is not None:  # with logprobs: a chunk per token
                    yield chunk([entry(choice, text, unsent[choice.index], None)])
                    choice.text += text
                    unsent[choice.index] = []
                continue
            pending -= _apply(choice, event, metrics, s.name)
            text = choice.strip.push(event.tail)
            choice.text += text
            yield chunk([entry(choice, text, unsent[choice.index], FINISH[event.finish_reason])])
            unsent[choice.index] = []
        if sampling.include_usage:
            payload = {"id": ident, "object": obj, "created": created, "model": s.name, "choices": [],
                       "usage": _usage(choices)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route=f"/v1/{'chat/' if kind == 'chat' else ''}completions").observe(
            time.perf_counter() - received)
    finally:
        for c in choices:
            if c.done is None and c.request is not None:
                c.request.cancel()


# The command -------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("packages", nargs="+", metavar="PACKAGE",
                        help="package directories to serve, PACKAGE (named by its folder) or NAME=PACKAGE")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (or set {API_KEY_ENV}; "
                             "the variable keeps the key out of the process list)")
    parser.add_argument("--rows", type=int, default=16, help="requests decoded together per package (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting per package; one more is answered 429 (default 64)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens per request, prompt + max_tokens (default: the package's max_seq_len)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask (4096)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit in bytes (1 MiB)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before exiting (30)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session")
    parser.add_argument("--trust-store", action="append", default=None, metavar="PATH",
                        help="a content store the packages may link into (repeatable)")


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(f"onnxformer serve needs the serve extra (uvicorn is missing): {SERVE_EXTRA}") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    config = ServeConfig(rows=args.rows, max_queue=args.max_queue, context=args.context, max_tokens=args.max_tokens,
                         max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout, api_key=api_key)
    served = load_served(parse_packages(args.packages), config, threads=args.threads, trusted_roots=args.trust_store)
    app = create_app(served, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: /health says draining; uvicorn stops accepting
            # connections and waits for the open ones; requests already received are served
            app.state.serve["draining"] = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # drained on purpose: exit 0, not re-raise the signal after the shutdown
                self._captured_signals.clear()

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   timeout_graceful_shutdown=max(1, int(config.drain_timeout)), lifespan="on"))
    for name, s in served.items():
        print(f"serving {name} ({s.model.arch}, {', '.join(s.describe()['routes'])}) on http://{args.host}:{args.port}",
              flush=True)
    server.run()
    return 0


__all__ = ["ServeConfig", "Served", "ApiError", "create_app", "load_served", "parse_packages", "add_arguments", "run"]
