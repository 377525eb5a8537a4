/**
 * @module The cache's entries as an operator sees them (name, size, last use, who uses them) and their removal: the
 * eviction of least recently used entries when a download finds too little space (CACHE_EVICT=lru), and the warm-up
 * CLI's `cache list` / `cache prune`.
 *
 * An entry is removed only under its lock (purpose `evict`, taken without waiting: a live filler keeps it, one whose
 * heartbeat only looks old on this clock included, lock.ts), after
 * checking under that lock that no live lease names it (lease.ts explains why a lease taken at that moment is seen or
 * withdraws), and by renaming it to a trash name first and deleting that: a reader never sees half an entry, and a new
 * fill of the same key can start as soon as the lock is released.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, type Stats } from 'node:fs';
import path from 'node:path';
import { direct, exists, removeTree, type Bound } from '../files.js';
import { fsyncDir, JOURNAL, LORA_SETS, MANIFEST, mb, readManifest } from './cache.js';
import { isEntry, LEASES, leaseState, leaseStates, leasesDir, LEASE_STALE_MS, sweepUnleased } from './lease.js';
import { acquireLock, inspectHolder, inspectHolders, type LockInfo, sameProcess, type StillBeats, sweepHolderTemps } from './lock.js';
import { parseVersion, versionsOf } from './versions.js';

/** Folders an eviction renamed and is deleting (or was, when its process died): `.evicting-<key>-<token>`. */
const TRASH_PREFIX = '.evicting-';

export interface CacheEntry {
  /** The entry's folder name under MODEL_CACHE_DIR, as the cache names it. */
  readonly name: string;
  /** The source URI its manifest records (committed entries). */
  readonly uri?: string;
  /** `committed`: a whole model; `partial`: a download in progress or abandoned. */
  readonly state: 'committed' | 'partial';
  /**
   * Bytes it occupies on disk (allocated blocks: a preallocated partial counts what it holds), less `shared`. Summed
   * over the entries, what the cache holds; for an older version, what removing it frees.
   */
  readonly bytes: number;
  /** Bytes of its files that a newer version of the same entry also holds (hard links: versions.ts); 0 for most. */
  readonly shared: number;
  /** Its version (versions.ts): 1 for the entry's first folder. */
  readonly version: number;
  /** A newer version of the same entry is committed: no new process serves from this one, it goes once unused. */
  readonly superseded: boolean;
  readonly lastUsed: Date;
  /** Processes serving from it now (live leases), as `host/pid`. */
  readonly users: readonly string[];
  /** A live process holding its lock (filling it, or evicting it), as `host/pid`. */
  readonly locked?: string;
  /**
   * Version 1's lock is held by a fill of this newer version of the entry (every fill takes it, whichever version it
   * writes: versions.ts): its name. Version 1 itself is not being written.
   */
  readonly lockedFor?: string;
  /**
   * A lease (or, listed with `watch: false`, its lock) looks older than its limit (or as far ahead) on this clock and
   * was not watched: a pod killed elsewhere, or a live one whose clock is off. Removing it watches that first.
   */
  readonly unconfirmed?: true;
}

export const inUse = (e: CacheEntry): boolean => e.users.length > 0 || e.locked !== undefined;

export interface EntryOptions {
  /** A lease heartbeat older than this does not count once watched a third as long without moving (default LEASE_STALE_MS; lock.ts). */
  leaseStaleMs?: number;
  /** A lock heartbeat older than this does not count once watched a third as long without moving (default 30 s, as the fetch's lock). */
  lockStaleMs?: number;
  /**
   * false: a lock or lease whose heartbeat looks older than that (or as far ahead) is not watched, and keeps the entry
   * as a live one does (removeEntry): for a start, which must not wait for it; an eviction or a prune watches it. A
   * listing then marks the entry `unconfirmed`.
   */
  watch?: boolean;
  /** Heartbeats a watch already saw stand still (watchEntries): they count as gone, unwatched (lock.ts StillBeats). */
  still?: StillBeats;
  /** Ends a watch, or a wait for a file system call, at once (rejects with its reason). */
  signal?: AbortSignal;
  /**
   * Every call on the volume, each alone in the caller's bound on the pool threads a volume that stops answering keeps
   * (a LoRA adapter's fetch removing its entry's older versions, fetch.ts served, or making room, roomFor): `calls`
   * runs the looks, each name of a walk, the rename, syncs and deletions (name by name), `lock` a lock's (acquireLock's
   * bound). A watch holds no place between its looks. None: unbounded.
   */
  bound?: { calls: Bound; lock: Bound };
}

