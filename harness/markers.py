"""Marker records: the self-describing 64-byte records every byte of test DMA carries.

The layout is documented in docs/markers.md and mirrored in csrc/checker/khmarker.h;
a device (or a person) that wants to take part only has to emit these records.

    offset size  field
     0      8    magic    b"KDH-MRK1"
     8      8    nonce    per-run random, so stale records from another run never count
    16      2    version  1
    18      2    source   Source (1 nic, 2 edu, 3 canary)
    20      4    slot     index of this record inside its transfer
    24      8    seq      transfer sequence number, per source
    32      8    iova     bus address the device was meant to write this record to (0 unknown)
    40      8    t_ns     sender's clock when the transfer was sent, ns since the run started
    48     12    reserved zero
    60      4    crc32    zlib CRC-32 of bytes 0..59

All integers are little-endian. Records need no alignment: a NIC frame puts them
behind a 14-byte Ethernet header.
"""

from __future__ import annotations

import enum
import secrets
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KDH-MRK1"
RECORD_SIZE = 64
VERSION = 1
PAGE_SIZE = 4096

_BODY = struct.Struct("<8sQHHIQQQ12x")  # 60 bytes, then the CRC
assert _BODY.size == 60


class Source(enum.IntEnum):
    NIC = 1
    EDU = 2
    CANARY = 3


@dataclass(frozen=True)
class Marker:
    nonce: int
    source: int
    slot: int
    seq: int
    iova: int
    t_ns: int
    version: int = VERSION


def new_nonce() -> int:
    """A random non-zero 64-bit nonce for one run."""
    while True:
        n = secrets.randbits(64)
        if n:
            return n


def pack(m: Marker) -> bytes:
    body = _BODY.pack(MAGIC, m.nonce, m.version, m.source, m.slot, m.seq, m.iova, m.t_ns)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(buf: bytes | memoryview) -> Marker | None:
    """Decode one record; None when the magic or the CRC does not match."""
    if len(buf) < RECORD_SIZE:
        return None
    body = bytes(buf[:60])
    magic, nonce, version, source, slot, seq, iova, t_ns = _BODY.unpack(body)
    if magic != MAGIC:
        return None
    (crc,) = struct.unpack_from("<I", buf, 60)
    if crc != zlib.crc32(body):
        return None
    return Marker(nonce=nonce, source=source, slot=slot, seq=seq, iova=iova, t_ns=t_ns, version=version)


def transfer(nonce: int, source: int, seq: int, iova: int, t_ns: int, nbytes: int) -> bytes:
    """The payload of one DMA transfer of `nbytes` (a multiple of 64): consecutive
    records whose `iova` is where each one is meant to land."""
    if nbytes % RECORD_SIZE:
        raise ValueError(f"transfer size {nbytes} is not a multiple of {RECORD_SIZE}")
    return b"".join(
        pack(Marker(nonce, source, slot, seq, iova + slot * RECORD_SIZE if iova else 0, t_ns))
        for slot in range(nbytes // RECORD_SIZE)
    )


def canary_page(nonce: int, index: int, phys: int) -> bytes:
    """The 4 KiB canary page number `index` that the first kernel places at `phys`."""
    return transfer(nonce, Source.CANARY, index, phys, 0, PAGE_SIZE)
