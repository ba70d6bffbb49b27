#!/usr/bin/env node
/**
 * The Node.js command line, the same subcommands and output as the Python `onnxformer` CLI:
 *
 *     node runtime/node/cli.js generate PACKAGE "prompt" [--max-new-tokens N] [--json] ...
 *     node runtime/node/cli.js classify PACKAGE "text" ... [--json]
 *     node runtime/node/cli.js embed PACKAGE "text" ... [--pooling mean|cls] [--json]
 *     node runtime/node/cli.js generate PACKAGE --chat "a user message" [--system TEXT] [--render]
 *     node runtime/node/cli.js generate PACKAGE --messages '[{"role": "user", "content": "hi"}]'
 *
 * Texts come from the arguments or, when none are given, from standard input (one per line).
 * An error onnxformer raises on purpose prints `error[CODE]: <message>` on stderr (the codes of
 * errors.js, the Python CLI's) and exits with status 2; a usage error prints the usage and
 * `error: <message>` (status 2); anything else is a bug and ends with its stack trace.
 */

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { OnnxformerError, InputError } from './errors.js';
import { UNKNOWN_WARNING, load } from './model.js';

const USAGE = `usage: node cli.js {generate,classify,embed} PACKAGE [TEXT ...] [options]

common options:
  --json                      print JSON for scripts
  --provider {cpu,cuda}       onnxruntime execution provider (default cpu)
  --threads N                 intra-op threads (default: onnxruntime's choice)
  --trust-store PATH          allow the package's files to be links into this content store (repeatable)
  --truncate                  truncate inputs longer than the model's maximum
  --version                   print the version and exit

generate:
  --strategy {greedy,sample,beam}   decoding strategy (default: the package's, greedy)
  --max-new-tokens N, --min-new-tokens N
  --temperature X, --top-k N, --top-p X, --seed N      sampling
  --num-beams N, --length-penalty X                    beam search
  --num-return-sequences N, --repetition-penalty X, --no-repeat-ngram-size N
  --stop STRING               stop at this string (repeatable)
  --stream                    print text as it is generated (one prompt)
  --raw                       send prompts exactly as given, without the package's prompt format

generate, chat (packages with a chat template, e.g. Hugging Face chat models):
  --chat                      send each TEXT as a user message in the package's chat template (one conversation each)
  --system TEXT               with --chat: a system message before each
  --messages JSON|FILE        one conversation: a JSON array of {"role": ..., "content": ...} messages, inline
                              (starting with '[') or in a file ('-': stdin); implies --chat
  --render                    print the rendered chat prompt (with --json, its token ids too) instead of generating

embed:
  --pooling {mean,cls}        how to pool token states (default: the package's, else mean)
  --normalize, --no-normalize L2-normalise the embeddings or not (default: the package's, else yes)`;

/** CLI flag -> [generation parameter, kind]. */
const GENERATION_FLAGS = {
  strategy: ['strategy', 'string'],
  'max-new-tokens': ['max_new_tokens', 'int'],
  'min-new-tokens': ['min_new_tokens', 'int'],
  temperature: ['temperature', 'float'],
  'top-k': ['top_k', 'int'],
  'top-p': ['top_p', 'float'],
  seed: ['seed', 'int'],
  'num-beams': ['num_beams', 'int'],
  'length-penalty': ['length_penalty', 'float'],
  'num-return-sequences': ['num_return_sequences', 'int'],
  'repetition-penalty': ['repetition_penalty', 'float'],
  'no-repeat-ngram-size': ['no_repeat_ngram_size', 'int'],
};

class UsageError extends Error {}

function number(flag, text, kind) {
  const ok = kind === 'int' ? /^[+-]?\d+$/.test(text) : text.trim() !== '' && Number.isFinite(Number(text));
  if (!ok) throw new UsageError(`argument --${flag}: invalid ${kind} value: '${text}'`);
  return Number(text);
}

