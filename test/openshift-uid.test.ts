/**
 * The image as OpenShift's restricted SCC runs it: an arbitrary uid in group 0, no passwd entry, no HOME, and the cache
 * PVC writable through the group only (a setgid folder of group 0, as fsGroup gives one). The warm-up Job and each
 * serving pod may run as different uids of that group. Real processes under `setpriv` (the built warm-up CLI and
 * server, s3rver on loopback); they need root to change uid, so the suite is skipped elsewhere.
 */
import { execFile, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, copyFileSync, linkSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readlinkSync, realpathSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel } from '../src/demo/index.js';
import { CREDS, destroyS3, putFolder, startS3, type S3Server } from './helpers/s3.js';
import { postJson, ROOT, startServer, type ServerHandle } from './helpers/server.js';

const JOB_UID = 1000680000;
const POD_UIDS = [1000690000, 1000700000];
const BUCKET = 'models';
const PREFIX = 'demo/';
const asUid = (uid: number) => ['setpriv', `--reuid=${uid}`, '--regid=0', '--clear-groups'];

/** Root, with setpriv. */
const canSwitch = process.platform === 'linux' && process.getuid?.() === 0
  && spawnSync('setpriv', [...asUid(JOB_UID).slice(1), process.execPath, '-e', ''], { stdio: 'ignore' }).status === 0;

let s3: S3Server;
let base: string;
/** The built warm-up CLI and server as the other uids run them: copies under `base` (codeForOtherUids). */
let warmupCli: string;
let entry: string;
const live: ServerHandle[] = [];

/**
 * The built code (dist/, package.json, node_modules) under `dir`, where the other uids can reach it: a checkout under a
 * private folder cannot be (a clone made under `mktemp -d`, mode 700, as CI makes one), and the suite was skipped
 * there. Hard links, so node_modules costs no copy, and each file keeps its mode; a copy where `dir` is on another
 * filesystem. A symlink keeps its target (node_modules/.bin's point inside it).
 */
function codeForOtherUids(dir: string): { warmupCli: string; entry: string } {
  const place = (from: string, to: string): void => {
    const st = lstatSync(from);
    if (st.isDirectory()) {
      mkdirSync(to, { mode: 0o755 });
      for (const name of readdirSync(from)) place(path.join(from, name), path.join(to, name));
    } else if (st.isSymbolicLink()) symlinkSync(readlinkSync(from), to);
    else {
      try {
        linkSync(from, to);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EXDEV') throw e;
        copyFileSync(from, to);
      }
    }
  };
  mkdirSync(dir, { mode: 0o755 });
  // node_modules may itself be a link (a worktree sharing another's): its files are what the processes load.
  for (const name of ['dist', 'package.json', 'node_modules']) place(realpathSync(path.join(ROOT, name)), path.join(dir, name));
  return { warmupCli: path.join(dir, 'dist', 'warmup', 'main.js'), entry: path.join(dir, 'dist', 'src', 'main.js') };
}

/** The warm-up CLI as `uid`, with PATH and `env` alone: no HOME, as a uid without a passwd entry has none. */
async function warmupAs(uid: number, env: Record<string, string>): Promise<{ code: number; stderr: string; stdout: string }> {
  const [cmd, ...args] = [...asUid(uid), process.execPath, warmupCli];
  return promisify(execFile)(cmd!, args, { env: { PATH: process.env.PATH ?? '', ...env }, cwd: base }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }));
}

const s3Env = (cache: string) => ({ ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, MODEL_CACHE_DIR: cache });

/** A folder like a PVC mounted with the group's write: root's, group 0, setgid, rwxrwsr-x. */
function groupVolume(name: string): string {
  const dir = path.join(base, name);
  mkdirSync(dir);
  chmodSync(dir, 0o2775);
  return dir;
}

/** Every folder and file under `dir` whose group may not do what its owner may, with its mode. */
function notShared(dir: string): string[] {
  return (readdirSync(dir, { recursive: true }) as string[]).flatMap((rel) => {
    const mode = lstatSync(path.join(dir, rel)).mode;
    return ((mode >> 3) & 0o7) === ((mode >> 6) & 0o7) ? [] : [`${rel} ${(mode & 0o7777).toString(8)}`];
  });
}

