"""Property-based tests (hypothesis): whatever goes into the runtime's public API or the CLI,
the answer is a result or the project's own error type, never another exception or a hang.

Runs are derandomized (the same examples every run, so the figures in RESULTS.md repeat) and
bounded (max_examples per test, a watchdog per example). Sizes that only make a call slow
(max_new_tokens up to the model's limit) are allowed; absurd sizes (num_beams = 10**30) must
be refused before any memory is allocated.
"""

from __future__ import annotations

import collections
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packages are exported on the spot")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import onnxformer.runtime as rt  # noqa: E402
from onnxformer.runtime import GenerationConfig, OnnxformerError  # noqa: E402
from onnxformer.runtime.errors import CODES  # noqa: E402
from onnxformer.runtime.safety import external_data_refs  # noqa: E402
from reliability_support import refresh_checksums, run_cli, watchdog  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
PER_EXAMPLE_S = 30  # a hang is an example that takes longer than this

# --- value strategies ------------------------------------------------------------------------
huge_ints = st.sampled_from([2**31, 2**63, -(2**63), 10**30])
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-2, 400), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
PLAUSIBLE = {
    "strategy": st.sampled_from(["greedy", "sample", "beam", "nucleus", ""]),
    "max_new_tokens": st.integers(-2, 6),
    "min_new_tokens": st.integers(-1, 4),
    "temperature": st.floats(-1, 3),
    "top_k": st.integers(-2, 400),
    "top_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-2, 2**64),
    "num_beams": st.integers(-1, 4),
    "length_penalty": st.floats(-2, 2),
    "early_stopping": st.booleans(),
    "num_return_sequences": st.integers(-1, 4),
    "repetition_penalty": st.floats(-1, 3),
    "no_repeat_ngram_size": st.integers(-1, 4),
    "eos_token_ids": st.lists(st.integers(-2, 400), max_size=3).map(tuple),
    "stop_strings": st.lists(st.text(max_size=3), max_size=2).map(tuple),
    "pad_token_id": st.integers(-1, 400),
}


VALID = {  # values each field accepts on its own (combinations can still contradict)
    "strategy": st.sampled_from(["greedy", "sample", "beam"]),
    "max_new_tokens": st.integers(0, 6),
    "temperature": st.floats(0.05, 3),
    "top_k": st.integers(0, 50),
    "top_p": st.floats(0.05, 1),
    "seed": st.integers(0, 2**64),
    "num_beams": st.integers(1, 3),
    "num_return_sequences": st.integers(1, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "no_repeat_ngram_size": st.integers(0, 3),
    "eos_token_ids": st.lists(st.integers(0, 300), max_size=2).map(tuple),
    "stop_strings": st.lists(st.text(min_size=1, max_size=3), max_size=2).map(tuple),
}


def parameters(size_cap: bool) -> st.SearchStrategy[dict]:
    """Generation parameter dicts. Half are built from values each field accepts (a few
    fields, so many combinations are valid); half mix plausible edges, junk values and
    unknown names. With `size_cap`, sizes stay small where a value would make a call slow."""
    fields = {name: st.one_of(values, values, junk) for name, values in PLAUSIBLE.items()}
    if size_cap:
        fields["max_new_tokens"] = st.one_of(st.integers(-2, 6), huge_ints, st.sampled_from([95, 96, 200]))
    known = st.fixed_dictionaries({}, optional=fields)
    unknown = st.dictionaries(st.sampled_from(["topk", "beams", "max_tokens", "temprature", ""]), junk, max_size=1)
    anything = st.builds(lambda a, b: {**a, **b}, known, unknown)
    mostly_valid = st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys}))
    return weighted(mostly_valid, anything, 0.5)


texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "caf\udce9", "🙂" * 30, "one two three " * 40, "\n\t"]),
)


def weighted(common: st.SearchStrategy, rare: st.SearchStrategy, rare_share: float = 0.25) -> st.SearchStrategy:
    """`rare` in about `rare_share` of the examples (st.one_of alone gives no control)."""
    n = round(1 / rare_share)
    return st.sampled_from([True] + [False] * (n - 1)).flatmap(lambda pick_rare: rare if pick_rare else common)


