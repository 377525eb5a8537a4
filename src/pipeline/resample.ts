/**
 * @module Pillow's image resampling (`Image.resize`, libImaging/Resample.c) for 8-bit images, bit for bit: the image
 * processors of diffusers resize with it (Lanczos, and bicubic for the fill bands of `resize_mode="fill"`), so an
 * input resized any other way (sharp, libvips) would start the generation from different pixels.
 *
 * Separable two-pass filter: per output pixel a window of source pixels with filter weights in double, normalised to
 * sum 1, then turned into 22-bit fixed point; each pass accumulates `pixel · weight` in integers from 2^21 and keeps
 * `sum >> 22` clamped to 0..255. The horizontal pass runs first, on the source rows the vertical pass needs.
 */

/** Interleaved 8-bit pixels, row by row: `channels` bytes a pixel (1 = L, 3 = RGB). */
export interface Raster {
  data: Uint8Array;
  width: number;
  height: number;
  channels: number;
}

export type Filter = 'lanczos' | 'bicubic';

const PRECISION_BITS = 22;
const HALF = 1 << (PRECISION_BITS - 1);
const f = Math.fround;

function sinc(x: number): number {
  if (x === 0) return 1;
  const y = x * Math.PI;
  return Math.sin(y) / y;
}

const FILTERS: Record<Filter, { support: number; fn: (x: number) => number }> = {
  lanczos: { support: 3, fn: (x) => (-3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
  bicubic: {
    support: 2,
    fn: (x) => {
      const a = -0.5;
      if (x < 0) x = -x;
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
};

interface Coeffs {
  ksize: number;
  /** Per output pixel: first source index and count. */
  bounds: Int32Array;
  /** Per output pixel: `ksize` fixed-point weights. */
  kk: Int32Array;
}

/**
 * `precompute_coeffs` + `normalize_coeffs_8bpc` for output pixels `from` … `from + count − 1` of `outSize` (each pixel's
 * weights depend on its own position only). `in0`/`in1` are C floats (the box), the rest doubles.
 */
function coeffs(inSize: number, in0: number, in1: number, outSize: number, filter: Filter, from = 0, count = outSize): Coeffs {
  const { support: base, fn } = FILTERS[filter];
  const scale = f(f(in1) - f(in0)) / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = base * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(count * 2);
  const kk = new Int32Array(count * ksize);
  const k = new Float64Array(ksize);
  const start = f(in0);
  for (let xx = 0; xx < count; xx++) {
    const center = start + (xx + from + 0.5) * scale;
    const ss = 1 / filterscale;
    // C's (int) truncates toward zero.
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      let w = x < xmax ? k[x]! : 0;
      if (x < xmax && ww !== 0) w /= ww;
      kk[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

/** `clip8`: the sum's integer part, clamped to a byte (Pillow's lookup table covers what the filters can reach). */
function clip8(v: number): number {
  const q = v >> PRECISION_BITS;
  return q < 0 ? 0 : q > 255 ? 255 : q;
}

function horizontal(src: Raster, rowOffset: number, rows: number, outW: number, c: Coeffs): Raster {
  const ch = src.channels;
  const data = src.data;
  const out = new Uint8Array(outW * rows * ch);
  const { ksize, bounds, kk } = c;
  for (let yy = 0; yy < rows; yy++) {
    const rowIn = (yy + rowOffset) * src.width * ch;
    const rowOut = yy * outW * ch;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2]!;
      const xmax = bounds[xx * 2 + 1]!;
      const kb = xx * ksize;
      let p = rowIn + xmin * ch;
      // RGB's three sums in one walk over the window, as Pillow's ImagingResampleHorizontal_8bpc does: a downscale's
      // window spans hundreds of pixels (3000 to 64: 283), and walking it once per channel took about twice as long.
      if (ch === 3) {
        let s0 = HALF;
        let s1 = HALF;
        let s2 = HALF;
        for (let x = 0; x < xmax; x++, p += 3) {
          const k = kk[kb + x]!;
          s0 += data[p]! * k;
          s1 += data[p + 1]! * k;
          s2 += data[p + 2]! * k;
        }
        const o = rowOut + xx * 3;
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
      } else {
        for (let b = 0; b < ch; b++) {
          let ss = HALF;
          for (let x = 0, q = p + b; x < xmax; x++, q += ch) ss += data[q]! * kk[kb + x]!;
          out[rowOut + xx * ch + b] = clip8(ss);
        }
      }
    }
  }
  return { data: out, width: outW, height: rows, channels: ch };
}

function vertical(src: Raster, outH: number, c: Coeffs, shift: number): Raster {
  const ch = src.channels;
  const w = src.width;
  const out = new Uint8Array(w * outH * ch);
  const { ksize, bounds, kk } = c;
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2]! - shift;
    const ymax = bounds[yy * 2 + 1]!;
    const kb = yy * ksize;
    for (let xx = 0; xx < w; xx++) {
      for (let b = 0; b < ch; b++) {
        let ss = HALF;
        for (let y = 0; y < ymax; y++) ss += src.data[((y + ymin) * w + xx) * ch + b]! * kk[kb + y]!;
        out[(yy * w + xx) * ch + b] = clip8(ss);
      }
    }
  }
  return { data: out, width: w, height: outH, channels: ch };
}

/** The part of a resize's output that is computed: columns x … x + width − 1, rows y … y + height − 1. */
export interface Window {
  x: number;
  y: number;
  width: number;
  height: number;
}

/** A copy of rows `y` … `y + h − 1` and columns `x` … `x + w − 1` of `src`. */
function crop(src: Raster, x: number, y: number, w: number, h: number): Raster {
  const ch = src.channels;
  const out = new Uint8Array(w * h * ch);
  for (let yy = 0; yy < h; yy++) out.set(src.data.subarray(((y + yy) * src.width + x) * ch, ((y + yy) * src.width + x + w) * ch), yy * w * ch);
  return { data: out, width: w, height: h, channels: ch };
}

/** `ImagingResampleInner`, computing only the window `win` of its outW × outH output. */
function resampleInner(src: Raster, outW: number, outH: number, box: readonly [number, number, number, number], filter: Filter, win: Window): Raster {
  // Pillow compares box[2] with the output width (and box[3] with the output height): kept as it is.
  const needH = outW !== src.width || box[0] !== 0 || box[2] !== outW;
  const needV = outH !== src.height || box[1] !== 0 || box[3] !== outH;
  // The source rows the window needs: those its vertical weights reach, or its own rows when nothing is resized
  // vertically (then the output rows are the source rows).
  const cv = needV ? coeffs(src.height, box[1], box[3], outH, filter, win.y, win.height) : undefined;
  const yFirst = cv ? cv.bounds[0]! : win.y;
  const yLast = cv ? cv.bounds[win.height * 2 - 2]! + cv.bounds[win.height * 2 - 1]! : win.y + win.height;
  let img = needH
    ? horizontal(src, yFirst, yLast - yFirst, win.width, coeffs(src.width, box[0], box[2], outW, filter, win.x, win.width))
    : crop(src, win.x, yFirst, win.width, yLast - yFirst);
  if (cv) img = vertical(img, win.height, cv, yFirst);
  return img;
}

/**
 * `Image.resize((outW, outH), filter, box)` for an 8-bit L or RGB image. `win`: only that part of the output is
 * computed (the same pixels as a crop of the whole), so a resize whose result is mostly cropped away costs the part kept.
 */
export function resize(src: Raster, outW: number, outH: number, filter: Filter = 'lanczos', box?: readonly [number, number, number, number], win?: Window): Raster {
  const b = box ?? ([0, 0, src.width, src.height] as const);
  const w = win ?? { x: 0, y: 0, width: outW, height: outH };
  if (!(w.width > 0 && w.height > 0 && w.x >= 0 && w.y >= 0 && w.x + w.width <= outW && w.y + w.height <= outH)) {
    throw new RangeError(`resize window ${JSON.stringify(w)} is not inside ${outW}x${outH}`);
  }
  if (outW === src.width && outH === src.height && b[0] === 0 && b[1] === 0 && b[2] === src.width && b[3] === src.height) {
    return crop(src, w.x, w.y, w.width, w.height);
  }
  if (src.height > src.width * 100 && outH < src.height) {
    // Very tall images: Pillow resizes the height first, on the full width.
    const tall = resampleInner(src, src.width, outH, [0, b[1], src.width, b[3]], filter, { x: 0, y: w.y, width: src.width, height: w.height });
    // The window's rows of that outH-high image: the second resize is horizontal only.
    return resampleInner(tall, outW, w.height, [b[0], 0, b[2], w.height], filter, { x: w.x, y: 0, width: w.width, height: w.height });
  }
  return resampleInner(src, outW, outH, b, filter, w);
}

/** A black image of this size (`Image.new(mode, size)`). */
export function blank(width: number, height: number, channels: number): Raster {
  return { data: new Uint8Array(width * height * channels), width, height, channels };
}

/** `dst.paste(src, (x, y))`: copies src with its top-left corner at (x, y), clipped to dst. */
export function paste(dst: Raster, src: Raster, x: number, y: number): void {
  const ch = dst.channels;
  const x0 = Math.max(0, x);
  const x1 = Math.min(dst.width, x + src.width);
  if (x1 <= x0) return;
  for (let yy = Math.max(0, y); yy < Math.min(dst.height, y + src.height); yy++) {
    const from = ((yy - y) * src.width + (x0 - x)) * ch;
    dst.data.set(src.data.subarray(from, from + (x1 - x0) * ch), (yy * dst.width + x0) * ch);
  }
}

/** `Image.convert("L")` from RGB: ITU-R 601-2 luma in 16-bit fixed point, rounded (Pillow's `rgb2l`). */
export function toLuma(src: Raster): Raster {
  if (src.channels === 1) return src;
  const n = src.width * src.height;
  const out = new Uint8Array(n);
  const d = src.data;
  for (let i = 0; i < n; i++) out[i] = (d[i * 3]! * 19595 + d[i * 3 + 1]! * 38470 + d[i * 3 + 2]! * 7471 + 0x8000) >>> 16;
  return { data: out, width: src.width, height: src.height, channels: 1 };
}
