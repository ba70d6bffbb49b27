"""Hugging Face decoder-only families as our ModelConfig: Llama / Mistral / Qwen2 / SmolLM
(RoPE, GQA, SwiGLU, RMSNorm) and GPT-2 (learned positions, tanh-GELU, LayerNorm, Conv1D
weights). Registered into hf_import.FAMILIES.

What each family converts and what it refuses (by the config key and its value):
    llama, mistral, qwen2   rope_theta and rope_scaling ("default", "linear", "llama3"; transformers
                            5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`), GQA,
                            head_dim apart from hidden_size / heads, Qwen2's q/k/v bias, tied or
                            untied embeddings. Refused: other rope types, a sliding window that
                            is active below max_position_embeddings, hidden_act other than silu,
                            biases on the MLP but not the attention (or the reverse).
    gpt2                    Conv1D weights stored (in, out), c_attn's fused q|k|v, gelu_new /
                            gelu_pytorch_tanh (our "gelu_tanh"), gelu, relu, learned positions,
                            scale_attn_weights. Refused: scale_attn_by_inverse_layer_idx (a scale
                            per layer), other activation_function values, the heads of
                            GPT2DoubleHeadsModel and GPT2ForSequenceClassification.
"""

from __future__ import annotations

from .config import ModelConfig
from .hf_import import Family, HFConfig, Source, part, register, take, transposed, unsupported


# Keys hub configs of these families carry that transformers never reads: distilgpt2's legacy
# `_num_labels` (a classification head's size), SmolLM's `is_llama_config` (a converter's note).
METADATA_KEYS = ("_num_labels", "is_llama_config")


def _architecture(hf: HFConfig, architecture: str, *endings: str) -> None:
    for key in METADATA_KEYS:
        hf.get(key)
    if architecture and not architecture.endswith(endings):
        raise unsupported(hf, "architectures", [architecture], "onnxformer imports the causal LM "
                          f"({' or '.join('*' + e for e in endings)}); its other heads are not implemented")


# --------------------------------------------------------------------------------------------
# Llama / Mistral / Qwen2 / SmolLM
# --------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope(hf: HFConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4's `rope_theta`
    and `rope_scaling`; a scaling type onnxformer does not implement is refused by name."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        key, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    elif hf.get("rope_scaling") is not None:  # both spellings: which one transformers reads is moot
        raise unsupported(hf, "rope_scaling", hf.data["rope_scaling"], "config.json also has rope_parameters; "
                          "keep the one the model was trained with")
    if not isinstance(params, dict):
        raise unsupported(hf, key, params, "expected a JSON object")
    params = dict(params)
    theta = float(params.pop("rope_theta", hf.data.get("rope_theta", 10000.0)))
    hf.get("rope_theta")  # 4.x configs with rope_parameters may repeat it at the top level
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise unsupported(hf, key, hf.data.get(key), f"rope_type {kind!r} is not implemented; onnxformer implements "
                          f"{', '.join(map(repr, ROPE_TYPES))}")
    if kind == "default":
        if params:
            raise unsupported(hf, key, hf.data.get(key), f"keys {sorted(params)} with the default rope type")
        return theta, None
    return theta, {"rope_type": kind, **params}


