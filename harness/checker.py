"""Find marker records in a memory dump: the typed face of the C checker.

    with open_dump("vmcore") as dump:          # ELF, kdump-compressed (plain or flattened)
        result = dump.scan(nonce=run_nonce)    # every guest-physical byte, byte-wise
        for hit in result.markers:
            print(hex(hit.phys), hit.source, hit.seq, hit.slot)
        page = dump.read_phys(0x1000, 4096)
        report = dump.check_canaries(run_nonce, [(0, 0x2000_0000), (1, 0x2000_1000)])

    open_dump("guest-ram.bin", raw_ranges=[(0, 0, 1 << 30)])   # QEMU memory-backend-file

The work is done by csrc/checker/khscan.c (compiled as harness._checker); C returns
status codes and `_raise_for_status` is the one place that turns them into
exceptions. Every exception is a `CheckerError` whose text is one line.

A `Dump` is used by one thread at a time; its memory is released by `close()` (or
the `with` block), else by the garbage collector through `ffi.gc`.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple, Union

from . import markers
from ._checker import ffi, lib
from .errors import EXIT_HOST, EXIT_USAGE, HarnessError

__all__ = [
    "CheckerError", "DumpFormatError", "UnsupportedDumpError", "DumpReadError",
    "AddressNotPresentError", "CheckerOSError", "InvalidArgumentError", "CheckerMemoryError",
    "PhysRange", "RawRange", "Hit", "TornRecord", "ScanResult",
    "CanaryState", "CanaryDiff", "CanaryResult", "Dump", "open_dump", "memmem_count",
]


# ---------------------------------------------------------------- errors

class CheckerError(HarnessError):
    """Something about a dump could not be done; `str()` is one line."""

    exit_code = EXIT_USAGE


class DumpFormatError(CheckerError):
    """The file is not a dump we can read: wrong magic, truncated, corrupt."""


class UnsupportedDumpError(DumpFormatError):
    """A well-formed dump of a kind the checker does not read (32-bit ELF, --split)."""


class DumpReadError(DumpFormatError):
    """Pages listed in the dump could not be read (a corrupt compressed page)."""


class AddressNotPresentError(CheckerError, LookupError):
    """The physical address is not in the dump."""


class InvalidArgumentError(CheckerError, ValueError):
    """The caller passed something impossible (overlapping raw ranges, ...)."""


class CheckerOSError(CheckerError, OSError):
    """A system call failed (file missing, unreadable, no temporary space)."""

    def __str__(self) -> str:
        return str(self.strerror)


class CheckerMemoryError(CheckerError, MemoryError):
    exit_code = EXIT_HOST


_STATUS_EXCEPTIONS = {
    lib.KH_ERR_NOMEM: CheckerMemoryError,
    lib.KH_ERR_FORMAT: DumpFormatError,
    lib.KH_ERR_UNSUPPORTED: UnsupportedDumpError,
    lib.KH_ERR_NOT_PRESENT: AddressNotPresentError,
    lib.KH_ERR_INVALID: InvalidArgumentError,
    lib.KH_ERR_READ: DumpReadError,
}


def _raise_for_status(status: int, err, context: str = "") -> None:
    """The one mapping from a C status code (and its kh_error) to an exception."""
    if status == lib.KH_OK:
        return
    msg = ffi.string(err.msg).decode("utf-8", "replace") or f"checker status {status}"
    if context:
        msg = f"{context}: {msg}"
    if status == lib.KH_ERR_OS:
        raise CheckerOSError(err.sys_errno, msg)
    raise _STATUS_EXCEPTIONS.get(status, CheckerError)(msg)


# ---------------------------------------------------------------- results

class PhysRange(NamedTuple):
    """Guest-physical [start, start + length)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class RawRange(NamedTuple):
    """File bytes [file_offset, file_offset + length) hold guest-physical [phys, ...)."""

    file_offset: int
    phys: int
    length: int


class Hit(NamedTuple):
    """A marker record with a good CRC, found at guest-physical `phys`."""

    phys: int
    nonce: int
    version: int
    source: int
    slot: int
    seq: int
    iova: int
    t_ns: int
    reserved_nonzero: bool = False

    def marker(self) -> markers.Marker:
        return markers.Marker(nonce=self.nonce, source=self.source, slot=self.slot,
                              seq=self.seq, iova=self.iova, t_ns=self.t_ns, version=self.version)


