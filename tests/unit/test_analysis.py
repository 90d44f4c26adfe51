"""Classification and verdicts on synthetic findings (the checker's hits are faked)."""
from harness.analysis import (DmaAnalysis, add_hits, classify, crash_region_ranges, dma_report,
                              dma_verdict)
from harness.checker import Hit
from harness.dma import EduSource, EduTarget, NicSource, Transfer
from harness.groundtruth import GroundTruth
from harness.markers import Source
from harness.verdict import Verdict

NONCE = 0x1234
CRASH = (0x2E000000, 0x3DFFFFFF)


def hit(phys, source, seq=0, slot=0, iova=0, t=20.0):
    return Hit(phys=phys, nonce=NONCE, version=1, source=source, slot=slot, seq=seq, iova=iova, t_ns=int(t * 1e9))


def edu_source():
    src = EduSource()
    src.iommu_present = True
    src.staging = 0x5000000
    src.targets = [EduTarget(iova=0x81D5000, kind="buffer", mapped=True, phys=0x81BB000, slot=3),
                   EduTarget(iova=0x2F000000, kind="crash-region", mapped=False, phys=None, slot=3)]
    src.transfers = [Transfer(0, 10.0, "before_panic", 0x81D5000, "buffer"),
                     Transfer(1, 20.0, "crash_userspace", 0x81D5000, "buffer"),
                     Transfer(2, 20.5, "crash_userspace", 0x2F000000, "crash-region")]
    return src


def analysis():
    return DmaAnalysis("edu", NONCE, panic_t=12.0, crash_range=CRASH)


def test_q35_layout():
    assert crash_region_ranges(1024, CRASH) == [(0x2E000000, 0x2E000000, 0x10000000)]


def test_edu_classes():
    an, src = analysis(), edu_source()
    assert classify(an, hit(0x81BB040, Source.EDU, 1, 1, 0x81D5040), "vmcore", src, None).where == "old_memory_expected"
    # translation dropped: the record lands at the physical address equal to its IOVA
    assert classify(an, hit(0x81D5040, Source.EDU, 1, 1, 0x81D5040), "vmcore", src, None).where == "old_memory_elsewhere"
    assert classify(an, hit(0x2F000000, Source.EDU, 2, 0, 0x2F000000), "host-ram", src, None).where == \
        "crash_kernel_region"
    assert classify(an, hit(0x5000040, Source.EDU, 1, 1, 0x81D5040), "vmcore", src, None) is None  # staging page
    assert classify(an, hit(0x7000000, Source.CANARY), "vmcore", src, None) is None


def test_nic_classes_follow_the_translations():
    an, src = analysis(), NicSource()
    gt = GroundTruth("intel")
    dev = gt.device("00:04.0")
    dev.on_at_panic = True
    dev.target_pages = {0x3C99000}
    assert classify(an, hit(0x3C9904E, Source.NIC), "vmcore", src, gt).where == "old_memory_expected"
    assert classify(an, hit(0x4C9904E, Source.NIC), "vmcore", src, gt).where == "old_memory_elsewhere"
    assert classify(an, hit(0x2F00004E, Source.NIC), "host-ram", src, gt).where == "crash_kernel_region"
    dev.on_at_panic = False  # passthrough: untranslated DMA has no wrong place in old memory
    assert classify(an, hit(0x4C9904E, Source.NIC), "vmcore", src, gt).where == "old_memory_expected"


def test_verdicts():
    src = edu_source()
    an = analysis()
    add_hits(an, [hit(0x81BB000 + 64 * i, Source.EDU, 1, i, 0x81D5000 + 64 * i) for i in range(63)], "vmcore", src, None)
    rep = dma_report(an, src, None)
    assert rep["sent"] == 3 and rep["sent_after_panic"] == 2 and rep["landed_after_panic"] == 63
    assert dma_verdict(an, src, rep) is None  # nothing stands against PASS

    bad = analysis()
    add_hits(bad, [hit(0x2F000000, Source.EDU, 2, 0, 0x2F000000)], "host-ram", src, None)
    rep = dma_report(bad, src, None)
    out = dma_verdict(bad, src, rep)
    assert out.verdict == Verdict.CORRUPTION and "crash kernel region" in out.reason
    assert "found at phys 0x2f000000" in out.evidence[0]

    dropped = analysis()
    add_hits(dropped, [hit(0x81BB000, Source.EDU, 1, 0, 0x81D5000)], "vmcore", src, None)
    dropped.dropped_while_active, dropped.dropped_t = True, 15.0
    out = dma_verdict(dropped, src, dma_report(dropped, src, None))
    assert out.verdict == Verdict.UNSAFE_HANDOVER

    nothing = analysis()
    out = dma_verdict(nothing, src, dma_report(nothing, src, None))
    assert out.verdict == Verdict.INCONCLUSIVE  # DMA was sent, none crossed the crash


def test_moments_on_the_crash_timeline():
    from harness.analysis import moment_of
    marks = {"panic": 10.0, "crash_kernel_start": 15.0, "crash_iommu_init": 17.0, "crash_userspace": 18.0}
    assert [moment_of(t, marks) for t in (5, 12, 16, 17.5)] == [
        "before_panic", "during_kexec", "crash_before_iommu_init", "crash_after_iommu_init"]
    no_init = {k: v for k, v in marks.items() if k != "crash_iommu_init"}
    assert moment_of(16, no_init) == "crash_unknown" and moment_of(19, no_init) == "crash_after_iommu_init"


def test_no_dma_after_the_crash_iommu_took_over_is_inconclusive():
    src = NicSource()
    src.transfers = [Transfer(i, 10.0 + i * 0.01, "before_panic") for i in range(5)] + \
                    [Transfer(100 + i, 13.0 + i * 0.01, "during_kexec") for i in range(5)]
    src.ring_full_t = 14.0
    an = DmaAnalysis("nic", NONCE, panic_t=12.0, crash_range=CRASH)
    add_hits(an, [hit(0x3C9904E, Source.NIC, seq=100, t=13.0)], "vmcore", src, None)
    marks = {"panic": 12.0, "crash_kernel_start": 15.0, "crash_iommu_init": 20.0, "crash_userspace": 21.0}
    gt = GroundTruth("intel")
    rep = dma_report(an, src, gt, marks)
    out = dma_verdict(an, src, rep, gt)
    assert out.verdict == Verdict.INCONCLUSIVE and "ring was full at 14.0s" in out.reason
    # DMA sent after the crash kernel's IOMMU took over: the run tested the handover
    src.transfers.append(Transfer(200, 22.0, "crash_userspace"))
    rep = dma_report(an, src, gt, marks)
    assert dma_verdict(an, src, rep, gt) is None
