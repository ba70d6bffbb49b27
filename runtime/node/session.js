/**
 * onnxruntime-node sessions of a package and the decoder step models with their KV cache, one
 * per KV-cache layout of the manifest (`kv_cache`, FORMAT.md sections 4.3 and 4.4):
 *
 *     DecoderSteps      "concat": the cache is a plain object `{input name: ort.Tensor}`; each
 *                       step's `present.*` outputs become the next step's `past_key_values.*`
 *                       inputs as they are (no copy in JavaScript).
 *     SharedCacheSteps  "shared": one preallocated buffer (N, Hkv, C, Dh) per layer, both the
 *                       past input and the present output, so the graph appends in place.
 *
 * For an encoder-decoder model the cache also holds the cross-attention keys/values
 * (`past_key_values.{i}.encoder.*`) and `encoder_attention_mask`, computed once per source.
 *
 * Shape letters as in contract.js; N = rows run through the model, C = buffer capacity.
 *
 * @module session
 */

import * as path from 'node:path';

import ort from 'onnxruntime-node';

import {
  ATTENTION_MASK, CROSS_ATTENTION, DECODER, ENCODER, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES,
  INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, NEXT_TOKEN, NEXT_TOKEN_LOGPROB, POSITION_IDS, SEQUENCE_LENGTHS,
  checkSessionIo, pastNameFor, selfCacheNames,
} from './contract.js';
import { InputError, PackageError, ProviderError, show } from './errors.js';
import { leftPad } from './generation.js';
import { special } from './manifest.js';

export const PROVIDERS = ['cpu', 'cuda'];

/**
 * "cpu" or "cuda" (also "CUDAExecutionProvider"); checked before anything is loaded.
 * @param {string} provider
 * @returns {string}
 */
export function resolveProvider(provider) {
  const key = (provider || 'cpu').toLowerCase().replace(/executionprovider$/, '');
  if (!PROVIDERS.includes(key)) {
    throw new ProviderError(`provider must be one of ${PROVIDERS.join(', ')}, not ${show(provider)}`);
  }
  const available = ort.listSupportedBackends().map((b) => b.name);
  if (!available.includes(key)) {
    throw new ProviderError(
      `provider '${key}' is not available in this onnxruntime-node build (available: ${available.join(', ')}); ` +
        "use provider 'cpu'",
    );
  }
  return key;
}

/**
 * Open one graph and check its I/O against the contract.
 * @param {string} directory
 * @param {import('./manifest.js').GraphEntry} entry
 * @param {{provider: string, threads?: number, spinning?: boolean}} options  spinning false: the
 *   workers sleep as soon as a run ends (graphs run once per call, before another graph's steps)
 * @returns {Promise<ort.InferenceSession>}
 */
export async function openSession(directory, entry, { provider, threads, spinning = true }) {
  const options = {
    executionProviders: [provider],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,
    ...(threads ? { intraOpNumThreads: threads } : {}),
    ...(spinning ? {} : { extra: { session: { intra_op: { allow_spinning: '0' } } } }),
  };
  let session;
  try {
    session = await ort.InferenceSession.create(path.join(directory, entry.file.file), options);
  } catch (err) {
    const first = String(err.message ?? err).trim().split('\n')[0].slice(0, 300) || err.name;
    if (provider !== 'cpu') {
      throw new ProviderError(`provider '${provider}' could not start for ${entry.file.file}: ${first}`, { cause: err });
    }
    throw new PackageError(
      `onnxruntime could not load ${entry.file.file}: ${first}. The file is damaged or not an ONNX graph; ` +
        're-export the package.',
      { code: 'E_GRAPH', cause: err },
    );
  }
  checkSessionIo(entry.spec, session.inputMetadata, session.outputMetadata);
  return session;
}

// Tensors ---------------------------------------------------------------------------------------
/**
 * A 1-D int64 tensor.
 * @param {number[]} values  (B,)
 * @returns {ort.Tensor}
 */
function int64Vector(values) {
  return new ort.Tensor('int64', BigInt64Array.from(values, BigInt), [values.length]);
}

/**
 * An int64 tensor from rows of equal length.
 * @param {number[][]} rows  (B, L)
 * @returns {ort.Tensor}
 */
export function int64Tensor(rows) {
  const width = rows.length ? rows[0].length : 0;
  const data = new BigInt64Array(rows.length * width);
  rows.forEach((row, b) => row.forEach((x, j) => { data[b * width + j] = BigInt(x); }));
  return new ort.Tensor('int64', data, [rows.length, width]);
}

/** The typed array that holds `size` values of a float dtype (float16 as its bits). */
function floatArray(dtype, size) {
  return dtype === 'float16' ? new Uint16Array(size) : new Float32Array(size);
}

