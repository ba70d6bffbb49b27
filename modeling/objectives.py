"""Training objectives as pure functions: tensors (or token lists) in, tensors out.

Nothing here holds state or touches a global random generator: every random choice takes an
explicit ``torch.Generator``. Each task's ``Objective`` (``tasks.py``) builds its batches with
these functions and calls the model; the functions never call the model themselves.

Shape letters: B batch, T tokens of a (decoder or encoder) row, V vocabulary, C classes.

Labels use ``IGNORE_INDEX`` (-100) for positions that carry no loss, as in
``torch.nn.functional.cross_entropy``.

=====================  ===========================================  ================================
objective              inputs                                       loss on
=====================  ===========================================  ================================
causal LM              ``<s> text </s>``                            every next token (pads ignored)
SFT / prefix-LM        ``<s> prompt continuation </s>``             continuation tokens only
masked LM (BERT)       ``[CLS] a [SEP]`` with 15% of tokens chosen  the chosen tokens only
next sentence (BERT)   ``[CLS] a [SEP] b [SEP]``, types 0/1         class 0 = b follows a, 1 = random
denoising (BART)       noised text -> encoder, original -> decoder  every target token
sequence-to-sequence   source -> encoder, target -> decoder         every target token
classification         ``[CLS] text [SEP]`` -> pooled head          one class per row
=====================  ===========================================  ================================
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from onnxformer.runtime.errors import DataError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def distillation_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                      kl_weight: float) -> tuple[Tensor, Tensor]:
    """Knowledge distillation (Hinton et al. 2015): ``kl_weight * T^2 * KL(teacher_T || student_T)
    + (1 - kl_weight) * CE(labels)``, both averaged over the positions whose label is not
    IGNORE_INDEX; returns (that loss, the hard-label cross-entropy).

    logits, teacher_logits (B, T, V) (the teacher's cut to the student's V when it has more:
    ids past the tokenizer's never occur), labels (B, T); float32 whatever the dtype. The
    softmax at temperature T is taken over the logits / T; T^2 keeps the gradient's scale."""
    hard = token_cross_entropy(logits, labels)
    vocab = logits.shape[-1]
    if teacher_logits.shape[:-1] != logits.shape[:-1] or teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not cover student logits {tuple(logits.shape)}")
    keep = (labels != IGNORE_INDEX).reshape(-1)  # (B*T,)
    if not bool(keep.any()):
        return hard, hard
    student = logits.reshape(-1, vocab)[keep].float() / temperature  # (M, V)
    teacher = teacher_logits[..., :vocab].reshape(-1, vocab)[keep].float() / temperature  # (M, V)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl_weight * temperature ** 2 * kl + (1.0 - kl_weight) * hard, hard


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE_INDEX.

    logits (B, T, V), labels (B, T). Computed in float32 whatever the logits dtype. A batch
    without a single labelled position gives 0 (with a gradient path), never NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    flat_labels = labels.reshape(-1)  # (B*T,)
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)


