/**
 * The step protocol (steps.js) on every package with a decoder (see packages.js): prefill two
 * prompts, advance, select [1, 0, 0], admit two more rows, advance by one and by K = 3 tokens,
 * release rows. After each call, each row's logits equal those of a fresh step model run on
 * that row's whole sequence alone: a decoder-only prefill of prompt + fed tokens in one call;
 * a prefix-LM (its prompt is one bidirectional block) or encoder-decoder (its prompt is the
 * source) prefill of the prompt, then the fed tokens one by one.
 */

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { load } from '../index.js';
import { greedyChoice } from '../steps.js';
import { NO_PACKAGES, packageDirs } from './packages.js';

/** Quantized packages may quantize activations per batch: their rows differ slightly. */
const tolerance = (model) => (model.manifest.weights.startsWith('int') ? 0.05 : 1e-4);

function maxAbsDiff(a, b) {
  assert.equal(a.length, b.length, 'logits length');
  return a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
}

/** Logits after `fed` tokens of a row started from `prompt`, on a fresh step model. */
async function alone(model, prompt, fed) {
  const steps = model.stepModel({ capacity: 4 });
  if (model.arch === 'decoder') return (await steps.prefill([[...prompt, ...fed]])).logits[0];
  let result = await steps.prefill([prompt]);
  for (const tok of fed) result = await steps.advance([tok]);
  return result.logits[0];
}

const dirs = packageDirs();
if (!dirs.length) test('step protocol', { skip: NO_PACKAGES }, () => {});

for (const dir of dirs) {
  describe(`step protocol: ${dir}`, () => {
    let model;
    before(async () => { model = await load(dir); });
    after(async () => { await model?.release(); });

    test('prefill, advance (1 and K tokens), select, admit and release: each row as if alone', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      const limit = tolerance(model);
      const vocab = model.dims.vocab_size;
      const [a, b, c, d] = await model.encode(['three hundred and twelve = 3 1 2', 'hello', 'a much longer prompt than the others here', 'x']);
      const steps = model.stepModel({ capacity: 4 }); // small: the shared buffers must grow
      /** The rows as the test tracks them: the prompt and the tokens fed since. */
      let rows = [];
      let counter = 0;
      const nextTokens = () => rows.map(() => (counter++ * 7 + 3) % vocab); // different per row and call

      /** Each row's logits (N, V), or (N, K, V) for the last K fed tokens, against the row alone. */
      async function check(what, result, k = 0) {
        assert.equal(steps.rows, rows.length, `${what}: rows`);
        const logits = result.logits;
        assert.equal(logits.length, rows.length, `${what}: result rows`);
        for (const [r, row] of rows.entries()) {
          const positions = k ? logits[r] : [logits[r]];
          assert.equal(positions.length, k || 1, `${what}: row ${r} positions`);
          for (const [j, got] of positions.entries()) {
            const fed = row.fed.slice(0, row.fed.length - (k ? k - 1 - j : 0));
            const diff = maxAbsDiff(got, await alone(model, row.prompt, fed));
            assert.ok(diff <= limit, `${what}: row ${r} position ${j}: max |batched - alone| = ${diff}`);
          }
          // The greedy choice is the argmax of the row's logits (or an equal logit: the graph's).
          const tokens = k ? result.nextToken[r] : [result.nextToken[r]];
          positions.forEach((got, j) => {
            const best = greedyChoice([got]).tokens[0];
            assert.ok(Math.abs(got[tokens[j]] - got[best]) <= limit, `${what}: row ${r} next token ${tokens[j]} vs argmax ${best}`);
          });
        }
      }

      rows = [{ prompt: a, fed: [] }, { prompt: b, fed: [] }];
      await check('prefill', await steps.prefill([a, b]));
      assert.deepEqual(steps.sequenceStart(a), model.arch === 'encoder-decoder' ? [model.manifest.special_tokens.decoder_start] : a);

      let tokens = nextTokens();
      rows.forEach((row, r) => row.fed.push(tokens[r]));
      await check('advance', await steps.advance(tokens));

      await steps.select([1, 0, 0]);
      rows = [1, 0, 0].map((r) => ({ prompt: rows[r].prompt, fed: [...rows[r].fed] }));
      tokens = nextTokens();
      rows.forEach((row, r) => row.fed.push(tokens[r]));
      await check('advance after select [1, 0, 0]', await steps.advance(tokens));

      const admitted = await steps.prefill([c, d]); // into the running batch; the result covers the new rows
      const running = rows;
      rows = [{ prompt: c, fed: [] }, { prompt: d, fed: [] }];
      assert.equal(admitted.logits.length, 2, 'the admission result covers the new rows');
      for (const [r, row] of rows.entries()) {
        const diff = maxAbsDiff(admitted.logits[r], await alone(model, row.prompt, []));
        assert.ok(diff <= limit, `admission: new row ${r}: max |batched - alone| = ${diff}`);
      }
      rows = [...running, ...rows];
      assert.equal(steps.rows, 5);

      tokens = nextTokens();
      rows.forEach((row, r) => row.fed.push(tokens[r]));
      await check('advance after admission', await steps.advance(tokens));

      const block = rows.map(() => nextTokens().slice(0, 3)); // (N, K = 3)
      rows.forEach((row, r) => row.fed.push(...block[r]));
      await check('advance by K = 3', await steps.advance(block), 3);

      await steps.release([1, 3]);
      rows = rows.filter((_, r) => r !== 1 && r !== 3);
      tokens = nextTokens();
      rows.forEach((row, r) => row.fed.push(tokens[r]));
      await check('advance after release [1, 3]', await steps.advance(tokens));

      await steps.release(rows.map((_, r) => r));
      assert.equal(steps.rows, 0);
    });
  });
}

for (const dir of dirs) {
  test(`step protocol refuses bad prompts and tokens: ${dir}`, async (t) => {
    const model = await load(dir);
    try {
      if (!model.canGenerate) return t.skip('no decoder');
      const vocab = model.dims.vocab_size;
      const steps = model.stepModel();
      // prefill's prompts may come straight from a caller: InputError with a code
      await assert.rejects(steps.prefill([[5, vocab]]), (err) => err.name === 'InputError' && err.code === 'E_TOKEN_ID');
      await assert.rejects(steps.prefill([[]]), (err) => err.name === 'InputError' && err.code === 'E_INPUT');
      assert.equal(steps.rows, 0);
      await steps.prefill([[5, 6], [7]]);
      // advance's tokens come from a search or scheduler: a wrong shape or id is its bug, a plain Error
      await assert.rejects(steps.advance([1, 2, 3]), (err) => err.constructor === Error && /N=2/.test(err.message));
      await assert.rejects(steps.advance([1, vocab]), (err) => err.constructor === Error && /vocabulary/.test(err.message));
      assert.equal((await steps.advance([1, 2])).logits.length, 2);
    } finally {
      await model.release();
    }
  });
}
