/**
 * @module The content check (S3_VERIFY_CONTENT): each downloaded file's MD5 against the ETag S3 listed, where that
 * ETag is an MD5: of the whole object (one PUT), or `<MD5 of the parts' MD5s>-<parts>` (a multipart upload, whose part
 * size a HEAD with partNumber=1 gives). A file's bytes are hashed in order as its written prefix grows, read back from
 * the page cache on a thread of their own, so the check ends soon after its last byte and the download's thread does
 * no hashing; it reads through the download's own descriptor, so it needs none of its own. Objects encrypted with SSE-KMS or a customer key have ETags that are not MD5s: not checked.
 */
import { Worker } from 'node:worker_threads';
import type { PartAnswer, PartRequest } from './transport.js';

/** What an ETag promises: the MD5 of the content (`parts` 0), or of its `parts` parts' MD5s. */
export interface Md5Etag {
  readonly hex: string;
  readonly parts: number;
}

/** S3 allows at most this many parts. */
const MAX_PARTS = 10_000;

/** The MD5 an ETag names, or undefined where it names none (a weak ETag, a store's own scheme). */
export function md5Etag(etag: string): Md5Etag | undefined {
  const m = /^"?([0-9a-fA-F]{32})(?:-(\d{1,5}))?"?$/.exec(etag);
  if (m === null) return undefined;
  const parts = m[2] === undefined ? 0 : Number(m[2]);
  if (m[2] !== undefined && (parts < 1 || parts > MAX_PARTS)) return undefined;
  return { hex: m[1]!.toLowerCase(), parts };
}

/** An ETag as the check compares it: lower-case hex, `-parts` where multipart, no quotes. */
export const etagDigest = (e: Md5Etag) => (e.parts === 0 ? e.hex : `${e.hex}-${e.parts}`);

/**
 * The part size of a multipart upload of `size` bytes in `parts` parts, from S3's answer to a HEAD of part 1: the
 * first part's size, where it fits (every part but the last has it). Undefined where the store ignored partNumber.
 */
export function partSizeFrom(a: PartAnswer, size: number, parts: number): number | undefined {
  const p = a.contentLength;
  if (p === undefined || a.partsCount !== parts || p <= 0) return undefined;
  if (parts === 1) return p === size ? p : undefined;
  return (parts - 1) * p < size && size <= parts * p ? p : undefined;
}

/** What a multipart upload's parts are, as far as the check can tell: one size for all but the last, or why not. */
export type PartLayout = { partSize: number; encryption?: string } | { why: string; encryption?: string };

/**
 * Asks the store for a multipart upload's part size: HEADs of part 1 and of the last part (S3 does not require parts
 * of one size; the uploaders users run make them so, and a last part of another size than the rest implies shows an
 * upload that did not). Each HEAD is tried twice, `timeoutMs` each; an abort rejects.
 */
export async function partLayout(head: (r: PartRequest) => Promise<PartAnswer>, key: string, etag: string, size: number, parts: number,
  signal: AbortSignal, timeoutMs: number): Promise<PartLayout> {
  const ask = async (partNumber: number): Promise<PartAnswer | undefined> => {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        return await head({ key, partNumber, ...(etag ? { ifMatch: etag } : {}), signal: AbortSignal.any([signal, AbortSignal.timeout(timeoutMs)]) });
      } catch {
        signal.throwIfAborted();
      }
    }
    return undefined;
  };
  const [first, last] = await Promise.all([ask(1), parts > 1 ? ask(parts) : undefined]);
  const encryption = first?.encryption ?? last?.encryption;
  const enc = encryption !== undefined ? { encryption } : {};
  if (first === undefined) return { why: 'the store did not answer a HEAD of its first part', ...enc };
  const p = partSizeFrom(first, size, parts);
  if (p === undefined) return { why: 'the store gave no part size (HEAD partNumber=1)', ...enc };
  if (parts > 1 && last?.contentLength !== size - (parts - 1) * p) return { why: 'its parts are not all of one size', ...enc };
  return { partSize: p, ...enc };
}

/** With KMS or a customer key, S3's ETag is not the MD5 of the content. */
export const etagNotMd5 = (encryption: string | undefined) => encryption !== undefined && (encryption === 'SSE-C' || encryption.startsWith('aws:kms'));

/**
 * The hashing thread. It runs from this string (eval) so that it needs no file of its own beside the module, whether
 * the module runs built or from its source. Per file: reads [hashed, upto) in 1 MiB blocks, 4 MiB per turn so that new
 * frontiers and digest requests are read between turns; multipart: one MD5 per part, then the MD5 of their digests.
 */
