"""A loaded package: sessions, tokenizer, and the calls users make. onnxruntime + numpy +
tokenizers only; never torch.

    model = onnxformer.runtime.load("artifacts/decoder")
    model.generate(["three hundred"], GenerationConfig(max_new_tokens=8))  # in the trained prompt format
    model.classify(["the food was not good"])      # encoder packages with a classifier
    model.embed(["a sentence"], pooling="mean")     # encoder packages
    model.chat([{"role": "user", "content": "hi"}])  # packages with a chat template (Hugging Face imports)

Generation drives the one search (runtime/generation.py) over a step model of the package's
sessions (runtime/session_steps.py); `Model.step_model()` gives one to callers that schedule
rows themselves (a server adding and dropping requests mid-batch).
"""

from __future__ import annotations

import dataclasses
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
    DECODER,
    ENCODER,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    TOKEN_TYPE_IDS,
    check_session_io,
    self_cache_names,
)
from .errors import ConfigError, InputError, PackageError, ProviderError, RunError
from .safety import check_external_data, trusted_roots as trusted_roots_of
from .generation import Generation, GenerationConfig
from .session_steps import ConcatSteps, SharedSteps
from .speculative import AutoK, DraftModel, PromptLookup, SpeculationStats, speculative_generate
from .steps import StepModel, is_int
from .manifest import Manifest
from .prompt_format import PromptFormat
from .chat import ChatPrompt, check_messages, render as render_template, special_token_variables

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
    # Share of the text's tokens (special tokens not counted) that are the tokenizer's unk
    # token: characters or words the model never saw in training. Near 1, the label is a guess.
    unknown_fraction: float


UNKNOWN_WARNING = 0.3  # the CLIs warn when more than this share of a text's tokens is unknown


