/** @module The environment contract, parsed once into a frozen, typed Config. */
import { accessSync, constants, existsSync, mkdirSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isMainThread } from 'node:worker_threads';
import { exists } from './files.js';
import { parseS3Prefix, type S3Prefix } from './s3-url.js';

export type ExecutionProvider = 'auto' | 'cuda' | 'cpu';
/** WARMUP_VAE_ENCODER: on CUDA, prime the VAE encoder before ready (the default), or after the warm-up generation. */
export type EncoderWarmup = 'before-ready' | 'after-ready';
/**
 * AUX_THREADS: whether a pipeline worker runs its text encoders and VAE on auxiliary threads beside the UNet's (`auto`:
 * on CUDA, where each one's first run is a kernel search worth overlapping; not on the CPU, where the sessions share
 * the cores anyway and the extra threads only cost a start).
 */
export type AuxThreads = 'auto' | 'on' | 'off';
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';
export type OutputFormat = 'png' | 'jpeg' | 'webp';
export type OptimizedCacheMode = 'auto' | 'always' | 'off';
export type GraphOptimization = 'all' | 'extended' | 'basic' | 'disabled';
/** How a fetch speaks to S3: the AWS SDK, or the SDK-free reader where it covers the credentials (storage/s3-lite.ts). */
export type S3TransportName = 'sdk' | 'lite';
/** CACHE_EVICT: when a download finds too little space, remove least recently used cache entries nobody uses (`lru`), or fail (`off`). */
export type CacheEvict = 'lru' | 'off';

export interface S3Settings {
  /** Endpoint URL for S3-compatible stores; undefined means AWS. */
  readonly endpoint: string | undefined;
  readonly region: string;
  readonly useHttps: boolean;
  readonly verifySsl: boolean;
  readonly caBundle: string | undefined;
  /** Path-style addressing (MinIO, Ceph, ODF); on by default whenever an endpoint is set. */
  readonly forcePathStyle: boolean;
  readonly maxConcurrency: number;
  readonly partSize: number;
  /** Seconds without a byte on one range before it is aborted and retried. */
  readonly stallTimeoutS: number;
  readonly maxAttempts: number;
  /**
   * S3_THROTTLE_TIMEOUT_S: how long a fill may be throttled (503 SlowDown, 429, …) without receiving a byte before it
   * fails; throttled answers do not count against maxAttempts (storage/throttle.ts).
   */
  readonly throttleTimeoutS: number;
  /** S3_TRANSPORT: `sdk` (the default) or the opt-in `lite`. */
  readonly transport: S3TransportName;
  /** S3_VERIFY_CONTENT: each downloaded file's MD5 is checked against its ETag where that is an MD5. */
  readonly verifyContent: boolean;
}

export interface Config {
  /** What STORAGE_URI said, or undefined when it was not set. */
  readonly storageUri: string | undefined;
  /**
   * KServe's MODEL_INIT_MODE=async (it sets it beside a modelcar, `storageUri: oci://…`): the model folder is a link a
   * sidecar makes after this process starts, so a local STORAGE_URI (or /mnt/models) that is not there yet is waited for.
   */
  readonly modelInitAsync: boolean;
  readonly modelName: string;
  readonly host: string;
  readonly port: number;
  readonly cacheDir: string;
  readonly cacheEvict: CacheEvict;
  readonly s3: S3Settings;
  readonly executionProvider: ExecutionProvider;
  /** Pipeline workers; by default one per visible GPU (`gpus`), else 1. */
  readonly workers: number;
  /** GPUs the workers are spread over (worker i uses device i mod gpus); 0 on the CPU provider or with none visible. */
  readonly gpus: number;
  readonly maxBatchSize: number;
  readonly batchWindowMs: number;
  readonly maxQueue: number;
  /**
   * MAX_CONNECTIONS: client connections served at once; beyond it health is still answered and anything else gets 503
   * (src/server/base.ts). 0: no cap; undefined (`auto`, the default): the descriptor limit less a reserve.
   */
  readonly maxConnections: number | undefined;
  readonly logLevel: LogLevel;
  readonly maxBodyBytes: number;
  readonly maxImageSize: number;
  readonly maxSteps: number;
  /**
   * DEFAULT_SCHEDULER / DEFAULT_STEPS: what a request that names no scheduler / no num_inference_steps runs, instead
   * of the model's own scheduler and step count. The name is checked against the model once it is loaded (the boot).
   */
  readonly defaultScheduler: string | undefined;
  readonly defaultSteps: number | undefined;
  /** DEFAULT_GUIDANCE: the guidance_scale of a request that sends none, in every mode, instead of the model class's. */
  readonly defaultGuidance: number | undefined;
  readonly maxImagesPerRequest: number;
  /** INPUT_IMAGES_MB: what the input images of all requests in flight may hold at once (decoded pixels, s3:// bytes). */
  readonly inputImagesMb: number;
  readonly warmupSteps: number;
  /** On CUDA, whether ready waits for the VAE encoder's first-run kernel search (image-to-image, inpainting). */
  readonly warmupVaeEncoder: EncoderWarmup;
  readonly auxThreads: AuxThreads;
  readonly shutdownGraceS: number;
  readonly exitOnBootFailure: boolean;
  /** The longest wait between two boot attempts after a transient failure (runtime/boot-retry.ts); 0: none is tried again. */
  readonly bootRetryMaxS: number;
  readonly requestTimeoutS: number;
  readonly resultCacheMb: number;
  readonly defaultOutputFormat: OutputFormat;
  readonly intraOpThreads: number;
  /** ORT optimized-model cache next to cached models (see src/pipeline/ortcache.ts). */
  readonly optimizedModelCache: OptimizedCacheMode;
  /** ORT_OPTIMIZED_CACHE_MAX_MB: components larger than this get no optimized copy. */
  readonly optimizedCacheMaxMb: number;
  /** ONNX Runtime's graph optimisation level for every session (ORT_GRAPH_OPTIMIZATION). */
  readonly graphOptimization: GraphOptimization;
  /** Let cuBLAS/cuDNN run float32 math as TF32 on CUDA (faster fp32 models, images no longer match the reference). */
  readonly cudaTf32: boolean;
  /**
   * CUDA_PROVIDER_OPTIONS: ONNX Runtime CUDA provider options (`key=value` pairs, e.g. cudnn_conv_algo_search=HEURISTIC)
   * that onnxruntime-node's binding cannot pass; applied by native/cuda-provider-options.c. Empty when unset.
   */
  readonly cudaProviderOptions: ReadonlyArray<readonly [string, string]>;
  /** Where LoRA adapters are found besides the model's `loras/` folder: `s3://…` or a local path (docs/LORA.md). */
  readonly loraUri: string | undefined;
  /** Adapters one request may name. */
  readonly maxLoras: number;
  /** Adapter sets (merged sessions) each pipeline worker keeps, least recently used out first. */
  readonly loraMaxSets: number;
  /** Memory budget of those sets per worker, in MB of merged weights (what their sessions hold on the device). */
  readonly loraCacheMb: number;
  /**
   * INPUT_URI_PREFIXES: where `s3://` input images (img2img `image`, inpainting `mask_image`) may be read from, with
   * the server's credentials. Empty (unset): s3:// inputs are refused, so a client cannot make the server read
   * whatever its credentials can.
   */
  readonly inputUriPrefixes: readonly S3Prefix[];
  /**
   * OUTPUT_URI_PREFIXES: where `output_uri` may write, with the server's credentials. Empty (unset): anywhere but under
   * STORAGE_URI and LORA_URI, as before it existed; set, only there (another model in a shared bucket stays out of reach).
   */
  readonly outputUriPrefixes: readonly S3Prefix[];
  /**
   * CORS_ALLOW_ORIGINS: the origins whose browser pages may call the server (src/server/cors.ts), as browsers send them
   * (scheme://host[:port]), or `['*']` for any. Empty (unset): no CORS headers, as KServe's server.
   */
  readonly corsAllowOrigins: readonly string[];
  /** CE_TYPE / CE_SOURCE: the type and source of a CloudEvent answer, instead of KServe's (src/server/cloudevents.ts). */
  readonly ceType: string | undefined;
  readonly ceSource: string | undefined;
  /** CE_MERGE: a CloudEvent answer carries the request event's attributes and extensions (new id and time). */
  readonly ceMerge: boolean;
}

