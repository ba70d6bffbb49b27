"""Expected outputs of the Python runtime, for the Node.js runtime's parity tests.

    python runtime/node/test/make_expected.py --out DIR PACKAGE_DIR [PACKAGE_DIR ...]

For each package, writes ``DIR/<n>-<name>.json`` with what the Python runtime (onnxruntime +
numpy + tokenizers; never torch) gives for a fixed set of inputs:

* tokenizer ids, type ids and decoded text of strings with accents, CJK, emoji, tabs, newlines;
* classification probabilities and embeddings (encoder packages);
* greedy generations: single prompts, a batch of prompts of different lengths (left padding),
  repetition penalty / n-gram ban / min_new_tokens / stop strings, and beam search;
* the error class and code of bad calls and damaged packages (damaged copies are written
  under ``DIR/damaged/``); the Python message comes along for the test's failure output only:
  the runtimes agree on codes, not on English.

``DIR/index.json`` maps each package's absolute path to its file. The Node test
(``runtime/node/test/parity.test.js``) reads it through ``ONNXFORMER_EXPECTED=DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import onnxformer.runtime as rt
from onnxformer.runtime import OnnxformerError

TOKENIZER_STRINGS = [
    "hello world",
    "Café naïve résumé façade Ångström",
    "e\u0301 vs \u00e9 (combining accent vs precomposed)",
    "Straße, Œuvre, ½ and ﬁ ligature",
    "日本語のテキストと中文字符和한국어",
    "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "tabs\tand\t\ttabs",
    "line one\nline two\r\nline three\n\n",
    "  leading and trailing spaces  ",
    "numbers 3.14159 and 1,000,000 = 12 + 7",
    "the film was [MASK] <s> </s> <pad>",
    "Ελληνικά, русский, العربية, עברית",
    "",
]

PROMPTS = [
    "hello",
    "three hundred",  # a user's prompt: a package with a prompt_format (FORMAT.md 5.2) formats it
    "Café naïve 😀",
    "日本語\tand\nnewlines",
    "a much longer prompt that has many more tokens than the other prompts in this batch",
]

CLASSIFY_TEXTS = [
    "the food was not good",
    "a wonderful, moving film",
    "Café naïve 日本語 😀",
    "short",
    "a much longer text that has many more tokens than the other texts in this batch",
    "THE FOOD WAS GOOD",  # issue 14: unknown to an uncased tokenizer trained on lowercase text
    "الطعام جيد",
]

GENERATION_CASES: list[dict[str, Any]] = [
    {"name": "single", "prompts": [PROMPTS[1]], "params": {"max_new_tokens": 12}},
    {"name": "batch-left-padded", "prompts": PROMPTS, "params": {"max_new_tokens": 12}},
    {"name": "penalties", "prompts": PROMPTS[:3],
     "params": {"max_new_tokens": 12, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}},
    {"name": "min-new-tokens", "prompts": PROMPTS[:2], "params": {"max_new_tokens": 6, "min_new_tokens": 6}},
    {"name": "stop-strings", "prompts": PROMPTS[:2], "params": {"max_new_tokens": 12, "stop_strings": ["e", "\n"]}},
    {"name": "zero-new-tokens", "prompts": PROMPTS[:1], "params": {"max_new_tokens": 0}},
    {"name": "beam", "prompts": PROMPTS[:3],
     "params": {"strategy": "beam", "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}},
]

LONG_TEXT = "word " * 300


def error_cases(model: rt.Model) -> list[dict[str, Any]]:
    """Bad calls: {call, args, options}."""
    def case(call, *args, **options):
        return {"call": call, "args": list(args), "options": options}

    cases = []
    if model.can_generate:
        limit = model.manifest.max_seq_len
        cases += [
            case("generate", []),
            case("generate", [""]),
            case("generate", ["ok", 5]),
            case("generate", "x", max_new_tokens=limit),
            case("generate", LONG_TEXT),
            case("generate", "x", top_p=1.5),
            case("generate", "x", strategy="sample", temperature=0),
            case("generate", "x", top_k=-1),
            case("generate", "x", max_new_tokens=1.5),
            case("generate", "x", strategy="nucleus"),
            case("generate", "x", top_pp=0.9),
            case("generate", "x", temprature=0.5, seeed=1),
            case("generate", "x", min_new_tokens=5, max_new_tokens=2),
            case("generate", "x", num_return_sequences=2),
            case("generate", "x", repetition_penalty=0),
            case("generate", "x", strategy="sample", seed=-1),
            case("generate", "x", num_beams=2),
            case("generate", "x", eos_token_ids=[-1]),
            case("generate", "x", pad_token_id=100000),
            case("generate", "x", stop_strings=[""]),
            case("generate", "x", temperature="hot"),
            case("generate", "x", early_stopping="yes"),
            case("generate", "x", strategy="beam", stop_strings=["x"]),
            case("generate_ids", [[1, 100000]]),
            case("generate_ids", [[]]),
            case("generate_ids", [[-1]]),
            case("generate_ids", [[1, 1.5]]),
            case("stream", ["a", "b"]),
            case("stream", "x", strategy="beam", num_beams=2),
            case("generate", "x", strategy="beam", num_beams=model.dims.vocab_size + 1, max_new_tokens=2),
            case("generate", "x", strategy="sample", num_return_sequences=4097, max_new_tokens=2),
            case("generate_ids", [[1]], strategy="beam", num_beams=5000, num_return_sequences=4097),
            case("stream", "x", strategy="sample", num_return_sequences=4097),
        ]
    if "encoder" not in model.sessions:
        cases.append(case("embed", ["x"]))
    if model.can_classify:
        cases += [
            case("classify", []),
            case("classify", ""),
            case("classify", ["a", None]),
            case("classify", LONG_TEXT),
        ]
    else:
        cases.append(case("classify", ["x"]))
    if "encoder" in model.sessions:
        cases += [case("embed", "x", pooling="max"), case("embed", [LONG_TEXT, "x"], batch_size=1),
                  case("embed", "x", normalize="yes")]
    if model.chat_template is None:  # issue 15: chat needs a package with a chat template
        cases += [case("chat", [{"role": "user", "content": "hi"}]), case("render_chat", [{"role": "user", "content": "hi"}])]
    if not model.can_generate:
        cases += [case("generate", "x"), case("stream", "x")]
    cases += [case("decode", [999999]), case("decode", [1, -1])]  # issue 14: Node decoded them to ""
    if model.can_generate:
        cases.append(case("generate", "x", strategy="beam", num_beams=1000, max_new_tokens=2))
    return cases


def record_error(fn) -> dict[str, str] | None:
    try:
        fn()
    except OnnxformerError as err:
        return {"error": type(err).__name__, "code": err.code, "python_message": str(err)}
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def damaged_packages(package: Path, out: Path, prefix: str) -> list[dict[str, Any]]:
    """Damaged copies of `package` (hard links where a file is unchanged) and the load error each gives."""
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    graph_file = next(iter(manifest["graphs"].values()))["file"]
    tokenizer_file = manifest["tokenizer"]["file"]

    def copy(name: str) -> Path:
        target = out / "damaged" / f"{prefix}-{name}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for f in package.iterdir():
            if f.is_file():
                _link_or_copy(f, target / f.name)
        return target

    def rewrite(path: Path, data: bytes) -> None:
        path.unlink()  # never write through a hard link into the original package
        path.write_bytes(data)

    def edit_manifest(target: Path, change) -> None:
        data = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        change(data)
        rewrite(target / "manifest.json", json.dumps(data, indent=2).encode())

    def set_graph_file(target: Path, data: bytes) -> None:  # a changed graph with a matching checksum
        rewrite(target / graph_file, data)
        entry = rt.manifest.FileEntry.of(target, graph_file)
        edit_manifest(target, lambda d: d["graphs"][first_graph].update(sha256=entry.sha256, bytes=entry.bytes))

    def set_generation(**generation):
        return lambda d: d.update(generation=generation)

    first_graph = next(iter(manifest["graphs"]))
    vocab = manifest["dims"]["vocab_size"]
    cases: list[Path | tuple[Path, dict[str, Any]]] = []
    for name, change in [  # bad generation defaults and file entries: E_MANIFEST when the package loads
        ("generation-strategy", set_generation(strategy="nucleus")),
        ("generation-unknown", set_generation(temprature=0.5)),
        ("generation-rule", set_generation(min_new_tokens=5, max_new_tokens=2)),
        ("generation-eos", set_generation(eos_token_ids=[vocab])),
        ("generation-pad", set_generation(pad_token_id=vocab)),
        ("generation-not-object", lambda d: d.update(generation=["greedy"])),
        ("chat-template-type", lambda d: d.update(chat_template=5)),  # issue 15: what an import brings
        ("chat-tokens-value", lambda d: d.update(chat_tokens={"eos_token": 2})),
        ("embedding-pooling", lambda d: d.update(embedding={"pooling": "max", "normalize": True})),
        ("embedding-unknown", lambda d: d.update(embedding={"pooling": "mean", "prefix": "query: "})),
        ("source-type", lambda d: d.update(source=["huggingface"])),
        ("sha256-uppercase", lambda d: d["tokenizer"].update(sha256=d["tokenizer"]["sha256"].upper())),
        ("sha256-short", lambda d: d["graphs"][first_graph].update(sha256="abc123")),
        ("bytes-negative", lambda d: d["tokenizer"].update(bytes=-1)),
        ("bytes-fraction", lambda d: d["graphs"][first_graph].update(bytes=10.5)),
        ("bytes-string", lambda d: d["tokenizer"].update(bytes="10")),
    ]:
        target = copy(name)
        edit_manifest(target, change)
        cases.append(target)
    external = manifest["graphs"][first_graph].get("external_data", [])
    if external:  # FORMAT.md 2.5: a graph's external-data locations, checked before onnxruntime opens it
        data_file = external[0]["file"]
        target = copy("external-unlisted")
        edit_manifest(target, lambda d: d["graphs"][first_graph].update(external_data=[]))
        cases.append(target)
        for name, location in [("external-parent", "../" + data_file[3:]), ("external-colon", "C:" + data_file[2:]),
                               ("external-unlisted-name", "x" + data_file[1:])]:
            target = copy(name)  # the same length: the protobuf stays valid
            set_graph_file(target, (package / graph_file).read_bytes().replace(data_file.encode(), location.encode()))
            cases += [target, (target, {"verify": False})]
        target = copy("external-link")  # a listed file that is a link leading out of the package
        (target / data_file).unlink()
        os.symlink((package / data_file).resolve(), target / data_file)
        cases += [target, (target, {"verify": False})]
    target = copy("empty-graph")
    set_graph_file(target, b"")
    cases.append(target)
    target = copy("garbage-graph")  # not protobuf: refused by the external-data walk or by onnxruntime
    set_graph_file(target, b"\xff" * 64)
    cases.append(target)
    # issue 14: the manifest checked against itself: max_seq_len above model_config's (and, for
    # a built decoder, above its rotary cos/sin caches); one label name too many
    target = copy("max-seq-len")
    edit_manifest(target, lambda d: d.update(max_seq_len=4096))
    cases.append(target)
    target = copy("max-seq-len-graph")
    edit_manifest(target, lambda d: (d.update(max_seq_len=4096), d["model_config"].pop("max_seq_len", None)))
    if rt.safety.position_tables(target / graph_file):
        cases.append(target)
    eos = manifest["special_tokens"].get("eos", -1)
    if eos >= 0:  # a tokenizer without the manifest's eos token (its checksum updated): E_TOKENIZER
        target = copy("tokenizer-lacks-special")
        tok = json.loads((target / tokenizer_file).read_text(encoding="utf-8"))
        name = next((t["content"] for t in tok.get("added_tokens", []) if t["id"] == eos), None)
        tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["id"] != eos]
        vocab_map = tok["model"].get("vocab")
        if name is not None and isinstance(vocab_map, dict):
            vocab_map.pop(name, None)
            rewrite(target / tokenizer_file, json.dumps(tok).encode())
            entry = rt.manifest.FileEntry.of(target, tokenizer_file)
            edit_manifest(target, lambda d: d["tokenizer"].update(sha256=entry.sha256, bytes=entry.bytes))
            cases.append(target)
    target = copy("label-names-count")
    edit_manifest(target, lambda d: d.update(label_names=[f"L{i}" for i in range(d["dims"].get("num_labels", 0) + 1)]))
    cases.append(target)
    target = copy("format-version")
    edit_manifest(target, lambda d: d.update(format_version=99))
    cases.append(target)
    target = copy("kv-cache-version")  # a version that disagrees with the KV-cache layout
    edit_manifest(target, lambda d: d.update(format_version=1 if d.get("kv_cache") == "shared" else 2))
    cases.append(target)
    target = copy("kv-cache-layout")  # the other layout, consistently versioned: the graphs no longer match
    edit_manifest(target, lambda d: d.update(kv_cache="concat", format_version=1) if d.get("kv_cache") == "shared"
                  else d.update(kv_cache="shared", format_version=2))
    cases.append(target)
    target = copy("kv-cache-unknown")
    edit_manifest(target, lambda d: d.update(kv_cache="paged"))
    cases.append(target)
    target = copy("wrong-format")
    edit_manifest(target, lambda d: d.update(format="something-else"))
    cases.append(target)
    target = copy("missing-field")
    edit_manifest(target, lambda d: d.pop("graphs"))
    cases.append(target)
    target = copy("missing-graph")
    (target / graph_file).unlink()
    cases.append(target)
    target = copy("altered-tokenizer")
    data = bytearray((package / tokenizer_file).read_bytes())
    data[len(data) // 2] ^= 0x01
    rewrite(target / tokenizer_file, bytes(data))
    cases.append(target)
    target = copy("truncated-graph")
    rewrite(target / graph_file, (package / graph_file).read_bytes()[:-10])
    cases.append(target)
    target = copy("no-manifest")
    (target / "manifest.json").unlink()
    cases.append(target)
    cases.append(out / "damaged" / f"{prefix}-does-not-exist")

    results = []
    for path, options in (c if isinstance(c, tuple) else (c, {}) for c in cases):
        path_text = str(path)
        found = record_error(lambda: rt.load(path_text, **options))
        if found is None:
            raise AssertionError(f"damaged package {path_text} ({options}) loaded in the Python runtime")
        results.append({"call": "load", "args": [path_text], "options": options, **found})
    for options in ({"provider": "tpu"}, {"threads": -1}):  # bad load options on the intact package
        results.append({"call": "load", "args": [str(package)], "options": options,
                        **record_error(lambda: rt.load(package, **options))})
    return results


def expected_for(package: Path, out: Path, prefix: str) -> dict[str, Any]:
    model = rt.load(package)
    tok = model.tokenizer
    data: dict[str, Any] = {"package": str(package), "arch": model.arch}
    data["tokenizer"] = []
    for text in TOKENIZER_STRINGS:
        enc = tok.encode(text)
        data["tokenizer"].append({"text": text, "ids": enc.ids, "type_ids": enc.type_ids,
                                  "decoded": tok.decode(enc.ids, skip_special_tokens=True)})
    if model.can_classify:
        results = model.classify(CLASSIFY_TEXTS, batch_size=2)
        data["classify"] = {"texts": CLASSIFY_TEXTS, "options": {"batch_size": 2},
                            "results": [{"label": r.label, "score": r.score, "probabilities": r.probabilities,
                                         "unknown_fraction": r.unknown_fraction} for r in results]}
    data["unknown_fractions"] = {"texts": CLASSIFY_TEXTS, "values": model.unknown_fractions(CLASSIFY_TEXTS)}
    if "encoder" in model.sessions:
        data["embed"] = [
            {"texts": CLASSIFY_TEXTS, "options": options, "vectors": model.embed(CLASSIFY_TEXTS, **options).tolist()}
            for options in ({"pooling": "mean"}, {"pooling": "cls", "normalize": False, "batch_size": 3},
                            {"pooling": "mean", "truncate": True, "batch_size": 2})
        ]
        data["embed"][-1]["texts"] = [LONG_TEXT, *CLASSIFY_TEXTS[:2]]
        data["embed"][-1]["vectors"] = model.embed(data["embed"][-1]["texts"], pooling="mean", truncate=True,
                                                   batch_size=2).tolist()
    if model.can_generate:
        data["generate"] = []
        for case in GENERATION_CASES:
            results = model.generate(case["prompts"], **case["params"])
            data["generate"].append({**case, "results": [
                {"texts": r.texts, "token_ids": r.token_ids, "scores": r.scores, "finish_reasons": r.finish_reasons}
                for r in results]})
        truncated = model.generate([LONG_TEXT], max_new_tokens=4, truncate=True)[0]
        data["generate"].append({"name": "truncate", "prompts": [LONG_TEXT],
                                 "params": {"max_new_tokens": 4, "truncate": True},
                                 "results": [{"texts": truncated.texts, "token_ids": truncated.token_ids,
                                              "scores": truncated.scores, "finish_reasons": truncated.finish_reasons}]})
        data["stream"] = [{"prompt": p, "params": {"max_new_tokens": 12}, "pieces": list(model.stream(p, max_new_tokens=12))}
                          for p in PROMPTS[:3]]
    data["errors"] = []
    for case in error_cases(model):
        found = record_error(lambda: getattr(model, case["call"])(*case["args"], **case["options"]))
        if found is None:
            raise AssertionError(f"{package}: {case} raised no error in the Python runtime")
        data["errors"].append({**case, **found})
    data["errors"] += damaged_packages(package, out, prefix)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the expected JSON files")
    parser.add_argument("packages", nargs="+", type=Path, help="package directories")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    index = {}
    for n, package in enumerate(args.packages):
        package = package.resolve()
        prefix = f"{n}-{package.name}"
        name = f"{prefix}.json"
        data = expected_for(package, args.out.resolve(), prefix)
        (args.out / name).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        index[str(package)] = name
        print(f"wrote {args.out / name} ({data['arch']})")
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
