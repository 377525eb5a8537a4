/**
 * @module Text to image, image to image and inpainting over ONNX Runtime, numerically as diffusers' pipelines do them
 * (PROTOCOLS.md §4.3–4.5; StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline for the image inputs).
 */
import path from 'node:path';
import { RuntimeError } from '../errors.js';
import {
  blendLatents, cutSchedule, fitImage, imageTensor, latentMask, maskTensor, maskedImage, posterior, sampleLatent, type Posterior,
} from './img2img.js';
import { unconditionalPass, type GeneratedImage, type GenerationShape, type Job, type JobItem, type ModelDefaults, type StageTimes } from './job.js';
import { isLcmPipeline, type ModelLayout } from './model.js';
import type { ModelSession } from './onnx.js';
import { ClipTokenizer } from './tokenizer.js';
import { TorchGenerator } from './random.js';
import { EDM_CLASSES } from './schedulers/edm.js';
import { checkModelScheduler, createScheduler, schedulerLimits, strengthSchedules } from './schedulers/index.js';
import type { BrownianQuery, Scheduler } from './types.js';

export interface GenerateHooks {
  /** After each step; `latents` is the current unguided latent batch [B,4,h,w]. */
  onStep?(step: number, of: number, latents: Float32Array): void | Promise<void>;
  /** Checked between steps: a generation whose clients all left stops at the next step. */
  cancelled?(): boolean;
  /** After the last UNet step, before the VAE: the UNet is free for another generation. */
  onDenoised?(): void;
  /** Makes a scheduler's noise that does not depend on the model output elsewhere, during the UNet run. */
  noise?: NoiseMaker;
}

/**
 * Another thread that makes DPM++ SDE's Brownian noise (aux.ts): ORT runs the UNet synchronously on this thread, so
 * noise made here waits for it, and noise made there overlaps it.
 */
export interface NoiseMaker {
  /** The noise of `query`, or undefined where it could not be made (the step then makes it itself). */
  make(query: BrownianQuery): Promise<Float32Array | undefined>;
  /** The generation read its last noise (or failed): what was kept for its queries can go. */
  done(): void;
}

/**
 * A session, or the promise of one whose weights are still arriving: a warm-up that starts during the download
 * encodes and denoises while the VAE decoder's file streams, and awaits each session where the pipeline reaches it.
 */
export type SessionLike = ModelSession | Promise<ModelSession>;

export interface Sessions {
  text_encoder: SessionLike;
  text_encoder_2?: SessionLike;
  /** Awaited by create(): the model's defaults and inputs depend on it. */
  unet: SessionLike;
  vae_decoder: SessionLike;
  /** Present when the export has one: image-to-image and inpainting encode their input with it. */
  vae_encoder?: SessionLike;
}

/** Token ids of `text` for the model's tokenizer number `k` (padded to its max length). */
type Tokenize = (text: string, k: number) => number[];

const LATENT_CHANNELS = 4;
const f = Math.fround;

export class Pipeline {
  private constructor(
    readonly layout: ModelLayout,
    private readonly unet: ModelSession,
    private readonly later: Omit<Sessions, 'unet'>,
    readonly tokenizers: ClipTokenizer[],
  ) {}

  /**
   * `tokenizers`: 'external' when every job brings its token ids (`Job.tokens`: the runtime's workers, whose
   * engine tokenizes on the main thread); otherwise folders whose loads are already under way, or none.
   */
  static async create(layout: ModelLayout, sessions: Sessions, tokenizers?: ReadonlyMap<string, Promise<ClipTokenizer>> | 'external'): Promise<Pipeline> {
    const { unet, ...later } = sessions;
    const own = tokenizers === 'external' ? [] : layout.tokenizerDirs.map((d) => tokenizers?.get(path.resolve(d)) ?? ClipTokenizer.load(d));
    const [u, toks] = await Promise.all([unet, Promise.all(own)]);
    const p = new Pipeline(layout, u, later, toks);
    // Fail at load, not at the first request, when the scheduler config is unusable.
    checkModelScheduler(layout.schedulerConfig);
    const cls = String(layout.schedulerConfig._class_name);
    const tType = u.input('timestep').type;
    if (EDM_CLASSES.has(cls) && (tType === 'int64' || tType === 'int32')) {
      // c_noise = ln(sigma)/4 lies between about -1.6 and 1.1: an integer input would truncate every step to -1, 0 or 1.
      throw new RuntimeError(
        'MODEL_FORMAT',
        `the UNet takes an ${tType} timestep, but ${cls} feeds it fractional values (c_noise = ln(sigma)/4); export the UNet with a float timestep (scripts/export-onnx.sh does)`,
      );
    }
    return p;
  }

