"""Encoder-decoder Hugging Face checkpoints (modeling/hf_seq2seq.py): T5, Flan-T5 (gated GELU,
an untied head stored apart, a head size apart from d_model / heads), BART and Marian, each a
tiny random model built by `transformers` from a config and saved with save_pretrained, then
imported and exported. `transformers` is the reference throughout: eager logits, the
package's logits, and greedy tokens of its `generate` at batch 1 and for a padded batch of
sources, through the Python and the Node runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hf_support import hf_tokenizer, node_generate, save_hf, torch, transformers
from support import HAS_NODE

from onnxformer.export.exporter import export_checkpoint
from onnxformer.modeling.hf_import import load_hf
from onnxformer.runtime.errors import CheckpointError

import onnxformer.runtime as rt

NEW_TOKENS = 32
SOURCES = ["one red cat.", "two green dog. three blue sun. four", "hello"]
ATOL = 1e-4

T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16)
BART = dict(d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
# BartConfig's default forced_eos_token_id 2 (MarianConfig's 0) makes generate's last token eos (pad); the
# package carries it (tests/test_hf_generation_settings.py tests forced bos and eos themselves)
# name -> (model class, config class, its arguments, the std of the random weight matrices and
# of the position tables). A tied post-norm model with random weights repeats its input token
# forever: the BART and Marian models that generate are untied (UNTIED), so greedy search has
# something to follow; the tied ones are checked eagerly.
FAMILIES = {
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(T5, feed_forward_proj="relu"), 0.5, 2.0),
    # Flan-T5's shape: gated GELU, d_kv apart from d_model / heads; made untied below
    "flan-t5": ("T5ForConditionalGeneration", "T5Config", dict(T5, d_kv=16, feed_forward_proj="gated-gelu"), 0.3, 2.0),
    "bart": ("BartForConditionalGeneration", "BartConfig", BART, 0.1, 0.5),
    "bart-tied": ("BartForConditionalGeneration", "BartConfig", dict(BART, scale_embedding=True), 0.1, 0.5),
    "marian": ("MarianMTModel", "MarianConfig", dict(BART, scale_embedding=True, activation_function="swish"),
               0.03, 0.0),
    "marian-tied": ("MarianMTModel", "MarianConfig", dict(BART, scale_embedding=True, activation_function="swish"),
                    0.1, 0.0),
}
GENERATING = ("t5", "flan-t5", "bart", "marian")
UNTIED = ("flan-t5", "bart", "marian")  # saved as transformers 4 did: every embedding copy, a separate head


def _hf_model(name: str, **changes):
    """A random transformers model of FAMILIES[name] (seeded), every weight off its initial
    value (norms off 1, biases and final_logits_bias off 0), and its tokenizer."""
    model_cls, config_cls, kwargs, std, position_std = FAMILIES[name]
    t5 = name.startswith(("t5", "flan-t5"))
    tok = hf_tokenizer(300, bos=None) if t5 else hf_tokenizer(300)  # T5: <pad> 0, </s> 1; else <pad>, <s>, </s>
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if name.startswith("bart"):
        ids.update(bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id)
    else:  # T5 and Marian start from pad
        ids["decoder_start_token_id"] = tok.pad_token_id
    config = getattr(transformers, config_cls)(vocab_size=len(tok), **{**kwargs, **ids, **changes})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "embed_positions" in key and name.startswith("marian"):
                continue  # Marian's sinusoid table is fixed, and not saved
            if "relative_attention_bias" in key or "embed_positions" in key:
                param.normal_(0.0, position_std)
            elif param.dim() == 2:
                param.normal_(0.0, std)
            else:  # norm weights around 1, biases around 0
                param.copy_(float(key.endswith("norm.weight")) + 0.2 * torch.randn_like(param))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0.0, 0.1)
    return model, tok


def _untie(folder: Path) -> None:
    """An untied folder as transformers 4 saved one: tie_word_embeddings false, a separate
    lm_head.weight, and the shared embedding stored again for each stack."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    base = "model." if "model.shared.weight" in tensors else ""
    shared = tensors[f"{base}shared.weight"]
    for stack in ("encoder", "decoder"):
        tensors[f"{base}{stack}.embed_tokens.weight"] = shared.clone()
    tensors["lm_head.weight"] = torch.randn_like(shared) * 0.3
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _edit_config(folder, lambda d: (d.update(tie_word_embeddings=False), d.pop("scale_decoder_outputs", None)))


