/**
 * @module The parallel ranged reader: every part of every file in one queue, `concurrency` GETs in flight,
 * each streamed into a preallocated `*.partial` at its offset with backpressure (the socket pauses while the
 * disk write is pending; memory is concurrency × writeBytes whatever the model size). A watchdog aborts a
 * range that stops delivering bytes; retries back off with jitter and resume from the bytes already written.
 */
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import type { Logger } from '../log.js';
import { RuntimeError } from '../errors.js';
import { type Journal, type JournalFile, PARTIAL, saveJournal } from './cache.js';
import { backoffMs, type Part, planParts } from './plan.js';
import { classify, permanentError, type RemoteObject } from './s3-errors.js';
import type { GetRequest, ObjectBody } from './s3-lite.js';

/** Low-level I/O the reader uses; replaceable for fault-injection tests. */
export interface StorageIo {
  /** Writes all of `bufs` (`len` bytes in total) at `position`. */
  write(fh: FileHandle, bufs: Buffer[], len: number, position: number): Promise<unknown>;
  /** Bytes free to an unprivileged writer on the filesystem of dir. */
  freeBytes(dir: string): Promise<number>;
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
};

export interface DownloadOptions {
  /** Sends one GET (s3-lite or the SDK: see S3Fetch.fill in index.ts). */
  get(r: GetRequest): Promise<ObjectBody>;
  bucket: string;
  entry: string;
  concurrency: number;
  partSize: number;
  stallMs: number;
  maxAttempts: number;
  /** Bytes gathered from the socket before one positional write. */
  writeBytes: number;
  journal: Journal;
  log: Logger;
  signal: AbortSignal;
  io: StorageIo;
  onBytes(n: number): void;
  /** The file is whole, synced and renamed to its final path. */
  onFileDone(obj: RemoteObject, abs: string): void;
}

/** Thrown when an object's ETag differs from the listing: the caller re-lists and runs another round. */
export class ObjectChangedError extends Error {
  constructor(readonly key: string) {
    super(`object ${key} changed during the download`);
    this.name = 'ObjectChangedError';
  }
}

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
  readonly parts: Part[];
  readonly j: JournalFile;
  remaining: number;
  fh?: Promise<FileHandle>;
}

interface Task {
  readonly f: FileState;
  /** The planned part this task belongs to (the journal's unit). */
  readonly idx: number;
  /** The byte range this task fetches: the whole part, or a slice of it at the tail of the queue. */
  readonly range: Part;
  /** Tasks of the same part still unfinished; shared by the slices of one part. */
  readonly left: { n: number };
}

/**
 * Splits the last `concurrency` parts of the queue into `ways` slices each. Without this the download
 * ends with up to `concurrency` full-size ranges that each run at the per-connection cap while the link
 * sits half idle; with it the tail is short. Slices of a part count as one part for the journal.
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

/** Downloads every object into the entry. Objects whose journal says complete are skipped by the caller. */
export interface DownloadReport {
  /** Every response carried the listed ETag, so every byte written belongs to the listed version. */
  etagsChecked: boolean;
}

