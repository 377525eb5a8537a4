/** @module A generation request, validated against the contract with every problem named at once. */
import { RuntimeError } from '../errors.js';
import type { Config, OutputFormat } from '../config.js';
import type { RequestIds } from '../log.js';
import { lcmTimestepCount, unconditionalPass, type GenerationShape, type ImageMode, type JobItem, type ModelDefaults } from '../pipeline/job.js';
import { DEFAULT_QUALITY, formatRefuses } from '../pipeline/image.js';
import { ETA_CLASSES, schedulerClassOf, unknownDefaultScheduler, unknownSchedulerName } from '../pipeline/schedulers/names.js';
import { isObj, show, typeName } from './fields.js';
import { IMAGE_FIELDS, imageMode, parseImageFields, type ImageRequest } from './image-request.js';
import { keyProblem, parseS3Object, underS3Prefix } from '../storage/uri.js';
import { inputRefusal, servedFrom } from './input-uris.js';
import { fallbackProblem, virtualHostedFallback } from '../storage/addressing.js';

export const MAX_SEED = Number.MAX_SAFE_INTEGER; // 2^53 - 1

export interface OutputOptions {
  format: OutputFormat;
  quality: number | undefined;
  uri: string | undefined;
}

export interface GenerationRequest {
  shape: GenerationShape;
  items: JobItem[];
  /** Every item's seed came with the request (none was drawn at random): the result cache may answer it. */
  seedsGiven: boolean;
  output: OutputOptions;
  /** Progress previews every N steps (WebSocket only); 0 = none. */
  previewEvery: number;
  /** Image-to-image or inpainting inputs (image-request.ts); absent for text-to-image. */
  image?: ImageRequest;
  /** LoRA adapters to merge, sorted by name (absent or empty: the base model). */
  loras?: LoraRequest[];
  /** The client request's ids (the server sets them), for the lines the generation path logs about its batch. */
  ids?: RequestIds;
}

/** One adapter a request names, and its scale. */
export interface LoraRequest {
  name: string;
  scale: number;
}

/** Adapter names: one path segment, so a name never leaves the adapters' folder or prefix. */
export const LORA_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Scales outside this range are refused: at such weights an adapter only destroys the image. */
export const MAX_LORA_SCALE = 10;

/** The adapter set's key: the names and scales in name order ('' for none). Requests with different keys never share a batch. */
export const lorasKey = (loras: readonly LoraRequest[] | undefined): string => (loras ?? []).map((l) => `${l.name}:${l.scale}`).join(',');

/**
 * The `loras` field: a list of `{"name", "scale"}` (scale defaults to 1) or of names. Problems go to `bad`; the
 * adapters come back sorted by name, so the same set in any order is one set.
 */
