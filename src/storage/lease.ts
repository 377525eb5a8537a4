/**
 * @module Leases: a serving process marks the cache entry it serves from as in use for as long as it runs, so that an
 * eviction (entries.ts) on any pod of an RWX PVC never removes it.
 *
 *   <cacheDir>/.leases/<key>/<host>-<pid>-<token>.lease   one per process: the lock's holder record (lock.ts), written
 *                                                         whole and linked into place, its mtime a heartbeat
 *   <cacheDir>/.leases/<key>/last-used                     touched when a lease ends: the entry's last use, for LRU
 *
 * Outside the entry, so a sweep of the entry never touches them, and in one hidden folder, so the cache's top level
 * still holds only entries (and their locks while held). A lease counts while its heartbeat is
 * fresh and its pid is alive (when it is in this process's pid namespace): the lock's rule (lock.ts), with minutes instead of seconds, since a
 * server holds one for days and pays one small write per heartbeat, off the request path. A heartbeat older than
 * that on the reader's clock may be a live server's on a node whose clock is behind: what removes an entry or a
 * folder on that account (an eviction, a prune, a refresh in place, a sweep) watches it for two heartbeats first.
 *
 * Against an eviction that starts at the same moment, a lease is taken as in Dekker's algorithm: publish the lease,
 * then read the entry's lock; an evictor takes the lock (purpose `evict`), then reads the leases. One of the two sees
 * the other: the evictor skips an entry with a live lease, and a new lease that sees a live `evict` lock withdraws and
 * waits for it to go. A lease whose file vanished meanwhile (an evictor removes the leases with the entry) is taken
 * again. So once leaseEntry returns, the entry is not evicted until release().
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { ENTRY_MARKERS, mkdirs } from './cache.js';
import { shortage } from '../descriptors.js';
import { direct, exists, removeTree, type Bound } from '../files.js';
import { trackIo } from './pending-io.js';
import { acquireLock, createHolderFile, hold, holderInfo, inspectHolder, inspectHolders, sleep, type HeldLock, type InspectOptions, type LockInfo } from './lock.js';

/** The folder, under the cache, of every entry's leases. */
export const LEASES = '.leases';
export const LAST_USED = 'last-used';
const LEASE_EXT = '.lease';

/** A serving process's heartbeat and the age after which its lease no longer counts. */
export const LEASE_HEARTBEAT_MS = 30_000;
export const LEASE_STALE_MS = 180_000;

export interface LeaseOptions {
  heartbeatMs?: number;
  /** How often a lease that met an eviction in progress looks again (ms). */
  pollMs?: number;
  signal?: AbortSignal;
  /** The lease file vanished while held (its heartbeat was missed for LEASE_STALE_MS and an eviction ran). */
  onLost?(entryGone: boolean): void;
}

export interface EntryLease {
  /** The lease file (inside the cache). */
  readonly path: string;
  /** The entry folder it leases. */
  readonly entry: string;
  /** Replaces LeaseOptions.onLost (a lease taken before a logger existed gets one later). */
  onLost(fn: (entryGone: boolean) => void): void;
  release(): Promise<void>;
}

export const leasesDir = (entryDir: string): string => path.join(path.dirname(entryDir), LEASES, path.basename(entryDir));

export interface LeaseState {
  /** Live leases: who serves from the entry now. */
  live: LockInfo[];
  /** The newest heartbeat or end of any lease, stale ones included (undefined: never leased). */
  lastUsedMs: number | undefined;
  /** Leases not in `live` whose heartbeat looks old or far ahead on this clock and was not watched (confirmMs 0). */
  unwatched: number;
  /** Leases whose heartbeat looked old or far ahead on this clock and were watched (in `live` if they moved). */
  watched: number;
}

/**
 * Who holds a lease on the entry, and when it was last used by a lease. A lease whose heartbeat looks older than
 * `staleMs` (or that far ahead) on this process's clock is watched for `confirmMs` (default staleMs / 3: two heartbeats),
 * all of the entry's together, and counts if it moves meanwhile; 0: it does not count (a listing, which removes
 * nothing). Throws only when out of descriptors (EMFILE, ENFILE): an unread lease folder or lease would count as none,
 * and its entry could be evicted while a pod serves it.
 */
