"""A loaded package: sessions, tokenizer, and the calls users make. onnxruntime + numpy +
tokenizers only; never torch.

    model = onnxformer.runtime.load("artifacts/decoder")
    model.generate(["three hundred ="], GenerationConfig(max_new_tokens=8))
    model.classify(["the food was not good"])      # encoder packages with a classifier
    model.embed(["a sentence"], pooling="mean")     # encoder packages

The decoder step always runs through onnxruntime I/O binding: inputs and the KV cache are
OrtValues on the session's device and each step's `present.*` outputs are fed back as the
next step's `past_key_values.*` without a round trip through numpy. Only the logits come back
to the host. On CPU this is the same code path CUDA uses; only the device name differs.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from tokenizers import Tokenizer

from . import generation as gen
from .contract import (
    ATTENTION_MASK,
    CROSS_ATTENTION,
    DECODER,
    ENCODER,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    POSITION_IDS,
    SEQUENCE_LENGTHS,
    TOKEN_TYPE_IDS,
    check_session_io,
    past_name_for,
    self_cache_names,
)
from .errors import ConfigError, InputError, PackageError, ProviderError, RunError
from .safety import check_external_data
from .generation import GenerationConfig, GenerationOutput
from .manifest import Manifest

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": ("CPUExecutionProvider", "cpu"), "cuda": ("CUDAExecutionProvider", "cuda")}
MAX_SEQUENCES_PER_PROMPT = 4096  # num_beams / num_return_sequences above this are refused, not allocated
# What onnxruntime raises from InferenceSession.run (Fail, InvalidArgument, RuntimeException, ...).
ORT_ERRORS = tuple(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception))


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Generation:
    """One prompt's result: `texts[j]` / `token_ids[j]` for each returned sequence j."""

    prompt: str
    texts: list[str]
    token_ids: list[list[int]]
    scores: list[float]
    finish_reasons: list[str]

    @property
    def text(self) -> str:
        return self.texts[0]


def truncate_keeping_specials(ids: Sequence[int], special_mask: Sequence[int], limit: int, *,
                              keep_end: bool) -> list[int]:
    """Cut `ids` to `limit` tokens between the template's leading and trailing special tokens
    (`<s>` / `[CLS]` ... `[SEP]` / `</s>` stay): a prompt keeps its end, a text its start.
    Returns the kept positions (indices into `ids`)."""
    n = len(ids)
    lead = next((i for i, m in enumerate(special_mask) if not m), n)
    trail = next((i for i, m in enumerate(reversed(special_mask)) if not m), n) if lead < n else 0
    room = limit - lead - trail
    if room < 1:
        raise InputError(f"max length {limit} leaves no room for text besides {lead + trail} special tokens")
    body = list(range(lead, n - trail))
    body = body[-room:] if keep_end else body[:room]
    return [*range(lead), *body, *range(n - trail, n)]


def _resolve_provider(provider: str) -> tuple[str, str]:
    if provider is not None and not isinstance(provider, str):
        raise ProviderError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r:.60}")
    key = provider.lower().removesuffix("executionprovider") if provider else "cpu"
    if key not in PROVIDERS:
        raise ProviderError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    name, device = PROVIDERS[key]
    available = ort.get_available_providers()
    if name not in available:
        raise ProviderError(
            f"provider {provider!r} ({name}) is not available in this onnxruntime build "
            f"(available: {', '.join(available)}). For CUDA install the onnxruntime-gpu wheel "
            "instead of onnxruntime, or use provider='cpu'."
        )
    return name, device


