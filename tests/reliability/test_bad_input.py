"""Bad input to the runtime's API and CLI: each gives the project's own error with its code
(runtime/errors.py CODES), a message that names the problem, raised by onnxformer's code (never
a trace from inside onnxruntime, the tokenizer or numpy), and the model keeps working afterwards.
The CLI prints `error[CODE]: message` and exits 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime
import pytest

pytest.importorskip("torch", reason="the packages are exported on the spot")

import onnxformer.runtime as rt  # noqa: E402
from onnxformer.runtime import ConfigError, InputError, PackageError, ProviderError  # noqa: E402
from reliability_support import raised_by_us, run_cli  # noqa: E402

LONG = "one two three " * 200
NO_CUDA = "CUDAExecutionProvider" not in onnxruntime.get_available_providers()

# (case id, package, call, error type, message pattern)
CASES = [
    # empty and non-string input
    ("empty prompt list", "decoder", lambda m: m.generate([]), InputError, "the list is empty"),
    ("empty prompt", "decoder", lambda m: m.generate(""), InputError, r"\[0\] is empty"),
    ("empty text list (classify)", "encoder", lambda m: m.classify([]), InputError, "the list is empty"),
    ("empty text list (embed)", "encoder", lambda m: m.embed([]), InputError, "the list is empty"),
    ("empty second text", "encoder", lambda m: m.classify(["ok", ""]), InputError, r"texts\[1\] is empty"),
    ("prompt is None", "decoder", lambda m: m.generate(None), InputError, "must be a string or a list of strings"),
    ("prompt is an int", "decoder", lambda m: m.generate(5),
     InputError, "must be a string or a list of strings; got int"),
    ("prompt is bytes", "decoder", lambda m: m.generate(b"the cat"), InputError, "got bytes"),
    ("text list holds an int", "encoder", lambda m: m.classify(["ok", 3]),
     InputError, r"texts\[1\] must be a string; got int"),
    ("lone surrogate in text", "decoder", lambda m: m.generate("caf\udce9"), InputError, "not valid Unicode"),
    ("stream of a list", "decoder", lambda m: m.stream(["a", "b"]), InputError, "takes one prompt string"),
    ("encode of ints", "decoder", lambda m: m.encode([1, 2]), InputError, r"\[0\] must be a string; got int"),
    # length
    ("prompt over max length", "decoder", lambda m: m.generate(LONG, max_new_tokens=4), InputError,
     "tokens; this model takes at most .*pass truncate=True"),
    ("text over max length", "encoder", lambda m: m.classify(LONG), InputError, "this model takes at most"),
    ("source over max length", "encoder-decoder", lambda m: m.generate(LONG), InputError, "this model takes at most"),
    ("max_new_tokens >= max_seq_len", "decoder", lambda m: m.generate("x", max_new_tokens=96), InputError,
     r"max_new_tokens \(96\) must be below this model's max_seq_len \(96\)"),
    ("ids + max_new_tokens too long", "decoder",
     lambda m: m.generate_ids([[5] * 90], rt.GenerationConfig(max_new_tokens=10)), InputError,
     r"prompt of 90 tokens \+ max_new_tokens 10 exceeds this model's max_seq_len \(96\)"),
    # token ids passed directly
    ("token id >= vocab", "decoder", lambda m: m.generate_ids([[1, 10**6]]),
     InputError, "token id 1000000 is out of range"),
    ("token id 2**70", "decoder", lambda m: m.generate_ids([[2**70]]), InputError, "out of range"),
    ("negative token id", "decoder", lambda m: m.generate_ids([[5, -1]]), InputError, r"negative token id \(-1\)"),
    ("float token id", "decoder", lambda m: m.generate_ids([[5, 1.5]]), InputError, "1.5, which is not a token id"),
    ("NaN token id", "decoder", lambda m: m.generate_ids([[float("nan")]]), InputError, "not a token id"),
    ("string token id", "decoder", lambda m: m.generate_ids([["a"]]), InputError, "'a', which is not a token id"),
    ("bool token id", "decoder", lambda m: m.generate_ids([[True]]), InputError, "not a token id"),
    ("nested token ids", "decoder", lambda m: m.generate_ids([[[1]]]), InputError, "not a token id"),
    ("flat id list", "decoder", lambda m: m.generate_ids([1, 2]), InputError, "prompt 0 must be a list of token ids"),
    ("text instead of ids", "decoder", lambda m: m.generate_ids(["the cat"]), InputError, "Tokenize it first"),
    ("ids is None", "decoder", lambda m: m.generate_ids(None), InputError, "non-empty list of token id lists"),
    ("no prompts", "decoder", lambda m: m.generate_ids([]), InputError, "non-empty list"),
    ("empty id list", "decoder", lambda m: m.generate_ids([[]]), InputError, "prompt 0 is empty"),
    ("too long for source", "encoder-decoder", lambda m: m.generate_ids([[5] * 200]),
     InputError, "exceeds this model's max_seq_len"),
    ("decode negative id", "decoder", lambda m: m.decode([-1]), InputError, "-1 is not a token id of this model"),
    ("decode id >= vocab", "decoder", lambda m: m.decode([10**9]), InputError, "is not a token id of this model"),
    ("decode text", "decoder", lambda m: m.decode("abc"), InputError, "takes a list of token ids; got str"),
    # generation parameters
    ("temperature 0 with sampling", "decoder", lambda m: m.generate("x", strategy="sample", temperature=0), ConfigError,
     "temperature must be > 0 for strategy 'sample'"),
    ("temperature -1 with sampling", "decoder", lambda m: m.generate("x", strategy="sample", temperature=-1.0), ConfigError,
     "temperature must be > 0"),
    ("temperature NaN", "decoder", lambda m: m.generate("x", strategy="sample", temperature=float("nan")), ConfigError,
     "temperature must be finite"),
    ("temperature a string", "decoder", lambda m: m.generate("x", strategy="sample", temperature="hot"), ConfigError,
     "temperature must be a number"),
    ("top_p 0", "decoder", lambda m: m.generate("x", strategy="sample", top_p=0.0),
     ConfigError, r"top_p must be in \(0, 1\]"),
    ("top_p 1.5", "decoder", lambda m: m.generate("x", strategy="sample", top_p=1.5),
     ConfigError, r"top_p must be in \(0, 1\]; got 1.5"),
    ("top_p -0.1", "decoder", lambda m: m.generate("x", top_p=-0.1), ConfigError, r"top_p must be in \(0, 1\]"),
    ("top_k -1", "decoder", lambda m: m.generate("x", strategy="sample", top_k=-1),
     ConfigError, "top_k must be an integer >= 0; got -1"),
    ("top_k 2.5", "decoder", lambda m: m.generate("x", strategy="sample", top_k=2.5),
     ConfigError, "top_k must be an integer"),
    ("num_beams 0", "decoder", lambda m: m.generate("x", strategy="beam", num_beams=0),
     ConfigError, "num_beams must be an integer >= 1; got 0"),
    ("num_beams 10**30", "decoder", lambda m: m.generate("x", strategy="beam", num_beams=10**30), ConfigError,
     r"num_beams \(10+\) must be <= the vocabulary size"),
    ("2**63 samples per prompt", "decoder", lambda m: m.generate("x", strategy="sample", num_return_sequences=2**63),
     ConfigError, "beams or sequences per prompt is more than 4096"),
    ("num_beams without beam", "decoder", lambda m: m.generate("x", num_beams=3),
     ConfigError, "needs strategy 'beam'"),
    ("max_new_tokens -1", "decoder", lambda m: m.generate("x", max_new_tokens=-1),
     ConfigError, "max_new_tokens must be an integer >= 0; got -1"),
    ("max_new_tokens a string", "decoder", lambda m: m.generate("x", max_new_tokens="8"),
     ConfigError, "max_new_tokens must be an integer"),
    ("min_new_tokens > max", "decoder", lambda m: m.generate("x", max_new_tokens=2, min_new_tokens=5), ConfigError,
     r"min_new_tokens \(5\) must be <= max_new_tokens \(2\)"),
    ("repetition_penalty 0", "decoder", lambda m: m.generate("x", repetition_penalty=0.0),
     ConfigError, "repetition_penalty must be > 0"),
    ("no_repeat_ngram_size -2", "decoder", lambda m: m.generate("x", no_repeat_ngram_size=-2),
     ConfigError, "no_repeat_ngram_size must be"),
    ("2 sequences from greedy", "decoder", lambda m: m.generate("x", num_return_sequences=2), ConfigError,
     "num_return_sequences must be 1 for strategy 'greedy'"),
    ("more sequences than beams", "decoder", lambda m: m.generate("x", strategy="beam", num_beams=2, num_return_sequences=3),
     ConfigError, r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    ("eos id >= vocab", "decoder", lambda m: m.generate("x", eos_token_ids=(10**6,)),
     ConfigError, r"eos_token_ids \[1000000\] out of range"),
    ("negative eos id", "decoder", lambda m: m.generate("x", eos_token_ids=(-3,)),
     ConfigError, r"eos_token_ids must be a token id >= 0 or a tuple of them \(empty = none\); got \(-3,\)"),
    ("pad id >= vocab", "decoder", lambda m: m.generate("x", pad_token_id=10**6),
     ConfigError, r"pad_token_id \[1000000\] out of range"),
    ("unknown strategy", "decoder", lambda m: m.generate("x", strategy="nucleus"),
     ConfigError, "strategy must be one of"),
    ("misspelt parameter", "decoder", lambda m: m.generate("x", topk=3), ConfigError, "did you mean 'top_k'"),
    ("stop strings with beam", "decoder", lambda m: m.generate("x", strategy="beam", num_beams=2, stop_strings=("a",)),
     ConfigError, "stop_strings .* not supported with strategy 'beam'"),
    ("empty stop string", "decoder", lambda m: m.generate("x", stop_strings=("",)), ConfigError, "non-empty strings"),
    ("config is a dict", "decoder", lambda m: m.generate("x", {"max_new_tokens": 3}), ConfigError,
     "config must be a GenerationConfig or None; got dict"),
    ("config is a dict (ids)", "decoder", lambda m: m.generate_ids([[5]], {"max_new_tokens": 3}), ConfigError,
     "config must be a GenerationConfig"),
    ("rng is a string", "decoder", lambda m: m.generate("x", strategy="sample", rng="seed"), ConfigError,
     "rng must be a numpy.random.Generator"),
    ("config from a list", "decoder", lambda m: rt.GenerationConfig.from_dict([1, 2]),
     ConfigError, "must be a mapping"),
    ("config with int key", "decoder", lambda m: rt.GenerationConfig.from_dict({1: 2}),
     ConfigError, "unknown generation parameter"),
    ("beam stream", "decoder", lambda m: list(m.stream("x", strategy="beam", num_beams=2)),
     ConfigError, "stream\\(\\) supports"),
    # encoder options
    ("batch_size 0", "encoder", lambda m: m.classify(["a"], batch_size=0),
     InputError, "batch_size must be an integer >= 1; got 0"),
    ("batch_size -1", "encoder", lambda m: m.embed(["a"], batch_size=-1),
     InputError, "batch_size must be an integer >= 1"),
    ("batch_size a string", "encoder", lambda m: m.classify(["a"], batch_size="2"),
     InputError, "batch_size must be an integer"),
    ("unknown pooling", "encoder", lambda m: m.embed(["a"], pooling="max"),
     InputError, "pooling must be 'mean' or 'cls'; got 'max'"),
    # the wrong package kind for the call
    ("classify on a decoder", "decoder", lambda m: m.classify(["x"]),
     InputError, r"classify\(\) needs an encoder package"),
    ("embed on a decoder", "decoder", lambda m: m.embed(["x"]),
     InputError, r"embed\(\) needs a package with an encoder"),
    ("generate on an encoder", "encoder", lambda m: m.generate("x"),
     InputError, r"generate\(\) needs a decoder-only"),
    ("generate_ids on an encoder", "encoder", lambda m: m.generate_ids([[5]]), InputError, r"generate\(\) needs"),
    ("stream on an encoder", "encoder", lambda m: m.stream("x"), InputError, r"stream\(\) needs"),
    ("classify on a seq2seq model", "encoder-decoder", lambda m: m.classify(["x"]),
     InputError, r"classify\(\) needs"),
]

# The code of each case whose code is finer than its class's default (E_INPUT, E_CONFIG, ...).
FINER_CODES = {
    **dict.fromkeys(["prompt over max length", "text over max length", "source over max length",
                     "max_new_tokens >= max_seq_len", "ids + max_new_tokens too long", "too long for source"],
                    "E_TOO_LONG"),
    **dict.fromkeys(["token id >= vocab", "token id 2**70", "negative token id", "float token id", "NaN token id",
                     "string token id", "bool token id", "nested token ids", "decode negative id",
                     "decode id >= vocab"], "E_TOKEN_ID"),
    **dict.fromkeys(["misspelt parameter", "config with int key"], "E_UNKNOWN_PARAMETER"),
    **dict.fromkeys(["classify on a decoder", "embed on a decoder", "generate on an encoder",
                     "generate_ids on an encoder", "stream on an encoder", "classify on a seq2seq model"],
                    "E_WRONG_KIND"),
}


# --- load and providers ----------------------------------------------------------------------

# (case id, call, error type, code, message pattern)
LOAD_CASES = [
    ("provider not known", lambda p: rt.load(p, provider="tpu"),
     ProviderError, "E_PROVIDER", "provider must be one of cpu, cuda; got 'tpu'"),
    ("provider not a string", lambda p: rt.load(p, provider=3), ProviderError, "E_PROVIDER", "provider must be one of"),
    ("threads -1", lambda p: rt.load(p, threads=-1),
     InputError, "E_INPUT", r"threads must be None .* or an integer in \[0, 1024\]; got -1"),
    ("threads a string", lambda p: rt.load(p, threads="2"), InputError, "E_INPUT", "threads must be"),
    ("package path None", lambda p: rt.load(None), PackageError, "E_PACKAGE", "package_dir must be a path"),
    ("package path a file", lambda p: rt.load(p / "manifest.json"),
     PackageError, "E_MISSING_FILE", "does not exist or is not a directory"),
    ("package path missing", lambda p: rt.load(p / "nope"),
     PackageError, "E_MISSING_FILE", "does not exist or is not a directory"),
    ("not a package", lambda p: rt.load(p.parent), PackageError, "E_MANIFEST", "manifest.json' is missing"),
]
if NO_CUDA:
    LOAD_CASES.append(("provider not installed", lambda p: rt.load(p, provider="cuda"), ProviderError, "E_PROVIDER",
                       "'cuda' .* is not available in this onnxruntime build .*install the onnxruntime-gpu wheel"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_runtime_input_gets_a_clear_error_of_our_own(models, case):
    name, package, call, error, pattern = case
    with pytest.raises(error, match=pattern) as excinfo:
        call(models[package])
    assert isinstance(excinfo.value, rt.OnnxformerError)
    assert excinfo.value.code == FINER_CODES.get(name, error.default_code)
    assert raised_by_us(excinfo), f"raised from {excinfo.traceback[-1].path}"
    assert excinfo.value.__cause__ is None


def test_models_still_work_after_every_bad_call(models, package_paths, figures):
    decoder, encoder = models["decoder"], models["encoder"]
    before = decoder.generate("the cat sat", max_new_tokens=6)[0].token_ids, encoder.classify("the cat")[0]
    for _, package, call, error, _ in CASES:
        with pytest.raises(error):
            call(models[package])
    for _, call, error, _, _ in LOAD_CASES:
        with pytest.raises(error):
            call(package_paths["decoder"])
    after = decoder.generate("the cat sat", max_new_tokens=6)[0].token_ids, encoder.classify("the cat")[0]
    assert after == before
    n = len(CASES) + len(LOAD_CASES)
    figures.record("bad input", "runtime API: empty, non-string, over-long and out-of-range inputs (texts and token "
                   "ids), generation parameters out of range, wrong package kind; load() with an unknown or "
                   "uninstalled provider, bad thread counts, paths that are not packages", n,
                   f"{n} InputError/ConfigError/ProviderError/PackageError naming the problem, raised by onnxformer "
                   "code (0 from onnxruntime, tokenizers or numpy); the loaded models' results unchanged afterwards")


def test_edge_inputs_that_are_valid_give_results(models):
    decoder, encoder, seq2seq = models["decoder"], models["encoder"], models["encoder-decoder"]
    assert decoder.generate("x", max_new_tokens=0)[0].token_ids == [[]]
    assert decoder.generate("   \t ", max_new_tokens=2)[0].token_ids  # whitespace is text
    assert decoder.generate("\x00", max_new_tokens=2)[0].token_ids
    assert decoder.generate(LONG, max_new_tokens=4, truncate=True)[0].token_ids
    assert decoder.generate_ids(np.array([[5, 6, 7]]), rt.GenerationConfig(max_new_tokens=2))[0].token_ids
    assert decoder.decode([]) == ""
    assert seq2seq.generate(LONG, max_new_tokens=2, truncate=True)[0].token_ids
    assert len(encoder.classify(["a"] * 5, batch_size=2)) == 5


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_bad_load_arguments(package_paths, case):
    _, call, error, code, pattern = case
    with pytest.raises(error, match=pattern) as excinfo:
        call(package_paths["decoder"])
    assert raised_by_us(excinfo)
    assert excinfo.value.code == code


# --- the CLI: exit status 2, `error[CODE]: ...`, no traceback --------------------------------

# (case id, argv, stdin, code, message pattern)
CLI_CASES = [
    ("top-p 2", ["generate", "{decoder}", "x", "--strategy", "sample", "--top-p", "2"], None, "E_CONFIG",
     r"top_p must be in \(0, 1\]"),
    ("temperature 0", ["generate", "{decoder}", "x", "--strategy", "sample", "--temperature", "0"], None, "E_CONFIG",
     "temperature must be > 0"),
    ("num-beams 0", ["generate", "{decoder}", "x", "--num-beams", "0"], None, "E_CONFIG",
     "num_beams must be an integer >= 1"),
    ("max-new-tokens -1", ["generate", "{decoder}", "x", "--max-new-tokens", "-1"], None, "E_CONFIG",
     "max_new_tokens must be"),
    ("top-k -1", ["generate", "{decoder}", "x", "--strategy", "sample", "--top-k", "-1"], None, "E_CONFIG",
     "top_k must be"),
    ("threads -3", ["generate", "{decoder}", "x", "--threads", "-3"], None, "E_INPUT", "threads must be"),
    ("empty prompt", ["generate", "{decoder}", ""], None, "E_INPUT", "is empty"),
    ("prompt too long", ["generate", "{decoder}", LONG, "--max-new-tokens", "4"], None, "E_TOO_LONG",
     "this model takes at most"),
    ("stream two prompts", ["generate", "{decoder}", "a", "b", "--stream"], None, "E_INPUT", "--stream takes one prompt"),
    ("classify a decoder", ["classify", "{decoder}", "x"], None, "E_WRONG_KIND", "needs an encoder package"),
    ("generate an encoder", ["generate", "{encoder}", "x"], None, "E_WRONG_KIND", "needs a decoder-only"),
    ("embed a decoder", ["embed", "{decoder}", "x"], None, "E_WRONG_KIND", "needs a package with an encoder"),
    ("no such package", ["generate", "{decoder}/nope", "x"], None, "E_MISSING_FILE",
     "does not exist or is not a directory"),
    ("inspect a file", ["inspect", "{decoder}/manifest.json"], None, "E_MISSING_FILE",
     "does not exist or is not a directory"),
    ("inspect a non-package", ["inspect", "{decoder}/.."], None, "E_MANIFEST", "is not an onnxformer package"),
    ("empty stdin", ["classify", "{encoder}"], "", "E_INPUT", "stdin had no non-empty lines"),
    ("non-UTF-8 stdin", ["classify", "{encoder}"], b"caf\xe9\n\xff\xfe\n", "E_INPUT", "stdin is not valid UTF-8"),
    ("export a missing checkpoint", ["export", "{decoder}/no-checkpoint", "{decoder}/../out"], None, "E_MISSING_FILE",
     "no-checkpoint does not exist; pass the --out folder"),
    ("export a package", ["export", "{decoder}", "{decoder}/../out"], None, "E_CHECKPOINT",
     "is neither a checkpoint folder"),
]
if NO_CUDA:
    CLI_CASES.append(("cuda not installed", ["classify", "{encoder}", "x", "--provider", "cuda"], None, "E_PROVIDER",
                      "is not available"))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_a_one_line_error(package_paths, case):
    _, argv, stdin, code, pattern = case
    argv = [a.format(**{k: str(v) for k, v in package_paths.items() if k != "encoder-decoder"}) for a in argv]
    result = run_cli(argv, stdin)
    assert result.rc == 2, result
    assert result.err.startswith(f"error[{code}]: ") and "Traceback" not in result.err, result
    assert __import__("re").search(pattern, result.err), result


def test_cli_in_a_real_process_exits_2_without_traceback(package_paths, figures):
    """The same, through `python -m onnxformer.runtime.cli` (bad parameter; a missing checkpoint)."""
    runs = [
        [sys.executable, "-m", "onnxformer.runtime.cli", "generate", str(package_paths["decoder"]), "x", "--top-p", "0"],
        [sys.executable, "-m", "onnxformer.runtime.cli", "export", str(package_paths["decoder"] / "missing"),
         str(package_paths["decoder"].parent / "never-written")],
    ]
    for argv in runs:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error[E_") and "Traceback" not in proc.stderr, proc.stderr
    assert not (package_paths["decoder"].parent / "never-written").exists()
    figures.record("bad input", "CLI: bad options, empty/non-UTF-8 stdin, wrong package kind, missing package or "
                   "checkpoint (in-process, plus 2 real processes)", len(CLI_CASES) + len(runs),
                   f"{len(CLI_CASES) + len(runs)} exit status 2 with a one-line `error[CODE]: ...`, 0 tracebacks")
