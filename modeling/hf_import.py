"""Import a local Hugging Face model directory as our own model: config, weights, tokenizer,
generation defaults, chat template and (sentence-transformers) pooling.

    imported = load_hf("path/to/hf-dir")            # HFImport
    imported.model, imported.tokenizer_file, imported.package

Nothing is downloaded: the directory holds `config.json`, `model.safetensors` (or shards with
`model.safetensors.index.json`, or `pytorch_model.bin` read with `torch.load(weights_only=True)`),
`tokenizer.json`, and optionally `tokenizer_config.json`, `special_tokens_map.json`,
`generation_config.json`, `chat_template.jinja`, and sentence-transformers' `modules.json` with
its pooling and normalise modules.

A family (a `Family` in FAMILIES, registered by modeling/hf_encoders.py, hf_decoders.py and
hf_seq2seq.py) turns a `model_type` into our ModelConfig fields and names, for every parameter of
our model, the Hugging Face tensor(s) it comes from. The import is fail-closed:
* a config key that is neither read by the family nor known to leave the math unchanged is
  refused by name (`HFConfig.unread`), never ignored;
* every parameter of our model gets a tensor, every tensor of the checkpoint is used or named
  as deliberately dropped with the reason, every shape is checked;
* tensors are read one at a time from memory-mapped files and copied into the model, so the
  peak memory is the model (float32) plus one tensor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises; nothing here unpickles
from typing import Any

import torch
from torch import Tensor

from onnxformer.runtime.errors import CheckpointError, ConfigError

from .config import ModelConfig
from .model import Transformer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Keys of config.json that never change the math of inference (metadata, training-only
# settings, generation settings read from generation_config.json, ids read as special tokens).
HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "use_cache",
    "initializer_range", "initializer_factor", "gradient_checkpointing", "torchscript", "return_dict",
    "output_attentions", "output_hidden_states", "use_return_dict", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id", "chunk_size_feed_forward", "tf_legacy_loss",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
    "attention_dropout", "activation_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop",
    "summary_first_dropout", "dropout_rate", "seq_classif_dropout", "qa_dropout", "layerdrop",
    "encoder_layerdrop", "decoder_layerdrop", "pretraining_tp", "max_length", "min_length", "num_beams",
    "do_sample", "early_stopping", "length_penalty", "no_repeat_ngram_size", "num_return_sequences",
    "temperature", "top_k", "top_p", "repetition_penalty", "bad_words_ids", "diversity_penalty",
    "num_beam_groups", "typical_p", "encoder_no_repeat_ngram_size", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "output_scores",
    "return_dict_in_generate", "id2label", "label2id", "num_labels", "cross_attention_hidden_size",
    "tie_encoder_decoder", "is_composition", "keys_to_ignore_at_inference", "gradient_checkpointing_kwargs",
    "model_parallel", "n_ctx", "use_bfloat16", "xla_device", "_commit_hash", "name_or_path",
})
# Keys whose listed values leave the math unchanged; any other value is refused.
NEUTRAL_VALUES: dict[str, tuple] = {
    "is_decoder": (False,),
    "add_cross_attention": (False,),
    "pruned_heads": ({},),
    "is_encoder_decoder": (False,),  # an encoder-decoder family reads it
}


class HFConfig:
    """config.json, with every key a family reads recorded (so the rest can be checked)."""

    def __init__(self, data: dict[str, Any], path: Path):
        self.data, self.path, self.read = data, path, set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def require(self, key: str) -> Any:
        self.read.add(key)
        if key not in self.data:
            raise CheckpointError(f"{self.path} lacks {key!r}, which a {self.data.get('model_type')!r} config "
                                  "must have; the file is incomplete or damaged: save the model again with "
                                  "save_pretrained", code="E_CHECKPOINT")
        return self.data[key]

    def first(self, *keys: str, default: Any = None) -> Any:
        """The value of the first key present (families whose configs spell a field several ways)."""
        for key in keys:
            self.read.add(key)
        return next((self.data[k] for k in keys if k in self.data), default)

    def expect(self, key: str, *allowed: Any) -> Any:
        """The value of `key`, refused unless it is one of `allowed` (a missing key is the first)."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise unsupported(self, key, value, f"onnxformer implements {' or '.join(map(repr, allowed))}")
        return value

    def token_id(self, key: str) -> int:
        """A token id of config.json, -1 where it is unset or not an id; of a list (several eos
        ids) the first here: the package's generation defaults carry all of them."""
        value = self.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1

    def special_ids(self) -> dict[str, int]:
        """ModelConfig's pad/bos/eos ids from config.json (-1: none)."""
        return {key: self.token_id(key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}

    def unread(self) -> list[str]:
        """Keys that were not read, are not harmless, and do not hold a neutral value."""
        left = []
        for key, value in self.data.items():
            if key in self.read or key in HARMLESS_KEYS:
                continue
            if key in NEUTRAL_VALUES and value in NEUTRAL_VALUES[key]:
                continue
            left.append(key)
        return sorted(left)


def unsupported(hf: HFConfig, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(
        f"{hf.path}: {key}={value!r} is not supported for model_type {hf.data.get('model_type')!r} ({why}); "
        "onnxformer refuses a setting it would otherwise convert wrongly", code="E_UNSUPPORTED")


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one parameter of our model comes from: Hugging Face tensors and a conversion."""

    names: tuple[str, ...]
    convert: Callable[..., Tensor] | None = None  # f(*tensors) -> our tensor; None: the one tensor as is
    absent: str | None = None  # not in the checkpoint (`initialised`): why the parameter is initialised

    def build(self, read: Callable[[str], Tensor]) -> Tensor:
        tensors = [read(name) for name in self.names]
        return self.convert(*tensors) if self.convert is not None else tensors[0]


def take(name: str) -> Source:
    return Source((name,))


def initialised(why: str) -> Source:
    """A parameter of our model that the checkpoint's architecture does not have (BertModel has
    no MLM head): it gets Transformer's initialisation and the import reports it (`why`) in
    HFImport.initialised. Only for heads the architecture lacks, never for a missing tensor."""
    return Source((), None, why)


def transposed(name: str) -> Source:
    """A weight stored (in, out), e.g. GPT-2's Conv1D: our nn.Linear holds (out, in)."""
    return Source((name,), lambda t: t.t())


def part(name: str, index: int, parts: int, *, dim: int = 0, transpose: bool = False) -> Source:
    """One of `parts` equal slices along `dim` of a fused tensor (GPT-2's c_attn q|k|v)."""
    def convert(t: Tensor) -> Tensor:
        t = t.t() if transpose else t
        return t.chunk(parts, dim=dim)[index]

    return Source((name,), convert)


@dataclass(frozen=True)
class Family:
    """How one family of Hugging Face models maps onto our ModelConfig and parameters.

    config(hf, arch_hint) -> ModelConfig: read config.json through `hf` (every key it reads is
        recorded; the rest must be harmless). `arch_hint` is the class in `architectures[0]`.
    tensors(config, hf, names) -> {our parameter name: Source}: every parameter of
        Transformer(config) (tied duplicates excluded), given the checkpoint's tensor names.
    dropped(name) -> reason or None: checkpoint tensors deliberately not used (buffers such as
        `position_ids`, heads our model does not have), each with the reason shown in the report.
    """

    name: str
    model_types: tuple[str, ...]
    config: Callable[[HFConfig, str], ModelConfig]
    tensors: Callable[[ModelConfig, HFConfig, set[str]], dict[str, Source]]
    dropped: Callable[[str], str | None] = lambda name: None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def _load_families() -> None:
    from . import hf_decoders, hf_encoders, hf_seq2seq  # noqa: F401  (each registers its families)


# --------------------------------------------------------------------------------------------
# Reading a directory
# --------------------------------------------------------------------------------------------


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory: config.json with a `model_type` (ours has `arch`)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "arch" not in data


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 ({err.reason}); {what} must be a UTF-8 JSON file",
                              code="E_CHECKPOINT") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {what} is damaged: save the model again "
                              "with save_pretrained", code="E_CHECKPOINT") from None


