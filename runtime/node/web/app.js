// The page: load each package (packages.json, or ?package=URL ...), then classify / embed /
// generate / chat in it. Every failure is shown in the page as `error[CODE]: message`.
import * as onnxformer from './rt/web.js';

window.onnxformer = onnxformer;
window.models = {};

const $ = (tag, attrs = {}, ...children) => {
  const el = Object.assign(document.createElement(tag), attrs);
  el.append(...children);
  return el;
};
const describe = (err) => (err instanceof onnxformer.OnnxformerError ? `error[${err.code}]: ${err.message}` : `error: ${err?.message ?? err}`);

function showError(box, err) {
  box.replaceChildren($('div', { className: 'error', textContent: describe(err) }));
}

async function packageList() {
  const given = new URLSearchParams(location.search).getAll('package');
  if (given.length) return given.map((url) => ({ name: url.split('/').filter(Boolean).pop(), url }));
  const response = await fetch('packages.json');
  if (!response.ok) throw new Error('no packages.json beside the page: open it as ?package=URL');
  return response.json();
}

function field(label, input) {
  return $('label', {}, `${label} `, input);
}

function generatePanel(model, card) {
  const prompt = $('textarea', { rows: 2, value: 'twelve', className: 'prompt' });
  const maxNew = $('input', { type: 'number', value: 24, min: 0, className: 'max-new' });
  const strategy = $('select', { className: 'strategy' }, ...['greedy', 'sample'].map((s) => $('option', { value: s, textContent: s })));
  const temperature = $('input', { type: 'number', value: 0.8, step: 0.1, min: 0.05, className: 'temperature' });
  const topP = $('input', { type: 'number', value: 0.95, step: 0.05, min: 0.05, max: 1, className: 'top-p' });
  const seed = $('input', { type: 'number', value: 1, className: 'seed' });
  const out = $('div', { className: 'out generated' });
  const speed = $('div', { className: 'speed' });
  const chat = model.chatTemplate !== null;
  const run = $('button', { textContent: chat ? 'chat' : 'generate', className: 'run-generate' });
  run.onclick = async () => {
    out.textContent = '';
    speed.textContent = '';
    run.disabled = true;
    const options = { max_new_tokens: Number(maxNew.value), strategy: strategy.value };
    if (strategy.value === 'sample') Object.assign(options, { temperature: Number(temperature.value), top_p: Number(topP.value), seed: Number(seed.value) });
    try {
      const start = performance.now();
      let pieces = 0;
      let first = null;
      const stream = chat
        ? await model.streamChat([{ role: 'user', content: prompt.value }], options)
        : await model.stream(prompt.value, options);
      for await (const piece of stream) {
        first ??= performance.now();
        out.textContent += piece;
        pieces += 1;
      }
      const end = performance.now();
      const decode = pieces > 1 ? ((pieces - 1) / ((end - first) / 1000)).toFixed(1) : '-';
      speed.textContent = `${pieces} text pieces in ${((end - start) / 1000).toFixed(2)} s; decode ${decode} tok/s`;
    } catch (err) {
      showError(out, err);
    } finally {
      run.disabled = false;
    }
  };
  card.append(prompt, $('div', {}, field('max new tokens', maxNew), field('strategy', strategy), field('temperature', temperature),
    field('top p', topP), field('seed', seed), run), out, speed);
}

function encoderPanel(model, card) {
  const text = $('textarea', { rows: 2, value: 'the food was not good', className: 'text' });
  const out = $('div', { className: 'out encoded' });
  const buttons = [];
  if (model.canClassify) {
    buttons.push($('button', {
      textContent: 'classify', className: 'run-classify', onclick: async () => {
        try {
          const [r] = await model.classify([text.value]);
          out.textContent = `${r.label} (${(100 * r.score).toFixed(1)}%)`;
        } catch (err) { showError(out, err); }
      },
    }));
  }
  buttons.push($('button', {
    textContent: 'embed', className: 'run-embed', onclick: async () => {
      try {
        const [v] = await model.embed([text.value]);
        out.textContent = `${v.length} dims: [${[...v.slice(0, 6)].map((x) => x.toFixed(4)).join(', ')}, …]`;
      } catch (err) { showError(out, err); }
    },
  }));
  card.append(text, $('div', {}, ...buttons), out);
}

/** The MB of the files the manifest lists (what the load downloaded). */
function manifestMegabytes(m) {
  const files = new Map([[m.tokenizer.file, m.tokenizer.bytes]]);
  for (const g of Object.values(m.graphs)) for (const e of [g.file, ...g.external_data]) files.set(e.file, e.bytes);
  return ([...files.values()].reduce((a, b) => a + b, 0) / 2 ** 20).toFixed(2);
}

async function open({ name, url }) {
  const card = $('div', { className: 'card', id: `package-${name}` }, $('h2', { textContent: name }));
  const status = $('div', { className: 'progress' });
  card.append(status);
  document.getElementById('packages').append(card);
  const start = performance.now();
  try {
    const query = new URLSearchParams(location.search);
    const limit = Number(query.get('memory_limit_mb'));
    const threads = Number(query.get('threads'));
    const model = await onnxformer.load(url, {
      provider: query.get('provider') ?? 'wasm',
      ...(threads ? { threads } : {}),
      ...(limit ? { memoryLimit: limit * 2 ** 20 } : {}),
      onProgress: ({ file, loaded, total }) => { status.textContent = `${file}: ${(loaded / 1024).toFixed(0)} / ${(total / 1024).toFixed(0)} KB`; },
    });
    window.models[name] = model;
    const m = model.manifest;
    const mb = manifestMegabytes(m);
    const layers = m.model_config?.n_layers ?? m.dims.n_layers; // dims.n_layers counts decoder layers (0 in an encoder)
    status.textContent = `${model.arch}, ${layers} layers, d_model ${m.dims.d_model}, context ${m.max_seq_len}, ${mb} MB; ` +
      `loaded in ${((performance.now() - start) / 1000).toFixed(2)} s${model.chatTemplate ? '; chat template' : ''}`;
    if (model.canGenerate) generatePanel(model, card);
    else encoderPanel(model, card);
    return { name, ok: true, seconds: (performance.now() - start) / 1000 };
  } catch (err) {
    showError(status, err);
    return { name, ok: false, code: err.code ?? null, message: describe(err) };
  }
}

// window.loaded is set before anything is awaited: tests and scripts wait on it.
window.loaded = packageList().then((list) => Promise.all(list.map(open))).catch((err) => {
  document.getElementById('packages').append($('div', { className: 'error', textContent: describe(err) }));
  return [];
});

const adapter = await (navigator.gpu?.requestAdapter() ?? Promise.resolve(null)).catch(() => null);
document.getElementById('env').textContent =
  `onnxruntime-web ${onnxformer.ort.env.versions?.web ?? ''}: ${crossOriginIsolated ? `wasm threads (${Math.min(4, navigator.hardwareConcurrency)})` : 'wasm, one thread (page not cross-origin isolated)'}` +
  `${adapter ? '; WebGPU available (?provider=webgpu)' : '; no WebGPU adapter'}`;
