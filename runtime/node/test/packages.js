/**
 * Which packages the tests run on, and the Python runtime's expected outputs for them.
 *
 * ONNXFORMER_PACKAGES   colon-separated package directories; default: every
 *                       artifacts/<name>/ of the repository that has a manifest.json
 * ONNXFORMER_EXPECTED   directory written by make_expected.py for those packages; when unset,
 *                       the tests run make_expected.py themselves (into a temporary directory)
 *                       with ONNXFORMER_PYTHON (default python3), which must import
 *                       onnxformer.runtime
 */

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const NODE_DIR = path.resolve(HERE, '..');
export const REPO = path.resolve(HERE, '../../..');

/** @returns {string[]} absolute package directories */
export function packageDirs() {
  const listed = process.env.ONNXFORMER_PACKAGES;
  if (listed) return listed.split(':').filter(Boolean).map((p) => path.resolve(p));
  const artifacts = path.join(REPO, 'artifacts');
  if (!existsSync(artifacts)) return [];
  return readdirSync(artifacts)
    .map((name) => path.join(artifacts, name))
    .filter((dir) => existsSync(path.join(dir, 'manifest.json')))
    .sort();
}

export const NO_PACKAGES = 'no packages: artifacts/*/manifest.json is absent and ONNXFORMER_PACKAGES is unset';

let expectedDir = null;

/** Directory of expected outputs: ONNXFORMER_EXPECTED, or made now by make_expected.py. */
function expectedDirectory() {
  if (expectedDir) return expectedDir;
  if (process.env.ONNXFORMER_EXPECTED) {
    expectedDir = process.env.ONNXFORMER_EXPECTED;
    return expectedDir;
  }
  const out = mkdtempSync(path.join(tmpdir(), 'onnxformer-expected-'));
  process.on('exit', () => rmSync(out, { recursive: true, force: true }));
  const python = process.env.ONNXFORMER_PYTHON || 'python3';
  const run = spawnSync(python, [path.join(HERE, 'make_expected.py'), '--out', out, ...packageDirs()], { encoding: 'utf8' });
  if (run.status !== 0) {
    throw new Error(
      `${python} make_expected.py failed (status ${run.status}); set ONNXFORMER_PYTHON to a Python with ` +
        `onnxformer installed, or ONNXFORMER_EXPECTED to its output:\n${run.stderr || run.error}`,
    );
  }
  expectedDir = out;
  return out;
}

/**
 * The Python runtime's outputs for the package at `dir`.
 * @param {string} dir
 * @returns {any}
 */
export function expectedFor(dir) {
  const out = expectedDirectory();
  const index = JSON.parse(readFileSync(path.join(out, 'index.json'), 'utf8'));
  const name = index[realpathSync(dir)];
  if (!name) throw new Error(`${out}/index.json has no entry for ${realpathSync(dir)}; re-run make_expected.py on it`);
  return JSON.parse(readFileSync(path.join(out, name), 'utf8'));
}
