/**
 * The deployment templates (rendered as `make render` does) and the Kubernetes objects in the docs, validated against
 * the real API schemas (test/fixtures/k8s-schemas, see its README) the way the API server validates with strict
 * field validation (kubectl >= 1.27: `--validate=strict`): unknown fields, wrong types, enums, required fields,
 * int32/int64 ranges, patterns, list-map keys. Then the rules KServe's own webhooks add (v0.20.0 sources).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { loadParams, render, TEMPLATES } from './helpers/templates.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const SCHEMAS = path.join(ROOT, 'test', 'fixtures', 'k8s-schemas');

type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
type Schema = Obj;

// ---------------------------------------------------------------------------------------------
// Rendering: test/helpers/templates.ts (envsubst restricted to the names in params.env); test/deploy.test.ts proves
// that `make render` produces exactly this.

function parseDocs(text: string, where: string): Obj[] {
  const docs = YAML.parseAllDocuments(text);
  for (const d of docs) if (d.errors.length > 0) throw new Error(`${where}: ${d.errors[0]!.message}`);
  return docs.map((d) => d.toJSON() as Obj).filter((d) => d !== null);
}

const templateFiles = (): string[] => readdirSync(TEMPLATES).filter((f) => f.endsWith('.yaml')).sort();
const renderedDocs = (file: string, params = loadParams()): Obj[] => parseDocs(render(readFileSync(path.join(TEMPLATES, file), 'utf8'), params), file);

// ---------------------------------------------------------------------------------------------
// The schemas.

const k8s = JSON.parse(readFileSync(path.join(SCHEMAS, 'kubernetes.json'), 'utf8')) as { definitions: Record<string, Schema> };
const kserve = JSON.parse(readFileSync(path.join(SCHEMAS, 'kserve.json'), 'utf8')) as Record<string, { group: string; version: string; served: string[]; schema: Schema }>;
const route = JSON.parse(readFileSync(path.join(SCHEMAS, 'route.json'), 'utf8')) as Record<string, { group: string; version: string; served: string[]; schema: Schema }>;
// The docs' Trigger (OPERATIONS.md, CloudEvents); no template creates one.
const eventing = JSON.parse(readFileSync(path.join(SCHEMAS, 'knative-eventing.json'), 'utf8')) as Record<string, { group: string; version: string; served: string[]; schema: Schema }>;
const OBJECT_META = '#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta';

/** apiVersion + kind -> the schema the API server validates that object with. */
const KINDS = new Map<string, Schema>();
for (const [name, def] of Object.entries(k8s.definitions)) {
  for (const gvk of (def['x-kubernetes-group-version-kind'] ?? []) as Array<{ group: string; version: string; kind: string }>) {
    KINDS.set(`${gvk.group ? `${gvk.group}/` : ''}${gvk.version} ${gvk.kind}`, { $ref: `#/definitions/${name}` });
  }
}
for (const crds of [kserve, route, eventing]) {
  for (const [kind, crd] of Object.entries(crds)) for (const v of crd.served) if (v === crd.version) KINDS.set(`${crd.group}/${v} ${kind}`, crd.schema);
}

const INT_RANGE: Record<string, [number, number]> = { int32: [-(2 ** 31), 2 ** 31 - 1], int64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER] };

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

const show = (v: unknown): string => JSON.stringify(v)?.slice(0, 60) ?? String(v);
const resolve = (s: Schema): Schema => {
  if (typeof s.$ref !== 'string') return s;
  const def = k8s.definitions[s.$ref.replace('#/definitions/', '')];
  if (!def) throw new Error(`schema: unresolved ${s.$ref}`);
  const { $ref: _, ...rest } = s;
  return { ...resolve(def), ...rest };
};

/**
 * Validates `v` at `at` (".spec.predictor.model") against `schema`, appending "PATH: what is wrong" to `errors`.
 * Structural-schema semantics, as the API server applies them with strict field validation: an object field that
 * neither `properties` nor `additionalProperties` declares is an unknown field unless x-kubernetes-preserve-unknown-fields
 * (or, for apiVersion/kind/metadata, x-kubernetes-embedded-resource) allows it.
 */
function check(v: unknown, schema: Schema, at: string, errors: string[]): void {
  const s = resolve(schema);
  const here = at || '.';
  if (v === null || v === undefined) {
    // A YAML key with no value. CRDs prune it (the field is silently dropped), built-ins read it as the zero value.
    if (!s.nullable) errors.push(`${here}: null (a key with no value) where ${s.type ?? 'a value'} is expected`);
    return;
  }
  const t = typeOf(v);
  if (s['x-kubernetes-int-or-string']) {
    if (t !== 'integer' && t !== 'string') errors.push(`${here}: ${t} ${show(v)} where an integer or a string is expected`);
  } else if (typeof s.type === 'string') {
    const ok = s.type === t || (s.type === 'number' && t === 'integer');
    if (!ok) {
      errors.push(`${here}: ${t} ${show(v)} where ${s.type === 'object' ? 'an object' : s.type === 'array' ? 'a list' : `a${/^[aeiou]/.test(s.type) ? 'n' : ''} ${s.type}`} is expected`);
      return;
    }
  }
  if (t === 'integer' && typeof s.format === 'string' && INT_RANGE[s.format]) {
    const [lo, hi] = INT_RANGE[s.format]!;
    if ((v as number) < lo || (v as number) > hi) errors.push(`${here}: ${v} is out of the ${s.format} range`);
  }
  if (t === 'string' && s.format === 'byte' && !/^[A-Za-z0-9+/]*={0,2}$/.test(v as string)) errors.push(`${here}: not base64 (format byte)`);
  if (Array.isArray(s.enum) && !s.enum.some((e: unknown) => e === v)) errors.push(`${here}: ${show(v)} is not one of ${show(s.enum)}`);
  if (t === 'string') {
    const str = v as string;
    if (typeof s.pattern === 'string' && !new RegExp(s.pattern, 'u').test(str)) errors.push(`${here}: ${show(v)} does not match ${s.pattern}`);
    if (typeof s.maxLength === 'number' && [...str].length > s.maxLength) errors.push(`${here}: longer than ${s.maxLength} characters`);
    if (typeof s.minLength === 'number' && [...str].length < s.minLength) errors.push(`${here}: shorter than ${s.minLength} characters`);
  }
  if (t === 'integer' || t === 'number') {
    if (typeof s.minimum === 'number' && (v as number) < s.minimum) errors.push(`${here}: ${v} is below the minimum ${s.minimum}`);
    if (typeof s.maximum === 'number' && (v as number) > s.maximum) errors.push(`${here}: ${v} is above the maximum ${s.maximum}`);
  }
  // Value validations (structural schemas allow no types or fields in these, only constraints on the same value).
  const branchOk = (b: Schema) => {
    const e: string[] = [];
    check(v, { ...b, 'x-kubernetes-preserve-unknown-fields': true }, at, e);
    return e;
  };
  if (Array.isArray(s.allOf)) for (const b of s.allOf as Schema[]) errors.push(...branchOk(b));
  if (Array.isArray(s.anyOf)) {
    const results = (s.anyOf as Schema[]).map(branchOk);
    if (!results.some((r) => r.length === 0)) errors.push(`${here}: ${show(v)} matches none of the allowed forms (${results.map((r) => r[0]).join('; ')})`);
  }
  if (Array.isArray(s.oneOf)) {
    const results = (s.oneOf as Schema[]).map(branchOk);
    const passed = results.filter((r) => r.length === 0).length;
    if (passed !== 1) errors.push(`${here}: ${show(v)} matches ${passed} of the oneOf forms, not exactly one (${results.map((r) => r[0] ?? 'ok').join('; ')})`);
  }
  if (s.not && branchOk(s.not as Schema).length === 0) errors.push(`${here}: ${show(v)} is a value this field refuses`);

  if (t === 'object') {
    const o = v as Obj;
    const props = (s.properties ?? {}) as Record<string, Schema>;
    for (const r of (s.required ?? []) as string[]) if (!(r in o)) errors.push(`${at}.${r}: Required value`);
    for (const [k, val] of Object.entries(o)) {
      const sub = /^[A-Za-z_$][\w$-]*$/.test(k) ? `${at}.${k}` : `${at}[${k}]`;
      if (props[k]) check(val, props[k]!, sub, errors);
      else if (s['x-kubernetes-embedded-resource'] && k === 'metadata') check(val, { $ref: OBJECT_META }, sub, errors);
      else if (s['x-kubernetes-embedded-resource'] && (k === 'apiVersion' || k === 'kind')) check(val, { type: 'string' }, sub, errors);
      else if (s.additionalProperties && typeof s.additionalProperties === 'object') check(val, s.additionalProperties as Schema, sub, errors);
      else if (s.additionalProperties === true || s['x-kubernetes-preserve-unknown-fields']) continue;
      else errors.push(`${sub}: unknown field (not in the schema; strict field validation refuses it, client-side apply drops it)`);
    }
  }
  if (t === 'array') {
    const list = v as unknown[];
    if (typeof s.maxItems === 'number' && list.length > s.maxItems) errors.push(`${here}: more than ${s.maxItems} items`);
    if (typeof s.minItems === 'number' && list.length < s.minItems) errors.push(`${here}: fewer than ${s.minItems} items`);
    list.forEach((item, i) => s.items && check(item, s.items as Schema, `${at}[${i}]`, errors));
    const keys = s['x-kubernetes-list-map-keys'] as string[] | undefined;
    if (s['x-kubernetes-list-type'] === 'map' && keys) {
      const seen = new Set<string>();
      list.forEach((item, i) => {
        const key = JSON.stringify(keys.map((k) => (item as Obj)?.[k] ?? null));
        if (seen.has(key)) errors.push(`${at}[${i}]: duplicate entry with ${keys.join('+')} ${key} (a list-map key must be unique)`);
        seen.add(key);
      });
    }
    if (s['x-kubernetes-list-type'] === 'set' && new Set(list.map((x) => JSON.stringify(x))).size !== list.length) errors.push(`${here}: duplicate entries in a set`);
  }
}

