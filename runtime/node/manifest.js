/**
 * The package manifest (`manifest.json`): parse, check, verify checksums. A port of
 * `runtime/manifest.py`, with the same checks, each failing with the same error class and code
 * (`runtime/FORMAT.md` section 9 lists them); `runtime/FORMAT.md` describes the fields.
 *
 * Versioning: `format_version` is an integer; this runtime reads the versions in
 * SUPPORTED_FORMAT_VERSIONS and refuses others. Unknown extra fields are ignored.
 *
 *     1   every package whose decoder uses the "concat" KV-cache layout (`kv_cache` absent)
 *     2   `kv_cache` "shared": the decoder takes right-padded rows, `sequence_lengths` and
 *         preallocated KV buffers (FORMAT.md sections 4.4 and 7.7)
 *
 * @module manifest
 */

import { KV_CACHE_LAYOUTS, dimsFromDict, graphSpecs, sameSpec, tensorSpecFromDict } from './contract.js';
import { ConfigError, PackageError, show, typeOf } from './errors.js';
import { checkParameters } from './generation.js';
import { promptFormatFromManifest } from './prompt_format.js';

export const FORMAT_NAME = 'onnxformer-package';
export const FORMAT_VERSION = 1; // of a "concat" package; a "shared" one is SHARED_CACHE_FORMAT_VERSION
export const SHARED_CACHE_FORMAT_VERSION = 2;
export const SUPPORTED_FORMAT_VERSIONS = [1, 2];
export const MANIFEST_FILE = 'manifest.json';
export const SPECIAL_TOKEN_ROLES = ['pad', 'unk', 'bos', 'eos', 'mask', 'cls', 'sep', 'decoder_start'];

/**
 * A file of the package with its checksum.
 * @typedef {{file: string, sha256: string, bytes: number}} FileEntry
 */

/**
 * One graph: its I/O spec, its file, and external-data files when it has any.
 * @typedef {{spec: import('./contract.js').GraphSpec, file: FileEntry, external_data: FileEntry[]}} GraphEntry
 */

/**
 * The parsed, checked manifest. Field names are those of manifest.json.
 * @typedef {object} Manifest
 * @property {number} format_version
 * @property {string} arch
 * @property {string} kv_cache             the decoder's KV-cache layout: "concat" | "shared"
 * @property {import('./contract.js').Dims} dims
 * @property {number} max_seq_len
 * @property {string} float_dtype          graph float I/O: "float32" | "float16"
 * @property {string} weights              "float32" | "float16" | "int8" | "int4" (weight-only) | "int8-dynamic"
 * @property {Record<string, number>} special_tokens  role -> id, -1 when absent
 * @property {string[]} label_names
 * @property {Record<string, any>} generation  defaults for the generation config
 * @property {FileEntry} tokenizer
 * @property {Record<string, GraphEntry>} graphs
 * @property {number} opset
 * @property {Record<string, string>} producer
 * @property {Record<string, any>} validation
 * @property {Record<string, any>} model_config
 * @property {string | null} chat_template   the Jinja chat template chat() renders (chat.js); null: none
 * @property {Record<string, string>} chat_tokens  the template's bos_token, eos_token, ... by name
 * @property {{pooling: string, normalize: boolean} | null} embedding  embed()'s defaults; null: mean, normalised
 * @property {Record<string, any>} source       where the model came from: {format: "huggingface", model_type, ...}
 */

const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);

/** A damaged manifest: its message, with the fix every such message shares. */
function manifestError(message) {
  return new PackageError(`${message}; re-export the package`, { code: 'E_MANIFEST' });
}

function requireFields(data, keys, what) {
  if (!isObject(data)) throw manifestError(`${what} must be a JSON object, not ${typeOf(data)}`);
  const missing = keys.filter((k) => !(k in data));
  if (missing.length) throw manifestError(`${what} lacks ${missing.join(', ')}`);
}

