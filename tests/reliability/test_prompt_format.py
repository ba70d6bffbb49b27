"""Issue 14: the prompt format a model was trained with travels in the package, and every
runtime applies it, so what training scores is what a user's own prompt gets.

The end-to-end case trains a small sft decoder on a user's JSONL of dates ("February 17,
2001" -> "2001-02-17"), exports it, and calls the package with the user's bare prompt in
Python, the CLI and Node. The figure training reports (valid/exact_match) is recomputed
independently: one runtime call per held-out row, compared with the file's target.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from onnxformer.runtime.errors import InputError, PackageError
from onnxformer.runtime.prompt_format import PromptFormat

from reliability_support import rewrite_manifest, run_cli

from support import HAS_NODE, NODE_DIR  # noqa: E402
MONTHS = ("January February March April May June July August September October November December").split()


def _dates(count: int, offset: int) -> list[dict[str, str]]:
    rows = []
    for i in range(offset, offset + count):
        year, month, day = 1990 + i % 30, 1 + (i * 7) % 12, 1 + (i * 11) % 28
        rows.append({"source": f"{MONTHS[month - 1]} {day}, {year}", "target": f"{year}-{month:02d}-{day:02d}"})
    return rows


def _with_format(data: dict, value) -> None:
    """The manifest as a re-export of a model trained with `value` writes it: the field and model_config's."""
    data["prompt_format"] = data["model_config"]["prompt_format"] = value


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dates_package(tmp_path_factory):
    """(package, train rows, valid rows, training's final metrics): an sft decoder trained on the
    user's dates; its valid file holds half training rows (learnt) and half unseen ones."""
    pytest.importorskip("torch")
    from onnxformer.export.exporter import export_checkpoint
    from onnxformer.modeling.train import TrainConfig, train

    root = tmp_path_factory.mktemp("dates")
    train_rows = _dates(24, 0)
    valid_rows = train_rows[:6] + _dates(6, 100)
    config = TrainConfig(arch="decoder", task="sft", data=str(_write(root / "train.jsonl", train_rows)),
                         valid_data=str(_write(root / "valid.jsonl", valid_rows)), out_dir=str(root / "run"),
                         steps=300, batch_size=24, lr=3e-3, warmup=20, vocab_size=400, max_len=48, eval_every=1000,
                         progress=False)
    result = train(config)
    export_checkpoint(result.run_dir, root / "package")
    return root / "package", train_rows, valid_rows, result.metrics


def test_the_format_travels_and_the_users_prompt_gets_the_trained_answer(dates_package):
    import onnxformer.runtime as rt

    package, train_rows, _, _ = dates_package
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["prompt_format"] == {"template": "{prompt} =", "strip": True}
    assert manifest["producer"]["decoder_graph"] == "built"  # the format is text: the fast graph still applies
    model = rt.load(package, threads=1)
    sources, targets = [r["source"] for r in train_rows], [r["target"] for r in train_rows]
    answers = [g.text for g in model.generate(sources)]
    learnt = sum(a == t for a, t in zip(answers, targets))
    assert learnt >= len(train_rows) - 2, list(zip(answers, targets))
    # raw=True sends the text as given: the formatted text gives the same tokens, unparsed
    raw = model.generate([s + " =" for s in sources], raw=True)
    assert [g.text.strip() for g in raw] == answers
    assert [g.token_ids for g in raw] == [g.token_ids for g in model.generate(sources)]
    # stream yields the pieces of generate's text
    assert "".join(model.stream(sources[0])) == answers[0]


def test_trainings_exact_match_is_what_the_runtime_gives(dates_package):
    import onnxformer.runtime as rt

    package, _, valid_rows, metrics = dates_package
    model = rt.load(package, threads=1)
    hits = sum(g.text == r["target"] for g, r in zip(model.generate([r["source"] for r in valid_rows]), valid_rows))
    assert metrics["valid/exact_match"] == pytest.approx(hits / len(valid_rows))
    assert 0 < hits  # the learnt half is answered, so the equality above compares real figures


def test_cli_applies_the_format_and_strips_crlf_from_stdin(dates_package):
    package, train_rows, _, _ = dates_package
    rows = train_rows[:2]
    stdin = "".join(r["source"] + "\r\n" for r in rows)
    out = run_cli(["generate", str(package), "--json"], stdin=stdin)
    assert out.rc == 0, out
    results = json.loads(out.out)
    assert [r["prompt"] for r in results] == [r["source"] for r in rows]  # no \r left
    assert [r["texts"][0] for r in results] == [r["target"] for r in rows]
    raw = run_cli(["generate", str(package), rows[0]["source"] + " =", "--raw", "--json"])
    assert raw.rc == 0, raw
    assert json.loads(raw.out)[0]["texts"][0].strip() == rows[0]["target"]


def test_crlf_stdin_on_a_raw_package_is_read_as_lf(package_paths):
    """The issue's own case: a package without a format, prompts piped with \\r\\n endings."""
    lf = run_cli(["generate", str(package_paths["decoder"]), "--json", "--max-new-tokens", "4"], stdin="ab =\ncd =\n")
    crlf = run_cli(["generate", str(package_paths["decoder"]), "--json", "--max-new-tokens", "4"], stdin="ab =\r\ncd =\r\n")
    assert lf.rc == crlf.rc == 0, (lf, crlf)
    assert json.loads(crlf.out) == json.loads(lf.out)


