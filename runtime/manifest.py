"""The package manifest (`manifest.json`): everything a runtime in any language needs.

Written by export, read (and checked) by every runtime. No torch; stdlib + numpy only.

A package is one directory::

    manifest.json       this file's contents (see Manifest)
    tokenizer.json      the `tokenizers` file training used
    encoder.onnx        encoder-only and encoder-decoder
    cross_attention.onnx  encoder-decoder
    decoder.onnx        decoder step: decoder-only, prefix-lm, encoder-decoder
    *.onnx_data         external weights, only for graphs over the 2 GB protobuf limit

Versioning: `format_version` is an integer. A reader accepts the versions it knows
(SUPPORTED_FORMAT_VERSIONS) and refuses others with a clear message; a change that an older
reader could misread bumps it. Unknown extra fields are ignored by readers (additions that do
not change the meaning of existing fields do not bump the version).

    1   every package up to the "shared" KV-cache layout (`kv_cache` absent or "concat")
    2   `kv_cache` "shared": the decoder graph takes right-padded rows, `sequence_lengths` and
        preallocated KV buffers (runtime/FORMAT.md section 7); a version-1 reader would bind it
        wrongly, so it refuses the version instead
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .contract import ENCODER as ENCODER_GRAPH, KV_CACHE_LAYOUTS, Dims, GraphSpec, graph_specs, graph_specs_from_dict
from .errors import ConfigError, PackageError
from .safety import TRUST_ADVICE, inside_package, position_tables
from .generation import GenerationConfig
from .prompt_format import PromptFormat, from_manifest as _prompt_format

FORMAT_NAME = "onnxformer-package"
FORMAT_VERSION = 1  # of a "concat" package; a "shared" one is SHARED_CACHE_FORMAT_VERSION
SHARED_CACHE_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKEN_ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep", "decoder_start")
EMBEDDING_POOLINGS = ("mean", "cls")
SOURCE_STRINGS = ("format", "model_type", "family")  # `source` entries a reader checks (all optional)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks into one reused buffer: as fast as hashing
    a memory map here (~1.4 GB/s), without the map's pages counting in the process's peak RSS
    (+134 MB for the benchmark decoder) or a SIGBUS if the file were truncated meanwhile."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _draft(data: Any) -> dict[str, Any] | None:
    """The manifest's draft section: the subfolder and its manifest's checksum (FORMAT.md 2.6)."""
    if data is None:
        return None
    _require(data, ("dir", "sha256", "bytes"), "manifest draft")
    entry = FileEntry.from_dict({"file": data["dir"], "sha256": data["sha256"], "bytes": data["bytes"]}, "manifest draft")
    return {"dir": entry.file, "sha256": entry.sha256, "bytes": entry.bytes}


def _plain_name(name: Any, what: str) -> str:
    """A file name inside the package: no directories, no '..', no absolute paths."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or name != os.path.basename(name) or "\x00" in name:
        raise PackageError(
            f"{what} {name!r} is not a plain file name inside the package; "
            "a package may only reference files in its own directory",
            code="E_MANIFEST",
        )
    return name


