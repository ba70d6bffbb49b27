"""`onnxformer serve` and its scheduler (runtime/server.py, runtime/scheduler.py), torch-free, on
the committed packages in artifacts/.

The oracle of every generation is the runtime called for that prompt alone
(``Model.generate`` / ``generate_ids``): a request through the scheduler or the server must give
the same tokens and text, whatever else runs. The HTTP tests run a live server on 127.0.0.1 (a
child process on a free port, stopped at the end) through the official ``openai`` client, and
raw HTTP (httpx) for the error cases, disconnects, the queue limit, the API key and SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support import ARTIFACTS

pytestmark = pytest.mark.runtime_only

DECODER, ENCODER = ARTIFACTS / "decoder", ARTIFACTS / "encoder"
SEQ2SEQ, PREFIX_LM = ARTIFACTS / "encoder-decoder", ARTIFACTS / "prefix-lm"
NUMBERS = ["three hundred forty two", "seven", "nineteen thousand two hundred", "one", "eighty eight",
           "five hundred five", "sixty", "two thousand forty"]


@pytest.fixture(scope="module")
def models():
    import onnxformer.runtime as rt

    return {name: rt.load(path) for name, path in
            (("decoder", DECODER), ("enc", ENCODER), ("ed", SEQ2SEQ), ("plm", PREFIX_LM))}


def _settings(i: int) -> dict:
    """Mixed per-request settings: greedy and seeded sampling, different lengths, stop strings."""
    kw: dict = {"max_new_tokens": 3 + i % 7}
    if i % 3 == 1:
        kw.update(strategy="sample", temperature=0.9, top_k=20, top_p=0.95, seed=i)
    if i % 4 == 3:
        kw["stop_strings"] = (" 0",)
    return kw


# ------------------------------------------------------------------------------------------
# The scheduler alone
# ------------------------------------------------------------------------------------------
def _run(scheduler, prompt, config, **request):
    from onnxformer.runtime.scheduler import Request

    events: queue.Queue = queue.Queue()
    scheduler.submit(Request(prompt, config, events.put, **request))
    return events


def _drain(events: queue.Queue):
    from onnxformer.runtime.scheduler import Done, Failed

    tokens = []
    while True:
        event = events.get(timeout=60)
        if isinstance(event, (Done, Failed)):
            return tokens, event
        tokens.append(event)


def _all_rows_free(scheduler) -> bool:
    engine = scheduler.engine
    return engine.pool.free == scheduler.config.rows if hasattr(engine, "pool") else engine.steps.rows == 0


@pytest.mark.parametrize("name, prefill_tokens", [("decoder", 512), ("decoder", 3), ("ed", 512), ("plm", 512)])
def test_every_request_equals_the_runtime_alone_whatever_else_runs(models, name, prefill_tokens):
    """24 requests of mixed lengths and settings submitted at once into 4 rows (so they join
    and leave mid-batch; prefill_tokens 3: prompts enter the cache in pieces of 3 tokens
    between decode steps): tokens, finish reason, score and text equal generate_ids alone,
    the streamed pieces join to the text."""
    from onnxformer.runtime.scheduler import Scheduler, SchedulerConfig

    model = models[name]
    fmt = model.prompt_format
    prompts = model.encode([fmt.format(t) if fmt else t for t in NUMBERS * 3])
    scheduler = Scheduler(model, SchedulerConfig(rows=4, max_queue=64, prefill_tokens=prefill_tokens))
    assert scheduler.engine_name == ("row-pool" if name == "decoder" else "step-model")
    try:
        runs = []
        for i, prompt in enumerate(prompts):
            config = model.generation_config(**_settings(i))
            runs.append((prompt, config, _run(scheduler, prompt, config)))
        for prompt, config, events in runs:
            tokens, done = _drain(events)
            [alone] = model.generate_ids([prompt], config)
            assert list(done.token_ids) == alone.token_ids[0], (config, prompt)
            assert done.finish_reason == alone.finish_reasons[0]
            assert done.score == pytest.approx(alone.scores[0], abs=1e-4)
            assert done.text == alone.texts[0]
            assert "".join(t.text for t in tokens) + done.tail == done.text
        assert scheduler.running == 0 and _all_rows_free(scheduler)
    finally:
        scheduler.close()


def test_the_row_pool_is_allocated_once_and_rows_are_reused(models):
    from onnxformer.runtime.scheduler import Scheduler, SchedulerConfig

    model = models["decoder"]
    scheduler = Scheduler(model, SchedulerConfig(rows=3))
    try:
        buffers = {name: array.ctypes.data for name, array in scheduler.engine.pool.buffers.items()}
        shape = next(iter(scheduler.engine.pool.buffers.values())).shape
        assert shape == (3, model.dims.n_kv_heads, model.manifest.max_seq_len, model.dims.d_head)
        prompt = model.encode([model.prompt_format.format("seven")])[0]
        for _ in range(3):  # three rounds of 5 requests through 3 rows
            runs = [_run(scheduler, prompt, model.generation_config(max_new_tokens=6)) for _ in range(5)]
            for events in runs:
                _drain(events)
        assert {n: a.ctypes.data for n, a in scheduler.engine.pool.buffers.items()} == buffers
        assert scheduler.engine.pool.free == 3
    finally:
        scheduler.close()


def test_a_cancelled_request_leaves_within_one_step(models):
    """The row is free at the next step boundary: at most one more token after cancel()."""
    from onnxformer.runtime.scheduler import Request, Scheduler, SchedulerConfig, Token

    model = models["decoder"]
    scheduler = Scheduler(model, SchedulerConfig(rows=2))
    try:
        seen, cancelled_at = [], []
        finished = threading.Event()
        result = {}

        def on_event(event):
            if isinstance(event, Token):
                seen.append(event)
                if len(seen) == 2:
                    request.cancel()
                    cancelled_at.append(len(seen))
            else:
                result["done"] = event
                finished.set()

        prompt = model.encode(["seven ="])[0]
        config = model.generation_config(max_new_tokens=100, eos_token_ids=(), strategy="sample", seed=0)
        request = scheduler.submit(Request(prompt, config, on_event))
        assert finished.wait(60)
        assert result["done"].finish_reason == "cancelled"
        assert len(seen) == cancelled_at[0]  # cancelled inside the callback: no token after it
        assert scheduler.engine.pool.free == 2 and scheduler.running == 0
    finally:
        scheduler.close()


def test_a_full_queue_and_a_closing_scheduler_refuse(models):
    from onnxformer.runtime.scheduler import QueueFull, Request, Scheduler, SchedulerConfig

    model = models["decoder"]
    scheduler = Scheduler(model, SchedulerConfig(rows=1, max_queue=1))
    gate, started = threading.Event(), threading.Event()

    def blocking(event):  # holds the scheduler's thread inside the first request's first token
        started.set()
        gate.wait(60)

    prompt = model.encode(["seven ="])[0]
    config = model.generation_config(max_new_tokens=2)
    scheduler.submit(Request(prompt, config, blocking))
    assert started.wait(60)
    queued = _run(scheduler, prompt, config)
    with pytest.raises(QueueFull, match="queue is full") as err:
        _run(scheduler, prompt, config)
    assert err.value.code == "E_BUSY"
    gate.set()
    _, done = _drain(queued)
    assert done.finish_reason in ("eos", "length")
    scheduler.close()
    with pytest.raises(QueueFull, match="shutting down"):
        _run(scheduler, prompt, config)


def test_a_failing_step_fails_its_batch_and_the_scheduler_keeps_serving(models):
    """onnxruntime failing mid-batch (here: a step that raises): the batch's requests get
    Failed with RunError E_RUN, the engine is rebuilt, the next request is answered."""
    from onnxformer.runtime.scheduler import Failed, Scheduler, SchedulerConfig

    model = models["decoder"]
    scheduler = Scheduler(model, SchedulerConfig(rows=2))
    try:
        def broken(requests):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed")

        scheduler.engine.step = broken
        prompt = model.encode(["seven ="])[0]
        config = model.generation_config(max_new_tokens=5, eos_token_ids=())
        tokens, failed = _drain(_run(scheduler, prompt, config))
        assert isinstance(failed, Failed) and failed.error.code == "E_RUN" and "a kernel failed" in str(failed.error)
        tokens, done = _drain(_run(scheduler, prompt, config))
        assert list(done.token_ids) == model.generate_ids([prompt], config)[0].token_ids[0]
    finally:
        scheduler.close()


def test_requests_are_checked_before_they_queue(models):
    from onnxformer.runtime.errors import ConfigError, InputError
    from onnxformer.runtime.scheduler import Scheduler, SchedulerConfig

    model = models["decoder"]
    scheduler = Scheduler(model, SchedulerConfig(rows=1, context=16))
    try:
        with pytest.raises(InputError, match="context of 16 tokens") as err:
            _run(scheduler, list(range(5, 15)), model.generation_config(max_new_tokens=8))
        assert err.value.code == "E_TOO_LONG"
        with pytest.raises(InputError) as err:
            _run(scheduler, [5, 10_000], model.generation_config(max_new_tokens=2))
        assert err.value.code == "E_TOKEN_ID"
        with pytest.raises(ConfigError, match="greedy' or 'sample"):
            _run(scheduler, [5, 6], model.generation_config(strategy="beam", num_beams=2))
    finally:
        scheduler.close()


# ------------------------------------------------------------------------------------------
# The live server
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`onnxformer serve` in a child process on 127.0.0.1."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")
        pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        command = [sys.executable, "-m", "onnxformer.runtime.cli", "serve", *args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.log.read_text()}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


PACKAGES = [f"decoder={DECODER}", f"enc={ENCODER}", f"ed={SEQ2SEQ}", f"plm={PREFIX_LM}"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), *PACKAGES, "--rows", "4", "--max-tokens", "100",
               "--max-body-bytes", "8192")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the official openai client (the test extra) is not installed")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path, body, **kw):
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _sse(response) -> list:
    """The data payloads of a server-sent event stream (the final [DONE] as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.slow
def test_the_openai_client_completions_chat_stream_and_embeddings(server, client, models):
    decoder = models["decoder"]
    # completions: the prompt as given (no prompt format), as generate(raw=True)
    got = client.completions.create(model="decoder", prompt="three hundred forty two =", max_tokens=8)
    alone = decoder.generate("three hundred forty two =", raw=True, max_new_tokens=8)[0]
    assert got.choices[0].text == alone.texts[0]
    assert got.usage.completion_tokens == len(alone.token_ids[0])
    assert got.usage.prompt_tokens == len(decoder.encode(["three hundred forty two ="])[0])
    # chat: a package without a chat template answers one user message in its prompt format
    chat = client.chat.completions.create(model="decoder", messages=[{"role": "user", "content": "three hundred forty two"}])
    assert chat.choices[0].message.content == decoder.generate("three hundred forty two")[0].text == "3 4 2"
    assert chat.choices[0].finish_reason == "stop" and chat.usage.total_tokens > 0
    # streaming, with the usage chunk
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model="decoder", stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "three hundred forty two"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == "3 4 2" and len(pieces) > 1
    assert usage.completion_tokens == chat.usage.completion_tokens
    # the encoder-decoder through completions, streamed
    text = "".join(c.choices[0].text for c in client.completions.create(model="ed", prompt="two thousand forty",
                                                                        stream=True, max_tokens=10))
    assert text == models["ed"].generate("two thousand forty", max_new_tokens=10)[0].text
    # embeddings (the client asks for base64 by default and decodes it)
    texts = ["the food was great", "a dull plot"]
    emb = client.embeddings.create(model="enc", input=texts)
    np.testing.assert_allclose(np.array([d.embedding for d in emb.data]), models["enc"].embed(texts), atol=1e-6)
    assert emb.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="enc", input="the food was great", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, models["enc"].embed(["the food was great"])[0], atol=1e-6)
    assert [m.id for m in client.models.list().data] == ["decoder", "enc", "ed", "plm"]


