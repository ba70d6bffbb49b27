"""The "shared" KV-cache layout: the decoder graph written for onnxruntime's fused operators
(export/builder.py), its runtime step model (runtime/session_steps.py `SharedSteps`) and the
choice of layout at export.

Every model here is exported twice, "shared" and "concat" (the traced graph): the two are
independent paths from the same PyTorch model, so equal tokens for every strategy is a strong
check of both, on top of the PyTorch parity the exporter itself validates.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from export_checks import check_package
from support import HAS_TORCH, ForwardingSteps, make_model

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="exporting needs the [train] extra (torch)")

# d_model 64 with 4 heads: head size 16, the smallest GroupQueryAttention takes.
MODELS = {
    "rope-gqa": ("decoder", "rope", dict(n_kv_heads=2)),
    "learned-rms-swiglu": ("decoder", "learned", dict(n_kv_heads=4, norm="rmsnorm", activation="swiglu")),
    "sinusoidal-post-nobias": ("decoder", "sinusoidal", dict(n_kv_heads=1, norm_position="post", bias=False)),
    "rope-untied": ("decoder", "rope", dict(n_kv_heads=4, tie_embeddings=False, norm="rmsnorm")),
    "seq2seq-learned": ("encoder-decoder", "learned", dict(n_kv_heads=4)),
    "seq2seq-rope-post": ("encoder-decoder", "rope", dict(n_kv_heads=4, norm_position="post")),
}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """name -> (model, {"shared": Model, "concat": Model}, {"shared": report, ...})."""
    import onnxformer.runtime as rt
    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            arch, pos, overrides = MODELS[name]
            model, tok = make_model(arch, pos, d_model=64, seed=3, **overrides)
            root = tmp_path_factory.mktemp(name)
            save_tokenizer(tok, root / "tokenizer.json")
            loaded, reports = {}, {}
            for layout in ("shared", "concat"):
                reports[layout] = export_model(model, root / "tokenizer.json", root / layout,
                                               ExportOptions(kv_cache=layout))
                loaded[layout] = rt.load(root / layout)
            cache[name] = (model, loaded, reports)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_pytorch(packages, name):
    model, loaded, reports = packages(name)
    shared = reports["shared"]
    assert shared.manifest.kv_cache == "shared" and shared.manifest.format_version == 2
    assert reports["concat"].manifest.kv_cache == "concat" and reports["concat"].manifest.format_version == 1
    assert shared.decoder_graph == "built" and reports["concat"].decoder_graph == "traced"
    for layout in ("shared", "concat"):  # greedy tokens equal, every step's logits within 1e-5 (computed here)
        check_package(model, reports[layout].path, atol=1e-5)
    written = json.loads((shared.path / "manifest.json").read_text())
    assert written["kv_cache"] == "shared" and written["format_version"] == 2
    assert written["producer"]["decoder_graph"] == "built"
    assert "sequence_lengths" in loaded["shared"].sessions["decoder"].get_inputs()[1].name


@pytest.mark.parametrize("name", ["rope-gqa", "seq2seq-learned"])
def test_the_graph_is_fused_and_small(packages, name):
    import onnx

    model, _, reports = packages(name)
    proto = onnx.load(str(reports["shared"].path / "decoder.onnx"))
    ops = Counter(node.op_type for node in proto.graph.node)
    layers = model.config.n_step_layers
    assert ops["GroupQueryAttention"] == layers
    assert ops["Concat"] == 0  # the cache is never concatenated
    assert ops["SkipLayerNormalization"] >= layers  # residual add + norm fused
    if model.config.arch == "encoder-decoder":
        assert ops["MultiHeadAttention"] == layers
    traced = onnx.load(str(reports["concat"].path / "decoder.onnx"))
    assert len(proto.graph.node) < 25 * layers + 30 < len(traced.graph.node)


PROMPTS = [[7, 8, 9, 10, 11], [12], [13, 14, 15], [30, 31, 32, 33, 34, 35, 36, 37]]
STRATEGIES = {
    "greedy": dict(strategy="greedy", max_new_tokens=10),
    "greedy-penalties": dict(strategy="greedy", max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "sample": dict(strategy="sample", max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=5,
                   num_return_sequences=3),
    "beam": dict(strategy="beam", max_new_tokens=8, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", ["rope-gqa", "learned-rms-swiglu", "seq2seq-rope-post"])
def test_shared_and_concat_generate_the_same(packages, name, strategy):
    """Batched prompts of different lengths (right-padded by the shared step, left-padded by
    the concat one), several sequences per prompt, beam reorders: same tokens either way."""
    from onnxformer.runtime.generation import GenerationConfig

    _, loaded, _ = packages(name)
    config = GenerationConfig(eos_token_ids=(), **STRATEGIES[strategy])
    shared = loaded["shared"].generate_ids(PROMPTS, config)
    concat = loaded["concat"].generate_ids(PROMPTS, config)
    assert [g.token_ids for g in shared] == [g.token_ids for g in concat]
    assert [g.finish_reasons for g in shared] == [g.finish_reasons for g in concat]
    np.testing.assert_allclose(np.array([g.scores for g in shared]), np.array([g.scores for g in concat]),
                               rtol=1e-4, atol=1e-4)


class LogitReads(ForwardingSteps):
    """Records, per step, whether the search read the logits (StepResult reads them only on
    first use)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reads = []

    def observe(self, result):
        from onnxformer.runtime.steps import StepResult

        step = len(self.reads)
        self.reads.append(False)

        def read():
            self.reads[step] = True
            return result.logits

        return StepResult(read, result.next_token, result.next_logprob)


