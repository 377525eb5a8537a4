/**
 * The container's termination message (src/termination.ts): the line a fatal exit ends with, in the file Kubernetes
 * shows in the pod status; the SIGBUS hint while mapped weights may be read, then the log's last lines; nothing after a
 * graceful stop. The real server and warm-up CLI, spawned with TERMINATION_MESSAGE_PATH naming a temporary file; the
 * rewrite's timing on a fresh copy of termination.ts and log.ts in this process, on fake timers.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { buildDemoModel } from '../src/demo/index.js';
import { fitTerminationMessage, IN_FLIGHT_HEADER, IN_FLIGHT_LIMIT, inFlightSection, TAIL_HEADER, TERMINATION_MESSAGE_LIMIT, terminationPath, withLogTail, type InFlight, type InFlightNow } from '../src/termination.js';
import { ENTRY, ROOT, postJson, sharedCacheDir, startServer, tempDir, until, type LogLine, type ServerHandle } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const WARMUP = path.join(ROOT, 'dist', 'warmup', 'main.js');
const scratch = tempDir('dr-termination-');
afterAll(() => scratch.cleanup());
let n = 0;
/** A path for one test's message file (not made). */
const messageFile = () => path.join(scratch.dir, `message-${++n}`);
/** The log lines a message shows after its hint, parsed. */
const tailOf = (message: string): LogLine[] => {
  const at = message.indexOf(TAIL_HEADER);
  return at < 0 ? [] : message.slice(at + TAIL_HEADER.length).split('\n').map((l) => JSON.parse(l) as LogLine);
};
/** The lines of a message's in-flight section (its header first), or undefined where it has none. */
const inFlightOf = (message: string): string[] | undefined => {
  const at = message.indexOf(IN_FLIGHT_HEADER);
  if (at < 0) return undefined;
  const end = message.indexOf(TAIL_HEADER, at);
  return message.slice(at + 1, end < 0 ? undefined : end).split('\n');
};
/** A generation as the engine tells termination.ts of it. */
const generation = (o: Partial<InFlight> = {}): InFlight => ({ worker: 0, images: 2, requests: 1, width: 64, height: 48, steps: 30, startedAt: performance.now(), step: 0, of: 30, decoding: false, requestIds: ['r-1'], traceIds: [], ...o });
const run = (entry: string, env: Record<string, string>, args: string[] = []) =>
  spawnSync(process.execPath, [entry, ...args], { encoding: 'utf8', timeout: 60_000, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env } });

describe('the message text', () => {
  it('fits in 4096 bytes of UTF-8, cut at a character boundary and marked as cut', () => {
    expect(fitTerminationMessage('short')).toBe('short');
    const exact = 'x'.repeat(TERMINATION_MESSAGE_LIMIT);
    expect(fitTerminationMessage(exact)).toBe(exact);
    for (const unit of ['é', '一', '🙂', 'ab']) {
      const long = `a${unit.repeat(3000)}`;
      const fit = fitTerminationMessage(long);
      expect(Buffer.byteLength(fit)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
      expect(Buffer.byteLength(fit)).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT - 8);
      expect(fit).toMatch(/ …\(cut\)$/);
      expect(long.startsWith(fit.replace(/ …\(cut\)$/, ''))).toBe(true);
      expect(fit).not.toContain('\ufffd');
    }
  });

  it('goes to TERMINATION_MESSAGE_PATH where set, else to the kubelet\'s file only where it exists', () => {
    const missing = path.join(scratch.dir, 'no-termination-log');
    expect(terminationPath({ TERMINATION_MESSAGE_PATH: '/x/y' }, missing)).toBe('/x/y');
    expect(terminationPath({}, missing)).toBeUndefined();
    expect(terminationPath({ TERMINATION_MESSAGE_PATH: ' ' }, missing)).toBeUndefined();
    const present = path.join(scratch.dir, 'termination-log');
    writeFileSync(present, '');
    expect(terminationPath({}, present)).toBe(present);
  });

  it('with the log\'s last lines: the hint, the separator, then the newest lines that fit in 4096 bytes, each whole', () => {
    const hint = 'if this container ended with exit code 135 (SIGBUS): …';
    expect(withLogTail(hint, [])).toBe(hint);
    expect(withLogTail(hint, ['{"a":1}', '{"b":2}'])).toBe(`${hint}\nlast log lines:\n{"a":1}\n{"b":2}`);
    // Lines of mixed lengths and multi-byte characters, far more than fit.
    const lines = Array.from({ length: 300 }, (_, i) => `{"n":${i},"msg":"${'é一🙂x'.repeat(i % 23)}"}`);
    const msg = withLogTail(hint, lines);
    expect(Buffer.byteLength(msg)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    expect(msg.startsWith(hint + TAIL_HEADER)).toBe(true);
    const shown = msg.slice((hint + TAIL_HEADER).length).split('\n');
    // The newest, in order, whole; the one before the first shown would not have fit.
    expect(shown).toEqual(lines.slice(-shown.length));
    expect(Buffer.byteLength(`${hint}${TAIL_HEADER}${lines.slice(-shown.length - 1).join('\n')}`)).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT);
    // At most the 80 lines the kubelet's fallback shows.
    const short = Array.from({ length: 200 }, (_, i) => String(i));
    expect(withLogTail(hint, short)).toBe(`${hint}${TAIL_HEADER}${short.slice(-80).join('\n')}`);
    // A newest line too long for the room alone: its start, marked as cut.
    const huge = `{"msg":"${'一'.repeat(3000)}"}`;
    const cut = withLogTail(hint, ['{"old":1}', huge]);
    expect(Buffer.byteLength(cut)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    expect(Buffer.byteLength(cut)).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT - 8);
    expect(cut).toMatch(/ …\(cut\)$/);
    expect(huge.startsWith(cut.slice((hint + TAIL_HEADER).length).replace(/ …\(cut\)$/, ''))).toBe(true);
    expect(cut).not.toContain('\ufffd');
  });
});

