"""Issue 15: what an imported Hugging Face model brings travels in the package (chat template,
eos id lists, embedding defaults, where it came from), and both runtimes render the chat
template as transformers does.

One tiny Llama folder (random weights, a byte-level BPE with ChatML and Llama-3 control tokens,
the ChatML template in tokenizer_config.json, two eos ids in generation_config.json) is exported
once; copies of the package carry other real-world-shaped templates (Llama 3, Zephyr, Mistral, and
one with the Jinja features templates use: generation blocks, tojson, loop controls, namespace).
The reference is transformers itself: `apply_chat_template` for the rendered text and ids,
`generate` for the greedy answer. The Node runtime runs once, in one process, over every case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_support import hf_tokenizer, save_hf, torch, transformers
from support import CHATML, LLAMA3

import onnxformer.runtime as rt
from onnxformer.runtime.errors import ConfigError, InputError, PackageError

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "runtime" / "node"
HAS_NODE = shutil.which("node") is not None and (NODE_DIR / "node_modules" / "@huggingface" / "jinja").is_dir()
NEEDS_NODE = pytest.mark.skipif(not HAS_NODE, reason="needs Node and runtime/node's npm packages (npm ci)")
pytest.importorskip("jinja2", reason="chat templates need jinja2 (pip install 'onnxformer[chat]')")
EXPORTS = pytest.mark.slow  # the tests on the exported folder (its export takes ~10 s, once per module)

CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# Templates as their models ship them (Qwen2 ChatML, Llama 3 Instruct, Zephyr, Mistral v0.1).
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
        {{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
        {{ '<|assistant|>\\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
        {{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# What templates use beyond those: {% generation %} (assistant masks), tojson with its options,
# loop controls, namespace, strftime_now (the year's length: the same every day).
FEATURES = (
    "{% set ns = namespace(turns=0) %}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m | tojson }}"
    "{{ m['content'] | tojson(indent=2) }}{% endif %}\n{% set ns.turns = ns.turns + 1 %}{% endfor %}"
    "{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"
    "{{ strftime_now('%Y') | length }}{{ ns.turns }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR, "mistral": MISTRAL, "features": FEATURES}

SYSTEM = {"role": "system", "content": "You answer in colours."}
CONVERSATIONS = [
    [{"role": "user", "content": "one red cat."}],
    [SYSTEM, {"role": "user", "content": "two blue dogs."}],
    [SYSTEM, {"role": "user", "content": "three green sun."}, {"role": "assistant", "content": " four cafe sea.\n"},
     {"role": "user", "content": "naïve\tcafé 日本 🙂 {{ not a tag }}"}],
    [{"role": "user", "content": "five"}, {"role": "assistant", "content": "six"}, {"role": "user", "content": "seven"}],
]


def conversations_for(name: str) -> list[list[dict]]:
    """Mistral's template refuses system messages (raise_exception): it gets the others."""
    return [c for c in CONVERSATIONS if name != "mistral" or all(m["role"] != "system" for m in c)]


