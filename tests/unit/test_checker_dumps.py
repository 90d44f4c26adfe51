"""Writers of small synthetic dumps for the checker tests (and the fuzz seeds), plus
tests that hold the writers to independent readers (drgn, libkdumpfile through the
checker, makedumpfile -R), so a wrong writer cannot make a wrong checker pass.

- `elf_core`: an ELF64 core like /proc/vmcore: PT_NOTE, then PT_LOADs with
  p_paddr/p_offset/p_filesz/p_memsz as given (overlaps and zero-fill allowed).
- `kdump_compressed`: makedumpfile's kdump-compressed format (header version 6,
  64-bit little-endian, two page bitmaps, page descriptors, zlib or plain pages).
- `flatten`: makedumpfile's flattened form of any file, records in any order.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import pytest

from harness import markers

PAGE = 4096
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4


@dataclass
class Load:
    paddr: int
    data: bytes
    memsz: Optional[int] = None      # default len(data); larger means zero-fill
    vaddr: int = 0


def elf_core(loads: Sequence[Load], *, notes: bytes = b"\0" * 20, machine: int = EM_X86_64,
             align: int = PAGE, phnum_override: Optional[int] = None) -> bytes:
    """An ELF64 little-endian ET_CORE file with one PT_NOTE and the given PT_LOADs."""
    nph = 1 + len(loads)
    ehsize, phentsize = 64, 56
    off = ehsize + nph * phentsize
    note_off = off
    off += len(notes)
    placed = []
    for ld in loads:
        off = (off + align - 1) // align * align
        placed.append(off)
        off += len(ld.data)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    eh = ident + struct.pack("<HHIQQQIHHHHHH", 4, machine, 1, 0, ehsize, 0, 0, ehsize,
                             phentsize, nph if phnum_override is None else phnum_override, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(notes), 0, 1)
    for ld, o in zip(loads, placed):
        memsz = len(ld.data) if ld.memsz is None else ld.memsz
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, o, ld.vaddr, ld.paddr, len(ld.data), memsz, 0)
    out = bytearray(eh + phdrs + notes)
    for ld, o in zip(loads, placed):
        out += b"\0" * (o - len(out))
        out += ld.data
    return bytes(out)


def marker(nonce: int, seq: int = 0, slot: int = 0, source: int = markers.Source.EDU,
           iova: int = 0, t_ns: int = 0) -> bytes:
    return markers.pack(markers.Marker(nonce=nonce, source=source, slot=slot, seq=seq,
                                       iova=iova, t_ns=t_ns))


def put(buf: bytearray, off: int, data: bytes) -> None:
    buf[off:off + len(data)] = data


def kdump_compressed(pages: Dict[int, bytes], max_pfn: int, *, compress: str = "zlib",
                     block: int = PAGE, header_version: int = 6) -> bytes:
    """makedumpfile's kdump-compressed format holding `pages` {pfn: block bytes}.
    Pages not given are excluded (not in the dump). compress: "zlib", "none", or
    "mixed" (zlib for even pfns)."""
    utsname = b"".join(s.ljust(65, b"\0") for s in
                       (b"Linux", b"test", b"6.1.0", b"#1 SMP", b"x86_64", b"(none)"))
    bits = block * 8
    nbm = max(1, -(-max_pfn // bits))        # blocks per bitmap
    sub_hdr_size = 1
    hdr = bytearray(block)
    put(hdr, 0, b"KDUMP   ")
    put(hdr, 8, struct.pack("<i", header_version))
    put(hdr, 12, utsname)
    # _pad1[6] then timeval_64 (16 bytes) at 408
    put(hdr, 424, struct.pack("<IiiIIIIIIi", 0x1 if compress != "none" else 0, block, sub_hdr_size,
                              2 * nbm, min(max_pfn, 0xFFFFFFFF), len(pages), 0, 0, 0, 1))
    sub = bytearray(block)
    put(sub, 0, struct.pack("<QiiQQQQQQQQQQQ", 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, max_pfn))
    ram_bm = bytearray(nbm * block)
    dump_bm = bytearray(nbm * block)
    for pfn in pages:
        if not 0 <= pfn < max_pfn:
            raise ValueError(f"pfn {pfn} outside 0..{max_pfn}")
        ram_bm[pfn // 8] |= 1 << (pfn % 8)
        dump_bm[pfn // 8] |= 1 << (pfn % 8)
    desc_off = (1 + sub_hdr_size + 2 * nbm) * block
    data_off = desc_off + 24 * len(pages)
    descs = bytearray()
    data = bytearray()
    for pfn in sorted(pages):
        page = pages[pfn]
        if len(page) != block:
            raise ValueError("pages must be one block long")
        use_zlib = compress == "zlib" or (compress == "mixed" and pfn % 2 == 0)
        body, flags = page, 0
        if use_zlib:
            z = zlib.compress(page)
            if len(z) < block:
                body, flags = z, 0x1
        descs += struct.pack("<QIIQ", data_off + len(data), len(body), flags, 0)
        data += body
    return bytes(hdr + sub + ram_bm + dump_bm + descs + data)


def flatten(image: bytes, *, chunk: int = 5000, shuffle_seed: Optional[int] = 1,
            trailing: bytes = b"") -> bytes:
    """makedumpfile's flattened form of `image`: a 4 KiB header, (offset, size)
    records, the (-1, -1) end marker, then `trailing` (a raw disk's leftovers)."""
    head = bytearray(4096)
    put(head, 0, b"makedumpfile")
    put(head, 16, struct.pack(">qq", 1, 1))
    pieces = [(o, image[o:o + chunk]) for o in range(0, len(image), chunk)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pieces)
    body = b"".join(struct.pack(">qq", o, len(p)) + p for o, p in pieces)
    return bytes(head) + body + struct.pack(">qq", -1, -1) + trailing


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def seeds() -> Iterable[tuple[str, bytes]]:
    """Small well-formed dumps of every format, for the fuzzer's corpus."""
    n = 0x5EED_0000_0000_0001
    page = bytearray(PAGE)
    put(page, 14, marker(n, 1))
    put(page, 200, marker(n + 1, 2))
    torn = bytearray(marker(n, 3))
    torn[40] ^= 1
    put(page, 1000, bytes(torn))
    yield "elf", elf_core([Load(0x1000, bytes(page)), Load(0x2000, bytes(page[:100]), memsz=200),
                           Load(0x1800, bytes(page[:0x800]))])
    yield "elf-seam", elf_core([Load(0x0, bytes(page[:230])), Load(230, bytes(page[230:]))], align=8)
    kd = kdump_compressed({0: bytes(page), 1: bytes(PAGE), 3: bytes(page)}, 8, compress="mixed")
    yield "kdump", kd
    yield "kdump-flat", flatten(kd, chunk=3000)
    yield "elf-flat", flatten(elf_core([Load(0x3000, bytes(page))]), chunk=1500)


# ---------------------------------------------------------------- writer tests

def test_elf_writer_agrees_with_drgn(tmp_path):
    drgn = pytest.importorskip("drgn")
    data = os.urandom(3 * PAGE)
    path = write(tmp_path / "core", elf_core([Load(0x10_0000, data), Load(0x20_0000, data[:PAGE], memsz=2 * PAGE)]))
    prog = drgn.Program()
    prog.set_core_dump(path)
    assert prog.read(0x10_0000 + 123, 1000, True) == data[123:1123]
    assert prog.read(0x20_0000 + PAGE - 10, 10, True) == data[PAGE - 10:PAGE]
    # drgn treats p_memsz beyond p_filesz as "not saved"; the checker reads zeros there
    with pytest.raises(drgn.FaultError):
        prog.read(0x20_0000 + PAGE, 1, True)


def test_kdump_writer_agrees_with_makedumpfile_reassembly(tmp_path):
    """Our flatten() output, reassembled by makedumpfile -R, is the image again."""
    if not shutil.which("makedumpfile"):
        pytest.skip("makedumpfile is not installed (apt-get install makedumpfile)")
    image = kdump_compressed({0: os.urandom(PAGE), 5: bytes(PAGE)}, 16)
    flat = write(tmp_path / "flat", flatten(image, chunk=777, trailing=os.urandom(5000)))
    out = tmp_path / "reassembled"
    with open(flat, "rb") as f:
        subprocess.run(["makedumpfile", "-R", str(out)], stdin=f, check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == image


def test_seeds_open(tmp_path):
    from harness import checker
    for name, data in seeds():
        with checker.open_dump(write(tmp_path / name, data)) as d:
            assert d.scan(threads=1).valid_count >= 1, name
