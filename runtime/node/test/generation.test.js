/**
 * Unit tests of generation.js and random.js on a tiny scripted step model: no package, no
 * onnxruntime. Reference values marked "Python" were computed with the Python runtime and an
 * independent Python implementation of xoshiro128**.
 */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { ConfigError, InputError } from '../errors.js';
import * as gen from '../generation.js';
import { StepResult } from '../steps.js';
import { Random } from '../random.js';

const V = 12;

/**
 * A step model (the protocol of steps.js) whose logits depend only on each row's tokens.
 * Records every call.
 */
class ScriptedSteps {
  constructor(logitsOf = (tokens) => Float32Array.from({ length: V }, (_, v) => Math.cos(v * 1.7 + tokens.reduce((s, t) => s + t * 0.37, 0) + tokens.length))) {
    this.vocabSize = V;
    this.logitsOf = logitsOf;
    this.calls = [];
    this.seqs = []; // per row: its tokens
  }

  get rows() {
    return this.seqs.length;
  }

  sequenceStart(prompt) {
    return [...prompt];
  }

  async prefill(prompts) {
    this.calls.push({ prefill: prompts.map((p) => [...p]) });
    const added = prompts.map((p) => [...p]);
    this.seqs.push(...added);
    return new StepResult(added.map((seq) => this.logitsOf(seq)));
  }

  async advance(tokens) {
    this.calls.push({ advance: [...tokens] });
    assert.equal(tokens.length, this.rows, 'one token per running row');
    tokens.forEach((tok, r) => this.seqs[r].push(tok));
    return new StepResult(this.seqs.map((seq) => this.logitsOf(seq)));
  }

  select(rows) {
    this.seqs = rows.map((r) => [...this.seqs[r]]);
  }

  release(rows) {
    this.seqs = this.seqs.filter((_, r) => !rows.includes(r));
  }
}

/** A field of every prompt's Generation. */
const each = (out, field) => out.map((g) => g[field]);

const letters = async (ids) => ids.map((i) => 'abcdefghijkl'[i]).join('');

