"""The Hugging Face import's framework (modeling/hf_import.py), on tiny Llama folders built
with transformers: every weight file layout it reads (one safetensors file, shards with their
index, a weights-only pytorch_model.bin), what it refuses (a pickled .bin, an unknown
model_type, a config key it does not understand), and the accounting of every tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_support import hf_tokenizer, save_hf, torch, transformers

from onnxformer.modeling.hf_import import FAMILIES, is_hf_dir, load_hf, read_hf_config
from onnxformer.runtime.errors import CheckpointError


def llama(**overrides):
    config = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(config | overrides))).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, object]:
    model = llama()
    return save_hf(model, hf_tokenizer(), tmp_path_factory.mktemp("hf") / "llama"), model


def copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def edit_config(directory: Path, change) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def logits_of(model, ids) -> "torch.Tensor":
    with torch.no_grad():
        return model.decode(torch.tensor([ids])).logits


IDS = [1, 17, 40, 90, 120, 33]


def reference(model) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits


def test_a_folder_is_recognised_and_ours_is_not(folder, tmp_path):
    assert is_hf_dir(folder[0])
    (tmp_path / "config.json").write_text(json.dumps({"arch": "decoder", "vocab_size": 10}))  # our checkpoint's
    assert not is_hf_dir(tmp_path) and not is_hf_dir(tmp_path / "missing")


def test_one_file_shards_and_weights_only_bin_import_the_same_model(folder, tmp_path):
    directory, model = folder
    want = reference(model)
    assert torch.allclose(logits_of(load_hf(directory).model, IDS), want, atol=1e-5)

    sharded = tmp_path / "sharded"  # several safetensors shards and their index
    model.save_pretrained(sharded, max_shard_size="100KB")
    hf_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    assert torch.allclose(logits_of(load_hf(sharded).model, IDS), want, atol=1e-5)

    binary = copy(directory, tmp_path / "bin")  # a plain state dict: torch.load(weights_only=True) reads it
    from safetensors.torch import load_file
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    assert torch.allclose(logits_of(load_hf(binary).model, IDS), want, atol=1e-5)


class _Payload:
    """A pickled object: what weights_only refuses (it would run code when unpickled)."""


def test_a_bin_holding_python_objects_is_refused_with_the_reason(folder, tmp_path):
    binary = copy(folder[0], tmp_path)
    (binary / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(3), "extra": _Payload()}, binary / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        load_hf(binary)
    assert "safetensors" in str(err.value)


def test_no_weights_is_named(folder, tmp_path):
    empty = copy(folder[0], tmp_path)
    (empty / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights: expected model.safetensors") as err:
        load_hf(empty)
    assert err.value.code == "E_MISSING_FILE"


def test_unknown_model_type_lists_the_supported_ones(folder, tmp_path):
    directory = copy(folder[0], tmp_path)
    edit_config(directory, lambda d: d.update(model_type="mamba"))
    with pytest.raises(CheckpointError, match="model_type 'mamba'") as err:
        load_hf(directory)
    assert err.value.code == "E_UNSUPPORTED" and all(t in str(err.value) for t in sorted(FAMILIES)[:3])


@pytest.mark.parametrize("key, value", [("attn_logit_softcapping", 50.0), ("is_decoder", True),
                                        ("pruned_heads", {"0": [1]})])
def test_a_config_key_that_may_change_the_math_is_refused_by_name(folder, tmp_path, key, value):
    directory = copy(folder[0], tmp_path)
    edit_config(directory, lambda d: d.update({key: value}))
    with pytest.raises(CheckpointError, match=f"config key\\(s\\) {key}=") as err:
        read_hf_config(directory)
    assert err.value.code == "E_UNSUPPORTED"


def test_harmless_keys_and_neutral_values_pass(folder, tmp_path):
    directory = copy(folder[0], tmp_path)
    edit_config(directory, lambda d: d.update(is_decoder=False, pruned_heads={}, use_cache=False,
                                              initializer_range=0.5, transformers_version="4.40.0"))
    read_hf_config(directory)


def test_every_tensor_is_used_and_the_tied_copy_is_reported(tmp_path):
    model = llama(tie_word_embeddings=True)
    directory = save_hf(model, hf_tokenizer(), tmp_path / "tied")
    imported = load_hf(directory)
    assert imported.config.tie_embeddings and imported.model.lm_head.weight is imported.model.tok_emb.weight
    assert torch.allclose(logits_of(imported.model, IDS), reference(model), atol=1e-5)
    from safetensors import safe_open
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert set(imported.dropped) <= stored  # what is dropped was in the file, each with its reason
    assert all(imported.dropped.values())


def test_fresh_prefixes_keep_their_initialisation(folder):
    imported = load_hf(folder[0], fresh=("decoder_norm.",))
    assert torch.equal(imported.model.decoder_norm.weight, torch.ones(64))  # RMSNorm's init, not the checkpoint's
    assert "model.norm.weight" in imported.dropped
