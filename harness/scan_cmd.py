"""`kdump-harness scan VMCORE`: list the marker records in a dump.

    kdump-harness scan vmcore
    kdump-harness scan vmcore --nonce 0x5eed... --json
    kdump-harness scan guest-ram.bin --raw-ranges 0:0:0x40000000

Exit status: 0 when every byte the dump lists was read; 1 when --partial was given
and some pages could not be read (what could be read is reported); 2 for bad input
(unreadable, truncated or corrupt file, bad arguments), as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, TextIO

from .errors import EXIT_USAGE, EXIT_VERDICT

PROG = "kdump-harness scan"
EXIT_OK = 0

_SOURCES = {1: "nic", 2: "edu", 3: "canary"}


def _int(text: str) -> int:
    """An integer in any base Python accepts (0x..., 0o..., decimal, with _)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _nonce(text: str) -> int:
    t = text[2:] if text.lower().startswith("0x") else text
    try:
        value = int(t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"nonce must be hexadecimal: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"nonce does not fit in 64 bits: {text!r}")
    return value


def _raw_range(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"raw range must be FILE_OFFSET:PHYS:LENGTH, got {text!r}")
    off, phys, length = (_int(p) for p in parts)
    return off, phys, length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vmcore", metavar="VMCORE",
                        help="ELF vmcore, kdump-compressed or flattened dump, or raw guest RAM "
                             "(with --raw-ranges)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--nonce", type=_nonce, metavar="HEX",
                        help="the run's nonce: records of other nonces are reported as stale "
                             "(default: every record with a good CRC counts)")
    parser.add_argument("--raw-ranges", type=_raw_range, nargs="+", action="extend", default=None,
                        metavar="OFF:PHYS:LEN",
                        help="treat VMCORE as raw guest RAM: file bytes OFF..OFF+LEN hold "
                             "guest-physical PHYS..PHYS+LEN (numbers in any base, e.g. 0x...)")
    parser.add_argument("--max-listed", type=_int, default=1000, metavar="N",
                        help="list at most N torn and N stale records (counts stay exact; default 1000)")
    parser.add_argument("--threads", type=_int, default=0, metavar="N",
                        help="scanner threads (default: one per CPU)")
    parser.add_argument("--partial", action="store_true",
                        help="report what could be read when some pages cannot be (exit status 1)")
    parser.add_argument("--tmpdir", metavar="DIR",
                        help="where a flattened dump is reassembled (default: $TMPDIR or /tmp)")


def _result_json(dump, result) -> dict:
    return {
        "path": dump.path,
        "format": dump.format,
        "flattened": dump.flattened,
        "format_detail": dump.format_detail,
        "file_size": dump.file_size,
        "ranges": [{"phys": r.start, "length": r.length} for r in dump.ranges],
        "total_bytes": dump.total_bytes,
        "duplicate_bytes": dump.duplicate_bytes,
        "bytes_scanned": result.bytes_scanned,
        "seconds": round(result.seconds, 6),
        "threads": result.threads,
        "complete": result.complete,
        "nonce": None if result.nonce is None else f"{result.nonce:#018x}",
        "valid_count": result.valid_count,
        "markers": [
            {"phys": h.phys, "nonce": f"{h.nonce:#018x}", "version": h.version,
             "source": _SOURCES.get(h.source, h.source), "slot": h.slot, "seq": h.seq,
             "iova": h.iova, "t_ns": h.t_ns, "reserved_nonzero": h.reserved_nonzero}
            for h in result.markers],
        "markers_truncated": result.markers_truncated,
        "torn_count": result.torn_count,
        "torn": [{"phys": t.phys, "crc_stored": t.crc_stored, "crc_computed": t.crc_computed}
                 for t in result.torn],
        "stale_count": result.stale_count,
        "stale": [{"phys": h.phys, "nonce": f"{h.nonce:#018x}"} for h in result.stale],
        "unreadable_bytes": result.unreadable_bytes,
        "unreadable_count": result.unreadable_count,
        "unreadable": [{"phys": r.start, "length": r.length} for r in result.unreadable],
        "unreadable_reason": result.unreadable_reason,
    }


def _print_text(dump, result, out: TextIO) -> None:
    fmt = dump.format + (" (flattened)" if dump.flattened else "")
    rate = result.bytes_scanned / result.seconds / 1e9 if result.seconds > 0 else 0.0
    print(f"file:      {dump.path} ({dump.file_size} bytes)", file=out)
    print(f"format:    {fmt}: {dump.format_detail}", file=out)
    print(f"memory:    {dump.total_bytes} bytes in {len(dump.ranges)} ranges"
          + (f", {dump.duplicate_bytes} duplicate bytes ignored" if dump.duplicate_bytes else ""),
          file=out)
    print(f"scanned:   {result.bytes_scanned} bytes in {result.seconds:.3f} s "
          f"({rate:.1f} GB/s, {result.threads} threads)", file=out)
    print(f"nonce:     {'any' if result.nonce is None else f'{result.nonce:#018x}'}", file=out)
    print(f"markers:   {result.valid_count} valid, {result.torn_count} torn, "
          f"{result.stale_count} stale", file=out)
    for h in result.markers:
        print(f"  {h.phys:#018x}  {_SOURCES.get(h.source, str(h.source)):6} seq={h.seq} slot={h.slot} "
              f"iova={h.iova:#x} t_ns={h.t_ns}", file=out)
    if result.markers_truncated:
        print(f"  ... {result.valid_count - len(result.markers)} more not listed", file=out)
    _listed(out, "torn:      ", "(magic found, CRC wrong)", result.torn, result.torn_count,
            lambda t: f"{t.phys:#018x}")
    _listed(out, "stale:     ", "(good CRC, another nonce)", result.stale, result.stale_count,
            lambda h: f"{h.phys:#018x}  nonce={h.nonce:#018x}")
    if result.unreadable_bytes:
        print(f"unreadable: {result.unreadable_bytes} bytes in {result.unreadable_count} ranges: "
              f"{result.unreadable_reason}", file=out)
        for r in result.unreadable:
            print(f"  {r.start:#018x}-{r.end:#018x}", file=out)


def _listed(out, title: str, what: str, items, count: int, line) -> None:
    """A counted kind of record: the count, then the ones listed, then how many were not."""
    if not count:
        return
    print(f"{title}{count} {what}", file=out)
    for item in items:
        print(f"  {line(item)}", file=out)
    if len(items) < count:
        print(f"  ... {count - len(items)} more not listed", file=out)


def run(args: argparse.Namespace, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        from . import checker
    except ImportError as e:  # the C module was not built
        print(f"{PROG}: the checker module is not built ({e}); run `pip install -e .` "
              f"or `python csrc/checker/ffibuild.py`", file=err)
        return EXIT_USAGE
    try:
        with checker.open_dump(args.vmcore, raw_ranges=args.raw_ranges, tmpdir=args.tmpdir) as dump:
            result = dump.scan(nonce=args.nonce, max_listed=max(0, args.max_listed),
                               threads=max(0, args.threads), allow_unreadable=args.partial)
            if args.json:
                json.dump(_result_json(dump, result), out, indent=1)
                print(file=out)
            else:
                _print_text(dump, result, out)
    except checker.CheckerError as e:
        print(f"{PROG}: {e}", file=err)
        return e.exit_code
    if not result.complete:
        print(f"{PROG}: {args.vmcore}: {result.unreadable_bytes} bytes could not be read; "
              f"the report covers the rest", file=err)
        return EXIT_VERDICT
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
