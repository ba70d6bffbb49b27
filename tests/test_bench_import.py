"""benchmarks/bench_import.py's folder: what transformers saves is the model the benchmark says
(shape, tokenizer of exactly vocab_size tokens that adds <s>), and onnxformer imports it with
transformers' logits. Tiny size only; the export and the peers are benchmarks, not tests."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the benchmark's folder is built with transformers")

import torch  # noqa: E402

from benchmarks.bench_import import BOS, SIZES, make_hf_folder  # noqa: E402


@pytest.mark.slow  # ~1-2 s: transformers builds, saves and reloads the model
def test_tiny_folder_is_the_stated_llama_and_imports(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from onnxformer.modeling.hf_import import load_hf

    folder = tmp_path / "hf"
    info = make_hf_folder(folder, "tiny")
    shape = SIZES["tiny"]
    assert info["dtype"] == "fp32" and info["fp32_bytes"] == 4 * info["num_parameters"]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == shape["vocab_size"]
    ids = tokenizer.encode("w3 a w3").ids
    assert ids[0] == BOS and ids[1] == ids[3] and len(ids) == 4

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.config.num_hidden_layers == shape["num_hidden_layers"]
    assert hf.config.num_key_value_heads == shape["num_key_value_heads"]
    assert not hf.config.tie_word_embeddings
    assert sum(p.numel() for p in hf.parameters()) == info["num_parameters"]

    imported = load_hf(folder)
    batch = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        want = hf(input_ids=batch).logits
        got = imported.model.decode(batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
