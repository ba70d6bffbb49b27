/**
 * Errors raised by the onnxformer Node.js runtime: the classes of the Python error tree
 * (`runtime/errors.py`), each error with a stable `code` from the same CODES table. For the
 * same condition both runtimes raise the same class and code; the messages are each
 * runtime's own (written for JavaScript here), so code against `err.code`, never the text.
 *
 *     OnnxformerError      E_ONNXFORMER   (never raised itself)
 *     ├── PackageError     E_PACKAGE      bad, missing or damaged package
 *     ├── InputError       E_INPUT        bad input to a call (texts, token ids, lengths)
 *     ├── ConfigError      E_CONFIG       bad or contradictory parameters
 *     ├── ProviderError    E_PROVIDER     execution provider unavailable or failing to start
 *     ├── RunError         E_RUN          onnxruntime failed while running a graph
 *     ├── DataError        E_DATA         (training: Python only)
 *     ├── CheckpointError  E_CHECKPOINT   (training: Python only)
 *     ├── TrainingError    E_TRAINING     (training: Python only)
 *     └── ExportError      E_EXPORT       (export: Python only)
 *         └── ValidationError  E_VALIDATION
 *
 * @module errors
 */

import { inspect } from '#host';

/**
 * Every code an error may carry, with what it means: Python's `CODES`, entry for entry (a test
 * checks), so a code means one thing in both runtimes.
 * @type {Readonly<Record<string, string>>}
 */
export const CODES = Object.freeze({
  E_ONNXFORMER: 'an onnxformer error without a finer code',
  // packages
  E_PACKAGE: 'the package is missing, incomplete or damaged',
  E_MANIFEST: 'manifest.json is missing, unreadable or breaks the format (runtime/FORMAT.md)',
  E_FORMAT_VERSION: 'the package was written for another format version',
  E_CHECKSUM: "a package file's size or sha256 differs from the manifest",
  E_MISSING_FILE: 'a file the manifest lists is not in the package, or a package, checkpoint or run directory does not exist',
  E_EXTERNAL_DATA: "a graph's external-data reference is unsafe or does not match the manifest",
  E_GRAPH: 'onnxruntime could not load a graph file',
  E_GRAPH_IO: "a graph's inputs or outputs break the I/O contract",
  E_TOKENIZER: 'the tokenizer is unreadable or does not belong to the model',
  E_WRONG_KIND: 'the call needs another kind of package (e.g. classify on a decoder)',
  E_RELEASED: 'a model used after release() (Node; Python frees sessions when the model is dropped)',
  // inputs and parameters
  E_INPUT: 'bad input to a call',
  E_TOO_LONG: 'an input is longer than the model takes',
  E_TOKEN_ID: 'a token id that is not an integer, negative, or outside the vocabulary',
  E_CONFIG: 'a bad or contradictory parameter',
  E_UNKNOWN_PARAMETER: 'a parameter name that does not exist',
  // running
  E_PROVIDER: 'the execution provider is unavailable or failed to start',
  E_RUN: 'onnxruntime failed while running a graph',
  // training
  E_DATA: 'training data that cannot be read or used',
  E_CHECKPOINT: 'a checkpoint or run directory that cannot be used',
  E_LOCKED: 'another process holds the directory',
  E_TRAINING: 'a training run that cannot go on',
  E_NOT_FINITE: 'a loss or weights that are NaN or infinite',
  // export
  E_EXPORT: 'a model that cannot be exported as asked',
  E_UNSUPPORTED: 'a model feature the chosen graph producer does not implement',
  E_VALIDATION: 'an exported graph disagrees with PyTorch beyond its tolerance',
  E_DISK: 'a file could not be written (disk full, permissions, a file in the way)',
  // serving (onnxformer serve)
  E_NOT_FOUND: 'an unknown model name or route of the server',
  E_UNAUTHORIZED: 'a missing or wrong API key',
  E_BUSY: "the server's queue is full or it is shutting down: retry later",
});

/** Base class of every error onnxformer raises on purpose; `code` is stable. */
export class OnnxformerError extends Error {
  static defaultCode = 'E_ONNXFORMER';

  /**
   * @param {string} message  the problem, the offending value and, where there is one, the fix
   * @param {{code?: string, cause?: unknown}} [options]  a code finer than the class's default
   */
  constructor(message, { code, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    const chosen = code ?? new.target.defaultCode;
    if (!Object.hasOwn(CODES, chosen)) { // a typo in our own code: fail loudly
      throw new Error(`unknown error code ${inspect(chosen)}; add it to CODES in runtime/errors.py and errors.js`);
    }
    this.name = new.target.name;
    /** @type {string} */
    this.code = chosen;
  }
}

/** The package is missing, incomplete or damaged, or a graph breaks the I/O contract. */
export class PackageError extends OnnxformerError {
  static defaultCode = 'E_PACKAGE';
}

/** The caller passed input the model cannot take (empty prompt, token id out of range...). */
export class InputError extends OnnxformerError {
  static defaultCode = 'E_INPUT';
}

/** A parameter is invalid or parameters contradict each other. */
export class ConfigError extends OnnxformerError {
  static defaultCode = 'E_CONFIG';
}

/** An onnxruntime execution provider is not available or could not be initialised. */
export class ProviderError extends OnnxformerError {
  static defaultCode = 'E_PROVIDER';
}

/** onnxruntime failed while running a graph that loaded. */
export class RunError extends OnnxformerError {
  static defaultCode = 'E_RUN';
}

/** Training data that cannot be read or used (Python's training; here for a complete tree). */
export class DataError extends OnnxformerError {
  static defaultCode = 'E_DATA';
}

/** A checkpoint or run directory that cannot be used (Python's training). */
export class CheckpointError extends OnnxformerError {
  static defaultCode = 'E_CHECKPOINT';
}

/** A training run that cannot go on (Python's training). */
export class TrainingError extends OnnxformerError {
  static defaultCode = 'E_TRAINING';
}

/** A model that cannot be exported as asked (Python's export). */
export class ExportError extends OnnxformerError {
  static defaultCode = 'E_EXPORT';
}

/** An exported graph disagrees with PyTorch beyond its tolerance (Python's export). */
export class ValidationError extends ExportError {
  static defaultCode = 'E_VALIDATION';
}

/**
 * A value as a message shows it: strings quoted, arrays and objects in brief.
 * @param {unknown} value
 * @returns {string}
 */
export function show(value) {
  return inspect(value, { depth: 2, maxArrayLength: 8, maxStringLength: 80, breakLength: Infinity });
}

/**
 * The kind of a value for messages: `string`, `number`, `null`, `array`, `object`...
 * @param {unknown} value
 * @returns {string}
 */
export function typeOf(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}