export class ConfigError extends Error {
  constructor(readonly problems: readonly string[]) {
    super(`invalid configuration: ${problems.join('; ')}`);
    this.name = 'ConfigError';
  }
}

type Env = Record<string, string | undefined>;

const PROVIDERS: readonly ExecutionProvider[] = ['auto', 'cuda', 'cpu'];
/** What EXECUTION_PROVIDER is often given instead: a device's name, ONNX Runtime's provider names. */
const PROVIDER_NAMES: Readonly<Record<string, ExecutionProvider>> = {
  gpu: 'cuda', nvidia: 'cuda', cudaexecutionprovider: 'cuda', tensorrt: 'cuda', cpuexecutionprovider: 'cpu',
};
const LEVELS: readonly LogLevel[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];
/** Python's logging names that pino spells otherwise (a manifest written for the Python runtime keeps working). */
const PYTHON_LEVELS: ReadonlyMap<string, LogLevel> = new Map([['warning', 'warn'], ['critical', 'fatal']]);
const FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];
const OPT_CACHE: readonly OptimizedCacheMode[] = ['auto', 'always', 'off'];
const GRAPH_OPT: readonly GraphOptimization[] = ['all', 'extended', 'basic', 'disabled'];
const TRANSPORTS: readonly S3TransportName[] = ['sdk', 'lite'];
const ENCODER_WARMUPS: readonly EncoderWarmup[] = ['before-ready', 'after-ready'];
const AUX_THREADS: readonly AuxThreads[] = ['auto', 'on', 'off'];
const CACHE_EVICT: readonly CacheEvict[] = ['lru', 'off'];

/** Seconds a Node timer can wait: a longer one fires at once (TimeoutOverflowWarning), so every request would time out. */
const MAX_TIMER_S = Math.floor((2 ** 31 - 1) / 1000);

/** `$(NAME)` (Kubernetes' env references), `${NAME}` (shell, envsubst), `{{…}}` (Go templates: KServe, Helm). */
const UNEXPANDED = /\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\{\{[^{}]{0,80}\}\}/;

/** A decimal number as a manifest writes one (an exponent allowed); no hexadecimal, binary or octal. */
const DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

/** The unit a numeric variable's name carries, and its size in seconds (time) or bytes (size). */
const VARIABLE_UNITS: ReadonlyArray<{ name: RegExp; unit: string; kind: 'time' | 'size'; base: number }> = [
  { name: /_MS$/, unit: 'milliseconds', kind: 'time', base: 0.001 },
  { name: /_S$/, unit: 'seconds', kind: 'time', base: 1 },
  { name: /_MB$/, unit: 'MiB (2^20 bytes)', kind: 'size', base: 2 ** 20 },
  { name: /_BYTES$|^S3_PART_SIZE$/, unit: 'bytes', kind: 'size', base: 1 },
];
/** Units a value may come with: Go/Kubernetes durations, and Kubernetes quantities with their SI spellings (k, MB). */
const TIME_UNITS: Readonly<Record<string, number>> = { ms: 0.001, s: 1, sec: 1, m: 60, min: 60, h: 3600, d: 86400 };
const SIZE_UNITS: Readonly<Record<string, number>> = {
  b: 1, k: 1e3, kb: 1e3, ki: 2 ** 10, kib: 2 ** 10, m: 1e6, mb: 1e6, mi: 2 ** 20, mib: 2 ** 20,
  g: 1e9, gb: 1e9, gi: 2 ** 30, gib: 2 ** 30, t: 1e12, tb: 1e12, ti: 2 ** 40, tib: 2 ** 40,
};

/**
 * For a number written with a unit (`10s`, `1Gi`, as a manifest writes durations and sizes): the unit this variable is
 * in, and the value to write instead where the unit is known. Empty for anything else.
 */
