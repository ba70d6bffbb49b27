/**
 * The prompt format a model was trained with (manifest `prompt_format`): the port of
 * `runtime/prompt_format.py`; runtime/FORMAT.md section 5.2 is the rule.
 *
 *     const fmt = promptFormatFromManifest({ template: '{prompt} =', strip: true });
 *     fmt.format('  February 17, 2001\r\n');   // 'February 17, 2001 ='
 *     fmt.parse(' 2001-02-17');                // '2001-02-17'
 *
 * Whitespace is Python's `str.isspace` set, so both runtimes strip the same characters
 * (JavaScript's `trim` also drops U+FEFF and keeps U+001C-U+001F and U+0085).
 *
 * @module prompt_format
 */

import { PackageError, show } from './errors.js';

export const PLACEHOLDER = '{prompt}';

const WS = '[\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]';
const LEADING = new RegExp(`^${WS}+`, 'u');
const TRAILING = new RegExp(`${WS}+$`, 'u');

/** Python's `str.strip()`. @param {string} text */
export const strip = (text) => text.replace(LEADING, '').replace(TRAILING, '');

export class PromptFormat {
  /** @param {string} template holds `{prompt}` exactly once @param {boolean} stripText */
  constructor(template, stripText) {
    this.template = template;
    this.strip = stripText;
    Object.freeze(this);
  }

  /** The text the model reads for a user's prompt. @param {string} prompt */
  format(prompt) {
    const [before, after] = this.template.split(PLACEHOLDER);
    return before + (this.strip ? strip(prompt) : prompt) + after;
  }

  /** The answer a user gets from the generated continuation. @param {string} text */
  parse(text) {
    return this.strip ? strip(text) : text;
  }

  /**
   * `parse` on a stream of text deltas: leading whitespace dropped, whitespace held back until
   * text follows it; the pieces join to `parse` of the joined input.
   * @param {AsyncIterable<string>} pieces
   */
  async *parseStream(pieces) {
    if (!this.strip) {
      yield* pieces;
      return;
    }
    let started = false;
    let held = '';
    for await (let piece of pieces) {
      if (!started) {
        piece = piece.replace(LEADING, '');
        started = piece.length > 0;
      }
      const text = held + piece;
      const body = text.replace(TRAILING, '');
      held = text.slice(body.length);
      if (body) yield body;
    }
  }
}

/**
 * The manifest's `prompt_format` (absent or null: null, prompts are raw text).
 * @param {any} value
 * @returns {PromptFormat | null}
 */
export function promptFormatFromManifest(value) {
  if (value === undefined || value === null) return null;
  const fail = (message) => new PackageError(`manifest ${message}. Re-export the package`, { code: 'E_MANIFEST' });
  if (typeof value !== 'object' || Array.isArray(value) || !('template' in value) || !('strip' in value)) {
    throw fail(`prompt_format must be a JSON object with fields template and strip; got ${show(value)}`);
  }
  const { template, strip: stripText } = value;
  if (typeof template !== 'string' || template.split(PLACEHOLDER).length !== 2) {
    throw fail(`prompt_format template must be a string holding '${PLACEHOLDER}' exactly once; got ${show(template)}`);
  }
  if (typeof stripText !== 'boolean') throw fail(`prompt_format strip must be true or false; got ${show(stripText)}`);
  return new PromptFormat(template, stripText);
}
