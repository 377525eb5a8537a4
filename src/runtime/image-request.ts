/**
 * @module The image inputs of a request (img2img `image` + `strength`, inpainting `image` + `mask_image`): checked with
 * the other fields when the body is parsed (parseImageFields, called by request.ts), then read and decoded before the
 * request is queued (resolveImages), so an undecodable image, a mask of another size or an unreadable s3:// object is
 * a 400 naming the field, never a failed generation.
 */
import { createHash } from 'node:crypto';
import { setImmediate as turn } from 'node:timers/promises';
import type { Metadata, Sharp } from 'sharp';
import type { Config, OutputFormat } from '../config.js';
import { RuntimeError } from '../errors.js';
import { formatRefuses, loadSharp } from '../pipeline/image.js';
import { scaledSize } from '../pipeline/img2img.js';
import { lcmMinStrength, lcmTimestepCount, RESIZE_MODES, type GenerationShape, type ImageInit, type ImageMode, type ModelDefaults, type Raster, type ResizeMode } from '../pipeline/job.js';
import { parseS3Object, type S3Url } from '../storage/uri.js';
import type { ImageSource, InputHold } from './image-source.js';
import { readBmp } from './bmp.js';
import { decodeOnThread } from './decode-client.js';
import { firstIfd, oriented, pillowOrientation } from './orientation.js';
import { show, typeName } from './fields.js';

/** The request fields this module parses (V1 instance, WebSocket message, V2 input or parameter). */
export const IMAGE_FIELDS = ['image', 'mask_image', 'strength', 'resize_mode'] as const;

/**
 * Input images are refused above this many pixels (before any resize): 4096 × 4096, 48 MiB of RGB that the job carries
 * to the worker. A 12 MP phone photo fits; larger ones are downscaled by the client.
 */
export const MAX_INPUT_PIXELS = 4096 * 4096;
/**
 * Input images may have at most this many pixels a side: the largest a JPEG can have. Resizing reads a filter window
 * per output pixel as long as the scale factor, so its weights take ~24 bytes per pixel of the input's side: a PNG of
 * 16777216x1 (within MAX_INPUT_PIXELS, 48 KB compressed) made the pipeline worker allocate 400 MB for them.
 */
export const MAX_INPUT_SIDE = 65535;
/** An s3:// input image may have at most this many bytes. */
export const MAX_INPUT_BYTES = 64 * 1024 * 1024;

/**
 * What the input images of all requests in flight may hold at once, in bytes: decoded RGB pixels and s3:// objects read.
 * An image costs its pixels, not its encoded size (a 33 KB lossless WebP decodes to 48 MiB), so without it a request
 * of a few hundred KB held ~800 MB until it finished, and a few such requests at once exhausted the pod's memory. A
 * request's images are reserved before they are read or decoded, and given back when the request ends.
 */
export class InputBudget {
  #used = 0;
  constructor(readonly limit: number) {}
  get used(): number {
    return this.#used;
  }
  /** A reservation for one request: `take` adds to it, `release` gives all of it back (once). */
  hold(): InputHold {
    let held = 0;
    let released = false;
    const mb = (n: number) => `${Math.ceil(n / (1024 * 1024))} MB`;
    return {
      get bytes() {
        return held;
      },
      take: (n: number, field: string) => {
        if (released) throw new RuntimeError('INTERNAL', 'an input image was read after its request ended');
        if (held + n > this.limit) {
          throw new RuntimeError('INVALID_INPUT', `${field}: this request's input images need ${mb(held + n)} (decoded pixels and s3:// bytes), over the ${mb(this.limit)} the server holds for the input images of all requests (INPUT_IMAGES_MB); send smaller images or fewer per request`);
        }
        if (this.#used + n > this.limit) {
          throw new RuntimeError('BUSY', `the input images of requests in progress fill the server's ${mb(this.limit)} for them (INPUT_IMAGES_MB); retry later`, { retryAfter: 5 });
        }
        this.#used += n;
        held += n;
      },
      release: () => {
        if (released) return;
        released = true;
        this.#used -= held;
        held = 0;
      },
    };
  }
}

/** An input image before and after it is read: base64 text (decoded), an s3:// URI, or raw bytes (V2 binary BYTES). */
export interface ImageInput {
  /** The request field, for errors: `instances[0].image`. */
  field: string;
  source: Uint8Array | { uri: string };
  /** Set by resolveImages: RGB pixels as decoded, and the SHA-256 of the encoded bytes (the batch and cache key). */
  raster?: Raster;
  digest?: string;
}

