/**
 * @module The cache warm-up Job's CLI. `node dist/warmup/main.js` fills MODEL_CACHE_DIR from STORAGE_URI
 * (same code path as the server's boot), prints progress to stderr about once a second and one JSON line
 * on stdout; `node dist/warmup/main.js push LOCAL_DIR s3://bucket/prefix` uploads an exported model; `cache list` and
 * `cache prune` show and remove MODEL_CACHE_DIR's entries (storage/entries.ts), one JSON line per entry.
 * Exit status: 0 done, 1 failed (one-line reason on stderr), 2 usage/config error, 128 + the signal's number when
 * stopped (143 SIGTERM, 130 SIGINT), as a shell reports a process the signal killed.
 */
import { createReadStream, promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { applyContainerDefaults, type Config, ConfigError, loadConfig, misspelledVariables, misspelledWarning, PVC_CACHE_DIR, trimCredentials, TRIMMED_CREDENTIALS } from '../src/config.js';
import { isRuntimeError, RuntimeError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import type { S3Outcome } from '../src/metrics.js';
import { unusedFiles } from '../src/pipeline/model.js';
import { optimizedCopyHooks } from '../src/pipeline/ortcache.js';
import { type FetchProgress, resolveModel } from '../src/storage/fetch.js';
import { BOOKKEEPING, linkedFiles, mb, PARTIAL } from '../src/storage/cache.js';
import { classify, endpointName, permanentError, retryTransient } from '../src/storage/s3-errors.js';
import { countingRequests } from '../src/storage/s3-requests.js';
import { abortUploads, cleanupReason, trackUploads, type UploadTracker } from '../src/storage/multipart.js';
import { Throttle, ThrottledTries, type ThrottledWork } from '../src/storage/throttle.js';
import { uploadingUntil, uploadScope } from '../src/storage/upload-signal.js';
import { stallError, boundedAttempt } from '../src/storage/upload-stall.js';
import { checkAddressing, explainFallback, fallbackProblem, unaddressableUris } from '../src/storage/addressing.js';
import { emptyAdapterSets, emptyHolderTemps, emptyOrphanLeases, emptyTrash, inUse, listEntries, removeEntry, watchEntries, type CacheEntry } from '../src/storage/entries.js';
import { LEASE_STALE_MS } from '../src/storage/lease.js';
import { type StillBeats } from '../src/storage/lock.js';
import { cacheKey, parseStorageUri, type StorageSource } from '../src/storage/uri.js';
import { parseVersion } from '../src/storage/versions.js';
import { endBySignal, fsRequestsAnswered, fsRequestsPending, lookForDefaultCacheDir, pendingByVolume, serverVolumes } from '../src/storage/pending-io.js';
import { terminationReason } from '../src/termination.js';

const USAGE = 'usage: warmup                       (fills the cache from STORAGE_URI)\n       warmup push LOCAL_DIR s3://bucket/prefix [--replace]'
  + '\n       warmup cache list\n       warmup cache prune [--keep-uri s3://bucket/prefix]... [--older-than 7d] [--dry-run]';

function progressLine(p: FetchProgress): string {
  const pct = p.bytesTotal > 0 ? ((100 * p.bytesDone) / p.bytesTotal).toFixed(1) : '0.0';
  const eta = p.bytesPerSecond > 0 ? `${Math.ceil((p.bytesTotal - p.bytesDone) / p.bytesPerSecond)}s` : '?';
  return `${p.phase} ${mb(p.bytesDone)}/${mb(p.bytesTotal)} MB (${pct}%) ${mb(p.bytesPerSecond)} MB/s ETA ${eta} files ${p.filesDone}/${p.filesTotal}`;
}

/**
 * How the S3 requests of a fill or a push ended (as the server's s3_requests_total counts them; the Job serves no
 * metrics): in its JSON line, and on stderr before the line of a failed run.
 */
const sent = new Map<S3Outcome, number>();
const tally = (o: S3Outcome) => void sent.set(o, (sent.get(o) ?? 0) + 1);
const requestsSent = () => Object.fromEntries([...sent].sort(([a], [b]) => a.localeCompare(b)));

/** MODEL_CACHE_DIR's default, once main has looked for it (before any command runs). */
let defaultCacheDir: string | undefined;
/** The config, with the default main found: loadConfig alone would look for it synchronously. */
const config = () => loadConfig(process.env, { defaultCacheDir });

async function warm(signal: AbortSignal): Promise<void> {
  const cfg = config();
  if (cfg.storageUri === undefined) {
    // The Job exits here, before the warnings below: a mistyped name is named in its one line.
    const typo = misspelledVariables(process.env).find((m) => m.meant === 'STORAGE_URI');
    throw new ConfigError([`STORAGE_URI is required for the warm-up Job (s3://bucket/prefix)${typo ? `; ${typo.variable} is set: did you mean STORAGE_URI?` : ''}`]);
  }
  const unaddressable = unaddressableUris(cfg);
  if (unaddressable.length > 0) throw new ConfigError(unaddressable);
  const log = jobLogger(cfg);
  const trimmed = trimCredentials();
  if (trimmed.length > 0) log.warn({ variables: trimmed }, TRIMMED_CREDENTIALS);
  for (const m of misspelledVariables(process.env)) log.warn(m, misspelledWarning(m));
  let last = 0;
  let latest: FetchProgress | undefined;
  const print = (p: FetchProgress) => process.stderr.write(`warmup: ${progressLine(p)}\n`);
  const timer = setInterval(() => latest && print(latest), 1_000);
  timer.unref();
  try {
    const r = await resolveModel(cfg.storageUri, {
      // What the server leaves out, so that its cache hit finds the entry this fill commits.
      cfg, log, signal, requireHitCheck: true, unused: unusedFiles,
      // Unchanged components keep their optimized copies through its fill, in place or in a new version, as a server's.
      ...optimizedCopyHooks(cfg.optimizedModelCache),
      onProgress: (p) => {
        latest = p;
        const now = Date.now();
        if (now - last >= 1_000 || p.phase === 'done') {
          last = now;
          print(p);
        }
      },
    });
    process.stdout.write(`${JSON.stringify({
      modelDir: r.dir, bytes: r.bytes, files: r.files, seconds: +r.seconds.toFixed(3), fromCache: r.fromCache,
      ...(r.contentChecked !== undefined ? { contentChecked: r.contentChecked } : {}), ...(r.contentNotChecked ? { contentNotChecked: r.contentNotChecked } : {}),
      s3Requests: requestsSent(),
    })}\n`);
  } finally {
    clearInterval(timer);
  }
}

/** stdout carries only the final JSON line; a Job log shows progress and problems, not every event. */
const jobLogger = (cfg: Config) => createLogger(cfg.logLevel === 'info' && process.env.LOG_LEVEL === undefined ? 'warn' : cfg.logLevel, 'warmup', 2);

/** For the commands an operator runs by hand: the warnings the fill logs (misspelledVariables), as plain lines. */
function warnMisspelled(): void {
  for (const m of misspelledVariables(process.env)) process.stderr.write(`warmup: ${misspelledWarning(m)}\n`);
}

async function push(args: string[], signal: AbortSignal): Promise<void> {
  const replace = args.includes('--replace');
  const unknown = args.filter((a) => a.startsWith('--') && a !== '--replace');
  if (unknown.length > 0) throw new UsageError(`push: unknown option${unknown.length > 1 ? 's' : ''} ${quoted(unknown)}`);
  const [localDir, uri, ...extra] = args.filter((a) => !a.startsWith('--'));
  if (localDir === undefined || uri === undefined) throw new UsageError('push needs LOCAL_DIR and s3://bucket/prefix');
  if (extra.length > 0) throw new UsageError(`push takes LOCAL_DIR and s3://bucket/prefix, got also ${quoted(extra)}`);
  const cfg = config();
  warnMisspelled();
  trimCredentials();
  const src = argUri('push target', uri);
  if (src.kind !== 's3') throw new UsageError(`push target must be s3://bucket/prefix, got ${JSON.stringify(uri)}`);
  const fallback = checkAddressing(cfg.s3, src.bucket, src.uri, (f, msg) => process.stderr.write(`push: ${fallbackProblem(msg, f)}\n`));
  const st = await fsp.stat(localDir).catch(() => undefined);
  if (!st?.isDirectory()) throw new RuntimeError('STORAGE_MISSING', `${localDir} is not a directory`);
  const t0 = performance.now();
  const all = await linkedFiles(localDir, (r) => {
    throw new RuntimeError('STORAGE_MISSING', `${r} under the folder to push is a symlink to nothing; fix or remove it`);
  });
  // A cache entry (or a copy of one) holds the cache's own files: a server would refuse a prefix that has them.
  const partial = all.find((rel) => rel.endsWith(PARTIAL));
  if (partial !== undefined) throw new RuntimeError('STORAGE_MISSING', `${localDir} holds an unfinished download (${partial}); push a complete export`);
  const files = all.filter((rel) => !BOOKKEEPING.includes(path.posix.basename(rel)));
  if (files.length < all.length) process.stderr.write(`push: skipped ${all.length - files.length} cache bookkeeping file(s) (${BOOKKEEPING.join(', ')})\n`);
  if (files.length === 0) throw new RuntimeError('STORAGE_MISSING', `${localDir} holds no files to upload`);
  // Imported here, not at the top: with S3_TRANSPORT=lite a fill never loads the AWS SDK.
  const [{ Upload }, { createS3, listPrefix }, { DeleteObjectCommand, DeleteObjectsCommand }] = await Promise.all([
    import('@aws-sdk/lib-storage'), import('../src/storage/s3-sdk.js'), import('@aws-sdk/client-s3')]);
  const s3 = createS3(cfg.s3, undefined, (o) => {
    const rel = o.key.slice(src.prefix.length);
    if (o.aborted.length > 0) process.stderr.write(`push: aborted ${o.aborted.length} multipart upload(s) of ${rel} that CreateMultipartUploads left unanswered made\n`);
    if (o.failed !== undefined) {
      process.stderr.write(`push: a CreateMultipartUpload of ${rel} was left unanswered, and the multipart upload it may have made could not be looked for or aborted `
        + `(${o.failed}); it holds no part, but ListMultipartUploads shows it until aborted (aws s3api list-multipart-uploads, abort-multipart-upload) or a `
        + 'lifecycle rule (AbortIncompleteMultipartUpload) removes it\n');
    }
  }, jobLogger(cfg));
  // The push's own requests (its LIST, its deletes) are cut as its uploads' are, after S3_STALL_TIMEOUT_S of silence,
  // and tried again: a store that read one and never answered held the push for good.
  const stallMs = cfg.s3.stallTimeoutS * 1000;
  // What a failure of the connection itself names (s3-errors.ts permanentError).
  const endpoint = endpointName(cfg.s3, src.bucket);
  const bounded = <T>(request: string, fn: () => Promise<T>) => (attempt: number) =>
    boundedAttempt(stallMs, fn, (cause) => stallError(request, stallMs, attempt, TRIES, cause));
  const stalled = (action: string, e: unknown) => (isRuntimeError(e) && e.code === 'STORAGE_STALL'
    ? new RuntimeError('STORAGE_STALL', `cannot ${action}: ${e.message}; check the link to S3, or raise S3_STALL_TIMEOUT_S for a store that answers slowly`, { cause: e })
    : undefined);
  // A server reads every object under the prefix that a model uses: one this export lacks would be downloaded and
  // loaded with it (a VAE encoder of the model pushed before beside this UNet). loras/ holds adapters added beside the
  // model, kept.
  const pushing = new Set(files);
  // Its LIST and deletes wait throttling out as its uploads do (no try spent; S3_THROTTLE_TIMEOUT_S without an answer).
  const log = jobLogger(cfg);
  const throttled = (what: ThrottledWork) => new ThrottledTries(new Throttle({ concurrency: 1, timeoutMs: cfg.s3.throttleTimeoutS * 1000, log, what, fields: { uri: src.uri } }));
  /** Why a delete of `key` tried through `tries` failed: throttled past its bound, stalled, or S3's refusal. */
  const deleteFailure = (tries: ThrottledTries, key: string, e: unknown): RuntimeError => {
    const where = `s3://${src.bucket}/${key}`;
    return tries.gaveUp ? tries.throttle.gaveUp(`delete ${where}`, e) : stalled(`delete ${where}`, e) ?? permanentError(e, src.bucket, key, 'delete', endpoint);
  };
  /**
   * Deletes the object of a file that changed while it was uploaded, tried as the --replace deletes are (TRIES, throttled
   * answers waited out, each attempt cut after S3_STALL_TIMEOUT_S of silence). Undefined once deleted, else why not.
   */
  const deleteChanged = async (key: string): Promise<string | undefined> => {
    const tries = throttled('push\'s delete');
    try {
      await retryTransient((attempt) => tries.attempt(signal, () => bounded('DeleteObject', () => s3.client.send(new DeleteObjectCommand({ Bucket: src.bucket, Key: key }),
        { abortSignal: signal }))(attempt)), TRIES, signal, undefined, tries.onThrottled);
      return undefined;
    } catch (e) {
      if (signal.aborted) return 'the push was stopped';
      return deleteFailure(tries, key, e).message;
    } finally {
      tries.done();
    }
  };
  let stale: string[];
  const listing = throttled('push\'s listing');
  try {
    const listed = await retryTransient((attempt) => listing.attempt(signal, () => bounded('ListObjectsV2', () => listPrefix(s3.client, src.bucket, src.prefix, signal))(attempt)),
      TRIES, signal, undefined, listing.onThrottled);
    stale = listed.map((o) => o.rel).filter((rel) => !pushing.has(rel) && !rel.startsWith('loras/'));
  } catch (e) {
    s3.destroy();
    if (signal.aborted) throw e;
    const where = `s3://${src.bucket}/${src.prefix}`;
    if (listing.gaveUp) throw listing.throttle.gaveUp(`list ${where}`, e);
    throw stalled(`list ${where}`, e) ?? explainFallback(permanentError(e, src.bucket, undefined, 'list', endpoint), fallback);
  } finally {
    listing.done();
  }
  if (stale.length > 0 && !replace) {
    s3.destroy();
    const shown = stale.slice(0, 3).join(', ') + (stale.length > 3 ? `, … ${stale.length - 3} more` : '');
    throw new RuntimeError('INVALID_INPUT', `s3://${src.bucket}/${src.prefix} already holds ${stale.length} object(s) this export does not have (${shown}); `
      + 'a server reads every object under the prefix and would load them with this export: push to an empty prefix, or add --replace to delete them once the upload is done');
  }
  let bytes = 0;
  let next = 0;
  const partSize = Math.max(5 * 1024 * 1024, cfg.s3.partSize);
  // A few files at once, each with a few parts in flight: about S3_MAX_CONCURRENCY requests in total.
  const filesAtOnce = Math.max(1, Math.min(4, Math.floor(cfg.s3.maxConcurrency / 4)));
  const queueSize = Math.max(1, Math.floor(cfg.s3.maxConcurrency / filesAtOnce));
  const uploads = trackUploads(s3.client);
  // One file failing, or a signal, stops the others' uploads too: each would go on sending parts.
  const halt = new AbortController();
  const onSignal = () => halt.abort(signal.reason);
  signal.addEventListener('abort', onSignal, { once: true });
  let failure: { error: unknown } | undefined;
  try {
    await Promise.all(Array.from({ length: Math.min(filesAtOnce, files.length) }, async () => {
      while (next < files.length && !halt.signal.aborted) {
        const rel = files[next++]!;
        const abs = path.join(localDir, rel);
        const before = await fsp.stat(abs);
        // Halted during the stat: its listener below would never fire, and the whole file would go up.
        if (halt.signal.aborted) break;
        const up = new Upload({ client: s3.client, queueSize, partSize, leavePartsOnError: false,
          params: { Bucket: src.bucket, Key: src.prefix + rel, Body: createReadStream(abs) } });
        const onHalt = () => void up.abort();
        halt.signal.addEventListener('abort', onHalt, { once: true });
        try {
          // Its parts in flight are what throttling cuts (upload-retry.ts).
          await uploadingUntil(uploadScope(halt.signal, { concurrency: queueSize }), () => up.done());
        } catch (e) {
          // Throttled for S3_THROTTLE_TIMEOUT_S (upload-retry.ts): the error already names the object and what to do.
          if (halt.signal.aborted || (isRuntimeError(e) && e.code === 'STORAGE_TRANSIENT')) throw e;
          throw stalled(`upload s3://${src.bucket}/${src.prefix}${rel}`, e) ?? explainFallback(permanentError(e, src.bucket, src.prefix + rel, 'upload', endpoint), fallback);
        } finally {
          halt.signal.removeEventListener('abort', onHalt);
        }
        // A file written while it was read (an export still running) uploads as a mix of two versions whose ETag
        // matches it, so a fill would load it as sound: such an object is deleted and the push fails.
        const after = await fsp.stat(abs).catch(() => undefined);
        if (after?.size !== before.size || after.mtimeMs !== before.mtimeMs || after.ino !== before.ino) {
          const where = `s3://${src.bucket}/${src.prefix}${rel}`;
          const left = await deleteChanged(src.prefix + rel);
          // Named on its own line too: a push stopped meanwhile ends with the signal's line, not this error's.
          if (left !== undefined) process.stderr.write(`push: ${rel} changed while it was uploaded, and its object ${where}, which may mix both versions, is left behind: ${left}\n`);
          throw new RuntimeError('INVALID_INPUT', `${rel} changed while it was uploaded (is the export still being written?); `
            + `${left === undefined ? 'its object was deleted' : `its object ${where}, which may mix both versions, could not be deleted and is left behind (${left}): delete it before a server reads the prefix`}; `
            + 'push again once the folder is final');
        }
        bytes += before.size;
        process.stderr.write(`push: ${rel} (${mb(bytes)} MB so far)\n`);
      }
    }).map((w) => w.catch((e: unknown) => {
      failure ??= { error: e };
      halt.abort(e);
    })));
  } finally {
    signal.removeEventListener('abort', onSignal);
  }
  if (halt.signal.aborted) {
    await abortUnfinished(cfg, src, uploads, s3);
    throw signal.aborted ? signal.reason : failure!.error;
  }
  try {
    // Only once every file is up: a failed push leaves the old objects beside the new ones, never neither.
    for (let i = 0; i < stale.length; i += 1000) {
      let left = stale.slice(i, i + 1000).map((rel) => src.prefix + rel);
      const deletes = throttled('push\'s delete');
      try {
        // A key S3 could not delete this time (InternalError, SlowDown) is asked for again; any other failure is final.
        await retryTransient((attempt) => deletes.attempt(signal, async () => {
          const r = await bounded('DeleteObjects', () => s3.client.send(new DeleteObjectsCommand({ Bucket: src.bucket, Delete: { Objects: left.map((Key) => ({ Key })), Quiet: true } }),
            { abortSignal: signal }))(attempt);
          const failed = r.Errors ?? [];
          if (failed.length === 0) return;
          left = failed.map((f) => f.Key ?? '');
          // Named as S3 names it (AccessDenied, InternalError, …): the first that retrying cannot fix, else the first.
          const worst = failed.find((f) => classify({ name: f.Code }) !== 'transient') ?? failed[0]!;
          throw Object.assign(new Error(worst.Message ?? 'delete failed'), { name: worst.Code ?? 'InternalError' });
        }), TRIES, signal, undefined, deletes.onThrottled);
      } catch (e) {
        if (signal.aborted) throw e;
        const p = deleteFailure(deletes, left[0]!, e);
        throw explainFallback(new RuntimeError(p.code, `uploaded, but ${left.length} object(s) the export does not have are still under the prefix: ${p.message}; delete them before serving it`, { cause: e }), fallback);
      } finally {
        deletes.done();
      }
    }
    if (stale.length > 0) process.stderr.write(`push: deleted ${stale.length} object(s) the export does not have\n`);
  } finally {
    s3.destroy();
  }
  const seconds = (performance.now() - t0) / 1000;
  process.stdout.write(`${JSON.stringify({ uri: src.uri, bytes, files: files.length, ...(replace ? { deleted: stale.length } : {}), seconds: +seconds.toFixed(3), s3Requests: requestsSent() })}\n`);
}

/** One JSON line per entry on stdout; names as the cache names them (never a local path). */
const entryLine = (e: CacheEntry, extra: Record<string, unknown> = {}) => JSON.stringify({
  ...extra, entry: e.name, ...(e.uri ? { uri: e.uri } : {}), ...(e.version > 1 ? { version: e.version } : {}), ...(e.superseded ? { superseded: true } : {}),
  state: e.state, bytes: e.bytes, ...(e.shared > 0 ? { sharedBytes: e.shared } : {}), lastUsed: e.lastUsed.toISOString(), inUse: inUse(e),
  ...(e.users.length > 0 ? { users: e.users } : {}), ...(e.locked ? { locked: e.locked } : {}), ...(e.lockedFor ? { lockedFor: e.lockedFor } : {}),
});

/** `7d`, `12h`, `30m`, `90s` → ms. */
function parseAge(v: string): number {
  const m = /^(\d+(?:\.\d+)?)(d|h|m|s)$/.exec(v.trim());
  if (!m) throw new UsageError(`--older-than takes a number with a unit (d, h, m or s), like 7d or 12h; got ${JSON.stringify(v)}`);
  return Number(m[1]) * { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1_000 }[m[2] as 'd' | 'h' | 'm' | 's'];
}

/**
 * `cache list`: every entry, least recently used first. `cache prune`: removes every entry no process fills or serves
 * from, except those kept (--keep-uri) or used within --older-than (an older version of an entry is kept by neither:
 * nothing serves from it again); --dry-run only says what would go. A stop (`signal`) ends a watch at once, and
 * releases the lock of the entry being removed.
 */
async function cache(args: string[], signal: AbortSignal): Promise<void> {
  const [sub, ...rest] = args;
  const cfg = config();
  warnMisspelled();
  const summary = (entries: readonly CacheEntry[]) => `${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}, ${mb(entries.reduce((n, e) => n + e.bytes, 0))} MB, ${entries.filter(inUse).length} in use`;
  if (sub === 'list') {
    if (rest.length > 0) throw new UsageError(`cache list takes no arguments, got ${quoted(rest)}`);
    const entries = await listEntries(cfg.cacheDir, { signal });
    for (const e of entries) process.stdout.write(`${entryLine(e)}\n`);
    const trash = await emptyTrash(cfg.cacheDir, { dryRun: true });
    const sets = await emptyAdapterSets(cfg.cacheDir, { dryRun: true });
    process.stderr.write(`cache: ${summary(entries)}${trash > 0 ? `; ${mb(trash)} MB left by an interrupted removal (prune deletes it)` : ''}`
      + `${sets > 0 ? `; ${mb(sets)} MB of LoRA adapter sets of servers gone (prune deletes them)` : ''}\n`);
    return;
  }
  if (sub !== 'prune') throw new UsageError(sub === undefined ? 'cache needs list or prune' : `unknown cache command ${JSON.stringify(sub)}`);
  const keep = new Set<string>();
  let olderThan: number | undefined;
  let dryRun = false;
  const unknown: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i]!;
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = () => {
      const v = inline ?? rest[++i];
      if (v === undefined) throw new UsageError(`${flag} needs a value`);
      return v;
    };
    if (flag === '--dry-run' && inline === undefined) dryRun = true;
    else if (flag === '--older-than') olderThan = parseAge(value());
    else if (flag === '--keep-uri') {
      const v = value();
      const src = argUri('--keep-uri', v);
      if (src.kind !== 's3') throw new UsageError(`--keep-uri takes s3://bucket/prefix, got ${JSON.stringify(v)}`);
      keep.add(cacheKey(src, cfg.s3.endpoint));
      keep.add(src.uri);
    } else unknown.push(a);
  }
  if (unknown.length > 0) throw new UsageError(`cache prune: unknown argument${unknown.length > 1 ? 's' : ''} ${quoted(unknown)}`);
  const now = Date.now();
  // The adapter sets of servers gone go first: a set's hard link to an entry's file then no longer keeps it, and counts
  // with that entry (removeEntry's bytes, what its removal really frees; a dry run's listed bytes), not twice.
  const sets = await emptyAdapterSets(cfg.cacheDir, { dryRun, signal });
  // Heartbeats seen standing still, by the listing (locks) and the watch below (leases): a removal does not watch them again.
  const still: StillBeats = new Map();
  const entries = await listEntries(cfg.cacheDir, { signal, still });
  const verdicts = entries.map((e) => ({
    e,
    kept: !e.superseded && (keep.has(parseVersion(e.name).key) || (e.uri !== undefined && keep.has(e.uri))) ? 'kept'
      : inUse(e) ? 'in use'
        : !e.superseded && olderThan !== undefined && now - e.lastUsed.getTime() < olderThan ? 'recently used' : undefined,
  }));
  const going = verdicts.filter((v) => v.kept === undefined).map((v) => v.e);
  const unsure = going.filter((e) => e.unconfirmed).length;
  if (!dryRun && unsure > 0) {
    // One watch for them all (a minute at most), not one per entry; said, since the prune is silent meanwhile.
    process.stderr.write(`cache: watching the leases of ${unsure} entr${unsure === 1 ? 'y' : 'ies'} whose heartbeats look older than ${LEASE_STALE_MS / 60_000} minutes `
      + `on this clock (servers killed elsewhere, or clocks that disagree) for up to ${LEASE_STALE_MS / 3_000} s before removing them\n`);
    await watchEntries(cfg.cacheDir, going.map((e) => e.name), { signal, still });
  }
  let freed = 0;
  let removed = 0;
  for (const { e, kept } of verdicts) {
    signal.throwIfAborted();
    if (kept !== undefined) {
      process.stdout.write(`${entryLine(e, { action: 'keep', reason: kept })}\n`);
      continue;
    }
    if (dryRun) {
      process.stdout.write(`${entryLine(e, { action: 'would-remove' })}\n`);
      freed += e.bytes;
      removed++;
      continue;
    }
    // Checked again under the entry's lock: a pod may have started on it since the listing. Not watched again: a lease
    // or lock that looks old and was not seen standing still above (it moved, or came since) keeps the entry.
    const r = await removeEntry(cfg.cacheDir, e.name, { watch: false, still, signal });
    if (r.removed) {
      freed += r.bytes;
      removed++;
      process.stdout.write(`${entryLine({ ...e, bytes: r.bytes }, { action: 'removed' })}\n`);
    } else {
      process.stdout.write(`${entryLine(e, { action: 'keep', reason: r.why === 'gone' ? 'gone' : r.why === 'locked' ? 'being filled' : 'in use' })}\n`);
    }
  }
  // Folders of a removal killed midway (already out of any entry's name): theirs to delete, whatever was asked to keep.
  const trash = await emptyTrash(cfg.cacheDir, { dryRun });
  // Lease folders of entries that are not there (a few bytes each, one per STORAGE_URI ever tried): never listed as entries.
  if (!dryRun) await emptyOrphanLeases(cfg.cacheDir, { signal });
  // And the temps of lock and lease files whose writer was killed in the moment it held one: a few bytes each, never
  // removed otherwise.
  if (!dryRun) await emptyHolderTemps(cfg.cacheDir);
  const of = [trash > 0 ? `${mb(trash)} MB of it left by an interrupted removal` : '', sets > 0 ? `${mb(sets)} MB of it LoRA adapter sets of servers gone` : ''].filter(Boolean);
  process.stderr.write(`cache: ${dryRun ? 'would remove' : 'removed'} ${removed} of ${entries.length} entries, ${mb(freed + trash + sets)} MB${of.length > 0 ? ` (${of.join(', ')})` : ''}${dryRun ? ' (dry run)' : ''}\n`);
}

