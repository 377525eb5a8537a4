/** @module The demo's four networks: tiny, cheap, but wired like the real ones so every pipeline input matters. */
import { GraphBuilder, DT, PAD_ROWS } from './graph.js';
import { type FamilySpec, type TextEncoderSpec, UNET_CHANNELS, UNET_HEAD_DIM, TIME_ID_FEATURES } from './families.js';

export type TimestepInput = 'float-scalar' | 'int64-batch' | 'float-batch';

export interface GraphOptions {
  seed: number;
  fp16: boolean;
  /** Changes weights before they are stored, by component folder and weight name (LoRA-merged graphs in tests). */
  edit?: (component: string, name: string, values: Float32Array, dims: readonly number[]) => void;
}

function builder(name: string, component: string, opts: GraphOptions): GraphBuilder {
  const g = new GraphBuilder(name, opts.seed, opts.fp16);
  const edit = opts.edit;
  if (edit) g.editWeight = (n, v, d) => edit(component, n, v, d);
  return g;
}

const VOCAB = 49408;
const MAX_POSITIONS = 77;
const TIME_FEATURES = 16;
/** Standard deviation of the denoiser's latent prior around its structured mean (see unetGraph). */
const PRIOR_STD = 0.35;

const silu = (g: GraphBuilder, x: string): string => g.op('Mul', [x, g.op('Sigmoid', [x])]);
const conv = (g: GraphBuilder, x: string, w: string, b: string, k: number): string =>
  g.op('Conv', [x, w, b], { kernel_shape: { ints: [k, k] }, pads: { ints: Array(4).fill((k - 1) / 2) } });

/**
 * A benchmark padding weight (float32 [PAD_ROWS, cols], see Padding) put on the data path: the mean of `x` scales a
 * [1, PAD_ROWS] activation that is multiplied by the weight. ONNX Runtime therefore reads and pre-packs (CPU) or
 * uploads (CUDA) every byte at session creation and streams it on every run, as it does real linear layers, and no
 * optimiser can fold it away (it depends on the input). Returns a scalar that is exactly zero (mean × 0) to add in.
 */
function padTap(g: GraphBuilder, padding: string, x: string): string {
  const mean = g.op('Reshape', [g.op('ReduceMean', [x], { keepdims: { i: 0 } }), g.int64s('/pad_shape_11', [1, 1])]);
  const act = g.op('Mul', [mean, g.random('pad.act.weight', [1, PAD_ROWS], 1)]);
  const wide = g.op('MatMul', [act, padding]); // [1, cols]
  return g.op('Mul', [g.op('ReduceMean', [wide], { keepdims: { i: 0 } }), g.floats('/pad_zero', [], [0])]);
}

/** Sinusoids of `x` ([..., 1] broadcast against `half` frequencies, diffusers' by default), cos first as with flip_sin_to_cos. */
function sinusoids(g: GraphBuilder, name: string, x: string, half: number, axis: number, shape: number[], given?: Float32Array): string {
  const freqs = given ?? Float32Array.from({ length: half }, (_, k) => Math.exp((-Math.log(10000) * k) / half));
  const args = g.op('Mul', [x, g.floats(name, shape, freqs)]);
  return g.op('Concat', [g.op('Cos', [args]), g.op('Sin', [args])], { axis: { i: axis } });
}

/**
 * CLIP-shaped text encoder: token + position embeddings, `layers` blocks of LayerNorm → MatMul → tanh plus a
 * whole-sequence mean mix (no causal mask), a final LayerNorm, and the pooled row at the EOS (highest) id.
 */
