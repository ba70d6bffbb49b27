"""Importing a Hugging Face checkpoint (issue 15, memory and scale): one random-weight Llama
folder of TinyLlama-1.1B's shape through `onnxformer export`, onnxruntime-genai's model builder
and Optimum's `optimum-cli export onnx`, side by side in one run.

    bash benchmarks/setup_peers.sh                                           # once: peer venvs
    python benchmarks/bench_import.py --size small                           # smoke run, ~30 s
    python benchmarks/bench_import.py --size tinyllama --clean               # 1.1B, ~8 min on 2 cores
    python benchmarks/bench_import.py folder --size tinyllama --out DIR      # only the HF folder
    python benchmarks/bench_import.py profile HF_DIR OUT [--quantize int4]   # RSS per export phase

Steps (everything under --work, default /tmp/bench-import; nothing under the repository):

  folder  LlamaForCausalLM built by transformers from a config (random weights, seed 0; no
          download), save_pretrained as safetensors (fp32 unless --dtype bf16), a WordLevel
          tokenizer of exactly vocab_size tokens built with `tokenizers` (adds <s>, as Llama's),
          generation_config.json (bos 1, eos 2). The eos row of lm_head is zero (an eos logit of
          exactly 0 is never the argmax), so every engine generates all the tokens asked for.
  export  each engine's own command under /usr/bin/time -v: wall seconds, peak RSS (the largest
          resident set of the command's processes), the size of its .onnx* files:
            onnxformer  onnxformer export HF_DIR OUT [--quantize int4]   (validation included)
            genai       python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu
            optimum     optimum-cli export onnx --model HF_DIR --task text-generation-with-past OUT
                        (fp32 only: optimum-cli has no int4 weight-only export; its validation runs)
  decode  each export in a fresh process (the peers in their venvs), intra-op threads = --threads
          for every engine: greedy, random prompts of 32 tokens, N new tokens, batch 1 and 8; decode tok/s = batch * (N - 1) /
          decode time (common.decode_figures; genai times its phases directly). Also the load time
          and the peak RSS of that process.
  tokens  greedy tokens of genai and Optimum fp32 compared with onnxformer fp32 (same weights).

Results: WORK/results-<size>.json (written after every step; --resume skips engines measured
already) and a markdown table on stdout. This module imports only the standard library at the
top: the decode children run it inside the peer environments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    PEER_VENVS,
    REPO,
    decode_figures,
    dir_size_mb,
    load_average,
    log,
    machine_info,
    markdown_table,
    peak_rss_mb,
    read_json,
    versions,
    write_json,
)

DEFAULT_WORK = Path("/tmp/bench-import")
TIME = "/usr/bin/time"
SEED = 0
UNK, BOS, EOS = 0, 1, 2

# Llama shapes. "tinyllama" is TinyLlama-1.1B's config.json; "medium" keeps its widths and
# vocabulary with 4 layers (the same memory profile per byte, in a fifth of the time).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=300, max_position_embeddings=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=704, vocab_size=2000, max_position_embeddings=512),
    "medium": dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                   intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
}


# --------------------------------------------------------------------------------------------
# The Hugging Face folder
# --------------------------------------------------------------------------------------------


def word_level_tokenizer(vocab_size: int):
    """A `tokenizers` WordLevel tokenizer of exactly `vocab_size` tokens: <unk> <s> </s>, the
    printable ASCII characters, then words w0, w1, ...; whitespace pre-tokenizer, adds <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    for ch in (chr(c) for c in range(33, 127)):
        if len(vocab) < vocab_size:
            vocab[ch] = len(vocab)
    k = 0
    while len(vocab) < vocab_size:
        vocab[f"w{k}"] = len(vocab)
        k += 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", BOS)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def make_hf_folder(out: Path, size: str, dtype: str = "fp32") -> dict[str, Any]:
    """Write a random-weight LlamaForCausalLM of SIZES[size] to `out` (save_pretrained,
    safetensors); returns what was written (parameters, dtype, bytes)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = SIZES[size]
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", attention_bias=False,
                         mlp_bias=False, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=None)
    torch.manual_seed(SEED)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
        model.lm_head.weight[EOS] = 0.0  # eos scores exactly 0, never the argmax: no engine stops early
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, do_sample=False,
                                               max_length=shape["max_position_embeddings"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level_tokenizer(shape["vocab_size"]),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(tmp)
    info = {"size": size, "dtype": dtype, "num_parameters": params, "fp32_bytes": params * 4,
            "checkpoint_mb": dir_size_mb(tmp, "*.safetensors"), "shape": shape}
    write_json(tmp / "bench-folder.json", info)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return info


def ensure_folder(work: Path, size: str, dtype: str) -> tuple[Path, dict[str, Any]]:
    folder = work / f"hf-{size}-{dtype}"
    stamp = folder / "bench-folder.json"
    if stamp.is_file():
        return folder, read_json(stamp)
    log(f"building the HF folder {folder}")
    start = time.perf_counter()
    info = make_hf_folder(folder, size, dtype)
    log(f"  {info['num_parameters'] / 1e6:.1f}M parameters, {info['checkpoint_mb']:.0f} MB, "
        f"{time.perf_counter() - start:.0f} s")
    return folder, info


# --------------------------------------------------------------------------------------------
# Engines: how each one exports, and in which interpreter it runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    name: str  # onnxformer | genai | optimum
    precision: str  # fp32 | int4
    venv: str | None = None  # peer environment (common.PEER_VENVS); None = this interpreter

    @property
    def label(self) -> str:
        return f"{self.name}/{self.precision}"

    def python(self) -> Path | None:
        if self.venv is None:
            return Path(sys.executable)
        exe = PEER_VENVS[self.venv] / "bin" / "python"
        return exe if exe.is_file() else None

    def export_argv(self, hf_dir: Path, out: Path, work: Path, extra: tuple[str, ...] = ()) -> list[str]:
        exe = str(self.python())
        if self.name == "onnxformer":
            quantize = ["--quantize", self.precision] if self.precision != "fp32" else []
            return [str(Path(exe).with_name("onnxformer")), "export", str(hf_dir), str(out), *quantize, *extra]
        if self.name == "genai":
            return [exe, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", self.precision, "-e", "cpu", "-c", str(work / "genai-cache")]
        if self.name == "optimum":
            cli = Path(exe).with_name("optimum-cli")
            return [str(cli), "export", "onnx", "--model", str(hf_dir), "--task", "text-generation-with-past",
                    str(out)]
        raise ValueError(self.name)


ENGINES = [
    Engine("onnxformer", "fp32"),
    Engine("genai", "fp32", "genai"),
    Engine("onnxformer", "int4"),
    Engine("genai", "int4", "genai"),
    Engine("optimum", "fp32", "optimum"),
]
NOT_OFFERED = {"optimum/int4": "optimum-cli has no int4 weight-only export (its ORTQuantizer: int8 dynamic)"}


def timed_command(argv: list[str], log_file: Path, timeout: float) -> dict[str, Any]:
    """Run argv under /usr/bin/time -v; wall seconds, peak RSS (MiB) and the exit code."""
    stats = log_file.with_suffix(".time")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    with open(log_file, "w") as out:
        try:
            proc = subprocess.run([TIME, "-v", "-o", str(stats), *argv], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    text = stats.read_text() if stats.is_file() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": wall, "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None, "exit_code": code,
            "log": str(log_file), "command": " ".join(argv)}


def export(engine: Engine, hf_dir: Path, out: Path, work: Path, timeout: float,
           extra: tuple[str, ...] = ()) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    argv = engine.export_argv(hf_dir, out, work, extra)
    log(f"export {engine.label}: {' '.join(argv)}")
    result = timed_command(argv, work / f"export-{engine.name}-{engine.precision}.log", timeout)
    if result["exit_code"] != 0:
        tail = Path(result["log"]).read_text()[-3000:]
        result["error"] = f"exit code {result['exit_code']}:\n{tail}"
    elif out.is_dir():
        result["files_mb"] = dir_size_mb(out, "*.onnx*")
        result["files"] = sorted(p.name for p in out.iterdir())
    log(f"  {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mb'] or 0:.0f} MiB"
        + (f", {result.get('files_mb', 0):.0f} MB" if "files_mb" in result else f" FAILED ({result['exit_code']})"))
    return result


# --------------------------------------------------------------------------------------------
# Decode: one child process per export (run with the engine's interpreter)
# --------------------------------------------------------------------------------------------


def _time_pairs(generate, batch: int, new_tokens: int, repeats: int) -> tuple[dict[str, Any], list[list[int]]]:
    """common.time_generation with a cheaper warm-up (one call of 2 tokens): generate(1) and
    generate(new_tokens) back to back, `repeats` times."""
    generate(2)
    first, full, tokens = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        generate(1)
        mid = time.perf_counter()
        tokens = generate(new_tokens)
        first.append(mid - start)
        full.append(time.perf_counter() - mid)
    return decode_figures(batch, new_tokens, first, full), [list(map(int, row)) for row in tokens]


def _decode_onnxformer(model_dir: Path, prompts, batches, new_tokens: int, repeats: int,
                       threads: int) -> dict[str, Any]:
    import onnxformer.runtime as rt

    start = time.perf_counter()
    model = rt.load(model_dir, threads=threads)
    load_s = time.perf_counter() - start
    configs = {n: rt.GenerationConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=0)
               for n in (1, 2, new_tokens)}
    rows, tokens = [], {}
    for batch in batches:
        generate = lambda n: [g.token_ids[0] for g in model.generate_ids(prompts[:batch], configs[n])]  # noqa: E731
        figures, tokens[f"b{batch}"] = _time_pairs(generate, batch, new_tokens, repeats)
        rows.append({"batch": batch, **figures})
    return {"rows": rows, "tokens": tokens, "load_s": load_s,
            "meta": {"versions": versions(["onnxruntime"]), "torch_imported": "torch" in sys.modules}}


def _decode_genai(model_dir: Path, prompts, batches, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    import statistics

    import numpy as np
    import onnxruntime_genai as og

    def generate(model, ids, n):
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, do_sample=False,
                                  batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        done = time.perf_counter()
        rows = [np.asarray(generator.get_sequence(i))[ids.shape[1]:].tolist() for i in range(ids.shape[0])]
        return first - start, done - first, rows

    start = time.perf_counter()
    config = og.Config(str(model_dir))  # genai 0.18 defaults to 1 thread here: set it, as run_genai.py
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    rows, tokens = [], {}
    for batch in batches:
        ids = np.asarray(prompts[:batch], dtype=np.int32)
        generate(model, ids, 2)
        runs = [generate(model, ids, new_tokens) for _ in range(repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        total = statistics.median(r[0] + r[1] for r in runs)
        rows.append({"batch": batch, "prefill_ms": prefill * 1e3, "decode_ms_per_step": decode / (new_tokens - 1) * 1e3,
                     "decode_tok_s": batch * (new_tokens - 1) / decode, "total_ms": total * 1e3,
                     "total_tok_s": batch * new_tokens / total, "repeats": repeats})
        tokens[f"b{batch}"] = [list(map(int, r)) for r in runs[-1][2]]
    return {"rows": rows, "tokens": tokens, "load_s": load_s,
            "meta": {"versions": versions(["onnxruntime-genai", "onnxruntime"])}}


def _decode_optimum(model_dir: Path, prompts, batches, new_tokens: int, repeats: int,
                    threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    start = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(model_dir, session_options=options)
    load_s = time.perf_counter() - start
    rows, tokens = [], {}
    with torch.inference_mode():
        for batch in batches:
            ids = torch.tensor(prompts[:batch], dtype=torch.long)
            mask = torch.ones_like(ids)

            def generate(n: int) -> list[list[int]]:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=EOS)
                return out[:, ids.shape[1]:].tolist()

            figures, tokens[f"b{batch}"] = _time_pairs(generate, batch, new_tokens, repeats)
            rows.append({"batch": batch, **figures})
    return {"rows": rows, "tokens": tokens, "load_s": load_s,
            "meta": {"versions": versions(["optimum", "optimum-onnx", "transformers", "onnxruntime", "torch"]),
                     "use_io_binding": getattr(model, "use_io_binding", None)}}


DECODERS = {"onnxformer": _decode_onnxformer, "genai": _decode_genai, "optimum": _decode_optimum}


def decode_child(job_file: Path, out_file: Path) -> None:
    job = read_json(job_file)
    result = DECODERS[job["engine"]](Path(job["model_dir"]), job["prompts"], job["batches"], job["new_tokens"],
                                     job["repeats"], job["threads"])
    result["peak_rss_mb"] = peak_rss_mb()
    write_json(out_file, result)


def decode(engine: Engine, model_dir: Path, work: Path, prompts, batches, new_tokens: int, repeats: int,
           threads: int, timeout: float) -> dict[str, Any]:
    tag = f"{engine.name}-{engine.precision}"
    job, out = work / f"decode-{tag}.job.json", work / f"decode-{tag}.json"
    write_json(job, {"engine": engine.name, "model_dir": str(model_dir), "prompts": prompts, "batches": batches,
                     "new_tokens": new_tokens, "repeats": repeats, "threads": threads})
    out.unlink(missing_ok=True)
    log(f"decode {engine.label}")
    result = timed_command([str(engine.python()), str(Path(__file__).resolve()), "decode-child", "--job", str(job),
                            "--out", str(out)], work / f"decode-{tag}.log", timeout)
    if result["exit_code"] != 0 or not out.is_file():
        return {"error": f"exit code {result['exit_code']}:\n{Path(result['log']).read_text()[-3000:]}"}
    data = read_json(out)
    data["wall_s"] = result["wall_s"]
    log("  " + ", ".join(f"b{r['batch']} {r['decode_tok_s'] or 0:.1f} tok/s" for r in data["rows"]))
    return data


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def compare(reference: dict[str, list[list[int]]], other: dict[str, list[list[int]]]) -> dict[str, Any]:
    from benchmarks.common import compare_tokens

    return {key: compare_tokens(reference[key], other.get(key, [])) for key in reference}


def _peer_versions() -> dict[str, Any]:
    found = {}
    for venv, packages in (("optimum", ["torch", "transformers", "optimum", "optimum-onnx", "onnxruntime"]),
                           ("genai", ["torch", "transformers", "onnxruntime-genai", "onnxruntime", "onnx"])):
        exe = PEER_VENVS[venv] / "bin" / "python"
        if not exe.is_file():
            found[venv] = "absent"
            continue
        code = f"import json, importlib.metadata as m; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
        out = subprocess.run([str(exe), "-c", code], capture_output=True, text=True)
        found[venv] = json.loads(out.stdout) if out.returncode == 0 else out.stderr[-300:]
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / f"results-{args.size}-{args.dtype}.json"
    results = read_json(results_file) if args.resume and results_file.is_file() else {}
    results.setdefault("engines", {})
    results["info"] = {"machine": machine_info(), "command": " ".join(["python", *sys.argv]),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "versions": versions(["onnxruntime", "onnx", "torch", "transformers", "numpy", "onnxformer"]),
                       "peer_versions": _peer_versions(), "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "threads": args.threads}
    log(f"load average at start {load_average()}")
    hf_dir, folder = ensure_folder(work, args.size, args.dtype)
    results["folder"] = {**folder, "path": str(hf_dir)}
    rng = np.random.default_rng(SEED)
    prompts = rng.integers(3, folder["shape"]["vocab_size"], size=(max(args.batches), 32))
    prompts[:, 0] = BOS
    prompts = prompts.tolist()
    for engine in [e for e in ENGINES if e.name in args.engines and e.precision in args.precisions]:
        label = engine.label
        done = results["engines"].get(label, {})
        if args.resume and "decode" in done and "error" not in done["decode"]:
            log(f"{label}: measured already (--resume)")
            continue
        if engine.python() is None:
            results["engines"][label] = {"skipped": f"no {PEER_VENVS[engine.venv]} (run benchmarks/setup_peers.sh)"}
            continue
        out = work / f"out-{engine.name}-{engine.precision}"
        entry: dict[str, Any] = {"load_average_start": load_average()}
        extra = tuple(args.onnxformer_args.split()) if engine.name == "onnxformer" else ()
        entry["export"] = export(engine, hf_dir, out, work, args.timeout, extra)
        if "error" not in entry["export"]:
            entry["decode"] = decode(engine, out, work, prompts, args.batches, args.new_tokens, args.repeats,
                                     args.threads, args.timeout)
        entry["load_average_end"] = load_average()
        results["engines"][label] = entry
        if args.clean:
            shutil.rmtree(out, ignore_errors=True)
        write_json(results_file, results)
    reference = results["engines"].get("onnxformer/fp32", {}).get("decode", {}).get("tokens")
    if reference:
        for label, entry in results["engines"].items():
            tokens = entry.get("decode", {}).get("tokens")
            if tokens and label != "onnxformer/fp32" and label.endswith("fp32"):
                entry["tokens_vs_onnxformer_fp32"] = compare(reference, tokens)
    results["info"]["load_average_end"] = load_average()
    results["info"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_json(results_file, results)
    if args.clean:
        shutil.rmtree(hf_dir, ignore_errors=True)
        shutil.rmtree(work / "genai-cache", ignore_errors=True)
    print(report(results))
    log(f"wrote {results_file}")
    return results


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    fp32_mb = results["folder"]["fp32_bytes"] / 2**20
    rows = []
    labels = [e.label for e in ENGINES] + list(NOT_OFFERED)
    for label in sorted(set(labels), key=labels.index):
        entry = results["engines"].get(label)
        if label in NOT_OFFERED:
            rows.append({"engine": label, "note": NOT_OFFERED[label]})
            continue
        if entry is None:
            continue
        ex, de = entry.get("export", {}), entry.get("decode", {})
        speed = {r["batch"]: r["decode_tok_s"] for r in de.get("rows", [])}
        note = entry.get("skipped") or (ex.get("error", "").splitlines() or [""])[0] or \
            (de.get("error", "").splitlines() or [""])[0]
        same = entry.get("tokens_vs_onnxformer_fp32")
        if same:
            note = (note + "; " if note else "") + "greedy tokens = onnxformer's: " + \
                ", ".join(f"{k} {v['rows_equal']}/{v['rows']}" for k, v in same.items())
        rows.append({
            "engine": label, "export_s": ex.get("wall_s"), "peak_rss_mb": ex.get("peak_rss_mb"),
            "rss_x": ex["peak_rss_mb"] / fp32_mb if ex.get("peak_rss_mb") else None,
            "files_mb": ex.get("files_mb"), "load_s": de.get("load_s"), "b1": speed.get(1), "b8": speed.get(8),
            "run_rss_mb": de.get("peak_rss_mb"), "note": note,
        })
    return rows


COLUMNS = [("engine", "engine"), ("export_s", "export s"), ("peak_rss_mb", "export peak RSS MiB"),
           ("rss_x", "/ fp32 bytes"), ("files_mb", "files MiB"), ("load_s", "load s"),
           ("b1", "decode tok/s b1"), ("b8", "decode tok/s b8"), ("run_rss_mb", "decode peak RSS MiB"),
           ("note", "note")]


def versus_genai(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """onnxformer / genai per precision and figure (time and memory: lower is better; speed: higher)."""
    by = {r["engine"]: r for r in rows}
    out = []
    for precision in ("fp32", "int4"):
        ours, genai = by.get(f"onnxformer/{precision}"), by.get(f"genai/{precision}")
        if not ours or not genai:
            continue
        row = {"precision": precision}
        for key in ("export_s", "peak_rss_mb", "files_mb", "load_s", "b1", "b8"):
            a, b = ours.get(key), genai.get(key)
            row[key] = a / b if a and b else None
        out.append(row)
    return out


VERSUS_COLUMNS = [("precision", "onnxformer / genai"), ("export_s", "export s (lower better)"),
                  ("peak_rss_mb", "export peak RSS (lower)"), ("files_mb", "files (lower)"),
                  ("load_s", "load s (lower)"), ("b1", "decode b1 (higher)"), ("b8", "decode b8 (higher)")]


def report(results: dict[str, Any]) -> str:
    f = results["folder"]
    info = results["info"]
    head = (f"HF folder: {f['size']} ({f['num_parameters'] / 1e6:.1f}M parameters, {f['dtype']} safetensors "
            f"{f['checkpoint_mb']:.0f} MiB; fp32 model bytes {f['fp32_bytes'] / 2**20:.0f} MiB); prompt 32, "
            f"{info['new_tokens']} new tokens, greedy, {info['repeats']} repeats, {info.get('threads')} threads; "
            f"load average at start "
            f"{info['machine']['load_average']}, at the end {info.get('load_average_end')}")
    rows = table_rows(results)
    return (head + "\n\n" + markdown_table(rows, COLUMNS) + "\n\n" +
            markdown_table(versus_genai(rows), VERSUS_COLUMNS))


# --------------------------------------------------------------------------------------------
# profile: where the export's memory goes (in process, sampled)
# --------------------------------------------------------------------------------------------


def _status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


PROFILED_CALLS = {  # module -> functions whose start and end are marked
    "onnxformer.modeling.hf_import": ["load_hf"],
    "onnxformer.export.exporter": ["produce_graphs", "stage", "_check_portability", "reference", "validate",
                                   "convert_graphs"],
    "onnxformer.export.validate": ["numeric_parity", "greedy_parity"],
}


def _mark_calls(logger) -> None:
    """Wrap PROFILED_CALLS in this process so that each call's start and end is a log record."""
    import functools
    import importlib

    for module_name, names in PROFILED_CALLS.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name)

            def wrapper(*a, __original=original, __name=name, **k):
                logger.info("> %s", __name)
                try:
                    return __original(*a, **k)
                finally:
                    logger.info("< %s", __name)

            setattr(module, name, functools.wraps(original)(wrapper))


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def profile(args: argparse.Namespace) -> None:
    """Export in this process; print the RSS at each log record of onnxformer's export (and at
    the start and end of PROFILED_CALLS) and the peak RSS since the previous record (VmHWM,
    reset at each record: exact, not sampled)."""
    import logging

    from onnxformer.export.exporter import ExportOptions, export_checkpoint

    marks: list[tuple[float, str, dict[str, float]]] = []
    start = time.perf_counter()

    class Mark(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            marks.append((time.perf_counter() - start, record.getMessage()[:90], _status()))
            _reset_peak()

    handler = Mark()
    logger = logging.getLogger("onnxformer")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    _mark_calls(logger)
    _reset_peak()
    export_checkpoint(args.hf_dir, args.out, ExportOptions(quantize=args.quantize))
    handler.emit(logging.LogRecord("bench", logging.INFO, "", 0, "done", (), None))
    print(f"{'t s':>7} {'RSS':>7} {'anon':>7} {'file':>7} {'peak':>7}  event (MiB; peak: the largest RSS since the "
          "previous event)")
    for t, message, now in marks:
        print(f"{t:7.1f} {now['VmRSS']:7.0f} {now['RssAnon']:7.0f} {now['RssFile']:7.0f} {now['VmHWM']:7.0f}  {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command")
    folder = sub.add_parser("folder", help="only write the HF folder")
    folder.add_argument("--size", choices=list(SIZES), default="small")
    folder.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    folder.add_argument("--out", type=Path, required=True)
    prof = sub.add_parser("profile", help="RSS per phase of onnxformer's export, in process")
    prof.add_argument("hf_dir", type=Path)
    prof.add_argument("out", type=Path)
    prof.add_argument("--quantize", choices=["int4", "int8"], default=None)
    child = sub.add_parser("decode-child")
    child.add_argument("--job", type=Path, required=True)
    child.add_argument("--out", type=Path, required=True)
    for p in (parser,):
        p.add_argument("--size", choices=list(SIZES), default="small")
        p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                       help="dtype of the saved safetensors (default fp32)")
        p.add_argument("--work", type=Path, default=DEFAULT_WORK)
        p.add_argument("--engines", nargs="*", default=["onnxformer", "genai", "optimum"])
        p.add_argument("--precisions", nargs="*", default=["fp32", "int4"])
        p.add_argument("--batches", nargs="*", type=int, default=[1, 8])
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--threads", type=int, default=os.cpu_count(),
                       help="intra-op threads of every engine's decode (default: all cores)")
        p.add_argument("--timeout", type=float, default=3600)
        p.add_argument("--onnxformer-args", default="", help="more arguments of `onnxformer export` (e.g. '--atol 1e-3')")
        p.add_argument("--resume", action="store_true", help="skip engines the results file has figures for")
        p.add_argument("--clean", action="store_true", help="delete each export after measuring it, and the folder")
    args = parser.parse_args()
    if args.command == "folder":
        print(json.dumps(make_hf_folder(args.out, args.size, args.dtype)))
    elif args.command == "profile":
        profile(args)
    elif args.command == "decode-child":
        decode_child(args.job, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
