/**
 * @module The container's termination message: Kubernetes shows the content of the file at the container's
 * terminationMessagePath (default /dev/termination-log, which the kubelet mounts into every container) as the last
 * state's `message` in the pod status (`kubectl describe pod`). The process writes there the same line it ends with on
 * stderr before a fatal exit; while model weights mapped from a volume may be read, a hint for the one end it cannot
 * report itself (SIGBUS, exit 135), followed by the generations running then (for an OOM kill, 137) and the log's
 * last lines; nothing after a graceful stop.
 */
import { existsSync, writeFileSync } from 'node:fs';

/** The kubelet's default terminationMessagePath. */
export const DEFAULT_TERMINATION_MESSAGE_PATH = '/dev/termination-log';
/** Kubernetes keeps at most this many bytes of the message (of all containers of a pod together, 12 KiB). */
export const TERMINATION_MESSAGE_LIMIT = 4096;
const CUT = ' …(cut)';

/**
 * Where the message goes: TERMINATION_MESSAGE_PATH where set, else `fallback` only if it exists (the kubelet made it:
 * outside Kubernetes nothing is created in /dev); undefined: nowhere.
 */
export function terminationPath(env: NodeJS.ProcessEnv = process.env, fallback = DEFAULT_TERMINATION_MESSAGE_PATH): string | undefined {
  const set = env.TERMINATION_MESSAGE_PATH?.trim();
  if (set) return set;
  return existsSync(fallback) ? fallback : undefined;
}

/** `text` in at most TERMINATION_MESSAGE_LIMIT bytes of UTF-8: cut at a character's boundary, marked as cut. */
export function fitTerminationMessage(text: string): string {
  return Buffer.byteLength(text) <= TERMINATION_MESSAGE_LIMIT ? text : cutTo(text, TERMINATION_MESSAGE_LIMIT);
}

/**
 * The kubelet's FallbackToLogsOnError shows at most this many of the log's last lines, and only where the file is
 * empty: the hint, which fills it, takes their place, so it carries them itself.
 */
const TAIL_LINES = 80;
/** What parts the hint from the log's last lines in the message. */
export const TAIL_HEADER = '\nlast log lines:\n';
/** The message is rewritten with the log's newest lines at most this often (none are written between). */
export const TAIL_REWRITE_MS = 1000;

/** Whether the file holds a fatal reason (which a later hint or a graceful stop's clearing must not replace). */
let fatal = false;
/** A graceful stop emptied the file: nothing is written after it. */
let cleared = false;
/** The folders named by the hint, in the order their weights were first mapped. */
const hinted: string[] = [];
/** The hint, once written. */
let hint: string | undefined;
/** The log's newest lines (without their newline) and their bytes, kept only while the hint stands in a file. */
let tail: Array<{ line: string; bytes: number }> | undefined;
let tailBytes = 0;
/** The next rewrite, armed by the first line logged after the last one. */
let rewrite: NodeJS.Timeout | undefined;
/** When the file was last written (performance.now()): a generation's start is written at once only past a second. */
let lastWrite = -Infinity;
/** What the pipeline workers run now, read when the message is written (generationsChanged). */
let inFlight: (() => InFlightNow) | undefined;

function write(text: string): void {
  const file = terminationPath();
  if (file === undefined) return;
  lastWrite = performance.now();
  try {
    writeFileSync(file, fitTerminationMessage(text));
  } catch {
    // The exit it explains goes on: a message that cannot be written is no reason to end otherwise.
  }
}

/** No more lines kept or written (a fatal reason or a graceful stop took the file). */
function dropTail(): void {
  clearTimeout(rewrite);
  rewrite = undefined;
  tail = undefined;
  tailBytes = 0;
  inFlight = undefined;
}

/** Why the process is about to end (one line, as on stderr, without its newline); synchronous, never throws. */
export function terminationReason(line: string): void {
  fatal = true;
  dropTail();
  write(line.replace(/\s*\n\s*/g, ' ').trim());
}

/**
 * `hint`, then TAIL_HEADER and the newest of `lines` that fit in TERMINATION_MESSAGE_LIMIT bytes, oldest first, each
 * whole; a newest line too long for the room alone is cut, marked as cut. No lines: the hint alone.
 */
export function withLogTail(hint: string, lines: readonly string[]): string {
  const room = TERMINATION_MESSAGE_LIMIT - Buffer.byteLength(hint) - Buffer.byteLength(TAIL_HEADER);
  if (lines.length === 0 || room < 64) return hint;
  const kept: string[] = [];
  let used = 0;
  for (let i = lines.length - 1; i >= 0 && kept.length < TAIL_LINES; i--) {
    const bytes = Buffer.byteLength(lines[i]!) + (kept.length > 0 ? 1 : 0);
    if (used + bytes > room) break;
    kept.push(lines[i]!);
    used += bytes;
  }
  const shown = kept.length > 0 ? kept.reverse().join('\n') : cutTo(lines.at(-1)!, room);
  return `${hint}${TAIL_HEADER}${shown}`;
}