export function textEncoderGraph(spec: FamilySpec, enc: TextEncoderSpec, opts: GraphOptions, padding?: string): GraphBuilder {
  const g = builder(`${spec.family}/${enc.folder}`, enc.folder, opts);
  const D = enc.hidden;
  const dims = ['batch_size', 'sequence_length'];
  const ids = g.input('input_ids', 'int64', dims);
  const tok = g.op('Gather', [g.random('text_model.embeddings.token_embedding.weight', [VOCAB, D], 1), ids]);
  const zero = g.int64s('/const_0', [0]);
  const seq = g.op('Shape', [ids], { start: { i: 1 }, end: { i: 2 } });
  const posTable = g.random('text_model.embeddings.position_embedding.weight', [MAX_POSITIONS, D], 0.5);
  let h = g.op('Add', [tok, g.op('Slice', [posTable, zero, seq, zero])]);
  if (padding) h = g.op('Add', [h, padTap(g, padding, h)]);
  const hidden = [h];
  const layerNorm = (x: string, prefix: string) =>
    g.op('LayerNormalization', [x, g.random(`${prefix}.weight`, [D], 0.1, 1), g.random(`${prefix}.bias`, [D], 0.1)], {
      axis: { i: -1 }, epsilon: { f: 1e-5 },
    });
  for (let l = 0; l < enc.layers; l++) {
    const p = `text_model.encoder.layers.${l}`;
    const ff = g.op('Tanh', [g.op('MatMul', [layerNorm(h, `${p}.layer_norm1`), g.linear(`${p}.mlp.fc.weight`, D, D, 1 / Math.sqrt(D))])]);
    const mean = g.op('ReduceMean', [h], { axes: { ints: [1] }, keepdims: { i: 1 } });
    const mix = g.op('MatMul', [mean, g.linear(`${p}.mix.weight`, D, D, 0.5 / Math.sqrt(D))]);
    h = g.op('Add', [g.op('Add', [h, ff]), mix]);
    hidden.push(h);
  }
  const last = layerNorm(h, 'text_model.final_layer_norm');
  // CLIP pools at argmax(input_ids): the EOS id 49407 is the largest id in the vocabulary.
  const eos = g.op('ArgMax', [g.op('Cast', [ids], { to: { i: DT.FLOAT } })], { axis: { i: 1 }, keepdims: { i: 1 } });
  const pooled = g.op('GatherND', [last, eos], { batch_dims: { i: 1 } });
  const seqDims = [...dims, D];
  if (enc.projection !== undefined) {
    const proj = g.linear('text_projection.weight', D, enc.projection, 1 / Math.sqrt(D));
    g.output('text_embeds', g.op('MatMul', [pooled, proj]), ['batch_size', enc.projection]);
    g.output('last_hidden_state', last, seqDims);
  } else {
    g.output('last_hidden_state', last, seqDims);
    g.output('pooler_output', pooled, ['batch_size', D]);
  }
  if (enc.hiddenStates) hidden.forEach((t, i) => g.output(`hidden_states.${i}`, t, seqDims));
  return g;
}

/** ᾱ(t) for the scaled_linear 0.00085…0.012 schedule every family here trains with. */
function alphasCumprod(): Float64Array {
  const a = Math.sqrt(0.00085), b = Math.sqrt(0.012), out = new Float64Array(1000);
  let prod = 1;
  for (let i = 0; i < 1000; i++) {
    const beta = (a + ((b - a) * i) / 999) ** 2;
    prod *= 1 - beta;
    out[i] = prod;
  }
  return out;
}

/**
 * Per-timestep coefficients (cx, cp) so that out = cx·x + cp·P is the Bayes-optimal prediction for a latent
 * prior N(P, PRIOR_STD²): the posterior mean is x0 = k·x + w·P, with k = √ᾱ·s²/(ᾱs² + 1 − ᾱ) and
 * w = (1 − ᾱ)/(ᾱs² + 1 − ᾱ); ε = (x − √ᾱ·x0)/√(1 − ᾱ) and v = √ᾱ·ε − √(1 − ᾱ)·x0. Any sampler then
 * converges to P (+ a little seed noise): bounded, and structured by whatever P is.
 */
function denoiserTables(prediction: FamilySpec['prediction']): { cx: Float32Array; cp: Float32Array } {
  const ac = alphasCumprod(), s2 = PRIOR_STD ** 2;
  const cx = new Float32Array(1000), cp = new Float32Array(1000);
  for (let t = 0; t < 1000; t++) {
    const a = ac[t]!, den = a * s2 + 1 - a, sa = Math.sqrt(a), sn = Math.sqrt(1 - a);
    const k = (sa * s2) / den, w = (1 - a) / den;
    const ex = (1 - sa * k) / sn, ep = (-sa * w) / sn;
    cx[t] = prediction === 'epsilon' ? ex : sa * ex - sn * k;
    cp[t] = prediction === 'epsilon' ? ep : sa * ep - sn * w;
  }
  return { cx, cp };
}

