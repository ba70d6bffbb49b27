/**
 * onnxformer in browsers: the same runtime as index.js with the browser host (host_web.js:
 * fetch, SubtleCrypto, onnxruntime-web, Tokenizers.js). A page maps `#host` to host_web.js in
 * its import map (web/index.html does).
 *
 *     import { load } from './rt/web.js';
 *     const model = await load('packages/decoder/', { onProgress: ({file, loaded, total}) => {} });
 *
 * @module onnxformer/web
 */

export { CODES, ConfigError, InputError, OnnxformerError, PackageError, ProviderError, RunError } from './errors.js';
export { DEFAULTS as GENERATION_DEFAULTS, STRATEGIES } from './generation.js';
export { FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, manifestFromDict } from './manifest.js';
export { Model, load } from './model.js';
export { DEFAULT_MEMORY_LIMIT, HOST, PROVIDERS, ort } from '#host';
