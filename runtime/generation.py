"""The search: greedy, sampling and beam search in numpy, over any step model. No torch, no
onnxruntime here: the runtime's ONNX sessions and the eager PyTorch model each supply a step
model (runtime/steps.py has the protocol); this file is the only implementation of the search.

Shape letters:

    B   prompts
    K   beams per prompt (beam search)
    N   rows run through the model: B, B * num_return_sequences (sample) or B * K (beam)
    V   vocabulary size

Each prompt starts one row (``prefill``); several sequences per prompt copy its row
(``select``). Each later step feeds one token per row (``advance``); rows that have finished
keep being fed ``pad_token_id`` and their outputs are ignored, so a seeded sample draws the
same numbers whatever finishes when.

Logits processing, in this order:

    1. apply_repetition_penalty   every strategy, when repetition_penalty != 1
    2. ban_repeated_ngrams        every strategy, when no_repeat_ngram_size > 0
    3. suppress_eos               every strategy, while fewer than min_new_tokens are generated
    4. force_tokens               every strategy: forced_bos_token_id where the row's sequence is one
                                  token long, then forced_eos_token_id at the row's last allowed token
    5. apply_temperature          sample only
    6. top_k_filter               sample only, when top_k > 0
    7. top_p_filter               sample only, when top_p < 1
    8. sample_tokens              sample: softmax, then inverse-CDF with one rng.random() per row
       argmax                     greedy (lowest token id among ties)
       log_softmax + beam step    beam (see beam_search)

Steps 1-4 count the row's sequence: ``model.sequence_start(prompt)`` (the prompt, or for an
encoder-decoder the decoder's start token) plus the generated tokens. Step 4 is transformers'
ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor: every logit of the row becomes
-inf but the forced id's (or ids'), which become 0. The sequence is one token long exactly when
an encoder-decoder generates its first token (the sequence is the decoder start), or a
decoder-only model continues a one-token prompt. A row's last allowed token is its
``new_token_limits`` entry minus one: ``max_new_tokens``, lowered by ``max_length`` (the
sequence, start included, at most that long) where it is set.

Logits are float32 through steps 1-7 and in ``log_softmax``; sampling probabilities and the
CDF are float64. Scores: greedy and sample report the sum of the chosen tokens' log-probs under
the distribution actually used (after steps 1-7; a forced token adds 0, or -log(n) among n
forced eos ids); beam search reports the length-normalised hypothesis score. Plain greedy (no
processing active) takes the step's own greedy choice, which a graph may compute: nothing of
size V is read per token (a forced step reads the logits).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import ConfigError, InputError
from .steps import (
    PaddedBatch,
    StepModel,
    StepResult,
    check_prompts,
    greedy_choice,
    is_int,
    left_pad,
)

logger = logging.getLogger(__name__)

STRATEGIES = ("greedy", "sample", "beam")
FINISH_REASONS = ("eos", "length", "stop")

Decode = Callable[[Sequence[int]], str]
"""Token ids -> text, e.g. ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``."""


# Advice in messages ------------------------------------------------------------------------
# A message that suggests a fix names it as both surfaces spell it, so the fix works where the
# user is: the Python API (``max_new_tokens=7``) and the CLI (``--max-new-tokens 7``).
# Node's generation.js spells its own (``{ max_new_tokens: 7 }``). tests/reliability/test_advice.py
# applies every such fix, literally, and sees the call succeed.
CLI_FLAGS: dict[str, str | None] = {"stop_strings": "--stop", "eos_token_ids": None, "early_stopping": None,
                                    "pad_token_id": None, "max_length": None, "forced_bos_token_id": None,
                                    "forced_eos_token_id": None, "speculative": None}  # None: no CLI flag (the package's value applies)


def option(name: str, value: Any) -> str:
    """``name=value (--flag value)``: a parameter setting as the API and the CLI spell it."""
    flag = CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is True:  # a switch: truncate=True (--truncate)
        return f"{name}=True ({flag})" if flag else f"{name}=True"
    return f"{name}={value!r} ({flag} {value})" if flag else f"{name}={value!r}"


# Configuration -----------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite; got {value!r}")
    return float(value)


# What an unset field means once nothing else (the caller, the package) set it.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "strategy": "greedy", "max_new_tokens": 32, "min_new_tokens": 0, "temperature": 1.0, "top_k": 0,
    "top_p": 1.0, "seed": None, "num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
    "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "eos_token_ids": (),
    "stop_strings": (), "pad_token_id": 0, "max_length": 0, "forced_bos_token_id": -1, "forced_eos_token_id": (),
    "speculative": 0,
}


@dataclass(frozen=True)
class GenerationConfig:
    """Search parameters: frozen, validated at construction, JSON round-trippable.

    Every field defaults to None, "unset": :meth:`resolve` fills unset fields from the
    package's generation defaults (its manifest), then from :data:`BUILTIN_DEFAULTS`. A value
    given, even an empty ``eos_token_ids`` (no eos) or ``pad_token_id=0``, is always kept.
    The strategy is named, never inferred: sampling parameters (temperature, top_k, top_p)
    only act with ``strategy="sample"``; ``num_beams`` > 1 requires ``strategy="beam"``.
    """

    strategy: str | None = None  # one of STRATEGIES; "greedy"
    max_new_tokens: int | None = None  # generated tokens at most (eos included); 32
    min_new_tokens: int | None = None  # eos is suppressed until this many tokens are generated; 0
    temperature: float | None = None  # sample: logits / temperature; must be > 0; 1.0
    top_k: int | None = None  # sample: keep the k highest logits (ties kept); 0 = off
    top_p: float | None = None  # sample: nucleus; keep the smallest prefix with prob mass >= top_p; 1 = off
    seed: int | None = None  # sample: seed of numpy.random.default_rng when no rng is passed; None = fresh
    num_beams: int | None = None  # beam: beams per prompt (K); 1
    length_penalty: float | None = None  # beam: hypothesis score = sum logprob / length ** length_penalty; 1.0
    early_stopping: bool | None = None  # beam: a prompt is done as soon as it has K finished hypotheses; False
    num_return_sequences: int | None = None  # sequences per prompt; greedy: 1; beam: <= num_beams; 1
    repetition_penalty: float | None = None  # CTRL penalty on tokens already in the sequence; 1 = off
    no_repeat_ngram_size: int | None = None  # ban tokens completing an n-gram already seen; 0 = off
    eos_token_ids: tuple[int, ...] | None = None  # generating one of these finishes a row; () = none
    stop_strings: tuple[str, ...] | None = None  # finish when the generated text contains one (needs decode)
    pad_token_id: int | None = None  # fed to finished rows; 0
    max_length: int | None = None  # the row's sequence (start + generated) at most this long; 0 = no limit
    forced_bos_token_id: int | None = None  # chosen after a one-token sequence (an encoder-decoder's first); -1 = none
    forced_eos_token_id: tuple[int, ...] | None = None  # forced as a row's last allowed token; () = none
    speculative: int | str | None = None  # greedy/sample: K draft tokens verified per target step, "auto" tunes K
    #                                       (runtime/speculative.py; the same output distribution); 0 = off

    def __post_init__(self) -> None:
        for name, value in _validated(self.set_fields()).items():
            object.__setattr__(self, name, value)  # frozen: normalised values (tuples, ints, floats)

    def set_fields(self) -> dict[str, Any]:
        """The fields given a value (not None); ``seed`` is set when not None."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name, value in BUILTIN_DEFAULTS.items() if value is not None)

    def resolve(self, defaults: Mapping[str, Any] | None = None) -> "GenerationConfig":
        """Every field set: this config's values, then ``defaults`` (a package's generation
        defaults), then BUILTIN_DEFAULTS; checked as a whole. A package's ``max_length`` does
        not apply to a call that sets ``max_new_tokens`` (transformers' precedence)."""
        merged = dict(BUILTIN_DEFAULTS)
        given = self.set_fields()
        if defaults:
            _reject_unknown(defaults)
            merged.update({k: v for k, v in defaults.items() if v is not None})
            if "max_new_tokens" in given and "max_length" not in given:
                merged["max_length"] = 0  # as in transformers: an explicit max_new_tokens wins over max_length
        merged.update(given)
        return GenerationConfig(**merged)

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The set fields, JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.set_fields().items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"generation parameters must be a mapping {{name: value}}; got {type(data).__name__}")
        _reject_unknown(data)
        return cls(**data)

    def replace(self, **changes: Any) -> "GenerationConfig":
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)