export function parseLoras(v: unknown, w: string, maxLoras: number, bad: string[], setsOff = false): LoraRequest[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) {
    bad.push(`${w} must be a list of {"name": …, "scale": …}`);
    return [];
  }
  // Refused before any adapter is looked for (a LORA_URI one would be downloaded first).
  if (setsOff && v.length > 0) {
    bad.push(`${w}: LoRA adapters are turned off on this server (LORA_MAX_SETS=0)`);
    return [];
  }
  if (v.length > maxLoras) {
    bad.push(`${w} names ${v.length} adapters; a request may use at most ${maxLoras} (MAX_LORAS)`);
    return [];
  }
  const out: LoraRequest[] = [];
  v.forEach((x, i) => {
    const wi = `${w}[${i}]`;
    const o = typeof x === 'string' ? { name: x } : x;
    if (!isObj(o)) return void bad.push(`${wi} must be an object {"name": …, "scale": …} or a name`);
    for (const k of Object.keys(o)) if (k !== 'name' && k !== 'scale') pushUnknownField(bad, `${wi}.`, k, ['name', 'scale']);
    const { name, scale = 1 } = o as { name?: unknown; scale?: unknown };
    // Both fields are checked before giving up on the element: a bad name never hides a bad scale.
    const nameOk = typeof name === 'string' && LORA_NAME.test(name);
    const scaleOk = typeof scale === 'number' && Number.isFinite(scale) && Math.abs(scale) <= MAX_LORA_SCALE;
    if (!nameOk) bad.push(`${wi}.name must be an adapter name (letters, digits, '.', '_', '-'; up to 128), got ${show(name)}`);
    if (!scaleOk) bad.push(`${wi}.scale must be a number from -${MAX_LORA_SCALE} to ${MAX_LORA_SCALE}, got ${show(scale)}`);
    if (!nameOk || !scaleOk) return;
    if (out.some((l) => l.name === name)) return void bad.push(`${wi}.name "${name}" appears twice; give each adapter once with its scale`);
    out.push({ name, scale });
  });
  return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * What requests of one batch must share: size, steps, scheduler name, whether there is an unconditional pass
 * (unconditionalPass, the pipeline's own rule: never on a UNet that embeds the guidance scale), and eta where the
 * scheduler class the request runs takes it (ETA_CLASSES; no name: the model's own class). Not the guidance scale
 * nor guidance_rescale: each image is guided and rescaled by its own request's (JobItem), per image. `model`
 * undefined (no model loaded): eta always counts and guidance above 1 is taken for an unconditional pass.
 */
export const shapeKey = (s: GenerationShape, model: Pick<ModelDefaults, 'scheduler' | 'guidanceEmbedding'> | undefined): string => {
  const cls = schedulerClassOf(s.scheduler, model?.scheduler);
  const eta = cls !== undefined && !ETA_CLASSES.has(cls) ? '' : s.eta;
  const cfg = unconditionalPass(s.guidance, model?.guidanceEmbedding === true) ? 'cfg' : 'no-cfg';
  return `${s.width}x${s.height}|${s.steps}|${cfg}|${s.scheduler ?? ''}|${eta}`;
};

const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);
const FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];
const EXT: Readonly<Record<OutputFormat, string>> = { png: 'png', jpeg: 'jpg', webp: 'webp' };

/**
 * The object keys `output_uri` writes for `n` images of `format`: the key the client gave for one, `<stem>-<i>.<ext>`
 * for several (i from 0, the key's own extension dropped): `out/fox.png` with 2 images → `out/fox-0.png`, `out/fox-1.png`.
 */
export function outputKeys(key: string, n: number, format: OutputFormat): string[] {
  if (n === 1) return [key];
  const stem = key.replace(/\.(png|jpe?g|webp)$/i, '');
  return Array.from({ length: n }, (_, i) => `${stem}-${i}.${EXT[format]}`);
}

/** S3's limit on an object key, in UTF-8 bytes: a longer one is refused (KeyTooLongError) after the generation ran. */
export const MAX_KEY_BYTES = 1024;

/** The UTF-8 length of the longest key output_uri writes for `n` images. */
const longestKeyBytes = (key: string, n: number, format: OutputFormat): number => Math.max(...outputKeys(key, n, format).map((k) => Buffer.byteLength(k)));

/** Every field of an instance (V1), a WebSocket message, or a V2 input / parameter (V2 has no preview_every). */
export const INSTANCE_FIELDS = [
  'prompt', 'negative_prompt', 'num_inference_steps', 'guidance_scale', 'height', 'width', 'seed', 'scheduler',
  'num_images_per_prompt', 'eta', 'guidance_rescale', 'output_format', 'quality', 'output_uri', 'preview_every', 'loras',
  ...IMAGE_FIELDS,
] as const;

/**
 * What AUTOMATIC1111's web UI API (and clients written for it) call these fields. They are not accepted as aliases:
 * their values differ too (sampler names such as "DPM++ 2M Karras" vs our scheduler names), so a request that uses
 * them gets a 400 naming our field instead of silently running with defaults.
 */
export const A1111_NAMES: Readonly<Record<string, string>> = {
  cfg_scale: 'guidance_scale',
  steps: 'num_inference_steps',
  sampler_name: 'scheduler',
  sampler_index: 'scheduler',
  scheduler_name: 'scheduler',
  batch_size: 'num_images_per_prompt',
  n_iter: 'num_images_per_prompt',
  negative: 'negative_prompt',
  guidance: 'guidance_scale',
  num_steps: 'num_inference_steps',
  sampler: 'scheduler',
  format: 'output_format',
  init_images: 'image',
  init_image: 'image',
  denoising_strength: 'strength',
  mask: 'mask_image',
};

