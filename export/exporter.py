"""Checkpoint -> validated ONNX package, as a short pipeline of passes.

    export_checkpoint(checkpoint, out_dir, ExportOptions()) -> ExportReport

    plan_export     options checked against the model; the decoder's producer and KV-cache
                    layout; the graph specs (runtime/contract.py). Nothing is written yet.
    produce_graphs  every graph of the architecture in float32, in memory. The decoder is built
                    node by node (export/builder.py: onnxruntime's fused operators, KV cache
                    "shared", updated in place) where the builder's support check accepts the
                    model, and traced from PyTorch otherwise (KV cache "concat"), like the
                    encoder and cross-attention graphs (thin wrappers: export/graphs.py).
                    The built decoder writes each weight into weights.onnx_data as it goes
                    (export/weights.py): the weights are never held twice.
    stage           each graph file written once, every distinct weight once in
                    weights.onnx_data (or inside its graph on request), the tokenizer, and a
                    manifest: a package the runtime loads exactly as a user will.
    reference       PyTorch's outputs on the validation inputs, once (export/validate.py), on a
                    thread beside produce_graphs and stage; then the model is released (when
                    the export loaded it) before any onnxruntime session opens.
    validate        onnxruntime against that reference on the staged package: numbers within
                    `atol`, greedy tokens equal. Failure raises ValidationError with the
                    figures; nothing is published.
    convert_graphs  optional: fp16, int8 / int4 weight-only (MatMulNBits, as onnxruntime-genai
                    runs), int8-dynamic (encoders), derived from the validated fp32 graphs,
                    staged and measured again (figures recorded, never hidden).
    publish         the manifest gets the figures; the staged folder replaces OUT_DIR
                    atomically (onnxformer.runtime.atomic): a failed or killed export leaves
                    the previous package, never a half-written one.

manifest.json is written by `stage` (the runtime reads it from disk to validate the package)
and once more by `publish` with the figures; a graph file is written once per graph set.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import glob
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxformer.modeling.config import ModelConfig
from onnxformer.modeling.hf_import import PackageInfo
from onnxformer.modeling.model import Transformer
from onnxformer.runtime import atomic
from onnxformer.runtime.contract import (
    CROSS_ATTENTION,
    DECODER,
    ENCODER,
    KV_CACHE_LAYOUTS,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    Dims,
    GraphSpec,
    graph_specs,
)
from onnxformer.runtime.errors import ExportError, ValidationError
from onnxformer.runtime.prompt_format import PromptFormat
from onnxformer.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARED_CACHE_FORMAT_VERSION,
    TOKENIZER_FILE,
    FileEntry,
    GraphEntry,
    Manifest,
)

from .builder import NEXT_TOKEN_NODES, build_decoder, unsupported_reason
from .graphs import graph_module
from .validate import Reference, example_feeds, torch_reference, validate_package_graphs
from .weights import WEIGHTS_FILE, WeightStore, uses_store

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
BUILT, TRACED = "built", "traced"  # the decoder graph's producer (manifest producer.decoder_graph)


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
    # The decoder's KV-cache layout (runtime/contract.py): "shared" (the built graph: a
    # preallocated buffer updated in place, onnxruntime's fused operators; fastest), "concat"
    # (the traced graph, every architecture), or None: "shared" where the builder accepts the model.
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

    @property
    def weights(self) -> str:
        """The package's weights: "float32", "float16" or the quantization."""
        return self.quantize or self.dtype


@dataclass(frozen=True)
class ExportReport:
    path: Path
    manifest: Manifest
    validation: dict[str, Any]  # per weights variant, as in the manifest
    decoder_graph: str | None  # "built" | "traced"; None for a model without a decoder


# --------------------------------------------------------------------------------------------
# plan_export: what to write, decided before anything is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportPlan:
    out_dir: Path  # absolute
    tokenizer_file: Path
    options: ExportOptions
    dims: Dims
    kv_cache: str  # "shared" (decoder built) | "concat" (traced, or no decoder)
    decoder_graph: str | None  # BUILT | TRACED | None (no decoder)
    special_tokens: dict[str, int]
    model_config: dict[str, Any]  # the ModelConfig as JSON, with num_parameters
    package: PackageInfo = PackageInfo()  # what an import carries into the package (chat template, ...)

    def specs(self, dtype: str = "float32") -> dict[str, GraphSpec]:
        return graph_specs(self.dims, dtype, self.kv_cache)


