/**
 * @module Entry: parse config, start the pipeline workers, listen, start boot. Only the config parser, the worker
 * spawner and Node's http server load before the socket is open; logging, metrics and the runtime are imported after.
 */
import { ConfigError, loadConfig, type Config } from './config.js';
import type { Logger } from './log.js';
import type { EarlyFetch } from './runtime/early-fetch.js';
import type { Runtime } from './runtime/runtime.js';
import type { BaseServer } from './server/base.js';
import { spawnWorkers, type SpawnedWorker } from './runtime/workers.js';
import type { CommittedEntry } from './storage/peek.js';

/** How long a download's first answer from S3 may hold back the runtime's import (see main). */
const FIRST_ANSWER_WAIT_MS = 500;

async function main(): Promise<void> {
  let cfg: Readonly<Config>;
  try {
    cfg = loadConfig(process.env);
  } catch (err) {
    // One clear line naming every bad variable, then a non-zero exit: Kubernetes shows it in the pod status.
    process.stderr.write(`diffusers-runtime: ${err instanceof ConfigError ? err.message : String(err)}\n`);
    process.exit(2);
  }
  // Signals are ours from the start. Before the runtime exists nothing is served: the fetch (if one started) stops,
  // leaving its cache entry uncommitted and resumable, and the process exits 0.
  let rt: Runtime | undefined;
  let log: Logger | undefined;
  let fetch: EarlyFetch | undefined;
  let signals = 0;
  const stop = (sig: string) => {
    if (++signals > 1) {
      log?.warn({ signal: sig }, 'second signal: exiting now');
      process.exit(1);
    }
    log?.info({ signal: sig }, 'signal received');
    if (rt) void rt.close().then(() => process.exit(process.exitCode ?? 0));
    else if (fetch) {
      fetch.abort.abort();
      void fetch.result.catch(() => undefined).then(() => process.exit(0));
    } else process.exit(0);
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // ONNX Runtime's telemetry (on by default in its official builds) writes a device id and an onnxruntime.db under
  // $HOME/.cache and a mat-debug-<pid>.log in the temp folder for every process, and tries to upload events: off,
  // unless the operator set ORT_DISABLE_TELEMETRY. Set before the workers load onnxruntime-node.
  process.env.ORT_DISABLE_TELEMETRY ??= '1';
  // The pipeline workers start first: a worker thread takes ~60 ms to boot before its own imports begin, and that
  // overlaps the listen here, then the imports below.
  const workers = spawnWorkers(cfg);
  let base: BaseServer;
  try {
    base = await (await import('./server/base.js')).listenBase(cfg.host, cfg.port);
  } catch (err) {
    // One line, then a non-zero exit: a second server on a taken port never starts and shares its traffic.
    process.stderr.write(`diffusers-runtime: ${(err as Error).message}\n`);
    process.exit(1);
  }
  const s3 = cfg.storageUri?.startsWith('s3://') === true;
  // A committed cache entry for an s3:// model: the workers start its sessions at once, before the
  // runtime and the logger load (the runtime checks the entry against S3 before warm-up).
  const early = s3 ? await announceCommitted(cfg, workers) : undefined;
  const { createLogger } = await import('./log.js');
  log = createLogger(cfg.logLevel);
  // The S3 listing goes out now, while the runtime's code loads: without the AWS SDK where s3-lite covers the bucket
  // (then neither a hit nor a miss loads the SDK); otherwise the SDK loads meanwhile.
  fetch = s3 ? await (await import('./runtime/early-fetch.js')).startFetch(cfg.storageUri!, cfg, log) : undefined;
  // A download: the runtime's code loads once S3 answers the first ranged GET. Imported at once, it holds this thread
  // while the listing's answer and the first ranges wait to be read and sent (the ranges went out ~150 ms later on a
  // 300 MB miss), and the runtime needs no file before then. At most FIRST_ANSWER_WAIT_MS: a slow store still shows the
  // fetch's state and progress on the model endpoint.
  if (fetch && early === null) {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([fetch.flowing, new Promise((r) => (timer = setTimeout(r, FIRST_ANSWER_WAIT_MS)))]);
    clearTimeout(timer);
  }
  if (signals > 0) return;
  const { Runtime } = await import('./runtime/runtime.js');
  if (signals > 0) return;
  // performance.now() counts from process start, so 0 is "the process started".
  rt = new Runtime(cfg, log, { startedAt: 0, workers, ...(early !== undefined ? { early } : {}), ...(fetch ? { fetch } : {}) });
  rt.attach(base);
  await rt.start();
  if (rt.boot.state === 'failed' && cfg.exitOnBootFailure) process.exit(1);
}

async function announceCommitted(cfg: Readonly<Config>, workers: SpawnedWorker[]): Promise<CommittedEntry | null> {
  const [{ peekCommitted }, { announcement, componentDirs }] = await Promise.all([import('./storage/peek.js'), import('./runtime/announce.js')]);
  const early = await peekCommitted(cfg.storageUri!, cfg);
  if (early === undefined) return null;
  for (const dir of componentDirs(early.dir, early.manifest.files.map((f) => f.path))) {
    // Sessions only: the runtime parses the tokenizers on this thread once it has loaded.
    const m = announcement(dir);
    if (m?.t === 'component') for (const w of workers) w.worker.postMessage(m);
  }
  return early;
}

void main();
