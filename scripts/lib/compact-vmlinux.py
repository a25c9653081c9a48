#!/usr/bin/python3
"""compact-vmlinux IN OUT: the kernel's ELF with only the bytes a VMM has to load.

The x86-64 kernel links its segments at 2 MiB-aligned file offsets (the arch Makefile's
-z max-page-size=0x200000) and carries its symbols and section headers: 14.9 MiB of
which 8.2 MiB are loaded. Of those, 3.5 MiB are whole pages of filler: zero pages in
the data segments, and in the text segment the int3 (0xcc) padding up to the 2 MiB
boundaries the kernel aligns its entry code and its read-only data to, so that each
can have its own huge-page mapping.

OUT has the same ELF header and entry point. Each loadable segment is cut at its filler
pages into pieces: every piece is a loadable segment of its own with the original's
flags, its file bytes at the next file offset congruent to its address modulo 4 KiB,
and a memory size reaching to the next piece (or to the original's end), so the filler
is the zero fill ELF gives every byte past a segment's file size; a run of filler at
a segment's start is a piece with no file bytes. Notes (the PVH entry point) stay with
the bytes they point into; there are no sections.

What a VMM loads from OUT is what it loaded from IN (checked below, page by page,
before anything is written), with one difference: the int3 padding pages load as
zeros. The kernel never executes or reads them (no code or data lies there, they are
what is left between the end of its code and the next 2 MiB boundary); zero bytes
there decode as instructions that write memory rather than trap, which only matters
to a jump that is already a kernel bug. A verified boot hashes every byte of the file
the plan pins, so it hashes 4.7 MiB instead of 8.2 (docs/boot-time.md, "A vmlinux of
what is loaded"). Guest memory must be zero where the kernel goes, as it is in a
fresh VM; every VMM that loads an ELF kernel already relies on that for the zero fill.

Deterministic: the output depends on the input's bytes only.
"""
import struct
import sys

PAGE = 0x1000
PT_LOAD = 1
PF_X = 1
INT3 = 0xCC
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
ZERO_PAGE = bytes(PAGE)
INT3_PAGE = bytes([INT3]) * PAGE


def fail(msg):
    sys.exit(f"compact-vmlinux: {msg}")


def pieces(data, phdr):
    """A loadable segment's content runs: [(start, end)] of its file bytes, relative to
    its start, split at whole filler pages (page-aligned in its address space)."""
    _, flags, off, vaddr, _, filesz, _, _ = phdr
    fillers = (ZERO_PAGE, INT3_PAGE) if flags & PF_X else (ZERO_PAGE,)
    first = (PAGE - vaddr % PAGE) % PAGE  # the first page boundary, relative
    runs, start = [], 0
    at = first
    while at + PAGE <= filesz:
        if data[off + at:off + at + PAGE] in fillers:
            if at > start:
                runs.append((start, at))
            start = at + PAGE
        at += PAGE
    if filesz > start:
        runs.append((start, filesz))
    return runs


