// What an imported model brings (FORMAT.md 2.1, 5.3, 6.5): the manifest's chat_template,
// embedding and source fields are checked like Python's; embed() takes the package's pooling
// defaults; chat() renders a ChatML template (the expected text written out by hand here) and
// tokenizes it without a second BOS. tests/test_hf_package.py compares the same calls with
// transformers on imported Hugging Face folders.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';

import { checkMessages, render } from '../chat.js';
import { manifestFromDict } from '../manifest.js';
import { load } from '../model.js';
import { packageDirs } from './packages.js';

const decoder = packageDirs().find((p) => path.basename(p) === 'decoder');
const encoder = packageDirs().find((p) => path.basename(p) === 'encoder');

const CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + " +
  "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/** A copy of `source` whose manifest went through `change`; removed after `body`. */
async function withCopy(source, change, body) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'chat-'));
  try {
    const target = path.join(dir, path.basename(source));
    await cp(source, target, { recursive: true });
    const file = path.join(target, 'manifest.json');
    const data = JSON.parse(await readFile(file, 'utf8'));
    change(data);
    await writeFile(file, JSON.stringify(data));
    return await body(target);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('the fields: absent on old packages; bad types refused with E_MANIFEST, naming the field', { skip: !decoder || !encoder }, async () => {
  const base = JSON.parse(await readFile(path.join(decoder, 'manifest.json'), 'utf8'));
  const m = manifestFromDict(base);
  assert.equal(m.chat_template, null);
  assert.equal(m.embedding, null);
  assert.deepEqual(m.source, {});
  const good = { ...base, chat_template: CHATML, source: { format: 'huggingface', model_type: 'llama', architectures: ['LlamaForCausalLM'] } };
  assert.equal(manifestFromDict(good).chat_template, CHATML);
  const cases = [
    ['chat_template', 5, /chat_template/], ['chat_template', ' ', /chat_template/], ['embedding', 'mean', /embedding/],
    ['embedding', { pooling: 'max' }, /embedding.pooling/], ['embedding', { normalize: 1 }, /embedding.normalize/],
    ['embedding', { pooling: 'cls', prefix: 'query: ' }, /prefix/], ['embedding', { pooling: 'cls' }, /encoder graph/],
    ['chat_tokens', { eos_token: 2 }, /chat_tokens/], ['chat_tokens', { eos: '</s>' }, /chat_tokens/], ['chat_tokens', [], /chat_tokens/],
    ['source', [], /source/], ['source', { family: 1 }, /source.family/], ['source', { architectures: 'x' }, /source.architectures/],
  ];
  for (const [key, value, named] of cases) {
    assert.throws(() => manifestFromDict({ ...base, [key]: value }), (err) => err.code === 'E_MANIFEST' && named.test(err.message),
      `${key}=${JSON.stringify(value)}`);
  }
  const enc = JSON.parse(await readFile(path.join(encoder, 'manifest.json'), 'utf8'));
  assert.throws(() => manifestFromDict({ ...enc, chat_template: CHATML }), (err) => err.code === 'E_MANIFEST' && /encoder/.test(err.message));
  assert.deepEqual(manifestFromDict({ ...enc, embedding: { pooling: 'cls', normalize: false } }).embedding, { pooling: 'cls', normalize: false });
});

test("embed() takes the package's embedding defaults; a caller's options win", { skip: !encoder }, async () => {
  const texts = ['a b c', 'the food was good'];
  const plain = await load(encoder, { threads: 1 });
  await withCopy(encoder, (d) => { d.embedding = { pooling: 'cls', normalize: false }; }, async (dir) => {
    const model = await load(dir, { threads: 1 });
    assert.deepEqual(await model.embed(texts), await plain.embed(texts, { pooling: 'cls', normalize: false }));
    assert.deepEqual(await model.embed(texts, { pooling: 'mean', normalize: true }), await plain.embed(texts));
    await assert.rejects(model.embed(texts, { normalize: 'yes' }), (err) => err.code === 'E_INPUT');
    await model.release();
  });
  await plain.release();
});

test('chat renders the template, tokenizes it without a second BOS and generates from those ids', { skip: !decoder }, async () => {
  await withCopy(decoder, (d) => { d.chat_template = `{{ bos_token }}${CHATML}`; }, async (dir) => {
    const model = await load(dir, { threads: 1 });
    const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'ab =' }];
    const prompt = await model.renderChat(messages);
    const bosToken = model.tokenizer.idToToken(model.manifest.special_tokens.bos);
    assert.equal(prompt.text, `${bosToken}<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nab =<|im_end|>\n<|im_start|>assistant\n`);
    const [encoded] = await model.encode([prompt.text]); // the tokenizer's template adds a BOS of its own
    assert.deepEqual(encoded.slice(0, 2), [model.manifest.special_tokens.bos, model.manifest.special_tokens.bos]);
    assert.deepEqual(prompt.token_ids, encoded.slice(1));
    assert.equal((await model.renderChat(messages, { add_generation_prompt: false })).text,
      prompt.text.slice(0, -'<|im_start|>assistant\n'.length));
    await withCopy(dir, (d) => { d.chat_tokens = { bos_token: '[B]' }; }, async (named) => { // the tokenizer's names win
      const renamed = await load(named, { threads: 1 });
      assert.equal((await renamed.renderChat(messages)).text, `[B]${prompt.text.slice(bosToken.length)}`);
      await renamed.release();
    });
    const answer = await model.chat(messages, { max_new_tokens: 4 });
    const [direct] = await model.generateIds([prompt.token_ids], { max_new_tokens: 4 });
    assert.deepEqual(answer.token_ids, direct.token_ids);
    assert.equal(answer.prompt, prompt.text);
    let streamed = '';
    for await (const piece of await model.streamChat(messages, { max_new_tokens: 4 })) streamed += piece;
    assert.equal(streamed, answer.text);
    for (const bad of ['hi', [], [{ role: 'user' }], [{ role: 'user', content: 1 }], [{ role: '', content: 'x' }]]) {
      await assert.rejects(model.renderChat(bad), (err) => err.code === 'E_INPUT', JSON.stringify(bad));
    }
    await assert.rejects(model.chat(messages, { truncate: true }), (err) => err.code === 'E_INPUT');
    await model.release();
  });
  const raw = await load(decoder, { threads: 1 }); // no template: the call names what is missing
  await assert.rejects(raw.chat([{ role: 'user', content: 'hi' }]), (err) => err.code === 'E_WRONG_KIND' && /chat template/.test(err.message));
  await raw.release();
});

test('raise_exception and a template that does not parse', () => {
  const strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}ok";
  assert.equal(render(strict, checkMessages([{ role: 'user', content: 'x' }]), { addGenerationPrompt: true, variables: {} }), 'ok');
  assert.throws(() => render(strict, [{ role: 'system', content: 'x' }], { addGenerationPrompt: true, variables: {} }),
    (err) => err.code === 'E_INPUT' && /no system messages/.test(err.message));
  assert.throws(() => render('{% for m in messages %}', [], { addGenerationPrompt: true, variables: {} }),
    (err) => err.code === 'E_MANIFEST' && /chat_template/.test(err.message));
});
