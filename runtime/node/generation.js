/**
 * The search: greedy, sampling and beam search over any step model (the JavaScript port of
 * `runtime/generation.py`). No onnxruntime here: `steps.js` has the step protocol and
 * `session.js` implements it over a package's graphs; this file is the only implementation of
 * the search, and it uses only that protocol.
 *
 * Shape letters:
 *
 *     B   prompts
 *     K   beams per prompt (beam search)
 *     N   rows run through the model: B, B * num_return_sequences (sample) or B * K (beam)
 *     V   vocabulary size
 *
 * Each prompt starts one row (`prefill`); several sequences per prompt copy its row
 * (`select`). Each later step feeds one token per row (`advance`); rows that have finished
 * keep being fed `pad_token_id` and their outputs are ignored. Padding, positions, masks and
 * the cache layout are the step model's business. A search releases its rows when it ends.
 *
 * Logits processing, in this order (the same as Python's):
 *
 *     1. repetition penalty      every strategy, when repetition_penalty != 1
 *     2. no-repeat n-gram ban    every strategy, when no_repeat_ngram_size > 0
 *     3. eos suppression         every strategy, while fewer than min_new_tokens are generated
 *     4. forced tokens           every strategy: forced_bos_token_id where the row's sequence is one
 *                                token long, then forced_eos_token_id at the row's last allowed token
 *     5. temperature             sample only
 *     6. top-k                   sample only, when top_k > 0
 *     7. top-p                   sample only, when top_p < 1
 *     8. choice                  greedy: argmax (lowest id among ties);
 *                                sample: softmax, inverse CDF with one rng.random() per row;
 *                                beam: log-softmax + beam step
 *
 * Steps 1-4 count the row's sequence: `model.sequenceStart(prompt)` (the prompt, or for an
 * encoder-decoder the decoder's start token) plus the generated tokens. Step 4 is transformers'
 * ForcedBOSTokenLogitsProcessor / ForcedEOSTokenLogitsProcessor: the row's logits all become
 * -Infinity but the forced id's (ids'), which become 0. A row's last allowed token is its
 * `newTokenLimits` entry minus one: max_new_tokens, lowered by max_length (the sequence, start
 * included, at most that long) where it is set. Plain greedy (no repetition penalty or n-gram
 * ban, past min_new_tokens, not a forced step) takes the step's own greedy choice
 * (`nextToken`, `nextLogprob`), which a graph may compute: nothing of size V is read per token.
 *
 * Steps 1-7 are float32 arithmetic (`Math.fround`), as numpy does, so greedy decoding picks
 * exactly the tokens the Python runtime picks. Sampling probabilities are float64. The
 * sampler's random numbers come from `random.js` (xoshiro128**), not numpy: seeded sampling
 * is reproducible within this runtime but differs from Python's for the same seed.
 *
 * @module generation
 */

import { ConfigError, InputError, show } from './errors.js';
import { Random } from './random.js';

export const STRATEGIES = ['greedy', 'sample', 'beam'];

/** Parameters without a CLI flag (the package's value applies); the rest are `--name-with-dashes`. */
const NO_FLAG = new Set(['eos_token_ids', 'early_stopping', 'pad_token_id', 'max_length', 'forced_bos_token_id',
  'forced_eos_token_id']);

/**
 * `{ name: value } (--flag value)`: a setting as the API and cli.js spell it. A message that
 * suggests a fix names it this way, so the fix works where the user is (Python's
 * generation.option does the same); test/advice.test.js applies each one.
 */
export function option(name, value) {
  const api = `{ ${name}: ${typeof value === 'string' ? `'${value}'` : value} }`;
  if (NO_FLAG.has(name)) return api;
  const flag = name === 'stop_strings' ? '--stop' : `--${name.replaceAll('_', '-')}`;
  return value === true ? `${api} (${flag})` : `${api} (${flag} ${value})`;
}

/**
 * Search parameters. Field names are the manifest's (`generation` object) and Python's.
 * @typedef {object} GenerationConfig
 * @property {'greedy' | 'sample' | 'beam'} strategy
 * @property {number} max_new_tokens        generated tokens at most (eos included)
 * @property {number} min_new_tokens        eos is suppressed until this many tokens are generated
 * @property {number} temperature           sample: logits / temperature; > 0
 * @property {number} top_k                 sample: keep the k highest logits (ties kept); 0 = off
 * @property {number} top_p                 sample: nucleus mass in (0, 1]; 1 = off
 * @property {number | null} seed           sample: seed of the generator when none is passed
 * @property {number} num_beams             beam: beams per prompt (K)
 * @property {number} length_penalty        beam: score = sum logprob / length ** length_penalty
 * @property {boolean} early_stopping       beam: a prompt is done once it has K finished hypotheses
 * @property {number} num_return_sequences  sequences per prompt; greedy: 1; beam: <= num_beams
 * @property {number} repetition_penalty    CTRL penalty on tokens already in the sequence; 1 = off
 * @property {number} no_repeat_ngram_size  ban tokens completing an n-gram already seen; 0 = off
 * @property {number[]} eos_token_ids       generating one of these finishes a row
 * @property {string[]} stop_strings        finish when the generated text contains one
 * @property {number} pad_token_id          fed to left pads and finished rows
 * @property {number} max_length            the row's sequence (start + generated) at most this long; 0 = no limit
 * @property {number} forced_bos_token_id   the token after a one-token sequence (an encoder-decoder's first); -1 = none
 * @property {number[]} forced_eos_token_id forced as a row's last allowed token; [] = none
 */

