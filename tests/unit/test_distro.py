"""`--guest debian` pieces that need no QEMU: SSH waiting, guest output parsing,
the dump read off an ext4 image, the dump filter and its place in the verdict."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import distro
from harness.deadline import Deadline
from harness.distro import (CommandResult, DistroRun, NoDump, SshError, crash_append_for, extract_dump,
                            filter_summary, kdump_ready, kexec_cmdline, old_memory_ranges, parse_debugfs_ls,
                            parse_fields, pick_dump, wait_for_ssh)
from harness.dumpfile import excluded_classes, is_flattened, kdump_header
from harness.errors import DeadlineExceeded, HostError, MachineExited
from harness.machine import Drive, MachineSpec, Sockets, UserNet, build_argv
from harness.markers import Source
from harness.run import Stop
from harness.scenario import Scenario
from harness.verdict import Verdict
from tests.unit.test_checker_dumps import PAGE, flatten, kdump_compressed


# -- waiting for SSH --------------------------------------------------------------------

class Refused(Exception):
    pass


def flaky(fail_times: int, exc: Exception = OSError("Connection reset by peer")):
    calls = []

    def connect(timeout):
        calls.append(timeout)
        if len(calls) <= fail_times:
            raise exc
        return "client"
    return connect, calls


def test_ssh_is_retried_until_it_answers():
    connect, calls = flaky(3, EOFError("Error reading SSH protocol banner"))
    waits = []
    client, attempts = wait_for_ssh(connect, Deadline(60, "sshd"), alive=lambda: True, wake=waits.append)
    assert (client, attempts) == ("client", 4)
    assert len(waits) == 3 and waits == sorted(waits) and waits[0] == 1.0  # growing pauses
    assert all(0 < t <= 15 for t in calls)


def test_ssh_deadline_names_the_last_error():
    connect, _ = flaky(10 ** 6, OSError("Connection refused"))
    with pytest.raises(DeadlineExceeded, match=r"waiting for sshd.*Connection refused"):
        wait_for_ssh(connect, Deadline(0.3, "sshd", scale=1), alive=lambda: True, wake=lambda s: None)


def test_a_refused_key_ends_the_wait_at_once():
    connect, calls = flaky(10, Refused("Authentication failed."))
    with pytest.raises(SshError, match="refused: Refused: Authentication failed"):
        wait_for_ssh(connect, Deadline(60, "sshd"), alive=lambda: True, wake=lambda s: None, fatal=(Refused,))
    assert len(calls) == 1


def test_qemu_exiting_ends_the_wait():
    connect, _ = flaky(10)
    state = iter([True, False])
    with pytest.raises(MachineExited):
        wait_for_ssh(connect, Deadline(60, "sshd"), alive=lambda: next(state), wake=lambda s: None)


# -- what the guest says ----------------------------------------------------------------------

STATUS_READY = """\
DUMP_MODE:        kdump
USE_KDUMP:        1
KDUMP_COREDIR:    /var/crash
crashkernel addr: 0x26000000
   /var/lib/kdump/vmlinuz: symbolic link to /boot/vmlinuz-6.1.0-56-amd64
kdump initrd:
   /var/lib/kdump/initrd.img: symbolic link to /var/lib/kdump/initrd.img-6.1.0-56-amd64
current state:    ready to kdump

kexec command:
  /sbin/kexec -p --command-line="root=LABEL=khroot ro console=ttyS0,115200 reset_devices nr_cpus=1 irqpoll" \