def _session(path: Path, provider: str, threads: int | None, fast_start: bool = True,
             spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:  # workers sleep as soon as a run ends instead of spinning for the next one
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if fast_start:  # weight prepacking (MLAS's layout of every constant MatMul weight) is most of
        # a session's start-up; on all threads it takes ~0.6x the time, at a transient memory peak
        # (134 MB decoder: 185 -> 282 MB during load; the same 170 MB once loaded)
        options.add_session_config_entry("session.prepack.enable_parallel", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as err:  # onnxruntime raises its own exception types for damaged files
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise PackageError(
            f"onnxruntime could not load {path.name!r}: {first}. The file is damaged or not an ONNX "
            "graph; re-export the package."
        ) from None


class Model:
    """A loaded package. Create it with `onnxformer.runtime.load`."""

    def __init__(self, directory: Path, manifest: Manifest, tokenizer: Tokenizer,
                 sessions: dict[str, ort.InferenceSession], device: str):
        self.directory, self.manifest, self.tokenizer = directory, manifest, tokenizer
        self.sessions, self.device = sessions, device
        self.arch, self.dims = manifest.arch, manifest.dims
        self.float_dtype = np.dtype(manifest.float_dtype)
        self._self_cache = self_cache_names(self.dims)  # [(present, past)] per layer, key then value

    def __repr__(self) -> str:
        return f"<onnxformer.runtime.Model arch={self.arch!r} from {str(self.directory)!r} on {self.device}>"

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.manifest.label_names

    @property
    def can_generate(self) -> bool:
        return DECODER in self.sessions

    @property
    def can_classify(self) -> bool:
        spec = self.manifest.graphs.get(ENCODER)
        return self.arch == "encoder" and spec is not None and LOGITS in spec.spec.output_names

    # ---------------------------------------------------------------------------------------
    # Tokenization
    # ---------------------------------------------------------------------------------------
    def _texts(self, texts: str | Sequence[str], what: str) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or isinstance(texts, bytes):
            raise InputError(f"{what} must be a string or a list of strings; got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise InputError(f"{what}: the list is empty; pass at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"{what}[{i}] must be a string; got {type(text).__name__} ({text!r:.60})")
            if not text:
                raise InputError(f"{what}[{i}] is empty; pass non-empty text")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:  # a lone surrogate, e.g. from a bad decode upstream
                    raise InputError(
                        f"{what}[{i}] is not valid Unicode ({err.reason} at character {err.start}); "
                        "decode your input with errors='replace'"
                    ) from None
        return texts

    @staticmethod
    def _batch_size(batch_size: Any) -> int:
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1; got {batch_size!r:.60}")
        return int(batch_size)

    def encode(self, texts: Sequence[str], *, truncate: bool = False, reserve: int = 0) -> list[list[int]]:
        """Token ids with the package's special-token template (what the model was trained on)."""
        texts = self._texts(texts, "encode texts")
        limit = self.manifest.max_seq_len - reserve
        rows = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > limit:
                if not truncate:
                    raise InputError(
                        f"text {i} is {len(ids)} tokens; this model takes at most {limit}"
                        + (f" ({self.manifest.max_seq_len} minus {reserve} new tokens)" if reserve else "")
                        + ". Shorten it, lower max_new_tokens, or pass truncate=True."
                    )
                keep = truncate_keeping_specials(ids, enc.special_tokens_mask, limit, keep_end=reserve > 0)
                ids = [ids[k] for k in keep]  # a prompt keeps its end, a text its start
            if not ids:
                raise InputError(f"text {i} is empty after tokenization; pass non-empty text")
            rows.append(ids)
        return rows

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped); ids must be integers in [0, vocab_size)."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InputError(f"decode() takes a list of token ids; got {type(ids).__name__}")
        ids = list(ids)
        bad = [t for t in ids if not gen._is_int(t) or not 0 <= t < self.dims.vocab_size]
        if bad:
            raise InputError(f"decode(): {bad[0]!r:.40} is not a token id of this model (integers in "
                             f"[0, {self.dims.vocab_size}))")
        return self._decode(ids)

    def _decode(self, ids: Sequence[int]) -> str:  # generation's decode: ids come from the model
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------
    # Encoder: classification and embeddings
    # ---------------------------------------------------------------------------------------
    def _require(self, ok: bool, call: str, need: str) -> None:
        if not ok:
            raise InputError(f"{call}() needs {need}; this package is a {self.arch!r} model ({self.directory.name})")

    def _encoder_batches(self, texts: list[str], batch_size: int, truncate: bool) -> Iterator[dict[str, np.ndarray]]:
        encodings = self.tokenizer.encode_batch(texts)
        limit = self.manifest.max_seq_len
        for start in range(0, len(encodings), batch_size):
            chunk = encodings[start:start + batch_size]
            width = max(len(e.ids) for e in chunk)
            if width > limit and not truncate:
                i = start + max(range(len(chunk)), key=lambda j: len(chunk[j].ids))
                raise InputError(
                    f"text {i} is {len(encodings[i].ids)} tokens; this model takes at most {limit}. "
                    "Shorten it or pass truncate=True."
                )
            width = min(width, limit)
            ids = np.full((len(chunk), width), max(self.manifest.special("pad"), 0), dtype=np.int64)
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for r, e in enumerate(chunk):  # right padding; positions come from the mask
                row_ids, row_types = e.ids, e.type_ids
                if len(row_ids) > width:
                    keep = truncate_keeping_specials(row_ids, e.special_tokens_mask, width, keep_end=False)
                    row_ids, row_types = [row_ids[k] for k in keep], [row_types[k] for k in keep]
                n = len(row_ids)
                ids[r, :n] = row_ids
                types[r, :n] = row_types
                mask[r, :n] = 1
            feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
            if self.dims.has_token_types:
                feeds[TOKEN_TYPE_IDS] = types
            yield feeds

    def _run_encoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[ENCODER]
        names = [o.name for o in session.get_outputs()]
        try:
            return dict(zip(names, session.run(names, feeds)))
        except ORT_ERRORS as err:
            raise _run_error(err, self.manifest.graphs[ENCODER].file.file) from None

    def classify(self, texts: str | Sequence[str], *, batch_size: int = 32, truncate: bool = False) -> list[Classification]:
        """Label, score and every label's probability per text."""
        self._require(self.can_classify, "classify", "an encoder package with a classification head")
        texts, batch_size = self._texts(texts, "classify texts"), self._batch_size(batch_size)
        labels = self.label_names or tuple(f"LABEL_{i}" for i in range(self.dims.num_labels))
        results = []
        for feeds in self._encoder_batches(texts, batch_size, truncate):
            logits = self._run_encoder(feeds)[LOGITS].astype(np.float64)  # (B, num_labels)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for row in probs:
                best = int(row.argmax())
                results.append(Classification(labels[best], float(row[best]), dict(zip(labels, map(float, row)))))
        return results

    def embed(self, texts: str | Sequence[str], *, pooling: str = "mean", normalize: bool = True,
              batch_size: int = 32, truncate: bool = False) -> np.ndarray:
        """Sentence embeddings (len(texts), D): mean over real tokens or the [CLS] state."""
        self._require(ENCODER in self.sessions, "embed", "a package with an encoder")
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling must be 'mean' or 'cls'; got {pooling!r}")
        texts, batch_size = self._texts(texts, "embed texts"), self._batch_size(batch_size)
        out = []
        for feeds in self._encoder_batches(texts, batch_size, truncate):
            hidden = self._run_encoder(feeds)[LAST_HIDDEN_STATE].astype(np.float32)  # (B, S, D)
            if pooling == "cls":
                vectors = hidden[:, 0]
            else:
                mask = feeds[ATTENTION_MASK][:, :, None].astype(np.float32)  # (B, S, 1)
                vectors = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
            if normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            out.append(vectors)
        return np.concatenate(out, axis=0)

    # ---------------------------------------------------------------------------------------
    # Generation
    # ---------------------------------------------------------------------------------------
    def generation_config(self, config: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """The config a call runs with.

        Without `config`: the package's generation defaults (manifest), then `overrides`.
        With `config`: exactly that config, except that an empty `eos_token_ids` and the default
        `pad_token_id` take the package's values (a config built without knowing the tokenizer
        still stops at its eos), then `overrides`.
        """
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(
                f"config must be a GenerationConfig or None; got {type(config).__name__}. "
                "Build one with GenerationConfig(...) or GenerationConfig.from_dict(...), or pass keyword overrides"
            )
        package = dict(self.manifest.generation)
        if config is None:
            merged = package
        else:
            merged = config.to_dict()
            if not config.eos_token_ids and "eos_token_ids" in package:
                merged["eos_token_ids"] = package["eos_token_ids"]
            if config.pad_token_id == GenerationConfig().pad_token_id and "pad_token_id" in package:
                merged["pad_token_id"] = package["pad_token_id"]
        merged.update(overrides)
        return GenerationConfig.from_dict(merged)

    def _prompt_ids(self, prompts: list[str], config: GenerationConfig, truncate: bool) -> list[list[int]]:
        if config.max_new_tokens >= self.manifest.max_seq_len:
            raise InputError(
                f"max_new_tokens ({config.max_new_tokens}) must be below this model's max_seq_len "
                f"({self.manifest.max_seq_len})"
            )
        reserve = config.max_new_tokens if self.arch != "encoder-decoder" else 0
        return self.encode(prompts, truncate=truncate, reserve=reserve)

    def _check_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[list[int]]:
        rows = gen.check_prompts(prompts)
        top = max(max(r) for r in rows)
        if top >= self.dims.vocab_size:
            raise InputError(f"token id {top} is out of range for this model's vocabulary (size {self.dims.vocab_size})")
        if config.strategy == "beam" and config.num_beams > self.dims.vocab_size:
            raise ConfigError(f"num_beams ({config.num_beams}) must be <= the vocabulary size ({self.dims.vocab_size})")
        per_prompt = max(config.num_beams, config.num_return_sequences)
        if per_prompt > MAX_SEQUENCES_PER_PROMPT:  # refused before numpy tries to allocate the rows
            raise ConfigError(
                f"{per_prompt} beams or sequences per prompt is more than {MAX_SEQUENCES_PER_PROMPT}; "
                "lower num_beams / num_return_sequences, or call generate several times with different seeds"
            )
        longest = max(len(r) for r in rows)
        extra = config.max_new_tokens if self.arch != "encoder-decoder" else 0
        if longest + extra > self.manifest.max_seq_len or config.max_new_tokens >= self.manifest.max_seq_len:
            raise InputError(
                f"prompt of {longest} tokens + max_new_tokens {config.max_new_tokens} exceeds this model's "
                f"max_seq_len ({self.manifest.max_seq_len}); shorten the prompt or lower max_new_tokens"
            )
        return rows

    def _steps(self, prompts: list[list[int]], config: GenerationConfig) -> tuple[gen.StepModel, list[list[int]]]:
        """The step model and the decoder prompts (encoder-decoder: the start token per source)."""
        sources, decoder_prompts = None, prompts
        if self.arch == "encoder-decoder":
            sources, decoder_prompts = prompts, [[self.manifest.special("decoder_start")] for _ in prompts]
        if self.manifest.kv_cache == "shared":
            longest = max(len(p) for p in decoder_prompts) + config.max_new_tokens
            return _SharedCacheSteps(self, sources, capacity=min(longest, self.manifest.max_seq_len)), decoder_prompts
        return _DecoderSteps(self, sources), decoder_prompts

    def generate_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                     rng: np.random.Generator | None = None) -> GenerationOutput:
        """Generation on token ids (the source ids for encoder-decoder packages)."""
        self._require(self.can_generate, "generate", "a decoder-only, prefix-lm or encoder-decoder package")
        config = config if isinstance(config, GenerationConfig) else self.generation_config(config)
        _check_rng(rng)
        rows = self._check_ids(prompts, config)
        steps, decoder_prompts = self._steps(rows, config)
        try:
            return gen.generate(steps, decoder_prompts, config, rng=rng, decode=self._decode)
        except ORT_ERRORS as err:
            raise _run_error(err, "the generation graphs") from None

    def generate(self, prompts: str | Sequence[str], config: GenerationConfig | None = None, *,
                 truncate: bool = False, rng: np.random.Generator | None = None,
                 **overrides: Any) -> list[Generation]:
        """Generate for each prompt; keyword overrides (max_new_tokens=..., ...) update `config`."""
        self._require(self.can_generate, "generate", "a decoder-only, prefix-lm or encoder-decoder package")
        texts = self._texts(prompts, "generate prompts")
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        ids = self._prompt_ids(texts, config, truncate)
        out = self.generate_ids(ids, config, rng=rng)
        return [
            Generation(text, out.texts[b], out.sequences[b], out.scores[b], out.finish_reasons[b])
            for b, text in enumerate(texts)
        ]

    def stream(self, prompt: str, config: GenerationConfig | None = None, *, truncate: bool = False,
               rng: np.random.Generator | None = None, **overrides: Any) -> Iterator[str]:
        """Yield the continuation's text as it is produced (greedy or sample)."""
        self._require(self.can_generate, "stream", "a decoder-only, prefix-lm or encoder-decoder package")
        if not isinstance(prompt, str):
            raise InputError(f"stream() takes one prompt string; got {type(prompt).__name__}")
        self._texts([prompt], "stream prompt")
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        ids = self._check_ids(self._prompt_ids([prompt], config, truncate), config)
        steps, decoder_prompts = self._steps(ids, config)
        return _guarded(gen.stream(steps, decoder_prompts[0], config, self._decode, rng=rng))


def _guarded(pieces: Iterator[str]) -> Iterator[str]:
    try:
        yield from pieces
    except ORT_ERRORS as err:
        raise _run_error(err, "the generation graphs") from None


def _run_error(err: Exception, what: str) -> RunError:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return RunError(
        f"onnxruntime failed while running {what}: {first}. If memory ran out, lower the batch size, "
        "num_beams or max_new_tokens; otherwise the package is damaged: re-export it"
    )


def _check_rng(rng: Any) -> None:
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator or None; got {type(rng).__name__}. "
                          "Use numpy.random.default_rng(seed), or pass seed=...")


