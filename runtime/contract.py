"""The graph I/O contract: every input and output of every exported graph, declared once.

Export (names and dynamic axes of ``torch.onnx.export``), package validation and the runtime
(feeds, fetches, cache plumbing) all derive from :func:`graph_specs`. No torch here; numpy only.

Shape letters (used in every comment below and throughout the runtime):

    B    batch (rows)                           symbolic axis ``batch``
    T    new tokens fed in one decoder step     symbolic axis ``sequence``
    S    tokens of an encoder input             ``sequence`` in the encoder graph,
                                                ``encoder_sequence`` in the graphs that consume it
    P    tokens already in the KV cache         symbolic axis ``past_sequence``
    P+T  tokens attended to by a decoder step   symbolic axis ``total_sequence``
    Hkv  key/value heads                        static
    Dh   head size                              static
    D    model width                            static
    V    vocabulary size                        static

Graphs per architecture (:data:`GRAPHS_BY_ARCH`)::

    encoder          -> encoder
    decoder          -> decoder
    prefix-lm        -> decoder
    encoder-decoder  -> encoder, cross_attention, decoder

I/O (float = float32 or float16, chosen at export)::

    encoder          input_ids [B,S] int64, attention_mask [B,S] int64,
                     (+ token_type_ids [B,S] int64 if the model has segments)
                  -> last_hidden_state [B,S,D] float, (+ logits [B,num_labels] if num_labels > 0)
                     The encoder of an encoder-decoder model has neither extra.
    cross_attention  encoder_hidden_states [B,S,D] float
                  -> present.{i}.encoder.key / .value [B,Hkv,S,Dh]   for each decoder layer i
    decoder          input_ids [B,T], attention_mask [B,P+T], position_ids [B,T]  (int64)
                     past_key_values.{i}.key / .value [B,Hkv,P,Dh]
                  -> logits [B,T,V], present.{i}.key / .value [B,Hkv,P+T,Dh]
                     encoder-decoder: the self-attention cache is named
                     past_key_values.{i}.decoder.* / present.{i}.decoder.*, and the graph also
                     takes encoder_attention_mask [B,S] int64 and
                     past_key_values.{i}.encoder.key / .value [B,Hkv,S,Dh] (from cross_attention).

The first decoder step takes an empty past (P = 0, see :func:`empty_past`); there is no
"use cache" switch.

That is the decoder of KV-cache layout "concat". Layout "shared" (``graph_specs(...,
kv_cache="shared")``, decoder and encoder-decoder, manifest format_version 2)::

    decoder          input_ids [B,T] (right-padded on the first step), sequence_lengths [B] int64,
                     (+ encoder_attention_mask, encoder K/V as above),
                     past_key_values.{i}.key / .value [B,Hkv,C,Dh]   C = buffer capacity
                  -> logits [B,V] (each row's last real token), present.{i}.key / .value [B,Hkv,C,Dh],
                     next_token [B] int64 = argmax of the logits row (the lowest id among ties),
                     next_token_logprob [B] float32 = log_softmax(logits)[next_token]
                     present and past are the same buffer when bound to the same memory. The
                     next_token pair is the greedy choice computed in the graph, so a plain greedy
                     loop (no logits processing) never reads the V logits.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import PackageError

# Architectures and graphs ------------------------------------------------------------------
ARCHITECTURES = ("encoder", "decoder", "encoder-decoder", "prefix-lm")

ENCODER = "encoder"
CROSS_ATTENTION = "cross_attention"
DECODER = "decoder"

GRAPHS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "encoder": (ENCODER,),
    "decoder": (DECODER,),
    "prefix-lm": (DECODER,),
    "encoder-decoder": (ENCODER, CROSS_ATTENTION, DECODER),
}

GRAPH_FILE = "{graph}.onnx"
MAX_LAYERS = 4096  # sanity bound on Dims.n_layers: a damaged manifest must not allocate 10**30 specs

# Symbolic axes -----------------------------------------------------------------------------
BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"
ENCODER_SEQUENCE = "encoder_sequence"
CACHE_SEQUENCE = "cache_sequence"  # the capacity of a preallocated KV buffer (layout "shared")
SYMBOLIC_AXES = (BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE, ENCODER_SEQUENCE, CACHE_SEQUENCE)

# KV-cache layouts of the decoder graph (manifest "kv_cache"):
#   "concat"  past [B,Hkv,P,Dh] in, present [B,Hkv,P+T,Dh] out (a new, longer tensor per step);
#             left padding with attention_mask and position_ids. Every architecture.
#   "shared"  one preallocated buffer [B,Hkv,C,Dh] per layer that is both past and present
#             (updated in place); right padding with sequence_lengths; logits of the last
#             token only. Built for onnxruntime's GroupQueryAttention (decoder, encoder-decoder).
KV_CACHE_LAYOUTS = ("concat", "shared")

# Dtypes ------------------------------------------------------------------------------------
INT64 = "int64"
FLOAT_DTYPES = ("float32", "float16")
DTYPES = (INT64, *FLOAT_DTYPES)
# onnxruntime's NodeArg.type strings.
ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)", "float16": "tensor(float16)"}

# Tensor names ------------------------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
POSITION_IDS = "position_ids"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
SEQUENCE_LENGTHS = "sequence_lengths"
LAST_HIDDEN_STATE = "last_hidden_state"
LOGITS = "logits"
NEXT_TOKEN = "next_token"  # layout "shared": argmax of the logits row
NEXT_TOKEN_LOGPROB = "next_token_logprob"  # layout "shared": its log-probability (float32)

# The ONLY place per-layer cache names are spelled. {part} is "key"/"value", prefixed by the
# cache kind for encoder-decoder models ("decoder.key", "encoder.value").
PAST_TEMPLATE = "past_key_values.{i}.{part}"
PRESENT_TEMPLATE = "present.{i}.{part}"

# Cache kinds: "self" = the self-attention cache of a decoder-only / prefix-LM model;
# "decoder" = the self-attention cache of an encoder-decoder model;
# "encoder" = the cross-attention keys/values of an encoder-decoder model.
CACHE_KINDS = ("self", "decoder", "encoder")

_CACHE_NAME = re.compile(
    r"^(?P<root>past_key_values|present)\.(?P<i>\d+)\.(?:(?P<kind>decoder|encoder)\.)?(?P<kv>key|value)$"
)


def _parts(kind: str) -> tuple[str, str]:
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind must be one of {CACHE_KINDS}; got {kind!r}")
    prefix = "" if kind == "self" else f"{kind}."
    return f"{prefix}key", f"{prefix}value"


def past_names(i: int, kind: str = "self") -> tuple[str, str]:
    """(key, value) input names of layer ``i``'s cache, e.g. ``past_key_values.0.key``."""
    key, value = _parts(kind)
    return PAST_TEMPLATE.format(i=i, part=key), PAST_TEMPLATE.format(i=i, part=value)


