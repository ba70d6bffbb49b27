/**
 * The graph I/O contract: every input and output of every graph, declared once. A port of
 * `runtime/contract.py`; `runtime/FORMAT.md` is the normative description.
 *
 * Shape letters (used in comments throughout the Node runtime):
 *
 *     B    batch (rows)                           symbolic axis `batch`
 *     T    new tokens fed in one decoder step     symbolic axis `sequence`
 *     S    tokens of an encoder input             `sequence` in the encoder graph,
 *                                                 `encoder_sequence` in the graphs that consume it
 *     P    tokens already in the KV cache         symbolic axis `past_sequence`
 *     P+T  tokens attended to by a decoder step   symbolic axis `total_sequence`
 *     C    capacity of a preallocated KV buffer   symbolic axis `cache_sequence` (layout "shared")
 *     Hkv  key/value heads                        static
 *     Dh   head size                              static
 *     D    model width                            static
 *     V    vocabulary size                        static
 *
 * @module contract
 */

import { PackageError, show } from './errors.js';

export const ARCHITECTURES = ['encoder', 'decoder', 'encoder-decoder', 'prefix-lm'];
export const ENCODER = 'encoder';
export const CROSS_ATTENTION = 'cross_attention';
export const DECODER = 'decoder';

/** @type {Record<string, string[]>} graphs of each architecture, in run order */
export const GRAPHS_BY_ARCH = {
  encoder: [ENCODER],
  decoder: [DECODER],
  'prefix-lm': [DECODER],
  'encoder-decoder': [ENCODER, CROSS_ATTENTION, DECODER],
};

export const INT64 = 'int64';
export const FLOAT_DTYPES = ['float32', 'float16'];
export const DTYPES = [INT64, ...FLOAT_DTYPES];

export const BATCH = 'batch';
export const SEQUENCE = 'sequence';
export const PAST_SEQUENCE = 'past_sequence';
export const TOTAL_SEQUENCE = 'total_sequence';
export const ENCODER_SEQUENCE = 'encoder_sequence';
export const CACHE_SEQUENCE = 'cache_sequence';

/**
 * KV-cache layouts of the decoder graph (manifest `kv_cache`):
 *   "concat"  past (B, Hkv, P, Dh) in, present (B, Hkv, P+T, Dh) out (a new, longer tensor per
 *             step); left padding with attention_mask and position_ids. Every architecture.
 *   "shared"  one preallocated buffer (B, Hkv, C, Dh) per layer that is both past and present
 *             (updated in place); right padding with sequence_lengths; logits of the last token
 *             only. Built for onnxruntime's GroupQueryAttention (decoder, encoder-decoder).
 */
export const KV_CACHE_LAYOUTS = ['concat', 'shared'];

export const INPUT_IDS = 'input_ids';
export const ATTENTION_MASK = 'attention_mask';
export const TOKEN_TYPE_IDS = 'token_type_ids';
export const POSITION_IDS = 'position_ids';
export const ENCODER_ATTENTION_MASK = 'encoder_attention_mask';
export const ENCODER_HIDDEN_STATES = 'encoder_hidden_states';
export const SEQUENCE_LENGTHS = 'sequence_lengths';
export const LAST_HIDDEN_STATE = 'last_hidden_state';
export const LOGITS = 'logits';
export const NEXT_TOKEN = 'next_token'; // layout "shared": argmax of the logits row (B,) int64
export const NEXT_TOKEN_LOGPROB = 'next_token_logprob'; // layout "shared": its log-softmax value (B,) float32

// The only place per-layer cache names are spelled. {part} is "key"/"value", prefixed by the
// cache kind for encoder-decoder models ("decoder.key", "encoder.value").
const PAST_PREFIX = 'past_key_values';
const PRESENT_PREFIX = 'present';
const CACHE_NAME = /^(past_key_values|present)\.(\d+)\.(?:(decoder|encoder)\.)?(key|value)$/;

/**
 * Cache kinds: "self" (decoder-only / prefix-LM self-attention), "decoder" (encoder-decoder
 * self-attention), "encoder" (encoder-decoder cross-attention keys/values).
 * @typedef {'self' | 'decoder' | 'encoder'} CacheKind
 */