/** @type {Readonly<GenerationConfig>} */
export const DEFAULTS = Object.freeze({
  strategy: 'greedy',
  max_new_tokens: 32,
  min_new_tokens: 0,
  temperature: 1.0,
  top_k: 0,
  top_p: 1.0,
  seed: null,
  num_beams: 1,
  length_penalty: 1.0,
  early_stopping: false,
  num_return_sequences: 1,
  repetition_penalty: 1.0,
  no_repeat_ngram_size: 0,
  eos_token_ids: [],
  stop_strings: [],
  pad_token_id: 0,
  max_length: 0,
  forced_bos_token_id: -1,
  forced_eos_token_id: [],
});

const FIELDS = Object.keys(DEFAULTS);

// Configuration ------------------------------------------------------------------------------
function checkInt(name, value, minimum) {
  if (!Number.isInteger(value) || value < minimum) {
    throw new ConfigError(`${name} must be an integer >= ${minimum}, not ${show(value)}`);
  }
  return value;
}

function checkFloat(name, value) {
  if (typeof value !== 'number') throw new ConfigError(`${name} must be a number, not ${show(value)}`);
  if (!Number.isFinite(value)) throw new ConfigError(`${name} must be finite, not ${value}`);
  return value;
}

/**
 * Check generation parameters and fill in defaults (the checks of Python's `GenerationConfig`,
 * in its order: the same condition fails with the same error code). Unknown names are refused,
 * with a suggestion.
 * @param {Record<string, any>} params
 * @returns {Readonly<GenerationConfig>}
 */
export function generationConfig(params = {}) {
  rejectUnknown(params);
  const c = validated({ ...DEFAULTS, ...setFields(params) });
  const frozen = (name) => Object.freeze(c[name]);
  return Object.freeze({ ...c, eos_token_ids: frozen('eos_token_ids'), stop_strings: frozen('stop_strings'),
    forced_eos_token_id: frozen('forced_eos_token_id') });
}

/**
 * Check the parameters that are set, without filling in defaults (Python's
 * `GenerationConfig.from_dict`): each set field alone, and each rule between fields when all of
 * its fields are set, so `{min_new_tokens: 40}` passes here and fails once merged with a
 * `max_new_tokens` below it. A package's generation defaults are checked this way on load.
 * @param {Record<string, any>} params
 * @returns {Partial<GenerationConfig>}  the set fields, normalised (eos_token_ids, forced_eos_token_id,
 *   stop_strings as arrays)
 */
export function checkParameters(params = {}) {
  rejectUnknown(params);
  return validated(setFields(params));
}

/** Each field of `v` checked, then the rules between fields all of which are in `v`. */
function validated(v) {
  const has = (...names) => names.every((name) => name in v);
  if (has('strategy') && !STRATEGIES.includes(v.strategy)) {
    throw new ConfigError(`strategy must be one of ${STRATEGIES.join(', ')}, not ${show(v.strategy)}`);
  }
  if (has('max_new_tokens')) checkInt('max_new_tokens', v.max_new_tokens, 0);
  if (has('min_new_tokens')) checkInt('min_new_tokens', v.min_new_tokens, 0);
  if (has('min_new_tokens', 'max_new_tokens') && v.min_new_tokens > v.max_new_tokens) {
    throw new ConfigError(
      `min_new_tokens (${v.min_new_tokens}) must be <= max_new_tokens (${v.max_new_tokens}); pass ` +
        `${option('min_new_tokens', v.max_new_tokens)} or less, or ${option('max_new_tokens', v.min_new_tokens)} or more`,
    );
  }
  if (has('temperature')) checkFloat('temperature', v.temperature);
  if (has('strategy', 'temperature') && v.strategy === 'sample' && v.temperature <= 0) {
    throw new ConfigError(
      `temperature must be > 0 for strategy 'sample', not ${v.temperature}. ` +
        `Pass a temperature > 0, e.g. ${option('temperature', 1)}, or ${option('strategy', 'greedy')} for ` +
        'deterministic decoding.',
    );
  }
  if (has('top_k')) checkInt('top_k', v.top_k, 0);
  if (has('top_p')) {
    checkFloat('top_p', v.top_p);
    if (!(v.top_p > 0 && v.top_p <= 1)) {
      throw new ConfigError(`top_p must be in (0, 1], not ${v.top_p}. Pass ${option('top_p', 1)} to turn nucleus filtering off.`);
    }
  }
  if (v.seed !== undefined && v.seed !== null) checkInt('seed', v.seed, 0);
  if (has('num_beams')) checkInt('num_beams', v.num_beams, 1);
  if (has('strategy', 'num_beams') && v.num_beams > 1 && v.strategy !== 'beam') {
    throw new ConfigError(
      `num_beams (${v.num_beams}) > 1 needs strategy 'beam', not '${v.strategy}'. ` +
        `Pass ${option('strategy', 'beam')}, or ${option('num_beams', 1)} for strategy '${v.strategy}'.`,
    );
  }
  if (has('length_penalty')) checkFloat('length_penalty', v.length_penalty);
  if (has('early_stopping') && typeof v.early_stopping !== 'boolean') {
    throw new ConfigError(`early_stopping must be true or false, not ${show(v.early_stopping)}`);
  }
  if (has('num_return_sequences')) checkInt('num_return_sequences', v.num_return_sequences, 1);
  if (has('strategy', 'num_return_sequences') && v.strategy === 'greedy' && v.num_return_sequences !== 1) {
    throw new ConfigError(
      `num_return_sequences must be 1 for strategy 'greedy' (it is deterministic), not ${v.num_return_sequences}. ` +
        `For several sequences pass ${option('strategy', 'sample')}, or ${option('strategy', 'beam')} with ` +
        `${option('num_beams', v.num_return_sequences)}.`,
    );
  }
  if (has('strategy', 'num_return_sequences', 'num_beams') && v.strategy === 'beam' &&
      v.num_return_sequences > v.num_beams) {
    throw new ConfigError(
      `num_return_sequences (${v.num_return_sequences}) must be <= num_beams (${v.num_beams}) for strategy 'beam'; ` +
        `pass ${option('num_beams', v.num_return_sequences)} or more`,
    );
  }
  if (has('repetition_penalty')) {
    checkFloat('repetition_penalty', v.repetition_penalty);
    if (v.repetition_penalty <= 0) {
      throw new ConfigError(`repetition_penalty must be > 0, not ${v.repetition_penalty}. Pass ${option('repetition_penalty', 1)} to turn it off.`);
    }
  }
  if (has('no_repeat_ngram_size')) checkInt('no_repeat_ngram_size', v.no_repeat_ngram_size, 0);
  const out = { ...v };
  for (const name of ['eos_token_ids', 'forced_eos_token_id']) {
    if (!has(name)) continue;
    const eos = Number.isInteger(v[name]) ? [v[name]] : v[name];
    if (!Array.isArray(eos) || !eos.every((t) => Number.isInteger(t) && t >= 0)) {
      throw new ConfigError(`${name} must be a token id >= 0 or an array of them (empty: none), not ${show(v[name])}`);
    }
    out[name] = [...eos];
  }
  if (has('forced_bos_token_id') && !(Number.isInteger(v.forced_bos_token_id) && v.forced_bos_token_id >= -1)) {
    throw new ConfigError(`forced_bos_token_id must be a token id >= 0, or -1 for none, not ${show(v.forced_bos_token_id)}`);
  }
  if (has('max_length')) checkInt('max_length', v.max_length, 0);
  if (has('stop_strings')) {
    const stops = typeof v.stop_strings === 'string' ? [v.stop_strings] : v.stop_strings;
    if (!Array.isArray(stops) || !stops.every((s) => typeof s === 'string' && s)) {
      throw new ConfigError(`stop_strings must be an array of non-empty strings, not ${show(v.stop_strings)}`);
    }
    if (has('strategy') && stops.length && v.strategy === 'beam') {
      throw new ConfigError(
        `stop_strings (${show(stops)}) are not supported with strategy 'beam' (it stops at eos_token_ids); ` +
          `drop stop_strings (--stop), or pass ${option('strategy', 'greedy')} or 'sample' with ${option('num_beams', 1)}`,
      );
    }
    out.stop_strings = [...stops];
  }
  if (has('pad_token_id')) checkInt('pad_token_id', v.pad_token_id, 0);
  return out;
}

