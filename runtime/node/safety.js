/**
 * Refuse ONNX graphs that would make onnxruntime read files outside their package (the port
 * of `runtime/safety.py`; FORMAT.md section 2.5).
 *
 * An ONNX tensor can keep its bytes in another file: `TensorProto.external_data` holds
 * `{location: <path relative to the .onnx>, offset, length}`. A hostile or damaged package
 * can point `location` anywhere (`../../etc/passwd`, an absolute path, a link inside the
 * package that leads out of it). So before onnxruntime opens a graph, every `location` is read
 * and only plain file names that the manifest lists for that graph and that resolve inside the
 * package directory are accepted.
 *
 * The `onnx` protobuf schema is not a dependency: this module walks the protobuf wire format
 * itself. It descends only into the messages that can hold a TensorProto (SCHEMA, field
 * numbers from onnx.proto) and skips every other field by its length; a field whose bytes do
 * not contain `location` (the key every external-data entry spells out) is not entered at all,
 * so a graph with inline weights costs one byte search. A file the walk finds malformed is
 * refused as damaged (E_GRAPH), as Python does.
 *
 * @module safety
 */

import { PackageError } from './errors.js';

/** message -> {field number: message type of that (sub)message field}, as in safety.py. */
const SCHEMA = {
  ModelProto: { 7: 'GraphProto', 20: 'TrainingInfoProto', 25: 'FunctionProto' },
  TrainingInfoProto: { 1: 'GraphProto', 2: 'GraphProto' },
  GraphProto: { 1: 'NodeProto', 5: 'TensorProto', 15: 'SparseTensorProto' },
  NodeProto: { 5: 'AttributeProto' },
  FunctionProto: { 7: 'NodeProto', 11: 'AttributeProto' },
  AttributeProto: { 5: 'TensorProto', 6: 'GraphProto', 10: 'TensorProto', 11: 'GraphProto',
    22: 'SparseTensorProto', 23: 'SparseTensorProto' },
  SparseTensorProto: { 1: 'TensorProto', 2: 'TensorProto' },
};
const TENSOR_DIMS = 1;
const TENSOR_NAME = 8;
const TENSOR_EXTERNAL_DATA = 13; // TensorProto fields
const ENTRY_KEY = 1;
const ENTRY_VALUE = 2; // StringStringEntryProto fields
const MODEL_GRAPH = 7;
const GRAPH_INITIALIZER = 5; // ModelProto.graph, GraphProto.initializer
const KEY = new TextEncoder().encode('location'); // the external_data key, stored verbatim in the file
export const MAX_DEPTH = 64; // nested subgraphs deeper than this are refused rather than recursed into

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** One external-data reference: the tensor's name ('' if none) and its `location` as written. @typedef {{tensor: string, location: string}} ExternalRef */

class Malformed extends Error {}