export interface ImageRequest {
  mode: ImageMode;
  strength: number;
  resizeMode: ResizeMode;
  /** The instance, for errors about its size fields: `instances[0]`. */
  at: string;
  /** Given in the request; otherwise the output takes the image's side, rounded down to a multiple of `multiple`. */
  heightGiven: boolean;
  widthGiven: boolean;
  /** The model's ModelDefaults.sizeMultiple (8 when it does not say). */
  multiple: number;
  image: ImageInput;
  mask?: ImageInput;
}

type Obj = Record<string, unknown>;

/** The formats decodeImage reads, for messages. */
const FORMATS = 'PNG, JPEG, WebP, GIF, TIFF or BMP';
const WANT = `a base64-encoded ${FORMATS} image (or a data: URL) or an s3://bucket/key URI`;
// Whitespace may only follow the padding inside the optional group: a \s* after \s-accepting text would backtrack
// quadratically (a 1 MiB run of spaces before a stray character held the event loop for minutes).
const BASE64 = /^[A-Za-z0-9+/\-_\s]*(?:={1,2}\s*)?$/;

/** Why an s3:// input may not be read (input-uris.ts inputRefusal), or undefined; `shown` names it in the message. */
export type S3InputCheck = (loc: S3Url, shown: string) => string | undefined;

/** The bytes or URI a field's value names; problems go to `bad`. */
function imageSource(v: unknown, field: string, bad: string[], checkS3: S3InputCheck): ImageInput['source'] | undefined {
  if (v instanceof Uint8Array) {
    if (v.length === 0) return void bad.push(`${field} is empty`);
    return v;
  }
  if (typeof v !== 'string') return void bad.push(`${field} must be ${WANT}, got ${typeName(v)}`);
  let s = v.trim();
  if (s.length === 0) return void bad.push(`${field} is empty; send ${WANT}`);
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(s)?.[1]?.toLowerCase();
  if (scheme === 's3') {
    const loc = parseS3Object(s);
    if (!loc) return void bad.push(`${field} must look like s3://bucket/key, got ${JSON.stringify(s.slice(0, 100))}`);
    // Before the request is queued and before anything is sent to S3.
    const refused = checkS3(loc, JSON.stringify(s.slice(0, 200)));
    if (refused !== undefined) return void bad.push(`${field}: ${refused}`);
    return { uri: s };
  }
  if (scheme === 'data') {
    const m = /^data:([^;,]*)((?:;[^;,]*)*),/i.exec(s);
    if (!m || !/;base64$/i.test(m[2] ?? '')) return void bad.push(`${field}: a data: URL must be base64 (data:image/png;base64,…)`);
    s = s.slice(m[0].length);
  } else if (scheme !== undefined && s.length < 4096 && /^[a-z][a-z0-9+.-]*:\/\//i.test(s)) {
    // Fetching arbitrary URLs from the server would let any client make it call its own network.
    return void bad.push(`${field}: ${scheme}:// URLs are not fetched; send the image as base64 or as an s3:// URI`);
  }
  if (!BASE64.test(s)) return void bad.push(`${field} is neither base64 nor an s3:// URI; send ${WANT}`);
  const bytes = Buffer.from(s, 'base64');
  if (bytes.length === 0) return void bad.push(`${field} is empty; send ${WANT}`);
  return bytes;
}

const given = (inst: Obj, k: string) => Object.hasOwn(inst, k) && inst[k] !== null && inst[k] !== undefined;

/** The mode an instance asks for by the fields it sends (`image`, and `mask_image` to inpaint); undefined: text-to-image. */
export function imageMode(inst: Obj): ImageMode | undefined {
  if (!given(inst, 'image')) return undefined;
  return given(inst, 'mask_image') ? 'inpaint' : 'img2img';
}

/**
 * The image fields of one instance (V1 instance, WebSocket message, V2 prompt), or undefined for text-to-image.
 * `w` is the instance's path; `steps` its num_inference_steps, `scheduler` its scheduler name (undefined: the model's
 * own). Every problem is pushed onto `bad`.
 */
