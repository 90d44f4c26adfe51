"""`--guest debian`: the kdump pipeline a distribution ships, driven over SSH.

    prepare  resolve the kernel; build (or reuse) the Debian image; copy its disk
    boot     QEMU boots the image (root disk behind the IOMMU); SSH answers
    arm      kdump-tools armed kdump at boot (`kdump-config status`: ready to kdump)
    dma      the DMA source starts (e1000e link up over SSH, canary pages)
    panic    QMP inject-nmi (or sysrq-c); the crash kernel's banner appears
    crash    the crash kernel reaches its userspace; the DMA source stops
    capture  kdump-tools saves the dump to /var/crash with makedumpfile; the
             crash kernel reboots (QEMU exits: -no-reboot)
    collect  the dump is read off the disk image offline (e2fsck replays the
             journal, debugfs copies the file out): no mount, no second boot
    analyze  the same checker and verdict as the initramfs guest, plus what
             makedumpfile's filter (Debian: -d 31) left out of the dump

The distro decides the crash kernel's command line (kdump-tools:
/proc/cmdline plus KDUMP_CMDLINE_APPEND), the crash initrd and the dump format;
`--crash-append` is added to KDUMP_CMDLINE_APPEND and kdump is re-armed.

makedumpfile -d 31 drops free and user pages, so DMA that landed in a freed
receive buffer, or on a canary page (a locked user page), is not in the dump.
The host's view of guest RAM (memory-backend-file) still has those pages: the
analysis scans old memory there too, counts what the dump lacks, and the
verdict says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import markers
from .accel import choose_accel
from .deadline import Deadline
from .distro_image import DebianImage, build_image, parse_recipe, recipe_dir
from .dma import NIC_MAC, NicSource, DmaSource, make_source
from .dumpfile import DUMP_LEVEL_CLASSES, is_flattened, kdump_header, reassemble_flattened
from .errors import DeadlineExceeded, HarnessError, HostError, MachineExited, UsageError
from .kernels import Kernel, check_config, resolve_kernel
from .machine import Drive, Machine, MachineSpec, UserNet, shell_command
from .platforms import KDUMP_CONFIG_NEEDED
from .run import BANNER_RE, PANIC_RE, ProgressFn, RunBase, Stop, detect_format, parse_iomem
from .scenario import Scenario
from .verdict import Outcome, Verdict

log = logging.getLogger(__name__)

# Phase budgets in seconds for TCG on a slow 2-core host (a full systemd boot,
# twice); scaled everywhere by KDUMP_HARNESS_TIMEOUT_SCALE.
BUDGET = {
    "boot": 420.0,          # QEMU start -> sshd answers
    "arm": 240.0,           # sshd answers -> kdump-config: ready to kdump
    "command": 120.0,       # one command over SSH
    "panic": 60.0,          # NMI -> the crash kernel's banner
    "crash": 180.0,         # banner -> the crash kernel's /init
    "save_base": 420.0,     # crash kernel /init -> dump saved (systemd boot + makedumpfile) ...
    "save_per_gib": 300.0,  # ... plus this per GiB of guest RAM
    "reboot": 90.0,         # dump saved -> the crash kernel reboots (QEMU exits)
    "offline": 600.0,       # e2fsck / debugfs on the host
}
PORT_ATTEMPTS = 5
DISKS = ("virtio", "nvme")
DMA_SOURCES = ("none", "nic")
# Per-translation trace events: every DMA of the root disk too. They are on only
# while the DMA source runs (QMP trace-event-set-state); the rest from the start.
HEAVY_TRACE = ("vtd_dmar_translate", "amdvi_translation_result", "virtio_iommu_translate_out")

CRASH_USERSPACE_RE = r"Run /init as init process"
# whole lines: pexpect matches against what has arrived so far, which may end mid-path
SAVED_RE = r"saved vmcore in (/\S+?)\.?\r?\n"
# ("makedumpfile failed, falling back to 'cp'" is not the end: cp may still save vmcore.<stamp>)
SAVE_FAILED_RE = r"failed to save vmcore in (/\S+?)\.?\r?\n"
USERSPACE_HINTS = ("systemd[1]:", "Welcome to Debian", "Run /init as init process")
SSH_HINT_RE = r"OpenBSD Secure Shell server|ssh\.service| login: "
# kdump-tools' default KDUMP_CMDLINE_APPEND; the image adds NO_NIC_DRIVER (see
# guest-images/debian/setup.sh: QEMU 7.2's e1000e aborts when a crash kernel's
# driver probes it), which --crash-load-driver takes away again.
KDUMP_DEFAULT_APPEND = "reset_devices systemd.unit=kdump-tools-dump.service nr_cpus=1 irqpoll usbcore.nousb"
NO_NIC_DRIVER = "modprobe.blacklist=e1000e"


NIC_SETUP = f"""
dev=""
for n in /sys/class/net/*; do
    [ "$(cat "$n/address" 2>/dev/null)" = "{NIC_MAC}" ] && dev=${{n##*/}}
done
if [ -z "$dev" ]; then echo "rc=1 what=no-interface-with-mac-{NIC_MAC}"; exit 0; fi
ethtool -G "$dev" rx 4096 >/dev/null 2>&1; ring_rc=$?
ip link set "$dev" up; rc=$?
rx=$(ethtool -g "$dev" 2>/dev/null | awk '/^Current/ {{c = 1}} c && /^RX:/ {{print $2; exit}}')
drv=$(basename "$(readlink "/sys/class/net/$dev/device/driver")")
echo "rc=$rc dev=$dev rx=${{rx:-unknown}} ring_rc=$ring_rc driver=$drv"
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now. QEMU binds it a moment
    later; a run that loses the race sees QEMU fail and tries another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_fields(text: str) -> dict[str, str]:
    """`k=v k2=v2` -> dict (the last such line wins)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        pairs = [p.partition("=") for p in line.split()]
        if pairs and all(sep for _, sep, _ in pairs):
            out = {k: v for k, _, v in pairs}
    return out


def kdump_ready(status_output: str) -> bool:
    """`kdump-config status` says kdump is armed."""
    return bool(re.search(r"current state\s*:\s*ready to kdump", status_output))


def kexec_cmdline(show_output: str) -> str | None:
    """The crash kernel's command line from `kdump-config show` (its kexec command)."""
    m = re.search(r'--command-line="([^"]*)"', show_output)
    return m.group(1).strip() if m else None


