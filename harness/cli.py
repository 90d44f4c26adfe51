"""kdump-harness command line.

    kdump-harness run [--iommu intel|amd|none] [--kernel ...] [--crash-append "..."] [--out DIR]
    kdump-harness scan VMCORE [--json]

Exit status: 0 PASS, 1 any other verdict, 2 bad input, 3 host/harness failure,
130 interrupted. Bad input is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_PASS, EXIT_VERDICT, HarnessError, UsageError
from .kernels import DEBIAN_FLAVOURS, DEFAULT_KERNEL
from .platforms import IOMMUS
from .scenario import DMA_SOURCES, DUMP_FORMATS, PANIC_METHODS, Scenario, split_options
from .verdict import DESCRIPTIONS, Verdict


class Progress:
    """Phase lines on stderr, with the time since the run started."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, phase: str, status: str, detail: str) -> None:
        t = time.monotonic() - self.t0
        if status == "start":
            line = f"[{t:6.1f}s] {phase:<8} ... {detail}"
        else:
            line = f"[{t:6.1f}s] {phase:<8} {status} ({detail})"
        print(line, file=self.stream, flush=True)


def default_outdir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("kdump-harness-runs") / f"{stamp}-{name}"


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scenario")
    g.add_argument("--iommu", choices=sorted(IOMMUS), default="intel", help="emulated IOMMU (default: intel)")
    g.add_argument("--iommu-option", action="append", default=[], metavar="PROP=VALUE",
                   help="extra property for the QEMU IOMMU device, e.g. x-scalable-mode=on (repeatable)")
    g.add_argument("--kernel", default=DEFAULT_KERNEL,
                   help=f"{', '.join(DEBIAN_FLAVOURS)}, debian:<package>, or the path of a bzImage (default: {DEFAULT_KERNEL})")
    g.add_argument("--modules", help="with --kernel PATH: the INSTALL_MOD_PATH of `make modules_install`")
    g.add_argument("--config", dest="kernel_config", help="the kernel's .config, when it is not found next to the image")
    g.add_argument("--first-append", default="", help="extra options for the first kernel")
    g.add_argument("--crash-base", default=None,
                   help='the crash kernel\'s base options (default: "irqpoll nr_cpus=1 reset_devices")')
    g.add_argument("--crash-append", default="", help="options appended last to the crash kernel's command line")
    g.add_argument("--memory", type=int, default=1024, metavar="MiB", help="guest RAM (default: 1024)")
    g.add_argument("--crashkernel", default="256M", help="crashkernel= reservation (default: 256M)")
    g.add_argument("--panic", choices=PANIC_METHODS, default="nmi", help="how the host panics the guest (default: nmi)")
    g.add_argument("--dma", choices=DMA_SOURCES, default="none",
                   help="DMA that outlives the panic: nic (e1000e flooded from the host), edu (aimed transfers "
                        "through the IOMMU), none (default)")
    g.add_argument("--crash-load-driver", action="store_true",
                   help="load the DMA device's driver in the crash kernel too (driver takeover)")
    g.add_argument("--dump-format", choices=DUMP_FORMATS, default="elf",
                   help="elf: /proc/vmcore as is; kdump: makedumpfile -d 1 (zero pages dropped only)")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    kw = dict(
        iommu=args.iommu, iommu_options=tuple(args.iommu_option), kernel=args.kernel, modules=args.modules,
        kernel_config=args.kernel_config, first_append=split_options(args.first_append),
        crash_append=split_options(args.crash_append), memory_mb=args.memory, crashkernel=args.crashkernel,
        panic_method=args.panic, dump_format=args.dump_format, dma=args.dma,
        crash_load_driver=args.crash_load_driver,
    )
    if args.crash_base is not None:
        kw["crash_base"] = split_options(args.crash_base)
    return Scenario(**kw)


def cmd_run(args: argparse.Namespace) -> int:
    from .deadline import timeout_scale
    from .run import KdumpRun

    timeout_scale()  # a bad value is bad input: say so before anything starts
    scenario = scenario_from_args(args)
    outdir = Path(args.out) if args.out else default_outdir(scenario.name)
    if outdir.exists() and any(outdir.iterdir()):
        raise UsageError(f"output directory {outdir} is not empty; give a new --out DIR")
    run = KdumpRun(scenario, outdir, accel=args.accel, progress=Progress())
    run.check_inputs()
    if args.show_command:
        run.prepare()
        from .machine import Machine, shell_command
        print(shell_command(Machine(run.machine_spec(), run.outdir).planned_argv()))
        return EXIT_PASS
    print(f"kdump-harness {__version__}: {scenario.iommu} IOMMU, kernel {scenario.kernel}, output in {outdir}",
          file=sys.stderr)
    try:
        outcome = run.execute()
    except KeyboardInterrupt:
        print(f"interrupted; QEMU stopped; partial output in {run.outdir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HarnessError as e:
        kept = f" (partial output in {run.outdir})" if run.outdir.is_dir() else ""
        print(f"kdump-harness: {e}{kept}", file=sys.stderr)
        return e.exit_code
    report = run.outdir / "report.json"
    print(f"\nverdict: {outcome.verdict.value} - {outcome.reason}")
    for line in outcome.evidence:
        print(f"  {line}")
    t = run.state.timings.get("total")
    print(f"report: {report}  ({t:.1f} s, {run.accel.accel if run.accel else '?'})")
    return EXIT_PASS if outcome.verdict == Verdict.PASS else EXIT_VERDICT


def cmd_scan(args: argparse.Namespace) -> int:
    from . import scan_cmd

    return scan_cmd.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdump-harness",
                                description="Does in-flight DMA corrupt memory when a kernel panics into kdump?")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: QEMU argv and events)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run one kdump scenario and print its verdict",
                       description="Boot the first kernel, arm kdump, panic it, capture the vmcore, give a verdict. "
                                   "Verdicts: " + "; ".join(f"{v.value}: {d}" for v, d in DESCRIPTIONS.items()))
    add_scenario_arguments(r)
    r.add_argument("--out", help="output directory (default: kdump-harness-runs/<time>-<scenario>)")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto probes KVM with a short deadline and falls back to TCG (default: auto)")
    r.add_argument("--show-command", action="store_true", help="print the QEMU command line and exit without booting")
    r.set_defaults(func=cmd_run)

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


if __name__ == "__main__":
    sys.exit(main())
