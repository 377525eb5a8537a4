/**
 * @module The Brownian motion of diffusers' DPMSolverSDEScheduler, bit for bit: torchsde's `BrownianInterval` as
 * diffusers builds it (`tol=1e-6, pool_size=24, halfway_tree=True`, no Lévy area), with numpy's `SeedSequence` for
 * the seed of each node and torch's CPU `randn` (random.ts) for its noise.
 *
 * The interval [t0, t1] is a binary tree whose nodes split at their halfway points (rounded to 6 decimals, as
 * Python's `round(x, 6)` does); a node's increment W comes from its parent's by the Brownian bridge, in float32 as
 * torch computes it, with noise drawn from a generator seeded by the parent's SeedSequence (entropy = the seed,
 * spawn key = (the parent's path as a binary number, its depth)). A query W(ta, tb) sums, left to right, the largest
 * nodes that tile [ta, tb], splitting nodes until their edges meet ta and tb. Every node's value depends only on the
 * seed and its place in the tree, so caching (bounded here) changes no value.
 */

import { RuntimeError } from '../errors.js';
import { TorchGenerator } from './random.js';
import type { BrownianQuery, BrownianSpec } from './types.js';

const f = Math.fround;

// numpy/random/bit_generator.pyx: SeedSequence's hash constants (O'Neill's seed_seq alternative).
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;

/** numpy's `_int_to_uint32_array`: a non-negative integer as 32-bit words, lowest first (0 is one word). */
function words(n: bigint | number): number[] {
  let v = BigInt(n);
  if (v < 0n) throw new RuntimeError('INVALID_INPUT', `a SeedSequence entropy must be a non-negative integer, got ${v}`);
  if (v === 0n) return [0];
  const out: number[] = [];
  while (v > 0n) {
    out.push(Number(v & 0xffffffffn));
    v >>= 32n;
  }
  return out;
}

/**
 * `np.random.SeedSequence(entropy, spawn_key=spawnKey, pool_size=poolSize).generate_state(n)` (uint32 words).
 */
