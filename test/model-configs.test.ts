/**
 * Config files as real repositories ship them (test/fixtures/model-configs, each file's source in its README), read
 * the way a boot reads them, and compared with what diffusers and transformers make of the same files.
 */
import { copyFileSync, cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { referenceDir } from '../scripts/reference.js';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';

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
