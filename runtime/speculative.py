"""Speculative decoding: a cheap proposer guesses K tokens, the target checks them in one step.

numpy only, over the step protocol (runtime/steps.py), batch 1: each prompt (and each of its
``num_return_sequences``) runs on its own target row. One round:

    feed     = [pending] + drafts                 the last chosen token (not yet fed) and K guesses
    logits   = target.advance(feed)               (K+1, V): after pending, after each draft
    j = 0 .. K: the target's distribution p_j (logits processed exactly as plain greedy/sample
    process them, with the sequence so far, drafts accepted up to j included) decides draft j:
        greedy   accept while draft j == argmax p_j; the first mismatch emits argmax p_j
        sample   accept draft x with probability min(1, p_j(x) / q_j(x)); on rejection emit a
                 token drawn from max(0, p_j - q_j) normalised (Leviathan et al. 2023, Chen et
                 al. 2023), so every emitted token is distributed as the target's p_j
        after K accepted drafts, p_K gives one more token (the bonus)
    target.rewind(K - accepted)                   forget the rejected drafts' cache entries

The emitted token becomes the next pending one. Greedy output is therefore the target's own
greedy output token for token (up to the floating-point rounding of a K+1-token step against
one-token steps), whatever the proposer guesses.

Proposers (:class:`Proposer`): :class:`DraftModel` (a smaller package's step model over the
same vocabulary, rewound like the target) and :class:`PromptLookup` (n-gram matches in the
prompt and the text so far; a guess with q = a point mass, so sampling accepts x with
probability p(x) and otherwise draws from p without x).

``speculative="auto"`` (:class:`AutoK`): K starts at 4, grows by 2 after a round that accepted
every draft and shrinks to accepted + 1 otherwise; the measured seconds per emitted token of
speculative rounds are compared with those of plain rounds (K = 0, probed at the start and
now and then), and speculation is off while it is slower.

Shape letters: K draft tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atomic import publish_dir, replace_text, staging_dir
from .errors import ConfigError, PackageError
from .generation import (
    Decode,
    Generation,
    GenerationConfig,
    _check_vocab,
    find_stop,
    log_softmax,
    new_token_limits,
    process_logits,
    sampling_filters,
    softmax,
)
from .steps import StepModel, check_prompts

logger = logging.getLogger(__name__)

AUTO_START, AUTO_MAX = 4, 8  # "auto": the first K and the largest


# Proposers ---------------------------------------------------------------------------------
@dataclass
class Proposal:
    tokens: list[int]  # the K guesses
    probs: np.ndarray | None  # (K, V) the proposer's sampling distributions q; None: point masses


class Proposer(ABC):
    """Guesses the next tokens of one sequence. ``start`` once per sequence; ``propose`` sees
    the tokens generated so far (the last one not yet checked by the target's next step)."""

    @abstractmethod
    def start(self, prompt: list[int]) -> None: ...

    @abstractmethod
    def propose(self, generated: list[int], k: int, choose: "Chooser") -> Proposal: ...

    def close(self) -> None:
        """Release what ``start`` took."""


class PromptLookup(Proposer):
    """The tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n = max_ngram down to 1) in the prompt and the text so far; nothing when none occurs."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ConfigError(f"max_ngram must be >= 1; got {max_ngram}")
        self.max_ngram = max_ngram
        self.prompt: list[int] = []

    def start(self, prompt: list[int]) -> None:
        self.prompt = list(prompt)

    def propose(self, generated: list[int], k: int, choose: "Chooser") -> Proposal:
        seq = self.prompt + generated
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # latest match first, not the tail itself
                if seq[i:i + n] == tail:
                    follow = seq[i + n:i + n + k]
                    if follow:
                        return Proposal(follow, None)
        return Proposal([], None)


class DraftModel(Proposer):
    """A draft package's step model: it is fed the generated tokens (rewound past the ones the
    target rejected) and proposes by the same rule as the search (argmax, or a sample of its
    processed distribution)."""

    def __init__(self, make_steps: Callable[[], StepModel], vocab_size: int):
        self.make_steps, self.vocab_size = make_steps, vocab_size
        self.steps: StepModel | None = None
        self.fed: list[int] = []  # generated tokens in the draft's cache
        self.last: np.ndarray | None = None  # (V,) logits after the last fed token

    def start(self, prompt: list[int]) -> None:
        """Remember the prompt; the draft prefills at its first proposal (never, while "auto"
        keeps speculation off)."""
        self.close()
        self.prompt = list(prompt)

    def propose(self, generated: list[int], k: int, choose: "Chooser") -> Proposal:
        if self.steps is None:
            self.steps = self.make_steps()
            self.last = np.array(self.steps.prefill([self.prompt]).logits[0], dtype=np.float32)
            self.fed = []
        steps = self.steps
        common = 0
        for a, b in zip(self.fed, generated):
            if a != b:
                break
            common += 1
        if len(self.fed) > common:
            steps.rewind([len(self.fed) - common])
            self.fed = self.fed[:common]
        new = generated[common:]
        if new:
            logits = steps.advance(np.array([new], dtype=np.int64)).logits
            self.last = np.array(logits[0, -1] if logits.ndim == 3 else logits[0], dtype=np.float32)
            self.fed = self.fed + new
        tokens: list[int] = []
        probs = []
        last = self.last
        for j in range(k):
            token, q = choose(last, generated + tokens, True)
            tokens.append(token)
            probs.append(q)
            if j < k - 1:
                last = np.array(steps.advance(np.array([token], dtype=np.int64)).logits[0], dtype=np.float32)
                self.fed = self.fed + [token]
                self.last = last
        return Proposal(tokens, None if probs[0] is None else np.stack(probs))

    def close(self) -> None:
        if self.steps is not None and self.steps.rows:
            self.steps.release(np.arange(self.steps.rows))
        self.steps = None


# "auto" ------------------------------------------------------------------------------------
@dataclass
class AutoK:
    """Tunes K from the acceptance and turns speculation off while it costs more per token."""

    k: int = AUTO_START
    plain: list[float] = field(default_factory=list)  # seconds per emitted token, plain rounds
    spec: list[float] = field(default_factory=list)  # the same, speculative rounds
    rounds: int = 0
    off: bool = False

    def next_k(self) -> int:
        self.rounds += 1
        if len(self.plain) < 2 or self.rounds % 16 == 0:  # probe the plain cost now and then
            return 0
        if self.off and self.rounds % 32 != 1:  # off: try speculation again now and then
            return 0
        return self.k

    def record(self, k: int, proposed: int, accepted: int, emitted: int, seconds: float) -> None:
        per_token = seconds / max(emitted, 1)
        if k == 0 or proposed == 0:
            self.plain = (self.plain + [per_token])[-8:]
            return
        self.spec = (self.spec + [per_token])[-8:]
        self.k = min(self.k + 2, AUTO_MAX) if accepted == proposed else max(1, accepted + 1)
        if len(self.spec) >= 3 and self.plain:
            self.off = float(np.median(self.spec)) > float(np.median(self.plain))


# The search --------------------------------------------------------------------------------
Chooser = Callable[[np.ndarray, list[int], bool], tuple[int, np.ndarray | None]]
"""(logits (V,), generated tokens so far, for_draft) -> (token, q (V,) float64 for sampling, else None)."""


@dataclass
class SpeculationStats:
    """What speculation did over a call: the proposer's guesses, the accepted ones, rounds."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    emitted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class _Sequence:
    """One sequence being generated: its tokens, score and how it finished."""

    def __init__(self, start: list[int], config: GenerationConfig, limit: int, decode: Decode | None):
        self.start, self.config, self.limit, self.decode = start, config, limit, decode
        self.generated: list[int] = []
        self.score, self.reason, self.stop_at, self.done = 0.0, "length", None, limit == 0
        self.eos = set(config.eos_token_ids)

    def processed(self, logits: np.ndarray, tokens: list[int]) -> np.ndarray:
        """Steps 1-4 of the processing order for the position after ``tokens`` (generated)."""
        return process_logits(logits[None], [self.start + tokens], self.config, len(tokens), [self.limit])[0]

    def commit(self, token: int, logprob: float) -> None:
        self.generated.append(int(token))
        self.score += float(logprob)
        if token in self.eos:
            self.done, self.reason = True, "eos"
        elif self.config.stop_strings:
            stop = find_stop(self.decode(self.generated), self.config.stop_strings)
            if stop is not None:
                self.done, self.reason, self.stop_at = True, "stop", stop
        if not self.done and len(self.generated) >= self.limit:
            self.done = True


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def speculative_generate(
    model: Callable[[], StepModel],
    proposer: Proposer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    rng: np.random.Generator | None = None,
    decode: Decode | None = None,
    stats: SpeculationStats | None = None,
    auto: AutoK | None = None,
) -> list[Generation]:
    """Greedy or sample with speculation (``config.speculative``: K, or "auto"); one Generation
    per prompt, as :func:`runtime.generation.generate` returns. ``model`` makes a fresh target
    step model (one per sequence). ``auto``: the tuner "auto" keeps across sequences and calls
    (a Model keeps one per proposer); a fresh one per call when None."""
    if not config.is_resolved:
        config = config.resolve()
    if config.strategy not in ("greedy", "sample"):
        raise ConfigError(f"speculative decoding supports strategy 'greedy' or 'sample'; got {config.strategy!r}")
    if config.stop_strings and decode is None:
        raise ConfigError(f"stop_strings {config.stop_strings!r} need a decode function; pass decode=")
    rows = check_prompts(prompts)
    sampling = config.strategy == "sample"
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    stats = stats if stats is not None else SpeculationStats()
    copies = config.num_return_sequences if sampling else 1
    if config.speculative == "auto" and auto is None:
        auto = AutoK()
    results = []
    for prompt in rows:
        seqs = []
        for _ in range(copies):
            steps = model()
            _check_vocab(steps.vocab_size, [prompt], config)
            try:
                seqs.append(_one(steps, proposer, prompt, config, rng, decode, stats, sampling, auto))
            finally:
                if steps.rows:
                    steps.release(np.arange(steps.rows))
                proposer.close()
        texts = None
        if decode is not None:
            texts = [decode(s.generated)[: s.stop_at] if s.stop_at is not None else decode(s.generated) for s in seqs]
        results.append(Generation(prompt, [s.generated for s in seqs], [s.score for s in seqs],
                                  [s.reason for s in seqs], texts))
    return results


