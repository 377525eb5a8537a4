/**
 * @module A lock file for one cache entry that works on an RWX NFS-like PVC (no flock): written whole to a temp
 * name, then linked to the lock's name (link never replaces a file, so exactly one creator wins, and the lock never
 * exists without its content), holding pid/host/token, kept fresh by touching its mtime (a heartbeat). A lock whose
 * heartbeat stopped, whose pid is dead in this pid namespace, or that does not say who made it, is taken over by
 * renaming it aside first, so only one of several waiters can win the takeover.
 *
 * A heartbeat is stamped with its holder's clock, which may be minutes off this process's on another node: its age on
 * this process's wall clock only vouches for a holder, never condemns one. A heartbeat stopped when it has not moved
 * (mtime, ctime, size, inode, holder) for `staleMs` of this process's monotonic clock, or for `confirmMs` when the
 * wall clock does not vouch for it either (older than `staleMs`, or that far ahead); a one-shot reader (an eviction, a
 * prune, a listing) that finds such a heartbeat watches it that long before it counts it stopped.
 *
 * A waiter writes nothing while the lock stands: each poll reads the lock and stats it (and whatever `satisfied` reads),
 * and a new lock is written only once the old one is gone or stale, so N replicas waiting on an NFS volume cost it a few
 * metadata reads each per poll, not N file creations with an fsync. On the holder's own node, inotify (fs.watch on the
 * lock's folder) ends a wait as soon as the lock is removed; elsewhere the poll does.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, readFileSync, readlinkSync, watch, type FSWatcher, type Stats } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { shortage } from '../descriptors.js';
import { direct, type Bound } from '../files.js';
import { RuntimeError } from '../errors.js';
import { trackIo } from './pending-io.js';

export interface LockOptions {
  /** Heartbeat period (ms). */
  heartbeatMs?: number;
  /** A heartbeat that has not moved for this long (this process's monotonic clock) means the holder is gone (ms). */
  staleMs?: number;
  /**
   * A heartbeat that this process's wall clock does not vouch for (older than `staleMs`, or that far ahead: its holder's
   * clock may be off) means the holder is gone once it has not moved for this long (ms; default staleMs / 3).
   */
  confirmMs?: number;
  /** How often a waiter looks again (ms). */
  pollMs?: number;
  /**
   * An empty or unreadable lock older than this is stale (ms): a creator that links its lock never leaves one, and
   * one that wrote it after creating it (an older release) did so within milliseconds.
   */
  unreadableStaleMs?: number;
  signal?: AbortSignal;
  /**
   * Runs each of the lock's calls on the volume: its creation, a waiter's looks, a takeover, the watch's open, and the
   * held lock's heartbeat and release (hold's `bound`). Not `satisfied` nor `onWait`: the caller's, bounded by it.
   */
  bound?: Bound;
  /** Called while waiting, once per poll, with what the lock says about its holder; a promise it returns is awaited. */
  onWait?(holder: LockInfo | undefined): unknown;
  /** Checked on every poll: when it returns true the caller no longer needs the lock (e.g. the entry got committed). */
  satisfied?(): Promise<boolean>;
  /** false: resolve to `undefined` at once when a live process holds the lock (a stale one is still taken over). */
  wait?: boolean;
  /** Why the lock is held, written into it for others to read (`evict`: the entry is about to be removed, see lease.ts). */
  purpose?: string;
  /** Heartbeats a watch already saw stand still (inspectHolders): a lock that still shows one is taken over at once. */
  still?: StillBeats;
}

export interface LockInfo {
  pid: number;
  host: string;
  /** The holder's pid namespace (the kernel's boot and the namespace's inode): where `pid` means that process. */
  pidns?: string;
  token: string;
  since: string;
  purpose?: string;
}

export interface HeldLock {
  readonly path: string;
  /** Aborted if the lock is lost (taken over by another process): the holder must stop writing. */
  readonly lost: AbortSignal;
  /** Whether the lock still names this holder, read now (`lost` tells only at the next heartbeat). */
  mine(): Promise<boolean>;
  release(): Promise<void>;
}

