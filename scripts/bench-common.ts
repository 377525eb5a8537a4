/** Helpers the benchmarks share: child processes, ports, s3rver in its own process, result parsing. */
import { spawn, type ChildProcess } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { createRequire } from 'node:module';
import net, { type AddressInfo } from 'node:net';
import path from 'node:path';

// The benchmarks' own S3 clients (pushing fixtures): the AWS SDK's notice about its future Node requirement would
// sit among their tables, as src/main.ts keeps it out of the server's stderr.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

/** s3rver's built-in credentials; it does not check signatures. */
export const S3RVER_CREDS = { AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1' };

export const freePort = () =>
  new Promise<number>((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as AddressInfo;
      s.close(() => resolve(port));
    });
  });

/** Starts a child and resolves (with its output so far) once a line of stdout or stderr matches `ready`. */
export function startChild(cmd: string, args: string[], ready: RegExp, env: NodeJS.ProcessEnv = process.env): { child: ChildProcess; up: Promise<string> } {
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const up = new Promise<string>((resolve, reject) => {
    let buf = '';
    const on = (c: Buffer) => {
      buf += String(c);
      if (ready.test(buf)) resolve(buf);
    };
    child.stdout!.on('data', on);
    child.stderr!.on('data', on);
    child.once('exit', (code) => reject(new Error(`${path.basename(args[0] ?? cmd)} exited (${code}) before it was ready: ${buf.slice(-400)}`)));
  });
  return { child, up };
}

/** The last line of `s` that is a JSON object: every benchmark and the warm-up CLI end with one. */
export const lastJson = (s: string): Record<string, unknown> => {
  const line = s.trim().split('\n').filter((l) => l.startsWith('{')).at(-1);
  if (!line) throw new Error(`no JSON line in output: ${s.slice(-400)}`);
  return JSON.parse(line) as Record<string, unknown>;
};

/** Child mode: s3rver in its own process (so its CPU is not the benchmark's), port printed as `PORT n`. */
export async function childS3rver(dir: string, bucket: string): Promise<void> {
  const S3rver = createRequire(import.meta.url)('s3rver') as new (o: Record<string, unknown>) => { run(): Promise<AddressInfo> };
  const s = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: dir, configureBuckets: [{ name: bucket }] });
  const a = await s.run();
  process.stdout.write(`PORT ${a.port}\n`);
}

/**
 * s3rver in a child process (`self` runs childS3rver when given `s3rver DIR`), holding the model's files under
 * bucket/prefix; resolves its port and process, which also joins `children` (the caller stops them).
 */
export async function s3rverWithModel(self: string, dir: string, bucket: string, prefix: string, model: { dir: string; files: ReadonlyArray<{ path: string; bytes: number }> }, children: ChildProcess[]): Promise<{ port: number; child: ChildProcess }> {
  const s3 = startChild(process.execPath, [self, 's3rver', dir], /PORT \d+/);
  children.push(s3.child);
  const port = Number(/PORT (\d+)/.exec(await s3.up)![1]);
  const { PutObjectCommand, S3Client } = await import('@aws-sdk/client-s3');
  const up = new S3Client({ endpoint: `http://127.0.0.1:${port}`, region: S3RVER_CREDS.AWS_REGION, forcePathStyle: true,
    credentials: { accessKeyId: S3RVER_CREDS.AWS_ACCESS_KEY_ID, secretAccessKey: S3RVER_CREDS.AWS_SECRET_ACCESS_KEY },
    requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' });
  for (const f of model.files) {
    await up.send(new PutObjectCommand({ Bucket: bucket, Key: prefix + f.path, Body: createReadStream(path.join(model.dir, f.path)), ContentLength: f.bytes }));
  }
  up.destroy();
  return { port, child: s3.child };
}

/** A benchmark's entry: `s3rver DIR` as arguments runs its s3rver child (childS3rver); else the benchmark, a failure exiting 1. */
export async function benchEntry(main: () => Promise<void>, bucket: string): Promise<void> {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === 's3rver') return childS3rver(args[0]!, bucket);
  await main().catch((e: unknown) => {
    process.stderr.write(`bench: ${(e as Error).stack ?? String(e)}\n`);
    process.exitCode = 1;
  });
}

/** A number from the environment, `d` when the variable is unset or empty. */
export const envNumber = (k: string, d: number): number => (process.env[k] ? Number(process.env[k]) : d);

/** The built server (`dist/src/main.js`), started by startBenchServer. */
export interface BenchServer {
  url: string;
  port: number;
  proc: ChildProcess;
  /** Its stdout so far (the log lines) with `keepLog`, else ''. */
  log(): string;
  /** SIGTERM (SIGKILL after 30 s), then how it exited. */
  stop(): Promise<{ code: number | null; signal: string | null }>;
}

export interface BenchServerOptions {
  timeoutMs?: number;
  /** Runs the server under `ulimit -n nofile`. */
  nofile?: number;
  /** Keeps its log lines for `log()` instead of dropping them once it is ready. */
  keepLog?: boolean;
  /** Called with the process as soon as it is spawned (a benchmark that stops its servers on a signal). */
  spawned?: (proc: ChildProcess) => void;
}

/**
 * Starts the built server with `env` on an ephemeral loopback port and resolves once it logs "model ready" (rejects
 * on a failed boot, an exit, or `timeoutMs`). Its stderr goes to this process's; its later log lines are read and
 * dropped (unless `keepLog`), so a long run costs no parsing here.
 */
export function startBenchServer(env: NodeJS.ProcessEnv, opts: BenchServerOptions = {}): Promise<BenchServer> {
  const { timeoutMs = 180_000, nofile, keepLog = false } = opts;
  const main = path.resolve(import.meta.dirname, '..', 'src', 'main.js');
  const [cmd, args] = nofile === undefined ? [process.execPath, [main]] : ['sh', ['-c', `ulimit -n ${nofile} && exec "$0" "$@"`, process.execPath, main]];
  const proc = spawn(cmd, args, { env: { ...env, PORT: '0', HOST: '127.0.0.1' }, stdio: ['ignore', 'pipe', 'inherit'] });
  opts.spawned?.(proc);
  let kept = '';
  const exited = new Promise<{ code: number | null; signal: string | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  return new Promise((resolve, reject) => {
    let port = 0;
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`the server was not ready in ${timeoutMs / 1000} s`)), timeoutMs);
    void exited.then(({ code }) => reject(new Error(`the server exited (${code}) before it was ready`)));
    const onData = (c: string) => {
      if (keepLog) kept += c;
      buf += c;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let l: { msg?: string; port?: number };
        try {
          l = JSON.parse(line) as typeof l;
        } catch {
          continue;
        }
        if (l.msg === 'listening') port = Number(l.port);
        if (l.msg?.startsWith('boot failed')) reject(new Error(l.msg));
        if (l.msg === 'model ready') {
          clearTimeout(timer);
          proc.stdout!.off('data', onData);
          if (keepLog) proc.stdout!.on('data', (d: string) => (kept += d));
          else proc.stdout!.resume();
          resolve({
            url: `http://127.0.0.1:${port}`, port, proc, log: () => kept,
            stop: async () => {
              if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
              const kill = setTimeout(() => proc.kill('SIGKILL'), 30_000);
              const r = await exited;
              clearTimeout(kill);
              return r;
            },
          });
        }
      }
    };
    proc.stdout!.setEncoding('utf8').on('data', onData);
  });
}

/** The median (the mean of the middle two for an even count; NaN for none). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length === 0 ? NaN : s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
