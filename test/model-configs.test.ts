/**
 * Config files as real repositories ship them (test/fixtures/model-configs, each file's source in its README), read
 * the way a boot reads them, and compared with what diffusers and transformers make of the same files.
 */
import { copyFileSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { referenceDir } from '../scripts/reference.js';
import { pipelineSchedulerConfig, readLayout } from '../src/pipeline/model.js';
import { checkModelScheduler, createScheduler, schedulerLimits } from '../src/pipeline/schedulers/index.js';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import { editJson, fixtureVariant } from './fixtures/index.js';
import { startRuntime } from './helpers/runtime.js';

const FIX = path.resolve(import.meta.dirname, 'fixtures/model-configs');
const work = mkdtempSync(path.join(tmpdir(), 'model-configs-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface TokenizerCases {
  transformers: string;
  folders: Record<string, { files: string[]; pad_token_id: number; model_max_length: number; cases: { text: string; ids: number[] }[] }>;
}

/** A tokenizer folder: the CLIP vocabulary with the given config files beside it. */
function tokenizerFolder(name: string, files: readonly string[]): string {
  const dir = path.join(work, name.replace(/[^\w-]+/g, '_'));
  const vocab = path.join(referenceDir(), 'clip-tokenizer');
  cpSync(vocab, dir, { recursive: true, filter: (src) => src === vocab || /\/(vocab\.json|merges\.txt)$/.test(src) });
  for (const f of files) copyFileSync(path.join(FIX, f), path.join(dir, path.basename(f)));
  return dir;
}

describe('tokenizer config files: the ids transformers gives for them (scripts/make-tokenizer-config-cases.py)', () => {
  const ref = JSON.parse(readFileSync(path.join(FIX, 'tokenizer-cases.json'), 'utf8')) as TokenizerCases;
  for (const [name, folder] of Object.entries(ref.folders)) {
    it(`${name} (${folder.files.map((f) => path.basename(f)).join(', ')})`, async () => {
      const tok = await ClipTokenizer.load(tokenizerFolder(name, folder.files));
      expect(tok.padId).toBe(folder.pad_token_id);
      expect(tok.maxLength).toBe(folder.model_max_length);
      for (const c of folder.cases) expect(tok.encode(c.text), JSON.stringify(c.text)).toEqual(c.ids);
    });
  }

  it('a "!" in a prompt is the pad token where the config pads with "!" (SD 2.x, SDXL tokenizer_2), BPE\'s "!</w>" elsewhere', async () => {
    const two = await ClipTokenizer.load(tokenizerFolder('xl2', ['sdxl/tokenizer_2/tokenizer_config.json', 'sdxl/tokenizer_2/special_tokens_map.json']));
    const one = await ClipTokenizer.load(tokenizerFolder('xl1', ['sdxl/tokenizer/tokenizer_config.json', 'sdxl/tokenizer/special_tokens_map.json']));
    expect(two.tokenize('a cat!')).toEqual([320, 2368, 0]);
    expect(one.tokenize('a cat!')).toEqual([320, 2368, 256]);
  });

  it('an added_tokens_decoder or added_tokens.json that cannot be read fails the load naming the file', async () => {
    const dir = tokenizerFolder('bad-added', []);
    writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ added_tokens_decoder: { x: { content: '<t>' } } }));
    await expect(ClipTokenizer.load(dir)).rejects.toThrow(/tokenizer_config\.json added_tokens_decoder entry "x" is not an id/);
    writeFileSync(path.join(dir, 'tokenizer_config.json'), '{}');
    writeFileSync(path.join(dir, 'added_tokens.json'), JSON.stringify({ '<t>': 'one' }));
    await expect(ClipTokenizer.load(dir)).rejects.toThrow(/added_tokens\.json gives "<t>" an id that is not an integer/);
  });
});