export async function leaseState(entryDir: string, staleMs = LEASE_STALE_MS, o: LeaseWatch = {}): Promise<LeaseState> {
  return (await leaseStates([entryDir], staleMs, o))[0]!;
}

export type LeaseWatch = Pick<InspectOptions, 'confirmMs' | 'still' | 'signal' | 'bound'>;

/** leaseState of each entry, the leases of them all watched together (one watch, not one per entry). */
export async function leaseStates(entryDirs: readonly string[], staleMs = LEASE_STALE_MS, o: LeaseWatch = {}): Promise<LeaseState[]> {
  const files: string[][] = [];
  const lastUsed: Array<number | undefined> = [];
  const io = o.bound ?? direct;
  for (const entryDir of entryDirs) {
    const dir = leasesDir(entryDir);
    const names = await io(() => fsp.readdir(dir)).catch((e: unknown) => {
      if (shortage(e)) throw e;
      return [] as string[];
    });
    const st = names.includes(LAST_USED) ? await io(() => fsp.stat(path.join(dir, LAST_USED))).catch(() => undefined) : undefined;
    lastUsed.push(st?.mtimeMs);
    files.push(names.filter((n) => n.endsWith(LEASE_EXT)).map((n) => path.join(dir, n)));
  }
  // An unreadable lease is a creator's temp never linked (createHolderFile writes it whole first): it counts like a lock.
  const all = await inspectHolders(files.flat(), { staleMs, ...o });
  let at = 0;
  return files.map((own, k) => {
    let lastUsedMs = lastUsed[k];
    const live: LockInfo[] = [];
    let unwatched = 0;
    let watched = 0;
    for (const h of all.slice(at, at += own.length)) {
      if (h === undefined) continue;
      lastUsedMs = Math.max(lastUsedMs ?? 0, h.mtimeMs);
      if (h.live) live.push(h.holder ?? { pid: 0, host: '?', token: '?', since: '' });
      else if (h.unwatched) unwatched++;
      if (h.watched) watched++;
    }
    return { live, lastUsedMs, unwatched, watched };
  });
}

/** Whether `entryDir` is a cache entry: committed, or being filled (ENTRY_MARKERS). */
export async function isEntry(entryDir: string): Promise<boolean> {
  for (const m of ENTRY_MARKERS) if (await exists(path.join(entryDir, m))) return true;
  return false;
}

/**
 * Marks the entry at `entryDir` in use by this process until release(). Take it before reading the entry (or filling
 * it): whatever was there when it returns stays there. The entry need not exist yet.
 */
export async function leaseEntry(entryDir: string, o: LeaseOptions = {}): Promise<EntryLease> {
  const dir = leasesDir(entryDir);
  const heartbeatMs = o.heartbeatMs ?? LEASE_HEARTBEAT_MS;
  for (;;) {
    o.signal?.throwIfAborted();
    const me = holderInfo();
    const file = path.join(dir, `${me.host.replace(/[^A-Za-z0-9._-]+/g, '-').slice(0, 64)}-${me.pid}-${me.token}${LEASE_EXT}`);
    await mkdirs(dir);
    try {
      await createHolderFile(file, me);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // the folder went with an evicted entry: again
      throw e;
    }
    // Only an eviction's lock matters here: a fill's (or none) is not watched when its heartbeat looks old.
    const lock = await inspectHolder(`${entryDir}.lock`, { confirmMs: 0 });
    let evicting = lock?.holder?.purpose === 'evict' && lock.live;
    if (lock?.holder?.purpose === 'evict' && !lock.live) {
      // Its heartbeat looks old on this clock: watched once (its evictor may be on a node whose clock is behind). One
      // that stood still is taken over and removed, so that no later start watches it again.
      const abandoned = await acquireLock(`${entryDir}.lock`, { wait: false, signal: o.signal });
      if (abandoned) await abandoned.release();
      else evicting = true;
    }
    if (evicting) {
      await fsp.unlink(file).catch(() => undefined);
      await sleep(o.pollMs ?? 250, o.signal);
      continue;
    }
    if (!(await exists(file))) continue;
    return keep(entryDir, file, me, heartbeatMs, o);
  }
}