/** @param {CacheKind} kind */
function parts(kind) {
  const prefix = kind === 'self' ? '' : `${kind}.`;
  return [`${prefix}key`, `${prefix}value`];
}

/**
 * (key, value) input names of layer `i`'s cache, e.g. `past_key_values.0.key`.
 * @param {number} i
 * @param {CacheKind} [kind]
 * @returns {[string, string]}
 */
export function pastNames(i, kind = 'self') {
  const [k, v] = parts(kind);
  return [`${PAST_PREFIX}.${i}.${k}`, `${PAST_PREFIX}.${i}.${v}`];
}

/**
 * (key, value) output names of layer `i`'s cache, e.g. `present.0.key`.
 * @param {number} i
 * @param {CacheKind} [kind]
 * @returns {[string, string]}
 */
export function presentNames(i, kind = 'self') {
  const [k, v] = parts(kind);
  return [`${PRESENT_PREFIX}.${i}.${k}`, `${PRESENT_PREFIX}.${i}.${v}`];
}

/** @param {string} arch @returns {CacheKind} */
export function selfCacheKind(arch) {
  return arch === 'encoder-decoder' ? 'decoder' : 'self';
}

/**
 * The past input a present output feeds on the next step: `present.0.key` ->
 * `past_key_values.0.key`; also `present.0.encoder.key` -> `past_key_values.0.encoder.key`.
 * @param {string} presentName
 * @returns {string}
 */
export function pastNameFor(presentName) {
  const match = CACHE_NAME.exec(presentName);
  if (!match || match[1] !== PRESENT_PREFIX) {
    throw new Error(`${show(presentName)} is not a present cache name`);
  }
  return `${PAST_PREFIX}${presentName.slice(PRESENT_PREFIX.length)}`;
}

/**
 * @typedef {object} Dims
 * @property {string} arch
 * @property {number} n_layers        decoder-stack (cache) layers; 0 for arch "encoder"
 * @property {number} n_heads         query heads (H)
 * @property {number} n_kv_heads      key/value heads (Hkv)
 * @property {number} d_head          head size (Dh)
 * @property {number} d_model         model width (D)
 * @property {number} vocab_size      V
 * @property {number} num_labels      encoder classification head; 0 = none
 * @property {boolean} has_token_types encoder takes token_type_ids
 */

const DIMS_FIELDS = ['arch', 'n_layers', 'n_heads', 'n_kv_heads', 'd_head', 'd_model', 'vocab_size',
  'num_labels', 'has_token_types'];
const DIMS_REQUIRED = DIMS_FIELDS.slice(0, 7);

/**
 * Parse and check the manifest's `dims` object (the checks of Python's `Dims`; each fails with a
 * PackageError E_MANIFEST).
 * @param {any} data
 * @returns {Readonly<Dims>}
 */
export function dimsFromDict(data) {
  const isObject = data !== null && typeof data === 'object' && !Array.isArray(data);
  const keys = isObject ? Object.keys(data) : [];
  const unknown = keys.filter((k) => !DIMS_FIELDS.includes(k)).sort();
  const missing = DIMS_REQUIRED.filter((k) => !keys.includes(k)).sort();
  if (!isObject || unknown.length || missing.length) {
    const problem = isObject ? `has unknown fields [${unknown.join(', ')}], lacks [${missing.join(', ')}]` : 'is not an object';
    throw dimsError(`manifest dims ${problem}; its fields are ${DIMS_FIELDS.join(', ')}`);
  }
  const dims = { num_labels: 0, has_token_types: false, ...data };
  if (!ARCHITECTURES.includes(dims.arch)) {
    throw dimsError(`dims.arch must be one of ${ARCHITECTURES.join(', ')}, not ${show(dims.arch)}`);
  }
  for (const name of ['n_heads', 'n_kv_heads', 'd_head', 'd_model', 'vocab_size']) {
    if (!Number.isInteger(dims[name]) || dims[name] <= 0) {
      throw dimsError(`dims.${name} must be a positive integer, not ${show(dims[name])}`);
    }
  }
  for (const name of ['n_layers', 'num_labels']) {
    if (!Number.isInteger(dims[name]) || dims[name] < 0) {
      throw dimsError(`dims.${name} must be an integer >= 0, not ${show(dims[name])}`);
    }
  }
  if (dims.arch !== 'encoder' && dims.n_layers === 0) {
    throw dimsError(`dims.n_layers is 0, but arch '${dims.arch}' has a decoder: it needs at least 1`);
  }
  if (dims.n_heads % dims.n_kv_heads) {
    throw dimsError(`dims.n_heads (${dims.n_heads}) must be a multiple of n_kv_heads (${dims.n_kv_heads})`);
  }
  if (dims.arch !== 'encoder' && (dims.num_labels || dims.has_token_types)) {
    throw dimsError(
      `dims.num_labels (${dims.num_labels}) and has_token_types (${dims.has_token_types}) apply to arch ` +
        `'encoder' only, not '${dims.arch}'`,
    );
  }
  return Object.freeze(dims);
}

