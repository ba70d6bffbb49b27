"""Reference generation in PyTorch, with the KV cache: the ground truth the runtime must match.

It takes the runtime's `GenerationConfig` (torch-free, in onnxformer.runtime.generation) and
follows the same written spec, step for step:

* prompts are left-padded; `attention_mask` is 0 on pads, `position_ids = cumsum(mask) - 1`;
  each new token gets the next position and a column of ones in the mask;
* encoder-decoder: the source is encoded once, the cross-attention K/V are computed once,
  and the decoder starts from `decoder_start_token_id`;
* logits processing, in order: repetition penalty, no-repeat n-gram, eos suppression while
  fewer than `min_new_tokens` were generated, then (sampling only) temperature, top-k, top-p;
* beam search as documented in `beam_search` below.

Sequences returned are the generated ids only (no prompt), including the eos if one came.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import KV, Transformer, reorder_past

NEG_INF = float("-inf")


class _Decoding:
    """Batched decoding state: feeds the model one step at a time and keeps its cache."""

    def __init__(self, model: Transformer, prompts: list[list[int]], *, copies: int, pad_id: int):
        c = model.config
        self.model, self.pad_id = model, pad_id
        rows = [list(p) for p in prompts for _ in range(copies)]  # row b * copies + j
        self.history = rows if c.arch != "encoder-decoder" else [[c.start_token_id] for _ in rows]
        width = max(len(r) for r in rows)
        device = next(model.parameters()).device
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        self.cross_kv: tuple[KV, ...] | None = None
        self.encoder_mask: Tensor | None = None
        if c.arch == "encoder-decoder":
            hidden = model.encode(ids, mask, position_ids=positions)
            self.cross_kv = model.cross_kv(hidden)
            self.encoder_mask = mask
            ids = torch.full((len(rows), 1), c.start_token_id, dtype=torch.long, device=device)
            mask = torch.ones_like(ids)
            positions = torch.zeros_like(ids)
        self._next = (ids, mask, positions)
        self.past: tuple[KV, ...] | None = None

    def logits(self) -> Tensor:
        """Run the pending input through the model; returns last-position logits (N, V)."""
        ids, mask, positions = self._next
        out = self.model.decode(
            ids, attention_mask=mask, position_ids=positions, past=self.past,
            cross_kv=self.cross_kv, encoder_attention_mask=self.encoder_mask,
        )
        self.past, self.mask, self.last_pos = out.present, mask, positions[:, -1]
        return out.logits[:, -1].float()

    def feed(self, tokens: Tensor) -> None:
        """Queue one new token per row (N,) for the next `logits()` call."""
        for row, tok in zip(self.history, tokens.tolist()):
            row.append(tok)
        ones = torch.ones_like(self.mask[:, :1])
        self._next = (tokens[:, None], torch.cat([self.mask, ones], dim=1), (self.last_pos + 1)[:, None])

    def reorder(self, index: Tensor) -> None:
        self.past = reorder_past(self.past, index)
        if self.cross_kv is not None:
            self.cross_kv = reorder_past(self.cross_kv, index)
            self.encoder_mask = self.encoder_mask.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.last_pos = self.last_pos.index_select(0, index)
        self.history = [list(self.history[i]) for i in index.tolist()]


# ------------------------------------------------------------------------------------------
# Logits processing (each a pure function of logits (N, V) and the rows' token histories)
# ------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, history: list[list[int]], penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for i, row in enumerate(history):
        seen = torch.tensor(sorted(set(row)), dtype=torch.long, device=logits.device)
        vals = logits[i, seen]
        logits[i, seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def ban_repeated_ngrams(logits: Tensor, history: list[list[int]], n: int) -> Tensor:
    if n <= 0:
        return logits
    logits = logits.clone()
    for i, row in enumerate(history):
        if len(row) < n:
            continue
        tail = tuple(row[len(row) - n + 1:])
        banned = {row[j + n - 1] for j in range(len(row) - n + 1) if tuple(row[j:j + n - 1]) == tail}
        if banned:
            logits[i, sorted(banned)] = NEG_INF
    return logits


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    drop_sorted = before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def process_logits(logits: Tensor, history: list[list[int]], generated: int, config, *, sampling: bool) -> Tensor:
    logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
    logits = ban_repeated_ngrams(logits, history, config.no_repeat_ngram_size)
    if generated < config.min_new_tokens and config.eos_token_ids:
        logits = logits.clone()
        logits[:, list(config.eos_token_ids)] = NEG_INF
    if sampling:
        logits = logits / config.temperature
        logits = top_k_filter(logits, config.top_k)
        logits = top_p_filter(logits, config.top_p)
    return logits


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------


def _token_by_token(model, prompts, config, choose) -> list[list[list[int]]]:
    """Greedy and sampling: one token per row per step until eos or max_new_tokens."""
    copies = config.num_return_sequences
    dec = _Decoding(model, prompts, copies=copies, pad_id=config.pad_token_id)
    n = len(prompts) * copies
    out: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    eos = set(config.eos_token_ids)
    for t in range(config.max_new_tokens):
        logits = process_logits(dec.logits(), dec.history, t, config, sampling=config.strategy == "sample")
        tokens = choose(logits)  # (N,)
        for i, tok in enumerate(tokens.tolist()):
            if finished[i]:
                tokens[i] = config.pad_token_id
                continue
            out[i].append(tok)
            finished[i] = tok in eos
        if all(finished):
            break
        dec.feed(tokens)
    return [out[b * copies:(b + 1) * copies] for b in range(len(prompts))]


def greedy(model: Transformer, prompts: list[list[int]], config) -> list[list[list[int]]]:
    return _token_by_token(model, prompts, config, lambda logits: logits.argmax(-1))


def sample(model: Transformer, prompts: list[list[int]], config) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())

    def choose(logits: Tensor) -> Tensor:
        cdf = logits.softmax(-1).double().cumsum(-1)  # (N, V)
        u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
        return torch.searchsorted(cdf, u.to(cdf.device), right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)

    return _token_by_token(model, prompts, config, choose)


def beam_search(model: Transformer, prompts: list[list[int]], config) -> list[list[list[int]]]:
    """Beam search, K = num_beams rows per prompt.

    Mirrors onnxformer.runtime.generation.beam_search (its docstring is the spec): float32
    scores start [0, -inf, ...]; each step the first C = max(2, 1 + #eos) * K candidates of a
    stable sort of -(score + log_softmax(processed logits)) are walked in order; an eos ranked
    < K closes a hypothesis scored sum_logprob / (t+1)^length_penalty, other tokens fill the K
    next beams (empty slots copy beam 0 with score -inf). A prompt is done when it holds K
    hypotheses and either early_stopping, or its worst hypothesis >= best running score /
    (t+1)^length_penalty. At the end, unfinished prompts add their running beams.
    """
    k, lp = config.num_beams, config.length_penalty
    dec = _Decoding(model, prompts, copies=k, pad_id=config.pad_token_id)
    n_prompts = len(prompts)
    eos = set(config.eos_token_ids)
    scores = torch.full((n_prompts * k,), NEG_INF, dtype=torch.float32)  # (N,) float32 as the spec says
    scores[::k] = 0.0
    beams: list[list[int]] = [[] for _ in range(n_prompts * k)]
    hyps: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(n_prompts)]  # (score, order, tokens)
    done = [False] * n_prompts
    counter = 0

    def add(b: int, score: float, tokens: list[int]) -> None:
        nonlocal counter
        hyps[b].append((score, counter, tokens))
        counter += 1
        hyps[b].sort(key=lambda h: (-h[0], h[1]))  # best first, earlier first among ties
        del hyps[b][k:]

    last_t = 0
    for t in range(config.max_new_tokens):
        last_t = t
        logits = process_logits(dec.logits(), dec.history, t, config, sampling=False)
        logprobs = logits.float().log_softmax(-1).cpu()  # (N, V)
        vocab = logprobs.shape[-1]
        cand = (scores[:, None] + logprobs).reshape(n_prompts, k * vocab)  # (B, K*V)
        n_cand = min(max(2, 1 + len(eos)) * k, k * vocab)
        order = torch.sort(-cand, dim=-1, stable=True).indices[:, :n_cand]  # (B, C)
        norm = float(torch.tensor(t + 1, dtype=torch.float32) ** lp)
        src = torch.arange(n_prompts).repeat_interleave(k) * k  # (N,) empty slots copy beam 0
        next_tokens = torch.full((n_prompts * k,), config.pad_token_id, dtype=torch.long)
        next_scores = torch.full((n_prompts * k,), NEG_INF, dtype=torch.float32)
        for b in range(n_prompts):
            base = b * k
            if done[b]:
                src[base:base + k] = torch.arange(base, base + k)
                continue
            filled = 0
            for rank, flat in enumerate(order[b].tolist()):
                beam, tok = divmod(flat, vocab)
                score = cand[b, flat]
                if tok in eos:
                    if rank < k:
                        add(b, float(score / norm), beams[base + beam] + [tok])
                    continue
                src[base + filled], next_tokens[base + filled] = base + beam, tok
                next_scores[base + filled] = score
                filled += 1
                if filled == k:
                    break
            if len(hyps[b]) == k:
                done[b] = config.early_stopping or hyps[b][-1][0] >= float(next_scores[base] / norm)
        beams = [beams[s] + [tok] for s, tok in zip(src.tolist(), next_tokens.tolist())]
        scores = next_scores
        if all(done) or t == config.max_new_tokens - 1:
            break
        device = dec.mask.device
        dec.reorder(src.to(device))
        dec.feed(next_tokens.to(device))

    norm = float(torch.tensor(last_t + 1, dtype=torch.float32) ** lp)
    results = []
    for b in range(n_prompts):
        if not done[b] and config.max_new_tokens:
            for r in range(b * k, (b + 1) * k):
                add(b, float(scores[r] / norm), beams[r])
        results.append([tokens for _, _, tokens in hyps[b][: config.num_return_sequences]])
    if not config.max_new_tokens:
        results = [[[] for _ in range(config.num_return_sequences)] for _ in prompts]
    return results


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], config) -> list[list[list[int]]]:
    """Generate for each prompt (token ids; the source for encoder-decoder models).

    Returns, per prompt, `num_return_sequences` lists of generated token ids.
    """
    if not model.config.has_decoder:
        raise ValueError(f"arch {model.config.arch!r} cannot generate: it has no decoder")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        strategy = {"greedy": greedy, "sample": sample, "beam": beam_search}[config.strategy]
        return strategy(model, prompts, config)
    finally:
        model.train(was_training)
