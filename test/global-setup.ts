/**
 * One temp folder for a whole `vitest` run, removed when the run ends: the demo fixtures and the shared cache each
 * test file makes live under it (test/fixtures/index.ts, helpers/server.ts). Worker processes end without running
 * their 'exit' handlers, so folders they removed themselves were left behind, some 30 MB per file and run.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export default function setup(): () => void {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'dr-test-run-'));
  // Read by the test files' processes, which inherit this environment.
  process.env.DR_TEST_RUN_DIR = dir;
  return () => rmSync(dir, { recursive: true, force: true });
}