/** A file name inside the package: no directories, no '..', no absolute paths. */
function plainName(name, what) {
  if (typeof name !== 'string' || !name || name === '.' || name === '..' || name.includes('/') ||
      name.includes('\\') || name.includes('\0')) {
    throw new PackageError(
      `${what} ${show(name)} is not a plain file name: a package may only reference files in its own directory`,
      { code: 'E_MANIFEST' },
    );
  }
  return name;
}

/** @returns {FileEntry} */
function fileEntry(data, what) {
  requireFields(data, ['file', 'sha256', 'bytes'], what);
  if (typeof data.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(data.sha256)) {
    throw manifestError(`${what} sha256 must be 64 lowercase hex digits, not ${show(data.sha256)}`);
  }
  const file = plainName(data.file, `${what} file`);
  if (!Number.isInteger(data.bytes) || data.bytes < 0) {
    throw manifestError(`${what} bytes must be an integer >= 0 (the file's size), not ${show(data.bytes)}`);
  }
  return { file, sha256: data.sha256, bytes: data.bytes };
}

/** @returns {GraphEntry} */
function graphEntry(name, data) {
  const what = `manifest graphs.${name}`;
  requireFields(data, ['file', 'sha256', 'bytes', 'inputs', 'outputs'], what);
  const spec = {
    name,
    file: data.file,
    inputs: Array.from(data.inputs, tensorSpecFromDict),
    outputs: Array.from(data.outputs, tensorSpecFromDict),
  };
  const file = fileEntry({ file: data.file, sha256: data.sha256, bytes: data.bytes }, what);
  const listed = data.external_data ?? [];
  if (!Array.isArray(listed)) {
    throw manifestError(`${what}.external_data must be an array of file entries, not ${typeOf(listed)}`);
  }
  const external = listed.map((e) => fileEntry(e, `${what}.external_data`));
  return { spec, file, external_data: external };
}

/**
 * Parse and check a manifest object (the contents of manifest.json).
 * @param {any} data
 * @returns {Readonly<Manifest>}
 */
export function manifestFromDict(data) {
  requireFields(data, ['format', 'format_version'], 'manifest');
  if (data.format !== FORMAT_NAME) {
    throw new PackageError(`manifest format is ${show(data.format)}, not '${FORMAT_NAME}': this is not an onnxformer package`,
      { code: 'E_MANIFEST' });
  }
  const version = data.format_version;
  if (!SUPPORTED_FORMAT_VERSIONS.includes(version)) {
    throw new PackageError(
      `format_version ${show(version)} is not one this runtime reads (${SUPPORTED_FORMAT_VERSIONS.join(', ')}); ` +
        'upgrade onnxformer or re-export the package with this version',
      { code: 'E_FORMAT_VERSION' },
    );
  }
  requireFields(data, ['arch', 'dims', 'max_seq_len', 'float_dtype', 'weights', 'special_tokens', 'label_names',
    'generation', 'tokenizer', 'graphs', 'opset', 'producer'], 'manifest');
  if (!isObject(data.graphs)) throw manifestError('manifest graphs must be a JSON object {graph name: entry}');
  const dims = dimsFromDict(data.dims);
  if (dims.arch !== data.arch) {
    throw manifestError(`manifest arch ${show(data.arch)} disagrees with dims.arch ${show(dims.arch)}`);
  }
  for (const key of ['float_dtype', 'weights']) {
    if (typeof data[key] !== 'string') throw manifestError(`manifest ${key} must be a string, not ${show(data[key])}`);
  }
  const graphs = Object.fromEntries(Object.entries(data.graphs).map(([name, entry]) => [name, graphEntry(name, entry)]));
  const manifest = {
    format_version: version,
    arch: data.arch,
    kv_cache: 'kv_cache' in data ? data.kv_cache : 'concat', // null is not the default (as in Python)
    dims,
    max_seq_len: integerField(data, 'max_seq_len', 1),
    float_dtype: data.float_dtype,
    weights: data.weights,
    special_tokens: objectField(data, 'special_tokens'),
    label_names: labelNames(data.label_names, dims.num_labels),
    generation: objectField(data, 'generation'),
    tokenizer: fileEntry(data.tokenizer, 'manifest tokenizer'),
    graphs,
    opset: integerField(data, 'opset', 1),
    producer: objectField(data, 'producer'),
    validation: objectField(data, 'validation'),
    model_config: objectField(data, 'model_config'),
    prompt_format: promptFormatFromManifest(data.prompt_format), // null: prompts are raw text (FORMAT.md 5.2)
    chat_template: data.chat_template ?? null, // null: as absent
    chat_tokens: objectField(data, 'chat_tokens'),
    embedding: data.embedding ?? null,
    source: objectField(data, 'source'),
  };
  checkAgainstContract(manifest);
  const trained = manifest.model_config.max_seq_len;
  if (Number.isInteger(trained) && manifest.max_seq_len > trained) {
    throw manifestError(
      `manifest max_seq_len (${manifest.max_seq_len}) is more than its model_config.max_seq_len (${trained}), the ` +
        `longest sequence the model was built for; the manifest was edited or is damaged: set max_seq_len to ${trained} or less`,
    );
  }
  const trainedLabels = manifest.model_config.label_names;
  if (Array.isArray(trainedLabels) && JSON.stringify(manifest.label_names) !== JSON.stringify(trainedLabels)) {
    throw manifestError(
      `manifest label_names ${show(manifest.label_names)} differ from its model_config.label_names ${show(trainedLabels)}, ` +
        "the labels the model was trained with; the manifest was edited or is damaged: set label_names to the model_config's",
    );
  }
  const trainedFormat = manifest.model_config.prompt_format;
  const mine = manifest.prompt_format;
  if ('prompt_format' in manifest.model_config && (mine === null ? trainedFormat !== null
    : trainedFormat?.template !== mine.template || trainedFormat?.strip !== mine.strip)) {
    throw manifestError(
      `manifest prompt_format ${show(data.prompt_format ?? null)} differs from its model_config.prompt_format ` +
        `${show(trainedFormat)}, the format the model was trained with; the manifest was edited or is damaged: ` +
        "set prompt_format to the model_config's",
    );
  }
  return Object.freeze(manifest);
}