/** Zero-length cache tensor (B, Hkv, P=0, Dh) of the package's float type. */
function emptyPast(batch, dims, dtype) {
  return new ort.Tensor(dtype, floatArray(dtype, 0), [batch, dims.n_kv_heads, 0, dims.d_head]);
}

/** float16 bits -> number. */
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

/**
 * A float tensor's values as float32 (float16 converted).
 * @param {ort.Tensor} tensor
 * @returns {Float32Array}
 */
export function floatData(tensor) {
  if (tensor.type === 'float32') return /** @type {Float32Array} */ (tensor.data);
  if (tensor.type === 'float16') {
    const data = tensor.data;
    return data instanceof Uint16Array ? Float32Array.from(data, halfToFloat) : Float32Array.from(data);
  }
  throw new PackageError(`a graph output is ${tensor.type}, where the contract says float; re-export the package`,
    { code: 'E_GRAPH_IO' });
}

/**
 * Rows of a tensor gathered along axis 0: new row r = old row `indices[r]`.
 * @param {ort.Tensor} tensor
 * @param {number[]} indices
 * @returns {ort.Tensor}
 */
export function gatherRows(tensor, indices) {
  const rowSize = tensor.dims.slice(1).reduce((a, b) => a * b, 1);
  return new ort.Tensor(tensor.type, gatherArrayRows(tensor.data, rowSize, indices), [indices.length, ...tensor.dims.slice(1)]);
}

/** Rows of `rowSize` values gathered into a new array: new row r = old row `indices[r]`. */
function gatherArrayRows(source, rowSize, indices) {
  const out = new source.constructor(indices.length * rowSize);
  indices.forEach((from, r) => out.set(source.subarray(from * rowSize, (from + 1) * rowSize), r * rowSize));
  return out;
}

/**
 * Encoder over the left-padded sources, then cross_attention once: the decoder's encoder K/V
 * `{past_key_values.{i}.encoder.*: (B, Hkv, S, Dh), encoder_attention_mask: (B, S)}`.
 * @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model
 * @param {number[][]} sources
 * @returns {Promise<Record<string, ort.Tensor>>}
 */
async function encodeSources(model, sources) {
  const batch = leftPad(sources, Math.max(special(model.manifest, 'pad'), 0));
  const mask = int64Tensor(batch.attention_mask); // (B, S)
  const encoded = await model.sessions[ENCODER].run({ [INPUT_IDS]: int64Tensor(batch.input_ids), [ATTENTION_MASK]: mask });
  const hidden = encoded[LAST_HIDDEN_STATE]; // (B, S, D)
  const cross = await model.sessions[CROSS_ATTENTION].run({ [ENCODER_HIDDEN_STATES]: hidden });
  const entries = { [ENCODER_ATTENTION_MASK]: mask };
  for (const name of model.sessions[CROSS_ATTENTION].outputNames) entries[pastNameFor(name)] = cross[name]; // (B, Hkv, S, Dh)
  return entries;
}

/** Logits (N, V) of a float tensor as one Float32Array row per batch row. */
function logitRows(tensor) {
  const [n, v] = tensor.dims; // (N, V)
  const all = floatData(tensor);
  return Array.from({ length: n }, (_, r) => all.slice(r * v, (r + 1) * v));
}

// The decoder step models -------------------------------------------------------------------------
/**
 * The StepModel of generation over the package's decoder graph (see generation.js).
 * @implements {import('./generation.js').StepModel}
 */
export class DecoderSteps {
  /**
   * @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model
   * @param {number[][] | null} [sources]  encoder-decoder: the source ids, one row per prompt
   */
  constructor(model, sources = null) {
    this.manifest = model.manifest;
    this.sessions = model.sessions;
    this.session = model.sessions[DECODER];
    this.sources = sources;
    this.vocabSize = model.manifest.dims.vocab_size;
  }

  /** An empty self-attention cache (P = 0); encoder-decoder: plus the encoder K/V and mask. */
  async initCache(batchSize) {
    const { dims, float_dtype: dtype } = this.manifest;
    const cache = {};
    for (const [, past] of selfCacheNames(dims)) cache[past] = emptyPast(batchSize, dims, dtype);
    if (this.sources) {
      if (batchSize !== this.sources.length) throw new Error(`initCache(${batchSize}) for ${this.sources.length} sources`);
      Object.assign(cache, await encodeSources(this, this.sources));
    }
    return cache;
  }