def _validated(values: dict[str, Any]) -> dict[str, Any]:
    """Each given field checked and normalised, then the rules between fields that are all given."""
    v = dict(values)
    if "strategy" in v and v["strategy"] not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}; got {v['strategy']!r}")
    for name, minimum in (("max_new_tokens", 0), ("min_new_tokens", 0), ("top_k", 0), ("seed", 0), ("num_beams", 1),
                          ("num_return_sequences", 1), ("no_repeat_ngram_size", 0), ("pad_token_id", 0),
                          ("max_length", 0)):
        if name in v:
            v[name] = _check_int(name, v[name], minimum)
    for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
        if name in v:
            v[name] = _check_float(name, v[name])
    if "top_p" in v and not 0.0 < v["top_p"] <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1]; got {v['top_p']!r}. Pass {option('top_p', 1.0)} to turn nucleus "
                          "filtering off.")
    if "repetition_penalty" in v and v["repetition_penalty"] <= 0:
        raise ConfigError(f"repetition_penalty must be > 0; got {v['repetition_penalty']!r}. "
                          f"Pass {option('repetition_penalty', 1.0)} to turn it off.")
    if "early_stopping" in v:
        if not isinstance(v["early_stopping"], (bool, np.bool_)):
            raise ConfigError(f"early_stopping must be a bool; got {v['early_stopping']!r}")
        v["early_stopping"] = bool(v["early_stopping"])
    for name in ("eos_token_ids", "forced_eos_token_id"):
        if name in v:
            eos = (v[name],) if is_int(v[name]) else v[name]
            if not isinstance(eos, (tuple, list)) or not all(is_int(t) and t >= 0 for t in eos):
                raise ConfigError(f"{name} must be a token id >= 0 or a tuple of them (empty = none); got {v[name]!r}")
            v[name] = tuple(int(t) for t in eos)
    if "forced_bos_token_id" in v:
        bos = v["forced_bos_token_id"]
        if not is_int(bos) or bos < -1:
            raise ConfigError(f"forced_bos_token_id must be a token id >= 0, or -1 for none; got {bos!r}")
        v["forced_bos_token_id"] = int(bos)
    if "speculative" in v:
        spec = v["speculative"]
        if spec != "auto" and (not is_int(spec) or spec < 0):
            raise ConfigError(f"speculative must be an integer >= 0 (draft tokens per step; 0 = off) or 'auto'; "
                              f"got {spec!r}")
        v["speculative"] = spec if spec == "auto" else int(spec)
    if "stop_strings" in v:
        stops = v["stop_strings"]
        stops = (stops,) if isinstance(stops, str) else stops
        if not isinstance(stops, (tuple, list)) or not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_strings must be a tuple of non-empty strings; got {v['stop_strings']!r}")
        v["stop_strings"] = tuple(stops)
    for fields, rule in _RULES:
        if all(name in v for name in fields):
            rule(*(v[name] for name in fields))
    return v


