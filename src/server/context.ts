/** @module What every protocol handler (V1, V2, WebSocket, OpenAI) shares: readiness checks, parsing, generation. */
import { defaultMaxListeners, setMaxListeners } from 'node:events';
import type { Config } from '../config.js';
import { deadline } from '../deadline.js';
import { RuntimeError, stoppedWhile } from '../errors.js';
import type { Logger, RequestIds } from '../log.js';
import type { KserveStage, Metrics, RejectReason } from '../metrics.js';
import type { Boot } from '../runtime/boot.js';
import type { Engine, Progress, TaskResult } from '../runtime/engine.js';
import type { GenerateOptions } from '../runtime/generation.js';
import { type GenerationRequest, type ParseContext } from '../runtime/request.js';
import { resolveImages, type InputBudget } from '../runtime/image-request.js';
import type { ImageSource } from '../runtime/image-source.js';
import { json, jsonText, nonEmpty, printable, type Reply } from './http.js';

export interface ServerContext {
  cfg: Readonly<Config>;
  log: Logger;
  metrics: Metrics;
  boot: Boot;
  engine: Engine;
  /** The seed of a request that gives none. */
  randomSeed: () => number;
  /** True between SIGTERM and exit: readiness is false and new work gets 503. */
  stopping: () => boolean;
  /** Aborted at SIGTERM: connections that wait for a request (WebSocket) are closed with 503. */
  shutdown: AbortSignal;
  /** Reads s3:// input images (img2img, inpainting). */
  images: ImageSource;
  /** What the input images of all requests in flight may hold at once (INPUT_IMAGES_MB). */
  inputBudget: InputBudget;
  /** Runs requests through the result cache and the queue, counted in flight; results in request order. */
  generate: (reqs: GenerationRequest[], signal: AbortSignal, opts?: GenerateOptions) => Promise<TaskResult[]>;
  /** Counts `work` as request `id` in flight (inference_requests_in_flight, the SIGTERM drain); nested work counts once. */
  track: <T>(id: object, work: () => Promise<T>) => Promise<T>;
  /** Refuses request `id` in flight 503 SHUTTING_DOWN (counted) unless it was in flight before SIGTERM (Generation.admit). */
  admit: (id: object) => void;
}

/**
 * KServe's 404 for a model name this server does not serve (every route and the WebSocket), plus the name it does
 * serve and where the client's protocol lists it: a client written for `model` meets an InferenceService's own name
 * (MODEL_NAME={{.Name}}) on KServe.
 */
export const unknownModel = (name: string, served: string, list = '/v1/models'): RuntimeError =>
  new RuntimeError('MODEL_NOT_FOUND', `Model with name ${name} does not exist. This server serves "${served}" (GET ${list}).`);

/**
 * The model endpoint (`/v1/models/{name}`, `/v1/models/{name}/ready`, `/v2/models/{name}/ready`): 200 once ready;
 * while booting, failed or stopping a 503 carrying the boot state and progress (DESIGN.md); 404 for another name.
 */
export function modelStatus(ctx: ServerContext, name: string): Reply {
  if (name !== ctx.cfg.modelName) throw unknownModel(name, ctx.cfg.modelName);
  if (ctx.boot.ready && !ctx.stopping()) return json(200, { name, ready: true });
  throw new RuntimeError('MODEL_NOT_READY', `Model with name ${name} is not ready.`, { retryAfter: 5, fields: { name, ready: false, ...ctx.boot.describe() } });
}

/** The 503 for a request to `name` once SIGTERM has come: retry on another pod. */
export const shuttingDown = (name: string): RuntimeError =>
  new RuntimeError('SHUTTING_DOWN', `Model with name ${name} is not ready. The server is shutting down.`, { retryAfter: 1 });

/**
 * KServe's checks before reading a body: unknown model 404, not ready (or stopping) 503 with Retry-After. A 503 is
 * counted in `inference_rejected_total` by reason; an unknown model is a 404, not a refusal.
 */
export function assertServable(ctx: ServerContext, name: string): void {
  if (name !== ctx.cfg.modelName) throw unknownModel(name, ctx.cfg.modelName);
  const refuse = (reason: RejectReason, err: RuntimeError): RuntimeError => {
    ctx.metrics.rejected.inc({ model_name: ctx.cfg.modelName, reason });
    return err;
  };
  if (ctx.stopping()) throw refuse('shutting_down', shuttingDown(name));
  if (!ctx.boot.ready) {
    const { state, reason } = ctx.boot;
    const next = state === 'retrying' ? ctx.boot.retry()?.nextAttemptInSeconds : undefined;
    const why = state === 'failed' ? ` Boot failed: ${reason ?? 'unknown reason'}`
      : next !== undefined ? ` Boot attempt failed, trying again in ${next} s: ${reason ?? 'unknown reason'}` : ` Boot state: ${state}.`;
    // Retrying: not before the next attempt has begun (and a fetch then takes a while more).
    const retryAfter = state === 'failed' ? 60 : Math.max(5, Math.ceil(next ?? 0));
    throw refuse('not_ready', new RuntimeError('MODEL_NOT_READY', `Model with name ${name} is not ready.${why}`, { retryAfter }));
  }
}

