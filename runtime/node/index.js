/**
 * onnxformer for Node.js: run onnxformer packages with onnxruntime-node and tokenizers.
 *
 *     import { load } from 'onnxformer';   // or './runtime/node/index.js'
 *     const model = await load('artifacts/decoder');
 *     const [out] = await model.generate('twelve', { max_new_tokens: 8 });
 *     console.log(out.text);
 *
 * The package format is specified in runtime/FORMAT.md.
 *
 * @module onnxformer
 */

export { ROLES_AS_VARIABLES, checkMessages, render as renderChatTemplate, specialTokenVariables } from './chat.js';
export { CODES, ConfigError, InputError, OnnxformerError, PackageError, ProviderError, RunError } from './errors.js';
export { DEFAULTS as GENERATION_DEFAULTS, STRATEGIES, checkParameters, generationConfig, resolveConfig } from './generation.js';
export { FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, manifestFromDict } from './manifest.js';
export { MAX_SEQUENCES_PER_PROMPT, Model, UNKNOWN_WARNING, load } from './model.js';
export { Random } from './random.js';
export { TRUSTED_STORES_ENV } from './safety.js';
export { checkExternalData, externalDataRefs, loadManifest, positionTables, trustedRoots, verifyFiles } from './host_node.js';
export { ConcatSteps, SharedSteps } from './session.js';
export { StepResult } from './steps.js';
