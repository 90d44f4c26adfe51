"""rerun.sh: a run's exact QEMU command line and host steps, for a person.

The harness's own sockets (QEMU dials sockets the harness listens on) are
swapped for ones a person can use: the serial console on the terminal, QMP as
a server socket, the results port into a file. The guest gets the same
initramfs plus a settings archive that stops the crash kernel from waiting for
the harness's "go". Everything else is byte for byte what ran.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .initramfs import cpio_bytes

# sends one QMP command: a name (inject-nmi) or a JSON object with arguments
QMP_ONE_LINER = (
    "python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "f=s.makefile(\"rw\"); f.readline(); "
    "[(f.write(json.dumps(json.loads(c) if c[0] == \"{\" else {\"execute\": c}) + \"\\n\"), f.flush(), "
    "print(f.readline().strip())) for c in (\"qmp_capabilities\", sys.argv[2])]'"
)


def _quote(arg: str) -> str:
    if "$D" in arg:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(arg)


def manual_argv(argv: list[str], sockets, outdir: Path, scratch: Path | None, ram_file: Path | None) -> list[str]:
    out = []
    for a in argv:
        a = re.sub(rf"^socket,id=qmp0,path={re.escape(str(sockets.qmp))}$", "socket,id=qmp0,path=$D/qmp,server=on,wait=off", a)
        a = re.sub(rf"^socket,id=con0,path={re.escape(str(sockets.console))}$", "stdio,id=con0,signal=off", a)
        a = re.sub(rf"^socket,id=res0,path={re.escape(str(sockets.results))}$",
                   "file,id=res0,path=results-rerun.log", a)
        a = a.replace(f"unix:{sockets.qtest}", "unix:$D/qtest,server=on,wait=off")
        if scratch is not None:
            a = a.replace(str(scratch), "$D")
        if ram_file is not None:
            a = a.replace(str(ram_file), "$D/ram")
        a = a.replace(str(outdir / "dump.img"), "dump-rerun.img")
        a = a.replace(str(outdir / "initrd.img"), "$D/initrd")
        a = a.replace(str(outdir) + "/", "")
        out.append(a)
    return out


def panic_arg(run) -> str:
    """The one-liner's argument that panics this guest, quoted for the echo line."""
    import json

    if "nmi" in run.arch.panic_methods:
        # unknown_nmi_panic is on the first kernel's command line: an NMI panics it whatever the method
        return "inject-nmi"
    cmd, args = run.arch.panic_qmp(run.scenario.panic_method)
    return "'" + json.dumps({"execute": cmd, "arguments": args}, separators=(",", ":")).replace('"', '\\"') + "'"


def write_rerun_script(run) -> Path:
    m = run.machine
    sc = run.scenario
    outdir = run.outdir
    # no waiting for the harness's "go", no --interactive pause (the console is yours anyway)
    settings = re.sub(r"(?m)^KH_PAUSE=.*$", "KH_PAUSE=''", run.run_env().replace("KH_HOLD=1", "KH_HOLD=0"))
    (outdir / "rerun-settings.cpio").write_bytes(cpio_bytes({"etc/kh/run.env": settings.encode()}))
    argv = manual_argv(m.argv, m.socket_paths, outdir, run.scratch, run.ram_file)
    disk_size = (sc.memory_mb + 256) << 20
    dma_note = {
        "none": "no DMA source.",
        "nic": "the harness sent Ethernet frames of marker records (docs/markers.md) to the NIC's dgram socket "
               "($D/nic-q): 400 frames/s for 2 s before the panic, then 100/s until the crash kernel's userspace.",
        "edu": "the harness fired edu DMA over qtest ($D/qtest) at each target the guest reported "
               "(edu-target lines in guest.results.log): before the panic, right after it, at the crash "
               "kernel's banner and in its userspace.",
    }[sc.dma]
    lines = [
        "#!/bin/bash",
        f"# Rerun of kdump-harness scenario {sc.name!r} by hand, with this run's exact QEMU command line.",
        f"# Crash kernel command line: {' '.join(run.crash_cmdline())}",
        "#",
        "# Host steps of the original run, in order:",
        "#   1. QEMU starts; the first kernel boots, arms kdump (kexec -p) and reports on the results port.",
        f"#   2. DMA: {dma_note}",
        f"#   3. panic: QMP {'inject-nmi' if sc.panic_method == 'nmi' else 'send-key alt-sysrq-c'}.",
        "#   4. the crash kernel writes /proc/vmcore to the dump disk and powers off.",
        "# Here the console is this terminal, the results go to results-rerun.log, the vmcore to",
        "# dump-rerun.img, and the crash kernel does not wait for the harness. To replay the DMA as well:",
        "#   kdump-harness repro report.json",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "D=$(mktemp -d /tmp/kh-rerun-XXXXXX)",
        "trap 'rm -rf \"$D\"' EXIT",
        "rm -f dump-rerun.img",
        f"truncate -s {disk_size} dump-rerun.img",
        "cat initrd.img rerun-settings.cpio > \"$D/initrd\"   # later settings override earlier ones",
        "echo \"panic the guest from another terminal once it says 'ready':\" >&2",
        f"echo \"  {QMP_ONE_LINER.replace(chr(34), chr(92) + chr(34))} $D/qmp {panic_arg(run)}\" >&2",
        " \\\n    ".join(_quote(a) for a in argv),
        "",
    ]
    path = outdir / "rerun.sh"
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path
