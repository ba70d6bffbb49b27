/**
 * Python-style `repr()` of JSON-like values, so error messages read the same in both
 * runtimes (`got 'foo'`, `got None`, `got 1.0`). Internal helper.
 *
 * @module repr
 */

/**
 * A float the way Python's `repr(float)` writes it: `2.0`, `0.5`, `1e-07`, `1e+16`, `inf`.
 * @param {number} x
 * @returns {string}
 */
export function floatRepr(x) {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mantissa, expText] = x.toExponential().split('e'); // shortest round-trip digits
  const exp = Number(expText);
  if (exp < -4 || exp >= 16) {
    const sign = exp < 0 ? '-' : '+';
    return `${mantissa}e${sign}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  const text = String(x);
  return Number.isInteger(x) ? `${text}.0` : text;
}

/**
 * Python's `repr(str)`: single quotes unless the text holds `'` and no `"`.
 * @param {string} text
 * @returns {string}
 */
export function strRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  let out = '';
  for (const ch of text) {
    const code = ch.codePointAt(0);
    if (ch === '\\') out += '\\\\';
    else if (ch === quote) out += `\\${quote}`;
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (code < 0x20 || code === 0x7f) out += `\\x${code.toString(16).padStart(2, '0')}`;
    else out += ch;
  }
  return quote + out + quote;
}

/**
 * `repr()` of a JSON-like value; integers print as Python ints, other numbers as floats.
 * @param {unknown} value
 * @returns {string}
 */
export function repr(value) {
  if (value === null || value === undefined) return 'None';
  if (typeof value === 'boolean') return value ? 'True' : 'False';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : floatRepr(value);
  if (typeof value === 'bigint') return String(value);
  if (typeof value === 'string') return strRepr(value);
  if (Array.isArray(value)) return `[${value.map(repr).join(', ')}]`;
  if (typeof value === 'object') {
    const items = Object.entries(value).map(([k, v]) => `${strRepr(k)}: ${repr(v)}`);
    return `{${items.join(', ')}}`;
  }
  return String(value);
}

/**
 * The JavaScript type of a value for messages: `string`, `number`, `null`, `array`, `object`...
 * @param {unknown} value
 * @returns {string}
 */
export function typeName(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}
