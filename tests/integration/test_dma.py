"""DMA that outlives the panic, caught for real: NIC and edu sources, Intel and AMD."""
import json
import subprocess
import sys

import pytest

from harness import markers
from harness.run import KdumpRun
from harness.scenario import Scenario
from harness.verdict import Verdict

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def intel_edu_run(request, tmp_path_factory):
    """One Intel + edu run shared by the tests that read its vmcore."""
    run = KdumpRun(Scenario(iommu="intel", dma="edu"), tmp_path_factory.mktemp("intel-edu") / "run",
                   accel=request.config.getoption("--kh-accel"))
    run.execute()
    yield run
    run.finish()


def check_pass_and_crossed(run):
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    rep = run.report()["dma"]
    # DMA really crossed the crash: sent after the panic, and found after the panic
    assert rep["sent_after_panic"] > 0
    assert rep["landed_after_panic"] > 0
    assert rep["landed"]["old_memory_elsewhere"] == 0 and rep["landed"]["crash_kernel_region"] == 0
    assert rep["canaries"]["count"] >= 16 and rep["canaries"]["intact"] == rep["canaries"]["count"]
    assert rep["translation_dropped_while_active"] is False
    gt = rep["ground_truth"]
    dev = gt["devices"][rep["detail"]["bdf"]]
    assert dev["translations_after_panic"] > 0  # the IOMMU translated the device's DMA after the panic
    if run.scenario.dma == "edu":
        # the unmapped targets faulted instead of landing
        assert rep["faulted"] > 0 or dev["failed_after_panic"] > 0
        assert all(p["not_fired"] == 0 for p in rep["per_phase"].values())


@pytest.mark.parametrize("iommu, dma", [("intel", "nic"), ("amd", "nic"), ("amd", "edu")])
def test_default_crash_kernel_keeps_dma_where_it_belongs(kdump_run, iommu, dma):
    check_pass_and_crossed(kdump_run(Scenario(iommu=iommu, dma=dma)))


def test_intel_edu_default_crash_kernel(intel_edu_run):
    check_pass_and_crossed(intel_edu_run)


def scan_json(path):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "scan", str(path), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def marker_set(doc):
    return {(m["phys"], m["seq"], m["slot"], m["source"]) for m in doc["markers"]}


def test_scan_agrees_with_drgn_on_a_real_vmcore(intel_edu_run):
    import drgn

    vmcore = intel_edu_run.vmcore
    doc = scan_json(vmcore)
    found = [m for m in doc["markers"] if int(m["nonce"], 16) == intel_edu_run.nonce]
    assert len(found) >= 63 * 8 + 64 * 16  # eight edu transfers and sixteen canary pages
    prog = drgn.Program()
    prog.set_core_dump(str(vmcore))
    for m in found:
        raw = prog.read(m["phys"], markers.RECORD_SIZE, True)
        rec = markers.unpack(raw)
        assert rec is not None, f"drgn sees no record at 0x{m['phys']:x}"
        assert (rec.seq, rec.slot, rec.iova, rec.nonce) == (m["seq"], m["slot"], m["iova"], intel_edu_run.nonce)
        assert markers.Source(rec.source).name.lower() == m["source"]


def test_makedumpfile_compressed_scans_to_the_same_markers(intel_edu_run, tmp_path):
    compressed = tmp_path / "vmcore.kdump"
    # -d 1: zero pages only, so nothing a marker could be in is dropped
    subprocess.run(["makedumpfile", "-c", "-d", "1", str(intel_edu_run.vmcore), str(compressed)],
                   check=True, capture_output=True, timeout=600)
    elf, kdump = scan_json(intel_edu_run.vmcore), scan_json(compressed)
    assert kdump["format"].startswith("kdump") and elf["format"] == "elf"
    assert marker_set(kdump) == marker_set(elf)
    assert len(marker_set(elf)) > 1000


def test_intel_crash_kernel_without_translation_corrupts(kdump_run):
    run = kdump_run(Scenario(iommu="intel", dma="edu", crash_append=("intel_iommu=off",)))
    assert run.outcome.verdict == Verdict.CORRUPTION, run.outcome
    rep = run.report()["dma"]
    assert rep["translation_dropped_while_active"] is True
    bad = rep["misdirected"]
    assert bad
    targets = {t["iova"]: t for t in rep["detail"]["targets"]}
    for f in bad:
        # every misdirected record sits on the physical address equal to the IOVA it was aimed at
        assert f["phys"] == f["iova"], f
        assert f["iova"] - (f["iova"] % 4096) in targets
        assert f["where"] in ("old_memory_elsewhere", "crash_kernel_region")
    assert rep["landed"]["crash_kernel_region"] > 0  # the crash kernel's own memory was hit
    assert rep["canaries"]["changed"]                # and old memory: canary pages were overwritten
    check_report_page_shows_red(run.outdir)


def check_report_page_shows_red(run_dir):
    """The run's own report.html, drawn by headless Chromium: misdirected markers are on the map.
    The screenshot is kept in the test artifacts."""
    import shutil
    from tests.unit import test_report_render as render
    html = run_dir / "report.html"
    assert "CORRUPTION" in html.read_text()
    if render.CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian package: chromium)")
    isolated = run_dir / "map-only.html"
    isolated.write_text(html.read_text().replace("</head>", render.ISOLATE_MAP, 1))
    render.screenshot(html, run_dir / "page.png")
    render.screenshot(isolated, run_dir / "map.png")
    shutil.copy(run_dir / "page.png", render.artifacts_dir() / "live-corruption-report.png")
    page, map_only = render.pixels(run_dir / "page.png"), render.pixels(run_dir / "map.png")
    top, bottom, left, right = render.map_box(map_only)
    assert render.reddish(page[top:bottom, left:right]).sum() >= 40, "no misdirected (red) marks on the map"


def test_no_dma_no_false_alarm(kdump_run):
    """The positive control's scenario with the DMA source off: no markers anywhere."""
    run = kdump_run(Scenario(iommu="intel", dma="none", crash_append=("intel_iommu=off",)))
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    rep = run.report()["dma"]
    assert sum(rep["landed"].values()) == 0 and rep["misdirected"] == []
    assert rep["scans"]["crash_region"]["markers"] == 0
    # the only records with this run's nonce in the vmcore are the canary pages (64 records each)
    assert rep["scans"]["vmcore"]["markers"] == 64 * rep["canaries"]["count"]
    assert rep["canaries"]["intact"] == rep["canaries"]["count"] == 16