export function parseImageFields(
  inst: Obj,
  w: string,
  bad: string[],
  defaults: ModelDefaults,
  steps: number,
  checkS3: S3InputCheck,
  scheduler?: string,
): ImageRequest | undefined {
  const has = (k: string) => given(inst, k);
  const mode = imageMode(inst);
  if (mode === undefined) {
    for (const k of ['mask_image', 'strength', 'resize_mode']) if (has(k)) bad.push(`${w}.${k} needs an ${w}.image to work on`);
    if (defaults.inpainting) bad.push(`${w}.image and ${w}.mask_image are required: this is an inpainting model (its UNet takes the mask and the masked image), it cannot generate from text alone`);
    return undefined;
  }
  if (defaults.vaeEncoder === false) {
    bad.push(`${w}.image: this model has no vae_encoder, so it serves text-to-image only; export it again with its VAE encoder (scripts/export-onnx.sh and optimum write vae_encoder/ by default)`);
    return undefined;
  }
  if (mode === 'img2img' && defaults.inpainting) bad.push(`${w}.mask_image is required: this is an inpainting model (its UNet takes the mask and the masked image)`);
  let strength = defaults.modes[mode].strength;
  if (has('strength')) {
    const v = inst.strength;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > 1) bad.push(`${w}.strength must be a number from 0 to 1, got ${show(v)}`);
    else strength = v;
  }
  // Inpainting has no "nothing to denoise" case in diffusers (it raises); image-to-image returns the image re-encoded.
  if (mode === 'inpaint' && Math.min(Math.trunc(steps * strength), steps) < 1) {
    const whose = has('strength') ? '' : ` (not sent: this model's default for inpainting; send strength)`;
    bad.push(`${w}.strength ${strength}${whose} × num_inference_steps ${steps} leaves no denoising step; inpainting needs strength × num_inference_steps >= 1`);
  }
  // LatentConsistencyModelImg2ImgPipeline picks every step from the first int(original · strength) timesteps of the
  // LCM schedule, and raises where they are fewer than the steps (strength 0 too).
  const original = mode === 'img2img' ? defaults.strengthSchedules?.[scheduler ?? ''] : undefined;
  const kept = original === undefined ? undefined : lcmTimestepCount(original, strength);
  if (original !== undefined && kept !== undefined && kept < steps) {
    const whose = has('strength') ? '' : ` (not sent: this model's default for image-to-image)`;
    bad.push(
      `${w}.strength ${strength}${whose} × original_inference_steps ${original} leaves ${kept} of the LCM schedule's timesteps, ` +
        `fewer than num_inference_steps ${steps}: image-to-image on an LCM model takes every step from them; send a strength of at least ${lcmMinStrength(original, steps)}, or fewer steps`,
    );
  }
  let resizeMode: ResizeMode = 'default';
  if (has('resize_mode')) {
    const v = inst.resize_mode;
    if (typeof v !== 'string' || !(RESIZE_MODES as readonly string[]).includes(v)) bad.push(`${w}.resize_mode must be one of ${RESIZE_MODES.join(', ')}, got ${typeof v === 'string' ? JSON.stringify(v.slice(0, 40)) : typeName(v)}`);
    else resizeMode = v as ResizeMode;
  }
  const image = imageSource(inst.image, `${w}.image`, bad, checkS3);
  const mask = mode === 'inpaint' ? imageSource(inst.mask_image, `${w}.mask_image`, bad, checkS3) : undefined;
  if (!image || (mode === 'inpaint' && !mask)) return undefined;
  return {
    mode,
    strength,
    resizeMode,
    at: w,
    heightGiven: has('height'),
    widthGiven: has('width'),
    multiple: defaults.sizeMultiple ?? 8,
    image: { field: `${w}.image`, source: image },
    ...(mask ? { mask: { field: `${w}.mask_image`, source: mask } } : {}),
  };
}

export type ImageFormat = 'png' | 'jpeg' | 'webp' | 'gif' | 'tiff' | 'bmp';

/**
 * The format a file's first bytes announce, by the signatures Pillow tests. SVG, PDF and HEIF are not read (neither
 * does diffusers' Pillow), nor AVIF: Pillow reads it with libavif, libvips with libheif, and their chroma upsampling
 * differs (78% of the values of a smooth 160x120 picture off, by up to 8 levels; up to 66 on a noisy one), so an AVIF
 * would not start from the pixels it starts from in diffusers.
 */
