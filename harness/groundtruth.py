"""What the emulated IOMMU really did, from QEMU's trace log.

QEMU runs with `-msg timestamp=on` and `-trace EVENT -D FILE`, so every line is
`TID@SECONDS.USEC:event args`, SECONDS from gettimeofday. The harness notes
the wall-clock time of its own start, so trace events and run phases share one
timeline (seconds since the run started).

Facts from QEMU 7.2 that shape this parser:
* Intel: `vtd_dmar_translate` is traced for every successful translation (IOTLB
  hits included); a failure is `vtd_dmar_fault` (one per 4-byte piece of the
  access). When the guest clears GCMD.TE, devices switch to the no-DMAR alias:
  `vtd_switch_address_space ... (iommu enabled=0)` and `vtd_dmar_enable enable 0`,
  after which their DMA goes straight to memory with no trace at all.
* virtio-iommu: `virtio_iommu_translate_out IOVA -> GPA for sid=N` per translation,
  `virtio_iommu_report_fault`, `virtio_iommu_device_reset` (a driver reset drops
  every domain), `virtio_iommu_switch_address_space` (a device moved to bypass).
* AMD: `amdvi_translation_result devid: B:D.F gpa IOVA hpa PAGE` for every
  access, a zero page-table entry silently gives `hpa 0x0` (the DMA is dropped);
  `amdvi_page_fault` for other faults; `amdvi_control_status` prints the control
  register after a guest write (bit 0: IOMMU enable). A disabled AMD IOMMU
  passes DMA through untraced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LINE_RE = re.compile(r"^(?:\d+@(?P<t>\d+\.\d+):)?(?P<event>\w+) (?P<args>.*)$")

VTD_TRANSLATE = re.compile(r"dev (?P<b>[0-9a-f]+):(?P<d>[0-9a-f]+)\.(?P<f>[0-9a-f]+) iova 0x(?P<iova>[0-9a-f]+) "
                           r"-> gpa 0x(?P<gpa>[0-9a-f]+) mask 0x(?P<mask>[0-9a-f]+)")
VTD_FAULT = re.compile(r"sid 0x(?P<sid>[0-9a-f]+) fault (?P<reason>\d+) addr 0x(?P<addr>[0-9a-f]+) write (?P<w>\d)")
VTD_SWITCH = re.compile(r"Device (?P<b>[0-9a-f]+):(?P<d>[0-9a-f]+)\.(?P<f>[0-9a-f]+) switching address space "
                        r"\(iommu enabled=(?P<on>\d)\)")
VTD_ENABLE = re.compile(r"enable (?P<on>\d)")
AMD_RESULT = re.compile(r"devid: (?P<b>[0-9a-f]+):(?P<d>[0-9a-f]+)\.(?P<f>[0-9a-f]+) gpa 0x(?P<iova>[0-9a-f]+) "
                        r"hpa 0x(?P<gpa>[0-9a-f]+)")
AMD_FAULT = re.compile(r"page fault accessing guest physical address 0x(?P<addr>[0-9a-f]+)")
AMD_CONTROL = re.compile(r"MMIO_STATUS state 0x(?P<ctrl>[0-9a-f]+)")
VIRTIO_TRANSLATE = re.compile(r"0x(?P<iova>[0-9a-f]+) -> 0x(?P<gpa>[0-9a-f]+) for sid=(?P<sid>\d+)")
VIRTIO_FAULT = re.compile(r"FAULT reason=\d+ flags=\d+ endpoint=(?P<sid>\d+) address =0x(?P<addr>[0-9a-f]+)")


def sid_bdf(sid: int) -> str:
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1f:02x}.{sid & 7:x}"

PAGE_MASK = ~0xFFF


def bdf_key(b: str, d: str, f: str) -> str:
    return f"{int(b, 16):02x}:{int(d, 16):02x}.{int(f, 16):x}"


@dataclass
class DeviceTruth:
    """One device's DMA as the IOMMU saw it."""

    bdf: str
    translations: int = 0
    translations_after_panic: int = 0
    failed_after_panic: int = 0           # AMD zero-PTE drops (hpa 0)
    target_pages: set = field(default_factory=set)      # guest-physical pages written or read via translation
    iova_to_page: dict = field(default_factory=dict)    # last translation seen per IOVA page
    last_translation_t: float | None = None
    switched_off_t: float | None = None   # Intel: device moved to the no-DMAR alias after the panic
    on_at_panic: bool | None = None       # Intel: was the device behind translation when the panic came?
    first_lines: list = field(default_factory=list)


