"""`--guest debian`: Debian's own kdump pipeline (kdump-tools, makedumpfile -d 31),
driven over SSH, with the e1000e feeding DMA across the panic.

Minutes per run under TCG (and a few more the first time, to build the image):
these are in the opt-in job (--run-slow). Building the image needs root."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from harness.distro import DistroRun
from harness.scenario import Scenario
from harness.verdict import Verdict

pytestmark = [pytest.mark.boot, pytest.mark.slow]


def _skip_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run ci/setup.sh)"
    for tool, pkg in (("debootstrap", "debootstrap"), ("debugfs", "e2fsprogs"), ("makedumpfile", "makedumpfile")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {pkg})"
    if os.geteuid() != 0:
        return "building the Debian guest image needs root (debootstrap, chroot)"
    return None


@pytest.fixture(scope="module")
def distro_run(request, tmp_path_factory):
    """The must-show run: kdump-harness run --guest debian --iommu intel --dma nic."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = request.config.getoption("--kh-out")
    outdir = (Path(base) if base else tmp_path_factory.mktemp("distro")) / "debian-intel-nic"
    if outdir.exists():
        shutil.rmtree(outdir)
    run = DistroRun(Scenario(iommu="intel", dma="nic"), outdir, accel=request.config.getoption("--kh-accel"))
    run.execute()
    yield run
    run.finish()
    if not request.config.getoption("--kh-keep-vmcores"):
        for p in outdir.glob("vmcore*"):
            p.unlink()


def test_the_distro_dump_is_read_and_scanned_on_the_host(distro_run):
    run = distro_run
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    rep = json.loads((run.outdir / "report.json").read_text())
    assert rep["verdict"] == "PASS" and rep["guest"]["name"] == "debian"
    k = rep["kdump"]
    # the dump kdump-tools wrote to /var/crash, read off the disk image
    assert k["captured"] and k["dump_in_guest"].startswith("/var/crash/2") and "/dump." in k["dump_in_guest"]
    assert k["format"] == "kdump-compressed" and k["tool"] == "kdump-tools"
    assert "kdump-tools-dump.service" in k["crash_cmdline"]
    # ... and scanned: markers sent after the panic were found in it
    dma = rep["dma"]
    assert dma["scans"]["vmcore"]["markers"] > 0
    assert dma["sent_after_panic"] > 0 and dma["landed_after_panic"] > 0
    assert dma["landed"]["old_memory_elsewhere"] == 0 and dma["landed"]["crash_kernel_region"] == 0
    assert rep["iommu"]["crash_kernel_copied_tables"] is True
    assert dma["ground_truth"]["devices"]["00:04.0"]["translations_after_panic"] > 0


def test_the_report_names_what_debians_filter_left_out(distro_run):
    rep = distro_run.report()
    k, f = rep["kdump"], rep["dump_filter"]
    assert k["dump_level"] == 31 and set(k["excluded_pages"]) == {"zero", "cache", "cache_private", "user", "free"}
    # the canaries are locked user pages: -d 31 drops them; the host's RAM view still has them
    n = rep["dma"]["canaries"]["count"]
    assert n >= 16 and len(f["canaries_not_in_dump"]) == n
    assert rep["dma"]["canaries"]["intact"] == n
    assert "dump filter (-d 31)" in rep["reason"] and "canary pages" in rep["reason"]
    assert any("free pages" in line for line in rep["evidence"])


def test_phase_seconds_are_reported(distro_run):
    ps = distro_run.report()["phase_seconds"]
    for key in ("boot_to_ssh", "boot_to_armed", "panic_to_dump_saved"):
        assert ps[key] is not None and ps[key] > 0
    marks = distro_run.state.marks
    assert marks["qemu_started"] < marks["ssh_up"] < marks["armed"] < marks["panic"] < marks["dump_saved"]


def test_a_guest_that_cannot_arm_kdump(tmp_path, request):
    """No crashkernel= reservation: kdump-tools cannot load the crash kernel."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    run = DistroRun(Scenario(iommu="intel", dma="none", canaries=0, crashkernel="0M"), tmp_path / "run",
                    accel=request.config.getoption("--kh-accel"))
    outcome = run.execute()
    assert outcome.verdict == Verdict.FIRST_BOOT_FAILED, outcome
    assert "kdump-tools did not arm kdump" in outcome.reason
    assert any(line.startswith("journal: ") for line in outcome.evidence)
    assert run.machine is not None and not run.machine.alive()


def test_ssh_with_the_wrong_key_is_a_harness_error(tmp_path, request, monkeypatch):
    """The guest boots, sshd answers, the key is refused: ERROR, not a kernel verdict."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import harness.distro as distro
    from harness.distro_image import DebianImage, build_image, generate_key

    real_build = build_image

    def wrong_key(*a, **kw):
        img = real_build(*a, **kw)
        fake = tmp_path / "image"
        fake.mkdir()
        for name in ("rootfs.img", "initrd.img", "ssh_host_ed25519_key.pub", "manifest.json"):
            (fake / name).symlink_to(img.dir / name)
        (fake / "id_ed25519").write_bytes(generate_key("not-the-image's")[0])
        return DebianImage.load(fake)

    monkeypatch.setattr(distro, "build_image", wrong_key)
    run = DistroRun(Scenario(iommu="intel", dma="none", canaries=0), tmp_path / "run",
                    accel=request.config.getoption("--kh-accel"))
    outcome = run.execute()
    assert outcome.verdict == Verdict.ERROR, outcome
    assert "SSH to the guest was refused" in outcome.reason and "Authentication" in outcome.reason
    assert outcome.evidence and outcome.evidence[0].startswith("console: ")