@pytest.mark.parametrize("name", ["rope-gqa", "seq2seq-rope-post"])
def test_plain_greedy_takes_the_graphs_choice(packages, name):
    """The shared graph computes next_token / next_token_logprob: plain greedy never reads the
    V logits, and gives the tokens and (to float32 rounding) the scores of the concat package,
    whose choice numpy computes from the logits. Logits processing reads the logits for
    exactly the steps it applies to."""
    from onnxformer.runtime import generation as gen

    _, loaded, _ = packages(name)
    plain = gen.GenerationConfig(strategy="greedy", max_new_tokens=7, eos_token_ids=(), pad_token_id=0)

    def run(layout, config):
        steps = LogitReads(loaded[layout].step_model(capacity=16))
        return gen.generate(steps, PROMPTS, config), steps.reads

    shared, reads = run("shared", plain)
    assert reads == [False] * 7
    concat, _ = run("concat", plain)
    assert [g.token_ids for g in shared] == [g.token_ids for g in concat]
    np.testing.assert_allclose([g.scores for g in shared], [g.scores for g in concat], rtol=1e-5, atol=1e-5)
    assert run("shared", plain.replace(min_new_tokens=3, eos_token_ids=(2,)))[1] == [True] * 3 + [False] * 4
    penalised = plain.replace(repetition_penalty=1.5)
    out, reads = run("shared", penalised)
    assert reads == [True] * 7
    assert [g.token_ids for g in out] == [g.token_ids for g in run("concat", penalised)[0]]


@pytest.mark.parametrize("name", ["rope-gqa", "seq2seq-learned"])
def test_greedy_equals_pytorch_per_row(packages, name):
    """Each row of a padded batch continues exactly as it does alone in PyTorch."""
    from onnxformer.modeling.generate import generate
    from onnxformer.runtime.generation import GenerationConfig

    model, loaded, _ = packages(name)
    config = GenerationConfig(strategy="greedy", max_new_tokens=12, eos_token_ids=())
    got = loaded["shared"].generate_ids(PROMPTS, config)
    for prompt, row in zip(PROMPTS, got):
        assert row.token_ids == generate(model, [prompt], config)[0]


def test_text_api_and_stream(packages):
    _, loaded, _ = packages("rope-gqa")
    shared, concat = loaded["shared"], loaded["concat"]
    texts = ["the cat sat", "a quick brown fox jumps over"]
    assert [g.text for g in shared.generate(texts, max_new_tokens=6)] == \
           [g.text for g in concat.generate(texts, max_new_tokens=6)]
    assert "".join(shared.stream("the cat sat", max_new_tokens=6)) == shared.generate("the cat sat", max_new_tokens=6)[0].text