beforeAll(async () => {
  if (!canSwitch) return;
  // Traversable by the other uids (a mkdtemp folder is 0700).
  base = mkdtempSync(path.join(os.tmpdir(), 'dr-uid-'));
  chmodSync(base, 0o755);
  ({ warmupCli, entry } = codeForOtherUids(path.join(base, 'code')));
  // What the suite used to skip on: fails here instead, should a uid still not reach the code.
  for (const file of [warmupCli, entry]) {
    const r = spawnSync('setpriv', [...asUid(JOB_UID).slice(1), process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(file)}, require('fs').constants.R_OK)`], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`uid ${JOB_UID} cannot read ${file}: ${r.stderr}`);
  }
  const model = await buildDemoModel(path.join(base, 'model'));
  s3 = await startS3([BUCKET]);
  await putFolder(s3, BUCKET, PREFIX, model.dir, model.files.map((f) => f.path));
}, 60_000);

afterAll(async () => {
  for (const s of live.splice(0)) await s.stop('SIGKILL');
  if (s3) await destroyS3(s3);
  if (base) rmSync(base, { recursive: true, force: true });
});

describe.skipIf(!canSwitch)('an arbitrary uid in group 0 (OpenShift restricted SCC)', () => {
  it('the Job fills the cache without HOME, sharing all it makes with the group; pods of two other uids serve from it, LoRA sets and leases included', async () => {
    const cache = groupVolume('cache');
    const job = await warmupAs(JOB_UID, s3Env(cache));
    // Before: "STORAGE_TRANSIENT: cannot list (8 attempts) s3://models/demo/: SystemError" (os.homedir() throws).
    expect([job.code, job.stderr.trim().split('\n').at(-1)]).toEqual([0, expect.stringMatching(/^warmup: done /)]);
    // Before: every folder 755 and file 644 (umask 022), closed to any other uid of the group.
    expect(notShared(cache)).toEqual([]);

    for (const uid of POD_UIDS) {
      // ORT_OPTIMIZED_CACHE=always: the copies are written whatever their timing (auto keeps one only where it loads faster).
      const srv = await startServer({ ...s3Env(cache), HOME: undefined, EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'always' }, { prefix: asUid(uid), entry });
      live.push(srv);
      await srv.waitReady();
      // The first pod writes ORT's optimized copies in the background, waited for so that they are looked at below (the
      // second loads them). ORT creates them 0644 whatever the umask: before, closed to the group.
      if (uid === POD_UIDS[0]) expect(Object.values((await srv.waitFor('optimized-cache-written', undefined, 60_000)).outcomes as object)).toContain('written');
      const res = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a red cube', num_inference_steps: 2, height: 64, width: 64, loras: ['demo-style'] }] });
      // Before, the second pod: its lease refused ("could not mark the cache entry in use") and the LoRA set a 500
      // (EACCES making its folder under .lora-sets/, which the first pod made 755).
      expect([uid, res.status, srv.logs.filter((l) => l.level === 'warn' || l.level === 'error').map((l) => l.msg)]).toEqual([uid, 200, []]);
      expect(await srv.stop()).toEqual({ code: 0, signal: null });
      live.splice(live.indexOf(srv), 1);
    }
    expect(notShared(cache)).toEqual([]);
  });

  it('a cache folder the uid may not write: one line naming MODEL_CACHE_DIR, the uid and its groups, and what to change', async () => {
    const closed = path.join(base, 'closed');
    mkdirSync(closed, { mode: 0o755 });
    const job = await warmupAs(JOB_UID, s3Env(closed));
    expect(job.code).toBe(1);
    expect(job.stderr.trim().split('\n').at(-1)).toBe(`warmup: CACHE_IO: the model cache (MODEL_CACHE_DIR) refused open: EACCES (this process is uid ${JOB_UID}, `
      + "group 0: the cache's folders must be writable by that uid or one of those groups, as a volume mounted with the pod's fsGroup is; "
      + 'folders another uid made without group write: chmod -R g+w them once)');
    const below = await warmupAs(JOB_UID, s3Env(path.join(closed, 'cache')));
    expect(below.stderr.trim().split('\n').at(-1)).toMatch(new RegExp(`^warmup: CACHE_IO: cannot create the model cache directory \\(MODEL_CACHE_DIR\\): EACCES \\(this process is uid ${JOB_UID}, group 0: `));
  });
});

describe.skipIf(!canSwitch)('a model file the serving uid may not read (written by a Job of another uid, no fsGroup)', () => {
  /** The demo model with external weights, as a local STORAGE_URI folder; `close` makes some of it the Job's, 0600. */
  async function failedAs(name: string, close: (model: string) => void): Promise<string> {
    const model = path.join(base, name);
    await buildDemoModel(model, { externalData: true });
    close(model);
    const srv = await startServer({ STORAGE_URI: model, MODEL_CACHE_DIR: groupVolume(`${name}-cache`), HOME: undefined, EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '1' },
      { prefix: asUid(POD_UIDS[0]!), entry, ready: false });
    live.push(srv);
    const end = await srv.waitFor('state', (s) => s.state === 'failed' || s.state === 'retrying', 60_000);
    expect(end.state).toBe('failed');
    return String(end.reason);
  }
  const jobs = (file: string) => {
    chownSync(file, JOB_UID, JOB_UID);
    chmodSync(file, 0o600);
  };
  const advice = "the model's files must be readable by that uid or one of those groups: set the pod's securityContext.fsGroup to the group the files belong to, "
    + 'or run the warm-up Job that wrote them with the same runAsUser (or runAsGroup) as the server; files already written without group read: chmod -R g+rX them once';

  it('its graph: fails at once naming the file, this uid and its groups, the file\'s owner and mode, and what to change', async () => {
    const reason = await failedAs('closed-graph', (m) => jobs(path.join(m, 'unet', 'model.onnx')));
    // Before: "… open failed with EACCES (the volume that holds the model failed, not its format)".
    expect(reason).toBe(`CACHE_IO: unet/model.onnx could not be read: open failed with EACCES: this process (uid ${POD_UIDS[0]}, group 0) may not read it `
      + `(the file is owned by uid ${JOB_UID}, gid ${JOB_UID}, mode 0600), a permission of the deployment that no retry fixes; ${advice}`);
  });

  it('its component folder: named by the folder\'s owner and mode, the file within it unseen', async () => {
    const reason = await failedAs('closed-folder', (m) => {
      chownSync(path.join(m, 'unet'), JOB_UID, JOB_UID);
      chmodSync(path.join(m, 'unet'), 0o700);
    });
    // Before: "MODEL_FORMAT: not an ONNX diffusers export: missing unet/model.onnx (found: …, unet, …)".
    expect(reason).toBe(`CACHE_IO: unet/model.onnx could not be read: stat failed with EACCES: this process (uid ${POD_UIDS[0]}, group 0) may not read it `
      + `(its folder is owned by uid ${JOB_UID}, gid ${JOB_UID}, mode 0700), a permission of the deployment that no retry fixes; ${advice}`);
  });

  it('its weights, reached through a Hugging Face cache\'s links: named by the link, the owner and mode of the file it leads to', async () => {
    const reason = await failedAs('closed-weights', (m) => {
      // unet/ as huggingface_hub lays a snapshot out: both files relative links into a blobs/ folder.
      const blobs = path.join(m, 'blobs');
      mkdirSync(blobs);
      for (const [file, blob] of [['model.onnx', 'g0'], ['model.onnx_data', 'w0']] as const) {
        renameSync(path.join(m, 'unet', file), path.join(blobs, blob));
        symlinkSync(`../blobs/${blob}`, path.join(m, 'unet', file));
      }
      jobs(path.join(blobs, 'w0'));
    });
    // Before: "MODEL_FORMAT: … SystemError : 13": the links were not read again, the graph was, and read whole.
    expect(reason).toBe(`CACHE_IO: unet/model.onnx_data could not be read: open failed with EACCES: this process (uid ${POD_UIDS[0]}, group 0) may not read it `
      + `(the file is owned by uid ${JOB_UID}, gid ${JOB_UID}, mode 0600), a permission of the deployment that no retry fixes; ${advice}`);
  });

  it('its weights, linked into a folder this uid may not search: the owner and mode of that folder, not of the component\'s', async () => {
    const reason = await failedAs('closed-blobs', (m) => {
      const blobs = path.join(m, 'blobs');
      mkdirSync(blobs);
      renameSync(path.join(m, 'unet', 'model.onnx_data'), path.join(blobs, 'w0'));
      symlinkSync('../blobs/w0', path.join(m, 'unet', 'model.onnx_data'));
      chownSync(blobs, JOB_UID, JOB_UID);
      chmodSync(blobs, 0o700);
    });
    // ORT: "… Failed to get the weakly canonical path: … - Permission denied". Before: "(its folder is owned by uid 0,
    // gid 0, mode 0755)", unet/, which is not what closes it.
    expect(reason).toBe(`CACHE_IO: unet/model.onnx_data could not be read: open failed with EACCES: this process (uid ${POD_UIDS[0]}, group 0) may not read it `
      + `(the folder it links into is owned by uid ${JOB_UID}, gid ${JOB_UID}, mode 0700), a permission of the deployment that no retry fixes; ${advice}`);
  });
});
