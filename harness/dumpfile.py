"""Host-side handling of what the crash kernel wrote to the dump disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import HostError


def reassemble_flattened(disk: Path, out: Path, timeout: float = 600) -> None:
    """makedumpfile -F wrote its flattened stream to the raw disk; `makedumpfile -R`
    turns it back into a kdump-compressed file (it stops at the stream's end mark,
    so the rest of the disk does not matter)."""
    with open(disk, "rb") as src:
        try:
            r = subprocess.run(["makedumpfile", "-R", str(out)], stdin=src, capture_output=True,
                               text=True, timeout=timeout)
        except FileNotFoundError:
            raise HostError("makedumpfile not found on the host (apt-get install makedumpfile)") from None
        except subprocess.TimeoutExpired:
            raise HostError(f"makedumpfile -R took more than {timeout:.0f} s") from None
    if r.returncode != 0:
        raise HostError(f"makedumpfile -R failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
