"""What QEMU's emulated Arm SMMUv3 did, from its trace points (QEMU 7.2).

The trace lines (`-trace EVENT -D FILE -msg timestamp=on`, hw/arm/trace-events):

    smmuv3_translate_success  %s sid=0x%x iova=0x%lx translated=0x%lx perm=0x%x
    smmuv3_translate_abort    %s sid=0x%x abort on iova:0x%lx is_write=%d
    smmuv3_translate_bypass   %s sid=0x%x STE bypass iova:0x%lx is_write=%d
    smmuv3_translate_disable  %s sid=0x%x bypass (smmu disabled) iova:0x%lx is_write=%d
    smmuv3_record_event       %s sid=0x%x
    smmuv3_write_mmio         addr: 0x%lx val:0x%lx size: 0x%x(%d)

`%s` is the device's IOMMU memory region, sid the PCI requester ID
(bus << 8 | devfn). Facts of QEMU 7.2's model that shape the reading:

* translate_success is traced for every access, IOTLB hits included;
  `translated` is the full guest-physical address.
* With SMMUEN clear (CR0 bit 0) every access bypasses, traced as
  translate_disable. QEMU 7.2 has no GBPA register: the kdump kernel's
  "GBPA = abort, then disable" (Linux arm_smmu_device_reset) still lets DMA
  through untranslated until SMMUEN is set again. Real SMMUs abort it.
* An STE whose Config is abort (Linux: a stream no driver attached, with
  disable_bypass) gives translate_abort, and no event.
* A translation fault is traced (record_event) only while the event queue is
  enabled: a kdump kernel runs without one (CR0 = SMMUEN|CMDQEN), so its faults
  appear only as `-d guest_errors` lines without timestamps:
  `<region> translation failed for iova=0x...(F_TRANSLATION)`.
* Register writes: CR0 at 0x20 (SMMUEN bit 0, EVTQEN bit 2, CMDQEN bit 3),
  GBPA at 0x44 (UPDATE bit 31, ABORT bit 20), STRTAB_BASE at 0x80.

`smmuv3_line()` reads one line into a groundtruth.GroundTruth (translations per
device, faults, when DMA passed untranslated after the panic) and an
`SmmuFacts` (the SMMU's own story: CR0/GBPA writes, disabled windows, stream
table bases); `parse_smmuv3_trace()` reads a whole log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .groundtruth import LINE_RE, PAGE_MASK, GroundTruth, _note

TRANSLATE = re.compile(r"(?P<mr>\S+) sid=0x(?P<sid>[0-9a-f]+) iova=0x(?P<iova>[0-9a-f]+) "
                       r"translated=0x(?P<gpa>[0-9a-f]+) perm=0x(?P<perm>[0-9a-f]+)")
PASSED = re.compile(r"(?P<mr>\S+) sid=0x(?P<sid>[0-9a-f]+) (?P<how>abort on|STE bypass|bypass \(smmu disabled\)) "
                    r"iova[:=]0x(?P<iova>[0-9a-f]+) is_write=(?P<w>\d)")
EVENT = re.compile(r"(?P<type>\S+) sid=0x(?P<sid>[0-9a-f]+)")
MMIO = re.compile(r"addr: 0x(?P<off>[0-9a-f]+) val:0x(?P<val>[0-9a-f]+) size")
GUEST_ERROR = re.compile(r"^(?P<mr>smmuv3-iommu-memory-region-\S+) translation failed for "
                         r"iova=0x(?P<iova>[0-9a-f]+)\((?P<type>[^)]*)\)")

CR0, GBPA, STRTAB_BASE = 0x20, 0x44, 0x80
CR0_SMMUEN, CR0_EVTQEN, CR0_CMDQEN = 1 << 0, 1 << 2, 1 << 3
GBPA_UPDATE, GBPA_ABORT = 1 << 31, 1 << 20

EVENTS = ("smmuv3_translate_success", "smmuv3_translate_abort", "smmuv3_translate_bypass",
          "smmuv3_translate_disable", "smmuv3_record_event", "smmuv3_write_mmio")


def sid_bdf(sid: int) -> str:
    """PCI requester ID -> "bb:dd.f"."""
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1f:02x}.{sid & 7:x}"


@dataclass
class SmmuFacts:
    """The SMMU's own story, as the guest programmed it."""

    cr0_writes: list = field(default_factory=list)        # (t, value)
    gbpa_writes: list = field(default_factory=list)       # (t, value)
    strtab_bases: list = field(default_factory=list)      # (t, base address)
    disabled_windows: list = field(default_factory=list)  # [t SMMUEN cleared, t set again or None]
    passed_untranslated: dict = field(default_factory=dict)   # bdf -> accesses that bypassed after the panic
    aborted: dict = field(default_factory=dict)               # bdf -> STE-abort accesses after the panic
    guest_error_faults: int = 0                               # "translation failed" lines (no timestamps)

    def crash_kernel_story(self, panic_s: float | None) -> list[str]:
        """What the guest did to the SMMU after the panic (the next kernel), in time order."""
        out: list[tuple[float, str]] = []
        for t, v in self.gbpa_writes:
            out.append((t, f"GBPA <- 0x{v:x} ({'abort' if v & GBPA_ABORT else 'bypass'} while disabled; "
                           f"QEMU 7.2 ignores GBPA)"))
        for t, v in self.cr0_writes:
            bits = [n for b, n in ((CR0_SMMUEN, "SMMUEN"), (CR0_EVTQEN, "EVTQEN"), (CR0_CMDQEN, "CMDQEN")) if v & b]
            out.append((t, f"CR0 <- 0x{v:x} ({'|'.join(bits) or 'all off'})"))
        for t, base in self.strtab_bases:
            out.append((t, f"STRTAB_BASE <- 0x{base:x} (a stream table of its own: the old one is not adopted)"))
        return [f"{t:.3f}s {text}" for t, text in sorted(out, key=lambda x: x[0])
                if t is not None and (panic_s is None or t >= panic_s)]

    def to_json(self, panic_s: float | None = None) -> dict:
        return {"cr0_writes": [[t, v] for t, v in self.cr0_writes],
                "gbpa_writes": [[t, v] for t, v in self.gbpa_writes],
                "strtab_bases": [[t, v] for t, v in self.strtab_bases],
                "disabled_windows": self.disabled_windows,
                "passed_untranslated_after_panic": self.passed_untranslated,
                "aborted_after_panic": self.aborted,
                "guest_error_faults": self.guest_error_faults,
                "story": self.crash_kernel_story(panic_s)}