/**
 * Runs `fns` at once, or one after the other where `bounded`: each then waits for a place in the caller's bound, and
 * one listing's looks need not take several.
 */
async function together<T extends readonly unknown[]>(bounded: boolean, fns: { [K in keyof T]: () => Promise<T[K]> }): Promise<T> {
  if (!bounded) return (await Promise.all(fns.map((f) => f()))) as unknown as T;
  const out: unknown[] = [];
  for (const f of fns) out.push(await f());
  return out as unknown as T;
}

/** Calls `fn` with the lstat of every file under `dir`, its `dev:ino` and the bytes it has allocated; each call in `io`. */
async function eachFile(dir: string, fn: (st: Stats, id: string, bytes: number) => void, io: Bound = direct): Promise<void> {
  for (const e of await io(() => fsp.readdir(dir, { withFileTypes: true })).catch(() => [])) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) await eachFile(p, fn, io);
    else {
      const st = await io(() => fsp.lstat(p)).catch(() => undefined);
      if (st) fn(st, `${st.dev}:${st.ino}`, st.blocks !== undefined ? Math.max(st.blocks * 512, 0) : st.size);
    }
  }
}

/**
 * Bytes allocated under `dir`; `inodes`: collects each file's `dev:ino`, and `shared` counts apart the files whose
 * inode it already holds.
 */
async function allocated(dir: string, o: { inodes?: Set<string>; shared?: ReadonlySet<string>; io?: Bound } = {}): Promise<{ bytes: number; shared: number }> {
  let total = 0;
  let shared = 0;
  await eachFile(dir, (st, id, n) => {
    o.inodes?.add(id);
    if (st.nlink > 1 && o.shared?.has(id)) shared += n;
    else total += n;
  }, o.io);
  return { bytes: total, shared };
}

/**
 * Bytes deleting everything under `dirs` frees: a file counts only when every name it has (st_nlink) is among them, so
 * one that a version staying, a LoRA adapter set (their unchanged weights are hard links to the entry's) or anything
 * else also links is not freed, and a file named twice counts once.
 */
async function freedBy(dirs: readonly string[], io: Bound = direct): Promise<number> {
  const files = new Map<string, { names: number; nlink: number; bytes: number }>();
  for (const d of dirs) {
    await eachFile(d, (st, id, bytes) => {
      const f = files.get(id) ?? { names: 0, nlink: st.nlink, bytes };
      f.names++;
      files.set(id, f);
    }, io);
  }
  let bytes = 0;
  for (const f of files.values()) if (f.names >= f.nlink) bytes += f.bytes;
  return bytes;
}

/** The inodes of the files of the versions of the entry `name` newer than it, and whether one of those is committed. */
async function siblings(cacheDir: string, name: string, io: Bound): Promise<{ version: number; newer: Set<string>; superseded: boolean }> {
  const { key, n } = parseVersion(name);
  const newer = new Set<string>();
  let superseded = false;
  for (const v of await io(() => versionsOf(cacheDir, key))) {
    if (v.n <= n) continue;
    if (await io(() => exists(path.join(v.dir, MANIFEST)))) superseded = true;
    await allocated(v.dir, { inodes: newer, io });
  }
  return { version: n, newer, superseded };
}

/** The newer version of version 1 `name` that the holder of its lock fills under that version's own lock, if any. */
async function fillingNewer(cacheDir: string, name: string, holder: LockInfo | undefined, staleMs: number, bound?: Bound): Promise<string | undefined> {
  if (holder === undefined) return undefined;
  for (const v of (await (bound ?? direct)(() => versionsOf(cacheDir, name))).reverse()) {
    if (v.n === 1) continue;
    const l = await inspectHolder(`${v.dir}.lock`, { staleMs, ...(bound ? { bound } : {}) });
    if (l?.live && l.holder && sameProcess(l.holder, holder)) return v.name;
  }
  return undefined;
}

