/**
 * @module The demo model's LoRA adapters (`loras/*.safetensors`), seeded and tiny: `demo-style` in diffusers/PEFT
 * form (UNet attention and a 3×3 conv, the text encoder's MLP; alpha in lora_adapter_metadata) and `demo-kohya` in
 * kohya form (`lora_unet_…`, `lora_te_…`, `.alpha` tensors, a LoCon 3×3 conv). They change the image visibly, so
 * `"loras":[{"name":"demo-style"}]` can be tried on the demo model with no files of one's own.
 */
import { writeSafetensors } from './safetensors.js';
import { fnv1a, mulberry32 } from './graph.js';
import { type FamilySpec, UNET_CHANNELS, UNET_HEAD_DIM } from './families.js';

interface Layer {
  component: 'unet' | 'text_encoder' | 'text_encoder_2';
  /** Torch module path. */
  module: string;
  /** The weight's torch shape: [out, in] or [out, in, kh, kw]. */
  shape: number[];
}

function uniform(seed: string, n: number, std: number): Float32Array {
  const next = mulberry32(fnv1a(seed));
  const a = std * Math.sqrt(3);
  return Float32Array.from({ length: n }, () => (next() * 2 - 1) * a);
}

/** down [r, in, (kh, kw)] and up [out, r, (1, 1)] of one layer; the update is about half the weight's own spread. */
function lowRank(name: string, l: Layer, rank: number, gain: number): { down: { shape: number[]; data: Float32Array }; up: { shape: number[]; data: Float32Array } } {
  const [out, inF, ...k] = l.shape as [number, number, ...number[]];
  const fanIn = inF * k.reduce((a, b) => a * b, 1);
  const downShape = [rank, inF, ...k];
  const upShape = k.length > 0 ? [out, rank, 1, 1] : [out, rank];
  return {
    down: { shape: downShape, data: uniform(`${name}:${l.module}:down`, rank * fanIn, 1 / Math.sqrt(fanIn)) },
    up: { shape: upShape, data: uniform(`${name}:${l.module}:up`, out * rank, gain / Math.sqrt(rank)) },
  };
}

/** The two adapters' files for a demo family, by file name. */
export function demoLoras(spec: FamilySpec): Record<string, Uint8Array> {
  const C = UNET_CHANNELS, dh = UNET_HEAD_DIM, D = spec.crossAttentionDim;
  const te = spec.textEncoders;
  const te1 = te[0]!.hidden;
  const style: Layer[] = [
    { component: 'unet', module: 'attn2.to_k', shape: [dh, D] },
    { component: 'unet', module: 'attn2.to_v', shape: [C, D] },
    { component: 'unet', module: 'conv_in', shape: [C, 4, 3, 3] },
    { component: 'text_encoder', module: 'text_model.encoder.layers.0.mlp.fc', shape: [te1, te1] },
  ];
  const kohya: Layer[] = [
    { component: 'unet', module: 'attn2.to_q', shape: [dh, C] },
    { component: 'unet', module: 'attn2.to_v', shape: [C, D] },
    { component: 'unet', module: 'mid.conv', shape: [C, C, 3, 3] },
    { component: 'text_encoder', module: 'text_model.encoder.layers.1.mix', shape: [te1, te1] },
    ...(te[1] ? [{ component: 'text_encoder_2' as const, module: 'text_model.encoder.layers.0.mlp.fc', shape: [te[1].hidden, te[1].hidden] }] : []),
  ];
  const rank = 4;
  const styleTensors = style.flatMap((l) => {
    const { down, up } = lowRank('demo-style', l, rank, 1.4);
    return [
      { name: `${l.component}.${l.module}.lora_A.weight`, ...down },
      { name: `${l.component}.${l.module}.lora_B.weight`, ...up },
    ];
  });
  // alpha 2 of rank 4 scales every update by 0.5, as PEFT's lora_alpha does.
  const meta = { format: 'pt', lora_adapter_metadata: JSON.stringify({ 'unet.r': rank, 'unet.lora_alpha': 2, 'text_encoder.r': rank, 'text_encoder.lora_alpha': 2 }) };
  const prefix = { unet: 'lora_unet', text_encoder: 'lora_te', text_encoder_2: 'lora_te2' } as const;
  const kohyaTensors = kohya.flatMap((l) => {
    const { down, up } = lowRank('demo-kohya', l, rank, 0.9);
    const k = `${prefix[l.component]}_${l.module.replaceAll('.', '_')}`;
    return [
      { name: `${k}.alpha`, shape: [], data: Float32Array.of(rank) },
      { name: `${k}.lora_down.weight`, ...down },
      { name: `${k}.lora_up.weight`, ...up },
    ];
  });
  return {
    'demo-style.safetensors': writeSafetensors(styleTensors, meta),
    'demo-kohya.safetensors': writeSafetensors(kohyaTensors, { ss_network_module: 'networks.lora', ss_network_dim: String(rank), ss_network_alpha: String(rank) }),
  };
}