function unitHint(k: string, r: string, integer: boolean): string {
  const u = VARIABLE_UNITS.find((x) => x.name.test(k));
  const m = /^([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-z]+)$/i.exec(r);
  if (u === undefined || m === null) return '';
  const factor = (u.kind === 'time' ? TIME_UNITS : SIZE_UNITS)[m[2]!.toLowerCase()];
  const v = factor === undefined ? undefined : +((Number(m[1]) * factor) / u.base).toPrecision(12);
  const instead = v !== undefined && (!integer || Number.isInteger(v)) ? ` (${v} for ${JSON.stringify(r)})` : '';
  return `: write a number of ${u.unit}, without a unit${instead}`;
}

/** HOST: a name or address to listen on; a port or scheme there would only fail the listen with ENOTFOUND. */
function listenHost(v: string | undefined, bad: string[]): string {
  if (v === undefined) return '0.0.0.0';
  if (/[\s/]/.test(v) || /^[^:]+:\d*$/.test(v) || /^\[.*\](:\d*)?$/.test(v)) {
    bad.push(`HOST must be a host name or IP address to listen on (0.0.0.0, ::, 127.0.0.1), without scheme, brackets or port (the port is PORT's), got ${JSON.stringify(maskUri(v))}`);
  }
  return v;
}

export interface LoadOptions {
  /**
   * MODEL_CACHE_DIR's default, when the caller has looked for it itself (the server does, asynchronously: see
   * defaultCacheDir); otherwise it is looked for here, synchronously.
   */
  defaultCacheDir?: string;
}

/** Where KServe puts a storageUri's model (its storage initializer, a PVC, a modelcar's link). */
export const KSERVE_MODEL_DIR = '/mnt/models';

/**
 * What the server serves without STORAGE_URI: /mnt/models where it exists, or will (a modelcar's link, made after start
 * with MODEL_INIT_MODE=async); undefined for the embedded demo model. Asked without blocking: /mnt/models may be a
 * network volume (a pvc:// storageUri).
 */
export async function defaultModelUri(cfg: Pick<Config, 'modelInitAsync'>): Promise<string | undefined> {
  return cfg.modelInitAsync || (await exists(KSERVE_MODEL_DIR)) ? KSERVE_MODEL_DIR : undefined;
}