const POSITION_FREQS = 3;

/** [H, W, dh] query offsets from normalised pixel coordinates (dynamic H and W, read from `x`). */
function positionQueries(g: GraphBuilder, x: string, dh: number): string {
  const shape = g.op('Shape', [x]);
  const zero = g.int64Scalar('/pos_zero', 0), one = g.int64Scalar('/pos_one', 1);
  const axis = (i: number, name: string) => {
    const n = g.op('Gather', [shape, g.int64Scalar(`/pos_dim_${name}`, i)]); // scalar
    const coord = g.op('Div', [g.op('Cast', [g.op('Range', [zero, n, one])], { to: { i: DT.FLOAT } }), g.op('Cast', [n], { to: { i: DT.FLOAT } })]);
    const freqs = Float32Array.from({ length: POSITION_FREQS }, (_, k) => 2 * Math.PI * (k + 1));
    const emb = sinusoids(g, `/pos_freqs_${name}`, g.op('Unsqueeze', [coord, g.int64s(`/pos_axes_${name}`, [1])]), POSITION_FREQS, 1, [1, POSITION_FREQS], freqs);
    return g.op('MatMul', [emb, g.linear(`attn2.to_q_pos_${name}.weight`, 2 * POSITION_FREQS, dh, 2.5 / Math.sqrt(2 * POSITION_FREQS))]); // [n, dh]
  };
  const qy = axis(2, 'y'), qx = axis(3, 'x');
  return g.op('Add', [g.op('Unsqueeze', [qy, g.int64s('/pos_axes_y1', [1])]), g.op('Unsqueeze', [qx, g.int64s('/pos_axes_x0', [0])])]);
}

/**
 * The UNet: sinusoidal embedding of `timestep` (+ SDXL text_embeds/time_ids, + LCM timestep_cond) → per-channel
 * bias; conv 3×3 → SiLU → cross-attention over encoder_hidden_states → conv 3×3 → SiLU → conv 3×3 → tanh = P,
 * the structured prior mean; out_sample = cx(t)·sample + cp(t)·P (see denoiserTables).
 */
