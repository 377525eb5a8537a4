/**
 * @module A GIF's first frame as Pillow's GifImagePlugin composes it (what diffusers' load_image gets), prepared for
 * libvips. libvips decodes a frame's indices to its colour table as Pillow does, but composes the frame otherwise: it
 * leaves the transparent index black where Pillow gives its table colour (Pillow's convert("RGB") drops transparency),
 * fills the canvas around a frame smaller than the screen with black where Pillow uses the colour of the transparent
 * index (or of index 0), clips a frame larger than the screen where Pillow grows the canvas, and gives a file without a
 * colour table colours where Pillow reads the indices as grey levels. So the frame is handed to libvips alone, as a GIF
 * of its own size with no transparency and no other frame, and placed on a canvas of the fill colour
 * (image-request.ts decodeGif).
 */

export interface GifFirstFrame {
  /** The canvas: the logical screen, grown to hold the frame where the frame reaches beyond it (as Pillow grows it). */
  width: number;
  height: number;
  /** The frame's place on the canvas. */
  left: number;
  top: number;
  frameWidth: number;
  frameHeight: number;
  /** The frame alone at (0, 0): its colour table (256 grey levels where Pillow reads it as grey), no transparency. */
  frame: Uint8Array;
  /** RGB of the canvas outside the frame: Pillow fills it with the transparent index, or index 0 where there is none. */
  fill: readonly [number, number, number];
}

/** Pillow's test for a colour table that only names grey levels 0, 1, 2, …: such a picture is read as mode "L". */
const isGreyRamp = (t: Uint8Array) => {
  for (let i = 0; i < t.length; i += 3) if (t[i] !== i / 3 || t[i + 1] !== i / 3 || t[i + 2] !== i / 3) return false;
  return true;
};

const GREY_RAMP = Uint8Array.from({ length: 768 }, (_, i) => Math.floor(i / 3));

/**
 * The first frame of a GIF, found as Pillow's `_seek(0)` finds it: the last graphic control extension before the first
 * image descriptor gives its transparent index; its local colour table, or else the global one, its colours. Throws an
 * Error (the decoder's complaint) on a file that ends before its first image.
 */
export function gifFirstFrame(b: Uint8Array): GifFirstFrame {
  if (b.length < 13) throw new Error('the file ends inside its header');
  const u16 = (o: number) => b[o]! | (b[o + 1]! << 8);
  const tableAt = (o: number, flags: number) => {
    const end = o + (3 << ((flags & 7) + 1));
    if (end > b.length) throw new Error('the file ends inside a colour table');
    return b.subarray(o, end);
  };
  // Pillow keeps a table only where it is not a grey ramp (null: mode "L", each index its own grey level).
  const kept = (t: Uint8Array) => (isGreyRamp(t) ? null : t);
  let at = 13;
  let global: Uint8Array | null = null;
  if (b[10]! & 0x80) {
    global = kept(tableAt(at, b[10]!));
    at += global?.length ?? 3 << ((b[10]! & 7) + 1);
  }
  let transparent: number | undefined;
  // Sub-blocks from `o`: the offset after their terminator (the file's end where it has none), and the first block.
  const blocks = (o: number) => {
    let first: Uint8Array | undefined;
    while (o < b.length) {
      const n = b[o]!;
      if (n === 0) return { end: o + 1, first, closed: true };
      first ??= b.subarray(o + 1, Math.min(o + 1 + n, b.length));
      o += 1 + n;
    }
    return { end: b.length, first, closed: false };
  };
  while (at < b.length) {
    const kind = b[at++]!;
    if (kind === 0x3b) break;
    if (kind === 0x21) {
      const label = b[at++];
      const { end, first } = blocks(at);
      if (label === 0xf9 && first && first.length >= 4 && first[0]! & 1) transparent = first[3]!;
      at = end;
    } else if (kind === 0x2c) {
      if (at + 9 > b.length) throw new Error('the file ends inside its first image descriptor');
      const [left, top, frameWidth, frameHeight, flags] = [u16(at), u16(at + 2), u16(at + 4), u16(at + 6), b[at + 8]!];
      at += 9;
      let table = global;
      if (flags & 0x80) {
        const local = tableAt(at, flags);
        at += local.length;
        table = kept(local);
      }
      if (at >= b.length) throw new Error('the file ends before its first image data');
      const { end, closed } = blocks(at + 1);
      // Pillow's load() raises here (diffusers' load_image does not set LOAD_TRUNCATED_IMAGES); libvips would fill black.
      if (!closed) throw new Error('image file is truncated: its first image\'s data ends before the file does');
      const [width, height] = [Math.max(u16(6), left + frameWidth), Math.max(u16(8), top + frameHeight)];
      // Pillow's decoder refuses a tile of no pixels (decode.c setimage), but reads x0 = x1 = 0 as the whole canvas.
      const tile = left === 0 && frameWidth === 0 ? [width, height] : [frameWidth, frameHeight];
      if (tile[0] === 0 || tile[1] === 0) throw new Error('tile cannot extend outside image');
      const colours = table ?? GREY_RAMP;
      const fillIndex = transparent ?? 0;
      // Past the table's end an index is black in Pillow's palette.
      const fill = [0, 1, 2].map((c) => colours[fillIndex * 3 + c] ?? 0) as [number, number, number];
      return {
        width,
        height,
        left,
        top,
        frameWidth,
        frameHeight,
        frame: frameGif(frameWidth, frameHeight, colours, flags & 0x40, b.subarray(at, end)),
        fill,
      };
    }
    // Pillow skips any other byte between blocks.
  }
  throw new Error('the file has no image');
}

/**
 * A GIF of one frame at (0, 0) filling its screen, with `colours` as its global table and `lzw` (code size and
 * sub-blocks with their terminator).
 */
function frameGif(width: number, height: number, colours: Uint8Array, interlace: number, lzw: Uint8Array): Uint8Array {
  let bits = 1;
  while (3 << bits < colours.length) bits++;
  const size = 3 << bits;
  const out = new Uint8Array(13 + size + 10 + lzw.length + 1);
  const head = [0x47, 0x49, 0x46, 0x38, 0x39, 0x61, width & 255, width >> 8, height & 255, height >> 8, 0xf0 | (bits - 1), 0, 0];
  out.set(head);
  out.set(colours, 13);
  let at = 13 + size;
  out.set([0x2c, 0, 0, 0, 0, width & 255, width >> 8, height & 255, height >> 8, interlace], at);
  out.set(lzw, (at += 10));
  at += lzw.length;
  out[at++] = 0x3b;
  return out.subarray(0, at);
}
