"""Writes test/fixtures/reference/img2img/decode/: small input pictures of the kinds clients send, and what diffusers'
own `load_image` (Pillow: `ImageOps.exif_transpose`, then `convert("RGB")`) makes of each, for
test/img2img-preprocess.test.ts.

    git --git-dir=<diffusers mirror> archive HEAD src/diffusers | tar x -C /tmp/diffusers-src
    PYTHONPATH=/tmp/diffusers-src/src python scripts/make-decode-reference.py OUT_DIR

Needs Pillow and numpy (diffusers' import needs torch), and for the GIF, TIFF and BMP variants Pillow does not write,
ImageMagick's convert, libtiff's tiffcp and tiffset, and gifsicle (Debian: imagemagick, libtiff-tools, gifsicle).
Everything is seeded: the same Pillow and tools write the same files.
OUT_DIR/index.json lists each input, how it was made, and `<input>.rgb.png`, Pillow's decode as an RGB PNG;
`<input>.alpha0.png` (where listed) is white where the oriented picture's alpha is 0, the area an OpenAI edit repaints.
"""
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
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


# A minimal baseline JPEG writer (the standard tables and Huffman codes of the JPEG spec's annex K), for what Pillow's
# writer cannot make: Photoshop's YCCK (Adobe transform 2) and the 4:4:0 and 4:1:1 subsamplings cameras and lossless
# rotations produce.
ZZ=[0,1,8,16,9,2,3,10,17,24,32,25,18,11,4,5,12,19,26,33,40,48,41,34,27,20,13,6,7,14,21,28,35,42,49,56,57,50,43,36,29,22,15,23,30,37,44,51,58,59,52,45,38,31,39,46,53,60,61,54,47,55,62,63]
QL=[16,11,10,16,24,40,51,61,12,12,14,19,26,58,60,55,14,13,16,24,40,57,69,56,14,17,22,29,51,87,80,62,18,22,37,56,68,109,103,77,24,35,55,64,81,104,113,92,49,64,78,87,103,121,120,101,72,92,95,98,112,100,103,99]
QC=[17,18,24,47,99,99,99,99,18,21,26,66,99,99,99,99,24,26,56,99,99,99,99,99,47,66,99,99,99,99,99,99]+[99]*32
DC_L=([0,1,5,1,1,1,1,1,1,0,0,0,0,0,0,0],list(range(12)))
DC_C=([0,3,1,1,1,1,1,1,1,1,1,0,0,0,0,0],list(range(12)))
AC_L=([0,2,1,3,3,2,4,3,5,5,4,4,0,0,1,0x7d],[0x01,0x02,0x03,0x00,0x04,0x11,0x05,0x12,0x21,0x31,0x41,0x06,0x13,0x51,0x61,0x07,0x22,0x71,0x14,0x32,0x81,0x91,0xa1,0x08,0x23,0x42,0xb1,0xc1,0x15,0x52,0xd1,0xf0,0x24,0x33,0x62,0x72,0x82,0x09,0x0a,0x16,0x17,0x18,0x19,0x1a,0x25,0x26,0x27,0x28,0x29,0x2a,0x34,0x35,0x36,0x37,0x38,0x39,0x3a,0x43,0x44,0x45,0x46,0x47,0x48,0x49,0x4a,0x53,0x54,0x55,0x56,0x57,0x58,0x59,0x5a,0x63,0x64,0x65,0x66,0x67,0x68,0x69,0x6a,0x73,0x74,0x75,0x76,0x77,0x78,0x79,0x7a,0x83,0x84,0x85,0x86,0x87,0x88,0x89,0x8a,0x92,0x93,0x94,0x95,0x96,0x97,0x98,0x99,0x9a,0xa2,0xa3,0xa4,0xa5,0xa6,0xa7,0xa8,0xa9,0xaa,0xb2,0xb3,0xb4,0xb5,0xb6,0xb7,0xb8,0xb9,0xba,0xc2,0xc3,0xc4,0xc5,0xc6,0xc7,0xc8,0xc9,0xca,0xd2,0xd3,0xd4,0xd5,0xd6,0xd7,0xd8,0xd9,0xda,0xe1,0xe2,0xe3,0xe4,0xe5,0xe6,0xe7,0xe8,0xe9,0xea,0xf1,0xf2,0xf3,0xf4,0xf5,0xf6,0xf7,0xf8,0xf9,0xfa])
AC_C=([0,2,1,2,4,4,3,4,7,5,4,4,0,1,2,0x77],[0x00,0x01,0x02,0x03,0x11,0x04,0x05,0x21,0x31,0x06,0x12,0x41,0x51,0x07,0x61,0x71,0x13,0x22,0x32,0x81,0x08,0x14,0x42,0x91,0xa1,0xb1,0xc1,0x09,0x23,0x33,0x52,0xf0,0x15,0x62,0x72,0xd1,0x0a,0x16,0x24,0x34,0xe1,0x25,0xf1,0x17,0x18,0x19,0x1a,0x26,0x27,0x28,0x29,0x2a,0x35,0x36,0x37,0x38,0x39,0x3a,0x43,0x44,0x45,0x46,0x47,0x48,0x49,0x4a,0x53,0x54,0x55,0x56,0x57,0x58,0x59,0x5a,0x63,0x64,0x65,0x66,0x67,0x68,0x69,0x6a,0x73,0x74,0x75,0x76,0x77,0x78,0x79,0x7a,0x82,0x83,0x84,0x85,0x86,0x87,0x88,0x89,0x8a,0x92,0x93,0x94,0x95,0x96,0x97,0x98,0x99,0x9a,0xa2,0xa3,0xa4,0xa5,0xa6,0xa7,0xa8,0xa9,0xaa,0xb2,0xb3,0xb4,0xb5,0xb6,0xb7,0xb8,0xb9,0xba,0xc2,0xc3,0xc4,0xc5,0xc6,0xc7,0xc8,0xc9,0xca,0xd2,0xd3,0xd4,0xd5,0xd6,0xd7,0xd8,0xd9,0xda,0xe2,0xe3,0xe4,0xe5,0xe6,0xe7,0xe8,0xe9,0xea,0xf2,0xf3,0xf4,0xf5,0xf6,0xf7,0xf8,0xf9,0xfa])
def codes(t):
    bits,vals=t; out={}; code=0; k=0
    for l in range(1,17):
        for _ in range(bits[l-1]): out[vals[k]]=(code,l); code+=1; k+=1
        code<<=1
    return out
