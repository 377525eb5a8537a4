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


def main(out):
    os.makedirs(out, exist_ok=True)
    index = {"pillow": PIL.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__, "cases": []}
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
