import { execFileSync } from 'node:child_process';
import { mkdirSync, rmdirSync } from 'node:fs';
import { afterAll } from 'vitest';

/**
 * Mounts a tmpfs of `size` (mount's `size=`, e.g. `1m`) at `dir` where this process may (root with CAP_SYS_ADMIN), and
 * unmounts it after the tests of the calling suite; false where it may not, for `it.skipIf(!mounted)`. A real volume
 * that fills up or turns read-only, where an injected error would only imitate one.
 */
export function tmpfsForTests(dir: string, size: string): boolean {
  let mounted = false;
  try {
    if (process.getuid?.() === 0) {
      mkdirSync(dir, { recursive: true });
      execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'ignore' });
      mounted = true;
    }
  } catch {
    /* not allowed here (no CAP_SYS_ADMIN) */
  }
  afterAll(() => {
    if (!mounted) return;
    execFileSync('umount', [dir]);
    // The mount point too: left in os.tmpdir() it piled up, one per run.
    rmdirSync(dir);
  });
  return mounted;
}