function parse(argv) {
  const options = {
    json: { type: 'boolean' },
    provider: { type: 'string', default: 'cpu' },
    threads: { type: 'string' },
    'trust-store': { type: 'string', multiple: true },
    truncate: { type: 'boolean' },
    stop: { type: 'string', multiple: true },
    stream: { type: 'boolean' },
    raw: { type: 'boolean' },
    pooling: { type: 'string' },
    normalize: { type: 'boolean' },
    'no-normalize': { type: 'boolean' },
    chat: { type: 'boolean' },
    system: { type: 'string' },
    messages: { type: 'string' },
    render: { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
    version: { type: 'boolean' },
  };
  for (const flag of Object.keys(GENERATION_FLAGS)) options[flag] = { type: 'string' };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const { values, positionals } = parsed;
  if (values.help) return { help: true };
  if (values.version) return { version: true };
  const [command, pkg, ...texts] = positionals;
  if (!['generate', 'classify', 'embed'].includes(command)) {
    throw new UsageError(`the first argument must be generate, classify or embed; got ${command === undefined ? 'nothing' : `'${command}'`}`);
  }
  if (!pkg) throw new UsageError('the package directory is required');
  if (!['cpu', 'cuda'].includes(values.provider)) throw new UsageError(`argument --provider: invalid choice: '${values.provider}'`);
  if (values.pooling !== undefined && !['mean', 'cls'].includes(values.pooling)) {
    throw new UsageError(`argument --pooling: invalid choice: '${values.pooling}'`);
  }
  if (values.normalize && values['no-normalize']) throw new UsageError('argument --no-normalize: not allowed with argument --normalize');
  const params = {};
  for (const [flag, [name, kind]] of Object.entries(GENERATION_FLAGS)) {
    if (values[flag] !== undefined) params[name] = kind === 'string' ? values[flag] : number(flag, values[flag], kind);
  }
  if (values.stop) params.stop_strings = values.stop;
  if ((params.num_beams ?? 1) > 1 && params.strategy === undefined) params.strategy = 'beam';
  const threads = values.threads === undefined ? undefined : number('threads', values.threads, 'int');
  return { command, pkg, texts, values, params, threads };
}

/** All of stdin as text; invalid UTF-8 is an InputError (as in Python), never U+FFFD. */
function stdinText() {
  const bytes = readFileSync(0);
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    const at = firstInvalidUtf8(bytes);
    throw new InputError(`stdin is not valid UTF-8 (invalid byte at byte ${at}); pipe UTF-8 text, one input per line`);
  }
}

/** The offset of the first byte where `bytes` stops being valid UTF-8. */
function firstInvalidUtf8(bytes) {
  const decoder = new TextDecoder('utf-8', { fatal: true });
  let lo = 0;
  let hi = bytes.length; // the invariant: bytes[0, lo) decodes (up to a cut character), [0, hi) does not
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    try {
      decoder.decode(bytes.subarray(0, mid), { stream: true });
      lo = mid;
    } catch {
      hi = mid;
    }
    decoder.decode(); // reset
  }
  return lo;
}

function readTexts(texts) {
  if (texts.length) return texts;
  if (process.stdin.isTTY) throw new InputError('no input texts: pass them as arguments or pipe them on stdin (one per line)');
  // A line ends at \n; a \r before it (Windows line endings) is no part of the text.
  const lines = stdinText().split('\n').map((line) => line.replace(/\r$/, '')).filter((line) => line.trim());
  if (!lines.length) throw new InputError('stdin had no non-empty lines; pass at least one text');
  return lines;
}

/** On stderr, for each text mostly unknown to the tokenizer: what it means and what to do (as in Python). */
function warnUnknown(fractions, consequence) {
  fractions.forEach((share, i) => {
    if (share > UNKNOWN_WARNING) {
      process.stderr.write(`warning: text ${i}: ${Math.round(share * 100)}% of its tokens are unknown to this model's ` +
        'tokenizer (characters or words never seen in training: another script, emoji, other casing); ' +
        `${consequence}. Write the text the way the training data is written, or fine-tune the model on text like it.\n`);
    }
  });
}

/** The conversations of `generate --chat` / `--messages` (checked again by the model), as in Python. */
function conversations(texts, values) {
  if (values.raw || values.truncate) {
    throw new InputError(`${values.raw ? '--raw' : '--truncate'} does not apply to a chat: a conversation is sent as ` +
      'its template renders it; drop it');
  }
  if (values.messages === undefined) {
    const system = values.system === undefined ? [] : [{ role: 'system', content: values.system }];
    return readTexts(texts).map((text) => [...system, { role: 'user', content: text }]);
  }
  if (texts.length || values.system !== undefined) {
    throw new InputError('--messages holds the whole conversation; pass no TEXT and no --system with it');
  }
  let source = values.messages;
  if (!source.trimStart().startsWith('[')) {
    try {
      source = source === '-' ? stdinText() : new TextDecoder('utf-8', { fatal: true }).decode(readFileSync(source));
    } catch (err) {
      if (err instanceof OnnxformerError) throw err;
      throw new InputError(`--messages '${values.messages}': cannot read it (${err.code ?? err.message}); pass a JSON ` +
        'array inline or the path of a UTF-8 JSON file');
    }
  }
  try {
    return [JSON.parse(source)];
  } catch (err) {
    throw new InputError(`--messages is not valid JSON (${err.message}); pass an array such as [{"role": "user", "content": "hi"}]`);
  }
}

