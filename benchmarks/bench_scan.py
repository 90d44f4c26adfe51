"""How fast does the checker scan a vmcore, against drgn, memmem and mmap.find?

    python benchmarks/bench_scan.py                  # makes a 1 GiB synthetic ELF vmcore
    python benchmarks/bench_scan.py --vmcore PATH    # or measures a real one
    python benchmarks/bench_scan.py --size-mib 256 --repeat 5 --keep

Everything is read from the page cache (the file is read once before timing).
Each figure is the best of --repeat runs. Measured here, never asserted in tests.

- checker: open_dump() + scan(nonce): ELF parse, PT_LOAD dedupe, byte-wise search,
  decode and CRC check of every hit, all threads (one per CPU by default).
- drgn:    Program.set_core_dump() + search_memory(MAGIC) over the whole physical
  address space (set_address_range(0, 2**64-1, physical=True)).
- memmem:  one plain single-threaded glibc memmem() pass over the mmapped file,
  counting occurrences (C, in harness._checker).
- mmap.find: Python's mmap.find() in a loop over the mmapped file.

Ratios are speed ratios over the same file (time of the other / time of the checker).
"""

from __future__ import annotations

import argparse
import bisect
import mmap
import os
import random
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import checker, markers  # noqa: E402

MiB = 1 << 20
PAGE = 4096