class TensorFiles:
    """A checkpoint's tensors, read one at a time: safetensors files are memory-mapped, and a
    `pytorch_model.bin` is opened with torch.load(weights_only=True, mmap=True)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, Tensor]] = {}
        if (directory / SAFETENSORS_INDEX).is_file():
            self._from_index(directory / SAFETENSORS_INDEX)
        elif (directory / SAFETENSORS_FILE).is_file():
            self._add_safetensors(directory / SAFETENSORS_FILE)
        elif (directory / TORCH_INDEX).is_file():
            self._from_index(directory / TORCH_INDEX)
        elif (directory / TORCH_FILE).is_file():
            self._add_torch(directory / TORCH_FILE)
        else:
            raise CheckpointError(
                f"{directory} holds no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} with its shards, "
                f"or {TORCH_FILE}; save the model with save_pretrained into this folder", code="E_MISSING_FILE")
        self.names = set(self._where)

    def _from_index(self, index: Path) -> None:
        data = _read_json(index, "the shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; the shard index is damaged: save the model again "
                                  "with save_pretrained", code="E_CHECKPOINT")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {', '.join(missing)} that are not in {self.directory}; "
                                  "copy every shard the index lists into the folder", code="E_MISSING_FILE")
        for shard in shards:
            path = self.directory / shard
            if path.resolve().parent != self.directory.resolve():
                raise CheckpointError(f"{index} names {shard!r}, outside the model folder; refused",
                                      code="E_CHECKPOINT")
            if path.suffix == ".safetensors":
                self._add_safetensors(path)
            else:
                self._add_torch(path)
        unlisted = sorted(set(weight_map) - set(self._where))
        if unlisted:
            raise CheckpointError(f"{index} lists tensor(s) {', '.join(unlisted[:10])} that its shards do not hold; "
                                  "the shards and the index do not match", code="E_CHECKPOINT")

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it is damaged or "
                                  "incomplete: copy it again", code="E_CHECKPOINT") from None
        self._open[path] = handle
        for name in handle.keys():
            self._where[name] = path

    def _add_torch(self, path: Path) -> None:
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except UnpicklingError as err:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors, which torch.load(weights_only=True) refuses "
                f"to run ({str(err).splitlines()[0][:160]}); onnxformer never unpickles arbitrary code: convert the "
                "checkpoint to safetensors (model.save_pretrained(dir, safe_serialization=True)) in an "
                "environment you trust", code="E_CHECKPOINT") from None
        except (RuntimeError, OSError, EOFError) as err:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0][:160]}); "
                                  "it is damaged or incomplete", code="E_CHECKPOINT") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise CheckpointError(f"{path} is not a state dict of tensors", code="E_CHECKPOINT")
        self._bin[path] = tensors
        for name in tensors:
            self._where[name] = path

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._where[name]
        if path in self._bin:
            return tuple(self._bin[path][name].shape)
        return tuple(self._open[path].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint; it is "
                                  "incomplete, or not the model its config.json describes", code="E_CHECKPOINT")
        if path in self._bin:
            tensor = self._bin[path][name]
        else:
            # A fresh handle per tensor: a handle maps its whole file and keeps every page read
            # through it resident (counted in the process's RSS) until it is closed; read once,
            # the tensor is copied into the model and the map goes with the handle.
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        return tensor.float() if tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageInfo:
    """What an exported package carries beyond the model and its tokenizer file (set by an
    import; export/exporter.py writes it into the manifest)."""

    special_tokens: dict[str, int] = field(default_factory=dict)  # role (pad, unk, bos, eos, ...) -> id
    generation: dict[str, Any] = field(default_factory=dict)  # defaults: eos_token_ids, max_new_tokens, ...
    chat_template: str | None = None
    embedding: dict[str, Any] | None = None  # sentence-transformers: {"pooling": "mean" | "cls", "normalize": bool}
    source: dict[str, Any] = field(default_factory=dict)  # {"format": "huggingface", "model_type": ..., ...}
    # the tokenizer's named special tokens ({"bos_token": "<s>", ...}): what a chat template reads as
    # bos_token, eos_token, ... (transformers' special_tokens_map), even where config.json's ids differ
    chat_tokens: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HFImport:
    model: Transformer
    config: ModelConfig
    tokenizer_file: Path
    package: PackageInfo
    dropped: dict[str, str]  # checkpoint tensor -> why it is not used
    initialised: dict[str, str] = field(default_factory=dict)  # our parameter -> why it was initialised


SPECIAL_ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")


def read_hf_config(directory: str | os.PathLike) -> tuple[Family, HFConfig, ModelConfig]:
    """The family, the recorded config.json and our ModelConfig of a Hugging Face directory."""
    _load_families()
    directory = Path(directory)
    path = directory / CONFIG_FILE
    data = _read_json(path, "config.json")
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{path} has no 'model_type'; it is not a Hugging Face model config",
                              code="E_CHECKPOINT")
    model_type = data["model_type"]
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise CheckpointError(f"model_type {model_type!r} ({path}) is not supported; onnxformer imports: {known}",
                              code="E_UNSUPPORTED")
    hf = HFConfig(data, path)
    architectures = hf.get("architectures") or [""]
    try:
        config = family.config(hf, architectures[0])
    except ConfigError as err:  # our own check of the converted values
        raise CheckpointError(f"{path}: the {family.name} config converts to an invalid model config: {err}",
                              code="E_UNSUPPORTED") from None
    start = _generation_json(directory).get("decoder_start_token_id")
    if config.arch == "encoder-decoder" and start is not None and start != config.decoder_start_token_id:
        # generation_config.json's start wins over config.json's, as transformers' generate takes it
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < config.vocab_size:
            raise CheckpointError(f"{directory / GENERATION_CONFIG}: decoder_start_token_id {start!r} is not a token "
                                  f"id below vocab_size {config.vocab_size}; fix or remove it", code="E_CHECKPOINT")
        config = config.replace(decoder_start_token_id=start)
    left = hf.unread()
    if left:
        shown = ", ".join(f"{k}={data[k]!r:.40}" for k in left[:10])
        raise CheckpointError(
            f"{path}: config key(s) {shown} are not understood by onnxformer's {family.name} import and may change "
            "the model's math; onnxformer refuses them rather than convert the model wrongly (the families and "
            "settings it imports: README.md, 'Hugging Face models')", code="E_UNSUPPORTED")
    return family, hf, config


def load_hf(directory: str | os.PathLike, *, overrides: dict[str, Any] | None = None,
            fresh: tuple[str, ...] = ()) -> HFImport:
    """Import a Hugging Face model directory (see the module docstring).

    overrides: ModelConfig fields to change after conversion (fine-tuning: num_labels, dropout).
    fresh: parameter-name prefixes that keep their initialisation instead of being read (a new
    classification head); the checkpoint's tensors for them are dropped and reported.
    """
    directory = Path(directory)
    family, hf, config = read_hf_config(directory)
    if overrides:
        config = config.replace(**overrides)
    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise CheckpointError(
            f"{directory} has no {TOKENIZER_FILE}: a package carries a `tokenizers` JSON file; save the fast "
            "tokenizer into the folder (AutoTokenizer.from_pretrained(...).save_pretrained(folder))",
            code="E_TOKENIZER")
    files = TensorFiles(directory)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))  # read once: the package's tokens and the size check
    package = _package_info(directory, hf, config, family, tokenizer)
    _check_tokenizer(tokenizer, tokenizer_file, config)
    # A special token config.json has no id for is the tokenizer's (Qwen2.5: no pad_token_id, a pad
    # token in tokenizer_config.json): the model's math never reads it, the package's generation does.
    config = config.replace(**{f"{role}_token_id": package.special_tokens[role] for role in ("pad", "bos", "eos")
                               if getattr(config, f"{role}_token_id") < 0 <= package.special_tokens.get(role, -1)})
    model = Transformer(config) if fresh else _uninitialised(config)
    initialised: dict[str, str] = {}
    dropped = _copy_tensors(model, family, config, hf, files, fresh, initialised)
    log.info("imported %s (%s, %d tensors, %.1fM parameters)", directory, family.name, len(files.names),
             model.num_parameters() / 1e6)
    for line in dropped_report(dropped):
        log.info("%s", line)
    for line in dropped_report(initialised):
        log.info("%s", line.replace("not used:", "not in the checkpoint, initialised:", 1))
    return HFImport(model.eval(), config, tokenizer_file, package, dropped, initialised)


_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "trunc_normal_",
                   "xavier_uniform_", "xavier_normal_")


def _uninitialised(config: ModelConfig) -> Transformer:
    """Transformer(config) without the random initialisation of its parameters (torch.nn.init
    made a no-op while it is built, as transformers' no_init_weights does): every parameter is
    then read from the checkpoint (_copy_tensors checks that none is left out), and a 1B model
    is built in a second instead of ~20. Buffers (rotary frequencies, sinusoid tables) are
    computed as usual: they do not go through torch.nn.init."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        return Transformer(config)
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _initialise(model: Transformer, name: str) -> None:
    """Give parameter `name` Transformer's initialisation (_init_weights for a linear or
    embedding, ones/zeros for a norm), whether or not the model was built without one."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        Transformer._init_weights(module)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:  # RMSNorm
        with torch.no_grad():
            module.weight.fill_(1.0)


def _copy_tensors(model: Transformer, family: Family, config: ModelConfig, hf: HFConfig, files: TensorFiles,
                  fresh: tuple[str, ...], initialised: dict[str, str] | None = None) -> dict[str, str]:
    params = dict(model.named_parameters())  # a tied head appears once, as tok_emb.weight
    plan = family.tensors(config, hf, files.names)
    unknown = sorted(set(plan) - set(params))
    assert not unknown, f"{family.name}: the plan names parameters our model does not have: {unknown[:10]}"
    wanted = {name for name in params if not (fresh and name.startswith(fresh))}
    missing = sorted(name for name in wanted if name not in plan)
    if missing:  # the checkpoint lacks what the config says the model has
        raise CheckpointError(
            f"{files.directory}: the checkpoint has no tensor for {len(missing)} parameter(s) of the model its config "
            f"describes ({', '.join(missing[:10])}); it is incomplete or its config.json does not match it",
            code="E_CHECKPOINT")
    absent = sorted({n for name in wanted for n in plan[name].names if n not in files.names})
    if absent:  # every one of them named (the first ten), before anything is read
        raise CheckpointError(
            f"{files.directory}: {len(absent)} tensor(s) missing from the checkpoint ({', '.join(absent[:10])}"
            f"{', ...' if len(absent) > 10 else ''}); it is incomplete, or not the model its config.json describes",
            code="E_CHECKPOINT")
    used: set[str] = set()
    for name in sorted(wanted):
        source = plan[name]
        if source.absent is not None:  # a head the checkpoint's architecture does not have
            _initialise(model, name)
            if initialised is not None:
                initialised[name] = source.absent
            continue
        tensor = source.build(files.get)
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{files.directory}: tensor {', '.join(source.names)} has shape {tuple(tensor.shape)} but the model "
                f"its config.json describes needs {tuple(target.shape)} for {name}; the config and the weights do "
                "not match", code="E_CHECKPOINT")
        with torch.no_grad():
            target.copy_(tensor)
        used.update(source.names)
    dropped: dict[str, str] = {}
    for name in sorted(files.names - used):
        reason = family.dropped(name)
        if reason is None and fresh and any(plan.get(p) and name in plan[p].names for p in params
                                            if p.startswith(fresh)):
            reason = "replaced by a new head (fine-tuning)"
        if reason is not None:
            dropped[name] = reason
    unused = sorted(files.names - used - set(dropped))
    if unused:
        raise CheckpointError(
            f"{files.directory}: the checkpoint holds {len(unused)} tensor(s) the {family.name} import does not "
            f"use ({', '.join(unused[:10])}); onnxformer refuses weights it would silently drop: the checkpoint "
            "is not the model its config.json describes, or it has a head onnxformer does not implement",
            code="E_CHECKPOINT")
    return dropped


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _generation_json(directory: Path) -> dict[str, Any]:
    path = directory / GENERATION_CONFIG
    data = _read_json(path, "generation_config.json") if path.is_file() else {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object of generation settings", code="E_CHECKPOINT")
    return data


def _forced_tokens(directory: Path, hf: HFConfig, generation: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """forced_bos_token_id / forced_eos_token_id as generation defaults: generation_config.json's
    value where it has the key, else config.json's (transformers 3's force_bos_token_to_be_generated
    meant the bos id, as transformers 4 read it)."""
    out: dict[str, Any] = {}
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        value = generation[key] if key in generation else hf.data.get(key)
        if key == "forced_bos_token_id" and value is None and hf.data.get("force_bos_token_to_be_generated") is True:
            value = hf.data.get("bos_token_id")
        if value is None:
            continue
        ids = value if isinstance(value, list) and key == "forced_eos_token_id" else [value]
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < config.vocab_size
                              for t in ids):
            raise CheckpointError(f"{directory}: {key} {value!r} (generation_config.json or config.json) is not "
                                  f"{'a token id or a list of them' if key == 'forced_eos_token_id' else 'a token id'} "
                                  f"below vocab_size {config.vocab_size}; fix or remove it", code="E_CHECKPOINT")
        out[key] = ids if key == "forced_eos_token_id" else ids[0]
    return out


def _package_info(directory: Path, hf: HFConfig, config: ModelConfig, family: Family, tokenizer) -> PackageInfo:
    tok_config = _read_json(directory / TOKENIZER_CONFIG, "tokenizer_config.json") \
        if (directory / TOKENIZER_CONFIG).is_file() else {}
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP, "special_tokens_map.json") \
        if (directory / SPECIAL_TOKENS_MAP).is_file() else {}
    generation = _generation_json(directory)
    special: dict[str, int] = {}
    chat_tokens: dict[str, str] = {}
    for role in SPECIAL_ROLES:
        token = _token_content(tok_config.get(f"{role}_token")) or _token_content(special_map.get(f"{role}_token"))
        token_id = tokenizer.token_to_id(token) if token is not None else None
        special[role] = token_id if token_id is not None else -1
        if token is not None:
            chat_tokens[f"{role}_token"] = token
    # The model's own ids (config.json / generation_config.json) win over the tokenizer's names.
    for role, key in (("pad", "pad_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id")):
        value = getattr(config, key)
        if value >= 0:
            special[role] = value
    special["decoder_start"] = config.start_token_id if config.arch == "encoder-decoder" else -1
    eos = generation.get("eos_token_id", hf.data.get("eos_token_id"))
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int) and e >= 0]
    gen: dict[str, Any] = {}
    if config.has_decoder:
        gen["eos_token_ids"] = eos_ids or ([special["eos"]] if special["eos"] >= 0 else [])
        if isinstance(generation.get("max_new_tokens"), int):
            gen["max_new_tokens"] = generation["max_new_tokens"]
        elif isinstance(generation.get("max_length"), int) and generation["max_length"] > 0:
            gen["max_length"] = generation["max_length"]  # transformers: max_new_tokens, when set, overrides it
        gen.update(_forced_tokens(directory, hf, generation, config))
    template = tok_config.get("chat_template")
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    source = {"format": "huggingface", "model_type": hf.data["model_type"], "family": family.name,
              "architectures": list(hf.data.get("architectures") or [])}
    return PackageInfo(special_tokens=special, generation=gen,
                       chat_template=template if isinstance(template, str) else None,
                       embedding=sentence_transformers_pooling(directory), source=source, chat_tokens=chat_tokens)


def sentence_transformers_pooling(directory: Path) -> dict[str, Any] | None:
    """The pooling and normalisation of a sentence-transformers folder (modules.json), or None."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, "modules.json")
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_file} is not a list of modules", code="E_CHECKPOINT")
    pooling, normalize = None, False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("models.Transformer"):
            continue
        if kind.endswith("models.Pooling"):
            settings = _read_json(directory / module.get("path", "") / "config.json", "the pooling config")
            modes = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True]
            mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(modes[0] if len(modes) == 1 else "")
            if mode is None:
                raise CheckpointError(f"{directory}: sentence-transformers pooling {modes} is not supported "
                                      "(onnxformer implements mean or cls pooling)", code="E_UNSUPPORTED")
            pooling = mode
        elif kind.endswith("models.Normalize"):
            normalize = True
        else:
            raise CheckpointError(f"{directory}: sentence-transformers module {kind!r} is not supported (onnxformer "
                                  "implements Transformer, Pooling and Normalize)", code="E_UNSUPPORTED")
    return {"pooling": pooling or "mean", "normalize": normalize}


def _check_tokenizer(tokenizer, tokenizer_file: Path, config: ModelConfig) -> None:
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= config.vocab_size:
        raise CheckpointError(
            f"{tokenizer_file} produces token ids up to {top} but the model's embedding has {config.vocab_size} "
            "rows (vocab_size): the tokenizer does not belong to this model; put the model's own tokenizer.json "
            "in the folder", code="E_TOKENIZER")


def dropped_report(dropped: dict[str, str]) -> Iterable[str]:
    by_reason: dict[str, list[str]] = {}
    for name, reason in dropped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        yield f"not used: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)}): {reason}"


__all__ = [
    "FAMILIES", "Family", "HFConfig", "HFImport", "PackageInfo", "Source", "TensorFiles", "initialised", "is_hf_dir",
    "load_hf", "part", "read_hf_config", "register", "sentence_transformers_pooling", "take", "transposed",
    "unsupported",
]
