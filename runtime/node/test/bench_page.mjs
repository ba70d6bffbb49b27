// Figures for the README: in headless Chromium, each package's load time (manifest, downloads,
// checksums, sessions) and greedy decode speed (NEW tokens after a short prompt, the second of
// two runs). Usage: node test/bench_page.mjs URL QUERY NEW  (QUERY e.g. "threads=1")
import { chromium } from 'playwright-core';

const [url, query, n] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  await page.goto(`${url}?${query}`);
  await page.waitForFunction(() => window.loaded !== undefined);
  const result = await page.evaluate(async (newTokens) => {
    const loaded = await window.loaded;
    const out = { threads: window.onnxformer.ort.env.wasm.numThreads, isolated: crossOriginIsolated, models: {} };
    for (const { name, seconds } of loaded) {
      const m = window.models[name];
      const r = { load_s: seconds };
      if (m.canGenerate) {
        const prompt = [(await m.encode(['twelve']))[0]];
        const options = { max_new_tokens: newTokens, min_new_tokens: newTokens };
        await m.generateIds(prompt, options);
        const start = performance.now();
        const [g] = await m.generateIds(prompt, options);
        r.tok_s = g.token_ids[0].length / ((performance.now() - start) / 1000);
      }
      out.models[name] = r;
    }
    return out;
  }, Number(n));
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
