/** @module KServe V1: model listing, model status, readiness, and `:predict` with the seed runtime's body (or in a CloudEvent). */
import type { App } from './base.js';
import { RuntimeError } from '../errors.js';
import type { TaskResult } from '../runtime/engine.js';
import { isObj } from '../runtime/fields.js';
import { assertSafeJson, checkInstanceCount, INSTANCE_FIELDS, parseInstances } from '../runtime/request.js';
import { assertServable, generateWithImages, modelStatus, parseContext, parseJson, type ServerContext, type Stages, withKserveStages } from './context.js';
import { decodeEvent, eventReply } from './cloudevents.js';
import { bodyRoute, json, jsonWithBase64, route, type Reply, type Req, type RouteOptions } from './http.js';
import { withEventTrace } from './trace.js';

/**
 * The seed's `{"predictions":[{"image":{"b64":…}}]}` plus what we add (each image's seed, format and
 * size; `uri` instead of `b64` with output_uri), built as bytes (jsonWithBase64).
 */
export function predictionsBody(results: TaskResult[]): Buffer {
  const parts: Array<Uint8Array | string> = ['{"predictions":['];
  let first = true;
  for (const r of results) {
    r.images.forEach((img, i) => {
      const meta = JSON.stringify({ seed: img.seed, format: img.format, width: img.width, height: img.height }).slice(1);
      if (!first) parts.push(',');
      first = false;
      if (r.uris) parts.push(`{"image":${JSON.stringify({ uri: r.uris[i] })},${meta}`);
      else parts.push('{"image":{"b64":"', Buffer.from(img.data), `"},${meta}`);
    });
  }
  parts.push(']}');
  return jsonWithBase64(parts);
}

/** What a V1 body looks like, as an error shows it. */
const V1_SHAPE = '{"instances":[{"prompt":"…"}]}';

/** A V2 tensor: what V2's `inputs` holds, never a V1 instance (no such field). */
const isTensor = (x: unknown): boolean => isObj(x) && Object.hasOwn(x, 'datatype') && Object.hasOwn(x, 'name');

/**
 * The 400 for a body without "instances", with the body's shape, and where it put an instance's fields at the top
 * (a bare `{"prompt":…}`, OpenAI's body), which of them go in an instance.
 */
function noInstances(o: Record<string, unknown>, what: string): string {
  const fields = Object.keys(o).filter((k) => (INSTANCE_FIELDS as readonly string[]).includes(k)).slice(0, 5);
  const moved = fields.length === 0 ? '' : `; ${fields.map((k) => JSON.stringify(k)).join(', ')} ${fields.length > 1 ? 'go' : 'goes'} in an instance`;
  return `${what} has no "instances" list: a V1 body is ${V1_SHAPE}${moved}`;
}

