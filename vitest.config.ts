import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // One temp folder per run, removed at its end (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Server and S3 suites start real processes. Three files at a time were faster (729 s against 825 s) but broke a
    // case with a short stall bound in one of four runs (docs/DESIGN.md#tests).
    maxWorkers: 2,
    fileParallelism: true,
    // As the runtime's own entry points do (src/main.ts, warmup/main.ts): the SDK's Node 20 notice is not a test result,
    // and ONNX Runtime loaded in a test's own process writes no telemetry (a mat-debug-<pid>.log in /tmp per process).
    // One intra-op thread per session, as the runtime gives each of several workers (runtime/workers.ts): test files
    // generate side by side on two cores, and ONNX Runtime's default of a spinning thread per core in each put four on
    // two (two servers generating at once took 2.0 s each where one alone took 0.9 s; 1.2 s with one thread).
    // The thread count is the machine's anyway, so no test may depend on it.
    env: { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true', ORT_DISABLE_TELEMETRY: '1', ORT_INTRA_OP_THREADS: '1' },
  },
});