class TornRecord(NamedTuple):
    """Magic found, CRC wrong: a record partly overwritten (fields as they stand)."""

    phys: int
    nonce: int
    source: int
    slot: int
    seq: int
    crc_stored: int
    crc_computed: int


@dataclass(frozen=True)
class ScanResult:
    nonce: Optional[int]              # the filter; None: every valid record counted
    markers: Tuple[Hit, ...]          # valid records (lowest addresses first)
    valid_count: int                  # exact, even when `markers` was cut short
    stale_count: int                  # CRC good, another nonce
    stale: Tuple[Hit, ...]            # the first ones, bounded
    torn_count: int
    torn: Tuple[TornRecord, ...]      # the first ones, bounded
    bytes_scanned: int
    seconds: float
    threads: int
    unreadable_bytes: int = 0
    unreadable_count: int = 0
    unreadable: Tuple[PhysRange, ...] = ()
    unreadable_reason: str = ""

    @property
    def complete(self) -> bool:
        """True when every byte the dump lists was read."""
        return self.unreadable_bytes == 0

    @property
    def markers_truncated(self) -> bool:
        return len(self.markers) < self.valid_count


class CanaryState(str, enum.Enum):
    INTACT = "intact"
    MISSING = "missing"     # not (all) in the dump, or unreadable
    CHANGED = "changed"


class CanaryDiff(NamedTuple):
    """Bytes [offset, offset + length) of the page differ; hex is bounded."""

    offset: int
    length: int
    phys: int
    found_hex: str
    expected_hex: str


@dataclass(frozen=True)
class CanaryResult:
    index: int
    phys: int
    state: CanaryState
    changed_bytes: int = 0
    diffs: Tuple[CanaryDiff, ...] = ()
    diffs_truncated: bool = False
    detail: str = ""


_HIT = struct.Struct("<QQQQQIHHIIII")
if _HIT.size != ffi.sizeof("struct kh_hit"):  # pragma: no cover - build mismatch
    raise ImportError("harness._checker does not match harness/checker.py (struct kh_hit)")

_FORMATS = {lib.KH_FORMAT_ELF: "elf", lib.KH_FORMAT_KDUMP: "kdump", lib.KH_FORMAT_RAW: "raw"}

DEFAULT_MAX_LISTED = 1000
DEFAULT_MAX_MARKERS = 1_000_000
CANARY_MAX_DIFFS = 16
CANARY_MAX_HEX_BYTES = 32
_U64 = (1 << 64) - 1