def parse_debugfs_ls(text: str) -> list[tuple[str, bool]]:
    """`debugfs -R "ls -p DIR"` -> [(name, is_dir)], without . and .."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("/")
        # /INODE/MODE/UID/GID/NAME/SIZE/
        if len(parts) >= 7 and parts[0] == "" and parts[1].isdigit():
            name = "/".join(parts[5:-2])
            if name in (".", ".."):
                continue
            out.append((name, parts[2].startswith("04")))
    return out


def pick_dump(entries: list[tuple[str, bool]]) -> str | None:
    """The dump file kdump-tools leaves in a /var/crash/<stamp> directory:
    dump.<stamp> (makedumpfile), else vmcore.<stamp> (its cp fallback)."""
    files = sorted(name for name, is_dir in entries if not is_dir)
    for prefix in ("dump.", "vmcore."):
        found = [f for f in files if f.startswith(prefix)]
        if found:
            return found[-1]
    return None


# -- SSH --------------------------------------------------------------------------------

class SshError(HostError):
    """SSH to the guest failed: the image, the port forward or the host."""


@dataclass
class CommandResult:
    command: str
    rc: int
    output: str

    def check(self, what: str) -> "CommandResult":
        if self.rc != 0:
            tail = " | ".join(l for l in self.output.strip().splitlines()[-4:])
            raise SshError(f"{what} failed in the guest (status {self.rc}): {self.command}: {tail}")
        return self


def wait_for_ssh(connect: Callable[[float], object], deadline: Deadline, *, alive: Callable[[], bool],
                 wake: Callable[[float], None], fatal: tuple = ()) -> tuple[object, int]:
    """Call `connect(timeout)` until it returns a client: (client, attempts).

    Between attempts, `wake(seconds)` waits (on the console, so a hint such as
    sshd starting ends the wait early); the pause grows from 1 to 5 s. An
    exception in `fatal` (a rejected key, a wrong host key) ends it at once;
    QEMU exiting raises MachineExited; the deadline raises DeadlineExceeded with
    the last error.
    """
    attempts = 0
    pause = 1.0
    last: Exception | None = None
    while True:
        if not alive():
            raise MachineExited(deadline.what, None, f"last SSH error: {last}")
        attempts += 1
        try:
            return connect(max(1.0, min(15.0, deadline.remaining()))), attempts
        except fatal as e:
            raise SshError(f"SSH to the guest was refused: {type(e).__name__}: {e}") from None
        except (OSError, EOFError, Exception) as e:  # paramiko.SSHException and socket errors
            last = e
        if deadline.expired():
            raise deadline.exceeded(f"{attempts} attempts; last SSH error: {type(last).__name__}: {last}")
        wake(min(pause, deadline.remaining()))
        pause = min(5.0, pause * 1.5)


class GuestShell:
    """Commands in the guest over one SSH connection (paramiko), each with a deadline."""

    def __init__(self, client, user: str):
        self.client = client
        self.user = user
        self.log: list[dict] = []

    def run(self, command: str, deadline: Deadline, *, sudo: bool = False) -> CommandResult:
        full = f"sudo -n sh -c {shlex.quote(command)}" if sudo else command
        t0 = time.monotonic()
        try:
            chan = self.client.get_transport().open_session(timeout=max(1.0, deadline.remaining()))
            chan.set_combine_stderr(True)
            chan.settimeout(max(1.0, deadline.remaining()))
            chan.exec_command(full)
            out = chan.makefile("rb").read()
            if not chan.status_event.wait(max(0.1, deadline.remaining())):
                raise socket.timeout()
            rc = chan.recv_exit_status()
            chan.close()
        except socket.timeout:
            raise deadline.exceeded(f"command: {command.strip()[:80]}") from None
        except (OSError, EOFError, AttributeError) as e:
            raise SshError(f"SSH failed while running {command.strip()[:80]!r}: {type(e).__name__}: {e}") from None
        except Exception as e:  # paramiko.SSHException
            raise SshError(f"SSH failed while running {command.strip()[:80]!r}: {type(e).__name__}: {e}") from None
        text = out.decode("utf-8", "replace")
        self.log.append({"command": command.strip()[:200], "rc": rc, "seconds": round(time.monotonic() - t0, 2)})
        log.debug("ssh %r -> %d: %s", command.strip()[:80], rc, text.strip()[-300:])
        return CommandResult(command.strip(), rc, text)

    def put(self, local: Path, remote: str, mode: int = 0o755) -> None:
        try:
            sftp = self.client.open_sftp()
            try:
                sftp.put(str(local), remote)
                sftp.chmod(remote, mode)
            finally:
                sftp.close()
        except Exception as e:
            raise SshError(f"copying {local.name} to the guest failed: {type(e).__name__}: {e}") from None

    def start(self, command: str, *, sudo: bool = False):
        """A long-running command; returns its channel (stdout and stderr combined)."""
        full = f"sudo -n sh -c {shlex.quote(command)}" if sudo else command
        try:
            chan = self.client.get_transport().open_session(timeout=30)
            chan.set_combine_stderr(True)
            chan.exec_command(full)
            return chan
        except Exception as e:
            raise SshError(f"SSH failed starting {command[:80]!r}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def read_lines(chan, deadline: Deadline, until: Callable[[list[str]], bool]) -> list[str]:
    """Lines from a running command's channel until `until(lines)` or its end."""
    lines: list[str] = []
    buf = b""
    while not until(lines):
        chan.settimeout(max(0.1, deadline.remaining()))
        try:
            data = chan.recv(65536)
        except socket.timeout:
            raise deadline.exceeded(f"got {len(lines)} lines: {lines[-2:]}") from None
        if not data:
            break
        buf += data
        *new, buf = buf.split(b"\n")
        lines += [l.decode("utf-8", "replace").strip() for l in new]
    return lines


# -- the NIC, driven over SSH -----------------------------------------------------------

