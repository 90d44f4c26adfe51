"""The kdump cycle on a guest architecture other than the host's (arm64 on x86).

The pieces the run needs, per architecture (harness.arch says what differs):

    kernel      kernels.resolve_kernel(spec, ..., arch="aarch64")     Debian's arm64 package
    config      kdump_config_needed(arch, iommu)                      PL011 console, ARM_SMMU_V3
    initramfs   initramfs_builder(kernel)                              arm64 busybox/kexec/makedumpfile
                                                                       from Debian, khdma cross-compiled
    accel       choose_accel_for(arch, requested, image)               TCG unless the host is arm64
    machine     MachineSpec(..., arch="aarch64")                       virt, -cpu max, ttyAMA0, keyboard
    panic       panic_command(arch, method) -> QMP command             send-key alt+sysrq+c
    host RAM    region_ranges(arch, memory_mb, crash_range)            virt's RAM starts at 1 GiB

`ArchKdumpRun` is `run.KdumpRun` with those wired in (what tests/integration/
test_arm64.py drives); `KdumpRun` itself can take them over one by one.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
from pathlib import Path

from .accel import AccelChoice, choose_accel
from .arch import Arch, arch_info
from .errors import UsageError
from .guest_helpers import build_all
from .initramfs import RECIPE_DIR, Builder, with_settings
from .kernels import Kernel, check_config, resolve_kernel
from .machine import MachineSpec
from .platforms import KDUMP_CONFIG_NEEDED, iommu_model
from .run import KdumpRun


def initramfs_builder(kernel: Kernel, recipe_dir: Path = RECIPE_DIR) -> Builder:
    """The recipes' builder for `kernel`'s architecture: the host's own programs for
    a host-architecture guest (today's images, byte for byte), else that
    architecture's Debian packages (debroot) and cross-compiled helpers."""
    a = arch_info(kernel.arch)
    helpers = build_all(a.name)
    if a.guest_packages is None:
        return Builder(kernel, recipe_dir, helpers=helpers)
    from .debroot import guest_root
    return Builder(kernel, recipe_dir, helpers=helpers, userland=guest_root(a))


def kdump_config_needed(arch: str, iommu: str) -> tuple[str, ...]:
    a = arch_info(arch)
    return a.kernel_config_needed(KDUMP_CONFIG_NEEDED) + iommu_model(iommu).config_needed


def choose_accel_for(arch: str, requested: str, kernel_image: Path, probe: bool = True) -> AccelChoice:
    """KVM only runs a guest of the host's own architecture."""
    a = arch_info(arch)
    if a.name == "x86_64" and a.native:
        return choose_accel(requested, kernel_image, a.qemu_binary, probe=probe)
    if requested == "kvm":
        why = "on this host" if not a.native else "here yet (no KVM probe for it)"
        raise UsageError(f"--accel kvm: the harness cannot run {a.name} guests under KVM {why}; "
                         f"use --accel auto or tcg")
    return AccelChoice("tcg", f"no KVM for {a.name} guests on this host" if not a.native
                       else f"KVM is not probed for {a.name} guests yet")


def panic_command(arch: str, method: str) -> tuple[str, dict]:
    """(QMP command, arguments) that panic the guest. arm64 has no NMI a guest can be
    told to panic on (QMP inject-nmi: "this feature or command is not currently
    supported" on virt); sysrq-c from a virtio keyboard works."""
    a = arch_info(arch)
    if method not in a.panic_methods:
        raise UsageError(f"--panic {method} does not work on {a.name}; use one of {', '.join(a.panic_methods)}")
    if method == "nmi":
        return "inject-nmi", {}
    return "send-key", {"keys": [{"type": "qcode", "data": k} for k in ("alt", "sysrq", "c")]}


def region_ranges(arch: str, memory_mb: int, crash_range) -> list[tuple[int, int, int]]:
    """(file offset, phys, length) of the RAM backing file that holds `crash_range`."""
    start, end = crash_range
    out = []
    for off, phys, length in arch_info(arch).ram_ranges(memory_mb):
        lo, hi = max(phys, start), min(phys + length, end + 1)
        if lo < hi:
            out.append((off + lo - phys, lo, hi - lo))
    return out


def snapshot_region_arch(arch: str, ram_file: Path, memory_mb: int, crash_range, nonce: int, t: float):
    """analysis.snapshot_crash_region for any architecture's RAM layout."""
    from .analysis import RegionSnapshot
    from .checker import open_dump

    with open_dump(ram_file, raw_ranges=region_ranges(arch, memory_mb, crash_range)) as dump:
        res = dump.scan(nonce, max_markers=1 << 20, allow_unreadable=True)
    return RegionSnapshot(t, list(res.markers), {
        "taken_s": round(t, 3), "bytes": res.bytes_scanned, "seconds": round(res.seconds, 3),
        "markers": res.valid_count, "stale": res.stale_count, "torn": res.torn_count})


class ArchKdumpRun(KdumpRun):
    """`KdumpRun` for a guest of architecture `arch` (default: the scenario's `arch`
    field if it has one, else x86_64)."""

    def __init__(self, scenario, outdir, *, arch: str | None = None, **kw):
        self.arch: Arch = arch_info(arch or getattr(scenario, "arch", "x86_64"))
        self.arch.check_iommu(scenario.iommu)
        if scenario.panic_method not in self.arch.panic_methods:
            scenario = scenario.replace(panic_method=self.arch.panic_methods[0])
        super().__init__(scenario, outdir, **kw)

    def check_inputs(self) -> Kernel:
        if self.kernel is None:
            s = self.scenario
            kernel = resolve_kernel(s.kernel, s.modules, s.kernel_config, arch=self.arch.name)
            check_config(kernel, kdump_config_needed(self.arch.name, s.iommu))
            self.kernel = kernel
        return self.kernel

    def prepare(self, dry_run: bool = False) -> None:
        with self.phase("prepare", f"{self.scenario.kernel} ({self.arch.name})"):
            self.check_inputs()
            self.outdir.mkdir(parents=True, exist_ok=True)
            base = initramfs_builder(self.kernel).build("first")
            self.initrd = with_settings(base, {"etc/kh/run.env": self.run_env().encode()},
                                        self.outdir / "initrd.img")
            self.dump_disk = self.outdir / "dump.img"
            with open(self.dump_disk, "wb") as f:
                f.truncate((self.scenario.memory_mb + 256) << 20)
            self.accel = choose_accel_for(self.arch.name, self.accel_request, self.kernel.image, probe=not dry_run)
            self.scratch = Path(tempfile.mkdtemp(prefix="kh-run-"))
            shm = Path("/dev/shm")
            self.ram_file = Path(tempfile.mktemp(prefix="kh-ram-", dir=shm if shm.is_dir() else self.scratch))
            self.spec = self.machine_spec()

    def run_env(self) -> str:
        """The crash kernel's command line made right for the architecture (console)."""
        out = []
        for line in super().run_env().splitlines():
            key, _, value = line.partition("=")
            if key == "KH_CRASH_APPEND":
                opts = self.arch.kernel_cmdline(shlex.split(shlex.split(value)[0]) if value else [])
                line = f"{key}={shlex.quote(' '.join(opts))}"
            out.append(line + "\n")
        return "".join(out)

    def machine_spec(self) -> MachineSpec:
        spec = super().machine_spec()
        return dataclasses.replace(spec, arch=self.arch.name,
                                   append=self.arch.kernel_cmdline(spec.append))

    def snapshot_region(self) -> None:
        if self.arch.ram_base == 0:
            return super().snapshot_region()
        crash = self.state.facts.get("crash_kernel_range")
        if getattr(self.scenario, "handover", "panic") == "kexec":
            crash = (0, 2 ** 64 - 1)
        if self.region is None and crash and self.ram_file is not None and self.ram_file.exists():
            self.region = snapshot_region_arch(self.arch.name, self.ram_file, self.scenario.memory_mb, crash,
                                               self.nonce, self.now())

    def write_rerun(self) -> None:
        try:
            super().write_rerun()
        except Exception:  # rerun.sh is written for x86; the argv file is what matters here
            if self.machine and self.machine.argv:
                from .machine import shell_command
                (self.outdir / "qemu-cmdline.txt").write_text(shell_command(self.machine.argv) + "\n")

    # -- SMMUv3: a machine property (IommuModel.device is None), read like a -device IOMMU --

    def console_facts(self) -> None:
        super().console_facts()
        if self.iommu.present and not self.iommu.device:
            crash, facts = self.crash_console, self.state.facts
            facts["iommu_copied"] = self.iommu.copied(crash) if crash else None

    def analyze_dma(self):
        if self.scenario.iommu != "smmuv3":
            return super().analyze_dma()
        from .analysis import analyze_dma, dma_report, dma_verdict
        from .smmu_trace import parse_smmuv3_trace

        panic_t = self.state.marks.get("panic")
        gt, smmu = parse_smmuv3_trace(self.machine.trace_log, self.wall0, panic_t)
        self.state.facts["smmu"] = smmu.to_json(panic_t)
        kexec = getattr(self.scenario, "handover", "panic") == "kexec"
        an = analyze_dma(source=self.dma, nonce=self.nonce, vmcore=self.vmcore, region=self.region,
                         crash_range=None if kexec else self.state.facts.get("crash_kernel_range"),
                         panic_t=panic_t, gt=gt, handover_t=panic_t if kexec else None,
                         canary_pages=[] if kexec else self.state.facts.get("canaries", []))
        self.analysis_report = dma_report(an, self.dma, gt, self.state.marks)
        import inspect
        kw = {"gt": gt} if "gt" in inspect.signature(dma_verdict).parameters else {}
        return dma_verdict(an, self.dma, self.analysis_report, **kw)

    def report(self) -> dict:
        rep = super().report()
        rep["arch"] = self.arch.name
        if "smmu" in self.state.facts:
            rep["iommu"]["smmu"] = self.state.facts["smmu"]
        return rep
