import { spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { HELD, JOURNAL, MANIFEST, uncommit } from '../src/storage/cache.js';
import { replay, spanBytes } from '../src/storage/journal.js';
import { cleanUpS3, detBytes, type FaultProxy, type Faults, s3Env, settledCount, type S3Server, startS3WithProxy } from './helpers/s3.js';
import { runWarmupCli, WARMUP_CLI as CLI } from './helpers/warmup-cli.js';
import { until } from './helpers/server.js';
import { ListObjectsV2Command, PutObjectCommand } from '@aws-sdk/client-s3';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
let local: string;
const model: Record<string, Buffer> = {
  'model_index.json': Buffer.from('{"_class_name":"StableDiffusionPipeline"}'),
  'unet/model.onnx': detBytes(50_000, 1),
  'unet/model.onnx_data': detBytes(2_500_000, 2),
  'text_encoder/model.onnx': detBytes(300_000, 3),
  'vae_decoder/model.onnx': detBytes(200_000, 4),
  'tokenizer/vocab.json': detBytes(20_000, 5),
};
const TOTAL = Object.values(model).reduce((s, b) => s + b.length, 0);

const cli = runWarmupCli;

const lastLine = (s: string) => s.trim().split('\n').filter((l) => !/NodeVersion|node >=22|versions published|updates to AWS|security updates|a\.co\/|trace-warnings/.test(l)).at(-1) ?? '';

async function expectModel(dir: string): Promise<void> {
  for (const [rel, body] of Object.entries(model)) expect((await fsp.readFile(path.join(dir, rel))).equals(body), rel).toBe(true);
}

beforeAll(async () => {
  if (!existsSync(CLI)) spawnSync(process.execPath, [path.resolve('node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { stdio: 'ignore' });
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'warmup-'));
  local = path.join(tmp, 'export');
  for (const [rel, body] of Object.entries(model)) {
    await fsp.mkdir(path.dirname(path.join(local, rel)), { recursive: true });
    await fsp.writeFile(path.join(local, rel), body);
  }
  ({ s3, proxy } = await startS3WithProxy());
  const pushed = await cli(['push', local, 's3://models/sd/v1'], s3Env(s3.endpoint, path.join(tmp, 'unused'), { S3_PART_SIZE: '65536' }));
  expect(pushed.code, pushed.stderr).toBe(0);
  expect(JSON.parse(lastLine(pushed.stdout))).toMatchObject({ uri: 's3://models/sd/v1/', bytes: TOTAL, files: 6 });
});

cleanUpS3(() => ({ s3, proxy, tmp }));

const env = (cache: string, extra: Record<string, string> = {}) =>
  s3Env(proxy.endpoint, cache, { STORAGE_URI: 's3://models/sd/v1', S3_PART_SIZE: '131072', S3_MAX_CONCURRENCY: '6', ...extra });

describe('warm-up CLI', () => {
  it('fills the cache, prints one JSON line, and is a cache hit the second time', async () => {
    const cache = path.join(tmp, 'c1');
    const before = proxy.stats.requests;
    const r = await cli([], env(cache));
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim());
    // s3rver's ETags are MD5s: every file but an empty one was checked.
    expect(out).toMatchObject({ bytes: TOTAL, files: 6, fromCache: false, contentChecked: expect.any(Number) });
    expect(out.contentChecked + Object.values((out.contentNotChecked ?? {}) as Record<string, number>).reduce((a, b) => a + b, 0)).toBe(6);
    expect(Object.keys(out.contentNotChecked ?? {}).filter((k) => k !== 'empty')).toEqual([]);
    expect(r.stdout.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/warmup: done .* MB \(100\.0%\)/);
    await expectModel(out.modelDir);
    // Every request the proxy received, each answered whole (ranges of 128 KiB, the LISTs, the content check's).
    expect(out.s3Requests).toEqual({ ok: proxy.stats.requests - before });
    expect(out.s3Requests.ok).toBeGreaterThan(20);
    const hit = proxy.stats.requests;
    const again = await cli([], env(cache));
    expect(JSON.parse(again.stdout)).toMatchObject({ modelDir: out.modelDir, fromCache: true, s3Requests: { ok: proxy.stats.requests - hit } });
  });

  it('a fill through S3_TRANSPORT=lite never loads the AWS SDK (~250 ms of CPU); a default fill and push do', async () => {
    const hook = path.join(tmp, 'sdk-check.cjs');
    await fsp.writeFile(hook, "process.on('exit', () => { if (Object.keys(require.cache).some((k) => k.includes('@aws-sdk/'))) process.stderr.write('AWS SDK LOADED\\n'); });\n");
    const withHook = (e: Record<string, string>) => ({ ...e, NODE_OPTIONS: `--require ${hook}` });
    const fill = await cli([], withHook(env(path.join(tmp, 'c-nosdk'), { S3_TRANSPORT: 'lite' })));
    expect(fill.code, fill.stderr).toBe(0);
    expect(fill.stderr).not.toContain('AWS SDK LOADED');
    // The AWS SDK is the default transport.
    const sdkFill = await cli([], withHook(env(path.join(tmp, 'c-sdk'))));
    expect(sdkFill.code, sdkFill.stderr).toBe(0);
    expect(sdkFill.stderr).toContain('AWS SDK LOADED');
    // The same check sees the SDK where it is used.
    const pushed = await cli(['push', local, 's3://models/sd/sdk-check'], withHook(s3Env(s3.endpoint, path.join(tmp, 'unused'))));
    expect(pushed.code, pushed.stderr).toBe(0);
    expect(pushed.stderr).toContain('AWS SDK LOADED');
  });

  it('exits non-zero with a one-line reason', async () => {
    const cache = path.join(tmp, 'c2');
    const missing = await cli([], env(cache, { STORAGE_URI: 's3://models/nothing/here' }));
    expect(missing.code).toBe(1);
    expect(missing.stdout).toBe('');
    expect(lastLine(missing.stderr)).toBe('warmup: STORAGE_MISSING: no objects under s3://models/nothing/here/; check the bucket and prefix in STORAGE_URI');
    const noUri = await cli([], { ...env(cache), STORAGE_URI: '' });
    expect([noUri.code, lastLine(noUri.stderr)]).toEqual([2, 'warmup: CONFIG: STORAGE_URI is required for the warm-up Job (s3://bucket/prefix)']);
    // Before: the same line, and the warning naming the typo never came (the Job exited before its warnings).
    const typo = await cli([], { ...env(cache), STORAGE_URI: '', STORAGE_URL: 's3://models/sd/v1' });
    expect([typo.code, typo.stderr]).toEqual([2, 'warmup: CONFIG: STORAGE_URI is required for the warm-up Job (s3://bucket/prefix); STORAGE_URL is set: did you mean STORAGE_URI?\n']);
    proxy.faults = { deny: true };
    const refused = proxy.stats.requests;
    const denied = await cli([], env(cache));
    expect(denied.code).toBe(1);
    expect(lastLine(denied.stderr)).toMatch(/^warmup: STORAGE_DENIED: access denied to list s3:\/\/models\/sd\/v1\/ \(AccessDenied\)/);
    // The requests, before that line: the LIST, refused (not tried again).
    expect(proxy.stats.requests - refused).toBe(1);
    expect(denied.stderr.trim().split('\n').at(-2)).toBe('warmup: 1 S3 request(s) sent: 1 client_error');
    // No request sent, no such line.
    expect(noUri.stderr).not.toContain('S3 request');
  });

  it('a file whose ranges S3 never answers: exits 1 with STORAGE_STALL naming it and S3_STALL_TIMEOUT_S, not a missing object', async () => {
    let release!: () => void;
    proxy.faults = { hold: { keys: /\/unet\/model\.onnx_data/, release: new Promise<void>((r) => (release = r)) } };
    try {
      const r = await cli([], env(path.join(tmp, 'c-stall'), { S3_STALL_TIMEOUT_S: '0.5', S3_MAX_ATTEMPTS: '2' }));
      expect([r.code, r.stdout]).toEqual([1, '']);
      // Before: STORAGE_MISSING "cannot read (2 attempts) s3://models/sd/v1/unet/model.onnx_data: AbortError".
      expect(lastLine(r.stderr)).toBe('warmup: STORAGE_STALL: cannot read (2 attempts) s3://models/sd/v1/unet/model.onnx_data: no bytes received for 0.5 s '
        + '(S3_STALL_TIMEOUT_S); gave up after retries');
      // Its two tries cut (stalled), before the line; the other ranges answered, or stopped with the fill.
      const sent = /^warmup: (\d+) S3 request\(s\) sent: (?:(\d+) cancelled, )?(\d+) ok, (\d+) stalled$/.exec(r.stderr.trim().split('\n').at(-2) ?? '');
      expect(sent, r.stderr).not.toBeNull();
      expect(Number(sent![4])).toBeGreaterThanOrEqual(2);
      expect(Number(sent![1])).toBe(Number(sent![2] ?? 0) + Number(sent![3]) + Number(sent![4]));
    } finally {
      release();
    }
  });

  it('a committed entry that S3 cannot confirm (denied) fails the Job; the server would serve it as is', async () => {
    const cache = path.join(tmp, 'c-hit-check');
    const first = await cli([], env(cache));
    expect(first.code, first.stderr).toBe(0);
    proxy.faults = { deny: true };
    const denied = await cli([], env(cache));
    expect([denied.code, denied.stdout]).toEqual([1, '']);
    expect(lastLine(denied.stderr)).toMatch(/^warmup: STORAGE_DENIED: access denied to list s3:\/\/models\/sd\/v1\/ \(AccessDenied\)/);
    proxy.faults = {};
    const again = await cli([], env(cache));
    expect([again.code, JSON.parse(again.stdout).fromCache]).toEqual([0, true]);
  });

  it('push: a cache entry pushed elsewhere serves (its bookkeeping files stay behind); an empty folder, an unfinished download and a missing bucket fail by name', async () => {
    const first = await cli([], env(path.join(tmp, 'c-push')));
    expect(first.code, first.stderr).toBe(0);
    const entry = JSON.parse(first.stdout).modelDir as string;
    const pushEnv = s3Env(s3.endpoint, path.join(tmp, 'unused'));
    const before = proxy.stats.requests;
    const copied = await cli(['push', entry, 's3://models/sd/copy'], s3Env(proxy.endpoint, path.join(tmp, 'unused')));
    expect(copied.code, copied.stderr).toBe(0);
    // Its requests (the LIST, one PUT a file), as the proxy received them.
    expect(JSON.parse(lastLine(copied.stdout))).toEqual({ uri: 's3://models/sd/copy/', bytes: TOTAL, files: 6, seconds: expect.any(Number), s3Requests: { ok: proxy.stats.requests - before } });
    expect(proxy.stats.requests - before).toBeGreaterThanOrEqual(7);
    const fromCopy = await cli([], s3Env(s3.endpoint, path.join(tmp, 'c-copy'), { STORAGE_URI: 's3://models/sd/copy' }));
    expect(fromCopy.code, fromCopy.stderr).toBe(0);
    await expectModel(JSON.parse(fromCopy.stdout).modelDir);

    const empty = path.join(tmp, 'empty-export');
    await fsp.mkdir(empty, { recursive: true });
    const none = await cli(['push', empty, 's3://models/sd/empty'], pushEnv);
    expect([none.code, lastLine(none.stderr)]).toEqual([1, `warmup: STORAGE_MISSING: ${empty} holds no files to upload`]);
    await fsp.writeFile(path.join(empty, 'model_index.json'), '{}');
    await fsp.writeFile(path.join(empty, 'unet.partial'), '');
    const unfinished = await cli(['push', empty, 's3://models/sd/empty'], pushEnv);
    expect([unfinished.code, lastLine(unfinished.stderr)]).toEqual([1, `warmup: STORAGE_MISSING: ${empty} holds an unfinished download (unet.partial); push a complete export`]);
    const noBucket = await cli(['push', local, 's3://no-such-bucket/sd'], pushEnv);
    expect([noBucket.code, lastLine(noBucket.stderr)]).toEqual([1, 'warmup: STORAGE_MISSING: cannot list: bucket "no-such-bucket" does not exist (NoSuchBucket)']);
  });

  it('push of an entry whose commit a fill set aside (.complete.held.json, left by a kill): uploads the model alone, and the copy serves', async () => {
    const first = await cli([], env(path.join(tmp, 'c-held')));
    expect(first.code, first.stderr).toBe(0);
    const entry = JSON.parse(first.stdout).modelDir as string;
    // What a fill killed while it read the entry's leases leaves: the manifest set aside.
    await uncommit(entry);
    expect(readdirSync(entry)).toContain(HELD);
    const pushed = await cli(['push', entry, 's3://models/sd/held'], s3Env(s3.endpoint, path.join(tmp, 'unused')));
    expect(pushed.code, pushed.stderr).toBe(0);
    expect(JSON.parse(lastLine(pushed.stdout))).toMatchObject({ bytes: TOTAL, files: 6 });
    expect(pushed.stderr).toContain(`push: skipped 1 cache bookkeeping file(s) (${MANIFEST}, ${JOURNAL}, ${HELD})`);
    const listed = ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'models', Prefix: 'sd/held/' }))).Contents ?? []).map((o) => o.Key!.slice('sd/held/'.length)).sort();
    expect(listed).toEqual(Object.keys(model).sort());
    const fromCopy = await cli([], s3Env(s3.endpoint, path.join(tmp, 'c-held-copy'), { STORAGE_URI: 's3://models/sd/held' }));
    expect(fromCopy.code, fromCopy.stderr).toBe(0);
    await expectModel(JSON.parse(fromCopy.stdout).modelDir);
  });

  it('push over a prefix holding objects the export lacks: refused by name; --replace deletes them after the upload, keeping loras/', async () => {
    const pushEnv = s3Env(s3.endpoint, path.join(tmp, 'unused'));
    const keys = async () => ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'models', Prefix: 'sd/re/' }))).Contents ?? []).map((o) => o.Key!.slice('sd/re/'.length)).sort();
    expect((await cli(['push', local, 's3://models/sd/re'], pushEnv)).code).toBe(0);
    // What an earlier push of another export left: a VAE encoder this one lacks, and an adapter added beside the model.
    for (const k of ['vae_encoder/model.onnx', 'vae_encoder/config.json', 'loras/style.safetensors']) {
      await s3.client.send(new PutObjectCommand({ Bucket: 'models', Key: `sd/re/${k}`, Body: detBytes(1000, 9) }));
    }
    const refused = await cli(['push', local, 's3://models/sd/re'], pushEnv);
    expect([refused.code, lastLine(refused.stderr)]).toEqual([1, 'warmup: INVALID_INPUT: s3://models/sd/re/ already holds 2 object(s) this export does not have '
      + '(vae_encoder/config.json, vae_encoder/model.onnx); a server reads every object under the prefix and would load them with this export: '
      + 'push to an empty prefix, or add --replace to delete them once the upload is done']);
    expect(await keys()).toContain('vae_encoder/model.onnx');
    const replaced = await cli(['push', local, 's3://models/sd/re', '--replace'], pushEnv);
    expect(replaced.code, replaced.stderr).toBe(0);
    expect(JSON.parse(lastLine(replaced.stdout))).toMatchObject({ files: 6, deleted: 2 });
    expect(replaced.stderr).toContain('push: deleted 2 object(s) the export does not have');
    expect(await keys()).toEqual([...Object.keys(model), 'loras/style.safetensors'].sort());
    const fill = await cli([], s3Env(s3.endpoint, path.join(tmp, 'c-re'), { STORAGE_URI: 's3://models/sd/re' }));
    expect(fill.code, fill.stderr).toBe(0);
    await expectModel(JSON.parse(fill.stdout).modelDir);
    const odd = await cli(['push', local, 's3://models/sd/re', '--delete'], pushEnv);
    expect([odd.code, odd.stderr.split('\n')[0]]).toEqual([2, 'warmup: push: unknown option "--delete"']);
    // Every one named: the first alone was.
    const odds = await cli(['push', local, 's3://models/sd/re', '--delete', '--force'], pushEnv);
    expect([odds.code, odds.stderr.split('\n')[0]]).toEqual([2, 'warmup: push: unknown options "--delete", "--force"']);
    const extra = await cli(['push', local, 's3://models/sd/re', 'sd/v2', 'sd/v3'], pushEnv);
    expect([extra.code, extra.stderr.split('\n')[0]]).toEqual([2, 'warmup: push takes LOCAL_DIR and s3://bucket/prefix, got also "sd/v2", "sd/v3"']);
  });

  it('push to a malformed target: a usage error (exit 2) that names the argument, not STORAGE_URI, and never echoes keys', async () => {
    const pushEnv = s3Env(s3.endpoint, path.join(tmp, 'unused'));
    for (const [target, msg] of [
      ['s3://', 'push target: "s3://" has no valid bucket name; use s3://bucket/prefix'],
      ['s3://models/sd/../v1', `push target: "s3://models/sd/../v1" has an empty, '.' or '..' path segment`],
      ['s3://AKIAEXAMPLE:not-for-logs@models/sd', 'push target: "s3://***@models/sd" carries credentials; use s3://bucket/prefix and give the keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the storage Secret)'],
      ['/mnt/models', 'push target must be s3://bucket/prefix, got "/mnt/models"'],
    ]) {
      const r = await cli(['push', local, target!], pushEnv);
      expect([r.code, r.stderr.split('\n')[0], r.stdout], target).toEqual([2, `warmup: ${msg}`, '']);
      expect(r.stderr).not.toMatch(/AKIAEXAMPLE|not-for-logs/);
    }
  });

  it('push follows symlinks: a folder linked under a second name is uploaded under both, a link to a folder above it is no loop', async () => {
    const dir = path.join(tmp, 'linked-export');
    await fsp.cp(local, dir, { recursive: true });
    // Links sort before (`a_text_encoder`) and after (`vae_encoder`) the folder they name; readdir order is the file system's.
    await fsp.symlink('text_encoder', path.join(dir, 'a_text_encoder'));
    await fsp.symlink('vae_decoder', path.join(dir, 'vae_encoder'));
    await fsp.symlink('..', path.join(dir, 'unet', 'up'));
    const r = await cli(['push', dir, 's3://models/sd/linked'], s3Env(s3.endpoint, path.join(tmp, 'unused')));
    expect(r.code, r.stderr).toBe(0);
    const listed = ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'models', Prefix: 'sd/linked/' }))).Contents ?? []).map((o) => o.Key!.slice('sd/linked/'.length)).sort();
    expect(listed).toEqual([...Object.keys(model), 'a_text_encoder/model.onnx', 'vae_encoder/model.onnx'].sort());
    const fill = await cli([], s3Env(s3.endpoint, path.join(tmp, 'c-linked'), { STORAGE_URI: 's3://models/sd/linked' }));
    expect(fill.code, fill.stderr).toBe(0);
    await expectModel(JSON.parse(fill.stdout).modelDir);
  });

  /**
   * Pushes a copy of the model to `s3://models/sd/<name>` whose UNet data (three 5 MiB parts) is rewritten while its
   * first part is held at the proxy (`faults` beside the hold); the push's result, and the keys left under the prefix.
   */
  const pushChanging = async (name: string, faults: Faults = {}) => {
    const dir = path.join(tmp, `${name}-export`);
    await fsp.cp(local, dir, { recursive: true });
    const big = path.join(dir, 'unet/model.onnx_data');
    await fsp.writeFile(big, detBytes(11 << 20, 21));
    let release!: () => void;
    const held = proxy.stats.held;
    // S3_MAX_CONCURRENCY=1: one part read and sent at a time, so the rest of the file is read after the first part.
    proxy.faults = { ...faults, hold: { method: 'PUT', keys: new RegExp(`/sd/${name}/unet/model\\.onnx_data\\?.*partNumber=1(&|$)`), release: new Promise<void>((r) => (release = r)) } };
    const run = cli(['push', dir, `s3://models/sd/${name}`], s3Env(proxy.endpoint, path.join(tmp, 'unused'), { S3_MAX_CONCURRENCY: '1' }));
    await until(() => proxy.stats.held > held, 20_000, 20);
    await fsp.writeFile(big, detBytes(11 << 20, 22)); // the export writes its next version over it
    release();
    const r = await run;
    const keys = ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'models', Prefix: `sd/${name}/` }))).Contents ?? []).map((o) => o.Key!);
    return { r, keys };
  };

  it('push of a file rewritten while it uploads: fails naming it and deletes the object, which would mix both versions', async () => {
    const { r, keys } = await pushChanging('changing');
    expect([r.code, lastLine(r.stderr)]).toEqual([1, 'warmup: INVALID_INPUT: unet/model.onnx_data changed while it was uploaded (is the export still being written?); '
      + 'its object was deleted; push again once the folder is final']);
    expect(r.stdout).toBe('');
    expect(keys).not.toContain('sd/changing/unet/model.onnx_data');
  });

  it('that delete answered 503 once is tried again, as the push\'s other requests are: the object is deleted', async () => {
    const faults = { failDeletes: { count: 1, status: 503, code: 'ServiceUnavailable' } };
    const { r, keys } = await pushChanging('changing-503', faults);
    expect(faults.failDeletes.count).toBe(0);
    // Before: its one try got the 503, and the object was left ("delete s3://…, which may mix both versions").
    expect([r.code, lastLine(r.stderr)]).toEqual([1, 'warmup: INVALID_INPUT: unet/model.onnx_data changed while it was uploaded (is the export still being written?); '
      + 'its object was deleted; push again once the folder is final']);
    expect(keys).not.toContain('sd/changing-503/unet/model.onnx_data');
  }, 60_000);

  it('that delete refused on every try: the log names the key left behind and why', async () => {
    const faults = { failDeletes: { count: 1_000, status: 500, code: 'InternalError' } };
    const { r, keys } = await pushChanging('changing-500', faults);
    // Its five tries, no more.
    expect(1_000 - faults.failDeletes.count).toBe(5);
    const where = 's3://models/sd/changing-500/unet/model.onnx_data';
    const why = `cannot delete ${where}: InternalError (gave up after retries)`;
    expect(r.stderr).toContain(`push: unet/model.onnx_data changed while it was uploaded, and its object ${where}, which may mix both versions, is left behind: ${why}\n`);
    expect([r.code, lastLine(r.stderr)]).toEqual([1, 'warmup: INVALID_INPUT: unet/model.onnx_data changed while it was uploaded (is the export still being written?); '
      + `its object ${where}, which may mix both versions, could not be deleted and is left behind (${why}): delete it before a server reads the prefix; `
      + 'push again once the folder is final']);
    expect(keys).toContain('sd/changing-500/unet/model.onnx_data');
  }, 60_000);

  it('a STORAGE_URI with keys in it (s3://KEY:SECRET@bucket/…) is refused without echoing them', async () => {
    const secret = 'wJalrXUtnFEMI-K7MDENG-not-for-logs';
    const r = await cli([], env(path.join(tmp, 'c-creds'), { STORAGE_URI: `s3://AKIAEXAMPLE:${secret}@models/sd/v1`, LOG_LEVEL: 'trace' }));
    expect(r.code).toBe(1);
    expect(lastLine(r.stderr)).toBe('warmup: INVALID_INPUT: STORAGE_URI "s3://***@models/sd/v1" carries credentials; ' +
      'use s3://bucket/prefix and give the keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the storage Secret)');
    expect(r.stderr + r.stdout).not.toContain(secret);
    expect(r.stderr + r.stdout).not.toContain('AKIAEXAMPLE');
  });

  it('a pod clock 20 minutes off: S3 refuses the request time, the offset is corrected from its Date, the fill succeeds (either transport)', async () => {
    const skew = path.resolve('test/helpers/skew-clock.cjs');
    for (const [client, extra] of [['s3-lite', { S3_TRANSPORT: 'lite' }], ['AWS SDK', {}]] as const) {
      for (const minutes of [20, -20]) {
        const sdkGets = proxy.stats.sdkGets;
        const refused = proxy.stats.refusals.RequestTimeTooSkewed ?? 0;
        const r = await cli([], { ...env(path.join(tmp, `skew-${client}-${minutes}`)), ...extra, NODE_OPTIONS: `--require ${skew}`, TEST_CLOCK_SKEW_MS: String(minutes * 60_000), LOG_LEVEL: 'warn' });
        expect(r.code, `${client} ${minutes} min: ${r.stderr}`).toBe(0);
        expect(JSON.parse(r.stdout)).toMatchObject({ bytes: TOTAL, files: 6, fromCache: false });
        await expectModel(JSON.parse(r.stdout).modelDir);
        expect(proxy.stats.sdkGets - sdkGets > 0).toBe(client === 'AWS SDK');
        expect(proxy.stats.refusals.RequestTimeTooSkewed! - refused).toBe(1); // the first listing; later requests carry S3's time
      }
    }
  });

  it('two concurrent warm-ups on one cache dir: one download, both succeed', async () => {
    const cache = path.join(tmp, 'c3');
    proxy.faults = { bytesPerSecond: 1_000_000 };
    const before = proxy.stats.bodyBytes;
    const [a, b] = await Promise.all([cli([], env(cache)), cli([], env(cache))]);
    expect([a.code, b.code], a.stderr + b.stderr).toEqual([0, 0]);
    const ja = JSON.parse(a.stdout);
    const jb = JSON.parse(b.stdout);
    expect(ja.modelDir).toBe(jb.modelDir);
    expect([ja.fromCache, jb.fromCache].sort()).toEqual([false, true]);
    expect(proxy.stats.bodyBytes - before).toBe(TOTAL);
    await expectModel(ja.modelDir);
  });

  it('killed mid-download (SIGKILL): never serves a partial model, the next run resumes', async () => {
    const cache = path.join(tmp, 'c4');
    proxy.faults = { bytesPerSecond: 200_000 };
    // Killed once the journal records at least 600 KB that a resume keeps: whole files, and the spans of partial ones.
    const journaled = () => {
      try {
        const dir = readdirSync(cache).find((n) => !n.endsWith('.lock'));
        const files = replay(readFileSync(path.join(cache, dir!, JOURNAL), 'utf8'));
        return [...files.values()].reduce((n, f) => n + (f.complete ? f.size : spanBytes(f.spans)), 0);
      } catch {
        return 0;
      }
    };
    const killed = await cli([], env(cache), (kill) => {
      void until(() => journaled() >= 600_000, 20_000, 20).then(() => kill('SIGKILL'));
    });
    await settledCount(() => proxy.stats.bodyBytes);
    expect(killed.signal).toBe('SIGKILL');
    const entries = (await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'));
    expect(entries).toHaveLength(1);
    const entry = path.join(cache, entries[0]!);
    expect(existsSync(path.join(entry, '.complete.json'))).toBe(false);
    expect(existsSync(path.join(entry, 'unet/model.onnx_data'))).toBe(false);
    proxy.faults = {};
    // The second run's own requests: the proxy still reads to the end the ranges the killed process had asked for,
    // sending them to its closed sockets (a loaded run counted 200 KB of those after the count had settled).
    const first = proxy.stats.requests;
    const kept = journaled();
    const r = await cli([], env(cache));
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ fromCache: false, bytes: TOTAL });
    await expectModel(entry);
    // The second run fetched at most what the journal had recorded as not written: every recorded range was kept (and
    // a write the kill cut off from its record too, where its bytes landed).
    expect(kept).toBeGreaterThanOrEqual(600_000);
    const fetched = proxy.stats.bytesByRequest.slice(first).reduce((n, b) => n + (b ?? 0), 0);
    expect(fetched).toBeGreaterThan(0);
    expect(fetched).toBeLessThanOrEqual(TOTAL - kept);
  });

  it.each([['SIGTERM', 143], ['SIGINT', 130]] as const)('%s mid-download: exits %i, releases the lock, leaves the entry uncommitted', async (sig, status) => {
    const cache = path.join(tmp, `c5-${sig}`);
    proxy.faults = { bytesPerSecond: 500_000 };
    const before = proxy.stats.bodyBytes;
    const r = await cli([], env(cache), (kill) => {
      void until(() => proxy.stats.bodyBytes - before > 500_000, 20_000, 20).then(() => kill(sig));
    });
    expect(r.code).toBe(status);
    expect(lastLine(r.stderr)).toBe('warmup: CANCELLED: stopped by signal');
    const names = await fsp.readdir(cache);
    expect(names.filter((n) => n.endsWith('.lock'))).toEqual([]);
    expect(existsSync(path.join(cache, names[0]!, '.complete.json'))).toBe(false);
  });
});