function printGenerations(results, json, print) {
  if (json) {
    print(JSON.stringify(results.map(({ prompt, texts: t, token_ids, scores, finish_reasons }) => (
      { prompt, texts: t, token_ids, scores, finish_reasons }))));
  } else {
    for (const r of results) for (const text of r.texts) print(text);
  }
}

async function chat(model, texts, values, params, print) {
  const convs = conversations(texts, values);
  if (values.render) {
    const prompts = [];
    for (const messages of convs) prompts.push(await model.renderChat(messages));
    if (values.json) print(JSON.stringify(prompts.map((p, i) => ({ messages: convs[i], text: p.text, token_ids: p.token_ids }))));
    else prompts.forEach((p) => print(p.text));
    return;
  }
  if (values.stream) {
    if (convs.length !== 1) throw new InputError(`--stream takes one conversation; got ${convs.length}. Pass one, or drop --stream`);
    for await (const piece of await model.streamChat(convs[0], params)) process.stdout.write(piece);
    print('');
    return;
  }
  const results = [];
  for (const messages of convs) results.push(await model.chat(messages, params));
  printGenerations(results, values.json, print);
}

async function run({ command, pkg, texts, values, params, threads }) {
  const isChat = command === 'generate' && (values.chat || values.messages !== undefined);
  if (command === 'generate' && !isChat && (values.system !== undefined || values.render)) {
    throw new InputError(`${values.system !== undefined ? '--system' : '--render'} applies to a chat; add --chat ` +
      '(each TEXT a user message) or --messages');
  }
  if (!isChat) texts = readTexts(texts);
  const model = await load(pkg, { provider: values.provider, threads, trustedRoots: values['trust-store'] });
  const truncate = Boolean(values.truncate);
  const raw = Boolean(values.raw);
  const print = (text) => process.stdout.write(`${text}\n`);
  if (command === 'classify') {
    const results = await model.classify(texts, { truncate });
    if (values.json) print(JSON.stringify(results.map((r, i) => ({ text: texts[i], ...r }))));
    else {
      results.forEach((r, i) => print(`${r.label}\t${r.score.toFixed(4)}\t${texts[i]}`));
      warnUnknown(results.map((r) => r.unknown_fraction), 'its label is a guess');
    }
  } else if (command === 'embed') {
    const normalize = values.normalize ? true : values['no-normalize'] ? false : undefined;
    const options = { truncate, ...(values.pooling && { pooling: values.pooling }), ...(normalize !== undefined && { normalize }) };
    const vectors = await model.embed(texts, options);
    const unknown = await model.unknownFractions(texts);
    if (values.json) {
      print(JSON.stringify(vectors.map((v, i) => (
        { text: texts[i], embedding: Array.from(v, (x) => Number(x.toFixed(6))), unknown_fraction: unknown[i] }))));
    } else {
      vectors.forEach((v) => print(Array.from(v, (x) => x.toFixed(6)).join(' ')));
      warnUnknown(unknown, 'its embedding says little about it');
    }
  } else if (isChat) {
    await chat(model, texts, values, params, print);
  } else if (values.stream) {
    if (texts.length !== 1) throw new InputError(`--stream takes one prompt; got ${texts.length}. Pass one, or drop --stream`);
    for await (const piece of await model.stream(texts[0], { ...params, truncate, raw })) process.stdout.write(piece);
    print('');
  } else {
    printGenerations(await model.generate(texts, { ...params, truncate, raw }), values.json, print);
  }
  await model.release();
}

async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`${USAGE}\n\nerror: ${err.message}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (args.version) { // package.json's version, as `onnxformer --version` prints pyproject's
    const { version } = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'));
    process.stdout.write(`onnxformer ${version}\n`);
    return 0;
  }
  try {
    await run(args);
    return 0;
  } catch (err) {
    if (!(err instanceof OnnxformerError)) throw err;
    process.stderr.write(`error[${err.code}]: ${err.message}\n`);
    return 2;
  }
}

process.exitCode = await main(process.argv.slice(2));
