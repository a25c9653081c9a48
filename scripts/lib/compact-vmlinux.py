#!/usr/bin/python3
"""compact-vmlinux IN OUT: the kernel's ELF with only what a VMM loads.

The x86-64 kernel links its segments at 2 MiB-aligned file offsets (the arch Makefile's
-z max-page-size=0x200000) and carries its symbols and section headers: 14.9 MiB of
which 8.2 MiB are loaded. OUT has the same ELF header, program headers and segment
bytes, each loadable segment at the next file offset congruent to its address modulo
4 KiB, notes kept where their segment went, and no sections. Addresses, sizes and
contents are unchanged, so the kernel boots the same; a verified boot reads and hashes
about half as much (docs/boot-time.md, "A vmlinux of what is loaded"). Deterministic:
the output depends on the input's bytes only.
"""
import struct
import sys

PAGE = 0x1000
PT_LOAD = 1
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


def fail(msg):
    sys.exit(f"compact-vmlinux: {msg}")


def main(src, dst):
    data = open(src, "rb").read()
    if len(data) < EHDR.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        fail(f"{src} is not a 64-bit little-endian ELF file")
    (ident, e_type, machine, version, entry, phoff, shoff, flags, ehsize, phentsize,
     phnum, shentsize, shnum, shstrndx) = EHDR.unpack_from(data)
    if e_type != 2 or machine != 62 or phentsize != PHDR.size or phnum == 0:
        fail(f"{src} is not an x86-64 executable with program headers")
    if phoff + phnum * PHDR.size > len(data):
        fail(f"{src}: program headers past the end of the file")
    phdrs = [list(PHDR.unpack_from(data, phoff + i * PHDR.size)) for i in range(phnum)]
    for p in phdrs:
        if p[2] + p[5] > len(data):
            fail(f"{src}: a segment's bytes run past the end of the file")

    headers = EHDR.size + phnum * PHDR.size
    loads = sorted((i for i, p in enumerate(phdrs) if p[0] == PT_LOAD), key=lambda i: phdrs[i][2])
    original = [tuple(p) for p in phdrs]
    cursor = headers
    moved = {}  # loadable segment -> its new file offset
    for i in loads:
        _, _, off, vaddr, _, filesz, _, _ = original[i]
        if off < headers and filesz > 0:
            fail(f"{src}: segment {i} covers the ELF headers")
        new = (cursor + PAGE - 1) // PAGE * PAGE + vaddr % PAGE
        if new < cursor:
            new += PAGE
        moved[i] = new
        cursor = new + filesz
    body = bytearray(cursor)
    for i, new in moved.items():
        off, filesz = original[i][2], original[i][5]
        body[new:new + filesz] = data[off:off + filesz]
        phdrs[i][2] = new
        phdrs[i][7] = PAGE
    for i, p in enumerate(phdrs):
        if i in moved:
            continue
        if p[5] == 0:
            p[2] = 0
            continue
        home = next((j for j in loads
                     if original[j][2] <= p[2] and p[2] + p[5] <= original[j][2] + original[j][5]),
                    None)
        if home is None:
            fail(f"{src}: segment {i} (type {p[0]:#x}) lies outside every loadable segment")
        p[2] = moved[home] + (p[2] - original[home][2])

    header = EHDR.pack(ident, e_type, machine, version, entry, EHDR.size, 0, flags, EHDR.size,
                       PHDR.size, phnum, 0, 0, 0)
    body[:EHDR.size] = header
    for i, p in enumerate(phdrs):
        body[EHDR.size + i * PHDR.size:EHDR.size + (i + 1) * PHDR.size] = PHDR.pack(*p)
    # What a loader reads must be what the kernel linked: every segment's bytes and
    # addresses, checked on the bytes about to be written.
    for i, p in enumerate(phdrs):
        o = original[i]
        if p[0] != o[0] or p[3:7] != list(o[3:7]) or body[p[2]:p[2] + p[5]] != data[o[2]:o[2] + o[5]]:
            fail(f"{src}: segment {i} came out different (a bug here)")
    with open(dst, "wb") as f:
        f.write(body)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: compact-vmlinux IN OUT")
    main(sys.argv[1], sys.argv[2])