def seg(m,d): return struct.pack('>BBH',0xFF,m,len(d)+2)+d
DCT=np.array([[np.sqrt((1 if u==0 else 2)/8)*np.cos((2*x+1)*u*np.pi/16) for x in range(8)] for u in range(8)])
def jpeg(planes, sampling, kinds, app14=None, app1=b''):
    """Baseline JPEG of full-resolution planes (C x H x W uint8) with per-component sampling factors [(h, v)], each
    subsampled component averaged over its box. kinds: 'L' or 'C' per component (quantisation and Huffman tables).
    app14: None (no Adobe marker) or its transform (2: YCCK). app1: an APP1 segment's data (EXIF)."""
    nc,h,w=planes.shape
    hmax=max(s[0] for s in sampling); vmax=max(s[1] for s in sampling)
    mw=8*hmax; mh=8*vmax; W=(w+mw-1)//mw*mw; H=(h+mh-1)//mh*mh
    full=np.pad(planes.astype(np.float64),((0,0),(0,H-h),(0,W-w)),mode='edge')
    comp=[]
    for c in range(nc):
        fx=hmax//sampling[c][0]; fy=vmax//sampling[c][1]
        comp.append(full[c].reshape(H//fy,fy,W//fx,fx).mean((1,3)))
    t=[0 if k=='L' else 1 for k in kinds]
    qt=[QL if k=='L' else QC for k in kinds]
    out=b'\xff\xd8'
    if app1: out+=seg(0xE1,app1)
    if app14 is not None: out+=seg(0xEE,b'Adobe'+struct.pack('>HHHB',100,0,0,app14))
    out+=seg(0xDB,bytes([0])+bytes(QL[ZZ[i]] for i in range(64))+bytes([1])+bytes(QC[ZZ[i]] for i in range(64)))
    out+=seg(0xC0,struct.pack('>BHHB',8,h,w,nc)+b''.join(struct.pack('>BBB',i+1,sampling[i][0]<<4|sampling[i][1],t[i]) for i in range(nc)))
    for cls,idx,tb in [(0,0,DC_L),(0,1,DC_C),(1,0,AC_L),(1,1,AC_C)]:
        out+=seg(0xC4,bytes([cls<<4|idx])+bytes(tb[0])+bytes(tb[1]))
    out+=seg(0xDA,bytes([nc])+b''.join(bytes([i+1,t[i]<<4|t[i]]) for i in range(nc))+bytes([0,63,0]))
    dc=[codes(DC_L),codes(DC_C)]; ac=[codes(AC_L),codes(AC_C)]
    acc=0; n=0; data=bytearray()
    def put(v,l):
        nonlocal acc,n
        acc=(acc<<l)|(v&((1<<l)-1)); n+=l
        while n>=8:
            b=(acc>>(n-8))&0xFF; data.append(b)
            if b==0xFF: data.append(0)
            n-=8
    def mag(v):
        s=int(abs(v)).bit_length(); return s, (v if v>=0 else v+(1<<s)-1)
    pred=[0]*nc
    for my in range(H//mh):
        for mx in range(W//mw):
            for c in range(nc):
                hc,vc=sampling[c]
                for v in range(vc):
                    for hh in range(hc):
                        by=(my*vc+v)*8; bx=(mx*hc+hh)*8
                        blk=comp[c][by:by+8,bx:bx+8]-128
                        z=np.round((DCT@blk@DCT.T)/np.array(qt[c]).reshape(8,8)).astype(int).reshape(-1)[ZZ]
                        d=z[0]-pred[c]; pred[c]=z[0]
                        s,m=mag(d); code,l=dc[t[c]][s]; put(code,l)
                        if s: put(m,s)
                        run=0
                        for k in range(1,64):
                            if z[k]==0: run+=1; continue
                            while run>15: code,l=ac[t[c]][0xF0]; put(code,l); run-=16
                            s,m=mag(z[k]); code,l=ac[t[c]][(run<<4)|s]; put(code,l); put(m,s); run=0
                        if run: code,l=ac[t[c]][0x00]; put(code,l)
    if n: put((1<<(8-n))-1,8-n)
    return out+bytes(data)+b'\xff\xd9'


def png_raw(samples, color_type, depth):
    """A PNG of 16-bit samples (Pillow writes only grey at 16 bits)."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def icc_rgb(description, primaries):
    """A matrix/TRC RGB profile (gamma 2.2) with these primaries' XYZ: enough for libvips to apply it if it did."""
    s15 = lambda v: struct.pack(">i", round(v * 65536))
    xyz = lambda x, y, z: b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)
    curv = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    text = description.encode() + b"\0"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 79), (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    tags += [(k, xyz(*p)) for k, p in zip((b"rXYZ", b"gXYZ", b"bXYZ"), primaries)] + [(b"rTRC", curv), (b"gTRC", curv), (b"bTRC", curv), (b"cprt", b"text\0\0\0\0none\0")]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, d in tags:
        d += b"\0" * (-len(d) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(d))
        data += d
    body = struct.pack(">I", len(tags)) + table + data
    head = struct.pack(">I", 128 + len(body)) + b"none" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + b"acspAPPL" + b"\0" * 24
    head += s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    return head + body


def cases():
    """(input name, how it was made, bytes, extras: alpha0 to write the alpha-0 mask)."""
    pic = Image.fromarray(picture(15, 9, 1))
    png = saved(pic, "PNG")
    # Orientation where libvips reads none but Pillow 12's getexif() finds one (exif_transpose applies it).
    yield "jpeg-xmp-6.jpg", "JPEG (quality 90), no EXIF, XMP tiff:Orientation=\"6\"", saved(pic, "JPEG", quality=90, xmp=xmp(6)), {}
    yield "jpeg-exif-no-orientation-xmp-8.jpg", "JPEG, EXIF without an orientation (Software), XMP <tiff:Orientation>8", saved(pic, "JPEG", quality=90, exif=exif(Software="x"), xmp=xmp(8, element=True)), {}
    yield "jpeg-exif-1-xmp-6.jpg", "JPEG, EXIF orientation 1 and XMP 6: the EXIF's wins, nothing turns", saved(pic, "JPEG", quality=90, exif=exif(1), xmp=xmp(6)), {}
    yield "webp-xmp-7.webp", "lossless WebP, XMP chunk with tiff:Orientation 7", saved(pic, "WEBP", lossless=True, xmp=xmp(7)), {}
    yield "png-xmp-5.png", "PNG, iTXt XML:com.adobe.xmp with <tiff:Orientation>5", with_chunks(png, chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp(5, element=True))), {}
    for o in range(1, 9):
        yield f"png-raw-exif-{o}.png", f"PNG, EXIF orientation {o} in a zTXt \"Raw profile type exif\" (as ImageMagick writes it)", with_chunks(png, ztxt(b"Raw profile type exif", raw_profile_exif(exif(o)))), {}
    yield "png-raw-exif-text-3.png", "PNG, the raw profile (orientation 3) in a tEXt chunk", with_chunks(png, chunk(b"tEXt", b"Raw profile type exif\0" + raw_profile_exif(exif(3)).encode())), {}
    yield "png-exif-after-idat-8.png", "PNG, eXIf chunk (orientation 8) after IDAT", with_chunks(png, before_iend=chunk(b"eXIf", exif(8)[6:])), {}
    yield "png-exif-no-orientation-raw-exif-6.png", "PNG, eXIf without an orientation and a raw profile with 6: the eXIf is the EXIF, nothing turns", with_chunks(png, chunk(b"eXIf", exif(Software="x")[6:]) + ztxt(b"Raw profile type exif", raw_profile_exif(exif(6)))), {}
    rgba = np.dstack([picture(15, 9, 2), np.full((9, 15), 255, np.uint8)])
    rgba[1:4, 2:9, 3] = 0
    rgba[5:8, 10:14, 3] = 128
    yield "png-rgba-raw-exif-6.png", "RGBA PNG with transparent and half-transparent areas, raw profile orientation 6", with_chunks(saved(Image.fromarray(rgba, "RGBA"), "PNG"), ztxt(b"Raw profile type exif", raw_profile_exif(exif(6)))), {"alpha0": True}

    # What phones and tools send, decoded as Pillow does without any help (checked so that it stays so).
    big = Image.fromarray(picture(45, 37, 3))
    ycc = np.asarray(big.convert("YCbCr")).transpose(2, 0, 1)
    for tag, sampling in [("422", [(2, 1), (1, 1), (1, 1)]), ("440", [(1, 2), (1, 1), (1, 1)]), ("411", [(4, 1), (1, 1), (1, 1)])]:
        yield f"jpeg-{tag}.jpg", f"JPEG {tag[0]}:{tag[1]}:{tag[2]} (this script's writer)", jpeg(ycc, sampling, "LCC"), {}
    yield "jpeg-420-progressive.jpg", "progressive JPEG, quality 85, 4:2:0", saved(big, "JPEG", quality=85, progressive=True), {}
    mm = b"Exif\0\0MM\0*" + struct.pack(">IHHHIII", 8, 1, 0x0112, 3, 1, 6 << 16, 0)
    yield "jpeg-exif-big-endian-6.jpg", "JPEG, big-endian EXIF (as iPhones write it) with orientation 6", jpeg(ycc, [(2, 2), (1, 1), (1, 1)], "LCC", app1=mm), {}
    yield "jpeg-grey.jpg", "greyscale JPEG", saved(big.convert("L"), "JPEG", quality=90), {}
    cmyk = np.asarray(big.convert("CMYK")).astype(np.float64)
    r, g, b = (255 - cmyk[..., i] for i in range(3))
    planes = [0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128, 0.5 * r - 0.418688 * g - 0.081312 * b + 128, cmyk[..., 3] + np.random.default_rng(4).integers(0, 60, cmyk.shape[:2])]
    ycck = np.clip(np.round(np.stack(planes)), 0, 255).astype(np.uint8)
    yield "jpeg-ycck.jpg", "YCCK JPEG with Adobe's marker (transform 2), as Photoshop writes CMYK", jpeg(ycck, [(1, 1)] * 4, "LCCL", app14=2), {}
    yield "jpeg-ycck-exif-8.jpg", "the YCCK JPEG with EXIF orientation 8", jpeg(ycck, [(1, 1)] * 4, "LCCL", app14=2, app1=exif(8)), {}
    adobe = saved(big.convert("CMYK"), "JPEG", quality=90)
    at = adobe.index(b"\xff\xee")
    yield "jpeg-cmyk-no-adobe-marker.jpg", "Pillow's CMYK JPEG with its Adobe APP14 segment removed", adobe[:at] + adobe[at + 2 + struct.unpack(">H", adobe[at + 2 : at + 4])[0] :], {}
    p3 = icc_rgb("Display P3 (test)", [(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)])
    adobe_rgb = icc_rgb("Adobe RGB (test)", [(0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446)])
    yield "jpeg-p3.jpg", "JPEG with a Display P3 profile (phones)", saved(pic, "JPEG", quality=90, icc_profile=p3), {}
    yield "png-adobe-rgb.png", "PNG with an Adobe RGB profile (iCCP)", saved(pic, "PNG", icc_profile=adobe_rgb), {}
    yield "webp-p3.webp", "lossy WebP with a Display P3 profile", saved(pic, "WEBP", quality=80, icc_profile=p3), {}
    yield "png-gamma-1.png", "PNG with gAMA 1.0 (Pillow and libvips ignore it)", with_chunks(png, chunk(b"gAMA", struct.pack(">I", 100000))), {}
    grey = Image.fromarray(picture(15, 9, 5)[..., 0])
    yield "png-1-bit.png", "1-bit PNG", saved(grey.convert("1"), "PNG"), {}
    yield "png-grey-trns.png", "grey PNG with a tRNS grey key", saved(grey, "PNG", transparency=int(np.asarray(grey)[0, 0])), {}
    yield "png-la.png", "grey and alpha PNG", saved(Image.merge("LA", [grey, Image.fromarray(picture(15, 9, 6)[..., 1])]), "PNG"), {}
    palette = Image.fromarray(picture(15, 9, 7)).quantize(40)
    yield "png-palette-trns.png", "palette PNG, tRNS with several alpha levels", saved(palette, "PNG", transparency=bytes(range(0, 240, 6))), {}
    yield "png-rgba.png", "RGBA PNG (alpha dropped, not composited)", saved(Image.fromarray(rgba, "RGBA"), "PNG"), {}
    s16 = picture(15, 9, 8).astype(np.uint16) * 257 + np.random.default_rng(9).integers(0, 257, (9, 15, 3)).astype(np.uint16)
    a16 = np.random.default_rng(10).integers(0, 65536, (9, 15, 1)).astype(np.uint16)
    yield "png-16-bit-rgb.png", "16-bit RGB PNG", png_raw(s16, 2, 16), {}
    yield "png-16-bit-rgba.png", "16-bit RGBA PNG", png_raw(np.concatenate([s16, a16], 2), 6, 16), {}
    yield "png-16-bit-grey-alpha.png", "16-bit grey and alpha PNG", png_raw(np.concatenate([s16[..., :1], a16], 2), 4, 16), {}
    yield "png-16-bit-grey.png", "16-bit grey PNG (Pillow's I;16: convert(\"RGB\") clips each value to 255)", png_raw(s16[..., 0], 0, 16), {}
    low = np.random.default_rng(13).integers(0, 600, (9, 15)).astype(np.uint16)
    key = chunk(b"tRNS", struct.pack(">H", int(low[0, 0])))
    yield "png-16-bit-grey-trns.png", "16-bit grey PNG of values 0 to 599 with a tRNS key (clipped to 255, the key ignored)", with_chunks(png_raw(low, 0, 16), key), {}
    frames = [Image.fromarray(np.dstack([picture(15, 9, 11 + i), np.full((9, 15), 255, np.uint8)]), "RGBA") for i in range(2)]
    edge = np.asarray(frames[0]).copy()
    edge[:, :4, 3] = 0
    frames[0] = Image.fromarray(edge, "RGBA")
    yield "png-animated.png", "APNG of 2 frames (the first is decoded)", saved(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100), {}
    yield "webp-animated.webp", "animated lossy WebP whose first frame covers part of the canvas, background red", saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=80, background=(255, 0, 0, 255)), {}
    yield "webp-lossless-rgba.webp", "lossless WebP with alpha (exact: colour kept under alpha 0)", saved(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True), {}
    yield "png-1x1.png", "a 1x1 PNG", saved(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"), {}
    yield "jpeg-4000x3.jpg", "a 4000x3 JPEG", saved(Image.fromarray(picture(4000, 3, 12)), "JPEG", quality=90), {}
    yield from other_formats()


def tool(inputs, *argv):
    """Runs a tool on `inputs` (name -> bytes); its output's bytes. In argv an input's name and OUT (also as `fmt:OUT`)
    stand for the files."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in inputs.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        args = [os.path.join(d, a) if a in inputs or a == "OUT" else a[:-3] + os.path.join(d, "OUT") if a.endswith(":OUT") else a for a in argv]
        subprocess.run(args, check=True)
        with open(os.path.join(d, "OUT"), "rb") as f:
            return f.read()


def gif_lzw(indices, min_code=8):
    """A GIF image's data: every index its own code at min_code + 1 bits, with clear codes before the width would grow."""
    clear, width = 1 << min_code, min_code + 1
    codes, run, limit = [clear], 0, (1 << width) - (1 << min_code) - 3
    for v in indices:
        if run == limit:
            codes.append(clear)
            run = 0
        codes.append(int(v))
        run += 1
    codes.append(clear + 1)
    acc = n = 0
    data = bytearray()
    for c in codes:
        acc |= c << n
        n += width
        while n >= 8:
            data.append(acc & 255)
            acc >>= 8
            n -= 8
    if n:
        data.append(acc)
    return bytes([min_code]) + b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)) + b"\0"