def _pick_eos(sequence: list[int]) -> list[int]:
    """Two eos ids for a greedy answer: the second listed first appears at position k >= 2, the
    first never before it, so the answer stops at k only if every listed id is an eos."""
    for k in range(2, len(sequence)):
        if sequence[k] not in sequence[:k]:
            later = next((t for t in sequence[k + 1:] if t not in sequence[:k + 1]), None)
            return [later if later is not None else 5, sequence[k]]
    raise AssertionError(f"the greedy answer {sequence} repeats from the start; change the seed")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The HF folder, its package, copies with the other templates, the reference tokenizer and model."""
    from onnxformer.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("hf-chat")
    tokenizer = hf_tokenizer(280, bos=BOS, eos=EOS, pad="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
        # config.json's eos is the turn end, the tokenizer's eos_token the text end (as Llama 3 Instruct's
        # and Phi-3's differ): a template's eos_token is the tokenizer's, the manifest's eos the config's
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_dict=False)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    eos = _pick_eos(free)
    model.generation_config.eos_token_id = eos
    model.generation_config.max_new_tokens = 20
    hf_dir = save_hf(model, tokenizer, root / "hf")
    export_checkpoint(hf_dir, root / "chatml")
    packages = {"chatml": root / "chatml"}
    for name, template in TEMPLATES.items():
        if name != "chatml":
            packages[name] = root / name
            shutil.copytree(root / "chatml", packages[name])
            _rewrite(packages[name], lambda d, t=template: d.update(chat_template=t))
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return {"hf_dir": hf_dir, "packages": packages, "tokenizer": reference, "model": model, "eos": eos}


def _rewrite(directory: Path, change) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _expected(chat, name: str, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    tok = chat["tokenizer"]
    kwargs = dict(chat_template=TEMPLATES[name], add_generation_prompt=add_generation_prompt)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs), \
        tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def _reference_answer(chat, ids: list[int]) -> list[int]:
    """transformers' greedy answer with the folder's eos ids and max_new_tokens (20)."""
    return _reference_only(chat, ids, chat["eos"])


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


@EXPORTS
def test_the_package_carries_the_template_the_eos_ids_and_the_source(chat):
    manifest = json.loads((chat["packages"]["chatml"] / "manifest.json").read_text())
    assert manifest["chat_template"] == CHATML  # read from tokenizer_config.json by the import
    assert manifest["generation"]["eos_token_ids"] == chat["eos"]  # generation_config.json's list
    assert manifest["generation"]["max_new_tokens"] == 20
    assert manifest["source"] == {"format": "huggingface", "model_type": "llama", "family": manifest["source"]["family"],
                                  "architectures": ["LlamaForCausalLM"]}
    assert "embedding" not in manifest  # a decoder: nothing to embed with
    tokenizer = chat["tokenizer"]
    assert manifest["chat_tokens"] == {"bos_token": BOS, "eos_token": EOS, "pad_token": "<pad>"}
    assert manifest["special_tokens"]["eos"] == tokenizer.convert_tokens_to_ids("<|eot_id|>") != tokenizer.eos_token_id
    model = rt.load(chat["packages"]["chatml"], threads=1)
    assert model.chat_template == CHATML and model.manifest.source["model_type"] == "llama"
    from onnxformer.runtime.manifest import Manifest

    again = Manifest.from_dict(model.manifest.to_dict())
    assert (again.chat_template, again.source, again.embedding) == (CHATML, model.manifest.source, None)


def test_packages_without_the_fields_still_load(tmp_path):
    package = REPO / "artifacts" / "decoder"
    if not (package / "manifest.json").is_file():
        pytest.skip("artifacts/decoder is absent")
    model = rt.load(package, threads=1)
    assert model.chat_template is None and model.manifest.source == {} and model.manifest.embedding is None
    with pytest.raises(InputError) as info:
        model.chat([{"role": "user", "content": "hi"}])
    assert info.value.code == "E_WRONG_KIND" and "chat template" in str(info.value)


# (field, bad value, what the message names); applied to the decoder package unless noted
BAD_FIELDS = [
    ("chat_template", 5, "chat_template"),
    ("chat_template", "", "chat_template"),
    ("chat_template", ["{{ x }}"], "chat_template"),
    ("embedding", "mean", "embedding"),
    ("embedding", {"pooling": "max", "normalize": True}, "embedding.pooling"),
    ("embedding", {"pooling": "mean", "normalize": "yes"}, "embedding.normalize"),
    ("embedding", {"pooling": "mean", "prefix": "query: "}, "prefix"),
    ("embedding", {"pooling": "mean", "normalize": True}, "encoder graph"),  # a decoder has no encoder
    ("chat_tokens", {"eos_token": 2}, "chat_tokens"),
    ("chat_tokens", {"eos": "</s>"}, "chat_tokens"),
    ("source", ["huggingface"], "source"),
    ("source", {"model_type": 3}, "source.model_type"),
    ("source", {"architectures": "LlamaForCausalLM"}, "source.architectures"),
]


@EXPORTS
def test_bad_fields_are_refused_with_e_manifest(chat, tmp_path):
    for i, (key, value, named) in enumerate(BAD_FIELDS):
        copy = tmp_path / f"bad-{i}"
        shutil.copytree(chat["packages"]["chatml"], copy)
        _rewrite(copy, lambda d: d.update({key: value}))
        with pytest.raises(PackageError) as info:
            rt.load(copy, threads=1)
        assert info.value.code == "E_MANIFEST" and named in str(info.value), (key, value, str(info.value))


def test_a_chat_template_on_an_encoder_is_refused(tmp_path):
    package = REPO / "artifacts" / "encoder"
    if not (package / "manifest.json").is_file():
        pytest.skip("artifacts/encoder is absent")
    copy = tmp_path / "encoder"
    shutil.copytree(package, copy)
    _rewrite(copy, lambda d: d.update(chat_template=CHATML))
    with pytest.raises(PackageError) as info:
        rt.load(copy, threads=1)
    assert info.value.code == "E_MANIFEST" and "chat_template" in str(info.value)


# --------------------------------------------------------------------------------------------
# Rendering: what transformers' apply_chat_template gives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@EXPORTS
def test_render_chat_is_transformers_apply_chat_template(chat, name):
    model = rt.load(chat["packages"][name], threads=1)
    for messages in conversations_for(name):
        for add_generation_prompt in (True, False):
            text, ids = _expected(chat, name, messages, add_generation_prompt)
            prompt = model.render_chat(messages, add_generation_prompt=add_generation_prompt)
            assert prompt.text == text, (name, messages)
            assert prompt.token_ids == ids, (name, messages)


@EXPORTS
def test_no_double_bos(chat):
    """Llama 3's template writes <|begin_of_text|>; the tokenizer's template would add another."""
    model = rt.load(chat["packages"]["llama3"], threads=1)
    bos = model.manifest.special("bos")
    prompt = model.render_chat(CONVERSATIONS[1])
    assert prompt.token_ids[0] == bos and prompt.token_ids.count(bos) == 1
    assert model.encode([prompt.text])[0][:2] == [bos, bos]  # the mistake render_chat avoids


@EXPORTS
def test_a_template_refusing_the_conversation_and_bad_messages(chat):
    model = rt.load(chat["packages"]["mistral"], threads=1)
    with pytest.raises(InputError) as info:
        model.render_chat([SYSTEM, {"role": "user", "content": "hi"}])
    assert info.value.code == "E_INPUT" and "roles must alternate" in str(info.value)
    for bad, named in BAD_MESSAGES:
        with pytest.raises(InputError) as info:
            model.render_chat(bad)
        assert info.value.code == "E_INPUT" and named in str(info.value), (bad, str(info.value))


BAD_MESSAGES = [
    ("hello", "must be a list"),
    ([], "empty"),
    (["hello"], "messages[0]"),
    ([{"role": "user"}], "'content'"),
    ([{"content": "hi"}], "'role'"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "", "content": "hi"}], "role is empty"),
]


@EXPORTS
def test_without_jinja2_chat_names_the_extra(chat, monkeypatch):
    from onnxformer.runtime import chat as chat_module

    chat_module.compile_template.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    model = rt.load(chat["packages"]["chatml"], threads=1)
    try:
        with pytest.raises(ConfigError) as info:
            model.render_chat(CONVERSATIONS[0])
        assert "pip install 'onnxformer[chat]'" in str(info.value)
    finally:
        chat_module.compile_template.cache_clear()


@EXPORTS
def test_a_template_that_does_not_parse_is_the_packages_fault(chat, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(chat["packages"]["chatml"], copy)
    _rewrite(copy, lambda d: d.update(chat_template="{% for m in messages %}{{ m.content }}"))
    model = rt.load(copy, threads=1)  # jinja2 is optional: the template is compiled on first use
    with pytest.raises(PackageError) as info:
        model.render_chat(CONVERSATIONS[0])
    assert info.value.code == "E_MANIFEST" and "chat_template" in str(info.value)


# --------------------------------------------------------------------------------------------
# Generation: greedy answers equal transformers', several eos ids stop them
# --------------------------------------------------------------------------------------------


@EXPORTS
def test_greedy_chat_is_transformers_generate_and_each_eos_id_stops(chat):
    model = rt.load(chat["packages"]["chatml"], threads=1)
    for messages in CONVERSATIONS[:2]:
        _, ids = _expected(chat, "chatml", messages)
        result = model.chat(messages)  # the package's defaults: eos ids, max_new_tokens 20
        assert result.prompt == model.render_chat(messages).text
        assert result.token_ids[0] == _reference_answer(chat, ids), messages
        assert "".join(model.stream_chat(messages)) == result.text
    first = model.chat(CONVERSATIONS[0])
    assert first.finish_reasons == ["eos"] and first.token_ids[0][-1] == chat["eos"][1]  # the second listed id
    # the first listed id stops it too: with only that one, the answer runs past the second's position
    longer = model.chat(CONVERSATIONS[0], eos_token_ids=[chat["eos"][0]])
    assert len(longer.token_ids[0]) > len(first.token_ids[0])
    _, ids = _expected(chat, "chatml", CONVERSATIONS[0])
    assert longer.token_ids[0] == _reference_only(chat, ids, [chat["eos"][0]])


def _reference_only(chat, ids: list[int], eos: list[int]) -> list[int]:
    """transformers' greedy answer with these eos ids."""
    with torch.no_grad():
        out = chat["model"].generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                                     pad_token_id=0)
    return out[0, len(ids):].tolist()