/** Parses every variable, reports every bad one together, and returns a frozen Config. */
export function loadConfig(env: Env = process.env, o: LoadOptions = {}): Readonly<Config> {
  const bad: string[] = [];
  /** Variables already named for their quotes or an unexpanded reference (raw may read one twice). */
  const refused = new Set<string>();
  const refuse = (k: string, problem: string): undefined => {
    if (!refused.has(k)) bad.push(problem);
    refused.add(k);
    return undefined;
  };
  const raw = (k: string): string | undefined => {
    const v = env[k]?.trim();
    if (v === undefined || v === '') return undefined;
    // `value: '"s3://b/p"'` in YAML (or a quoted line in an env file) keeps the quotes: no variable here takes them,
    // and kept they would make a local path of a URI, a host of `"http`, a region S3 refuses to sign for.
    if (v.length >= 2 && (v[0] === '"' || v[0] === "'") && v.at(-1) === v[0]) {
      return refuse(k, `${k} is wrapped in quotes, got ${v[0]}${maskUri(v.slice(1, -1))}${v[0]}: remove them (in YAML, quotes inside a quoted value are part of it)`);
    }
    // A reference nothing expanded reaches S3 or the server as text: s3://models/$(MODEL_NAME) lists a prefix that
    // does not exist. Only the reference is shown, not the value around it.
    const ref = UNEXPANDED.exec(v);
    if (ref !== null) {
      const [text, k8s, shell] = ref;
      const why = k8s !== undefined
        ? `Kubernetes expands $(${k8s}) only from a variable set before it (envFrom, or env entries above ${k}): set ${k8s} there, or write the value`
        : shell !== undefined
          ? `a shell or envsubst placeholder left in the manifest: render it (make render) or write the value`
          : 'a template placeholder nothing rendered: write the value';
      return refuse(k, `${k} holds ${text}, a reference nothing expanded; ${why}`);
    }
    return v;
  };
  /**
   * `r` as an integer from min to max, else undefined. A whole number in decimal or exponent form counts: Helm prints
   * an integer from values.yaml as a float, so 1048576 arrives as "1.048576e+06" and 8080 may come as "8080.0".
   */
  const intIn = (r: string, min: number, max: number): number | undefined => {
    const v = DECIMAL.test(r) ? Number(r) : NaN;
    return Number.isSafeInteger(v) && v >= min && v <= max ? v : undefined;
  };
  const int = (k: string, dflt: number, min: number, max = Number.MAX_SAFE_INTEGER): number => {
    const r = raw(k);
    if (r === undefined) return dflt;
    const v = intIn(r, min, max);
    if (v === undefined) bad.push(`${k} must be an integer from ${min} to ${max}, got ${JSON.stringify(env[k])}${unitHint(k, r, true)}`);
    return v ?? dflt;
  };
  /** An integer that may also be `auto` (any case): undefined when unset or auto. `allowed` says both in the error. */
  const autoOrInt = (k: string, min: number, max: number, allowed = `auto or an integer from ${min} to ${max}`): number | undefined => {
    const r = raw(k);
    if (r === undefined || r.toLowerCase() === 'auto') return undefined;
    const v = intIn(r, min, max);
    if (v === undefined) bad.push(`${k} must be ${allowed}, got ${JSON.stringify(env[k])}`);
    return v;
  };
  const num = (k: string, dflt: number, min: number, max = Infinity): number => {
    const r = raw(k);
    if (r === undefined) return dflt;
    // Decimal only: Number() would also read 0x10 as 16 and 0b11 as 3.
    const v = DECIMAL.test(r) ? Number(r) : NaN;
    if (!Number.isFinite(v) || v < min || v > max) {
      bad.push(`${k} must be a number ${max === Infinity ? `>= ${min}` : `from ${min} to ${max}`}, got ${JSON.stringify(env[k])}${unitHint(k, r, false)}`);
      return dflt;
    }
    return v;
  };
  const bool = (k: string, dflt: boolean): boolean => {
    const r = raw(k)?.toLowerCase();
    if (r === undefined) return dflt;
    if (['1', 'true', 'yes', 'on'].includes(r)) return true;
    if (['0', 'false', 'no', 'off'].includes(r)) return false;
    bad.push(`${k} must be true or false (1/0), got ${JSON.stringify(env[k])}`);
    return dflt;
  };
  /** `meant`: values other tools use, and the one of ours meant by each (said with the problem). */
  const oneOf = <T extends string>(k: string, dflt: T, allowed: readonly T[], meant: Readonly<Record<string, T>> = {}): T => {
    const r = raw(k)?.toLowerCase();
    if (r === undefined) return dflt;
    if ((allowed as readonly string[]).includes(r)) return r as T;
    const hint = Object.hasOwn(meant, r) ? `; did you mean ${meant[r]}?` : '';
    bad.push(`${k} must be one of ${allowed.join(', ')}, got ${JSON.stringify(env[k])}${hint}`);
    return dflt;
  };

  const maxSteps = int('MAX_STEPS', 500, 1, 10_000);
  const defaultScheduler = raw('DEFAULT_SCHEDULER');
  // Only its form here: whether it names a scheduler is checked at start, beside this (main.ts), with the names known.
  if (defaultScheduler !== undefined && !/^[\x20-\x7e]{1,64}$/.test(defaultScheduler)) {
    bad.push(`DEFAULT_SCHEDULER must be a scheduler name such as dpmpp_2m_karras (at most 64 printable ASCII characters), got ${JSON.stringify(env.DEFAULT_SCHEDULER)}`);
  }

  /**
   * A CloudEvent attribute this server sets, sent as a ce-* header in binary mode: printable ASCII, and none of the
   * three characters the HTTP binding percent-encodes, as receivers differ there (Knative's broker and KServe's SDK
   * read a header verbatim, newer SDKs decode it), so the value reads the same to all.
   */
  const eventAttribute = (k: string): string | undefined => {
    const v = raw(k);
    if (v !== undefined && !/^[\x21\x23\x24\x26-\x7e]{1,1024}$/.test(v)) {
      bad.push(`${k} must be at most 1024 printable ASCII characters without space, '"' or '%' (it is sent as a ce-* header, which receivers read either verbatim or percent-decoded), got ${JSON.stringify(env[k])}`);
    }
    return v;
  };

  const modelName = raw('MODEL_NAME') ?? 'model';
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(modelName)) {
    bad.push(`MODEL_NAME must be 1-128 characters of letters, digits, '.', '_' or '-', got ${JSON.stringify(env.MODEL_NAME)}`);
  }

  const endpointRaw = raw('AWS_ENDPOINT_URL') ?? raw('S3_ENDPOINT') ?? raw('AWS_S3_ENDPOINT');
  const useHttps = bool('S3_USE_HTTPS', true);
  let endpoint: string | undefined;
  if (endpointRaw !== undefined) {
    // KServe's initializer accepts a bare host:port and picks the scheme from S3_USE_HTTPS.
    const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(endpointRaw) ? endpointRaw : `${useHttps ? 'https' : 'http'}://${endpointRaw}`;
    try {
      const u = new URL(withScheme);
      if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error('scheme');
      // One spelling per endpoint (scheme and host lower-case, no default port, no trailing '/'): the cache key
      // holds it, so `HTTP://Minio:80/` and `http://minio` share one cache entry instead of downloading twice.
      endpoint = `${u.origin}${u.pathname}`.replace(/\/+$/, '');
    } catch {
      bad.push(`AWS_ENDPOINT_URL (or S3_ENDPOINT / AWS_S3_ENDPOINT) must be an http(s) URL or host:port, got ${JSON.stringify(maskUri(endpointRaw))}`);
    }
  }
  const caBundle = raw('AWS_CA_BUNDLE');
  if (caBundle !== undefined && !existsSync(caBundle)) bad.push(`AWS_CA_BUNDLE names a file that does not exist: ${JSON.stringify(caBundle)}`);

  // Read whatever else is set, so a bad value is named even where it does not apply (no endpoint, or
  // S3_FORCE_PATH_STYLE given): a pod fails at start, not once someone adds the endpoint.
  const virtualBucket = bool('S3_USER_VIRTUAL_BUCKET', false);
  const s3: S3Settings = Object.freeze({
    endpoint,
    region: raw('AWS_REGION') ?? raw('AWS_DEFAULT_REGION') ?? 'us-east-1',
    useHttps,
    verifySsl: bool('S3_VERIFY_SSL', true),
    caBundle,
    forcePathStyle: bool('S3_FORCE_PATH_STYLE', endpoint !== undefined && !virtualBucket),
    maxConcurrency: int('S3_MAX_CONCURRENCY', 24, 1, 512),
    partSize: int('S3_PART_SIZE', 8 * 1024 * 1024, 64 * 1024, 5 * 1024 * 1024 * 1024),
    stallTimeoutS: num('S3_STALL_TIMEOUT_S', 20, 0.1, MAX_TIMER_S),
    maxAttempts: int('S3_MAX_ATTEMPTS', 8, 1, 100),
    throttleTimeoutS: num('S3_THROTTLE_TIMEOUT_S', 300, 0.1, MAX_TIMER_S),
    transport: oneOf('S3_TRANSPORT', 'sdk', TRANSPORTS),
    verifyContent: bool('S3_VERIFY_CONTENT', true),
  });

  const executionProvider = oneOf('EXECUTION_PROVIDER', 'auto', PROVIDERS, PROVIDER_NAMES);
  // GPUS: how many GPUs to spread workers over; `auto` counts the visible ones (none on the CPU provider).
  const gpus = autoOrInt('GPUS', 0, 64) ?? (executionProvider === 'cpu' ? 0 : visibleGpus(env));
  const cfg: Config = {
    storageUri: raw('STORAGE_URI'),
    // KServe's variable, not ours: any other value is its default (the model is in place at start), never refused.
    modelInitAsync: raw('MODEL_INIT_MODE')?.toLowerCase() === 'async',
    modelName,
    host: listenHost(raw('HOST'), bad),
    port: int('PORT', 8080, 0, 65535),
    cacheDir: raw('MODEL_CACHE_DIR') ?? o.defaultCacheDir ?? defaultCacheDir(),
    cacheEvict: oneOf('CACHE_EVICT', 'lru', CACHE_EVICT),
    s3,
    executionProvider,
    workers: int('WORKERS', Math.max(1, gpus), 1, 64),
    gpus,
    maxBatchSize: int('MAX_BATCH_SIZE', 1, 1, 64),
    batchWindowMs: int('BATCH_WINDOW_MS', 20, 0, 10_000),
    maxQueue: int('MAX_QUEUE', 32, 1, 100_000),
    maxConnections: autoOrInt('MAX_CONNECTIONS', 0, 10_000_000, 'auto, 0 (no cap) or a number of connections up to 10000000'),
    logLevel: PYTHON_LEVELS.get(raw('LOG_LEVEL')?.toLowerCase() ?? '') ?? oneOf('LOG_LEVEL', 'info', LEVELS),
    maxBodyBytes: int('MAX_BODY_BYTES', 1024 * 1024, 1024, 1024 * 1024 * 1024),
    maxImageSize: int('MAX_IMAGE_SIZE', 2048, 8, 16384),
    maxSteps,
    defaultScheduler,
    defaultSteps: raw('DEFAULT_STEPS') === undefined ? undefined : int('DEFAULT_STEPS', 1, 1, maxSteps),
    defaultGuidance: raw('DEFAULT_GUIDANCE') === undefined ? undefined : num('DEFAULT_GUIDANCE', 0, 0, 100),
    maxImagesPerRequest: int('MAX_IMAGES_PER_REQUEST', 8, 1, 256),
    inputImagesMb: int('INPUT_IMAGES_MB', 512, 64, 1024 * 1024),
    warmupSteps: int('WARMUP_STEPS', 2, 0, 100),
    warmupVaeEncoder: oneOf('WARMUP_VAE_ENCODER', 'before-ready', ENCODER_WARMUPS),
    auxThreads: oneOf('AUX_THREADS', 'auto', AUX_THREADS),
    shutdownGraceS: num('SHUTDOWN_GRACE_S', 25, 0, MAX_TIMER_S),
    exitOnBootFailure: bool('EXIT_ON_BOOT_FAILURE', false),
    bootRetryMaxS: num('BOOT_RETRY_MAX_S', 300, 0, MAX_TIMER_S),
    requestTimeoutS: num('REQUEST_TIMEOUT_S', 600, 1, MAX_TIMER_S),
    resultCacheMb: num('RESULT_CACHE_MB', 64, 0),
    // `jpg` as a request's output_format takes it.
    defaultOutputFormat: raw('OUTPUT_FORMAT')?.toLowerCase() === 'jpg' ? 'jpeg' : oneOf('OUTPUT_FORMAT', 'png', FORMATS),
    intraOpThreads: int('ORT_INTRA_OP_THREADS', 0, 0, 1024),
    optimizedModelCache: oneOf('ORT_OPTIMIZED_CACHE', 'auto', OPT_CACHE),
    optimizedCacheMaxMb: num('ORT_OPTIMIZED_CACHE_MAX_MB', 512, 0),
    graphOptimization: oneOf('ORT_GRAPH_OPTIMIZATION', 'all', GRAPH_OPT),
    cudaTf32: bool('CUDA_TF32', false),
    cudaProviderOptions: providerOptions('CUDA_PROVIDER_OPTIONS', raw('CUDA_PROVIDER_OPTIONS'), bad),
    loraUri: raw('LORA_URI'),
    maxLoras: int('MAX_LORAS', 4, 0, 64),
    loraMaxSets: int('LORA_MAX_SETS', 2, 0, 64),
    loraCacheMb: num('LORA_CACHE_MB', 4096, 0),
    inputUriPrefixes: s3Prefixes('INPUT_URI_PREFIXES', raw('INPUT_URI_PREFIXES'), bad),
    outputUriPrefixes: s3Prefixes('OUTPUT_URI_PREFIXES', raw('OUTPUT_URI_PREFIXES'), bad),
    corsAllowOrigins: corsOrigins('CORS_ALLOW_ORIGINS', raw('CORS_ALLOW_ORIGINS'), bad),
    ceType: eventAttribute('CE_TYPE'),
    ceSource: eventAttribute('CE_SOURCE'),
    ceMerge: bool('CE_MERGE', false),
  };
  if (cfg.loraUri !== undefined && !/^(s3:\/\/[^/]+|file:\/\/\/|\/)/.test(cfg.loraUri)) {
    bad.push(`LORA_URI must be s3://bucket/prefix, file:///path or an absolute path, got ${JSON.stringify(maskUri(cfg.loraUri))}`);
  }
  if (cfg.maxImageSize % 8 !== 0) bad.push(`MAX_IMAGE_SIZE must be a multiple of 8, got ${cfg.maxImageSize}`);
  // Whitespace around a key is removed (trimCredentials); inside one it is a copy gone wrong. The value is never shown.
  // The key id and the token travel in headers; the secret only keys the signature, and MinIO or Ceph passwords may hold
  // spaces, so a space is refused in the first two only.
  for (const k of CREDENTIAL_VARS) {
    const inside = k === 'AWS_SECRET_ACCESS_KEY' ? /[\x00-\x1f\x7f]/ : /[\s\x00-\x1f\x7f]/;
    if (inside.test(env[k]?.trim() ?? '')) bad.push(`${k} has ${k === 'AWS_SECRET_ACCESS_KEY' ? 'a' : 'a space,'} line break or control character inside it; copy the key into the Secret again`);
  }
  if (bad.length > 0) throw new ConfigError(bad);
  return Object.freeze(cfg);
}

