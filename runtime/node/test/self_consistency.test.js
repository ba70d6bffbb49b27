// Issue 14: a package is checked against itself at load (max_seq_len vs model_config and the
// graphs' position tables), links into a content store load only when the store is trusted,
// and released models, bad token ids and invalid UTF-8 on stdin give clear errors with codes.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';

import { TRUSTED_STORES_ENV, load, positionTables } from '../index.js';
import { NODE_DIR, REPO } from './packages.js';

const DECODER = path.join(REPO, 'artifacts', 'decoder');
const ENCODER = path.join(REPO, 'artifacts', 'encoder');
const skip = !fs.existsSync(path.join(DECODER, 'manifest.json')) && 'artifacts/decoder is not built';

function copy(dir) {
  const target = fs.mkdtempSync(path.join(os.tmpdir(), 'onnxformer-14-'));
  for (const f of fs.readdirSync(dir)) fs.copyFileSync(path.join(dir, f), path.join(target, f));
  return target;
}

function editManifest(dir, change) {
  const file = path.join(dir, 'manifest.json');
  const data = JSON.parse(fs.readFileSync(file, 'utf8'));
  change(data);
  fs.writeFileSync(file, JSON.stringify(data, null, 2));
  return data;
}

async function refused(promise, code, pattern) {
  await assert.rejects(promise, (err) => {
    assert.equal(err.code, code, err.message);
    if (pattern) assert.match(err.message, pattern);
    return true;
  });
}

/** The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha256>. */
function hubLayout(dir) {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'onnxformer-hub-'));
  const blobs = path.join(root, 'models--x--y', 'blobs');
  const snapshot = path.join(root, 'models--x--y', 'snapshots', '0123abc');
  fs.mkdirSync(blobs, { recursive: true });
  fs.mkdirSync(snapshot, { recursive: true });
  for (const f of fs.readdirSync(dir)) {
    const bytes = fs.readFileSync(path.join(dir, f));
    const digest = createHash('sha256').update(bytes).digest('hex');
    fs.writeFileSync(path.join(blobs, digest), bytes);
    fs.symlinkSync(`../../blobs/${digest}`, path.join(snapshot, f));
  }
  return { root, snapshot };
}

test('max_seq_len above model_config is refused (E_MANIFEST, both numbers); the fix loads', { skip }, async () => {
  for (const dir of [DECODER, ENCODER]) {
    const pkg = copy(dir);
    const trained = editManifest(pkg, (d) => d.max_seq_len = 4096).model_config.max_seq_len;
    await refused(load(pkg), 'E_MANIFEST', new RegExp(`4096.*\\(${trained}\\).*set max_seq_len to ${trained}`));
    editManifest(pkg, (d) => d.max_seq_len = trained);
    const model = await load(pkg);
    assert.equal(model.manifest.max_seq_len, trained);
    await model.release();
  }
});

test("max_seq_len above the built decoder's rotary caches is refused; the fix runs the full length", { skip }, async () => {
  const manifest = JSON.parse(fs.readFileSync(path.join(DECODER, 'manifest.json'), 'utf8'));
  const tables = await positionTables(path.join(DECODER, 'decoder.onnx'));
  if (manifest.producer.decoder_graph !== 'built') return;
  // independent of the walk: the exporter builds the caches over model_config.max_seq_len
  assert.deepEqual(tables, { cos_cache: manifest.model_config.max_seq_len, sin_cache: manifest.model_config.max_seq_len });
  const pkg = copy(DECODER);
  editManifest(pkg, (d) => { d.max_seq_len = 4096; delete d.model_config.max_seq_len; });
  await refused(load(pkg), 'E_MANIFEST', /4096.*'decoder'.*'cos_cache' has 128 positions/);
  editManifest(pkg, (d) => d.max_seq_len = tables.cos_cache);
  const model = await load(pkg);
  const [got] = await model.generateIds([Array(tables.cos_cache - 4).fill(1)], { max_new_tokens: 3, eos_token_ids: [] });
  assert.equal(got.token_ids[0].length, 3);
  await model.release();
});

