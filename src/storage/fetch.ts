/**
 * @module The fetch engine: `resolveModel(uri)` turns STORAGE_URI into a local directory — a local path as is, or an
 * S3 prefix through the PVC cache: listing, lock, the parallel ranged reader (download.ts), verification, atomic
 * commit. A fetch speaks to S3 through one transport, chosen when it starts (choose-transport.ts); an answer the
 * SDK-free transport may have caused starts the fetch over through the SDK, resuming what is on disk.
 * `committedEntry` looks at the cache alone, so the boot can start sessions before S3 has answered.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { processIdentity, type Config } from '../config.js';
import { firstUse, shortage, shortageError, S3_ADVICE } from '../descriptors.js';
import { deadline } from '../deadline.js';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { Bound } from '../files.js';
import { type Manifest, dropCommit, entrySize, throughLink, fsyncDir, JOURNAL, linkedFiles, manifestFilesPresent, mb, mkdirs, readManifest, recommit, sweep, uncommit, walk, writeManifest, PARTIAL } from './cache.js';
import { chooseTransport, loadTransport, openTransport, type TransportChoice } from './choose-transport.js';
import type { StorageIo } from './download.js';
import { Journal, JournalTail, spanBytes } from './journal.js';
import { checkListing } from './listing.js';
import { ContentMismatchError, newContentCheckState, type ContentCheckState } from './content-check.js';
import { sameEtag } from './s3-compat.js';
import { describeEntries, inUse, listEntries, makeRoom, removeEntry, type CacheEntry, type EntryOptions } from './entries.js';
import { leaseState } from './lease.js';
import { acquireLock, isOwn, type HeldLock, type LockInfo } from './lock.js';
import { checkAddressing, explainFallback } from './addressing.js';
import { attempts as counted, classify, endpointName, permanentError, retryTransient } from './s3-errors.js';
import { gaveUpThrottled, Throttle, ThrottledTries, type ThrottleWatch } from './throttle.js';
import { boundedAttempt, stallError } from './upload-stall.js';
import { countingRequests, type RequestTally } from './s3-requests.js';
import { sdkMightDiffer, type GetRequest, type ObjectBody, type RemoteObject, type S3Transport } from './transport.js';
import { cacheKey, containedPath, parseStorageUri, type StorageSource } from './uri.js';
import { currentVersion, parseVersion, versionName, versionsOf } from './versions.js';

export { planParts, RETRY, backoffMs, type Part } from './plan.js';
export { parseStorageUri, cacheKey, containedPath, type StorageSource } from './uri.js';
export type { StorageIo } from './download.js';
export type { Manifest } from './cache.js';
export type { CacheEntry } from './entries.js';

/**
 * Bytes gathered from a socket before one positional write. Memory is concurrency × this; and what a kill can lose
 * is at most the write of each range in flight that it tore, so it stays well under a part (docs/FAULTS.md).
 */
export const WRITE_BYTES = 256 * 1024;

/** The ranged reader, loaded by the first fetch that downloads (a committed entry needs none of it). */
const loadDownload = firstUse('the model downloader', () => import('./download.js'));

/** A download, or a wait for another process's, logs its progress this often (ms): a minute of silence looks hung. */
export const PROGRESS_LOG_MS = 10_000;
/** The shortest span of samples a download rate is told from (FetchProgress.bytesPerSecond). */
export const RATE_WINDOW_MIN_MS = 1_000;

export interface FetchProgress {
  /** `waiting`: another process holds the entry's lock and downloads; the counts are what it has on disk so far. */
  phase: 'resolving' | 'listing' | 'waiting' | 'downloading' | 'verifying' | 'done';
  bytesDone: number;
  bytesTotal: number;
  filesDone: number;
  filesTotal: number;
  bytesPerSecond: number;
}

export interface ResolveOptions {
  cfg: Readonly<Config>;
  log: Logger;
  signal?: AbortSignal;
  onProgress?(p: FetchProgress): void;
  /**
   * Objects of an S3 listing not to fetch (given every listed path; the caller's judgement of what the model never
   * reads). The rest is the model: what is downloaded, committed and compared with S3 on a cache hit. A local folder is
   * served as it is.
   */
  unused?(paths: readonly string[]): ReadonlySet<string>;
  /** called with every file of the model before any onFileReady, so a caller knows when a folder is whole */
  onListing?(files: ReadonlyArray<{ relPath: string; size: number }>): void;
  /** called once per file as soon as that file is whole and renamed into the entry dir (before the manifest) */
  onFileReady?(relPath: string, absPath: string): void;
  /**
   * Objects changed during the download: files reported ready so far may be replaced. onListing and onFileReady
   * follow again for the new round (unchanged files are reported again as they are reused).
   */
  onRestart?(): void;
  /** Bytes received from S3, as they are written (not files reused or spans resumed from an earlier run). */
  onDownloaded?(bytes: number): void;
  /** Called once, when S3 first answers a ranged GET of this fetch: the download's first requests are out and bytes flow. */
  onFirstResponse?(): void;
  /** A lock heartbeat older than this is taken over (default 30 s). Holders touch it every staleMs/15. */
  lockStaleMs?: number;
  /** How often a long download, or a wait for another process's, logs its progress (default PROGRESS_LOG_MS). */
  progressLogMs?: number;
  /** Budget for the ETag check of a cache hit; past it the entry is served as is (default 5 s). */
  hitCheckTimeoutMs?: number;
  /** The link a modelcar's sidecar makes, waited for with MODEL_INIT_MODE=async (default /mnt/models; tests). */
  modelcarLink?: string;
  /** Budget of each try of any other LIST (default 60 s; tests). */
  listTimeoutMs?: number;
  /**
   * A cache hit must be checked against S3, with the retries of a listing: a failed check fails the fetch instead of
   * serving the entry as is. The warm-up Job sets it: its success means the cache holds what S3 holds.
   */
  requireHitCheck?: boolean;
  /** Bytes gathered per positional write (default WRITE_BYTES). */
  writeBytes?: number;
  /** How often (ms) the download journal is synced and marked durable against power loss (default 1 s). */
  syncMs?: number;
  /** Called for each other cache entry removed to make room for this download (CACHE_EVICT=lru). */
  onEvicted?(e: CacheEntry): void;
  /** Called for each download of a file that was damaged on its way (S3_VERIFY_CONTENT; content-check.ts, onDamaged). */
  onDamaged?(rel: string): void;
  /** Hears each throttled answer of the fill's LIST, ranges and HEADs, and each that is not (throttle.ts ThrottleWatch). */
  throttleWatch?: ThrottleWatch;
  /** The same for the LIST of a cache hit's ETag check (default: throttleWatch). */
  checkWatch?: ThrottleWatch;
  /** Hears how each HTTP request of the fetch to S3 ended (s3-requests.ts): its LISTs, ranges and HEADs. */
  requests?: RequestTally;
  /** The same for the LIST of a cache hit's ETag check (default: requests). */
  checkRequests?: RequestTally;
  /** A lease heartbeat older than this does not keep another entry from eviction (default 3 min; tests). */
  leaseStaleMs?: number;
  /**
   * Marks a version folder of the entry in use by the caller (a server's lease, storage/lease.ts), called before the
   * fetch serves or fills one the caller may not lease yet; once it resolves the folder is not evicted. Without it (the
   * warm-up Job, adapters) nothing is leased.
   */
  lease?(entryDir: string): Promise<void>;
  /**
   * Files the caller derives from the model's files and keeps beside them (the optimized-model copies), carried into a
   * new version of the entry from the version it is made from (`from`, `to`: their folders). Called after each sweep
   * of the new version, before its whole files are announced; resolves to what came along (for the log). A new
   * version's sweeps remove whatever its listing does not name, these files too, so each round carries them again.
   */
  carry?(from: string, to: string): Promise<readonly string[]>;
  /**
   * The same derived files, kept through a refresh of the entry in place, whose sweeps remove whatever the listing does
   * not name. Called before each sweep of a fill that is not a new version's (`entry`: its folder), with the listed
   * files the round keeps as they are (`unchanged`) and those it fetches (`fetched`: each removed first, then written
   * as a new file under its name); resolves to the derived files (paths in the entry) the sweep leaves.
   */
  keep?(entry: string, unchanged: ReadonlySet<string>, fetched: ReadonlySet<string>): Promise<readonly string[]>;
  /** Fault injection for tests. */
  io?: Partial<StorageIo>;
}