def _sliding_window(hf: HFConfig, n_layers: int, max_len: int) -> None:
    """Refuse sliding-window attention where it changes the math: in some layer, with a window
    below max_position_embeddings (a shorter window than the longest sequence)."""
    model_type = hf.data["model_type"]
    window = hf.get("sliding_window")
    use = hf.get("use_sliding_window", True)  # Qwen2's switch; Mistral's window is on when set
    first = hf.get("max_window_layers")  # Qwen2 (4.x): the window applies from this layer on
    kinds = hf.get("layer_types")  # transformers 5: each layer's attention
    if kinds is not None:
        odd = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
        if odd or len(kinds) != n_layers:
            raise unsupported(hf, "layer_types", kinds, f"onnxformer implements {n_layers} layers of "
                              "'full_attention' (or 'sliding_attention' with a window it never reaches)")
        layers = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    elif model_type == "qwen2":
        layers = list(range(first if isinstance(first, int) else 0, n_layers))
    else:
        layers = list(range(n_layers))
    if window is None or not use or not layers or window >= max_len:
        return
    raise unsupported(hf, "sliding_window", window, f"sliding-window attention (layers {layers}) is not "
                      f"implemented, and this window is below max_position_embeddings ({max_len}), so sequences "
                      f"longer than it would be converted wrongly; to use the model on sequences of up to {window} "
                      f"tokens, where the window changes nothing, set max_position_embeddings to {window} in "
                      "config.json")


def llama_config(hf: HFConfig, architecture: str) -> ModelConfig:
    """Llama, Mistral, Qwen2 (q/k/v bias), SmolLM: one config with optional fields."""
    model_type = hf.data["model_type"]
    _architecture(hf, architecture, "ForCausalLM", "Model")
    hf.expect("hidden_act", "silu")
    # SmolLM's converter writes rope_interleaved (false: transformers' rotate-half, the only one it
    # implements); true would claim a layout transformers ignores
    hf.expect("rope_interleaved", False)
    max_len = hf.require("max_position_embeddings")
    n_layers = hf.require("num_hidden_layers")
    _sliding_window(hf, n_layers, max_len)
    theta, scaling = rope(hf)
    heads = hf.require("num_attention_heads")
    d_model = hf.require("hidden_size")
    head_dim = hf.get("head_dim")
    # Llama's attention_bias puts a bias on q, k, v and o; Qwen2 has one on q, k, v only.
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if model_type == "qwen2":
        if attention_bias or mlp_bias:
            raise unsupported(hf, "attention_bias" if attention_bias else "mlp_bias", True,
                              "Qwen2 has biases on q, k and v only")
        bias, qkv_bias = False, True
    else:
        if mlp_bias != attention_bias:
            raise unsupported(hf, "mlp_bias", mlp_bias, f"with attention_bias {attention_bias}: biases on the MLP "
                              "but not the attention (or the reverse) are not implemented")
        bias, qkv_bias = attention_bias, None
    return ModelConfig(
        arch="decoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        n_layers=n_layers,
        d_ff=hf.require("intermediate_size"),
        max_seq_len=max_len,
        pos_encoding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=head_dim if head_dim is not None and head_dim * heads != d_model else None,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bias=bias,
        qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # the three classes' default
        **hf.special_ids(),
    )


