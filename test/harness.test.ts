/**
 * The in-process harness's promise: after rt.close() nothing of the runtime is left running (no worker thread, socket,
 * timer or child process), so a process that embeds one (vitest's) exits by itself. A process of its own shows it.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, expect, it } from 'vitest';
import { ROOT, sharedCacheDir, tempDir } from './helpers/server.js';

const dist = (p: string) => pathToFileURL(path.join(ROOT, 'dist', 'src', p)).href;

const SCRIPT = `
import http from 'node:http';
const [{ loadConfig }, { createLogger }, { createRuntime, listen }, { bootRuntime }] = await Promise.all([
  import(${JSON.stringify(dist('config.js'))}), import(${JSON.stringify(dist('log.js'))}),
  import(${JSON.stringify(dist('main.js'))}), import(${JSON.stringify(dist('runtime/boot-sequence.js'))}),
]);
const cfg = loadConfig(process.env);
const rt = await createRuntime(cfg, { log: createLogger('silent') });
const port = await listen(rt);
const end = new Promise((r) => rt.events.on((e) => { if (e.name === 'ready' || (e.name === 'state' && e.data.state === 'failed')) r(e.name); }));
void bootRuntime(rt);
const out = { boot: await end };
// A keep-alive connection left open by a client: close() must end it too.
const agent = new http.Agent({ keepAlive: true });
let sock;
out.predict = await new Promise((resolve, reject) => {
  const req = http.request({ port, host: '127.0.0.1', path: '/v1/models/model:predict', method: 'POST', agent, headers: { 'content-type': 'application/json' } }, (res) => {
    res.resume();
    res.on('end', () => resolve(res.statusCode));
  });
  req.on('socket', (s) => (sock = s));
  req.on('error', reject);
  req.end(JSON.stringify({ instances: [{ prompt: 'x', num_inference_steps: 1, height: 64, width: 64 }] }));
});
// The agent unrefs an idle socket; ref'd, it keeps this process alive until the server ends it.
sock.ref();
const socketClosed = sock.destroyed ? Promise.resolve('closed before close()') : new Promise((r) => sock.once('close', () => r(true)));
await rt.close();
out.socketClosed = await socketClosed;
agent.destroy();
process.stdout.write(JSON.stringify(out) + '\\n');
`;

const children: Array<ReturnType<typeof spawn>> = [];
const scratch = tempDir('dr-harness-');
afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  scratch.cleanup();
});

it('after close() the embedding process exits by itself: workers, sockets (keep-alive ones too) and timers are gone', async () => {
  const env: NodeJS.ProcessEnv = { ...process.env, PORT: '0', HOST: '127.0.0.1', MODEL_CACHE_DIR: sharedCacheDir(), WARMUP_STEPS: '1', EXECUTION_PROVIDER: 'cpu' };
  delete env.STORAGE_URI;
  // A module file, as an embedding program is (node -e would hand its flags to the worker threads).
  const file = path.join(scratch.dir, 'embed.mjs');
  writeFileSync(file, SCRIPT);
  const child = spawn(process.execPath, [file], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  // No process.exit in the script: the exit comes only once nothing keeps the event loop alive. A runtime that leaves
  // a handle open keeps the child running until the test's timeout fails it (afterAll kills it).
  const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  expect(code, stderr).toBe(0);
  expect(JSON.parse(stdout)).toEqual({ boot: 'ready', predict: 200, socketClosed: true });
});
