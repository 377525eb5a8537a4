/**
 * The result cache keys a prompt by its token ids, per tokenizer, as the text encoders are fed them: over HTTP with the
 * built server on the demo models, prompts spelled differently that tokenize alike give byte-identical images with
 * the cache off, and the second is a hit with it on; prompts whose ids differ (in any tokenizer: SDXL's second pads
 * with "!", id 0) are generated, never answered from the entry of another.
 */
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import type { GenerationRequest } from '../src/runtime/request.js';
import { createResultCache } from '../src/runtime/result-cache.js';
import { fixtureModel } from './fixtures/index.js';
import { metric } from './helpers/runtime.js';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';

type Pred = { image: { b64: string } };
type Inst = Record<string, unknown>;

const predict = async (s: ServerHandle, inst: Inst): Promise<string> => {
  const r = await postJson(`${s.url}/v1/models/model:predict`, { instances: [inst] });
  expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
  return (r.json.predictions as Pred[])[0]!.image.b64;
};

/** Whether `b` is answered from the cache right after `a` (a generation, or a hit on an earlier entry), and both images. */
async function secondIsHit(s: ServerHandle, a: Inst, b: Inst): Promise<{ hit: boolean; first: string; second: string }> {
  const first = await predict(s, a);
  const [hits0, made0] = [await metric(s, 'result_cache_hits_total'), await metric(s, 'images_generated_total')];
  const second = await predict(s, b);
  const [hits, made] = [await metric(s, 'result_cache_hits_total') - hits0, await metric(s, 'images_generated_total') - made0];
  // Exactly one of the two: a hit generates nothing, a miss generates its image.
  expect(hits + made).toBe(1);
  return { hit: hits === 1, first, second };
}

const cats = (n: number) => Array.from({ length: n }, () => 'cat').join(' ');
const base = { num_inference_steps: 3, height: 64, width: 64, seed: 11, guidance_scale: 7.5 };

/** Pairs spelled differently that every tokenizer of SD 1.x reads alike (checked below against the model's tokenizer). */
const ALIKE: Array<[string, Inst, Inst]> = [
  ['case', { prompt: 'A Red FOX in the Snow' }, { prompt: 'a red fox in the snow' }],
  ['whitespace', { prompt: 'a red fox in the snow' }, { prompt: '  a\tred \u00a0 fox\n\nin the   snow ' }],
  ['NFC and NFD', { prompt: 'café crème brûlée'.normalize('NFC') }, { prompt: 'café crème brûlée'.normalize('NFD') }],
  ['HTML entities (unescaped twice)', { prompt: 'fish & chips' }, { prompt: 'fish &amp;amp; chips' }],
  ['text past the 75-token cut', { prompt: `${cats(80)} blue` }, { prompt: `${cats(80)} green` }],
  ['an explicit end-of-text before padding with it', { prompt: 'a red fox' }, { prompt: 'a red fox<|endoftext|>' }],
  ['a missing and an empty negative prompt', { prompt: 'a red fox' }, { prompt: 'a red fox', negative_prompt: '' }],
  ['a negative prompt in another spelling', { prompt: 'a red fox', negative_prompt: 'Blurry,  Low Quality' }, { prompt: 'a red fox', negative_prompt: 'blurry, low quality' }],
];
/** Pairs whose ids differ: each must be generated. */
const APART: Array<[string, Inst, Inst]> = [
  ['another word', { prompt: 'a red fox' }, { prompt: 'a blue fox' }],
  ['punctuation', { prompt: 'a red fox' }, { prompt: 'a red fox!' }],
  ['the 75th token, the last one kept', { prompt: `${cats(74)} blue` }, { prompt: `${cats(74)} green` }],
  ['the negative prompt', { prompt: 'a red fox', negative_prompt: 'blurry' }, { prompt: 'a red fox', negative_prompt: 'sharp' }],
];

let sd: string;
let xl: string;
const servers: ServerHandle[] = [];
const start = async (dir: string, mb: string) => {
  const s = await startServer({ STORAGE_URI: dir, EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', RESULT_CACHE_MB: mb }, { ready: true });
  servers.push(s);
  return s;
};
beforeAll(async () => {
  [sd, xl] = await Promise.all([fixtureModel(), fixtureModel({ family: 'sdxl' })]);
}, 120_000);
afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop()));
});

describe('the key (unit)', () => {
  const req = (prompt: string, negativePrompt: string | undefined): GenerationRequest => ({
    shape: { steps: 2, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0 },
    items: [{ prompt, negativePrompt, seed: 1, numImages: 1 }],
    seedsGiven: true,
    output: { format: 'png', quality: undefined, uri: undefined },
    previewEvery: 0,
  });
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await ClipTokenizer.load(path.join(await fixtureModel(), 'tokenizer'));
  }, 120_000);
  const cache = (zeros: boolean | undefined, loaded = true) => createResultCache('m', 1000, {
    defaults: () => (zeros === undefined ? undefined : { scheduler: 'PNDMScheduler', zerosForMissingNegative: zeros }),
    encode: (t) => (loaded ? [tok.encode(t)] : undefined),
  });
  const same = (c: ReturnType<typeof cache>, a: [string, string?], b: [string, string?]) => c.keyOf(req(...a)) === c.keyOf(req(...b));

  it('is the token ids once the tokenizers are loaded, the text before', () => {
    expect(same(cache(false), ['A  Fox'], ['a fox'])).toBe(true);
    expect(same(cache(false), ['a fox', 'Blurry'], ['a fox', ' blurry '])).toBe(true);
    expect(same(cache(false), ['a fox'], ['a fox!'])).toBe(false);
    expect(same(cache(false, false), ['A  Fox'], ['a fox'])).toBe(false);
    expect(cache(false).keyOf(req('a fox', undefined))).toMatch(/^[0-9a-f]{64}$/);
  });

  it('merges a missing with an empty negative prompt only where the model encodes the missing one as ""', () => {
    expect(same(cache(false), ['a fox'], ['a fox', ''])).toBe(true);
    expect(same(cache(true), ['a fox'], ['a fox', ''])).toBe(false);
    expect(same(cache(true), ['a fox', ''], ['a fox', '  '])).toBe(true);
    // Which it is, is unknown without the model's defaults: the texts key as sent.
    expect(same(cache(undefined), ['a fox'], ['a fox', ''])).toBe(false);
  });
});

