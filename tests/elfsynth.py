"""Small synthetic ELF files for tests: headers, PT_LOAD, PT_INTERP, PT_DYNAMIC."""
import struct

DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RUNPATH = 0, 1, 5, 14, 29


def make_elf(machine: int = 183, *, bits: int = 64, big: bool = False, interp: str | None = None,
             needed: tuple[str, ...] = (), soname: str | None = None, runpath: str | None = None,
             vaddr: int = 0x400000) -> bytes:
    """An ELF file whose dynamic section names `needed` etc. The string table sits
    in the (single) PT_LOAD segment at `vaddr`, so DT_STRTAB is an address that
    must be mapped back to a file offset."""
    e = ">" if big else "<"
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    dynamic = bool(needed or soname or runpath)
    nph = 1 + (interp is not None) + dynamic
    strtab = b"\0"
    offs = {}
    for s in (*needed, soname, runpath):
        if s:
            offs[s] = len(strtab)
            strtab += s.encode() + b"\0"
    interp_b = (interp.encode() + b"\0") if interp else b""
    base = ehsize + nph * phentsize
    interp_off = base
    strtab_off = interp_off + len(interp_b)
    dyn_off = strtab_off + len(strtab)
    dyn_off += (-dyn_off) % 8
    entries = [(DT_NEEDED, offs[n]) for n in needed]
    if soname:
        entries.append((DT_SONAME, offs[soname]))
    if runpath:
        entries.append((DT_RUNPATH, offs[runpath]))
    if dynamic:
        entries.append((DT_STRTAB, vaddr + strtab_off))
        entries.append((DT_NULL, 0))
    dyn_fmt = e + ("qQ" if bits == 64 else "iI")
    dyn = b"".join(struct.pack(dyn_fmt, t, v) for t, v in entries)
    total = dyn_off + len(dyn)

    def ph(p_type, off, filesz):
        va = vaddr + off
        if bits == 64:
            return struct.pack(e + "IIQQQQQQ", p_type, 4, off, va, va, filesz, filesz, 8)
        return struct.pack(e + "IIIIIIII", p_type, off, va, va, filesz, filesz, 4, 4)

    phs = ph(1, 0, total)
    if interp is not None:
        phs += ph(3, interp_off, len(interp_b))
    if dynamic:
        phs += ph(2, dyn_off, len(dyn))
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 2 if big else 1, 1]) + b"\0" * 9
    if bits == 64:
        hdr = ident + struct.pack(e + "HHIQQQIHHHHHH", 2, machine, 1, vaddr, ehsize, 0, 0, ehsize, phentsize, nph,
                                  64, 0, 0)
    else:
        hdr = ident + struct.pack(e + "HHIIIIIHHHHHH", 2, machine, 1, vaddr, ehsize, 0, 0, ehsize, phentsize, nph,
                                  40, 0, 0)
    body = hdr + phs + interp_b + strtab
    body += b"\0" * (dyn_off - len(body))
    return body + dyn