some_text = st.text(min_size=1, max_size=40)
prompt_inputs = weighted(st.one_of(some_text, st.lists(some_text, min_size=1, max_size=3)),
                         st.one_of(texts, st.lists(texts, max_size=3), junk, st.binary(max_size=8)))
token_ids = st.one_of(st.integers(-3, 330), huge_ints, st.floats(allow_nan=True), st.booleans(), st.none(),
                      st.text(max_size=2))
id_inputs = weighted(
    st.lists(st.lists(st.integers(0, 319), min_size=1, max_size=12), min_size=1, max_size=3),
    st.one_of(st.lists(st.lists(token_ids, max_size=6), max_size=3), junk),
)
batch_sizes = weighted(st.integers(1, 5), st.one_of(st.integers(-1, 0), junk))
id_lists = weighted(st.lists(st.integers(0, 319), max_size=8), st.one_of(st.lists(token_ids, max_size=8), junk))


def tally_call(tally: collections.Counter, call):
    """Run `call` under the watchdog; count a result or an OnnxformerError (by class name), which
    must carry a message and a code of its own condition (not the catch-all E_ONNXFORMER)."""
    try:
        with watchdog(PER_EXAMPLE_S):
            result = call()
    except OnnxformerError as err:
        tally[type(err).__name__] += 1
        assert str(err), "an error without a message"
        assert err.code in CODES and err.code != "E_ONNXFORMER", (err.code, str(err))
        return None
    tally["result"] += 1
    return result


def _summary(tally: collections.Counter) -> str:
    parts = [f"{tally['result']} results"] + [f"{n} {k}" for k, n in sorted(tally.items()) if k != "result"]
    return ", ".join(parts) + "; 0 other exceptions, 0 hangs"


# --- GenerationConfig ------------------------------------------------------------------------


def test_generation_config_from_any_parameters(figures):
    tally = collections.Counter()

    @settings(max_examples=600, **SETTINGS)
    @given(parameters(size_cap=False))
    def check(data):
        config = tally_call(tally, lambda: GenerationConfig.from_dict(data))
        if config is not None:
            assert GenerationConfig.from_dict(config.to_dict()) == config  # round-trips
            resolved = tally_call(tally, config.resolve)  # the rules between fields, all now known
            if resolved is not None:
                assert resolved.top_p > 0 and resolved.num_beams >= 1 and resolved.max_new_tokens >= 0

    check()
    figures.record("properties", "GenerationConfig.from_dict on random parameter dicts (plausible and junk values, "
                   "unknown names)", sum(tally.values()), _summary(tally))


# --- the runtime API -------------------------------------------------------------------------


def test_generate_with_any_prompts_and_parameters(models, figures):
    decoder, seq2seq = models["decoder"], models["encoder-decoder"]
    tally = collections.Counter()

    @settings(max_examples=200, **SETTINGS)
    @given(prompt_inputs, parameters(size_cap=True), st.booleans(), st.booleans())
    def check(prompts, overrides, truncate, use_seq2seq):
        model = seq2seq if use_seq2seq else decoder
        out = tally_call(tally, lambda: model.generate(prompts, truncate=truncate, **overrides))
        if out is not None:
            n = 1 if isinstance(prompts, str) else len(prompts)
            assert len(out) == n and all(isinstance(t, str) for g in out for t in g.texts)
            assert all(0 <= i < model.dims.vocab_size for g in out for seq in g.token_ids for i in seq)

    check()
    figures.record("properties", "Model.generate (decoder and encoder-decoder) on random prompts (text, lists, "
                   "junk, bytes, surrogates, over-long) x random parameters x truncate", sum(tally.values()),
                   _summary(tally))


