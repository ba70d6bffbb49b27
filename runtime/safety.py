"""Refuse ONNX graphs that would make onnxruntime read files outside their package.

An ONNX tensor can keep its bytes in another file: ``TensorProto.external_data`` holds
``{"location": <path relative to the .onnx>, "offset": ..., "length": ...}``. A hostile or
damaged package can point ``location`` anywhere (``../../etc/passwd``, ``/home/me/.ssh/id_rsa``,
a symlink inside the package that leads out of it). Recent onnxruntime builds refuse such
paths themselves, older ones (the runtime accepts onnxruntime >= 1.18) follow them, and either
way the user deserves a message that says what is wrong. So the runtime reads every
``location`` before onnxruntime opens the file and accepts only plain file names that the
manifest lists for that graph and that resolve inside the package directory.

The `onnx` package is not a runtime dependency, so this module walks the protobuf wire
format itself. It descends only into the messages that can hold a TensorProto (the schema
below, field numbers from onnx.proto) and skips every other field by its length, so a graph
is only walked where it holds the bytes ``location`` (the key of every external-data entry):
a graph with inline weights costs one C-speed search of a memory-mapped file. A file the
walk finds malformed is refused as damaged. No torch, no onnx; stdlib only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from .errors import InputError, PackageError

# message -> {field number: message type of that (sub)message field}. Every path from
# ModelProto to a TensorProto in onnx.proto (IR version 10); tests/reliability checks this
# table against onnx's own descriptors.
_SCHEMA: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
}
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 1, 8, 13  # TensorProto fields
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto fields
_KEY = b"location"  # the external_data key, stored verbatim in the file
MAX_DEPTH = 64  # nested subgraphs deeper than this are refused rather than recursed into


class ExternalRef(NamedTuple):
    tensor: str  # the tensor's name ("" if it has none)
    location: str  # external_data["location"], as written in the graph


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"truncated or overlong varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, value start, value end) of one message's fields."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 0:
            _, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise _Malformed(f"unsupported wire type {wire} at byte {pos}")
        if after > end:
            raise _Malformed(f"field {number} runs past the end of its message (byte {after} > {end})")
        yield number, wire, pos, after
        pos = after


def _text(buf: memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"invalid UTF-8 in a string field at byte {start}") from None


def _tensor(buf: memoryview, start: int, end: int, found: list[ExternalRef]) -> None:
    name, locations = "", []
    for number, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == _TENSOR_NAME:
            name = _text(buf, a, b)
        elif number == _TENSOR_EXTERNAL_DATA:
            key = value = None
            for n, w, c, d in _fields(buf, a, b):
                if w == 2 and n == _ENTRY_KEY:
                    key = _text(buf, c, d)
                elif w == 2 and n == _ENTRY_VALUE:
                    value = _text(buf, c, d)
            if key == "location":
                locations.append(value or "")
    found.extend(ExternalRef(name, location) for location in locations)


def _walk(data: mmap.mmap, buf: memoryview, start: int, end: int, message: str, depth: int,
          found: list[ExternalRef]) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested more than {MAX_DEPTH} deep")
    children = _SCHEMA[message]
    for number, wire, a, b in _fields(buf, start, end):
        child = children.get(number)
        if child is None or wire != 2 or data.find(_KEY, a, b) < 0:
            continue  # an external-data entry spells out its key: no "location" bytes, none inside
        if child == "TensorProto":
            _tensor(buf, a, b, found)
        else:
            _walk(data, buf, a, b, child, depth + 1, found)


@contextlib.contextmanager
def _mapped_graph(path: Path) -> Iterator[tuple[mmap.mmap, memoryview]]:
    """The graph file at ``path`` mapped read-only (its bytes and a view of them); an empty,
    unreadable or malformed file (a ``_Malformed`` raised inside the block) is PackageError
    E_GRAPH."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise PackageError(f"graph file {path.name!r} is empty; the package is damaged, re-export it",
                                   code="E_GRAPH")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                buf = memoryview(mapped)
                try:
                    yield mapped, buf
                except _Malformed as err:
                    raise PackageError(
                        f"graph file {path.name!r} is not a valid ONNX protobuf ({err}); "
                        "the package is damaged, re-export it",
                        code="E_GRAPH",
                    ) from None
                finally:
                    buf.release()
    except OSError as err:
        raise PackageError(f"cannot read graph file {str(path)!r}: {err.strerror or err}", code="E_GRAPH") from None


def external_data_refs(path: str | os.PathLike) -> list[ExternalRef]:
    """Every external-data ``location`` in the ONNX file at ``path`` (initializers, sparse
    initializers, tensor attributes of nodes and functions, subgraphs at any depth)."""
    found: list[ExternalRef] = []
    with _mapped_graph(Path(path)) as (mapped, buf):
        _walk(mapped, buf, 0, len(buf), "ModelProto", 0, found)
    return found


def _dims(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, ...]]:
    """A TensorProto's name and dims (repeated int64: packed or one varint per field)."""
    name, dims = "", []
    for number, wire, a, b in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == 2:
            name = _text(buf, a, b)
        elif number == _TENSOR_DIMS and wire == 0:
            dims.append(_varint(buf, a, b)[0])
        elif number == _TENSOR_DIMS and wire == 2:
            while a < b:
                value, a = _varint(buf, a, b)
                dims.append(value)
    return name, tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)