export interface ResolvedModel {
  dir: string;
  fromCache: boolean;
  bytes: number;
  files: number;
  seconds: number;
  source: 'local' | 's3';
  /** The entry was served without checking S3 (it was unreachable or refused the listing). */
  stale?: boolean;
  /**
   * A fill's content check (S3_VERIFY_CONTENT): files whose MD5 matched their ETag or whose checksum matched, and the
   * others by why they were not checked; `'off'` where the check did not run.
   */
  contentChecked?: number | 'off';
  contentNotChecked?: Record<string, number>;
}

export async function resolveModel(uri: string, opts: ResolveOptions): Promise<ResolvedModel> {
  const t0 = performance.now();
  const src = parseStorageUri(uri);
  // A path without a leading '/' is read from the working folder: most often an S3 prefix written without s3://.
  if (src.kind === 'local') return resolveLocal(src.path, opts, t0, !path.isAbsolute(uri.trim()) && !/^file:/i.test(uri.trim()));
  const choice = chooseTransport(opts.cfg.s3, src.bucket);
  if (choice.name === 'sdk' && choice.declined !== undefined) {
    opts.log.info({ reason: choice.declined }, 'S3_TRANSPORT=lite cannot serve this bucket; the AWS SDK reads it');
  }
  const fallback = checkAddressing(opts.cfg.s3, src.bucket, `s3://${src.bucket}/`, (fields, msg) => opts.log.warn(fields, msg));
  // The transport's code loads while the cache is looked at and locked.
  loadTransport(choice);
  try {
    return await countingRequests(opts.requests, () => new S3Fetch(src, choice, opts, t0).run());
  } catch (e) {
    const refusal = choice.name === 'lite' && !opts.signal?.aborted ? refusalIn(e) : undefined;
    if (refusal === undefined) throw explainFallback(e, fallback);
    opts.log.info({ reason: refusal.message },
      refusal.what === 'read' ? 'S3 refused an SDK-free GET; downloading through the AWS SDK' : 'S3 refused the SDK-free listing; listing through the AWS SDK');
    return await countingRequests(opts.requests, () => new S3Fetch(src, { name: 'sdk' }, opts, t0).run()).catch((e2: unknown) => {
      throw explainFallback(e2, fallback);
    });
  }
}

/** The answer in `e` (or its causes) that the SDK-free transport may have caused, if any. */
function refusalIn(e: unknown): (Error & { what?: string }) | undefined {
  for (let x = e, depth = 0; x !== undefined && x !== null && depth < 4; x = (x as Error).cause, depth++) {
    if (sdkMightDiffer(x)) return x as Error & { what?: string };
  }
  return undefined;
}

export interface CommittedEntry {
  dir: string;
  manifest: Manifest;
}

/**
 * The current committed version of an s3:// URI's cache entry (versions.ts) with every file present, or undefined;
 * never throws, never asks S3. The boot starts its sessions while the fetch asks S3 whether it is still current.
 */
export async function committedEntry(uri: string, cfg: Pick<Config, 'cacheDir' | 's3'>): Promise<CommittedEntry | undefined> {
  try {
    const src = parseStorageUri(uri);
    if (src.kind !== 's3') return undefined;
    const cur = await currentVersion(cfg.cacheDir, cacheKey(src, cfg.s3.endpoint));
    if (cur === undefined) return undefined;
    const { dir, manifest } = cur;
    containedPath(cfg.cacheDir, cur.name);
    if (manifest.uri !== src.uri) return undefined;
    // Keys were contained when the entry was written; check again, the manifest is only a file on a shared volume.
    for (const f of manifest.files) containedPath(dir, f.path);
    return (await manifestFilesPresent(dir, manifest)) ? { dir, manifest } : undefined;
  } catch {
    return undefined;
  }
}

/** True when two manifests describe the same committed content (same write, same objects). */
export function sameCommit(a: Manifest, b: Manifest): boolean {
  return a.completedAt === b.completedAt && JSON.stringify(a.files) === JSON.stringify(b.files);
}

/** How often a model folder that is not there yet is looked for again (MODEL_INIT_MODE=async). */
const APPEAR_POLL_MS = 250;
/** Where KServe's modelcar sidecar makes its link (`ln -sf /proc/$$/root/models /mnt/models`). */
const MODELCAR_LINK = '/mnt/models';

/**
 * Until the modelcar's link is there and leads somewhere. KServe links a modelcar's /mnt/models from a sidecar that
 * starts beside this container, not before it (kserve/kserve#3646): read at once, the folder is missing for a moment
 * and the boot would fail for good. Only the link is waited for (`dir` itself outside /mnt/models): a folder below it
 * that the image lacks is then missing as any other, at once, rather than waited for without end. A link that points
 * nowhere (the sidecar stopped, its next start links anew) is waited for too. Other errors are the caller's stat's.
 */
async function appeared(dir: string, opts: ResolveOptions): Promise<void> {
  const root = opts.modelcarLink ?? MODELCAR_LINK;
  const link = dir === root || dir.startsWith(`${root}/`) ? root : dir;
  const since = performance.now();
  let logged = -Infinity;
  for (;;) {
    const err = await fsp.stat(link).then(() => undefined, (e: NodeJS.ErrnoException) => e);
    if (err?.code !== 'ENOENT') return;
    const now = performance.now();
    if (now - logged >= (opts.progressLogMs ?? PROGRESS_LOG_MS)) {
      logged = now;
      opts.log.info({ waitedS: Math.round((now - since) / 1000) },
        'waiting for the model folder STORAGE_URI names to appear (MODEL_INIT_MODE=async: a modelcar links it after start)');
    }
    await sleep(APPEAR_POLL_MS, undefined, { signal: opts.signal });
  }
}

/** The errnos of a local model folder that is not there (STORAGE_MISSING); any other is the volume's failure. */
const MISSING: readonly string[] = ['ENOENT', 'ENOTDIR', 'ELOOP', 'ENAMETOOLONG'];
/** The errnos of a look into the model folder that find nothing there to read: a permission, or a name gone meanwhile. */
const NOT_THERE: readonly string[] = [...MISSING, 'EACCES', 'EPERM'];

/** The archives KServe's storage initializer unpacks (a model URI naming one). */
const ARCHIVE = /[^/]*\.(?:tar\.gz|tgz|tar|zip)$/i;

async function resolveLocal(dir: string, opts: ResolveOptions, t0: number, relative = false): Promise<ResolvedModel> {
  if (opts.cfg.modelInitAsync) await appeared(dir, opts);
  const st = await fsp.stat(dir).catch((e: NodeJS.ErrnoException) => e);
  // The reason reaches clients (the model endpoint), so it names the setting, not the local path it holds.
  if (st instanceof Error && (st.code === 'EACCES' || st.code === 'EPERM')) {
    // A modelcar's link (/proc/<pid>/root/models) opens only to the sidecar's user: KServe's uidModelcar.
    throw new RuntimeError('STORAGE_DENIED', `permission denied reading the model folder STORAGE_URI names (${st.code}); check the volume's permissions (a modelcar's /mnt/models opens only to the user KServe runs the pod as: uidModelcar)`);
  }
  // Any other errno is the volume's (EIO, ETIMEDOUT, ESTALE: a disk or an NFS server away), not a folder missing:
  // CACHE_IO with the errno as its cause, which a boot tries again where it can pass (boot-retry.ts).
  if (st instanceof Error && typeof st.code === 'string' && !MISSING.includes(st.code)) {
    throw new RuntimeError('CACHE_IO', `the model folder STORAGE_URI names could not be read: ${st.syscall ?? 'stat'} failed with ${st.code} (the volume that holds the model failed, not its format)`, { cause: st });
  }
  if (st instanceof Error) {
    const hint = relative ? " (STORAGE_URI is a relative path, read from the server's working folder; an S3 model is s3://bucket/prefix)" : '';
    throw new RuntimeError('STORAGE_MISSING', `the model folder STORAGE_URI names does not exist${hint}; check STORAGE_URI and the volume mount`);
  }
  if (!st.isDirectory()) {
    const archive = ARCHIVE.test(dir) ? ' (an archive: unpack it, this runtime reads the exported folder itself)' : '';
    throw new RuntimeError('STORAGE_MISSING', `STORAGE_URI names a file, not a folder${archive}; point it at the exported model folder`);
  }
  // A Hugging Face cache snapshot is all links: each is the file it names, announced as it is for early sessions.
  // A folder it cannot read through (a link it may not follow) is listed as before, its links left out. The volume's
  // own errors (EIO) go up, the file named by the caller (boot-sequence.ts) relative to the model.
  const files = await linkedFiles(dir, (rel) => opts.log.warn({ file: rel }, 'a symlink in the model folder points nowhere; left out'))
    .catch((e: NodeJS.ErrnoException) => {
      if (typeof e?.code === 'string' && !NOT_THERE.includes(e.code)) throw e;
      return walk(dir);
    });
  const sizes = await Promise.all(files.map(async (rel) => (await fsp.stat(path.join(dir, rel))).size));
  const bytes = sizes.reduce((a, b) => a + b, 0);
  opts.onListing?.(files.map((relPath, i) => ({ relPath, size: sizes[i]! })));
  for (const rel of files) opts.onFileReady?.(rel, path.join(dir, rel));
  opts.onProgress?.({ phase: 'done', bytesDone: bytes, bytesTotal: bytes, filesDone: files.length, filesTotal: files.length, bytesPerSecond: 0 });
  return { dir, fromCache: false, bytes, files: files.length, seconds: (performance.now() - t0) / 1000, source: 'local' };
}

