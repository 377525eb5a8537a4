/**
 * Which mount a path lies on (storage/mounts.ts), from a mountinfo table, and the deepest of several folders that
 * holds a file (files.ts): what the adapters' gates are picked by (runtime/adapters.ts), one a volume.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { deepestHolding } from '../src/files.js';
import { mountOf, parseMountInfo, readMounts } from '../src/storage/mounts.js';
import { tempDir } from './helpers/server.js';

// A container's table: its root, a PVC at /mnt/cache, a folder of another volume bound under it, a folder with a
// space in its name, and a second mount over /mnt/models hiding the first.
const TABLE = [
  '600 500 0:52 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w',
  '601 600 0:77 / /mnt/cache rw,relatime - nfs4 10.0.0.5:/export rw,vers=4.1',
  '602 601 8:1 /loras /mnt/cache/loras rw,relatime - ext4 /dev/sda1 rw',
  '603 600 8:1 /models /mnt/my\\040models rw,relatime - ext4 /dev/sda1 rw',
  '604 600 0:80 / /mnt/models rw - tmpfs tmpfs rw',
  '605 600 0:81 / /mnt/models rw - fuse.x x rw',
  '',
].join('\n');

describe('parseMountInfo, mountOf', () => {
  const mounts = parseMountInfo(TABLE);

  it('reads each mount point and its device, escapes decoded', () => {
    expect(mounts).toEqual([
      { dir: '/', dev: '0:52' }, { dir: '/mnt/cache', dev: '0:77' }, { dir: '/mnt/cache/loras', dev: '8:1' },
      { dir: '/mnt/my models', dev: '8:1' }, { dir: '/mnt/models', dev: '0:80' }, { dir: '/mnt/models', dev: '0:81' },
    ]);
  });

  it('a file is on the deepest mount holding it, the last mounted at one point, by path', () => {
    expect(mountOf(mounts, '/mnt/cache/entry/unet/model.onnx')?.dev).toBe('0:77');
    // A folder of another volume mounted inside the cache's folder is that volume.
    expect(mountOf(mounts, '/mnt/cache/loras/style.safetensors')?.dev).toBe('8:1');
    expect(mountOf(mounts, '/mnt/cache')?.dev).toBe('0:77');
    expect(mountOf(mounts, '/mnt/cachex/a')?.dev).toBe('0:52');
    expect(mountOf(mounts, '/mnt/models/loras/a.safetensors')?.dev).toBe('0:81');
    expect(mountOf(mounts, '/mnt/my models/x')?.dev).toBe('8:1');
    expect(mountOf(mounts, '/etc/hosts')?.dev).toBe('0:52');
    expect(mountOf([], '/x')).toBeUndefined();
  });

  it('reads this process\'s table where there is one, and none where there is not', () => {
    const tmp = tempDir('dr-mounts-');
    try {
      expect(readMounts(path.join(tmp.dir, 'no-such-table'))).toBeUndefined();
      if (process.platform === 'linux') expect(mountOf(readMounts()!, tmp.dir)).toBeDefined();
    } finally {
      tmp.cleanup();
    }
  });
});

describe('deepestHolding', () => {
  it('the deepest folder holding the file, the first listed of those as deep; none for a file outside them all', () => {
    const dirs = ['/mnt/cache', '/mnt/cache/loras', '/models', '/mnt/cache/loras'];
    const at = (file: string) => {
      const i = deepestHolding(dirs.map((d, i) => ({ d, i })), (x) => x.d, file);
      return i === undefined ? undefined : i.i;
    };
    // Before, the adapters' gates took the first listed folder that held the file: the cache's, for a LORA_URI under it.
    expect(at('/mnt/cache/loras/a.safetensors')).toBe(1);
    expect(at('/mnt/cache/entry/x')).toBe(0);
    expect(at('/mnt/cache')).toBe(0);
    expect(at('/models/loras/a.safetensors')).toBe(2);
    expect(at('/mnt/cachex')).toBeUndefined();
  });
});
