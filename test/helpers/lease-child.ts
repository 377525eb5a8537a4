import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';

/** The built lease module, which the child imports (a test builds dist/ when it is older than the sources). */
export const LEASE_JS = path.resolve('dist/src/storage/lease.js');

/** A process other than this one that leases `entryDir`, as a serving pod does; SIGTERM releases it. */
export async function leaseInChild(entryDir: string): Promise<ChildProcess> {
  const script = `const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); const l = await leaseEntry(process.argv[1]);
    process.on('SIGTERM', async () => { await l.release(); process.exit(0); }); process.stdout.write('leased\\n'); setInterval(() => {}, 60_000);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, entryDir], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (c) => String(c).includes('leased') && resolve());
    child.on('exit', (code) => reject(new Error(`lease child exited ${code}`)));
  });
  return child;
}