const DEFAULTS = { heartbeatMs: 2_000, staleMs: 30_000, pollMs: 250, unreadableStaleMs: 3_000 };

/** What the lock says about its holder: the info, 'unreadable' (missing, empty, not JSON), or 'unknown' (JSON, but not a holder). */
export async function readInfo(file: string): Promise<LockInfo | 'unreadable' | 'unknown'> {
  let x: unknown;
  try {
    x = JSON.parse(await fsp.readFile(file, 'utf8'));
  } catch (e) {
    // No descriptor to read it with says nothing about the file: never judged unreadable (and so stale) for that.
    if (shortage(e)) throw e;
    return 'unreadable';
  }
  const i = x as Partial<LockInfo> | null;
  const ok = typeof i === 'object' && i !== null && Number.isSafeInteger(i.pid) && typeof i.host === 'string' && i.host !== '' && typeof i.token === 'string' && i.token !== '';
  return ok ? (i as LockInfo) : 'unknown';
}

export const holderOf = (i: Awaited<ReturnType<typeof readInfo>>): LockInfo | undefined => (typeof i === 'object' ? i : undefined);

/**
 * This process's pid namespace, as `<boot id>/pid:[<inode>]` (Linux; undefined elsewhere). A hostname does not tell
 * whose pids a holder's are: pods with hostNetwork share their node's, a pod template's `hostname` names every
 * replica alike, and each container numbers its processes from 1 in its own namespace.
 */
export const PID_NS: string | undefined = (() => {
  try {
    return `${readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()}/${readlinkSync('/proc/self/ns/pid')}`;
  } catch {
    return undefined;
  }
})();

/** A holder record for this process: pid, host, pid namespace, a fresh random token, now. */
export function holderInfo(purpose?: string): LockInfo {
  return { pid: process.pid, host: os.hostname(), ...(PID_NS ? { pidns: PID_NS } : {}), token: randomBytes(8).toString('hex'), since: new Date().toISOString(), ...(purpose ? { purpose } : {}) };
}

type Info = Awaited<ReturnType<typeof readInfo>>;

/**
 * Whether a holder file no longer counts whatever its heartbeat: its pid is dead in this process's pid namespace (same
 * host, same namespace: a pid from another container's namespace says nothing here, and a holder that did not record
 * its namespace is judged by its heartbeat alone), it names no holder, or it is unreadable and older than
 * `unreadableStaleMs`.
 */
function abandoned(info: Info, ageMs: number, unreadableStaleMs: number): boolean {
  const holder = holderOf(info);
  const deadHere = holder !== undefined && holder.host === os.hostname() && holder.pidns === PID_NS && holder.pid !== process.pid && !pidAlive(holder.pid);
  // A lock that does not say who holds it cannot be waited for: nobody would ever release or refresh it for sure.
  const orphan = info === 'unknown' || (info === 'unreadable' && ageMs > unreadableStaleMs);
  return deadHere || orphan;
}

/** Whether a holder file no longer counts by its age alone on this process's wall clock (abandoned, or older than `staleMs`): for the temps beside the holder files, which no holder beats. */
export function isStale(info: Info, ageMs: number, o: { staleMs: number; unreadableStaleMs: number }): boolean {
  return ageMs > o.staleMs || abandoned(info, ageMs, o.unreadableStaleMs);
}

/** One look at a holder file: what it says, then its stat (on NFS the open that reads it revalidates what stat gives: close-to-open). */
interface Look {
  info: Info;
  st: Stats;
}

async function look(file: string): Promise<Look | undefined> {
  const info = await readInfo(file);
  const st = await fsp.stat(file).catch(() => undefined);
  return st && { info, st };
}

/** What a heartbeat (mtime, and ctime, which every utimes moves on the file system's own clock), a rewrite, or a new holder (inode, token) changes. */
const beatOf = (l: Look): string => `${holderOf(l.info)?.token ?? l.info}:${l.st.ino}:${l.st.size}:${l.st.mtimeMs}:${l.st.ctimeMs}`;