def _u64(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _U64:
        raise InvalidArgumentError(f"{name} {value:#x} is not a 64-bit unsigned value")
    return value


# ---------------------------------------------------------------- the dump

class Dump:
    """An open memory dump. Make one with `open_dump`."""

    def __init__(self, handle, path: str):
        self._h = handle
        self.path = path
        self.format: str = _FORMATS.get(lib.kh_dump_format(handle), "unknown")
        self.flattened: bool = bool(lib.kh_dump_flattened(handle))
        self.format_detail: str = ffi.string(lib.kh_dump_format_detail(handle)).decode("utf-8", "replace")
        self.file_size: int = lib.kh_dump_file_size(handle)
        self.total_bytes: int = lib.kh_dump_total_bytes(handle)
        self.duplicate_bytes: int = lib.kh_dump_duplicate_bytes(handle)
        n = lib.kh_dump_nranges(handle)
        r = lib.kh_dump_ranges(handle)
        self.ranges: Tuple[PhysRange, ...] = tuple(PhysRange(r[i].phys, r[i].length) for i in range(n))

    # context manager and lifetime
    def __enter__(self) -> "Dump":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the dump now (idempotent)."""
        h, self._h = self._h, None
        if h is not None:
            ffi.release(h)

    @property
    def closed(self) -> bool:
        return self._h is None

    def _handle(self):
        if self._h is None:
            raise InvalidArgumentError(f"{self.path}: dump is closed")
        return self._h

    def __repr__(self) -> str:
        return (f"<Dump {self.path!r} {self.format}{' (flattened)' if self.flattened else ''} "
                f"{len(self.ranges)} ranges, {self.total_bytes} bytes>")

    # reading
    def contains(self, phys: int, length: int = 1) -> bool:
        """True when all of [phys, phys + length) is in the dump."""
        end = phys + length
        for r in self.ranges:
            if r.start <= phys < r.end:
                return end <= r.end
        return False

    def read_phys(self, phys: int, length: int) -> bytes:
        """The bytes at guest-physical [phys, phys + length); AddressNotPresentError
        when any of them is not in the dump."""
        phys = _u64("address", phys)
        if length < 0:
            raise InvalidArgumentError(f"negative length {length}")
        buf = bytearray(length)
        err = ffi.new("struct kh_error *")
        rc = lib.kh_read_phys(self._handle(), phys, ffi.from_buffer(buf), length, err)
        _raise_for_status(rc, err, self.path)
        return bytes(buf)

    # scanning
    def scan(self, nonce: Optional[int] = None, *, max_listed: int = DEFAULT_MAX_LISTED,
             max_markers: int = DEFAULT_MAX_MARKERS, threads: int = 0,
             allow_unreadable: bool = False) -> ScanResult:
        """Search every byte of guest-physical memory in the dump for marker records.

        `nonce` None counts every record with a good CRC as valid; otherwise records
        of another nonce are `stale`. Stale and torn records are counted exactly and
        the first `max_listed` of each are listed. Raises DumpReadError when pages
        the dump lists cannot be read, unless `allow_unreadable`.
        """
        opts = ffi.new("struct kh_scan_opts *")
        if nonce is not None:
            opts.nonce = _u64("nonce", nonce)
            opts.match_nonce = 1
        opts.nthreads = max(0, int(threads))
        opts.max_valid = max(0, int(max_markers))
        opts.max_stale = opts.max_torn = opts.max_unreadable = max(0, int(max_listed))
        out = ffi.new("struct kh_scan_result **")
        err = ffi.new("struct kh_error *")
        t0 = time.perf_counter()
        rc = lib.kh_scan(self._handle(), opts, out, err)
        seconds = time.perf_counter() - t0
        _raise_for_status(rc, err, self.path)
        res = ffi.gc(out[0], lib.kh_scan_result_free)
        try:
            result = self._convert(res, nonce, seconds)
        finally:
            ffi.release(res)
        if result.unreadable_bytes and not allow_unreadable:
            first = result.unreadable[0] if result.unreadable else None
            where = f" (first at {first.start:#x})" if first else ""
            raise DumpReadError(f"{self.path}: {result.unreadable_bytes} bytes in "
                                f"{result.unreadable_count} ranges could not be read{where}: "
                                f"{result.unreadable_reason}")
        return result

    @staticmethod
    def _convert(res, nonce: Optional[int], seconds: float) -> ScanResult:
        valid, stale, torn = [], [], []
        raw = ffi.buffer(res.hits, res.nhits * _HIT.size) if res.nhits else b""
        for (phys, h_nonce, seq, iova, t_ns, slot, version, source,
             kind, crc_stored, crc_computed, flags) in _HIT.iter_unpack(raw):
            if kind == lib.KH_HIT_TORN:
                torn.append(TornRecord(phys, h_nonce, source, slot, seq, crc_stored, crc_computed))
            else:
                hit = Hit(phys, h_nonce, version, source, slot, seq, iova, t_ns,
                          bool(flags & lib.KH_HIT_F_RESERVED_NONZERO))
                (stale if kind == lib.KH_HIT_STALE else valid).append(hit)
        unreadable = tuple(PhysRange(res.unreadable[i].phys, res.unreadable[i].length)
                           for i in range(res.unreadable_listed))
        return ScanResult(
            nonce=nonce, markers=tuple(valid), valid_count=res.n_valid,
            stale_count=res.n_stale, stale=tuple(stale),
            torn_count=res.n_torn, torn=tuple(torn),
            bytes_scanned=res.bytes_scanned, seconds=seconds, threads=res.nthreads,
            unreadable_bytes=res.unreadable_bytes, unreadable_count=res.n_unreadable,
            unreadable=unreadable,
            unreadable_reason=ffi.string(res.unreadable_msg).decode("utf-8", "replace"),
        )

    # canaries
    def check_canaries(self, nonce: int, pages: Iterable[Tuple[int, int]]) -> list[CanaryResult]:
        """Compare each canary page (index, phys) with `markers.canary_page(nonce,
        index, phys)`: intact, missing from the dump, or changed (which byte ranges,
        and what stands there now, bounded)."""
        results = []
        for index, phys in pages:
            expected = markers.canary_page(nonce, index, phys)
            try:
                found = self.read_phys(phys, len(expected))
            except AddressNotPresentError:
                part = any(self.contains(phys + off, 1) for off in range(0, len(expected), markers.PAGE_SIZE // 8))
                results.append(CanaryResult(index, phys, CanaryState.MISSING,
                                            detail="partly in the dump" if part else "not in the dump"))
                continue
            except DumpReadError as e:
                results.append(CanaryResult(index, phys, CanaryState.MISSING, detail=f"unreadable: {e}"))
                continue
            if found == expected:
                results.append(CanaryResult(index, phys, CanaryState.INTACT))
                continue
            runs = _diff_runs(found, expected)
            diffs = tuple(
                CanaryDiff(start, end - start, phys + start,
                           found[start:min(end, start + CANARY_MAX_HEX_BYTES)].hex(),
                           expected[start:min(end, start + CANARY_MAX_HEX_BYTES)].hex())
                for start, end in runs[:CANARY_MAX_DIFFS])
            results.append(CanaryResult(index, phys, CanaryState.CHANGED,
                                        changed_bytes=sum(a != b for a, b in zip(found, expected)),
                                        diffs=diffs, diffs_truncated=len(runs) > CANARY_MAX_DIFFS))
        return results


def _diff_runs(found: bytes, expected: bytes) -> list[Tuple[int, int]]:
    """Maximal [start, end) runs where the two differ, comparing record by record
    first so an intact record costs one comparison."""
    runs: list[Tuple[int, int]] = []
    step = markers.RECORD_SIZE
    for base in range(0, len(expected), step):
        if found[base:base + step] == expected[base:base + step]:
            continue
        for i in range(base, min(base + step, len(expected))):
            if found[i] != expected[i]:
                if runs and runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], i + 1)
                else:
                    runs.append((i, i + 1))
    return runs


RawRangeLike = Union[RawRange, Tuple[int, int, int]]


def open_dump(path, *, raw_ranges: Optional[Sequence[RawRangeLike]] = None,
              tmpdir: Optional[str] = None) -> Dump:
    """Open a dump, its format told by its magic: ELF core, kdump-compressed, or
    makedumpfile's flattened form (reassembled into an unlinked file in `tmpdir`,
    default $TMPDIR). With `raw_ranges` [(file_offset, phys, length), ...] the file
    is raw guest RAM instead."""
    spath = str(path)
    opts = ffi.new("struct kh_open_opts *")
    keep = []
    if raw_ranges is not None:
        rr = ffi.new("struct kh_raw_range[]", max(1, len(raw_ranges)))
        for i, r in enumerate(raw_ranges):
            off, phys, length = (int(x) for x in r)
            rr[i].file_offset = _u64("raw file offset", off)
            rr[i].phys = _u64("raw physical address", phys)
            rr[i].length = _u64("raw length", length)
        opts.raw = rr
        opts.nraw = len(raw_ranges)
        keep.append(rr)
    if tmpdir is not None:
        td = ffi.new("char[]", os.fsencode(tmpdir))
        opts.tmpdir = td
        keep.append(td)
    out = ffi.new("kh_dump **")
    err = ffi.new("struct kh_error *")
    rc = lib.kh_open(os.fsencode(path), opts, out, err)
    _raise_for_status(rc, err, spath)
    return Dump(ffi.gc(out[0], lib.kh_close), spath)


def memmem_count(path, needle: bytes = markers.MAGIC) -> int:
    """Benchmark baseline: occurrences of `needle` found by one plain memmem() pass
    over the mmapped file."""
    count = ffi.new("uint64_t *")
    err = ffi.new("struct kh_error *")
    rc = lib.kh_bench_memmem(os.fsencode(path), needle, len(needle), count, err)
    _raise_for_status(rc, err, str(path))
    return int(count[0])
