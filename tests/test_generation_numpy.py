"""Generation in numpy against tiny fake step models: strategies, processors, config, streaming."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from onnxformer.runtime import generation as G
from onnxformer.runtime.errors import ConfigError, InputError, OnnxformerError
from onnxformer.runtime.generation import GenerationConfig
from onnxformer.runtime.steps import AlignedSteps, StepModel, StepResult

pytestmark = pytest.mark.runtime_only  # torch-free: CI also runs these without torch


# Fake models ---------------------------------------------------------------------------------
# Each is a StepModel (runtime/steps.py). The aligned ones reuse the runtime's row bookkeeping
# (AlignedSteps: left padding, masks, positions, select / admit), so their recorded feeds test it.
class TinyAttentionLM(AlignedSteps):
    """One attention layer over a KV-like cache, in float64 numpy.

    Keys = token embedding + position embedding (from the positions it is fed); each new
    position attends over every cached key and the new keys up to itself that the attention
    mask allows; logits = attended vector @ W + bigram[token]. Left pads are invisible only if
    the mask and the positions are right, so batched-vs-alone comparisons are real tests.
    Records (N, T, P) per call.
    """

    def __init__(self, vocab: int = 12, d: int = 8, max_pos: int = 64, seed: int = 0, scale: float = 3.0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.vocab_size, self.d = vocab, d
        self.tok = rng.normal(size=(vocab, d))
        self.pos = rng.normal(size=(max_pos, d))
        self.w_out = rng.normal(size=(d, vocab)) * scale / math.sqrt(d)
        self.bigram = rng.normal(size=(vocab, vocab)) * scale
        self.calls: list[tuple[int, int, int]] = []
        self.feeds: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _start(self, prompts):
        return np.zeros((len(prompts), 0, self.d)), prompts  # (N, P=0, D)

    def _forward(self, input_ids, position_ids, attention_mask, cache, last_only):
        n, t = input_ids.shape
        p = cache.shape[1]
        assert input_ids.dtype == position_ids.dtype == attention_mask.dtype == np.int64
        assert position_ids.shape == (n, t) and attention_mask.shape == (n, p + t) and cache.shape[0] == n
        self.calls.append((n, t, p))
        self.feeds.append((input_ids.copy(), position_ids.copy(), attention_mask.copy()))
        new = self.tok[input_ids] + self.pos[position_ids]  # (N, T, D)
        kv = np.concatenate([cache, new], axis=1)  # (N, P+T, D)
        logits = []
        for j in (range(t - 1, t) if last_only else range(t)):  # position j sees keys up to P+j
            query = new[:, j]  # (N, D)
            att = np.einsum("nd,nkd->nk", query, kv[:, :p + j + 1]) / math.sqrt(self.d)  # (N, P+j+1)
            att = np.where(attention_mask[:, :p + j + 1] > 0, att, -np.inf)
            weights = np.exp(att - att.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            ctx = np.einsum("nk,nkd->nd", weights, kv[:, :p + j + 1])  # (N, D)
            logits.append(ctx @ self.w_out + self.bigram[input_ids[:, j]])  # (N, V)
        out = np.stack(logits, axis=1).astype(np.float32)  # (N, T', V)
        return (out[:, -1] if last_only else out), kv

    def _gather(self, cache, rows):
        return cache[rows]

    def _join(self, a, b, pad_a, pad_b):
        pad = lambda c, k: np.concatenate([np.zeros((c.shape[0], k, self.d)), c], axis=1)  # noqa: E731
        return np.concatenate([pad(a, pad_a), pad(b, pad_b)])

    def full_logits(self, seq) -> np.ndarray:
        """Logits after ``seq`` computed from scratch (no cache); (V,)."""
        ids = np.asarray([seq], dtype=np.int64)
        return self._forward(ids, np.arange(len(seq))[None], np.ones_like(ids), np.zeros((1, 0, self.d)), True)[0][0]


class BigramLM(StepModel):
    """logits = log P[last token]: a hand-checkable table. Rows are their last tokens."""

    def __init__(self, table):
        self.table = np.log(np.asarray(table, dtype=np.float64)).astype(np.float32)
        self.vocab_size = self.table.shape[1]
        self.calls = 0
        self.last = np.zeros(0, dtype=np.int64)

    rows = property(lambda self: len(self.last))

    def prefill(self, prompts):
        self.calls += 1
        new = np.array([p[-1] for p in prompts], dtype=np.int64)
        self.last = np.concatenate([self.last, new])
        return StepResult(self.table[new])

    def advance(self, tokens):
        self.calls += 1
        self.last = np.asarray(tokens, dtype=np.int64)
        return StepResult(self.table[self.last])

    def select(self, rows):
        self.last = self.last[rows]


class ScriptedLM(StepModel):
    """Emits ``script`` token by token (whatever the prompt), then ``fallback`` forever."""

    def __init__(self, script, vocab, fallback=0):
        self.script, self.vocab_size, self.fallback = list(script), vocab, fallback
        self.count, self.n = -1, 0  # generated-token counter, shared by the rows (tests use one row)

    rows = property(lambda self: self.n)

    def _next(self):
        self.count += 1
        tok = self.script[self.count] if self.count < len(self.script) else self.fallback
        logits = np.zeros((self.n, self.vocab_size), dtype=np.float32)
        logits[:, tok] = 10.0
        return StepResult(logits)

    def prefill(self, prompts):
        if self.n == 0:
            self.count = -1  # a new batch starts the script again
        self.n += len(prompts)
        return self._next()

    def advance(self, tokens):
        return self._next()

    def select(self, rows):
        self.n = len(rows)


def seqs(out):
    return [g.token_ids for g in out]


def reasons(out):
    return [g.finish_reasons for g in out]


def scores_of(out):
    return [g.scores for g in out]


def texts_of(out):
    return [g.texts for g in out]


def letters(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def greedy_by_hand(model: TinyAttentionLM, prompt, steps, eos=()):
    seq, out = list(prompt), []
    for _ in range(steps):
        tok = int(np.argmax(model.full_logits(seq)))
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [2, 2]]


# Greedy --------------------------------------------------------------------------------------
def test_greedy_matches_argmax_loop_without_cache():
    model = TinyAttentionLM()
    config = GenerationConfig(max_new_tokens=8)
    out = G.greedy(model, [PROMPTS[0]], config)
    expected = greedy_by_hand(model, PROMPTS[0], 8)
    assert seqs(out) == [[expected]]
    assert reasons(out) == [["length"]]
    # score = sum of log-softmax of the chosen tokens
    seq, total = list(PROMPTS[0]), 0.0
    for tok in expected:
        total += float(G.log_softmax(model.full_logits(seq)[None].astype(np.float64))[0, tok])
        seq.append(tok)
    assert scores_of(out)[0][0] == pytest.approx(total, abs=1e-4)


def test_step_calls_feed_prompt_once_then_one_token_with_growing_mask_and_positions():
    model = TinyAttentionLM()
    G.greedy(model, [[1, 2, 3], [4]], GenerationConfig(max_new_tokens=4))
    assert model.calls == [(2, 3, 0), (2, 1, 3), (2, 1, 4), (2, 1, 5)]  # no step after the last token
    ids, pos, mask = model.feeds[0]
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])  # left-padded with pad_token_id
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])
    _, pos, mask = model.feeds[1]
    np.testing.assert_array_equal(pos, [[3], [1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
    _, pos, mask = model.feeds[3]
    np.testing.assert_array_equal(pos, [[5], [3]])
    assert mask.shape == (2, 6) and mask[:, 3:].all()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_left_padded_prompts_match_each_prompt_alone(strategy):
    model = TinyAttentionLM()
    alone = GenerationConfig(max_new_tokens=6)
    probe = seqs(G.greedy(model, [PROMPTS[0]], alone))[0][0]
    config = GenerationConfig(
        strategy=strategy, max_new_tokens=6, eos_token_ids=(probe[2],), pad_token_id=0,
        num_beams=3 if strategy == "beam" else 1, num_return_sequences=2 if strategy == "beam" else 1,
    )
    batched = G.generate(model, PROMPTS, config)
    for b, prompt in enumerate(PROMPTS):
        single = G.generate(model, [prompt], config)
        assert seqs(batched)[b] == seqs(single)[0]
        assert reasons(batched)[b] == reasons(single)[0]
        np.testing.assert_allclose(scores_of(batched)[b], scores_of(single)[0], rtol=1e-5)
    assert "eos" in {r for rs in reasons(batched) for r in rs}  # the eos path was exercised


def test_finished_rows_get_pad_and_generation_stops_when_all_finish():
    model = TinyAttentionLM()
    free = [s[0] for s in seqs(G.greedy(model, PROMPTS[:2], GenerationConfig(max_new_tokens=10)))]
    eos = 3  # row 1 emits it first, row 0 later (asserted below)
    ends = [seq.index(eos) for seq in free]
    assert ends[1] < ends[0] < 9
    config = GenerationConfig(max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=7)
    model.calls.clear(), model.feeds.clear()
    out = G.greedy(model, PROMPTS[:2], config)
    assert seqs(out) == [[seq[: end + 1]] for seq, end in zip(free, ends)]  # eos included
    assert reasons(out) == [["eos"], ["eos"]]
    # feeds[k] carries token k-1; row 1 is fed pad_token_id after its eos, row 0 is not
    for k in range(ends[1] + 2, ends[0] + 1):
        assert model.feeds[k][0][1, 0] == 7 and model.feeds[k][0][0, 0] == free[0][k - 1]
    assert len(model.calls) == ends[0] + 1  # stops as soon as every row has finished


def test_min_new_tokens_suppresses_eos():
    model = TinyAttentionLM()
    first = seqs(G.greedy(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=1)))[0][0][0]
    out = G.greedy(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, eos_token_ids=(first,)))
    assert seqs(out)[0][0] == [first] and reasons(out) == [["eos"]]
    out = G.greedy(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, min_new_tokens=3, eos_token_ids=(first,)))
    seq = seqs(out)[0][0]
    assert first not in seq[:3] and len(seq) >= 3


def test_no_repeat_ngram_and_repetition_penalty_in_generation():
    model = TinyAttentionLM(vocab=20)
    prompt = [1, 2, 3, 1, 2]
    seq = seqs(G.greedy(model, [prompt], GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=1)))[0][0]
    assert len(set(seq)) == len(seq) and set(seq).isdisjoint(prompt)  # n=1: no token seen before
    free = seqs(G.greedy(model, [prompt], GenerationConfig(max_new_tokens=15)))[0][0]
    seq = seqs(G.greedy(model, [prompt], GenerationConfig(max_new_tokens=15, no_repeat_ngram_size=2)))[0][0]
    for full in (prompt + free, prompt + seq):
        repeats = [j for j in range(len(prompt), len(full))
                   if (full[j - 1], full[j]) in set(zip(full[: j - 1], full[1:j]))]
        assert bool(repeats) == (full is not prompt + seq and full == prompt + free)

    # repetition penalty == the by-hand loop applying the pure function
    penalty = 3.0
    out = seqs(G.greedy(model, [prompt], GenerationConfig(max_new_tokens=10, repetition_penalty=penalty)))[0][0]
    seq, expected = list(prompt), []
    for _ in range(10):
        logits = G.apply_repetition_penalty(model.full_logits(seq)[None], [seq], penalty)
        expected.append(int(np.argmax(logits)))
        seq.append(expected[-1])
    assert out == expected
    assert out != seqs(G.greedy(model, [prompt], GenerationConfig(max_new_tokens=10)))[0][0]


def test_max_new_tokens_zero_calls_no_model():
    model = TinyAttentionLM()
    for config in (GenerationConfig(max_new_tokens=0),
                   GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=0)):
        out = G.generate(model, PROMPTS[:2], config, decode=letters)
        assert seqs(out) == [[[]], [[]]] and reasons(out) == [["length"]] * 2
        assert texts_of(out) == [[""], [""]]
    assert model.calls == []


def test_invalid_inputs():
    model = TinyAttentionLM(vocab=12)
    config = GenerationConfig(max_new_tokens=2)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        G.greedy(model, [[1], []], config)
    with pytest.raises(InputError, match="non-empty list"):
        G.greedy(model, [], config)
    with pytest.raises(InputError, match="Tokenize it first"):
        G.greedy(model, ["hello"], config)
    with pytest.raises(InputError, match="token id 12 is out of range for vocab_size 12"):
        G.greedy(model, [[1, 12]], config)
    with pytest.raises(ConfigError, match="eos_token_ids \\[40\\] out of range"):
        G.greedy(model, [[1]], config.replace(eos_token_ids=(40,)))
    with pytest.raises(ConfigError, match="greedy\\(\\) got a config with strategy 'sample'"):
        G.greedy(model, [[1]], GenerationConfig(strategy="sample"))
    with pytest.raises(ConfigError, match="need a decode function"):
        G.greedy(model, [[1]], config.replace(stop_strings=("x",)))


# Sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = TinyAttentionLM(scale=1.0)
    config = GenerationConfig(strategy="sample", max_new_tokens=10, seed=123)
    first = G.sample(model, PROMPTS, config)
    again = G.sample(model, PROMPTS, config)
    assert first == again
    explicit = G.sample(model, PROMPTS, config, rng=np.random.default_rng(123))
    assert seqs(explicit) == seqs(first)
    other = G.sample(model, PROMPTS, config.replace(seed=124))
    assert seqs(other) != seqs(first)
    greedy_out = G.greedy(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    assert seqs(first) != seqs(greedy_out)  # it really samples


@pytest.mark.parametrize("changes", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)])
def test_degenerate_sampling_equals_greedy(changes):
    model = TinyAttentionLM(scale=1.0)
    greedy_out = G.greedy(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    sampled = G.sample(model, PROMPTS, GenerationConfig(strategy="sample", max_new_tokens=8, seed=0, **changes))
    assert seqs(sampled) == seqs(greedy_out)


def test_num_return_sequences_runs_each_prompt_once_then_copies_rows():
    model = TinyAttentionLM(scale=1.0)
    config = GenerationConfig(strategy="sample", max_new_tokens=6, seed=1, num_return_sequences=3)
    out = G.sample(model, PROMPTS[:2], config)
    assert [len(s) for s in seqs(out)] == [3, 3]
    assert model.calls[0] == (2, 3, 0) and model.calls[1] == (6, 1, 3)  # prompts once, then 2 x 3 rows
    assert len({tuple(s) for s in seqs(out)[0]}) > 1


def test_sample_tokens_follows_the_distribution_and_never_picks_banned_tokens():
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.0, 0.3, 0.2])
    logits = np.log(np.where(probs > 0, probs, 1.0)).astype(np.float32)
    logits[1] = -np.inf
    tokens = G.sample_tokens(np.tile(logits, (20000, 1)), rng)
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert freq[1] == 0
    all_banned = np.full((2, 4), -np.inf, dtype=np.float32)
    np.testing.assert_array_equal(G.sample_tokens(all_banned, rng), [0, 0])


# Beam search ---------------------------------------------------------------------------------
def brute_force(model: TinyAttentionLM, prompt, steps):
    """Every continuation of ``steps`` tokens with its summed log-prob, best first."""
    results = []
    for cont in itertools.product(range(model.vocab_size), repeat=steps):
        seq, total = list(prompt), 0.0
        for tok in cont:
            total += float(G.log_softmax(model.full_logits(seq)[None].astype(np.float64))[0, tok])
            seq.append(tok)
        results.append((total, list(cont)))
    return sorted(results, key=lambda r: -r[0])


def test_beam_search_finds_the_exhaustive_best_on_a_tiny_vocab():
    model = TinyAttentionLM(vocab=4, scale=1.5)
    prompt = [1, 3]
    exhaustive = brute_force(model, prompt, 3)
    # K = V**2 keeps every prefix alive until the last step, so beam search is exact.
    config = GenerationConfig(strategy="beam", num_beams=16, num_return_sequences=5, max_new_tokens=3,
                              length_penalty=0.0)
    out = G.beam_search(model, [prompt], config)
    assert seqs(out)[0] == [seq for _, seq in exhaustive[:5]]
    np.testing.assert_allclose(scores_of(out)[0], [s for s, _ in exhaustive[:5]], atol=1e-4)
    assert reasons(out)[0] == ["length"] * 5
    # a narrow beam still returns valid, score-sorted hypotheses
    narrow = G.beam_search(model, [prompt], config.replace(num_beams=2, num_return_sequences=2))
    assert scores_of(narrow)[0][0] >= scores_of(narrow)[0][1]
    assert scores_of(narrow)[0][0] <= exhaustive[0][0] + 1e-4


@pytest.mark.parametrize("eos", [(), (5,)])
def test_beam_with_one_beam_equals_greedy(eos):
    model = TinyAttentionLM()
    probe = seqs(G.greedy(model, PROMPTS, GenerationConfig(max_new_tokens=8)))
    eos = (probe[0][0][3],) if eos else ()
    greedy_out = G.greedy(model, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_ids=eos))
    beam_out = G.beam_search(model, PROMPTS, GenerationConfig(
        strategy="beam", num_beams=1, max_new_tokens=8, eos_token_ids=eos, length_penalty=0.0))
    assert seqs(beam_out) == seqs(greedy_out)
    assert reasons(beam_out) == reasons(greedy_out)
    np.testing.assert_allclose(scores_of(beam_out), scores_of(greedy_out), atol=1e-4)


# A bigram table small enough to follow by hand: tokens A=0, B=1, EOS=2; prompt [A].
TABLE = [[0.1, 0.5, 0.4],  # after A
         [0.6, 0.12, 0.28],  # after B
         [1 / 3, 1 / 3, 1 / 3]]  # after EOS (never used)
L = {k: math.log(v) for k, v in {"A>A": 0.1, "A>B": 0.5, "A>E": 0.4, "B>A": 0.6, "B>B": 0.12, "B>E": 0.28}.items()}


def test_beam_search_spec_by_hand_length_penalty_one():
    # t0: B (running), EOS rank 1 -> hyp [E] = ln .4; A (running).
    # t1: BA, B-EOS rank 1 -> hyp [B,E] / 2, BB.  2 hyps, but worst -0.983 < BA/2 -> not done.
    # t2: BAB, BA-EOS rank 1 -> hyp [B,A,E] / 3 (pushes out [B,E]), BBA.  Not done; last step:
    #     running beams join: BAB / 3 is the best of all.
    model = BigramLM(TABLE)
    config = GenerationConfig(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=3,
                              eos_token_ids=(2,), length_penalty=1.0)
    out = G.beam_search(model, [[0]], config)
    assert seqs(out) == [[[1, 0, 1], [1, 0, 2]]]
    assert reasons(out) == [["length", "eos"]]
    np.testing.assert_allclose(scores_of(out)[0], [(L["A>B"] + L["B>A"] + L["A>B"]) / 3,
                                               (L["A>B"] + L["B>A"] + L["A>E"]) / 3], atol=1e-5)
    assert model.calls == 3


def test_beam_search_spec_by_hand_early_stopping():
    model = BigramLM(TABLE)
    config = GenerationConfig(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=3,
                              eos_token_ids=(2,), early_stopping=True)
    out = G.beam_search(model, [[0]], config)
    assert seqs(out) == [[[2], [1, 2]]]  # two hypotheses after t1 -> done at once
    np.testing.assert_allclose(scores_of(out)[0], [L["A>E"], (L["A>B"] + L["B>E"]) / 2], atol=1e-5)
    assert model.calls == 2


def test_beam_search_spec_by_hand_done_check_without_early_stopping():
    # length_penalty 0: raw sums. After t3 the best running beam (BABA, -2.41) is below the
    # worst kept hypothesis ([B,E], -1.97), so the prompt is done before max_new_tokens.
    model = BigramLM(TABLE)
    config = GenerationConfig(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=10,
                              eos_token_ids=(2,), length_penalty=0.0)
    out = G.beam_search(model, [[0]], config)
    assert seqs(out) == [[[2], [1, 2]]]
    assert reasons(out) == [["eos", "eos"]]
    np.testing.assert_allclose(scores_of(out)[0], [L["A>E"], L["A>B"] + L["B>E"]], atol=1e-5)
    assert model.calls == 4  # prompt + steps t1..t3; no step after the done check


def test_beam_search_returns_texts_and_rejects_stop_strings():
    model = BigramLM(TABLE)
    config = GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=3, eos_token_ids=(2,))
    out = G.beam_search(model, [[0]], config, decode=letters)
    assert texts_of(out) == [[letters(seqs(out)[0][0])]]
    with pytest.raises(ConfigError, match="stop_strings"):
        config.replace(stop_strings=("x",))


# Logits processors (pure functions) ----------------------------------------------------------
def test_repetition_penalty_hand_values():
    logits = np.array([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]], dtype=np.float32)
    before = logits.copy()
    out = G.apply_repetition_penalty(logits, [[0, 1, 1], []], 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    np.testing.assert_array_equal(logits, before)  # inputs are not modified


def test_ban_repeated_ngrams_hand_values():
    logits = np.zeros((1, 6), dtype=np.float32)
    seq = [[1, 2, 3, 1, 2]]
    assert np.isinf(G.ban_repeated_ngrams(logits, seq, 3)[0]).nonzero()[0].tolist() == [3]
    assert np.isinf(G.ban_repeated_ngrams(logits, seq, 2)[0]).nonzero()[0].tolist() == [3]
    assert np.isinf(G.ban_repeated_ngrams(logits, seq, 1)[0]).nonzero()[0].tolist() == [1, 2, 3]
    assert not np.isinf(G.ban_repeated_ngrams(logits, [[1, 2]], 3)).any()  # shorter than n
    seq = [[4, 5, 4, 0, 4]]
    assert np.isinf(G.ban_repeated_ngrams(logits, seq, 2)[0]).nonzero()[0].tolist() == [0, 5]


def test_suppress_eos_top_k_top_p_temperature():
    logits = np.array([[1.0, 3.0, 2.0, 3.0]], dtype=np.float32)
    assert G.suppress_eos(logits, (1, 3)).tolist() == [[1.0, -np.inf, 2.0, -np.inf]]
    assert G.top_k_filter(logits, 2).tolist() == [[-np.inf, 3.0, -np.inf, 3.0]]  # ties at the boundary kept
    assert G.top_k_filter(logits, 3).tolist() == [[-np.inf, 3.0, 2.0, 3.0]]
    assert G.top_k_filter(logits, 0).tolist() == logits.tolist()
    np.testing.assert_allclose(G.apply_temperature(logits, 2.0), logits / 2)

    probs = np.log(np.array([[0.2, 0.5, 0.3]], dtype=np.float32))
    keep = lambda p: np.isfinite(G.top_p_filter(probs, p)[0]).nonzero()[0].tolist()  # noqa: E731
    assert keep(0.5) == [1]  # mass before token 2 is 0.5, not < 0.5
    assert keep(0.51) == [1, 2]
    assert keep(0.8) == [1, 2]
    assert keep(0.81) == [0, 1, 2]
    assert keep(1e-9) == [1]  # the top token is always kept
    assert keep(1.0) == [0, 1, 2]


def test_log_softmax_and_softmax_handle_fully_banned_rows():
    logits = np.array([[0.0, 0.0], [-np.inf, -np.inf]], dtype=np.float32)
    out = G.log_softmax(logits)
    np.testing.assert_allclose(out[0], np.log([0.5, 0.5]), rtol=1e-6)
    assert np.all(out[1] == -np.inf) and out.dtype == np.float32
    np.testing.assert_array_equal(G.softmax(logits)[1], [0.0, 0.0])


def test_greedy_scores_equal_the_full_log_softmax_bitwise():
    """The greedy chooser computes the chosen token's log-prob without a full log-softmax;
    the values must be exactly log_softmax's (scores are compared across runtimes)."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        logits = (rng.standard_normal((4, 257)) * rng.uniform(0.01, 80.0)).astype(np.float32)
        if trial % 3 == 0:
            logits[1] = -np.inf  # every token banned
        if trial % 4 == 0:
            logits[2, rng.integers(0, 257, 120)] = -np.inf  # some banned
        if trial % 5 == 0:
            logits[3, :5] = logits[3].max()  # ties: the lowest id wins
        tokens, logprobs = G.greedy_choice(logits)
        want = np.take_along_axis(G.log_softmax(logits), tokens[:, None], axis=1)[:, 0]
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=1))
        np.testing.assert_array_equal(logprobs, want)
        assert logprobs.dtype == np.float32