function editDistance(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const up = prev[j]!;
      prev[j] = Math.min(up + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = up;
    }
  }
  return prev[b.length]!;
}

/** The known field a user most likely meant by `name`: AUTOMATIC1111's names first, then the closest spelling. */
export function nearestField(name: string, known: readonly string[]): string | undefined {
  const k = name.toLowerCase().replace(/[\s-]+/g, '_');
  const alias = A1111_NAMES[k];
  if (alias !== undefined && known.includes(alias)) return alias;
  if (known.includes(k)) return k;
  // A suggestion only when it is plausibly a typo: a third of the name's length at most.
  const most = Math.max(2, Math.floor(k.length / 3));
  let best: string | undefined;
  let bestD = Infinity;
  for (const f of known) {
    // The length difference is a lower bound of the distance: a name far longer than every field (a 1 MB key) costs
    // no O(length × field) table.
    if (Math.abs(k.length - f.length) > most) continue;
    const d = editDistance(k, f);
    if (d < bestD) [best, bestD] = [f, d];
  }
  return best !== undefined && bestD <= most ? best : undefined;
}

/**
 * `<where>.<key> is not a known field; did you mean …?` (the same wording in V1, V2 and the WebSocket). `quoted`: the key
 * is always shown in quotes, as a V2 input's name is everywhere else (`input "text"`, not `input text`).
 */
export function unknownField(where: string, key: string, known: readonly string[], quoted = false): string {
  const near = nearestField(key, known);
  const shown = !quoted && /^[A-Za-z_][A-Za-z0-9_]{0,39}$/.test(key) ? key : JSON.stringify(key.length > 40 ? `${key.slice(0, 40)}…` : key);
  const from = Object.hasOwn(A1111_NAMES, key.toLowerCase()) ? " (AUTOMATIC1111's name)" : '';
  return near !== undefined ? `${where}${shown} is not a known field${from}; did you mean "${near}"?` : `${where}${shown} is not a known field; known fields: ${known.join(', ')}`;
}

/** At most this many problems are listed in one error; the rest are counted. */
export const MAX_LISTED_PROBLEMS = 20;

/**
 * Adds unknownField's problem to `bad`. Past the problems an error lists, only a short line that is never shown: a 1 MB
 * body of 70,000 unknown keys cost 1.5 s of the main thread in spelling suggestions.
 */
export function pushUnknownField(bad: string[], where: string, key: string, known: readonly string[], quoted = false): void {
  bad.push(bad.length < MAX_LISTED_PROBLEMS ? unknownField(where, key, known, quoted) : `${where}${JSON.stringify(key.slice(0, 40))} is not a known field`);
}

/** Joins problems for one error message: the first ones in full, then how many more there were. */
export function joinProblems(bad: readonly string[]): string {
  if (bad.length <= MAX_LISTED_PROBLEMS) return bad.join('; ');
  return `${bad.slice(0, MAX_LISTED_PROBLEMS).join('; ')}; … and ${bad.length - MAX_LISTED_PROBLEMS} more problems`;
}

/**
 * The size checks that come before any per-item work, so a huge list costs one comparison, not a problem per element:
 * each instance asks for at least one image.
 */
export function checkInstanceCount(instances: unknown, max: number, where = 'instances'): asserts instances is unknown[] {
  if (!Array.isArray(instances)) throw new RuntimeError('INVALID_INPUT', `"${where}" must be a list of objects`);
  if (instances.length === 0) throw new RuntimeError('INVALID_INPUT', `"${where}" must not be empty`);
  if (instances.length > max) {
    throw new RuntimeError('INVALID_INPUT', `"${where}" has ${instances.length} entries; a request may ask for at most ${max} images (MAX_IMAGES_PER_REQUEST)`);
  }
}

/**
 * Rejects, anywhere in a parsed body, prototype-polluting keys and text that is not Unicode: a lone surrogate escape
 * ("\ud800" without its pair) parses to a string that UTF-8 cannot hold, and the tokenizer would read it as U+FFFD.
 */
