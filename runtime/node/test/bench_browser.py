"""README figures: load time and greedy decode tok/s of packages in headless Chromium (wasm,
one thread and threads), in Node (onnxruntime-node) and in Python (onnxruntime), one after
another on this machine. Usage: python runtime/node/test/bench_browser.py [PACKAGE...] [--new N]
(default: artifacts/*). Prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import onnxformer.runtime as rt
from onnxformer.runtime.web import serve_in_thread

NODE = Path(__file__).resolve().parents[1]
ROOT = NODE.parents[1]

NODE_BENCH = """
import { load } from '%s';
const [dir, n] = [process.argv[1], Number(process.argv[2])];
let start = performance.now();
const m = await load(dir);
const load_s = (performance.now() - start) / 1000;
const out = { load_s };
if (m.canGenerate) {
  const prompt = [(await m.encode(['twelve']))[0]];
  const options = { max_new_tokens: n, min_new_tokens: n };
  await m.generateIds(prompt, options);
  start = performance.now();
  const [g] = await m.generateIds(prompt, options);
  out.tok_s = g.token_ids[0].length / ((performance.now() - start) / 1000);
}
console.log(JSON.stringify(out));
"""


def python_figures(path: Path, new: int) -> dict:
    start = time.perf_counter()
    model = rt.load(path)
    out = {"load_s": time.perf_counter() - start}
    if model.manifest.arch != "encoder":
        prompt = model.encode(["twelve"])
        model.generate_ids(prompt, max_new_tokens=new, min_new_tokens=new)
        start = time.perf_counter()
        [g] = model.generate_ids(prompt, max_new_tokens=new, min_new_tokens=new)
        out["tok_s"] = len(g.token_ids[0]) / (time.perf_counter() - start)
    return out


def node_figures(path: Path, new: int) -> dict:
    done = subprocess.run(["node", "--input-type=module", "-e", NODE_BENCH % (NODE / "index.js").as_posix(), str(path), str(new)],
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)


def page_figures(url: str, query: str, new: int) -> dict:
    done = subprocess.run(["node", "test/bench_page.mjs", url, query, str(new)], cwd=NODE, capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("packages", nargs="*", type=Path)
    parser.add_argument("--new", type=int, default=64, help="new tokens per run (default 64)")
    args = parser.parse_args()
    packages = args.packages or sorted(p for p in (ROOT / "artifacts").iterdir() if (p / "manifest.json").is_file())
    server, _ = serve_in_thread({p.name: p for p in packages})
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        one = page_figures(url, "threads=1", args.new)
        many = page_figures(url, "", args.new)
    finally:
        server.shutdown()
    print(f"browser wasm threads: {many['threads']} (cross-origin isolated: {many['isolated']}); {args.new} new tokens\n")
    print("| package | load: browser 1 thread | browser threads | Node | Python "
          "| tok/s: browser 1 thread | browser threads | Node | Python |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in packages:
        node, py = node_figures(path, args.new), python_figures(path, args.new)
        rows = [one["models"][path.name], many["models"][path.name], node, py]
        loads = " | ".join(f"{r['load_s']:.2f} s" for r in rows)
        speeds = " | ".join(f"{r['tok_s']:.0f}" if "tok_s" in r else "-" for r in rows)
        print(f"| {path.name} | {loads} | {speeds} |")


if __name__ == "__main__":
    main()
