"""Fast tests of the C checker through harness.checker: synthetic dumps written in
Python (tests/unit/test_checker_dumps.py), no QEMU unless a test says so."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from harness import checker, markers
from harness.checker import (AddressNotPresentError, CanaryState, CheckerOSError, DumpFormatError,
                             DumpReadError, InvalidArgumentError, PhysRange, UnsupportedDumpError,
                             open_dump)

try:
    from . import test_checker_dumps as w
except ImportError:
    import test_checker_dumps as w

PAGE = w.PAGE
MiB = 1 << 20
N = 0x1122334455667788
OTHER = 0x0BADC0DE0BADC0DE
NIC = markers.Source.NIC
marker, put, Load = w.marker, w.put, w.Load


def dump_file(tmp_path, data: bytes, name: str = "vmcore") -> str:
    return w.write(tmp_path / name, data)


def one_line(e: BaseException) -> str:
    s = str(e)
    assert s and "\n" not in s, repr(s)
    return s


# ---------------------------------------------------------------- ELF

def test_elf_finds_unaligned_records_everywhere(tmp_path):
    ram1, ram2 = bytearray(3 * PAGE), bytearray(2 * PAGE)
    put(ram1, 14, marker(N, seq=1, source=NIC, t_ns=5))       # behind an Ethernet header
    put(ram1, PAGE - 20, marker(N, seq=2))                      # across a page boundary
    put(ram1, len(ram1) - 64, marker(N, seq=3))                 # last place a record fits
    put(ram2, 0, marker(N, seq=4))                              # first byte of a range
    put(ram2, len(ram2) - 32, marker(N, seq=5)[:32])           # cut off by the range end
    path = dump_file(tmp_path, w.elf_core([Load(0x100000, bytes(ram1)), Load(0x4000_0000, bytes(ram2))]))
    with open_dump(path) as d:
        assert (d.format, d.flattened) == ("elf", False)
        assert d.ranges == (PhysRange(0x100000, 3 * PAGE), PhysRange(0x4000_0000, 2 * PAGE))
        assert d.total_bytes == 5 * PAGE and d.duplicate_bytes == 0
        r = d.scan(nonce=N)
    assert [(h.phys, h.seq) for h in r.markers] == [
        (0x100000 + 14, 1), (0x100000 + PAGE - 20, 2), (0x100000 + 3 * PAGE - 64, 3), (0x4000_0000, 4)]
    assert (r.valid_count, r.torn_count, r.stale_count) == (4, 0, 0)
    assert r.markers[0].marker() == markers.Marker(N, NIC, 0, 1, 0, 5)
    assert r.bytes_scanned == 5 * PAGE and r.complete


def test_overlapping_pt_loads_report_each_address_once(tmp_path):
    base = 0x100_0000
    ram = bytearray(16 * PAGE)
    put(ram, 5 * PAGE + 100, marker(N, seq=7))
    text = bytes(ram[4 * PAGE:8 * PAGE])       # kdump's kernel-text alias: same bytes, same phys
    path = dump_file(tmp_path, w.elf_core([
        Load(base + 4 * PAGE, text, vaddr=0xFFFFFFFF81000000),
        Load(base, bytes(ram), vaddr=0xFFFF888001000000)]))
    with open_dump(path) as d:
        assert d.ranges == (PhysRange(base, 16 * PAGE),)
        assert d.duplicate_bytes == 4 * PAGE and d.total_bytes == 16 * PAGE
        r = d.scan()
    assert [h.phys for h in r.markers] == [base + 5 * PAGE + 100]
    assert r.bytes_scanned == 16 * PAGE


def test_overlap_the_larger_pt_load_wins(tmp_path):
    """Documented rule: data beats zero-fill, then the larger PT_LOAD, then the
    earlier program header. Copies differ here so the winner shows."""
    base = 0x200_0000
    big, small = bytearray(8 * PAGE), bytearray(2 * PAGE)
    put(big, PAGE + 10, marker(N, seq=1))
    put(small, 10, marker(N, seq=2))
    same_a, same_b = bytearray(PAGE), bytearray(PAGE)
    put(same_a, 0, marker(N, seq=3))
    put(same_b, 0, marker(N, seq=4))
    path = dump_file(tmp_path, w.elf_core([
        Load(base + PAGE, bytes(small)), Load(base, bytes(big)),       # smaller one first
        Load(0x900_0000, bytes(same_a)), Load(0x900_0000, bytes(same_b))]))
    with open_dump(path) as d:
        r = d.scan()
        assert [h.seq for h in r.markers] == [1, 3]
        assert d.read_phys(base + PAGE + 10, 64) == marker(N, seq=1)
        assert d.duplicate_bytes == 3 * PAGE


def test_memsz_beyond_filesz_is_zero_filled(tmp_path):
    base = 0x20_0000
    data = bytearray(PAGE)
    put(data, PAGE - 40, marker(N, seq=9)[:40])                 # runs into the zero-fill: torn
    cover = bytearray(PAGE)
    put(cover, 200, marker(N, seq=10))
    path = dump_file(tmp_path, w.elf_core([
        Load(base, bytes(data), memsz=4 * PAGE),
        Load(base + 3 * PAGE, bytes(cover))]))                  # data over another's zero-fill
    with open_dump(path) as d:
        assert d.ranges == (PhysRange(base, 4 * PAGE),)
        assert d.read_phys(base + PAGE, PAGE) == bytes(PAGE)
        assert d.read_phys(base + PAGE - 40, 80) == marker(N, seq=9)[:40] + bytes(40)
        assert d.read_phys(base + 3 * PAGE + 200, 64) == marker(N, seq=10)
        r = d.scan(nonce=N)
    assert [h.seq for h in r.markers] == [10]
    assert [t.phys for t in r.torn] == [base + PAGE - 40]
    assert r.bytes_scanned == 4 * PAGE


def test_record_across_contiguous_pt_loads_is_found(tmp_path):
    rec = marker(N, seq=11)
    a, b = bytearray(PAGE), bytearray(PAGE)
    put(a, PAGE - 20, rec[:20])
    put(b, 0, rec[20:])
    # three tiny PT_LOADs: one record spans all of them
    tiny = bytearray(200)
    put(tiny, 30, marker(N, seq=12))
    path = dump_file(tmp_path, w.elf_core([
        Load(0x30_0000 + PAGE, bytes(b)), Load(0x30_0000, bytes(a)),   # file order != phys order
        Load(0x40_0000, bytes(tiny[:40])), Load(0x40_0000 + 40, bytes(tiny[40:50])),
        Load(0x40_0000 + 50, bytes(tiny[50:]))], align=8))
    with open_dump(path) as d:
        assert d.ranges == (PhysRange(0x30_0000, 2 * PAGE), PhysRange(0x40_0000, 200))
        r = d.scan()
        assert [(h.phys, h.seq) for h in r.markers] == [(0x30_0000 + PAGE - 20, 11), (0x40_0000 + 30, 12)]
        assert d.read_phys(0x40_0000 + 30, 64) == marker(N, seq=12)


def test_record_across_a_gap_is_not_a_record(tmp_path):
    rec = marker(N, seq=11)
    a, b = bytearray(PAGE), bytearray(PAGE)
    put(a, PAGE - 20, rec[:20])
    put(b, 0, rec[20:])
    path = dump_file(tmp_path, w.elf_core([Load(0x30_0000, bytes(a)), Load(0x30_0000 + 2 * PAGE, bytes(b))]))
    with open_dump(path) as d:
        r = d.scan()
    assert (r.valid_count, r.torn_count) == (0, 0)


def test_torn_and_stale_records(tmp_path):
    ram = bytearray(4 * PAGE)
    put(ram, 100, marker(N, seq=1))
    put(ram, 1000, marker(OTHER, seq=2))
    flipped = bytearray(marker(N, seq=3))
    flipped[25] ^= 0x10
    put(ram, 2000, bytes(flipped))
    put(ram, 3000, marker(N, seq=4))
    put(ram, 3000 + 40, b"\xee" * 20)                           # a frame overwrote the tail
    path = dump_file(tmp_path, w.elf_core([Load(0, bytes(ram))]))
    with open_dump(path) as d:
        r = d.scan(nonce=N)
        everything = d.scan()
    assert [h.phys for h in r.markers] == [100]
    assert (r.stale_count, [(h.phys, h.nonce) for h in r.stale]) == (1, [(1000, OTHER)])
    assert r.torn_count == 2 and [t.phys for t in r.torn] == [2000, 3000]
    assert all(t.crc_stored != t.crc_computed for t in r.torn)
    assert everything.nonce is None
    assert [h.phys for h in everything.markers] == [100, 1000] and everything.stale_count == 0


def test_listing_bounds_keep_the_lowest_addresses_and_exact_counts(tmp_path):
    ram = bytearray(64 * PAGE)
    for i in range(50):
        put(ram, i * 1000, marker(N, seq=i))
        put(ram, 60_000 + i * 1000, marker(OTHER, seq=i))
        t = bytearray(marker(N, seq=i))
        t[63] ^= 1
        put(ram, 120_000 + i * 1000, bytes(t))
    path = dump_file(tmp_path, w.elf_core([Load(0, bytes(ram))]))
    with open_dump(path) as d:
        for threads in (1, 3):
            r = d.scan(nonce=N, max_listed=5, max_markers=7, threads=threads)
            assert (r.valid_count, r.stale_count, r.torn_count) == (50, 50, 50)
            assert [h.phys for h in r.markers] == [i * 1000 for i in range(7)]
            assert [h.phys for h in r.stale] == [60_000 + i * 1000 for i in range(5)]
            assert [t.phys for t in r.torn] == [120_000 + i * 1000 for i in range(5)]
            assert r.markers_truncated


def test_threads_agree_at_every_split_point(tmp_path):
    """Records straddling the places where the work is split between threads."""
    rng = random.Random(7)
    size_a, size_b = 700_001, 300_007
    total = size_a + size_b
    starts = set()
    for n in range(2, 9):
        for t in range(1, n):
            starts.add(total * t // n - rng.randrange(1, 63))
    for _ in range(300):
        starts.add(rng.randrange(0, total - 64))
    chosen, last = [], -1000
    for s in sorted(starts):                     # keep records apart
        if s - last >= 64 and not (size_a - 64 < s < size_a):
            chosen.append(s)
            last = s
    ram = bytearray(total)
    for i, s in enumerate(chosen):
        put(ram, s, marker(N, seq=i))
    base_b = 0x1000_0000
    path = dump_file(tmp_path, w.elf_core([Load(0, bytes(ram[:size_a])), Load(base_b, bytes(ram[size_a:]))],
                                          align=8))
    expected = [s if s < size_a else base_b + s - size_a for s in chosen]
    with open_dump(path) as d:
        for threads in range(1, 9):
            r = d.scan(nonce=N, threads=threads)
            assert [h.phys for h in r.markers] == expected, threads
            assert r.threads == threads and r.torn_count == 0


def test_ten_thousand_hits_come_back_decoded(tmp_path):
    n = 12_000
    ram = bytearray(n * 80)
    for i in range(n):
        put(ram, i * 80 + 3, marker(N, seq=i, slot=i % 64, source=NIC, iova=i * 64, t_ns=i * 1000))
    path = dump_file(tmp_path, w.elf_core([Load(0x1_0000_0000, bytes(ram))]))
    with open_dump(path) as d:
        r = d.scan(nonce=N)
    assert r.valid_count == len(r.markers) == n
    last = r.markers[-1]
    assert (last.phys, last.seq, last.slot, last.iova, last.t_ns, last.source) == (
        0x1_0000_0000 + (n - 1) * 80 + 3, n - 1, (n - 1) % 64, (n - 1) * 64, (n - 1) * 1000, NIC)


def test_reserved_bytes_are_reported(tmp_path):
    body = bytearray(marker(N)[:60])
    body[50] = 7
    rec = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    path = dump_file(tmp_path, w.elf_core([Load(0, rec + bytes(64))]))
    with open_dump(path) as d:
        (hit,) = d.scan().markers
    assert hit.reserved_nonzero


# ---------------------------------------------------------------- read_phys

def test_read_phys_and_its_errors(tmp_path):
    data = os.urandom(2 * PAGE)
    path = dump_file(tmp_path, w.elf_core([Load(0x1000, data), Load(0x10_0000, data[:PAGE])]))
    with open_dump(path) as d:
        assert d.read_phys(0x1000 + 5, 100) == data[5:105]
        assert d.read_phys(0x1000, 0) == b""
        assert d.contains(0x1000, 2 * PAGE) and not d.contains(0x1000, 2 * PAGE + 1)
        with pytest.raises(AddressNotPresentError) as e:
            d.read_phys(0x1000 + 2 * PAGE - 8, 16)
        assert f"{0x3000:#x}" in one_line(e.value)
        with pytest.raises(AddressNotPresentError):
            d.read_phys(0, 1)
        with pytest.raises(InvalidArgumentError):
            d.read_phys(2**64 - 10, 20)
        with pytest.raises(InvalidArgumentError):
            d.read_phys(-1, 1)
        with pytest.raises(InvalidArgumentError):
            d.read_phys(0x1000, -1)
    with pytest.raises(InvalidArgumentError):
        d.read_phys(0x1000, 1)                   # closed
    d.close()                                    # idempotent


# ---------------------------------------------------------------- raw guest RAM

def test_raw_guest_ram(tmp_path):
    ram = bytearray(3 * MiB)
    put(ram, 123, marker(N, seq=1))
    put(ram, 2 * MiB + 77, marker(N, seq=2))
    put(ram, 2 * MiB - 30, marker(N, seq=3))                    # straddles two unrelated ranges
    path = dump_file(tmp_path, bytes(ram), "ram")
    with open_dump(path, raw_ranges=[(0, 0, 2 * MiB), (2 * MiB, 0x1_0000_0000, MiB)]) as d:
        assert (d.format, d.ranges) == ("raw", (PhysRange(0, 2 * MiB), PhysRange(0x1_0000_0000, MiB)))
        r = d.scan()
        assert [h.phys for h in r.markers] == [123, 0x1_0000_0000 + 77]
        assert (r.valid_count, r.torn_count) == (2, 0)
        assert d.read_phys(0x1_0000_0000 + 77, 64) == marker(N, seq=2)
    # physically contiguous ranges whose file pieces are swapped: the seam is stitched
    with open_dump(path, raw_ranges=[(MiB, 0, MiB), (0, MiB, MiB)]) as d:
        assert d.ranges == (PhysRange(0, 2 * MiB),)
        r = d.scan()
        assert sorted(h.seq for h in r.markers) == [1]          # record at 2MiB-30 now spans phys 2MiB-30..
        assert d.read_phys(MiB + 123, 64) == marker(N, seq=1)


@pytest.mark.parametrize("ranges, words", [
    ([(0, 0, MiB), (0, MiB // 2, MiB)], "overlap"),
    ([(0, 0, 4 * MiB)], "past end of file"),
    ([(0, 0, 0)], "empty"),
    ([(0, 2**64 - 10, 100)], "wraps"),
    ([], "no raw ranges"),
])
def test_raw_range_errors(tmp_path, ranges, words):
    path = dump_file(tmp_path, bytes(2 * MiB), "ram")
    with pytest.raises(InvalidArgumentError) as e:
        open_dump(path, raw_ranges=ranges)
    assert words in one_line(e.value)


# ---------------------------------------------------------------- canaries

def test_canaries_intact_changed_missing(tmp_path):
    base = 0x10_0000
    ram = bytearray(8 * PAGE)
    for i in range(8):
        put(ram, i * PAGE, markers.canary_page(N, i, base + i * PAGE))
    frame = marker(N, seq=99, source=NIC)
    put(ram, 1 * PAGE + 14, frame)                              # a NIC frame landed in canary 1
    ram[1 * PAGE + 4000] ^= 0xFF
    path = dump_file(tmp_path, w.elf_core([Load(base, bytes(ram[:7 * PAGE] + ram[7 * PAGE:7 * PAGE + 100]))]))
    pages = [(0, base), (1, base + PAGE), (2, 0x5000_0000), (7, base + 7 * PAGE), (3, base + 3 * PAGE)]
    with open_dump(path) as d:
        res = d.check_canaries(N, pages)
    assert [(c.index, c.state) for c in res] == [
        (0, CanaryState.INTACT), (1, CanaryState.CHANGED), (2, CanaryState.MISSING),
        (7, CanaryState.MISSING), (3, CanaryState.INTACT)]
    changed = res[1]
    expected = markers.canary_page(N, 1, base + PAGE)
    assert changed.changed_bytes == sum(a != b for a, b in zip(ram[PAGE:2 * PAGE], expected))
    first, last = changed.diffs[0], changed.diffs[-1]
    assert first.phys == base + PAGE + first.offset and 14 <= first.offset < 14 + 64
    assert bytes.fromhex(first.found_hex) == bytes(ram[PAGE + first.offset:PAGE + first.offset + len(first.found_hex) // 2])
    assert (last.offset, last.length) == (4000, 1)
    assert bytes.fromhex(last.found_hex) == bytes([expected[4000] ^ 0xFF])
    assert res[2].detail == "not in the dump" and res[3].detail == "partly in the dump"
    assert not changed.diffs_truncated


def test_canary_diffs_are_bounded(tmp_path):
    ram = bytearray(markers.canary_page(N, 0, 0))
    for i in range(0, PAGE, 100):
        ram[i] ^= 1
    path = dump_file(tmp_path, w.elf_core([Load(0, bytes(ram))]))
    with open_dump(path) as d:
        (res,) = d.check_canaries(N, [(0, 0)])
    assert res.state == CanaryState.CHANGED and res.changed_bytes == len(range(0, PAGE, 100))
    assert len(res.diffs) == checker.CANARY_MAX_DIFFS and res.diffs_truncated


# ---------------------------------------------------------------- kdump-compressed and flattened

def kdump_pages():
    """pfn -> page, with pfns 4 and 9 excluded; marker positions by phys."""
    pages = {pfn: bytes(PAGE) for pfn in range(12) if pfn not in (4, 9)}
    found = {}

    def place(pfn, off, rec):
        nonlocal pages
        page = bytearray(pages[pfn])
        put(page, off, rec[:PAGE - off])
        pages[pfn] = bytes(page)
        if off + len(rec) > PAGE and pfn + 1 in pages:
            nxt = bytearray(pages[pfn + 1])
            put(nxt, 0, rec[PAGE - off:])
            pages[pfn + 1] = bytes(nxt)

    place(0, 14, marker(N, seq=1)); found[14] = 1
    place(1, PAGE - 30, marker(N, seq=2)); found[2 * PAGE - 30] = 2       # across pages 1-2
    place(3, PAGE - 30, marker(N, seq=3))                                   # into excluded page 4
    place(10, 500, marker(N, seq=4)); found[10 * PAGE + 500] = 4
    page5 = bytearray(os.urandom(PAGE))
    page5[100:164] = marker(N, seq=5)
    pages[5] = bytes(page5); found[5 * PAGE + 100] = 5
    return pages, found


@pytest.mark.parametrize("compress", ["zlib", "none", "mixed"])
def test_kdump_compressed(tmp_path, compress):
    pages, found = kdump_pages()
    path = dump_file(tmp_path, w.kdump_compressed(pages, 16, compress=compress))
    with open_dump(path) as d:
        assert (d.format, d.flattened) == ("kdump", False)
        assert "libkdumpfile" in d.format_detail
        assert d.ranges == (PhysRange(0, 4 * PAGE), PhysRange(5 * PAGE, 4 * PAGE),
                            PhysRange(10 * PAGE, 2 * PAGE))
        for threads in (1, 2, 3):
            r = d.scan(nonce=N, threads=threads)
            assert {h.phys: h.seq for h in r.markers} == found
            assert (r.torn_count, r.bytes_scanned) == (0, 10 * PAGE)
        assert d.read_phys(5 * PAGE, PAGE) == pages[5]
        assert d.read_phys(2 * PAGE - 30, 64) == marker(N, seq=2)
        with pytest.raises(AddressNotPresentError):
            d.read_phys(4 * PAGE, 1)


def test_flattened_kdump_and_elf_read_like_the_originals(tmp_path):
    pages, found = kdump_pages()
    image = w.kdump_compressed(pages, 16, compress="mixed")
    flat = dump_file(tmp_path, w.flatten(image, chunk=1000, trailing=os.urandom(3000)), "flat")
    with open_dump(flat, tmpdir=str(tmp_path)) as d, open_dump(dump_file(tmp_path, image)) as plain:
        assert (d.format, d.flattened) == ("kdump", True)
        assert d.ranges == plain.ranges
        assert d.scan(nonce=N).markers == plain.scan(nonce=N).markers
        assert d.read_phys(5 * PAGE, PAGE) == pages[5]
    assert set(os.listdir(tmp_path)) == {"flat", "vmcore"}     # the reassembled copy is unlinked

    ram = bytearray(PAGE)
    put(ram, 7, marker(N, seq=8))
    elf_flat = dump_file(tmp_path, w.flatten(w.elf_core([Load(0x8000, bytes(ram))]), chunk=333), "elf-flat")
    with open_dump(elf_flat) as d:
        assert (d.format, d.flattened) == ("elf", True)
        assert [h.phys for h in d.scan().markers] == [0x8000 + 7]


def test_flattened_needs_a_usable_tmpdir(tmp_path):
    flat = dump_file(tmp_path, w.flatten(w.kdump_compressed({0: bytes(PAGE)}, 4)))
    with pytest.raises(CheckerOSError) as e:
        open_dump(flat, tmpdir=str(tmp_path / "missing"))
    assert "temporary" in one_line(e.value)


def test_corrupt_compressed_page_is_unreadable_not_fatal(tmp_path):
    good, bad = bytearray(os.urandom(PAGE)), bytearray(PAGE)
    put(good, 10, marker(N, seq=1))
    put(bad, 10, marker(N, seq=2))
    image = bytearray(w.kdump_compressed({0: bytes(good), 1: bytes(bad), 2: bytes(good)}, 8, compress="zlib"))
    desc_off = (1 + 1 + 2) * PAGE                               # header, sub-header, 2 bitmap blocks
    off1, size1 = struct.unpack_from("<QI", image, desc_off + 24)
    image[off1 + 2:off1 + size1] = b"\xa5" * (size1 - 2)        # page 1's zlib stream
    path = dump_file(tmp_path, bytes(image))
    with open_dump(path) as d:
        with pytest.raises(DumpReadError) as e:
            d.scan()
        assert "could not be read" in one_line(e.value)
        r = d.scan(nonce=N, allow_unreadable=True)
        with pytest.raises(DumpReadError):
            d.read_phys(PAGE, 8)
    assert [h.phys for h in r.markers] == [10, 2 * PAGE + 10]
    assert r.unreadable == (PhysRange(PAGE, PAGE),) and r.unreadable_bytes == PAGE
    assert not r.complete and r.bytes_scanned == 2 * PAGE and r.unreadable_reason


@pytest.mark.parametrize("bad_pages", [(0,), (0, 1), (1,)])
def test_read_past_a_corrupt_last_page_is_not_present(tmp_path, bad_pages):
    """A read running off the end of a range into a gap is AddressNotPresentError,
    even when the range's last page cannot be decompressed: presence is checked
    before any page is read (fuzz_khscan.c found DumpReadError here)."""
    pages = {pfn: bytes([0x40 + pfn]) * PAGE for pfn in (0, 1, 3)}   # ranges: pfns 0-1 and 3
    image = bytearray(w.kdump_compressed(pages, 8, compress="zlib"))
    desc_off = (1 + 1 + 2) * PAGE                               # header, sub-header, 2 bitmap blocks
    for k in bad_pages:                                         # descriptor k is pfn k for k < 2
        off, size = struct.unpack_from("<QI", image, desc_off + 24 * k)
        image[off + 2:off + size] = b"\xa5" * (size - 2)       # break the zlib stream
    with open_dump(dump_file(tmp_path, bytes(image))) as d:
        assert d.ranges == (PhysRange(0, 2 * PAGE), PhysRange(3 * PAGE, PAGE))
        last = 1 if 1 in bad_pages else 0
        with pytest.raises(DumpReadError):                      # the corrupt page itself
            d.read_phys(last * PAGE, 2)
        for phys, length in [(2 * PAGE - 1, 2), (2 * PAGE - 8, 16), (0, 2 * PAGE + 1),
                             (PAGE, 3 * PAGE), (2 * PAGE, 1)]:
            with pytest.raises(AddressNotPresentError) as e:
                d.read_phys(phys, length)
            assert f"{2 * PAGE:#x}" in one_line(e.value)        # the first missing byte
        assert not d.contains(2 * PAGE - 1, 2)
        assert d.read_phys(3 * PAGE, PAGE) == pages[3]          # the good range still reads
        with pytest.raises(AddressNotPresentError):
            d.read_phys(4 * PAGE - 1, 2)
        (canary,) = d.check_canaries(N, [(0, 2 * PAGE - PAGE // 2)])
        assert canary.state == CanaryState.MISSING and canary.detail == "partly in the dump"


def test_read_past_the_end_of_an_elf_range_is_not_present(tmp_path):
    """The same straddling reads on ELF data, file bytes and zero-fill alike."""
    data = os.urandom(PAGE)
    path = dump_file(tmp_path, w.elf_core([Load(0, data), Load(4 * PAGE, data[:100], memsz=PAGE)]))
    with open_dump(path) as d:
        assert d.ranges == (PhysRange(0, PAGE), PhysRange(4 * PAGE, PAGE))
        for phys in (PAGE - 1, 5 * PAGE - 1):
            assert d.read_phys(phys, 1) == (data[-1:] if phys < PAGE else b"\0")
            with pytest.raises(AddressNotPresentError):
                d.read_phys(phys, 2)


def test_kdump_split_part_is_unsupported(tmp_path):
    image = bytearray(w.kdump_compressed({0: bytes(PAGE)}, 4))
    struct.pack_into("<i", image, PAGE + 12, 1)                 # sub-header: split
    with pytest.raises(UnsupportedDumpError) as e:
        open_dump(dump_file(tmp_path, bytes(image)))
    assert "--split" in one_line(e.value)


# ---------------------------------------------------------------- hostile input

def elf_with(**patch) -> bytes:
    """A valid small ELF core with header/phdr fields patched (offsets below)."""
    data = bytearray(w.elf_core([Load(0x1000, bytes(PAGE))]))
    fields = {  # name: (offset, format)
        "e_type": (16, "<H"), "e_phoff": (32, "<Q"), "e_phentsize": (54, "<H"), "e_phnum": (56, "<H"),
        "p_type": (64 + 56, "<I"), "p_offset": (64 + 56 + 8, "<Q"), "p_paddr": (64 + 56 + 24, "<Q"),
        "p_filesz": (64 + 56 + 32, "<Q"), "p_memsz": (64 + 56 + 40, "<Q"),
    }
    for name, value in patch.items():
        off, fmt = fields[name]
        struct.pack_into(fmt, data, off, value)
    return bytes(data)


ELF_OK = w.elf_core([Load(0x1000, bytes(PAGE))])
KDUMP_OK = w.kdump_compressed({0: bytes(PAGE), 2: os.urandom(PAGE)}, 8, compress="mixed")


@pytest.mark.parametrize("data, exc, words", [
    (b"", DumpFormatError, "empty"),
    (b"\x7fE", DumpFormatError, "too short"),
    (b"hello, world, this is not a dump", DumpFormatError, "unrecognised"),
    (ELF_OK[:10], DumpFormatError, "truncated ELF header"),
    (ELF_OK[:63], DumpFormatError, "truncated ELF header"),
    (ELF_OK[:64 + 56 + 20], DumpFormatError, "program header table"),
    (ELF_OK[:-100], DumpFormatError, "truncated dump"),
    (ELF_OK[:4] + b"\x01" + ELF_OK[5:], UnsupportedDumpError, "32-bit"),
    (ELF_OK[:5] + b"\x02" + ELF_OK[6:], UnsupportedDumpError, "big-endian"),
    (ELF_OK[:4] + b"\x07" + ELF_OK[5:], DumpFormatError, "ELF class"),
    (elf_with(e_type=2), DumpFormatError, "not a core dump"),
    (elf_with(e_phoff=2**63), DumpFormatError, "program header table"),
    (elf_with(e_phoff=2**64 - 8), DumpFormatError, "program header table"),
    (elf_with(e_phnum=0xFFFE), DumpFormatError, "program header table"),
    (elf_with(e_phnum=0xFFFF), DumpFormatError, "PN_XNUM"),
    (elf_with(e_phnum=0), DumpFormatError, "no program headers"),
    (elf_with(e_phentsize=20), DumpFormatError, "program header size"),
    (elf_with(p_type=0, e_phnum=1), DumpFormatError, "no PT_LOAD"),
    (elf_with(p_offset=2**64 - 100), DumpFormatError, "past end of file"),
    (elf_with(p_filesz=2**40, p_memsz=2**40), DumpFormatError, "past end of file"),
    (elf_with(p_filesz=PAGE, p_memsz=10), DumpFormatError, "p_filesz"),
    (elf_with(p_paddr=2**64 - 100), DumpFormatError, "wraps"),
    (KDUMP_OK[:300], DumpFormatError, "truncated kdump-compressed header"),
    (KDUMP_OK[:PAGE + 50], DumpFormatError, "sub-header"),
    (KDUMP_OK[:3 * PAGE], DumpFormatError, "page bitmap"),
    (KDUMP_OK[:4 * PAGE + 30], DumpFormatError, "page descriptor table"),
    (KDUMP_OK[:-10], DumpFormatError, "truncated dump"),
    (KDUMP_OK[:428] + struct.pack("<i", 5000) + KDUMP_OK[432:], DumpFormatError, "power of two"),
    (KDUMP_OK[:428] + struct.pack("<i", 100) + KDUMP_OK[432:], DumpFormatError, "block size"),
    (w.flatten(KDUMP_OK)[:-16], DumpFormatError, "end marker"),
    (w.flatten(KDUMP_OK)[:-100], DumpFormatError, "truncated"),
    (w.flatten(KDUMP_OK)[:3000], DumpFormatError, "truncated flattened header"),
    (w.flatten(KDUMP_OK)[:4096] + struct.pack(">qq", 2**40, 8) + bytes(8) + struct.pack(">qq", -1, -1),
     DumpFormatError, "far beyond"),
    (w.flatten(KDUMP_OK)[:4096] + struct.pack(">qq", -5, 8) + bytes(8), DumpFormatError, "bad flattened record"),
    (w.flatten(b"garbage!" * 100), DumpFormatError, "neither ELF nor"),
    (w.flatten(w.flatten(ELF_OK)), DumpFormatError, "neither ELF nor"),
    (w.flatten(b""), DumpFormatError, "holds no data"),
    (w.flatten(KDUMP_OK)[:16] + struct.pack(">q", 2) + w.flatten(KDUMP_OK)[24:], UnsupportedDumpError, "type 2"),
])
def test_bad_input_is_one_clear_exception(tmp_path, data, exc, words):
    path = dump_file(tmp_path, data)
    with pytest.raises(exc) as e:
        with open_dump(path) as d:
            d.scan()
    assert words in one_line(e.value)
    assert isinstance(e.value, checker.CheckerError) and e.value.exit_code == 2


def test_missing_and_odd_files(tmp_path):
    with pytest.raises(CheckerOSError) as e:
        open_dump(tmp_path / "nope")
    assert "No such file" in one_line(e.value) and e.value.errno == 2
    with pytest.raises(UnsupportedDumpError, match="regular file"):
        open_dump(tmp_path)


BITFLIP_SCRIPT = r"""
import os, random, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from harness import checker
import test_checker_dumps as w
rng = random.Random(int(sys.argv[3]))
path = os.path.join(sys.argv[4], "flipped")
n_err = n_ok = 0
for name, seed in w.seeds():
    for i in range(int(sys.argv[5])):
        data = bytearray(seed)
        for _ in range(rng.choice((1, 1, 2, 8))):
            # mostly the headers: that is where the lengths and offsets live
            limit = len(data) if rng.random() < 0.3 else min(len(data), 5000)
            data[rng.randrange(limit)] ^= 1 << rng.randrange(8)
        if rng.random() < 0.1:
            del data[rng.randrange(len(data)):]
        with open(path, "wb") as f:
            f.write(data)
        try:
            with checker.open_dump(path, tmpdir=sys.argv[4]) as d:
                d.scan(allow_unreadable=True, threads=rng.choice((1, 2)))
                for r in d.ranges[:4]:
                    try:
                        d.read_phys(r.start, min(r.length, 256))
                    except checker.DumpReadError:
                        pass
            n_ok += 1
        except checker.CheckerError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            n_err += 1
