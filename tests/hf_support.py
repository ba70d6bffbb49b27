"""Tiny Hugging Face model folders for the import tests, built with `transformers` from a
config (random weights, nothing downloaded) and saved with save_pretrained, with a small
byte-level BPE tokenizer trained here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the Hugging Face import tests need transformers")
torch = pytest.importorskip("torch")

TEXTS = [f"{a} {b} {c}." for a in ("one", "two", "three", "four", "five", "six", "seven", "eight")
         for b in ("red", "green", "blue", "cafe", "naive", "hello") for c in ("cat", "dog", "sun", "sea")]


@lru_cache(maxsize=None)
def _bpe(vocab_size: int, specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS, trainer)
    return tokenizer.to_str()


def hf_tokenizer(vocab_size: int = 300, *, bos: str | None = "<s>", eos: str = "</s>", pad: str | None = "<pad>",
                 unk: str | None = None, add_bos: bool = True, **extra):
    """A PreTrainedTokenizerFast over a byte-level BPE trained on TEXTS (< vocab_size tokens)."""
    from tokenizers import Tokenizer, processors

    specials = tuple(t for t in (pad, bos, eos, unk) if t)
    tokenizer = Tokenizer.from_str(_bpe(vocab_size, specials))
    if bos and add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                                pad_token=pad, unk_token=unk, **extra)
    return fast


def save_hf(model, tokenizer, directory: Path) -> Path:
    """save_pretrained of both into `directory` (safetensors), returned."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]