def present_names(i: int, kind: str = "self") -> tuple[str, str]:
    """(key, value) output names of layer ``i``'s cache, e.g. ``present.0.key``."""
    key, value = _parts(kind)
    return PRESENT_TEMPLATE.format(i=i, part=key), PRESENT_TEMPLATE.format(i=i, part=value)


def self_cache_kind(arch: str) -> str:
    """Kind of the decoder's self-attention cache: "decoder" for encoder-decoder, else "self"."""
    return "decoder" if arch == "encoder-decoder" else "self"


def parse_cache_name(name: str) -> tuple[str, int, str, str] | None:
    """``"present.3.decoder.key"`` -> ``("present", 3, "decoder", "key")``; None if not a cache name."""
    match = _CACHE_NAME.match(name)
    if match is None:
        return None
    return match["root"], int(match["i"]), match["kind"] or "self", match["kv"]


def past_name_for(present_name: str) -> str:
    """The past input a present output feeds on the next step: ``present.0.key`` -> ``past_key_values.0.key``.

    Also maps cross-attention outputs (``present.0.encoder.key``) to the decoder's inputs.
    """
    parsed = parse_cache_name(present_name)
    if parsed is None or parsed[0] != "present":
        raise ValueError(f"{present_name!r} is not a present cache name (template {PRESENT_TEMPLATE!r})")
    _, i, kind, kv = parsed
    return past_names(i, kind)[0 if kv == "key" else 1]


