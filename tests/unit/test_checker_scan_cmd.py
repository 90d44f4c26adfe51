"""`kdump-harness scan` (harness/scan_cmd.py): output, JSON, exit status, one-line errors."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pytest

from harness import markers, scan_cmd

try:
    from . import test_checker_dumps as w
except ImportError:
    import test_checker_dumps as w

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 0x1122334455667788
OTHER = 0x0BADC0DE0BADC0DE
PAGE = w.PAGE


def run(argv):
    """In-process, the way harness.cli calls it."""
    import argparse
    parser = argparse.ArgumentParser(prog=scan_cmd.PROG)
    scan_cmd.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    rc = scan_cmd.run(parser.parse_args([str(a) for a in argv]), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def vmcore(tmp_path):
    ram = bytearray(4 * PAGE)
    w.put(ram, 14, w.marker(N, seq=1, source=markers.Source.NIC))
    w.put(ram, 1000, w.marker(N, seq=2))
    w.put(ram, 2000, w.marker(OTHER, seq=3))
    torn = bytearray(w.marker(N, seq=4))
    torn[33] ^= 1
    w.put(ram, 3000, bytes(torn))
    return w.write(tmp_path / "vmcore", w.elf_core([w.Load(0x100000, bytes(ram))]))


def test_text_output(vmcore):
    rc, out, err = run([vmcore, "--nonce", f"{N:x}"])
    assert (rc, err) == (0, "")
    assert "format:    elf:" in out
    assert f"scanned:   {4 * PAGE} bytes in" in out
    assert "markers:   2 valid, 1 torn, 1 stale" in out
    assert f"{0x100000 + 14:#018x}  nic" in out and f"{0x100000 + 1000:#018x}  edu" in out
    assert f"{0x100000 + 3000:#018x}" in out and f"nonce={OTHER:#018x}" in out


def test_json_output(vmcore):
    rc, out, _ = run([vmcore, "--json", "--nonce", f"0x{N:x}", "--max-listed", "0"])
    assert rc == 0
    doc = json.loads(out)
    assert (doc["format"], doc["bytes_scanned"], doc["complete"]) == ("elf", 4 * PAGE, True)
    assert [(m["phys"], m["seq"], m["source"]) for m in doc["markers"]] == [(0x100000 + 14, 1, "nic"),
                                                                          (0x100000 + 1000, 2, "edu")]
    assert (doc["torn_count"], doc["torn"], doc["stale_count"], doc["stale"]) == (1, [], 1, [])
    assert doc["nonce"] == f"{N:#018x}" and doc["seconds"] >= 0


def test_without_nonce_every_valid_record_counts(vmcore):
    rc, out, _ = run([vmcore, "--json"])
    doc = json.loads(out)
    assert rc == 0 and doc["valid_count"] == 3 and doc["stale_count"] == 0 and doc["nonce"] is None


def test_raw_ranges(tmp_path):
    ram = bytearray(2 * PAGE)
    w.put(ram, PAGE + 5, w.marker(N, seq=9))
    path = w.write(tmp_path / "ram", bytes(ram))
    rc, out, _ = run([path, "--json", "--raw-ranges", "0:0:0x1000", f"{PAGE}:0x100000000:{PAGE}"])
    doc = json.loads(out)
    assert rc == 0 and doc["format"] == "raw" and [m["phys"] for m in doc["markers"]] == [0x1_0000_0000 + 5]


@pytest.mark.parametrize("content", [b"", b"not a dump at all", None])
def test_bad_input_is_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "bad"
    if content is not None:
        path.write_bytes(content)
    rc, out, err = run([path])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kdump-harness scan: ")


def test_truncated_vmcore_exit_2(tmp_path, vmcore):
    data = open(vmcore, "rb").read()
    path = w.write(tmp_path / "cut", data[:-500])
    rc, _, err = run([path])
    assert rc == 2 and "truncated" in err and err.count("\n") == 1


def test_unreadable_pages_exit_2_or_1_with_partial(tmp_path):
    good = bytearray(PAGE)
    w.put(good, 10, w.marker(N, seq=1))
    image = bytearray(w.kdump_compressed({0: bytes(good), 1: bytes(good)}, 8, compress="zlib"))
    off1, size1 = struct.unpack_from("<QI", image, 4 * PAGE + 24)
    image[off1 + 2:off1 + size1] = b"\x5a" * (size1 - 2)
    path = w.write(tmp_path / "kd", bytes(image))
    rc, out, err = run([path])
    assert rc == 2 and out == "" and "could not be read" in err and err.count("\n") == 1
    rc, out, err = run([path, "--partial"])
    assert rc == 1 and "markers:   1 valid" in out and "unreadable: 4096 bytes" in out
    assert err.count("\n") == 1


def test_module_entry_point_never_tracebacks(tmp_path, vmcore):
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run([sys.executable, "-m", "harness.scan_cmd", vmcore], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=60)
    assert ok.returncode == 0 and "markers:   3 valid" in ok.stdout
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF\x02\x01")
    p = subprocess.run([sys.executable, "-m", "harness.scan_cmd", str(bad)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_bad_arguments_are_usage_errors(vmcore):
    with pytest.raises(SystemExit) as e:
        run([vmcore, "--nonce", "xyz"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        run([vmcore, "--raw-ranges", "1:2"])
