#!/usr/bin/env python3
"""Copy a CUDA shared library keeping device code for one GPU architecture only.

    fatbin-keep-arch.py SRC DST ARCH      (ARCH: 90 for H100/H200, 80 for A100, 89 for L4/L40S)

The payloads of every other architecture's cubins and PTX in .nv_fatbin are zeroed; headers stay, so the
driver still finds and loads the ARCH cubin. Used by gpu-bundle.sh: ONNX Runtime's CUDA provider is 230 MB, and
with only sm_90 kept it compresses to 38 MB instead of 165 MB, which is what lets it travel to a machine
without a registry in two pieces. Never ship the result: it runs on ARCH only.
"""
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50


def main(src, dst, keep):
    data = bytearray(open(src, 'rb').read())
    shoff = struct.unpack_from('<Q', data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    secs = [struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]

    def name(off):
        return bytes(data[strtab + off:data.index(b'\0', strtab + off)]).decode()

    found = [(s[4], s[5]) for s in secs if name(s[0]) == '.nv_fatbin']
    if not found:
        sys.exit(f'{src}: no .nv_fatbin section')
    off, size = found[0]
    p, end, zeroed, kept = off, off + size, 0, 0
    while p < end:
        magic, _ver, hsize, fsize = struct.unpack_from('<IHHQ', data, p)
        if magic != FATBIN_MAGIC:
            p += 8  # containers are 8-byte aligned
            continue
        q, qend = p + hsize, p + hsize + fsize
        while q < qend:
            _kind, _u, ehsize, psize = struct.unpack_from('<HHIQ', data, q)
            arch = struct.unpack_from('<I', data, q + 28)[0]
            if arch == keep:
                kept += psize
            else:
                data[q + ehsize:q + ehsize + psize] = bytes(psize)
                zeroed += psize
            q += ehsize + psize
        p = qend
    if kept == 0:
        sys.exit(f'{src}: no device code for sm_{keep}')
    open(dst, 'wb').write(data)
    print(f'kept sm_{keep}: {kept >> 20} MiB, zeroed {zeroed >> 20} MiB')


if __name__ == '__main__':
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
