/**
 * @module The adapter sets a pipeline worker keeps: least recently used first out, bounded by a count
 * (LORA_MAX_SETS) and by the bytes their merged sessions hold (LORA_CACHE_MB). A set in use (a generation between
 * its start and its last UNet step) is never evicted; the base model's sessions are not counted and never evicted.
 */

import { RuntimeError } from '../errors.js';

/** The 400 for a set bigger than LORA_CACHE_MB alone (`maxBytes`): it could never be kept. */
export function setTooLarge(key: string, bytes: number, maxBytes: number): RuntimeError {
  const mb = (n: number) => Math.round((n / 2 ** 20) * 10) / 10;
  return new RuntimeError('INVALID_INPUT', `the adapter set ${key} needs ${mb(bytes)} MB of merged weights, more than LORA_CACHE_MB=${mb(maxBytes)} allows`);
}

export interface SetLimits {
  maxSets: number;
  maxBytes: number;
}

export interface CachedSet<T> {
  key: string;
  bytes: number;
  value: T;
  inUse: number;
  lastUsed: number;
}

export class AdapterSetCache<T> {
  readonly #sets = new Map<string, CachedSet<T>>();
  #clock = 0;

  constructor(private readonly limits: SetLimits) {}

  /** The byte limit (LORA_CACHE_MB): a set bigger than it alone is never kept. */
  get maxBytes(): number {
    return this.limits.maxBytes;
  }

  get size(): number {
    return this.#sets.size;
  }

  get bytes(): number {
    let n = 0;
    for (const s of this.#sets.values()) n += s.bytes;
    return n;
  }

  keys(): string[] {
    return [...this.#sets.keys()];
  }

  get(key: string): CachedSet<T> | undefined {
    const s = this.#sets.get(key);
    if (s) s.lastUsed = ++this.#clock;
    return s;
  }

  /** Whether a set of `bytes` could ever be kept (alone, with nothing else cached). */
  fits(bytes: number): boolean {
    return this.limits.maxSets >= 1 && bytes <= this.limits.maxBytes;
  }

  /**
   * Adds a set and returns the sets to evict (least recently used first, never one in use) so that the cache is back
   * within its limits; the caller ends them. When only sets in use stand in the way, the cache stays over its limits
   * until they are released (evictable() then names them).
   */
  add(key: string, bytes: number, value: T): CachedSet<T>[] {
    this.#sets.set(key, { key, bytes, value, inUse: 0, lastUsed: ++this.#clock });
    return this.evictable(key);
  }

  /** Sets to evict now to get within the limits (removed from the cache); `keep` (the set just added) stays. */
  evictable(keep?: string): CachedSet<T>[] {
    const out: CachedSet<T>[] = [];
    const order = [...this.#sets.values()].sort((a, b) => a.lastUsed - b.lastUsed);
    let count = this.#sets.size;
    let bytes = this.bytes;
    for (const s of order) {
      if (count <= this.limits.maxSets && bytes <= this.limits.maxBytes) break;
      if (s.inUse > 0 || s.key === keep) continue;
      this.#sets.delete(s.key);
      out.push(s);
      count--;
      bytes -= s.bytes;
    }
    return out;
  }

  delete(key: string): CachedSet<T> | undefined {
    const s = this.#sets.get(key);
    this.#sets.delete(key);
    return s;
  }

  values(): CachedSet<T>[] {
    return [...this.#sets.values()];
  }
}
