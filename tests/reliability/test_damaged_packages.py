"""Damaged, forged and hostile packages: each is refused with a PackageError that names the
file and the problem and carries the code of the condition (E_MANIFEST, E_CHECKSUM, ...), before
onnxruntime runs anything from it.

Kinds of damage: missing files, altered or truncated files, garbage graphs, a manifest that
is not JSON, misses fields, has an unknown format version or wrong types (a systematic sweep
over every field), a manifest whose I/O was edited to disagree with the unchanged graph, a
tokenizer that does not belong to the model, and external-data references that leave the
package directory (path traversal), including from nodes and subgraphs.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packages are exported on the spot")
onnx = pytest.importorskip("onnx")

import onnxformer.runtime as rt  # noqa: E402
from onnxformer.runtime import PackageError  # noqa: E402
from onnxformer.runtime import model as runtime_model  # noqa: E402
from onnxformer.runtime.contract import Dims, graph_specs  # noqa: E402
from onnxformer.runtime.safety import _SCHEMA, check_external_data, external_data_refs  # noqa: E402
from reliability_support import raised_by_us, refresh_checksums, rewrite_manifest  # noqa: E402


def refused(directory: Path, pattern: str, code: str, **load_kwargs) -> PackageError:
    with pytest.raises(PackageError, match=pattern) as excinfo:
        rt.load(directory, **load_kwargs)
    assert raised_by_us(excinfo), excinfo.traceback[-1].path
    assert excinfo.value.code == code, (excinfo.value.code, str(excinfo.value))
    return excinfo.value


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json", "decoder.onnx"])
def test_a_missing_file_is_named(package_copy, name):
    package = package_copy("decoder")
    (package / name).unlink()
    refused(package, f"{name}' is missing", "E_MANIFEST" if name == "manifest.json" else "E_MISSING_FILE")


@pytest.mark.parametrize("name", ["tokenizer.json", "decoder.onnx"])
def test_an_altered_byte_fails_the_checksum(package_copy, name):
    package = package_copy("decoder")
    data = bytearray((package / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (package / name).write_bytes(bytes(data))
    refused(package, f"package file '{name}' has sha256 .* altered or damaged", "E_CHECKSUM")


def test_truncated_and_garbage_graphs(package_copy, figures):
    package = package_copy("decoder")
    graph = package / "decoder.onnx"
    whole = graph.read_bytes()
    cases = 0
    for size in (0, 1, 100, len(whole) // 2, len(whole) - 1):
        graph.write_bytes(whole[:size])
        refused(package, "'decoder.onnx' has .* bytes, the manifest says .* truncated or altered", "E_CHECKSUM")
        refused(package, "decoder.onnx", "E_GRAPH", verify=False)  # damaged file reaches no onnxruntime trace
        cases += 2
    rng = np.random.default_rng(0)
    for size in (0, 16, 4096, len(whole)):  # garbage with a forged, matching checksum
        graph.write_bytes(rng.bytes(size))
        refresh_checksums(package)
        refused(package, "graph file 'decoder.onnx' is (empty|not a valid ONNX protobuf)"
                         "|onnxruntime could not load 'decoder.onnx'", "E_GRAPH")
        cases += 1
    graph.unlink()
    graph.mkdir()  # a directory where the graph should be
    refused(package, "'decoder.onnx' is missing", "E_MISSING_FILE")
    figures.record("damaged packages", "truncated graphs (5 sizes, with and without verification), garbage graphs "
                   "with forged checksums (4 sizes), a directory in place of the graph", cases + 1,
                   f"{cases + 1} PackageError naming decoder.onnx, 0 onnxruntime traces")


# --- the manifest ----------------------------------------------------------------------------

MANIFEST_TEXTS = {
    "not JSON": b"{not json",
    "not UTF-8": b'{"format": "\xff\xfe"}',
    "empty": b"",
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"onnxformer"',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("name", list(MANIFEST_TEXTS))
def test_an_unreadable_manifest(package_copy, name):
    package = package_copy("decoder")
    (package / "manifest.json").write_bytes(MANIFEST_TEXTS[name])
    refused(package, "manifest.json' is not valid JSON|manifest must be a JSON object", "E_MANIFEST")


def test_manifest_that_cannot_be_read(package_copy, monkeypatch):
    package = package_copy("decoder")
    real = Path.read_bytes

    def denied(self):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    refused(package, "cannot read .*manifest.json.*Permission denied", "E_MANIFEST")
    shutil.rmtree(package / "manifest.json", ignore_errors=True)
    (package / "manifest.json").unlink()
    (package / "manifest.json").mkdir()
    refused(package, "manifest.json' is missing", "E_MANIFEST")


REQUIRED = ["format", "format_version", "arch", "dims", "max_seq_len", "float_dtype", "weights", "special_tokens",
            "label_names", "generation", "tokenizer", "graphs", "opset", "producer"]


@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_manifest_field_is_named(package_copy, field):
    package = package_copy("decoder")
    rewrite_manifest(package, lambda m: m.pop(field))
    refused(package, f"manifest is missing field\\(s\\) {field}", "E_MANIFEST")


@pytest.mark.parametrize("version", [0, 3, 99, "1", None, True])
def test_unknown_format_version(package_copy, version):
    package = package_copy("decoder")
    rewrite_manifest(package, lambda m: m.update(format_version=version))
    refused(package, f"format_version {version!r} is not supported by this runtime", "E_FORMAT_VERSION")


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_kv_cache_layout_and_format_version_must_agree(package_copy, layout):
    """Version 2 means the "shared" decoder; a manifest that says otherwise is refused before
    any graph is bound the wrong way."""
    package = package_copy("decoder")
    current = json.loads((package / "manifest.json").read_text())["kv_cache"]
    other = {"concat": "shared", "shared": "concat"}[current]
    needed = {"concat": 1, "shared": 2}
    if layout == "concat":  # the layout stays, the version is the other layout's
        rewrite_manifest(package, lambda m: m.update(format_version=needed[other]))
        refused(package, f"manifest kv_cache '{current}' needs format_version {needed[current]}; got {needed[other]}",
                "E_MANIFEST")
    else:  # the layout is flipped with its version: the graph specs no longer match the layout
        rewrite_manifest(package, lambda m: m.update(kv_cache=other, format_version=needed[other]))
        refused(package, "does not match the contract", "E_GRAPH_IO")


@pytest.mark.parametrize("value", ["paged", 1, None, ["shared"]])
def test_unknown_kv_cache_layout(package_copy, value):
    package = package_copy("decoder")
    rewrite_manifest(package, lambda m: m.update(kv_cache=value))
    refused(package, "manifest kv_cache must be one of", "E_MANIFEST")


def _paths(node, prefix=()):
    """Every path into a JSON document; tensor lists keep their first two entries."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node[:2]):
            yield from _paths(value, prefix + (i,))


