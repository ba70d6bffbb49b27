"""Checkpoint -> validated ONNX package.

    export_checkpoint(checkpoint, out_dir, ExportOptions()) -> ExportReport

1. Each graph of the architecture (contract: onnxformer.runtime.contract) is traced from a
   thin wrapper over the trained Transformer (export/graphs.py) with the contract's names and
   dynamic axes: B, S, T and P are dynamic, P = 0 is valid, so one decoder graph serves the
   prefill and every decode step. The decoder of the "shared" KV-cache layout (the default
   where onnxruntime's GroupQueryAttention can express the model) is instead written node by
   node from the weights (export/builder.py): fused attention with the cache updated in place.
2. Validation before anything is written (export/validate.py): onnx's full checker, then
   onnxruntime against PyTorch on fresh random inputs (batch 1 and left-padded batches,
   P = 0 and P > 0, T = 1 and T > 1) within `atol`, then greedy generation through the
   graphs equal to PyTorch's token for token. Failure raises ExportError with the figures.
3. Variants: fp16 weights and I/O (for GPU), int8 / int4 weight-only quantization (for CPU,
   onnxruntime's MatMulNBits, the format onnxruntime-genai runs), and for encoder models
   int8-dynamic (int8 weights and activations, onnxruntime's MatMulInteger); all are
   derived from the validated fp32 graphs and measured against PyTorch (figures recorded in
   the manifest, never hidden).
4. The package is assembled in a temporary directory beside OUT_DIR and renamed into place,
   so a failed or interrupted export never leaves a half-written or broken package.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxformer.runtime.atomic import pid_alive
from onnxformer.modeling.config import ModelConfig
from onnxformer.modeling.model import Attention, Transformer
from onnxformer.runtime.contract import (
    CROSS_ATTENTION,
    DECODER,
    KV_CACHE_LAYOUTS,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    Dims,
    graph_specs,
)
from onnxformer.runtime.errors import OnnxformerError
from onnxformer.runtime.manifest import (
    FORMAT_VERSION,
    SHARED_CACHE_FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    FileEntry,
    GraphEntry,
    Manifest,
)

from .builder import NEXT_TOKEN_NODES, build_decoder, unsupported_reason
from .graphs import graph_module
from .validate import example_feeds, validate_package_graphs

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# onnxruntime-node / -web 1.30 (what other languages ship today) load IR <= 13, opset <= 26.
MAX_PORTABLE_IR = 13
MAX_PORTABLE_OPSET = 26
PROTOBUF_LIMIT = 2 * 1024**3
DTYPES = ("float32", "float16")
# "int8", "int4": weight-only, onnxruntime MatMulNBits (as onnxruntime-genai uses), every architecture.
# "int8-dynamic": int8 weights and activations (MatMulInteger), for compute-bound encoder models.
QUANTIZATIONS = ("int8", "int4", "int8-dynamic")
DYNAMIC_QUANT_ARCHS = ("encoder",)
QUANT_BLOCK_SIZE = 32


class ExportError(OnnxformerError):
    """Export failed: invalid options, an untraceable model, or validation figures out of bounds."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    dtype: str = "float32"  # "float32" or "float16" (weights and float I/O; for GPU)
    quantize: str | None = None  # None or one of QUANTIZATIONS (CPU)
    # None/True: every weight in one shared external-data file, weights.onnx_data (each tensor
    # stored once across graphs; faster to load). False: weights inside each graph file (a
    # self-contained .onnx per graph; graphs over the 2 GB protobuf limit still go external).
    external_data: bool | None = None
    atol: float = 1e-4  # fp32 ONNX vs PyTorch, max abs difference
    validate_generation: bool = True  # greedy through the graphs == PyTorch greedy
    # Decoder self-attention as onnxruntime's fused com.microsoft.MultiHeadAttention (layers
    # with n_kv_heads == n_heads): fewer, faster nodes; needs onnxruntime (any language).
    # Applies to the traced "concat" decoder; the "shared" one is always fused.
    fused_attention: bool = False
    # The decoder's KV-cache layout (runtime/contract.py): "shared" (a preallocated buffer updated
    # in place, the graph written for onnxruntime's fused operators: fastest), "concat" (the
    # traced graph, every architecture), or None: "shared" where the model allows it.
    kv_cache: str | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.quantize not in (None, *QUANTIZATIONS):
            raise ExportError(f"quantize must be one of {QUANTIZATIONS} or None; got {self.quantize!r}")
        if self.quantize and self.dtype != "float32":
            raise ExportError(f"--quantize {self.quantize} applies to float32 exports; drop --dtype fp16 (or the quantization)")
        if not 14 <= self.opset <= MAX_PORTABLE_OPSET:
            raise ExportError(
                f"opset must be in [14, {MAX_PORTABLE_OPSET}] (onnxruntime-node/web 1.30 reject newer opsets); "
                f"got {self.opset}"
            )
        if self.atol <= 0:
            raise ExportError(f"atol must be > 0; got {self.atol}")
        if self.kv_cache not in (None, *KV_CACHE_LAYOUTS):
            raise ExportError(f"kv_cache must be one of {KV_CACHE_LAYOUTS} or None (the fastest the model allows); "
                              f"got {self.kv_cache!r}")


