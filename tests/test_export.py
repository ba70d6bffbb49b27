"""Export: every architecture and positional encoding, validated against PyTorch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs the [train] extra (torch)")
import onnx  # noqa: E402
import torch  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxformer.export import exporter  # noqa: E402
from onnxformer.export.exporter import ExportError, ExportOptions, export_model  # noqa: E402
from onnxformer.modeling.tokenizer import save_tokenizer  # noqa: E402
from onnxformer.runtime.contract import graph_specs  # noqa: E402
from onnxformer.runtime.manifest import Manifest, sha256_file  # noqa: E402

from support import make_model  # noqa: E402

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
    assert files == GRAPHS[arch] | {"manifest.json", "tokenizer.json"}
    figures = report.validation["float32"]
    assert figures["passed"] and figures["worst_abs_diff"] <= 1e-4
    if arch != "encoder":
        assert figures["greedy_match"] and figures["greedy_tokens_compared"] > 0

    manifest = Manifest.load(package)
    assert manifest.validation == report.validation  # the figures travel with the package
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
    assert report.validation["float32"]["passed"] and report.validation["float32"]["greedy_match"]
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
    assert set(data["producer"]) == {"onnxformer", "torch", "onnx", "onnxruntime"}
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
    _, _, plain = package_factory(arch)
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
        variant = report.validation[Manifest.load(report.path).weights]
        assert variant["passed"] and 0 < variant["worst_abs_diff"] < bound  # measured, and plausible


def test_opset_is_configurable_and_bounded(package_factory):
    _, _, report = package_factory("decoder", opset=17)
    proto = onnx.load(str(report.path / "decoder.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    with pytest.raises(ExportError, match="opset must be in"):
        ExportOptions(opset=28)
    with pytest.raises(ExportError, match="dtype must be one of"):
        ExportOptions(dtype="bfloat16")


def test_external_data_path(package_factory):
    """Force the >2 GB path (weights in <graph>.onnx_data) on a small model."""
    import onnxformer.runtime as rt

    _, _, report = package_factory("encoder-decoder", external_data=True)
    files = {p.name for p in report.path.iterdir()}
    assert {"encoder.onnx_data", "decoder.onnx_data", "cross_attention.onnx_data"} <= files
    manifest = Manifest.load(report.path)
    assert [e.file for e in manifest.graphs["decoder"].external_data] == ["decoder.onnx_data"]
    proto = onnx.load(str(report.path / "decoder.onnx"), load_external_data=False)  # structure only
    assert proto.graph.initializer and all(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    )
    assert report.validation["float32"]["greedy_match"]
    model = rt.load(report.path)  # checksums of the data files are verified too
    assert model.generate_ids([[5, 6, 7]]).sequences[0][0]


def test_failed_validation_writes_nothing_and_keeps_the_old_package(tmp_path):
    model, tok = make_model("decoder")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    out = tmp_path / "pkg"
    export_model(model, tmp_path / "tokenizer.json", out)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(ExportError, match="validation failed") as err:
        export_model(model, tmp_path / "tokenizer.json", out, ExportOptions(atol=1e-12))
    assert "worst_abs_diff" in str(err.value)  # the figures are in the error
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "tokenizer.json"]  # no temp dirs left


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    model, tok = make_model("encoder-decoder")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    calls = []
    real = exporter._trace

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the second graph
        return real(*args, **kwargs)

    monkeypatch.setattr(exporter, "_trace", flaky)
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


@pytest.mark.parametrize("arch", ["decoder", "prefix-lm", "encoder-decoder"])
def test_fused_attention_export_is_validated(tmp_path, arch):
    """Self-attention as onnxruntime's MultiHeadAttention: same figures as the plain graph."""
    model, tok = make_model(arch, n_kv_heads=4)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    report = export_model(model, tmp_path / "tokenizer.json", tmp_path / "pkg", ExportOptions(fused_attention=True))
    figures = report.validation["float32"]
    assert figures["passed"] and figures["worst_abs_diff"] <= 1e-4 and figures["greedy_match"]
    proto = onnx.load(str(tmp_path / "pkg" / "decoder.onnx"))
    fused = [n for n in proto.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(fused) == model.config.n_step_layers and all(n.domain == "com.microsoft" for n in fused)
    assert "onnxformer" not in {o.domain for o in proto.opset_import}
    assert not any(isinstance(m, torch.nn.Module) and getattr(m, "fused", False) for m in model.modules())


def test_fused_attention_leaves_grouped_query_layers_plain(tmp_path):
    model, tok = make_model("decoder", n_kv_heads=2)  # GQA: MultiHeadAttention needs Hkv == H
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    export_model(model, tmp_path / "tokenizer.json", tmp_path / "pkg", ExportOptions(fused_attention=True))
    proto = onnx.load(str(tmp_path / "pkg" / "decoder.onnx"))
    assert not any(n.op_type == "MultiHeadAttention" for n in proto.graph.node)