class GuestNic(NicSource):
    """The e1000e source in a guest reached over SSH: the run brings its link up
    (`ready` holds what the guest said), there is no results port."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ready: dict[str, str] | None = None

    def start(self) -> None:
        if not self.ready or self.ready.get("rc") != "0":
            raise HostError(f"the guest did not bring the NIC up: {self.ready}")
        self._thread = threading.Thread(target=self._send_loop, name="nic-sender", daemon=True)
        self._thread.start()

    def to_json(self) -> dict:
        d = super().to_json()
        d["ring"] = self.ready
        return d


# -- the run ----------------------------------------------------------------------------

class DistroRun(RunBase):
    """One scenario on the Debian guest image, into `outdir`. Mirrors KdumpRun:
    `execute()` does everything; `finish()` reaps QEMU and writes report.json."""

    def __init__(self, scenario: Scenario, outdir: Path | str, *, accel: str = "auto",
                 progress: ProgressFn | None = None, disk: str = "virtio", keep_disk: bool = False):
        self._init_common(scenario, outdir, accel, progress)
        guest = getattr(scenario, "guest", "debian")
        self.guest = "debian" if guest in (None, "initramfs") else guest
        if disk not in DISKS:
            raise UsageError(f"unknown root disk {disk!r}; choose one of {', '.join(DISKS)}")
        self.disk_interface = disk
        self.keep_disk = keep_disk
        self.image: DebianImage | None = None
        self.image_built = False
        self.shell: GuestShell | None = None
        self.dma: DmaSource = GuestNic() if scenario.dma == "nic" else make_source(
            scenario.dma if scenario.dma in DMA_SOURCES else "none")
        self.dma.attach(self)
        self.run_disk: Path | None = None
        self.ssh_port: int | None = None
        self.canary_chan = None
        self.filter_report: dict | None = None
        self.heavy_trace_on = False

    @property
    def qtest(self):
        return None

    # -- phases ------------------------------------------------------------------------

    def check_inputs(self) -> Kernel:
        """Bad input fails here, before anything is written or started."""
        if self.kernel is None:
            s = self.scenario
            parse_recipe(recipe_dir(self.guest))
            if s.dma not in DMA_SOURCES:
                raise UsageError(f"--guest {self.guest} drives --dma {' or '.join(DMA_SOURCES)}, not {s.dma!r} "
                                 f"(the edu source needs the initramfs guest)")
            kernel = resolve_kernel(s.kernel, s.modules, s.kernel_config)
            needed = KDUMP_CONFIG_NEEDED + self.iommu.config_needed + ("VIRTIO_NET", "EXT4_FS")
            if s.dma == "nic":
                needed += ("E1000E",)
            check_config(kernel, needed)
            if kernel.modules_dir is None:
                raise UsageError(f"--guest {self.guest} installs the kernel's modules in the image: give --modules")
            self.kernel = kernel
        return self.kernel

    def not_applicable(self) -> list[str]:
        """Scenario settings the distro decides for itself here."""
        s = self.scenario
        out = []
        if s.crash_base != Scenario().crash_base:
            out.append("crash_base (kdump-tools' KDUMP_CMDLINE_APPEND decides)")
        if s.dump_format != Scenario().dump_format:
            out.append("dump_format (kdump-tools runs makedumpfile with its MAKEDUMP_ARGS)")
        if s.crash_load_driver:
            out.append("crash_load_driver (udev in the crash kernel decides)")
        return out

    def prepare(self, dry_run: bool = False) -> None:
        """Everything before QEMU starts. `dry_run` (--show-command): no image build,
        no disk copy, no KVM probe; the argv names where the image would be."""
        with self.phase("prepare", f"{self.scenario.kernel}, guest {self.guest}"):
            self.check_inputs()
            for what in self.not_applicable():
                log.warning("--guest %s ignores %s", self.guest, what)
            self.outdir.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            recipe = parse_recipe(recipe_dir(self.guest))
            from .distro_image import image_dir
            final = image_dir(recipe, self.kernel)
            self.image_built = not (final / "manifest.json").exists()
            if dry_run:
                self.image = DebianImage(final, {"cmdline": list(recipe.cmdline), "user": recipe.user,
                                                 "kernel_release": self.kernel.release})
                self.run_disk = self.outdir / "rootfs.img"
                self.accel = choose_accel(self.accel_request, self.kernel.image, probe=False)
                self.scratch = Path(tempfile.mkdtemp(prefix="kh-distro-"))
                self.ram_file = Path("/dev/shm/kh-ram-XXXX")
                self.spec = self.machine_spec()
                return
            self.image = build_image(self.kernel, self.guest, progress=self.progress, recipe=recipe)
            self.state.timings["image"] = round(time.monotonic() - t, 3)
            self.state.facts["image_build_seconds"] = self.image.manifest.get("build_seconds")
            # the run's own copy of the disk: the cached image stays pristine
            self.run_disk = self.outdir / "rootfs.img"
            t = time.monotonic()
            _run_host(["cp", "--sparse=always", str(self.image.rootfs), str(self.run_disk)], "copying the disk image",
                      Deadline(BUDGET["offline"], "the disk image copy"))
            self.state.timings["disk_copy"] = round(time.monotonic() - t, 3)
            self.accel = choose_accel(self.accel_request, self.kernel.image, probe=True)
            self.scratch = Path(tempfile.mkdtemp(prefix="kh-distro-"))
            shm = Path("/dev/shm")
            self.ram_file = Path(tempfile.mktemp(prefix="kh-ram-", dir=shm if shm.is_dir() else self.scratch))
            self.spec = self.machine_spec()

    def cmdline(self) -> tuple[str, ...]:
        s = self.scenario
        source_opts = getattr(self.dma, "first_append", lambda: ())()
        return (*self.image.cmdline, f"crashkernel={s.crashkernel}", "unknown_nmi_panic",
                *self.iommu.first_append, *source_opts, *s.first_append)

    def machine_spec(self, port: int = 0) -> MachineSpec:
        """The machine; `port` is the host end of the SSH forward (chosen at launch)."""
        s = self.scenario
        return MachineSpec(
            name="guest", kernel=self.kernel.image, initrd=self.image.initrd, append=self.cmdline(),
            accel=self.accel.accel, memory_mb=s.memory_mb, iommu=s.iommu, iommu_options=s.iommu_options,
            drives=(Drive("root", self.run_disk, "khroot", iommu_platform=True, interface=self.disk_interface),),
            netdevs=self.dma.netdevs(self.scratch) if self.scratch else (),
            devices=self.dma.devices(), ram_file=self.ram_file, results_port=False,
            trace_events=tuple(e for e in self.iommu.trace_events if e not in HEAVY_TRACE),
            user_net=UserNet(host_port=port),
        )

    def launch(self) -> Machine:
        """Start QEMU on a free port for the SSH forward; another run may take the
        port between our probe and QEMU's bind: then QEMU fails and we try again."""
        last: HostError | None = None
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            spec = dataclasses.replace(self.spec, user_net=UserNet(host_port=port))
            machine = Machine(spec, self.outdir)
            try:
                machine.launch()
            except HostError as e:
                if "host forwarding" in str(e) or "hostfwd" in str(e).split("output:", 1)[-1]:
                    log.info("port %d was taken (attempt %d): %s", port, attempt + 1, e)
                    last = e
                    continue
                raise
            finally:
                if machine.argv:
                    (self.outdir / "qemu-cmdline.txt").write_text(shell_command(machine.argv) + "\n")
            self.spec, self.machine, self.ssh_port = spec, machine, port
            return machine
        raise HostError(f"no free port for the SSH forward after {PORT_ATTEMPTS} attempts: {last}")

    def boot(self) -> None:
        with self.phase("boot", f"{self.accel.accel}, {self.scenario.memory_mb} MiB, Debian image over SSH"):
            self.launch()
            self.mark("qemu_started")
            self.connect()
            self.mark("ssh_up")
        with self.phase("arm", "kdump-tools"):
            self.wait_armed()
            self.mark("armed")

    def connect(self) -> None:
        import paramiko

        key = paramiko.Ed25519Key.from_private_key_file(str(self.image.key_path))
        kind, blob = self.image.host_key_path.read_text().split()[:2]
        host_key = paramiko.Ed25519Key(data=__import__("base64").b64decode(blob))
        port = self.ssh_port

        def connect(timeout: float):
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{port}", kind, host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect("127.0.0.1", port=port, username=self.image.user, pkey=key, timeout=timeout,
                               banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False,
                               allow_agent=False)
            except BaseException:
                client.close()
                raise
            return client

        deadline = Deadline(BUDGET["boot"], f"sshd in the guest to answer on 127.0.0.1:{port}")
        try:
            client, attempts = wait_for_ssh(
                connect, deadline, alive=self.machine.alive, wake=lambda s: self._console_wait(SSH_HINT_RE, s),
                fatal=(paramiko.AuthenticationException, paramiko.BadHostKeyException))
        except (MachineExited, DeadlineExceeded) as e:
            self._check_qemu()
            self._split_consoles()
            if not any(h in self.first_console for h in USERSPACE_HINTS):
                raise Stop(Verdict.FIRST_BOOT_FAILED, f"the first kernel did not reach userspace ({e})",
                           self._console_tail()) from None
            if isinstance(e, MachineExited):
                raise Stop(Verdict.FIRST_BOOT_FAILED, f"QEMU exited while waiting for SSH: the guest "
                           f"{'panicked' if re.search(PANIC_RE, self.first_console) else 'rebooted'}",
                           self._console_tail()) from None
            raise SshError(f"SSH to the guest never worked: {e}") from None
        self.state.facts["ssh_attempts"] = attempts
        self.shell = GuestShell(client, self.image.user)

    def sh(self, command: str, what: str, *, sudo: bool = True, seconds: float | None = None) -> CommandResult:
        """A command over SSH; QEMU exiting meanwhile is the guest's doing."""
        try:
            return self.shell.run(command, Deadline(seconds or BUDGET["command"], what), sudo=sudo)
        except SshError:
            if self.machine is not None and not self.machine.alive():
                self._check_qemu()
                raise Stop(Verdict.FIRST_BOOT_FAILED, f"QEMU exited while {what}", self._console_tail()) from None
            raise

    def wait_armed(self) -> None:
        facts = self.state.facts
        facts["release"] = self.sh("uname -r", "reading the release", sudo=False).output.strip()
        facts["proc_cmdline"] = self.sh("cat /proc/cmdline", "reading /proc/cmdline", sudo=False).output.strip()
        state = self.sh("systemctl show -p ActiveState -p Result kdump-tools.service", "asking systemd about "
                        "kdump-tools", sudo=False).output
        facts["kdump_tools_at_first_look"] = parse_fields(state.replace("\n", " ")) or state.strip()
        # A oneshot unit: `systemctl start` joins the boot's start job and returns
        # when kdump-config load has finished (or failed).
        started = self.sh("systemctl start kdump-tools.service", "waiting for kdump-tools to arm kdump",
                          seconds=BUDGET["arm"])
        append = crash_append_for(self.scenario)
        if append is not None:
            self.sh(f"printf '%s\\n' {shlex.quote(f'KDUMP_CMDLINE_APPEND={chr(34)}{append}{chr(34)}')} "
                    f">> /etc/default/kdump-tools && kdump-config unload && kdump-config load",
                    "re-arming kdump with this scenario's crash kernel options",
                    seconds=BUDGET["arm"]).check("re-arming kdump with this scenario's crash kernel options")
        status = self.sh("kdump-config status", "kdump-config status")
        facts["kdump_status"] = status.output.strip()
        if not kdump_ready(status.output):
            journal = self.sh("journalctl -b -u kdump-tools.service --no-pager -n 25", "reading the journal")
            raise Stop(Verdict.FIRST_BOOT_FAILED,
                       f"kdump-tools did not arm kdump (`kdump-config status`: "
                       f"{(status.output.strip().splitlines() or ['no output'])[-1].strip()}; "
                       f"systemctl start kdump-tools: status {started.rc})",
                       [f"journal: {l}" for l in journal.output.strip().splitlines()[-15:]] + self._console_tail(8))
        show = self.sh("kdump-config show", "kdump-config show")
        facts["kdump_show"] = show.output.strip()
        facts["crash_cmdline"] = kexec_cmdline(show.output)
        makedump = self.sh(". /etc/default/kdump-tools; echo \"${MAKEDUMP_ARGS:-}\"", "reading MAKEDUMP_ARGS")
        facts["makedump_args"] = makedump.output.strip() or "-F -c -d 31 (MAKEDUMP_ARGS unset: kdump-config's default)"
        iomem = self.sh("cat /proc/iomem", "reading /proc/iomem").check("reading /proc/iomem")
        facts["iomem"] = parse_iomem(iomem.output.splitlines())
        crash = [r for r in facts["iomem"] if r["name"] == "Crash kernel"]
        facts["crash_kernel_range"] = [crash[0]["start"], crash[0]["end"]] if crash else None

    def start_dma(self) -> None:
        s = self.scenario
        if s.dma == "none" and s.canaries <= 0:
            return
        with self.phase("dma", self.dma.name):
            if isinstance(self.dma, GuestNic):
                out = self.sh(NIC_SETUP, "bringing the e1000e link up").output
                self.dma.ready = parse_fields(out) or {"rc": "1", "what": out.strip()[-200:]}
            if s.canaries > 0:
                self.start_canaries(s.canaries)
            if self.dma.name != "none":
                self.set_heavy_trace(True)
                self.dma.start()
                self.mark("dma_started")
                self.dma.pre_panic()

    def start_canaries(self, count: int) -> None:
        """Canary pages (khdma canary: locked user pages of marker records), held
        until the panic by a command that stays open over SSH."""
        from .guest_helpers import build_helper
        from .channels import parse_event_line

        self.shell.put(build_helper("khdma"), "/tmp/khdma")
        self.canary_chan = self.shell.start(f"/tmp/khdma canary 0x{self.nonce:016x} {count}", sudo=True)
        lines = read_lines(self.canary_chan, Deadline(60, "khdma to fill the canary pages"),
                           lambda ls: sum(l.startswith("canary ") for l in ls) >= count
                           or any(l.startswith("error") for l in ls))
        canaries = []
        for line in lines:
            ev = parse_event_line(line, 0.0)
            if ev and ev.name == "canary":
                canaries.append((ev.int("index"), ev.int("phys")))
        if len(canaries) < count:
            raise HostError(f"khdma made {len(canaries)} of {count} canary pages: {lines[-3:]}")
        self.state.facts["canaries"] = canaries

    def set_heavy_trace(self, on: bool) -> None:
        if self.machine is None or self.machine.qmp is None or not self.iommu.device:
            return
        for ev in HEAVY_TRACE:
            if ev in self.iommu.trace_events:
                try:
                    self.machine.qmp.cmd("trace-event-set-state", name=ev, enable=on)
                except HarnessError as e:
                    log.warning("cannot switch trace event %s %s: %s", ev, "on" if on else "off", e)
                    return
        self.heavy_trace_on = on
        self.state.marks[f"translation_trace_{'on' if on else 'off'}"] = self.now()

    def panic(self) -> None:
        m = self.machine
        with self.phase("panic", self.scenario.panic_method):
            if self.scenario.panic_method == "sysrq":
                self.sh("echo 1 > /proc/sys/kernel/sysrq", "enabling sysrq")
            m.console.skip_pending()
            self.mark("panic")
            if self.scenario.panic_method == "nmi":
                m.qmp.cmd("inject-nmi")
            else:
                m.qmp.cmd("send-key", keys=[{"type": "qcode", "data": k} for k in ("alt", "sysrq", "c")])
            self.dma.on_phase("during_kexec")
            # the guest is gone: its SSH session (and khdma) will never answer again
            if self.shell is not None:
                self.shell.close()
            try:
                m.console.expect_within([BANNER_RE], Deadline(BUDGET["panic"], "the crash kernel's banner"))
            except MachineExited:
                self._check_qemu()
                raise Stop(Verdict.NO_KDUMP, "QEMU exited after the panic: the kernel rebooted instead of "
                                             "starting the crash kernel", self._console_tail()) from None
            except DeadlineExceeded as e:
                raise Stop(Verdict.NO_KDUMP, str(e), self._console_tail()) from None
            self.mark("crash_kernel_start")
            self.dma.on_phase("crash_early")

    def follow_crash(self) -> None:
        m = self.machine
        with self.phase("crash", "crash kernel boot"):
            self._crash_expect([CRASH_USERSPACE_RE], Deadline(BUDGET["crash"], "the crash kernel's /init"))
            self.mark("crash_userspace")
            self.dma.on_phase("crash_userspace")
            self.dma.stop()
            self.mark("dma_stopped")
            self.set_heavy_trace(False)
            self.snapshot_region()
        gib = max(1.0, self.scenario.memory_mb / 1024)
        with self.phase("capture", "kdump-tools: makedumpfile to /var/crash"):
            deadline = Deadline(BUDGET["save_base"] + gib * BUDGET["save_per_gib"],
                                "kdump-tools in the crash kernel to save the dump")
            i = self._crash_expect([SAVED_RE, SAVE_FAILED_RE], deadline)
            if i == 1:
                self.mark("save_failed")
                self._split_consoles()
                raise Stop(Verdict.KDUMP_PANIC, f"kdump-tools failed to save the dump "
                           f"({m.console.match.group(0).strip()})", self._console_tail())
            self.mark("dump_saved")
            self.state.facts["dump_dir"] = m.console.match.group(1)
            if m.wait_exit(Deadline(BUDGET["reboot"], "the crash kernel to reboot")) is None:
                log.warning("the crash kernel did not reboot after saving the dump; stopping QEMU")
            self.mark("crash_kernel_exit")

    def qemu_failure(self) -> str | None:
        """QEMU itself died (a signal, an assertion in a device model): what it said."""
        return self.machine.failure() if self.machine is not None else None

    def _crash_expect(self, patterns: list[str], deadline: Deadline) -> int:
        """Wait on the crash kernel's console: QEMU exiting means it panicked or
        rebooted (-no-reboot), the deadline means it hung."""
        try:
            return self.machine.console.expect_within(patterns, deadline)
        except MachineExited:
            self._check_qemu()
            self._split_consoles()
            panicked = re.search(PANIC_RE, self.crash_console)
            raise Stop(Verdict.KDUMP_PANIC, f"the crash kernel {'panicked' if panicked else 'rebooted'} before "
                       f"{deadline.what} (no dump saved)", self._console_tail()) from None
        except DeadlineExceeded as e:
            self._split_consoles()
            if re.search(PANIC_RE, self.crash_console):
                raise Stop(Verdict.KDUMP_PANIC, f"the crash kernel panicked ({e})", self._console_tail()) from None
            raise Stop(Verdict.KDUMP_HANG, f"no dump: {e}", self._console_tail()) from None

    # -- the dump, off the disk --------------------------------------------------------

    def collect(self) -> None:
        with self.phase("collect", "the dump from /var/crash on the disk image"):
            self.machine.shutdown()
            self._split_consoles()
            try:
                found = extract_dump(self.run_disk, self.outdir, self.state.facts.get("dump_dir"),
                                     Deadline(BUDGET["offline"], "e2fsck and debugfs on the disk image"))
            except NoDump as e:  # the crash kernel said it saved the dump: the disk or the harness lost it
                raise HostError(f"{e}, although the crash kernel's console said kdump-tools saved "
                                f"{self.state.facts.get('dump_dir')}") from None
            self.state.facts.update(found.facts)
            self.vmcore = found.vmcore
            self.state.facts["vmcore_format"] = detect_format(found.vmcore)
            if self.state.facts["vmcore_format"] == "kdump-compressed":
                self.state.facts["dump_header"] = kdump_header(found.vmcore)
            if not self.keep_disk:
                self.run_disk.unlink(missing_ok=True)

    # -- analysis ----------------------------------------------------------------------

    def analyze(self) -> Outcome:
        from .analysis import add_hits, analyze_dma, dma_report, dma_verdict
        from .groundtruth import parse_trace

        with self.phase("analyze"):
            self.console_facts()
            facts = self.state.facts
            if facts.get("vmcore_format") not in ("elf64", "kdump-compressed"):
                return Outcome(Verdict.KDUMP_PANIC, "the dump kdump-tools wrote is not a readable dump",
                               [f"{self.vmcore}: format {facts.get('vmcore_format')}"])
            panic_t = self.state.marks.get("panic")
            gt = parse_trace(self.machine.trace_log, self.scenario.iommu, self.wall0, panic_t) \
                if self.iommu.device else None
            an = analyze_dma(source=self.dma, nonce=self.nonce, vmcore=self.vmcore, region=self.region,
                             crash_range=facts.get("crash_kernel_range"), panic_t=panic_t, gt=gt,
                             canary_pages=facts.get("canaries", []))
            hidden = self.hidden_by_filter(an)
            if hidden["hits"]:
                add_hits(an, hidden["hits"], "host-ram, not in the dump", self.dma, gt)
            if gt is not None and "crash_iommu_init" not in self.state.marks and gt.translation_off_t is not None:
                self.state.marks["crash_iommu_init"] = round(gt.translation_off_t, 3)
            rep = dma_report(an, self.dma, gt, self.state.marks)
            self.analysis_report = rep
            self.filter_report = filter_summary(facts.get("dump_header"), hidden, rep, self.dma.name)
            evidence = [f"dump {facts.get('dump_in_guest')} written by kdump-tools "
                        f"(makedumpfile {facts.get('makedump_args')}): {facts['vmcore_format']}, "
                        f"{facts.get('dump_file_size')} bytes"]
            if self.iommu.device:
                evidence.append(f"crash kernel copied the old IOMMU tables: {facts.get('iommu_copied')}; "
                                f"faults logged: {facts.get('iommu_faults')}")
            evidence += self.filter_report["lines"]
            outcome = dma_verdict(an, self.dma, rep)
            if outcome is None:
                if self.dma.name != "none":
                    evidence.append(f"{rep['source']}: sent {rep['sent']} ({rep['sent_after_panic']} after the "
                                    f"panic), seen {rep['seen']}, records landed {rep['landed']}, after the panic "
                                    f"{rep['landed_after_panic']}; canaries intact "
                                    f"{rep['canaries']['intact']}/{rep['canaries']['count']}")
                outcome = Outcome(Verdict.PASS, "the distro's dump was captured; nothing wrong found", evidence)
            else:
                outcome = Outcome(outcome.verdict, outcome.reason, outcome.evidence + evidence)
            note = self.filter_report.get("verdict_note")
            if note:
                outcome = Outcome(outcome.verdict, f"{outcome.reason}; {note}", outcome.evidence)
            return outcome

    def hidden_by_filter(self, an) -> dict:
        """Old memory in the host's RAM view against the dump: marker records and
        canary pages the dump lacks (pages makedumpfile filtered out)."""
        from .arch import arch_info
        from .checker import CanaryState, open_dump

        out: dict = {"hits": [], "ram_records": None, "dump_records": None, "canaries_not_in_dump": [],
                     "canaries_in_ram": {}}
        crash = self.state.facts.get("crash_kernel_range")
        if self.ram_file is None or not self.ram_file.exists() or self.vmcore is None:
            return out
        dma = lambda hits: [h for h in hits if h.source != markers.Source.CANARY]  # noqa: E731
        with open_dump(self.vmcore) as dump:
            in_dump = {h.phys for h in dma(dump.scan(self.nonce, max_markers=1 << 20, allow_unreadable=True).markers)}
        ranges = old_memory_ranges(arch_info("x86_64").ram_ranges(self.scenario.memory_mb), crash)
        with open_dump(self.ram_file, raw_ranges=ranges) as ram:
            in_ram = dma(ram.scan(self.nonce, max_markers=1 << 20, allow_unreadable=True).markers)
            missing = [(c.index, c.phys) for c in an.canaries if c.state == CanaryState.MISSING]
            ram_canaries = ram.check_canaries(self.nonce, missing) if missing else []
        # DMA marker records (canary pages are counted as pages, below)
        out["ram_records"] = len(in_ram)
        out["dump_records"] = len(in_dump)
        out["hits"] = [h for h in in_ram if h.phys not in in_dump]
        out["canaries_not_in_dump"] = [i for i, _ in missing]
        by_index = {c.index: c for c in ram_canaries}
        # a canary the dump lacks is judged from the host's RAM view instead
        an.canaries = [by_index.get(c.index, c) if c.state == CanaryState.MISSING else c for c in an.canaries]
        out["canaries_in_ram"] = {c.index: c.state.value for c in ram_canaries}
        return out

    def console_facts(self) -> None:
        super().console_facts()
        crash, facts = self.crash_console, self.state.facts
        facts["crash_kernel_loaded_e1000e"] = bool(re.search(r"e1000e 0000:00:04\.0", crash)) if crash else None

    # -- console -----------------------------------------------------------------------

    def _console_wait(self, pattern: str, seconds: float) -> bool:
        """Wait up to `seconds` for `pattern` on the console (a wake-up, not a condition)."""
        if self.machine is None or self.machine.console is None or seconds <= 0:
            return False
        try:
            self.machine.console.expect_within([pattern], Deadline(seconds, "a console hint", scale=1))
            return True
        except (DeadlineExceeded, MachineExited):
            return False

    # -- the whole run -------------------------------------------------------------------

    def finish(self) -> None:
        """Reap QEMU, drop the big scratch files, write report.json. Safe to call twice."""
        self.dma.close()
        if self.shell is not None:
            self.shell.close()
        if self.machine is not None:
            self.machine.shutdown(graceful=False)
            self.console_facts()
        if self.ram_file is not None and self.ram_file.exists():
            self.ram_file.unlink()
        if self.run_disk is not None and self.run_disk.exists() and not self.keep_disk:
            self.run_disk.unlink()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self.state.timings.setdefault("total", self.now())  # a second finish() keeps the run's own total
        self.write_outputs()

    def phase_seconds(self) -> dict:
        """The durations the issue asks for, from the marks."""
        m = self.state.marks

        def span(a: str, b: str):
            return round(m[b] - m[a], 3) if a in m and b in m else None

        return {"boot_to_ssh": span("qemu_started", "ssh_up"), "boot_to_armed": span("qemu_started", "armed"),
                "panic_to_crash_kernel": span("panic", "crash_kernel_start"),
                "panic_to_dump_saved": span("panic", "dump_saved"),
                "image_build": (self.image.manifest.get("build_seconds") if self.image and self.image_built
                                else None),
                "image_prepare": self.state.timings.get("image")}

    def report(self) -> dict:
        rep = super().report()
        f = self.state.facts
        header = f.get("dump_header") or {}
        rep["guest"] = {
            "name": self.guest,
            "image": str(self.image.dir) if self.image else None,
            "image_built_now": self.image_built,
            "image_build_seconds": self.image.manifest.get("build_seconds") if self.image else None,
            "root_disk": self.disk_interface,
            "ssh": {"host": "127.0.0.1", "port": self.ssh_port,
                    "user": self.image.user if self.image else None,
                    "attempts": f.get("ssh_attempts"),
                    "commands": self.shell.log if self.shell else []},
            "not_applicable": self.not_applicable(),
            "kdump_tools": {"status": f.get("kdump_status"), "at_first_look": f.get("kdump_tools_at_first_look"),
                            "show": f.get("kdump_show")},
            "first_cmdline": f.get("proc_cmdline"),
        }
        rep["kdump"].update({
            "crash_cmdline": f.get("crash_cmdline"),
            "tool": "kdump-tools",
            "dump_in_guest": f.get("dump_in_guest"),
            "dump_files": f.get("dump_files"),
            "makedumpfile_args": f.get("makedump_args"),
            "dump_level": header.get("dump_level"),
            "excluded_pages": header.get("excluded"),
            "crash_kernel_loaded_e1000e": f.get("crash_kernel_loaded_e1000e"),
        })
        rep["dump_filter"] = self.filter_report
        rep["phase_seconds"] = self.phase_seconds()
        rep["files"]["dmesg_panicked"] = "dmesg-panicked.txt"
        return rep


