"""Validation of exported graphs against the PyTorch model they came from.

Numeric: every graph runs in onnxruntime and in PyTorch on the same fresh random inputs,
covering batch 1 and left-padded batches, P = 0 and P > 0, T = 1 and T > 1; the figure is the
max abs difference over all outputs. A decoder of the "shared" KV-cache layout is checked as a
runtime drives it: right-padded prompts of different lengths, then several steps, once with
the cache buffers updated in place (I/O binding) and once fed back by copy (a runtime without
binding), against PyTorch on each row alone. Generation: greedy decoding through the package with the
runtime (torch-free), at batch 1 and in a padded batch, must equal greedy decoding in PyTorch of
each prompt alone, token for token.

PyTorch's side runs first and once (`torch_reference` -> `Reference`); onnxruntime's side
(`validate_package_graphs`) checks the fp32 graphs and any converted variant against it. The
exporter can then release the model's weights before a session opens: the export never
holds both (for a 1.1B model, 4.4 GB each).

The figures come back as a dict; a graph that breaks the contract outright (an output of the
wrong shape, an in-graph greedy choice that is not the argmax of its own logits) raises
ValidationError (E_VALIDATION) with the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxformer.runtime.contract import (
    ATTENTION_MASK,
    CROSS_ATTENTION,
    DECODER,
    ENCODER,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LOGITS,
    NEXT_TOKEN,
    NEXT_TOKEN_LOGPROB,
    POSITION_IDS,
    SEQUENCE_LENGTHS,
    TOKEN_TYPE_IDS,
    Dims,
    GraphSpec,
    parse_cache_name,
    past_name_for,
)
from onnxformer.runtime.errors import ValidationError
from onnxformer.runtime.generation import GenerationConfig, resolve_config

from .graphs import graph_module, run_torch

log = logging.getLogger(__name__)

# (batch, new tokens T or S, past P, source S) per graph; padded rows whenever batch > 1.
CASES = {
    ENCODER: [(1, 7, 0, 0), (3, 9, 0, 0)],
    CROSS_ATTENTION: [(1, 0, 0, 6), (3, 0, 0, 8)],
    DECODER: [(1, 5, 0, 6), (3, 4, 0, 7), (1, 1, 6, 5), (3, 1, 5, 9), (2, 3, 4, 4)],
}


def _left_padded_mask(batch: int, length: int) -> np.ndarray:
    """Row r has min(r, length - 1) pads on the left: batch 1 has none."""
    mask = np.ones((batch, length), dtype=np.int64)
    for r in range(batch):
        mask[r, : min(r, length - 1)] = 0
    return mask


def _fp16_exact(values: np.ndarray) -> np.ndarray:
    """float32 values that float16 represents exactly: an fp16 graph's inputs are then the ones
    PyTorch's reference ran on."""
    return values.astype(np.float16).astype(np.float32)


def example_feeds(
    spec: GraphSpec, dims: Dims, *, batch: int, new: int, past: int, source: int, seed: int = 0,
    float_dtype: str = "float32",
) -> dict[str, np.ndarray]:
    """Random, well-formed inputs for `spec` (consistent masks and positions)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    if spec.name == ENCODER:
        mask = _left_padded_mask(batch, new)
        feeds[INPUT_IDS] = rng.integers(0, dims.vocab_size, (batch, new), dtype=np.int64)
        feeds[ATTENTION_MASK] = mask
        if TOKEN_TYPE_IDS in spec.input_names:
            feeds[TOKEN_TYPE_IDS] = (np.arange(new)[None, :] >= new // 2).astype(np.int64).repeat(batch, 0)
    elif spec.name == CROSS_ATTENTION:
        feeds[ENCODER_HIDDEN_STATES] = _fp16_exact(rng.standard_normal((batch, source, dims.d_model))).astype(float_dtype)
    else:
        mask = _left_padded_mask(batch, past + new)
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, past:]  # (B, T)
        feeds[INPUT_IDS] = rng.integers(0, dims.vocab_size, (batch, new), dtype=np.int64)
        feeds[ATTENTION_MASK] = mask
        feeds[POSITION_IDS] = positions.astype(np.int64)
        if ENCODER_ATTENTION_MASK in spec.input_names:
            feeds[ENCODER_ATTENTION_MASK] = _left_padded_mask(batch, source)
        for t in spec.inputs:
            parsed = parse_cache_name(t.name)
            if parsed is None:
                continue
            length = source if parsed[2] == "encoder" else past
            shape = (batch, dims.n_kv_heads, length, dims.d_head)  # (B, Hkv, P or S, Dh)
            feeds[t.name] = _fp16_exact(rng.standard_normal(shape)).astype(float_dtype)
    return feeds


# Prompt lengths per row and decode steps, for the "shared" layout's decoder.
SHARED_CASES = [([5], 2), ([4, 1, 7], 3), ([2, 6], 2)]
GREEDY_NEW_TOKENS = 12


@dataclass
class SharedCase:
    """One SHARED_CASES run: right-padded prompts of `lens`, then `new_tokens` (steps, B, 1) one
    per step; `fixed`: the encoder inputs (float32); `want`: PyTorch's last-token logits per step."""

    lens: list[int]
    right: np.ndarray
    new_tokens: np.ndarray
    fixed: dict[str, np.ndarray]
    want: list[np.ndarray]


