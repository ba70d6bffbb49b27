/**
 * onnxruntime-node sessions of a package and the decoder step models (the protocol is in
 * steps.js), one per KV-cache layout of the manifest (`kv_cache`, FORMAT.md sections 4.3, 4.4):
 *
 *     ConcatSteps   "concat": left-padded rows with `attention_mask` and `position_ids`; each
 *                   step's `present.*` outputs become the next step's `past_key_values.*`.
 *     SharedSteps   "shared": one preallocated buffer (N, Hkv, C, Dh) per layer, both the past
 *                   input and the present output, so the graph appends in place; right-padded
 *                   rows with `sequence_lengths`; the graph also computes the greedy choice.
 *
 * Encoder-decoder packages: `prefill` takes the sources; the encoder and cross-attention graphs
 * run once per prefill and their K/V (`past_key_values.{i}.encoder.*`) and
 * `encoder_attention_mask` are fed to every step (gathered only when a row's source changes,
 * never on beam search's reorders within a prompt). The decoder rows start from
 * `decoder_start`.
 *
 * Shape letters as in contract.js; N rows, T tokens in a call, P cached columns, C buffer
 * capacity, S source tokens.
 *
 * @module session
 */


import { PREALLOCATED_OUTPUTS, ort } from '#host';

import {
  ATTENTION_MASK, CROSS_ATTENTION, DECODER, ENCODER, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES,
  INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, NEXT_TOKEN, NEXT_TOKEN_LOGPROB, POSITION_IDS, SEQUENCE_LENGTHS,
  checkSessionIo, pastNameFor, selfCacheNames,
} from './contract.js';
import { InputError, PackageError, ProviderError, show } from './errors.js';
import { leftPad } from './generation.js';
import { special } from './manifest.js';
import { StepResult, asTokens, keptRows, prefillRows } from './steps.js';

/**
 * Open one graph and check its I/O against the contract.
 * @param {{sessionInput(entry: object): Promise<{model: string | Uint8Array, externalData?: object[]}>}} source
 *   the package's files (host_node.js / host_web.js): a path, or the bytes and their external data
 * @param {import('./manifest.js').GraphEntry} entry
 * @param {{provider: string, threads?: number, spinning?: boolean}} options  spinning false: the
 *   workers sleep as soon as a run ends (graphs run once per call, before another graph's steps)
 * @returns {Promise<ort.InferenceSession>}
 */
