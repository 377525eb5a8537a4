/**
 * @module The parallel ranged reader: every part of every file in one queue, `concurrency` GETs in flight,
 * each streamed into a preallocated `*.partial` at its offset with backpressure (the socket pauses while the
 * disk write is pending; memory is concurrency × writeBytes whatever the model size). A watchdog aborts a
 * range that stops delivering bytes; retries back off with jitter and resume from the bytes already written.
 */
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { setMaxListeners } from 'node:events';
import type { Readable } from 'node:stream';
import { crc32 } from 'node:zlib';
import type { Logger } from '../log.js';
import { descriptorLimit, openDescriptors, S3_ADVICE, shortage, spareShortage, type Shortage } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import { direct } from '../files.js';
import { mb, mkdirs, PARTIAL } from './cache.js';
import { gaps, type Journal, type JournalFile, spanBytes } from './journal.js';
import { backoffMs, type Part, planParts, rangesInFlight } from './plan.js';
import { checkRangeAnswer, sameEtag } from './s3-compat.js';
import { expectedDigest, describeExpected, formatDigest, md5Etag, type Expected } from './checksums.js';
import { CHECKSUM_UNANSWERED, ContentMismatchError, etagNotMd5, Hasher, hashThreads, lookUpChecksum, mismatchKey, partLayout, THREAD_DESCRIPTORS, type ChecksumLookup, type ContentCheckOptions, type Hashing, type PartLayout } from './content-check.js';
import { attempts, classify, errorStatus, permanentError, throttled } from './s3-errors.js';
import { silenceTimer } from './silence.js';
import { Throttle, type ThrottleWatch } from './throttle.js';
import { sdkMightDiffer, type GetRequest, type ObjectBody, type RemoteObject } from './transport.js';

/** Low-level I/O the reader uses; replaceable for fault-injection tests. */
export interface StorageIo {
  /** Writes all of `bufs` (`len` bytes in total) at `position`. */
  write(fh: FileHandle, bufs: Buffer[], len: number, position: number): Promise<unknown>;
  /** Bytes free to an unprivileged writer on the filesystem of dir. */
  freeBytes(dir: string): Promise<number>;
  /**
   * Runs one of the fill's other calls on the cache (a journal's write and sync, a partial's open, sync, close and
   * rename, a lock's creation, looks, heartbeat and release; fetch.ts's own): a caller bounding the writes bounds
   * these with them. `ahead` (a lock's calls): not to wait behind the writes queued, lest its heartbeat go stale.
   */
  other<T>(call: () => Promise<T>, o?: { ahead?: boolean }): Promise<T>;
}

export const defaultIo: StorageIo = {
  // writev hands the socket's own chunks to one syscall: no copy into a staging buffer, few thread-pool hops.
  write: async (fh, bufs, len, position) => {
    let done = (await fh.writev(bufs, position)).bytesWritten;
    while (done < len) {
      // A short write (rare on regular files): finish the rest with plain writes.
      const rest = Buffer.concat(bufs).subarray(done);
      done += (await fh.write(rest, 0, rest.length, position + done)).bytesWritten;
    }
  },
  freeBytes: async (dir) => {
    const s = await fsp.statfs(dir);
    return s.bavail * s.bsize;
  },
  other: direct,
};

export interface DownloadOptions {
  /** Sends one GET through the fetch's transport. */
  get(r: GetRequest): Promise<ObjectBody>;
  bucket: string;
  /** Where the bucket's requests go, as errors name it (s3-errors.ts endpointName). */
  endpoint?: string;
  entry: string;
  concurrency: number;
  partSize: number;
  stallMs: number;
  maxAttempts: number;
  /** S3_THROTTLE_TIMEOUT_S in ms: how long the fill may be throttled without receiving a byte (throttle.ts). */
  throttleMs: number;
  /** Hears the fill's throttled answers (and those that are not): throttle.ts ThrottleWatch. */
  throttleWatch?: ThrottleWatch;
  /** Bytes gathered from the socket before one positional write. */
  writeBytes: number;
  journal: Journal;
  /** How often (ms) the partials and the journal are synced and the journal's lines marked durable (default 1 s). */
  syncMs?: number;
  log: Logger;
  signal: AbortSignal;
  /** Aborted when another process took the cache lock over: from then on nothing is written or recorded. */
  lost?: AbortSignal;
  io: StorageIo;
  /**
   * Called when less is free than is left to download: frees space (by eviction), resolving to the bytes freed, or
   * throws the NO_SPACE error that says what fills the cache, beginning with `head` (what is short). Without it the
   * shortfall is a plain NO_SPACE.
   */
  makeRoom?(need: number, free: number, head: string): Promise<number>;
  /** Bytes of the model on disk: kept from an earlier run (resumed spans) or just received. */
  onBytes(n: number): void;
  /** Bytes received from the store in this run (not those kept from an earlier one). */
  onReceived?(n: number): void;
  /** The file is whole, synced and renamed to its final path. */
  onFileDone(obj: RemoteObject, abs: string): void;
  /** Checks each file's content against its ETag before its rename (S3_VERIFY_CONTENT); absent: not checked. */
  check?: ContentCheckOptions;
}

