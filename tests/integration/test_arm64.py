"""Arm64: Debian's arm64 kernel and userland on qemu-system-aarch64 -M virt,iommu=smmuv3
(TCG), through the same kdump cycle and checker as x86.

The package tests read real arm64 Debian packages (the cache, or the archive); the
boot tests boot them and take about four minutes each under TCG.
"""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.arch import arch_info
from harness.elfdeps import library_closure, read_elf
from harness.scenario import Scenario
from harness.verdict import Verdict

ARM = arch_info("aarch64")
# the artifact cache as the user has it (unit-style tests otherwise get a private one)
REAL_CACHE = os.environ.get("KDUMP_HARNESS_CACHE") or str(
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdump-harness")
LIB_DIRS = ("/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib", "/usr/lib")


def arm64_apt_reason() -> str | None:
    try:
        out = subprocess.run(["apt-cache", "policy", "busybox-static:arm64"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "apt-cache is not available (not a Debian host)"
    if "Candidate:" not in out or "Candidate: (none)" in out:
        return "apt has no arm64 packages: run `dpkg --add-architecture arm64 && apt-get update` (ci/setup.sh)"
    return None


@pytest.fixture
def real_cache(monkeypatch):
    reason = arm64_apt_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("KDUMP_HARNESS_CACHE", REAL_CACHE)


@pytest.fixture
def arm64_root(real_cache):
    from harness.debroot import guest_root
    return guest_root(ARM)


def test_arm64_tools_and_their_libraries(arm64_root):
    kexec = arm64_root.host_path("/sbin/kexec")
    info = read_elf(kexec)
    assert info.machine == "aarch64" and info.interp == "/lib/ld-linux-aarch64.so.1"
    assert {"libc.so.6", "libz.so.1", "libxenctrl.so.4.17"} <= set(info.needed)
    assert not read_elf(arm64_root.host_path("/bin/busybox")).dynamic       # busybox-static
    closure = library_closure(kexec, arm64_root.path, LIB_DIRS, "aarch64")
    assert closure[0].guest_path == "/lib/ld-linux-aarch64.so.1"
    assert all(read_elf(so.host_path).machine == "aarch64" for so in closure)
    mdf = {Path(so.guest_path).name for so in arm64_root.libraries(arm64_root.host_path("/usr/bin/makedumpfile"))}
    assert {"libdw.so.1", "libelf.so.1", "liblzma.so.5", "libbz2.so.1.0", "libz.so.1", "liblzo2.so.2"} <= mdf
    # transitively: libxenctrl's own needs come along
    assert {"libxentoollog.so.1", "libxencall.so.1", "libxentoolcore.so.1"} <= {Path(so.guest_path).name
                                                                               for so in closure}


def extract(path: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=open(path, "rb"), cwd=dest, check=True)
    return dest


def test_arm64_images_from_the_recipes(real_cache, tmp_path):
    from harness.initramfs import builder_for
    from harness.kernels import resolve_kernel

    kernel = resolve_kernel("debian-6.1", arch="aarch64")
    first = extract(builder_for(kernel).build("first"), tmp_path / "first")
    crash = extract(first / "boot/crash.cpio", tmp_path / "crash")
    image = (first / "boot/vmlinuz").read_bytes()[:64]
    assert image[0x38:0x3C] == b"ARM\x64"      # an arm64 Image (Debian's is not compressed)
    for root, programs in ((first, ("sbin/kexec.bin", "usr/sbin/ethtool", "sbin/khdma")),
                           (crash, ("usr/bin/makedumpfile",))):
        assert read_elf(root / "bin/busybox").machine == "aarch64"
        for prog in programs:
            assert read_elf(root / prog).machine == "aarch64", prog
            # every library the program needs is inside the image, where the loader looks
            library_closure(root / prog, root, LIB_DIRS, "aarch64")
    assert (first / "sbin/kexec").read_text().startswith("#!/bin/busybox sh")   # the kallsyms wrapper
    boot = (first / "etc/kh/boot-modules").read_text().split()
    assert boot[0] == "virtio_input" and {"virtio_pci", "virtio_console"} <= set(boot)
    vfio = (first / "etc/kh/mod.vfio_pci").read_text().split()
    assert vfio[-1] == "/lib/modules/vfio-pci.ko" and "/lib/modules/vfio.ko" in vfio
    for mod in vfio:
        head = (first / mod.lstrip("/")).read_bytes()[:20]
        assert struct.unpack_from("<H", head, 18)[0] == 183  # aarch64 modules


def qemu_reason() -> str | None:
    if shutil.which(ARM.qemu_binary) is None:
        return f"{ARM.qemu_binary} is not installed (Debian: {ARM.qemu_package}; ci/setup.sh)"
    return arm64_apt_reason()


@pytest.fixture
def arm64_run(request, kh_outdir, monkeypatch):
    from harness.pytest_plugin import _cleanup
    from harness.run import KdumpRun

    reason = qemu_reason()
    if reason:
        pytest.skip(reason)
    runs = []

    def _run(scenario: Scenario):
        run = KdumpRun(scenario, kh_outdir, accel=request.config.getoption("--kh-accel"))
        runs.append(run)
        run.execute()
        return run

    yield _run
    _cleanup(request, runs)


def vmcore_machine(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return struct.unpack_from("<H", head, 18)[0]


@pytest.mark.boot
@pytest.mark.slow
def test_arm64_smmuv3_kdump_with_aimed_dma(arm64_run):
    """The first kernel boots behind the SMMU with edu bound to vfio-pci; sysrq-c from
    a virtio keyboard panics it; the crash kernel resets the SMMU (it never adopts
    the old stream table) and writes an arm64 ELF vmcore; edu DMA fired after the
    reset is aborted by the crash kernel's stream table."""
    run = arm64_run(Scenario(arch="aarch64", iommu="smmuv3", dma="edu"))
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    rep = run.report()
    assert rep["arch"] == "aarch64" and rep["accel"] == "tcg" and rep["scenario"]["panic_method"] == "sysrq"
    assert rep["kdump"]["format"] == "elf64" and vmcore_machine(Path(rep["kdump"]["vmcore"])) == 183
    start, end = rep["kdump"]["crash_kernel_range"]
    assert end - start + 1 == 256 << 20 and start >= ARM.ram_base
    first = (run.outdir / "console-first.log").read_text()
    crash = (run.outdir / "console-crash.log").read_text()
    assert "sysrq: Trigger a crash" in first
    assert "SMMU currently enabled! Resetting..." in crash
    assert rep["iommu"]["crash_kernel_copied_tables"] is False
    smmu = rep["iommu"]["smmu"]
    assert any("GBPA <- 0x80100000" in s for s in smmu["story"])
    assert any("STRTAB_BASE" in s for s in smmu["story"])
    assert any(s.endswith("(SMMUEN|CMDQEN)") for s in smmu["story"])   # no event queue in a kdump kernel
    dma = rep["dma"]
    assert dma["landed"]["old_memory_expected"] > 0 and dma["landed"]["crash_kernel_region"] == 0
    assert smmu["aborted_after_panic"].get("00:05.0", 0) > 0
    assert dma["canaries"]["intact"] == dma["canaries"]["count"] > 0


@pytest.mark.boot
@pytest.mark.slow
def test_arm64_makedumpfile_without_iommu(arm64_run):
    """No IOMMU; the crash kernel saves a kdump-compressed dump with arm64 makedumpfile."""
    run = arm64_run(Scenario(arch="aarch64", iommu="none", dump_format="kdump"))
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    assert run.vmcore.name == "vmcore.kdump" and run.vmcore.read_bytes()[:8] == b"KDUMP   "
    assert run.report()["dma"]["canaries"]["intact"] == 16
