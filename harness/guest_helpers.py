"""Guest helpers from csrc/guest, compiled static on the host and cached by source hash."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from .arch import arch_info
from .cache import cache_root, locked
from .errors import HostError

GUEST_SRC = Path(__file__).resolve().parent.parent / "csrc" / "guest"
HELPERS = ("khdma",)


def build_helper(name: str, arch: str = "x86_64") -> Path:
    """`arch` other than x86_64: cross-compiled with that architecture's compiler
    (harness.arch), cached under a name that carries the architecture."""
    src = GUEST_SRC / f"{name}.c"
    if not src.exists():
        raise HostError(f"guest helper source {src} is missing")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    a = arch_info(arch)
    out = cache_root() / "guest-helpers" / (f"{name}-{digest}" if a.name == "x86_64" else f"{name}-{a.name}-{digest}")
    if out.exists():
        return out
    with locked(out):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{name}.", delete=False) as tmp:
            pass
        argv = [a.cc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp.name, str(src)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise HostError(f"{a.cc} not found: the guest helpers are compiled on the host "
                            f"(run ci/setup.sh; Debian: {' '.join(a.cc_packages)})") from None
        if r.returncode != 0:
            Path(tmp.name).unlink(missing_ok=True)
            raise HostError(f"compiling {src.name} failed: {r.stderr.strip().splitlines()[-1:] or r.returncode} "
                            f"(static linking needs libc6-dev)")
        Path(tmp.name).chmod(0o755)
        Path(tmp.name).replace(out)
    return out


def build_all(arch: str = "x86_64") -> dict[str, Path]:
    return {name: build_helper(name, arch) for name in HELPERS}
