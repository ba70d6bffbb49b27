/**
 * onnxruntime-node sessions of a package and the decoder step model with its KV cache.
 *
 * The cache is a plain object `{input name: ort.Tensor}`: each step's `present.*` outputs
 * become the next step's `past_key_values.*` inputs as they are (no copy in JavaScript). For
 * an encoder-decoder model it also holds the cross-attention keys/values
 * (`past_key_values.{i}.encoder.*`) and `encoder_attention_mask`, computed once per source.
 *
 * @module session
 */

import * as path from 'node:path';

import ort from 'onnxruntime-node';

import {
  ATTENTION_MASK, CROSS_ATTENTION, DECODER, ENCODER, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES,
  INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, POSITION_IDS, checkSessionIo, pastNameFor, selfCacheNames,
} from './contract.js';
import { PackageError, ProviderError } from './errors.js';
import { leftPad } from './generation.js';
import { special } from './manifest.js';
import { repr } from './repr.js';

export const PROVIDERS = ['cpu', 'cuda'];

/**
 * "cpu" or "cuda" (also "CUDAExecutionProvider"); checked before anything is loaded.
 * @param {string} provider
 * @returns {string}
 */
export function resolveProvider(provider) {
  const key = (provider || 'cpu').toLowerCase().replace(/executionprovider$/, '');
  if (!PROVIDERS.includes(key)) {
    throw new ProviderError(`provider must be one of ${PROVIDERS.join(', ')}; got ${repr(provider)}`);
  }
  const available = ort.listSupportedBackends().map((b) => b.name);
  if (!available.includes(key)) {
    throw new ProviderError(
      `provider ${repr(provider)} is not available in this onnxruntime-node build ` +
        `(available: ${available.join(', ')}); use provider 'cpu'`,
    );
  }
  return key;
}

/**
 * Open one graph and check its I/O against the contract.
 * @param {string} directory
 * @param {import('./manifest.js').GraphEntry} entry
 * @param {{provider: string, threads?: number}} options
 * @returns {Promise<ort.InferenceSession>}
 */
export async function openSession(directory, entry, { provider, threads }) {
  const options = {
    executionProviders: [provider],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,
    ...(threads ? { intraOpNumThreads: threads } : {}),
  };
  let session;
  try {
    session = await ort.InferenceSession.create(path.join(directory, entry.file.file), options);
  } catch (err) {
    const first = String(err.message ?? err).trim().split('\n')[0].slice(0, 300) || err.name;
    if (provider !== 'cpu') {
      throw new ProviderError(`provider ${repr(provider)} could not start for ${repr(entry.file.file)}: ${first}`);
    }
    throw new PackageError(
      `onnxruntime could not load ${repr(entry.file.file)}: ${first}. The file is damaged or not an ONNX ` +
        'graph; re-export the package.',
    );
  }
  checkSessionIo(entry.spec, session.inputMetadata, session.outputMetadata);
  return session;
}

// Tensors ---------------------------------------------------------------------------------------
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

/** Zero-length cache tensor (B, Hkv, P=0, Dh) of the package's float type. */
function emptyPast(batch, dims, dtype) {
  const data = dtype === 'float16' ? new Uint16Array(0) : new Float32Array(0);
  return new ort.Tensor(dtype, data, [batch, dims.n_kv_heads, 0, dims.d_head]);
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
  throw new PackageError(`expected a float tensor; got ${tensor.type}`);
}

/**
 * Rows of a tensor gathered along axis 0: new row r = old row `indices[r]`.
 * @param {ort.Tensor} tensor
 * @param {number[]} indices
 * @returns {ort.Tensor}
 */
export function gatherRows(tensor, indices) {
  const rowSize = tensor.dims.slice(1).reduce((a, b) => a * b, 1);
  const source = tensor.data;
  const out = new source.constructor(indices.length * rowSize);
  indices.forEach((from, r) => out.set(source.subarray(from * rowSize, (from + 1) * rowSize), r * rowSize));
  return new ort.Tensor(tensor.type, out, [indices.length, ...tensor.dims.slice(1)]);
}

// The decoder step model --------------------------------------------------------------------------
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
      Object.assign(cache, await this.encodeSources());
    }
    return cache;
  }

  /** Encoder over the left-padded sources, then cross_attention once: the decoder's encoder K/V. */
  async encodeSources() {
    const batch = leftPad(this.sources, Math.max(special(this.manifest, 'pad'), 0));
    const mask = int64Tensor(batch.attention_mask); // (B, S)
    const encoded = await this.sessions[ENCODER].run({ [INPUT_IDS]: int64Tensor(batch.input_ids), [ATTENTION_MASK]: mask });
    const hidden = encoded[LAST_HIDDEN_STATE]; // (B, S, D)
    const cross = await this.sessions[CROSS_ATTENTION].run({ [ENCODER_HIDDEN_STATES]: hidden });
    const cache = { [ENCODER_ATTENTION_MASK]: mask };
    for (const name of this.sessions[CROSS_ATTENTION].outputNames) cache[pastNameFor(name)] = cross[name]; // (B, Hkv, S, Dh)
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