/** One entry's record, or undefined when `name` is not an entry (no manifest and no journal at its root). */
export async function inspectEntry(cacheDir: string, name: string, o: EntryOptions = {}): Promise<CacheEntry | undefined> {
  const dir = path.join(cacheDir, name);
  const bound = o.bound?.calls;
  const io = bound ?? direct;
  const stat = (m: string) => () => io(() => fsp.stat(path.join(dir, m))).catch(() => undefined);
  const [mst, jst] = await together(!!bound, [stat(MANIFEST), stat(JOURNAL)]);
  if (mst === undefined && jst === undefined) return undefined;
  const manifest = mst ? await io(() => readManifest(dir)) : undefined;
  const sib = await siblings(cacheDir, name, io);
  const staleMs = o.lockStaleMs ?? 30_000;
  const looks = bound ? { bound } : {};
  const [{ bytes, shared }, leases, lock] = await together(!!bound, [
    // A lease that looks stale on this clock is not watched here (minutes, for a listing): what removes the entry does.
    () => allocated(dir, { shared: sib.newer, io }), () => leaseState(dir, o.leaseStaleMs ?? LEASE_STALE_MS, { confirmMs: 0, ...looks }),
    () => inspectHolder(`${dir}.lock`, { staleMs, ...(o.watch === false ? { confirmMs: 0 } : {}), ...(o.still ? { still: o.still } : {}), ...(o.signal ? { signal: o.signal } : {}), ...looks })]);
  const lockedFor = lock?.live && sib.version === 1 ? await fillingNewer(cacheDir, name, lock.holder, staleMs, bound) : undefined;
  // An entry never leased (as every entry made before leases existed) was last used when it was committed or written.
  const lastUsedMs = Math.max(leases.lastUsedMs ?? 0, (manifest ? mst : jst ?? mst)!.mtimeMs);
  return {
    name,
    ...(manifest?.uri ? { uri: manifest.uri } : {}),
    state: manifest ? 'committed' : 'partial',
    bytes,
    shared,
    version: sib.version,
    superseded: sib.superseded,
    lastUsed: new Date(lastUsedMs),
    users: leases.live.map((h) => `${h.host}/${h.pid}`),
    ...(lock?.live ? { locked: lock.holder ? `${lock.holder.host}/${lock.holder.pid}` : 'unknown' } : {}),
    ...(lockedFor ? { lockedFor } : {}),
    ...(leases.unwatched > 0 || lock?.unwatched ? { unconfirmed: true as const } : {}),
  };
}

/** Every entry under the cache, least recently used first. Never throws on a missing cache folder. */
export async function listEntries(cacheDir: string, o: EntryOptions = {}): Promise<CacheEntry[]> {
  const ents = await (o.bound?.calls ?? direct)(() => fsp.readdir(cacheDir, { withFileTypes: true })).catch(() => []);
  const out: CacheEntry[] = [];
  for (const e of ents) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    o.signal?.throwIfAborted();
    const x = await inspectEntry(cacheDir, e.name, o);
    if (x) out.push(x);
  }
  return out.sort((a, b) => a.lastUsed.getTime() - b.lastUsed.getTime() || (a.name < b.name ? -1 : 1));
}

export type EvictOutcome = { removed: true; bytes: number } | { removed: false; why: 'locked' | 'in use' | 'gone' };

/** Removes one entry if nobody fills or serves from it, safely against both starting now (see the module's note). */
export async function removeEntry(cacheDir: string, name: string, o: EntryOptions = {}): Promise<EvictOutcome> {
  const dir = path.join(cacheDir, name);
  const quick = o.watch === false;
  // One call at a time in the bound, never the removal whole: acquireLock waits for it too, and at a bound of 1 a
  // removal holding it would wait for itself.
  const io: Bound = o.bound?.calls ?? direct;
  const seen = { ...(o.still ? { still: o.still } : {}), ...(o.signal ? { signal: o.signal } : {}), ...(o.bound ? { bound: o.bound.calls } : {}) };
  if (quick && (await inspectHolder(`${dir}.lock`, { staleMs: o.lockStaleMs ?? 30_000, confirmMs: 0, ...seen }))?.unwatched) return { removed: false, why: 'locked' };
  const lock = await acquireLock(`${dir}.lock`, { wait: false, purpose: 'evict', staleMs: o.lockStaleMs ?? 30_000, ...seen, ...(o.bound ? { bound: o.bound.lock } : {}) });
  if (lock === undefined) return { removed: false, why: 'locked' };
  let trash: string;
  let bytes: number;
  try {
    const leases = await leaseState(dir, o.leaseStaleMs ?? LEASE_STALE_MS, { ...(quick ? { confirmMs: 0 } : {}), ...seen });
    if (leases.live.length > 0 || (quick && leases.unwatched > 0)) return { removed: false, why: 'in use' };
    if (!(await io(() => isEntry(dir)))) return { removed: false, why: 'gone' };
    // What it frees: files another version of the entry or an adapter set links stay.
    bytes = await freedBy([dir], io);
    // A lease taken since the read above saw this lock and withdrew, unless this process stood still long enough (a
    // stuck volume, a frozen node) for its taker to watch the lock and take it over: then the entry is that lease's.
    if (!(await lock.mine())) return { removed: false, why: 'locked' };
    trash = path.join(cacheDir, `${TRASH_PREFIX}${name}-${randomBytes(4).toString('hex')}`);
    await io(() => fsp.rename(dir, trash));
    await io(() => fsyncDir(cacheDir));
    // Stale leases go with the entry; a lease being taken now sees this lock and takes itself again afterwards.
    await removeTree(leasesDir(dir), o.bound?.calls).catch(() => undefined);
  } finally {
    await lock.release();
  }
  // Out of every entry's name already: what cannot go now (an NFS client's .nfs file of a file still open) goes with
  // the next eviction's or prune's emptyTrash, never failing the download that asked for the room.
  await removeTree(trash, o.bound?.calls).catch(() => undefined);
  return { removed: true, bytes };
}

