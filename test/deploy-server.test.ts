/**
 * The templates' probes against the real server: start `node dist/src/main.js` (embedded demo model:
 * no STORAGE_URI, no /mnt/models), then every liveness path in templates/ must answer 200 at once
 * and every readiness path 200 once the warm-up is done. Also: the probe port is the server's default
 * port, and the server exits 0 on SIGTERM (the image has no tini: node is PID 1).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { alive, postJson, startServer, until, type LogLine } from './helpers/server.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const ENTRY = path.join(ROOT, 'dist', 'src', 'main.js');
const TEMPLATES = path.join(ROOT, 'templates');
const MODEL = 'probe-model';

type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** Same rules as `make render` (envsubst restricted to the names in templates/params.env). */
function renderedDocs(file: string): Obj[] {
  const params = new Map<string, string>();
  for (const line of readFileSync(path.join(TEMPLATES, 'params.env'), 'utf8').split('\n')) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line);
    if (m) params.set(m[1]!, m[2]!);
  }
  const text = readFileSync(path.join(TEMPLATES, file), 'utf8').replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (all, n: string) => params.get(n) ?? all);
  return YAML.parseAllDocuments(text).map((d) => d.toJSON() as Obj).filter((d) => d !== null);
}

function probes(): { liveness: Set<string>; readiness: Set<string>; ports: Set<number> } {
  const liveness = new Set<string>();
  const readiness = new Set<string>();
  const ports = new Set<number>();
  for (const file of readdirSync(TEMPLATES).filter((f) => f.endsWith('.yaml'))) {
    for (const doc of renderedDocs(file)) {
      const containers: Obj[] = [...(doc.spec?.containers ?? []), ...(doc.spec?.predictor?.model ? [doc.spec.predictor.model] : []), ...(doc.spec?.template?.spec?.containers ?? [])];
      for (const c of containers) {
        for (const [kind, set] of [['livenessProbe', liveness], ['startupProbe', liveness], ['readinessProbe', readiness]] as const) {
          const p = c[kind]?.httpGet;
          if (!p) continue;
          // KServe renders {{.Name}} to the InferenceService name, which is the server's MODEL_NAME.
          set.add(String(p.path).replaceAll('{{.Name}}', MODEL));
          ports.add(Number(p.port));
        }
      }
    }
  }
  return { liveness, readiness, ports };
}