/**
 * Thrown when an object's ETag differs from the listing, or when S3 says a listed object does not exist (deleted since
 * the listing, as `push --replace` does with files the new export lacks): the caller re-lists and runs another round.
 */
export class ObjectChangedError extends Error {
  /** @param missing S3's "no such key" answer, for an object that was gone rather than changed. */
  constructor(readonly key: string, readonly missing?: unknown) {
    super(`object ${key} ${missing === undefined ? 'changed' : 'was deleted'} during the download`);
    this.name = 'ObjectChangedError';
  }
}

/** The advice a NO_SPACE error ends with where nothing better is known (fetch.ts names the cache's entries instead). */
const NO_SPACE_ADVICE = 'enlarge the PVC or clear old entries';

/** A NO_SPACE error: `head` says what was short, `cause` is the volume's own refusal (ENOSPC, EDQUOT). */
function noSpace(head: string, cause?: unknown): RuntimeError {
  return new RuntimeError('NO_SPACE', `${head}; ${NO_SPACE_ADVICE}`, cause !== undefined ? { cause } : undefined);
}

/** What a NO_SPACE error of this module says was short, without its advice. */
export function noSpaceHead(e: RuntimeError): string {
  return e.message.endsWith(`; ${NO_SPACE_ADVICE}`) ? e.message.slice(0, -(NO_SPACE_ADVICE.length + 2)) : e.message;
}

/** A worker that handed its range back looks for free descriptors this many times, after 1, 2, 4, 8, 16 s. */
const REJOIN_PAUSES = 5;
const REJOIN_MS = 1_000;
/** Free descriptors a worker wants before it takes ranges again: a socket and a file, and room for others. */
const REJOIN_SPARE = 8;

const isNoSpace = (e: unknown) => ['ENOSPC', 'EDQUOT'].includes((e as NodeJS.ErrnoException)?.code ?? '');

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}

interface FileState {
  readonly obj: RemoteObject;
  readonly abs: string;
  readonly partial: string;
  readonly j: JournalFile;
  /** Ranges of this file not yet fetched. */
  left: number;
  fh?: Promise<FileHandle>;
  /** Synced and closed by finish(): its spans are durable whatever a later sync of the journal does. */
  closed?: boolean;
  /** Its content is checked (S3_VERIFY_CONTENT, and not empty). */
  checked?: boolean;
  /** Its ETag may be an MD5 of its content: not once the store said it is encrypted with KMS or a customer key. */
  etagTrusted?: boolean;
  /** A GET of it was answered in this round (which says how it is encrypted). */
  answered?: boolean;
  /** How the store said it is encrypted, where that makes its ETag no MD5. */
  encryption?: string;
  /** Its descriptor, for the hashing threads. */
  fd?: number;
  /** Plans made for it (startHashing): one superseded by a later one opens nothing. */
  plans: number;
  /** Its hashing, once started (undefined inside: not checked, the reason recorded); replaced when its plan changes. */
  hashing?: Promise<{ h: Hashing; expected: Expected } | undefined>;
  hashed?: Hashing;
  /** Its checksum, and its part sizes by part count, asked for once. */
  lookup?: Promise<ChecksumLookup>;
  readonly layouts: Map<number, Promise<PartLayout>>;
}

interface Task {
  readonly f: FileState;
  /** The byte range this task fetches (inclusive, as in Range). */
  readonly range: Part;
}

/** A range its worker hands back, unfinished, for want of a descriptor: another worker fetches the rest. */
class HandBack {
  constructor(readonly task: Task, readonly why: Shortage) {}
}

/**
 * Splits the last `concurrency` parts of the queue into `ways` slices each. Without this the download
 * ends with up to `concurrency` full-size ranges that each run at the per-connection cap while the link
 * sits half idle; with it the tail is short.
 */
export function splitTail<T extends { range: Part }>(tasks: T[], concurrency: number, ways: number, minSlice: number, make: (t: T, r: Part) => T): T[] {
  const cut = Math.max(0, tasks.length - concurrency);
  const out = tasks.slice(0, cut);
  for (const t of tasks.slice(cut)) {
    const len = t.range.end - t.range.start + 1;
    const slice = Math.max(minSlice, Math.ceil(len / ways));
    if (len < 2 * minSlice) {
      out.push(t);
      continue;
    }
    for (const p of planParts(len, slice)) out.push(make(t, { start: t.range.start + p.start, end: t.range.start + p.end }));
  }
  return out;
}

/**
 * The order the ranges are queued in. Single-range files first, smallest first: configs, tokenizer files and small
 * graphs become ready at once (tokenizer and scheduler start, small sessions too). Then the big files, largest
 * first: the largest component's session, the longest to create, starts while the smaller weights still stream,
 * and the last file to finish is the one whose session is quickest to create.
 */