export function sniffFormat(b: Uint8Array): ImageFormat | { other: string } {
  const ascii = (o: number, n: number) => String.fromCharCode(...b.subarray(o, o + n));
  if (b.length >= 8 && b[0] === 0x89 && ascii(1, 3) === 'PNG') return 'png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (b.length >= 12 && ascii(0, 4) === 'RIFF' && ascii(8, 4) === 'WEBP') return 'webp';
  if (ascii(0, 6) === 'GIF87a' || ascii(0, 6) === 'GIF89a') return 'gif';
  if (ascii(0, 2) === 'BM') return 'bmp';
  // Classic and BigTIFF, either byte order.
  if (['II*\0', 'MM\0*', 'II+\0', 'MM\0+'].includes(ascii(0, 4))) return 'tiff';
  if (ascii(4, 4) === 'ftyp') return { other: ['avif', 'avis'].includes(ascii(8, 4)) ? 'an AVIF' : 'an HEIF' };
  if (ascii(0, 5) === '%PDF-') return { other: 'a PDF' };
  if (/^\s*</.test(ascii(0, 64))) return { other: 'markup (SVG/HTML)' };
  return { other: 'not an image format this server reads' };
}

type Decoded = { data: Uint8Array; info: { width: number; height: number; channels: number } };

/**
 * Decodes an input image to RGB as diffusers' load_image does with Pillow: the orientation applied (EXIF, and where
 * Pillow finds it beyond libvips: orientation.ts), alpha dropped (not composited), grey and palette images expanded,
 * CMYK converted by Pillow's formula, the ICC profile ignored; a GIF's first frame composed as Pillow composes it
 * (gif.ts), a BMP read as Pillow reads it (bmp.ts). The pixels are counted and reserved from the header, before they
 * are decoded; a decode waiting for a thread (decode-client.ts) reserves at its turn.
 */
export async function decodeImage(bytes: Uint8Array, field: string, maxPixels = MAX_INPUT_PIXELS, hold?: InputHold, signal?: AbortSignal): Promise<Raster> {
  const fmt = sniffFormat(bytes);
  if (typeof fmt !== 'string') throw new RuntimeError('INVALID_INPUT', `${field} is ${fmt.other}; send a ${FORMATS} image`);
  // One frame: an animated image decodes its first only. `working`: what the decode holds beside the RGB it returns.
  const fits = (width: number, height: number) => {
    if (width * height > maxPixels) throw new Error('Input image exceeds pixel limit');
  };
  const reserve = (width: number, height: number, working = 0) => {
    fits(width, height);
    hold?.take(width * height * 3 + working, field);
  };
  let out: Decoded;
  try {
    if (fmt === 'bmp') {
      const bmp = readBmp(bytes);
      fits(bmp.width, bmp.height);
      // At its turn for a thread, not while it waits for one (a queue of BMPs held their shares unused, refusing other
      // requests): the pixels, the thread's copy of the file, and an RLE file's index per pixel, expanded before the colours.
      const indices = bmp.rle ? bmp.width * bmp.height : 0;
      const atTurn = () => reserve(bmp.width, bmp.height, bytes.length + indices);
      out = { data: await decodeOnThread('bmp', bytes, field, signal, atTurn, indices), info: { width: bmp.width, height: bmp.height, channels: 3 } };
    } else if (fmt === 'gif') out = await decodeGif(bytes, field, maxPixels, reserve, hold, signal);
    else out = await decodeWithSharp(bytes, fmt, maxPixels, reserve);
  } catch (err) {
    throw decodeFailure(err, field, fmt, maxPixels);
  }
  const { data, info } = out;
  if (info.channels !== 3) throw new RuntimeError('INVALID_INPUT', `${field} decoded to ${info.channels} channels, not RGB`);
  if (Math.max(info.width, info.height) > MAX_INPUT_SIDE) {
    throw new RuntimeError('INVALID_INPUT', `${field} is ${info.width}x${info.height}; an input image may have at most ${MAX_INPUT_SIDE} pixels a side`);
  }
  // A buffer of its own: the job carries it to the worker, and cloning a view clones all of its backing store.
  const px = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? new Uint8Array(data.buffer, 0, data.byteLength) : new Uint8Array(data);
  return { data: px, width: info.width, height: info.height, channels: 3 };
}