def smmuv3_line(gt: GroundTruth, facts: SmmuFacts, t: float | None, ev: str, args: str, line: str,
                after: bool) -> bool:
    """Account one parsed trace line; False if it is not an SMMUv3 event this reads.
    `after`: the line is from after the panic."""
    if ev == "smmuv3_translate_success":
        a = TRANSLATE.match(args)
        if not a:
            return False
        dev = gt.device(sid_bdf(int(a["sid"], 16)))
        iova, gpa = int(a["iova"], 16), int(a["gpa"], 16)
        dev.translations += 1
        dev.target_pages.add(gpa & PAGE_MASK)
        dev.iova_to_page[iova & PAGE_MASK] = gpa & PAGE_MASK
        dev.last_translation_t = t
        if not after:
            dev.on_at_panic = True
        else:
            dev.translations_after_panic += 1
            if dev.translations_after_panic == 1:
                _note(gt, dev, line + "  (first translation after the panic)")
        return True
    if ev in ("smmuv3_translate_abort", "smmuv3_translate_bypass", "smmuv3_translate_disable"):
        a = PASSED.match(args)
        if not a:
            return False
        bdf = sid_bdf(int(a["sid"], 16))
        dev = gt.device(bdf)
        iova = int(a["iova"], 16)
        if ev == "smmuv3_translate_abort":
            gt.faults += 1
            if after:
                gt.faults_after_panic += 1
                gt.fault_addrs_after_panic.add(iova & PAGE_MASK)
                facts.aborted[bdf] = facts.aborted.get(bdf, 0) + 1
                if facts.aborted[bdf] == 1:
                    _note(gt, dev, line + "  (STE abort: the DMA was dropped)")
            return True
        # untranslated: the access went to guest-physical address == IOVA
        dev.target_pages.add(iova & PAGE_MASK)
        if not after:
            if ev == "smmuv3_translate_bypass":
                dev.on_at_panic = False
            return True
        facts.passed_untranslated[bdf] = facts.passed_untranslated.get(bdf, 0) + 1
        if dev.switched_off_t is None:
            dev.switched_off_t = t
            why = "SMMU disabled" if ev == "smmuv3_translate_disable" else "STE bypass"
            _note(gt, dev, line + f"  (DMA passed untranslated: {why})")
        return True
    if ev == "smmuv3_record_event":
        a = EVENT.match(args)
        gt.faults += 1
        if after:
            gt.faults_after_panic += 1
            if gt.faults_after_panic <= 3:
                _note(gt, gt.device(sid_bdf(int(a["sid"], 16))) if a else None, line)
        return True
    if ev == "smmuv3_write_mmio":
        a = MMIO.match(args)
        if not a:
            return False
        off, val = int(a["off"], 16), int(a["val"], 16)
        if off == CR0:
            facts.cr0_writes.append((t, val))
            open_window = facts.disabled_windows and facts.disabled_windows[-1][1] is None
            if not val & CR0_SMMUEN and not open_window and any(v & CR0_SMMUEN for _, v in facts.cr0_writes[:-1]):
                facts.disabled_windows.append([t, None])
                if after:
                    _note(gt, None, line + "  (SMMUEN cleared: QEMU 7.2 lets DMA bypass until it is set again)")
            elif val & CR0_SMMUEN and open_window:
                facts.disabled_windows[-1][1] = t
                if after:
                    _note(gt, None, line + "  (SMMUEN set again)")
        elif off == GBPA:
            facts.gbpa_writes.append((t, val))
            if after:
                _note(gt, None, line + f"  (GBPA {'abort' if val & GBPA_ABORT else 'bypass'})")
        elif off == STRTAB_BASE:
            facts.strtab_bases.append((t, val & ((1 << 52) - 1) & ~0x3F))
        return True
    return False