export function assertSafeJson(v: unknown, where: string, depth = 0): void {
  if (depth > 32) throw new RuntimeError('INVALID_INPUT', `${where} is nested too deeply`);
  if (typeof v === 'string') {
    if (!(v as WellFormed).isWellFormed()) throw new RuntimeError('INVALID_INPUT', `${where} holds ${loneSurrogate(v)}, which is not a character; send the character itself, or both halves of its surrogate pair`);
  } else if (Array.isArray(v)) v.forEach((x, i) => assertSafeJson(x, `${where}[${i}]`, depth + 1));
  // Bytes (an image a form or V2's binary data carried) hold no keys or text to check.
  else if (isObj(v) && !ArrayBuffer.isView(v)) {
    for (const k of Object.keys(v)) {
      if (FORBIDDEN_KEYS.has(k)) throw new RuntimeError('INVALID_INPUT', `${where} has a forbidden key ${JSON.stringify(k)}`);
      if (!(k as WellFormed).isWellFormed()) throw new RuntimeError('INVALID_INPUT', `${where} has a key that holds ${loneSurrogate(k)}, which is not a character`);
      assertSafeJson(v[k], `${where}.${k}`, depth + 1);
    }
  }
}

// ES2024's String.prototype.isWellFormed (Node 20+); the project's lib is ES2023.
type WellFormed = string & { isWellFormed(): boolean };

/** The first lone surrogate of `s` and where it is: `a lone surrogate "\ud800" (index 4 of the string)`. */
function loneSurrogate(s: string): string {
  const m = /\p{Cs}/u.exec(s)!;
  return `a lone surrogate "\\u${m[0].charCodeAt(0).toString(16)}" (index ${m.index} of the string)`;
}

/**
 * Whether DEFAULT_SCHEDULER and DEFAULT_STEPS can serve the loaded model (its scheduler config, that scheduler's step
 * limits): checked once at boot, a CONFIG failure naming the variable, rather than a 400 on every request naming neither.
 */
export function checkServerDefaults(cfg: Pick<Config, 'defaultScheduler' | 'defaultSteps'>, defaults: ModelDefaults): void {
  const name = cfg.defaultScheduler;
  if (name !== undefined) {
    const unknown = unknownDefaultScheduler(name);
    if (unknown !== undefined) throw new RuntimeError('CONFIG', unknown);
    if (defaults.stepRanges && !defaults.stepRanges[name]) {
      const why = defaults.schedulerRefusals?.[name]?.message ?? 'a request naming it gets the reason';
      throw new RuntimeError('CONFIG', `DEFAULT_SCHEDULER=${name} cannot run from this model's scheduler/scheduler_config.json (${why}); unset it or name another scheduler`);
    }
  }
  const outside = cfg.defaultSteps === undefined ? undefined : stepsOutside(cfg.defaultSteps, name, defaults);
  if (outside !== undefined) throw new RuntimeError('CONFIG', `DEFAULT_STEPS ${outside}`);
}

/**
 * What DEFAULT_STEPS does to an image-to-image or inpainting request that sends no strength, where the model's default
 * strength (SDXL's 0.3 and 0.9999) leaves it no denoising step, or an LCM model's leaves fewer LCM timesteps than steps:
 * one warning each, said at boot. Not a failure: the text-to-image requests it is set for run as asked.
 */
export function defaultStepsWarnings(cfg: Pick<Config, 'defaultSteps'> & Partial<Pick<Config, 'defaultScheduler'>>, defaults: ModelDefaults): string[] {
  const steps = cfg.defaultSteps;
  if (steps === undefined || !defaults.vaeEncoder) return [];
  const out: string[] = [];
  // An LCM model's image-to-image takes every step from int(original · strength) timesteps (parseImageFields).
  const original = defaults.strengthSchedules?.[cfg.defaultScheduler ?? ''];
  if (original !== undefined) {
    const { strength } = defaults.modes.img2img;
    const kept = lcmTimestepCount(original, strength);
    if (kept < steps) {
      out.push(`DEFAULT_STEPS=${steps} with this model's default image-to-image strength ${strength} leaves ${kept} of the LCM schedule's timesteps (original_inference_steps ${original}), ` +
        `fewer than the steps: an image-to-image request that sends no strength is refused (400); it should send strength, or DEFAULT_STEPS be at most ${kept}`);
    }
  }
  for (const [mode, what, then] of [
    ['img2img', 'image-to-image', 'gets its picture back through the VAE, not denoised'],
    ['inpaint', 'inpainting', 'is refused (400)'],
  ] as const) {
    const { strength } = defaults.modes[mode];
    if ((mode === 'img2img' && original !== undefined) || Math.trunc(steps * strength) >= 1) continue;
    let enough = steps + 1;
    while (Math.trunc(enough * strength) < 1) enough++;
    out.push(`DEFAULT_STEPS=${steps} with this model's default ${what} strength ${strength} runs no denoising step: an ${what} request that sends no strength ${then}; it should send strength, or DEFAULT_STEPS be at least ${enough}`);
  }
  return out;
}