/** A copy of a demo model of the family with some of its config files replaced by real ones (paths in FIX). */
function modelWith(
  name: string,
  family: 'sd15' | 'sd2' | 'sdxl',
  files: Record<string, string>,
  edit?: (dir: string) => void,
  opts: { inpainting?: boolean } = {},
): Promise<string> {
  return fixtureVariant(path.join(work, name), { family, ...opts }, (dir) => {
    for (const [to, from] of Object.entries(files)) copyFileSync(path.join(FIX, from), path.join(dir, to));
    edit?.(dir);
  });
}

/**
 * Where a fixture folder's config files go in a model: each of model_index.json, the scheduler's and the UNet's the
 * folder has, and its VAE decoder's (a diffusers folder's `vae/`, an ONNX export's `vae_decoder/`).
 */
function repoFiles(folder: string): Record<string, string> {
  const files: Record<string, string> = {};
  for (const [to, from] of [
    ['model_index.json', 'model_index.json'],
    ['scheduler/scheduler_config.json', 'scheduler/scheduler_config.json'],
    ['unet/config.json', 'unet/config.json'],
    ['vae_decoder/config.json', 'vae/config.json'],
    ['vae_decoder/config.json', 'vae_decoder/config.json'],
  ]) {
    if (existsSync(path.join(FIX, folder, from!))) files[to!] = `${folder}/${from}`;
  }
  return files;
}

describe('model_index.json', () => {
  it('SDXL: force_zeros_for_empty_prompt as the file says, true where it is absent (StableDiffusionXLPipeline\'s default)', async () => {
    const real = await modelWith('xl-index', 'sdxl', { 'model_index.json': 'sdxl/model_index.json' });
    expect(readLayout(real).forceZerosForEmptyPrompt).toBe(true);
    const absent = await modelWith('xl-index-absent', 'sdxl', { 'model_index.json': 'sdxl/model_index.json' }, (d) =>
      editJson(path.join(d, 'model_index.json'), (c) => delete c.force_zeros_for_empty_prompt),
    );
    expect(readLayout(absent).forceZerosForEmptyPrompt).toBe(true);
    const off = await modelWith('xl-index-off', 'sdxl', { 'model_index.json': 'sdxl/model_index.json' }, (d) =>
      editJson(path.join(d, 'model_index.json'), (c) => (c.force_zeros_for_empty_prompt = false)),
    );
    expect(readLayout(off).forceZerosForEmptyPrompt).toBe(false);
  });

  it('old ONNX exports (StableDiffusionOnnxPipeline, safety_checker, requires_safety_checker, vae_encoder) load as SD 1.x with the rewrites', async () => {
    for (const from of ['sd14-onnx/model_index.json', 'meinamix-onnx/model_index.json']) {
      const dir = await modelWith(from.split('/')[0]!, 'sd15', { 'model_index.json': from, 'scheduler/scheduler_config.json': 'sd14-onnx/scheduler/scheduler_config.json' });
      const layout = readLayout(dir);
      expect(layout.isXL).toBe(false);
      expect(layout.forceZerosForEmptyPrompt).toBe(false);
      // The PNDM config has no clip_sample: the SD pipeline's rewrite leaves nothing to log; steps_offset is already 1.
      expect(layout.rewrites).toEqual([]);
      expect(createScheduler(layout.schedulerConfig, 50).timesteps.slice(0, 3)).toEqual([981, 961, 961]);
    }
  });
});

