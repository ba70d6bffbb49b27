/**
 * Parity with the Python runtime on every package (see packages.js): tokenizer ids, greedy
 * token ids (exact), classification probabilities and embeddings (within 1e-5), streaming
 * pieces, and the class and code of errors for bad calls and damaged packages (the messages are
 * each runtime's own: the runtimes agree on codes, not on English).
 */

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { load } from '../index.js';
import { NO_PACKAGES, expectedFor, packageDirs } from './packages.js';

const TOLERANCE = 1e-5;

function assertClose(actual, expected, tolerance, what) {
  assert.equal(actual.length, expected.length, `${what}: length`);
  expected.forEach((e, i) => {
    const diff = Math.abs(actual[i] - e);
    assert.ok(diff <= tolerance, `${what}[${i}]: ${actual[i]} vs Python ${e} (|diff| ${diff} > ${tolerance})`);
  });
}

/** Greedy/sample scores are sums of float32 log-probs: equal up to float32 rounding. */
function assertScores(actual, expected, what) {
  expected.forEach((e, i) => {
    const tolerance = 1e-4 * Math.max(1, Math.abs(e));
    assert.ok(Math.abs(actual[i] - e) <= tolerance, `${what}[${i}]: score ${actual[i]} vs Python ${e}`);
  });
}

/** Run one recorded call on the Node runtime. */
function call(model, { call: name, args, options }) {
  if (name === 'load') return load(args[0], options);
  if (name === 'generate_ids') return model.generateIds(args[0], options);
  if (name === 'render_chat') return model.renderChat(args[0], options);
  return model[name](args[0], options);
}

const dirs = packageDirs();
if (!dirs.length) test('parity with the Python runtime', { skip: NO_PACKAGES }, () => {});

for (const dir of dirs) {
  const expected = expectedFor(dir);
  describe(`parity with Python: ${expected.arch} package ${dir}`, () => {
    let model;
    before(async () => { model = await load(dir); });
    after(async () => { await model?.release(); });

    test('tokenizer: same ids, type ids and decoded text', async () => {
      const encoded = await model.tokenizer.encodeBatch(expected.tokenizer.map((t) => t.text));
      for (const [i, want] of expected.tokenizer.entries()) {
        assert.deepEqual(encoded[i].ids, want.ids, `ids of ${JSON.stringify(want.text)}`);
        assert.deepEqual(encoded[i].typeIds, want.type_ids, `type ids of ${JSON.stringify(want.text)}`);
        assert.equal(await model.decode(want.ids), want.decoded, `decode of ${JSON.stringify(want.text)}`);
      }
    });

    if (expected.classify) {
      test(`classify: probabilities within ${TOLERANCE}`, async () => {
        const { texts, options, results } = expected.classify;
        const got = await model.classify(texts, options);
        results.forEach((want, i) => {
          assert.equal(got[i].label, want.label, `label of text ${i}`);
          assert.deepEqual(Object.keys(got[i].probabilities), Object.keys(want.probabilities));
          assertClose(Object.values(got[i].probabilities), Object.values(want.probabilities), TOLERANCE, `text ${i}`);
          assertClose([got[i].score], [want.score], TOLERANCE, `score of text ${i}`);
          assert.equal(got[i].unknown_fraction, want.unknown_fraction, `unknown_fraction of text ${i}`);
        });
      });
    }

    if (expected.unknown_fractions) {
      test('unknownFractions: the same share of unknown tokens as Python', async () => {
        const { texts, values } = expected.unknown_fractions;
        assert.deepEqual(await model.unknownFractions(texts), values);
      });
    }

    for (const [k, want] of (expected.embed ?? []).entries()) {
      test(`embed ${JSON.stringify(want.options)}: vectors within ${TOLERANCE}`, async () => {
        const got = await model.embed(want.texts, want.options);
        assert.equal(got.length, want.vectors.length);
        want.vectors.forEach((v, i) => assertClose(got[i], v, TOLERANCE, `embed case ${k} text ${i}`));
      });
    }

    for (const gen of expected.generate ?? []) {
      test(`generate ${gen.name}: same token ids as Python`, async () => {
        const got = await model.generate(gen.prompts, gen.params);
        gen.results.forEach((want, b) => {
          assert.deepEqual(got[b].token_ids, want.token_ids, `token ids of prompt ${b}`);
          assert.deepEqual(got[b].texts, want.texts, `texts of prompt ${b}`);
          assert.deepEqual(got[b].finish_reasons, want.finish_reasons, `finish reasons of prompt ${b}`);
          assertScores(got[b].scores, want.scores, `prompt ${b}`);
        });
      });
    }

    for (const want of expected.stream ?? []) {
      test(`stream ${JSON.stringify(want.prompt)}: same pieces as Python`, async () => {
        const pieces = [];
        for await (const piece of await model.stream(want.prompt, want.params)) pieces.push(piece);
        assert.deepEqual(pieces, want.pieces);
      });
    }

    test('errors: same class and code as Python', async () => {
      const differ = [];
      for (const want of expected.errors) {
        const what = `${want.call}(${JSON.stringify(want.args).slice(0, 60)}, ${JSON.stringify(want.options)})`;
        let got = null;
        try {
          await call(model, want);
        } catch (err) {
          got = err;
        }
        if (!got || got.name !== want.error || got.code !== want.code) {
          const seen = got ? `${got.name} ${got.code}: ${got.message}` : 'no error';
          differ.push(`${what}\n    Python ${want.error} ${want.code}: ${want.python_message}\n    Node   ${seen}`);
        }
      }
      assert.deepEqual(differ, [], `${differ.length} of ${expected.errors.length} calls differ:\n  ${differ.join('\n  ')}`);
    });
  });
}
