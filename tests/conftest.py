"""Shared fixtures: tiny models and packages built on the spot (no downloads, no training)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"

TEXTS = [
    "the cat sat on the mat and the dog ran after it",
    "one two three four five six seven eight nine ten",
    "héllo wörld, naïve café — 你好，世界 🙂🚀\tend\nnew line",
    "a quick brown fox jumps over the lazy dog",
] * 10


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(arch: str):
    from onnxformer.modeling.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, arch=arch, vocab_size=320)


def make_model(arch: str, pos: str = "rope", *, seed: int = 0, **overrides):
    """An untrained tiny model with a real tokenizer: (model, tokenizer)."""
    import torch

    from onnxformer.modeling.config import ModelConfig
    from onnxformer.modeling.model import Transformer
    from onnxformer.modeling.tokenizer import special_token_ids

    tok = tiny_tokenizer(arch)
    special = special_token_ids(tok)
    kwargs = dict(
        arch=arch, vocab_size=tok.get_vocab_size(), d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
        d_ff=64, max_seq_len=96, pos_encoding=pos, pad_token_id=special["pad"],
        bos_token_id=special["bos"], eos_token_id=special["eos"],
    )
    if arch == "encoder":
        kwargs.update(type_vocab_size=2, num_labels=3, label_names=("negative", "neutral", "positive"))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**kwargs)).eval(), tok


@pytest.fixture(scope="session")
def package_factory(tmp_path_factory):
    """Export (and cache) a tiny package: package_factory(arch, pos="rope", **options)."""
    if not HAS_TORCH:
        pytest.skip("exporting needs the [train] extra (torch)")
    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    cache: dict = {}

    def build(arch: str, pos: str = "rope", **options):
        key = (arch, pos, tuple(sorted(options.items())))
        if key not in cache:
            model, tok = make_model(arch, pos)
            root = tmp_path_factory.mktemp(f"pkg-{arch}-{pos}")
            save_tokenizer(tok, root / "tokenizer.json")
            report = export_model(model, root / "tokenizer.json", root / "package", ExportOptions(**options))
            cache[key] = (model, tok, report)
        return cache[key]

    return build
