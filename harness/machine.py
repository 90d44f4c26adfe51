"""One QEMU process = one `Machine`.

The QEMU command line is a list assembled from small functions, one per concern
(machine, accelerator, memory, IOMMU, kernel, drives, devices, channels, tracing),
out of a frozen `MachineSpec`. `Machine` owns the process and everything it opened:
sockets, pump threads, the QMP connection, a scratch directory. It is a context
manager; `shutdown()` is idempotent and kills and reaps QEMU on every path,
KeyboardInterrupt included. QEMU also gets a parent-death signal, so it never
outlives the harness even if the harness is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import logging
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .arch import arch_info
from .channels import ConsoleSpawn, EventChannel, Listener
from .deadline import Deadline
from .errors import HostError
from .platforms import iommu_model
from .qmp import Qmp
from .qtest import Qtest

PR_SET_PDEATHSIG = 1
# What QEMU says when it, not the guest, failed (a device model's assertion, hw_error)
QEMU_FAILED_RE = r"Assertion .* failed|core dumped|qemu-system-\w+: .*(?:[Aa]bort|[Ee]rror)"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


def qemu_escape(value: str) -> str:
    """QEMU option values separate with commas; a literal comma is written twice."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class Drive:
    """A raw disk image on a virtio-blk (or NVMe) device, found in the guest by its serial."""

    id: str
    path: Path
    serial: str
    iommu_platform: bool = False
    interface: str = "virtio"   # "virtio" (virtio-blk-pci) or "nvme"


@dataclass(frozen=True)
class UserNet:
    """QEMU user networking for a management NIC (virtio-net, not behind the
    IOMMU): the host reaches guest TCP port `guest_port` at 127.0.0.1:`host_port`."""

    host_port: int
    guest_port: int = 22
    mac: str = "52:54:00:6b:68:01"
    id: str = "mgmt0"


@dataclass(frozen=True)
class MachineSpec:
    name: str
    kernel: Path
    initrd: Path
    append: tuple[str, ...]
    arch: str = "x86_64"
    accel: str = "tcg"
    memory_mb: int = 1024
    smp: int = 2
    iommu: str = "none"
    iommu_options: tuple[str, ...] = ()
    drives: tuple[Drive, ...] = ()
    # extra -netdev / -device / -object values contributed by DMA sources
    netdevs: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    # share guest RAM with the host through this file (memory-backend-file)
    ram_file: Path | None = None
    trace_events: tuple[str, ...] = ()
    qtest: bool = False
    results_port: bool = True
    user_net: UserNet | None = None
    extra_args: tuple[str, ...] = ()
    qemu: str | None = None  # the QEMU binary; default qemu-system-<arch> from PATH

    @property
    def binary(self) -> str:
        return self.qemu or f"qemu-system-{self.arch}"


@dataclass(frozen=True)
class Sockets:
    qmp: Path
    console: Path
    results: Path
    qtest: Path


def machine_args(spec: MachineSpec) -> list[str]:
    opts = [arch_info(spec.arch).machine_value()] + list(iommu_model(spec.iommu).machine_options)
    if spec.ram_file is not None:
        opts.append("memory-backend=ram0")
    return ["-machine", ",".join(opts)]


def accel_args(spec: MachineSpec) -> list[str]:
    cpu = arch_info(spec.arch).cpu(spec.accel)
    return ["-accel", spec.accel, "-cpu", cpu, "-smp", str(spec.smp)]


def memory_args(spec: MachineSpec) -> list[str]:
    args = ["-m", f"{spec.memory_mb}M"]
    if spec.ram_file is not None:
        args += ["-object", f"memory-backend-file,id=ram0,size={spec.memory_mb}M,"
                            f"mem-path={qemu_escape(str(spec.ram_file))},share=on"]
    return args


def iommu_args(spec: MachineSpec) -> list[str]:
    model = iommu_model(spec.iommu)
    if model.device is None:
        return []
    return ["-device", ",".join([model.device, *spec.iommu_options])]


def kernel_args(spec: MachineSpec) -> list[str]:
    append = arch_info(spec.arch).kernel_cmdline(spec.append)  # console=ttyS0 -> ttyAMA0 on arm64
    return ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", " ".join(append)]


