/**
 * @module The download journal of a cache entry: which byte ranges of which `*.partial` are on disk, and which files
 * are whole. An append-only log of JSON lines:
 *
 *   {"v":2,"boot":"…"}                                     header: the boot of the kernel that wrote what follows
 *   {"f":"unet/model.onnx_data","etag":"…","size":N}       a file's download starts (forgets what came before)
 *   {"f":"unet/model.onnx_data","try":[0,262144],"crc":C}  a write of these bytes, CRC-32 C, is about to start
 *   {"f":"unet/model.onnx_data","add":[[0,262144]]}        bytes [start, end) of the .partial were written
 *   {"f":"unet/model.onnx_data","complete":true}           the file is whole and renamed to its final name
 *   {"f":"unet/model.onnx_data","drop":true}               forget the file
 *   {"sync":4711}                                          every line before byte 4711 of the log is durable
 *
 * Lines are written in order, in batches (one write at a time, taking every line appended meanwhile: a line waits
 * behind about one data write per range in flight), without waiting for a sync. Ordering makes that safe. A data
 * write begins once its `try` line is written (`intend` resolves then). An `add`
 * is appended after the write it records returned, so any reader on the same running kernel (the page cache) sees
 * both. `sync` fdatasyncs the partials and then the log before a marker vouches for the lines before it, so after a
 * power cut (another boot) only vouched lines count, and they never claim bytes that did not reach the disk. A kill
 * between a write and its `add` leaves a `try`: on the same boot the bytes are read back and kept if their CRC-32
 * matches, so a kill -9 loses only a write it cut in the middle.
 * Replay stops at a torn line. Opening the journal syncs the partials of its unvouched lines (when this boot wrote
 * them), then rewrites it compacted and vouched.
 */