/**
 * A filesystem error of the cache as an operator reads it: the code and the call, and the file relative to the cache,
 * never a local absolute path (Node's own messages carry one, and boot reasons reach clients).
 */
export function cacheIoError(e: unknown, cacheDir: string): unknown {
  const x = e as NodeJS.ErrnoException;
  if (e instanceof RuntimeError || typeof x?.code !== 'string' || typeof x.syscall !== 'string') return e;
  const root = path.resolve(cacheDir) + path.sep;
  const inside = typeof x.path === 'string' && path.resolve(x.path).startsWith(root) ? path.resolve(x.path).slice(root.length) : undefined;
  if (x.syscall === 'mkdir' && inside === undefined) return cacheDirError(x);
  // The entry's own folder is <key>/; what follows it is the object's path.
  const rel = inside?.split(path.sep).slice(1).join('/');
  const what = `${x.syscall}${rel ? ` of ${JSON.stringify(rel)}` : ''}`;
  const short = shortage(e);
  if (short) return shortageError(`${what}${inside !== undefined ? ' in the model cache (MODEL_CACHE_DIR)' : ''} failed`, short, S3_ADVICE, e);
  const code = ['ENOSPC', 'EDQUOT'].includes(x.code) ? 'NO_SPACE' : x.code === 'ENAMETOOLONG' ? 'STORAGE_KEY_TOO_LONG' : 'CACHE_IO';
  return new RuntimeError(code, `the model cache (MODEL_CACHE_DIR) refused ${what}: ${x.code}${deniedAdvice(x)}`, { cause: e });
}

/** What EROFS on the cache most often is in a pod: no volume at all (the cache PVC not mounted) under a read-only root. */
export const READ_ONLY_CACHE = 'a read-only file system: MODEL_CACHE_DIR must be a volume mounted read-write, as the templates mount the '
  + 'cache PVC at /mnt/cache; with no volume there, the read-only root filesystem refuses';

/**
 * For a permission error: who was refused, and what lets it write. An arbitrary-uid pod (OpenShift) writes a volume
 * through its group; a folder another uid made before this runtime shared them with the group stays closed to it.
 */
function deniedAdvice(e: NodeJS.ErrnoException): string {
  if (e.code === 'EROFS') return ` (${READ_ONLY_CACHE})`;
  if (e.code !== 'EACCES' && e.code !== 'EPERM') return '';
  return ` (this process is ${processIdentity()}: the cache's folders must be writable by that uid or one of those groups, `
    + 'as a volume mounted with the pod\'s fsGroup is; folders another uid made without group write: chmod -R g+w them once)';
}

/** MODEL_CACHE_DIR itself could not be made: one message whichever path (the S3 fetch, the demo model) made it. */
function cacheDirError(e: NodeJS.ErrnoException): RuntimeError {
  const why = e.code === 'EEXIST' || e.code === 'ENOTDIR' ? 'it, or a folder above it, is a file' : (e.code ?? 'error');
  return new RuntimeError(e.code === 'ENOSPC' ? 'NO_SPACE' : 'CACHE_IO', `cannot create the model cache directory (MODEL_CACHE_DIR): ${why}${deniedAdvice(e)}`, { cause: e });
}

// sameEtag: entries written before listed ETags were quoted hold them as the store listed them (bare, on stores that
// never quote them); read as changed, every such entry was fetched again after an upgrade.
const sameObjects = (m: Manifest, listing: readonly RemoteObject[]) =>
  m.files.length === listing.length && listing.every((o, i) => m.files[i]?.path === o.rel && m.files[i]?.size === o.size && sameEtag(m.files[i]?.etag ?? '', o.etag));

/** One S3 → cache resolution through one transport; all state lives in this object so two resolutions never share any. */
class S3Fetch {
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly uri: string;
  /** The entry's key: the folder of its version 1, and the name of the lock every fill of the URI holds. */
  private readonly key: string;
  private readonly base: string;
  /** The version folder this fetch serves or fills (versions.ts). */
  private entry: string;
  private readonly progress: FetchProgress = { phase: 'resolving', bytesDone: 0, bytesTotal: 0, filesDone: 0, filesTotal: 0, bytesPerSecond: 0 };
  private readonly samples: Array<[number, number]> = [];
  private lastEmit = 0;
  /** When the download's progress was last logged (undefined: not downloading). */
  private lastLog: number | undefined;
  private readonly signal: AbortSignal;
  private leftOutLogged = false;
  /** Opened when the fetch starts; its code began loading in resolveModel. */
  private transport: Promise<S3Transport> | undefined;

  constructor(src: Extract<StorageSource, { kind: 's3' }>, private readonly choice: TransportChoice, private readonly o: ResolveOptions,
    private readonly t0: number) {
    ({ bucket: this.bucket, prefix: this.prefix, uri: this.uri } = src);
    this.key = cacheKey(src, o.cfg.s3.endpoint);
    this.base = containedPath(o.cfg.cacheDir, this.key);
    this.entry = this.base;
    this.signal = o.signal ?? new AbortController().signal;
  }