/**
 * The guidance_scale of a request of `mode` (undefined: text-to-image) that sends none: DEFAULT_GUIDANCE, else the
 * mode's diffusers pipeline class's (SDXL: 5.0 to text-to-image and image-to-image, 7.5 to inpaint). The warm-up's too.
 */
export const defaultGuidance = (cfg: Partial<Pick<Config, 'defaultGuidance'>>, defaults: ModelDefaults, mode: ImageMode | undefined): number =>
  cfg.defaultGuidance ?? (mode ? defaults.modes[mode].guidance : defaults.guidance);

/** Why `steps` is outside what scheduler `name` (undefined: the model's own) takes, or undefined when it is not. */
function stepsOutside(steps: number, name: string | undefined, defaults: ModelDefaults): string | undefined {
  const range = defaults.stepRanges?.[name ?? ''];
  if (!range || (steps >= range.min && steps <= range.max)) return undefined;
  return `must be from ${range.min} to ${range.max} for scheduler ${name ?? defaults.scheduler} (${range.why}), got ${steps}`;
}

export interface ParseContext {
  cfg: Pick<Config, 'maxSteps' | 'maxImageSize' | 'maxImagesPerRequest' | 'defaultOutputFormat'> &
    Partial<Pick<Config, 'maxLoras' | 'loraMaxSets' | 'storageUri' | 'loraUri' | 'inputUriPrefixes' | 'outputUriPrefixes' | 's3' | 'modelName' | 'defaultScheduler' | 'defaultSteps' | 'defaultGuidance'>>;
  defaults: ModelDefaults;
  /** The seed of a request that gives none. */
  randomSeed: () => number;
}

/**
 * Turns `instances` (V1) or the equivalent V2 fields into generation requests. Each instance is one
 * request shape; instances with the same shape are grouped so they can share a batch. `previews`: the caller streams
 * them (the WebSocket); elsewhere `preview_every` is refused rather than rendered for nobody. `relabel`: rewrites each
 * problem of instance `index` to name where the client put the value (V2: a parameter or an input tensor).
 */
export function parseInstances(instances: unknown, ctx: ParseContext, where = 'instances', previews = false, relabel?: (problem: string, index: number) => string): GenerationRequest[] {
  checkInstanceCount(instances, ctx.cfg.maxImagesPerRequest, where);
  let bad: string[] = [];
  const out: GenerationRequest[] = [];
  let images = 0;
  instances.forEach((inst, i) => {
    const from = bad.length;
    const r = parseInstance(inst, ctx, `${where}[${i}]`, bad, previews);
    if (relabel) for (let j = from; j < bad.length; j++) bad[j] = relabel(bad[j]!, i);
    if (r) {
      images += r.items.reduce((n, it) => n + it.numImages, 0);
      out.push(r);
    }
  });
  if (bad.length === 0 && images > ctx.cfg.maxImagesPerRequest) {
    bad.push(`a request may ask for at most ${ctx.cfg.maxImagesPerRequest} images, got ${images}`);
  }
  if (bad.length === 0) sharedOutputKeys(out, where, relabel, bad);
  // Relabelled, a value every instance shares (V2's parameters) is one problem, not one per instance.
  if (relabel) bad = [...new Set(bad)];
  if (bad.length > 0) throw new RuntimeError('INVALID_INPUT', joinProblems(bad));
  return out;
}

/**
 * Instances whose output_uri writes an object another instance writes too: both would upload to it, the last one
 * replacing the first, and the answer would name one object for two images. Also a V2 `parameters.output_uri` that
 * every prompt takes.
 */
