"""Independent checks of an exported package against the eager PyTorch model.

Nothing here reads the exporter's own figures (report.validation) or reuses its validator
(export/validate.py) or the runtime's step models: the package's graphs run in onnxruntime
directly, driven by a plain greedy loop written here from runtime/FORMAT.md (batch 1, the
cache fed back by copy), and the reference is PyTorch without any KV cache (the whole sequence
re-run every step). Equal greedy tokens and logits within a stated tolerance at every step
then check the graphs, their cache handling and their weights at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxformer.runtime.manifest import Manifest

# fp32 graphs vs PyTorch: max abs logits difference (measured 1e-7..1e-6 on the tiny models)
FP32_ATOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def onnx_greedy(package: Path, prompt: list[int], steps: int, source: list[int] | None = None
                ) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's last-position logits (V,), through the package's graphs."""
    manifest = Manifest.load(package)
    dims, float_dtype = manifest.dims, np.dtype(manifest.float_dtype)
    decoder = _session(package / manifest.graphs["decoder"].file.file)
    fixed: dict[str, np.ndarray] = {}
    if source is not None:  # encoder-decoder: the encoder and cross-attention K/V, once
        ids = np.array([source], np.int64)
        hidden = _run(_session(package / manifest.graphs["encoder"].file.file),
                      {"input_ids": ids, "attention_mask": np.ones_like(ids)})["last_hidden_state"]
        cross = _run(_session(package / manifest.graphs["cross_attention"].file.file), {"encoder_hidden_states": hidden})
        fixed = {name.replace("present", "past_key_values", 1): value for name, value in cross.items()}
        fixed["encoder_attention_mask"] = np.ones_like(ids)
    shared = manifest.kv_cache == "shared"
    length = len(prompt) + steps
    past = {i.name: np.zeros((1, dims.n_kv_heads, length if shared else 0, dims.d_head), float_dtype)
            for i in decoder.get_inputs() if i.name.startswith("past_key_values.") and ".encoder." not in i.name}
    tokens, logits, new = [], [], list(prompt)
    for _ in range(steps):
        seen = len(prompt) + len(tokens)  # tokens in the sequence after this step
        feeds = {"input_ids": np.array([new], np.int64), **fixed, **past}
        if shared:
            feeds["sequence_lengths"] = np.array([seen], np.int64)
        else:
            feeds["attention_mask"] = np.ones((1, seen), np.int64)
            feeds["position_ids"] = np.arange(seen - len(new), seen, dtype=np.int64)[None]
        out = _run(decoder, feeds)
        last = out["logits"][0, -1] if out["logits"].ndim == 3 else out["logits"][0]  # concat (B, T, V), shared (B, V)
        logits.append(last.astype(np.float32))
        tokens.append(int(np.argmax(last)))
        past = {name.replace("present", "past_key_values", 1): value for name, value in out.items()
                if name.startswith("present.")}
        new = [tokens[-1]]
    return tokens, logits


def torch_greedy(model, prompt: list[int], steps: int, source: list[int] | None = None
                 ) -> tuple[list[int], list[np.ndarray]]:
    """The same, in PyTorch without a KV cache: every step re-runs the whole sequence. A
    prefix-LM's prompt attends bidirectionally, what follows it causally."""
    import torch

    config = model.config
    cross = None
    with torch.no_grad():
        if source is not None:
            cross = model.cross_kv(model.encode(torch.tensor([source])))
        tokens, logits = [], []
        for _ in range(steps):
            ids = torch.tensor([list(prompt) + tokens])
            prefix = None
            if config.arch == "prefix-lm":
                prefix = torch.tensor([[True] * len(prompt) + [False] * len(tokens)])
            last = model.decode(ids, prefix_mask=prefix, cross_kv=cross).logits[0, -1].float().numpy()
            logits.append(last)
            tokens.append(int(np.argmax(last)))
    return tokens, logits


def check_generation(model, package: Path, *, atol: float = FP32_ATOL, steps: int = 8, tokens_equal: bool = True,
                     prompts: tuple[list[int], ...] = ([5, 9, 14, 3, 7, 21], [11], [30, 8, 8, 40])) -> float:
    """Greedy through the package == greedy in PyTorch (when `tokens_equal`; a quantized variant
    may pick another token at a near-tie, and is then compared up to that step) and every
    step's logits within `atol`. Returns the worst logits difference."""
    worst = 0.0
    start = [model.config.start_token_id] if model.config.arch == "encoder-decoder" else None
    for prompt in prompts:
        source, decoder_prompt = (prompt, start) if start else (None, prompt)
        want_tokens, want = torch_greedy(model, decoder_prompt, steps, source)
        got_tokens, got = onnx_greedy(package, decoder_prompt, steps, source)
        if tokens_equal:
            assert got_tokens == want_tokens, f"prompt {prompt}: onnx {got_tokens} vs torch {want_tokens}"
        if got_tokens != want_tokens:  # a variant chose another token: compare up to there
            got = got[:next(k for k, (a, b) in enumerate(zip(got_tokens, want_tokens)) if a != b) + 1]
        worst = max(worst, max(float(np.abs(a - b).max()) for a, b in zip(got, want)))
    assert worst <= atol, f"max |onnx - torch| logits {worst:.3g} > {atol:g}"
    return worst


def check_encoder(model, package: Path, *, atol: float = FP32_ATOL) -> float:
    """encoder.onnx's hidden states (and class logits) == PyTorch's, on a padded batch."""
    import torch

    manifest = Manifest.load(package)
    session = _session(package / manifest.graphs["encoder"].file.file)
    ids = np.array([[5, 9, 14, 3, 7, 21], [0, 0, 11, 12, 13, 8]], np.int64)
    mask = (np.arange(6)[None] >= np.array([[0], [2]])).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = _run(session, feeds)
    with torch.no_grad():
        positions = torch.from_numpy(np.clip(mask.cumsum(-1) - 1, 0, None))
        hidden = model.encode(torch.from_numpy(ids), torch.from_numpy(mask), position_ids=positions,
                              token_type_ids=torch.from_numpy(feeds["token_type_ids"]) if model.type_emb is not None else None)
        want = {"last_hidden_state": hidden}
        if "logits" in got:
            want["logits"] = model.classify(hidden)
    rows = mask.astype(bool)  # padded positions' hidden states are not part of the contract
    worst = max(float(np.abs(got["last_hidden_state"][rows] - want["last_hidden_state"].numpy()[rows]).max()),
                float(np.abs(got["logits"] - want["logits"].numpy()).max()) if "logits" in got else 0.0)
    assert worst <= atol, f"max |onnx - torch| encoder outputs {worst:.3g} > {atol:g}"
    return worst


def check_package(model, package: Path, *, atol: float = FP32_ATOL, tokens_equal: bool = True) -> float:
    """Every graph of the package against PyTorch; the package loads and verifies in the runtime."""
    import onnxformer.runtime as rt

    rt.load(package)  # manifest, checksums, each session's I/O against the contract
    if model.config.arch == "encoder":
        return check_encoder(model, package, atol=atol)
    return check_generation(model, package, atol=atol, tokens_equal=tokens_equal)
