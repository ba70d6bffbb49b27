"""Generation settings Hugging Face models carry: forced_bos_token_id, forced_eos_token_id
(transformers' ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor), max_length and
generation_config.json's decoder_start_token_id.

First the forcing rules in the numpy search against hand-written expectations on a bigram
table (runtime/node/test/forced_tokens.test.js checks the same cases in Node); then a tiny
random BART with bart-large-cnn's settings (forced bos, forced eos = eos), saved with
save_pretrained, imported and exported: greedy and 2-beam tokens equal transformers' generate
for 32 new tokens, through the Python and the Node runtime."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnxformer.runtime import generation as G
from onnxformer.runtime.errors import ConfigError
from onnxformer.runtime.generation import GenerationConfig
from test_generation_numpy import BigramLM
from support import HAS_NODE, NODE_DIR


# Token ids of the bigram table: A B E C (E = 2, the eos of these tests).
A, B, E, C = 0, 1, 2, 3
TABLE = [  # P(next | last), rows by the last token
    [0.1, 0.5, 0.1, 0.3],  # A -> B .5, C .3
    [0.6, 0.1, 0.2, 0.1],  # B -> A .6
    [0.25, 0.25, 0.25, 0.25],  # E -> uniform (ties: lowest id)
    [0.2, 0.2, 0.5, 0.1],  # C -> E .5
]
ln = math.log


def Bigram() -> BigramLM:
    """logits = log P[last token] over TABLE; counts its calls (tests/test_generation_numpy.py)."""
    return BigramLM(TABLE)


def run(prompts, **settings):
    return G.generate(Bigram(), prompts, GenerationConfig(**settings))


# The cases, each with its expectation worked by hand (the Node test has the same table):
# (prompts, settings, token_ids per prompt, finish reasons, scores).
CASES = {
    # t0 forced C (the sequence is the one-token prompt), t1 C -> E, t2 forced E; no eos ids: "length"
    "greedy-bos-eos": ([[A]], dict(max_new_tokens=3, forced_bos_token_id=C, forced_eos_token_id=E, eos_token_ids=()),
                       [[C, E, E]], ["length"], [ln(0.5)]),
    # the same with E an eos id: it ends at t1
    "greedy-bos-eos-stops": ([[A]], dict(max_new_tokens=3, forced_bos_token_id=C, forced_eos_token_id=E,
                                         eos_token_ids=(E,)), [[C, E]], ["eos"], [ln(0.5)]),
    # a two-token prompt: no forced bos (transformers forces it only after a one-token sequence)
    "greedy-long-prompt": ([[B, A]], dict(max_new_tokens=3, forced_bos_token_id=C, forced_eos_token_id=E,
                                          eos_token_ids=()), [[B, A, E]], ["length"], [ln(0.5) + ln(0.6)]),
    # max_length 4 (prompt included): 3 tokens after [A], 1 after [B, A, B]; each ends in the forced E
    "max-length": ([[A], [B, A, B]], dict(max_new_tokens=5, max_length=4, forced_eos_token_id=E, eos_token_ids=()),
                   [[B, A, E], [E]], ["length", "length"], [ln(0.5) + ln(0.6), 0.0]),
    "max-length-unforced": ([[A], [B, A, B]], dict(max_new_tokens=5, max_length=4, eos_token_ids=()),
                            [[B, A, B], [A]], ["length", "length"], [ln(0.5) + ln(0.6) + ln(0.5), ln(0.6)]),
    # two forced eos ids: both logits 0, argmax takes the lower id; log-prob ln(1/2)
    "two-forced-eos": ([[B, A]], dict(max_new_tokens=1, forced_eos_token_id=(C, E), eos_token_ids=()),
                       [[E]], ["length"], [ln(0.5)]),
    # beam K=2: t0 from A: B (.5), C (.3) run; t1 is the last step: only E is allowed, so both beams
    # end in E: [B, E] = ln .5 / 2, [C, E] = ln .3 / 2 (unforced, [B, A] at ln .3 / 2 would lead)
    "beam-eos": ([[A]], dict(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=2,
                             forced_eos_token_id=E, eos_token_ids=(E,)),
                 [[[B, E], [C, E]]], [["eos", "eos"]], [[ln(0.5) / 2, ln(0.3) / 2]]),
    # beam K=2, forced bos C: t0 leaves one live beam [C] (0); t1 from C: E (.5) closes [C, E], A and B
    # (.2 each, A first) run and end there: [C, E] = ln .5 / 2 first, then [C, A] = ln .2 / 2
    "beam-bos": ([[A]], dict(strategy="beam", num_beams=2, num_return_sequences=2, max_new_tokens=2,
                             forced_bos_token_id=C, eos_token_ids=(E,)),
                 [[[C, E], [C, A]]], [["eos", "length"]], [[ln(0.5) / 2, ln(0.2) / 2]]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forcing_rules_by_hand(name):
    prompts, settings, tokens, reasons, scores = CASES[name]
    out = run(prompts, **settings)
    if settings.get("strategy") == "beam":
        assert [g.token_ids for g in out] == tokens
        assert [g.finish_reasons for g in out] == reasons
        np.testing.assert_allclose([g.scores for g in out], scores, atol=1e-5)
    else:
        assert [g.token_ids[0] for g in out] == tokens
        assert [g.finish_reasons[0] for g in out] == reasons
        np.testing.assert_allclose([g.scores[0] for g in out], scores, atol=1e-5)


def test_the_processors_by_hand():
    logits = np.zeros((3, 4), dtype=np.float32)
    forced = G.force_tokens(logits, [0, 2], (E, C))
    assert forced[1].tolist() == [0, 0, 0, 0] and logits.tolist() == np.zeros((3, 4)).tolist()  # pure
    assert forced[0].tolist() == forced[2].tolist() == [-np.inf, -np.inf, 0, 0]
    config = GenerationConfig(forced_bos_token_id=C, forced_eos_token_id=E, max_new_tokens=3)
    seqs = [[A], [A, B], [B]]
    assert G.forced_rows(seqs, config, 0) == ([0, 2], [])  # bos: rows whose sequence is one token long
    assert G.forced_rows(seqs, config, 2) == ([], [0, 1, 2])  # eos: the last allowed token
    assert G.forced_rows(seqs, config, 1, limits=[2, 3, 0]) == ([], [0])
    capped = GenerationConfig(max_new_tokens=5, max_length=4)
    assert G.new_token_limits([[A], [A, B, C], [A] * 6], capped) == [3, 1, 0]
    assert G.new_token_limits([[A] * 6], GenerationConfig(max_new_tokens=5).resolve()) == [5]  # 0: no cap


def test_an_explicit_max_new_tokens_wins_over_a_package_max_length():
    """transformers' precedence: generate(max_new_tokens=N) ignores generation_config.max_length."""
    package = {"max_length": 4, "max_new_tokens": 5}
    assert GenerationConfig().resolve(package).max_length == 4  # the package's own pair applies
    assert GenerationConfig(max_new_tokens=8).resolve(package).max_length == 0
    assert GenerationConfig(max_new_tokens=8, max_length=6).resolve(package).max_length == 6