def run_cli(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """`onnxformer ARGV` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from onnxformer.runtime.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.stdin = saved
    return rc, out.getvalue(), err.getvalue()


@EXPORTS
def test_cli_chat(chat):
    package = str(chat["packages"]["chatml"])
    messages = CONVERSATIONS[1]
    expected = rt.load(package, threads=1).chat(messages)
    rc, out, err = run_cli(["generate", package, messages[1]["content"], "--chat", "--system", SYSTEM["content"],
                            "--json"])
    assert rc == 0, err
    assert json.loads(out)[0]["token_ids"] == expected.token_ids
    rc, inline, err = run_cli(["generate", package, "--messages", json.dumps(messages), "--json"])
    assert rc == 0 and json.loads(inline) == json.loads(out), err
    rc, rendered, err = run_cli(["generate", package, "--messages", "-", "--render", "--json"], stdin=json.dumps(messages))
    assert rc == 0, err
    text, ids = _expected(chat, "chatml", messages)
    assert json.loads(rendered) == [{"messages": messages, "text": text, "token_ids": ids}]
    rc, _, err = run_cli(["generate", package, "--messages", '[{"role": "user"}]'])
    assert rc == 2 and "error[E_INPUT]" in err and "'content'" in err, err


# --------------------------------------------------------------------------------------------
# Embedding defaults
# --------------------------------------------------------------------------------------------


def test_embed_uses_the_packages_embedding_defaults(tmp_path):
    package = REPO / "artifacts" / "encoder"
    if not (package / "manifest.json").is_file():
        pytest.skip("artifacts/encoder is absent")
    copy = tmp_path / "encoder"
    shutil.copytree(package, copy)
    _rewrite(copy, lambda d: d.update(embedding={"pooling": "cls", "normalize": False}))
    texts = ["a b c", "the food was good"]
    plain, defaults = rt.load(package, threads=1), rt.load(copy, threads=1)
    cls_raw = plain.embed(texts, pooling="cls", normalize=False)
    np.testing.assert_array_equal(defaults.embed(texts), cls_raw)
    assert not np.allclose(np.linalg.norm(cls_raw, axis=-1), 1.0)  # the defaults differ from the built-in ones
    np.testing.assert_array_equal(defaults.embed(texts, pooling="mean", normalize=True), plain.embed(texts))
    with pytest.raises(InputError):
        defaults.embed(texts, normalize="yes")


def _wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer ([CLS] $A [SEP]) trained on hf_support.TEXTS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from hf_support import TEXTS

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=200, show_progress=False,
                                                             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def cls_embedder(tmp_path_factory):
    """A sentence-transformers folder that pools the [CLS] state and does not normalise, exported;
    with transformers' [CLS] states of SENTENCES, its recipe."""
    from onnxformer.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("st-cls")
    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64), add_pooling_layer=False).eval()
    directory = save_hf(model, tokenizer, root / "hf")
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    export_checkpoint(directory, root / "package")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        recipe = model(**batch).last_hidden_state[:, 0].numpy()  # (B, D): [CLS], not normalised
    return root / "package", recipe


