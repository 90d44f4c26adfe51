"""Turning a report back into the scenario that produced it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .scenario import Scenario


def scenario_from_report(path: Path) -> tuple[Scenario, str]:
    """(scenario, verdict) of a report.json, with the kernel pinned to the exact
    build that ran: a Debian kernel by package and version, a user kernel by path."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; give the report.json of a run") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable report.json ({e})") from None
    if not isinstance(report, dict) or "scenario" not in report or "verdict" not in report:
        raise UsageError(f"{path} is not a kdump-harness report (no scenario or verdict)")
    version = report.get("report_version")
    if version != 1:
        raise UsageError(f"{path} has report_version {version!r}; this kdump-harness reads version 1")
    scenario = Scenario.from_json(report["scenario"])
    kernel = report.get("kernel") or {}
    if kernel.get("package") and kernel.get("version"):
        scenario = scenario.replace(kernel=f"debian:{kernel['package']}={kernel['version']}")
    return scenario, report["verdict"]