describe('the generations in flight, as the message shows them', () => {
  const wall = new Date('2026-12-07T10:00:05.000Z');
  const now = 50_000;

  it('a line per generation: worker, shape, requests and their ids, start and stage; nothing when nothing runs or waits', () => {
    expect(inFlightSection({ generations: [], queued: 0 }, now, wall)).toBe('');
    expect(inFlightSection({ generations: [], queued: 3 }, now, wall)).toBe('\nin flight at 2026-12-07T10:00:05.000Z: 0 generations, 3 requests queued');
    const section = inFlightSection({
      generations: [
        generation({ startedAt: now - 2_500, step: 12 }),
        generation({ worker: 1, images: 1, requests: 3, width: 1024, height: 768, steps: 50, of: 25, scheduler: 'euler_a', mode: 'img2img', loras: 'demo-style:0.5', startedAt: now - 9_000, decoding: true, requestIds: ['a', 'b', 'c'], traceIds: ['4bf92f3577b34da6a3ce929d0e0e4736'] }),
        generation({ worker: 2, images: 1, requests: 1, requestIds: [], traceIds: ['4bf92f3577b34da6a3ce929d0e0e4736'], startedAt: now }),
      ],
      queued: 1,
    }, now, wall);
    expect(section).toBe([
      '',
      'in flight at 2026-12-07T10:00:05.000Z: 3 generations, 1 request queued',
      'worker=0 images=2 size=64x48 steps=30 requests=1 ids=r-1 since=2026-12-07T10:00:02.500Z step=12/30',
      'worker=1 images=1 size=1024x768 steps=50 scheduler=euler_a mode=img2img loras=demo-style:0.5 requests=3 ids=a,b,+1 since=2026-12-07T09:59:56.000Z decoding',
      'worker=2 images=1 size=64x48 steps=30 requests=1 traces=4bf92f3577b34da6a3ce929d0e0e4736 since=2026-12-07T10:00:05.000Z step=0/30',
    ].join('\n'));
    // Identical requests joined to its generation (the result cache's), which its end answers too.
    expect(inFlightSection({ generations: [generation({ worker: 3, joined: 2, startedAt: now - 1_000, step: 3 })], queued: 0 }, now, wall).split('\n')[2])
      .toBe('worker=3 images=2 size=64x48 steps=30 requests=1 joined=2 ids=r-1 since=2026-12-07T10:00:04.000Z step=3/30');
    // A worker's warm-up: no request.
    expect(inFlightSection({ generations: [generation({ worker: 3, images: 1, warmup: true, requestIds: [], steps: 1, of: 1, startedAt: now - 100 })], queued: 0 }, now, wall))
      .toBe('\nin flight at 2026-12-07T10:00:05.000Z: 1 generation, 0 requests queued\nworker=3 images=1 size=64x48 steps=1 warmup since=2026-12-07T10:00:04.900Z step=0/1');
  });

  it(`at most ${IN_FLIGHT_LIMIT} bytes: the first generations that fit, whole, then how many more; the first one always, its start at least`, () => {
    const longId = (i: number) => `${i}-${'é一'.repeat(60)}`;
    const many = Array.from({ length: 24 }, (_, i) => generation({ worker: i, requests: 16, loras: `${'l'.repeat(100)}:1`, requestIds: Array.from({ length: 16 }, (_, j) => longId(i * 16 + j)) }));
    const section = inFlightSection({ generations: many, queued: 40 }, now, wall);
    expect(Buffer.byteLength(section)).toBeLessThanOrEqual(IN_FLIGHT_LIMIT);
    const lines = section.split('\n').slice(2);
    const shown = lines.length - 1;
    expect(shown).toBeGreaterThan(0);
    expect(lines.at(-1)).toBe(`… ${many.length - shown} more`);
    for (const [i, line] of lines.slice(0, -1).entries()) {
      // Two ids each, cut to 40 characters, the rest counted; LoRA names cut.
      expect(line).toMatch(new RegExp(`^worker=${i} images=2 size=64x48 steps=30 loras=l{59}… requests=16 ids=${i * 16}-(é一)+é?…,${i * 16 + 1}-(é一)+é?…,\\+14 since=\\S+ step=0/30$`));
      expect([...line.split(' ids=')[1]!.split(',')[0]!]).toHaveLength(40);
    }
    // The next would not have fit beside the count of those after it.
    const next = inFlightSection({ generations: [many[shown]!], queued: 0 }, now, wall).split('\n')[2]!;
    expect(next).toMatch(new RegExp(`^worker=${shown} `));
    expect(Buffer.byteLength(section) - Buffer.byteLength(`\n${lines.at(-1)}`) + Buffer.byteLength(`\n${next}\n… ${many.length - shown - 1} more`)).toBeGreaterThan(IN_FLIGHT_LIMIT);
    // A first generation longer than the room alone (ids of many bytes) is shown cut, not left out.
    const huge = inFlightSection({ generations: [generation({ requestIds: ['🙂'.repeat(40), '🙂'.repeat(40)], scheduler: 'x'.repeat(600) }), generation()], queued: 0 }, now, wall);
    expect(Buffer.byteLength(huge)).toBeLessThanOrEqual(IN_FLIGHT_LIMIT);
    expect(huge).toMatch(/\nworker=0 images=2 size=64x48 steps=30 scheduler=x+ …\(cut\)\n… 1 more$/);
  });
});

