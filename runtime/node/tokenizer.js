/**
 * The package's tokenizer: `tokenizer.json` read by the native binding of Hugging Face
 * `tokenizers` (the same Rust library the Python runtime uses), so both runtimes produce the
 * same ids. The contract: `encode(text)` with the special-token template (add_special_tokens)
 * builds model inputs; `decode(ids)` skips special tokens.
 *
 * @module tokenizer
 */

import * as path from 'node:path';

import tokenizers from 'tokenizers';

import { PackageError } from './errors.js';

/** One encoded text. @typedef {{ids: number[], typeIds: number[], specialMask: number[]}} Encoded */

export class PackageTokenizer {
  /** @param {import('tokenizers').Tokenizer} tokenizer */
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
  }

  /**
   * Load `tokenizer.json` from a package directory.
   * @param {string} directory
   * @param {string} file
   */
  static fromPackage(directory, file) {
    try {
      return new PackageTokenizer(tokenizers.Tokenizer.fromFile(path.join(directory, file)));
    } catch (err) {
      throw new PackageError(`tokenizer ${file} could not be loaded (${err.message}); re-export the package`,
        { code: 'E_TOKENIZER', cause: err });
    }
  }

  /**
   * The token of an id, or null where the vocabulary has none.
   * @param {number} id
   * @returns {string | null}
   */
  idToToken(id) {
    return this.tokenizer.idToToken(id) ?? null;
  }

  /** Tokens in the vocabulary, added tokens included. */
  get vocabSize() {
    return this.tokenizer.getVocabSize(true);
  }

  /**
   * Ids and token type ids of each text, with the package's special-token template.
   * @param {string[]} texts
   * @returns {Promise<Encoded[]>}
   */
  async encodeBatch(texts) {
    const encodings = await this.tokenizer.encodeBatch(texts, { addSpecialTokens: true });
    return encodings.map((e) => ({ ids: e.getIds(), typeIds: e.getTypeIds(), specialMask: e.getSpecialTokensMask() }));
  }

  /**
   * Ids of one text as it is, without the special-token template (a rendered chat template
   * holds the special tokens it wants).
   * @param {string} text
   * @returns {Promise<number[]>}
   */
  async encodeText(text) {
    return (await this.tokenizer.encode(text, null, { addSpecialTokens: false })).getIds();
  }

  /**
   * Text of token ids, special tokens skipped.
   * @param {number[]} ids
   * @returns {Promise<string>}
   */
  decode(ids) {
    return this.tokenizer.decode(ids, true);
  }
}