@dataclass(frozen=True)
class ExportReport:
    path: Path
    manifest: Manifest
    validation: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fused_attention(model: Transformer, enabled: bool):
    """Trace self-attention as one fused node where the layer allows it (Hkv == H)."""
    layers = [m for m in model.modules() if isinstance(m, Attention) and m.n_kv_heads == m.n_heads]
    for layer in layers:
        layer.fused = enabled
    try:
        yield
    finally:
        for layer in layers:
            layer.fused = False


def _trace(model: Transformer, spec, path: Path, opset: int, dims: Dims, fused: bool = False) -> None:
    module = graph_module(model, spec)
    feeds = example_feeds(spec, dims, batch=2, new=3, past=2, source=4)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _fused_attention(model, fused):
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        torch.onnx.export(
            module, args, str(path),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )


def _store_weights_once(proto: onnx.ModelProto) -> int:
    """Replace every 2-D initializer that is the transpose of another by a Transpose node.

    Constant folding turns a tied output head (logits = h @ E^T) into a second, transposed
    copy of the embedding matrix E. Storing E once and transposing it in the graph (which
    onnxruntime folds when the session loads) keeps the file at one copy per weight.
    Returns the number of bytes saved.
    """
    from onnx import numpy_helper

    graph = proto.graph
    matrices = {t.name: t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]}
    by_shape: dict[tuple[int, int], list] = {}
    for t in matrices.values():
        by_shape.setdefault(tuple(t.dims), []).append(t)
    saved, replaced = 0, set()
    # Folded copies ("onnx::MatMul_*") are replaced by a Transpose of the named parameter, never
    # the other way round, so the stored matrix is the embedding other graphs store too.
    for t in sorted(matrices.values(), key=lambda t: not t.name.startswith("onnx::")):
        if t.name in replaced:
            continue
        candidates = [o for o in by_shape.get((t.dims[1], t.dims[0]), []) if o.name not in replaced and o.name != t.name]
        if not candidates:
            continue
        array = numpy_helper.to_array(t)
        for other in candidates:
            if other.data_type == t.data_type and np.array_equal(numpy_helper.to_array(other).T, array):
                graph.node.insert(0, onnx.helper.make_node("Transpose", [other.name], [t.name], perm=[1, 0],
                                                           name=f"{t.name}/transpose_of_{other.name}"))
                replaced.add(t.name)
                saved += len(t.raw_data)
                break
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return saved