describe('the log\'s last lines after the hint (a fresh termination.ts and log.ts in this process, fake timers)', () => {
  const saved = process.env.TERMINATION_MESSAGE_PATH;
  afterEach(() => {
    vi.useRealTimers();
    if (saved === undefined) delete process.env.TERMINATION_MESSAGE_PATH;
    else process.env.TERMINATION_MESSAGE_PATH = saved;
  });

  /** Module state is the process's: each case imports its own copies, writing to a file of its own. */
  async function fresh() {
    vi.useFakeTimers();
    vi.resetModules();
    const file = messageFile();
    process.env.TERMINATION_MESSAGE_PATH = file;
    const t = await import('../src/termination.js');
    const { createLogger } = await import('../src/log.js');
    const logged: string[] = [];
    const log = createLogger('info', 'diffusers-runtime', { write: (s: string) => void logged.push(s.replace(/\n$/, '')) });
    const read = () => (existsSync(file) ? readFileSync(file, 'utf8') : undefined);
    return { t, log, logged, file, read };
  }
  const HINT_OF = /^if this container ended with exit code 135 \(SIGBUS\): a read of the model weights mapped from \/models\/a failed/;

  it('rewritten at most once a second, only when lines were logged since: none before the hint, none while the log is quiet', async () => {
    const { t, log, logged, file, read } = await fresh();
    log.info('before the hint');
    vi.advanceTimersByTime(5_000);
    // Before: the same (nothing is kept or written before the hint).
    expect(read()).toBeUndefined();
    t.mappedWeightsHint('/models/a');
    const hint = read()!;
    expect(hint).toMatch(HINT_OF);
    expect(hint).not.toContain('last log lines');
    for (let i = 0; i < 50; i++) log.info({ requestId: `r-${i}` }, 'inference request');
    // Not a write per line: the file waits for the next rewrite.
    expect(read()).toBe(hint);
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS - 1);
    expect(read()).toBe(hint);
    vi.advanceTimersByTime(1);
    // Before: still the hint alone.
    const after = logged.slice(1);
    expect(read()).toBe(withLogTail(hint, after));
    expect(read()!.split('\n').at(-1)).toBe(after.at(-1));
    expect(JSON.parse(after.at(-1)!)).toMatchObject({ requestId: 'r-49', msg: 'inference request' });
    expect(Buffer.byteLength(read()!)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    // Nothing logged: nothing written (a write would replace this).
    writeFileSync(file, 'untouched');
    vi.advanceTimersByTime(10_000);
    expect(read()).toBe('untouched');
    expect(vi.getTimerCount()).toBe(0);
    // One line: one rewrite, a second later.
    log.warn({ worker: 0 }, 'a line from a worker thread, relayed');
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    expect(read()).toBe(withLogTail(hint, logged.slice(1)));
    expect(read()).toMatch(/"msg":"a line from a worker thread, relayed"}$/);
  });

  it('a generation that starts is written at once where nothing was in the last second, else with the next rewrite; one that ended is dropped by the next', async () => {
    const { t, log, logged, file, read } = await fresh();
    t.mappedWeightsHint('/models/a');
    const hint = read()!;
    let reads = 0;
    const state: { generations: InFlight[]; queued: number } = { generations: [], queued: 0 };
    const source = (): InFlightNow => (reads++, { generations: [...state.generations], queued: state.queued });
    // Less than a second after the hint's write: with the next rewrite, a second after.
    state.generations = [generation({ requestIds: ['first'] })];
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS - 10);
    t.generationsChanged(source, true);
    expect(read()).toBe(hint);
    expect(reads).toBe(0);
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS - 1);
    expect(read()).toBe(hint);
    vi.advanceTimersByTime(1);
    expect(reads).toBe(1);
    const first = read()!;
    expect(inFlightOf(first)).toEqual([expect.stringMatching(/^in flight at \S+Z: 1 generation, 0 requests queued$/), expect.stringMatching(/^worker=0 images=2 size=64x48 steps=30 requests=1 ids=first since=\S+ step=0\/30$/)]);
    expect(first.startsWith(`${hint}\nin flight at `)).toBe(true);
    // A second later, nothing written since: the next start is written at once (an OOM kill early in it finds it).
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    log.info({ requestId: 'r-0' }, 'inference request');
    state.generations.push(generation({ worker: 1, requestIds: ['second'] }));
    state.queued = 2;
    t.generationsChanged(source, true);
    // Before: the hint alone, with the first line a second later (no generation in it).
    expect(inFlightOf(read()!)?.slice(1).map((l) => /ids=(\S+)/.exec(l)?.[1])).toEqual(['first', 'second']);
    expect(read()).toMatch(/: 2 generations, 2 requests queued\n/);
    // The log's lines follow the section, as before.
    expect(read()).toBe(withLogTail(hint + inFlightOf(read()!)!.map((l) => `\n${l}`).join(''), logged));
    expect(vi.getTimerCount()).toBe(0);
    // Never more than a write a second: starts and ends within it wait for one rewrite, which reads them once.
    writeFileSync(file, 'untouched');
    reads = 0;
    for (let i = 0; i < 50; i++) {
      state.generations = [generation({ requestIds: [`burst-${i}`] })];
      t.generationsChanged(source, i % 2 === 0);
    }
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS - 1);
    expect(read()).toBe('untouched');
    expect(reads).toBe(0);
    vi.advanceTimersByTime(1);
    expect(reads).toBe(1);
    expect(inFlightOf(read()!)?.[1]).toMatch(/ ids=burst-49 /);
    // It ended: gone with the next rewrite (a second later at most), not at once.
    state.generations = [];
    state.queued = 0;
    t.generationsChanged(source, false);
    expect(inFlightOf(read()!)?.[1]).toMatch(/ ids=burst-49 /);
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    expect(inFlightOf(read()!)).toBeUndefined();
    expect(read()).toBe(withLogTail(hint, logged));
    // An end is not written at once even a second after the last write.
    vi.advanceTimersByTime(5_000);
    state.generations = [generation()];
    t.generationsChanged(source, false);
    expect(inFlightOf(read()!)).toBeUndefined();
  });

  it('the section and the log\'s lines together in 4096 bytes: the section whole, the newest lines in the rest', async () => {
    const { t, log, logged, read } = await fresh();
    t.mappedWeightsHint('/models/a');
    const hint = read()!;
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    for (let i = 0; i < 200; i++) log.info({ requestId: `r-${i}-${'x'.repeat(60)}` }, 'inference request');
    const many = Array.from({ length: 30 }, (_, i) => generation({ worker: i, requestIds: [`id-${i}-${'y'.repeat(50)}`] }));
    t.generationsChanged(() => ({ generations: many, queued: 7 }), true);
    const m = read()!;
    expect(Buffer.byteLength(m)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    const section = inFlightOf(m)!;
    expect(Buffer.byteLength(`\n${section.join('\n')}`)).toBeLessThanOrEqual(IN_FLIGHT_LIMIT);
    expect(section[0]).toMatch(/: 30 generations, 7 requests queued$/);
    expect(section.at(-1)).toBe(`… ${30 - (section.length - 2)} more`);
    // The log's newest lines fill the rest, as they would without it.
    expect(m).toBe(withLogTail(`${hint}\n${section.join('\n')}`, logged));
    expect(tailOf(m).at(-1)?.requestId).toMatch(/^r-199-/);
    expect(Buffer.byteLength(m)).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT - 200);
  });

  it('no generation is read or written before the hint, without a message file, or after a fatal reason or a graceful stop', async () => {
    const { t, read } = await fresh();
    let reads = 0;
    const source = (): InFlightNow => (reads++, { generations: [generation()], queued: 0 });
    t.generationsChanged(source, true);
    t.generationsChanged(source, false);
    expect(read()).toBeUndefined();
    expect(vi.getTimerCount()).toBe(0);
    t.mappedWeightsHint('/models/a');
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    t.terminationReason('diffusers-runtime: the end');
    t.generationsChanged(source, true);
    vi.advanceTimersByTime(10_000);
    expect(read()).toBe('diffusers-runtime: the end');
    expect(reads).toBe(0);

    const stopped = await fresh();
    stopped.t.mappedWeightsHint('/models/a');
    vi.advanceTimersByTime(stopped.t.TAIL_REWRITE_MS);
    stopped.t.clearTerminationMessage();
    stopped.t.generationsChanged(source, true);
    vi.advanceTimersByTime(10_000);
    expect(stopped.read()).toBe('');

    // No message file (TERMINATION_MESSAGE_PATH unset, no kubelet's file): nothing kept, read or timed.
    const none = await fresh();
    delete process.env.TERMINATION_MESSAGE_PATH;
    none.t.mappedWeightsHint('/models/a');
    none.t.generationsChanged(source, true);
    none.t.generationsChanged(source, false);
    expect(vi.getTimerCount()).toBe(0);
    expect(reads).toBe(0);
  });

  it('a fatal reason replaces hint and lines, and nothing is written over it', async () => {
    const { t, log, read } = await fresh();
    t.mappedWeightsHint('/models/a');
    log.info('serving');
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    expect(read()).toMatch(/"msg":"serving"}$/);
    log.info('a rewrite is due');
    t.terminationReason('diffusers-runtime: the end');
    log.error('lines after it');
    t.mappedWeightsHint('/models/b');
    vi.advanceTimersByTime(10_000);
    expect(read()).toBe('diffusers-runtime: the end');
  });

  it('a graceful stop empties the file, and nothing is written after it', async () => {
    const { t, log, read } = await fresh();
    t.mappedWeightsHint('/models/a');
    log.info('serving');
    vi.advanceTimersByTime(t.TAIL_REWRITE_MS);
    // Before: no lines (the hint alone).
    expect(read()).toMatch(/"msg":"serving"}$/);
    log.info('shutting down');
    t.clearTerminationMessage();
    log.info('shut down');
    t.mappedWeightsHint('/models/b');
    vi.advanceTimersByTime(10_000);
    expect(read()).toBe('');
  });

  it('each folder mapped is named once, in order (the model, then the LoRA adapter sets)', async () => {
    const { t, read } = await fresh();
    t.mappedWeightsHint('/models/a');
    t.mappedWeightsHint('/models/a');
    t.mappedWeightsHint('the LoRA adapter sets in /cache/.lora-sets');
    t.mappedWeightsHint('the LoRA adapter sets in /cache/.lora-sets');
    expect(read()).toBe('if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from /models/a or the LoRA adapter sets in /cache/.lora-sets failed, the volume returned an I/O error; check the volume\'s health (NFS server, PVC, disk)');
  });

  it('a rewrite still due does not keep a process alive', () => {
    vi.useRealTimers();
    const file = messageFile();
    const script = `import { mappedWeightsHint, logLine } from ${JSON.stringify(path.join(ROOT, 'dist', 'src', 'termination.js'))};
      mappedWeightsHint('/models/a'); logLine('{"msg":"last"}\\n');`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000, env: { PATH: process.env.PATH ?? '', TERMINATION_MESSAGE_PATH: file } });
    expect(r.status, r.stderr).toBe(0);
    // The process ended before the rewrite (a timer that kept it alive would have written the line a second later).
    expect(readFileSync(file, 'utf8')).toMatch(HINT_OF);
    expect(readFileSync(file, 'utf8')).not.toContain('last');
  });
});