/**
 * Watches, all together, the leases and locks of the entries `names` whose heartbeats look older than their limit (or
 * as far ahead) on this clock: one watch (up to a minute, a lease's confirmMs, at the defaults), not one per entry.
 * Resolves to the heartbeats that stood still meanwhile (removeEntry's `still`: they count as gone there, unwatched),
 * the entries that had one to watch, and those a live lease or lock holds. Nothing is held meanwhile: the removal that
 * follows takes the entry's lock and reads its leases again, and a lease taken since, or one that moved, keeps the entry.
 */
export async function watchEntries(cacheDir: string, names: readonly string[], o: EntryOptions = {}): Promise<{ still: StillBeats; watched: string[]; held: string[] }> {
  const still: StillBeats = o.still ?? new Map();
  const dirs = names.map((n) => path.join(cacheDir, n));
  // Each look in the bound, none around a watch's sleeps.
  const seen = { still, ...(o.signal ? { signal: o.signal } : {}), ...(o.bound ? { bound: o.bound.calls } : {}) };
  const [leases, locks] = await Promise.all([
    leaseStates(dirs, o.leaseStaleMs ?? LEASE_STALE_MS, seen),
    inspectHolders(dirs.map((d) => `${d}.lock`), { staleMs: o.lockStaleMs ?? 30_000, ...seen }),
  ]);
  return { still, watched: names.filter((_, i) => leases[i]!.watched > 0 || locks[i]?.watched), held: names.filter((_, i) => leases[i]!.live.length > 0 || locks[i]?.live) };
}

/**
 * Deletes what evictions that died midway left (their folders were already out of any entry's name); `dryRun`: only
 * measures it. Resolves to the bytes it occupied.
 */
export async function emptyTrash(cacheDir: string, o: { dryRun?: boolean; bound?: Bound } = {}): Promise<number> {
  const io = o.bound ?? direct;
  const ents = await io(() => fsp.readdir(cacheDir)).catch(() => [] as string[]);
  let bytes = 0;
  for (const n of ents.filter((x) => x.startsWith(TRASH_PREFIX))) {
    const p = path.join(cacheDir, n);
    bytes += await freedBy([p], io);
    if (!o.dryRun) await removeTree(p, o.bound).catch(() => undefined);
  }
  return bytes;
}

/**
 * Deletes the LoRA adapter-set work folders no live process leases (a crashed or OOM-killed server's: its patched
 * weights, and hard links that keep an evicted entry's UNet data allocated); `dryRun`: only measures them. The servers
 * sweep them a minute after a start with LoRA on; this is for a cache no such server starts on. Resolves to the bytes
 * only they held.
 */
export async function emptyAdapterSets(cacheDir: string, o: { dryRun?: boolean; leaseStaleMs?: number; signal?: AbortSignal; bound?: Bound } = {}): Promise<number> {
  let bytes = 0;
  await sweepUnleased(path.join(cacheDir, LORA_SETS), {
    ...(o.dryRun ? { dryRun: true } : {}), ...(o.leaseStaleMs !== undefined ? { staleMs: o.leaseStaleMs } : {}), ...(o.signal ? { signal: o.signal } : {}),
    ...(o.bound ? { bound: o.bound } : {}),
    going: async (dir) => void (bytes += await freedBy([dir], o.bound)),
  });
  return bytes;
}