export function unetGraph(spec: FamilySpec, timestep: TimestepInput, opts: GraphOptions, padding?: string): GraphBuilder {
  const g = builder(`${spec.family}/unet`, 'unet', opts);
  const C = UNET_CHANNELS, D = spec.crossAttentionDim, dh = UNET_HEAD_DIM;
  const inChannels = spec.inChannels ?? 4;
  const sampleIn = g.input('sample', 'float', ['batch_size', inChannels, 'height', 'width']);
  // An inpainting UNet sees the mask and the masked image's latents too (its conv_in takes all 9 channels), but
  // denoises only the first 4: they are the latents.
  const x = inChannels === 4 ? sampleIn : g.op('Slice', [sampleIn, g.int64s('/latent_from', [0]), g.int64s('/latent_to', [4]), g.int64s('/latent_axis', [1])]);
  const t =
    timestep === 'float-scalar' ? g.input('timestep', 'float', [])
    : timestep === 'int64-batch' ? g.op('Cast', [g.input('timestep', 'int64', ['steps'])], { to: { i: DT.FLOAT } })
    : g.input('timestep', 'float', ['batch']);
  const ehs = g.input('encoder_hidden_states', 'float', ['batch_size', 'sequence_length', D]);
  const tFlat = g.op('Reshape', [t, g.int64s('/shape_flat', [-1])]); // [1] or [batch]
  const to4d = g.int64s('/shape_n111', [-1, 1, 1, 1]);

  // Time embedding → channel bias [N, C, 1, 1].
  let temb = sinusoids(g, '/time_freqs', g.op('Unsqueeze', [tFlat, g.int64s('/axes_1', [1])]), TIME_FEATURES / 2, 1, [1, TIME_FEATURES / 2]);
  if (spec.timeCondDim !== undefined) {
    const cond = g.input('timestep_cond', 'float', ['batch_size', spec.timeCondDim]);
    temb = g.op('Add', [temb, g.op('MatMul', [cond, g.linear('time_embedding.cond_proj.weight', spec.timeCondDim, TIME_FEATURES, 1 / Math.sqrt(spec.timeCondDim))])]);
  }
  const l1 = g.op('Add', [g.op('MatMul', [temb, g.linear('time_embedding.linear_1.weight', TIME_FEATURES, 32, 1 / Math.sqrt(TIME_FEATURES))]), g.random('time_embedding.linear_1.bias', [32], 0.1)]);
  temb = g.op('Add', [g.op('MatMul', [silu(g, l1), g.linear('time_embedding.linear_2.weight', 32, C, 1 / Math.sqrt(32))]), g.random('time_embedding.linear_2.bias', [C], 0.1)]);
  if (spec.pooledDim !== undefined) {
    const P = spec.pooledDim;
    const textEmbeds = g.input('text_embeds', 'float', ['batch_size', P]);
    const timeIds = g.input('time_ids', 'float', ['batch_size', 6]);
    const ids = sinusoids(g, '/time_ids_freqs', g.op('Unsqueeze', [timeIds, g.int64s('/axes_2', [2])]), TIME_ID_FEATURES / 2, 2, [1, 1, TIME_ID_FEATURES / 2]);
    const idsFlat = g.op('Reshape', [ids, g.int64s('/shape_b_flat', [0, -1])]);
    const aug = g.op('Add', [
      g.op('MatMul', [textEmbeds, g.linear('add_embedding.text.weight', P, C, 1 / Math.sqrt(P))]),
      g.op('MatMul', [idsFlat, g.linear('add_embedding.time.weight', 6 * TIME_ID_FEATURES, C, 1 / Math.sqrt(6 * TIME_ID_FEATURES))]),
    ]);
    temb = g.op('Add', [temb, aug]);
  }
  const bias = g.op('Unsqueeze', [temb, g.int64s('/axes_23', [2, 3])]);

  let h = conv(g, sampleIn, g.convWeight('conv_in.weight', [C, inChannels, 3, 3], 1 / 6), g.random('conv_in.bias', [C], 0.1), 3);
  h = silu(g, g.op('Add', [h, bias]));

  // Cross-attention: queries from latent pixels, keys and values from the text.
  const hs = g.op('Transpose', [g.op('Reshape', [h, g.int64s('/shape_bc_flat', [0, 0, -1])])], { perm: { ints: [0, 2, 1] } }); // [B, HW, C]
  // Queries also carry the pixel's position (a few low sinusoids of y/height and x/width), so different image
  // regions attend to different tokens: the prompt lays out large shapes, not only texture.
  const qPos = g.op('Reshape', [positionQueries(g, x, dh), g.int64s('/shape_hw_dh', [-1, dh])]); // [HW, dh]
  const q = g.op('Add', [g.op('MatMul', [hs, g.linear('attn2.to_q.weight', C, dh, 1 / Math.sqrt(C))]), qPos]);
  const k = g.op('MatMul', [ehs, g.linear('attn2.to_k.weight', D, dh, 1 / Math.sqrt(D))]);
  const v = g.op('MatMul', [ehs, g.linear('attn2.to_v.weight', D, C, 1 / Math.sqrt(D))]);
  const scores = g.op('Mul', [g.op('MatMul', [q, g.op('Transpose', [k], { perm: { ints: [0, 2, 1] } })]), g.floats('/attn_scale', [], [1 / Math.sqrt(dh)])]);
  const attn = g.op('MatMul', [g.op('Softmax', [scores], { axis: { i: -1 } }), v]); // [B, HW, C]
  const back = g.op('Reshape', [g.op('Transpose', [attn], { perm: { ints: [0, 2, 1] } }), g.op('Shape', [h])]);
  let gain = g.floats('/attn_gain', [], [3]);
  if (padding) gain = g.op('Add', [gain, padTap(g, padding, x)]);
  h = g.op('Add', [h, g.op('Mul', [back, gain])]);

  h = silu(g, conv(g, h, g.convWeight('mid.conv.weight', [C, C, 3, 3], 1 / Math.sqrt(9 * C)), g.random('mid.conv.bias', [C], 0.1), 3));
  const prior = g.op('Tanh', [conv(g, h, g.convWeight('conv_out.weight', [4, C, 3, 3], 1.5 / Math.sqrt(9 * C)), g.random('conv_out.bias', [4], 0.2), 3)]);

  // The timestep picks the denoiser coefficients too (floored and clamped: Euler timesteps are fractional).
  const idx = g.op('Cast', [g.op('Clip', [g.op('Floor', [tFlat]), g.floats('/t_min', [], [0]), g.floats('/t_max', [], [999])])], { to: { i: DT.INT64 } });
  const { cx, cp } = denoiserTables(spec.prediction);
  const cxT = g.op('Reshape', [g.op('Gather', [g.floats('denoiser.cx', [1000], cx), idx]), to4d]);
  const cpT = g.op('Reshape', [g.op('Gather', [g.floats('denoiser.cp', [1000], cp), idx]), to4d]);
  const out = g.op('Add', [g.op('Mul', [x, cxT]), g.op('Mul', [prior, cpT])]);
  g.output('out_sample', out, ['batch_size', 4, 'height', 'width']);
  return g;
}

