import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { until } from './server.js';

/** The built lease module, which the child imports (a test builds dist/ when it is older than the sources). */
export const LEASE_JS = path.resolve('dist/src/storage/lease.js');
const LOCK_JS = path.resolve('dist/src/storage/lock.js');
const ENTRIES_JS = path.resolve('dist/src/storage/entries.js');
const SKEW_CLOCK = path.resolve('test/helpers/skew-clock.cjs');

/** Builds dist/ when the lease or lock module there is missing or older than its sources (the children import it). */
export function buildIfStale(): void {
  const age = (f: string) => (existsSync(f) ? statSync(f).mtimeMs : 0);
  const srcs = ['lease', 'lock', 'cache', 'entries'].map((m) => age(path.resolve(`src/storage/${m}.ts`)));
  if (Math.min(age(LEASE_JS), age(LOCK_JS), age(ENTRIES_JS)) < Math.max(...srcs)) spawnSync(process.execPath, [path.resolve('node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { stdio: 'ignore' });
}

/**
 * A process other than this one that leases `entryDir`, as a serving pod does; SIGTERM releases it. `once`: it leases
 * only once the path `once.gone` is gone, then creates the file `once.flag` (for a caller that blocks its event loop
 * until then), and resolves at once.
 */
export async function leaseInChild(entryDir: string, once?: { gone: string; flag: string }): Promise<ChildProcess> {
  const wait = once ? `const { existsSync, writeFileSync } = await import('node:fs'); while (existsSync(process.argv[2])) await new Promise((r) => setTimeout(r, 2));` : '';
  const script = `${wait} const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); const l = await leaseEntry(process.argv[1]);
    ${once ? 'writeFileSync(process.argv[3], "");' : ''}
    process.on('SIGTERM', async () => { await l.release(); process.exit(0); }); process.stdout.write('leased\\n'); setInterval(() => {}, 60_000);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, entryDir, ...(once ? [once.gone, once.flag] : [])], { stdio: ['ignore', 'pipe', 'inherit'] });
  if (once) return child;
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (c) => String(c).includes('leased') && resolve());
    child.on('exit', (code) => reject(new Error(`lease child exited ${code}`)));
  });
  return child;
}

/**
 * A process on a node whose clock is `skewMs` off (skew-clock.cjs: its Date moves, its timers do not) that holds the
 * lock `target` (acquireLock, as a fill does) or a lease on the entry `target` (leaseEntry, as a server does), beating
 * every `heartbeatMs` with the holder's own code: each heartbeat stamps the file with that clock. Resolves once the
 * file's mtime shows the skew (a heartbeat has run), with the file; SIGKILL leaves the file as it was.
 */
export async function skewedHolder(kind: 'lock' | 'lease', target: string, skewMs: number, heartbeatMs: number): Promise<{ child: ChildProcess; file: string }> {
  const script = kind === 'lock'
    ? `const { acquireLock } = await import(${JSON.stringify(LOCK_JS)}); const h = await acquireLock(process.argv[1], { heartbeatMs: ${heartbeatMs} });`
    : `const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); const h = await leaseEntry(process.argv[1], { heartbeatMs: ${heartbeatMs} });`;
  const child = spawn(process.execPath, ['--require', SKEW_CLOCK, '--input-type=module', '-e', `${script} process.stdout.write('holds ' + h.path + '\\n'); setInterval(() => {}, 60_000);`, target],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, TEST_CLOCK_SKEW_MS: String(skewMs) } });
  const file = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (c) => {
      const m = /holds (.+)\n/.exec(out += c);
      if (m) resolve(m[1]!);
    });
    child.on('exit', (code) => reject(new Error(`${kind} child exited ${code}`)));
  });
  await until(() => Math.abs(statSync(file).mtimeMs - (Date.now() + skewMs)) < Math.abs(skewMs) / 2, 10_000);
  return { child, file };
}

/**
 * An evictor on a node whose clock is `skewMs` off (skew-clock.cjs): a process that removes the entry `name` from
 * `cacheDir` (entries.ts removeEntry; `orphans`: the lease folders of entries not there, emptyOrphanLeases) and exits;
 * `outcome` resolves to what that returned.
 */
export function evictInChild(cacheDir: string, name: string, skewMs: number, what: 'entry' | 'orphans' = 'entry'): { child: ChildProcess; outcome: Promise<unknown> } {
  const call = what === 'entry' ? 'removeEntry(process.argv[1], process.argv[2])' : 'emptyOrphanLeases(process.argv[1])';
  const script = `const { removeEntry, emptyOrphanLeases } = await import(${JSON.stringify(ENTRIES_JS)});
    process.stdout.write(JSON.stringify(await ${call}) + '\\n');`;
  const child = spawn(process.execPath, ['--require', SKEW_CLOCK, '--input-type=module', '-e', script, cacheDir, name],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, TEST_CLOCK_SKEW_MS: String(skewMs) } });
  let out = '';
  child.stdout!.on('data', (c) => (out += c));
  const outcome = new Promise((resolve, reject) => child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`evictor exited ${code}`)))));
  return { child, outcome };
}
