"""The architecture table and what the QEMU argv takes from it."""
from pathlib import Path

import pytest

from harness import arch as arch_mod
from harness.arch import ARCHES, arch_info
from harness.accel import choose_accel_for
from harness.analysis import crash_region_ranges
from harness.errors import UsageError
from harness.machine import Drive, MachineSpec, Sockets, build_argv
from harness.platforms import KDUMP_CONFIG_NEEDED, iommu_model, kdump_config_needed

SOCKS = Sockets(Path("/s/qmp"), Path("/s/con"), Path("/s/res"), Path("/s/qt"))
X86_APPEND = ("console=ttyS0", "crashkernel=256M", "panic=-1", "unknown_nmi_panic")


def spec(tmp_path, **kw) -> MachineSpec:
    base = dict(name="t", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", append=X86_APPEND)
    base.update(kw)
    return MachineSpec(**base)


def test_table_facts():
    x86, arm = arch_info("x86_64"), arch_info("aarch64")
    assert (x86.qemu_binary, x86.machine, x86.console, x86.debian) == ("qemu-system-x86_64", "q35", "ttyS0", "amd64")
    assert (arm.qemu_binary, arm.machine, arm.console, arm.debian) == ("qemu-system-aarch64", "virt", "ttyAMA0", "arm64")
    assert arm.qemu_package == "qemu-system-arm" and arm.cc == "aarch64-linux-gnu-gcc"
    assert arm.kernel_meta["debian-6.1"] == "linux-image-arm64"
    assert x86.kernel_meta["debian-6.1"] == "linux-image-amd64"
    assert [a.cpu("tcg") for a in (x86, arm)] == ["max", "max"]
    assert [a.cpu("kvm") for a in (x86, arm)] == ["host", "host"]
    assert "nmi" not in arm.panic_methods and "nmi" in x86.panic_methods
    assert arch_info("arm64") is arm and arch_info("amd64") is x86
    arm.check_iommu("smmuv3")
    x86.check_iommu("intel")
    with pytest.raises(UsageError, match=r"--iommu intel does not exist on Arm64 \(QEMU virt\); choose one of smmuv3"):
        arm.check_iommu("intel")
    with pytest.raises(UsageError, match="--iommu smmuv3 does not exist on x86-64"):
        x86.check_iommu("smmuv3")
    with pytest.raises(UsageError, match="unknown architecture 'riscv64'"):
        arch_info("riscv64")


def test_kernel_cmdline_identity_on_x86_rewritten_on_arm():
    assert ARCHES["x86_64"].kernel_cmdline(X86_APPEND) == X86_APPEND
    assert ARCHES["aarch64"].kernel_cmdline(X86_APPEND) == ("console=ttyAMA0", "crashkernel=256M", "panic=-1")
    # other consoles are left alone
    assert ARCHES["aarch64"].kernel_cmdline(("console=hvc0",)) == ("console=hvc0",)


def test_config_needed_per_arch():
    assert ARCHES["x86_64"].kernel_config_needed(KDUMP_CONFIG_NEEDED) == KDUMP_CONFIG_NEEDED
    arm = kdump_config_needed("aarch64", "smmuv3")
    assert "SERIAL_AMBA_PL011_CONSOLE" in arm and "SERIAL_8250_CONSOLE" not in arm and "ARM_SMMU_V3" in arm


def test_ram_layouts():
    assert ARCHES["x86_64"].ram_ranges(1024) == [(0, 0, 1 << 30)]
    assert ARCHES["x86_64"].ram_ranges(4096) == [(0, 0, 0x80000000), (0x80000000, 1 << 32, 0x80000000)]
    assert ARCHES["aarch64"].ram_ranges(1024) == [(0, 0x40000000, 1 << 30)]
    # the crash kernel's reservation as seen in a 1 GiB arm64 guest
    assert crash_region_ranges(1024, (0x6AC00000, 0x7ABFFFFF), "aarch64") == [(0x2AC00000, 0x6AC00000, 256 << 20)]
    assert crash_region_ranges(1024, (0x22000000, 0x31FFFFFF)) == [(0x22000000, 0x22000000, 256 << 20)]


def test_debian_package_qualified_only_for_a_foreign_arch(monkeypatch):
    monkeypatch.setattr(arch_mod, "host_arch", lambda: "x86_64")
    assert ARCHES["aarch64"].debian_package("busybox-static") == "busybox-static:arm64"
    assert ARCHES["x86_64"].debian_package("busybox-static") == "busybox-static"
    monkeypatch.setattr(arch_mod, "host_arch", lambda: "aarch64")
    assert ARCHES["aarch64"].debian_package("busybox-static") == "busybox-static"


def test_x86_argv_takes_the_same_facts(tmp_path):
    argv = build_argv(spec(tmp_path, iommu="intel"), SOCKS, tmp_path / "tr")
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-machine") + 1] == "q35,kernel-irqchip=split"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-append") + 1] == " ".join(X86_APPEND)
    assert not any("keyboard" in a for a in argv)