@pytest.mark.slow
def test_classify_and_metrics(server, models):
    got = _post(server, "/v1/classify", {"model": "enc", "input": ["the food was not good", "great acting"]}).json()
    alone = models["enc"].classify(["the food was not good", "great acting"])
    assert [d["label"] for d in got["data"]] == [c.label for c in alone]
    assert got["data"][0]["score"] == pytest.approx(alone[0].score, abs=1e-6) and got["usage"]["prompt_tokens"] > 0
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    assert _post(server, "/v1/completions", {"model": "decoder", "prompt": "seven =", "stream": True}).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("onnxformer_queue_depth", "onnxformer_running_rows", "onnxformer_tokens_per_second",
                 "onnxformer_time_to_first_token_seconds_bucket", "onnxformer_request_latency_seconds_bucket",
                 "onnxformer_generated_tokens_total", "onnxformer_cancelled_requests_total",
                 "onnxformer_time_per_output_token_seconds_bucket"):
        assert name in text, name


@pytest.mark.slow
def test_concurrent_requests_over_http_equal_the_runtime_alone(server, models):
    """32 requests at once over 4 rows per package (decoder: the row pool; encoder-decoder and
    prefix-LM: their step models), greedy and seeded sampling, some streamed, some with stop
    strings: each answer is the runtime's for that prompt alone."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    jobs = []
    for i in range(32):
        name = ("decoder", "decoder", "ed", "plm")[i % 4]
        model = models[name]
        prompt = NUMBERS[i % len(NUMBERS)]
        text = model.prompt_format.format(prompt) if model.prompt_format else prompt
        kw = _settings(i)
        body = {"model": name, "prompt": text, "max_tokens": kw["max_new_tokens"], "stream": i % 5 == 0}
        if kw.get("strategy") == "sample":
            body.update(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"], seed=kw["seed"])
        else:
            body["temperature"] = 0
        if "stop_strings" in kw:
            body["stop"] = list(kw["stop_strings"])
        jobs.append((model, text, kw, body))

    def ask(job):
        model, text, kw, body = job
        with httpx.Client(timeout=60) as http:
            if body["stream"]:
                with http.stream("POST", server.url + "/v1/completions", json=body) as r:
                    events = _sse(r)
                assert events[-1] == "[DONE]"
                return "".join(e["choices"][0]["text"] for e in events[:-1]), events[-2]["choices"][0]["finish_reason"]
            answer = http.post(server.url + "/v1/completions", json=body).json()
            return answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, text, kw, body), (got, finish) in zip(jobs, answers):
        alone = model.generate(text, raw=True, **kw)[0]
        assert got == alone.texts[0], body
        assert finish == {"eos": "stop", "stop": "stop", "length": "length"}[alone.finish_reasons[0]]


@pytest.mark.slow
def test_stop_strings_never_reach_the_stream(server, models):
    body = {"model": "decoder", "messages": [{"role": "user", "content": "three hundred forty two"}], "stop": [" 4"],
            "stream": True}
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = _sse(r)
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(pieces) == "3" and not any("4" in p for p in pieces)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    plain = _post(server, "/v1/chat/completions", {**body, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == "3"


@pytest.mark.slow
def test_logprobs_in_openai_format(server, models):
    decoder = models["decoder"]
    alone = decoder.generate("three hundred forty two =", raw=True, max_new_tokens=6)[0]
    got = _post(server, "/v1/completions", {"model": "decoder", "prompt": "three hundred forty two =",
                                            "max_tokens": 6, "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert len(got["tokens"]) == len(alone.token_ids[0]) == len(got["token_logprobs"]) == len(got["top_logprobs"])
    assert sum(got["token_logprobs"]) == pytest.approx(alone.scores[0], abs=1e-4)
    for token, logprob, top in zip(got["tokens"], got["token_logprobs"], got["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5) and top[token] == pytest.approx(logprob)
    assert got["text_offset"][0] == 0
    chat = _post(server, "/v1/chat/completions", {"model": "decoder", "logprobs": True, "top_logprobs": 2,
                                                  "messages": [{"role": "user", "content": "seven"}]}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert content and all({"token", "logprob", "bytes", "top_logprobs"} <= set(c) and len(c["top_logprobs"]) == 2
                           for c in content)


@pytest.mark.slow
def test_n_choices_sample_and_the_first_equals_the_runtime_with_the_seed(server, models):
    decoder = models["decoder"]
    body = {"model": "decoder", "prompt": "seven =", "max_tokens": 12, "temperature": 1.5, "top_k": 50, "seed": 7,
            "n": 4}
    got = _post(server, "/v1/completions", body).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    alone = decoder.generate("seven =", raw=True, strategy="sample", temperature=1.5, top_k=50, seed=7,
                             max_new_tokens=12)[0]
    assert got["choices"][0]["text"] == alone.texts[0]
    assert got["usage"]["prompt_tokens"] == len(decoder.encode(["seven ="])[0])
    assert got["usage"]["completion_tokens"] >= 4


ERRORS = [
    # (body or raw bytes, path, status, code, words in the message)
    (b"{not json", "/v1/completions", 400, "E_INPUT", "not valid JSON"),
    ([1, 2], "/v1/completions", 400, "E_INPUT", "JSON object"),
    ({"model": "decoder", "prompt": "x", "best_of": 2}, "/v1/completions", 400, "E_UNKNOWN_PARAMETER", "'best_of'"),
    ({"model": "decoder", "prompt": "x", "max_tokens": "8"}, "/v1/completions", 400, "E_CONFIG", "max_tokens"),
    ({"model": "decoder", "prompt": "x", "temperature": 3}, "/v1/completions", 400, "E_CONFIG", "temperature"),
    ({"model": "decoder", "prompt": "x", "max_tokens": 101}, "/v1/completions", 400, "E_TOO_LONG", "limit of 100"),
    ({"model": "nope", "prompt": "x"}, "/v1/completions", 404, "E_NOT_FOUND", "no model 'nope'"),
    ({"model": "decoder", "prompt": "seven " * 100, "max_tokens": 60}, "/v1/completions", 400, "E_TOO_LONG", "max_seq_len"),
    ({"model": "decoder", "prompt": [5, 99999]}, "/v1/completions", 400, "E_TOKEN_ID", "out of range"),
    ({"model": "decoder", "prompt": "x", "n": 2}, "/v1/completions", 400, "E_CONFIG", "needs sampling"),
    ({"model": "decoder", "prompt": "x", "stream_options": {"include_usage": True}}, "/v1/completions", 400, "E_CONFIG",
     "stream: true"),
    ({"model": "decoder", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "/v1/chat/completions", 400, "E_INPUT", "no chat template"),
    ({"model": "enc", "prompt": "x"}, "/v1/completions", 400, "E_WRONG_KIND", "cannot generate"),
    ({"model": "decoder", "input": "x"}, "/v1/embeddings", 400, "E_WRONG_KIND", "cannot embed"),
    ({"model": "enc", "input": 5}, "/v1/embeddings", 400, "E_INPUT", "input must be"),
    ({"model": "enc", "input": "x" * 9000}, "/v1/embeddings", 413, "E_TOO_LONG", "limit of 8192 bytes"),
    ({}, "/v1/nothing", 404, "E_NOT_FOUND", "no route"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body, path, status, code, words", ERRORS, ids=[f"{e[3]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, body, path, status, code, words):
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _long_request(models) -> dict:
    """A completion of exactly 100 tokens (min_tokens holds eos back)."""
    return {"model": "decoder", "prompt": "seven =", "temperature": 0, "max_tokens": 100, "min_tokens": 100,
            "stream": True}


def _metric(server, name: str, model: str = "decoder") -> float:
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} for {model}")


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_row(tmp_path, models):
    """One row and 32 long sequences ahead (two requests, n 16): a stream whose client leaves as
    soon as its answer starts, and a plain request whose client times out, are cancelled (queued
    or running), never generated to their end, and the server goes on with the others."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    s = Server(tmp_path, f"decoder={DECODER}", "--rows", "1")
    try:
        body = {**_long_request(models), "max_tokens": 120, "min_tokens": 120}
        with ThreadPoolExecutor(2) as pool:
            ahead = [pool.submit(httpx.post, s.url + "/v1/completions", timeout=120,
                                 json={**body, "stream": False, "temperature": 1.0, "seed": seed, "n": 16})
                     for seed in (0, 1)]
            deadline = time.monotonic() + 60
            while _metric(s, "onnxformer_queue_depth") < 20 and time.monotonic() < deadline:
                time.sleep(0.002)
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200  # the answer started; the client leaves
            with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
                httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=0.05)
            answers = [f.result() for f in ahead]
        assert all(a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 16 * 120 for a in answers)
        deadline = time.monotonic() + 30
        while _metric(s, "onnxformer_cancelled_requests_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _metric(s, "onnxformer_cancelled_requests_total") == 2
        assert _metric(s, "onnxformer_running_rows") == 0 and _metric(s, "onnxformer_queue_depth") == 0
        assert 32 * 120 <= _metric(s, "onnxformer_generated_tokens_total") < 33 * 120
    finally:
        s.stop()


@pytest.mark.slow
def test_soak_thousands_of_small_requests_keep_memory_flat(server):
    """2000 tiny requests at concurrency 8: every answer correct, RSS after the first 500 and
    at the end within 25 MB (no per-request leak: 1500 requests x 17 KB would show)."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    body = {"model": "decoder", "prompt": "seven =", "max_tokens": 2, "temperature": 0}
    local = threading.local()

    def ask(_):
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=60)
        r = local.http.post(server.url + "/v1/completions", json=body)
        return r.status_code, r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(ask, range(500)))
        before = server.rss_mb()
        rest = list(pool.map(ask, range(1500)))
    after = server.rss_mb()
    assert set(first + rest) == {(200, 2)}
    assert after - before < 25, (before, after)


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(tmp_path, models):
    """One row and a queue of one: of 24 long requests sent at once, some are refused with 429
    and Retry-After, the others complete; the server keeps serving."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    s = Server(tmp_path, f"decoder={DECODER}", "--rows", "1", "--max-queue", "1")
    try:
        body = {**_long_request(models), "stream": False}
        barrier = threading.Barrier(24)

        def ask(_):
            barrier.wait()
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(ask, range(24)))
        refused = [a for a in answers if a[0] == 429]
        assert refused and all(a[1] == "1" and a[2]["error"]["code"] == "E_BUSY" and "queue is full" in
                               a[2]["error"]["message"] for a in refused)
        assert all(a[0] == 200 and a[2]["usage"]["completion_tokens"] == 100 for a in answers if a[0] != 429)
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