def gif(screen, frames, table=None, version=b"GIF89a"):
    """A GIF written field by field (Pillow writes no offset first frame, no file without a colour table, no index past
    its table). frames: dicts with x, y, indices (h x w), and optional local (a colour table), transparent, dispose."""
    def colours(t):
        bits = max(1, (len(t) - 1).bit_length())
        return bits, bytes(np.asarray(t, np.uint8).reshape(-1)) + b"\0" * (3 * ((1 << bits) - len(t)))
    out = version + struct.pack("<HHBBB", *screen, 0, 0, 0)
    if table is not None:
        bits, t = colours(table)
        out = out[:10] + bytes([0xF0 | (bits - 1)]) + out[11:] + t
    for f in frames:
        if f.get("transparent") is not None or f.get("dispose"):
            flags = (f.get("dispose", 0) << 2) | (f.get("transparent") is not None)
            out += b"!\xf9\x04" + struct.pack("<BHB", flags, 10, f.get("transparent") or 0) + b"\0"
        h, w = f["indices"].shape
        local = b""
        lflags = 0
        if f.get("local") is not None:
            bits, local = colours(f["local"])
            lflags = 0x80 | (bits - 1)
        out += b"," + struct.pack("<HHHHB", f["x"], f["y"], w, h, lflags) + local + gif_lzw(f["indices"].reshape(-1))
    return out + b";"