def test_generate_ids_with_any_token_ids(models, figures):
    decoder = models["decoder"]
    tally = collections.Counter()

    @settings(max_examples=200, **SETTINGS)
    @given(id_inputs, st.one_of(st.none(), parameters(size_cap=True)))
    def check(ids, overrides):
        def call():
            config = None if overrides is None else decoder.generation_config(**overrides)
            return decoder.generate_ids(ids, config)

        out = tally_call(tally, call)
        if out is not None:
            assert len(out) == len(ids)

    check()
    figures.record("properties", "Model.generate_ids on random id lists (ints in and out of range, 2**63, floats, "
                   "NaN, bools, None, strings, nesting) x random parameters", sum(tally.values()), _summary(tally))


def test_stream_matches_generate(models, figures):
    decoder = models["decoder"]
    tally = collections.Counter()

    @settings(max_examples=100, **SETTINGS)
    @given(texts, st.integers(0, 6), st.sampled_from(["greedy", "sample"]), st.integers(0, 9))
    def check(prompt, max_new_tokens, strategy, seed):
        args = dict(max_new_tokens=max_new_tokens, strategy=strategy, seed=seed)
        streamed = tally_call(tally, lambda: "".join(decoder.stream(prompt, **args)))
        if streamed is not None:
            assert streamed == decoder.generate(prompt, **args)[0].text

    check()
    figures.record("properties", "Model.stream vs Model.generate on random prompts, lengths, greedy/sampled",
                   sum(tally.values()), _summary(tally) + "; streamed text == generated text in every result")


def test_classify_and_embed_with_any_texts(models, figures):
    encoder = models["encoder"]
    tally = collections.Counter()

    @settings(max_examples=200, **SETTINGS)
    @given(prompt_inputs, batch_sizes, st.booleans(), st.sampled_from(["mean", "cls", "cls", "mean", "max"]))
    def check(inputs, batch_size, truncate, pooling):
        labels = tally_call(tally, lambda: encoder.classify(inputs, batch_size=batch_size, truncate=truncate))
        if labels is not None:
            assert all(math.isclose(sum(c.probabilities.values()), 1.0, abs_tol=1e-6) for c in labels)
            assert all(c.label in encoder.label_names for c in labels)
        vectors = tally_call(tally, lambda: encoder.embed(inputs, pooling=pooling, batch_size=batch_size,
                                                          truncate=truncate))
        if vectors is not None:
            assert vectors.shape == (1 if isinstance(inputs, str) else len(inputs), encoder.dims.d_model)
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    check()
    figures.record("properties", "Model.classify and Model.embed on random inputs x batch sizes (incl. 0, -1, junk) "
                   "x truncate x pooling", sum(tally.values()), _summary(tally))


def test_decode_with_any_ids(models, figures):
    decoder = models["decoder"]
    tally = collections.Counter()

    @settings(max_examples=200, **SETTINGS)
    @given(id_lists)
    def check(ids):
        text = tally_call(tally, lambda: decoder.decode(ids))
        assert text is None or isinstance(text, str)

    check()
    figures.record("properties", "Model.decode on random id lists and junk", sum(tally.values()), _summary(tally))


# --- damaged graph bytes ---------------------------------------------------------------------


