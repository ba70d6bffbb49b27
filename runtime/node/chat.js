/**
 * Chat templates (FORMAT.md 5.3): the package's `chat_template` rendered with @huggingface/jinja
 * (the Jinja of transformers.js, which applies `trim_blocks` and `lstrip_blocks` as
 * transformers does, and has `raise_exception`, `strftime_now`, `tojson` and `{% generation %}`),
 * with the variables `messages`, `add_generation_prompt` and `bos_token`, `eos_token`, ...: the
 * manifest's `chat_tokens`, else the tokenizer's token of each special-token role the package
 * has. A port of `runtime/chat.py`; the rendered text is tokenized without adding special tokens
 * (no second BOS).
 *
 * @module chat
 */

import { Template } from '@huggingface/jinja';

import { InputError, PackageError, show, typeOf } from './errors.js';

export const ROLES_AS_VARIABLES = ['bos', 'eos', 'unk', 'pad', 'sep', 'cls', 'mask']; // -> bos_token, ...

/**
 * A rendered conversation: the text the template wrote and its token ids.
 * @typedef {{text: string, token_ids: number[]}} ChatPrompt
 */

const isObject = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);

/**
 * A conversation: a non-empty array of {role: string, content: string} (other keys, strings
 * too, pass through to the template). Returns plain copies. The checks of Python's check_messages.
 * @param {any} messages
 * @returns {Record<string, string>[]}
 */
export function checkMessages(messages) {
  if (!Array.isArray(messages)) {
    throw new InputError(`chat messages must be an array of {role, content} objects, not ${typeOf(messages)}. ` +
      "For one user message pass [{role: 'user', content: text}]");
  }
  if (!messages.length) {
    throw new InputError("chat messages: the array is empty; pass at least one message ({role: 'user', content: text})");
  }
  return messages.map((message, i) => {
    if (!isObject(message)) {
      throw new InputError(`chat messages[${i}] must be an object {role, content}, not ${typeOf(message)} (${show(message)})`);
    }
    for (const key of ['role', 'content']) {
      if (!(key in message)) throw new InputError(`chat messages[${i}] has no '${key}'; each message needs 'role' and 'content'`);
    }
    for (const [key, value] of Object.entries(message)) {
      if (typeof value !== 'string') {
        throw new InputError(`chat messages[${i}].${key} must be a string, not ${typeOf(value)} (${show(value)})`);
      }
      if (!value.isWellFormed()) {
        throw new InputError(`chat messages[${i}].${key} is not valid Unicode (a lone surrogate); pass well-formed text`);
      }
    }
    if (!message.role) throw new InputError(`chat messages[${i}].role is empty; pass 'system', 'user' or 'assistant'`);
    return { ...message };
  });
}

const compiled = new Map();

/** The compiled template; one that does not parse is the package's fault (E_MANIFEST). */
export function compileTemplate(template) {
  let found = compiled.get(template);
  if (found) return found;
  try {
    found = new Template(template);
  } catch (err) {
    throw new PackageError(`the package's chat_template is not a valid Jinja template (${err.message}); re-export ` +
      'the package from a model with a working template', { code: 'E_MANIFEST' });
  }
  if (compiled.size >= 8) compiled.delete(compiled.keys().next().value);
  compiled.set(template, found);
  return found;
}

/**
 * The template rendered for `messages` (checked by checkMessages).
 * @param {string} template
 * @param {Record<string, string>[]} messages
 * @param {{addGenerationPrompt: boolean, variables: Record<string, string>}} options
 * @returns {string}
 */
export function render(template, messages, { addGenerationPrompt, variables }) {
  const compiledTemplate = compileTemplate(template);
  try {
    return compiledTemplate.render({
      ...variables, messages, add_generation_prompt: addGenerationPrompt, tools: null, documents: null,
    });
  } catch (err) { // raise_exception(...) of the template
    throw new InputError(`the package's chat template refused the conversation: ${err.message}`);
  }
}

/**
 * `bos_token`, `eos_token`, ...: the manifest's `chat_tokens` (the tokenizer's names, as
 * transformers passes them), else the token of each role the package has (id >= 0).
 * @param {Record<string, number>} specialTokens
 * @param {(id: number) => string | null} idToToken
 * @param {Record<string, string>} [chatTokens]
 */
export function specialTokenVariables(specialTokens, idToToken, chatTokens = {}) {
  const out = {};
  for (const role of ROLES_AS_VARIABLES) {
    const id = Number.isInteger(specialTokens[role]) ? specialTokens[role] : -1;
    const token = id >= 0 ? idToToken(id) : null;
    if (token !== null) out[`${role}_token`] = token;
  }
  return { ...out, ...chatTokens };
}
