/**
 * Throttling (503 SlowDown) during a fill: the fault proxy answers every GET (or LIST) of s3rver's 503 with S3's XML
 * `<Code>SlowDown</Code>` for a while, or for ever. Throttled answers cost no S3_MAX_ATTEMPTS: the fill cuts its ranges in
 * flight and backs off, rides out a storm and gets its files byte for byte, and gives up on a storm that never ends
 * once throttled for S3_THROTTLE_TIMEOUT_S, saying so. Throttle's own rules (halving per round, giving back, the cap on
 * a wait whatever Retry-After says, the deadline) are checked on their own below, with a clock of the test's.
 */
import { promises as fsp, existsSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createLogger, silentLogger } from '../src/log.js';
import { resolveModel } from '../src/storage/fetch.js';
import { retryAfterMs, throttled } from '../src/storage/s3-errors.js';
import { LiteHttpError } from '../src/storage/s3-lite.js';
import { Throttle, ThrottleLog } from '../src/storage/throttle.js';
import { until } from './helpers/server.js';
import { cleanUpS3, detBytes, evenParts, type FaultProxy, multipartEtag, rejection, type S3Server, startModelStore, testConfig } from './helpers/s3.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;

// 10 ranges of 64 KiB and a bit, and small files: more ranges than the 4 in flight, so the limit has room to come back.
const files: Record<string, Buffer> = {
  'unet/model.onnx_data': detBytes(10 * 65_536 + 777, 31),
  'unet/model.onnx': detBytes(5_000, 32),
  'model_index.json': Buffer.from('{"_class_name":"StableDiffusionPipeline"}'),
};

beforeAll(async () => {
  ({ s3, proxy, tmp } = await startModelStore('storage-throttle-', files));
});

cleanUpS3(() => ({ s3, proxy, tmp }));

/** A logger whose lines the test reads. */
function recorder() {
  const lines: Array<Record<string, unknown>> = [];
  return { log: createLogger('info', 'test', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) }), lines };
}

async function expectSame(dir: string): Promise<void> {
  for (const [rel, body] of Object.entries(files)) expect((await fsp.readFile(path.join(dir, rel))).equals(body), rel).toBe(true);
}

