/**
 * The browser host: package files fetched from a URL (the folder that holds manifest.json),
 * checked with SubtleCrypto, sessions from onnxruntime-web (wasm, threaded where the page is
 * cross-origin isolated; WebGPU where `navigator.gpu` exists), the tokenizer through
 * Tokenizers.js (tokenizer_web.js). The same interface as host_node.js; a page's import map
 * sends `#host` here, and onnxruntime-web finds its .wasm files beside its own script, on the
 * page's origin.
 *
 * Memory is planned from the manifest before anything else is downloaded: the bytes are held
 * once by the page and once by onnxruntime's wasm heap, so a package whose files add up to more
 * than half of `memoryLimit` (default 2 GiB: a wasm32 heap holds at most 4 GiB) is refused first.
 *
 * @module host_web
 */

import * as ortModule from 'onnxruntime-web';

import { PackageError, ProviderError, show, typeOf } from './errors.js';
import { MANIFEST_FILE, checkDigest, checkSize, manifestFiles } from './manifest.js';
import { WebTokenizer } from './tokenizer_web.js';

const runtime = ortModule.default ?? ortModule;

// onnxruntime-web starts its wasm runtime inside the first session's creation; sessions created
// side by side during that start gave wrong outputs or failed (Chromium, onnxruntime-web 1.30).
// So creations queue up until one has succeeded; after it they run side by side.
let started = false;
let queue = Promise.resolve();
function createSession(...args) {
  if (started) return runtime.InferenceSession.create(...args);
  const created = queue.then(() => runtime.InferenceSession.create(...args));
  queue = created.then(() => { started = true; }, () => {});
  return created;
}

/** onnxruntime-web, its session creation queued as above. */
export const ort = Object.freeze({ ...runtime, InferenceSession: Object.freeze({ create: createSession }) });
/** Whether a preallocated output tensor is written in place (the shared KV cache, session.js). */
export const PREALLOCATED_OUTPUTS = false;
export const PROVIDERS = ['wasm', 'webgpu'];
export const HOST = 'web';
export const DEFAULT_MEMORY_LIMIT = 2 ** 31;

/** A value for a message. */
export function inspect(value) {
  if (typeof value === 'string') return `'${value.length > 80 ? `${value.slice(0, 80)}…` : value}'`;
  if (typeof value === 'bigint') return `${value}n`;
  try {
    const text = JSON.stringify(value);
    if (text !== undefined) return text.length > 120 ? `${text.slice(0, 120)}…` : text;
  } catch { /* a cycle */ }
  return String(value);
}

/** 'wasm' (also 'cpu') or 'webgpu'; WebGPU only where the browser has it. */
export function resolveProvider(provider) {
  const key = (provider || 'wasm').toLowerCase().replace(/executionprovider$/, '');
  const name = key === 'cpu' ? 'wasm' : key;
  if (!PROVIDERS.includes(name)) {
    throw new ProviderError(`provider must be one of ${PROVIDERS.join(', ')}, not ${show(provider)}`);
  }
  if (name === 'webgpu' && !globalThis.navigator?.gpu) {
    throw new ProviderError("this browser has no WebGPU (navigator.gpu); use provider 'wasm'");
  }
  return name;
}

/** hex sha256 of bytes, by SubtleCrypto. */
export async function sha256Bytes(bytes) {
  const digest = new Uint8Array(await globalThis.crypto.subtle.digest('SHA-256', bytes));
  return [...digest].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** The MB of n bytes, for messages. */
const mb = (n) => `${(n / 2 ** 20).toFixed(1)} MB`;

/**
 * A package URL as a source for load().
 * @param {string} location  the package folder's URL (relative to the page, or absolute)
 * @param {{threads?: number, onProgress?: (p: {file: string, loaded: number, total: number}) => void,
 *          memoryLimit?: number, fetch?: typeof fetch}} options
 */
export async function openSource(location, { threads, onProgress = () => {}, memoryLimit = DEFAULT_MEMORY_LIMIT, fetch: get = globalThis.fetch } = {}) {
  if (typeof location !== 'string') throw new PackageError(`the package URL must be a string, not ${typeOf(location)}`);
  const base = new URL(location.endsWith('/') ? location : `${location}/`, globalThis.location?.href);
  const name = base.pathname.split('/').filter(Boolean).pop() ?? base.href;
  // Threads need SharedArrayBuffer, i.e. a cross-origin isolated page (COOP/COEP headers).
  ort.env.wasm.numThreads = threads || (globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  const files = new Map(); // file name -> bytes, until the sessions are open

  async function download(file, total) {
    const url = new URL(file, base);
    let response;
    try {
      response = await get(url);
    } catch (err) {
      throw new PackageError(`cannot fetch ${url.href}: ${err.message}`, { code: 'E_MISSING_FILE', cause: err });
    }
    if (!response.ok) {
      throw new PackageError(`package file '${file}' is not at ${url.href} (HTTP ${response.status}); check the URL or re-export the package`,
        { code: file === MANIFEST_FILE ? 'E_MANIFEST' : 'E_MISSING_FILE' });
    }
    const chunks = [];
    let loaded = 0;
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      loaded += value.length;
      onProgress({ file, loaded, total: total ?? loaded });
    }
    const bytes = new Uint8Array(loaded);
    let at = 0;
    for (const chunk of chunks) { bytes.set(chunk, at); at += chunk.length; }
    return bytes;
  }

  async function bytesOf(file) {
    if (!files.has(file)) files.set(file, await download(file));
    return files.get(file);
  }

  return {
    location: base.href,
    name,
    async manifestData() {
      const text = new TextDecoder().decode(await download(MANIFEST_FILE));
      try {
        return JSON.parse(text);
      } catch (err) {
        throw new PackageError(`${new URL(MANIFEST_FILE, base).href} is not valid JSON (${err.message})`, { code: 'E_MANIFEST' });
      }
    },
    plan(manifest) {
      const total = manifestFiles(manifest).reduce((sum, entry) => sum + entry.bytes, 0);
      if (2 * total > memoryLimit) {
        throw new PackageError(
          `package ${name} holds ${mb(total)} of files, about ${mb(2 * total)} in this page (the files and onnxruntime's copy), ` +
            `more than its memory limit of ${mb(memoryLimit)}; nothing was downloaded. Use a smaller or quantized package ` +
            '(onnxformer export --quantize int4), or the Node / Python runtime',
          { code: 'E_PACKAGE' },
        );
      }
    },
    async verify(manifest) {
      for (const entry of manifestFiles(manifest)) {
        const bytes = await download(entry.file, entry.bytes);
        checkSize(entry, bytes.length);
        checkDigest(entry, await sha256Bytes(bytes));
        files.set(entry.file, bytes);
      }
    },
    graphBytes: (file) => bytesOf(file),
    async checkExternalData() {}, // a URL has no links: the plain, listed names (safety.js) are the check
    async tokenizer(file) {
      const text = new TextDecoder().decode(await bytesOf(file));
      let json;
      try {
        json = JSON.parse(text);
      } catch (err) {
        throw new PackageError(`tokenizer ${file} is not valid JSON (${err.message}); re-export the package`, { code: 'E_TOKENIZER' });
      }
      return new WebTokenizer(json, file);
    },
    async sessionInput(entry) {
      const externalData = [];
      for (const e of entry.external_data) externalData.push({ path: e.file, data: await bytesOf(e.file) });
      return { model: await bytesOf(entry.file.file), externalData };
    },
    done() {
      files.clear();
    },
  };
}