describe('template probes against the real server', () => {
  let proc: ChildProcess | undefined;
  let base = '';
  let cache = '';
  const logs: Obj[] = [];
  let stderr = '';
  let exited: Promise<number | null>;

  beforeAll(async () => {
    if (!existsSync(ENTRY)) throw new Error(`${ENTRY} is missing: run \`npm run build\` first (npm test does); the server source may not have landed yet`);
    cache = mkdtempSync(path.join(os.tmpdir(), 'deploy-probe-cache-'));
    const env: NodeJS.ProcessEnv = { ...process.env, PORT: '0', HOST: '127.0.0.1', MODEL_NAME: MODEL, MODEL_CACHE_DIR: cache, EXECUTION_PROVIDER: 'cpu', LOG_LEVEL: 'info', SHUTDOWN_GRACE_S: '5' };
    delete env.STORAGE_URI;
    proc = spawn(process.execPath, [ENTRY], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    exited = new Promise((r) => proc!.once('exit', (code) => r(code)));
    proc.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no "listening" log line within 30 s; stderr: ${stderr.slice(-1500)}`)), 30_000);
      let buf = '';
      proc!.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
        buf += chunk;
        let i: number;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          try {
            const l = JSON.parse(line) as Obj;
            logs.push(l);
            if (l.event === 'listening') {
              clearTimeout(timer);
              resolve(Number(l.port));
            }
          } catch {
            /* not a JSON line */
          }
        }
      });
      void exited.then((code) => reject(new Error(`server exited (code ${code}) before listening; stderr: ${stderr.slice(-1500)}`)));
    });
    base = `http://127.0.0.1:${port}`;
  }, 40_000);

  afterAll(async () => {
    if (proc && proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    rmSync(cache, { recursive: true, force: true });
  });

  it('templates probe port 8080, which is the server default (PORT unset) and the image EXPOSE', async () => {
    const { ports } = probes();
    expect([...ports]).toEqual([8080]);
    const { loadConfig } = await import('../src/config.js');
    expect(loadConfig({ MODEL_CACHE_DIR: cache }).port).toBe(8080);
    expect(readFileSync(path.join(ROOT, 'docker', 'Dockerfile'), 'utf8')).toMatch(/^EXPOSE 8080$/m);
  });

  it('every liveness path in the templates answers 200 right after listen', async () => {
    const { liveness } = probes();
    expect(liveness.size).toBeGreaterThan(0);
    for (const p of liveness) {
      const res = await fetch(base + p, { headers: { 'user-agent': 'kube-probe/1.30' } });
      expect(res.status, `GET ${p}`).toBe(200);
    }
    const root = await fetch(`${base}/`);
    expect(await root.json()).toEqual({ status: 'alive' });
  });

  it('every readiness path in the templates answers 200 once the model is warm (polled up to 60 s)', async () => {
    const { readiness } = probes();
    expect(readiness.size).toBeGreaterThan(0);
    for (const p of readiness) {
      const deadline = Date.now() + 60_000;
      let status = 0;
      let body = '';
      while (Date.now() < deadline) {
        const res = await fetch(base + p, { headers: { 'user-agent': 'kube-probe/1.30' } });
        status = res.status;
        body = await res.text();
        if (status === 200) break;
        expect(status, `GET ${p} before ready must be 503, got ${status}: ${body}`).toBe(503);
        await new Promise((r) => setTimeout(r, 250));
      }
      if (status !== 200) {
        const state = await fetch(`${base}/v1/models/${MODEL}`).then((r) => r.text()).catch(() => '?');
        throw new Error(`GET ${p} still ${status} after 60 s; /v1/models/${MODEL}: ${state}; last logs: ${logs.slice(-5).map((l) => JSON.stringify(l)).join('\n')}`);
      }
    }
  }, 70_000);

  it('exits 0 on SIGTERM (node as PID 1 relies on its own handler)', async () => {
    proc!.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r('timeout'), 15_000))]);
    expect(code, `stderr: ${stderr.slice(-1000)}`).toBe(0);
  }, 20_000);
});