/** Tries of the push's listing and of each batch of deletes, transient errors retried with the fill's backoff. */
const TRIES = 5;

/** How long a stopped push may spend aborting the multipart uploads it leaves unfinished (a Job's grace period is 30 s). */
const ABORT_MS = 10_000;

/**
 * Aborts the multipart uploads a push that stopped part-way leaves unfinished (their parts are billed until aborted,
 * and no listing shows them), within ABORT_MS, and says so on stderr. Nothing more is sent for the uploads first, and
 * the parts in flight are cut (`uploads`' client destroyed), so no part lands after its upload is aborted.
 */
async function abortUnfinished(cfg: Config, src: Extract<StorageSource, { kind: 's3' }>, uploads: UploadTracker, s3: { destroy(): void }): Promise<void> {
  await uploads.stop(2_000);
  s3.destroy();
  const open = [...uploads.open].sort((a, b) => (a[1] < b[1] ? -1 : 1));
  if (open.length === 0) return;
  const { createS3 } = await import('../src/storage/s3-sdk.js');
  const client = createS3(cfg.s3, open.length);
  const got = await abortUploads(client.client, src.bucket, open, ABORT_MS, undefined, { log: jobLogger(cfg) });
  client.destroy();
  const names = (which: 'fulfilled' | 'rejected') => open.filter((_, i) => got[i]!.status === which).map(([, key]) => key.slice(src.prefix.length));
  const shown = (rels: string[]) => rels.slice(0, 5).join(', ') + (rels.length > 5 ? `, … ${rels.length - 5} more` : '');
  const done = names('fulfilled');
  const left = names('rejected');
  if (done.length > 0) process.stderr.write(`push: aborted the unfinished multipart uploads of ${done.length} file(s) (${shown(done)})\n`);
  if (left.length > 0) {
    const why = (got.find((g) => g.status === 'rejected') as PromiseRejectedResult).reason as Error;
    process.stderr.write(`push: could not abort the multipart uploads of ${left.length} file(s) under s3://${src.bucket}/${src.prefix} (${shown(left)}): `
      + `${cleanupReason(why, ABORT_MS)}; their parts are billed until aborted (aws s3api list-multipart-uploads, abort-multipart-upload) or a lifecycle rule `
      + '(AbortIncompleteMultipartUpload) removes them\n');
  }
}

