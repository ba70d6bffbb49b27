"""Speculative decoding (runtime/speculative.py): greedy output equals plain greedy whatever the
proposer guesses, and sampling keeps the target's distribution.

Greedy is checked on the shipped packages (decoder: shared layout; prefix-lm: concat layout,
one-token blocks; encoder-decoder: shared layout with a source) against the plain search, with
prompt lookup, the target as its own draft (acceptance 100%), another package as the draft and
a proposer of random tokens. Sampling is checked on a tiny vocabulary against the exact
distribution of the target's first tokens (chi-square, significance 0.001, fixed seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxformer.runtime as rt
from onnxformer.runtime.errors import ConfigError
from onnxformer.runtime.generation import GenerationConfig, generate
from onnxformer.runtime.speculative import (
    DraftModel,
    Proposal,
    Proposer,
    PromptLookup,
    SpeculationStats,
    speculative_generate,
)
from onnxformer.runtime.steps import StepModel, StepResult

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WORDS = ["seven", "seventeen", "forty two", "three hundred forty two", "nine thousand one", "eighty eight",
         "two thousand forty", "six hundred six", "one", "fifty five", "twelve thousand", "ninety nine"]


@pytest.fixture(scope="module")
def packages():
    return {name: rt.load(ARTIFACTS / name) for name in ("decoder", "prefix-lm", "encoder-decoder")}


def _prompts(model) -> list[list[int]]:
    texts = [w if model.arch == "encoder-decoder" else w + " =" for w in WORDS]
    return model.encode(texts)


class RandomTokens(Proposer):
    """Guesses uniformly random tokens: almost always wrong."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.rng = vocab, np.random.default_rng(seed)

    def start(self, prompt):
        pass

    def propose(self, generated, k, choose):
        return Proposal(self.rng.integers(0, self.vocab, size=k).tolist(), None)


def _plain(model, rows, config):
    return [g.token_ids for g in generate(model._steps(rows, config), rows, config)]


def _speculative(model, rows, config, proposer):
    stats = SpeculationStats()
    out = speculative_generate(lambda: model._steps(rows, config), proposer, rows, config, stats=stats)
    return [g.token_ids for g in out], stats


@pytest.mark.parametrize("arch", ["decoder", "prefix-lm", "encoder-decoder"])
@pytest.mark.parametrize("eos", ["package", "none"])  # "none": every row runs to max_new_tokens
def test_greedy_is_token_identical_with_every_proposer(packages, arch, eos):
    model = packages[arch]
    extra = {} if eos == "package" else {"eos_token_ids": ()}
    config = model.generation_config(max_new_tokens=12, **extra)
    rows = _prompts(model)
    expected = _plain(model, rows, config)
    cap = max(map(len, rows)) + 14
    proposers = {
        "lookup": PromptLookup(),
        "self": DraftModel(lambda: model.step_model(capacity=cap), model.dims.vocab_size),
        "random": RandomTokens(model.dims.vocab_size),
    }
    if arch == "decoder":
        other = packages["prefix-lm"]
        proposers["other"] = DraftModel(lambda: other.step_model(capacity=cap), other.dims.vocab_size)
    for k in (1, 3, "auto"):
        for name, proposer in proposers.items():
            got, stats = _speculative(model, rows, config.replace(speculative=k), proposer)
            assert got == expected, (arch, k, name)
            if name == "self" and k != "auto":
                assert stats.proposed > 0 and stats.acceptance == 1.0
            if name == "random" and k == 3:
                assert stats.acceptance < 0.2


def test_model_generate_with_a_draft_and_with_prompt_lookup(packages):
    target = packages["decoder"]
    texts = [w + " =" for w in WORDS[:4]]
    plain = target.generate(texts, max_new_tokens=10)
    looked = target.generate(texts, max_new_tokens=10, speculative=3)
    drafted = rt.load(ARTIFACTS / "decoder", draft=ARTIFACTS / "decoder")
    spec = drafted.generate(texts, max_new_tokens=10, speculative="auto")
    for a, b, c in zip(plain, looked, spec):
        assert a.token_ids == b.token_ids == c.token_ids and a.texts == b.texts == c.texts
        assert np.allclose(a.scores, c.scores, atol=1e-4)
    assert drafted.last_speculation.accepted > 0


def test_bad_drafts_and_configs_are_refused(packages):
    with pytest.raises(ConfigError, match="vocabulary"):
        packages["decoder"].set_draft(packages["encoder-decoder"])
    with pytest.raises(ConfigError, match="speculative"):
        packages["decoder"].generate(["seven ="], strategy="beam", num_beams=2, speculative=2)


# Sampling: the distribution is the target's ------------------------------------------------
class TableSteps(StepModel):
    """A batch-1 model over V tokens whose next-token logits depend on the last token and the
    position: table[last, position % 3] (3, V)... The cache is the token list itself."""

    def __init__(self, table: np.ndarray):
        self.table, self.vocab_size = table, table.shape[-1]
        self.tokens: list[int] | None = None

    @property
    def rows(self) -> int:
        return 0 if self.tokens is None else 1

    def _logits(self, n: int) -> np.ndarray:
        return self.table[self.tokens[n - 1], n % 3]

    def prefill(self, prompts):
        self.tokens = list(prompts[0])
        return StepResult(self._logits(len(self.tokens))[None])

    def advance(self, tokens):
        ids = np.asarray(tokens).reshape(1, -1)[0].tolist()
        start = len(self.tokens)
        self.tokens += ids
        logits = np.stack([self._logits(start + j + 1) for j in range(len(ids))])  # (K, V)
        return StepResult(logits[None] if len(ids) > 1 else logits[:1])

    def select(self, rows):
        if len(rows) == 0:
            self.tokens = None

    def rewind(self, counts):
        del self.tokens[len(self.tokens) - int(counts[0]):]