  /** The same pipeline with some of its sessions replaced (an adapter set's merged UNet and text encoders). */
  async withSessions(over: Partial<Sessions>): Promise<Pipeline> {
    const { unet, ...later } = over;
    return new Pipeline(this.layout, unet ? await unet : this.unet, { ...this.later, ...later }, this.tokenizers);
  }

  /** Resolves when every session exists (rejects with the first creation that failed). */
  async ready(): Promise<void> {
    await Promise.all(Object.values(this.later));
  }

  /** The UNet's input channels: 4, or 9 for an inpainting UNet (the session's declared shape, else the config's). */
  get unetChannels(): number {
    const c = this.unet.input('sample').shape[1];
    return typeof c === 'number' && c > 0 ? c : this.layout.unet.inChannels;
  }

  /** Whether the UNet takes an LCM guidance embedding instead of classifier-free guidance. */
  get usesGuidanceEmbedding(): boolean {
    return this.unet.has('timestep_cond');
  }

  defaults(): ModelDefaults {
    const limits = schedulerLimits(this.layout.schedulerConfig);
    const size = this.layout.unet.sampleSize * this.layout.vae.scaleFactor;
    const cls = String(this.layout.schedulerConfig._class_name ?? '');
    return {
      ...pipelineClassDefaults(this.layout.pipelineClass, this.layout.isXL),
      height: size,
      width: size,
      scheduler: cls,
      guidanceEmbedding: this.usesGuidanceEmbedding,
      // #encode reads the flag on SDXL only.
      zerosForMissingNegative: this.layout.isXL && this.layout.forceZerosForEmptyPrompt,
      vaeEncoder: this.later.vae_encoder !== undefined,
      inpainting: this.unetChannels === 9,
      sizeMultiple: this.layout.unet.sizeMultiple,
      stepRanges: limits.ranges,
      schedulerRefusals: limits.refused,
      ...(isLcmPipeline(this.layout.pipelineClass) ? { strengthSchedules: strengthSchedules(this.layout.schedulerConfig) } : {}),
    };
  }