def drive_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    for d in spec.drives:
        args += ["-drive", f"if=none,id={d.id},format=raw,cache=unsafe,file={qemu_escape(str(d.path))}"]
        if d.interface == "nvme":  # emulated PCI: always behind the IOMMU
            dev = f"nvme,drive={d.id},serial={d.serial}"
        elif d.interface == "virtio":
            dev = f"virtio-blk-pci,drive={d.id},serial={d.serial}"
            if d.iommu_platform:
                dev += ",iommu_platform=on,disable-legacy=on"
        else:
            raise ValueError(f"unknown drive interface {d.interface!r}")
        args += ["-device", dev]
    return args


def user_net_args(spec: MachineSpec) -> list[str]:
    u = spec.user_net
    if u is None:
        return []
    return ["-netdev", f"user,id={u.id},hostfwd=tcp:127.0.0.1:{u.host_port}-:{u.guest_port}",
            "-device", f"virtio-net-pci,netdev={u.id},mac={u.mac},romfile="]


def device_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    for n in spec.netdevs:
        args += ["-netdev", n]
    for d in spec.devices:
        args += ["-device", d]
    return args


def channel_args(spec: MachineSpec, s: Sockets) -> list[str]:
    # QEMU connects to sockets the harness already listens on: nothing is lost.
    args = [
        "-chardev", f"socket,id=qmp0,path={qemu_escape(str(s.qmp))}",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=con0,path={qemu_escape(str(s.console))}",
        "-serial", "chardev:con0",
    ]
    if spec.results_port:
        args += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=res0,path={qemu_escape(str(s.results))}",
            "-device", "virtserialport,chardev=res0,name=org.kdump-harness.0",
        ]
    if spec.qtest:
        args += ["-qtest", f"unix:{qemu_escape(str(s.qtest))}", "-qtest-log", "none"]
    return args


def arch_device_args(spec: MachineSpec) -> list[str]:
    """What the architecture's machine lacks: a keyboard for send-key sysrq on arm64
    virt (last, so the other devices keep their PCI slots)."""
    kbd = arch_info(spec.arch).keyboard_device
    return ["-device", kbd] if kbd else []


def trace_args(spec: MachineSpec, trace_file: Path) -> list[str]:
    if not spec.trace_events:
        return []
    # timestamps (gettimeofday) put trace events on the run's timeline
    args: list[str] = ["-msg", "timestamp=on"]
    for ev in spec.trace_events:
        args += ["-trace", ev]
    return args + ["-D", str(trace_file)]


def base_args(spec: MachineSpec) -> list[str]:
    return ["-nodefaults", "-display", "none", "-no-reboot", "-no-user-config"]


def build_argv(spec: MachineSpec, sockets: Sockets, trace_file: Path) -> list[str]:
    return [
        spec.binary,
        *base_args(spec),
        *machine_args(spec),
        *accel_args(spec),
        *memory_args(spec),
        *iommu_args(spec),
        *kernel_args(spec),
        *drive_args(spec),
        *device_args(spec),
        *user_net_args(spec),
        *channel_args(spec, sockets),
        *arch_device_args(spec),
        *trace_args(spec, trace_file),
        *spec.extra_args,
    ]


def shell_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