  async run(): Promise<ResolvedModel> {
    const { cfg, log } = this.o;
    await this.onCache(() => mkdirs(cfg.cacheDir)).catch((e: NodeJS.ErrnoException) => {
      throw cacheDirError(e);
    });
    this.transport = openTransport(this.choice, cfg.s3, this.bucket);
    this.transport.catch(() => undefined); // awaited by the first listing
    try {
      this.emit('resolving', true);
      let listing: RemoteObject[] | undefined;
      const cached = await this.onCache(() => currentVersion(cfg.cacheDir, this.key));
      if (cached) this.entry = cached.dir;
      if (cached && cached.manifest.uri === this.uri && (await this.onCache(() => manifestFilesPresent(this.entry, cached.manifest)))) {
        try {
          const checkMs = this.o.hitCheckTimeoutMs ?? 5_000;
          listing = this.o.requireHitCheck ? await this.listing() : await countingRequests(this.o.checkRequests, () => this.listing(2, checkMs, {
            ms: checkMs, what: 'cache check', bound: 'the check\'s own bound', watch: this.o.checkWatch ?? this.o.throttleWatch,
          }));
        } catch (e) {
          if (this.signal.aborted || sdkMightDiffer(e) || this.o.requireHitCheck) throw e;
          if (await this.leased(cached.manifest)) {
            log.warn({ uri: this.uri, reason: (e as Error).message }, gaveUpThrottled(e)
              ? 'S3 kept throttling the ETag check; serving the committed cache entry as is'
              : 'S3 not reachable for the ETag check; serving the committed cache entry as is');
            return await this.served(this.hit(cached.manifest, true));
          }
          throw e;
        }
        if (!sameObjects(this.kept(cached.manifest), listing)) log.info({ uri: this.uri }, 'objects changed since the cache entry was written; fetching the changes');
        else if (await this.leased(cached.manifest)) return await this.served(this.hit(cached.manifest, false));
      }
      this.emit('listing', true);
      listing ??= await this.listing();
      log.debug({ ms: Math.round(this.elapsed() * 1000), objects: listing.length }, 'listed');
      this.checkListing(listing);
      const want = listing;
      const staleMs = this.o.lockStaleMs ?? 30_000;
      const wait = new HolderWatch(this.entry, want);
      const current = async () => {
        const c = await this.onCache(() => currentVersion(cfg.cacheDir, this.key));
        return c !== undefined && sameObjects(this.kept(c.manifest), want) ? c : undefined;
      };
      // Every fill of the URI holds the lock of its version 1, whichever version it writes: one writer per entry.
      for (let attempt = 1; ; attempt++) {
        const lock = await acquireLock(`${this.base}.lock`, {
          staleMs, heartbeatMs: fillHeartbeatMs(staleMs), pollMs: Math.min(500, Math.max(50, staleMs / 60)), signal: this.signal, ...this.bound('lock'),
          onWait: (h) => this.waiting(wait, h),
          satisfied: async () => (await current()) !== undefined,
        });
        if (wait.since !== undefined && attempt === 1) {
          log.info({ waitedMs: Math.round(performance.now() - wait.since), filesSeenWhole: wait.announced.size },
            lock === undefined ? 'the other process committed the cache entry; serving from it' : 'the other process left the cache entry unfinished; this one fills it');
        }
        if (lock === undefined) {
          const c = await current();
          if (c) this.entry = c.dir;
          if (c && (await this.leased(c.manifest))) return await this.served(this.hit(c.manifest, false));
          // Evicted between its commit and this process's lease: filled again.
          continue;
        }
        let res: ResolvedModel;
        try {
          await this.onCache(() => this.recommitHeld());
          const c = await current();
          if (c) this.entry = c.dir;
          res = c && (await this.onCache(() => manifestFilesPresent(this.entry, c.manifest))) && (await this.leased(c.manifest))
            ? this.hit(c.manifest, false)
            : await this.fill(want, AbortSignal.any([this.signal, lock.lost]), lock.lost);
        } finally {
          await lock.release();
        }
        // Released first: version 1's lock is this one, and the older versions' removal would find it held and keep them.
        return await this.served(res);
      }
    } catch (e) {
      if (this.signal.aborted && !(e instanceof RuntimeError && e.code === 'NO_SPACE')) {
        throw new RuntimeError('CANCELLED', `model fetch of ${this.uri} cancelled; the cache entry stays uncommitted and resumes next time`, { cause: e });
      }
      throw cacheIoError(e, this.o.cfg.cacheDir);
    } finally {
      (await this.transport.catch(() => undefined))?.destroy();
    }
  }

  /**
   * One poll of a wait for another process filling this entry (`h`: what its lock says): the progress it has made on
   * disk goes to the model endpoint, to the log every progressLogMs, and each file it has made whole (under its final
   * name, at the version this process listed) is announced, so sessions and an early warm-up start here as they do
   * there, instead of after its commit.
   */
  private async waiting(w: HolderWatch, h: LockInfo | undefined): Promise<void> {
    const { log } = this.o;
    const holder = h ? `${h.host}/${h.pid}` : 'unknown';
    const now = performance.now();
    if (w.since === undefined) {
      w.since = now;
      w.lastLog = now;
      log.info({ holder }, 'another process is filling this cache entry; waiting for it');
    }
    // The holder writes the highest-numbered version folder (a new version beside the one in use, or the entry itself):
    // what was announced from another one is announced again from it.
    const top = (await this.onCache(() => versionsOf(this.o.cfg.cacheDir, this.key))).at(-1);
    if (top !== undefined && top.dir !== w.dir) {
      if (w.announced.size > 0) this.o.onRestart?.();
      w.follow(top.dir);
    }
    const seen = await this.onCache(() => w.tail.read()).catch(() => new Map<string, never>());
    let bytes = 0;
    let files = 0;
    for (const obj of w.want) {
      const j = seen.get(obj.rel);
      if (j === undefined || !sameEtag(j.etag, obj.etag) || j.size !== obj.size) continue;
      if (!j.complete) {
        bytes += spanBytes(j.spans);
        continue;
      }
      bytes += obj.size;
      files++;
      // An evictor's lock (lease.ts): the entry is about to go, nothing in it is announced.
      if (w.announced.has(obj.rel) || h?.purpose === 'evict') continue;
      const abs = path.join(w.dir, obj.rel);
      const st = await this.onCache(() => fsp.stat(abs)).catch(() => undefined);
      if (!st?.isFile() || st.size !== obj.size) continue;
      if (w.announced.size === 0) {
        // What a process announces it reads from: its lease first.
        await this.o.lease?.(w.dir);
        this.o.onListing?.(w.want.map((o) => ({ relPath: o.rel, size: o.size })));
      }
      w.announced.add(obj.rel);
      this.o.onFileReady?.(obj.rel, abs);
    }
    Object.assign(this.progress, { bytesTotal: w.bytesTotal, bytesDone: bytes, filesTotal: w.want.length, filesDone: files });
    this.emit('waiting', true);
    if (now - w.lastLog >= (this.o.progressLogMs ?? PROGRESS_LOG_MS)) {
      w.lastLog = now;
      log.info({ holder, mbDone: +mb(bytes), mbTotal: +mb(w.bytesTotal), filesDone: files, filesTotal: w.want.length, mbps: +mb(this.progress.bytesPerSecond),
        waitedS: Math.round((now - w.since) / 1000) }, 'waiting for another process filling this cache entry');
    }
  }

  /**
   * The manifest as the filtered listing is compared with it: an entry committed before `unused` left objects out
   * holds those files too, and they are no change (the entry, its optimized copies and the sessions begun on it stay).
   */
  private kept(m: Manifest): Manifest {
    const { used, left } = this.split(m.files, (f) => f.path);
    return left.length === 0 ? m : { ...m, files: used };
  }

  /** The listing without the objects `unused` names; what was left out is logged once per fetch. */
  private used(listing: RemoteObject[]): RemoteObject[] {
    const { used, left } = this.split(listing, (o) => o.rel);
    if (left.length > 0 && !this.leftOutLogged) {
      this.leftOutLogged = true;
      this.o.log.info({ objects: left.length, bytes: left.reduce((n, o) => n + o.size, 0), examples: left.slice(0, 5).map((o) => o.rel) },
        'objects under STORAGE_URI that the runtime never reads are not downloaded (weights of other frameworks, folders of no component)');
    }
    return used;
  }

  /** `items` parted by what `unused` says of their paths. */
  private split<T>(items: readonly T[], rel: (x: T) => string): { used: T[]; left: T[] } {
    const unused = this.o.unused?.(items.map(rel));
    if (!unused || unused.size === 0) return { used: [...items], left: [] };
    return { used: items.filter((x) => !unused.has(rel(x))), left: items.filter((x) => unused.has(rel(x))) };
  }