def test_sampling_and_streaming_keep_the_forced_tokens():
    settings = dict(max_new_tokens=4, forced_bos_token_id=C, forced_eos_token_id=E, eos_token_ids=())
    middles = set()
    for seed in range(6):
        [g] = run([[A]], strategy="sample", seed=seed, **settings)
        tokens = g.token_ids[0]
        assert tokens[0] == C and tokens[-1] == E and len(tokens) == 4
        middles.add(tuple(tokens[1:3]))
    assert len(middles) > 1  # the unforced steps do sample
    decode = lambda ids: "".join("ABEC"[i] for i in ids)  # noqa: E731
    assert "".join(G.stream(Bigram(), [A], GenerationConfig(**settings), decode)) == "CEAE"  # greedy: C E A E


def test_a_prompt_past_max_length_generates_nothing_and_calls_no_model():
    model = Bigram()
    for strategy, beams in (("greedy", 1), ("beam", 2)):
        out = G.generate(model, [[A] * 5], GenerationConfig(strategy=strategy, num_beams=beams, max_length=4,
                                                           forced_eos_token_id=E))
        assert out[0].token_ids[0] == [] and out[0].finish_reasons[0] == "length"
    assert model.calls == 0


def test_forced_ids_are_validated():
    with pytest.raises(ConfigError, match=r"forced_bos_token_id \[4\] out of range for vocab_size 4"):
        run([[A]], forced_bos_token_id=4)
    with pytest.raises(ConfigError, match=r"forced_eos_token_id \[9\] out of range"):
        run([[A]], strategy="beam", num_beams=2, forced_eos_token_id=(E, 9))
    with pytest.raises(ConfigError, match="forced_bos_token_id must be a token id >= 0, or -1"):
        GenerationConfig(forced_bos_token_id=-3)
    with pytest.raises(ConfigError, match="max_length must be an integer >= 0"):
        GenerationConfig(max_length=2.5)
    config = GenerationConfig.from_dict({"forced_eos_token_id": [2, 3], "forced_bos_token_id": 0, "max_length": 9})
    assert config.forced_eos_token_id == (2, 3) and json.loads(json.dumps(config.to_dict())) == {
        "forced_eos_token_id": [2, 3], "forced_bos_token_id": 0, "max_length": 9}
    resolved = GenerationConfig().resolve({"forced_bos_token_id": 0})  # a package default ...
    assert resolved.forced_bos_token_id == 0 and resolved.forced_eos_token_id == () and resolved.max_length == 0
    assert GenerationConfig(forced_bos_token_id=-1).resolve({"forced_bos_token_id": 0}).forced_bos_token_id == -1


