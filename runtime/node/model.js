/**
 * A loaded package and the calls users make: the JavaScript port of `runtime/model.py`.
 *
 *     import { load } from './index.js';
 *     const model = await load('artifacts/decoder');
 *     const [result] = await model.generate('three hundred', { max_new_tokens: 8 });  // in the trained prompt format
 *     await model.classify(['the food was not good']);   // encoder packages with a classifier
 *     await model.embed(['a sentence'], { pooling: 'mean' });
 *     await model.chat([{ role: 'user', content: 'hi' }]);  // packages with a chat template (Hugging Face imports)
 *
 * Option names are the Python runtime's and the manifest's (`max_new_tokens`, `top_p`,
 * `batch_size`), so a generation config reads the same in every runtime.
 *
 * @module model
 */


import {
  ATTENTION_MASK, DECODER, ENCODER, INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, TOKEN_TYPE_IDS,
} from './contract.js';
import { ConfigError, InputError, PackageError, show, typeOf } from './errors.js';
import * as gen from './generation.js';
import { checkMessages, render as renderTemplate, specialTokenVariables } from './chat.js';
import { checkGraphLimits, embeddingDefaults, manifestFromDict, special } from './manifest.js';
import { ConcatSteps, SharedSteps, floatData, int64Tensor, openSession } from './session.js';
import { checkExternalRefs, externalDataRefsOf, positionTablesOf } from './safety.js';
import { openSource, resolveProvider } from '#host';
import { strip } from './prompt_format.js';

/** A released model's sessions run this instead: a clear InputError (E_RELEASED). */
const RELEASED = Symbol('released');
async function released() {
  throw new InputError('this model was released (model.release()); load the package again to use it',
    { code: 'E_RELEASED' });
}

/**
 * @typedef {object} Classification
 * @property {string} label
 * @property {number} score
 * @property {Record<string, number>} probabilities  every label's probability
 * @property {number} unknown_fraction  share of the text's tokens (special tokens not counted) that are the
 *   tokenizer's unk token: characters or words never seen in training; near 1, the label is a guess
 */

/** One prompt's result (generation.js): `texts[j]` / `token_ids[j]` for each returned sequence j. @typedef {import('./generation.js').Generation} Generation */

/**
 * Generation parameters (see generation.js GenerationConfig) plus call options.
 * @typedef {Partial<import('./generation.js').GenerationConfig> & {truncate?: boolean, rng?: {random(): number}, raw?: boolean}} GenerateOptions
 */

const CALL_OPTIONS = ['truncate', 'rng', 'raw'];

/** num_beams / num_return_sequences above this are refused, not allocated (as in Python). */
export const MAX_SEQUENCES_PER_PROMPT = 4096;
/** The CLI warns when more than this share of a text's tokens is unknown (as in Python). */
export const UNKNOWN_WARNING = 0.3;

/** Share of the non-special tokens of one encoded text that are `unk` (0 with none; unk -1: 0). */
function unknownFraction({ ids, specialMask }, unk) {
  const text = ids.filter((_, k) => !specialMask[k]);
  return text.length && unk >= 0 ? text.filter((t) => t === unk).length / text.length : 0;
}

function checkOptions(call, options, valid) {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new InputError(`${call}() options must be an object, not ${typeOf(options)}`);
  }
  const unknown = Object.keys(options).filter((k) => !valid.includes(k));
  if (unknown.length) {
    throw new InputError(`${call}() has no option ${unknown.join(', ')}; its options are ${valid.join(', ')}`,
      { code: 'E_UNKNOWN_PARAMETER' });
  }
  if (options.batch_size !== undefined && (!Number.isInteger(options.batch_size) || options.batch_size < 1)) {
    throw new InputError(`batch_size must be an integer >= 1, not ${show(options.batch_size)}`);
  }
}

/** Split generate() options into generation parameters and call options. */
function splitOptions(options) {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new ConfigError(`generation options must be an object, not ${typeOf(options)}`);
  }
  const params = {};
  const call = {};
  for (const [k, v] of Object.entries(options)) (CALL_OPTIONS.includes(k) ? call : params)[k] = v;
  if (call.raw !== undefined && typeof call.raw !== 'boolean') {
    throw new InputError(`raw must be true or false, not ${show(call.raw)}`);
  }
  return { params, truncate: Boolean(call.truncate), rng: call.rng, raw: Boolean(call.raw) };
}

