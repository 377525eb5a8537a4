/**
 * @module The composition root: parse config, start the pipeline workers, listen, run the boot (runtime/boot-sequence.ts)
 * and wire the runtime into the HTTP server. Only the config parser, the scheduler names, the worker spawner and Node's
 * http server load before the socket is open; the boot, logging, the runtime and the routes are imported after, and
 * before the boot's fetch touches the cache (see main).
 */
import { realpathSync } from 'node:fs';
import { access } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { S3_ADVICE, shortage, shortageError } from './descriptors.js';
import { applyContainerDefaults, ConfigError, describeConfig, KSERVE_MODEL_DIR, loadConfig, misspelledVariables, misspelledWarning, trimCredentials, TRIMMED_CREDENTIALS, type Config } from './config.js';
import type { Logger } from './log.js';
import { BootEvents } from './runtime/boot-events.js';
import { servedFrom } from './runtime/input-uris.js';
import type { BootSequence } from './runtime/boot-sequence.js';
import type { Runtime } from './runtime/runtime.js';
import type { BaseServer } from './server/base.js';
import type { ServerContext } from './server/context.js';
import { spawnWorkers, type SpawnedWorker } from './runtime/workers.js';
import { unaddressableUris } from './storage/addressing.js';
import { unknownDefaultScheduler } from './pipeline/schedulers/names.js';
import { cacheRelative, CLEANUP_MS, describePending, endBySignal, killNow, lookForDefaultCacheDir, pendingByVolume, serverVolumes, startCleanup, trackIo, warnStepFailed, type Cleanup } from './storage/pending-io.js';
import { clearTerminationMessage, terminationReason } from './termination.js';

/** The flags KServe's Python servers take, and the variable that does their work here. */
const FLAG_VARS: Readonly<Record<string, string>> = { model_name: 'MODEL_NAME', http_port: 'PORT', model_dir: 'STORAGE_URI', workers: 'WORKERS' };

const USAGE = `usage: node dist/src/main.js   (no arguments: configured by environment variables)
  STORAGE_URI   s3://bucket/prefix, file:///path or a path (default: /mnt/models if it exists, else the embedded demo model)
  MODEL_NAME    the model's name in every route (default: model)
  PORT, HOST    where it listens (default: 8080, 0.0.0.0)
Every variable, its default and the values it takes: README.md, "Configuration". The cache CLI: node dist/warmup/main.js --help
`;

/**
 * Arguments are not read: a `--help` gets the usage, anything else (a ServingRuntime's `args` copied from a Python
 * runtime) is refused with the variable to use instead of being ignored. Exits when there are any.
 */
function checkArgs(args: readonly string[]): void {
  if (args.length === 0) return;
  if (args.some((a) => a === '--help' || a === '-h')) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const hints = args.map((a) => FLAG_VARS[a.replace(/^--?/, '').split('=')[0]!.replace(/-/g, '_')]).filter((v) => v !== undefined);
  const hint = hints.length > 0 ? ` (set ${[...new Set(hints)].join(', ')} instead)` : '';
  fatalLine(`takes no command-line arguments, got ${args.map((a) => JSON.stringify(a)).join(' ')}; it is configured by environment variables${hint}; --help lists the main ones`);
  process.exit(2);
}

/** The line a fatal exit ends with: on stderr, and in the container's termination message (kubectl describe pod). */
function fatalLine(line: string): void {
  process.stderr.write(`diffusers-runtime: ${line}\n`);
  terminationReason(`diffusers-runtime: ${line}`);
}

/** A signal this soon after the first is the same stop delivered twice, not a second one. */
const REPEAT_SIGNAL_MS = 1000;

/**
 * Whether /mnt/models is there, asked before the listen: one that does not answer within 2 s is a volume (a pvc://
 * storageUri's, gone away), so it counts as there; the boot, after the listen, says what it waits for. The look stays
 * listed (trackIo) for a stop's line.
 */
async function modelDirAnswers(): Promise<boolean> {
  const look = trackIo('access', KSERVE_MODEL_DIR, () => access(KSERVE_MODEL_DIR)).then(() => true, () => false);
  return Promise.race([look, sleep(2_000, true, { ref: false })]);
}