@pytest.mark.slow
def test_the_api_key_guards_every_route_but_health_and_is_never_logged(tmp_path):
    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    s = Server(tmp_path, f"decoder={DECODER}", env={"ONNXFORMER_API_KEY": "s3cret-key"})
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "s3cret-key"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "E_UNAUTHORIZED"
            assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(s.url + "/v1/completions", json={"model": "decoder", "prompt": "seven ="},
                       headers={"Authorization": "Bearer s3cret-key"})
        assert r.status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 401
    finally:
        s.stop()
    log = s.log.read_text()
    assert "wrong-key-123" not in log and "s3cret-key" not in log and "401" in log


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path, models):
    """24 streams of 120 tokens over one row; SIGTERM while at least 5 wait in the queue: every
    stream the server received completes with [DONE] (those 5 at least, after the signal); a
    connection tried after it is refused; the process exits 0."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

    s = Server(tmp_path, f"decoder={DECODER}", "--rows", "1", "--drain-timeout", "60")
    body = {**_long_request(models), "max_tokens": 120, "min_tokens": 120}
    signalled = threading.Event()

    def ask(_):
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
        except httpx.ConnectError:
            assert signalled.is_set()  # refused only once the server stopped accepting
            return None
        return r.status_code, events, signalled.is_set()

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(ask, i) for i in range(24)]
        deadline = time.monotonic() + 60
        while _metric(s, "onnxformer_queue_depth") < 5 and time.monotonic() < deadline:
            time.sleep(0.002)
        s.process.send_signal(signal.SIGTERM)
        signalled.set()
        answers = [a for a in (f.result() for f in futures) if a is not None]
    for status, events, _ in answers:  # 120 tokens, the finish_reason chunk, [DONE]
        assert status == 200 and events[-1] == "data: [DONE]" and len(events) == 122
    assert sum(after for _, _, after in answers) >= 5
    assert s.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")


def test_the_graph_takes_prompts_only_into_empty_caches_so_prefill_runs_apart(models):
    """Why the row pool prefills new rows in calls of their own: onnxruntime's
    GroupQueryAttention refuses T > 1 new tokens for a batch of rows that have a cache (only a
    batch of one may continue a prompt). A prefill on a view of some rows leaves the other rows'
    cache as it was."""
    from onnxformer.runtime.scheduler import RowPool

    pool = RowPool(models["decoder"], 3, 32)
    pool.prefill(0, [[5, 6, 7], [8, 9]])
    before = {name: buffer[:2].copy() for name, buffer in pool.buffers.items()}
    pool.prefill(2, [[10, 11, 12, 13]])
    for name, buffer in pool.buffers.items():
        np.testing.assert_array_equal(buffer[:2], before[name])
    binding, *_ = pool._bind(0, 2, np.array([[14, 15], [16, 17]], dtype=np.int64), np.array([5, 4], dtype=np.int64))
    with pytest.raises(Exception, match="(?i)batch_size must be 1|sequence_length"):
        pool.session.run_with_iobinding(binding)


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_renders_the_packages_template(models):
    """A package with a chat template (artifacts/decoder given one here): /v1/chat/completions
    answers what Model.chat answers for the whole conversation (in-process app, no socket)."""
    pytest.importorskip("jinja2", reason="chat templates need the [chat] extra (jinja2)")
    pytest.importorskip("starlette", reason="the [serve] extra (starlette) is not installed")
    pytest.importorskip("prometheus_client", reason="the [serve] extra (prometheus_client) is not installed")
    import dataclasses

    from starlette.testclient import TestClient

    import onnxformer.runtime as rt
    from onnxformer.runtime.model import Model
    from onnxformer.runtime.server import ServeConfig, Served, create_app
    from onnxformer.runtime.scheduler import Scheduler, SchedulerConfig

    base = rt.load(DECODER)
    model = Model(base.directory, dataclasses.replace(base.manifest, chat_template=TEMPLATE), base.tokenizer,
                  base.sessions, base.device)
    scheduler = Scheduler(model, SchedulerConfig(rows=2))
    messages = [{"role": "system", "content": "digits"}, {"role": "user", "content": "seven"}]
    with TestClient(create_app({"chat": Served("chat", model, scheduler)}, ServeConfig())) as http:
        r = http.post("/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 6})
        assert r.status_code == 200 and r.headers["x-onnxformer-chat"] == "template"
        answer = r.json()
        alone = model.chat(messages, max_new_tokens=6)
        assert answer["choices"][0]["message"]["content"] == alone.text
        assert answer["usage"]["prompt_tokens"] == len(model.render_chat(messages).token_ids)
        bad = http.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