export function registerV1(app: App, ctx: ServerContext, opts: RouteOptions): void {
  app.get('/v1/models', route(() => json(200, { models: [ctx.cfg.modelName] }), opts));
  app.get(
    '/v1/models/:name',
    route((r) => {
      const name = r.params[0]!;
      if (name.includes(':')) throw new RuntimeError('METHOD_NOT_ALLOWED', `${r.method.toUpperCase()} is not allowed on ${r.url}; use POST`, { allow: ['POST'] });
      return modelStatus(ctx, name);
    }, opts),
  );
  // The seed runtime's readiness probe; not a KServe route, kept for its users.
  app.get('/v1/models/:name/ready', route((r) => modelStatus(ctx, r.params[0]!), opts));

  /** `:predict`'s answer to a body (plain, or a CloudEvent's data), its KServe stages moved along as it goes. */
  async function predict(r: Req, body: Buffer, signal: AbortSignal, stages: Stages): Promise<Reply> {
    const { name, verb } = splitVerb(r.params[0]!);
    if (verb !== 'predict') throw new RuntimeError('UNSUPPORTED', `:${verb} is not supported by this runtime`);
    const { body: parsed, event } = decodeEvent(r.headers, body, parseJson);
    if (event) r.ids = withEventTrace(r.ids, event.attributes);
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new RuntimeError('INVALID_INPUT', `${event ? "the CloudEvent's data" : 'the request body'} must be a JSON object with "instances"`);
    }
    const o = parsed as Record<string, unknown>;
    const where = Object.hasOwn(o, 'instances') ? 'instances' : 'inputs';
    const instances = Object.hasOwn(o, 'instances') ? o.instances : Object.hasOwn(o, 'inputs') ? o.inputs : undefined;
    if (instances === undefined) throw new RuntimeError('INVALID_INPUT', noInstances(o, event ? "the CloudEvent's data" : 'the request body'));
    // V2's tensors sent here: otherwise each tensor's name, shape, datatype and data were named unknown instance fields.
    if (where === 'inputs' && Array.isArray(instances) && instances.some(isTensor)) {
      throw new RuntimeError('INVALID_INPUT', `"inputs" holds V2 tensors ({"name","datatype","shape","data"}): send them to POST /v2/models/${ctx.cfg.modelName}/infer; `
        + `a V1 body is ${V1_SHAPE}`);
    }
    // Fields go in each instance; a top-level one (`parameters`, as other V1 servers take them) would otherwise be
    // ignored without a word, and the images made with the defaults.
    // TensorFlow Serving's REST body, which V1 follows, may name its signature: only the default one is served.
    const extra = Object.keys(o).filter((k) => k !== 'instances' && k !== 'inputs' && !(k === 'signature_name' && o[k] === 'serving_default')).slice(0, 20);
    if (Object.hasOwn(o, 'instances') && Object.hasOwn(o, 'inputs')) extra.unshift('inputs');
    if (extra.length > 0) {
      throw new RuntimeError('INVALID_INPUT', extra.map((k) => k === 'inputs'
        ? 'the body has both "instances" and "inputs"; send one of them'
        : k === 'signature_name'
          ? 'signature_name: this model has one signature, "serving_default"; leave signature_name out or send that'
          : `${JSON.stringify(k)} is not a known top-level field; a V1 body holds only "instances", and every field goes in each instance ({"instances":[{"prompt":…,"num_inference_steps":…}]})`).join('; '));
    }
    // An empty list asks for no image and is answered with none, as the seed runtime and KServe's server (which
    // leaves the list to the model) answer it: a client that builds the list from a filter gets [], not an error.
    const empty = Array.isArray(instances) && instances.length === 0;
    // The count first: a list of 500k elements is refused at once, not walked and answered element by element.
    if (!empty) checkInstanceCount(instances, ctx.cfg.maxImagesPerRequest, where);
    assertSafeJson(parsed, 'body');
    // No instance, no generation: the request still passes through every stage, as in KServe.
    if (empty) {
      stages.next('predict');
      stages.next('postprocess');
    }
    const results = empty ? [] : await generateWithImages(ctx, parseInstances(instances, parseContext(ctx), where), signal, { ids: r.ids, stages });
    void name;
    const out = predictionsBody(results);
    return event ? eventReply(event, out, ctx.cfg.modelName, ctx.cfg) : { status: 200, body: out, contentType: 'application/json' };
  }

  app.post(
    '/v1/models/:target',
    bodyRoute(
      (r, body, ex) => withKserveStages(ctx, (stages) => predict(r, body, ex.gone.signal, stages)),
      opts,
      (r) => {
        const { name, verb } = splitVerb(r.params[0]!);
        if (verb === undefined) throw new RuntimeError('METHOD_NOT_ALLOWED', `POST is not allowed on ${r.url}; use /v1/models/${name}:predict`, { allow: ['GET', 'HEAD'] });
        if (verb !== 'predict' && verb !== 'explain') throw new RuntimeError('NOT_FOUND', `unknown verb :${verb}; use :predict`);
        assertServable(ctx, name);
        if (verb === 'explain') throw new RuntimeError('UNSUPPORTED', 'this runtime has no explainer');
      },
    ),
  );
}

function splitVerb(target: string): { name: string; verb: string | undefined } {
  const i = target.lastIndexOf(':');
  return i < 0 ? { name: target, verb: undefined } : { name: target.slice(0, i), verb: target.slice(i + 1) };
}
