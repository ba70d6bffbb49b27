"""Hugging Face encoder-decoder families (T5 / Flan-T5, BART, Marian) as our ModelConfig.
Registered into hf_import.FAMILIES.

T5: relative position bias (one table per stack, stored in its first layer, added in every
layer), no 1/sqrt(Dh) scaling, RMS norm without bias, pre-norm, ReLU (v1.0) or gated GELU
(v1.1 / Flan), d_kv as the head size, the tied head's d_model**-0.5 scale, decoder start = pad.
BART: learned positions offset by 2, separate encoder/decoder position tables and embedding
norms, post-norm, final_logits_bias. Marian: BART's layout with fixed sinusoidal positions in
[sin | cos] halves and no embedding norm.

Checkpoints may store the shared token embedding several times (`shared.weight`,
`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, a tied `lm_head.weight`): every
stored copy is read and must hold the same values, or the import is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onnxformer.runtime.errors import CheckpointError

from .config import ModelConfig
from .hf_import import Family, HFConfig, Source, register, take, unsupported

# Hugging Face activation names (ACT2FN keys) -> ours, for an ungated feed-forward block.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu"}
# Gated (T5 v1.1 "gated-*"): the gate's function -> ours.
GATED_ACTIVATIONS = {"gelu_new": "geglu", "gelu_pytorch_tanh": "geglu", "silu": "swiglu", "swish": "swiglu"}


def shared_embedding(names: set[str], stored: tuple[str, ...]) -> Source:
    """The token embedding from every stored copy of it (`stored`, the first required),
    refused unless all copies hold the same values."""
    present = (stored[0],) + tuple(n for n in stored[1:] if n in names)

    def same(*tensors: Tensor) -> Tensor:
        for name, tensor in zip(present[1:], tensors[1:]):
            if tensor.shape != tensors[0].shape or not torch.equal(tensor, tensors[0]):
                head = name == "lm_head.weight"
                raise CheckpointError(
                    f"{name} differs from {present[0]}: onnxformer's model has one token embedding for both stacks "
                    f"{'and a tied output head ' if head else ''}and refuses to pick one of two different tensors"
                    + ("; the output head is separate: set tie_word_embeddings to false in config.json" if head else
                       " (separate encoder and decoder embeddings are not implemented)"), code="E_CHECKPOINT")
        return tensors[0]

    return Source(present, same)


def _one_per_stack(hf: HFConfig, encoder_key: str, decoder_key: str, what: str) -> int:
    value = hf.require(encoder_key)
    if hf.get(decoder_key, value) != value:
        raise unsupported(hf, decoder_key, hf.data[decoder_key], f"onnxformer uses one {what} for both stacks; "
                          f"{encoder_key} is {value}")
    return value


def _architecture(hf: HFConfig, architecture: str, allowed: tuple[str, ...]) -> None:
    """The generation model, or the bare model (its head: the tied embedding, as transformers'
    AutoModelForSeq2SeqLM loads it)."""
    if architecture and architecture not in allowed:
        raise unsupported(hf, "architectures", [architecture], f"onnxformer imports {' or '.join(allowed)} (the "
                          "encoder, the decoder and the language-model head)")
    hf.expect("is_encoder_decoder", True)
    hf.get("output_past")  # transformers 3's name for use_cache
    # forced_bos_token_id / forced_eos_token_id (and transformers 3's force_bos_token_to_be_generated)
    # are generation settings: hf_import carries them into the package's generation defaults.
    # (bad_words_ids, e.g. Marian's [[pad]], only matters where the banned token would win.)
    hf.get("force_bos_token_to_be_generated")


def _legacy_keys(hf: HFConfig, neutral: dict[str, tuple]) -> None:
    """Keys older transformers versions wrote for BART-like models, accepted at the values
    that describe the model the current modeling (and ours) computes; others are refused."""
    for key, allowed in neutral.items():
        hf.expect(key, *allowed)
    hf.get("extra_pos_embeddings")  # transformers 3's table-size bookkeeping, unused since
    layers = hf.get("num_hidden_layers")
    if layers is not None and layers != hf.data.get("encoder_layers"):
        raise unsupported(hf, "num_hidden_layers", layers, "it must equal encoder_layers")


# --------------------------------------------------------------------------------------------
# T5 / Flan-T5
# --------------------------------------------------------------------------------------------


def t5_activation(hf: HFConfig) -> str:
    """Our activation from feed_forward_proj ("relu", "gated-gelu", ...), as T5Config derives
    dense_act_fn / is_gated_act from it (which transformers also stores; they must agree)."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise unsupported(hf, "feed_forward_proj", proj, "T5 takes 'ACT' or 'gated-ACT'")
    gated = len(parts) == 2
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # T5Config's special case
    for key, derived in (("dense_act_fn", act), ("is_gated_act", gated)):
        if hf.get(key, derived) != derived:
            raise unsupported(hf, key, hf.data[key], f"it contradicts feed_forward_proj {proj!r}")
    table = GATED_ACTIVATIONS if gated else ACTIVATIONS
    if act not in table:
        raise unsupported(hf, "feed_forward_proj", proj, f"onnxformer implements {', '.join(sorted(table))}"
                          f"{' gated' if gated else ''}")
    return table[act]