export async function downloadAll(objects: readonly RemoteObject[], o: DownloadOptions): Promise<DownloadReport> {
  let etagsChecked = true;
  const files: FileState[] = [];
  const tasks: Task[] = [];
  for (const obj of downloadOrder(objects, o.partSize)) {
    const prev = o.journal.files[obj.rel];
    const resumable = prev !== undefined && prev.etag === obj.etag && prev.size === obj.size && prev.partSize === o.partSize && !prev.complete;
    const j: JournalFile = resumable ? prev : { etag: obj.etag, size: obj.size, partSize: o.partSize, done: [], complete: false };
    o.journal.files[obj.rel] = j;
    const parts = planParts(obj.size, o.partSize);
    const done = new Set(j.done.filter((i) => i >= 0 && i < parts.length));
    const abs = path.join(o.entry, obj.rel);
    const f: FileState = { obj, abs, partial: abs + PARTIAL, parts, j, remaining: parts.length - done.size };
    files.push(f);
    if (resumable) {
      // The journal only counts if the partial file is still there with its full preallocated size.
      const st = await fsp.stat(f.partial).catch(() => undefined);
      if (st?.size !== obj.size) {
        j.done = [];
        done.clear();
        f.remaining = parts.length;
      }
    } else {
      await fsp.unlink(f.partial).catch(() => undefined);
    }
    for (let i = 0; i < parts.length; i++) if (!done.has(i)) tasks.push({ f, idx: i, range: parts[i]!, left: { n: 1 } });
    for (const i of done) {
      const p = parts[i]!;
      o.onBytes(p.end - p.start + 1);
    }
  }

  const queue = splitTail(tasks, o.concurrency, 4, 1 << 20, (t, r) => {
    if (r.start !== t.range.start) t.left.n++;
    return { ...t, range: r };
  });
  const remainingBytes = queue.reduce((s, t) => s + t.range.end - t.range.start + 1, 0);
  const free = await o.io.freeBytes(o.entry);
  if (free < remainingBytes) {
    throw new RuntimeError('NO_SPACE', `not enough space in the model cache ${path.dirname(o.entry)}: need ${mb(remainingBytes)} MB more, ${mb(free)} MB free; enlarge the PVC or clear old entries`);
  }

  const stop = new AbortController();
  const signal = AbortSignal.any([o.signal, stop.signal]);
  let failure: unknown;
  const fail = (e: unknown) => {
    failure ??= e;
    stop.abort(e);
  };

  let dirty = false;
  const openFiles = new Set<FileState>();
  let journalChain = Promise.resolve();
  // Data first, then the journal that claims it: a part is never recorded before its bytes are synced.
  const flushJournal = () => (journalChain = journalChain.then(async () => {
    if (!dirty) return;
    dirty = false;
    // Snapshot first: a part that completes while we sync is left for the next flush.
    const snapshot = JSON.parse(JSON.stringify(o.journal)) as Journal;
    // One file at a time: a sync can hold a libuv thread for a while, and the writes need the others.
    for (const f of [...openFiles]) await (await f.fh?.catch(() => undefined))?.datasync().catch(() => undefined);
    await saveJournal(o.entry, snapshot).catch((e) => o.log.warn({ err: String(e) }, 'could not save the download journal'));
  }));
  // Also trickles dirty pages to disk during the download, so the final fsync of a big file is short.
  const ticker = setInterval(() => void flushJournal(), 500);
  ticker.unref();

  const open = (f: FileState): Promise<FileHandle> => {
    f.fh ??= (async () => {
      await fsp.mkdir(path.dirname(f.abs), { recursive: true });
      const fresh = f.j.done.length === 0;
      const fh = await fsp.open(f.partial, fresh ? 'w' : 'r+');
      openFiles.add(f);
      // Preallocate (sparse on most filesystems) so every range can be written at its offset.
      if (fresh) await fh.truncate(f.obj.size);
      return fh;
    })();
    return f.fh;
  };

  const finish = async (f: FileState) => {
    const fh = await open(f);
    const st = await fh.stat();
    if (st.size !== f.obj.size) throw new RuntimeError('STORAGE_TRANSIENT', `s3://${o.bucket}/${f.obj.key}: wrote ${st.size} bytes, expected ${f.obj.size}`);
    await fh.sync();
    await fh.close();
    openFiles.delete(f);
    await fsp.rename(f.partial, f.abs);
    f.j.complete = true;
    f.j.done = [];
    dirty = true;
    // Record the whole file at once: after a kill it is reused instead of fetched again.
    void flushJournal();
    o.onFileDone(f.obj, f.abs);
  };

  let next = 0;
  const worker = async () => {
    while (!signal.aborted && next < queue.length) {
      const t = queue[next++]!;
      try {
        await fetchPart(t);
        if (--t.left.n > 0) continue;
        t.f.j.done.push(t.idx);
        dirty = true;
        if (--t.f.remaining === 0) await finish(t.f);
      } catch (e) {
        fail(isNoSpace(e) ? new RuntimeError('NO_SPACE', `no space left in the model cache ${path.dirname(o.entry)} for ${t.f.obj.rel}; enlarge the PVC or clear old entries`, { cause: e }) : e);
      }
    }
  };

  const fetchPart = async ({ f, range }: Task) => {
    const part = range;
    const fh = await open(f);
    const whole = part.start === 0 && part.end === f.obj.size - 1;
    let written = 0;
    let failures = 0;
    for (;;) {
      signal.throwIfAborted();
      const len = part.end - part.start + 1 - written;
      const ac = new AbortController();
      const reqSignal = AbortSignal.any([signal, ac.signal]);
      // The watchdog covers the wait for headers too: a range that yields nothing for stallMs is abandoned.
      const watchdog = setTimeout(() => ac.abort(Object.assign(new Error('no bytes received'), { code: 'STALL' })), o.stallMs);
      let body: Readable | undefined;
      let progressed = false;
      try {
        const res = await o.get({
          key: f.obj.key,
          ...(whole && written === 0 ? {} : { range: `bytes=${part.start + written}-${part.end}` }),
          ...(f.obj.etag ? { ifMatch: f.obj.etag } : {}),
          signal: reqSignal,
        });
        body = res.body;
        // Stores that ignore If-Match still send the ETag: compare it ourselves.
        if (f.obj.etag && res.etag && res.etag !== f.obj.etag) throw new ObjectChangedError(f.obj.key);
        if (!f.obj.etag || !res.etag) etagsChecked = false;
        if (res.contentLength !== undefined && res.contentLength !== len) {
          throw Object.assign(new Error(`expected ${len} bytes, server announced ${res.contentLength}`), { code: 'SHORT_READ' });
        }
        // Chunks are kept (not copied) until about writeBytes have arrived, then written with one writev.
        // While that write is pending the loop does not pull, so the socket pauses: backpressure, bounded memory.
        let pending: Buffer[] = [];
        let pendingBytes = 0;
        const flush = async () => {
          await o.io.write(fh, pending, pendingBytes, part.start + written);
          written += pendingBytes;
          o.onBytes(pendingBytes);
          progressed = true;
          pending = [];
          pendingBytes = 0;
        };
        for await (const chunk of body as AsyncIterable<Buffer>) {
          watchdog.refresh();
          pending.push(chunk);
          pendingBytes += chunk.length;
          if (pendingBytes > len - written) throw Object.assign(new Error('server sent more bytes than the range holds'), { code: 'SHORT_READ' });
          if (pendingBytes >= o.writeBytes) await flush();
        }
        if (pendingBytes > 0) await flush();
        if (written !== part.end - part.start + 1) {
          throw Object.assign(new Error(`range ended after ${written} of ${part.end - part.start + 1} bytes`), { code: 'SHORT_READ' });
        }
        return;
      } catch (e) {
        if (isNoSpace(e)) throw new RuntimeError('NO_SPACE', `no space left in the model cache ${path.dirname(o.entry)} while writing ${f.obj.rel}; enlarge the PVC or clear old entries`, { cause: e });
        if (e instanceof ObjectChangedError || e instanceof RuntimeError) throw e;
        if (signal.aborted) throw signal.reason;
        const stalled = ac.signal.aborted;
        const kind = stalled ? 'transient' : classify(e);
        if (kind === 'changed') throw new ObjectChangedError(f.obj.key);
        if (kind !== 'transient') throw permanentError(e, o.bucket, f.obj.key, 'read');
        // An attempt that moved bytes forward does not count against the limit: a slow, flaky link still finishes.
        failures = progressed ? 1 : failures + 1;
        if (failures >= o.maxAttempts) throw permanentError(e, o.bucket, f.obj.key, `read (${failures} attempts)`);
        const wait = backoffMs(failures - 1);
        o.log.warn({ key: f.obj.key, range: `${part.start + written}-${part.end}`, attempt: failures, waitMs: wait, reason: stalled ? 'stalled' : errName(e) }, 'range failed; resuming');
        await sleep(wait, signal);
      } finally {
        clearTimeout(watchdog);
        // Every response body is consumed or destroyed, or its socket never returns to the pool.
        if (body && !body.readableEnded) body.destroy();
      }
    }
  };

  try {
    // Zero-byte files have no ranges.
    for (const f of files) if (f.parts.length === 0) {
      await open(f);
      await finish(f);
    }
    await Promise.all(Array.from({ length: Math.min(o.concurrency, queue.length) }, worker));
  } finally {
    clearInterval(ticker);
    dirty = true;
    await flushJournal();
    await Promise.all([...openFiles].map(async (f) => (await f.fh?.catch(() => undefined))?.close().catch(() => undefined)));
  }
  if (failure !== undefined) throw failure;
  o.signal.throwIfAborted();
  return { etagsChecked };
}

const mb = (n: number) => (n / 1e6).toFixed(1);
const errName = (e: unknown) => {
  const x = e as { name?: string; code?: string };
  return x?.code ?? x?.name ?? 'error';
};