describe('a stop signal delivered twice (Ctrl-C under npm start reaches npm and node; a process-group kill)', () => {
  /**
   * A server with a long generation in flight, sent SIGINT, then SIGINT again after each of `gapsMs`: the request's
   * answer and how the process ended.
   */
  async function stopDuring(...gapsMs: number[]): Promise<{ status: number | string; code: number | null; signal: string | null; logs: LogLine[] }> {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '60' }, { ready: true });
    try {
      const answer = postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'in flight', num_inference_steps: 500, height: 512, width: 512, seed: 5, num_images_per_prompt: 2 }] }).then((r) => r.status, (e: Error) => `failed: ${e.message}`);
      const inflight = async () => /^inference_requests_in_flight(?:\{[^}]*\})? 1$/m.test(await (await fetch(`${srv.url}/metrics`)).text());
      await until(inflight, 20_000, 20);
      srv.proc.kill('SIGINT');
      for (const gap of gapsMs) {
        if (gap > 0) await new Promise((r) => setTimeout(r, gap));
        srv.proc.kill('SIGINT');
      }
      const status = await answer;
      // stop() would kill a server still draining: wait for it to exit by itself
      const { code, signal } = await new Promise<{ code: number | null; signal: string | null }>((resolve) =>
        srv.proc.exitCode !== null || srv.proc.signalCode !== null ? resolve({ code: srv.proc.exitCode, signal: srv.proc.signalCode }) : srv.proc.once('exit', (c, s) => resolve({ code: c, signal: s })));
      return { status, code, signal, logs: srv.logs };
    } finally {
      await srv.stop('SIGKILL').catch(() => undefined);
    }
  }

  it('at once: one stop, the request in flight still answered, exit 0; a second signal a while later ends the drain: 503, exit 1', async () => {
    const twice = await stopDuring(20);
    expect(twice.status).toBe(200);
    expect(twice.code).toBe(0);
    expect(twice.logs.some((l) => l.msg === 'signal repeated at once: still draining (a later one exits now)')).toBe(true);
    // Stopped at its next step, as when the grace runs out: answered 503, and the process exits 1, not aborted by
    // an exit under a running ONNX Runtime call
    const later = await stopDuring(1500);
    expect(later.status).toBe(503);
    expect(later.code).toBe(1);
    expect(later.logs.some((l) => l.msg === 'second signal: ending the drain now (generations stop at their next step; exit 1)')).toBe(true);
  }, 90_000);

  it('a second Ctrl-C under npm start (delivered twice as well) is one second signal: 503, exit 1, not a third that kills', async () => {
    const twiceTwice = await stopDuring(20, 1500, 0);
    expect([twiceTwice.status, twiceTwice.code, twiceTwice.signal]).toEqual([503, 1, null]);
    expect(twiceTwice.logs.filter((l) => l.msg === 'second signal: ending the drain now (generations stop at their next step; exit 1)')).toHaveLength(1);
  }, 60_000);
});