  /**
   * T new tokens per row against the cache; logits of the last position of each row.
   * @param {number[][]} inputIds       (N, T)
   * @param {number[][]} positionIds    (N, T)
   * @param {number[][]} attentionMask  (N, P+T)
   * @param {Record<string, ort.Tensor>} cache
   */
  async step(inputIds, positionIds, attentionMask, cache) {
    const feeds = {
      ...cache,
      [INPUT_IDS]: int64Tensor(inputIds),
      [POSITION_IDS]: int64Tensor(positionIds),
      [ATTENTION_MASK]: int64Tensor(attentionMask),
    };
    const outputs = await this.session.run(feeds);
    const [n, t, v] = outputs[LOGITS].dims; // (N, T, V)
    const all = floatData(outputs[LOGITS]);
    const logits = Array.from({ length: n }, (_, r) => all.slice((r * t + t - 1) * v, (r * t + t) * v)); // (N, V)
    const next = { ...cache };
    for (const name of this.session.outputNames) {
      if (name !== LOGITS) next[pastNameFor(name)] = outputs[name]; // present.* -> past_key_values.*
    }
    return { logits, cache: next };
  }

  /** New row r = old row indices[r], for every cached tensor. */
  reorderCache(cache, indices) {
    return Object.fromEntries(Object.entries(cache).map(([name, tensor]) => [name, gatherRows(tensor, indices)]));
  }
}

/**
 * The state of one generation over a "shared" layout decoder (opaque to generation). A step
 * writes into `buffers`, so only the cache that the last step or reorder returned is valid.
 * @typedef {object} SharedCache
 * @property {number} rows       N
 * @property {number} capacity   C: tokens per row the buffers hold
 * @property {Record<string, Float32Array | Uint16Array>} buffers  past name -> (N, Hkv, C, Dh), also the present
 * @property {number[]} lengths  (N,) tokens of each row in the buffers
 * @property {Record<string, ort.Tensor>} encoder  encoder-decoder: the encoder K/V and mask; else {}
 * @property {number[]} sources  (N,) the source (initial row) each row continues
 */

/**
 * The StepModel of generation over a decoder exported with the "shared" KV-cache layout
 * (FORMAT.md sections 4.4 and 7.7).
 *
 * Each layer's cache is ONE buffer (N, Hkv, C, Dh), allocated once per generation (and again
 * only by reorderCache, or if a row would pass C), passed to `session.run` both as the past
 * input and as the preallocated present output (`fetches`): two ort.Tensors over the same
 * typed array. onnxruntime-node 1.30 runs the graph on that memory, so GroupQueryAttention
 * sees past and present share a buffer and writes only the new tokens' keys/values, in place.
 * The logits and the cache equal those of feeding each present output back as the next past
 * (test/runtime.test.js checks it). The binding still returns every fetched output as a new
 * JavaScript copy, not the preallocated tensor; those copies are dropped. So one buffer copy
 * per step remains (in the binding instead of in the attention operator): on a 2-layer test
 * model, in place is as fast as feeding present back for small caches and faster for large
 * ones (about 1.5x per step at N = 16 rows, C = 4096).
 *
 * The prompt step turns generation's left-padded rows into the right-padded rows the layout
 * takes; sequence_lengths = the attention mask's row sums; positions come from the lengths
 * inside the graph, so position_ids are not fed.
 * @implements {import('./generation.js').StepModel}
 */
export class SharedCacheSteps {
  /**
   * @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model
   * @param {number[][] | null} sources  encoder-decoder: the source ids, one row per prompt
   * @param {{capacity: number}} options  C: tokens per row (longest prompt + max_new_tokens, at most max_seq_len)
   */
  constructor(model, sources, { capacity }) {
    this.model = model;
    this.manifest = model.manifest;
    this.session = model.sessions[DECODER];
    this.sources = sources;
    this.vocabSize = model.manifest.dims.vocab_size;
    this.capacity = Math.max(1, capacity);
    this.pairs = selfCacheNames(model.manifest.dims); // [present, past] per layer, key then value
  }

