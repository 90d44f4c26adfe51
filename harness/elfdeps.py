"""What a dynamically linked ELF program needs, read from the file itself.

`ldd` runs the program's loader, so it only works for the host's own
architecture. For a guest of another architecture (an arm64 kexec on an x86
host) the harness reads the ELF headers instead: PT_INTERP names the loader,
the dynamic section's DT_NEEDED entries name the libraries, and each library is
looked up by its soname in an unpacked root of that architecture, transitively.

Only what is needed for that is parsed: the ELF header, the program headers
(PT_LOAD to turn the string table's address into a file offset, PT_INTERP,
PT_DYNAMIC) and the dynamic entries. 32- and 64-bit, either byte order.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import HostError

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29

EM_X86_64 = 62
EM_AARCH64 = 183
MACHINES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64", 3: "i386", 40: "arm", 243: "riscv64"}


class ElfError(HostError):
    """The file is not an ELF file this reader understands."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str            # "aarch64", "x86_64", ... (or "em-<number>")
    bits: int               # 32 or 64
    interp: str | None      # PT_INTERP: the program's loader (None: static, or a library)
    needed: tuple[str, ...]  # DT_NEEDED sonames, in order
    soname: str | None = None
    runpath: tuple[str, ...] = ()   # DT_RUNPATH (or DT_RPATH) entries

    @property
    def dynamic(self) -> bool:
        return self.interp is not None or bool(self.needed)


def read_elf(path: Path | str) -> ElfInfo:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ElfError(f"cannot read {path}: {e}") from None
    return parse_elf(data, str(path))


