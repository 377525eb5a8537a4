import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // One temp folder per run, removed at its end (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Many cases wait on timers, stalls and heartbeats: three files at a time use two cores better than two
    // (docs/DESIGN.md#tests: 729 s against 825 s, CPU 178 % against 147 %).
    maxWorkers: 3,
    fileParallelism: true,
    // As the runtime's own entry points do (src/main.ts, warmup/main.ts): the SDK's Node 20 notice is not a test result,
    // and ONNX Runtime loaded in a test's own process writes no telemetry (a mat-debug-<pid>.log in /tmp per process).
    // One intra-op thread per session, as the runtime gives each of several workers (runtime/workers.ts): test files
    // generate side by side on two cores, and ONNX Runtime's default of a spinning thread per core in each put four or
    // six on two (two servers generating at once took 2.0 s each where one alone took 0.9 s; 1.2 s with one thread).
    // The thread count is the machine's anyway, so no test may depend on it.
    env: { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true', ORT_DISABLE_TELEMETRY: '1', ORT_INTRA_OP_THREADS: '1' },
  },
});
