/**
 * A volume that stops answering for real: test/native/stuck-fs.c, a FUSE file system passing through to a backing
 * folder (failing the requests it is told to with EIO, as a disk or network volume's read error) until told to stop, then holding every request (every call on it, a stat included, waits for good, as on an
 * NFS server gone away under a hard mount; a dying caller's call fails, as NFS's killable waits do). Built here with cc; where there is none, or FUSE cannot be mounted (no
 * /dev/fuse, not root), stuckFsUnavailable() says why and the tests that need it skip.
 *
 * Nothing of the test's own process may touch a hung mount: a call from it would wait for good as well. Each mount is
 * released after its test (stuckFsForTests): the daemon ends the connection, so that every call still waiting fails
 * (ENOTCONN), and detaches the mount. A mount whose daemon died with its test process is swept at the next start.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach } from 'vitest';
import { alive, ROOT } from './server.js';

const SOURCE = path.join(ROOT, 'test', 'native', 'stuck-fs.c');
/** The file system type it mounts (`fuse.` + its subtype) and the prefix of its mount's source (`dr-stuck-fs:<pid>`). */
const FS_TYPE = 'fuse.dr-stuck-fs';

export interface StuckFsOptions {
  /** `op:name`: answer the first request `op` (lookup, getattr, open, read, write, create, …) naming `name` (`*`: any), then hang. */
  hangAfter?: string;
  /** Answer the `hangAfterTimes`-th such request (not the first), then hang. */
  hangAfterTimes?: number;
  /** `op:name`: fail the first request `op` naming `name` with EIO (a read error of the volume's device), then pass through. */
  eio?: string;
  /** Fail the first `eioTimes` such requests (not only the first). */
  eioTimes?: number;
  /** Fail them with this errno instead of EIO (1: EPERM, a volume that refuses a chmod). */
  eioErrno?: number;
  /** Each answer this late, until answer(). */
  delayMs?: number;
}

export interface StuckFs {
  /** The mount point. */
  readonly dir: string;
  readonly backing: string;
  readonly pid: number;
  /** Stops answering now; resolves once the daemon reads no more requests. */
  hang(): Promise<void>;
  /** Answers again (what it held first), at once (delayMs no longer), and fails no more requests with EIO. */
  answer(): void;
  /** Resolves once it has stopped answering (by hang() or hangAfter). */
  readonly hung: Promise<void>;
  /** Ends the daemon (calls still waiting fail with ENOTCONN) and detaches the mount; idempotent. */
  release(): Promise<void>;
}

let binary: string | undefined;
let unavailable: string | undefined;

/** Why a stuck-fs mount cannot be had here (undefined: it can), found once per test process. */
export function stuckFsUnavailable(): string | undefined {
  if (binary !== undefined || unavailable !== undefined) return unavailable;
  sweepStuckMounts();
  const dir = mkdtempSync(path.join(process.env.DR_TEST_RUN_DIR ?? os.tmpdir(), 'dr-stuck-fs-'));
  const out = path.join(dir, 'stuck-fs');
  const cc = process.env.CC ?? 'cc';
  const built = spawnSync(cc, ['-std=c11', '-O2', '-Wall', '-Wextra', '-o', out, SOURCE], { encoding: 'utf8' });
  if (built.error || built.status !== 0) {
    unavailable = `no stuck-fs: ${cc} could not build test/native/stuck-fs.c (${built.error?.message ?? built.stderr.trim()})`;
  } else if (!existsSync('/dev/fuse')) {
    unavailable = 'no stuck-fs: /dev/fuse is missing';
  } else {
    const mnt = path.join(dir, 'probe');
    mkdirSync(mnt);
    const probe = spawnSync(out, [dir, mnt, '--probe'], { encoding: 'utf8', timeout: 10_000 });
    if (probe.status === 0) binary = out;
    else unavailable = `no stuck-fs: a FUSE mount is not allowed here (${probe.stderr.trim() || probe.error?.message || `exit ${probe.status}`})`;
  }
  if (unavailable) process.stderr.write(`${unavailable}; the tests on a hung mount skip\n`);
  return unavailable;
}

