"""Issue 14: a package is checked against itself at load, and links into a content store are
refused unless the store is trusted explicitly.

* `max_seq_len` above its `model_config.max_seq_len`, or above a graph's built-in position
  table (a built decoder's rotary cos/sin caches, a learned position embedding, a traced
  sinusoid table, which the exporter stores as `model.sinusoid`), is refused
  as E_MANIFEST naming both numbers; the fix the message names (lower it) loads.
* A package laid out like a Hugging Face cache snapshot (every file a link into `blobs/`) is
  refused by default with advice; the advice applied (trusted_roots, --trust-store,
  ONNXFORMER_TRUSTED_STORES) loads it, and the checksums are still verified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import subprocess

import pytest

import onnxformer.runtime as rt
from onnxformer.runtime import InputError, PackageError
from onnxformer.runtime.safety import TRUSTED_STORES_ENV, position_tables
from reliability_support import raised_by_us, rewrite_manifest, run_cli

onnx = pytest.importorskip("onnx")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
from support import HAS_NODE, NODE_DIR  # noqa: E402


def refused(directory: Path, pattern: str, code: str, error=PackageError, **kwargs):
    with pytest.raises(error, match=pattern) as excinfo:
        rt.load(directory, **kwargs)
    assert raised_by_us(excinfo), excinfo.traceback[-1].path
    assert excinfo.value.code == code, (excinfo.value.code, str(excinfo.value))
    return excinfo.value


def onnx_first_dims(path: Path) -> dict[str, int]:
    """The independent reading: onnx's own parser, every initializer's first dim."""
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: t.dims[0] for t in model.graph.initializer if t.dims}


# --- max_seq_len against the manifest itself and the graphs ---------------------------------
@pytest.mark.parametrize("name", ["decoder", "encoder"])
def test_max_seq_len_above_model_config_is_refused_and_the_fix_loads(package_copy, name):
    package = package_copy(name)
    trained = rewrite_manifest(package, lambda d: None)["model_config"]["max_seq_len"]
    rewrite_manifest(package, lambda d: d.update(max_seq_len=4096))
    err = refused(package, "max_seq_len", "E_MANIFEST")
    assert "4096" in str(err) and f"({trained})" in str(err) and f"set max_seq_len to {trained}" in str(err)
    rewrite_manifest(package, lambda d: d.update(max_seq_len=trained))  # the fix the message names
    assert rt.load(package).manifest.max_seq_len == trained


@pytest.mark.parametrize("name, table", [("decoder", "cos_cache"), ("encoder", "model.pos_emb.weight")])
def test_max_seq_len_above_a_graph_position_table_is_refused(package_copy, tmp_path, name, table):
    """model_config removed (it is optional): the graph's own table is the limit. The decoder
    is the repository's built graph (the tiny test models' head size is below what
    GroupQueryAttention takes), which reads the rotary caches: 4096 crashed in onnxruntime."""
    if name == "decoder":
        if not (ARTIFACTS / "decoder" / "decoder.onnx").is_file():
            pytest.skip("artifacts/decoder is not built")
        package = tmp_path / "built"
        shutil.copytree(ARTIFACTS / "decoder", package)
    else:
        package = package_copy(name)
    graph = package / f"{name}.onnx"
    positions = onnx_first_dims(graph)[table]
    assert position_tables(graph)[table] == positions  # the stdlib walk reads what onnx reads
    rewrite_manifest(package, lambda d: (d.update(max_seq_len=4096), d["model_config"].pop("max_seq_len")))
    err = refused(package, f"graph '{name}'.*'{table}' has {positions} positions", "E_MANIFEST")
    assert "4096" in str(err)
    rewrite_manifest(package, lambda d: d.update(max_seq_len=positions))
    model = rt.load(package)
    if name == "decoder":  # the full length runs: no raw onnxruntime error at the table's end
        prompt = [1] * (positions - 4)
        assert len(model.generate_ids([prompt], max_new_tokens=3, eos_token_ids=[])[0].token_ids[0]) == 3


@pytest.fixture
def sinusoidal_copy(package_factory, tmp_path) -> Path:
    """An encoder-decoder with sinusoidal positions (traced: the table was an anonymous
    constant, so an edited max_seq_len ran past its end unchecked), model_config's limit removed."""
    package = tmp_path / "sinusoidal"
    shutil.copytree(package_factory("encoder-decoder", "sinusoidal")[2].path, package)
    rewrite_manifest(package, lambda d: (d.update(max_seq_len=4096), d["model_config"].pop("max_seq_len")))
    return package


def test_a_traced_sinusoid_table_is_named_and_holds_max_seq_len(sinusoidal_copy):
    for name in ("encoder", "decoder"):
        graph = sinusoidal_copy / f"{name}.onnx"
        assert position_tables(graph) == {"model.sinusoid": onnx_first_dims(graph)["model.sinusoid"]}
    positions = onnx_first_dims(sinusoidal_copy / "encoder.onnx")["model.sinusoid"]
    err = refused(sinusoidal_copy, f"graph '(encoder|decoder)'.*'model.sinusoid' has {positions} positions", "E_MANIFEST")
    assert "4096" in str(err) and f"set max_seq_len to {positions}" in str(err)
    assert set(position_tables(sinusoidal_copy / "cross_attention.onnx")) == set()  # embeds no positions
    rewrite_manifest(sinusoidal_copy, lambda d: d.update(max_seq_len=positions))  # the fix the message names
    model = rt.load(sinusoidal_copy)
    with pytest.raises(InputError, match=f"takes at most {positions}"):  # the limit is now the table's
        model.generate("one " * (positions + 10), max_new_tokens=2)