class Machine:
    """Owns one QEMU process. Use as a context manager:

        with Machine(spec, outdir) as m:
            m.console.expect_within("login:", Deadline(60, "first boot"))
            m.qmp.cmd("inject-nmi")

    `launch()` either leaves a running, connected machine or raises HostError
    with the argv, exit status and the tail of QEMU's own output, having closed
    everything it opened.
    """

    def __init__(self, spec: MachineSpec, outdir: Path, *, connect_deadline: float = 30.0):
        self.spec = spec
        self.outdir = Path(outdir)
        self.log = logging.getLogger(f"harness.machine.{spec.name}")
        self.connect_deadline = connect_deadline
        self.proc: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.console: ConsoleSpawn | None = None
        self.events: EventChannel | None = None
        self.qtest: Qtest | None = None
        self.returncode: int | None = None
        self._scratch: Path | None = None
        self._listeners: list[Listener] = []
        self._qemu_log = None
        self.console_log = self.outdir / f"{spec.name}.console.log"
        self.results_log = self.outdir / f"{spec.name}.results.log"
        self.qemu_log = self.outdir / f"{spec.name}.qemu.log"
        self.trace_log = self.outdir / f"{spec.name}.trace.log"
        self.argv: list[str] = []
        self.socket_paths: Sockets | None = None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "Machine":
        self.launch()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def sockets(self) -> Sockets:
        assert self._scratch is not None
        return Sockets(qmp=self._scratch / "qmp", console=self._scratch / "con",
                       results=self._scratch / "res", qtest=self._scratch / "qtest")

    def planned_argv(self) -> list[str]:
        """The argv `launch()` would run, with placeholder socket paths."""
        placeholder = Path("/tmp/kdump-harness-XXXX")
        s = Sockets(placeholder / "qmp", placeholder / "con", placeholder / "res", placeholder / "qtest")
        return build_argv(self.spec, s, self.trace_log)

    def launch(self) -> "Machine":
        if shutil.which(self.spec.binary) is None:
            raise HostError(f"{self.spec.binary} not found; install it (Debian: apt-get install "
                            f"{arch_info(self.spec.arch).qemu_package})")
        self.outdir.mkdir(parents=True, exist_ok=True)
        try:
            # Unix socket paths are limited to 108 bytes: keep them short, under /tmp.
            self._scratch = Path(tempfile.mkdtemp(prefix="kh-"))
            socks = self.sockets()
            self.socket_paths = socks
            qmp = Listener(socks.qmp)
            self._listeners.append(qmp)
            con = Listener(socks.console)
            self._listeners.append(con)
            res = Listener(socks.results) if self.spec.results_port else None
            if res:
                self._listeners.append(res)
            qt = Listener(socks.qtest) if self.spec.qtest else None
            if qt:
                self._listeners.append(qt)
            self.argv = build_argv(self.spec, socks, self.trace_log)
            self.log.debug("argv: %s", shell_command(self.argv))
            self._qemu_log = open(self.qemu_log, "wb")
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._qemu_log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness, which shuts QEMU down
                preexec_fn=_die_with_parent, close_fds=True,
            )
            self.log.info("started QEMU pid %d", self.proc.pid)
            deadline = Deadline(self.connect_deadline, f"QEMU ({self.spec.name}) to connect its sockets")
            # QEMU opens client chardevs in command-line order: qmp, console, results.
            self.qmp = Qmp(self.spec.name)
            self.qmp.connect(qmp.accept(deadline, self.alive), timeout=max(1.0, deadline.remaining()))
            self.console = ConsoleSpawn(con.accept(deadline, self.alive), self.console_log)
            if res:
                self.events = EventChannel(res.accept(deadline, self.alive), self.results_log)
            if qt:
                self.qtest = Qtest(qt.accept(deadline, self.alive))
        except BaseException as e:
            tail = self._output_tail()
            rc = self.proc.poll() if self.proc else None
            self.shutdown()
            if isinstance(e, HostError):
                raise HostError(f"{e}; QEMU status {rc}; argv: {shell_command(self.argv)}; output: {tail}") from None
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, deadline: Deadline) -> int | None:
        """Wait for QEMU to exit on its own (the guest powered off); None on deadline."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def failure(self, settle: float = 5.0) -> str | None:
        """When QEMU has exited because QEMU itself failed (killed by a signal we did
        not send, an assertion in a device model): what it said. None otherwise.

        Called once the console or results socket has closed: an aborting QEMU
        closes its sockets before it is gone (it writes the assertion, then dumps
        core), so give it up to `settle` seconds to finish exiting."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=settle)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            return None
        rc = self.proc.poll()
        tail = self._output_tail(1000).strip()
        if rc < 0 or re.search(QEMU_FAILED_RE, tail):
            return f"QEMU itself failed (status {rc}): {tail.splitlines()[-1] if tail else 'no output'}"
        return None

    def _output_tail(self, nbytes: int = 2000) -> str:
        try:
            return self.qemu_log.read_bytes()[-nbytes:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def shutdown(self, *, graceful: bool = True) -> int | None:
        """Stop QEMU and release everything. Idempotent, safe from any state."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None and graceful and self.qmp is not None:
                try:
                    self.qmp.cmd("quit", timeout=3)
                except Exception:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc is not None and proc.poll() is None:
                self.log.info("killing QEMU pid %d", proc.pid)
                proc.kill()
            if proc is not None:
                try:
                    self.returncode = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # pragma: no cover - a process immune to SIGKILL
                    self.log.error("QEMU pid %d did not die after SIGKILL", proc.pid)
            if self.qmp is not None:
                try:
                    self.qmp.close()
                except Exception:
                    pass
                self.qmp = None
            for chan in (self.console, self.events):
                if chan is not None:
                    chan.pump.join(timeout=5)
            if self.qtest is not None:
                self.qtest.close()
                self.qtest = None
            for lst in self._listeners:
                lst.close()
            self._listeners = []
            if self._qemu_log is not None:
                self._qemu_log.close()
                self._qemu_log = None
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None
        return self.returncode