/**
 * Positions kept when cutting an encoding to `limit` tokens: the template's leading and trailing
 * special tokens (`<s>` / `[CLS]` ... `[SEP]` / `</s>`) stay, the text between them is cut
 * (a prompt keeps its end, a text its start), as in the Python runtime.
 * @param {number} n @param {number[]} specialMask @param {number} limit @param {boolean} keepEnd
 * @returns {number[]}
 */
export function truncateKeepingSpecials(n, specialMask, limit, keepEnd) {
  let lead = specialMask.findIndex((m) => !m);
  if (lead < 0) lead = n;
  let trail = 0;
  if (lead < n) while (trail < n && specialMask[n - 1 - trail]) trail += 1;
  const room = limit - lead - trail;
  if (room < 1) {
    throw new InputError(`a limit of ${limit} tokens leaves no room for text besides ${lead + trail} special tokens`,
      { code: 'E_TOO_LONG' });
  }
  let body = Array.from({ length: n - trail - lead }, (_, k) => lead + k);
  body = keepEnd ? body.slice(-room) : body.slice(0, room);
  return [...Array.from({ length: lead }, (_, k) => k), ...body, ...Array.from({ length: trail }, (_, k) => n - trail + k)];
}

export class Model {
  /**
   * Use `load()`.
   * @param {string} directory
   * @param {import('./manifest.js').Manifest} manifest
   * @param {PackageTokenizer} tokenizer
   * @param {Record<string, import('onnxruntime-node').InferenceSession>} sessions
   */
  constructor(directory, manifest, tokenizer, sessions, name = String(directory).split(/[\\/]/).filter(Boolean).pop() ?? '') {
    this.directory = directory;
    this.name = name;
    this.manifest = manifest;
    this.tokenizer = tokenizer;
    this.sessions = sessions;
    this.arch = manifest.arch;
    this.dims = manifest.dims;
  }

  /** @returns {string[]} */
  get labelNames() {
    return this.manifest.label_names;
  }

  get canGenerate() {
    return DECODER in this.sessions;
  }

  get canClassify() {
    const entry = this.manifest.graphs[ENCODER];
    return this.arch === 'encoder' && entry !== undefined && entry.spec.outputs.some((t) => t.name === LOGITS);
  }

  /** Release the onnxruntime sessions. */
  async release() {
    const open = Object.values(this.sessions).filter((s) => !s[RELEASED]);
    await Promise.all(open.map((s) => s.release()));
    // Later runs (this model's, or a step model's made before) get an error that says so, not
    // onnxruntime's "Session already disposed"; releasing twice is a no-op.
    for (const session of open) Object.assign(session, { [RELEASED]: true, run: released, release: async () => {} });
  }

