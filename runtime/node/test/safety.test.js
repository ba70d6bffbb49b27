/**
 * The external-data walk of safety.js (FORMAT.md 2.5) on graphs built here byte by byte: every
 * place onnx.proto lets a TensorProto sit is found, a malformed file is E_GRAPH, and
 * checkExternalData refuses what Python's check_external_data refuses. The damaged packages of
 * make_expected.py check the same on real graphs, against the Python runtime (parity.test.js).
 */

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, describe, test } from 'node:test';

import { MAX_DEPTH, externalDataRefsOf } from '../safety.js';
import { checkExternalData } from '../host_node.js';

// A minimal protobuf writer: a message is a Buffer of fields.
function varint(n) {
  const out = [];
  for (; n >= 0x80; n = Math.floor(n / 128)) out.push((n % 128) | 0x80);
  out.push(n);
  return Buffer.from(out);
}
const bytesField = (number, payload) => {
  const data = typeof payload === 'string' ? Buffer.from(payload) : payload;
  return Buffer.concat([varint(number * 8 + 2), varint(data.length), data]);
};
const intField = (number, value) => Buffer.concat([varint(number * 8), varint(value)]);
const message = (...fields) => Buffer.concat(fields);

/** TensorProto with a name and external_data entries {key: value}. */
function tensor(name, entries = { location: 'weights.onnx_data', offset: '0', length: '16' }) {
  return message(
    intField(2, 1), // data_type FLOAT
    bytesField(8, name),
    ...Object.entries(entries).map(([k, v]) => bytesField(13, message(bytesField(1, k), bytesField(2, v)))),
    intField(14, 1), // data_location EXTERNAL
  );
}
const graph = (...fields) => message(bytesField(2, 'g'), ...fields);
const model = (...fields) => message(intField(1, 8), ...fields); // ir_version 8
const initializer = (t) => bytesField(5, t);
const node = (...attributes) => bytesField(1, message(bytesField(4, 'Constant'), ...attributes.map((a) => bytesField(5, a))));
const refs = (bytes) => externalDataRefsOf(bytes, 'g.onnx').map((r) => [r.tensor, r.location]);

describe('externalDataRefsOf: every place a TensorProto can sit', () => {
  test('graph initializers, and nothing in a graph without external data', () => {
    assert.deepEqual(refs(model(bytesField(7, graph(initializer(tensor('w')), initializer(tensor('b', { location: 'x.bin' })))))),
      [['w', 'weights.onnx_data'], ['b', 'x.bin']]);
    assert.deepEqual(refs(model(bytesField(7, graph(initializer(message(bytesField(8, 'inline'), bytesField(9, Buffer.alloc(64)))))))), []);
  });

  test('sparse initializers, tensor attributes (t, tensors, sparse_tensor, sparse_tensors)', () => {
    const sparse = (t) => message(bytesField(1, t), bytesField(2, tensor('idx', { location: 'i.bin' })));
    const g = graph(
      bytesField(15, sparse(tensor('values', { location: 's.bin' }))),
      node(message(bytesField(1, 'value'), bytesField(5, tensor('t')))),
      node(message(bytesField(1, 'values'), bytesField(10, tensor('t0')), bytesField(10, tensor('t1')))),
      node(message(bytesField(1, 'sparse'), bytesField(22, sparse(tensor('sv', { location: 'sv.bin' }))))),
      node(message(bytesField(1, 'sparses'), bytesField(23, sparse(tensor('sw', { location: 'sw.bin' }))))),
    );
    assert.deepEqual(refs(model(bytesField(7, g))), [
      ['values', 's.bin'], ['idx', 'i.bin'], ['t', 'weights.onnx_data'], ['t0', 'weights.onnx_data'],
      ['t1', 'weights.onnx_data'], ['sv', 'sv.bin'], ['idx', 'i.bin'], ['sw', 'sw.bin'], ['idx', 'i.bin'],
    ]);
  });

  test('subgraphs (g, graphs) at depth, functions and training info', () => {
    const inner = graph(initializer(tensor('deep', { location: '../../etc/passwd' })));
    const ifNode = node(message(bytesField(1, 'then_branch'), bytesField(6, graph(node(message(bytesField(11, inner)))))));
    const fn = message(bytesField(1, 'f'), bytesField(7, message(bytesField(5, message(bytesField(5, tensor('fn')))))),
      bytesField(11, message(bytesField(5, tensor('fa')))));
    const training = message(bytesField(1, graph(initializer(tensor('init')))), bytesField(2, graph(initializer(tensor('step')))));
    assert.deepEqual(refs(model(bytesField(7, graph(ifNode)), bytesField(25, fn), bytesField(20, training))),
      [['deep', '../../etc/passwd'], ['fn', 'weights.onnx_data'], ['fa', 'weights.onnx_data'],
        ['init', 'weights.onnx_data'], ['step', 'weights.onnx_data']]);
  });

  test('a location entry without a value is the empty location; other keys are not locations', () => {
    assert.deepEqual(refs(model(bytesField(7, graph(initializer(tensor('w', { location: '' })))))), [['w', '']]);
    const keyOnly = message(bytesField(8, 'k'), bytesField(13, message(bytesField(1, 'location'))));
    assert.deepEqual(refs(model(bytesField(7, graph(initializer(keyOnly))))), [['k', '']]);
    assert.deepEqual(refs(model(bytesField(7, graph(initializer(tensor('w', { offset: 'location' })))))), []);
  });
});