@dataclass
class Reference:
    """PyTorch's side of the validation: its outputs on the validation inputs, computed once
    (`torch_reference`) before any onnxruntime session opens. The fp32 graphs and their
    converted variants (fp16, int8, int4) are checked against the same figures, and the
    model's weights need not stay in memory beside a session's."""

    graphs: dict[str, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]  # graph -> (feeds, outputs) per CASES
    shared: list[SharedCase] | None  # the "shared" layout's decoder
    greedy: list[tuple[list[list[int]], list[list[int]]]]  # (prompts, PyTorch's tokens for each alone): batch 1, padded
    generation: GenerationConfig | None


def _shared_reference(model, spec: GraphSpec, dims: Dims) -> list[SharedCase]:
    """PyTorch's logits for SHARED_CASES, each row alone (its prompt, then its tokens one step
    at a time): what the graph's padded batch must reproduce row by row. Rows alone also keep
    PyTorch on its batch-1 kernels; CPU matrix products of 2-8 rows ran 10x slower per row."""
    import torch

    from onnxformer.modeling.model import empty_past

    config, cases = model.config, []
    for seed, (lens, steps) in enumerate(SHARED_CASES):
        rng = np.random.default_rng(100 + seed)
        batch, width = len(lens), max(lens)
        prompts = [rng.integers(0, dims.vocab_size, n) for n in lens]
        new_tokens = rng.integers(0, dims.vocab_size, (steps, batch, 1))
        right = np.zeros((batch, width), np.int64)
        for b, p in enumerate(prompts):
            right[b, :len(p)] = p
        fixed: dict[str, np.ndarray] = {}
        cross = encoder_mask = None
        if ENCODER_ATTENTION_MASK in spec.input_names:
            source = 3 + seed
            encoder_mask = _left_padded_mask(batch, source)
            hidden = _fp16_exact(rng.standard_normal((batch, source, dims.d_model)))
            with torch.no_grad():
                cross = model.cross_kv(torch.from_numpy(hidden))
            fixed[ENCODER_ATTENTION_MASK] = encoder_mask
            for i, kv in enumerate(cross):
                key, value = (t.numpy() for t in kv)
                fixed[f"past_key_values.{i}.encoder.key"], fixed[f"past_key_values.{i}.encoder.value"] = key, value
        want = [np.zeros((batch, dims.vocab_size), np.float32) for _ in range(steps + 1)]
        for b, prompt in enumerate(prompts):
            row_cross = row_mask = None
            if cross is not None:
                row_cross = tuple(type(kv)(*(t[b:b + 1] for t in kv)) for kv in cross)
                row_mask = torch.from_numpy(encoder_mask[b:b + 1])
            past, ids, length = empty_past(config, 1), prompt[None, :], 0
            for k in range(steps + 1):
                length += ids.shape[1]
                positions = np.arange(length - ids.shape[1], length)[None, :]
                with torch.no_grad():
                    out = model.decode(torch.from_numpy(ids), attention_mask=torch.ones((1, length), dtype=torch.int64),
                                       position_ids=torch.from_numpy(positions), past=past, cross_kv=row_cross,
                                       encoder_attention_mask=row_mask)
                want[k][b] = out.logits[0, -1].float().numpy()
                past = out.present
                if k < steps:
                    ids = new_tokens[k, b][None, :]
        cases.append(SharedCase(lens, right, new_tokens, fixed, want))
    return cases


def _greedy_prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    low = 5 if vocab_size > 10 else 0
    return [rng.integers(low, vocab_size, n).tolist() for n in (6, 3, 9)]