/** A field that must be an integer >= minimum. */
function integerField(data, key, minimum) {
  const value = data[key];
  if (!Number.isInteger(value) || value < minimum) {
    throw manifestError(`manifest ${key} must be an integer >= ${minimum}, not ${show(value)}`);
  }
  return value;
}

/** Classification labels: non-empty, distinct strings, none or one per label of the model. */
function labelNames(value, numLabels) {
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string' && v)) {
    throw manifestError(`manifest label_names must be an array of non-empty strings, not ${show(value)}`);
  }
  if (value.length && value.length !== numLabels) {
    throw manifestError(`manifest label_names has ${value.length} name(s) but the model has ${numLabels} label(s)`);
  }
  if (new Set(value).size !== value.length) throw manifestError(`manifest label_names has duplicates: ${show(value)}`);
  return [...value];
}

/** A field that must be a JSON object; absent is {} (required fields are checked before). */
function objectField(data, key) {
  const value = key in data ? data[key] : {};
  if (!isObject(value)) throw manifestError(`manifest ${key} must be a JSON object, not ${typeOf(value)}`);
  return { ...value };
}

/**
 * The graphs, special tokens and generation defaults must be what the dims imply (Python:
 * Manifest.__post_init__).
 */
function checkAgainstContract(m) {
  if (!KV_CACHE_LAYOUTS.includes(m.kv_cache)) {
    throw manifestError(`manifest kv_cache must be ${KV_CACHE_LAYOUTS.join(' or ')}, not ${show(m.kv_cache)}`);
  }
  const needed = m.kv_cache === 'shared' ? SHARED_CACHE_FORMAT_VERSION : FORMAT_VERSION;
  if (m.format_version !== needed) {
    throw manifestError(`manifest kv_cache '${m.kv_cache}' goes with format_version ${needed}, not ${m.format_version}`);
  }
  const expected = graphSpecs(m.dims, m.float_dtype, m.kv_cache);
  const listed = Object.keys(m.graphs).sort();
  if (listed.join() !== Object.keys(expected).sort().join()) {
    throw manifestError(`manifest lists graphs ${listed.join(', ')}; arch '${m.arch}' needs ${Object.keys(expected).sort().join(', ')}`);
  }
  for (const [name, entry] of Object.entries(m.graphs)) {
    const want = expected[name];
    if (!sameSpec(entry.spec, want)) {
      throw new PackageError(
        `the manifest's inputs and outputs of graph '${name}' are not the contract's for these dims (inputs ` +
          `${want.inputs.map((t) => t.name).join(', ')}; outputs ${want.outputs.map((t) => t.name).join(', ')}): ` +
          'the package is damaged or from an incompatible exporter; re-export it',
        { code: 'E_GRAPH_IO' },
      );
    }
  }
  const missing = SPECIAL_TOKEN_ROLES.filter((r) => !(r in m.special_tokens));
  if (missing.length) throw manifestError(`manifest special_tokens lacks ${missing.join(', ')}`);
  for (const [role, value] of Object.entries(m.special_tokens)) {
    if (!Number.isInteger(value) || value < -1 || value >= m.dims.vocab_size) {
      throw manifestError(`manifest special_tokens.${role} is ${show(value)}; it must be -1 or an id below vocab_size ${m.dims.vocab_size}`);
    }
  }
  if (m.prompt_format !== null && m.arch === 'encoder') {
    throw manifestError('manifest prompt_format applies to generating packages; an encoder package has none');
  }
  if (m.arch === 'encoder-decoder' && m.special_tokens.decoder_start < 0) {
    throw manifestError('manifest special_tokens.decoder_start is -1, but an encoder-decoder model needs a decoder start token');
  }
  checkImportedFields(m);
  checkGenerationDefaults(m.generation, m.dims.vocab_size);
}

