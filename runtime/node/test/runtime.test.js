/**
 * Invariants of the Node runtime on every package (see packages.js), independent of Python:
 * the KV cache gives the logits of a full recomputation (both layouts), a "shared" cache
 * updated in place equals feeding the present outputs back and may grow, seeded sampling is
 * reproducible, streaming equals generation, the prefix-LM prompt is one bidirectional block,
 * and load() refuses what it must.
 */

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import ort from 'onnxruntime-node';

import { selfCacheNames } from '../contract.js';
import { PackageError, ProviderError, Random, load, manifestFromDict } from '../index.js';
import { special } from '../manifest.js';
import { floatData } from '../session.js';
import { NO_PACKAGES, packageDirs } from './packages.js';

const PROMPT = 'three hundred and twelve = 3 1 2';

/**
 * Last-position logits of one row on a fresh step model: prefill of `prompt` (encoder-decoder:
 * of the source, the row starting from decoder_start), then `chunks` advanced one call each.
 */
async function logitsAfter(model, { prompt, capacity = 64, chunks = [] }) {
  const steps = model.stepModel({ capacity });
  let result = await steps.prefill([prompt]);
  for (const chunk of chunks) result = await steps.advance([chunk]);
  const logits = result.logits[0];
  return Array.isArray(logits) ? logits[logits.length - 1] : logits; // (K, V) after K tokens
}

/** A prompt's ids for the decoder: the prompt (decoder-only), or the source and a target
 * after decoder_start (encoder-decoder). */
async function decoderInput(model) {
  if (model.arch !== 'encoder-decoder') return { sources: null, ids: (await model.encode([PROMPT]))[0] };
  const start = special(model.manifest, 'decoder_start');
  return { sources: await model.encode([PROMPT]), ids: [start, ...(await model.encode(['a short target']))[0]].slice(0, 8) };
}

/** The row's prompt and the decoder tokens after it: the first two decoder tokens are the
 * prompt (encoder-decoder: the source, whose row starts from decoder_start). */
function rowOf({ sources, ids }) {
  return sources ? { prompt: sources[0], rest: ids.slice(1) } : { prompt: ids.slice(0, 2), rest: ids.slice(2) };
}

/** Quantized packages (weights "int8", "int4") may quantize activations too (per tensor or per
 * block), so the batch and the cache layout change their results slightly. */
const quantized = (model) => model.manifest.weights.startsWith('int');

/** How far two computations of the same values may differ. */
const tolerance = (model) => (quantized(model) ? 0.05 : 1e-4);

function maxAbsDiff(a, b) {
  return a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0);
}

const dirs = packageDirs();
if (!dirs.length) test('runtime invariants', { skip: NO_PACKAGES }, () => {});