describe('generationConfig', () => {
  test('defaults and overrides', () => {
    const config = gen.generationConfig({ max_new_tokens: 5, eos_token_ids: 2, stop_strings: 'x' });
    assert.equal(config.strategy, 'greedy');
    assert.equal(config.max_new_tokens, 5);
    assert.deepEqual(config.eos_token_ids, [2]);
    assert.deepEqual(config.stop_strings, ['x']);
    assert.ok(Object.isFrozen(config));
    assert.equal(gen.generationConfig({ seed: undefined }).seed, null);
  });

  // [params, code, what the message must name]
  const bad = [
    [{ top_p: 0 }, 'E_CONFIG', /top_p .*\b0\b/],
    [{ strategy: 'sample', temperature: -1 }, 'E_CONFIG', /temperature .*-1.*strategy: 'greedy'/],
    [{ top_k: 1.5 }, 'E_CONFIG', /top_k .*1\.5/],
    [{ max_new_tokens: 'many' }, 'E_CONFIG', /max_new_tokens .*many/],
    [{ num_beams: 3, strategy: 'beam', num_return_sequences: 4 }, 'E_CONFIG', /num_return_sequences \(4\).*num_beams \(3\)/],
    [{ no_repeat_ngram_size: -2 }, 'E_CONFIG', /no_repeat_ngram_size .*-2/],
    [{ length_penalty: Infinity }, 'E_CONFIG', /length_penalty must be finite, not Infinity/],
    [{ max_tokens: 3 }, 'E_UNKNOWN_PARAMETER', /max_tokens \(did you mean max_new_tokens\?\).*top_p/],
  ];
  for (const [params, code, message] of bad) {
    test(`refuses ${JSON.stringify(params)}`, () => {
      assert.throws(() => gen.generationConfig(params),
        (err) => err instanceof ConfigError && err.code === code && message.test(err.message));
    });
  }

  test('resolveConfig: the caller value, else the package default, else the built-in; unset is undefined or null', () => {
    const pkg = { max_new_tokens: 9, eos_token_ids: [3], pad_token_id: 2, temperature: 0.5 };
    const c = gen.resolveConfig({ max_new_tokens: undefined, temperature: null, top_k: 4 }, pkg);
    assert.deepEqual([c.max_new_tokens, c.temperature, c.top_k, c.eos_token_ids, c.pad_token_id, c.min_new_tokens],
      [9, 0.5, 4, [3], 2, 0]);
    const given = gen.resolveConfig({ eos_token_ids: [], pad_token_id: 0 }, pkg); // no eos, pad 0: kept
    assert.deepEqual([given.eos_token_ids, given.pad_token_id], [[], 0]);
    assert.equal(gen.generationConfig({ max_new_tokens: null }).max_new_tokens, gen.DEFAULTS.max_new_tokens);
    assert.throws(() => gen.resolveConfig({ top_pp: 0.9 }, pkg), (err) => err.code === 'E_UNKNOWN_PARAMETER');
  });

  test('checkParameters checks the set fields and the rules between set fields only (Python: from_dict)', () => {
    assert.deepEqual(gen.checkParameters({ min_new_tokens: 40, eos_token_ids: 2, seed: null }), { min_new_tokens: 40, eos_token_ids: [2] });
    assert.deepEqual(gen.checkParameters({ strategy: 'beam', stop_strings: [] }), { strategy: 'beam', stop_strings: [] });
    assert.deepEqual(gen.checkParameters({ num_return_sequences: 3 }), { num_return_sequences: 3 }); // no strategy set
    for (const [params, code] of [
      [{ min_new_tokens: 5, max_new_tokens: 2 }, 'E_CONFIG'], [{ strategy: 'greedy', num_return_sequences: 2 }, 'E_CONFIG'],
      [{ strategy: 'beam', stop_strings: ['x'] }, 'E_CONFIG'], [{ top_p: 2 }, 'E_CONFIG'], [{ temprature: 1 }, 'E_UNKNOWN_PARAMETER'],
    ]) {
      assert.throws(() => gen.checkParameters(params), (err) => err instanceof ConfigError && err.code === code, JSON.stringify(params));
    }
    // A set field the rules accept alone still meets the built-in defaults when a call resolves it.
    assert.throws(() => gen.resolveConfig({}, { min_new_tokens: 40 }), (err) => err.code === 'E_CONFIG');
  });

  test('closeMatch suggests a name at most 2 edits away', () => {
    const fields = Object.keys(gen.DEFAULTS);
    const expected = { top_pp: 'top_p', temprature: 'temperature', seeed: 'seed', topk: 'top_k', xyz: null,
      num_beam: 'num_beams', eos_token_id: 'eos_token_ids', max_new_token: 'max_new_tokens', pad: null, beams: null };
    for (const [word, match] of Object.entries(expected)) assert.equal(gen.closeMatch(word, fields), match, word);
  });
});

describe('Random (xoshiro128** seeded by SplitMix64)', () => {
  test('matches an independent Python implementation', () => {
    const reference = {
      0: [[3737715805, 2584255861, 2876756834], [0.7651579406981067, 0.37839700847261126, 0.6412509725784215]],
      12345: [[2314518269, 2498321016, 2055377852], [0.9412200994430732, 0.11734062683619417, 0.8026050900504944]],
      9007199254740991: [[1233166643, 1287031142, 661813442], [0.6893346876324036, 0.24123930585121933, 0.6033573700505385]],
    };
    for (const [seed, [ints, doubles]] of Object.entries(reference)) {
      const rng = new Random(Number(seed));
      assert.deepEqual([rng.nextUint32(), rng.nextUint32(), rng.nextUint32()], ints);
      assert.deepEqual([rng.random(), rng.random(), rng.random()], doubles);
    }
  });

  test('unseeded generators differ', () => {
    assert.notEqual(new Random().random(), new Random().random());
  });
});

