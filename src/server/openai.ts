/**
 * @module OpenAI's Images API under KServe's `/openai` prefix (its OpenAI routes' place): `POST
 * /openai/v1/images/generations`, `POST /openai/v1/images/edits` (multipart: V1's image-to-image and inpainting) and
 * the model list, so a client written for OpenAI (its SDKs, Open WebUI, LiteLLM)
 * generates with base URL `http://<host>/openai/v1`. OpenAI's names map onto the request's (n, size, output_format,
 * output_compression); the runtime's own fields ride along (negative_prompt, seed, num_inference_steps, …). Errors
 * come in OpenAI's shape, `{"error":{"message","type","param","code"}}`.
 */
import { MIMEType } from 'node:util';
import { httpStatus, isRuntimeError, RuntimeError } from '../errors.js';
import { isObj, show, typeName } from '../runtime/fields.js';
import { maskFromAlpha, transparentArea } from '../runtime/image-request.js';
import { assertSafeJson, INSTANCE_FIELDS, joinProblems, parseInstances, pushUnknownField, type GenerationRequest } from '../runtime/request.js';
import type { TaskResult } from '../runtime/engine.js';
import type { App } from './base.js';
import { refuseEvent } from './cloudevents.js';
import { assertServable, generateWithImages, modelStatus, parseContext, parseJson, unknownModel, type ServerContext } from './context.js';
import { bodyRoute, json, jsonWithBase64, route, type Reply, type Req, type RouteOptions } from './http.js';
import { openaiErrorBody, openaiErrorHeaders } from './openai-errors.js';
import type { RequestIds } from '../log.js';

export const OPENAI_PREFIX = '/openai/v1';
/** What a 404 under /openai adds: the OpenAI routes this server does answer. */
export const OPENAI_SERVED = `; OpenAI's API here is POST ${OPENAI_PREFIX}/images/generations, POST ${OPENAI_PREFIX}/images/edits and GET ${OPENAI_PREFIX}/models`;

/** Our fields a body names by OpenAI's name instead, and which. */
const RENAMED: Readonly<Record<string, string>> = { num_images_per_prompt: 'n', quality: 'output_compression', width: 'size', height: 'size' };
/** How a problem with one of those names it: as the client sent it, and which side of `size`. */
const SHOWN: Readonly<Record<string, string>> = { ...RENAMED, width: "size's width", height: "size's height" };
/** An edit's mask arrives as `mask`, made into `mask_image` (editBody). */
const EDIT_SHOWN: Readonly<Record<string, string>> = { ...SHOWN, mask_image: 'mask' };
/** How a route's problems name our fields: in the message (`shown`) and as OpenAI's `param` (the parameter sent). */
interface Names {
  shown: Readonly<Record<string, string>>;
  param: Readonly<Record<string, string>>;
}
const GENERATION_NAMES: Names = { shown: SHOWN, param: RENAMED };
const EDIT_NAMES: Names = { shown: EDIT_SHOWN, param: { ...RENAMED, mask_image: 'mask' } };
/** Ours that this answer cannot carry. */
const NOT_HERE: Readonly<Record<string, string>> = {
  output_uri: 'the answer holds the images as b64_json; output_uri is V1\'s and V2\'s',
  preview_every: 'previews come on the WebSocket stream only',
};
/**
 * OpenAI's knobs for its own models, taken so a client that always sends them is served: the values that ask for
 * nothing this runtime does differently. Anything else is named.
 */
const IGNORED: Readonly<Record<string, readonly unknown[]>> = {
  quality: ['auto', 'standard', 'hd', 'low', 'medium', 'high', 'xhigh', 'max'],
  style: ['vivid', 'natural'],
  background: ['auto', 'opaque'],
  moderation: ['auto', 'low'],
  stream: [false],
  partial_images: [0],
};

/** The runtime's own fields a body may carry beside OpenAI's. */
const FIELDS = INSTANCE_FIELDS.filter((f) => !Object.hasOwn(RENAMED, f) && !Object.hasOwn(NOT_HERE, f));
/** Every name a body may use: what an unknown one is matched against for a "did you mean". */
const KNOWN = ['model', 'n', 'size', 'response_format', 'output_compression', 'user', ...Object.keys(IGNORED), ...FIELDS];