def llama_tensors(config: ModelConfig, hf: HFConfig, names: set[str]) -> dict[str, Source]:
    base = "model." if "model.embed_tokens.weight" in names else ""
    plan = {"tok_emb.weight": take(f"{base}embed_tokens.weight"), "decoder_norm.weight": take(f"{base}norm.weight")}
    if not config.tie_embeddings:
        plan["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.n_layers):
        hf_layer, ours = f"{base}layers.{i}", f"decoder_layers.{i}"
        plan[f"{ours}.attn_norm.weight"] = take(f"{hf_layer}.input_layernorm.weight")
        plan[f"{ours}.ffn_norm.weight"] = take(f"{hf_layer}.post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            plan[f"{ours}.attn.{proj}.weight"] = take(f"{hf_layer}.self_attn.{proj}.weight")
            if config.has_qkv_bias if proj != "o_proj" else config.bias:
                plan[f"{ours}.attn.{proj}.bias"] = take(f"{hf_layer}.self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            plan[f"{ours}.ffn.{proj}.weight"] = take(f"{hf_layer}.mlp.{proj}.weight")
            if config.bias:
                plan[f"{ours}.ffn.{proj}.bias"] = take(f"{hf_layer}.mlp.{proj}.bias")
    return plan


def llama_dropped(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
        return "a buffer our RotaryEmbedding recomputes from rope_theta and rope_scaling"
    if name == "lm_head.weight":  # only reached when tied: untied, the plan uses it
        return "the output head of a model with tie_word_embeddings: transformers ties it to the token embedding"
    return None


register(Family("llama", ("llama", "mistral", "qwen2"), llama_config, llama_tensors, llama_dropped))


# --------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------

# activation_function -> our activation; "gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation (one spelled out, one torch's), "gelu" the exact erf GELU.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# Keys of GPT2DoubleHeadsModel's multiple-choice head, which a causal LM does not have.
GPT2_SUMMARY_KEYS = ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                     "summary_first_dropout")


def gpt2_config(hf: HFConfig, architecture: str) -> ModelConfig:
    _architecture(hf, architecture, "LMHeadModel", "GPT2Model")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise unsupported(hf, "activation_function", activation,
                          f"onnxformer implements {', '.join(map(repr, GPT2_ACTIVATIONS))}")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise unsupported(hf, "scale_attn_by_inverse_layer_idx", True, "a different attention scale in each layer "
                          "(1 / (layer + 1)) is not implemented")
    # Scaling the keys before the product and upcasting to float32 is the same math in float32;
    # it only changes rounding in half precision (and transformers applies it in eager mode only).
    hf.get("reorder_and_upcast_attn")
    for key in GPT2_SUMMARY_KEYS:
        hf.get(key)
    d_model, heads = hf.require("n_embd"), hf.require("n_head")
    return ModelConfig(
        arch="decoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        n_heads=heads,
        n_layers=hf.require("n_layer"),
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf.require("n_positions"),
        pos_encoding="learned",
        activation=GPT2_ACTIVATIONS[activation],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        bias=True,
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **hf.special_ids(),
    )


def gpt2_tensors(config: ModelConfig, hf: HFConfig, names: set[str]) -> dict[str, Source]:
    """Conv1D stores its weight (in, out): transposed into our nn.Linear's (out, in); c_attn
    holds q|k|v side by side, split into three."""
    base = "transformer." if "transformer.wte.weight" in names else ""
    plan = {"tok_emb.weight": take(f"{base}wte.weight"), "pos_emb.weight": take(f"{base}wpe.weight"),
            "decoder_norm.weight": take(f"{base}ln_f.weight"), "decoder_norm.bias": take(f"{base}ln_f.bias")}
    if not config.tie_embeddings:
        plan["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.n_layers):
        hf_layer, ours = f"{base}h.{i}", f"decoder_layers.{i}"
        for norm, hf_norm in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            for kind in ("weight", "bias"):
                plan[f"{ours}.{norm}.{kind}"] = take(f"{hf_layer}.{hf_norm}.{kind}")
        for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            plan[f"{ours}.attn.{proj}.weight"] = part(f"{hf_layer}.attn.c_attn.weight", k, 3, transpose=True)
            plan[f"{ours}.attn.{proj}.bias"] = part(f"{hf_layer}.attn.c_attn.bias", k, 3)
        linears = (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj"))
        for ours_name, hf_name in linears:
            plan[f"{ours}.{ours_name}.weight"] = transposed(f"{hf_layer}.{hf_name}.weight")
            plan[f"{ours}.{ours_name}.bias"] = take(f"{hf_layer}.{hf_name}.bias")
    return plan


def gpt2_dropped(name: str) -> str | None:
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return "the causal-mask buffers of older transformers versions (attn.bias, attn.masked_bias); our " \
               "attention builds its own mask"
    if name == "lm_head.weight":
        return "the output head of a model with tie_word_embeddings: transformers ties it to the token embedding"
    return None


register(Family("gpt2", ("gpt2",), gpt2_config, gpt2_tensors, gpt2_dropped))


__all__ = ["GPT2_ACTIVATIONS", "ROPE_TYPES", "gpt2_config", "gpt2_tensors", "llama_config", "llama_tensors", "rope"]