/** `text` in at most `bytes` bytes of UTF-8, its start kept, marked as cut. */
function cutTo(text: string, bytes: number): string {
  const buf = Buffer.from(text);
  let end = bytes - Buffer.byteLength(CUT);
  // Back to the first byte of a character (continuation bytes are 10xxxxxx).
  while (end > 0 && (buf[end]! & 0xc0) === 0x80) end--;
  return buf.subarray(0, end).toString() + CUT;
}

/**
 * One line of the runtime's log as written (log.ts passes each; redacted, so free of credentials): kept while the hint
 * stands, and the message rewritten with the newest lines within TAIL_REWRITE_MS. Otherwise nothing is done.
 */
export function logLine(line: string): void {
  if (tail === undefined) return;
  const text = line.endsWith('\n') ? line.slice(0, -1) : line;
  const bytes = Buffer.byteLength(text) + 1;
  tail.push({ line: text, bytes });
  tailBytes += bytes;
  // Never more than the message could show.
  while (tail.length > TAIL_LINES || (tail.length > 1 && tailBytes > TERMINATION_MESSAGE_LIMIT)) tailBytes -= tail.shift()!.bytes;
  // A timer of its own would keep a process that is otherwise done alive: unref'd.
  rewrite ??= setTimeout(writeTail, TAIL_REWRITE_MS).unref();
}

function writeTail(): void {
  rewrite = undefined;
  if (tail === undefined || hint === undefined) return;
  write(withLogTail(hint + currentInFlight(), tail.map((t) => t.line)));
}

/** One generation a pipeline worker runs (a batch the engine dispatched): its ids and shape, never its prompts. */
export interface InFlight {
  worker: number;
  images: number;
  requests: number;
  width: number;
  height: number;
  steps: number;
  /** The request's scheduler name; absent: the model's own. */
  scheduler?: string | undefined;
  mode?: 'img2img' | 'inpaint' | undefined;
  /** Its LoRA adapters, `name:scale,…`; absent: the base model. */
  loras?: string | undefined;
  /** A worker's warm-up (the boot's, no client request). */
  warmup?: boolean;
  /** Identical requests joined to its requests' generations (the result cache's), waiting for its images. */
  joined?: number;
  /** performance.now() at its dispatch. */
  startedAt: number;
  /** Its last UNet step done, of how many (0 before the first: text encoders, the input image's encoding). */
  step: number;
  of: number;
  /** Past its UNet steps: the VAE decodes its images. */
  decoding: boolean;
  /** Its requests' X-Request-IDs, and trace ids (as the log's `inference request` line has them). */
  requestIds: readonly string[];
  traceIds: readonly string[];
}

/** What the pipeline workers run, and how many requests wait for one. */
export interface InFlightNow {
  generations: readonly InFlight[];
  queued: number;
}

/** What parts the hint from the generations in flight. */
export const IN_FLIGHT_HEADER = '\nin flight at ';
/** The in-flight section's bytes at most: the log's lines keep the rest of the message. */
export const IN_FLIGHT_LIMIT = 512;
/** A batch's entry names this many ids of each kind, each cut to ID_CHARS characters, and counts the rest. */
const IDS_SHOWN = 2;
const ID_CHARS = 40;

/** A LoRA set's `name:scale,…` is cut to this many characters. */
const LORAS_CHARS = 60;

/** `text` in at most `chars` characters, the last an ellipsis where it was cut. */
const cutChars = (text: string, chars: number) => (text.length > chars ? `${text.slice(0, chars - 1)}…` : text);
const someIds = (ids: readonly string[]) => ids.slice(0, IDS_SHOWN).map((id) => cutChars(id, ID_CHARS)).join(',') + (ids.length > IDS_SHOWN ? `,+${ids.length - IDS_SHOWN}` : '');