WRONG_VALUES = ["<delete>", None, "x", -1, 10**30, 1.5, True, [], {}, [1, "a"]]
INFORMATIONAL = ("producer", "validation", "model_config")  # free-form; any JSON object is accepted


def test_every_manifest_field_damaged_every_way(package_copy, figures):
    """Each field (deleted, or set to each of 9 wrong types/values): a PackageError or, where the
    value is harmless, a package that loads and runs; never another exception."""
    package = package_copy("encoder")
    original = json.loads((package / "manifest.json").read_text())
    expected = _answer(rt.load(package), "encoder")
    outcomes, codes, leaks, silent = collections.Counter(), collections.Counter(), [], []
    for path in list(_paths(original))[1:]:
        if path[0] in INFORMATIONAL and len(path) > 1:
            continue
        for value in WRONG_VALUES:
            data = copy.deepcopy(original)
            node = data
            for key in path[:-1]:
                node = node[key]
            if value == "<delete>":
                node.pop(path[-1])
            else:
                node[path[-1]] = value
            (package / "manifest.json").write_text(json.dumps(data))
            try:
                answer = _answer(rt.load(package), "encoder")
                outcomes["loaded and ran"] += 1
                if answer != expected:  # a silent success: damaged, loaded, answered differently
                    silent.append(f"{path} = {value!r}")
            except PackageError as err:
                outcomes["PackageError"] += 1
                codes[err.code] += 1
            except Exception as err:  # noqa: BLE001 - the point of the test
                leaks.append(f"{path} = {value!r}: {type(err).__name__}: {err}")
    assert not leaks, "\n".join(leaks[:20])
    assert not silent, f"damaged manifests that load and answer differently: {silent}"
    assert set(codes) <= {"E_MANIFEST", "E_FORMAT_VERSION", "E_GRAPH_IO", "E_TOKENIZER", "E_MISSING_FILE",
                          "E_CHECKSUM", "E_EXTERNAL_DATA"}, codes
    total = sum(outcomes.values())
    assert outcomes["PackageError"] > total // 2
    figures.record("damaged packages", "manifest sweep: every field of an encoder manifest deleted or set to each "
                   "of 9 wrong values (None, str, -1, 10**30, 1.5, true, [], {}, [1, 'a'])", total,
                   f"{outcomes['PackageError']} PackageError, {outcomes['loaded and ran']} harmless (loaded and gave the "
                   "undamaged answer exactly), 0 other exceptions, 0 silent successes")