/** PNG, JPEG, WebP and TIFF, through libvips. */
async function decodeWithSharp(bytes: Uint8Array, fmt: 'png' | 'jpeg' | 'webp' | 'tiff', maxPixels: number, reserve: (width: number, height: number) => void): Promise<Decoded> {
  const sharp = await loadSharp();
  // A TIFF is turned here, as Pillow turns it (orientation.ts): libvips reads no XMP orientation from it.
  const read = sharp(fmt === 'tiff' ? firstPage(bytes) : bytes, { limitInputPixels: maxPixels, autoOrient: fmt !== 'tiff', ignoreIcc: true });
  // The header, read once: its size is reserved before the pixels exist, the colour space chooses the path, and
  // the orientation libvips finds it applies itself (autoOrient); where it finds none, Pillow may (orientation.ts).
  const meta = await read.metadata();
  const img = fmt === 'tiff' || meta.orientation === undefined ? oriented(read, pillowOrientation(bytes, fmt) ?? 1) : read;
  reserve(meta.width ?? 0, meta.pageHeight ?? meta.height ?? 0);
  if ((fmt === 'jpeg' || fmt === 'tiff') && meta.space === 'cmyk') {
    // libvips would convert CMYK through an ICC profile; Pillow's convert("RGB") uses a plain formula (below).
    // 16-bit CMYK (TIFF): Pillow reads the high byte of each sample, where libvips' cast to 8 bits would clip.
    const wide = meta.depth === 'ushort';
    const cmyk = await img.pipelineColourspace('cmyk').toColourspace('cmyk').raw({ depth: wide ? 'ushort' : 'uchar' }).toBuffer({ resolveWithObject: true });
    return { data: cmykToRgb(wide ? highBytes(cmyk.data) : cmyk.data), info: { ...cmyk.info, channels: 3 } };
  }
  if ((fmt === 'png' && isGrey16Png(bytes)) || (fmt === 'tiff' && meta.space === 'grey16' && meta.channels === 1)) {
    // Pillow opens it as I;16, whose convert("RGB") clips each value to 255; libvips would keep the high byte (as
    // Pillow does for 16-bit RGB, RGBA and grey-alpha). A tRNS key (libvips' alpha) is ignored, as by Pillow.
    const grey = await img.removeAlpha().toColourspace('grey16').raw({ depth: 'ushort' }).toBuffer({ resolveWithObject: true });
    return { data: clippedGrey16(grey.data), info: { ...grey.info, channels: 3 } };
  }
  return img.removeAlpha().toColourspace('srgb').raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
}

/**
 * A TIFF cut to its first page, as Pillow reads it: the first IFD's link to the next set to 0 (in a copy). libvips
 * would read every page's IFD to count them, and fail on a later page that claims more data than the file holds, or
 * walk a chain of thousands.
 */
function firstPage(b: Uint8Array): Uint8Array {
  const ifd = firstIfd(b);
  if (!ifd) return b;
  const link = ifd.entries + ifd.entry * ifd.count;
  // A first IFD cut short, or already the last, is left to libvips.
  if (link + ifd.word > b.length || b.subarray(link, link + ifd.word).every((v) => v === 0)) return b;
  const copy = new Uint8Array(b);
  copy.fill(0, link, link + ifd.word);
  return copy;
}

/**
 * A GIF's first frame, found and cut out on a thread (gif.ts gifFirstFrame: its walk of every sub-block and its copy of
 * the frame's data held the event loop 250–360 ms for a 46 MB file of one-byte sub-blocks), decoded alone by libvips and
 * placed by it on the canvas Pillow gives it, off the event loop and straight into the one buffer returned. At its turn
 * for a thread, the thread's copy of the file and the frame's own file cut from it (gif.ts frameGif: at most the file
 * with a 256-colour table and a trailer) are reserved; then, from the header the thread read, the canvas and the RGBA
 * libvips decodes the frame to first (4 bytes a pixel, held until the canvas is written).
 */
async function decodeGif(bytes: Uint8Array, field: string, maxPixels: number, reserve: (width: number, height: number, working?: number) => void, hold?: InputHold, signal?: AbortSignal): Promise<Decoded> {
  const gif = await decodeOnThread('gif', bytes, field, signal, () => hold?.take(2 * bytes.length + 3 * 256 + 1, field));
  reserve(gif.width, gif.height, 4 * gif.frameWidth * gif.frameHeight);
  const sharp = await loadSharp();
  const [r, g, b] = gif.fill;
  const around = { top: gif.top, left: gif.left, bottom: gif.height - gif.top - gif.frameHeight, right: gif.width - gif.left - gif.frameWidth };
  const frame = sharp(gif.frame, { limitInputPixels: maxPixels }).removeAlpha();
  const placed = Object.values(around).some((n) => n > 0) ? frame.extend({ ...around, background: { r, g, b } }) : frame;
  return placed.toColourspace('srgb').raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
}