/** The fields given a value: undefined and null mean "unset" (Python's None). */
function setFields(params) {
  return Object.fromEntries(Object.entries(params ?? {}).filter(([, v]) => v !== undefined && v !== null));
}

/**
 * The one place a call's parameters are settled (Python's `resolve_config`): each field is the
 * caller's value, else the package's generation default (its manifest), else the built-in
 * default (`DEFAULTS`); then checked as a whole. A value given is kept, even an empty
 * `eos_token_ids` (no eos) or `pad_token_id` 0. A package's `max_length` does not apply to a
 * call that sets `max_new_tokens` (transformers' precedence).
 * @param {Record<string, any>} params  the caller's parameters
 * @param {Record<string, any>} [packageDefaults]  the manifest's `generation`
 * @returns {Readonly<GenerationConfig>}
 */
export function resolveConfig(params = {}, packageDefaults = {}) {
  rejectUnknown(params);
  rejectUnknown(packageDefaults ?? {});
  const given = setFields(params);
  const defaults = setFields(packageDefaults);
  if ('max_new_tokens' in given && !('max_length' in given) && 'max_length' in defaults) {
    defaults.max_length = 0; // as in transformers: an explicit max_new_tokens wins over max_length
  }
  return generationConfig({ ...defaults, ...given });
}

function rejectUnknown(params) {
  const unknown = Object.keys(params).filter((k) => !FIELDS.includes(k)).sort();
  if (unknown.length) {
    const hints = unknown.map((name) => {
      const close = closeMatch(name, FIELDS);
      return name + (close ? ` (did you mean ${close}?)` : '');
    });
    throw new ConfigError(`unknown generation parameter ${hints.join(', ')}; the parameters are ${FIELDS.join(', ')}`,
      { code: 'E_UNKNOWN_PARAMETER' });
  }
}

/**
 * The known name closest to a misspelt one: the nearest at most 2 edits away (insert, delete,
 * replace a character), else one that holds all of its words (`max_tokens` -> `max_new_tokens`),
 * else null.
 * @param {string} word
 * @param {string[]} possibilities
 * @returns {string | null}
 */
export function closeMatch(word, possibilities) {
  let best = null;
  let bestDistance = 3;
  for (const candidate of possibilities) {
    const d = editDistance(word, candidate);
    if (d < bestDistance) [best, bestDistance] = [candidate, d];
  }
  const words = word.split('_');
  return best ?? possibilities.find((c) => words.length > 1 && words.every((w) => c.split('_').includes(w))) ?? null;
}

