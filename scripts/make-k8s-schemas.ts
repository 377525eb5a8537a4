/**
 * @module Writes test/fixtures/k8s-schemas/*.json (the API schemas test/deploy-schema.test.ts validates the
 * templates against) from the upstream files named in test/fixtures/k8s-schemas/README.md:
 *
 *   node dist/scripts/make-k8s-schemas.js --k8s-swagger swagger.json --isvc-crd isvc.yaml \
 *     --sr-crd servingruntimes.yaml --route-crd routes.crd.yaml --trigger-crd trigger.yaml [--out test/fixtures/k8s-schemas]
 *
 * Trimming (lossless for validation): descriptions and the keywords a validator never reads are dropped;
 * the Kubernetes swagger keeps only the definitions reachable from the kinds listed in K8S_ROOTS; each CRD keeps
 * only the openAPIV3Schema of its storage version. Two normalisations, both what the API server does:
 * resource.Quantity (swagger: string) also takes a number, as the server's decoder does and as the v3 spec says
 * (oneOf string|number), and a string must have the syntax the decoder parses (the pattern the CRDs carry); an object definition with neither properties nor additionalProperties (FieldsV1,
 * RawExtension) is free-form in a built-in type, so it gets x-kubernetes-preserve-unknown-fields.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';

type Schema = Record<string, unknown>;

/** The syntax resource.ParseQuantity accepts (the pattern controller-gen writes for every Quantity in a CRD). */
const QUANTITY_PATTERN = '^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$';

/** Built-in kinds the templates and docs create, plus ObjectMeta (every object's and embedded object's metadata). */
const K8S_ROOTS = [
  'io.k8s.api.batch.v1.Job',
  'io.k8s.api.core.v1.PersistentVolumeClaim',
  'io.k8s.api.core.v1.Secret',
  'io.k8s.api.core.v1.ConfigMap',
  'io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta',
];

/** The keywords test/deploy-schema.test.ts reads (and what the API server's structural validation reads). */
const KEEP = new Set([
  '$ref', 'type', 'format', 'properties', 'additionalProperties', 'items', 'required', 'enum', 'nullable', 'pattern',
  'minLength', 'maxLength', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'minItems', 'maxItems',
  'minProperties', 'maxProperties', 'uniqueItems', 'anyOf', 'oneOf', 'allOf', 'not',
  'x-kubernetes-preserve-unknown-fields', 'x-kubernetes-int-or-string', 'x-kubernetes-embedded-resource',
  'x-kubernetes-list-type', 'x-kubernetes-list-map-keys', 'x-kubernetes-map-type', 'x-kubernetes-validations',
  'x-kubernetes-group-version-kind',
]);

function trim(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(trim);
  if (node === null || typeof node !== 'object') return node;
  const out: Schema = {};
  for (const [k, v] of Object.entries(node as Schema)) {
    if (!KEEP.has(k)) continue;
    if (k === 'properties') {
      // Property names are data, not keywords: keep every one.
      out[k] = Object.fromEntries(Object.entries(v as Schema).map(([name, sub]) => [name, trim(sub)]));
    } else if (k === 'enum' || k === 'required' || k === 'x-kubernetes-list-map-keys' || k === 'x-kubernetes-group-version-kind') {
      out[k] = v;
    } else if (k === 'x-kubernetes-validations') {
      out[k] = (v as Schema[]).map((r) => ({ rule: r.rule, ...(r.message ? { message: r.message } : {}) }));
    } else {
      out[k] = trim(v);
    }
  }
  return out;
}

function refsOf(node: unknown, into: Set<string>): void {
  if (Array.isArray(node)) for (const v of node) refsOf(v, into);
  else if (node !== null && typeof node === 'object') {
    for (const [k, v] of Object.entries(node as Schema)) {
      if (k === '$ref' && typeof v === 'string') into.add(v.replace('#/definitions/', ''));
      else refsOf(v, into);
    }
  }
}

function k8sDefinitions(swaggerPath: string): Record<string, unknown> {
  const swagger = JSON.parse(readFileSync(swaggerPath, 'utf8')) as { definitions: Record<string, Schema> };
  const keep = new Set<string>();
  const todo = [...K8S_ROOTS];
  while (todo.length > 0) {
    const name = todo.pop()!;
    if (keep.has(name)) continue;
    const def = swagger.definitions[name];
    if (!def) throw new Error(`${swaggerPath}: no definition ${name}`);
    keep.add(name);
    const refs = new Set<string>();
    refsOf(def, refs);
    todo.push(...refs);
  }
  const out: Record<string, unknown> = {};
  for (const name of [...keep].sort()) {
    const def = trim(swagger.definitions[name]) as Schema;
    if (name === 'io.k8s.apimachinery.pkg.api.resource.Quantity') {
      out[name] = { oneOf: [{ type: 'string', pattern: QUANTITY_PATTERN }, { type: 'number' }] };
    } else if (def.type === 'object' && !def.properties && !def.additionalProperties) {
      out[name] = { ...def, 'x-kubernetes-preserve-unknown-fields': true };
    } else {
      out[name] = def;
    }
  }
  return out;
}

interface Crd {
  spec: { group: string; names: { kind: string }; versions: Array<{ name: string; storage: boolean; served: boolean; schema: { openAPIV3Schema: unknown } }> };
}

function crdSchema(crdPath: string): { group: string; kind: string; version: string; served: string[]; schema: unknown } {
  const docs = YAML.parseAllDocuments(readFileSync(crdPath, 'utf8')).map((d) => d.toJSON() as Crd).filter((d) => d?.spec?.versions);
  if (docs.length !== 1) throw new Error(`${crdPath}: expected one CustomResourceDefinition, found ${docs.length}`);
  const { group, names, versions } = docs[0]!.spec;
  const storage = versions.find((v) => v.storage);
  if (!storage) throw new Error(`${crdPath}: no storage version`);
  return { group, kind: names.kind, version: storage.name, served: versions.filter((v) => v.served).map((v) => v.name), schema: trim(storage.schema.openAPIV3Schema) };
}

function main(argv: string[]): void {
  const args = new Map<string, string>();
  for (let i = 0; i < argv.length; i += 2) args.set(argv[i]!.replace(/^--/, ''), argv[i + 1]!);
  const need = ['k8s-swagger', 'isvc-crd', 'sr-crd', 'route-crd', 'trigger-crd'];
  const missing = need.filter((n) => !args.get(n));
  if (missing.length > 0) {
    process.stderr.write(`usage: make-k8s-schemas --k8s-swagger F --isvc-crd F --sr-crd F --route-crd F --trigger-crd F [--out DIR] (missing: ${missing.join(', ')})\n`);
    process.exit(2);
  }
  const out = args.get('out') ?? 'test/fixtures/k8s-schemas';
  mkdirSync(out, { recursive: true });
  const write = (name: string, data: unknown) => {
    writeFileSync(path.join(out, name), `${JSON.stringify(data)}\n`);
    process.stdout.write(`wrote ${path.join(out, name)}\n`);
  };
  write('kubernetes.json', { definitions: k8sDefinitions(args.get('k8s-swagger')!) });
  const isvc = crdSchema(args.get('isvc-crd')!);
  const sr = crdSchema(args.get('sr-crd')!);
  write('kserve.json', { [isvc.kind]: isvc, [sr.kind]: sr });
  const route = crdSchema(args.get('route-crd')!);
  write('route.json', { [route.kind]: route });
  const trigger = crdSchema(args.get('trigger-crd')!);
  write('knative-eventing.json', { [trigger.kind]: trigger });
}

main(process.argv.slice(2));