def _min_within_max(min_new: int, max_new: int) -> None:
    if min_new > max_new:
        raise ConfigError(f"min_new_tokens ({min_new}) must be <= max_new_tokens ({max_new}); pass "
                          f"{option('min_new_tokens', max_new)} or less, or {option('max_new_tokens', min_new)} or more")


def _positive_temperature(strategy: str, temperature: float) -> None:
    if strategy == "sample" and temperature <= 0:
        raise ConfigError(f"temperature must be > 0 for strategy 'sample'; got {temperature!r}. "
                          f"Pass a temperature > 0, e.g. {option('temperature', 1.0)}, or "
                          f"{option('strategy', 'greedy')} for deterministic decoding.")


def _beams_need_beam(strategy: str, num_beams: int) -> None:
    if num_beams > 1 and strategy != "beam":
        raise ConfigError(f"num_beams ({num_beams}) > 1 needs strategy 'beam'; got strategy {strategy!r}. "
                          f"Pass {option('strategy', 'beam')}, or {option('num_beams', 1)} for strategy {strategy!r}.")


def _one_greedy_sequence(strategy: str, num_return_sequences: int) -> None:
    if strategy == "greedy" and num_return_sequences != 1:
        raise ConfigError(f"num_return_sequences must be 1 for strategy 'greedy' (it is deterministic); got "
                          f"{num_return_sequences}. For several sequences pass {option('strategy', 'sample')}, or "
                          f"{option('strategy', 'beam')} with {option('num_beams', num_return_sequences)}.")


def _sequences_within_beams(strategy: str, num_return_sequences: int, num_beams: int) -> None:
    if strategy == "beam" and num_return_sequences > num_beams:
        raise ConfigError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}) "
                          f"for strategy 'beam'; pass {option('num_beams', num_return_sequences)} or more")


def _no_stop_strings_in_beam(strategy: str, stop_strings: tuple[str, ...]) -> None:
    if stop_strings and strategy == "beam":
        raise ConfigError(f"stop_strings ({stop_strings!r}) are not supported with strategy 'beam' (it stops at "
                          f"eos_token_ids); drop stop_strings (--stop), or pass {option('strategy', 'greedy')} "
                          f"or 'sample' with {option('num_beams', 1)}")


def _no_speculative_beam(strategy: str, speculative: int | str) -> None:
    if speculative != 0 and strategy == "beam":
        raise ConfigError(f"speculative ({speculative!r}) works with strategy 'greedy' or 'sample', not 'beam'; pass "
                          f"{option('speculative', 0)}, or {option('strategy', 'greedy')} with {option('num_beams', 1)}")


_RULES: tuple[tuple[tuple[str, ...], Callable[..., None]], ...] = (
    (("min_new_tokens", "max_new_tokens"), _min_within_max),
    (("strategy", "temperature"), _positive_temperature),
    (("strategy", "num_beams"), _beams_need_beam),
    (("strategy", "num_return_sequences"), _one_greedy_sequence),
    (("strategy", "num_return_sequences", "num_beams"), _sequences_within_beams),
    (("strategy", "stop_strings"), _no_stop_strings_in_beam),
    (("strategy", "speculative"), _no_speculative_beam),
)


def _reject_unknown(data: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(GenerationConfig)]
    unknown = sorted(set(data) - set(known), key=repr)  # key=repr: a key need not be a str
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown generation parameter(s): {', '.join(hints)}; valid: {', '.join(known)}",
                          code="E_UNKNOWN_PARAMETER")