def unknown_fraction(ids: Sequence[int], special_mask: Sequence[int], unk_id: int) -> float:
    """Share of the non-special tokens of one encoded text that are `unk_id` (0.0 with none;
    -1, no unk token, gives 0.0)."""
    text = [t for t, special in zip(ids, special_mask) if not special]
    return sum(t == unk_id for t in text) / len(text) if text and unk_id >= 0 else 0.0


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
        raise InputError(f"max length {limit} leaves no room for text besides {lead + trail} special tokens",
                         code="E_TOO_LONG")
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
            "instead of onnxruntime, or pass provider='cpu' (--provider cpu)."
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
            "graph; re-export the package.",
            code="E_GRAPH",
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
        self.draft: Model | None = None  # speculative decoding's draft (set_draft); None: prompt lookup
        self.last_speculation: SpeculationStats | None = None  # what the last speculative call did
        self._auto: dict[int, AutoK] = {}  # speculative="auto": one tuner per proposer (id of the draft; 0 lookup)

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
                        "decode the bytes it came from with errors='replace' "
                        "(data.decode('utf-8', errors='replace'))"
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
                    # Fewer new tokens help only a prompt that fits the model's length on its own.
                    fewer = self.manifest.max_seq_len - len(ids)
                    lower = f", {gen.option('max_new_tokens', fewer)} or less" if reserve and fewer >= 1 else ""
                    raise InputError(
                        f"text {i} is {len(ids)} tokens; this model takes at most {limit}"
                        + (f" ({self.manifest.max_seq_len} minus {reserve} new tokens)" if reserve else "")
                        + f". Shorten it{lower}, or pass {gen.option('truncate', True)}.",
                        code="E_TOO_LONG",
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
        bad = [t for t in ids if not is_int(t) or not 0 <= t < self.dims.vocab_size]
        if bad:
            raise InputError(f"decode(): {bad[0]!r:.40} is not a token id of this model (integers in "
                             f"[0, {self.dims.vocab_size}))", code="E_TOKEN_ID")
        return self._decode(ids)

    def _decode(self, ids: Sequence[int]) -> str:  # generation's decode: ids come from the model
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------
    # Encoder: classification and embeddings
    # ---------------------------------------------------------------------------------------
    def _require(self, ok: bool, call: str, need: str) -> None:
        if not ok:
            raise InputError(f"{call}() needs {need}; this package is a {self.arch!r} model ({self.directory.name})",
                             code="E_WRONG_KIND")

    def unknown_fractions(self, texts: str | Sequence[str]) -> list[float]:
        """Per text, the share of its tokens (special tokens not counted) that the tokenizer
        could not represent (its unk token): `Classification.unknown_fraction`, for any call."""
        texts, unk = self._texts(texts, "unknown_fractions texts"), self.manifest.special("unk")
        return [unknown_fraction(e.ids, e.special_tokens_mask, unk) for e in self.tokenizer.encode_batch(texts)]

    def _encoder_batches(self, texts: list[str], batch_size: int, truncate: bool
                         ) -> Iterator[tuple[dict[str, np.ndarray], list[float]]]:
        """(feeds, unknown fraction of each row's text) per batch."""
        encodings = self.tokenizer.encode_batch(texts)
        unk = self.manifest.special("unk")
        limit = self.manifest.max_seq_len
        for start in range(0, len(encodings), batch_size):
            chunk = encodings[start:start + batch_size]
            width = max(len(e.ids) for e in chunk)
            if width > limit and not truncate:
                i = start + max(range(len(chunk)), key=lambda j: len(chunk[j].ids))
                raise InputError(
                    f"text {i} is {len(encodings[i].ids)} tokens; this model takes at most {limit}. "
                    f"Shorten it or pass {gen.option('truncate', True)}.",
                    code="E_TOO_LONG",
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
            yield feeds, [unknown_fraction(e.ids, e.special_tokens_mask, unk) for e in chunk]

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
        for feeds, unknown in self._encoder_batches(texts, batch_size, truncate):
            logits = self._run_encoder(feeds)[LOGITS].astype(np.float64)  # (B, num_labels)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for row, share in zip(probs, unknown):
                best = int(row.argmax())
                results.append(Classification(labels[best], float(row[best]), dict(zip(labels, map(float, row))),
                                              share))
        return results

    def embed(self, texts: str | Sequence[str], *, pooling: str | None = None, normalize: bool | None = None,
              batch_size: int = 32, truncate: bool = False) -> np.ndarray:
        """Sentence embeddings (len(texts), D): mean over real tokens or the [CLS] state, then
        L2-normalised or not. `pooling` / `normalize` not given: the package's `embedding`
        defaults (a sentence-transformers import says how it was trained), else "mean", True.
        `unknown_fractions(texts)` says how much of each text the tokenizer could not represent."""
        self._require(ENCODER in self.sessions, "embed", "a package with an encoder")
        default_pooling, default_normalize = self.manifest.embedding_defaults()
        pooling = default_pooling if pooling is None else pooling
        normalize = default_normalize if normalize is None else normalize
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling must be 'mean' or 'cls'; got {pooling!r}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise InputError(f"normalize must be True or False; got {normalize!r:.40}")
        texts, batch_size = self._texts(texts, "embed texts"), self._batch_size(batch_size)
        out = []
        for feeds, _ in self._encoder_batches(texts, batch_size, truncate):
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
        """The config a call runs with: `config` (or an empty one) updated by `overrides`, then
        every field still unset from the package's generation defaults (manifest), then the
        built-in defaults. A value given is kept, even `eos_token_ids=()` (no eos) or
        `pad_token_id=0`. Every generation entry point resolves its parameters here."""
        return gen.resolve_config(config, overrides, self.manifest.generation)

    def _max_new_tokens_too_many(self, config: GenerationConfig) -> InputError:
        most = self.manifest.max_seq_len - 1
        room = "" if self.arch == "encoder-decoder" else " minus the prompt's tokens"
        return InputError(
            f"max_new_tokens ({config.max_new_tokens}) must be below this model's max_seq_len "
            f"({self.manifest.max_seq_len}); pass {gen.option('max_new_tokens', most)}{room} or less",
            code="E_TOO_LONG",
        )

    def _prompt_ids(self, prompts: list[str], config: GenerationConfig, truncate: bool) -> list[list[int]]:
        if config.max_new_tokens >= self.manifest.max_seq_len:
            raise self._max_new_tokens_too_many(config)
        reserve = config.max_new_tokens if self.arch != "encoder-decoder" else 0
        return self.encode(prompts, truncate=truncate, reserve=reserve)

    def _check_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[list[int]]:
        rows = gen.check_prompts(prompts)
        top = max(max(r) for r in rows)
        if top >= self.dims.vocab_size:
            raise InputError(f"token id {top} is out of range for this model's vocabulary (size {self.dims.vocab_size})",
                             code="E_TOKEN_ID")
        if config.strategy == "beam" and config.num_beams > self.dims.vocab_size:
            raise ConfigError(f"num_beams ({config.num_beams}) must be <= the vocabulary size ({self.dims.vocab_size}); "
                              f"pass {gen.option('num_beams', self.dims.vocab_size)} or fewer")
        per_prompt = max(config.num_beams, config.num_return_sequences)
        if per_prompt > MAX_SEQUENCES_PER_PROMPT:  # refused before numpy tries to allocate the rows
            raise ConfigError(
                f"{per_prompt} beams or sequences per prompt is more than {MAX_SEQUENCES_PER_PROMPT}; pass "
                f"num_beams and num_return_sequences of at most {MAX_SEQUENCES_PER_PROMPT} (--num-beams, "
                "--num-return-sequences), or generate several times with different seeds"
            )
        longest, limit = max(len(r) for r in rows), self.manifest.max_seq_len
        if config.max_new_tokens >= limit:
            raise self._max_new_tokens_too_many(config)
        if self.arch == "encoder-decoder":  # the source and the generated tokens have a max_seq_len each
            if longest > limit:
                raise InputError(f"source of {longest} tokens exceeds this model's max_seq_len ({limit}); shorten it "
                                 f"to {limit} tokens (from text: pass {gen.option('truncate', True)})",
                                 code="E_TOO_LONG")
        elif longest + config.max_new_tokens > limit:
            fewer = limit - longest
            lower = f" or pass {gen.option('max_new_tokens', fewer)} or less" if fewer >= 1 else ""
            raise InputError(
                f"prompt of {longest} tokens + max_new_tokens {config.max_new_tokens} exceeds this model's "
                f"max_seq_len ({limit}); shorten the prompt to {limit - config.max_new_tokens} tokens{lower}",
                code="E_TOO_LONG",
            )
        return rows

    def step_model(self, *, capacity: int | None = None) -> StepModel:
        """A fresh step model over this package's graphs (runtime/steps.py): prefill rows from
        prompts (sources for an encoder-decoder), advance them, select, release and admit rows.
        `capacity` hints the tokens per row the shared KV buffers hold at first."""
        self._require(self.can_generate, "step_model", "a decoder-only, prefix-lm or encoder-decoder package")
        if self.manifest.kv_cache == "shared":
            return SharedSteps(self, capacity=min(capacity or 64, self.manifest.max_seq_len))
        return ConcatSteps(self)

    def _steps(self, prompts: list[list[int]], config: GenerationConfig) -> StepModel:
        decoder_prompt = 1 if self.arch == "encoder-decoder" else max(len(p) for p in prompts)
        return self.step_model(capacity=decoder_prompt + config.max_new_tokens)

    def generate_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                     rng: np.random.Generator | None = None, **overrides: Any) -> list[Generation]:
        """Generation on token ids (the source ids for encoder-decoder packages); one
        Generation per prompt, its `prompt` the ids."""
        self._require(self.can_generate, "generate", "a decoder-only, prefix-lm or encoder-decoder package")
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        return self._generate(self._check_ids(prompts, config), config, rng)

    def set_draft(self, draft: "Model | None") -> None:
        """The draft model of speculative decoding (``speculative=K`` or "auto"): a smaller
        generating package over the same vocabulary (and, for an encoder-decoder, also an
        encoder-decoder). None: prompt lookup proposes instead."""
        if draft is not None:
            if not isinstance(draft, Model) or not draft.can_generate:
                raise ConfigError(f"the draft must be a loaded generating package (runtime.load(...)); got {draft!r:.80}")
            if draft.dims.vocab_size != self.dims.vocab_size:
                raise ConfigError(f"the draft's vocabulary ({draft.dims.vocab_size} tokens) differs from this model's "
                                  f"({self.dims.vocab_size}); pass a draft trained with the same tokenizer "
                                  "(onnxformer train --task distill), or none (prompt lookup)")
            if (draft.arch == "encoder-decoder") != (self.arch == "encoder-decoder"):
                raise ConfigError(f"a {draft.arch} draft cannot propose for a {self.arch} model; pass a draft of "
                                  "the same kind (encoder-decoder with encoder-decoder), or none (prompt lookup)")
        self.draft = draft

    def _generate(self, rows: list[list[int]], config: GenerationConfig,
                  rng: np.random.Generator | None) -> list[Generation]:
        if config.speculative != 0 and config.strategy != "beam":
            return self._speculate(rows, config, rng)
        try:
            return gen.generate(self._steps(rows, config), rows, config, rng=rng, decode=self._decode)
        except ORT_ERRORS as err:
            raise _run_error(err, "the generation graphs") from None

    def _speculate(self, rows: list[list[int]], config: GenerationConfig,
                   rng: np.random.Generator | None) -> list[Generation]:
        """Greedy / sample with speculation (runtime/speculative.py), one prompt at a time."""
        capacity = max(len(r) for r in rows) + config.max_new_tokens + 1
        if self.draft is not None:
            draft = self.draft
            proposer = DraftModel(lambda: draft.step_model(capacity=capacity), draft.dims.vocab_size)
        else:
            proposer = PromptLookup()
        self.last_speculation = stats = SpeculationStats()
        auto = self._auto.setdefault(id(self.draft) if self.draft is not None else 0, AutoK())
        try:
            return speculative_generate(lambda: self._steps(rows, config), proposer, rows, config, rng=rng,
                                        decode=self._decode, stats=stats, auto=auto)
        except ORT_ERRORS as err:
            raise _run_error(err, "the generation graphs") from None

    @property
    def prompt_format(self) -> PromptFormat | None:
        """The format the model was trained with (manifest `prompt_format`), None for raw text."""
        return self.manifest.prompt_format

    def _format(self, texts: list[str], raw: bool, what: str) -> list[str]:
        """The texts the model reads: in the package's prompt format unless `raw`."""
        if not isinstance(raw, bool):
            raise InputError(f"raw must be True or False; got {raw!r:.40}")
        fmt = self.manifest.prompt_format
        if raw or fmt is None:
            return texts
        for i, text in enumerate(texts):
            if fmt.strip and not text.strip():
                raise InputError(f"{what}[{i}] is only whitespace; pass the text to answer")
        return [fmt.format(text) for text in texts]

    def generate(self, prompts: str | Sequence[str], config: GenerationConfig | None = None, *,
                 truncate: bool = False, rng: np.random.Generator | None = None, raw: bool = False,
                 **overrides: Any) -> list[Generation]:
        """Generate for each prompt; keyword overrides (max_new_tokens=..., ...) update `config`.

        A package with a `prompt_format` (an sft model: ``"{prompt} ="``) gets each prompt in
        that format and returns the parsed answer, so ``generate("seventeen")`` is called as
        training scored it (runtime/prompt_format.py; the prompt's and the answer's surrounding
        whitespace, ``\r`` included, is stripped). `raw=True` sends the text exactly as given
        and returns the decoded continuation as is; line endings inside a prompt are never
        rewritten. `Generation.prompt` is the text as the caller gave it."""
        self._require(self.can_generate, "generate", "a decoder-only, prefix-lm or encoder-decoder package")
        texts = self._texts(prompts, "generate prompts")
        model_texts = self._format(texts, raw, "generate prompts")
        fmt = None if raw else self.manifest.prompt_format
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        rows = self._check_ids(self._prompt_ids(model_texts, config, truncate), config)
        results = self._generate(rows, config, rng)
        return [dataclasses.replace(g, prompt=text, texts=[fmt.parse(t) for t in g.texts] if fmt else g.texts)
                for g, text in zip(results, texts)]

    def stream(self, prompt: str, config: GenerationConfig | None = None, *, truncate: bool = False,
               rng: np.random.Generator | None = None, raw: bool = False, **overrides: Any) -> Iterator[str]:
        """Yield the continuation's text as it is produced (greedy or sample). The prompt format
        and `raw` work as in `generate`; the pieces join to `generate`'s text."""
        self._require(self.can_generate, "stream", "a decoder-only, prefix-lm or encoder-decoder package")
        if not isinstance(prompt, str):
            raise InputError(f"stream() takes one prompt string; got {type(prompt).__name__}")
        model_texts = self._format(self._texts([prompt], "stream prompt"), raw, "stream prompt")
        fmt = None if raw else self.manifest.prompt_format
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        ids = self._check_ids(self._prompt_ids(model_texts, config, truncate), config)
        pieces = _guarded(gen.stream(self._steps(ids, config), ids[0], config, self._decode, rng=rng))
        return fmt.parse_stream(pieces) if fmt else pieces

    # ---------------------------------------------------------------------------------------
    # Chat (packages with a chat template: runtime/chat.py, FORMAT.md 5.3)
    # ---------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The package's Jinja chat template (manifest `chat_template`), None without one."""
        return self.manifest.chat_template

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> ChatPrompt:
        """The conversation in the package's chat template: the text, and its token ids
        tokenized without adding special tokens (the template wrote those it wants)."""
        self._require(self.can_generate, "chat", "a decoder-only, prefix-lm or encoder-decoder package")
        if self.manifest.chat_template is None:
            raise InputError(
                f"chat() needs a package with a chat template; {self.directory.name} has none (manifest chat_template: "
                "the model it was exported from shipped no template). Call generate() with the prompt text, or "
                "export a Hugging Face model whose tokenizer_config.json or chat_template.jinja holds its template",
                code="E_WRONG_KIND")
        if not isinstance(add_generation_prompt, bool):
            raise InputError(f"add_generation_prompt must be True or False; got {add_generation_prompt!r:.40}")
        variables = special_token_variables(self.manifest.special_tokens, self.tokenizer.id_to_token,
                                            self.manifest.chat_tokens)
        text = render_template(self.manifest.chat_template, check_messages(messages),
                                    add_generation_prompt=add_generation_prompt, variables=variables)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise InputError("the chat template rendered this conversation as no tokens; pass a message with content")
        return ChatPrompt(text, list(ids))

    def chat(self, messages: Sequence[dict[str, str]], config: GenerationConfig | None = None, *,
             add_generation_prompt: bool = True, rng: np.random.Generator | None = None,
             **overrides: Any) -> Generation:
        """Answer one conversation: `render_chat`, then generation on its ids with the package's
        defaults (its eos ids stop the answer) updated by `config` and the keyword overrides.
        `Generation.prompt` is the rendered text, `texts` the answers."""
        prompt = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        [result] = self._generate(self._check_ids([prompt.token_ids], config), config, rng)
        return dataclasses.replace(result, prompt=prompt.text)

    def stream_chat(self, messages: Sequence[dict[str, str]], config: GenerationConfig | None = None, *,
                    add_generation_prompt: bool = True, rng: np.random.Generator | None = None,
                    **overrides: Any) -> Iterator[str]:
        """`chat`'s answer as it is produced (greedy or sample); the pieces join to its text."""
        prompt = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        config = self.generation_config(config, **overrides)
        _check_rng(rng)
        ids = self._check_ids([prompt.token_ids], config)
        return _guarded(gen.stream(self._steps(ids, config), ids[0], config, self._decode, rng=rng))


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
                          "Pass rng=numpy.random.default_rng(seed), or seed=... (--seed) and no rng")


