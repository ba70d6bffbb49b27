"""Generation with the eager PyTorch model: a step model over `Transformer`, driven by the
runtime's one search (onnxformer.runtime.generation: greedy, sample, beam in numpy).

Nothing here searches. `TorchSteps` implements the step protocol (runtime/steps.py) with the
model's functional KV cache: prefill rows from prompts (sources for an encoder-decoder, whose
decoder rows start from `start_token_id`), advance them by one or K tokens, select, release and
admit rows. Torch-vs-ONNX parity then compares two step models under one search: per-step
logits and final tokens.

Shape letters: N rows, T tokens in a call, P cached columns, S source tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from onnxformer.runtime import generation as search
from onnxformer.runtime.errors import ConfigError, InputError
from onnxformer.runtime.generation import Generation, GenerationConfig
from onnxformer.runtime.steps import AlignedSteps, left_pad

from .model import KV, Transformer, reorder_past


class _TorchCache(NamedTuple):
    past: tuple[KV, ...]  # per layer (N, Hkv, P, Dh)
    cross_kv: tuple[KV, ...] | None  # encoder-decoder: per layer (N, Hkv, S, Dh)
    encoder_mask: Tensor | None  # (N, S)


def _pad_time(x: Tensor, before: int, dim: int = 2) -> Tensor:
    """``x`` with ``before`` zero columns inserted at the start of ``dim``."""
    if before == 0:
        return x
    shape = list(x.shape)
    shape[dim] = before
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class TorchSteps(AlignedSteps):
    """The step model of an eager `Transformer` (in eval mode, no gradients)."""

    def __init__(self, model: Transformer):
        super().__init__()
        config = model.config
        if not config.has_decoder:
            raise ConfigError(f"arch {config.arch!r} cannot generate: it has no decoder")
        self.model, self.config = model, config
        self.vocab_size = config.vocab_size
        self.device = next(model.parameters()).device
        self.seq2seq = config.arch == "encoder-decoder"
        self.bidirectional_block = config.arch == "prefix-lm"  # decode()'s block of new tokens is one prefix

    def sequence_start(self, prompt: Sequence[int]) -> list[int]:
        return [self.config.start_token_id] if self.seq2seq else list(prompt)

    def _tensor(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.no_grad()
    def _start(self, prompts: list[list[int]]) -> tuple[_TorchCache, list[list[int]]]:
        dtype = next(self.model.parameters()).dtype
        shape = (len(prompts), self.config.n_kv_heads, 0, self.config.d_head)  # P = 0
        empty = tuple(KV(torch.zeros(shape, dtype=dtype, device=self.device),
                         torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(self.config.n_step_layers))
        if not self.seq2seq:
            return _TorchCache(empty, None, None), prompts
        batch = left_pad(prompts)
        ids, mask = self._tensor(batch.input_ids), self._tensor(batch.attention_mask)
        hidden = self.model.encode(ids, mask, position_ids=self._tensor(batch.position_ids))  # (B, S, D)
        return _TorchCache(empty, self.model.cross_kv(hidden), mask), [[self.config.start_token_id] for _ in prompts]

    @torch.no_grad()
    def _forward(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, cache: _TorchCache,
                 last_only: bool) -> tuple[np.ndarray, _TorchCache]:
        out = self.model.decode(
            self._tensor(ids), attention_mask=self._tensor(mask), position_ids=self._tensor(positions),
            past=cache.past, cross_kv=cache.cross_kv, encoder_attention_mask=cache.encoder_mask,
        )
        logits = out.logits[:, -1] if last_only else out.logits  # (N, V) or (N, T, V)
        return logits.float().cpu().numpy(), cache._replace(past=out.present)

    def _gather(self, cache: _TorchCache, rows: np.ndarray) -> _TorchCache:
        index = self._tensor(rows)
        return _TorchCache(
            reorder_past(cache.past, index),
            None if cache.cross_kv is None else reorder_past(cache.cross_kv, index),
            None if cache.encoder_mask is None else cache.encoder_mask.index_select(0, index),
        )

    def _join(self, a: _TorchCache, b: _TorchCache, pad_a: int, pad_b: int) -> _TorchCache:
        def cat(x: Tensor, y: Tensor, pad_x: int, pad_y: int, dim: int = 2) -> Tensor:
            return torch.cat([_pad_time(x, pad_x, dim), _pad_time(y, pad_y, dim)])

        past = tuple(KV(cat(p.key, q.key, pad_a, pad_b), cat(p.value, q.value, pad_a, pad_b))
                     for p, q in zip(a.past, b.past))
        if a.cross_kv is None:
            return _TorchCache(past, None, None)
        s = max(a.encoder_mask.shape[1], b.encoder_mask.shape[1])  # sources left-padded to the longer
        sa, sb = s - a.encoder_mask.shape[1], s - b.encoder_mask.shape[1]
        cross = tuple(KV(cat(p.key, q.key, sa, sb), cat(p.value, q.value, sa, sb))
                      for p, q in zip(a.cross_kv, b.cross_kv))
        return _TorchCache(past, cross, cat(a.encoder_mask, b.encoder_mask, sa, sb, dim=1))


def generate_rows(model: Transformer, prompts: list[list[int]], config: GenerationConfig, *,
                  rng: np.random.Generator | None = None) -> list[Generation]:
    """The runtime's search over the eager model; one Generation per prompt (token ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        return search.generate(TorchSteps(model), prompts, config, rng=rng)
    finally:
        model.train(was_training)


def generate(model: Transformer, prompts: list[list[int]], config: GenerationConfig) -> list[list[list[int]]]:
    """Generate for each prompt (token ids; the source for encoder-decoder models).

    Returns, per prompt, `num_return_sequences` lists of generated token ids.
    """
    return [g.token_ids for g in generate_rows(model, prompts, config)]


__all__: list[Any] = ["TorchSteps", "generate_rows", "generate"]