describe('logits processing', () => {
  test('left padding: mask and positions', () => {
    assert.deepEqual(gen.leftPad([[5, 6, 7], [8]], 0), {
      input_ids: [[5, 6, 7], [0, 0, 8]],
      attention_mask: [[1, 1, 1], [0, 0, 1]],
      position_ids: [[0, 1, 2], [0, 0, 0]],
    });
  });

  test('repetition penalty divides positive and multiplies negative logits, once per token', () => {
    const row = Float32Array.from([2, -2, 3]);
    gen.applyRepetitionPenalty(row, [0, 1, 1], 2);
    assert.deepEqual(Array.from(row), [1, -4, 3]);
  });

  test('n-gram ban', () => {
    const row = new Float32Array(5);
    gen.banRepeatedNgrams(row, [1, 2, 3, 1, 2, 1], 2); // bigrams starting with 1: (1,2) -> ban 2
    assert.deepEqual(Array.from(row), [0, 0, -Infinity, 0, 0]);
    const tri = new Float32Array(5);
    gen.banRepeatedNgrams(tri, [1, 2, 3, 1, 2], 3); // (1,2,3) seen, ends with 1,2 -> ban 3
    assert.deepEqual(Array.from(tri), [0, 0, 0, -Infinity, 0]);
  });

  test('top-k keeps ties at the boundary', () => {
    const row = Float32Array.from([1, 3, 3, 2, 3]);
    gen.topKFilter(row, 2);
    assert.deepEqual(Array.from(row), [-Infinity, 3, 3, -Infinity, 3]);
  });

  test('top-p keeps the smallest prefix whose mass reaches p; the top token always', () => {
    const logits = Float32Array.from([Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)]);
    const row = Float32Array.from(logits);
    gen.topPFilter(row, 0.75);
    assert.deepEqual(Array.from(row).map(Number.isFinite), [true, true, false, false]);
    const tiny = Float32Array.from(logits);
    gen.topPFilter(tiny, 0.01);
    assert.deepEqual(Array.from(tiny).map(Number.isFinite), [true, false, false, false]);
  });

  test('inverse-CDF sampling never picks banned tokens', () => {
    const row = Float32Array.from([-Infinity, 0, -Infinity, 0, -Infinity]);
    assert.equal(gen.sampleToken(row, 0), 1);
    assert.equal(gen.sampleToken(row, 0.49), 1);
    assert.equal(gen.sampleToken(row, 0.5), 3);
    assert.equal(gen.sampleToken(row, 1 - 2 ** -53), 3);
    assert.equal(gen.sampleToken(new Float32Array(3).fill(-Infinity), 0.3), 0);
  });

  test('argmax takes the lowest id among ties', () => {
    assert.equal(gen.argmax(Float32Array.from([1, 5, 5, 2])), 1);
  });
});

