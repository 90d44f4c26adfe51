"""From markers found in memory to a verdict with evidence.

Two views of guest memory are scanned with the C checker:
* the vmcore: old memory as the crash kernel saved it;
* the host's view of guest RAM (QEMU's memory-backend-file), read after QEMU
  exited: the only view of the crash kernel's own reservation, which no vmcore
  contains.

Every marker record found is put in one class:
* `old_memory_expected`   where the device's mapping at the panic sent it;
* `old_memory_elsewhere`  anywhere else in old memory (misdirected);
* `crash_kernel_region`   inside the crashkernel= reservation (the crash kernel's
                          own memory: the worst place);
* `new_kernel_memory`     after a plain kexec handover, anything sent after it:
                          all of RAM belongs to the next kernel by then;
and every transfer sent is `seen` or `never_seen`.

"Where the mapping sent it": for edu, the guest reported each target IOVA's
physical page; for the NIC, the pages the IOMMU translated its accesses to
(QEMU trace). A device whose DMA was untranslated (no IOMMU, or passthrough)
has no wrong place in old memory.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .checker import CanaryState, open_dump
from .dma import DmaSource, EduSource, NicSource
from .groundtruth import GroundTruth
from .markers import PAGE_SIZE, Source
from .verdict import Outcome, Verdict

log = logging.getLogger(__name__)

CLASSES = ("old_memory_expected", "old_memory_elsewhere", "crash_kernel_region", "new_kernel_memory")
MAX_LISTED = 50


@dataclass
class Finding:
    phys: int
    source: str
    seq: int
    slot: int
    iova: int
    t: float
    where: str
    expected_phys: int | None = None
    view: str = "vmcore"

    def line(self) -> str:
        exp = f", meant for 0x{self.expected_phys:x}" if self.expected_phys is not None else ""
        iova = f" iova 0x{self.iova:x}" if self.iova else ""
        return (f"{self.where}: {self.source} transfer {self.seq} record {self.slot}{iova} sent at {self.t:.2f}s "
                f"found at phys 0x{self.phys:x}{exp} ({self.view})")

    def to_json(self) -> dict:
        return {"phys": self.phys, "source": self.source, "seq": self.seq, "slot": self.slot, "iova": self.iova,
                "t": round(self.t, 3), "where": self.where, "expected_phys": self.expected_phys, "view": self.view}


def crash_region_ranges(memory_mb: int, crash_range, arch: str = "x86_64") -> list[tuple[int, int, int]]:
    """(file offset, phys, length): the part of the guest's RAM backing file that
    holds guest-physical `crash_range` (inclusive), on `arch`'s RAM layout."""
    from .arch import arch_info

    start, end = crash_range
    out = []
    for off, phys, length in arch_info(arch).ram_ranges(memory_mb):
        lo, hi = max(phys, start), min(phys + length, end + 1)
        if lo < hi:
            out.append((off + lo - phys, lo, hi - lo))
    return out


@dataclass
class RegionSnapshot:
    """Markers in the crash kernel's reservation, read from the host's RAM view
    at one moment: after the last DMA, before the crash kernel reads /proc/vmcore
    (from then on its page cache holds copies of old memory)."""

    t: float
    hits: list
    summary: dict


def snapshot_crash_region(ram_file: Path, memory_mb: int, crash_range, nonce: int, t: float,
                          arch: str = "x86_64") -> RegionSnapshot:
    with open_dump(ram_file, raw_ranges=crash_region_ranges(memory_mb, crash_range, arch)) as dump:
        res = dump.scan(nonce, max_markers=1 << 20, allow_unreadable=True)
    return RegionSnapshot(t, list(res.markers), {
        "taken_s": round(t, 3), "bytes": res.bytes_scanned, "seconds": round(res.seconds, 3),
        "markers": res.valid_count, "stale": res.stale_count, "torn": res.torn_count})


@dataclass
class DmaAnalysis:
    source: str
    nonce: int
    panic_t: float | None
    crash_range: tuple[int, int] | None
    findings: list[Finding] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    seen_seqs: dict = field(default_factory=lambda: defaultdict(set))
    canaries: list = field(default_factory=list)
    scans: dict = field(default_factory=dict)
    dropped_t: float | None = None
    dropped_while_active: bool = False
    dropped_evidence: list = field(default_factory=list)
    after_panic: int = 0                      # records sent after the panic, found
    after_panic_seqs: set = field(default_factory=set)
    canary_pages: list = field(default_factory=list)
    handover_t: float | None = None  # plain kexec: from here on all RAM is the next kernel's
    by_mib: dict = field(default_factory=lambda: defaultdict(Counter))  # class -> {MiB: records}

    def in_crash_region(self, phys: int) -> bool:
        return self.crash_range is not None and self.crash_range[0] <= phys <= self.crash_range[1]