# -- pieces without QEMU ----------------------------------------------------------------

def crash_append_for(scenario: Scenario) -> str | None:
    """The KDUMP_CMDLINE_APPEND this scenario needs, or None when the image's own
    will do (no --crash-append, no --crash-load-driver)."""
    if not scenario.crash_append and not scenario.crash_load_driver:
        return None
    base = KDUMP_DEFAULT_APPEND if scenario.crash_load_driver else f"{KDUMP_DEFAULT_APPEND} {NO_NIC_DRIVER}"
    return " ".join([base, *scenario.crash_append])


def old_memory_ranges(ram: list[tuple[int, int, int]], crash) -> list[tuple[int, int, int]]:
    """(file_offset, phys, length) of guest RAM outside the crashkernel= reservation:
    old memory, which the crash kernel does not write."""
    if not crash:
        return list(ram)
    start, end = crash[0], crash[1] + 1
    out = []
    for off, phys, length in ram:
        lo, hi = phys, phys + length
        if hi <= start or lo >= end:
            out.append((off, phys, length))
            continue
        if lo < start:
            out.append((off, lo, start - lo))
        if hi > end:
            out.append((off + end - phys, end, hi - end))
    return out


def filter_summary(header: dict | None, hidden: dict, rep: dict, source: str) -> dict:
    """What the dump's filter left out, what that hid in this run, and the sentence
    the verdict gets. `hidden` is DistroRun.hidden_by_filter's result."""
    level = header.get("dump_level") if header else None
    excluded = header.get("excluded", []) if header else []
    hits = hidden.get("hits", [])
    transfers = sorted({h.seq for h in hits})
    not_in_dump = hidden.get("canaries_not_in_dump", [])
    in_ram = hidden.get("canaries_in_ram", {})
    changed_hidden = [i for i in not_in_dump if in_ram.get(i) == "changed"]
    misdirected_hidden = [m for m in rep.get("misdirected", []) if m.get("view", "").startswith("host-ram, not")]
    lines = []
    if level is None:
        lines.append("dump filter: unknown (the dump is not kdump-compressed)")
    else:
        names = {name: what for _, name, what in DUMP_LEVEL_CLASSES}
        lines.append(f"dump filter: makedumpfile dump level {level} excluded "
                     f"{', '.join(names[e] for e in excluded) or 'nothing'}")
    if hidden.get("ram_records") is not None:
        lines.append(f"DMA marker records in old memory: {hidden['ram_records']} in the host's RAM view, "
                     f"{hidden['dump_records']} in the dump; {len(hits)} records of {len(transfers)} transfers "
                     f"only in RAM (in pages the filter left out)")
    if not_in_dump:
        lines.append(f"canary pages not in the dump: {len(not_in_dump)} of {rep.get('canaries', {}).get('count')} "
                     f"(user pages); in the host's RAM view: "
                     f"{sum(1 for i in not_in_dump if in_ram.get(i) == 'intact')} intact, {len(changed_hidden)} "
                     f"changed")
    could_hide = []
    if "free" in excluded and source == "nic":
        could_hide.append("DMA into receive buffers the stack had freed (free pages)")
    if "free" in excluded:
        could_hide.append("misdirected DMA that landed on free pages")
    if "user" in excluded:
        could_hide.append("DMA onto user pages (the canaries)")
    if could_hide:
        lines.append("this dump cannot show " + "; ".join(could_hide))
    note = None
    if misdirected_hidden or changed_hidden:
        note = (f"only the host's RAM view shows {len(misdirected_hidden)} misdirected records and "
                f"{len(changed_hidden)} changed canaries: the distro's dump filter (-d {level}) hid this corruption")
    elif hits or not_in_dump:
        what = [f"{len(hits)} DMA marker records ({len(transfers)} transfers)"] if hits else []
        what += [f"{len(not_in_dump)} canary pages"] if not_in_dump else []
        note = (f"the distro's dump filter (-d {level}) left out {' and '.join(what)} that the host's RAM view "
                f"holds: judged from there, the dump alone could not show DMA into them")
    elif could_hide:
        note = f"the dump's filter (-d {level}) could hide DMA into {' and '.join(excluded)} pages"
    return {"dump_level": level, "excluded": excluded, "records_only_in_ram": len(hits),
            "transfers_only_in_ram": len(transfers), "ram_records": hidden.get("ram_records"),
            "dump_records": hidden.get("dump_records"), "canaries_not_in_dump": not_in_dump,
            "canaries_in_ram": {str(k): v for k, v in in_ram.items()},
            "misdirected_only_in_ram": len(misdirected_hidden), "could_hide": could_hide,
            "lines": lines, "verdict_note": note}


