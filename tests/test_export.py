"""Export: every architecture and positional encoding, checked against PyTorch independently
of the exporter's own validation (tests/export_checks.py); the choice of decoder producer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs the [train] extra (torch)")
import onnx  # noqa: E402
import torch  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxformer.export import builder, exporter  # noqa: E402
from onnxformer.export.exporter import ExportError, ExportOptions, export_model  # noqa: E402
from onnxformer.modeling.tokenizer import save_tokenizer  # noqa: E402
from onnxformer.runtime.contract import graph_specs  # noqa: E402
from onnxformer.runtime.errors import ValidationError  # noqa: E402
from onnxformer.runtime.manifest import Manifest, sha256_file  # noqa: E402

from export_checks import check_package  # noqa: E402
from support import REPO, make_model  # noqa: E402

ARCHS = ["encoder", "decoder", "encoder-decoder", "prefix-lm"]
GRAPHS = {
    "encoder": {"encoder.onnx"},
    "decoder": {"decoder.onnx"},
    "prefix-lm": {"decoder.onnx"},
    "encoder-decoder": {"encoder.onnx", "cross_attention.onnx", "decoder.onnx"},
}


@pytest.mark.parametrize(
    "arch, pos",
    [(a, "rope") for a in ARCHS] + [("decoder", "sinusoidal"), ("decoder", "learned"),
                                    ("encoder-decoder", "sinusoidal"), ("encoder", "learned"),
                                    ("prefix-lm", "learned")],
)
def test_export_validates_against_pytorch(package_factory, arch, pos):
    model, _, report = package_factory(arch, pos)
    package = report.path
    files = {p.name for p in package.iterdir()}
    assert files == GRAPHS[arch] | {"manifest.json", "tokenizer.json", "weights.onnx_data"}
    check_package(model, package)  # logits within 1e-4 and greedy tokens equal, computed here

    manifest = Manifest.load(package)
    assert manifest.validation == report.validation  # the exporter's figures travel with the package
    # d_model 32: head size 8, which the built graph does not take: every decoder here is traced
    assert report.decoder_graph == manifest.producer.get("decoder_graph") == (None if arch == "encoder" else "traced")
    assert manifest.opset == 18
    for name, entry in manifest.graphs.items():
        path = package / entry.file.file
        assert entry.file.sha256 == sha256_file(path)
        proto = onnx.load(str(path))
        opset = {o.domain: o.version for o in proto.opset_import}
        assert proto.ir_version <= 13 and opset.get("", opset.get("ai.onnx")) <= 26  # onnxruntime-node/web 1.30
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # the manifest's I/O is exactly the session's actual I/O
        assert [i.name for i in session.get_inputs()] == entry.spec.input_names
        assert [o.name for o in session.get_outputs()] == entry.spec.output_names
        assert entry.spec == graph_specs(manifest.dims)[name]
    if "decoder.onnx" in files:
        # one decoder graph, every weight stored once: no duplicate or transposed copies
        proto = onnx.load(str(package / "decoder.onnx"))
        arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.dims and np.prod(t.dims) > 256]
        payloads = [a.tobytes() for a in arrays] + [a.T.copy().tobytes() for a in arrays if a.ndim == 2]
        assert len(payloads) == len(set(payloads))
        names = {i.name for i in proto.graph.input}
        assert not any("branch" in n or "use_cache" in n for n in names)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_llama_style_blocks_export(tmp_path, arch):
    """RMSNorm, SwiGLU, no biases, untied head, MQA: validated and loadable at every optimization level."""
    model, tok = make_model(arch, activation="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False, n_kv_heads=1)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    report = export_model(model, tmp_path / "tokenizer.json", tmp_path / "pkg")
    check_package(model, report.path)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        ort.InferenceSession(str(tmp_path / "pkg" / "decoder.onnx"), options, providers=["CPUExecutionProvider"])


def test_manifest_contents(package_factory):
    model, tok, report = package_factory("encoder-decoder")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(report.path).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: services read it
    data = json.loads((report.path / "manifest.json").read_text())
    assert data["format"] == "onnxformer-package" and data["format_version"] == 1
    assert data["dims"] == {"arch": "encoder-decoder", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 8,
                            "d_model": 32, "vocab_size": tok.get_vocab_size(), "num_labels": 0,
                            "has_token_types": False}
    assert data["special_tokens"]["eos"] == tok.token_to_id("</s>")
    assert data["special_tokens"]["decoder_start"] == model.config.start_token_id
    assert data["generation"]["eos_token_ids"] == [tok.token_to_id("</s>")]
    assert set(data["producer"]) == {"onnxformer", "torch", "onnx", "onnxruntime", "decoder_graph"}
    assert data["producer"]["decoder_graph"] == "traced"  # head size 8: not the built graph
    cross = data["graphs"]["cross_attention"]
    assert [o["name"] for o in cross["outputs"]][:2] == ["present.0.encoder.key", "present.0.encoder.value"]
    assert cross["outputs"][0]["shape"] == ["batch", 2, "encoder_sequence", 8]
    dec_inputs = [i["name"] for i in data["graphs"]["decoder"]["inputs"]]
    assert dec_inputs[:8] == ["input_ids", "attention_mask", "position_ids", "encoder_attention_mask",
                              "past_key_values.0.decoder.key", "past_key_values.0.decoder.value",
                              "past_key_values.0.encoder.key", "past_key_values.0.encoder.value"]


def test_classifier_package_has_logits_and_labels(package_factory):
    _, _, report = package_factory("encoder", "learned")
    manifest = Manifest.load(report.path)
    assert manifest.label_names == ("negative", "neutral", "positive")
    assert manifest.graphs["encoder"].spec.output_names == ["last_hidden_state", "logits"]
    assert "token_type_ids" in manifest.graphs["encoder"].spec.input_names


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_int8_and_fp16_variants(package_factory, arch):
    model, _, plain = package_factory(arch)
    _, _, int8 = package_factory(arch, quantize="int8")
    _, _, fp16 = package_factory(arch, dtype="float16")
    _, _, int4 = package_factory(arch, quantize="int4")
    main = "decoder.onnx" if arch == "decoder" else "encoder.onnx"
    def weight_bytes(report):
        proto = onnx.load(str(report.path / main))
        return sum(len(t.raw_data) for t in proto.graph.initializer)

    assert weight_bytes(int8) < 0.75 * weight_bytes(plain)  # the tied vocabulary matrix stays fp32, once
    assert weight_bytes(int4) < weight_bytes(int8)
    assert Manifest.load(int4.path).weights == "int4"
    assert weight_bytes(fp16) < 0.6 * weight_bytes(plain)
    assert Manifest.load(int8.path).weights == "int8"
    m16 = Manifest.load(fp16.path)
    assert m16.weights == "float16" and m16.float_dtype == "float16"
    assert m16.graphs[main.removesuffix(".onnx")].spec.outputs[0].dtype == "float16"
    for report, bound in ((int8, 0.2), (int4, 1.0), (fp16, 0.05)):
        # against PyTorch here (a variant may pick another token at a near-tie) ...
        assert 0 < check_package(model, report.path, atol=bound, tokens_equal=False)
        assert report.validation[Manifest.load(report.path).weights]["worst_abs_diff"] > 0  # ... and recorded


def test_opset_is_configurable_and_bounded(package_factory):
    _, _, report = package_factory("decoder", opset=17)
    proto = onnx.load(str(report.path / "decoder.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    with pytest.raises(ExportError, match="opset must be in"):
        ExportOptions(opset=28)
    with pytest.raises(ExportError, match="dtype must be one of"):
        ExportOptions(dtype="bfloat16")


@pytest.mark.parametrize("external_data", [None, True])
def test_weights_are_stored_once_in_one_file(package_factory, external_data):
    """By default (and when forced, the >2 GB path) every graph's weights live in one
    weights.onnx_data, each distinct tensor once: the encoder-decoder's token embedding, used
    by encoder.onnx and decoder.onnx, is stored once."""
    import onnxformer.runtime as rt

    model, _, report = package_factory("encoder-decoder", external_data=external_data)
    files = {p.name for p in report.path.iterdir()}
    assert "weights.onnx_data" in files and not {f for f in files if f.endswith(".onnx_data")} - {"weights.onnx_data"}
    manifest = Manifest.load(report.path)
    for name in ("encoder", "decoder", "cross_attention"):
        assert [e.file for e in manifest.graphs[name].external_data] == ["weights.onnx_data"]
    assert len(manifest.files()) == 5  # tokenizer, 3 graphs, one weights file (listed by 3 graphs)
    embedding = model.tok_emb.weight.numel() * 4
    parameters = sum(p.numel() * 4 for p in model.parameters())
    stored = (report.path / "weights.onnx_data").stat().st_size
    assert stored < parameters + embedding // 2  # the embedding is not stored twice
    offsets = {}
    for name in ("encoder", "decoder"):
        proto = onnx.load(str(report.path / f"{name}.onnx"), load_external_data=False)  # structure only
        big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and all(len(t.raw_data) == 0 for t in big)
        offsets[name] = {int(dict((e.key, e.value) for e in t.external_data)["offset"]) for t in big}
    assert offsets["encoder"] & offsets["decoder"]  # shared tensors point at the same bytes
    check_package(model, report.path)
    loaded = rt.load(report.path)  # the shared data file's checksum is verified
    assert loaded.generate_ids([[5, 6, 7]])[0].token_ids[0]


def test_weights_inside_the_graphs_on_request(package_factory):
    model, _, report = package_factory("decoder", external_data=False)
    assert not list(report.path.glob("*.onnx_data"))
    assert Manifest.load(report.path).graphs["decoder"].external_data == ()
    check_package(model, report.path)


def test_failed_validation_writes_nothing_and_keeps_the_old_package(tmp_path):
    model, tok = make_model("decoder")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    out = tmp_path / "pkg"
    export_model(model, tmp_path / "tokenizer.json", out)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(ValidationError, match=r"validation failed \(float32: worst \|onnx - torch\| .* vs atol 1e-12") as err:
        export_model(model, tmp_path / "tokenizer.json", out, ExportOptions(atol=1e-12))
    assert err.value.code == "E_VALIDATION" and "worst_abs_diff" in str(err.value)  # the figures are in the error
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "tokenizer.json"]  # no temp dirs left


def test_interrupted_export_leaves_nothing(tmp_path):
    """Ctrl-C in the middle of the second graph (the model's own code raises it while traced)."""
    model, tok = make_model("encoder-decoder")
    save_tokenizer(tok, tmp_path / "tokenizer.json")

    def interrupted(*args):
        raise KeyboardInterrupt

    model.cross_kv = interrupted  # what cross_attention.onnx traces, after encoder.onnx
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tmp_path / "tokenizer.json", tmp_path / "pkg")
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"]


