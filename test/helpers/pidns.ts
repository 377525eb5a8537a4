import { readFileSync } from 'node:fs';
import { pidAlive } from '../../src/storage/lock.js';

/**
 * A pid for the first process of a new pid namespace (written to its ns_last_pid, which gives the next pid) that no
 * process of this namespace has, nor is about to take: this namespace hands out pids in increasing order and wraps,
 * so one a few thousand behind its last is the last it reaches again. A random one could be taken seconds later on a
 * busy machine, and a test's premise (that pid dead here) would fail.
 */
export function pidBehindLast(): number {
  const max = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
  const last = Number(readFileSync('/proc/sys/kernel/ns_last_pid', 'utf8'));
  const span = max - 1000;
  let pid = 1000 + ((last - 3000 - Math.floor(Math.random() * 1000) - 1000 + 2 * span) % span);
  while (pidAlive(pid + 1)) pid = pid + 1 >= max - 2 ? 1000 : pid + 1;
  return pid;
}
