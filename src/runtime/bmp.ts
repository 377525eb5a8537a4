/**
 * @module BMP as Pillow's BmpImagePlugin reads it (diffusers' load_image), then `convert("RGB")`: libvips has no BMP
 * reader. The headers Pillow takes (OS/2 1.x, Windows 3.x to 5), 1-, 4- and 8-bit colour tables, 16-, 24- and 32-bit
 * pixels (the fourth byte of a 32-bit pixel is never colour: convert("RGB") drops it), the bit-field layouts Pillow
 * lists, and RLE8/RLE4 as Pillow's own decoder expands them. Anything else is refused with Pillow's reason.
 */

/** A BMP's size, read from its header, and its RGB pixels (decoded only when asked, after the size was checked). */
export interface Bmp {
  width: number;
  height: number;
  /** RLE8 or RLE4: decode() expands it to an index per pixel first. */
  rle: boolean;
  decode(): Uint8Array;
}

/**
 * The 32-bit bit-field layouts Pillow reads (r, g, b, a masks), as the bytes of a little-endian pixel that hold red,
 * green and blue; 24- and 16-bit ones below.
 */
const LAYOUTS_32: ReadonlyArray<readonly [readonly number[], readonly [number, number, number]]> = [
  [[0xff0000, 0xff00, 0xff, 0], [2, 1, 0]],
  [[0xff000000, 0xff0000, 0xff00, 0], [3, 2, 1]],
  [[0xff000000, 0xff00, 0xff, 0], [3, 1, 0]],
  [[0xff000000, 0xff0000, 0xff00, 0xff], [3, 2, 1]],
  [[0xff, 0xff00, 0xff0000, 0xff000000], [0, 1, 2]],
  [[0xff0000, 0xff00, 0xff, 0xff000000], [2, 1, 0]],
  [[0xff000000, 0xff00, 0xff, 0xff0000], [3, 1, 0]],
  [[0, 0, 0, 0], [2, 1, 0]],
];
const same = (a: readonly number[], b: readonly number[]) => a.every((v, i) => v === b[i]);

/** A 5- and a 6-bit field scaled to 0–255 as Pillow scales them: v · 255 / max, truncated. */
const SCALE_5 = Uint8Array.from({ length: 32 }, (_, v) => Math.trunc((v * 255) / 31));
const SCALE_6 = Uint8Array.from({ length: 64 }, (_, v) => Math.trunc((v * 255) / 63));

const RAW = 0;
const RLE8 = 1;
const RLE4 = 2;
const BITFIELDS = 3;