def _exact(table: np.ndarray, prompt: list[int], n: int, config: GenerationConfig) -> dict[tuple[int, ...], float]:
    """P(first n tokens) under the target, by enumeration, with the search's own filters."""
    from onnxformer.runtime.generation import sampling_filters, softmax
    out = {(): 1.0}
    for step in range(n):
        nxt = {}
        for seq, pr in out.items():
            full = prompt + list(seq)
            p = softmax(sampling_filters(table[full[-1], len(full) % 3][None], config))[0]
            for tok, pt in enumerate(p):
                if pt > 0:
                    nxt[seq + (tok,)] = pr * pt
        out = nxt
    return out


@pytest.mark.parametrize("proposer_kind, extra", [("draft", {}), ("lookup", {}),
                                                  ("draft", {"temperature": 0.7, "top_k": 3})])
def test_sampling_keeps_the_target_distribution(proposer_kind, extra):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    vocab, n_tokens, samples = 4, 3, 4000
    target = rng.normal(size=(vocab, 3, vocab)).astype(np.float32) * 1.5
    draft = rng.normal(size=(vocab, 3, vocab)).astype(np.float32) * 1.5  # a different model
    prompt = [0, 1, 2, 0, 1]  # repeats, so prompt lookup finds guesses
    config = GenerationConfig(strategy="sample", max_new_tokens=n_tokens, eos_token_ids=(), speculative=2,
                              **extra).resolve()
    proposer = DraftModel(lambda: TableSteps(draft), vocab) if proposer_kind == "draft" else PromptLookup()
    spec_stats = SpeculationStats()
    out = speculative_generate(lambda: TableSteps(target), proposer, [prompt], config.replace(
        num_return_sequences=samples), rng=np.random.default_rng(7), stats=spec_stats)
    counts: dict[tuple[int, ...], int] = {}
    for seq in out[0].token_ids:
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    exact = _exact(target, prompt, n_tokens, config)
    assert set(counts) <= set(exact)  # nothing the target cannot produce (top_k respected)
    cells = sorted(exact)
    observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
    expected = np.array([exact[c] for c in cells]) * samples
    # pool cells expected below 5 (the chi-square approximation's rule)
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 0.001, p_value  # significance level 0.001
    assert spec_stats.proposed > 0 and 0 < spec_stats.accepted < spec_stats.proposed


def test_a_package_carries_its_draft(tmp_path):
    import json
    import shutil

    from onnxformer.runtime.errors import PackageError
    from onnxformer.runtime.speculative import attach_draft
    pkg = tmp_path / "pkg"
    shutil.copytree(ARTIFACTS / "decoder", pkg)
    attach_draft(pkg, ARTIFACTS / "prefix-lm")
    assert json.loads((pkg / "manifest.json").read_text())["draft"]["dir"] == "draft"
    model = rt.load(pkg)
    assert model.draft is not None and model.draft.arch == "prefix-lm"
    texts = [w + " =" for w in WORDS[:3]]
    plain = rt.load(ARTIFACTS / "decoder").generate(texts)
    assert [g.token_ids for g in model.generate(texts, speculative=2)] == [g.token_ids for g in plain]
    assert model.last_speculation.proposed > 0
    with pytest.raises(ConfigError, match="vocabulary"):
        attach_draft(pkg, ARTIFACTS / "encoder-decoder")
    draft_manifest = pkg / "draft" / "manifest.json"
    draft_manifest.write_text(draft_manifest.read_text() + " ")  # altered after attaching
    with pytest.raises(PackageError, match="checksum"):
        rt.load(pkg)


def _random_prompts(vocab: int, n: int = 8, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    base = rng.integers(5, vocab, size=6).tolist()
    return [(base * 3)[: 4 + i] + rng.integers(5, vocab, size=i % 3).tolist() for i in range(n)]  # repeats: lookup hits


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_greedy_identical_over_the_eager_model(arch):
    """The aligned layout (TorchSteps): a (1+K)-token verification step and rewinds that mask
    columns out (the eager cache is not cut), against the plain search over the same model."""
    pytest.importorskip("torch")
    from onnxformer.modeling.generate import TorchSteps

    from support import make_model
    model, _ = make_model(arch)
    rows = _random_prompts(model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=()).resolve()
    expected = [g.token_ids for g in generate(TorchSteps(model), rows, config)]
    for proposer in (PromptLookup(), RandomTokens(model.config.vocab_size),
                     DraftModel(lambda: TorchSteps(model), model.config.vocab_size)):
        for k in (2, 4):
            stats = SpeculationStats()
            got = speculative_generate(lambda: TorchSteps(model), proposer, rows, config.replace(speculative=k),
                                       stats=stats)
            assert [g.token_ids for g in got] == expected, (type(proposer).__name__, k)


@pytest.mark.slow
def test_greedy_identical_on_a_concat_decoder_package(package_factory):
    """A traced ("concat") decoder verifies 1+K tokens in one call and cuts its cache on rewind."""
    _, _, report = package_factory("decoder", kv_cache="concat")
    model = rt.load(report.path)
    assert model.manifest.kv_cache == "concat"
    rows = _random_prompts(model.dims.vocab_size)
    config = model.generation_config(max_new_tokens=16, eos_token_ids=())
    expected = _plain(model, rows, config)
    cap = max(map(len, rows)) + 18
    for proposer in (PromptLookup(), DraftModel(lambda: model.step_model(capacity=cap), model.dims.vocab_size)):
        got, stats = _speculative(model, rows, config.replace(speculative=3), proposer)
        assert got == expected and stats.accepted > 0