function keep(entryDir: string, file: string, me: LockInfo, heartbeatMs: number, o: LeaseOptions): EntryLease {
  let released = false;
  let lost = o.onLost;
  let held: HeldLock;
  const watch = () => {
    held = hold(file, me, heartbeatMs);
    held.lost.addEventListener('abort', () => void (async () => {
      if (released) return;
      // Only an eviction removes a lease; it judged this one stale (a heartbeat missed for minutes). The entry is taken
      // again if it is still there, so the next one skips it.
      const gone = !(await isEntry(entryDir));
      lost?.(gone);
      if (gone || released) return;
      try {
        await mkdirs(path.dirname(file));
        await createHolderFile(file, me);
      } catch {
        /* the next heartbeat tries again */
      }
      // Released while the file was being written again: no heartbeat will keep it, so it must not stay.
      if (released) await fsp.unlink(file).catch(() => undefined);
      else watch();
    })(), { once: true });
  };
  watch();
  return {
    path: file,
    entry: entryDir,
    onLost(fn) {
      lost = fn;
    },
    async release() {
      if (released) return;
      released = true;
      // The last use is recorded before the lease goes, so the entry's last use never moves back.
      const stamp = path.join(path.dirname(file), LAST_USED);
      await trackIo('writeFile', stamp, () => fsp.writeFile(stamp, new Date().toISOString())).catch(() => undefined);
      await held.release();
    },
  };
}

/** A folder named before leases existed: `<host>-<pid>-w<k>`, `<host>-<ns>-<pid>-w<k>`. */
const LEGACY_SET = /-\d+-w\d+$/;

/**
 * Removes the folders under `base` that no live process leases (a crash's, or a killed pod's, left behind), and their
 * stale leases. Folders named before leases existed (LEGACY_SET) carry none: they go once untouched for `legacyMaxAgeMs`. Returns the names removed. For folders a process creates only after it leases
 * them (the adapter sets' work folders), so one without a live lease is nobody's. Leases that look stale on this
 * process's clock are watched (leaseStates), every folder's together, before any folder goes; a dry run, which removes
 * nothing, judges them by the clock alone.
 */
export async function sweepUnleased(base: string, o: {
  legacyMaxAgeMs?: number;
  staleMs?: number;
  /** Only says which would go. */
  dryRun?: boolean;
  /** Called with each folder that goes, before it goes (to measure it). */
  going?(dir: string): Promise<void>;
  /** Ends the watch at once (rejects with its reason). */
  signal?: AbortSignal;
  /**
   * Runs each of its calls on the volume alone (none between a watch's looks), removals name by name: a caller's bound
   * on the pool threads a volume that stops answering keeps (a LoRA adapter's fetch making room). None: unbounded.
   */
  bound?: Bound;
} = {}): Promise<string[]> {
  const io = o.bound ?? direct;
  const folders: string[] = [];
  const oldLegacy = new Set<string>();
  for (const name of await io(() => fsp.readdir(base)).catch(() => [] as string[])) {
    if (name.startsWith('.')) continue;
    const st = await io(() => fsp.stat(path.join(base, name))).catch(() => undefined);
    if (!st?.isDirectory()) continue;
    folders.push(name);
    if (LEGACY_SET.test(name) && Date.now() - st.mtimeMs > (o.legacyMaxAgeMs ?? 86_400_000)) oldLegacy.add(name);
  }
  // One look at every folder's leases, and one watch of those that look stale (a dry run judges by the clock alone).
  const leased = folders.filter((n) => !LEGACY_SET.test(n));
  const states = await leaseStates(leased.map((n) => path.join(base, n)), o.staleMs ?? LEASE_STALE_MS, {
    ...(o.dryRun ? { confirmMs: 0 } : o.signal ? { signal: o.signal } : {}), ...(o.bound ? { bound: o.bound } : {}) });
  const unleased = new Set(leased.filter((_, i) => states[i]!.live.length === 0));
  const gone = folders.filter((n) => oldLegacy.has(n) || unleased.has(n));
  const removed: string[] = [];
  for (const name of gone) {
    const dir = path.join(base, name);
    await o.going?.(dir);
    removed.push(name);
    if (o.dryRun) continue;
    await removeTree(dir, o.bound).catch(() => undefined);
    await removeTree(leasesDir(dir), o.bound).catch(() => undefined);
  }
  return removed;
}