  async generate(job: Job, hooks: GenerateHooks = {}): Promise<{ images: GeneratedImage[]; times: StageTimes }> {
    const { shape, items } = job;
    const { height, width } = shape;
    const vsf = this.layout.vae.scaleFactor;
    if (height % vsf !== 0 || width % vsf !== 0) {
      throw new RuntimeError('INVALID_INPUT', `height and width must be multiples of ${vsf} for this model, got ${height}x${width}`);
    }
    const h = height / vsf;
    const w = width / vsf;
    const per = LATENT_CHANNELS * h * w;
    const seeds = items.flatMap((it) => Array.from({ length: it.numImages }, (_, i) => it.seed + i));
    const B = seeds.length;
    const lcm = this.usesGuidanceEmbedding;
    const cfg = unconditionalPass(shape.guidance, lcm);

    // Sessions still being created (a warm-up during the download) are waited for here, outside the stage timers.
    const w0 = performance.now();
    const encoders = { text_encoder: await this.later.text_encoder, ...(this.later.text_encoder_2 ? { text_encoder_2: await this.later.text_encoder_2 } : {}) };
    const t0 = performance.now();
    const given = job.tokens ? new Map(job.tokens) : undefined;
    const tokenize = (text: string, k: number): number[] => {
      const ids = given?.get(text)?.[k];
      if (ids) return ids;
      const tok = this.tokenizers[k];
      if (!tok) throw new RuntimeError('INTERNAL', 'the job carries no token ids for one of its texts');
      return tok.encode(text);
    };
    const cond = await this.#encode(items, cfg, encoders, tokenize);
    const t1 = performance.now();

    // LatentConsistencyModelImg2ImgPipeline hands strength to the scheduler's set_timesteps (LCMScheduler reads it).
    const lcmImg2img = job.init?.mode === 'img2img' && isLcmPipeline(this.layout.pipelineClass);
    const scheduler: Scheduler = createScheduler(this.layout.schedulerConfig, shape.steps, {
      ...(shape.scheduler !== undefined ? { name: shape.scheduler } : {}),
      eta: shape.eta,
      seeds,
      ...(lcmImg2img ? { strength: job.init!.strength } : {}),
    });
    // One generator per image (seed, seed+1, …): latents first, then every scheduler draw continues it (DPM++ SDE
    // reads a Brownian tree seeded with the image's seed instead: `seeds` above).
    const gens = seeds.map((s) => new TorchGenerator(s));
    const channels = this.unetChannels;
    if (channels !== LATENT_CHANNELS && channels !== 9) throw new RuntimeError('MODEL_FORMAT', `the UNet takes ${channels} input channels; 4 (text-to-image) or 9 (inpainting) are supported`);
    if (channels === 9 && job.init?.mode !== 'inpaint') {
      throw new RuntimeError('INVALID_INPUT', 'this is an inpainting model (its UNet takes 9 channels): send image and mask_image');
    }
    let timesteps: readonly number[] = scheduler.timesteps;
    let begin = 0;
    let latents: Float32Array<ArrayBufferLike>;
    let start: InitLatents | undefined;
    let vaeEncoderMs = 0;
    if (job.init) {
      // An LCMScheduler that took the strength runs every step of its schedule; the other pipelines cut the full one.
      const cut = lcmImg2img && scheduler.name === 'LCMScheduler'
        ? { begin: 0, steps: scheduler.timesteps.length }
        : cutSchedule(scheduler.timesteps.length, shape.steps, job.init.strength, scheduler.order);
      begin = cut.begin;
      scheduler.setBeginIndex(begin);
      timesteps = scheduler.timesteps.slice(begin, begin + cut.steps);
      const e0 = performance.now();
      start = await this.#initLatents(job, gens, scheduler, { begin, steps: cut.steps, per, channels });
      vaeEncoderMs = performance.now() - e0;
      latents = start.latents;
    } else {
      latents = new Float32Array(B * per);
      const sigma0 = f(scheduler.initNoiseSigma);
      gens.forEach((g, i) => {
        const d = g.randn(per);
        for (let k = 0; k < per; k++) latents[i * per + k] = f(d[k]! * sigma0);
      });
    }
    const noise = (): Float32Array => {
      const out = new Float32Array(B * per);
      gens.forEach((g, i) => out.set(g.randn(per), i * per));
      return out;
    };

    const unet = this.unet;
    const tInfo = unet.input('timestep');
    const rows = cfg ? 2 * B : B;
    // The rows the UNet runs: a lone row twice where the job asks (Job.padLoneRow), its copy's output dropped.
    const run = rows === 1 && job.padLoneRow === true ? 2 : rows;
    const twice = (a: Float32Array) => (run === rows ? a : concat(a, a));
    // Per image: a batch may mix requests of several guidance scales and guidance_rescale values (each image's math is its run alone's).
    const guidances = items.flatMap((it) => new Array<number>(it.numImages).fill(it.guidance ?? shape.guidance));
    const condDim = lcm ? Number(unet.input('timestep_cond').shape[1] ?? 256) : 0;
    const timestepCond = lcm ? concat(...guidances.map((g) => guidanceEmbedding(g, condDim))) : undefined;
    const g32 = guidances.map(f);
    const rescales = items.flatMap((it) => new Array<number>(it.numImages).fill(it.guidanceRescale ?? shape.guidanceRescale));
    if (guidances.some((g) => unconditionalPass(g, lcm) !== cfg)) throw new RuntimeError('INTERNAL', 'a batch mixes guidance scales above and at or below 1 (with and without an unconditional pass)');
    let denoised: Float32Array<ArrayBufferLike> | undefined;
    const steps = timesteps;
    try {
      for (let k = 0; k < steps.length; k++) {
        if (hooks.cancelled?.()) throw new RuntimeError('CANCELLED', 'generation cancelled: every client left');
        const t = steps[k]!;
        const doubled = cfg ? concat(latents, latents) : latents;
        const scaled = scheduler.scaleModelInput(doubled, t);
        // The inpainting UNet also takes the mask and the masked image's latents, after the scaled latents.
        const x = start?.conditioning ? withConditioning(scaled, rows, B, h * w, start.conditioning) : scaled;
        const feeds: Parameters<ModelSession['run']>[0] = {
          sample: { data: twice(x), dims: [run, channels, h, w] },
          timestep: timestepFeed(tInfo.shape, t, run),
          encoder_hidden_states: { data: twice(cond.embeds), dims: [run, cond.seq, cond.dim] },
        };
        if (cond.pooled) feeds.text_embeds = { data: twice(cond.pooled), dims: [run, cond.pooled.length / rows] };
        if (unet.has('time_ids')) feeds.time_ids = this.#timeIds(unet, shape, run, cfg);
        if (timestepCond) feeds.timestep_cond = { data: twice(timestepCond), dims: [run, timestepCond.length / B] };
        const ahead = hooks.noise ? scheduler.nextNoise?.(latents.length) : undefined;
        // make() answers undefined for a failure; the catch keeps a UNet run that throws first from leaving it unhandled
        const made = ahead ? hooks.noise!.make(ahead).catch(() => undefined) : undefined;
        const out = await unet.run(feeds, ['out_sample']);
        let e = run === rows ? out.out_sample!.data : out.out_sample!.data.slice(0, B * per);
        if (cfg) {
          const n = B * per;
          const guided = new Float32Array(n);
          for (let b = 0; b < B; b++) {
            const g = g32[b]!;
            for (let i = b * per; i < (b + 1) * per; i++) {
              const u = e[i]!;
              guided[i] = f(u + f(g * f(e[n + i]! - u)));
            }
          }
          rescaleNoiseCfg(guided, e.subarray(n), per, rescales);
          e = guided;
        }
        const z = await made;
        if (z) scheduler.giveNoise?.(ahead!, z);
        const res = scheduler.step(e, t, latents, noise);
        latents = res.prevSample;
        denoised = res.denoised;
        if (start?.blend) {
          // A 4-channel UNet inpaints by putting the known image back outside the mask after every step, noised to the
          // next timestep (and clean after the last one).
          const { known, noise: n0, mask } = start.blend;
          latents = latents.slice();
          for (let i = 0; i < B; i++) {
            const proper = k < steps.length - 1 ? scheduler.addNoise(known[i]!, n0[i]!, begin + k + 1) : known[i]!;
            blendLatents(latents.subarray(i * per, (i + 1) * per), proper, mask);
          }
        }
        await hooks.onStep?.(k + 1, steps.length, latents);
      }
    } finally {
      hooks.noise?.done();
    }
    const w1 = performance.now();
    hooks.onDenoised?.();
    const vae = await this.later.vae_decoder;
    const t2 = performance.now();
    // LCM decodes its last x0 prediction, everyone else the final sample (the blended one when inpainting).
    const final = lcm && denoised && !start?.blend ? denoised : latents;
    // Once, not per step: a NaN the UNet returned stays in the latents through every later step. A schedule that
    // repeats a sigma (some spacings at 999–1000 steps) divides by zero there, in diffusers too: said as the other cause.
    finite(final, 'the UNet', `${OVERFLOW.unet}. Or the schedule repeats a sigma, as some spacings do at 999–1000 steps: run fewer steps`);
    const images: GeneratedImage[] = [];
    const inv = f(1 / this.layout.vae.scalingFactor);
    const { latentsMean: mean, latentsStd: std } = this.layout.vae;
    const sf = f(this.layout.vae.scalingFactor);
    const plane = h * w;
    for (let i = 0; i < B; i++) {
      if (hooks.cancelled?.()) throw new RuntimeError('CANCELLED', 'generation cancelled: every client left');
      const lat = new Float32Array(per);
      if (mean && std) {
        // SDXL with per-channel statistics: latents * std / scaling_factor + mean (diffusers divides here).
        for (let k = 0; k < per; k++) {
          const c = Math.floor(k / plane);
          lat[k] = f(f(f(final[i * per + k]! * std[c]!) / sf) + mean[c]!);
        }
      } else for (let k = 0; k < per; k++) lat[k] = f(final[i * per + k]! * inv);
      // One latent at a time, as diffusers' ONNX pipeline decodes: bounded memory at large sizes.
      const out = await vae.run({ latent_sample: { data: lat, dims: [1, LATENT_CHANNELS, h, w] } });
      const dec = Object.values(out)[0]!;
      images.push({ rgb: toRgb(dec.data, height, width), width, height, seed: seeds[i]! });
    }
    const t3 = performance.now();
    const waited = t0 - w0 + (t2 - w1);
    const times: StageTimes = { textEncoderMs: t1 - t0, denoiseMs: w1 - t1 - vaeEncoderMs, vaeMs: t3 - t2, steps: timesteps.length, ...(waited >= 1 ? { sessionWaitMs: waited } : {}) };
    if (job.init) times.vaeEncoderMs = vaeEncoderMs;
    return { images, times };
  }