describe('npm start under a process manager', () => {
  it('SIGTERM to npm (what systemd, pm2 or a CI step sends) stops the server it started (it went on serving, orphaned, with the port held)', async () => {
    const cache = mkdtempSync(path.join(os.tmpdir(), 'npm-start-'));
    const env: NodeJS.ProcessEnv = { ...process.env, PORT: '0', HOST: '127.0.0.1', MODEL_CACHE_DIR: cache, WARMUP_STEPS: '0', LOG_LEVEL: 'info' };
    delete env.STORAGE_URI;
    const npm = spawn('npm', ['start'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    npm.stdout.setEncoding('utf8').on('data', (c: string) => (out += c));
    npm.stderr.setEncoding('utf8').on('data', (c: string) => (out += c));
    let serverPid: number | undefined;
    try {
      await until(() => /"event":"listening"/.test(out), 30_000, 50);
      serverPid = (JSON.parse(out.split('\n').find((l) => l.includes('"event":"listening"'))!) as { pid: number }).pid;
      expect(serverPid).not.toBe(npm.pid);
      npm.kill('SIGTERM');
      await until(() => !alive(serverPid!), 20_000, 50).catch(() => undefined);
      expect(alive(serverPid), `the server (pid ${serverPid}) outlived npm: ${out.slice(-600)}`).toBe(false);
      expect(out).toMatch(/"event":"shut-down"/);
    } finally {
      if (serverPid !== undefined && alive(serverPid)) process.kill(serverPid, 'SIGKILL');
      npm.kill('SIGKILL');
      rmSync(cache, { recursive: true, force: true });
    }
  }, 60_000);
});

describe('one model name for a local user (npm start, make run-local, make test-v1)', () => {
  const has = (tool: string) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
  let srv: RuntimeHandle;
  let input = '';
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined, MODEL_NAME: undefined, WARMUP_STEPS: '1' }, { ready: true });
    input = path.join(mkdtempSync(path.join(os.tmpdir(), 'deploy-v1-')), 'small.json');
    writeFileSync(input, JSON.stringify({ instances: [{ prompt: 'a photo of a dog', num_inference_steps: 2, height: 64, width: 64 }] }));
  });
  afterAll(async () => {
    await srv?.stop();
    rmSync(path.dirname(input), { recursive: true, force: true });
  });
  const env = () => {
    const e: NodeJS.ProcessEnv = { ...process.env, INPUT: input };
    delete e.MODEL_NAME;
    return e;
  };
  /** A client of the runtime served in this process: asynchronous, since spawnSync would stop the loop that answers it. */
  const client = (cmd: string, args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const p = spawn(cmd, args, { cwd: opts.cwd, env: { ...env(), ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
      p.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
      p.once('close', (status) => resolve({ status, stdout, stderr }));
    });

  it.skipIf(!has('make'))('make run-local serves "model" like npm start; MODEL_NAME= on the command line still wins', () => {
    expect(spawnSync('make', ['-n', 'run-local'], { cwd: ROOT, encoding: 'utf8', env: env() }).stdout).toMatch(/PORT=8080 MODEL_NAME=model +npm start/);
    expect(spawnSync('make', ['-n', 'run-local', 'MODEL_NAME=sdxl'], { cwd: ROOT, encoding: 'utf8', env: env() }).stdout).toMatch(/MODEL_NAME=sdxl +npm start/);
  });

  it.skipIf(!has('make') || !has('curl'))("make test-v1 URL=<a local server> (Make's own hint) passes against npm start's server", async () => {
    const r = await client('make', ['-s', 'test-v1', `URL=${srv.url}`], { cwd: ROOT });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain(`model: model (the one model ${srv.url} serves)`);
    expect(r.stdout).toMatch(/OK: PNG 64x64/);
  });

  it.skipIf(!has('curl'))('test-v1.sh takes a URL copied with its route: cut to the root, the model name taken from it', async () => {
    for (const route of ['/v1/models/model:predict', '/v1/models/model', '/v2/models/model/infer', '/v1/models/']) {
      const r = await client('bash', [path.join(ROOT, 'scripts/test-v1.sh'), `${srv.url}${route}`]);
      expect(r.status, route + r.stderr).toBe(0);
      expect(r.stdout, route).toMatch(/OK: PNG 64x64/);
    }
    const named = await client('bash', [path.join(ROOT, 'scripts/test-v1.sh'), `${srv.url}/v1/models/model:predict`]);
    expect(named.stdout).toContain(`URL: ${srv.url} (the root of the route given; model model)`);
  });

  it.skipIf(!has('curl'))('test-v1.sh tells a refused connection (at once) from a timeout (TIMEOUT)', async () => {
    // A loopback port nothing listens on, then one that accepts and never answers.
    const closed = net.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as net.AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    const refused = await client('bash', [path.join(ROOT, 'scripts/test-v1.sh'), `http://127.0.0.1:${port}`, 'model']);
    expect(refused.status).toBe(1);
    // bash's SECONDS counts whole seconds: a refusal at once may still cross a second's boundary.
    expect(refused.stderr).toMatch(new RegExp(`test-v1: FAIL: could not reach the server at http://127\\.0\\.0\\.1:${port} \\(curl exit 7, connection refused or no route, after \\d+s\\)`));
    expect(refused.stderr).not.toMatch(/within/);

    const sockets = new Set<net.Socket>();
    const silent = net.createServer((s) => void sockets.add(s.on('error', () => {})));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
      const slow = await client('bash', [path.join(ROOT, 'scripts/test-v1.sh'), url, 'model'], { env: { TIMEOUT: '1' } });
      expect(slow.status).toBe(1);
      expect(slow.stderr).toContain(`test-v1: FAIL: no answer within 1s (TIMEOUT; curl exit 28): ${url}/v1/models/model:predict`);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  it.skipIf(!has('curl'))('test-v1.sh names the models the server serves when it gets a 404', async () => {
    const r = await client('bash', [path.join(ROOT, 'scripts/test-v1.sh'), srv.url, 'stable-diffusion']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/FAIL: HTTP 404 .*unknown model name 'stable-diffusion'; this server serves: model; list them: curl /);
  });
});
