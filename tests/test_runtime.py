"""The torch-free runtime on freshly exported packages, held to the PyTorch reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="these tests export packages and compare with PyTorch")
import torch  # noqa: E402

import onnxformer.runtime as rt  # noqa: E402
from onnxformer.modeling.generate import generate as torch_generate  # noqa: E402
from onnxformer.runtime import ConfigError, GenerationConfig, InputError, PackageError, ProviderError  # noqa: E402

DECODERS = ["decoder", "prefix-lm", "encoder-decoder"]
PROMPTS = ["the cat sat", "one two three four five", "héllo wörld 你好"]


def reference(model, ids, config):
    return torch_generate(model, ids, config)


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_text_generation_equals_pytorch(package_factory, arch):
    model, _, report = package_factory(arch)
    package = rt.load(report.path)
    config = package.generation_config(max_new_tokens=10)
    ids = package.encode(PROMPTS)
    want = reference(model, ids, config)
    batched = package.generate(PROMPTS, config)
    assert [g.token_ids for g in batched] == want
    for prompt, expected in zip(PROMPTS, want):  # batch 1 == batched
        assert package.generate(prompt, config)[0].token_ids == expected
    assert batched[0].text == package.decode(want[0][0])


@pytest.mark.parametrize("arch", DECODERS)
def test_beam_search_equals_pytorch(package_factory, arch):
    model, _, report = package_factory(arch)
    package = rt.load(report.path)
    ids = package.encode(PROMPTS)
    for beam in (
        GenerationConfig(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=8, length_penalty=1.0),
        GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=6, early_stopping=True,
                         eos_token_ids=(package.manifest.special("eos"),), no_repeat_ngram_size=2),
    ):
        beam = package.generation_config(beam)  # the package's eos where the config leaves it unset
        want = reference(model, ids, beam)
        got = [g.token_ids for g in package.generate_ids(ids, beam)]
        assert got == want
        assert [package.generate_ids([row], beam)[0].token_ids for row in ids] == want  # alone == batched


@pytest.mark.parametrize("arch", DECODERS)
def test_penalties_match_pytorch(package_factory, arch):
    model, _, report = package_factory(arch)
    package = rt.load(report.path)
    ids = package.encode(PROMPTS)
    config = package.generation_config(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2,
                                       min_new_tokens=3)
    assert [g.token_ids for g in package.generate_ids(ids, config)] == reference(model, ids, config)


def test_seeded_sampling_is_reproducible(package_factory):
    _, _, report = package_factory("decoder")
    package = rt.load(report.path)
    config = GenerationConfig(strategy="sample", temperature=1.3, top_k=40, top_p=0.9, seed=5,
                              max_new_tokens=10, num_return_sequences=3)
    a = package.generate(PROMPTS, config)
    assert a == package.generate(PROMPTS, config)
    assert [g.token_ids for g in a] != [g.token_ids for g in package.generate(PROMPTS, config.replace(seed=6))]
    assert all(len(g.texts) == 3 for g in a)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_streaming_yields_the_generated_text(package_factory, arch):
    _, _, report = package_factory(arch)
    package = rt.load(report.path)
    for prompt in PROMPTS:
        pieces = list(package.stream(prompt, max_new_tokens=12))
        assert "".join(pieces) == package.generate(prompt, max_new_tokens=12)[0].text
        assert all(pieces)  # (split UTF-8 characters: tests/test_generation_numpy.py)


def test_classification_and_embeddings_match_pytorch(package_factory):
    model, tok, report = package_factory("encoder", "learned")
    package = rt.load(report.path)
    texts = ["the cat sat on the mat", "naïve café 🙂", "one"]
    results = package.classify(texts, batch_size=2)
    vectors_mean = package.embed(texts, normalize=False)
    vectors_cls = package.embed(texts, pooling="cls")
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok.encode(text)
            ids, types = torch.tensor([enc.ids]), torch.tensor([enc.type_ids])
            hidden = model.encode(ids, token_type_ids=types)
            probs = model.classify(hidden).softmax(-1)[0].numpy()
            got = np.array(list(results[i].probabilities.values()))
            np.testing.assert_allclose(got, probs, atol=1e-4)
            assert results[i].label == package.label_names[int(probs.argmax())]
            np.testing.assert_allclose(vectors_mean[i], hidden[0].mean(0).numpy(), atol=1e-4)
            cls = hidden[0, 0].numpy()
            np.testing.assert_allclose(vectors_cls[i], cls / np.linalg.norm(cls), atol=1e-4)
    assert np.allclose(np.linalg.norm(package.embed(texts), axis=1), 1.0, atol=1e-5)


def test_encoder_decoder_cross_attention_computed_once(package_factory, monkeypatch):
    _, _, report = package_factory("encoder-decoder")
    package = rt.load(report.path)
    calls = {"cross": 0, "steps": 0}
    cross = package.sessions["cross_attention"]
    real_cross, real_step = cross.run_with_iobinding, package.sessions["decoder"].run_with_iobinding

    class Spy:
        def __init__(self, session, key, real):
            self.session, self.key, self.real = session, key, real

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run_with_iobinding(self, binding, *a):
            calls[self.key] += 1
            return self.real(binding, *a)

    package.sessions["cross_attention"] = Spy(cross, "cross", real_cross)
    package.sessions["decoder"] = Spy(package.sessions["decoder"], "steps", real_step)
    out = package.generate(PROMPTS, max_new_tokens=6, min_new_tokens=6)
    assert calls == {"cross": 1, "steps": 6} and all(len(g.token_ids[0]) == 6 for g in out)


def test_graphs_run_once_per_call_do_not_spin(package_factory):
    """An encoder-decoder's encoder and cross-attention sessions let their workers sleep after
    a run (spinning, they would take the cores of the decoder steps that follow); the decoder,
    and the only graph of any other package, keep onnxruntime's default."""
    def spins(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return True

    spinning = {}
    for arch in ("encoder-decoder", "decoder"):
        package = rt.load(package_factory(arch)[2].path)
        for name, session in package.sessions.items():
            spinning[f"{arch}/{name}"] = spins(session)
    assert spinning == {"encoder-decoder/encoder": False, "encoder-decoder/cross_attention": False,
                        "encoder-decoder/decoder": True, "decoder/decoder": True}


# --- errors --------------------------------------------------------------------------------


def test_wrong_package_kind_and_bad_inputs(package_factory):
    _, _, dec = package_factory("decoder")
    _, _, enc = package_factory("encoder", "learned")
    decoder, encoder = rt.load(dec.path), rt.load(enc.path)
    with pytest.raises(InputError, match="classify\\(\\) needs an encoder package"):
        decoder.classify(["x"])
    with pytest.raises(InputError, match="generate\\(\\) needs a decoder"):
        encoder.generate(["x"])
    with pytest.raises(InputError, match="the list is empty"):
        decoder.generate([])
    with pytest.raises(InputError, match="prompt 0 is empty|empty"):
        decoder.generate([""])
    with pytest.raises(InputError, match="must be a string"):
        encoder.classify(["ok", 3])
    long = "one two three " * 200
    with pytest.raises(InputError, match="this model takes at most"):
        decoder.generate(long, max_new_tokens=4)
    assert decoder.generate(long, max_new_tokens=4, truncate=True)[0].token_ids[0]
    with pytest.raises(InputError, match="out of range"):
        decoder.generate_ids([[1, 10**6]])
    with pytest.raises(ConfigError, match="top_p"):
        decoder.generate("x", strategy="sample", top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        decoder.generate("x", strategy="sample", temperature=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        decoder.generate("x", max_new_tokens=-1)
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        decoder.generate("x", topk=3)


def test_damaged_packages_are_refused(package_factory, tmp_path):
    _, _, report = package_factory("decoder")
    broken = tmp_path / "broken"
    shutil.copytree(report.path, broken)
    (broken / "decoder.onnx").write_bytes((broken / "decoder.onnx").read_bytes()[:1000])
    with pytest.raises(PackageError, match="decoder.onnx.*truncated or altered"):
        rt.load(broken)
    with pytest.raises(PackageError, match="'decoder.onnx' is not a valid ONNX|could not load 'decoder.onnx'"):
        rt.load(broken, verify=False)  # garbage never reaches the user as an onnxruntime trace
    (broken / "decoder.onnx").unlink()
    with pytest.raises(PackageError, match="'decoder.onnx' is missing"):
        rt.load(broken)
    manifest = json.loads((report.path / "manifest.json").read_text())
    manifest["format_version"] = 99
    shutil.copytree(report.path, tmp_path / "future")
    (tmp_path / "future" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="format_version 99 is not supported"):
        rt.load(tmp_path / "future")
    with pytest.raises(PackageError, match="not an onnxformer package"):
        rt.load(tmp_path)


def test_missing_provider_is_a_clear_error(package_factory):
    _, _, report = package_factory("decoder")
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("CUDA provider is installed here")
    with pytest.raises(ProviderError, match="not available in this onnxruntime build"):
        rt.load(report.path, provider="cuda")


# --- never torch ---------------------------------------------------------------------------


def test_runtime_works_when_torch_cannot_be_imported(package_factory):
    _, _, dec = package_factory("encoder-decoder")
    _, _, enc = package_factory("encoder", "learned")
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import onnxformer.runtime as rt
from onnxformer.runtime import cli
m = rt.load({str(dec.path)!r})
print(m.generate("the cat", max_new_tokens=3)[0].token_ids)
print(rt.load({str(enc.path)!r}).classify("the cat")[0].label)
assert "torch" not in [k for k, v in sys.modules.items() if v is not None]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[1] in ("negative", "neutral", "positive")


def test_cli_generate_classify_inspect(package_factory):
    _, _, dec = package_factory("decoder")
    _, _, enc = package_factory("encoder", "learned")
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "onnxformer.runtime.cli", *a],  # noqa: E731
                                          capture_output=True, text=True, **kw)
    out = run("generate", str(dec.path), "the cat", "one two", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [d["prompt"] for d in data] == ["the cat", "one two"]
    assert data[0]["token_ids"] == rt.load(dec.path).generate("the cat", max_new_tokens=4)[0].token_ids
    out = run("classify", str(enc.path), "--json", input="first text\nsecond text\n")  # stdin
    assert [d["text"] for d in json.loads(out.stdout)] == ["first text", "second text"]
    out = run("inspect", str(dec.path))
    assert "decoder.onnx" in out.stdout and "greedy matches" in out.stdout
    out = run("generate", str(dec.path), "x", "--strategy", "sample", "--top-p", "2")
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr
    out = run("classify", str(dec.path), "x")
    assert out.returncode == 2 and "needs an encoder package" in out.stderr


def test_explicit_config_wins_but_inherits_the_package_eos(package_factory):
    _, _, report = package_factory("decoder")
    package = rt.load(report.path)
    eos = package.manifest.special("eos")
    explicit = package.generation_config(GenerationConfig(strategy="greedy", max_new_tokens=32))
    assert explicit.max_new_tokens == 32 and explicit.eos_token_ids == (eos,)
    chosen = package.generation_config(GenerationConfig(max_new_tokens=3, eos_token_ids=(7,)), top_k=0)
    assert chosen.eos_token_ids == (7,) and chosen.max_new_tokens == 3
    assert package.generation_config().max_new_tokens == package.manifest.generation["max_new_tokens"]


def test_truncation_keeps_the_template_special_tokens(package_factory):
    _, _, dec = package_factory("decoder")
    _, _, enc = package_factory("encoder", "learned")
    decoder, encoder = rt.load(dec.path), rt.load(enc.path)
    long = "one two three four five " * 100
    (ids,) = decoder.encode([long], truncate=True, reserve=8)
    full = decoder.tokenizer.encode(long).ids
    assert len(ids) == decoder.manifest.max_seq_len - 8
    assert ids[0] == decoder.manifest.special("bos") and ids[1:] == full[-(len(ids) - 1):]  # <s> + the end
    (ids,) = encoder.encode([long], truncate=True)
    assert ids[0] == encoder.manifest.special("cls") and ids[-1] == encoder.manifest.special("sep")
    assert len(ids) == encoder.manifest.max_seq_len
    assert encoder.classify([long], truncate=True)[0].label in encoder.label_names