  /**
   * The starting latents of an image-to-image or inpainting job, drawing from each image's generator in diffusers'
   * order. Image-to-image (per image): the posterior sample of the encoded image, then the noise added at the first
   * kept timestep. Inpainting (the first generator of each item draws what the item's images share, as diffusers does
   * with a list of generators and one input image): the image's posterior sample (4-channel UNet or strength < 1), the
   * noise of every image, then the masked image's posterior sample (drawn, and unused, for a 4-channel UNet too).
   */
  async #initLatents(job: Job, gens: TorchGenerator[], scheduler: Scheduler, o: { begin: number; steps: number; per: number; channels: number }): Promise<InitLatents> {
    const init = job.init!;
    const { height: H, width: W } = job.shape;
    const { per } = o;
    const vsf = this.layout.vae.scaleFactor;
    const sf = this.layout.vae.scalingFactor;
    if (!this.later.vae_encoder) throw new RuntimeError('INVALID_INPUT', 'this model has no vae_encoder: it serves text-to-image only');
    const vae = await this.later.vae_encoder;
    const encode = async (x: Float32Array): Promise<Posterior> => {
      const out = await vae.run({ sample: { data: x, dims: [1, 3, H, W] } });
      const params = Object.values(out)[0]!.data;
      finite(params, 'the VAE encoder', OVERFLOW.vae);
      return posterior(params, per);
    };
    const B = gens.length;
    const latents = new Float32Array(B * per);
    const x = imageTensor(fitImage(init.image, W, H, init.resizeMode));
    if (init.mode === 'img2img') {
      const post = await encode(x);
      const { latentsMean: mean, latentsStd: std } = this.layout.vae;
      const stats = mean && std ? { mean, std } : undefined;
      gens.forEach((g, i) => {
        const start = sampleLatent(post, sf, (n) => g.randn(n), stats);
        latents.set(o.steps > 0 ? scheduler.addNoise(start, g.randn(per), o.begin) : start, i * per);
      });
      return { latents };
    }
    // Inpainting.
    const mask = maskTensor(fitImage(init.mask!, W, H, init.resizeMode));
    const itemOf: number[] = job.items.flatMap((it, j) => Array.from({ length: it.numImages }, () => j));
    const firstOf = job.items.map((_, j) => itemOf.indexOf(j));
    const strengthMax = init.strength === 1;
    const imagePost = o.channels === LATENT_CHANNELS || !strengthMax ? await encode(x) : undefined;
    const known = imagePost ? firstOf.map((i) => sampleLatent(imagePost, sf, (n) => gens[i]!.randn(n))) : [];
    const noises = gens.map((g) => g.randn(per));
    const sigma0 = f(scheduler.initNoiseSigma);
    noises.forEach((n, i) => {
      if (strengthMax) for (let k = 0; k < per; k++) latents[i * per + k] = f(n[k]! * sigma0);
      else latents.set(scheduler.addNoise(known[itemOf[i]!]!, n, o.begin), i * per);
    });
    const small = latentMask(mask, W, H, vsf);
    if (o.channels === 9) {
      const maskedPost = await encode(maskedImage(x, mask));
      const masked = firstOf.map((i) => sampleLatent(maskedPost, sf, (n) => gens[i]!.randn(n)));
      return { latents, conditioning: { mask: small, masked: itemOf.map((j) => masked[j]!) } };
    }
    // diffusers encodes the masked image even for a 4-channel UNet, which ignores it: only its draw matters here.
    if (imagePost?.std) for (const i of firstOf) gens[i]!.randn(per);
    return { latents, blend: { mask: small, known: itemOf.map((j) => known[j]!), noise: noises } };
  }

  /** Prompt embeddings [negative rows; positive rows] (or positive only), each item repeated per image. */
  async #encode(items: JobItem[], cfg: boolean, enc: { text_encoder: ModelSession; text_encoder_2?: ModelSession }, tokenize: Tokenize): Promise<{ embeds: Float32Array; pooled?: Float32Array; seq: number; dim: number }> {
    const repeat = (rows: Float32Array[]) => items.flatMap((it, i) => Array.from({ length: it.numImages }, () => rows[i]!));
    const enc1 = enc.text_encoder;
    if (!this.layout.isXL) {
      const pos = await this.#runEncoder(enc1, tokenize, 0, items.map((it) => it.prompt), 'last_hidden_state');
      let rows = repeat(pos.rows);
      if (cfg) {
        const neg = await this.#runEncoder(enc1, tokenize, 0, items.map((it) => it.negativePrompt ?? ''), 'last_hidden_state');
        rows = [...repeat(neg.rows), ...rows];
      }
      return { embeds: concat(...rows), seq: pos.seq, dim: pos.dim };
    }
    // SDXL: penultimate hidden states of both encoders, concatenated on the feature axis; pooled from encoder 2.
    const enc2 = enc.text_encoder_2!;
    // The second encoder's own tokenizer (tokenizer_2) when the export has one.
    const k2 = this.layout.tokenizerDirs.length > 1 ? 1 : 0;
    const both = async (texts: string[]) => {
      const a = await this.#runEncoder(enc1, tokenize, 0, texts, penultimate(enc1));
      const b = await this.#runEncoder(enc2, tokenize, k2, texts, penultimate(enc2), 'text_embeds');
      const rows = a.rows.map((ra, i) => interleave(ra, b.rows[i]!, a.seq, a.dim, b.dim));
      return { rows, pooled: b.pooled!, seq: a.seq, dim: a.dim + b.dim };
    };
    const pos = await both(items.map((it) => it.prompt));
    let rows = repeat(pos.rows);
    let pooled = repeat(pos.pooled);
    if (cfg) {
      // Zeros per item, not per batch: a batch may join requests with and without a negative prompt.
      const encoded = items.filter((it) => it.negativePrompt !== undefined || !this.layout.forceZerosForEmptyPrompt);
      const neg = encoded.length > 0 ? await both(encoded.map((it) => it.negativePrompt ?? '')) : undefined;
      const at = items.map((it) => encoded.indexOf(it));
      const negRows = at.map((j, i) => (j >= 0 ? neg!.rows[j]! : new Float32Array(pos.rows[i]!.length)));
      const negPooled = at.map((j, i) => (j >= 0 ? neg!.pooled[j]! : new Float32Array(pos.pooled[i]!.length)));
      rows = [...repeat(negRows), ...rows];
      pooled = [...repeat(negPooled), ...pooled];
    }
    return { embeds: concat(...rows), pooled: concat(...pooled), seq: pos.seq, dim: pos.dim };
  }

  /**
   * One encoder run per distinct text, at batch 1. ORT's CPU text-encoder kernels are not batch-invariant (the
   * same input_ids row gives outputs a few ulp apart at batch 1 and batch 2, optimisations on or off), so
   * encoding a dynamic batch together would make a batched image differ from the same request run alone.
   * Batch 1 is also what diffusers does for a single prompt; the encoder is a small part of a generation.
   */
  async #runEncoder(session: ModelSession, tokenize: Tokenize, k: number, texts: string[], output: string, pooledName?: string) {
    let seq = 0;
    const names = pooledName ? [output, pooledName] : [output];
    const memo = new Map<string, { row: Float32Array; pooled: Float32Array | undefined; dim: number }>();
    for (const t of texts) {
      if (memo.has(t)) continue;
      const ids = tokenize(t, k);
      seq = ids.length;
      const out = await session.run({ input_ids: { data: ids, dims: [1, seq] } }, names);
      const hs = out[output]!;
      const p = pooledName ? out[pooledName] : undefined;
      finite(hs.data, session.name, OVERFLOW.text);
      if (p) finite(p.data, session.name, OVERFLOW.text);
      memo.set(t, { row: hs.data.slice(0, seq * hs.dims[2]!), pooled: p ? p.data.slice(0, p.dims[1]!) : undefined, dim: hs.dims[2]! });
    }
    const got = texts.map((t) => memo.get(t)!);
    const dim = got[0]!.dim;
    const rows = got.map((g) => g.row);
    const pooled = pooledName ? got.map((g) => g.pooled!) : undefined;
    return { rows, seq, dim, pooled };
  }

  #timeIds(unet: ModelSession, shape: GenerationShape, rows: number, cfg: boolean) {
    const n = Number(unet.input('time_ids').shape[1] ?? 6);
    const { height: H, width: W } = shape;
    // Refiner exports take an aesthetic score instead of the target size (6.0 positive, 2.5 negative).
    const row = (neg: boolean) => (n === 5 ? [H, W, 0, 0, neg ? 2.5 : 6.0] : [H, W, 0, 0, H, W]);
    const data: number[] = [];
    for (let r = 0; r < rows; r++) data.push(...row(cfg && r < rows / 2));
    return { data: Float32Array.from(data), dims: [rows, n] };
  }
}

