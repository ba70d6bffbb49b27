"""The JavaScript runtime in a real browser: `onnxformer web` serves the page, Debian's headless
Chromium (driven by playwright-core, runtime/node/test/browser_check.mjs) runs the artifacts in
it, and the results are compared with the Python runtime."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import onnxformer.runtime as rt

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "runtime" / "node"
ARTIFACTS = sorted(p for p in (ROOT / "artifacts").iterdir() if (p / "manifest.json").is_file())
PROMPTS = ["three hundred", "Café naïve 😀"]
TEXTS = ["the food was not good", "a wonderful, moving film", "日本語\tand\nnewlines"]


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
    server, _ = serve_in_thread({p.name: p for p in ARTIFACTS} | broken)
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        spec = {"prompts": PROMPTS, "texts": TEXTS, "broken": [*broken, "no-such-package"],
                "long_prompt": {"package": "decoder", "text": "one two three " * 200}}
        done = subprocess.run(["node", "test/browser_check.mjs", url, json.dumps(spec)],
                              cwd=NODE, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_every_artifact_loads_in_the_page_with_threads(page_results):
    assert page_results["isolated"], "COOP/COEP headers missing: no wasm threads"
    assert {r["name"] for r in page_results["loaded"] if r["ok"]} == {p.name for p in ARTIFACTS}, page_results["loaded"]


@pytest.mark.slow
def test_greedy_ids_equal_python(page_results):
    # Both KV-cache layouts, a batch of two prompts of different lengths.
    for path in ARTIFACTS:
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
