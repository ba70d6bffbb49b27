"""Invariants of the PyTorch modeling: cache parity, masks, positions, config validation."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="modeling tests need the [train] extra (torch)")

from onnxformer.modeling.config import ModelConfig  # noqa: E402
from onnxformer.modeling.model import (  # noqa: E402
    RotaryEmbedding,
    Transformer,
    apply_rope,
    sinusoidal_table,
)

V = 61
ARCHS = ["encoder", "decoder", "encoder-decoder", "prefix-lm"]
POSITIONS = ["sinusoidal", "learned", "rope"]
DECODERS = ["decoder", "encoder-decoder", "prefix-lm"]


def tiny(arch: str, pos: str = "rope", **overrides) -> Transformer:
    torch.manual_seed(0)
    kwargs = dict(
        arch=arch, vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64,
        max_seq_len=64, pos_encoding=pos, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if arch == "encoder":
        kwargs.update(type_vocab_size=2, num_labels=3)
    kwargs.update(overrides)
    return Transformer(ModelConfig(**kwargs)).eval()


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def random_rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


# --- KV cache: step-by-step logits equal one full forward -----------------------------------


def stepwise_vs_full(model: Transformer, prompt_rows, cont_len: int, source=None):
    """Full forward over prompt+continuation vs prefill(prompt) then one token at a time."""
    arch = model.config.arch
    g = torch.Generator().manual_seed(7)
    cont = torch.randint(3, V, (len(prompt_rows), cont_len), generator=g)
    ids, mask = left_pad(prompt_rows)
    b, p = ids.shape
    full_ids = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    kw = {}
    if arch == "encoder-decoder":
        src_ids, src_mask = left_pad(source)
        hidden = model.encode(src_ids, src_mask, position_ids=positions(src_mask))
        kw = dict(cross_kv=model.cross_kv(hidden), encoder_attention_mask=src_mask)
    prefix = None
    if arch == "prefix-lm":
        prefix = torch.cat([mask.bool(), torch.zeros_like(cont, dtype=torch.bool)], 1)
    full = model.decode(full_ids, attention_mask=full_mask, position_ids=positions(full_mask),
                        prefix_mask=prefix, **kw).logits

    out = model.decode(ids, attention_mask=mask, position_ids=positions(mask), **kw)
    steps = [out.logits]
    past, cur_mask = out.present, mask
    for j in range(cont_len):
        cur_mask = torch.cat([cur_mask, torch.ones(b, 1, dtype=torch.long)], 1)
        pos = positions(cur_mask)[:, -1:]
        out = model.decode(cont[:, j:j + 1], attention_mask=cur_mask, position_ids=pos, past=past, **kw)
        steps.append(out.logits)
        past = out.present
    stepped = torch.cat(steps, 1)
    real = full_mask.bool()
    return full[real], stepped[real], past


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("arch", DECODERS)
def test_cached_decoding_equals_full_forward(arch, pos):
    model = tiny(arch, pos)
    prompts = random_rows([5, 2, 7])  # batch of 3, left padded
    source = random_rows([6, 9, 3], seed=3) if arch == "encoder-decoder" else None
    if arch == "encoder-decoder":
        prompts = [[1] + r[:1] for r in prompts]  # decoder starts with a short prefix
    full, stepped, past = stepwise_vs_full(model, prompts, cont_len=4, source=source)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert past[0].key.shape == (3, 2, max(map(len, prompts)) + 4, 8)  # (B, Hkv, P+T, Dh)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(activation="swiglu", norm="rmsnorm", n_kv_heads=1),  # LLaMA-style, MQA
        dict(norm_position="post", n_kv_heads=4),  # original Transformer / BERT, plain MHA
        dict(tie_embeddings=False, bias=False),
    ],
    ids=["llama", "post-norm", "untied"],
)
def test_cache_parity_across_building_blocks(overrides):
    model = tiny("decoder", "rope", **overrides)
    full, stepped, _ = stepwise_vs_full(model, random_rows([4, 6]), cont_len=3)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", POSITIONS)
def test_encoder_left_padding_equals_unpadded(pos):
    model = tiny("encoder", pos)
    rows = random_rows([6, 3])
    ids, mask = left_pad(rows)
    batched = model.encode(ids, mask, position_ids=positions(mask))
    for i, row in enumerate(rows):
        alone = model.encode(torch.tensor([row]))
        torch.testing.assert_close(batched[i, mask[i].bool()], alone[0], atol=1e-5, rtol=0)


# --- Masks do what they say -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_future_tokens_never_change_earlier_logits(arch):
    model = tiny(arch)
    ids = torch.tensor(random_rows([8]))
    kw = {}
    if arch == "encoder-decoder":
        kw = dict(cross_kv=model.cross_kv(model.encode(torch.tensor(random_rows([5], seed=4)))))
    base = model.decode(ids, **kw).logits
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % V
    after = model.decode(changed, **kw).logits
    torch.testing.assert_close(after[:, :5], base[:, :5], atol=0, rtol=0)
    assert not torch.allclose(after[:, 5:], base[:, 5:])


def test_prefix_lm_prompt_is_bidirectional_and_continuation_causal():
    model = tiny("prefix-lm")
    ids = torch.tensor(random_rows([9]))
    prefix = torch.tensor([[True] * 5 + [False] * 4])
    base = model.decode(ids, prefix_mask=prefix).logits

    late_prompt = ids.clone()
    late_prompt[0, 4] = (late_prompt[0, 4] + 1) % V  # last prompt token
    out = model.decode(late_prompt, prefix_mask=prefix).logits
    assert not torch.allclose(out[:, :4], base[:, :4])  # earlier prompt positions see it

    continuation = ids.clone()
    continuation[0, 7] = (continuation[0, 7] + 1) % V
    out = model.decode(continuation, prefix_mask=prefix).logits
    torch.testing.assert_close(out[:, :7], base[:, :7], atol=0, rtol=0)  # nothing before sees it


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_changes_other_positions(arch):
    model = tiny(arch)
    rows = random_rows([4, 7])
    ids, mask = left_pad(rows)
    other = ids.clone()
    other[mask == 0] = 17  # different garbage under the padding
    pos = positions(mask)
    if arch == "encoder":
        a = model.encode(ids, mask, position_ids=pos)
        b = model.encode(other, mask, position_ids=pos)
    elif arch == "encoder-decoder":
        def run(src):
            kv = model.cross_kv(model.encode(src, mask, position_ids=pos))
            return model.decode(torch.tensor([[1, 5], [1, 6]]), cross_kv=kv, encoder_attention_mask=mask).logits
        a, b = run(ids), run(other)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        return
    else:
        a = model.decode(ids, attention_mask=mask, position_ids=pos).logits
        b = model.decode(other, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


# --- Positional encodings -------------------------------------------------------------------


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(50, 16)
    assert table[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # 0.841
    assert table[1, 0].item() == pytest.approx(0.841, abs=1e-3)
    for pos, i in [(0, 0), (3, 2), (17, 5), (49, 7)]:
        angle = pos / 10000 ** (2 * i / 16)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_scores_depend_only_on_relative_offset():
    rope = RotaryEmbedding(16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, *rope(torch.tensor([[m]])))
        kn = apply_rope(k, *rope(torch.tensor([[n]])))
        return (qm * kn).sum().item()

    for m, n, shift in [(5, 2, 10), (0, 7, 33), (12, 12, 5)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)


# --- Config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "d_model (30) must be divisible by n_heads (4)"),
        (dict(n_heads=12, n_kv_heads=5, d_model=48), "n_heads (12) must be a multiple of n_kv_heads (5)"),
        (dict(arch="gpt"), "arch must be one of"),
        (dict(pos_encoding="alibi"), "'alibi'"),
        (dict(activation="mish"), "'mish'"),
        (dict(norm="batchnorm"), "'batchnorm'"),
        (dict(norm_position="sandwich"), "'sandwich'"),
        (dict(vocab_size=0), "vocab_size must be a positive integer; got 0"),
        (dict(dropout=1.5), "dropout must be in [0, 1); got 1.5"),
        (dict(arch="decoder", num_labels=2), "apply to arch 'encoder' only"),
    ],
)
def test_invalid_configs_raise_with_the_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value)


def test_config_json_round_trip_and_frozen():
    c = ModelConfig(arch="encoder", num_labels=2, type_vocab_size=2, label_names=("neg", "pos"))
    again = ModelConfig.from_json(c.to_json())
    assert again == c and again.n_kv_heads == c.n_heads
    assert json.loads(c.to_json())["label_names"] == ["neg", "pos"]
    with pytest.raises(Exception):
        c.d_model = 1  # frozen
    with pytest.raises(ValueError, match="unknown model config fields: colour"):
        ModelConfig.from_dict({**c.to_dict(), "colour": "red"})


def test_config_module_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from onnxformer.modeling.config import ModelConfig; ModelConfig()\n"
        "import onnxformer.modeling"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tied_head_shares_the_embedding():
    model = tiny("decoder")
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny("decoder", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_encoder_heads_shapes():
    model = tiny("encoder")
    ids = torch.tensor(random_rows([6, 6]))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    hidden = model.encode(ids, token_type_ids=types)
    assert hidden.shape == (2, 6, 32)
    assert model.mlm_logits(hidden).shape == (2, 6, V)
    assert model.nsp_logits(hidden).shape == (2, 2)
    assert model.classify(hidden).shape == (2, 3)
    # segments matter
    assert not torch.allclose(hidden, model.encode(ids))