/**
 * One look's verdict: `stale` (abandoned), `live` (its heartbeat is under `staleMs` old on this process's wall clock,
 * or less far ahead), or `unsure`: older or further ahead than that, which a holder on a node whose clock is off shows
 * while it beats; only watching it tells.
 */
function judge(l: Look, o: { staleMs: number; unreadableStaleMs: number }): 'live' | 'stale' | 'unsure' {
  const ageMs = Date.now() - l.st.mtimeMs;
  if (abandoned(l.info, ageMs, o.unreadableStaleMs)) return 'stale';
  return Math.abs(ageMs) <= o.staleMs ? 'live' : 'unsure';
}

/**
 * Heartbeats that a watch saw stand still for its whole length (inspectHolders), by file: what each showed then. A file
 * that still shows it has stood still longer yet, so it counts as gone without being watched again: one watch of many
 * files serves the removals that follow it one by one, each under its own lock.
 */
export type StillBeats = Map<string, string>;

/** `judge`, except that a heartbeat in `still` that has not moved since is stale. */
const verdict = (file: string, l: Look, o: { staleMs: number; unreadableStaleMs: number }, still?: StillBeats) =>
  still?.get(file) === beatOf(l) ? 'stale' as const : judge(l, o);

/** A watcher's memory of a holder file's heartbeat: the last one it saw, since when (its monotonic clock), and whether it ever moved. */
class Heartbeat {
  #beat: string | undefined;
  #since = 0;
  moved = false;

  /** Records a look; returns how long (ms) the heartbeat has stood still as this process saw it. */
  still(l: Look): number {
    const now = performance.now();
    const b = beatOf(l);
    if (b !== this.#beat) {
      this.moved ||= this.#beat !== undefined;
      this.#beat = b;
      this.#since = now;
    }
    return now - this.#since;
  }
}

/** How often a one-shot reader looks again at a heartbeat it watches. */
const watchPollMs = (confirmMs: number): number => Math.min(1_000, Math.max(20, confirmMs / 20));

/** Resolves after `ms`, or rejects with the signal's reason once it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
    const onAbort = () => { clearTimeout(t); reject(signal?.reason); };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Whether two holder records name the same process (its pid, host and pid namespace). */
export const sameProcess = (a: Pick<LockInfo, 'pid' | 'host' | 'pidns'>, b: Pick<LockInfo, 'pid' | 'host' | 'pidns'>): boolean =>
  a.pid === b.pid && a.host === b.host && a.pidns === b.pidns;

/** Whether a holder record is this process's own. */
export const isOwn = (h: LockInfo): boolean => sameProcess(h, { pid: process.pid, host: os.hostname(), pidns: PID_NS });

export interface HolderState {
  holder: LockInfo | undefined;
  /** Its last heartbeat, on its holder's clock. */
  mtimeMs: number;
  live: boolean;
  /** Its heartbeat looks old or far ahead on this process's clock and was not watched (confirmMs 0): its holder may live. */
  unwatched?: true;
  /** Its heartbeat looked old or far ahead on this process's clock and was watched (`live`: it moved). */
  watched?: true;
}

export interface InspectOptions {
  staleMs?: number;
  unreadableStaleMs?: number;
  /** How long a heartbeat this process's wall clock does not vouch for is watched (ms; default staleMs / 3; 0: not watched, it does not count). */
  confirmMs?: number;
  /** Heartbeats already seen standing still: one that has not moved since does not count, unwatched; those this call sees stand still are added. */
  still?: StillBeats;
  /** Ends a watch at once (rejects with its reason). */
  signal?: AbortSignal;
  /** Runs each look at a file (its read and stat) on the volume: the caller's bound (none between looks, while it watches). */
  bound?: Bound;
}

/**
 * The holders of lock or lease files and whether each still counts (undefined: no such file), for a reader that looks
 * once. A heartbeat under `staleMs` old on this process's wall clock counts at once; one older or that far ahead is
 * watched, all of them together, until it moves (it counts: its holder beats, on a clock that is off) or for
 * `confirmMs` (it does not; recorded in `still`). Reads one file at a time, as the lock's waiters do.
 */