export function parseContext(ctx: ServerContext): ParseContext {
  const defaults = ctx.engine.defaults;
  if (!defaults) throw new RuntimeError('MODEL_NOT_READY', `Model with name ${ctx.cfg.modelName} is not ready.`, { retryAfter: 5 });
  return { cfg: ctx.cfg, defaults, randomSeed: ctx.randomSeed };
}

/**
 * Reads and decodes the requests' input images (400 naming the field for anything wrong with them), their bytes taken
 * from the input budget. Returns what gives them back: call it once the request has ended, whatever its outcome, and
 * no generation uses them (generation.ts: one may run on after its client left).
 */
export async function readImages(ctx: ServerContext, reqs: GenerationRequest[], signal?: AbortSignal): Promise<() => void> {
  if (!reqs.some((r) => r.image)) return () => undefined;
  // REQUEST_TIMEOUT_S bounds the reads too: an s3:// input the store stalls would otherwise hold its share of the
  // budget for as long as its client waits.
  const timeout = deadline(signal, ctx.cfg.requestTimeoutS * 1000);
  const both = timeout.signal;
  // The distinct s3:// inputs (an image and a mask per instance) are read at once, each read listening on the
  // request's signal until it ends: more than Node's 10 is no leak, so no warning for it.
  setMaxListeners(Math.max(defaultMaxListeners, 2 * reqs.length + 1), both);
  const hold = ctx.inputBudget.hold();
  try {
    await resolveImages(reqs, { cfg: ctx.cfg, source: ctx.images, hold }, both);
  } catch (err) {
    hold.release();
    if (err instanceof RuntimeError && err.code === 'BUSY') ctx.metrics.rejected.inc({ model_name: ctx.cfg.modelName, reason: 'input_budget' });
    if (timeout.timedOut && !signal?.aborted) {
      throw new RuntimeError('TIMEOUT', `reading the input images took longer than REQUEST_TIMEOUT_S=${ctx.cfg.requestTimeoutS}s and was stopped${stoppedWhile(err)}`, { cause: err });
    }
    throw err;
  } finally {
    timeout.clear();
  }
  return hold.release;
}

/**
 * KServe's stage histograms of one V1 or V2 predict request (request_{preprocess,predict,postprocess}_seconds): the
 * stage it is in is observed when the next begins or the request ends, whatever its outcome, as KServe's Model times
 * each stage that ran. Begins in preprocess.
 */
export interface Stages {
  next(stage: 'predict' | 'postprocess'): void;
  /** Observes the stage the request is in, if any; idempotent. */
  end(): void;
}

function kserveStages(ctx: ServerContext): Stages {
  const labels = { model_name: ctx.cfg.modelName };
  let stage: KserveStage | undefined = 'preprocess';
  let t0 = performance.now();
  const end = () => {
    if (stage !== undefined) ctx.metrics.kserveStages[stage].observe(labels, (performance.now() - t0) / 1000);
    stage = undefined;
  };
  return {
    next(s) {
      end();
      stage = s;
      t0 = performance.now();
    },
    end,
  };
}

/** Runs a V1 or V2 predict request's `work` with its KServe stages, the last one observed however it ends. */
export async function withKserveStages<T>(ctx: ServerContext, work: (stages: Stages) => Promise<T>): Promise<T> {
  const stages = kserveStages(ctx);
  try {
    return await work(stages);
  } finally {
    stages.end();
  }
}

/** generateWithImages' options: the generation's, but its reading, which generateWithImages gives. */
export interface WithImagesOptions extends Omit<GenerateOptions, 'read'> {
  /** The client request's ids (trace.ts): the generation path's lines about its batch name them. */
  ids?: RequestIds;
  /** Moved to predict once the input images are read, to postprocess once the images are made. */
  stages?: Stages;
}

/**
 * Every route's request: its input images read (readImages), then generated, in flight from the start of the reading
 * and within its own timeout (`timeoutMs`, V2's parameters.timeout); the images' share of the input budget is given
 * back once the request and its generations have ended, whatever their outcome.
 */
export async function generateWithImages(ctx: ServerContext, reqs: GenerationRequest[], signal: AbortSignal, o: WithImagesOptions = {}): Promise<TaskResult[]> {
  if (o.ids) for (const r of reqs) r.ids = o.ids;
  // KServe's predict stage begins once the input images are read, as its preprocess ends there.
  const read = async (s: AbortSignal) => {
    const release = await readImages(ctx, reqs, s);
    o.stages?.next('predict');
    return release;
  };
  const results = await ctx.generate(reqs, signal, { read, onProgress: o.onProgress, onQueued: o.onQueued, timeoutMs: o.timeoutMs });
  o.stages?.next('postprocess');
  return results;
}

/** Parses a JSON body the way KServe does: a parse failure is a 400 "Unrecognized request format". */
export function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(nonEmpty(jsonText(body)));
  } catch (err) {
    // V8's message quotes the body's first characters: a binary body's control bytes are escaped, not echoed
    throw new RuntimeError('INVALID_INPUT', `Unrecognized request format: ${printable((err as Error).message)}`);
  }
}
