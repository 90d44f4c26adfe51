"""Choosing the accelerator: KVM when it really runs a kernel, else TCG.

`/dev/kvm` existing is not enough: on some hosts KVM hangs in early kernel boot
or QEMU aborts setting an MSR. The probe boots the kernel under test without an
initramfs under KVM, with a short deadline, and accepts KVM only if the kernel
gets as far as looking for a root file system. The answer is cached per host
boot, QEMU binary and kernel, so the probe runs once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cache import cache_root, stat_key
from .errors import UsageError

log = logging.getLogger(__name__)

PROBE_SECONDS = 20.0
# What a kernel with no root file system says once it has booted far enough.
PROBE_OK = (b"VFS: Unable to mount root", b"Kernel panic - not syncing", b"Run /init")


@dataclass(frozen=True)
class AccelChoice:
    accel: str        # "kvm" or "tcg"
    reason: str
    probe_seconds: float | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(kernel_image: Path, qemu: str = "qemu-system-x86_64", seconds: float = PROBE_SECONDS) -> AccelChoice:
    """Boot `kernel_image` under KVM until it looks for its root fs, or give up."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is missing or not accessible")
    with tempfile.TemporaryDirectory(prefix="kh-kvm-") as d:
        log_path = Path(d) / "serial.log"
        argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256M",
                "-serial", f"file:{log_path}", "-kernel", str(kernel_image),
                "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.monotonic() - start < seconds:
                try:
                    out, _ = proc.communicate(timeout=0.25)
                except subprocess.TimeoutExpired:
                    out = None
                text = log_path.read_bytes() if log_path.exists() else b""
                if any(p in text for p in PROBE_OK):
                    return AccelChoice("kvm", "KVM booted the kernel", time.monotonic() - start)
                if proc.poll() is not None:
                    err = (out or b"").decode("utf-8", "replace").strip().splitlines()
                    return AccelChoice("tcg", f"KVM failed: QEMU exited {proc.returncode}"
                                              f"{': ' + err[-1] if err else ''}", time.monotonic() - start)
            return AccelChoice("tcg", f"KVM did not boot the kernel within {seconds:.0f} s", time.monotonic() - start)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def requested_accel(requested: str) -> str:
    """"auto", "kvm" or "tcg": `requested`, or KDUMP_HARNESS_ACCEL when it is auto."""
    requested = os.environ.get("KDUMP_HARNESS_ACCEL", requested) if requested == "auto" else requested
    if requested not in ("auto", "kvm", "tcg"):
        raise UsageError(f"unknown accelerator {requested!r}; use auto, kvm or tcg")
    return requested


def choose_accel(requested: str, kernel_image: Path, qemu: str = "qemu-system-x86_64",
                 probe: bool = True) -> AccelChoice:
    """`requested` is "auto", "kvm" or "tcg" (or KDUMP_HARNESS_ACCEL). Without
    `probe`, an unknown answer is not probed for: KVM is assumed when requested,
    else TCG."""
    requested = requested_accel(requested)
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    key = f"{_boot_id()}|{stat_key(Path(kernel_image))}|{qemu}"
    cache = cache_root() / "accel-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        choice = AccelChoice(**known[key])
    elif not probe:
        return AccelChoice(requested if requested == "kvm" else "tcg", "not probed")
    else:
        choice = probe_kvm(kernel_image, qemu)
        known = {k: v for k, v in known.items() if k.startswith(_boot_id())}
        known[key] = asdict(choice)
        tmp = cache.with_suffix(f".{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    if requested == "kvm" and choice.accel != "kvm":
        raise UsageError(f"--accel kvm, but {choice.reason}; use --accel auto or tcg")
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    return choice


def choose_accel_for(arch: str, requested: str, kernel_image: Path, probe: bool = True) -> AccelChoice:
    """`choose_accel` for a guest architecture: KVM only runs a guest of the host's
    own architecture (and is only probed for x86_64 guests so far)."""
    from .arch import arch_info

    a = arch_info(arch)
    if a.name == "x86_64" and a.native:
        return choose_accel(requested, kernel_image, a.qemu_binary, probe=probe)
    requested = requested_accel(requested)
    if requested == "kvm":
        why = "on this host" if not a.native else "here yet (no KVM probe for it)"
        raise UsageError(f"--accel kvm: the harness cannot run {a.name} guests under KVM {why}; "
                         f"use --accel auto or tcg")
    return AccelChoice("tcg", "requested" if requested == "tcg" else
                       f"no KVM for {a.name} guests on this host" if not a.native
                       else f"KVM is not probed for {a.name} guests yet")