def _tokenizer(directory: Path, manifest: Manifest) -> Tokenizer:
    """The package's tokenizer, checked against the model: every id it can produce must index
    the vocabulary (a model may have more rows than the tokenizer has tokens, never fewer),
    and every special token id of the manifest must be a token of the tokenizer."""
    name = manifest.tokenizer.file
    try:
        tokenizer = Tokenizer.from_file(str(directory / name))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable or malformed files
        raise PackageError(f"tokenizer {name!r} could not be loaded ({str(err)[:200]}); re-export the package",
                           code="E_TOKENIZER") from None
    vocab = manifest.dims.vocab_size
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab:
        raise PackageError(
            f"tokenizer {name!r} produces token ids up to {top} but the model's vocabulary has {vocab} entries "
            f"(ids 0..{vocab - 1}): the tokenizer does not belong to this model; re-export the package with the "
            "tokenizer the model was trained with",
            code="E_TOKENIZER",
        )
    unknown = {role: i for role, i in manifest.special_tokens.items() if i >= 0 and tokenizer.id_to_token(i) is None}
    if unknown:
        raise PackageError(
            f"manifest special_tokens {unknown} are not tokens of {name!r}: the tokenizer does not belong to "
            "this model; re-export the package",
            code="E_TOKENIZER",
        )
    return tokenizer