const committed = async (cache: string) => (await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock')).some((e) => existsSync(path.join(cache, e, '.complete.json')));

describe.each(['lite', 'sdk'] as const)('a fill throttled with 503 SlowDown (S3_TRANSPORT=%s)', (client) => {
  // S3_MAX_ATTEMPTS=2: before, two SlowDowns in a row for one range failed the fill (about 0.3 s into a storm).
  const cfgFor = (cache: string, throttleS: number) => testConfig(proxy.endpoint, cache, {
    S3_TRANSPORT: client, S3_PART_SIZE: '65536', S3_MAX_CONCURRENCY: '4', S3_MAX_ATTEMPTS: '2', S3_THROTTLE_TIMEOUT_S: String(throttleS),
  });

  it('rides out a storm of GETs (with MinIO\'s Retry-After: 120): files byte for byte, ranges in flight cut and given back, no wait past the cap', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const { log, lines } = recorder();
    const before = proxy.stats.slowDowns;
    proxy.faults = { slowDown: { forMs: 1_500, retryAfter: '120' } };
    // S3_THROTTLE_TIMEOUT_S=4: no wait longer than a quarter of it, 1 s.
    const r = await resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 4), log });
    await expectSame(r.dir);
    expect(r.fromCache).toBe(false);
    // The first four ranges, at least, were answered SlowDown; before, the fill failed STORAGE_TRANSIENT "SlowDown (gave up after retries)".
    expect(proxy.stats.slowDowns - before).toBeGreaterThanOrEqual(4);
    const throttledLines = lines.filter((l) => /^S3 is (still )?throttling the download/.test(String(l.msg)));
    expect(throttledLines[0]).toMatchObject({
      level: 'warn', code: 'SlowDown', maxConcurrency: 4, retryAfterS: 120,
      msg: 'S3 is throttling the download (SlowDown): 2 of 4 ranges in flight, backing off; the fill fails once throttled for 4 s (S3_THROTTLE_TIMEOUT_S) without receiving a byte',
    });
    for (const l of throttledLines) expect(l.waitMs as number).toBeLessThanOrEqual(1_000);
    expect(lines.find((l) => l.msg === 'S3 no longer throttles the download: all 4 ranges in flight again')).toMatchObject({ level: 'info', ranges: 4 });
    // No line per throttled range, and nothing secret in any.
    expect(lines.filter((l) => l.msg === 'range failed; resuming')).toEqual([]);
    expect(JSON.stringify(lines)).not.toMatch(/S3RVER|echoed-secret/);
  });

  it('a multipart upload\'s part-size HEADs, answered 503 in the storm too, are waited out: the file is still checked against its ETag', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const { log, lines } = recorder();
    const big = files['unet/model.onnx_data']!;
    const part = 3 * 65_536;
    const heads = proxy.stats.partHeads;
    proxy.faults = {
      objects: { 'sd/unet/model.onnx_data': { etag: multipartEtag(big, part), partSizes: evenParts(big.length, part) } },
      slowDown: { forMs: 1_500, heads: true },
    };
    const r = await resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 4), log });
    await expectSame(r.dir);
    // Before: both tries of the HEAD of part 1 answered 503 at once, and the file was served unchecked ("the store did
    // not answer a HEAD of its first part").
    expect(lines.find((l) => l.msg === 'model cached')).toMatchObject({ contentChecked: 3 });
    expect(lines.find((l) => l.msg === 'model cached')!.contentNotChecked).toBeUndefined();
    expect(proxy.stats.partHeads - heads).toBe(2);
  });

  it('a throttling code the SDKs know, sent with a 400 (ThrottledException, RequestLimitExceeded), is waited out as a SlowDown is, not a refusal', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const { log, lines } = recorder();
    // More than S3_MAX_ATTEMPTS=2 in a row: only throttling gets past them.
    proxy.faults = { failGets: { count: 6, status: 400, code: 'ThrottledException' } };
    const r = await resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 4), log });
    await expectSame(r.dir);
    // Before: STORAGE_UNSUPPORTED "cannot read … ThrottledException" at the first answer, as for any other 400.
    expect(lines.find((l) => /^S3 is throttling the download/.test(String(l.msg)))).toMatchObject({ level: 'warn', code: 'ThrottledException' });
    proxy.faults = { failLists: { count: 3, status: 400, code: 'RequestLimitExceeded' } };
    const listed = await resolveModel('s3://models/sd/', { cfg: cfgFor(await fsp.mkdtemp(path.join(tmp, 'cache-')), 4), log });
    await expectSame(listed.dir);
    // The store's answer whoever signs: the SDK-free reader does not start over through the SDK for it (a 400 of
    // another code might be its signing's).
    expect(lines.filter((l) => /through the AWS SDK$/.test(String(l.msg)))).toEqual([]);
  });

  it('a storm that never ends fails once throttled for S3_THROTTLE_TIMEOUT_S, STORAGE_TRANSIENT naming throttling and what to do; nothing committed', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    proxy.faults = { slowDown: {} };
    const t0 = Date.now();
    const err = await rejection(resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 2), log: silentLogger() }));
    const took = Date.now() - t0;
    expect(err.code).toBe('STORAGE_TRANSIENT');
    expect(err.message).toMatch(new RegExp('^cannot read s3://models/sd/[^ ]+: S3 kept throttling the download \\(SlowDown, \\d+ throttled answers\\) for 2 s '
      + '\\(S3_THROTTLE_TIMEOUT_S\\) without a byte received, with the ranges in flight cut from 4 to 1; the store is asked for more than it serves: '
      + 'start fewer pods at once \\(a slower rollout or scale-up\\), lower S3_MAX_CONCURRENCY, or raise S3_THROTTLE_TIMEOUT_S to wait longer '
      + '\\(on MinIO or Ceph, check the server\'s load and its request limits\\)$'));
    expect(err.message).not.toMatch(/S3RVER|echoed-secret/);
    // Not before the bound: two SlowDowns per range no longer end it. (After it: one wait of at most 0.5 s and one answer.)
    expect(took).toBeGreaterThanOrEqual(2_000);
    expect(await committed(cache)).toBe(false);
  }, 20_000);

  it('the fill\'s LIST rides out a storm too, and one that never ends fails naming throttling', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const lists = proxy.stats.lists;
    proxy.faults = { slowDown: { forMs: 1_500, lists: true } };
    const r = await resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 4), log: silentLogger() });
    await expectSame(r.dir);
    // Before: S3_MAX_ATTEMPTS=2 tries of the LIST, then STORAGE_TRANSIENT "cannot list (2 attempts) …: SlowDown".
    expect(proxy.stats.lists - lists).toBeGreaterThan(2);

    proxy.faults = { slowDown: { lists: true } };
    const t0 = Date.now();
    const err = await rejection(resolveModel('s3://models/sd/', { cfg: cfgFor(await fsp.mkdtemp(path.join(tmp, 'cache-')), 2), log: silentLogger() }));
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', expect.stringMatching(new RegExp('^cannot list s3://models/sd/: S3 kept throttling the listing '
      + '\\(SlowDown, \\d+ throttled answers\\) for 2 s \\(S3_THROTTLE_TIMEOUT_S\\) without a byte received; the store is asked for more than it serves: '))]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2_000);
  }, 20_000);

  it('the LIST\'s throttled spell ends, as the ranges\' does, at an answer that is not throttled (a 500): the give-up clock starts over', async () => {
    const { log, lines } = recorder();
    // Two spells of two SlowDowns each, the 500 between them answered 2.5 s after it was asked. S3_THROTTLE_TIMEOUT_S=1.5:
    // a spell lasts one wait, at most a quarter of it (0.375 s), so a pause of the process of up to ~1.1 s does not
    // make it give up; the spells together last over 2.5 s however the waits fall, so a clock that ran through the 500
    // gives up at the next spell's first SlowDown, 1 s past the bound at least. Counted in answers, not timed: a pause
    // can only lengthen the delay.
    proxy.faults = { listScript: [{ answer: 'slowDown', count: 2 }, { answer: { status: 500, code: 'InternalError' }, delayMs: 2_500 }, { answer: 'slowDown', count: 2 }] };
    const r = await resolveModel('s3://models/sd/', { cfg: cfgFor(await fsp.mkdtemp(path.join(tmp, 'cache-')), 1.5), log });
    await expectSame(r.dir);
    // Before: the clock ran from the first SlowDown, the 500 between included, and the fill failed "S3 kept throttling
    // the listing"; nor did the 500 end the spell's growing waits.
    expect(lines.filter((l) => /throttl/.test(String(l.msg))).map((l) => l.msg)).toEqual([
      'S3 is throttling the listing (SlowDown): backing off; the fill fails once throttled for 1.5 s (S3_THROTTLE_TIMEOUT_S) without receiving a byte',
      'S3 no longer throttles the listing',
      'S3 is throttling the listing (SlowDown): backing off; the fill fails once throttled for 1.5 s (S3_THROTTLE_TIMEOUT_S) without receiving a byte',
      'S3 no longer throttles the listing',
    ]);
  }, 20_000);

  it('a LIST stalled after throttled tries names its attempt among those S3_MAX_ATTEMPTS counts, never past them', async () => {
    proxy.faults = { listScript: [{ answer: 'slowDown', count: 2 }, { answer: 'stall', count: 2 }] };
    const cfg = testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'cache-')), {
      S3_TRANSPORT: client, S3_MAX_ATTEMPTS: '2', S3_THROTTLE_TIMEOUT_S: '4', S3_STALL_TIMEOUT_S: '1',
    });
    const err = await rejection(resolveModel('s3://models/sd/', { cfg, log: silentLogger() }));
    // Before: "on attempt 4 of 2", and "on 2 of its 4 tries, the last included": the throttled tries were counted.
    expect([err.code, err.message, (err.cause as Error).message]).toEqual(['STORAGE_TRANSIENT',
      'cannot list s3://models/sd/: S3 sent nothing for 1 s (S3_STALL_TIMEOUT_S) on each of its 2 tries; check the link to S3, or raise S3_STALL_TIMEOUT_S for a store slow to answer a LIST',
      'ListObjectsV2 stalled: nothing sent or received for 1 s (S3_STALL_TIMEOUT_S) on attempt 2 of 2']);
  }, 20_000);

  it('a content check\'s HEAD throttled for S3_THROTTLE_TIMEOUT_S fails the fill naming throttling, as a range does: the file is not served unchecked', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const big = files['unet/model.onnx_data']!;
    const part = 3 * 65_536;
    // Every HEAD answered a bare 503 for good; the GETs are served, so the bytes all arrive and only the HEADs wait.
    proxy.faults = {
      objects: { 'sd/unet/model.onnx_data': { etag: multipartEtag(big, part), partSizes: evenParts(big.length, part) } },
      slowDown: { heads: true, gets: false },
    };
    const err = await rejection(resolveModel('s3://models/sd/', { cfg: cfgFor(cache, 2), log: silentLogger() }));
    // Before: once throttled that long, the HEAD's second try went at once and the file was committed unchecked ("the
    // store did not answer a HEAD of its first part").
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', expect.stringMatching(new RegExp('^cannot read s3://models/sd/unet/model\\.onnx_data: '
      + 'S3 kept throttling the download \\([^,]+, \\d+ throttled answers\\) for 2 s \\(S3_THROTTLE_TIMEOUT_S\\) without a byte received'))]);
    expect(await committed(cache)).toBe(false);
  }, 20_000);

  it('a cache hit\'s ETag check waits a short storm out within its budget and sees the change; one that outlasts it serves the entry as it is, saying S3 throttled it', async () => {
    const uri = `s3://models/check-${client}/`;
    await s3.put('models', `check-${client}/a.bin`, detBytes(5_000, 61));
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    await resolveModel(uri, { cfg: cfgFor(cache, 4), log: silentLogger() });
    const changed = detBytes(5_000, 62);
    await s3.put('models', `check-${client}/a.bin`, changed);
    const { log, lines } = recorder();
    let counted = 0;
    const checkWatch = { throttled: () => void counted++ };
    const before = proxy.stats.slowDowns;
    proxy.faults = { slowDown: { forMs: 1_500, lists: true } };
    const r = await resolveModel(uri, { cfg: cfgFor(cache, 4), log, hitCheckTimeoutMs: 4_000, checkWatch });
    // Before: its two tries were throttled within 0.2 s and the old entry was served ("S3 not reachable for the ETag check").
    expect(r.fromCache).toBe(false);
    expect(r.stale).toBeUndefined();
    expect((await fsp.readFile(path.join(r.dir, 'a.bin'))).equals(changed)).toBe(true);
    expect(proxy.stats.slowDowns - before).toBeGreaterThanOrEqual(2);
    expect(counted).toBe(proxy.stats.slowDowns - before);
    expect(lines.find((l) => /throttling the cache check/.test(String(l.msg)))).toMatchObject({ level: 'warn', code: 'SlowDown',
      msg: 'S3 is throttling the cache check (SlowDown): backing off; the committed cache entry is served as it is once throttled for 4 s (the check\'s own bound) without an answer' });

    await s3.put('models', `check-${client}/a.bin`, detBytes(5_000, 63));
    proxy.faults = { slowDown: { lists: true } };
    const t0 = Date.now();
    const stale = await resolveModel(uri, { cfg: cfgFor(cache, 4), log, hitCheckTimeoutMs: 1_000, checkWatch });
    expect(stale).toMatchObject({ fromCache: true, stale: true });
    expect((await fsp.readFile(path.join(stale.dir, 'a.bin'))).equals(changed)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1_000);
    expect(lines.find((l) => /ETag check/.test(String(l.msg)))).toMatchObject({ level: 'warn', msg: 'S3 kept throttling the ETag check; serving the committed cache entry as is',
      reason: expect.stringMatching(new RegExp(`^cannot list s3://models/check-${client}/: S3 kept throttling the cache check \\(SlowDown, \\d+ throttled answers\\) for 1 s `
        + '\\(the check\'s own bound\\) without an answer; the store is asked for more than it serves: start fewer pods at once')) });
  }, 20_000);
});