def _use_onnxruntime_attention(proto: onnx.ModelProto) -> int:
    """Rewrite the traced `onnxformer.MultiHeadAttention` placeholders (q, k, v, bias, past_key,
    past_value) into onnxruntime's `com.microsoft.MultiHeadAttention`, whose inputs are
    (query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value)."""
    count = 0
    for node in proto.graph.node:
        if node.domain == "onnxformer" and node.op_type == "MultiHeadAttention":
            q, k, v, bias, past_key, past_value = node.input
            del node.input[:]
            node.input.extend([q, k, v, "", "", bias, past_key, past_value])
            node.domain = "com.microsoft"
            count += 1
    if count:
        imports = [o for o in proto.opset_import if o.domain not in ("onnxformer", "com.microsoft")]
        del proto.opset_import[:]
        proto.opset_import.extend([*imports, onnx.helper.make_opsetid("com.microsoft", 1)])
    return count


def _finalise(path: Path, name: str, external: bool | None) -> tuple[str, ...]:
    """Re-save the traced graph: fused ops, each weight once, external data when over the
    protobuf limit (or forced)."""
    proto = onnx.load(str(path), load_external_data=True)
    _use_onnxruntime_attention(proto)
    saved = _store_weights_once(proto)
    if saved:
        log.info("%s: stored a transposed weight copy once (%.2f MB saved)", name, saved / 1e6)
    proto.producer_name, proto.doc_string = "onnxformer", f"onnxformer {name} graph"
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    use_external = external if external is not None else size > PROTOBUF_LIMIT - (64 << 20)
    for leftover in path.parent.glob(f"{path.name}*"):
        if leftover != path:
            leftover.unlink()
    if use_external:
        data_name = f"{path.name}_data"
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=0,
        )
        return (data_name,)
    onnx.save_model(proto, str(path))
    return ()


WEIGHTS_FILE = "weights.onnx_data"  # every graph's weights, each distinct tensor once
INLINE_BYTES = 1024  # initializers below this stay inside their graph (shapes, scalars, small biases)


def _align(size: int) -> int:
    """Offset alignment in the weights file: 64 KiB (the mmap granularity) for large tensors."""
    return 1 << 16 if size >= 1 << 20 else 64