def test_left_pad():
    batch = G.left_pad([[5, 6, 7], [8]], pad_token_id=1)
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7], [1, 1, 8]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(batch.position_ids, [[0, 1, 2], [0, 0, 0]])


# GenerationConfig ----------------------------------------------------------------------------
def test_config_defaults_round_trip_and_replace():
    config = GenerationConfig(strategy="sample", top_k=5, eos_token_ids=[3, 4], stop_strings=["\n\n"], seed=7)
    assert config.eos_token_ids == (3, 4) and config.stop_strings == ("\n\n",)
    assert GenerationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.replace(top_k=0).top_k == 0 and config.top_k == 5
    assert GenerationConfig(eos_token_ids=2).eos_token_ids == (2,)
    assert GenerationConfig(temperature=0).temperature == 0.0  # ignored outside sampling
    with pytest.raises(AttributeError):
        config.top_k = 3  # frozen


def test_unset_fields_resolve_from_the_package_then_builtins_and_given_values_stay():
    """Every field defaults to None (unset). resolve(): the config's values, then a package's
    defaults, then BUILTIN_DEFAULTS; an explicit empty eos list or pad id 0 is kept."""
    package = {"strategy": "greedy", "max_new_tokens": 20, "eos_token_ids": [2], "pad_token_id": 1}
    assert GenerationConfig().set_fields() == {} and not GenerationConfig().is_resolved
    resolved = GenerationConfig(max_new_tokens=12).resolve(package)
    assert resolved.is_resolved
    assert (resolved.max_new_tokens, resolved.eos_token_ids, resolved.pad_token_id) == (12, (2,), 1)
    explicit = GenerationConfig(max_new_tokens=12, eos_token_ids=(), pad_token_id=0).resolve(package)
    assert (explicit.eos_token_ids, explicit.pad_token_id) == ((), 0)
    assert GenerationConfig().resolve() == GenerationConfig(**G.BUILTIN_DEFAULTS)
    assert GenerationConfig(max_new_tokens=3).to_dict() == {"max_new_tokens": 3}
    # rules between fields apply once every field they name is known
    loose = GenerationConfig(num_beams=4)  # the strategy may still come from the package
    with pytest.raises(ConfigError, match=r"num_beams \(4\) > 1 needs strategy 'beam'"):
        loose.resolve(package)
    assert loose.resolve({"strategy": "beam"}).num_beams == 4
    with pytest.raises(ConfigError, match="unknown generation parameter"):
        GenerationConfig().resolve({"max_tokens": 3})
    # resolve_config: config, then keyword overrides, then the package
    got = G.resolve_config(GenerationConfig(max_new_tokens=5), {"eos_token_ids": ()}, package)
    assert (got.max_new_tokens, got.eos_token_ids, got.pad_token_id) == (5, (), 1)


