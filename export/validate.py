"""Validation of exported graphs against the PyTorch model they came from.

Numeric: every graph runs in onnxruntime and in PyTorch on the same fresh random inputs,
covering batch 1 and left-padded batches, P = 0 and P > 0, T = 1 and T > 1; the figure is the
max abs difference over all outputs. Generation: greedy decoding through the package with the
runtime (torch-free) must equal greedy decoding in PyTorch, token for token.
"""

from __future__ import annotations

import logging
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
    POSITION_IDS,
    TOKEN_TYPE_IDS,
    Dims,
    GraphSpec,
    parse_cache_name,
)

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
        feeds[ENCODER_HIDDEN_STATES] = rng.standard_normal((batch, source, dims.d_model)).astype(float_dtype)
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
            feeds[t.name] = rng.standard_normal(shape).astype(float_dtype)
    return feeds


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def numeric_parity(model, package: Path, specs: dict[str, GraphSpec], dims: Dims) -> dict[str, float]:
    """Max abs difference ONNX vs PyTorch per graph, over all CASES."""
    figures: dict[str, float] = {}
    for name, spec in specs.items():
        session = _session(package / spec.file)
        module = graph_module(model, spec)
        float_dtype = next((t.dtype for t in spec.inputs if t.dtype != "int64"), spec.outputs[0].dtype)
        worst = 0.0
        for seed, (batch, new, past, source) in enumerate(CASES[name]):
            feeds = example_feeds(spec, dims, batch=batch, new=new, past=past, source=source, seed=seed,
                                  float_dtype=float_dtype)
            got = dict(zip(spec.output_names, session.run(spec.output_names, feeds)))
            want = run_torch(module, spec, {k: v.astype(np.float32) if v.dtype == np.float16 else v
                                            for k, v in feeds.items()})
            for out in spec.output_names:
                a = got[out].astype(np.float32)
                b = want[out].float().numpy()
                if a.shape != b.shape:
                    raise AssertionError(f"{spec.file} {out}: shape {a.shape} vs PyTorch {b.shape}")
                if not np.isfinite(a).all():
                    return {**figures, name: float("inf")}
                worst = max(worst, float(np.abs(a - b).max()))
        figures[name] = worst
    return figures


def greedy_parity(model, package: Path, special: dict[str, int], *, max_new_tokens: int = 12) -> dict[str, Any]:
    """Greedy through the package (runtime, onnxruntime) vs PyTorch; batch 1 and a padded batch."""
    import onnxformer.runtime as rt
    from onnxformer.modeling.generate import generate
    from onnxformer.runtime.generation import GenerationConfig

    config = model.config
    rng = np.random.default_rng(1234)
    low = 5 if config.vocab_size > 10 else 0
    prompts = [rng.integers(low, config.vocab_size, n).tolist() for n in (6, 3, 9)]
    eos = [special["eos"]] if special.get("eos", -1) >= 0 else []
    gen = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos),
                           pad_token_id=max(special.get("pad", 0), 0))
    loaded = rt.load(package, verify=False)
    compared, mismatches = 0, []
    for batch in ([prompts[0]], prompts):
        want = [seqs[0] for seqs in generate(model, batch, gen)]
        got = [seqs[0] for seqs in loaded.generate_ids(batch, gen).sequences]
        compared += sum(len(w) for w in want)
        mismatches += [(p, w, g) for p, w, g in zip(batch, want, got) if w != g]
    return {"greedy_tokens_compared": compared, "greedy_match": not mismatches,
            "greedy_mismatches": [f"prompt {p}: torch {w} onnx {g}" for p, w, g in mismatches][:3]}


def validate_package_graphs(
    model, package: Path, specs: dict[str, GraphSpec], dims: Dims, special: dict[str, int], *,
    atol: float | None, generation: bool, label: str,
) -> dict[str, Any]:
    """All checks for one set of graphs; `atol=None` measures without a pass/fail bound."""
    diffs = numeric_parity(model, package, specs, dims)
    worst = max(diffs.values())
    result: dict[str, Any] = {"max_abs_diff": diffs, "worst_abs_diff": worst}
    passed = bool(np.isfinite(worst))
    if atol is not None:
        result["atol"] = atol
        passed = passed and worst <= atol
    if generation and dims.arch != "encoder" and passed:
        result.update(greedy_parity(model, package, special))
        if atol is not None:
            passed = passed and result["greedy_match"]
    result["passed"] = passed
    log.info("%s validation: %s", label, result)
    return result