def choose_decoder(model: Transformer, kv_cache: str | None) -> tuple[str, str | None]:
    """(KV-cache layout, decoder producer): the built graph where the builder's support check
    accepts the model (or "shared" is asked for, which then must be), else the traced one."""
    config = model.config
    if not config.has_decoder:
        if kv_cache == "shared":
            raise ExportError(f"kv_cache 'shared' applies to models with a decoder; arch {config.arch!r} has none: "
                              "leave kv_cache unset (--kv-cache auto)",
                              code="E_UNSUPPORTED")
        return "concat", None
    reason = unsupported_reason(model)
    if kv_cache == "shared" and reason is not None:
        raise ExportError(f"kv_cache 'shared' cannot express this model: {reason}. Export with kv_cache='concat' "
                          "(--kv-cache concat)", code="E_UNSUPPORTED")
    if kv_cache == "concat" or reason is not None:
        log.info("decoder graph: traced, KV cache 'concat' (%s)", reason or "asked for")
        return "concat", TRACED
    log.info("decoder graph: built (export/builder.py), KV cache 'shared'")
    return "shared", BUILT


def plan_export(model: Transformer, tokenizer_file: Path, out_dir: Path, options: ExportOptions,
                package: PackageInfo = PackageInfo()) -> ExportPlan:
    """The options checked against the model and OUT_DIR, and every decision of the export; nothing written."""
    config = model.config
    if options.quantize == "int8-dynamic" and config.arch not in DYNAMIC_QUANT_ARCHS:
        raise ExportError(
            f"quantize 'int8-dynamic' applies to {' and '.join(DYNAMIC_QUANT_ARCHS)} models (large batches of "
            f"whole sequences); arch {config.arch!r} generates token by token: use quantize 'int8' "
            "(--quantize int8, weight-only MatMulNBits)",
            code="E_UNSUPPORTED",
        )
    if not tokenizer_file.is_file():
        raise ExportError(f"tokenizer file {str(tokenizer_file)!r} does not exist", code="E_TOKENIZER")
    not_finite = [name for name, t in model.state_dict().items() if not _finite(t)]
    if not_finite:  # validation would only report max_abs_diff inf
        raise ExportError(
            f"the model's weights are NaN or infinite in {len(not_finite)} tensors ({', '.join(not_finite[:3])}): "
            "its training diverged; export an earlier checkpoint, or train again with a lower --lr",
            code="E_NOT_FINITE",
        )
    _check_replaceable(out_dir)
    kv_cache, decoder_graph = choose_decoder(model, options.kv_cache)
    return ExportPlan(
        out_dir=out_dir, tokenizer_file=tokenizer_file, options=options, dims=Dims.from_model_config(config),
        kv_cache=kv_cache, decoder_graph=decoder_graph, special_tokens=_special_tokens(config, tokenizer_file, package),
        model_config={**config.to_dict(), "num_parameters": model.num_parameters()}, package=package,
    )


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. A finite sum says so at the cost of one read (no mask or copy
    of the tensor's size); an infinite one may also be an overflow of large finite values:
    then it is checked exactly."""
    if not t.is_floating_point():
        return True
    with torch.no_grad():
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _special_tokens(config: ModelConfig, tokenizer_file: Path, package: PackageInfo) -> dict[str, int]:
    """The manifest's special token ids, after checking that the tokenizer belongs to the model:
    an import's (read from its tokenizer_config.json), else found by our tokenizers' names."""
    from onnxformer.modeling.tokenizer import load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(tokenizer_file)
    ids = dict(package.special_tokens) if package.special_tokens else special_token_ids(tokenizer)
    _check_tokenizer_fits(config, tokenizer, ids, tokenizer_file)
    ids = {role: int(ids.get(role, -1)) for role in ("pad", "unk", "bos", "eos", "mask", "cls", "sep")}
    ids["decoder_start"] = config.start_token_id if config.arch == "encoder-decoder" else -1
    return ids


TOKENIZER_ADVICE = ("export the checkpoint with the tokenizer it was trained with (the tokenizer.json saved beside "
                    "its config.json)")


def _check_tokenizer_fits(config: ModelConfig, tokenizer, ids: dict[str, int], tokenizer_file: Path) -> None:
    """A tokenizer swapped for another one exports a package that answers nonsense: refuse it.

    Every id the tokenizer produces must index the model's vocabulary (training sizes the model
    to the tokenizer exactly; a model built by hand may have spare rows, never fewer), and the
    special tokens the model was configured with (ModelConfig pad/bos/eos, set by training
    from special_token_ids) must be the tokenizer's."""
    advice = TOKENIZER_ADVICE
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= config.vocab_size:
        raise ExportError(
            f"tokenizer {str(tokenizer_file)!r} produces token ids up to {top} but the model's vocabulary has "
            f"{config.vocab_size} entries (vocab_size): the tokenizer does not belong to this model; {advice}",
            code="E_TOKENIZER",
        )
    for role, field_name in (("pad", "pad_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id")):
        want, got = getattr(config, field_name), ids[role]
        if want != got:
            token = f" ({tokenizer.id_to_token(got)!r})" if got >= 0 else ""
            raise ExportError(
                f"tokenizer {str(tokenizer_file)!r} has {role} token id {got}{token} (-1: none) but the model was "
                f"trained with {field_name}={want}: the tokenizer does not belong to this model; {advice}",
                code="E_TOKENIZER",
            )
    start = config.start_token_id
    if config.arch == "encoder-decoder" and (start < 0 or tokenizer.id_to_token(start) is None):
        raise ExportError(
            f"the model's decoder start token id {start} is not a token of {str(tokenizer_file)!r}: "
            f"the tokenizer does not belong to this model; {advice}",
            code="E_TOKENIZER",
        )


