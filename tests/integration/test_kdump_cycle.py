"""Real kernels, real QEMU, real kdump: the walking skeleton end to end."""
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.deadline import Deadline
from harness.scenario import Scenario
from harness.verdict import Verdict

pytestmark = pytest.mark.boot


def qemu_pids_for(path: Path) -> list[int]:
    """QEMU processes whose command line mentions `path` (this test's own runs)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{re.escape(str(path))}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def assert_elf_vmcore(run):
    rep = run.report()
    assert rep["kdump"]["captured"] is True
    vmcore = Path(rep["kdump"]["vmcore"])
    assert vmcore.read_bytes()[:4] == b"\x7fELF"
    assert rep["kdump"]["format"] == "elf64"
    ram = run.scenario.memory_mb << 20
    crash_start, crash_end = rep["kdump"]["crash_kernel_range"]
    # the vmcore holds the old RAM minus the crash kernel's reservation, plus headers
    assert 0.6 * ram < vmcore.stat().st_size < ram
    assert crash_end - crash_start + 1 == 256 << 20


@pytest.mark.parametrize("iommu", ["intel", "amd"])
def test_default_crash_kernel_passes(kdump_run, iommu):
    run = kdump_run(Scenario(iommu=iommu))
    assert run.outcome.verdict == Verdict.PASS, run.outcome
    assert_elf_vmcore(run)
    rep = run.report()
    assert rep["iommu"]["crash_kernel_copied_tables"] is True
    assert rep["accel"] in ("kvm", "tcg")
    assert rep["kernel"]["release"].startswith("6.1.")
    for phase in ("boot", "arm", "panic", "crash", "capture", "total"):
        assert rep["timings_s"][phase] > 0
    assert (run.outdir / "console-crash.log").read_text().count("Linux version") == 1
    assert (run.outdir / "qemu-cmdline.txt").read_text().startswith("qemu-system-x86_64 ")


@pytest.mark.parametrize("armed_run", [Scenario(dump_format="kdump")], indirect=True)
def test_armed_fixture_then_sysrq_panic(armed_run):
    """The fixture hands over a kdump-armed guest; the test panics it with sysrq-c.
    The crash kernel saves the dump with makedumpfile this time."""
    assert armed_run.machine.alive()
    assert armed_run.state.facts["crash_kernel_range"] is not None
    armed_run.scenario = armed_run.scenario.replace(panic_method="sysrq")
    armed_run.panic()
    armed_run.follow_crash()
    armed_run.collect()
    outcome = armed_run.analyze()
    assert outcome.verdict == Verdict.PASS, outcome
    assert "sysrq: Trigger a crash" in armed_run.first_console
    rep = armed_run.report()
    assert rep["kdump"]["format"] == "kdump-compressed"
    assert armed_run.vmcore.name == "vmcore.kdump" and armed_run.vmcore.read_bytes()[:8] == b"KDUMP   "
    # every canary page made it through makedumpfile -d 1
    assert rep["dma"]["canaries"]["intact"] == 16


def test_amd_crash_kernel_without_iommu_hangs_within_its_deadline(kdump_run):
    run = kdump_run(Scenario(iommu="amd", crash_append=("amd_iommu=off",)))
    assert run.outcome.verdict == Verdict.KDUMP_HANG, run.outcome
    rep = run.report()
    assert rep["kdump"]["captured"] is False
    assert rep["iommu"]["crash_kernel_disabled"] is True
    # the crash kernel got as far as starting /init, then made no progress
    assert "Run /init as init process" in (run.outdir / "console-crash.log").read_text()
    assert "vmcore" not in {p.name for p in run.outdir.iterdir()}
    assert not qemu_pids_for(run.outdir)


def test_ctrl_c_reaps_qemu_and_keeps_partial_output(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = Deadline(300, "the run to boot the first kernel")
        seen = ""
        while "arm      ..." not in seen:
            line = proc.stderr.readline()
            assert line, f"the run ended early: {seen}"
            seen += line
            deadline.check()
        assert qemu_pids_for(out), "QEMU should be running now"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert f"partial output in {out}" in rest
    assert not qemu_pids_for(out)
    assert (out / "guest.console.log").stat().st_size > 0
    assert (out / "report.json").exists()


def test_missing_crash_dump_config_refused_before_boot(tmp_path):
    """A real Debian kernel image with a config lacking CONFIG_CRASH_DUMP: exit 2, no QEMU."""
    from harness.kernels import resolve_kernel
    k = resolve_kernel("debian-6.1")
    cfg = tmp_path / "config"
    cfg.write_text(k.config_path.read_text().replace("CONFIG_CRASH_DUMP=y", "# CONFIG_CRASH_DUMP is not set"))
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--kernel", str(k.image), "--config", str(cfg),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "CONFIG_CRASH_DUMP" in r.stderr and len(r.stderr.strip().splitlines()) == 1