/** A 400; `param`: the request parameter it is about, OpenAI's `param` (openaiError), where known. */
const bad = (msg: string, param?: string): RuntimeError => new RuntimeError('INVALID_INPUT', msg, param === undefined ? undefined : { fields: { param } });

/** A body's problems in order, and the parameter the first is about: the one OpenAI's `param` names. */
export class Problems {
  readonly list: string[] = [];
  param: string | undefined;
  add(param: string | undefined, problem: string): void {
    if (this.list.length === 0) this.param = param;
    this.list.push(problem);
  }
  /** Adds unknownField's problem for `key`, the parameter it is about. */
  unknown(key: string, known: readonly string[]): void {
    if (this.list.length === 0) this.param = key;
    pushUnknownField(this.list, '', key, known);
  }
  /** The 400 naming them all; none if there are none. */
  error(): RuntimeError | undefined {
    return this.list.length === 0 ? undefined : bad(joinProblems(this.list), this.param);
  }
  /** The 400 naming them all, then `err`'s (problems of its own, joined already), about `param` where these name none. */
  before(err: RuntimeError, param: string | undefined): RuntimeError {
    return this.list.length === 0 ? bad(err.message, param) : bad(`${joinProblems(this.list)}; ${err.message}`, this.param);
  }
}

/** A value as a problem shows it: `show`'s, a boolean as itself. */
const val = (v: unknown): string => (typeof v === 'boolean' ? String(v) : show(v));

/**
 * The V1 instance an Images API body asks for, and a problem for each field that cannot be served (left out of the
 * instance, so its own checks find nothing more to say about it). An unknown model is a 404 at once.
 */
export function imagesInstance(body: unknown, modelName: string): { instance: Record<string, unknown>; problems: Problems } {
  if (!isObj(body)) throw bad('the request body must be a JSON object with a "prompt"');
  const o = body;
  if (typeof o.model === 'string' && o.model !== modelName) throw withParam(unknownModel(o.model, modelName, `${OPENAI_PREFIX}/models`), 'model');
  const problems = new Problems();
  if (o.model !== undefined && o.model !== null && typeof o.model !== 'string') problems.add('model', `model must be a string, the served name ${JSON.stringify(modelName)}, got ${typeName(o.model)}`);
  const inst: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) {
    if (k === 'model' || k === 'user' || v === null) continue;
    if (k === 'n') inst.num_images_per_prompt = v;
    else if (k === 'output_compression') {
      // OpenAI's 0 (most compressed) is the encoders' lowest quality, 1.
      if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 100) inst.quality = Math.max(1, v);
      else problems.add(k, `output_compression must be an integer from 0 to 100, got ${show(v)}`);
    } else if (k === 'size') {
      const m = typeof v === 'string' ? /^(\d{1,5})x(\d{1,5})$/.exec(v) : null;
      if (m) [inst.width, inst.height] = [Number(m[1]), Number(m[2])];
      else if (v !== 'auto') problems.add(k, `size must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto" (the model's own), got ${val(v)}`);
    } else if (k === 'response_format') {
      if (v !== 'b64_json') problems.add(k, `response_format must be "b64_json" (or left out): this server returns the images themselves, not URLs, got ${val(v)}`);
    } else if (Object.hasOwn(IGNORED, k)) {
      if (!IGNORED[k]!.includes(v)) {
        problems.add(k, k === 'quality' && typeof v === 'number'
          ? 'quality is OpenAI\'s ("auto", "standard", "hd", …) here: send a JPEG or WebP quality as output_compression'
          : `${k} must be one of ${IGNORED[k]!.map((x) => JSON.stringify(x)).join(', ')}${k === 'stream' ? ' (progress streams on the WebSocket route)' : ''}, got ${val(v)}`);
      }
    } else if ((k === 'prompt' || k === 'negative_prompt') && Array.isArray(v)) {
      // V1's own hint (a list of instances) is no answer here: the Images API takes one prompt a request.
      problems.add(k, `${k} must be a string, got a list: the Images API takes one prompt per request (n images of it); send a request for each prompt`);
      // A placeholder, so the request's own checks do not add "prompt is required" to this problem.
      if (k === 'prompt') inst[k] = '';
    } else if (Object.hasOwn(NOT_HERE, k)) problems.add(k, `${k} is not taken here: ${NOT_HERE[k]}`);
    else if (Object.hasOwn(RENAMED, k)) problems.add(k, `${k} is sent as ${JSON.stringify(RENAMED[k])} here (OpenAI's name)`);
    else if (!(FIELDS as readonly string[]).includes(k)) problems.unknown(k, KNOWN);
    else inst[k] = v;
  }
  return { instance: inst, problems };
}

