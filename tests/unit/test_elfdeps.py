"""The ELF reader that stands in for ldd on foreign-architecture binaries."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.elfdeps import ElfError, library_closure, parse_elf, read_elf, resolve_in_root
from harness.errors import HostError
from tests.elfsynth import make_elf

DIRS = ("/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib", "/usr/lib")


@pytest.mark.parametrize("bits,big", [(64, False), (32, False), (64, True), (32, True)])
def test_synthetic_elf_every_class_and_byte_order(bits, big):
    data = make_elf(183 if bits == 64 else 40, bits=bits, big=big, interp="/lib/ld.so.1",
                    needed=("libz.so.1", "libc.so.6"), soname="libx.so.2", runpath="$ORIGIN:/opt/lib")
    info = parse_elf(data)
    assert info.machine == ("aarch64" if bits == 64 else "arm")
    assert info.bits == bits
    assert info.interp == "/lib/ld.so.1"
    assert info.needed == ("libz.so.1", "libc.so.6")  # in order
    assert info.soname == "libx.so.2"
    assert info.runpath == ("$ORIGIN", "/opt/lib")
    assert info.dynamic


def test_static_binary_needs_nothing():
    info = parse_elf(make_elf(183))
    assert info.interp is None and info.needed == () and not info.dynamic


@pytest.mark.parametrize("data,msg", [(b"#!/bin/sh\n" + b"x" * 100, "not an ELF"),
                                      (b"\x7fELF\x03\x01" + b"\0" * 60, "unknown ELF class"),
                                      (make_elf(183, needed=("libc.so.6",))[:70], "truncated|outside|no loadable")])
def test_not_elf_or_broken(data, msg):
    with pytest.raises(ElfError, match=msg):
        parse_elf(data)


def test_host_binary_agrees_with_ldd():
    """On the host's own binaries the reader must name what ldd names."""
    exe = Path(shutil.which("ethtool") or "/sbin/ethtool")
    if not exe.exists():
        pytest.skip("ethtool is not installed on this host (ci/setup.sh installs it)")
    info = read_elf(exe)
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    ldd = {line.split()[0] for line in out.splitlines() if "=>" in line and "vdso" not in line}
    assert set(info.needed) == ldd
    assert info.interp and Path(info.interp).name in out


def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    lib = root / "lib/aarch64-linux-gnu"
    ulib = root / "usr/lib/aarch64-linux-gnu"
    lib.mkdir(parents=True)
    ulib.mkdir(parents=True)
    (lib / "ld-linux-aarch64.so.1").write_bytes(make_elf(183, soname="ld-linux-aarch64.so.1"))
    # Debian's layout: the loader path is a link; an absolute link must resolve inside the root
    (root / "lib/ld-linux-aarch64.so.1").symlink_to("/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1")
    (lib / "libc.so.6").write_bytes(make_elf(183, soname="libc.so.6", needed=("ld-linux-aarch64.so.1",)))
    (lib / "libz.so.1.2.13").write_bytes(make_elf(183, soname="libz.so.1", needed=("libc.so.6",)))
    (lib / "libz.so.1").symlink_to("libz.so.1.2.13")
    (ulib / "libxenctrl.so.4.17.0").write_bytes(make_elf(183, needed=("libxentoollog.so.1", "libc.so.6")))
    (ulib / "libxenctrl.so.4.17").symlink_to("libxenctrl.so.4.17.0")
    (ulib / "libxentoollog.so.1").write_bytes(make_elf(183, needed=("libc.so.6",)))
    (root / "sbin").mkdir()
    (root / "sbin/kexec").write_bytes(make_elf(183, interp="/lib/ld-linux-aarch64.so.1",
                                               needed=("libxenctrl.so.4.17", "libz.so.1", "libc.so.6")))
    return root


def test_resolve_in_root_never_leaves_the_root(tmp_path):
    root = fake_root(tmp_path)
    p = resolve_in_root(root, "/lib/ld-linux-aarch64.so.1")
    assert p == root / "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"
    (root / "escape").symlink_to("/etc/passwd")
    assert resolve_in_root(root, "/escape") == root / "etc/passwd"
    assert resolve_in_root(root, "/lib/../../../etc/x") == root / "etc/x"
    (root / "loop").symlink_to("/loop")
    with pytest.raises(HostError, match="too many symbolic links"):
        resolve_in_root(root, "/loop")


def test_closure_is_transitive_loader_first_no_duplicates(tmp_path):
    root = fake_root(tmp_path)
    libs = library_closure(root / "sbin/kexec", root, DIRS)
    guests = [s.guest_path for s in libs]
    assert guests[0] == "/lib/ld-linux-aarch64.so.1"
    assert libs[0].host_path == root / "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"
    assert set(guests[1:]) == {"/usr/lib/aarch64-linux-gnu/libxenctrl.so.4.17", "/lib/aarch64-linux-gnu/libz.so.1",
                               "/lib/aarch64-linux-gnu/libc.so.6",
                               "/usr/lib/aarch64-linux-gnu/libxentoollog.so.1"}
    assert len(guests) == len(set(guests))  # libc's DT_NEEDED on the loader is the loader itself
    # links are followed to the real file
    assert {s.host_path.name for s in libs} >= {"libz.so.1.2.13", "libxenctrl.so.4.17.0"}


def test_closure_names_the_missing_library_and_who_needs_it(tmp_path):
    root = fake_root(tmp_path)
    os.unlink(root / "usr/lib/aarch64-linux-gnu/libxentoollog.so.1")
    with pytest.raises(HostError, match=r"libxentoollog.so.1 \(needed by libxenctrl.so.4.17\)"):
        library_closure(root / "sbin/kexec", root, DIRS)


def test_closure_refuses_another_architecture(tmp_path):
    root = fake_root(tmp_path)
    (root / "lib/aarch64-linux-gnu/libz.so.1.2.13").write_bytes(make_elf(62, soname="libz.so.1"))
    with pytest.raises(HostError, match="built for x86_64, not aarch64"):
        library_closure(root / "sbin/kexec", root, DIRS)
    with pytest.raises(HostError, match="not x86_64"):
        library_closure(root / "sbin/kexec", root, DIRS, machine="x86_64")


def test_static_binary_has_an_empty_closure(tmp_path):
    (tmp_path / "busybox").write_bytes(make_elf(183))
    assert library_closure(tmp_path / "busybox", tmp_path, DIRS) == []
