/**
 * The error tree is the Python runtime's: the same CODES table (code for code, meaning for
 * meaning), the same class names, parents and default codes, and every code the Node source
 * raises is in the table. Python's side is read from `runtime/errors.py` itself, loaded by path
 * with ONNXFORMER_PYTHON (default python3): no install of onnxformer is needed.
 */

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';

import * as errors from '../errors.js';
import { NODE_DIR, REPO } from './packages.js';

const PYTHON_TREE = `
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("onnxformer_errors", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
classes = {name: {"default_code": getattr(module, name).default_code, "parent": getattr(module, name).__mro__[1].__name__}
           for name in module.__all__ if name != "CODES"}
print(json.dumps({"codes": module.CODES, "classes": classes}))
`;

function pythonTree() {
  const python = process.env.ONNXFORMER_PYTHON || 'python3';
  const run = spawnSync(python, ['-c', PYTHON_TREE, path.join(REPO, 'runtime', 'errors.py')], { encoding: 'utf8' });
  if (run.status !== 0) {
    throw new Error(`${python} could not read runtime/errors.py (status ${run.status}); set ONNXFORMER_PYTHON ` +
      `to a Python 3 interpreter:\n${run.stderr || run.error}`);
  }
  return JSON.parse(run.stdout);
}

const CLASSES = Object.entries(errors).filter(([, value]) => typeof value === 'function' && value.prototype instanceof Error);

test('CODES is the Python table, entry for entry and in order', () => {
  const { codes } = pythonTree();
  assert.deepEqual(Object.entries(errors.CODES), Object.entries(codes));
});

test('the classes are Python\'s: names, parents and default codes', () => {
  const { classes } = pythonTree();
  const node = Object.fromEntries(CLASSES.map(([name, cls]) => [name, {
    default_code: cls.defaultCode,
    parent: name === 'OnnxformerError' ? 'Exception' : Object.getPrototypeOf(cls).name,
  }]));
  assert.deepEqual(node, classes);
});

test('an error carries its code; a code not in the table is a bug', () => {
  const err = new errors.PackageError('a damaged package', { code: 'E_CHECKSUM' });
  assert.ok(err instanceof errors.OnnxformerError && err instanceof Error);
  assert.deepEqual([err.name, err.code, err.message], ['PackageError', 'E_CHECKSUM', 'a damaged package']);
  assert.equal(new errors.InputError('x').code, 'E_INPUT');
  assert.equal(new errors.ValidationError('x').code, 'E_VALIDATION');
  assert.throws(() => new errors.ConfigError('x', { code: 'E_NO_SUCH_CODE' }), /unknown error code 'E_NO_SUCH_CODE'/);
});

test('every code the Node source raises is in CODES', () => {
  const sources = readdirSync(NODE_DIR).filter((name) => name.endsWith('.js'));
  const raised = new Map();
  for (const name of sources) {
    const text = readFileSync(path.join(NODE_DIR, name), 'utf8');
    for (const match of text.matchAll(/\bcode: '([A-Z_]+)'/g)) {
      const line = text.slice(0, match.index).split('\n').length;
      raised.set(`${name}:${line}`, match[1]);
    }
  }
  const unknown = [...raised].filter(([, code]) => !Object.hasOwn(errors.CODES, code));
  assert.deepEqual(unknown, []);
  assert.ok(raised.size >= 10, `found only ${raised.size} codes: does the scan still see the raise sites?`);
});