def _check_replaceable(out_dir: Path) -> None:
    """OUT_DIR is absent, empty or a package: anything else is never replaced."""
    if out_dir.exists() and (not out_dir.is_dir() or (not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()))):
        raise ExportError(
            f"{str(out_dir)!r} exists and is not an onnxformer package; refusing to replace it. "
            "Choose an empty or new output directory.", code="E_DISK",
        )


# --------------------------------------------------------------------------------------------
# produce_graphs: float32 ONNX models in memory
# --------------------------------------------------------------------------------------------


def produce_graphs(model: Transformer, plan: ExportPlan, workdir: Path,
                   store: WeightStore | None = None) -> dict[str, onnx.ModelProto]:
    """Every graph of the plan, float32: the decoder built or traced (plan.decoder_graph), the
    others traced (the tracer's own files go to a scratch folder in `workdir`). The built
    decoder writes its weights into `store` as it goes (export/weights.py)."""
    graphs = {}
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        for name, spec in plan.specs().items():
            built = name == DECODER and plan.decoder_graph == BUILT
            log.info("exporting %s (%s)", spec.file, BUILT if built else TRACED)
            if built:
                graphs[name] = build_decoder(model, spec, plan.dims, opset=plan.options.opset, store=store)
            else:
                graphs[name] = _trace(model, spec, plan.dims, plan.options.opset, Path(scratch))
            graphs[name].producer_name, graphs[name].doc_string = "onnxformer", f"onnxformer {name} graph"
    return graphs


