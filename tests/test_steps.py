"""The step protocol (runtime/steps.py) on every step model: the eager PyTorch model
(modeling/generate.py TorchSteps) and the ONNX sessions of both KV-cache layouts
(runtime/session_steps.py).

The oracle is independent of every cache: the eager model run from scratch on a row's whole
sequence (no cache, no padding, no other rows). Rows are prefilled in a batch, advanced by one
and by K tokens, reordered, copied, released, and admitted into the running batch; after each
operation every row's logits must equal the oracle's. Then the one search drives a torch and an
ONNX step model side by side: per-step logits and final tokens agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from support import HAS_TORCH, ForwardingSteps, make_model

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="the eager model and the export need torch")

# name -> (arch, layout); d_model 64 (head size 16) so the "shared" layout applies
CASES = {
    "decoder-shared": ("decoder", "shared"),
    "decoder-concat": ("decoder", "concat"),
    "prefix-lm-concat": ("prefix-lm", "concat"),
    "encoder-decoder-shared": ("encoder-decoder", "shared"),
    "encoder-decoder-concat": ("encoder-decoder", "concat"),
}
PROMPTS = [[7, 8, 9, 10, 11], [12], [13, 14, 15], [30, 31, 32, 33, 34, 35, 36, 37]]
ATOL = 1e-4  # ONNX vs eager float32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import onnxformer.runtime as rt
    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            arch, layout = CASES[name]
            model, tok = make_model(arch, "rope", d_model=64, seed=5, n_kv_heads=4 if arch == "encoder-decoder" else 2)
            model.eval()
            root = tmp_path_factory.mktemp(name)
            save_tokenizer(tok, root / "tokenizer.json")
            report = export_model(model, root / "tokenizer.json", root / "package",
                                  ExportOptions(kv_cache=layout, validate_generation=False))
            assert report.manifest.kv_cache == layout
            cache[name] = (model, rt.load(report.path))
        return cache[name]

    return get


def oracle(model, prompt: list[int], fed: list[int]) -> np.ndarray:
    """Last-position logits of the row from scratch: prompt (the source for an encoder-decoder)
    then the fed tokens, one sequence alone, no cache. (V,)"""
    import torch

    c = model.config
    with torch.no_grad():
        if c.arch == "encoder-decoder":
            hidden = model.encode(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
            ids = torch.tensor([[c.start_token_id, *fed]])
            out = model.decode(ids, cross_kv=model.cross_kv(hidden))
        elif c.arch == "prefix-lm":  # the prompt is the bidirectional prefix, the rest causal
            ids = torch.tensor([prompt + fed])
            prefix = torch.tensor([[True] * len(prompt) + [False] * len(fed)])
            out = model.decode(ids, prefix_mask=prefix)
        else:
            out = model.decode(torch.tensor([prompt + fed]))
    return out.logits[0, -1].float().numpy()


class Rows:
    """What the test expects each running row to be: its prompt and the tokens fed since."""

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.fed: list[list[int]] = []

    def check(self, model, logits: np.ndarray, rows: range | None = None, at: int = -1) -> None:
        rows = rows if rows is not None else range(len(self.prompts))
        assert logits.shape[0] == len(rows)
        for i, r in enumerate(rows):
            fed = self.fed[r] if at == -1 else self.fed[r][:len(self.fed[r]) + at + 1]
            np.testing.assert_allclose(logits[i], oracle(model, self.prompts[r], fed), atol=ATOL, rtol=0)


def step_models(model, package):
    from onnxformer.modeling.generate import TorchSteps

    return {"torch": TorchSteps(model), "onnx": package.step_model(capacity=4)}  # small: the buffers grow


@pytest.mark.parametrize("name", list(CASES))
def test_every_operation_keeps_every_row_equal_to_the_row_alone(built, name):
    model, package = built(name)
    for label, steps in step_models(model, package).items():
        rows = Rows()
        rng = np.random.default_rng(0)
        tokens = lambda n, k=None: rng.integers(5, model.config.vocab_size, (n,) if k is None else (n, k))  # noqa: E731

        def feed(toks: np.ndarray) -> None:
            for r, row in enumerate(toks.reshape(len(rows.prompts), -1).tolist()):
                rows.fed[r].extend(row)

        # prefill a batch of prompts of different lengths
        result = steps.prefill(PROMPTS[:2])
        rows.prompts, rows.fed = [list(p) for p in PROMPTS[:2]], [[], []]
        rows.check(model, result.logits)
        assert result.next_token.tolist() == np.argmax(result.logits, axis=1).tolist(), label
        # advance by one token
        t = tokens(2)
        feed(t)
        rows.check(model, steps.advance(t).logits)
        # select: reorder and copy rows (beam search, several sequences per prompt)
        steps.select(np.array([1, 0, 0]))
        rows.prompts, rows.fed = [rows.prompts[i] for i in (1, 0, 0)], [list(rows.fed[i]) for i in (1, 0, 0)]
        t = tokens(3)
        feed(t)
        rows.check(model, steps.advance(t).logits)
        # admit new rows into the running batch: the result covers the new rows
        result = steps.prefill(PROMPTS[2:])
        rows.prompts += [list(p) for p in PROMPTS[2:]]
        rows.fed += [[], []]
        rows.check(model, result.logits, range(3, 5))
        assert steps.rows == 5
        t = tokens(5)
        feed(t)
        rows.check(model, steps.advance(t).logits)
        # advance by K tokens (verification): logits after each of the K
        t = tokens(5, 3)
        feed(t)
        result = steps.advance(t)
        assert result.logits.shape == (5, 3, model.config.vocab_size)
        for j in range(3):
            rows.check(model, result.logits[:, j], at=j - 3)
        assert result.next_token.tolist() == np.argmax(result.logits, axis=-1).tolist()
        # release finished rows; the rest keep their order
        steps.release([1, 3])
        rows.prompts = [p for i, p in enumerate(rows.prompts) if i not in (1, 3)]
        rows.fed = [f for i, f in enumerate(rows.fed) if i not in (1, 3)]
        t = tokens(3)
        feed(t)
        rows.check(model, steps.advance(t).logits)
        assert steps.rows == 3


class Recorder(ForwardingSteps):
    """Keeps each step's logits (read eagerly)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.logits = []

    def observe(self, result):
        self.logits.append(result.logits.copy())
        return result


