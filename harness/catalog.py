"""The scenario catalog: the history of the in-flight-DMA-at-kdump problem, as data.

Each entry is a `Scenario` with the verdict a correct crash kernel gives (or,
for positive controls, the failure the harness must detect) and a one-line
reason citing where that behaviour comes from.

Tags pick entries: the IOMMU (`intel`, `amd`, `virtio`, `smmuv3`, `none`), the
kernel (`6.1`, `6.12`), the DMA source (`nic`, `edu`), `arm64` for Arm guests,
`control` for positive controls, and `slow` for entries that take more than a
couple of minutes under TCG.
"""

from __future__ import annotations

import fnmatch

from .errors import UsageError
from .scenario import DEFAULT_CRASH_BASE, Scenario

K612 = "debian-6.12"


def _s(name: str, expect: str, reason: str, *, tags: tuple[str, ...] = (), **kw) -> Scenario:
    sc = Scenario(name=name, expect=expect, reason=reason, **kw)
    kernel_tag = "6.12" if sc.kernel == K612 else "6.1"
    auto = (sc.iommu, sc.dma, kernel_tag) + (("arm64",) if sc.arch == "aarch64" else ())
    return sc.replace(tags=tuple(dict.fromkeys(auto + tags)))


CATALOG: tuple[Scenario, ...] = (
    _s("intel-copy-nic", "PASS",
       "kdump kernels copy the old VT-d context tables and keep translation on "
       "(Linux v4.2, 091d42e43d21 \"iommu/vt-d: Copy translation tables from old kernel\")",
       iommu="intel", dma="nic"),
    _s("intel-copy-edu", "PASS",
       "same copy path; aimed edu writes to mapped IOVAs land in the mapped buffers, unmapped ones fault "
       "(QEMU 7.2 vtd_do_iommu_translate -> vtd_report_fault)",
       iommu="intel", dma="edu"),
    _s("amd-copy-nic", "PASS",
       "kdump kernels copy the old AMD-Vi device table and defer attaching new domains (Linux v4.14, "
       "3ac3e5ee5ed5 \"iommu/amd: Copy old trans table from old kernel\")",
       iommu="amd", dma="nic"),
    _s("amd-copy-edu", "PASS",
       "AMD copy path with aimed DMA; unmapped IOVAs hit zero PTEs and are dropped "
       "(QEMU 7.2 amdvi_translate)",
       iommu="amd", dma="edu"),
    _s("intel-scalable-edu", "PASS",
       "scalable-mode VT-d (QEMU x-scalable-mode=on, intel_iommu=on,sm_on): copied since Linux v6.0, "
       "0c5f6c0d8201 \"iommu/vt-d: Fix kdump kernels boot failure with scalable mode\"",
       iommu="intel", iommu_options=("x-scalable-mode=on",), dma="edu",
       first_append=("intel_iommu=on,sm_on",), crash_append=("intel_iommu=on,sm_on",)),
    _s("intel-off-edu", "CORRUPTION",
       "positive control: intel_iommu=off switches translation off (Linux v4.12, 161b28aae165 "
       "\"iommu/vt-d: Make sure IOMMUs are off when intel_iommu=off\"), so in-flight DMA hits phys == IOVA",
       iommu="intel", dma="edu", crash_append=("intel_iommu=off",), tags=("control",)),
    _s("intel-off-nic", "UNSAFE_HANDOVER",
       "positive control: translation switched off while the NIC still fills its ring; its IOVAs "
       "(top of 4 GiB) are no RAM in a 1 GiB guest, so nothing visible is hit, by luck",
       iommu="intel", dma="nic", crash_append=("intel_iommu=off",), tags=("control",)),
    _s("amd-off-nic", "KDUMP_HANG",
       "positive control: since 9f81ca8d1fd6 \"iommu/amd: Don't call early_amd_iommu_init() when AMD IOMMU "
       "is disabled\" (v5.12) nothing turns the old kernel's IOMMU off; its interrupt remapping stays live",
       iommu="amd", dma="nic", crash_append=("amd_iommu=off",), tags=("control", "slow")),
    _s("intel-pt-nic", "PASS",
       "first kernel in passthrough (iommu=pt: identity domain, VT-d pass-through context entries; "
       "QEMU moves the device to its no-DMAR alias); the copied entries keep DMA at the same addresses",
       iommu="intel", dma="nic", first_append=("iommu=pt",)),
    _s("amd-pt-nic", "PASS",
       "first kernel in passthrough (iommu.passthrough=1: identity DTEs, still traced by QEMU); "
       "the copied device table keeps them",
       iommu="amd", dma="nic", first_append=("iommu.passthrough=1",)),
    _s("intel-strict-nic", "PASS",
       "strict invalidation in the first kernel (iommu.strict=1): every unmap flushes the IOTLB at once",
       iommu="intel", dma="nic", first_append=("iommu.strict=1",)),
    _s("intel-lazy-nic", "PASS",
       "lazy invalidation in the first kernel (iommu.strict=0; the x86 default since v5.15, e96763ec42ce "
       "\"iommu: Merge strictness and domain type configs\"): freed IOVAs stay in the IOTLB for a while",
       iommu="intel", dma="nic", first_append=("iommu.strict=0",)),
    _s("intel-noreset-nic", "PASS",
       "crash kernel without reset_devices (kdump.rst recommends \"irqpoll nr_cpus=1 reset_devices\"): "
       "nothing resets the NIC, which keeps writing into the old buffers",
       iommu="intel", dma="nic", crash_base=tuple(o for o in DEFAULT_CRASH_BASE if o != "reset_devices")),
    _s("intel-takeover-nic", "PASS",
       "driver takeover: the crash kernel's e1000e resets the NIC and its first DMA-API call attaches the "
       "crash kernel's domain (deferred attach, v5.12, 3ab657291638)",
       iommu="intel", dma="nic", crash_load_driver=True),
    _s("none-nic", "PASS",
       "no IOMMU: a crash kexec never clears bus mastering (only kexec reboot does, 4fc9bbf98fd6 \"PCI: "
       "Disable Bus Master only on kexec reboot\"); DMA keeps landing in the old buffers",
       iommu="none", dma="nic"),
    _s("none-edu", "PASS",
       "no IOMMU, aimed DMA at buffers the first kernel owns (physical addresses)",
       iommu="none", dma="edu"),
    _s("intel-swiotlb-nic", "PASS",
       "crash kernel with swiotlb=force (\"force using of bounce buffers even if they wouldn't be "
       "automatically used\"): its own DMA bounces; the old NIC DMA must stay in old memory",
       iommu="intel", dma="nic", crash_append=("swiotlb=force",)),
    _s("intel-crashkernel-96M", "KDUMP_PANIC",
       "crashkernel=96M is too small for Debian 6.1's crash kernel: it runs out of memory unpacking its "
       "initramfs (\"System is deadlocked on memory\"), measured here; 6.12's fits (next entry)",
       iommu="intel", dma="none", crashkernel="96M", tags=("memory",)),
    _s("intel-crashkernel-96M-6.12", "PASS",
       "the same 96M reservation holds Debian 6.12's crash kernel and initramfs (virtio built in, fewer "
       "modules); the bisect test uses the pair as a footprint regression",
       iommu="intel", dma="none", crashkernel="96M", kernel=K612, tags=("memory",)),
    _s("virtio-bypass-edu-6.12", "CORRUPTION",
       "virtio-iommu has no kdump adoption: the crash kernel's driver resets the device (every domain "
       "dropped) and QEMU's boot-bypass (on by default since 448179e33ea8) lets old DMA through untranslated",
       iommu="virtio", dma="edu", kernel=K612, tags=("virtio",)),
    _s("virtio-bypass-nic-6.12", "UNSAFE_HANDOVER",
       "the same reset with the NIC: its IOVAs go to physical addresses with no RAM behind them here",
       iommu="virtio", dma="nic", kernel=K612, tags=("virtio",)),
    _s("virtio-nobypass-edu-6.12", "PASS",
       "boot-bypass=off: after the crash kernel's reset, old DMA faults (VIRTIO_IOMMU_FAULT) instead of "
       "landing; the bypass setting decides between corruption and a fault storm",
       iommu="virtio", iommu_options=("boot-bypass=off",), dma="edu", kernel=K612, tags=("virtio",)),
    _s("virtio-nodriver-edu-6.12", "NO_VMCORE",
       "a crash kernel without the virtio-iommu driver: devices behind it (ACPI VIOT) wait for it forever, "
       "so neither the results port nor the dump disk ever probes",
       iommu="virtio", dma="edu", kernel=K612, crash_iommu_driver=False, tags=("virtio", "slow")),
    _s("none-kexec-edu", "CORRUPTION",
       "plain kexec: shutdown clears bus mastering only of devices a driver enabled (4fc9bbf98fd6 \"PCI: "
       "Disable Bus Master only on kexec reboot\"); a driverless DMA engine writes on into the next kernel",
       iommu="none", dma="edu", handover="kexec", tags=("kexec",)),
    _s("intel-kexec-edu", "CORRUPTION",
       "plain kexec with VT-d: intel_iommu_shutdown switches translation off for the jump, so until the next "
       "kernel's IOMMU init in-flight DMA is untranslated and lands in its memory",
       iommu="intel", dma="edu", handover="kexec", tags=("kexec",)),
    _s("intel-copy-nic-6.12", "PASS", "the Intel copy path on Debian's 6.12 kernel",
       iommu="intel", dma="nic", kernel=K612),
    _s("amd-copy-nic-6.12", "PASS", "the AMD copy path on Debian's 6.12 kernel",
       iommu="amd", dma="nic", kernel=K612),
    _s("smmuv3-edu", "PASS",
       "arm64: a kdump kernel finding the SMMU enabled sets GBPA to abort and resets it (b63b3439b856 "
       "\"iommu/arm-smmu-v3: Abort all transactions if SMMU is enabled in kdump kernel\"), keeps it on "
       "without event/PRI queues (3f54c447df34 \"Don't disable SMMU in kdump kernel\") and never adopts the "
       "old stream table: old DMA is aborted, not landed",
       arch="aarch64", iommu="smmuv3", dma="edu", tags=("slow",)),
    _s("arm64-none-kdump", "PASS",
       "arm64 without an IOMMU: the crash kernel's makedumpfile writes a kdump-compressed dump; canaries and "
       "the reservation's integrity are checked as on x86",
       arch="aarch64", iommu="none", dma="none", dump_format="kdump", tags=("slow",)),
    _s("intel-off-edu-6.12", "CORRUPTION", "positive control on Debian's 6.12 kernel (intel_disable_iommus)",
       iommu="intel", dma="edu", crash_append=("intel_iommu=off",), kernel=K612, tags=("control",)),
)

