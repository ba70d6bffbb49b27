"""Training objectives: pure functions checked against their definitions and statistics."""

from __future__ import annotations

import math
from collections import Counter

import pytest

torch = pytest.importorskip("torch", reason="objective tests need the [train] extra (torch)")
import torch.nn.functional as F  # noqa: E402

from onnxformer.modeling.objectives import (  # noqa: E402
    IGNORE_INDEX,
    IS_NEXT,
    causal_lm_loss,
    classification_loss,
    continuation_mask,
    delete_tokens,
    denoise,
    infill_spans,
    mask_tokens,
    next_sentence_pairs,
    next_token_labels,
    permute_sentences,
    prompt_mask,
    seq2seq_loss,
    sft_loss,
    shift_right,
    token_cross_entropy,
)

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIAL = (PAD, 1, CLS, SEP, MASK)
V = 50


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- causal LM, SFT, prefix-LM -------------------------------------------------------------


def test_next_token_labels_shift_by_one_and_ignore_pads():
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 5, 2, PAD, PAD]])
    mask = ids != PAD
    labels = next_token_labels(ids, mask)
    assert labels.tolist() == [[7, 8, 9, 2, IGNORE_INDEX], [5, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_causal_lm_loss_is_mean_nll_of_the_next_real_token():
    g = gen(1)
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 5, 2, PAD, PAD]])
    logits = torch.randn(2, 5, V, generator=g)
    expected = []
    for b, length in ((0, 5), (1, 3)):
        for t in range(length - 1):
            expected.append(-F.log_softmax(logits[b, t], -1)[ids[b, t + 1]])
    got = causal_lm_loss(logits, ids, ids != PAD)
    torch.testing.assert_close(got, torch.stack(expected).mean())
    # Logits at pad positions or the last position never matter.
    changed = logits.clone()
    changed[1, 2:] = 1e4
    changed[0, 4] = -1e4
    torch.testing.assert_close(causal_lm_loss(changed, ids, ids != PAD), got)


def test_sft_loss_counts_only_continuation_tokens():
    # <s> p p | c c </s> ; prompt length 3 (incl. <s>)
    ids = torch.tensor([[1, 10, 11, 20, 21, 2], [1, 12, 22, 2, PAD, PAD]])
    mask = (ids != PAD).long()
    prompt_lengths = torch.tensor([3, 2])
    cont = continuation_mask(prompt_lengths, mask)
    assert cont.tolist() == [[False, False, False, True, True, True], [False, False, True, True, False, False]]
    assert prompt_mask(prompt_lengths, 6).tolist() == [
        [True, True, True, False, False, False], [True, True, False, False, False, False],
    ]
    labels = next_token_labels(ids, cont)
    assert labels.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX],
        [IGNORE_INDEX, 22, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    logits = torch.randn(2, 6, V, generator=gen(2))
    changed = logits.clone()
    changed[0, 0] = changed[0, 1] = changed[1, 0] = 1e4  # positions that predict prompt tokens
    torch.testing.assert_close(sft_loss(changed, ids, prompt_lengths, mask), sft_loss(logits, ids, prompt_lengths, mask))
    torch.testing.assert_close(sft_loss(logits, ids, prompt_lengths, mask), token_cross_entropy(logits, labels))


def test_token_cross_entropy_without_labels_is_zero_not_nan():
    logits = torch.randn(1, 3, V, requires_grad=True)
    loss = token_cross_entropy(logits, torch.full((1, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# --- masked LM -----------------------------------------------------------------------------


def test_mask_tokens_statistics_and_invariants():
    g = gen(3)
    ids = torch.randint(5, V, (400, 128), generator=gen(4))
    ids[:, 0], ids[:, 100] = CLS, SEP
    ids[:, 101:] = PAD
    out = mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=g)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    chosen = out.labels != IGNORE_INDEX
    # Special tokens (CLS, SEP, PAD) are never chosen and never altered.
    assert not chosen[special].any()
    assert torch.equal(out.input_ids[special], ids[special])
    # Labels: the original token where chosen, IGNORE_INDEX elsewhere.
    assert torch.equal(out.labels[chosen], ids[chosen])
    # Unchosen tokens are unchanged.
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    n_candidates = int((~special).sum())  # 39,600 tokens
    rate = int(chosen.sum()) / n_candidates
    assert abs(rate - 0.15) < 0.01, rate
    became_mask = (out.input_ids == MASK) & chosen
    kept = (out.input_ids == ids) & chosen
    randomised = chosen & ~became_mask & ~kept
    n = int(chosen.sum())
    assert abs(int(became_mask.sum()) / n - 0.8) < 0.02
    # A random draw can equal the original (1/45 of the time), so "kept" is 10% + a little.
    assert abs(int(kept.sum()) / n - 0.1 - 0.1 / 45) < 0.015
    assert abs(int(randomised.sum()) / n - 0.1 * 44 / 45) < 0.015
    # Random replacements are regular tokens, never special ones.
    assert not torch.isin(out.input_ids[randomised], torch.tensor(SPECIAL)).any()


def test_mask_tokens_is_a_function_of_the_generator():
    ids = torch.randint(5, V, (4, 32), generator=gen(5))
    a = mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=gen(9))
    b = mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=gen(9))
    c = mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=gen(10))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_mask_tokens_rejects_bad_probabilities():
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=gen(), mask_prob=0.0)
    with pytest.raises(ValueError, match="mask_replace_prob"):
        mask_tokens(ids, mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=V, generator=gen(),
                    mask_replace_prob=0.9, random_replace_prob=0.2)


