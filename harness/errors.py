"""Errors, by who is to blame.

`UsageError` (exit 2): the input is wrong (a missing kernel, a config without
CONFIG_CRASH_DUMP, an unknown scenario). `HostError` (exit 3): the harness or the
host failed (QEMU missing, a socket that never came up). Problems of the kernel
under test are not exceptions: they are verdicts (see harness.verdict).
"""

from __future__ import annotations

EXIT_PASS = 0
EXIT_VERDICT = 1      # the run completed, the verdict is not PASS
EXIT_USAGE = 2
EXIT_HOST = 3
EXIT_INTERRUPTED = 130


class HarnessError(Exception):
    """Base class. `str(err)` is one line a person can act on."""

    exit_code = EXIT_HOST


class UsageError(HarnessError):
    """Bad input: what is wrong and what to do about it."""

    exit_code = EXIT_USAGE


class HostError(HarnessError):
    """The host or the harness failed, not the kernel under test."""

    exit_code = EXIT_HOST


class DeadlineExceeded(HarnessError):
    """A wait ran out of time. Carries what was awaited and for how long."""

    exit_code = EXIT_HOST

    def __init__(self, what: str, seconds: float, detail: str = ""):
        self.what = what
        self.seconds = seconds
        self.detail = detail
        msg = f"timed out after {seconds:.0f} s waiting for {what}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class MachineExited(HarnessError):
    """QEMU exited while something was still being waited for."""

    exit_code = EXIT_HOST

    def __init__(self, what: str, returncode: int | None, tail: str = ""):
        self.what = what
        self.returncode = returncode
        self.tail = tail
        super().__init__(f"QEMU exited (status {returncode}) while waiting for {what}")
