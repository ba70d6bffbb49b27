"""The benchmark cases: our models with random weights, their packages, and the inputs.

Main environment only (torch + onnxformer). Everything a peer process needs is written to
the case directory as plain files, so the peers never import onnxformer:

    WORK/<case>/case.json        shapes, ModelConfig, prompts / inputs, settings
    WORK/<case>/model.pt         our state dict (torch.save)
    WORK/<case>/reference.npz    inputs and our PyTorch logits (hf_convert checks against them)
    WORK/<case>/tokenizer.json   the tokenizer the package carries
    WORK/<case>/pkg-<variant>/   onnxformer packages, one per VARIANTS entry
    WORK/<case>/...              peer exports (hf-*, optimum-*, genai-*), made by the peers

Weights: the default init (normal, std 0.02) with a fixed seed; then the output projection is
scaled to std 1.0 so greedy choices have wide margins (fp32 accumulation order cannot flip
them), and the eos row of the output projection is zeroed (logit exactly 0, never the
argmax), so every engine generates exactly the requested number of tokens.

Packages are rebuilt when the case, a variant's export options, or the source of
modeling/model.py, export/ or runtime/contract.py change (a key file beside each package).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Settings, log, write_json

SEED = 1234
# The output projections (lm_head, classifier) are scaled by this after the std-0.02 init,
# so logits are LOGIT_SCALE times larger than usual; tolerances on logits scale with them
# (our export validates with atol 1e-4 * LOGIT_SCALE, i.e. 1e-4 on the unscaled head).
LOGIT_SCALE = 50.0
LOGIT_ATOL = 1e-4 * LOGIT_SCALE
REFERENCE_FORMAT = "2"  # bump when _reference() changes what reference.npz holds
PAD, BOS, EOS = 0, 1, 2  # byte-level BPE specials (modeling/tokenizer.py)
FIRST_FREE_ID = 5  # prompts use ids >= this (no special tokens)

# Shapes of the reference figures.
DECODER = dict(
    arch="decoder", vocab_size=8000, d_model=512, n_heads=8, n_layers=8, d_ff=1376, max_seq_len=256,
    pos_encoding="rope", rope_theta=10000.0, activation="swiglu", norm="rmsnorm", norm_eps=1e-5,
    bias=False, tie_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)  # LLaMA-style, 33.5M parameters
ENCODER_DECODER = dict(
    arch="encoder-decoder", vocab_size=8000, d_model=512, n_heads=8, n_layers=4, n_decoder_layers=4,
    d_ff=2048, max_seq_len=256, pos_encoding="learned", activation="gelu", norm="layernorm",
    norm_position="post", norm_eps=1e-5, bias=True, tie_embeddings=True, pad_token_id=PAD,
    bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
)  # BART-style (post-norm, learned positions, tied embeddings), 33.6M parameters
CLASSIFIER = dict(
    arch="encoder", vocab_size=8000, d_model=384, n_heads=12, n_layers=6, d_ff=1536, max_seq_len=512,
    pos_encoding="learned", activation="gelu", norm="layernorm", norm_position="post", norm_eps=1e-12,
    bias=True, tie_embeddings=True, type_vocab_size=2, num_labels=2, pad_token_id=0,
    label_names=("negative", "positive"),
)  # BERT-style (MiniLM-sized)
TINY = dict(vocab_size=512, d_model=64, n_heads=4, n_layers=2, d_ff=128)


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    workload: dict[str, Any]  # prompt lengths, batches, ...
    # Our export variants: name -> ExportOptions keyword arguments. Add an entry to add a
    # variant (bench_*.py turn every entry into an engine, see our_engines()).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


CASES = {
    "decoder": Case(
        "decoder", DECODER, {"prompt_len": 32, "batches": [1, 8], "floor_past": 100},
        {"fp32": {}, "concat": {"kv_cache": "concat"}, "int8": {"quantize": "int8"},
         "int4": {"quantize": "int4"}},
    ),
    "encoder-decoder": Case(
        "encoder-decoder", ENCODER_DECODER, {"source_len": 64, "batches": [1]},
        {"fp32": {}, "concat": {"kv_cache": "concat"}, "int8": {"quantize": "int8"}},
    ),
    "classifier": Case(
        "classifier", CLASSIFIER, {"seq_len": 128, "batch": 32},
        {"fp32": {}, "int8": {"quantize": "int8"}, "int8-dynamic": {"quantize": "int8-dynamic"}},
    ),
}


def variant_precision(options: dict[str, Any]) -> str:
    """"fp32", "fp16", "int8", "int4": what a variant's weights are (the genai or optimum column it
    meets; "int8-dynamic" is "int8", as Optimum's dynamic int8)."""
    if options.get("quantize"):
        return options["quantize"].removesuffix("-dynamic")
    return "fp16" if options.get("dtype") == "float16" else "fp32"