/** A manifest whose dims, graph specs or layout break the contract. */
function dimsError(message) {
  return new PackageError(`${message}. Re-export the package.`, { code: 'E_MANIFEST' });
}

/**
 * One graph input or output. Shape entries are symbolic axis names or static sizes.
 * @typedef {{name: string, dtype: string, shape: Array<string | number>}} TensorSpec
 */

/**
 * One graph: its name, file inside the package, inputs and outputs (in feed order).
 * @typedef {{name: string, file: string, inputs: TensorSpec[], outputs: TensorSpec[]}} GraphSpec
 */

/** @returns {TensorSpec} */
const ids = (name, axis = SEQUENCE) => ({ name, dtype: INT64, shape: [BATCH, axis] }); // (B, *)

/** @returns {TensorSpec} */
const kv = (name, axis, dims, dtype) => ({ name, dtype, shape: [BATCH, dims.n_kv_heads, axis, dims.d_head] }); // (B, Hkv, *, Dh)

/** @param {Dims} dims @param {string} dtype @returns {GraphSpec} */
function encoderSpec(dims, dtype) {
  const standalone = dims.arch === 'encoder'; // the encoder of an encoder-decoder has no extras
  const inputs = [ids(INPUT_IDS), ids(ATTENTION_MASK)];
  if (standalone && dims.has_token_types) inputs.push(ids(TOKEN_TYPE_IDS));
  const outputs = [{ name: LAST_HIDDEN_STATE, dtype, shape: [BATCH, SEQUENCE, dims.d_model] }]; // (B, S, D)
  if (standalone && dims.num_labels > 0) {
    outputs.push({ name: LOGITS, dtype, shape: [BATCH, dims.num_labels] }); // (B, num_labels)
  }
  return { name: ENCODER, file: `${ENCODER}.onnx`, inputs, outputs };
}

/** @param {Dims} dims @param {string} dtype @returns {GraphSpec} */
function crossAttentionSpec(dims, dtype) {
  const inputs = [{ name: ENCODER_HIDDEN_STATES, dtype, shape: [BATCH, ENCODER_SEQUENCE, dims.d_model] }];
  const outputs = [];
  for (let i = 0; i < dims.n_layers; i++) {
    for (const name of presentNames(i, 'encoder')) outputs.push(kv(name, ENCODER_SEQUENCE, dims, dtype));
  }
  return { name: CROSS_ATTENTION, file: `${CROSS_ATTENTION}.onnx`, inputs, outputs };
}

/** @param {Dims} dims @param {string} dtype @returns {GraphSpec} */
function decoderSpec(dims, dtype) {
  const seq2seq = dims.arch === 'encoder-decoder';
  const kind = selfCacheKind(dims.arch);
  const inputs = [ids(INPUT_IDS), ids(ATTENTION_MASK, TOTAL_SEQUENCE), ids(POSITION_IDS)];
  if (seq2seq) inputs.push(ids(ENCODER_ATTENTION_MASK, ENCODER_SEQUENCE));
  for (let i = 0; i < dims.n_layers; i++) {
    for (const name of pastNames(i, kind)) inputs.push(kv(name, PAST_SEQUENCE, dims, dtype));
    if (seq2seq) for (const name of pastNames(i, 'encoder')) inputs.push(kv(name, ENCODER_SEQUENCE, dims, dtype));
  }
  const outputs = [{ name: LOGITS, dtype, shape: [BATCH, SEQUENCE, dims.vocab_size] }]; // (B, T, V)
  for (let i = 0; i < dims.n_layers; i++) {
    for (const name of presentNames(i, kind)) outputs.push(kv(name, TOTAL_SEQUENCE, dims, dtype));
  }
  return { name: DECODER, file: `${DECODER}.onnx`, inputs, outputs };
}

