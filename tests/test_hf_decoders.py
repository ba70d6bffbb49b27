"""Decoder-only Hugging Face checkpoints (modeling/hf_decoders.py): Llama / Mistral / Qwen2 /
SmolLM and GPT-2, each a tiny random model built by `transformers` from a config and saved
with save_pretrained, then imported and exported. `transformers` is the reference throughout:
eager logits, the package's logits, and greedy tokens of its `generate` at batch 1 and in a
left-padded batch, through the Python and the Node runtime."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_support import hf_tokenizer, node_generate, save_hf, torch, transformers
from support import HAS_NODE, NODE_DIR

from onnxformer.export.exporter import export_checkpoint
from onnxformer.modeling.hf_import import load_hf
from onnxformer.runtime.errors import CheckpointError

import onnxformer.runtime as rt

NEW_TOKENS = 32
PROMPTS = ["one red cat.", "two green dog. three blue sun. four", "hello"]
LONG_PROMPT = "one red cat. two green dog. three blue sun. four cafe sea. five naive cat."
ATOL = 1e-4

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}
# name -> (config class, its arguments, the tokenizer's special tokens)
FAMILIES = {
    "llama": ("LlamaConfig", dict(LLAMA, tie_word_embeddings=False), {}),
    "llama-linear": ("LlamaConfig", dict(LLAMA, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                 "rope_theta": 10000.0}), {}),
    "llama3": ("LlamaConfig", dict(LLAMA, rope_parameters=LLAMA3), {}),
    # SmolLM's shape: tied embeddings; here also a head size apart from hidden / heads (32, not 16)
    "smollm": ("LlamaConfig", dict(LLAMA, tie_word_embeddings=True, head_dim=32), {}),
    # one K/V head (MQA); a sliding window as long as the longest sequence changes nothing
    "mistral": ("MistralConfig", dict(LLAMA, num_key_value_heads=1, sliding_window=128, head_dim=16), {}),
    # Qwen2.5's config names no pad or bos token (its tokenizer does)
    "qwen2": ("Qwen2Config", dict(LLAMA, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None), {}),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, initializer_range=0.2),
             dict(bos=None, eos="<|endoftext|>", pad=None, add_bos=False)),
}


def _tokenizer(specials: dict):
    return hf_tokenizer(300, **specials)


def _hf_model(name: str, **changes):
    """A random transformers model of FAMILIES[name] (seeded), with `changes` to its config."""
    cls, kwargs, specials = FAMILIES[name]
    tok = _tokenizer(specials)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = getattr(transformers, cls)(**{"vocab_size": len(tok), **ids, **kwargs, **changes})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """FAMILIES[name] saved as a Hugging Face folder, made once: folders(name) -> (model, tokenizer, path)."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            model, tok = _hf_model(name)
            made[name] = (model, tok, save_hf(model, tok, tmp_path_factory.mktemp(name)))
        return made[name]

    return get


def _left_padded(tok, texts: list[str]) -> dict:
    """input_ids, attention_mask and position_ids (counting real tokens only, as generate()
    does; a forward call without them would give GPT-2's learned positions to the pads)."""
    tok.padding_side = "left"
    if tok.pad_token is None:  # GPT-2 has none: pad with eos, as its users do
        tok.pad_token = tok.eos_token
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def _hf_logits(model, tok, texts: list[str]) -> np.ndarray:
    """transformers' logits at the last token of each text (left-padded batch), (B, V)."""
    batch = _left_padded(tok, texts)
    with torch.no_grad():
        return model(**batch).logits[:, -1].numpy()


def _hf_generate(model, tok, texts: list[str]) -> list[list[int]]:
    batch = _left_padded(tok, texts)
    with torch.no_grad():
        # generate() derives the positions from the mask itself; min_new_tokens: every row runs 32 tokens
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(text)["input_ids"] for text in texts]