def test_the_cache_is_updated_in_place_and_grows_when_needed(packages):
    """The buffers bound as past are the presents (written by the graph, no new tensors per
    step); a generation longer than the capacity hint grows them and stays correct."""
    from onnxformer.runtime import generation as gen
    from onnxformer.runtime.generation import GenerationConfig

    _, loaded, _ = packages("rope-gqa")
    model = loaded["shared"]
    steps = model.step_model(capacity=8)
    result = steps.prefill([[7, 8], [9, 10, 11]])
    buffers = dict(steps._state.buffers)
    logits, token, logprob = result.logits.copy(), result.next_token.copy(), result.next_logprob.copy()
    steps.advance(token)  # the result's arrays are the step's output buffers: copied before this
    assert steps._state.buffers == buffers  # the same OrtValues: the graph wrote into them
    key = buffers["past_key_values.0.key"].numpy()  # (N, Hkv, C, Dh)
    assert np.abs(key[0, :, :3]).min() > 0 and np.abs(key[1, :, :4]).min() > 0  # right-padded: 3 and 4 tokens
    assert not key[0, :, 3:].any() and not key[1, :, 4:].any()
    assert logits.shape == (2, model.dims.vocab_size)
    # The graph's greedy choice is the argmax of these logits and its log-softmax value.
    assert token.tolist() == np.argmax(logits, axis=1).tolist()
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(logprob, -np.log(np.exp(shifted).sum(axis=1)), rtol=1e-5, atol=1e-6)
    # Past the capacity: grown, same tokens as a generation sized from the start.
    config = GenerationConfig(strategy="greedy", max_new_tokens=9, eos_token_ids=(), pad_token_id=0)
    small = gen.generate(model.step_model(capacity=2), PROMPTS, config)
    assert [g.token_ids for g in small] == [g.token_ids for g in model.generate_ids(PROMPTS, config)]


def test_shared_buffers_are_cache_line_aligned(packages):
    """The KV buffers and the logits array the graph writes into start on 64-byte boundaries
    (numpy's own large arrays start 16 bytes past one), zeroed, also after growth."""
    from onnxformer.runtime.session_steps import aligned_zeros

    for shape, dtype in (((3, 4, 17, 16), np.float32), ((5,), np.float16), ((2, 8000), np.float32)):
        array = aligned_zeros(shape, dtype)
        assert array.ctypes.data % 64 == 0 and array.shape == shape and array.dtype == dtype and not array.any()
    _, loaded, _ = packages("rope-gqa")
    steps = loaded["shared"].step_model(capacity=2)
    steps.prefill([[5, 6], [7, 8, 9]])
    state = steps._state
    assert state.capacity > 2  # grown
    assert state.buffers and all(value.data_ptr() % 64 == 0 for value in state.buffers.values())
    assert state.logits_host.ctypes.data % 64 == 0


def test_layout_choice(tmp_path):
    """auto: shared (the built graph) where the builder can express the model, else concat (the
    traced one, with the reason); asking for shared where it cannot is an E_UNSUPPORTED error
    that names the way out."""
    from onnxformer.export.exporter import ExportError, ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    cases = [("prefix-lm", dict(d_model=64), "concat"), ("decoder", dict(d_model=32), "concat"),
             ("encoder", dict(d_model=64), "concat"), ("decoder", dict(d_model=64), "shared")]
    for k, (arch, overrides, layout) in enumerate(cases):
        model, tok = make_model(arch, "rope", **overrides)
        save_tokenizer(tok, tmp_path / f"tok{k}.json")
        report = export_model(model, tmp_path / f"tok{k}.json", tmp_path / f"p{k}",
                              ExportOptions(validate_generation=False))
        assert report.manifest.kv_cache == layout, (arch, overrides)
        producer = None if arch == "encoder" else "built" if layout == "shared" else "traced"
        assert report.decoder_graph == report.manifest.producer.get("decoder_graph") == producer
        if layout == "concat":
            expected = "has none" if arch == "encoder" else "cannot express this model: .*--kv-cache concat"
            with pytest.raises(ExportError, match=f"kv_cache 'shared' {'applies' if arch == 'encoder' else ''}.*{expected}") as err:
                export_model(model, tmp_path / f"tok{k}.json", tmp_path / f"q{k}", ExportOptions(kv_cache="shared"))
            assert err.value.code == "E_UNSUPPORTED"
            assert not (tmp_path / f"q{k}").exists()
    with pytest.raises(ExportError, match="kv_cache must be one of"):
        ExportOptions(kv_cache="paged")


