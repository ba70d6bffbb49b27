"""Shared test helpers: tiny models with real tokenizers, built on the spot (no downloads).

Imported as `support` (pyproject sets pytest's pythonpath to tests/)."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path


HAS_TORCH = importlib.util.find_spec("torch") is not None
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
NODE_DIR = REPO / "runtime" / "node"
# The Node.js runtime can run: node on PATH and runtime/node's npm packages (npm ci) installed.
HAS_NODE = shutil.which("node") is not None and (NODE_DIR / "node_modules").is_dir()

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


class ForwardingSteps:
    """A step model that passes every call to `inner` and hands each step's result to
    `observe(result)`, which returns what the search gets (tests watch the search with it)."""

    def __init__(self, inner):
        self.inner, self.vocab_size = inner, inner.vocab_size

    rows = property(lambda self: self.inner.rows)

    def observe(self, result):
        return result

    def prefill(self, prompts):
        return self.observe(self.inner.prefill(prompts))

    def advance(self, tokens):
        return self.observe(self.inner.advance(tokens))

    def select(self, rows):
        self.inner.select(rows)

    def release(self, rows):
        self.inner.release(rows)

    def sequence_start(self, prompt):
        return self.inner.sequence_start(prompt)

# Chat templates as their models ship them: Qwen2's ChatML (with a default system prompt) and
# Llama 3 Instruct (trims the content, writes bos_token itself).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