def image(data, phdrs):
    """Guest memory as a loader fills it from these segments (each at its physical
    address): {page address: bytes} over every page a segment covers, zero where no
    file byte goes."""
    mem = {}
    for p in phdrs:
        if p[0] != PT_LOAD:
            continue
        _, _, off, _, paddr, filesz, memsz, _ = p
        for a in range(paddr // PAGE * PAGE, paddr + memsz, PAGE):
            mem.setdefault(a, bytearray(PAGE))
        at = 0
        while at < filesz:
            a = paddr + at
            page, inside = a // PAGE * PAGE, a % PAGE
            n = min(PAGE - inside, filesz - at)
            mem[page][inside:inside + n] = data[off + at:off + at + n]
            at += n
    return mem


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
    original = [PHDR.unpack_from(data, phoff + i * PHDR.size) for i in range(phnum)]
    for p in original:
        if p[2] + p[5] > len(data):
            fail(f"{src}: a segment's bytes run past the end of the file")

    # The new program headers, in the original's order: each loadable segment becomes
    # its pieces (file offsets assigned below), anything else is kept for now.
    out = []  # [type, flags, src_offset, vaddr, paddr, filesz, memsz, align]
    for p in original:
        if p[0] != PT_LOAD:
            out.append(list(p))
            continue
        ptype, pflags, off, vaddr, paddr, filesz, memsz, _ = p
        runs = pieces(data, p)
        if not runs:
            # Loaders skip a segment with no file bytes, and some then miss where the
            # kernel ends; a kernel has no such segment.
            fail(f"{src}: a loadable segment at {vaddr:#x} is all filler")
        if runs[0][0] > 0:  # filler from the segment's start: no file bytes
            out.append([ptype, pflags, off, vaddr, paddr, 0, runs[0][0], PAGE])
        for k, (s, e) in enumerate(runs):
            reach = runs[k + 1][0] if k + 1 < len(runs) else memsz
            out.append([ptype, pflags, off + s, vaddr + s, paddr + s, e - s, reach - s, PAGE])

    nphdr = len(out)
    if nphdr > 0xFFFF:
        fail(f"{src}: {nphdr} program headers do not fit an ELF header")
    cursor = EHDR.size + nphdr * PHDR.size
    placed = []  # (new offset, src offset, filesz) of every loadable piece with bytes
    order = sorted((i for i, p in enumerate(out) if p[0] == PT_LOAD and p[5] > 0),
                   key=lambda i: out[i][2])
    for i in order:
        p = out[i]
        new = (cursor + PAGE - 1) // PAGE * PAGE + p[3] % PAGE
        placed.append((new, p[2], p[5]))
        p[2] = new
        cursor = new + p[5]
    body = bytearray(cursor)
    for new, old, n in placed:
        body[new:new + n] = data[old:old + n]
    for i, p in enumerate(out):
        if p[0] == PT_LOAD:
            if p[5] == 0:
                p[2] = 0
            continue
        if p[5] == 0:
            p[2] = 0
            continue
        home = next(((new, old, n) for new, old, n in placed
                     if old <= p[2] and p[2] + p[5] <= old + n), None)
        if home is None:
            fail(f"{src}: segment {i} (type {p[0]:#x}) lies outside every piece of file bytes kept")
        p[2] = home[0] + (p[2] - home[1])

    header = EHDR.pack(ident, e_type, machine, version, entry, EHDR.size, 0, flags, EHDR.size,
                       PHDR.size, nphdr, 0, 0, 0)
    body[:EHDR.size] = header
    for i, p in enumerate(out):
        body[EHDR.size + i * PHDR.size:EHDR.size + (i + 1) * PHDR.size] = PHDR.pack(*p)

    # What a loader places from OUT must be what it placed from IN, but for the int3
    # padding of executable segments, checked on the bytes about to be written.
    before, after = image(data, original), image(body, out)
    if before.keys() != after.keys():
        fail(f"{src}: the pieces cover other pages than the segments did (a bug here)")
    executable = set()
    for p in original:
        if p[0] == PT_LOAD and p[1] & PF_X:
            executable.update(range(p[4] // PAGE * PAGE, p[4] + p[6], PAGE))
    for a, want in before.items():
        got = after[a]
        if got != want and not (a in executable and want == INT3_PAGE and got == ZERO_PAGE):
            fail(f"{src}: the page at {a:#x} came out different (a bug here)")
    loads = lambda ps: [(p[1], p[4] - p[3]) for p in ps if p[0] == PT_LOAD]
    if set(loads(original)) != set(loads(out)):
        fail(f"{src}: a piece's flags or physical address moved (a bug here)")
    notes = lambda ps, d: [d[p[2]:p[2] + p[5]] for p in ps if p[0] != PT_LOAD]
    if notes(original, data) != notes(out, body):
        fail(f"{src}: a note came out different (a bug here)")
    with open(dst, "wb") as f:
        f.write(body)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: compact-vmlinux IN OUT")
    main(sys.argv[1], sys.argv[2])
