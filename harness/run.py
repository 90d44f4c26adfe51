"""The kdump cycle, phase by phase, ending in a verdict.

    prepare  resolve the kernel, check its config, build the initramfs images
    boot     start QEMU, wait for the first kernel's userspace
    arm      kexec -p loaded the crash kernel (reported by the guest)
    panic    QMP inject-nmi (unknown_nmi_panic) or send-key sysrq-c
    crash    follow the console into the crash kernel, then its userspace
    capture  the crash kernel copies /proc/vmcore to the dump disk, powers off
    collect  the host turns the dump disk into the run's vmcore
    analyze  console facts (IOMMU tables copied? faults?), then the verdict

Every phase has a deadline (scaled by KDUMP_HARNESS_TIMEOUT_SCALE). Whatever
happens, QEMU is reaped and `report.json` is written with what is known.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import __version__, markers
from .accel import AccelChoice, choose_accel_for
from .arch import Arch, arch_info
from .dma import DmaSource, make_source
from .deadline import Deadline
from .errors import DeadlineExceeded, HarnessError, HostError, MachineExited, UsageError
from .initramfs import builder_for, with_settings
from .kernels import Kernel, check_config, resolve_kernel
from .machine import Drive, Machine, MachineSpec, shell_command
from .platforms import iommu_model, kdump_config_needed
from .scenario import Scenario
from .verdict import Outcome, Verdict

log = logging.getLogger(__name__)

REPORT_VERSION = 1

# Phase budgets in seconds, for TCG on a slow 2-core host; scaled everywhere by
# KDUMP_HARNESS_TIMEOUT_SCALE.
BUDGET = {
    "boot": 180.0,       # QEMU start -> first kernel userspace
    "arm": 60.0,         # userspace -> kexec -p done
    "panic": 60.0,       # NMI -> the crash kernel's "Linux version" banner
    "crash": 90.0,       # banner -> crash kernel userspace
    "capture_base": 120.0,  # plus capture_per_gib per GiB of guest RAM
    "capture_per_gib": 240.0,
    "poweroff": 30.0,
}

PANIC_RE = r"Kernel panic - not syncing"
# A kernel's first line. A panic in NMI context often prints nothing before the
# crash kernel starts (the console is flushed later, if ever), so the crash
# kernel is recognised by its banner, not by the old kernel's panic message.
# The banner may follow a shell prompt on the same line.
BANNER_RE = r"(?m)\[ *0\.0+\] Linux version \d|^Linux version \d"


class Stop(Exception):
    """A phase ended the run with a verdict about the kernel under test."""

    def __init__(self, verdict: Verdict, reason: str, evidence: list[str] | None = None):
        super().__init__(reason)
        self.outcome = Outcome(verdict, reason, evidence or [])


ProgressFn = Callable[[str, str, str], None]


def _quiet(phase: str, status: str, detail: str) -> None:
    log.info("%s: %s %s", phase, status, detail)


def split_console(text: str) -> tuple[str, str]:
    """(first kernel, crash kernel) parts of one console log: the crash kernel
    starts at the second kernel banner."""
    banners = list(re.finditer(BANNER_RE, text))
    if len(banners) < 2:
        return text, ""
    cut = banners[1].start()
    return text[:cut], text[cut:]


def parse_iomem(lines: list[str]) -> list[dict]:
    """/proc/iomem lines -> [{start, end, name, depth}]."""
    out = []
    for line in lines:
        m = re.match(r"^( *)([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
        if m:
            out.append({"start": int(m.group(2), 16), "end": int(m.group(3), 16),
                        "name": m.group(4).strip(), "depth": len(m.group(1)) // 2})
    return out


@dataclass
class RunState:
    """What a run has learned so far; becomes report.json."""

    timings: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)   # phase boundaries, seconds since start
    facts: dict = field(default_factory=dict)


ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class RunBase:
    """What every kind of run shares (`KdumpRun` here, `distro.DistroRun` for the
    Debian guest): the clock and its marks, phases with timings, the console
    log split into first and crash kernel, the host's view of the crash
    kernel's reservation, and the end of a run (report.json, report.html)."""

    def _init_common(self, scenario: Scenario, outdir: Path | str, accel: str, progress: ProgressFn | None) -> None:
        self.scenario = scenario
        self.arch: Arch = arch_info(scenario.arch)
        self.outdir = Path(outdir).resolve()
        self.accel_request = accel
        self.progress = progress or _quiet
        self.state = RunState()
        self.kernel: Kernel | None = None
        self.accel: AccelChoice | None = None
        self.machine: Machine | None = None
        self.outcome: Outcome | None = None
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # QEMU's trace timestamps are wall-clock
        self.nonce = markers.new_nonce()
        self.scratch: Path | None = None
        self.ram_file: Path | None = None
        self.region = None  # analysis.RegionSnapshot
        self.analysis_report: dict | None = None
        self.vmcore: Path | None = None
        self.first_console = ""
        self.crash_console = ""

    # -- clock, phases ------------------------------------------------------------------

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def mark(self, name: str) -> None:
        self.state.marks[name] = self.now()

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        self.progress(name, "start", detail)
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.state.timings[name] = round(time.monotonic() - start, 3)
            self.progress(name, "done" if ok else "failed", f"{self.state.timings[name]:.1f} s")

    @property
    def iommu(self):
        return iommu_model(self.scenario.iommu)

    def _check_qemu(self) -> None:
        """QEMU exited: if QEMU itself failed, that is not the kernel's doing."""
        failure = self.machine.failure() if self.machine is not None else None
        if failure:
            raise HostError(failure)

    def snapshot_region(self) -> None:
        """Read the crash kernel's reservation from the host's RAM view, now: after
        the last DMA, before the crash kernel copies old memory through its own."""
        from .analysis import snapshot_crash_region

        crash = self.state.facts.get("crash_kernel_range")
        if self.scenario.handover == "kexec":
            crash = (0, 2 ** 64 - 1)  # after a plain kexec all of RAM is the second kernel's
        if self.region is None and crash and self.ram_file is not None and self.ram_file.exists():
            self.region = snapshot_crash_region(self.ram_file, self.scenario.memory_mb, crash, self.nonce, self.now(),
                                                self.arch.name)

    # -- the console ---------------------------------------------------------------------

    def console_facts(self) -> None:
        """What the crash kernel's console says about its IOMMU (known even for a hung run)."""
        self._split_consoles()
        crash, facts = self.crash_console, self.state.facts
        facts["iommu_copied"] = self.iommu.copied(crash) if self.iommu.present and crash else None
        facts["iommu_disabled"] = self.iommu.disabled(crash) if crash else None
        facts["iommu_faults"] = self.iommu.faults(crash) if crash else None

    def _console_bytes(self) -> bytes:
        try:
            return self.machine.console_log.read_bytes()
        except (OSError, AttributeError):
            return b""

    def _console_text(self) -> str:
        return self._console_bytes().decode("utf-8", "replace").replace("\r\n", "\n")

    def _split_consoles(self) -> None:
        self.first_console, self.crash_console = split_console(self._console_text())

    def _console_tail(self, n: int = 12) -> list[str]:
        # systemd colours its status lines: keep the words
        lines = [ANSI_RE.sub("", l) for l in self._console_text().splitlines()]
        lines = [l for l in lines if l.strip()]
        return [f"console: {l[-200:]}" for l in lines[-n:]]

    # -- the whole run --------------------------------------------------------------------

    def execute(self) -> Outcome:
        try:
            self.prepare()
            self.boot()
            self.start_dma()
            self.panic()
            self.follow_crash()
            self.collect()
            self.outcome = self.analyze()
        except Stop as s:
            self.outcome = self.postmortem(s.outcome)
        except UsageError:
            raise
        except HarnessError as e:
            self.outcome = Outcome(Verdict.ERROR, str(e), self._console_tail())
        except KeyboardInterrupt:
            self.outcome = Outcome(Verdict.ERROR, "interrupted (Ctrl-C)", self._console_tail())
            raise
        finally:
            self.finish()
        return self.outcome

    def postmortem(self, outcome: Outcome) -> Outcome:
        """A Stop's outcome, reconsidered (KdumpRun: was in-flight DMA the cause?)."""
        return outcome

    def report(self) -> dict:
        """report.json (docs/report.md): what every kind of run reports; subclasses add theirs."""
        f = self.state.facts
        o = self.outcome or Outcome(Verdict.ERROR, "the run did not finish")
        return {
            "report_version": REPORT_VERSION,
            "harness_version": __version__,
            "scenario": self.scenario.to_json(),
            "arch": self.arch.name,
            "verdict": o.verdict.value,
            "reason": o.reason,
            "evidence": o.evidence,
            "expected": self.scenario.expect,
            "accel": self.accel.accel if self.accel else None,
            "accel_reason": self.accel.reason if self.accel else None,
            "kernel": {**(self.kernel.to_json() if self.kernel else {}), "release": f.get("release") or
                       (self.kernel.release if self.kernel else None)},
            "kdump": {
                "captured": self.vmcore is not None,
                "vmcore": str(self.vmcore) if self.vmcore else None,
                "format": f.get("vmcore_format"),
                "size": self.vmcore.stat().st_size if self.vmcore and self.vmcore.exists() else None,
                "crash_kernel_range": f.get("crash_kernel_range"),
            },
            "iommu": {
                "type": self.scenario.iommu,
                "crash_kernel_copied_tables": f.get("iommu_copied"),
                "crash_kernel_disabled": f.get("iommu_disabled"),
                "faults": f.get("iommu_faults"),
                **({"smmu": f["smmu"]} if "smmu" in f else {}),
            },
            "memory_map": f.get("iomem", []),
            "dma": self.analysis_report or {"source": self.scenario.dma, "nonce": f"0x{self.nonce:016x}"},
            "timings_s": self.state.timings,
            "marks_s": self.state.marks,
            "files": {
                "console_first": "console-first.log",
                "console_crash": "console-crash.log",
                "console": "guest.console.log",
                "qemu_log": "guest.qemu.log",
                "qemu_cmdline": "qemu-cmdline.txt",
            },
            "qemu_argv": self.machine.argv if self.machine else None,
        }

    def write_outputs(self) -> None:
        """The split consoles, report.json and report.html, into outdir (if it exists)."""
        if not self.outdir.is_dir():
            return
        (self.outdir / "console-first.log").write_text(self.first_console)
        (self.outdir / "console-crash.log").write_text(self.crash_console)
        report = self.report()
        write_json(self.outdir / "report.json", report)
        try:
            from .report_html import write_run_html
            write_run_html(report, self.outdir)
        except Exception as e:  # a picture must never cost the run its report.json
            log.warning("report.html not written: %s", e)