export async function openSession(source, entry, { provider, threads, spinning = true }) {
  const options = {
    executionProviders: [provider],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,
    ...(threads ? { intraOpNumThreads: threads } : {}),
    ...(spinning ? {} : { extra: { session: { intra_op: { allow_spinning: '0' } } } }),
  };
  let session;
  try {
    const { model, externalData } = await source.sessionInput(entry);
    session = await ort.InferenceSession.create(model, externalData ? { ...options, externalData } : options);
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

/**
 * Positions [0, min(T, C)) of `data` (N, Hkv, T, Dh) into `buffer` (N, Hkv, C, Dh).
 * @param {Float32Array | Uint16Array} data @param {readonly number[]} dims @param {Float32Array | Uint16Array} buffer @param {number} capacity
 */
function copyPositions(data, dims, buffer, capacity) {
  const [rows, heads, length, dHead] = dims;
  const kept = Math.min(length, capacity) * dHead;
  for (let block = 0; block < rows * heads; block++) {
    buffer.set(data.subarray(block * length * dHead, block * length * dHead + kept), block * capacity * dHead);
  }
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

/** `tensor` with `before` zero entries inserted at the start of axis `axis`. */
function padAxis(tensor, axis, before) {
  if (before === 0) return tensor;
  const dims = tensor.dims;
  const outer = dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const [from, to] = [dims[axis] * inner, (dims[axis] + before) * inner];
  const out = new tensor.data.constructor(outer * to);
  for (let o = 0; o < outer; o++) out.set(tensor.data.subarray(o * from, (o + 1) * from), o * to + before * inner);
  return new ort.Tensor(tensor.type, out, [...dims.slice(0, axis), dims[axis] + before, ...dims.slice(axis + 1)]);
}

/** Rows of `a` then rows of `b` (axis 0; the other axes equal). */
function concatRows(a, b) {
  const out = new a.data.constructor(a.data.length + b.data.length);
  out.set(a.data);
  out.set(b.data, a.data.length);
  return new ort.Tensor(a.type, out, [a.dims[0] + b.dims[0], ...a.dims.slice(1)]);
}

/**
 * The encoder side of an encoder-decoder's rows: the cross-attention K/V
 * `{past_key_values.{i}.encoder.*: (N, Hkv, S, Dh)}` and `encoder_attention_mask` (N, S), and
 * which source each row reads.
 */
class Encoded {
  /** @param {Record<string, ort.Tensor>} values @param {number[]} sources */
  constructor(values, sources) {
    this.values = values;
    this.sources = sources;
  }

  /**
   * Encoder over the left-padded sources, then cross_attention once.
   * @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model
   * @param {number[][]} prompts  the sources
   * @param {number} firstSource  the number of the first source (each source gets a new one)
   */
  static async of(model, prompts, firstSource) {
    const batch = leftPad(prompts, Math.max(special(model.manifest, 'pad'), 0));
    const mask = int64Tensor(batch.attention_mask); // (B, S)
    const encoded = await model.sessions[ENCODER].run({ [INPUT_IDS]: int64Tensor(batch.input_ids), [ATTENTION_MASK]: mask });
    const hidden = encoded[LAST_HIDDEN_STATE]; // (B, S, D)
    const cross = await model.sessions[CROSS_ATTENTION].run({ [ENCODER_HIDDEN_STATES]: hidden });
    const values = { [ENCODER_ATTENTION_MASK]: mask };
    for (const name of model.sessions[CROSS_ATTENTION].outputNames) values[pastNameFor(name)] = cross[name]; // (B, Hkv, S, Dh)
    return new Encoded(values, prompts.map((_, b) => firstSource + b));
  }

  /** Rows `rows`; the same tensors when every row keeps its source (beam reorders within a prompt). */
  take(rows) {
    const sources = rows.map((r) => this.sources[r]);
    if (sources.length === this.sources.length && sources.every((s, r) => s === this.sources[r])) {
      return new Encoded(this.values, sources);
    }
    return new Encoded(Object.fromEntries(Object.entries(this.values).map(([name, t]) => [name, gatherRows(t, rows)])), sources);
  }

  /** Rows of this then of `other`; the shorter sources left-padded (masked) to the longer. */
  join(other) {
    const width = (e) => e.values[ENCODER_ATTENTION_MASK].dims[1]; // S
    const s = Math.max(width(this), width(other));
    const values = {};
    for (const [name, mine] of Object.entries(this.values)) {
      const axis = name === ENCODER_ATTENTION_MASK ? 1 : 2; // (N, S) or (N, Hkv, S, Dh)
      values[name] = concatRows(padAxis(mine, axis, s - width(this)), padAxis(other.values[name], axis, s - width(other)));
    }
    return new Encoded(values, [...this.sources, ...other.sources]);
  }
}

/** What the two step models share: each prompt's decoder prompt, and the encoder side. */
class Sources {
  /** @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model */
  constructor(model) {
    this.model = model;
    this.seq2seq = model.manifest.arch === 'encoder-decoder';
    this.start = this.seq2seq ? [special(model.manifest, 'decoder_start')] : null;
    this.issued = 0; // sources encoded so far: a new source gets a new number
  }

  /** @param {number[][]} prompts @returns {Promise<{starts: number[][], encoded: Encoded | null}>} */
  async decoderPrompts(prompts) {
    if (!this.seq2seq) return { starts: prompts, encoded: null };
    const encoded = await Encoded.of(this.model, prompts, this.issued);
    this.issued += prompts.length;
    return { starts: prompts.map(() => [...this.start]), encoded };
  }

  /** @param {number[]} prompt @returns {number[]} */
  sequenceStart(prompt) {
    return this.seq2seq ? [...this.start] : [...prompt];
  }
}

/** Logits (N, V) of a float tensor as one Float32Array row per batch row. */
function logitRows(tensor) {
  const [n, v] = tensor.dims; // (N, V)
  const all = floatData(tensor);
  return Array.from({ length: n }, (_, r) => all.subarray(r * v, (r + 1) * v));
}

// "concat" layout: the traced graph ------------------------------------------------------------
/**
 * The step model over a "concat" layout decoder graph (steps.js has the protocol).
 *
 * Every row has the same number P of cached columns: prompts of different lengths are
 * left-padded, `attention_mask` (N, P) is 0 on the pads and positions count each row's real
 * tokens, so a padded row computes what it would alone. Each step's `present.*` outputs become
 * the next step's `past_key_values.*` as they are (no copy in JavaScript). Rows admitted into
 * a running batch are prefilled on their own, then joined: the cache with fewer columns is
 * left-padded (masked) to the other's. A prefix-LM graph treats the tokens of one call as one
 * bidirectional block, so its K-token advances run as K one-token steps.
 * @implements {import('./steps.js').StepModel}
 */
export class ConcatSteps {
  /** @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model */
  constructor(model) {
    this.manifest = model.manifest;
    this.session = model.sessions[DECODER];
    this.vocabSize = model.manifest.dims.vocab_size;
    this.bidirectionalBlock = model.manifest.arch === 'prefix-lm';
    this.sources = new Sources(model);
    this.past = {}; // {past_key_values.*: (N, Hkv, P, Dh)}
    this.encoded = null; // encoder-decoder: Encoded
    this.mask = []; // (N, P) 0 on pads
    this.last = []; // (N,) position of each row's last token
  }

  get rows() {
    return this.last.length;
  }

  sequenceStart(prompt) {
    return this.sources.sequenceStart(prompt);
  }

  async prefill(prompts) {
    const { starts, encoded } = await this.sources.decoderPrompts(prefillRows(prompts, this.vocabSize));
    const { dims, float_dtype: dtype } = this.manifest;
    const past = Object.fromEntries(selfCacheNames(dims).map(([, name]) => [name, emptyPast(starts.length, dims, dtype)])); // P = 0
    const batch = leftPad(starts, 0);
    const { logits, past: next } = await this.#forward(batch.input_ids, batch.position_ids, batch.attention_mask, past, encoded, true);
    const t = batch.input_ids[0].length;
    const width = this.mask.length ? this.mask[0].length : 0; // P of the running rows
    if (!this.rows) {
      [this.past, this.encoded, this.mask] = [next, encoded, batch.attention_mask];
    } else { // admission: join the new rows' cache to the running rows' cache, left-padded
      const p = Math.max(width, t);
      this.past = Object.fromEntries(Object.entries(this.past).map(([name, mine]) =>
        [name, concatRows(padAxis(mine, 2, p - width), padAxis(next[name], 2, p - t))])); // (N, Hkv, P, Dh)
      this.encoded = this.encoded && this.encoded.join(encoded);
      const pad = (row, before) => [...Array(before).fill(0), ...row];
      this.mask = [...this.mask.map((row) => pad(row, p - width)), ...batch.attention_mask.map((row) => pad(row, p - t))];
    }
    this.last = [...this.last, ...batch.position_ids.map((row) => row[row.length - 1])];
    return new StepResult(logits);
  }

  async advance(tokens) {
    const ids = asTokens(tokens, this.rows, this.vocabSize); // (N, K)
    const k = ids[0].length;
    if (k > 1 && this.bidirectionalBlock) { // one token at a time, each causal
      const steps = [];
      for (let j = 0; j < k; j++) steps.push(await this.advance(ids.map((row) => row[j])));
      return StepResult.stack(steps); // (N, K, V)
    }
    this.mask = this.mask.map((row) => [...row, ...Array(k).fill(1)]); // (N, P+K)
    const positions = this.last.map((p) => Array.from({ length: k }, (_, j) => p + 1 + j)); // (N, K)
    const { logits, past } = await this.#forward(ids, positions, this.mask, this.past, this.encoded, k === 1);
    this.past = past;
    this.last = positions.map((row) => row[k - 1]);
    return new StepResult(logits);
  }

  select(rows) {
    this.past = Object.fromEntries(Object.entries(this.past).map(([name, tensor]) => [name, gatherRows(tensor, rows)]));
    this.encoded = this.encoded && this.encoded.take(rows);
    this.mask = rows.map((r) => this.mask[r]); // rows are never written in place: copies may share one
    this.last = rows.map((r) => this.last[r]);
  }

  release(rows) {
    this.select(keptRows(this.rows, rows));
  }

  /**
   * T tokens per row against the cache: logits (N, V) of each row's last token if `lastOnly`,
   * else (N, T, V), and the new cache.
   */
  async #forward(inputIds, positionIds, attentionMask, past, encoded, lastOnly) {
    const feeds = {
      ...past,
      ...(encoded ? encoded.values : {}),
      [INPUT_IDS]: int64Tensor(inputIds),
      [POSITION_IDS]: int64Tensor(positionIds),
      [ATTENTION_MASK]: int64Tensor(attentionMask),
    };
    const outputs = await this.session.run(feeds);
    const [n, t, v] = outputs[LOGITS].dims; // (N, T, V)
    const all = floatData(outputs[LOGITS]);
    const row = (r, j) => all.subarray((r * t + j) * v, (r * t + j + 1) * v);
    const logits = Array.from({ length: n }, (_, r) => (lastOnly ? row(r, t - 1) : Array.from({ length: t }, (_, j) => row(r, j))));
    const next = {};
    for (const name of this.session.outputNames) {
      if (name !== LOGITS) next[pastNameFor(name)] = outputs[name]; // present.* -> past_key_values.*
    }
    return { logits, past: next };
  }
}

// "shared" layout: the built graph -------------------------------------------------------------
/**
 * The rows of a batch over a "shared" layout decoder.
 * @typedef {object} SharedRows
 * @property {number} rows       N
 * @property {number} capacity   C: tokens per row the buffers hold
 * @property {Record<string, Float32Array | Uint16Array>} buffers  past name -> (N, Hkv, C, Dh), also the present
 * @property {number[]} lengths  (N,) tokens of each row in the buffers
 * @property {Encoded | null} encoded  encoder-decoder: the encoder side
 */

/**
 * The step model over a decoder exported with the "shared" KV-cache layout (FORMAT.md
 * sections 4.4 and 7.7; steps.js has the protocol). Rows are right-padded and
 * `sequence_lengths` says how long each is; positions come from the lengths inside the graph.
 *
 * Each layer's cache is ONE buffer (N, Hkv, C, Dh), allocated when rows start (and again only
 * when rows are selected or admitted, or a row would pass C), passed to `session.run` both as
 * the past input and as the preallocated present output (`fetches`): two ort.Tensors over the
 * same typed array. onnxruntime-node 1.30 runs the graph on that memory, so GroupQueryAttention
 * sees past and present share a buffer and writes only the new tokens' keys/values, in place.
 * The logits and the cache equal those of feeding each present output back as the next past
 * (test/runtime.test.js checks it). The binding still returns every fetched output as a new
 * JavaScript copy, not the preallocated tensor; those copies are dropped. So one buffer copy
 * per step remains (in the binding instead of in the attention operator): on a 2-layer test
 * model, in place is as fast as feeding present back for small caches and faster for large
 * ones (about 1.5x per step at N = 16 rows, C = 4096).
 *
 * The graph computes the greedy choice (`next_token`, `next_token_logprob`); the logits rows
 * are made only when a search reads them. Admission concatenates the buffers (rows of the
 * larger capacity); a K-token advance is K one-token runs (the graph projects only each row's
 * last token).
 * @implements {import('./steps.js').StepModel}
 */
export class SharedSteps {
  /**
   * @param {{manifest: import('./manifest.js').Manifest, sessions: Record<string, ort.InferenceSession>}} model
   * @param {{capacity: number}} options  C: tokens per row the buffers hold at first (grown on need)
   */
  constructor(model, { capacity }) {
    this.manifest = model.manifest;
    this.session = model.sessions[DECODER];
    this.vocabSize = model.manifest.dims.vocab_size;
    this.capacity = Math.max(1, capacity);
    this.pairs = selfCacheNames(model.manifest.dims); // [present, past] per layer, key then value
    this.sources = new Sources(model);
    /** @type {SharedRows} */
    this.state = this.#empty(0, this.capacity);
  }

  get rows() {
    return this.state.rows;
  }

  sequenceStart(prompt) {
    return this.sources.sequenceStart(prompt);
  }

  /** Values of one (row, head) block of a buffer: C * Dh. */
  #block(capacity) {
    return capacity * this.manifest.dims.d_head;
  }

  /** Zeroed buffers for `rows` rows of `capacity` tokens. @returns {SharedRows} */
  #empty(rows, capacity) {
    const size = rows * this.manifest.dims.n_kv_heads * this.#block(capacity); // N * Hkv * C * Dh
    const buffers = Object.fromEntries(this.pairs.map(([, past]) => [past, floatArray(this.manifest.float_dtype, size)]));
    return { rows, capacity, buffers, lengths: Array(rows).fill(0), encoded: null };
  }

  async prefill(prompts) {
    const { starts, encoded } = await this.sources.decoderPrompts(prefillRows(prompts, this.vocabSize));
    const longest = Math.max(...starts.map((s) => s.length));
    const rows = this.#empty(starts.length, Math.max(this.capacity, longest));
    rows.encoded = encoded;
    const ids = starts.map((s) => [...s, ...Array(longest - s.length).fill(0)]); // (B, T) right-padded
    const result = await this.#run(rows, ids, starts.map((s) => s.length));
    this.state = this.rows ? this.#join(this.state, rows) : rows;
    return result;
  }

  async advance(tokens) {
    const ids = asTokens(tokens, this.rows, this.vocabSize); // (N, K)
    const state = this.state;
    const k = ids[0].length;
    if (k === 1) return this.#run(state, ids, state.lengths.map((l) => l + 1));
    const steps = []; // K tokens: K one-token runs
    for (let j = 0; j < k; j++) steps.push(await this.#run(state, ids.map((row) => [row[j]]), state.lengths.map((l) => l + 1)));
    return StepResult.stack(steps); // (N, K, ...)
  }

  /** New row r = old row rows[r] of the buffers, the lengths and the encoder side. New buffers. */
  select(rows) {
    const old = this.state;
    const rowSize = this.manifest.dims.n_kv_heads * this.#block(old.capacity); // Hkv * C * Dh
    this.state = {
      rows: rows.length,
      capacity: old.capacity,
      buffers: Object.fromEntries(Object.entries(old.buffers).map(([name, data]) => [name, gatherArrayRows(data, rowSize, rows)])),
      lengths: rows.map((r) => old.lengths[r]),
      encoded: old.encoded && old.encoded.take(rows),
    };
  }

  release(rows) {
    this.select(keptRows(this.rows, rows));
  }

  /** Rows of a then b in buffers of the larger capacity. @returns {SharedRows} */
  #join(a, b) {
    const out = this.#empty(a.rows + b.rows, Math.max(a.capacity, b.capacity));
    const to = this.#block(out.capacity);
    for (const [name, buffer] of Object.entries(out.buffers)) {
      let offset = 0;
      for (const part of [a, b]) {
        const from = this.#block(part.capacity);
        const source = part.buffers[name];
        for (let blk = 0; blk < source.length / from; blk++) { // per (row, head)
          buffer.set(source.subarray(blk * from, (blk + 1) * from), offset + blk * to);
        }
        offset += (source.length / from) * to;
      }
    }
    out.lengths = [...a.lengths, ...b.lengths];
    out.encoded = a.encoded && a.encoded.join(b.encoded);
    return out;
  }

  /**
   * Longer buffers when a row would pass the capacity (a caller past the hinted length).
   * @param {SharedRows} state
   * @param {number} needed
   */
  #grow(state, needed) {
    const maxLen = this.manifest.max_seq_len;
    const capacity = Math.min(Math.max(needed, 2 * state.capacity), maxLen);
    if (needed > capacity) {
      throw new InputError(`rows of ${needed} tokens exceed this model's max_seq_len (${maxLen})`, { code: 'E_TOO_LONG' });
    }
    const [from, to] = [this.#block(state.capacity), this.#block(capacity)];
    for (const [name, old] of Object.entries(state.buffers)) {
      const grown = new old.constructor((old.length / from) * to);
      for (let b = 0; b < old.length / from; b++) grown.set(old.subarray(b * from, (b + 1) * from), b * to); // per (row, head)
      state.buffers[name] = grown;
    }
    state.capacity = capacity;
  }

  /**
   * Run ids (N, T) so that row b holds lengths[b] tokens afterwards; updates the buffers in place.
   * @param {SharedRows} state
   * @param {number[][]} ids
   * @param {number[]} lengths
   * @returns {Promise<StepResult>}
   */
  async #run(state, ids, lengths) {
    const longest = Math.max(...lengths);
    if (longest > state.capacity) this.#grow(state, longest);
    const { float_dtype: dtype, dims } = this.manifest;
    const shape = [state.rows, dims.n_kv_heads, state.capacity, dims.d_head]; // (N, Hkv, C, Dh)
    const feeds = { [INPUT_IDS]: int64Tensor(ids), [SEQUENCE_LENGTHS]: int64Vector(lengths), ...(state.encoded ? state.encoded.values : {}) };
    const fetches = { [LOGITS]: null, [NEXT_TOKEN]: null, [NEXT_TOKEN_LOGPROB]: null };
    for (const [present, past] of this.pairs) {
      const buffer = new ort.Tensor(dtype, state.buffers[past], shape);
      feeds[past] = buffer;
      // onnxruntime-node: the same memory, the graph appends in place. onnxruntime-web copies
      // feeds into its wasm heap and does not copy a preallocated output back: there present.*
      // comes back as a new tensor of the same shape and becomes the buffer.
      fetches[present] = PREALLOCATED_OUTPUTS ? buffer : null;
    }
    const outputs = await this.session.run(feeds, fetches);
    if (!PREALLOCATED_OUTPUTS) {
      for (const [present, past] of this.pairs) {
        const out = outputs[present];
        if (out.dims[2] === state.capacity) state.buffers[past] = out.data;
        else copyPositions(out.data, out.dims, state.buffers[past], state.capacity); // WebGPU: (N, Hkv, T, Dh), T the longest row
      }
    }
    state.lengths = lengths;
    // The graph's greedy choice (FORMAT.md 4.4); the logits rows are made only if read.
    const logits = outputs[LOGITS];
    return new StepResult(() => logitRows(logits), Array.from(outputs[NEXT_TOKEN].data, Number),
      Array.from(outputs[NEXT_TOKEN_LOGPROB].data));
  }
}
