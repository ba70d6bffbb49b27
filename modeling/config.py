"""Model configuration: plain, frozen, JSON round-trippable data. No torch here.

One vocabulary across architectures (d_model, n_heads, n_kv_heads, n_layers, max_seq_len).
Choices are strings; derived values are properties. Every constraint is checked at
construction and the error (a ConfigError) names the offending values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxformer.runtime.contract import ARCHITECTURES  # the one list, shared with the package format
from onnxformer.runtime.errors import ConfigError
from onnxformer.runtime.prompt_format import PromptFormat

# "relative": T5's bucketed relative-position bias, computed by each stack's first layer and
# added to every layer's self-attention scores.
POS_ENCODINGS = ("sinusoidal", "learned", "rope", "relative")
# The feed-forward block: "gelu" (exact, erf), "gelu_tanh" (the tanh approximation: GPT-2's
# gelu_new), "relu", "silu": W2 act(W1 x). Gated: "swiglu" W2 (silu(W_gate x) * W1 x),
# "geglu" W2 (gelu_tanh(W_gate x) * W1 x) (T5 v1.1 / Flan-T5's gated-gelu).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
POOLER_ACTIVATIONS = ("tanh", "relu", "gelu")
MLM_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
# rope_scaling types and the keys each takes (Hugging Face's names).
ROPE_SCALING = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}
# The columns of a sinusoidal table: "interleaved" pe[p, 2i] = sin, pe[p, 2i+1] = cos (ours),
# "halves" [sin | cos]: the D/2 sines first, then the D/2 cosines (Marian).
SINUSOID_LAYOUTS = ("interleaved", "halves")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model; the checkpoint and the package carry it as JSON."""

    arch: str = "decoder"  # one of ARCHITECTURES
    vocab_size: int = 1024
    d_model: int = 128  # width of the residual stream (D)
    n_heads: int = 4  # query heads (H)
    n_kv_heads: int | None = None  # key/value heads (Hkv); None = n_heads (plain MHA), 1 = MQA
    n_layers: int = 2  # encoder layers (encoder, encoder-decoder) or decoder layers (decoder, prefix-lm)
    n_decoder_layers: int | None = None  # encoder-decoder only; None = n_layers
    d_ff: int = 512  # hidden width of the feed-forward block
    max_seq_len: int = 256  # longest sequence (prompt + continuation) the model accepts
    pos_encoding: str = "rope"  # one of POS_ENCODINGS
    rope_theta: float = 10000.0
    # RoPE frequency scaling, JSON {"rope_type": "linear" | "llama3", ...keys of ROPE_SCALING}; None = none.
    rope_scaling: dict[str, Any] | None = None
    d_embed: int | None = None  # encoder: embedding width, projected to d_model (ELECTRA); None = d_model
    head_dim: int | None = None  # head size (Dh); None = d_model // n_heads (T5, Qwen3 set it apart)
    pos_offset: int = 0  # learned positions: the table row of position 0 (RoBERTa, BART: 2)
    sinusoid_layout: str = "interleaved"  # pos_encoding "sinusoidal": one of SINUSOID_LAYOUTS
    # encoder-decoder: the decoder stack has its own learned position table and embedding norm
    # (BART); False = the two stacks share one of each.
    separate_decoder_positions: bool = False
    relative_buckets: int = 32  # pos_encoding "relative": T5's relative_attention_num_buckets
    relative_max_distance: int = 128  # and relative_attention_max_distance
    activation: str = "gelu"  # one of ACTIVATIONS
    norm: str = "layernorm"  # one of NORMS
    norm_position: str = "pre"  # "pre": x + f(norm(x)); "post": norm(x + f(x)) (original Transformer/BERT)
    norm_eps: float = 1e-5
    bias: bool = True  # biases in linear layers (BitFit needs them)
    qkv_bias: bool | None = None  # biases on the q/k/v projections only; None = bias (Qwen2: True with bias False)
    attn_scale: float | None = None  # attention logits scale; None = 1/sqrt(Dh) (T5: 1.0)
    embed_scale: float = 1.0  # token embeddings multiplied by this (BART/Marian scale_embedding: sqrt(D))
    embedding_norm: bool | None = None  # a norm after the embedding sum; None = norm_position == "post"
    logits_bias: bool = False  # a (V,) bias on the output projection (BERT's MLM decoder, BART's final_logits_bias)
    logit_scale: float = 1.0  # hidden states scaled by this before the output projection (tied T5: D**-0.5)
    pooler_activation: str = "tanh"  # encoder pooler act(W h_[CLS]): BERT tanh, DistilBERT relu, ELECTRA gelu
    mlm_activation: str = "gelu"  # encoder MLM transform norm(act(W h)): one of MLM_ACTIVATIONS (BERT: hidden_act)
    dropout: float = 0.0
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    type_vocab_size: int = 0  # segment (token-type) embeddings; 2 for BERT-style NSP, 0 = none
    num_labels: int = 0  # > 0 adds a sequence-classification head on the pooled [CLS] state
    # Special token ids the model itself depends on (generation, masking); -1 = not used.
    pad_token_id: int = 0
    bos_token_id: int = -1
    eos_token_id: int = -1
    decoder_start_token_id: int = -1  # encoder-decoder: first decoder input; -1 = bos
    # Free-form, JSON-serialisable extras (e.g. label names). Not used by the modules.
    label_names: tuple[str, ...] = field(default_factory=tuple)
    # The prompt format training used (sft, prefix-lm on seq2seq data); export carries it into
    # the package and the runtimes apply it. None: prompts are raw text. JSON: {template, strip}.
    prompt_format: PromptFormat | None = None

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHITECTURES)
        _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("pooler_activation", self.pooler_activation, POOLER_ACTIVATIONS)
        _choice("mlm_activation", self.mlm_activation, MLM_ACTIVATIONS)
        _choice("norm", self.norm, NORMS)
        _choice("sinusoid_layout", self.sinusoid_layout, SINUSOID_LAYOUTS)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _positive("n_kv_heads", self.n_kv_heads)
        if self.n_decoder_layers is None:
            object.__setattr__(self, "n_decoder_layers", self.n_layers)
        _positive("n_decoder_layers", self.n_decoder_layers)
        if self.d_embed is not None:
            _positive("d_embed", self.d_embed)
            if self.arch != "encoder":
                raise ConfigError(f"d_embed applies to arch 'encoder' only; got arch {self.arch!r}")
            if self.tie_embeddings and self.d_embed != self.d_model:
                raise ConfigError(f"tie_embeddings needs d_embed == d_model; got d_embed {self.d_embed} and d_model "
                                  f"{self.d_model}: set tie_embeddings False")
        if self.head_dim is not None:
            _positive("head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.pos_encoding == "rope" and self.d_head % 2:
            raise ConfigError(f"rope needs an even head size; d_model/n_heads = {self.d_head}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal encodings need an even d_model; got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0; got {self.norm_eps!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0; got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
        if self.pos_offset < 0 or (self.pos_offset and self.pos_encoding != "learned"):
            raise ConfigError(f"pos_offset ({self.pos_offset}) must be >= 0 and applies to learned positions only")
        if self.separate_decoder_positions and (self.arch != "encoder-decoder" or self.pos_encoding != "learned"):
            raise ConfigError(f"separate_decoder_positions applies to arch 'encoder-decoder' with learned positions; "
                              f"got arch {self.arch!r}, pos_encoding {self.pos_encoding!r}")
        if self.pos_encoding == "relative":
            _positive("relative_buckets", self.relative_buckets)
            _positive("relative_max_distance", self.relative_max_distance)
        for name in ("embed_scale", "logit_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ConfigError(f"attn_scale must be > 0 or None; got {self.attn_scale!r}")
        if self.type_vocab_size < 0 or self.num_labels < 0:
            raise ConfigError(
                f"type_vocab_size ({self.type_vocab_size}) and num_labels ({self.num_labels}) must be >= 0"
            )
        if self.arch != "encoder" and (self.type_vocab_size or self.num_labels):
            raise ConfigError(
                f"type_vocab_size ({self.type_vocab_size}) and num_labels ({self.num_labels}) "
                f"apply to arch 'encoder' only; got arch {self.arch!r}"
            )
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if isinstance(self.prompt_format, dict):  # from JSON
            object.__setattr__(self, "prompt_format", PromptFormat.from_dict(self.prompt_format))
        if self.prompt_format is not None and not isinstance(self.prompt_format, PromptFormat):
            raise ConfigError(f"prompt_format must be a PromptFormat, its JSON object or None; got {self.prompt_format!r:.60}")
        if self.prompt_format is not None and not self.has_decoder:
            raise ConfigError(f"prompt_format applies to generating models; arch {self.arch!r} has no decoder")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ConfigError(
                f"label_names has {len(self.label_names)} entries but num_labels is {self.num_labels}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not -1 <= value < self.vocab_size:
                raise ConfigError(f"{name} ({value}) must be -1 or in [0, vocab_size={self.vocab_size})")

    # Derived values -------------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        """Size of one attention head (Dh)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """The feed-forward block has a gate projection (swiglu, geglu)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_embedding_norm(self) -> bool:
        return self.norm_position == "post" if self.embedding_norm is None else self.embedding_norm

    @property
    def scale(self) -> float:
        """The attention logits scale."""
        return self.attn_scale if self.attn_scale is not None else self.d_head ** -0.5

    @property
    def has_encoder(self) -> bool:
        return self.arch in ("encoder", "encoder-decoder")

    @property
    def has_decoder(self) -> bool:
        return self.arch != "encoder"

    @property
    def n_encoder_layers(self) -> int:
        return self.n_layers if self.has_encoder else 0

    @property
    def n_step_layers(self) -> int:
        """Layers of the decoder stack (the one with a KV cache); 0 for encoder-only."""
        if self.arch == "encoder-decoder":
            return int(self.n_decoder_layers)
        return self.n_layers if self.has_decoder else 0

    @property
    def start_token_id(self) -> int:
        """First decoder input of an encoder-decoder model."""
        return self.decoder_start_token_id if self.decoder_start_token_id >= 0 else self.bos_token_id

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["label_names"] = list(self.label_names)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields: {', '.join(unknown)}; valid: {', '.join(sorted(known))}",
                              code="E_UNKNOWN_PARAMETER")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_rope_scaling(value: Any) -> dict[str, Any]:
    """A copy of `rope_scaling` with its type under "rope_type" (Hugging Face also spells it "type")."""
    if not isinstance(value, dict):
        raise ConfigError(f"rope_scaling must be a JSON object or None; got {value!r:.60}")
    data = dict(value)
    kind = data.pop("rope_type", None) or data.pop("type", None)
    data.pop("type", None)
    if kind not in ROPE_SCALING:
        raise ConfigError(f"rope_scaling type {kind!r} is not implemented; implemented: "
                          f"{', '.join(map(repr, ROPE_SCALING))}")
    keys = ROPE_SCALING[kind]
    if set(data) != keys:
        raise ConfigError(f"rope_scaling {kind!r} takes {', '.join(sorted(keys))}; got {', '.join(sorted(data)) or 'none'}")
    for key, number in data.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            raise ConfigError(f"rope_scaling {key} must be a positive number; got {number!r}")
    return {"rope_type": kind, **data}


# Size presets shared by training, tests and benchmarks: (name -> overrides).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, d_ff=256, max_seq_len=128),
    "small": dict(d_model=256, n_heads=8, n_layers=4, d_ff=1024, max_seq_len=256),
    "base": dict(d_model=512, n_heads=8, n_layers=8, d_ff=2048, max_seq_len=512),
}