def _store_weights_in_one_file(directory: Path, files: list[str]) -> dict[str, tuple[str, ...]]:
    """Move the initializers of every graph in `files` into one external-data file,
    `WEIGHTS_FILE`, storing each distinct tensor once; returns graph file -> its external files.

    A weight several graphs use (the token embedding of an encoder-decoder model: the
    encoder's input embedding and the decoder's, also its tied output head) is then stored once,
    and onnxruntime reads raw weights from the file instead of parsing them out of the protobuf,
    which makes a package load faster.
    """
    from onnx import numpy_helper

    protos = {f: onnx.load(str(directory / f), load_external_data=True) for f in files}  # all in memory first
    stored: dict[tuple[int, bytes], tuple[int, int]] = {}  # (dtype, sha256) -> (offset, length)
    users: dict[str, tuple[str, ...]] = {}
    partial = directory / f".{WEIGHTS_FILE}.partial"
    with open(partial, "wb") as out:
        for name, proto in protos.items():
            for tensor in proto.graph.initializer:
                if not tensor.HasField("raw_data"):  # typed fields (rare): normalise to raw bytes
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                raw = tensor.raw_data
                if len(raw) < INLINE_BYTES:
                    continue
                key = (tensor.data_type, hashlib.sha256(raw).digest())
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % _align(len(raw))))
                    stored[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
                users[name] = (WEIGHTS_FILE,)
    partial.replace(directory / WEIGHTS_FILE)
    for name, proto in protos.items():
        onnx.save_model(proto, str(directory / name))
        for leftover in directory.glob(f"{name}*"):  # per-graph data files written before
            if leftover.name != name:
                leftover.unlink()
    if not users:
        (directory / WEIGHTS_FILE).unlink()
    return {name: users.get(name, ()) for name in files}


def _check_portability(path: Path, opset: int) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if proto.ir_version > MAX_PORTABLE_IR or (default and default[0] > MAX_PORTABLE_OPSET):
        raise ExportError(
            f"{path.name}: IR {proto.ir_version} / opset {default} exceed what onnxruntime-node/web 1.30 load "
            f"(IR <= {MAX_PORTABLE_IR}, opset <= {MAX_PORTABLE_OPSET})"
        )


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def _to_fp16(path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(path), load_external_data=True)
    # The in-graph greedy choice (layout "shared") stays float32, on a float32 copy of the fp16
    # logits: a log-softmax summed in fp16 would not be the score computed from the logits.
    # Its nodes are set aside during the conversion and put back behind a Cast.
    greedy = [n for n in proto.graph.node if n.name.startswith(f"{NEXT_TOKEN_NODES}/")]
    greedy_outputs = [o for o in proto.graph.output if o.name in (NEXT_TOKEN, NEXT_TOKEN_LOGPROB)]
    for node in greedy:
        proto.graph.node.remove(node)
    for output in greedy_outputs:
        proto.graph.output.remove(output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=False)
    if greedy:
        logits32 = f"{NEXT_TOKEN_NODES}/logits_float32"
        half.graph.node.append(onnx.helper.make_node("Cast", [LOGITS], [logits32], name=f"{NEXT_TOKEN_NODES}/Cast",
                                                     to=onnx.TensorProto.FLOAT))
        for node in greedy:
            node.input[:] = [logits32 if name == LOGITS else name for name in node.input]
        half.graph.node.extend(greedy)
        half.graph.output.extend(greedy_outputs)
    onnx.save_model(half, str(path))


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizers log progress on the root logger, and importing
    matmul_nbits_quantizer calls logging.basicConfig(level=INFO), which would leave every
    library's INFO messages printing after an export: silence them while quantizing and put
    the root logger's handlers and levels back afterwards."""
    quiet = logging.getLogger("onnxruntime.quantization")
    root = logging.getLogger()
    saved = quiet.level, root.level, list(root.handlers)
    quiet.setLevel(logging.ERROR)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(saved[0])
        root.setLevel(saved[1])
        root.handlers[:] = saved[2]


def _quantize(path: Path, bits: int, *, tied_head: bool) -> None:
    """Weight-only quantization of every MatMul with a constant weight to onnxruntime's
    MatMulNBits (blocks of QUANT_BLOCK_SIZE along K, symmetric, int8 compute: accuracy_level 4).

    A head tied to the token embedding stays float: quantizing it would store the vocabulary
    matrix twice (float for the embedding lookup, quantized for the head)."""
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(path), load_external_data=True), bits=bits, block_size=QUANT_BLOCK_SIZE,
            is_symmetric=True, accuracy_level=4,
            nodes_to_exclude=["/model/lm_head/MatMul", "/lm_head/MatMul"] if tied_head else None,
        )
        quantizer.process()
    onnx.save_model(quantizer.model.model, str(path))


