"""The three exported graphs as thin torch modules over one Transformer.

Each wrapper takes exactly the contract's inputs, in the contract's order, and returns its
outputs in order (see onnxformer.runtime.contract). No second copy of any model code: they
only call Transformer.encode / cross_kv / decode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onnxformer.modeling.model import KV, Transformer
from onnxformer.runtime.contract import CROSS_ATTENTION, DECODER, ENCODER, GraphSpec


def _positions(mask: Tensor) -> Tensor:
    """Left-padding aware positions from a (B, S) 1/0 mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class EncoderGraph(nn.Module):
    """input_ids, attention_mask[, token_type_ids] -> last_hidden_state[, logits]."""

    def __init__(self, model: Transformer, spec: GraphSpec):
        super().__init__()
        self.model = model
        self.token_types = "token_type_ids" in spec.input_names
        self.logits = "logits" in spec.output_names

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *rest: Tensor):
        token_type_ids = rest[0] if self.token_types else None
        hidden = self.model.encode(
            input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=_positions(attention_mask)
        )  # (B, S, D)
        if self.logits:
            return hidden, self.model.classify(hidden)  # (B, num_labels)
        return hidden


class CrossAttentionGraph(nn.Module):
    """encoder_hidden_states -> present.{i}.encoder.key / .value for every decoder layer."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, encoder_hidden_states: Tensor):
        return tuple(t for kv in self.model.cross_kv(encoder_hidden_states) for t in kv)


class DecoderGraph(nn.Module):
    """One decoder step over T new tokens after P cached ones (P = 0 on the first step).

    Inputs in contract order: input_ids, attention_mask, position_ids, [encoder_attention_mask],
    then per layer the self-attention past (key, value) [and the cross-attention (key, value)].
    Outputs: logits, then per layer the present (key, value).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.seq2seq = model.config.arch == "encoder-decoder"
        self.n_layers = model.config.n_step_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *rest: Tensor):
        encoder_attention_mask = None
        if self.seq2seq:
            encoder_attention_mask, rest = rest[0], rest[1:]
        per_layer = 4 if self.seq2seq else 2
        past = tuple(KV(rest[per_layer * i], rest[per_layer * i + 1]) for i in range(self.n_layers))
        cross = None
        if self.seq2seq:
            cross = tuple(KV(rest[4 * i + 2], rest[4 * i + 3]) for i in range(self.n_layers))
        out = self.model.decode(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, past=past,
            cross_kv=cross, encoder_attention_mask=encoder_attention_mask,
        )
        return (out.logits, *(t for kv in out.present for t in kv))


def graph_module(model: Transformer, spec: GraphSpec) -> nn.Module:
    """The wrapper of `spec`, in eval mode: torch.onnx.export restores a wrapper's mode, and
    recursively the model's, when it is done (a wrapper left in training mode would switch the
    user's model to training mode, dropout on)."""
    if spec.name == ENCODER:
        return EncoderGraph(model, spec).eval()
    if spec.name == CROSS_ATTENTION:
        return CrossAttentionGraph(model).eval()
    if spec.name == DECODER:
        return DecoderGraph(model).eval()
    raise ValueError(f"unknown graph {spec.name!r}")


def run_torch(module: nn.Module, spec: GraphSpec, feeds: dict) -> dict[str, "torch.Tensor"]:
    """Run a wrapper on numpy feeds keyed by contract names; outputs keyed the same way."""
    dtype = next(module.parameters()).dtype
    args = []
    for t in spec.inputs:
        value = torch.from_numpy(feeds[t.name])
        args.append(value.to(dtype) if value.is_floating_point() else value)
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out))