/**
 * The `__call__` defaults of diffusers' pipeline classes for a model, by the class its model_index.json names, in the
 * family AutoPipelineForText2Image / ForImage2Image / ForInpainting pick from it: StableDiffusion{,Img2Img,Inpaint}Pipeline
 * 50 steps, guidance 7.5, strength 0.8 / 1.0; StableDiffusionXL{,Img2Img}Pipeline guidance 5.0, strength 0.3, and
 * StableDiffusionXLInpaintPipeline 7.5, 0.9999; LatentConsistencyModel{,Img2Img}Pipeline 4 steps, 8.5 (embedded).
 * The scheduler has no say: an SD or SDXL pipeline with an LCMScheduler (an LCM-LoRA fused in, or lcm-sdxl's UNet,
 * which embeds the guidance) gets its class's 50 steps and guidance, as in diffusers (DEFAULT_STEPS sets fewer).
 */
export function pipelineClassDefaults(pipelineClass: string, isXL: boolean): Pick<ModelDefaults, 'steps' | 'guidance' | 'modes'> {
  if (isLcmPipeline(pipelineClass)) {
    // diffusers has no LCM inpainting pipeline (AutoPipelineForInpainting refuses the model): LCM's, at strength 1.
    return { steps: 4, guidance: 8.5, modes: { img2img: { guidance: 8.5, strength: 0.8 }, inpaint: { guidance: 8.5, strength: 1 } } };
  }
  if (isXL) return { steps: 50, guidance: 5, modes: { img2img: { guidance: 5, strength: 0.3 }, inpaint: { guidance: 7.5, strength: 0.9999 } } };
  return { steps: 50, guidance: 7.5, modes: { img2img: { guidance: 7.5, strength: 0.8 }, inpaint: { guidance: 7.5, strength: 1 } } };
}