for (const dir of dirs) {
  describe(`runtime invariants: ${dir}`, () => {
    let model;
    before(async () => { model = await load(dir); });
    after(async () => { await model?.release(); });

    test('load() refuses an unknown provider', async () => {
      await assert.rejects(load(dir, { provider: 'tpu' }),
        (err) => err instanceof ProviderError && err.code === 'E_PROVIDER' && /tpu/.test(err.message));
    });

    test('load() refuses a package file that links outside the package', async () => {
      const copy = mkdtempSync(path.join(tmpdir(), 'onnxformer-link-'));
      for (const name of readdirSync(dir)) symlinkSync(path.join(dir, name), path.join(copy, name));
      try {
        await assert.rejects(load(copy), (err) => err instanceof PackageError && err.code === 'E_PACKAGE' && /outside/.test(err.message));
      } finally {
        rmSync(copy, { recursive: true });
      }
    });

    test('manifest generation defaults: checked as set (as Python), token ids below V, E_MANIFEST', () => {
      const data = JSON.parse(readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
      const V = data.dims.vocab_size;
      const withGeneration = (generation) => manifestFromDict({ ...data, generation });
      // Set fields are checked alone: min_new_tokens 40 needs a max_new_tokens only once a call resolves it.
      assert.deepEqual(withGeneration({ min_new_tokens: 40 }).generation, { min_new_tokens: 40 });
      assert.deepEqual(withGeneration({}).generation, {});
      for (const generation of [{ top_k: -1 }, { num_beams: 2, strategy: 'greedy' }, { max_tokens: 3 },
        { eos_token_ids: [0, V] }, { pad_token_id: V }, null, 'greedy']) {
        assert.throws(() => withGeneration(generation), (err) => err instanceof PackageError && err.code === 'E_MANIFEST' &&
          /generation/.test(err.message), JSON.stringify(generation));
      }
    });

    test('cached decoding gives the logits of a full recomputation', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      if (model.arch === 'prefix-lm') return t.skip('a prefix-LM prompt is one bidirectional block (next test)');
      const input = await decoderInput(model);
      const { prompt, rest } = rowOf(input);
      const full = input.sources // encoder-decoder: the target as one K-token advance
        ? await logitsAfter(model, { prompt, chunks: [rest] })
        : await logitsAfter(model, { prompt: input.ids });
      const cached = await logitsAfter(model, { prompt, chunks: rest.map((tok) => [tok]) });
      const diff = maxAbsDiff(full, cached);
      assert.ok(diff < tolerance(model), `max |cached - full| = ${diff}`);
    });

    test('shared KV cache: a cache that grows past its capacity gives the same logits', async (t) => {
      if (model.manifest.kv_cache !== 'shared') return t.skip('kv_cache is not "shared"');
      const input = await decoderInput(model);
      const { prompt, rest } = rowOf(input);
      const chunks = rest.map((tok) => [tok]);
      const sized = await logitsAfter(model, { prompt, capacity: input.ids.length, chunks });
      const grown = await logitsAfter(model, { prompt, capacity: 1, chunks }); // grows 1 -> 2 -> 4 -> 8 ...
      const diff = maxAbsDiff(grown, sized);
      assert.ok(diff < tolerance(model) / 10, `max |grown - sized| = ${diff}`);
    });

    test('shared KV cache: buffers updated in place equal feeding present back as past', async (t) => {
      if (model.manifest.kv_cache !== 'shared') return t.skip('kv_cache is not "shared"');
      // A batch through SharedSteps (in place), and the same right-padded batch through plain
      // session.run, each present output fed back as the next past.
      const { sources: source, ids } = await decoderInput(model);
      const start = special(model.manifest, 'decoder_start');
      const sources = source && [source[0], source[0].slice(0, 3), source[0].slice(1, 2)];
      const prompts = sources ? sources.map(() => [start]) : [ids, ids.slice(0, 3), ids.slice(1, 2)]; // decoder rows
      const newTokens = [[5, 6, 7], [8, 9, 10]]; // two more steps, one token per row
      const width = Math.max(...prompts.map((p) => p.length));
      const capacity = width + newTokens.length;
      const steps = model.stepModel({ capacity });
      const inPlace = [(await steps.prefill(sources ?? prompts)).logits];
      const fixed = steps.state.encoded?.values ?? {}; // encoder-decoder: the encoder K/V and mask
      for (const tokens of newTokens) inPlace.push((await steps.advance(tokens)).logits);

      const { dims, float_dtype: dtype } = model.manifest;
      const n = prompts.length;
      const shape = [n, dims.n_kv_heads, capacity, dims.d_head]; // (N, Hkv, C, Dh)
      const size = shape.reduce((a, b) => a * b);
      const zeros = () => new ort.Tensor(dtype, dtype === 'float16' ? new Uint16Array(size) : new Float32Array(size), shape);
      const int64 = (values, dimsOf) => new ort.Tensor('int64', BigInt64Array.from(values.flat(), BigInt), dimsOf);
      const names = selfCacheNames(dims); // [present, past] per layer
      let past = Object.fromEntries(names.map(([, name]) => [name, zeros()]));
      let lengths = prompts.map((p) => p.length);
      let feedIds = int64(prompts.map((p) => [...p, ...Array(width - p.length).fill(0)]), [n, width]); // right-padded
      for (let k = 0; k <= newTokens.length; k++) {
        const outputs = await model.sessions.decoder.run({ input_ids: feedIds, sequence_lengths: int64(lengths, [n]), ...fixed, ...past });
        const worst = maxAbsDiff(inPlace[k].flatMap((row) => Array.from(row)), floatData(outputs.logits)); // (N, V)
        assert.ok(worst < tolerance(model) / 10, `step ${k}: max |in place - copy back| = ${worst}`);
        past = Object.fromEntries(names.map(([present, name]) => [name, outputs[present]]));
        if (k < newTokens.length) {
          feedIds = int64(newTokens[k].map((tok) => [tok]), [n, 1]);
          lengths = lengths.map((l) => l + 1);
        }
      }
    });

    test('prefix-LM: the prompt must be fed as one block (it is bidirectional)', async (t) => {
      if (model.arch !== 'prefix-lm') return t.skip('not a prefix-LM');
      const ids = (await model.encode([PROMPT]))[0];
      const block = await logitsAfter(model, { prompt: ids });
      const tokenwise = await logitsAfter(model, { prompt: ids.slice(0, 1), chunks: ids.slice(1).map((tok) => [tok]) });
      assert.ok(maxAbsDiff(block, tokenwise) > tolerance(model), 'token-by-token prefill should differ from the block');
    });

    test('seeded sampling is reproducible; a Random passed as rng equals its seed', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      const options = { strategy: 'sample', seed: 7, max_new_tokens: 10, temperature: 0.9, top_k: 50, top_p: 0.95 };
      const prompts = [PROMPT, 'hello'];
      const a = await model.generate(prompts, options);
      const b = await model.generate(prompts, options);
      const c = await model.generate(prompts, { ...options, seed: undefined, rng: new Random(7) });
      assert.deepEqual(a, b);
      assert.deepEqual(c, a);
    });

    test('sampling: num_return_sequences sequences per prompt', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      const out = await model.generate(['hello', PROMPT], { strategy: 'sample', seed: 1, num_return_sequences: 3, max_new_tokens: 4 });
      assert.deepEqual(out.map((r) => r.texts.length), [3, 3]);
      assert.ok(out.every((r) => r.token_ids.every((ids) => ids.length >= 1 && ids.length <= 4)));
    });

    test('streaming joins to the generated text (greedy and seeded sampling)', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      for (const options of [{ max_new_tokens: 12 }, { strategy: 'sample', seed: 3, max_new_tokens: 12, top_p: 0.9 }]) {
        const [expected] = await model.generate(PROMPT, options);
        let text = '';
        for await (const piece of await model.stream(PROMPT, options)) text += piece;
        assert.equal(text, expected.text, JSON.stringify(options));
      }
    });

    test('a prompt gives the same greedy tokens alone and in a left-padded batch', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      if (quantized(model)) return t.skip('quantized activations may depend on the batch');
      const [alone] = await model.generate('hello', { max_new_tokens: 8 });
      const batch = await model.generate([PROMPT, 'hello'], { max_new_tokens: 8 });
      assert.deepEqual(batch[1].token_ids, alone.token_ids);
    });

    test('embeddings: unit length, and batch size does not change them', async (t) => {
      if (!model.sessions.encoder) return t.skip('no encoder');
      const texts = [PROMPT, 'hello', 'a third text'];
      const one = await model.embed(texts, { batch_size: 1 });
      const all = await model.embed(texts);
      one.forEach((v, i) => {
        assert.ok(Math.abs(Math.hypot(...v) - 1) < 1e-5);
        const diff = maxAbsDiff(v, all[i]);
        assert.ok(diff < tolerance(model) / 10, `text ${i}: max |batch of 1 - batch of 3| = ${diff}`);
      });
    });
  });
}