# --------------------------------------------------------------------------------------------
# A Hugging Face BART with bart-large-cnn's generation settings
# --------------------------------------------------------------------------------------------

NEW_TOKENS = 32
SOURCES = ["one red cat.", "two green dog. three blue sun. four", "hello"]


def _bart_folder(directory: Path, **generation):
    """A random untied BART (tests/test_hf_seq2seq.py's) whose generation_config.json forces bos
    and eos as bart-large-cnn's does (bos <s>, eos </s>), plus `generation` settings."""
    from test_hf_seq2seq import _hf_model, _untie
    from hf_support import save_hf

    model, tok = _hf_model("bart", forced_eos_token_id=None)
    for key, value in {"forced_bos_token_id": tok.bos_token_id, "forced_eos_token_id": tok.eos_token_id,
                       **generation}.items():
        setattr(model.generation_config, key, value)  # transformers 5's BartConfig keeps no forced_bos_token_id
    folder = save_hf(model, tok, directory)
    _untie(folder)
    return type(model).from_pretrained(folder).eval(), tok, folder


def test_the_import_carries_the_settings(tmp_path):
    """forced ids and max_length into the package's generation defaults, generation_config.json's
    decoder_start_token_id (apart from config.json's) into the model config; transformers' own
    generate is the reference for which start and which forced tokens apply."""
    from hf_support import torch
    from onnxformer.modeling.hf_import import load_hf
    from test_hf_seq2seq import _padded

    reference, tok, folder = _bart_folder(tmp_path / "bart", decoder_start_token_id=tok_bos(), max_length=10)
    assert json.loads((folder / "config.json").read_text())["decoder_start_token_id"] == tok.eos_token_id
    imported = load_hf(folder)
    assert imported.package.generation == {"eos_token_ids": [tok.eos_token_id], "max_length": 10,
                                           "forced_bos_token_id": tok.bos_token_id,
                                           "forced_eos_token_id": [tok.eos_token_id]}
    assert imported.config.decoder_start_token_id == imported.package.special_tokens["decoder_start"] == tok_bos()
    with torch.no_grad():
        out = reference.generate(**_padded(tok, SOURCES[:1]), do_sample=False, use_cache=False)
    assert out[0, 0] == tok_bos() and out[0, 1] == tok.bos_token_id and out.shape[1] == 10  # start, forced bos
    assert out[0, -1] == tok.eos_token_id


