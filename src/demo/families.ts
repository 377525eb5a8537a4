/** @module Per-family shapes and the JSON configs diffusers/transformers/optimum write for them. */

export type DemoFamily = 'sd15' | 'sd2' | 'sdxl' | 'lcm' | 'turbo';
export const DEMO_FAMILIES: readonly DemoFamily[] = ['sd15', 'sd2', 'sdxl', 'lcm', 'turbo'];

export interface TextEncoderSpec {
  /** Folder and tokenizer folder. */
  folder: 'text_encoder' | 'text_encoder_2';
  tokenizerFolder: 'tokenizer' | 'tokenizer_2';
  hidden: number;
  layers: number;
  /** CLIPTextModelWithProjection: `text_embeds` [b, projection] first, no `pooler_output`. */
  projection?: number;
  /** Emit `hidden_states.0 … hidden_states.<layers>` (SDXL exports). */
  hiddenStates: boolean;
  /** `<|endoftext|>` (SD 1.x, SDXL tokenizer) or `!` (SD 2.x, SDXL tokenizer_2). */
  pad: '<|endoftext|>' | '!';
}

export interface FamilySpec {
  family: DemoFamily;
  textEncoders: TextEncoderSpec[];
  /** UNet sample_size (latent side); the default image side is 8× this. */
  sampleSize: number;
  crossAttentionDim: number;
  prediction: 'epsilon' | 'v_prediction';
  /** SDXL `text_embeds` width ([batch, P]) or undefined. */
  pooledDim?: number;
  /** LCM `timestep_cond` width. */
  timeCondDim?: number;
  scalingFactor: number;
  forceUpcast: boolean;
  pipelineClass: string;
  scheduler: Record<string, unknown>;
  /** UNet input channels: 4, or 9 for an inpainting variant (latents, mask, masked-image latents). */
  inChannels?: number;
}

