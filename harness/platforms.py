"""Platform facts in one table: IOMMU model -> QEMU device, kernel options,
the console messages that say what the crash kernel did, and QEMU trace points.

Everything that differs between Intel VT-d, AMD-Vi and no IOMMU lives here, so
the rest of the harness never branches on the IOMMU's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class IommuModel:
    name: str
    title: str
    # QEMU: `-device` value, and what the machine needs for it
    device: str | None
    machine_options: tuple[str, ...]
    # kernel command line: turn it on in the first kernel / default in the crash kernel
    first_append: tuple[str, ...]
    crash_append: tuple[str, ...]
    # kernel config options the kernel under test must have (besides kdump's own)
    config_needed: tuple[str, ...]
    # crash-kernel console: tables copied from the old kernel; translation switched off
    copied_re: tuple[str, ...] = ()
    not_copied_re: tuple[str, ...] = ()
    disabled_re: tuple[str, ...] = ()
    fault_re: str | None = None
    # crash-kernel console: the IOMMU driver has finished taking over
    init_done_re: str | None = None
    # QEMU trace points that record what the emulated IOMMU did
    trace_events: tuple[str, ...] = ()
    # guest-physical base of the register block (for host-side probes over qtest)
    mmio_base: int | None = None

    def copied(self, text: str) -> bool | None:
        """True/False when the crash kernel said whether it copied the old tables;
        None when it said nothing about it."""
        if any(re.search(p, text) for p in self.copied_re):
            return True
        if any(re.search(p, text) for p in self.not_copied_re):
            return False
        return None

    def disabled(self, text: str) -> bool:
        return any(re.search(p, text) for p in self.disabled_re)

    def faults(self, text: str) -> int:
        return len(re.findall(self.fault_re, text)) if self.fault_re else 0


IOMMUS: dict[str, IommuModel] = {
    m.name: m
    for m in (
        IommuModel(
            name="intel",
            title="Intel VT-d (QEMU intel-iommu)",
            device="intel-iommu,intremap=on",
            machine_options=("kernel-irqchip=split",),
            first_append=("intel_iommu=on",),
            crash_append=("intel_iommu=on",),
            config_needed=("INTEL_IOMMU", "IRQ_REMAP"),
            copied_re=(r"DMAR: Copied translation tables from previous kernel",),
            not_copied_re=(r"DMAR: Failed to copy translation tables", r"DMAR: Translation was enabled .* but we are not in kdump mode"),
            disabled_re=(r"DMAR: IOMMU disabled", r"Kernel command line:.*\bintel_iommu=off\b"),
            # e.g. "DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x..."
            fault_re=r"DMAR: \[(?:DMA|INTR)[ -](?:Read|Write|Remapping)",
            init_done_re=r"DMAR: Intel\(R\) Virtualization Technology for Directed I/O",
            trace_events=("vtd_dmar_translate", "vtd_dmar_fault", "vtd_switch_address_space",
                          "vtd_fault_disabled", "vtd_dmar_enable", "vtd_reg_write_gcmd"),
            mmio_base=0xFED90000,
        ),
        IommuModel(
            name="amd",
            title="AMD-Vi (QEMU amd-iommu)",
            device="amd-iommu,intremap=on",
            machine_options=("kernel-irqchip=split",),
            # amd_iommu is on by default when an IVRS table exists; "amd_iommu=on" is not an option
            first_append=(),
            crash_append=(),
            config_needed=("AMD_IOMMU", "IRQ_REMAP"),
            copied_re=(r"AMD-Vi: Copied DEV table from previous kernel",),
            not_copied_re=(r"AMD-Vi: Failed to copy DEV table from previous kernel",),
            # amd_iommu=off makes the kernel skip the IOMMU silently; its command line says so
            disabled_re=(r"Kernel command line:.*\bamd_iommu=off\b",),
            fault_re=r"Event logged \[IO_PAGE_FAULT",
            init_done_re=r"AMD-Vi: Interrupt remapping enabled",
            trace_events=("amdvi_translation_result", "amdvi_page_fault", "amdvi_dte_get_fail",
                          "amdvi_control_status"),
            mmio_base=None,
        ),
        IommuModel(
            name="none",
            title="no IOMMU",
            device=None,
            machine_options=(),
            first_append=(),
            crash_append=(),
            config_needed=(),
        ),
    )
}

# What every kdump run needs from the kernel under test, whatever the IOMMU.
KDUMP_CONFIG_NEEDED = ("CRASH_DUMP", "PROC_VMCORE", "KEXEC", "RELOCATABLE", "BLK_DEV_INITRD",
                       "SERIAL_8250_CONSOLE", "DEVTMPFS", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_CONSOLE")


def iommu_model(name: str) -> IommuModel:
    try:
        return IOMMUS[name]
    except KeyError:
        raise UsageError(f"unknown IOMMU {name!r}; choose one of: {', '.join(IOMMUS)}") from None