def parse_smmuv3_trace(path: Path, wall0: float, panic_s: float | None) -> tuple[GroundTruth, SmmuFacts]:
    """A whole trace log (and any `-d guest_errors` lines in it); times become seconds
    since the run started (wall0), as in groundtruth.parse_trace."""
    gt, facts = GroundTruth("smmuv3"), SmmuFacts()
    if not Path(path).exists():
        return gt, facts
    last_t = None
    with open(path, errors="replace") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            g = GUEST_ERROR.match(raw)
            if g:  # untimestamped: it happened after the last timestamped line
                facts.guest_error_faults += 1
                gt.faults += 1
                if panic_s is not None and last_t is not None and last_t >= panic_s:
                    gt.faults_after_panic += 1
                    gt.fault_addrs_after_panic.add(int(g["iova"], 16) & PAGE_MASK)
                    if gt.faults_after_panic <= 3:
                        _note(gt, None, f"~{last_t:9.3f}s {raw}")
                continue
            m = LINE_RE.match(raw)
            if not m:
                continue
            t = float(m.group("t")) - wall0 if m.group("t") else None
            if t is not None:
                last_t = t
            ev, args = m.group("event"), m.group("args")
            line = f"{t:9.3f}s {ev} {args}" if t is not None else f"{ev} {args}"
            after = t is not None and panic_s is not None and t >= panic_s
            if smmuv3_line(gt, facts, t, ev, args, line, after):
                gt.lines += 1
    return gt, facts
