"""Verdicts: what happened to the kernel under test, in one word, with evidence."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Verdict(str, enum.Enum):
    PASS = "PASS"                          # vmcore captured, nothing wrong found
    CORRUPTION = "CORRUPTION"              # DMA landed where it must not, or a canary changed
    UNSAFE_HANDOVER = "UNSAFE_HANDOVER"    # translation dropped while DMA was active; nothing hit, by luck
    INCONCLUSIVE = "INCONCLUSIVE"          # the run could not test what it was meant to (no DMA crossed the crash)
    FIRST_BOOT_FAILED = "FIRST_BOOT_FAILED"  # the first kernel did not boot or could not arm kdump
    NO_KDUMP = "NO_KDUMP"                  # the panic never reached a crash kernel
    KDUMP_PANIC = "KDUMP_PANIC"            # the crash kernel panicked or rebooted
    KDUMP_HANG = "KDUMP_HANG"              # the crash kernel started, no vmcore by the deadline
    NO_VMCORE = "NO_VMCORE"                # the crash kernel's userspace ran but could not save a vmcore
    ERROR = "ERROR"                        # the harness or the host failed, not the kernel

    @property
    def kernel_fault(self) -> bool:
        """True when the kernel under test is to blame."""
        return self not in (Verdict.PASS, Verdict.INCONCLUSIVE, Verdict.ERROR)


DESCRIPTIONS = {
    Verdict.PASS: "vmcore captured; no marker landed where it must not",
    Verdict.CORRUPTION: "DMA landed where it must not (misdirected markers or changed canaries)",
    Verdict.UNSAFE_HANDOVER: "the crash kernel switched translation off while DMA was still arriving",
    Verdict.INCONCLUSIVE: "the run did not exercise what it was meant to",
    Verdict.FIRST_BOOT_FAILED: "the first kernel did not boot or could not arm kdump",
    Verdict.NO_KDUMP: "the panic did not start a crash kernel",
    Verdict.KDUMP_PANIC: "the crash kernel panicked or rebooted before saving a vmcore",
    Verdict.KDUMP_HANG: "the crash kernel started but wrote no vmcore before the deadline",
    Verdict.NO_VMCORE: "the crash kernel's userspace ran but could not save a vmcore (no dump target, write failed)",
    Verdict.ERROR: "the harness or the host failed",
}


@dataclass
class Outcome:
    verdict: Verdict
    reason: str
    evidence: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"verdict": self.verdict.value, "reason": self.reason, "evidence": self.evidence}