def _trace(model: Transformer, spec: GraphSpec, dims: Dims, opset: int, scratch: Path) -> onnx.ModelProto:
    module = graph_module(model, spec)
    feeds = example_feeds(spec, dims, batch=2, new=3, past=2, source=4)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    path = scratch / spec.file  # a file, not memory: over 2 GB the tracer writes external data beside it
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        torch.onnx.export(
            module, args, str(path),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load(str(path), load_external_data=True)
    for written in scratch.iterdir():
        written.unlink()
    _name_sinusoid_table(proto, model)
    saved = _drop_transposed_copies(proto)
    if saved:
        log.info("%s: stored a transposed weight copy once (%.2f MB saved)", spec.file, saved / 1e6)
    return proto


SINUSOID_TABLE = "model.sinusoid"  # the name a learned table has when traced: model.pos_emb.weight


def _name_sinusoid_table(proto: onnx.ModelProto, model: Transformer) -> None:
    """Store a sinusoidal model's position table as the initializer `model.sinusoid`.

    The table is a non-persistent buffer, which the tracer folds into anonymous Constant nodes;
    named, it is what the runtimes' load check (`position_tables` in runtime/safety.py and
    runtime/node/safety.js) holds the manifest's max_seq_len against, as for a learned or
    rotary table. Each Constant equal to the buffer is replaced by the one initializer (a
    graph that embeds no positions, the cross-attention step, has none).
    """
    from onnx import numpy_helper

    if model.sinusoid is None:
        return
    table = model.sinusoid.detach().cpu().numpy()
    graph, renamed = proto.graph, {}
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        value = node.attribute[0].t
        if tuple(value.dims) == table.shape and np.array_equal(numpy_helper.to_array(value), table):
            renamed[node.output[0]] = SINUSOID_TABLE
            graph.node.remove(node)
    if not renamed:
        return
    graph.initializer.append(numpy_helper.from_array(table, SINUSOID_TABLE))
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def _drop_transposed_copies(proto: onnx.ModelProto) -> int:
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


# --------------------------------------------------------------------------------------------
# stage: the graphs, their weights and a manifest in the staging folder
# --------------------------------------------------------------------------------------------


def stage(directory: Path, graphs: dict[str, onnx.ModelProto], plan: ExportPlan, weights: str,
          store: WeightStore | None) -> Manifest:
    """Write `graphs` beside the tokenizer, their weights into `store` (the package's weights
    file; None: inside each graph file); returns the package's manifest (no validation figures
    yet), in memory: it is written once, when the package is complete. The built decoder's
    weights are in the store already (produce_graphs)."""
    specs = plan.specs("float16" if weights == "float16" else "float32")
    files = {specs[name].file: proto for name, proto in graphs.items()}
    if store is None:
        external = {file: _save_self_contained(directory / file, proto) for file, proto in files.items()}
    else:
        external = {}
        for file, proto in files.items():
            for tensor in proto.graph.initializer:
                store.move(tensor)
            external[file] = (WEIGHTS_FILE,) if uses_store(proto) else ()
            onnx.save_model(proto, str(directory / file))
        store.close()  # complete before its size and checksum go into the manifest
    for file in files:
        _check_portability(directory / file)
    return _manifest(directory, plan, specs, weights, {name: external[spec.file] for name, spec in specs.items()})


@contextlib.contextmanager
def _weights_store(directory: Path, options: ExportOptions):
    """The package's weights file for one set of graphs (replacing any staged before), or None
    when the graphs keep their weights inside (ExportOptions.external_data False)."""
    for old in [*directory.glob("*.onnx"), *directory.glob("*.onnx_data")]:
        old.unlink()
    if options.external_data is False:
        yield None
        return
    with WeightStore(directory) as store:
        yield store


def _save_self_contained(path: Path, proto: onnx.ModelProto) -> tuple[str, ...]:
    """One graph file with its weights inside; over the protobuf limit, beside it in PATH_data."""
    if sum(len(t.raw_data) for t in proto.graph.initializer) <= PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(proto, str(path))
        return ()
    data_name = f"{path.name}_data"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0)
    return (data_name,)


def _check_portability(path: Path) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if proto.ir_version > MAX_PORTABLE_IR or (default and default[0] > MAX_PORTABLE_OPSET):
        raise ExportError(
            f"{path.name}: IR {proto.ir_version} / opset {default} exceed what onnxruntime-node/web 1.30 load "
            f"(IR <= {MAX_PORTABLE_IR}, opset <= {MAX_PORTABLE_OPSET})"
        )