/** What an image job starts from (Pipeline.#initLatents). */
interface InitLatents {
  latents: Float32Array;
  /** Inpainting UNet: the mask at latent size and each image's masked-image latents, concatenated to every UNet input. */
  conditioning?: { mask: Float32Array; masked: Float32Array[] };
  /** 4-channel UNet inpainting: per image, the known latents and the noise they are re-noised with after each step. */
  blend?: { mask: Float32Array; known: Float32Array[]; noise: Float32Array[] };
}

/** [rows, 4, h, w] latents → [rows, 9, h, w]: latents, mask, masked-image latents (row r is image r mod B). */
function withConditioning(x: Float32Array, rows: number, B: number, hw: number, c: NonNullable<InitLatents['conditioning']>): Float32Array {
  const out = new Float32Array(rows * 9 * hw);
  for (let r = 0; r < rows; r++) {
    const o = r * 9 * hw;
    out.set(x.subarray(r * 4 * hw, (r + 1) * 4 * hw), o);
    out.set(c.mask, o + 4 * hw);
    out.set(c.masked[r % B]!, o + 5 * hw);
  }
  return out;
}

/** The highest-but-one `hidden_states.N` output: diffusers' SDXL uses the penultimate layer. */
function penultimate(s: ModelSession): string {
  const idx = [...s.outputs.keys()].map((k) => /^hidden_states\.(\d+)$/.exec(k)?.[1]).filter((x): x is string => x !== undefined).map(Number);
  if (idx.length < 2) throw new RuntimeError('MODEL_FORMAT', `${s.name} has no hidden_states.N outputs; an SDXL export needs them`);
  return `hidden_states.${Math.max(...idx) - 1}`;
}