def classify(an: DmaAnalysis, hit, view: str, source: DmaSource, gt: GroundTruth | None) -> Finding | None:
    t = hit.t_ns / 1e9
    if hit.source == Source.EDU and isinstance(source, EduSource):
        if source.staging is not None and source.staging <= hit.phys < source.staging + PAGE_SIZE:
            return None  # the host writes each transfer there itself (and wipes it)
        target = next((x for x in source.targets if x.iova <= hit.iova < x.iova + PAGE_SIZE), None)
        expected = target.phys + (hit.iova - target.iova) if target is not None and target.mapped else None
        if an.in_crash_region(hit.phys):
            where = "crash_kernel_region"
        elif expected is not None and hit.phys == expected:
            where = "old_memory_expected"
        elif not source.iommu_present:
            where = "old_memory_expected"  # no IOMMU: device addresses are physical
        else:
            where = "old_memory_elsewhere"
        return Finding(hit.phys, "edu", hit.seq, hit.slot, hit.iova, t, where, expected, view)
    if hit.source == Source.NIC and isinstance(source, NicSource):
        dev = gt.devices.get(source.bdf) if gt else None
        if an.in_crash_region(hit.phys):
            where = "crash_kernel_region"
        elif gt is None or gt.iommu == "none" or dev is None or dev.on_at_panic is False or not dev.target_pages:
            where = "old_memory_expected"  # untranslated DMA: no wrong place in old memory
        elif (hit.phys & ~(PAGE_SIZE - 1)) in dev.target_pages or \
                ((hit.phys + 63) & ~(PAGE_SIZE - 1)) in dev.target_pages:
            where = "old_memory_expected"
        else:
            where = "old_memory_elsewhere"
        return Finding(hit.phys, "nic", hit.seq, hit.slot, 0, t, where, None, view)
    return None  # canary records, or another source's records in a run without that source


def add_hits(an: DmaAnalysis, hits, view: str, source: DmaSource, gt: GroundTruth | None) -> None:
    for hit in hits:
        f = classify(an, hit, view, source, gt)
        if f is None:
            continue
        if an.handover_t is not None and f.t >= an.handover_t:
            f.where = "new_kernel_memory"  # sent after a plain kexec: it landed in the next kernel's memory
        an.counts[f.where] += 1
        an.by_mib[f.where][f.phys >> 20] += 1
        an.seen_seqs[f.source].add(f.seq)
        if an.panic_t is not None and f.t >= an.panic_t:
            an.after_panic += 1
            an.after_panic_seqs.add(f.seq)
        if f.where != "old_memory_expected" or len(an.findings) < MAX_LISTED:
            an.findings.append(f)


def analyze_dma(*, source: DmaSource, nonce: int, vmcore: Path | None, region: RegionSnapshot | None,
                crash_range, panic_t: float | None, gt: GroundTruth | None, canary_pages: list,
                handover_t: float | None = None) -> DmaAnalysis:
    an = DmaAnalysis(source.name, nonce, panic_t, tuple(crash_range) if crash_range else None,
                     canary_pages=list(canary_pages), handover_t=handover_t)
    if vmcore is not None and vmcore.exists():
        with open_dump(vmcore) as dump:
            res = dump.scan(an.nonce, max_markers=1 << 20, allow_unreadable=True)
            an.scans["vmcore"] = {"format": dump.format, "bytes": res.bytes_scanned,
                                  "seconds": round(res.seconds, 3), "markers": res.valid_count,
                                  "stale": res.stale_count, "torn": res.torn_count,
                                  "torn_first": [f"0x{t.phys:x}" for t in res.torn[:10]],
                                  "unreadable_bytes": res.unreadable_bytes}
            add_hits(an, res.markers, "vmcore", source, gt)
            if an.canary_pages:
                an.canaries = dump.check_canaries(an.nonce, an.canary_pages)
    if region is not None:
        # the crash kernel's own memory: no vmcore holds it, the host's RAM view does
        an.scans["crash_region"] = region.summary
        add_hits(an, region.hits, "host-ram", source, gt)
    # translation switched off while the device was still doing DMA?
    if gt is not None and source.bdf is not None:
        an.dropped_t = gt.dropped_t(source.bdf)
        if an.dropped_t is not None:
            after = [tr for tr in source.transfers if tr.t > an.dropped_t and tr.fired]
            dev = gt.devices.get(source.bdf)
            if isinstance(source, EduSource):
                an.dropped_while_active = bool(after)
            elif isinstance(source, NicSource):
                recent = dev is not None and dev.last_translation_t is not None and \
                    dev.last_translation_t > an.dropped_t - 2.0
                an.dropped_while_active = bool(after) and recent
            if an.dropped_while_active:
                an.dropped_evidence = [l for l in gt.evidence if f"Device {source.bdf}" in l or "switched off" in l
                                       or "reset the IOMMU" in l or "cleared" in l][:3]
                an.dropped_evidence.append(f"{len(after)} transfers were sent after translation stopped at "
                                           f"{an.dropped_t:.2f}s")
    return an


