/**
 * Issue 14: a result says how much of its text the tokenizer could not represent
 * (`unknown_fraction`, the share of non-special tokens that are the unk token), as Python does,
 * and the CLI warns, with what to do, when most of a text is unknown.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { UNKNOWN_WARNING, load } from '../index.js';
import { NODE_DIR, NO_PACKAGES, packageDirs } from './packages.js';

const cli = (...args) => spawnSync(process.execPath, [path.join(NODE_DIR, 'cli.js'), ...args], { encoding: 'utf8' });
const UNSEEN = ['😀', 'الطعام جيد', '日本語']; // characters no artifact's training text holds

const dirs = packageDirs();
if (!dirs.length) test('unknown fraction on packages', { skip: NO_PACKAGES }, () => {});

for (const dir of dirs) {
  describe(`unknown fraction: ${dir}`, () => {
    let model;
    before(async () => { model = await load(dir); });
    after(async () => { await model?.release(); });

    test('unknownFractions counts unk among the non-special tokens, per text', async () => {
      const unk = model.manifest.special_tokens.unk;
      const texts = ['the food was good', 'zzzz qqqq', ...UNSEEN];
      const encoded = await model.tokenizer.encodeBatch(texts);
      const want = encoded.map(({ ids, specialMask }) => {
        const body = ids.filter((_, k) => !specialMask[k]);
        return body.length ? body.filter((t) => t === unk).length / body.length : 0;
      });
      assert.deepEqual(await model.unknownFractions(texts), want);
      if (model.arch !== 'encoder') assert.deepEqual(want, texts.map(() => 0)); // byte-level BPE: every byte is a token
    });

    test('classify carries unknown_fraction; the CLI warns above the line and says what to do', async (t) => {
      if (!model.canClassify) return t.skip('no classification head');
      const results = await model.classify(['the food was good', ...UNSEEN]);
      assert.deepEqual(results.map((r) => r.unknown_fraction), [0, 1, 1, 1]);
      assert.ok(UNKNOWN_WARNING > 0 && UNKNOWN_WARNING < 1);

      const json = cli('classify', dir, '😀', 'the food was good', '--json');
      assert.equal(json.status, 0, json.stderr);
      assert.deepEqual(JSON.parse(json.stdout).map((r) => r.unknown_fraction), [1, 0]);
      const embedded = cli('embed', dir, '😀', 'the food was good', '--json');
      assert.deepEqual(JSON.parse(embedded.stdout).map((r) => r.unknown_fraction), [1, 0]);

      const warned = cli('classify', dir, '😀');
      assert.equal(warned.status, 0, warned.stderr);
      assert.match(warned.stderr, /^warning: text 0: 100% of its tokens are unknown to this model's tokenizer .*its label is a guess\. Write the text the way the training data is written/);
      assert.match(cli('embed', dir, 'الطعام جيد').stderr, /warning: text 0: 100% .*its embedding says little about it/);
      // the advice applied: the same request written as the training data is written
      const fixed = cli('classify', dir, 'the food was good');
      assert.equal(fixed.status, 0);
      assert.equal(fixed.stderr, '');
    });
  });
}
