/**
 * @module KServe V2 / Open Inference Protocol (REST) routes: server and model metadata, readiness, and `/infer` (the
 * tensor codec is v2-codec.ts; a binary-mode CloudEvent is answered as one, cloudevents.ts).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { RuntimeError } from '../errors.js';
import { parseInstances } from '../runtime/request.js';
import type { App } from './base.js';
import { eventHeaders, v2Event } from './cloudevents.js';
import { assertServable, generateWithImages, modelStatus, parseContext, unknownModel, type ServerContext, type Stages, withKserveStages } from './context.js';
import { bodyRoute, json, route, type Reply, type Req, type RouteOptions } from './http.js';
import { withEventTrace } from './trace.js';
import { encodeInferResponse, fieldSource, modelMetadata, parseInferRequest, toInstances, v2Relabel, type InferResponse } from './v2-codec.js';

export const SERVER_NAME = 'diffusers-runtime';
const EXTENSIONS = ['binary_tensor_data'] as const;
const VERSIONING = 'Model versioning not supported yet.';

function packageVersion(): string {
  // dist/src/server/v2.js and src/server/v2.ts both sit below the package root; walk up to package.json.
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === SERVER_NAME && typeof pkg.version === 'string') return pkg.version;
    } catch {
      /* not here */
    }
    dir = path.dirname(dir);
  }
  return '0.0.0';
}

export function registerV2(app: App, ctx: ServerContext, opts: RouteOptions): void {
  const version = packageVersion();
  const notVersioned = () => {
    throw new RuntimeError('UNSUPPORTED', VERSIONING);
  };
  app.get('/v2', route(() => json(200, { name: SERVER_NAME, version, extensions: [...EXTENSIONS] }), opts));
  app.get('/v2/models', route(() => json(200, { models: [ctx.cfg.modelName] }), opts));
  app.get(
    '/v2/models/:name',
    route((r) => {
      const name = r.params[0]!;
      if (name !== ctx.cfg.modelName) throw unknownModel(name, ctx.cfg.modelName);
      return json(200, modelMetadata(name));
    }, opts),
  );
  app.get('/v2/models/:name/ready', route((r) => modelStatus(ctx, r.params[0]!), opts));
  app.get('/v2/models/:name/versions/:v', route(notVersioned, opts));
  app.get('/v2/models/:name/versions/:v/ready', route(notVersioned, opts));
  app.post('/v2/models/:name/versions/:v/infer', bodyRoute(notVersioned, opts, notVersioned));
  app.post(
    '/v2/models/:name/infer',
    bodyRoute(
      (r, body, ex) => withKserveStages(ctx, (stages) => infer(r, body, ex.gone.signal, stages)),
      opts,
      (r) => assertServable(ctx, r.params[0]!),
    ),
  );

  /** `/infer`'s answer (an event's, for a binary-mode CloudEvent), its KServe stages moved along as it goes. */
  async function infer(r: Req, body: Buffer, signal: AbortSignal, stages: Stages): Promise<Reply> {
    const name = r.params[0]!;
    // A Knative delivery (binary mode) is answered as an event, as KServe's server answers it, or its broker takes
    // the answer for a failed delivery and sends the event again.
    const event = v2Event(r.headers);
    if (event) r.ids = withEventTrace(r.ids, event.attributes);
    const req = parseInferRequest(r.headers, body, ctx.cfg.maxImagesPerRequest, name);
    const instances = toInstances(req);
    // Problems name where the client put each value (a parameter, an input tensor and its element), not the
    // per-prompt instance toInstances made of them.
    const reqs = parseInstances(instances, parseContext(ctx), 'prompt', false, v2Relabel(req));
    reqs.forEach((g, i) => {
      if (!g.image) return;
      // Image errors found once the images are read (a GIF, sizes that differ) name the input too.
      for (const inp of [g.image.image, g.image.mask]) if (inp) inp.field = fieldSource(req, i, inp === g.image.mask ? 'mask_image' : 'image') ?? inp.field;
      g.image.at = 'parameters';
    });
    const reply = inferReply(encodeInferResponse(name, req, await generateWithImages(ctx, reqs, signal, { timeoutMs: req.timeoutMs, ids: r.ids, stages })));
    return event ? { ...reply, headers: { ...reply.headers, ...eventHeaders(event, name, ctx.cfg) } } : reply;
  }
}

function inferReply(out: InferResponse): Reply {
  const headers = out.headerLength === undefined ? undefined : { 'inference-header-content-length': String(out.headerLength) };
  return { status: 200, body: out.body, contentType: out.contentType, ...(headers ? { headers } : {}) };
}