/** One generation as a line of `key=value`s; `now` (performance.now()) is `wall`, a time since the epoch. */
function inFlightLine(g: InFlight, now: number, wall: number): string {
  // The size as OpenAI's `size` has it, width first.
  const parts = [`worker=${g.worker}`, `images=${g.images}`, `size=${g.width}x${g.height}`, `steps=${g.steps}`];
  if (g.scheduler !== undefined) parts.push(`scheduler=${g.scheduler}`);
  if (g.mode !== undefined) parts.push(`mode=${g.mode}`);
  if (g.loras) parts.push(`loras=${cutChars(g.loras, LORAS_CHARS)}`);
  if (g.warmup) parts.push('warmup');
  else parts.push(`requests=${g.requests}`);
  if (g.joined) parts.push(`joined=${g.joined}`);
  if (g.requestIds.length > 0) parts.push(`ids=${someIds(g.requestIds)}`);
  if (g.traceIds.length > 0 && g.requestIds.length === 0) parts.push(`traces=${someIds(g.traceIds)}`);
  // Its start as the log's times are written, and its stage when the message was written (the header's time).
  parts.push(`since=${new Date(wall - Math.max(0, now - g.startedAt)).toISOString()}`, g.decoding ? 'decoding' : `step=${g.step}/${g.of}`);
  return parts.join(' ');
}

/**
 * The in-flight section: IN_FLIGHT_HEADER and the wall-clock time, the count of queued requests, then a line per
 * generation, the first that fit in IN_FLIGHT_LIMIT bytes (the others counted); '' when nothing runs or waits.
 * `now`: performance.now() (the generations' clock), `wall`: the same instant as a Date.
 */
export function inFlightSection(state: InFlightNow, now: number, wall: Date): string {
  const { generations, queued } = state;
  if (generations.length === 0 && queued === 0) return '';
  let text = `${IN_FLIGHT_HEADER}${wall.toISOString()}: ${generations.length} generation${generations.length === 1 ? '' : 's'}, ${queued} request${queued === 1 ? '' : 's'} queued`;
  for (let i = 0; i < generations.length; i++) {
    const line = `\n${inFlightLine(generations[i]!, now, wall.getTime())}`;
    const left = generations.length - i - 1;
    // Room kept for the count of those left out, unless this is the last.
    const room = IN_FLIGHT_LIMIT - Buffer.byteLength(text) - (left > 0 ? Buffer.byteLength(`\n… ${left} more`) : 0);
    if (Buffer.byteLength(line) > room) {
      // The first is shown, its start at least (long ids of many bytes).
      if (i === 0) text += cutTo(line, room) + (left > 0 ? `\n… ${left} more` : '');
      else text += `\n… ${generations.length - i} more`;
      break;
    }
    text += line;
  }
  return text;
}

/** The in-flight section now ('' when nothing runs, or what says so cannot be read). */
function currentInFlight(): string {
  if (inFlight === undefined) return '';
  try {
    return inFlightSection(inFlight(), performance.now(), new Date());
  } catch {
    // A timer's write that threw would end the process: the message goes on without the section.
    return '';
  }
}

/**
 * The generations the pipeline workers run changed (`state` says what they are, read when the message is written).
 * While the hint stands: one that started (or reached its VAE decode, where a big batch's memory peaks) is written at
 * once where nothing was written in the last TAIL_REWRITE_MS, so that an OOM kill early in it finds it there, else
 * with the next rewrite; one that ended is dropped by the next rewrite. Never more often than a rewrite a second;
 * nothing where no message is written.
 */
export function generationsChanged(state: () => InFlightNow, started: boolean): void {
  if (tail === undefined) return;
  inFlight = state;
  if (started && performance.now() - lastWrite >= TAIL_REWRITE_MS) {
    clearTimeout(rewrite);
    writeTail();
    return;
  }
  rewrite ??= setTimeout(writeTail, TAIL_REWRITE_MS).unref();
}

/**
 * Sessions are about to map model weights from `where` (a folder named for people: an entry relative to the cache, or
 * a path; never a credential). A read of a mapped page that the volume fails is SIGBUS, which ends the process before
 * it can say anything: the hint says what such an end means, and from then on the log's last lines follow it
 * (logLine), as the kubelet would have shown them in its place. Once per folder, each folder named; not over a fatal reason, nor after a
 * graceful stop.
 */
export function mappedWeightsHint(where: string): void {
  if (fatal || cleared || hinted.includes(where)) return;
  hinted.push(where);
  hint = `if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from ${hinted.join(' or ')} failed, the volume returned an I/O error; check the volume's health (NFS server, PVC, disk)`;
  // Lines are kept only where the message is written.
  if (tail === undefined && terminationPath() !== undefined) tail = [];
  clearTimeout(rewrite);
  rewrite = undefined;
  write(withLogTail(hint + currentInFlight(), tail?.map((t) => t.line) ?? []));
}

/** A graceful stop (exit 0): no message, unless a fatal reason was written. */
export function clearTerminationMessage(): void {
  if (fatal) return;
  cleared = true;
  dropTail();
  write('');
}