/**
 * The CUDA provider options CUDA_PROVIDER_OPTIONS may set, with the values ONNX Runtime's CUDA provider parses. Not
 * here: device_id (each worker's, GPUS), use_tf32 (CUDA_TF32's), the options that take pointers (a wrong value crashes
 * the process) and those ONNX Runtime accepts but never applies (tunable_op_*).
 */
const CUDA_OPTIONS: Record<string, RegExp> = {
  cudnn_conv_algo_search: /^(EXHAUSTIVE|HEURISTIC|DEFAULT)$/,
  cudnn_conv_use_max_workspace: /^[01]$/,
  cudnn_conv1d_pad_to_nc1d: /^[01]$/,
  prefer_nhwc: /^[01]$/,
  do_copy_in_default_stream: /^[01]$/,
  fuse_conv_bias: /^[01]$/,
  enable_skip_layer_norm_strict_mode: /^[01]$/,
  gpu_mem_limit: /^[1-9][0-9]{0,19}$/,
  arena_extend_strategy: /^(kNextPowerOfTwo|kSameAsRequested)$/,
  sdpa_kernel: /^[0-9]{1,4}$/,
};

/**
 * `key=value` pairs separated by `,` or `;`, whitespace around keys and values ignored: what
 * native/cuda-provider-options.c applies (its `pairs` must equal these; test/provider-options.test.ts compares them).
 */