async function main(): Promise<void> {
  checkArgs(process.argv.slice(2));
  // Before the config: its default cache folder may be made now, and must be shared with the group.
  applyContainerDefaults();
  let cfg: Readonly<Config> | undefined;
  // Signals are ours from the start. Before the runtime exists nothing is served: the boot's plan (if one is under way)
  // releases its lease, and the process exits 0, once the file system calls still pending are answered (a look for the
  // default cache folder: see leave).
  let rt: Runtime | undefined;
  let log: Logger | undefined;
  let events: BootEvents | undefined;
  /** The boot's first step (its plan: a lease and a look at the cache entry), under way once the boot's code has loaded. */
  let resolving: Promise<BootSequence> | undefined;
  let signals = 0;
  let firstStopWaits: 'runtime' | 'boot' | 'files' | undefined;
  /** When the last signal that counted arrived. */
  let countedAt = -Infinity;
  const stop = (sig: string) => {
    // Ctrl-C under `npm start` (and any signal sent to a process group) arrives twice at once, each time it is pressed:
    // that is one signal, not the next one (a second press read as two would kill at once).
    const now = performance.now();
    if (now - countedAt < REPEAT_SIGNAL_MS) {
      return void log?.info({ signal: sig }, signals === 1 ? 'signal repeated at once: still draining (a later one exits now)' : 'signal repeated at once: taken as one');
    }
    countedAt = now;
    if (++signals > 1) {
      // process.exit() while a worker is inside an ONNX Runtime call aborts the process (its static destructors run
      // under the call): the second signal ends the drain instead, which stops the generations at their next step.
      // A third one does not wait for that.
      if (signals > 2) {
        terminationReason(`diffusers-runtime: a third signal (${sig}) during the stop: killed at once`);
        killNow();
      }
      if (rt) {
        log?.warn({ signal: sig }, 'second signal: ending the drain now (generations stop at their next step; exit 1)');
        terminationReason(`diffusers-runtime: second signal (${sig}): the drain was ended, generations in flight stopped at their next step (exit 1)`);
        rt.endGrace();
        return;
      }
      // Still starting (main returns at its next check): no drain to end. The stop goes on with what it waits for,
      // within its bound; the second signal makes its exit 1 where it finishes (leave).
      const waits = firstStopWaits === 'boot' ? 'the model fetch to stop and its cache entry lease to be released' : 'the file system calls still pending (a volume slow to answer)';
      const line = `second signal (${sig}) while the server was still starting: no request or generation to stop; the stop still waits up to ${CLEANUP_MS / 1000} s for ${waits}, then exits (1 where they finished); a third signal ends it at once`;
      if (log) log.warn({ signal: sig }, line);
      else process.stderr.write(`diffusers-runtime: ${line}\n`);
      terminationReason(`diffusers-runtime: ${line}`);
      return;
    }
    events?.emit('signal', { signal: sig }, 'signal received');
    // A second signal during the cleanup or the wait after it still makes the exit 1, as it says.
    const exit = (code: number, cleanup: Cleanup) => void leave(() => (signals > 1 ? 1 : code), sig, cleanup, { cfg, log, rt });
    const r = rt;
    // What this stop waits for, as the first signal chose it (a boot begun after it is never started: main returns).
    firstStopWaits = r ? 'runtime' : resolving ? 'boot' : 'files';
    if (r) void r.close().then(() => exit(Number(process.exitCode ?? 0), r.cleanup!));
    else if (resolving) {
      // As close()'s cleanup: the plan's lease is released on the cache, once the plan (itself on the cache) is made.
      const b = resolving, cleanup = startCleanup({ failed: warnStepFailed(log) });
      void cleanup.step('the model fetch and the cache entry lease', async () => (await b).stop()).then(() => exit(0, cleanup));
    } else exit(0, startCleanup());
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  const problems: string[] = [];
  const defaultCacheDir = await lookForDefaultCacheDir(process.env);
  if (signals > 0) return;
  try {
    cfg = loadConfig(process.env, { defaultCacheDir });
  } catch (err) {
    if (!(err instanceof ConfigError)) {
      fatalLine(String(err));
      process.exit(2);
    }
    problems.push(...err.problems);
  }
  // The scheduler's name is checked with the rest, other variables bad or not: one run names every bad one. Its form
  // first (loadConfig's problem, if any, already says what is wrong with it).
  const formBad = problems.some((p) => p.startsWith('DEFAULT_SCHEDULER'));
  const unknownScheduler = unknownDefaultScheduler(cfg ? cfg.defaultScheduler : formBad ? undefined : process.env.DEFAULT_SCHEDULER?.trim() || undefined);
  if (cfg) problems.push(...unaddressableUris(cfg));
  // Without STORAGE_URI and /mnt/models the server serves its demo model, ready: a mistyped name would pass unseen but
  // for its warning, the InferenceService Ready with noise for images. A /mnt/models (KServe's storage initializer
  // filled it) is the model, and a STORAGE_URL beside it may come from a Secret shared with envFrom: served, the warning
  // (logStartWarnings) naming the variable. A plural (STORAGE_URIS) may be a platform's own variable: a warning only.
  const uriTypo = cfg?.storageUri === undefined
    ? misspelledVariables(process.env).find((m) => m.meant === 'STORAGE_URI' && m.variable.toUpperCase() !== 'STORAGE_URIS')
    : undefined;
  if (uriTypo && !(cfg?.modelInitAsync || (await modelDirAnswers()))) {
    problems.push(`STORAGE_URI is not set, but ${uriTypo.variable} is: did you mean STORAGE_URI? (without it, and without ${KSERVE_MODEL_DIR}, the server would serve its embedded demo model)`);
  }
  if (signals > 0) return;
  if (unknownScheduler !== undefined) problems.push(unknownScheduler);
  if (problems.length > 0 || !cfg) {
    // One clear line naming every bad variable, then a non-zero exit: Kubernetes shows it in the pod status.
    fatalLine(new ConfigError(problems).message);
    process.exit(2);
  }
  const trimmed = applyProcessDefaults();
  // The pipeline workers start first: a worker thread takes ~60 ms to boot before its own imports begin, and that
  // overlaps the listen here, then the imports below.
  const workers = spawnWorkers(cfg);
  let base: BaseServer;
  try {
    base = await (await import('./server/base.js')).listenBase(cfg.host, cfg.port, { maxConnections: cfg.maxConnections, corsAllowOrigins: cfg.corsAllowOrigins });
  } catch (err) {
    // One line, then a non-zero exit: a second server on a taken port never starts and shares its traffic.
    fatalLine((err as Error).message);
    process.exit(1);
  }
  // A signal during the listen chose a stop with no boot to end: a boot begun now would take a lease nothing releases.
  if (signals > 0) return;
  // Boot step 1, resolve, while the logger, the runtime and the routes load: a committed S3 cache entry's sessions start
  // in the workers as soon as it is found. Then the runtime, then the fetch: the server's code is loaded before the
  // fetch's calls on the cache begin. Node reads each module's file in libuv's pool, which the calls on a volume that
  // stopped answering hold (a download's writes fill it), and the listening line and every route but liveness would
  // wait for them; the resolve's calls, made one at a time, leave it room. A resolve held by the volume holds nothing
  // else: the runtime serves meanwhile (not ready), and a stop names what it waits for.
  const b = (resolving = (await import('./runtime/boot-sequence.js')).resolveBoot(cfg, workers));
  b.catch(() => undefined); // awaited below, and by a stop
  const [{ createLogger, logProcessFaults }, { Runtime }, wiring] = await Promise.all([import('./log.js'), import('./runtime/runtime.js'), serverModules()]);
  log = createLogger(cfg.logLevel);
  logProcessFaults(log);
  logStartWarnings(log, trimmed, cfg);
  events = new BootEvents(log);
  if (signals > 0) return;
  // performance.now() counts from process start, so 0 is "the process started".
  rt = new Runtime(cfg, log, { startedAt: 0, workers, events });
  // Its close stops the boot (the fetch, the leases) with the rest, whether the plan is made by then or not.
  rt.atClose(async () => (await b).stop());
  serve(base, rt, wiring);
  const boot = await b;
  if (signals > 0) return;
  // Steps 2-5: fetch, announce, load, warm.
  await boot.run(rt);
  if (rt.boot.state === 'failed' && cfg.exitOnBootFailure) process.exit(1);
}

/**
 * Ends the process after a stop: exit `code()`, once the file system calls still pending are answered (a slow volume's
 * are waited for, within the cleanup's bound), unless the stop left work unfinished or calls unanswered by then (a
 * volume that stopped answering: process.exit() would wait for them for good). Then one line names them and the
 * process ends as `sig`'s default action (128 + its number, 143 for SIGTERM): not 0, and not the kubelet's SIGKILL (137)
 * at the end of the pod's grace period.
 */
async function leave(code: () => number, sig: string, cleanup: Cleanup, o: { cfg: Readonly<Config> | undefined; log: Logger | undefined; rt: Runtime | undefined }): Promise<void> {
  const { cfg, log, rt } = o;
  const cacheDir = cfg?.cacheDir;
  const unanswered = await cleanup.unanswered();
  const unfinished = cleanup.unfinished;
  if (unfinished.length === 0 && unanswered === 0) {
    const c = code();
    // A graceful stop leaves no message (a hint written while serving no longer applies); a second signal's exit 1
    // left its own (stop).
    if (c === 0) clearTerminationMessage();
    process.exit(c);
  }
  // Each call named with the volume it is on: the cache, the model's folder (/mnt/models), a local LORA_URI.
  const volumes = serverVolumes(cfg);
  const pending = describePending(volumes);
  const signal = sig as NodeJS.Signals;
  const status = 128 + (osConstants.signals[signal] ?? 0);
  // A worker that did not stop is most often inside ONNX Runtime, creating a session from a file it cannot read.
  const sessions = rt?.boot.progress.sessions ?? {};
  const opening = unfinished.includes('the pipeline workers') ? [...(rt?.engine.announced ?? [])].filter(([c]) => !Object.hasOwn(sessions, c)).map(([, f]) => cacheRelative(cacheDir!, f)) : [];
  const what = [
    ...pendingByVolume(volumes),
    ...(opening.length > 0 ? [`the pipeline workers did not stop (still creating sessions from ${opening.join(', ')}: does their volume answer?)`] : []),
    ...(pending.length === 0 && unanswered > 0 ? [`${unanswered} file system call(s) still unanswered`] : []),
  ];
  if (what.length === 0) what.push(`${unfinished.join(', ')} did not finish`);
  const line = `shutdown did not finish: ${what.join('; ')}; exiting without waiting for it (exit ${status})`;
  if (log) log.error({ unfinished: [...unfinished], pending, unansweredFsCalls: unanswered, exitStatus: status }, line);
  else process.stderr.write(`diffusers-runtime: ${line}\n`);
  terminationReason(`diffusers-runtime: ${line}`);
  endBySignal(signal);
}

/**
 * Environment the process's libraries read themselves; set before the workers load onnxruntime-node. Returns the
 * credential variables whose surrounding whitespace was removed (trimCredentials), for logTrimmed.
 */
function applyProcessDefaults(env: NodeJS.ProcessEnv = process.env): string[] {
  // ONNX Runtime's telemetry (on by default in its official builds) writes a device id and an onnxruntime.db under
  // $HOME/.cache and a mat-debug-<pid>.log in the temp folder for every process, and tries to upload events: off,
  // unless the operator set ORT_DISABLE_TELEMETRY (empty counts as unset, as for every variable the server reads).
  if (!env.ORT_DISABLE_TELEMETRY?.trim()) env.ORT_DISABLE_TELEMETRY = '1';
  // The AWS SDK (the default S3 transport) prints a multi-line notice about its future Node requirement to stderr when
  // a client is made; the lockfile pins the SDK, and stderr carries only this process's own one-line errors.
  env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  return trimCredentials(env);
}

/**
 * One warning naming (never showing) the credentials that came with whitespace around them; settings that do nothing;
 * a variable that looks like one of ours mistyped (its value is not shown: it may be a key).
 */
function logStartWarnings(log: Logger, variables: readonly string[], cfg: Readonly<Config>): void {
  if (variables.length > 0) log.warn({ variables }, TRIMMED_CREDENTIALS);
  for (const m of misspelledVariables(process.env)) log.warn(m, misspelledWarning(m));
  if (cfg.executionProvider === 'cpu' && cfg.cudaProviderOptions.length > 0) log.warn('CUDA_PROVIDER_OPTIONS has no effect with EXECUTION_PROVIDER=cpu');
  for (const p of cfg.inputUriPrefixes) {
    const served = servedFrom({ bucket: p.bucket, key: p.key === '' || p.key.endsWith('/') ? p.key : `${p.key}/` }, cfg);
    if (served !== undefined) log.warn(`INPUT_URI_PREFIXES entry ${p.uri} lies under the ${served}: no input image is read from there`);
  }
}

/**
 * A runtime built in one go inside a process that embeds it (tests, tools), where `main` builds one in stages around
 * the listening socket: `listen(rt)` serves it, `bootRuntime(rt)` (runtime/boot-sequence.ts) boots it, `rt.close()`
 * ends it. Its workers start when it boots, unless `workers` are given.
 */
export async function createRuntime(cfg: Readonly<Config>, opts: { log?: Logger; workers?: SpawnedWorker[]; progressLogMs?: number } = {}): Promise<Runtime> {
  const trimmed = applyProcessDefaults();
  const [{ Runtime }, { createLogger }] = await Promise.all([import('./runtime/runtime.js'), import('./log.js')]);
  const log = opts.log ?? createLogger(cfg.logLevel);
  logStartWarnings(log, trimmed, cfg);
  return new Runtime(cfg, log, { ...(opts.workers ? { workers: opts.workers } : {}), ...(opts.progressLogMs ? { progressLogMs: opts.progressLogMs } : {}) });
}

type Wiring = Awaited<ReturnType<typeof serverModules>>;
const serverModules = async () => {
  const [app, random] = await Promise.all([import('./server/app.js'), import('./pipeline/random.js')]);
  return { registerRoutes: app.registerRoutes, randomSeed: random.randomSeed };
};

/** Every route beyond liveness on the already-listening server, answered by `rt`; close() stops the listener first. */
function serve(base: BaseServer, rt: Runtime, w: Wiring): number {
  const ctx: ServerContext = {
    cfg: rt.cfg,
    log: rt.log,
    metrics: rt.metrics,
    boot: rt.boot,
    engine: rt.engine,
    randomSeed: w.randomSeed,
    stopping: () => rt.stopping,
    shutdown: rt.shutdown,
    images: rt.images,
    inputBudget: rt.inputBudget,
    generate: (reqs, signal, opts) => rt.generation.generate(reqs, signal, opts),
    track: (id, work) => rt.generation.track(id, work),
    admit: (id) => rt.generation.admit(id),
  };
  w.registerRoutes(base, ctx);
  rt.setListener(base);
  rt.events.emit('listening', { port: base.port, host: rt.cfg.host, config: describeConfig(rt.cfg) }, 'listening');
  return base.port;
}

/** Listens on the runtime's HOST and PORT and serves it there, as `main` does; for a runtime built in-process. */
export async function listen(rt: Runtime): Promise<number> {
  const [{ listenBase }, wiring] = await Promise.all([import('./server/base.js'), serverModules()]);
  return serve(await listenBase(rt.cfg.host, rt.cfg.port, { maxConnections: rt.cfg.maxConnections, corsAllowOrigins: rt.cfg.corsAllowOrigins }), rt, wiring);
}

/** True when this module is the process's entry (`node dist/src/main.js`), not an import (tests). */
function isEntry(): boolean {
  const arg = process.argv[1];
  if (arg === undefined) return false;
  const self = fileURLToPath(import.meta.url);
  for (const p of [arg, `${arg}.js`]) {
    try {
      if (realpathSync(p) === self) return true;
    } catch {
      // not this spelling
    }
  }
  return false;
}

if (isEntry()) {
  main().catch((err: unknown) => {
    // Out of descriptors before the server could serve (most often its code could not be loaded, which stays failed in
    // this process: descriptors.ts firstUse): one line, and a restart, whose download resumes from the entry's journal.
    const why = shortage(err);
    if (why === undefined) {
      // Node prints the stack and exits 1; the pod status gets its first line.
      terminationReason(`diffusers-runtime: unexpected error: ${(err as Error)?.message ?? String(err)}`);
      throw err;
    }
    fatalLine(`TOO_MANY_OPEN_FILES: ${shortageError('the server could not start', why, `${S3_ADVICE}; a download in progress resumes at the next start`).message}`);
    process.exit(1);
  });
}
