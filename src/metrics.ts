/** @module Every metric the runtime exports, on a registry the runtime owns (no global default registry). */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Buckets for a diffusion request: from a Turbo step on a GPU to a long CPU generation. */
const REQUEST_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300];
const BOOT_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800];
/** prometheus_client's default buckets, which KServe's stage histograms use: the series a KServe dashboard reads. */
const KSERVE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10];

/** KServe's stages of a predict request (its Model.__call__), each with its histogram. */
export type KserveStage = 'preprocess' | 'predict' | 'postprocess' | 'explain';

export type Metrics = ReturnType<typeof createMetrics>;

/** A sample's line up to the value of its `le` label (prom-client writes `le` first; any place is matched): head, name, le. */
const LE_LABEL = /^(([a-zA-Z_:][a-zA-Z0-9_:]*)\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",)*le=")([^"+][^"]*)"/gm;

/**
 * The registry's text for GET /metrics. prom-client writes a NaN value as `Nan` (the event-loop lag gauges are NaN
 * until their first sample, a gauge can be set to one): Go's ParseFloat takes it, but the format (and OpenMetrics,
 * and stricter parsers) spell it `NaN`. prom-client writes no timestamps, so the value ends the line. Histogram
 * bucket bounds are spelled as KServe's Python server spells them (leLabel).
 */
export async function exposition(registry: Registry): Promise<string> {
  const buckets = new Set(registry.getMetricsAsArray().filter((m) => (m as object) instanceof Histogram).map((m) => `${m.name}_bucket`));
  return (await registry.metrics())
    .replace(/ Nan$/gm, ' NaN')
    .replace(LE_LABEL, (line: string, head: string, name: string, le: string) => (buckets.has(name) ? `${head}${leLabel(Number(le))}"` : line));
}

/**
 * A bucket bound as Python's prometheus_client writes it (utils.floatToGoString): `1.0`, `10.0`, `0.005`, `1e-05`,
 * `1e+06`. prom-client writes `1`, `10`: a label value, so a KServe dashboard or recording rule that names a bound
 * (`le="1.0"`) matched nothing on Prometheus 2. Prometheus 3 normalises every `le` it ingests to this float spelling,
 * so the runtime's series are the same on both. Python's repr, then Go's switch to an exponent from 1e+06 on, with
 * prometheus_client's own exponent (`1e+010`, where Go writes `1e+10`): its spelling is the point.
 */
export function leLabel(x: number): string {
  if (x === Infinity) return '+Inf';
  if (x === -Infinity) return '-Inf';
  if (Number.isNaN(x)) return 'NaN';
  const s = pythonRepr(x);
  const dot = s.indexOf('.');
  if (x > 0 && dot > 6) return `${`${s[0]}.${s.slice(1, dot)}${s.slice(dot + 1)}`.replace(/[0.]+$/, '')}e+0${dot - 1}`;
  return s;
}

/**
 * Python's repr of a finite float: the shortest digits that read back (JS's are the same), fixed from 1e-4 to below
 * 1e16 with `.0` on a whole number, else `d.ddde±XX`.
 */