def bmp(width, height, bits, pixels, palette=b"", compression=0, header=40, masks=b""):
    """A BMP of a Windows 3.x (40-byte) or OS/2 1.x (12-byte) header, for layouts the tools do not write."""
    if header == 12:
        info = struct.pack("<IHHHH", 12, width, height, 1, bits)
    else:
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, len(palette) // 4, 0)
    offset = 14 + len(info) + len(masks) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + masks + palette + pixels


def bmp_rows(rows, bits):
    """Rows (top first) stored bottom up, each padded to 4 bytes."""
    stride = (rows.shape[1] * bits + 31) // 32 * 4
    return b"".join(r.tobytes() + b"\0" * (stride - len(r.tobytes())) for r in rows[::-1])


def tags(**values):
    """An Image.Exif of these tags, for a TIFF's own IFD."""
    e = Image.Exif()
    for k, v in values.items():
        e[getattr(Image.ExifTags.Base, k)] = v
    return e


def other_formats():
    """GIF, TIFF and BMP inputs: what diffusers' load_image reads beyond PNG, JPEG and WebP."""
    pic = Image.fromarray(picture(15, 9, 1))
    big = Image.fromarray(picture(45, 37, 3))
    palette = pic.quantize(40)
    rgba = np.dstack([picture(15, 9, 2), np.full((9, 15), 255, np.uint8)])
    rgba[1:4, 2:9, 3] = 0
    rgba[5:8, 10:14, 3] = 128
    png = saved(pic, "PNG")

    # GIF: the first frame, as Pillow composes it.
    yield "gif-palette.gif", "GIF of 40 colours (Pillow)", saved(palette, "GIF"), {}
    index = int(np.asarray(palette)[4, 7])
    yield "gif-transparent-index.gif", f"GIF whose transparent index ({index}) is used by pixels: convert(\"RGB\") gives its table colour, not black (Pillow)", saved(palette, "GIF", transparency=index), {}
    yield "gif-interlaced.gif", "interlaced GIF, 45x37 (Pillow interlaces from 16 pixels a side)", saved(big.quantize(60), "GIF", interlace=True), {}
    frames = [Image.fromarray(picture(45, 37, 20 + i)).quantize(50) for i in range(3)]
    anim = saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    yield "gif-animated-optimized.gif", "3-frame animation optimised by gifsicle -O3 (later frames smaller, offset, transparent)", tool({"IN": anim}, "gifsicle", "-O3", "IN", "-o", "OUT"), {}
    rng = np.random.default_rng(30)
    table = rng.integers(0, 256, (16, 3))
    idx = lambda w, h, n=16, seed=31: np.random.default_rng(seed).integers(0, n, (h, w))
    yield "gif-first-frame-offset.gif", "GIF (this script's writer): 20x14 screen, a 15x9 first frame at (3, 2), no transparency: around it, index 0's colour", gif((20, 14), [dict(x=3, y=2, indices=idx(15, 9))], table), {}
    yield "gif-first-frame-offset-transparent.gif", "the same with transparent index 7 (around the frame, and its own pixels of index 7: index 7's colour), disposal 2, then a full second frame", gif((20, 14), [dict(x=3, y=2, indices=idx(15, 9), transparent=7, dispose=2), dict(x=0, y=0, indices=idx(20, 14, seed=32))], table), {}
    yield "gif-frame-beyond-screen.gif", "GIF whose first frame (15x9 at (2, 1)) reaches past its 10x5 screen: the canvas grows to 17x10", gif((10, 5), [dict(x=2, y=1, indices=idx(15, 9))], table), {}
    yield "gif-local-table.gif", "GIF with a local colour table and a different global one", gif((15, 9), [dict(x=0, y=0, indices=idx(15, 9), local=table[::-1])], table), {}
    yield "gif-no-colour-table.gif", "GIF without any colour table: Pillow reads the indices as grey levels", gif((15, 9), [dict(x=0, y=0, indices=idx(15, 9, 256))]), {}
    yield "gif-grey-ramp-table.gif", "GIF whose 16-entry table is grey levels 0-15 and whose indices reach 63: Pillow reads it as grey, each index its level", gif((15, 9), [dict(x=0, y=0, indices=idx(15, 9, 64))], [(i, i, i) for i in range(16)]), {}
    yield "gif-index-past-table.gif", "GIF with a 16-colour table and indices up to 63: past the table, black", gif((15, 9), [dict(x=0, y=0, indices=idx(15, 9, 64))], table), {}
    yield "gif87a.gif", "GIF87a, no extensions", gif((15, 9), [dict(x=0, y=0, indices=idx(15, 9))], table, version=b"GIF87a"), {}

    # TIFF: what scanners and editors write.
    yield "tiff-rgb.tif", "uncompressed RGB TIFF (Pillow)", saved(pic, "TIFF"), {}
    yield "tiff-rgb-lzw.tif", "LZW RGB TIFF (Pillow)", saved(pic, "TIFF", compression="tiff_lzw"), {}
    yield "tiff-rgb-packbits.tif", "PackBits RGB TIFF (Pillow)", saved(pic, "TIFF", compression="packbits"), {}
    yield "tiff-rgb-deflate-predictor.tif", "Deflate RGB TIFF with the horizontal predictor (tiffcp -c zip:2)", tool({"IN.tif": saved(pic, "TIFF")}, "tiffcp", "-c", "zip:2", "IN.tif", "OUT"), {}
    yield "tiff-jpeg.tif", "JPEG-compressed TIFF, quality 90 (ImageMagick)", tool({"IN.png": png}, "convert", "IN.png", "-compress", "jpeg", "-quality", "90", "tiff:OUT"), {}
    yield "tiff-planar-separate.tif", "RGB TIFF with separate planes (tiffcp -p separate)", tool({"IN.tif": saved(pic, "TIFF")}, "tiffcp", "-p", "separate", "IN.tif", "OUT"), {}
    yield "tiff-tiled.tif", "tiled RGB TIFF, 16x16 tiles (tiffcp -t)", tool({"IN.tif": saved(pic, "TIFF")}, "tiffcp", "-t", "-w", "16", "-l", "16", "IN.tif", "OUT"), {}
    yield "tiff-rgba.tif", "RGBA TIFF, unassociated alpha (Pillow; alpha dropped)", saved(Image.fromarray(rgba, "RGBA"), "TIFF"), {}
    yield "tiff-rgba-associated.tif", "the RGBA TIFF marked associated (premultiplied) alpha (tiffset -s 338 1 1)", tool({"IN.tif": saved(Image.fromarray(rgba, "RGBA"), "TIFF")}, "sh", "-c", "tiffset -s 338 1 1 \"$0\" && cp \"$0\" \"$1\"", "IN.tif", "OUT"), {}
    grey = pic.convert("L")
    yield "tiff-grey.tif", "greyscale TIFF (Pillow)", saved(grey, "TIFF"), {}
    yield "tiff-grey-alpha.tif", "greyscale TIFF with alpha (ImageMagick)", tool({"IN.tif": saved(Image.fromarray(rgba, "RGBA"), "TIFF")}, "convert", "IN.tif", "-colorspace", "gray", "tiff:OUT"), {}
    yield "tiff-min-is-white.tif", "greyscale TIFF, photometric min-is-white (ImageMagick)", tool({"IN.png": png}, "convert", "IN.png", "-colorspace", "gray", "-define", "tiff:photometric=min-is-white", "tiff:OUT"), {}
    yield "tiff-1-bit-g4.tif", "1-bit TIFF, CCITT group 4 (Pillow), as scanners write documents", saved(big.convert("1"), "TIFF", compression="group4"), {}
    yield "tiff-palette.tif", "palette TIFF (Pillow)", saved(palette, "TIFF"), {}
    g16 = (picture(15, 9, 8)[..., 0].astype(np.uint16) * 257) // np.uint16(3)
    yield "tiff-16-bit-grey.tif", "16-bit greyscale TIFF (Pillow's I;16: convert(\"RGB\") clips each value to 255)", saved(Image.fromarray(g16), "TIFF"), {}
    yield "tiff-16-bit-grey-big-endian.tif", "16-bit greyscale big-endian TIFF (ImageMagick; Pillow's I;16B, clipped)", tool({"IN.png": png}, "convert", "IN.png", "-colorspace", "gray", "-depth", "16", "-define", "tiff:endian=msb", "tiff:OUT"), {}
    yield "tiff-16-bit-rgb.tif", "16-bit RGB TIFF (ImageMagick; the high byte of each sample)", tool({"IN.png": png}, "convert", "IN.png", "-depth", "16", "tiff:OUT"), {}
    yield "tiff-float.tif", "32-bit float greyscale TIFF, values -20 to 280 (Pillow's F)", saved(Image.fromarray((np.random.default_rng(33).random((9, 15)) * 300 - 20).astype(np.float32), "F"), "TIFF"), {}
    yield "tiff-cmyk.tif", "CMYK TIFF (Pillow; converted by Pillow's formula, no ICC)", saved(pic.convert("CMYK"), "TIFF"), {}
    yield "tiff-cmyk-lzw.tif", "CMYK LZW TIFF (ImageMagick)", tool({"IN.png": png}, "convert", "IN.png", "-colorspace", "cmyk", "-compress", "lzw", "tiff:OUT"), {}
    yield "tiff-cmyk-16-bit.tif", "16-bit CMYK TIFF (ImageMagick; the high byte of each sample)", tool({"IN.png": png}, "convert", "IN.png", "-colorspace", "cmyk", "-depth", "16", "tiff:OUT"), {}
    yield "tiff-multipage.tif", "two-page TIFF, the second page larger (Pillow; the first page is read)", saved(pic, "TIFF", save_all=True, append_images=[big]), {}
    for o in range(2, 9):
        yield f"tiff-orientation-{o}.tif", f"RGB TIFF with orientation tag {o} (Pillow)", saved(pic, "TIFF", exif=tags(Orientation=o)), {}
    yield "tiff-orientation-6-imagemagick.tif", "RGB TIFF, -orient right-top (ImageMagick: orientation tag 6)", tool({"IN.png": png}, "convert", "IN.png", "-orient", "right-top", "tiff:OUT"), {}
    yield "tiff-xmp-orientation-8.tif", "RGB TIFF without an orientation tag, XMP (tag 700) with tiff:Orientation 8", saved(pic, "TIFF", tiffinfo={700: xmp(8)}), {}
    yield "tiff-xmp-orientation-ignored.tif", "RGB TIFF with orientation tag 1 and XMP tiff:Orientation 6: the tag wins, nothing turns", saved(pic, "TIFF", tiffinfo={700: xmp(6), 0x0112: 1}), {}
    yield "tiff-bigtiff-orientation-8.tif", "BigTIFF with orientation tag 8 (Pillow)", saved(pic, "TIFF", big_tiff=True, exif=tags(Orientation=8)), {}

    # BMP: what Windows tools write.
    big_png = saved(big, "PNG")
    yield "bmp-24.bmp", "24-bit BMP (Pillow)", saved(pic, "BMP"), {}
    yield "bmp-32.bmp", "32-bit BMP of an RGBA picture (Pillow: BI_RGB, the fourth byte not colour)", saved(Image.fromarray(rgba, "RGBA"), "BMP"), {}
    yield "bmp-32-alpha-v5.bmp", "32-bit BMP with an alpha mask, Windows 5 header (ImageMagick; alpha dropped)", tool({"IN.png": saved(Image.fromarray(rgba, "RGBA"), "PNG")}, "convert", "IN.png", "bmp:OUT"), {}
    yield "bmp-8-palette.bmp", "8-bit palette BMP (Pillow)", saved(palette, "BMP"), {}
    yield "bmp-8-grey.bmp", "8-bit greyscale BMP (Pillow: a table of levels 0-255)", saved(grey, "BMP"), {}
    yield "bmp-4-palette.bmp", "4-bit palette BMP (ImageMagick)", tool({"IN.png": big_png}, "convert", "IN.png", "-colors", "12", "-depth", "4", "-type", "palette", "bmp3:OUT"), {}
    yield "bmp-1-bit.bmp", "1-bit BMP (Pillow)", saved(big.convert("1"), "BMP"), {}
    yield "bmp-rle8.bmp", "RLE8 BMP (ImageMagick)", tool({"IN.png": big_png}, "convert", "IN.png", "-colors", "12", "-type", "palette", "-compress", "RLE", "bmp3:OUT"), {}
    runs = b"\x03\x05" + b"\x00\x03\x01\x02\x03\x00" + b"\x00\x00"  # 3 of index 5, an odd absolute run padded, end of line
    runs += b"\x02\x07\x00\x02\x01\x00" + b"\x04\x06\x00\x00"  # 2 of 7, a delta 1 right (index 0), 4 of 6, end of line
    runs += b"\x00\x02\x02\x01" + b"\x05\x03\x00\x00"  # a delta of 2 right and 1 up, 5 of 3, end of line: the picture is full
    rle_palette = b"".join(bytes([*np.random.default_rng(34).integers(0, 256, 3).tolist(), 0]) for _ in range(8))
    yield "bmp-rle8-delta.bmp", "RLE8 BMP of 8x4 (this script's writer): encoded and odd absolute runs, deltas, ends of line", bmp(8, 4, 8, runs, rle_palette, compression=1), {}
    # ImageMagick writes no RLE4 (it writes RLE8 for 16 colours).
    nibbles = b"\x03\x12" + b"\x00\x04\x34\x56" + b"\x01\x70" + b"\x00\x00"  # 1 2 1, an absolute run 3 4 5 6, then 7; end of line
    nibbles += b"\x08\x9a" + b"\x00\x00"  # 9 a 9 a 9 a 9 a, end of line: the picture is full
    yield "bmp-rle4.bmp", "RLE4 BMP of 8x2 (this script's writer): encoded runs of two alternating indices, an absolute run", bmp(8, 2, 4, nibbles, rle_palette * 2, compression=2), {}
    yield "bmp-16-565.bmp", "16-bit BMP, 5-6-5 bit fields (ImageMagick)", tool({"IN.png": big_png}, "convert", "IN.png", "-define", "bmp:subtype=RGB565", "bmp:OUT"), {}
    yield "bmp-16-555-bitfields.bmp", "16-bit BMP, 5-5-5 bit fields (ImageMagick)", tool({"IN.png": big_png}, "convert", "IN.png", "-define", "bmp:subtype=RGB555", "bmp:OUT"), {}
    yield "bmp-16-argb1555.bmp", "16-bit BMP of an RGBA picture, 1-5-5-5 bit fields with an alpha mask (ImageMagick; alpha dropped)", tool({"IN.png": saved(Image.fromarray(rgba, "RGBA"), "PNG")}, "convert", "IN.png", "-define", "bmp:subtype=ARGB1555", "bmp:OUT"), {}
    x555 = np.random.default_rng(35).integers(0, 1 << 15, (9, 15)).astype("<u2")
    yield "bmp-16-raw.bmp", "16-bit BMP without bit fields (x-5-5-5, this script's writer)", bmp(15, 9, 16, bmp_rows(x555, 16)), {}
    yield "bmp-os2.bmp", "OS/2 1.x BMP, 12-byte header, 24-bit (ImageMagick bmp2)", tool({"IN.png": big_png}, "convert", "IN.png", "bmp2:OUT"), {}
    yield "bmp-os2-palette.bmp", "OS/2 1.x BMP, 8-bit palette of 3-byte entries (ImageMagick bmp2)", tool({"IN.png": big_png}, "convert", "IN.png", "-colors", "20", "-type", "palette", "bmp2:OUT"), {}
    top_down = saved(pic, "BMP")
    rows = np.frombuffer(top_down[54:], np.uint8).reshape(9, -1)[::-1]
    yield "bmp-top-down.bmp", "24-bit BMP stored top to bottom (negative height; Pillow's file, rows reversed)", top_down[:22] + struct.pack("<i", -9) + top_down[26:54] + rows.tobytes(), {}
    short = b"".join(bytes([*np.random.default_rng(36).integers(0, 256, 3).tolist(), 0]) for _ in range(12))
    yield "bmp-8-index-past-table.bmp", "8-bit BMP with a 12-colour table and indices up to 39: past the table, black (this script's writer)", bmp(15, 9, 8, bmp_rows(np.random.default_rng(37).integers(0, 40, (9, 15)).astype(np.uint8), 8), short), {}


def main(out):
    os.makedirs(out, exist_ok=True)
    first = lambda *argv: subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
    tools = {"imagemagick": first("convert", "-version"), "libtiff": first("sh", "-c", "tiffcp 2>&1"), "gifsicle": first("gifsicle", "--version")}
    index = {"pillow": PIL.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__, "tools": tools, "cases": []}
    for name, made, data, extra in cases():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        rgb = load_image(path)
        if isinstance(rgb.info.get("transparency"), int):
            del rgb.info["transparency"]  # an I;16 picture's tRNS key, kept as is: an RGB PNG cannot write it
        rgb.save(path + ".rgb.png", icc_profile=None)  # the pixels alone: a reader must not colour-manage them
        entry = {"input": name, "made": made, "expected": name + ".rgb.png", "size": list(rgb.size)}
        if extra.get("alpha0"):
            a = np.asarray(ImageOps.exif_transpose(Image.open(path)).getchannel("A"))
            Image.fromarray(np.where(a == 0, 255, 0).astype(np.uint8)).save(path + ".alpha0.png")
            entry["alpha0"] = name + ".alpha0.png"
        index["cases"].append(entry)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
