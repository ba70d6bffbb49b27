"""Where the runtime's decode step spends its time (run after bench_decoder built the package).

    python benchmarks/profile_decoder.py [--variant fp32] [--batch 1] [--new-tokens 128] [--tiny]

Three views of greedy generation with onnxformer.runtime (this process never imports torch):

1. Split of the wall time per decode step: onnxruntime's run_with_iobinding (the C++ run),
   the rest of the step model's step() (binding, OrtValues, logits copy), and the generation
   loop around it (logits processing, log-softmax for the score, bookkeeping). Measured by
   wrapping the session's run_with_iobinding and the step model's step in this process only.
2. The cost of the loop's pieces in isolation (timeit): the greedy chooser, the binding of
   every input, a copy of the logits, the attention-mask concatenation.
3. onnxruntime's own profile of a decode loop (session option enable_profiling): kernel
   time per operator type, so the KV-cache Concat (a copy of the whole cache per layer and
   step) and the unfused attention show up, plus the step time at several past lengths.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_WORK_DIR, load_average, markdown_table, write_json  # noqa: E402
from benchmarks.ours import split_per_step  # noqa: E402


def piece_costs(model, batch: int, past: int) -> list[dict[str, float]]:
    """Microseconds per call of the per-step pieces outside session.run."""
    import numpy as np
    import onnxruntime as ort

    from onnxformer.runtime import generation as gen

    vocab = model.dims.vocab_size
    logits = np.random.default_rng(0).standard_normal((batch, vocab)).astype(np.float32)
    mask = np.ones((batch, past), dtype=np.int64)
    session = model.sessions["decoder"]
    values = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), "cpu", 0)
              for i in session.get_inputs()}

    def bind():
        binding = session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")

    config = gen.GenerationConfig(max_new_tokens=8, eos_token_ids=(2,))
    pieces = {
        "greedy choice (argmax + log_softmax over V)": lambda: gen.greedy_choice(logits),
        "argmax only": lambda: np.argmax(logits, axis=1),
        "process_logits (defaults)": lambda: gen.process_logits(logits, [[1]] * batch, config, 5),
        "io_binding + bind all inputs/outputs": bind,
        "OrtValue from a (B, 1) int64 array": lambda: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), "cpu", 0),
        "attention mask concatenate": lambda: np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1),
        "logits (B, V) copy": lambda: logits.copy(),
    }
    rows = []
    for name, fn in pieces.items():
        n = 200
        seconds = min(timeit.repeat(fn, number=n, repeat=5)) / n
        rows.append({"piece": name, "us_per_call": seconds * 1e6})
    return rows


def ort_profile(package: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    """Kernel time per operator type over a decode loop run like the runtime runs it."""
    import numpy as np
    import onnxruntime as ort

    from onnxformer.runtime.contract import past_name_for

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decoder")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(package / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = collections.Counter()
    outputs = [o.name for o in session.get_outputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    _, heads, _, head_size = pasts[0].shape
    value = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cpu", 0)  # noqa: E731
    ids = np.asarray(prompts, dtype=np.int64)  # (B, T); the generated ids do not matter here
    batch, prompt_len = ids.shape
    shared = any(i.name == "sequence_lengths" for i in session.get_inputs())
    capacity = prompt_len + new_tokens if shared else 0  # "shared": buffers allocated once, bound in place
    cache = {p.name: value(np.zeros((len(prompts), heads, capacity, head_size), np.float32)) for p in pasts}
    if shared:
        binding = session.io_binding()
        binding.bind_output(outputs[0], "cpu")
        for name, v in cache.items():
            binding.bind_ortvalue_input(name, v)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present", 1), v)
    for t in range(new_tokens if shared else 0):
        binding.bind_cpu_input("input_ids", ids if t == 0 else ids[:, -1:].copy())
        binding.bind_cpu_input("sequence_lengths", np.full((batch,), prompt_len + t, np.int64))
        session.run_with_iobinding(binding)
    for t in range(0 if shared else new_tokens):
        total = prompt_len + t
        new = ids if t == 0 else ids[:, -1:]
        binding = session.io_binding()
        binding.bind_ortvalue_input("input_ids", value(new))
        binding.bind_ortvalue_input("attention_mask", value(np.ones((batch, total), np.int64)))
        positions = np.arange(total - new.shape[1], total)[None].repeat(batch, 0)
        binding.bind_ortvalue_input("position_ids", value(positions))
        for name, v in cache.items():
            binding.bind_ortvalue_input(name, v)
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        cache = {past_name_for(n): v for n, v in zip(outputs[1:], outs[1:])}
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.defaultdict(float)
    runs = []
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            optimized[event["args"]["op_name"]] += 1
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs.append(event["dur"])
    # The first run is the prefill; count decode steps only for the per-step split.
    decode_runs = runs[1:]
    total_kernel = sum(per_op.values())
    rows = sorted(({"op_type": op, "share": us / total_kernel, "us_per_run": us / len(runs),
                    "nodes_per_run": optimized[op] / len(runs)} for op, us in per_op.items()),
                  key=lambda r: -r["share"])
    return {"op_types": rows, "model_run_us_median_decode": statistics.median(decode_runs),
            "kernel_us_per_run": total_kernel / len(runs), "nodes_per_run": sum(optimized.values()) / len(runs)}


def past_scaling(model, pasts: list[int], repeats: int) -> list[dict[str, float]]:
    from benchmarks.common import step_floor

    return [step_floor(model.sessions["decoder"], p, repeats) for p in pasts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--variant", default="fp32")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import onnxformer.runtime as rt

    case_dir = args.work / ("decoder-tiny" if args.tiny else "decoder")
    case = json.loads((case_dir / "case.json").read_text())
    package = case_dir / case["packages"][args.variant]
    model = rt.load(package)
    prompts = case["workload"]["prompts"]
    out = {"package": str(package), "load_average": load_average(), "split": {}, "pieces": {}}
    print(f"# Decode-step profile: {package} (load average {load_average()})\n")
    for batch in args.batch:
        split = split_per_step(model, prompts[:batch], args.new_tokens, args.repeats)
        out["split"][batch] = split
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    print("\nPer-step pieces outside session.run (microseconds per call):\n")
    for batch in args.batch:
        out["pieces"][batch] = piece_costs(model, batch, case["workload"]["prompt_len"] + args.new_tokens // 2)
        print(f"batch {batch}:\n")
        print(markdown_table(out["pieces"][batch], [("piece", "piece"), ("us_per_call", "us/call")]) + "\n")
    scaling = past_scaling(model, [0, 32, 100, 160], 30)
    out["past_scaling"] = scaling
    print("One decode step (batch 1) against past length:\n")
    print(markdown_table(scaling, [("past", "past"), ("run_ms", "session.run ms"), ("iobinding_ms", "iobinding ms")]))
    for batch in args.batch:
        prof = ort_profile(package, prompts[:batch], args.new_tokens)
        out.setdefault("ort_profile", {})[batch] = prof
        print(f"\nonnxruntime profile, batch {batch}: {prof['nodes_per_run']:.0f} kernels per run after graph "
              f"optimisation, decode model_run median {prof['model_run_us_median_decode'] / 1e3:.2f} ms\n")
        print(markdown_table(prof["op_types"][:14], [("op_type", "op type"), ("share", "share of kernel time"),
                                                     ("us_per_run", "us per run"), ("nodes_per_run", "nodes")]))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