# --- manifest I/O edited, graph unchanged ----------------------------------------------------


def _set_dims(package: Path, **changes) -> None:
    """Edit dims and regenerate every graph's I/O from the contract, so the manifest is
    consistent with itself but not with the unchanged graph files."""

    def change(m: dict) -> None:
        m["dims"].update(changes)
        specs = graph_specs(Dims.from_dict(m["dims"]), m["float_dtype"])
        for name, spec in specs.items():
            m["graphs"][name].update(inputs=spec.to_dict()["inputs"], outputs=spec.to_dict()["outputs"])

    rewrite_manifest(package, change)


def test_manifest_io_that_does_not_match_the_graph(package_copy, figures):
    cases = [
        ("decoder", dict(n_layers=3), "missing input 'past_key_values.2.key'"),
        ("decoder", dict(n_kv_heads=1), "input 'past_key_values.0.key': axis 1 is 2, expected 1"),
        ("decoder", dict(vocab_size=321), "output 'logits': axis 2 is 320, expected 321"),
        ("encoder", dict(num_labels=4), "output 'logits': axis 1 is 3, expected 4"),
        ("encoder", dict(has_token_types=False), "unexpected input 'token_type_ids'"),
        ("encoder-decoder", dict(d_head=16, n_heads=2), "expected 16"),
    ]
    for name, dims, pattern in cases:
        package = package_copy(name)
        if name == "encoder" and "num_labels" in dims:
            rewrite_manifest(package, lambda m: (m.update(label_names=[]), m["model_config"].update(label_names=[])))
        _set_dims(package, **dims)
        error = refused(package, "does not match the I/O contract", "E_GRAPH_IO")
        assert pattern in str(error), str(error)
        shutil.rmtree(package)
    package = package_copy("decoder")

    def to_fp16(m: dict) -> None:
        m["float_dtype"] = "float16"

    rewrite_manifest(package, to_fp16)
    _set_dims(package)
    error = refused(package, "does not match the I/O contract", "E_GRAPH_IO")
    assert "dtype float32, expected float16" in str(error)
    figures.record("damaged packages", "manifest I/O edited to disagree with the unchanged graph (layers, kv heads, "
                   "vocabulary, labels, token types, head size, float type)", len(cases) + 1,
                   f"{len(cases) + 1} PackageError listing each mismatch")


# --- the tokenizer ---------------------------------------------------------------------------