def _manifest(directory: Path, plan: ExportPlan, specs: dict[str, GraphSpec], weights: str,
              external: dict[str, tuple[str, ...]]) -> Manifest:
    config = plan.model_config
    producer = _producers()
    if plan.decoder_graph is not None:
        producer["decoder_graph"] = plan.decoder_graph
    return Manifest(
        arch=plan.dims.arch,
        dims=plan.dims,
        max_seq_len=config["max_seq_len"],
        float_dtype=next(iter(specs.values())).outputs[0].dtype,
        weights=weights,
        special_tokens=plan.special_tokens,
        label_names=tuple(config["label_names"]),
        generation=_generation_defaults(plan),
        tokenizer=FileEntry.of(directory, TOKENIZER_FILE),
        graphs={name: GraphEntry(spec, FileEntry.of(directory, spec.file),
                                 tuple(FileEntry.of(directory, e) for e in external[name]))
                for name, spec in specs.items()},
        opset=plan.options.opset,
        producer=producer,
        model_config=config,
        format_version=SHARED_CACHE_FORMAT_VERSION if plan.kv_cache == "shared" else FORMAT_VERSION,
        kv_cache=plan.kv_cache,
        # the format training used travels with the package; the runtimes apply it (FORMAT.md)
        prompt_format=PromptFormat.from_dict(config["prompt_format"]) if config.get("prompt_format") else None,
        # what an imported model brings (modeling/hf_import.py PackageInfo; FORMAT.md 2.1): a template only
        # where there is a decoder to chat with, pooling defaults only where there is an encoder to embed with
        chat_template=plan.package.chat_template if plan.dims.arch != "encoder" else None,
        chat_tokens=dict(plan.package.chat_tokens) if plan.package.chat_template and plan.dims.arch != "encoder" else {},
        embedding=dict(plan.package.embedding) if plan.package.embedding and ENCODER in specs else None,
        source=dict(plan.package.source),
    )


def _generation_defaults(plan: ExportPlan) -> dict[str, Any]:
    if plan.dims.arch == "encoder":
        return {}
    special = plan.special_tokens
    eos = [special["eos"]] if special["eos"] >= 0 else []
    return {"strategy": "greedy", "max_new_tokens": 32, "eos_token_ids": eos, "pad_token_id": max(special["pad"], 0),
            **plan.package.generation, **plan.options.generation_defaults}