describe('Throttle', () => {
  const make = (concurrency: number, timeoutMs = 300_000) => {
    const clock = { now: 0 };
    const t = new Throttle({ concurrency, timeoutMs, log: silentLogger(), now: () => clock.now, random: () => 1 });
    return { t, clock };
  };
  const signal = new AbortController().signal;

  it('halves the ranges in flight once per round, gives one back per answer of the current round, and queues the rest in order', async () => {
    const { t } = make(8);
    const slots = await Promise.all(Array.from({ length: 8 }, () => t.enter(signal)));
    // Eight answered SlowDown together: one round, one cut.
    for (const s of slots) t.throttled(s, 'SlowDown');
    expect([t.limit, t.round, t.level]).toEqual([4, 1, 1]);
    // While eight places are held, a ninth waits; it goes once five are given back (four in flight then).
    let ninth = false;
    const waiting = t.enter(signal).then((s) => ((ninth = true), s));
    for (const s of slots.slice(0, 4)) s.release();
    await Promise.resolve();
    expect(ninth).toBe(false);
    slots[4]!.release();
    const s9 = await waiting;
    expect(t.taken).toBe(4);
    // Its round is the new one: throttled again, another cut.
    t.throttled(s9, 'SlowDown');
    expect([t.limit, t.level]).toEqual([2, 2]);
    // An answer of an earlier round says nothing of the limit now.
    t.answered(slots[5]!);
    expect(t.limit).toBe(2);
    const s10 = await (s9.release(), slots[5]!.release(), slots[6]!.release(), slots[7]!.release(), t.enter(signal));
    t.answered(s10);
    t.answered(s10);
    expect([t.limit, t.level]).toEqual([4, 0]);
    for (let i = 0; i < 10; i++) t.answered(s10);
    expect(t.limit).toBe(8);
    expect(t.lowest).toBe(2);
  });

  it('never goes below one range; a waiter whose fill stops is taken off the queue', async () => {
    const { t } = make(2);
    const a = await t.enter(signal);
    for (let i = 0; i < 5; i++) t.throttled({ round: t.round, release: () => undefined }, 'SlowDown');
    expect(t.limit).toBe(1);
    const stop = new AbortController();
    const waiting = t.enter(stop.signal);
    stop.abort(new Error('stopped'));
    await expect(waiting).rejects.toThrow('stopped');
    a.release();
    expect(t.taken).toBe(0);
  });

  it('waits grow with the rounds throttled in a row up to 20 s; Retry-After lengthens one by 5 s at most and never past the cap', () => {
    // random() = 1: each wait is its full-jitter bound.
    const { t } = make(24);
    const waits = Array.from({ length: 8 }, () => t.throttled({ round: t.round, release: () => undefined }, 'SlowDown'));
    expect(waits).toEqual([1_000, 2_000, 4_000, 8_000, 16_000, 20_000, 20_000, 20_000]);
    const { t: m } = make(24);
    // MinIO's fixed Retry-After: 120 s.
    expect(m.throttled({ round: m.round, release: () => undefined }, 'SlowDown', 120_000)).toBe(6_000);
    expect(m.throttled({ round: m.round, release: () => undefined }, 'SlowDown', 1_500)).toBe(2_000);
    for (let i = 0; i < 6; i++) m.throttled({ round: m.round, release: () => undefined }, 'SlowDown');
    expect(m.throttled({ round: m.round, release: () => undefined }, 'SlowDown', 120_000)).toBe(20_000);
    // A short S3_THROTTLE_TIMEOUT_S caps every wait at a quarter of it.
    const { t: short } = make(4, 2_000);
    expect(short.throttled({ round: short.round, release: () => undefined }, 'SlowDown', 120_000)).toBe(500);
  });

  it('a HEAD of the content check (round -1, no place held) waits longer each time it is throttled in a row, as a range does, and cuts no range', () => {
    const { t } = make(4);
    const head = () => t.throttled({ round: -1, release: () => undefined }, 'HTTP 503');
    // Every range done (the last file's check): before, each of these waits was 1 s at most, so a HEAD asked again
    // every half second on average for the whole S3_THROTTLE_TIMEOUT_S.
    expect(Array.from({ length: 7 }, head)).toEqual([1_000, 2_000, 4_000, 8_000, 16_000, 20_000, 20_000]);
    expect([t.limit, t.round, t.level]).toEqual([4, 0, 0]);
    // An answer of the current round that is not throttled starts them over, as it does the ranges' rounds.
    t.answered({ round: t.round, release: () => undefined });
    expect(head()).toBe(1_000);
    // Ranges throttled meanwhile: a HEAD waits at least as long as they do.
    for (let i = 0; i < 3; i++) t.throttled({ round: t.round, release: () => undefined }, 'SlowDown');
    expect(head()).toBe(4_000);
  });

  it('gives up once throttled for the timeout without a byte; bytes start the count again; no wait runs past it', () => {
    const { t, clock } = make(4, 10_000);
    const slot = () => ({ round: t.round, release: () => undefined });
    expect(t.throttled(slot(), 'SlowDown')).toBe(1_000);
    clock.now = 9_000;
    // 1 s left: the wait is cut to it, so the next answer comes at the bound.
    expect(t.throttled(slot(), 'SlowDown')).toBe(1_000);
    clock.now = 9_500;
    t.progressed();
    clock.now = 19_000;
    expect(t.throttled(slot(), 'SlowDown')).toBeDefined();
    clock.now = 29_000;
    expect(t.throttled(slot(), 'SlowDown')).toBeUndefined();
    expect(t.giveUp('SlowDown')).toMatch(/^S3 kept throttling the download \(SlowDown, 4 throttled answers\) for 10 s \(S3_THROTTLE_TIMEOUT_S\) without a byte received, with the ranges in flight cut from 4 to 1;/);
  });
});