describe('the server', () => {
  const live: ServerHandle[] = [];
  afterEach(async () => {
    for (const s of live.splice(0)) await s.stop('SIGKILL');
  });

  it('a bad configuration (exit 2) leaves its stderr line in the message file', () => {
    const file = messageFile();
    const r = run(ENTRY, { TERMINATION_MESSAGE_PATH: file, PORT: 'abc', MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(2);
    // Before: no file (nothing was written there).
    expect(existsSync(file)).toBe(true);
    expect(readFileSync(file, 'utf8')).toBe(r.stderr.trim());
    expect(readFileSync(file, 'utf8')).toMatch(/^diffusers-runtime: invalid configuration: PORT must be /);
  });

  it('a line longer than 4096 bytes is cut to fit', () => {
    const file = messageFile();
    const r = run(ENTRY, { TERMINATION_MESSAGE_PATH: file }, Array.from({ length: 600 }, (_, i) => `--flag-${i}=é`));
    expect(r.status).toBe(2);
    const msg = readFileSync(file, 'utf8');
    expect(Buffer.byteLength(msg)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    expect(msg).toMatch(/ …\(cut\)$/);
    expect(r.stderr.startsWith(msg.replace(/ …\(cut\)$/, ''))).toBe(true);
  });

  it('serving a model from the cache, the message is the SIGBUS hint naming the cache entry (and the LoRA adapter sets once one is built), then the log\'s last lines; a graceful stop empties it', async () => {
    const file = messageFile();
    const srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: undefined, MODEL_CACHE_DIR: sharedCacheDir(), EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1' }, { ready: true });
    live.push(srv);
    // Before: no file.
    const hint = readFileSync(file, 'utf8').split('\n')[0]!;
    const entry = /^if this container ended with exit code 135 \(SIGBUS\): a read of the model weights mapped from (the cache entry \S+ in MODEL_CACHE_DIR \(.+?\)) failed, the volume returned an I\/O error; check the volume's health \(NFS server, PVC, disk\)$/.exec(hint)?.[1];
    expect(entry, hint).toBeDefined();
    const lora = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 1, loras: [{ name: 'demo-style', scale: 0.5 }] }] });
    expect(lora.status).toBe(200);
    // Before: the hint alone, naming the cache entry alone.
    await until(() => tailOf(readFileSync(file, 'utf8')).some((l) => l.msg === 'inference request' && l.status === 200), 20_000, 20);
    const msg = readFileSync(file, 'utf8');
    expect(msg.split('\n')[0]).toBe(`if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from ${entry} or the LoRA adapter sets in ${path.join(sharedCacheDir(), '.lora-sets')} failed, the volume returned an I/O error; check the volume's health (NFS server, PVC, disk)`);
    expect(tailOf(msg).some((l) => l.msg === 'LoRA adapter set ready')).toBe(true);
    expect(await srv.stop('SIGTERM')).toEqual({ code: 0, signal: null });
    // Before: the hint stayed after the graceful stop (exit 0).
    expect(readFileSync(file, 'utf8')).toBe('');
  }, 180_000);

  it('a second signal ending the drain (exit 1): its reason alone replaces the hint and the lines', async () => {
    const file = messageFile();
    const srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: undefined, MODEL_CACHE_DIR: sharedCacheDir(), EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '60' }, { ready: true });
    live.push(srv);
    const answer = postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'in flight', num_inference_steps: 500, height: 512, width: 512, seed: 5, num_images_per_prompt: 2 }] }).then((r) => r.status, (e: Error) => `failed: ${e.message}`);
    const inflight = async () => /^inference_requests_in_flight(?:\{[^}]*\})? 1$/m.test(await (await fetch(`${srv.url}/metrics`)).text());
    await until(inflight, 20_000, 20);
    const ended = new Promise((r) => srv.proc.once('exit', (code, signal) => r({ code, signal })));
    const first = performance.now();
    srv.proc.kill('SIGTERM');
    // The drain's lines reach the message (its rewrites go on while it drains). Before: the hint alone.
    await until(() => tailOf(readFileSync(file, 'utf8')).some((l) => l.event === 'draining'), 20_000, 20);
    // A signal within a second of the first is the same stop delivered twice (main.ts), not a second one.
    await until(() => performance.now() - first > 1_500, 5_000, 20);
    srv.proc.kill('SIGTERM');
    expect(await ended).toEqual({ code: 1, signal: null });
    expect(await answer).toBe(503);
    expect(readFileSync(file, 'utf8')).toBe('diffusers-runtime: second signal (SIGTERM): the drain was ended, generations in flight stopped at their next step (exit 1)');
  }, 180_000);

  it('the boot failing with EXIT_ON_BOOT_FAILURE (exit 1) leaves its reason', async () => {
    const file = messageFile();
    const srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: path.join(scratch.dir, 'no-such-model'), EXIT_ON_BOOT_FAILURE: 'true', EXECUTION_PROVIDER: 'cpu' });
    live.push(srv);
    await until(() => srv.proc.exitCode !== null, 60_000);
    expect(srv.proc.exitCode).toBe(1);
    expect(readFileSync(file, 'utf8')).toMatch(/^diffusers-runtime: the boot failed \(EXIT_ON_BOOT_FAILURE\): STORAGE_MISSING: /);
  }, 90_000);
});

