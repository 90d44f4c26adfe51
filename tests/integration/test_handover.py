"""The other seed systems on x86: a plain kexec handover, and virtio-iommu."""
import pytest

from harness.scenario import Scenario
from harness.verdict import Verdict

pytestmark = pytest.mark.boot


def test_plain_kexec_with_dma_into_the_next_kernel_is_corruption(kdump_run):
    run = kdump_run(Scenario(iommu="none", dma="edu", handover="kexec"))
    assert run.outcome.verdict == Verdict.CORRUPTION, run.outcome
    rep = run.report()
    assert rep["kdump"]["handover"] == "kexec" and rep["kdump"]["captured"] is False
    dma = rep["dma"]
    assert dma["landed"]["new_kernel_memory"] > 0
    targets = {t["iova"] for t in dma["detail"]["targets"] if t["kind"] == "new-kernel"}
    bad = [f for f in dma["misdirected"] if f["where"] == "new_kernel_memory"]
    # the aimed writes sit in the next kernel's image, where they were aimed (no IOMMU: phys == IOVA)
    assert any(f["iova"] - f["iova"] % 4096 in targets and f["phys"] == f["iova"] for f in bad)
    assert all(f["t"] >= rep["marks_s"]["panic"] for f in bad)  # only what was sent after the kexec
    # the next kernel is a normal one (it may not live long: the DMA lands in its text)
    assert "kh.role=second" in (run.outdir / "console-crash.log").read_text()


def test_virtio_iommu_reset_lets_old_dma_through(kdump_run):
    run = kdump_run(Scenario(iommu="virtio", kernel="debian-6.12", dma="edu"))
    assert run.outcome.verdict == Verdict.CORRUPTION, run.outcome
    dma = run.report()["dma"]
    gt = dma["ground_truth"]
    assert gt["iommu_reset_s"] is not None and gt["iommu_reset_s"] > run.report()["marks_s"]["panic"]
    assert gt["devices"]["00:05.0"]["translations_after_panic"] > 0  # translated until the reset
    assert dma["translation_dropped_while_active"] is True
    assert dma["landed"]["old_memory_elsewhere"] + dma["landed"]["crash_kernel_region"] > 0
