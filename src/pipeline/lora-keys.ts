/**
 * @module LoRA adapter files → low-rank updates per torch weight. Two key conventions are read:
 *
 * - diffusers / PEFT: `unet.<module>.lora_A.weight` and `lora_B.weight` (also `text_encoder.`, `text_encoder_2.`, no
 *   prefix or `base_model.model.` for a UNet-only PEFT file), the older `<module>.lora.down/up.weight`,
 *   `lora_linear_layer.down/up`, and the attention-processor form `attn1.processor.to_q_lora.down.weight`. Alpha
 *   comes from a `<module>.alpha` tensor, else the file's `lora_adapter_metadata` (`unet.lora_alpha`,
 *   `unet.alpha_pattern`), else the most common `.alpha` of the component's other layers, else it equals the rank
 *   (scale 1), as diffusers loads them.
 * - kohya (sd-scripts, LyCORIS LoCon): `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`,
 *   `.alpha` (a layer without one: as above); text encoders `lora_te_` (or `lora_te1_`) and `lora_te2_`. The
 *   underscored name is matched against the export's torch module names, so no guessing where a name itself holds
 *   underscores (`to_q`, `proj_in`).
 *
 * Each layer adds `scale · (alpha / rank) · up · down` to its weight; conv layers are `down` [r, in, kh, kw] and `up`
 * [out, r, 1, 1] (kohya LoCon, PEFT Conv2d), so 1×1 and 3×3 convolutions merge the same way.
 */
import { RuntimeError } from '../errors.js';
import { numel, type LoraMap, type MapEntry } from './lora-map.js';
import { checkFloats, readFloats, readScalar, type SafeTensors, type StTensor } from './lora-safetensors.js';

export type LoraComponent = 'unet' | 'text_encoder' | 'text_encoder_2';
export const LORA_COMPONENTS: readonly LoraComponent[] = ['unet', 'text_encoder', 'text_encoder_2'];

export interface LoraLayer {
  component: LoraComponent;
  /** The torch module path (diffusers/PEFT), or the underscored kohya name to be resolved against the map. */
  module: string;
  kohya: boolean;
  /** The file's own key prefix for this layer, for error messages. */
  key: string;
  down?: StTensor;
  up?: StTensor;
  alpha?: number;
  /** PEFT's rank-stabilised LoRA (`use_rslora` in the file's metadata): the update is scaled by alpha / √rank. */
  rsLora?: boolean;
}

export interface ParsedAdapter {
  name: string;
  format: 'diffusers' | 'kohya' | 'mixed';
  layers: LoraLayer[];
  /** Keys of no known LoRA form (named in the 400). */
  unknownKeys: string[];
  /** Keys of LoRA variants this runtime does not merge (DoRA, LoHa, LoKr, CP-decomposed LoCon). */
  unsupportedKeys: string[];
  /** Other reasons the file cannot be merged as diffusers would (each names the adapter and the keys). */
  problems: string[];
}

const KOHYA = /^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|lora_mid\.weight|dora_scale|hada_\w+|lokr_\w+)$/;
const PREFIX = /^(unet|text_encoder_2|text_encoder)\.(.+)$/;
const KOHYA_COMPONENT: Readonly<Record<string, LoraComponent>> = { lora_unet: 'unet', lora_te: 'text_encoder', lora_te1: 'text_encoder', lora_te2: 'text_encoder_2' };
const TE_OLD_NAMES: Readonly<Record<string, string>> = { to_q: 'q_proj', to_k: 'k_proj', to_v: 'v_proj', to_out: 'out_proj' };