/**
 * Layout "shared": input_ids (B, T) (right-padded on the first step), sequence_lengths (B,)
 * (each row's tokens after this step), the KV buffers (B, Hkv, C, Dh) -> logits (B, V) of each
 * row's last token, the same buffers (written in place when bound to the same memory), then
 * next_token (B,) int64 (argmax of the logits row) and next_token_logprob (B,) float32.
 * @param {Dims} dims @param {string} dtype @returns {GraphSpec}
 */
function sharedDecoderSpec(dims, dtype) {
  const seq2seq = dims.arch === 'encoder-decoder';
  const kind = selfCacheKind(dims.arch);
  const inputs = [ids(INPUT_IDS), { name: SEQUENCE_LENGTHS, dtype: INT64, shape: [BATCH] }]; // (B, T), (B,)
  if (seq2seq) inputs.push(ids(ENCODER_ATTENTION_MASK, ENCODER_SEQUENCE));
  for (let i = 0; i < dims.n_layers; i++) {
    for (const name of pastNames(i, kind)) inputs.push(kv(name, CACHE_SEQUENCE, dims, dtype));
    if (seq2seq) for (const name of pastNames(i, 'encoder')) inputs.push(kv(name, ENCODER_SEQUENCE, dims, dtype));
  }
  const outputs = [{ name: LOGITS, dtype, shape: [BATCH, dims.vocab_size] }]; // (B, V)
  for (let i = 0; i < dims.n_layers; i++) {
    for (const name of presentNames(i, kind)) outputs.push(kv(name, CACHE_SEQUENCE, dims, dtype));
  }
  // The greedy choice computed in the graph (float32 whatever the graph's dtype).
  outputs.push({ name: NEXT_TOKEN, dtype: INT64, shape: [BATCH] }, { name: NEXT_TOKEN_LOGPROB, dtype: 'float32', shape: [BATCH] });
  return { name: DECODER, file: `${DECODER}.onnx`, inputs, outputs };
}

const BUILDERS = { [ENCODER]: encoderSpec, [CROSS_ATTENTION]: crossAttentionSpec, [DECODER]: decoderSpec };

/**
 * Every graph of `dims.arch` -> its spec, in run order (encoder, cross_attention, decoder).
 * `kvCache` is the decoder's cache layout (KV_CACHE_LAYOUTS); "shared" exists for the decoder
 * and encoder-decoder architectures.
 * @param {Dims} dims
 * @param {string} [floatDtype]
 * @param {string} [kvCache]
 * @returns {Record<string, GraphSpec>}
 */
export function graphSpecs(dims, floatDtype = 'float32', kvCache = 'concat') {
  if (!FLOAT_DTYPES.includes(floatDtype)) {
    throw dimsError(`float_dtype must be ${FLOAT_DTYPES.join(' or ')}, not ${show(floatDtype)}`);
  }
  if (!KV_CACHE_LAYOUTS.includes(kvCache)) {
    throw dimsError(`kv_cache must be ${KV_CACHE_LAYOUTS.join(' or ')}, not ${show(kvCache)}`);
  }
  if (kvCache === 'shared' && dims.arch !== 'decoder' && dims.arch !== 'encoder-decoder') {
    throw dimsError(`kv_cache 'shared' exists for arch 'decoder' and 'encoder-decoder', not '${dims.arch}'`);
  }
  const builders = { ...BUILDERS, ...(kvCache === 'shared' ? { [DECODER]: sharedDecoderSpec } : {}) };
  return Object.fromEntries(GRAPHS_BY_ARCH[dims.arch].map((g) => [g, builders[g](dims, floatDtype)]));
}

/**
 * `[present, past]` name pairs of the decoder's self-attention cache, layer by layer, key then value.
 * @param {Dims} dims
 * @returns {Array<[string, string]>}
 */
