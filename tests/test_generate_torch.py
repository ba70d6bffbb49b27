"""PyTorch reference generation: the ground truth the runtime is held to."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch)")

from onnxformer.modeling.generate import generate  # noqa: E402
from onnxformer.runtime.generation import GenerationConfig  # noqa: E402

from support import make_model  # noqa: E402

DECODERS = ["decoder", "prefix-lm", "encoder-decoder"]
PROMPTS = [[5, 9, 13, 2 + 20, 7], [11, 4], [8, 30, 31, 32, 33, 34, 35]]


def naive_greedy(model, prompt, steps, eos):
    """No cache, no batching: a full forward over the whole sequence for every token."""
    c = model.config
    if c.arch == "encoder-decoder":
        kv = model.cross_kv(model.encode(torch.tensor([prompt])))
        seq = [c.start_token_id]
    else:
        seq = list(prompt)
    out = []
    for _ in range(steps):
        ids = torch.tensor([seq])
        if c.arch == "encoder-decoder":
            logits = model.decode(ids, cross_kv=kv).logits
        elif c.arch == "prefix-lm":
            prefix = torch.tensor([[i < len(prompt) for i in range(len(seq))]])
            logits = model.decode(ids, prefix_mask=prefix).logits
        else:
            logits = model.decode(ids).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out


@pytest.mark.parametrize("arch", DECODERS)
def test_cached_batched_greedy_equals_naive_loop(arch):
    model, _ = make_model(arch)
    cfg = GenerationConfig(max_new_tokens=10, eos_token_ids=(2,), pad_token_id=0)
    with torch.no_grad():
        batched = generate(model, PROMPTS, cfg)
        for prompt, got in zip(PROMPTS, batched):
            assert got[0] == naive_greedy(model, prompt, 10, {2})
            assert generate(model, [prompt], cfg)[0] == got  # alone == in a padded batch


@pytest.mark.parametrize("arch", DECODERS)
def test_beam_with_one_beam_equals_greedy(arch):
    model, _ = make_model(arch)
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_ids=(2,)))
    beam = generate(model, PROMPTS, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=8,
                                                     eos_token_ids=(2,), length_penalty=0.0))
    assert beam == greedy


def test_beam_search_finds_higher_likelihood_than_greedy():
    model, _ = make_model("decoder", seed=3)
    prompt = [PROMPTS[0]]
    g = generate(model, prompt, GenerationConfig(max_new_tokens=6))[0][0]
    b = generate(model, prompt, GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=6,
                                                 length_penalty=0.0, num_return_sequences=3))[0]
    assert len(b) == 3 and all(len(s) == 6 for s in b)

    def logprob(seq):
        ids = torch.tensor([prompt[0] + seq])
        lp = model.decode(ids).logits.log_softmax(-1)[0]
        return sum(float(lp[len(prompt[0]) - 1 + i, t]) for i, t in enumerate(seq))

    with torch.no_grad():
        assert logprob(b[0]) >= logprob(g) - 1e-5
        assert logprob(b[0]) >= logprob(b[1]) - 1e-5 >= logprob(b[2]) - 2e-5


@pytest.mark.parametrize("arch", DECODERS)
def test_seeded_sampling_is_reproducible(arch):
    model, _ = make_model(arch)
    cfg = GenerationConfig(strategy="sample", temperature=1.5, top_k=50, top_p=0.95, seed=7,
                           max_new_tokens=12, num_return_sequences=2)
    a = generate(model, PROMPTS, cfg)
    assert a == generate(model, PROMPTS, cfg)
    assert a != generate(model, PROMPTS, cfg.replace(seed=8))


def test_top_k_one_sampling_equals_greedy():
    model, _ = make_model("decoder")
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    sampled = generate(model, PROMPTS, GenerationConfig(strategy="sample", top_k=1, seed=1, max_new_tokens=8))
    assert sampled == greedy


def test_generation_refuses_encoder_and_empty_prompts():
    model, _ = make_model("encoder")
    with pytest.raises(ValueError, match="no decoder"):
        generate(model, PROMPTS, GenerationConfig())
    model, _ = make_model("decoder")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], GenerationConfig())
