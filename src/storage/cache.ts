/**
 * @module The PVC cache entry on disk: the manifest that commits it, the progress journal that lets a
 * killed download resume, durable writes (tmp + fsync + rename + dir fsync), and the sweep of stale temps.
 *
 *   <cacheDir>/<key>.lock            lock file (see lock.ts), outside the entry so a sweep never touches it
 *   <cacheDir>/<key>/.complete.json  manifest, written LAST: its presence is the commit
 *   <cacheDir>/<key>/.complete.held.json  the manifest set aside while a refresh reads the entry's leases (uncommit)
 *   <cacheDir>/<key>/.progress.jsonl journal of a download in progress (journal.ts: spans on disk, files complete)
 *   <cacheDir>/<key>/<rel>.partial   a file being downloaded (preallocated, positional writes)
 *   <cacheDir>/<key>/<rel>           a whole file, renamed into place
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { exists } from '../files.js';

export const MANIFEST = '.complete.json';
export const JOURNAL = '.progress.jsonl';
/** The manifest set aside by uncommit: the entry's files are still those it lists until dropCommit. */
export const HELD = '.complete.held.json';
export const PARTIAL = '.partial';
/** The cache's own files in an entry, never the model's: what `warmup push` of an entry leaves behind. */
export const BOOKKEEPING: readonly string[] = Object.freeze([MANIFEST, JOURNAL, HELD]);
/** A folder holding one of these at its root is a cache entry this runtime filled (committed, or being filled). */
export const ENTRY_MARKERS: readonly string[] = Object.freeze([MANIFEST, JOURNAL]);
/** The folder, under the cache, of the servers' LoRA adapter-set work folders (one per process, which leases it). */
export const LORA_SETS = '.lora-sets';

export interface ManifestFile {
  readonly path: string;
  readonly size: number;
  readonly etag: string;
}

export interface Manifest {
  readonly version: 1;
  readonly uri: string;
  readonly files: readonly ManifestFile[];
  readonly bytes: number;
  readonly completedAt: string;
}

/** fsync a directory so a rename or unlink inside it survives a crash. Some filesystems refuse: that is not fatal. */
export async function fsyncDir(dir: string): Promise<void> {
  let fh;
  try {
    fh = await fsp.open(dir, 'r');
    await fh.sync();
  } catch {
    /* EISDIR/EINVAL/EPERM on some network filesystems */
  } finally {
    await fh?.close().catch(() => undefined);
  }
}

/**
 * `mkdir -p` that reports the real refusal: Node's recursive mkdir turns the EROFS or ENOSPC of a folder it could not
 * make into ENOENT (nodejs/node#47098, #42808), so a read-only or full volume would read as a missing path.
 */