def _carried_draft(directory: Path, entry: dict[str, Any], verify: bool) -> Path:
    """The draft subfolder, its manifest.json checked against the package manifest's draft entry
    (the draft's own manifest checksums the rest)."""
    folder = directory / entry["dir"]
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise PackageError(f"the package's draft {entry['dir']!r} has no manifest.json; re-attach the draft "
                           "(runtime.speculative.attach_draft) or re-export the package", code="E_MISSING_FILE")
    if verify:
        from .manifest import sha256_file
        if manifest_file.stat().st_size != entry["bytes"] or sha256_file(manifest_file) != entry["sha256"]:
            raise PackageError(f"the draft's manifest {entry['dir']}/manifest.json does not match the package "
                               "manifest's draft checksum: it was altered; re-attach the draft", code="E_CHECKSUM")
    return folder


FAST_START_LIMIT = 1 << 30  # bytes of package files below which load() prepacks on all threads by default


def _package_bytes(manifest: Manifest) -> int:
    """The bytes of the graph files and their external data (a weights file shared by several graphs once)."""
    files = {e.file: e.bytes for entry in manifest.graphs.values() for e in (entry.file, *entry.external_data)}
    return sum(files.values())


def load(package_dir: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None,
         verify: bool = True, fast_start: bool | None = None, manifest: Manifest | None = None,
         trusted_roots: Sequence[str | os.PathLike] | None = None,
         draft: "str | os.PathLike | Model | None" = None) -> Model:
    """Open a package: read and check the manifest, verify checksums, open one session per
    graph on `provider` ("cpu" or "cuda") and check each session's I/O against the contract.

    `fast_start` prepares the weights on all threads: a faster load at a transient memory
    peak (about 1.5-1.9x the weights while loading). None (the default): on for packages whose
    files total under FAST_START_LIMIT bytes (the cold start of small models), off above it
    (a 1.1B fp32 decoder's load peak: 7976 MiB with it, about the weights' 4.2 GB without).
    `manifest`: use this one instead of reading the package's manifest.json (the exporter
    loads a staged package before its manifest is written); it is checked the same way.
    `trusted_roots`: directories (content stores, e.g. the Hugging Face cache) that the
    package's files may be links into; other links leading out of the package are refused.
    The environment variable ONNXFORMER_TRUSTED_STORES adds more (os.pathsep-separated).
    `draft`: a draft package (a path, loaded the same way, or a loaded Model) for speculative
    decoding (`generate(..., speculative=K | "auto")`; see Model.set_draft)."""
    if not isinstance(package_dir, (str, os.PathLike)):
        raise PackageError(f"package_dir must be a path (str or os.PathLike); got {type(package_dir).__name__}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024):
        raise InputError(f"threads must be None (onnxruntime's choice) or an integer in [0, 1024]; got {threads!r:.60}")
    directory = Path(package_dir)
    roots = trusted_roots_of(trusted_roots)
    provider_name, device = _resolve_provider(provider)
    if manifest is not None and not isinstance(manifest, Manifest):
        raise PackageError(f"manifest must be a Manifest or None; got {type(manifest).__name__}", code="E_MANIFEST")
    manifest = Manifest.load(directory) if manifest is None else manifest
    if fast_start is None:
        fast_start = _package_bytes(manifest) < FAST_START_LIMIT
    # The checksums (a full read of every file) run on a second thread while onnxruntime opens
    # the sessions (hashlib and session creation both release the GIL): the load costs about
    # max(hash, open) instead of their sum. A damaged file is reported by its checksum even
    # when onnxruntime trips over it first, and no Model is returned before the check passes.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxformer-verify") as pool:
        checked = pool.submit(manifest.verify_files, directory, roots) if verify else None
        try:
            tokenizer = _tokenizer(directory, manifest)
            manifest.check_graph_limits(directory)
            sessions = {}
            for name, entry in manifest.graphs.items():
                check_external_data(directory / entry.file.file, [e.file for e in entry.external_data], roots)
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
    model = Model(directory, manifest, tokenizer, sessions, device)
    if draft is None and manifest.draft is not None:  # the package carries its draft (FORMAT.md 2.6)
        draft = _carried_draft(directory, manifest.draft, verify)
    if draft is not None:
        if not isinstance(draft, Model):
            draft = load(draft, provider=provider, threads=threads, verify=verify, fast_start=fast_start,
                         trusted_roots=trusted_roots)
        model.set_draft(draft)
    return model