describe('greedy and sample loops', () => {
  test('prefills the prompts once, then advances one token per row; releases its rows at the end', async () => {
    const steps = new ScriptedSteps();
    const config = gen.generationConfig({ max_new_tokens: 3 });
    const out = await gen.greedy(steps, [[1, 2, 3], [4]], config);
    assert.deepEqual(steps.calls.map((c) => Object.keys(c)[0]), ['prefill', 'advance', 'advance'], 'the last token is not fed back');
    assert.deepEqual(steps.calls[0].prefill, [[1, 2, 3], [4]]);
    assert.deepEqual(steps.calls[1].advance, out.map((g) => g.token_ids[0][0]));
    assert.equal(steps.rows, 0, 'the search released its rows');
    assert.deepEqual(out.map((g) => g.prompt), [[1, 2, 3], [4]]);
  });

  test('sample copies each prompt row with select; beam search releases its rows', async () => {
    const steps = new ScriptedSteps();
    await gen.sample(steps, [[1], [2, 3]], gen.generationConfig({ strategy: 'sample', seed: 1, num_return_sequences: 2, max_new_tokens: 2 }));
    assert.deepEqual(steps.calls[0].prefill, [[1], [2, 3]], 'each prompt runs once');
    assert.equal(steps.calls[1].advance.length, 4);
    assert.equal(steps.rows, 0);
    await gen.beamSearch(steps, [[1]], gen.generationConfig({ strategy: 'beam', num_beams: 2, max_new_tokens: 3 }));
    assert.equal(steps.rows, 0);
  });

  test('a stream closed early releases its rows', async () => {
    const steps = new ScriptedSteps((tokens) => Float32Array.from({ length: V }, (_, v) => (v === 1 + (tokens.length % 3) ? 1 : 0)));
    for await (const piece of gen.stream(steps, [0], gen.generationConfig({ max_new_tokens: 8 }), letters)) {
      assert.ok(piece);
      break;
    }
    assert.equal(steps.rows, 0);
  });

  test('a prompt gives the same tokens alone and in a padded batch', async () => {
    const config = gen.generationConfig({ max_new_tokens: 6 });
    const alone = await gen.greedy(new ScriptedSteps(), [[4]], config);
    const batched = await gen.greedy(new ScriptedSteps(), [[1, 2, 3], [4]], config);
    assert.deepEqual(each(batched, 'token_ids')[1], each(alone, 'token_ids')[0]);
  });

  test('eos finishes a row; finished rows are fed pad; min_new_tokens suppresses eos', async () => {
    // eos (2) once the row holds n tokens, else 5 (and 5 is the runner-up)
    const eosAfter = (n) => (tokens) => Float32Array.from({ length: V }, (_, v) => (v === 5 ? 0.5 : 0) + (v === (tokens.length >= n ? 2 : 5) ? 1 : 0));
    const config = gen.generationConfig({ max_new_tokens: 5, eos_token_ids: [2], pad_token_id: 0 });
    const steps = new ScriptedSteps(eosAfter(3));
    const out = await gen.greedy(steps, [[7, 7, 7], [7]], config);
    assert.deepEqual(each(out, 'token_ids'), [[[2]], [[5, 5, 2]]]);
    assert.deepEqual(each(out, 'finish_reasons'), [['eos'], ['eos']]);
    assert.deepEqual(steps.calls[2].advance, [0, 5], 'finished row 0 is fed pad');
    const late = await gen.greedy(new ScriptedSteps(eosAfter(1)), [[7]], gen.generationConfig({ ...config, min_new_tokens: 3 }));
    assert.deepEqual(each(late, 'token_ids'), [[[5, 5, 5, 2]]]);
  });

  test('stop strings cut the text and finish with reason "stop"', async () => {
    const config = gen.generationConfig({ max_new_tokens: 8, stop_strings: ['cd'] });
    const counting = (tokens) => Float32Array.from({ length: V }, (_, v) => (v === tokens.length % V ? 1 : 0));
    const out = await gen.greedy(new ScriptedSteps(counting), [[0]], config, { decode: letters });
    assert.deepEqual(each(out, 'token_ids'), [[[1, 2, 3]]]);
    assert.deepEqual(each(out, 'texts'), [['b']]);
    assert.deepEqual(each(out, 'finish_reasons'), [['stop']]);
  });

  test('seeded sampling is reproducible; num_return_sequences copies each prompt', async () => {
    const config = gen.generationConfig({ strategy: 'sample', seed: 11, num_return_sequences: 3, max_new_tokens: 8, temperature: 2 });
    const a = await gen.sample(new ScriptedSteps(), [[1], [2, 3]], config);
    const b = await gen.sample(new ScriptedSteps(), [[1], [2, 3]], config);
    assert.deepEqual(a, b);
    assert.equal(each(a, 'token_ids').length, 2);
    assert.equal(each(a, 'token_ids')[0].length, 3);
    const other = await gen.sample(new ScriptedSteps(), [[1], [2, 3]], { ...config, seed: 12 });
    assert.notDeepEqual(each(other, 'token_ids'), each(a, 'token_ids'));
  });

  test('sampling with top_k 1 is greedy', async () => {
    const greedy = await gen.greedy(new ScriptedSteps(), [[3, 1]], gen.generationConfig({ max_new_tokens: 6 }));
    const sampled = await gen.sample(new ScriptedSteps(), [[3, 1]], gen.generationConfig({ strategy: 'sample', top_k: 1, max_new_tokens: 6 }));
    assert.deepEqual(each(sampled, 'token_ids'), each(greedy, 'token_ids'));
  });

  test("plain greedy takes the model's own choice; logits processing goes back to the logits", async () => {
    // A model that also reports a choice, deliberately not the argmax (token 9, logprob -0.25),
    // so which one generation used shows in the tokens and the scores.
    const choosing = (result) => new StepResult(result.logits, result.logits.map(() => 9), result.logits.map(() => -0.25));
    class Choosing extends ScriptedSteps {
      async prefill(prompts) {
        return choosing(await super.prefill(prompts));
      }

      async advance(tokens) {
        return choosing(await super.advance(tokens));
      }
    }
    const plain = gen.generationConfig({ max_new_tokens: 4 });
    const got = await gen.greedy(new Choosing(), [[1, 2], [3]], plain);
    assert.deepEqual(each(got, 'token_ids'), [[[9, 9, 9, 9]], [[9, 9, 9, 9]]]);
    assert.deepEqual(each(got, 'scores'), [[-1], [-1]]);
    const byLogits = await gen.greedy(new ScriptedSteps(), [[1, 2], [3]], { ...plain, repetition_penalty: 1.5 });
    const processed = await gen.greedy(new Choosing(), [[1, 2], [3]], { ...plain, repetition_penalty: 1.5 });
    assert.deepEqual(processed, byLogits);
    const suppressing = gen.generationConfig({ ...plain, eos_token_ids: [11], min_new_tokens: 2 });
    const late = await gen.greedy(new Choosing(), [[1, 2]], suppressing);
    const first2 = (await gen.greedy(new ScriptedSteps(), [[1, 2]], { ...suppressing, max_new_tokens: 2 }))[0].token_ids[0];
    assert.deepEqual(each(late, 'token_ids')[0][0], [...first2, 9, 9], 'eos suppression applies to steps 0-1 only');
    const noEos = await gen.greedy(new Choosing(), [[1, 2]], { ...plain, min_new_tokens: 2 });
    assert.deepEqual(each(noEos, 'token_ids')[0][0], [9, 9, 9, 9], 'without eos there is nothing to suppress');
  });

  test('token-id prompts are checked', async () => {
    const config = gen.generationConfig({});
    const is = (cls, code) => (err) => err instanceof cls && err.code === code;
    await assert.rejects(gen.greedy(new ScriptedSteps(), [[1, V]], config), is(InputError, 'E_TOKEN_ID'));
    await assert.rejects(gen.greedy(new ScriptedSteps(), [[1, 1.5]], config), is(InputError, 'E_TOKEN_ID'));
    await assert.rejects(gen.greedy(new ScriptedSteps(), [[1, -1]], config), is(InputError, 'E_TOKEN_ID'));
    await assert.rejects(gen.greedy(new ScriptedSteps(), [], config), is(InputError, 'E_INPUT'));
    await assert.rejects(gen.greedy(new ScriptedSteps(), [[1]], gen.generationConfig({ eos_token_ids: [V] })),
      (err) => is(ConfigError, 'E_CONFIG')(err) && err.message.includes(`eos_token_ids [${V}]`));
  });
});