def test_arm64_smmuv3_argv(tmp_path):
    s = spec(tmp_path, arch="aarch64", iommu="smmuv3", ram_file=tmp_path / "ram",
             drives=(Drive("dump", tmp_path / "d", "khdump"),), devices=("edu,addr=05",), qtest=True)
    argv = build_argv(s, SOCKS, tmp_path / "tr")
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt,iommu=smmuv3,memory-backend=ram0"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-append") + 1] == "console=ttyAMA0 crashkernel=256M panic=-1"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    # no -device for the SMMU (a machine property); the sysrq keyboard comes last, so the
    # devices before it keep the PCI slots they have on x86
    assert not any("smmu" in d or "iommu" in d for d in devices)
    assert devices[-1] == "virtio-keyboard-pci"
    assert devices[:2] == ["virtio-blk-pci,drive=dump,serial=khdump", "edu,addr=05"]
    with_kvm = build_argv(spec(tmp_path, arch="aarch64", accel="kvm"), SOCKS, tmp_path / "tr")
    assert with_kvm[with_kvm.index("-cpu") + 1] == "host"


def test_smmuv3_model():
    m = iommu_model("smmuv3")
    assert m.device is None and m.machine_options == ("iommu=smmuv3",) and m.present
    assert not iommu_model("none").present and iommu_model("intel").present
    crash = ("[    3.478146] arm-smmu-v3 9050000.smmuv3: SMMU currently enabled! Resetting...\n")
    assert m.copied(crash) is False            # never adopts the old stream table
    assert m.copied("nothing about it") is None
    assert m.disabled("Kernel command line: console=ttyAMA0 arm-smmu-v3.disable_bypass=0 x")
    assert m.disabled("Kernel command line: console=ttyAMA0 iommu.passthrough=1")
    assert not m.disabled("Kernel command line: console=ttyAMA0 irqpoll")
    assert m.faults("arm-smmu-v3 9050000.smmuv3: event 0x10 received:\nx\n"
                    "arm-smmu-v3 9050000.smmuv3: event 0x10 received:\n") == 2


def test_panic_command():
    assert ARCHES["x86_64"].panic_qmp("nmi") == ("inject-nmi", {})
    cmd, args = ARCHES["aarch64"].panic_qmp("sysrq")
    assert cmd == "send-key" and [k["data"] for k in args["keys"]] == ["alt", "sysrq", "c"]
    with pytest.raises(UsageError, match=r"--panic nmi does not work on Arm64 \(QEMU virt\); use sysrq"):
        ARCHES["aarch64"].panic_qmp("nmi")


def test_accel_for_a_foreign_guest_is_tcg(monkeypatch, tmp_path):
    monkeypatch.setattr(arch_mod, "host_arch", lambda: "x86_64")
    choice = choose_accel_for("aarch64", "auto", tmp_path / "Image")
    assert choice.accel == "tcg" and "aarch64" in choice.reason
    with pytest.raises(UsageError, match="cannot run aarch64 guests under KVM on this host"):
        choose_accel_for("aarch64", "kvm", tmp_path / "Image")