def _producers() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    try:
        own = version("onnxformer")
    except PackageNotFoundError:
        own = "unknown"
    return {"onnxformer": own, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# --------------------------------------------------------------------------------------------
# validate: the staged package against PyTorch
# --------------------------------------------------------------------------------------------


def reference(model: Transformer, plan: ExportPlan) -> Reference:
    """PyTorch's outputs for the validation (export/validate.py), computed once for the fp32
    graphs and any variant converted from them."""
    return torch_reference(model, plan.specs(), plan.dims, plan.special_tokens,
                           generation=plan.options.validate_generation, package_defaults=_generation_defaults(plan))


def validate(expected: Reference, directory: Path, manifest: Manifest, plan: ExportPlan, *,
             atol: float | None) -> dict[str, Any]:
    """The figures of the staged graphs against PyTorch's (`reference`). With `atol`: numbers
    within it and greedy tokens equal, else ValidationError; without: measured, and finite."""
    specs = {name: entry.spec for name, entry in manifest.graphs.items()}
    figures = validate_package_graphs(expected, directory, specs, plan.dims, atol=atol, label=manifest.weights,
                                      manifest=manifest)
    if not figures["passed"]:
        details = "\n".join(f"  {k}: {v}" for k, v in figures.items())
        if atol is None:
            raise ValidationError(f"the {manifest.weights} graphs produce non-finite outputs; nothing was written:\n"
                                  f"{details}")
        raise ValidationError(f"validation failed ({manifest.weights}: worst |onnx - torch| "
                              f"{figures['worst_abs_diff']:.3g} vs atol {atol:g}, greedy tokens equal: "
                              f"{figures.get('greedy_match', 'not checked')}); nothing was written:\n{details}")
    return figures


# --------------------------------------------------------------------------------------------
# convert_graphs: the fp16 / quantized variant of the validated fp32 graphs
# --------------------------------------------------------------------------------------------


def convert_graphs(directory: Path, manifest: Manifest, plan: ExportPlan) -> dict[str, onnx.ModelProto]:
    """The fp32 graphs staged in `directory` converted to plan.options.weights (in memory)."""
    weights = plan.options.weights
    graphs = {name: onnx.load(str(directory / entry.file.file), load_external_data=True)
              for name, entry in manifest.graphs.items()}  # all in memory before the next stage rewrites the files
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        for name, proto in graphs.items():
            if weights in QUANTIZATIONS and name == CROSS_ATTENTION:
                continue  # a few small projections, computed once per input: keep them exact
            log.info("converting %s to %s", manifest.graphs[name].file.file, weights)
            if weights == "float16":
                graphs[name] = _to_fp16(proto)
            elif weights == "int8-dynamic":
                graphs[name] = _quantize_dynamic(proto, Path(scratch))
            else:
                graphs[name] = _quantize(proto, int(weights.removeprefix("int")),
                                         tied_head=bool(plan.model_config["tie_embeddings"]))
    return graphs


def _to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

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
    return half


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


def _quantize(proto: onnx.ModelProto, bits: int, *, tied_head: bool) -> onnx.ModelProto:
    """Weight-only quantization of every MatMul with a constant weight to onnxruntime's
    MatMulNBits (blocks of QUANT_BLOCK_SIZE along K, symmetric, int8 compute: accuracy_level 4).

    A head tied to the token embedding stays float: quantizing it would store the vocabulary
    matrix twice (float for the embedding lookup, quantized for the head)."""
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            proto, bits=bits, block_size=QUANT_BLOCK_SIZE, is_symmetric=True, accuracy_level=4,
            nodes_to_exclude=["/model/lm_head/MatMul", "/lm_head/MatMul"] if tied_head else None,
        )
        quantizer.process()
    return quantizer.model.model