@dataclass(frozen=True)
class FileEntry:
    """A file of the package with its checksum."""

    file: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "FileEntry":
        _require(data, ("file", "sha256", "bytes"), what)
        sha256 = data["sha256"]
        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PackageError(f"{what} sha256 must be 64 lowercase hex digits; got {sha256!r:.80}. Re-export the package",
                               code="E_MANIFEST")
        return cls(_plain_name(data["file"], f"{what} file"), sha256, _integer(data, "bytes", what, minimum=0))

    @classmethod
    def of(cls, directory: Path, name: str) -> "FileEntry":
        path = directory / name
        return cls(name, sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class GraphEntry:
    """One graph: its I/O spec, its file, and external-data files when it has any."""

    spec: GraphSpec
    file: FileEntry
    external_data: tuple[FileEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = self.spec.to_dict()
        data.update(sha256=self.file.sha256, bytes=self.file.bytes)
        data["external_data"] = [e.to_dict() for e in self.external_data]
        return data

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "GraphEntry":
        what = f"manifest graphs.{name}"
        _require(data, ("file", "sha256", "bytes", "inputs", "outputs"), what)
        spec = graph_specs_from_dict({name: {k: data[k] for k in ("file", "inputs", "outputs")} | {"name": name}})[name]
        file = FileEntry.from_dict({k: data[k] for k in ("file", "sha256", "bytes")}, what)
        external_data = data.get("external_data", [])
        if not isinstance(external_data, list):
            raise PackageError(f"{what}.external_data must be a list of file entries; got {type(external_data).__name__}",
                               code="E_MANIFEST")
        external = tuple(FileEntry.from_dict(e, f"{what}.external_data") for e in external_data)
        return cls(spec, file, external)


def _require(data: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(data, Mapping):
        raise PackageError(f"{what} must be a JSON object; got {type(data).__name__}", code="E_MANIFEST")
    missing = [k for k in keys if k not in data]
    if missing:
        raise PackageError(f"{what} is missing field(s) {', '.join(missing)}; re-export the package", code="E_MANIFEST")


def _integer(data: Mapping[str, Any], key: str, what: str, *, minimum: int) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PackageError(f"{what} {key} must be an integer >= {minimum}; got {value!r:.80}. Re-export the package",
                           code="E_MANIFEST")
    return value


def _object(data: Mapping[str, Any], key: str, what: str = "manifest") -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise PackageError(f"{what} {key} must be a JSON object; got {type(value).__name__}. Re-export the package",
                           code="E_MANIFEST")
    return dict(value)


def _label_names(value: Any, num_labels: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PackageError(f"manifest label_names must be a list of non-empty strings; got {value!r:.80}",
                           code="E_MANIFEST")
    if value and len(value) != num_labels:
        raise PackageError(
            f"manifest label_names has {len(value)} name(s) but the model has {num_labels} label(s); "
            "re-export the package",
            code="E_MANIFEST",
        )
    if len(set(value)) != len(value):
        raise PackageError(f"manifest label_names has duplicates: {value!r:.120}", code="E_MANIFEST")
    return tuple(value)


def _same_prompt_format(trained: Any, mine: dict[str, Any] | None) -> bool:
    """model_config's prompt_format (what training used; None: raw) says the same as the manifest's."""
    if mine is None:
        return trained is None
    return isinstance(trained, Mapping) and all(trained.get(k) == v for k, v in mine.items())


@dataclass(frozen=True)
class Manifest:
    """The parsed, checked `manifest.json`."""

    arch: str
    dims: Dims
    max_seq_len: int
    float_dtype: str  # graph float I/O: "float32" | "float16"
    weights: str  # "float32" | "float16" | "int8" | "int4" (MatMulNBits weight-only) | "int8-dynamic" (encoders)
    special_tokens: dict[str, int]  # role -> id, -1 when absent
    label_names: tuple[str, ...]
    generation: dict[str, Any]  # defaults for GenerationConfig
    tokenizer: FileEntry
    graphs: dict[str, GraphEntry]
    opset: int
    producer: dict[str, str]
    validation: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kv_cache: str = "concat"  # the decoder's KV-cache layout: "concat" | "shared" (contract.KV_CACHE_LAYOUTS)
    prompt_format: PromptFormat | None = None  # what generate() wraps a text prompt in (runtime/prompt_format.py); None: raw
    chat_template: str | None = None  # the Jinja chat template chat() renders (runtime/chat.py); None: no chat()
    chat_tokens: dict[str, str] = field(default_factory=dict)  # the template's bos_token, eos_token, ... by name
    embedding: dict[str, Any] | None = None  # embed()'s defaults: {"pooling": "mean" | "cls", "normalize": bool}
    source: dict[str, Any] = field(default_factory=dict)  # where the model came from: {"format": "huggingface", ...}
    # speculative decoding's draft package in a subfolder: {"dir": NAME, "sha256": ..., "bytes": ...} of
    # its manifest.json (FORMAT.md 2.6); None: no draft
    draft: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_LAYOUTS:
            raise PackageError(f"manifest kv_cache must be one of {list(KV_CACHE_LAYOUTS)}; got {self.kv_cache!r:.60}. "
                               "Re-export the package", code="E_MANIFEST")
        needed = SHARED_CACHE_FORMAT_VERSION if self.kv_cache == "shared" else FORMAT_VERSION
        if self.format_version != needed:
            raise PackageError(f"manifest kv_cache {self.kv_cache!r} needs format_version {needed}; got "
                               f"{self.format_version!r}. The package is damaged; re-export it", code="E_MANIFEST")
        expected = graph_specs(self.dims, self.float_dtype, self.kv_cache)
        if set(self.graphs) != set(expected):
            raise PackageError(
                f"manifest lists graphs {sorted(self.graphs)} but arch {self.arch!r} needs "
                f"{sorted(expected)}; re-export the package",
                code="E_MANIFEST",
            )
        for name, entry in self.graphs.items():
            if entry.spec != expected[name]:
                raise PackageError(
                    f"manifest I/O of graph {name!r} does not match the contract for these dims "
                    f"(expected inputs {expected[name].input_names}, outputs {expected[name].output_names}); "
                    "the package is damaged or from an incompatible exporter; re-export it",
                    code="E_GRAPH_IO",
                )
        missing = [r for r in SPECIAL_TOKEN_ROLES if r not in self.special_tokens]
        if missing:
            raise PackageError(f"manifest special_tokens is missing role(s) {', '.join(missing)}", code="E_MANIFEST")
        for role, value in self.special_tokens.items():
            if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < self.dims.vocab_size:
                raise PackageError(
                    f"manifest special_tokens.{role} = {value!r:.80} is outside [-1, vocab_size={self.dims.vocab_size})",
                    code="E_MANIFEST",
                )
        if self.prompt_format is not None and self.arch == "encoder":
            raise PackageError("manifest prompt_format applies to generating packages; an encoder package has none. "
                               "Re-export the package", code="E_MANIFEST")
        trained = self.model_config.get("max_seq_len")
        if is_integer(trained) and self.max_seq_len > trained:
            raise PackageError(f"manifest max_seq_len ({self.max_seq_len}) is more than its model_config.max_seq_len "
                               f"({trained}), the longest sequence the model was built for; the manifest was edited "
                               f"or is damaged: set max_seq_len to {trained} or less, or re-export the package",
                               code="E_MANIFEST")
        trained_labels = self.model_config.get("label_names")
        if isinstance(trained_labels, list) and list(self.label_names) != trained_labels:
            raise PackageError(f"manifest label_names {list(self.label_names)!r:.120} differ from its "
                               f"model_config.label_names {trained_labels!r:.120}, the labels the model was trained "
                               "with; the manifest was edited or is damaged: set label_names to the model_config's, "
                               "or re-export the package", code="E_MANIFEST")
        mine, trained = self.prompt_format.to_dict() if self.prompt_format else None, self.model_config.get("prompt_format")
        if "prompt_format" in self.model_config and not _same_prompt_format(trained, mine):
            raise PackageError(f"manifest prompt_format {mine!r:.80} differs from its model_config.prompt_format "
                               f"{trained!r:.80}, the format the model was trained with; the "
                               "manifest was edited or is damaged: set prompt_format to the model_config's, or "
                               "re-export the package", code="E_MANIFEST")
        self._check_imported_fields()
        if self.arch == "encoder-decoder" and self.special_tokens["decoder_start"] < 0:
            raise PackageError("manifest special_tokens.decoder_start is -1, but an encoder-decoder model needs a "
                               "decoder start token; re-export the package", code="E_MANIFEST")
        if self.generation:
            try:
                defaults = GenerationConfig.from_dict(self.generation)
            except ConfigError as err:
                raise PackageError(f"manifest generation defaults are invalid: {err}. Re-export the package",
                                   code="E_MANIFEST") from None
            ids = [*(defaults.eos_token_ids or ()), *([] if defaults.pad_token_id is None else [defaults.pad_token_id]),
                   *(defaults.forced_eos_token_id or ()),
                   *([] if defaults.forced_bos_token_id is None else [defaults.forced_bos_token_id])]
            if ids and max(ids) >= self.dims.vocab_size:
                raise PackageError(f"manifest generation token ids {ids} are outside vocab_size "
                                   f"{self.dims.vocab_size}; re-export the package", code="E_MANIFEST")

    def _check_imported_fields(self) -> None:
        """`chat_template`, `embedding` and `source` (FORMAT.md 2.1): what an imported model brings."""
        if self.chat_template is not None:
            if not isinstance(self.chat_template, str) or not self.chat_template.strip():
                raise PackageError(f"manifest chat_template must be a non-empty string (a Jinja template) or absent; "
                                   f"got {self.chat_template!r:.80}. Re-export the package", code="E_MANIFEST")
            if self.arch == "encoder":
                raise PackageError("manifest chat_template applies to generating packages; an encoder package has "
                                   "none. Re-export the package", code="E_MANIFEST")
        if not isinstance(self.chat_tokens, Mapping) or not all(
                isinstance(k, str) and k.endswith("_token") and isinstance(v, str) and v for k, v in self.chat_tokens.items()):
            raise PackageError(f"manifest chat_tokens must be a JSON object of non-empty token strings by "
                               f"<role>_token name ({{\"bos_token\": \"<s>\"}}); got {self.chat_tokens!r:.80}. "
                               "Re-export the package", code="E_MANIFEST")
        if self.embedding is not None:
            if not isinstance(self.embedding, Mapping):
                raise PackageError(f"manifest embedding must be a JSON object {{\"pooling\": ..., \"normalize\": ...}} "
                                   f"or absent; got {type(self.embedding).__name__}. Re-export the package",
                                   code="E_MANIFEST")
            unknown = sorted(set(self.embedding) - {"pooling", "normalize"})
            if unknown:
                raise PackageError(f"manifest embedding has unknown field(s) {', '.join(map(str, unknown))}; it takes "
                                   "pooling and normalize only. Upgrade onnxformer or re-export the package",
                                   code="E_MANIFEST")
            pooling, normalize = self.embedding.get("pooling", "mean"), self.embedding.get("normalize", True)
            if not isinstance(pooling, str) or pooling not in EMBEDDING_POOLINGS:
                raise PackageError(f"manifest embedding.pooling must be one of {list(EMBEDDING_POOLINGS)}; got "
                                   f"{pooling!r:.60}. Re-export the package", code="E_MANIFEST")
            if not isinstance(normalize, bool):
                raise PackageError(f"manifest embedding.normalize must be true or false; got {normalize!r:.60}. "
                                   "Re-export the package", code="E_MANIFEST")
            if ENCODER_GRAPH not in self.graphs:
                raise PackageError(f"manifest embedding applies to packages with an encoder graph; a {self.arch!r} "
                                   "package has none. Re-export the package", code="E_MANIFEST")
        if not isinstance(self.source, Mapping):
            raise PackageError(f"manifest source must be a JSON object; got {type(self.source).__name__}. "
                               "Re-export the package", code="E_MANIFEST")
        for key in SOURCE_STRINGS:
            if key in self.source and not isinstance(self.source[key], str):
                raise PackageError(f"manifest source.{key} must be a string; got {self.source[key]!r:.60}. "
                                   "Re-export the package", code="E_MANIFEST")
        names = self.source.get("architectures", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PackageError(f"manifest source.architectures must be a list of strings; got {names!r:.80}. "
                               "Re-export the package", code="E_MANIFEST")

    def embedding_defaults(self) -> tuple[str, bool]:
        """(pooling, normalize) that embed() uses when the caller passes none."""
        defaults = self.embedding or {}
        return defaults.get("pooling", "mean"), defaults.get("normalize", True)

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "arch": self.arch,
            "kv_cache": self.kv_cache,
            "dims": self.dims.to_dict(),
            "max_seq_len": self.max_seq_len,
            "float_dtype": self.float_dtype,
            "weights": self.weights,
            "special_tokens": dict(self.special_tokens),
            "label_names": list(self.label_names),
            "generation": dict(self.generation),
            "tokenizer": self.tokenizer.to_dict(),
            "graphs": {name: entry.to_dict() for name, entry in self.graphs.items()},
            "opset": self.opset,
            "producer": dict(self.producer),
            "validation": self.validation,
            "model_config": self.model_config,
            **({"prompt_format": self.prompt_format.to_dict()} if self.prompt_format else {}),
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
            **({"chat_tokens": dict(self.chat_tokens)} if self.chat_tokens else {}),
            **({"embedding": dict(self.embedding)} if self.embedding is not None else {}),
            **({"source": dict(self.source)} if self.source else {}),
            **({"draft": dict(self.draft)} if self.draft is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        _require(data, ("format", "format_version"), "manifest")
        if data["format"] != FORMAT_NAME:
            raise PackageError(
                f"manifest format is {data['format']!r:.80}, expected {FORMAT_NAME!r}: not an onnxformer package",
                code="E_MANIFEST",
            )
        version = data["format_version"]
        if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
            raise PackageError(
                f"package format_version {version!r} is not supported by this runtime "
                f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                "upgrade onnxformer or re-export the package with this version",
                code="E_FORMAT_VERSION",
            )
        required = ("arch", "dims", "max_seq_len", "float_dtype", "weights", "special_tokens", "label_names",
                    "generation", "tokenizer", "graphs", "opset", "producer")
        _require(data, required, "manifest")
        graphs = _object(data, "graphs")
        dims = Dims.from_dict(_object(data, "dims"))
        if dims.arch != data["arch"]:
            raise PackageError(f"manifest arch {data['arch']!r:.80} disagrees with dims.arch {dims.arch!r}",
                               code="E_MANIFEST")
        for key in ("float_dtype", "weights"):
            if not isinstance(data[key], str):
                raise PackageError(f"manifest {key} must be a string; got {data[key]!r:.80}. Re-export the package",
                                   code="E_MANIFEST")
        return cls(
            arch=data["arch"],
            dims=dims,
            max_seq_len=_integer(data, "max_seq_len", "manifest", minimum=1),
            float_dtype=data["float_dtype"],
            weights=data["weights"],
            special_tokens=_object(data, "special_tokens"),
            label_names=_label_names(data["label_names"], dims.num_labels),
            generation=_object(data, "generation"),
            tokenizer=FileEntry.from_dict(data["tokenizer"], "manifest tokenizer"),
            graphs={name: GraphEntry.from_dict(name, entry) for name, entry in graphs.items()},
            opset=_integer(data, "opset", "manifest", minimum=1),
            producer=_object(data, "producer"),
            validation=_object(data, "validation"),
            model_config=_object(data, "model_config"),
            format_version=version,
            kv_cache=data.get("kv_cache", "concat"),
            prompt_format=_prompt_format(data.get("prompt_format")),
            chat_template=data.get("chat_template"),  # null: none, as absent
            chat_tokens=_object(data, "chat_tokens"),
            embedding=data.get("embedding"),
            source=_object(data, "source"),
            draft=_draft(data.get("draft")),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        directory = Path(directory)
        if not directory.is_dir():
            raise PackageError(f"package directory {str(directory)!r} does not exist or is not a directory",
                               code="E_MISSING_FILE")
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise PackageError(f"{str(path)!r} is missing: {str(directory)!r} is not an onnxformer package",
                               code="E_MANIFEST")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as err:
            raise PackageError(f"cannot read {str(path)!r}: {err.strerror or err}", code="E_MANIFEST") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise PackageError(f"{str(path)!r} is not valid JSON ({err}); the package is damaged, re-export it",
                               code="E_MANIFEST") from None
        return cls.from_dict(data)

    # Checks ---------------------------------------------------------------------------------
    def files(self) -> list[FileEntry]:
        """Every file of the package once (graphs may share an external-data file)."""
        entries = {self.tokenizer.file: self.tokenizer}
        for graph in self.graphs.values():
            for entry in (graph.file, *graph.external_data):
                if entries.setdefault(entry.file, entry) != entry:
                    raise PackageError(f"manifest lists package file {entry.file!r} twice with different "
                                       "checksums; the package is damaged, re-export it", code="E_MANIFEST")
        return list(entries.values())

    def verify_files(self, directory: str | os.PathLike, trusted_roots: Sequence[Path] = ()) -> None:
        """Every listed file exists inside the package (or, followed through links, inside one of
        `trusted_roots`: a content store such as the Hugging Face cache) and matches its size
        and sha256."""
        directory = Path(directory).resolve()
        for entry in self.files():
            path = (directory / entry.file).resolve()
            if not inside_package(path, directory, trusted_roots):
                raise PackageError(f"package file {entry.file!r} resolves outside the package directory; refused: it "
                                   f"leads to {str(path)!r}. {TRUST_ADVICE}", code="E_PACKAGE")
            if not path.is_file():
                raise PackageError(f"package file {entry.file!r} is missing from {str(directory)!r}; re-export the package",
                                   code="E_MISSING_FILE")
            size = path.stat().st_size
            if size != entry.bytes:
                raise PackageError(
                    f"package file {entry.file!r} has {size} bytes, the manifest says {entry.bytes}: "
                    "it was truncated or altered; re-export the package",
                    code="E_CHECKSUM",
                )
            try:
                digest = sha256_file(path)
            except OSError as err:
                raise PackageError(f"cannot read package file {entry.file!r}: {err.strerror or err}",
                                   code="E_PACKAGE") from None
            if digest != entry.sha256:
                raise PackageError(
                    f"package file {entry.file!r} has sha256 {digest[:16]}..., the manifest says "
                    f"{entry.sha256[:16]}...: it was altered or damaged; re-export the package",
                    code="E_CHECKSUM",
                )

    def check_graph_limits(self, directory: str | os.PathLike) -> None:
        """`max_seq_len` is within every graph's built-in position tables (the rotary cos/sin
        caches of a built decoder, learned or sinusoidal embeddings: FORMAT.md 2.1)."""
        for name, entry in self.graphs.items():
            for table, positions in position_tables(Path(directory) / entry.file.file).items():
                if self.max_seq_len > positions:
                    raise PackageError(
                        f"manifest max_seq_len ({self.max_seq_len}) is more than graph {name!r} supports: its position "
                        f"table {table!r} has {positions} positions; the manifest was edited or is damaged: set "
                        f"max_seq_len to {positions} or less, or re-export the package", code="E_MANIFEST")

    def special(self, role: str) -> int:
        return int(self.special_tokens.get(role, -1))