def test_a_given_empty_eos_list_means_no_eos_through_every_entry_point():
    """The same config asks for the same thing through the search itself and once resolved
    against a package with an eos: 12 tokens, no stop at the package's eos."""
    model = ScriptedLM([5, 2, 5, 2], vocab=8, fallback=3)
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=())
    direct = G.greedy(model, [[1]], config)
    via_package = G.greedy(model, [[1]], G.resolve_config(config, {}, {"eos_token_ids": [2]}))
    assert seqs(direct) == seqs(via_package) == [[[5, 2, 5, 2] + [3] * 8]]
    stops = G.greedy(model, [[1]], G.resolve_config(GenerationConfig(max_new_tokens=12), {}, {"eos_token_ids": [2]}))
    assert seqs(stops) == [[[5, 2]]] and reasons(stops) == [["eos"]]


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'top_kk' \(did you mean 'top_k'\?\)"):
        GenerationConfig.from_dict({"top_kk": 3})
    with pytest.raises(ConfigError, match=r"'max_tokens'"):
        GenerationConfig().replace(max_tokens=3)


INVALID = [
    ("strategy", dict(strategy="topk")),
    ("max_new_tokens", dict(max_new_tokens=-1)),
    ("max_new_tokens", dict(max_new_tokens=2.5)),
    ("max_new_tokens", dict(max_new_tokens=True)),
    ("min_new_tokens", dict(min_new_tokens=-1)),
    ("min_new_tokens", dict(min_new_tokens=5, max_new_tokens=4)),
    ("temperature", dict(strategy="sample", temperature=0.0)),
    ("temperature", dict(strategy="sample", temperature=-1.0)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature="hot")),
    ("top_k", dict(strategy="sample", top_k=-1)),
    ("top_p", dict(strategy="sample", top_p=0.0)),
    ("top_p", dict(strategy="sample", top_p=1.5)),
    ("seed", dict(strategy="sample", seed=-1)),
    ("seed", dict(strategy="sample", seed="abc")),
    ("num_beams", dict(strategy="beam", num_beams=0)),
    ("num_beams", dict(strategy="greedy", num_beams=4)),
    ("length_penalty", dict(strategy="beam", length_penalty=float("inf"))),
    ("early_stopping", dict(strategy="beam", early_stopping="yes")),
    ("num_return_sequences", dict(num_return_sequences=0)),
    ("num_return_sequences", dict(strategy="greedy", num_return_sequences=2)),
    ("num_return_sequences", dict(strategy="beam", num_beams=2, num_return_sequences=3)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=-2)),
    ("eos_token_ids", dict(eos_token_ids=(-1,))),
    ("eos_token_ids", dict(eos_token_ids=("2",))),
    ("eos_token_ids", dict(eos_token_ids="2")),
    ("stop_strings", dict(stop_strings=("",))),
    ("stop_strings", dict(stop_strings=(1,))),
    ("stop_strings", dict(strategy="beam", stop_strings=("x",))),
    ("pad_token_id", dict(pad_token_id=-1)),
    ("max_length", dict(max_length=-1)),
    ("forced_bos_token_id", dict(forced_bos_token_id=-2)),
    ("forced_bos_token_id", dict(forced_bos_token_id=(0,))),
    ("forced_eos_token_id", dict(forced_eos_token_id=(-1,))),
    ("forced_eos_token_id", dict(forced_eos_token_id="2")),
    ("speculative", dict(speculative=-1)),
    ("speculative", dict(speculative="fast")),
    ("speculative", dict(speculative=True)),
    ("speculative", dict(strategy="beam", num_beams=2, speculative=2)),
]


