/**
 * @module The content check (S3_VERIFY_CONTENT): each downloaded file's digest against what S3 says it is. First the
 * ETag S3 listed, where that ETag is an MD5: of the whole object (one PUT), or `<MD5 of the parts' MD5s>-<parts>` (a
 * multipart upload, whose part size HEADs of its parts give). Where it is not (SSE-KMS, a customer key, a directory
 * bucket, a store's own scheme) or the part sizes are not to be had, the object's additional checksum, from a HEAD with
 * checksum mode (checksums.ts). A whole object's MD5 or SHA is hashed in order as its written prefix grows; parts, and
 * pieces of a whole-object CRC, each once written, read back from the page cache on threads of their own: the check
 * ends soon after the last byte, the download's thread does no hashing, and the threads read through the download's
 * own descriptors (each thread holds a few of its own, for its event loop).
 */
import { availableParallelism } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { deadline } from '../deadline.js';
import { RuntimeError } from '../errors.js';
import { checksumExpected, CRC_SOURCE, crcCombine, describeExpected, isCrc, newDigest, type Algorithm, type Expected } from './checksums.js';
import type { Span } from './journal.js';
import type { HeadAnswer, HeadRequest } from './transport.js';

/**
 * The part size of a multipart upload of `size` bytes in `parts` parts, from S3's answer to a HEAD of part 1: the
 * first part's size, where it fits (every part but the last has it). Undefined where the store ignored partNumber.
 */
export function partSizeFrom(a: HeadAnswer, size: number, parts: number): number | undefined {
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
 * upload that did not). Each HEAD is tried twice, `timeoutMs` each; an abort rejects. `throttled` (headTwice) waits out throttling.
 */
export async function partLayout(head: Head, key: string, etag: string, size: number, parts: number,
  signal: AbortSignal, timeoutMs: number, throttled?: Throttled): Promise<PartLayout> {
  const ask = (partNumber: number) => headTwice(head, { key, partNumber, ...(etag ? { ifMatch: etag } : {}) }, signal, timeoutMs, throttled);
  const [first, last] = await Promise.all([ask(1), parts > 1 ? ask(parts) : undefined]);
  const encryption = first?.encryption ?? last?.encryption;
  const enc = encryption !== undefined ? { encryption } : {};
  if (first === undefined) return { why: 'the store did not answer a HEAD of its first part', ...enc };
  const p = partSizeFrom(first, size, parts);
  if (p === undefined) return { why: 'the store gave no part size (HEAD partNumber=1)', ...enc };
  if (parts > 1 && last?.contentLength !== size - (parts - 1) * p) return { why: 'its parts are not all of one size', ...enc };
  return { partSize: p, ...enc };
}

type Head = (r: HeadRequest) => Promise<HeadAnswer>;
/**
 * For a HEAD's error: how long to wait before asking again, where it is throttling (the fill's throttle.ts); else
 * undefined. Throws where the fill gives up on throttling: the HEAD is not tried again.
 */
export type Throttled = (err: unknown) => number | undefined;

/**
 * A HEAD, tried twice, `timeoutMs` each: undefined where neither got an answer. An abort rejects. A try that `throttled`
 * gives a wait for is not counted: the HEAD asks again after it, so a file is not left unchecked for a SlowDown storm.
 */
async function headTwice(head: Head, r: Omit<HeadRequest, 'signal'>, signal: AbortSignal, timeoutMs: number, throttled?: Throttled): Promise<HeadAnswer | undefined> {
  for (let attempt = 0; attempt < 2;) {
    // Its bound is S3_STALL_TIMEOUT_S: the HEAD counts as stalled (s3-requests.ts), not stopped.
    const d = deadline(signal, timeoutMs, () => new RuntimeError('STORAGE_STALL', `no answer to a HEAD for ${timeoutMs} ms`), { afterInput: true });
    let wait: number | undefined;
    try {
      return await head({ ...r, signal: d.signal });
    } catch (e) {
      signal.throwIfAborted();
      wait = d.timedOut ? undefined : throttled?.(e);
    } finally {
      d.clear();
    }
    if (wait === undefined) attempt++;
    else await sleep(wait, undefined, { signal }).catch(() => signal.throwIfAborted());
  }
  return undefined;
}