--initrd=/var/lib/kdump/initrd.img /var/lib/kdump/vmlinuz
"""


def test_kdump_config_output():
    assert kdump_ready(STATUS_READY)
    assert kdump_ready("current state   : ready to kdump\n")
    assert not kdump_ready("current state   : Not ready to kdump\n")
    assert not kdump_ready("")
    assert kexec_cmdline(STATUS_READY) == "root=LABEL=khroot ro console=ttyS0,115200 reset_devices nr_cpus=1 irqpoll"
    assert kexec_cmdline("no kexec here") is None


def test_saved_and_failed_lines_match_whole_lines_only():
    import re
    line = "[   43.37] kdump-tools[352]: kdump-tools: saved vmcore in /var/crash/202611220426.\r\n"
    assert re.search(distro.SAVED_RE, line).group(1) == "/var/crash/202611220426"
    # pexpect matches what has arrived so far: half a line must not match
    for cut in (40, 60, 70, len(line) - 3):
        assert re.search(distro.SAVED_RE, line[:cut]) is None, line[:cut]
    failed = "kdump-tools: failed to save vmcore in /var/crash/202611220426.\r\n"
    assert re.search(distro.SAVE_FAILED_RE, failed).group(1) == "/var/crash/202611220426"
    assert re.search(distro.SAVE_FAILED_RE, "makedumpfile failed, falling back to 'cp'\r\n") is None


def test_parse_fields_takes_the_key_value_line():
    assert parse_fields("Cannot change ring\nrc=0 dev=enp0s4 rx=4096 driver=e1000e\n") == \
        {"rc": "0", "dev": "enp0s4", "rx": "4096", "driver": "e1000e"}
    assert parse_fields("no fields here") == {}


def test_crash_append_for_scenarios():
    assert crash_append_for(Scenario()) is None  # the image's own KDUMP_CMDLINE_APPEND
    a = crash_append_for(Scenario(crash_append=("intel_iommu=off",)))
    assert a.endswith("modprobe.blacklist=e1000e intel_iommu=off") and "systemd.unit=kdump-tools-dump" in a
    takeover = crash_append_for(Scenario(crash_load_driver=True))
    assert "blacklist" not in takeover and "reset_devices" in takeover


def test_debugfs_listing_and_the_dump_kdump_tools_leaves():
    listing = ("/2/040755/0/0/.//\n/2/040755/0/0/..//\n"
               "/131073/040755/0/0/202611220411//\n/12/100644/0/0/kexec_cmd/93/\n")
    assert parse_debugfs_ls(listing) == [("202611220411", True), ("kexec_cmd", False)]
    entries = [("dmesg.202611220411", False), ("dump.202611220411", False)]
    assert pick_dump(entries) == "dump.202611220411"
    assert pick_dump([("vmcore.202611220411", False), ("dmesg.1", False)]) == "vmcore.202611220411"
    # makedumpfile's dump wins over the cp fallback's leftovers
    assert pick_dump([("vmcore.1", False), ("dump.1", False)]) == "dump.1"
    assert pick_dump([("dmesg.1", False), ("dump.x", True)]) is None


# -- the dump header --------------------------------------------------------------------------

def kdump_file(tmp_path, level: int | None = None) -> Path:
    data = bytearray(kdump_compressed({0: bytes(PAGE), 2: b"\x55" * PAGE}, 8))
    if level is not None:  # struct kdump_sub_header: phys_base, then dump_level
        struct.pack_into("<i", data, PAGE + 8, level)
    p = tmp_path / "vmcore.kdump"
    p.write_bytes(bytes(data))
    return p


def test_kdump_header_reads_the_dump_level(tmp_path):
    # the test writer (held to makedumpfile and libkdumpfile elsewhere) writes level 1
    assert kdump_header(kdump_file(tmp_path)) == {"header_version": 6, "block_size": PAGE, "dump_level": 1,
                                                  "excluded": ["zero"]}
    h = kdump_header(kdump_file(tmp_path, 31))
    assert h["dump_level"] == 31 and h["excluded"] == ["zero", "cache", "cache_private", "user", "free"]


def test_kdump_header_refuses_other_files(tmp_path):
    p = tmp_path / "elf"
    p.write_bytes(b"\x7fELF" + bytes(600))
    with pytest.raises(HostError, match="not a kdump-compressed dump"):
        kdump_header(p)
    with pytest.raises(HostError, match="implausible dump level"):
        kdump_header(kdump_file(tmp_path, 99))


def test_excluded_classes():
    assert excluded_classes(0) == []
    assert excluded_classes(1) == ["zero"]
    assert excluded_classes(24) == ["user", "free"]


# -- old memory and the filter ----------------------------------------------------------------

def test_old_memory_ranges_leave_out_the_reservation():
    ram = [(0, 0, 1 << 30)]
    assert old_memory_ranges(ram, None) == ram
    crash = [0x2600_0000, 0x35FF_FFFF]
    assert old_memory_ranges(ram, crash) == [(0, 0, 0x2600_0000), (0x3600_0000, 0x3600_0000, (1 << 30) - 0x3600_0000)]
    # a reservation in the second (above 4 GiB) range keeps file offsets straight
    big = [(0, 0, 0x8000_0000), (0x8000_0000, 1 << 32, 0x4000_0000)]
    out = old_memory_ranges(big, [(1 << 32) + 0x1000_0000, (1 << 32) + 0x1FFF_FFFF])
    assert out == [(0, 0, 0x8000_0000), (0x8000_0000, 1 << 32, 0x1000_0000),
                   (0xA000_0000, (1 << 32) + 0x2000_0000, 0x2000_0000)]


def hit(seq: int, phys: int):
    return SimpleNamespace(seq=seq, phys=phys, source=Source.NIC)


def rep(misdirected=(), canaries=16) -> dict:
    return {"misdirected": list(misdirected), "canaries": {"count": canaries}}


def test_filter_summary_counts_what_only_ram_holds():
    hidden = {"hits": [hit(1, 0x1000), hit(1, 0x1040), hit(7, 0x9000)], "ram_records": 100, "dump_records": 97,
              "canaries_not_in_dump": list(range(16)), "canaries_in_ram": {i: "intact" for i in range(16)}}
    s = filter_summary({"dump_level": 31, "excluded": excluded_classes(31)}, hidden, rep(), "nic")
    assert s["records_only_in_ram"] == 3 and s["transfers_only_in_ram"] == 2
    assert "free pages" in s["lines"][0] and "user process pages" in s["lines"][0]
    assert "3 records of 2 transfers only in RAM" in s["lines"][1]
    assert "16 of 16 (user pages)" in s["lines"][2] and "16 intact, 0 changed" in s["lines"][2]
    assert "receive buffers the stack had freed" in s["lines"][3]
    assert s["verdict_note"].startswith("the distro's dump filter (-d 31) left out 3 DMA marker records "
                                        "(2 transfers) and 16 canary pages")


def test_filter_summary_names_hidden_corruption():
    hidden = {"hits": [hit(3, 0x5000)], "ram_records": 1, "dump_records": 0, "canaries_not_in_dump": [2],
              "canaries_in_ram": {2: "changed"}}
    mis = [{"view": "host-ram, not in the dump", "phys": 0x5000}]
    s = filter_summary({"dump_level": 31, "excluded": excluded_classes(31)}, hidden, rep(mis), "nic")
    assert s["misdirected_only_in_ram"] == 1
    assert "only the host's RAM view shows 1 misdirected records and 1 changed canaries" in s["verdict_note"]


def test_filter_summary_without_filtering():
    none_hidden = {"hits": [], "ram_records": 5, "dump_records": 5, "canaries_not_in_dump": [], "canaries_in_ram": {}}
    s = filter_summary({"dump_level": 0, "excluded": []}, none_hidden, rep(canaries=0), "nic")
    assert s["verdict_note"] is None and s["could_hide"] == []
    s = filter_summary({"dump_level": 16, "excluded": ["free"]}, none_hidden, rep(canaries=0), "none")
    assert s["verdict_note"] == "the dump's filter (-d 16) could hide DMA into free pages"
    assert filter_summary(None, none_hidden, rep(), "nic")["lines"][0].startswith("dump filter: unknown")


# -- the dump off an ext4 image, no mount -------------------------------------------------------

needs_e2fs = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
                                reason="e2fsprogs is not installed (apt-get install e2fsprogs)")


def ext4_image(tmp_path, files: dict[str, bytes]) -> Path:
    tree = tmp_path / "tree"
    (tree / "var" / "crash").mkdir(parents=True)
    for name, data in files.items():
        p = tree / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    img = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "32M"], check=True)
    return img


@needs_e2fs
def test_extract_dump_reads_a_flattened_dump_off_the_image(tmp_path):
    if not shutil.which("makedumpfile"):
        pytest.skip("makedumpfile is not installed (apt-get install makedumpfile)")
    kd = kdump_compressed({0: b"\x11" * PAGE, 5: b"\x22" * PAGE}, 8)
    img = ext4_image(tmp_path, {"var/crash/202611220411/dump.202611220411": flatten(kd),
                                "var/crash/202611220411/dmesg.202611220411": b"[0.0] Linux version 6.1\n",
                                "var/crash/kexec_cmd": b"kexec -p\n"})
    out = tmp_path / "out"
    out.mkdir()
    found = extract_dump(img, out, "/var/crash/202611220411", Deadline(120, "debugfs"))
    assert found.vmcore == out / "vmcore.kdump" and found.vmcore.read_bytes() == kd
    assert found.facts["dump_in_guest"] == "/var/crash/202611220411/dump.202611220411"
    assert found.facts["dump_flattened"] is True
    assert (out / "dmesg-panicked.txt").read_text().startswith("[0.0] Linux version")
    assert not list(out.glob("guest-*"))  # the flattened intermediate is gone


@needs_e2fs
def test_extract_dump_takes_the_newest_stamp_and_the_cp_fallback(tmp_path):
    img = ext4_image(tmp_path, {"var/crash/202601010000/dump.202601010000": b"KDUMP   old",
                                "var/crash/202611220411/vmcore.202611220411": b"\x7fELF\x02rest"})
    found = extract_dump(img, tmp_path, None, Deadline(120, "debugfs"))
    assert found.vmcore == tmp_path / "vmcore" and found.vmcore.read_bytes() == b"\x7fELF\x02rest"


@needs_e2fs
@pytest.mark.parametrize("files, saved, message", [
    ({}, None, "no dump directory in /var/crash"),
    ({"var/crash/202611220411/dmesg.202611220411": b"x"}, None, "has no dump file"),
    ({"var/crash/202601010000/dump.202601010000": b"x"}, "/var/crash/202611220411", "is not on the disk"),
])
def test_extract_dump_without_a_dump(tmp_path, files, saved, message):
    img = ext4_image(tmp_path, files)
    with pytest.raises(NoDump, match=message):
        extract_dump(img, tmp_path, saved, Deadline(120, "debugfs"))


def test_is_flattened(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(flatten(b"abc"))
    assert is_flattened(p)
    p.write_bytes(b"KDUMP   ")
    assert not is_flattened(p)


# -- the QEMU command line ------------------------------------------------------------------------

def test_argv_root_disk_behind_the_iommu_and_ssh_forward(tmp_path):
    socks = Sockets(Path("/s/q"), Path("/s/c"), Path("/s/r"), Path("/s/t"))
    spec = MachineSpec(name="guest", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", append=("ro",),
                       iommu="intel", drives=(Drive("root", tmp_path / "rootfs.img", "khroot", iommu_platform=True),),
                       results_port=False, user_net=UserNet(host_port=40022))
    argv = build_argv(spec, socks, tmp_path / "trace")
    assert "virtio-blk-pci,drive=root,serial=khroot,iommu_platform=on,disable-legacy=on" in argv
    assert "user,id=mgmt0,hostfwd=tcp:127.0.0.1:40022-:22" in argv
    assert any(a.startswith("virtio-net-pci,netdev=mgmt0,mac=52:54:00:6b:68:01") for a in argv)
    assert "virtserialport" not in " ".join(argv)
    nvme = build_argv(spec.__class__(**{**spec.__dict__, "drives": (
        Drive("root", tmp_path / "r.img", "khroot", interface="nvme"),)}), socks, tmp_path / "t")
    assert "nvme,drive=root,serial=khroot" in nvme
    with pytest.raises(ValueError, match="unknown drive interface"):
        build_argv(spec.__class__(**{**spec.__dict__, "drives": (
            Drive("root", tmp_path / "r.img", "x", interface="ide"),)}), socks, tmp_path / "t")


def test_free_port_is_bindable():
    import socket
    port = distro.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# -- verdicts on the way, with fakes ------------------------------------------------------------

class FakeShell:
    """Answers commands by their first word; records them."""

    def __init__(self, answers: dict[str, tuple[int, str]]):
        self.answers = answers
        self.commands: list[str] = []

    def run(self, command, deadline, *, sudo=False):
        self.commands.append(command)
        for prefix, (rc, out) in self.answers.items():
            if command.strip().startswith(prefix):
                return CommandResult(command, rc, out)
        return CommandResult(command, 0, "")

    def close(self):
        pass


def fake_run(tmp_path, scenario=None) -> DistroRun:
    run = DistroRun(scenario or Scenario(dma="nic"), tmp_path / "run")
    run.machine = None  # console tail and QEMU checks see no machine
    return run


def test_a_guest_that_never_arms_kdump(tmp_path):
    run = fake_run(tmp_path)
    run.shell = FakeShell({
        "systemctl start": (1, "Job for kdump-tools.service failed."),
        "kdump-config status": (0, "current state   : Not ready to kdump\n"),
        "journalctl": (0, "kdump-tools[312]: Cannot load the crash kernel: no crashkernel= reservation\n"),
    })
    with pytest.raises(Stop) as e:
        run.wait_armed()
    o = e.value.outcome
    assert o.verdict == Verdict.FIRST_BOOT_FAILED
    assert "kdump-tools did not arm kdump" in o.reason and "Not ready to kdump" in o.reason and "status 1" in o.reason
    assert any("no crashkernel= reservation" in line for line in o.evidence)


def test_an_armed_guest_records_its_crash_command_line(tmp_path):
    run = fake_run(tmp_path, Scenario(dma="nic", crash_append=("intel_iommu=off",)))
    run.shell = FakeShell({"kdump-config status": (0, STATUS_READY), "kdump-config show": (0, STATUS_READY),
                           "cat /proc/iomem": (0, "00000000-00000fff : Reserved\n"
                                                   "  26000000-35ffffff : Crash kernel\n")})
    run.wait_armed()
    f = run.state.facts
    assert f["crash_kernel_range"] == [0x26000000, 0x35FFFFFF]
    assert f["crash_cmdline"].endswith("irqpoll")
    rearm = [c for c in run.shell.commands if "KDUMP_CMDLINE_APPEND" in c]
    assert len(rearm) == 1 and "intel_iommu=off" in rearm[0] and "kdump-config load" in rearm[0]


class FakeConsole:
    def __init__(self, exc):
        self.exc = exc

    def expect_within(self, patterns, deadline):
        raise self.exc


def crash_run(tmp_path, exc, console_text: str, qemu_rc=None, qemu_out="") -> DistroRun:
    run = fake_run(tmp_path)
    out = tmp_path / "m"
    out.mkdir()
    (out / "console.log").write_text(console_text)
    (out / "qemu.log").write_text(qemu_out)
    # a real Machine's failure() judges the fake process's status and output
    from harness.machine import Machine
    machine = SimpleNamespace(console=FakeConsole(exc), console_log=out / "console.log",
                              proc=SimpleNamespace(poll=lambda: qemu_rc, wait=lambda timeout=None: qemu_rc),
                              _output_tail=lambda n=1000: qemu_out)
    machine.failure = lambda: Machine.failure(machine)
    run.machine = machine
    return run


FIRST = "[    0.000000] Linux version 6.1.0 first\nlogin: \n"
CRASH = "[    0.000000] Linux version 6.1.0 crash\n[    3.8] Run /init as init process\n"


def test_console_tail_drops_systemd_colours(tmp_path):
    text = FIRST + "\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell server.\r\n"
    run = crash_run(tmp_path, None, text)
    assert run._console_tail(1) == ["console:   OK  ] Started ssh.service - OpenBSD Secure Shell server."]


def test_no_dump_by_the_deadline_is_a_hang(tmp_path):
    run = crash_run(tmp_path, DeadlineExceeded("kdump-tools to save the dump", 420), FIRST + CRASH, qemu_rc=None)
    with pytest.raises(Stop) as e:
        run._crash_expect([distro.SAVED_RE], Deadline(1, "kdump-tools to save the dump"))
    assert e.value.outcome.verdict == Verdict.KDUMP_HANG
    assert "no dump" in e.value.outcome.reason
    assert e.value.outcome.evidence[-1].startswith("console: ") and "Run /init" in e.value.outcome.evidence[-1]


def test_a_crash_kernel_that_panics_before_the_dump(tmp_path):
    text = FIRST + CRASH + "[   20.1] Kernel panic - not syncing: Out of memory\n"
    run = crash_run(tmp_path, MachineExited("x", 0), text, qemu_rc=0)
    with pytest.raises(Stop) as e:
        run._crash_expect([distro.SAVED_RE], Deadline(1, "kdump-tools to save the dump"))
    assert e.value.outcome.verdict == Verdict.KDUMP_PANIC
    assert e.value.outcome.reason.startswith("the crash kernel panicked before kdump-tools to save the dump")


def test_qemu_dying_is_not_blamed_on_the_kernel(tmp_path):
    qemu_out = ("qemu-system-x86_64: ../../hw/net/e1000e_core.c:143: e1000e_intrmgr_on_throttling_timer: "
                "Assertion `!msix_enabled(timer->core->owner)' failed.\n")
    run = crash_run(tmp_path, MachineExited("x", -6), FIRST + CRASH, qemu_rc=-6, qemu_out=qemu_out)
    with pytest.raises(HostError, match=r"QEMU itself failed \(status -6\).*Assertion"):
        run._crash_expect([distro.SAVED_RE], Deadline(1, "kdump-tools to save the dump"))


def test_check_inputs_refuses_the_edu_source(tmp_path):
    from harness.errors import UsageError
    run = DistroRun(Scenario(dma="edu"), tmp_path / "run")
    with pytest.raises(UsageError, match="the edu source needs the initramfs guest"):
        run.check_inputs()


def test_report_before_anything_ran(tmp_path):
    run = fake_run(tmp_path)
    r = run.report()
    assert r["verdict"] == "ERROR" and r["guest"]["name"] == "debian" and r["kdump"]["captured"] is False
    assert r["phase_seconds"]["panic_to_dump_saved"] is None
