"""Writes test/fixtures/reference/img2img/decode/: small input pictures of the kinds clients send, and what diffusers'
own `load_image` (Pillow: `ImageOps.exif_transpose`, then `convert("RGB")`) makes of each, for
test/img2img-preprocess.test.ts.

    git --git-dir=<diffusers mirror> archive HEAD src/diffusers | tar x -C /tmp/diffusers-src
    PYTHONPATH=/tmp/diffusers-src/src python scripts/make-decode-reference.py OUT_DIR

Needs Pillow and numpy (diffusers' import needs torch). Everything is seeded: the same Pillow writes the same files.
OUT_DIR/index.json lists each input, how it was made, and `<input>.rgb.png`, Pillow's decode as an RGB PNG;
`<input>.alpha0.png` (where listed) is white where the oriented picture's alpha is 0, the area an OpenAI edit repaints.
"""
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL
from PIL import Image, ImageOps

import diffusers
from diffusers.utils import load_image


def picture(w, h, seed):
    """Gradients and noise: every pixel differs from its neighbours, so a wrong flip or turn shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 37 + y * 11) % 256], -1) + rng.integers(-20, 21, (h, w, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def saved(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def exif(orientation=None, **tags):
    e = Image.Exif()
    if orientation is not None:
        e[0x0112] = orientation
    for k, v in tags.items():
        e[getattr(Image.ExifTags.Base, k)] = v
    return e.tobytes()


def xmp(orientation, element=False):
    """An XMP packet with tiff:Orientation as an attribute (Lightroom, exiftool) or as an element."""
    o = f"<tiff:Orientation>{orientation}</tiff:Orientation>" if element else ""
    attr = "" if element else f' tiff:Orientation="{orientation}"'
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"{attr}>{o}</rdf:Description>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_profile_exif(e):
    """ImageMagick's PNG text chunk for an EXIF profile: a newline, the name, the length, then hex in 72-column lines."""
    h = e.hex()
    return f"\nexif\n{len(e):8d}\n" + "\n".join(h[i : i + 72] for i in range(0, len(h), 72)) + "\n"


def with_chunks(png, before_idat=b"", before_iend=b""):
    """PNG bytes with chunks added after IHDR (33 bytes in) and before IEND."""
    iend = len(png) - 12
    return png[:33] + before_idat + png[33:iend] + before_iend + png[iend:]


def ztxt(key, text):
    return chunk(b"zTXt", key + b"\0\0" + zlib.compress(text.encode()))


def cases():
    """(input name, how it was made, bytes, also write the alpha-0 mask)."""
    pic = Image.fromarray(picture(15, 9, 1))
    png = saved(pic, "PNG")
    # Orientation where libvips reads none but Pillow 12's getexif() finds one (exif_transpose applies it).
    yield "jpeg-xmp-6.jpg", "JPEG (quality 90), no EXIF, XMP tiff:Orientation=\"6\"", saved(pic, "JPEG", quality=90, xmp=xmp(6)), False
    yield "jpeg-exif-no-orientation-xmp-8.jpg", "JPEG, EXIF without an orientation (Software), XMP <tiff:Orientation>8", saved(pic, "JPEG", quality=90, exif=exif(Software="x"), xmp=xmp(8, element=True)), False
    yield "jpeg-exif-1-xmp-6.jpg", "JPEG, EXIF orientation 1 and XMP 6: the EXIF's wins, nothing turns", saved(pic, "JPEG", quality=90, exif=exif(1), xmp=xmp(6)), False
    yield "webp-xmp-7.webp", "lossless WebP, XMP chunk with tiff:Orientation 7", saved(pic, "WEBP", lossless=True, xmp=xmp(7)), False
    yield "png-xmp-5.png", "PNG, iTXt XML:com.adobe.xmp with <tiff:Orientation>5", with_chunks(png, chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp(5, element=True))), False
    for o in range(1, 9):
        yield f"png-raw-exif-{o}.png", f"PNG, EXIF orientation {o} in a zTXt \"Raw profile type exif\" (as ImageMagick writes it)", with_chunks(png, ztxt(b"Raw profile type exif", raw_profile_exif(exif(o)))), False
    yield "png-raw-exif-text-3.png", "PNG, the raw profile (orientation 3) in a tEXt chunk", with_chunks(png, chunk(b"tEXt", b"Raw profile type exif\0" + raw_profile_exif(exif(3)).encode())), False
    yield "png-exif-after-idat-8.png", "PNG, eXIf chunk (orientation 8) after IDAT", with_chunks(png, before_iend=chunk(b"eXIf", exif(8)[6:])), False
    yield "png-exif-no-orientation-raw-exif-6.png", "PNG, eXIf without an orientation and a raw profile with 6: the eXIf is the EXIF, nothing turns", with_chunks(png, chunk(b"eXIf", exif(Software="x")[6:]) + ztxt(b"Raw profile type exif", raw_profile_exif(exif(6)))), False
    rgba = np.dstack([picture(15, 9, 2), np.full((9, 15), 255, np.uint8)])
    rgba[1:4, 2:9, 3] = 0
    rgba[5:8, 10:14, 3] = 128
    yield "png-rgba-raw-exif-6.png", "RGBA PNG with transparent and half-transparent areas, raw profile orientation 6", with_chunks(saved(Image.fromarray(rgba, "RGBA"), "PNG"), ztxt(b"Raw profile type exif", raw_profile_exif(exif(6)))), True


def main(out):
    os.makedirs(out, exist_ok=True)
    index = {"pillow": PIL.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__, "cases": []}
    for name, made, data, alpha in cases():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        rgb = load_image(path)
        rgb.save(path + ".rgb.png")
        entry = {"input": name, "made": made, "expected": name + ".rgb.png", "size": list(rgb.size)}
        if alpha:
            a = np.asarray(ImageOps.exif_transpose(Image.open(path)).getchannel("A"))
            Image.fromarray(np.where(a == 0, 255, 0).astype(np.uint8)).save(path + ".alpha0.png")
            entry["alpha0"] = name + ".alpha0.png"
        index["cases"].append(entry)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
