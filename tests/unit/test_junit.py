"""JUnit XML from run reports, read back with two XML parsers."""
import copy
import json
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.junit import write_junit

DATA = Path(__file__).resolve().parent.parent / "data"


def sample(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def results(tmp_path):
    ok_pass = sample("report-pass-nic.json")
    ok_corrupt = sample("report-corruption-edu.json")
    ok_hang = sample("report-hang-amd.json")
    wrong = copy.deepcopy(ok_corrupt)
    wrong["scenario"]["name"] = "intel-edu-default"
    wrong["expected"] = "PASS"
    wrong["evidence"].append("console: \x1b[31mred\x1b[0m \x00 <&> ]]>")
    error = {"verdict": "ERROR", "reason": "QEMU exited: could not open /dev/kvm", "evidence": ["qemu: boom"],
             "expected": "PASS", "scenario": {"name": "amd-nic", "iommu": "amd"}, "timings_s": {"total": 3.5}}
    runs = [ok_pass, ok_corrupt, ok_hang, wrong, error]
    out = []
    for i, r in enumerate(runs):
        d = tmp_path / f"run{i}"
        d.mkdir()
        out.append((r, d))
    return out


def test_junit_cases(tmp_path):
    res = results(tmp_path)
    path = write_junit(res, tmp_path / "junit.xml", suite="kdump-matrix")
    xml.dom.minidom.parse(str(path))  # a second, stricter parser accepts it too
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("name") == "kdump-matrix"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "1", "1")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("kdump.intel", "intel-nic"), ("kdump.intel", "intel-edu-crash-iommu-off"),
        ("kdump.amd", "amd-crash-iommu-off"), ("kdump.intel", "intel-edu-default"), ("kdump.amd", "amd-nic")]
    for (report, run_dir), case in zip(res, cases):
        assert float(case.get("time")) == round(report["timings_s"]["total"], 3)
        out = case.find("system-out").text
        assert str(run_dir) in out and str(run_dir / "report.json") in out
    for case in cases[:3]:  # verdict as expected
        assert case.find("failure") is None and case.find("error") is None
    failure = cases[3].find("failure")
    assert cases[3].find("error") is None
    assert failure.get("message") == "verdict CORRUPTION, expected PASS"
    assert "DMA landed where it must not" in failure.text
    assert "found at phys 0x39dd000" in failure.text
    assert "\\x1b[31mred" in failure.text and "<&> ]]>" in failure.text
    error = cases[4].find("error")
    assert cases[4].find("failure") is None
    assert error.get("message") == "verdict ERROR, expected PASS"
    assert "could not open /dev/kvm" in error.text and "qemu: boom" in error.text
    assert float(suite.get("time")) == sum(round(r["timings_s"]["total"], 3) for r, _ in res)


def test_partial_and_empty_reports(tmp_path):
    path = write_junit([({}, tmp_path), ({"verdict": "KDUMP_HANG", "scenario": {"name": "x"}}, tmp_path)],
                       tmp_path / "j.xml")
    cases = ET.parse(path).getroot().findall("./testsuite/testcase")
    assert cases[0].find("error") is not None  # no verdict at all: the harness failed
    assert cases[0].get("name") == "unnamed" and cases[0].get("time") == "0.000"
    assert cases[1].find("failure") is not None  # no expectation: PASS, as for the exit status
    assert cases[1].find("failure").get("message") == "verdict KDUMP_HANG, expected PASS"


def test_empty_suite(tmp_path):
    root = ET.parse(write_junit([], tmp_path / "j.xml")).getroot()
    assert root.find("testsuite").get("tests") == "0"
