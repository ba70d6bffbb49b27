"""Our weights -> Hugging Face models of the same math, checked logit for logit.

Runs inside a peer environment (torch + transformers; no onnxformer): it reads the case
directory written by workspace.py (case.json, model.pt, reference.npz) and writes
`hf-transformers-<version>/` there: a save_pretrained directory (config, safetensors,
generation config, tokenizer) that transformers, Optimum and the genai builder load.

Mappings (exact, no approximation):

    decoder          -> LlamaForCausalLM: RMSNorm (same eps), rotate-half RoPE (same theta),
                        SwiGLU gate/up/down, no biases, untied lm_head.
    encoder-decoder  -> BartForConditionalGeneration: post-norm, layernorm_embedding,
                        learned positions with BART's offset of 2 (our row p -> HF row p + 2;
                        one table of ours fills the encoder's and the decoder's), exact GELU,
                        biases, embeddings shared by encoder, decoder and lm_head,
                        final_logits_bias 0, scale_embedding off.
    classifier       -> BertForSequenceClassification: post-norm, learned positions, token
                        types, exact (erf) GELU, pooler tanh(W h_[CLS]), classifier.

Before anything is saved, the HF model's hidden states on reference.npz's inputs must equal
ours within ATOL = 1e-4 (max absolute difference, float32), and its logits within
ATOL * logit_scale (workspace.py scales the output projections by logit_scale, so this is
1e-4 on the unscaled head).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, write_json  # noqa: E402

ATOL = 1e-4


def _llama(config: dict[str, Any], state: dict[str, Any], special: dict[str, int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["d_model"], intermediate_size=config["d_ff"],
        num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
        num_key_value_heads=config.get("n_kv_heads") or config["n_heads"],
        head_dim=config["d_model"] // config["n_heads"], max_position_embeddings=config["max_seq_len"],
        rms_norm_eps=config["norm_eps"], rope_theta=config["rope_theta"], hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        pad_token_id=special["pad"], bos_token_id=special["bos"], eos_token_id=special["eos"],
    )
    rope = getattr(hf_config, "rope_parameters", None)  # transformers 5.x keeps theta here
    if isinstance(rope, dict):
        rope["rope_theta"] = config["rope_theta"]
    mapped = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["decoder_norm.weight"],
              "lm_head.weight": state["lm_head.weight"]}
    for i in range(config["n_layers"]):
        ours, hf = f"decoder_layers.{i}.", f"model.layers.{i}."
        for p in ("q", "k", "v", "o"):
            mapped[f"{hf}self_attn.{p}_proj.weight"] = state[f"{ours}attn.{p}_proj.weight"]
        for p in ("gate", "up", "down"):
            mapped[f"{hf}mlp.{p}_proj.weight"] = state[f"{ours}ffn.{p}_proj.weight"]
        mapped[f"{hf}input_layernorm.weight"] = state[f"{ours}attn_norm.weight"]
        mapped[f"{hf}post_attention_layernorm.weight"] = state[f"{ours}ffn_norm.weight"]
    model = LlamaForCausalLM(hf_config)
    _load(model, mapped)
    return model


def _linear(mapped: dict, state: dict, hf: str, ours: str) -> None:
    mapped[f"{hf}.weight"] = state[f"{ours}.weight"]
    mapped[f"{hf}.bias"] = state[f"{ours}.bias"]


def _bart(config: dict[str, Any], state: dict[str, Any], special: dict[str, int]):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    n_dec = config.get("n_decoder_layers") or config["n_layers"]
    hf_config = BartConfig(
        vocab_size=config["vocab_size"], d_model=config["d_model"], encoder_layers=config["n_layers"],
        decoder_layers=n_dec, encoder_attention_heads=config["n_heads"], decoder_attention_heads=config["n_heads"],
        encoder_ffn_dim=config["d_ff"], decoder_ffn_dim=config["d_ff"], activation_function="gelu",
        max_position_embeddings=config["max_seq_len"], scale_embedding=False, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=True,
        pad_token_id=special["pad"], bos_token_id=special["bos"], eos_token_id=special["eos"],
        decoder_start_token_id=config["decoder_start_token_id"], forced_bos_token_id=None, forced_eos_token_id=None,
    )
    emb = state["tok_emb.weight"]
    positions = torch.zeros(config["max_seq_len"] + 2, config["d_model"])
    positions[2:] = state["pos_emb.weight"]  # BART looks up row position + 2
    mapped = {"model.shared.weight": emb, "lm_head.weight": emb,
              "final_logits_bias": torch.zeros(1, config["vocab_size"])}
    for side in ("encoder", "decoder"):
        mapped[f"model.{side}.embed_tokens.weight"] = emb
        mapped[f"model.{side}.embed_positions.weight"] = positions
        _linear(mapped, state, f"model.{side}.layernorm_embedding", "emb_norm")
    for side, ours_side, count in (("encoder", "encoder_layers", config["n_layers"]), ("decoder", "decoder_layers", n_dec)):
        for i in range(count):
            ours, hf = f"{ours_side}.{i}.", f"model.{side}.layers.{i}."
            attns = [("self_attn", "attn")] + ([("encoder_attn", "cross_attn")] if side == "decoder" else [])
            for hf_attn, our_attn in attns:
                for p, q in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
                    _linear(mapped, state, f"{hf}{hf_attn}.{p}", f"{ours}{our_attn}.{q}")
            _linear(mapped, state, f"{hf}self_attn_layer_norm", f"{ours}attn_norm")
            if side == "decoder":
                _linear(mapped, state, f"{hf}encoder_attn_layer_norm", f"{ours}cross_norm")
            _linear(mapped, state, f"{hf}fc1", f"{ours}ffn.up_proj")
            _linear(mapped, state, f"{hf}fc2", f"{ours}ffn.down_proj")
            _linear(mapped, state, f"{hf}final_layer_norm", f"{ours}ffn_norm")
    model = BartForConditionalGeneration(hf_config)
    _load(model, mapped)
    return model


def _bert(config: dict[str, Any], state: dict[str, Any], special: dict[str, int]):
    from transformers import BertConfig, BertForSequenceClassification

    hf_config = BertConfig(
        vocab_size=config["vocab_size"], hidden_size=config["d_model"], num_hidden_layers=config["n_layers"],
        num_attention_heads=config["n_heads"], intermediate_size=config["d_ff"], hidden_act="gelu",
        max_position_embeddings=config["max_seq_len"], type_vocab_size=config["type_vocab_size"],
        layer_norm_eps=config["norm_eps"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=config["num_labels"], pad_token_id=special["pad"],
        id2label=dict(enumerate(config.get("label_names") or [])) or None,
    )
    mapped = {
        "bert.embeddings.word_embeddings.weight": state["tok_emb.weight"],
        "bert.embeddings.position_embeddings.weight": state["pos_emb.weight"],
        "bert.embeddings.token_type_embeddings.weight": state["type_emb.weight"],
    }
    _linear(mapped, state, "bert.embeddings.LayerNorm", "emb_norm")
    for i in range(config["n_layers"]):
        ours, hf = f"encoder_layers.{i}.", f"bert.encoder.layer.{i}."
        for p, q in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            _linear(mapped, state, f"{hf}attention.self.{p}", f"{ours}attn.{q}")
        _linear(mapped, state, f"{hf}attention.output.dense", f"{ours}attn.o_proj")
        _linear(mapped, state, f"{hf}attention.output.LayerNorm", f"{ours}attn_norm")
        _linear(mapped, state, f"{hf}intermediate.dense", f"{ours}ffn.up_proj")
        _linear(mapped, state, f"{hf}output.dense", f"{ours}ffn.down_proj")
        _linear(mapped, state, f"{hf}output.LayerNorm", f"{ours}ffn_norm")
    _linear(mapped, state, "bert.pooler.dense", "pooler")
    _linear(mapped, state, "classifier", "classifier")
    model = BertForSequenceClassification(hf_config)
    _load(model, mapped)
    return model


def _load(model, mapped: dict[str, Any]) -> None:
    """Load every parameter; only non-persistent-like buffers may be missing."""
    expected = set(model.state_dict())
    extra = sorted(set(mapped) - expected)
    missing = sorted(k for k in expected - set(mapped) if not k.endswith(("position_ids", "token_type_ids")))
    if extra or missing:
        raise ValueError(f"weight mapping mismatch: unmapped HF keys {missing[:8]}, unknown keys {extra[:8]}")
    model.load_state_dict({k: v.clone() for k, v in mapped.items()}, strict=False)
    model.eval()


BUILDERS = {"decoder": _llama, "encoder-decoder": _bart, "classifier": _bert}


def convert(case_dir: Path):
    """The HF model of the case (float32, eval) from our state dict."""
    import torch

    case = json.loads((case_dir / "case.json").read_text())
    state = torch.load(case_dir / "model.pt", weights_only=True)
    return BUILDERS[case["case"]](case["config"], state, case["special"]), case


def check_logits(model, case_dir: Path, case_name: str, logit_scale: float) -> dict[str, float]:
    """Max |HF - ours| on reference.npz; raises when above the tolerance."""
    import numpy as np
    import torch

    ref = dict(np.load(case_dir / "reference.npz"))
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    with torch.no_grad():
        if case_name == "decoder":
            figures = {"logits": model(input_ids=t["input_ids"]).logits,
                       "hidden": model.model(input_ids=t["input_ids"]).last_hidden_state}
        elif case_name == "encoder-decoder":
            out = model(input_ids=t["input_ids"], decoder_input_ids=t["decoder_input_ids"])
            figures = {"logits": out.logits, "encoder_hidden": out.encoder_last_hidden_state}
        else:
            out = model(input_ids=t["input_ids"], token_type_ids=t["token_type_ids"], output_hidden_states=True)
            figures = {"logits": out.logits, "hidden": out.hidden_states[-1]}
    diffs = {k: float((v.float() - t[k]).abs().max()) for k, v in figures.items()}
    tolerance = {k: ATOL * (logit_scale if k == "logits" else 1.0) for k in diffs}
    scale = float(t["logits"].abs().max())
    if any(diffs[k] > tolerance[k] for k in diffs):
        raise AssertionError(f"HF model does not match ours: max abs differences {diffs} > {tolerance} "
                             f"(|logits| <= {scale:.1f})")
    return {**{f"max_abs_diff_{k}": v for k, v in diffs.items()}, "atol": tolerance, "max_abs_logit": scale}


def _save_tokenizer(case_dir: Path, out: Path, case_name: str) -> None:
    from transformers import PreTrainedTokenizerFast

    if case_name == "classifier":
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        names = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", mask_token="<mask>")
    PreTrainedTokenizerFast(tokenizer_file=str(case_dir / "tokenizer.json"), **names).save_pretrained(out)


def ensure_hf_dir(case_dir: Path) -> tuple[Path, dict[str, Any]]:
    """`case_dir/hf-transformers-<version>/`, converted and checked once per model.pt."""
    import transformers
    from transformers import GenerationConfig

    out = case_dir / f"hf-transformers-{transformers.__version__}"
    stamp = out / "conversion.json"
    model_key = (case_dir / "model.key").read_text().strip()
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("model_key") == model_key:
            return out, info
    model, case = convert(case_dir)
    info = {"model_key": model_key, "transformers": transformers.__version__, "hf_class": type(model).__name__,
            **check_logits(model, case_dir, case["case"], case.get("logit_scale", 1.0))}
    log(f"converted {case_dir.name} to {type(model).__name__}: {info}")
    shutil.rmtree(out, ignore_errors=True)
    if case["case"] != "classifier":
        sp = case["special"]
        model.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, eos_token_id=sp["eos"], pad_token_id=sp["pad"], bos_token_id=sp["bos"],
            **({"decoder_start_token_id": case["config"]["decoder_start_token_id"]} if case["case"] == "encoder-decoder" else {}),
        )
    model.save_pretrained(out)
    _save_tokenizer(case_dir, out, case["case"])
    write_json(stamp, info)
    return out, info


STAMP = "source-model.key"


def is_current(export_dir: Path, info: dict[str, Any]) -> bool:
    """Whether a peer export (Optimum, genai) was made from the current HF conversion."""
    stamp = export_dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == info["model_key"]


def mark_current(export_dir: Path, info: dict[str, Any]) -> None:
    (export_dir / STAMP).write_text(info["model_key"])


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path, figures = ensure_hf_dir(Path(arg))
        print(path, json.dumps(figures))
