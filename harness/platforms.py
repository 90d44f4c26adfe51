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
    # kernel modules that are the IOMMU driver (loaded first, in both kernels)
    modules: tuple[str, ...] = ()

    @property
    def present(self) -> bool:
        """The machine has this IOMMU (smmuv3 is a machine property, so `device` is None)."""
        return self.device is not None or self.name != "none"

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
            name="virtio",
            title="virtio-iommu (QEMU virtio-iommu-pci, ACPI VIOT)",
            device="virtio-iommu-pci",
            machine_options=(),
            first_append=(),
            crash_append=(),
            config_needed=("VIRTIO_IOMMU", "ACPI_VIOT"),
            # no kdump adoption: the driver resets the device, which drops every domain; what
            # happens to old DMA then is the device's bypass setting (QEMU boot-bypass, default on)
            not_copied_re=(r"virtio_iommu virtio\d+: input address",),
            init_done_re=r"virtio_iommu virtio\d+: input address",
            fault_re=r"virtio_iommu virtio\d+: .*fault",
            trace_events=("virtio_iommu_translate_out", "virtio_iommu_report_fault",
                          "virtio_iommu_switch_address_space", "virtio_iommu_device_reset",
                          "virtio_iommu_attach", "virtio_iommu_detach"),
            modules=("virtio_iommu",),
        ),
        IommuModel(
            name="smmuv3",
            title="Arm SMMUv3 (QEMU virt iommu=smmuv3)",
            device=None,                      # a property of the virt machine, not a -device
            machine_options=("iommu=smmuv3",),
            first_append=(),
            crash_append=(),
            config_needed=("ARM_SMMU_V3",),
            # arm-smmu-v3 never adopts the old stream table: a kdump kernel that finds the
            # SMMU enabled sets GBPA to abort, disables it, installs its own stream table
            # (unattached streams abort: disable_bypass) and enables it again without the
            # event queue (Linux since v5.2, b63b3439b856; QEMU 7.2 does not implement GBPA,
            # so its DMA bypasses the SMMU while SMMUEN is 0)
            not_copied_re=(r"arm-smmu-v3 \S+: SMMU currently enabled! Resetting\.\.\.",),
            # streams without a driver bypass (arm-smmu-v3.disable_bypass=0), or every
            # domain is an identity map (iommu.passthrough=1)
            disabled_re=(r"Kernel command line:.*\barm-smmu-v3\.disable_bypass=(?:0|n|N)\b",
                         r"Kernel command line:.*\biommu\.passthrough=(?:1|y|Y|on)\b"),
            # the first kernel's event queue; a kdump kernel runs without one
            fault_re=r"arm-smmu-v3 \S+: event 0x[0-9a-f]+ received",
            # printed right before the reset that installs the new stream table
            init_done_re=r"arm-smmu-v3 \S+: SMMU currently enabled! Resetting",
            trace_events=("smmuv3_translate_success", "smmuv3_translate_abort", "smmuv3_translate_bypass",
                          "smmuv3_translate_disable", "smmuv3_record_event", "smmuv3_write_mmio"),
            mmio_base=0x09050000,             # virt's VIRT_SMMU
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


def kdump_config_needed(arch: str, iommu: str) -> tuple[str, ...]:
    """The kernel config options a kdump run needs on `arch` with `iommu`."""
    from .arch import arch_info

    return arch_info(arch).kernel_config_needed(KDUMP_CONFIG_NEEDED) + iommu_model(iommu).config_needed