def tok_bos() -> int:
    return 1  # hf_tokenizer's <s> (<pad> 0, <s> 1, </s> 2): a decoder start apart from config.json's </s>


def test_config_json_forced_ids_apply_without_generation_config_json(tmp_path):
    from onnxformer.modeling.hf_import import load_hf
    from onnxformer.runtime.errors import CheckpointError

    _, tok, folder = _bart_folder(tmp_path / "bart")
    (folder / "generation_config.json").unlink()
    data = json.loads((folder / "config.json").read_text())
    data.update(forced_bos_token_id=None, force_bos_token_to_be_generated=True, forced_eos_token_id=[2, 0])
    (folder / "config.json").write_text(json.dumps(data))
    generation = load_hf(folder).package.generation
    assert generation["forced_bos_token_id"] == data["bos_token_id"] and generation["forced_eos_token_id"] == [2, 0]
    data.update(forced_eos_token_id=10 ** 6)
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="forced_eos_token_id 1000000 .* below vocab_size"):
        load_hf(folder)


NODE_GENERATE = """
import { load } from '%s';
const [packageDir, prompts, runs] = [process.argv[1], JSON.parse(process.argv[2]), JSON.parse(process.argv[3])];
const model = await load(packageDir, { threads: 1 });
const out = [];
for (const [batch, options] of runs) {
  const rows = await model.generateIds(prompts.slice(0, batch), options);
  out.push(rows.map((g) => g.token_ids[0]));
}
console.log(JSON.stringify(out));
await model.release();
"""


@pytest.fixture(scope="module")
def bart_package(tmp_path_factory):
    from onnxformer.export.exporter import export_checkpoint

    reference, tok, folder = _bart_folder(tmp_path_factory.mktemp("bart"))
    report = export_checkpoint(folder, tmp_path_factory.mktemp("pkg") / "pkg")
    return reference, tok, report.path


def _hf_generate(reference, tok, texts, **settings):
    from hf_support import torch
    from test_hf_seq2seq import _padded

    with torch.no_grad():  # without its cache: transformers' assumes as many decoder layers as encoder ones
        out = reference.generate(**_padded(tok, texts), do_sample=False, use_cache=False, **settings)
    rows, eos = out[:, 1:].tolist(), tok.eos_token_id  # without the decoder start token
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]  # a finished row is padded after eos


