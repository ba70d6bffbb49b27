// The prompt format (FORMAT.md 5.2, prompt_format.js): the rule of runtime/prompt_format.py,
// checked on hand-written cases (whitespace is Python's str.isspace set, not JavaScript's trim),
// the manifest field's checks, and a package given the field through both calls.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';

import { PromptFormat, promptFormatFromManifest, strip } from '../prompt_format.js';
import { load } from '../model.js';
import { packageDirs } from './packages.js';

test('strip is Python str.strip: U+001C-U+001F and U+0085 go, U+FEFF stays', () => {
  assert.equal(strip(' \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000a b\r\n'), 'a b');
  assert.equal(strip('\ufeffa\ufeff'), '\ufeffa\ufeff');
  assert.equal(strip('\u200ba'), '\u200ba'); // zero-width space is not whitespace in Python either
});

test('format substitutes the one placeholder; parse strips the answer', () => {
  const fmt = new PromptFormat('{prompt} =', true);
  assert.equal(fmt.format('  February 17, 2001\r\n'), 'February 17, 2001 =');
  assert.equal(fmt.format('{x} {prompt}'), '{x} {prompt} =');
  assert.equal(new PromptFormat('Q: {prompt}\nA:', true).format('why?'), 'Q: why?\nA:');
  assert.equal(fmt.parse(' 2001-02-17 \n'), '2001-02-17');
  assert.equal(new PromptFormat('{prompt}', false).format(' a '), ' a ');
});

test('parseStream joins to parse of the whole text', async () => {
  const fmt = new PromptFormat('{prompt} =', true);
  const pieces = [' ', ' 20', '01', ' ', '-', '02 ', '\n'];
  async function* source() { yield* pieces; }
  let joined = '';
  for await (const piece of fmt.parseStream(source())) joined += piece;
  assert.equal(joined, fmt.parse(pieces.join('')));
  assert.equal(joined, '2001 -02');
});

test('the manifest field: absent or null is raw; a damaged one is E_MANIFEST', () => {
  assert.equal(promptFormatFromManifest(undefined), null);
  assert.equal(promptFormatFromManifest(null), null);
  assert.deepEqual(promptFormatFromManifest({ template: '{prompt} =', strip: true }), new PromptFormat('{prompt} =', true));
  for (const bad of [{ template: 'none', strip: true }, { template: '{prompt}{prompt}', strip: true },
    { template: '{prompt} =', strip: 'yes' }, { template: '{prompt} =' }, '{prompt} =', []]) {
    assert.throws(() => promptFormatFromManifest(bad), (err) => err.code === 'E_MANIFEST' && /prompt_format/.test(err.message));
  }
});

const decoder = packageDirs().find((p) => path.basename(p) === 'decoder');

test('a package with a prompt_format: generate and stream format the prompt; raw sends it as given', { skip: !decoder }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'prompt-format-'));
  try {
    const copy = async (name, promptFormat) => { // the package with and without the field
      const target = path.join(dir, name);
      await cp(decoder, target, { recursive: true });
      const file = path.join(target, 'manifest.json');
      const data = JSON.parse(await readFile(file, 'utf8'));
      data.prompt_format = promptFormat; // as a re-export of a model trained with it writes it
      data.model_config.prompt_format = promptFormat;
      await writeFile(file, JSON.stringify(data));
      return load(target);
    };
    const [model, plain] = [await copy('formatted', { template: '{prompt} =', strip: true }), await copy('raw', null)];
    const options = { max_new_tokens: 6 };
    const [formatted] = await model.generate(' twelve\r\n', options);
    const [raw] = await plain.generate('twelve =', options);
    assert.equal(formatted.prompt, ' twelve\r\n');
    assert.deepEqual(formatted.token_ids, raw.token_ids);
    assert.equal(formatted.texts[0], strip(raw.texts[0]));
    const [asGiven] = await model.generate('twelve =', { ...options, raw: true });
    assert.deepEqual(asGiven.texts, raw.texts);
    let streamed = '';
    for await (const piece of await model.stream('twelve', options)) streamed += piece;
    assert.equal(streamed, formatted.texts[0]);
    await assert.rejects(model.generate(['twelve', ' \r\n']), (err) => err.code === 'E_INPUT' && /only whitespace/.test(err.message));
    await assert.rejects(model.generate('twelve', { raw: 'yes' }), (err) => err.code === 'E_INPUT');
    await model.release();
    await plain.release();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
