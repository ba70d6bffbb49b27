/**
 * The Node host: files from a package directory (node:fs), sessions from onnxruntime-node,
 * the tokenizer through the native `tokenizers` binding. The rest of the runtime is the same
 * source in Node and in browsers (host_web.js); `#host` (package.json "imports") picks this
 * module in Node, a page's import map picks host_web.js.
 *
 * A host offers `ort`, `PROVIDERS`, `resolveProvider(provider)`, `inspect(value, options)` and
 * `openSource(location, options)` → a package source: `name`, `location`, `manifestData()`,
 * `plan(manifest)` (refuse what cannot fit before reading), `verify(manifest)`, `graphBytes(file)`, `checkExternalData(graphFile, refs)`,
 * `tokenizer(file)`, `sessionInput(entry)`, `done()`.
 *
 * @module host_node
 */

import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { inspect as nodeInspect } from 'node:util';

import ort from 'onnxruntime-node';

import { InputError, PackageError, ProviderError, show, typeOf } from './errors.js';
import { MANIFEST_FILE, checkDigest, checkSize, manifestFiles, manifestFromDict } from './manifest.js';
import {
  TRUSTED_STORES_ENV, TRUST_ADVICE, checkExternalRefs, externalDataRefsOf, externalWhat, positionTablesOf,
} from './safety.js';
import { PackageTokenizer } from './tokenizer.js';

export { ort };

/** Whether a preallocated output tensor is written in place (the shared KV cache, session.js). */
export const PREALLOCATED_OUTPUTS = true;
export const PROVIDERS = ['cpu', 'cuda'];
export const HOST = 'node';

/** util.inspect, for values in messages. */
export function inspect(value, options) {
  return nodeInspect(value, options);
}

/**
 * "cpu" or "cuda" (also "CUDAExecutionProvider"); checked before anything is loaded.
 * @param {string} provider
 * @returns {string}
 */
export function resolveProvider(provider) {
  const key = (provider || 'cpu').toLowerCase().replace(/executionprovider$/, '');
  if (!PROVIDERS.includes(key)) {
    throw new ProviderError(`provider must be one of ${PROVIDERS.join(', ')}, not ${show(provider)}`);
  }
  const available = ort.listSupportedBackends().map((b) => b.name);
  if (!available.includes(key)) {
    throw new ProviderError(
      `provider '${key}' is not available in this onnxruntime-node build (available: ${available.join(', ')}); ` +
        "use provider 'cpu'",
    );
  }
  return key;
}

/** A directory path normalised, without a trailing separator (as load() keeps it). */
export function displayDir(directory) {
  const normal = path.normalize(directory);
  return normal.length > 1 && normal.endsWith(path.sep) ? normal.slice(0, -1) : normal;
}

/** The manifest's JSON of `<directory>/manifest.json`; a missing directory or file is a PackageError. */
async function manifestData(dir) {
  const stat = await fs.stat(dir).catch(() => null);
  if (!stat?.isDirectory()) {
    throw new PackageError(`no package directory at ${dir}: check the path`, { code: 'E_MISSING_FILE' });
  }
  const file = path.join(dir, MANIFEST_FILE);
  const text = await fs.readFile(file, 'utf8').catch(() => null);
  if (text === null) {
    throw new PackageError(`${dir} has no readable ${MANIFEST_FILE}: it is not an onnxformer package`, { code: 'E_MANIFEST' });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new PackageError(`${file} is not valid JSON (${err.message})`, { code: 'E_MANIFEST' });
  }
}

/**
 * Read and check `<directory>/manifest.json`.
 * @param {string} directory
 * @returns {Promise<Readonly<import('./manifest.js').Manifest>>}
 */
export async function loadManifest(directory) {
  return manifestFromDict(await manifestData(displayDir(directory)));
}

/** @param {string} file @returns {Promise<string>} hex sha256 */
export async function sha256File(file) {
  const digest = createHash('sha256');
  for await (const chunk of createReadStream(file)) digest.update(chunk);
  return digest.digest('hex');
}

/**
 * Every listed file exists inside the package and matches its size and sha256.
 * @param {import('./manifest.js').Manifest} manifest
 * @param {string} directory
 */
export async function verifyFiles(manifest, directory, roots = []) {
  const dir = await fs.realpath(directory);
  for (const entry of manifestFiles(manifest)) {
    const file = path.join(dir, entry.file);
    const stat = await fs.stat(file).catch(() => null);
    const real = stat ? await fs.realpath(file) : null;
    if (stat && !insidePackage(real, dir, roots)) {
      throw new PackageError(`package file '${entry.file}' leads outside the package directory, to ${real}; refused. ${TRUST_ADVICE}`);
    }
    if (!stat?.isFile()) {
      throw new PackageError(`package file '${entry.file}' is not in ${dir}; re-export the package`, { code: 'E_MISSING_FILE' });
    }
    checkSize(entry, stat.size);
    checkDigest(entry, await sha256File(file));
  }
}

/**
 * The bytes of the graph file at `file`; an unreadable one is PackageError E_GRAPH.
 * @param {string} file
 * @returns {Promise<Uint8Array>}
 */