  /** Values of one (row, head) block of a buffer: C * Dh. */
  #block(capacity) {
    return capacity * this.manifest.dims.d_head;
  }

  /** Zeroed buffers for `batchSize` rows; encoder-decoder: plus the encoder K/V and mask. */
  async initCache(batchSize) {
    const { n_kv_heads: hkv } = this.manifest.dims;
    const size = batchSize * hkv * this.#block(this.capacity); // N * Hkv * C * Dh
    /** @type {SharedCache} */
    const cache = {
      rows: batchSize,
      capacity: this.capacity,
      buffers: Object.fromEntries(this.pairs.map(([, past]) => [past, floatArray(this.manifest.float_dtype, size)])),
      lengths: Array(batchSize).fill(0),
      encoder: {},
      sources: Array.from({ length: batchSize }, (_, r) => r),
    };
    if (this.sources) {
      if (batchSize !== this.sources.length) throw new Error(`initCache(${batchSize}) for ${this.sources.length} sources`);
      cache.encoder = await encodeSources(this.model, this.sources);
    }
    return cache;
  }

  /**
   * T new tokens per row; each row's last real token's logits. Updates `cache` in place.
   * @param {number[][]} inputIds       (N, T) left-padded on the prompt step
   * @param {number[][]} positionIds    (N, T) unused: the graph derives positions from the lengths
   * @param {number[][]} attentionMask  (N, P+T)
   * @param {SharedCache} cache
   */
  async step(inputIds, positionIds, attentionMask, cache) {
    const lengths = attentionMask.map((row) => row.reduce((sum, m) => sum + m, 0)); // (N,) tokens after this step
    const t = inputIds[0].length;
    let ids = inputIds;
    if (t > 1 && cache.lengths.every((l) => l === 0)) { // the prompt: left padding -> right padding
      ids = inputIds.map((row, r) => [...row.slice(t - lengths[r]), ...row.slice(0, t - lengths[r])]);
    }
    const longest = Math.max(...lengths);
    if (longest > cache.capacity) this.#grow(cache, longest);
    const { float_dtype: dtype, dims } = this.manifest;
    const shape = [cache.rows, dims.n_kv_heads, cache.capacity, dims.d_head]; // (N, Hkv, C, Dh)
    const feeds = { [INPUT_IDS]: int64Tensor(ids), [SEQUENCE_LENGTHS]: int64Vector(lengths), ...cache.encoder };
    const fetches = { [LOGITS]: null, [NEXT_TOKEN]: null, [NEXT_TOKEN_LOGPROB]: null };
    for (const [present, past] of this.pairs) {
      const buffer = new ort.Tensor(dtype, cache.buffers[past], shape);
      feeds[past] = buffer;
      fetches[present] = buffer; // the same memory: the graph appends in place
    }
    const outputs = await this.session.run(feeds, fetches); // present.*: copies of the buffers, unused
    cache.lengths = lengths;
    // The graph's greedy choice (FORMAT.md 4.4): [token, logprob] per row.
    const logprobs = outputs[NEXT_TOKEN_LOGPROB].data;
    const choice = Array.from(outputs[NEXT_TOKEN].data, (token, r) => [Number(token), logprobs[r]]);
    return { logits: logitRows(outputs[LOGITS]), cache, choice };
  }

  /**
   * Longer buffers when a row would pass the capacity (a caller past the sized length; the
   * model sizes C so that generation never needs it).
   * @param {SharedCache} cache
   * @param {number} needed
   */
  #grow(cache, needed) {
    const maxLen = this.manifest.max_seq_len;
    const capacity = Math.min(Math.max(needed, 2 * cache.capacity), maxLen);
    if (needed > capacity) {
      throw new InputError(`rows of ${needed} tokens exceed this model's max_seq_len (${maxLen})`, { code: 'E_TOO_LONG' });
    }
    const [from, to] = [this.#block(cache.capacity), this.#block(capacity)];
    for (const [name, old] of Object.entries(cache.buffers)) {
      const grown = new old.constructor((old.length / from) * to);
      for (let b = 0; b < old.length / from; b++) grown.set(old.subarray(b * from, (b + 1) * from), b * to); // per (row, head)
      cache.buffers[name] = grown;
    }
    cache.capacity = capacity;
  }

  /**
   * New row r = old row indices[r] of the buffers, the lengths and (only when the source a row
   * continues changes) the encoder K/V and mask. New buffers: the old cache stays as it was.
   * @param {SharedCache} cache
   * @param {number[]} indices
   * @returns {SharedCache}
   */
  reorderCache(cache, indices) {
    const sources = indices.map((i) => cache.sources[i]);
    const sameSources = sources.length === cache.sources.length && sources.every((s, r) => s === cache.sources[r]);
    const rowSize = this.manifest.dims.n_kv_heads * this.#block(cache.capacity); // Hkv * C * Dh
    return {
      rows: indices.length,
      capacity: cache.capacity,
      buffers: Object.fromEntries(Object.entries(cache.buffers).map(([name, data]) => [name, gatherArrayRows(data, rowSize, indices)])),
      lengths: indices.map((i) => cache.lengths[i]),
      encoder: sameSources ? cache.encoder : Object.fromEntries(
        Object.entries(cache.encoder).map(([name, tensor]) => [name, gatherRows(tensor, indices)]),
      ),
      sources,
    };
  }
}