/**
 * `instances[0].field …` as the client named the field. An input image's size problem asks for `size`, where V1 asks
 * for height and width; a seed's range counts the images as `n`.
 */
const relabel = (problem: string, shown = SHOWN): string => problem
  .replace(/\binstances\[0\]\.height and instances\[0\]\.width\b/g, 'size')
  .replace(/\bwithout instances\[0\]\.(?:height|width)\b/g, 'without size')
  .replace(/\binstances\[0\]\.([a-z_]+)/g, (_, f: string) => shown[f] ?? f)
  .replace(/\bnum_images_per_prompt\b/g, 'n');

/** The parameter the client sent for the first field `problem` names (`instances[0].width`: `size`), if it names one. */
function paramOf(problem: string, param: Readonly<Record<string, string>>): string | undefined {
  const field = /\binstances\[0\]\.([a-z_]+)/.exec(problem)?.[1];
  return field === undefined ? undefined : (param[field] ?? field);
}

/**
 * `err` with `message`, and `param` among its fields where it is the client's error (a 4xx): a new error, as the one
 * thrown may be another request's as well.
 */
function reissued(err: RuntimeError, message: string, param: string | undefined): RuntimeError {
  const { retryAfter, allow } = err;
  const fields = param !== undefined && httpStatus(err.code) < 500 ? { ...err.fields, param } : err.fields;
  const keep = { ...(retryAfter === undefined ? {} : { retryAfter }), ...(fields ? { fields } : {}), ...(allow ? { allow } : {}) };
  return new RuntimeError(err.code, message, { cause: err, ...keep });
}

/** `err` about the request parameter `param`. */
const withParam = (err: RuntimeError, param: string): RuntimeError => reissued(err, err.message, param);
/** A rejection about the request parameter `param`. */
const about = (param: string) => (err: unknown): Promise<never> => Promise.reject(isRuntimeError(err) ? withParam(err, param) : err);

/** An error found once the input images are read (their format, their size), relabelled too, its `param` the first field named. */
function relabelled(err: unknown, names: Names): unknown {
  if (!isRuntimeError(err) || !err.message.includes('instances[0]')) return err;
  return reissued(err, relabel(err.message, names.shown), paramOf(err.message, names.param));
}

/**
 * OpenAI's answer: `created`, then each image as `b64_json` (with its seed, as V1 gives it), and the format and size
 * gpt-image models report. Built as bytes, as V1's answer is (jsonWithBase64).
 */
export function imagesBody(results: TaskResult[], now = Date.now()): Buffer {
  const images = results.flatMap((r) => r.images);
  const first = images[0];
  const parts: Array<Uint8Array | string> = [`{"created":${Math.floor(now / 1000)},"data":[`];
  images.forEach((img, i) => parts.push(i > 0 ? ',' : '', '{"b64_json":"', new Uint8Array(img.data), `","seed":${img.seed}}`));
  parts.push(']', first ? `,"output_format":${JSON.stringify(first.format)},"size":"${first.width}x${first.height}"` : '', '}');
  return jsonWithBase64(parts);
}

/**
 * A runtime error reply in OpenAI's error shape (openai-errors.ts), with `x-should-retry: false` where a retry is in
 * vain; its `param` is the error's field of that name, which this module's errors carry where they know it.
 */
export function openaiError(out: Reply): Reply {
  const { error, code, param } = JSON.parse(String(out.body)) as { error: string; code: string; param?: unknown };
  const extra = openaiErrorHeaders(code);
  const headers = Object.keys(extra).length > 0 ? { ...out.headers, ...extra } : out.headers;
  return { ...out, ...(headers ? { headers } : {}), body: openaiErrorBody(out.status, code, error, typeof param === 'string' ? param : null) };
}

