/** The environment contract: defaults, every bad variable named at once, frozen result, masked description. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, describeConfig, loadConfig, misspelledVariables, VARIABLES, visibleGpus } from '../src/config.js';
import { applyTf32, workerDevice, workerInit } from '../src/runtime/workers.js';
import { ensureDemoModel } from '../src/demo/index.js';
import { sharedCacheDir, startServer } from './helpers/server.js';
import { mountStuckFs, stuckFsUnavailable } from './helpers/stuck-fs.js';

describe('loadConfig', () => {
  it('gives the documented defaults', () => {
    const c = loadConfig({});
    expect(c.port).toBe(8080);
    expect(c.modelName).toBe('model');
    expect(c.executionProvider).toBe('auto');
    expect([c.workers, c.maxBatchSize]).toEqual([1, 1]);
    expect(c.s3.partSize).toBe(8 * 1024 * 1024);
    expect(c.storageUri).toBeUndefined();
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.s3)).toBe(true);
  });

  it('names every bad variable in one error', () => {
    let err: unknown;
    try {
      loadConfig({ PORT: 'abc', MAX_BATCH_SIZE: '0', EXECUTION_PROVIDER: 'tpu', S3_VERIFY_SSL: 'maybe' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const msg = (err as Error).message;
    for (const k of ['PORT', 'MAX_BATCH_SIZE', 'EXECUTION_PROVIDER', 'S3_VERIFY_SSL']) expect(msg).toContain(k);
    expect((err as ConfigError).problems).toHaveLength(4);
  });

  it('names the provider meant for a device\'s name or ONNX Runtime\'s provider name', () => {
    // Before: only the list, with nothing saying that a GPU is cuda here.
    expect(() => loadConfig({ EXECUTION_PROVIDER: 'gpu' })).toThrow('EXECUTION_PROVIDER must be one of auto, cuda, cpu, got "gpu"; did you mean cuda?');
    expect(() => loadConfig({ EXECUTION_PROVIDER: 'CPUExecutionProvider' })).toThrow('EXECUTION_PROVIDER must be one of auto, cuda, cpu, got "CPUExecutionProvider"; did you mean cpu?');
    expect(() => loadConfig({ EXECUTION_PROVIDER: 'tpu' })).toThrow(/: EXECUTION_PROVIDER must be one of auto, cuda, cpu, got "tpu"$/);
  });

  it('names a bad S3_USER_VIRTUAL_BUCKET even with no endpoint, or with S3_FORCE_PATH_STYLE set, where it does not apply', () => {
    for (const env of [{}, { S3_FORCE_PATH_STYLE: '1', AWS_ENDPOINT_URL: 'http://minio:9000' }, { AWS_ENDPOINT_URL: 'http://minio:9000' }]) {
      expect(() => loadConfig({ ...env, S3_USER_VIRTUAL_BUCKET: 'maybe' })).toThrow('S3_USER_VIRTUAL_BUCKET must be true or false (1/0), got "maybe"');
    }
    expect(loadConfig({ AWS_ENDPOINT_URL: 'http://minio:9000', S3_USER_VIRTUAL_BUCKET: 'yes' }).s3.forcePathStyle).toBe(false);
    expect(loadConfig({ AWS_ENDPOINT_URL: 'http://minio:9000' }).s3.forcePathStyle).toBe(true);
  });

  it("LOG_LEVEL takes pino's names in any case, and Python's WARNING and CRITICAL as warn and fatal", () => {
    expect(['DEBUG', 'WARNING', 'warning', 'CRITICAL', 'Error', 'silent'].map((l) => loadConfig({ LOG_LEVEL: l }).logLevel)).toEqual(['debug', 'warn', 'warn', 'fatal', 'error', 'silent']);
    expect(() => loadConfig({ LOG_LEVEL: 'NOTSET' })).toThrow(/LOG_LEVEL must be one of trace, debug, info, warn, error, fatal, silent, got "NOTSET"/);
  });

  it('DEFAULT_SCHEDULER is a name (checked against the model at boot), DEFAULT_STEPS at most MAX_STEPS', () => {
    expect(loadConfig({ DEFAULT_SCHEDULER: 'dpmpp_2m_karras', DEFAULT_STEPS: '25' })).toMatchObject({ defaultScheduler: 'dpmpp_2m_karras', defaultSteps: 25 });
    expect(loadConfig({})).toMatchObject({ defaultScheduler: undefined, defaultSteps: undefined });
    // A sampler label passes the form; the server names the scheduler meant at start (below).
    expect(loadConfig({ DEFAULT_SCHEDULER: 'DPM++ 2M Karras' }).defaultScheduler).toBe('DPM++ 2M Karras');
    expect(() => loadConfig({ DEFAULT_SCHEDULER: 'euler\nlevel=error' })).toThrow(/DEFAULT_SCHEDULER must be a scheduler name such as dpmpp_2m_karras \(at most 64 printable ASCII characters\), got "euler\\nlevel=error"/);
    expect(() => loadConfig({ DEFAULT_SCHEDULER: 'e'.repeat(65) })).toThrow(/DEFAULT_SCHEDULER must be a scheduler name/);
    expect(() => loadConfig({ DEFAULT_STEPS: '600' })).toThrow(/DEFAULT_STEPS must be an integer from 1 to 500, got "600"/);
    expect([loadConfig({ DEFAULT_GUIDANCE: '0' }).defaultGuidance, loadConfig({ DEFAULT_GUIDANCE: '7.5' }).defaultGuidance, loadConfig({}).defaultGuidance]).toEqual([0, 7.5, undefined]);
    expect(() => loadConfig({ DEFAULT_GUIDANCE: '101' })).toThrow(/DEFAULT_GUIDANCE must be a number from 0 to 100, got "101"/);
    expect(loadConfig({ DEFAULT_STEPS: '600', MAX_STEPS: '1000' }).defaultSteps).toBe(600);
  });

  it('OUTPUT_FORMAT takes jpg for jpeg, as a request\'s output_format does (it exited 2 while requests took it)', () => {
    expect(loadConfig({ OUTPUT_FORMAT: 'jpg' }).defaultOutputFormat).toBe('jpeg');
    expect(loadConfig({ OUTPUT_FORMAT: ' JPG ' }).defaultOutputFormat).toBe('jpeg');
    expect(() => loadConfig({ OUTPUT_FORMAT: 'gif' })).toThrow('OUTPUT_FORMAT must be one of png, jpeg, webp, got "gif"');
  });

  it('reads the S3 endpoint the way KServe does', () => {
    expect(loadConfig({ S3_ENDPOINT: 'minio:9000', S3_USE_HTTPS: '0' }).s3.endpoint).toBe('http://minio:9000');
    expect(loadConfig({ AWS_S3_ENDPOINT: 'https://s3.example.com/' }).s3.endpoint).toBe('https://s3.example.com');
    const c = loadConfig({ AWS_ENDPOINT_URL: 'http://127.0.0.1:9000', S3_ENDPOINT: 'http://ignored' });
    expect(c.s3.endpoint).toBe('http://127.0.0.1:9000');
    expect(c.s3.forcePathStyle).toBe(true);
    expect(loadConfig({}).s3.forcePathStyle).toBe(false);
    expect(loadConfig({ S3_VERIFY_SSL: 'false' }).s3.verifySsl).toBe(false);
    // One spelling per endpoint, so one cache entry per model whatever the spelling.
    for (const e of ['HTTP://Minio.Example:80/', 'http://minio.example', 'http://minio.example:80//']) {
      expect(loadConfig({ AWS_ENDPOINT_URL: e }).s3.endpoint, e).toBe('http://minio.example');
    }
    expect(loadConfig({ AWS_ENDPOINT_URL: 'https://GW.example:443/S3/' }).s3.endpoint).toBe('https://gw.example/S3');
    expect(loadConfig({ AWS_ENDPOINT_URL: 'http://[::1]:9000' }).s3.endpoint).toBe('http://[::1]:9000');
  });

  it('S3_TRANSPORT: the AWS SDK unless `lite` is asked for; anything else is named', () => {
    expect(loadConfig({}).s3.transport).toBe('sdk');
    expect(loadConfig({ S3_TRANSPORT: 'Lite' }).s3.transport).toBe('lite');
    expect(() => loadConfig({ S3_TRANSPORT: 'curl' })).toThrow('S3_TRANSPORT must be one of sdk, lite, got "curl"');
  });

  it('WARMUP_VAE_ENCODER: before ready unless asked for after; the worker is told; anything else is named', () => {
    expect(loadConfig({}).warmupVaeEncoder).toBe('before-ready');
    expect(workerInit(loadConfig({}), 0).vaeEncoderWarmup).toBe('before-ready');
    const after = loadConfig({ WARMUP_VAE_ENCODER: 'after-ready' });
    expect(after.warmupVaeEncoder).toBe('after-ready');
    expect(workerInit(after, 0).vaeEncoderWarmup).toBe('after-ready');
    // No warm-up, no end of it to wait for: the encoder is primed with the others.
    expect(workerInit(loadConfig({ WARMUP_VAE_ENCODER: 'after-ready', WARMUP_STEPS: '0' }), 0).vaeEncoderWarmup).toBe('before-ready');
    expect(() => loadConfig({ WARMUP_VAE_ENCODER: 'never' })).toThrow('WARMUP_VAE_ENCODER must be one of before-ready, after-ready, got "never"');
  });

  it('AUX_THREADS: auto unless on or off is asked for; the worker is told; anything else is named', () => {
    expect(loadConfig({}).auxThreads).toBe('auto');
    expect(workerInit(loadConfig({}), 0).auxThreads).toBe('auto');
    expect(workerInit(loadConfig({ AUX_THREADS: 'on' }), 0).auxThreads).toBe('on');
    expect(workerInit(loadConfig({ AUX_THREADS: 'OFF' }), 0).auxThreads).toBe('off');
    expect(() => loadConfig({ AUX_THREADS: 'yes' })).toThrow('AUX_THREADS must be one of auto, on, off, got "yes"');
  });

  it('values as Kubernetes hands them over: surrounding whitespace is dropped, quotes kept by YAML are named, never used', () => {
    const c = loadConfig({ AWS_S3_ENDPOINT: 'minio.example:9000\n', S3_USE_HTTPS: ' False ', AWS_DEFAULT_REGION: 'eu-west-1\n', STORAGE_URI: 's3://models/sd\n', S3_MAX_CONCURRENCY: ' 24 ', EXIT_ON_BOOT_FAILURE: 'yes' });
    expect([c.s3.endpoint, c.s3.region, c.storageUri, c.s3.maxConcurrency, c.exitOnBootFailure]).toEqual(['http://minio.example:9000', 'eu-west-1', 's3://models/sd', 24, true]);
    let err: unknown;
    try {
      loadConfig({ STORAGE_URI: '"s3://models/sd"', AWS_S3_ENDPOINT: "'http://minio:9000'", AWS_DEFAULT_REGION: '"us-east-1"', S3_USE_HTTPS: '"0"', LORA_URI: '"s3://KEY:SECRET@b/l"' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const hint = 'remove them (in YAML, quotes inside a quoted value are part of it)';
    expect((err as ConfigError).problems).toEqual([
      `AWS_S3_ENDPOINT is wrapped in quotes, got 'http://minio:9000': ${hint}`,
      `S3_USE_HTTPS is wrapped in quotes, got "0": ${hint}`,
      `AWS_DEFAULT_REGION is wrapped in quotes, got "us-east-1": ${hint}`,
      `STORAGE_URI is wrapped in quotes, got "s3://models/sd": ${hint}`,
      `LORA_URI is wrapped in quotes, got "s3://***@b/l": ${hint}`,
    ]);
    expect(() => loadConfig({ S3_PART_SIZE: '8Mi' })).toThrow('S3_PART_SIZE must be an integer from 65536 to 5368709120, got "8Mi"');
    // An endpoint written without a scheme is masked as well, quoted or not.
    expect(() => loadConfig({ AWS_S3_ENDPOINT: 'admin:s3cr3t@minio:90000' })).toThrow('AWS_ENDPOINT_URL (or S3_ENDPOINT / AWS_S3_ENDPOINT) must be an http(s) URL or host:port, got "***@minio:90000"');
    expect(() => loadConfig({ AWS_S3_ENDPOINT: '"admin:s3/cr3t@minio:9000"' })).toThrow(`AWS_S3_ENDPOINT is wrapped in quotes, got "***@minio:9000": ${hint}`);
  });

  it('a number written with a unit, as manifests write durations and sizes, is named with the unit the variable is in and the value meant', () => {
    const problems = (env: Record<string, string>) => {
      try {
        loadConfig(env);
      } catch (e) {
        return (e as ConfigError).problems;
      }
      return [];
    };
    expect(problems({ REQUEST_TIMEOUT_S: '10m', SHUTDOWN_GRACE_S: '30s', BATCH_WINDOW_MS: '20ms', RESULT_CACHE_MB: '1Gi', MAX_BODY_BYTES: '10MB', S3_PART_SIZE: '8Mi', S3_STALL_TIMEOUT_S: '1.5h' })).toEqual([
      'S3_PART_SIZE must be an integer from 65536 to 5368709120, got "8Mi": write a number of bytes, without a unit (8388608 for "8Mi")',
      'S3_STALL_TIMEOUT_S must be a number from 0.1 to 2147483, got "1.5h": write a number of seconds, without a unit (5400 for "1.5h")',
      'BATCH_WINDOW_MS must be an integer from 0 to 10000, got "20ms": write a number of milliseconds, without a unit (20 for "20ms")',
      'MAX_BODY_BYTES must be an integer from 1024 to 1073741824, got "10MB": write a number of bytes, without a unit (10000000 for "10MB")',
      'SHUTDOWN_GRACE_S must be a number from 0 to 2147483, got "30s": write a number of seconds, without a unit (30 for "30s")',
      'REQUEST_TIMEOUT_S must be a number from 1 to 2147483, got "10m": write a number of seconds, without a unit (600 for "10m")',
      'RESULT_CACHE_MB must be a number >= 0, got "1Gi": write a number of MiB (2^20 bytes), without a unit (1024 for "1Gi")',
    ]);
    expect(problems({ S3_THROTTLE_TIMEOUT_S: '5m' })).toEqual([
      'S3_THROTTLE_TIMEOUT_S must be a number from 0.1 to 2147483, got "5m": write a number of seconds, without a unit (300 for "5m")',
    ]);
    expect([loadConfig({}).s3.throttleTimeoutS, loadConfig({ S3_THROTTLE_TIMEOUT_S: '0.5' }).s3.throttleTimeoutS]).toEqual([300, 0.5]);
    // A unit it does not know still says which one the variable is in; an integer variable gets no fraction to write.
    expect(problems({ REQUEST_TIMEOUT_S: '10 fortnights', BATCH_WINDOW_MS: '0.5ms' })).toEqual([
      'BATCH_WINDOW_MS must be an integer from 0 to 10000, got "0.5ms": write a number of milliseconds, without a unit',
      'REQUEST_TIMEOUT_S must be a number from 1 to 2147483, got "10 fortnights": write a number of seconds, without a unit',
    ]);
    // Decimal numbers only: Number() read 0x10 as 16 seconds and 0b11 as 3.
    expect(problems({ REQUEST_TIMEOUT_S: '0x10', RESULT_CACHE_MB: '0b11' })).toEqual([
      'REQUEST_TIMEOUT_S must be a number from 1 to 2147483, got "0x10"',
      'RESULT_CACHE_MB must be a number >= 0, got "0b11"',
    ]);
    expect(loadConfig({ REQUEST_TIMEOUT_S: '1e2', RESULT_CACHE_MB: '.5', SHUTDOWN_GRACE_S: '+7.5' })).toMatchObject({ requestTimeoutS: 100, resultCacheMb: 0.5, shutdownGraceS: 7.5 });
  });

  it('takes an integer as Helm prints one from values.yaml, a float: 1048576 as "1.048576e+06"; a fraction is still refused', () => {
    const c = loadConfig({ MAX_BODY_BYTES: '1.048576e+06', S3_PART_SIZE: '8.388608e+06', PORT: '8080.0', MAX_QUEUE: '1e+02', GPUS: '2.0', MAX_CONNECTIONS: '1e+06' });
    expect([c.maxBodyBytes, c.s3.partSize, c.port, c.maxQueue, c.gpus, c.maxConnections]).toEqual([1048576, 8388608, 8080, 100, 2, 1000000]);
    expect(() => loadConfig({ MAX_BODY_BYTES: '1.0485765e+06' })).toThrow('MAX_BODY_BYTES must be an integer from 1024 to 1073741824, got "1.0485765e+06"');
    expect(() => loadConfig({ WORKERS: '1.5' })).toThrow('WORKERS must be an integer from 1 to 64, got "1.5"');
    expect(() => loadConfig({ PORT: '0x1F90' })).toThrow('PORT must be an integer from 0 to 65535, got "0x1F90"');
  });

  it('HOST is a name or address alone: a port, brackets or a scheme there is named at start (the listen failed with ENOTFOUND)', () => {
    for (const host of ['0.0.0.0', '::', '127.0.0.1', 'localhost', 'fe80::1%eth0']) expect(loadConfig({ HOST: host }).host).toBe(host);
    for (const host of ['0.0.0.0:8080', 'localhost:', '[::]', '[::]:8080', 'http://0.0.0.0', 'my host']) {
      expect(() => loadConfig({ HOST: host }), host).toThrow(`HOST must be a host name or IP address to listen on (0.0.0.0, ::, 127.0.0.1), without scheme, brackets or port (the port is PORT's), got ${JSON.stringify(host)}`);
    }
  });

  it("a reference nothing expanded ($(VAR) Kubernetes left, ${VAR}, {{.Name}}) is named at start, showing the reference only", () => {
    let err: unknown;
    try {
      loadConfig({ STORAGE_URI: 's3://models/$(MODEL_NAME)', AWS_S3_ENDPOINT: '${S3_ENDPOINT_URL}', MODEL_NAME: '{{.Name}}', LORA_URI: 's3://KEY:SECRET@b/$(X)', LOG_LEVEL: '$(LEVEL)' });
    } catch (e) {
      err = e;
    }
    const k8s = (v: string, k: string) => `${k} holds $(${v}), a reference nothing expanded; Kubernetes expands $(${v}) only from a variable set before it (envFrom, or env entries above ${k}): set ${v} there, or write the value`;
    expect((err as ConfigError).problems).toEqual([
      'MODEL_NAME holds {{.Name}}, a reference nothing expanded; a template placeholder nothing rendered: write the value',
      'AWS_S3_ENDPOINT holds ${S3_ENDPOINT_URL}, a reference nothing expanded; a shell or envsubst placeholder left in the manifest: render it (make render) or write the value',
      k8s('MODEL_NAME', 'STORAGE_URI'),
      // Read twice (Python's level names first), named once.
      k8s('LEVEL', 'LOG_LEVEL'),
      k8s('X', 'LORA_URI'),
    ]);
    // A '$' alone is no reference.
    expect(loadConfig({ CE_TYPE: 'com.example.$image', STORAGE_URI: 's3://models/sd$1' })).toMatchObject({ ceType: 'com.example.$image', storageUri: 's3://models/sd$1' });
  });

  it('INPUT_URI_PREFIXES: none by default (s3:// inputs refused); s3://bucket[/prefix] entries; every bad one named at boot', () => {
    expect(loadConfig({}).inputUriPrefixes).toEqual([]);
    const c = loadConfig({ INPUT_URI_PREFIXES: ' s3://inputs/team-a/ , s3://shared,S3://Pics/in ' });
    expect(c.inputUriPrefixes.map((p) => [p.bucket, p.key])).toEqual([['inputs', 'team-a/'], ['shared', ''], ['Pics', 'in']]);
    let err: unknown;
    try {
      loadConfig({ INPUT_URI_PREFIXES: 's3://ok/in/,https://b/x,s3://b/a/../c,s3://b/%2e%2e/c,s3://b//x,,s3://KEY:SECRET@b/in,s3://*' });
    } catch (e) {
      err = e;
    }
    expect((err as ConfigError).problems).toEqual([
      'INPUT_URI_PREFIXES entry "https://b/x" must be s3://bucket or s3://bucket/prefix',
      `INPUT_URI_PREFIXES entry "s3://b/a/../c" has an empty, '.' or '..' path segment; write the prefix as the keys begin (s3://bucket/inputs/)`,
      `INPUT_URI_PREFIXES entry "s3://b/%2e%2e/c" has an empty, '.' or '..' path segment once percent-decoded; write the prefix as the keys begin (s3://bucket/inputs/)`,
      `INPUT_URI_PREFIXES entry "s3://b//x" has an empty, '.' or '..' path segment; write the prefix as the keys begin (s3://bucket/inputs/)`,
      'INPUT_URI_PREFIXES entry "" must be s3://bucket or s3://bucket/prefix',
      'INPUT_URI_PREFIXES entry "s3://***@b/in" must be s3://bucket or s3://bucket/prefix',
      'INPUT_URI_PREFIXES entry "s3://*" must be s3://bucket or s3://bucket/prefix',
    ]);
  });

  it('masks credentials in an endpoint or URI when describing itself', () => {
    const d = describeConfig(loadConfig({ AWS_ENDPOINT_URL: 'http://user:secret@host:9000', STORAGE_URI: 's3://b/p' }));
    expect(JSON.stringify(d)).not.toContain('secret');
  });
});

describe('variables that look like ours mistyped', () => {
  it('names the variable meant for another case, separators, one letter off, a plural, another unit or a prefix', () => {
    const typos = ['LORA_URL', 'STORAGE_URL', 'AWS_SECRET_ACCES_KEY', 'REQUEST_TIMEOUT', 'REQUEST_TIMEOUT_MS', 'BATCH_WINDOW', 'max_queue', 'MAXQUEUE',
      'Max-Batch-Size', 'WORKER', 'GPU', 'LOGLEVEL', 'DIFFUSERS_MAX_QUEUE', 'S3_PARTSIZE', 'SHUTDOWN_GRACE_SECONDS', 'CUDA_VISIBLE_DEVICE', 'port',
      // The endpoint as `make secret` and params.env name it: read by no process, and before without a word.
      'S3_ENDPOINT_URL',
      // Two neighbours swapped; two edits in a long name; two in a short one is no longer a typo of it.
      'EXECUTOIN_PROVIDER', 'AWS_SECRT_ACCES_KEY', 'MAX_QXEXE'];
    expect(misspelledVariables(Object.fromEntries(typos.map((k) => [k, 'x']))).map((m) => `${m.variable} ${m.meant}`)).toEqual([
      'LORA_URL LORA_URI', 'STORAGE_URL STORAGE_URI', 'AWS_SECRET_ACCES_KEY AWS_SECRET_ACCESS_KEY', 'REQUEST_TIMEOUT REQUEST_TIMEOUT_S',
      'REQUEST_TIMEOUT_MS REQUEST_TIMEOUT_S', 'BATCH_WINDOW BATCH_WINDOW_MS', 'max_queue MAX_QUEUE', 'MAXQUEUE MAX_QUEUE', 'Max-Batch-Size MAX_BATCH_SIZE',
      'WORKER WORKERS', 'GPU GPUS', 'LOGLEVEL LOG_LEVEL', 'DIFFUSERS_MAX_QUEUE MAX_QUEUE', 'S3_PARTSIZE S3_PART_SIZE', 'SHUTDOWN_GRACE_SECONDS SHUTDOWN_GRACE_S',
      'CUDA_VISIBLE_DEVICE CUDA_VISIBLE_DEVICES', 'port PORT', 'S3_ENDPOINT_URL S3_ENDPOINT', 'EXECUTOIN_PROVIDER EXECUTION_PROVIDER',
      'AWS_SECRT_ACCES_KEY AWS_SECRET_ACCESS_KEY',
    ]);
  });

  it('leaves alone what a pod carries besides: the image\'s, Kubernetes\', Knative\'s, the AWS SDK\'s and the data connection\'s variables', () => {
    const pod = ['HOSTNAME', 'HOME', 'PATH', 'PWD', 'TERM', 'LANG', 'TMPDIR', 'NODE_VERSION', 'NODE_ENV', 'NODE_OPTIONS', 'NODE_NAME', 'POD_NAME', 'POD_NAMESPACE', 'POD_IP',
      'KUBERNETES_SERVICE_HOST', 'KUBERNETES_SERVICE_PORT', 'KUBERNETES_PORT', 'KUBERNETES_PORT_443_TCP_PORT', 'K_SERVICE', 'K_REVISION', 'K_CONFIGURATION',
      'NVIDIA_DRIVER_CAPABILITIES', 'NVIDIA_REQUIRE_CUDA', 'CUDA_VERSION', 'NV_CUDA_LIB_VERSION', 'NV_CUDNN_VERSION', 'NCCL_VERSION', 'LD_LIBRARY_PATH',
      'MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_', 'GLIBC_TUNABLES', 'AWS_S3_BUCKET', 'AWS_ROLE_ARN', 'AWS_WEB_IDENTITY_TOKEN_FILE', 'AWS_PROFILE',
      'AWS_CONFIG_FILE', 'AWS_STS_REGIONAL_ENDPOINTS', 'AWS_ENDPOINT_URL_S3', 'AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED', 'HTTPS_PROXY', 'no_proxy',
      'SSL_CERT_FILE', 'NODE_EXTRA_CA_CERTS', 'SERVING_NAMESPACE', 'SERVING_POD', 'MODEL_DIR', 'OMP_NUM_THREADS', 'HF_HOME', 'TZ', 'USER', 'SHELL', 'CI'];
    expect(misspelledVariables(Object.fromEntries(pod.map((k) => [k, 'x'])))).toEqual([]);
    expect(misspelledVariables(Object.fromEntries(VARIABLES.map((k) => [k, 'x'])))).toEqual([]);
  });

  it('VARIABLES holds every variable config.ts reads', () => {
    const src = readFileSync(path.join(import.meta.dirname, '..', 'src', 'config.ts'), 'utf8');
    const read = new Set([...src.matchAll(/\b\w+\('([A-Z][A-Z0-9_]+)'/g)].map((m) => m[1]!));
    expect(read.size).toBeGreaterThan(50);
    expect([...read].filter((n) => !VARIABLES.includes(n))).toEqual([]);
  });

  it('the server starts with them and logs one warning each, naming both variables and never the value', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, LORA_URL: 's3://loras/SECRET-PATH', max_queue: '4' });
    try {
      const warned = srv.logs.filter((l) => l.level === 'warn' && ['LORA_URL', 'max_queue'].includes(l.variable as string));
      expect(warned.map((l) => l.msg)).toEqual([
        'LORA_URL is not a variable the runtime reads, so its value is not used: did you mean LORA_URI?',
        'max_queue is not a variable the runtime reads, so its value is not used: did you mean MAX_QUEUE?',
      ]);
      expect(JSON.stringify(srv.logs)).not.toContain('SECRET-PATH');
    } finally {
      await srv.stop();
    }
  });

  it('the warm-up Job warns as the server does, on stderr beside its progress', async () => {
    const model = await ensureDemoModel(sharedCacheDir());
    const r = spawnSync(process.execPath, [path.join(import.meta.dirname, '..', 'dist', 'warmup', 'main.js')], { encoding: 'utf8', timeout: 60_000,
      env: { ...process.env, STORAGE_URI: model, MODEL_CACHE_DIR: sharedCacheDir(), LORA_URL: 's3://loras/SECRET-PATH' } });
    expect(r.status).toBe(0);
    const warned = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.variable === 'LORA_URL');
    expect(warned.map((l) => [l.level, l.msg])).toEqual([['warn', 'LORA_URL is not a variable the runtime reads, so its value is not used: did you mean LORA_URI?']]);
    expect(r.stderr + r.stdout).not.toContain('SECRET-PATH');
  });
});

describe('ORT_OPTIMIZED_CACHE', () => {
  it('defaults to auto and accepts always/off only', () => {
    expect(loadConfig({}).optimizedModelCache).toBe('auto');
    expect(loadConfig({ ORT_OPTIMIZED_CACHE: 'off' }).optimizedModelCache).toBe('off');
    expect(() => loadConfig({ ORT_OPTIMIZED_CACHE: 'sometimes' })).toThrow(/ORT_OPTIMIZED_CACHE must be one of auto, always, off/);
  });

  it('ORT_OPTIMIZED_CACHE_MAX_MB: components up to 512 MB by default, raised for a UNet by the operator', () => {
    expect(loadConfig({}).optimizedCacheMaxMb).toBe(512);
    expect(loadConfig({ ORT_OPTIMIZED_CACHE_MAX_MB: '4096' }).optimizedCacheMaxMb).toBe(4096);
    expect(() => loadConfig({ ORT_OPTIMIZED_CACHE_MAX_MB: 'lots' })).toThrow(/ORT_OPTIMIZED_CACHE_MAX_MB must be a number >= 0/);
  });
});

describe('CUDA_TF32', () => {
  it('defaults to off: NVIDIA_TF32_OVERRIDE=0 is set for the CUDA libraries unless the operator chose', () => {
    expect(loadConfig({}).cudaTf32).toBe(false);
    const run = (vars: Record<string, string>, preset?: string) => {
      const env: NodeJS.ProcessEnv = preset === undefined ? {} : { NVIDIA_TF32_OVERRIDE: preset };
      applyTf32(loadConfig(vars), env);
      return env.NVIDIA_TF32_OVERRIDE;
    };
    expect(run({})).toBe('0');
    expect(run({ EXECUTION_PROVIDER: 'cuda' })).toBe('0');
    expect(run({ CUDA_TF32: 'true' })).toBeUndefined();
    expect(run({ EXECUTION_PROVIDER: 'cpu' })).toBeUndefined();
    expect(run({}, '1')).toBe('1');
    expect(() => loadConfig({ CUDA_TF32: 'maybe' })).toThrow(/CUDA_TF32/);
  });
});

describe('GPUS and WORKERS', () => {
  it('counts the GPUs a container sees from the variables the NVIDIA toolkit and device plugin set', () => {
    const nodes = () => ['null', 'nvidia0', 'nvidia1', 'nvidia2', 'nvidiactl', 'nvidia-uvm'];
    expect(visibleGpus({ CUDA_VISIBLE_DEVICES: '0,1' }, nodes)).toBe(2);
    expect(visibleGpus({ CUDA_VISIBLE_DEVICES: '' }, nodes)).toBe(0);
    expect(visibleGpus({ CUDA_VISIBLE_DEVICES: '-1' }, nodes)).toBe(0);
    expect(visibleGpus({ CUDA_VISIBLE_DEVICES: '2,-1,3' }, nodes)).toBe(1); // CUDA stops at the first invalid id
    expect(visibleGpus({ NVIDIA_VISIBLE_DEVICES: 'GPU-8f2a,GPU-77c1' }, nodes)).toBe(2);
    expect(visibleGpus({ NVIDIA_VISIBLE_DEVICES: 'none' }, nodes)).toBe(0);
    expect(visibleGpus({ NVIDIA_VISIBLE_DEVICES: 'all' }, nodes)).toBe(3);
    expect(visibleGpus({}, nodes)).toBe(3);
    expect(visibleGpus({}, () => [])).toBe(0);
  });

  it('one worker per GPU by default, spread in turn when WORKERS says more; none on the CPU provider', () => {
    expect(loadConfig({ GPUS: '4', EXECUTION_PROVIDER: 'cuda' })).toMatchObject({ gpus: 4, workers: 4 });
    expect(loadConfig({ GPUS: 'auto', EXECUTION_PROVIDER: 'cpu', CUDA_VISIBLE_DEVICES: '0,1' })).toMatchObject({ gpus: 0, workers: 1 });
    expect(loadConfig({ EXECUTION_PROVIDER: 'auto', CUDA_VISIBLE_DEVICES: '0,1' })).toMatchObject({ gpus: 2, workers: 2 });
    const cfg = loadConfig({ GPUS: '2', WORKERS: '3', EXECUTION_PROVIDER: 'cuda' });
    expect([0, 1, 2].map((i) => workerDevice(cfg, i))).toEqual([0, 1, 0]);
    expect(workerDevice(loadConfig({ GPUS: '2', EXECUTION_PROVIDER: 'cpu' }), 1)).toBeUndefined();
    // The message names every accepted form, `auto` (the default) included.
    expect(() => loadConfig({ GPUS: 'many' })).toThrow('GPUS must be auto or an integer from 0 to 64, got "many"');
    expect(() => loadConfig({ GPUS: '-1' })).toThrow('GPUS must be auto or an integer from 0 to 64, got "-1"');
    expect(loadConfig({ GPUS: ' AUTO ', EXECUTION_PROVIDER: 'cpu' })).toMatchObject({ gpus: 0 });
  });
});

describe('README', () => {
  const root = path.resolve(import.meta.dirname, '..');
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8');

  it('stays a newcomer\'s page: at most 400 lines; measurement history lives in docs/', () => {
    expect(readme.split('\n').length).toBeLessThanOrEqual(400);
    for (const doc of ['docs/BENCHMARKS.md', 'docs/DESIGN.md', 'docs/OPERATIONS.md']) expect(readme).toContain(doc);
  });

  it('documents every environment variable config.ts reads', () => {
    const src = readFileSync(path.join(root, 'src', 'config.ts'), 'utf8');
    const names = new Set([...src.matchAll(/\b(?:raw|int|num|bool|oneOf)\('([A-Z][A-Z0-9_]+)'/g)].map((m) => m[1]!));
    expect(names.size).toBeGreaterThan(20);
    const missing = [...names].filter((n) => !readme.includes(`\`${n}\``) && !readme.includes(`${n}\``));
    // S3_USER_VIRTUAL_BUCKET is documented with the other S3 details in docs/DESIGN.md.
    expect(missing.filter((n) => n !== 'S3_USER_VIRTUAL_BUCKET')).toEqual([]);
    expect(readFileSync(path.join(root, 'docs', 'DESIGN.md'), 'utf8')).toContain('| `S3_TRANSPORT` |');
  });
});

/** Whether this machine lets a user namespace mount a folder over /mnt for one process (it may not, in a container). */
const canMountOverMnt = process.platform === 'linux'
  && spawnSync('unshare', ['-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'], { stdio: 'ignore', timeout: 5_000 }).status === 0;

