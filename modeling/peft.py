"""Parameter-efficient fine-tuning: LoRA and BitFit, by module surgery on a built model.

LoRA (Hu et al. 2021): each targeted ``nn.Linear`` (``W x + b``) becomes a ``LoRALinear``
that keeps the frozen base layer and adds a trainable low-rank update::

    y = W x + b + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), B = 0 at start

so training starts exactly from the base model. ``merge_lora`` folds ``(alpha / r) * B @ A``
into ``W`` and puts the plain ``nn.Linear`` back: export and ``load_model`` see an ordinary
model with the original parameter names.

BitFit (Ben Zaken et al. 2021): only the bias terms train (plus the task head, e.g. a fresh
classifier).

Targets are matched by the last component of the module name, e.g. ``q_proj`` matches
``decoder_layers.0.attn.q_proj``; the model's projections are q_proj, k_proj, v_proj,
o_proj (attention) and up_proj, down_proj, gate_proj (feed-forward).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from onnxformer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

LORA_TARGET_CHOICES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8  # r, the inner dimension of the update
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input only
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer; got {self.rank!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(LORA_TARGET_CHOICES))
        if not self.targets or unknown:
            raise ConfigError(
                f"LoRA targets must be a non-empty subset of {', '.join(LORA_TARGET_CHOICES)}; "
                f"got {', '.join(self.targets) or 'nothing'}"
            )


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-r update. Parameters: ``base.weight``,
    ``base.bias`` (frozen), ``lora_A`` (r, in), ``lora_B`` (out, r)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 keeps W x + b at start
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scale * update

    def delta_weight(self) -> Tensor:
        """The update as a weight matrix, (alpha / r) * B @ A, shaped like base.weight (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (without adapter dropout)."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        linear.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _unfreeze(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    prefixes = tuple(prefixes)
    names = []
    for name, param in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            param.requires_grad_(True)
            names.append(name)
    return names


def apply_lora(model: nn.Module, config: LoRAConfig, *, trainable: Sequence[str] = ()) -> list[str]:
    """Freeze ``model`` and replace every targeted nn.Linear with a LoRALinear, in place.

    ``trainable`` lists parameter-name prefixes that stay trainable (the task head, e.g.
    ``("classifier.", "pooler.")``). Returns the names of the replaced modules.
    """
    model.requires_grad_(False)
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets
    ]
    if not targets:
        raise ConfigError(
            f"no nn.Linear named {', '.join(config.targets)} in the model; "
            f"choose LoRA targets among {', '.join(LORA_TARGET_CHOICES)} that the architecture has"
        )
    for name in targets:
        base = model.get_submodule(name)
        _set_submodule(model, name, LoRALinear(base, rank=config.rank, alpha=config.alpha, dropout=config.dropout))
    _unfreeze(model, trainable)
    logger.info("LoRA r=%d alpha=%g on %d linear layers", config.rank, config.alpha, len(targets))
    return targets


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear, in place; returns ``model``.

    Afterwards the parameter names are those of the original model (``...q_proj.weight``).
    The merged layers keep the requires_grad flag of the base (frozen).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        merged = lora.merged()
        merged.requires_grad_(False)
        _set_submodule(model, name, merged)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_bitfit(model: nn.Module, *, trainable: Sequence[str] = ()) -> list[str]:
    """Freeze everything but the bias vectors (and the ``trainable`` prefixes), in place.

    Returns the names of the trainable parameters. Fails if the model has no biases
    (ModelConfig.bias=False).
    """
    model.requires_grad_(False)
    names = []
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            param.requires_grad_(True)
            names.append(name)
    if not names:
        raise ConfigError("BitFit needs bias parameters, and this model has none; build it with ModelConfig(bias=True)")
    names += [n for n in _unfreeze(model, trainable) if n not in names]
    logger.info("BitFit: %d trainable tensors", len(names))
    return names


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter for every parameter with requires_grad, in registration order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


__all__ = [
    "LORA_TARGET_CHOICES", "LoRAConfig", "LoRALinear", "apply_bitfit", "apply_lora", "has_lora",
    "merge_lora", "trainable_parameters",
]