function pythonRepr(x: number): string {
  if (Object.is(x, -0)) return '-0.0';
  const [digits, e] = x.toExponential().split('e') as [string, string];
  const exp = Number(e);
  if (exp < -4 || exp >= 16) return `${digits}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  const s = String(x);
  return s.includes('.') ? s : `${s}.0`;
}

/** Why a request was refused before running: the `reason` of inference_rejected_total (engine and server alike). */
export type RejectReason = 'queue_full' | 'input_budget' | 'not_ready' | 'shutting_down';
/** Every RejectReason (the record's keys make the list exhaustive), for the series exported at 0 from the start. */
export const REJECT_REASONS = Object.keys({ queue_full: 0, input_budget: 0, not_ready: 0, shutting_down: 0 } satisfies Record<RejectReason, 0>) as RejectReason[];

/** What the runtime was doing when S3 throttled it: the `operation` of s3_throttled_responses_total. */
export type S3Operation = 'model_download' | 'cache_check' | 'lora_download' | 'output_upload' | 'output_cleanup' | 'input_read';
/** Every S3Operation, for the series exported at 0 from the start. */
export const S3_OPERATIONS = Object.keys({ model_download: 0, cache_check: 0, lora_download: 0, output_upload: 0, output_cleanup: 0, input_read: 0 } satisfies Record<S3Operation, 0>) as S3Operation[];

/**
 * How one HTTP request to S3 ended: the `outcome` of s3_requests_total (s3-requests.ts sorts them; docs/OPERATIONS.md
 * says when each counts).
 */
export type S3Outcome = 'ok' | 'throttled' | 'client_error' | 'server_error' | 'network' | 'stalled' | 'cancelled';
/** Every S3Outcome, for the series exported at 0 from the start. */
export const S3_OUTCOMES = Object.keys({ ok: 0, throttled: 0, client_error: 0, server_error: 0, network: 0, stalled: 0, cancelled: 0 } satisfies Record<S3Outcome, 0>) as S3Outcome[];

export function createMetrics(registry: Registry = new Registry(), opts: { defaultMetrics?: boolean } = {}) {
  if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry, prefix: 'process_runtime_' });
  const r = [registry];
  // KServe's Python server's names, help, label and buckets (python/kserve/kserve/metrics.py), on this registry; what
  // each times here is docs/OPERATIONS.md's (server/context.ts kserveStages). No explainer: explain stays at 0.
  const stage = (s: KserveStage, help: string) =>
    new Histogram({ name: `request_${s}_seconds`, help, labelNames: ['model_name'] as const, buckets: KSERVE_BUCKETS, registers: r });
  return {
    registry,
    // The seed runtime's names.
    requests: new Counter({
      name: 'inference_request_count',
      help: 'Inference requests answered, by model, protocol and HTTP status code (499: the client left before the answer)',
      labelNames: ['model_name', 'protocol', 'status'] as const,
      registers: r,
    }),
    requestDuration: new Histogram({
      name: 'inference_request_duration_seconds',
      help: 'Time from receiving an inference request to its last byte, successful requests only',
      labelNames: ['model_name', 'protocol'] as const,
      buckets: REQUEST_BUCKETS,
      registers: r,
    }),
    modelLoadTime: new Gauge({
      name: 'model_load_time_seconds',
      help: 'Seconds from process start to the model being ready to serve (fetch, sessions and warm-up)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    kserveStages: {
      preprocess: stage('preprocess', 'pre-process request latency'),
      predict: stage('predict', 'predict request latency'),
      postprocess: stage('postprocess', 'post-process request latency'),
      explain: stage('explain', 'explain request latency'),
    } satisfies Record<KserveStage, Histogram<'model_name'>>,
    // Cold start.
    bootPhase: new Gauge({
      name: 'boot_phase_duration_seconds',
      help: 'Duration of each boot phase (resolving, fetching, loading, warming) of the current process',
      labelNames: ['model_name', 'phase'] as const,
      registers: r,
    }),
    bootPhaseHist: new Histogram({
      name: 'boot_phase_seconds',
      help: 'Histogram of boot phase durations (resolving, fetching, loading, warming)',
      labelNames: ['model_name', 'phase'] as const,
      buckets: BOOT_BUCKETS,
      registers: r,
    }),
    bootState: new Gauge({
      name: 'boot_state',
      help: 'Current boot state: 1 for the state the runtime is in, 0 for the others',
      labelNames: ['model_name', 'state'] as const,
      registers: r,
    }),
    adapterLoad: new Histogram({
      name: 'lora_adapter_set_load_seconds',
      help: 'Time requests waited for a LoRA adapter set to be built (fetch, merge, sessions), per set built',
      labelNames: ['model_name'] as const,
      buckets: BOOT_BUCKETS,
      registers: r,
    }),
    sessionCreate: new Gauge({
      name: 'onnx_session_create_seconds',
      help: 'Seconds to create each ONNX Runtime session, with the execution provider it got',
      labelNames: ['model_name', 'component', 'provider'] as const,
      registers: r,
    }),
    fetchedBytes: new Counter({
      name: 'model_download_bytes_total',
      help: 'Model bytes downloaded from object storage into the cache',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    damagedFiles: new Counter({
      name: 'model_download_damaged_files_total',
      help: 'Downloads of model files damaged on their way: content that differed from the S3 ETag or checksum where another download of the file did not, or differed otherwise (S3_VERIFY_CONTENT)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    cacheEvictions: new Counter({
      name: 'model_cache_evictions_total',
      help: 'Other cache entries this process removed (least recently used, not in use) to make room for its download',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    cacheEvictedBytes: new Counter({
      name: 'model_cache_evicted_bytes_total',
      help: 'Bytes those evicted cache entries occupied',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    bootRetries: new Counter({
      name: 'boot_retries_total',
      help: 'Boot attempts that failed for a reason that can pass (code: the failure\'s) and are tried again after a backoff',
      labelNames: ['model_name', 'code'] as const,
      registers: r,
    }),
    cacheHits: new Counter({
      name: 'model_cache_hits_total',
      help: 'Model boots served from a committed cache entry without downloading',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    s3Throttled: new Counter({
      name: 's3_throttled_responses_total',
      help: 'S3 answers that asked the runtime to slow down (503 SlowDown, 429, a throttling code), by what it was doing (model_download, cache_check, '
        + 'lora_download, output_upload, output_cleanup, input_read): none counts as a failed attempt; the last one of work that gave up is counted too',
      labelNames: ['model_name', 'operation'] as const,
      registers: r,
    }),
    s3Requests: new Counter({
      name: 's3_requests_total',
      help: 'HTTP requests sent to S3, every attempt and page included, by what the runtime was doing (the operations of s3_throttled_responses_total) '
        + 'and how each ended (ok, throttled, client_error, server_error, network, stalled, cancelled), counted once when it ends: a GET once its body is read',
      labelNames: ['model_name', 'operation', 'outcome'] as const,
      registers: r,
    }),
    // Serving.
    stageDuration: new Histogram({
      name: 'inference_stage_seconds',
      help: 'Time spent in each stage of a generation (text_encoder, vae_encoder for image inputs, denoise, vae_decoder, encode)',
      labelNames: ['model_name', 'stage'] as const,
      buckets: REQUEST_BUCKETS,
      registers: r,
    }),
    steps: new Counter({
      name: 'denoising_steps_total',
      help: 'UNet denoising steps run (a batched step counts once), those of generations stopped or failed partway included',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    stepsPerSecond: new Gauge({
      name: 'denoising_steps_per_second',
      help: 'Denoising steps per second of the last generation',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    images: new Counter({
      name: 'images_generated_total',
      help: 'Images generated (result-cache hits and the warm-up excluded)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    queueDepth: new Gauge({
      name: 'inference_queue_depth',
      help: 'Requests waiting for the device (not counting the ones running; a request of several instances counts once)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    inflight: new Gauge({
      name: 'inference_requests_in_flight',
      help: 'Inference requests being served: from the reading of their input images (image-to-image, inpainting, edits: decoding, s3:// inputs) through the result cache or the queue until their images are made and, with output_uri, uploaded (writing the answer after is not counted); a request of several instances counts once',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    batchSize: new Histogram({
      name: 'inference_batch_size',
      help: 'Requests combined into one generation batch',
      labelNames: ['model_name'] as const,
      buckets: [1, 2, 3, 4, 6, 8, 12, 16, 32, 64],
      registers: r,
    }),
    rejected: new Counter({
      name: 'inference_rejected_total',
      help: 'Requests refused before running, by reason (queue_full, input_budget, not_ready, shutting_down)',
      labelNames: ['model_name', 'reason'] as const,
      registers: r,
    }),
    cacheStuck: new Counter({
      name: 'cache_stuck_requests_total',
      help: 'Inference requests answered 503 CACHE_STUCK: they needed the cache volume (a LoRA adapter\'s look-up, fetch or set build) and it did not answer',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    outOfMemory: new Counter({
      name: 'inference_out_of_memory_total',
      help: 'Generations that ran out of memory, by outcome (split: a batch of several requests, each run again alone; failed: a request alone, answered 507 OUT_OF_MEMORY)',
      labelNames: ['model_name', 'outcome'] as const,
      registers: r,
    }),
    cancelled: new Counter({
      name: 'inference_cancelled_total',
      help: 'Generations abandoned before their answer, by reason (client_left, timeout: REQUEST_TIMEOUT_S passed, request_failed: another instance of the request failed): removed from the queue, left their batch (which stops between steps once all its clients have left), or left while their LoRA adapters were looked up',
      labelNames: ['model_name', 'reason'] as const,
      registers: r,
    }),
    resultCacheHits: new Counter({
      name: 'result_cache_hits_total',
      help: 'Generation requests (V1 instances, V2 prompts) answered from the result cache, or from an identical generation already queued or running (another request\'s, or the same request\'s), without a new generation',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    wsDropped: new Counter({
      name: 'websocket_messages_dropped_total',
      help: 'WebSocket progress and preview messages not sent because the client was reading too slowly (results are never dropped)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    previews: new Counter({
      name: 'websocket_previews_encoded_total',
      help: 'Preview images (preview_every) encoded for WebSocket clients; none while no client of the generation, nor any request joined to it, asks for them',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    resultCacheBytes: new Gauge({
      name: 'result_cache_bytes',
      help: 'Bytes held by the result cache: its encoded images and each entry\'s bookkeeping (RESULT_CACHE_MB bounds it)',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    // Client connections (src/server/base.ts), read from the server at scrape time.
    connectionsOpen: new Gauge({
      name: 'http_connections_open',
      help: 'Client connections open (HTTP and WebSocket), by whether they are within MAX_CONNECTIONS (within) or beyond it (beyond: one answer, then closed)',
      labelNames: ['model_name', 'state'] as const,
      registers: r,
    }),
    connectionsMax: new Gauge({
      name: 'http_connections_max',
      help: 'The connection cap in force (MAX_CONNECTIONS, or the descriptor limit less a reserve); 0 when there is none',
      labelNames: ['model_name'] as const,
      registers: r,
    }),
    connectionsRefused: new Counter({
      name: 'http_connections_refused_total',
      help: 'Connections not served as usual, by reason: over_limit (a request beyond MAX_CONNECTIONS answered 503), dropped (beyond it, closed without a request in time or pushed out by newer ones), accept_failed (accept failed, e.g. EMFILE at the open-file limit)',
      labelNames: ['model_name', 'reason'] as const,
      registers: r,
    }),
    // Per pipeline worker, one per GPU (device cuda:N) or cpu.
    workerBusy: new Gauge({
      name: 'worker_busy',
      help: 'Whether a pipeline worker holds a generation batch (1) or is idle (0), by worker and device',
      labelNames: ['model_name', 'worker', 'device'] as const,
      registers: r,
    }),
    workerImages: new Counter({
      name: 'worker_images_total',
      help: 'Images generated by each pipeline worker, by worker and device',
      labelNames: ['model_name', 'worker', 'device'] as const,
      registers: r,
    }),
    workerDeaths: new Counter({
      name: 'worker_deaths_total',
      help: 'Pipeline workers that stopped while serving (a crash, out of memory), by worker and device; each is started again',
      labelNames: ['model_name', 'worker', 'device'] as const,
      registers: r,
    }),
  };
}
