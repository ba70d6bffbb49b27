// Drive the page in Debian's headless Chromium (playwright-core, no browser download): load
// every package the server lists, run greedy generation / classify / embed in the page and
// print the results as JSON for tests/test_browser.py to compare with the Python runtime.
// Usage: node test/browser_check.mjs URL PROMPTS_JSON TEXTS_JSON [SCREENSHOT.png]
import { chromium } from 'playwright-core';

const [url, promptsJson, textsJson, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  await page.goto(url);
  const result = await page.evaluate(async ({ prompts, texts }) => {
    const loaded = await window.loaded;
    const out = { loaded, isolated: crossOriginIsolated, models: {} };
    for (const [name, m] of Object.entries(window.models)) {
      const r = { kv_cache: m.manifest.kv_cache ?? null };
      if (m.canGenerate) r.greedy = (await m.generate(prompts, { max_new_tokens: 8 })).map((g) => g.token_ids[0]);
      if (m.canClassify) r.classify = (await m.classify(texts)).map((c) => c.probabilities);
      if (!m.canGenerate || m.arch === 'encoder-decoder') r.embed = (await m.embed(texts)).map((v) => Array.from(v));
      out.models[name] = r;
    }
    return out;
  }, { prompts: JSON.parse(promptsJson), texts: JSON.parse(textsJson) });
  const bad = await browser.newPage();
  await bad.goto(`${url}?package=packages/no-such-package/`);
  result.missing = await bad.evaluate(async () => { await window.loaded; return document.querySelector('.error')?.textContent ?? null; });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