const live = new Set<StuckFs>();

/**
 * Releases every mount this process has after each test of the calling suite, other suites' included: not for a file
 * whose cases mount side by side (each releases its own there, onTestFinished).
 */
export function stuckFsForTests(): void {
  afterEach(async () => {
    for (const m of [...live]) await m.release();
  });
}

/** Mounts `backing` at `dir` (made if missing) through stuck-fs, answering until told not to. */
export async function mountStuckFs(backing: string, dir: string, opts: StuckFsOptions = {}): Promise<StuckFs> {
  const why = stuckFsUnavailable();
  if (why !== undefined) throw new Error(why);
  mkdirSync(dir, { recursive: true });
  const args = [backing, dir, ...(opts.hangAfter ? ['--hang-after', opts.hangAfter, ...(opts.hangAfterTimes ? ['--times', String(opts.hangAfterTimes)] : [])] : []), ...(opts.eio ? ['--eio', opts.eio, ...(opts.eioTimes ? ['--eio-times', String(opts.eioTimes)] : []), ...(opts.eioErrno ? ['--eio-errno', String(opts.eioErrno)] : [])] : []), ...(opts.delayMs ? ['--delay-ms', String(opts.delayMs)] : [])];
  // STUCK_FS_LOG=1: each request it reads, on the test's stderr (what the runtime does on the volume).
  const log = process.env.STUCK_FS_LOG === '1';
  const proc: ChildProcess = spawn(binary!, [...args, ...(log ? ['--log'] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.setEncoding('utf8').on('data', (c: string) => (log ? process.stderr.write(c) : (stderr += c)));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const said = (what: string) =>
    new Promise<void>((resolve, reject) => {
      let buf = '';
      const on = (c: string) => {
        buf += c;
        if (buf.split('\n').includes(what)) {
          proc.stdout!.off('data', on);
          resolve();
        }
      };
      proc.stdout!.setEncoding('utf8').on('data', on);
      void exited.then(() => reject(new Error(`stuck-fs exited before saying "${what}": ${stderr.trim()}`)));
    });
  const ready = said('ready');
  const hung = said('hung');
  hung.catch(() => {});
  await ready;
  let released: Promise<void> | undefined;
  const m: StuckFs = {
    dir,
    backing,
    pid: proc.pid!,
    hung,
    hang: async () => {
      proc.kill('SIGUSR1');
      await hung;
    },
    answer: () => void proc.kill('SIGUSR2'),
    release: () =>
      (released ??= (async () => {
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(timer);
        // The daemon detaches its mount as it ends; not if it was killed.
        detach(dir);
        live.delete(m);
      })()),
  };
  live.add(m);
  return m;
}

/** Lazily unmounts `dir` if something is mounted there (a mount whose daemon is gone answers every call at once). */
function detach(dir: string): void {
  if (!stuckMounts().some((m) => m.dir === dir)) return;
  execFileSync('umount', ['-l', dir], { stdio: 'ignore' });
}

/** The stuck-fs mounts of this machine, with their daemon's pid. */
function stuckMounts(): Array<{ dir: string; pid: number }> {
  const out: Array<{ dir: string; pid: number }> = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER-OPTIONS
    const [pre, post] = line.split(' - ');
    const [type, source] = (post ?? '').split(' ');
    if (type !== FS_TYPE || !source?.startsWith('dr-stuck-fs:')) continue;
    out.push({ dir: pre!.split(' ')[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))), pid: Number(source.slice('dr-stuck-fs:'.length)) });
  }
  return out;
}

/**
 * Detaches the stuck-fs mounts left by test processes that died (their daemon died with them): a mount in use by a
 * running test, whose daemon lives, is left alone.
 */
export function sweepStuckMounts(): void {
  for (const m of stuckMounts()) {
    if (alive(m.pid)) continue;
    try {
      execFileSync('umount', ['-l', m.dir], { stdio: 'ignore' });
    } catch {
      // Already gone.
    }
  }
}