@pytest.mark.parametrize("variant", [dict(quantize="int4"), dict(quantize="int8"), dict(dtype="float16")])
def test_variants_of_the_shared_graph(tmp_path, variant):
    """Quantized and fp16 variants are derived from the built graph and stay finite and close."""
    import onnx

    import onnxformer.runtime as rt
    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    model, tok = make_model("decoder", "rope", d_model=64, seed=3)
    save_tokenizer(tok, tmp_path / "tok.json")
    report = export_model(model, tmp_path / "tok.json", tmp_path / "p", ExportOptions(**variant))
    assert report.manifest.kv_cache == "shared"
    label = variant.get("quantize") or "float16"
    assert report.validation[label]["worst_abs_diff"] > 0  # measured and recorded
    check_package(model, report.path, atol=0.2, tokens_equal=False)  # against PyTorch, here
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "p" / "decoder.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == model.config.n_step_layers
    if "quantize" in variant:
        assert ops["MatMulNBits"] == 4 * model.config.n_step_layers  # qkv, o, up, down per layer (head tied)
    outputs = {o.name: o.type.tensor_type.elem_type for o in onnx.load(str(tmp_path / "p" / "decoder.onnx")).graph.output}
    assert outputs["next_token_logprob"] == onnx.TensorProto.FLOAT  # float32 in every variant, fp16 included
    from onnxformer.runtime.generation import GenerationConfig

    out = rt.load(tmp_path / "p").generate_ids(PROMPTS, GenerationConfig(max_new_tokens=5, eos_token_ids=()))
    assert all(len(g.token_ids[0]) == 5 for g in out)


def test_concurrent_generations_share_the_session_not_the_buffers(packages):
    """Each generation binds its own buffers: threads running at once on one loaded package
    get exactly the results of running one after another."""
    from concurrent.futures import ThreadPoolExecutor

    from onnxformer.runtime.generation import GenerationConfig

    _, loaded, _ = packages("seq2seq-learned")
    model = loaded["shared"]
    config = GenerationConfig(strategy="greedy", max_new_tokens=8, eos_token_ids=())
    jobs = [PROMPTS[k % len(PROMPTS):] + PROMPTS[:k % len(PROMPTS)] for k in range(8)]
    run = lambda job: [g.token_ids for g in model.generate_ids(job, config)]  # noqa: E731
    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential


def test_loading_without_fast_start_gives_the_same_model(packages):
    """fast_start (weights prepacked on all threads) only changes how the session starts."""
    import onnxformer.runtime as rt
    from onnxformer.runtime.generation import GenerationConfig

    _, loaded, reports = packages("rope-gqa")
    config = GenerationConfig(strategy="greedy", max_new_tokens=6, eos_token_ids=())
    slow = rt.load(reports["shared"].path, fast_start=False)
    assert slow.generate_ids(PROMPTS, config) == loaded["shared"].generate_ids(PROMPTS, config)


def test_fast_start_by_default_only_below_the_size_limit(packages, monkeypatch):
    """The default prepacks on all threads for small packages (cold start) and not for large
    ones, whose transient load peak would approach twice the weights."""
    import onnxformer.runtime.model as rt_model

    _, _, reports = packages("rope-gqa")
    seen = []
    real = rt_model._session
    monkeypatch.setattr(rt_model, "_session", lambda path, provider, threads, fast_start=True, spinning=True:
                        seen.append(fast_start) or real(path, provider, threads, fast_start, spinning))
    rt_model.load(reports["shared"].path)
    size = rt_model._package_bytes(rt_model.Manifest.load(reports["shared"].path))
    monkeypatch.setattr(rt_model, "FAST_START_LIMIT", size)  # this package is now "large"
    rt_model.load(reports["shared"].path)
    rt_model.load(reports["shared"].path, fast_start=True)  # asked for: kept
    assert seen == [True, False, True]