export const EMBEDDING_POOLINGS = ['mean', 'cls'];

/** `chat_template`, `embedding` and `source` (FORMAT.md 2.1), as Python's Manifest._check_imported_fields. */
function checkImportedFields(m) {
  if (m.chat_template !== null) {
    if (typeof m.chat_template !== 'string' || !m.chat_template.trim()) {
      throw manifestError(`manifest chat_template must be a non-empty string (a Jinja template) or absent, not ${show(m.chat_template)}`);
    }
    if (m.arch === 'encoder') throw manifestError('manifest chat_template applies to generating packages; an encoder package has none');
  }
  if (!Object.entries(m.chat_tokens).every(([k, v]) => k.endsWith('_token') && typeof v === 'string' && v)) {
    throw manifestError(`manifest chat_tokens must be an object of non-empty token strings by <role>_token name ` +
      `({"bos_token": "<s>"}), not ${show(m.chat_tokens)}`);
  }
  if (m.embedding !== null) {
    if (!isObject(m.embedding)) {
      throw manifestError(`manifest embedding must be a JSON object {"pooling": ..., "normalize": ...} or absent, not ${typeOf(m.embedding)}`);
    }
    const unknown = Object.keys(m.embedding).filter((k) => k !== 'pooling' && k !== 'normalize').sort();
    if (unknown.length) {
      throw manifestError(`manifest embedding has unknown field(s) ${unknown.join(', ')}; it takes pooling and normalize only`);
    }
    const { pooling = 'mean', normalize = true } = m.embedding;
    if (!EMBEDDING_POOLINGS.includes(pooling)) {
      throw manifestError(`manifest embedding.pooling must be one of ${EMBEDDING_POOLINGS.join(', ')}, not ${show(pooling)}`);
    }
    if (typeof normalize !== 'boolean') throw manifestError(`manifest embedding.normalize must be true or false, not ${show(normalize)}`);
    if (!('encoder' in m.graphs)) {
      throw manifestError(`manifest embedding applies to packages with an encoder graph; a '${m.arch}' package has none`);
    }
  }
  for (const key of ['format', 'model_type', 'family']) {
    if (key in m.source && typeof m.source[key] !== 'string') {
      throw manifestError(`manifest source.${key} must be a string, not ${show(m.source[key])}`);
    }
  }
  const names = m.source.architectures ?? [];
  if (!Array.isArray(names) || !names.every((n) => typeof n === 'string')) {
    throw manifestError(`manifest source.architectures must be an array of strings, not ${show(names)}`);
  }
}

