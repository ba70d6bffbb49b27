"""Every error message that suggests a fix is checked here: the test triggers the error, finds
the fix in the message exactly as the user would read it, applies it literally and sees the
call succeed. The Python API and the `onnxformer` CLI each get the spelling of their surface
(messages name both: ``truncate=True (--truncate)``, runtime/generation.py's ``option``).
Node's messages have the same checks in runtime/node/test/advice.test.js.

The raise sites with advice were enumerated by grepping runtime/ for 'pass ', 'use ', 'lower ',
'raise ', 'shorten', '--' and 're-export'. Two are not applied here: onnxruntime running out of
memory (``RunError``: "pass a smaller batch_size, num_beams or max_new_tokens") cannot be caused
on purpose in a test, and "reinstall onnxformer" (an install without entry points).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from reliability_support import fails_with_advice, run_cli

import onnxformer.runtime as rt
from onnxformer.runtime import generation as gen
from onnxformer.runtime.errors import OnnxformerError

LONG = "one two three four five six seven eight nine ten " * 30  # far beyond max_seq_len (96)


# --- the Python API -------------------------------------------------------------------------
# (name, package, the call's kwargs that fail, [(the fix as the message spells it, kwargs that work)])
GENERATE_CASES = [
    ("top_p out of range", "decoder", dict(strategy="sample", top_p=1.5, seed=0),
     [("top_p=1.0", dict(top_p=1.0))]),
    ("repetition_penalty <= 0", "decoder", dict(repetition_penalty=0.0),
     [("repetition_penalty=1.0", dict(repetition_penalty=1.0))]),
    ("min_new_tokens > max_new_tokens", "decoder", dict(min_new_tokens=5, max_new_tokens=2),
     [("min_new_tokens=2", dict(min_new_tokens=2)), ("max_new_tokens=5", dict(max_new_tokens=5))]),
    ("temperature 0 with sample", "decoder", dict(strategy="sample", temperature=0.0),
     [("temperature=1.0", dict(temperature=1.0)), ("strategy='greedy'", dict(strategy="greedy"))]),
    ("num_beams without beam", "decoder", dict(strategy="sample", num_beams=2),
     [("strategy='beam'", dict(strategy="beam")), ("num_beams=1", dict(num_beams=1))]),
    ("several greedy sequences", "decoder", dict(strategy="greedy", num_return_sequences=2),
     [("strategy='sample'", dict(strategy="sample")), ("(--strategy beam) with num_beams=2",
                                                        dict(strategy="beam", num_beams=2))]),
    ("more sequences than beams", "decoder", dict(strategy="beam", num_beams=2, num_return_sequences=3),
     [("num_beams=3", dict(num_beams=3))]),
    ("stop strings with beam", "decoder", dict(strategy="beam", num_beams=2, stop_strings=("x",)),
     [("drop stop_strings", dict(stop_strings=())),
      ("strategy='greedy'", dict(strategy="greedy", num_beams=1)),
      ("num_beams=1", dict(strategy="sample", num_beams=1))]),
    ("decoder prompt too long", "decoder", dict(prompts=LONG),
     [("truncate=True", dict(truncate=True)), ("Shorten it", dict(prompts="one two three"))]),
    ("decoder prompt too long for its max_new_tokens", "decoder", dict(prompts=" ".join(LONG.split()[:12]),
                                                                      max_new_tokens=80),
     [("max_new_tokens=", "FEWER"), ("truncate=True", dict(truncate=True))]),
    ("max_new_tokens >= max_seq_len (decoder)", "decoder", dict(max_new_tokens=96),
     [("max_new_tokens=95 (--max-new-tokens 95) minus the prompt's tokens", "MINUS_PROMPT")]),
    ("max_new_tokens >= max_seq_len (encoder-decoder)", "encoder-decoder", dict(max_new_tokens=96),
     [("max_new_tokens=95", dict(max_new_tokens=95))]),
    ("encoder-decoder source too long", "encoder-decoder", dict(prompts=LONG, max_new_tokens=1),
     [("truncate=True", dict(truncate=True)), ("Shorten it", dict(prompts="one two three"))]),
    ("more beams than the vocabulary", "decoder", dict(strategy="beam", num_beams=100_000, max_new_tokens=1),
     [("num_beams=", "VOCAB")]),
    ("too many sequences per prompt", "decoder", dict(strategy="sample", num_return_sequences=5000,
                                                      max_new_tokens=1, seed=0),
     [("num_return_sequences of at most 4096", dict(num_return_sequences=4096))]),
]


@pytest.mark.parametrize("name, package, broken, fixes", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_advice_works_in_the_api(models, name, package, broken, fixes):
    model = models[package]
    base = dict(prompts="one two three", max_new_tokens=4)
    call = lambda kw: model.generate(kw.pop("prompts"), **kw)  # noqa: E731
    for needle, fixed in fixes:
        err = fails_with_advice(lambda: call({**base, **broken}), needle)
        if fixed == "FEWER":  # the message names the number: "max_new_tokens=N (...) or less"
            fixed = {"max_new_tokens": int(str(err).split("max_new_tokens=")[-1].split(" ")[0])}
        elif fixed == "MINUS_PROMPT":
            fixed = {"max_new_tokens": 95 - len(model.encode(["one two three"])[0])}
        elif fixed == "VOCAB":
            fixed = {"num_beams": int(str(err).split("num_beams=")[-1].split(" ")[0])}
            assert fixed["num_beams"] == model.dims.vocab_size
        results = call({**base, **broken, **fixed})
        assert results and results[0].token_ids[0] is not None, name


def test_stream_advice_works_in_the_api(models):
    model = models["decoder"]
    beam = dict(strategy="beam", num_beams=2, max_new_tokens=4)
    fails_with_advice(lambda: model.stream("one two", **beam), "call generate() instead")
    assert model.generate("one two", **beam)[0].texts
    fails_with_advice(lambda: model.stream("one two", **beam), "strategy='greedy' (--strategy greedy) with num_beams=1")
    assert "".join(model.stream("one two", **{**beam, "strategy": "greedy", "num_beams": 1})) is not None

    several = dict(strategy="sample", num_return_sequences=2, seed=0, max_new_tokens=4)
    fails_with_advice(lambda: model.stream("one two", **several), "num_return_sequences=1")
    assert isinstance("".join(model.stream("one two", **{**several, "num_return_sequences": 1})), str)
    fails_with_advice(lambda: model.stream("one two", **several), "call generate() instead")
    assert len(model.generate("one two", **several)[0].texts) == 2


def test_generate_ids_advice_works(models):
    encdec, decoder = models["encoder-decoder"], models["decoder"]
    source = encdec.encode(["one two three"])[0]
    long_source = source[:1] + source[1:-1] * 60 + source[-1:]
    err = fails_with_advice(lambda: encdec.generate_ids([long_source], max_new_tokens=1), "shorten it to 96 tokens",
                 code="E_TOO_LONG")
    assert "max_new_tokens" not in str(err)  # fewer new tokens never shortens a source
    assert encdec.generate_ids([long_source[:96]], max_new_tokens=1)

    prompt = decoder.encode(["one two three four five six seven eight nine ten " * 3])[0]
    fails_with_advice(lambda: decoder.generate_ids([prompt], max_new_tokens=90), f"shorten the prompt to {96 - 90} tokens")
    assert decoder.generate_ids([prompt[:6]], max_new_tokens=90)
    err = fails_with_advice(lambda: decoder.generate_ids([prompt], max_new_tokens=90), "max_new_tokens=")
    fewer = int(str(err).split("max_new_tokens=")[-1].split(" ")[0])
    assert decoder.generate_ids([prompt], max_new_tokens=fewer)


def test_text_and_parameter_advice_works(models, package_paths):
    encoder, decoder = models["encoder"], models["decoder"]
    fails_with_advice(lambda: encoder.classify([LONG]), "truncate=True")
    assert encoder.classify([LONG], truncate=True)
    fails_with_advice(lambda: encoder.embed([LONG]), "truncate=True")
    assert encoder.embed([LONG], truncate=True).shape[0] == 1

    raw = "café".encode("latin-1")  # bytes that are not UTF-8, decoded the lenient way
    fails_with_advice(lambda: encoder.classify([raw.decode("utf-8", errors="surrogateescape")]),
           "data.decode('utf-8', errors='replace')")
    data = raw
    assert encoder.classify([data.decode("utf-8", errors="replace")])

    fails_with_advice(lambda: encoder.classify([]), "pass at least one text")
    assert encoder.classify(["one"])
    fails_with_advice(lambda: encoder.classify([""]), "pass non-empty text")

    fails_with_advice(lambda: decoder.generate("one", rng=0), "rng=numpy.random.default_rng(seed)")
    assert decoder.generate("one", strategy="sample", rng=np.random.default_rng(0), max_new_tokens=2)
    fails_with_advice(lambda: decoder.generate("one", rng=0), "seed=... (--seed) and no rng")
    assert decoder.generate("one", strategy="sample", seed=0, max_new_tokens=2)

    err = fails_with_advice(lambda: decoder.generate("one", max_new_token=2), "did you mean 'max_new_tokens'?")
    assert err.code == "E_UNKNOWN_PARAMETER"
    assert decoder.generate("one", max_new_tokens=2)
    fails_with_advice(lambda: decoder.generate("one", {"max_new_tokens": 2}), "GenerationConfig.from_dict(...)")
    assert decoder.generate("one", rt.GenerationConfig.from_dict({"max_new_tokens": 2}))

    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        fails_with_advice(lambda: rt.load(package_paths["decoder"], provider="cuda"), "provider='cpu'")
        assert rt.load(package_paths["decoder"], provider="cpu", threads=1).generate("one", max_new_tokens=1)


def test_generation_module_advice_works(models):
    """The free functions of runtime/generation.py (the search over any step model)."""
    model = models["decoder"]
    ids = model.encode(["one two"])[0:1]
    beam = gen.GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=3).resolve()
    fails_with_advice(lambda: gen.greedy(model.step_model(), ids, beam), "call beam_search() or generate()")
    assert gen.beam_search(model.step_model(), ids, beam)
    assert gen.generate(model.step_model(), ids, beam)
    stops = gen.GenerationConfig(stop_strings=("x",), max_new_tokens=3).resolve()
    fails_with_advice(lambda: gen.generate(model.step_model(), ids, stops), "pass decode=")
    assert gen.generate(model.step_model(), ids, stops, decode=model.decode)
    plain = gen.generate(model.step_model(), ids, gen.GenerationConfig(max_new_tokens=3).resolve())
    fails_with_advice(lambda: plain[0].text, "read token_ids, or pass decode=")
    assert plain[0].token_ids
    assert gen.generate(model.step_model(), ids, gen.GenerationConfig(max_new_tokens=3).resolve(),
                        decode=model.decode)[0].text is not None


@pytest.mark.slow
def test_reexport_advice_works(package_factory, tmp_path):
    """"re-export the package": a damaged package, exported again from its model, loads and runs."""
    from onnxformer.export.exporter import ExportOptions, export_model

    model, tok, report = package_factory("decoder", "rope")
    package = tmp_path / "package"
    shutil.copytree(report.path, package)
    graph = package / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    fails_with_advice(lambda: rt.load(package), "re-export the package")
    export_model(model, report.path / "tokenizer.json", package, ExportOptions(validate_generation=False))
    assert rt.load(package, threads=1).generate("one", max_new_tokens=2)


# --- the CLI: the advice names the flag, and applying it works ------------------------------
# (name, package, argv after PACKAGE that fails, [(the fix as the message spells it, argv that works)])
CLI_CASES = [
    ("stream with beam", "decoder", ["generate", "one two", "--stream", "--strategy", "beam", "--num-beams", "2"],
     [("without --stream", ["generate", "one two", "--strategy", "beam", "--num-beams", "2"]),
      ("--strategy greedy) with num_beams=1 (--num-beams 1)",
       ["generate", "one two", "--stream", "--strategy", "greedy", "--num-beams", "1"])]),
    ("stream with several sequences", "decoder",
     ["generate", "one two", "--stream", "--strategy", "sample", "--num-return-sequences", "2", "--seed", "0"],
     [("--num-return-sequences 1", ["generate", "one two", "--stream", "--strategy", "sample",
                                     "--num-return-sequences", "1", "--seed", "0"]),
      ("without --stream", ["generate", "one two", "--strategy", "sample", "--num-return-sequences", "2"])]),
    ("stream with two prompts", "decoder", ["generate", "one", "two", "--stream"],
     [("drop --stream", ["generate", "one", "two"]), ("Pass one", ["generate", "one", "--stream"])]),
    ("prompt too long", "decoder", ["generate", LONG],
     [("--truncate", ["generate", LONG, "--truncate"])]),
    ("encoder-decoder source too long", "encoder-decoder", ["generate", LONG, "--max-new-tokens", "1"],
     [("--truncate", ["generate", LONG, "--max-new-tokens", "1", "--truncate"])]),
    ("classify too long", "encoder", ["classify", LONG], [("--truncate", ["classify", LONG, "--truncate"])]),
    ("embed too long", "encoder", ["embed", LONG], [("--truncate", ["embed", LONG, "--truncate"])]),
    ("top_p", "decoder", ["generate", "one", "--strategy", "sample", "--top-p", "1.5"],
     [("--top-p 1.0", ["generate", "one", "--strategy", "sample", "--top-p", "1.0"])]),
    ("repetition penalty", "decoder", ["generate", "one", "--repetition-penalty", "0"],
     [("--repetition-penalty 1.0", ["generate", "one", "--repetition-penalty", "1.0"])]),
    ("min > max new tokens", "decoder", ["generate", "one", "--min-new-tokens", "5", "--max-new-tokens", "2"],
     [("--min-new-tokens 2", ["generate", "one", "--min-new-tokens", "2", "--max-new-tokens", "2"]),
      ("--max-new-tokens 5", ["generate", "one", "--min-new-tokens", "5", "--max-new-tokens", "5"])]),
    ("temperature 0", "decoder", ["generate", "one", "--strategy", "sample", "--temperature", "0"],
     [("--temperature 1.0", ["generate", "one", "--strategy", "sample", "--temperature", "1.0"]),
      ("--strategy greedy", ["generate", "one", "--strategy", "greedy", "--temperature", "0"])]),
    ("beams with sample", "decoder", ["generate", "one", "--strategy", "sample", "--num-beams", "2"],
     [("--strategy beam", ["generate", "one", "--strategy", "beam", "--num-beams", "2"])]),
    ("greedy sequences", "decoder", ["generate", "one", "--num-return-sequences", "2"],
     [("--strategy sample", ["generate", "one", "--num-return-sequences", "2", "--strategy", "sample"]),
      ("--strategy beam) with num_beams=2 (--num-beams 2",
       ["generate", "one", "--num-return-sequences", "2", "--strategy", "beam", "--num-beams", "2"])]),
    ("stop with beam", "decoder", ["generate", "one", "--num-beams", "2", "--stop", "x"],
     [("drop stop_strings (--stop)", ["generate", "one", "--num-beams", "2"]),
      ("--strategy greedy", ["generate", "one", "--num-beams", "1", "--stop", "x", "--strategy", "greedy"])]),
    ("max_new_tokens too many", "encoder-decoder", ["generate", "one", "--max-new-tokens", "96"],
     [("--max-new-tokens 95", ["generate", "one", "--max-new-tokens", "95"])]),
    ("provider", "decoder", ["generate", "one", "--provider", "cuda"],
     [("--provider cpu", ["generate", "one", "--provider", "cpu"])]),
    ("text not UTF-8", "encoder", ["classify", "caf\udce9"],
     [("pass UTF-8 text", ["classify", "café"])]),
]


@pytest.mark.parametrize("name, package, broken, fixes", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_advice_works_in_the_cli(package_paths, name, package, broken, fixes):
    if name == "provider" and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("CUDA is available here")
    path = str(package_paths[package])
    argv = lambda words: [words[0], path, *words[1:], "--max-new-tokens", "2"] if words[0] == "generate" and \
        "--max-new-tokens" not in words else [words[0], path, *words[1:]]  # noqa: E731
    for needle, fixed in fixes:
        result = run_cli(argv(broken))
        assert result.rc == 2 and result.err.startswith("error[E_"), result
        assert needle in result.err, f"the advice {needle!r} is not in: {result.err}"
        ok = run_cli(argv(fixed))
        assert ok.rc == 0 and ok.out, (name, needle, ok)


def test_cli_stdin_advice_works(package_paths):
    path = str(package_paths["encoder"])
    result = run_cli(["classify", path], stdin="\n\n")
    assert result.rc == 2 and "pass at least one text" in result.err
    assert run_cli(["classify", path, "one"]).rc == 0
    result = run_cli(["classify", path], stdin=b"caf\xe9\n")
    assert result.rc == 2 and "pipe UTF-8 text" in result.err
    assert run_cli(["classify", path], stdin="café\n").rc == 0


def test_cli_version_and_verbose_anywhere(package_paths, capsys):
    from onnxformer.runtime.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"onnxformer {rt.__version__}"
    missing = str(package_paths["decoder"]) + "-missing"
    assert run_cli(["inspect", missing]).rc == 2
    for argv in (["-v", "inspect", missing], ["inspect", missing, "-v"], ["inspect", "--verbose", missing]):
        with pytest.raises(OnnxformerError):  # -v shows the traceback: the error propagates
            run_cli(argv)


@pytest.mark.runtime_only  # CI runs it in the torch-free `pip install .` venv too, not only the editable one
def test_version_in_any_install():
    import onnxformer

    assert onnxformer.__version__ == rt.__version__ == metadata.version("onnxformer")
    done = subprocess.run([sys.executable, "-m", "onnxformer.runtime.cli", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"onnxformer {rt.__version__}", done