def test_refuses_to_replace_a_directory_that_is_not_a_package(tmp_path):
    model, tok = make_model("decoder")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an onnxformer package"):
        export_model(model, tmp_path / "tokenizer.json", out)
    assert (out / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# One decoder producer per layout: the built graph where its support check accepts the model
# --------------------------------------------------------------------------------------------


def test_the_support_check_lists_every_config_field():
    """Adding a ModelConfig field forces a decision: implement it in export/builder.py (and list
    it), or leave it out and the builder refuses models that have it (traced instead)."""
    import dataclasses

    from onnxformer.modeling.config import ModelConfig

    assert set(builder.IMPLEMENTED) == {f.name for f in dataclasses.fields(ModelConfig)}


def _export(model, tok, tmp_path, name, **options):
    save_tokenizer(tok, tmp_path / f"{name}.json")
    return export_model(model, tmp_path / f"{name}.json", tmp_path / name, ExportOptions(**options))


def test_a_config_field_the_builder_does_not_know_gets_the_traced_graph(tmp_path, caplog):
    """A new field (here a subclass adds one): the check refuses by name, the export traces the
    decoder, says so in the log, the report and the manifest, and the package is right."""
    import dataclasses
    import logging

    from onnxformer.modeling.config import ModelConfig
    from onnxformer.modeling.model import Transformer

    @dataclasses.dataclass(frozen=True)
    class WithSoftcap(ModelConfig):
        attn_logit_softcap: float = 0.0

    base, tok = make_model("decoder", d_model=64)  # the built graph's model, but for the new field
    assert builder.unsupported_reason(base) is None
    model = Transformer(WithSoftcap(**base.config.to_dict())).eval()
    model.load_state_dict(base.state_dict())
    reason = builder.unsupported_reason(model)
    assert reason is not None and "'attn_logit_softcap' (0.0) is not implemented" in reason
    with caplog.at_level(logging.INFO, logger="onnxformer.export.exporter"):
        report = _export(model, tok, tmp_path, "traced")
    assert "decoder graph: traced" in caplog.text and "attn_logit_softcap" in caplog.text
    assert report.decoder_graph == report.manifest.producer["decoder_graph"] == "traced"
    assert Manifest.load(report.path).producer["decoder_graph"] == "traced" and report.manifest.kv_cache == "concat"
    check_package(model, report.path)
    with pytest.raises(ExportError, match="attn_logit_softcap") as err:
        _export(model, tok, tmp_path, "forced", kv_cache="shared")
    assert err.value.code == "E_UNSUPPORTED"
    built = _export(base, tok, tmp_path, "built")
    assert built.decoder_graph == Manifest.load(built.path).producer["decoder_graph"] == "built"
    assert built.manifest.kv_cache == "shared"
    check_package(base, built.path)


def test_a_value_the_builder_does_not_implement_gets_the_traced_graph(tmp_path, monkeypatch):
    """Values outside a field's list are refused by name, as are modules the builder does not read."""
    from onnxformer.modeling.peft import LoRAConfig, apply_lora

    model, tok = make_model("decoder", d_model=64, activation="swiglu")
    monkeypatch.setitem(builder.IMPLEMENTED, "activation", ("gelu",))  # as if SwiGLU were not written
    assert builder.unsupported_reason(model) == "activation 'swiglu' is not implemented (supported: 'gelu')"
    report = _export(model, tok, tmp_path, "swiglu")
    assert report.decoder_graph == "traced" and report.manifest.kv_cache == "concat"
    check_package(model, report.path)
    monkeypatch.undo()
    apply_lora(model, LoRAConfig())
    assert "LoRALinear" in builder.unsupported_reason(model)


def test_modeling_knows_nothing_of_onnx(tmp_path):
    """The model code has no export switches, and exporting leaves the user's modules as they were."""
    import re

    source = (REPO / "modeling" / "model.py").read_text(encoding="utf-8")
    assert not re.search(r"onnx|symbolic|fused", source, re.IGNORECASE)
    def attributes(model):  # every module's plain attributes (its parameters are compared below)
        return {name: {k: v for k, v in vars(m).items() if not isinstance(v, dict)} for name, m in model.named_modules()}

    model, tok = make_model("prefix-lm", n_kv_heads=4)
    before, weights = attributes(model), {k: v.clone() for k, v in model.state_dict().items()}
    _export(model, tok, tmp_path, "pkg")
    assert attributes(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# int8-dynamic: int8 weights and activations, for encoder models
# --------------------------------------------------------------------------------------------

# Bound on |p_int8-dynamic - p_fp32| for the tiny encoder's class probabilities. Each int8
# matmul rounds its input to 1/255 of the batch's range and its weights to 1/254 of their
# column's largest value: about 1% of the logits' scale through two layers. Measured 0.0046
# (batch sizes 1 to 4); the bound leaves 4x for other CPUs' int8 kernels.
DYNAMIC_PROB_ATOL = 0.02


def _probabilities(package, texts):
    import onnxformer.runtime as rt

    return np.array([list(c.probabilities.values()) for c in rt.load(package).classify(texts)])


def test_int8_dynamic_encoder_classifies_like_fp32(package_factory):
    from support import TEXTS

    _, _, plain = package_factory("encoder")
    _, _, dynamic = package_factory("encoder", quantize="int8-dynamic")
    manifest = Manifest.load(dynamic.path)
    assert manifest.weights == "int8-dynamic" and manifest.float_dtype == "float32"
    assert dynamic.validation["int8-dynamic"]["worst_abs_diff"] > 0  # measured and recorded; checked below

    fp32_graph = onnx.load(str(plain.path / "encoder.onnx")).graph
    graph = onnx.load(str(dynamic.path / "encoder.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # every MatMul (projections and attention products) runs in int8; the Gemm heads (pooler,
    # classifier) stay float, as MatMul + Add
    fp32_ops = [n.op_type for n in fp32_graph.node]
    assert ops.count("MatMulInteger") == fp32_ops.count("MatMul") > 0
    assert ops.count("MatMul") == fp32_ops.count("Gemm") == 2
    assert "DynamicQuantizeLinear" in ops
    dtypes = {t.name: t.data_type for t in graph.initializer}
    weights = [dtypes[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in dtypes]
    assert weights and set(weights) == {onnx.TensorProto.INT8}
    weight_bytes = lambda g: sum(len(t.raw_data) for t in g.initializer)  # noqa: E731
    assert weight_bytes(graph) < 0.6 * weight_bytes(fp32_graph)  # the embeddings stay fp32

    texts = sorted(set(TEXTS))
    reference, quantized = _probabilities(plain.path, texts), _probabilities(dynamic.path, texts)
    assert np.abs(quantized - reference).max() < DYNAMIC_PROB_ATOL
    top2 = np.sort(reference, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * DYNAMIC_PROB_ATOL  # labels may only differ on near-ties
    assert clear.any()
    assert (quantized.argmax(-1) == reference.argmax(-1))[clear].all()


@pytest.mark.parametrize("arch", ["decoder", "prefix-lm", "encoder-decoder"])
def test_int8_dynamic_refuses_generating_archs(tmp_path, arch):
    """Decoding runs batch x 1 token per step: weight-only int8 is the format there; say so."""
    model, tok = make_model(arch)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    with pytest.raises(ExportError, match=rf"arch '{arch}'.*--quantize int8\b"):
        export_model(model, tmp_path / "tokenizer.json", tmp_path / "pkg", ExportOptions(quantize="int8-dynamic"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # nothing written


def test_every_quantization_is_a_cli_choice():
    import argparse

    from onnxformer.export.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for choice in exporter.QUANTIZATIONS:
        assert parser.parse_args(["run", "pkg", "--quantize", choice]).quantize == choice
    with pytest.raises(ExportError, match="int8-dynamic"):
        ExportOptions(quantize="int8-dynamic", dtype="float16")
