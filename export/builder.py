"""The decoder step graph written node by node for onnxruntime: the "shared" KV-cache layout.

The traced step graph (torch.onnx, layout "concat") spells every operation of the PyTorch
code: ~1400 nodes for 8 layers (~500 after onnxruntime's optimizer), a KV cache concatenated
(copied) on every step, and logits for every position. This builder writes the same math as
~12 nodes per layer of onnxruntime's fused operators:

    LayerNormalization (or RMSNorm's 6 plain ops)                   the first norm
    MatMul (q, k and v in one)                                      projections
    com.microsoft.GroupQueryAttention                               causal self-attention, RoPE
        inside (cos/sin caches), grouped K/V heads, and the KV cache in one preallocated buffer
        per layer that the step updates in place (past and present are the same memory)
    com.microsoft.MultiHeadAttention                                cross-attention over the
        encoder K/V computed once per source (encoder-decoder)
    com.microsoft.SkipSimplifiedLayerNormalization / SkipLayerNormalization
                                                                    residual add + norm in one
                                                                    (the final norm included)
    Sigmoid, Mul / com.microsoft.Gelu, FastGelu                     SwiGLU / GELU (erf, tanh) feed-forward
    GatherND                                                        the last real token of each
        row, so the vocabulary projection runs once per row, not per position
    ArgMax, and -log(sum(exp(logits - max)))                        the greedy choice and its
        log-probability (next_token, next_token_logprob)

The I/O is the contract's "shared" layout (runtime/contract.py, runtime/FORMAT.md section 7).
Rows are right-padded on the first step; ``sequence_lengths`` (B,) counts each row's tokens
after the step, from which the graph derives GroupQueryAttention's ``seqlens_k`` and
``total_sequence_length``, the positions and the gathered position. Every graph is validated
against the PyTorch model like the traced one (export/validate.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxformer.modeling.config import ModelConfig
from onnxformer.modeling.model import Attention, Block, FeedForward, RMSNorm, RotaryEmbedding, Transformer
from onnxformer.runtime.contract import (
    ENCODER_ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    SEQUENCE_LENGTHS,
    Dims,
    GraphSpec,
    past_names,
    present_names,
    self_cache_kind,
)
from onnxformer.runtime.errors import ExportError

from .weights import WeightStore

MS_DOMAIN = "com.microsoft"
NEXT_TOKEN_NODES = "/next_token"  # name prefix of the greedy-choice nodes (kept float32 in fp16 exports)


# The support check fails closed. Every ModelConfig field is listed with what the built graph
# implements for it: ANY value, the values listed, or a check on the whole config naming the
# limit. A field not listed here (a new one) makes the check refuse the model by name, and the
# exporter traces the decoder instead; tests/test_export.py checks the list covers every field.
ANY = "any value"


def _arch(c: ModelConfig) -> str | None:
    if c.arch not in ("decoder", "encoder-decoder"):
        return (f"arch {c.arch!r} is not implemented (supported: 'decoder', 'encoder-decoder'): onnxruntime's "
                "GroupQueryAttention is causal only, and a prefix-LM prompt attends bidirectionally")
    return None


def _head_size(c: ModelConfig) -> str | None:
    return (f"head size {c.d_head} (head_dim, or d_model / n_heads): onnxruntime's GroupQueryAttention needs a "
            "multiple of 16"
            if c.d_head % 16 else None)


def _cross_heads(c: ModelConfig) -> str | None:
    if c.arch == "encoder-decoder" and c.n_kv_heads != c.n_heads:
        return (f"n_kv_heads {c.n_kv_heads} < n_heads {c.n_heads} in an encoder-decoder: its cross-attention "
                "(onnxruntime's MultiHeadAttention) needs n_kv_heads == n_heads")
    return None


IMPLEMENTED: dict[str, str | tuple | Callable[[ModelConfig], str | None]] = {
    "arch": _arch,  # decoder, encoder-decoder
    "vocab_size": ANY,
    "d_model": ANY,
    "n_heads": _head_size,
    "n_kv_heads": _cross_heads,
    "n_layers": ANY,
    "n_decoder_layers": ANY,
    "d_ff": ANY,
    "max_seq_len": ANY,  # the rotary cos/sin caches span it
    "pos_encoding": ("rope", "learned", "sinusoidal"),
    "rope_theta": ANY,  # the caches are the model's own RotaryEmbedding values
    "rope_scaling": ANY,  # ... with its scaled frequencies
    "d_embed": (None,),
    "head_dim": ANY,  # GroupQueryAttention takes the head size from the packed q|k|v width; see n_heads
    "pos_offset": (0,),
    "sinusoid_layout": ANY,  # the graph gathers the model's own table (model.sinusoid), in its layout
    "separate_decoder_positions": (False,),
    "relative_buckets": ANY,  # used only by pos_encoding "relative", which is not implemented
    "relative_max_distance": ANY,
    "activation": ("gelu", "gelu_tanh", "swiglu"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "norm_eps": ANY,
    "bias": (True, False),
    "qkv_bias": ANY,  # the q|k|v projection's bias is the model's own (absent, or the three concatenated)
    "attn_scale": ANY,  # the attention nodes' scale attribute is the model's config.scale
    "embed_scale": (1.0,),
    "embedding_norm": (None,),
    "logits_bias": (False,),
    "logit_scale": (1.0,),
    "pooler_activation": ANY,  # encoder only
    "mlm_activation": ANY,  # encoder only (the MLM head is in no graph)
    "dropout": ANY,  # inference: no dropout
    "tie_embeddings": (True, False),
    "type_vocab_size": (0,),
    "num_labels": (0,),
    "pad_token_id": ANY,  # token ids: the runtime's concern, not the graph's
    "bos_token_id": ANY,
    "eos_token_id": ANY,
    "decoder_start_token_id": ANY,
    "label_names": ((),),
    "prompt_format": ANY,  # the prompt's text, not the graph's: the runtime applies it (FORMAT.md 5.2)
}
# The modules the builder reads weights from; anything else (a LoRA wrapper, a user's
# replacement module) is refused rather than read wrongly.
KNOWN_MODULES = (Transformer, torch.nn.ModuleList, torch.nn.Embedding, torch.nn.Linear, torch.nn.LayerNorm,
                 torch.nn.Dropout, torch.nn.Sequential, torch.nn.GELU, RMSNorm, RotaryEmbedding, Block, Attention,
                 FeedForward)


def unsupported_reason(model: Transformer) -> str | None:
    """Why the built ("shared" layout) decoder cannot express `model`, naming every field (and
    its value) outside IMPLEMENTED, or None when it can."""
    config, reasons = model.config, []
    for f in dataclasses.fields(config):
        rule, value = IMPLEMENTED.get(f.name), getattr(config, f.name)
        if rule is None:
            reasons.append(f"config field {f.name!r} ({value!r}) is not implemented by export/builder.py")
        elif isinstance(rule, tuple) and value not in rule:
            reasons.append(f"{f.name} {value!r} is not implemented (supported: {', '.join(map(repr, rule))})")
        elif callable(rule) and (why := rule(config)) is not None:
            reasons.append(why)
    foreign = sorted({type(m).__name__ for m in model.modules() if type(m) not in KNOWN_MODULES})
    if foreign:
        reasons.append(f"module type(s) {', '.join(foreign)} are not read by export/builder.py")
    return "; ".join(reasons) or None


class _Graph:
    """A small graph writer: unique node/tensor names, initializers from torch tensors (written
    to `store`, the package's weights file, as they are made, when there is one)."""

    def __init__(self, dtype: np.dtype, store: WeightStore | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dtype = dtype
        self.store = store
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def weight(self, name: str, array: np.ndarray | torch.Tensor, *, float_: bool = True) -> str:
        if isinstance(array, torch.Tensor):  # torch's copies (a transpose made contiguous) are the fast ones
            array = array.detach().to(torch.float32).contiguous().cpu().numpy()
        array = np.ascontiguousarray(array.astype(self.dtype, copy=False) if float_ else array)
        name = self._unique(name)
        self.initializers.append(self.store.tensor(name, array) if self.store is not None
                                 else numpy_helper.from_array(array, name))
        return name

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        return self.weight(name, np.asarray(values, dtype=dtype), float_=False)

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int = 1, domain: str = "",
           **attrs: Any) -> list[str]:
        name = self._unique(name)
        outs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        return self.op(op_type, inputs, name, **attrs)[0]


def _t(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().t()  # (in, out): MatMul's B


class _Builder:
    def __init__(self, model: Transformer, spec: GraphSpec, dims: Dims, store: WeightStore | None):
        self.model, self.spec, self.dims = model, spec, dims
        self.c = model.config
        self.g = _Graph(np.dtype(np.float32), store)
        self.pre = self.c.norm_position == "pre"

    # Pieces -----------------------------------------------------------------------------
    def linear(self, x: str, linear: torch.nn.Linear, name: str) -> str:
        y = self.g.op1("MatMul", [x, self.g.weight(f"{name}.weight", _t(linear))], f"/{name}/MatMul")
        if linear.bias is not None:
            y = self.g.op1("Add", [y, self.g.weight(f"{name}.bias", linear.bias)], f"/{name}/Add")
        return y

    def _norm_weights(self, norm: torch.nn.Module, name: str) -> tuple[str, str | None]:
        gamma = self.g.weight(f"{name}.weight", norm.weight)
        bias = getattr(norm, "bias", None)
        return gamma, (self.g.weight(f"{name}.bias", bias) if bias is not None else None)

    def norm(self, x: str, norm: torch.nn.Module, name: str) -> str:
        gamma, beta = self._norm_weights(norm, name)
        if self.c.norm == "rmsnorm":  # x / sqrt(mean(x^2) + eps) * w; onnxruntime fuses it to one node
            # (its SimplifiedLayerNormalization lives in the default domain, which the onnx checker refuses)
            g = self.g
            two = g.weight(f"{name}.two", np.array(2.0, dtype=np.float32))  # Pow, not Mul: the pattern onnxruntime fuses
            mean = g.op1("ReduceMean", [g.op1("Pow", [x, two], f"/{name}/Pow"), g.const(f"{name}.axes", [-1])],
                         f"/{name}/ReduceMean", keepdims=1)
            eps = g.weight(f"{name}.eps", np.array(norm.eps, dtype=np.float32))
            rms = g.op1("Sqrt", [g.op1("Add", [mean, eps], f"/{name}/AddEps")], f"/{name}/Sqrt")
            return g.op1("Mul", [g.op1("Div", [x, rms], f"/{name}/Div"), gamma], f"/{name}/Scale")
        return self.g.op1("LayerNormalization", [x, gamma] + ([beta] if beta else []), f"/{name}/LayerNorm",
                          axis=-1, epsilon=float(norm.eps), stash_type=1)

    def skip_norm(self, residual: str, y: str, norm: torch.nn.Module, name: str) -> tuple[str, str]:
        """(norm(residual + y), residual + y) in one fused node."""
        gamma, beta = self._norm_weights(norm, name)
        if self.c.norm == "rmsnorm":
            out = self.g.op("SkipSimplifiedLayerNormalization", [residual, y, gamma], f"/{name}/SkipSimplifiedLayerNorm",
                            outputs=4, domain=MS_DOMAIN, epsilon=float(norm.eps))
        else:
            out = self.g.op("SkipLayerNormalization", [residual, y, gamma] + ([beta] if beta else []),
                            f"/{name}/SkipLayerNorm", outputs=4, domain=MS_DOMAIN, epsilon=float(norm.eps))
        return out[0], out[3]

    def feed_forward(self, x: str, *, ffn: torch.nn.Module, name: str) -> str:
        up = self.linear(x, ffn.up_proj, f"{name}.up_proj")
        if self.c.activation == "swiglu":
            gate = self.linear(x, ffn.gate_proj, f"{name}.gate_proj")
            silu = self.g.op1("Mul", [gate, self.g.op1("Sigmoid", [gate], f"/{name}/act/Sigmoid")], f"/{name}/act/Mul")
            hidden = self.g.op1("Mul", [silu, up], f"/{name}/Mul")
        elif self.c.activation == "gelu_tanh":  # GELU's tanh approximation, as F.gelu(approximate="tanh")
            hidden = self.g.op1("FastGelu", [up], f"/{name}/act/FastGelu", domain=MS_DOMAIN)
        else:  # exact (erf) GELU, as torch's F.gelu
            hidden = self.g.op1("Gelu", [up], f"/{name}/act/Gelu", domain=MS_DOMAIN)
        return self.linear(hidden, ffn.down_proj, f"{name}.down_proj")

    def self_attention(self, x: str, *, attn: torch.nn.Module, i: int, lengths: tuple[str, str],
                       rotary: tuple[str, str] | None) -> str:
        name = f"layers.{i}.attn"
        weight = torch.cat([_t(attn.q_proj), _t(attn.k_proj), _t(attn.v_proj)], dim=1)  # (D, (H+2Hkv)Dh)
        qkv = self.g.op1("MatMul", [x, self.g.weight(f"{name}.qkv_proj.weight", weight)], f"/{name}/qkv_proj/MatMul")
        if attn.q_proj.bias is not None:
            bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            qkv = self.g.op1("Add", [qkv, self.g.weight(f"{name}.qkv_proj.bias", bias)], f"/{name}/qkv_proj/Add")
        kind = self_cache_kind(self.c.arch)
        past_k, past_v = past_names(i, kind)
        present_k, present_v = present_names(i, kind)
        seqlens_k, total = lengths
        cos, sin = rotary if rotary is not None else ("", "")
        node = helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, seqlens_k, total, cos, sin],
            [f"/{name}/GroupQueryAttention/output_0", present_k, present_v],
            name=f"/{name}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=attn.n_heads, kv_num_heads=attn.n_kv_heads, scale=float(attn.scale),
            do_rotary=int(rotary is not None), rotary_interleaved=0, local_window_size=-1,
        )
        self.g.nodes.append(node)
        return self.linear(node.output[0], attn.o_proj, f"{name}.o_proj")

    def cross_attention(self, x: str, *, attn: torch.nn.Module, i: int, key_padding_mask: str) -> str:
        name = f"layers.{i}.cross_attn"
        q = self.linear(x, attn.q_proj, f"{name}.q_proj")
        key, value = past_names(i, "encoder")  # (B, H, S, Dh): projected once by cross_attention.onnx
        y = self.g.op1("MultiHeadAttention", [q, key, value, "", key_padding_mask], f"/{name}/MultiHeadAttention",
                       domain=MS_DOMAIN, num_heads=attn.n_heads, scale=float(attn.scale))
        return self.linear(y, attn.o_proj, f"{name}.o_proj")

    # The graph --------------------------------------------------------------------------
    def build(self) -> onnx.GraphProto:
        g, c, model = self.g, self.c, self.model
        # Lengths: seqlens_k = tokens after this step - 1 (int32), total = the longest row.
        one = g.const("one", 1)
        last_index = g.op1("Sub", [SEQUENCE_LENGTHS, one], "/lengths/Sub")  # (B,)
        seqlens_k = g.op1("Cast", [last_index], "/lengths/seqlens_k", to=TensorProto.INT32)
        longest = g.op1("ReduceMax", [SEQUENCE_LENGTHS], "/lengths/ReduceMax", keepdims=0)  # scalar
        total = g.op1("Cast", [longest], "/lengths/total_sequence_length", to=TensorProto.INT32)
        new = g.op1("Shape", [INPUT_IDS], "/lengths/new_tokens", start=1, end=2)  # (1,) = T
        # The last real token of each row: the prompt's last token on the first step
        # (right padding), the new token afterwards: min(length - 1, T - 1).
        last_pos = g.op1("Min", [last_index, g.op1("Sub", [new, one], "/lengths/last_new")], "/lengths/last")
        last_pos = g.op1("Unsqueeze", [last_pos, g.const("axis_last", [-1])], "/lengths/last_index")  # (B, 1)

        x = g.op1("Gather", [g.weight("tok_emb.weight", model.tok_emb.weight), INPUT_IDS], "/embed/tok_emb")
        table = model.pos_emb.weight if model.pos_emb is not None else model.sinusoid
        if table is not None:  # absolute positions: past tokens of the row + 0..T-1
            zero = g.const("zero", 0)
            past = g.op1("Max", [g.op1("Sub", [SEQUENCE_LENGTHS, new], "/positions/Sub"), zero], "/positions/past")  # (B,)
            steps = g.op1("Range", [zero, g.op1("Squeeze", [new], "/positions/T"), one], "/positions/Range")  # (T,)
            positions = g.op1("Add", [g.op1("Unsqueeze", [past, g.const("axis_1", [1])], "/positions/past_col"), steps],
                              "/positions/Add")  # (B, T)
            x = g.op1("Add", [x, g.op1("Gather", [g.weight("pos_emb.weight", table), positions], "/embed/pos_emb")],
                      "/embed/Add")
        rotary = None
        if model.rope is not None:
            cos, sin = model.rope(torch.arange(c.max_seq_len)[None])  # (1, L, 1, Dh): exactly PyTorch's values
            half = c.d_head // 2
            rotary = (g.weight("cos_cache", cos[0, :, 0, :half]), g.weight("sin_cache", sin[0, :, 0, :half]))
        key_padding_mask = ""
        if c.arch == "encoder-decoder":
            key_padding_mask = g.op1("Cast", [ENCODER_ATTENTION_MASK], "/cross/key_padding_mask", to=TensorProto.INT32)

        # Each sublayer with the norm that belongs to it: applied to its input (pre-norm:
        # x + f(norm(x))) or to the residual sum after it (post-norm: norm(x + f(x))).
        sublayers: list[tuple[torch.nn.Module, str, Any]] = []
        for i, layer in enumerate(model.decoder_layers):
            sublayers.append((layer.attn_norm, f"layers.{i}.attn_norm", functools.partial(
                self.self_attention, attn=layer.attn, i=i, lengths=(seqlens_k, total), rotary=rotary)))
            if layer.cross_attn is not None:
                sublayers.append((layer.cross_norm, f"layers.{i}.cross_norm", functools.partial(
                    self.cross_attention, attn=layer.cross_attn, i=i, key_padding_mask=key_padding_mask)))
            sublayers.append((layer.ffn_norm, f"layers.{i}.ffn_norm", functools.partial(
                self.feed_forward, ffn=layer.ffn, name=f"layers.{i}.ffn")))
        if model.emb_norm is not None:
            x = self.norm(x, model.emb_norm, "emb_norm")
        if self.pre:  # the residual stream and the next sublayer's normed input: one fused node per sublayer
            residual, h = x, self.norm(x, sublayers[0][0], sublayers[0][1])
            for k, (_, _, sublayer) in enumerate(sublayers):
                y = sublayer(h)
                if k + 1 < len(sublayers):
                    h, residual = self.skip_norm(residual, y, sublayers[k + 1][0], sublayers[k + 1][1])
                elif model.decoder_norm is not None:  # the last residual add and the final norm: one node
                    final, _ = self.skip_norm(residual, y, model.decoder_norm, "decoder_norm")  # (B, T, D)
                else:
                    final = g.op1("Add", [residual, y], "/residual/last")
        else:
            final = x
            for norm, name, sublayer in sublayers:
                final, _ = self.skip_norm(final, sublayer(final), norm, name)
            if model.decoder_norm is not None:
                final = self.norm(final, model.decoder_norm, "decoder_norm")
        final = g.op1("GatherND", [final, last_pos], "/last_token/GatherND", batch_dims=1)  # (B, D)
        # The projection writes the graph output itself (an Identity would copy B x V per step).
        if c.tie_embeddings:  # logits = h E^T over the one stored embedding matrix
            g.nodes.append(helper.make_node("Gemm", [final, "tok_emb.weight"], [LOGITS], name="/lm_head/Gemm", transB=1))
        else:
            head = g.weight("lm_head.weight", _t(model.lm_head))
            g.nodes.append(helper.make_node("MatMul", [final, head], [LOGITS], name="/lm_head/MatMul"))
        self.next_token(LOGITS)
        return self._graph()

    def next_token(self, logits: str) -> None:
        """The greedy choice in the graph: next_token = argmax (the first index among ties, as
        numpy's argmax) and next_token_logprob = -log(sum(exp(logits - max))), the chosen
        token's log-softmax value. A greedy loop then reads 2 numbers per row instead of V
        logits. fp16 exports keep these nodes in float32 (NEXT_TOKEN_NODES)."""
        g = self.g
        last = g.const("next_token/axis", [-1])
        index = g.op1("ArgMax", [logits], f"{NEXT_TOKEN_NODES}/ArgMax", axis=-1, keepdims=1)  # (B, 1)
        top = g.op1("GatherElements", [logits, index], f"{NEXT_TOKEN_NODES}/top", axis=-1)  # (B, 1) the maxima
        shifted = g.op1("Sub", [logits, top], f"{NEXT_TOKEN_NODES}/Sub")
        total = g.op1("ReduceSum", [g.op1("Exp", [shifted], f"{NEXT_TOKEN_NODES}/Exp"), last],
                      f"{NEXT_TOKEN_NODES}/ReduceSum", keepdims=0)  # (B,)
        g.nodes.append(helper.make_node("Neg", [g.op1("Log", [total], f"{NEXT_TOKEN_NODES}/Log")],
                                        [NEXT_TOKEN_LOGPROB], name=f"{NEXT_TOKEN_NODES}/logprob"))
        g.nodes.append(helper.make_node("Squeeze", [index, last], [NEXT_TOKEN], name=f"{NEXT_TOKEN_NODES}/token"))

    def _graph(self) -> onnx.GraphProto:
        elem = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}

        def value_info(t):
            return helper.make_tensor_value_info(t.name, elem[t.dtype], list(t.shape))

        # The initializers are moved into the model by build_decoder, not passed here: make_graph
        # and make_model each copy the protos they are given (2 extra copies of every weight).
        return helper.make_graph(
            self.g.nodes, "onnxformer_decoder_shared_cache",
            [value_info(t) for t in self.spec.inputs], [value_info(t) for t in self.spec.outputs],
        )


def build_decoder(model: Transformer, spec: GraphSpec, dims: Dims, *, opset: int,
                  store: WeightStore | None = None) -> onnx.ModelProto:
    """The decoder step graph of `spec` (layout "shared") for `model`, in float32. With `store`
    (the package's weights file, export/weights.py) every weight is written there as it is
    converted and the graph holds only its location: the weights are then never in memory twice."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ExportError(f"the built decoder graph cannot express this model: {reason}", code="E_UNSUPPORTED")
    with torch.no_grad():
        builder = _Builder(model.float().eval(), spec, dims, store)
        graph = builder.build()
    proto = helper.make_model(
        graph, producer_name="onnxformer",
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
    )
    proto.ir_version = 8
    # One weight at a time: each is copied into the model and its own proto released at once, so
    # the weights are held once, plus one tensor (they were held 3 times at the peak).
    weights = builder.g.initializers
    for k in range(len(weights)):
        proto.graph.initializer.append(weights[k])
        weights[k] = None
    return proto
