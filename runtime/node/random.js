/**
 * The seeded pseudo-random generator used for sampling: xoshiro128** 1.1 (Blackman & Vigna,
 * https://prng.di.unimi.it/xoshiro128starstar.c) seeded by SplitMix64.
 *
 * Seeding: `seed` (an integer in [0, 2^64)) is the initial SplitMix64 state; two SplitMix64
 * outputs z0, z1 (64-bit) give the xoshiro state words s = [lo32(z0), hi32(z0), lo32(z1), hi32(z1)].
 * `random()` returns a double in [0, 1) from two 32-bit outputs a, b:
 * `((a >>> 5) * 2^26 + (b >>> 6)) / 2^53` (the "res53" construction of MT19937's reference code).
 *
 * Seeds are reproducible within the Node runtime (same seed, same batch, same package, same
 * output) but NOT portable across runtimes: the Python runtime draws from numpy's PCG64.
 *
 * @module random
 */


const MASK64 = (1n << 64n) - 1n;

/** @param {bigint} state @returns {[bigint, bigint]} [next state, output] */
function splitmix64(state) {
  const next = (state + 0x9e3779b97f4a7c15n) & MASK64;
  let z = next;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return [next, z ^ (z >> 31n)];
}

const rotl = (x, k) => ((x << k) | (x >>> (32 - k))) >>> 0;

export class Random {
  /**
   * @param {number | bigint | null} [seed] integer >= 0; null or undefined: seeded from the OS
   */
  constructor(seed = null) {
    let state = seed === null || seed === undefined ? globalThis.crypto.getRandomValues(new BigUint64Array(1))[0] : BigInt(seed) & MASK64;
    const words = [];
    for (let i = 0; i < 2; i++) {
      let z;
      [state, z] = splitmix64(state);
      words.push(Number(z & 0xffffffffn), Number(z >> 32n));
    }
    /** @type {Uint32Array} xoshiro128** state */
    this.s = Uint32Array.from(words);
  }

  /** Next 32-bit output of xoshiro128**. @returns {number} */
  nextUint32() {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** A double in [0, 1) with 53 random bits. @returns {number} */
  random() {
    const a = this.nextUint32() >>> 5;
    const b = this.nextUint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }
}