describe('externalDataRefsOf: a malformed graph is E_GRAPH', () => {
  const graphError = (bytes) => assert.throws(() => externalDataRefsOf(bytes, 'g.onnx'),
    (err) => err.name === 'PackageError' && err.code === 'E_GRAPH' && err.message.includes("'g.onnx'"));
  const good = model(bytesField(7, graph(initializer(tensor('w')))));

  test('empty, truncated, overlong varint, field 0, group wire types, invalid UTF-8', () => {
    graphError(Buffer.alloc(0));
    graphError(good.subarray(0, good.length - 3));
    graphError(Buffer.alloc(12, 0xff));
    graphError(message(intField(0, 1)));
    graphError(Buffer.from([7 * 8 + 3]));
    const badName = message(bytesField(8, Buffer.from([0xc3, 0x28])), bytesField(13, message(bytesField(1, 'location'), bytesField(2, 'x'))));
    graphError(model(bytesField(7, graph(initializer(badName)))));
  });

  test(`subgraphs nested more than ${MAX_DEPTH} deep`, () => {
    const nest = (depth) => {
      let g = graph(initializer(tensor('w')));
      for (let i = 0; i < depth; i++) g = graph(node(message(bytesField(6, g))));
      return model(bytesField(7, g));
    };
    assert.deepEqual(refs(nest(20)), [['w', 'weights.onnx_data']]); // 3 levels (graph, node, attribute) each
    graphError(nest(MAX_DEPTH));
  });
});

describe('checkExternalData', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'onnxformer-safety-'));
  const outside = mkdtempSync(path.join(tmpdir(), 'onnxformer-outside-'));
  after(() => { rmSync(dir, { recursive: true, force: true }); rmSync(outside, { recursive: true, force: true }); });
  writeFileSync(path.join(dir, 'weights.onnx_data'), Buffer.alloc(16));
  writeFileSync(path.join(outside, 'secret.bin'), Buffer.alloc(16));
  symlinkSync(path.join(outside, 'secret.bin'), path.join(dir, 'link.bin'));
  symlinkSync(path.join(outside, 'gone.bin'), path.join(dir, 'dangling.bin'));
  const graphFile = (location) => {
    const file = path.join(dir, 'g.onnx');
    writeFileSync(file, model(bytesField(7, graph(initializer(tensor('w', { location }))))));
    return file;
  };
  const refused = (location, listed, words) => assert.rejects(checkExternalData(graphFile(location), listed),
    (err) => err.name === 'PackageError' && err.code === 'E_EXTERNAL_DATA' && err.message.includes(words) &&
      err.message.includes("tensor 'w'"));

  test('a listed file in the package is accepted, also one not yet there', async () => {
    assert.deepEqual(await checkExternalData(graphFile('weights.onnx_data'), ['weights.onnx_data']),
      [{ tensor: 'w', location: 'weights.onnx_data' }]);
    assert.equal((await checkExternalData(graphFile('later.bin'), ['later.bin'])).length, 1);
  });

  test('a location that is not a plain file name', async () => {
    for (const location of ['../weights.onnx_data', 'sub/../../x', path.join(outside, 'secret.bin'), '..\\x', 'C:x', '', '.', '..', 'a\0b']) {
      await refused(location, [location, 'weights.onnx_data'], 'a path outside the package directory');
    }
  });

  test('a plain name the manifest does not list for this graph', async () => {
    await refused('weights.onnx_data', [], 'does not list for this graph (listed: none)');
    await refused('other.bin', ['weights.onnx_data'], 'listed: weights.onnx_data');
  });

  test('a listed name that is a link leading out of the package, dangling or not', async () => {
    await refused('link.bin', ['link.bin'], 'a link leading outside the package directory');
    await refused('dangling.bin', ['dangling.bin'], 'a link leading outside the package directory');
  });

  test('an unreadable graph file is E_GRAPH', async () => {
    await assert.rejects(checkExternalData(path.join(dir, 'missing.onnx'), []), (err) => err.code === 'E_GRAPH');
  });
});
