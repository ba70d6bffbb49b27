/**
 * Every error message that suggests a fix: trigger it, find the fix in the message as the user
 * reads it (`{ truncate: true } (--truncate)`: the API's and cli.js's spellings, generation.js
 * `option`), apply it literally and see the call succeed. The Python twin is
 * tests/reliability/test_advice.py.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { OnnxformerError, load } from '../index.js';
import { option } from '../generation.js';
import { NODE_DIR, NO_PACKAGES, packageDirs } from './packages.js';

const cli = (...args) => spawnSync(process.execPath, [path.join(NODE_DIR, 'cli.js'), ...args], { encoding: 'utf8' });
const LONG = 'one two three four five six seven eight nine ten '.repeat(40); // beyond max_seq_len

/** `call()` rejects with one of our errors whose message contains `needle`; returns the message. */
async function fails(call, needle) {
  let error;
  try {
    await call();
  } catch (err) {
    error = err;
  }
  assert.ok(error instanceof OnnxformerError, `expected an OnnxformerError, got ${error}`);
  assert.ok(error.message.includes(needle), `the advice ${JSON.stringify(needle)} is not in: ${error.message}`);
  return error.message;
}

const numberAfter = (message, key) => Number(message.split(`${key}: `).at(-1).split(' ')[0]);

test('option() spells a setting for the API and the CLI', () => {
  assert.equal(option('truncate', true), '{ truncate: true } (--truncate)');
  assert.equal(option('strategy', 'beam'), "{ strategy: 'beam' } (--strategy beam)");
  assert.equal(option('max_new_tokens', 7), '{ max_new_tokens: 7 } (--max-new-tokens 7)');
  assert.equal(option('eos_token_ids', 2), '{ eos_token_ids: 2 }');
});