async function readGraph(file) {
  try {
    return await fs.readFile(file);
  } catch (err) {
    throw new PackageError(`cannot read graph file ${file}: ${err.message}`, { code: 'E_GRAPH', cause: err });
  }
}

/**
 * Every external-data `location` in the ONNX file at `file`.
 * @param {string} file
 */
export async function externalDataRefs(file) {
  return externalDataRefsOf(await readGraph(file), path.basename(file));
}

/**
 * Position table name -> the positions it holds (its first dim), for the graph at `file`.
 * @param {string} file
 * @returns {Promise<Record<string, number>>}
 */
export async function positionTables(file) {
  return positionTablesOf(await readGraph(file), path.basename(file));
}

/**
 * The real paths of the directories a package's links may lead into: `given` (an array of
 * paths) and those in ONNXFORMER_TRUSTED_STORES. Each must be an existing directory.
 * @param {string[] | undefined} given
 * @returns {Promise<string[]>}
 */
export async function trustedRoots(given) {
  if (given === undefined || given === null) given = [];
  if (!Array.isArray(given)) {
    throw new InputError(`trustedRoots must be an array of directory paths, not ${typeof given} (${String(given).slice(0, 60)}). ` +
      "Pass e.g. { trustedRoots: ['~/.cache/huggingface/hub'] }");
  }
  const env = (process.env[TRUSTED_STORES_ENV] ?? '').split(path.delimiter).filter(Boolean);
  const roots = [];
  for (const [root, source] of [...given.map((r) => [r, 'trustedRoots']), ...env.map((r) => [r, TRUSTED_STORES_ENV])]) {
    if (typeof root !== 'string') throw new InputError(`${source} entries must be paths, not ${typeof root} (${String(root).slice(0, 60)})`);
    const expanded = root === '~' || root.startsWith('~/') ? path.join(process.env.HOME ?? '', root.slice(1)) : root;
    const stat = await fs.stat(expanded).catch(() => null);
    if (!stat?.isDirectory()) {
      throw new InputError(`${source}: '${root}' is not a directory; pass an existing content store directory`);
    }
    roots.push(await fs.realpath(expanded));
  }
  return roots;
}

/** A package file, links followed (`resolved`), lies directly in `directory` or under a trusted root. */
export function insidePackage(resolved, directory, roots = []) {
  return path.dirname(resolved) === directory ||
    roots.some((root) => resolved === root || resolved.startsWith(root.endsWith(path.sep) ? root : root + path.sep));
}

/**
 * A path with every link followed, also where the target does not exist (Python's
 * `Path.resolve()`, not strict): a dangling link resolves to where it points.
 * @param {string} file  absolute
 */
async function resolveLoose(file, hops = 0) {
  try {
    return await fs.realpath(file);
  } catch {
    const parent = await fs.realpath(path.dirname(file)).catch(() => path.dirname(file));
    const here = path.join(parent, path.basename(file));
    const stat = await fs.lstat(here).catch(() => null);
    if (!stat?.isSymbolicLink() || hops >= 40) return here; // missing (the file checks report it), or a loop
    return resolveLoose(path.resolve(parent, await fs.readlink(here)), hops + 1);
  }
}

/** Rule 3 of FORMAT.md 2.5: each reference, links followed, stays inside the package (or a trusted store). */
async function checkLinks(graphPath, refs, roots) {
  const directory = await fs.realpath(path.dirname(graphPath));
  for (const ref of refs) {
    if (!insidePackage(await resolveLoose(path.join(directory, ref.location)), directory, roots)) {
      throw new PackageError(
        `${externalWhat(path.basename(graphPath), ref)}, which is a link leading outside the package directory; refused. ` +
          `A package may only reference files in its own directory. ${TRUST_ADVICE}`,
        { code: 'E_EXTERNAL_DATA' },
      );
    }
  }
}

/**
 * Refuse a graph whose external data is not a listed file inside its own directory.
 * @param {string} graphPath  the graph file
 * @param {Iterable<string>} allowed  the external-data file names the manifest lists for this graph
 * @param {string[]} [roots]  trusted content stores (`trustedRoots`): a link into one counts as inside
 */
export async function checkExternalData(graphPath, allowed, roots = []) {
  const refs = await externalDataRefs(graphPath);
  checkExternalRefs(refs, path.basename(graphPath), allowed);
  await checkLinks(graphPath, refs, roots);
  return refs;
}

/**
 * A package directory as a source for load().
 * @param {string} location  the directory
 * @param {{trustedRoots?: string[]}} options
 */
export async function openSource(location, { trustedRoots: given } = {}) {
  if (typeof location !== 'string') throw new PackageError(`packageDir must be a path string, not ${typeOf(location)}`);
  const directory = displayDir(location);
  const roots = await trustedRoots(given);
  return {
    location: directory,
    name: path.basename(directory),
    manifestData: () => manifestData(directory),
    verify: (manifest) => verifyFiles(manifest, directory, roots),
    graphBytes: (file) => readGraph(path.join(directory, file)),
    checkExternalData: (file, refs) => checkLinks(path.join(directory, file), refs, roots),
    plan() {},
    tokenizer: async (file) => PackageTokenizer.fromPackage(directory, file),
    sessionInput: async (entry) => ({ model: path.join(directory, entry.file.file) }),
    done() {},
  };
}