describe('the server command line', () => {
  const entry = path.join(import.meta.dirname, '..', 'dist', 'src', 'main.js');
  const run = (args: string[]) => spawnSync(process.execPath, [entry, ...args], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, PORT: '0', HOST: '127.0.0.1' } });

  it('--help prints the usage and exits 0 without starting a server', () => {
    const r = run(['--help']);
    expect([r.status, r.stderr]).toEqual([0, '']);
    expect(r.stdout).toMatch(/^usage: node dist\/src\/main\.js {3}\(no arguments: configured by environment variables\)\n/);
    expect(r.stdout).toContain('README.md, "Configuration"');
  });

  it('refuses a timer variable past what a Node timer can wait (every request answered 504 at once otherwise)', () => {
    const r = spawnSync(process.execPath, [entry], { encoding: 'utf8', timeout: 20_000,
      env: { ...process.env, PORT: '0', HOST: '127.0.0.1', REQUEST_TIMEOUT_S: '3000000', SHUTDOWN_GRACE_S: '1e9', S3_STALL_TIMEOUT_S: '2147484' } });
    expect([r.status, r.stdout]).toEqual([2, '']);
    expect(r.stderr).toBe('diffusers-runtime: invalid configuration: S3_STALL_TIMEOUT_S must be a number from 0.1 to 2147483, got "2147484"; '
      + 'SHUTDOWN_GRACE_S must be a number from 0 to 2147483, got "1e9"; REQUEST_TIMEOUT_S must be a number from 1 to 2147483, got "3000000"\n');
  });

  it('a DEFAULT_SCHEDULER naming no scheduler fails the start, before any model is fetched; a sampler label gets the name meant', () => {
    const r = spawnSync(process.execPath, [entry], { encoding: 'utf8', timeout: 20_000,
      env: { ...process.env, PORT: '0', HOST: '127.0.0.1', DEFAULT_SCHEDULER: 'DPM++ 2M Karras', STORAGE_URI: 's3://models/sd15' } });
    expect([r.status, r.stdout]).toEqual([2, '']);
    expect(r.stderr).toMatch(/^diffusers-runtime: invalid configuration: DEFAULT_SCHEDULER: scheduler "DPM\+\+ 2M Karras" is unknown; did you mean "dpmpp_2m_karras"\?; use one of pndm, .*\n$/);
  });

  it('a mistyped STORAGE_URI fails the start instead of serving the demo model, ready', () => {
    const env = { ...process.env, PORT: '0', HOST: '127.0.0.1', STORAGE_URI: undefined };
    const r = spawnSync(process.execPath, [entry], { encoding: 'utf8', timeout: 20_000, env: { ...env, STORAGE_URL: 's3://models/sd15' } });
    expect([r.status, r.stdout]).toEqual([2, '']);
    expect(r.stderr).toBe('diffusers-runtime: invalid configuration: STORAGE_URI is not set, but STORAGE_URL is: did you mean STORAGE_URI? '
      + '(without it, and without /mnt/models, the server would serve its embedded demo model)\n');
    // Another case, the same name meant.
    expect(spawnSync(process.execPath, [entry], { encoding: 'utf8', timeout: 20_000, env: { ...env, storage_uri: '/models/sd15' } }).stderr)
      .toContain('STORAGE_URI is not set, but storage_uri is: did you mean STORAGE_URI?');
  });

  // KServe's storage initializer fills /mnt/models; a STORAGE_URL from a Secret shared with envFrom may sit beside it.
  // A real /mnt/models for the server alone: a folder mounted there in a mount namespace of its own (where allowed).
  it.skipIf(!canMountOverMnt)('a mistyped STORAGE_URI beside a filled /mnt/models is a warning: /mnt/models is served', async () => {
    const model = await ensureDemoModel(sharedCacheDir());
    const srv = await startServer({ STORAGE_URI: undefined, STORAGE_URL: 's3://shared/SECRET-PATH' },
      { prefix: ['unshare', '-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt && mkdir /mnt/models && mount --bind "$0" /mnt/models && exec "$@"', model] });
    try {
      await srv.waitReady();
      expect(srv.logs.filter((l) => l.variable === 'STORAGE_URL').map((l) => [l.level, l.msg]))
        .toEqual([['warn', 'STORAGE_URL is not a variable the runtime reads, so its value is not used: did you mean STORAGE_URI?']]);
      expect(srv.events('files-ready').map((e) => e.dir)).toEqual(['/mnt/models']);
      expect(srv.logs.map((l) => l.msg)).not.toContain('no STORAGE_URI and no /mnt/models: serving the embedded demo model');
      expect(JSON.stringify(srv.logs)).not.toContain('SECRET-PATH');
    } finally {
      await srv.stop();
    }
  }, 180_000);

  // A pvc:// storageUri's volume gone away: the look at /mnt/models before the listen waits for good. Before, the server
  // never listened (its liveness failing, nothing logged); it now takes a folder that does not answer for a volume.
  it.skipIf(!canMountOverMnt || stuckFsUnavailable() !== undefined)('a mistyped STORAGE_URI beside a /mnt/models that does not answer: the server listens, warns, and is not ready', async (t) => {
    const backing = mkdtempSync(path.join(os.tmpdir(), 'dr-mnt-models-'));
    const fs = await mountStuckFs(backing, `${backing}-mnt`);
    t.onTestFinished(() => fs.release());
    await fs.hang();
    const srv = await startServer({ STORAGE_URI: undefined, STORAGE_URL: 's3://shared/x' },
      { prefix: ['unshare', '-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt && mkdir /mnt/models && mount --bind "$0" /mnt/models && exec "$@"', fs.dir] });
    t.onTestFinished(async () => void (await srv.stop('SIGKILL')));
    expect(srv.logs.filter((l) => l.variable === 'STORAGE_URL').map((l) => l.level)).toEqual(['warn']);
    expect((await fetch(`${srv.url}/v2/health/ready`)).status).toBe(503);
    // SIGTERM: the stop is held by the look, and its line names the volume the look is on (before: "the cache volume").
    expect(await srv.stop('SIGTERM', 40_000)).toEqual({ code: null, signal: 'SIGTERM' });
    const line = srv.logs.find((l) => l.level === 'error' && String(l.msg).startsWith('shutdown did not finish'))?.msg;
    expect(line).toMatch(/^shutdown did not finish: the model volume \(\/mnt\/models\) did not answer: access \/mnt\/models still pending after \d+ s[;:]/);
    expect(line).not.toContain('the cache volume');
  }, 120_000);

  it('names an unknown DEFAULT_SCHEDULER beside other bad variables, in the same run; a malformed one once', () => {
    const start = (env: Record<string, string>) => spawnSync(process.execPath, [entry], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, HOST: '127.0.0.1', ...env } });
    const both = start({ PORT: 'abc', DEFAULT_SCHEDULER: ' eulr ' });
    expect([both.status, both.stdout]).toEqual([2, '']);
    expect(both.stderr).toMatch(/^diffusers-runtime: invalid configuration: PORT must be an integer from 0 to 65535, got "abc"; DEFAULT_SCHEDULER: scheduler "eulr" is unknown; use one of pndm, /);
    const malformed = start({ PORT: 'abc', DEFAULT_SCHEDULER: 'euler\nx' });
    expect(malformed.stderr.match(/DEFAULT_SCHEDULER/g)).toHaveLength(1);
    expect(malformed.stderr).toContain('DEFAULT_SCHEDULER must be a scheduler name such as dpmpp_2m_karras');
  });

  it('refuses arguments in one line, naming the variable for a KServe flag, instead of ignoring them', () => {
    const r = run(['--model_name=sd', '--http_port', '8080']);
    expect([r.status, r.stdout]).toEqual([2, '']);
    expect(r.stderr).toBe('diffusers-runtime: takes no command-line arguments, got "--model_name=sd" "--http_port" "8080"; '
      + 'it is configured by environment variables (set MODEL_NAME, PORT instead); --help lists the main ones\n');
  });
});