export async function inspectHolders(files: readonly string[], o: InspectOptions = {}): Promise<Array<HolderState | undefined>> {
  const j = { staleMs: o.staleMs ?? DEFAULTS.staleMs, unreadableStaleMs: o.unreadableStaleMs ?? DEFAULTS.unreadableStaleMs };
  const confirmMs = o.confirmMs ?? j.staleMs / 3;
  const state = (l: Look, live: boolean): HolderState => ({ holder: holderOf(l.info), mtimeMs: l.st.mtimeMs, live });
  const lookAt = (file: string) => (o.bound ? o.bound(() => look(file)) : look(file));
  const out: Array<HolderState | undefined> = [];
  const unsure = new Map<number, string>();
  for (const [i, file] of files.entries()) {
    const l = await lookAt(file);
    const v = l && verdict(file, l, j, o.still);
    const watched = v === 'unsure' && confirmMs > 0;
    out.push(l && { ...state(l, v === 'live'), ...(v === 'unsure' ? (watched ? { watched: true as const } : { unwatched: true as const }) : {}) });
    if (l && watched) unsure.set(i, beatOf(l));
  }
  const t0 = performance.now();
  while (unsure.size > 0 && performance.now() - t0 < confirmMs) {
    await sleep(watchPollMs(confirmMs), o.signal);
    for (const [i, beat] of unsure) {
      const l = await lookAt(files[i]!);
      if (l !== undefined && beatOf(l) === beat) continue;
      // Released, or moved: a heartbeat, or a new holder (whose file was just made).
      out[i] = l && { ...state(l, judge(l, j) !== 'stale'), watched: true };
      unsure.delete(i);
    }
  }
  for (const [i, beat] of unsure) o.still?.set(files[i]!, beat);
  return out;
}

/** The holder of a lock or lease file and whether it still counts (inspectHolders); undefined when there is no such file. */
export async function inspectHolder(file: string, o: InspectOptions = {}): Promise<HolderState | undefined> {
  return (await inspectHolders([file], o))[0];
}

/** The names createHolderFile (`.new.`) and a takeover (`.stale.`, acquireLock) give a holder file's temps: `<file>.new.<token>`. */
const HOLDER_TEMP = /\.(new|stale)\.[0-9a-f]{16}$/;

/**
 * Deletes the temps beside the holder files in `dir` that no live process can own, and resolves to how many went. A
 * process holds one for the milliseconds between its creation and its unlink; one killed then (SIGKILL, the OOM
 * killer, a lost node) leaves it for good. The rule of the holder files beside them (isStale, with their `staleMs`), on
 * the later of mtime and ctime (a rename or link touches ctime, which no utimes can set back): a `.new.` temp names its
 * creator, so it goes once that pid is dead here, or once untouched for staleMs whatever it holds (empty: its creator
 * died before writing it); a `.stale.` one names the holder a takeover moved aside, not the process moving it, so it
 * goes on age alone. Deleting a temp its writer still uses would fail that writer's link.
 */
export async function sweepHolderTemps(dir: string, staleMs: number): Promise<number> {
  let n = 0;
  for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
    const kind = HOLDER_TEMP.exec(name)?.[1];
    if (kind === undefined) continue;
    const file = path.join(dir, name);
    const st = await fsp.lstat(file).catch(() => undefined);
    if (!st?.isFile()) continue;
    const ageMs = Date.now() - Math.max(st.mtimeMs, st.ctimeMs);
    const gone = kind === 'stale' ? ageMs > staleMs : isStale(await readInfo(file), ageMs, { staleMs, unreadableStaleMs: staleMs });
    if (gone && (await fsp.unlink(file).then(() => true, () => false))) n++;
  }
  return n;
}