@pytest.mark.parametrize("name, kwargs", INVALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INVALID)])
def test_every_invalid_parameter_raises_config_error_naming_it(name, kwargs):
    with pytest.raises(ConfigError, match=name) as err:
        GenerationConfig(**kwargs)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert any(repr(v) in message or str(v) in message for v in kwargs.values())  # shows the value


def test_every_parameter_is_covered_by_an_invalid_case():
    fields = {f.name for f in GenerationConfig.__dataclass_fields__.values()}
    assert fields == {name for name, _ in INVALID}


# Stop strings and streaming ------------------------------------------------------------------
def test_stop_strings_stop_and_trim():
    model = TinyAttentionLM()
    free = G.greedy(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10), decode=letters)
    text = texts_of(free)[0][0]
    stop = text[3:5]
    cut = text.find(stop)
    out = G.greedy(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10, stop_strings=("zzz", stop)),
                   decode=letters)
    assert reasons(out) == [["stop"]]
    assert texts_of(out) == [[text[:cut]]]
    assert seqs(out)[0][0] == seqs(free)[0][0][: cut + len(stop)]  # up to the token completing it


def test_stream_deltas_concatenate_to_the_final_text():
    model = TinyAttentionLM()
    config = GenerationConfig(max_new_tokens=10)
    deltas = list(G.stream(model, PROMPTS[0], config, letters))
    assert len(deltas) == 10 and all(deltas)
    assert "".join(deltas) == texts_of(G.greedy(model, [PROMPTS[0]], config, decode=letters))[0][0]
    # with a stop string: nothing after the stop string is ever yielded
    text = "".join(deltas)
    stop = text[4:6]
    deltas = list(G.stream(model, PROMPTS[0], config.replace(stop_strings=(stop,)), letters))
    assert "".join(deltas) == text[: text.find(stop)]
    sampled = GenerationConfig(strategy="sample", seed=3, max_new_tokens=6)
    assert "".join(G.stream(model, PROMPTS[0], sampled, letters)) == \
        texts_of(G.sample(model, [PROMPTS[0]], sampled, decode=letters))[0][0]