def test_graph_walker_on_damaged_graphs(package_paths, tmp_path, figures):
    """The external-data walker (runtime/safety.py) on a real graph whose weights live in an
    external file (every initializer has a location), with random bytes changed or cut off,
    and on random bytes: a list of references or a PackageError."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(package_paths["decoder"] / "decoder.onnx"))
    onnx.save_model(proto, str(tmp_path / "g.onnx"), save_as_external_data=True, location="g.onnx_data",
                    size_threshold=0)
    original = (tmp_path / "g.onnx").read_bytes()
    assert len(external_data_refs(tmp_path / "g.onnx")) == len(proto.graph.initializer)
    path = tmp_path / "damaged.onnx"
    tally = collections.Counter()

    @settings(max_examples=300, **SETTINGS)
    @given(st.one_of(
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1, max_size=8),
        st.integers(0, len(original) - 1),
        st.binary(max_size=300),
    ))
    def check(damage):
        if isinstance(damage, bytes):
            data = damage
        elif isinstance(damage, int):
            data = original[:damage]
        else:
            data = bytearray(original)
            for position, value in damage:
                data[position] = value
        path.write_bytes(bytes(data))
        refs = tally_call(tally, lambda: external_data_refs(path))
        assert refs is None or all(isinstance(r.location, str) for r in refs)

    check()
    figures.record("properties", "external-data walker (runtime/safety.py) on a graph with external weights: 1-8 "
                   "random bytes changed, truncated at a random point, or random bytes", sum(tally.values()),
                   _summary(tally))


def test_load_and_run_mutated_graphs(package_paths, tmp_path, figures):
    """Random byte changes in encoder.onnx with the checksum forged to match: load refuses the
    graph (PackageError) or loads it; a loaded graph classifies or raises RunError. A forged
    checksum makes the changed graph indistinguishable from a real one, so a different answer is
    counted, not failed (without forgery the corpus in test_damaged_packages.py has none)."""
    package = tmp_path / "package"
    shutil.copytree(package_paths["encoder"], package)
    original = (package / "encoder.onnx").read_bytes()
    texts = ["the cat sat", "one"]
    expected = [c.probabilities for c in rt.load(package, threads=1).classify(texts)]
    tally, answers = collections.Counter(), collections.Counter()

    @settings(max_examples=60, **SETTINGS)
    @given(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.sampled_from(["mutate", "truncate"]))
    def check(changes, how):
        data = bytearray(original)
        if how == "truncate":
            data = data[: changes[0][0]]
        else:
            for position, value in changes:
                data[position] = value
        (package / "encoder.onnx").write_bytes(bytes(data))
        refresh_checksums(package)
        model = tally_call(tally, lambda: rt.load(package, threads=1))
        if model is not None:
            result = tally_call(tally, lambda: model.classify(texts))
            if result is not None:
                answers["same" if [c.probabilities for c in result] == expected else "different"] += 1

    check()
    figures.record("properties", "encoder.onnx with 1-8 random byte changes or truncated, checksum forged; load "
                   "then classify", sum(tally.values()),
                   _summary(tally) + f"; of the classifications {answers['same']} the undamaged answer exactly, "
                   f"{answers['different']} different (a forged checksum makes the changed graph a valid other "
                   "model: undetectable by design)")


# --- the CLI ---------------------------------------------------------------------------------

OPTIONS = {
    "generate": ["--max-new-tokens", "--min-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--num-beams", "--length-penalty", "--num-return-sequences", "--repetition-penalty",
                 "--no-repeat-ngram-size", "--stop", "--strategy", "--threads", "--provider"],
    "classify": ["--threads", "--provider"],
    "embed": ["--pooling", "--threads", "--provider"],
    "inspect": [],
    "export": ["--quantize", "--dtype", "--opset", "--atol"],
    "train": ["--arch", "--task", "--data", "--out", "--steps", "--batch-size", "--lr", "--lora-rank", "--vocab-size",
              "--max-len", "--save-every", "--lora-targets", "--preset"],
}
FLAGS = {
    "generate": ["--json", "--stream", "--truncate"], "classify": ["--json", "--truncate"],
    "embed": ["--json", "--no-normalize", "--truncate"], "inspect": ["--json"], "export": ["--external-data"],
    "train": ["--resume", "--bitfit", "--nsp", "--no-progress"],
}
VALUES = st.sampled_from(["0", "1", "2", "3", "-1", "0.5", "1.5", "nan", "inf", "1e9", "", "x", "greedy", "sample",
                          "beam", "cpu", "cuda", "cls", "mean", "int8", "fp16", "decoder", "encoder", "classify",
                          "causal-lm", "q_proj", "tiny", "99999999999999999999"])
INTS = st.sampled_from(["0", "1", "2", "3", "-1", "64", "99999999999999999999"])
FLOATS = st.sampled_from(["0", "0.5", "1", "1.5", "-1", "nan", "inf", "1e9"])
TYPED = {  # option -> values of its type (argparse accepts them; the command may not)
    "--strategy": st.sampled_from(["greedy", "sample", "beam"]), "--provider": st.sampled_from(["cpu", "cuda"]),
    "--pooling": st.sampled_from(["mean", "cls"]), "--quantize": st.sampled_from(["int8", "int4"]),
    "--dtype": st.sampled_from(["fp32", "fp16"]), "--arch": st.sampled_from(["decoder", "encoder"]),
    "--task": st.sampled_from(["classify", "causal-lm"]), "--lora-targets": st.sampled_from(["q_proj", "q_proj,v_proj"]),
    "--preset": st.just("tiny"), "--stop": st.sampled_from(["x", " ", "the"]),
    **{o: FLOATS for o in ("--temperature", "--top-p", "--length-penalty", "--repetition-penalty", "--atol", "--lr")},
}


@pytest.fixture(scope="module")
def cli_paths(package_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-fuzz")
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_bytes(b'{"text": 1}\n\xff\n')
    return {"packages": [str(p) for p in package_paths.values()] + [str(root / "missing"), str(root / "empty"),
                                                                    str(root / "bad.jsonl")],
            "data": [str(root / "bad.jsonl"), str(root / "missing.jsonl"), "builtin:nothing", str(root / "empty")],
            "out": str(root / "out")}


def argv_strategy(paths):
    @st.composite
    def build(draw):
        command = draw(st.sampled_from([*OPTIONS, "bogus"]))
        argv = [command] if command != "bogus" else [draw(st.sampled_from(["bogus", "--help", "-v", ""]))]
        if command in ("generate", "classify", "embed", "inspect", "export"):
            argv.append(draw(st.sampled_from(paths["packages"])))
        if command == "export":
            argv.append(paths["out"])
        for _ in range(draw(st.integers(0, 5))):
            kind = draw(st.integers(0, 9))
            if kind == 0:
                argv.append(draw(st.sampled_from(["--help", "--bogus", "-v", "--", "-"])))
            elif kind <= 2 and FLAGS.get(command):
                argv.append(draw(st.sampled_from(FLAGS[command])))
            elif OPTIONS.get(command):
                option = draw(st.sampled_from(OPTIONS[command]))
                if option == "--data":
                    value = draw(st.sampled_from(paths["data"]))
                else:
                    value = draw(weighted(TYPED.get(option, INTS), VALUES, 0.2))
                argv += [option, value] if option != "--out" else [option, paths["out"]]
        if command in ("generate", "classify", "embed"):
            argv += draw(st.lists(texts.filter(lambda t: not t.startswith("-")), max_size=2))
        return argv

    return build()


def test_cli_with_any_arguments(cli_paths, figures):
    tally = collections.Counter()

    @settings(max_examples=300, **SETTINGS)
    @given(argv_strategy(cli_paths), st.sampled_from(["", "some text\n", b"\xff\xfe\n"]))
    def check(argv, stdin):
        try:
            with watchdog(PER_EXAMPLE_S):
                result = run_cli(argv, stdin)
        except OnnxformerError as err:  # -v / --verbose (before or after the subcommand) asks for the traceback
            assert {"-v", "--verbose"} & set(argv), (argv, err)
            assert err.code in CODES and err.code != "E_ONNXFORMER", (argv, err.code)
            tally["-v: our error re-raised"] += 1
            return
        assert "Traceback" not in result.err, (argv, result.err)
        assert result.rc in (0, 2), (argv, result)
        if result.rc == 2:
            assert result.err.strip(), argv
            if "usage:" not in result.err:  # one of our errors: error[CODE]: with a code of the table
                code = result.err.split("error[", 1)[-1].split("]", 1)[0]
                assert code in CODES and code != "E_ONNXFORMER", (argv, result.err)
        tally["exit 0" if result.rc == 0 else "exit 2 (usage)" if "usage:" in result.err else "exit 2 (error: ...)"] += 1

    check()
    assert not (cli_paths["out"] and __import__("os").path.exists(cli_paths["out"] + "/manifest.json"))
    figures.record("properties", "`onnxformer` CLI with random argument lists (every subcommand but quickstart; "
                   "options with random values, flags, junk, packages and data that exist or not, bad stdin)",
                   sum(tally.values()), ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
                   + "; every error `error[CODE]: ...` with a code of the table; 0 tracebacks, 0 other exit codes, "
                   "0 hangs")