export function registerOpenAI(app: App, ctx: ServerContext, base: RouteOptions): void {
  const opts: RouteOptions = { ...base, errorShape: openaiError };
  const created = Math.floor(Date.now() / 1000);
  const model = () => ({ id: ctx.cfg.modelName, object: 'model', created, owned_by: 'diffusers-runtime' });
  app.get(`${OPENAI_PREFIX}/models`, route(() => json(200, { object: 'list', data: [model()] }), opts));
  // KServe's OpenAI routes answer this as the model's health: 503 until it is ready.
  app.get(
    `${OPENAI_PREFIX}/models/:name`,
    route((r) => {
      const name = r.params[0]!;
      if (name !== ctx.cfg.modelName) throw unknownModel(name, ctx.cfg.modelName, `${OPENAI_PREFIX}/models`);
      modelStatus(ctx, name);
      return json(200, model());
    }, opts),
  );
  /** An Images API body (parsed JSON, or an edit's form as one) generated and answered as OpenAI does. */
  const serve = async (parsed: unknown, signal: AbortSignal, ids: RequestIds, names = GENERATION_NAMES): Promise<Reply> => {
    assertSafeJson(parsed, 'body');
    const { instance, problems } = imagesInstance(parsed, ctx.cfg.modelName);
    let reqs: GenerationRequest[];
    // The parameter each of the request's problems is about, read where it names the field (`instances[0].seed …`).
    const params: Array<string | undefined> = [];
    try {
      reqs = parseInstances([instance], parseContext(ctx), 'instances', false, (p) => (params.push(paramOf(p, names.param)), relabel(p, names.shown)));
    } catch (err) {
      // Every problem at once: OpenAI's fields' own, then the request's they make.
      if (isRuntimeError(err) && err.code === 'INVALID_INPUT') throw problems.before(err, params[0]);
      throw err;
    }
    const refused = problems.error();
    if (refused) throw refused;
    const results = await generateWithImages(ctx, reqs, signal, { ids }).catch((err: unknown) => Promise.reject(relabelled(err, names)));
    return { status: 200, body: imagesBody(results), contentType: 'application/json' };
  };
  const precheck = (route: string) => (r: Req) => {
    refuseEvent(r.headers, `POST ${OPENAI_PREFIX}/${route}`);
    assertServable(ctx, ctx.cfg.modelName);
  };
  app.post(`${OPENAI_PREFIX}/images/generations`, bodyRoute(async (r, body, ex) => serve(parseJson(body), ex.gone.signal, r.ids), opts, precheck('images/generations')));
  app.post(
    `${OPENAI_PREFIX}/images/edits`,
    // In flight from the form's reading on: finding the picture's transparent area decodes it, as reading it does. Its
    // body came after SIGTERM: refused first, as the other routes refuse before reading their input images.
    bodyRoute((r, body, ex) => ctx.track(ex.gone.signal, async () => {
      ctx.admit(ex.gone.signal);
      return serve(await editBody(r.headers['content-type'], body), ex.gone.signal, r.ids, EDIT_NAMES);
    }), opts, precheck('images/edits')),
  );
}

/** Form fields that hold numbers (a form sends text), as an edit's JSON twin would hold them. */
const NUMERIC = new Set(['n', 'output_compression', 'partial_images', 'num_inference_steps', 'guidance_scale', 'seed', 'eta', 'guidance_rescale', 'strength']);
const NUMBER_TEXT = /^-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$/;

/**
 * An edit as OpenAI's SDKs send it (multipart/form-data: `image` a file, `mask` an optional PNG whose fully transparent
 * area is the one to edit, the rest text fields) as the body a generation takes: the image's bytes in `image`, the
 * mask's transparent area as `mask_image` (white = repaint), numbers and flags as JSON values. Without a mask, a
 * picture's own fully transparent area is the one to edit; a picture with none is image-to-image over the whole of it
 * (`strength`, the model's default unless sent).
 */