/**
 * Deletes the lease folders (`.leases/<key>/`) of entries that are not there and that no live process leases: what a
 * server leaves when its entry never came (a STORAGE_URI with no objects) or was deleted by hand. Each under the key's
 * lock, as an eviction: a lease being taken at that moment is seen, or withdraws and is taken again (lease.ts). Leases
 * that look old on this clock are watched first, every folder's together (watchEntries). Resolves to how many went.
 */
export async function emptyOrphanLeases(cacheDir: string, o: EntryOptions = {}): Promise<number> {
  let n = 0;
  const orphans: string[] = [];
  for (const name of await fsp.readdir(path.join(cacheDir, LEASES)).catch(() => [] as string[])) if (!(await exists(path.join(cacheDir, name)))) orphans.push(name);
  const { still } = await watchEntries(cacheDir, orphans, o);
  const seen = { still, ...(o.signal ? { signal: o.signal } : {}) };
  for (const name of orphans) {
    const dir = path.join(cacheDir, name);
    const lock = await acquireLock(`${dir}.lock`, { wait: false, purpose: 'evict', staleMs: o.lockStaleMs ?? 30_000, ...seen });
    if (lock === undefined) continue;
    try {
      // Not watched again: a lease that looks old and moved, or came since, keeps the folder.
      const leases = await leaseState(dir, o.leaseStaleMs ?? LEASE_STALE_MS, { confirmMs: 0, ...seen });
      if ((await exists(dir)) || leases.live.length > 0 || leases.unwatched > 0) continue;
      // Taken over while this process stood still after the read above: a lease published since is its taker's.
      if (!(await lock.mine())) continue;
      try {
        await fsp.rm(leasesDir(dir), { recursive: true, force: true });
      } catch (err) {
        // A lease published while the folder was being emptied: its taker sees this lock, withdraws and leases again.
        if ((err as NodeJS.ErrnoException).code === 'ENOTEMPTY') continue;
        throw err;
      }
      n++;
    } finally {
      await lock.release();
    }
  }
  return n;
}

/**
 * Deletes the temps of lock and lease files that a process killed while writing one left (lock.ts sweepHolderTemps):
 * beside the entries' locks, in every entry's lease folder and in the adapter sets' lease folders, each by the rule of
 * the files beside it (30 s for a lock, LEASE_STALE_MS for a lease). Resolves to how many went.
 */
export async function emptyHolderTemps(cacheDir: string, o: EntryOptions = {}): Promise<number> {
  let n = await sweepHolderTemps(cacheDir, o.lockStaleMs ?? 30_000);
  for (const leases of [path.join(cacheDir, LEASES), path.join(cacheDir, LORA_SETS, LEASES)]) {
    for (const name of await fsp.readdir(leases).catch(() => [] as string[])) n += await sweepHolderTemps(path.join(leases, name), o.leaseStaleMs ?? LEASE_STALE_MS);
  }
  return n;
}

export interface MakeRoomOptions extends EntryOptions {
  /** The entry being downloaded: never a candidate. */
  exclude: string;
  /** Called after each removal. */
  onEvicted?(e: CacheEntry): void;
}

export interface RoomResult {
  /** Bytes the removed entries occupied (and trash left by an earlier eviction). */
  freed: number;
  /** Bytes removing every entry that could go would free (and that trash): what the NO_SPACE message says. */
  freeable: number;
  evicted: CacheEntry[];
  /** The entries that stayed (for the NO_SPACE message), least recently used first. */
  left: CacheEntry[];
  /** The entries whose leases or lock it watched (watchEntries: all in one watch), and how long that took (ms). */
  watched: { entries: string[]; ms: number };
}

/**
 * Removes least recently used entries that nobody fills or serves from until `need` bytes (beyond what is free) are
 * freed, superseded versions first (no process will serve from them again), after what belongs to nobody: the trash of
 * an interrupted eviction and the adapter sets of servers gone (whose hard links would keep an entry's weights
 * allocated after it went). Each counts what it really frees (freedBy). When removing every such entry would not be
 * enough, none is removed: the download fails either way.
 *
 * An entry whose lease or lock looks older than its limit on this clock (`unconfirmed`: a pod killed elsewhere, or a
 * live one whose clock is off) goes only after watching them: so when the entries that need no watching are enough,
 * they go (in that order) and nothing is watched; otherwise the others are watched first, all together, once
 * (watchEntries), and the entries go in that order, those that needed no watching first. A download waits at most one
 * watch for room, however many such entries the cache holds.
 */