def resolve_config(config: GenerationConfig | None, overrides: Mapping[str, Any],
                   package_defaults: Mapping[str, Any] | None) -> GenerationConfig:
    """The one place a call's parameters are settled: ``config`` (or an empty one), updated by
    keyword ``overrides``, then unset fields from the package's defaults, then built-ins."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise ConfigError(
            f"config must be a GenerationConfig or None; got {type(config).__name__}. "
            "Build one with GenerationConfig(...) or GenerationConfig.from_dict(...), or pass keyword overrides"
        )
    config = config if config is not None else GenerationConfig()
    if overrides:
        config = config.replace(**overrides)
    return config.resolve(package_defaults)


def _resolved(config: GenerationConfig) -> GenerationConfig:
    if not isinstance(config, GenerationConfig):
        raise ConfigError(f"config must be a GenerationConfig; got {type(config).__name__}")
    return config if config.is_resolved else config.resolve()


def _check_vocab(vocab_size: int, prompts: list[list[int]], config: GenerationConfig) -> None:
    """Token ids must index the vocabulary; checked before the model runs."""
    top = max(max(p) for p in prompts)
    if top >= vocab_size:
        raise InputError(f"prompt token id {top} is out of range for vocab_size {vocab_size}", code="E_TOKEN_ID")
    for name, ids in (("eos_token_ids", config.eos_token_ids), ("pad_token_id", (config.pad_token_id,)),
                      ("forced_bos_token_id", (config.forced_bos_token_id,)),
                      ("forced_eos_token_id", config.forced_eos_token_id)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ConfigError(f"{name} {bad} out of range for vocab_size {vocab_size}; pass token ids below "
                              f"{vocab_size} (the package's vocabulary)")


def new_token_limits(starts: Sequence[Sequence[int]], config: GenerationConfig) -> list[int]:
    """How many tokens each row may generate: ``max_new_tokens``, and where ``max_length`` is set
    at most ``max_length - len(start)`` (transformers' max_length: the whole sequence, prompt
    or decoder start included), never below 0. ``starts``: ``model.sequence_start(prompt)``."""
    if config.max_length == 0:
        return [config.max_new_tokens] * len(starts)
    return [max(0, min(config.max_new_tokens, config.max_length - len(s))) for s in starts]


def _logits(result: StepResult, n: int, vocab: int) -> np.ndarray:
    """The step's logits, checked: a step model that breaks the protocol is a bug (traceback)."""
    logits = result.logits
    if logits.shape != (n, vocab):
        raise ValueError(f"the step model returned logits of shape {logits.shape}; the protocol needs (N={n}, V={vocab})")
    return logits


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


