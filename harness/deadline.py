"""Deadlines: every wait in the harness has one, and says what it waited for.

All phase budgets are written for TCG on a slow machine and multiplied by one
scale factor (`KDUMP_HARNESS_TIMEOUT_SCALE`, default 1.0), the same everywhere.
"""

from __future__ import annotations

import os
import time

from .errors import DeadlineExceeded, UsageError


def timeout_scale() -> float:
    raw = os.environ.get("KDUMP_HARNESS_TIMEOUT_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"KDUMP_HARNESS_TIMEOUT_SCALE={raw!r} is not a number; use e.g. 2 for a slow host") from None
    if value <= 0:
        raise UsageError(f"KDUMP_HARNESS_TIMEOUT_SCALE={raw!r} must be positive")
    return value


class Deadline:
    """A point in time (monotonic) by which `what` must have happened."""

    def __init__(self, seconds: float, what: str, *, scale: float | None = None):
        self.seconds = seconds * (timeout_scale() if scale is None else scale)
        self.what = what
        self.start = time.monotonic()
        self.at = self.start + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, detail: str = "") -> None:
        if self.expired():
            raise self.exceeded(detail)

    def exceeded(self, detail: str = "") -> DeadlineExceeded:
        return DeadlineExceeded(self.what, self.seconds, detail)

    def __repr__(self) -> str:
        return f"Deadline({self.what!r}, {self.remaining():.1f}s left of {self.seconds:.0f}s)"