export async function makeRoom(cacheDir: string, need: number, o: MakeRoomOptions): Promise<RoomResult> {
  // A caller's bound (EntryOptions.bound) runs each call on the volume below alone: the walks and removals name by name.
  const io = o.bound?.calls;
  const bound = io ? { bound: io } : {};
  let freed = need > 0 ? (await emptyTrash(cacheDir, bound)) + (await emptyAdapterSets(cacheDir, {
    ...(o.leaseStaleMs !== undefined ? { leaseStaleMs: o.leaseStaleMs } : {}), ...(o.signal ? { signal: o.signal } : {}), ...bound })) : 0;
  const all = await listEntries(cacheDir, { ...o, watch: false });
  const idle = all.filter((e) => e.name !== o.exclude && !inUse(e));
  const candidates = [...idle.filter((e) => e.superseded), ...idle.filter((e) => !e.superseded)];
  const sure = candidates.filter((e) => !e.unconfirmed);
  const unsure = candidates.filter((e) => e.unconfirmed);
  const evicted: CacheEntry[] = [];
  const gone = new Set<string>();
  const watched = { entries: [] as string[], ms: 0 };
  const dirs = (entries: readonly CacheEntry[]) => entries.map((e) => path.join(cacheDir, e.name));
  let freeable = freed + (await freedBy(dirs(candidates), io));
  let still: StillBeats | undefined;
  /** Watches the entries' leases and locks together; resolves to the candidates left that no live one holds, those that needed no watching first. */
  const watch = async (entries: readonly CacheEntry[]) => {
    const t0 = performance.now();
    const w = await watchEntries(cacheDir, entries.map((e) => e.name), o);
    watched.entries.push(...w.watched);
    watched.ms += performance.now() - t0;
    still = w.still;
    return [...sure, ...unsure].filter((e) => !w.held.includes(e.name) && !gone.has(e.name));
  };
  const remove = async (entries: readonly CacheEntry[]) => {
    for (const e of entries) {
      if (freed >= need) break;
      if (gone.has(e.name)) continue;
      // Not watched here: a heartbeat that looks old and is not in `still` (met only now, say) keeps the entry.
      const r = await removeEntry(cacheDir, e.name, { ...o, watch: false, ...(still ? { still } : {}) });
      if (!r.removed) continue;
      freed += r.bytes;
      const out = { ...e, bytes: r.bytes };
      evicted.push(out);
      gone.add(e.name);
      o.onEvicted?.(out);
    }
  };
  /** Removes the entries, in order, only if together they can make the room still missing. */
  const removeIfEnough = async (entries: readonly CacheEntry[]) => {
    freeable = freed + (await freedBy(dirs(entries), io));
    if (freeable >= need) await remove(entries);
  };
  if (freed < need && freeable >= need) {
    if (freed + (await freedBy(dirs(sure), io)) < need) {
      // What needs no watching is not enough: the rest is watched first, and nothing goes unless enough can.
      await removeIfEnough(await watch(unsure));
    } else {
      await remove(sure);
      // One that needed no watching when listed was leased or locked since: what is left is watched now, and goes
      // only if it makes the room still missing.
      if (freed < need) await removeIfEnough(await watch(candidates.filter((e) => !gone.has(e.name))));
    }
  }
  return { freed, freeable, evicted, left: all.filter((e) => !gone.has(e.name) && e.name !== o.exclude), watched };
}

/** Minutes are enough to tell entries apart, and keep the line short. */
export const shortTime = (d: Date): string => `${d.toISOString().slice(0, 16)}Z`;

/** The other entries, as one clause of a NO_SPACE message: names, sizes, last use, in use or not; at most `max`. */
export function describeEntries(entries: readonly CacheEntry[], max = 8): string {
  if (entries.length === 0) return 'the cache holds no other entry';
  const shown = entries.slice(0, max).map((e) => {
    const use = e.users.length > 0 ? ', in use' : e.lockedFor !== undefined ? `, locked while ${e.lockedFor} is filled` : e.locked !== undefined ? ', being filled' : '';
    const old = e.superseded ? ', an older version' : '';
    return `${e.name} (${mb(e.bytes)} MB${e.state === 'partial' ? ' partial' : ''}, last used ${shortTime(e.lastUsed)}${use}${old})`;
  });
  const more = entries.length > max ? `, and ${entries.length - max} more` : '';
  return `the cache also holds ${shown.join(', ')}${more}`;
}
