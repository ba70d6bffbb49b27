/**
 * The package's tokenizer in browsers: `tokenizer.json` read by `@huggingface/tokenizers`
 * (Tokenizers.js, pure JavaScript), behind the interface of tokenizer.js (the Node binding).
 *
 * One divergence from the Rust library is fixed here, at its source: Tokenizers.js's
 * `Whitespace` pre-tokenizer splits on `/\w+|[^\w\s]+/`, and JavaScript's `\w` is ASCII only,
 * so "Café" became "Caf" + "é"; Rust's `\w` is Unicode (Alphabetic, marks, decimal numbers,
 * connector punctuation, join controls). Each Whitespace pre-tokenizer gets that class instead.
 * Tokenizers.js also ignores tokenizer.json's `padding` (the runtime pads itself) and refuses
 * to decode an empty list (here: the empty text).
 *
 * @module tokenizer_web
 */

import { Tokenizer } from '@huggingface/tokenizers';

import { PackageError } from './errors.js';

const WORD = '\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}';
const UNICODE_WHITESPACE = new RegExp(`[${WORD}]+|[^${WORD}\\s]+`, 'gu');

/**
 * Give every Whitespace pre-tokenizer (also inside a Sequence) Rust's Unicode word class; the
 * instances keep no config, so the tokenizer.json entry `config` says which one is which.
 */
function fixWhitespace(preTokenizer, config) {
  if (!preTokenizer || !config) return;
  if (config.type === 'Whitespace') {
    preTokenizer.pre_tokenize_text = (text) => text.match(UNICODE_WHITESPACE) || [];
  }
  if (config.type === 'Sequence') {
    (config.pretokenizers ?? []).forEach((inner, i) => fixWhitespace(preTokenizer.tokenizers?.[i], inner));
  }
}

export class WebTokenizer {
  /** @param {object} json  the parsed tokenizer.json @param {string} file */
  constructor(json, file) {
    try {
      this.tokenizer = new Tokenizer(json, {});
    } catch (err) {
      throw new PackageError(`tokenizer ${file} could not be loaded (${err.message}); re-export the package`,
        { code: 'E_TOKENIZER', cause: err });
    }
    fixWhitespace(this.tokenizer.pre_tokenizer, json.pre_tokenizer);
    const vocab = this.tokenizer.get_vocab(true);
    this.size = vocab.size;
    this.special = new Set([...this.tokenizer.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([id]) => id));
  }

  /** @param {number} id @returns {string | null} */
  idToToken(id) {
    return this.tokenizer.id_to_token(id) ?? null;
  }

  get vocabSize() {
    return this.size;
  }

  /** @param {string[]} texts */
  async encodeBatch(texts) {
    return texts.map((text) => {
      const e = this.tokenizer.encode(text, { add_special_tokens: true, return_token_type_ids: true });
      return { ids: e.ids, typeIds: e.token_type_ids ?? e.ids.map(() => 0), specialMask: this.#templateMask(text, e.ids) };
    });
  }

  /**
   * Rust's special_tokens_mask: 1 for the tokens the post-processor's template added (not for a
   * special token the text itself holds, nor for [UNK]); the text's own ids sit in one run.
   */
  #templateMask(text, ids) {
    const own = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    for (let start = 0; start + own.length <= ids.length; start++) {
      if (own.every((id, i) => ids[start + i] === id)) {
        return ids.map((_, i) => (i >= start && i < start + own.length ? 0 : 1));
      }
    }
    return ids.map((id) => (this.special.has(id) ? 1 : 0)); // a template that rewrites the text's ids
  }

  /** @param {string} text */
  async encodeText(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** @param {number[]} ids */
  async decode(ids) {
    return ids.length ? this.tokenizer.decode(ids, { skip_special_tokens: true }) : '';
  }
}
