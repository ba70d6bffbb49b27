"""Tiny Hugging Face model folders for the import tests, built with `transformers` from a
config (random weights, nothing downloaded) and saved with save_pretrained, with a small
byte-level BPE tokenizer trained here."""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from support import NODE_DIR

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


NODE_GENERATE = """
import { load } from '%s';
const [packageDir, prompts, n] = [process.argv[1], JSON.parse(process.argv[2]), Number(process.argv[3])];
const model = await load(packageDir, { threads: 1 });
const options = { max_new_tokens: n, min_new_tokens: n };
const one = await model.generateIds(prompts.slice(0, 1), options);
const all = await model.generateIds(prompts, options);
console.log(JSON.stringify([one.map((g) => g.token_ids[0]), all.map((g) => g.token_ids[0])]));
await model.release();
"""


def node_generate(package: Path, prompts: list[list[int]], new_tokens: int) -> tuple[list, list]:
    """Greedy ids through the Node runtime, exactly `new_tokens` each: (the first prompt alone,
    all prompts in one batch)."""
    script = NODE_GENERATE % (NODE_DIR / "model.js").as_posix()
    out = subprocess.run(["node", "--input-type=module", "-e", script, str(package), json.dumps(prompts),
                          str(new_tokens)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    one, batch = json.loads(out.stdout)
    return one, batch