class UsageError extends Error {}

/** Every argument a usage error names, each quoted: `"a", "b"`. */
const quoted = (args: readonly string[]) => args.map((a) => JSON.stringify(a)).join(', ');

/** A URI given as an argument: a bad one is a usage error (exit 2) named as that argument, not as STORAGE_URI. */
function argUri(what: string, v: string): StorageSource {
  try {
    return parseStorageUri(v, `${what}:`);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/**
 * SHUTDOWN_GRACE_S and MODEL_CACHE_DIR, or their defaults where the environment cannot be read (main reports why). Never
 * a look at the volume, here in a signal's handler: before main has found the default, no cacheDir (the calls are named
 * by their whole paths).
 */
function stopSettings(): { shutdownGraceS: number; cacheDir: string | undefined } {
  const o = { defaultCacheDir: defaultCacheDir ?? PVC_CACHE_DIR };
  let cfg: Readonly<Config>;
  try {
    cfg = loadConfig(process.env, o);
  } catch {
    cfg = loadConfig({}, o);
  }
  return { shutdownGraceS: cfg.shutdownGraceS, cacheDir: defaultCacheDir === undefined && !process.env.MODEL_CACHE_DIR?.trim() ? undefined : cfg.cacheDir };
}

/**
 * Ends a stop that calls on the cache volume hold: one line naming them, then the signal's default action (128 + its
 * number), since process.exit() would wait for them for good.
 */
function leaveStuck(sig: NodeJS.Signals, why: string): never {
  const pending = pendingByVolume(serverVolumes({ cacheDir: stopSettings().cacheDir }));
  const what = pending.length > 0 ? pending.join('; ') : `${fsRequestsPending()} file system call(s) on the cache still unanswered`;
  fatalLine(`${why}: ${what}; exiting without waiting for them (exit ${128 + os.constants.signals[sig]})`);
  return endBySignal(sig);
}

/** The line a failed run ends with: on stderr, and in the Job container's termination message (kubectl describe pod). */
function fatalLine(line: string, more = ''): void {
  process.stderr.write(`warmup: ${line}\n${more}`);
  terminationReason(`warmup: ${line}`);
}

let signalled: NodeJS.Signals | undefined;

async function main(): Promise<number> {
  // The AWS SDK's multi-line notice about its future Node requirement would sit between the progress lines on stderr;
  // the lockfile pins the SDK.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  // What the Job leaves in the cache, the serving pods (another uid, perhaps, in the same group) must be able to write.
  applyContainerDefaults();
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    // Not process.exit(): it would wait for good for a call on a cache volume that stopped answering.
    if (signalled) endBySignal(sig);
    signalled = sig;
    process.stderr.write(`warmup: ${sig} received; stopping (the cache stays consistent and resumes next run)\n`);
    ac.abort(new RuntimeError('CANCELLED', `stopped by ${sig}`));
    // The stop saves the fill's journal and releases its lock, on the cache: a volume that stopped answering would hold
    // it (and process.exit()) for good, so it gets SHUTDOWN_GRACE_S, as the server's drain does.
    const graceS = stopSettings().shutdownGraceS;
    setTimeout(() => leaveStuck(sig, `the stop did not finish within SHUTDOWN_GRACE_S (${graceS} s)`), graceS * 1000).unref();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  const [cmd, ...rest] = process.argv.slice(2);
  // `--help` anywhere (`warmup cache prune --help`) is a question, not a mistake: the usage on stdout, exit 0.
  if (process.argv.slice(2).some((a) => a === '-h' || a === '--help') || cmd === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  // Where MODEL_CACHE_DIR is unset, its default (/mnt/cache, the PVC's mount) is looked for in the pool, with the handlers
  // above in place: a synchronous look on a volume that does not answer held the main thread, and every signal, for good.
  defaultCacheDir = await lookForDefaultCacheDir(process.env);
  if (signalled) {
    fatalLine('CANCELLED: stopped by signal');
    return 128 + os.constants.signals[signalled];
  }
  try {
    if (cmd === undefined) await countingRequests(tally, () => warm(ac.signal));
    else if (cmd === 'push') await countingRequests(tally, () => push(rest, ac.signal));
    else if (cmd === 'cache') await cache(rest, ac.signal);
    else throw new UsageError(`unknown command ${JSON.stringify(cmd)}`);
    return 0;
  } catch (e) {
    const requests = [...sent.values()].reduce((a, b) => a + b, 0);
    if (requests > 0) process.stderr.write(`warmup: ${requests} S3 request(s) sent: ${Object.entries(requestsSent()).map(([o, n]) => `${n} ${o}`).join(', ')}\n`);
    if (e instanceof UsageError) {
      fatalLine(e.message, `${USAGE}\n`);
      return 2;
    }
    if (e instanceof ConfigError) {
      fatalLine(`CONFIG: ${e.problems.join('; ')}`);
      return 2;
    }
    if (signalled) {
      fatalLine('CANCELLED: stopped by signal');
      return 128 + os.constants.signals[signalled];
    }
    const reason = isRuntimeError(e) ? `${e.code}: ${e.message}` : `INTERNAL: ${(e as Error)?.message ?? String(e)}`;
    fatalLine(reason.replace(/\s*\n\s*/g, ' '));
    return 1;
  }
}

const code = await main();
// Stopped, with calls on the cache still pending (a lock's heartbeat, say): they are waited for here, where the
// SHUTDOWN_GRACE_S timer can still end a wait for calls that never return, not in process.exit(), which would wait for
// them for good. A slow volume's are answered in time, and the stop ends as a clean one does.
if (signalled !== undefined) await fsRequestsAnswered();
process.exitCode = code;
// Sockets or timers left by a library must not keep a finished Job pod running.
setTimeout(() => process.exit(code), 2_000).unref();