describe('ThrottleLog', () => {
  it('lets the first spell of many requests log, holds those that begin within its interval, and sums them up once it is over', async () => {
    const { log, lines } = recorder();
    const gate = new ThrottleLog(log, 'read', 300);
    const reads = Array.from({ length: 4 }, (_, i) => new Throttle({ concurrency: 1, timeoutMs: 300_000, log, what: 'read', fields: { uri: `s3://b/${i}` }, gate }));
    const slot = { round: 0, release: () => undefined };
    for (const t of reads) t.throttled(slot, 'SlowDown');
    reads[3]!.throttled({ ...slot, round: 1 }, 'SlowDown');
    expect(lines.map((l) => l.msg)).toEqual(['S3 is throttling the read (SlowDown): backing off; the read fails once throttled for 300 s (S3_THROTTLE_TIMEOUT_S) without receiving a byte']);
    await until(() => lines.length === 2, 10_000, 20);
    expect(lines[1]).toMatchObject({ level: 'warn', requests: 3, throttledAnswers: 4,
      msg: expect.stringMatching(/^S3 also throttled 3 other reads \(4 throttled answers\) in the last \d+ s; each is not logged on its own/) });
    // A held spell that ends says nothing either; a spell after the interval logs again.
    reads[1]!.answered({ round: reads[1]!.round, release: () => undefined });
    expect(lines).toHaveLength(2);
  });

  it('sums up a held spell that is still throttled after a summary, though no new spell begins', async () => {
    const { log, lines } = recorder();
    const gate = new ThrottleLog(log, 'read', 300);
    const reads = Array.from({ length: 2 }, (_, i) => new Throttle({ concurrency: 1, timeoutMs: 300_000, log, what: 'read', fields: { uri: `s3://b/${i}` }, gate }));
    for (const t of reads) t.throttled({ round: t.round, release: () => undefined }, 'SlowDown');
    await until(() => lines.length === 2, 10_000, 20);
    expect(lines[1]).toMatchObject({ requests: 1, throttledAnswers: 1 });
    // The held read is throttled on, in the same spell: before, its answers were counted and never logged.
    reads[1]!.throttled({ round: reads[1]!.round, release: () => undefined }, 'SlowDown');
    reads[1]!.throttled({ round: reads[1]!.round, release: () => undefined }, 'SlowDown');
    await until(() => lines.length === 3, 10_000, 20);
    expect(lines[2]).toMatchObject({ level: 'warn', requests: 1, throttledAnswers: 2,
      msg: expect.stringMatching(/^S3 also throttled 1 other read \(2 throttled answers\) in the last \d+ s; each is not logged on its own/) });
    // Nothing more once it is no longer throttled.
    reads[1]!.answered({ round: reads[1]!.round, release: () => undefined });
    await new Promise((r) => setTimeout(r, 600));
    expect(lines).toHaveLength(3);
  });
});