def parse_elf(data: bytes, name: str = "<bytes>") -> ElfInfo:
    if data[:4] != b"\x7fELF" or len(data) < 52:
        raise ElfError(f"{name} is not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ElfError(f"{name}: unknown ELF class {ei_class} or byte order {ei_data}")
    bits = 64 if ei_class == 2 else 32
    end = "<" if ei_data == 1 else ">"
    try:
        if bits == 64:
            (e_machine,) = struct.unpack_from(end + "H", data, 18)
            e_phoff, = struct.unpack_from(end + "Q", data, 32)
            e_phentsize, e_phnum = struct.unpack_from(end + "HH", data, 54)
            ph_fmt, dyn_fmt = end + "IIQQQQQQ", end + "qQ"
        else:
            (e_machine,) = struct.unpack_from(end + "H", data, 18)
            e_phoff, = struct.unpack_from(end + "I", data, 28)
            e_phentsize, e_phnum = struct.unpack_from(end + "HH", data, 42)
            ph_fmt, dyn_fmt = end + "IIIIIIII", end + "iI"
        phdrs = []
        for i in range(e_phnum):
            f = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
            if bits == 64:
                p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = f[:6]
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz = f[:5]
            phdrs.append((p_type, p_offset, p_vaddr, p_filesz))
    except struct.error:
        raise ElfError(f"{name}: truncated ELF headers") from None

    def cstr(off: int) -> str:
        if not 0 <= off < len(data):
            raise ElfError(f"{name}: string at offset 0x{off:x} is outside the file")
        stop = data.find(b"\0", off)
        return data[off: stop if stop >= 0 else len(data)].decode("utf-8", "replace")

    def file_offset(vaddr: int) -> int:
        for p_type, p_offset, p_vaddr, p_filesz in phdrs:
            if p_type == PT_LOAD and p_vaddr <= vaddr < p_vaddr + p_filesz:
                return p_offset + vaddr - p_vaddr
        raise ElfError(f"{name}: address 0x{vaddr:x} is in no loadable segment")

    interp = None
    entries: list[tuple[int, int]] = []
    for p_type, p_offset, _vaddr, p_filesz in phdrs:
        if p_type == PT_INTERP:
            interp = cstr(p_offset)
        elif p_type == PT_DYNAMIC:
            size = struct.calcsize(dyn_fmt)
            for off in range(p_offset, p_offset + p_filesz - size + 1, size):
                tag, val = struct.unpack_from(dyn_fmt, data, off)
                if tag == DT_NULL:
                    break
                entries.append((tag, val))
    machine = MACHINES.get(e_machine, f"em-{e_machine}")
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        if any(t in (DT_NEEDED, DT_SONAME, DT_RUNPATH, DT_RPATH) for t, _ in entries):
            raise ElfError(f"{name}: dynamic section without a string table")
        return ElfInfo(machine, bits, interp, ())
    base = file_offset(strtab)
    needed = tuple(cstr(base + v) for t, v in entries if t == DT_NEEDED)
    soname = next((cstr(base + v) for t, v in entries if t == DT_SONAME), None)
    paths = [cstr(base + v) for t, v in entries if t == DT_RUNPATH] or \
        [cstr(base + v) for t, v in entries if t == DT_RPATH]
    runpath = tuple(p for s in paths for p in s.split(":") if p)
    return ElfInfo(machine, bits, interp, needed, soname, runpath)


# -- finding libraries in an unpacked root of another architecture ------------------

def resolve_in_root(root: Path, guest_path: str, max_links: int = 40) -> Path:
    """The host path of `guest_path` inside `root`, following symbolic links as the
    guest would (an absolute link target is relative to `root`, never the host's /)."""
    parts = list(PurePosixPath(guest_path).parts[1:]) if guest_path.startswith("/") else \
        list(PurePosixPath(guest_path).parts)
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        host = root.joinpath(*done, part)
        if host.is_symlink():
            links += 1
            if links > max_links:
                raise HostError(f"too many symbolic links resolving {guest_path} in {root}")
            target = os.readlink(host)
            tparts = list(PurePosixPath(target).parts)
            if target.startswith("/"):
                done = []
                tparts = tparts[1:]
            parts = tparts + parts
            continue
        done.append(part)
    return root.joinpath(*done)


@dataclass(frozen=True)
class SharedObject:
    guest_path: str   # where the loader will look for it in the guest, e.g. /lib/aarch64-linux-gnu/libc.so.6
    host_path: Path   # the file (links followed) in the unpacked root


def library_closure(binary: Path, root: Path, search_dirs: tuple[str, ...], machine: str | None = None) \
        -> list[SharedObject]:
    """The loader and every shared library `binary` needs, transitively, found in
    `root` (an unpacked Debian tree of the guest's architecture) under
    `search_dirs` (guest paths, in the loader's order). Empty for a static binary.
    Raises HostError naming the missing library and who needs it."""
    info = read_elf(binary)
    machine = machine or info.machine
    if info.machine != machine:
        raise HostError(f"{binary} is built for {info.machine}, not {machine}")
    found: dict[str, SharedObject] = {}
    out: list[SharedObject] = []
    if info.interp:
        loader = resolve_in_root(root, info.interp)
        if not loader.is_file():
            raise HostError(f"the loader {info.interp} of {binary.name} is not in {root}; "
                            f"add the package that has it (libc6) to the guest root")
        out.append(SharedObject(info.interp, loader))
        # libc names the loader by its soname too; the loader is already in place
        found[PurePosixPath(info.interp).name] = out[0]
    queue: list[tuple[str, str, tuple[str, ...]]] = [(n, binary.name, info.runpath) for n in info.needed]
    while queue:
        soname, who, runpath = queue.pop(0)
        if soname in found:
            continue
        dirs = tuple(d for d in runpath if "$" not in d) + tuple(search_dirs)
        hit = None
        for d in dirs:
            guest = f"{d.rstrip('/')}/{soname}"
            host = resolve_in_root(root, guest)
            if host.is_file():
                hit = SharedObject(guest, host)
                break
        if hit is None:
            raise HostError(f"{soname} (needed by {who}) is in none of {', '.join(dirs)} under {root}; "
                            f"add the {machine} package that ships it to the guest root")
        lib = read_elf(hit.host_path)
        if lib.machine != machine:
            raise HostError(f"{hit.host_path} is built for {lib.machine}, not {machine}")
        found[soname] = hit
        out.append(hit)
        queue.extend((n, soname, lib.runpath) for n in lib.needed)
    return out