def _encode_sources(model: Model, sources: list[list[int]]) -> dict[str, Any]:
    """Encoder over the left-padded sources, then cross_attention once: the decoder's encoder
    K/V (B, Hkv, S, Dh) and encoder_attention_mask, as OrtValues on the model's device. Both
    step models bind these for every step and never copy them."""
    def value(array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), model.device, 0)

    batch = gen.left_pad(sources, max(model.manifest.special("pad"), 0))
    hidden = model.sessions[ENCODER].run(
        [LAST_HIDDEN_STATE], {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask}
    )[0]  # (B, S, D)
    cross = model.sessions[CROSS_ATTENTION]
    names = [o.name for o in cross.get_outputs()]
    binding = cross.io_binding()
    binding.bind_ortvalue_input(ENCODER_HIDDEN_STATES, value(hidden))
    for name in names:
        binding.bind_output(name, model.device)
    cross.run_with_iobinding(binding)
    cache = {past_name_for(n): v for n, v in zip(names, binding.get_outputs())}  # (B, Hkv, S, Dh)
    cache[ENCODER_ATTENTION_MASK] = value(batch.attention_mask)
    return cache


class _DecoderSteps:
    """The StepModel of generation over the package's decoder graph, with I/O binding.

    The cache is a dict {past input name: OrtValue} (+ the encoder K/V and mask for an
    encoder-decoder model, bound once per source, never copied per step).
    """

    def __init__(self, model: Model, sources: list[list[int]] | None = None):
        self.model = model
        self.session = model.sessions[DECODER]
        self.device = model.device
        self.sources = sources
        self.vocab_size = model.dims.vocab_size
        self._self_past = {past for _, past in model._self_cache}  # the only entries that grow per step
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def init_cache(self, batch_size: int) -> dict[str, Any]:
        dims, dtype = self.model.dims, self.model.float_dtype
        empty = np.zeros((batch_size, dims.n_kv_heads, 0, dims.d_head), dtype=dtype)  # (B, Hkv, P=0, Dh)
        cache: dict[str, Any] = {past: self._value(empty) for _, past in self.model._self_cache}
        self._source_of_row = np.arange(batch_size)  # which input each row encodes (encoder-decoder)
        if self.sources is not None:
            if batch_size != len(self.sources):
                raise AssertionError(f"init_cache({batch_size}) for {len(self.sources)} sources")
            cache.update(_encode_sources(self.model, self.sources))
        return cache

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             cache: dict[str, Any]) -> gen.StepResult:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_IDS, self._value(input_ids.astype(np.int64, copy=False)))
        binding.bind_ortvalue_input(POSITION_IDS, self._value(position_ids.astype(np.int64, copy=False)))
        binding.bind_ortvalue_input(ATTENTION_MASK, self._value(attention_mask.astype(np.int64, copy=False)))
        for name, value in cache.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]  # (N, V) last position
        new_cache = dict(cache)
        for name, value in zip(self.output_names[1:], outputs[1:]):
            new_cache[past_name_for(name)] = value  # present.* -> past_key_values.*
        return gen.StepResult(logits.astype(np.float32, copy=False), new_cache)

    def reorder_cache(self, cache: dict[str, Any], indices: np.ndarray) -> dict[str, Any]:
        """Gather rows of the self-attention cache. The encoder K/V and mask depend only on the
        input a row belongs to: they are gathered only when that changes (the expansion to
        beams or samples), never on beam search's per-step reorders within a prompt."""
        indices = np.asarray(indices, dtype=np.int64)
        sources = self._source_of_row[indices]
        keep_encoder = np.array_equal(sources, self._source_of_row)
        self._source_of_row = sources
        return {
            name: value if keep_encoder and name not in self._self_past else self._value(value.numpy()[indices])
            for name, value in cache.items()
        }