/** Reads a BMP's headers and colour table; throws an Error naming what Pillow would refuse. */
export function readBmp(b: Uint8Array): Bmp {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const need = (end: number, what: string) => {
    if (end > b.length) throw new Error(`the file ends inside its ${what}`);
  };
  need(18, 'header');
  const u16 = (o: number) => dv.getUint16(o, true);
  const u32 = (o: number) => dv.getUint32(o, true);
  let offset = u32(10);
  const headerSize = u32(14);
  let width: number;
  let height: number;
  let bits: number;
  let compression = RAW;
  let colours = 0;
  let topDown = false;
  let entry = 4;
  let masks: number[] = [];
  let at = 14 + headerSize;
  if (headerSize === 12) {
    need(26, 'header');
    [width, height, bits, entry] = [u16(18), u16(20), u16(24), 3];
  } else if ([40, 52, 56, 64, 108, 124].includes(headerSize)) {
    need(14 + headerSize, 'header');
    // A negative height (its top byte 0xff, as Pillow tests it) stores the rows top to bottom.
    topDown = b[25] === 0xff;
    [width, height, bits, compression, colours] = [u32(18), topDown ? 2 ** 32 - u32(22) : u32(22), u16(28), u32(30), u32(46)];
    if (compression === BITFIELDS) {
      if (headerSize >= 52) masks = [u32(54), u32(58), u32(62), headerSize >= 56 ? u32(66) : 0];
      else {
        need(at + 12, 'bit masks');
        masks = [u32(at), u32(at + 4), u32(at + 8), 0];
        at += 12;
      }
    }
  } else throw new Error(`unsupported BMP header type (${headerSize})`);
  if (colours === 0) colours = 2 ** bits;
  if (offset === 14 + headerSize && bits <= 8) offset += entry * colours;
  if (![1, 4, 8, 16, 24, 32].includes(bits)) throw new Error(`unsupported BMP pixel depth (${bits})`);

  // Where each pixel's red, green and blue are: byte offsets (24, 32 bits), or a 16-bit layout.
  let rgb: readonly [number, number, number] = [2, 1, 0];
  let sixteen: '555' | '565' = '555';
  if (compression === BITFIELDS) {
    const layout = bits === 32 ? LAYOUTS_32.find(([m]) => same(m, masks))?.[1] : undefined;
    if (layout) rgb = layout;
    else if (bits === 24 && same(masks.slice(0, 3), [0xff0000, 0xff00, 0xff])) rgb = [2, 1, 0];
    else if (bits === 16 && same(masks.slice(0, 3), [0xf800, 0x7e0, 0x1f])) sixteen = '565';
    else if (!(bits === 16 && same(masks.slice(0, 3), [0x7c00, 0x3e0, 0x1f]))) throw new Error('unsupported BMP bit-field layout');
  } else if (compression !== RAW && compression !== RLE8 && compression !== RLE4) {
    throw new Error(`unsupported BMP compression (${compression})`);
  }
  const rle = compression === RLE8 || compression === RLE4;
  if (rle && bits > 8) throw new Error(`unsupported BMP: RLE compression of ${bits}-bit pixels`);

  // The colour table, as RGB for all 256 indices (black past its end, as in Pillow's palette).
  let lut: Uint8Array | undefined;
  if (bits <= 8) {
    if (!(colours > 0 && colours <= 65536)) throw new Error(`unsupported BMP palette size (${colours})`);
    need(at + entry * colours, 'colour table');
    lut = new Uint8Array(768);
    for (let i = 0; i < Math.min(colours, 256); i++) lut.set([b[at + i * entry + 2]!, b[at + i * entry + 1]!, b[at + i * entry]!], i * 3);
    // Pillow reads a table of grey levels 0, 1, 2, … as mode "L": an index past its end is its own grey level.
    let ramp = colours !== 2;
    for (let i = 0; ramp && i < colours; i++) ramp = b[at + i * entry] === i && b[at + i * entry + 1] === i && b[at + i * entry + 2] === i;
    if (ramp) for (let i = 0; i < 768; i++) lut[i] = Math.floor(i / 3);
    at += entry * colours;
  }
  if (offset === 0) offset = at;

  return {
    width,
    height,
    rle,
    decode: () => {
      if (width === 0 || height === 0) throw new Error(`the picture is ${width}x${height}`);
      // The data is checked before the pixels are allocated: a header may claim pixels its file does not hold.
      const indices = rle ? expandRle(b, offset, width, height, compression === RLE4) : undefined;
      const stride = Math.floor((width * bits + 31) / 32) * 4;
      if (!rle) need(offset + stride * height, 'pixels');
      const out = new Uint8Array(width * height * 3);
      const table = lut ?? new Uint8Array(0);
      const line = new Uint8Array(bits < 8 ? width : 0);
      // Rows are stored bottom to top unless the height was negative.
      const rowAt = (r: number) => (topDown ? r : height - 1 - r) * width * 3;
      // One loop per layout, chosen per row: a branch per pixel made a 4096² picture cost twice as long.
      for (let r = 0; r < height; r++) {
        const src = offset + r * stride;
        const o = rowAt(r);
        if (indices || bits <= 8) {
          // Each pixel's index, then its colour.
          const row = indices ? indices.subarray(r * width, (r + 1) * width) : bits === 8 ? b.subarray(src, src + width) : unpackBits(b, src, width, bits, line);
          for (let x = 0, q = o; x < width; x++, q += 3) {
            const i = 3 * row[x]!;
            out[q] = table[i]!;
            out[q + 1] = table[i + 1]!;
            out[q + 2] = table[i + 2]!;
          }
        } else if (bits === 16) {
          // Pillow's BGR;15 and BGR;16 unpackers: each field scaled to 0–255 with integer division.
          const [rShift, greens] = sixteen === '565' ? [11, SCALE_6] : [10, SCALE_5];
          for (let x = 0, q = o, p = src; x < width; x++, q += 3, p += 2) {
            const v = b[p]! | (b[p + 1]! << 8);
            out[q] = SCALE_5[(v >> rShift) & 31]!;
            out[q + 1] = greens[(v >> 5) & (greens.length - 1)]!;
            out[q + 2] = SCALE_5[v & 31]!;
          }
        } else {
          const [rByte, gByte, bByte] = rgb;
          const step = bits >> 3;
          for (let x = 0, q = o, p = src; x < width; x++, q += 3, p += step) {
            out[q] = b[p + rByte]!;
            out[q + 1] = b[p + gByte]!;
            out[q + 2] = b[p + bByte]!;
          }
        }
      }
      return out;
    },
  };
}

/** The 1- or 4-bit indices of a row at `src` (the first pixel in the high bits), into `line`. */
function unpackBits(b: Uint8Array, src: number, width: number, bits: number, line: Uint8Array): Uint8Array {
  if (bits === 4) for (let x = 0; x < width; x++) line[x] = (b[src + (x >> 1)]! >> (x & 1 ? 0 : 4)) & 15;
  else for (let x = 0; x < width; x++) line[x] = (b[src + (x >> 3)]! >> (7 - (x & 7))) & 1;
  return line;
}

/**
 * Pillow's BmpRleDecoder: colour indices row after row as stored (bottom up), index 0 where a delta or an end of line
 * skips; a row overflowing in absolute mode runs on into the next. Fewer pixels than the picture has is Pillow's
 * "not enough image data".
 */
function expandRle(b: Uint8Array, start: number, width: number, height: number, rle4: boolean): Uint8Array {
  const n = width * height;
  const out = new Uint8Array(n);
  // How many indices Pillow's list holds; writes past the picture are dropped.
  let len = 0;
  const put = (v: number) => {
    if (len < n) out[len] = v;
    len++;
  };
  let x = 0;
  let at = start;
  while (len < n) {
    if (at + 2 > b.length) break;
    let count = b[at]!;
    const byte = b[at + 1]!;
    at += 2;
    if (count) {
      if (x + count > width) count = Math.max(0, width - x);
      for (let i = 0; i < count; i++) put(rle4 ? (i % 2 === 0 ? byte >> 4 : byte & 15) : byte);
      x += count;
    } else if (byte === 0) {
      len = Math.ceil(len / width) * width;
      x = 0;
    } else if (byte === 1) {
      break;
    } else if (byte === 2) {
      if (at + 2 > b.length) break;
      len += b[at]! + b[at + 1]! * width;
      at += 2;
      x = len % width;
    } else {
      const want = rle4 ? byte >> 1 : byte;
      const got = Math.min(want, b.length - at);
      for (let i = 0; i < got; i++) {
        if (rle4) {
          put(b[at + i]! >> 4);
          put(b[at + i]! & 15);
        } else put(b[at + i]!);
      }
      at += got;
      if (got < want) break;
      x += byte;
      // Absolute runs are padded to an even offset in the file.
      if (at % 2 !== 0) at++;
    }
  }
  if (len < n) throw new Error('not enough image data');
  return out;
}