def test_a_tokenizer_that_does_not_belong_to_the_model(package_copy, package_paths, figures):
    package = package_copy("encoder")
    top = rt.load(package).dims.vocab_size - 1
    rewrite_manifest(package, lambda m: m["dims"].update(vocab_size=50))  # the encoder I/O has no vocab axis
    error = refused(package, f"tokenizer 'tokenizer.json' produces token ids up to {top} but the model's "
                             "vocabulary has 50 entries", "E_TOKENIZER")
    assert "does not belong to this model" in str(error)

    package = package_copy("decoder")  # a bigger tokenizer, its checksum forged
    models_vocab = rt.load(package).dims.vocab_size
    tokenizer = json.loads((package / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for i in range(40):
        vocab[f"extra{i}"] = len(vocab)
    (package / "tokenizer.json").write_text(json.dumps(tokenizer))
    refresh_checksums(package)
    refused(package, f"produces token ids up to {models_vocab + 39} but the model's vocabulary has {models_vocab} entries",
            "E_TOKENIZER")

    package = package_copy("decoder")  # a smaller tokenizer: special token ids it does not have
    tokenizer = json.loads((package / "tokenizer.json").read_text())
    specials = {t["id"] for t in tokenizer.pop("added_tokens")}
    tokenizer["added_tokens"] = []
    tokenizer["model"]["vocab"] = {k: v for k, v in tokenizer["model"]["vocab"].items() if v not in specials}
    (package / "tokenizer.json").write_text(json.dumps(tokenizer))
    refresh_checksums(package)
    refused(package, "manifest special_tokens .* are not tokens of 'tokenizer.json'", "E_TOKENIZER")

    package = package_copy("decoder")
    (package / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    refresh_checksums(package)
    refused(package, "tokenizer 'tokenizer.json' could not be loaded", "E_TOKENIZER")
    figures.record("damaged packages", "tokenizer vs model: vocabulary larger than the model's, special tokens "
                   "missing, not a tokenizer", 4, "4 PackageError naming tokenizer.json")


# --- external data: path traversal -----------------------------------------------------------


def _externalize(package: Path, location: str = "decoder.onnx_data", *, list_in_manifest: bool = True) -> None:
    """Move the decoder's weights to an external-data file, the way export does for graphs
    over 2 GB, then point every reference at `location` and forge the manifest to match."""
    graph = package / "decoder.onnx"
    proto = onnx.load(str(graph))
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx_data", size_threshold=0)
    if location != "decoder.onnx_data":
        proto = onnx.load(str(graph), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(proto, str(graph))

    def change(m: dict) -> None:
        m["graphs"]["decoder"]["external_data"] = [
            {"file": "decoder.onnx_data", "sha256": "0" * 64, "bytes": 0}] if list_in_manifest else []

    rewrite_manifest(package, change)
    refresh_checksums(package)


class SessionSpy:
    """Records every onnxruntime session the runtime opens."""

    def __init__(self, monkeypatch):
        self.opened: list[str] = []
        real = runtime_model.ort.InferenceSession

        def spy(path, *args, **kwargs):
            self.opened.append(Path(path).name)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(runtime_model.ort, "InferenceSession", spy)


def test_external_data_inside_the_package_loads_and_matches(package_copy, models):
    package = package_copy("decoder")
    _externalize(package)
    assert (package / "decoder.onnx_data").stat().st_size > (package / "decoder.onnx").stat().st_size
    model = rt.load(package)
    ids = model.generate(["the cat sat", "one two"], max_new_tokens=6)
    assert [g.token_ids for g in ids] == [g.token_ids for g in models["decoder"].generate(["the cat sat", "one two"],
                                                                                         max_new_tokens=6)]


def test_external_data_outside_the_package_is_refused_before_onnxruntime(package_copy, tmp_path, monkeypatch, figures):
    spy = SessionSpy(monkeypatch)
    outside = tmp_path / "decoder.onnx_data"  # where '../decoder.onnx_data' leads from a package copy
    cases = 0
    for location, listed, pattern in [
        ("../decoder.onnx_data", True, "a path outside the package directory; refused"),
        ("sub/../../decoder.onnx_data", True, "a path outside the package directory"),
        ("ABSOLUTE", True, "a path outside the package directory"),
        ("..\\decoder.onnx_data", True, "a path outside the package directory"),
        ("C:decoder.onnx_data", True, "a path outside the package directory"),
        ("", True, "a path outside the package directory"),
        ("other.bin", True, "which the manifest does not list for this graph"),
        ("decoder.onnx_data", False, "which the manifest does not list for this graph"),
    ]:
        location = str(outside) if location == "ABSOLUTE" else location
        package = package_copy("decoder")
        _externalize(package, location, list_in_manifest=listed)
        shutil.copyfile(package / "decoder.onnx_data", outside)  # a working target, were the path followed
        for verify in (True, False):
            error = refused(package, pattern, "E_EXTERNAL_DATA", verify=verify)
            assert "tensor '" in str(error)
            cases += 1
        assert spy.opened == [], "onnxruntime opened a graph that reads outside its package"
        shutil.rmtree(package)

    package = package_copy("decoder")  # a listed file that is a link leading out of the package
    _externalize(package)
    secret = tmp_path / "secret.bin"
    shutil.move(package / "decoder.onnx_data", secret)
    os.symlink(secret, package / "decoder.onnx_data")
    refused(package, "'decoder.onnx_data' resolves outside the package directory; refused", "E_PACKAGE")
    refused(package, "a link leading outside the package directory", "E_EXTERNAL_DATA", verify=False)
    assert spy.opened == []
    cases += 2
    figures.record("security", "external-data location in a graph pointing outside the package ('../x', "
                   "'sub/../../x', an absolute path, '..\\x', 'C:x', '', an unlisted file, a symlink leading out); "
                   "with and without checksum verification", cases,
                   f"{cases} refused with PackageError before onnxruntime opened the graph")


def _graph_with(tensor_owner: str) -> onnx.ModelProto:
    """A small valid model whose external tensor sits in a Constant node or in an If subgraph."""
    from onnx import TensorProto, helper

    def external(name: str) -> onnx.TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [4], [0.0] * 4)
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if tensor_owner == "constant node":
        nodes = [helper.make_node("Constant", [], ["w"], value=external("w")), helper.make_node("Add", ["x", "w"], ["y"])]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        inner = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "then", [], [y], [external("w")])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [], [y])
        cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=other)],
                                  "g", [cond, x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("owner", ["constant node", "if subgraph"])
def test_external_data_hidden_in_nodes_and_subgraphs_is_found(tmp_path, owner):
    path = tmp_path / "g.onnx"
    path.write_bytes(_graph_with(owner).SerializeToString())
    assert external_data_refs(path) == [("w", "../../etc/passwd")]
    with pytest.raises(PackageError, match="reads tensor 'w' from external file '../../etc/passwd', a path outside") as excinfo:
        check_external_data(path, [])
    assert excinfo.value.code == "E_EXTERNAL_DATA"


def test_the_safety_schema_matches_onnx():
    """Every field path from ModelProto to TensorProto that onnx.proto defines is walked."""
    messages = {m.DESCRIPTOR.name: m for m in (onnx.ModelProto, onnx.TrainingInfoProto, onnx.GraphProto, onnx.NodeProto,
                                               onnx.FunctionProto, onnx.AttributeProto, onnx.SparseTensorProto)}
    holders = {"TensorProto", "SparseTensorProto", "GraphProto", "NodeProto", "AttributeProto", "FunctionProto",
               "TrainingInfoProto"}
    for name, message in messages.items():
        want = {f.number: f.message_type.name for f in message.DESCRIPTOR.fields
                if f.message_type is not None and f.message_type.name in holders}
        assert _SCHEMA[name] == want, name
    tensor = onnx.TensorProto.DESCRIPTOR.fields_by_name
    assert (tensor["name"].number, tensor["external_data"].number) == (8, 13)


# --- a generated corpus: random damage to every file, nothing forged -------------------------
# Each case either raises an OnnxformerError with a code from CODES or is provably fine: it loads
# and gives the undamaged package's answer exactly. A "silent success" is a damaged package that
# loads, runs without error and answers differently; the corpus must have none.
CORPUS_SEED, CORPUS_CASES = 14, 200  # over the three packages, 40% on manifest.json; about 3 s


def _answer(model, arch: str):
    """What a user gets from the package: greedy token ids and text, or labels and probabilities."""
    if arch == "encoder":
        return [(c.label, c.probabilities) for c in model.classify(["the cat sat", "one two"])]
    return [(g.token_ids, g.texts) for g in model.generate(["one two", "the cat"], max_new_tokens=3)]


def _damage_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    how = rng.choice(["flip", "char", "char", "truncate", "append", "empty", "zero-run"])
    if how == "char":  # one byte set to a printable ASCII character: text files stay readable
        out = bytearray(data)
        out[int(rng.integers(len(out)))] = int(rng.integers(32, 127))
        return how, bytes(out)
    if how == "flip":  # 1-8 random bytes set to random values
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            out[int(rng.integers(len(out)))] = int(rng.integers(256))
        return how, bytes(out)
    if how == "truncate":
        return how, data[: int(rng.integers(len(data)))]
    if how == "append":
        return how, data + bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    if how == "zero-run":
        start = int(rng.integers(len(data)))
        return how, data[:start] + bytes(min(64, len(data) - start)) + data[start + 64:]
    return how, b""


def test_generated_damage_corpus(package_paths, models, tmp_path, figures):
    from onnxformer.runtime.errors import CODES, OnnxformerError

    rng = np.random.default_rng(CORPUS_SEED)
    expected = {arch: _answer(models[arch], arch) for arch in package_paths}
    outcomes, codes, silent, leaks = collections.Counter(), collections.Counter(), [], []
    for case in range(CORPUS_CASES):
        arch = list(package_paths)[case % len(package_paths)]
        package = tmp_path / f"case-{case}"
        shutil.copytree(package_paths[arch], package)
        files = sorted(p.name for p in package.iterdir())
        name = "manifest.json" if rng.random() < 0.4 else files[int(rng.integers(len(files)))]
        if rng.random() < 0.08:
            how = "deleted"
            (package / name).unlink()
        else:
            how, data = _damage_bytes((package / name).read_bytes(), rng)
            if data == (package / name).read_bytes():
                how += " (no change)"
            (package / name).write_bytes(data)
        label = f"{arch}/{name} {how}"
        try:
            answer = _answer(rt.load(package, threads=1), arch)
        except OnnxformerError as err:
            assert err.code in CODES and err.code != "E_ONNXFORMER", (label, err.code)
            outcomes["error"] += 1
            codes[err.code] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            leaks.append(f"{label}: {type(err).__name__}: {err}")
            continue
        if answer == expected[arch]:
            outcomes["fine"] += 1
        else:
            silent.append(label)
        shutil.rmtree(package)
    assert not leaks, "\n".join(leaks)
    assert not silent, f"damaged packages that load and answer differently: {silent}"
    assert outcomes["error"] + outcomes["fine"] == CORPUS_CASES
    figures.record("damaged packages (issue 14)", "generated corpus: random damage to a random file of the decoder, "
                   "encoder and encoder-decoder packages (1-8 bytes changed, truncated, bytes appended, a 64-byte "
                   "zero run, one printable character, emptied, deleted; 40% on manifest.json), checksums not forged",
                   CORPUS_CASES,
                   f"{outcomes['error']} OnnxformerError with a code ({', '.join(f'{k} {v}' for k, v in codes.most_common())}), "
                   f"{outcomes['fine']} provably fine (loaded, the undamaged answer exactly); 0 raw foreign "
                   "exceptions, 0 silent successes (loaded and answered differently)")


def test_a_label_name_changed_by_one_character_is_refused(package_copy, models):
    """manifest.json has no digest of its own: load() checks label_names against model_config's."""
    package = package_copy("encoder")
    text = (package / "manifest.json").read_text()
    label = models["encoder"].label_names[0]
    (package / "manifest.json").write_text(text.replace(f'"{label}"', f'"{label[:-1]}#"', 1))
    refused(package, "label_names .* differ from its model_config.label_names", "E_MANIFEST")
    assert "set label_names to the model_config's" in str(refused(package, "label_names", "E_MANIFEST"))
    rewrite_manifest(package, lambda m: m.update(label_names=m["model_config"]["label_names"]))  # the fix, applied
    assert rt.load(package).classify(["the cat"])[0].label in models["encoder"].label_names
