/**
 * forced_bos_token_id, forced_eos_token_id and max_length in the search (generation.js), on a
 * bigram table: the cases and hand-worked expectations of tests/test_hf_generation_settings.py,
 * so both runtimes are held to the same numbers. No package, no onnxruntime.
 */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { ConfigError } from '../errors.js';
import * as gen from '../generation.js';
import { StepResult } from '../steps.js';

const [A, B, E, C] = [0, 1, 2, 3];
const TABLE = [ // P(next | last), rows by the last token
  [0.1, 0.5, 0.1, 0.3],
  [0.6, 0.1, 0.2, 0.1],
  [0.25, 0.25, 0.25, 0.25],
  [0.2, 0.2, 0.5, 0.1],
];
const ln = Math.log;

/** logits = log P[last token]; counts its calls. */
class Bigram {
  constructor() {
    this.vocabSize = 4;
    this.calls = 0;
    this.last = [];
  }

  get rows() {
    return this.last.length;
  }

  sequenceStart(prompt) {
    return [...prompt];
  }

  #result() {
    return new StepResult(this.last.map((t) => Float32Array.from(TABLE[t], (p) => Math.log(p))));
  }

  async prefill(prompts) {
    this.calls += 1;
    this.last.push(...prompts.map((p) => p[p.length - 1]));
    return this.#result();
  }

  async advance(tokens) {
    this.calls += 1;
    this.last = [...tokens];
    return this.#result();
  }

  select(rows) {
    this.last = rows.map((r) => this.last[r]);
  }

  release(rows) {
    this.last = this.last.filter((_, r) => !rows.includes(r));
  }
}

const run = (prompts, params, model = new Bigram()) => gen.generate(model, prompts, gen.generationConfig(params));

// name -> [prompts, params, token_ids per prompt, finish reasons, scores] (Python's CASES)
const CASES = {
  'greedy-bos-eos': [[[A]], { max_new_tokens: 3, forced_bos_token_id: C, forced_eos_token_id: E, eos_token_ids: [] },
    [[C, E, E]], ['length'], [ln(0.5)]],
  'greedy-bos-eos-stops': [[[A]], { max_new_tokens: 3, forced_bos_token_id: C, forced_eos_token_id: E, eos_token_ids: [E] },
    [[C, E]], ['eos'], [ln(0.5)]],
  'greedy-long-prompt': [[[B, A]], { max_new_tokens: 3, forced_bos_token_id: C, forced_eos_token_id: E, eos_token_ids: [] },
    [[B, A, E]], ['length'], [ln(0.5) + ln(0.6)]],
  'max-length': [[[A], [B, A, B]], { max_new_tokens: 5, max_length: 4, forced_eos_token_id: E, eos_token_ids: [] },
    [[B, A, E], [E]], ['length', 'length'], [ln(0.5) + ln(0.6), 0]],
  'max-length-unforced': [[[A], [B, A, B]], { max_new_tokens: 5, max_length: 4, eos_token_ids: [] },
    [[B, A, B], [A]], ['length', 'length'], [ln(0.5) + ln(0.6) + ln(0.5), ln(0.6)]],
  'two-forced-eos': [[[B, A]], { max_new_tokens: 1, forced_eos_token_id: [C, E], eos_token_ids: [] },
    [[E]], ['length'], [ln(0.5)]],
  'beam-eos': [[[A]], { strategy: 'beam', num_beams: 2, num_return_sequences: 2, max_new_tokens: 2, forced_eos_token_id: E,
    eos_token_ids: [E] }, [[[B, E], [C, E]]], [['eos', 'eos']], [[ln(0.5) / 2, ln(0.3) / 2]]],
  'beam-bos': [[[A]], { strategy: 'beam', num_beams: 2, num_return_sequences: 2, max_new_tokens: 2, forced_bos_token_id: C,
    eos_token_ids: [E] }, [[[C, E], [C, A]]], [['eos', 'length']], [[ln(0.5) / 2, ln(0.2) / 2]]],
};