# --------------------------------------------------------------------------------------------
# Eager: our imported model against transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_eager_logits_equal_transformers(folders, name):
    reference, tok, folder = folders(name)
    imported = load_hf(folder)
    ids = _ids(tok, [LONG_PROMPT])
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits
        got = imported.model.decode(torch.tensor(ids)).logits
    assert (got - want).abs().max().item() <= ATOL
    # a left-padded batch with its attention mask: every real position agrees
    batch = _left_padded(tok, PROMPTS)
    with torch.no_grad():
        want = reference(**batch).logits
        got = imported.model.decode(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max().item() <= ATOL
    assert imported.package.source["model_type"] == reference.config.model_type


def test_what_each_family_converts_to(folders):
    """The config fields the families set; a tied head is the embedding itself."""
    imported = {name: load_hf(folders(name)[2]) for name in ("llama", "smollm", "qwen2", "gpt2", "llama3")}
    configs = {name: i.config for name, i in imported.items()}
    assert configs["llama"].n_kv_heads == 2 and configs["llama"].head_dim is None
    assert not configs["llama"].tie_embeddings and imported["llama"].model.lm_head.weight is not \
        imported["llama"].model.tok_emb.weight
    assert imported["gpt2"].model.lm_head.weight is imported["gpt2"].model.tok_emb.weight
    assert configs["smollm"].tie_embeddings and configs["smollm"].head_dim == 32 and configs["smollm"].d_head == 32
    assert configs["qwen2"].has_qkv_bias and not configs["qwen2"].bias
    # ids config.json does not name are the tokenizer's (the package's pad and bos)
    assert (configs["qwen2"].pad_token_id, configs["qwen2"].bos_token_id, configs["qwen2"].eos_token_id) == (0, 1, 2)
    assert (gpt2_ids := (configs["gpt2"].pad_token_id, configs["gpt2"].eos_token_id)) == (-1, 0), gpt2_ids
    gpt2 = configs["gpt2"]
    assert (gpt2.pos_encoding, gpt2.activation, gpt2.norm, gpt2.bias, gpt2.tie_embeddings) == \
        ("learned", "gelu_tanh", "layernorm", True, True)
    assert configs["llama3"].rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}


