/**
 * The command line: same results as the API, `error[CODE]: ...` and status 2 on bad input, a
 * usage message and status 2 on bad arguments.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { load } from '../index.js';
import { NODE_DIR, NO_PACKAGES, packageDirs } from './packages.js';

const cli = (...args) => spawnSync(process.execPath, [path.join(NODE_DIR, 'cli.js'), ...args], { encoding: 'utf8' });

test('usage errors exit with status 2', () => {
  const run = cli('translate', 'somewhere');
  assert.equal(run.status, 2);
  assert.match(run.stderr, /error: the first argument must be generate, classify or embed; got 'translate'/);
  assert.equal(cli('--help').status, 0);
});

test('a missing package is an error, not a crash', () => {
  const run = cli('generate', '/nonexistent/package', 'hello');
  assert.equal(run.status, 2);
  assert.match(run.stderr, /^error\[E_MISSING_FILE\]: .*\/nonexistent\/package/);
  assert.equal(run.stderr.split('\n').length, 2, run.stderr); // one line, no stack trace
});

const dirs = packageDirs();
if (!dirs.length) test('cli on packages', { skip: NO_PACKAGES }, () => {});

for (const dir of dirs) {
  describe(`cli: ${dir}`, () => {
    let model;
    before(async () => { model = await load(dir); });
    after(async () => { await model?.release(); });

    test('example.js runs', () => {
      const run = spawnSync(process.execPath, [path.join(NODE_DIR, 'example.js'), dir], { encoding: 'utf8' });
      assert.equal(run.status, 0, run.stderr);
      assert.match(run.stdout, /^loaded a /);
    });

    test('generate --json equals the API; bad parameters exit 2 with the message', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      const run = cli('generate', dir, 'hello', 'three hundred =', '--max-new-tokens', '5', '--json');
      assert.equal(run.status, 0, run.stderr);
      const api = await model.generate(['hello', 'three hundred ='], { max_new_tokens: 5 });
      assert.deepEqual(JSON.parse(run.stdout), api.map(({ text, ...rest }) => rest)); // eslint-disable-line no-unused-vars
      const bad = cli('generate', dir, 'hello', '--top-p', '2');
      assert.equal(bad.status, 2);
      assert.match(bad.stderr, /^error\[E_CONFIG\]: top_p .*\b2\b/);
    });

    test('generate --stream prints the generated text', async (t) => {
      if (!model.canGenerate) return t.skip('no decoder');
      const run = cli('generate', dir, 'hello', '--stream', '--max-new-tokens', '6');
      assert.equal(run.status, 0, run.stderr);
      const [api] = await model.generate('hello', { max_new_tokens: 6 });
      assert.equal(run.stdout, `${api.text}\n`);
    });

    test('classify and embed --json equal the API', async (t) => {
      if (!model.sessions.encoder) return t.skip('no encoder');
      const embedded = cli('embed', dir, 'hello world', '--pooling', 'cls', '--json');
      assert.equal(embedded.status, 0, embedded.stderr);
      const [vector] = await model.embed('hello world', { pooling: 'cls' });
      JSON.parse(embedded.stdout)[0].embedding.forEach((x, i) => assert.ok(Math.abs(x - vector[i]) <= 5e-7));
      if (!model.canClassify) return;
      const classified = cli('classify', dir, 'hello world', 'bye', '--json');
      assert.equal(classified.status, 0, classified.stderr);
      const api = await model.classify(['hello world', 'bye']);
      assert.deepEqual(JSON.parse(classified.stdout), api.map((r, i) => ({ text: ['hello world', 'bye'][i], ...r })));
    });
  });
}