  /**
   * Lists the prefix, retrying what may pass, a try cut short included (the fetch's abort ends the retries before that
   * is asked): each request (every page) is cut after S3_STALL_TIMEOUT_S of silence on its socket, as an upload request
   * is (upload-stall.ts), and each try after `timeoutMs` in all, a listing that keeps sending slowly included. An
   * answer the transport may have caused goes up at once (resolveModel). A store that left the last try unanswered is
   * unreachable, not missing: STORAGE_TRANSIENT, as for a 5xx, saying which bound cut it. By default the fill's
   * listing: S3_MAX_ATTEMPTS tries of 60 s each. Throttled answers (503 SlowDown, 429) count no try: the listing backs
   * off as a throttled download does (throttle.ts), and gives up once throttled for `throttling.ms` (by default
   * S3_THROTTLE_TIMEOUT_S; the hit check's short budget for it, whose give-up serves the entry as it is).
   */
  private async listing(attempts = this.o.cfg.s3.maxAttempts, timeoutMs = this.o.listTimeoutMs ?? 60_000,
    throttling: { ms: number; what: 'listing' | 'cache check'; bound?: string; watch?: ThrottleWatch | undefined } = {
      ms: this.o.cfg.s3.throttleTimeoutS * 1000, what: 'listing', watch: this.o.throttleWatch,
    }): Promise<RemoteObject[]> {
    const transport = await this.transport!;
    // One request at a time, so each throttled answer is a round of its own and the waits grow.
    const { ms, what, bound, watch } = throttling;
    const throttle = new ThrottledTries(new Throttle({ concurrency: 1, timeoutMs: ms, log: this.o.log, what, ...(bound ? { bound } : {}), ...(watch ? { watch } : {}) }));
    const stallMs = this.o.cfg.s3.stallTimeoutS * 1000;
    let tries = 0;
    // What cut the last try, if a bound did, and how many tries each bound cut.
    let cut: 'silent' | 'slow' | undefined;
    const cuts = { silent: 0, slow: 0 };
    const retried = (e: unknown) => !sdkMightDiffer(e) && (classify(e) === 'transient' || (cut === 'slow' && classify(e) === 'aborted'));
    try {
      return await retryTransient(async (attempt) => {
        // Throttled tries count none (retryTransient): `tries` is of those S3_MAX_ATTEMPTS counts. A try that ends
        // otherwise than throttled (a 500, a stall, a cut) ends the throttled spell (ThrottledTries).
        tries = attempt + 1;
        const list = async () => {
          const d = deadline(this.signal, timeoutMs);
          let silent = false;
          try {
            return await boundedAttempt(stallMs, () => transport.list({ prefix: this.prefix, signal: d.signal }), (cause) => {
              silent = true;
              return stallError('ListObjectsV2', stallMs, attempt, attempts, cause);
            });
          } finally {
            d.clear();
            cut = silent ? 'silent' : d.timedOut ? 'slow' : undefined;
            if (cut !== undefined) cuts[cut]++;
          }
        };
        return this.used(await throttle.attempt(this.signal, list));
      }, attempts, this.signal, retried, throttle.onThrottled);
    } catch (e) {
      this.signal.throwIfAborted();
      if (sdkMightDiffer(e)) throw e;
      const where = this.prefix ? `s3://${this.bucket}/${this.prefix}` : `bucket "${this.bucket}"`;
      if (throttle.gaveUp) throw throttle.throttle.gaveUp(`list ${where}`, e);
      if (cut !== undefined) {
        const n = cuts[cut];
        const which = tries === 1 ? 'its one try' : n === tries ? `each of its ${tries} tries` : `${n} of its ${tries} tries, the last included`;
        throw new RuntimeError('STORAGE_TRANSIENT', cut === 'silent'
          ? `cannot list ${where}: S3 sent nothing for ${stallMs / 1000} s (S3_STALL_TIMEOUT_S) on ${which}; `
            + 'check the link to S3, or raise S3_STALL_TIMEOUT_S for a store slow to answer a LIST'
          : `cannot list ${where}: S3 did not finish the LIST within ${timeoutMs / 1000} s on ${which}`, { cause: e });
      }
      throw permanentError(e, this.bucket, this.prefix || undefined, retried(e) ? `list (${counted(tries)})` : 'list', endpointName(this.o.cfg.s3, this.bucket));
    } finally {
      throttle.done();
    }
  }

  private hit(m: Manifest, stale: boolean): ResolvedModel {
    this.o.onListing?.(m.files.map((f) => ({ relPath: f.path, size: f.size })));
    for (const f of m.files) this.o.onFileReady?.(f.path, path.join(this.entry, f.path));
    Object.assign(this.progress, { bytesTotal: m.bytes, bytesDone: m.bytes, filesTotal: m.files.length, filesDone: m.files.length });
    this.emit('done', true);
    return { dir: this.entry, fromCache: true, bytes: m.bytes, files: m.files.length, seconds: this.elapsed(), source: 's3', ...(stale ? { stale } : {}) };
  }

  /**
   * Leases the version this fetch serves (ResolveOptions.lease), and says whether it still holds the commit `m` with
   * every file: once leased, it stays so. Without a lease to take, whether it holds it now.
   */
  private async leased(m: Manifest): Promise<boolean> {
    await this.o.lease?.(this.entry);
    return this.onCache(async () => {
      const now = await readManifest(this.entry);
      return now !== undefined && sameCommit(now, m) && (await manifestFilesPresent(this.entry, now));
    });
  }

  /**
   * A fill killed after it set a version's commit aside and before it put it back or dropped it (fill) left the files
   * as that commit lists them: it is put back, so a version other processes lease is never resumed as a partial one.
   */
  private async recommitHeld(): Promise<void> {
    for (const v of await versionsOf(this.o.cfg.cacheDir, this.key)) {
      if (!(await recommit(v.dir))) continue;
      await fsp.unlink(path.join(v.dir, JOURNAL)).catch(() => undefined);
      await fsyncDir(v.dir);
      this.o.log.info({ entry: v.name }, 'put back the commit a killed fill had set aside: the version is whole, as it lists it');
    }
  }

  /** The model is served from `res.dir`: the older versions of the entry that no process uses any more go. */
  private async served(res: ResolvedModel): Promise<ResolvedModel> {
    const { cfg, log } = this.o;
    const mine = parseVersion(path.basename(this.entry)).n;
    const bound = this.entryBound();
    for (const v of await this.onCache(() => versionsOf(cfg.cacheDir, this.key))) {
      if (v.n >= mine) continue;
      // A lease or lock that only watching could judge (a pod killed elsewhere) is not watched here: the start would wait
      // for it (60 s for a lease). The version stays for an eviction or a prune, which watch it.
      const r = await removeEntry(cfg.cacheDir, v.name, { ...this.entryOptions(), watch: false, ...bound }).catch(() => undefined);
      if (r?.removed) log.info({ entry: v.name, bytes: r.bytes }, 'removed an older version of the cache entry that no process serves from any more');
    }
    return res;
  }

  /**
   * Fills the entry under its lock. The highest-numbered version folder is the one written: an uncommitted one is
   * resumed; a committed one whose objects changed is refreshed in place when no other live process leases it, and
   * otherwise left as it is, the new objects going into a new version beside it (versions.ts).
   */
  private async fill(initial: RemoteObject[], signal: AbortSignal, lost: AbortSignal): Promise<ResolvedModel> {
    const { cfg, log } = this.o;
    const dl = await loadDownload();
    const transport = await this.transport!;
    let answered = false;
    const get = async (r: GetRequest): Promise<ObjectBody> => {
      const res = await transport.get(r);
      if (!answered) {
        answered = true;
        this.o.onFirstResponse?.();
      }
      return res;
    };
    const versions = await this.onCache(() => versionsOf(cfg.cacheDir, this.key));
    const top = versions.at(-1);
    const cur = await this.onCache(() => currentVersion(cfg.cacheDir, this.key, versions));
    const onError = (e: unknown) => log.warn({ reason: (e as NodeJS.ErrnoException)?.code ?? 'error' }, 'could not record download progress; a restart fetches again what was not recorded');
    const staleMs = this.o.lockStaleMs ?? 30_000;
    let versionLock: HeldLock | undefined;
    let journal: Journal | undefined;
    // Opens the version folder `dir` for writing: its own lock beside the entry's (an eviction or a prune elsewhere
    // takes a version's lock, and must see this fill), the caller's lease, its journal.
    const open = async (dir: string) => {
      this.entry = dir;
      if (dir !== this.base) versionLock = await acquireLock(`${dir}.lock`, { staleMs, heartbeatMs: fillHeartbeatMs(staleMs), signal, ...this.bound('lock') });
      await this.o.lease?.(dir);
      await this.onCache(() => mkdirs(dir));
      // Its later writes and syncs go in the bound one by one; its open (a read, a rewrite, a sync) as one call.
      journal = await this.onCache(() => Journal.open(dir, { onError, ...this.bound('journal') }));
      return journal;
    };
    try {
      let j = await open(top?.dir ?? this.base);
      if (cur !== undefined && cur.dir === this.entry) {
        // A committed entry being refreshed: its files count as whole downloads of their ETags, durably before the
        // commit goes. The commit goes before the leases are read, so a process leasing it now either is seen here or
        // finds it uncommitted and waits for this fill (lease.ts, the same handshake as an eviction's).
        for (const f of cur.manifest.files) j.complete(f.path, f.etag, f.size);
        await j.sync();
        await this.onCache(() => uncommit(this.entry));
        // A lease whose heartbeat looks old on this clock is not watched (a minute, on a start's path): it may be a pod
        // on a node whose clock is behind, so it keeps the entry as a live one would; an eviction or a prune judges it.
        const leases = await this.onCache(() => leaseState(this.entry, this.o.leaseStaleMs, { confirmMs: 0 }));
        const users = leases.live.filter((h) => !isOwn(h));
        if (users.length === 0 && leases.unwatched === 0) await this.onCache(() => dropCommit(this.entry));
        else {
          await this.onCache(() => recommit(this.entry));
          await j.remove();
          await versionLock?.release();
          versionLock = undefined;
          const next = versionName(this.key, cur.n + 1);
          log.info({ entry: cur.name, users: users.map((h) => `${h.host}/${h.pid}`), ...(leases.unwatched > 0 ? { unsureLeases: leases.unwatched } : {}), version: next },
            'the cache entry is in use by other processes; the changed objects go into a new version of it, beside it');
          j = await open(containedPath(cfg.cacheDir, next));
        }
      }
      const from = cur !== undefined && cur.dir !== this.entry ? cur : undefined;
      if (from !== undefined) await this.linkUnchanged(from, initial, j);
      const held = versionLock?.lost;
      return await this.rounds(initial, j, get, held ? AbortSignal.any([signal, held]) : signal, held ? AbortSignal.any([lost, held]) : lost, dl, from?.dir);
    } finally {
      await journal?.close();
      await versionLock?.release();
    }
  }

