/**
 * Model folders as real Hugging Face repositories and their ONNX exports hold them: config files written as those
 * repositories ship them (each names its source), read by the layout reader and the scheduler factory the way a boot
 * reads them. What diffusers accepts must load; what it would use and the runtime cannot must be a clear refusal.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { afterAll, describe, expect, it } from 'vitest';
import { pipelineSchedulerConfig, readLayout } from '../src/pipeline/model.js';
import { createScheduler } from '../src/pipeline/schedulers/index.js';
import { editJson, fixtureVariant } from './fixtures/index.js';
import { startRuntime } from './helpers/runtime.js';
import { destroyS3, putFolder, s3Env, startS3 } from './helpers/s3.js';
import { runWarmupCli } from './helpers/warmup-cli.js';

const work = mkdtempSync(path.join(tmpdir(), 'model-files-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/**
 * `src` laid out as huggingface_hub's cache lays out a download (`snapshot_download` without `local_dir`, or with it
 * before huggingface_hub 0.23, which linked large files): `blobs/<n>` holds the bytes, `snapshots/<rev>/…` relative
 * symbolic links to them. Returns the snapshot folder, what a user points STORAGE_URI at.
 */
function hubSnapshot(src: string, root: string): string {
  const snap = path.join(root, 'snapshots', 'c0ffee');
  mkdirSync(path.join(root, 'blobs'), { recursive: true });
  let n = 0;
  const go = (rel: string): void => {
    for (const e of readdirSync(path.join(src, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name);
      if (e.isDirectory()) go(r);
      else {
        const blob = path.join(root, 'blobs', String(n++));
        copyFileSync(path.join(src, r), blob);
        mkdirSync(path.dirname(path.join(snap, r)), { recursive: true });
        symlinkSync(path.relative(path.dirname(path.join(snap, r)), blob), path.join(snap, r));
      }
    }
  };
  go('');
  return snap;
}

/** A copy of a demo model with some of its JSON files edited. */
const variant = (name: string, family: 'sd15' | 'sdxl', edit: (dir: string) => void): Promise<string> => fixtureVariant(path.join(work, name), { family }, edit);

describe('scheduler classes community models ship', () => {
  // UniPCMultistepScheduler as diffusers' save_config writes it (community SD 1.5 fine-tunes ship it).
  const unipc = {
    _class_name: 'UniPCMultistepScheduler', _diffusers_version: '0.40.0.dev0', beta_end: 0.012, beta_schedule: 'scaled_linear', beta_start: 0.00085,
    disable_corrector: [], dynamic_thresholding_ratio: 0.995, final_sigmas_type: 'zero', flow_shift: 1.0, lower_order_final: true, num_train_timesteps: 1000,
    predict_x0: true, prediction_type: 'epsilon', rescale_betas_zero_snr: false, sample_max_value: 1.0, shift_terminal: null, sigma_max: null, sigma_min: null,
    solver_order: 2, solver_p: null, solver_type: 'bh2', steps_offset: 1, thresholding: false, time_shift_type: 'exponential', timestep_spacing: 'linspace',
    trained_betas: null, use_beta_sigmas: false, use_dynamic_shifting: false, use_exponential_sigmas: false, use_flow_sigmas: false, use_karras_sigmas: false,
  };

  it('a UniPC model config (every key save_config writes, nulls and the empty list included) builds its class', () => {
    const { config } = pipelineSchedulerConfig(unipc, true);
    const s = createScheduler(config, 20);
    expect(s.name).toBe('UniPCMultistepScheduler');
    // diffusers: UniPCMultistepScheduler.from_pretrained(...).set_timesteps(20) on this file
    expect(s.timesteps.slice(0, 4)).toEqual([999, 949, 899, 849]);
  });

  // DPMSolverSDEScheduler as save_config writes it (realism fine-tunes ship it as "DPM++ SDE Karras").
  const sde = {
    _class_name: 'DPMSolverSDEScheduler', _diffusers_version: '0.40.0.dev0', beta_end: 0.012, beta_schedule: 'scaled_linear', beta_start: 0.00085,
    noise_sampler_seed: null, num_train_timesteps: 1000, prediction_type: 'epsilon', steps_offset: 1, timestep_spacing: 'linspace',
    trained_betas: null, use_beta_sigmas: false, use_exponential_sigmas: false, use_karras_sigmas: true,
  };

  it('a DPMSolverSDEScheduler model config builds its class; with no noise_sampler_seed each image seeds its own Brownian tree', () => {
    const { config } = pipelineSchedulerConfig(sde, true);
    const s = createScheduler(config, 10, { seeds: [3] });
    expect([s.name, s.timesteps.length, s.order]).toEqual(['DPMSolverSDEScheduler', 19, 2]);
  });

  // SASolverScheduler as save_config writes it (tau_func, a Python callable, is written null).
  const sasolver = {
    _class_name: 'SASolverScheduler', _diffusers_version: '0.40.0.dev0', algorithm_type: 'data_prediction', beta_end: 0.012, beta_schedule: 'scaled_linear',
    beta_start: 0.00085, corrector_order: 2, dynamic_thresholding_ratio: 0.995, flow_shift: 1.0, lambda_min_clipped: -Infinity, lower_order_final: true,
    num_train_timesteps: 1000, prediction_type: 'epsilon', predictor_order: 2, sample_max_value: 1.0, steps_offset: 1, tau_func: null, thresholding: false,
    timestep_spacing: 'linspace', trained_betas: null, use_beta_sigmas: false, use_exponential_sigmas: false, use_flow_sigmas: false, use_karras_sigmas: false,
    variance_type: null,
  };

  it('a SASolverScheduler model config builds its class', () => {
    const { config } = pipelineSchedulerConfig(sasolver, true);
    const s = createScheduler(config, 20);
    // diffusers: SASolverScheduler.from_pretrained(...).set_timesteps(20) on this file
    expect([s.name, s.timesteps.slice(0, 4)]).toEqual(['SASolverScheduler', [999, 949, 899, 849]]);
  });

  it('a class the runtime does not implement fails the load with a reason that names the file and what to set there', () => {
    // IPNDMScheduler: not implemented.
    const ipndm = { ...sde, _class_name: 'IPNDMScheduler' };
    const { config } = pipelineSchedulerConfig(ipndm, true);
    // What Pipeline.create checks when a worker loads the model.
    expect(() => createScheduler(config, 10)).toThrow(
      'the model\'s scheduler class "IPNDMScheduler" (model_index.json "scheduler", else scheduler/scheduler_config.json "_class_name") is not one ' +
        'this runtime implements; set both to one of PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, ' +
        'LCMScheduler, UniPCMultistepScheduler, LMSDiscreteScheduler, DDPMScheduler, DEISMultistepScheduler, HeunDiscreteScheduler, ' +
        'KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler, TCDScheduler, DPMSolverSinglestepScheduler, DPMSolverSDEScheduler, SASolverScheduler',
    );
    expect(createScheduler(pipelineSchedulerConfig({ ...ipndm, _class_name: 'EulerDiscreteScheduler' }, true).config, 10).timesteps).toHaveLength(10);
  });
});

describe('configs an SD pipeline reads but the runtime cannot follow', () => {
  it('a timestep_spacing or beta_schedule the runtime lacks is refused naming the class that read it and the values it takes', () => {
    const base = { num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', steps_offset: 1 };
    // The Euler family shares one timestep function: each class is named, not "Euler" for all of them.
    for (const cls of ['PNDMScheduler', 'DDIMScheduler', 'EulerDiscreteScheduler', 'HeunDiscreteScheduler', 'LMSDiscreteScheduler', 'DPMSolverMultistepScheduler']) {
      const { config } = pipelineSchedulerConfig({ ...base, _class_name: cls, timestep_spacing: 'even' }, true);
      expect(() => createScheduler(config, 10)).toThrow(`${cls}: timestep_spacing "even" is not supported (supported: linspace, leading, trailing)`);
    }
    const { config } = pipelineSchedulerConfig({ ...base, _class_name: 'DDPMScheduler', beta_schedule: 'sigmoid' }, true);
    expect(() => createScheduler(config, 10)).toThrow('DDPMScheduler: beta_schedule "sigmoid" is not supported (supported: linear, scaled_linear, squaredcos_cap_v2)');
  });

  it('an SDXL VAE with latents_mean / latents_std (playgroundai/playground-v2.5-1024px-aesthetic vae/config.json) loads with them; malformed ones are named', async () => {
    const playground = await variant('latents-mean', 'sdxl', (d) =>
      editJson(path.join(d, 'vae_decoder', 'config.json'), (c) => {
        c.latents_mean = [-1.6574, 1.886, -1.383, 2.5155];
        c.latents_std = [8.4927, 5.9022, 6.5498, 5.2299];
        c.scaling_factor = 0.5;
      }),
    );
    const vae = readLayout(playground).vae;
    expect([vae.scalingFactor, Array.from(vae.latentsStd!)]).toEqual([0.5, [8.4927, 5.9022, 6.5498, 5.2299].map(Math.fround)]);
    for (const [bad, why] of [
      [{ latents_mean: [0, 0, 0] }, 'latents_mean must be 4 finite numbers (one per latent channel), got [0,0,0]'],
      [{ latents_std: [1, 0, 1, 1] }, 'latents_std must be 4 finite numbers, none zero (one per latent channel), got [1,0,1,1]'],
      [{ latents_mean: '0,0,0,0' }, 'latents_mean must be 4 finite numbers (one per latent channel), got "0,0,0,0"'],
    ] as const) {
      const dir = await variant(`latents-bad-${Object.keys(bad)[0]}-${why.length}`, 'sdxl', (d) =>
        editJson(path.join(d, 'vae_decoder', 'config.json'), (c) => Object.assign(c, { latents_mean: [0, 0, 0, 0], latents_std: [1, 1, 1, 1] }, bad)),
      );
      expect(() => readLayout(dir)).toThrow(expect.objectContaining({ code: 'MODEL_FORMAT', message: `vae_decoder/config.json: ${why}` }));
    }
    // One without the other is ignored, as diffusers' pipelines ignore it.
    const half = await variant('latents-half', 'sdxl', (d) => editJson(path.join(d, 'vae_decoder', 'config.json'), (c) => Object.assign(c, { latents_mean: [0, 0, 0, 0] })));
    expect(readLayout(half).vae.latentsMean).toBeUndefined();
    // Recent diffusers saves every AutoencoderKL config with both keys null: that is the plain VAE.
    const nulls = await variant('latents-null', 'sdxl', (d) => editJson(path.join(d, 'vae_decoder', 'config.json'), (c) => Object.assign(c, { latents_mean: null, latents_std: null, shift_factor: null })));
    expect(readLayout(nulls).vae.scalingFactor).toBe(0.13025);
    // StableDiffusionPipeline never reads them.
    const sd = await variant('latents-mean-sd', 'sd15', (d) => editJson(path.join(d, 'vae_decoder', 'config.json'), (c) => Object.assign(c, { latents_mean: [0, 0, 0, 0], latents_std: [1, 1, 1, 1] })));
    expect(readLayout(sd).isXL).toBe(false);
  });

  it('an SDXL refiner export (stabilityai/stable-diffusion-xl-refiner-1.0: text_encoder_2 alone) is named as such, not as a broken export', async () => {
    const refiner = await variant('refiner', 'sdxl', (d) => {
      rmSync(path.join(d, 'text_encoder'), { recursive: true });
      rmSync(path.join(d, 'tokenizer'), { recursive: true });
      editJson(path.join(d, 'model_index.json'), (c) =>
        Object.assign(c, { _class_name: 'StableDiffusionXLImg2ImgPipeline', requires_aesthetics_score: true, force_zeros_for_empty_prompt: false, text_encoder: [null, null], tokenizer: [null, null] }),
      );
    });
    expect(() => readLayout(refiner)).toThrow(/^this export has text_encoder_2 but no text_encoder: an SDXL refiner/);
  });
});

describe('an upload that missed a tokenizer', () => {
  it('names the folder it missed: an SDXL export without tokenizer/ (tokenizer_2/ there) or with tokenizer/ holding its configs alone', async () => {
    const files = (t: string) => `${t}/vocab.json and merges.txt (or ${t}/tokenizer.json)`;
    const noFirst = await variant('xl-no-tokenizer', 'sdxl', (d) => rmSync(path.join(d, 'tokenizer'), { recursive: true }));
    expect(() => readLayout(noFirst)).toThrow(expect.objectContaining({ code: 'MODEL_FORMAT', message: `not an ONNX diffusers export: missing ${files('tokenizer')}` }));
    const configsOnly = await variant('xl-tokenizer-configs', 'sdxl', (d) => ['vocab.json', 'merges.txt'].forEach((f) => rmSync(path.join(d, 'tokenizer', f))));
    expect(() => readLayout(configsOnly)).toThrow(`not an ONNX diffusers export: missing ${files('tokenizer')}`);
    const noSecond = await variant('xl-no-tokenizer-2', 'sdxl', (d) => rmSync(path.join(d, 'tokenizer_2'), { recursive: true }));
    expect(() => readLayout(noSecond)).toThrow(`an SDXL export needs tokenizer_2/: missing ${files('tokenizer_2')}`);
  });
});

describe('pipelines whose denoiser is not a UNet', () => {
  it('an SD3 or Flux ONNX export (optimum: transformer/model.onnx, no unet/) is refused as such, not as a broken export', async () => {
    const sd3 = await variant('sd3', 'sd15', (d) => {
      renameSync(path.join(d, 'unet'), path.join(d, 'transformer'));
      // The components optimum exports for StableDiffusion3Pipeline (the T5 encoder as text_encoder_3).
      editJson(path.join(d, 'model_index.json'), (c) =>
        Object.assign(c, {
          _class_name: 'StableDiffusion3Pipeline', scheduler: ['diffusers', 'FlowMatchEulerDiscreteScheduler'], transformer: ['diffusers', 'SD3Transformer2DModel'],
          text_encoder_3: ['transformers', 'T5EncoderModel'], tokenizer_3: ['transformers', 'T5TokenizerFast'], unet: undefined,
        }),
      );
    });
    const why = 'a diffusion transformer (SD3, Flux, PixArt), which this runtime does not serve; it serves UNet pipelines (unet/: SD 1.x, 2.x, SDXL, LCM, Turbo)';
    expect(() => readLayout(sd3)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED', message: `this export denoises with transformer/ (model_index.json: StableDiffusion3Pipeline), ${why}` }));
    // Without model_index.json (a folder of graphs alone), and as the boot reads a listing whose weights still arrive.
    rmSync(path.join(sd3, 'model_index.json'));
    expect(() => readLayout(sd3)).toThrow(`this export denoises with transformer/, ${why}`);
    expect(() => readLayout(sd3, new Set(['transformer/model.onnx', 'text_encoder/model.onnx', 'vae_decoder/model.onnx']))).toThrow(`this export denoises with transformer/, ${why}`);
  });
});

describe('folders an export carries beside the components', () => {
  it('an old diffusers ONNX export\'s safety_checker/model.onnx (with feature_extractor/, README.md, .gitattributes) serves without a session for it', async () => {
    // CompVis/stable-diffusion-v1-4's former onnx revision and runwayml's onnx branch ship safety_checker/model.onnx
    // (1.2 GB in float32); a real graph stands in for it, so a session would be created if the boot took it up.
    const dir = await variant('safety-checker', 'sd15', (d) => {
      mkdirSync(path.join(d, 'safety_checker'));
      copyFileSync(path.join(d, 'text_encoder', 'model.onnx'), path.join(d, 'safety_checker', 'model.onnx'));
      mkdirSync(path.join(d, 'feature_extractor'));
      writeFileSync(path.join(d, 'feature_extractor', 'preprocessor_config.json'), JSON.stringify({ crop_size: 224, feature_extractor_type: 'CLIPFeatureExtractor' }));
      writeFileSync(path.join(d, 'README.md'), '# a model card\n');
      writeFileSync(path.join(d, '.gitattributes'), '*.onnx filter=lfs diff=lfs merge=lfs -text\n');
      editJson(path.join(d, 'model_index.json'), (c) => Object.assign(c, { safety_checker: ['stable_diffusion', 'OnnxStableDiffusionSafetyChecker'], feature_extractor: ['transformers', 'CLIPFeatureExtractor'] }));
    });
    const h = await startRuntime({ STORAGE_URI: dir, MODEL_CACHE_DIR: path.join(work, 'safety-cache'), WARMUP_STEPS: '1' }, { ready: true });
    try {
      expect(Object.keys((await h.waitFor('ready')).providers).sort()).toEqual(['text_encoder', 'unet', 'vae_decoder']);
      expect(h.logs.filter((l) => l.component === 'safety_checker')).toEqual([]);
    } finally {
      await h.stop(0);
    }
  });
});

describe('a Hugging Face cache snapshot (every file a relative symbolic link into blobs/)', () => {
  it('serves, and an adapter set hard-links the UNet\'s weights it points to rather than copying them', async () => {
    const snap = hubSnapshot(await fixtureVariant(path.join(work, 'hub-src'), { family: 'sd15', externalData: true }), path.join(work, 'hub'));
    const h = await startRuntime({ STORAGE_URI: snap, MODEL_CACHE_DIR: path.join(work, 'hub-cache'), WARMUP_STEPS: '1' }, { ready: true });
    try {
      // Every link is counted as the file it names (it was 0 files, 0 bytes: sessions waited for the whole load).
      const files = readdirSync(path.join(work, 'hub', 'blobs'));
      const bytes = files.reduce((n, f) => n + statSync(path.join(work, 'hub', 'blobs', f)).size, 0);
      expect(await h.waitFor('files-ready')).toMatchObject({ fromCache: false, files: files.length, bytes });
      const res = await fetch(`${h.url}/v1/models/model:predict`, {
        method: 'POST',
        body: JSON.stringify({ instances: [{ prompt: 'a lighthouse', seed: 3, num_inference_steps: 2, width: 64, height: 64, loras: [{ name: 'demo-style' }] }] }),
      });
      expect(res.status).toBe(200);
      // Linked as the link itself, the weights dangled in the set's folder: ONNX Runtime refused them and the set
      // copied the model's weights (gigabytes for a real UNet), warning of another file system.
      expect(h.logs.filter((l) => l.level === 'warn').map((l) => l.msg)).toEqual([]);
      const linked = readdirSync(path.join(work, 'hub-cache', '.lora-sets'), { recursive: true }).map(String).filter((f) => f.endsWith('unet/model.onnx_data'));
      expect(linked).toHaveLength(1);
      expect(statSync(path.join(work, 'hub-cache', '.lora-sets', linked[0]!)).ino).toBe(statSync(path.join(snap, 'unet', 'model.onnx_data')).ino);
    } finally {
      await h.stop(0);
    }
  });
});

/** Sets every value of a float32 initializer of an ONNX graph to NaN: what a float16 graph that overflows computes. */
function poison(file: string, initializer: string): void {
  const { onnx } = onnxProto;
  const model = onnx.ModelProto.decode(readFileSync(file));
  const t = model.graph!.initializer!.find((x) => x.name === initializer)!;
  t.rawData = new Uint8Array(new Float32Array(t.rawData!.byteLength / 4).fill(NaN).buffer);
  writeFileSync(file, onnx.ModelProto.encode(model).finish());
}

describe('a float16 export that overflows (NaN out of a component)', () => {
  const predict = (url: string, body: object) =>
    fetch(`${url}/v1/models/model:predict`, { method: 'POST', body: JSON.stringify({ instances: [{ prompt: 'a lighthouse', seed: 3, num_inference_steps: 2, width: 64, height: 64, ...body }] }) });
  const reexport = 'export the model again with scripts/export-onnx.sh, which keeps in float32 what diffusers computes in float32 (docs/EXPORT.md)';

  it('is a 500 MODEL_FORMAT naming the component, not a black image answered 200; with a warm-up, the boot fails with it', async () => {
    // SDXL's VAE in float16 overflows to NaN (diffusers upcasts it): every image decodes black.
    const vae = await variant('nan-vae', 'sd15', (d) => poison(path.join(d, 'vae_decoder', 'model.onnx'), 'decoder.conv_in.bias'));
    const h = await startRuntime({ STORAGE_URI: vae, MODEL_CACHE_DIR: path.join(work, 'nan-cache'), WARMUP_STEPS: '0' }, { ready: true });
    try {
      const res = await predict(h.url, {});
      expect([res.status, await res.json()]).toEqual([500, {
        code: 'MODEL_FORMAT',
        error: `the VAE decoder returned NaN or infinite values: its graph overflows, as SDXL's VAE does in float16 (diffusers runs it in float32: force_upcast); ${reexport}`,
      }]);
    } finally {
      await h.stop(0);
    }
    // An SD 2.x UNet in float16 without its attention in float32 overflows in some steps.
    const unet = await variant('nan-unet', 'sd15', (d) => poison(path.join(d, 'unet', 'model.onnx'), 'conv_in.bias'));
    const u = await startRuntime({ STORAGE_URI: unet, MODEL_CACHE_DIR: path.join(work, 'nan-cache'), WARMUP_STEPS: '1' });
    try {
      await expect(u.waitReady()).rejects.toThrow(
        'boot failed: MODEL_FORMAT: the UNet returned NaN or infinite values: its graph overflows, as float16 exports of SD 2.x UNets do ' +
          `without their attention in float32 (upcast_attention); ${reexport}. Or the schedule repeats a sigma, as some spacings do at 999–1000 steps: run fewer steps`,
      );
    } finally {
      await u.stop(0);
    }
  });
});

/** Every file under `dir`, '/'-separated, without the cache's own dot-files at its root. */
const filesUnder = (dir: string): string[] =>
  readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.relative(dir, path.join(e.parentPath, e.name)).split(path.sep).join('/'))
    .filter((f) => !f.startsWith('.complete') && !f.startsWith('.progress')).sort();

describe('a Hugging Face repository synced to S3 whole (ONNX export beside PyTorch, Flax and OpenVINO weights)', () => {
  it('the warm-up Job and the server download only what the runtime reads, and the server\'s cache hit finds the Job\'s entry', async () => {
    const repo = await variant('hub-repo', 'sd15', (d) => {
      const write = (rel: string, bytes: number) => {
        mkdirSync(path.dirname(path.join(d, rel)), { recursive: true });
        writeFileSync(path.join(d, rel), Buffer.alloc(bytes, 7));
      };
      // As stabilityai/stable-diffusion-xl-base-1.0 lays them out (smaller): single-file checkpoints at the root, each
      // component's weights in every framework beside model.onnx, the PyTorch VAE, a safety checker.
      for (const f of ['v1-5-pruned-emaonly.safetensors', 'README.md', '.gitattributes', 'unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_pytorch_model.fp16.safetensors',
        'unet/diffusion_flax_model.msgpack', 'unet/openvino_model.xml', 'unet/openvino_model.bin', 'text_encoder/model.safetensors', 'text_encoder/pytorch_model.bin',
        'text_encoder/flax_model.msgpack', 'vae/config.json', 'vae/diffusion_pytorch_model.safetensors', 'safety_checker/model.onnx', 'feature_extractor/preprocessor_config.json']) write(f, 3000);
    });
    const all = filesUnder(repo);
    const served = all.filter((f) => /^(model_index\.json|scheduler\/|tokenizer\/|loras\/)/.test(f) || /^(text_encoder|unet|vae_decoder)\/(model\.onnx|config\.json|lora_map\.json)$/.test(f));
    expect(served).toContain('loras/demo-style.safetensors');
    const s3 = await startS3(['models']);
    try {
      await putFolder(s3, 'models', 'sd15-repo/', repo, all);
      const cache = path.join(work, 'hub-repo-cache');
      const env = s3Env(s3.endpoint, cache, { STORAGE_URI: 's3://models/sd15-repo/' });
      const job = await runWarmupCli([], env);
      expect([job.code, JSON.parse(job.stdout).files]).toEqual([0, served.length]);
      const entry = JSON.parse(job.stdout).modelDir as string;
      expect(filesUnder(entry)).toEqual(served);
      const h = await startRuntime({ ...env, LOG_LEVEL: 'info', WARMUP_STEPS: '1' }, { ready: true });
      try {
        expect(await h.waitFor('files-ready')).toMatchObject({ fromCache: true, files: served.length });
        expect(h.logs.find((l) => l.objects !== undefined)).toMatchObject({ objects: all.length - served.length, bytes: 15 * 3000 });
        // The model's own adapters stay: a LoRA request runs.
        const res = await fetch(`${h.url}/v1/models/model:predict`, {
          method: 'POST', body: JSON.stringify({ instances: [{ prompt: 'a lighthouse', num_inference_steps: 1, width: 64, height: 64, loras: [{ name: 'demo-style' }] }] }),
        });
        expect(res.status).toBe(200);
      } finally {
        await h.stop(0);
      }
      // A server that fills its own cache takes the same files.
      const own = await startRuntime({ ...env, MODEL_CACHE_DIR: path.join(work, 'hub-repo-own-cache'), WARMUP_STEPS: '0' }, { ready: true });
      try {
        const ready = await own.waitFor('files-ready');
        expect([ready.fromCache, filesUnder(ready.dir)]).toEqual([false, served]);
      } finally {
        await own.stop(0);
      }
    } finally {
      await destroyS3(s3);
    }
  });
});