# --- next-sentence prediction ----------------------------------------------------------------


def test_next_sentence_pairs_half_true_half_random():
    documents = [[f"d{d} s{i}" for i in range(4)] for d in range(1500)]
    pairs = next_sentence_pairs(documents, generator=gen(6))
    assert len(pairs) == 1500 * 3  # one pair per sentence with a successor
    labels = Counter(p.label for p in pairs)
    assert abs(labels[IS_NEXT] / len(pairs) - 0.5) < 0.025
    for p in pairs:
        d, i = p.first.split()
        true_next = f"{d} s{int(i[1:]) + 1}"
        if p.label == IS_NEXT:
            assert p.second == true_next
        else:
            assert p.second != true_next


def test_nsp_pair_encoding_has_token_types_0_and_1():
    from onnxformer.modeling.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat.", "the dog ran away."] * 5, arch="encoder", vocab_size=60)
    enc = tok.encode("the cat sat.", "the dog ran away.")
    sep = tok.token_to_id("[SEP]")
    first_sep = enc.ids.index(sep)
    assert enc.ids[0] == tok.token_to_id("[CLS]") and enc.ids[-1] == sep
    assert enc.type_ids == [0] * (first_sep + 1) + [1] * (len(enc.ids) - first_sep - 1)


# --- denoising -------------------------------------------------------------------------------


def test_infill_masks_exactly_the_budget_with_one_mask_per_span():
    tokens = list(range(10, 1010))  # 1000 distinct tokens, none equal to MASK
    out = infill_spans(tokens, mask_token_id=MASK, ratio=0.3, generator=gen(7))
    kept = [t for t in out if t != MASK]
    assert len(kept) == 700  # exactly round(0.3 * 1000) tokens removed
    assert kept == sorted(kept)  # the kept tokens stay in order (a subsequence)
    assert all(not (a == MASK and b == MASK) for a, b in zip(out, out[1:]))  # one mask per run
    n_masks = out.count(MASK)
    # Poisson(3) spans: about 300 / 3 = 100 spans, fewer masks when spans share a gap.
    assert 60 <= n_masks <= 110, n_masks


def test_infill_zero_ratio_is_identity_and_bad_ratio_fails():
    assert infill_spans([5, 6, 7], mask_token_id=MASK, ratio=0.0, generator=gen()) == [5, 6, 7]
    with pytest.raises(ValueError, match="ratio"):
        infill_spans([5, 6, 7], mask_token_id=MASK, ratio=1.5, generator=gen())


def test_delete_tokens_rate_and_order():
    tokens = list(range(10000))
    out = delete_tokens(tokens, ratio=0.2, generator=gen(8))
    assert out == sorted(out)
    assert abs(len(out) / 10000 - 0.8) < 0.02


def test_permute_sentences_keeps_sentences_whole():
    sentences = [[10, 11], [20], [30, 31, 32], [40, 41]]
    orders = set()
    for seed in range(20):
        out = permute_sentences(sentences, generator=gen(seed))
        assert sorted(out) == sorted(t for s in sentences for t in s)
        rebuilt, i = [], 0
        while i < len(out):  # every sentence appears contiguously
            s = next(s for s in sentences if s[0] == out[i])
            assert out[i : i + len(s)] == s
            rebuilt.append(tuple(s))
            i += len(s)
        orders.add(tuple(rebuilt))
    assert len(orders) > 5


def test_denoise_target_is_the_original_document():
    sentences = [[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
    example = denoise(sentences, mask_token_id=MASK, generator=gen(11), delete_ratio=0.1)
    assert example.target == [t for s in sentences for t in s]
    assert example.source != example.target
    assert set(example.source) <= set(example.target) | {MASK}


# --- sequence-to-sequence and classification ---------------------------------------------------


def test_shift_right_and_seq2seq_loss():
    target = torch.tensor([[7, 8, 2], [9, 2, PAD]])
    mask = target != PAD
    assert shift_right(target, start_token_id=1, pad_token_id=PAD).tolist() == [[1, 7, 8], [1, 9, 2]]
    logits = torch.randn(2, 3, V, generator=gen(12))
    expected = torch.stack([-F.log_softmax(logits[b, t], -1)[target[b, t]] for b, t in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1))]).mean()
    torch.testing.assert_close(seq2seq_loss(logits, target, mask), expected)


def test_classification_loss_is_cross_entropy():
    logits = torch.randn(4, 3, generator=gen(13))
    labels = torch.tensor([0, 2, 1, 2])
    expected = -sum(F.log_softmax(logits[i], -1)[labels[i]] for i in range(4)) / 4
    assert math.isclose(classification_loss(logits, labels).item(), expected.item(), rel_tol=1e-6)
