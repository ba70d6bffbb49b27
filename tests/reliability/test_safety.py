"""runtime/safety.py on hand-encoded protobuf, with neither torch nor onnx: the runtime's own
guard against external data outside the package works in the base install."""

from __future__ import annotations

import pytest

from onnxformer.runtime.errors import PackageError
from onnxformer.runtime.safety import ExternalRef, check_external_data, external_data_refs

pytestmark = pytest.mark.runtime_only


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:  # a length-delimited field (wire type 2)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor(name: str, location: str) -> bytes:
    entries = b"".join(field(13, field(1, k.encode()) + field(2, v.encode()))
                       for k, v in (("location", location), ("offset", "0"), ("length", "16")))
    return field(8, name.encode()) + entries + varint(14 << 3) + varint(1)  # data_location = EXTERNAL


def model(*graph_fields: bytes) -> bytes:
    return varint(1 << 3) + varint(8) + field(7, b"".join(graph_fields))  # ir_version 8, graph


def test_finds_initializers_node_attributes_and_subgraphs(tmp_path):
    initializer = field(5, tensor("w", "w.bin"))
    attribute = field(1, field(5, field(5, tensor("c", "../c.bin"))))  # node.attribute.t
    subgraph = field(1, field(5, field(6, field(5, tensor("s", "/etc/passwd")))))  # node.attribute.g.initializer
    path = tmp_path / "g.onnx"
    path.write_bytes(model(initializer, attribute, subgraph))
    assert external_data_refs(path) == [ExternalRef("w", "w.bin"), ExternalRef("c", "../c.bin"),
                                        ExternalRef("s", "/etc/passwd")]
    with pytest.raises(PackageError, match="tensor 'c' from external file '../c.bin', a path outside the package"):
        check_external_data(path, ["w.bin"])


@pytest.mark.parametrize("location", ["../x.bin", "/abs/x.bin", "a/b.bin", "..\\x.bin", "C:x.bin", "", ".."])
def test_refuses_locations_that_are_not_plain_names(tmp_path, location):
    path = tmp_path / "g.onnx"
    path.write_bytes(model(field(5, tensor("w", location))))
    with pytest.raises(PackageError, match="a path outside the package directory; refused"):
        check_external_data(path, [location])


def test_refuses_unlisted_files_and_links_out(tmp_path):
    path = tmp_path / "g.onnx"
    path.write_bytes(model(field(5, tensor("w", "w.bin"))))
    with pytest.raises(PackageError, match="which the manifest does not list"):
        check_external_data(path, [])
    (tmp_path.parent / "outside.bin").write_bytes(b"\0" * 16)
    (tmp_path / "w.bin").symlink_to(tmp_path.parent / "outside.bin")
    with pytest.raises(PackageError, match="a link leading outside the package directory"):
        check_external_data(path, ["w.bin"])
    (tmp_path / "w.bin").unlink()
    (tmp_path / "w.bin").write_bytes(b"\0" * 16)
    assert check_external_data(path, ["w.bin"]) == [ExternalRef("w", "w.bin")]


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x3a\x10abc",
                                  b"\x3b", b"\x3a\x0a\x0a\x08location"])
def test_malformed_protobuf_is_a_package_error(tmp_path, data):
    path = tmp_path / "g.onnx"
    path.write_bytes(data)
    with pytest.raises(PackageError, match="'g.onnx' is (empty|not a valid ONNX protobuf)"):
        external_data_refs(path)


def test_deeply_nested_subgraphs_are_refused(tmp_path):
    graph = field(5, tensor("w", "x.bin"))
    for _ in range(100):  # graph -> node -> attribute -> g, 100 times
        graph = field(1, field(5, field(6, graph)))
    path = tmp_path / "g.onnx"
    path.write_bytes(field(7, graph))
    with pytest.raises(PackageError, match="nested more than 64 deep"):
        external_data_refs(path)
