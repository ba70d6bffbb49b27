"""The JavaScript runtime in a real browser: `onnxformer web` serves the page, Debian's headless
Chromium (driven by playwright-core, runtime/node/test/browser_check.mjs) runs the artifacts in
it, and the results are compared with the Python runtime."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxformer.runtime as rt

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "runtime" / "node"
ARTIFACTS = sorted(p for p in (ROOT / "artifacts").iterdir() if (p / "manifest.json").is_file())
PROMPTS = ["three hundred", "Café naïve 😀"]
TEXTS = ["the food was not good", "a wonderful, moving film", "日本語\tand\nnewlines", "e\u0301 vs \u00e9 Straße ½ 👨‍👩‍👧 🇫🇷",
         "tabs\tand\t\ttabs line\r\nend  ", "Ελληνικά, русский, العربية, עברית"]

MESSAGES = [{"role": "user", "content": "one red cat. Café 😀"}]


def _imported_llama(root: Path) -> Path | None:
    """A tiny random Llama saved by transformers and imported + exported by onnxformer (None
    without transformers / torch / the exporter)."""
    try:
        import torch
        import transformers
        from onnxformer.export.exporter import export_checkpoint
    except ImportError:
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_support import hf_tokenizer, save_hf

    from support import CHATML

    tok = hf_tokenizer()
    tok.chat_template = CHATML  # Qwen2's ChatML, as the model ships it
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = save_hf(model, tok, root / "hf-llama")
    return export_checkpoint(folder, root / "imported-llama").path


def _broken_packages(root: Path) -> dict[str, Path]:
    """Copies of artifacts/decoder, each damaged one way."""
    def copy(name: str, edit=None) -> Path:
        target = root / name
        shutil.copytree(ROOT / "artifacts" / "decoder", target)
        if edit:
            manifest = json.loads((target / "manifest.json").read_text())
            edit(manifest)
            (target / "manifest.json").write_text(json.dumps(manifest))
        return target

    missing = copy("missing-file")
    (missing / "tokenizer.json").unlink()
    altered = copy("checksum")
    data = bytearray((altered / "tokenizer.json").read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")
    (altered / "tokenizer.json").write_bytes(bytes(data))
    version = copy("format-version", lambda m: m.update(format_version=99))
    large = copy("too-large", lambda m: m["graphs"]["decoder"].update(bytes=3 * 2**30))
    return {p.name: p for p in (missing, altered, version, large)}


@pytest.fixture(scope="module")
def page_results(tmp_path_factory):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    if shutil.which("node") is None or not (NODE / "node_modules" / "playwright-core").is_dir() \
            or not (NODE / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("needs node and runtime/node/node_modules with playwright-core and onnxruntime-web (npm ci)")
    from onnxformer.runtime.web import serve_in_thread

    broken = _broken_packages(tmp_path_factory.mktemp("broken"))
    imported = _imported_llama(tmp_path_factory.mktemp("imported"))
    served = {p.name: p for p in ARTIFACTS} | ({"imported-llama": imported} if imported else {})
    server, _ = serve_in_thread(served | broken)
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        spec = {"prompts": PROMPTS, "texts": TEXTS, "broken": [*broken, "no-such-package"], "messages": MESSAGES,
                **({"chat_ui": {"package": "imported-llama", "text": MESSAGES[-1]["content"], "max_new_tokens": 8}} if imported else {}),
                "long_prompt": {"package": "decoder", "text": "one two three " * 200}}
        done = subprocess.run(["node", "test/browser_check.mjs", url, json.dumps(spec)],
                              cwd=NODE, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads(done.stdout.strip().splitlines()[-1])
        results["packages"] = served
        return results
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_every_artifact_loads_in_the_page_with_threads(page_results):
    assert page_results["isolated"], "COOP/COEP headers missing: no wasm threads"
    assert {r["name"] for r in page_results["loaded"] if r["ok"]} == set(page_results["packages"]), page_results["loaded"]


@pytest.mark.slow
def test_tokenizer_ids_equal_python(page_results):
    # Tokenizers.js in the page against the Rust tokenizer of the Python runtime, on every package
    for name, path in page_results["packages"].items():
        want = rt.load(path).encode([*PROMPTS, *TEXTS])
        assert page_results["models"][name]["encode"] == want, name


@pytest.mark.slow
def test_an_imported_hugging_face_model_decodes_as_transformers(page_results):
    if "imported-llama" not in page_results["packages"]:
        pytest.skip("needs transformers and torch to make the imported model")
    import torch
    import transformers

    path = page_results["packages"]["imported-llama"]
    folder = path.parent / "hf-llama"  # beside it (_imported_llama)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    got = page_results["models"]["imported-llama"]["greedy"]
    for prompt, ids in zip(PROMPTS, got):  # one prompt at a time: no padding question on the reference side
        with torch.no_grad():
            inputs = tok(prompt, return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        want = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert ids == want[: len(ids)] and (len(ids) == len(want) or ids[-1] == tok.eos_token_id), (prompt, ids, want)


@pytest.mark.slow
def test_chat_in_the_page_renders_and_answers_as_transformers_and_python(page_results):
    if "imported-llama" not in page_results["packages"]:
        pytest.skip("needs transformers and torch to make the imported model")
    import transformers

    path = page_results["packages"]["imported-llama"]
    tok = transformers.AutoTokenizer.from_pretrained(path.parent / "hf-llama")
    got = page_results["models"]["imported-llama"]["chat"]
    assert got["text"] == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert got["token_ids"] == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    answer = rt.load(path).chat(MESSAGES, max_new_tokens=8)
    assert got["answer"] == answer.token_ids[0]
    # the page's chat button streams the same answer
    assert page_results["chat_ui"] == {"button": "chat", "text": answer.texts[0]}


@pytest.mark.slow
def test_greedy_ids_equal_python(page_results):
    # Both KV-cache layouts, a batch of two prompts of different lengths.
    for path in page_results["packages"].values():
        got = page_results["models"][path.name]
        if "greedy" not in got:
            continue
        want = [g.token_ids[0] for g in rt.load(path).generate(PROMPTS, max_new_tokens=8)]
        assert got["greedy"] == want, path.name


@pytest.mark.slow
def test_classify_and_embed_within_1e_4(page_results):
    for path in ARTIFACTS:
        got = page_results["models"][path.name]
        model = rt.load(path)
        if "classify" in got:
            for mine, theirs in zip(got["classify"], model.classify(TEXTS)):
                assert mine.keys() == theirs.probabilities.keys()
                assert max(abs(mine[k] - theirs.probabilities[k]) for k in mine) <= 1e-4
        if "embed" in got and model.manifest.arch == "encoder":
            np.testing.assert_allclose(np.array(got["embed"]), model.embed(TEXTS), atol=1e-4)


@pytest.mark.slow
def test_a_missing_package_is_a_readable_message_in_the_page(page_results):
    assert page_results["broken"]["no-such-package"]["text"].startswith("error[E_MANIFEST]: package file 'manifest.json' is not at"), page_results["broken"]


@pytest.mark.slow
def test_broken_packages_are_readable_messages_in_the_page(page_results):
    broken = page_results["broken"]
    assert broken["missing-file"]["text"].startswith("error[E_MISSING_FILE]: package file 'tokenizer.json' is not at")
    assert "(HTTP 404)" in broken["missing-file"]["text"]
    assert broken["checksum"]["text"].startswith("error[E_CHECKSUM]: package file 'tokenizer.json' has sha256")
    assert broken["format-version"]["text"].startswith("error[E_FORMAT_VERSION]:"), broken["format-version"]["text"]
    large = broken["too-large"]
    assert large["text"].startswith("error[E_PACKAGE]: package too-large holds 3072.") and "nothing was downloaded" in large["text"]
    assert large["requested"] == ["/packages/too-large/manifest.json"]  # refused before any other download


@pytest.mark.slow
def test_a_prompt_over_the_context_is_a_readable_message_in_the_page(page_results):
    assert page_results["long_prompt"].startswith("error[E_TOO_LONG]:"), page_results["long_prompt"]


@pytest.mark.slow
def test_the_same_page_as_static_files(tmp_path):
    """`onnxformer web --out DIR` writes the page, the runtime and the packages; a plain static
    server (only the isolation headers added) serves it and the page runs the packages."""
    if not Path("/usr/bin/chromium").exists() or not (NODE / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs Debian's chromium and runtime/node/node_modules (npm ci)")
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from onnxformer.runtime.cli import main
    from onnxformer.runtime.web import ISOLATION_HEADERS

    out = tmp_path / "site"
    assert main(["web", *(str(p) for p in ARTIFACTS), "--out", str(out)]) == 0
    assert (out / "rt" / "node_modules" / "onnxruntime-web" / "dist" / "ort-wasm-simd-threaded.jsep.wasm").is_file()

    class Static(SimpleHTTPRequestHandler):
        def end_headers(self):
            for key, value in ISOLATION_HEADERS.items():
                self.send_header(key, value)
            super().end_headers()

        def log_message(self, *args):
            pass

    Static.extensions_map = {**Static.extensions_map, ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Static, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = {"prompts": PROMPTS[:1], "texts": TEXTS[:1]}
        done = subprocess.run(["node", "test/browser_check.mjs", f"http://127.0.0.1:{server.server_port}/", json.dumps(spec)],
                              cwd=NODE, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.shutdown()
        server.server_close()
    assert result["isolated"] and all(r["ok"] for r in result["loaded"]) and len(result["loaded"]) == len(ARTIFACTS)
    decoder = next(p for p in ARTIFACTS if p.name == "decoder")
    assert result["models"]["decoder"]["greedy"] == [g.token_ids[0] for g in rt.load(decoder).generate(PROMPTS[:1], max_new_tokens=8)]


def test_the_server_serves_the_page_isolated_and_nothing_else():
    """No browser needed: the headers that make threads work, the listing, and only the page's files."""
    if not (NODE / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("needs runtime/node/node_modules with onnxruntime-web (npm ci)")
    import urllib.error
    import urllib.request

    from onnxformer.runtime.web import serve_in_thread

    decoder = ROOT / "artifacts" / "decoder"
    server, _ = serve_in_thread({"decoder": decoder})
    base = f"http://127.0.0.1:{server.server_port}"

    def get(path: str):
        try:
            with urllib.request.urlopen(base + path) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, b""

    try:
        status, headers, body = get("/")
        assert status == 200 and b"importmap" in body
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert json.loads(get("/packages.json")[2]) == [{"name": "decoder", "url": "packages/decoder/"}]
        assert get("/packages/decoder/manifest.json")[2] == (decoder / "manifest.json").read_bytes()
        status, headers, _ = get("/rt/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.jsep.wasm")
        assert status == 200 and headers["Content-Type"] == "application/wasm"
        assert get("/rt/model.js")[0] == 200
        for path in ("/rt/test/parity.test.js", "/rt/package.json", "/rt/node_modules/onnxruntime-web/package.json",
                     "/rt/node_modules/onnxruntime-web/dist/ort.node.min.mjs", "/packages/decoder/../encoder/manifest.json",
                     "/packages/decoder/%2e%2e/encoder/manifest.json", "/packages/nope/manifest.json", "/packages/decoder/"):
            assert get(path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_progress_is_reported_for_every_file(page_results):
    manifest = json.loads((ROOT / "artifacts" / "decoder" / "manifest.json").read_text())
    sizes = {manifest["tokenizer"]["file"]: manifest["tokenizer"]["bytes"]}
    for graph in manifest["graphs"].values():
        sizes |= {graph["file"]: graph["bytes"]} | {e["file"]: e["bytes"] for e in graph["external_data"]}
    last = {}
    for event in page_results["progress"]:
        assert 0 < event["loaded"] <= event["total"]
        last[event["file"]] = event
    assert {f: (e["loaded"], e["total"]) for f, e in last.items() if f != "manifest.json"} == {f: (n, n) for f, n in sizes.items()}


@pytest.mark.slow
def test_webgpu_greedy_ids_and_classes_equal_python():
    """provider=webgpu on Chromium's SwiftShader adapter (WebGPU on the CPU: correctness, not speed)."""
    if not Path("/usr/bin/chromium").exists() or not (NODE / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs Debian's chromium and runtime/node/node_modules (npm ci)")
    from onnxformer.runtime.web import serve_in_thread

    server, _ = serve_in_thread({p.name: p for p in ARTIFACTS})
    try:
        spec = {"prompts": PROMPTS, "texts": TEXTS, "webgpu": True}
        done = subprocess.run(["node", "test/browser_check.mjs", f"http://127.0.0.1:{server.server_port}/", json.dumps(spec)],
                              cwd=NODE, capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["adapter"] is None:
        pytest.skip("this chromium has no WebGPU adapter, not even SwiftShader")
    assert all(r["ok"] for r in result["loaded"]), result["loaded"]
    for path in ARTIFACTS:
        got, model = result["models"][path.name], rt.load(path)
        if model.manifest.arch == "encoder-decoder":
            # onnxruntime-web 1.30's WebGPU MultiHeadAttention takes no mask (the cross-attention's
            # padding mask): a known limitation, runtime/node/README.md; wasm runs it
            assert "Mask not supported" in got["error"], got
            continue
        assert "error" not in got, got
        if "greedy" in got:
            # each prompt alone; a batch of rows of different lengths diverges on WebGPU in the
            # "shared" layout (open: runtime/node/README.md), so only the "concat" layout's batch is checked
            want = [g.token_ids[0] for g in model.generate(PROMPTS, max_new_tokens=8)]
            assert got["greedy_alone"] == want, path.name
            if got["kv_cache"] != "shared":
                assert got["greedy"] == want, path.name
        if "classify" in got:
            for mine, theirs in zip(got["classify"], model.classify(TEXTS)):
                assert max(abs(mine[k] - theirs.probabilities[k]) for k in mine) <= 1e-4
