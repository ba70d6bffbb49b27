"""Chat fine-tuning (issue 16): `--task sft` on `messages` data.

* The loss mask: checked against transformers' own assistant mask (`apply_chat_template(...,
  return_assistant_tokens_mask=True)` on the same template with `{% generation %}` around each
  answer and its end-of-turn marker), and against the rendered string (the trained tokens decode
  to each answer plus its marker), for the default template, imported ones (ChatML with a default
  system prompt, Llama 3, Mistral) and the fallback for a tokenizer without the chat tokens.
* The ids: what training reads for a prompt is what transformers' apply_chat_template gives,
  and what the exported package's render_chat / chat() use in Python and in Node.
* End to end (slow): a tiny decoder trained from scratch on builtin:chat answers held-out
  conversations through chat() in Python and Node, as training's exact match said.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from support import CHATML, HAS_NODE, LLAMA3, NODE_DIR

torch = pytest.importorskip("torch", reason="training tests need the [train] extra (torch)")
pytest.importorskip("jinja2", reason="chat templates need jinja2 (pip install 'onnxformer[chat]')")

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling import token_cache  # noqa: E402
from onnxformer.modeling.chat_sft import (  # noqa: E402
    CHAT_END,
    CHAT_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    ChatFormat,
    chat_package,
)
from onnxformer.modeling.config import ModelConfig  # noqa: E402
from onnxformer.modeling.data import CHAT_INTENTS, ChatExample, Message, load_builtin  # noqa: E402
from onnxformer.modeling.hf_import import PackageInfo  # noqa: E402
from onnxformer.modeling.objectives import IGNORE_INDEX  # noqa: E402
from onnxformer.modeling.tasks import OBJECTIVES, TaskContext  # noqa: E402
from onnxformer.modeling.tokenizer import special_token_ids, train_tokenizer  # noqa: E402
from onnxformer.runtime.errors import DataError  # noqa: E402

NEEDS_NODE = pytest.mark.skipif(not HAS_NODE, reason="needs Node and runtime/node's npm packages (npm ci)")

TEXTS = ["user\nhello there", "assistant\nhi there", "system\nbe brief", "what is the capital of peru?", "lima",
         "naïve café 日本 🙂", "reverse: red cup"] * 5
CONVERSATIONS = [
    ChatExample((Message("user", "hello there"), Message("assistant", "hi there"))),
    ChatExample((Message("system", "be brief"), Message("user", "what is the capital of peru?"),
                 Message("assistant", "lima"), Message("user", "reverse: red cup"), Message("assistant", " cup red\n"))),
    ChatExample((Message("user", "naïve café"), Message("assistant", "日本 🙂"), Message("user", "{{ not a tag }}"),
                 Message("assistant", "ok"))),
]
# Templates as models ship them: CHATML and LLAMA3 (tests/support.py), Mistral (no generation prompt;
# without test_hf_package.py's role check, so that a system turn is rendered as nothing).
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
CONTROL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _messages(example: ChatExample, upto: int | None = None) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in example.messages[:upto]]


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of ids where mask is 1."""
    runs, current = [], []
    for token, keep in zip(ids + [None], mask + [0]):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.fixture(scope="module")
def tokenizer():
    """Trained as a chat run trains one: the turn markers are special tokens."""
    return train_tokenizer(TEXTS, arch="decoder", vocab_size=300, extra_special_tokens=CHAT_TOKENS + CONTROL)


