"""kdump-harness command line.

    kdump-harness run [NAME] [--iommu ...] [--dma ...] [--kernel ...] [--crash-append "..."] [--out DIR]
    kdump-harness list [FILTER ...] [--json]
    kdump-harness repro REPORT.json [--out DIR]
    kdump-harness scan VMCORE [--json]

Exit status: 0 PASS (repro: same verdict), 1 any other verdict, 2 bad input,
3 host/harness failure, 130 interrupted. Bad input is one line on stderr, never
a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_PASS, EXIT_VERDICT, HarnessError, UsageError
from .kernels import DEBIAN_FLAVOURS
from .platforms import IOMMUS
from .scenario import DMA_SOURCES, DUMP_FORMATS, GUESTS, HANDOVERS, PANIC_METHODS, Scenario, split_options
from .verdict import DESCRIPTIONS, Verdict

PAUSE_PHASES = ("first-boot", "armed", "crash")


class Progress:
    """Phase lines on stderr with the time since the start; on a terminal, a
    ticker shows how long the current phase has been waiting."""

    def __init__(self, stream=sys.stderr, ticker: bool | None = None):
        self.stream = stream
        self.t0 = time.monotonic()
        self.ticker = stream.isatty() if ticker is None else ticker
        self._current: tuple[str, float, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.ticker:
            threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._current:
                    name, start, detail = self._current
                    self.stream.write(f"\r[{time.monotonic() - self.t0:6.1f}s] {name:<8} ... {detail} "
                                      f"({time.monotonic() - start:.0f} s)\x1b[K")
                    self.stream.flush()

    def __call__(self, phase: str, status: str, detail: str) -> None:
        t = time.monotonic() - self.t0
        with self._lock:
            if status == "start":
                self._current = (phase, time.monotonic(), detail)
                line = f"[{t:6.1f}s] {phase:<8} ... {detail}"
            else:
                self._current = None
                line = f"[{t:6.1f}s] {phase:<8} {status} ({detail})"
            prefix = "\r\x1b[K" if self.ticker else ""
            print(prefix + line, file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()


def default_outdir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("kdump-harness-runs") / f"{stamp}-{name}"


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    """Scenario options. Their defaults are None: given ones override the
    catalog entry (or the default scenario) they are applied to."""
    g = p.add_argument_group("scenario (each given option overrides the named scenario)")
    g.add_argument("--arch",
                   help="guest architecture: x86_64 (q35, default) or aarch64 (virt; alone it runs smmuv3-edu)")
    g.add_argument("--iommu", choices=sorted(IOMMUS), help="emulated IOMMU")
    g.add_argument("--iommu-option", action="append", metavar="PROP=VALUE",
                   help="extra property for the QEMU IOMMU device, e.g. x-scalable-mode=on (repeatable)")
    g.add_argument("--dma", choices=DMA_SOURCES,
                   help="DMA that outlives the panic: nic (e1000e flooded from the host), edu (aimed transfers "
                        "through the IOMMU), none")
    g.add_argument("--guest", choices=GUESTS,
                   help="initramfs: the harness's busybox images (default, fast); debian: a Debian 12 image "
                        "built with debootstrap whose kdump-tools arms kdump and saves the dump, driven over SSH")
    g.add_argument("--handover", choices=HANDOVERS,
                   help="panic: kdump (default); kexec: a plain kexec -l/-e reboot with DMA still running, the "
                        "second kernel checked through the host's view of its memory")
    g.add_argument("--no-crash-iommu-driver", dest="crash_iommu_driver", action="store_false", default=None,
                   help="do not load a modular IOMMU driver (virtio-iommu) in the crash kernel")
    g.add_argument("--crash-load-driver", action="store_true", default=None,
                   help="load the DMA device's driver in the crash kernel too (driver takeover)")
    g.add_argument("--kernel",
                   help=f"{', '.join(DEBIAN_FLAVOURS)}, debian:<package>[=<version>], or the path of a bzImage")
    g.add_argument("--modules", help="with --kernel PATH: the INSTALL_MOD_PATH of `make modules_install`")
    g.add_argument("--config", dest="kernel_config", help="the kernel's .config, when it is not found next to the image")
    g.add_argument("--kernel-tree", metavar="DIR",
                   help="a built kernel tree: arch/x86/boot/bzImage, .config, and `make modules_install` into the cache")
    g.add_argument("--first-append", help="extra options for the first kernel (appended)")
    g.add_argument("--crash-base", help='the crash kernel\'s base options (default "irqpoll nr_cpus=1 reset_devices")')
    g.add_argument("--crash-append", help="options appended last to the crash kernel's command line (they win)")
    g.add_argument("--memory", type=int, metavar="MiB", help="guest RAM (default 1024)")
    g.add_argument("--crashkernel", help="crashkernel= reservation (default 256M)")
    g.add_argument("--panic", choices=PANIC_METHODS, help="how the host panics the guest (default nmi)")
    g.add_argument("--dump-format", choices=DUMP_FORMATS,
                   help="elf: /proc/vmcore as is (default); kdump: makedumpfile -d 1 (zero pages dropped only)")


def scenario_overrides(args: argparse.Namespace) -> dict:
    o: dict = {}
    simple = {"arch": "arch", "iommu": "iommu", "dma": "dma", "crash_load_driver": "crash_load_driver", "kernel": "kernel",
              "guest": "guest", "crash_iommu_driver": "crash_iommu_driver", "handover": "handover",
              "modules": "modules", "kernel_config": "kernel_config", "memory": "memory_mb",
              "crashkernel": "crashkernel", "panic": "panic_method", "dump_format": "dump_format"}
    for arg, fld in simple.items():
        v = getattr(args, arg, None)
        if v is not None:
            o[fld] = v
    if getattr(args, "iommu_option", None):
        o["iommu_options"] = tuple(args.iommu_option)
    if getattr(args, "crash_base", None) is not None:
        o["crash_base"] = split_options(args.crash_base)
    for arg in ("first_append", "crash_append"):
        if getattr(args, arg, None):
            o[arg] = split_options(getattr(args, arg))
    return o


# Which kernel runs does not change what a scenario means: it keeps its name and expectation.
KERNEL_FIELDS = {"kernel", "modules", "kernel_config"}


def kernel_overrides(args: argparse.Namespace) -> dict:
    """--kernel/--modules/--config, or --kernel-tree resolved to those."""
    o = {k: v for k, v in scenario_overrides(args).items() if k in KERNEL_FIELDS}
    tree = getattr(args, "kernel_tree", None)
    if tree:
        if o:
            raise UsageError("--kernel-tree replaces --kernel/--modules/--config; give one or the other")
        from .kernels import tree_kernel
        k = tree_kernel(tree)
        o = {"kernel": str(k.image), "modules": str(k.modules_dir) if k.modules_dir else None,
             "kernel_config": str(k.config_path)}
    return o


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    from . import catalog

    from .arch import arch_info

    arch = getattr(args, "arch", None)
    if arch:
        args.arch = arch = arch_info(arch).name      # arm64 -> aarch64; unknown: one line
    default = catalog.DEFAULT_FOR_ARCH.get(arch, catalog.DEFAULT) if arch else catalog.DEFAULT
    base = catalog.by_name(args.name or default)
    o = {k: v for k, v in scenario_overrides(args).items() if k not in KERNEL_FIELDS}
    o = {k: v for k, v in o.items() if getattr(base, k) != v}   # restating the entry changes nothing
    base = base.replace(**kernel_overrides(args))
    if not o:
        return base
    # appended options go after the entry's own; the result has no catalog expectation
    for fld in ("first_append", "crash_append"):
        if fld in o:
            o[fld] = getattr(base, fld) + o[fld]
    return base.replace(name=f"{base.name}+custom", expect="", reason=f"{base.name} with options {sorted(o)}", **o)


def print_outcome(run, outcome) -> None:
    print(f"\nverdict: {outcome.verdict.value} - {outcome.reason}")
    for line in outcome.evidence:
        print(f"  {line}")
    exp = run.scenario.expect
    if exp:
        print(f"expected: {exp} ({'as expected' if exp == outcome.verdict.value else 'UNEXPECTED'})")
    rows = [(k, v) for k, v in run.state.timings.items() if k != "total"]
    if rows:
        print("phases:  " + "  ".join(f"{k} {v:.1f}s" for k, v in rows))
    t = run.state.timings.get("total", 0.0)
    html = run.outdir / "report.html"
    print(f"report: {run.outdir / 'report.json'}" + (f"  {html}" if html.exists() else "")
          + f"  ({t:.1f} s, {run.accel.accel if run.accel else '?'})")


def execute(run, progress: Progress) -> int:
    """Run, print the outcome, keep partial output on every path."""
    try:
        outcome = run.execute()
    except KeyboardInterrupt:
        print(f"\ninterrupted; QEMU stopped; partial output in {run.outdir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HarnessError as e:
        kept = f" (partial output in {run.outdir})" if run.outdir.is_dir() else ""
        print(f"kdump-harness: {e}{kept}", file=sys.stderr)
        return e.exit_code
    finally:
        progress.close()
    print_outcome(run, outcome)
    return EXIT_PASS if outcome.verdict == Verdict.PASS else EXIT_VERDICT


def console_handover(run, phase: str) -> None:
    """--interactive: the guest paused with a shell on its console; give it to the person."""
    print(f"\n--- {phase}: the guest's serial console is yours. Type `exit` in the guest shell to continue "
          f"the run (Ctrl-] leaves the console and continues too). ---", file=sys.stderr, flush=True)
    run.machine.console.interact_raw(until=lambda: run.machine.events.find("resumed", run.pause_mark) is not None)
    print("\n--- back to kdump-harness ---", file=sys.stderr, flush=True)


def prepare_run(args: argparse.Namespace, scenario: Scenario):
    from .deadline import timeout_scale
    from .run import KdumpRun

    timeout_scale()  # a bad value is bad input: say so before anything starts
    outdir = Path(args.out) if args.out else default_outdir(scenario.name)
    if outdir.exists() and any(outdir.iterdir()):
        raise UsageError(f"output directory {outdir} is not empty; give a new --out DIR")
    progress = Progress()
    if scenario.guest == "debian":
        from .distro import DistroRun
        if getattr(args, "interactive", None):
            raise UsageError("--interactive goes with the initramfs guest; the Debian guest is reachable over "
                             "SSH (see docs/distro-guest.md)")
        run = DistroRun(scenario, outdir, accel=args.accel, progress=progress)
    else:
        run = KdumpRun(scenario, outdir, accel=args.accel, progress=progress,
                       pause=getattr(args, "interactive", None), on_pause=console_handover,
                       keep_ram=getattr(args, "keep_ram", False))
    try:
        run.check_inputs()
    except BaseException:
        progress.close()
        raise
    return run, progress


def cmd_run(args: argparse.Namespace) -> int:
    scenario = scenario_from_args(args)
    run, progress = prepare_run(args, scenario)
    if args.show_command:
        progress.close()
        run.prepare(dry_run=True)
        from .machine import Machine, shell_command
        print(shell_command(Machine(run.machine_spec(), run.outdir).planned_argv()))
        run.finish()
        return EXIT_PASS
    print(f"kdump-harness {__version__}: {scenario.name}: {scenario.iommu} IOMMU, DMA {scenario.dma}, "
          f"kernel {scenario.kernel}; output in {run.outdir}", file=sys.stderr)
    return execute(run, progress)


def cmd_list(args: argparse.Namespace) -> int:
    from . import catalog

    entries = catalog.select(args.filters)
    if args.json:
        print(json.dumps([sc.to_json() for sc in entries], indent=1))
        return EXIT_PASS
    if not entries:
        raise UsageError(f"no catalog entry matches {' '.join(args.filters)}")
    w = max(len(sc.name) for sc in entries)
    print(f"{'NAME':<{w}}  {'ARCH':<7}  {'IOMMU':<6}  {'DMA':<4}  {'KERNEL':<11}  {'EXPECT':<15}  REASON")
    for sc in entries:
        print(f"{sc.name:<{w}}  {sc.arch:<7}  {sc.iommu:<6}  {sc.dma:<4}  {sc.kernel:<11}  {sc.expect:<15}  "
              f"{sc.reason}")
    tags = sorted({t for sc in catalog.CATALOG for t in sc.tags})
    print(f"\n{len(entries)} scenarios. Run one: kdump-harness run NAME. Filters: a tag "
          f"({', '.join(tags)}), !tag, or a name glob.")
    return EXIT_PASS


def cmd_repro(args: argparse.Namespace) -> int:
    from .repro import scenario_from_report

    path = Path(args.report)
    scenario, previous = scenario_from_report(path)
    print(f"kdump-harness: reproducing {scenario.name} from {path} (it gave {previous})", file=sys.stderr)
    run, progress = prepare_run(args, scenario)
    rc = execute(run, progress)
    if rc in (EXIT_PASS, EXIT_VERDICT) and run.outcome is not None:
        now = run.outcome.verdict.value
        same = now == previous
        print(f"repro: {'same verdict' if same else 'VERDICT CHANGED'}: {previous} -> {now}")
        return EXIT_PASS if same else EXIT_VERDICT
    return rc


def cmd_matrix(args: argparse.Namespace) -> int:
    from . import catalog
    from .deadline import timeout_scale
    from .matrix import Matrix, plan

    timeout_scale()
    kernel = kernel_overrides(args)
    filters = args.filters or ["!slow"]
    if kernel:
        filters = filters + ["!6.12"]  # one kernel under test: the 6.12 entries would be duplicates
    scenarios = catalog.select(filters)
    outdir = Path(args.out) if args.out else default_outdir("matrix")
    if outdir.exists() and any(outdir.iterdir()):
        raise UsageError(f"output directory {outdir} is not empty; give a new --out DIR")
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: give at least 1")
    extra: list[str] = []
    for flag, fld in (("--kernel", "kernel"), ("--modules", "modules"), ("--config", "kernel_config")):
        if kernel.get(fld):
            extra += [flag, str(kernel[fld])]
    m = Matrix(plan(scenarios, outdir), outdir, jobs=args.jobs, accel=args.accel, extra_args=extra)
    print(f"kdump-harness matrix: {len(scenarios)} scenarios, {args.jobs} at a time, output in {outdir}",
          file=sys.stderr)
    try:
        ok = m.execute()
    except KeyboardInterrupt:
        print(f"interrupted; QEMU stopped; partial output in {outdir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(m.summary_table())
    return EXIT_PASS if ok else EXIT_VERDICT


def cmd_bisect(args: argparse.Namespace) -> int:
    from . import catalog
    from .bisect import DEFAULT_BUILD, bisect, check_tree

    catalog.by_name(args.scenario)
    check_tree(Path(args.tree).expanduser().resolve(), args.good, args.bad)  # bad input: one line, before anything
    out = Path(args.out) if args.out else default_outdir(f"bisect-{args.scenario}")
    print(f"kdump-harness bisect: {args.scenario} between {args.good} (good) and {args.bad} (bad) in {args.tree}; "
          f"output in {out}", file=sys.stderr)
    try:
        res = bisect(Path(args.tree), args.good, args.bad, args.scenario, out, build=args.build or DEFAULT_BUILD,
                     accel=args.accel, expect=args.expect)
    except KeyboardInterrupt:
        print(f"interrupted; the tree is back on its branch; steps so far in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    for st in res["steps"]:
        print(f"  {st['commit'][:12]}  {st['result']:<4}  {st.get('verdict', st.get('why', ''))[:60]:<20}  "
              f"{st['subject'][:70]}")
    if res["first_bad"]:
        print(f"first bad commit: {res['first_bad'][:12]} {res['first_bad_subject']}")
        return EXIT_PASS
    print("no first bad commit found:\n  " + "\n  ".join(res["git_output"]))
    return EXIT_VERDICT


def cmd_scan(args: argparse.Namespace) -> int:
    from . import scan_cmd

    return scan_cmd.run(args)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (default: kdump-harness-runs/<time>-<scenario>)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto probes KVM with a short deadline and falls back to TCG (default: auto)")
    p.add_argument("--interactive", choices=PAUSE_PHASES, metavar="PHASE",
                   help=f"stop at PHASE ({', '.join(PAUSE_PHASES)}) and hand over the serial console; "
                        f"the run continues when you exit the guest shell")
    p.add_argument("--keep-ram", action="store_true",
                   help="keep the guest's RAM file (guest-ram.raw, RAM-sized) in the run directory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdump-harness",
                                description="Does in-flight DMA corrupt memory when a kernel panics into kdump?")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: QEMU argv and events)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run one kdump scenario and print its verdict",
                       description="Boot the first kernel, arm kdump, keep DMA flowing, panic it, capture the "
                                   "vmcore, give a verdict. Without NAME: the catalog's default scenario "
                                   "(intel-copy-nic). Verdicts: "
                                   + "; ".join(f"{v.value}: {d}" for v, d in DESCRIPTIONS.items()))
    r.add_argument("name", nargs="?", metavar="NAME", help="a catalog scenario (kdump-harness list)")
    add_scenario_arguments(r)
    add_run_arguments(r)
    r.add_argument("--show-command", action="store_true", help="print the QEMU command line and exit without booting")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="the scenario catalog, with expected verdicts and where they come from")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="tag, !tag or name glob")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    mx = sub.add_parser("matrix", help="run many catalog scenarios in parallel; one JUnit + HTML report",
                        description="Run the catalog entries matching FILTERs (default: !slow), N at a time, "
                                    "each in its own process. Exit 0 when every verdict is the expected one.")
    mx.add_argument("filters", nargs="*", metavar="FILTER", help="tag, !tag or name glob (default: !slow)")
    mx.add_argument("-j", "-n", "--jobs", type=int, default=1, help="scenarios at a time (default 1)")
    mx.add_argument("--out", help="output directory (default: kdump-harness-runs/<time>-matrix)")
    mx.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    kg = mx.add_argument_group("kernel under test (default: each scenario's own)")
    kg.add_argument("--kernel")
    kg.add_argument("--modules")
    kg.add_argument("--config", dest="kernel_config")
    kg.add_argument("--kernel-tree", metavar="DIR")
    mx.set_defaults(func=cmd_matrix)

    bs = sub.add_parser("bisect", help="find the kernel commit that changed a scenario's verdict (git bisect run)",
                        description="Bisect a kernel tree between GOOD (scenario gives its expected verdict) and "
                                    "BAD. Each step builds the tree with its own make, then runs the scenario.")
    bs.add_argument("good", metavar="GOOD")
    bs.add_argument("bad", metavar="BAD")
    bs.add_argument("--scenario", required=True, help="a catalog scenario (kdump-harness list)")
    bs.add_argument("--tree", required=True, help="the kernel git tree, configured (.config)")
    bs.add_argument("--build", help="build command run in the tree ({jobs} = CPUs; default: "
                                    "make olddefconfig && make -j{jobs} bzImage modules)")
    bs.add_argument("--expect", help="the good verdict (default: the scenario's expected one)")
    bs.add_argument("--out")
    bs.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    bs.set_defaults(func=cmd_bisect)

    rp = sub.add_parser("repro", help="rerun exactly the scenario of a report.json and compare verdicts")
    rp.add_argument("report", metavar="REPORT.json")
    add_run_arguments(rp)
    rp.set_defaults(func=cmd_repro)

    s = sub.add_parser("scan", help="scan a vmcore (or guest RAM file) for marker records")
    from . import scan_cmd
    scan_cmd.add_arguments(s)
    s.set_defaults(func=cmd_scan)
    return p


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _on_sigterm)  # CI timeouts: clean up as for Ctrl-C
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HarnessError as e:
        print(f"kdump-harness: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `kdump-harness list | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
