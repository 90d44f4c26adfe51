"""Host-side handling of what the crash kernel wrote to the dump disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import HostError


def reassemble_flattened(disk: Path, out: Path, timeout: float = 600) -> None:
    """makedumpfile -F wrote its flattened stream to the raw disk; `makedumpfile -R`
    turns it back into a kdump-compressed file (it stops at the stream's end mark,
    so the rest of the disk does not matter)."""
    with open(disk, "rb") as src:
        try:
            r = subprocess.run(["makedumpfile", "-R", str(out)], stdin=src, capture_output=True,
                               text=True, timeout=timeout)
        except FileNotFoundError:
            raise HostError("makedumpfile not found on the host (apt-get install makedumpfile)") from None
        except subprocess.TimeoutExpired:
            raise HostError(f"makedumpfile -R took more than {timeout:.0f} s") from None
    if r.returncode != 0:
        raise HostError(f"makedumpfile -R failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


# -- makedumpfile's dump level ------------------------------------------------------

# `makedumpfile -d LEVEL`: each bit drops one class of pages from the dump.
DUMP_LEVEL_CLASSES = (
    (1, "zero", "pages filled with zeros"),
    (2, "cache", "page cache pages without private data"),
    (4, "cache_private", "page cache pages with private data"),
    (8, "user", "user process pages (anonymous memory, e.g. locked user buffers)"),
    (16, "free", "free pages (e.g. network receive buffers the stack already freed)"),
)

# struct disk_dump_header (makedumpfile's diskdump_mod.h) on x86_64: the signature,
# header_version, new_utsname (6 x 65 bytes), timeval (aligned to 8), then
# status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr (unsigned ints).
# struct kdump_sub_header starts one block in: phys_base (8 bytes), dump_level.
_KDUMP_SIGNATURE = b"KDUMP   "
_BLOCK_SIZE_OFFSET = 8 + 4 + 6 * 65 + 6 + 16 + 4     # 428
_DUMP_LEVEL_IN_SUB_HEADER = 8


def excluded_classes(level: int) -> list[str]:
    """The page classes a dump level leaves out, by name."""
    return [name for bit, name, _ in DUMP_LEVEL_CLASSES if level & bit]


def kdump_header(path: Path) -> dict:
    """What the header of a kdump-compressed file (not flattened) says about
    filtering: {"header_version", "block_size", "dump_level", "excluded"}."""
    import struct

    with open(path, "rb") as f:
        head = f.read(_BLOCK_SIZE_OFFSET + 4)
        if len(head) < _BLOCK_SIZE_OFFSET + 4 or head[:8] != _KDUMP_SIGNATURE:
            raise HostError(f"{path} is not a kdump-compressed dump (signature {head[:8]!r})")
        version = struct.unpack_from("<i", head, 8)[0]
        block_size = struct.unpack_from("<i", head, _BLOCK_SIZE_OFFSET)[0]
        if block_size <= 0 or block_size & (block_size - 1) or block_size > 1 << 20:
            raise HostError(f"{path}: implausible block size {block_size} in the kdump header")
        f.seek(block_size + _DUMP_LEVEL_IN_SUB_HEADER)
        raw = f.read(4)
    if len(raw) < 4:
        raise HostError(f"{path}: the kdump sub-header is cut short")
    level = struct.unpack("<i", raw)[0]
    if not 0 <= level <= 31:
        raise HostError(f"{path}: implausible dump level {level} in the kdump sub-header")
    return {"header_version": version, "block_size": block_size, "dump_level": level,
            "excluded": excluded_classes(level)}


def is_flattened(path: Path) -> bool:
    """makedumpfile -F output (a stream of (offset, size, data) records)."""
    with open(path, "rb") as f:
        return f.read(12) == b"makedumpfile"