@dataclass
class GroundTruth:
    iommu: str
    devices: dict = field(default_factory=dict)
    faults: int = 0
    faults_after_panic: int = 0
    fault_addrs_after_panic: set = field(default_factory=set)
    translation_off_t: float | None = None   # global: the IOMMU stopped translating after the panic
    reset_t: float | None = None             # virtio-iommu: the device was reset after the panic
    evidence: list = field(default_factory=list)
    lines: int = 0

    def device(self, bdf: str) -> DeviceTruth:
        if bdf not in self.devices:
            self.devices[bdf] = DeviceTruth(bdf)
        return self.devices[bdf]

    def dropped_t(self, bdf: str) -> float | None:
        """When translation stopped for `bdf` after the panic (None: it never did)."""
        dev = self.devices.get(bdf)
        times = [t for t in (self.translation_off_t, dev.switched_off_t if dev else None) if t is not None]
        return min(times) if times else None

    def to_json(self) -> dict:
        return {
            "iommu": self.iommu, "trace_lines": self.lines, "faults": self.faults,
            "faults_after_panic": self.faults_after_panic, "translation_off_s": self.translation_off_t,
            "iommu_reset_s": self.reset_t,
            "devices": {b: {"translations": d.translations, "translations_after_panic": d.translations_after_panic,
                            "failed_after_panic": d.failed_after_panic, "target_pages": len(d.target_pages),
                            "switched_off_s": d.switched_off_t, "last_translation_s": d.last_translation_t,
                            "translated_at_panic": d.on_at_panic}
                        for b, d in self.devices.items()},
            "evidence": self.evidence,
        }


def _note(gt: GroundTruth, dev: DeviceTruth | None, line: str, limit: int = 3) -> None:
    if dev is not None and len(dev.first_lines) < limit:
        dev.first_lines.append(line)
    if len(gt.evidence) < 40:
        gt.evidence.append(line)


def parse_trace(path: Path, iommu: str, wall0: float, panic_s: float | None) -> GroundTruth:
    """Parse QEMU's trace log; times become seconds since the run started (wall0)."""
    gt = GroundTruth(iommu)
    if not path.exists():
        return gt
    after = (lambda t: t is not None and panic_s is not None and t >= panic_s)
    with open(path, errors="replace") as f:
        for raw in f:
            m = LINE_RE.match(raw.rstrip("\n"))
            if not m:
                continue
            gt.lines += 1
            t = float(m.group("t")) - wall0 if m.group("t") else None
            ev, args = m.group("event"), m.group("args")
            line = f"{t:9.3f}s {ev} {args}" if t is not None else f"{ev} {args}"
            if ev in ("vtd_dmar_translate", "amdvi_translation_result", "virtio_iommu_translate_out"):
                if ev == "virtio_iommu_translate_out":
                    a = VIRTIO_TRANSLATE.match(args)
                    bdf = sid_bdf(int(a["sid"])) if a else None
                else:
                    a = (VTD_TRANSLATE if ev == "vtd_dmar_translate" else AMD_RESULT).match(args)
                    bdf = bdf_key(a["b"], a["d"], a["f"]) if a else None
                if not a:
                    continue
                dev = gt.device(bdf)
                iova, gpa = int(a["iova"], 16), int(a["gpa"], 16)
                if ev == "amdvi_translation_result" and gpa == 0:
                    if after(t):
                        dev.failed_after_panic += 1
                        if dev.failed_after_panic <= 2:
                            _note(gt, dev, line + "  (zero PTE: DMA dropped)")
                    continue
                dev.translations += 1
                dev.target_pages.add(gpa & PAGE_MASK)
                dev.iova_to_page[iova & PAGE_MASK] = gpa & PAGE_MASK
                dev.last_translation_t = t
                if after(t):
                    dev.translations_after_panic += 1
                    if dev.translations_after_panic == 1:
                        _note(gt, dev, line + "  (first translation after the panic)")
            elif ev in ("vtd_dmar_fault", "amdvi_page_fault", "virtio_iommu_report_fault"):
                a = {"vtd_dmar_fault": VTD_FAULT, "amdvi_page_fault": AMD_FAULT,
                     "virtio_iommu_report_fault": VIRTIO_FAULT}[ev].search(args)
                gt.faults += 1
                if after(t):
                    gt.faults_after_panic += 1
                    if a:
                        gt.fault_addrs_after_panic.add(int(a["addr"], 16) & PAGE_MASK)
                    if gt.faults_after_panic <= 3:
                        _note(gt, None, line)
            elif ev == "virtio_iommu_device_reset" and after(t):
                if gt.reset_t is None:
                    gt.reset_t = t
                    _note(gt, None, line + "  (the crash kernel reset the IOMMU: every domain dropped)")
            elif ev in ("vtd_switch_address_space", "virtio_iommu_switch_address_space"):
                a = VTD_SWITCH.search(args)
                if a and not after(t):
                    gt.device(bdf_key(a["b"], a["d"], a["f"])).on_at_panic = a["on"] == "1"
                elif a and a["on"] == "0" and after(t):
                    dev = gt.device(bdf_key(a["b"], a["d"], a["f"]))
                    if dev.switched_off_t is None:
                        dev.switched_off_t = t
                        _note(gt, dev, line)
            elif ev == "vtd_dmar_enable":
                a = VTD_ENABLE.search(args)
                if a and a["on"] == "0" and after(t) and gt.translation_off_t is None:
                    gt.translation_off_t = t
                    _note(gt, None, line + "  (translation switched off)")
            elif ev == "amdvi_control_status":
                a = AMD_CONTROL.search(args)
                if a and not int(a["ctrl"], 16) & 1 and after(t) and gt.translation_off_t is None:
                    gt.translation_off_t = t
                    _note(gt, None, line + "  (IOMMU enable bit cleared)")
    return gt