SENTENCES = ["one red cat.", "two green dogs and a blue sun sea.", "hello naive cafe"]


@EXPORTS
def test_an_imported_embedders_pooling_is_embeds_default(cls_embedder):
    package, recipe = cls_embedder
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["embedding"] == {"pooling": "cls", "normalize": False}
    assert manifest["source"]["model_type"] == "bert" and "chat_template" not in manifest
    model = rt.load(package, threads=1)
    assert np.abs(model.embed(SENTENCES) - recipe).max() <= 1e-4  # no arguments: the folder's recipe
    assert not np.allclose(model.embed(SENTENCES, pooling="mean"), model.embed(SENTENCES))


# --------------------------------------------------------------------------------------------
# Node: the same strings, ids, answers and errors, in one process
# --------------------------------------------------------------------------------------------

NODE_SCRIPT = r"""
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
const spec = JSON.parse(readFileSync(0, 'utf8'));
const { load, manifestFromDict } = await import(pathToFileURL(spec.index).href);
const code = async (f) => { try { await f(); return null; } catch (err) { return [err.code ?? String(err), err.message]; } };
const out = { render: {}, errors: {} };
for (const [name, dir] of Object.entries(spec.packages)) {
  const model = await load(dir, { threads: 1 });
  out.render[name] = [];
  for (const messages of spec.conversations[name]) {
    for (const add of [true, false]) out.render[name].push(await model.renderChat(messages, { add_generation_prompt: add }));
  }
  if (name === 'chatml') {
    out.chat = [];
    for (const messages of spec.chat) out.chat.push((await model.chat(messages)).token_ids[0]);
    let streamed = '';
    for await (const piece of await model.streamChat(spec.chat[0])) streamed += piece;
    out.stream = [streamed, (await model.chat(spec.chat[0])).text];
    out.only_first_eos = (await model.chat(spec.chat[0], { eos_token_ids: [spec.eos[0]] })).token_ids[0];
  }
  if (name === 'mistral') {
    out.errors.refused = await code(() => model.renderChat(spec.refused));
    out.errors.messages = [];
    for (const bad of spec.bad_messages) out.errors.messages.push(await code(() => model.renderChat(bad)));
  }
  await model.release();
}
out.errors.manifests = [];
for (const data of spec.manifests) out.errors.manifests.push(await code(() => manifestFromDict(data)));
if (spec.embedder) {
  const model = await load(spec.embedder, { threads: 1 });
  out.embedder = (await model.embed(spec.sentences)).map((v) => Array.from(v));
}
if (spec.encoder) {
  const plain = await load(spec.encoder.plain, { threads: 1 });
  const defaults = await load(spec.encoder.defaults, { threads: 1 });
  out.embed = {
    defaults: (await defaults.embed(spec.encoder.texts)).map((v) => Array.from(v)),
    explicit: (await plain.embed(spec.encoder.texts, { pooling: 'cls', normalize: false })).map((v) => Array.from(v)),
  };
}
process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def node_results(chat, cls_embedder, tmp_path_factory):
    if not HAS_NODE:
        pytest.skip("needs Node and runtime/node's npm packages (npm ci)")
    base = json.loads((chat["packages"]["chatml"] / "manifest.json").read_text())
    manifests = [{**base, key: value} for key, value, _ in BAD_FIELDS]
    spec = {"index": str(NODE_DIR / "index.js"), "packages": {k: str(v) for k, v in chat["packages"].items()},
            "conversations": {name: conversations_for(name) for name in TEMPLATES}, "chat": CONVERSATIONS[:2],
            "eos": chat["eos"], "refused": [SYSTEM, {"role": "user", "content": "hi"}],
            "bad_messages": [bad for bad, _ in BAD_MESSAGES], "manifests": manifests,
            "embedder": str(cls_embedder[0]), "sentences": SENTENCES}
    encoder = REPO / "artifacts" / "encoder"
    if (encoder / "manifest.json").is_file():
        copy = tmp_path_factory.mktemp("node-encoder") / "encoder"
        shutil.copytree(encoder, copy)
        _rewrite(copy, lambda d: d.update(embedding={"pooling": "cls", "normalize": False}))
        spec["encoder"] = {"plain": str(encoder), "defaults": str(copy), "texts": ["a b c", "the food was good"]}
    out = subprocess.run(["node", "--input-type=module", "-e", NODE_SCRIPT], input=json.dumps(spec),
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@NEEDS_NODE
@EXPORTS
def test_node_renders_what_transformers_renders(chat, node_results):
    for name in TEMPLATES:
        expected = [_expected(chat, name, m, add) for m in conversations_for(name) for add in (True, False)]
        got = [(r["text"], r["token_ids"]) for r in node_results["render"][name]]
        assert got == expected, name


@NEEDS_NODE
@EXPORTS
def test_node_greedy_chat_and_several_eos_ids(chat, node_results):
    for messages, answer in zip(CONVERSATIONS[:2], node_results["chat"]):
        assert answer == _reference_answer(chat, _expected(chat, "chatml", messages)[1])
    assert node_results["chat"][0][-1] == chat["eos"][1]
    streamed, text = node_results["stream"]
    assert streamed == text
    ids = _expected(chat, "chatml", CONVERSATIONS[0])[1]
    assert node_results["only_first_eos"] == _reference_only(chat, ids, [chat["eos"][0]])


@NEEDS_NODE
@EXPORTS
def test_node_refuses_what_python_refuses(node_results):
    assert node_results["errors"]["refused"][0] == "E_INPUT" and "roles must alternate" in node_results["errors"]["refused"][1]
    for (bad, _), got in zip(BAD_MESSAGES, node_results["errors"]["messages"]):
        assert got is not None and got[0] == "E_INPUT", (bad, got)
    for (key, value, named), got in zip(BAD_FIELDS, node_results["errors"]["manifests"]):
        assert got is not None and got[0] == "E_MANIFEST" and named in got[1], (key, value, got)


@NEEDS_NODE
@EXPORTS
def test_node_embed_uses_the_packages_embedding_defaults(node_results, cls_embedder):
    assert np.abs(np.array(node_results["embedder"]) - cls_embedder[1]).max() <= 1e-4
    if "embed" not in node_results:
        pytest.skip("artifacts/encoder is absent")
    np.testing.assert_array_equal(np.array(node_results["embed"]["defaults"]), np.array(node_results["embed"]["explicit"]))


@NEEDS_NODE
@EXPORTS
def test_node_cli_chat(chat, tmp_path):
    package = str(chat["packages"]["chatml"])
    messages = CONVERSATIONS[1]
    expected = rt.load(package, threads=1).chat(messages)
    cli = [str(NODE_DIR / "cli.js"), "generate", package]
    out = subprocess.run(["node", *cli, "--chat", messages[1]["content"], "--system", SYSTEM["content"], "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["token_ids"] == expected.token_ids
    rendered = subprocess.run(["node", *cli, "--messages", "-", "--render", "--json"], input=json.dumps(messages),
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    text, ids = _expected(chat, "chatml", messages)
    assert json.loads(rendered.stdout)[0]["text"] == text and json.loads(rendered.stdout)[0]["token_ids"] == ids
    copy = tmp_path / "bad"
    shutil.copytree(package, copy)
    _rewrite(copy, lambda d: d.update(chat_template=["not", "a", "string"]))
    bad = subprocess.run(["node", str(NODE_DIR / "cli.js"), "generate", str(copy), "--chat", "hi"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "error[E_MANIFEST]" in bad.stderr and "chat_template" in bad.stderr, bad.stderr