def _quantize_dynamic(path: Path) -> None:
    """Dynamic int8 quantization (onnxruntime's DynamicQuantizeLinear + MatMulInteger, the
    format of Optimum's ORTQuantizer): every MatMul runs in int8, its activations quantized to
    uint8 with a scale and zero point computed from each batch at run time, its constant
    weights to int8 (symmetric, one scale per output column).

    That includes the attention products (Q K^T, P V: about 4% faster, the speed of Optimum's
    int8). Stay float: the Gemm heads (pooler, classifier: one row per sequence, nothing to
    gain; quantized, they doubled the logit error), embeddings and norms. Signed int8 weights:
    onnxruntime's u8s8 kernels are the fast ones (u8u8 ran at 0.6x); per-channel scales cost
    no time over per-tensor ones. Figures: benchmarks/VARIANTS.md."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path), load_external_data=False)  # structure only
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    with _quiet_quantizer():
        # External data at any size (path + ".data"); _finalise re-saves under the export's own rule.
        quantize_dynamic(path, path, op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": False})


# --------------------------------------------------------------------------------------------
# Package
# --------------------------------------------------------------------------------------------


def _special_tokens(config: ModelConfig, tokenizer_file: Path) -> dict[str, int]:
    from onnxformer.modeling.tokenizer import load_tokenizer, special_token_ids

    ids = special_token_ids(load_tokenizer(tokenizer_file))
    ids = {role: int(ids.get(role, -1)) for role in ("pad", "unk", "bos", "eos", "mask", "cls", "sep")}
    ids["decoder_start"] = config.start_token_id if config.arch == "encoder-decoder" else -1
    return ids


def _generation_defaults(config: ModelConfig, special: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    if not config.has_decoder:
        return {}
    eos = [special["eos"]] if special["eos"] >= 0 else []
    defaults = {"strategy": "greedy", "max_new_tokens": 32, "eos_token_ids": eos, "pad_token_id": max(special["pad"], 0)}
    defaults.update(extra)
    return defaults


def _producers() -> dict[str, str]:
    import onnxruntime

    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("onnxformer")
    except PackageNotFoundError:
        own = "unknown"
    return {"onnxformer": own, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    False where the platform or file system cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID` folders left by exports that were killed (their
    process is gone). A live export's folders are left alone."""
    for path in out_dir.parent.glob(glob.escape(f".{out_dir.name}.") + "*"):
        kind, _, rest = path.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished package into place; an existing package is replaced only now, in one
    atomic exchange where the OS offers it (a kill at any moment leaves the old or the new
    package at out_dir, and the other in the temporary folder, which the next export removes)."""
    if out_dir.exists():
        if not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()):
            raise ExportError(
                f"{str(out_dir)!r} exists and is not an onnxformer package; refusing to replace it. "
                "Choose an empty or new output directory."
            )
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous package
            return
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _kv_cache_layout(model: Transformer, options: ExportOptions) -> str:
    """The decoder's cache layout: the option, or "shared" wherever the builder can express the model."""
    if not model.config.has_decoder:
        if options.kv_cache == "shared":
            raise ExportError(f"kv_cache 'shared' applies to models with a decoder; arch {model.config.arch!r} has none")
        return "concat"
    reason = unsupported_reason(model)
    if options.kv_cache == "shared" and reason is not None:
        raise ExportError(f"kv_cache 'shared' cannot express this model: {reason}. Export with kv_cache='concat' "
                          "(--kv-cache concat)")
    if options.kv_cache is None and reason is not None:
        log.info("decoder KV cache: 'concat' (%s)", reason)
    return options.kv_cache or ("concat" if reason is not None else "shared")


