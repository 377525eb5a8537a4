/**
 * @module What a whole component folder lets start: its ONNX session in the pipeline workers (`<comp>/model.onnx`),
 * or its tokenizer's parse on the main thread (`tokenizer`, `tokenizer_2`: vocab.json). Light on purpose: `main` uses
 * it before the runtime is imported.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import { isTokenizerFolder } from '../pipeline/model.js';

export type Announcement = { t: 'component'; component: string; path: string } | { t: 'tokenizer'; dir: string };

export function announcement(compDir: string): Announcement | undefined {
  const comp = path.basename(compDir);
  const onnx = path.join(compDir, 'model.onnx');
  if (existsSync(onnx)) return { t: 'component', component: comp, path: onnx };
  if (isTokenizerFolder(comp) && existsSync(path.join(compDir, 'vocab.json'))) return { t: 'tokenizer', dir: compDir };
  return undefined;
}

/** Every component folder of a whole model directory, given its relative file paths. */
export function componentDirs(dir: string, files: readonly string[]): string[] {
  return [...new Set(files.filter((f) => f.includes('/')).map((f) => f.split('/')[0]!))].sort().map((c) => path.join(dir, c));
}