def _edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """FAMILIES[name] saved as a Hugging Face folder, made once: folders(name) -> (reference,
    tokenizer, path); the reference is transformers' model loaded back from the folder."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            model, tok = _hf_model(name)
            folder = save_hf(model, tok, tmp_path_factory.mktemp(name))
            if name in UNTIED:
                _untie(folder)
            reference = type(model).from_pretrained(folder).eval()
            made[name] = (reference, tok, folder)
        return made[name]

    return get


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(text)["input_ids"] for text in texts]


def _padded(tok, texts: list[str]):
    tok.padding_side = "right"  # how seq2seq sources are batched
    return tok(texts, return_tensors="pt", padding=True)


def _hf_generate(model, tok, texts: list[str]) -> list[list[int]]:
    batch = _padded(tok, texts)
    with torch.no_grad():  # without its cache: transformers' cache assumes as many decoder layers as encoder ones
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=False)
    return out[:, 1:].tolist()  # without the decoder start token


# --------------------------------------------------------------------------------------------
# Eager: our imported model against transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_eager_logits_equal_transformers(folders, name):
    reference, tok, folder = folders(name)
    imported = load_hf(folder)
    model, start = imported.model, imported.config.start_token_id
    batch = _padded(tok, SOURCES)  # a right-padded batch of sources with its mask
    targets = torch.tensor([[start] + _ids(tok, ["five naive sea."])[0]] * len(SOURCES))
    with torch.no_grad():
        want = reference(**batch, decoder_input_ids=targets).logits
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        got = model.decode(targets, cross_kv=model.cross_kv(hidden),
                           encoder_attention_mask=batch["attention_mask"]).logits
    assert want.abs().max().item() > 1.0  # a model whose logits say something
    assert (got - want).abs().max().item() <= ATOL
    # the same, one source at a time and decoding one token at a time through the cache
    ids = torch.tensor(_ids(tok, SOURCES[1:2]))
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=targets[:1]).logits
        cross, past, rows = model.cross_kv(model.encode(ids)), None, []
        for t in range(targets.shape[1]):
            out = model.decode(targets[:1, t:t + 1], position_ids=torch.tensor([[t]]), past=past, cross_kv=cross)
            past = out.present
            rows.append(out.logits)
    assert (torch.cat(rows, dim=1) - want).abs().max().item() <= ATOL
    assert imported.package.source["model_type"] == reference.config.model_type
    assert imported.package.special_tokens["decoder_start"] == reference.config.decoder_start_token_id


def test_what_each_family_converts_to(folders):
    """The config fields the families set; each checkpoint tensor used or dropped with its reason."""
    t5 = load_hf(folders("t5")[2]).config
    assert (t5.pos_encoding, t5.attn_scale, t5.norm, t5.activation, t5.bias) == ("relative", 1.0, "rmsnorm", "relu", False)
    assert t5.tie_embeddings and t5.logit_scale == pytest.approx(32 ** -0.5) and t5.decoder_start_token_id == 0
    assert (t5.relative_buckets, t5.relative_max_distance, t5.n_layers, t5.n_decoder_layers) == (8, 16, 2, 3)
    flan = load_hf(folders("flan-t5")[2])
    assert (flan.config.activation, flan.config.head_dim, flan.config.tie_embeddings) == ("geglu", 16, False)
    assert flan.config.logit_scale == 1.0  # an untied T5 head is not scaled
    bart = load_hf(folders("bart-tied")[2]).config
    assert (bart.pos_encoding, bart.pos_offset, bart.separate_decoder_positions, bart.norm_position) == \
        ("learned", 2, True, "post")
    assert bart.has_embedding_norm and bart.logits_bias and bart.tie_embeddings and bart.decoder_start_token_id == 2
    assert bart.embed_scale == pytest.approx(32 ** 0.5) and not load_hf(folders("bart")[2]).config.tie_embeddings
    marian = load_hf(folders("marian-tied")[2]).config
    assert (marian.pos_encoding, marian.sinusoid_layout, marian.has_embedding_norm) == ("sinusoidal", "halves", False)
    assert marian.embed_scale == pytest.approx(32 ** 0.5) and marian.activation == "silu"


def test_stored_copies_of_the_embedding_are_checked(folders, tmp_path):
    """Older checkpoints store the shared embedding again per stack (and as a tied head): the
    copies are read and must be equal; a differing one is refused by name."""
    from safetensors.torch import load_file, save_file

    reference, tok, folder = folders("bart-tied")
    copy = Path(shutil.copytree(folder, tmp_path / "copies"))
    tensors = load_file(copy / "model.safetensors")
    shared = tensors["model.shared.weight"]
    for key in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = shared.clone()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    imported = load_hf(copy)
    assert torch.equal(imported.model.tok_emb.weight, shared) and not imported.dropped
    tensors["model.decoder.embed_tokens.weight"] = shared + 1
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.decoder.embed_tokens.weight differs from model.shared.weight"):
        load_hf(copy)


def test_t5_cross_attention_bias_is_dropped_with_the_reason(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(folders("t5")[2], tmp_path / "t5"))
    tensors = load_file(folder / "model.safetensors")
    name = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    tensors[name] = torch.zeros(8, 4)  # some T5 checkpoints carry it; T5 never applies it
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert "never applies" in load_hf(folder).dropped[name]


@pytest.mark.parametrize("name, change, key", [
    ("bart", dict(decoder_attention_heads=2), "decoder_attention_heads"),
    ("bart", dict(normalize_before=True), "normalize_before"),
    ("marian", dict(share_encoder_decoder_embeddings=False), "share_encoder_decoder_embeddings"),
    ("t5", dict(feed_forward_proj="gated-relu", dense_act_fn="relu", is_gated_act=True), "feed_forward_proj"),
    ("t5", dict(architectures=["T5EncoderModel"]), "architectures"),
])
def test_settings_it_does_not_implement_are_refused_by_name(folders, tmp_path, name, change, key):
    folder = Path(shutil.copytree(folders(name)[2], tmp_path / name))
    _edit_config(folder, lambda d: d.update(change))
    with pytest.raises(CheckpointError, match=f"{key}=") as err:
        load_hf(folder)
    assert err.value.code == "E_UNSUPPORTED"


# --------------------------------------------------------------------------------------------
# The package: the traced graphs, their logits, greedy tokens in Python and Node
# --------------------------------------------------------------------------------------------

def _node_generate(package: Path, prompts: list[list[int]]) -> tuple[list, list]:
    return node_generate(package, prompts, NEW_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATING)
def test_package_generates_like_transformers(folders, tmp_path, name):
    reference, tok, folder = folders(name)
    report = export_checkpoint(folder, tmp_path / "pkg")
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert report.decoder_graph == manifest["producer"]["decoder_graph"] == "traced"  # the builder refuses them
    figures = report.validation["float32"]
    assert figures["worst_abs_diff"] <= ATOL and figures["greedy_match"]

    package = rt.load(report.path, threads=1)
    sources = _ids(tok, SOURCES)
    batch = _padded(tok, SOURCES)
    start = torch.full((len(SOURCES), 1), reference.config.decoder_start_token_id)
    with torch.no_grad():
        want = reference(**batch, decoder_input_ids=start).logits[:, -1].numpy()
    np.testing.assert_allclose(np.array(package.step_model().prefill(sources).logits), want, atol=ATOL, rtol=0)

    want_one, want_batch = _hf_generate(reference, tok, SOURCES[:1]), _hf_generate(reference, tok, SOURCES)
    assert len(want_one[0]) == NEW_TOKENS and len({t for row in want_batch for t in row}) > 2  # not one token
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert [g.token_ids[0] for g in package.generate_ids(sources[:1], **options)] == want_one
    assert [g.token_ids[0] for g in package.generate_ids(sources, **options)] == want_batch
    assert package.generate(SOURCES[:1], **options)[0].token_ids[0] == want_one[0]  # text in, the same ids
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")
    assert _node_generate(report.path, sources) == (want_one, want_batch)


@pytest.mark.parametrize("name, bare", [("bart-tied", "BartModel"), ("marian-tied", "MarianModel")])
def test_a_bare_model_imports_as_transformers_loads_it_for_generation(tmp_path, name, bare):
    """A BartModel / MarianModel folder (no head, no final_logits_bias, no `model.` prefix):
    the tied embedding is the head and the bias zero, as AutoModelForSeq2SeqLM loads it."""
    model, tok = _hf_model(name)
    base = getattr(transformers, bare)(model.config)
    base.load_state_dict(model.model.state_dict())
    folder = save_hf(base, tok, tmp_path / bare)
    reference = type(model).from_pretrained(folder).eval()
    imported = load_hf(folder)
    ids, targets = torch.tensor(_ids(tok, SOURCES[1:2])), torch.tensor([[imported.config.start_token_id, 5, 6, 7]])
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=targets).logits
        got = imported.model.decode(targets, cross_kv=imported.model.cross_kv(imported.model.encode(ids))).logits
    assert (got - want).abs().max().item() <= ATOL
    assert not imported.model.lm_head.bias.any()


def test_the_fields_these_families_added_are_checked_and_refused_by_the_builder(folders):
    """separate_decoder_positions needs an encoder-decoder with learned positions; the built
    decoder graph refuses it by name (the exporter traces instead); Marian's [sin | cos] table
    is ours with its columns reordered."""
    from onnxformer.export import builder
    from onnxformer.modeling.config import ModelConfig
    from onnxformer.modeling.model import Transformer, sinusoidal_table
    from onnxformer.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="separate_decoder_positions applies to arch 'encoder-decoder'"):
        ModelConfig(arch="decoder", pos_encoding="learned", separate_decoder_positions=True)
    with pytest.raises(ConfigError, match="sinusoid_layout must be one of"):
        ModelConfig(pos_encoding="sinusoidal", sinusoid_layout="split")
    bart = load_hf(folders("bart")[2]).model
    assert "separate_decoder_positions True is not implemented" in builder.unsupported_reason(bart)
    interleaved, halves = sinusoidal_table(10, 8), sinusoidal_table(10, 8, "halves")
    assert torch.equal(halves, torch.cat([interleaved[:, 0::2], interleaved[:, 1::2]], dim=1))
    tiny = Transformer(ModelConfig(arch="encoder-decoder", vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                                   pos_encoding="learned", pos_offset=2, separate_decoder_positions=True,
                                   norm_position="post", max_seq_len=8))
    assert tiny.decoder_embedding["pos_emb"].weight.shape == (10, 16) and "emb_norm" in tiny.decoder_embedding
