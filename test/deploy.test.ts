/**
 * Deployment material: templates/ (rendered the way `make render` does), the Makefile,
 * docker/Dockerfile + .dockerignore, scripts/test-v1.sh, scripts/export-onnx.sh, scripts/v1_input.json.
 * The probes-against-the-real-server check is in deploy-server.test.ts.
 */
import { execFile, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { loadParams, render, TEMPLATES } from './helpers/templates.js';
import { loadConfig, misspelledVariables, VARIABLES } from '../src/config.js';
import { CLEANUP_MS } from '../src/storage/pending-io.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const execFileP = promisify(execFile);

type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const has = (cmd: string): boolean => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
const read = (rel: string): string => readFileSync(path.join(ROOT, rel), 'utf8');

// ---------------------------------------------------------------------------------------------
// Parameters and rendering: envsubst restricted to the names in templates/params.env (test/helpers/templates.ts).

const templateFiles = (): string[] => readdirSync(TEMPLATES).filter((f) => f.endsWith('.yaml')).sort();

function renderedDocs(file: string, params = loadParams()): Obj[] {
  const docs = YAML.parseAllDocuments(render(readFileSync(path.join(TEMPLATES, file), 'utf8'), params));
  for (const d of docs) if (d.errors.length > 0) throw new Error(`${file}: ${d.errors[0]!.message}`);
  return docs.map((d) => d.toJSON() as Obj).filter((d) => d !== null);
}

function allDocs(): Array<{ file: string; doc: Obj }> {
  return templateFiles().flatMap((file) => renderedDocs(file).map((doc) => ({ file, doc })));
}

function findKey(o: unknown, key: string, at = '$'): string[] {
  if (Array.isArray(o)) return o.flatMap((v, i) => findKey(v, key, `${at}[${i}]`));
  if (o !== null && typeof o === 'object') {
    return Object.entries(o).flatMap(([k, v]) => [...(k === key ? [`${at}.${k}`] : []), ...findKey(v, key, `${at}.${k}`)]);
  }
  return [];
}

interface Probe {
  file: string;
  kind: 'livenessProbe' | 'readinessProbe' | 'startupProbe';
  probe: Obj;
}
/** The containers of a rendered template: the ServingRuntime's, an InferenceService's model (merged into it), a Job's. */
const containersOf = (doc: Obj): Obj[] => [
  ...(doc.spec?.containers ?? []),
  ...(doc.spec?.predictor?.model ? [doc.spec.predictor.model] : []),
  ...(doc.spec?.template?.spec?.containers ?? []),
];

/** Every probe of every container in the rendered templates (ServingRuntime, isvc overrides, Job). */
function allProbes(): Probe[] {
  const out: Probe[] = [];
  for (const { file, doc } of allDocs()) {
    for (const c of containersOf(doc)) {
      for (const kind of ['livenessProbe', 'readinessProbe', 'startupProbe'] as const) if (c[kind]) out.push({ file, kind, probe: c[kind] });
    }
  }
  return out;
}

// The routes the server answers (DESIGN.md "HTTP surface"). Liveness: 200 whatever the boot state.
const LIVENESS_ROUTES = ['/', '/v2/health/live'];
const READINESS_ROUTES = ['/v2/health/ready', '/v1/models/{{.Name}}/ready', '/v2/models/{{.Name}}/ready'];

// The environment contract (DESIGN.md + issue 8).
const CONTRACT = [
  'STORAGE_URI', 'MODEL_NAME', 'PORT', 'MODEL_CACHE_DIR', 'AWS_ENDPOINT_URL', 'S3_ENDPOINT', 'AWS_S3_ENDPOINT',
  'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION', 'AWS_DEFAULT_REGION', 'AWS_CA_BUNDLE', 'S3_USE_HTTPS',
  'S3_VERIFY_SSL', 'S3_MAX_CONCURRENCY', 'S3_PART_SIZE', 'S3_STALL_TIMEOUT_S', 'EXECUTION_PROVIDER', 'WORKERS',
  'MAX_BATCH_SIZE', 'BATCH_WINDOW_MS', 'MAX_QUEUE', 'LOG_LEVEL', 'MAX_BODY_BYTES', 'MAX_IMAGE_SIZE', 'MAX_STEPS',
  'WARMUP_STEPS', 'SHUTDOWN_GRACE_S', 'EXIT_ON_BOOT_FAILURE', 'REQUEST_TIMEOUT_S', 'RESULT_CACHE_MB', 'OUTPUT_FORMAT',
];
/** Come from the data-connection Secret (envFrom): an `env` entry would silently override it. */
const FROM_SECRET = ['AWS_ENDPOINT_URL', 'S3_ENDPOINT', 'AWS_S3_ENDPOINT', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION', 'AWS_DEFAULT_REGION', 'AWS_CA_BUNDLE', 'S3_USE_HTTPS', 'S3_VERIFY_SSL'];

const ISVC_FILES = ['inference-service.yaml', 'inference-service-raw.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml'];

describe('templates: parameters and rendering', () => {
  it('every ${NAME} used by a template is defined in params.env, and every parameter is used', () => {
    const params = loadParams();
    expect(params.size).toBeGreaterThan(5);
    const used = new Set<string>();
    for (const f of templateFiles()) {
      for (const m of readFileSync(path.join(TEMPLATES, f), 'utf8').matchAll(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g)) {
        expect(params.has(m[1]!), `${f} uses \${${m[1]}} which params.env does not define`).toBe(true);
        used.add(m[1]!);
      }
    }
    const unused = [...params.keys()].filter((k) => !used.has(k));
    expect(unused, 'parameters no template uses').toEqual([]);
  });

  it('templates use only the ${NAME} form, so envsubst and the Node renderer cannot disagree', () => {
    const params = loadParams();
    for (const f of templateFiles()) {
      const bare = [...readFileSync(path.join(TEMPLATES, f), 'utf8').matchAll(/\$([A-Za-z_][A-Za-z0-9_]*)/g)].map((m) => m[1]!).filter((n) => params.has(n));
      expect(bare, `${f}: bare $NAME placeholders`).toEqual([]);
    }
  });

  it.each(templateFiles())('%s renders to valid YAML with apiVersion, kind, metadata and no placeholder left', (file) => {
    const text = render(readFileSync(path.join(TEMPLATES, file), 'utf8'), loadParams());
    expect(text).not.toMatch(/\$\{[A-Za-z_][A-Za-z0-9_]*\}/);
    const docs = renderedDocs(file);
    expect(docs.length).toBeGreaterThan(0);
    for (const d of docs) {
      expect(typeof d.apiVersion, `${file}: apiVersion`).toBe('string');
      expect(typeof d.kind, `${file}: kind`).toBe('string');
      expect(d.metadata?.name, `${file}: metadata.name`).toMatch(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/);
      expect(d.metadata?.namespace, `${file}: metadata.namespace`).toBe(loadParams().get('NAMESPACE'));
    }
  });

  it('renders with other parameter values too (values substituted, not baked in)', () => {
    const params = loadParams();
    params.set('MODEL_NAME', 'sdxl-turbo');
    params.set('NAMESPACE', 'team-a');
    params.set('STORAGE_URI', 's3://other/sdxl');
    const isvc = renderedDocs('inference-service.yaml', params)[0]!;
    expect(isvc.metadata.name).toBe('sdxl-turbo');
    expect(isvc.metadata.namespace).toBe('team-a');
    expect(isvc.spec.predictor.model.env.find((e: Obj) => e.name === 'STORAGE_URI').value).toBe('s3://other/sdxl');
    expect(renderedDocs('route.yaml', params)[0]!.spec.to.name).toBe('sdxl-turbo-predictor');
  });

  it.skipIf(!has('envsubst') || !has('make'))('`make render` (real envsubst) produces exactly what the documented rules produce', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-render-'));
    try {
      const r = spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, MODEL_NAME: 'from-env' } });
      expect(r.status, r.stderr).toBe(0);
      const params = loadParams();
      params.set('MODEL_NAME', 'from-env'); // the environment overrides params.env, as documented
      for (const f of templateFiles()) {
        expect(readFileSync(path.join(out, f), 'utf8'), f).toBe(render(readFileSync(path.join(TEMPLATES, f), 'utf8'), params));
      }
      // KServe's Go template survives rendering.
      expect(readFileSync(path.join(out, 'serving-runtime.yaml'), 'utf8')).toContain('"{{.Name}}"');
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it.skipIf(!has('make'))('`make render` refuses a MODEL_NAME KServe or the warm-up Job would refuse, naming the rule, and writes nothing', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-render-'));
    const renderAs = (name: string) => spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`, `MODEL_NAME=${name}`], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, PATH: process.env.PATH } });
    try {
      for (const name of ['sd-1.5', 'SD15', '1sd', 'sd-', 'sd 15', "sd'15", 'sdé']) {
        const r = renderAs(name);
        expect(r.status, name).toBe(2);
        expect(r.stderr, name).toContain(`MODEL_NAME='${name}' cannot name an InferenceService: lower-case letters, digits and '-'`);
      }
      const long = renderAs('a'.repeat(51));
      expect(long.status).toBe(2);
      expect(long.stderr).toContain('is 51 characters: at most 50, as the warm-up Job is named MODEL_NAME-cache-warmup');
      expect(readdirSync(out)).toEqual([]);
      if (has('envsubst')) {
        const ok = renderAs(`sd-15-${'a'.repeat(44)}`);
        expect(ok.status, ok.stderr).toBe(0);
        expect(readFileSync(path.join(out, 'warmup-job.yaml'), 'utf8')).toContain(`name: "sd-15-${'a'.repeat(44)}-cache-warmup"`);
        // Valid for KServe, but OpenShift's generated hosts would not fit one DNS label: rendered, with a warning.
        expect(ok.stderr).toContain('warning: MODEL_NAME and NAMESPACE are 59 characters together, over 52: on OpenShift the hosts <name>-predictor-<namespace> (Serverless)');
        const fits = renderAs(`sd-15-${'a'.repeat(37)}`);
        expect([fits.status, fits.stderr]).toEqual([0, '']);
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it.skipIf(!has('make'))('`make render` takes a digest in TAG and refuses a tag or digest inside IMAGE, naming the split', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-render-'));
    const renderWith = (...vars: string[]) => spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`, ...vars], { cwd: ROOT, encoding: 'utf8' });
    try {
      for (const [image, repo] of [['quay.io/acme/rt@sha256:0a1b', 'quay.io/acme/rt'], ['registry.local:5000/rt:1.2', 'registry.local:5000/rt']]) {
        const r = renderWith(`IMAGE=${image}`);
        expect(r.status, image).toBe(2);
        expect(r.stderr, image).toContain(`IMAGE='${image}' holds a tag or digest, and the manifests add :TAG to it: give the repository alone (IMAGE=${repo}) and the rest as TAG`);
      }
      expect(readdirSync(out)).toEqual([]);
      if (has('envsubst')) {
        const pinned = renderWith('IMAGE=registry.local:5000/acme/rt', 'TAG=0.1.0@sha256:0a1b');
        expect(pinned.status, pinned.stderr).toBe(0);
        for (const f of ['serving-runtime.yaml', 'warmup-job.yaml']) expect(readFileSync(path.join(out, f), 'utf8'), f).toContain('image: "registry.local:5000/acme/rt:0.1.0@sha256:0a1b"');
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it.skipIf(!has('make'))('`make render` refuses a provider the runtime would refuse, quantities Kubernetes would refuse and a request over its limit, every one in its own line', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-render-'));
    const renderWith = (...vars: string[]) => spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`, ...vars], { cwd: ROOT, encoding: 'utf8' });
    try {
      const refused: [string[], string][] = [
        [['EXECUTION_PROVIDER=gpu'], "EXECUTION_PROVIDER='gpu' must be auto, cuda or cpu: the runtime would refuse it"],
        [['CACHE_SIZE=50GB'], "CACHE_SIZE='50GB' is not a Kubernetes quantity: e.g. 8Gi (binary) or 8G (decimal)"],
        [['CACHE_SIZE=50 Gi'], "CACHE_SIZE='50 Gi' is not a Kubernetes quantity"],
        [['MEMORY_LIMIT=24m', 'MEMORY_REQUEST=8Mi'], "MEMORY_LIMIT='24m' is 24 thousandths (or less) of a byte: did you mean 24Mi?"],
        [['CPU_LIMIT=two'], "CPU_LIMIT='two' is not a Kubernetes quantity: e.g. 2 or 500m"],
        [['CPU_REQUEST='], 'CPU_REQUEST is empty: give a Kubernetes quantity (e.g. 2 or 500m)'],
        [['MEMORY_REQUEST=0'], "MEMORY_REQUEST='0' must be more than zero"],
        [['CPU_REQUEST=10'], "CPU_REQUEST='10' is over CPU_LIMIT='8': Kubernetes refuses a pod whose request is over its limit"],
        [['MEMORY_REQUEST=25Gi'], "MEMORY_REQUEST='25Gi' is over MEMORY_LIMIT='24Gi'"],
        // Amounts compared, not digits: 25000Mi is over 24Gi (24576Mi), 1.6 is over 1500m.
        [['MEMORY_REQUEST=25000Mi'], "MEMORY_REQUEST='25000Mi' is over MEMORY_LIMIT='24Gi'"],
        [['CPU_REQUEST=1.6', 'CPU_LIMIT=1500m'], "CPU_REQUEST='1.6' is over CPU_LIMIT='1500m'"],
        // E is exa, not an exponent: 1E (10^18 bytes) is over 2Gi.
        [['MEMORY_REQUEST=1E'], "MEMORY_REQUEST='1E' is over MEMORY_LIMIT='24Gi'"],
      ];
      for (const [vars, message] of refused) {
        const r = renderWith(...vars);
        expect(r.status, vars.join(' ')).toBe(2);
        expect(r.stderr, vars.join(' ')).toContain(message);
      }
      // All problems at once, one line each.
      const many = renderWith('EXECUTION_PROVIDER=gpu', 'CACHE_SIZE=50GB', 'MEMORY_REQUEST=30Gi');
      expect(many.stderr.split('\n').filter((l) => /^(EXECUTION_PROVIDER|CACHE_SIZE|MEMORY_REQUEST)=/.test(l))).toHaveLength(3);
      expect(readdirSync(out)).toEqual([]);
      if (has('envsubst')) {
        // What the runtime and Kubernetes accept renders without a word: the runtime's any-case provider, decimal and
        // binary units, millicores, exponents, a request equal to its limit in other units.
        const ok = renderWith('EXECUTION_PROVIDER=CUDA', 'CACHE_SIZE=1.5Ti', 'CPU_REQUEST=1500m', 'CPU_LIMIT=1.5', 'MEMORY_REQUEST=24576Mi', 'MEMORY_LIMIT=24Gi');
        expect([ok.status, ok.stderr]).toEqual([0, '']);
        expect(readFileSync(path.join(out, 'pvc.yaml'), 'utf8')).toContain('storage: "1.5Ti"');
        expect([renderWith('MEMORY_LIMIT=2.4e10').status, renderWith('CACHE_SIZE=50G').status]).toEqual([0, 0]);
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it.skipIf(!has('envsubst') || !has('make'))('`make render`: a password with $ \' " \\ reaches the Secret exactly as given (command line and environment)', () => {
    const out = mkdtempSync(path.join(os.tmpdir(), 'deploy-render-'));
    const secret = `a$b$(shell id)'c"d\\te#f g`;
    const key = 'AK$x"\'';
    try {
      for (const how of ['argv', 'env'] as const) {
        const vars = { S3_SECRET_ACCESS_KEY: secret, S3_ACCESS_KEY_ID: key };
        const r = spawnSync('make', ['-s', 'render', `RENDER_DIR=${out}`, ...(how === 'argv' ? Object.entries(vars).map(([k, v]) => `${k}=${v}`) : [])],
          { cwd: ROOT, encoding: 'utf8', env: { ...process.env, ...(how === 'env' ? vars : {}) } });
        expect(r.status, r.stderr).toBe(0);
        const doc = YAML.parse(readFileSync(path.join(out, 's3-secret.yaml'), 'utf8')) as Obj;
        expect(doc.stringData, how).toMatchObject({ AWS_SECRET_ACCESS_KEY: secret, AWS_ACCESS_KEY_ID: key });
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

describe('templates: what KServe / Knative / OpenShift require', () => {
  const params = loadParams();
  const runtime = () => renderedDocs('serving-runtime.yaml')[0]!;
  const container = () => runtime().spec.containers[0] as Obj;
  const envOf = (c: Obj): Map<string, Obj> => new Map((c.env ?? []).map((e: Obj) => [e.name as string, e]));
  /** A variable's value in an InferenceService's pod: its own env entry, else the ServingRuntime's (KServe merges by name). */
  const envIn = (isvc: Obj, name: string): number => Number((envOf(isvc.spec.predictor.model).get(name) ?? envOf(container()).get(name))!.value);
  const KNATIVE_ISVCS = ['inference-service.yaml', 'inference-service-multi-model.yaml', 'inference-service-storage-key.yaml'];

  it('ServingRuntime: format onnx-diffusers, protocols v1+v2, kserve-container with image, MODEL_NAME={{.Name}}', () => {
    const sr = runtime();
    expect(sr.apiVersion).toBe('serving.kserve.io/v1alpha1');
    expect(sr.kind).toBe('ServingRuntime');
    expect(sr.metadata.name).toBe(params.get('RUNTIME_NAME'));
    expect(sr.spec.supportedModelFormats.map((f: Obj) => f.name)).toContain('onnx-diffusers');
    expect(sr.spec.protocolVersions).toEqual(expect.arrayContaining(['v1', 'v2']));
    expect(sr.spec.containers).toHaveLength(1);
    const c = container();
    expect(c.name).toBe('kserve-container');
    expect(c.image).toBe(`${params.get('IMAGE')}:${params.get('TAG')}`);
    expect(envOf(c).get('MODEL_NAME')?.value).toBe('{{.Name}}');
    expect(envOf(c).get('MODEL_CACHE_DIR')?.value).toBe('/mnt/cache');
  });

  it('ServingRuntime env: the whole contract, except what the Secret provides and Knative reserves', () => {
    const text = readFileSync(path.join(TEMPLATES, 'serving-runtime.yaml'), 'utf8');
    const env = envOf(container());
    for (const name of CONTRACT) {
      if (FROM_SECRET.includes(name)) {
        expect(env.has(name), `${name} in env would override the data-connection Secret`).toBe(false);
        expect(text, `${name} should be documented in a comment`).toContain(name);
      } else if (name === 'PORT') {
        expect(env.has('PORT'), 'Knative rejects a user-set PORT').toBe(false);
      } else if (name === 'WORKERS') {
        // Unset, it is one worker per GPU the pod gets; a fixed value would leave the other GPUs of a multi-GPU pod idle.
        expect(env.has('WORKERS'), 'WORKERS in env would pin the worker count whatever nvidia.com/gpu says').toBe(false);
        expect(text, 'WORKERS should be documented in a comment').toContain('WORKERS');
      } else {
        expect(env.has(name), `${name} missing from the ServingRuntime env`).toBe(true);
      }
    }
    for (const e of env.values()) expect(typeof e.value === 'string' || e.valueFrom !== undefined, `${e.name}: env values must be strings`).toBe(true);
  });

  it('every variable a template sets (env of every container, keys of the Secret given with envFrom) is one the runtime reads', () => {
    // A misspelt name (ORT_OPTIMISED_CACHE, a Job's S3_STALL_TIMEOUT) is not refused by Kubernetes nor by the runtime,
    // which only warns at start: the setting silently does nothing.
    const set: string[] = [];
    for (const { file, doc } of allDocs()) {
      for (const c of containersOf(doc)) for (const e of (c.env ?? []) as Obj[]) set.push(`${file} ${e.name}`);
      if (doc.kind === 'Secret') for (const k of Object.keys({ ...doc.data, ...doc.stringData })) set.push(`${file} ${k}`);
    }
    expect(set).toEqual(expect.arrayContaining(['serving-runtime.yaml MODEL_NAME', 'warmup-job.yaml STORAGE_URI', 'inference-service.yaml STORAGE_URI', 's3-secret.yaml AWS_ACCESS_KEY_ID']));
    // AWS_S3_BUCKET is the OpenShift AI data connection's own key; the runtime takes the bucket from STORAGE_URI.
    const unknown = set.filter((s) => !VARIABLES.includes(s.split(' ')[1]!) && s !== 's3-secret.yaml AWS_S3_BUCKET');
    expect(unknown.map((s) => `${s}${misspelledVariables({ [s.split(' ')[1]!]: 'x' }).map((m) => ` (${m.meant}?)`).join('')}`)).toEqual([]);
  });

  it('ServingRuntime env, as the runtime parses it: a pod given N GPUs runs N pipeline workers (docs/OPERATIONS.md)', () => {
    // What the kserve-container sees: the runtime's env with {{.Name}} rendered by KServe, plus the device plugin's
    // NVIDIA_VISIBLE_DEVICES for `nvidia.com/gpu: 2` on the InferenceService.
    const env: Record<string, string> = {};
    for (const e of container().env as Obj[]) env[e.name] = String(e.value).replace('{{.Name}}', params.get('MODEL_NAME')!);
    const cfg = loadConfig({ ...env, NVIDIA_VISIBLE_DEVICES: 'GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001,GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000002' });
    expect([cfg.gpus, cfg.workers]).toEqual([2, 2]);
    expect(loadConfig({ ...env, NVIDIA_VISIBLE_DEVICES: 'GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001' }).workers).toBe(1);
  });

  it("the README's Knative patch enables every Knative feature the Serverless pod specs use (upstream defaults: off)", () => {
    // knative/serving pkg/apis/config/features.go: tolerations, PVCs and PVC writes are Disabled by default, and its
    // webhook refuses a Service whose pod spec uses one (`must not set the field(s)`). KServe puts the ServingRuntime's
    // tolerations and volumes and the InferenceService's volumes into the Knative Service's pod spec.
    const readme = read('README.md');
    const patch = /oc patch knativeserving[^`]*'(\{[^']*\})'/.exec(readme);
    expect(patch, 'README: the oc patch knativeserving command').not.toBeNull();
    const features = JSON.parse(patch![1]!).spec.config.features as Record<string, string>;
    const pods: Obj[] = [runtime().spec, ...renderedDocs('inference-service.yaml').map((d) => d.spec.predictor)];
    const needed = new Set<string>();
    for (const p of pods) {
      if ((p.tolerations ?? []).length > 0) needed.add('kubernetes.podspec-tolerations');
      if ((p.affinity ?? undefined) !== undefined) needed.add('kubernetes.podspec-affinity');
      if ((p.nodeSelector ?? undefined) !== undefined) needed.add('kubernetes.podspec-nodeselector');
      for (const v of (p.volumes ?? []) as Obj[]) {
        if (v.persistentVolumeClaim) {
          needed.add('kubernetes.podspec-persistent-volume-claim');
          if (!v.persistentVolumeClaim.readOnly) needed.add('kubernetes.podspec-persistent-volume-write');
        }
      }
    }
    expect(needed.size).toBeGreaterThanOrEqual(3);
    for (const f of needed) expect(features[f], `README's patch should enable ${f}`).toBe('enabled');
  });

  it('ServingRuntime container: one port 8080, GPU, cache PVC + /tmp mounts, read-only root filesystem', () => {
    const sr = runtime();
    const c = container();
    expect(c.ports).toHaveLength(1);
    expect(c.ports[0].containerPort).toBe(8080);
    expect(String(c.resources.limits['nvidia.com/gpu'])).toBe('1');
    expect(String(c.resources.requests['nvidia.com/gpu'])).toBe('1');
    const vols = new Map((sr.spec.volumes as Obj[]).map((v) => [v.name as string, v]));
    const mounts = new Map((c.volumeMounts as Obj[]).map((m) => [m.mountPath as string, m]));
    expect(vols.get(mounts.get('/mnt/cache')!.name)!.persistentVolumeClaim.claimName).toBe(params.get('PVC_NAME'));
    expect(vols.get(mounts.get('/tmp')!.name)!.emptyDir).toBeDefined();
    expect(c.securityContext.readOnlyRootFilesystem).toBe(true);
    expect(c.securityContext.allowPrivilegeEscalation).toBe(false);
  });

  it('ServingRuntime probes: HTTP liveness on /v2/health/live, HTTP readiness on /v2/health/ready, Knative-valid', () => {
    const c = container();
    expect(c.livenessProbe.httpGet.path).toBe('/v2/health/live');
    expect(c.readinessProbe.httpGet.path).toBe('/v2/health/ready');
    for (const p of [c.livenessProbe, c.readinessProbe]) {
      expect(p.tcpSocket).toBeUndefined();
      expect(p.httpGet.port).toBe(c.ports[0].containerPort);
    }
    // Knative: periodSeconds unset = aggressive 50 ms probing, and then timeoutSeconds/failureThreshold are disallowed.
    if (!c.readinessProbe.periodSeconds) {
      expect(c.readinessProbe.timeoutSeconds).toBeUndefined();
      expect(c.readinessProbe.failureThreshold).toBeUndefined();
    }
  });

  it('every probe the kubelet runs (periodSeconds set) has an explicit timeoutSeconds of at least 5 s', () => {
    const timed = allProbes().filter(({ probe }) => probe.periodSeconds !== undefined);
    expect(timed.map(({ file, kind }) => `${file} ${kind}`)).toEqual(expect.arrayContaining(['inference-service-raw.yaml readinessProbe', 'serving-runtime.yaml livenessProbe']));
    for (const { file, kind, probe } of timed) expect(probe.timeoutSeconds, `${file} ${kind}`).toBeGreaterThanOrEqual(5);
  });

  it('every probe in every template is an HTTP probe on a route the server serves, liveness never on /v1/models/{name}', () => {
    const probes = allProbes();
    expect(probes.length).toBeGreaterThanOrEqual(2);
    for (const { file, kind, probe } of probes) {
      expect(probe.httpGet, `${file} ${kind}: HTTP probe`).toBeDefined();
      expect(probe.httpGet.port, `${file} ${kind}: port`).toBe(8080);
      const routes = kind === 'readinessProbe' ? READINESS_ROUTES : LIVENESS_ROUTES;
      expect(routes, `${file} ${kind} ${probe.httpGet.path}`).toContain(probe.httpGet.path);
    }
  });

  it.each(ISVC_FILES)('%s: InferenceService on our runtime and format, S3 via env + Secret, never storageUri', (file) => {
    const docs = renderedDocs(file);
    const secretName = renderedDocs('s3-secret.yaml')[0]!.metadata.name;
    for (const d of docs) {
      expect(d.apiVersion).toBe('serving.kserve.io/v1beta1');
      expect(d.kind).toBe('InferenceService');
      const model = d.spec.predictor.model as Obj;
      expect(model.modelFormat.name).toBe('onnx-diffusers');
      expect(model.runtime).toBe(params.get('RUNTIME_NAME'));
      expect(findKey(d, 'storageUri'), `${file} ${d.metadata.name}: storageUri starts KServe's storage-initializer`).toEqual([]);
      expect(['Serverless', 'Knative', 'RawDeployment', 'Standard']).toContain(d.metadata.annotations['serving.kserve.io/deploymentMode']);
      const env = envOf(model);
      if (model.storage) {
        // The seed's option 3 form: KServe storage-config key (documented slow path).
        expect(file).toBe('inference-service-storage-key.yaml');
        expect(model.storage.key).toBeTruthy();
        continue;
      }
      expect(env.get('STORAGE_URI')?.value).toMatch(/^s3:\/\/[^/]+\/.+/);
      for (const n of FROM_SECRET) expect(env.has(n), `${n} would override the Secret`).toBe(false);
      expect(model.envFrom.map((e: Obj) => e.secretRef?.name)).toContain(secretName);
      const mounts = new Map((model.volumeMounts as Obj[]).map((m) => [m.mountPath as string, m.name as string]));
      const vols = new Map((d.spec.predictor.volumes as Obj[]).map((v) => [v.name as string, v]));
      expect(vols.get(mounts.get('/mnt/cache')!)!.persistentVolumeClaim.claimName).toBe(params.get('PVC_NAME'));
      expect(vols.get(mounts.get('/tmp')!)!.emptyDir).toBeDefined();
    }
  });

  it('Serverless: minReplicas 0 explicit, max 5, concurrency 1, retention, long progress deadline, timeout', () => {
    const serverless = KNATIVE_ISVCS.flatMap((f) => renderedDocs(f));
    for (const d of serverless) {
      const p = d.spec.predictor;
      expect(['Serverless', 'Knative']).toContain(d.metadata.annotations['serving.kserve.io/deploymentMode']);
      expect(Object.hasOwn(p, 'minReplicas') && p.minReplicas === 0, `${d.metadata.name}: minReplicas must be an explicit 0`).toBe(true);
      expect(p.maxReplicas).toBe(5);
      expect(p.containerConcurrency === 1 || (p.scaleTarget === 1 && p.scaleMetric === 'concurrency')).toBe(true);
      expect(p.timeout).toBeGreaterThanOrEqual(300);
      expect(p.timeout).toBeLessThanOrEqual(600); // Knative's default max-revision-timeout-seconds
      const deadline = d.metadata.annotations['serving.knative.dev/progress-deadline'];
      expect(Number(/^(\d+)s$/.exec(deadline)?.[1])).toBeGreaterThanOrEqual(1800);
    }
    const main = renderedDocs('inference-service.yaml')[0]!;
    expect(main.metadata.annotations['autoscaling.knative.dev/scale-to-zero-pod-retention-period']).toMatch(/^\d+[smh]$/);
    expect(main.metadata.name).toBe(params.get('MODEL_NAME'));
  });

  it('RawDeployment: min 1 / max 10, HPA autoscaler class with metric and target', () => {
    const d = renderedDocs('inference-service-raw.yaml')[0]!;
    expect(['RawDeployment', 'Standard']).toContain(d.metadata.annotations['serving.kserve.io/deploymentMode']);
    expect(d.spec.predictor.minReplicas).toBe(1);
    expect(d.spec.predictor.maxReplicas).toBe(10);
    expect(d.metadata.annotations['serving.kserve.io/autoscalerClass']).toBe('hpa');
    expect(['cpu', 'memory']).toContain(d.metadata.annotations['serving.kserve.io/metrics']);
    expect(Number(d.metadata.annotations['serving.kserve.io/targetUtilizationPercentage'])).toBeGreaterThan(0);
  });

  it('RawDeployment: a preStop pause before SIGTERM, within the grace period with SHUTDOWN_GRACE_S; none where Knative runs the pod', () => {
    // Without Knative, SIGTERM and the endpoints' removal start together, and the server refuses new work at SIGTERM.
    const raw = renderedDocs('inference-service-raw.yaml')[0]!;
    const cmd = raw.spec.predictor.model.lifecycle?.preStop?.exec?.command as string[] | undefined;
    expect(cmd?.[0], 'inference-service-raw.yaml: preStop exec sleep').toBe('sleep');
    const pause = Number(cmd![1]);
    expect(pause).toBeGreaterThanOrEqual(3);
    expect(pause + envIn(raw, 'SHUTDOWN_GRACE_S')).toBeLessThan(raw.spec.predictor.terminationGracePeriodSeconds);
    // A cache volume that stopped answering: the server's cleanup after the drain takes up to CLEANUP_MS, then exits 143
    // with a line; the kubelet's SIGKILL must not come first.
    expect(pause + envIn(raw, 'SHUTDOWN_GRACE_S') + CLEANUP_MS / 1000, 'preStop + SHUTDOWN_GRACE_S + cleanup').toBeLessThan(raw.spec.predictor.terminationGracePeriodSeconds);
    // Knative refuses a container's lifecycle (pkg/apis/serving/fieldmask.go ContainerMask); its queue-proxy has its own.
    expect(container().lifecycle).toBeUndefined();
    for (const f of KNATIVE_ISVCS) {
      for (const d of renderedDocs(f)) expect(findKey(d, 'lifecycle'), `${f} ${d.metadata.name}`).toEqual([]);
    }
  });

  it("REQUEST_TIMEOUT_S stops a generation before Knative's timeout or the Route's cuts it; SHUTDOWN_GRACE_S lets it finish after the queue-proxy's drain", () => {
    // Knative's activator and queue-proxy time a request from its arrival, a cold start and the wait for a free pod
    // included, and answer a plain-text 504 "request timeout"; the runtime starts REQUEST_TIMEOUT_S later, at the
    // generation, so it must be the shorter one for its JSON 504 TIMEOUT to be the answer. The Route's router likewise.
    // At scale-down the user container's preStop (/wait-for-drain) returns after the queue-proxy's 30 s without a new
    // request (knative.dev/serving pkg/queue/sharedmain drainSleepDuration), a generation possibly still running; the
    // kill follows at the grace period, which Knative sets to the revision's timeout (pkg/reconciler/revision/resources).
    const KNATIVE_DRAIN_S = 30;
    for (const f of KNATIVE_ISVCS) {
      for (const d of renderedDocs(f)) {
        const { timeout } = d.spec.predictor;
        const [request, grace] = [envIn(d, 'REQUEST_TIMEOUT_S'), envIn(d, 'SHUTDOWN_GRACE_S')];
        expect(request, `${f} ${d.metadata.name}: REQUEST_TIMEOUT_S vs timeout`).toBeLessThanOrEqual(timeout - 10);
        expect(KNATIVE_DRAIN_S + grace, `${f} ${d.metadata.name}: a generation in flight at scale-down runs out its REQUEST_TIMEOUT_S`).toBeGreaterThanOrEqual(request);
        expect(KNATIVE_DRAIN_S + grace, `${f} ${d.metadata.name}: the drain ends before the kill`).toBeLessThanOrEqual(timeout - 10);
        expect(KNATIVE_DRAIN_S + grace + CLEANUP_MS / 1000, `${f} ${d.metadata.name}: a cleanup a stuck cache volume holds ends before the kill`).toBeLessThan(timeout);
      }
    }
    const routeTimeout = renderedDocs('route.yaml')[0]!.metadata.annotations['haproxy.router.openshift.io/timeout'] as string;
    const raw = renderedDocs('inference-service-raw.yaml')[0]!;
    expect(envIn(raw, 'REQUEST_TIMEOUT_S'), 'REQUEST_TIMEOUT_S vs the Route timeout').toBeLessThanOrEqual(Number(/^(\d+)s$/.exec(routeTimeout)![1]) - 10);
  });

  it("Knative's containerConcurrency lets every GPU work and every batch fill, and never overfills MAX_QUEUE", () => {
    // The queue-proxy and the activator send a pod at most containerConcurrency requests: fewer than GPUs x
    // MAX_BATCH_SIZE leaves workers idle and batches short; more than that plus MAX_QUEUE gets clients 503 BUSY,
    // which neither retries.
    for (const f of KNATIVE_ISVCS) {
      for (const d of renderedDocs(f)) {
        const p = d.spec.predictor;
        const gpus = Number((p.model.resources ?? container().resources).limits['nvidia.com/gpu']);
        const slots = gpus * envIn(d, 'MAX_BATCH_SIZE');
        expect(p.containerConcurrency, `${f} ${d.metadata.name}: containerConcurrency vs GPUs x MAX_BATCH_SIZE`).toBeGreaterThanOrEqual(slots);
        expect(p.containerConcurrency, `${f} ${d.metadata.name}: containerConcurrency vs MAX_QUEUE`).toBeLessThanOrEqual(slots + envIn(d, 'MAX_QUEUE'));
        if (p.scaleMetric === 'concurrency') expect(p.scaleTarget, `${f} ${d.metadata.name}: scaleTarget`).toBeLessThanOrEqual(p.containerConcurrency);
      }
    }
  });

  it('multi-model: several InferenceServices share the runtime, the PVC and the Secret, one URI each', () => {
    const docs = renderedDocs('inference-service-multi-model.yaml');
    expect(docs.length).toBeGreaterThanOrEqual(2);
    const uris = docs.map((d) => envOf(d.spec.predictor.model).get('STORAGE_URI')!.value as string);
    expect(new Set(uris).size).toBe(uris.length);
    expect(new Set(docs.map((d) => d.metadata.name)).size).toBe(docs.length);
  });

  it('PVC is ReadWriteMany with a size; the warm-up Job runs the same image on the same cache and URI', () => {
    const pvc = renderedDocs('pvc.yaml')[0]!;
    expect(pvc.kind).toBe('PersistentVolumeClaim');
    expect(pvc.spec.accessModes).toContain('ReadWriteMany');
    expect(pvc.spec.resources.requests.storage).toMatch(/^\d+(Gi|Ti|G|T|Mi)$/);

    const job = renderedDocs('warmup-job.yaml')[0]!;
    expect(job.apiVersion).toBe('batch/v1');
    expect(job.kind).toBe('Job');
    expect(job.spec.backoffLimit).toBeGreaterThanOrEqual(1);
    expect(job.spec.ttlSecondsAfterFinished).toBeGreaterThan(0);
    const spec = job.spec.template.spec;
    expect(['Never', 'OnFailure']).toContain(spec.restartPolicy);
    const c = spec.containers[0];
    expect(c.image).toBe(container().image);
    expect(c.command).toEqual(['node', 'dist/warmup/main.js']);
    expect(c.envFrom.map((e: Obj) => e.secretRef?.name)).toContain(renderedDocs('s3-secret.yaml')[0]!.metadata.name);
    const isvc = renderedDocs('inference-service.yaml')[0]!;
    expect(envOf(c).get('STORAGE_URI')?.value).toBe(envOf(isvc.spec.predictor.model).get('STORAGE_URI')?.value);
    const mount = (c.volumeMounts as Obj[]).find((m) => m.mountPath === '/mnt/cache')!;
    expect((spec.volumes as Obj[]).find((v) => v.name === mount.name)!.persistentVolumeClaim.claimName).toBe(pvc.metadata.name);
    expect(c.securityContext.readOnlyRootFilesystem).toBe(true);
    expect((c.volumeMounts as Obj[]).some((m) => m.mountPath === '/tmp')).toBe(true);
  });

  it("warm-up Job: the CLI's configuration error fails the Job at once, an evicted pod is not a failure", () => {
    // The real CLI, as the Job's container runs it, with STORAGE_URI unset: the status it exits with is what
    // podFailurePolicy must match, else backoffLimit retries a Job that cannot succeed.
    const cli = spawnSync(process.execPath, ['dist/warmup/main.js'], { cwd: ROOT, encoding: 'utf8', env: { PATH: process.env.PATH, MODEL_CACHE_DIR: os.tmpdir() } });
    expect(cli.stderr).toMatch(/^warmup: CONFIG: STORAGE_URI is required/);
    const job = renderedDocs('warmup-job.yaml')[0]!;
    const c = job.spec.template.spec.containers[0] as Obj;
    const rules = (job.spec.podFailurePolicy?.rules ?? []) as Obj[];
    const failJob = rules.find((r) => r.action === 'FailJob' && r.onExitCodes?.operator === 'In');
    expect(failJob?.onExitCodes.values, 'a FailJob rule on the CLI configuration-error status').toContain(cli.status);
    expect(failJob?.onExitCodes.containerName ?? c.name).toBe(c.name);
    // Kubernetes accepts a podFailurePolicy only with restartPolicy Never.
    expect(job.spec.template.spec.restartPolicy).toBe('Never');
    expect(rules.some((r) => r.action === 'Ignore' && (r.onPodConditions as Obj[] | undefined)?.some((p) => p.type === 'DisruptionTarget'))).toBe(true);
  });

  it('Route: TLS edge to the predictor Service; Secret: OpenShift AI S3 data connection', () => {
    const route = renderedDocs('route.yaml')[0]!;
    expect(route.apiVersion).toBe('route.openshift.io/v1');
    expect(route.kind).toBe('Route');
    expect(route.spec.tls.termination).toBe('edge');
    expect(route.spec.to).toMatchObject({ kind: 'Service', name: `${params.get('MODEL_NAME')}-predictor` });

    const secret = renderedDocs('s3-secret.yaml')[0]!;
    expect(secret.kind).toBe('Secret');
    expect(Object.keys(secret.stringData).sort()).toEqual(['AWS_ACCESS_KEY_ID', 'AWS_DEFAULT_REGION', 'AWS_S3_BUCKET', 'AWS_S3_ENDPOINT', 'AWS_SECRET_ACCESS_KEY']);
    expect(secret.metadata.annotations['opendatahub.io/connection-type']).toBe('s3');
    expect(secret.metadata.labels['opendatahub.io/dashboard']).toBe('true');
  });

  it("every pod meets the restricted Pod Security Standard and leaves the uid to the cluster (OpenShift's restricted-v2)", () => {
    // Each pod spec the templates give (an InferenceService's predictor takes its container from the ServingRuntime:
    // KServe merges the model's fields over it), with its containers.
    const pods = allDocs().flatMap(({ file, doc }) => {
      if (doc.kind === 'ServingRuntime') return [{ at: `${file} ServingRuntime`, pod: doc.spec as Obj, containers: doc.spec.containers as Obj[] }];
      if (doc.kind === 'Job') return [{ at: `${file} Job`, pod: doc.spec.template.spec as Obj, containers: doc.spec.template.spec.containers as Obj[] }];
      if (doc.kind === 'InferenceService') return [{ at: `${file} ${doc.metadata.name}`, pod: doc.spec.predictor as Obj, containers: [] as Obj[] }];
      return [];
    });
    expect(pods.map((p) => p.at.split(' ')[1])).toEqual(expect.arrayContaining(['ServingRuntime', 'Job']));
    const allowedVolumes = ['configMap', 'csi', 'downwardAPI', 'emptyDir', 'ephemeral', 'persistentVolumeClaim', 'projected', 'secret'];
    const bad: string[] = [];
    for (const { at, pod, containers } of pods) {
      for (const k of ['hostNetwork', 'hostPID', 'hostIPC']) if (pod[k] === true) bad.push(`${at}: ${k}`);
      for (const v of (pod.volumes ?? []) as Obj[]) {
        const type = Object.keys(v).find((k) => k !== 'name');
        if (!allowedVolumes.includes(type!)) bad.push(`${at}: volume ${v.name} is ${type}`);
      }
      // The InferenceService's model may not weaken what the runtime's container sets.
      if (pod.model?.securityContext !== undefined) bad.push(`${at}: model.securityContext overrides the ServingRuntime's`);
      for (const c of containers) {
        const sc: Obj = { ...(pod.securityContext ?? {}), ...(c.securityContext ?? {}) };
        const where = `${at} container ${c.name}`;
        if (sc.privileged === true) bad.push(`${where}: privileged`);
        if (sc.allowPrivilegeEscalation !== false) bad.push(`${where}: allowPrivilegeEscalation not false`);
        if (!(sc.capabilities?.drop ?? []).includes('ALL')) bad.push(`${where}: capabilities.drop lacks ALL`);
        if ((sc.capabilities?.add ?? []).some((a: string) => a !== 'NET_BIND_SERVICE')) bad.push(`${where}: adds capabilities`);
        if (sc.runAsNonRoot !== true) bad.push(`${where}: runAsNonRoot not true`);
        if (!['RuntimeDefault', 'Localhost'].includes(sc.seccompProfile?.type)) bad.push(`${where}: seccompProfile not RuntimeDefault`);
        // restricted-v2 assigns a uid from the namespace's range and refuses one outside it.
        for (const k of ['runAsUser', 'runAsGroup']) if (sc[k] !== undefined) bad.push(`${where}: sets ${k}`);
        if (sc.readOnlyRootFilesystem !== true) bad.push(`${where}: root filesystem writable`);
      }
    }
    expect(bad).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
describe('Makefile', () => {
  const REQUIRED = ['help', 'build', 'push', 'deploy', 'undeploy', 'warmup', 'test-v1', 'run-local', 'test', 'bench', 'render'];
  const targets = (): string[] => [...read('Makefile').matchAll(/^([a-zA-Z0-9_-]+):.*## /gm)].map((m) => m[1]!);
  const make = (...args: string[]) => spawnSync('make', args, { cwd: ROOT, encoding: 'utf8' });

  it('has every required target, each with a ## description', () => {
    expect(targets()).toEqual(expect.arrayContaining(REQUIRED));
  });

  it.skipIf(!has('make'))('help is the default goal and lists every target', () => {
    const r = make('-s');
    expect(r.status, r.stderr).toBe(0);
    for (const t of targets()) expect(r.stdout).toMatch(new RegExp(`^\\s+${t}\\s+\\S`, 'm'));
  });

  it.skipIf(!has('make'))('`make -n <target>` succeeds for every target', () => {
    for (const t of targets()) {
      const r = make('-n', t, 'URL=http://127.0.0.1:1', 'HF_MODEL=org/model', 'OUT=/tmp/x');
      expect(r.status, `make -n ${t}: ${r.stderr}`).toBe(0);
    }
  });

  it.skipIf(!has('make'))('build/push/deploy/bench commands: engine override, IMAGE:TAG from params.env, the bench scripts', () => {
    const p = loadParams();
    expect(make('-n', 'build', 'CONTAINER_ENGINE=podman').stdout).toMatch(new RegExp(`^podman build .*-f docker/Dockerfile -t ${p.get('IMAGE')}:${p.get('TAG')} .* \\.$`, 'm'));
    expect(make('-n', 'push', 'TAG=9.9.9').stdout).toContain(`push ${p.get('IMAGE')}:9.9.9`);
    expect(make('-n', 'deploy', 'DEPLOY_MODE=raw').stdout).toContain('inference-service-raw.yaml');
    expect(make('-n', 'bench').stdout).toContain('npm run bench:s3 && npm run bench:cold-start && npm run bench:serve');
    expect(make('-n', 'test-v1', 'URL=http://h:1').stdout).toContain('scripts/test-v1.sh');
  });

  it.skipIf(!has('make'))('deploy, every DEPLOY_MODE: only InferenceServices the runtime fetches for itself, none that starts the storage-initializer', () => {
    // A `storage:` or `storageUri` model gets KServe's storage-initializer: without a matching storage-config key the pod
    // is refused, with one it downloads the whole model on every cold start. Such a form is applied by hand, if at all.
    for (const mode of ['serverless', 'raw', 'multi']) {
      const r = make('-n', 'deploy', `DEPLOY_MODE=${mode}`);
      expect(r.status, r.stderr).toBe(0);
      const files = [...r.stdout.matchAll(/ apply -n \S+ -f dist\/manifests\/(\S+\.yaml)/g)].map((m) => m[1]!);
      const isvcs = files.flatMap((f) => renderedDocs(f)).filter((d) => d.kind === 'InferenceService');
      expect(isvcs.length, mode).toBeGreaterThan(0);
      for (const d of isvcs) {
        const model = d.spec.predictor.model as Obj;
        expect([model.storage, model.storageUri], `DEPLOY_MODE=${mode}: ${d.metadata.name}`).toEqual([undefined, undefined]);
        expect(((model.env ?? []) as Obj[]).find((e) => e.name === 'STORAGE_URI')?.value, `DEPLOY_MODE=${mode}: ${d.metadata.name}`).toMatch(/^s3:\/\//);
      }
    }
  });

  // A stand-in for oc/kubectl that keeps the Job's state in a file: `wait --for=condition=X` returns once the state is X,
  // or fails at its --timeout, as kubectl does.
  it.skipIf(!has('make') || !has('envsubst'))('warmup: returns as soon as the Job completes or fails, with its log; a failed Job does not wait out WARMUP_TIMEOUT', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'make-warmup-'));
    try {
      const stub = path.join(dir, 'kubectl');
      writeFileSync(stub, `#!/bin/sh
case "$1" in
  wait)
    for a; do case "$a" in --for=condition=*) want=\${a#--for=condition=};; --timeout=*) t=\${a#--timeout=}; t=\${t%s};; esac; done
    end=$(( $(date +%s) + t ))
    while [ "$(date +%s)" -lt "$end" ]; do [ "$(cat "$STUB_STATE")" = "$want" ] && { echo "job.batch/x condition met"; exit 0; }; sleep 0.1; done
    echo "error: timed out waiting for the condition on jobs/x" >&2; exit 1;;
  logs) echo "warmup: log of a $(cat "$STUB_STATE") Job";;
esac
`);
      chmodSync(stub, 0o755);
      const state = path.join(dir, 'state');
      const run = (initial: string, later?: string) => {
        writeFileSync(state, initial);
        if (later !== undefined) setTimeout(() => writeFileSync(state, later), 1_500);
        const t0 = Date.now();
        return promisify(execFile)('make', ['-s', 'warmup', `KUBECTL=${stub}`, 'WARMUP_TIMEOUT=60s', `RENDER_DIR=${path.join(dir, 'out')}`],
          { cwd: ROOT, env: { ...process.env, STUB_STATE: state } }).then((r) => ({ code: 0, ...r }), (e: { code: number; stdout: string; stderr: string }) => e)
          .then((r) => ({ code: r.code, stdout: r.stdout, stderr: r.stderr, seconds: (Date.now() - t0) / 1000 }));
      };
      const failed = await run('running', 'failed');
      expect([failed.code, failed.stdout.trim().split('\n').at(-1)]).toEqual([2, 'warmup: log of a failed Job']);
      expect(failed.stderr).toMatch(/^job\/stable-diffusion-cache-warmup failed \(a configuration error at once, else after backoffLimit retries\):\nmake: \*\*\* \[Makefile:\d+: warmup\] Error 1\n$/);
      expect(failed.seconds).toBeLessThan(20);
      const done = await run('running', 'complete');
      expect([done.code, done.stdout.trim().split('\n').slice(-2), done.stderr]).toEqual([0, ['job.batch/x condition met', 'warmup: log of a complete Job'], '']);
      expect(done.seconds).toBeLessThan(20);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);
});

// ---------------------------------------------------------------------------------------------
interface Instr {
  cmd: string;
  args: string;
  flags: Record<string, string>;
}
interface Stage {
  from: string;
  name: string | undefined;
  instrs: Instr[];
}

/** A small Dockerfile parser: continuations, comments, ARG defaults before FROM, stages, flags. */
function parseDockerfile(text: string): { args: Map<string, string>; stages: Stage[] } {
  const lines = text.replace(/\\\r?\n/g, ' ').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  const args = new Map<string, string>();
  const stages: Stage[] = [];
  for (const line of lines) {
    const m = /^(\w+)\s+([\s\S]*)$/.exec(line);
    if (!m) continue;
    const cmd = m[1]!.toUpperCase();
    let rest = m[2]!;
    const flags: Record<string, string> = {};
    while (/^--[\w-]+(=\S+)?\s/.test(rest)) {
      const f = /^--([\w-]+)(?:=(\S+))?\s+/.exec(rest)!;
      flags[f[1]!] = f[2] ?? 'true';
      rest = rest.slice(f[0].length);
    }
    if (cmd === 'ARG' && stages.length === 0) {
      const [k, v] = rest.split('=');
      args.set(k!.trim(), (v ?? '').trim());
      continue;
    }
    if (cmd === 'FROM') {
      const fm = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(rest.trim())!;
      const from = fm[1]!.replace(/\$\{?(\w+)\}?/g, (_, n: string) => args.get(n) ?? '');
      stages.push({ from, name: fm[2], instrs: [] });
      continue;
    }
    stages.at(-1)?.instrs.push({ cmd, args: rest, flags });
  }
  return { args, stages };
}

function copySources(i: Instr): { sources: string[]; dest: string } {
  const parts: string[] = i.args.trim().startsWith('[') ? (JSON.parse(i.args) as string[]) : i.args.trim().split(/\s+/);
  return { sources: parts.slice(0, -1), dest: parts.at(-1)! };
}

/** .dockerignore as a list of patterns; enough of its matching for the paths checked here. */
function dockerignored(rel: string): boolean {
  const pats = read('.dockerignore').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  let ignored = false;
  for (const raw of pats) {
    const neg = raw.startsWith('!');
    const pat = (neg ? raw.slice(1) : raw).replace(/^\/+|\/+$/g, '');
    const re = new RegExp(`^${pat.replace(/[.+^$()|[\]{}]/g, '\\$&').replace(/\*\*/g, '\u0000').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]').replace(/\u0000/g, '.*')}(/.*)?$`);
    if (re.test(rel)) ignored = !neg;
  }
  return ignored;
}

describe('docker/Dockerfile', () => {
  const { stages } = parseDockerfile(read('docker/Dockerfile'));
  const build = stages[0]!;
  const final = stages.at(-1)!;
  const runText = (s: Stage) => s.instrs.filter((i) => i.cmd === 'RUN').map((i) => i.args).join('\n');
  const envText = (s: Stage) => s.instrs.filter((i) => i.cmd === 'ENV').map((i) => i.args).join(' ');
  const workdir = (s: Stage) => s.instrs.filter((i) => i.cmd === 'WORKDIR').at(-1)?.args.trim() ?? '/';

  it('is multi-stage: a Node 24 build stage and a CUDA 12 + cuDNN runtime stage on Ubuntu 22.04', () => {
    expect(stages.length).toBeGreaterThanOrEqual(2);
    expect(build.name).toBeTruthy();
    expect(build.from).toMatch(/^node:24(\.|-|$)/);
    expect(final.from).toMatch(/^nvidia\/cuda:12\.\d+(\.\d+)?-cudnn(9)?-runtime-ubuntu22\.04$/);
  });

  it("OPERATIONS states the driver the CUDA base accepts: its NVIDIA_REQUIRE_CUDA floor, not the CUDA major's", () => {
    // nvidia/cuda:X.Y.Z images set NVIDIA_REQUIRE_CUDA="cuda>=X.Y brand=…", which NVIDIA's container toolkit checks
    // before the container starts: a driver that only reaches CUDA X.0 is refused unless its branch is listed.
    const [, cuda] = /^nvidia\/cuda:(\d+\.\d+)/.exec(final.from)!;
    const ops = read('docs/OPERATIONS.md').replace(/\s+/g, ' ');
    for (const text of [`unsatisfied condition: cuda>=${cuda}\``, `NVIDIA_REQUIRE_CUDA="cuda>=${cuda} brand=`, final.from]) {
      expect(ops.includes(text), `docs/OPERATIONS.md should say ${text}`).toBe(true);
    }
    expect(/driver is ≥ 525/.test(ops), 'docs/OPERATIONS.md: a R525 driver does not start this image').toBe(false);
  });

  it('build stage: npm ci with ONNXRUNTIME_NODE_INSTALL=cuda12, tsc build, npm prune --omit=dev', () => {
    expect(`${envText(build)}\n${runText(build)}`).toMatch(/ONNXRUNTIME_NODE_INSTALL=cuda12/);
    expect(runText(build)).toMatch(/npm ci\b/);
    expect(runText(build)).toMatch(/npm run build\b/);
    expect(runText(build)).toMatch(/npm prune --omit=dev\b/);
  });

  it("CUDA providers: onnxruntime-node's install script is run by name, since npm is told not to run it", () => {
    const run = runText(build);
    // npm 11.19 obeys allowScripts' false and npm 12 runs no script it is not told to: `npm rebuild` would skip it.
    expect(run).not.toMatch(/npm rebuild/);
    expect(run).toMatch(/npm ci --ignore-scripts[\s\S]*node node_modules\/onnxruntime-node\/script\/install\.js[\s\S]*libonnxruntime_providers_cuda\.so/);
    const ort = path.join(ROOT, 'node_modules/onnxruntime-node/script');
    expect(existsSync(path.join(ort, 'install.js')), 'onnxruntime-node moved its install script').toBe(true);
    // What the script fetches on linux/x64 with no `skip` (the manifest the image's value names; onnxruntime-node 1.30
    // reads any value but `skip` as the default) brings the file the Dockerfile checks for.
    const meta = createRequire(import.meta.url)(path.join(ort, 'install-metadata.js')) as {
      requirements: Record<string, string[]>; manifests: Record<string, Record<string, unknown>>;
    };
    const flag = /ONNXRUNTIME_NODE_INSTALL=(\S+)/.exec(envText(build))![1]!;
    expect(meta.requirements['linux/x64']).toContain(flag);
    expect(Object.keys(meta.manifests[`linux/x64:${flag}`]!)).toContain('./libonnxruntime_providers_cuda.so');
    // Without a GPU, `npm ci` must not download: denied in package.json, skipped by .npmrc where npm ignores allowScripts.
    const pkg = JSON.parse(read('package.json')) as { allowScripts?: Record<string, boolean> };
    expect(pkg.allowScripts?.['onnxruntime-node']).toBe(false);
    expect(read('.npmrc')).toMatch(/^onnxruntime-node-install=skip$/m);
  });

  it('runtime stage: non-root uid 1001, group-0 writable cache, HOME under /tmp, port 8080, exec-form node entrypoint', () => {
    const user = final.instrs.filter((i) => i.cmd === 'USER').at(-1)?.args.trim();
    expect(user).toMatch(/^1001(:0)?$/);
    expect(runText(final)).toMatch(/chgrp 0 \/mnt\/cache/);
    expect(envText(final)).toMatch(/HOME=\/tmp\b/);
    expect(final.instrs.find((i) => i.cmd === 'EXPOSE')?.args.trim()).toBe('8080');
    const ep = final.instrs.filter((i) => i.cmd === 'ENTRYPOINT').at(-1)!;
    expect(JSON.parse(ep.args)).toEqual(['node', 'dist/src/main.js']);
    expect(final.instrs.some((i) => i.cmd === 'CMD')).toBe(false);
  });

  it('every COPY source exists in the build context (not .dockerignored) or in the build stage output', () => {
    const buildWd = workdir(build);
    const fromBaseImage = new Set(['/usr/local/bin/node']); // the Node binary of the node:24 build image
    for (const s of stages) {
      for (const i of s.instrs.filter((x) => x.cmd === 'COPY' || x.cmd === 'ADD')) {
        expect(i.cmd, 'use COPY, not ADD').toBe('COPY');
        const { sources } = copySources(i);
        for (const src of sources) {
          if (i.flags.from) {
            expect(i.flags.from).toBe(build.name);
            if (fromBaseImage.has(src)) continue;
            expect(src.startsWith(`${buildWd}/`), `${src} is outside the build WORKDIR ${buildWd}`).toBe(true);
            const rel = src.slice(buildWd.length + 1);
            expect(existsSync(path.join(ROOT, rel)), `COPY --from=${i.flags.from} ${src}: ${rel} does not exist here (after npm run build)`).toBe(true);
            // What the build stage has came through `COPY . .` (or npm ci / the build): not ignored.
            if (!['node_modules', 'dist'].includes(rel.split('/')[0]!)) expect(dockerignored(rel), `${rel} is .dockerignored`).toBe(false);
          } else {
            expect(existsSync(path.join(ROOT, src)), `COPY ${src}: missing from the repo`).toBe(true);
            if (src !== '.') expect(dockerignored(src), `COPY ${src}: excluded by .dockerignore`).toBe(false);
          }
        }
      }
    }
  });

  it('the runtime stage gets package.json ("type": "module"), node_modules, dist and the demo tokenizer assets', () => {
    const copied = final.instrs.filter((i) => i.cmd === 'COPY').flatMap((i) => copySources(i).sources);
    const wd = workdir(build);
    for (const need of ['package.json', 'node_modules', 'dist', 'src/demo/assets']) expect(copied).toContain(`${wd}/${need}`);
    expect(JSON.parse(read('package.json')).type).toBe('module');
    expect(existsSync(path.join(ROOT, 'src/demo/assets')), 'src/demo/assets (demo tokenizer) is missing').toBe(true);
  });

  it('entry points exist after `npm run build`: dist/src/main.js (ENTRYPOINT) and dist/warmup/main.js (warm-up Job)', () => {
    for (const f of ['dist/src/main.js', 'dist/warmup/main.js']) {
      expect(existsSync(path.join(ROOT, f)), `${f} is missing: run \`npm run build\` (npm test does); its source may not have landed yet`).toBe(true);
    }
  });

  it('no tini: the server installs its own SIGTERM handler (node is PID 1)', () => {
    expect(read('src/main.ts')).toMatch(/process\.on\(\s*['"]SIGTERM['"]/);
  });

  it('.dockerignore keeps host node_modules, dist, .git and secrets out, and the sources in', () => {
    for (const p of ['node_modules', 'dist', '.git', '.env', 'node_modules/x/y.js']) expect(dockerignored(p), p).toBe(true);
    for (const p of ['package.json', 'package-lock.json', '.npmrc', 'tsconfig.json', 'tsconfig.build.json', 'src/main.ts', 'warmup/main.ts', 'src/demo/assets/vocab.json']) {
      expect(dockerignored(p), p).toBe(false);
    }
  });

  it.skipIf(!has('hadolint'))('hadolint passes', () => {
    const r = spawnSync('hadolint', ['docker/Dockerfile'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------
describe('scripts', () => {
  const SCRIPTS = ['scripts/test-v1.sh', 'scripts/export-onnx.sh', 'scripts/check-params.sh'];

  it.each(SCRIPTS)('%s passes bash -n', (s) => {
    const r = spawnSync('bash', ['-n', path.join(ROOT, s)], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
  });

  it('test-v1.sh --help prints its header comment and nothing of the script', () => {
    const r = spawnSync('bash', [path.join(ROOT, 'scripts/test-v1.sh'), '--help'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Smoke test of a deployed/);
    expect(r.stdout.trimEnd()).toMatch(/Needs curl, and node or base64\+od \(no python\)\.$/);
  });

  it.skipIf(!has('shellcheck')).each(SCRIPTS)('%s passes shellcheck', (s) => {
    const r = spawnSync('shellcheck', [path.join(ROOT, s)], { encoding: 'utf8' });
    expect(r.status, r.stdout).toBe(0);
  });

  it('v1_input.json is exactly the seed runtime example request', () => {
    expect(JSON.parse(read('scripts/v1_input.json'))).toEqual({
      instances: [{ prompt: 'a photo of a dog', negative_prompt: 'blurry, low quality', num_inference_steps: 50, guidance_scale: 7.5, height: 512, width: 512 }],
    });
  });

  describe('test-v1.sh against a stub endpoint', () => {
    let server: http.Server;
    let base = '';
    let png: Buffer;
    let jpeg: Buffer;
    const seen: Array<{ url: string; body: string }> = [];
    beforeAll(async () => {
      const sharp = (await import('sharp')).default;
      const img = () => sharp({ create: { width: 512, height: 512, channels: 3, background: { r: 40, g: 90, b: 160 } } });
      png = await img().png().toBuffer();
      jpeg = await img().jpeg().toBuffer();
      server = http.createServer((req, res) => {
        let body = '';
        req.on('data', (c: Buffer) => (body += c.toString()));
        req.on('end', () => {
          seen.push({ url: req.url ?? '', body });
          const send = (code: number, o: unknown) => res.writeHead(code, { 'content-type': 'application/json' }).end(JSON.stringify(o));
          if (req.url === '/v1/models/good:predict') send(200, { predictions: [{ image: { b64: png.toString('base64') } }] });
          else if (req.url === '/v1/models/jpeg:predict') send(200, { predictions: [{ image: { b64: jpeg.toString('base64') } }] });
          else if (req.url === '/v1/models/empty:predict') send(200, { predictions: [] });
          else if (req.url === '/v1/models/booting:predict') send(503, { error: 'Model with name booting is not ready.', state: 'fetching' });
          else send(404, { error: 'Model with name x does not exist.' });
        });
      });
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    });
    afterAll(() => new Promise<void>((r) => server.close(() => r())));

    const run = async (args: string[], env: NodeJS.ProcessEnv = process.env) => {
      try {
        const { stdout, stderr } = await execFileP('bash', [path.join(ROOT, 'scripts/test-v1.sh'), ...args], { env, encoding: 'utf8' });
        return { code: 0, out: stdout + stderr };
      } catch (e) {
        const err = e as { code: number; stdout: string; stderr: string };
        return { code: err.code, out: err.stdout + err.stderr };
      }
    };

    it('200 with a 512x512 PNG: exit 0, prints size, bytes and latency; posts the seed request', async () => {
      const r = await run([base, 'good']);
      expect(r.code, r.out).toBe(0);
      expect(r.out).toMatch(new RegExp(`OK: PNG 512x512, ${png.length} bytes, 1 prediction\\(s\\), latency [0-9.]+s`));
      expect(JSON.parse(seen.at(-1)!.body)).toEqual(JSON.parse(read('scripts/v1_input.json')));
    });

    it('without node on PATH (base64 + od fallback) reads the same PNG', async () => {
      const bin = mkdtempSync(path.join(os.tmpdir(), 'deploy-nonode-'));
      try {
        for (const tool of ['bash', 'curl', 'sed', 'od', 'tr', 'base64', 'wc', 'head', 'mktemp', 'rm', 'cat', 'dirname', 'basename', 'cp']) {
          const where = spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).stdout.trim();
          if (where) symlinkSync(where, path.join(bin, tool));
        }
        const r = await run([base, 'good'], { ...process.env, PATH: bin });
        expect(r.code, r.out).toBe(0);
        expect(r.out).toContain(`OK: PNG 512x512, ${png.length} bytes`);
      } finally {
        rmSync(bin, { recursive: true, force: true });
      }
    });

    it('fails clearly: HTTP 503, unknown model, no image, not a PNG, bad URL', async () => {
      const r503 = await run([base, 'booting']);
      expect(r503.code).not.toBe(0);
      expect(r503.out).toMatch(/FAIL: HTTP 503.*not ready/);
      const r404 = await run([base, 'nope']);
      expect(r404.code).not.toBe(0);
      expect(r404.out).toMatch(/FAIL: HTTP 404.*unknown model name/);
      const empty = await run([base, 'empty']);
      expect(empty.code).not.toBe(0);
      expect(empty.out).toMatch(/no predictions\[0\]\.image\.b64/);
      const notPng = await run([base, 'jpeg']);
      expect(notPng.code).not.toBe(0);
      expect(notPng.out).toMatch(/not a PNG/);
      const badUrl = await run(['localhost:8080']);
      expect(badUrl.code).not.toBe(0);
      expect(badUrl.out).toMatch(/must start with http/);
    });
  });

  describe('export-onnx.sh with a stub optimum-cli and a stub python', () => {
    let dir = '';
    // Both stubs write the layout into their output folder and record how they were called.
    const layout = [
      'mkdir -p "$out"/{scheduler,tokenizer,text_encoder,unet,vae_decoder}',
      'echo "{}" > "$out/model_index.json"',
      'for f in scheduler/scheduler_config.json tokenizer/vocab.json tokenizer/merges.txt text_encoder/model.onnx unet/model.onnx; do echo x > "$out/$f"; done',
      '[ -n "${STUB_COMPLETE:-}" ] && echo x > "$out/vae_decoder/model.onnx"',
      'exit 0',
      '',
    ];
    beforeAll(() => {
      dir = mkdtempSync(path.join(os.tmpdir(), 'deploy-export-'));
      mkdirSync(path.join(dir, 'venv', 'bin'), { recursive: true });
      const stub = path.join(dir, 'venv', 'bin', 'optimum-cli');
      writeFileSync(stub, ['#!/usr/bin/env bash', 'echo "optimum-cli $*" >> "$(dirname "$0")/calls"', 'out="${*: -1}"', ...layout].join('\n'));
      chmodSync(stub, 0o755);
      // `python -c "import ..."` is the venv check; `python export_sd.py SOURCE OUT ...` the export.
      const py = path.join(dir, 'venv', 'bin', 'python');
      writeFileSync(py, ['#!/usr/bin/env bash', '[ "$1" = -c ] && exit 0', 'echo "python $*" >> "$(dirname "$0")/calls"', 'out="$3"', ...layout].join('\n'));
      chmodSync(py, 0o755);
    });
    afterAll(() => rmSync(dir, { recursive: true, force: true }));
    const run = (args: string[], env: Record<string, string> = {}) =>
      spawnSync('bash', [path.join(ROOT, 'scripts/export-onnx.sh'), ...args], { encoding: 'utf8', env: { ...process.env, VENV: path.join(dir, 'venv'), ...env } });

    it('usage: --help exits 0, missing arguments exit 2, unknown options fail', () => {
      const help = run(['--help']);
      expect(help.status).toBe(0);
      // The header comment and nothing of the script after it.
      expect(help.stdout).toMatch(/^Export a Hugging Face diffusers model/);
      expect(help.stdout.trimEnd()).toMatch(/PYTHON_IMAGE \(default\npython:3\.11-slim\)\.$/);
      const noArgs = run([]);
      expect(noArgs.status).toBe(2);
      expect(noArgs.stderr).toBe(help.stdout);
      expect(run(['m', path.join(dir, 'o0'), '--bogus']).status).not.toBe(0);
      expect(run(['m', path.join(dir, 'o0'), '--push', 'http://not-s3']).stderr).toMatch(/s3:\/\/bucket\/prefix/);
      const alone = run(['m', path.join(dir, 'o0'), '--replace']);
      expect([alone.status, alone.stderr]).toEqual([1, 'export-onnx: --replace goes with --push\n']);
    });

    it('--plain: passes --fp16 as --dtype fp16 --device cuda and verifies the layout', () => {
      const ok = run(['org/model', path.join(dir, 'ok'), '--plain', '--fp16'], { STUB_COMPLETE: '1' });
      expect(ok.status, ok.stderr).toBe(0);
      expect(ok.stdout).toMatch(/layout ok/);
      expect(readFileSync(path.join(dir, 'venv', 'bin', 'calls'), 'utf8')).toContain('export onnx --model org/model --dtype fp16 --device cuda');
      const bad = run(['org/model', path.join(dir, 'bad'), '--plain']);
      expect(bad.status).not.toBe(0);
      expect(bad.stderr).toMatch(/incomplete, missing: vae_decoder\/model\.onnx/);
    });

    it('by default runs the fused export (scripts/export_sd.py) and refuses options that belong to --plain', () => {
      const ok = run(['org/model', path.join(dir, 'fused'), '--device', 'cpu'], { STUB_COMPLETE: '1' });
      expect(ok.status, ok.stderr).toBe(0);
      expect(ok.stdout).toMatch(/fused float16 for CUDA; --plain for CPU serving/);
      expect(readFileSync(path.join(dir, 'venv', 'bin', 'calls'), 'utf8')).toContain(`scripts/export_sd.py org/model ${path.join(dir, 'fused')} --device cpu`);
      expect(run(['org/model', path.join(dir, 'f2'), '--fp16']).stderr).toMatch(/--fp16 is for --plain/);
      expect(run(['org/model', path.join(dir, 'f3'), '--plain', '--fp32']).stderr).toMatch(/--fp32 is for the fused export/);
      expect(run(['org/model', path.join(dir, 'fused')]).stderr).toMatch(/is not empty/);
    });

    it("the Makefile's EXPORT_ARGS examples (`make help`, the export target's usage) are options the script takes", () => {
      const line = read('Makefile').split('\n').find((l) => l.startsWith('export:'))!;
      const usage = read('Makefile').split('\n').find((l) => l.includes('usage: make export'))!;
      const examples = [...`${line}\n${usage}`.matchAll(/EXPORT_ARGS=(?:'([^']*)'|(\S+?)\])/g)].map((m) => (m[1] ?? m[2])!);
      expect(examples.length).toBe(2);
      examples.forEach((ex, i) => {
        // --push uploads after the export (to S3, not here): the options that shape the export are what is checked.
        const args = ex.split(/\s+/).filter((a, j, all) => a !== '--push' && all[j - 1] !== '--push');
        const r = run(['org/model', path.join(dir, `make-example-${i}`), ...args], { STUB_COMPLETE: '1' });
        expect(r.status, `EXPORT_ARGS=${ex}: ${r.stderr}`).toBe(0);
      });
    });
  });
});
