"""SMMUv3 ground truth from QEMU 7.2 trace lines (excerpts of real arm64 kdump runs)."""
from pathlib import Path

from harness.smmu_trace import SmmuFacts, parse_smmuv3_trace, sid_bdf, smmuv3_line
from harness.groundtruth import GroundTruth

DATA = Path(__file__).resolve().parent.parent / "data" / "trace-smmuv3-kdump.log"
WALL0 = 1795323880.0
PANIC = 30.0  # the trace's first kernel ends here; the crash kernel resets the SMMU at 52.594


def test_sid_is_a_requester_id():
    assert sid_bdf(0x28) == "00:05.0" and sid_bdf(0x20) == "00:04.0" and sid_bdf(0x10A) == "01:01.2"


def test_translations_faults_and_bypass_per_device():
    gt, facts = parse_smmuv3_trace(DATA, WALL0, PANIC)
    edu, nic = gt.devices["00:05.0"], gt.devices["00:04.0"]
    # after the panic and before the crash kernel's reset the old stream table still translates
    assert edu.translations == 3 and edu.translations_after_panic == 1 and edu.on_at_panic is True
    assert edu.iova_to_page[0x41E73000] == 0x45D4C000      # IOVA != physical: a real translation
    assert nic.translations == 2 and nic.translations_after_panic == 1 and nic.on_at_panic is True
    # before the panic 2 F_TRANSLATION events; after it 1 more, 2 STE aborts, 1 guest_errors line
    assert gt.faults == 6 and gt.faults_after_panic == 4
    assert 0x6BC03000 in gt.fault_addrs_after_panic and 0xFFFC1000 in gt.fault_addrs_after_panic
    assert facts.aborted == {"00:05.0": 2} and facts.guest_error_faults == 1
    # the NIC's DMA went through untranslated while SMMUEN was clear (QEMU 7.2 ignores GBPA)
    assert facts.passed_untranslated == {"00:04.0": 2}
    assert abs(nic.switched_off_t - 52.595) < 0.001
    assert gt.dropped_t("00:04.0") == nic.switched_off_t and gt.dropped_t("00:05.0") is None
    assert 0xFFFCC000 in nic.target_pages                   # where untranslated DMA went: phys == IOVA
    assert gt.lines == 25   # trace lines; the guest_errors line is counted in facts


def test_the_smmu_story():
    gt, facts = parse_smmuv3_trace(DATA, WALL0, PANIC)
    assert [v for _, v in facts.cr0_writes] == [0, 8, 0xC, 0xD, 0, 8, 0xC, 9, 0]
    assert [round(a, 3) for a in facts.disabled_windows[0]] == [52.594, 52.600]
    assert facts.disabled_windows[1][1] is None  # the last one: shut down at power-off
    assert [hex(b) for _, b in facts.strtab_bases] == ["0x4acd4000", "0x6dea7000"]
    story = facts.crash_kernel_story(PANIC)
    assert story[0].endswith("GBPA <- 0x80100000 (abort while disabled; QEMU 7.2 ignores GBPA)")
    assert any("STRTAB_BASE <- 0x6dea7000" in s for s in story)
    assert any(s.endswith("CR0 <- 0x9 (SMMUEN|CMDQEN)") for s in story)   # no event queue in kdump
    assert not any("0x4acd4000" in s for s in story)                       # the first kernel's is not
    times = [float(s.split("s ", 1)[0]) for s in story]
    assert times == sorted(times)
    assert any("SMMUEN cleared" in e for e in gt.evidence) and any("GBPA abort" in e for e in gt.evidence)


def test_without_a_panic_time_nothing_is_after_it():
    gt, facts = parse_smmuv3_trace(DATA, WALL0, None)
    assert gt.faults_after_panic == 0 and facts.passed_untranslated == {} and gt.faults == 6


def test_one_line_at_a_time_and_unknown_lines():
    gt, facts = GroundTruth("smmuv3"), SmmuFacts()
    assert smmuv3_line(gt, facts, 1.0, "smmuv3_translate_success",
                       "smmuv3-iommu-memory-region-40-4 sid=0x28 iova=0x1000 translated=0x2000 perm=0x3", "l", True)
    assert gt.devices["00:05.0"].translations_after_panic == 1
    assert not smmuv3_line(gt, facts, 1.0, "vtd_dmar_translate", "dev 00:03.0 iova 0x0 -> gpa 0x0 mask 0xfff", "l", True)
    assert not smmuv3_line(gt, facts, 1.0, "smmuv3_translate_success", "garbled", "l", True)


def test_missing_file_is_empty(tmp_path):
    gt, facts = parse_smmuv3_trace(tmp_path / "none.log", WALL0, PANIC)
    assert gt.lines == 0 and facts.cr0_writes == []
