// Drive the page in Debian's headless Chromium (playwright-core, no browser download): load
// every package the server lists, run greedy generation / classify / embed in the page, open
// the page on broken packages and type an over-long prompt, and print what the page did as
// JSON for tests/test_browser.py to compare with the Python runtime.
// Usage: node test/browser_check.mjs URL SPEC_JSON [SCREENSHOT.png]
//   SPEC: {prompts, texts, messages, webgpu (the page on provider=webgpu), broken: [package names], long_prompt: {package, text}, chat_ui: {package, text, max_new_tokens}}
import { chromium } from 'playwright-core';

const [url, specJson, screenshot] = process.argv.slice(2);
const spec = JSON.parse(specJson);
// WebGPU without a GPU: Chromium's SwiftShader adapter (Vulkan on the CPU).
const WEBGPU_ARGS = ['--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-angle=swiftshader', '--use-webgpu-adapter=swiftshader'];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox', ...(spec.webgpu ? WEBGPU_ARGS : [])],
});
try {
  const page = await browser.newPage();
  await page.goto(spec.webgpu ? `${url}?provider=webgpu` : url);
  await page.waitForFunction(() => window.loaded !== undefined);
  const result = await page.evaluate(async ({ prompts, texts, messages = [] }) => {
    const loaded = await window.loaded;
    const adapter = await navigator.gpu?.requestAdapter().catch(() => null);
    const out = { loaded, isolated: crossOriginIsolated, adapter: adapter ? adapter.info?.architecture ?? 'yes' : null, models: {} };
    for (const [name, m] of Object.entries(window.models)) {
      const r = { kv_cache: m.manifest.kv_cache ?? null, encode: await m.encode([...prompts, ...texts]) };
      out.models[name] = r;
      try {
      if (m.canGenerate) r.greedy = (await m.generate(prompts, { max_new_tokens: 8 })).map((g) => g.token_ids[0]);
      if (m.canGenerate) {
        r.greedy_alone = [];
        for (const p of prompts) r.greedy_alone.push((await m.generate([p], { max_new_tokens: 8 }))[0].token_ids[0]);
      }
      if (m.chatTemplate !== null) {
        const rendered = await m.renderChat(messages);
        const answer = await m.chat(messages, { max_new_tokens: 8 });
        r.chat = { text: rendered.text, token_ids: rendered.token_ids, answer: answer.token_ids[0], answer_text: answer.text };
      }
      if (m.canClassify) r.classify = (await m.classify(texts)).map((c) => c.probabilities);
      if (!m.canGenerate || m.arch === 'encoder-decoder') r.embed = (await m.embed(texts)).map((v) => Array.from(v));
      } catch (err) {
        r.error = `${err.code ?? ''} ${err.message}`;
      }
    }
    const events = [];
    const again = await window.onnxformer.load('packages/decoder/', { onProgress: (e) => events.push(e) });
    await again.release();
    out.progress = events;
    return out;
  }, spec);
  if (spec.chat_ui) {  // the page's chat button: the streamed answer as a person sees it
    const card = page.locator(`#package-${spec.chat_ui.package}`);
    await card.locator('textarea.prompt').fill(spec.chat_ui.text);
    await card.locator('input.max-new').fill(String(spec.chat_ui.max_new_tokens));
    await card.locator('button.run-generate').click();
    await card.locator('.speed').filter({ hasText: 'tok/s' }).waitFor({ timeout: 30000 });
    result.chat_ui = { button: await card.locator('button.run-generate').textContent(), text: await card.locator('.generated').textContent() };
  }
  if (spec.long_prompt) {
    const card = page.locator(`#package-${spec.long_prompt.package}`);
    await card.locator('textarea.prompt').fill(spec.long_prompt.text);
    await card.locator('button.run-generate').click();
    await card.locator('.generated .error').waitFor({ timeout: 30000 });
    result.long_prompt = await card.locator('.generated .error').textContent();
  }
  result.broken = {};
  for (const name of spec.broken ?? []) {
    const bad = await browser.newPage();
    const requested = [];
    bad.on('request', (request) => requested.push(new URL(request.url()).pathname));
    await bad.goto(`${url}?package=packages/${name}/`);
    await bad.waitForFunction(() => window.loaded !== undefined);
    const text = await bad.evaluate(async () => { await window.loaded; return document.querySelector('.error')?.textContent ?? null; });
    result.broken[name] = { text, requested: requested.filter((p) => p.includes(`/packages/${name}/`)) };
    await bad.close();
  }
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