/** Sorts the file's keys into layers; nothing is read from the data yet. */
export function parseAdapter(st: SafeTensors, name: string): ParsedAdapter {
  const layers = new Map<string, LoraLayer>();
  const unknownKeys: string[] = [];
  const unsupportedKeys: string[] = [];
  let kohyaSeen = false;
  let diffusersSeen = false;
  const layer = (component: LoraComponent, module: string, kohya: boolean, key: string): LoraLayer => {
    const id = `${component}:${module}`;
    let l = layers.get(id);
    if (!l) layers.set(id, (l = { component, module, kohya, key }));
    return l;
  };
  const alphas = new Map<string, number>(); // `${component}:${module}` → alpha from a tensor
  for (const [key, t] of st.tensors) {
    const k = KOHYA.exec(key);
    if (k) {
      kohyaSeen = true;
      const component = KOHYA_COMPONENT[k[1]!]!;
      const module = k[2]!;
      const what = k[3]!;
      if (what === 'alpha') alphas.set(`${component}:${module}`, scalar(st, t, name));
      else if (what === 'lora_down.weight') layer(component, module, true, `${k[1]}_${module}`).down = t;
      else if (what === 'lora_up.weight') layer(component, module, true, `${k[1]}_${module}`).up = t;
      else unsupportedKeys.push(key);
      continue;
    }
    const p = PREFIX.exec(key);
    const component: LoraComponent = p ? (p[1] as LoraComponent) : 'unet';
    let rest = p ? p[2]! : key;
    if (rest.startsWith('base_model.model.')) rest = rest.slice('base_model.model.'.length);
    let m: RegExpExecArray | null;
    if ((m = /^(.+)\.lora_([AB])(?:\.default)?\.weight$/.exec(rest))) {
      diffusersSeen = true;
      const l = layer(component, m[1]!, false, `${p ? `${p[1]}.` : ''}${m[1]}`);
      if (m[2] === 'A') l.down = t;
      else l.up = t;
    } else if ((m = /^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$/.exec(rest))) {
      diffusersSeen = true;
      const l = layer(component, m[1]!, false, `${p ? `${p[1]}.` : ''}${m[1]}`);
      if (m[2] === 'down') l.down = t;
      else l.up = t;
    } else if ((m = /^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(rest))) {
      // diffusers' attention-processor LoRA: to_out is the first Linear of to_out; text encoders use CLIP's names.
      diffusersSeen = true;
      const proj = component === 'unet' ? (m[2] === 'to_out' ? 'to_out.0' : m[2]!) : TE_OLD_NAMES[m[2]!]!;
      const module = `${m[1]}.${proj}`;
      const l = layer(component, module, false, `${p ? `${p[1]}.` : ''}${module}`);
      if (m[3] === 'down') l.down = t;
      else l.up = t;
    } else if ((m = /^(.+)\.alpha$/.exec(rest))) {
      diffusersSeen = true;
      const proc = /^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora$/.exec(m[1]!);
      const module = proc ? `${proc[1]}.${component === 'unet' ? (proc[2] === 'to_out' ? 'to_out.0' : proc[2]!) : TE_OLD_NAMES[proc[2]!]!}` : m[1]!;
      alphas.set(`${component}:${module}`, scalar(st, t, name));
    } else if (/\.(lora_magnitude_vector|dora_scale)/.test(rest)) {
      unsupportedKeys.push(key);
    } else {
      unknownKeys.push(key);
    }
  }
  const meta = adapterMetadata(st, name);
  const { common, problems } = commonAlphas(name, layers, alphas);
  for (const l of layers.values()) {
    l.alpha = alphas.get(`${l.component}:${l.module}`) ?? (l.kohya ? undefined : metadataAlpha(meta, l.component, l.module)) ?? common.get(l.component);
    // diffusers builds PEFT's LoraConfig from this metadata, use_rslora included.
    if (!l.kohya && meta[`${l.component}.use_rslora`] === true) l.rsLora = true;
  }
  return { name, format: kohyaSeen && diffusersSeen ? 'mixed' : kohyaSeen ? 'kohya' : 'diffusers', layers: [...layers.values()], unknownKeys, unsupportedKeys, problems };
}