/** Creates `file` holding `me`, or fails with EEXIST. */
export async function createHolderFile(file: string, me: LockInfo): Promise<void> {
  const tmp = `${file}.new.${me.token}`;
  try {
    const fh = await fsp.open(tmp, 'wx');
    try {
      await fh.writeFile(JSON.stringify(me));
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.link(tmp, file);
  } finally {
    await fsp.unlink(tmp).catch(() => undefined);
  }
}

/** Whether a process with this pid runs in this pid namespace (EPERM: it does, as another user). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Acquires the lock, waiting while another live process holds it. Resolves to `undefined` when
 * `satisfied()` reports that the lock is no longer needed.
 */
export async function acquireLock(file: string, o: LockOptions = {}): Promise<HeldLock | undefined> {
  const { heartbeatMs, staleMs, pollMs, unreadableStaleMs } = { ...DEFAULTS, ...o };
  const confirmMs = o.confirmMs ?? staleMs / 3;
  const me = holderInfo(o.purpose);
  const io = o.bound ?? direct;
  const wake = new Wake(file, io);
  try {
    // The lock stood at the last look: no new one is written (a create, an fsync, a link) until it is gone or stale.
    let standing = false;
    let beat = new Heartbeat();
    for (;;) {
      o.signal?.throwIfAborted();
      if (!standing) {
        try {
          await io(() => createHolderFile(file, me));
          return hold(file, me, heartbeatMs, o.bound);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
      }
      if (o.satisfied && (await o.satisfied())) return undefined;
      const l = await io(() => look(file));
      if (l === undefined) {
        standing = false;
        continue; // released between our open and stat: try again at once
      }
      const holder = holderOf(l.info);
      const v = verdict(file, l, { staleMs, unreadableStaleMs }, o.still);
      const still = beat.still(l);
      if (v === 'stale' || still > staleMs || (v === 'unsure' && still > confirmMs)) {
        // Move the stale lock aside; only one waiter's rename succeeds. If what we moved is not the holder judged
        // (someone took over between our look and rename), put it back with link(), which never overwrites.
        const aside = `${file}.stale.${me.token}`;
        await io(async () => {
          await fsp.rename(file, aside);
          const moved = holderOf(await readInfo(aside));
          const stillStale = moved === undefined ? holder === undefined : moved.token === holder?.token;
          if (!stillStale) await fsp.link(aside, file).catch(() => undefined);
          await fsp.unlink(aside).catch(() => undefined);
        }).catch(() => {
          /* another waiter moved it first */
        });
        standing = false;
        beat = new Heartbeat();
        continue;
      }
      standing = true;
      // One that does not wait still watches a heartbeat its wall clock does not vouch for, until it moves or confirmMs.
      if (o.wait === false && (v === 'live' || beat.moved)) return undefined;
      if (o.wait === false) {
        await sleep(Math.min(pollMs, watchPollMs(confirmMs)), o.signal);
        continue;
      }
      wake.arm();
      await o.onWait?.(holder);
      await wake.sleep(pollMs, o.signal);
    }
  } finally {
    wake.close();
  }
}

/**
 * Ends a waiter's sleep early when the lock file is created, removed or renamed (a release, a commit, a takeover),
 * through inotify on the lock's folder. Only where the change is made by this kernel: an NFS client sees no events
 * for another node's changes, so the poll stays the bound there. A heartbeat (utimes) is a `change`, not a wake-up.
 */
class Wake {
  #watcher: FSWatcher | undefined;
  #tried = false;
  #closed = false;
  #pending = false;
  #wake: (() => void) | undefined;

  /** `io`: runs each of its calls on the volume (acquireLock's bound). */
  constructor(private readonly file: string, private readonly io: Bound) {}

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (this.#pending) {
      this.#pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      const done = () => {
        clearTimeout(t);
        signal?.removeEventListener('abort', onAbort);
        this.#wake = undefined;
      };
      const t = setTimeout(() => (done(), resolve()), ms);
      const onAbort = () => (done(), reject(signal?.reason));
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#wake = () => (done(), this.#pending = false, resolve());
    });
  }

  /**
   * Starts watching (once): a change from then on ends the next sleep. fs.watch is set synchronously, on the event
   * loop, and looks its path up: on a volume that stopped answering (a folder of a hung NFS mount; stuck-fs) that held
   * the loop, and every signal, for good. So the folder is opened in libuv's pool, as any other call on the volume, and
   * watched through its descriptor: the kernel follows /proc/self/fd/N to the open folder without asking the volume
   * for its name again (NFS not unless the folder's attributes, just refreshed by the open, have expired). A release
   * made before the watch was set raised no event it sees: the lock is looked at once more, watched, and found gone
   * that ends the sleep as the event would have.
   */
  arm(): void {
    if (this.#tried) return;
    this.#tried = true;
    const dir = path.dirname(this.file);
    void this.io(() => trackIo('open', dir, () => fsp.open(dir, 'r'))).then(
      async (folder) => {
        if (!this.#closed) this.#watch(`/proc/self/fd/${folder.fd}`);
        // The watch holds the folder itself, not the descriptor.
        await this.io(() => folder.close()).catch(() => undefined);
        if (this.#closed) return;
        await this.io(() => trackIo('stat', this.file, () => fsp.stat(this.file))).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'ENOENT' || this.#closed) return;
          this.#pending = true;
          this.#wake?.();
        });
      },
      () => undefined, // the poll alone
    );
  }

  /** `at`: the folder, as a path to it that the kernel resolves without the volume. */
  #watch(at: string): void {
    const name = path.basename(this.file);
    try {
      this.#watcher = watch(at, { persistent: false }, (type, f) => {
        if (type !== 'rename' || (f !== null && f.toString() !== name)) return;
        this.#pending = true;
        this.#wake?.();
      });
      this.#watcher.on('error', () => this.close());
    } catch {
      /* no inotify here (or its limit reached), or no /proc: the poll alone */
    }
  }

  close(): void {
    this.#closed = true;
    this.#watcher?.close();
    this.#watcher = undefined;
  }
}