# Dimensions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """The model dimensions the contract depends on (names as in ``ModelConfig``).

    ``n_layers`` is the layer count of the decoder stack (the step graphs' cache layers):
    ``ModelConfig.n_step_layers``; 0 for an encoder-only model.
    """

    arch: str
    n_layers: int  # decoder-stack layers (cache layers); 0 for arch "encoder"
    n_heads: int  # query heads (H)
    n_kv_heads: int  # key/value heads (Hkv)
    d_head: int  # head size (Dh)
    d_model: int  # model width (D)
    vocab_size: int  # V
    num_labels: int = 0  # encoder classification head; 0 = none
    has_token_types: bool = False  # encoder takes token_type_ids

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise PackageError(f"arch must be one of {ARCHITECTURES}; got {self.arch!r}", code="E_MANIFEST")
        for name in ("n_heads", "n_kv_heads", "d_head", "d_model", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PackageError(f"dims.{name} must be a positive integer; got {value!r}", code="E_MANIFEST")
        for name in ("n_layers", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PackageError(f"dims.{name} must be an integer >= 0; got {value!r}", code="E_MANIFEST")
        if self.arch != "encoder" and self.n_layers == 0:
            raise PackageError(f"dims.n_layers must be >= 1 for arch {self.arch!r}; got 0", code="E_MANIFEST")
        if self.n_layers > MAX_LAYERS:  # the cache I/O lists 4 tensors per layer: refuse before building it
            raise PackageError(f"dims.n_layers = {self.n_layers} is beyond any real model (limit {MAX_LAYERS}); "
                               "the manifest is damaged", code="E_MANIFEST")
        if not isinstance(self.has_token_types, bool):
            raise PackageError(f"dims.has_token_types must be true or false; got {self.has_token_types!r:.80}",
                               code="E_MANIFEST")
        if self.n_heads % self.n_kv_heads:
            raise PackageError(
                f"dims.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
                code="E_MANIFEST",
            )
        if self.arch != "encoder" and (self.num_labels or self.has_token_types):
            raise PackageError(
                f"num_labels ({self.num_labels}) and has_token_types ({self.has_token_types}) "
                f"apply to arch 'encoder' only; got arch {self.arch!r}",
                code="E_MANIFEST",
            )

    @property
    def graphs(self) -> tuple[str, ...]:
        return GRAPHS_BY_ARCH[self.arch]

    @classmethod
    def from_model_config(cls, config: Any) -> "Dims":
        """Build from a ``ModelConfig`` (duck-typed, so the runtime never imports modeling)."""
        return cls(
            arch=config.arch,
            n_layers=int(config.n_step_layers),
            n_heads=int(config.n_heads),
            n_kv_heads=int(config.n_kv_heads),
            d_head=int(config.d_head),
            d_model=int(config.d_model),
            vocab_size=int(config.vocab_size),
            num_labels=int(config.num_labels),
            has_token_types=bool(config.type_vocab_size > 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Dims":
        if not isinstance(data, Mapping):
            raise PackageError(f"manifest dims must be a JSON object; got {type(data).__name__}. Re-export the package.",
                               code="E_MANIFEST")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = sorted(name for name in required if name not in data)
        if unknown or missing:
            raise PackageError(
                f"manifest dims: unknown fields {unknown}, missing fields {missing}; "
                f"expected fields {sorted(known)}. Re-export the package.",
                code="E_MANIFEST",
            )
        return cls(**data)


# Specs -------------------------------------------------------------------------------------
Axis = str | int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype ("int64" | "float32" | "float16") and shape.

    Shape entries are symbolic axis names (str, see :data:`SYMBOLIC_AXES`) or static sizes (int).
    """

    name: str
    dtype: str
    shape: tuple[Axis, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PackageError(f"tensor {self.name!r}: dtype must be one of {DTYPES}; got {self.dtype!r}",
                               code="E_MANIFEST")
        object.__setattr__(self, "shape", tuple(self.shape))
        for axis in self.shape:
            if isinstance(axis, bool) or not isinstance(axis, (str, int)):
                raise PackageError(f"tensor {self.name!r}: shape entries must be str or int; got {axis!r}",
                                   code="E_MANIFEST")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{axis index: symbolic name}``, the form ``torch.onnx.export(dynamic_axes=...)`` takes."""
        return {k: axis for k, axis in enumerate(self.shape) if isinstance(axis, str)}

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        if not isinstance(data, Mapping) or set(data) != {"name", "dtype", "shape"}:
            raise PackageError(
                f"tensor spec must be an object with keys name, dtype, shape; got {data!r}. Re-export the package.",
                code="E_MANIFEST",
            )
        if not isinstance(data["name"], str) or not isinstance(data["shape"], list):
            raise PackageError(
                f"tensor spec needs a string name and a list shape; got {data!r:.120}. Re-export the package.",
                code="E_MANIFEST",
            )
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """One graph: its name, file inside the package, inputs and outputs (in feed order)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return _lookup(self.inputs, name, f"graph {self.name!r} input")

    def output(self, name: str) -> TensorSpec:
        return _lookup(self.outputs, name, f"graph {self.name!r} output")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every tensor's symbolic axes, keyed by name (for ``torch.onnx.export``)."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GraphSpec":
        if not isinstance(data, Mapping) or set(data) != {"name", "file", "inputs", "outputs"}:
            raise PackageError(
                f"graph spec must be an object with keys name, file, inputs, outputs; got keys "
                f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}. Re-export the package.",
                code="E_MANIFEST",
            )
        if not isinstance(data["inputs"], list) or not isinstance(data["outputs"], list):
            raise PackageError(f"graph spec {data['name']!r:.80}: inputs and outputs must be lists. Re-export the package.",
                               code="E_MANIFEST")
        return cls(
            name=data["name"],
            file=data["file"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )


def _lookup(specs: Iterable[TensorSpec], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{what} {name!r} is not in the contract")


def graph_specs_to_dict(specs: Mapping[str, GraphSpec]) -> dict[str, dict[str, Any]]:
    """JSON-ready form for the manifest: ``{graph name: GraphSpec.to_dict()}``."""
    return {name: spec.to_dict() for name, spec in specs.items()}


def graph_specs_from_dict(data: Mapping[str, Any]) -> dict[str, GraphSpec]:
    specs = {name: GraphSpec.from_dict(spec) for name, spec in data.items()}
    for name, spec in specs.items():
        if spec.name != name:
            raise PackageError(f"manifest graph {name!r} declares name {spec.name!r}; re-export the package",
                               code="E_MANIFEST")
    return specs


# The contract ------------------------------------------------------------------------------
def _ids(name: str, axis: str = SEQUENCE) -> TensorSpec:
    return TensorSpec(name, INT64, (BATCH, axis))


def _encoder_spec(dims: Dims, float_dtype: str) -> GraphSpec:
    standalone = dims.arch == "encoder"  # the encoder of an encoder-decoder has no extras
    inputs = [_ids(INPUT_IDS), _ids(ATTENTION_MASK)]
    if standalone and dims.has_token_types:
        inputs.append(_ids(TOKEN_TYPE_IDS))
    outputs = [TensorSpec(LAST_HIDDEN_STATE, float_dtype, (BATCH, SEQUENCE, dims.d_model))]  # (B, S, D)
    if standalone and dims.num_labels > 0:
        outputs.append(TensorSpec(LOGITS, float_dtype, (BATCH, dims.num_labels)))  # (B, num_labels)
    return GraphSpec(ENCODER, GRAPH_FILE.format(graph=ENCODER), tuple(inputs), tuple(outputs))


def _kv(name: str, axis: str, dims: Dims, float_dtype: str) -> TensorSpec:
    return TensorSpec(name, float_dtype, (BATCH, dims.n_kv_heads, axis, dims.d_head))  # (B, Hkv, *, Dh)


def _cross_attention_spec(dims: Dims, float_dtype: str) -> GraphSpec:
    inputs = [TensorSpec(ENCODER_HIDDEN_STATES, float_dtype, (BATCH, ENCODER_SEQUENCE, dims.d_model))]
    outputs = [
        _kv(name, ENCODER_SEQUENCE, dims, float_dtype)
        for i in range(dims.n_layers)
        for name in present_names(i, "encoder")
    ]
    return GraphSpec(CROSS_ATTENTION, GRAPH_FILE.format(graph=CROSS_ATTENTION), tuple(inputs), tuple(outputs))


def _decoder_spec(dims: Dims, float_dtype: str, kv_cache: str = "concat") -> GraphSpec:
    """The decoder step. "concat": input_ids, attention_mask, position_ids; past [B,Hkv,P,Dh] ->
    logits [B,T,V], present [B,Hkv,P+T,Dh]. "shared": input_ids (right-padded on the first
    step), sequence_lengths [B] (each row's tokens after this step); the KV buffers
    [B,Hkv,C,Dh] in and out (written in place when bound to the same memory) -> logits [B,V]
    of each row's last token, then next_token [B] int64 (argmax) and next_token_logprob [B]
    float32 (its log-softmax value, computed in float32 whatever the graph's dtype)."""
    seq2seq = dims.arch == "encoder-decoder"
    kind = self_cache_kind(dims.arch)
    if kv_cache == "shared":
        inputs = [_ids(INPUT_IDS), TensorSpec(SEQUENCE_LENGTHS, INT64, (BATCH,))]
        past_axis = present_axis = CACHE_SEQUENCE
        logits = TensorSpec(LOGITS, float_dtype, (BATCH, dims.vocab_size))  # (B, V)
    else:
        inputs = [_ids(INPUT_IDS), _ids(ATTENTION_MASK, TOTAL_SEQUENCE), _ids(POSITION_IDS)]
        past_axis, present_axis = PAST_SEQUENCE, TOTAL_SEQUENCE
        logits = TensorSpec(LOGITS, float_dtype, (BATCH, SEQUENCE, dims.vocab_size))  # (B, T, V)
    if seq2seq:
        inputs.append(_ids(ENCODER_ATTENTION_MASK, ENCODER_SEQUENCE))
    for i in range(dims.n_layers):
        inputs += [_kv(name, past_axis, dims, float_dtype) for name in past_names(i, kind)]
        if seq2seq:
            inputs += [_kv(name, ENCODER_SEQUENCE, dims, float_dtype) for name in past_names(i, "encoder")]
    outputs = [logits]
    for i in range(dims.n_layers):
        outputs += [_kv(name, present_axis, dims, float_dtype) for name in present_names(i, kind)]
    if kv_cache == "shared":
        outputs += [TensorSpec(NEXT_TOKEN, INT64, (BATCH,)), TensorSpec(NEXT_TOKEN_LOGPROB, "float32", (BATCH,))]
    return GraphSpec(DECODER, GRAPH_FILE.format(graph=DECODER), tuple(inputs), tuple(outputs))


_BUILDERS = {ENCODER: _encoder_spec, CROSS_ATTENTION: _cross_attention_spec, DECODER: _decoder_spec}


def graph_specs(dims: Dims, float_dtype: str = "float32", kv_cache: str = "concat") -> dict[str, GraphSpec]:
    """Every graph of ``dims.arch`` -> its spec, in run order (encoder, cross_attention, decoder).

    ``kv_cache`` is the decoder's cache layout (:data:`KV_CACHE_LAYOUTS`); "shared" exists for
    the decoder and encoder-decoder architectures.
    """
    if float_dtype not in FLOAT_DTYPES:
        raise PackageError(f"float_dtype must be one of {FLOAT_DTYPES}; got {float_dtype!r}", code="E_MANIFEST")
    if kv_cache not in KV_CACHE_LAYOUTS:
        raise PackageError(f"kv_cache must be one of {KV_CACHE_LAYOUTS}; got {kv_cache!r:.60}", code="E_MANIFEST")
    if kv_cache == "shared" and dims.arch not in ("decoder", "encoder-decoder"):
        raise PackageError(f"kv_cache 'shared' exists for arch 'decoder' and 'encoder-decoder'; got arch {dims.arch!r}",
                           code="E_MANIFEST")
    builders = dict(_BUILDERS, **{DECODER: functools.partial(_decoder_spec, kv_cache=kv_cache)})
    return {graph: builders[graph](dims, float_dtype) for graph in dims.graphs}


def self_cache_names(dims: Dims) -> list[tuple[str, str]]:
    """``(present, past)`` name pairs of the decoder's self-attention cache, layer by layer, key then value."""
    kind = self_cache_kind(dims.arch)
    return [
        (present, past)
        for i in range(dims.n_layers)
        for present, past in zip(present_names(i, kind), past_names(i, kind))
    ]


def empty_past(batch: int, dims: Dims, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Zero-length self-attention cache for the first decoder step: ``{past name: zeros (B, Hkv, 0, Dh)}``.

    For encoder-decoder models this covers the ``decoder`` kind only; the ``encoder`` kind
    comes from the cross_attention graph.
    """
    if dtype not in FLOAT_DTYPES:
        raise PackageError(f"dtype must be one of {FLOAT_DTYPES}; got {dtype!r}", code="E_MANIFEST")
    shape = (batch, dims.n_kv_heads, 0, dims.d_head)  # (B, Hkv, P=0, Dh)
    return {past: np.zeros(shape, dtype=dtype) for _, past in self_cache_names(dims)}


# Checking a loaded session ------------------------------------------------------------------
def _ort_dtype_name(ort_type: str) -> str:
    """``tensor(float)`` -> ``float32``, ``tensor(int32)`` -> ``int32`` (numpy spelling)."""
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") and ort_type.endswith(")") else ort_type
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def _check_side(side: str, expected: Sequence[TensorSpec], actual: Sequence[Any]) -> list[str]:
    problems: list[str] = []
    got = {arg.name: arg for arg in actual}
    want = {spec.name: spec for spec in expected}
    for name in want:
        if name not in got:
            problems.append(f"missing {side} {name!r}")
    for name in got:
        if name not in want:
            problems.append(f"unexpected {side} {name!r}")
    for name, spec in want.items():
        arg = got.get(name)
        if arg is None:
            continue
        if arg.type != ORT_TYPES[spec.dtype]:
            problems.append(f"{side} {name!r}: dtype {_ort_dtype_name(arg.type)}, expected {spec.dtype}")
        shape = list(arg.shape) if arg.shape is not None else None
        if shape is None or len(shape) != len(spec.shape):
            problems.append(
                f"{side} {name!r}: rank {None if shape is None else len(shape)} "
                f"(shape {shape}), expected rank {len(spec.shape)} {list(spec.shape)}"
            )
            continue
        for k, (dim, axis) in enumerate(zip(shape, spec.shape)):
            if isinstance(axis, int):
                if isinstance(dim, int) and dim != axis:
                    problems.append(f"{side} {name!r}: axis {k} is {dim}, expected {axis}")
            elif isinstance(dim, int):
                problems.append(
                    f"{side} {name!r}: axis {k} is fixed to {dim} but must be dynamic ({axis!r}); "
                    f"export it with dynamic_axes"
                )
    return problems


def check_session_io(spec: GraphSpec, session_inputs: Sequence[Any], session_outputs: Sequence[Any]) -> None:
    """Compare a session's I/O (``sess.get_inputs()``, ``sess.get_outputs()``) with ``spec``.

    Checks names (missing and unexpected), dtypes, ranks and static sizes, and that symbolic
    axes are not fixed in the graph. Symbolic axis *names* are not compared (exporters rename
    them). Raises :class:`PackageError` listing every mismatch.
    """
    problems = _check_side("input", spec.inputs, session_inputs) + _check_side(
        "output", spec.outputs, session_outputs
    )
    if problems:
        raise PackageError(
            f"graph {spec.file!r} does not match the I/O contract ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems)
            + "\nThe package was exported by an incompatible version or is damaged; re-export it.",
            code="E_GRAPH_IO",
        )


__all__ = [
    "ARCHITECTURES", "GRAPHS_BY_ARCH", "ENCODER", "CROSS_ATTENTION", "DECODER", "GRAPH_FILE",
    "BATCH", "SEQUENCE", "PAST_SEQUENCE", "TOTAL_SEQUENCE", "ENCODER_SEQUENCE", "SYMBOLIC_AXES",
    "INT64", "FLOAT_DTYPES", "DTYPES", "ORT_TYPES",
    "INPUT_IDS", "ATTENTION_MASK", "TOKEN_TYPE_IDS", "POSITION_IDS", "ENCODER_ATTENTION_MASK",
    "ENCODER_HIDDEN_STATES", "LAST_HIDDEN_STATE", "LOGITS", "SEQUENCE_LENGTHS", "CACHE_SEQUENCE",
    "KV_CACHE_LAYOUTS",
    "PAST_TEMPLATE", "PRESENT_TEMPLATE", "CACHE_KINDS",
    "past_names", "present_names", "self_cache_kind", "parse_cache_name", "past_name_for",
    "Dims", "TensorSpec", "GraphSpec", "graph_specs", "graph_specs_to_dict", "graph_specs_from_dict",
    "self_cache_names", "empty_past", "check_session_io",
]