export function selfCacheNames(dims) {
  const kind = selfCacheKind(dims.arch);
  const pairs = [];
  for (let i = 0; i < dims.n_layers; i++) {
    const present = presentNames(i, kind);
    const past = pastNames(i, kind);
    pairs.push([present[0], past[0]], [present[1], past[1]]);
  }
  return pairs;
}

/**
 * Parse a tensor spec of the manifest (same checks as Python's `TensorSpec.from_dict`).
 * @param {any} data
 * @returns {TensorSpec}
 */
export function tensorSpecFromDict(data) {
  const keys = data !== null && typeof data === 'object' && !Array.isArray(data) ? Object.keys(data).sort() : null;
  if (!keys || keys.join() !== 'dtype,name,shape' || !Array.isArray(data.shape)) {
    throw dimsError(`a tensor spec must be an object with keys name, dtype and shape (an array), not ${show(data)}`);
  }
  if (!DTYPES.includes(data.dtype)) {
    throw dimsError(`tensor ${show(data.name)}: dtype must be one of ${DTYPES.join(', ')}, not ${show(data.dtype)}`);
  }
  for (const axis of data.shape) {
    if (typeof axis !== 'string' && !Number.isInteger(axis)) {
      throw dimsError(`tensor ${show(data.name)}: a shape entry must be an axis name or an integer, not ${show(axis)}`);
    }
  }
  return { name: data.name, dtype: data.dtype, shape: [...data.shape] };
}

/** @param {GraphSpec} a @param {GraphSpec} b */
export function sameSpec(a, b) {
  const key = (s) => JSON.stringify([s.name, s.file, s.inputs, s.outputs]);
  return key(a) === key(b);
}

/**
 * Compare a session's I/O metadata (`session.inputMetadata` / `outputMetadata` of
 * onnxruntime-node) with `spec`: names (missing and unexpected), dtypes, ranks, static sizes,
 * and symbolic axes not fixed in the graph. Throws PackageError listing every mismatch.
 * @param {GraphSpec} spec
 * @param {ReadonlyArray<any>} inputs
 * @param {ReadonlyArray<any>} outputs
 */
export function checkSessionIo(spec, inputs, outputs) {
  const problems = [...checkSide('input', spec.inputs, inputs), ...checkSide('output', spec.outputs, outputs)];
  if (problems.length) {
    throw new PackageError(
      `graph ${spec.file} does not match the I/O contract (${problems.length} problem(s)):\n  - ` +
        problems.join('\n  - ') +
        '\nThe package was exported by an incompatible version or is damaged; re-export it.',
      { code: 'E_GRAPH_IO' },
    );
  }
}

/** @returns {string[]} */
function checkSide(side, expected, actual) {
  const problems = [];
  const got = new Map(actual.map((m) => [m.name, m]));
  const want = new Map(expected.map((s) => [s.name, s]));
  for (const name of want.keys()) if (!got.has(name)) problems.push(`missing ${side} '${name}'`);
  for (const name of got.keys()) if (!want.has(name)) problems.push(`unexpected ${side} '${name}'`);
  for (const [name, spec] of want) {
    const meta = got.get(name);
    if (!meta) continue;
    if (meta.type !== spec.dtype) problems.push(`${side} '${name}': dtype ${meta.type}, expected ${spec.dtype}`);
    const shape = meta.isTensor && meta.shape && meta.shape.length ? [...meta.shape] : null; // [] = unknown
    if (!shape || shape.length !== spec.shape.length) {
      problems.push(
        `${side} '${name}': rank ${shape ? shape.length : 'unknown'} (shape ${shape ? show(shape) : 'unknown'}), ` +
          `expected rank ${spec.shape.length} ${show(spec.shape)}`,
      );
      continue;
    }
    spec.shape.forEach((axis, k) => {
      const dim = shape[k];
      const fixed = typeof dim === 'number' && dim >= 0; // unnamed dynamic axes may read as -1
      if (typeof axis === 'number') {
        if (fixed && dim !== axis) problems.push(`${side} '${name}': axis ${k} is ${dim}, expected ${axis}`);
      } else if (fixed) {
        problems.push(
          `${side} '${name}': axis ${k} is fixed to ${dim} but must be dynamic ('${axis}'); ` +
            'export it with dynamic_axes',
        );
      }
    });
  }
  return problems;
}