/**
 * Keeps `file` (holding `me`) fresh by touching its mtime every `heartbeatMs`; `lost` aborts once it no longer holds `me`.
 * `bound` runs each call of the heartbeat and the release: the caller's bound on the pool threads that a volume that
 * stops answering keeps (the LoRA adapters' fetches share one; each lock's beat kept one more thread).
 */
export function hold(file: string, me: LockInfo, heartbeatMs: number, bound: Bound = direct): HeldLock {
  const io = <T>(op: string, call: () => Promise<T>) => bound(() => trackIo(op, file, call));
  const lost = new AbortController();
  let released = false;
  // One beat at a time: on a volume that stopped answering each would hold one of libuv's pool threads for good, and a
  // beat every period would soon hold them all (and every other file, DNS and zlib call of the process behind them).
  let beating = false;
  const beat = setInterval(() => {
    if (beating) return;
    beating = true;
    void (async () => {
      // Out of descriptors: not read, so not judged, but kept fresh (utimes needs no descriptor); the next beat judges.
      const read = await io('read', () => readInfo(file)).catch(() => undefined);
      if (released) return;
      const now = new Date();
      if (read === undefined) return void (await io('utimes', () => fsp.utimes(file, now, now)).catch(() => undefined));
      const info = holderOf(read);
      if (info?.token !== me.token) {
        clearInterval(beat);
        lost.abort(new RuntimeError('STORAGE_TRANSIENT', 'the cache lock of this model was taken over by another process (its heartbeat was missed); this fetch stops'));
        return;
      }
      await io('utimes', () => fsp.utimes(file, now, now)).catch(() => undefined);
    })().finally(() => (beating = false));
  }, heartbeatMs);
  beat.unref();
  return {
    path: file,
    lost: lost.signal,
    async mine() {
      const read = await io('read', () => readInfo(file)).catch(() => undefined);
      return !released && !lost.signal.aborted && read !== undefined && holderOf(read)?.token === me.token;
    },
    async release() {
      if (released) return;
      released = true;
      clearInterval(beat);
      // Unread for want of a descriptor, it is still ours unless a beat saw it taken: left behind, it would hold every
      // waiter (this process's next fetch included) until it went stale.
      const read = await io('read', () => readInfo(file)).catch(() => undefined);
      if (read === undefined ? !lost.signal.aborted : holderOf(read)?.token === me.token) await io('unlink', () => fsp.unlink(file)).catch(() => undefined);
    },
  };
}
