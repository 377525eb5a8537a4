/**
 * @module The download journal of a cache entry: which byte ranges of which `*.partial` are on disk, and which files
 * are whole. An append-only log of JSON lines, so recording progress costs one small write and one fdatasync:
 *
 *   {"v":2}                                        header
 *   {"f":"unet/model.onnx_data","etag":"…","size":N} a file's download starts (forgets what was recorded before)
 *   {"f":"unet/model.onnx_data","add":[[0,1048576]]} these ranges ([start, end) bytes) of the .partial are durable
 *   {"f":"unet/model.onnx_data","complete":true}   the file is whole and renamed to its final name
 *   {"f":"unet/model.onnx_data","drop":true}       forget the file
 *
 * Ordering is what makes it trustworthy: the data of a range is fdatasync'd before the line that claims it is
 * written (commit's `syncData`), and a line is appended only after the previous commit's fdatasync returned. A kill
 * (or a power cut) can only tear the last line, which replay ignores. Opening compacts the log into one line per
 * file, so it never grows beyond one download's worth of lines.
 */
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir, JOURNAL } from './cache.js';

/** [start, end): bytes of a file, end exclusive. */
export type Span = [number, number];

export interface JournalFile {
  readonly etag: string;
  readonly size: number;
  /** Sorted, merged, non-empty spans of the `.partial` that are on disk (synced before they were recorded). */
  spans: Span[];
  /** The file is whole and was renamed to its final name. */
  complete: boolean;
}

type Line =
  | { f: string; etag: string; size: number }
  | { f: string; add: Span[] }
  | { f: string; complete: true }
  | { f: string; drop: true };

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

/** Applies one line to the state; a line that does not fit (unknown file, bad span) is ignored. */
function apply(files: Map<string, JournalFile>, l: Line): void {
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

/** Replays a log; stops at the first line that does not parse (a torn tail), keeping what came before. */
export function replay(text: string): Map<string, JournalFile> {
  const files = new Map<string, JournalFile>();
  const lines = text.split('\n');
  if (lines[0]?.trim() !== '{"v":2}') return files;
  for (const raw of lines.slice(1)) {
    if (raw === '') continue;
    let l: Line;
    try {
      l = JSON.parse(raw) as Line;
    } catch {
      break;
    }
    if (typeof l !== 'object' || l === null || typeof l.f !== 'string') break;
    apply(files, l);
  }
  return files;
}

/** The lines that recreate `files`. */
function snapshot(files: ReadonlyMap<string, JournalFile>): string {
  const out = ['{"v":2}'];
  for (const [f, j] of files) {
    out.push(JSON.stringify({ f, etag: j.etag, size: j.size }));
    if (j.spans.length > 0) out.push(JSON.stringify({ f, add: j.spans }));
    if (j.complete) out.push(JSON.stringify({ f, complete: true }));
  }
  return `${out.join('\n')}\n`;
}

/**
 * One entry's journal, open for appending. Changes apply to `files` at once (this process's view) and are queued;
 * `commit` makes the queued lines durable. Commits run one at a time, in call order.
 */
export class Journal {
  readonly #file: string;
  #fh: FileHandle | undefined;
  #queue: Line[] = [];
  /** Files with spans queued since the last commit: their data must be synced before the lines are written. */
  #touched = new Set<string>();
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(readonly entry: string, readonly files: Map<string, JournalFile>) {
    this.#file = path.join(entry, JOURNAL);
  }

  /** Reads the entry's journal (missing or unreadable: empty) and rewrites it compacted, durably. */
  static async open(entry: string): Promise<Journal> {
    const text = await fsp.readFile(path.join(entry, JOURNAL), 'utf8').catch(() => '');
    const j = new Journal(entry, replay(text));
    await j.#rewrite();
    return j;
  }

  async #rewrite(): Promise<void> {
    const tmp = `${this.#file}.tmp.${process.pid}`;
    const fh = await fsp.open(tmp, 'w');
    try {
      await fh.writeFile(snapshot(this.files));
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, this.#file);
    await fsyncDir(this.entry);
    this.#fh = await fsp.open(this.#file, 'a');
  }

  get(rel: string): JournalFile | undefined {
    return this.files.get(rel);
  }

  get pending(): boolean {
    return this.#queue.length > 0;
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

  /** Bytes [start, end) of `rel`'s partial were written; they are claimed once a commit has synced the file. */
  add(rel: string, start: number, end: number): void {
    if (end <= start) return;
    this.#touched.add(rel);
    this.#push({ f: rel, add: [[start, end]] });
  }

  drop(rel: string): void {
    if (this.files.has(rel)) this.#push({ f: rel, drop: true });
  }

  #push(l: Line): void {
    apply(this.files, l);
    // Consecutive spans of one file share a line.
    const last = this.#queue.at(-1);
    if ('add' in l && last && 'add' in last && last.f === l.f) last.add.push(...l.add);
    else this.#queue.push(l);
  }

  /**
   * Writes the queued lines durably: first `syncData(rels)` (fdatasync the partials whose spans are claimed), then one
   * append and an fdatasync of the log. Resolves once this call's lines are on disk.
   */
  commit(syncData: (rels: ReadonlySet<string>) => Promise<void> = async () => undefined): Promise<void> {
    const run = this.#chain.then(async () => {
      if (this.#closed || this.#queue.length === 0) return;
      const lines = this.#queue;
      const touched = this.#touched;
      this.#queue = [];
      this.#touched = new Set();
      try {
        if (touched.size > 0) await syncData(touched);
        await this.#fh!.write(`${lines.map((l) => JSON.stringify(l)).join('\n')}\n`);
        await this.#fh!.datasync();
      } catch (e) {
        // Lines lost here may include a file's start line: later lines could then attach to an older version of it.
        // Recording stops instead; a resume fetches again what was not recorded.
        this.#closed = true;
        throw e;
      }
    });
    this.#chain = run.catch(() => undefined);
    return run;
  }

  /** Stops writing: later commits do nothing (the lock was lost, or the entry is committed). */
  async close(): Promise<void> {
    await this.#chain;
    this.#closed = true;
    await this.#fh?.close().catch(() => undefined);
    this.#fh = undefined;
  }

  /** Closes and deletes the log (the entry is committed; its manifest says everything). */
  async remove(): Promise<void> {
    await this.close();
    await fsp.unlink(this.#file).catch(() => undefined);
  }
}
