/**
 * The step protocol: what every search asks of a model, token by token (the JavaScript port of
 * `runtime/steps.py`). No onnxruntime here; `session.js` implements it over a package's graphs.
 *
 * A step model holds a batch of rows; a row is one sequence being decoded. The search
 * (generation.js: greedy, sample, beam) drives it through these operations and never sees
 * padding, positions, masks or the cache layout, which are the step model's business:
 *
 *     prefill(prompts) -> StepResult   start prompts.length new rows after the running ones
 *                                      (the first call starts the batch; later calls admit
 *                                      rows into a running batch); the result covers the new
 *                                      rows only. Encoder-decoder: the prompts are the sources.
 *     advance(tokens)  -> StepResult   tokens (N,): one more token per running row; (N, K): K
 *                                      more; logits (N, V) after the token, or (N, K, V) after
 *                                      each of the K tokens
 *     select(rows)                     row r becomes old row rows[r]: reorder (beam search),
 *                                      copy (several sequences per prompt) or drop rows
 *     release(rows)                    drop the given rows; the others keep their order
 *     sequenceStart(prompt)            the tokens a row's sequence starts with, which the
 *                                      logits processors count: the prompt, or for an
 *                                      encoder-decoder [decoder_start] (the prompt is the source)
 *     rows, vocabSize                  N and V
 *
 * `prefill` and `advance` return promises; `select` and `release` may (the search awaits them).
 * Every result carries the greedy choice (`nextToken`, `nextLogprob`): a model whose graph
 * computes it returns the graph's; otherwise it is computed from the logits on first use, by
 * `greedyChoice`. A plain greedy search reads only those two numbers per row.
 *
 * Shape letters: N running rows, K tokens per row in one advance, V vocabulary size.
 *
 * @module steps
 */

import { InputError } from './errors.js';
import { argmax, checkPrompts, logProb } from './generation.js';

/**
 * The greedy choice of logits rows: argmax (lowest id among ties) and its log-softmax value.
 * @param {Float32Array[]} logits  (M, V)
 * @returns {{tokens: number[], logprobs: number[]}}  (M,) each
 */
export function greedyChoice(logits) {
  const tokens = logits.map(argmax);
  return { tokens, logprobs: logits.map((row, m) => logProb(row, tokens[m])) };
}

/**
 * One step's output for each row it ran: logits and the greedy choice.
 *
 * `logits`: (N, V) as N Float32Array rows, or (N, K, V) after a K-token advance (N arrays of
 * K rows). Read them before the next call on the model, and never write to them. `nextToken`
 * (N,) / (N, K) and `nextLogprob` are the graph's when the model computes them, else computed
 * from the logits on first use.
 */
export class StepResult {
  #logits;
  #choice;

  /**
   * @param {Float32Array[] | Float32Array[][] | (() => Float32Array[] | Float32Array[][])} logits
   *   the rows, or a function returning them (called only when they are read)
   * @param {number[] | number[][] | null} [nextToken]
   * @param {number[] | number[][] | null} [nextLogprob]
   */
  constructor(logits, nextToken = null, nextLogprob = null) {
    this.#logits = logits;
    this.#choice = nextToken === null ? null : { tokens: nextToken, logprobs: nextLogprob };
  }

  /** @returns {Float32Array[] | Float32Array[][]} */
  get logits() {
    if (typeof this.#logits === 'function') this.#logits = this.#logits();
    return this.#logits;
  }

  /** @returns {number[] | number[][]} */
  get nextToken() {
    return this.#greedy().tokens;
  }

  /** @returns {number[] | number[][]} */
  get nextLogprob() {
    return this.#greedy().logprobs;
  }

  #greedy() {
    if (this.#choice === null) {
      const logits = this.logits;
      if (logits.length && Array.isArray(logits[0])) { // (N, K, V)
        const each = logits.map((rows) => greedyChoice(rows));
        this.#choice = { tokens: each.map((c) => c.tokens), logprobs: each.map((c) => c.logprobs) };
      } else {
        this.#choice = greedyChoice(/** @type {Float32Array[]} */ (logits));
      }
    }
    return this.#choice;
  }

  /**
   * The result of rows `rows` (N',): new row r = row rows[r].
   * @param {number[]} rows
   * @returns {StepResult}
   */
  take(rows) {
    const { tokens, logprobs } = this.#greedy();
    const logits = this.logits;
    return new StepResult(rows.map((r) => logits[r]), rows.map((r) => tokens[r]), rows.map((r) => logprobs[r]));
  }

  /**
   * K one-token results stacked into one (N, K) result; the logits are stacked when read.
   * @param {StepResult[]} steps  K results of N rows each
   * @returns {StepResult}
   */
  static stack(steps) {
    const logits = steps.map((s) => s.logits); // read now: each is valid only until the next call
    const n = logits[0].length;
    const rows = (per) => Array.from({ length: n }, (_, r) => per.map((values) => values[r]));
    return new StepResult(rows(logits), rows(steps.map((s) => s.nextToken)), rows(steps.map((s) => s.nextLogprob)));
  }
}

/**
 * advance()'s tokens as N rows of K >= 1 token ids. Another shape, or ids outside the
 * vocabulary, break the protocol: a bug of the caller (a search, a scheduler), so a plain Error.
 * @param {number[] | number[][]} tokens
 * @param {number} rows  N
 * @param {number} vocabSize  V
 * @returns {number[][]}
 */
export function asTokens(tokens, rows, vocabSize) {
  const ids = tokens.map((t) => (Array.isArray(t) ? t : [t]));
  if (ids.length !== rows || !ids.length || ids.some((row) => row.length !== ids[0].length || !row.length)) {
    throw new Error(`advance() takes (N=${rows},) or (N=${rows}, K) token ids; got ${tokens.length} rows`);
  }
  if (ids.some((row) => row.some((t) => !Number.isInteger(t) || t < 0 || t >= vocabSize))) {
    throw new Error(`advance() got a token id outside the vocabulary [0, ${vocabSize})`);
  }
  return ids;
}

/**
 * prefill()'s prompts checked (InputError: they may come straight from a caller).
 * @param {number[][]} prompts
 * @param {number} vocabSize  V
 * @returns {number[][]}
 */
export function prefillRows(prompts, vocabSize) {
  const rows = checkPrompts(prompts);
  const top = Math.max(...rows.map((r) => Math.max(...r)));
  if (top >= vocabSize) {
    throw new InputError(`prompt token id ${top} is out of range for vocab_size ${vocabSize}`, { code: 'E_TOKEN_ID' });
  }
  return rows;
}

/**
 * The rows of 0..n-1 that are not in `rows`, in order (release() as a select()).
 * @param {number} n
 * @param {number[]} rows
 * @returns {number[]}
 */
export function keptRows(n, rows) {
  const dropped = new Set(rows);
  return Array.from({ length: n }, (_, r) => r).filter((r) => !dropped.has(r));
}
