/**
 * Errors raised by the onnxformer Node.js runtime, mirroring the Python runtime's
 * (`runtime/errors.py`): same class names, same conditions, same wording where the languages
 * allow it.
 *
 *     OnnxformerError
 *     ├── PackageError   bad, missing or damaged package (manifest, graph files, graph I/O)
 *     ├── InputError     bad user input (prompts, token ids, texts, call on the wrong package kind)
 *     ├── ConfigError    bad generation parameters
 *     └── ProviderError  execution provider unavailable or failing to start
 *
 * @module errors
 */

/** Base class of every error the runtime raises on purpose. */
export class OnnxformerError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The package is missing, incomplete or damaged, or a graph breaks the I/O contract. */
export class PackageError extends OnnxformerError {}

/** The caller passed input the model cannot take (empty prompt, token id out of range...). */
export class InputError extends OnnxformerError {}

/** A generation parameter is invalid or parameters contradict each other. */
export class ConfigError extends OnnxformerError {}

/** An onnxruntime execution provider is not available or could not be initialised. */
export class ProviderError extends OnnxformerError {}