class NoDump(HarnessError):
    """The disk image holds no dump where kdump-tools puts it."""


@dataclass
class ExtractedDump:
    vmcore: Path
    facts: dict


def extract_dump(disk: Path, outdir: Path, saved_dir: str | None, deadline: Deadline,
                 crash_dir: str = "/var/crash") -> ExtractedDump:
    """The dump kdump-tools saved, read off an ext4 disk image without mounting it:
    e2fsck replays the journal (the crash kernel rebooted with `reboot -f`), debugfs
    lists /var/crash/<stamp>/ and copies dump.<stamp> (and the dmesg file) out. A
    flattened dump (makedumpfile -F, what kdump-tools writes) is reassembled into
    `outdir`/vmcore.kdump. `saved_dir` is the directory the console named, if any."""
    image = str(disk)
    facts: dict = {}
    out = _run_host(["e2fsck", "-y", "-E", "journal_only", image], "e2fsck (journal replay)", deadline, ok=(0, 1))
    facts["e2fsck"] = out.strip().splitlines()[-1:] if out.strip() else []
    stamps = sorted(n for n, is_dir in parse_debugfs_ls(_debugfs(image, f"ls -p {crash_dir}", deadline))
                    if is_dir and n[:1].isdigit())
    if saved_dir and Path(saved_dir).name not in stamps:
        raise NoDump(f"{saved_dir} is not on the disk ({crash_dir} holds {', '.join(stamps) or 'nothing'})")
    if not stamps:
        raise NoDump(f"no dump directory in {crash_dir} on the disk")
    where = f"{crash_dir}/{Path(saved_dir).name if saved_dir else stamps[-1]}"
    entries = parse_debugfs_ls(_debugfs(image, f"ls -p {where}", deadline))
    facts["dump_files"] = sorted(n for n, is_dir in entries if not is_dir)
    name = pick_dump(entries)
    if name is None:
        raise NoDump(f"{where} on the disk has no dump file ({', '.join(facts['dump_files']) or 'empty'})")
    facts["dump_in_guest"] = f"{where}/{name}"
    raw = outdir / f"guest-{name}"
    _debugfs(image, f"dump -p {where}/{name} {raw}", deadline)
    for n in facts["dump_files"]:
        if n.startswith("dmesg."):
            _debugfs(image, f"dump -p {where}/{n} {outdir / 'dmesg-panicked.txt'}", deadline)
    if not raw.exists() or raw.stat().st_size == 0:
        raw.unlink(missing_ok=True)
        raise NoDump(f"{where}/{name} could not be read off the disk, or is empty")
    facts["dump_file_size"] = raw.stat().st_size
    facts["dump_flattened"] = is_flattened(raw)
    if facts["dump_flattened"]:
        vmcore = outdir / "vmcore.kdump"
        reassemble_flattened(raw, vmcore)
        raw.unlink()
    else:
        vmcore = outdir / ("vmcore.kdump" if detect_format(raw) == "kdump-compressed" else "vmcore")
        os.replace(raw, vmcore)
    return ExtractedDump(vmcore, facts)


def _run_host(argv: list[str], what: str, deadline: Deadline, ok: tuple[int, ...] = (0,)) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=max(1.0, deadline.remaining()))
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found: {what} needs it (apt-get install e2fsprogs)") from None
    except subprocess.TimeoutExpired:
        raise deadline.exceeded(what) from None
    if r.returncode not in ok:
        err = (r.stderr or r.stdout).strip().splitlines()
        raise HostError(f"{what} failed (status {r.returncode}): {' '.join(argv)}: {err[-1] if err else ''}")
    return r.stdout


def _debugfs(image: str, request: str, deadline: Deadline) -> str:
    """debugfs on an ext4 image file, read-only, no mount."""
    out = _run_host(["debugfs", "-R", request, image], f"debugfs {request.split()[0]}", deadline)
    return out