def initializer_dims(path: str | os.PathLike, wanted: Callable[[str], bool]) -> dict[str, tuple[int, ...]]:
    """The dims of the main graph's initializers whose name satisfies ``wanted(name)`` (a
    callable), read from the file at ``path`` without the onnx package. Every initializer's
    header is read; its bytes (inline or external) are skipped by length."""
    found: dict[str, tuple[int, ...]] = {}
    with _mapped_graph(Path(path)) as (_, buf):
        for number, wire, a, b in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH or wire != 2:
                continue
            for n, w, c, d in _fields(buf, a, b):
                if n == _GRAPH_INITIALIZER and w == 2:
                    name, dims = _dims(buf, c, d)
                    if wanted(name):
                        found[name] = dims
    return found


def _is_position_table(name: str) -> bool:
    """The initializers whose first dim is a position count: a built decoder's rotary caches
    (`cos_cache`, `sin_cache`), learned embeddings (`pos_emb.weight`, traced as
    `model.pos_emb.weight`) and a sinusoid table stored as `sinusoid`."""
    return name in ("cos_cache", "sin_cache") or name.endswith(("pos_emb.weight", "sinusoid")) and (
        name in ("pos_emb.weight", "sinusoid") or name.endswith((".pos_emb.weight", ".sinusoid")))


def position_tables(path: str | os.PathLike) -> dict[str, int]:
    """Position table name -> the positions it holds (its first dim), for the graph at ``path``."""
    return {name: dims[0] for name, dims in initializer_dims(path, _is_position_table).items() if dims}


def _plain(location: str) -> bool:
    return (
        bool(location) and location not in (".", "..")
        and not any(c in location for c in ("/", "\\", ":", "\x00"))
        and location == os.path.basename(location)
    )


def check_external_data(graph_path: str | os.PathLike, allowed: Iterable[str],
                        trusted_roots: Sequence[Path] = ()) -> list[ExternalRef]:
    """Refuse a graph whose external data is not a listed file inside its own directory (a
    link into one of ``trusted_roots`` counts as inside: see `trusted_roots`).

    ``allowed``: the external-data file names the manifest lists for this graph (their
    checksums are what `Manifest.verify_files` checks). Returns the references found.
    """
    graph_path = Path(graph_path)
    directory = graph_path.parent.resolve()
    allowed = set(allowed)
    refs = external_data_refs(graph_path)
    for ref in refs:
        what = f"graph {graph_path.name!r} reads tensor {ref.tensor!r} from external file {ref.location!r}"
        if not _plain(ref.location):
            raise PackageError(
                f"{what}, a path outside the package directory; refused. A package may only "
                "reference files in its own directory; this one is damaged or hostile, do not use it",
                code="E_EXTERNAL_DATA",
            )
        if ref.location not in allowed:
            raise PackageError(
                f"{what}, which the manifest does not list for this graph (listed: "
                f"{', '.join(sorted(allowed)) or 'none'}); refused: the package is damaged, re-export it",
                code="E_EXTERNAL_DATA",
            )
        if not inside_package((directory / ref.location).resolve(), directory, trusted_roots):
            raise PackageError(
                f"{what}, which is a link leading outside the package directory; refused. "
                f"A package may only reference files in its own directory. {TRUST_ADVICE}",
                code="E_EXTERNAL_DATA",
            )
    return refs


# Content stores ----------------------------------------------------------------------------
TRUSTED_STORES_ENV = "ONNXFORMER_TRUSTED_STORES"  # os.pathsep-separated directories
TRUST_ADVICE = (f"If the package's files are links into a content store you trust (the Hugging Face cache lays out "
                f"snapshots so), pass trusted_roots=[STORE] to load() (CLI: --trust-store STORE; or set "
                f"{TRUSTED_STORES_ENV}=STORE)")


def trusted_roots(given: Any = None) -> tuple[Path, ...]:
    """The resolved directories a package's links may lead into: ``given`` (a list of paths)
    and those in the environment variable ONNXFORMER_TRUSTED_STORES. Each must exist."""
    if given is None:
        given = []
    if isinstance(given, (str, bytes, os.PathLike)) or not isinstance(given, (list, tuple)):
        raise InputError(f"trusted_roots must be a list of directory paths; got {type(given).__name__} "
                         f"({given!r:.60}). Pass e.g. trusted_roots=[\"~/.cache/huggingface/hub\"]")
    env = [p for p in os.environ.get(TRUSTED_STORES_ENV, "").split(os.pathsep) if p]
    roots = []
    for root, source in [*((r, "trusted_roots") for r in given), *((r, TRUSTED_STORES_ENV) for r in env)]:
        if not isinstance(root, (str, os.PathLike)):
            raise InputError(f"{source} entries must be paths; got {type(root).__name__} ({root!r:.60})")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise InputError(f"{source}: {str(root)!r} is not a directory; pass an existing content store directory")
        roots.append(path.resolve())
    return tuple(roots)


def inside_package(resolved: Path, directory: Path, roots: Sequence[Path] = ()) -> bool:
    """A package file, links followed (``resolved``), lies directly in the package ``directory``
    or anywhere under a trusted root."""
    return resolved.parent == directory or any(resolved.is_relative_to(root) for root in roots)


__all__ = ["ExternalRef", "check_external_data", "external_data_refs", "initializer_dims",
           "inside_package", "position_tables", "trusted_roots"]