describe('SD 1.x (one tokenizer, padded with its end-of-text token)', () => {
  let off: ServerHandle;
  let on: ServerHandle;
  let tok: ClipTokenizer;
  beforeAll(async () => {
    [off, on, tok] = await Promise.all([start(sd, '0'), start(sd, '4'), ClipTokenizer.load(path.join(sd, 'tokenizer'))]);
  }, 120_000);
  const ids = (inst: Inst) => [tok.encode(inst.prompt as string), tok.encode((inst.negative_prompt as string | undefined) ?? '')];

  it.each(ALIKE)('%s: same ids, byte-identical images with the cache off, and a hit with it on', async (_, a, b) => {
    expect(ids(a)).toEqual(ids(b));
    const uncached = await secondIsHit(off, { ...base, ...a }, { ...base, ...b });
    expect(uncached.hit).toBe(false);
    expect(uncached.second === uncached.first).toBe(true);
    const cached = await secondIsHit(on, { ...base, ...a }, { ...base, ...b });
    expect(cached.hit).toBe(true);
    expect(cached.second === cached.first).toBe(true);
    // and what the hit serves is what a generation of b gives
    expect(cached.second === uncached.second).toBe(true);
  });

  it.each(APART)('%s: other ids, generated (not a hit)', async (_, a, b) => {
    expect(ids(a)).not.toEqual(ids(b));
    const cached = await secondIsHit(on, { ...base, ...a, seed: 12 }, { ...base, ...b, seed: 12 });
    expect(cached.hit).toBe(false);
  });

  it('a V2 hit answers with its own request id', async () => {
    const infer = (id: string, prompt: string) => postJson(`${on.url}/v2/models/model/infer`, {
      id, inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: [prompt] }],
      parameters: { ...base, seed: 13 },
    });
    const first = await infer('first', 'A Lighthouse');
    const hits0 = await metric(on, 'result_cache_hits_total');
    const again = await infer('second', 'a   lighthouse');
    expect([first.status, again.status]).toEqual([200, 200]);
    expect(await metric(on, 'result_cache_hits_total')).toBe(hits0 + 1);
    expect(again.json.id).toBe('second');
    expect(JSON.stringify(again.json.outputs)).toBe(JSON.stringify(first.json.outputs));
  });
});

describe('SDXL (two tokenizers; the second pads with "!", id 0; a missing negative prompt is zeros)', () => {
  let off: ServerHandle;
  let on: ServerHandle;
  let toks: ClipTokenizer[];
  beforeAll(async () => {
    [off, on, toks] = await Promise.all([start(xl, '0'), start(xl, '4'),
      Promise.all([ClipTokenizer.load(path.join(xl, 'tokenizer')), ClipTokenizer.load(path.join(xl, 'tokenizer_2'))])]);
  }, 120_000);
  const ids = (p: string) => toks.map((t) => t.encode(p));

  it('prompts alike in both tokenizers: identical images with the cache off, a hit with it on', async () => {
    const [a, b] = [{ ...base, prompt: 'A Red FOX &amp; the   Snow' }, { ...base, prompt: 'a red fox & the snow' }];
    expect(ids(a.prompt)).toEqual(ids(b.prompt));
    const uncached = await secondIsHit(off, a, b);
    expect(uncached.second === uncached.first).toBe(true);
    const cached = await secondIsHit(on, a, b);
    expect(cached.hit).toBe(true);
    expect(cached.second === uncached.second).toBe(true);
  });

  it('an end-of-text alike in the first tokenizer but not the second: other images, and not a hit', async () => {
    const [a, b] = [{ ...base, seed: 21, prompt: 'a red fox' }, { ...base, seed: 21, prompt: 'a red fox<|endoftext|>' }];
    const [ia, ib] = [ids(a.prompt), ids(b.prompt)];
    expect(ia[0]).toEqual(ib[0]);
    expect(ia[1]).not.toEqual(ib[1]);
    const uncached = await secondIsHit(off, a, b);
    expect(uncached.second === uncached.first).toBe(false);
    expect((await secondIsHit(on, a, b)).hit).toBe(false);
  });

  it('a missing and an empty negative prompt: other images (zeros against the encoded ""), and not a hit', async () => {
    const [a, b] = [{ ...base, seed: 22, prompt: 'a red fox' }, { ...base, seed: 22, prompt: 'a red fox', negative_prompt: '' }];
    const uncached = await secondIsHit(off, a, b);
    expect(uncached.second === uncached.first).toBe(false);
    expect((await secondIsHit(on, a, b)).hit).toBe(false);
    // An empty and a blank negative prompt tokenize alike: a hit.
    expect((await secondIsHit(on, b, { ...b, negative_prompt: ' \n ' })).hit).toBe(true);
  });
});