class KdumpRun(RunBase):

    """One scenario, run once, into `outdir`.

    `execute()` does everything. The pieces (`prepare`, `boot`, `panic`,
    `follow_crash`, `collect`, `analyze`) let a pytest fixture stop after `boot`
    with a kdump-armed machine and let a test trigger the panic itself.
    """

    def __init__(self, scenario: Scenario, outdir: Path | str, *, accel: str = "auto",
                 progress: ProgressFn | None = None, pause: str | None = None,
                 on_pause: Callable[["KdumpRun", str], None] | None = None, keep_ram: bool = False):
        self._init_common(scenario, outdir, accel, progress)
        self.dma: DmaSource = make_source(scenario.dma, **({"load_in_crash": scenario.crash_load_driver}
                                                            if scenario.dma == "nic" else {}))
        self.dma.attach(self)
        self.keep_ram = keep_ram
        self.pause_phase = pause          # --interactive: first-boot, armed or crash
        self.on_pause = on_pause          # called with (run, phase) when the guest pauses
        self.pause_mark = 0
        self.crash_events_from = 0

    @property
    def qtest(self):
        return self.machine.qtest if self.machine else None

    # -- phases ------------------------------------------------------------------------

    def check_inputs(self) -> Kernel:
        """Resolve the kernel and check its config: bad input fails here, before
        anything is written or started."""
        if self.kernel is None:
            s = self.scenario
            kernel = resolve_kernel(s.kernel, s.modules, s.kernel_config, arch=self.arch.name)
            check_config(kernel, kdump_config_needed(self.arch.name, s.iommu))
            self.kernel = kernel
        return self.kernel

    def prepare(self, dry_run: bool = False) -> None:
        """Everything before QEMU starts. `dry_run`: no KVM probe (--show-command)."""
        detail = self.scenario.kernel + ("" if self.arch.name == "x86_64" else f" ({self.arch.name})")
        with self.phase("prepare", detail):
            self.check_inputs()
            self.outdir.mkdir(parents=True, exist_ok=True)
            base = builder_for(self.kernel).build("first")
            self.initrd = with_settings(base, {"etc/kh/run.env": self.run_env().encode()},
                                        self.outdir / "initrd.img")
            self.dump_disk = self.outdir / "dump.img"
            with open(self.dump_disk, "wb") as f:  # sparse: only what the crash kernel writes takes space
                f.truncate((self.scenario.memory_mb + 256) << 20)
            self.accel = choose_accel_for(self.arch.name, self.accel_request, self.kernel.image, probe=not dry_run)
            # DMA sockets; guest RAM shared with the host (tmpfs when there is one)
            self.scratch = Path(tempfile.mkdtemp(prefix="kh-run-"))
            shm = Path("/dev/shm")
            self.ram_file = Path(tempfile.mktemp(prefix="kh-ram-", dir=shm if shm.is_dir() else self.scratch))
            self.spec = self.machine_spec()

    def run_env(self) -> str:
        s = self.scenario
        env = {
            "KH_CRASH_APPEND": " ".join(self.crash_cmdline()),
            "KH_DUMP_FORMAT": s.dump_format,
            "KH_HANDOVER": s.handover,
            "KH_FIRST_LOAD": "",
            "KH_CRASH_LOAD": "",
            "KH_PAUSE": self.pause_phase or "",
            "KH_NONCE": f"0x{self.nonce:016x}",
            "KH_CANARIES": str(s.canaries),
            "KH_HOLD": "1",  # the crash kernel waits for "go": the host reads its memory first
        }
        env.update(self.dma.guest_env())
        # a modular IOMMU driver is loaded before any other module (lib.sh load_boot_modules)
        env["KH_IOMMU_LOAD"] = " ".join(self.iommu.modules)
        env["KH_CRASH_IOMMU_LOAD"] = " ".join(self.iommu.modules) if s.crash_iommu_driver else ""
        from shlex import quote
        return "".join(f"{k}={quote(v)}\n" for k, v in env.items())

    def machine_spec(self) -> MachineSpec:
        s = self.scenario
        return MachineSpec(
            name="guest", arch=self.arch.name, kernel=self.kernel.image, initrd=self.initrd,
            append=s.first_cmdline() + self.dma.first_append(),
            accel=self.accel.accel, memory_mb=s.memory_mb, iommu=s.iommu, iommu_options=s.iommu_options,
            drives=(Drive("dump", self.dump_disk, "khdump"),),
            netdevs=self.dma.netdevs(self.scratch) if self.scratch else (),
            devices=self.dma.devices(), qtest=self.dma.needs_qtest,
            ram_file=self.ram_file, trace_events=self.iommu.trace_events,
        )

    def boot(self) -> Machine:
        """Start QEMU, wait until kdump is armed and the guest is ready for the panic."""
        self.machine = Machine(self.spec, self.outdir)
        with self.phase("boot", f"{self.accel.accel}, {self.scenario.memory_mb} MiB"):
            try:
                self.machine.launch()
            finally:
                self.write_rerun()
            self.mark("qemu_started")
            ev = self._wait_event(("boot",), Deadline(BUDGET["boot"], "the first kernel's userspace"),
                                  Verdict.FIRST_BOOT_FAILED)
            self.mark("first_userspace")
            self.state.facts["release"] = ev.fields.get("release")
        with self.phase("arm"):
            ev = self._wait_event(("armed",), Deadline(BUDGET["arm"], "kexec -p to load the crash kernel"),
                                  Verdict.FIRST_BOOT_FAILED)
            if ev.fields.get("rc") != "0" or ev.fields.get("loaded") == "0":
                raise Stop(Verdict.FIRST_BOOT_FAILED, f"kexec -p failed (rc={ev.fields.get('rc')})",
                           self._console_tail())
            iomem = [e.raw[len("iomem "):] for e in self.machine.events.all("iomem")]
            self.state.facts["iomem"] = parse_iomem(iomem)
            crash = [r for r in self.state.facts["iomem"] if r["name"] == "Crash kernel"]
            self.state.facts["crash_kernel_range"] = [crash[0]["start"], crash[0]["end"]] if crash else None
            self._wait_event(("ready",), Deadline(BUDGET["arm"], "the guest to be ready for the panic"),
                             Verdict.FIRST_BOOT_FAILED)
            self.mark("armed")
            self.state.facts["canaries"] = [(e.int("index"), e.int("phys")) for e in self.machine.events.all("canary")]
        return self.machine

    def start_dma(self) -> None:
        """Start the DMA source and let it run in the first kernel for a while."""
        if self.dma.name == "none":
            return
        with self.phase("dma", self.dma.name):
            self.dma.start()
            self.mark("dma_started")
            self.dma.pre_panic()

    def panic(self) -> None:
        """End the first kernel: a panic (kdump), or a plain `kexec -e` (handover kexec)."""
        m = self.machine
        kexec = self.scenario.handover == "kexec"
        with self.phase("panic", "kexec -e" if kexec else self.scenario.panic_method):
            m.console.skip_pending()
            self.crash_events_from = m.events.position()
            if kexec:
                m.events.send("kexec")
                ev = self._wait_event(("handover", "handover-failed"),
                                      Deadline(BUDGET["arm"], "the first kernel to run kexec -e"), Verdict.NO_KDUMP)
                if ev.name != "handover":
                    raise Stop(Verdict.NO_KDUMP, f"kexec -e failed ({ev.raw})", self._console_tail())
                self.mark("panic")  # the old kernel is gone from here on, as after a panic
            else:
                self.mark("panic")
                cmd, args = self.arch.panic_qmp(self.scenario.panic_method)
                m.qmp.cmd(cmd, **args)
            deadline = Deadline(BUDGET["panic"], f"the {self.next_kernel}'s banner")
            self.dma.on_phase("during_kexec")
            try:
                m.console.expect_within([BANNER_RE], deadline)
            except MachineExited:
                self._check_qemu()
                raise Stop(Verdict.NO_KDUMP, f"QEMU exited after the {'kexec' if kexec else 'panic'}: the kernel "
                                             f"rebooted instead of starting the {self.next_kernel}",
                           self._console_tail()) from None
            except DeadlineExceeded as e:
                raise Stop(Verdict.NO_KDUMP, f"{e}", self._console_tail()) from None
            self.mark("crash_kernel_start")
            self.dma.on_phase("crash_early")

    def crash_cmdline(self) -> tuple[str, ...]:
        """The next kernel's command line as run: the scenario's, plus what the DMA source needs."""
        return self.scenario.crash_cmdline() + self.dma.crash_append()

    @property
    def next_kernel(self) -> str:
        return "second kernel" if self.scenario.handover == "kexec" else "crash kernel"

    def follow_crash(self) -> None:
        m = self.machine
        with self.phase("crash", "crash kernel boot"):
            self._wait_crash(("boot",), Deadline(BUDGET["crash"], f"the {self.next_kernel}'s userspace"))
            self.mark("crash_userspace")
            self._wait_crash(("crash-ready",), Deadline(BUDGET["crash"], f"the {self.next_kernel} to load its modules"))
            self.dma.on_phase("crash_userspace")
            self.dma.stop()
            self.mark("dma_stopped")
            self.snapshot_region()
            m.events.send("go")
        if self.scenario.handover == "kexec":
            # nothing to dump: the second kernel is checked through the host's view of its memory
            self._wait_crash(("second-done",), Deadline(BUDGET["crash"], "the second kernel to finish"))
            if m.wait_exit(Deadline(BUDGET["poweroff"], "the second kernel to power off")) is None:
                log.warning("the second kernel did not power off; stopping QEMU")
            self.mark("crash_kernel_exit")
            return
        gib = max(1.0, self.scenario.memory_mb / 1024)
        with self.phase("capture", self.scenario.dump_format):
            start = self._wait_crash(("capture-start",), Deadline(BUDGET["crash"], "the dump to start"))
            self.state.facts["vmcore_size"] = start.int("vmcore_size")
            ev = self._wait_crash(("captured",), Deadline(BUDGET["capture_base"] + gib * BUDGET["capture_per_gib"],
                                                           "/proc/vmcore to be written to the dump disk"))
            self.mark("captured")
            self.state.facts["capture_rc"] = ev.int("rc")
            if m.wait_exit(Deadline(BUDGET["poweroff"], "the crash kernel to power off")) is None:
                log.warning("the crash kernel did not power off; stopping QEMU")
            self.mark("crash_kernel_exit")

    def collect(self) -> None:
        with self.phase("collect"):
            self.machine.shutdown()
            self._split_consoles()
            if self.scenario.handover == "kexec":
                return  # no vmcore after a plain kexec
            rc = self.state.facts.get("capture_rc")
            size = self.state.facts.get("vmcore_size") or 0
            if rc != 0:
                raise Stop(Verdict.KDUMP_HANG if rc is None else Verdict.NO_VMCORE,
                           f"the crash kernel failed to write the vmcore (rc={rc})", self._console_tail())
            if self.scenario.dump_format == "elf":
                vmcore = self.outdir / "vmcore"
                os.truncate(self.dump_disk, size)
                os.replace(self.dump_disk, vmcore)
            else:
                vmcore = self.outdir / "vmcore.kdump"
                from .dumpfile import reassemble_flattened
                reassemble_flattened(self.dump_disk, vmcore)
                self.dump_disk.unlink()
            self.vmcore = vmcore
            self.state.facts["vmcore_format"] = detect_format(vmcore)

    def analyze(self) -> Outcome:
        with self.phase("analyze"):
            self.console_facts()  # also marks when the crash kernel's IOMMU driver was done
            facts = self.state.facts
            if self.scenario.handover == "kexec":
                return self.dma_outcome(["plain kexec handover: no vmcore; the host read the second kernel's "
                                         "memory when it reached its userspace"])
            if facts.get("vmcore_format") not in ("elf64", "kdump-compressed"):
                return Outcome(Verdict.KDUMP_PANIC, "the vmcore is not a readable dump",
                               [f"{self.vmcore}: format {facts.get('vmcore_format')}"])
            evidence = [f"vmcore {self.vmcore.name}: {facts['vmcore_format']}, {self.vmcore.stat().st_size} bytes"]
            if self.iommu.present:
                evidence.append(f"crash kernel copied the old IOMMU tables: {facts['iommu_copied']}; "
                                f"faults logged: {facts['iommu_faults']}")
            return self.dma_outcome(evidence)

    def dma_outcome(self, evidence: list[str]) -> Outcome:
        """The verdict from the DMA analysis, PASS when nothing stands against it."""
        dma_outcome = self.analyze_dma()
        if dma_outcome is not None:
            return dma_outcome
        rep = self.analysis_report
        evidence.append(f"{rep['source']}: sent {rep['sent']} ({rep['sent_after_panic']} after the panic), "
                        f"seen {rep['seen']}, records landed {rep['landed']}, after the panic "
                        f"{rep['landed_after_panic']}; IOMMU faults after the panic: {rep['faulted']}; "
                        f"canaries intact {rep['canaries']['intact']}/{rep['canaries']['count']}")
        what = "the second kernel came up" if self.scenario.handover == "kexec" else "vmcore captured"
        return Outcome(Verdict.PASS, f"{what}; nothing wrong found", evidence)

    def analyze_dma(self) -> Outcome | None:
        """Markers in the vmcore and the host's RAM view, IOMMU ground truth, canaries."""
        from .analysis import analyze_dma, dma_report, dma_verdict
        from .groundtruth import parse_trace

        panic_t = self.state.marks.get("panic")
        gt = None
        if self.scenario.iommu == "smmuv3":
            from .smmu_trace import parse_smmuv3_trace
            gt, smmu = parse_smmuv3_trace(self.machine.trace_log, self.wall0, panic_t)
            self.state.facts["smmu"] = smmu.to_json(panic_t)   # what the crash kernel did with the SMMU
        elif self.iommu.device:
            gt = parse_trace(self.machine.trace_log, self.scenario.iommu, self.wall0, panic_t)
        kexec = self.scenario.handover == "kexec"
        an = analyze_dma(source=self.dma, nonce=self.nonce, vmcore=self.vmcore, region=self.region,
                         crash_range=None if kexec else self.state.facts.get("crash_kernel_range"),
                         panic_t=panic_t, gt=gt, handover_t=panic_t if kexec else None,
                         # after a plain kexec the first kernel's canary pages are the second kernel's to reuse
                         canary_pages=[] if kexec else self.state.facts.get("canaries", []))
        if gt is not None and "crash_iommu_init" not in self.state.marks and gt.translation_off_t is not None \
                and gt.translation_off_t < self.state.marks.get("captured", float("inf")):
            self.state.marks["crash_iommu_init"] = round(gt.translation_off_t, 3)  # it switched translation off
        self.analysis_report = dma_report(an, self.dma, gt, self.state.marks)
        return dma_verdict(an, self.dma, self.analysis_report, gt)

    # -- waiting -------------------------------------------------------------------------

    def _wait(self, names, deadline: Deadline, since: int = 0):
        """Wait for one of `names`; a pause (--interactive) in between hands the
        guest to the person and restarts the deadline when they give it back."""
        while True:
            ev = self.machine.events.wait_for(tuple(names) + ("paused",), deadline, self.machine.alive, since=since)
            if ev.name != "paused":
                return ev
            since = self.machine.events.position()
            self.pause_mark = since
            if self.on_pause is not None:
                self.on_pause(self, ev.fields.get("phase", "?"))
            self.machine.events.wait_for(("resumed",), Deadline(24 * 3600, "the person to leave the guest shell"),
                                         self.machine.alive, since=since)
            deadline = Deadline(deadline.seconds, deadline.what, scale=1)

    def _wait_event(self, names, deadline: Deadline, verdict: Verdict):
        try:
            return self._wait(names, deadline)
        except MachineExited:
            self._check_qemu()
            raise Stop(verdict, f"QEMU exited while waiting for {deadline.what}", self._console_tail()) from None
        except DeadlineExceeded as e:
            raise Stop(verdict, str(e), self._console_tail()) from None

    def _wait_crash(self, names, deadline: Deadline):
        """Wait in the crash kernel: an exit means it panicked (panic=-1 reboots, and
        QEMU runs with -no-reboot); a deadline means it hung."""
        try:
            return self._wait(names, deadline, since=self.crash_events_from)
        except MachineExited:
            self._check_qemu()
            self._split_consoles()
            if re.search(PANIC_RE, self.crash_console):
                raise Stop(Verdict.KDUMP_PANIC, f"the {self.next_kernel} panicked before {deadline.what}",
                           self._console_tail()) from None
            if "kdump-harness: crash kernel userspace" in self.crash_console:
                said = [f"console: {l.strip()}" for l in self.crash_console.splitlines()
                        if l.startswith("kdump-harness:")]
                raise Stop(Verdict.NO_VMCORE, f"the crash kernel's userspace ran but powered off without a "
                           f"vmcore (waiting for {deadline.what})", said[-8:] + self._console_tail(4)) from None
            raise Stop(Verdict.KDUMP_PANIC, f"the {self.next_kernel} rebooted before {deadline.what}",
                       self._console_tail()) from None
        except DeadlineExceeded as e:
            self._split_consoles()
            if re.search(PANIC_RE, self.crash_console):
                raise Stop(Verdict.KDUMP_PANIC, f"the {self.next_kernel} panicked ({e})",
                           self._console_tail()) from None
            raise Stop(Verdict.KDUMP_HANG, str(e), self._console_tail()) from None

    def console_facts(self) -> None:
        super().console_facts()
        self._mark_console("crash_iommu_init", self.iommu.init_done_re)

    def _mark_console(self, name: str, pattern: str | None) -> None:
        """Mark when a crash-kernel console line arrived (host time), if it did."""
        if not pattern or name in self.state.marks or self.machine is None or self.machine.console is None:
            return
        raw = self._console_bytes()
        banners = list(re.finditer(BANNER_RE.encode(), raw))
        if len(banners) < 2:
            return
        m = re.search(pattern.encode(), raw[banners[1].start():])
        if m:
            t = self.machine.console.pump.time_of(banners[1].start() + m.start())
            if t is not None:
                self.state.marks[name] = round(t - self.t0, 3)

    # -- the whole run --------------------------------------------------------------------

    def postmortem(self, outcome: Outcome) -> Outcome:
        """The next kernel failed (panicked, hung, saved nothing): was in-flight DMA
        the cause? Read its memory from the host's side, as on a good run, and
        blame corruption first when markers landed where they must not."""
        if outcome.verdict not in (Verdict.NO_KDUMP, Verdict.KDUMP_PANIC, Verdict.KDUMP_HANG, Verdict.NO_VMCORE) \
                or self.dma.name == "none" or "panic" not in self.state.marks:
            return outcome
        try:
            self.dma.stop()
            if self.machine is not None:
                self.machine.shutdown(graceful=False)
            # once the crash kernel copies /proc/vmcore its own memory holds copies of old memory
            if self.region is None and self.machine.events.find("capture-start", self.crash_events_from) is None:
                self.snapshot_region()
            dma = self.analyze_dma()
        except Exception as e:  # a failed post-mortem must not hide the verdict it explains
            log.warning("post-mortem DMA analysis failed: %s", e)
            return outcome
        if dma is not None and dma.verdict == Verdict.CORRUPTION:
            return Outcome(Verdict.CORRUPTION, f"{dma.reason}; then {outcome.reason}",
                           dma.evidence + outcome.evidence[-6:])
        return outcome

    def finish(self) -> None:
        """Reap QEMU, keep every log, write report.json. Safe to call twice."""
        self.dma.close()
        if self.machine is not None:
            self.machine.shutdown(graceful=False)
            self.console_facts()
        if self.ram_file is not None and self.ram_file.exists():
            if self.keep_ram and self.outdir.is_dir():
                shutil.move(str(self.ram_file), self.outdir / "guest-ram.raw")
            else:
                self.ram_file.unlink()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self.state.timings["total"] = self.now()
        self.write_outputs()

    def write_rerun(self) -> None:
        if not self.machine or not self.machine.argv:
            return
        (self.outdir / "qemu-cmdline.txt").write_text(shell_command(self.machine.argv) + "\n")
        from .rerun import write_rerun_script
        write_rerun_script(self)

    def report(self) -> dict:
        rep = super().report()
        rep["kdump"].update(crash_cmdline=" ".join(self.crash_cmdline()), handover=self.scenario.handover)
        rep["files"]["results"] = "guest.results.log"
        return rep


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"\x7fELF" and head[4:5] == b"\x02":
        return "elf64"
    if head == b"KDUMP   ":
        return "kdump-compressed"
    return "unknown" if head else "empty"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
