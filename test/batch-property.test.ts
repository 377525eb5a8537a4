/**
 * The batching promise as a property, over real sockets on the served demo model: a request's images are the same
 * bytes whether it runs alone or shares a batch. Pairs and triples of requests are drawn (a fixed seed, so every run
 * draws the same cases) from the fields that change the computation: size, steps, scheduler (stochastic ones
 * included), guidance with and without an unconditional pass, eta, guidance_rescale, negative prompts present, empty
 * or absent, seeds repeated or absent, images per prompt, img2img inputs and strengths, LoRA adapters and scales,
 * output formats. The requests of a case are sent at once to a server whose window lets them meet, then each alone;
 * the batch-size metric says how many cases really shared a generation.
 */
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mulberry32 } from '../src/demo/graph.js';
import { fixtureModel } from './fixtures/index.js';
import { metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson } from './helpers/server.js';

type Inst = Record<string, unknown>;
type Pred = { image: { b64: string }; seed: number };

const DRAW_SEED = 20261206;

/** A smooth picture that `variant` changes, PNG (an img2img input). */
async function picture(size: number, variant: number): Promise<string> {
  const px = Buffer.alloc(size * size * 3);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const o = (y * size + x) * 3;
      px[o] = Math.round(128 + 100 * Math.sin((x * variant) / 9));
      px[o + 1] = Math.round((255 * y) / size);
      px[o + 2] = (x + y * variant) % 64 < 32 ? 40 : 210;
    }
  }
  return (await sharp(px, { raw: { width: size, height: size, channels: 3 } }).png().toBuffer()).toString('base64');
}