/** Levenshtein distance of two short strings. */
function editDistance(a, b) {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

// Prompts and padding -------------------------------------------------------------------------
/**
 * Check token-id prompts: a non-empty list of non-empty lists of ids >= 0.
 * @param {any} prompts
 * @returns {number[][]}
 */
export function checkPrompts(prompts) {
  if (!Array.isArray(prompts) || prompts.length === 0) {
    throw new InputError(`prompts must be a non-empty array of token id arrays, not ${show(prompts)}`);
  }
  return prompts.map((prompt, b) => {
    if (!Array.isArray(prompt)) {
      throw new InputError(`prompt ${b} must be an array of token ids, not ${show(prompt)}. Tokenize it first.`);
    }
    const bad = prompt.find((t) => !Number.isInteger(t));
    if (bad !== undefined) {
      throw new InputError(`prompt ${b} holds ${show(bad)}, which is not a token id (an integer)`, { code: 'E_TOKEN_ID' });
    }
    if (!prompt.length) {
      throw new InputError(`prompt ${b} is empty; every prompt needs at least one token (e.g. bos)`);
    }
    const low = Math.min(...prompt);
    if (low < 0) throw new InputError(`prompt ${b} has a negative token id (${low})`, { code: 'E_TOKEN_ID' });
    return [...prompt];
  });
}

/**
 * @typedef {object} PaddedBatch
 * @property {number[][]} input_ids       (B, T) left-padded
 * @property {number[][]} attention_mask  (B, T) 0 on pads
 * @property {number[][]} position_ids    (B, T) max(cumsum(mask) - 1, 0)
 */

/**
 * Left-pad token id lists into a batch with its attention mask and position ids.
 * @param {number[][]} rows
 * @param {number} padTokenId
 * @returns {PaddedBatch}
 */
export function leftPad(rows, padTokenId) {
  const width = Math.max(...rows.map((r) => r.length));
  const batch = { input_ids: [], attention_mask: [], position_ids: [] };
  for (const row of rows) {
    const pads = width - row.length;
    batch.input_ids.push([...Array(pads).fill(padTokenId), ...row]); // (T,)
    batch.attention_mask.push([...Array(pads).fill(0), ...Array(row.length).fill(1)]); // (T,)
    batch.position_ids.push([...Array(pads).fill(0), ...row.map((_, t) => t)]); // (T,)
  }
  return batch;
}

// The step model --------------------------------------------------------------------------------
/**
 * What a search needs from a model (steps.js has the protocol; session.js implements it over
 * a package's graphs). A search owns the model's rows while it runs and releases them when it
 * ends.
 * @typedef {object} StepModel
 * @property {number} vocabSize  V
 * @property {number} rows       N, the running rows
 * @property {(prompts: number[][]) => Promise<import('./steps.js').StepResult>} prefill  start
 *   one row per prompt after the running rows; the result covers the new rows
 * @property {(tokens: number[] | number[][]) => Promise<import('./steps.js').StepResult>} advance
 *   one token (N,) or K tokens (N, K) more per running row
 * @property {(rows: number[]) => void | Promise<void>} select  new row r = old row rows[r]
 * @property {(rows: number[]) => void | Promise<void>} release  drop rows; the others keep their order
 * @property {(prompt: number[]) => number[]} sequenceStart  what the logits processors count first
 */

/** The step's logits, checked: a step model that breaks the protocol is a bug (a plain Error). */
function checkedLogits(result, n, vocab) {
  const logits = result.logits;
  if (logits.length !== n || logits.some((row) => row.length !== vocab)) {
    throw new Error(`the step model returned logits of ${logits.length} rows; the protocol needs (N=${n}, V=${vocab})`);
  }
  return logits;
}

/**
 * Prefill each prompt once, then copy its row `copies` times (row r continues prompt
 * floor(r / copies)).
 * @param {StepModel} model
 * @param {number[][]} rows
 * @param {number} copies
 */
async function startRows(model, rows, copies) {
  if (model.rows) throw new Error(`the search needs a step model with no running rows; this one has ${model.rows}`);
  let result = await model.prefill(rows);
  if (copies > 1) {
    const expand = Array.from({ length: rows.length * copies }, (_, r) => Math.floor(r / copies)); // (N,)
    await model.select(expand);
    result = result.take(expand);
  }
  return result;
}

/** Release every running row of the model (a search ends, also when a stream is closed early). */
async function releaseAll(model) {
  if (model.rows) await model.release(Array.from({ length: model.rows }, (_, r) => r));
}

function checkVocab(vocabSize, rows, config) {
  const top = Math.max(...rows.map((r) => Math.max(...r)));
  if (top >= vocabSize) {
    throw new InputError(`prompt token id ${top} is not below vocab_size ${vocabSize}`, { code: 'E_TOKEN_ID' });
  }
  for (const [name, ids] of [['eos_token_ids', config.eos_token_ids], ['pad_token_id', [config.pad_token_id]],
    ['forced_bos_token_id', [config.forced_bos_token_id]], ['forced_eos_token_id', config.forced_eos_token_id]]) {
    const bad = ids.filter((t) => t >= vocabSize);
    if (bad.length) {
      throw new ConfigError(`${name} [${bad.join(', ')}] are not below vocab_size ${vocabSize}; pass token ids below ` +
        `${vocabSize} (the package's vocabulary)`);
    }
  }
}

/**
 * How many tokens each row may generate (Python's `new_token_limits`): max_new_tokens, and
 * where max_length is set at most `max_length - start.length` (transformers' max_length: the
 * whole sequence, prompt or decoder start included), never below 0.
 * @param {number[][]} starts  `model.sequenceStart(prompt)` per row
 * @param {Readonly<GenerationConfig>} config
 * @returns {number[]}
 */
export function newTokenLimits(starts, config) {
  if (config.max_length === 0) return starts.map(() => config.max_new_tokens);
  return starts.map((s) => Math.max(0, Math.min(config.max_new_tokens, config.max_length - s.length)));
}

// Logits processing (rows are Float32Array (V,), modified in place on copies) ----------------
const f32 = Math.fround;

/** CTRL penalty on each token of the row's sequence: logit / p if > 0 else logit * p (float32). */
export function applyRepetitionPenalty(row, seq, penalty) {
  const p = f32(penalty);
  for (const tok of new Set(seq)) row[tok] = row[tok] > 0 ? f32(row[tok] / p) : f32(row[tok] * p);
}

/** -Infinity on every token that would complete an n-gram already present in `seq`. */
export function banRepeatedNgrams(row, seq, n) {
  if (seq.length < n) return;
  const prefixStart = seq.length - n + 1; // the last n-1 tokens
  for (let s = 0; s + n <= seq.length; s++) {
    let hit = true;
    for (let j = 0; j < n - 1 && hit; j++) hit = seq[s + j] === seq[prefixStart + j];
    if (hit) row[seq[s + n - 1]] = -Infinity;
  }
}

/** Keep logits >= the k-th largest (ties at the boundary kept); others -Infinity. */
export function topKFilter(row, k) {
  if (k <= 0 || k >= row.length) return;
  const kth = Float32Array.from(row).sort()[row.length - k];
  for (let v = 0; v < row.length; v++) if (row[v] < kth) row[v] = -Infinity;
}

/** Nucleus: by probability descending (lower id first among ties) keep a token iff the mass before it is < p. */
export function topPFilter(row, p) {
  if (p >= 1) return;
  const probs = softmax(row);
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
  let cumulative = 0;
  order.forEach((tok, rank) => {
    cumulative += probs[tok];
    const before = cumulative - probs[tok];
    if (rank > 0 && !(before < p)) row[tok] = -Infinity;
  });
}

/** Softmax in float64; a row of all -Infinity gives all zeros. @returns {Float64Array} */
export function softmax(row) {
  let top = -Infinity;
  for (const x of row) if (x > top) top = x;
  if (!Number.isFinite(top)) top = 0;
  const e = Float64Array.from(row, (x) => Math.exp(x - top));
  const total = e.reduce((s, x) => s + x, 0);
  return total > 0 ? e.map((x) => x / total) : e.fill(0);
}

/** log_softmax(row)[token], as float32. */
export function logProb(row, token) {
  let top = -Infinity;
  for (const x of row) if (x > top) top = x;
  if (!Number.isFinite(top)) top = 0;
  let sum = 0;
  for (const x of row) sum += Math.exp(f32(x - top));
  const lse = f32(Math.log(sum));
  return Number.isFinite(lse) ? f32(f32(row[token] - top) - lse) : -Infinity;
}

/** Row-wise log-softmax as float32 (beam search). @returns {Float32Array} */
export function logSoftmax(row) {
  let top = -Infinity;
  for (const x of row) if (x > top) top = x;
  if (!Number.isFinite(top)) top = 0;
  const shifted = Float32Array.from(row, (x) => x - top);
  let sum = 0;
  for (const x of shifted) sum += Math.exp(x);
  const lse = f32(Math.log(sum));
  return Number.isFinite(lse) ? shifted.map((x) => x - lse) : shifted.fill(-Infinity);
}

/** Greedy choice: the highest logit, lowest id among ties. */
export function argmax(row) {
  let best = 0;
  for (let v = 1; v < row.length; v++) if (row[v] > row[best]) best = v;
  return best;
}

/**
 * One token by inverse CDF: the first token whose cumulative probability exceeds
 * `u * total`. Zero-probability tokens are never picked; a row with every token banned picks 0.
 * @param {Float32Array} row  processed logits (V,)
 * @param {number} u          uniform in [0, 1)
 */
export function sampleToken(row, u) {
  const probs = softmax(row);
  let last = -1;
  for (let v = probs.length - 1; v >= 0; v--) if (probs[v] > 0) { last = v; break; }
  if (last < 0) return 0;
  const cdf = new Float64Array(probs.length);
  let c = 0;
  for (let v = 0; v < probs.length; v++) cdf[v] = c += probs[v];
  const target = u * cdf[cdf.length - 1];
  let token = 0;
  while (token < cdf.length && cdf[token] <= target) token++;
  return Math.min(token, last);
}

/** Every logit -Infinity but those of `tokenIds`, which are 0 (in place). */
export function forceTokens(row, tokenIds) {
  row.fill(-Infinity);
  for (const t of tokenIds) row[t] = 0;
}

/**
 * Steps 1-4 of the processing order (every strategy) on a copy of `logits`.
 * @param {number[]} [limits]  tokens each row may generate (`newTokenLimits`); default max_new_tokens
 */
export function processLogits(logits, history, config, nGenerated, limits = null) {
  return logits.map((source, r) => {
    const row = Float32Array.from(source);
    if (config.repetition_penalty !== 1) applyRepetitionPenalty(row, history[r], config.repetition_penalty);
    if (config.no_repeat_ngram_size > 0) banRepeatedNgrams(row, history[r], config.no_repeat_ngram_size);
    if (nGenerated < config.min_new_tokens) for (const t of config.eos_token_ids) row[t] = -Infinity;
    if (config.forced_bos_token_id >= 0 && nGenerated === 0 && history[r].length === 1) {
      forceTokens(row, [config.forced_bos_token_id]);
    }
    if (config.forced_eos_token_id.length && nGenerated === (limits ? limits[r] : config.max_new_tokens) - 1) {
      forceTokens(row, config.forced_eos_token_id); // after bos, as transformers orders them
    }
    return row;
  });
}

/** Steps 5-7 (sample only) on a copy of `row`. */
export function samplingFilters(source, config) {
  const t = f32(config.temperature);
  const row = Float32Array.from(source, (x) => x / t);
  if (config.top_k > 0) topKFilter(row, config.top_k);
  if (config.top_p < 1) topPFilter(row, config.top_p);
  return row;
}

// Output ----------------------------------------------------------------------------------------
/**
 * One prompt's result, the same for every strategy and entry point: `token_ids[j]`,
 * `scores[j]`, `finish_reasons[j]` and `texts[j]` for each returned sequence j.
 * @typedef {object} Generation
 * @property {string | number[]} prompt    the prompt as the caller gave it: text, or token ids
 * @property {number[][]} token_ids        generated ids only (no prompt), eos included if produced
 * @property {number[]} scores             greedy/sample: sum of log-probs; beam: length-normalised score
 * @property {string[]} finish_reasons     "eos" | "length" | "stop"
 * @property {string[] | null} texts       decoded text (cut at a stop string); null without decode
 * @property {string | null} text          texts[0]; null without decode
 */

/** @returns {Generation} */
export function generationResult(prompt, tokenIds, scores, reasons, texts) {
  return { prompt, text: texts ? texts[0] : null, texts, token_ids: tokenIds, scores, finish_reasons: reasons };
}

/** One Generation per prompt from per-row lists (row r continues prompt floor(r / copies)). */
function results(prompts, copies, sequences, scores, reasons, texts) {
  const group = (items, b) => items.slice(b * copies, (b + 1) * copies);
  return prompts.map((p, b) => generationResult(p, group(sequences, b), group(scores, b), group(reasons, b),
    texts ? group(texts, b) : null));
}

/** Token ids -> text (async, as the tokenizer binding is). @typedef {(ids: number[]) => Promise<string>} Decode */

// Greedy and sample: one loop, two token choosers -------------------------------------------
/** @typedef {(logits: Float32Array[]) => Array<[number, number]>} Chooser  -> [token, logprob] per row */

/** @type {Chooser} */
const greedyChooser = (logits) => logits.map((row) => {
  const token = argmax(row);
  return [token, logProb(row, token)];
});

/** @returns {Chooser} one rng.random() per row per step, finished rows included */
function sampleChooser(config, rng) {
  return (logits) => logits.map((source) => {
    const row = samplingFilters(source, config);
    const token = sampleToken(row, rng.random());
    return [token, logProb(row, token)];
  });
}

function findStop(text, stopStrings) {
  const found = stopStrings.map((s) => text.indexOf(s)).filter((i) => i >= 0);
  return found.length ? Math.min(...found) : null;
}

/**
 * Per-row state of the greedy/sample loop (N rows), advanced one token per iteration of `steps`.
 */
function decodeLoop(model, prompts, config, choose, decode, copies, liveText = false) {
  if (config.stop_strings.length && !decode) {
    throw new ConfigError(`stop_strings ${show(config.stop_strings)} need a decode function; pass decode`);
  }
  const rows = checkPrompts(prompts);
  checkVocab(model.vocabSize, rows, config);
  const n = rows.length * copies;
  const history = Array.from({ length: n }, (_, r) => model.sequenceStart(rows[Math.floor(r / copies)])); // + generated
  const state = {
    history,
    limits: newTokenLimits(history, config), // tokens each row may generate
    generated: Array.from({ length: n }, () => []),
    finished: Array(n).fill(false),
    reasons: Array(n).fill('length'),
    scores: Array(n).fill(0),
    texts: Array(n).fill(null),
    stopAt: Array(n).fill(null), // text index where a stop string starts
  };
  const liveDecode = config.stop_strings.length || liveText ? decode : null;
  return { rows, state, steps: advance(model, rows, config, choose, liveDecode, copies, state) };
}

async function* advance(model, rows, config, choose, decode, copies, state) {
  if (Math.max(...state.limits) === 0) return;
  try {
    yield* tokenLoop(model, rows, config, choose, decode, copies, state);
  } finally { // also when a stream is closed early
    await releaseAll(model);
  }
}

async function* tokenLoop(model, rows, config, choose, decode, copies, state) {
  const n = state.generated.length;
  const vocab = model.vocabSize;
  let result = await startRows(model, rows, copies);
  const eos = new Set(config.eos_token_ids);
  // Plain greedy takes the step's own greedy choice (the graph's, where it computes one).
  const plain = config.strategy === 'greedy' && config.repetition_penalty === 1 && config.no_repeat_ngram_size === 0;
  const limits = state.limits;
  for (let r = 0; r < n; r++) if (limits[r] === 0) state.finished[r] = true; // reason "length", no tokens
  // Steps where step 4 forces some row's token: those read the logits.
  const forcedSteps = new Set(config.forced_eos_token_id.length ? limits.map((limit) => limit - 1) : []);
  if (config.forced_bos_token_id >= 0) forcedSteps.add(0);
  const last = Math.max(...limits) - 1;
  for (let t = 0; t <= last; t++) {
    let tokens = null;
    let logprobs = null;
    if (plain && (t >= config.min_new_tokens || !eos.size) && !forcedSteps.has(t)) {
      [tokens, logprobs] = [result.nextToken, result.nextLogprob]; // (N,), (N,)
      if (tokens.length !== n || !logprobs.every(Number.isFinite)) tokens = null; // take it from the logits
    }
    if (tokens === null) {
      const processed = processLogits(checkedLogits(result, n, vocab), state.history, config, t, limits);
      const choices = choose(processed); // (N,) [token, logprob]
      [tokens, logprobs] = [choices.map(([tok]) => tok), choices.map(([, lp]) => lp)];
    }
    const fed = tokens.map((tok, r) => (state.finished[r] ? config.pad_token_id : tok)); // finished rows are fed pads
    for (let r = 0; r < n; r++) {
      if (state.finished[r]) continue;
      const tok = fed[r];
      state.generated[r].push(tok);
      state.history[r].push(tok);
      state.scores[r] += logprobs[r];
      if (eos.has(tok)) [state.finished[r], state.reasons[r]] = [true, 'eos'];
      if (decode) {
        state.texts[r] = await decode(state.generated[r]);
        const stop = config.stop_strings.length ? findStop(state.texts[r], config.stop_strings) : null;
        if (stop !== null && !state.finished[r]) [state.finished[r], state.reasons[r], state.stopAt[r]] = [true, 'stop', stop];
      }
      if (state.generated[r].length >= limits[r]) state.finished[r] = true; // reason "length" unless set
    }
    yield;
    if (state.finished.every(Boolean) || t === last) return;
    result = await model.advance(fed);
  }
}

/** Row r's text, cut where a stop string starts. */
async function finalText(state, r, decode) {
  if (state.stopAt[r] !== null) return state.texts[r].slice(0, state.stopAt[r]);
  return decode(state.generated[r]);
}

async function collect(rows, state, steps, copies, decode) {
  for await (const _ of steps); // eslint-disable-line no-unused-vars
  const texts = decode ? await Promise.all(state.generated.map((_, r) => finalText(state, r, decode))) : null;
  return results(rows, copies, state.generated, state.scores, state.reasons, texts);
}

function requireStrategy(config, strategy) {
  if (config.strategy !== strategy) {
    throw new ConfigError(
      `${strategy}() got a config with strategy '${config.strategy}'; ` +
        `call ${config.strategy === 'beam' ? 'beamSearch' : config.strategy}() or generate()`,
    );
  }
}

/**
 * Pick the highest processed logit at every step (lowest id among ties).
 * @param {StepModel} model
 * @param {number[][]} prompts
 * @param {Readonly<GenerationConfig>} config
 * @param {{decode?: Decode}} [options]
 * @returns {Promise<Generation[]>}  one per prompt
 */
export async function greedy(model, prompts, config, { decode } = {}) {
  requireStrategy(config, 'greedy');
  const { rows, state, steps } = decodeLoop(model, prompts, config, greedyChooser, decode, 1);
  return collect(rows, state, steps, 1, decode);
}

/**
 * Sample `num_return_sequences` continuations per prompt. `rng` defaults to
 * `new Random(config.seed)`; every step draws `rng.random()` once per row (finished rows
 * included), so a seed fixes the output for a given batch.
 * @param {StepModel} model
 * @param {number[][]} prompts
 * @param {Readonly<GenerationConfig>} config
 * @param {{rng?: {random(): number}, decode?: Decode}} [options]
 * @returns {Promise<Generation[]>}  one per prompt
 */
export async function sample(model, prompts, config, { rng, decode } = {}) {
  requireStrategy(config, 'sample');
  const copies = config.num_return_sequences;
  const chooser = sampleChooser(config, rng ?? new Random(config.seed));
  const { rows, state, steps } = decodeLoop(model, prompts, config, chooser, decode, copies);
  return collect(rows, state, steps, copies, decode);
}

// Beam search -------------------------------------------------------------------------------------
function addHypothesis(hyps, hyp, keep) {
  hyps.push(hyp);
  hyps.sort((a, b) => b.score - a.score || a.order - b.order);
  hyps.length = Math.min(hyps.length, keep);
}

/**
 * Beam search with K = num_beams beams per prompt; the spec is Python's `beam_search`
 * (runtime/generation.py; summarised in FORMAT.md). Scores are float32 arithmetic; the
 * float32 log-softmax may differ from numpy's in the last bit, so in near-ties the chosen
 * beams can differ from Python's.
 * @param {StepModel} model
 * @param {number[][]} prompts
 * @param {Readonly<GenerationConfig>} config
 * @param {{decode?: Decode}} [options]
 * @returns {Promise<Generation[]>}  one per prompt
 */
export async function beamSearch(model, prompts, config, { decode } = {}) {
  requireStrategy(config, 'beam');
  const rows = checkPrompts(prompts);
  checkVocab(model.vocabSize, rows, config);
  const [k, keep] = [config.num_beams, config.num_return_sequences];
  const limits = newTokenLimits(rows.map((prompt) => model.sequenceStart(prompt)), config); // (B,)
  if (Math.max(...limits) === 0) {
    const initial = [0, ...Array(k - 1).fill(-Infinity)].slice(0, keep);
    const empty = decode ? await decode([]) : null;
    return rows.map((prompt) => generationResult(prompt, Array.from({ length: keep }, () => []), [...initial],
      Array(keep).fill('length'), decode ? Array(keep).fill(empty) : null));
  }
  try {
    return await beamLoop(model, rows, config, limits, decode);
  } finally {
    await releaseAll(model);
  }
}

async function beamLoop(model, rows, config, limits, decode) {
  const nPrompts = rows.length;
  const k = config.num_beams;
  const n = nPrompts * k;
  const keep = config.num_return_sequences;
  const vocab = model.vocabSize;
  const decodeAll = async (seqs) => (decode ? Promise.all(seqs.map((s) => decode(s))) : null);
  let result = await startRows(model, rows, k);
  const eos = new Set(config.eos_token_ids);
  const nCand = Math.min(Math.max(2, 1 + eos.size) * k, k * vocab);
  const lp = f32(config.length_penalty);
  let history = Array.from({ length: n }, (_, r) => model.sequenceStart(rows[Math.floor(r / k)]));
  let beams = Array.from({ length: n }, () => []);
  let scores = Float32Array.from({ length: n }, (_, r) => (r % k === 0 ? 0 : -Infinity)); // (N,)
  const hyps = Array.from({ length: nPrompts }, () => []);
  const done = Array(nPrompts).fill(false);
  let counter = 0;
  for (let b = 0; b < nPrompts; b++) {
    if (limits[b] > 0) continue;
    for (let j = 0; j < k; j++) { // nothing to generate: K empty hypotheses at the initial scores
      addHypothesis(hyps[b], { score: scores[b * k + j], order: counter++, tokens: [], reason: 'length' }, k);
    }
    done[b] = true;
  }
  const rowLimits = Array.from({ length: n }, (_, r) => limits[Math.floor(r / k)]); // (N,)
  for (let t = 0; t < Math.max(...limits); t++) {
    const processed = processLogits(checkedLogits(result, n, vocab), history, config, t, rowLimits);
    const logprobs = processed.map(logSoftmax); // (N, V) float32
    const norm = f32(f32(t + 1) ** lp);
    const nextRows = Array.from({ length: n }, (_, r) => Math.floor(r / k) * k); // default: copy beam 0
    const nextTokens = Array(n).fill(config.pad_token_id);
    const nextScores = new Float32Array(n).fill(-Infinity);
    for (let b = 0; b < nPrompts; b++) {
      const base = b * k;
      if (done[b]) {
        for (let j = 0; j < k; j++) nextRows[base + j] = base + j;
        continue;
      }
      const cand = new Float32Array(k * vocab); // (K*V,) scores[:, None] + logprobs
      for (let j = 0; j < k; j++) for (let v = 0; v < vocab; v++) cand[j * vocab + v] = scores[base + j] + logprobs[base + j][v];
      const top = topIndices(cand, nCand); // stable: lower flat index first among ties
      let filled = 0;
      for (let rank = 0; rank < top.length; rank++) {
        const flat = top[rank];
        const [beam, tok] = [Math.floor(flat / vocab), flat % vocab];
        if (eos.has(tok)) {
          if (rank < k) {
            addHypothesis(hyps[b], { score: f32(cand[flat] / norm), order: counter++, tokens: [...beams[base + beam], tok], reason: 'eos' }, k);
          }
          continue;
        }
        nextRows[base + filled] = base + beam;
        nextTokens[base + filled] = tok;
        nextScores[base + filled] = cand[flat];
        filled += 1;
        if (filled === k) break;
      }
      if (hyps[b].length === k) done[b] = config.early_stopping || hyps[b][k - 1].score >= f32(nextScores[base] / norm);
    }
    beams = nextRows.map((r, i) => [...beams[r], nextTokens[i]]);
    history = nextRows.map((r, i) => [...history[r], nextTokens[i]]);
    scores = nextScores;
    for (let b = 0; b < nPrompts; b++) {
      if (done[b] || t !== limits[b] - 1) continue;
      for (let r = b * k; r < (b + 1) * k; r++) { // the prompt's last allowed token: its running beams end here
        addHypothesis(hyps[b], { score: f32(scores[r] / norm), order: counter++, tokens: beams[r], reason: 'length' }, k);
      }
      done[b] = true;
    }
    if (done.every(Boolean)) break;
    await model.select(nextRows);
    result = await model.advance(nextTokens);
  }
  return Promise.all(hyps.map(async (h, b) => {
    const best = h.slice(0, keep);
    return generationResult(rows[b], best.map((x) => x.tokens), best.map((x) => x.score), best.map((x) => x.reason),
      await decodeAll(best.map((x) => x.tokens)));
  }));
}

/** Indices of the `count` largest values, descending, lower index first among ties. */
function topIndices(values, count) {
  const order = Array.from(values.keys());
  order.sort((a, b) => {
    const [x, y] = [values[a], values[b]];
    return x === y ? a - b : (x > y ? -1 : 1);
  });
  return order.slice(0, count);
}

// Entry points ------------------------------------------------------------------------------------
/**
 * Run `config.strategy` (greedy, sample or beam search).
 * @param {StepModel} model
 * @param {number[][]} prompts
 * @param {Readonly<GenerationConfig>} config
 * @param {{rng?: {random(): number}, decode?: Decode}} [options]
 * @returns {Promise<Generation[]>}  one per prompt
 */
export async function generate(model, prompts, config, { rng, decode } = {}) {
  if (config.strategy === 'greedy') return greedy(model, prompts, config, { decode });
  if (config.strategy === 'sample') return sample(model, prompts, config, { rng, decode });
  return beamSearch(model, prompts, config, { decode });
}

/** Length of the longest suffix of `text` that is a proper prefix of a stop string. */
function heldBack(text, stopStrings) {
  let held = 0;
  for (const stop of stopStrings) {
    for (let size = Math.min(stop.length - 1, text.length); size > held; size--) {
      if (text.endsWith(stop.slice(0, size))) {
        held = size;
        break;
      }
    }
  }
  return held;
}

/**
 * Text deltas of one prompt's continuation as tokens are generated (greedy or sample).
 *
 * Each step decodes the whole generated id list and yields the new suffix only. Text ending
 * in U+FFFD (an incomplete UTF-8 character split across byte-level tokens) is held back until
 * the character completes, and so is a tail that could be the start of a stop string. The
 * concatenated deltas equal the final text (cut at a stop string). Arguments are checked
 * when `stream` is called, before the first step.
 * @param {StepModel} model
 * @param {number[]} prompt
 * @param {Readonly<GenerationConfig>} config
 * @param {Decode} decode
 * @param {{rng?: {random(): number}}} [options]
 * @returns {AsyncGenerator<string, void, void>}
 */
export function stream(model, prompt, config, decode, { rng } = {}) {
  if (config.strategy === 'beam') {
    const beams = config.num_beams > 1 ? ` with ${option('num_beams', 1)}` : '';
    throw new ConfigError(
      "stream() supports strategy 'greedy' or 'sample', not 'beam'. For beam search call generate() instead " +
        `(without --stream), or pass ${option('strategy', 'greedy')}${beams}.`,
    );
  }
  if (config.num_return_sequences !== 1) {
    throw new ConfigError(
      `stream() yields one sequence, not num_return_sequences ${config.num_return_sequences}. Pass ` +
        `${option('num_return_sequences', 1)}, or call generate() instead (without --stream) for several.`,
    );
  }
  const chooser = config.strategy === 'greedy' ? greedyChooser : sampleChooser(config, rng ?? new Random(config.seed));
  const { state, steps } = decodeLoop(model, [prompt], config, chooser, decode, 1, true);
  return textDeltas(state, steps, config.stop_strings, decode);
}

async function* textDeltas(state, steps, stopStrings, decode) {
  let sent = '';
  for await (const _ of steps) { // eslint-disable-line no-unused-vars
    if (state.stopAt[0] !== null) break;
    let stable = (state.texts[0] ?? '').replace(/\ufffd+$/u, ''); // hold back an incomplete character
    stable = stable.slice(0, stable.length - heldBack(stable, stopStrings));
    if (stable.length > sent.length && stable.startsWith(sent)) {
      yield stable.slice(sent.length);
      sent = stable;
    }
  }
  const final = await finalText(state, 0, decode);
  if (!final.startsWith(sent)) { // decode() revised text already sent; send from where they differ
    let common = 0;
    while (common < sent.length && sent[common] === final[common]) common++;
    sent = sent.slice(0, common);
  }
  if (final.length > sent.length) yield final.slice(sent.length);
}
