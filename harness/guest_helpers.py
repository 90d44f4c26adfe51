"""Guest helpers from csrc/guest, compiled static on the host and cached by source hash."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from .cache import cache_root, locked
from .errors import HostError

GUEST_SRC = Path(__file__).resolve().parent.parent / "csrc" / "guest"
HELPERS = ("khdma",)


def build_helper(name: str) -> Path:
    src = GUEST_SRC / f"{name}.c"
    if not src.exists():
        raise HostError(f"guest helper source {src} is missing")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache_root() / "guest-helpers" / f"{name}-{digest}"
    if out.exists():
        return out
    with locked(out):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{name}.", delete=False) as tmp:
            pass
        argv = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp.name, str(src)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise HostError("gcc not found: the guest helpers are compiled on the host (run ci/setup.sh)") from None
        if r.returncode != 0:
            Path(tmp.name).unlink(missing_ok=True)
            raise HostError(f"compiling {src.name} failed: {r.stderr.strip().splitlines()[-1:] or r.returncode} "
                            f"(static linking needs libc6-dev)")
        Path(tmp.name).chmod(0o755)
        Path(tmp.name).replace(out)
    return out


def build_all() -> dict[str, Path]:
    return {name: build_helper(name) for name in HELPERS}