export function downloadOrder<T extends { size: number; rel: string }>(objects: readonly T[], partSize: number): T[] {
  const small = objects.filter((x) => x.size <= partSize).sort((a, b) => a.size - b.size || cmp(a.rel, b.rel));
  const big = objects.filter((x) => x.size > partSize).sort((a, b) => b.size - a.size || cmp(a.rel, b.rel));
  return [...small, ...big];
}

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

export interface DownloadReport {
  /** Every response carried the listed ETag, so every byte written belongs to the listed version. */
  etagsChecked: boolean;
}

/**
 * Downloads every object into the entry, resuming what the journal records: a file whose spans cover it is only
 * finished (synced, renamed), and a partly fetched one fetches its gaps. Objects the caller reuses whole are not passed.
 */
export async function downloadAll(objects: readonly RemoteObject[], o: DownloadOptions): Promise<DownloadReport> {
  let etagsChecked = true;
  const lost = o.lost ?? new AbortController().signal;
  const byRel = new Map<string, FileState>(); // in download order
  const tasks: Task[] = [];
  for (const obj of downloadOrder(objects, o.partSize)) {
    const abs = path.join(o.entry, obj.rel);
    const partial = abs + PARTIAL;
    const prev = o.journal.get(obj.rel);
    let j: JournalFile | undefined = prev !== undefined && sameEtag(prev.etag, obj.etag) && prev.size === obj.size && !prev.complete ? prev : undefined;
    // Recorded spans count only while the partial is there with its full preallocated size.
    if (j !== undefined && j.spans.length > 0 && (await o.io.other(() => fsp.stat(partial)).catch(() => undefined))?.size !== obj.size) j = undefined;
    if (j === undefined) {
      await o.io.other(() => fsp.unlink(partial)).catch(() => undefined);
      j = o.journal.start(obj.rel, obj.etag, obj.size);
    }
    const f: FileState = { obj, abs, partial, j, left: 0, plans: 0, layouts: new Map() };
    if (o.check) {
      // An empty file has no bytes to damage, and under SSE-KMS its ETag is no MD5 either, with no GET to say so.
      if (obj.size > 0) Object.assign(f, { checked: true, etagTrusted: o.check.etagsAreMd5 !== false });
      else o.check.state.unchecked.set(obj.rel, 'empty');
    }
    byRel.set(obj.rel, f);
    for (const [s, e] of gaps(j.spans, obj.size)) {
      for (const p of planParts(e - s, o.partSize)) {
        tasks.push({ f, range: { start: s + p.start, end: s + p.end } });
        f.left++;
      }
    }
    const kept = spanBytes(j.spans);
    if (kept > 0) o.onBytes(kept);
  }

  // Each range holds a socket and a file: S3_MAX_CONCURRENCY of them must fit in the open-file limit beside the rest
  // of the process, or the first descriptor refused may be the one a module or a session needed (docs/FAULTS.md).
  const limit = descriptorLimit();
  // The content check's threads hold descriptors of their own (content-check.ts): counted as in use from the start.
  const opened = openDescriptors();
  const inUse = opened === undefined ? undefined : opened + (o.check ? hashThreads() * THREAD_DESCRIPTORS : 0);
  const concurrency = rangesInFlight(o.concurrency, limit, inUse);
  if (concurrency < Math.min(o.concurrency, tasks.length)) {
    o.log.warn({ ranges: concurrency, maxConcurrency: o.concurrency, descriptorLimit: limit, openDescriptors: inUse },
      `the open-file limit (${limit}) leaves room for ${concurrency} ranges in flight, not S3_MAX_CONCURRENCY=${o.concurrency}; ${S3_ADVICE}`);
  }
  // Throttled answers cut the ranges in flight below the workers' count; the workers queue for a place (throttle.ts).
  const throttle = new Throttle({ concurrency, timeoutMs: o.throttleMs, log: o.log, ...(o.throttleWatch ? { watch: o.throttleWatch } : {}) });
  const queue = splitTail(tasks, concurrency, 4, 1 << 20, (t, r) => {
    if (r.start !== t.range.start) t.f.left++;
    return { ...t, range: r };
  });
  const remainingBytes = queue.reduce((s, t) => s + t.range.end - t.range.start + 1, 0);
  let free = await o.io.other(() => o.io.freeBytes(o.entry));
  const short = (f: number) => `not enough space in the model cache (MODEL_CACHE_DIR): need ${mb(remainingBytes)} MB more, ${mb(f)} MB free`;
  if (free < remainingBytes && o.makeRoom) free += await o.makeRoom(remainingBytes, free, short(free));
  if (free < remainingBytes) throw noSpace(short(free));
  // Which version each file is being fetched at is durable before any of its bytes: a whole file found later under
  // its final name is then known to be that version, even after a power cut (see S3Fetch.fill).
  await o.journal.sync();

  const stop = new AbortController();
  const signal = AbortSignal.any([o.signal, stop.signal]);
  // Every range in flight (S3_MAX_CONCURRENCY of them) may wait on it at once, each removing its listener after: not a
  // leak, so no MaxListenersExceededWarning on stderr.
  setMaxListeners(0, signal);
  let failure: unknown;
  const fail = (e: unknown) => {
    failure ??= e;
    stop.abort(e);
  };

  // Spans are appended to the journal as writes return (Journal.add); every syncMs the partials written since the
  // last sync and then the journal are synced and marked durable, which also trickles dirty pages to disk during
  // the download, so the final fsync of a big file is short.
  const syncData = async (rels: ReadonlySet<string>) => {
    // One file at a time: a sync can hold a libuv thread for a while, and the writes need the others.
    for (const rel of rels) {
      const f = byRel.get(rel);
      const fh = await f?.fh?.catch(() => undefined);
      if (!f || !fh || f.closed) continue;
      try {
        await o.io.other(() => fh.datasync());
      } catch (e) {
        if (!f.closed) throw e; // closed meanwhile by finish(), which synced it first
      }
    }
  };
  let syncing = false;
  const ticker = setInterval(() => {
    if (syncing || lost.aborted) return;
    syncing = true;
    void o.journal.sync(syncData).catch(() => undefined).finally(() => (syncing = false));
  }, o.syncMs ?? 1_000);
  ticker.unref();
  const halt = () => o.journal.halt();
  lost.addEventListener('abort', halt, { once: true });

  const open = (f: FileState): Promise<FileHandle> => {
    if (f.fh === undefined) {
      const p = o.io.other(async () => {
        await mkdirs(path.dirname(f.abs));
        const fresh = f.j.spans.length === 0;
        // Readable too: the content check reads what was written back through this descriptor.
        const fh = await fsp.open(f.partial, fresh ? 'w+' : 'r+');
        try {
          // Preallocate (sparse on most filesystems) so every range can be written at its offset.
          if (fresh) await fh.truncate(f.obj.size);
        } catch (e) {
          // Not handed on, so closed here: left to the garbage collector, a close that fails too (the volume gone)
          // is thrown where nothing catches it.
          await fh.close().catch(() => undefined);
          throw e;
        }
        startCheck(f, fh.fd);
        return fh;
      });
      f.fh = p;
      // Not opened (no descriptor left): the next range of the file opens it again.
      p.catch(() => f.fh === p && (f.fh = undefined));
    }
    return f.fh;
  };

  // The content check (content-check.ts): a file's bytes are hashed as they are written, and its digest is compared
  // with its ETag's MD5 or its checksum before the rename, so a file under its final name is one whose content was
  // checked (or whose reason not to be is recorded).
  // Its threads start with the first file hashed; once closed (the download's end) it starts none.
  const hasher = o.check ? new Hasher() : undefined;
  const check = o.check;
  const unchecked = (f: FileState, why: string) => {
    check?.state.unchecked.set(f.obj.rel, why);
    f.checked = false;
    f.hashed?.drop();
  };
  /**
   * Once the store left a file's HEAD for its checksum unanswered twice, the files after it do not ask: each would hold
   * its worker (or, resumed whole, the start of the download) for two stall timeouts more.
   */
  let checksumHeadsUnanswered = false;
  /**
   * A content-check HEAD refused with throttling, or with a bare 503 (a HEAD's answer has no body to name SlowDown): it
   * waits as a throttled range would, and asks again. It holds no place among the ranges and does not cut them (round
   * -1 is never the current one). The fill's timeout bounds it as it bounds a range: throttled that long without a
   * byte received, the fill fails naming throttling, rather than spend the HEAD's second try at once and serve the
   * file unchecked as if the store had not answered.
   */
  const headThrottled = (key: string) => (e: unknown) => {
    if (!throttled(e) && errorStatus(e) !== 503) return undefined;
    const wait = throttle.throttledBy({ round: -1, release: () => undefined }, e);
    if (wait === undefined) throw throttle.gaveUp(`read s3://${o.bucket}/${key}`, e);
    return wait;
  };
  const checksumOf = (f: FileState) => (f.lookup ??= checksumHeadsUnanswered
    ? Promise.resolve(CHECKSUM_UNANSWERED)
    : lookUpChecksum(check!.head, f.obj.key, f.obj.etag, signal, o.stallMs, headThrottled(f.obj.key)).then((c) => {
      if ('unanswered' in c && !checksumHeadsUnanswered) {
        checksumHeadsUnanswered = true;
        o.log.warn({ file: f.obj.rel, stallTimeoutS: o.stallMs / 1000 },
          'the store did not answer a HEAD for an object\'s checksum (x-amz-checksum-mode), twice: the files after it that need one are not checked in this download');
      }
      return c;
    }));
  /** With KMS or a customer key, as `encryption` says, the file's ETag is no MD5: true where that is news. */
  const distrustEtag = (f: FileState, encryption: string | undefined) => {
    if (!f.etagTrusted || !etagNotMd5(encryption)) return false;
    f.etagTrusted = false;
    f.encryption = encryption;
    return true;
  };
  /**
   * What the file's content must hash to: the MD5 its ETag names, while the ETag can be one and its parts' size is
   * known; else its checksum (a composite one by the parts' size); else why it is not checked.
   */
  const planFor = async (f: FileState): Promise<{ expected: Expected; partSize: number } | { why: string }> => {
    const notMd5 = () => (f.encryption ? `encrypted (${f.encryption}): its ETag is not an MD5` : 'its ETag is not an MD5');
    const fromEtag = f.etagTrusted ? md5Etag(f.obj.etag) : undefined;
    let why = notMd5();
    // Asked once per part count: a plan started over (the store said the object is encrypted) asks no HEAD again.
    const layoutOf = (parts: number) => {
      let l = f.layouts.get(parts);
      if (l === undefined) f.layouts.set(parts, (l = partLayout(check!.head, f.obj.key, f.obj.etag, f.obj.size, parts, signal, o.stallMs, headThrottled(f.obj.key))));
      return l;
    };
    if (fromEtag !== undefined && fromEtag.parts === 0) return { expected: fromEtag, partSize: 0 };
    if (fromEtag !== undefined) {
      const l = await layoutOf(fromEtag.parts);
      distrustEtag(f, l.encryption);
      if (!f.etagTrusted) why = notMd5();
      else if ('partSize' in l) return { expected: fromEtag, partSize: l.partSize };
      else why = l.why;
    }
    const c = await checksumOf(f);
    if ('why' in c) return { why: `${why}; ${c.why}` };
    if (c.expected.parts === 0) return { expected: c.expected, partSize: 0 };
    const l = await layoutOf(c.expected.parts);
    return 'partSize' in l ? { expected: c.expected, partSize: l.partSize } : { why: `${why}; its checksum is of parts, and ${l.why}` };
  };
  /** Starts (or starts over) the file's hashing by its plan; a plan superseded meanwhile opens nothing. */
  const startHashing = (f: FileState) => {
    f.hashed?.drop();
    f.hashed = undefined;
    const gen = ++f.plans;
    f.hashing = (async () => {
      const plan = await planFor(f);
      if (gen !== f.plans || !f.checked) return undefined;
      if ('why' in plan) {
        unchecked(f, plan.why);
        return undefined;
      }
      const h = hasher!.open(f.fd!, f.obj.size, { alg: plan.expected.alg, partSize: plan.partSize }, () => o.journal.get(f.obj.rel)?.spans ?? []);
      f.hashed = h;
      return { h, expected: plan.expected };
    })();
    // Seen by checkContent; a rejection here is an abort, which the download meets on its own, or a HEAD throttled past
    // S3_THROTTLE_TIMEOUT_S (headThrottled), which checkContent fails the file with.
    f.hashing.catch(() => undefined);
  };
  const startCheck = (f: FileState, fd: number) => {
    if (!check || !f.checked || f.hashing) return;
    f.fd = fd;
    startHashing(f);
  };
  /** The store's answer says how the object is encrypted: with KMS or a customer key its ETag is no MD5, and the plan changes. */
  const learnEncryption = (f: FileState, encryption: string | undefined) => {
    f.answered = true;
    if (f.checked && distrustEtag(f, encryption) && f.hashing) startHashing(f);
  };
  /**
   * Throws ContentMismatchError (the caller fetches the file again) where the content is not what the store says, and
   * STORAGE_CORRUPT where it was not the last time either.
   */
  const checkContent = async (f: FileState): Promise<void> => {
    if (!check || !f.checked) return;
    let r: Awaited<NonNullable<FileState['hashing']>>;
    for (let p = f.hashing; ; p = f.hashing) {
      r = await p;
      if (p === f.hashing) break;
    }
    // The download is stopping: the file stays a partial, checked by the run that resumes it.
    signal.throwIfAborted();
    // Not hashed: unchecked() recorded why.
    if (r === undefined || !f.checked) return;
    let raw: Buffer;
    try {
      raw = await r.h.digest();
    } catch (e) {
      o.log.warn({ file: f.obj.rel, reason: (e as Error).message }, 'could not hash the file; its content is not checked');
      return unchecked(f, 'hashing failed');
    }
    const e = r.expected;
    const got = formatDigest(e, raw);
    const want = expectedDigest(e);
    // A file resumed whole was not fetched in this round: no answer said whether it is encrypted, which makes its ETag
    // no MD5. Its checksum's HEAD says; where it is encrypted, it is checked by its checksum instead.
    if (got !== want && e.source === 'ETag' && !f.answered && f.etagTrusted) {
      const c = await checksumOf(f);
      if (etagNotMd5(c.encryption)) {
        learnEncryption(f, c.encryption);
        return checkContent(f);
      }
    }
    const key = mismatchKey(f.obj.rel, f.obj.etag, e);
    const before = check.state.mismatched.get(key);
    if (got === want) {
      // The earlier download that differed was damaged on its way: counted now that this one shows it.
      if (before !== undefined) check.onDamaged?.(f.obj.rel);
      check.state.checked.add(f.obj.rel);
      return;
    }
    // Of parts, the same digest twice: the parts are most likely not of the sizes the HEADs implied (S3 allows uneven
    // inner parts), rather than the store holding other content than it was sent.
    if (before === got && e.parts > 0) {
      o.log.warn({ file: f.obj.rel, against: e.source, expected: describeExpected(e), got: describeExpected(e, got) },
        `two downloads of this file agree with each other but not with its multipart ${e.source}: its parts are likely not all of one size; serving it unchecked`);
      return unchecked(f, 'its parts are not all of one size');
    }
    if (before !== undefined && before !== got) {
      check.onDamaged?.(f.obj.rel);
      check.onDamaged?.(f.obj.rel);
    }
    if (before !== undefined) {
      const where = `s3://${o.bucket}/${f.obj.key}`;
      const what = `the object's ${e.source} (${describeExpected(e)})`;
      throw new RuntimeError('STORAGE_CORRUPT', before === got
        ? `${where}: two downloads agree with each other but not with ${what}: the store holds content its ${e.source} does not describe (damaged at rest` +
          `${e.source === 'ETag' ? ', or a store whose ETags are not MD5s of the content' : ''}); check the object, or set S3_VERIFY_CONTENT=0 to serve it unchecked`
        : `${where}: the content differed from ${what} in two downloads, and differently each time: ` +
          'something between S3 and this pod damages data (a proxy, the network, the cache volume)');
    }
    check.state.mismatched.set(key, got);
    // Dropped here, not only by the caller: another file of this round may fail it first, and this one must still
    // be fetched again rather than resumed whole.
    o.journal.drop(f.obj.rel);
    throw new ContentMismatchError(f.obj.key, f.obj.rel, e, got);
  };

  const finish = async (f: FileState) => {
    const fh = await open(f);
    const st = await o.io.other(() => fh.stat());
    if (st.size !== f.obj.size) throw new RuntimeError('STORAGE_TRANSIENT', `s3://${o.bucket}/${f.obj.key}: wrote ${st.size} bytes, expected ${f.obj.size}`);
    await checkContent(f);
    await o.io.other(() => fh.sync());
    f.closed = true;
    // A written file's close flushes it (NFS, FUSE): it waits on the volume too.
    await o.io.other(() => fh.close());
    await o.io.other(() => fsp.rename(f.partial, f.abs));
    o.journal.complete(f.obj.rel, f.obj.etag, f.obj.size);
    o.onFileDone(f.obj, f.abs);
  };

  let next = 0;
  /** Ranges handed back for want of a descriptor, fetched before the queue's next. */
  const handedBack: Task[] = [];
  /** Workers taking ranges: one that runs out of descriptors stops while others run, so the limit sets how many. */
  let running = 0;
  let shrunk = false;
  const drained = new AbortController();
  let rejoined = false;
  /**
   * After handing a range back: a shortage often passes (connections close, another thread's files), so the worker
   * looks again after a pause (its `pause`-th, doubled each time) and takes ranges again if descriptors are free and
   * work is left; one spike does not leave a long download on a range or two.
   */
  const rejoin = async (pause: number): Promise<boolean> => {
    if (pause >= REJOIN_PAUSES) return false;
    await sleep(REJOIN_MS * 2 ** pause, AbortSignal.any([signal, drained.signal]));
    return !signal.aborted && (handedBack.length > 0 || next < queue.length) && spareShortage(REJOIN_SPARE) === undefined;
  };
  const worker = async () => {
    running++;
    let handedOver = false;
    let pauses = 0;
    try {
      while (!signal.aborted) {
        const t = handedBack.pop() ?? queue[next++];
        if (t === undefined) {
          // Nothing left to take: a worker pausing for descriptors has nothing to come back for.
          drained.abort();
          return;
        }
        try {
          await fetchPart(t);
          if (--t.f.left === 0) await finish(t.f);
        } catch (e) {
          if (e instanceof HandBack) {
            handedBack.push(e.task);
            if (!shrunk) {
              shrunk = true;
              o.log.warn({ reason: e.why, ranges: running, descriptorLimit: descriptorLimit() ?? null },
                `out of file descriptors (${e.why}): fewer ranges in flight until descriptors are free again; ${S3_ADVICE}`);
            }
            if (!(await rejoin(pauses++))) {
              handedOver = true;
              return;
            }
            running++;
            if (!rejoined) o.log.info({ ranges: running }, 'file descriptors free again: taking more ranges in flight');
            else if (running === concurrency) o.log.info({ ranges: running }, `all ${concurrency} ranges in flight again`);
            rejoined = true;
            continue;
          }
          fail(isNoSpace(e) ? noSpace(`no space left in the model cache (MODEL_CACHE_DIR) for ${t.f.obj.rel}`, e) : e);
        }
      }
    } finally {
      if (!handedOver) running--;
    }
  };

  const fetchPart = async ({ f, range }: Task) => {
    let fh: FileHandle | undefined;
    const size = range.end - range.start + 1;
    const whole = range.start === 0 && range.end === f.obj.size - 1;
    let written = 0;
    let failures = 0;
    for (;;) {
      signal.throwIfAborted();
      // Taken before the watchdog starts: a range waiting for a place is not stalled.
      const slot = await throttle.enter(signal);
      const left = size - written;
      const ac = new AbortController();
      const reqSignal = AbortSignal.any([signal, ac.signal]);
      // The watchdog covers the wait for headers too: a range that yields nothing for stallMs is abandoned. Not while
      // its own write is pending: the socket is paused then (the loop does not pull), and a slow cache volume is not
      // S3's silence (its range was given up and read again, each try as slow).
      let writing = false;
      const watchdog = silenceTimer(o.stallMs, () => {
        if (writing) watchdog.beat();
        else ac.abort(new RuntimeError('STORAGE_STALL', `no bytes received for ${o.stallMs} ms`));
      });
      let body: Readable | undefined;
      let progressed = false;
      // Chunks are kept (not copied) until about writeBytes have arrived, then written with one writev.
      // While that write is pending the loop does not pull, so the socket pauses: backpressure, bounded memory.
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      /** False once the answer is known not to be this range's next bytes: its pending chunks are never written. */
      let trusted = false;
      const flush = async () => {
        const bufs = pending;
        const n = pendingBytes;
        const at = range.start + written;
        pending = [];
        pendingBytes = 0;
        // Recorded before the write begins, so that a kill before its end does not lose it (Journal.open reads it back).
        // Waiting for the line's write: a data write that overtook it was lost to a kill (docs/FAULTS.md).
        writing = true;
        try {
          await o.journal.intend(f.obj.rel, at, at + n, bufs.reduce((c, b) => crc32(b, c), 0));
          await o.io.write(fh!, bufs, n, at);
        } finally {
          writing = false;
          watchdog.beat();
        }
        written += n;
        o.journal.add(f.obj.rel, at, at + n);
        f.hashed?.written(at, at + n);
        o.onBytes(n);
        o.onReceived?.(n);
        progressed = true;
        throttle.progressed();
      };
      try {
        fh ??= await open(f);
        const asked = whole && written === 0 ? undefined : { start: range.start + written, end: range.end };
        const res = await o.get({
          key: f.obj.key,
          ...(asked === undefined ? {} : { range: `bytes=${asked.start}-${asked.end}` }),
          ...(f.obj.etag ? { ifMatch: f.obj.etag } : {}),
          signal: reqSignal,
        });
        body = res.body;
        // The answer's head is bytes received too (it may have come while this process was held: silence.ts).
        watchdog.beat();
        throttle.answered(slot);
        // Stores that ignore If-Match still send the ETag: compare it ourselves.
        if (f.obj.etag && res.etag && !sameEtag(res.etag, f.obj.etag)) throw new ObjectChangedError(f.obj.key);
        if (checkRangeAnswer(res, asked, f.obj.size, `s3://${o.bucket}/${f.obj.key}`) === 'changed') throw new ObjectChangedError(f.obj.key);
        if (!f.obj.etag || !res.etag) etagsChecked = false;
        learnEncryption(f, res.encryption);
        if (res.contentLength !== undefined && res.contentLength !== left) {
          throw new RuntimeError('STORAGE_SHORT_READ', `${left} bytes asked for, Content-Length ${res.contentLength}`);
        }
        trusted = true;
        for await (const chunk of body as AsyncIterable<Buffer>) {
          watchdog.beat();
          pending.push(chunk);
          pendingBytes += chunk.length;
          if (written + pendingBytes > size) {
            trusted = false;
            throw new RuntimeError('STORAGE_SHORT_READ', `more bytes sent than the ${left} asked for`);
          }
          if (pendingBytes >= o.writeBytes) await flush();
        }
        if (pendingBytes > 0) await flush();
        if (written !== size) throw new RuntimeError('STORAGE_SHORT_READ', `the answer ended after ${written - (size - left)} of ${left} bytes asked for`);
        return;
      } catch (e) {
        // What arrived before a reset, a stall or a stop is this range's next bytes: write it rather than fetch it again.
        if (trusted && pendingBytes > 0 && !lost.aborted && !isNoSpace(e)) await flush().catch(() => undefined);
        // Not opened (its folder could not be made): the worker names the file.
        if (isNoSpace(e)) throw fh === undefined ? e : noSpace(`no space left in the model cache (MODEL_CACHE_DIR) while writing ${f.obj.rel}`, e);
        // The partial file refused for another reason (EACCES, EISDIR, EIO): the volume's to fix, not S3's to retry.
        if (fh === undefined && !shortage(e)) throw e;
        // A stall or a short read is this range's to retry; any other RuntimeError already says what went wrong.
        if (e instanceof ObjectChangedError || (e instanceof RuntimeError && e.code !== 'STORAGE_STALL' && e.code !== 'STORAGE_SHORT_READ')) throw e;
        if (signal.aborted) throw signal.reason;
        // No descriptor for the socket or the file: while other ranges run, the rest of this one goes to them and its
        // worker stops; the last one retries it as it would a reset.
        // Counted out here, at once: two ranges failing together must not both leave the last one's work to nobody.
        const short = shortage(e);
        if (short && running > 1) {
          running--;
          throw new HandBack({ f, range: { start: range.start + written, end: range.end } }, short);
        }
        // Not retried here: the fetch starts over through the SDK (fetch.ts).
        if (sdkMightDiffer(e)) throw e;
        const stalled = ac.signal.aborted;
        const kind = stalled ? 'transient' : classify(e);
        if (kind === 'changed') throw new ObjectChangedError(f.obj.key);
        if (kind === 'missing') throw new ObjectChangedError(f.obj.key, e);
        if (kind !== 'transient') throw permanentError(e, o.bucket, f.obj.key, 'read', o.endpoint);
        // Throttled: no attempt counted; the fill slows down, and gives up only once throttled for throttleMs without a byte.
        if (!stalled && throttled(e)) {
          const wait = throttle.throttledBy(slot, e);
          if (wait === undefined) throw throttle.gaveUp(`read s3://${o.bucket}/${f.obj.key}`, e);
          watchdog.clear();
          await sleep(wait, signal);
          continue;
        }
        if (errorStatus(e) !== undefined) throttle.answered(slot);
        // An attempt that moved bytes forward does not count against the limit: a slow, flaky link still finishes.
        failures = progressed ? 1 : failures + 1;
        if (failures >= o.maxAttempts) {
          // A stall's error is the transport's AbortError, which permanentError would call a missing object.
          if (stalled) {
            throw new RuntimeError('STORAGE_STALL', `cannot read (${attempts(failures)}) s3://${o.bucket}/${f.obj.key}: no bytes received for ${o.stallMs / 1000} s `
              + '(S3_STALL_TIMEOUT_S); gave up after retries', { cause: e });
          }
          // permanentError would name only the code: which lengths disagreed is what points at a proxy.
          if (e instanceof RuntimeError && e.code === 'STORAGE_SHORT_READ') {
            throw new RuntimeError('STORAGE_TRANSIENT', `cannot read (${attempts(failures)}) s3://${o.bucket}/${f.obj.key}: its answers were not of the length asked for `
              + `(the last: ${e.message}); something between S3 and this pod (a proxy) cuts or rewrites them (gave up after retries)`, { cause: e });
          }
          throw permanentError(e, o.bucket, f.obj.key, `read (${attempts(failures)})`, o.endpoint);
        }
        const wait = backoffMs(failures - 1);
        o.log.warn({ key: f.obj.key, range: `${range.start + written}-${range.end}`, attempt: failures, waitMs: wait, reason: stalled ? 'stalled' : errName(e) }, 'range failed; resuming');
        await sleep(wait, signal);
      } finally {
        slot.release();
        watchdog.clear();
        // Every response body is consumed or destroyed, or its socket never returns to the pool.
        if (body && !body.readableEnded) body.destroy();
      }
    }
  };

  /** The first file an earlier run left whole whose content differed: thrown once the round has fetched the rest. */
  let resumedMismatch: ContentMismatchError | undefined;
  try {
    // Zero-byte files, and files whose every byte the journal records (a kill came before their rename). One that
    // differs (dropped from the journal) does not end the round: the next fetches every such file at once, rather
    // than one a round until the rounds run out.
    for (const f of byRel.values()) {
      if (f.left > 0) continue;
      try {
        await finish(f);
      } catch (e) {
        if (!(e instanceof ContentMismatchError)) throw e;
        resumedMismatch ??= e;
        // Its descriptor is not held while the round goes on: the file is fetched again whole.
        f.hashed?.drop();
        f.closed = true;
        const fh = await f.fh;
        if (fh) await o.io.other(() => fh.close()).catch(() => undefined);
      }
    }
    await Promise.all(Array.from({ length: Math.min(concurrency, queue.length) }, worker));
    // A range handed back just as the last other worker found nothing left to take: fetched here, by one worker.
    while (handedBack.length > 0 && !signal.aborted) await worker();
  } finally {
    clearInterval(ticker);
    lost.removeEventListener('abort', halt);
    if (!lost.aborted) await o.journal.sync(syncData).catch(() => undefined);
    // The hashing threads read through the files' descriptors: they stop before those close.
    await hasher?.close();
    await Promise.all([...byRel.values()].map(async (f) => {
      if (f.closed) return;
      const fh = await f.fh?.catch(() => undefined);
      if (fh) await o.io.other(() => fh.close()).catch(() => undefined);
    }));
  }
  if (failure !== undefined) throw failure;
  o.signal.throwIfAborted();
  if (resumedMismatch !== undefined) throw resumedMismatch;
  return { etagsChecked };
}

const errName = (e: unknown) => {
  const x = e as { name?: string; code?: string };
  return x?.code ?? x?.name ?? 'error';
};