print(n_ok, n_err)
"""


def test_bit_flipped_dumps_never_crash(tmp_path):
    """Random bit flips and truncations of every seed format, in a child process so a
    crash shows up as a failure with its output rather than killing pytest."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-c", BITFLIP_SCRIPT, root, here, "1", str(tmp_path), "1000"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    ok, err = map(int, p.stdout.split())
    assert ok + err == 5 * 1000 and err > 0 and ok > 0


# ---------------------------------------------------------------- agreement with drgn

def test_drgn_reads_the_same_physical_bytes(tmp_path):
    drgn = pytest.importorskip("drgn")
    rng = random.Random(3)
    ram = bytearray(rng.randbytes(64 * PAGE))
    planted = []
    for i in range(40):
        off = rng.randrange(0, len(ram) - 64)
        if all(abs(off - p) >= 64 for p in planted):
            put(ram, off, marker(N, seq=i))
            planted.append(off)
    base = 0x100_0000
    loads = [Load(base + 8 * PAGE, bytes(ram[8 * PAGE:24 * PAGE]), vaddr=0xFFFFFFFF81000000),  # alias
             Load(base, bytes(ram[:40 * PAGE])), Load(base + 40 * PAGE, bytes(ram[40 * PAGE:]))]
    path = dump_file(tmp_path, w.elf_core(loads))
    prog = drgn.Program()
    prog.set_core_dump(path)
    with open_dump(path) as d:
        r = d.scan()
        assert sorted(h.phys for h in r.markers) == sorted(base + p for p in planted)
        for h in r.markers:
            assert prog.read(h.phys, 64, True) == d.read_phys(h.phys, 64) == marker(N, seq=h.seq)
        for _ in range(200):
            a = base + rng.randrange(0, len(ram) - 100)
            assert prog.read(a, 100, True) == d.read_phys(a, 100) == bytes(ram[a - base:a - base + 100])
        it = prog.search_memory(markers.MAGIC).set_address_range(0, 2**64 - 1, physical=True)
        assert sorted(set(it)) == [h.phys for h in r.markers]