function providerOptions(name: string, value: string | undefined, bad: string[]): Array<[string, string]> {
  if (value === undefined) return [];
  // eslint-disable-next-line no-control-regex
  if (/[^\x20-\x7e\t\n\r]/.test(value)) {
    bad.push(`${name} must be ASCII text (key=value pairs separated by commas)`);
    return [];
  }
  if (Buffer.byteLength(value) > 2047) bad.push(`${name} is longer than 2047 characters`);
  const pairs: Array<[string, string]> = [];
  for (const entry of value.split(/[,;]/).map((e) => e.trim()).filter((e) => e !== '')) {
    const eq = entry.indexOf('=');
    const key = entry.slice(0, eq).trim();
    const val = entry.slice(eq + 1).trim();
    if (eq < 0 || key === '' || val === '' || val.includes('=')) {
      bad.push(`${name} entries must be key=value (separated by commas), got ${JSON.stringify(entry.slice(0, 80))}`);
    } else if (key === 'device_id') {
      bad.push(`${name} must not set device_id: each worker's GPU is the runtime's (GPUS, WORKERS)`);
    } else if (key === 'use_tf32') {
      bad.push(`${name} must not set use_tf32: TF32 is CUDA_TF32's`);
    } else if (!Object.hasOwn(CUDA_OPTIONS, key)) {
      bad.push(`${name}: ${JSON.stringify(key.slice(0, 80))} is not an option the runtime passes; one of ${Object.keys(CUDA_OPTIONS).join(', ')}`);
    } else if (!CUDA_OPTIONS[key]!.test(val)) {
      bad.push(`${name}: ${key}=${JSON.stringify(val.slice(0, 80))} is not a value ONNX Runtime takes (${CUDA_OPTIONS[key]!.source.replace(/^\^|\$$/g, '')})`);
    } else if (pairs.some(([k]) => k === key)) {
      bad.push(`${name} sets ${key} twice`);
    } else {
      pairs.push([key, val]);
    }
  }
  return pairs;
}

/** Comma-separated `s3://bucket[/prefix]` entries; each bad one is named. */
function s3Prefixes(name: string, value: string | undefined, bad: string[]): S3Prefix[] {
  if (value === undefined) return [];
  const out: S3Prefix[] = [];
  for (const entry of value.split(',').map((e) => e.trim())) {
    const p = parseS3Prefix(entry);
    if (typeof p === 'string') bad.push(`${name} entry ${JSON.stringify(maskUri(entry).slice(0, 200))} ${p}`);
    else out.push(p);
  }
  return out;
}

/**
 * Comma-separated origins, each as a browser serializes it in `Origin` (lower-case scheme and host, no default port),
 * or `*` alone. An entry with a path (a trailing slash included) would never equal an `Origin`: refused, not ignored.
 */