const close = (got, want) => {
  assert.equal(got.length, want.length);
  got.forEach((x, i) => (Array.isArray(x) ? close(x, want[i]) : assert.ok(Math.abs(x - want[i]) <= 1e-5, `${x} vs ${want[i]}`)));
};

describe('forced tokens by hand', () => {
  for (const [name, [prompts, params, tokens, reasons, scores]] of Object.entries(CASES)) {
    test(name, async () => {
      const out = await run(prompts, params);
      if (params.strategy === 'beam') {
        assert.deepEqual(out.map((g) => g.token_ids), tokens);
        assert.deepEqual(out.map((g) => g.finish_reasons), reasons);
        close(out.map((g) => g.scores), scores);
      } else {
        assert.deepEqual(out.map((g) => g.token_ids[0]), tokens);
        assert.deepEqual(out.map((g) => g.finish_reasons[0]), reasons);
        close(out.map((g) => g.scores[0]), scores);
      }
    });
  }

  test('sampling and streaming keep the forced tokens', async () => {
    const params = { max_new_tokens: 4, forced_bos_token_id: C, forced_eos_token_id: E, eos_token_ids: [] };
    const middles = new Set();
    for (let seed = 0; seed < 6; seed++) {
      const [g] = await run([[A]], { ...params, strategy: 'sample', seed });
      const tokens = g.token_ids[0];
      assert.equal(tokens.length, 4);
      assert.equal(tokens[0], C);
      assert.equal(tokens[3], E);
      middles.add(tokens.slice(1, 3).join());
    }
    assert.ok(middles.size > 1, 'the unforced steps do sample');
    let text = '';
    const decode = async (ids) => ids.map((i) => 'ABEC'[i]).join('');
    for await (const piece of gen.stream(new Bigram(), [A], gen.generationConfig(params), decode)) text += piece;
    assert.equal(text, 'CEAE');
  });

  test('a prompt past max_length generates nothing and calls no model', async () => {
    const model = new Bigram();
    for (const [strategy, beams] of [['greedy', 1], ['beam', 2]]) {
      const [g] = await run([[A, A, A, A, A]], { strategy, num_beams: beams, max_length: 4, forced_eos_token_id: E }, model);
      assert.deepEqual(g.token_ids[0], []);
      assert.equal(g.finish_reasons[0], 'length');
    }
    assert.equal(model.calls, 0);
  });

  test('limits and validation', async () => {
    assert.deepEqual(gen.newTokenLimits([[A], [A, B, C], [A, A, A, A, A, A]], gen.generationConfig({ max_new_tokens: 5, max_length: 4 })), [3, 1, 0]);
    await assert.rejects(run([[A]], { forced_bos_token_id: 4 }), (err) => err instanceof ConfigError &&
      /forced_bos_token_id \[4\] are not below vocab_size 4/.test(err.message));
    await assert.rejects(run([[A]], { strategy: 'beam', num_beams: 2, forced_eos_token_id: [E, 9] }),
      (err) => err instanceof ConfigError && /forced_eos_token_id \[9\]/.test(err.message));
    assert.throws(() => gen.generationConfig({ forced_bos_token_id: -3 }), /forced_bos_token_id must be a token id >= 0, or -1/);
    assert.throws(() => gen.generationConfig({ max_length: 2.5 }), /max_length must be an integer >= 0/);
    const config = gen.resolveConfig({}, { forced_bos_token_id: 0, forced_eos_token_id: 2 });
    assert.equal(config.forced_bos_token_id, 0);
    assert.deepEqual(config.forced_eos_token_id, [2]);
    assert.equal(gen.resolveConfig({ forced_bos_token_id: -1 }, { forced_bos_token_id: 0 }).forced_bos_token_id, -1);
  });

  test('an explicit max_new_tokens wins over a package max_length (transformers precedence)', () => {
    const pkg = { max_length: 4, max_new_tokens: 5 };
    assert.equal(gen.resolveConfig({}, pkg).max_length, 4);
    assert.equal(gen.resolveConfig({ max_new_tokens: 8 }, pkg).max_length, 0);
    assert.equal(gen.resolveConfig({ max_new_tokens: 8, max_length: 6 }, pkg).max_length, 6);
  });
});
