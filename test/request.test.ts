/** The request parser against the contract: scheduler names and each scheduler's step limits are checked at parse time. */
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import type { GenerationShape, ModelDefaults } from '../src/pipeline/job.js';
import { pipelineClassDefaults } from '../src/pipeline/pipeline.js';
import { schedulerLimits, strengthSchedules } from '../src/pipeline/schedulers/index.js';
import { checkServerDefaults, defaultStepsWarnings, parseInstances, shapeKey, type ParseContext } from '../src/runtime/request.js';

/** SD 1.5's shipped scheduler config, as the worker reports its limits. */
const SD15 = { _class_name: 'PNDMScheduler', num_train_timesteps: 1000, skip_prk_steps: true, steps_offset: 1, beta_schedule: 'scaled_linear' };
const defaults = (config: Record<string, unknown>): ModelDefaults => ({ ...pipelineClassDefaults('StableDiffusionPipeline', false), height: 512, width: 512, scheduler: String(config._class_name), stepRanges: schedulerLimits(config).ranges });
const ctx = (d: ModelDefaults): ParseContext => ({ cfg: loadConfig({}), defaults: d, randomSeed: () => 7 });
const parse = (inst: Record<string, unknown>, d = defaults(SD15)) => parseInstances([{ prompt: 'p', ...inst }], ctx(d));