/**
 * The alpha a layer without a `.alpha` tensor takes, per component, where others of the component have one: the most
 * common of theirs, as diffusers loads such a file (its network alphas become PEFT's `lora_alpha`, the most common
 * value, and an `alpha_pattern` for the rest; a layer in neither takes `lora_alpha`). kohya's own scripts would give
 * it its rank instead; diffusers is the reference here (test/fixtures/lora/kohya-partial-alpha.json). Where two values
 * are equally common, diffusers takes the one it met first in the file's key order, which no file states: refused.
 * Only alphas of layers with a down weight count, as diffusers collects them.
 */
function commonAlphas(name: string, layers: ReadonlyMap<string, LoraLayer>, alphas: ReadonlyMap<string, number>) {
  const common = new Map<LoraComponent, number>();
  const problems: string[] = [];
  for (const c of LORA_COMPONENTS) {
    const of = [...layers.values()].filter((l) => l.component === c && l.down);
    const without = of.filter((l) => !alphas.has(`${c}:${l.module}`));
    if (without.length === 0 || without.length === of.length) continue;
    const counts = new Map<number, number>();
    for (const l of of) {
      const a = alphas.get(`${c}:${l.module}`);
      if (a !== undefined) counts.set(a, (counts.get(a) ?? 0) + 1);
    }
    const top = Math.max(...counts.values());
    const tied = [...counts].filter(([, n]) => n === top).map(([a]) => a).sort((a, b) => a - b);
    if (tied.length > 1) {
      problems.push(
        `adapter "${name}" has a .alpha for only some of its ${c} layers, and its alphas ${tied.join(' and ')} are equally common, so the ` +
          `alpha of the layers without one is ambiguous (diffusers takes the most common): ${listKeys(without.map((l) => l.key))}; give each layer a .alpha`,
      );
    } else {
      common.set(c, tied[0]!);
    }
  }
  return { common, problems };
}

function scalar(st: SafeTensors, t: StTensor, name: string): number {
  const v = readScalar(st, t, `adapter "${name}"`);
  if (v === undefined || !Number.isFinite(v)) throw new RuntimeError('INVALID_INPUT', `adapter "${name}": ${t.name} must hold one finite number`);
  return v;
}

/** diffusers' `lora_adapter_metadata`: PEFT LoraConfig fields per component, flattened as `unet.lora_alpha`. */
function adapterMetadata(st: SafeTensors, name: string): Record<string, unknown> {
  const raw = st.metadata.lora_adapter_metadata;
  if (raw === undefined) return {};
  try {
    const v = JSON.parse(raw) as unknown;
    return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : {};
  } catch {
    throw new RuntimeError('INVALID_INPUT', `adapter "${name}": its lora_adapter_metadata is not JSON`);
  }
}

/**
 * PEFT's rule (`get_pattern_key`: `re.match(rf"(.*\.)?({key})$", module)`): an alpha_pattern key matches a module whose
 * whole name, or a part of it after a dot, it matches; the first such key wins, else lora_alpha.
 */
function metadataAlpha(meta: Record<string, unknown>, component: string, module: string): number | undefined {
  const pattern = meta[`${component}.alpha_pattern`];
  if (typeof pattern === 'object' && pattern !== null) {
    for (const [k, v] of Object.entries(pattern as Record<string, unknown>)) {
      if (typeof v !== 'number') continue;
      let re: RegExp;
      try {
        re = new RegExp(`^(.*\\.)?(${k})$`);
      } catch {
        continue;
      }
      if (re.test(module)) return v;
    }
  }
  const a = meta[`${component}.lora_alpha`];
  return typeof a === 'number' ? a : undefined;
}

/**
 * The diffusers module names (underscored, as kohya writes them) an SDXL sd-scripts module name may stand for: its UNet
 * uses Stability's original block names (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_2_2_conv`), mapped
 * here as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key` map them. `layersPerBlock` is
 * the UNet config's. Where the original index does not say which diffusers module it is (an up block's second module
 * is an attention, or the upsampler of a block without attention), every candidate is returned and the export's map
 * decides, since only one exists.
 */