function sharedOutputKeys(reqs: readonly GenerationRequest[], where: string, relabel: ((problem: string, index: number) => string) | undefined, bad: string[]): void {
  const writer = new Map<string, number>();
  reqs.forEach((r, i) => {
    const at = r.output.uri === undefined ? undefined : parseS3Object(r.output.uri);
    if (at === undefined) return;
    const n = r.items.reduce((k, it) => k + it.numImages, 0);
    for (const key of outputKeys(at.key, n, r.output.format)) {
      // Bucket and key, not the URI as sent: the scheme's case is free (S3://).
      const object = `s3://${at.bucket}/${key}`;
      const first = writer.get(object);
      if (first === undefined) {
        writer.set(object, i);
        continue;
      }
      const [a, b] = [first, i].map((j) => (relabel ?? ((t: string) => t))(`${where}[${j}].output_uri`, j));
      bad.push(a === b
        ? `${a} writes ${object} for both ${where}[${first}] and ${where}[${i}]; each image needs an object of its own: give one output_uri per ${where}`
        : `${a} and ${b} both write ${object}; each image needs an object of its own`);
      return;
    }
  });
}

function parseInstance(inst: unknown, ctx: ParseContext, w: string, bad: string[], previews: boolean): GenerationRequest | undefined {
  if (!isObj(inst)) {
    bad.push(`${w} must be an object with a "prompt"`);
    return undefined;
  }
  const { cfg, defaults } = ctx;
  for (const k of Object.keys(inst)) if (!(INSTANCE_FIELDS as readonly string[]).includes(k)) pushUnknownField(bad, `${w}.`, k, INSTANCE_FIELDS);
  const has = (k: string) => Object.hasOwn(inst, k) && inst[k] !== null && inst[k] !== undefined;
  const str = (k: string, required: boolean, maxLen = 10_000): string | undefined => {
    if (!has(k)) {
      if (required) bad.push(`${w}.${k} is required and must be a string`);
      return undefined;
    }
    const v = inst[k];
    if (typeof v !== 'string') {
      // diffusers takes a list of prompts in one call; here each prompt is its own instance.
      const hint = Array.isArray(v) && (k === 'prompt' || k === 'negative_prompt') && w.startsWith('instances[')
        ? ' (one prompt per instance: {"instances":[{"prompt":"a"},{"prompt":"b"}]})' : '';
      bad.push(`${w}.${k} must be a string, got ${typeName(v)}${hint}`);
      return undefined;
    }
    if (v.length > maxLen) {
      bad.push(`${w}.${k} must be at most ${maxLen} characters, got ${v.length}`);
      return undefined;
    }
    return v;
  };
  // A number from min to max (`whole`: an integer); absent, its default; otherwise named in `bad`, and the default.
  const ranged = (whole: boolean) => (k: string, dflt: number, min: number, max: number): number => {
    if (!has(k)) return dflt;
    const v = inst[k];
    if (typeof v !== 'number' || !(whole ? Number.isInteger(v) : Number.isFinite(v)) || v < min || v > max) {
      bad.push(`${w}.${k} must be ${whole ? 'an integer' : 'a number'} from ${min} to ${max}, got ${show(v)}`);
      return dflt;
    }
    return v;
  };
  const int = ranged(true);
  const num = ranged(false);
  const size = (k: string, dflt: number): number => {
    if (!has(k)) return dflt;
    const v = inst[k];
    // What diffusers' torch UNet pads around, an exported one cannot: a 500 from ONNX Runtime otherwise. The model's
    // multiple is named at once, so a 500 is not answered "multiple of 8" and then a 504 "multiple of 64".
    const m = defaults.sizeMultiple ?? 8;
    const why = m > 8 ? ` for this model (its exported UNet down-samples the latents by ${m / 8})` : '';
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0 || v > cfg.maxImageSize || (m === 8 && v % 8 !== 0)) {
      bad.push(`${w}.${k} must be a positive multiple of ${m} up to ${cfg.maxImageSize}${why}, got ${show(v)}`);
      return dflt;
    }
    if (v % m !== 0) {
      bad.push(`${w}.${k} must be a multiple of ${m}${why}, got ${v}`);
      return dflt;
    }
    return v;
  };

  const prompt = str('prompt', true);
  const negativePrompt = str('negative_prompt', false);
  // AUTOMATIC1111 takes adapters out of the prompt; here CLIP would read `<lora:x:0.8>` as words and the image would
  // come without the adapter, so the tag is named with the field that does it.
  for (const [k, text] of [['prompt', prompt], ['negative_prompt', negativePrompt]] as const) {
    const tag = text === undefined ? null : /<(?:lora|lyco):([^:<>\s]{1,128})(?::([-+]?[0-9.]{1,16}))?[^<>]{0,64}>/i.exec(text);
    if (tag === null) continue;
    const scale = tag[2] !== undefined && Number.isFinite(Number(tag[2])) ? Number(tag[2]) : 1;
    bad.push(`${w}.${k} holds ${JSON.stringify(tag[0])}, AUTOMATIC1111's LoRA syntax, which this runtime does not read from a prompt (it would be prompt text); `
      + `remove it and send ${w}.loras: [{"name":${JSON.stringify(tag[1])},"scale":${scale}}]`);
  }
  const steps = int('num_inference_steps', cfg.defaultSteps ?? defaults.steps, 1, cfg.maxSteps);
  const guidance = num('guidance_scale', defaultGuidance(cfg, defaults, imageMode(inst)), 0, 100);
  const height = size('height', defaults.height);
  const width = size('width', defaults.width);
  const eta = num('eta', 0, 0, 1);
  const guidanceRescale = num('guidance_rescale', 0, 0, 1);
  const numImages = int('num_images_per_prompt', 1, 1, cfg.maxImagesPerRequest);
  const previewEvery = int('preview_every', 0, 0, cfg.maxSteps);
  // 0 (no previews) is what this answer gives anyway: a body shared with the WebSocket client may carry it.
  if (!previews && previewEvery > 0) {
    bad.push(`${w}.preview_every is for the WebSocket stream only (/v1/models/${cfg.modelName ?? '{name}'}/stream): this answer carries no previews`);
  }
  const seedGiven = has('seed');
  const seed = int('seed', 0, 0, MAX_SEED);
  // -1 means "random" to AUTOMATIC1111 and the UIs built like it: here a random seed is the one not sent.
  if (typeof inst.seed === 'number' && inst.seed < 0) bad[bad.length - 1] += '; leave seed out for a random one, returned with the image';
  // Not `seed + numImages - 1 > MAX_SEED`: past 2^53 that sum rounds (2^53 - 1 + 2 - 1 gives 2^53 - 1).
  if (seedGiven && seed > MAX_SEED - (numImages - 1)) {
    bad.push(`${w}.seed + num_images_per_prompt - 1 must be at most ${MAX_SEED} (image i uses seed + i), got ${seed} with ${numImages} images`);
  }
  let scheduler: string | undefined;
  // DEFAULT_SCHEDULER stands for a scheduler the request does not name (checked against the model at boot).
  const schedName = str('scheduler', false, 64) ?? cfg.defaultScheduler;
  if (schedName !== undefined) {
    const unknown = unknownSchedulerName(schedName);
    if (unknown === undefined) scheduler = schedName;
    else bad.push(`${w}.scheduler: ${unknown}`);
    // The request's own mistake for this model (another family's name): refused here, not after a queue slot.
    const refused = scheduler === undefined ? undefined : defaults.schedulerRefusals?.[scheduler];
    if (refused?.code === 'INVALID_INPUT') bad.push(`${w}.scheduler: ${refused.message}`);
  }
  // The scheduler's own limits (num_train_timesteps, LCM's original_inference_steps, PNDM's Runge-Kutta warm-up), here
  // rather than in the worker after the request waited for a queue slot.
  const outside = schedName === undefined || scheduler !== undefined ? stepsOutside(steps, scheduler, defaults) : undefined;
  // A value the client did not send is named as the default it is, not taken for the client's own.
  const whose = has('num_inference_steps') ? '' : ` (not sent: the ${cfg.defaultSteps !== undefined ? "server's default, DEFAULT_STEPS" : "model's default"}; send num_inference_steps)`;
  if (outside !== undefined) bad.push(`${w}.num_inference_steps ${outside}${whose}`);
  let format = cfg.defaultOutputFormat;
  const fmt = str('output_format', false, 16);
  if (fmt !== undefined) {
    const f = fmt.toLowerCase() === 'jpg' ? 'jpeg' : fmt.toLowerCase();
    if ((FORMATS as readonly string[]).includes(f)) format = f as OutputFormat;
    else bad.push(`${w}.output_format must be one of ${FORMATS.join(', ')}, got ${JSON.stringify(fmt)}`);
  }
  // Refused here, not by the encoder after the whole generation ran.
  const unfit = formatRefuses(format, height, width);
  if (unfit !== undefined) bad.push(`${w}: ${unfit}`);
  const q = has('quality') ? int('quality', DEFAULT_QUALITY, 1, 100) : undefined;
  // Bytes the encoder makes alike get one batch and result-cache key: PNG takes no quality, a lossy format's is 90 unsent.
  const quality = format === 'png' ? undefined : (q ?? DEFAULT_QUALITY);
  const uri = str('output_uri', false, 2048);
  const out = uri === undefined ? undefined : parseS3Object(uri);
  if (uri !== undefined && !out) bad.push(`${w}.output_uri must look like s3://bucket/key, got ${JSON.stringify(uri)}`);
  else if (out) {
    const served = servedFrom(out, cfg);
    // A store that resolves dot segments writes `out/../sd15/x` to sd15/x, past servedFrom: keys are checked as inputs' are.
    const unsafe = keyProblem(out.key);
    if (served) bad.push(`${w}.output_uri ${JSON.stringify(uri)} lies under the ${served} this server loads; write images elsewhere`);
    else if (unsafe !== undefined) bad.push(`${w}.output_uri: the key ${unsafe}; name the object by its plain key`);
    else if (longestKeyBytes(out.key, numImages, format) > MAX_KEY_BYTES) {
      const several = numImages > 1 ? ` with the -<i>.<ext> of ${numImages} images` : '';
      bad.push(`${w}.output_uri: the key is ${longestKeyBytes(out.key, numImages, format)} bytes (UTF-8)${several}; S3 takes keys of at most ${MAX_KEY_BYTES} bytes`);
    } else if (cfg.outputUriPrefixes?.length) {
      // The keys written, not the one given: several images go beside it (`out` → `out-0.png`), outside an entry `out`.
      const prefixes = cfg.outputUriPrefixes;
      const outside = outputKeys(out.key, numImages, format).find((key) => !prefixes.some((p) => underS3Prefix({ ...out, key }, p)));
      if (outside !== undefined) {
        const which = outside === out.key ? '' : ` (with ${numImages} images it writes s3://${out.bucket}/${outside} and the like)`;
        bad.push(`${w}.output_uri ${JSON.stringify(uri)}${which} is not under a prefix this server writes images to (OUTPUT_URI_PREFIXES: ${prefixes.map((p) => p.uri).join(', ')})`);
      }
    }
    // Refused before the generation, not after it: the upload could not be sent at all.
    const f = cfg.s3 ? virtualHostedFallback(cfg.s3, out.bucket) : undefined;
    if (f?.unaddressable) bad.push(fallbackProblem(`${w}.output_uri`, f));
  }
  const image = parseImageFields(inst, w, bad, defaults, steps, (loc, shown) => inputRefusal(loc, shown, cfg), scheduler);
  const loras = parseLoras(inst.loras, `${w}.loras`, cfg.maxLoras ?? 4, bad, cfg.loraMaxSets === 0);
  if (prompt === undefined) return undefined;
  return {
    shape: { steps, guidance, height, width, scheduler, eta, guidanceRescale },
    // A drawn seed leaves room for the request's images as a given one must (image i uses seed + i).
    items: [{ prompt, negativePrompt, seed: seedGiven ? seed : Math.min(ctx.randomSeed(), MAX_SEED - (numImages - 1)), numImages }],
    seedsGiven: seedGiven,
    output: { format, quality, uri },
    previewEvery,
    ...(image ? { image } : {}),
    ...(loras.length > 0 ? { loras } : {}),
  };
}
