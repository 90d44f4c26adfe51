"""Run reports -> JUnit XML, for CI systems that show test results.

One `<testcase>` per scenario run: classname `kdump.<iommu>`, name the
scenario's name, time its total seconds. A verdict other than the scenario's
expectation (PASS when it has none, as for the CLI's exit status) is a
`<failure>` ("verdict X, expected Y", with the reason and the evidence as its
text); the verdict ERROR (the harness or the host failed, not the kernel) is
an `<error>`. `<system-out>` says where the run directory and its report are.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

# Characters XML 1.0 cannot carry at all (console escapes, NULs from a torn log).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(value) -> str:
    """Any value as text XML 1.0 can hold: forbidden characters become \\xNN."""
    text = "" if value is None else str(value)
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _seconds(report: dict) -> float:
    t = (report.get("timings_s") or {}).get("total") if isinstance(report.get("timings_s"), dict) else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0:
        return float(t)
    return 0.0


def _details(report: dict) -> str:
    lines = [f"reason: {report.get('reason') or '-'}"]
    evidence = report.get("evidence") if isinstance(report.get("evidence"), list) else []
    if evidence:
        lines.append("evidence:")
        lines += [f"  {e}" for e in evidence]
    return xml_text("\n".join(lines))


def testcase(report: dict, run_dir: Path) -> ET.Element:
    """One run as a <testcase> element."""
    report = report if isinstance(report, dict) else {}
    scenario = report.get("scenario") if isinstance(report.get("scenario"), dict) else {}
    name = str(scenario.get("name") or "unnamed")
    iommu = str(scenario.get("iommu") or "unknown")
    verdict = str(report.get("verdict") or "")
    # no expectation (a customised scenario) means what the CLI's exit status means: PASS
    expected = str(report.get("expected") or scenario.get("expect") or "PASS")
    case = ET.Element("testcase", {"classname": xml_text(f"kdump.{iommu}"), "name": xml_text(name),
                                   "time": f"{_seconds(report):.3f}"})
    message = f"verdict {verdict or 'none'}, expected {expected}"
    if verdict == "ERROR" or not verdict:
        el = ET.SubElement(case, "error", {"message": xml_text(message), "type": verdict or "NO_VERDICT"})
        el.text = _details(report)
    elif verdict != expected:
        el = ET.SubElement(case, "failure", {"message": xml_text(message), "type": verdict})
        el.text = _details(report)
    run_dir = Path(run_dir)
    out = ET.SubElement(case, "system-out")
    out.text = xml_text(f"verdict: {verdict or '-'} (expected {expected})\n"
                        f"run directory: {run_dir}\nreport: {run_dir / 'report.json'}\n"
                        + (f"html: {run_dir / 'report.html'}\n" if (run_dir / "report.html").exists() else ""))
    return case


def junit_tree(results: list[tuple[dict, Path]], suite: str = "kdump-harness") -> ET.ElementTree:
    cases = [testcase(r, d) for r, d in results]
    failures = sum(1 for c in cases if c.find("failure") is not None)
    errors = sum(1 for c in cases if c.find("error") is not None)
    total = sum(float(c.get("time", "0")) for c in cases)
    attrs = {"name": xml_text(suite), "tests": str(len(cases)), "failures": str(failures), "errors": str(errors),
             "skipped": "0", "time": f"{total:.3f}"}
    root = ET.Element("testsuites", attrs)
    ts = ET.SubElement(root, "testsuite", attrs)
    ts.extend(cases)
    return ET.ElementTree(root)


def write_junit(results: list[tuple[dict, Path]], path: Path, suite: str = "kdump-harness") -> Path:
    """Write JUnit XML for (report, run directory) pairs to `path`; return `path`."""
    path = Path(path)
    tree = junit_tree(results, suite)
    ET.indent(tree)
    tmp = path.with_name(path.name + ".tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
    return path