/**
 * OpenAI's edit mask as this runtime's `mask_image`, a greyscale PNG: white (repaint) where the mask is fully
 * transparent, alpha 0 in 8 bits (OpenAI: "fully transparent areas (e.g. where alpha is zero) indicate where image should
 * be edited"), black elsewhere, a half-transparent brush edge included. A mask with no alpha channel marks nothing: refused.
 */
export async function maskFromAlpha(bytes: Uint8Array, field: string): Promise<Buffer> {
  const fmt = sniffFormat(bytes);
  if (!editFormat(fmt)) throw new RuntimeError('INVALID_INPUT', `${field} is ${typeof fmt === 'string' ? `a ${fmt.toUpperCase()}` : fmt.other}; send a PNG with transparency`);
  const sharp = await loadSharp();
  try {
    const img = sharp(bytes, { limitInputPixels: MAX_INPUT_PIXELS, autoOrient: true });
    const meta = await img.metadata();
    if (!meta.hasAlpha) {
      throw new RuntimeError('INVALID_INPUT', `${field} has no alpha channel: OpenAI's mask marks the area to edit as transparent; send a PNG with transparency`);
    }
    return await alphaZero(img, meta, bytes, fmt);
  } catch (err) {
    throw decodeFailure(err, field, fmt, MAX_INPUT_PIXELS);
  }
}

/**
 * An edit's picture sent without a mask: its own fully transparent area, as maskFromAlpha makes it from a mask (OpenAI's
 * edits before its GPT models: "If mask is not provided, image must have transparency, which will be used as the
 * mask"). Undefined where nothing is transparent (no alpha channel, or no pixel at 0): the whole picture is the edit's.
 * A picture whose header does not read is left for decodeImage to name.
 */
export async function transparentArea(bytes: Uint8Array, field: string): Promise<Buffer | undefined> {
  const fmt = sniffFormat(bytes);
  if (!editFormat(fmt)) return undefined;
  const sharp = await loadSharp();
  const img = sharp(bytes, { limitInputPixels: MAX_INPUT_PIXELS, autoOrient: true });
  const meta = await img.metadata().catch(() => undefined);
  if (!meta?.hasAlpha) return undefined;
  const mask = await alphaZero(img, meta, bytes, fmt).catch((err: unknown) => Promise.reject(decodeFailure(err, field, fmt, MAX_INPUT_PIXELS)));
  return (await sharp(mask).stats()).channels[0]!.max === 255 ? mask : undefined;
}

/** The formats an OpenAI edit's transparency is read from: those OpenAI takes (PNG, JPEG, WebP). */
const editFormat = (fmt: ReturnType<typeof sniffFormat>): fmt is 'png' | 'jpeg' | 'webp' => fmt === 'png' || fmt === 'jpeg' || fmt === 'webp';

/**
 * A greyscale PNG, white where `img`'s alpha is 0 (read as 8 bits), black elsewhere (a half-transparent edge included);
 * turned as decodeImage turns the picture, so that the two stay aligned. `meta`: `img`'s header, read once by the caller.
 */
function alphaZero(img: Sharp, meta: Metadata, bytes: Uint8Array, fmt: 'png' | 'jpeg' | 'webp'): Promise<Buffer> {
  const turned = meta.orientation === undefined ? oriented(img, pillowOrientation(bytes, fmt) ?? 1) : img;
  // threshold(1): 255 where alpha >= 1, then inverted.
  return turned.extractChannel('alpha').threshold(1).negate().png().toBuffer();
}

/** sharp's failure to read `field` as the 400 it is: too many pixels, or the format's own complaint. */
function decodeFailure(err: unknown, field: string, fmt: string, maxPixels: number): unknown {
  if (err instanceof RuntimeError) return err;
  const why = String((err as Error)?.message ?? err).split('\n')[0]!.slice(0, 200);
  if (/pixel limit/i.test(why)) return new RuntimeError('INVALID_INPUT', `${field} has more than ${maxPixels} pixels, the most an input image may have`);
  return new RuntimeError('INVALID_INPUT', `${field} could not be decoded as ${fmt.toUpperCase()}: ${why}`);
}

/** A PNG of 16-bit grey samples: IHDR, always the first chunk, gives bit depth 16 and colour type 0 (no alpha channel). */
const isGrey16Png = (png: Uint8Array): boolean => png.length > 25 && png[24] === 16 && png[25] === 0;