# ---------------------------------------------------------------- QEMU's own dumps

@pytest.fixture(scope="module")
def qemu_dumps(tmp_path_factory):
    """A 32 MiB guest that never runs (-S): its RAM is a file we wrote markers into,
    then QEMU 7.2 dumps it as ELF and as (flattened) kdump-zlib."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from qemu.qmp.legacy import QEMUMonitorProtocol
    d = tmp_path_factory.mktemp("qemu")
    ram = bytearray(32 * MiB)
    planted = {0x123456: 1, 32 * MiB - 64: 2, 0x200000 - 20: 3}
    for phys, seq in planted.items():
        put(ram, phys, marker(N, seq=seq, source=NIC))
    torn = bytearray(marker(N, seq=4))
    torn[30] ^= 4
    put(ram, 0x300001, bytes(torn))
    (d / "ram").write_bytes(bytes(ram))
    sock = str(d / "qmp.sock")
    qmp = QEMUMonitorProtocol(sock, server=True)
    proc = subprocess.Popen(
        [qemu, "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "32M",
         "-object", f"memory-backend-file,id=m,size=32M,mem-path={d / 'ram'},share=on",
         "-machine", "pc,memory-backend=m", "-qmp", f"unix:{sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        qmp.accept(timeout=30)
        for fmt in ("elf", "kdump-zlib"):
            qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{d / ('dump.' + fmt)}", format=fmt)
        qmp.cmd("quit")
        proc.wait(timeout=30)
    finally:
        try:
            qmp.close()
        except (EOFError, ConnectionError):    # QEMU hung up first after quit
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        proc.stdout and proc.stdout.close()
    assert (d / "dump.elf").exists(), out
    return d, planted


@pytest.mark.parametrize("name, fmt, flattened", [("dump.elf", "elf", False), ("dump.kdump-zlib", "kdump", True)])
def test_qemu_dump_guest_memory(qemu_dumps, name, fmt, flattened):
    d, planted = qemu_dumps
    with open_dump(d / name, tmpdir=str(d)) as dump:
        assert (dump.format, dump.flattened) == (fmt, flattened)
        assert dump.ranges[0] == PhysRange(0, 32 * MiB)
        r = dump.scan(nonce=N)
        assert {h.phys: h.seq for h in r.markers} == planted
        assert [t.phys for t in r.torn] == [0x300001]
        assert dump.read_phys(0x123456, 64) == marker(N, seq=1, source=NIC)
    with open_dump(d / "ram", raw_ranges=[(0, 0, 32 * MiB)]) as raw:
        assert {h.phys: h.seq for h in raw.scan(nonce=N).markers} == planted
