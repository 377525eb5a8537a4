import { spawn } from 'node:child_process';
import path from 'node:path';

/** The built warm-up CLI. */
export const WARMUP_CLI = path.resolve('dist/warmup/main.js');

export interface CliRun { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

/**
 * The warm-up CLI with `args`, in an environment of PATH and `env` alone (nothing of the test's own); resolves once it
 * has exited. `onSpawn` gets a way to signal it while it runs, and its pid.
 */
export function runWarmupCli(args: string[], env: Record<string, string>, onSpawn?: (kill: (s: NodeJS.Signals) => void, pid: number) => void): Promise<CliRun> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [WARMUP_CLI, ...args], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 }));
    onSpawn?.((s) => child.kill(s), child.pid!);
  });
}