def _aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros whose data starts on a 64-byte boundary (a cache line; numpy's large arrays start
    16 bytes past one). onnxruntime's kernels read the shared KV buffers in place: aligned,
    the batch-8 decode step is about 4% faster (int4: 3.82 vs 3.98 ms)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _SharedCache:
    """The state of one generation over a "shared" layout decoder (opaque to generation)."""

    def __init__(self, batch_size: int, capacity: int):
        self.batch_size, self.capacity = batch_size, capacity
        self.buffers: dict[str, ort.OrtValue] = {}  # past name -> (N, Hkv, C, Dh), also the present
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # tokens of each row in the buffers
        self.encoder: dict[str, ort.OrtValue] = {}  # encoder K/V and mask (encoder-decoder)
        self.source_of_row = np.arange(batch_size)  # which input each row continues
        self.binding: Any = None  # the I/O binding, rebuilt when rows or buffers change
        self.logits: ort.OrtValue | None = None
        self.logits_host: np.ndarray | None = None  # CPU: the array the logits OrtValue writes into
        self.ids: ort.OrtValue | None = None  # bound input_ids and sequence_lengths, updated in place
        self.lengths_value: ort.OrtValue | None = None
        self.choice: list[tuple[np.ndarray | None, ort.OrtValue]] = []  # next_token, next_token_logprob