def _hf(tokenizer):
    transformers = pytest.importorskip("transformers", reason="the reference mask and ids come from transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def _package(template: str, tokenizer, stops: list[str]) -> PackageInfo:
    """An import's PackageInfo: its template, and the eos ids its generation stops at."""
    return PackageInfo(special_tokens=special_token_ids(tokenizer), chat_template=template,
                       generation={"eos_token_ids": [tokenizer.token_to_id(s) for s in stops]})


def _marked(template: str, piece: str, answer: str) -> str:
    """`template` with `{% generation %}` around the answer expression (transformers' assistant mask)."""
    assert template.count(piece) == 1
    return template.replace(piece, answer)


# The assistant turn with its end-of-turn marker inside {% generation %}, else the same text.
_TURN = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
_TURN_MARKED = ("{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}"
                "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}")
_MISTRAL_ANSWER = "{{ message['content'] + eos_token}}"


@pytest.mark.parametrize("name", ["default", "mistral"])
def test_the_mask_is_transformers_assistant_mask(tokenizer, name):
    hf = _hf(tokenizer)
    if name == "default":
        package = chat_package(tokenizer, None)
        assert package.chat_template == DEFAULT_CHAT_TEMPLATE
        marked = _marked(DEFAULT_CHAT_TEMPLATE, _TURN, _TURN_MARKED)
    else:
        package = _package(MISTRAL, tokenizer, ["</s>"])
        marked = _marked(MISTRAL, _MISTRAL_ANSWER,
                         "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}")
    chat = ChatFormat.of(tokenizer, package)
    for example in CONVERSATIONS:
        row = chat.encode(example)
        messages = _messages(example)
        reference = hf.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        assert row.text == hf.apply_chat_template(messages, chat_template=package.chat_template, tokenize=False)
        assert row.ids == reference["input_ids"]
        assert row.loss_mask == reference["assistant_masks"]
        bos = tokenizer.token_to_id("<s>")
        assert row.ids[0] == bos and row.ids.count(bos) == 1  # the template's BOS, not a second one


@pytest.mark.parametrize("name", ["default", "chatml-system", "llama3", "mistral", "fallback"])
def test_trained_tokens_decode_to_each_answer_and_its_end_of_turn(tokenizer, name):
    plain = train_tokenizer(TEXTS, arch="decoder", vocab_size=300)  # one of ours trained without the chat tokens
    tok, marker = tokenizer, CHAT_END
    if name == "default":
        package = chat_package(tokenizer, None)
        assert package.generation["eos_token_ids"] == [tokenizer.token_to_id(CHAT_END), tokenizer.token_to_id("</s>")]
    elif name == "chatml-system":
        package = _package(CHATML, tokenizer, [CHAT_END])
    elif name == "llama3":
        package, marker = _package(LLAMA3, tokenizer, ["<|eot_id|>"]), "<|eot_id|>"
    elif name == "mistral":
        package, marker = _package(MISTRAL, tokenizer, ["</s>"]), "</s>"
    else:
        tok, marker = plain, "</s>"
        package = chat_package(plain, None)
        assert "<|im_start|>" not in package.chat_template and package.generation["eos_token_ids"] == [2]
    chat = ChatFormat.of(tok, package)
    for example in CONVERSATIONS:
        row = chat.encode(example)
        answers = [m.content for m in example.messages if m.role == "assistant"]
        if name == "llama3":  # the template trims the content
            answers = [a.strip() for a in answers]
        runs = _runs(row.ids, row.loss_mask)
        assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [a + marker for a in answers]
        assert [row.text[s:e] for s, e in row.spans] == [a + marker for a in answers]  # the rendered string
        # the last prompt is what chat() sends: the conversation so far with the generation prompt
        prompt = chat.render(_messages(example, -1), add_generation_prompt=True)
        assert row.consistent and row.ids[: row.prompt_len] == tok.encode(prompt, add_special_tokens=False).ids
        if len(answers) == 1:  # nothing before the answer is trained on
            assert not any(row.loss_mask[: row.prompt_len])


def test_prompts_are_transformers_apply_chat_template_ids(tokenizer):
    hf = _hf(tokenizer)
    for template in (DEFAULT_CHAT_TEMPLATE, CHATML, LLAMA3):
        chat = ChatFormat.of(tokenizer, _package(template, tokenizer, [CHAT_END]))
        for example in CONVERSATIONS:
            row = chat.encode(example)
            expected = hf.apply_chat_template(_messages(example, -1), chat_template=template, add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
            assert row.ids[: row.prompt_len] == expected


def test_an_imports_end_of_turn_token_ends_generation(tokenizer):
    eos, end = tokenizer.token_to_id("</s>"), tokenizer.token_to_id(CHAT_END)
    base = _package(CHATML, tokenizer, ["</s>"])  # a base model: its eos is not the template's turn end
    assert chat_package(tokenizer, base).generation["eos_token_ids"] == [eos, end]
    assert chat_package(tokenizer, _package(CHATML, tokenizer, [CHAT_END])).generation["eos_token_ids"] == [end]
    assert chat_package(tokenizer, _package(MISTRAL, tokenizer, ["</s>"])).generation["eos_token_ids"] == [eos]


def test_a_template_that_renders_a_turn_by_what_follows_is_refused(tokenizer):
    last_differs = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    chat = ChatFormat.of(tokenizer, _package(last_differs, tokenizer, ["</s>"]))
    with pytest.raises(DataError, match=r"renders turn 1 \(assistant\) differently depending on the turns that follow"):
        chat.encode(CONVERSATIONS[0])
    refuses = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(DataError, match="refused the conversation: Only user and assistant"):
        ChatFormat.of(tokenizer, _package(refuses, tokenizer, ["</s>"])).encode(CONVERSATIONS[0])


def _context(tokenizer, arch: str = "decoder", max_len: int = 128) -> TaskContext:
    s = special_token_ids(tokenizer)
    config = ModelConfig(arch=arch, vocab_size=tokenizer.get_vocab_size(), d_model=32, n_heads=2, n_layers=1, d_ff=64,
                         max_seq_len=128, pad_token_id=s["pad"], bos_token_id=s["bos"], eos_token_id=s["eos"])
    return TaskContext(tokenizer, s, config, max_len=max_len, chat=ChatFormat.of(tokenizer, chat_package(tokenizer, None)))


@pytest.mark.parametrize("arch", ["decoder", "prefix-lm"])
def test_sft_batches_train_on_the_assistant_tokens(tokenizer, arch):
    sft = OBJECTIVES["sft"]
    context = _context(tokenizer, arch)
    encoding = sft.encode(context, CONVERSATIONS, 0)
    assert encoding.report.rows == len(CONVERSATIONS) and encoding.report.used == encoding.report.tokens
    rows = encoding.examples
    batch = sft.collate(context, [(e, torch.Generator()) for e in rows])
    for i, e in enumerate(rows):
        labels = batch.labels[i].tolist()
        expected = [e.ids[t + 1] if t + 1 < len(e.ids) and e.loss_mask[t + 1] and (arch == "decoder" or t + 1 >= e.prompt_len)
                    else IGNORE_INDEX for t in range(len(labels))]
        assert labels == expected  # position t predicts token t + 1, an assistant token
        assert e.text == CONVERSATIONS[i].messages[-1].content
    if arch == "prefix-lm":  # the prefix is the last answer's prompt
        assert batch.prefix_mask.sum(1).tolist() == [e.prompt_len for e in rows]


def test_cut_conversations_are_counted_and_one_without_an_answer_left_is_dropped(tokenizer):
    context = _context(tokenizer, max_len=12)
    encoding = OBJECTIVES["sft"].encode(context, CONVERSATIONS, 0)
    report = encoding.report
    assert report.examples == 3 and report.dropped >= 1 and report.rows == 3 - report.dropped
    assert all(len(e.ids) <= 12 and any(e.loss_mask[1:]) for e in encoding.examples)


def test_builtin_chat_is_fixed_balanced_and_held_out():
    data = load_builtin("builtin:chat")
    assert (len(data.train), len(data.valid), len(data.test)) == (3000, 200, 200)
    assert load_builtin("builtin:chat").test == data.test  # the same in every process
    assert not set(data.train) & (set(data.valid) | set(data.test)) and not set(data.valid) & set(data.test)
    for split in (data.valid, data.test):
        last = [e.messages[-2].content for e in split]
        assert sum("plus" in q or "minus" in q for q in last) == len(split) // len(CHAT_INTENTS)
        assert sum(q.startswith("reverse:") for q in last) == len(split) // len(CHAT_INTENTS)
    for e in data.test:
        question, answer = e.messages[-2].content, e.messages[-1].content
        if question.startswith("reverse: "):
            assert answer.split() == question.removeprefix("reverse: ").split()[::-1]
        elif " plus " in question or " minus " in question:
            words = question.rstrip("?.").replace(" is", "").split()
            a, op, b = int(words[-3]), words[-2], int(words[-1])
            assert int(answer) == (a + b if op == "plus" else a - b)


# --------------------------------------------------------------------------------------------
# End to end: train from scratch on builtin:chat, export, chat() in Python and Node
# --------------------------------------------------------------------------------------------

E2E_STEPS = 1000  # tiny preset, batch 32: ~90 s on 2 shared CPU cores (benchmarks/TRAINING.md)

NODE_CHAT = r"""
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
const spec = JSON.parse(readFileSync(0, 'utf8'));
const { load } = await import(pathToFileURL(spec.index).href);
const model = await load(spec.package, { threads: 1 });
const out = { prompts: [], full: [], answers: [] };
for (const messages of spec.conversations) {
  out.prompts.push((await model.renderChat(messages.slice(0, -1))).token_ids);
  out.full.push((await model.renderChat(messages, { add_generation_prompt: false })).token_ids);
  out.answers.push((await model.chat(messages.slice(0, -1))).texts[0]);
}
await model.release();
process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from onnxformer.export.exporter import export_checkpoint
    from onnxformer.modeling.train import TrainConfig, train

    root = tmp_path_factory.mktemp("chat-sft")
    result = train(TrainConfig(arch="decoder", task="sft", data="builtin:chat", out_dir=str(root / "run"),
                               preset="tiny", vocab_size=512, steps=E2E_STEPS, batch_size=32, lr=5e-3,
                               eval_every=E2E_STEPS, eval_examples=200, progress=False, threads=1))
    export_checkpoint(result.checkpoint, root / "package")
    [cache] = [d for d in (root / "run" / "cache").iterdir() if d.is_dir()]
    return {"result": result, "package": root / "package", "rows": token_cache.load(cache),
            "data": load_builtin("builtin:chat")}


@pytest.mark.slow
def test_the_package_carries_the_template_training_used(trained):
    import onnxformer.runtime as rt

    package = ckpt.read_package(trained["result"].checkpoint)
    assert package.chat_template == DEFAULT_CHAT_TEMPLATE
    model = rt.load(trained["package"], threads=1)
    assert model.chat_template == DEFAULT_CHAT_TEMPLATE
    end = model.tokenizer.token_to_id(CHAT_END)
    assert model.manifest.generation["eos_token_ids"] == [end, model.manifest.special_tokens["eos"]]
    rows, _ = trained["rows"]["test"]
    for example, row in zip(trained["data"].test, rows):
        prompt = model.render_chat(_messages(example, -1))
        assert row.ids[: row.prompt_len] == prompt.token_ids  # the ids training used == chat()'s
        assert row.ids == model.render_chat(_messages(example), add_generation_prompt=False).token_ids


@pytest.mark.slow
def test_held_out_conversations_are_answered_through_chat(trained):
    import onnxformer.runtime as rt

    model = rt.load(trained["package"], threads=1)
    test = trained["data"].test
    answers = [model.chat(_messages(e, -1)).texts[0] for e in test]
    hits = [a == e.messages[-1].content for a, e in zip(answers, test)]
    # what training measured is what a user of the package gets
    assert sum(hits) / len(test) == pytest.approx(trained["result"].metrics["test/exact_match"])
    assert sum(hits) / len(test) >= 0.9, [(e.messages[-2].content, a) for a, e, h in zip(answers, test, hits) if not h]
    for intent in range(len(CHAT_INTENTS)):  # every intent answered, most of the time
        assert sum(hits[intent :: len(CHAT_INTENTS)]) >= 0.75 * len(test) / len(CHAT_INTENTS), CHAT_INTENTS[intent]
    trained["answers"] = answers


@pytest.mark.slow
@NEEDS_NODE
def test_node_renders_the_same_ids_and_gives_the_same_answers(trained):
    import onnxformer.runtime as rt

    test = trained["data"].test[:100]
    spec = {"index": str(NODE_DIR / "index.js"), "package": str(trained["package"]),
            "conversations": [_messages(e) for e in test]}
    out = subprocess.run(["node", "--input-type=module", "-e", NODE_CHAT], input=json.dumps(spec), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    node = json.loads(out.stdout)
    rows, _ = trained["rows"]["test"]
    assert node["prompts"] == [rows[i].ids[: rows[i].prompt_len] for i in range(len(test))]
    assert node["full"] == [rows[i].ids for i in range(len(test))]
    model = rt.load(trained["package"], threads=1)
    python = trained.get("answers") or [model.chat(_messages(e, -1)).texts[0] for e in test]
    assert node["answers"] == python[: len(test)]
    assert sum(a == e.messages[-1].content for a, e in zip(node["answers"], test)) >= 0.9 * len(test)


# --------------------------------------------------------------------------------------------
# An imported Hugging Face model keeps its own template
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_imported_model_fine_tunes_in_its_own_template(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face folder is built with transformers")
    from hf_support import hf_tokenizer, save_hf

    from onnxformer.modeling.train import TrainConfig, train

    tok = hf_tokenizer(300, bos="<s>", eos="</s>", pad="<pad>", chat_template=CHATML)
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(CHAT_END),
                                      pad_token_id=tok.pad_token_id)
    hf_dir = save_hf(transformers.LlamaForCausalLM(config), tok, tmp_path / "hf")
    rows = [{"messages": _messages(e)} for e in CONVERSATIONS] * 4
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"messages": _messages(e)}) + "\n" for e in CONVERSATIONS),
                                          encoding="utf-8")
    result = train(TrainConfig(arch="decoder", task="sft", data=str(tmp_path / "chat.jsonl"),
                               valid_data=str(tmp_path / "valid.jsonl"), out_dir=str(tmp_path / "run"),
                               from_checkpoint=str(hf_dir), steps=2, batch_size=4, eval_examples=3, max_len=128,
                               progress=False, threads=1))
    package = ckpt.read_package(result.checkpoint)
    assert package.chat_template == CHATML  # the import's, not the default
    [cache] = [d for d in (tmp_path / "run" / "cache").iterdir() if d.is_dir()]
    valid, _ = token_cache.load(cache)["valid"]
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for example, row in zip(CONVERSATIONS, valid):
        assert row.ids == reference.apply_chat_template(_messages(example), tokenize=True, return_dict=False)
        assert row.ids[: row.prompt_len] == reference.apply_chat_template(
            _messages(example, -1), add_generation_prompt=True, tokenize=True, return_dict=False)
        answers = [m.content + CHAT_END for m in example.messages if m.role == "assistant"]
        assert [reference.decode(r) for r in _runs(row.ids, row.loss_mask)] == answers
    import onnxformer.runtime as rt
    from onnxformer.export.exporter import export_checkpoint

    export_checkpoint(result.checkpoint, tmp_path / "package")
    model = rt.load(tmp_path / "package", threads=1)
    assert model.chat_template == CHATML
    for example, row in zip(CONVERSATIONS, valid):  # the package's chat() sends what training read
        assert model.render_chat(_messages(example, -1)).token_ids == row.ids[: row.prompt_len]