/** libvips' raw ushort samples, in native byte order: read through a Uint16Array (a copy where the bytes are unaligned). */
function ushorts(samples: Buffer): Uint16Array {
  const aligned = samples.byteOffset % 2 === 0 ? samples : Buffer.from(samples);
  return new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.length >> 1);
}

/** The high byte of each 16-bit sample. */
function highBytes(samples: Buffer): Buffer {
  const v = ushorts(samples);
  const out = Buffer.allocUnsafe(v.length);
  for (let i = 0; i < v.length; i++) out[i] = v[i]! >> 8;
  return out;
}

/** Pillow's I;16 → RGB (Convert.c I16_RGB): each sample clipped to 255, written to all three channels. */
function clippedGrey16(samples: Buffer): Buffer {
  const v = ushorts(samples);
  const rgb = Buffer.allocUnsafe(v.length * 3);
  for (let i = 0; i < v.length; i++) rgb[i * 3] = rgb[i * 3 + 1] = rgb[i * 3 + 2] = Math.min(v[i]!, 255);
  return rgb;
}

/** Pillow's CMYK → RGB (Convert.c cmyk2rgb): no colour management, each channel (255 − K)(1 − C/255) in its integer rounding. */
function cmykToRgb(cmyk: Buffer): Buffer {
  const n = cmyk.length >> 2;
  const rgb = Buffer.allocUnsafe(n * 3);
  for (let i = 0; i < n; i++) {
    const nk = 255 - cmyk[i * 4 + 3]!;
    for (let c = 0; c < 3; c++) {
      const t = cmyk[i * 4 + c]! * nk + 128;
      rgb[i * 3 + c] = nk - (((t >> 8) + t) >> 8);
    }
  }
  return rgb;
}

/** A parsed request as far as its image inputs go (runtime/request.ts's GenerationRequest). */
export interface WithImage {
  image?: ImageRequest;
  shape: Pick<GenerationShape, 'height' | 'width'>;
  /** The format the output is encoded in: a size taken from the image must fit it. */
  output?: { format: OutputFormat };
}

export interface ImageContext {
  cfg: Pick<Config, 'maxImageSize'>;
  source: ImageSource;
  /** The request's share of the InputBudget: every image's bytes are taken from it before they are read or decoded. */
  hold?: InputHold;
}

/**
 * Reads and decodes every input image of `reqs` (each distinct source once), checks mask sizes, and gives requests
 * without height/width the image's size (rounded down to a multiple of 8, as VaeImageProcessor does). Every problem
 * of the body is reported together as one INVALID_INPUT; storage outages and cancellation pass through.
 */