/** A varint at `pos`: [value, position after it]. Multiplication, not shifts: values exceed 32 bits. */
function varint(buf, pos, end) {
  let value = 0;
  for (let shift = 0; ; shift += 7) {
    if (pos >= end || shift > 63) throw new Malformed(`truncated or overlong varint at byte ${pos}`);
    const byte = buf[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if (byte < 0x80) return [value, pos];
  }
}

/** Each field of the message in [pos, end): [field number, wire type, value start, value end]. */
function* fields(buf, pos, end) {
  while (pos < end) {
    let key;
    [key, pos] = varint(buf, pos, end);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    if (number === 0) throw new Malformed(`field number 0 at byte ${pos}`);
    let after;
    if (wire === 0) {
      [, after] = varint(buf, pos, end);
    } else if (wire === 1) {
      after = pos + 8;
    } else if (wire === 2) {
      let length;
      [length, pos] = varint(buf, pos, end);
      after = pos + length;
    } else if (wire === 5) {
      after = pos + 4;
    } else { // groups (3, 4) are not used by ONNX; 6 and 7 do not exist
      throw new Malformed(`unsupported wire type ${wire} at byte ${pos}`);
    }
    if (after > end) throw new Malformed(`field ${number} runs past the end of its message (byte ${after} > ${end})`);
    yield [number, wire, pos, after];
    pos = after;
  }
}

function text(buf, start, end) {
  try {
    return UTF8.decode(buf.subarray(start, end));
  } catch {
    throw new Malformed(`invalid UTF-8 in a string field at byte ${start}`);
  }
}

function tensor(buf, start, end, found) {
  let name = '';
  const locations = [];
  for (const [number, wire, a, b] of fields(buf, start, end)) {
    if (wire !== 2) continue;
    if (number === TENSOR_NAME) {
      name = text(buf, a, b);
    } else if (number === TENSOR_EXTERNAL_DATA) {
      let key = null;
      let value = null;
      for (const [n, w, c, d] of fields(buf, a, b)) {
        if (w === 2 && n === ENTRY_KEY) key = text(buf, c, d);
        else if (w === 2 && n === ENTRY_VALUE) value = text(buf, c, d);
      }
      if (key === 'location') locations.push(value ?? '');
    }
  }
  for (const location of locations) found.push({ tensor: name, location });
}

function walk(buf, start, end, message, depth, found) {
  if (depth > MAX_DEPTH) throw new Malformed(`subgraphs nested more than ${MAX_DEPTH} deep`);
  const children = SCHEMA[message];
  for (const [number, wire, a, b] of fields(buf, start, end)) {
    const child = children[number];
    // An external-data entry spells out its key: no "location" bytes, none inside.
    if (child === undefined || wire !== 2 || !containsBytes(buf, a, b, KEY)) continue;
    if (child === 'TensorProto') tensor(buf, a, b, found);
    else walk(buf, a, b, child, depth + 1, found);
  }
}

/**
 * Every external-data `location` in an ONNX graph's bytes (initializers, sparse initializers,
 * tensor attributes of nodes and functions, subgraphs at any depth).
 * @param {Uint8Array} bytes  the graph file
 * @param {string} name  the file's name, for messages
 * @returns {ExternalRef[]}
 */
export function externalDataRefsOf(bytes, name) {
  return parseGraph(bytes, name, (buf) => {
    const found = [];
    walk(buf, 0, buf.length, 'ModelProto', 0, found);
    return found;
  });
}

/**
 * `parse(buf)` over the graph file's bytes; an empty or malformed file (a Malformed thrown by
 * `parse`) is PackageError E_GRAPH.
 * @template T
 * @param {Uint8Array} bytes  the graph file
 * @param {string} name  the file's name, for messages
 * @param {(buf: Uint8Array) => T} parse
 * @returns {T}
 */
function parseGraph(bytes, name, parse) {
  if (!bytes.length) {
    throw new PackageError(`graph file '${name}' is empty; the package is damaged, re-export it`, { code: 'E_GRAPH' });
  }
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  try {
    return parse(buf);
  } catch (err) {
    if (!(err instanceof Malformed)) throw err;
    throw new PackageError(
      `graph file '${name}' is not a valid ONNX protobuf (${err.message}); the package is damaged, re-export it`,
      { code: 'E_GRAPH' },
    );
  }
}

/** `needle` occurs in buf[start, end). */
function containsBytes(buf, start, end, needle) {
  const first = needle[0];
  for (let i = buf.indexOf(first, start); i >= 0 && i + needle.length <= end; i = buf.indexOf(first, i + 1)) {
    let k = 1;
    while (k < needle.length && buf[i + k] === needle[k]) k++;
    if (k === needle.length) return true;
  }
  return false;
}

/** A TensorProto's name and dims (repeated int64: packed, or one varint per field). */
function nameAndDims(buf, start, end) {
  let name = '';
  const dims = [];
  for (const [number, wire, a, b] of fields(buf, start, end)) {
    if (number === TENSOR_NAME && wire === 2) name = text(buf, a, b);
    else if (number === TENSOR_DIMS && wire === 0) dims.push(varint(buf, a, b)[0]);
    else if (number === TENSOR_DIMS && wire === 2) {
      for (let pos = a; pos < b;) {
        let value;
        [value, pos] = varint(buf, pos, b);
        dims.push(value);
      }
    }
  }
  return [name, dims];
}

/**
 * The dims of the main graph's initializers whose name satisfies `wanted` (safety.py's
 * `initializer_dims`): each initializer's header is read, its bytes skipped by length.
 * @param {Uint8Array} bytes  the graph file
 * @param {string} name  the file's name, for messages
 * @param {(name: string) => boolean} wanted
 * @returns {Record<string, number[]>}
 */
export function initializerDimsOf(bytes, name, wanted) {
  return parseGraph(bytes, name, (buf) => {
    const found = {};
    for (const [number, wire, a, b] of fields(buf, 0, buf.length)) {
      if (number !== MODEL_GRAPH || wire !== 2) continue;
      for (const [n, w, c, d] of fields(buf, a, b)) {
        if (n !== GRAPH_INITIALIZER || w !== 2) continue;
        const [tensorName, dims] = nameAndDims(buf, c, d);
        if (wanted(tensorName)) found[tensorName] = dims;
      }
    }
    return found;
  });
}

/** Initializers whose first dim is a position count (safety.py `_is_position_table`). */
function isPositionTable(name) {
  return name === 'cos_cache' || name === 'sin_cache' || name === 'pos_emb.weight' || name === 'sinusoid' ||
    name.endsWith('.pos_emb.weight') || name.endsWith('.sinusoid');
}

/** Position table name -> the positions it holds (its first dim), in the graph bytes `bytes` of file `name`. */
export function positionTablesOf(bytes, name) {
  const tables = {};
  for (const [table, shape] of Object.entries(initializerDimsOf(bytes, name, isPositionTable))) {
    if (shape.length) tables[table] = shape[0];
  }
  return tables;
}

// Content stores ------------------------------------------------------------------------------
export const TRUSTED_STORES_ENV = 'ONNXFORMER_TRUSTED_STORES'; // path.delimiter-separated directories
export const TRUST_ADVICE =
  "If the package's files are links into a content store you trust (the Hugging Face cache lays out snapshots " +
  `so), pass { trustedRoots: [STORE] } to load() (CLI: --trust-store STORE; or set ${TRUSTED_STORES_ENV}=STORE)`;

/** As FORMAT.md 2.5 rule 1: not empty, not . or .., no / \ : NUL, its own base name. */
function plain(location) {
  return Boolean(location) && location !== '.' && location !== '..' && !/[/\\:\0]/.test(location);
}

/**
 * FORMAT.md 2.5 rules 1 and 2 on the references `refs` of graph `name`: each location is a plain
 * file name that the manifest lists for this graph (`allowed`). Where the files live (links,
 * trusted stores) is the host's check.
 * @param {ExternalRef[]} refs @param {string} name @param {Iterable<string>} allowed
 */
export function checkExternalRefs(refs, name, allowed) {
  const listed = new Set(allowed);
  for (const ref of refs) {
    const what = externalWhat(name, ref);
    if (!plain(ref.location)) {
      throw new PackageError(
        `${what}, a path outside the package directory; refused. A package may only reference files in its own ` +
          'directory; this one is damaged or hostile, do not use it',
        { code: 'E_EXTERNAL_DATA' },
      );
    }
    if (!listed.has(ref.location)) {
      throw new PackageError(
        `${what}, which the manifest does not list for this graph (listed: ${[...listed].sort().join(', ') || 'none'}); ` +
          'refused: the package is damaged, re-export it',
        { code: 'E_EXTERNAL_DATA' },
      );
    }
  }
}

/** How a message names one reference. */
export function externalWhat(name, ref) {
  return `graph '${name}' reads tensor '${ref.tensor}' from external file ${JSON.stringify(ref.location)}`;
}