describe('parseInstances', () => {
  it('draws a seed that leaves room for the images (image i uses seed + i), as a given seed must', () => {
    const top: ParseContext = { cfg: loadConfig({}), defaults: defaults(SD15), randomSeed: () => Number.MAX_SAFE_INTEGER };
    const [req] = parseInstances([{ prompt: 'p', num_images_per_prompt: 3 }], top);
    expect(req!.items[0]!.seed + 2).toBe(Number.MAX_SAFE_INTEGER);
    expect(req!.seedsGiven).toBe(false);
    expect(parseInstances([{ prompt: 'p' }], top)[0]!.items[0]!.seed).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('refuses steps outside the named scheduler\'s limits, naming the field and the limit', () => {
    expect(() => parse({ scheduler: 'lcm', num_inference_steps: 51 })).toThrow(
      'instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 51',
    );
    expect(parse({ scheduler: 'lcm', num_inference_steps: 50 })[0]!.shape).toMatchObject({ steps: 50, scheduler: 'lcm' });
  });

  it("takes tcd with eta as its gamma (0 to 1, diffusers' assertion) and its step limit, at parse time", () => {
    expect(parse({ scheduler: 'tcd', num_inference_steps: 4, eta: 0.3 })[0]!.shape).toMatchObject({ steps: 4, scheduler: 'tcd', eta: 0.3 });
    expect(parse({ scheduler: 'tcd', num_inference_steps: 4 })[0]!.shape.eta).toBe(0);
    expect(() => parse({ scheduler: 'tcd', num_inference_steps: 4, eta: 1.5 })).toThrow(/instances\[0\]\.eta must be .*1.*got 1\.5/);
    expect(() => parse({ scheduler: 'tcd', num_inference_steps: 51 })).toThrow(
      'instances[0].num_inference_steps must be from 1 to 50 for scheduler tcd (original_inference_steps is 50), got 51',
    );
  });

  it('refuses a size the exported UNet cannot take, naming the model\'s multiple (64 for SD 1.x)', () => {
    const sd15 = { ...defaults(SD15), sizeMultiple: 64 };
    expect(() => parse({ height: 520, width: 512 }, sd15)).toThrow('instances[0].height must be a multiple of 64 for this model (its exported UNet down-samples the latents by 8), got 520');
    expect(parse({ height: 576, width: 448 }, sd15)[0]!.shape).toMatchObject({ height: 576, width: 448 });
    // Not a multiple of 8 either: the model's multiple is named at once, not 8 first and 64 on the next try.
    expect(() => parse({ height: 512, width: 500 }, sd15)).toThrow('instances[0].width must be a multiple of 64 for this model (its exported UNet down-samples the latents by 8), got 500');
    expect(() => parse({ height: 0, width: '512' }, sd15)).toThrow(
      'instances[0].height must be a positive multiple of 64 up to 2048 for this model (its exported UNet down-samples the latents by 8), got 0; ' +
        'instances[0].width must be a positive multiple of 64 up to 2048 for this model (its exported UNet down-samples the latents by 8), got "512"',
    );
    // A model that does not say (or a UNet without down-sampling) takes any multiple of 8.
    expect(parse({ height: 520, width: 8 })[0]!.shape).toMatchObject({ height: 520, width: 8 });
  });

  it('checks the model\'s own scheduler when the request names none, its default step count included', () => {
    const { skip_prk_steps: _drop, ...prk } = SD15;
    expect(() => parse({ num_inference_steps: 3 }, defaults(prk))).toThrow(
      'instances[0].num_inference_steps must be from 4 to 999 for scheduler PNDMScheduler (PNDMScheduler without skip_prk_steps needs at least 4; num_train_timesteps is 1000; ' +
        'timestep_spacing "leading" with steps_offset 1 would start 1000 steps at timestep 1000, past the last (999)), got 3',
    );
    expect(parse({ num_inference_steps: 3 })[0]!.shape.steps).toBe(3);
    const lcm = { _class_name: 'LCMScheduler', original_inference_steps: 8 };
    expect(() => parse({}, { ...defaults(lcm), steps: 50 })).toThrow(/num_inference_steps must be from 1 to 8 for scheduler LCMScheduler \(original_inference_steps is 8\), got 50 \(not sent: the model's default; send num_inference_steps\)$/);
  });

  it('reports an unknown scheduler name once, not a step limit of another scheduler as well', () => {
    const { skip_prk_steps: _drop, ...prk } = SD15;
    expect(() => parse({ scheduler: 'warp9', num_inference_steps: 2 }, defaults(prk))).toThrow(/^instances\[0\]\.scheduler: scheduler "warp9" is unknown; use one of pndm, ddim, /);
    expect(() => parse({ scheduler: 'warp9', num_inference_steps: 2 }, defaults(prk))).not.toThrow(/num_inference_steps/);
  });

  it('refuses adapters at parse time when LORA_MAX_SETS=0, before any is looked for; a request without them is served', () => {
    const off: ParseContext = { cfg: loadConfig({ LORA_MAX_SETS: '0' }), defaults: defaults(SD15), randomSeed: () => 7 };
    expect(() => parseInstances([{ prompt: 'p', loras: ['style'] }], off)).toThrow('instances[0].loras: LoRA adapters are turned off on this server (LORA_MAX_SETS=0)');
    expect(parseInstances([{ prompt: 'p', loras: [] }], off)[0]!.loras).toBeUndefined();
    expect(parse({ loras: [{ name: 'style', scale: 0.5 }] })[0]!.loras).toEqual([{ name: 'style', scale: 0.5 }]);
  });

  it('names a bad name and a bad scale of one adapter together, as every problem of a body (docs/LORA.md)', () => {
    expect(() => parse({ loras: [{ name: '../x', scale: 11 }] })).toThrow(
      'instances[0].loras[0].name must be an adapter name (letters, digits, \'.\', \'_\', \'-\'; up to 128), got "../x"; '
      + 'instances[0].loras[0].scale must be a number from -10 to 10, got 11',
    );
  });

  it('lists a step limit with the request\'s other problems', () => {
    expect(() => parse({ scheduler: 'lcm', num_inference_steps: 60, height: 7 })).toThrow(/num_inference_steps must be from 1 to 50 .*; instances\[0\]\.height|height.*; .*num_inference_steps must be from 1 to 50/);
  });

  it("on an LCM model, refuses image-to-image whose strength leaves fewer LCM timesteps than steps, as LatentConsistencyModelImg2ImgPipeline raises", () => {
    const config = { _class_name: 'LCMScheduler', original_inference_steps: 50 };
    const lcm: ModelDefaults = { ...defaults(config), ...pipelineClassDefaults('LatentConsistencyModelPipeline', false), strengthSchedules: strengthSchedules(config) };
    const image = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC';
    expect(() => parse({ image, strength: 0.05, num_inference_steps: 4 }, lcm)).toThrow(
      'instances[0].strength 0.05 × original_inference_steps 50 leaves 2 of the LCM schedule\'s timesteps, fewer than num_inference_steps 4: ' +
        'image-to-image on an LCM model takes every step from them; send a strength of at least 0.08, or fewer steps',
    );
    expect(() => parse({ image, strength: 0, scheduler: 'lcm' }, lcm)).toThrow('instances[0].strength 0 × original_inference_steps 50 leaves 0');
    expect(() => parse({ image, num_inference_steps: 45 }, lcm)).toThrow("instances[0].strength 0.8 (not sent: this model's default for image-to-image) × original_inference_steps 50 leaves 40");
    expect(parse({ image, strength: 0.08, num_inference_steps: 4 }, lcm)[0]!.image).toMatchObject({ mode: 'img2img', strength: 0.08 });
    // The smallest that works, though 7/50 · 100 is a hair above 14 in floating point: int(50 · 0.14) = 7.
    expect(() => parse({ image, strength: 0.1, num_inference_steps: 7 }, lcm)).toThrow('send a strength of at least 0.14, or fewer steps');
    expect(parse({ image, strength: 0.14, num_inference_steps: 7 }, lcm)[0]!.image).toMatchObject({ mode: 'img2img', strength: 0.14 });
    // Other classes cut the full schedule (diffusers' LCM pipeline cannot hand them strength), as does an SD model's LCMScheduler.
    expect(parse({ image, strength: 0, scheduler: 'euler' }, lcm)[0]!.image).toMatchObject({ strength: 0 });
    expect(parse({ image, strength: 0, scheduler: 'lcm' })[0]!.image).toMatchObject({ strength: 0 });
    // Inpainting on an LCM model has no diffusers class; it runs StableDiffusionInpaintPipeline's cut.
    expect(parse({ image, mask_image: image, strength: 0.25, num_inference_steps: 4 }, lcm)[0]!.image).toMatchObject({ mode: 'inpaint' });
  });

  it('a model that reports no limits is checked against MAX_STEPS only', () => {
    const { stepRanges: _none, ...bare } = defaults(SD15);
    expect(parse({ scheduler: 'lcm', num_inference_steps: 60 }, bare)[0]!.shape.steps).toBe(60);
  });
});

describe('DEFAULT_SCHEDULER and DEFAULT_STEPS', () => {
  const withDefaults = (env: Record<string, string>, d = defaults(SD15)): ParseContext => ({ cfg: loadConfig(env), defaults: d, randomSeed: () => 7 });

  it('stand for what a request leaves out; a request that names them wins', () => {
    const c = withDefaults({ DEFAULT_SCHEDULER: 'dpmpp_2m_karras', DEFAULT_STEPS: '25' });
    expect(parseInstances([{ prompt: 'p' }], c)[0]!.shape).toMatchObject({ scheduler: 'dpmpp_2m_karras', steps: 25 });
    expect(parseInstances([{ prompt: 'p', scheduler: 'euler_a', num_inference_steps: 9 }], c)[0]!.shape).toMatchObject({ scheduler: 'euler_a', steps: 9 });
    // Unset: the model's own scheduler and step count.
    expect(parse({})[0]!.shape).toMatchObject({ scheduler: undefined, steps: 50 });
  });

  it('are checked against the loaded model at boot: an unknown name, one its config cannot build, steps outside the range', () => {
    const d = defaults(SD15);
    expect(() => checkServerDefaults(loadConfig({ DEFAULT_SCHEDULER: 'dpmpp_2m_karras', DEFAULT_STEPS: '25' }), d)).not.toThrow();
    expect(() => checkServerDefaults(loadConfig({ DEFAULT_SCHEDULER: 'Euler_A' }), d)).toThrow(/^DEFAULT_SCHEDULER: scheduler "Euler_A" is unknown; did you mean "euler_a"\?/);
    // lcm takes at most original_inference_steps (50) steps, and PNDM's Runge-Kutta warm-up needs at least 4 …
    expect(() => checkServerDefaults(loadConfig({ DEFAULT_SCHEDULER: 'lcm', DEFAULT_STEPS: '60' }), d)).toThrow(
      /^DEFAULT_STEPS must be from 1 to 50 for scheduler lcm \(original_inference_steps is 50\), got 60$/,
    );
    const prk = defaults({ ...SD15, skip_prk_steps: false });
    expect(() => checkServerDefaults(loadConfig({ DEFAULT_STEPS: '3' }), prk)).toThrow(/^DEFAULT_STEPS must be from 4 to \d+ for scheduler PNDMScheduler/);
    // … and a name the model's config cannot build at all (here a config with no beta schedule the classes know).
    const odd = { ...defaults(SD15), stepRanges: { '': { min: 1, max: 1000, why: 'x' } } };
    expect(() => checkServerDefaults(loadConfig({ DEFAULT_SCHEDULER: 'unipc' }), odd)).toThrow(/^DEFAULT_SCHEDULER=unipc cannot run from this model's scheduler\/scheduler_config\.json/);
  });

  it("DEFAULT_STEPS too few for a mode's default strength (SDXL's 0.3 and 0.9999) is said at boot, once per mode, not refused", () => {
    const xl = { ...defaults(SD15), ...pipelineClassDefaults('StableDiffusionXLPipeline', true), vaeEncoder: true };
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '1' }), xl)).toEqual([
      "DEFAULT_STEPS=1 with this model's default image-to-image strength 0.3 runs no denoising step: an image-to-image request that sends no strength gets its picture back through the VAE, not denoised; it should send strength, or DEFAULT_STEPS be at least 4",
      "DEFAULT_STEPS=1 with this model's default inpainting strength 0.9999 runs no denoising step: an inpainting request that sends no strength is refused (400); it should send strength, or DEFAULT_STEPS be at least 2",
    ]);
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '3' }), xl)).toHaveLength(1);
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '4' }), xl)).toEqual([]);
    expect(defaultStepsWarnings(loadConfig({}), xl)).toEqual([]);
    // No VAE encoder: no image-to-image to speak of; SD's 0.8 and 1.0 leave a step from DEFAULT_STEPS=2 and 1.
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '1' }), { ...xl, vaeEncoder: false })).toEqual([]);
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '1' }), { ...defaults(SD15), vaeEncoder: true })).toHaveLength(1);
  });

  it("on an LCM model, DEFAULT_STEPS is weighed against the LCM schedule's timesteps that the default image-to-image strength leaves", () => {
    const config = { _class_name: 'LCMScheduler', original_inference_steps: 50 };
    const lcm: ModelDefaults = { ...defaults(config), ...pipelineClassDefaults('LatentConsistencyModelPipeline', false), vaeEncoder: true, strengthSchedules: strengthSchedules(config) };
    // One step runs at 0.8 (from timestep 799), as LatentConsistencyModelImg2ImgPipeline runs it.
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '1' }), lcm)).toEqual([]);
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '40' }), lcm)).toEqual([]);
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '45' }), lcm)).toEqual([
      "DEFAULT_STEPS=45 with this model's default image-to-image strength 0.8 leaves 40 of the LCM schedule's timesteps (original_inference_steps 50), fewer than the steps: an image-to-image request that sends no strength is refused (400); it should send strength, or DEFAULT_STEPS be at most 40",
    ]);
    // Another scheduler on the LCM model cuts the full schedule: the rule of the other models.
    expect(defaultStepsWarnings(loadConfig({ DEFAULT_STEPS: '1', DEFAULT_SCHEDULER: 'euler' }), lcm)).toHaveLength(1);
  });
});