export function sgmCandidates(name: string, layersPerBlock: number): string[] {
  const L1 = layersPerBlock + 1;
  const resnet = (rest: string) =>
    rest.replace(/^in_layers_2/, 'conv1').replace(/^out_layers_3/, 'conv2').replace(/^emb_layers_1/, 'time_emb_proj').replace(/^skip_connection/, 'conv_shortcut');
  const join = (...parts: string[]) => parts.filter((p) => p !== '').join('_');
  const fixed: Record<string, string> = { input_blocks_0_0: 'conv_in', time_embed_0: 'time_embedding_linear_1', time_embed_2: 'time_embedding_linear_2', label_emb_0_0: 'add_embedding_linear_1', label_emb_0_2: 'add_embedding_linear_2', out_2: 'conv_out' };
  if (Object.hasOwn(fixed, name)) return [fixed[name]!];
  let m: RegExpExecArray | null;
  if ((m = /^input_blocks_(\d+)_(\d+)_?(.*)$/.exec(name))) {
    const i = Number(m[1]), j = Number(m[2]), rest = m[3]!;
    if (i < 1) return [];
    const b = Math.floor((i - 1) / L1), l = (i - 1) % L1;
    if (rest === 'op' || rest.startsWith('op_')) return [join('down_blocks', String(b), 'downsamplers_0_conv', rest.slice(3))];
    return j === 0 ? [join('down_blocks', String(b), 'resnets', String(l), resnet(rest))] : j === 1 ? [join('down_blocks', String(b), 'attentions', String(l), rest)] : [];
  }
  if ((m = /^middle_block_(\d)_?(.*)$/.exec(name))) {
    const k = Number(m[1]), rest = m[2]!;
    return k === 1 ? [join('mid_block_attentions_0', rest)] : k === 0 || k === 2 ? [join('mid_block_resnets', String(k / 2), resnet(rest))] : [];
  }
  if ((m = /^output_blocks_(\d+)_(\d+)_?(.*)$/.exec(name))) {
    const i = Number(m[1]), j = Number(m[2]), rest = m[3]!;
    const b = Math.floor(i / L1), l = i % L1;
    if (j === 0) return [join('up_blocks', String(b), 'resnets', String(l), resnet(rest))];
    const up = rest === 'conv' ? [join('up_blocks', String(b), 'upsamplers_0_conv')] : [];
    return j === 1 ? [join('up_blocks', String(b), 'attentions', String(l), rest), ...up] : j === 2 ? up : [];
  }
  return [];
}

/**
 * One weight's update: Σ over the adapters' layers on it, each `factor · up · down` (see mergeDelta). The layers'
 * tensors stay in their files until the weight is merged: an adapter's values as float64 are four times its float16
 * file, and SDXL adapters reach hundreds of MB.
 */
export interface WeightUpdate {
  component: LoraComponent;
  param: string;
  entry: MapEntry;
  terms: Array<{ adapter: string; factor: number; st: SafeTensors; up: StTensor; down: StTensor; rank: number }>;
}

export interface Resolution {
  updates: Map<string, WeightUpdate>;
  /** Per adapter, the problems that make it unusable on this model (each names the keys). */
  problems: string[];
}

/** At most this many keys are named per problem; the rest are counted. */
const LISTED_KEYS = 8;
const listKeys = (keys: readonly string[]) => `${keys.slice(0, LISTED_KEYS).join(', ')}${keys.length > LISTED_KEYS ? ` and ${keys.length - LISTED_KEYS} more` : ''}`;

/**
 * Matches every layer of every adapter to a weight of the export's maps; its tensors are read when the weight is
 * merged (mergeDelta). `scales` per adapter name. Problems (keys of no known form, unsupported variants, modules the
 * model does not have, shapes that do not fit) are collected for all adapters at once.
 */
