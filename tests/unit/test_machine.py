import os
import signal
import time
from pathlib import Path

import pytest

from harness.deadline import Deadline
from harness.errors import HostError
from harness.machine import Drive, Machine, MachineSpec, Sockets, build_argv, qemu_escape


def spec(tmp_path, **kw) -> MachineSpec:
    base = dict(name="t", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", append=("console=ttyS0", "x=1"))
    base.update(kw)
    return MachineSpec(**base)


SOCKS = Sockets(Path("/s/qmp"), Path("/s/con"), Path("/s/res"), Path("/s/qt"))


def test_argv_is_a_list_built_per_concern(tmp_path):
    argv = build_argv(spec(tmp_path, iommu="intel", drives=(Drive("dump", tmp_path / "d,isk", "khdump"),)),
                      SOCKS, tmp_path / "trace")
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-machine") + 1] == "q35,kernel-irqchip=split"
    assert "intel-iommu,intremap=on" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 x=1"
    # a comma in a path is doubled, not split into a new option
    assert any(a.endswith(f"file={tmp_path}/d,,isk") for a in argv)
    assert "-no-reboot" in argv
    assert "-D" not in argv  # no trace events, no trace file


def test_argv_for_amd_and_none(tmp_path):
    amd = build_argv(spec(tmp_path, iommu="amd"), SOCKS, tmp_path / "t")
    assert "amd-iommu,intremap=on" in amd
    none = build_argv(spec(tmp_path, iommu="none"), SOCKS, tmp_path / "t")
    assert not any("iommu" in a for a in none)
    assert none[none.index("-machine") + 1] == "q35"


def test_ram_file_and_trace(tmp_path):
    argv = build_argv(spec(tmp_path, ram_file=tmp_path / "ram", trace_events=("vtd_dmar_fault",)), SOCKS, tmp_path / "tr")
    assert "memory-backend=ram0" in argv[argv.index("-machine") + 1]
    assert any(a.startswith("memory-backend-file,id=ram0,size=1024M") and "share=on" in a for a in argv)
    assert argv[argv.index("-trace") + 1] == "vtd_dmar_fault"
    assert argv[argv.index("-D") + 1] == str(tmp_path / "tr")


def test_escape():
    assert qemu_escape("a,b") == "a,,b"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_launch_connects_and_shutdown_reaps(tmp_path, fake_qemu):
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    with m:
        assert m.alive()
        m.console.expect_within(["fake console ready"], Deadline(10, "the fake console"))
        ev = m.events.wait_for(["boot"], Deadline(10, "boot event"))
        assert ev.fields == {"role": "first", "release": "6.1.0-fake"}
        assert m.qmp.cmd("query-status") == {}
        pid = m.proc.pid
    assert not pid_alive(pid)
    assert m.returncode == 0  # it obeyed QMP quit
    assert "fake console ready" in (tmp_path / "out/t.console.log").read_text()
    m.shutdown()  # idempotent


def test_failed_launch_says_why_and_cleans_up(tmp_path, fake_qemu, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "exit")
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out", connect_deadline=10)
    with pytest.raises(HostError) as e:
        m.launch()
    msg = str(e.value)
    assert "QEMU exited before connecting" in msg and "status 1" in msg
    assert "is not a valid device model name" in msg  # QEMU's own words
    assert fake_qemu in msg  # the argv
    assert not m.alive()
    assert m._scratch is None


def test_stubborn_qemu_is_killed(tmp_path, fake_qemu, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore")
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    m.launch()
    pid = m.proc.pid
    m.shutdown()
    assert not pid_alive(pid)
    assert m.returncode == -signal.SIGKILL


def test_keyboard_interrupt_inside_the_with_block_reaps(tmp_path, fake_qemu):
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with m:
            pid = m.proc.pid
            raise KeyboardInterrupt
    assert not pid_alive(pid)


def test_missing_qemu_binary(tmp_path):
    with pytest.raises(HostError, match="not found"):
        Machine(spec(tmp_path, qemu="/nonexistent/qemu"), tmp_path / "out").launch()


def test_a_qemu_that_aborts_is_told_apart_from_a_guest_that_exits(tmp_path, fake_qemu, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_MODE", "abort")
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    try:
        m.launch()
    except HostError:
        pass  # it may die before QMP answers; either way it is gone
    deadline = Deadline(10, "the fake QEMU to abort", scale=1)
    while m.proc.poll() is None:
        deadline.check()
        time.sleep(0.05)
    msg = m.failure()
    assert msg and "QEMU itself failed" in msg and "Assertion" in msg
    m.shutdown()


def test_an_abort_is_seen_even_when_the_sockets_close_first(tmp_path, fake_qemu, monkeypatch):
    """An aborting QEMU closes its sockets before it is gone: the console's EOF
    arrives first, and failure() must still name the assertion, not blame the guest."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "abort-late")
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    m.launch()
    deadline = Deadline(10, "the fake QEMU to print its assertion", scale=1)
    while "Assertion" not in m._output_tail():
        deadline.check()
        time.sleep(0.05)
    assert m.proc.poll() is None          # sockets gone, process not yet
    msg = m.failure()
    assert msg and "e1000e_intrmgr_on_throttling_timer" in msg and "status -6" in msg
    m.shutdown()


def test_a_clean_exit_is_no_qemu_failure(tmp_path, fake_qemu):
    m = Machine(spec(tmp_path, qemu=fake_qemu), tmp_path / "out")
    with m:
        assert m.failure(settle=0) is None  # still running
    assert m.returncode == 0 and m.failure() is None
