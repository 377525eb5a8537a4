/** @module A generation request, validated against the contract with every problem named at once. */
import { RuntimeError } from '../errors.js';
import type { Config, OutputFormat } from '../config.js';

export const MAX_SEED = Number.MAX_SAFE_INTEGER; // 2^53 - 1

/** Model-dependent defaults, reported by the pipeline once the model is loaded. */
export interface ModelDefaults {
  steps: number;
  guidance: number;
  height: number;
  width: number;
  scheduler: string;
}

/** One prompt of a request, with everything needed to generate its images. */
export interface GenerationItem {
  prompt: string;
  negativePrompt: string | undefined;
  /** First image's seed; image i uses seed + i (one generator per image). */
  seed: number;
  seedWasGiven: boolean;
  numImages: number;
}

/** The shape of a generation: requests with equal shapes can share one batch. */
export interface GenerationShape {
  steps: number;
  guidance: number;
  height: number;
  width: number;
  scheduler: string | undefined;
  eta: number;
  guidanceRescale: number;
}

export interface OutputOptions {
  format: OutputFormat;
  quality: number | undefined;
  uri: string | undefined;
}

export interface GenerationRequest {
  shape: GenerationShape;
  items: GenerationItem[];
  output: OutputOptions;
  /** Progress previews every N steps (WebSocket only); 0 = none. */
  previewEvery: number;
}

export const shapeKey = (s: GenerationShape): string =>
  `${s.width}x${s.height}|${s.steps}|${s.guidance}|${s.scheduler ?? ''}|${s.eta}|${s.guidanceRescale}`;

const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);
const FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Rejects prototype-polluting keys anywhere in a parsed body. */
export function assertSafeKeys(v: unknown, where: string, depth = 0): void {
  if (depth > 32) throw new RuntimeError('INVALID_INPUT', `${where} is nested too deeply`);
  if (Array.isArray(v)) v.forEach((x, i) => assertSafeKeys(x, `${where}[${i}]`, depth + 1));
  else if (isObj(v)) {
    for (const k of Object.keys(v)) {
      if (FORBIDDEN_KEYS.has(k)) throw new RuntimeError('INVALID_INPUT', `${where} has a forbidden key ${JSON.stringify(k)}`);
      assertSafeKeys(v[k], `${where}.${k}`, depth + 1);
    }
  }
}

export interface ParseContext {
  cfg: Pick<Config, 'maxSteps' | 'maxImageSize' | 'maxImagesPerRequest' | 'defaultOutputFormat'>;
  defaults: ModelDefaults;
  /** Throws RuntimeError INVALID_INPUT naming the known schedulers when the name is unknown. */
  checkScheduler: (name: string) => string;
  randomSeed: () => number;
}

/**
 * Turns `instances` (V1) or the equivalent V2 fields into generation requests. Each instance is one
 * request shape; instances with the same shape are grouped so they can share a batch.
 */
export function parseInstances(instances: unknown, ctx: ParseContext, where = 'instances'): GenerationRequest[] {
  if (!Array.isArray(instances)) throw new RuntimeError('INVALID_INPUT', `"${where}" must be a list of objects`);
  if (instances.length === 0) throw new RuntimeError('INVALID_INPUT', `"${where}" must not be empty`);
  const bad: string[] = [];
  const out: GenerationRequest[] = [];
  let images = 0;
  instances.forEach((inst, i) => {
    const r = parseInstance(inst, ctx, `${where}[${i}]`, bad);
    if (r) {
      images += r.items.reduce((n, it) => n + it.numImages, 0);
      out.push(r);
    }
  });
  if (bad.length === 0 && images > ctx.cfg.maxImagesPerRequest) {
    bad.push(`a request may ask for at most ${ctx.cfg.maxImagesPerRequest} images, got ${images}`);
  }
  if (bad.length > 0) throw new RuntimeError('INVALID_INPUT', bad.join('; '));
  return out;
}