def force_tokens(logits: np.ndarray, rows: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
    """In each of ``rows``, every logit -inf but those of ``token_ids``, which are 0 (a forced
    choice; among several ids argmax takes the lowest)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if len(rows):
        rows = np.asarray(rows, dtype=np.int64)
        out[rows] = -np.inf
        out[np.ix_(rows, np.asarray(token_ids, dtype=np.int64))] = 0.0
    return out


def forced_rows(seqs: Sequence[Sequence[int]], config: GenerationConfig, n_generated: int,
                limits: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Step 4's rows at this step: (rows whose next token is forced_bos_token_id: the sequence is
    one token long; rows whose next token is forced_eos_token_id: their last allowed token).
    ``limits``: per row, from :func:`new_token_limits` (default: max_new_tokens for every row)."""
    bos: list[int] = []
    if config.forced_bos_token_id >= 0 and n_generated == 0:
        bos = [r for r, s in enumerate(seqs) if len(s) == 1]
    eos: list[int] = []
    if config.forced_eos_token_id:
        limits = limits if limits is not None else [config.max_new_tokens] * len(seqs)
        eos = [r for r, limit in enumerate(limits) if n_generated == limit - 1]
    return bos, eos


def process_logits(
    logits: np.ndarray, seqs: Sequence[Sequence[int]], config: GenerationConfig, n_generated: int,
    limits: Sequence[int] | None = None,
) -> np.ndarray:
    """Steps 1-4 of the processing order (every strategy). ``limits``: see :func:`forced_rows`."""
    out = np.asarray(logits, dtype=np.float32)
    if config.repetition_penalty != 1.0:
        out = apply_repetition_penalty(out, seqs, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        out = ban_repeated_ngrams(out, seqs, config.no_repeat_ngram_size)
    if n_generated < config.min_new_tokens:
        out = suppress_eos(out, config.eos_token_ids)
    bos, eos = forced_rows(seqs, config, n_generated, limits)
    if bos:
        out = force_tokens(out, bos, (config.forced_bos_token_id,))
    if eos:  # after bos, as transformers orders them: a one-token limit ends in eos
        out = force_tokens(out, eos, config.forced_eos_token_id)
    return out


def sampling_filters(logits: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """Steps 5-7 of the processing order (sample only)."""
    out = apply_temperature(logits, config.temperature)
    if config.top_k > 0:
        out = top_k_filter(out, config.top_k)
    if config.top_p < 1.0:
        out = top_p_filter(out, config.top_p)
    return out


# Output ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """One prompt's result, the same for every strategy and entry point: ``token_ids[j]``,
    ``scores[j]``, ``finish_reasons[j]`` and ``texts[j]`` for each returned sequence j."""

    prompt: str | list[int]  # the prompt as the caller gave it: text, or token ids
    token_ids: list[list[int]]  # generated ids only (no prompt), eos included if produced
    scores: list[float]  # greedy/sample: sum of log-probs; beam: length-normalised score
    finish_reasons: list[str]  # "eos" | "length" | "stop"
    texts: list[str] | None = None  # decoded text (cut at a stop string); None without decode

    @property
    def text(self) -> str:
        if self.texts is None:
            raise ConfigError("this generation ran without a decode function; read token_ids, or pass decode=")
        return self.texts[0]


def _results(prompts: list[list[int]], copies: int, sequences, scores, reasons, texts) -> list[Generation]:
    group = lambda items: [list(items[b * copies:(b + 1) * copies]) for b in range(len(prompts))]  # noqa: E731
    grouped_texts = group(texts) if texts is not None else [None] * len(prompts)
    return [Generation(p, s, [float(x) for x in sc], r, t)
            for p, s, sc, r, t in zip(prompts, group(sequences), group(scores), group(reasons), grouped_texts)]


# Greedy and sample: one loop, two token choosers -------------------------------------------
@dataclass
class _Rows:
    """Per-row state of the greedy/sample loop (N rows)."""

    history: list[list[int]]  # sequence start + generated, for the logits processors
    generated: list[list[int]]
    finished: np.ndarray  # (N,) bool
    reasons: list[str]
    scores: np.ndarray  # (N,) float64
    texts: list[str | None]
    stop_at: list[int | None]  # text index where a stop string starts
    limits: list[int]  # tokens each row may generate (new_token_limits)


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found) if found else None


Chooser = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # logits (N, V) -> tokens, logprobs


def _start(model: StepModel, rows: list[list[int]], copies: int) -> StepResult:
    """Prefill each prompt once, then copy its row ``copies`` times (row r continues prompt r // copies).
    A search owns the step model's rows while it runs and releases them when it ends."""
    if model.rows:
        raise ValueError(f"the search needs a step model with no running rows; this one has {model.rows}")
    result = model.prefill(rows)
    if copies > 1:
        expand = np.repeat(np.arange(len(rows)), copies)  # (N,)
        model.select(expand)
        result = result.take(expand)
    return result


def _decode_loop(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    choose: Chooser,
    decode: Decode | None,
    copies: int,
    live_text: bool = False,
) -> tuple[list[list[int]], _Rows, Iterator[None]]:
    """Validate, then return the prompts, the row state and a generator that advances it one
    token per ``next()``. ``state.texts`` is kept current after every token when there are
    stop strings or ``live_text`` (streaming)."""
    if config.stop_strings and decode is None:
        raise ConfigError(f"stop_strings {config.stop_strings!r} need a decode function; pass decode=")
    rows = check_prompts(prompts)
    _check_vocab(model.vocab_size, rows, config)
    n = len(rows) * copies
    empty_text = decode([]) if decode is not None else None
    history = [model.sequence_start(rows[r // copies]) for r in range(n)]
    state = _Rows(
        history=history,
        generated=[[] for _ in range(n)],
        finished=np.zeros(n, dtype=bool),
        reasons=["length"] * n,
        scores=np.zeros(n, dtype=np.float64),
        texts=[empty_text] * n,
        stop_at=[None] * n,
        limits=new_token_limits(history, config),
    )
    live_decode = decode if (config.stop_strings or live_text) else None
    return rows, state, _advance(model, rows, config, choose, live_decode, copies, state)


def _advance(
    model: StepModel,
    rows: list[list[int]],
    config: GenerationConfig,
    choose: Chooser,
    decode: Decode | None,
    copies: int,
    state: _Rows,
) -> Iterator[None]:
    if max(state.limits) == 0:
        return
    try:
        yield from _token_loop(model, rows, config, choose, decode, copies, state)
    finally:  # also when a stream is closed early
        if model.rows:
            model.release(np.arange(model.rows))


def _token_loop(model: StepModel, rows: list[list[int]], config: GenerationConfig, choose: Chooser,
                decode: Decode | None, copies: int, state: _Rows) -> Iterator[None]:
    n, vocab = len(state.generated), model.vocab_size
    result = _start(model, rows, copies)
    # Plain greedy takes the step's own greedy choice (the graph's, where it computes one).
    plain = (config.strategy == "greedy" and config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0)
    eos_ids = set(config.eos_token_ids)
    limits = state.limits
    # Rows that may generate fewer tokens than others (max_length) finish by length on their own.
    uneven = min(limits) != max(limits)
    for r in range(n):
        if limits[r] == 0:
            state.finished[r] = True  # reason "length", no tokens
    # Steps where step 4 forces some row's token: those read the logits.
    forced_steps = ({limit - 1 for limit in limits} if config.forced_eos_token_id else set()) | (
        {0} if config.forced_bos_token_id >= 0 else set())
    # Per token: the choice, then the bookkeeping. While no row has finished (the usual case)
    # it is plain Python over N ints: the per-token work is what a fast graph step waits on.
    pad, last, n_finished = config.pad_token_id, max(limits) - 1, int(state.finished.sum())
    for t in range(last + 1):
        tokens = logprobs = None
        if plain and (t >= config.min_new_tokens or not eos_ids) and t not in forced_steps:
            tokens, logprobs = result.next_token, result.next_logprob  # (N,), (N,)
            if tokens.shape != (n,) or not np.isfinite(logprobs).all():
                tokens = None  # a row without a finite choice: take it from the logits
        if tokens is None:
            processed = process_logits(_logits(result, n, vocab), state.history, config, t, limits)
            tokens, logprobs = choose(processed)
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
                stop = find_stop(state.texts[r], config.stop_strings) if config.stop_strings else None
                if stop is not None and not state.finished[r]:
                    state.finished[r], state.reasons[r], state.stop_at[r] = True, "stop", stop
                    n_finished += 1
                    logger.debug("row %d hit a stop string at text index %d", r, stop)
        if uneven:
            for r in active:
                if not state.finished[r] and len(state.generated[r]) >= limits[r]:
                    state.finished[r] = True  # reason "length"
                    n_finished += 1
        yield None
        if n_finished == n or t == last:
            return
        result = model.advance(np.array(chosen, dtype=np.int64))


def _final_text(state: _Rows, r: int, decode: Decode) -> str:
    """Row r's text, cut where a stop string starts (the text was decoded when it stopped)."""
    if state.stop_at[r] is not None:
        return (state.texts[r] or "")[: state.stop_at[r]]
    return decode(state.generated[r])


def _collect(rows: list[list[int]], state: _Rows, steps: Iterator[None], copies: int,
             decode: Decode | None) -> list[Generation]:
    for _ in steps:
        pass
    texts = None if decode is None else [_final_text(state, r, decode) for r in range(len(state.generated))]
    return _results(rows, copies, state.generated, state.scores, state.reasons, texts)


def _require_strategy(config: GenerationConfig, strategy: str) -> GenerationConfig:
    config = _resolved(config)
    if config.strategy != strategy:
        raise ConfigError(
            f"{strategy}() got a config with strategy {config.strategy!r}; "
            f"call {'beam_search' if config.strategy == 'beam' else config.strategy}() or generate()"
        )
    return config


def _sample_chooser(config: GenerationConfig, rng: np.random.Generator) -> Chooser:
    def choose(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        filtered = sampling_filters(logits, config)
        tokens = sample_tokens(filtered, rng)
        logprobs = np.take_along_axis(log_softmax(filtered), tokens[:, None], axis=1)[:, 0]
        return tokens, logprobs

    return choose


def greedy(
    model: StepModel, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, decode: Decode | None = None
) -> list[Generation]:
    """Pick the highest processed logit at every step (lowest id among ties)."""
    config = _require_strategy(config, "greedy")
    rows, state, steps = _decode_loop(model, prompts, config, greedy_choice, decode, copies=1)
    return _collect(rows, state, steps, 1, decode)


def sample(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    rng: np.random.Generator | None = None,
    decode: Decode | None = None,
) -> list[Generation]:
    """Sample ``num_return_sequences`` continuations per prompt.

    ``rng`` defaults to ``numpy.random.default_rng(config.seed)``; every step draws
    ``rng.random(N)`` once (N = prompts * num_return_sequences, finished rows included), so a
    seed fixes the output for a given batch.
    """
    config = _require_strategy(config, "sample")
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    copies = config.num_return_sequences
    rows, state, steps = _decode_loop(model, prompts, config, _sample_chooser(config, rng), decode, copies)
    return _collect(rows, state, steps, copies, decode)


# Beam search -------------------------------------------------------------------------------
class _Hypothesis(NamedTuple):
    score: float
    order: int  # insertion counter: earlier wins ties
    tokens: list[int]
    reason: str


class _Beams:
    """The finished hypotheses of every prompt, best first, at most K each."""

    def __init__(self, n_prompts: int, k: int):
        self.k, self.hyps, self.counter = k, [[] for _ in range(n_prompts)], 0

    def add(self, b: int, score: float, tokens: list[int], reason: str) -> None:
        hyps = self.hyps[b]
        hyps.append(_Hypothesis(score, self.counter, tokens, reason))
        self.counter += 1
        hyps.sort(key=lambda h: (-h.score, h.order))
        del hyps[self.k:]


def _beam_candidates(cand: np.ndarray, top: np.ndarray, b: int, k: int, vocab: int, eos: set[int],
                     norm: np.float32, beams: list[list[int]], hyps: _Beams,
                     out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Walk prompt b's candidates in order: an eos ranked < K closes a hypothesis, any other
    token fills the next running beam, until K beams are filled."""
    next_rows, next_tokens, next_scores = out
    base, filled = b * k, 0
    for rank, flat in enumerate(top[b]):
        beam, tok = divmod(int(flat), vocab)
        score = cand[b, flat]
        if tok in eos:
            if rank < k:
                hyps.add(b, float(score / norm), beams[base + beam] + [tok], "eos")
            continue
        next_rows[base + filled], next_tokens[base + filled] = base + beam, tok
        next_scores[base + filled] = score
        filled += 1
        if filled == k:
            break


def beam_search(
    model: StepModel, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, decode: Decode | None = None
) -> list[Generation]:
    """Beam search with K = num_beams beams per prompt.

    * The prompts run once (B rows); the rows are then copied to B*K. Beam scores start at
      [0, -inf, ..., -inf] per prompt.
    * Step t = 0 .. max_new_tokens-1: ``logprobs = log_softmax(process_logits(...))`` (N, V)
      (repetition penalty, no-repeat n-gram, min_new_tokens eos suppression, forced bos / eos;
      no temperature, top-k or top-p); ``cand = scores[:, None] + logprobs`` reshaped (B, K*V); take the first
      M = max(2, 1 + len(eos_token_ids)) * K candidates of a stable sort of ``-cand`` (M = 2K for
      at most one eos id; lower flat index first among ties), capped at K*V.
    * For each prompt not done, walk the candidates in order: ``beam = flat // V``,
      ``tok = flat % V``. An eos token adds the finished hypothesis ``beam's tokens + [tok]``
      with score ``cand / (t+1) ** length_penalty`` if its rank among the M candidates is < K,
      and is otherwise skipped; any other token becomes the next running beam. Stop after K
      running beams (if the candidates run out first, the remaining slots copy beam 0 with
      ``pad_token_id`` and score -inf). A prompt keeps its K best hypotheses (score descending,
      earlier added first among ties).
    * After the step, a prompt with K hypotheses is done if ``early_stopping``, or else if its
      worst hypothesis score >= the best running beam's raw score (the sum of its log-probs)
      / (t+1) ** length_penalty.
    * Rows of done prompts are fed ``pad_token_id`` and ignored. The rows are reordered to the
      chosen beams every step. A prompt not done after the step of its last allowed token
      (t = limit - 1, the prompt's ``new_token_limits`` entry: max_new_tokens, or less under
      max_length) adds all K running beams as hypotheses (reason "length") with score
      ``raw / (t+1) ** length_penalty`` and is done. Stop when every prompt is done.
    * Return the ``num_return_sequences`` best hypotheses per prompt.

    All scores are float32 arithmetic. A prompt allowed 0 tokens gets empty sequences with the
    initial raw scores (0, -inf, ...); when every prompt is, no model is called.
    """
    config = _require_strategy(config, "beam")
    rows = check_prompts(prompts)
    _check_vocab(model.vocab_size, rows, config)
    n_prompts, k, keep = len(rows), config.num_beams, config.num_return_sequences
    limits = new_token_limits([model.sequence_start(r) for r in rows], config)  # (B,)
    if max(limits) == 0:
        initial = [0.0] + [-math.inf] * (k - 1)
        texts = [decode([])] * (n_prompts * keep) if decode is not None else None
        return _results(rows, keep, [[]] * (n_prompts * keep), initial[:keep] * n_prompts,
                        ["length"] * (n_prompts * keep), texts)

    try:
        return _beam_loop(model, rows, config, limits, decode)
    finally:
        if model.rows:
            model.release(np.arange(model.rows))


def _beam_loop(model: StepModel, rows: list[list[int]], config: GenerationConfig, limits: list[int],
               decode: Decode | None) -> list[Generation]:
    n_prompts, k, keep, vocab = len(rows), config.num_beams, config.num_return_sequences, model.vocab_size
    n = n_prompts * k
    result = _start(model, rows, k)
    eos = set(config.eos_token_ids)
    n_cand = min(max(2, 1 + len(eos)) * k, k * vocab)
    lp = np.float32(config.length_penalty)
    history = [model.sequence_start(rows[r // k]) for r in range(n)]
    beams: list[list[int]] = [[] for _ in range(n)]
    scores = np.full(n, -np.inf, dtype=np.float32)  # (N,)
    scores[::k] = 0.0
    hyps = _Beams(n_prompts, k)
    done = np.zeros(n_prompts, dtype=bool)
    for b in range(n_prompts):
        if limits[b] == 0:  # nothing to generate: K empty hypotheses at the initial scores
            for j in range(k):
                hyps.add(b, float(scores[b * k + j]), [], "length")
            done[b] = True
    row_limits = np.repeat(limits, k).tolist()  # (N,)
    for t in range(max(limits)):
        processed = process_logits(_logits(result, n, vocab), history, config, t, row_limits)
        logprobs = log_softmax(processed)  # (N, V) float32
        cand = (scores[:, None] + logprobs).reshape(n_prompts, k * vocab)  # (B, K*V)
        top = np.argsort(-cand, axis=1, kind="stable")[:, :n_cand]  # (B, M)
        norm = np.float32(t + 1) ** lp
        next_rows = np.repeat(np.arange(n_prompts) * k, k)  # (N,) default: copy beam 0
        next_tokens = np.full(n, config.pad_token_id, dtype=np.int64)
        next_scores = np.full(n, -np.inf, dtype=np.float32)
        for b in range(n_prompts):
            if done[b]:
                next_rows[b * k:(b + 1) * k] = np.arange(b * k, (b + 1) * k)
                continue
            _beam_candidates(cand, top, b, k, vocab, eos, norm, beams, hyps, (next_rows, next_tokens, next_scores))
            if len(hyps.hyps[b]) == k:
                done[b] = config.early_stopping or hyps.hyps[b][-1].score >= float(next_scores[b * k] / norm)
        beams = [beams[r] + [int(tok)] for r, tok in zip(next_rows, next_tokens)]
        history = [history[r] + [int(tok)] for r, tok in zip(next_rows, next_tokens)]
        scores = next_scores
        for b in np.flatnonzero(~done):
            if t == limits[b] - 1:  # the prompt's last allowed token: its running beams end here
                for r in range(b * k, (b + 1) * k):
                    hyps.add(b, float(scores[r] / norm), beams[r], "length")
                done[b] = True
        if done.all():
            break
        model.select(next_rows)
        result = model.advance(next_tokens)

    best = [h[:keep] for h in hyps.hyps]
    return [Generation(rows[b], [h.tokens for h in hs], [h.score for h in hs], [h.reason for h in hs],
                       [decode(h.tokens) for h in hs] if decode is not None else None)
            for b, hs in enumerate(best)]


# Entry points ------------------------------------------------------------------------------
def generate(
    model: StepModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    rng: np.random.Generator | None = None,
    decode: Decode | None = None,
) -> list[Generation]:
    """Run ``config.strategy`` (greedy, sample or beam_search); one Generation per prompt."""
    config = _resolved(config)
    if config.strategy == "greedy":
        return greedy(model, prompts, config, decode=decode)
    if config.strategy == "sample":
        return sample(model, prompts, config, rng=rng, decode=decode)
    return beam_search(model, prompts, config, decode=decode)


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    held = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


def stable_text(text: str, stop_strings: Sequence[str]) -> str:
    """What of a continuation's text can be sent already: not an incomplete character at its end
    (U+FFFD until the next byte-level token completes it), nor a tail that could start a stop string."""
    stable = text.rstrip("\ufffd")
    return stable[: len(stable) - held_back(stable, stop_strings)]


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
    config = _resolved(config)
    if config.strategy == "beam":
        beams = f" with {option('num_beams', 1)}" if config.num_beams > 1 else ""
        raise ConfigError("stream() supports strategy 'greedy' or 'sample'; got 'beam'. For beam search call "
                          f"generate() instead (without --stream), or pass {option('strategy', 'greedy')}{beams}.")
    if config.num_return_sequences != 1:
        raise ConfigError(
            f"stream() yields one sequence; got num_return_sequences={config.num_return_sequences}. Pass "
            f"{option('num_return_sequences', 1)}, or call generate() instead (without --stream) for several."
        )
    if config.strategy == "greedy":
        chooser = greedy_choice
    else:
        chooser = _sample_chooser(config, rng if rng is not None else np.random.default_rng(config.seed))
    _, state, steps = _decode_loop(model, [prompt], config, chooser, decode, copies=1, live_text=True)
    return _text_deltas(state, steps, config.stop_strings, decode)


def _text_deltas(state: _Rows, steps: Iterator[None], stop_strings: Sequence[str], decode: Decode) -> Iterator[str]:
    sent = ""
    for _ in steps:
        if state.stop_at[0] is not None:
            break
        stable = stable_text(state.texts[0] or "", stop_strings)
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
    "STRATEGIES", "FINISH_REASONS", "BUILTIN_DEFAULTS", "Decode", "GenerationConfig", "resolve_config",
    "StepResult", "StepModel", "PaddedBatch", "left_pad", "check_prompts", "greedy_choice", "Generation",
    "apply_repetition_penalty", "ban_repeated_ngrams", "suppress_eos", "force_tokens", "forced_rows",
    "new_token_limits", "apply_temperature",
    "top_k_filter", "top_p_filter", "log_softmax", "softmax", "sample_tokens",
    "process_logits", "sampling_filters", "find_stop", "held_back", "stable_text",
    "greedy", "sample", "beam_search", "generate", "stream",
]