  /**
   * Copy-on-write from the version in use: each listed file it holds at the listed ETag and size is hard-linked into
   * the new version (no byte copied or fetched) and recorded whole. A file that cannot be linked (a volume without hard
   * links) is fetched.
   */
  private async linkUnchanged(from: { dir: string; manifest: Manifest }, listing: readonly RemoteObject[], journal: Journal): Promise<void> {
    const had = new Map(from.manifest.files.map((f) => [f.path, f]));
    const dirs = new Set<string>();
    let files = 0;
    let bytes = 0;
    for (const obj of listing) {
      const f = had.get(obj.rel);
      if (f === undefined || !sameEtag(f.etag, obj.etag) || f.size !== obj.size) continue;
      const j = journal.get(obj.rel);
      if (j?.complete && sameEtag(j.etag, obj.etag) && j.size === obj.size) continue;
      const src = path.join(from.dir, obj.rel);
      const dst = path.join(this.entry, obj.rel);
      const linked = await this.onCache(async () => {
        if ((await fsp.stat(src)).size !== obj.size) return false;
        await mkdirs(path.dirname(dst));
        await fsp.unlink(dst).catch(() => undefined);
        await fsp.link(src, dst);
        return true;
      }).catch(() => false);
      if (!linked) continue;
      journal.complete(obj.rel, obj.etag, obj.size);
      dirs.add(path.dirname(dst));
      files++;
      bytes += obj.size;
    }
    for (const d of dirs) await this.onCache(() => fsyncDir(d));
    await journal.sync();
    if (files > 0) this.o.log.info({ files, bytes, from: path.basename(from.dir) }, 'unchanged files linked from the version in use');
  }

  /** The caller's derived files of the version `from`, carried into this new version; only later starts gain, so a failure is logged. */
  private async carryFrom(from: string): Promise<void> {
    try {
      const carried = await this.o.carry!(from, this.entry);
      if (carried.length > 0) this.o.log.info({ from: path.basename(from), components: carried }, 'optimized model copies of unchanged components carried from the version in use');
    } catch (err) {
      this.o.log.warn({ from: path.basename(from), reason: (err as Error)?.message ?? String(err) }, 'could not carry the optimized model copies from the version in use');
    }
  }