@pytest.mark.skipif(not HAS_NODE, reason="needs Node and runtime/node's npm packages (npm ci)")
def test_node_applies_the_same_format(dates_package):
    package, train_rows, _, _ = dates_package
    rows = train_rows[:3]
    stdin = "".join(r["source"] + "\r\n" for r in rows)
    out = subprocess.run(["node", str(NODE_DIR / "cli.js"), "generate", str(package), "--json"], input=stdin,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["prompt"] for r in results] == [r["source"] for r in rows]
    assert [r["texts"][0] for r in results] == [r["target"] for r in rows]
    streamed = subprocess.run(["node", str(NODE_DIR / "cli.js"), "generate", str(package), "--stream", rows[0]["source"]],
                              capture_output=True, text=True, timeout=120)
    assert streamed.stdout == rows[0]["target"] + "\n", streamed.stderr


def test_old_packages_without_the_field_stay_raw(package_paths, models):
    """No prompt_format: prompts are tokenized as given (the current artifacts until re-export)."""
    model = models["decoder"]
    assert model.prompt_format is None
    assert model.generate("ab =", max_new_tokens=4)[0].token_ids == model.generate_ids(
        model.encode(["ab ="], reserve=4), max_new_tokens=4)[0].token_ids


def test_a_damaged_prompt_format_is_refused_and_re_export_advice_works(package_copy):
    import onnxformer.runtime as rt

    for bad in ({"template": "no placeholder", "strip": True}, {"template": "{prompt} {prompt}", "strip": True},
                {"template": "{prompt} =", "strip": "yes"}, {"template": "{prompt} ="}, "{prompt} ="):
        copy = package_copy("decoder")
        rewrite_manifest(copy, lambda data: _with_format(data, bad))
        with pytest.raises(PackageError) as info:
            rt.load(copy)
        assert info.value.code == "E_MANIFEST" and "prompt_format" in str(info.value) and "e-export" in str(info.value)
    # the fix: a package as the exporter writes it (here: the field as it writes it) loads
    rewrite_manifest(copy, lambda data: _with_format(data, {"template": "{prompt} =", "strip": True}))
    assert rt.load(copy).prompt_format == PromptFormat("{prompt} =")


def test_whitespace_only_prompt_is_refused_under_a_format(package_copy):
    import onnxformer.runtime as rt

    copy = package_copy("decoder")
    rewrite_manifest(copy, lambda data: _with_format(data, {"template": "{prompt} =", "strip": True}))
    model = rt.load(copy, threads=1)
    with pytest.raises(InputError, match="only whitespace"):
        model.generate(["ab", " \r\n"])
    assert model.generate(["ab", "cd"], max_new_tokens=2)  # the fix: pass text
    with pytest.raises(InputError, match="raw must be True or False"):
        model.generate("ab", raw="yes")


def test_format_and_parse_rules():
    fmt = PromptFormat("{prompt} =")
    assert fmt.format("  February 17, 2001\r\n") == "February 17, 2001 ="
    assert fmt.format("{x} {prompt}") == "{x} {prompt} ="  # braces in the prompt are text
    assert PromptFormat("Q: {prompt}\nA:").format("why?") == "Q: why?\nA:"
    assert fmt.parse(" 2001-02-17 \n") == "2001-02-17"
    pieces = [" ", " 20", "01", " ", "-", "02 ", "\n"]
    assert "".join(fmt.parse_stream(pieces)) == fmt.parse("".join(pieces)) == "2001 -02"
    assert PromptFormat("{prompt}", strip=False).format(" a ") == " a "


def test_quickstart_scores_as_a_user_calls_the_package(tmp_path):
    """artifacts/decoder was trained on "seventeen =" prompts. With the format in its manifest
    (as a re-export writes it) quickstart passes the bare sources, the runtime formats them, and
    the score is the one of hand-formatted prompts on the package as committed."""
    from support import ARTIFACTS

    from onnxformer.export.quickstart import JOBS, score_package

    job = next(j for j in JOBS if j.arch == "decoder")
    copy = tmp_path / "decoder"
    shutil.copytree(ARTIFACTS / "decoder", copy)
    rewrite_manifest(copy, lambda data: _with_format(data, {"template": "{prompt} =", "strip": True}))
    formatted, committed = score_package(copy, job, limit=100), score_package(ARTIFACTS / "decoder", job, limit=100)
    assert formatted.metric == committed.metric >= 0.9


def test_a_prompt_format_dropped_from_the_manifest_is_refused(dates_package, tmp_path):
    """A damaged or edited manifest that lost (or changed) the field would answer nonsense
    quietly; model_config keeps what training used, so load compares the two."""
    import onnxformer.runtime as rt

    package, train_rows, _, _ = dates_package
    for change in (lambda d: d.pop("prompt_format"), lambda d: d.update(prompt_format={"template": "{prompt}:", "strip": True})):
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(package, copy)
        rewrite_manifest(copy, change)
        with pytest.raises(PackageError) as info:
            rt.load(copy)
        assert info.value.code == "E_MANIFEST" and "model_config.prompt_format" in str(info.value)
        out = subprocess.run(["node", str(NODE_DIR / "cli.js"), "generate", str(copy), "x"], capture_output=True,
                             text=True, timeout=120) if HAS_NODE else None
        assert out is None or (out.returncode == 2 and "error[E_MANIFEST]" in out.stderr), out and out.stderr
        # the fix the message names: set prompt_format to the model_config's
        rewrite_manifest(copy, lambda d: d.update(prompt_format=d["model_config"]["prompt_format"]))
        assert rt.load(copy, threads=1).generate(train_rows[0]["source"])[0].text == train_rows[0]["target"]
