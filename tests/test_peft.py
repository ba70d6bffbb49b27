"""LoRA and BitFit: what trains, what stays frozen, and merged == unmerged."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PEFT tests need the [train] extra (torch)")
from torch import nn  # noqa: E402

from onnxformer.modeling.checkpoint import load_plain_state_dict, plain_state_dict  # noqa: E402
from onnxformer.modeling.config import ModelConfig  # noqa: E402
from onnxformer.modeling.model import Transformer  # noqa: E402
from onnxformer.modeling.peft import (  # noqa: E402
    LoRAConfig,
    LoRALinear,
    apply_bitfit,
    apply_lora,
    has_lora,
    merge_lora,
    trainable_parameters,
)

V = 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def tiny(arch: str = "decoder", **overrides) -> Transformer:
    torch.manual_seed(0)
    kwargs = dict(arch=arch, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=32,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "encoder":
        kwargs.update(num_labels=3, bos_token_id=-1, eos_token_id=-1)
    kwargs.update(overrides)
    return Transformer(ModelConfig(**kwargs))


def ids(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    if model.config.arch == "encoder":
        return model.classify(model.encode(x))
    if model.config.arch == "encoder-decoder":
        return model.decode(x, cross_kv=model.cross_kv(model.encode(x))).logits
    return model.decode(x).logits


def train_steps(model: Transformer, steps: int = 5) -> None:
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        loss = logits(model, ids(seed=step)).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_lora_surgery_targets_and_trainable_set(arch):
    model = tiny(arch, activation="swiglu")
    replaced = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    layers = model.config.n_encoder_layers + model.config.n_step_layers
    cross = model.config.n_step_layers if arch == "encoder-decoder" else 0
    assert len(replaced) == 4 * (layers + cross) + 3 * layers  # attention + swiglu feed-forward
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in replaced)
    trainable = trainable_parameters(model)
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_lora_starts_as_the_base_model_and_trains_only_adapters():
    model = tiny("encoder")
    x = ids()
    before = logits(model, x).detach()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")), trainable=("classifier.",))
    torch.testing.assert_close(logits(model, x), before)  # B = 0 at start
    frozen = {k: v for k, v in snapshot(model).items() if "lora_" not in k and not k.startswith("classifier.")}
    trained = {k: v for k, v in snapshot(model).items() if "lora_B" in k or k.startswith("classifier.")}
    train_steps(model)
    after = snapshot(model)
    for name, value in frozen.items():
        assert torch.equal(after[name], value), f"{name} changed but is frozen"
    for name, value in trained.items():  # every adapter and the task head moved
        assert not torch.equal(after[name], value), f"{name} did not train"


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_merge_lora_gives_the_same_logits_and_plain_linears(arch):
    model = tiny(arch)
    plain_names = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")))
    train_steps(model)
    model.eval()
    x = ids()
    unmerged = logits(model, x).detach()
    exported = plain_state_dict(model)  # what a checkpoint stores, computed without touching the model
    merge_lora(model)
    assert not has_lora(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert set(model.state_dict()) == plain_names  # the original parameter names
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
    # The stored plain weights load into a fresh Transformer and give the same logits too.
    fresh = tiny(arch).eval()
    load_plain_state_dict(fresh, exported, source="test")
    torch.testing.assert_close(logits(fresh, x), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="rank must be a positive integer; got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="non-empty subset of q_proj"):
        LoRAConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="no nn.Linear named gate_proj"):
        apply_lora(tiny(), LoRAConfig(targets=("gate_proj",)))  # gelu model: no gate projection


def test_bitfit_trains_only_biases_and_the_head():
    model = tiny("encoder")
    names = apply_bitfit(model, trainable=("classifier.",))
    assert set(names) == set(trainable_parameters(model))
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in changed), changed
    assert "classifier.weight" in changed


def test_bitfit_needs_biases():
    with pytest.raises(ValueError, match="bias=True"):
        apply_bitfit(tiny(bias=False))