export async function mkdirs(dir: string): Promise<void> {
  try {
    await fsp.mkdir(dir, { recursive: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    // One level at a time from the root: the first folder that cannot be made says why.
    const segs = path.resolve(dir).split(path.sep);
    for (let i = 2; i <= segs.length; i++) {
      await fsp.mkdir(segs.slice(0, i).join(path.sep)).catch((x: NodeJS.ErrnoException) => {
        if (x.code !== 'EEXIST') throw x;
      });
    }
  }
}

/** Writes a small file durably: tmp in the same directory, fsync, rename, fsync the directory. */
export async function writeFileDurable(file: string, data: string): Promise<void> {
  const tmp = `${file}.tmp.${process.pid}`;
  const fh = await fsp.open(tmp, 'w');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => undefined);
    await fsp.unlink(tmp).catch(() => undefined);
    throw e;
  }
  await fh.close();
  await fsp.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

async function readJson<T>(file: string): Promise<T | undefined> {
  try {
    return JSON.parse(await fsp.readFile(file, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

export async function readManifest(entry: string): Promise<Manifest | undefined> {
  const m = await readJson<Manifest>(path.join(entry, MANIFEST));
  if (m?.version !== 1 || !Array.isArray(m.files)) return undefined;
  return m;
}

/** True when every file of the manifest is on disk with its size (a cheap stat, no hashing), reached through no link. */
export async function manifestFilesPresent(entry: string, m: Manifest): Promise<boolean> {
  const folders = new Map<string, Promise<boolean>>();
  const checks = await Promise.all(m.files.map(async (f) => (await entrySize(entry, f.path, folders)) === f.size));
  return checks.every(Boolean);
}

/**
 * The size of the regular file an object key names in `entry`, or -1: missing, not a file, or reached through a
 * symbolic link (a link made on the volume into the entry, as to a shared copy of the weights elsewhere). An entry
 * holds only what the cache wrote: a key's path that crosses a link would read, and a download write, outside it, so
 * such a file counts as absent, and the fill's sweep takes the link away (the file it leads to stays as it is).
 */
export async function entrySize(entry: string, rel: string, folders = new Map<string, Promise<boolean>>()): Promise<number> {
  const segs = rel.split('/');
  const name = segs.pop()!;
  // Each folder on the way is a real one: looked at once for all the keys under it (`folders`, shared by a caller
  // that checks many), so a hit of thousands of files costs about one lstat each, as the stat before links did.
  let p = entry;
  for (const seg of segs) {
    p = path.join(p, seg);
    let real = folders.get(p);
    if (real === undefined) folders.set(p, (real = fsp.lstat(p).then((st) => st.isDirectory(), () => false)));
    if (!(await real)) return -1;
  }
  return fsp.lstat(path.join(p, name)).then((st) => (st.isFile() ? st.size : -1), () => -1);
}

/** Whether a segment of `rel` under `entry` (down to the first that is missing) is a symbolic link. */
export async function throughLink(entry: string, rel: string): Promise<boolean> {
  let p = entry;
  for (const seg of rel.split('/')) {
    p = path.join(p, seg);
    const st = await fsp.lstat(p).catch(() => undefined);
    if (st === undefined) return false;
    if (st.isSymbolicLink()) return true;
  }
  return false;
}

export async function writeManifest(entry: string, m: Manifest): Promise<void> {
  await writeFileDurable(path.join(entry, MANIFEST), JSON.stringify(m, null, 1));
}

/**
 * Takes the commit marker off (first step of any rewrite of an entry), durably, by setting it aside under HELD: until
 * dropCommit, nothing in the entry was written, and recommit puts it back. A process killed in between leaves it
 * there for the next holder of the entry's lock to put back.
 */
export async function uncommit(entry: string): Promise<void> {
  await fsp.rename(path.join(entry, MANIFEST), path.join(entry, HELD)).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
  await fsyncDir(entry);
}

/** Puts back a commit uncommit set aside, durably; whether there was one. A commit made since wins. */
export async function recommit(entry: string): Promise<boolean> {
  const held = path.join(entry, HELD);
  if (!(await exists(held))) return false;
  if (await exists(path.join(entry, MANIFEST))) await fsp.unlink(held);
  else await fsp.rename(held, path.join(entry, MANIFEST));
  await fsyncDir(entry);
  return true;
}

/** Drops the commit uncommit set aside, durably: before the first write into the entry. */
export async function dropCommit(entry: string): Promise<void> {
  await fsp.unlink(path.join(entry, HELD)).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
  await fsyncDir(entry);
}

/** The errnos of a link that leads nowhere linkedFiles can follow. */
const DANGLING: readonly string[] = ['ENOENT', 'ENOTDIR', 'ELOOP', 'ENAMETOOLONG', 'EACCES', 'EPERM'];

/**
 * Every file under `dir`, '/'-separated and sorted, a symlink counted as what it points at (a Hugging Face cache
 * snapshot is all symlinks into blobs/): a folder linked under two names is listed under both (a reader takes each
 * name), a link to a folder that holds it is skipped (a loop), and a link that points nowhere goes to `dangling`
 * (which may throw). For a model folder served or pushed as it is; walk() is the cache entry's own, which has no links.
 */
export async function linkedFiles(dir: string, dangling: (rel: string) => void): Promise<string[]> {
  const out: string[] = [];
  // Only the folders above: a folder seen elsewhere before (`text_encoder_2 -> text_encoder`) is no loop.
  const go = async (d: string, rel: string, above: ReadonlySet<string>): Promise<void> => {
    const real = await fsp.realpath(d);
    if (above.has(real)) return;
    const chain = new Set(above).add(real);
    for (const e of await fsp.readdir(d, { withFileTypes: true })) {
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      const abs = path.join(d, e.name);
      // A link that leads nowhere (or where this uid may not look) is left out; the volume's own error (EIO) is not that.
      const st = e.isSymbolicLink() ? await fsp.stat(abs).catch((err: NodeJS.ErrnoException) => {
        if (typeof err?.code === 'string' && !DANGLING.includes(err.code)) throw err;
        return undefined;
      }) : e;
      if (st === undefined) dangling(r);
      else if (st.isDirectory()) await go(abs, r, chain);
      else if (st.isFile()) out.push(r);
    }
  };
  await go(dir, '', new Set());
  return out.sort();
}

/** Every regular file under dir, as '/'-separated paths relative to it. */
export async function walk(dir: string, onLink?: (rel: string) => void): Promise<string[]> {
  const out: string[] = [];
  const go = async (d: string, rel: string): Promise<void> => {
    let ents;
    try {
      ents = await fsp.readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of ents) {
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      if (e.isDirectory()) await go(path.join(d, e.name), r);
      else if (e.isFile()) out.push(r);
      else if (e.isSymbolicLink()) onLink?.(r);
    }
  };
  await go(dir, '');
  return out.sort();
}

/**
 * Deletes what no download in progress can use (call it only while holding the lock): temps of small
 * files, `*.partial` files the journal cannot resume, files that are not part of the wanted set, and symbolic links
 * (entrySize).
 */
export async function sweep(entry: string, keep: ReadonlySet<string>): Promise<string[]> {
  const removed: string[] = [];
  const dirs = new Set<string>();
  const unlink = async (rel: string) => {
    await fsp.unlink(path.join(entry, rel)).catch(() => undefined);
    removed.push(rel);
    dirs.add(path.dirname(path.join(entry, rel)));
  };
  const links: string[] = [];
  const files = await walk(entry, (rel) => links.push(rel));
  // Links first: unlink takes the link, never what it leads to (walk() does not follow one).
  for (const rel of links) await unlink(rel);
  for (const rel of files) {
    if (rel === MANIFEST || rel === JOURNAL || keep.has(rel)) continue;
    await unlink(rel);
  }
  // Durable before the caller records anything new about these names.
  for (const d of dirs) await fsyncDir(d);
  return removed;
}

/** Bytes as megabytes with one decimal, as the cache's messages and logs print sizes. */
export const mb = (n: number): string => (n / 1e6).toFixed(1);
