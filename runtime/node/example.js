// A runnable tour of the Node.js runtime:  node runtime/node/example.js PACKAGE_DIR
import { InputError, load } from './index.js';

if (!process.argv[2]) {
  console.error('usage: node runtime/node/example.js PACKAGE_DIR   (e.g. artifacts/decoder)');
  process.exit(2);
}
const model = await load(process.argv[2]);
console.log(`loaded a ${model.arch} package (vocabulary ${model.dims.vocab_size}, max_seq_len ${model.manifest.max_seq_len})`);

if (model.canGenerate) {
  // Greedy: the same token ids as the Python runtime. Prompts of different lengths are left-padded.
  const results = await model.generate(['twelve', 'three hundred four'], { max_new_tokens: 12 });
  for (const r of results) console.log(`greedy  ${JSON.stringify(r.prompt)} -> ${JSON.stringify(r.text)} (${r.finish_reasons[0]})`);

  // Sampling with a seed: reproducible in Node (not the same numbers as Python's for that seed).
  const [sampled] = await model.generate('twelve', { strategy: 'sample', temperature: 0.8, top_k: 40, top_p: 0.95, seed: 1, max_new_tokens: 12 });
  console.log(`sampled ${JSON.stringify(sampled.text)}`);

  // Streaming: text pieces as they are generated.
  process.stdout.write('stream  ');
  for await (const piece of await model.stream('twelve', { max_new_tokens: 12 })) process.stdout.write(piece);
  process.stdout.write('\n');
}
if (model.canClassify) {
  for (const r of await model.classify(['the food was not good', 'a wonderful film'])) {
    console.log(`classify ${r.label} ${r.score.toFixed(3)}`, r.probabilities);
  }
}
if (model.sessions.encoder) {
  const [a, b] = await model.embed(['a cat sat on the mat', 'a kitten sat on the rug']);
  console.log(`embed   cosine similarity ${a.reduce((s, x, i) => s + x * b[i], 0).toFixed(4)} (dimension ${a.length})`);
}

// Bad input raises the Python runtime's error class with its code (err.code, stable; the
// message is for people).
try {
  await model.generate([]);
} catch (err) {
  if (!(err instanceof InputError)) throw err;
  console.log(`error   ${err.name} ${err.code}: ${err.message}`);
}
await model.release();