describe('the scheduler class: model_index.json\'s "scheduler" entry, as diffusers\' from_pretrained loads it', () => {
  it('wins over scheduler_config.json\'s _class_name when they differ, and the difference is logged', async () => {
    // The SD 1.4 ONNX model_index.json lists PNDMScheduler; the SDXL scheduler config says EulerDiscreteScheduler.
    const dir = await modelWith('listed-class', 'sd15', { 'model_index.json': 'sd14-onnx/model_index.json', 'scheduler/scheduler_config.json': 'sdxl/scheduler/scheduler_config.json' });
    const layout = readLayout(dir);
    expect(layout.schedulerConfig._class_name).toBe('PNDMScheduler');
    expect(layout.rewrites[0]).toMatchObject({ key: '_class_name', from: 'EulerDiscreteScheduler', to: 'PNDMScheduler' });
    // PNDM built from the Euler file's values (leading spacing, steps_offset 1, skip_prk_steps): PLMS's repeated step.
    expect(createScheduler(layout.schedulerConfig, 10).timesteps.slice(0, 4)).toEqual([901, 801, 801, 701]);
  });

  it('a DreamBooth fine-tune that ships DDPMScheduler (its model_index.json and scheduler config) loads and runs DDPM', async () => {
    const dir = await modelWith('owl-ddpm', 'sd15', repoFiles('owl-dreambooth'));
    const layout = readLayout(dir);
    expect(layout.schedulerConfig._class_name).toBe('DDPMScheduler');
    expect(() => checkModelScheduler(layout.schedulerConfig)).not.toThrow();
    // diffusers: DDPMScheduler.from_pretrained(this folder).set_timesteps(10) (leading spacing, steps_offset 1)
    const s = createScheduler(layout.schedulerConfig, 10);
    expect([s.name, s.timesteps]).toEqual(['DDPMScheduler', [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]]);
  });

  it('a listed class the runtime does not implement fails the load naming both places', async () => {
    const dir = await modelWith('listed-sde', 'sd15', { 'model_index.json': 'sd14-onnx/model_index.json', 'scheduler/scheduler_config.json': 'sd14-onnx/scheduler/scheduler_config.json' }, (d) =>
      editJson(path.join(d, 'model_index.json'), (c) => (c.scheduler = ['diffusers', 'IPNDMScheduler'])),
    );
    expect(() => checkModelScheduler(readLayout(dir).schedulerConfig)).toThrow(
      /^the model's scheduler class "IPNDMScheduler" \(model_index\.json "scheduler", else scheduler\/scheduler_config\.json "_class_name"\) is not one/,
    );
  });

  it('without a listed class ([null, null], or no model_index.json entry) the config\'s _class_name is used', async () => {
    const dir = await modelWith('unlisted', 'sd15', { 'model_index.json': 'sd14-onnx/model_index.json', 'scheduler/scheduler_config.json': 'sdxl/scheduler/scheduler_config.json' }, (d) =>
      editJson(path.join(d, 'model_index.json'), (c) => (c.scheduler = [null, null])),
    );
    expect(readLayout(dir).schedulerConfig._class_name).toBe('EulerDiscreteScheduler');
  });
});

describe('scheduler_config.json', () => {
  it('each real config builds its class with the file\'s values', async () => {
    const cases: [string, string, number[]][] = [
      ['sd14-onnx/scheduler/scheduler_config.json', 'PNDMScheduler', [901, 801, 801, 701]],
      ['sd21-base/scheduler/scheduler_config.json', 'PNDMScheduler', [901, 801, 801, 701]],
      ['sdxl/scheduler/scheduler_config.json', 'EulerDiscreteScheduler', [901, 801, 701, 601]],
    ];
    for (const [file, cls, head] of cases) {
      const config = JSON.parse(readFileSync(path.join(FIX, file), 'utf8')) as Record<string, unknown>;
      const s = createScheduler(pipelineSchedulerConfig(config, !file.startsWith('sdxl')).config, 10);
      expect(s.name, file).toBe(cls);
      expect(s.timesteps.slice(0, 4), file).toEqual(head);
    }
  });

  it('an option the runtime does not implement fails the load naming the file, the key and what is supported', () => {
    const sdxl = JSON.parse(readFileSync(path.join(FIX, 'sdxl/scheduler/scheduler_config.json'), 'utf8')) as Record<string, unknown>;
    const { config } = pipelineSchedulerConfig({ ...sdxl, interpolation_type: 'log_linear' }, false);
    expect(() => checkModelScheduler(config)).toThrow(
      'scheduler/scheduler_config.json: EulerDiscreteScheduler: interpolation_type "log_linear" is not supported (supported: linear)',
    );
    const typo = pipelineSchedulerConfig({ ...sdxl, steps_offset: '1' }, false).config;
    expect(() => checkModelScheduler(typo)).toThrow('scheduler/scheduler_config.json: EulerDiscreteScheduler: scheduler config steps_offset must be a number, got "1"');
  });

  it('an LCM config distilled for fewer than 10 steps loads (the load-time check stays within its step range)', () => {
    const lcm = { _class_name: 'LCMScheduler', beta_end: 0.012, beta_schedule: 'scaled_linear', beta_start: 0.00085, original_inference_steps: 8, timestep_scaling: 10.0 };
    const { config } = pipelineSchedulerConfig(lcm, false);
    expect(() => checkModelScheduler(config)).not.toThrow();
    expect(() => createScheduler(config, 9)).toThrow(/num_inference_steps must be an integer from 1 to 8 for LCMScheduler/);
  });
});