/** Every schema error in one object, "" when valid: the kind must be known, metadata is an ObjectMeta. */
function validate(doc: Obj): string[] {
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) return ['.: a Kubernetes object must be a mapping'];
  const schema = KINDS.get(`${doc.apiVersion} ${doc.kind}`);
  if (!schema) return [`.: no schema for apiVersion ${show(doc.apiVersion)} kind ${show(doc.kind)} (known: ${[...KINDS.keys()].join(', ')})`];
  const errors: string[] = [];
  // The API server validates every object's metadata as ObjectMeta, whatever a CRD says of it, and takes apiVersion
  // and kind at the root of a CRD schema that leaves them out (Knative's hand-written ones do).
  const root = resolve(schema);
  const implicit = { apiVersion: { type: 'string' }, kind: { type: 'string' } };
  check(doc, { ...root, properties: { ...implicit, ...root.properties, metadata: { $ref: OBJECT_META } }, required: [...(root.required ?? []), 'metadata'] }, '', errors);
  return errors;
}

const allRendered = (params = loadParams()) => templateFiles().flatMap((file) => renderedDocs(file, params).map((doc, i) => ({ where: `${file}#${i} ${doc.kind} ${doc.metadata?.name}`, doc })));

// ---------------------------------------------------------------------------------------------
describe('the schema fixtures', () => {
  it('know every kind the templates create, from the upstream versions the README names', () => {
    for (const k of ['batch/v1 Job', 'v1 PersistentVolumeClaim', 'v1 Secret', 'serving.kserve.io/v1beta1 InferenceService', 'serving.kserve.io/v1alpha1 ServingRuntime', 'route.openshift.io/v1 Route']) {
      expect(KINDS.has(k), k).toBe(true);
    }
    const readme = readFileSync(path.join(SCHEMAS, 'README.md'), 'utf8');
    for (const f of readdirSync(SCHEMAS).filter((n) => n !== 'README.md')) expect(readme, `${f} has no provenance in the README`).toContain(f);
  });

  it('the validator refuses what strict field validation refuses, naming the path (it can fail)', () => {
    const isvc = () => structuredClone(renderedDocs('inference-service.yaml')[0]!);
    const job = () => structuredClone(renderedDocs('warmup-job.yaml')[0]!);
    const expectError = (doc: Obj, text: string) => {
      const errs = validate(doc);
      expect(errs.some((e) => e.includes(text)), `expected an error containing ${JSON.stringify(text)}, got ${JSON.stringify(errs)}`).toBe(true);
    };
    expect(validate(isvc())).toEqual([]);
    expect(validate(job())).toEqual([]);
    // A Trigger (Knative's CRD names neither apiVersion nor kind): its typed fields are checked.
    const trigger = { apiVersion: 'eventing.knative.dev/v1', kind: 'Trigger', metadata: { name: 't' }, spec: { broker: 'default', subscriber: { uri: '/x' } } };
    expect(validate(trigger)).toEqual([]);
    expectError({ ...trigger, spec: { ...trigger.spec, filter: { attributes: ['type'] } } }, '.spec.filter.attributes');
    expectError({ ...trigger, spec: { ...trigger.spec, subscriber: { ref: { name: 3 } } } }, '.spec.subscriber.ref.name');

    // A misspelt field, several levels down.
    const typo = isvc();
    typo.spec.predictor.model.volumeMount = typo.spec.predictor.model.volumeMounts;
    delete typo.spec.predictor.model.volumeMounts;
    expectError(typo, '.spec.predictor.model.volumeMount: unknown field');
    const jobTypo = job();
    jobTypo.spec.template.spec.containers[0].resource = {};
    expectError(jobTypo, '.spec.template.spec.containers[0].resource: unknown field');
    // A field at the wrong level: minReplicas belongs to the predictor, not to its model.
    const misplaced = isvc();
    misplaced.spec.predictor.model.minReplicas = 0;
    expectError(misplaced, '.spec.predictor.model.minReplicas: unknown field');
    const topLevel = isvc();
    topLevel.predictor = topLevel.spec.predictor;
    expectError(topLevel, '.predictor: unknown field');

    // Wrong types: a string where the API wants an integer, non-strings where it wants strings.
    const str = isvc();
    str.spec.predictor.timeout = '600';
    expectError(str, '.spec.predictor.timeout: string "600" where an integer is expected');
    const ann = isvc();
    ann.metadata.annotations['serving.kserve.io/targetUtilizationPercentage'] = 70;
    expectError(ann, '.metadata.annotations[serving.kserve.io/targetUtilizationPercentage]: integer 70 where a string is expected');
    const label = job();
    label.spec.template.metadata.labels.enabled = true;
    expectError(label, '.spec.template.metadata.labels.enabled: boolean true where a string is expected');
    const env = job();
    env.spec.template.spec.containers[0].env[0].value = 24;
    expectError(env, '.spec.template.spec.containers[0].env[0].value: integer 24 where a string is expected');
    // int32, enums, required, patterns, null, list-map keys.
    const big = isvc();
    big.spec.predictor.maxReplicas = 2 ** 31;
    expectError(big, '.spec.predictor.maxReplicas: 2147483648 is out of the int32 range');
    const metric = isvc();
    metric.spec.predictor.scaleMetric = 'gpu';
    expectError(metric, '.spec.predictor.scaleMetric: "gpu" is not one of');
    const noName = job();
    delete noName.spec.template.spec.containers[0].name;
    expectError(noName, '.spec.template.spec.containers[0].name: Required value');
    const mem = isvc();
    mem.spec.predictor.model.resources = { limits: { memory: '8GB' } };
    expectError(mem, '.spec.predictor.model.resources.limits.memory: "8GB" does not match');
    const jobMem = job();
    jobMem.spec.template.spec.containers[0].resources.limits.memory = '2 GiB';
    expectError(jobMem, '.spec.template.spec.containers[0].resources.limits.memory: "2 GiB" matches 0 of the oneOf forms');
    const empty = isvc();
    empty.spec.predictor.model.env[0].value = null;
    expectError(empty, '.spec.predictor.model.env[0].value: null');
    const dup = job();
    dup.spec.template.spec.containers[0].env.push({ name: 'STORAGE_URI', value: 's3://x/y' });
    expectError(dup, 'duplicate entry with name ["STORAGE_URI"]');
    // int-or-string: a Route's targetPort takes 8080 or "http", never true, 0 or "".
    const r = () => structuredClone(renderedDocs('route.yaml')[0]!);
    for (const port of [8080, 'http']) expect(validate({ ...r(), spec: { ...r().spec, port: { targetPort: port } } })).toEqual([]);
    for (const port of [true, 0, '']) expect(validate({ ...r(), spec: { ...r().spec, port: { targetPort: port } } }).length, String(port)).toBeGreaterThan(0);
    const secret = renderedDocs('s3-secret.yaml')[0]!;
    expectError({ ...secret, data: { KEY: 'not base64!' } }, '.data.KEY: not base64');
    // An unknown kind or apiVersion.
    expectError({ ...isvc(), kind: 'InferenceSevice' }, 'no schema for apiVersion "serving.kserve.io/v1beta1" kind "InferenceSevice"');
    expectError({ ...isvc(), apiVersion: 'serving.kserve.io/v1' }, 'no schema for apiVersion "serving.kserve.io/v1"');
  });

  it('honours x-kubernetes-preserve-unknown-fields and x-kubernetes-embedded-resource where the schema sets them', () => {
    const preserve = { type: 'object', properties: { a: { type: 'string' } }, 'x-kubernetes-preserve-unknown-fields': true };
    const errs: string[] = [];
    check({ a: 'x', anything: { goes: 1 } }, preserve, '', errs);
    expect(errs).toEqual([]);
    check({ a: 1 }, preserve, '', errs);
    expect(errs).toEqual(['.a: integer 1 where a string is expected']);
    const embedded = { type: 'object', properties: { spec: { type: 'object' } }, 'x-kubernetes-embedded-resource': true };
    const e2: string[] = [];
    check({ apiVersion: 'v1', kind: 'X', metadata: { name: 'n', labels: { a: 'b' } }, spec: {} }, embedded, '', e2);
    expect(e2).toEqual([]);
    check({ metadata: { nmae: 'n' }, extra: 1 }, embedded, '', e2);
    expect(e2).toEqual(['.metadata.nmae: unknown field (not in the schema; strict field validation refuses it, client-side apply drops it)', '.extra: unknown field (not in the schema; strict field validation refuses it, client-side apply drops it)']);
  });
});