BYTES = [b"h", b"i", b" ", b"\xf0\x9f", b"\x98\x80", b"\xe4", b"\xb8\x96", b"!"]  # 😀 = f0 9f 98 80, 世 = e4 b8 96


def byte_decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_stream_checks_arguments_when_called():
    model = TinyAttentionLM()
    with pytest.raises(ConfigError, match="beam"):
        G.stream(model, [1], GenerationConfig(strategy="beam", num_beams=2), letters)
    with pytest.raises(ConfigError, match="num_return_sequences=2"):
        G.stream(model, [1], GenerationConfig(strategy="sample", num_return_sequences=2), letters)
    with pytest.raises(InputError, match="prompt 0 is empty"):
        G.stream(model, [], GenerationConfig(), letters)


def test_a_step_returning_the_wrong_logits_shape_is_reported():
    """A step model that breaks the protocol is a bug: a plain ValueError with the shapes."""
    class AllPositions(TinyAttentionLM):
        def _forward(self, input_ids, position_ids, attention_mask, cache, last_only):
            return super()._forward(input_ids, position_ids, attention_mask, cache, False)  # (N, T, V)

    with pytest.raises(ValueError, match=r"logits of shape \(1, 3, 12\); the protocol needs \(N=1, V=12\)") as err:
        G.greedy(AllPositions(), [[1, 2, 3]], GenerationConfig(repetition_penalty=1.1))
    assert not isinstance(err.value, OnnxformerError)


