"""Checkpoints: safetensors and JSON only (no pickle anywhere), written atomically.

A run directory holds one folder per save and a ``latest`` pointer::

    RUN_DIR/
      latest                        one line: the folder name of the newest complete checkpoint
      metrics.jsonl                 one JSON object per log / eval event (written by the trainer)
      .lock                         while a run writes here: its pid (onnxformer.runtime.atomic.lock_dir)
      step-000200/
        config.json                 ModelConfig (arch, sizes, special token ids, label_names)
        model.safetensors           plain model weights (LoRA merged), tied weights stored once
        tokenizer.json              the tokenizer the model was trained with
        trainer_state.json          step, TrainConfig, optimizer hyper-parameters, schedule,
                                    data position, RNG scalars, last metrics
        training_state.safetensors  optimizer moments, RNG state tensors and, for a LoRA run,
                                    the unmerged training model (what --resume needs)
        package.json                only for a model imported from Hugging Face (and what is
                                    fine-tuned from it): its PackageInfo (special token ids,
                                    eos ids, chat template, pooling, source), which export puts
                                    into the package
        checksums.json              sha256 of every other file, written last

``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (+ ``package.json`` where present)
is a complete model: ``load_model`` and export need nothing else. The two training files only
serve ``--resume``.

Atomicity (onnxformer.runtime.atomic): a checkpoint is built in a hidden temporary folder next
to its target, every file is fsync'ed, the folder is renamed into place and only then is
``latest`` rewritten (temp file, fsync, ``os.replace``). A crash at any point leaves ``latest`` naming
a complete checkpoint (or absent, before the first save).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file
from torch import Tensor, nn

from onnxformer.runtime import atomic
from onnxformer.runtime.errors import CheckpointError
from onnxformer.runtime.manifest import TOKENIZER_FILE, sha256_file  # the name packages use too

from .config import ModelConfig
from .hf_import import PackageInfo
from .model import Transformer

logger = logging.getLogger(__name__)

LATEST = "latest"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.safetensors"
CHECKSUMS_FILE = "checksums.json"  # {"sha256": {file: hex}} of the other files, written last
CHECKPOINT_FILES = (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE, TRAINING_STATE_FILE, CHECKSUMS_FILE)
PACKAGE_FILE = "package.json"  # PackageInfo of an imported model; only in checkpoints of one


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------------
# Model weights: plain (LoRA merged) state dict, tied weights stored once
# --------------------------------------------------------------------------------------------


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of ``model`` as a plain Transformer would name them.

    LoRA layers (``x.base.weight``, ``x.lora_A``, ``x.lora_B``) are folded into ``x.weight``
    without touching the model; of tensors sharing storage (tied embeddings) only the first
    name is kept. Returns contiguous CPU tensors.
    """
    from .peft import LoRALinear

    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in lora:
            module = lora[owner[: -len(".base")]]
            name = f"{owner[: -len('.base')]}.{leaf}"
            if leaf == "weight":
                tensor = tensor + module.delta_weight().detach().to(tensor.dtype)
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def load_plain_state_dict(model: nn.Module, tensors: Mapping[str, Tensor], *, source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``tensors`` (from ``plain_state_dict``) into a plain model.

    Names missing from ``tensors`` must be tied aliases of stored tensors, or start with one
    of ``allow_missing`` (a fresh task head); anything else is an error naming ``source``.
    """
    expected = model.state_dict()
    tied = set(expected) - set(plain_state_dict(model))  # aliases the saver drops
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(
        n for n in set(expected) - set(tensors) if n not in tied and not n.startswith(allow_missing)
    )
    if unexpected or missing:
        raise CheckpointError(
            f"{source} does not fit the model built from its config: "
            f"missing {missing[:5] or 'nothing'}, unexpected {unexpected[:5] or 'nothing'}; "
            "was it written by a different version or for another architecture?"
        )
    for name, tensor in tensors.items():
        if expected[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}; the checkpoint and config.json disagree"
            )
    model.load_state_dict(dict(tensors), strict=False)


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state <-> (tensors, JSON)
# --------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ``optimizer/{param name}/{key}`` and JSON.

    ``names[i]`` is the name of the optimizer's i-th parameter (in param_groups order).
    """
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{names[index]}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    return tensors, {"param_names": names, "param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    if list(meta["param_names"]) != names:
        raise CheckpointError(
            "the checkpoint's optimizer was built over different parameters "
            f"({len(meta['param_names'])} saved, {len(names)} now); resume with the same "
            "task, LoRA and BitFit settings"
        )
    per_param: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        entry = {key: value for key, value in meta["scalars"].get(name, {}).items()}
        prefix = f"optimizer/{name}/"
        entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if entry:
            per_param[index] = entry
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every global generator training may touch: torch (CPU, CUDA), numpy, Python."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss = random.getstate()
    scalars = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
    }
    return tensors, scalars


def set_rng_state(tensors: Mapping[str, Tensor], scalars: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    np_scalars = scalars["numpy"]
    keys = tensors["rng/numpy"].numpy().view(np.uint32)
    np.random.set_state((np_scalars["kind"], keys, np_scalars["pos"], np_scalars["has_gauss"], np_scalars["cached_gaussian"]))
    py = scalars["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# --------------------------------------------------------------------------------------------
# Atomic writes (the one implementation: onnxformer.runtime.atomic)
# --------------------------------------------------------------------------------------------


def _set_latest(run_dir: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically (the last step of a save)."""
    atomic.replace_text(run_dir / LATEST, name + "\n")


class CheckpointFiles(NamedTuple):
    """What one checkpoint holds, ready to write."""

    model_config: ModelConfig
    model_tensors: dict[str, Tensor]  # plain_state_dict(model)
    tokenizer_json: str  # tokenizer.to_str()
    trainer_state: dict[str, Any]  # JSON-serialisable
    training_tensors: dict[str, Tensor]  # optimizer moments, RNG tensors, unmerged LoRA model
    package: PackageInfo | None = None  # an imported model's: written as package.json


def _save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    """safetensors' save_file; its write failures (disk full: SafetensorError "os error 28") as the
    OSError they are, so the trainer reports them like any other failed write (E_DISK)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        text = str(err)
        if "os error" not in text.lower() and "i/o error" not in text.lower():
            raise  # not a write failure: a bug, keep its traceback
        number = re.search(r"os error (\d+)", text)
        code = int(number[1]) if number else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from err


def _write_files(folder: Path, files: CheckpointFiles) -> None:
    """The writing step of ``save_checkpoint``: every file into the staging folder (fsync'ed
    when the folder is published)."""
    (folder / CONFIG_FILE).write_text(files.model_config.to_json() + "\n", encoding="utf-8")
    _save_tensors(files.model_tensors, folder / MODEL_FILE, {"format": "pt"})
    (folder / TOKENIZER_FILE).write_text(files.tokenizer_json, encoding="utf-8")
    _save_tensors(files.training_tensors, folder / TRAINING_STATE_FILE, None)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(files.trainer_state, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    names = [name for name in CHECKPOINT_FILES if name != CHECKSUMS_FILE]
    if files.package is not None:
        (folder / PACKAGE_FILE).write_text(json.dumps(dataclasses.asdict(files.package), indent=2, sort_keys=True)
                                           + "\n", encoding="utf-8")
        names.append(PACKAGE_FILE)
    # Digests, so that a changed byte anywhere (a weight included) is refused at load, not exported.
    digests = {name: sha256_file(folder / name) for name in names}
    (folder / CHECKSUMS_FILE).write_text(json.dumps({"sha256": digests}, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(run_dir: str | os.PathLike, step: int, files: CheckpointFiles, *, keep: int = 0) -> Path:
    """Write ``RUN_DIR/step-NNNNNN`` atomically, point ``latest`` at it, and keep only the
    newest ``keep`` checkpoints (0 = keep all). Returns the checkpoint folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / checkpoint_name(step)
    for name in ("step-*", LATEST):  # checkpoint folders and the `latest` pointer of killed runs
        atomic.remove_stale_temporaries(run_dir, name)
    tmp = atomic.staging_dir(final)
    try:
        _write_files(tmp, files)
        # An existing `final` was left by a run that crashed before updating `latest` (never
        # `latest` itself): publishing replaces it.
        atomic.publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _set_latest(run_dir, final.name)
    logger.info("saved checkpoint %s", final)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _verify(path: Path) -> None:
    """``path`` against its folder's checksums.json (checkpoints written before it have none).
    Called once a file has parsed (and a JSON file passed its checks), so those name what is
    wrong first; the digest then catches what still parses, like a changed weight byte."""
    table = path.parent / CHECKSUMS_FILE
    if not table.is_file():
        return
    try:
        expected = json.loads(table.read_bytes().decode("utf-8"))["sha256"][path.name]
    except OSError as err:
        raise CheckpointError(f"cannot read {table}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{table} is not a valid digest table (or lacks {path.name}); the checkpoint is "
                              "damaged") from None
    try:
        actual = sha256_file(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if actual != expected:
        raise CheckpointError(f"{path} does not match its sha256 in {CHECKSUMS_FILE} ({str(expected)[:16]}..., "
                              f"file {actual[:16]}...); the file was altered or the checkpoint is damaged")


def load_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file (never pickle); a damaged file is a CheckpointError naming it."""
    try:
        tensors = _load_safetensors(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}); the checkpoint is damaged") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    _verify(Path(path))  # parsing is not enough: a changed weight byte still parses
    return tensors


def _read_json(path: Path, what: str) -> Any:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the {what} is damaged") from None
    return data


def read_model_config(folder: Path) -> ModelConfig:
    """``folder/config.json`` as a ModelConfig; a damaged file is a CheckpointError naming it."""
    path = folder / CONFIG_FILE
    data = _read_json(path, "checkpoint")
    try:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid model config ({err}); the checkpoint is damaged") from None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint folders of a run, oldest first (temporary folders excluded)."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / CONFIG_FILE).is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``RUN_DIR/latest`` names, or None before the first save."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except OSError as err:
        raise CheckpointError(f"cannot read {pointer}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not a text file naming a checkpoint folder; the run directory is damaged") from None
    if name != os.path.basename(name) or name in (".", "..") or "\\" in name or "\x00" in name:
        raise CheckpointError(f"{pointer} names {name!r:.80}, which is not a folder of {run_dir}; refused")
    path = Path(run_dir) / name
    if not name or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder in {run_dir}")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder or a run directory (its ``latest``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass the --out folder of `onnxformer train` (or one of its "
                              "step-N folders)", code="E_MISSING_FILE")
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    if (path / LATEST).is_file():
        return latest_checkpoint(path)  # type: ignore[return-value]
    raise CheckpointError(
        f"{path} is neither a checkpoint folder (with {CONFIG_FILE} and {MODEL_FILE}) nor a run "
        f"directory with a {LATEST!r} pointer; pass the --out folder of `onnxformer train`"
    )


def read_package(path: str | os.PathLike) -> PackageInfo | None:
    """The PackageInfo a checkpoint keeps for an imported model (package.json), or None for a
    model trained here from scratch. Verified against checksums.json like the other files."""
    folder = resolve_checkpoint(path)
    file = folder / PACKAGE_FILE
    if not file.is_file():
        table = folder / CHECKSUMS_FILE
        digests = _read_json(table, "checkpoint") if table.is_file() else {}
        # Written with one: without it, export would drop the chat template and the eos ids.
        if isinstance(digests, dict) and PACKAGE_FILE in (digests.get("sha256") or {}):
            raise CheckpointError(f"{file} is missing but {CHECKSUMS_FILE} lists it; the checkpoint is incomplete: "
                                  "copy the whole checkpoint folder")
        return None
    data = _read_json(file, "checkpoint")
    fields = {f.name for f in dataclasses.fields(PackageInfo)}
    if not isinstance(data, dict) or set(data) - fields:
        extra = sorted(set(data) - fields) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{file} is not a package description (unexpected: {extra}); the checkpoint is damaged")
    _verify(file)
    try:
        return PackageInfo(**data)
    except TypeError as err:
        raise CheckpointError(f"{file} is not a package description ({err}); the checkpoint is damaged") from None


def tokenizer_path(path: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` of a checkpoint (or of a run directory's latest checkpoint)."""
    file = resolve_checkpoint(path) / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    return file


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[Transformer, ModelConfig]:
    """Build the model of a checkpoint (or a run directory's latest) in eval mode."""
    folder = resolve_checkpoint(path)
    config = read_model_config(folder)
    model = Transformer(config)
    load_plain_state_dict(model, load_file(str(folder / MODEL_FILE)), source=str(folder / MODEL_FILE))
    _verify(folder / CONFIG_FILE)  # load_file verified the weights
    return model.to(device).eval(), config


class TrainingState(NamedTuple):
    folder: Path
    trainer_state: dict[str, Any]
    tensors: dict[str, Tensor]


def load_training_state(path: str | os.PathLike) -> TrainingState:
    folder = resolve_checkpoint(path)
    state_file, tensor_file = folder / TRAINER_STATE_FILE, folder / TRAINING_STATE_FILE
    for file in (state_file, tensor_file):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; this checkpoint cannot be resumed")
    read_model_config(folder)  # resuming rebuilds the model from it: fail here, naming the file
    state = _read_json(state_file, "checkpoint")
    required = ("step", "train_config", "world_size", "optimizer", "rng")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file} lacks {', '.join(missing)}; this checkpoint cannot be resumed")
    tensors = load_file(tensor_file)
    for name in (CONFIG_FILE, TRAINER_STATE_FILE, MODEL_FILE):  # resume reads the weights with load_file too
        _verify(folder / name)
    return TrainingState(folder, state, tensors)


__all__ = [
    "CHECKPOINT_FILES", "CHECKSUMS_FILE", "PACKAGE_FILE", "CheckpointFiles", "TrainingState", "checkpoint_name", "latest_checkpoint",
    "list_checkpoints", "load_file", "load_model", "load_optimizer_state", "load_plain_state_dict",
    "load_training_state", "optimizer_state", "plain_state_dict", "read_model_config", "read_package", "resolve_checkpoint",
    "rng_state", "save_checkpoint", "set_rng_state", "tokenizer_path",
]