describe('a serving server ended by SIGKILL (an OOM kill; the kubelet\'s at the end of the grace period)', () => {
  let srv: ServerHandle;
  let file: string;
  beforeAll(async () => {
    file = messageFile();
    // Nothing in the background after ready (no optimized copies written): the log is quiet unless asked.
    srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: undefined, MODEL_CACHE_DIR: sharedCacheDir(), EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', OPTIMIZED_MODEL_CACHE: 'off' }, { ready: true });
  }, 180_000);
  afterAll(async () => {
    await srv?.stop('SIGKILL');
  });
  const message = () => readFileSync(file, 'utf8');
  const key = (l: LogLine) => JSON.stringify(l);
  /** The lines as the server logged them, one after another (its stdout, as the test read it). */
  const asLogged = async (lines: LogLine[]) => {
    // The file may be written before the test has read the line from the server's stdout.
    await until(() => srv.logs.some((l) => key(l) === key(lines.at(-1)!)), 10_000, 20);
    const end = srv.logs.map(key).lastIndexOf(key(lines.at(-1)!));
    expect(lines.map(key)).toEqual(srv.logs.slice(end + 1 - lines.length, end + 1).map(key));
    return end;
  };
  /** A request the server refuses at once: one `inference request` line with its id. */
  const refused = async (id: string) => {
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 1 }] }, { headers: { 'content-type': 'application/json', 'x-request-id': id } });
    expect(r.status).toBe(400);
  };

  it('the message is the hint, then the log\'s lines since, as logged: the pipeline workers\' among them', async () => {
    // Before: the hint alone.
    await until(() => tailOf(message()).some((l) => l.event === 'ready'), 20_000, 20);
    const m = message();
    expect(m).toMatch(/^if this container ended with exit code 135 \(SIGBUS\): a read of the model weights mapped from the cache entry \S+ in MODEL_CACHE_DIR \(.+\) failed, the volume returned an I\/O error; check the volume's health \(NFS server, PVC, disk\)\nlast log lines:\n\{/);
    const tail = tailOf(m);
    await asLogged(tail);
    // Relayed from the worker threads that created the sessions.
    expect(tail.some((l) => l.event === 'session' && l.thread === 'worker')).toBe(true);
  }, 30_000);

  it('a request\'s line follows within about a second; nothing is rewritten while nothing is logged', async () => {
    await refused('term-kill-1');
    await until(() => tailOf(message()).at(-1)?.requestId === 'term-kill-1', 20_000, 20);
    await asLogged(tailOf(message()));
    // The server is idle: a rewrite would replace this.
    const logged = srv.logs.length;
    writeFileSync(file, 'untouched');
    await new Promise((r) => setTimeout(r, 3_000));
    expect(srv.logs.slice(logged)).toEqual([]);
    expect(message()).toBe('untouched');
    await refused('term-kill-2');
    // A read between the rewrite's truncation and its write finds the file empty.
    let m = '';
    await until(() => (m = message()) !== 'untouched' && m !== '', 20_000, 20);
    expect(tailOf(m).at(-1)?.requestId).toBe('term-kill-2');
  }, 60_000);

  it('the newest lines win: within 4096 bytes, the oldest left out', async () => {
    const ids = Array.from({ length: 40 }, (_, i) => `term-cut-${i}-${'x'.repeat(100)}`);
    for (const id of ids) await refused(id);
    await until(() => tailOf(message()).at(-1)?.requestId === ids.at(-1), 20_000, 20);
    const m = message();
    expect(Buffer.byteLength(m)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    const tail = tailOf(m);
    const end = await asLogged(tail);
    expect(end).toBe(srv.logs.length - 1);
    expect(tail.some((l) => l.requestId === 'term-kill-1' || l.event === 'ready')).toBe(false);
    // The line before the first shown would not have fit.
    const before = srv.logs[end - tail.length]!;
    expect(Buffer.byteLength(m) + 1 + Buffer.byteLength(key(before))).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT);
  }, 60_000);

  it('killed, the message still holds the hint and the last lines', async () => {
    const last = message();
    expect(await srv.stop('SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });
    expect(message()).toBe(last);
    expect(last).toMatch(/^if this container ended with exit code 135 \(SIGBUS\): /);
    expect(tailOf(last).at(-1)?.requestId).toMatch(/^term-cut-39-/);
  });
});

describe('a generation in flight, in the message of a server ended by SIGKILL (an OOM kill in the middle of a generation)', () => {
  let srv: ServerHandle;
  let file: string;
  beforeAll(async () => {
    file = messageFile();
    // A step of two 128x128 images takes ~1.3 ms here: a thousand steps (euler_a's most) last over a second.
    srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: undefined, MODEL_CACHE_DIR: sharedCacheDir(), EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', OPTIMIZED_MODEL_CACHE: 'off', MAX_STEPS: '1000', LOG_LEVEL: 'debug' }, { ready: true });
  }, 180_000);
  afterAll(async () => {
    await srv?.stop('SIGKILL');
  });
  const message = () => readFileSync(file, 'utf8');
  /** The message once `cond` holds for it (a read between the rewrite's truncation and its write finds it empty). */
  const messageWhen = async (cond: (m: string) => boolean, ms = 30_000) => {
    let m = '';
    await until(() => cond((m = message())), ms, 5);
    return m;
  };
  const HINT = /^if this container ended with exit code 135 \(SIGBUS\): /;
  /** Until the message has not changed for 1.5 s (no rewrite due): a generation's start is then written at once. */
  const quiet = async () => {
    let last = message();
    let since = performance.now();
    await until(() => {
      const m = message();
      if (m !== last) [last, since] = [m, performance.now()];
      return performance.now() - since > 1_500;
    }, 30_000, 20);
  };
  const PROMPT = 'a zebra-prompt-7f3a in the snow';
  const NEGATIVE = 'negative-text-91c2';
  const generate = (id: string, side: number) =>
    postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: PROMPT, negative_prompt: NEGATIVE, num_inference_steps: 1000, height: side, width: side, seed: 3, num_images_per_prompt: 2, scheduler: 'euler_a' }] }, { headers: { 'content-type': 'application/json', 'x-request-id': id } });
  /**
   * Its line: written at its dispatch (step 0), or a rewrite's later where a loaded test process read the file past
   * that (the fake-timer case above pins the write at the dispatch).
   */
  const entry = (id: string, side: number) => new RegExp(`^worker=0 images=2 size=${side}x${side} steps=1000 scheduler=euler_a requests=1 ids=${id} since=(\\S+) step=\\d+/1000( \\| decoding)?$`);

  it('from its start: the worker, its images, size, steps, scheduler and request id, never its prompts; gone within about a second of its end', async () => {
    // The warm-up's generation is over, and dropped.
    await messageWhen((m) => tailOf(m).some((l) => l.event === 'ready') && inFlightOf(m) === undefined);
    await quiet();
    const sent = Date.now();
    const answer = generate('term-inflight-1', 128);
    const m = await messageWhen((m) => inFlightOf(m)?.some((l) => l.includes('ids=term-inflight-1')) === true);
    const section = inFlightOf(m)!;
    // Before: the hint, then the log's lines; no generation.
    expect(section).toEqual([expect.stringMatching(/^in flight at \S+Z: 1 generation, 0 requests queued$/), expect.stringMatching(/ ids=term-inflight-1 /)]);
    expect(section[1]).toMatch(entry('term-inflight-1', 128));
    // Between the hint and the log's lines.
    expect(m).toMatch(HINT);
    expect(m.indexOf(IN_FLIGHT_HEADER)).toBe(m.indexOf('\n'));
    // Its start, in the log's clock.
    const since = Date.parse(entry('term-inflight-1', 128).exec(section[1]!)![1]!);
    expect(since).toBeGreaterThanOrEqual(sent - 1_000);
    expect(since).toBeLessThanOrEqual(Date.now());
    expect(m).not.toContain('zebra');
    expect(m).not.toContain(NEGATIVE);
    const r = await answer;
    expect(r.status).toBe(200);
    const ended = performance.now();
    const after = await messageWhen((m) => HINT.test(m) && inFlightOf(m) === undefined, 20_000);
    // Within about a second: the next rewrite (a generous bound for a loaded machine).
    expect(performance.now() - ended).toBeLessThan(5_000);
    expect(after).not.toContain('term-inflight-1 since');
    await messageWhen((m) => tailOf(m).some((l) => l.requestId === 'term-inflight-1' && l.msg === 'inference request'), 20_000);
    // At LOG_LEVEL=debug the log has the batch's start too, for `kubectl logs --previous` (requests are logged when
    // answered). Before: no such line.
    const started = srv.logs.find((l) => l.msg === 'generation started' && (l.requestIds as string[] | undefined)?.includes('term-inflight-1'));
    expect(started).toMatchObject({ level: 'debug', worker: '0', device: 'cpu', images: 2, requests: 1, width: 128, height: 128, steps: 1000, scheduler: 'euler_a', requestIds: ['term-inflight-1'] });
    // The same dispatch as the message's `since`: logged just after it (not to the millisecond on a loaded machine).
    expect(since).toBeLessThanOrEqual(Date.parse(started!.time as string) + 1);
    expect(Date.parse(started!.time as string) - since).toBeLessThan(1_000);
    expect(JSON.stringify(started)).not.toContain('zebra');
  }, 90_000);

  it('identical requests joined to it are counted: its end answers them too', async () => {
    await quiet();
    // 512 px (~5 s here, so that the rewrite a second after its start still finds it): no earlier case generated it,
    // so the second is no cache hit; it joins the first's generation.
    const first = generate('term-joined-a', 512);
    await messageWhen((m) => inFlightOf(m)?.some((l) => l.includes('ids=term-joined-a')) === true);
    const second = generate('term-joined-b', 512);
    // Before: `requests=1 ids=term-joined-a`, the joined request nowhere in the message.
    const m = await messageWhen((m) => inFlightOf(m)?.some((l) => l.includes(' joined=1 ')) === true);
    expect(inFlightOf(m)![1]).toMatch(/^worker=0 images=2 size=512x512 steps=1000 scheduler=euler_a requests=1 joined=1 ids=term-joined-a since=\S+ step=\d+\/1000$/);
    const [a, b] = await Promise.all([first, second]);
    expect([a.status, b.status]).toEqual([200, 200]);
    expect(b.json.predictions).toEqual(a.json.predictions);
    await messageWhen((m) => HINT.test(m) && inFlightOf(m) === undefined, 20_000);
  }, 90_000);

  it('killed in it, the message holds the generation', async () => {
    await quiet();
    let answered = false;
    void generate('term-inflight-2', 256).then(() => (answered = true), () => undefined);
    const last = await messageWhen((m) => inFlightOf(m)?.some((l) => l.includes('ids=term-inflight-2')) === true);
    expect(answered).toBe(false);
    expect(await srv.stop('SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });
    expect(message()).toBe(last);
    expect(last).toMatch(HINT);
    // Before: no in-flight section; `kubectl describe pod` could not say which request the kill came in.
    expect(inFlightOf(last)?.[1]).toMatch(entry('term-inflight-2', 256));
    expect(last).not.toContain('zebra');
    expect(Buffer.byteLength(last)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
  }, 90_000);
});

describe('the warm-up Job', () => {
  it('a bad configuration (exit 2) leaves its stderr line in the message file', () => {
    const file = messageFile();
    const r = run(WARMUP, { TERMINATION_MESSAGE_PATH: file, MAX_STEPS: 'x', MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(2);
    expect(readFileSync(file, 'utf8')).toBe(r.stderr.trim());
    expect(readFileSync(file, 'utf8')).toMatch(/^warmup: CONFIG: MAX_STEPS must be /);
  });

  it('a failed run (exit 1) leaves its reason', () => {
    const file = messageFile();
    const r = run(WARMUP, { TERMINATION_MESSAGE_PATH: file, STORAGE_URI: path.join(scratch.dir, 'no-such-model'), MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(1);
    const last = r.stderr.trim().split('\n').at(-1)!;
    expect(readFileSync(file, 'utf8')).toBe(last);
    expect(last).toMatch(/^warmup: STORAGE_MISSING: /);
  });
});

describe('weights the volume fails to read while mapped', () => {
  stuckFsForTests();

  it.skipIf(stuckFsUnavailable())('end the process by SIGBUS (exit 135 in a container), and the message file holds the hint', async () => {
    const backing = tempDir('dr-termination-sigbus-');
    const mnt = `${backing.dir}-mnt`;
    try {
      await buildDemoModel(path.join(backing.dir, 'model'), { externalData: true });
      const fs = await mountStuckFs(backing.dir, mnt, { eio: 'read:model.onnx_data', eioTimes: 1_000_000 });
      const file = messageFile();
      const proc = spawn(process.execPath, [ENTRY], { stdio: 'ignore', env: { ...process.env, TERMINATION_MESSAGE_PATH: file, PORT: '0', HOST: '127.0.0.1', STORAGE_URI: path.join(fs.dir, 'model'), MODEL_CACHE_DIR: path.join(backing.dir, 'cache'), EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '0', EXIT_ON_BOOT_FAILURE: 'true' } });
      // An EIO that ORT met in a read() instead would fail the boot: exit 1, not a wait for good.
      const kill = setTimeout(() => proc.kill('SIGKILL'), 90_000);
      const ended = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
      clearTimeout(kill);
      expect(ended).toEqual({ code: null, signal: 'SIGBUS' });
      expect(readFileSync(file, 'utf8')).toBe(`if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from ${path.join(fs.dir, 'model')} failed, the volume returned an I/O error; check the volume's health (NFS server, PVC, disk)`);
    } finally {
      backing.cleanup();
    }
  }, 120_000);
});

/** Whether this machine lets the test mount over /mnt in a mount namespace of the server's own (as config.test.ts). */
const canMountOverMnt = process.platform === 'linux'
  && spawnSync('unshare', ['-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'], { stdio: 'ignore', timeout: 5_000 }).status === 0;

describe('a second signal while the server is still starting', () => {
  stuckFsForTests();

  // MODEL_CACHE_DIR unset: the look at /mnt/cache before the listen, on a volume that does not answer, holds the start
  // before the runtime exists, and the stop waits for that look.
  it.skipIf(stuckFsUnavailable() || !canMountOverMnt)('leaves a message naming what the stop still waits for, not a drain; exit 1 once the volume answers', async () => {
    const backing = tempDir('dr-termination-starting-');
    try {
      const fs = await mountStuckFs(backing.dir, `${backing.dir}-mnt`);
      await fs.hang();
      const file = messageFile();
      const proc = spawn('unshare', ['-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt && mkdir /mnt/cache && mount --bind "$0" /mnt/cache && exec "$@"', fs.dir, process.execPath, ENTRY], {
        stdio: ['ignore', 'ignore', 'pipe'],
        env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', TERMINATION_MESSAGE_PATH: file, PORT: '0', HOST: '127.0.0.1' },
      });
      let stderr = '';
      proc.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
      const kill = setTimeout(() => proc.kill('SIGKILL'), 60_000);
      const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
      // Held by the look (a thread of node's waiting for the FUSE daemon's answer): its signal handlers are in place.
      const waitsOnFuse = () => readdirSync(`/proc/${proc.pid}/task`).some((t) => {
        try {
          return readFileSync(`/proc/${proc.pid}/task/${t}/wchan`, 'utf8') === 'request_wait_answer';
        } catch {
          return false; // the thread ended
        }
      });
      await until(() => proc.exitCode === null && waitsOnFuse(), 30_000, 50);
      // A signal within a second of the one counted before is the same one: signalled until the second is taken.
      const message = () => (existsSync(file) ? readFileSync(file, 'utf8') : '');
      for (let i = 0; i < 10 && !/second signal/.test(message()); i++) {
        proc.kill('SIGTERM');
        await new Promise((r) => setTimeout(r, 1_200));
      }
      const line = 'diffusers-runtime: second signal (SIGTERM) while the server was still starting: no request or generation to stop; '
        + 'the stop still waits up to 15 s for the file system calls still pending (a volume slow to answer), then exits (1 where they finished); a third signal ends it at once';
      // Before: 'second signal (SIGTERM): the drain was ended, generations in flight stopped at their next step (exit 1)',
      // though there was no drain, and nothing on stderr.
      expect(message()).toBe(line);
      expect(stderr).toContain(`${line}\n`);
      fs.answer();
      expect(await ended).toEqual({ code: 1, signal: null });
      clearTimeout(kill);
      expect(message()).toBe(line);
    } finally {
      backing.cleanup();
    }
  }, 90_000);
});