describe('shapeKey (what requests of one batch must share)', () => {
  const shape = (s: Partial<GenerationShape>): GenerationShape => ({ steps: 4, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0, ...s });
  const same = (a: Partial<GenerationShape>, b: Partial<GenerationShape>, model: Pick<ModelDefaults, 'scheduler' | 'guidanceEmbedding'> | undefined) =>
    shapeKey(shape(a), model) === shapeKey(shape(b), model);
  const pndm = { scheduler: 'PNDMScheduler' };
  const ddim = { scheduler: 'DDIMScheduler' };

  it("keeps eta only where the class the request runs takes it (DDIM, TCD): its name's class, else the model's own", () => {
    expect(same({ eta: 0 }, { eta: 0.5 }, pndm)).toBe(true);
    expect(same({ eta: 0 }, { eta: 0.5 }, ddim)).toBe(false);
    expect(same({ scheduler: 'euler_a', eta: 0 }, { scheduler: 'euler_a', eta: 0.5 }, ddim)).toBe(true);
    expect(same({ scheduler: 'ddim', eta: 0 }, { scheduler: 'ddim', eta: 0.5 }, pndm)).toBe(false);
    expect(same({ scheduler: 'tcd', eta: 0 }, { scheduler: 'tcd', eta: 0.5 }, pndm)).toBe(false);
    // no model loaded yet: eta counts
    expect(same({ eta: 0 }, { eta: 0.5 }, undefined)).toBe(false);
    // the scheduler name still splits
    expect(same({ scheduler: 'euler_a' }, { scheduler: 'euler' }, pndm)).toBe(false);
  });

  it("splits with and without an unconditional pass by the pipeline's rule (none on a UNet that embeds guidance); not by guidance_rescale", () => {
    expect(same({ guidance: 7.5 }, { guidance: 2 }, pndm)).toBe(true);
    expect(same({ guidance: 7.5 }, { guidance: 1 }, pndm)).toBe(false);
    expect(same({ guidance: 8.5 }, { guidance: 1 }, { scheduler: 'LCMScheduler', guidanceEmbedding: true })).toBe(true);
    expect(same({ guidance: 8.5 }, { guidance: 1 }, { scheduler: 'LCMScheduler', guidanceEmbedding: false })).toBe(false);
    expect(same({ guidance: 8.5 }, { guidance: 1 }, undefined)).toBe(false);
    expect(same({ guidanceRescale: 0 }, { guidanceRescale: 0.7 }, pndm)).toBe(true);
  });
});