/** VAE decoder: conv 3×3 → SiLU, then a smooth ×8 (linear Resize) plus an 8×8 detail (DepthToSpace), conv 3×3, tanh. */
export function vaeDecoderGraph(spec: FamilySpec, opts: GraphOptions, padding?: string): GraphBuilder {
  const g = builder(`${spec.family}/vae_decoder`, 'vae_decoder', opts);
  const F = 16;
  const z = g.input('latent_sample', 'float', ['batch_size', 4, 'latent_height', 'latent_width']);
  // Undo the pipeline's 1/scaling_factor so the weights see unit-scale latents.
  let zs = g.op('Mul', [z, g.floats('/unscale', [], [spec.scalingFactor])]);
  if (padding) zs = g.op('Add', [zs, padTap(g, padding, zs)]);
  const h = silu(g, conv(g, zs, g.random('decoder.conv_in.weight', [F, 4, 3, 3], 1 / 6), g.random('decoder.conv_in.bias', [F], 0.1), 3));
  const base = conv(g, h, g.random('decoder.base.weight', [3, F, 1, 1], 0.6 / Math.sqrt(F)), g.random('decoder.base.bias', [3], 0.1), 1);
  const smooth = g.op('Resize', [base, '', g.floats('/scales_8', [4], [1, 1, 8, 8])], { mode: { s: 'linear' } });
  const detail = g.op('DepthToSpace', [conv(g, h, g.random('decoder.detail.weight', [192, F, 1, 1], 0.2 / Math.sqrt(F)), g.random('decoder.detail.bias', [192], 0.02), 1)], { blocksize: { i: 8 } });
  const eye = new Float32Array(81);
  for (let c = 0; c < 3; c++) eye[c * 27 + c * 9 + 4] = 1;
  const mixW = g.random('decoder.conv_out.weight', [3, 3, 3, 3], 0.05);
  const out = g.op('Tanh', [conv(g, g.op('Add', [smooth, detail]), g.op('Add', [mixW, g.floats('/conv_out_identity', [3, 3, 3, 3], eye)]), g.random('decoder.conv_out.bias', [3], 0.05), 3)]);
  g.output('sample', out, ['batch_size', 3, 'latent_height * 8', 'latent_width * 8']);
  return g;
}

/** VAE encoder: SpaceToDepth(8) → conv 1×1 → SiLU → conv 3×3 to mean ‖ logvar (8 channels). */
export function vaeEncoderGraph(spec: FamilySpec, opts: GraphOptions): GraphBuilder {
  const g = builder(`${spec.family}/vae_encoder`, 'vae_encoder', opts);
  const x = g.input('sample', 'float', ['batch_size', 3, 'sample_height', 'sample_width']);
  const s2d = g.op('SpaceToDepth', [x], { blocksize: { i: 8 } });
  const h = silu(g, conv(g, s2d, g.random('encoder.conv_in.weight', [16, 192, 1, 1], 1 / Math.sqrt(192)), g.random('encoder.conv_in.bias', [16], 0.1), 1));
  // logvar channels sit near −6 so sampling the posterior adds little noise, as with a trained VAE.
  const bias = new Float32Array([0, 0, 0, 0, -6, -6, -6, -6]);
  const out = conv(g, h, g.random('encoder.conv_out.weight', [8, 16, 3, 3], 1 / Math.sqrt(9 * 16)), g.floats('encoder.conv_out.bias', [8], bias), 3);
  g.output('latent_parameters', out, ['batch_size', 8, 'sample_height / 8', 'sample_width / 8']);
  return g;
}