def export_model(
    model: Transformer,
    tokenizer_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
) -> ExportReport:
    """Export an in-memory model and its tokenizer file to a validated package at `out_dir`."""
    config = model.config
    if options.quantize == "int8-dynamic" and config.arch not in DYNAMIC_QUANT_ARCHS:
        raise ExportError(
            f"quantize 'int8-dynamic' applies to {' and '.join(DYNAMIC_QUANT_ARCHS)} models (large batches of "
            f"whole sequences); arch {config.arch!r} generates token by token: use quantize 'int8' "
            "(--quantize int8, weight-only MatMulNBits)"
        )
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise ExportError(f"tokenizer file {str(tokenizer_file)!r} does not exist")
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    dims = Dims.from_model_config(config)
    kv_cache = _kv_cache_layout(model, options)
    fp32_specs = graph_specs(dims, "float32", kv_cache)
    special = _special_tokens(config, tokenizer_file)

    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a package is meant to be read by services
    try:
        external: dict[str, tuple[str, ...]] = {}

        def share_weights(specs) -> None:
            if options.external_data is False:
                return
            files = _store_weights_in_one_file(tmp, [spec.file for spec in specs.values()])
            for name, spec in specs.items():
                external[name] = files[spec.file]
                _check_portability(tmp / spec.file, options.opset)

        for name, spec in fp32_specs.items():
            path = tmp / spec.file
            log.info("exporting %s", spec.file)
            if name == DECODER and kv_cache == "shared":
                onnx.save_model(build_decoder(model, spec, dims, opset=options.opset), str(path))
            else:
                _trace(model, spec, path, options.opset, dims, fused=options.fused_attention)
            external[name] = _finalise(path, name, options.external_data)
            _check_portability(path, options.opset)
        share_weights(fp32_specs)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)

        def write_manifest(specs, weights: str, validation: dict) -> Manifest:
            manifest = Manifest(
                arch=config.arch,
                dims=dims,
                max_seq_len=config.max_seq_len,
                float_dtype=next(iter(specs.values())).outputs[0].dtype,
                weights=weights,
                special_tokens=special,
                label_names=tuple(config.label_names),
                generation=_generation_defaults(config, special, options.generation_defaults),
                tokenizer=FileEntry.of(tmp, TOKENIZER_FILE),
                graphs={
                    name: GraphEntry(spec, FileEntry.of(tmp, spec.file),
                                     tuple(FileEntry.of(tmp, e) for e in external[name]))
                    for name, spec in specs.items()
                },
                opset=options.opset,
                producer=_producers(),
                validation=validation,
                model_config={**config.to_dict(), "num_parameters": model.num_parameters()},
                format_version=SHARED_CACHE_FORMAT_VERSION if kv_cache == "shared" else FORMAT_VERSION,
                kv_cache=kv_cache,
            )
            manifest.save(tmp)
            return manifest

        write_manifest(fp32_specs, "float32", {})
        validation = {"float32": validate_package_graphs(
            model, tmp, fp32_specs, dims, special, atol=options.atol,
            generation=options.validate_generation, label="float32",
        )}
        if not validation["float32"]["passed"]:
            figures = "\n".join(f"  {k}: {v}" for k, v in validation["float32"].items())
            raise ExportError(f"validation failed; nothing was written:\n{figures}")

        specs, weights = fp32_specs, "float32"
        if options.dtype == "float16" or options.quantize:
            weights = "float16" if options.dtype == "float16" else options.quantize
            if weights == "float16":
                convert = _to_fp16
            elif weights == "int8-dynamic":
                convert = _quantize_dynamic
            else:
                convert = functools.partial(_quantize, bits=int(weights.removeprefix("int")),
                                            tied_head=config.tie_embeddings)
            specs = graph_specs(dims, options.dtype, kv_cache)
            for name, spec in specs.items():
                if weights in QUANTIZATIONS and name == CROSS_ATTENTION:
                    continue  # a few small projections, computed once per input: keep them exact
                log.info("converting %s to %s", spec.file, weights)
                convert(tmp / spec.file)
                external[name] = _finalise(tmp / spec.file, name, options.external_data)
                _check_portability(tmp / spec.file, options.opset)
            share_weights(specs)
            write_manifest(specs, weights, validation)
            validation[weights] = validate_package_graphs(
                model, tmp, specs, dims, special, atol=None, generation=options.validate_generation,
                label=weights,
            )
            if not validation[weights]["passed"]:
                raise ExportError(f"the {weights} graphs produce non-finite outputs; nothing was written")

        manifest = write_manifest(specs, weights, validation)
        _fsync_dir(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out_dir)
    return ExportReport(out_dir, manifest, validation)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions = ExportOptions()
) -> ExportReport:
    """Export a training checkpoint (a run directory or one checkpoint directory)."""
    from onnxformer.modeling.checkpoint import load_model, tokenizer_path

    try:
        model, _ = load_model(checkpoint)
        tokenizer = tokenizer_path(checkpoint)
    except (OSError, ValueError) as err:  # missing, damaged or foreign checkpoint: say which, no traceback
        raise ExportError(f"cannot export {str(checkpoint)!r}: {err}") from None
    return export_model(model, tokenizer, out_dir, options)