DEFAULT = "intel-copy-nic"
# what `kdump-harness run --arch A` runs without a scenario name
DEFAULT_FOR_ARCH = {"x86_64": DEFAULT, "aarch64": "smmuv3-edu"}


def by_name(name: str) -> Scenario:
    for sc in CATALOG:
        if sc.name == name:
            return sc
    close = [sc.name for sc in CATALOG if name in sc.name or sc.name.startswith(name.split("-")[0])]
    hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
    raise UsageError(f"no scenario named {name!r} in the catalog (kdump-harness list shows them){hint}")


def select(filters: list[str] | None = None) -> list[Scenario]:
    """Catalog entries for filter terms. A term is a tag (`intel`, `6.12`, `control`,
    `slow`) or a glob on the name (`intel-*`); `a+b` needs both. An entry is
    selected when it matches any positive term (or there is none) and no `!term`."""
    def hit(sc: Scenario, term: str) -> bool:
        return all(t in sc.tags or fnmatch.fnmatch(sc.name, t) for t in term.split("+"))

    terms = filters or []
    pos = [t for t in terms if not t.startswith("!")]
    neg = [t[1:] for t in terms if t.startswith("!")]
    return [sc for sc in CATALOG
            if (not pos or any(hit(sc, t) for t in pos)) and not any(hit(sc, t) for t in neg)]