def make_vmcore(path: str, size_mib: int, nmarkers: int, nonce: int, seed: int = 1) -> int:
    """Write an ELF vmcore shaped like kdump's: a PT_NOTE, a kernel-text PT_LOAD that
    aliases part of RAM, and RAM in three PT_LOADs with a hole (the crash kernel's
    reservation). Half the pages are zero, half random; markers land at random
    unaligned addresses. Returns the number of markers written once in physical
    memory (ones inside the aliased text are in the file twice)."""
    rng = random.Random(seed)
    ram = size_mib * MiB
    hole = (ram // 4, ram // 4 + 64 * MiB) if ram >= 256 * MiB else (ram // 2, ram // 2 + MiB)
    loads = [(0x1000, 0x9F000), (0x100000, hole[0] - 0x100000), (hole[1], ram - hole[1])]
    text = (0x1000000, 32 * MiB) if ram >= 128 * MiB else (0x100000, MiB)
    phdrs = [text] + loads
    nph = 1 + len(phdrs)
    notes = b"\0" * 64
    off = 64 + nph * 56 + len(notes)
    placed = []
    for paddr, size in phdrs:
        off = (off + PAGE - 1) // PAGE * PAGE
        placed.append(off)
        off += size
    eh = (b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 +
          struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, nph, 64, 0, 0))
    ph = struct.pack("<IIQQQQQQ", 4, 0, 64 + nph * 56, 0, 0, len(notes), 0, 1)
    for (paddr, size), o in zip(phdrs, placed):
        vaddr = 0xFFFFFFFF81000000 if (paddr, size) == text else 0xFFFF888000000000 + paddr
        ph += struct.pack("<IIQQQQQQ", 1, 7, o, vaddr, paddr, size, size, 0)

    # one marker in each of `nmarkers` random RAM pages, at a random unaligned offset
    pages = []
    for paddr, size in loads[1:]:
        pages.extend(range((paddr + PAGE - 1) // PAGE, (paddr + size) // PAGE))
    positions = sorted(pfn * PAGE + rng.randrange(0, PAGE - 64)
                       for pfn in rng.sample(pages, min(nmarkers, len(pages))))
    records = {p: markers.pack(markers.Marker(nonce, markers.Source.NIC, i % 64, i, 0, i))
               for i, p in enumerate(positions)}
    pool = [rng.randbytes(PAGE) for _ in range(251)]

    def ram_bytes(paddr: int, size: int) -> bytes:
        """RAM content is a function of the physical address only, so the kernel-text
        alias holds the same bytes as the direct map, as in a real vmcore."""
        buf = bytearray(size)
        for pg in range(paddr // PAGE * PAGE, paddr + size, PAGE):
            pfn = pg // PAGE
            if (pfn * 2654435761) & 0x100:      # about half the pages are not zero
                a, b = max(pg, paddr), min(pg + PAGE, paddr + size)
                buf[a - paddr:b - paddr] = pool[pfn % 251][a - pg:b - pg]
        i = bisect.bisect_left(positions, paddr - 63)
        while i < len(positions) and positions[i] < paddr + size:
            p = positions[i]
            a, b = max(p, paddr), min(p + 64, paddr + size)
            buf[a - paddr:b - paddr] = records[p][a - p:b - p]
            i += 1
        return bytes(buf)

    with open(path, "wb") as f:
        f.write(eh + ph + notes)
        for (paddr, size), o in zip(phdrs, placed):
            f.seek(o)
            for chunk in range(0, size, 64 * MiB):
                n = min(64 * MiB, size - chunk)
                f.write(ram_bytes(paddr + chunk, n))
    return len(positions)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def best(fn, repeat: int):
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def run_checker(path: str, nonce, threads: int):
    with checker.open_dump(path) as d:
        r = d.scan(nonce=nonce, threads=threads)
        return r.valid_count, r.torn_count, r.stale_count, d.total_bytes


def run_drgn(path: str) -> int:
    import drgn
    prog = drgn.Program()
    prog.set_core_dump(path)
    it = prog.search_memory(markers.MAGIC).set_address_range(0, 2**64 - 1, physical=True)
    return sum(1 for _ in it)


def run_mmap_find(path: str) -> int:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        n, p = 0, m.find(markers.MAGIC)
        while p >= 0:
            n += 1
            p = m.find(markers.MAGIC, p + 1)
        return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmcore", help="measure this dump instead of a synthetic one")
    ap.add_argument("--size-mib", type=int, default=1024, help="synthetic RAM size (default 1024)")
    ap.add_argument("--markers", type=int, default=10000, help="synthetic markers (default 10000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="checker threads (default: one per CPU)")
    ap.add_argument("--nonce", type=lambda s: int(s, 16), help="nonce filter for a real vmcore")
    ap.add_argument("--dir", default=None, help="where to write the synthetic vmcore (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic vmcore")
    ap.add_argument("--skip-drgn", action="store_true")
    args = ap.parse_args(argv)

    tmp = None
    nonce = args.nonce
    planted = None
    if args.vmcore:
        path = args.vmcore
    else:
        nonce = 0x5EED5EED5EED5EED
        fd, path = tempfile.mkstemp(prefix="bench-vmcore-", dir=args.dir)
        os.close(fd)
        tmp = path
        t0 = time.perf_counter()
        planted = make_vmcore(path, args.size_mib, args.markers, nonce)
        print(f"wrote {path}: {os.path.getsize(path) / MiB:.0f} MiB, {planted} markers "
              f"({time.perf_counter() - t0:.1f} s)")
    try:
        size = os.path.getsize(path)
        warm(path)
        print(f"file: {path}  {size / 1e9:.3f} GB, CPUs online: {os.cpu_count()}, repeat: {args.repeat}")

        results = {}
        t, (valid, torn, stale, phys) = best(lambda: run_checker(path, nonce, args.threads), args.repeat)
        results["checker"] = t
        print(f"checker    {t:8.4f} s  {size / t / 1e9:6.2f} GB/s  "
              f"valid={valid} torn={torn} stale={stale} (physical bytes {phys})")
        if planted is not None and valid != planted:
            print(f"  WARNING: {planted} markers planted, checker found {valid}")
        t1, _ = best(lambda: run_checker(path, nonce, 1), args.repeat)
        print(f"checker/1T {t1:8.4f} s  {size / t1 / 1e9:6.2f} GB/s  (one thread)")

        if not args.skip_drgn:
            try:
                t, n = best(lambda: run_drgn(path), args.repeat)
                results["drgn"] = t
                print(f"drgn       {t:8.4f} s  {size / t / 1e9:6.2f} GB/s  matches={n}")
            except ImportError:
                print("drgn       not installed")
        t, n = best(lambda: checker.memmem_count(path), args.repeat)
        results["memmem"] = t
        print(f"memmem     {t:8.4f} s  {size / t / 1e9:6.2f} GB/s  matches={n}")
        t, n = best(lambda: run_mmap_find(path), max(1, min(args.repeat, 2)))
        results["mmap.find"] = t
        print(f"mmap.find  {t:8.4f} s  {size / t / 1e9:6.2f} GB/s  matches={n}")

        c = results["checker"]
        print("ratios (checker speed / other speed):")
        for name in ("drgn", "memmem", "mmap.find"):
            if name in results:
                print(f"  vs {name:10} {results[name] / c:6.2f}x")
        print(f"  one thread vs memmem {results['memmem'] / t1:6.2f}x")
    finally:
        if tmp and not args.keep:
            os.unlink(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
