/**
 * @module The container's termination message: Kubernetes shows the content of the file at the container's
 * terminationMessagePath (default /dev/termination-log, which the kubelet mounts into every container) as the last
 * state's `message` in the pod status (`kubectl describe pod`). The process writes there the same line it ends with on
 * stderr before a fatal exit; while model weights mapped from a volume may be read, a hint for the one end it cannot
 * report itself (SIGBUS, exit 135); nothing after a graceful stop.
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

/** Whether the file holds a fatal reason (which a later hint or a graceful stop's clearing must not replace). */
let fatal = false;
/** The folder of the last hint written, so that a hint is written once per model folder. */
let hinted: string | undefined;

function write(text: string): void {
  const file = terminationPath();
  if (file === undefined) return;
  try {
    writeFileSync(file, fitTerminationMessage(text));
  } catch {
    // The exit it explains goes on: a message that cannot be written is no reason to end otherwise.
  }
}

/** Why the process is about to end (one line, as on stderr, without its newline); synchronous, never throws. */
export function terminationReason(line: string): void {
  fatal = true;
  write(line.replace(/\s*\n\s*/g, ' ').trim());
}

/**
 * Sessions are about to map model weights from `where` (a folder named for people: relative to the cache, never a
 * credential). A read of a mapped page that the volume fails is SIGBUS, which ends the process before it can say
 * anything: the hint says what such an end means. Once per folder; not over a fatal reason.
 */
export function mappedWeightsHint(where: string): void {
  if (fatal || hinted === where) return;
  hinted = where;
  write(`if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from ${where} failed, the volume returned an I/O error; check the volume's health (NFS server, PVC, disk)`);
}

/** A graceful stop (exit 0): no message, unless a fatal reason was written. */
export function clearTerminationMessage(): void {
  if (fatal) return;
  write('');
}