describe('beam search', () => {
  test('returns num_return_sequences hypotheses, best first, and K=1 equals greedy', async () => {
    const config = gen.generationConfig({ strategy: 'beam', num_beams: 3, num_return_sequences: 2, max_new_tokens: 5 });
    const out = await gen.beamSearch(new ScriptedSteps(), [[1], [2, 3]], config);
    assert.equal(each(out, 'token_ids').length, 2);
    for (const scores of each(out, 'scores')) assert.ok(scores[0] >= scores[1]);
    const one = await gen.beamSearch(new ScriptedSteps(), [[1]], gen.generationConfig({ strategy: 'beam', max_new_tokens: 5 }));
    const greedy = await gen.greedy(new ScriptedSteps(), [[1]], gen.generationConfig({ max_new_tokens: 5 }));
    assert.deepEqual(each(one, 'token_ids'), each(greedy, 'token_ids'));
  });
});

describe('stream', () => {
  test('pieces join to the final text; incomplete characters and stop-string prefixes are held back', async () => {
    // token 1 decodes to an incomplete character until token 2 follows it
    const decode = async (ids) => ids.map((t, i) => (t === 1 && ids[i + 1] !== 2 ? '\ufffd' : t === 2 ? 'é' : t === 1 ? '' : 'x')).join('');
    const script = [3, 1, 2, 3, 3];
    const steps = new ScriptedSteps((tokens) => Float32Array.from({ length: V }, (_, v) => (v === script[tokens.length - 1] ? 1 : 0)));
    const config = gen.generationConfig({ max_new_tokens: 5 });
    const pieces = [];
    for await (const piece of gen.stream(steps, [0], config, decode)) pieces.push(piece);
    assert.deepEqual(pieces, ['x', 'é', 'x', 'x']);

    const stopConfig = gen.generationConfig({ max_new_tokens: 5, stop_strings: ['xx'] });
    const held = [];
    for await (const piece of gen.stream(new ScriptedSteps(steps.logitsOf), [0], stopConfig, decode)) held.push(piece);
    assert.deepEqual(held, ['xé']);
  });

  test('arguments are checked when stream() is called', () => {
    assert.throws(() => gen.stream(new ScriptedSteps(), [], gen.generationConfig({}), letters), InputError);
    assert.throws(() => gen.stream(new ScriptedSteps(), [1], gen.generationConfig({ strategy: 'beam' }), letters), ConfigError);
  });
});