export async function editBody(contentType: string | undefined, body: Buffer): Promise<Record<string, unknown>> {
  const form = await readForm(contentType ?? '', body);
  const fields = new Map<string, unknown>();
  const problems = new Problems();
  const files: Array<[string, Blob]> = [];
  let loras: Array<[string | undefined, string]> | undefined;
  for (const [rawKey, v] of form) {
    const k = rawKey === 'image[]' ? 'image' : rawKey;
    if (typeof v !== 'string') {
      if (k !== 'image' && k !== 'mask') problems.add(k, `${rawKey} is a file; only image and mask are`);
      else files.push([k, v]);
      if (v.size === 0) problems.add(k, `${rawKey} is an empty file`);
      continue;
    }
    // Open WebUI sends its edit model's setting as is, "" when left empty: a form's way of leaving it out.
    if (k === 'model' && v === '') continue;
    const item = /^loras\[\](?:\[([^\]]*)\])?$/.exec(rawKey);
    if (item) {
      (loras ??= []).push([item[1], v]);
      continue;
    }
    if (fields.has(k)) {
      problems.add(k, `${rawKey} is sent twice; send it once`);
      continue;
    }
    fields.set(k, formValue(k, v));
  }
  // How closely OpenAI's GPT models keep the input's features: "low" is their default and asks for nothing here.
  const fidelity = fields.get('input_fidelity');
  fields.delete('input_fidelity');
  if (fidelity !== undefined && fidelity !== 'low') problems.add('input_fidelity', `input_fidelity must be "low" (or left out): to keep more of the picture, send a lower strength; got ${show(fidelity)}`);
  if (loras && fields.has('loras')) problems.add('loras', 'loras is sent twice: as loras and as loras[]; send it once');
  else if (loras) fields.set('loras', loraList(loras, problems));
  // fromEntries: a field named __proto__ becomes a key of its own, which the body's check refuses, not a prototype.
  const out: Record<string, unknown> = Object.fromEntries(fields);
  const images = files.filter(([k]) => k === 'image');
  const masks = files.filter(([k]) => k === 'mask');
  const sent = images.length + (typeof out.image === 'string' ? 1 : 0);
  if (sent > 1) problems.add('image', `image: ${sent} images sent; this server edits one picture per request (OpenAI's GPT image models take several as references): send one`);
  else if (sent === 0) problems.add('image', 'image is required: the picture to edit, as a file');
  if (masks.length > 1 || (masks.length === 1 && out.mask !== undefined)) problems.add('mask', 'mask is sent twice; send it once');
  if (out.mask !== undefined) problems.add('mask', 'mask must be a file: a PNG whose fully transparent area is the one to edit');
  if (out.mask_image !== undefined) problems.add('mask_image', 'mask_image is sent as "mask" here (OpenAI\'s name): a PNG whose fully transparent area is the one to edit');
  const refused = problems.error();
  if (refused) throw refused;
  // As bytes, which the image fields take as they are (V2's binary data does too): no base64 made only to be decoded.
  const picture = images.length === 1 ? new Uint8Array(await images[0]![1].arrayBuffer()) : undefined;
  if (picture) out.image = picture;
  let mask: Buffer | undefined;
  if (masks.length === 1) mask = await maskFromAlpha(new Uint8Array(await masks[0]![1].arrayBuffer()), 'mask').catch(about('mask'));
  else if (picture) mask = await transparentArea(picture, 'image').catch(about('image'));
  if (mask) out.mask_image = mask;
  return out;
}