// ---------------------------------------------------------------------------------------------
describe('templates against the API schemas', () => {
  it.each(templateFiles())('%s: every rendered document is valid, unknown fields refused', (file) => {
    const docs = renderedDocs(file);
    expect(docs.length).toBeGreaterThan(0);
    for (const [i, doc] of docs.entries()) expect(validate(doc), `${file}#${i} ${doc.kind} ${doc.metadata?.name}`).toEqual([]);
  });

  it('stay valid whatever the parameters look like to YAML (every placeholder quoted where a string is expected)', () => {
    // A value YAML would read as a number, a boolean or null must still reach the API as a string.
    for (const look of ['12345', 'true', 'null', '1e3', '0x1F']) {
      const params = loadParams();
      for (const k of params.keys()) params.set(k, look);
      for (const { where, doc } of allRendered(params)) {
        // Only type errors matter here: a name of "true" fails the name rules, which other tests check.
        const typeErrors = validate(doc).filter((e) => / where (a|an) [a-z ]+ is expected$|null \(a key/.test(e));
        expect(typeErrors, `${where} with every parameter = ${look}`).toEqual([]);
      }
    }
  });

  it.skipIf(spawnSync('sh', ['-c', 'command -v make && command -v envsubst'], { stdio: 'ignore' }).status !== 0)('`make render` output (real envsubst) is valid too', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-schema-'));
    try {
      const r = spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`, 'MODEL_NAME=sdxl-turbo', 'TAG=0.2.0@sha256:0a1b2c'], { cwd: ROOT, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      const files = readdirSync(out).sort();
      expect(files).toEqual(templateFiles());
      for (const f of files) for (const doc of parseDocs(readFileSync(path.join(out, f), 'utf8'), f)) expect(validate(doc), f).toEqual([]);
      // The Secret's manifest holds the S3 keys: its owner's alone, rendered anew or over an older one.
      expect(statSync(path.join(out, 's3-secret.yaml')).mode & 0o777).toBe(0o600);
      expect(spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`], { cwd: ROOT }).status).toBe(0);
      expect(statSync(path.join(out, 's3-secret.yaml')).mode & 0o777).toBe(0o600);
      expect(statSync(path.join(out, 'pvc.yaml')).mode & 0o077).not.toBe(0);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

// ---------------------------------------------------------------------------------------------
describe('the validator covers every level the templates use', () => {
  /** Every object (path, value) and every scalar leaf in a document, with its path as the validator writes it. */
  function nodes(v: unknown, at: string, out: { objects: Array<[string, Obj]>; leaves: string[] }): void {
    if (Array.isArray(v)) v.forEach((x, i) => nodes(x, `${at}[${i}]`, out));
    else if (v !== null && typeof v === 'object') {
      out.objects.push([at, v as Obj]);
      for (const [k, x] of Object.entries(v)) nodes(x, /^[A-Za-z_$][\w$-]*$/.test(k) ? `${at}.${k}` : `${at}[${k}]`, out);
    } else out.leaves.push(at);
  }
  /** Maps (string keys of the user's choosing): an extra key there is data, not an unknown field. */
  const MAPS = /\.(labels|annotations|limits|requests|stringData|data|parameters|nodeSelector)$/;

  it('an extra field is refused at every object level of every rendered document, except in maps', () => {
    let levels = 0;
    for (const { where, doc } of allRendered()) {
      const found = { objects: [] as Array<[string, Obj]>, leaves: [] as string[] };
      nodes(doc, '', found);
      for (const [at, obj] of found.objects) {
        obj.zzUnknownField = 'x';
        const errs = validate(doc);
        delete obj.zzUnknownField;
        const refused = errs.includes(`${at}.zzUnknownField: unknown field (not in the schema; strict field validation refuses it, client-side apply drops it)`);
        expect(refused || MAPS.test(at), `${where}: an unknown field under ${at || '.'} was not refused (${JSON.stringify(errs)})`).toBe(true);
        if (MAPS.test(at)) expect(refused, `${where}: ${at} is a map, any key goes`).toBe(false);
        levels++;
      }
    }
    expect(levels).toBeGreaterThan(100);
  });

  it('a value of the wrong type is refused at every leaf of every rendered document', () => {
    let leaves = 0;
    for (const { where, doc } of allRendered()) {
      const found = { objects: [] as Array<[string, Obj]>, leaves: [] as string[] };
      nodes(doc, '', found);
      for (const at of found.leaves.filter((l) => l !== '.apiVersion' && l !== '.kind')) {
        // An object where a scalar is: no scalar field of these kinds takes one.
        const copy = structuredClone(doc);
        const steps = [...at.matchAll(/\.([A-Za-z_$][\w$-]*)|\[(\d+)\]|\[([^\]]+)\]/g)].map((m) => (m[2] !== undefined ? Number(m[2]) : (m[1] ?? m[3])!));
        const parent = steps.slice(0, -1).reduce((o: Obj, k) => o[k as string], copy);
        parent[steps.at(-1) as string] = { wrong: 'type' };
        const errs = validate(copy);
        expect(errs.some((e) => e.startsWith(`${at}: `) && / object \{"wrong":"type"\} where /.test(e)), `${where}: an object at ${at} was not refused (${JSON.stringify(errs)})`).toBe(true);
        leaves++;
      }
    }
    expect(leaves).toBeGreaterThan(100);
  });

  it('the CEL rules (x-kubernetes-validations) on the fields the templates use are the ones checked here', () => {
    // Not evaluated by this validator: each rule on a path the templates reach is listed and checked by hand below,
    // so that a new upstream rule on those paths fails here until someone reads it.
    const rules: string[] = [];
    const walk = (s: Schema, v: unknown, at: string) => {
      if (v === undefined || v === null) return;
      for (const r of (s['x-kubernetes-validations'] ?? []) as Array<{ rule: string }>) rules.push(`${at || '.'}: ${r.rule}`);
      if (Array.isArray(v) && s.items) v.forEach((x, i) => walk(s.items, x, `${at}[]`));
      else if (typeof v === 'object') for (const [k, x] of Object.entries(v as Obj)) if (s.properties?.[k]) walk(s.properties[k], x, `${at}.${k}`);
    };
    for (const { doc } of allRendered()) if (!doc.apiVersion.startsWith('batch/') && doc.apiVersion !== 'v1') walk(KINDS.get(`${doc.apiVersion} ${doc.kind}`)!, doc, '');
    expect([...new Set(rules)].sort()).toEqual([
      ".spec.tls: !(has(self.certificate) && has(self.externalCertificate))",
      ".spec.tls: has(self.termination) && has(self.insecureEdgeTerminationPolicy) ? !((self.termination=='passthrough') && (self.insecureEdgeTerminationPolicy=='Allow')) : true",
      ".spec: !has(self.tls) || self.tls.termination != 'passthrough' || !has(self.httpHeaders)",
    ]);
    const r = renderedDocs('route.yaml')[0]!.spec;
    expect(!(r.tls.certificate && r.tls.externalCertificate)).toBe(true);
    expect(!(r.tls.termination === 'passthrough' && r.tls.insecureEdgeTerminationPolicy === 'Allow')).toBe(true);
    expect(!r.tls || r.tls.termination !== 'passthrough' || !r.httpHeaders).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// What the API server checks besides the schema (k8s.io/apimachinery validation of ObjectMeta, per-kind names).

const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const DNS1123_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const QUALIFIED_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

function qualifiedKeyErrors(key: string): string[] {
  const slash = key.lastIndexOf('/');
  const [prefix, name] = slash >= 0 ? [key.slice(0, slash), key.slice(slash + 1)] : [undefined, key];
  const errs: string[] = [];
  if (prefix !== undefined && (!DNS1123_SUBDOMAIN.test(prefix) || prefix.length > 253)) errs.push(`prefix ${JSON.stringify(prefix)} is not a DNS-1123 subdomain`);
  if (!QUALIFIED_NAME.test(name) || name.length > 63) errs.push(`name part ${JSON.stringify(name)} is not a qualified name (at most 63 alphanumerics, '-', '_', '.')`);
  return errs;
}

function objectMetaErrors(meta: Obj, at: string, nameRule: { re: RegExp; max: number; what: string } | null): string[] {
  const errs: string[] = [];
  if (nameRule && (typeof meta.name !== 'string' || !nameRule.re.test(meta.name) || meta.name.length > nameRule.max)) {
    errs.push(`${at}.name: ${JSON.stringify(meta.name)} is not ${nameRule.what} (at most ${nameRule.max} characters)`);
  }
  if (meta.namespace !== undefined && (!DNS1123_LABEL.test(meta.namespace) || meta.namespace.length > 63)) errs.push(`${at}.namespace: ${JSON.stringify(meta.namespace)} is not a DNS-1123 label`);
  for (const [k, v] of Object.entries((meta.labels ?? {}) as Obj)) {
    for (const e of qualifiedKeyErrors(k)) errs.push(`${at}.labels[${k}]: key ${e}`);
    if (typeof v !== 'string' || !LABEL_VALUE.test(v) || v.length > 63) errs.push(`${at}.labels[${k}]: value ${JSON.stringify(v)} is not a valid label value (at most 63 characters)`);
  }
  for (const k of Object.keys((meta.annotations ?? {}) as Obj)) for (const e of qualifiedKeyErrors(k)) errs.push(`${at}.annotations[${k}]: key ${e}`);
  const size = Object.entries((meta.annotations ?? {}) as Obj).reduce((n, [k, v]) => n + k.length + String(v).length, 0);
  if (size > 256 * 1024) errs.push(`${at}.annotations: ${size} bytes, over the 256 KiB limit`);
  return errs;
}

const SUBDOMAIN = { re: DNS1123_SUBDOMAIN, max: 253, what: 'a DNS-1123 subdomain' };
/** kserve v0.20.0 pkg/apis/serving/v1beta1/inference_service_validation.go IsvcNameFmt; KServe derives `<name>-predictor` Services from it. */
const ISVC_NAME = { re: /^[a-z]([-a-z0-9]*[a-z0-9])?$/, max: 63 - '-predictor'.length, what: "KServe's InferenceService name ([a-z]([-a-z0-9]*[a-z0-9])?) leaving room for -predictor in a 63-character Service name" };
/** The Job controller writes the Job's name into the pods' job-name labels: a label value, 63 characters at most. */
const JOB_NAME = { re: DNS1123_LABEL, max: 63, what: 'a DNS-1123 label (it becomes the job-name label of its pods)' };

function apiServerErrors(doc: Obj): string[] {
  const rule = doc.kind === 'InferenceService' ? ISVC_NAME : doc.kind === 'Job' ? JOB_NAME : SUBDOMAIN;
  const errs = objectMetaErrors(doc.metadata ?? {}, '.metadata', rule);
  if (doc.kind === 'Job' && doc.spec?.template?.metadata) errs.push(...objectMetaErrors(doc.spec.template.metadata, '.spec.template.metadata', null));
  return errs;
}

describe('templates: what the API server checks besides the schema (names, labels, annotations)', () => {
  it.each(templateFiles())('%s: names, label keys and values, annotation keys are valid', (file) => {
    for (const doc of renderedDocs(file)) expect(apiServerErrors(doc), `${file} ${doc.kind} ${doc.metadata?.name}`).toEqual([]);
  });

  it('refuses what the API server refuses, naming the field', () => {
    const job = renderedDocs('warmup-job.yaml')[0]!;
    expect(apiServerErrors({ ...job, metadata: { ...job.metadata, name: `${'a'.repeat(51)}-cache-warmup` } })[0]).toMatch(/^\.metadata\.name: .* is not a DNS-1123 label/);
    const isvc = renderedDocs('inference-service.yaml')[0]!;
    expect(apiServerErrors({ ...isvc, metadata: { ...isvc.metadata, name: 'sd-1.5' } })[0]).toMatch(/^\.metadata\.name: "sd-1\.5" is not KServe's InferenceService name/);
    expect(apiServerErrors({ ...isvc, metadata: { ...isvc.metadata, labels: { 'opendatahub.io/dashboard': 'true', tier: 'gpu only' } } })).toEqual(['.metadata.labels[tier]: value "gpu only" is not a valid label value (at most 63 characters)']);
    expect(apiServerErrors({ ...isvc, metadata: { ...isvc.metadata, annotations: { 'bad key!': 'x' } } })[0]).toMatch(/^\.metadata\.annotations\[bad key!\]: key name part/);
    expect(apiServerErrors({ ...isvc, metadata: { ...isvc.metadata, namespace: 'Team_A' } })[0]).toMatch(/^\.metadata\.namespace: "Team_A" is not a DNS-1123 label/);
  });
});

// ---------------------------------------------------------------------------------------------
// KServe v0.20.0: its mutating webhook (inference_service_defaults.go), validating webhooks
// (inference_service_validation.go, component.go, servingruntime_webhook.go) and the predictor reconciler's runtime
// checks (components/predictor.go, predictor_model.go RuntimeSupportsModel, servingruntime_types.go).

const IMPLEMENTATIONS = ['sklearn', 'xgboost', 'tensorflow', 'pytorch', 'triton', 'onnx', 'huggingface', 'pmml', 'lightgbm', 'paddle', 'model'];
const AUTOSCALER_CLASSES = ['hpa', 'external', 'keda', 'none'];
const STORAGE_URI_PREFIXES = ['gs://', 's3://', 'pvc://', 'file://', 'https://', 'http://', 'hdfs://', 'webhdfs://', 'oci://', 'oci+native://', 'hf://'];

function kserveErrors(isvc: Obj, runtimes: Obj[]): string[] {
  const errs: string[] = [];
  const ann = (isvc.metadata.annotations ?? {}) as Record<string, string>;
  const p = isvc.spec.predictor as Obj;
  // The defaulter rewrites the deprecated modes before validation.
  const mode = ({ RawDeployment: 'Standard', Serverless: 'Knative' } as Record<string, string>)[ann['serving.kserve.io/deploymentMode'] ?? ''] ?? ann['serving.kserve.io/deploymentMode'] ?? 'Standard';
  if (!['Standard', 'Knative', 'ModelMesh'].includes(mode)) errs.push(`deploymentMode ${JSON.stringify(mode)} is not Standard/RawDeployment, Knative/Serverless or ModelMesh`);
  const cls = ann['serving.kserve.io/autoscalerClass'];
  if (cls !== undefined && !AUTOSCALER_CLASSES.includes(cls)) errs.push(`[${cls}] is not a supported autoscaler class type`);
  const impls = IMPLEMENTATIONS.filter((k) => p[k] !== undefined).concat((p.containers ?? []).length > 0 ? ['containers'] : []);
  if (impls.length !== 1) errs.push(`exactly one predictor implementation is required, found ${JSON.stringify(impls)}`);
  if (p.model?.name) errs.push("the 'name' field is not allowed in standard predictor");
  for (const c of [p.model, ...(p.containers ?? [])].filter(Boolean)) if ((c.env ?? []).some((e: Obj) => e.name === 'PYTHONPATH')) errs.push('env PYTHONPATH is blocked');
  // ComponentExtensionSpec.Validate
  if ((p.containerConcurrency ?? 0) < 0) errs.push('containerConcurrency must be >= 0');
  const min = p.minReplicas ?? 1;
  const max = p.maxReplicas ?? 0;
  if (min < 0) errs.push('minReplicas must be >= 0');
  if (max < 0) errs.push('maxReplicas must be >= 0');
  if (min > max && max !== 0) errs.push('minReplicas must be <= maxReplicas');
  // validateAutoScalingCompExtension
  const hpa = () => {
    const metric = p.scaleMetric ?? 'cpu';
    if (!['cpu', 'memory'].includes(metric)) errs.push(`[${metric}] is not a supported metric`);
    if (p.scaleTarget !== undefined && ((metric === 'cpu' && p.scaleTarget < 1) || p.scaleTarget > 100)) errs.push('the target utilization percentage should be a [1-100] integer');
    if (p.scaleTarget !== undefined && metric === 'memory' && p.scaleTarget < 1) errs.push('the target memory should be greater than 1 MiB');
  };
  if (mode === 'Standard') {
    if (cls === 'hpa') hpa();
    if (cls === 'keda' && p.scaleMetric !== undefined) errs.push('ScaleMetric is not supported for KEDA');
  } else if (ann['autoscaling.knative.dev/class'] === 'hpa.autoscaling.knative.dev') {
    hpa();
  } else {
    if (p.deploymentStrategy !== undefined) errs.push('customizing deploymentStrategy is only supported for raw deployment mode');
    const metric = p.scaleMetric ?? 'concurrency';
    if (!['concurrency', 'rps'].includes(metric)) errs.push(`[${metric}] is not a supported metric`);
    if (metric === 'rps' && p.scaleTarget !== undefined && p.scaleTarget < 1) errs.push('the target for rps should be greater than 1');
  }
  const m = p.model as Obj | undefined;
  if (m) {
    if (m.storageUri !== undefined && m.storage?.path !== undefined) errs.push('must provide only one of storageUri and storage.path');
    if (m.storageUri !== undefined && !STORAGE_URI_PREFIXES.some((x) => m.storageUri.startsWith(x)) && !m.storageUri.startsWith('/')) errs.push(`storageUri ${m.storageUri}: unsupported scheme`);
    // The reconciler: the runtime exists, supports the format (and version) and the protocol.
    const protocol = m.protocolVersion ?? 'v1';
    const supports = (rt: Obj, explicit: boolean) =>
      (rt.spec.supportedModelFormats as Obj[]).some((f) => (explicit || f.autoSelect === true) && f.name === m.modelFormat.name && (m.modelFormat.version === undefined || f.version === m.modelFormat.version)) &&
      (!rt.spec.protocolVersions?.length || rt.spec.protocolVersions.includes(protocol)) && !rt.spec.disabled;
    if (m.runtime !== undefined) {
      const rt = runtimes.find((r) => r.metadata.name === m.runtime);
      if (!rt) errs.push(`runtime ${m.runtime} not found`);
      else if (!supports(rt, true)) errs.push(`runtime ${m.runtime} does not support model format ${m.modelFormat.name}${m.modelFormat.version ? `:${m.modelFormat.version}` : ''} over protocol ${protocol}`);
    } else if (!runtimes.some((rt) => supports(rt, false))) errs.push(`no runtime with autoSelect supports ${m.modelFormat.name} over protocol ${protocol}`);
  }
  return errs;
}

function servingRuntimeErrors(sr: Obj): string[] {
  const errs: string[] = [];
  const priority = new Map<string, number>();
  for (const f of sr.spec.supportedModelFormats as Obj[]) {
    if (f.autoSelect !== true || f.priority === undefined) continue;
    if (priority.has(f.name) && priority.get(f.name) !== f.priority) errs.push(`different priorities assigned for the model format ${f.name}`);
    priority.set(f.name, f.priority);
  }
  if (sr.spec.workerSpec && (sr.spec.workerSpec.containers ?? []).length > 1) errs.push('setting multiple containers in workerSpec is not allowed');
  for (const c of sr.spec.containers as Obj[]) if ((c.env ?? []).some((e: Obj) => e.name === 'PYTHONPATH')) errs.push('env PYTHONPATH is blocked');
  for (const v of sr.spec.protocolVersions ?? []) if (!['v1', 'v2', 'grpc-v1', 'grpc-v2'].includes(v)) errs.push(`protocolVersion ${v} is not v1, v2, grpc-v1 or grpc-v2`);
  return errs;
}

describe("templates: what KServe's webhooks and reconciler refuse (v0.20.0)", () => {
  const runtimes = () => renderedDocs('serving-runtime.yaml');
  const isvcs = () => ['inference-service.yaml', 'inference-service-raw.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml'].flatMap((f) => renderedDocs(f).map((d) => ({ f, d })));

  it('every InferenceService passes, against the ServingRuntime of the same folder', () => {
    expect(servingRuntimeErrors(runtimes()[0]!)).toEqual([]);
    const all = isvcs();
    expect(all.length).toBe(5);
    for (const { f, d } of all) expect(kserveErrors(d, runtimes()), `${f} ${d.metadata.name}`).toEqual([]);
  });

  it('the rules refuse what KServe refuses', () => {
    const serverless = () => structuredClone(renderedDocs('inference-service.yaml')[0]!);
    const raw = () => structuredClone(renderedDocs('inference-service-raw.yaml')[0]!);
    const errsOf = (d: Obj) => kserveErrors(d, runtimes());
    const a = serverless();
    a.spec.predictor.scaleMetric = 'cpu'; // an HPA metric under Knative's KPA
    expect(errsOf(a)).toEqual(['[cpu] is not a supported metric']);
    const b = raw();
    b.spec.predictor.scaleTarget = 101;
    expect(errsOf(b)).toEqual(['the target utilization percentage should be a [1-100] integer']);
    const c = raw();
    c.metadata.annotations['serving.kserve.io/autoscalerClass'] = 'kpa';
    expect(errsOf(c)).toEqual(['[kpa] is not a supported autoscaler class type']);
    const d = serverless();
    d.spec.predictor.minReplicas = 6;
    expect(errsOf(d)).toEqual(['minReplicas must be <= maxReplicas']);
    const e = serverless();
    e.spec.predictor.model.modelFormat = { name: 'onnx-diffusers', version: '2' };
    expect(errsOf(e)[0]).toMatch(/^runtime diffusers-onnx does not support model format onnx-diffusers:2/);
    const f = serverless();
    f.spec.predictor.model.protocolVersion = 'grpc-v2';
    expect(errsOf(f)[0]).toMatch(/over protocol grpc-v2$/);
    const g = serverless();
    g.spec.predictor.model.name = 'sd';
    g.spec.predictor.sklearn = {};
    expect(errsOf(g)).toEqual(['exactly one predictor implementation is required, found ["sklearn","model"]', "the 'name' field is not allowed in standard predictor"]);
    const sr = structuredClone(runtimes()[0]!);
    sr.spec.supportedModelFormats.push({ name: 'onnx-diffusers', version: '2', autoSelect: true, priority: 2 });
    expect(servingRuntimeErrors(sr)).toEqual(['different priorities assigned for the model format onnx-diffusers']);
  });
});

// ---------------------------------------------------------------------------------------------
describe('Knative features the docs name exist in the config-features ConfigMap upstream ships', () => {
  const cm = parseDocs(readFileSync(path.join(SCHEMAS, 'knative-config-features.yaml'), 'utf8'), 'knative-config-features.yaml')[0]!;
  const upstream = YAML.parse(cm.data._example) as Record<string, string>;

  it('the fixture is that ConfigMap, and valid against the ConfigMap schema', () => {
    expect([cm.kind, cm.metadata.name, cm.metadata.namespace]).toEqual(['ConfigMap', 'config-features', 'knative-serving']);
    expect(validate(cm)).toEqual([]);
    expect(upstream['kubernetes.podspec-persistent-volume-claim']).toBe('disabled');
  });

  it("the README's `oc patch knativeserving` sets keys Knative reads, to values it parses (pkg/apis/config/features.go asFlag)", () => {
    const patch = /oc patch knativeserving[^`]*'(\{[^']*\})'/.exec(readFileSync(path.join(ROOT, 'README.md'), 'utf8'));
    expect(patch, 'README: the oc patch knativeserving command').not.toBeNull();
    const features = (JSON.parse(patch![1]!) as Obj).spec.config.features as Record<string, unknown>;
    expect(Object.keys(features).length).toBeGreaterThan(0);
    // An unknown key or value is ignored by Knative without a word: the feature would stay off.
    for (const [k, v] of Object.entries(features)) {
      expect(Object.hasOwn(upstream, k), `${k} is not a key of Knative's config-features`).toBe(true);
      expect(['enabled', 'disabled', 'allowed'], `${k}: ${String(v)}`).toContain(String(v).toLowerCase());
    }
  });

  it('every kubernetes.podspec-* / containerspec-* feature named in the docs and templates exists upstream', () => {
    const files = ['README.md', 'templates/README.md', ...readdirSync(path.join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`), ...templateFiles().map((f) => `templates/${f}`)];
    const named = new Set<string>();
    for (const f of files) for (const m of readFileSync(path.join(ROOT, f), 'utf8').matchAll(/kubernetes\.(?:podspec|containerspec)-[a-z0-9-]*[a-z0-9]/g)) named.add(m[0]);
    expect(named.size).toBeGreaterThanOrEqual(3);
    for (const k of named) expect(Object.hasOwn(upstream, k), `${k} is not a Knative feature`).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
describe('Kubernetes objects in the docs', () => {
  const DOCS = ['README.md', 'templates/README.md', ...readdirSync(path.join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

  /** Fenced ```yaml / ```yml blocks of a markdown text, with their first line number. */
  function yamlBlocks(md: string): Array<{ line: number; text: string }> {
    const out: Array<{ line: number; text: string }> = [];
    const lines = md.split('\n');
    for (let i = 0; i < lines.length; i++) {
      if (!/^\s*```\s*ya?ml\b/i.test(lines[i]!)) continue;
      const start = i + 1;
      while (++i < lines.length && !/^\s*```/.test(lines[i]!));
      out.push({ line: start + 1, text: lines.slice(start, i).join('\n') });
    }
    return out;
  }

  /**
   * Snippets that are not whole objects, and where they go. A new snippet must be either a whole object (validated
   * as such) or listed here with the object it edits, so that it is validated in place.
   */
  const FRAGMENTS: Record<string, (snippet: Obj) => Obj> = {
    // "copy templates/warmup-job.yaml and replace its container's `command`"
    'docs/OPERATIONS.md command': (s) => {
      const job = structuredClone(renderedDocs('warmup-job.yaml')[0]!);
      Object.assign(job.spec.template.spec.containers[0], s);
      return job;
    },
  };

  it('finds the snippets it checks (the scanner can fail)', () => {
    expect(yamlBlocks('text\n```yaml\napiVersion: v1\nkind: Secret\n```\n```sh\nls\n```\n  ```yml\na: 1\n  ```\n')).toEqual([
      { line: 3, text: 'apiVersion: v1\nkind: Secret' },
      { line: 10, text: 'a: 1' },
    ]);
  });

  it('every YAML snippet is a valid whole object, or a known fragment valid in the object it edits', () => {
    let checked = 0;
    for (const file of DOCS) {
      for (const { line, text } of yamlBlocks(readFileSync(path.join(ROOT, file), 'utf8'))) {
        const where = `${file}:${line}`;
        for (const doc of parseDocs(render(text, loadParams()), where)) {
          if (doc.apiVersion !== undefined || doc.kind !== undefined) {
            expect(validate(doc), where).toEqual([]);
            expect(apiServerErrors(doc), where).toEqual([]);
          } else {
            const key = `${file} ${Object.keys(doc).join(',')}`;
            const apply = FRAGMENTS[key];
            expect(apply, `${where}: a snippet that is neither a whole object nor a known fragment (${key})`).toBeDefined();
            expect(validate(apply!(doc)), where).toEqual([]);
          }
          checked++;
        }
      }
    }
    expect(checked).toBeGreaterThanOrEqual(1);
  });
});

describe('the objects the docs’ commands generate', () => {
  const hasEnvsubst = spawnSync('sh', ['-c', 'command -v envsubst && command -v bash'], { stdio: 'ignore' }).status === 0;

  it.skipIf(!hasEnvsubst)("templates/README.md's render-by-hand command (set -a; . params.env; envsubst …) gives valid objects", () => {
    const block = /```sh\n([\s\S]*?)```/.exec(readFileSync(path.join(TEMPLATES, 'README.md'), 'utf8'))?.[1];
    expect(block, 'templates/README.md: the ```sh block').toBeDefined();
    // The command as documented, its `| oc apply -f -` replaced by printing what it would apply.
    const cmd = block!.replace(/#[^\n]*/g, '').replace(/\|\s*oc apply -f -/, '');
    expect(cmd).toContain('envsubst');
    const r = spawnSync('bash', ['-c', cmd], { cwd: ROOT, encoding: 'utf8', env: { PATH: process.env.PATH } });
    expect(r.status, r.stderr).toBe(0);
    const docs = parseDocs(r.stdout, 'templates/README.md command');
    expect(docs.map((d) => d.kind)).toEqual(['InferenceService']);
    expect(docs[0]).toEqual(renderedDocs('inference-service.yaml')[0]);
    expect(validate(docs[0]!)).toEqual([]);
  });

  it('Serverless: the Knative hostname label <name>-predictor-<namespace> fits 63 characters (OpenShift Serverless domain template)', () => {
    // OpenShift Serverless names hosts {{.Name}}-{{.Namespace}}.{{.Domain}}; Knative refuses a host whose label
    // passes 63 characters (pkg/reconciler/route/domains: IsFullyQualifiedDomainName), and the revision never routes.
    for (const f of ['inference-service.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml']) {
      for (const d of renderedDocs(f)) {
        const label = `${d.metadata.name}-predictor-${d.metadata.namespace}`;
        expect(label.length, `${f} ${label}`).toBeLessThanOrEqual(63);
      }
    }
  });

  it("RawDeployment: the Route's generated host label <route name>-<namespace> fits 63 characters", () => {
    // route.yaml sets no spec.host: the router makes <name>-<namespace>.<apps domain> and marks a longer first label
    // InvalidHost ("must be no more than 63 characters").
    const r = renderedDocs('route.yaml')[0]!;
    expect(r.spec.host).toBeUndefined();
    expect(`${r.metadata.name}-${r.metadata.namespace}`.length).toBeLessThanOrEqual(63);
  });
});

// ---------------------------------------------------------------------------------------------
// Knative v1.23.0's webhook, on the annotations KServe copies from a Serverless InferenceService onto its Knative
// Service: pkg/apis/autoscaling/annotation_validation.go validateLastPodRetention (a duration in [0, 1h]) and
// pkg/apis/serving/v1/revision_validation.go validateProgressDeadlineAnnotation (a duration, whole seconds, >= 0).

/** Go's time.ParseDuration, in seconds; NaN when Go would refuse it. */
function goDuration(s: string): number {
  const unit: Record<string, number> = { ns: 1e-9, us: 1e-6, µs: 1e-6, ms: 1e-3, s: 1, m: 60, h: 3600 };
  const m = /^([-+]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$/u.exec(s);
  if (s === '0') return 0;
  if (!m) return NaN;
  let total = 0;
  for (const part of s.replace(/^[-+]/, '').matchAll(/(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)/gu)) total += Number(part[1]) * unit[part[2]!]!;
  return m[1] === '-' ? -total : total;
}

function knativeAnnotationErrors(annotations: Record<string, string>): string[] {
  const errs: string[] = [];
  const retention = annotations['autoscaling.knative.dev/scale-to-zero-pod-retention-period'];
  if (retention !== undefined) {
    const d = goDuration(retention);
    if (Number.isNaN(d)) errs.push(`invalid value: ${retention}: autoscaling.knative.dev/scale-to-zero-pod-retention-period`);
    else if (d < 0 || d > 3600) errs.push(`expected 0s <= ${retention} <= 1h0m0s: autoscaling.knative.dev/scale-to-zero-pod-retention-period`);
  }
  const deadline = annotations['serving.knative.dev/progress-deadline'];
  if (deadline !== undefined && deadline !== '') {
    const d = goDuration(deadline);
    if (Number.isNaN(d)) errs.push(`invalid value: ${deadline}: serving.knative.dev/progress-deadline`);
    else if (Math.round(d) !== d) errs.push(`progress-deadline=${deadline} is not at second precision`);
    else if (d < 0) errs.push(`progress-deadline=${deadline} must be positive`);
  }
  return errs;
}

describe("templates: what Knative's webhook refuses in the annotations of a Serverless InferenceService (v1.23.0)", () => {
  it('every Serverless InferenceService passes', () => {
    const serverless = ['inference-service.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml'].flatMap((f) => renderedDocs(f));
    expect(serverless.length).toBe(4);
    for (const d of serverless) expect(knativeAnnotationErrors(d.metadata.annotations), d.metadata.name).toEqual([]);
  });

  it('the rules refuse what Knative refuses', () => {
    expect([goDuration('10m'), goDuration('1800s'), goDuration('1h30m'), goDuration('1.5s'), goDuration('0')]).toEqual([600, 1800, 5400, 1.5, 0]);
    expect([goDuration('1800'), goDuration('10 m'), goDuration('')].every(Number.isNaN)).toBe(true);
    expect(knativeAnnotationErrors({ 'autoscaling.knative.dev/scale-to-zero-pod-retention-period': '2h' })).toEqual(['expected 0s <= 2h <= 1h0m0s: autoscaling.knative.dev/scale-to-zero-pod-retention-period']);
    expect(knativeAnnotationErrors({ 'serving.knative.dev/progress-deadline': '1800' })).toEqual(['invalid value: 1800: serving.knative.dev/progress-deadline']);
    expect(knativeAnnotationErrors({ 'serving.knative.dev/progress-deadline': '1.5s' })).toEqual(['progress-deadline=1.5s is not at second precision']);
  });
});

// ---------------------------------------------------------------------------------------------
// Knative v1.23's webhook on the pod spec KServe builds for a Serverless InferenceService: the ServingRuntime's volumes
// and container with the InferenceService's merged in (KServe MergePodSpec / MergeRuntimeContainers: strategic merge,
// volumes and env by name, mounts by path). knative/serving pkg/apis/serving/k8s_validation.go (ValidateVolumes,
// validateVolumeMounts, validateContainerPorts, reservedEnvVars, validateProbe, validateReadinessProbe) and fieldmask.go
// (ContainerMask: no lifecycle).

/** Mount paths Knative refuses: since 1.13 (#14686), and before it, when /tmp, /var and /var/log were reserved too. */
const KNATIVE_RESERVED_PATHS = ['/', '/dev', '/dev/log'];
const KNATIVE_RESERVED_BEFORE_1_13 = [...KNATIVE_RESERVED_PATHS, '/tmp', '/var', '/var/log'];

const mergeBy = (key: string, base: Obj[] = [], over: Obj[] = []): Obj[] => {
  const out = new Map(base.map((x) => [x[key] as string, x]));
  for (const x of over) out.set(x[key] as string, { ...out.get(x[key] as string), ...x });
  return [...out.values()];
};

/** A strategic merge of two objects without lists (a probe): `over`'s fields replace `base`'s, nested objects merge. */
const mergeFields = (base: Obj | undefined, over: Obj | undefined): Obj | undefined => {
  if (base === undefined || over === undefined) return over ?? base;
  const out: Obj = { ...base };
  for (const [k, v] of Object.entries(over)) out[k] = v !== null && typeof v === 'object' && !Array.isArray(v) ? mergeFields(base[k] as Obj | undefined, v as Obj) : v;
  return out;
};

const PROBES = ['livenessProbe', 'readinessProbe', 'startupProbe'] as const;

/** The pod spec KServe hands Knative for `isvc` on `sr` (the fields Knative's rules below read). */
function knativePodSpec(isvc: Obj, sr: Obj): { volumes: Obj[]; container: Obj } {
  const p = isvc.spec.predictor as Obj;
  const c = sr.spec.containers[0] as Obj;
  const m = p.model as Obj;
  const container: Obj = { ...c, ...Object.fromEntries(Object.entries(m).filter(([k]) => !['modelFormat', 'runtime', 'storage', 'storageUri', 'protocolVersion'].includes(k))),
    env: mergeBy('name', c.env, m.env), volumeMounts: mergeBy('mountPath', c.volumeMounts, m.volumeMounts), ports: mergeBy('containerPort', c.ports, m.ports) };
  // An InferenceService's probe field overrides the ServingRuntime's field by field, not the whole probe.
  for (const k of PROBES) if (c[k] !== undefined || m[k] !== undefined) container[k] = mergeFields(c[k] as Obj | undefined, m[k] as Obj | undefined);
  return { volumes: mergeBy('name', sr.spec.volumes, p.volumes), container };
}

/**
 * Knative's checks of the user container's probes, after its defaults (revision_defaults.go: successThreshold 1; a
 * periodSeconds set gets the kubelet's failureThreshold and timeoutSeconds). periodSeconds unset is Knative's own
 * aggressive readiness probing, which takes neither field.
 */
function knativeProbeErrors(c: Obj): string[] {
  const errs: string[] = [];
  const portName = ((c.ports ?? []) as Obj[])[0]?.name as string | undefined;
  for (const kind of PROBES) {
    const p = c[kind] as Obj | undefined;
    if (p === undefined) continue;
    const handlers = ['httpGet', 'tcpSocket', 'exec', 'grpc'].filter((h) => p[h] !== undefined);
    if (handlers.length !== 1) errs.push(`${kind}: expected exactly one, got ${handlers.length === 0 ? 'neither' : 'both'}: ${handlers.join(', ') || 'httpGet, tcpSocket, exec, grpc'}`);
    const port = (p.httpGet ?? p.tcpSocket)?.port as unknown;
    if (typeof port === 'string' && port !== portName) errs.push(`${kind}: invalid value: ${port}: Probe port must match container port`);
    if (kind !== 'readinessProbe') continue;
    if ((p.periodSeconds ?? 0) === 0) {
      if ((p.failureThreshold ?? 0) !== 0) errs.push(`${kind}: failureThreshold is disallowed when periodSeconds is zero`);
      if ((p.timeoutSeconds ?? 0) !== 0) errs.push(`${kind}: timeoutSeconds is disallowed when periodSeconds is zero`);
    }
  }
  return errs;
}

function knativePodSpecErrors(spec: { volumes: Obj[]; container: Obj }, reserved = KNATIVE_RESERVED_PATHS): string[] {
  const errs: string[] = [];
  const { volumes, container: c } = spec;
  const byName = new Map(volumes.map((v) => [v.name as string, v]));
  const mounted = new Set((c.volumeMounts as Obj[]).map((vm) => vm.name as string));
  for (const v of volumes) if (!mounted.has(v.name)) errs.push(`volume with name "${v.name}" not mounted`);
  const paths = new Set<string>();
  for (const vm of c.volumeMounts as Obj[]) {
    const at = path.posix.normalize(vm.mountPath).replace(/(.)\/$/, '$1'); // Go's path.Clean
    const v = byName.get(vm.name);
    if (!v) errs.push(`volumeMount ${vm.name}: volumeMount has no matching volume`);
    if (reserved.includes(at)) errs.push(`mountPath "${at}" is a reserved path`);
    if (paths.has(at)) errs.push(`"${vm.mountPath}" must be unique`);
    paths.add(at);
    if (v && !v.emptyDir && !v.persistentVolumeClaim && !v.ephemeral && !vm.readOnly) errs.push(`volumeMount ${vm.name}: volume mount should be readOnly for this type of volume`);
  }
  const ports = (c.ports ?? []) as Obj[];
  if (ports.length > 1) errs.push('more than one container port is set');
  for (const port of ports) {
    if (!['', 'h2c', 'http1', undefined].includes(port.name)) errs.push(`port name ${port.name} is not h2c or http1`);
    if ([8012, 8013, 8022, 9090, 9091, 8008].includes(port.containerPort)) errs.push(`port ${port.containerPort} is reserved`);
  }
  for (const e of (c.env ?? []) as Obj[]) if (['PORT', 'K_SERVICE', 'K_CONFIGURATION', 'K_REVISION'].includes(e.name)) errs.push(`"${e.name}" is a reserved environment variable`);
  if (c.lifecycle !== undefined) errs.push('must not set the field(s): lifecycle');
  return [...errs, ...knativeProbeErrors(c)];
}

describe("templates: what Knative's webhook refuses in the pod spec of a Serverless InferenceService (v1.23.0)", () => {
  const sr = () => renderedDocs('serving-runtime.yaml')[0]!;
  const serverless = () => ['inference-service.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml']
    .flatMap((f) => renderedDocs(f).map((d) => ({ f, d })));

  it('every Serverless InferenceService passes', () => {
    expect(serverless().length).toBe(4);
    for (const { f, d } of serverless()) expect(knativePodSpecErrors(knativePodSpec(d, sr())), `${f} ${d.metadata.name}`).toEqual([]);
  });

  it('a mount Knative releases before 1.13 refuse is stated as the minimum Knative in the docs that tell how to deploy', () => {
    const old = serverless().flatMap(({ d }) => knativePodSpecErrors(knativePodSpec(d, sr()), KNATIVE_RESERVED_BEFORE_1_13));
    if (old.length === 0) return;
    for (const f of ['README.md', 'templates/README.md']) {
      expect(/Knative Serving 1\.13 or later/.test(readFileSync(path.join(ROOT, f), 'utf8').replace(/\s+/g, ' ')), `${f} should name Knative Serving 1.13 or later (${old[0]})`).toBe(true);
    }
  });

  it('the rules refuse what Knative refuses', () => {
    const spec = () => knativePodSpec(structuredClone(renderedDocs('inference-service.yaml')[0]!), sr());
    const a = spec();
    a.volumes.push({ name: 'extra', emptyDir: {} });
    expect(knativePodSpecErrors(a)).toEqual(['volume with name "extra" not mounted']);
    const b = spec();
    b.volumes.push({ name: 'ca', configMap: { name: 'ca' } });
    b.container.volumeMounts.push({ name: 'ca', mountPath: '/etc/ca' });
    expect(knativePodSpecErrors(b)).toEqual(['volumeMount ca: volume mount should be readOnly for this type of volume']);
    const c = spec();
    c.container.volumeMounts.push({ name: 'tmp', mountPath: '/dev/' });
    expect(knativePodSpecErrors(c)).toEqual(['mountPath "/dev" is a reserved path']);
    expect(knativePodSpecErrors(spec(), KNATIVE_RESERVED_BEFORE_1_13)).toEqual(['mountPath "/tmp" is a reserved path']);
    const d = spec();
    d.container.env.push({ name: 'PORT', value: '9000' });
    d.container.ports.push({ containerPort: 9090, name: 'metrics' });
    d.container.lifecycle = { preStop: { exec: { command: ['sleep', '5'] } } };
    expect(knativePodSpecErrors(d)).toEqual(['more than one container port is set', 'port name metrics is not h2c or http1', 'port 9090 is reserved',
      '"PORT" is a reserved environment variable', 'must not set the field(s): lifecycle']);
    // The InferenceService's own mounts and volumes merge into the ServingRuntime's by path and name, not beside them.
    const merged = spec();
    expect([merged.volumes.map((v) => v.name), merged.container.volumeMounts.map((m: Obj) => m.mountPath)]).toEqual([['model-cache', 'tmp'], ['/mnt/cache', '/tmp']]);
    // Probes: an InferenceService's readiness field merged into the ServingRuntime's probe (which sets no periodSeconds).
    const withProbe = (probe: Obj) => {
      const isvc = structuredClone(renderedDocs('inference-service.yaml')[0]!);
      isvc.spec.predictor.model.readinessProbe = probe;
      return knativePodSpecErrors(knativePodSpec(isvc, sr()));
    };
    expect(withProbe({ timeoutSeconds: 5, failureThreshold: 3 })).toEqual(['readinessProbe: failureThreshold is disallowed when periodSeconds is zero',
      'readinessProbe: timeoutSeconds is disallowed when periodSeconds is zero']);
    expect(withProbe({ periodSeconds: 2, timeoutSeconds: 5 })).toEqual([]);
    expect(withProbe({ tcpSocket: { port: 8080 } })).toEqual(['readinessProbe: expected exactly one, got both: httpGet, tcpSocket']);
    expect(withProbe({ httpGet: { port: 'metrics' } })).toEqual(['readinessProbe: invalid value: metrics: Probe port must match container port']);
  });
});