  /**
   * The caller's derived files of this entry that a refresh in place keeps (ResolveOptions.keep); only later starts
   * gain, so a failure is logged and keeps none.
   */
  private async keptDerived(unchanged: readonly RemoteObject[], fetched: readonly RemoteObject[]): Promise<readonly string[]> {
    try {
      const kept = await this.o.keep!(this.entry, new Set(unchanged.map((o) => o.rel)), new Set(fetched.map((o) => o.rel)));
      const components = [...new Set(kept.map((rel) => rel.split('/')[0]!))];
      if (kept.length > 0 && fetched.length > 0) this.o.log.info({ components }, 'optimized model copies of unchanged components kept through the refresh');
      return kept;
    } catch (err) {
      this.o.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'could not keep the optimized model copies through the refresh');
      return [];
    }
  }

  /**
   * `bound` for a lock's or the journal's options: their calls on the cache go through the caller's bound
   * (StorageIo.other), a lock's ahead of the queued writes (lockBound); none where the caller bounds nothing.
   */
  private bound(of: 'lock' | 'journal'): { bound?: Bound } {
    const other = this.o.io?.other;
    if (!other) return {};
    return { bound: of === 'lock' ? lockBound(other) : other };
  }

  /**
   * entries.ts's `bound` for a removal of an entry or an eviction: its calls on the cache in the caller's bound, one at a
   * time, as the fill's (onCache), its locks' as the fill's lock's (lockBound); none where the caller bounds nothing.
   */
  private entryBound(): Pick<EntryOptions, 'bound'> {
    const other = this.o.io?.other;
    return other ? { bound: { calls: other, lock: lockBound(other) } } : {};
  }

  /** Staleness of the cache's lock and lease files, as entries.ts takes them. */
  private entryOptions(): { lockStaleMs: number; leaseStaleMs?: number } {
    return { lockStaleMs: this.o.lockStaleMs ?? 30_000, ...(this.o.leaseStaleMs !== undefined ? { leaseStaleMs: this.o.leaseStaleMs } : {}) };
  }

  /**
   * Download rounds: a round fetches what is not whole; objects that change meanwhile start another one. `from`: the
   * version a new version is made from, whose derived files are carried into it (ResolveOptions.carry); without it the
   * entry's own derived files of unchanged components stay through its sweeps (ResolveOptions.keep).
   */
  private async rounds(initial: RemoteObject[], journal: Journal, get: (r: GetRequest) => Promise<ObjectBody>, signal: AbortSignal, lost: AbortSignal,
    dl: typeof import('./download.js'), from?: string): Promise<ResolvedModel> {
    const { cfg, log } = this.o;
    const { downloadAll, defaultIo, ObjectChangedError } = dl;
    let listing = initial;
    const started = performance.now();
    let why: 'changed' | 'incomplete' | 'damaged' = 'changed';
    const transport = await this.transport!;
    // Directory buckets' (S3 Express One Zone) ETags are random strings, not MD5s: checked by their checksums alone.
    const directoryBucket = /--x-s3$/.test(this.bucket);
    const checkState = cfg.s3.verifyContent ? newContentCheckState() : undefined;
    let evictedAfterRefusal = false;
    // What this round's sweep kept of the caller's derived files (ResolveOptions.keep): dropPartials keeps them too.
    let derived: readonly string[] = [];
    for (let round = 0; round < 4; round++) {
      if (round > 0) this.o.onRestart?.();
      const reuse: RemoteObject[] = [];
      const fetch: RemoteObject[] = [];
      const keep = new Set<string>();
      // Each folder of the entry looked at once for all the files under it (the sweep below changes them: per round).
      const folders = new Map<string, Promise<boolean>>();
      for (const obj of listing) {
        const j = journal.get(obj.rel);
        const size = await this.onCache(() => entrySize(this.entry, obj.rel, folders));
        // A file under its final name got there by a rename once it was whole, at the version the journal recorded
        // before its first byte (downloadAll): with that version listed, it is reused, whether or not the journal
        // heard of the rename before a kill.
        if (j !== undefined && sameEtag(j.etag, obj.etag) && j.size === obj.size && size === obj.size) {
          if (!j.complete) journal.complete(obj.rel, obj.etag, obj.size);
          reuse.push(obj);
          keep.add(obj.rel);
        } else {
          fetch.push(obj);
          // A partial reached through a link (its folder one) goes with the link: its spans are not resumed.
          if (j !== undefined && !j.complete && sameEtag(j.etag, obj.etag) && j.size === obj.size && !(await this.onCache(() => throughLink(this.entry, obj.rel + PARTIAL)))) keep.add(obj.rel + PARTIAL);
          else journal.drop(obj.rel);
        }
      }
      const listed = new Set(listing.map((o) => o.rel));
      for (const rel of [...journal.files.keys()]) if (!listed.has(rel)) journal.drop(rel);
      derived = from === undefined && this.o.keep ? await this.keptDerived(reuse, fetch) : [];
      for (const rel of derived) keep.add(rel);
      // Stale files go (durably) before the journal names new versions: a file found later under a final name is
      // then always the version the journal names.
      const swept = await this.onCache(() => sweep(this.entry, keep));
      if (swept.length > 0) log.info({ files: swept.length }, 'removed stale temporary and outdated files from the cache entry');
      await journal.sync();
      if (from !== undefined && this.o.carry) await this.carryFrom(from);

      Object.assign(this.progress, { bytesTotal: listing.reduce((s, x) => s + x.size, 0), bytesDone: 0, filesTotal: listing.length, filesDone: 0 });
      this.o.onListing?.(listing.map((o) => ({ relPath: o.rel, size: o.size })));
      for (const obj of reuse) {
        this.progress.bytesDone += obj.size;
        this.progress.filesDone++;
        this.o.onFileReady?.(obj.rel, path.join(this.entry, obj.rel));
      }
      if (reuse.length > 0) log.info({ files: reuse.length }, 'reusing files already downloaded');
      const resumed = fetch.reduce((n, x) => n + spanBytes(journal.get(x.rel)?.spans ?? []), 0);
      if (resumed > 0) log.info({ bytes: resumed }, 'resuming partly downloaded files');
      this.emit('downloading', true);
      let report;
      try {
        report = await downloadAll(fetch, {
          get, bucket: this.bucket, endpoint: endpointName(cfg.s3, this.bucket), entry: this.entry, journal, log, signal, lost,
          concurrency: cfg.s3.maxConcurrency, partSize: cfg.s3.partSize, stallMs: cfg.s3.stallTimeoutS * 1000, maxAttempts: cfg.s3.maxAttempts,
          throttleMs: cfg.s3.throttleTimeoutS * 1000,
          ...(this.o.throttleWatch ? { throttleWatch: this.o.throttleWatch } : {}),
          writeBytes: this.o.writeBytes ?? WRITE_BYTES,
          ...(this.o.syncMs !== undefined ? { syncMs: this.o.syncMs } : {}),
          io: { ...defaultIo, ...this.o.io },
          ...(checkState ? { check: { state: checkState, head: (r) => transport.head(r), etagsAreMd5: !directoryBucket, onDamaged: (rel) => this.o.onDamaged?.(rel) } } : {}),
          makeRoom: (need, free, head) => this.roomFor(need - free, head, true),
          onBytes: (n) => {
            this.progress.bytesDone += n;
            this.emit('downloading', false);
          },
          onReceived: (n) => this.o.onDownloaded?.(n),
          onFileDone: (obj, abs) => {
            this.progress.filesDone++;
            this.emit('downloading', true);
            this.o.onFileReady?.(obj.rel, abs);
          },
        });
      } catch (e) {
        if (e instanceof RuntimeError && e.code === 'NO_SPACE') {
          await this.dropPartials(journal, derived);
          // The volume refused a write although statfs said there was room (a quota, another writer): its figure is not
          // trusted, so what is evicted must itself add up to what is left to fetch. Once: a second refusal is final.
          if (e.cause !== undefined) {
            const left = fetch.filter((x) => !journal.get(x.rel)?.complete).reduce((n, x) => n + x.size, 0);
            await this.roomFor(left, dl.noSpaceHead(e), !evictedAfterRefusal, e);
            evictedAfterRefusal = true;
            log.warn({ uri: this.uri }, 'the cache volume refused a write; made room and downloading the rest again');
            continue;
          }
        }
        if (e instanceof ContentMismatchError) {
          // Which bytes are damaged is not known: download.ts dropped the file from the journal, so it is fetched again
          // whole, once (download.ts decides after that).
          log.warn({ file: e.rel, against: e.against, expected: e.expected, got: e.got }, `the content of a downloaded file differs from its ${e.against}; fetching the file again`);
          await journal.sync();
          why = 'damaged';
          continue;
        }
        if (!(e instanceof ObjectChangedError)) throw e;
        log.warn({ key: e.key }, e.missing === undefined ? 'object changed during the download; listing again' : 'object deleted during the download; listing again');
        why = 'changed';
        const before = listing.find((x) => x.key === e.key);
        listing = await this.listing();
        // Checked as the first listing was: the next round makes a path of every key it names.
        this.checkListing(listing);
        // Still listed as it was, yet S3 says it does not exist: no round will fetch it.
        const still = listing.find((x) => x.key === e.key);
        if (e.missing !== undefined && still && before && still.etag === before.etag && still.size === before.size) throw permanentError(e.missing, this.bucket, e.key, 'read');
        continue;
      }
      // Sizes were checked per file and every response's ETag against the listing. A fresh listing after the
      // last byte also catches an object replaced while its ranges streamed (stores that overwrite in place
      // can tear a read whose headers were already sent), at the cost of one round trip.
      this.emit('verifying', true);
      if (!report.etagsChecked) log.warn({ uri: this.uri }, 'the store sent no ETag with some ranges; relying on the final listing');
      const now = fetch.length === 0 ? listing : await this.listing();
      const changed = now.length !== listing.length || now.some((x, i) => x.rel !== listing[i]!.rel || x.etag !== listing[i]!.etag || x.size !== listing[i]!.size);
      if (changed) {
        log.warn({ uri: this.uri }, 'objects changed while downloading; fetching the changes');
        this.checkListing(now);
        why = 'changed';
        listing = now;
        continue;
      }
      // The commit names every listed file: each must be there, whole, under its final name.
      const bad = await this.onCache(() => this.notWhole(listing));
      if (bad.length > 0) {
        log.warn({ files: bad.slice(0, 5), count: bad.length }, 'files missing or short after the download; fetching them again');
        for (const rel of bad) journal.drop(rel);
        await journal.sync();
        why = 'incomplete';
        continue;
      }
      log.debug({ ms: Math.round(performance.now() - started) }, 'all files whole');
      const dirs = new Set(listing.map((x) => path.dirname(path.join(this.entry, x.rel))));
      for (const d of dirs) await this.onCache(() => fsyncDir(d));
      const bytes = listing.reduce((s, x) => s + x.size, 0);
      await this.onCache(() => writeManifest(this.entry, {
        version: 1, uri: this.uri, bytes, completedAt: new Date().toISOString(),
        files: listing.map((x) => ({ path: x.rel, size: x.size, etag: x.etag })),
      }));
      await journal.remove();
      const secs = (performance.now() - started) / 1000;
      const checked = contentChecked(checkState, listing);
      log.info({ uri: this.uri, bytes, files: listing.length, seconds: +secs.toFixed(2), mbps: +(bytes / 1e6 / secs).toFixed(1), ...checked }, 'model cached');
      this.emit('done', true);
      return {
        dir: this.entry, fromCache: false, bytes, files: listing.length, seconds: this.elapsed(), source: 's3',
        contentChecked: checked.contentChecked ?? 'off', ...(checked.contentNotChecked ? { contentNotChecked: checked.contentNotChecked } : {}),
      };
    }
    if (why === 'damaged') {
      throw new RuntimeError('STORAGE_CORRUPT', `files under ${this.uri} kept arriving with content that differs from their ETags or checksums, in 4 download rounds: ` +
        'something between S3 and this pod damages data (a proxy, the network, the cache volume)');
    }
    if (why === 'incomplete') {
      throw new RuntimeError('STORAGE_INCOMPLETE', `files under ${this.uri} were still missing or short after 4 download rounds; check the free space and health of the cache volume`);
    }
    throw new RuntimeError('STORAGE_TRANSIENT', `objects under ${this.uri} kept changing during the download; try again when the upload has finished`);
  }

  /**
   * Frees `shortfall` bytes by evicting least recently used entries nobody fills or serves from (CACHE_EVICT=lru, and
   * `evict`), resolving to the bytes freed; otherwise throws NO_SPACE: `head`, then what the cache holds.
   */
  private async roomFor(shortfall: number, head: string, evict: boolean, cause?: unknown): Promise<number> {
    const { cfg, log } = this.o;
    const self = path.basename(this.entry);
    // In the caller's bound where it has one (a LoRA adapter's fetch): each look, measure and removal of the eviction.
    const opts = { exclude: self, ...this.entryOptions(), ...this.entryBound() };
    const lru = evict && cfg.cacheEvict === 'lru';
    const r = lru
      ? await makeRoom(cfg.cacheDir, shortfall, {
        ...opts,
        // A stop ends a watch of leases that look old at once.
        signal: this.signal,
        onEvicted: (e) => {
          log.warn({ entry: e.name, bytes: e.bytes, lastUsed: e.lastUsed.toISOString(), for: self }, 'cache entry evicted');
          this.o.onEvicted?.(e);
        },
      })
      : { freed: 0, freeable: 0, left: (await listEntries(cfg.cacheDir, opts)).filter((e) => e.name !== self) };
    if ('watched' in r && r.watched.entries.length > 0) {
      log.info({ entries: r.watched.entries, seconds: +(r.watched.ms / 1000).toFixed(1), for: self },
        'cache eviction watched heartbeats that look old on this clock');
    }
    if (r.freed >= shortfall) return r.freed;
    const idle = r.left.filter((e) => !inUse(e)).reduce((n, e) => n + e.bytes, 0);
    const why = cfg.cacheEvict === 'off' ? 'CACHE_EVICT=off'
      : !lru ? 'entries were evicted for this download already'
        : idle > 0 ? `removing every entry not in use would free only ${mb(r.freeable)} MB, so none was` : 'none of them can be evicted';
    log.warn({ entry: self, needBytes: shortfall, entries: r.left.map((e) => ({ entry: e.name, bytes: e.bytes, lastUsed: e.lastUsed.toISOString(), inUse: inUse(e) })) },
      'model cache full');
    const held = r.left.length === 0 ? 'the cache holds no other entry' : `${describeEntries(r.left)} (${why})`;
    throw new RuntimeError('NO_SPACE', `${head}; ${held}; enlarge the PVC or remove entries not in use (warmup cache prune)`,
      cause !== undefined ? { cause } : undefined);
  }

  /**
   * Every listing a fill downloads from, the first and those taken again during it: one that became empty (the model
   * deleted meanwhile) is missing as an empty prefix is, never an entry committed with no file.
   */
  private checkListing(listing: readonly RemoteObject[]): void {
    if (listing.length === 0) {
      const archive = ARCHIVE.exec(this.prefix.replace(/\/$/, ''))?.[0];
      throw new RuntimeError('STORAGE_MISSING', archive
        ? `no objects under ${this.uri}: STORAGE_URI names an archive (${archive}), which KServe's storage initializer unpacks and this runtime does not; upload the exported folder's files under a prefix (aws s3 sync <export> s3://bucket/prefix/) and point STORAGE_URI at it`
        : `no objects under ${this.uri}; check the bucket and prefix in STORAGE_URI`);
    }
    checkListing(listing, this.bucket, this.prefix, this.entry);
  }

  /** Listed files that are not a regular file of the listed size under their final name. */
  private async notWhole(listing: readonly RemoteObject[]): Promise<string[]> {
    const bad: string[] = [];
    for (const x of listing) {
      const st = await fsp.stat(path.join(this.entry, x.rel)).catch(() => undefined);
      if (!st?.isFile() || st.size !== x.size) bad.push(x.rel);
    }
    return bad;
  }

  /** After ENOSPC: free what the partial files hold; whole files stay reusable through the journal, `derived` files too. */
  private async dropPartials(journal: Journal, derived: readonly string[]): Promise<void> {
    const keep = new Set<string>(derived);
    for (const [rel, j] of journal.files) {
      if (j.complete) keep.add(rel);
      else journal.drop(rel);
    }
    await journal.sync().catch(() => undefined);
    await this.onCache(() => sweep(this.entry, keep)).catch(() => undefined);
  }

  /**
   * One of the fill's own calls on the cache outside its download's writes (a look at the entry's versions, the
   * journal's open, a sweep, the commit), in the caller's bound where it has one (ResolveOptions.io.other, as the
   * writes): a LoRA adapter's fetch stuck in one of them on a volume that stopped answering kept a pool thread beside
   * the bound, and several stuck at once filled the pool (test/lora-stuck-volume.test.ts). `call` must not itself wait
   * for the bound (a journal's sync, write or close does: not passed here).
   */
  private onCache<T>(call: () => Promise<T>): Promise<T> {
    const other = this.o.io?.other;
    return other ? other(call) : call();
  }

  private elapsed(): number {
    return (performance.now() - this.t0) / 1000;
  }

  private emit(phase: FetchProgress['phase'], force: boolean): void {
    const now = performance.now();
    if (!force && now - this.lastEmit < 200) return;
    this.lastEmit = now;
    this.progress.phase = phase;
    // Rate over the last ~3 s, so a stall shows up quickly and the ETA does not lag.
    this.samples.push([now, this.progress.bytesDone]);
    while (this.samples.length > 2 && now - this.samples[0]![0] > 3_000) this.samples.shift();
    const [t, b] = this.samples[0]!;
    // Not said (0: the warm-up's line says ETA ?) before a second of samples: the first 200 ms, mostly S3's first-byte
    // wait, made an ETA of hours.
    this.progress.bytesPerSecond = now - t >= RATE_WINDOW_MIN_MS ? Math.max(0, ((this.progress.bytesDone - b) * 1000) / (now - t)) : 0;
    this.o.onProgress?.({ ...this.progress });
    if (phase !== 'downloading') {
      this.lastLog = undefined;
      return;
    }
    this.lastLog ??= now;
    if (now - this.lastLog < (this.o.progressLogMs ?? PROGRESS_LOG_MS)) return;
    this.lastLog = now;
    const p = this.progress;
    this.o.log.info({ mbDone: +mb(p.bytesDone), mbTotal: +mb(p.bytesTotal), filesDone: p.filesDone, filesTotal: p.filesTotal, mbps: +mb(p.bytesPerSecond) },
      'downloading the model into the cache');
  }
}

