"""A scenario is plain data: everything that decides what a run does.

The CLI, pytest and the reports all read the same frozen `Scenario`, and a
report's `scenario` section turns back into the Scenario that produced it
(`Scenario.from_json`), which is how `repro` replays a run.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any

from .arch import arch_info
from .errors import UsageError
from .platforms import iommu_model

DEFAULT_CRASH_BASE = ("irqpoll", "nr_cpus=1", "reset_devices")
PANIC_METHODS = ("nmi", "sysrq")
DUMP_FORMATS = ("elf", "kdump")
DMA_SOURCES = ("none", "nic", "edu")
GUESTS = ("initramfs", "debian")
HANDOVERS = ("panic", "kexec")


@dataclass(frozen=True)
class Scenario:
    name: str = "adhoc"
    arch: str = "x86_64"                     # the guest's architecture (harness.arch): x86_64, aarch64
    iommu: str = "intel"
    iommu_options: tuple[str, ...] = ()      # extra QEMU device properties, e.g. x-scalable-mode=on
    kernel: str = "debian-6.1"               # debian-6.1, debian-6.12, debian:<pkg> or a path
    modules: str | None = None               # with a kernel path: INSTALL_MOD_PATH
    kernel_config: str | None = None
    first_append: tuple[str, ...] = ()       # first kernel options beyond the IOMMU's own
    crash_base: tuple[str, ...] = DEFAULT_CRASH_BASE
    crash_append: tuple[str, ...] = ()       # appended last: overrides the defaults
    memory_mb: int = 1024
    crashkernel: str = "256M"
    panic_method: str = ""                   # nmi, sysrq; "" = the architecture's first (x86: nmi)
    dump_format: str = "elf"
    dma: str = "none"                        # none, nic, edu (harness.dma)
    crash_load_driver: bool = False          # load the DMA device's driver in the crash kernel (takeover)
    canaries: int = 16                       # canary pages the first kernel fills
    crash_iommu_driver: bool = True          # a modular IOMMU driver (virtio) is loaded in the crash kernel
    guest: str = "initramfs"                 # initramfs (busybox, fast) or debian (kdump-tools, over SSH)
    handover: str = "panic"                  # panic (kdump) or kexec (a plain kexec -l / kexec -e reboot)
    expect: str = ""                         # the verdict it should give; "" for none (catalog entries have one)
    reason: str = ""
    tags: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        iommu_model(self.iommu)
        a = arch_info(self.arch)
        object.__setattr__(self, "arch", a.name)          # arm64 -> aarch64
        a.check_iommu(self.iommu)
        if not self.panic_method:
            object.__setattr__(self, "panic_method", a.panic_methods[0])
        if self.panic_method not in PANIC_METHODS:
            raise UsageError(f"unknown panic method {self.panic_method!r}; use one of {', '.join(PANIC_METHODS)}")
        if self.panic_method not in a.panic_methods:
            raise UsageError(f"--panic {self.panic_method} does not work on {a.title}; "
                             f"use {' or '.join(a.panic_methods)}")
        if self.guest != "initramfs" and a.name != "x86_64":
            raise UsageError(f"--guest {self.guest} is built for x86_64 only; use --guest initramfs on {a.name}")
        if self.dma not in DMA_SOURCES:
            raise UsageError(f"unknown DMA source {self.dma!r}; use one of {', '.join(DMA_SOURCES)}")
        if self.handover not in HANDOVERS:
            raise UsageError(f"unknown handover {self.handover!r}; use one of {', '.join(HANDOVERS)}")
        if self.handover == "kexec" and self.guest != "initramfs":
            raise UsageError("--handover kexec goes with the initramfs guest")
        if self.guest not in GUESTS:
            raise UsageError(f"unknown guest {self.guest!r}; use one of {', '.join(GUESTS)}")
        if self.dump_format not in DUMP_FORMATS:
            raise UsageError(f"unknown dump format {self.dump_format!r}; use one of {', '.join(DUMP_FORMATS)}")
        if self.memory_mb < 512:
            raise UsageError(f"--memory {self.memory_mb} MiB is too small: the first kernel, the crash kernel's "
                             f"reservation and the initramfs need at least 512")

    # -- the two kernel command lines ----------------------------------------------

    def first_cmdline(self) -> tuple[str, ...]:
        return arch_info(self.arch).kernel_cmdline((
            "console=ttyS0", f"crashkernel={self.crashkernel}", "panic=-1", "unknown_nmi_panic",
            *iommu_model(self.iommu).first_append, *self.first_append))

    def crash_cmdline(self) -> tuple[str, ...]:
        """The next kernel's command line: the crash kernel's, or with a plain kexec
        handover a normal kernel's (the first kernel's IOMMU options; nokaslr, so
        its image sits where aimed DMA expects it)."""
        if self.handover == "kexec":
            opts = ("console=ttyS0", "panic=-1", "nokaslr", "kh.role=second",
                    *iommu_model(self.iommu).first_append, *self.first_append, *self.crash_append)
        else:
            opts = ("console=ttyS0", "panic=-1", *self.crash_base,
                    *iommu_model(self.iommu).crash_append, *self.crash_append)
        return arch_info(self.arch).kernel_cmdline(opts)

    # -- (de)serialisation ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Scenario":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise UsageError(f"scenario has fields this version does not know: {', '.join(sorted(unknown))}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def replace(self, **changes: Any) -> "Scenario":
        if "arch" in changes and "panic_method" not in changes:
            changes["panic_method"] = ""   # the new architecture's own default
        return dataclasses.replace(self, **changes)


def split_options(text: str | None) -> tuple[str, ...]:
    """Kernel options typed on the command line: "a=1 b" -> ("a=1", "b")."""
    if not text:
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as e:
        raise UsageError(f"cannot parse kernel options {text!r}: {e}") from None
