/**
 * Hostile input that costs the server more than its size: each case is the worst input found for one parser or limit
 * (docs/FAULTS.md, "Hostile input"), and asserts the bound holds. Complexity checks use inputs for which the unbounded
 * code takes seconds to minutes and the bounded code milliseconds, so their time limits are orders of magnitude away
 * from either.
 */
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import type { ModelDefaults } from '../src/pipeline/job.js';
import { pipelineClassDefaults } from '../src/pipeline/pipeline.js';
import { basicClean } from '../src/pipeline/tokenizer.js';
import { MAX_LISTED_PROBLEMS, parseInstances, pushUnknownField } from '../src/runtime/request.js';

/**
 * Milliseconds of CPU (user and system, this process) `f` takes: not the wall clock, which a loaded machine stretches
 * (the 20 MB key's 0.8 s became 2.1 s once, beside a full run), while the unbounded code's seconds are CPU.
 */
const timed = (f: () => void): number => {
  const t = process.cpuUsage();
  f();
  const d = process.cpuUsage(t);
  return (d.user + d.system) / 1000;
};

describe('CLIP text cleaning is linear in the prompt', () => {
  it('strips as Python does: the whitespace of `regex`, plus U+001C..U+001F', () => {
    // U+0085 is a C1 control, which ftfy reads as windows-1252's '…' before it would break a line.
    expect(basicClean('\x1c\u3000 A\u0085b \x1f')).toBe('a…b');
    expect(basicClean('\x1c\x1d\x1e\x1f')).toBe('');
    // Inside a word ftfy's remove_control_chars drops it (clip-fuzz.json's "mid\x1cdle").
    expect(basicClean('a\x1cb')).toBe('ab');
  });

  it("ftfy's HTML step, one level of `&amp;amp;…` per pass until nothing changes, stays cheap per pass", () => {
    // ~2,500 passes over 10,000 characters (the prompt cap), as in ftfy: with every step of a pass rebuilding the text
    // character by character they took ~2.8 s here; regex replaces that find nothing, and no NFC pass over plain
    // ASCII, take 30-100 ms.
    for (const text of [`&${'amp;'.repeat(2499)}`, `&${'amp;'.repeat(2497)}lt;\x81`]) {
      const ms = timed(() => expect(basicClean(text)).toBe(text.endsWith('\x81') ? '<\x81' : '&'));
      expect(ms, text.slice(-8)).toBeLessThan(1_000);
    }
  });

  it('a long whitespace run inside a prompt costs no more than one at its end', () => {
    // `[\s…]+$` tried from every position of the run: 150,000 characters took ~45 s; a scan takes milliseconds.
    const n = 150_000;
    for (const ws of ['\x1c', '\u3000', '\t']) {
      const inside = `x${ws.repeat(n)}x`;
      const ms = timed(() => expect(basicClean(inside).length).toBeGreaterThan(1));
      expect(ms, `a run of ${n} ${JSON.stringify(ws)}`).toBeLessThan(2_000);
    }
  });
});

const SD: ModelDefaults = { ...pipelineClassDefaults('StableDiffusionPipeline', false), height: 512, width: 512, scheduler: 'PNDMScheduler' };

describe('output_uri never names what the server loads', () => {
  const parse = (env: Record<string, string>, uri: string) =>
    parseInstances([{ prompt: 'p', output_uri: uri }], { cfg: loadConfig(env), defaults: SD, randomSeed: () => 7 });
  const served = { STORAGE_URI: 's3://models/sd15', LORA_URI: 's3://shared/loras/' };

  it('refuses an object under the model (STORAGE_URI) or the adapters (LORA_URI), however the key is spelled', () => {
    // Written with the server's own credentials, these would replace a model file (the next boot downloads an image as
    // the UNet) or put a key in the listing that fails every later boot (`sd15//x`, `sd15/./x`).
    for (const uri of ['s3://models/sd15/unet/model.onnx', 's3://models/sd15//x.png', 's3://models/sd15/./x.png', 's3://MODELS/sd15/model_index.json']) {
      expect(() => parse(served, uri), uri).toThrow(`instances[0].output_uri ${JSON.stringify(uri)} lies under the model (STORAGE_URI) this server loads; write images elsewhere`);
    }
    expect(() => parse(served, 's3://shared/loras/style/pytorch_lora_weights.safetensors')).toThrow(/lies under the LoRA adapters \(LORA_URI\)/);
    // As a store that decodes keys, or ignores their case, would read them.
    for (const uri of ['s3://models/%73d15/unet/model.onnx', 's3://models/%2573d15/x.png', 's3://models/SD15/x.png']) {
      expect(() => parse(served, uri), uri).toThrow(/lies under the model \(STORAGE_URI\)/);
    }
    // A store that resolves dot segments (s3rver does) would write these into the model: refused, as inputs' keys are.
    for (const uri of ['s3://models/out/../sd15/model_index.json', 's3://models/out/%2e%2e/sd15/unet/model.onnx', 's3://models/out//x.png', 's3://models/out/']) {
      expect(() => parse(served, uri), uri).toThrow(/^instances\[0\]\.output_uri: the key has an empty, '\.' or '\.\.' path segment( once percent-decoded)?; name the object by its plain key$/);
    }
    expect(() => parse(served, 's3://outputs/a\\b.png')).toThrow('instances[0].output_uri: the key has a backslash; name the object by its plain key');
    // A whole bucket as the model: every key of it.
    expect(() => parse({ STORAGE_URI: 's3://models' }, 's3://models/out.png')).toThrow(/lies under the model \(STORAGE_URI\)/);
  });

  it('accepts everything beside them', () => {
    for (const uri of ['s3://models/sd15.png', 's3://models/sd15-out/x.png', 's3://outputs/sd15/x.png', 's3://shared/loras.png', 's3://shared/out/x.png']) {
      expect(parse(served, uri)[0]!.output.uri, uri).toBe(uri);
    }
    expect(parse({ STORAGE_URI: '/mnt/models' }, 's3://models/x.png')[0]!.output.uri).toBe('s3://models/x.png');
  });
});

