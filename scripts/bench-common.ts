/** Helpers the benchmarks share: child processes, ports, s3rver in its own process, result parsing. */
import { spawn, type ChildProcess } from 'node:child_process';
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

/** The median (the mean of the middle two for an even count; NaN for none). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length === 0 ? NaN : s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