import { promises as fsp, readFileSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { direct, type Bound } from '../files.js';
import { fsyncDir, JOURNAL, PARTIAL } from './cache.js';
import { trackIo } from './pending-io.js';

/** [start, end): bytes of a file, end exclusive. */
export type Span = [number, number];

export interface JournalFile {
  readonly etag: string;
  readonly size: number;
  /** Sorted, merged, non-empty spans of the `.partial` that are on disk. */
  spans: Span[];
  /** The file is whole and was renamed to its final name. */
  complete: boolean;
}

type FileLine =
  | { f: string; etag: string; size: number }
  | { f: string; try: Span; crc: number }
  | { f: string; add: Span[] }
  | { f: string; complete: true }
  | { f: string; drop: true };

/** The running kernel's boot (Linux); '' where unknown, and then unvouched lines are never trusted. */
export function currentBoot(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
}

/** Adds [s, e) to sorted, merged spans (touching spans merge). */
export function addSpan(spans: Span[], s: number, e: number): Span[] {
  if (e <= s) return spans;
  const out: Span[] = [];
  let cur: Span = [s, e];
  let placed = false;
  for (const sp of spans) {
    if (sp[1] < cur[0]) out.push(sp);
    else if (sp[0] > cur[1]) {
      if (!placed) {
        out.push(cur);
        placed = true;
      }
      out.push(sp);
    } else cur = [Math.min(sp[0], cur[0]), Math.max(sp[1], cur[1])];
  }
  if (!placed) out.push(cur);
  return out;
}

/** The parts of [0, size) that `spans` do not cover, in order. */
export function gaps(spans: readonly Span[], size: number): Span[] {
  const out: Span[] = [];
  let at = 0;
  for (const [s, e] of spans) {
    if (s > at) out.push([at, Math.min(s, size)]);
    at = Math.max(at, e);
  }
  if (at < size) out.push([at, size]);
  return out.filter(([s, e]) => e > s);
}

export const spanBytes = (spans: readonly Span[]) => spans.reduce((n, [s, e]) => n + e - s, 0);

const validSpan = (x: unknown, size: number): x is Span =>
  Array.isArray(x) && x.length === 2 && Number.isSafeInteger(x[0]) && Number.isSafeInteger(x[1]) && x[0] >= 0 && x[0] < x[1] && x[1] <= size;

/** A write that began and whose end was not recorded: a file, a span, the CRC-32 of the bytes it was writing. */
interface Try {
  f: string;
  span: Span;
  crc: number;
}

/** Applies one line to the state; a line that does not fit (unknown file, bad span) is ignored. */
function apply(files: Map<string, JournalFile>, l: FileLine): void {
  if ('try' in l) return;
  if ('etag' in l) {
    if (typeof l.etag === 'string' && Number.isSafeInteger(l.size) && l.size >= 0) files.set(l.f, { etag: l.etag, size: l.size, spans: [], complete: false });
    return;
  }
  if ('drop' in l) {
    files.delete(l.f);
    return;
  }
  const j = files.get(l.f);
  if (!j) return;
  if ('complete' in l) j.complete = true;
  else if (Array.isArray(l.add)) for (const sp of l.add) if (validSpan(sp, j.size)) j.spans = addSpan(j.spans, sp[0], sp[1]);
}

interface Replayed {
  files: Map<string, JournalFile>;
  /** Files named by lines no marker vouches for (trusted because this boot wrote them): their partials need a sync. */
  unvouched: Set<string>;
  /** Writes of this boot that began and were not recorded as done (their bytes may be on disk: see Journal.open). */
  tries: Try[];
}

/**
 * Replays a log: every line a marker vouches for, and the lines after the last marker too when the log was written
 * by the running boot (`boot`). Stops at the first line that does not parse (a torn tail).
 */
function replayLog(text: string, boot: string): Replayed {
  const files = new Map<string, JournalFile>();
  const unvouched = new Set<string>();
  const open = new Map<string, Try>();
  const lines: Array<{ l: FileLine; end: number }> = [];
  let vouched = 0;
  let writer: string | undefined;
  const total = Buffer.byteLength(text);
  let at = 0;
  for (const raw of text.split('\n')) {
    const start = at;
    at += Buffer.byteLength(raw) + 1;
    if (at > total) break; // no newline yet: a line cut by a kill
    let l: unknown;
    try {
      l = JSON.parse(raw);
    } catch {
      break;
    }
    if (typeof l !== 'object' || l === null) break;
    const x = l as Record<string, unknown>;
    if (start === 0) {
      if (x.v !== 2) return { files, unvouched, tries: [] };
      writer = typeof x.boot === 'string' ? x.boot : '';
      continue;
    }
    if (typeof x.sync === 'number') {
      if (x.sync <= start) vouched = Math.max(vouched, x.sync);
      continue;
    }
    if (typeof x.f !== 'string') break;
    lines.push({ l: l as FileLine, end: at });
  }
  const sameBoot = boot !== '' && writer === boot;
  const key = (f: string, sp: Span) => `${sp[0]}:${sp[1]}:${f}`;
  for (const { l, end } of lines) {
    if (end > vouched) {
      if (!sameBoot) break;
      unvouched.add(l.f);
    }
    if ('try' in l) {
      if (validSpan(l.try, files.get(l.f)?.size ?? 0) && Number.isSafeInteger(l.crc)) open.set(key(l.f, l.try), { f: l.f, span: l.try, crc: l.crc });
    } else if ('add' in l && Array.isArray(l.add)) {
      for (const sp of l.add) if (Array.isArray(sp)) open.delete(key(l.f, sp as Span));
    } else if ('etag' in l || 'drop' in l) {
      for (const [k, t] of open) if (t.f === l.f) open.delete(k);
    }
    apply(files, l);
  }
  // Only this boot's page cache can say whether a write cut by a kill landed.
  return { files, unvouched, tries: sameBoot ? [...open.values()] : [] };
}

/** Whether the bytes of `t.span` in `file` have the CRC-32 the write recorded before it began. */
async function landed(file: string, t: Try): Promise<boolean> {
  const fh = await fsp.open(file, 'r').catch(() => undefined);
  if (!fh) return false;
  try {
    const len = t.span[1] - t.span[0];
    const buf = Buffer.allocUnsafe(len);
    const { bytesRead } = await fh.read(buf, 0, len, t.span[0]);
    return bytesRead === len && crc32(buf) === t.crc;
  } catch {
    return false;
  } finally {
    await fh.close();
  }
}

/** The state a log describes for a reader on this boot. */
export function replay(text: string, boot = currentBoot()): Map<string, JournalFile> {
  return replayLog(text, boot).files;
}

/**
 * One entry's journal, open for appending. A change applies to `files` (this process's view) and its line is appended
 * at once; `sync` makes the lines so far durable.
 */
export class Journal {
  readonly #file: string;
  readonly #boot: string;
  #fh: FileHandle | undefined;
  /** Bytes in the log: the offset a marker vouches up to. */
  #size = 0;
  /** Files with spans appended since the last sync: their data must be synced before a marker vouches for them. */
  #touched = new Set<string>();
  #chain: Promise<void> = Promise.resolve();
  /** The writes of the lines appended, one after another (#append). */
  #writes: Promise<void> = Promise.resolve();
  /** Lines appended that no write has taken yet: the next write takes them all (#write). */
  #queued: Buffer[] = [];
  #closed = false;
  /** Lines not written yet are dropped: a write failed (#fail) or the entry is another process's (halt). */
  #dropping = false;
  /** Runs each write of the log, its sync, its close and its removal (Journal.open's `bound`). */
  readonly #bound: Bound;

  private constructor(readonly entry: string, readonly files: Map<string, JournalFile>, boot: string, private readonly onError: (e: unknown) => void, bound: Bound) {
    this.#file = path.join(entry, JOURNAL);
    this.#boot = boot;
    this.#bound = bound;
  }

  /**
   * Reads the entry's journal (missing or unreadable: empty), syncs the partials its unvouched lines name, and
   * rewrites it compacted and vouched. `onError`: a write of the log failed (recording stops; nothing is lost but
   * what a resume will fetch again). `bound` runs each later write of the log, its sync, close and removal: the
   * caller's bound on the pool threads that a volume that stops answering keeps (the LoRA adapters' fetches share one).
   */
  static async open(entry: string, o: { boot?: string; onError?: (e: unknown) => void; bound?: Bound } = {}): Promise<Journal> {
    const boot = o.boot ?? currentBoot();
    const log = path.join(entry, JOURNAL);
    const text = await trackIo('readFile', log, () => fsp.readFile(log, 'utf8')).catch(() => '');
    const { files, unvouched, tries } = replayLog(text, boot);
    // Writes a kill cut off from their `add`: kept if the bytes on disk are the ones the write was writing.
    for (const t of tries) {
      const j = files.get(t.f);
      if (!j || j.complete) continue;
      if (await landed(path.join(entry, t.f + PARTIAL), t)) {
        j.spans = addSpan(j.spans, t.span[0], t.span[1]);
        unvouched.add(t.f);
      }
    }
    // What the last process wrote is in this kernel's page cache: on disk before the compacted log vouches for it.
    for (const rel of unvouched) {
      const fh = await fsp.open(path.join(entry, rel + PARTIAL), 'r+').catch(() => undefined);
      await fh?.datasync().catch(() => undefined);
      await fh?.close().catch(() => undefined);
    }
    const j = new Journal(entry, files, boot, o.onError ?? (() => undefined), o.bound ?? direct);
    await j.#rewrite();
    return j;
  }

  async #rewrite(): Promise<void> {
    const out = [JSON.stringify({ v: 2, boot: this.#boot })];
    for (const [f, j] of this.files) {
      out.push(JSON.stringify({ f, etag: j.etag, size: j.size }));
      if (j.spans.length > 0) out.push(JSON.stringify({ f, add: j.spans }));
      if (j.complete) out.push(JSON.stringify({ f, complete: true }));
    }
    const body = `${out.join('\n')}\n`;
    const text = `${body}{"sync":${Buffer.byteLength(body)}}\n`;
    const tmp = `${this.#file}.tmp.${process.pid}`;
    const fh = await fsp.open(tmp, 'w');
    try {
      await fh.writeFile(text);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, this.#file);
    await fsyncDir(this.entry);
    this.#fh = await fsp.open(this.#file, 'a');
    this.#size = Buffer.byteLength(text);
  }

  get(rel: string): JournalFile | undefined {
    return this.files.get(rel);
  }

  /** A download of `rel` at this ETag and size starts from nothing. */
  start(rel: string, etag: string, size: number): JournalFile {
    this.#push({ f: rel, etag, size });
    return this.files.get(rel)!;
  }

  /** `rel` is whole at its final name (a file reused from a committed entry, or just renamed). */
  complete(rel: string, etag: string, size: number): void {
    const j = this.files.get(rel);
    if (j === undefined || j.etag !== etag || j.size !== size) this.#push({ f: rel, etag, size });
    this.#push({ f: rel, complete: true });
  }

  /**
   * A write of bytes [start, end) of `rel`'s partial, whose CRC-32 is `crc`, is about to start. Resolves once the line
   * is in the log (or recording stopped): a data write begun after that is never lost to a kill -9 unless torn.
   */
  intend(rel: string, start: number, end: number, crc: number): Promise<void> {
    return end > start ? this.#push({ f: rel, try: [start, end], crc }) : Promise.resolve();
  }

  /** Bytes [start, end) of `rel`'s partial were written (the write has returned). */
  add(rel: string, start: number, end: number): void {
    if (end <= start) return;
    this.#touched.add(rel);
    this.#push({ f: rel, add: [[start, end]] });
  }

  drop(rel: string): void {
    if (this.files.has(rel)) this.#push({ f: rel, drop: true });
  }

  #push(l: FileLine): Promise<void> {
    apply(this.files, l);
    return this.#append(`${JSON.stringify(l)}\n`);
  }

  /**
   * A line, written after the lines before it. Not synchronously: on a cache volume that stopped answering (a hard NFS
   * mount whose server went away) a write on the event loop held it, and every signal with it, for good. Recorded in
   * pending-io, so that a stop waiting for it names it.
   */
  #append(text: string): Promise<void> {
    if (this.#closed || this.#fh === undefined) return Promise.resolve();
    const b = Buffer.from(text);
    this.#size += b.length;
    this.#queued.push(b);
    // The first line since the last write began starts the next one, which takes every line queued by then.
    if (this.#queued.length === 1) {
      const fh = this.#fh;
      this.#writes = this.#writes.then(() => this.#write(fh));
    }
    // Never rejects: a failed write stops recording (#fail).
    return this.#writes;
  }

  /**
   * The lines queued, in one write. A write a line fell behind for good: each waits in libuv's pool behind the data
   * writes queued before it (one per range in flight), while those ranges append lines faster than that, and a kill -9
   * lost every write whose line still waited (docs/FAULTS.md).
   */
  async #write(fh: FileHandle): Promise<void> {
    const b = this.#queued.length === 1 ? this.#queued[0]! : Buffer.concat(this.#queued);
    this.#queued = [];
    if (this.#dropping) return;
    try {
      for (let done = 0; done < b.length;) done += (await this.#bound(() => trackIo('write', this.#file, () => fh.write(b, done, b.length - done)))).bytesWritten;
    } catch (e) {
      this.#fail(e);
    }
  }

  /**
   * A line that may be lost may be a file's start line: later lines could then attach to an older version of the
   * file. Recording stops instead; a resume fetches again what was not recorded.
   */
  #fail(e: unknown): void {
    this.#dropping = true;
    if (this.#closed) return;
    this.#closed = true;
    this.onError(e);
  }

  /**
   * Makes every line so far durable: `syncData(rels)` fdatasyncs the partials written since the last sync, the log
   * is fdatasync'd, then a marker vouches for the lines before it. Syncs run one at a time.
   */
  sync(syncData: (rels: ReadonlySet<string>) => Promise<void> = async () => undefined): Promise<void> {
    const run = this.#chain.then(async () => {
      if (this.#closed || this.#fh === undefined) return;
      const upTo = this.#size;
      const touched = this.#touched;
      this.#touched = new Set();
      try {
        if (touched.size > 0) await syncData(touched);
        // The lines the marker vouches for are written before the log is synced.
        await this.#writes;
        // One failed (onError has said so) or the journal was halted: recording has stopped, and no marker is due.
        if (this.#dropping) return;
        const fh = this.#fh;
        await this.#bound(() => fh.datasync());
      } catch (e) {
        this.#fail(e);
        throw e;
      }
      this.#append(`{"sync":${upTo}}\n`);
    });
    this.#chain = run.catch(() => undefined);
    return run;
  }

  /** Stops recording at once (the cache lock was lost: the entry is another process's now). */
  halt(): void {
    this.#closed = true;
    this.#dropping = true;
  }

  /** Stops recording; the log stays for the next run. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.#chain;
    await this.#writes;
    const fh = this.#fh;
    this.#fh = undefined;
    // A written file's close flushes it: on a volume that stopped answering it waits too.
    if (fh) await this.#bound(() => fh.close()).catch(() => undefined);
  }

  /** Closes and deletes the log (the entry is committed; its manifest says everything). */
  async remove(): Promise<void> {
    await this.close();
    await this.#bound(() => fsp.unlink(this.#file)).catch(() => undefined);
  }
}

/**
 * Another process's journal, followed by a reader that only waits (a replica waiting for the holder of the entry's
 * lock): each read() takes only the bytes appended since the last one, so following a download of gigabytes reads
 * its journal once in total, not once per poll. A journal rewritten meanwhile (a new holder compacts it on open: a new
 * file) or gone is read again from its start. What it shows is what the holder has written so far, synced or not: for
 * progress and for files whole under their final names, never for a resume (Journal.open is that).
 */
export class JournalTail {
  readonly #file: string;
  #files = new Map<string, JournalFile>();
  #ino = -1;
  #offset = 0;

  constructor(entry: string) {
    this.#file = path.join(entry, JOURNAL);
  }

  async read(): Promise<ReadonlyMap<string, JournalFile>> {
    const fh = await fsp.open(this.#file, 'r').catch(() => undefined);
    if (fh === undefined) {
      this.#reset(-1);
      return this.#files;
    }
    try {
      const st = await fh.stat();
      if (st.ino !== this.#ino || st.size < this.#offset) this.#reset(st.ino);
      if (st.size <= this.#offset) return this.#files;
      const buf = Buffer.allocUnsafe(st.size - this.#offset);
      const { bytesRead } = await fh.read(buf, 0, buf.length, this.#offset);
      // Whole lines only: one still being appended is read next time.
      const end = buf.lastIndexOf(0x0a, bytesRead - 1) + 1;
      for (const raw of buf.subarray(0, end).toString('utf8').split('\n')) {
        if (raw === '') continue;
        let l: unknown;
        try {
          l = JSON.parse(raw);
        } catch {
          continue;
        }
        if (typeof l === 'object' && l !== null && typeof (l as { f?: unknown }).f === 'string') apply(this.#files, l as FileLine);
      }
      this.#offset += end;
      return this.#files;
    } finally {
      await fh.close().catch(() => undefined);
    }
  }

  #reset(ino: number): void {
    this.#files = new Map();
    this.#ino = ino;
    this.#offset = 0;
  }
}