@pytest.mark.parametrize("name", ["llama-linear", "llama3"])
def test_rope_scaling_matters_and_matches(folders, name):
    """The scaled model's logits differ from the same weights without scaling (so the test
    can see a scaling ignored), and equal transformers' scaled model."""
    reference, tok, folder = folders(name)
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    unscaled, _ = _hf_model(name, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    unscaled.load_state_dict(reference.state_dict())
    with torch.no_grad():
        ours = load_hf(folder).model.decode(ids).logits
        assert (ours - reference(ids).logits).abs().max().item() <= ATOL
        assert (ours - unscaled(ids).logits).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(folders, tmp_path, dtype):
    """Checkpoints as published (Llama, Qwen2 in bfloat16): read into float32, as transformers
    loads them with dtype=float32."""
    reference, tok, _ = folders("qwen2")
    folder = save_hf(copy.deepcopy(reference).to(getattr(torch, dtype)), tok, tmp_path / dtype)
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    upcast = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    with torch.no_grad():
        assert (load_hf(folder).model.decode(ids).logits - upcast(ids).logits).abs().max().item() <= ATOL


def _rewrite_config(folder: Path, change) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_transformers_4_rope_spelling(folders, tmp_path):
    """transformers 4.x configs: rope_theta at the top level and rope_scaling with 'type' (and
    the keys hub configs carry that transformers never reads, at neutral values)."""
    reference, tok, folder = folders("llama-linear")
    old = shutil.copytree(folder, tmp_path / "old")

    def to_4x(data):
        params = data.pop("rope_parameters")
        data["rope_theta"] = params["rope_theta"]
        data["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]}
        data.update(is_llama_config=True, rope_interleaved=False, _num_labels=1)  # SmolLM2, distilgpt2

    _rewrite_config(old, to_4x)
    imported = load_hf(old)
    assert imported.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    with torch.no_grad():
        assert (imported.model.decode(ids).logits - reference(ids).logits).abs().max().item() <= ATOL


def test_gpt2_buffers_of_older_checkpoints_are_dropped_with_the_reason(folders, tmp_path):
    """Older GPT-2 checkpoints (the hub's gpt2) store the causal-mask buffers attn.bias and
    attn.masked_bias: not weights, dropped and reported."""
    from safetensors.torch import load_file, save_file

    reference, tok, folder = folders("gpt2")
    old = shutil.copytree(folder, tmp_path / "old")
    tensors = load_file(old / "model.safetensors")
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    imported = load_hf(old)
    assert set(imported.dropped) == {f"transformer.h.{i}.attn.{b}" for i in range(2) for b in ("bias", "masked_bias")}
    assert all("causal-mask buffers" in reason for reason in imported.dropped.values())
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    with torch.no_grad():
        assert (imported.model.decode(ids).logits - reference(ids).logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("changes", [dict(activation_function="gelu"), dict(activation_function="relu"),
                                     dict(scale_attn_weights=False), dict(reorder_and_upcast_attn=True),
                                     dict(tie_word_embeddings=False)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpt2_variants(tmp_path, changes):
    """The GPT-2 settings that change the math and are implemented (reorder_and_upcast_attn is
    the same math in float32)."""
    reference, tok = _hf_model("gpt2", **changes)
    reference.config._attn_implementation = "eager"  # where transformers applies reorder_and_upcast_attn
    imported = load_hf(save_hf(reference, tok, tmp_path / "gpt2"))
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    with torch.no_grad():
        assert (imported.model.decode(ids).logits - reference(ids).logits).abs().max().item() <= ATOL


# --------------------------------------------------------------------------------------------
# The package: the built graph, its logits, greedy tokens in Python and Node
# --------------------------------------------------------------------------------------------

def _node_generate(package: Path, prompts: list[list[int]]) -> tuple[list, list]:
    return node_generate(package, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def packages(folders, tmp_path_factory):
    """export_checkpoint of folders(name), made once: packages(name) -> ExportReport."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = export_checkpoint(folders(name)[2], tmp_path_factory.mktemp(f"{name}-package") / "pkg")
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "llama-linear"])  # llama3 exports scaling
def test_package_generates_like_transformers(folders, packages, name):
    reference, tok, _ = folders(name)
    report = packages(name)
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert report.decoder_graph == manifest["producer"]["decoder_graph"] == "built"
    assert manifest["kv_cache"] == "shared"
    figures = report.validation["float32"]
    assert figures["worst_abs_diff"] <= ATOL and figures["greedy_match"]

    package = rt.load(report.path, threads=1)
    prompts = _ids(tok, PROMPTS)
    # the package's logits at each prompt's last token, and after one more token, vs transformers
    steps = package.step_model()
    first = np.array(steps.prefill(prompts).logits)
    np.testing.assert_allclose(first, _hf_logits(reference, tok, PROMPTS), atol=ATOL, rtol=0)
    chosen = first.argmax(-1)
    second = np.array(steps.advance(chosen).logits)  # through the KV cache
    with torch.no_grad():
        rows = [reference(torch.tensor([p + [int(c)]])).logits[0, -1].numpy() for p, c in zip(prompts, chosen)]
    np.testing.assert_allclose(second, np.stack(rows), atol=ATOL, rtol=0)

    want_one, want_batch = _hf_generate(reference, tok, PROMPTS[:1]), _hf_generate(reference, tok, PROMPTS)
    assert len(want_one[0]) == NEW_TOKENS
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert [g.token_ids[0] for g in package.generate_ids(prompts[:1], **options)] == want_one
    assert [g.token_ids[0] for g in package.generate_ids(prompts, **options)] == want_batch
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")
    assert _node_generate(report.path, prompts) == (want_one, want_batch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])  # a BOS added by the tokenizer, and none
def test_cli_text_prompts_generate_like_transformers(folders, packages, name):
    """What a user types: text prompts through `onnxformer generate` and `node cli.js generate`
    (each runtime's own tokenizer), the same tokens as transformers' tokenizer and generate."""
    reference, tok, _ = folders(name)
    package = packages(name).path
    want = _hf_generate(reference, tok, PROMPTS)
    args = ["generate", str(package), *PROMPTS, "--json", "--max-new-tokens", str(NEW_TOKENS),
            "--min-new-tokens", str(NEW_TOKENS)]
    commands = [[sys.executable, "-m", "onnxformer.runtime.cli", *args]]
    if HAS_NODE:
        commands.append(["node", str(NODE_DIR / "cli.js"), *args])
    for command in commands:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        results = json.loads(out.stdout)
        assert [r["prompt"] for r in results] == PROMPTS
        assert [r["token_ids"][0] for r in results] == want, command[0]
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """A row of transformers' batch output up to its first eos (inclusive): pads follow it."""
    stops = [k for k, t in enumerate(tokens) if t in eos]
    return tokens[:stops[0] + 1] if stops else tokens


@pytest.mark.slow
def test_several_eos_ids_stop_as_in_transformers(folders, tmp_path):
    """generation_config.json's eos_token_id list (Llama 3 has three) carried into the package:
    default generation stops where transformers' does. The second eos is a token the model
    generates, so some rows stop early and others run to the limit."""
    _, tok, folder = folders("llama")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    stop = _hf_generate(reference, tok, PROMPTS[:1])[0][4]
    copy = shutil.copytree(folder, tmp_path / "eos")
    settings = json.loads((copy / "generation_config.json").read_text())
    settings["eos_token_id"] = eos = [tok.eos_token_id, stop]
    (copy / "generation_config.json").write_text(json.dumps(settings))
    reference = transformers.AutoModelForCausalLM.from_pretrained(copy).eval()
    batch = _left_padded(tok, PROMPTS)
    with torch.no_grad():
        out = reference.generate(batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
    want = [_until_eos(row, eos) for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    assert len(want[0]) < NEW_TOKENS
    report = export_checkpoint(copy, tmp_path / "pkg")
    got = rt.load(report.path, threads=1).generate_ids(_ids(tok, PROMPTS), max_new_tokens=NEW_TOKENS)
    assert [g.token_ids[0] for g in got] == want
    assert [g.finish_reasons[0] for g in got] == ["eos" if len(w) < NEW_TOKENS or w[-1] in eos else "length"
                                                   for w in want]


@pytest.mark.slow
@pytest.mark.parametrize("name, changes, graph", [
    ("gpt2", dict(scale_attn_weights=False), "built"),  # attn_scale 1.0 in the attention node
    ("gpt2", dict(activation_function="relu", tie_word_embeddings=False), "traced"),  # relu: not in the builder
    ("llama", dict(attention_bias=True, mlp_bias=True), "built"),  # biases everywhere
], ids=["gpt2-unscaled-attention", "gpt2-relu-untied", "llama-biases"])
def test_variant_packages(tmp_path, name, changes, graph):
    """Settings the built graph implements get it; one it does not (relu) gets the traced graph,
    fail-closed, and the manifest says which. Both validated against the model like every export."""
    reference, tok = _hf_model(name, **changes)
    folder = save_hf(reference, tok, tmp_path / name)
    ids = torch.tensor(_ids(tok, [LONG_PROMPT]))
    with torch.no_grad():
        assert (load_hf(folder).model.decode(ids).logits - reference(ids).logits).abs().max().item() <= ATOL
    report = export_checkpoint(folder, tmp_path / "pkg")
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert report.decoder_graph == manifest["producer"]["decoder_graph"] == graph
    figures = report.validation["float32"]
    assert figures["worst_abs_diff"] <= ATOL and figures["greedy_match"]
    package = rt.load(report.path, threads=1)
    want = _hf_generate(reference, tok, PROMPTS)
    got = package.generate_ids(_ids(tok, PROMPTS), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert [g.token_ids[0] for g in got] == want


# --------------------------------------------------------------------------------------------
# Bad input: a CheckpointError with its code, and nothing written to OUT
# --------------------------------------------------------------------------------------------


def _refused(folder: Path, tmp_path: Path, code: str, *fragments: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        export_checkpoint(folder, out)
    message = str(err.value)
    assert err.value.code == code, message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists() and not list(tmp_path.glob(".out*")), "export left files behind"
    return message


@pytest.fixture
def copy_of(folders, tmp_path):
    def copy(name: str) -> Path:
        return shutil.copytree(folders(name)[2], tmp_path / f"{name}-copy")

    return copy


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unknown_rope_type(copy_of, tmp_path, rope_type):
    folder = copy_of("llama")
    _rewrite_config(folder, lambda d: d.update(rope_parameters={"rope_type": rope_type, "factor": 2.0,
                                                                "rope_theta": 10000.0}))
    _refused(folder, tmp_path, "E_UNSUPPORTED", "rope_parameters", f"rope_type {rope_type!r} is not implemented",
             "'linear'", "'llama3'")


def test_both_rope_spellings(copy_of, tmp_path):
    """rope_parameters and a rope_scaling beside it: refused (which one was meant is unknown);
    a null rope_scaling beside it changes nothing."""
    folder = copy_of("llama3")
    _rewrite_config(folder, lambda d: d.update(rope_scaling=None))
    assert load_hf(folder).config.rope_scaling["rope_type"] == "llama3"
    _rewrite_config(folder, lambda d: d.update(rope_scaling={"type": "linear", "factor": 2.0}))
    _refused(folder, tmp_path, "E_UNSUPPORTED", "rope_scaling=", "also has rope_parameters")


def test_rope_4x_unknown_type(copy_of, tmp_path):
    folder = copy_of("llama")
    _rewrite_config(folder, lambda d: (d.pop("rope_parameters"),
                                       d.update(rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})))
    _refused(folder, tmp_path, "E_UNSUPPORTED", "rope_scaling", "'dynamic'")


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_active_sliding_window(copy_of, tmp_path, name):
    folder = copy_of(name)

    def window(d):
        d["sliding_window"] = 16
        if name == "qwen2":  # Qwen2's switch, and transformers 5's per-layer kinds
            d.update(use_sliding_window=True, max_window_layers=1, layer_types=["full_attention", "sliding_attention"])

    _rewrite_config(folder, window)
    message = _refused(folder, tmp_path, "E_UNSUPPORTED", "sliding_window=16", "max_position_embeddings (128)",
                       "set max_position_embeddings to 16")
    assert ("layers [1]" if name == "qwen2" else "layers [0, 1]") in message
    # the fix it names works: no sequence reaches past the window
    _rewrite_config(folder, lambda d: d.update(max_position_embeddings=16))
    assert load_hf(folder).config.max_seq_len == 16


def test_qwen2_window_switched_off_is_full_attention(copy_of):
    folder = copy_of("qwen2")
    _rewrite_config(folder, lambda d: d.update(sliding_window=16, use_sliding_window=False))
    assert load_hf(folder).config.max_seq_len == 128


def _rewrite_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_missing_tensors_are_named(copy_of, tmp_path, name):
    """Every tensor of a layer gone (9 for Llama, 12 for GPT-2): the count, and the first ten by name."""
    folder = copy_of(name)
    layer = "model.layers.1." if name == "llama" else "transformer.h.1."
    gone: list[str] = []

    def drop(tensors):
        gone.extend(sorted(k for k in tensors if k.startswith(layer)))
        for key in gone:
            del tensors[key]

    _rewrite_tensors(folder, drop)
    message = _refused(folder, tmp_path, "E_CHECKPOINT", f"{len(gone)} tensor(s) missing", "incomplete")
    named = message.split("missing from the checkpoint (", 1)[1].split(")", 1)[0].removesuffix(", ...").split(", ")
    assert named == gone[:10] and len(gone) == (9 if name == "llama" else 12)


def test_extra_tensor_is_named(copy_of, tmp_path):
    folder = copy_of("llama")
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    _refused(folder, tmp_path, "E_CHECKPOINT", "model.layers.0.self_attn.q_norm.weight", "does not use")


def test_shard_index_naming_a_missing_shard(folders, tmp_path):
    reference, tok, _ = folders("qwen2")
    folder = tmp_path / "sharded"
    reference.save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert load_hf(folder).config.n_layers == 2  # whole, it imports
    (folder / shards[-1]).unlink()
    _refused(folder, tmp_path, "E_MISSING_FILE", shards[-1], "copy every shard")


def test_no_tokenizer_json(copy_of, tmp_path):
    folder = copy_of("gpt2")
    (folder / "tokenizer.json").unlink()
    _refused(folder, tmp_path, "E_TOKENIZER", "tokenizer.json")


def test_tokenizer_larger_than_the_embedding(tmp_path):
    reference, tok = _hf_model("llama", vocab_size=200)  # the tokenizer has 300 tokens
    folder = save_hf(reference, tok, tmp_path / "small-vocab")
    _refused(folder, tmp_path, "E_TOKENIZER", "299", "200 rows")


@pytest.mark.parametrize("key, value, fragment", [
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("activation_function", "quick_gelu", "activation_function='quick_gelu'"),
    ("architectures", ["GPT2DoubleHeadsModel"], "GPT2DoubleHeadsModel"),
])
def test_gpt2_settings_refused_by_name(copy_of, tmp_path, key, value, fragment):
    folder = copy_of("gpt2")
    _rewrite_config(folder, lambda d: d.update({key: value}))
    _refused(folder, tmp_path, "E_UNSUPPORTED", fragment)


@pytest.mark.parametrize("changes, fragment", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(attention_bias=True), "mlp_bias=False"),
    (dict(rope_interleaved=True), "rope_interleaved=True"),
    (dict(sliding_window=16), "sliding_window=16"),  # Llama has none: transformers ignores it, onnxformer refuses
])
def test_llama_settings_refused_by_name(copy_of, tmp_path, changes, fragment):
    folder = copy_of("llama")
    _rewrite_config(folder, lambda d: d.update(changes))
    _refused(folder, tmp_path, "E_UNSUPPORTED", fragment)