class _SharedCacheSteps:
    """The StepModel of generation over a decoder exported with the "shared" KV-cache layout.

    Each layer's cache is ONE preallocated buffer (N, Hkv, C, Dh) bound as both the past input
    and the present output, so the graph's GroupQueryAttention writes each new token's K/V in
    place: no cache copy per step, and one I/O binding reused for the whole generation (only
    the new tokens and the row lengths are bound per step). The prompt step turns
    generation's left-padded rows into the right-padded rows the layout takes.
    """

    def __init__(self, model: Model, sources: list[list[int]] | None = None, *, capacity: int):
        self.model, self.sources = model, sources
        self.session = model.sessions[DECODER]
        self.device = model.device
        self.vocab_size = model.dims.vocab_size
        self.capacity = max(1, capacity)  # C: tokens per row the buffers hold; grown if a call needs more
        self._self_past = [past for _, past in model._self_cache]
        self._present_of = {past: present for present, past in model._self_cache}

    def _empty(self, rows: int, capacity: int) -> ort.OrtValue:
        dims = self.model.dims
        shape = (rows, dims.n_kv_heads, capacity, dims.d_head)  # (N, Hkv, C, Dh)
        return ort.OrtValue.ortvalue_from_numpy(_aligned_zeros(shape, self.model.float_dtype), self.device, 0)

    def init_cache(self, batch_size: int) -> _SharedCache:
        cache = _SharedCache(batch_size, self.capacity)
        cache.buffers = {past: self._empty(batch_size, self.capacity) for past in self._self_past}
        if self.sources is not None:
            if batch_size != len(self.sources):
                raise AssertionError(f"init_cache({batch_size}) for {len(self.sources)} sources")
            cache.encoder = _encode_sources(self.model, self.sources)
        return cache

    def _bind(self, cache: _SharedCache) -> None:
        """One binding for the generation: buffers in and out (the same OrtValues), the encoder
        entries, and a preallocated logits output; steps rebind only input_ids and lengths."""
        binding = self.session.io_binding()
        for name, value in (*cache.buffers.items(), *cache.encoder.items()):
            binding.bind_ortvalue_input(name, value)
        for past, value in cache.buffers.items():
            binding.bind_ortvalue_output(self._present_of[past], value)  # the same memory: updated in place
        shape = (cache.batch_size, self.vocab_size)  # (N, V)
        if self.device == "cpu":  # onnxruntime writes the logits straight into this array: no copy per step
            cache.logits_host = _aligned_zeros(shape, self.model.float_dtype)
            cache.logits = ort.OrtValue.ortvalue_from_numpy(cache.logits_host, self.device, 0)
        else:  # on the device; copied to the host after each step
            cache.logits_host = None
            cache.logits = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.model.float_dtype, self.device, 0)
        binding.bind_ortvalue_output(LOGITS, cache.logits)
        # The graph's greedy choice, (N,) each: written into host arrays on CPU as the logits are.
        cache.choice = []
        for name, dtype in ((NEXT_TOKEN, np.int64), (NEXT_TOKEN_LOGPROB, np.float32)):
            if self.device == "cpu":
                host = np.empty((cache.batch_size,), dtype=dtype)
                value = ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)
            else:
                host, value = None, ort.OrtValue.ortvalue_from_shape_and_type((cache.batch_size,), dtype, self.device, 0)
            binding.bind_ortvalue_output(name, value)
            cache.choice.append((host, value))
        cache.binding, cache.ids = binding, None  # input_ids / sequence_lengths are bound by the next step

    def _grow(self, cache: _SharedCache, needed: int) -> None:
        """Longer buffers when a row would pass the capacity (a caller past the hinted length)."""
        capacity = min(max(needed, 2 * cache.capacity), self.model.manifest.max_seq_len)
        if needed > capacity:
            raise InputError(f"rows of {needed} tokens exceed this model's max_seq_len ({self.model.manifest.max_seq_len})")
        for name, value in cache.buffers.items():
            grown = _aligned_zeros((cache.batch_size, self.model.dims.n_kv_heads, capacity, self.model.dims.d_head),
                                   self.model.float_dtype)
            grown[:, :, :cache.capacity] = value.numpy()
            cache.buffers[name] = ort.OrtValue.ortvalue_from_numpy(grown, self.device, 0)
        cache.capacity, cache.binding = capacity, None

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             cache: _SharedCache) -> gen.StepResult:
        del position_ids  # the graph derives positions from the row lengths
        lengths = attention_mask.sum(axis=1, dtype=np.int64)  # (N,) real tokens after this step
        n, t = input_ids.shape
        if not cache.lengths.any() and t > 1:  # the prompt: left padding -> right padding
            shift = (np.arange(t)[None, :] + (t - lengths)[:, None]) % t  # row b starts at its first real token
            input_ids = np.take_along_axis(input_ids, shift, axis=1)
        return self._run(np.ascontiguousarray(input_ids, dtype=np.int64), lengths, cache)

    def advance(self, tokens: np.ndarray, cache: _SharedCache) -> gen.StepResult:
        """One new token per row (N,) int64: every row grows by one (generation's per-token
        step; the same as step() with the next positions and a mask one longer)."""
        return self._run(tokens[:, None], cache.lengths + 1, cache)

    def _run(self, ids: np.ndarray, lengths: np.ndarray, cache: _SharedCache) -> gen.StepResult:
        """Run ids (N, T) so that row b holds lengths[b] tokens afterwards."""
        if int(lengths.max()) > cache.capacity:
            self._grow(cache, int(lengths.max()))
        if cache.binding is None:
            self._bind(cache)
        if cache.ids is None or cache.ids.shape() != list(ids.shape):  # the prompt, then (N, 1) for every step
            cache.ids = ort.OrtValue.ortvalue_from_numpy(ids.copy(), self.device, 0)
            cache.lengths_value = ort.OrtValue.ortvalue_from_numpy(lengths.copy(), self.device, 0)
            cache.binding.bind_ortvalue_input(INPUT_IDS, cache.ids)
            cache.binding.bind_ortvalue_input(SEQUENCE_LENGTHS, cache.lengths_value)
        else:  # same shapes: write the values into the bound tensors
            cache.ids.update_inplace(ids)
            cache.lengths_value.update_inplace(lengths)
        self.session.run_with_iobinding(cache.binding)
        cache.lengths = lengths
        # The logits array is the step's output buffer (valid until the next step; generation
        # reads it before stepping again, StepModel's contract).
        logits = cache.logits_host if cache.logits_host is not None else cache.logits.numpy()
        token, logprob = (host if host is not None else value.numpy() for host, value in cache.choice)
        return gen.StepResult(logits.astype(np.float32, copy=False), cache, (token, logprob))

    def reorder_cache(self, cache: _SharedCache, indices: np.ndarray) -> _SharedCache:
        """Gather rows of the buffers (beam search, the expansion to samples). The encoder K/V
        are gathered only when the input a row belongs to changes, as in _DecoderSteps."""
        indices = np.asarray(indices, dtype=np.int64)
        out = _SharedCache(len(indices), cache.capacity)
        out.source_of_row = cache.source_of_row[indices]
        keep_encoder = np.array_equal(out.source_of_row, cache.source_of_row)
        used = int(cache.lengths.max()) if cache.lengths.size else 0
        for name, value in cache.buffers.items():
            rows = _aligned_zeros((len(indices), *value.shape()[1:]), self.model.float_dtype)
            rows[:, :, :used] = value.numpy()[indices, :, :used]  # only the filled part
            out.buffers[name] = ort.OrtValue.ortvalue_from_numpy(rows, self.device, 0)
        out.encoder = cache.encoder if keep_encoder else {
            name: ort.OrtValue.ortvalue_from_numpy(value.numpy()[indices], self.device, 0)
            for name, value in cache.encoder.items()
        }
        out.lengths = cache.lengths[indices]
        return out


