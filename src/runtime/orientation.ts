/**
 * @module The orientation diffusers' load_image applies (Pillow's `ImageOps.exif_transpose`) from the places libvips
 * does not read it, and the turn it makes. libvips (sharp's autoOrient) reads the EXIF
 * orientation of a JPEG's APP1, a WebP's EXIF chunk and a PNG's eXIf chunk before IDAT; Pillow 12 reads it also from
 * a PNG's eXIf after IDAT, from the "Raw profile type exif" text chunk ImageMagick writes into PNGs it converts, and,
 * where the EXIF has no orientation, from the XMP packet's `tiff:Orientation` (a JPEG's, a WebP's or a PNG's). A TIFF is
 * turned here whole: its first IFD's orientation tag, or else its XMP tag's `tiff:Orientation` (libvips reads only the
 * former).
 */
import { inflateSync } from 'node:zlib';
import type { Sharp } from 'sharp';

/** Pillow's bound on a decompressed PNG text chunk (MAX_TEXT_CHUNK); a larger one fails in Pillow, here it is skipped. */
const MAX_TEXT = 1 << 20;
const XMP_ORIENTATION = /tiff:Orientation(="|>)([0-9])/;

/**
 * The orientation tag Pillow's `getexif()` finds in `bytes` (a file libvips found no EXIF orientation in), or undefined.
 * A value outside 2–8 (1, or an invalid 0 or 9) means no transposition, as in exif_transpose.
 */
export function pillowOrientation(bytes: Uint8Array, format: 'png' | 'jpeg' | 'webp' | 'tiff'): number | undefined {
  const found = format === 'png' ? pngMetadata(bytes) : format === 'jpeg' ? jpegMetadata(bytes) : format === 'webp' ? webpMetadata(bytes) : tiffMetadata(bytes);
  // Pillow's order: the EXIF's own tag wins, even 1; the XMP packet only where the EXIF has none.
  const fromExif = found.exif ? tiffOrientation(found.exif) : undefined;
  if (fromExif !== undefined) return fromExif;
  const m = found.xmp === undefined ? null : XMP_ORIENTATION.exec(found.xmp);
  return m ? Number(m[2]) : undefined;
}

interface Found {
  exif?: Uint8Array;
  /** The XMP packet, as latin1 text: the pattern is ASCII. */
  xmp?: string;
}

const latin1 = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('latin1');

/**
 * PNG chunks as Pillow reads them (the last of each key wins): eXIf anywhere, text chunks keyed "Raw profile type exif"
 * (EXIF in hex after three lines) and "XML:com.adobe.xmp". After IDAT an animated PNG is read up to its next frame.
 */
function pngMetadata(b: Uint8Array): Found {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let exif: Uint8Array | undefined;
  const texts = new Map<string, { type: string; data: Uint8Array }>();
  let animated = false;
  let idat = false;
  for (let at = 8; at + 8 <= b.length; ) {
    const len = dv.getUint32(at);
    const type = latin1(b.subarray(at + 4, at + 8));
    const data = b.subarray(at + 8, Math.min(at + 8 + len, b.length));
    at += 12 + len;
    if (type === 'IEND' || (idat && animated && type === 'fcTL')) break;
    if (type === 'IDAT') idat = true;
    else if (type === 'acTL') animated = true;
    else if (type === 'eXIf') exif = data;
    else if (type === 'tEXt' || type === 'zTXt' || type === 'iTXt') {
      const key = latin1(data.subarray(0, Math.max(data.indexOf(0), 0)));
      // Only the last of a key is decompressed: a file of many compressed chunks costs no more than one.
      if (key === RAW_EXIF || key === XMP_KEY) texts.set(key, { type, data: data.subarray(key.length + 1) });
    }
  }
  const text = (key: string) => {
    const t = texts.get(key);
    return t && pngText(t.type, t.data);
  };
  // Pillow: bytes.fromhex("".join(text.split("\n")[3:])); text that is not hex fails there, and is ignored here.
  const hex = exif ? undefined : text(RAW_EXIF)?.split('\n').slice(3).join('').replace(/[ \t\r\n\v\f]/g, '');
  if (hex !== undefined && hex.length % 2 === 0 && /^[0-9a-f]*$/i.test(hex)) exif = Buffer.from(hex, 'hex');
  return { exif, xmp: text(XMP_KEY) };
}

const RAW_EXIF = 'Raw profile type exif';
const XMP_KEY = 'XML:com.adobe.xmp';

/** A text chunk's value after its keyword, decompressed where it is; undefined where Pillow would skip it. */
function pngText(type: string, data: Uint8Array): string | undefined {
  let rest = data;
  try {
    if (type === 'zTXt') rest = rest[0] === 0 ? inflateSync(rest.subarray(1), { maxOutputLength: MAX_TEXT }) : new Uint8Array();
    else if (type === 'iTXt') {
      const [compressed, method] = [rest[0], rest[1]];
      rest = rest.subarray(2);
      // Language tag and translated keyword, each ended by a NUL.
      for (let i = 0; i < 2; i++) {
        const end = rest.indexOf(0);
        if (end < 0) return undefined;
        rest = rest.subarray(end + 1);
      }
      if (compressed !== 0) {
        if (method !== 0) return undefined;
        rest = inflateSync(rest, { maxOutputLength: MAX_TEXT });
      }
    }
  } catch {
    return undefined;
  }
  return latin1(rest);
}

/** A JPEG's segments before the scan: the first APP1 "Exif" (Pillow appends later ones to it) and the last XMP APP1. */
function jpegMetadata(b: Uint8Array): Found {
  const XMP = 'http://ns.adobe.com/xap/1.0/\0';
  const found: Found = {};
  for (let at = 2; at + 4 <= b.length && b[at] === 0xff; ) {
    const marker = b[at + 1]!;
    if (marker === 0xff) {
      at++;
      continue;
    }
    if (marker === 0xda || marker === 0xd9) break;
    const len = (b[at + 2]! << 8) | b[at + 3]!;
    const data = b.subarray(at + 4, Math.min(at + 2 + len, b.length));
    at += 2 + len;
    if (marker !== 0xe1) continue;
    if (!found.exif && latin1(data.subarray(0, 6)) === 'Exif\0\0') found.exif = data;
    else if (latin1(data.subarray(0, XMP.length)) === XMP) found.xmp = latin1(data.subarray(XMP.length));
  }
  return found;
}

/** A WebP's first EXIF and XMP chunks (what libwebp's demuxer hands Pillow). */
function webpMetadata(b: Uint8Array): Found {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const found: Found = {};
  for (let at = 12; at + 8 <= b.length; ) {
    const type = latin1(b.subarray(at, at + 4));
    const len = dv.getUint32(at + 4, true);
    const data = b.subarray(at + 8, Math.min(at + 8 + len, b.length));
    at += 8 + len + (len & 1);
    if (type === 'EXIF') found.exif ??= data;
    else if (type === 'XMP ') found.xmp ??= latin1(data);
  }
  return found;
}

/** A TIFF file is its own EXIF block (Pillow's getexif reads its first IFD); its XMP packet is tag 700's value. */
function tiffMetadata(b: Uint8Array): Found {
  const xmp = ifdEntry(b, 700);
  return { exif: b, ...(xmp && xmp.at + xmp.count <= b.length ? { xmp: latin1(b.subarray(xmp.at, xmp.at + xmp.count)) } : {}) };
}

/** A TIFF-structured block's first IFD (classic or BigTIFF), as the readers of its entries and of its link need it. */
export interface FirstIfd {
  le: boolean;
  dv: DataView;
  /** Offset of the IFD, its entry count, and the offset of its first entry (after the count). */
  at: number;
  count: number;
  entries: number;
  /** Bytes of an offset or count (4; BigTIFF 8), and of an entry (12; BigTIFF 20). */
  word: number;
  entry: number;
  /** Reads an offset or count at `o`. */
  uint(o: number): number;
}

/** The first IFD of a TIFF-structured block; undefined if the block is not one or is cut before the IFD's count. */
export function firstIfd(b: Uint8Array): FirstIfd | undefined {
  if (b.length < 8) return undefined;
  const head = latin1(b.subarray(0, 4));
  const le = head === 'II*\0' || head === 'II+\0';
  const big = head === 'II+\0' || head === 'MM\0+';
  if (!le && !big && head !== 'MM\0*') return undefined;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  // BigTIFF: 8-byte offsets and counts, 20-byte entries.
  const [word, entry] = big ? [8, 20] : [4, 12];
  const uint = (o: number) => (big ? Number(dv.getBigUint64(o, le)) : dv.getUint32(o, le));
  if (b.length < (big ? 16 : 8)) return undefined;
  const at = uint(big ? 8 : 4);
  if (at + word > b.length) return undefined;
  return { le, dv, at, count: big ? uint(at) : dv.getUint16(at, le), entries: at + (big ? 8 : 2), word, entry, uint };
}

/**
 * An entry of a TIFF-structured block's first IFD (classic or BigTIFF): its type, count, and where its value lies (in
 * the entry where it fits, else at the offset the entry gives); undefined if absent or the block is cut short.
 */
function ifdEntry(b: Uint8Array, tag: number): { type: number; count: number; at: number; le: boolean } | undefined {
  const ifd = firstIfd(b);
  if (!ifd) return undefined;
  const { le, dv, word, entry, uint } = ifd;
  for (let i = 0; i < ifd.count; i++) {
    const e = ifd.entries + entry * i;
    if (e + entry > b.length) return undefined;
    if (dv.getUint16(e, le) !== tag) continue;
    const [type, count] = [dv.getUint16(e + 2, le), uint(e + 4)];
    const size = count * (TYPE_SIZES[type] ?? 1);
    return { type, count, at: size <= word ? e + 4 + word : uint(e + 4 + word), le };
  }
  return undefined;
}

/** Bytes per value of the TIFF types an orientation or XMP tag may have (BYTE, ASCII, SHORT, LONG, UNDEFINED, …). */
const TYPE_SIZES: Record<number, number> = { 1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 16: 8, 17: 8 };

/** The Orientation tag (0x0112) of a TIFF-structured EXIF block's first IFD, as one integer; undefined if absent. */
function tiffOrientation(exif: Uint8Array): number | undefined {
  let b = exif;
  while (latin1(b.subarray(0, 6)) === 'Exif\0\0') b = b.subarray(6);
  const e = ifdEntry(b, 0x0112);
  if (!e) return undefined;
  // One BYTE, SHORT or LONG: the integer exif_transpose looks up (other forms are no orientation there).
  if (e.count !== 1) return 0;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return e.type === 1 ? b[e.at]! : e.type === 3 ? dv.getUint16(e.at, e.le) : e.type === 4 ? dv.getUint32(e.at, e.le) : 0;
}

/**
 * `img` turned as Pillow's `exif_transpose` turns a picture of this orientation (2–8; others: as is), in libvips' own
 * threads. sharp mirrors before it rotates (clockwise): TRANSPOSE (5) is a flip then 90°, TRANSVERSE (7) a flop then 90°.
 */
export function oriented(img: Sharp, orientation: number): Sharp {
  const turn = TURNS[orientation];
  return turn ? img.flip(turn.flip).flop(turn.flop).rotate(turn.angle) : img;
}

const TURNS: Record<number, { flip: boolean; flop: boolean; angle: number }> = {
  2: { flip: false, flop: true, angle: 0 },
  3: { flip: false, flop: false, angle: 180 },
  4: { flip: true, flop: false, angle: 0 },
  5: { flip: true, flop: false, angle: 90 },
  6: { flip: false, flop: false, angle: 90 },
  7: { flip: false, flop: true, angle: 90 },
  8: { flip: false, flop: false, angle: 270 },
};