def _quantize_dynamic(proto: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
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

    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    path = scratch / "quantized.onnx"  # the quantizer writes files only (external data at any size)
    with _quiet_quantizer():
        quantize_dynamic(proto, path, op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": False})
    quantized = onnx.load(str(path), load_external_data=True)
    for written in scratch.iterdir():
        written.unlink()
    return quantized


# --------------------------------------------------------------------------------------------
# publish, and the pipeline
# --------------------------------------------------------------------------------------------


def publish(tmp: Path, out_dir: Path) -> None:
    """The finished package replaces OUT_DIR in one atomic step (onnxformer.runtime.atomic)."""
    _check_replaceable(out_dir)
    atomic.publish_dir(tmp, out_dir)


@contextlib.contextmanager
def _staging(out_dir: Path):
    """A staging folder beside OUT_DIR (.NAME.tmp-PID-*), removed unless it was published;
    ones left by killed exports are removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(out_dir.parent, glob.escape(out_dir.name))
    tmp = atomic.staging_dir(out_dir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer file into the package, without padding: the runtimes pad a batch themselves
    and count a row's tokens as its ids, so a tokenizer.json that pads (sentence-transformers'
    all-MiniLM-L6-v2 pads every text to 128) would make its [PAD]s real tokens."""
    import json

    text = source.read_text(encoding="utf-8")
    data = json.loads(text)
    if isinstance(data, dict) and data.get("padding") is not None:
        data["padding"] = None
        text = json.dumps(data, ensure_ascii=False)
    target.write_text(text, encoding="utf-8")


def export_model(
    model: Transformer,
    tokenizer_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    package: PackageInfo = PackageInfo(),
) -> ExportReport:
    """Export an in-memory model and its tokenizer file to a validated package at `out_dir`
    (`package`: what an import carries besides, e.g. a chat template)."""
    return _export([model], Path(tokenizer_file), Path(out_dir), options, package)


def _export(held: list[Transformer], tokenizer_file: Path, out_dir: Path, options: ExportOptions,
            package: PackageInfo) -> ExportReport:
    """The pipeline. `held` hands the model over (the list is emptied), so that the pipeline's
    reference is the last one of a model nobody else holds (export_checkpoint's): it is dropped
    once PyTorch's part is done, which frees the weights before onnxruntime loads the graphs;
    the export's peak is then about one copy of the weights, not two."""
    model = held.pop().float().eval()
    plan = plan_export(model, tokenizer_file, out_dir.absolute(), options, package)
    try:
        with _staging(plan.out_dir) as tmp:
            _copy_tokenizer(plan.tokenizer_file, tmp / TOKENIZER_FILE)
            # PyTorch's reference (compute-bound) runs beside the graph build and write (mostly
            # disk-bound); both only read the model
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torch-reference") as pool:
                pending = pool.submit(reference, model, plan)
                with _weights_store(tmp, options) as store:
                    manifest = stage(tmp, produce_graphs(model, plan, tmp, store), plan, "float32", store)
                expected = pending.result()
            del model, pending
            gc.collect()  # the weights of a model nobody else holds go here, before any session opens
            validation = {"float32": validate(expected, tmp, manifest, plan, atol=options.atol)}
            if options.weights != "float32":
                converted = convert_graphs(tmp, manifest, plan)
                with _weights_store(tmp, options) as store:
                    manifest = stage(tmp, converted, plan, options.weights, store)
                del converted
                validation[options.weights] = validate(expected, tmp, manifest, plan, atol=None)
            manifest = dataclasses.replace(manifest, validation=validation)
            manifest.save(tmp)  # the one write of manifest.json
            publish(tmp, plan.out_dir)
    except OSError as err:  # disk full, permissions, a file in the way
        raise ExportError(f"cannot write the package to {str(plan.out_dir)!r}: {err.strerror or err}. Choose a "
                          "writable folder with free space", code="E_DISK") from None
    log.info("wrote %s", plan.out_dir)
    return ExportReport(plan.out_dir, manifest, validation, plan.decoder_graph)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions = ExportOptions()
) -> ExportReport:
    """Export a training checkpoint (a run directory or one checkpoint directory), or a local
    Hugging Face model directory (modeling/hf_import.py)."""
    from onnxformer.modeling.checkpoint import load_model, read_package, tokenizer_path
    from onnxformer.modeling.hf_import import is_hf_dir, load_hf
    from onnxformer.modeling.tokenizer import load_tokenizer

    if is_hf_dir(checkpoint):
        imported = load_hf(checkpoint)  # CheckpointError for what it cannot import, naming it
        held, tokenizer_file, package = [imported.model], imported.tokenizer_file, imported.package
        del imported  # _export frees the model once PyTorch's part is done
        return _export(held, Path(tokenizer_file), Path(out_dir), options, package)

    model, _ = load_model(checkpoint)  # CheckpointError for a missing, damaged or foreign checkpoint
    tokenizer_file = tokenizer_path(checkpoint)  # CheckpointError when it is missing
    package = read_package(checkpoint)  # fine-tuned from an import: its chat template, eos ids, ...
    # Training sizes the model to its tokenizer exactly (modeling/train.py build_model_config);
    # export_model also takes hand-built models with spare rows, a checkpoint never has them
    # unless its model was imported (Hugging Face embeddings often have spare rows).
    size, vocab = load_tokenizer(tokenizer_file).get_vocab_size(), model.config.vocab_size
    if size != vocab and package is None:
        raise ExportError(
            f"tokenizer {str(tokenizer_file)!r} has {size} tokens but the checkpoint's model has vocab_size {vocab}; "
            f"training sizes the model to its tokenizer exactly, so this is not the tokenizer it was trained "
            f"with: {TOKENIZER_ADVICE}",
            code="E_TOKENIZER",
        )
    held = [model]
    del model
    return _export(held, Path(tokenizer_file), Path(out_dir), options, package or PackageInfo())


__all__ = [
    "ExportError", "ExportOptions", "ExportPlan", "ExportReport", "ValidationError", "choose_decoder",
    "convert_graphs", "export_checkpoint", "export_model", "plan_export", "produce_graphs", "publish", "reference",
    "stage", "validate",
]