@pytest.mark.skipif(not HAS_NODE, reason="needs Node and runtime/node's npm packages (npm ci)")
def test_node_refuses_the_same_sinusoidal_package(sinusoidal_copy):
    done = subprocess.run(["node", str(NODE_DIR / "cli.js"), "generate", str(sinusoidal_copy), "one"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error[E_MANIFEST]" in done.stderr and "'model.sinusoid'" in done.stderr, done


def test_position_tables_of_graphs_without_one(package_paths):
    """A rotary traced graph computes its positions: no table, no limit read from it."""
    for graph in Path(package_paths["encoder-decoder"]).glob("*.onnx"):
        names = set(onnx_first_dims(graph))
        assert set(position_tables(graph)) <= names


def test_a_lower_max_seq_len_loads_and_is_respected(package_copy):
    package = package_copy("decoder")
    rewrite_manifest(package, lambda d: d.update(max_seq_len=16))
    model = rt.load(package)
    with pytest.raises(InputError) as excinfo:
        model.generate_ids([[1] * 15], max_new_tokens=4)
    assert excinfo.value.code in ("E_TOO_LONG", "E_CONFIG", "E_INPUT")


# --- links into a content store --------------------------------------------------------------
def hub_layout(package: Path, root: Path) -> Path:
    """Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    blobs, snapshot = root / "models--x--y" / "blobs", root / "models--x--y" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in package.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot


def test_store_links_are_refused_by_default_with_advice_that_works(package_paths, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_STORES_ENV, raising=False)
    snapshot = hub_layout(Path(package_paths["decoder"]), tmp_path / "hub")
    err = refused(snapshot, "resolves outside the package directory; refused", "E_PACKAGE")
    assert "trusted_roots=[STORE]" in str(err) and "--trust-store" in str(err) and TRUSTED_STORES_ENV in str(err)
    err = refused(snapshot, "a link leading outside the package directory", "E_EXTERNAL_DATA", verify=False)
    assert "trusted_roots=[STORE]" in str(err)
    want = rt.load(package_paths["decoder"]).generate_ids([[1, 5, 6]], max_new_tokens=4)[0].token_ids
    for roots in ([tmp_path / "hub"], [str(tmp_path / "hub" / "models--x--y" / "blobs")]):
        model = rt.load(snapshot, trusted_roots=roots)
        assert model.generate_ids([[1, 5, 6]], max_new_tokens=4)[0].token_ids == want
    monkeypatch.setenv(TRUSTED_STORES_ENV, str(tmp_path / "hub"))
    assert rt.load(snapshot).arch == "decoder"


def test_a_trusted_store_still_verifies_checksums_and_bounds(package_paths, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_STORES_ENV, raising=False)
    snapshot = hub_layout(Path(package_paths["decoder"]), tmp_path / "hub")
    tokenizer = (snapshot / "tokenizer.json").resolve()
    data = bytearray(tokenizer.read_bytes())
    data[len(data) // 2] ^= 1
    tokenizer.write_bytes(bytes(data))
    refused(snapshot, "tokenizer.json", "E_CHECKSUM", trusted_roots=[tmp_path / "hub"])
    # a link out of the trusted store is still refused
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(Path(package_paths["decoder"]) / "tokenizer.json", elsewhere / "tokenizer.json")
    (snapshot / "tokenizer.json").unlink()
    os.symlink(elsewhere / "tokenizer.json", snapshot / "tokenizer.json")
    refused(snapshot, "resolves outside the package directory", "E_PACKAGE", trusted_roots=[tmp_path / "hub"])


@pytest.mark.parametrize("roots, pattern", [("/tmp", "must be a list"), (["/does/not/exist"], "not a directory"),
                                            ([3], "must be paths")])
def test_bad_trusted_roots(package_paths, roots, pattern):
    refused(package_paths["decoder"], pattern, "E_INPUT", error=InputError, trusted_roots=roots)


def test_bad_trusted_store_env(package_paths, monkeypatch):
    monkeypatch.setenv(TRUSTED_STORES_ENV, "/does/not/exist")
    err = refused(package_paths["decoder"], TRUSTED_STORES_ENV, "E_INPUT", error=InputError)
    assert "/does/not/exist" in str(err)


def test_cli_trust_store(package_paths, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_STORES_ENV, raising=False)
    snapshot = hub_layout(Path(package_paths["decoder"]), tmp_path / "hub")
    result = run_cli(["generate", str(snapshot), "hello", "--max-new-tokens", "2"])
    assert result.rc == 2 and "error[E_PACKAGE]" in result.err and "--trust-store" in result.err, result
    result = run_cli(["generate", str(snapshot), "hello", "--max-new-tokens", "2", "--trust-store", str(tmp_path / "hub")])
    assert result.rc == 0, result


# --- decode of ids outside the vocabulary (Node agreed with this in issue 14) ---------------
def test_decode_refuses_ids_outside_the_vocabulary(models):
    with pytest.raises(InputError) as excinfo:
        models["decoder"].decode([999999])
    assert excinfo.value.code == "E_TOKEN_ID"