def t5_config(hf: HFConfig, architecture: str) -> ModelConfig:
    _architecture(hf, architecture, ("T5ForConditionalGeneration", "T5WithLMHeadModel", "T5Model"))
    d_model, heads, d_kv = hf.require("d_model"), hf.require("num_heads"), hf.require("d_kv")
    # transformers 4 stored tie_word_embeddings false for v1.1 / Flan (an untied head, no
    # output scale); transformers 5 stores scale_decoder_outputs and always says tied.
    tied = hf.get("tie_word_embeddings", True) is not False
    scale_outputs = hf.get("scale_decoder_outputs", tied)
    pad = hf.token_id("pad_token_id")
    start = hf.token_id("decoder_start_token_id")
    return ModelConfig(
        arch="encoder-decoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        n_heads=heads,
        n_layers=hf.require("num_layers"),
        n_decoder_layers=hf.get("num_decoder_layers") or hf.data["num_layers"],
        d_ff=hf.require("d_ff"),
        max_seq_len=int(hf.get("n_positions") or 512),  # relative positions: no table bounds the length
        pos_encoding="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        head_dim=d_kv if d_model % heads or d_kv != d_model // heads else None,
        activation=t5_activation(hf),
        norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre",
        bias=False,
        attn_scale=1.0,  # T5 folds 1/sqrt(Dh) into its initialisation
        logit_scale=d_model ** -0.5 if scale_outputs else 1.0,
        tie_embeddings=tied,
        pad_token_id=pad,
        eos_token_id=hf.token_id("eos_token_id"),
        bos_token_id=hf.token_id("bos_token_id"),  # T5 has none: sources end with eos
        decoder_start_token_id=start if start >= 0 else pad,  # T5 starts decoding from pad
    )


