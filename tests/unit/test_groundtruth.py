"""QEMU trace parsing, on an excerpt of a real run: Intel, edu, crash kernel with intel_iommu=off."""
from pathlib import Path

from harness.groundtruth import parse_trace

DATA = Path(__file__).resolve().parent.parent / "data"
TRACE = DATA / "trace-intel-edu-off.log"
FIRST_LINE_T = 1795317761.119849
WALL0 = FIRST_LINE_T - 1.352  # QEMU started 1.352 s into that run
PANIC = 12.601


def test_translation_switched_off_after_the_panic_is_found():
    gt = parse_trace(TRACE, "intel", WALL0, PANIC)
    assert gt.translation_off_t is not None and PANIC < gt.translation_off_t < PANIC + 15
    edu = gt.devices["00:05.0"]
    assert edu.on_at_panic is True           # it was behind translation when the panic came
    assert edu.switched_off_t is not None and edu.switched_off_t >= gt.translation_off_t
    assert gt.dropped_t("00:05.0") == gt.translation_off_t
    assert any("translation switched off" in e for e in gt.evidence)


def test_translations_and_faults_are_counted_per_device():
    gt = parse_trace(TRACE, "intel", WALL0, PANIC)
    edu = gt.devices["00:05.0"]
    assert edu.translations == 18 and edu.translations_after_panic == 12
    assert 0x81C5000 in edu.target_pages      # the staging page, identity-mapped
    assert edu.iova_to_page[0x81E7000] == 0x81C7000
    # the excerpt keeps the first 12 faults: the unmapped crash-region target, shot before the panic
    assert gt.faults == 12 and gt.faults_after_panic == 0
    assert not gt.fault_addrs_after_panic
    late = parse_trace(TRACE, "intel", WALL0, 0.0)  # as if the panic came first
    assert late.faults_after_panic == 12 and 0x2F000000 in late.fault_addrs_after_panic


def test_nothing_is_after_a_panic_that_never_happened():
    gt = parse_trace(TRACE, "intel", WALL0, None)
    assert gt.translation_off_t is None and gt.faults_after_panic == 0


def test_amd_lines(tmp_path):
    t = tmp_path / "trace.log"
    t.write_text(
        "1@100.000000:amdvi_translation_result devid: 00:04.0 gpa 0xffc9d000 hpa 0x3c99000\n"
        "1@102.000000:amdvi_translation_result devid: 00:04.0 gpa 0xffc9e000 hpa 0x3c9a000\n"
        "1@103.000000:amdvi_translation_result devid: 00:05.0 gpa 0x100000 hpa 0x0\n"
        "1@104.000000:amdvi_page_fault error: page fault accessing guest physical address 0x2f000000\n"
        "1@105.000000:amdvi_control_status MMIO_STATUS state 0x0\n"
        "garbage line\n")
    gt = parse_trace(t, "amd", wall0=99.0, panic_s=2.0)
    nic = gt.devices["00:04.0"]
    assert nic.translations == 2 and nic.translations_after_panic == 1
    assert nic.target_pages == {0x3C99000, 0x3C9A000}
    assert gt.devices["00:05.0"].failed_after_panic == 1  # zero PTE: dropped silently
    assert gt.faults_after_panic == 1
    assert gt.translation_off_t == 6.0  # enable bit cleared


def test_missing_trace_file(tmp_path):
    gt = parse_trace(tmp_path / "nope", "intel", 0, 1)
    assert gt.lines == 0 and gt.devices == {}