describe('which answers are throttling', () => {
  it('503 SlowDown, 429 whatever its code, MinIO\'s SlowDownRead, KMS throttling; not a 500, a 503 of another code, a reset', () => {
    expect(throttled(new LiteHttpError(503, 'SlowDown', 'read'))).toBe(true);
    expect(throttled(new LiteHttpError(429, undefined, 'read'))).toBe(true);
    expect(throttled(new LiteHttpError(503, 'SlowDownRead', 'read'))).toBe(true);
    expect(throttled(new LiteHttpError(400, 'KMS.ThrottlingException', 'read'))).toBe(true);
    expect(throttled(Object.assign(new Error('x'), { name: 'SlowDown', $metadata: { httpStatusCode: 503 } }))).toBe(true);
    expect(throttled(new LiteHttpError(500, 'InternalError', 'read'))).toBe(false);
    expect(throttled(new LiteHttpError(503, 'ServiceUnavailable', 'read'))).toBe(false);
    expect(throttled(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }))).toBe(false);
  });

  it('reads Retry-After as delay-seconds or an HTTP date, from either transport\'s error', () => {
    expect(retryAfterMs(new LiteHttpError(503, 'SlowDown', 'read', false, '120'))).toBe(120_000);
    expect(retryAfterMs(new LiteHttpError(503, 'SlowDown', 'read'))).toBeUndefined();
    expect(retryAfterMs({ $response: { headers: { 'retry-after': 'Wed, 21 Oct 2026 07:28:10 GMT' } } }, Date.parse('Wed, 21 Oct 2026 07:28:00 GMT'))).toBe(10_000);
    expect(retryAfterMs({ $response: { headers: { 'retry-after': 'soon' } } })).toBeUndefined();
  });
});