def count_labels(labels: Tensor) -> int:
    """How many positions carry a loss (the tokens a token-level loss averages over)."""
    return int((labels != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------
# Causal LM, SFT and prefix-LM: next-token prediction with a loss mask
# --------------------------------------------------------------------------------------------


def next_token_labels(input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Labels for next-token prediction: position t predicts token t + 1.

    input_ids (B, T); loss_mask (B, T) bool marks the tokens that should be *predicted*
    (False on pads, and on the prompt for SFT). Returns labels (B, T) aligned with the
    logits: labels[:, t] = input_ids[:, t + 1] where loss_mask[:, t + 1], else IGNORE_INDEX;
    the last position predicts nothing.
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    targets = input_ids[:, 1:]  # (B, T-1)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), targets, torch.full_like(targets, IGNORE_INDEX))
    return labels


def causal_lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Next-token NLL over every real token; logits (B, T, V) from the unshifted input_ids (B, T)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return token_cross_entropy(logits, next_token_labels(input_ids, mask))


def continuation_mask(prompt_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) bool: True on real tokens at or after each row's prompt (right-padded rows).

    prompt_lengths (B,) counts the prompt tokens (including ``<s>``) at the start of each row.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]  # (1, T)
    return (positions >= prompt_lengths[:, None]) & attention_mask.bool()


def prompt_mask(prompt_lengths: Tensor, length: int) -> Tensor:
    """(B, T) bool: True on each row's prompt tokens; the ``prefix_mask`` of a prefix-LM."""
    positions = torch.arange(length, device=prompt_lengths.device)[None, :]  # (1, T)
    return positions < prompt_lengths[:, None]


def sft_loss(logits: Tensor, input_ids: Tensor, prompt_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """Instruction tuning / prefix-LM: next-token NLL on the continuation (response) tokens only."""
    return token_cross_entropy(logits, next_token_labels(input_ids, continuation_mask(prompt_lengths, attention_mask)))


# --------------------------------------------------------------------------------------------
# Masked LM (BERT)
# --------------------------------------------------------------------------------------------


class MaskedTokens(NamedTuple):
    input_ids: Tensor  # (B, T) with the chosen tokens replaced
    labels: Tensor  # (B, T) original id at chosen positions, IGNORE_INDEX elsewhere


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    special_token_ids: Sequence[int],
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> MaskedTokens:
    """BERT masking: choose each non-special token with probability ``mask_prob``; of the
    chosen, 80% become ``[MASK]``, 10% a random regular token, 10% stay unchanged.

    ``special_token_ids`` must include the pad id: those tokens are never chosen, and never
    drawn as random replacements. Labels hold the original token at chosen positions only.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1]; got {mask_prob!r}")
    if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError(
            f"mask_replace_prob ({mask_replace_prob}) + random_replace_prob ({random_replace_prob}) "
            "must be within [0, 1]"
        )
    special = torch.tensor(sorted({i for i in special_token_ids if i >= 0}), dtype=torch.long)
    if mask_token_id not in special.tolist():
        special = torch.cat([special, torch.tensor([mask_token_id])])
    regular = torch.arange(vocab_size)[~torch.isin(torch.arange(vocab_size), special)]  # (R,)
    if regular.numel() == 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no regular token besides the special ids")

    ids = input_ids.cpu()
    candidates = ~torch.isin(ids, special)  # (B, T)
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & candidates
    how = torch.rand(ids.shape, generator=generator)  # decides [MASK] / random / keep
    random_ids = regular[torch.randint(len(regular), ids.shape, generator=generator)]
    to_mask = chosen & (how < mask_replace_prob)
    to_random = chosen & (how >= mask_replace_prob) & (how < mask_replace_prob + random_replace_prob)

    masked = ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return MaskedTokens(masked.to(input_ids.device), labels.to(input_ids.device))


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on the chosen positions; logits (B, T, V) from ``model.mlm_logits``."""
    return token_cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------
# Next-sentence prediction (BERT)
# --------------------------------------------------------------------------------------------

IS_NEXT, IS_RANDOM = 0, 1


class SentencePair(NamedTuple):
    first: str
    second: str
    label: int  # IS_NEXT (0) when `second` follows `first` in its document, IS_RANDOM (1) otherwise


def next_sentence_pairs(documents: Sequence[Sequence[str]], *, generator: torch.Generator) -> list[SentencePair]:
    """One pair per sentence that has a successor in its document: with probability 1/2 the
    true next sentence (label 0), otherwise a sentence drawn uniformly from the whole corpus
    other than the true next one (label 1). Encode with ``tokenizer.encode(first, second)``
    to get ``[CLS] a [SEP] b [SEP]`` and token types 0/1.
    """
    flat = [s for doc in documents for s in doc]
    if len(flat) < 3:
        raise DataError(f"next-sentence pairs need at least 3 sentences; got {len(flat)}. Pass more text, or drop --nsp")
    pairs: list[SentencePair] = []
    offset = 0
    for doc in documents:
        for i in range(len(doc) - 1):
            true_next = offset + i + 1
            if torch.rand((), generator=generator).item() < 0.5:
                pairs.append(SentencePair(doc[i], doc[i + 1], IS_NEXT))
                continue
            j = int(torch.randint(len(flat) - 1, (), generator=generator))
            j = j + 1 if j >= true_next else j  # uniform over every index but true_next
            pairs.append(SentencePair(doc[i], flat[j], IS_RANDOM))
        offset += len(doc)
    return pairs


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of (B, C) logits against (B,) class ids: classification and NSP."""
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------------------------
# Denoising (BART): sentence permutation, token deletion, text infilling. Token lists in/out.
# --------------------------------------------------------------------------------------------


def permute_sentences(sentences: Sequence[Sequence[int]], *, generator: torch.Generator) -> list[int]:
    """Shuffle the order of the sentences (token lists) and concatenate them."""
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return [tok for i in order for tok in sentences[i]]


def delete_tokens(tokens: Sequence[int], *, ratio: float, generator: torch.Generator) -> list[int]:
    """Drop each token independently with probability ``ratio`` (the model must find where)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"deletion ratio must be in [0, 1); got {ratio!r}")
    keep = (torch.rand(len(tokens), generator=generator) >= ratio).tolist()
    return [tok for tok, k in zip(tokens, keep) if k]


def infill_spans(
    tokens: Sequence[int],
    *,
    mask_token_id: int,
    ratio: float,
    generator: torch.Generator,
    poisson_lambda: float = 3.0,
) -> list[int]:
    """Text infilling: mask exactly ``round(ratio * len)`` tokens in spans whose lengths follow
    Poisson(``poisson_lambda``) (the last one clipped), and replace every span with ONE mask
    token, so the model also learns how many tokens are missing. A span of length 0 inserts
    a mask token without removing anything.

    The spans are dropped into the gaps between the kept tokens (a gap chosen uniformly per
    span); spans that land in the same gap merge into one masked run and one mask token.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"infilling ratio must be in [0, 1]; got {ratio!r}")
    n = len(tokens)
    budget = round(ratio * n)
    if budget == 0:
        return list(tokens)
    lengths: list[int] = []
    while sum(lengths) < budget:
        draw = torch.poisson(torch.full((budget,), float(poisson_lambda)), generator=generator)
        lengths.extend(int(x) for x in draw.tolist())
    total = 0
    for k, length in enumerate(lengths):  # keep spans until the budget is met; clip the last
        if total + length >= budget:
            lengths = lengths[:k] + [budget - total]
            break
        total += length
    kept = n - budget
    gaps = torch.randint(kept + 1, (len(lengths),), generator=generator).tolist()  # gap g: before kept token g
    masked_in_gap: dict[int, int] = {}
    for gap, length in zip(gaps, lengths):
        masked_in_gap[gap] = masked_in_gap.get(gap, 0) + length
    out: list[int] = []
    i = 0  # next original token
    for gap in range(kept + 1):
        if gap in masked_in_gap:
            out.append(mask_token_id)
            i += masked_in_gap[gap]
        if gap < kept:
            out.append(tokens[i])
            i += 1
    return out


class DenoisingExample(NamedTuple):
    source: list[int]  # noised tokens for the encoder
    target: list[int]  # the original tokens, what the decoder must reproduce


def denoise(
    sentences: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    generator: torch.Generator,
    infill_ratio: float = 0.3,
    delete_ratio: float = 0.0,
    permute: bool = True,
    poisson_lambda: float = 3.0,
) -> DenoisingExample:
    """BART noising of one document given as sentences of token ids (no special tokens):
    sentence permutation, then token deletion, then span infilling. Target = the original
    tokens in their original order.
    """
    original = [tok for s in sentences for tok in s]
    noised = permute_sentences(sentences, generator=generator) if permute else list(original)
    if delete_ratio > 0:
        noised = delete_tokens(noised, ratio=delete_ratio, generator=generator)
    noised = infill_spans(
        noised, mask_token_id=mask_token_id, ratio=infill_ratio, generator=generator,
        poisson_lambda=poisson_lambda,
    )
    return DenoisingExample(noised, original)


# --------------------------------------------------------------------------------------------
# Sequence-to-sequence (encoder-decoder): teacher forcing on the target
# --------------------------------------------------------------------------------------------


def shift_right(target_ids: Tensor, *, start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}] for target (B, T)."""
    start = torch.full_like(target_ids[:, :1], start_token_id)
    shifted = torch.cat([start, target_ids[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def seq2seq_labels(target_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Labels (B, T): the target tokens, IGNORE_INDEX on padding."""
    return target_ids.masked_fill(~target_mask.bool(), IGNORE_INDEX)


def seq2seq_loss(logits: Tensor, target_ids: Tensor, target_mask: Tensor) -> Tensor:
    """NLL of every real target token; logits (B, T, V) from decoding ``shift_right(target)``."""
    return token_cross_entropy(logits, seq2seq_labels(target_ids, target_mask))


__all__ = [
    "IGNORE_INDEX", "IS_NEXT", "IS_RANDOM", "DenoisingExample", "MaskedTokens", "SentencePair",
    "causal_lm_loss", "classification_loss", "continuation_mask", "count_labels", "delete_tokens",
    "denoise", "infill_spans", "mask_tokens", "mlm_loss", "next_sentence_pairs", "next_token_labels",
    "permute_sentences", "prompt_mask", "seq2seq_labels", "seq2seq_loss", "sft_loss", "shift_right",
    "token_cross_entropy", "distillation_loss",
]