def test_stream_holds_back_split_multibyte_characters():
    script = [0, 1, 2, 3, 4, 5, 6, 7]
    model = ScriptedLM(script, vocab=len(BYTES))
    deltas = list(G.stream(model, [0], GenerationConfig(max_new_tokens=len(script)), byte_decode))
    assert "".join(deltas) == "hi 😀世!"
    assert not any("\ufffd" in d for d in deltas)
    assert deltas == ["h", "i", " ", "😀", "世", "!"]


def test_stream_holds_back_a_possible_stop_string_prefix():
    model = ScriptedLM([0, 1, 2, 0, 7, 1], vocab=len(BYTES))  # "hi h!i"
    config = GenerationConfig(max_new_tokens=6, stop_strings=(" h?",))
    deltas = list(G.stream(model, [0], config, byte_decode))
    assert deltas == ["h", "i", " h!", "i"]  # " " and " h" wait until they cannot start " h?"
    config = config.replace(stop_strings=(" h!",))
    assert list(G.stream(model, [0], config, byte_decode)) == ["h", "i"]


def test_stream_with_a_real_byte_level_bpe_tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    corpus = ["hello world", "hello there", "héllo wörld", "世界 你好", "emoji 😀 🎉"] * 5
    tok.train_from_iterator(corpus, trainer)
    text = "hello 世界 😀🎉 wörld ok"
    ids = tok.encode(text).ids
    eos = tok.token_to_id("<eos>")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert decode(ids) == text
    assert any("\ufffd" in decode(ids[:n]) for n in range(1, len(ids)))  # characters really are split

    model = ScriptedLM(ids + [eos], vocab=tok.get_vocab_size())
    config = GenerationConfig(max_new_tokens=len(ids) + 5, eos_token_ids=(eos,))
    deltas = list(G.stream(model, [0], config, decode))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    out = G.greedy(model, [[0]], config, decode=decode)
    assert seqs(out) == [[ids + [eos]]] and reasons(out) == [["eos"]] and texts_of(out) == [[text]]
