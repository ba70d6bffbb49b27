"""Hugging Face encoder-only families (BERT incl. MiniLM / sentence-transformers, RoBERTa and
XLM-RoBERTa, DistilBERT, ELECTRA discriminator) as our ModelConfig. Registered into hf_import.FAMILIES.

All four are our post-norm encoder (norm_position "post", a LayerNorm after the embedding sum,
learned positions, biases everywhere); they differ only in config fields:

    BERT        type_vocab_size 2, pooler tanh
    RoBERTa     pos_offset = pad_token_id + 1 (positions count from padding_idx + 1), 1 token type
    DistilBERT  no token types, LayerNorm eps 1e-12, pre_classifier + ReLU: pooler_activation "relu"
    ELECTRA     d_embed = embedding_size (embeddings_project -> embed_proj), head dense + GELU:
                pooler_activation "gelu"

Our encoder always holds a pooler, an MLM head (mlm_transform + lm_head with logits_bias) and
an NSP head. A head the checkpoint holds is read (all its tensors, or a missing one is named);
a head its architecture requires must be there; a head it lacks (BertModel has no MLM head)
gets our initialisation and is reported in HFImport.initialised, never read from nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from onnxformer.runtime.errors import CheckpointError

from .config import ModelConfig
from .hf_import import Family, HFConfig, Source, initialised, register, take, unsupported

# Hugging Face hidden_act -> our activation (transformers' ACT2FN: "gelu" is the exact erf form,
# "gelu_new" / "gelu_pytorch_tanh" the tanh approximation).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}

# Heads of our encoder, by the parameters each holds (weight and bias of every module named).
HEADS = {
    "pooler": ("pooler",),
    "classifier": ("classifier",),
    "mlm": ("mlm_transform.0", "mlm_transform.2", "lm_head"),
    "nsp": ("nsp_head",),
}


@dataclass(frozen=True)
class Layout:
    """One family's tensor names.

    prefix: the base model's name inside a task model ("bert."); absent in a bare model's file.
    embeddings / layer: our module name -> theirs ({i} the layer index) for the base model.
    heads: head -> our module -> their module ({base}: the prefix in use; a|b: whichever the
        file holds), or for `lm_head` the tensor names (bias, untied weight).
    architectures: class-name suffix -> the heads that architecture has (so must be present);
        a head it does not list is read when the file holds it (bert-base-uncased's
        "BertForMaskedLM" file holds the pooler and NSP head too).
    dropped_heads: tensor-name prefixes of heads onnxformer does not implement, with the reason.
    The family's math, as our config fields (BERT's values are the defaults):
    pooler_activation: of the pooler / classification head's dense layer.
    mlm_hidden_act: the MLM transform applies hidden_act (else exact GELU, RoBERTa's lm_head).
    positions_after_pad: positions count from pad_token_id + 1 (RoBERTa): pos_offset.
    embedding_size: config.json's embedding_size may differ from hidden_size (ELECTRA): d_embed.
    unused_keys: config keys the architectures imported never read (ELECTRA's summary_*, old BERT exports').
    """

    prefix: str
    embeddings: dict[str, str]
    layer: dict[str, str]
    heads: dict[str, dict[str, str | tuple[str, str]]]
    architectures: dict[str, tuple[str, ...]]
    dropped_heads: dict[str, str]
    pooler_activation: str = "tanh"
    mlm_hidden_act: bool = True
    positions_after_pad: bool = False
    embedding_size: bool = False
    unused_keys: tuple[str, ...] = ()


BUFFERS = {
    "embeddings.position_ids": "a buffer (0..max_position_embeddings-1): our positions come from the attention mask",
    "embeddings.token_type_ids": "a buffer of zeros: our token types default to 0",
}
TIED = "the tied output head: the word embedding, stored twice"

_BERT_LAYER = {
    "attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key", "attn.v_proj": "attention.self.value",
    "attn.o_proj": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn.up_proj": "intermediate.dense", "ffn.down_proj": "output.dense", "ffn_norm": "output.LayerNorm",
}
_BERT_EMBEDDINGS = {
    "tok_emb": "embeddings.word_embeddings", "pos_emb": "embeddings.position_embeddings",
    "type_emb": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm",
    "embed_proj": "embeddings_project",
}

BERT = Layout(
    prefix="bert.", embeddings=_BERT_EMBEDDINGS, layer={k: f"encoder.layer.{{i}}.{v}" for k, v in _BERT_LAYER.items()},
    heads={
        "pooler": {"pooler": "{base}pooler.dense"},
        "classifier": {"classifier": "classifier"},
        "mlm": {"mlm_transform.0": "cls.predictions.transform.dense",
                "mlm_transform.2": "cls.predictions.transform.LayerNorm",
                "lm_head": ("cls.predictions.bias", "cls.predictions.decoder.weight")},
        "nsp": {"nsp_head": "cls.seq_relationship"},
    },
    architectures={"Model": (), "ForSequenceClassification": ("pooler", "classifier"), "ForMaskedLM": ("mlm",),
                   "ForPreTraining": ("pooler", "mlm", "nsp")},
    dropped_heads={"cls.predictions.decoder.bias": "the MLM decoder's bias: the same tensor as cls.predictions.bias"},
    # left in Google's original BERT exports (bert-base-multilingual, -chinese): transformers reads none of them
    unused_keys=("directionality", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
                 "pooler_size_per_head", "pooler_type"),
)
ROBERTA = Layout(
    prefix="roberta.", embeddings=_BERT_EMBEDDINGS, layer=BERT.layer,
    heads={
        # RobertaModel's pooler, or the classification head's dense + tanh (its model has no pooler)
        "pooler": {"pooler": "{base}pooler.dense|classifier.dense"},
        "classifier": {"classifier": "classifier.out_proj"},
        "mlm": {"mlm_transform.0": "lm_head.dense", "mlm_transform.2": "lm_head.layer_norm",
                "lm_head": ("lm_head.bias", "lm_head.decoder.weight")},
    },
    architectures={"Model": (), "ForSequenceClassification": ("pooler", "classifier"), "ForMaskedLM": ("mlm",)},
    dropped_heads={"lm_head.decoder.bias": "the MLM decoder's bias: the same tensor as lm_head.bias"},
    mlm_hidden_act=False, positions_after_pad=True,
)
DISTILBERT = Layout(
    prefix="distilbert.",
    embeddings={"tok_emb": "embeddings.word_embeddings", "pos_emb": "embeddings.position_embeddings",
                "emb_norm": "embeddings.LayerNorm"},
    layer={k: f"transformer.layer.{{i}}.{v}" for k, v in {
        "attn.q_proj": "attention.q_lin", "attn.k_proj": "attention.k_lin", "attn.v_proj": "attention.v_lin",
        "attn.o_proj": "attention.out_lin", "attn_norm": "sa_layer_norm", "ffn.up_proj": "ffn.lin1",
        "ffn.down_proj": "ffn.lin2", "ffn_norm": "output_layer_norm"}.items()},
    heads={
        "pooler": {"pooler": "pre_classifier"},
        "classifier": {"classifier": "classifier"},
        "mlm": {"mlm_transform.0": "vocab_transform", "mlm_transform.2": "vocab_layer_norm",
                "lm_head": ("vocab_projector.bias", "vocab_projector.weight")},
    },
    architectures={"Model": (), "ForSequenceClassification": ("pooler", "classifier"), "ForMaskedLM": ("mlm",)},
    dropped_heads={},
    pooler_activation="relu",  # pre_classifier, ReLU, classifier
)
ELECTRA = Layout(
    prefix="electra.", embeddings=_BERT_EMBEDDINGS, layer=BERT.layer,
    heads={
        "pooler": {"pooler": "classifier.dense"},
        "classifier": {"classifier": "classifier.out_proj"},
    },
    architectures={"Model": (), "ForSequenceClassification": ("pooler", "classifier"), "ForPreTraining": ()},
    dropped_heads={
        "discriminator_predictions.": "ELECTRA's replaced-token detection head (pre-training only): onnxformer has "
                                      "no per-token discriminator head; the encoder below it is imported whole",
    },
    # its classification head: dense, GELU, out_proj; no pooler of its own
    pooler_activation="gelu", embedding_size=True,
    # ElectraForMultipleChoice's SequenceSummary
    unused_keys=("summary_type", "summary_use_proj", "summary_activation", "summary_last_dropout"),
)
LAYOUTS = {"bert": BERT, "roberta": ROBERTA, "xlm-roberta": ROBERTA, "distilbert": DISTILBERT, "electra": ELECTRA}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def architecture_kind(hf: HFConfig, architecture: str, layout: Layout) -> str:
    """The class-name suffix ("Model", "ForSequenceClassification", ...) of `architectures[0]`,
    refused by name when onnxformer has no head for it."""
    for kind in sorted(layout.architectures, key=len, reverse=True):
        bare_model = kind != "Model" or ("For" not in architecture and "LMHead" not in architecture)
        if architecture.endswith(kind) and bare_model:
            return kind
    if not architecture:
        return "Model"
    model_type = hf.data["model_type"]
    known = ", ".join(sorted(layout.architectures))
    raise unsupported(hf, "architectures", [architecture],
                      f"onnxformer imports the {model_type} classes ending in {known}; this head is not implemented")


def _label_names(hf: HFConfig, kind: str) -> tuple[str, ...]:
    if kind != "ForSequenceClassification":
        hf.get("id2label"), hf.get("label2id"), hf.get("num_labels")
        return ()
    id2label = hf.get("id2label") or {}
    count = len(id2label) or int(hf.get("num_labels") or 2)
    hf.get("label2id")
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))


def _activation(hf: HFConfig, key: str) -> str:
    value = hf.get(key, "gelu")
    if value not in HF_ACTIVATIONS:
        raise unsupported(hf, key, value, f"onnxformer implements {', '.join(map(repr, HF_ACTIVATIONS))}")
    return HF_ACTIVATIONS[value]


def _no_decoder(hf: HFConfig) -> None:
    hf.expect("is_decoder", False)  # a causal BERT (BertLMHeadModel) would need a causal mask
    hf.expect("add_cross_attention", False)
    hf.expect("position_embedding_type", "absolute")  # relative_key(_query) scores are not implemented


def bert_config(hf: HFConfig, architecture: str) -> ModelConfig:
    """BERT, RoBERTa and ELECTRA: one config with the families' fields (module docstring)."""
    model_type = hf.data["model_type"]
    layout = LAYOUTS[model_type]
    kind = architecture_kind(hf, architecture, layout)
    for key in layout.unused_keys:
        hf.get(key)
    _no_decoder(hf)
    d_model = hf.require("hidden_size")
    d_embed = hf.get("embedding_size") if layout.embedding_size else None
    d_embed = d_embed if d_embed not in (None, d_model) else None
    offset = 0
    if layout.positions_after_pad:
        pad = hf.token_id("pad_token_id")
        if pad < 0:
            raise unsupported(hf, "pad_token_id", hf.data.get("pad_token_id"),
                              f"{model_type}'s positions start at pad_token_id + 1, so it must be set")
        offset = pad + 1
    max_positions = hf.require("max_position_embeddings")
    labels = _label_names(hf, kind)
    activation = _activation(hf, "hidden_act")
    return ModelConfig(
        arch="encoder",
        vocab_size=hf.require("vocab_size"),
        d_model=d_model,
        d_embed=d_embed,
        n_heads=hf.require("num_attention_heads"),
        n_layers=hf.require("num_hidden_layers"),
        d_ff=hf.require("intermediate_size"),
        max_seq_len=max_positions - offset,
        pos_encoding="learned",
        pos_offset=offset,
        activation=activation,
        norm="layernorm",
        norm_position="post",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        bias=True,
        logits_bias=True,
        pooler_activation=layout.pooler_activation,
        mlm_activation=activation if layout.mlm_hidden_act else "gelu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)) and d_embed is None,
        # one token type (RoBERTa) adds the same row everywhere: folded into the position table
        type_vocab_size=types if (types := int(hf.get("type_vocab_size", 2))) != 1 else 0,
        num_labels=len(labels),
        label_names=labels,
        **hf.special_ids(),
    )


def distilbert_config(hf: HFConfig, architecture: str) -> ModelConfig:
    kind = architecture_kind(hf, architecture, DISTILBERT)
    hf.get("sinusoidal_pos_embds")  # the table is stored in the weights either way: read as learned positions
    hf.get("tie_weights_")  # old configs; the tie is tie_word_embeddings
    labels = _label_names(hf, kind)
    activation = _activation(hf, "activation")
    return ModelConfig(
        arch="encoder",
        vocab_size=hf.require("vocab_size"),
        d_model=hf.require("dim"),
        n_heads=hf.require("n_heads"),
        n_layers=hf.require("n_layers"),
        d_ff=hf.require("hidden_dim"),
        max_seq_len=hf.require("max_position_embeddings"),
        pos_encoding="learned",
        activation=activation,
        norm="layernorm",
        norm_position="post",
        norm_eps=1e-12,  # fixed in DistilBERT's modules
        bias=True,
        logits_bias=True,
        pooler_activation=DISTILBERT.pooler_activation,
        mlm_activation=activation,  # vocab_transform applies config.activation
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        type_vocab_size=0,
        num_labels=len(labels),
        label_names=labels,
        **hf.special_ids(),
    )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _module(plan: dict[str, Source], ours: str, theirs: str, *, weight_only: bool = False) -> None:
    plan[f"{ours}.weight"] = take(f"{theirs}.weight")
    if not weight_only:
        plan[f"{ours}.bias"] = take(f"{theirs}.bias")


def _base(layout: Layout, names: set[str]) -> str:
    word = layout.embeddings["tok_emb"]
    return layout.prefix if f"{layout.prefix}{word}.weight" in names else ""


def _head_modules(layout: Layout, head: str, base: str, names: set[str]) -> dict[str, str | tuple[str, str]]:
    """Our module -> their module for one head; of alternatives (a|b), the one in the file."""
    modules = {}
    for ours, theirs in layout.heads.get(head, {}).items():
        if isinstance(theirs, str):
            options = [t.format(base=base) for t in theirs.split("|")]
            theirs = next((t for t in options if f"{t}.weight" in names), options[0])
        modules[ours] = theirs
    return modules


def _head_present(modules: dict[str, str | tuple[str, str]], names: set[str]) -> bool:
    for theirs in modules.values():
        tensors = theirs if isinstance(theirs, tuple) else (f"{theirs}.weight", f"{theirs}.bias")
        if any(t in names for t in tensors):
            return True
    return False


def _fold_token_type(positions: Tensor, types: Tensor) -> Tensor:
    """A single token type's row added to every position's (the sum is the same for every token)."""
    if types.shape[0] != 1:
        raise CheckpointError(f"the token type table has {types.shape[0]} rows but config.json's type_vocab_size "
                              "is 1; the config and the weights do not match", code="E_CHECKPOINT")
    return positions + types[0]


def encoder_tensors(config: ModelConfig, hf: HFConfig, names: set[str]) -> dict[str, Source]:
    model_type = hf.data["model_type"]
    layout = LAYOUTS[model_type]
    kind = architecture_kind(hf, (hf.data.get("architectures") or [""])[0], layout)
    base = _base(layout, names)
    plan: dict[str, Source] = {}
    for ours, theirs in layout.embeddings.items():
        if ours == "type_emb" and not config.type_vocab_size or ours == "embed_proj" and not config.d_embed:
            continue
        _module(plan, ours, base + theirs, weight_only=ours in ("tok_emb", "pos_emb", "type_emb"))
    types = f"{base}{layout.embeddings.get('type_emb')}.weight"
    if not config.type_vocab_size and types in names:  # one token type: (1, D), added to every position
        plan["pos_emb.weight"] = Source((plan["pos_emb.weight"].names[0], types), _fold_token_type)
    for i in range(config.n_layers):
        for ours, theirs in layout.layer.items():
            _module(plan, f"encoder_layers.{i}.{ours}", base + theirs.format(i=i))
    required = layout.architectures[kind]
    for head, ours_modules in HEADS.items():
        if head == "classifier" and not config.num_labels:
            continue  # our model has no classifier
        modules = _head_modules(layout, head, base, names)
        if head in required or (modules and _head_present(modules, names)):
            for ours, theirs in modules.items():
                if isinstance(theirs, tuple):  # lm_head: (bias, untied weight)
                    plan["lm_head.bias"] = take(theirs[0])
                    if not config.tie_embeddings:
                        plan["lm_head.weight"] = take(theirs[1])
                else:
                    _module(plan, ours, theirs)
            continue
        why = f"{(hf.data.get('architectures') or [f'the bare {model_type} model'])[0]} has no {head} head"
        for ours in ours_modules:
            if ours == "lm_head":
                plan["lm_head.bias"] = initialised(why)
                if not config.tie_embeddings:
                    plan["lm_head.weight"] = initialised(why)
            else:
                plan[f"{ours}.weight"] = initialised(why)
                plan[f"{ours}.bias"] = initialised(why)
    return plan


def encoder_dropped(layout: Layout) -> Callable[[str], str | None]:
    def dropped(name: str) -> str | None:
        bare = name.removeprefix(layout.prefix)
        if bare in BUFFERS:
            return BUFFERS[bare]
        lm_weight = layout.heads.get("mlm", {}).get("lm_head")
        if isinstance(lm_weight, tuple) and name == lm_weight[1]:
            return TIED
        for prefix, reason in layout.dropped_heads.items():
            if name.startswith(prefix):
                return reason
        return None

    return dropped


register(Family("bert", ("bert",), bert_config, encoder_tensors, encoder_dropped(BERT)))
register(Family("roberta", ("roberta", "xlm-roberta"), bert_config, encoder_tensors, encoder_dropped(ROBERTA)))
register(Family("distilbert", ("distilbert",), distilbert_config, encoder_tensors, encoder_dropped(DISTILBERT)))
register(Family("electra", ("electra",), bert_config, encoder_tensors, encoder_dropped(ELECTRA)))

__all__ = ["LAYOUTS", "Layout", "bert_config", "distilbert_config", "encoder_tensors"]