function parseInstance(inst: unknown, ctx: ParseContext, w: string, bad: string[]): GenerationRequest | undefined {
  if (!isObj(inst)) {
    bad.push(`${w} must be an object with a "prompt"`);
    return undefined;
  }
  const { cfg, defaults } = ctx;
  const has = (k: string) => Object.hasOwn(inst, k) && inst[k] !== null && inst[k] !== undefined;
  const str = (k: string, required: boolean, maxLen = 10_000): string | undefined => {
    if (!has(k)) {
      if (required) bad.push(`${w}.${k} is required and must be a string`);
      return undefined;
    }
    const v = inst[k];
    if (typeof v !== 'string') {
      bad.push(`${w}.${k} must be a string, got ${typeName(v)}`);
      return undefined;
    }
    if (v.length > maxLen) {
      bad.push(`${w}.${k} must be at most ${maxLen} characters, got ${v.length}`);
      return undefined;
    }
    return v;
  };
  const int = (k: string, dflt: number, min: number, max: number): number => {
    if (!has(k)) return dflt;
    const v = inst[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      bad.push(`${w}.${k} must be an integer from ${min} to ${max}, got ${show(v)}`);
      return dflt;
    }
    return v;
  };
  const num = (k: string, dflt: number, min: number, max: number): number => {
    if (!has(k)) return dflt;
    const v = inst[k];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
      bad.push(`${w}.${k} must be a number from ${min} to ${max}, got ${show(v)}`);
      return dflt;
    }
    return v;
  };
  const size = (k: string, dflt: number): number => {
    if (!has(k)) return dflt;
    const v = inst[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0 || v % 8 !== 0 || v > cfg.maxImageSize) {
      bad.push(`${w}.${k} must be a positive multiple of 8 up to ${cfg.maxImageSize}, got ${show(v)}`);
      return dflt;
    }
    return v;
  };

  const prompt = str('prompt', true);
  const negativePrompt = str('negative_prompt', false);
  const steps = int('num_inference_steps', defaults.steps, 1, cfg.maxSteps);
  const guidance = num('guidance_scale', defaults.guidance, 0, 100);
  const height = size('height', defaults.height);
  const width = size('width', defaults.width);
  const eta = num('eta', 0, 0, 1);
  const guidanceRescale = num('guidance_rescale', 0, 0, 1);
  const numImages = int('num_images_per_prompt', 1, 1, cfg.maxImagesPerRequest);
  const previewEvery = int('preview_every', 0, 0, cfg.maxSteps);
  const seedGiven = has('seed');
  const seed = int('seed', 0, 0, MAX_SEED);
  if (seedGiven && seed + numImages - 1 > MAX_SEED) bad.push(`${w}.seed + num_images_per_prompt - 1 must be at most ${MAX_SEED}`);
  let scheduler: string | undefined;
  const schedName = str('scheduler', false, 64);
  if (schedName !== undefined) {
    try {
      scheduler = ctx.checkScheduler(schedName);
    } catch (err) {
      bad.push(`${w}.scheduler: ${(err as Error).message}`);
    }
  }
  let format = cfg.defaultOutputFormat;
  const fmt = str('output_format', false, 16);
  if (fmt !== undefined) {
    const f = fmt.toLowerCase() === 'jpg' ? 'jpeg' : fmt.toLowerCase();
    if ((FORMATS as readonly string[]).includes(f)) format = f as OutputFormat;
    else bad.push(`${w}.output_format must be one of ${FORMATS.join(', ')}, got ${JSON.stringify(fmt)}`);
  }
  const quality = has('quality') ? int('quality', 90, 1, 100) : undefined;
  const uri = str('output_uri', false, 2048);
  if (uri !== undefined && !/^s3:\/\/[^/]+\/.+/.test(uri)) bad.push(`${w}.output_uri must look like s3://bucket/key, got ${JSON.stringify(uri)}`);
  if (prompt === undefined) return undefined;
  return {
    shape: { steps, guidance, height, width, scheduler, eta, guidanceRescale },
    items: [{ prompt, negativePrompt, seed: seedGiven ? seed : ctx.randomSeed(), seedWasGiven: seedGiven, numImages }],
    output: { format, quality, uri },
    previewEvery,
  };
}

function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  return typeof v === 'object' ? 'an object' : typeof v;
}

function show(v: unknown): string {
  if (typeof v === 'number') return String(v);
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v);
  return typeName(v);
}