function corsOrigins(name: string, value: string | undefined, bad: string[]): string[] {
  if (value === undefined) return [];
  const entries = value.split(',').map((e) => e.trim()).filter((e) => e !== '');
  if (entries.includes('*')) {
    if (entries.length > 1) bad.push(`${name} is * (any origin) together with other entries: give * alone or the origins alone`);
    return ['*'];
  }
  const out: string[] = [];
  for (const entry of entries) {
    const shown = JSON.stringify(maskUri(entry).slice(0, 200));
    let url: URL | undefined;
    try {
      url = new URL(entry);
    } catch {
      url = undefined;
    }
    if (url === undefined || (url.protocol !== 'http:' && url.protocol !== 'https:') || url.username !== '' || url.password !== '') {
      bad.push(`${name} entry ${shown} is not an origin: write scheme://host[:port], e.g. https://app.example.com`);
    } else if (!/^https?:\/\/[^/?#]+$/i.test(entry)) {
      bad.push(`${name} entry ${shown} is not an origin: browsers send ${url.origin} (no path, query or trailing slash)`);
    } else out.push(url.origin);
  }
  return out;
}

/** The warning a process logs with the variables trimCredentials changed: names them, never their values. */
export const TRIMMED_CREDENTIALS = "removed whitespace around S3 credentials (a Secret made with `kubectl create secret --from-file` keeps the file's last newline)";

/** The static S3 credentials: the AWS SDK and the SDK-free transport read them from the environment, never from Config. */
const CREDENTIAL_VARS = ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN'] as const;

/**
 * Every environment variable the runtime reads: loadConfig's, the S3 credentials, the GPU lists (visibleGpus) and those
 * it sets for its libraries unless the operator did. What misspelledVariables compares the environment with.
 */
export const VARIABLES: readonly string[] = [
  'STORAGE_URI', 'MODEL_INIT_MODE', 'MODEL_NAME', 'HOST', 'PORT', 'MODEL_CACHE_DIR', 'CACHE_EVICT',
  'AWS_ENDPOINT_URL', 'S3_ENDPOINT', 'AWS_S3_ENDPOINT', 'AWS_REGION', 'AWS_DEFAULT_REGION', 'AWS_CA_BUNDLE', ...CREDENTIAL_VARS,
  'S3_USE_HTTPS', 'S3_VERIFY_SSL', 'S3_FORCE_PATH_STYLE', 'S3_USER_VIRTUAL_BUCKET', 'S3_MAX_CONCURRENCY', 'S3_PART_SIZE',
  'S3_STALL_TIMEOUT_S', 'S3_MAX_ATTEMPTS', 'S3_THROTTLE_TIMEOUT_S', 'S3_TRANSPORT', 'S3_VERIFY_CONTENT',
  'EXECUTION_PROVIDER', 'GPUS', 'WORKERS', 'CUDA_VISIBLE_DEVICES', 'NVIDIA_VISIBLE_DEVICES', 'MAX_BATCH_SIZE', 'BATCH_WINDOW_MS',
  'MAX_QUEUE', 'MAX_CONNECTIONS', 'LOG_LEVEL', 'MAX_BODY_BYTES', 'MAX_IMAGE_SIZE', 'MAX_STEPS', 'DEFAULT_SCHEDULER',
  'DEFAULT_STEPS', 'DEFAULT_GUIDANCE', 'MAX_IMAGES_PER_REQUEST', 'INPUT_IMAGES_MB', 'WARMUP_STEPS', 'WARMUP_VAE_ENCODER',
  'AUX_THREADS', 'SHUTDOWN_GRACE_S', 'EXIT_ON_BOOT_FAILURE', 'BOOT_RETRY_MAX_S', 'REQUEST_TIMEOUT_S', 'RESULT_CACHE_MB', 'OUTPUT_FORMAT',
  'ORT_INTRA_OP_THREADS', 'ORT_OPTIMIZED_CACHE', 'ORT_OPTIMIZED_CACHE_MAX_MB', 'ORT_GRAPH_OPTIMIZATION', 'ORT_DISABLE_TELEMETRY',
  'CUDA_TF32', 'NVIDIA_TF32_OVERRIDE', 'CUDA_PROVIDER_OPTIONS', 'LORA_URI', 'MAX_LORAS', 'LORA_MAX_SETS', 'LORA_CACHE_MB',
  'INPUT_URI_PREFIXES', 'OUTPUT_URI_PREFIXES', 'CORS_ALLOW_ORIGINS', 'CE_TYPE', 'CE_SOURCE', 'CE_MERGE', 'TERMINATION_MESSAGE_PATH',
];

/**
 * Variables in `env` that are none of VARIABLES but look like one mistyped, with the one meant: another case or
 * separators (`max_queue`, `MAXQUEUE`), one letter off or two in a long name (`LORA_URL`, `AWS_SECRET_ACCES_KEY`), a plural
 * (`WORKER`), another unit suffix (`BATCH_WINDOW`, `REQUEST_TIMEOUT_MS`), a `_URL` (`S3_ENDPOINT_URL`) or a prefix (`DIFFUSERS_MAX_QUEUE`). The
 * names share no prefix, so an unknown one cannot be refused: the pod also carries the platform's own variables.
 */
export function misspelledVariables(env: Env): Array<{ variable: string; meant: string }> {
  const out: Array<{ variable: string; meant: string }> = [];
  for (const [variable, value] of Object.entries(env)) {
    if (value === undefined || KNOWN.has(variable)) continue;
    const up = variable.toUpperCase();
    const b = bare(up);
    const meant = VARIABLES.find((k, i) => BARE[i] === b || up === `${k}S` || `${up}S` === k)
      ?? VARIABLES.find((k) => k.length >= 6 && editDistance(up, k, k.length >= 12 ? 2 : 1) <= (k.length >= 12 ? 2 : 1));
    if (meant !== undefined) out.push({ variable, meant });
  }
  return out;
}

// Worked out once: the check runs before the listen, over every variable of the pod (Kubernetes' service links give
// seven per Service in the namespace: hundreds in a busy one).
const KNOWN: ReadonlySet<string> = new Set(VARIABLES);
const squash = (n: string) => n.toUpperCase().replace(/[^A-Z0-9]/g, '');
// `_URL` too: S3_ENDPOINT_URL, the name `make secret` takes the endpoint by, is read by no process (S3_ENDPOINT is).
const bare = (n: string) => squash(n.toUpperCase().replace(/^DIFFUSERS_(RUNTIME_)?/, '').replace(/_(S|MS|MB|SECONDS|SECS|BYTES|URL)$/, ''));
const BARE: readonly string[] = VARIABLES.map(bare);

/**
 * Edits (insert, delete, replace, swap two neighbours) that turn `a` into `b`; any number above `max` once the answer
 * is known to be above it.
 */
function editDistance(a: string, b: string, max: number): number {
  if (Math.abs(a.length - b.length) > max) return max + 1;
  // Three rows: the swap looks two back.
  let back = new Int32Array(b.length + 1);
  let prev = Int32Array.from({ length: b.length + 1 }, (_, j) => j);
  let row = new Int32Array(b.length + 1);
  for (let i = 1; i <= a.length; i++) {
    row[0] = i;
    let least = i;
    for (let j = 1; j <= b.length; j++) {
      let d = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d = Math.min(d, back[j - 2]! + 1);
      row[j] = d;
      if (d < least) least = d;
    }
    if (least > max) return max + 1;
    [back, prev, row] = [prev, row, back];
  }
  return prev[b.length]!;
}

/** The warning a process logs for each misspelledVariables entry: names the variables, never their values. */
export const misspelledWarning = (m: { variable: string; meant: string }): string =>
  `${m.variable} is not a variable the runtime reads, so its value is not used: did you mean ${m.meant}?`;

/**
 * What a process run under an arbitrary uid needs before it reads or writes anything (OpenShift's restricted SCC: a uid
 * from the namespace's range, in group 0, with no passwd entry; another uid for each pod where runAsUser differs):
 * - HOME, where the container runtime left it unset: such a uid has no home, os.homedir() throws, and with it the AWS
 *   SDK's config lookup (every S3 listing failed as a bare "SystemError", retried). '/' is what CRI-O gives such a uid.
 * - a umask that gives the group what it gives the user (022 becomes 002): the cache folders and files the warm-up Job
 *   or a pod makes must be writable by the next pod, which may run as another uid of the same group (the pod's fsGroup,
 *   or group 0), for its lease, a download it resumes, its LoRA sets. Others keep what the umask gave them.
 * Main thread only: a worker may not set the umask (it shares the process's).
 */
export function applyContainerDefaults(env: Env = process.env): void {
  if (!env.HOME) {
    try {
      os.homedir();
    } catch {
      env.HOME = '/';
    }
  }
  if (!isMainThread) return;
  const mask = process.umask(0o002);
  process.umask((mask & ~0o070) | ((mask & 0o700) >> 3));
}

/**
 * Who this process is, as a permission error in the cache should say it: a volume's owner and modes are read against
 * these ids.
 */
export function processIdentity(): string {
  const uid = process.getuid?.();
  if (uid === undefined) return 'this process';
  const groups = [...new Set([process.getgid!(), ...(process.getgroups?.() ?? [])])];
  return `uid ${uid}, group${groups.length > 1 ? 's' : ''} ${groups.join(', ')}`;
}

/**
 * Removes whitespace around the S3 credentials in `env`, where both transports read them, and returns the names it
 * changed. A Secret made with `kubectl create secret --from-file` keeps the file's last newline: in a secret key it
 * would reach S3 as SignatureDoesNotMatch, in a key id or token as a header Node refuses to send. Keys hold none.
 */
export function trimCredentials(env: Env = process.env): string[] {
  const trimmed: string[] = [];
  for (const k of CREDENTIAL_VARS) {
    const v = env[k];
    if (v !== undefined && v !== v.trim()) {
      env[k] = v.trim();
      trimmed.push(k);
    }
  }
  return trimmed;
}

/** MODEL_CACHE_DIR's default where it is a writable mount (the PVC). */
export const PVC_CACHE_DIR = '/mnt/cache';
/** MODEL_CACHE_DIR's default otherwise (made when looked for). */
export const tmpCacheDir = (): string => path.join(os.tmpdir(), 'diffusers-runtime-cache');

/**
 * PVC_CACHE_DIR when it is a writable mount, else tmpCacheDir(). Synchronous: a volume at /mnt/cache that does not answer
 * holds the calling thread for good (the server looks asynchronously instead: main.ts).
 */
function defaultCacheDir(): string {
  try {
    accessSync(PVC_CACHE_DIR, constants.W_OK);
    return PVC_CACHE_DIR;
  } catch {
    const dir = tmpCacheDir();
    try {
      mkdirSync(dir, { recursive: true });
    } catch {
      /* reported when the cache is first used */
    }
    return dir;
  }
}

/**
 * A URI as messages and logs may show it: `scheme://user:secret@host/…` with the user info masked, and a query string
 * (a presigned URL's signature and session token) as `?***`. A secret may hold '/' (half of AWS secret keys do) or '@'
 * (a chosen password), so after `user:` everything up to the last '@' goes; a bucket name holds neither ':' nor '@', so
 * an s3:// URI whose first segment has a ':' is always credentials.
 */
export function maskUri(u: string): string {
  // User info first: a password may hold '?'.
  const m = maskUserInfo(u);
  const q = m.indexOf('?');
  return q < 0 ? m : `${m.slice(0, q)}?***`;
}

/** `u` with only its user info masked (maskUri). */
export function maskUserInfo(u: string): string {
  // The scheme is optional: an endpoint may be a bare `user:secret@host:port`.
  const m = /^([a-z][a-z0-9+.-]*:\/\/)?([^/@]*)/i.exec(u);
  if (!m) return u;
  const scheme = m[1] ?? '';
  const first = m[2] ?? '';
  if (first.includes(':') && u.includes('@')) return `${scheme}***${u.slice(u.lastIndexOf('@'))}`;
  if (u.charAt(scheme.length + first.length) === '@') return `${scheme}***${u.slice(scheme.length + first.length)}`;
  return u;
}

/** The config as one log-safe object: no credentials are part of Config, URIs' user info and query strings are masked. */
export function describeConfig(cfg: Readonly<Config>): Record<string, unknown> {
  const mask = (u: string | undefined) => (u === undefined ? u : maskUri(u));
  return { ...cfg, storageUri: mask(cfg.storageUri), loraUri: mask(cfg.loraUri), s3: { ...cfg.s3, endpoint: mask(cfg.s3.endpoint) } };
}

/**
 * How many GPUs this container sees, without asking CUDA: `CUDA_VISIBLE_DEVICES`, else `NVIDIA_VISIBLE_DEVICES` (what
 * the NVIDIA container toolkit and the Kubernetes device plugin set), else the `/dev/nvidiaN` nodes they mount.
 */
export function visibleGpus(env: NodeJS.ProcessEnv = process.env, devNodes: () => string[] = listDev): number {
  const list = (v: string) => v.split(',').map((x) => x.trim()).filter(Boolean);
  const cuda = env.CUDA_VISIBLE_DEVICES;
  if (cuda !== undefined) {
    const ids = list(cuda);
    // CUDA stops at the first invalid id ("-1", "NoDevFiles"): only the ids before it are devices.
    const firstBad = ids.findIndex((id) => !/^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$/.test(id));
    return firstBad < 0 ? ids.length : firstBad;
  }
  const nvidia = env.NVIDIA_VISIBLE_DEVICES?.trim();
  if (nvidia !== undefined && nvidia !== 'all') return ['', 'none', 'void'].includes(nvidia) ? 0 : list(nvidia).length;
  return devNodes().filter((n) => /^nvidia\d+$/.test(n)).length;
}

function listDev(): string[] {
  try {
    return readdirSync('/dev');
  } catch {
    return [];
  }
}