def t5_tensors(config: ModelConfig, hf: HFConfig, names: set[str]) -> dict[str, Source]:
    copies = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    plan = {"tok_emb.weight": shared_embedding(names, copies + (("lm_head.weight",) if config.tie_embeddings else ())),
            "encoder_norm.weight": take("encoder.final_layer_norm.weight"),
            "decoder_norm.weight": take("decoder.final_layer_norm.weight"),
            "encoder_rel_bias.bias.weight": take("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            "decoder_rel_bias.bias.weight": take("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}
    if not config.tie_embeddings:
        plan["lm_head.weight"] = take("lm_head.weight")

    def attention(ours: str, theirs: str) -> None:
        for proj, hf_proj in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            plan[f"{ours}.{proj}.weight"] = take(f"{theirs}.{hf_proj}.weight")

    def feed_forward(ours: str, theirs: str) -> None:
        if config.gated:
            plan[f"{ours}.gate_proj.weight"] = take(f"{theirs}.wi_0.weight")
            plan[f"{ours}.up_proj.weight"] = take(f"{theirs}.wi_1.weight")
        else:
            plan[f"{ours}.up_proj.weight"] = take(f"{theirs}.wi.weight")
        plan[f"{ours}.down_proj.weight"] = take(f"{theirs}.wo.weight")

    for i in range(config.n_encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"encoder.block.{i}.layer"
        plan[f"{ours}.attn_norm.weight"] = take(f"{theirs}.0.layer_norm.weight")
        attention(f"{ours}.attn", f"{theirs}.0.SelfAttention")
        plan[f"{ours}.ffn_norm.weight"] = take(f"{theirs}.1.layer_norm.weight")
        feed_forward(f"{ours}.ffn", f"{theirs}.1.DenseReluDense")
    for i in range(config.n_step_layers):
        ours, theirs = f"decoder_layers.{i}", f"decoder.block.{i}.layer"
        plan[f"{ours}.attn_norm.weight"] = take(f"{theirs}.0.layer_norm.weight")
        attention(f"{ours}.attn", f"{theirs}.0.SelfAttention")
        plan[f"{ours}.cross_norm.weight"] = take(f"{theirs}.1.layer_norm.weight")
        attention(f"{ours}.cross_attn", f"{theirs}.1.EncDecAttention")
        plan[f"{ours}.ffn_norm.weight"] = take(f"{theirs}.2.layer_norm.weight")
        feed_forward(f"{ours}.ffn", f"{theirs}.2.DenseReluDense")
    return plan


def t5_dropped(name: str) -> str | None:
    if name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
        return "a relative bias on the cross-attention that T5 never applies (transformers ignores it too)"
    return None


# --------------------------------------------------------------------------------------------
# BART and Marian
# --------------------------------------------------------------------------------------------


def _bart_like_config(hf: HFConfig, *, learned: bool) -> ModelConfig:
    d_model = hf.require("d_model")
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise unsupported(hf, "activation_function", activation, f"onnxformer implements {', '.join(sorted(ACTIVATIONS))}")
    hf.get("init_std")  # initialisation only
    hf.get("classif_dropout")  # training only (a classification head onnxformer does not import)
    start = hf.token_id("decoder_start_token_id")
    eos = hf.token_id("eos_token_id")
    return ModelConfig(
        arch="encoder-decoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        n_heads=_one_per_stack(hf, "encoder_attention_heads", "decoder_attention_heads", "head count"),
        n_layers=hf.require("encoder_layers"),
        n_decoder_layers=hf.require("decoder_layers"),
        d_ff=_one_per_stack(hf, "encoder_ffn_dim", "decoder_ffn_dim", "feed-forward width"),
        max_seq_len=hf.require("max_position_embeddings"),
        pos_encoding="learned" if learned else "sinusoidal",
        pos_offset=2 if learned else 0,  # BartLearnedPositionalEmbedding's offset
        sinusoid_layout="interleaved" if learned else "halves",
        separate_decoder_positions=learned,
        activation=ACTIVATIONS[activation],
        norm="layernorm",
        norm_eps=1e-5,  # nn.LayerNorm's default: BART and Marian do not set it
        norm_position="post",
        embedding_norm=learned,  # BART's layernorm_embedding; Marian has none
        embed_scale=math.sqrt(d_model) if hf.get("scale_embedding", False) else 1.0,
        logits_bias=True,  # final_logits_bias
        tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        pad_token_id=hf.token_id("pad_token_id"),
        bos_token_id=hf.token_id("bos_token_id"),
        eos_token_id=eos,
        decoder_start_token_id=start if start >= 0 else eos,
    )


def bart_config(hf: HFConfig, architecture: str) -> ModelConfig:
    _architecture(hf, architecture, ("BartForConditionalGeneration", "BartModel"))
    _legacy_keys(hf, {"add_bias_logits": (False,), "add_final_layer_norm": (False,), "normalize_before": (False,),
                      "normalize_embedding": (True,), "static_position_embeddings": (False,)})
    return _bart_like_config(hf, learned=True)


def marian_config(hf: HFConfig, architecture: str) -> ModelConfig:
    _architecture(hf, architecture, ("MarianMTModel", "MarianModel"))
    _legacy_keys(hf, {"add_bias_logits": (False,), "add_final_layer_norm": (False,), "normalize_before": (False,),
                      "normalize_embedding": (False,), "static_position_embeddings": (True,)})
    hf.expect("share_encoder_decoder_embeddings", True)
    vocab = hf.require("vocab_size")
    if hf.get("decoder_vocab_size", vocab) not in (vocab, None):
        raise unsupported(hf, "decoder_vocab_size", hf.data["decoder_vocab_size"],
                          f"onnxformer shares one vocabulary between the stacks (vocab_size {vocab})")
    return _bart_like_config(hf, learned=False)


def bart_like_tensors(config: ModelConfig, hf: HFConfig, names: set[str]) -> dict[str, Source]:
    base = "model." if "model.shared.weight" in names else ""  # a bare BartModel / MarianModel: no prefix
    copies = (f"{base}shared.weight", f"{base}encoder.embed_tokens.weight", f"{base}decoder.embed_tokens.weight")
    plan = {"tok_emb.weight": shared_embedding(names, copies + (("lm_head.weight",) if config.tie_embeddings else ()))}
    if "final_logits_bias" in names:
        plan["lm_head.bias"] = Source(("final_logits_bias",), lambda t: t.reshape(-1))  # (1, V) -> (V,)
    else:  # a bare model has none: zero, the buffer transformers' generation model starts with
        plan["lm_head.bias"] = Source((), lambda: torch.zeros(config.vocab_size))
    if not config.tie_embeddings:
        plan["lm_head.weight"] = take("lm_head.weight")
    if config.separate_decoder_positions:  # BART
        plan["pos_emb.weight"] = take(f"{base}encoder.embed_positions.weight")
        plan["decoder_embedding.pos_emb.weight"] = take(f"{base}decoder.embed_positions.weight")
    if config.has_embedding_norm:
        for part in ("weight", "bias"):
            plan[f"emb_norm.{part}"] = take(f"{base}encoder.layernorm_embedding.{part}")
            plan[f"decoder_embedding.emb_norm.{part}"] = take(f"{base}decoder.layernorm_embedding.{part}")

    def linear(ours: str, theirs: str) -> None:
        plan[f"{ours}.weight"], plan[f"{ours}.bias"] = take(f"{theirs}.weight"), take(f"{theirs}.bias")

    def attention(ours: str, theirs: str) -> None:
        for proj, hf_proj in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
            linear(f"{ours}.{proj}", f"{theirs}.{hf_proj}")

    stacks = (("encoder_layers", f"{base}encoder.layers", config.n_encoder_layers, False),
              ("decoder_layers", f"{base}decoder.layers", config.n_step_layers, True))
    for ours_stack, theirs_stack, layers, cross in stacks:
        for i in range(layers):
            ours, theirs = f"{ours_stack}.{i}", f"{theirs_stack}.{i}"
            attention(f"{ours}.attn", f"{theirs}.self_attn")
            linear(f"{ours}.attn_norm", f"{theirs}.self_attn_layer_norm")
            if cross:
                attention(f"{ours}.cross_attn", f"{theirs}.encoder_attn")
                linear(f"{ours}.cross_norm", f"{theirs}.encoder_attn_layer_norm")
            linear(f"{ours}.ffn.up_proj", f"{theirs}.fc1")
            linear(f"{ours}.ffn.down_proj", f"{theirs}.fc2")
            linear(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm")
    return plan


def marian_dropped(name: str) -> str | None:
    if name.removeprefix("model.") in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        return "Marian's fixed sinusoidal table (frozen, never trained), recomputed from its formula"
    return None


register(Family("t5", ("t5",), t5_config, t5_tensors, t5_dropped))
register(Family("bart", ("bart",), bart_config, bart_like_tensors))
register(Family("marian", ("marian",), marian_config, bart_like_tensors, marian_dropped))

__all__ = ["bart_config", "bart_like_tensors", "marian_config", "shared_embedding", "t5_config", "t5_tensors"]