export function resolveAdapters(
  adapters: ReadonlyArray<{ parsed: ParsedAdapter; st: SafeTensors; scale: number }>,
  maps: ReadonlyMap<LoraComponent, LoraMap>,
  /** The UNet config's layers_per_block, for SDXL kohya files (sgmCandidates); without it their names match nothing. */
  unetLayersPerBlock?: number,
  /** The LoRA-patchable components the model has, when known: a layer for another one is named as such. */
  present?: ReadonlySet<LoraComponent>,
): Resolution {
  const updates = new Map<string, WeightUpdate>();
  const problems: string[] = [];
  const kohyaIndex = new Map<LoraComponent, Map<string, string>>();
  const kohyaName = (c: LoraComponent, m: string) => {
    let idx = kohyaIndex.get(c);
    if (!idx) {
      idx = new Map();
      for (const p of Object.keys(maps.get(c)?.weights ?? {})) if (p.endsWith('.weight')) idx.set(p.slice(0, -7).replaceAll('.', '_'), p.slice(0, -7));
      for (const p of maps.get(c)?.unmapped ?? []) if (p.endsWith('.weight')) idx.set(p.slice(0, -7).replaceAll('.', '_'), p.slice(0, -7));
      kohyaIndex.set(c, idx);
    }
    return idx.get(m);
  };
  for (const { parsed, st, scale } of adapters) {
    const who = `adapter "${parsed.name}"`;
    if (parsed.unknownKeys.length > 0) problems.push(`${who} has keys of no known LoRA form (diffusers/PEFT or kohya): ${listKeys(parsed.unknownKeys)}`);
    if (parsed.unsupportedKeys.length > 0) problems.push(`${who} uses LoRA variants this runtime does not merge (DoRA, LoHa, LoKr, CP-decomposed LoCon): ${listKeys(parsed.unsupportedKeys)}`);
    if (parsed.layers.length === 0 && parsed.unknownKeys.length === 0) problems.push(`${who} holds no LoRA weights`);
    problems.push(...parsed.problems);
    const nothing: string[] = [];
    const noMap: string[] = [];
    const notPatchable: string[] = [];
    const broken: string[] = [];
    const misfit: string[] = [];
    const absent = new Set<LoraComponent>();
    for (const l of parsed.layers) {
      const map = maps.get(l.component);
      if (!l.down || !l.up) {
        broken.push(`${l.key} (${l.down ? 'no up/lora_B' : 'no down/lora_A'} weight)`);
        continue;
      }
      if (!map) {
        if (present && !present.has(l.component)) absent.add(l.component);
        else noMap.push(l.key);
        continue;
      }
      // transformers 5 dropped CLIP's `text_model.` level from module names: files and exports of either age meet.
      const names =
        l.component !== 'unet' ? [l.module, l.module.replace(/^text_model[._]/, ''), `text_model${l.kohya ? '_' : '.'}${l.module}`]
        : l.kohya && unetLayersPerBlock !== undefined ? [l.module, ...sgmCandidates(l.module, unetLayersPerBlock)]
        : [l.module];
      let param: string | undefined;
      for (const n of names) {
        const module = l.kohya ? kohyaName(l.component, n) : n;
        if (module !== undefined && (map.weights[`${module}.weight`] || map.unmapped?.includes(`${module}.weight`))) {
          param = `${module}.weight`;
          break;
        }
      }
      const entry = param === undefined ? undefined : map.weights[param];
      if (!entry) {
        if (param !== undefined && map.unmapped?.includes(param)) notPatchable.push(l.key);
        else nothing.push(l.key);
        continue;
      }
      checkFloats(l.down, who);
      checkFloats(l.up, who);
      const rank = l.down.shape[0] ?? 0;
      const out = entry.shape[0]!;
      const inner = numel(entry.shape) / out;
      const upOk = l.up.shape.length >= 2 && l.up.shape[0] === out && l.up.shape[1] === rank && numel(l.up.shape) === out * rank;
      const downOk = rank > 0 && numel(l.down.shape) === rank * inner;
      if (!upOk || !downOk) {
        misfit.push(`${l.key} (down [${l.down.shape}] and up [${l.up.shape}] do not fit the weight [${entry.shape}])`);
        continue;
      }
      const alpha = l.alpha ?? rank;
      const factor = (scale * alpha) / (l.rsLora ? Math.sqrt(rank) : rank);
      const id = `${l.component}:${param}`;
      let u = updates.get(id);
      if (!u) updates.set(id, (u = { component: l.component, param: param!, entry, terms: [] }));
      u.terms.push({ adapter: parsed.name, factor, st, up: l.up, down: l.down, rank });
    }
    if (nothing.length > 0) problems.push(`${who} has keys that match nothing in this model: ${listKeys(nothing)}`);
    if (notPatchable.length > 0) problems.push(`${who} targets weights this export cannot patch (folded by its optimizer; see docs/LORA.md): ${listKeys(notPatchable)}`);
    if (noMap.length > 0) problems.push(`${who} targets components whose export has no ${'lora_map.json'} (re-export with scripts/export_sd.py): ${listKeys(noMap)}`);
    if (broken.length > 0) problems.push(`${who} has malformed layers: ${listKeys(broken)}`);
    // A LoRA trained on another base model (an SDXL one on SD 1.x): components this model lacks, and shapes that differ.
    if (absent.size > 0) problems.push(`${who} targets ${[...absent].join(', ')}, which this model does not have: a LoRA made for another base model (SDXL's on SD 1.x or 2.x?)`);
    if (misfit.length > 0) problems.push(`${who} has layers whose shapes do not fit this model's weights (a LoRA made for another base model?): ${listKeys(misfit)}`);
  }
  return { updates, problems };
}

