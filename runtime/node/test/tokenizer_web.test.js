/**
 * The browser's tokenizer (tokenizer_web.js: Tokenizers.js) against the native binding of the
 * Rust library (tokenizer.js, the Python runtime's), on every package's tokenizer.json and on a
 * Whitespace pre-tokenizer (the divergence tokenizer_web.js fixes: JavaScript's ASCII `\w`),
 * with the hard strings of the parity tests. Tokenizers.js runs in Node, so no browser is needed.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';

import { PackageTokenizer } from '../tokenizer.js';
import { WebTokenizer } from '../tokenizer_web.js';
import { packageDirs } from './packages.js';

const HARD = [
  'hello world', 'Café naïve résumé façade Ångström', 'e\u0301 vs \u00e9 (combining accent vs precomposed)',
  'Straße, Œuvre, ½ and ﬁ ligature', '日本語のテキストと中文字符和한국어', 'emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ✨',
  'tabs\tand\t\ttabs', 'line one\nline two\r\nline three\n\n', '  leading and trailing spaces  ',
  'numbers 3.14159 and 1,000,000 = 12 + 7', 'snake_case x_1 ٣٤ ⅷ', 'Ελληνικά, русский, العربية, עברית', '',
];

/** A WordPiece tokenizer.json behind a Whitespace pre-tokenizer, written by hand (no Python needed). */
function whitespaceTokenizer() {
  const words = ['[UNK]', 'Café', 'naïve', 'résumé', 'Ångström', 'e', '́', 'é', 'Straße', ',', 'Œuvre', '½', 'and', 'x_1', '٣٤',
    'Ελληνικά', 'русский', 'العربية', 'עברית', 'hello', 'world', '(', ')', 'vs', 'tabs', '##s', 'line', 'one', 'two', 'three'];
  const json = {
    version: '1.0', truncation: null, padding: null, added_tokens: [{ id: 0, content: '[UNK]', single_word: false, lstrip: false,
      rstrip: false, normalized: false, special: true }],
    normalizer: null, pre_tokenizer: { type: 'Whitespace' }, post_processor: null,
    decoder: { type: 'WordPiece', prefix: '##', cleanup: true },
    model: { type: 'WordPiece', unk_token: '[UNK]', continuing_subword_prefix: '##', max_input_chars_per_word: 100,
      vocab: Object.fromEntries(words.map((w, i) => [w, i])) },
  };
  const dir = mkdtempSync(path.join(tmpdir(), 'ws-tokenizer-'));
  writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
  return dir;
}

const cases = [...packageDirs().map((dir) => [path.basename(dir), dir]), ['Whitespace pre-tokenizer', whitespaceTokenizer()]];
for (const [name, dir] of cases) {
  test(`tokenizer_web equals the Rust tokenizer: ${name}`, async () => {
    const native = PackageTokenizer.fromPackage(dir, 'tokenizer.json');
    const web = new WebTokenizer(JSON.parse(readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')), 'tokenizer.json');
    assert.equal(web.vocabSize, native.vocabSize);
    const want = await native.encodeBatch(HARD);
    const got = await web.encodeBatch(HARD);
    for (const [i, text] of HARD.entries()) {
      assert.deepEqual(got[i].ids, want[i].ids, JSON.stringify(text));
      assert.deepEqual(got[i].typeIds, want[i].typeIds, JSON.stringify(text));
      assert.deepEqual(got[i].specialMask, want[i].specialMask, JSON.stringify(text));
      assert.equal(await web.decode(got[i].ids), await native.decode(want[i].ids), JSON.stringify(text));
      assert.deepEqual(await web.encodeText(text), await native.encodeText(text), JSON.stringify(text));
    }
  });
}