def _one(steps: StepModel, proposer: Proposer, prompt: list[int], config: GenerationConfig,
         rng: np.random.Generator, decode: Decode | None, stats: SpeculationStats, sampling: bool,
         auto: AutoK | None) -> "_Sequence":
    start = steps.sequence_start(prompt)
    seq = _Sequence(start, config, new_token_limits([start], config)[0], decode)
    if seq.done:
        return seq

    def target_dist(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
        """p (V,) float64 of the position after ``tokens``: the processed (and filtered) softmax."""
        processed = seq.processed(logits, tokens)
        return softmax(sampling_filters(processed[None], config))[0] if sampling else processed

    def choose(logits: np.ndarray, tokens: list[int], for_draft: bool) -> tuple[int, np.ndarray | None]:
        if not sampling:
            return int(np.argmax(seq.processed(logits, tokens))), None
        q = target_dist(logits, tokens)
        return _draw(q, rng), q

    def emit_plain(logits: np.ndarray) -> None:
        """The target's own choice from ``logits`` (V,) after the generated tokens."""
        if sampling:
            p = target_dist(logits, seq.generated)
            token = _draw(p, rng)
            seq.commit(token, float(np.log(p[token])))
        else:
            processed = seq.processed(logits, seq.generated)
            token = int(np.argmax(processed))
            seq.commit(token, float(log_softmax(processed[None])[0, token]))

    plain = not sampling and config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
    emit_plain(np.array(steps.prefill([prompt]).logits[0], dtype=np.float32))
    auto = auto if config.speculative == "auto" else None
    if not seq.done and config.speculative != 0:
        proposer.start(prompt)
    while not seq.done:
        began = time.perf_counter()
        k = auto.next_k() if auto is not None else int(config.speculative)
        k = max(0, min(k, seq.limit - len(seq.generated) - 1))  # room for the drafts and one more token
        proposal = proposer.propose(seq.generated, k, choose) if k else Proposal([], None)
        drafts = proposal.tokens[:k]
        feed = np.array([[seq.generated[-1], *drafts]], dtype=np.int64)  # (1, 1+K)
        result = steps.advance(feed)
        before = len(seq.generated)
        if not drafts and plain and _unprocessed(config, len(seq.generated), seq.limit):
            # a plain round of plain greedy: the step's own choice, as the plain search takes it
            seq.commit(int(result.next_token.reshape(-1)[0]), float(result.next_logprob.reshape(-1)[0]))
            accepted = checked = 0
        else:
            logits = np.array(result.logits, dtype=np.float32).reshape(len(drafts) + 1, -1)  # (1+K, V)
            accepted, checked = _verify(seq, logits, drafts, proposal.probs, rng, sampling, target_dist)
        if not seq.done and accepted < len(drafts):
            steps.rewind([len(drafts) - accepted])
        stats.rounds += 1
        stats.proposed += checked
        stats.accepted += accepted
        stats.emitted += len(seq.generated) - before
        if auto is not None:
            auto.record(k, checked, accepted, len(seq.generated) - before, time.perf_counter() - began)
    return seq


def _unprocessed(config: GenerationConfig, generated: int, limit: int) -> bool:
    """Greedy's next token needs no logits processing: no eos suppression, no forced token."""
    if generated < config.min_new_tokens and config.eos_token_ids:
        return False
    return not (config.forced_eos_token_id and generated == limit - 1)


def _verify(seq: _Sequence, logits: np.ndarray, drafts: list[int], probs: np.ndarray | None,
            rng: np.random.Generator, sampling: bool, target_dist: Callable) -> tuple[int, int]:
    """Accept a prefix of ``drafts`` and emit one more token (the correction or the bonus);
    returns the accepted count and the drafts checked (those after an eos are not). logits (1+K, V): row j is the target's after draft j-1."""
    for j in range(len(drafts) + 1):
        if not sampling:
            processed = seq.processed(logits[j], seq.generated)
            token = int(np.argmax(processed))
            seq.commit(token, float(log_softmax(processed[None])[0, token]))
            if j == len(drafts) or token != drafts[j]:
                return j, min(j + 1, len(drafts))
            if seq.done:
                return j + 1, j + 1
            continue
        p = target_dist(logits[j], seq.generated)  # (V,) float64
        if j == len(drafts):  # every draft accepted: the bonus token from p_K
            token = _draw(p, rng)
            seq.commit(token, float(np.log(p[token])))
            return j, j
        x = drafts[j]
        q_x = 1.0 if probs is None else float(probs[j, x])
        if q_x > 0 and rng.random() < min(1.0, p[x] / q_x):
            seq.commit(x, float(np.log(p[x])))
            if seq.done:
                return j + 1, j + 1
            continue
        if probs is None:  # a point mass at x: the residual is p without x
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - probs[j], 0.0)
        if residual.sum() <= 0:  # p == q to rounding: p itself
            residual = p
        token = _draw(residual / residual.sum(), rng)
        seq.commit(token, float(np.log(p[token])))
        return j, j + 1
    return len(drafts), len(drafts)