def _tokenizer(directory: Path, manifest: Manifest) -> Tokenizer:
    """The package's tokenizer, checked against the model: every id it can produce must index
    the vocabulary (a model may have more rows than the tokenizer has tokens, never fewer),
    and every special token id of the manifest must be a token of the tokenizer."""
    name = manifest.tokenizer.file
    try:
        tokenizer = Tokenizer.from_file(str(directory / name))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable or malformed files
        raise PackageError(f"tokenizer {name!r} could not be loaded ({str(err)[:200]}); re-export the package") from None
    vocab = manifest.dims.vocab_size
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab:
        raise PackageError(
            f"tokenizer {name!r} produces token ids up to {top} but the model's vocabulary has {vocab} entries "
            f"(ids 0..{vocab - 1}): the tokenizer does not belong to this model; re-export the package with the "
            "tokenizer the model was trained with"
        )
    unknown = {role: i for role, i in manifest.special_tokens.items() if i >= 0 and tokenizer.id_to_token(i) is None}
    if unknown:
        raise PackageError(
            f"manifest special_tokens {unknown} are not tokens of {name!r}: the tokenizer does not belong to "
            "this model; re-export the package"
        )
    return tokenizer


def load(package_dir: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None,
         verify: bool = True, fast_start: bool = True) -> Model:
    """Open a package: read and check the manifest, verify checksums, open one session per
    graph on `provider` ("cpu" or "cuda") and check each session's I/O against the contract.

    `fast_start` prepares the weights on all threads: a faster load at a transient memory
    peak (about 1.5x the weights while loading); pass False under a tight memory limit."""
    if not isinstance(package_dir, (str, os.PathLike)):
        raise PackageError(f"package_dir must be a path (str or os.PathLike); got {type(package_dir).__name__}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024):
        raise InputError(f"threads must be None (onnxruntime's choice) or an integer in [0, 1024]; got {threads!r:.60}")
    directory = Path(package_dir)
    provider_name, device = _resolve_provider(provider)
    manifest = Manifest.load(directory)
    # The checksums (a full read of every file) run on a second thread while onnxruntime opens
    # the sessions (hashlib and session creation both release the GIL): the load costs about
    # max(hash, open) instead of their sum. A damaged file is reported by its checksum even
    # when onnxruntime trips over it first, and no Model is returned before the check passes.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxformer-verify") as pool:
        checked = pool.submit(manifest.verify_files, directory) if verify else None
        try:
            tokenizer = _tokenizer(directory, manifest)
            sessions = {}
            for name, entry in manifest.graphs.items():
                check_external_data(directory / entry.file.file, [e.file for e in entry.external_data])
                # Each session has its own thread pool, whose workers spin for a while after a
                # run. The encoder and cross-attention of an encoder-decoder run once per call,
                # right before the decoder's steps: spinning, their workers would take the
                # decoder's cores (on 2 cores: 46-51 -> 21-23 ms for the source and the first
                # token, and each step 15% faster, without it). The decoder, run step after step,
                # keeps spinning; so does a package's only graph.
                once = len(manifest.graphs) > 1 and name != DECODER
                session = _session(directory / entry.file.file, provider_name, threads, bool(fast_start),
                                   spinning=not once)
                check_session_io(entry.spec, session.get_inputs(), session.get_outputs())
                sessions[name] = session
        except PackageError:
            if checked is not None:
                checked.result()  # the checksum's message names the damaged file more precisely
            raise
        if checked is not None:
            checked.result()
    log.info("loaded %s package from %s on %s", manifest.arch, directory, device)
    return Model(directory, manifest, tokenizer, sessions, device)