def _greedy_config(special: dict[str, int], package_defaults: dict[str, Any]) -> GenerationConfig:
    """Greedy with the package's defaults (forced tokens, ...), as the runtime resolves them."""
    eos = [special["eos"]] if special.get("eos", -1) >= 0 else []
    config = GenerationConfig(strategy="greedy", max_new_tokens=GREEDY_NEW_TOKENS, eos_token_ids=tuple(eos),
                              pad_token_id=max(special.get("pad", 0), 0))
    return resolve_config(config, {}, package_defaults)


def torch_reference(model, specs: dict[str, GraphSpec], dims: Dims, special: dict[str, int], *,
                    generation: bool, package_defaults: dict[str, Any]) -> Reference:
    """PyTorch's outputs for every check `validate_package_graphs` makes (float32 specs);
    `package_defaults`: the manifest's generation defaults, which the runtime will apply."""
    from onnxformer.modeling.generate import generate

    graphs, shared = {}, None
    for name, spec in specs.items():
        if SEQUENCE_LENGTHS in spec.input_names:
            shared = _shared_reference(model, spec, dims)
            continue
        module, cases = graph_module(model, spec), []
        for seed, (batch, new, past, source) in enumerate(CASES[name]):
            feeds = example_feeds(spec, dims, batch=batch, new=new, past=past, source=source, seed=seed)
            want = run_torch(module, spec, feeds)
            cases.append((feeds, {out: want[out].float().numpy() for out in spec.output_names}))
        graphs[name] = cases
    greedy, config = [], None
    if generation and dims.arch != "encoder":
        config = _greedy_config(special, package_defaults)
        prompts = _greedy_prompts(model.config.vocab_size)
        # PyTorch generates for each prompt alone: the package's batch of one and its padded
        # batch must both give each prompt's own tokens (and PyTorch stays on batch-1 kernels)
        alone = [generate(model, [prompt], config)[0][0] for prompt in prompts]
        greedy = [([prompts[0]], alone[:1]), (prompts, alone)]
    return Reference(graphs, shared, greedy, config)


def _shared_decoder_parity(reference: list[SharedCase], session: ort.InferenceSession, spec: GraphSpec, dims: Dims,
                           float_dtype: str) -> float:
    """Max abs logits difference of a "shared" layout decoder vs PyTorch, over SHARED_CASES,
    with the cache updated in place (I/O binding) and fed back by copy (plain session.run)."""
    worst = 0.0
    for case in reference:
        lens, right, new_tokens, want = case.lens, case.right, case.new_tokens, case.want
        batch, steps = len(lens), len(new_tokens)
        capacity = max(lens) + steps + 1
        fixed = {name: value.astype(float_dtype) if value.dtype.kind == "f" else value
                 for name, value in case.fixed.items()}
        caches = [(t.name, np.zeros((batch, dims.n_kv_heads, capacity, dims.d_head), float_dtype))
                  for t in spec.inputs if parse_cache_name(t.name) and parse_cache_name(t.name)[2] != "encoder"]
        for in_place in (True, False):
            buffers = {name: array.copy() for name, array in caches}
            binding = session.io_binding()
            if in_place:
                for name in (LOGITS, NEXT_TOKEN, NEXT_TOKEN_LOGPROB):
                    binding.bind_output(name)
                for name, array in buffers.items():
                    value = ort.OrtValue.ortvalue_from_numpy(array)
                    binding.bind_ortvalue_input(name, value)
                    binding.bind_ortvalue_output(name.replace("past_key_values", "present", 1), value)
            lengths = np.array(lens, np.int64)
            for k in range(steps + 1):
                feeds = {INPUT_IDS: right if k == 0 else new_tokens[k - 1], SEQUENCE_LENGTHS: lengths + k, **fixed}
                if in_place:
                    for name, value in feeds.items():
                        binding.bind_cpu_input(name, value)
                    session.run_with_iobinding(binding)
                    logits, token, logprob = (value.numpy() for value in binding.get_outputs()[:3])
                else:
                    outputs = dict(zip(spec.output_names, session.run(spec.output_names, {**feeds, **buffers})))
                    logits, token, logprob = outputs[LOGITS], outputs[NEXT_TOKEN], outputs[NEXT_TOKEN_LOGPROB]
                    buffers = {past_name_for(name): value for name, value in outputs.items() if parse_cache_name(name)}
                logits = logits.astype(np.float32)
                if not np.isfinite(logits).all():
                    return float("inf")
                worst = max(worst, float(np.abs(logits - want[k]).max()))
                # The in-graph greedy choice: exactly the argmax of the graph's own logits, and
                # its log-probability against PyTorch's log_softmax at that token.
                if not np.array_equal(token, np.argmax(logits, axis=1)):
                    top2 = np.sort(logits, axis=1)[:, -2:]
                    raise ValidationError(
                        f"{spec.file} {NEXT_TOKEN} {token.tolist()} is not the argmax of the graph's own logits "
                        f"{np.argmax(logits, axis=1).tolist()} (they must be equal exactly; the top two logits per "
                        f"row differ by {np.round(top2[:, 1] - top2[:, 0], 7).tolist()}; step {k}, prompt lengths {lens})")
                expected = want[k].astype(np.float64)
                top = expected.max(axis=1, keepdims=True)
                expected = expected - top - np.log(np.exp(expected - top).sum(axis=1, keepdims=True))
                worst = max(worst, float(np.abs(logprob - expected[np.arange(batch), token]).max()))
    return worst