SEARCHES = {
    "greedy": dict(strategy="greedy", max_new_tokens=8, repetition_penalty=1.2),
    "sample": dict(strategy="sample", max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=3,
                   num_return_sequences=2),
    "beam": dict(strategy="beam", max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.8),
}


@pytest.mark.parametrize("strategy", list(SEARCHES))
@pytest.mark.parametrize("name", ["decoder-shared", "prefix-lm-concat", "encoder-decoder-concat"])
def test_one_search_over_torch_and_onnx_step_models(built, name, strategy):
    """The same search over both step models: every step's logits agree, and so do the
    final tokens (the runtime's generate_ids included)."""
    from onnxformer.runtime import generation as G

    model, package = built(name)
    config = package.generation_config(G.GenerationConfig(eos_token_ids=(), **SEARCHES[strategy]))
    recorded = {label: Recorder(steps) for label, steps in step_models(model, package).items()}
    out = {label: G.generate(steps, PROMPTS, config) for label, steps in recorded.items()}
    torch_steps, onnx_steps = recorded["torch"].logits, recorded["onnx"].logits
    assert len(torch_steps) == len(onnx_steps) == config.max_new_tokens
    for a, b in zip(torch_steps, onnx_steps):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert [g.token_ids for g in out["torch"]] == [g.token_ids for g in out["onnx"]]
    assert [g.token_ids for g in package.generate_ids(PROMPTS, config)] == [g.token_ids for g in out["onnx"]]
    np.testing.assert_allclose([g.scores for g in out["torch"]], [g.scores for g in out["onnx"]], atol=1e-4)
    assert recorded["onnx"].rows == 0  # the search released its rows


def test_a_step_model_can_run_several_searches_one_after_another(built):
    from onnxformer.runtime import generation as G

    model, package = built("decoder-shared")
    steps = package.step_model()
    config = package.generation_config(max_new_tokens=5, eos_token_ids=())
    first = G.generate(steps, PROMPTS, config)
    assert G.generate(steps, PROMPTS, config) == first
    assert [g.token_ids for g in first] == [g.token_ids for g in package.generate_ids(PROMPTS, config)]


def test_the_protocol_refuses_bad_prompts_and_tokens(built):
    """prefill() takes prompts straight from a caller (a server): InputError with a code.
    advance() takes what a search or scheduler chose: a wrong shape or an id outside the
    vocabulary is that caller's bug, a plain ValueError."""
    from onnxformer.runtime.errors import InputError

    model, package = built("decoder-shared")
    for steps in step_models(model, package).values():
        with pytest.raises(InputError, match="out of range") as err:
            steps.prefill([[5, model.config.vocab_size]])
        assert err.value.code == "E_TOKEN_ID" and steps.rows == 0
        with pytest.raises(InputError, match="prompt 0 is empty"):
            steps.prefill([[]])
        steps.prefill([[5, 6], [7]])
        with pytest.raises(ValueError, match=r"\(N=2,\) or \(N=2, K\)"):
            steps.advance(np.array([1, 2, 3]))
        with pytest.raises(ValueError, match="vocabulary"):
            steps.advance(np.array([1, model.config.vocab_size]))
        assert steps.advance(np.array([1, 2])).logits.shape == (2, model.config.vocab_size)
