"""Hugging Face decoder-only families as our ModelConfig: Llama / Mistral / Qwen2 / SmolLM
(RoPE, GQA, SwiGLU, RMSNorm) and GPT-2. Registered into hf_import.FAMILIES."""

from __future__ import annotations

from onnxformer.runtime.errors import CheckpointError

from .config import ModelConfig
from .hf_import import HFConfig, Family, Source, register, take, unsupported


def _ids(hf: HFConfig) -> dict[str, int]:
    def one(key: str) -> int:
        value = hf.get(key)
        if isinstance(value, list):  # several eos ids: the first here, all of them in the package
            value = value[0] if value else None
        return value if isinstance(value, int) and value >= 0 else -1

    return {"pad_token_id": one("pad_token_id"), "bos_token_id": one("bos_token_id"),
            "eos_token_id": one("eos_token_id")}


def rope(hf: HFConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4's `rope_theta`
    and `rope_scaling`; a scaling type onnxformer does not implement is refused by name."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        key, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params = dict(params)
    theta = float(params.pop("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        if params:
            raise unsupported(hf, key, hf.data.get(key), f"keys {sorted(params)} with the default rope type")
        return theta, None
    if kind not in ("linear", "llama3"):
        raise unsupported(hf, key, hf.data.get(key), "onnxformer implements rope_type 'default', 'linear' and "
                          "'llama3'")
    return theta, {"rope_type": kind, **params}


def llama_config(hf: HFConfig, architecture: str) -> ModelConfig:
    """Llama, Mistral, Qwen2 (q/k/v bias), SmolLM: one config with optional fields."""
    model_type = hf.data["model_type"]
    if architecture and not architecture.endswith(("ForCausalLM", "Model")):
        raise unsupported(hf, "architectures", [architecture], "onnxformer imports the causal LM (or the bare model)")
    hf.expect("hidden_act", "silu")
    max_len = hf.require("max_position_embeddings")
    window = hf.get("sliding_window")
    use_window = hf.get("use_sliding_window", model_type == "mistral")
    if window is not None and use_window and window < max_len:
        raise unsupported(hf, "sliding_window", window, f"sliding-window attention is not implemented; it is "
                          f"below max_position_embeddings ({max_len})")
    hf.get("max_window_layers")  # Qwen2: which layers use the window; moot without one
    hf.get("layer_types")  # transformers 5: per-layer attention kinds, all "full_attention" without a window
    if any(kind != "full_attention" for kind in hf.data.get("layer_types") or []) and not (window is None or not use_window):
        raise unsupported(hf, "layer_types", hf.data["layer_types"], "only full attention is implemented")
    theta, scaling = rope(hf)
    heads = hf.require("num_attention_heads")
    d_model = hf.require("hidden_size")
    head_dim = hf.get("head_dim")
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if mlp_bias != bool(hf.get("attention_bias", False)) and model_type != "qwen2":
        raise unsupported(hf, "mlp_bias", mlp_bias, "biases on the MLP but not the attention (or the reverse) are "
                          "not implemented")
    return ModelConfig(
        arch="decoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        n_layers=hf.require("num_hidden_layers"),
        d_ff=hf.require("intermediate_size"),
        max_seq_len=max_len,
        pos_encoding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=head_dim if head_dim is not None and head_dim != d_model // heads else None,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bias=mlp_bias,
        qkv_bias=qkv_bias if qkv_bias != mlp_bias else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "llama" and model_type != "mistral")),
        **_ids(hf),
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
            if f"{hf_layer}.self_attn.{proj}.bias" in names:
                plan[f"{ours}.attn.{proj}.bias"] = take(f"{hf_layer}.self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            plan[f"{ours}.ffn.{proj}.weight"] = take(f"{hf_layer}.mlp.{proj}.weight")
            if f"{hf_layer}.mlp.{proj}.bias" in names:
                plan[f"{ours}.ffn.{proj}.bias"] = take(f"{hf_layer}.mlp.{proj}.bias")
    return plan


def llama_dropped(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
        return "a buffer our RotaryEmbedding recomputes from rope_theta and rope_scaling"
    if name == "lm_head.weight":
        return "the tied output head: the token embedding, stored twice"
    return None


register(Family("llama", ("llama", "mistral", "qwen2"), llama_config, llama_tensors, llama_dropped))

__all__ = ["llama_config", "llama_tensors", "rope"]
