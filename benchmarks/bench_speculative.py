"""Speculative decoding, batch-1 greedy: plain vs prompt lookup vs a draft package (runtime only).

    python benchmarks/bench_speculative.py --target PKG [--target PKG ...] [--draft PKG]
        [--prompts numbers | bench-decoder | FILE] [--n 40] [--max-new-tokens 32] [--rounds 3]

Each mode generates greedily for every prompt, one at a time (batch 1); the figure is the
generated tokens per second of the whole set, the best of ``--rounds`` passes. Every mode's
tokens must equal plain greedy's (the run fails otherwise). Acceptance: accepted / checked
drafts (for a draft at K=1, the share of positions where the draft's greedy token equals the
target's). Prompts: ``numbers`` (number words of the built-in task, "... ="), ``bench-decoder``
(the prompts of benchmarks/.work/decoder/case.json: the benchmark decoder's workload, random
weights), or a text file (one prompt per line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxformer.runtime as rt  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402


def _prompts(kind: str, n: int, model) -> list[list[int]]:
    if kind == "numbers":
        rng = random.Random(0)
        ones = "one two three four five six seven eight nine".split()
        texts = [f"{rng.choice(ones)} hundred {rng.choice(['twenty', 'forty', 'sixty'])} {rng.choice(ones)}"
                 for _ in range(n)]
        return model.encode([model.manifest.prompt_format.format(t) if model.manifest.prompt_format else t
                             for t in texts])
    if kind == "bench-decoder":
        case = json.loads((Path(model.directory).parent / "case.json").read_text())  # the package's workspace
        return [list(p) for p in case["workload"]["prompts"]][:n]
    return model.encode(Path(kind).read_text().splitlines()[:n])


def _run(model, prompts, config) -> tuple[float, list[list[int]], object]:
    began = time.perf_counter()
    out = [model.generate_ids([p], config)[0].token_ids[0] for p in prompts]
    return time.perf_counter() - began, out, model.last_speculation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="target package (repeatable: e.g. shared and concat)")
    p.add_argument("--draft", help="draft package (same vocabulary)")
    p.add_argument("--prompts", default="numbers")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-eos", action="store_true", help="generate max_new_tokens for every prompt (no eos)")
    p.add_argument("--ks", default="1,2,4", help="K values to try (comma-separated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    load_start = os.getloadavg()
    rows = []
    for target_dir in args.target:
        target = rt.load(target_dir, threads=1)
        draft = rt.load(args.draft, threads=1) if args.draft else None
        prompts = _prompts(args.prompts, args.n, target)
        base = dict(strategy="greedy", max_new_tokens=args.max_new_tokens)
        if args.no_eos:
            base["eos_token_ids"] = ()
        modes = [("plain", None, 0)]
        ks = [int(k) for k in args.ks.split(",")]
        modes += [(f"lookup K={k}", None, k) for k in ks] + [("lookup auto", None, "auto")]
        if draft is not None:
            modes += [(f"draft K={k}", draft, k) for k in ks] + [("draft auto", draft, "auto")]
        best = {name: None for name, _, _ in modes}
        tokens = {}
        for _ in range(args.rounds):  # round-robin over the modes: a load change hits them all alike
            for name, d, spec in modes:
                target.set_draft(d)
                seconds, tokens[name], _ = _run(target, prompts, target.generation_config(**base, speculative=spec))
                best[name] = seconds if best[name] is None else min(best[name], seconds)
        for name, d, spec in modes:
            if tokens[name] != tokens["plain"]:
                raise SystemExit(f"{name}: tokens differ from plain greedy on {target_dir}")
            total = {"proposed": 0, "accepted": 0}  # acceptance over one more pass
            if spec != 0:
                target.set_draft(d)
                config = target.generation_config(**base, speculative=spec)
                for prompt in prompts:
                    target.generate_ids([prompt], config)
                    total["proposed"] += target.last_speculation.proposed
                    total["accepted"] += target.last_speculation.accepted
            n_tokens = sum(map(len, tokens[name]))
            rows.append({
                "target": str(target_dir), "kv_cache": target.manifest.kv_cache, "mode": name,
                "tokens": n_tokens, "tok_per_s": n_tokens / best[name],
                "acceptance": (total["accepted"] / total["proposed"]) if total["proposed"] else None,
            })
    plain_rate = {}
    for r in rows:
        if r["mode"] == "plain":
            plain_rate[r["target"]] = r["tok_per_s"]
    print(f"CPU: {cpu_model()}; load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"prompts {args.prompts} x {len(prompts)}, max_new_tokens {args.max_new_tokens}, batch 1, greedy")
    print("| target (kv cache) | mode | tok/s | vs plain | acceptance |")
    print("|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        print(f"| {Path(r['target']).name} ({r['kv_cache']}) | {r['mode']} | {r['tok_per_s']:.0f} | "
              f"{r['tok_per_s'] / plain_rate[r['target']]:.2f}x | {acc} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "load_start": load_start, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