/** A multipart body's parts; what keeps it from being read is named (undici says only "Failed to parse body as FormData"). */
async function readForm(contentType: string, body: Buffer): Promise<FormData> {
  if (!/^multipart\/form-data\s*(?:;|$)/i.test(contentType)) {
    throw bad(`images/edits takes multipart/form-data (the image as a file, prompt and the rest as fields), as OpenAI's SDKs send it; got Content-Type ${JSON.stringify(contentType)}`);
  }
  // Read as undici reads it (WHATWG MIME parameters: a quoted string unescaped, the first of two kept), so that the
  // parts counted below are the parts it would parse.
  let boundary: string | undefined;
  try {
    boundary = new MIMEType(contentType).params.get('boundary') || undefined;
  } catch {
    // not a media type undici parses either
  }
  // A Content-Type set by hand (a common slip) lacks the boundary the HTTP client writes into the body.
  if (boundary === undefined) throw bad(`Content-Type ${JSON.stringify(contentType)} has no boundary; let the HTTP client set it with the form (it adds boundary=…), not by hand`);
  // undici's parser takes ~50 ms of the event loop per 1,000 parts (a 1 MiB form of 10,000 empty files held liveness
  // for a second): the parts are counted first, by their delimiters, which no part's content may hold.
  if (formParts(body, boundary) > MAX_FORM_PARTS) {
    throw bad(`the multipart body has more than ${MAX_FORM_PARTS} parts; an edit sends image, mask and each field once (loras as loras[] or JSON text)`);
  }
  try {
    return await new Response(body, { headers: { 'content-type': contentType } }).formData();
  } catch {
    const open = `--${boundary}`;
    const why = body.indexOf(open) < 0 ? `the boundary ${JSON.stringify(boundary)} its Content-Type declares is not in it`
      : body.indexOf(`${open}--`) < 0 ? `it ends before its closing ${open}-- (cut short?)`
      : 'nothing may come before the first boundary line or after the closing one, and each part needs Content-Disposition: form-data; name="…", then a blank line before its content';
    throw bad(`the multipart body could not be read: ${why}`);
  }
}

/** More than an edit's fields, MAX_LORAS' most adapters as loras[][name] and loras[][scale], image and mask take. */
const MAX_FORM_PARTS = 256;

/** How many parts a multipart body holds, counted up to one more than MAX_FORM_PARTS (RFC 2046 5.1.1 delimiters). */
function formParts(body: Buffer, boundary: string): number {
  const delimiter = Buffer.from(`\r\n--${boundary}`);
  let n = body.subarray(0, delimiter.length - 2).equals(delimiter.subarray(2)) ? 1 : 0;
  for (let at = body.indexOf(delimiter); at >= 0 && n <= MAX_FORM_PARTS + 1; at = body.indexOf(delimiter, at + delimiter.length)) n++;
  // The last delimiter closes the form.
  return n - 1;
}

/**
 * The loras list OpenAI's SDKs send as form parts: `loras[]` names, and objects as `loras[][name]`, `loras[][scale]`
 * parts. openai-node writes each object's keys in turn, openai-python every name, then every scale: in both the i-th
 * name and the i-th scale are one adapter, so with several adapters each needs its scale (or none has one).
 */
function loraList(parts: ReadonlyArray<readonly [string | undefined, string]>, problems: Problems): unknown[] {
  const names: string[] = [];
  const columns = new Map<string, string[]>();
  for (const [key, v] of parts) {
    if (key === undefined) names.push(v);
    else if (columns.has(key)) columns.get(key)!.push(v);
    else columns.set(key, [v]);
  }
  const counts = [...columns].map(([key, c]) => [key, c.length] as const);
  const n = Math.max(0, ...counts.map(([, c]) => c));
  if (n > 1 && counts.some(([, c]) => c !== n)) {
    problems.add('loras', `loras: ${counts.map(([key, c]) => `${c} loras[][${key}]`).join(', ')}: a form cannot say which adapter each belongs to; give every adapter its scale (1 is the default), or send loras as JSON text`);
    return [];
  }
  // fromEntries: a key named __proto__ is one of the object's own, which the body's check refuses.
  const objects = Array.from({ length: n }, (_, i) => Object.fromEntries([...columns].map(([key, c]) => [key, key === 'scale' ? formNumber(c[i]!) : c[i]])));
  return [...names, ...objects];
}

/** A form field's text as its JSON twin holds it: a number, a flag, a loras list sent as JSON text. */
function formValue(k: string, v: string): unknown {
  if (NUMERIC.has(k)) return formNumber(v);
  if (k === 'stream' && (v === 'true' || v === 'false')) return v === 'true';
  return k === 'loras' ? jsonOr(v) : v;
}

/** A number's text as the number, else the text, for the field's own check to name as sent. */
const formNumber = (v: string): unknown => (NUMBER_TEXT.test(v.trim()) ? Number(v) : v);

/** `text` as JSON where it parses (a form's loras list), else as itself, for the field's own check to name. */
function jsonOr(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return text;
  }
}