const dirs = Object.fromEntries(packageDirs().map((dir) => [path.basename(dir), dir]));
const needed = ['decoder', 'encoder', 'encoder-decoder'];
if (!needed.every((name) => dirs[name])) test('advice on packages', { skip: NO_PACKAGES }, () => {});
else {
  describe('advice in the API', () => {
    const models = {};
    before(async () => {
      for (const name of needed) models[name] = await load(dirs[name], { threads: 1 });
    });
    after(async () => {
      for (const model of Object.values(models)) await model.release();
    });

    // [name, package, options that fail, [[the fix as the message spells it, options that work]]]
    const cases = [
      ['top_p', 'decoder', { strategy: 'sample', top_p: 1.5, seed: 0 }, [['{ top_p: 1 }', { top_p: 1 }]]],
      ['repetition_penalty', 'decoder', { repetition_penalty: 0 }, [['{ repetition_penalty: 1 }', { repetition_penalty: 1 }]]],
      ['min > max', 'decoder', { min_new_tokens: 5, max_new_tokens: 2 },
        [['{ min_new_tokens: 2 }', { min_new_tokens: 2 }], ['{ max_new_tokens: 5 }', { max_new_tokens: 5 }]]],
      ['temperature 0', 'decoder', { strategy: 'sample', temperature: 0 },
        [['{ temperature: 1 }', { temperature: 1 }], ["{ strategy: 'greedy' }", { strategy: 'greedy' }]]],
      ['beams without beam', 'decoder', { strategy: 'sample', num_beams: 2 },
        [["{ strategy: 'beam' }", { strategy: 'beam' }], ['{ num_beams: 1 }', { num_beams: 1 }]]],
      ['greedy sequences', 'decoder', { strategy: 'greedy', num_return_sequences: 2 },
        [["{ strategy: 'sample' }", { strategy: 'sample' }], ['{ num_beams: 2 }', { strategy: 'beam', num_beams: 2 }]]],
      ['sequences > beams', 'decoder', { strategy: 'beam', num_beams: 2, num_return_sequences: 3 },
        [['{ num_beams: 3 }', { num_beams: 3 }]]],
      ['stop with beam', 'decoder', { strategy: 'beam', num_beams: 2, stop_strings: ['x'] },
        [['drop stop_strings', { stop_strings: [] }], ['{ num_beams: 1 }', { strategy: 'greedy', num_beams: 1 }]]],
      ['prompt too long', 'decoder', { prompt: LONG }, [['{ truncate: true }', { truncate: true }], ['Shorten it', { prompt: 'one two' }]]],
      ['encoder-decoder source too long', 'encoder-decoder', { prompt: LONG, max_new_tokens: 1 },
        [['{ truncate: true }', { truncate: true }], ['Shorten it', { prompt: 'one two' }]]],
      ['max_new_tokens >= max_seq_len', 'encoder-decoder', { max_new_tokens: 128 },
        [['{ max_new_tokens: 127 }', { max_new_tokens: 127 }]]],
      ['beams > vocabulary', 'decoder', { strategy: 'beam', num_beams: 100000, max_new_tokens: 1 }, [['{ num_beams: ', 'VOCAB']]],
    ];
    for (const [name, pkg, broken, fixes] of cases) {
      test(name, async () => {
        const model = models[pkg];
        const call = ({ prompt = 'one two', ...options }) => model.generate(prompt, options);
        const base = { max_new_tokens: 4 };
        for (let [needle, fixed] of fixes) {
          const message = await fails(() => call({ ...base, ...broken }), needle);
          if (fixed === 'VOCAB') fixed = { num_beams: numberAfter(message, 'num_beams') };
          const [result] = await call({ ...base, ...broken, ...fixed });
          assert.ok(result.token_ids.length >= 1, name);
        }
      });
    }

    test('a prompt too long for its max_new_tokens', async () => {
      const decoder = models.decoder;
      const prompt = 'one two three four five six seven eight nine ten one two';
      const message = await fails(() => decoder.generate(prompt, { max_new_tokens: 120 }), 'max_new_tokens: ');
      assert.ok(await decoder.generate(prompt, { max_new_tokens: numberAfter(message, 'max_new_tokens') }));
      assert.ok(await decoder.generate(prompt, { max_new_tokens: 120, truncate: true }));
    });

    test('stream with beam or several sequences', async () => {
      const decoder = models.decoder;
      const beam = { strategy: 'beam', num_beams: 2, max_new_tokens: 3 };
      const drain = async (options) => { let text = ''; for await (const piece of await decoder.stream('one', options)) text += piece; return text; };
      await fails(() => drain(beam), 'call generate() instead');
      assert.ok(await decoder.generate('one', beam));
      await fails(() => drain(beam), "{ strategy: 'greedy' } (--strategy greedy) with { num_beams: 1 }");
      assert.equal(typeof await drain({ ...beam, strategy: 'greedy', num_beams: 1 }), 'string');
      const several = { strategy: 'sample', num_return_sequences: 2, seed: 0, max_new_tokens: 3 };
      await fails(() => drain(several), '{ num_return_sequences: 1 }');
      assert.equal(typeof await drain({ ...several, num_return_sequences: 1 }), 'string');
    });

    test("a renamed label: set label_names to the model_config's", async () => {
      const dir = mkdtempSync(path.join(tmpdir(), 'advice-'));
      try {
        cpSync(dirs.encoder, dir, { recursive: true });
        const file = path.join(dir, 'manifest.json');
        const manifest = JSON.parse(readFileSync(file, 'utf8'));
        writeFileSync(file, JSON.stringify({ ...manifest, label_names: manifest.label_names.map((l) => `${l}#`) }));
        await fails(() => load(dir), "set label_names to the model_config's");
        writeFileSync(file, JSON.stringify({ ...manifest, label_names: manifest.model_config.label_names }));
        const model = await load(dir);
        assert.ok(await model.classify(['one']));
        await model.release();
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('classify and embed too long', async () => {
      await fails(() => models.encoder.classify([LONG]), '{ truncate: true }');
      assert.ok(await models.encoder.classify([LONG], { truncate: true }));
      await fails(() => models.encoder.embed([LONG]), '{ truncate: true }');
      assert.ok(await models.encoder.embed([LONG], { truncate: true }));
    });
  });

  describe('advice in the CLI', () => {
    const cases = [
      ['stream with beam', 'decoder', ['generate', 'one', '--stream', '--strategy', 'beam', '--num-beams', '2'],
        [['without --stream', ['generate', 'one', '--strategy', 'beam', '--num-beams', '2']]]],
      ['stream with two prompts', 'decoder', ['generate', 'one', 'two', '--stream'],
        [['drop --stream', ['generate', 'one', 'two']]]],
      ['prompt too long', 'decoder', ['generate', LONG], [['--truncate', ['generate', LONG, '--truncate']]]],
      ['encoder-decoder source too long', 'encoder-decoder', ['generate', LONG, '--max-new-tokens', '1'],
        [['--truncate', ['generate', LONG, '--max-new-tokens', '1', '--truncate']]]],
      ['top_p', 'decoder', ['generate', 'one', '--strategy', 'sample', '--top-p', '1.5'],
        [['--top-p 1', ['generate', 'one', '--strategy', 'sample', '--top-p', '1']]]],
    ];
    for (const [name, pkg, broken, fixes] of cases) {
      test(name, () => {
        const argv = ([command, ...rest]) => [command, dirs[pkg], ...rest, ...(rest.includes('--max-new-tokens') ? [] : ['--max-new-tokens', '2'])];
        for (const [needle, fixed] of fixes) {
          const bad = cli(...argv(broken));
          assert.equal(bad.status, 2, bad.stderr);
          assert.ok(bad.stderr.includes(needle), `the advice ${JSON.stringify(needle)} is not in: ${bad.stderr}`);
          const good = cli(...argv(fixed));
          assert.equal(good.status, 0, good.stderr);
        }
      });
    }

    test('--version', () => {
      const run = cli('--version');
      assert.equal(run.status, 0);
      assert.match(run.stdout, /^onnxformer \d+\.\d+\.\d+/);
    });
  });
}