  // Tokenization ----------------------------------------------------------------------------------
  /** A string or an array of non-empty strings (the checks of Python's `_texts`). */
  #texts(texts, what) {
    if (typeof texts === 'string') texts = [texts];
    if (!Array.isArray(texts)) {
      throw new InputError(`${what} must be a string or an array of strings, not ${typeOf(texts)}`);
    }
    if (!texts.length) throw new InputError(`${what} is an empty array; pass at least one text`);
    texts.forEach((text, i) => {
      if (typeof text !== 'string') {
        throw new InputError(`${what}[${i}] must be a string, not ${typeOf(text)} (${show(text)})`);
      }
      if (!text) throw new InputError(`${what}[${i}] is an empty string; pass some text`);
    });
    return [...texts];
  }

  /**
   * Token ids with the package's special-token template (what the model was trained on).
   * Longer than `max_seq_len - reserve`: an error, or with `truncate` the prompt's end is kept
   * when `reserve` > 0 (generation), the text's start otherwise.
   * @param {string[]} texts
   * @param {{truncate?: boolean, reserve?: number}} [options]
   * @returns {Promise<number[][]>}
   */
  async encode(texts, { truncate = false, reserve = 0 } = {}) {
    const limit = this.manifest.max_seq_len - reserve;
    const encodings = await this.tokenizer.encodeBatch(texts);
    return encodings.map(({ ids, specialMask }, i) => {
      if (ids.length > limit) {
        if (!truncate) {
          // Fewer new tokens help only a prompt that fits the model's length on its own.
          const fewer = this.manifest.max_seq_len - ids.length;
          const lower = reserve && fewer >= 1 ? `, ${gen.option('max_new_tokens', fewer)} or less` : '';
          throw new InputError(
            `text ${i} is ${ids.length} tokens; this model takes at most ${limit}` +
              (reserve ? ` (${this.manifest.max_seq_len} minus ${reserve} new tokens)` : '') +
              `. Shorten it${lower}, or pass ${gen.option('truncate', true)}.`,
            { code: 'E_TOO_LONG' },
          );
        }
        const keep = truncateKeepingSpecials(ids.length, specialMask, limit, reserve > 0);
        ids = keep.map((k) => ids[k]); // a prompt keeps its end, a text its start
      }
      if (!ids.length) throw new InputError(`text ${i} has no tokens; pass some text`);
      return ids;
    });
  }

  /** Text of token ids, special tokens skipped. @param {number[]} ids @returns {Promise<string>} */
  decode(ids) {
    if (typeof ids === 'string' || typeof ids?.[Symbol.iterator] !== 'function') {
      throw new InputError(`decode() takes an array of token ids, not ${typeOf(ids)}`);
    }
    ids = [...ids];
    const bad = ids.find((t) => !Number.isInteger(t) || t < 0 || t >= this.dims.vocab_size);
    if (bad !== undefined) {
      throw new InputError(`decode(): ${show(bad)} is not a token id of this model (integers in [0, ${this.dims.vocab_size}))`,
        { code: 'E_TOKEN_ID' });
    }
    return this.tokenizer.decode(ids);
  }

  // Encoder: classification and embeddings ------------------------------------------------------
  #require(ok, call, need) {
    if (!ok) {
      throw new InputError(`${call}() needs ${need}; ${this.name} is a '${this.arch}' package`,
        { code: 'E_WRONG_KIND' });
    }
  }

  /**
   * Per text, the share of its tokens (special tokens not counted) that the tokenizer could not
   * represent (its unk token): `Classification.unknown_fraction`, for any call.
   * @param {string | string[]} texts
   * @returns {Promise<number[]>}
   */
  async unknownFractions(texts) {
    texts = this.#texts(texts, 'unknownFractions texts');
    const unk = special(this.manifest, 'unk');
    return (await this.tokenizer.encodeBatch(texts)).map((e) => unknownFraction(e, unk));
  }

  /**
   * Right-padded encoder batches (rows of ids; positions come from the mask inside the graph),
   * each with the unknown fraction of its rows' texts.
   */
  async #encoderBatches(texts, batchSize, truncate) {
    const encodings = await this.tokenizer.encodeBatch(texts);
    const unk = special(this.manifest, 'unk');
    const limit = this.manifest.max_seq_len;
    const pad = Math.max(special(this.manifest, 'pad'), 0);
    const batches = [];
    for (let start = 0; start < encodings.length; start += batchSize) {
      const chunk = encodings.slice(start, start + batchSize);
      let width = Math.max(...chunk.map((e) => e.ids.length));
      if (width > limit && !truncate) {
        const i = start + chunk.findIndex((e) => e.ids.length === width);
        throw new InputError(
          `text ${i} is ${encodings[i].ids.length} tokens; this model takes at most ${limit}. ` +
            `Shorten it or pass ${gen.option('truncate', true)}.`,
          { code: 'E_TOO_LONG' },
        );
      }
      width = Math.min(width, limit);
      const kept = chunk.map((e) =>
        e.ids.length > width ? truncateKeepingSpecials(e.ids.length, e.specialMask, width, false) : e.ids.map((_, k) => k),
      );
      const rows = chunk.map((e, r) => kept[r].map((k) => e.ids[k]));
      const fill = (row, value) => [...row, ...Array(width - row.length).fill(value)];
      const mask = rows.map((row) => fill(row.map(() => 1), 0)); // (B, S)
      const feeds = { [INPUT_IDS]: rows.map((row) => fill(row, pad)), [ATTENTION_MASK]: mask };
      if (this.dims.has_token_types) feeds[TOKEN_TYPE_IDS] = chunk.map((e, r) => fill(kept[r].map((k) => e.typeIds[k]), 0));
      batches.push({ feeds, unknown: chunk.map((e) => unknownFraction(e, unk)) });
    }
    return batches; // every chunk is checked before the first runs
  }

  async #runEncoder(feeds) {
    const tensors = Object.fromEntries(Object.entries(feeds).map(([name, rows]) => [name, int64Tensor(rows)]));
    return this.sessions[ENCODER].run(tensors);
  }

  /**
   * Label, score and every label's probability per text.
   * @param {string | string[]} texts
   * @param {{batch_size?: number, truncate?: boolean}} [options]
   * @returns {Promise<Classification[]>}
   */
  async classify(texts, options = {}) {
    this.#require(this.canClassify, 'classify', 'an encoder package with a classification head');
    checkOptions('classify', options, ['batch_size', 'truncate']);
    const { batch_size: batchSize = 32, truncate = false } = options;
    texts = this.#texts(texts, 'classify texts');
    const labels = this.labelNames.length ? this.labelNames : Array.from({ length: this.dims.num_labels }, (_, i) => `LABEL_${i}`);
    const results = [];
    for (const { feeds, unknown } of await this.#encoderBatches(texts, batchSize, truncate)) {
      const logits = (await this.#runEncoder(feeds))[LOGITS]; // (B, num_labels)
      const [b, n] = logits.dims;
      const values = floatData(logits);
      for (let r = 0; r < b; r++) {
        const row = Array.from(values.subarray(r * n, (r + 1) * n)); // float64 from here on
        const top = Math.max(...row);
        const e = row.map((x) => Math.exp(x - top));
        const total = e.reduce((s, x) => s + x, 0);
        const probs = e.map((x) => x / total);
        const best = probs.indexOf(Math.max(...probs));
        results.push({
          label: labels[best], score: probs[best], probabilities: Object.fromEntries(labels.map((l, i) => [l, probs[i]])),
          unknown_fraction: unknown[r],
        });
      }
    }
    return results;
  }

  /**
   * Sentence embeddings, one Float32Array (D,) per text: mean over real tokens or the first
   * ([CLS]) state, L2-normalised unless `normalize` is false. `pooling` / `normalize` not
   * given: the package's `embedding` defaults, else 'mean', true.
   * `unknownFractions(texts)` says how much of each text the tokenizer could not represent.
   * @param {string | string[]} texts
   * @param {{pooling?: 'mean' | 'cls', normalize?: boolean, batch_size?: number, truncate?: boolean}} [options]
   * @returns {Promise<Float32Array[]>}
   */
  async embed(texts, options = {}) {
    this.#require(ENCODER in this.sessions, 'embed', 'a package with an encoder');
    checkOptions('embed', options, ['pooling', 'normalize', 'batch_size', 'truncate']);
    // not given: the package's embedding defaults (a sentence-transformers import), else mean, normalised
    const [defaultPooling, defaultNormalize] = embeddingDefaults(this.manifest);
    const { pooling = defaultPooling, normalize = defaultNormalize, batch_size: batchSize = 32, truncate = false } = options;
    if (pooling !== 'mean' && pooling !== 'cls') throw new InputError(`pooling must be 'mean' or 'cls', not ${show(pooling)}`);
    if (typeof normalize !== 'boolean') throw new InputError(`normalize must be true or false, not ${show(normalize)}`);
    texts = this.#texts(texts, 'embed texts');
    const out = [];
    for (const { feeds } of await this.#encoderBatches(texts, batchSize, truncate)) {
      const hidden = (await this.#runEncoder(feeds))[LAST_HIDDEN_STATE]; // (B, S, D)
      const [b, s, d] = hidden.dims;
      const values = floatData(hidden);
      for (let r = 0; r < b; r++) {
        const vector = new Float64Array(d);
        const mask = feeds[ATTENTION_MASK][r];
        const used = pooling === 'cls' ? [0] : mask.flatMap((m, t) => (m ? [t] : []));
        for (const t of used) for (let j = 0; j < d; j++) vector[j] += values[(r * s + t) * d + j];
        const count = pooling === 'cls' ? 1 : Math.max(used.length, 1);
        for (let j = 0; j < d; j++) vector[j] = Math.fround(vector[j] / count);
        const norm = normalize ? Math.max(Math.hypot(...vector), 1e-12) : 1;
        out.push(Float32Array.from(vector, (x) => x / norm));
      }
    }
    return out;
  }

  // Generation ------------------------------------------------------------------------------------
  /**
   * The config a call runs with: each field from `params`, else the package's generation
   * defaults (manifest), else the built-in defaults; a value given is kept, even
   * `eos_token_ids: []` (no eos) or `pad_token_id: 0`. Every generation entry point resolves
   * its parameters here.
   * @param {Partial<import('./generation.js').GenerationConfig>} [params]
   */
  generationConfig(params = {}) {
    return gen.resolveConfig(params, this.manifest.generation);
  }

  async #promptIds(prompts, config, truncate) {
    const maxLen = this.manifest.max_seq_len;
    const reserve = this.arch !== 'encoder-decoder' ? config.max_new_tokens : 0;
    if (config.max_new_tokens >= maxLen) throw this.#maxNewTokensTooMany(config);
    return this.encode(prompts, { truncate, reserve });
  }

  #maxNewTokensTooMany(config) {
    const maxLen = this.manifest.max_seq_len;
    const room = this.arch === 'encoder-decoder' ? '' : " minus the prompt's tokens";
    return new InputError(
      `max_new_tokens (${config.max_new_tokens}) must be below this model's max_seq_len (${maxLen}); ` +
        `pass ${gen.option('max_new_tokens', maxLen - 1)}${room} or less`,
      { code: 'E_TOO_LONG' },
    );
  }

  #checkIds(prompts, config) {
    const rows = gen.checkPrompts(prompts);
    const top = Math.max(...rows.map((r) => Math.max(...r)));
    if (top >= this.dims.vocab_size) {
      throw new InputError(`token id ${top} is not in this model's vocabulary (ids 0 to ${this.dims.vocab_size - 1})`,
        { code: 'E_TOKEN_ID' });
    }
    if (config.strategy === 'beam' && config.num_beams > this.dims.vocab_size) {
      throw new ConfigError(`num_beams (${config.num_beams}) must be <= the vocabulary size (${this.dims.vocab_size}); ` +
        `pass ${gen.option('num_beams', this.dims.vocab_size)} or fewer`);
    }
    const perPrompt = Math.max(config.num_beams, config.num_return_sequences);
    if (perPrompt > MAX_SEQUENCES_PER_PROMPT) { // refused before the rows are allocated
      throw new ConfigError(
        `${perPrompt} beams or sequences per prompt is more than ${MAX_SEQUENCES_PER_PROMPT}; pass num_beams and ` +
          `num_return_sequences of at most ${MAX_SEQUENCES_PER_PROMPT} (--num-beams, --num-return-sequences), ` +
          'or generate several times with different seeds',
      );
    }
    const longest = Math.max(...rows.map((r) => r.length));
    const maxLen = this.manifest.max_seq_len;
    if (config.max_new_tokens >= maxLen) throw this.#maxNewTokensTooMany(config);
    if (this.arch === 'encoder-decoder') { // the source and the generated tokens have a max_seq_len each
      if (longest > maxLen) {
        throw new InputError(
          `a source of ${longest} tokens exceeds this model's max_seq_len (${maxLen}); shorten it to ${maxLen} ` +
            `tokens (from text: pass ${gen.option('truncate', true)})`,
          { code: 'E_TOO_LONG' },
        );
      }
    } else if (longest + config.max_new_tokens > maxLen) {
      const fewer = maxLen - longest;
      const lower = fewer >= 1 ? ` or pass ${gen.option('max_new_tokens', fewer)} or less` : '';
      throw new InputError(
        `a prompt of ${longest} tokens plus max_new_tokens ${config.max_new_tokens} exceeds this model's ` +
          `max_seq_len (${maxLen}); shorten the prompt to ${maxLen - config.max_new_tokens} tokens${lower}`,
        { code: 'E_TOO_LONG' },
      );
    }
    return rows;
  }

  /**
   * A fresh step model over this package's graphs (steps.js has the protocol): prefill rows
   * from prompts (the sources for an encoder-decoder), advance them, select, release and admit
   * rows. `capacity` hints the tokens per row the "shared" KV buffers hold at first.
   * @param {{capacity?: number}} [options]
   * @returns {ConcatSteps | SharedSteps}
   */
  stepModel({ capacity } = {}) {
    this.#require(this.canGenerate, 'stepModel', 'a decoder-only, prefix-lm or encoder-decoder package');
    if (this.manifest.kv_cache === 'shared') {
      return new SharedSteps(this, { capacity: Math.min(capacity || 64, this.manifest.max_seq_len) });
    }
    return new ConcatSteps(this);
  }

  /** The step model of one call: its rows hold the longest decoder prompt plus max_new_tokens. */
  #steps(rows, config) {
    const decoderPrompt = this.arch === 'encoder-decoder' ? 1 : Math.max(...rows.map((p) => p.length));
    return this.stepModel({ capacity: decoderPrompt + config.max_new_tokens });
  }

  /**
   * Generation on token ids (the source ids for encoder-decoder packages); one Generation per
   * prompt, its `prompt` the ids.
   * @param {number[][]} prompts
   * @param {GenerateOptions} [options]
   * @returns {Promise<Generation[]>}
   */
  async generateIds(prompts, options = {}) {
    this.#require(this.canGenerate, 'generate', 'a decoder-only, prefix-lm or encoder-decoder package');
    const { params, rng } = splitOptions(options);
    const config = this.generationConfig(params);
    const rows = this.#checkIds(prompts, config);
    return gen.generate(this.#steps(rows, config), rows, config, { rng, decode: (ids) => this.decode(ids) });
  }

  /**
   * Generate for each prompt. Options are generation parameters (`max_new_tokens`,
   * `strategy`, `temperature`, `top_k`, `top_p`, `seed`, ...) and `truncate`, `rng`, `raw`.
   * A package with a `prompt_format` gets each prompt in that format and returns the parsed
   * answer (FORMAT.md 5.2); `raw: true` sends the text as given. `prompt` is the caller's text.
   * @param {string | string[]} prompts
   * @param {GenerateOptions} [options]
   * @returns {Promise<Generation[]>}
   */
  async generate(prompts, options = {}) {
    this.#require(this.canGenerate, 'generate', 'a decoder-only, prefix-lm or encoder-decoder package');
    const texts = this.#texts(prompts, 'generate prompts');
    const { params, truncate, raw } = splitOptions(options);
    const fmt = raw ? null : this.manifest.prompt_format;
    const config = this.generationConfig(params);
    const ids = await this.#promptIds(this.#format(texts, fmt, 'generate prompts'), config, truncate);
    const out = await this.generateIds(ids, options);
    return out.map((g, b) => {
      const parsed = fmt ? g.texts.map((t) => fmt.parse(t)) : g.texts;
      return { ...g, prompt: texts[b], texts: parsed, text: parsed[0] };
    });
  }

  /**
   * The continuation's text as it is produced (greedy or sample). Every argument is checked
   * before this resolves; iterate the result with `for await`.
   *
   *     for await (const piece of await model.stream('twelve')) process.stdout.write(piece);
   *
   * @param {string} prompt
   * @param {GenerateOptions} [options]
   * @returns {Promise<AsyncGenerator<string, void, void>>}
   */
  async stream(prompt, options = {}) {
    this.#require(this.canGenerate, 'stream', 'a decoder-only, prefix-lm or encoder-decoder package');
    if (typeof prompt !== 'string') throw new InputError(`stream() takes one prompt string, not ${typeOf(prompt)}`);
    this.#texts([prompt], 'stream prompt');
    const { params, truncate, rng, raw } = splitOptions(options);
    const fmt = raw ? null : this.manifest.prompt_format;
    const config = this.generationConfig(params);
    const ids = this.#checkIds(await this.#promptIds(this.#format([prompt], fmt, 'stream prompt'), config, truncate), config);
    const pieces = await gen.stream(this.#steps(ids, config), ids[0], config, (t) => this.decode(t), { rng });
    return fmt ? fmt.parseStream(pieces) : pieces;
  }

  // Chat (packages with a chat template: chat.js, FORMAT.md 5.3) ----------------------------------
  /** The package's Jinja chat template (manifest chat_template), null without one. @returns {string | null} */
  get chatTemplate() {
    return this.manifest.chat_template;
  }

  /**
   * The conversation in the package's chat template: the text, and its token ids tokenized
   * without adding special tokens (the template wrote those it wants).
   * @param {{role: string, content: string}[]} messages
   * @param {{add_generation_prompt?: boolean}} [options]
   * @returns {Promise<import('./chat.js').ChatPrompt>}
   */
  async renderChat(messages, options = {}) {
    this.#require(this.canGenerate, 'chat', 'a decoder-only, prefix-lm or encoder-decoder package');
    checkOptions('renderChat', options, ['add_generation_prompt']);
    if (this.manifest.chat_template === null) {
      throw new InputError(
        `chat() needs a package with a chat template; ${this.name} has none (manifest ` +
          'chat_template: the model it was exported from shipped no template). Call generate() with the prompt text, ' +
          "or export a Hugging Face model whose tokenizer_config.json or chat_template.jinja holds its template",
        { code: 'E_WRONG_KIND' },
      );
    }
    const { add_generation_prompt: addGenerationPrompt = true } = options;
    if (typeof addGenerationPrompt !== 'boolean') {
      throw new InputError(`add_generation_prompt must be true or false, not ${show(addGenerationPrompt)}`);
    }
    const variables = specialTokenVariables(this.manifest.special_tokens, (id) => this.tokenizer.idToToken(id),
      this.manifest.chat_tokens);
    const text = renderTemplate(this.manifest.chat_template, checkMessages(messages), { addGenerationPrompt, variables });
    const ids = await this.tokenizer.encodeText(text);
    if (!ids.length) throw new InputError('the chat template rendered this conversation as no tokens; pass a message with content');
    return { text, token_ids: ids };
  }

  /**
   * Answer one conversation: renderChat, then generation on its ids with the package's
   * defaults (its eos ids stop the answer) updated by the options (generation parameters,
   * `add_generation_prompt`, `rng`). `prompt` is the rendered text, `texts` the answers.
   * @param {{role: string, content: string}[]} messages
   * @param {GenerateOptions & {add_generation_prompt?: boolean}} [options]
   * @returns {Promise<Generation>}
   */
  async chat(messages, options = {}) {
    if (options === null || typeof options !== 'object' || Array.isArray(options)) {
      throw new ConfigError(`chat() options must be an object, not ${typeOf(options)}`);
    }
    const { add_generation_prompt: addGenerationPrompt, ...rest } = options;
    const prompt = await this.renderChat(messages, addGenerationPrompt === undefined ? {} : { add_generation_prompt: addGenerationPrompt });
    for (const key of ['truncate', 'raw']) {
      if (key in rest) throw new InputError(`chat() has no option ${key}: a conversation is sent as its template renders it`);
    }
    const [result] = await this.generateIds([prompt.token_ids], rest);
    return { ...result, prompt: prompt.text };
  }

  /**
   * chat()'s answer as it is produced (greedy or sample); the pieces join to its text.
   * @param {{role: string, content: string}[]} messages
   * @param {GenerateOptions & {add_generation_prompt?: boolean}} [options]
   * @returns {Promise<AsyncGenerator<string, void, void>>}
   */
  async streamChat(messages, options = {}) {
    if (options === null || typeof options !== 'object' || Array.isArray(options)) {
      throw new ConfigError(`streamChat() options must be an object, not ${typeOf(options)}`);
    }
    const { add_generation_prompt: addGenerationPrompt, ...rest } = options;
    const prompt = await this.renderChat(messages, addGenerationPrompt === undefined ? {} : { add_generation_prompt: addGenerationPrompt });
    const { params, rng } = splitOptions(rest);
    const config = this.generationConfig(params);
    const ids = this.#checkIds([prompt.token_ids], config);
    return gen.stream(this.#steps(ids, config), ids[0], config, (t) => this.decode(t), { rng });
  }

  /**
   * The texts the model reads: in the package's prompt format (FORMAT.md 5.2), or as given.
   * @param {string[]} texts @param {import('./prompt_format.js').PromptFormat | null} fmt @param {string} what
   */
  #format(texts, fmt, what) {
    if (!fmt) return texts;
    texts.forEach((text, i) => {
      if (fmt.strip && !strip(text)) throw new InputError(`${what}[${i}] is only whitespace; pass the text to answer`);
    });
    return texts.map((text) => fmt.format(text));
  }
}

/**
 * Open a package: read and check the manifest, verify checksums, load the tokenizer, open one
 * session per graph and check each session's I/O against the contract.
 * @param {string} packageDir  a directory (Node) or a URL (browsers: the folder of manifest.json)
 * `trustedRoots` (Node): directories (content stores, e.g. the Hugging Face cache) that the package's
 * files may be links into; ONNXFORMER_TRUSTED_STORES adds more (path.delimiter-separated).
 * Browsers (host_web.js) also take `onProgress({file, loaded, total})`, `memoryLimit` (bytes) and `fetch`.
 * @param {{provider?: string, threads?: number, verify?: boolean, trustedRoots?: string[]}} [options]
 * @returns {Promise<Model>}
 */
export async function load(packageDir, { provider, threads, verify = true, ...hostOptions } = {}) {
  if (threads !== undefined && !(Number.isInteger(threads) && threads >= 0 && threads <= 1024)) {
    throw new InputError(`threads must be undefined (onnxruntime's choice) or an integer from 0 to 1024, not ${show(threads)}`);
  }
  const source = await openSource(packageDir, { threads, ...hostOptions });
  try {
    const backend = resolveProvider(provider);
    const manifest = manifestFromDict(await source.manifestData());
    source.plan(manifest);
    if (verify) await source.verify(manifest);
    const tokenizer = await source.tokenizer(manifest.tokenizer.file);
    if (tokenizer.vocabSize > manifest.dims.vocab_size) {
      throw new PackageError(
        `the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocabulary ${manifest.dims.vocab_size}: ` +
          'they do not belong together; re-export the package',
        { code: 'E_TOKENIZER' },
      );
    }
    // Every special token id of the manifest must be a token of the tokenizer (as in Python).
    const unknown = Object.entries(manifest.special_tokens).filter(([, id]) => id >= 0 && tokenizer.idToToken(id) === null);
    if (unknown.length) {
      throw new PackageError(
        `manifest special_tokens ${unknown.map(([role, id]) => `${role}=${id}`).join(', ')} are not tokens of ` +
          `${manifest.tokenizer.file}: the tokenizer does not belong to this model; re-export the package`,
        { code: 'E_TOKENIZER' },
      );
    }
    const graphs = Object.entries(manifest.graphs);
    const bytes = {};
    for (const [name, entry] of graphs) {
      bytes[name] = await source.graphBytes(entry.file.file);
      checkGraphLimits(manifest, name, positionTablesOf(bytes[name], entry.file.file));
    }
    const sessions = {};
    for (const [name, entry] of graphs) {
      // An encoder-decoder's encoder and cross-attention run once per call, right before the
      // decoder's steps: their workers must not spin on the cores the steps need (as in Python).
      const once = graphs.length > 1 && name !== DECODER;
      // FORMAT.md 2.5, on every load (also without verify): onnxruntime opens no graph that reads
      // files the manifest does not list or that lie outside the package.
      const refs = externalDataRefsOf(bytes[name], entry.file.file);
      checkExternalRefs(refs, entry.file.file, entry.external_data.map((e) => e.file));
      await source.checkExternalData(entry.file.file, refs);
      sessions[name] = await openSession(source, entry, { provider: backend, threads, spinning: !once });
    }
    return new Model(source.location, manifest, tokenizer, sessions, source.name);
  } finally {
    source.done();
  }
}
