/** @module The embedded demo model: built once per cache dir and format version, shared safely between processes. */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { exists } from '../files.js';
import { buildDemoModel, resolveDemoOptions } from './build.js';

export { buildDemoModel, resolveDemoOptions, demoAssetsDir, DEMO_FAMILIES } from './build.js';
export type { DemoOptions, DemoManifest, DemoFile, DemoFamily, ResolvedDemoOptions, TimestepInput } from './build.js';

/** Bump whenever a graph, config or asset of the demo changes, so old cached builds are not reused. */
export const DEMO_FORMAT_VERSION = 2;

/** The demo served without a model: with its VAE encoder, so image-to-image and inpainting (latent blend) work too. */
export const SERVED_DEMO_OPTIONS = Object.freeze({ withVaeEncoder: true });

/** Temp build folders older than this are left-overs of a crashed process. */
const STALE_TEMP_MS = 60 * 60 * 1000;

export interface DemoLog {
  info(o: object, msg?: string): void;
}

/** `demo-<hash>`: the hash covers the format version and the (default) options the demo is built with. */
export function demoDirName(): string {
  const key = JSON.stringify({ v: DEMO_FORMAT_VERSION, options: resolveDemoOptions(SERVED_DEMO_OPTIONS) });
  return `demo-${createHash('sha256').update(key).digest('hex').slice(0, 12)}`;
}

/**
 * Returns `<cacheDir>/demo-<hash>/`, building the served demo (sd15, with vae_encoder) there first if needed. The build goes to a
 * temporary sibling that is renamed into place, so the final folder is complete whenever it exists; when two
 * callers race, the loser's rename fails, it drops its copy and uses the winner's.
 */
export async function ensureDemoModel(cacheDir: string, log?: DemoLog): Promise<string> {
  const root = path.resolve(cacheDir);
  const name = demoDirName();
  const final = path.join(root, name);
  if (await exists(path.join(final, 'model_index.json'))) return final;

  await mkdir(root, { recursive: true });
  await sweepStaleTemps(root, name);
  const tmp = path.join(root, `.${name}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const started = Date.now();
  try {
    // Made alone, not by the build's recursive mkdir, which reports a read-only volume as ENOENT (nodejs/node#47098).
    await mkdir(tmp);
    const manifest = await buildDemoModel(tmp, SERVED_DEMO_OPTIONS);
    try {
      await rename(tmp, final);
      log?.info({ dir: final, bytes: manifest.totalBytes, ms: Date.now() - started }, 'built the embedded demo model');
    } catch (err) {
      // Another process finished first (rename onto a non-empty folder fails): theirs is as good as ours.
      if (!(await exists(path.join(final, 'model_index.json')))) throw err;
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return final;
}

async function sweepStaleTemps(root: string, name: string): Promise<void> {
  const prefix = `.${name}.tmp-`;
  for (const entry of await readdir(root)) {
    if (!entry.startsWith(prefix)) continue;
    const p = path.join(root, entry);
    try {
      if (Date.now() - (await stat(p)).mtimeMs > STALE_TEMP_MS) await rm(p, { recursive: true, force: true });
    } catch {
      // Gone already (another process swept it).
    }
  }
}