/**
 * What a HEAD with checksum mode says of an object: what its content must hash to, or why nothing; and its encryption.
 * `unanswered`: neither try got an answer.
 */
export type ChecksumLookup = ({ expected: Expected } | { why: string; unanswered?: true }) & { encryption?: string };

/** The lookup of a store that left a HEAD for a checksum unanswered: not asked again in the same download. */
export const CHECKSUM_UNANSWERED: ChecksumLookup = { why: 'the store did not answer a HEAD for its checksum', unanswered: true };

/** Asks the store for an object's additional checksum (HEAD with x-amz-checksum-mode: ENABLED, tried twice; throttling waited out). */
export async function lookUpChecksum(head: Head, key: string, etag: string, signal: AbortSignal, timeoutMs: number, throttled?: Throttled): Promise<ChecksumLookup> {
  const a = await headTwice(head, { key, checksums: true, ...(etag ? { ifMatch: etag } : {}) }, signal, timeoutMs, throttled);
  const enc = a?.encryption !== undefined ? { encryption: a.encryption } : {};
  if (a === undefined) return CHECKSUM_UNANSWERED;
  if (a.checksum === undefined) return { why: 'the store gave no checksum', ...enc };
  const e = checksumExpected(a.checksum, /-\d+"?$/.test(etag));
  return 'why' in e ? { why: e.why, ...enc } : { expected: e, ...enc };
}

/** With KMS or a customer key, S3's ETag is not the MD5 of the content. */
export const etagNotMd5 = (encryption: string | undefined) => encryption !== undefined && (encryption === 'SSE-C' || encryption.startsWith('aws:kms'));

/**
 * A hashing thread. It runs from this string (eval) so that it needs no file of its own beside the module, whether the
 * module runs built or from its source. Two kinds of job, read in 1 MiB blocks, 4 MiB per job per turn so that new
 * frontiers and new jobs are read between turns: a whole file hashed in order as its written prefix grows (`open`,
 * `upto`, `digest`), and one range whose bytes are all written (`range`: a multipart upload's part, a piece of a CRC).
 * A digest comes back as hex.
 */
const THREAD = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { readSync } = require('node:fs');
const zlibCrc32 = require('node:zlib').crc32;
${CRC_SOURCE}
const BLOCK = 1 << 20;
const buf = Buffer.allocUnsafe(BLOCK);
const jobs = new Map();
let queued = false;
const kick = () => { if (!queued) { queued = true; setImmediate(step); } };
const end = (id, reply) => { jobs.delete(id); parentPort.postMessage({ id, ...reply }); };
parentPort.on('message', (m) => {
  const j = jobs.get(m.id);
  try {
    if (m.t === 'open') jobs.set(m.id, { fd: m.fd, size: m.size, at: 0, upto: 0, hash: makeDigest(m.alg, createHash, zlibCrc32), want: false });
    else if (m.t === 'range') jobs.set(m.id, { fd: m.fd, size: m.end, at: m.start, upto: m.end, hash: makeDigest(m.alg, createHash, zlibCrc32), want: true });
    else if (j === undefined) return;
    else if (m.t === 'upto') j.upto = Math.min(j.size, Math.max(j.upto, m.end));
    else if (m.t === 'digest') { j.upto = j.size; j.want = true; }
    else if (m.t === 'drop') jobs.delete(m.id);
  } catch (e) { return end(m.id, { error: String(e && e.message || e) }); }
  kick();
});
function step() {
  queued = false;
  let more = false;
  for (const [id, j] of jobs) {
    try {
      let budget = 4 * BLOCK;
      while (j.at < j.upto && budget > 0) {
        const n = readSync(j.fd, buf, 0, Math.min(BLOCK, j.upto - j.at), j.at);
        if (n <= 0) throw new Error('the file ended at ' + j.at);
        j.hash.update(buf.subarray(0, n));
        j.at += n; budget -= n;
      }
      if (j.at < j.upto) more = true;
      else if (j.want) end(id, { digest: j.hash.digest().toString('hex') });
    } catch (e) { end(id, { error: String(e && e.message || e) }); }
  }
  if (more) kick();
}
`;

/** How a whole-object CRC is split among threads: pieces of this size, combined (checksums.ts crcCombine). */
export const CRC_PIECE = 8 << 20;

/** What to compute of a file: `alg` of the whole (`partSize` 0), or of the digests of its parts of `partSize` bytes. */
export interface HashPlan {
  readonly alg: Algorithm;
  readonly partSize: number;
}

/** One file being hashed. */
export interface Hashing {
  /** Bytes [start, end) of the file were just written (the spans the hasher reads say what is on disk). */
  written(start: number, end: number): void;
  /** The file is whole: its digest (of its parts' digests, where the plan has parts), raw. */
  digest(): Promise<Buffer>;
  /** Stops hashing it (the file is fetched again, or the download ends). */
  drop(): void;
}

/** Hashing threads a download starts at most: the cores but one, 1 to 4. */
export const hashThreads = () => Math.max(1, Math.min(4, availableParallelism() - 1));

/** Descriptors a Node worker thread holds while it runs (its event loop's), measured on Node 20 and 24. */
export const THREAD_DESCRIPTORS = 4;

/**
 * Hashing threads for one download: one to start with, more (up to `max`) while every one has work. A whole-object
 * MD5 or SHA is one sequence, hashed by one thread; a multipart upload's parts, and the pieces of a whole-object CRC,
 * are independent, hashed on any thread once each is written, so such a file is hashed as fast as the threads allow
 * (one thread: ~600 MB/s of MD5 or CRC64NVME).
 */
export class Hasher {
  #max: number;
  readonly #threads: Thread[] = [];
  #failed: Error | undefined;
  #closed = false;
  #next = 1;
  /** Jobs not yet answered nor dropped, with their thread; `reply` once a digest is asked for. */
  readonly #jobs = new Map<number, Job>();

  readonly #crcPiece: number;

  /** `max`: threads at most (default hashThreads()); `crcPiece`: the pieces a whole-object CRC is split into. */
  constructor(max = hashThreads(), crcPiece = CRC_PIECE) {
    this.#max = max;
    this.#crcPiece = crcPiece;
  }

  #spawn(): Thread {
    // Not unref'd: a digest awaited after the last range must keep the process alive until it comes.
    const t: Thread = { worker: new Worker(THREAD, { eval: true }), load: 0 };
    t.worker.on('message', (m: { id: number; digest?: string; error?: string }) => {
      const j = this.#jobs.get(m.id);
      if (!j) return;
      this.#end(m.id, j);
      j.answer = m.digest !== undefined ? { digest: m.digest } : { error: new Error(`hashing failed: ${m.error ?? 'no reason given'}`) };
      j.reply?.(j.answer);
    });
    // A thread that fails (to start, for want of a descriptor or memory) fails its own jobs, and the pool stops growing;
    // the jobs of the other threads go on.
    const die = (e: Error) => {
      const at = this.#threads.indexOf(t);
      if (at === -1) return;
      this.#threads.splice(at, 1);
      this.#max = Math.max(1, this.#threads.length);
      if (this.#threads.length === 0) this.#failed ??= e;
      for (const [id, j] of this.#jobs) {
        if (j.thread !== t) continue;
        this.#end(id, j);
        j.answer = { error: e };
        j.reply?.(j.answer);
      }
    };
    t.worker.on('error', die);
    t.worker.on('exit', (code) => die(new Error(`a hashing thread ended (exit code ${code})`)));
    this.#threads.push(t);
    return t;
  }

  #end(id: number, j: Job): void {
    if (this.#jobs.delete(id) && j.thread) j.thread.load--;
  }

  /** A new job on the least busy thread, or on a new one where every thread has work and there is room for one. */
  #start(message: (id: number) => object): { id: number; job: Job } {
    // No thread left (every one failed, or closed): the job fails at once, and the file goes unchecked with a warning.
    const failure = this.#closed ? new Error('the hashing threads were closed') : this.#failed;
    if (failure) return { id: 0, job: { answer: { error: failure } } };
    let thread = this.#threads[0];
    for (const t of this.#threads) if (t.load < thread!.load) thread = t;
    if (thread === undefined || (thread.load > 0 && this.#threads.length < this.#max)) thread = this.#spawn();
    const id = this.#next++;
    const job: Job = { thread };
    this.#jobs.set(id, job);
    thread.load++;
    thread.worker.postMessage(message(id));
    return { id, job };
  }

  /** The job's answer, once it comes. */
  #answer(job: Job): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      job.reply = (a) => ('digest' in a ? resolve(Buffer.from(a.digest, 'hex')) : reject(a.error));
      if (job.answer) job.reply(job.answer);
    });
  }

  /** Stops a job its caller no longer wants: its thread forgets it before reading any more of it. */
  #drop(id: number, job: Job): void {
    if (!this.#jobs.has(id)) return;
    this.#end(id, job);
    job.thread?.worker.postMessage({ t: 'drop', id });
  }

  /**
   * Starts hashing a file of `size` bytes as it is written, read through `fd` (opened for reading; the caller closes
   * it only once the digest came, the hashing was dropped, or close() returned). `spans()`: what of the file is on
   * disk (sorted, merged). A plan with parts hashes each part once it is whole, and a whole-object CRC its pieces.
   */
  open(fd: number, size: number, plan: HashPlan, spans: () => readonly Span[]): Hashing {
    if (plan.partSize > 0) {
      const count = Math.ceil(size / plan.partSize);
      // The digest of the parts' digests, as S3 makes a multipart ETag or a COMPOSITE checksum.
      return this.#pieces(fd, size, plan.alg, plan.partSize, spans, (digests) => {
        const d = newDigest(plan.alg);
        d.update(Buffer.concat(digests));
        return d.digest();
      }, count);
    }
    const piece = this.#crcPiece;
    if (isCrc(plan.alg) && size > piece) {
      return this.#pieces(fd, size, plan.alg, piece, spans, (digests) =>
        digests.reduce((acc, d, k) => crcCombine(plan.alg, acc, d, Math.min(piece, size - k * piece))));
    }
    return this.#whole(fd, size, plan.alg, spans);
  }

  #whole(fd: number, size: number, alg: Algorithm, spans: () => readonly Span[]): Hashing {
    const { id, job } = this.#start((id) => ({ t: 'open', id, fd, size, alg }));
    let told = 0;
    let done = false;
    const tell = () => {
      const s0 = spans()[0];
      const end = s0 !== undefined && s0[0] === 0 ? s0[1] : 0;
      if (done || end <= told || !this.#jobs.has(id)) return;
      told = end;
      job.thread?.worker.postMessage({ t: 'upto', id, end });
    };
    tell();
    return {
      written: tell,
      digest: () => {
        done = true;
        if (this.#jobs.has(id)) job.thread?.worker.postMessage({ t: 'digest', id });
        return this.#answer(job);
      },
      drop: () => {
        done = true;
        this.#drop(id, job);
      },
    };
  }

  /** Ranges of `piece` bytes hashed each once written, on any thread; `join` makes the file's digest of theirs. */
  #pieces(fd: number, size: number, alg: Algorithm, piece: number, spans: () => readonly Span[], join: (digests: Buffer[]) => Buffer, count = Math.ceil(size / piece)): Hashing {
    const pieces: Array<{ id: number; job: Job; digest: Promise<Buffer> } | undefined> = new Array(count);
    let dropped = false;
    const bounds = (k: number): Span => [k * piece, Math.min(size, (k + 1) * piece)];
    const covered = (k: number) => {
      const [ps, pe] = bounds(k);
      return spans().some(([s, e]) => s <= ps && e >= pe);
    };
    const send = (k: number) => {
      const [start, end] = bounds(k);
      const { id, job } = this.#start((id) => ({ t: 'range', id, fd, start, end, alg }));
      const digest = this.#answer(job);
      // Awaited by digest(); a failure of a dropped file's piece is nobody's to hear.
      digest.catch(() => undefined);
      pieces[k] = { id, job, digest };
    };
    const check = (k: number) => {
      if (!dropped && pieces[k] === undefined && covered(k)) send(k);
    };
    const drop = () => {
      dropped = true;
      for (const p of pieces) if (p) this.#drop(p.id, p.job);
    };
    for (let k = 0; k < count; k++) check(k);
    return {
      written: (start, end) => {
        if (end <= start) return;
        for (let k = Math.floor(start / piece); k <= Math.floor((end - 1) / piece) && k < count; k++) check(k);
      },
      digest: async () => {
        for (let k = 0; k < count; k++) if (pieces[k] === undefined) send(k);
        try {
          return join(await Promise.all(pieces.map((p) => p!.digest)));
        } catch (e) {
          // The other pieces stop reading before the caller closes the descriptor.
          drop();
          throw e;
        }
      },
      drop,
    };
  }

  /** Ends the threads; digests not yet given are refused. */
  async close(): Promise<void> {
    this.#closed = true;
    const threads = this.#threads.splice(0);
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }
}

interface Thread {
  readonly worker: Worker;
  /** Jobs not yet answered nor dropped. */
  load: number;
}

type Answer = { digest: string } | { error: Error };

interface Job {
  /** Absent: no thread could take it, and `answer` says why. */
  readonly thread?: Thread;
  answer?: Answer;
  reply?: (a: Answer) => void;
}

/** What a fetch's content check knows across its download rounds (fetch.ts holds it). */
export interface ContentCheckState {
  /**
   * A file's digest the last time its content differed from its ETag or checksum, by `mismatchKey`: a second difference
   * is final, and the same digest twice says the store itself holds that content (the error says which).
   */
  readonly mismatched: Map<string, string>;
  /** Files whose content matched, and files not checked, by why (counted for the commit's log line). */
  readonly checked: Set<string>;
  readonly unchecked: Map<string, string>;
}

/**
 * A version of a file, and what it was checked against: a mismatch of an object since replaced does not count against
 * the new one, nor an MD5 against a checksum.
 */
export const mismatchKey = (rel: string, etag: string, e: Expected) => `${rel}\n${etag}\n${e.source} ${e.alg}`;

export const newContentCheckState = (): ContentCheckState => ({ mismatched: new Map(), checked: new Set(), unchecked: new Map() });

/** What the download needs to check content: the state, and HEADs (part sizes, checksums). */
export interface ContentCheckOptions {
  state: ContentCheckState;
  head: Head;
  /** False where the store's ETags are never MD5s (a directory bucket): checksums only. */
  etagsAreMd5?: boolean;
  /**
   * A download of the file was damaged on its way: its content differed from the ETag or checksum, and another download's did
   * not, or differed otherwise. Called once the second download shows it (not for two downloads that agree).
   */
  onDamaged?(rel: string): void;
}

/**
 * Thrown by the download when a file's content differs from its ETag or checksum (the download has dropped it from the
 * journal): the caller fetches it again, once; a second difference is STORAGE_CORRUPT.
 */
export class ContentMismatchError extends Error {
  readonly against: Expected['source'];
  readonly expected: string;
  constructor(readonly key: string, readonly rel: string, e: Expected, readonly got: string) {
    super(`the content of ${rel} differs from its ${e.source} (${describeExpected(e, got)}, expected ${describeExpected(e)})`);
    this.name = 'ContentMismatchError';
    this.against = e.source;
    this.expected = describeExpected(e);
  }
}