describe('OUTPUT_URI_PREFIXES', () => {
  const parse = (env: Record<string, string>, uri: string) =>
    parseInstances([{ prompt: 'p', output_uri: uri }], { cfg: loadConfig(env), defaults: SD, randomSeed: () => 7 });
  // The multi-model layout: every model under one bucket and folder, read with one Secret.
  const shared = { STORAGE_URI: 's3://models/team/sd15' };

  it('set, keeps output_uri under its prefixes: another model in the shared bucket is out of reach (it was written with this server\'s credentials)', () => {
    const env = { ...shared, OUTPUT_URI_PREFIXES: 's3://outputs/sd15/,s3://models/team/images' };
    for (const uri of ['s3://models/team/sdxl/unet/model.onnx', 's3://outputs/sd15-other/x.png', 's3://outputs-evil/sd15/x.png', 's3://models/team/images-old/x.png']) {
      expect(() => parse(env, uri), uri).toThrow(`instances[0].output_uri ${JSON.stringify(uri)} is not under a prefix this server writes images to `
        + '(OUTPUT_URI_PREFIXES: s3://outputs/sd15/, s3://models/team/images)');
    }
    for (const uri of ['s3://outputs/sd15/x.png', 's3://models/team/images/a/b.webp']) expect(parse(env, uri)[0]!.output.uri, uri).toBe(uri);
    // Still never under what the server loads, nor with an unsafe key.
    expect(() => parse({ ...env, OUTPUT_URI_PREFIXES: 's3://models/team/' }, 's3://models/team/sd15/model_index.json')).toThrow(/lies under the model \(STORAGE_URI\)/);
    expect(() => parse(env, 's3://outputs/sd15/../x.png')).toThrow(/the key has an empty, '\.' or '\.\.' path segment/);
  });

  it('checks the keys several images are written to, beside the one given: an entry without its \'/\' keeps them in too', () => {
    const env = { ...shared, OUTPUT_URI_PREFIXES: 's3://models/team/images' };
    const two = (uri: string) => parseInstances([{ prompt: 'p', output_uri: uri, num_images_per_prompt: 2 }], { cfg: loadConfig(env), defaults: SD, randomSeed: () => 7 });
    // One image is written to the key itself; two would go to team/images-0.png and team/images-1.png.
    expect(parse(env, 's3://models/team/images')[0]!.output.uri).toBe('s3://models/team/images');
    expect(() => two('s3://models/team/images')).toThrow('instances[0].output_uri "s3://models/team/images" (with 2 images it writes s3://models/team/images-0.png and the like) '
      + 'is not under a prefix this server writes images to (OUTPUT_URI_PREFIXES: s3://models/team/images)');
    expect(two('s3://models/team/images/fox.png')[0]!.output.uri).toBe('s3://models/team/images/fox.png');
  });

  it('unset, leaves output_uri as it was: anywhere but what the server loads; a bad entry is named at start', () => {
    expect(parse(shared, 's3://models/team/sdxl-images/x.png')[0]!.output.uri).toBe('s3://models/team/sdxl-images/x.png');
    expect(() => loadConfig({ OUTPUT_URI_PREFIXES: 's3://outputs/a/../b,https://x/y' })).toThrow(/OUTPUT_URI_PREFIXES entry "s3:\/\/outputs\/a\/\.\.\/b" has an empty, '\.' or '\.\.' path segment/);
  });
});

describe('unknown fields cost no more than the problems an error shows', () => {
  const parse = (inst: Record<string, unknown>) => parseInstances([{ prompt: 'p', ...inst }], { cfg: loadConfig({}), defaults: SD, randomSeed: () => 7 });

  it('suggests a spelling for the problems listed, and adds a plain line past them', () => {
    const bad: string[] = [];
    for (let i = 0; i < MAX_LISTED_PROBLEMS + 2; i++) pushUnknownField(bad, 'instances[0].', i < MAX_LISTED_PROBLEMS ? 'promt' : `x${'y'.repeat(60)}`, ['prompt', 'seed']);
    expect(bad[0]).toBe('instances[0].promt is not a known field; did you mean "prompt"?');
    expect(bad.at(-1)).toBe(`instances[0].${JSON.stringify(`x${'y'.repeat(39)}`)} is not a known field`);
    // 70,000 of them (a 1 MB body) still list the first ones with suggestions.
    const many = Object.fromEntries(Array.from({ length: 70_000 }, (_, i) => [`promt${i}`, 1]));
    expect(() => parse(many)).toThrow(/^instances\[0\]\.promt0 is not a known field; did you mean "prompt"\?; .* and 69980 more problems$/);
  });

  it('a key far longer than any field is not compared letter by letter', () => {
    // The edit distance of a 20 MB key to each of the ~20 fields took ~15 s; the length difference rules it out.
    const ms = timed(() => expect(() => parse({ ['k'.repeat(20_000_000)]: 1 })).toThrow(/is not a known field; known fields: prompt/));
    expect(ms).toBeLessThan(2_000);
    expect(() => parse({ negative_promtp: 1 })).toThrow('instances[0].negative_promtp is not a known field; did you mean "negative_prompt"?');
  });
});