/**
 * The commit's account of the content check: files checked in this fill (by ETag or checksum), and why others were not
 * (files reused whole from an earlier run were checked then, or before the check existed: neither is counted).
 */
function contentChecked(state: ContentCheckState | undefined, listing: readonly RemoteObject[]):
  { contentCheck?: string; contentChecked?: number; contentNotChecked?: Record<string, number> } {
  if (state === undefined) return { contentCheck: 'off' };
  const listed = new Set(listing.map((x) => x.rel));
  const why: Record<string, number> = {};
  for (const [rel, reason] of state.unchecked) if (listed.has(rel) && !state.checked.has(rel)) why[reason] = (why[reason] ?? 0) + 1;
  return { contentChecked: [...state.checked].filter((r) => listed.has(r)).length, ...(Object.keys(why).length > 0 ? { contentNotChecked: why } : {}) };
}

/** The heartbeat of a fill's locks: well inside their staleness, so a busy event loop does not lose them. */
const fillHeartbeatMs = (staleMs: number): number => Math.max(50, Math.floor(staleMs / 15));
/**
 * A lock's calls (its creation, a waiter's looks, its heartbeat and release) through the caller's bound, ahead of its
 * queued writes: behind them (the bound at 1, a volume answering each call 120 ms late) a heartbeat waited 38 s, past
 * the lock's 30 s staleness.
 */
const lockBound = (other: StorageIo['other']) => <T>(call: () => Promise<T>): Promise<T> => other(call, { ahead: true });

/** What a process waiting for another one's fill of the entry keeps between polls. */
class HolderWatch {
  tail: JournalTail;
  readonly bytesTotal: number;
  /** Files announced (onFileReady) while waiting. */
  readonly announced = new Set<string>();
  /** When the wait began (performance.now()); undefined: the lock was free. */
  since: number | undefined;
  lastLog = 0;

  constructor(public dir: string, readonly want: readonly RemoteObject[]) {
    this.tail = new JournalTail(dir);
    this.bytesTotal = want.reduce((n, o) => n + o.size, 0);
  }

  /** The holder writes another version folder: its journal is followed from its start. */
  follow(dir: string): void {
    this.dir = dir;
    this.tail = new JournalTail(dir);
    this.announced.clear();
  }
}