MOMENTS = ("before_panic", "during_kexec", "crash_before_iommu_init", "crash_after_iommu_init")


def moment_of(t: float, marks: dict) -> str:
    """Where on the crash's timeline a transfer was sent (from the run's marks)."""
    if t < marks.get("panic", float("inf")):
        return "before_panic"
    if t < marks.get("crash_kernel_start", float("inf")):
        return "during_kexec"
    init = marks.get("crash_iommu_init")
    if init is None:
        return "crash_after_iommu_init" if t >= marks.get("crash_userspace", float("inf")) else "crash_unknown"
    return "crash_before_iommu_init" if t < init else "crash_after_iommu_init"


def dma_report(an: DmaAnalysis, source: DmaSource, gt: GroundTruth | None, marks: dict | None = None) -> dict:
    panic = an.panic_t if an.panic_t is not None else float("inf")
    sent = [tr for tr in source.transfers if tr.fired]
    after_panic = [tr for tr in sent if tr.t >= panic]
    by_phase = {}
    for tr in source.transfers:
        p = by_phase.setdefault(tr.phase, {"sent": 0, "seen": 0, "not_fired": 0})
        if not tr.fired:
            p["not_fired"] += 1
            continue
        p["sent"] += 1
        if tr.seq in an.seen_seqs.get(source.name, ()):
            p["seen"] += 1
    by_moment: dict = {}
    for tr in source.transfers:
        if tr.fired:
            p = by_moment.setdefault(moment_of(tr.t, marks or {}), {"sent": 0, "seen": 0})
            p["sent"] += 1
            p["seen"] += tr.seq in an.seen_seqs.get(source.name, ())
    changed = [c for c in an.canaries if c.state == CanaryState.CHANGED]
    return {
        "source": source.name,
        "nonce": f"0x{an.nonce:016x}",
        "sent": len(sent),
        "sent_after_panic": len(after_panic),
        "not_fired": sum(1 for tr in source.transfers if not tr.fired),
        "seen": len(an.seen_seqs.get(source.name, ())),
        "never_seen": len(sent) - len(an.seen_seqs.get(source.name, ())),
        "faulted": gt.faults_after_panic if gt else None,
        "landed": {c: an.counts.get(c, 0) for c in CLASSES},
        "landed_after_panic": an.after_panic,
        "landed_after_panic_transfers": len(an.after_panic_seqs),
        "per_phase": by_phase,            # by the moment of the schedule the source meant
        "per_moment": by_moment,          # by when it really went out, against the crash's timeline
        "crash_iommu_init_s": (marks or {}).get("crash_iommu_init"),
        "translation_dropped_s": an.dropped_t,
        "translation_dropped_while_active": an.dropped_while_active,
        "misdirected": [f.to_json() for c in CLASSES[1:] for f in
                        [f for f in an.findings if f.where == c][:MAX_LISTED // 2]],  # a share of each class
        "canaries": {"count": len(an.canaries),
                     "intact": sum(1 for c in an.canaries if c.state == CanaryState.INTACT),
                     "changed": [{"index": c.index, "phys": c.phys, "changed_bytes": c.changed_bytes,
                                  "first_diff": c.diffs[0]._asdict() if c.diffs else None} for c in changed],
                     "missing": [c.index for c in an.canaries if c.state != CanaryState.INTACT
                                 and c.state != CanaryState.CHANGED]},
        "scans": an.scans,
        "memory": memory_picture(an, source, gt),
        "timeline": timeline(an, source),
        "ground_truth": gt.to_json() if gt else None,
        "detail": source.to_json(),
    }


def memory_picture(an: DmaAnalysis, source: DmaSource, gt: GroundTruth | None) -> dict:
    """What a guest-physical memory map needs: hits per MiB by class, expected
    DMA targets, canary pages."""
    targets = []
    if isinstance(source, EduSource):
        for t in source.targets:
            targets.append({"phys": t.phys if t.mapped else t.iova, "kind": t.kind, "mapped": t.mapped,
                            "iova": t.iova, "slot": t.slot})
    elif gt is not None and source.bdf in gt.devices:
        mibs = Counter(p >> 20 for p in gt.devices[source.bdf].target_pages)
        targets = [{"phys": mib << 20, "kind": "nic-buffers", "pages": n} for mib, n in sorted(mibs.items())]
    states = {c.index: c.state.value for c in an.canaries}
    return {
        "hits_by_mib": {c: {str(k): v for k, v in sorted(an.by_mib[c].items())} for c in CLASSES if an.by_mib.get(c)},
        "targets": targets,
        "canaries": [{"index": i, "phys": p, "state": states.get(i, "unchecked")} for i, p in an.canary_pages],
    }


def timeline(an: DmaAnalysis, source: DmaSource, step: float = 0.25) -> dict:
    """Transfers sent, and sent-and-found, per `step` seconds of the run."""
    seen = an.seen_seqs.get(source.name, set())
    bins: dict[int, list[int]] = {}
    for tr in source.transfers:
        if not tr.fired:
            continue
        b = bins.setdefault(int(tr.t / step), [0, 0])
        b[0] += 1
        if tr.seq in seen:
            b[1] += 1
    return {"step_s": step, "bins": [{"t": round(k * step, 3), "sent": v[0], "landed": v[1]}
                                     for k, v in sorted(bins.items())]}


def dma_verdict(an: DmaAnalysis, source: DmaSource, rep: dict, gt: GroundTruth | None = None) -> Outcome | None:
    """The DMA part of the verdict; None when nothing about DMA stands against PASS."""
    bad = [f for f in an.findings if f.where != "old_memory_expected"]
    changed = rep["canaries"]["changed"]
    if bad or changed:
        ev = [f.line() for f in bad[:8]]
        for c in changed[:4]:
            d = c["first_diff"]
            over = sorted({f"{f.source} transfer {f.seq}" for f in bad if c["phys"] <= f.phys < c["phys"] + PAGE_SIZE})
            ev.append(f"canary {c['index']} at phys 0x{c['phys']:x}: {c['changed_bytes']} bytes changed"
                      + (f", now holding records of {', '.join(over)}" if over else
                         f", first at +0x{d['offset']:x}: now {d['found_hex'][:48]}" if d else ""))
        where = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in rep["landed"].items()
                          if c != "old_memory_expected" and n)
        reason = f"DMA landed where it must not ({where or 'canary pages changed'})"
        return Outcome(Verdict.CORRUPTION, reason, ev + an.dropped_evidence)
    if an.dropped_while_active:
        return Outcome(Verdict.UNSAFE_HANDOVER, f"the crash kernel switched translation off at "
                       f"{an.dropped_t:.2f}s while {source.name} DMA was still arriving", an.dropped_evidence)
    if source.name != "none" and (rep["sent_after_panic"] == 0 or rep["landed_after_panic"] == 0):
        return Outcome(Verdict.INCONCLUSIVE, f"no {source.name} DMA crossed the crash (sent after the panic: "
                       f"{rep['sent_after_panic']}, landed after the panic: {rep['landed_after_panic']})",
                       [f"phases: {rep['per_phase']}"])
    if source.name != "none" and gt is not None and rep.get("crash_iommu_init_s") is not None \
            and not rep["per_moment"].get("crash_after_iommu_init", {}).get("sent"):
        full = rep["detail"].get("ring_full_s")
        return Outcome(Verdict.INCONCLUSIVE, f"no {source.name} DMA was in flight once the crash kernel's IOMMU "
                       f"driver had taken over" + (f" (the NIC's receive ring was full at {full:.1f}s)" if full else ""),
                       [f"moments: {rep['per_moment']}"])
    return None
