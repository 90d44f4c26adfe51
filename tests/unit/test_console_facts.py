"""Console parsing against logs captured from real runs (tests/data)."""
from pathlib import Path

from harness.platforms import iommu_model
from harness.run import parse_iomem, split_console

DATA = Path(__file__).resolve().parent.parent / "data"


def crash_part(name: str) -> str:
    first, crash = split_console((DATA / name).read_text())
    assert first and crash, "the log holds two kernels"
    return crash


def test_split_at_the_second_banner():
    first, crash = split_console("[    0.000000] Linux version 6.1\nA\n[    0.000000] Linux version 6.1\nB\n")
    assert first.endswith("A\n") and crash.startswith("[    0.000000] Linux version") and crash.endswith("B\n")
    assert split_console("[    0.000000] Linux version 6.1\nonly one kernel\n")[1] == ""
    # the crash kernel's banner right after the first kernel's shell prompt
    first, crash = split_console("[    0.000000] Linux version 6.1\n/ # \x1b[6n[    0.000000] Linux version 6.1\nX\n")
    assert first.endswith("/ # \x1b[6n") and crash.startswith("[    0.000000] Linux version")


def test_intel_crash_kernel_copied_tables():
    crash = crash_part("console-intel-copied.log")
    intel = iommu_model("intel")
    assert intel.copied(crash) is True
    assert intel.disabled(crash) is False
    assert intel.faults(crash) == 0


def test_amd_crash_kernel_copied_tables():
    crash = crash_part("console-amd-copied.log")
    amd = iommu_model("amd")
    assert amd.copied(crash) is True and amd.disabled(crash) is False


def test_amd_iommu_off_is_seen_as_disabled_not_copied():
    crash = crash_part("console-amd-off-hang.log")
    amd = iommu_model("amd")
    assert amd.copied(crash) is None
    assert amd.disabled(crash) is True


def test_the_first_kernel_is_not_mistaken_for_the_crash_kernel():
    # the first kernel of the AMD log never says it copied anything
    first, _ = split_console((DATA / "console-amd-copied.log").read_text())
    assert iommu_model("amd").copied(first) is None


def test_intel_fault_lines_are_counted():
    text = ("[    5.1] DMAR: DRHD: handling fault status reg 2\n"
            "[    5.2] DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x22000000 [fault reason 0x05] PTE Write access is not set\n"
            "[    5.3] DMAR: [DMA Read NO_PASID] Request device [00:03.0] fault addr 0x1000 [fault reason 0x06] PTE Read access is not set\n")
    assert iommu_model("intel").faults(text) == 2


def test_parse_iomem():
    rows = parse_iomem(["00001000-0009fbff : System RAM", "  22000000-31ffffff : Crash kernel", "junk"])
    assert rows == [{"start": 0x1000, "end": 0x9FBFF, "name": "System RAM", "depth": 0},
                    {"start": 0x22000000, "end": 0x31FFFFFF, "name": "Crash kernel", "depth": 1}]
