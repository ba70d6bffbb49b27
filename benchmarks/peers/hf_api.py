"""Timing of models with the Hugging Face API (transformers and Optimum's ORTModel classes).

Both take torch tensors and expose `generate` / `__call__` the same way, so the decoder,
encoder-decoder and classifier measurements are written once here.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Settings, classification_result, measure, time_generation


def generation_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    sp = case["special"]
    kwargs = dict(do_sample=False, num_beams=1, eos_token_id=sp["eos"], pad_token_id=sp["pad"])
    if case["case"] == "encoder-decoder":
        kwargs["decoder_start_token_id"] = case["config"]["decoder_start_token_id"]
    return kwargs


def bench_generation(model, case: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Decoder-only (prompts) or encoder-decoder (sources) greedy generation, per batch size."""
    import torch

    w = case["workload"]
    seq2seq = case["case"] == "encoder-decoder"
    inputs = w["sources"] if seq2seq else w["prompts"]
    new_tokens = settings.encdec_new_tokens if seq2seq else settings.decoder_new_tokens
    kwargs = generation_kwargs(case)
    rows, tokens = [], {}
    with torch.inference_mode():
        for batch in w["batches"]:
            ids = torch.tensor(inputs[:batch], dtype=torch.long)
            mask = torch.ones_like(ids)
            skip = 1 if seq2seq else ids.shape[1]  # the decoder start token / the prompt

            def generate(n: int) -> list[list[int]]:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **kwargs)
                return out[:, skip:].tolist()

            figures, tokens[f"b{batch}"] = time_generation(generate, batch, new_tokens, settings)
            rows.append({"batch": batch, **figures})
    return {"rows": rows, "tokens": tokens}


def bench_classifier(model, case: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Forward passes over the fixed batch of 32 x 128 token ids (tokenization excluded)."""
    import torch

    w = case["workload"]
    ids = torch.tensor(w["input_ids"], dtype=torch.long)
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.tensor(w["token_type_ids"], dtype=torch.long)}
    with torch.inference_mode():
        stats, out = measure(lambda: model(**feeds).logits, warmup=settings.warmup, repeats=settings.repeats)
    logits = out.float().numpy()
    return classification_result(stats, logits, ids.shape[1])


def cold_generate(model, case: dict[str, Any], new_tokens: int = 8) -> None:
    import torch

    w = case["workload"]
    seq2seq = case["case"] == "encoder-decoder"
    ids = torch.tensor((w["sources"] if seq2seq else w["prompts"])[:1], dtype=torch.long)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       **generation_kwargs(case))


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out