def case_config(case: Case, tiny: bool) -> dict[str, Any]:
    config = dict(case.config)
    if tiny:
        config.update(TINY)
    return config


# --------------------------------------------------------------------------------------------
# Tokenizers (only the packages need them; prompts are token ids)
# --------------------------------------------------------------------------------------------


def _words(n: int, rng: random.Random) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def _corpus(rng: random.Random) -> tuple[list[str], list[str]]:
    words = _words(300, rng)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    return words, texts


def _classifier_texts(tokenizer, words: list[str], n: int, length: int, rng: random.Random) -> list[str]:
    """n texts that tokenize to exactly `length` tokens ([CLS] ... [SEP] included)."""
    size = lambda chosen: len(tokenizer.encode(" ".join(chosen)).ids)  # noqa: E731
    texts = []
    for _ in range(n):
        chosen: list[str] = []
        for _ in range(100 * length):
            if size(chosen) == length:
                break
            word = rng.choice(words)
            if size(chosen + [word]) <= length:
                chosen.append(word)
        else:
            raise RuntimeError(f"could not build a text of exactly {length} tokens")
        texts.append(" ".join(chosen))
    return texts


# --------------------------------------------------------------------------------------------
# Models, packages, inputs
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """Of the code that shapes a package; computed once per process, so one run of the suite
    uses one set of packages even while the source is being edited."""
    digest = hashlib.sha256()
    paths = [REPO / "modeling" / "model.py", REPO / "runtime" / "contract.py", *sorted((REPO / "export").glob("*.py"))]
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_model(config: dict[str, Any]):
    """Our Transformer with the suite's deterministic random weights."""
    import torch

    from onnxformer.modeling.config import ModelConfig
    from onnxformer.modeling.model import Transformer

    torch.manual_seed(SEED)
    model = Transformer(ModelConfig(**config)).eval()
    with torch.no_grad():
        if model.config.has_decoder:
            model.lm_head.weight.mul_(LOGIT_SCALE)  # std 0.02 -> 1.0: wide greedy margins
            model.lm_head.weight[EOS] = 0.0  # eos logit 0: never the argmax
        if model.config.num_labels:
            model.classifier.weight.mul_(LOGIT_SCALE)
    return model


def _reference(model, case: Case, rng) -> dict[str, Any]:
    """Inputs and our logits for the conversion check (no padding: every HF model agrees)."""
    import torch

    c = model.config
    high = c.vocab_size
    out: dict[str, Any] = {}
    with torch.no_grad():
        if c.arch == "decoder":
            ids = torch.from_numpy(rng.integers(FIRST_FREE_ID, high, size=(2, 16)))
            out = model.decode(ids)
            out = {"input_ids": ids, "logits": out.logits, "hidden": out.hidden}
        elif c.arch == "encoder-decoder":
            src = torch.from_numpy(rng.integers(FIRST_FREE_ID, high, size=(2, 12)))
            tgt = torch.from_numpy(rng.integers(FIRST_FREE_ID, high, size=(2, 10)))
            tgt[:, 0] = c.start_token_id
            hidden = model.encode(src)
            logits = model.decode(tgt, cross_kv=model.cross_kv(hidden)).logits
            out = {"input_ids": src, "decoder_input_ids": tgt, "logits": logits, "encoder_hidden": hidden}
        else:
            ids = torch.from_numpy(rng.integers(FIRST_FREE_ID, high, size=(2, 16)))
            types = torch.zeros_like(ids)
            types[:, 9:] = 1
            hidden = model.encode(ids, token_type_ids=types)
            out = {"input_ids": ids, "token_type_ids": types, "hidden": hidden, "logits": model.classify(hidden)}
    return {k: v.numpy() for k, v in out.items()}


