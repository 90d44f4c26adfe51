"""Guest architectures in one table: everything that differs between an x86_64
and an arm64 guest (QEMU binary and machine, CPU, the kernel's console, Debian
names, the cross compiler, RAM layout, how a panic is triggered).

The rest of the harness asks `arch_info(name)` instead of branching on the
architecture's name. The x86_64 entry states today's facts, so code that takes
them from here builds exactly the argv it built before.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class Arch:
    name: str                       # QEMU's and the kernel's name: x86_64, aarch64
    title: str
    debian: str                     # Debian's architecture name: amd64, arm64
    triplet: str                    # multiarch tuple: library directories, cross tools
    # QEMU
    qemu_binary: str
    qemu_package: str               # the Debian package with qemu_binary
    machine: str                    # -machine type
    machine_options: tuple[str, ...]
    ram_base: int                   # guest-physical address of the first byte of RAM
    # IOMMUs (harness.platforms) this machine can have
    iommus: tuple[str, ...]
    # the kernel's console on the machine's first UART, and the config that drives it
    console: str
    console_config: str
    # kernel options that mean nothing (or something else) on this architecture
    drop_options: tuple[str, ...]
    # Debian: friendly kernel name -> the meta package that points at the current build
    kernel_meta: dict = field(default_factory=dict)
    # guest userland: None = the host's own binaries (same architecture as the host);
    # else these Debian packages, unpacked from the archive (harness.debroot)
    guest_packages: tuple[str, ...] | None = None
    # C compiler for the static guest helpers, and the Debian packages that provide it
    cc: str = "gcc"
    cc_packages: tuple[str, ...] = ("gcc", "libc6-dev")
    # panic methods (Scenario.panic_method) that work here, and what each needs
    panic_methods: tuple[str, ...] = ("nmi", "sysrq")
    # a keyboard for QMP send-key (sysrq), if the machine has none of its own, and its driver
    keyboard_device: str | None = None
    keyboard_modules: tuple[str, ...] = ()
    # guest userland fix-ups: (binary installed by a recipe, script put in its place;
    # the binary moves to <path>.bin), see guest-images/initramfs/
    binary_wrappers: tuple[tuple[str, str], ...] = ()

    # -- QEMU argv pieces (harness.machine calls these) ----------------------------------

    def machine_value(self, extra: tuple[str, ...] | list[str] = ()) -> str:
        return ",".join([self.machine, *self.machine_options, *extra])

    def check_iommu(self, iommu: str) -> None:
        if iommu not in self.iommus:
            raise UsageError(f"--iommu {iommu} does not exist on {self.title}; choose one of {', '.join(self.iommus)}")

    def cpu(self, accel: str) -> str:
        return "host" if accel == "kvm" else "max"

    def kernel_cmdline(self, options: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """Kernel options written for x86 (console=ttyS0, unknown_nmi_panic) made
        right for this architecture. Identity on x86_64."""
        out = []
        for opt in options:
            if opt in self.drop_options:
                continue
            if opt == "console=ttyS0" and self.console != "ttyS0":
                opt = f"console={self.console}"
            out.append(opt)
        return tuple(out)

    def panic_qmp(self, method: str) -> tuple[str, dict]:
        """(QMP command, arguments) that panic the guest by `method` (Scenario.panic_method).
        nmi: inject-nmi with unknown_nmi_panic on the command line (x86); sysrq:
        send-key alt+sysrq+c (arm64's virt has no NMI a guest can be told to panic on:
        QMP inject-nmi "is not currently supported" there)."""
        if method not in self.panic_methods:
            raise UsageError(f"--panic {method} does not work on {self.title}; "
                             f"use {' or '.join(self.panic_methods)}")
        if method == "nmi":
            return "inject-nmi", {}
        return "send-key", {"keys": [{"type": "qcode", "data": k} for k in ("alt", "sysrq", "c")]}

    def ram_ranges(self, memory_mb: int) -> list[tuple[int, int, int]]:
        """(file offset, guest-physical address, length) of each piece of a guest RAM
        backing file (memory-backend-file), for reading guest memory from the host."""
        size = memory_mb << 20
        if self.machine == "q35":
            lowmem = 0x80000000 if size >= 0xB0000000 else 0xB0000000
            below = min(size, lowmem)
            ranges = [(0, 0, below)]
            if size > below:
                ranges.append((below, 1 << 32, size - below))
            return ranges
        return [(0, self.ram_base, size)]

    # -- the host --------------------------------------------------------------------------

    @property
    def native(self) -> bool:
        """The host runs this architecture (KVM possible, host binaries usable)."""
        return host_arch() == self.name

    def debian_package(self, pkg: str) -> str:
        """`pkg` qualified for apt on this host (pkg:arm64 on an amd64 host)."""
        return pkg if self.native or ":" in pkg else f"{pkg}:{self.debian}"

    def kernel_config_needed(self, needed: tuple[str, ...]) -> tuple[str, ...]:
        """A config requirement list written for x86 (SERIAL_8250_CONSOLE) made right here."""
        return tuple(self.console_config if o == "SERIAL_8250_CONSOLE" else o for o in needed)


def host_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="x86_64", title="x86-64 (QEMU q35)", debian="amd64", triplet="x86_64-linux-gnu",
            qemu_binary="qemu-system-x86_64", qemu_package="qemu-system-x86",
            machine="q35", machine_options=(), ram_base=0, iommus=("intel", "amd", "virtio", "none"),
            console="ttyS0", console_config="SERIAL_8250_CONSOLE",
            drop_options=(),
            kernel_meta={"debian-6.1": "linux-image-amd64", "debian-6.12": "linux-image-6.12-amd64"},
            guest_packages=None,
            panic_methods=("nmi", "sysrq"),
        ),
        Arch(
            name="aarch64", title="Arm64 (QEMU virt)", debian="arm64", triplet="aarch64-linux-gnu",
            qemu_binary="qemu-system-aarch64", qemu_package="qemu-system-arm",
            # GICv2 + GICv2m (virt's default): MSIs for PCI devices behind the SMMU work,
            # and a kdump kernel meets no half-initialised ITS/LPI tables.
            machine="virt", machine_options=(), ram_base=0x40000000, iommus=("smmuv3", "virtio", "none"),
            console="ttyAMA0", console_config="SERIAL_AMBA_PL011_CONSOLE",
            # an NMI is an x86 notion: arm64 has no unknown_nmi_panic (it would reach /init as an argument)
            drop_options=("unknown_nmi_panic",),
            kernel_meta={"debian-6.1": "linux-image-arm64", "debian-6.12": "linux-image-6.12-arm64"},
            guest_packages=("busybox-static", "kexec-tools", "makedumpfile", "ethtool"),
            cc="aarch64-linux-gnu-gcc", cc_packages=("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
            # QMP inject-nmi does nothing for an arm64 Linux guest; send-key alt+sysrq+c
            # does, through a virtio keyboard (virt has no keyboard of its own)
            panic_methods=("sysrq",),
            keyboard_device="virtio-keyboard-pci",
            keyboard_modules=("virtio_input",),
            # kexec-tools needs _text in /proc/kallsyms, which Debian's 6.1 arm64 kernel lacks
            binary_wrappers=(("/sbin/kexec", "kexec-kallsyms.sh"),),
        ),
    )
}

ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


def arch_info(name: str) -> Arch:
    try:
        return ARCHES[ALIASES.get(name, name)]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHES)}") from None
