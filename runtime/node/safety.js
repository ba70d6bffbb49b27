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

import * as fs from 'node:fs/promises';
import * as path from 'node:path';

import { InputError, PackageError } from './errors.js';

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
const KEY = Buffer.from('location'); // the external_data key, stored verbatim in the file
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
    if (child === undefined || wire !== 2 || buf.subarray(a, b).indexOf(KEY) < 0) continue;
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
 * @param {(buf: Buffer) => T} parse
 * @returns {T}
 */
function parseGraph(bytes, name, parse) {
  if (!bytes.length) {
    throw new PackageError(`graph file '${name}' is empty; the package is damaged, re-export it`, { code: 'E_GRAPH' });
  }
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength); // a view: indexOf on Buffers
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

/**
 * The bytes of the graph file at `file`; an unreadable one is PackageError E_GRAPH.
 * @param {string} file
 * @returns {Promise<Buffer>}
 */
async function readGraph(file) {
  try {
    return await fs.readFile(file);
  } catch (err) {
    throw new PackageError(`cannot read graph file ${file}: ${err.message}`, { code: 'E_GRAPH', cause: err });
  }
}

/**
 * Every external-data `location` in the ONNX file at `file`.
 * @param {string} file
 * @returns {Promise<ExternalRef[]>}
 */
export async function externalDataRefs(file) {
  return externalDataRefsOf(await readGraph(file), path.basename(file));
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

/**
 * Position table name -> the positions it holds (its first dim), for the graph at `file`.
 * @param {string} file
 * @returns {Promise<Record<string, number>>}
 */
export async function positionTables(file) {
  const tables = {};
  const dims = initializerDimsOf(await readGraph(file), path.basename(file), isPositionTable);
  for (const [name, shape] of Object.entries(dims)) {
    if (shape.length) tables[name] = shape[0];
  }
  return tables;
}

// Content stores ------------------------------------------------------------------------------
export const TRUSTED_STORES_ENV = 'ONNXFORMER_TRUSTED_STORES'; // path.delimiter-separated directories
export const TRUST_ADVICE =
  "If the package's files are links into a content store you trust (the Hugging Face cache lays out snapshots " +
  `so), pass { trustedRoots: [STORE] } to load() (CLI: --trust-store STORE; or set ${TRUSTED_STORES_ENV}=STORE)`;

/**
 * The real paths of the directories a package's links may lead into: `given` (an array of
 * paths) and those in ONNXFORMER_TRUSTED_STORES. Each must be an existing directory.
 * @param {string[] | undefined} given
 * @returns {Promise<string[]>}
 */
export async function trustedRoots(given) {
  if (given === undefined || given === null) given = [];
  if (!Array.isArray(given)) {
    throw new InputError(`trustedRoots must be an array of directory paths, not ${typeof given} (${String(given).slice(0, 60)}). ` +
      "Pass e.g. { trustedRoots: ['~/.cache/huggingface/hub'] }");
  }
  const env = (process.env[TRUSTED_STORES_ENV] ?? '').split(path.delimiter).filter(Boolean);
  const roots = [];
  for (const [root, source] of [...given.map((r) => [r, 'trustedRoots']), ...env.map((r) => [r, TRUSTED_STORES_ENV])]) {
    if (typeof root !== 'string') throw new InputError(`${source} entries must be paths, not ${typeof root} (${String(root).slice(0, 60)})`);
    const expanded = root === '~' || root.startsWith('~/') ? path.join(process.env.HOME ?? '', root.slice(1)) : root;
    const stat = await fs.stat(expanded).catch(() => null);
    if (!stat?.isDirectory()) {
      throw new InputError(`${source}: '${root}' is not a directory; pass an existing content store directory`);
    }
    roots.push(await fs.realpath(expanded));
  }
  return roots;
}

/** A package file, links followed (`resolved`), lies directly in `directory` or under a trusted root. */
export function insidePackage(resolved, directory, roots = []) {
  return path.dirname(resolved) === directory ||
    roots.some((root) => resolved === root || resolved.startsWith(root.endsWith(path.sep) ? root : root + path.sep));
}

/** As FORMAT.md 2.5 rule 1: not empty, not . or .., no / \ : NUL, its own base name. */
function plain(location) {
  return Boolean(location) && location !== '.' && location !== '..' && !/[/\\:\0]/.test(location) &&
    location === path.basename(location);
}

/**
 * A path with every link followed, also where the target does not exist (Python's
 * `Path.resolve()`, not strict): a dangling link resolves to where it points.
 * @param {string} file  absolute
 */
async function resolveLoose(file, hops = 0) {
  try {
    return await fs.realpath(file);
  } catch {
    const parent = await fs.realpath(path.dirname(file)).catch(() => path.dirname(file));
    const here = path.join(parent, path.basename(file));
    const stat = await fs.lstat(here).catch(() => null);
    if (!stat?.isSymbolicLink() || hops >= 40) return here; // missing (the file checks report it), or a loop
    return resolveLoose(path.resolve(parent, await fs.readlink(here)), hops + 1);
  }
}

/**
 * Refuse a graph whose external data is not a listed file inside its own directory.
 * @param {string} graphPath  the graph file
 * @param {Iterable<string>} allowed  the external-data file names the manifest lists for this graph
 * @param {string[]} [roots]  trusted content stores (`trustedRoots`): a link into one counts as inside
 * @returns {Promise<ExternalRef[]>}  the references found
 */
export async function checkExternalData(graphPath, allowed, roots = []) {
  const directory = await fs.realpath(path.dirname(graphPath));
  const listed = new Set(allowed);
  const refs = await externalDataRefs(graphPath);
  const name = path.basename(graphPath);
  for (const ref of refs) {
    const what = `graph '${name}' reads tensor '${ref.tensor}' from external file ${JSON.stringify(ref.location)}`;
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
    if (!insidePackage(await resolveLoose(path.join(directory, ref.location)), directory, roots)) {
      throw new PackageError(
        `${what}, which is a link leading outside the package directory; refused. A package may only reference ` +
          `files in its own directory. ${TRUST_ADVICE}`,
        { code: 'E_EXTERNAL_DATA' },
      );
    }
  }
  return refs;
}