/**
 * The update of one weight in the torch element order: Σ_adapters factor · Σ_r up[o, r] · down[r, i], in float64
 * (adapters in the order given, r ascending), to be added to the weight and rounded once. Reads the layers' tensors
 * from their files (open until the set is merged), one term at a time.
 */
export function mergeDelta(u: WeightUpdate): Float64Array {
  const out = u.entry.shape[0]!;
  const inner = numel(u.entry.shape) / out;
  const acc = new Float64Array(out * inner);
  // One output row at a time: s[i] = Σ_r up[o, r] · down[r, i], r ascending, over contiguous rows of down (the same
  // sums as a dot product per element, in the same order, at memory speed), then acc += factor · s.
  const s = new Float64Array(inner);
  for (const t of u.terms) {
    const { rank, factor } = t;
    const who = `adapter "${t.adapter}"`;
    const up = finite(readFloats(t.st, t.up, who), t.up, who);
    const down = finite(readFloats(t.st, t.down, who), t.down, who);
    for (let o = 0; o < out; o++) {
      s.fill(0);
      for (let r = 0; r < rank; r++) {
        const a = up[o * rank + r]!;
        const row = r * inner;
        for (let i = 0; i < inner; i++) s[i] += a * down[row + i]!;
      }
      const base = o * inner;
      for (let i = 0; i < inner; i++) acc[base + i] += factor * s[i]!;
    }
  }
  return acc;
}

/**
 * Refuses a tensor holding NaN or ±Infinity: merged, it would make every weight of the layer NaN and every image of the
 * set black (diffusers' `fuse_lora(safe_fusing=True)` refuses NaN weights too).
 */
function finite(v: Float64Array, t: StTensor, who: string): Float64Array {
  for (let i = 0; i < v.length; i++) {
    if (!Number.isFinite(v[i])) throw new RuntimeError('INVALID_INPUT', `${who}: tensor ${JSON.stringify(t.name)} holds ${v[i]} (element ${i} of ${v.length}); LoRA weights must be finite numbers`);
  }
  return v;
}