@pytest.mark.slow
def test_the_package_generates_like_transformers(bart_package):
    import onnxformer.runtime as rt
    from test_hf_seq2seq import _ids

    reference, tok, path = bart_package
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["generation"]["forced_bos_token_id"] == tok.bos_token_id
    assert manifest["generation"]["forced_eos_token_id"] == [tok.eos_token_id]
    package = rt.load(path, threads=1)
    sources = _ids(tok, SOURCES)
    beam = dict(num_beams=2, max_new_tokens=NEW_TOKENS)
    # (batch, our settings, transformers' settings)
    runs = [
        (1, dict(max_new_tokens=NEW_TOKENS), dict(max_new_tokens=NEW_TOKENS)),
        (3, dict(max_new_tokens=NEW_TOKENS), dict(max_new_tokens=NEW_TOKENS)),
        (1, dict(beam, strategy="beam"), beam),
        (3, dict(beam, strategy="beam"), beam),
        (3, dict(max_new_tokens=NEW_TOKENS, max_length=10), dict(max_length=10)),  # the decoder start counts
    ]
    wants = [_hf_generate(reference, tok, SOURCES[:batch], **theirs) for batch, _, theirs in runs]
    assert all(row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id for want in wants for row in want)
    assert len(wants[0][0]) == NEW_TOKENS and len(wants[4][0]) == 9  # the forced eos is the last allowed token
    assert len({t for want in wants for row in want for t in row}) > 3  # not one token
    got = [[g.token_ids[0] for g in package.generate_ids(sources[:batch], **ours)] for batch, ours, _ in runs]
    assert got == wants
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")
    script = NODE_GENERATE % (NODE_DIR / "model.js").as_posix()
    out = subprocess.run(["node", "--input-type=module", "-e", script, str(path), json.dumps(sources),
                          json.dumps([[batch, ours] for batch, ours, _ in runs])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == wants


@pytest.mark.slow
def test_a_decoder_only_model_forces_as_transformers_does(tmp_path):
    """A Llama (the built decoder graph, whose greedy choice is computed in the graph: a forced
    step reads the logits instead) with forced bos and eos in generation_config.json: transformers
    forces bos only after a one-token input, eos as the last allowed token; left-padded batch and
    a one-token prompt, greedy and 2-beam, Python and Node."""
    from hf_support import save_hf, torch
    from onnxformer.export.exporter import export_checkpoint
    from test_hf_decoders import PROMPTS, _hf_model, _ids
    import onnxformer.runtime as rt

    model, tok = _hf_model("llama")
    forced_bos = _ids(tok, ["cat"])[0][-1]
    model.generation_config.forced_bos_token_id = forced_bos
    model.generation_config.forced_eos_token_id = tok.eos_token_id
    folder = save_hf(model, tok, tmp_path / "llama")
    reference = type(model).from_pretrained(folder).eval()
    report = export_checkpoint(folder, tmp_path / "pkg")
    assert report.decoder_graph == "built"
    prompts = [*_ids(tok, PROMPTS), [tok.bos_token_id]]
    eos = tok.eos_token_id

    def hf(batch: list[list[int]], beams: int) -> list[list[int]]:
        width = max(map(len, batch))  # left-padded, as generate() takes a decoder-only batch
        inputs = dict(input_ids=torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in batch]),
                      attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch]))
        with torch.no_grad():
            out = reference.generate(**inputs, do_sample=False, num_beams=beams, max_new_tokens=NEW_TOKENS,
                                     pad_token_id=tok.pad_token_id)
        rows = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [row[:row.index(eos) + 1] if eos in row else row for row in rows]

    runs = [(prompts[:3], 1), (prompts[3:], 1), (prompts[1:3], 2), (prompts[3:], 2)]
    wants = [hf(batch, beams) for batch, beams in runs]
    assert wants[1][0][0] == forced_bos and all(row[-1] == eos for want in wants for row in want)
    assert all(row[0] != forced_bos for row in wants[0])  # a longer prompt: no forced bos
    options = [dict(max_new_tokens=NEW_TOKENS) if beams == 1 else
               dict(strategy="beam", num_beams=beams, max_new_tokens=NEW_TOKENS) for _, beams in runs]
    package = rt.load(report.path, threads=1)
    got = [[g.token_ids[0] for g in package.generate_ids(batch, **opts)] for (batch, _), opts in zip(runs, options)]
    assert got == wants
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")
    script = NODE_GENERATE.replace("prompts.slice(0, batch)", "batch") % (NODE_DIR / "model.js").as_posix()
    out = subprocess.run(["node", "--input-type=module", "-e", script, str(report.path), "[]",
                          json.dumps([[batch, opts] for (batch, _), opts in zip(runs, options)])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == wants


NODE_LOAD = """
import { load } from '%s';
try { await load(process.argv[1]); console.log('loaded'); } catch (err) { console.log(err.code, err.message); }
"""


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("forced_bos_token_id", 10 ** 4), ("forced_eos_token_id", [2, 10 ** 4]),
                                        ("forced_bos_token_id", -2), ("max_length", "long")])
def test_bad_manifest_defaults_are_the_package_s_fault(bart_package, tmp_path, key, value):
    import onnxformer.runtime as rt
    from onnxformer.runtime.errors import PackageError

    package = Path(shutil.copytree(bart_package[2], tmp_path / "pkg"))
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["generation"][key] = value
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=key if key == "max_length" or value == -2 else "10000") as err:
        rt.load(package)
    assert err.value.code == "E_MANIFEST"
    if HAS_NODE:
        out = subprocess.run(["node", "--input-type=module", "-e", NODE_LOAD % (NODE_DIR / "model.js").as_posix(),
                              str(package)], capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith("E_MANIFEST") and (key in out.stdout or "10000" in out.stdout), out.stdout