# A package that carries its draft ------------------------------------------------------------
def attach_draft(package_dir: str | os.PathLike, draft_dir: str | os.PathLike, *, name: str = "draft") -> None:
    """Copy the draft package into ``package_dir/name`` and record it in the package manifest's
    ``draft`` section (FORMAT.md 2.6): ``load(package)`` then uses it. The copy is staged and
    renamed into place, then the manifest is replaced atomically: a reader sees the package
    with the old draft (or none) or with the new one."""
    from .manifest import FileEntry, Manifest  # (manifest imports nothing from here)

    package, draft = Path(package_dir), Path(draft_dir)
    target, carried = Manifest.load(package), Manifest.load(draft)
    if carried.dims.vocab_size != target.dims.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({carried.dims.vocab_size}) differs from the package's "
                          f"({target.dims.vocab_size}); attach a draft trained with the same tokenizer")
    if (carried.arch == "encoder-decoder") != (target.arch == "encoder-decoder") or carried.arch == "encoder":
        raise ConfigError(f"a {carried.arch} draft cannot propose for a {target.arch} package")
    if carried.draft is not None:
        raise PackageError(f"{draft} carries a draft itself; attach a package without one", code="E_MANIFEST")
    dest = package / name
    tmp = staging_dir(dest)
    try:
        for item in draft.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, dest)
    entry = FileEntry.of(dest, "manifest.json")
    updated = dataclasses.replace(target, draft={"dir": name, "sha256": entry.sha256, "bytes": entry.bytes})
    replace_text(package / "manifest.json", json.dumps(updated.to_dict(), indent=2) + "\n")


__all__ = ["attach_draft", "Proposal", "Proposer", "PromptLookup", "DraftModel", "AutoK", "SpeculationStats", "speculative_generate"]