export async function resolveImages(reqs: readonly WithImage[], ctx: ImageContext, signal?: AbortSignal): Promise<void> {
  const withImages = reqs.filter((r) => r.image);
  if (withImages.length === 0) return;
  const bad: string[] = [];
  // Each distinct image once: the same bytes in several instances (a V2 input with one element for n prompts) or the
  // same s3:// URI.
  const memo = new Map<string, Promise<{ raster: Raster; digest: string }>>();
  const load = (inp: ImageInput, key: string) => {
    const src = inp.source;
    let p = memo.get(key);
    if (!p) {
      p = (async () => {
        const bytes = src instanceof Uint8Array ? src : await ctx.source.read(src.uri, inp.field, MAX_INPUT_BYTES, signal, ctx.hold);
        return { raster: await decodeImage(bytes, inp.field, MAX_INPUT_PIXELS, ctx.hold, signal), digest: key.startsWith('sha256:') ? key.slice(7) : await sha256Hex(bytes) };
      })();
      memo.set(key, p);
    }
    return p;
  };
  const inputs = withImages.flatMap((r) => [r.image!.image, ...(r.image!.mask ? [r.image!.mask] : [])]);
  const keys = await Promise.all(inputs.map(async ({ source: src }) => (src instanceof Uint8Array ? `sha256:${await sha256Hex(src)}` : `uri:${src.uri}`)));
  const settled = await Promise.allSettled(inputs.map(async (inp, i) => Object.assign(inp, await load(inp, keys[i]!))));
  for (const s of settled) {
    if (s.status === 'fulfilled') continue;
    const err = s.reason as unknown;
    if (err instanceof RuntimeError && err.code === 'INVALID_INPUT') bad.push(err.message);
    else throw err;
  }
  for (const r of withImages) {
    const im = r.image!;
    const img = im.image.raster;
    if (!img) continue;
    const mask = im.mask?.raster;
    if (mask && (mask.width !== img.width || mask.height !== img.height)) {
      bad.push(`${im.mask!.field} is ${mask.width}x${mask.height} but ${im.image.field} is ${img.width}x${img.height}; they must have the same size`);
    }
    let sized = true;
    for (const [side, given, px] of [['height', im.heightGiven, img.height], ['width', im.widthGiven, img.width]] as const) {
      if (given) continue;
      // VaeImageProcessor rounds to 8; a model whose exported UNet needs more gets its multiple, as diffusers' ONNX
      // image-to-image pipeline rounds to 64.
      const v = px - (px % im.multiple);
      sized &&= v >= im.multiple && v <= ctx.cfg.maxImageSize;
      if (v < im.multiple) bad.push(`${im.image.field} is ${img.width}x${img.height}; an input image needs at least ${im.multiple} pixels a side for this model`);
      else if (v > ctx.cfg.maxImageSize) {
        bad.push(`${im.image.field} is ${img.width}x${img.height}: without ${im.at}.${side} the output takes the image's ${side} (${v}), over MAX_IMAGE_SIZE ${ctx.cfg.maxImageSize}; give ${im.at}.height and ${im.at}.width to resize it`);
      } else r.shape[side] = v;
    }
    const unfit = sized && r.output ? formatRefuses(r.output.format, r.shape.height, r.shape.width) : undefined;
    if (unfit !== undefined) bad.push(`${im.image.field} is ${img.width}x${img.height}: ${unfit}`);
    // Pillow refuses to resize to a side of 0 (diffusers raises): "fill" of an image more elongated than the output.
    const fit = scaledSize(img.width, img.height, r.shape.width, r.shape.height, im.resizeMode);
    if (sized && (fit.width < 1 || fit.height < 1)) {
      bad.push(`${im.image.field} is ${img.width}x${img.height}: resize_mode "fill" would scale it to ${fit.width}x${fit.height} to fit ${r.shape.width}x${r.shape.height}; use resize_mode "crop" or "default", or a less elongated image`);
    }
  }
  if (bad.length > 0) throw new RuntimeError('INVALID_INPUT', [...new Set(bad)].join('; '));
}

/** What must be equal for two requests to share a generation batch (and the result cache): mode, inputs, strength. */
export function imageKey(req: Pick<WithImage, 'image'>): string {
  const im = req.image;
  if (!im) return 'text';
  return `${im.mode}|${im.strength}|${im.resizeMode}|${im.image.digest ?? '?'}|${im.mask?.digest ?? ''}`;
}

/** The job's image inputs, for the worker (pixels as decoded; the worker resizes and encodes them). */
export function jobInit(im: ImageRequest): ImageInit {
  if (!im.image.raster || (im.mask && !im.mask.raster)) throw new RuntimeError('INTERNAL', 'an image request reached the queue before its images were read');
  return { mode: im.mode, strength: im.strength, resizeMode: im.resizeMode, image: im.image.raster, ...(im.mask ? { mask: im.mask.raster! } : {}) };
}

/** An inpainting request on a mid-grey image with everything repainted: the warm-up of a model that can only inpaint. */
export function warmupInpaint(width: number, height: number): ImageRequest {
  const grey: Raster = { data: new Uint8Array(width * height * 3).fill(128), width, height, channels: 3 };
  const white: Raster = { data: new Uint8Array(width * height * 3).fill(255), width, height, channels: 3 };
  return {
    mode: 'inpaint', strength: 1, resizeMode: 'default', at: 'warm-up', heightGiven: true, widthGiven: true, multiple: 8,
    image: { field: 'warm-up', source: grey.data, raster: grey, digest: 'warm-up-image' },
    mask: { field: 'warm-up', source: white.data, raster: white, digest: 'warm-up-mask' },
  };
}

/** The bytes sha256Hex hashes per turn of the event loop: a few ms each, where a large input at once held it tens. */
const HASH_PIECE = 4 << 20;

/** The SHA-256 of `bytes` (hex), a piece per turn, so a large input does not hold probes and other requests' I/O. */
export async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const hash = createHash('sha256');
  for (let at = 0; at < bytes.length; at += HASH_PIECE) {
    if (at > 0) await turn();
    hash.update(bytes.subarray(at, at + HASH_PIECE));
  }
  return hash.digest('hex');
}
