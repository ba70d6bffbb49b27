"""The transformer family in one file: encoder, decoder, encoder-decoder and prefix-LM.

Architectures differ only by wiring and masks. One attention implementation serves
self-attention (causal, bidirectional or prefix-LM), cross-attention and the KV cache; the
cache is functional (attention takes `past` and returns `present`), so the same code trains,
decodes step by step and is traced for export.

Shape letters used in comments throughout:
    B   batch
    T   new tokens in this call (the query length)
    P   tokens already in the cache (past); L = P + T keys in self-attention
    S   encoder sequence length
    H   query heads, Hkv key/value heads (H % Hkv == 0), Dh head size
    D   model width (d_model), F feed-forward width, V vocabulary size
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class KV(NamedTuple):
    """One layer's keys and values, each (B, Hkv, L, Dh)."""

    key: Tensor
    value: Tensor


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    hidden: Tensor  # (B, T, D), after the final norm
    present: tuple[KV, ...]  # one per decoder layer, (B, Hkv, P+T, Dh)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32; no cast when x already is fp32 (a traced graph then holds the
        # plain RMSNorm pattern, without redundant same-type casts).
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h if x.dtype == torch.float32 else h.to(x.dtype)) * self.weight


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def sinusoidal_table(n_positions: int, dim: int, layout: str = "interleaved") -> Tensor:
    """(n_positions, dim) with pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(...);
    layout "halves" orders the same columns [sin | cos] (Marian): pe[p, i] = sin, pe[p, dim/2 + i] = cos."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (N, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)[None, :]  # (1, dim/2)
    angle = position / torch.pow(10000.0, two_i / dim)  # (N, dim/2)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    if layout == "halves":
        table = torch.cat([table[:, 0::2], table[:, 1::2]], dim=1)
    return table.float()


def rope_frequencies(d_head: int, theta: float, scaling: dict | None = None) -> Tensor:
    """(Dh/2,) float32 inverse frequencies theta^(-2j/Dh), with `rope_scaling` applied:
    "linear" divides them by `factor` (positions interpolated); "llama3" divides only the
    low frequencies (wavelength above original_max_position_embeddings / low_freq_factor) by
    `factor`, keeps the high ones (wavelength below .../high_freq_factor) and blends between.
    Computed in float32 as Hugging Face does, so imported models rotate by the same angles."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head)
    kind = (scaling or {}).get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention, as in LLaMA): position p rotates channel pair
    (j, j + Dh/2) by angle p * inv_freq[j] (`rope_frequencies`)."""

    def __init__(self, d_head: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(d_head, theta, scaling), persistent=False)  # (Dh/2,)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        angle = position_ids[..., None].float() * self.inv_freq  # (B, T, Dh/2)
        angle = torch.cat([angle, angle], dim=-1)  # (B, T, Dh)
        return angle.cos()[:, :, None], angle.sin()[:, :, None]  # each (B, T, 1, Dh)


def relative_position_bucket(relative: Tensor, *, bidirectional: bool, buckets: int, max_distance: int) -> Tensor:
    """T5's buckets for key - query offsets: exact below buckets/2 (per direction), then
    logarithmic up to max_distance; a bidirectional stack gives each sign half the buckets."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    exact = buckets // 2
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias per head and relative-position bucket, added to the attention scores
    of every layer of one stack (computed once, by the stack's first layer in T5)."""

    def __init__(self, config: ModelConfig, *, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.buckets = bidirectional, config.relative_buckets
        self.max_distance = config.relative_max_distance
        self.bias = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """query (B, T), key (B, L) or (L,) positions -> (B, H, T, L) additive bias."""
        if key_positions.dim() == 1:
            key_positions = key_positions[None]
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # (B, T, L)
        bucket = relative_position_bucket(relative, bidirectional=self.bidirectional, buckets=self.buckets,
                                          max_distance=self.max_distance)
        return self.bias(bucket).permute(0, 3, 1, 2)  # (B, H, T, L)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, Dh) rotated by cos/sin (B, T, 1, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Masks: every pattern is an additive bias (B, 1, T, L); 0 where allowed, dtype-min elsewhere.
# --------------------------------------------------------------------------------------------


def self_attention_bias(
    attention_mask: Tensor | None,
    *,
    batch: int,
    new: int,
    total: int,
    causal: bool,
    prefix_mask: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Which of the L = P + T keys each of the T new queries may see.

    attention_mask: (B, L), 1 for real tokens, 0 for padding.
    causal:       key j visible to query i only if j <= i (indices in the full sequence).
    prefix_mask:  (B, T) bool over the new tokens; prefix tokens also see each other
                  bidirectionally (prefix-LM). Continuation tokens stay causal.
    Every query always sees itself, so a padding query never has an empty row (no NaN).
    """
    q_idx = torch.arange(new, device=device) + (total - new)  # (T,) position among the keys
    k_idx = torch.arange(total, device=device)  # (L,)
    if causal:
        allowed = k_idx[None, :] <= q_idx[:, None]  # (T, L)
    else:
        allowed = torch.ones(new, total, dtype=torch.bool, device=device)
    allowed = allowed[None].expand(batch, new, total)  # (B, T, L)
    if prefix_mask is not None:
        prefix = prefix_mask.bool()  # (B, T)
        past = torch.zeros(batch, total - new, dtype=torch.bool, device=device)
        key_prefix = torch.cat([past, prefix], dim=1)  # (B, L)
        allowed = allowed | (prefix[:, :, None] & key_prefix[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]  # the diagonal
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[:, None]  # (B, 1, T, L)


def padding_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S) 1/0 mask -> additive (B, 1, 1, S) bias for cross-attention."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(~attention_mask.bool(), torch.finfo(dtype).min)
    return bias[:, None, None, :]


def default_position_ids(attention_mask: Tensor | None, batch: int, past: int, new: int, device) -> Tensor:
    """Positions of the new tokens: count of real tokens before each one (left padding aware)."""
    if attention_mask is None:
        return torch.arange(past, past + new, device=device)[None].expand(batch, new)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, L)
    return positions.clamp(min=0)[:, -new:]


# --------------------------------------------------------------------------------------------
# Attention and feed-forward
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V, scaled by config.scale (1/sqrt(Dh) unless set).

    Self-attention projects K/V from `x` and appends them to `past`; cross-attention is given
    precomputed `kv` (from `project_kv` on the encoder output) and never recomputes it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = config.n_heads, config.n_kv_heads, config.d_head
        self.scale = config.scale
        self.dropout = config.dropout
        d, bias, qkv_bias = config.d_model, config.bias, config.has_qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, d, bias=bias)

    def _split(self, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.d_head)  # (B, T, n, Dh)

    def project_kv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> KV:
        k = self._split(self.k_proj(x), self.n_kv_heads)  # (B, T, Hkv, Dh)
        v = self._split(self.v_proj(x), self.n_kv_heads)
        if rope is not None:
            k = apply_rope(k, *rope)
        return KV(k.transpose(1, 2), v.transpose(1, 2))  # (B, Hkv, T, Dh)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        past: KV | None = None,
        kv: KV | None = None,
    ) -> tuple[Tensor, KV]:
        b, t, _ = x.shape
        q = self._split(self.q_proj(x), self.n_heads)  # (B, T, H, Dh)
        if rope is not None:
            q = apply_rope(q, *rope)
        if kv is None:
            kv = self.project_kv(x, rope)
            if past is not None:
                kv = KV(torch.cat([past.key, kv.key], dim=2), torch.cat([past.value, kv.value], dim=2))
        k, v = kv  # (B, Hkv, L, Dh)
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)  # (B, H, L, Dh)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, Dh), softmax(scale q k^T + bias) v
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)  # (B, T, H*Dh)
        return self.o_proj(y), kv


def activation_function(name: str):
    """The elementwise function of an ACTIVATIONS name (a gated one: its gate's)."""
    return {
        "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
        "swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh"),
        "tanh": torch.tanh,
    }[name]


class FeedForward(nn.Module):
    """W2 act(W1 x), or gated: W2 (act(W_gate x) * W1 x) (config.activation)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated, self.act = config.gated, activation_function(config.activation)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each wrapped in add & norm."""

    def __init__(self, config: ModelConfig, *, cross: bool):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.drop = nn.Dropout(config.dropout)
        self.attn_norm, self.attn = make_norm(config), Attention(config)
        self.cross_norm = make_norm(config) if cross else None
        self.cross_attn = Attention(config) if cross else None
        self.ffn_norm, self.ffn = make_norm(config), FeedForward(config)

    def _add_norm(self, x: Tensor, norm: nn.Module, sublayer) -> tuple[Tensor, object]:
        if self.pre_norm:  # x + f(norm(x))
            y, extra = sublayer(norm(x))
            return x + self.drop(y), extra
        y, extra = sublayer(x)  # norm(x + f(x))
        return norm(x + self.drop(y)), extra

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        past: KV | None = None,
        cross_kv: KV | None = None,
        cross_bias: Tensor | None = None,
    ) -> tuple[Tensor, KV]:
        x, present = self._add_norm(x, self.attn_norm, lambda h: self.attn(h, bias, rope=rope, past=past))
        if self.cross_attn is not None:
            if cross_kv is None or cross_bias is None:
                raise ValueError("a cross-attention layer needs cross_kv and an encoder attention mask")
            x, _ = self._add_norm(
                x, self.cross_norm, lambda h: self.cross_attn(h, cross_bias, kv=cross_kv)
            )
        x, _ = self._add_norm(x, self.ffn_norm, lambda h: (self.ffn(h), None))
        return x, present


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Every architecture of the family, wired from one ModelConfig.

    encoder          encode() -> hidden; pool(), mlm_logits(), nsp_logits(), classify()
    decoder          decode() with a causal mask
    prefix-lm        decode() with `prefix_mask` marking the bidirectional prompt
    encoder-decoder  encode() the source, cross_kv() once, then decode() with cross-attention
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        d_embed = c.d_embed or c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, d_embed)
        learned = c.pos_encoding == "learned"
        self.pos_emb = nn.Embedding(c.max_seq_len + c.pos_offset, d_embed) if learned else None
        if c.pos_encoding == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(c.max_seq_len, c.d_model, c.sinusoid_layout),
                                 persistent=False)
        else:
            self.sinusoid = None
        self.rope = RotaryEmbedding(c.d_head, c.rope_theta, c.rope_scaling) if c.pos_encoding == "rope" else None
        relative = c.pos_encoding == "relative"
        self.encoder_rel_bias = RelativePositionBias(c, bidirectional=True) if relative and c.has_encoder else None
        self.decoder_rel_bias = RelativePositionBias(c, bidirectional=False) if relative and c.has_decoder else None
        self.type_emb = nn.Embedding(c.type_vocab_size, d_embed) if c.type_vocab_size else None
        post = c.norm_position == "post"
        # BERT-style: a norm after the embedding sum (at the embedding width)
        self.emb_norm = make_norm(c, d_embed) if c.has_embedding_norm else None
        # BART: the decoder stack's own position table and embedding norm ("pos_emb", "emb_norm")
        self.decoder_embedding = nn.ModuleDict() if c.separate_decoder_positions else None
        if self.decoder_embedding is not None:
            self.decoder_embedding["pos_emb"] = nn.Embedding(c.max_seq_len + c.pos_offset, d_embed)
            if self.emb_norm is not None:
                self.decoder_embedding["emb_norm"] = make_norm(c, d_embed)
        self.embed_proj = nn.Linear(d_embed, c.d_model) if c.d_embed else None  # ELECTRA: embedding -> model width
        self.emb_drop = nn.Dropout(c.dropout)

        self.encoder_layers = nn.ModuleList(Block(c, cross=False) for _ in range(c.n_encoder_layers))
        self.encoder_norm = make_norm(c) if c.has_encoder and not post else None
        cross = c.arch == "encoder-decoder"
        self.decoder_layers = nn.ModuleList(Block(c, cross=cross) for _ in range(c.n_step_layers))
        self.decoder_norm = make_norm(c) if c.has_decoder and not post else None

        # One output projection over the vocabulary, optionally tied to the input embedding.
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.logits_bias)
        if c.tie_embeddings:  # (ModelConfig refuses it with a d_embed other than d_model)
            self.lm_head.weight = self.tok_emb.weight
        if c.arch == "encoder":
            mlm_act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
                       "silu": nn.SiLU()}[c.mlm_activation]
            self.mlm_transform = nn.Sequential(nn.Linear(c.d_model, c.d_model), mlm_act, make_norm(c))
            self.pooler = nn.Linear(c.d_model, c.d_model)
            self.pooler_act = activation_function(c.pooler_activation)
            self.nsp_head = nn.Linear(c.d_model, 2)
            self.classifier = nn.Linear(c.d_model, c.num_labels) if c.num_labels else None
        self.apply(self._init_weights)
        if c.arch == "encoder":
            # The heads on the pooled state start at std 1/sqrt(D): with 0.02 the tanh pooler
            # passes almost no signal and classification sits at chance for hundreds of steps.
            for head in (self.pooler, self.nsp_head, self.classifier):
                if head is not None:
                    nn.init.normal_(head.weight, mean=0.0, std=c.d_model ** -0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Embedding ------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None = None, *,
              decoder: bool = False) -> Tensor:
        """Token (+ position, + segment) embeddings of one stack; `decoder` picks the decoder
        stack's own position table and norm where it has them (separate_decoder_positions)."""
        pos_emb, emb_norm = self.pos_emb, self.emb_norm
        if decoder and self.decoder_embedding is not None:
            pos_emb = self.decoder_embedding["pos_emb"]
            emb_norm = self.decoder_embedding["emb_norm"] if "emb_norm" in self.decoder_embedding else None
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if pos_emb is not None:
            x = x + pos_emb(position_ids + self.config.pos_offset if self.config.pos_offset else position_ids)
        elif self.sinusoid is not None:
            x = x + F.embedding(position_ids, self.sinusoid)
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_emb(token_type_ids)
        if emb_norm is not None:
            x = emb_norm(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.emb_drop(x)

    # Encoder --------------------------------------------------------------------------------
    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Bidirectional encoder over (B, S) tokens -> final hidden states (B, S, D)."""
        if not self.config.has_encoder:
            raise ValueError(f"arch {self.config.arch!r} has no encoder")
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, 0, s, input_ids.device)
        x = self.embed(input_ids, position_ids, token_type_ids)
        rope = self.rope(position_ids) if self.rope is not None else None
        bias = self_attention_bias(
            attention_mask, batch=b, new=s, total=s, causal=False, prefix_mask=None,
            dtype=x.dtype, device=x.device,
        )
        if self.encoder_rel_bias is not None:
            bias = bias + self.encoder_rel_bias(position_ids, position_ids).to(bias.dtype)  # (B, H, S, S)
        for layer in self.encoder_layers:
            x, _ = layer(x, bias, rope=rope)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT pooling: act(W h_[CLS]) over the first token (act: config.pooler_activation,
        tanh for BERT), (B, S, D) -> (B, D)."""
        return self.pooler_act(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return self.logits(self.mlm_transform(hidden))  # (B, S, V)

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        return self.nsp_head(self.pool(hidden))  # (B, 2): 0 = is next, 1 = random

    def classify(self, hidden: Tensor) -> Tensor:
        if self.config.arch != "encoder" or self.classifier is None:
            raise ValueError("this model has no classification head (set num_labels > 0 on an encoder)")
        return self.classifier(self.emb_drop(self.pool(hidden)))  # (B, num_labels)

    # Decoder --------------------------------------------------------------------------------
    def cross_kv(self, encoder_hidden_states: Tensor) -> tuple[KV, ...]:
        """Cross-attention K/V of every decoder layer, computed once per encoded input."""
        if self.config.arch != "encoder-decoder":
            raise ValueError(f"arch {self.config.arch!r} has no cross-attention")
        return tuple(layer.cross_attn.project_kv(encoder_hidden_states) for layer in self.decoder_layers)

    def decode(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past: tuple[KV, ...] | None = None,
        prefix_mask: Tensor | None = None,
        cross_kv: tuple[KV, ...] | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """One call of the decoder stack over T new tokens, after P cached ones.

        attention_mask: (B, P+T), 1 = real token; position_ids: (B, T); past: per layer (B, Hkv, P, Dh).
        prefix-lm: `prefix_mask` (B, T) marks the bidirectional prompt tokens; when None, the
        T new tokens form one bidirectional block (prefill of a prompt; T = 1 is plain causal).
        encoder-decoder: `cross_kv` from cross_kv() and `encoder_attention_mask` (B, S).
        """
        c = self.config
        if not c.has_decoder:
            raise ValueError(f"arch {c.arch!r} has no decoder")
        b, t = input_ids.shape
        p = 0 if past is None else past[0].key.shape[2]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, p, t, input_ids.device)
        x = self.embed(input_ids, position_ids, decoder=True)
        rope = self.rope(position_ids) if self.rope is not None else None
        if c.arch == "prefix-lm" and prefix_mask is None:
            prefix_mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        bias = self_attention_bias(
            attention_mask, batch=b, new=t, total=p + t, causal=True,
            prefix_mask=prefix_mask if c.arch == "prefix-lm" else None,
            dtype=x.dtype, device=x.device,
        )
        if self.decoder_rel_bias is not None:  # keys at positions 0..P+T-1 of the cache
            bias = bias + self.decoder_rel_bias(position_ids, torch.arange(p + t, device=x.device)).to(bias.dtype)
        cross_bias = None
        if c.arch == "encoder-decoder":
            if cross_kv is None:
                raise ValueError("encoder-decoder decode() needs cross_kv (from model.cross_kv)")
            if encoder_attention_mask is None:
                s = cross_kv[0].key.shape[2]
                encoder_attention_mask = torch.ones(b, s, dtype=torch.long, device=x.device)
            cross_bias = padding_bias(encoder_attention_mask, x.dtype)
        presents = []
        for i, layer in enumerate(self.decoder_layers):
            x, present = layer(
                x, bias, rope=rope,
                past=None if past is None else past[i],
                cross_kv=None if cross_kv is None else cross_kv[i],
                cross_bias=cross_bias,
            )
            presents.append(present)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return DecoderOutput(self.logits(x), x, tuple(presents))

    def logits(self, hidden: Tensor) -> Tensor:
        """The output projection over the vocabulary (config.logit_scale applied first)."""
        scale = self.config.logit_scale
        return self.lm_head(hidden * scale if scale != 1.0 else hidden)


def empty_past(config: ModelConfig, batch: int, *, dtype=torch.float32, device=None) -> tuple[KV, ...]:
    """A cache with P = 0 for every decoder layer: (B, Hkv, 0, Dh) each."""
    shape = (batch, config.n_kv_heads, 0, config.d_head)
    return tuple(
        KV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.n_step_layers)
    )


def reorder_past(past: tuple[KV, ...], index: Tensor) -> tuple[KV, ...]:
    """Select batch rows of every cache entry (beam search)."""
    return tuple(KV(kv.key.index_select(0, index), kv.value.index_select(0, index)) for kv in past)
