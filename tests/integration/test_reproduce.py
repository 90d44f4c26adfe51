"""Reproducing runs: --interactive hand-over, repro of a saved report, rerun.sh by hand."""
import json
import subprocess
import sys

import pexpect
import pytest

from harness.deadline import Deadline
from harness.run import KdumpRun
from harness.scenario import Scenario
from harness.verdict import Verdict

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def paused_run(request, tmp_path_factory):
    """A run paused after arming; a 'person' (this hook) types into the guest shell, then exits it."""
    typed = []

    def person(run, phase):
        con = run.machine.console
        con.expect_within([r"exit the shell to continue"], Deadline(30, "the pause banner"))
        con.sendline("echo kh-person-$((6 * 7)); cat /sys/kernel/kexec_crash_loaded")
        con.expect_within([r"kh-person-42\s+1"], Deadline(30, "the guest shell to answer"))
        typed.append(phase)
        con.sendline("exit")

    run = KdumpRun(Scenario(name="paused", iommu="intel"), tmp_path_factory.mktemp("paused") / "run",
                   accel=request.config.getoption("--kh-accel"), pause="armed", on_pause=person)
    run.execute()
    run.typed = typed
    yield run
    run.finish()


def test_interactive_pause_hands_over_the_console_then_continues(paused_run):
    assert paused_run.typed == ["armed"]
    assert paused_run.outcome.verdict == Verdict.PASS, paused_run.outcome
    log = (paused_run.outdir / "console-first.log").read_text()
    assert "kh-person-42" in log and "paused at armed" in log


def test_repro_of_a_saved_report_gives_the_same_verdict(paused_run, tmp_path):
    report = paused_run.outdir / "report.json"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "repro", str(report), "--out", str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repro: same verdict: PASS -> PASS" in r.stdout
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    first = json.loads(report.read_text())
    assert again["kernel"]["package"] == first["kernel"]["package"]
    assert again["kernel"]["version"] == first["kernel"]["version"]
    for key in ("iommu", "dma", "crash_append", "crash_base", "first_append", "memory_mb"):
        assert again["scenario"][key] == first["scenario"][key]


def test_rerun_sh_boots_the_same_machine_by_hand(paused_run):
    """Run rerun.sh as a person would: console on the terminal, panic from another shell."""
    d = paused_run.outdir
    script = d / "rerun.sh"
    assert script.exists() and script.stat().st_mode & 0o111
    child = pexpect.spawn("bash", [str(script)], cwd=str(d), encoding="utf-8", codec_errors="replace", timeout=300)
    try:
        child.expect(r"(python3 -c .*) (/tmp/kh-rerun-\w+/qmp) inject-nmi")
        one_liner = child.match.group(1).replace('\\"', '"')
        qmp_path = child.match.group(2)
        child.expect(r"kdump-harness: event ready")
        r = subprocess.run(["bash", "-c", f"{one_liner} {qmp_path} inject-nmi"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and '"return"' in r.stdout, r.stdout + r.stderr
        child.expect(r"kdump-harness: event captured rc=0")
        child.expect(pexpect.EOF)  # the crash kernel powers off, QEMU exits
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert (d / "dump-rerun.img").read_bytes()[:4] == b"\x7fELF"
    (d / "dump-rerun.img").unlink()