/** The cases: each a list of 2 or 3 V1 instances, many of them alike in everything a batch must share. */
function drawCases(count: number, seed: number, pictures: readonly string[]): Inst[][] {
  const random = mulberry32(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!;
  const chance = (p: number) => random() < p;
  const SIZES = [[64, 64], [64, 128], [128, 64]] as const;
  const SCHEDULERS = [undefined, 'euler_a', 'ddim', 'ddpm', 'dpmpp_2m_sde', 'dpmpp_sde_karras', 'dpm2_a', 'tcd', 'lms', 'heun'];
  const NO_CFG = [0, 0.5, 1];
  const CFG = [1.5, 3, 7.5];
  const LORAS = [undefined, ['demo-style'], [{ name: 'demo-kohya', scale: 0.5 }], [{ name: 'demo-style', scale: -0.7 }, 'demo-kohya']];
  const PROMPTS = ['a red fox in the snow', 'a lighthouse at dusk', 'a bowl of ramen', 'a castle'];

  /** What a batch must share, drawn once per case and sometimes changed for one request. */
  const drawShared = (): Inst => {
    const [width, height] = pick(SIZES);
    const img = chance(0.3) ? { image: pick(pictures), strength: pick([0.5, 0.8]) } : {};
    const loras = pick(LORAS);
    return {
      width, height, num_inference_steps: pick([3, 4]), cfg: chance(0.6),
      ...(chance(0.8) ? { scheduler: pick(SCHEDULERS) } : {}), ...(chance(0.4) ? { eta: pick([0, 0.3, 1]) } : {}),
      ...img, ...(loras ? { loras } : {}),
    };
  };
  const cases: Inst[][] = [];
  for (let c = 0; c < count; c++) {
    const shared = drawShared();
    const n = chance(0.6) ? 2 : 3;
    const insts: Inst[] = [];
    for (let i = 0; i < n; i++) {
      // One field of the shared ones differs now and then: those requests must run apart (or still get their images).
      let s = { ...shared };
      if (i > 0 && chance(0.3)) {
        const other = drawShared();
        const field = pick(['width', 'num_inference_steps', 'cfg', 'scheduler', 'eta', 'image', 'strength', 'loras']);
        if (field === 'width') s = { ...s, width: other.width, height: other.height };
        else if (field === 'image') s = { ...s, image: pick(pictures), strength: s.strength ?? 0.5 };
        else if (field === 'strength') s = { ...s, image: s.image ?? pictures[0], strength: s.strength === 0.5 ? 0.8 : 0.5 };
        else s = { ...s, [field]: other[field] };
        if (s[field] === undefined) delete s[field];
      }
      const { cfg, ...fields } = s;
      const neg = pick([undefined, '', 'blurry, low quality']);
      const format = pick(['png', 'png', 'jpeg', 'webp']);
      insts.push({
        ...fields,
        prompt: pick(PROMPTS),
        guidance_scale: pick(cfg ? CFG : NO_CFG),
        ...(neg !== undefined ? { negative_prompt: neg } : {}),
        ...(chance(0.4) ? { guidance_rescale: pick([0.3, 0.7]) } : {}),
        // Seeds from a small set, so images of one seed (a request's seed + i) often meet in a batch; some absent.
        ...(chance(0.85) ? { seed: pick([1, 2, 3, 7]) } : {}),
        num_images_per_prompt: pick([1, 1, 2]),
        output_format: format,
        ...(format !== 'png' ? { quality: pick([60, 90]) } : {}),
      });
    }
    cases.push(insts);
  }
  return cases;
}

/** A case, for a failure message: the fields, the images shortened to their first characters. */
const show = (inst: Inst) => JSON.stringify({ ...inst, ...(typeof inst.image === 'string' ? { image: `${inst.image.slice(60, 72)}…` } : {}) });

/**
 * The served SD 1.x demo (img2img encoder, LoRA adapters), the SDXL demo (two text encoders, micro-conditioning,
 * force_zeros_for_empty_prompt: an absent and an empty negative prompt are other images there) and the LCM demo (the
 * guidance embedded: never an unconditional pass, so lone images run one UNet row).
 */
const MODELS = [
  { name: 'the SD 1.x demo', cases: 24, dir: async () => undefined },
  { name: 'the SDXL demo', cases: 12, dir: () => fixtureModel({ family: 'sdxl', withVaeEncoder: true }) },
  { name: 'the LCM demo', cases: 8, dir: () => fixtureModel({ family: 'lcm', withVaeEncoder: true }) },
];

describe.each(MODELS)('batching property on $name: every request of a drawn case gives the same bytes alone and batched', ({ cases: count, dir }) => {
  let alone: RuntimeHandle;
  let batched: RuntimeHandle;
  beforeAll(async () => {
    // ORT's own intra-op thread count (the runtime's default, not the suite's 1): the bytes must not depend on how a
    // batch's rows are split among threads.
    const common = { STORAGE_URI: await dir(), RESULT_CACHE_MB: '0', WARMUP_STEPS: '1', ORT_INTRA_OP_THREADS: '0' };
    [alone, batched] = await Promise.all([
      // Alone: one request at a time on a server that batches (no window: each runs at once, by itself), as a
      // request that finds no company; a MAX_BATCH_SIZE=1 server runs a lone UNet row unpadded (Job.padLoneRow).
      startRuntime({ ...common, MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '0' }, { ready: true }),
      startRuntime({ ...common, MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '400' }, { ready: true }),
    ]);
  }, 120_000);
  afterAll(async () => void (await Promise.all([alone, batched].map((s) => s?.stop()))));

  it(`${count} drawn cases of 2–3 requests`, async () => {
    const cases = drawCases(count, DRAW_SEED + count, await Promise.all([picture(64, 1), picture(64, 3), picture(96, 2)]));
    const predict = (s: RuntimeHandle, inst: Inst) => postJson(`${s.url}/v1/models/model:predict`, { instances: [inst] });
    const images = (r: { json: Record<string, unknown> }) => (r.json.predictions as Pred[]).map((p) => p.image.b64).join();
    const mismatches: string[] = [];
    let shared = 0;
    let requests = 0;
    let compared = 0;
    for (const [c, insts] of cases.entries()) {
      const count0 = await metric(batched, 'inference_batch_size_count');
      const sum0 = await metric(batched, 'inference_batch_size_sum');
      const together = await Promise.all(insts.map((inst) => predict(batched, inst)));
      const generations = (await metric(batched, 'inference_batch_size_count')) - count0;
      expect(together.map((r) => r.status), `case ${c}: ${insts.map(show).join(' ')}\n${together.map((r) => JSON.stringify(r.json).slice(0, 300)).join('\n')}`).toEqual(insts.map(() => 200));
      // Every request ran in some generation: none was served otherwise.
      expect((await metric(batched, 'inference_batch_size_sum')) - sum0, `case ${c}`).toBe(insts.length);
      if (generations < insts.length) shared++;
      requests += insts.length;
      for (const [i, inst] of insts.entries()) {
        if (inst.seed === undefined) continue;
        compared++;
        const sum1 = await metric(alone, 'inference_batch_size_sum');
        const solo = await predict(alone, inst);
        expect(solo.status, `case ${c}[${i}]: ${JSON.stringify(solo.json).slice(0, 300)}`).toBe(200);
        expect((await metric(alone, 'inference_batch_size_sum')) - sum1, `case ${c}[${i}] ran alone`).toBe(1);
        if (images(solo) !== images(together[i]!)) mismatches.push(`case ${c}[${i}] (${generations} generations for ${insts.length}): ${show(inst)} with ${insts.filter((_, j) => j !== i).map(show).join(' ')}`);
      }
    }
    console.log(`batch property: ${cases.length} cases, ${requests} requests (${compared} seeded, compared), ${shared} cases shared a generation`);
    expect(mismatches).toEqual([]);
    // Not vacuous: most cases met in a batch.
    expect(shared).toBeGreaterThanOrEqual(cases.length / 2);
  }, 300_000);
});