def _workload(case: Case, config: dict[str, Any], tokenizer, words, rng_py, rng) -> dict[str, Any]:
    w = dict(case.workload)
    high = config["vocab_size"]
    if case.name == "decoder":
        largest = max(w["batches"])
        prompts = rng.integers(FIRST_FREE_ID, high, size=(largest, w["prompt_len"]))
        prompts[:, 0] = BOS
        w["prompts"] = prompts.tolist()
    elif case.name == "encoder-decoder":
        sources = rng.integers(FIRST_FREE_ID, high, size=(max(w["batches"]), w["source_len"]))
        sources[:, -1] = EOS  # a source ends with </s> (the tokenizer's template)
        w["sources"] = sources.tolist()
    else:
        texts = _classifier_texts(tokenizer, words, w["batch"], w["seq_len"], rng_py)
        encodings = tokenizer.encode_batch(texts)
        w["texts"] = texts
        w["input_ids"] = [e.ids for e in encodings]
        w["token_type_ids"] = [e.type_ids for e in encodings]
    return w


def prepare(name: str, work: Path, settings: Settings, *, tiny: bool = False, rebuild: bool = False,
            variants: tuple[str, ...] | None = None) -> Path:
    """Make WORK/<case> ready for every engine (our packages: `variants`, default all); returns its path."""
    import numpy as np
    import torch

    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

    case = CASES[name]
    config = case_config(case, tiny)
    case_dir = work / (name + ("-tiny" if tiny else ""))
    case_dir.mkdir(parents=True, exist_ok=True)
    rng_py = random.Random(SEED)
    words, texts = _corpus(rng_py)
    arch = config["arch"]
    tokenizer = train_tokenizer(texts, arch=arch, vocab_size=min(600 if arch == "encoder" else 400, config["vocab_size"]))
    special = special_token_ids(tokenizer)
    assert special["pad"] == PAD and (arch == "encoder" or (special["bos"], special["eos"]) == (BOS, EOS)), special
    save_tokenizer(tokenizer, case_dir / "tokenizer.json")

    model = build_model(config)
    rng = np.random.default_rng(SEED)
    workload = _workload(case, config, tokenizer, words, rng_py, rng)
    # The key covers the weights themselves: a change of the modeling code's init order changes
    # them for the same seed, and then everything downstream (packages, HF dirs) is rebuilt.
    model_key = hashlib.sha256(json.dumps([config, SEED, _weights_hash(model)], sort_keys=True).encode())
    model_key = model_key.hexdigest()[:16]
    fresh = (case_dir / "model.pt").is_file() and _read_key(case_dir / "reference.key") == REFERENCE_FORMAT
    if rebuild or not fresh or _read_key(case_dir / "model.key") != model_key:
        torch.save(model.state_dict(), case_dir / "model.pt")
        np.savez(case_dir / "reference.npz", **_reference(model, case, np.random.default_rng(SEED + 1)))
        (case_dir / "model.key").write_text(model_key)
        (case_dir / "reference.key").write_text(REFERENCE_FORMAT)

    packages, errors = {}, {}
    for variant, options in case.variants.items():
        if variants is not None and variant not in variants:
            continue
        pkg = case_dir / f"pkg-{variant}"
        tokenizer_hash = hashlib.sha256((case_dir / "tokenizer.json").read_bytes()).hexdigest()
        key = hashlib.sha256(json.dumps([model_key, options, _source_hash(), tokenizer_hash], sort_keys=True).encode())
        key = key.hexdigest()[:16]
        key_file = case_dir / f"pkg-{variant}.key"
        if rebuild or not (pkg / "manifest.json").is_file() or _read_key(key_file) != key:
            log(f"exporting {case_dir.name} {variant} with onnxformer")
            key_file.unlink(missing_ok=True)
            try:
                report = export_model(model, case_dir / "tokenizer.json", pkg,
                                      ExportOptions(**{"atol": LOGIT_ATOL, **options}))
            except Exception as err:  # an option this version of export lacks, a failed validation
                log(f"  {variant}: export failed: {type(err).__name__}: {str(err)[:300]}")
                errors[variant] = f"{type(err).__name__}: {err}"
                continue
            key_file.write_text(key)
            log(f"  validation passed: {all(v.get('passed') for v in report.validation.values())}")
        packages[variant] = pkg.name

    write_json(case_dir / "case.json", {
        "case": name,
        "tiny": tiny,
        "config": config,
        "num_parameters": model.num_parameters(),
        "special": {"pad": PAD, "bos": BOS, "eos": EOS},
        "logit_scale": LOGIT_SCALE,
        "workload": workload,
        "settings": settings.to_dict(),
        "packages": packages,
        "package_errors": errors,
    })
    return case_dir


def _weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_key(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def load_state_dict(case_dir: Path):
    """(our Transformer, case.json) rebuilt from the case directory."""
    import torch

    case = json.loads((case_dir / "case.json").read_text())
    model = build_model(case["config"])
    model.load_state_dict(torch.load(case_dir / "model.pt", weights_only=True))
    return model.eval(), case