describe('the model kinds users serve, from their repositories\' own files', () => {
  it('SD 2.1 768 (v-prediction DDIM of diffusers 0.10, sample_size 96): 768 px by default, v-prediction, nothing rewritten', async () => {
    const dir = await modelWith('sd21-768', 'sd2', repoFiles('sd21-768'));
    const layout = readLayout(dir);
    expect([layout.isXL, layout.pipelineClass, layout.rewrites]).toEqual([false, 'StableDiffusionPipeline', []]);
    // sample_size 96 × the VAE's 8 (its config has no scaling_factor: 0.18215, as diffusers' default)
    expect(layout.unet).toMatchObject({ sampleSize: 96, inChannels: 4, timeCondProjDim: null, sizeMultiple: 64 });
    expect(layout.vae).toEqual({ scalingFactor: 0.18215, scaleFactor: 8 });
    const cfg = layout.schedulerConfig;
    expect([cfg._class_name, cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset, cfg.trained_betas]).toEqual(['DDIMScheduler', 'v_prediction', 'leading', 1, null]);
    // Keys the 0.10 file did not have come from DDIMScheduler's defaults, and are listed as such.
    expect(cfg._use_default_values).toEqual(expect.arrayContaining(['timestep_spacing', 'rescale_betas_zero_snr', 'thresholding', 'clip_sample_range']));
    // diffusers: DDIMScheduler.from_pretrained(this folder).set_timesteps(10)
    expect(createScheduler(cfg, 10).timesteps).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
  });

  it('SD 2.1\'s tokenizer files: special_tokens_map.json\'s pad "!" wins over tokenizer_config.json\'s, with AddedToken dicts saved "normalized": true', async () => {
    const tok = await ClipTokenizer.load(tokenizerFolder('sd21-768', ['sd21-768/tokenizer/tokenizer_config.json', 'sd21-768/tokenizer/special_tokens_map.json']));
    expect([tok.padId, tok.maxLength]).toEqual([0, 77]);
    // The same special tokens as sd21-base/tokenizer+rege/tokenizer, whose ids transformers gave (tokenizer-cases.json).
    const ref = (JSON.parse(readFileSync(path.join(FIX, 'tokenizer-cases.json'), 'utf8')) as TokenizerCases).folders['sd21-base/tokenizer+rege/tokenizer']!;
    for (const c of ref.cases) expect(tok.encode(c.text), JSON.stringify(c.text)).toEqual(c.ids);
  });

  it('SD 1.5 inpainting (diffusers 0.6: DDIM without prediction_type or timestep_spacing, a 9-channel UNet) loads as an inpainting model', async () => {
    const dir = await modelWith(
      'sd15-inpainting',
      'sd15',
      repoFiles('sd15-inpainting'),
      undefined,
      { inpainting: true },
    );
    const layout = readLayout(dir);
    expect([layout.pipelineClass, layout.isXL, layout.rewrites]).toEqual(['StableDiffusionInpaintPipeline', false, []]);
    expect(layout.unet).toMatchObject({ sampleSize: 64, inChannels: 9, sizeMultiple: 64 });
    expect(layout.vae.scalingFactor).toBe(0.18215);
    const cfg = layout.schedulerConfig;
    // Absent keys take DDIMScheduler's defaults: epsilon, leading; the file's skip_prk_steps (a PNDM key) is kept, unused.
    expect([cfg.prediction_type, cfg.timestep_spacing, cfg.skip_prk_steps]).toEqual(['epsilon', 'leading', true]);
    expect(cfg._use_default_values).toEqual(expect.arrayContaining(['prediction_type', 'timestep_spacing']));
    expect(() => checkModelScheduler(cfg)).not.toThrow();
    expect(createScheduler(cfg, 10).timesteps.slice(0, 3)).toEqual([901, 801, 701]);
  });

  it('SDXL base with its ONNX export (vae_decoder/config.json, add_watermarker null): 1024 px, scaling 0.13025, no latent statistics', async () => {
    const dir = await modelWith('sdxl-base-onnx', 'sdxl', repoFiles('sdxl-base-onnx'));
    const layout = readLayout(dir);
    expect([layout.isXL, layout.forceZerosForEmptyPrompt, layout.requiresAestheticsScore, layout.rewrites]).toEqual([true, true, false, []]);
    // Three UNet blocks (two down-samplings) × the VAE's 8: sides in multiples of 32.
    expect(layout.unet).toMatchObject({ sampleSize: 128, inChannels: 4, timeCondProjDim: null, sizeMultiple: 32 });
    expect(layout.vae).toEqual({ scalingFactor: 0.13025, scaleFactor: 8 });
  });

  it('SDXL-Turbo with its ONNX export (Euler a, trailing spacing, sample_size 64): 512 px, one step from t = 999 at sigma_max', async () => {
    const dir = await modelWith('sdxl-turbo', 'sdxl', repoFiles('sdxl-turbo-onnx'));
    const layout = readLayout(dir);
    expect([layout.isXL, layout.forceZerosForEmptyPrompt, layout.rewrites]).toEqual([true, true, []]);
    expect(layout.unet.sampleSize * layout.vae.scaleFactor).toBe(512);
    const cfg = layout.schedulerConfig;
    expect([cfg._class_name, cfg.timestep_spacing, cfg.steps_offset]).toEqual(['EulerAncestralDiscreteScheduler', 'trailing', 1]);
    // diffusers: trailing spacing starts at the last training step, whatever the count; with trailing (or linspace)
    // init_noise_sigma is sigma_max itself, not sqrt(sigma_max² + 1).
    const one = createScheduler(cfg, 1);
    expect(one.timesteps).toEqual([999]);
    expect(one.initNoiseSigma).toBeCloseTo(14.6146, 3);
    expect(createScheduler(cfg, 4).timesteps).toEqual([999, 749, 499, 249]);
  });

  it('Playground v2 (Euler a with Euler\'s sigma_min / sigma_max null and use_karras_sigmas): null is "unset" for a request that switches to Karras sigmas', async () => {
    const dir = await modelWith('playground-v2', 'sdxl', repoFiles('playground-v2'));
    const layout = readLayout(dir);
    expect([layout.isXL, layout.schedulerConfig._class_name, layout.unet.sampleSize, layout.vae.scalingFactor]).toEqual([true, 'EulerAncestralDiscreteScheduler', 128, 0.13025]);
    const cfg = layout.schedulerConfig;
    expect(() => checkModelScheduler(cfg)).not.toThrow();
    expect(createScheduler(cfg, 10).timesteps.slice(0, 3)).toEqual([901, 801, 701]);
    const unset = Object.fromEntries(Object.entries(cfg).filter(([k]) => k !== 'sigma_min' && k !== 'sigma_max'));
    for (const name of ['euler_karras', 'dpmpp_2m_karras', 'lms_karras']) {
      const [s, u] = [createScheduler(cfg, 10, { name }), createScheduler(unset, 10, { name })];
      expect([s.timesteps, s.initNoiseSigma], name).toEqual([u.timesteps, u.initNoiseSigma]);
    }
    expect(schedulerLimits(cfg).refused).not.toHaveProperty('euler_karras');
  });

  it('a fine-tune saved by diffusers 0.2.4 (DDIM without steps_offset, timestep_values: null; UNet sample_size 32): the SD pipeline\'s rewrites, logged', async () => {
    const dir = await modelWith('waifu-0.2', 'sd15', repoFiles('waifu-diffusion-0.2'));
    const layout = readLayout(dir);
    // DDIMScheduler's default steps_offset 0 becomes 1 (StableDiffusionPipeline.__init__); sample_size 32 becomes 64.
    expect(layout.rewrites.map((r) => [r.key, r.from, r.to])).toEqual([
      ['steps_offset', 0, 1],
      ['unet.sample_size', 32, 64],
    ]);
    expect(layout.rewrites[0]!.message).toMatch(/^The configuration file of this scheduler: DDIMScheduler is outdated\. `steps_offset` should be set to 1 instead of 0\./);
    expect(layout.unet.sampleSize * layout.vae.scaleFactor).toBe(512);
    const cfg = layout.schedulerConfig;
    expect([cfg.steps_offset, cfg.prediction_type, cfg.timestep_values]).toEqual([1, 'epsilon', null]);
    expect(createScheduler(cfg, 10).timesteps).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
  });

  it('a served model logs each rewrite once per worker, not once per load (a local folder is loaded as listed, then whole)', async () => {
    const dir = await modelWith('waifu-0.2-served', 'sd15', repoFiles('waifu-diffusion-0.2'));
    const h = await startRuntime({ STORAGE_URI: dir, MODEL_CACHE_DIR: path.join(work, 'served-cache'), WARMUP_STEPS: '1' }, { ready: true });
    try {
      expect(h.logs.filter((l) => typeof l.config === 'string').map((l) => [l.level, l.config, l.from, l.to])).toEqual([
        ['warn', 'steps_offset', 0, 1],
        ['warn', 'unet.sample_size', 32, 64],
      ]);
    } finally {
      await h.stop(0);
    }
  });

  it('an InstructPix2Pix export (its model_index.json, an 8-channel UNet) is refused at load, naming the key, the pipeline and what is served', async () => {
    const dir = await modelWith('instruct-pix2pix', 'sd15', { 'model_index.json': 'instruct-pix2pix/model_index.json' }, (d) =>
      editJson(path.join(d, 'unet', 'config.json'), (c) => (c.in_channels = 8)),
    );
    expect(() => readLayout(dir)).toThrow(expect.objectContaining({
      code: 'UNSUPPORTED',
      message: 'unet/config.json: in_channels 8 (model_index.json: StableDiffusionInstructPix2PixPipeline) is not a UNet this runtime serves; it serves ' +
        '4 input channels (text-to-image, image-to-image) and 9 (inpainting), as the Stable Diffusion, SDXL, LCM and Turbo pipelines have',
    }));
  });

  it('an SDXL refiner export (model_index.json with text_encoder [null, null], requires_aesthetics_score) is refused, saying what it is and what is served', async () => {
    const dir = await modelWith('sdxl-refiner', 'sdxl', repoFiles('sdxl-refiner'), (d) => rmSync(path.join(d, 'text_encoder'), { recursive: true }));
    expect(() => readLayout(dir)).toThrow(expect.objectContaining({
      code: 'UNSUPPORTED',
      message: expect.stringMatching(/text_encoder_2 but no text_encoder: an SDXL refiner .* which this runtime does not serve; it serves pipelines with text_encoder\//),
    }));
  });
});