const DIFFUSERS_VERSION = '0.31.0';
const BETAS = { beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', num_train_timesteps: 1000, trained_betas: null };

const sd15Scheduler = {
  _class_name: 'PNDMScheduler', _diffusers_version: DIFFUSERS_VERSION, ...BETAS,
  prediction_type: 'epsilon', set_alpha_to_one: false, skip_prk_steps: true, steps_offset: 1, timestep_spacing: 'leading',
};
// stabilityai/stable-diffusion-2-1 (768-v) ships DDIM with v-prediction.
const sd2Scheduler = {
  _class_name: 'DDIMScheduler', _diffusers_version: DIFFUSERS_VERSION, ...BETAS,
  clip_sample: false, clip_sample_range: 1.0, dynamic_thresholding_ratio: 0.995, prediction_type: 'v_prediction',
  rescale_betas_zero_snr: false, sample_max_value: 1.0, set_alpha_to_one: false, skip_prk_steps: true, steps_offset: 1,
  thresholding: false, timestep_spacing: 'leading',
};
const sdxlScheduler = {
  _class_name: 'EulerDiscreteScheduler', _diffusers_version: DIFFUSERS_VERSION, ...BETAS,
  clip_sample: false, interpolation_type: 'linear', prediction_type: 'epsilon', sample_max_value: 1.0, set_alpha_to_one: false,
  skip_prk_steps: true, steps_offset: 1, timestep_spacing: 'leading', use_karras_sigmas: false,
};
const lcmScheduler = {
  _class_name: 'LCMScheduler', _diffusers_version: DIFFUSERS_VERSION, ...BETAS,
  clip_sample: false, clip_sample_range: 1.0, dynamic_thresholding_ratio: 0.995, original_inference_steps: 50,
  prediction_type: 'epsilon', rescale_betas_zero_snr: false, sample_max_value: 1.0, set_alpha_to_one: true, steps_offset: 0,
  thresholding: false, timestep_scaling: 10.0, timestep_spacing: 'leading',
};
const turboScheduler = {
  _class_name: 'EulerAncestralDiscreteScheduler', _diffusers_version: DIFFUSERS_VERSION, ...BETAS,
  prediction_type: 'epsilon', rescale_betas_zero_snr: false, steps_offset: 1, timestep_spacing: 'trailing',
};

const te = (over: Partial<TextEncoderSpec>): TextEncoderSpec => ({
  folder: 'text_encoder', tokenizerFolder: 'tokenizer', hidden: 32, layers: 2, hiddenStates: false, pad: '<|endoftext|>', ...over,
});

// Hidden sizes are tiny and deliberately differ between the two SDXL encoders, so a pipeline that mixes them
// up (or hard-codes 768/1280/2048) fails on shape rather than silently.
export const FAMILIES: Readonly<Record<DemoFamily, FamilySpec>> = {
  sd15: {
    family: 'sd15', textEncoders: [te({})], sampleSize: 64, crossAttentionDim: 32, prediction: 'epsilon',
    scalingFactor: 0.18215, forceUpcast: true, pipelineClass: 'StableDiffusionPipeline', scheduler: sd15Scheduler,
  },
  sd2: {
    family: 'sd2', textEncoders: [te({ pad: '!' })], sampleSize: 96, crossAttentionDim: 32, prediction: 'v_prediction',
    scalingFactor: 0.18215, forceUpcast: true, pipelineClass: 'StableDiffusionPipeline', scheduler: sd2Scheduler,
  },
  sdxl: {
    family: 'sdxl',
    textEncoders: [
      te({ hidden: 16, layers: 2, hiddenStates: true }),
      te({ folder: 'text_encoder_2', tokenizerFolder: 'tokenizer_2', hidden: 32, layers: 3, projection: 24, hiddenStates: true, pad: '!' }),
    ],
    sampleSize: 128, crossAttentionDim: 48, prediction: 'epsilon', pooledDim: 24,
    scalingFactor: 0.13025, forceUpcast: true, pipelineClass: 'StableDiffusionXLPipeline', scheduler: sdxlScheduler,
  },
  lcm: {
    family: 'lcm', textEncoders: [te({})], sampleSize: 64, crossAttentionDim: 32, prediction: 'epsilon', timeCondDim: 256,
    scalingFactor: 0.18215, forceUpcast: true, pipelineClass: 'LatentConsistencyModelPipeline', scheduler: lcmScheduler,
  },
  turbo: {
    family: 'turbo', textEncoders: [te({ pad: '!' })], sampleSize: 64, crossAttentionDim: 32, prediction: 'epsilon',
    scalingFactor: 0.18215, forceUpcast: true, pipelineClass: 'StableDiffusionPipeline', scheduler: turboScheduler,
  },
};

/** Model-graph sizes shared by the configs and the graphs. */
export const UNET_CHANNELS = 8;
export const UNET_HEAD_DIM = 4;
/** Sinusoidal features per SDXL time id. */
export const TIME_ID_FEATURES = 8;

export function modelIndex(spec: FamilySpec): Record<string, unknown> {
  const nulls = { feature_extractor: [null, null], image_encoder: [null, null] };
  const base: Record<string, unknown> = { _class_name: spec.pipelineClass, _diffusers_version: DIFFUSERS_VERSION, ...nulls };
  if (spec.family === 'sdxl') {
    Object.assign(base, {
      force_zeros_for_empty_prompt: true,
      add_watermarker: null,
      scheduler: ['diffusers', String(spec.scheduler._class_name)],
      text_encoder: ['transformers', 'CLIPTextModel'],
      text_encoder_2: ['transformers', 'CLIPTextModelWithProjection'],
      tokenizer: ['transformers', 'CLIPTokenizer'],
      tokenizer_2: ['transformers', 'CLIPTokenizer'],
    });
  } else {
    Object.assign(base, {
      requires_safety_checker: false,
      safety_checker: [null, null],
      scheduler: ['diffusers', String(spec.scheduler._class_name)],
      text_encoder: ['transformers', 'CLIPTextModel'],
      tokenizer: ['transformers', 'CLIPTokenizer'],
    });
  }
  Object.assign(base, { unet: ['diffusers', 'UNet2DConditionModel'], vae: ['diffusers', 'AutoencoderKL'] });
  return sortKeys(base);
}

export function textEncoderConfig(spec: FamilySpec, enc: TextEncoderSpec): Record<string, unknown> {
  const withProjection = enc.projection !== undefined;
  return sortKeys({
    _name_or_path: `diffusers-runtime-demo/${spec.family}/${enc.folder}`,
    architectures: [withProjection ? 'CLIPTextModelWithProjection' : 'CLIPTextModel'],
    attention_dropout: 0.0,
    bos_token_id: 0,
    dropout: 0.0,
    eos_token_id: 2,
    export_model_type: withProjection ? 'clip-text-with-projection' : 'clip-text',
    hidden_act: spec.family === 'sd15' || enc.folder === 'text_encoder' ? 'quick_gelu' : 'gelu',
    hidden_size: enc.hidden,
    initializer_factor: 1.0,
    initializer_range: 0.02,
    intermediate_size: enc.hidden * 4,
    layer_norm_eps: 1e-5,
    max_position_embeddings: 77,
    model_type: 'clip_text_model',
    num_attention_heads: 4,
    num_hidden_layers: enc.layers,
    pad_token_id: 1,
    projection_dim: enc.projection ?? enc.hidden,
    torch_dtype: 'float32',
    transformers_version: '4.46.3',
    vocab_size: 49408,
  });
}

export function unetConfig(spec: FamilySpec): Record<string, unknown> {
  const sdxl = spec.family === 'sdxl';
  return sortKeys({
    _class_name: 'UNet2DConditionModel',
    _diffusers_version: DIFFUSERS_VERSION,
    act_fn: 'silu',
    addition_embed_type: sdxl ? 'text_time' : null,
    addition_embed_type_num_heads: 64,
    addition_time_embed_dim: sdxl ? TIME_ID_FEATURES : null,
    attention_head_dim: UNET_HEAD_DIM,
    attention_type: 'default',
    block_out_channels: [UNET_CHANNELS],
    center_input_sample: false,
    class_embed_type: null,
    conv_in_kernel: 3,
    conv_out_kernel: 3,
    cross_attention_dim: spec.crossAttentionDim,
    down_block_types: ['CrossAttnDownBlock2D'],
    flip_sin_to_cos: true,
    freq_shift: 0,
    in_channels: spec.inChannels ?? 4,
    layers_per_block: 1,
    mid_block_type: 'UNetMidBlock2DCrossAttn',
    norm_eps: 1e-5,
    norm_num_groups: UNET_CHANNELS,
    out_channels: 4,
    projection_class_embeddings_input_dim: sdxl ? (spec.pooledDim ?? 0) + 6 * TIME_ID_FEATURES : null,
    sample_size: spec.sampleSize,
    time_cond_proj_dim: spec.timeCondDim ?? null,
    time_embedding_type: 'positional',
    up_block_types: ['CrossAttnUpBlock2D'],
    upcast_attention: spec.family === 'sd2',
    use_linear_projection: spec.family !== 'sd15' && spec.family !== 'lcm',
  });
}

export function vaeConfig(spec: FamilySpec): Record<string, unknown> {
  return sortKeys({
    _class_name: 'AutoencoderKL',
    _diffusers_version: DIFFUSERS_VERSION,
    act_fn: 'silu',
    block_out_channels: [16, 16, 16, 16],
    down_block_types: Array(4).fill('DownEncoderBlock2D'),
    force_upcast: spec.forceUpcast,
    in_channels: 3,
    latent_channels: 4,
    latents_mean: null,
    latents_std: null,
    layers_per_block: 1,
    norm_num_groups: 16,
    out_channels: 3,
    sample_size: spec.sampleSize * 8,
    scaling_factor: spec.scalingFactor,
    shift_factor: null,
    up_block_types: Array(4).fill('UpDecoderBlock2D'),
    use_post_quant_conv: true,
    use_quant_conv: true,
  });
}

const SPECIAL = (content: string) => ({ content, lstrip: false, normalized: true, rstrip: false, single_word: false });
const BANG = { content: '!', lstrip: false, normalized: false, rstrip: false, single_word: false };

/** tokenizer_config.json as transformers (≥ 4.34) saves a CLIPTokenizer. */
export function tokenizerConfig(enc: TextEncoderSpec): Record<string, unknown> {
  const added: Record<string, unknown> = {};
  if (enc.pad === '!') added['0'] = { ...BANG, special: true };
  added['49406'] = { ...SPECIAL('<|startoftext|>'), special: true };
  added['49407'] = { ...SPECIAL('<|endoftext|>'), special: true };
  return {
    add_prefix_space: false,
    added_tokens_decoder: added,
    bos_token: '<|startoftext|>',
    clean_up_tokenization_spaces: true,
    do_lower_case: true,
    eos_token: '<|endoftext|>',
    errors: 'replace',
    model_max_length: 77,
    pad_token: enc.pad,
    tokenizer_class: 'CLIPTokenizer',
    unk_token: '<|endoftext|>',
  };
}

export function specialTokensMap(enc: TextEncoderSpec): Record<string, unknown> {
  return {
    bos_token: SPECIAL('<|startoftext|>'),
    eos_token: SPECIAL('<|endoftext|>'),
    pad_token: enc.pad === '!' ? BANG : '<|endoftext|>',
    unk_token: SPECIAL('<|endoftext|>'),
  };
}

function sortKeys(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}
