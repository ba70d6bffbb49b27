"""The graph I/O contract: name templates, specs per architecture, manifest JSON, session checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from onnxformer.runtime import contract as C
from onnxformer.runtime.errors import PackageError

pytestmark = pytest.mark.runtime_only  # torch-free: CI also runs these without torch

# Tiny dims shared by the tests: Hkv=2, Dh=4, D=8, V=10.
DEC = C.Dims(arch="decoder", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_model=16, vocab_size=10)
SEQ2SEQ = C.Dims(arch="encoder-decoder", n_layers=3, n_heads=2, n_kv_heads=1, d_head=4, d_model=8, vocab_size=10)
ENC = C.Dims(
    arch="encoder", n_layers=0, n_heads=2, n_kv_heads=2, d_head=4, d_model=8, vocab_size=10,
    num_labels=3, has_token_types=True,
)


# Name templates -----------------------------------------------------------------------------
def test_name_templates():
    assert C.past_names(0) == ("past_key_values.0.key", "past_key_values.0.value")
    assert C.present_names(3) == ("present.3.key", "present.3.value")
    assert C.past_names(1, "decoder") == ("past_key_values.1.decoder.key", "past_key_values.1.decoder.value")
    assert C.present_names(2, "encoder") == ("present.2.encoder.key", "present.2.encoder.value")
    assert C.past_name_for("present.4.key") == "past_key_values.4.key"
    assert C.past_name_for("present.1.encoder.value") == "past_key_values.1.encoder.value"
    assert C.parse_cache_name("present.12.decoder.key") == ("present", 12, "decoder", "key")
    assert C.parse_cache_name("past_key_values.0.value") == ("past_key_values", 0, "self", "value")
    assert C.parse_cache_name("logits") is None
    with pytest.raises(ValueError, match="cache kind"):
        C.past_names(0, "cross")
    with pytest.raises(ValueError, match="not a present cache name"):
        C.past_name_for("past_key_values.0.key")


# Specs per architecture ---------------------------------------------------------------------
def test_graphs_per_arch():
    for arch, graphs in [
        ("encoder", ["encoder"]),
        ("decoder", ["decoder"]),
        ("prefix-lm", ["decoder"]),
        ("encoder-decoder", ["encoder", "cross_attention", "decoder"]),
    ]:
        dims = C.Dims(arch=arch, n_layers=1 if arch != "encoder" else 0, n_heads=2, n_kv_heads=2,
                      d_head=4, d_model=8, vocab_size=10)
        specs = C.graph_specs(dims)
        assert list(specs) == graphs
        assert all(spec.file == f"{name}.onnx" for name, spec in specs.items())


def test_decoder_spec():
    spec = C.graph_specs(DEC)["decoder"]
    assert spec.input_names == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value",
        "past_key_values.1.key", "past_key_values.1.value",
    ]
    assert spec.output_names == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert spec.input("input_ids") == C.TensorSpec("input_ids", "int64", ("batch", "sequence"))
    assert spec.input("attention_mask").shape == ("batch", "total_sequence")
    assert spec.input("position_ids").shape == ("batch", "sequence")
    assert spec.input("past_key_values.1.value") == C.TensorSpec(
        "past_key_values.1.value", "float32", ("batch", 2, "past_sequence", 4)
    )
    assert spec.output("logits") == C.TensorSpec("logits", "float32", ("batch", "sequence", 10))
    assert spec.output("present.0.key").shape == ("batch", 2, "total_sequence", 4)
    assert spec.dynamic_axes()["present.0.key"] == {0: "batch", 2: "total_sequence"}
    # prefix-lm shares the decoder contract
    prefix = C.graph_specs(C.Dims(**{**DEC.to_dict(), "arch": "prefix-lm"}))["decoder"]
    assert prefix == spec


def test_float16_variant():
    spec = C.graph_specs(DEC, float_dtype="float16")["decoder"]
    dtypes = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
    assert dtypes["input_ids"] == "int64" and dtypes["position_ids"] == "int64"
    assert dtypes["logits"] == "float16" and dtypes["past_key_values.0.key"] == "float16"
    with pytest.raises(PackageError, match="float_dtype"):
        C.graph_specs(DEC, float_dtype="bfloat16")


def test_encoder_spec_extras_only_for_standalone_encoder():
    enc = C.graph_specs(ENC)["encoder"]
    assert enc.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert enc.output_names == ["last_hidden_state", "logits"]
    assert enc.output("last_hidden_state").shape == ("batch", "sequence", 8)
    assert enc.output("logits").shape == ("batch", 3)
    plain = C.graph_specs(C.Dims(**{**ENC.to_dict(), "num_labels": 0, "has_token_types": False}))["encoder"]
    assert plain.input_names == ["input_ids", "attention_mask"]
    assert plain.output_names == ["last_hidden_state"]
    with pytest.raises(PackageError, match="apply to arch 'encoder' only"):
        C.Dims(**{**SEQ2SEQ.to_dict(), "num_labels": 2})


def test_encoder_decoder_specs():
    specs = C.graph_specs(SEQ2SEQ)
    assert specs["encoder"].input_names == ["input_ids", "attention_mask"]
    assert specs["encoder"].output_names == ["last_hidden_state"]
    cross = specs["cross_attention"]
    assert cross.input_names == ["encoder_hidden_states"]
    assert cross.input("encoder_hidden_states").shape == ("batch", "encoder_sequence", 8)
    assert cross.output_names == [n for i in range(3) for n in C.present_names(i, "encoder")]
    assert cross.output("present.2.encoder.value").shape == ("batch", 1, "encoder_sequence", 4)
    dec = specs["decoder"]
    assert dec.input_names[:4] == ["input_ids", "attention_mask", "position_ids", "encoder_attention_mask"]
    assert dec.input("encoder_attention_mask").shape == ("batch", "encoder_sequence")
    assert dec.input_names[4:8] == [
        "past_key_values.0.decoder.key", "past_key_values.0.decoder.value",
        "past_key_values.0.encoder.key", "past_key_values.0.encoder.value",
    ]
    assert dec.input("past_key_values.2.encoder.key").shape == ("batch", 1, "encoder_sequence", 4)
    assert dec.input("past_key_values.2.decoder.key").shape == ("batch", 1, "past_sequence", 4)
    assert dec.output_names == ["logits"] + [n for i in range(3) for n in C.present_names(i, "decoder")]
    # every cross-attention output feeds a decoder input of the same name under the past template
    assert {C.past_name_for(n) for n in cross.output_names} <= set(dec.input_names)
    assert {past for _, past in C.self_cache_names(SEQ2SEQ)} <= set(dec.input_names)


def test_dims_from_model_config_and_validation():
    from onnxformer.modeling.config import ModelConfig  # torch-free module

    cfg = ModelConfig(arch="encoder-decoder", n_layers=2, n_decoder_layers=3, n_heads=4, n_kv_heads=2, d_model=32)
    dims = C.Dims.from_model_config(cfg)
    assert dims == C.Dims("encoder-decoder", 3, 4, 2, 8, 32, cfg.vocab_size, 0, False)
    bert = SimpleNamespace(arch="encoder", n_step_layers=0, n_heads=2, n_kv_heads=2, d_head=4, d_model=8,
                           vocab_size=10, num_labels=2, type_vocab_size=2)
    assert C.Dims.from_model_config(bert).has_token_types
    with pytest.raises(PackageError, match="n_kv_heads"):
        C.Dims("decoder", 1, 4, 3, 4, 16, 10)
    with pytest.raises(PackageError, match="n_layers"):
        C.Dims("decoder", 0, 4, 4, 4, 16, 10)
    with pytest.raises(PackageError, match="arch"):
        C.Dims("gpt", 1, 4, 4, 4, 16, 10)


def test_manifest_json_round_trip():
    for dims in (DEC, SEQ2SEQ, ENC):
        specs = C.graph_specs(dims, "float16")
        text = json.dumps(C.graph_specs_to_dict(specs))
        assert C.graph_specs_from_dict(json.loads(text)) == specs
        assert C.Dims.from_dict(json.loads(json.dumps(dims.to_dict()))) == dims
    first = C.graph_specs_to_dict(C.graph_specs(DEC))["decoder"]["inputs"][0]
    assert first == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}


def test_manifest_damage_is_a_package_error():
    good = C.graph_specs_to_dict(C.graph_specs(DEC))
    bad_dtype = json.loads(json.dumps(good))
    bad_dtype["decoder"]["inputs"][0]["dtype"] = "int32"
    with pytest.raises(PackageError, match="int32"):
        C.graph_specs_from_dict(bad_dtype)
    missing_key = json.loads(json.dumps(good))
    del missing_key["decoder"]["outputs"][0]["shape"]
    with pytest.raises(PackageError, match="name, dtype, shape"):
        C.graph_specs_from_dict(missing_key)
    with pytest.raises(PackageError, match="unknown fields \\['n_layer'\\]"):
        C.Dims.from_dict({**DEC.to_dict(), "n_layer": 2})


def test_empty_past():
    past = C.empty_past(3, DEC)
    assert list(past) == [n for i in range(2) for n in C.past_names(i)]
    assert all(a.shape == (3, 2, 0, 4) and a.dtype == np.float32 for a in past.values())
    past16 = C.empty_past(1, SEQ2SEQ, "float16")
    assert list(past16) == [n for i in range(3) for n in C.past_names(i, "decoder")]
    assert all(a.dtype == np.float16 for a in past16.values())


# Session checks with fake NodeArgs -----------------------------------------------------------
def _node_args(specs, **overrides):
    """Fake onnxruntime NodeArgs matching ``specs``; overrides: name -> (type, shape) or None to drop."""
    args = []
    for t in specs:
        if t.name in overrides:
            if overrides[t.name] is None:
                continue
            ort_type, shape = overrides[t.name]
        else:
            ort_type = C.ORT_TYPES[t.dtype]
            shape = [f"dyn_{a}" if isinstance(a, str) else a for a in t.shape]  # exporters rename axes
        args.append(SimpleNamespace(name=t.name, type=ort_type, shape=shape))
    return args


def test_check_session_io_accepts_matching_io():
    spec = C.graph_specs(DEC)["decoder"]
    C.check_session_io(spec, _node_args(spec.inputs), _node_args(spec.outputs))
    # a static size left symbolic (or unknown) by the exporter is acceptable
    loose = _node_args(spec.outputs, logits=("tensor(float)", ["b", "t", None]))
    C.check_session_io(spec, _node_args(spec.inputs), loose)


def test_check_session_io_lists_every_mismatch():
    spec = C.graph_specs(DEC)["decoder"]
    inputs = _node_args(
        spec.inputs,
        position_ids=None,  # missing
        attention_mask=("tensor(int32)", ["b", "t"]),  # wrong dtype
        **{"past_key_values.0.key": ("tensor(float)", ["b", 3, "p", 4])},  # wrong static dim (Hkv)
        **{"past_key_values.1.key": ("tensor(float)", ["b", 2, "p"])},  # wrong rank
    )
    inputs.append(SimpleNamespace(name="use_cache_branch", type="tensor(bool)", shape=[1]))  # extra
    outputs = _node_args(spec.outputs, logits=("tensor(float)", [1, "t", 10]))  # batch fixed to 1
    with pytest.raises(PackageError) as err:
        C.check_session_io(spec, inputs, outputs)
    message = str(err.value)
    assert "6 problem(s)" in message
    assert "missing input 'position_ids'" in message
    assert "unexpected input 'use_cache_branch'" in message
    assert "input 'attention_mask': dtype int32, expected int64" in message
    assert "input 'past_key_values.0.key': axis 1 is 3, expected 2" in message
    assert "input 'past_key_values.1.key': rank 3" in message
    assert "output 'logits': axis 0 is fixed to 1 but must be dynamic ('batch')" in message
    assert "re-export" in message


def test_check_session_io_catches_missing_output():
    spec = C.graph_specs(SEQ2SEQ)["cross_attention"]
    outputs = _node_args(spec.outputs, **{"present.2.encoder.value": None})
    with pytest.raises(PackageError, match=r"missing output 'present.2.encoder.value'"):
        C.check_session_io(spec, _node_args(spec.inputs), outputs)


# A real ONNX graph in onnxruntime --------------------------------------------------------------
def _tiny_decoder_model(spec: C.GraphSpec, dims: C.Dims):
    """An identity-like graph with the decoder contract's I/O for one layer:
    logits[b, t, :] = input_ids[b, t]; present = concat(past, position_ids broadcast to (B, Hkv, T, Dh))."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    elem = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    info = lambda t: helper.make_tensor_value_info(t.name, elem[t.dtype], list(t.shape))  # noqa: E731
    const = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    key, value = C.past_names(0)
    present_key, present_value = C.present_names(0)
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["ids_u"]),  # (B, T, 1)
        helper.make_node("Expand", ["ids_u", "vocab_shape"], ["logits"]),  # (B, T, V)
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "axes13"], ["pos_u"]),  # (B, 1, T, 1)
        helper.make_node("Expand", ["pos_u", "kv_shape"], ["new_kv"]),  # (B, Hkv, T, Dh)
        helper.make_node("Concat", [key, "new_kv"], [present_key], axis=2),  # (B, Hkv, P+T, Dh)
        helper.make_node("Concat", [value, "new_kv"], [present_value], axis=2),
        helper.make_node("Identity", ["attention_mask"], ["mask_unused"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_decoder",
        [info(t) for t in spec.inputs],
        [info(t) for t in spec.outputs],
        initializer=[
            const("axis2", [2]), const("axes13", [1, 3]),
            const("vocab_shape", [1, 1, dims.vocab_size]), const("kv_shape", [1, dims.n_kv_heads, 1, dims.d_head]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_check_session_io_on_a_real_onnxruntime_session():
    ort = pytest.importorskip("onnxruntime")
    dims = C.Dims(arch="decoder", n_layers=1, n_heads=2, n_kv_heads=2, d_head=4, d_model=8, vocab_size=10)
    spec = C.graph_specs(dims)["decoder"]
    sess = ort.InferenceSession(_tiny_decoder_model(spec, dims), providers=["CPUExecutionProvider"])
    C.check_session_io(spec, sess.get_inputs(), sess.get_outputs())

    # Two steps through the contract: empty past first, then presents fed back as pasts.
    feeds = {
        "input_ids": np.array([[3, 4, 5]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.array([[0, 1, 2]], dtype=np.int64),
        **C.empty_past(1, dims),
    }
    outputs = dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))
    assert outputs["logits"].shape == (1, 3, 10)
    assert outputs["present.0.key"].shape == (1, 2, 3, 4)
    feeds = {
        "input_ids": np.array([[6]], dtype=np.int64),
        "attention_mask": np.ones((1, 4), dtype=np.int64),
        "position_ids": np.array([[3]], dtype=np.int64),
        **{C.past_name_for(p): outputs[p] for p, _ in C.self_cache_names(dims)},
    }
    outputs = dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))
    assert outputs["present.0.value"].shape == (1, 2, 4, 4)
    np.testing.assert_array_equal(outputs["present.0.key"][0, 0, :, 0], [0, 1, 2, 3])

    # The same graph checked against the float16 contract fails, naming each tensor.
    with pytest.raises(PackageError, match="input 'past_key_values.0.key': dtype float32, expected float16"):
        C.check_session_io(C.graph_specs(dims, "float16")["decoder"], sess.get_inputs(), sess.get_outputs())