const THREAD = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { readSync } = require('node:fs');
const BLOCK = 1 << 20;
const buf = Buffer.allocUnsafe(BLOCK);
const files = new Map();
let queued = false;
const kick = () => { if (!queued) { queued = true; setImmediate(step); } };
const end = (id, reply) => { files.delete(id); parentPort.postMessage({ id, ...reply }); };
parentPort.on('message', (m) => {
  const f = files.get(m.id);
  if (m.t === 'open') {
    files.set(m.id, { fd: m.fd, size: m.size, partSize: m.partSize || Infinity, multipart: m.partSize > 0,
      at: 0, upto: 0, inPart: 0, hash: createHash('md5'), parts: [], want: false });
  } else if (f === undefined) {
    if (m.t === 'digest') parentPort.postMessage({ id: m.id, error: 'not open' });
    return;
  } else if (m.t === 'upto') f.upto = Math.min(f.size, Math.max(f.upto, m.end));
  else if (m.t === 'digest') { f.upto = f.size; f.want = true; }
  else if (m.t === 'drop') files.delete(m.id);
  kick();
});
function step() {
  queued = false;
  let more = false;
  for (const [id, f] of files) {
    try {
      let budget = 4 * BLOCK;
      while (f.at < f.upto && budget > 0) {
        const n = readSync(f.fd, buf, 0, Math.min(BLOCK, f.upto - f.at, f.partSize - f.inPart), f.at);
        if (n <= 0) throw new Error('the file ended at ' + f.at);
        f.hash.update(buf.subarray(0, n));
        f.at += n; f.inPart += n; budget -= n;
        if (f.inPart === f.partSize) { f.parts.push(f.hash.digest()); f.hash = createHash('md5'); f.inPart = 0; }
      }
      if (f.at < f.upto) more = true;
      else if (f.want) {
        if (!f.multipart) end(id, { digest: f.hash.digest('hex') });
        else {
          if (f.inPart > 0) f.parts.push(f.hash.digest());
          end(id, { digest: createHash('md5').update(Buffer.concat(f.parts)).digest('hex') + '-' + f.parts.length });
        }
      }
    } catch (e) { end(id, { error: String(e && e.message || e) }); }
  }
  if (more) kick();
}
`;

/** One file being hashed. */
export interface Hashing {
  /** Bytes [0, end) of the file are written: hash them. */
  upto(end: number): void;
  /** The file is whole: its digest, as `etagDigest` writes one. */
  digest(): Promise<string>;
  /** Stops hashing it (the file is fetched again, or the download ends). */
  drop(): void;
}

/** The hashing thread of one download, started by the first file it hashes and ended by close(). */
export class Hasher {
  #worker: Worker | undefined;
  #failed: Error | undefined;
  #closed = false;
  /** Errors the thread reported for a file before its digest was asked for. */
  readonly #errors = new Map<number, string>();
  #next = 1;
  readonly #waiting = new Map<number, { resolve: (d: string) => void; reject: (e: Error) => void }>();

  #thread(): Worker {
    if (this.#worker) return this.#worker;
    // Not unref'd: a digest awaited after the last range must keep the process alive until it comes.
    const w = new Worker(THREAD, { eval: true });
    w.on('message', (m: { id: number; digest?: string; error?: string }) => {
      const p = this.#waiting.get(m.id);
      if (!p) {
        if (m.error !== undefined) this.#errors.set(m.id, m.error);
        return;
      }
      this.#waiting.delete(m.id);
      if (m.digest !== undefined) p.resolve(m.digest);
      else p.reject(new Error(`hashing failed: ${m.error ?? 'no reason given'}`));
    });
    const die = (e: Error) => {
      this.#failed ??= e;
      for (const p of this.#waiting.values()) p.reject(e);
      this.#waiting.clear();
    };
    w.on('error', die);
    w.on('exit', (code) => die(new Error(`the hashing thread ended (exit code ${code})`)));
    this.#worker = w;
    return w;
  }

  /**
   * Starts hashing a file of `size` bytes as written, read through `fd` (opened for reading; the caller closes it only
   * once the digest came, the hashing was dropped, or close() returned); `partSize` > 0 hashes a multipart upload's parts.
   */
  open(fd: number, size: number, partSize: number): Hashing {
    if (this.#closed) throw new Error('the hashing thread was closed');
    const id = this.#next++;
    const w = this.#thread();
    w.postMessage({ t: 'open', id, fd, size, partSize });
    let told = 0;
    let done = false;
    return {
      upto: (end) => {
        if (done || end <= told) return;
        told = end;
        w.postMessage({ t: 'upto', id, end });
      },
      digest: () => {
        if (this.#failed) return Promise.reject(this.#failed);
        const early = this.#errors.get(id);
        if (early !== undefined) return Promise.reject(new Error(`hashing failed: ${early}`));
        done = true;
        return new Promise<string>((resolve, reject) => {
          this.#waiting.set(id, { resolve, reject });
          w.postMessage({ t: 'digest', id });
        });
      },
      drop: () => {
        if (done) return;
        done = true;
        w.postMessage({ t: 'drop', id });
      },
    };
  }

  /** Ends the thread; digests not yet given are refused. */
  async close(): Promise<void> {
    this.#closed = true;
    const w = this.#worker;
    this.#worker = undefined;
    if (w) await w.terminate();
  }
}

/** What a fetch's content check knows across its download rounds (fetch.ts holds it). */
export interface ContentCheckState {
  /**
   * A file's digest the last time its content differed from its ETag, by `mismatchKey`: a second difference is final,
   * and the same digest twice says the store itself holds that content (the error says which).
   */
  readonly mismatched: Map<string, string>;
  /** Files whose content matched its ETag, and files not checked, by why (counted for the commit's log line). */
  readonly checked: Set<string>;
  readonly unchecked: Map<string, string>;
}

/** A version of a file: a mismatch of an object since replaced does not count against the new one. */
export const mismatchKey = (rel: string, etag: string) => `${rel}\n${etag}`;

export const newContentCheckState = (): ContentCheckState => ({ mismatched: new Map(), checked: new Set(), unchecked: new Map() });

/** What the download needs to check content: the state, and a HEAD of a part for multipart part sizes. */
export interface ContentCheckOptions {
  state: ContentCheckState;
  headPart(r: PartRequest): Promise<PartAnswer>;
  /** A downloaded file's content differed from its ETag (it is fetched again, or the fetch fails). */
  onMismatch?(rel: string): void;
}

/**
 * Thrown by the download when a file's content differs from its ETag (the download has dropped it from the journal):
 * the caller fetches it again, once; a second difference is STORAGE_CORRUPT.
 */
export class ContentMismatchError extends Error {
  constructor(readonly key: string, readonly rel: string, readonly expected: string, readonly got: string) {
    super(`the content of ${rel} differs from its ETag (MD5 ${got}, ETag ${expected})`);
    this.name = 'ContentMismatchError';
  }
}