test('links into a content store: refused by default with advice; trustedRoots and the env var load it', { skip }, async () => {
  const { root, snapshot } = hubLayout(DECODER);
  const saved = process.env[TRUSTED_STORES_ENV];
  delete process.env[TRUSTED_STORES_ENV];
  try {
    await refused(load(snapshot), 'E_PACKAGE', /outside the package directory.*trustedRoots: \[STORE\].*--trust-store/);
    await refused(load(snapshot, { verify: false }), 'E_EXTERNAL_DATA', /link leading outside.*trustedRoots/);
    const plain = await load(DECODER);
    const [want] = await plain.generateIds([[1, 5, 6]], { max_new_tokens: 4 });
    for (const roots of [[root], [path.join(root, 'models--x--y', 'blobs')]]) {
      const model = await load(snapshot, { trustedRoots: roots });
      assert.deepEqual((await model.generateIds([[1, 5, 6]], { max_new_tokens: 4 }))[0].token_ids, want.token_ids);
      await model.release();
    }
    process.env[TRUSTED_STORES_ENV] = root;
    await (await load(snapshot)).release();
    delete process.env[TRUSTED_STORES_ENV];
    // checksums are still verified, and a link out of the store is still refused
    const tokenizer = fs.realpathSync(path.join(snapshot, 'tokenizer.json'));
    const bytes = fs.readFileSync(tokenizer);
    bytes[bytes.length >> 1] ^= 1;
    fs.writeFileSync(tokenizer, bytes);
    await refused(load(snapshot, { trustedRoots: [root] }), 'E_CHECKSUM');
    const elsewhere = fs.mkdtempSync(path.join(os.tmpdir(), 'onnxformer-elsewhere-'));
    fs.copyFileSync(path.join(DECODER, 'tokenizer.json'), path.join(elsewhere, 'tokenizer.json'));
    fs.unlinkSync(path.join(snapshot, 'tokenizer.json'));
    fs.symlinkSync(path.join(elsewhere, 'tokenizer.json'), path.join(snapshot, 'tokenizer.json'));
    await refused(load(snapshot, { trustedRoots: [root] }), 'E_PACKAGE', /outside the package directory/);
    await plain.release();
  } finally {
    if (saved === undefined) delete process.env[TRUSTED_STORES_ENV];
    else process.env[TRUSTED_STORES_ENV] = saved;
  }
});

test('bad trustedRoots are InputErrors naming them', { skip }, async () => {
  await refused(load(DECODER, { trustedRoots: '/tmp' }), 'E_INPUT', /trustedRoots must be an array/);
  await refused(load(DECODER, { trustedRoots: ['/does/not/exist'] }), 'E_INPUT', /'\/does\/not\/exist' is not a directory/);
  await refused(load(DECODER, { trustedRoots: [3] }), 'E_INPUT', /must be paths/);
});

test('cli --trust-store loads a store-linked package; without it error[E_PACKAGE]', { skip }, () => {
  const { root, snapshot } = hubLayout(DECODER);
  const env = { ...process.env };
  delete env[TRUSTED_STORES_ENV];
  const run = (...extra) => spawnSync('node', ['cli.js', 'generate', snapshot, 'hello', '--max-new-tokens', '2', ...extra],
    { cwd: NODE_DIR, env, encoding: 'utf8' });
  const without = run();
  assert.equal(without.status, 2, without.stderr);
  assert.match(without.stderr, /error\[E_PACKAGE\].*--trust-store/);
  const withStore = run('--trust-store', root);
  assert.equal(withStore.status, 0, withStore.stderr);
});

test('invalid UTF-8 on stdin is error[E_INPUT], as in Python (no replacement characters)', { skip }, () => {
  const result = spawnSync('node', ['cli.js', 'generate', DECODER, '--max-new-tokens', '2'],
    { cwd: NODE_DIR, input: Buffer.from([0x6f, 0x6b, 0x0a, 0x62, 0xff, 0xfe, 0x0a]), encoding: 'utf8' });
  assert.equal(result.status, 2, result.stderr);
  assert.match(result.stderr, /^error\[E_INPUT\]: stdin is not valid UTF-8 \(invalid byte at byte 4\)/);
  assert.equal(result.stdout, '');
});

test('a released model: E_RELEASED, also from a step model made before; release twice is fine', { skip }, async () => {
  const model = await load(DECODER);
  const steps = model.stepModel();
  await model.release();
  await model.release();
  await refused(model.generate(['hello'], { max_new_tokens: 2 }), 'E_RELEASED', /released.*load the package again/);
  await refused(steps.prefill([[1, 2]]), 'E_RELEASED');
  await (await load(DECODER)).release(); // the fix: load again
});

test('decode of ids outside the vocabulary is E_TOKEN_ID (Python: the same)', { skip }, async () => {
  const model = await load(DECODER);
  for (const ids of [[999999], [1, -1], [1.5]]) assert.throws(() => model.decode(ids), (e) => e.code === 'E_TOKEN_ID');
  assert.throws(() => model.decode('abc'), (e) => e.code === 'E_INPUT');
  assert.equal(typeof await model.decode([5, 6]), 'string');
  await model.release();
});
