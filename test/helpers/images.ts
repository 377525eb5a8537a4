/**
 * @module Test helpers: small image files written field by field, for headers that claim what their data does not hold
 * (decompression bombs, truncated files) and for pictures no encoder at hand writes.
 */
import sharp from 'sharp';

/** A 1x1 GIF written by sharp, its screen size or first image descriptor ([left, top, width, height]) rewritten. */
export async function gif1x1(o: { screen?: [number, number]; frame?: [number, number, number, number] }): Promise<Buffer> {
  const g = Buffer.from(await sharp(Buffer.from([1, 2, 3]), { raw: { width: 1, height: 1, channels: 3 } }).gif().toBuffer());
  if (o.screen) {
    g.writeUInt16LE(o.screen[0], 6);
    g.writeUInt16LE(o.screen[1], 8);
  }
  if (o.frame) {
    const at = descriptorAt(g);
    o.frame.forEach((v, i) => g.writeUInt16LE(v, at + 1 + 2 * i));
  }
  return g;
}

/** Where the first image descriptor of a GIF sharp wrote starts: its left, top, width and height follow, 16 bits each. */
export function descriptorAt(g: Uint8Array): number {
  // It follows the global colour table and the extensions (a label, then sub-blocks up to an empty one).
  let at = 13 + (g[10]! & 0x80 ? 3 << ((g[10]! & 7) + 1) : 0);
  while (g[at] === 0x21) {
    at += 2;
    while (g[at] !== 0) at += g[at]! + 1;
    at++;
  }
  if (g[at] !== 0x2c) throw new Error('no image descriptor where sharp writes it');
  return at;
}

/** A BMP with a 40-byte header, its pixel data as given (a 2-colour table for 8 bits and less). */
export function bmp(width: number, height: number, bits: number, pixels: Buffer, compression = 0): Buffer {
  const table = bits <= 8 ? Buffer.from([0, 0, 0, 0, 255, 255, 255, 0]) : Buffer.alloc(0);
  const head = Buffer.alloc(54);
  head.write('BM', 0, 'latin1');
  head.writeUInt32LE(54 + table.length + pixels.length, 2);
  head.writeUInt32LE(54 + table.length, 10);
  head.writeUInt32LE(40, 14);
  head.writeInt32LE(width, 18);
  head.writeInt32LE(height, 22);
  head.writeUInt16LE(1, 26);
  head.writeUInt16LE(bits, 28);
  head.writeUInt32LE(compression, 30);
  head.writeUInt32LE(bits <= 8 ? 2 : 0, 46);
  return Buffer.concat([head, table, pixels]);
}

/** An uncompressed 8-bit greyscale TIFF of these pages, each one strip of `data` (which may be shorter than it claims). */
export function tiff(pages: Array<{ width: number; height: number; data: Buffer }>): Buffer {
  const ENTRIES = 9;
  // The header, then each page's data (padded to an even offset) and its IFD.
  let size = 8;
  const layout = pages.map((p) => {
    const data = size;
    size += p.data.length + (p.data.length % 2);
    const ifd = size;
    size += 2 + 12 * ENTRIES + 4;
    return { data, ifd };
  });
  const out = Buffer.alloc(size);
  out.write('II*\0', 0, 'latin1');
  out.writeUInt32LE(layout[0]!.ifd, 4);
  pages.forEach((p, k) => {
    const { data, ifd } = layout[k]!;
    p.data.copy(out, data);
    const entries: Array<[number, number, number]> = [[256, 4, p.width], [257, 4, p.height], [258, 3, 8], [259, 3, 1], [262, 3, 1], [273, 4, data], [277, 3, 1], [278, 4, p.height], [279, 4, p.data.length]];
    out.writeUInt16LE(ENTRIES, ifd);
    entries.forEach(([tag, type, value], i) => {
      const e = ifd + 2 + 12 * i;
      out.writeUInt16LE(tag, e);
      out.writeUInt16LE(type, e + 2);
      out.writeUInt32LE(1, e + 4);
      if (type === 3) out.writeUInt16LE(value, e + 8);
      else out.writeUInt32LE(value, e + 8);
    });
    out.writeUInt32LE(layout[k + 1]?.ifd ?? 0, ifd + 2 + 12 * ENTRIES);
  });
  return out;
}
