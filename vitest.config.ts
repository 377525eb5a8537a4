import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // One temp folder per run, removed at its end (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Server and S3 suites start real processes; two cores do not gain from more parallel files.
    maxWorkers: 2,
    fileParallelism: true,
    // As the runtime's own entry points do (src/main.ts, warmup/main.ts): the SDK's Node 20 notice is not a test result,
    // and ONNX Runtime loaded in a test's own process writes no telemetry (a mat-debug-<pid>.log in /tmp per process).
    env: { AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true', ORT_DISABLE_TELEMETRY: '1' },
  },
});