def numeric_parity(reference: Reference, sessions: dict[str, ort.InferenceSession], specs: dict[str, GraphSpec],
                   dims: Dims) -> dict[str, float]:
    """Max abs difference ONNX vs PyTorch per graph, over all CASES."""
    figures: dict[str, float] = {}
    for name, spec in specs.items():
        session = sessions[name]
        if SEQUENCE_LENGTHS in spec.input_names:
            figures[name] = _shared_decoder_parity(reference.shared, session, spec, dims, spec.outputs[0].dtype)
            continue
        float_dtype = next((t.dtype for t in spec.inputs if t.dtype != "int64"), spec.outputs[0].dtype)
        worst = 0.0
        for (batch, new, past, source), (feeds, want) in zip(CASES[name], reference.graphs[name]):
            feeds = {k: v.astype(float_dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}
            got = dict(zip(spec.output_names, session.run(spec.output_names, feeds)))
            for out in spec.output_names:
                a, b = got[out].astype(np.float32), want[out]
                if a.shape != b.shape:
                    raise ValidationError(f"{spec.file} {out}: shape {a.shape} vs PyTorch {b.shape} (they must be "
                                          f"equal; batch {batch}, new {new}, past {past}, source {source})")
                if not np.isfinite(a).all():
                    return {**figures, name: float("inf")}
                worst = max(worst, float(np.abs(a - b).max()))
        figures[name] = worst
    return figures


def greedy_parity(reference: Reference, loaded) -> dict[str, Any]:
    """Greedy through the package loaded by the runtime vs PyTorch's (`reference`); batch 1 and
    a padded batch."""
    compared, mismatches = 0, []
    for batch, want in reference.greedy:
        got = [g.token_ids[0] for g in loaded.generate_ids(batch, reference.generation)]
        compared += sum(len(w) for w in want)
        mismatches += [(p, w, g) for p, w, g in zip(batch, want, got) if w != g]
    return {"greedy_tokens_compared": compared, "greedy_match": not mismatches,
            "greedy_mismatches": [f"prompt {p}: torch {w} onnx {g}" for p, w, g in mismatches][:3]}


def validate_package_graphs(
    reference: Reference, package: Path, specs: dict[str, GraphSpec], dims: Dims, *,
    atol: float | None, label: str, manifest=None,
) -> dict[str, Any]:
    """All checks for one set of graphs against PyTorch's `reference`, on the package as the
    runtime loads it (its sessions and its search); `atol=None` measures without a pass/fail
    bound. `manifest`: the staged package's manifest, not yet written (rt.load takes it in memory)."""
    import onnxformer.runtime as rt

    # fast_start=False: weights prepacked one at a time; on all threads each one's mapped file
    # pages and packed copy are held at once (a load peak of about twice the weights)
    loaded = rt.load(package, verify=False, manifest=manifest, fast_start=False)
    diffs = numeric_parity(reference, loaded.sessions, specs, dims)
    worst = max(diffs.values())
    result: dict[str, Any] = {"max_abs_diff": diffs, "worst_abs_diff": worst}
    passed = bool(np.isfinite(worst))
    if atol is not None:
        result["atol"] = atol
        passed = passed and worst <= atol
    if reference.greedy and passed:
        result.update(greedy_parity(reference, loaded))
        if atol is not None:
            passed = passed and result["greedy_match"]
    result["passed"] = passed
    log.info("%s validation: %s", label, result)
    return result