/** Concatenates two [seq, a] and [seq, b] rows into [seq, a+b]. */
function interleave(x: Float32Array, y: Float32Array, seq: number, a: number, b: number): Float32Array {
  const out = new Float32Array(seq * (a + b));
  for (let s = 0; s < seq; s++) {
    out.set(x.subarray(s * a, (s + 1) * a), s * (a + b));
    out.set(y.subarray(s * b, (s + 1) * b), s * (a + b) + a);
  }
  return out;
}

export function concat(...parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** The timestep feed the model declares: a scalar [] (optimum ≥ 1.24) or one per batch row. */
function timestepFeed(shape: readonly (number | string)[], t: number, rows: number) {
  if (shape.length === 0) return { data: [t], dims: [] as number[] };
  const n = typeof shape[0] === 'number' && shape[0] > 0 ? shape[0] : rows;
  return { data: new Array<number>(n).fill(t), dims: [n] };
}

/**
 * LCM's guidance embedding of one image: w = (g - 1)·1000, sinusoidal with `dim` features (diffusers
 * get_guidance_scale_embedding).
 */
export function guidanceEmbedding(guidance: number, dim: number): Float32Array {
  const w = f(f(guidance - 1) * 1000);
  const half = dim / 2;
  const k = f(Math.log(10000) / (half - 1));
  const out = new Float32Array(dim);
  for (let i = 0; i < half; i++) {
    const e = f(w * f(Math.exp(f(-k * i))));
    out[i] = f(Math.sin(e));
    out[half + i] = f(Math.cos(e));
  }
  return out;
}

/**
 * diffusers' rescale_noise_cfg: match the guided prediction's std to the text prediction's, per sample (its std is over
 * every dim but the batch's), so each image takes its own factor; one of 0 is skipped, as the pipeline skips it.
 */
function rescaleNoiseCfg(guided: Float32Array, text: Float32Array, per: number, phis: readonly number[]): void {
  const std = (a: Float32Array, o: number) => {
    let m = 0;
    for (let i = 0; i < per; i++) m += a[o + i]!;
    m /= per;
    let v = 0;
    for (let i = 0; i < per; i++) v += (a[o + i]! - m) ** 2;
    return Math.sqrt(v / (per - 1));
  };
  for (const [b, phi] of phis.entries()) {
    if (!(phi > 0)) continue;
    const o = b * per;
    const ratio = std(text, o) / std(guided, o);
    for (let i = 0; i < per; i++) {
      const g = guided[o + i]!;
      guided[o + i] = f(phi * g * ratio + (1 - phi) * g);
    }
  }
}

const REEXPORT = 'export the model again with scripts/export-onnx.sh, which keeps in float32 what diffusers computes in float32 (docs/EXPORT.md)';
/** Why a component returns NaN or ±Infinity, and what to do: a float16 graph that overflows (docs/MODELS.md). */
const OVERFLOW = {
  text: `its graph overflows in float16; ${REEXPORT}`,
  unet: `its graph overflows, as float16 exports of SD 2.x UNets do without their attention in float32 (upcast_attention); ${REEXPORT}`,
  vae: `its graph overflows, as SDXL's VAE does in float16 (diffusers runs it in float32: force_upcast); ${REEXPORT}`,
} as const;

/**
 * Refuses a component's output that holds NaN or ±Infinity. Past the UNet the scheduler carries them into every later
 * step, and the image converts NaN to 0: a black image answered as a success, which is what diffusers returns (with
 * numpy's "invalid value encountered in cast").
 */
function finite(x: Float32Array, what: string, why: string): void {
  // A float64 sum of finite float32 values cannot overflow: it is finite unless a value is NaN or ±Infinity.
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += x[i]!;
  if (!Number.isFinite(sum)) throw overflowed(what, why);
}
/** `why`: the cause and what to do (OVERFLOW). */
const overflowed = (what: string, why: string) => new RuntimeError('MODEL_FORMAT', `${what} returned NaN or infinite values: ${why}`);

/**
 * VAE output [1,3,H,W] in [-1,1] → uint8 HWC: clip(x/2+0.5) in float32, ×255 in float32, round half to even. A NaN
 * (a VAE that overflowed) fails it: stored as 0, it would make a black image.
 */
export function toRgb(x: Float32Array, H: number, W: number): Uint8Array {
  const plane = H * W;
  const out = new Uint8Array(plane * 3);
  let nan = false;
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < plane; p++) {
      let v = f(f(x[c * plane + p]! / 2) + 0.5);
      v = v < 0 ? 0 : v > 1 ? 1 : v;
      // Only NaN passes the clip unclipped and fails this.
      if (!(v <= 1)) nan = true;
      const y = f(v * 255);
      let r = Math.round(y);
      if (r - y === 0.5 && (r & 1) === 1) r -= 1;
      out[p * 3 + c] = r;
    }
  }
  if (nan) throw overflowed('the VAE decoder', OVERFLOW.vae);
  return out;
}

/**
 * A cheap latent → RGB preview (h/8 × w/8): the linear approximation of SD's VAE that image UIs use.
 * Good enough to watch composition emerge; not a substitute for the decoder.
 */
export function latentPreview(lat: Float32Array, h: number, w: number): Uint8Array {
  const M = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
  ];
  const plane = h * w;
  const out = new Uint8Array(plane * 3);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      let v = 0;
      for (let l = 0; l < 4; l++) v += lat[l * plane + p]! * M[l]![c]!;
      out[p * 3 + c] = Math.max(0, Math.min(255, Math.round((v + 1) * 127.5)));
    }
  }
  return out;
}