/**
 * [pooling, normalize] that embed() uses when the caller passes none.
 * @param {Manifest} manifest
 * @returns {[string, boolean]}
 */
export function embeddingDefaults(manifest) {
  const { pooling = 'mean', normalize = true } = manifest.embedding ?? {};
  return [pooling, normalize];
}

/**
 * The package's generation defaults, checked like a caller's parameters (each set field, and
 * the rules between set fields) and their token ids against the vocabulary. A bad default is
 * the package's fault: E_MANIFEST, not the E_CONFIG a caller's value gets.
 */
function checkGenerationDefaults(generation, vocabSize) {
  if (!Object.keys(generation).length) return;
  let defaults;
  try {
    defaults = checkParameters(generation);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    throw manifestError(`manifest generation defaults are invalid: ${err.message}`);
  }
  const ids = [...(defaults.eos_token_ids ?? []), ...(defaults.pad_token_id === undefined ? [] : [defaults.pad_token_id]),
    ...(defaults.forced_eos_token_id ?? []),
    ...(defaults.forced_bos_token_id === undefined ? [] : [defaults.forced_bos_token_id])];
  const outside = ids.filter((id) => id >= vocabSize);
  if (outside.length) {
    throw manifestError(`manifest generation token ids ${outside.join(', ')} are not below vocab_size ${vocabSize}`);
  }
}

/**
 * Every file the manifest lists, once: the tokenizer, then each graph and its external data
 * (graphs may share one external-data file, e.g. weights.onnx_data).
 */
export function manifestFiles(manifest) {
  const entries = new Map([[manifest.tokenizer.file, manifest.tokenizer]]);
  for (const graph of Object.values(manifest.graphs)) {
    for (const entry of [graph.file, ...graph.external_data]) {
      const seen = entries.get(entry.file);
      if (seen && (seen.sha256 !== entry.sha256 || seen.bytes !== entry.bytes)) {
        throw manifestError(`manifest lists package file '${entry.file}' twice with different checksums`);
      }
      entries.set(entry.file, entry);
    }
  }
  return [...entries.values()];
}

/**
 * `max_seq_len` is within graph `name`'s built-in position tables (`tables`: name -> positions;
 * a built decoder's rotary cos/sin caches, learned or sinusoidal embeddings), as Python's
 * `Manifest.check_graph_limits`.
 * @param {Manifest} manifest @param {string} name @param {Record<string, number>} tables
 */
export function checkGraphLimits(manifest, name, tables) {
  for (const [table, positions] of Object.entries(tables)) {
    if (manifest.max_seq_len > positions) {
      throw manifestError(
        `manifest max_seq_len (${manifest.max_seq_len}) is more than graph '${name}' supports: its position table ` +
          `'${table}' has ${positions} positions; the manifest was edited or is damaged: set max_seq_len to ${positions} or less`,
      );
    }
  }
}

/** A file's size against its manifest entry (both hosts). */
export function checkSize(entry, size) {
  if (size !== entry.bytes) {
    throw new PackageError(
      `package file '${entry.file}' has ${size} bytes where the manifest says ${entry.bytes}: ` +
        'it was truncated or altered; re-export the package',
      { code: 'E_CHECKSUM' },
    );
  }
}

/** A file's sha256 against its manifest entry (both hosts). */
export function checkDigest(entry, digest) {
  if (digest !== entry.sha256) {
    throw new PackageError(
      `package file '${entry.file}' has sha256 ${digest.slice(0, 16)}… where the manifest says ` +
        `${entry.sha256.slice(0, 16)}…: it was altered or damaged; re-export the package`,
      { code: 'E_CHECKSUM' },
    );
  }
}

/** The id of a special-token role; -1 when the package has none. */
export function special(manifest, role) {
  return Number.isInteger(manifest.special_tokens[role]) ? manifest.special_tokens[role] : -1;
}