export function seedSequenceState(entropy: bigint | number, spawnKey: readonly (bigint | number)[], poolSize: number, n: number): Uint32Array {
  if (!Number.isInteger(poolSize) || poolSize < 4) throw new RuntimeError('INVALID_INPUT', `a SeedSequence pool_size must be an integer >= 4, got ${poolSize}`);
  let run = words(entropy);
  const spawn = spawnKey.flatMap(words);
  // numpy pads the run entropy to the pool size when there is a spawn key, so the two cannot collide.
  if (spawn.length > 0 && run.length < poolSize) run = [...run, ...new Array<number>(poolSize - run.length).fill(0)];
  const entropyArray = [...run, ...spawn];
  const pool = new Uint32Array(poolSize);
  let hashConst = INIT_A;
  const hashmix = (value: number): number => {
    let v = (value ^ hashConst) >>> 0;
    hashConst = Math.imul(hashConst, MULT_A) >>> 0;
    v = Math.imul(v, hashConst) >>> 0;
    return (v ^ (v >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    const r = (Math.imul(MIX_MULT_L, x) - Math.imul(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  for (let i = 0; i < poolSize; i++) pool[i] = hashmix(i < entropyArray.length ? entropyArray[i]! : 0);
  for (let src = 0; src < poolSize; src++) {
    for (let dst = 0; dst < poolSize; dst++) if (src !== dst) pool[dst] = mix(pool[dst]!, hashmix(pool[src]!));
  }
  for (let src = poolSize; src < entropyArray.length; src++) {
    for (let dst = 0; dst < poolSize; dst++) pool[dst] = mix(pool[dst]!, hashmix(entropyArray[src]!));
  }
  const out = new Uint32Array(n);
  let hc = INIT_B;
  for (let i = 0; i < n; i++) {
    let d = (pool[i % poolSize]! ^ hc) >>> 0;
    hc = Math.imul(hc, MULT_B) >>> 0;
    d = Math.imul(d, hc) >>> 0;
    out[i] = (d ^ (d >>> 16)) >>> 0;
  }
  return out;
}

const dv = new DataView(new ArrayBuffer(8));

/**
 * Python's `round(x, ndigits)` for a finite double: the decimal with `ndigits` places nearest to x's exact binary
 * value (ties to even), read back as the nearest double. (`Number(x.toFixed(n))` breaks exact ties upwards.)
 */
export function pyRound(x: number, ndigits: number): number {
  if (!Number.isFinite(x) || x === 0) return x;
  dv.setFloat64(0, Math.abs(x));
  const hi = dv.getUint32(0);
  const lo = dv.getUint32(4);
  const biased = hi >>> 20;
  let mant = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  if (biased !== 0) mant |= 1n << 52n;
  const exp = (biased === 0 ? 1 : biased) - 1075; // |x| = mant · 2^exp
  const scale = 10n ** BigInt(ndigits);
  let num = mant * scale;
  let den = 1n;
  if (exp >= 0) num <<= BigInt(exp);
  else den <<= BigInt(-exp);
  let q = num / den;
  const twice = 2n * (num - q * den);
  if (twice > den || (twice === den && (q & 1n) === 1n)) q += 1n;
  // q and 10^ndigits are exact doubles here, and IEEE division rounds once: the nearest double to the decimal.
  const r = Number(q) / Number(scale);
  return x < 0 ? -r : r;
}

/** diffusers' BatchedBrownianTree arguments to torchsde.BrownianInterval. */
const TOL_DIGITS = 6; // tol=1e-6: torchsde rounds every time to -int(log10(tol)) = 6 decimals
const POOL_SIZE = 24;
/**
 * Nodes whose increments are kept (torchsde keeps 45); values do not depend on it. A scheduler step reads about three
 * root-to-leaf paths of ~24 levels (two children each): 160 keeps them, halving the randn draws of a 25-step run
 * against 64 (1000 instead of 2000 draws of the latent's size); more gains nothing. Each node holds a latent, so a
 * large one keeps fewer (CACHE_BYTES per tree, one tree per image: 32 MiB keeps 128 nodes of a 1024 px latent, 32 of a
 * 2048 px one), never fewer than MIN_CACHE_NODES.
 */
const CACHE_NODES = 160;
const CACHE_BYTES = 32 * 2 ** 20;
const MIN_CACHE_NODES = 32;

const round = (x: number) => pyRound(x, TOL_DIGITS);

interface Node {
  readonly start: number;
  readonly end: number;
  readonly parent: Node | undefined;
  readonly isLeft: boolean;
  midway?: number;
  /** Set when the node splits: the seed of the noise its children's bridge draws. */
  wSeed?: number;
  spawnKey?: number;
  depth?: number;
  left?: Node;
  right?: Node;
}

/**
 * `torchsde.BrownianInterval(t0, t1, size, float32, cpu, entropy, tol=1e-6, pool_size=24, halfway_tree=True)`, for a
 * tensor of `numel` values (its shape does not matter: torch's randn fills by count).
 */
export class BrownianInterval {
  readonly #root: Node;
  readonly #numel: number;
  readonly #entropy: bigint;
  readonly #cache = new Map<Node, Float32Array>();
  readonly #rootW: Float32Array;
  readonly #cacheNodes: number;

  constructor(t0: number, t1: number, numel: number, entropy: bigint | number) {
    if (!(t0 <= t1)) throw new RuntimeError('INTERNAL', `Brownian interval: t0 ${t0} must not exceed t1 ${t1}`);
    this.#numel = numel;
    this.#cacheNodes = Math.max(MIN_CACHE_NODES, Math.min(CACHE_NODES, Math.floor(CACHE_BYTES / (4 * numel))));
    this.#entropy = BigInt(entropy);
    words(this.#entropy); // refuses a negative seed, as numpy does
    this.#root = { start: round(t0), end: round(t1), parent: undefined, isLeft: false };
    const [wSeed] = seedSequenceState(this.#entropy, [], POOL_SIZE, 3);
    // The root's increment scales by the unrounded interval, as torchsde does.
    const scale = f(Math.sqrt(t1 - t0));
    const w = this.#randn(wSeed!);
    for (let i = 0; i < w.length; i++) w[i] = f(w[i]! * scale);
    this.#rootW = w;
  }

  get start(): number {
    return this.#root.start;
  }

  get end(): number {
    return this.#root.end;
  }

  /** W(tb) − W(ta) (torchsde's `__call__(ta, tb)`): times outside [t0, t1] are clamped to it, as torchsde does. */
  increment(taIn: number, tbIn: number): Float32Array {
    const root = this.#root;
    let ta = taIn;
    let tb = tbIn;
    if (ta < root.start) ta = root.start;
    if (tb < root.start) tb = root.start;
    if (ta > root.end) ta = root.end;
    if (tb > root.end) tb = root.end;
    if (ta > tb) throw new RuntimeError('INTERNAL', `Brownian interval: query times ta=${ta} and tb=${tb} must respect ta <= tb`);
    if (ta === tb) return new Float32Array(this.#numel);
    const intervals: Node[] = [];
    this.#loc(root, round(ta), round(tb), intervals);
    const out = this.#w(intervals[0]!).slice();
    for (let k = 1; k < intervals.length; k++) {
      const wi = this.#w(intervals[k]!);
      for (let i = 0; i < out.length; i++) out[i] = f(out[i]! + wi[i]!);
    }
    return out;
  }

  #randn(seed: number): Float32Array {
    return new TorchGenerator(seed).randn(this.#numel);
  }

  /** torchsde's `_loc_inner`: the nodes tiling [ta, tb], left to right, splitting where needed. */
  #loc(node: Node, ta: number, tb: number, out: Node[]): void {
    if (ta < node.start || tb > node.end) return this.#loc(node.parent!, ta, tb, out);
    if (ta === node.start && tb === node.end) {
      out.push(node);
      return;
    }
    if (node.midway === undefined) {
      if (ta === node.start) {
        this.#split(node, tb);
        return this.#loc(node.left!, ta, tb, out);
      }
      this.#split(node, ta);
      return this.#loc(node.right!, ta, tb, out);
    }
    if (tb <= node.midway) return this.#loc(node.left!, ta, tb, out);
    if (ta >= node.midway) return this.#loc(node.right!, ta, tb, out);
    this.#loc(node.left!, ta, node.midway, out);
    return this.#loc(node.right!, node.midway, tb, out);
  }

  /** `_split` with halfway_tree: split at the halfway point, then the child holding `at`, until a split lands on it. */
  #split(node: Node, at: number): void {
    const mid = 0.5 * (node.end + node.start);
    node.midway = round(mid);
    node.spawnKey = node.parent ? 2 * node.parent.spawnKey! + (node.isLeft ? 0 : 1) : 0;
    node.depth = node.parent ? node.parent.depth! + 1 : 0;
    node.wSeed = seedSequenceState(this.#entropy, [node.spawnKey, node.depth], POOL_SIZE, 4)[0]!;
    node.left = { start: node.start, end: round(mid), parent: node, isLeft: true };
    node.right = { start: round(mid), end: node.end, parent: node, isLeft: false };
    if (at > node.midway) this.#split(node.right, at);
    else if (at < node.midway) this.#split(node.left, at);
  }

  /** A node's increment: the Brownian bridge from its parent's, both children at once (they share the noise). */
  #w(node: Node): Float32Array {
    if (node.parent === undefined) return this.#rootW;
    const cached = this.#cache.get(node);
    if (cached) {
      this.#cache.delete(node);
      this.#cache.set(node, cached);
      return cached;
    }
    const p = node.parent;
    const w = this.#w(p);
    const hRec = 1 / (p.end - p.start);
    const leftDiff = p.midway! - p.start;
    const rightDiff = p.end - p.midway!;
    const a = f(leftDiff);
    const h = f(hRec);
    const sd = f(Math.sqrt(leftDiff * rightDiff * hRec));
    const noise = this.#randn(p.wSeed!);
    const left = new Float32Array(w.length);
    const right = new Float32Array(w.length);
    for (let i = 0; i < w.length; i++) {
      const l = f(f(f(w[i]! * a) * h) + f(sd * noise[i]!));
      left[i] = l;
      right[i] = f(w[i]! - l);
    }
    this.#remember(p.left!, left);
    this.#remember(p.right!, right);
    return node.isLeft ? left : right;
  }

  #remember(node: Node, w: Float32Array): void {
    this.#cache.delete(node);
    this.#cache.set(node, w);
    if (this.#cache.size > this.#cacheNodes) this.#cache.delete(this.#cache.keys().next().value!);
  }
}

/** Whether two specs describe the same motion. */
export function sameSpec(a: BrownianSpec, b: BrownianSpec): boolean {
  return a.lo === b.lo && a.hi === b.hi && a.perImage === b.perImage && a.seeds.length === b.seeds.length && a.seeds.every((x, i) => x === b.seeds[i]);
}

/**
 * diffusers' BrownianTreeNoiseSampler over a batch: one BrownianInterval per image (images of one seed share one, so
 * they get the same noise), read as W(ta, tb)/√|tb − ta| with torchsde's sign, images concatenated.
 */
export class BrownianNoise {
  readonly spec: BrownianSpec;
  readonly #trees: BrownianInterval[];

  constructor(spec: BrownianSpec) {
    if (spec.seeds.length === 0) throw new RuntimeError('INTERNAL', 'Brownian noise: no image seeds');
    this.spec = spec;
    const bySeed = new Map<number, BrownianInterval>();
    this.#trees = spec.seeds.map((seed) => {
      let tree = bySeed.get(seed);
      if (!tree) bySeed.set(seed, (tree = new BrownianInterval(spec.lo, spec.hi, spec.perImage, seed)));
      return tree;
    });
  }

  noise(ta: number, tb: number): Float32Array<ArrayBuffer> {
    const trees = this.#trees;
    // BatchedBrownianTree.sort, of the query and (once) of the tree's own interval
    const sign = (ta < tb ? 1 : -1) * (trees[0]!.start < trees[0]!.end ? 1 : -1);
    const denom = f(Math.sqrt(Math.abs(f(tb - ta))));
    const per = this.spec.perImage;
    const out = new Float32Array(per * trees.length);
    const done = new Map<BrownianInterval, Float32Array>();
    trees.forEach((tree, i) => {
      let w = done.get(tree);
      if (!w) done.set(tree, (w = ta < tb ? tree.increment(ta, tb) : tree.increment(tb, ta)));
      for (let k = 0; k < per; k++) out[i * per + k] = f((sign * w[k]!) / denom);
    });
    return out;
  }
}
