/**
 * @module The container's termination message: Kubernetes shows the content of the file at the container's
 * terminationMessagePath (default /dev/termination-log, which the kubelet mounts into every container) as the last
 * state's `message` in the pod status (`kubectl describe pod`). The process writes there the same line it ends with on
 * stderr before a fatal exit; while model weights mapped from a volume may be read, a hint for the one end it cannot
 * report itself (SIGBUS, exit 135), followed by the log's last lines; nothing after a graceful stop.
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
  if (Buffer.byteLength(text) <= TERMINATION_MESSAGE_LIMIT) return text;
  const room = TERMINATION_MESSAGE_LIMIT - Buffer.byteLength(CUT);
  const buf = Buffer.from(text);
  let end = room;
  // Back to the first byte of a character (continuation bytes are 10xxxxxx).
  while (end > 0 && (buf[end]! & 0xc0) === 0x80) end--;
  return buf.subarray(0, end).toString() + CUT;
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

function write(text: string): void {
  const file = terminationPath();
  if (file === undefined) return;
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
  write(withLogTail(hint, tail.map((t) => t.line)));
}

/**
 * Sessions are about to map model weights from `where` (a folder named for people: relative to the cache, never a
 * credential). A read of a mapped page that the volume fails is SIGBUS, which ends the process before it can say
 * anything: the hint says what such an end means, and from then on the log's last lines follow it (logLine), as the
 * kubelet would have shown them in its place. Once per folder, each folder named; not over a fatal reason, nor after a
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
  write(withLogTail(hint, tail?.map((t) => t.line) ?? []));
}

/** A graceful stop (exit 0): no message, unless a fatal reason was written. */
export function clearTerminationMessage(): void {
  if (fatal) return;
  cleared = true;
  dropTail();
  write('');
}
