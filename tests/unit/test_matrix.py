"""The matrix runner against fake runs (a tiny script stands in for `kdump-harness run`)."""
import io
import json
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from harness.matrix import Matrix, plan
from harness.scenario import Scenario

FAKE_RUN = r'''
import json, os, sys, time, signal
name, out, verdict, sleep = sys.argv[1:5]
os.makedirs(out, exist_ok=True)
def bye(*a):
    open(os.path.join(out, "terminated"), "w").close()
    sys.exit(130)
signal.signal(signal.SIGTERM, bye)
open(os.path.join(out, "started"), "w").close()
time.sleep(float(sleep))
json.dump({"report_version": 1, "scenario": {"name": name, "iommu": "intel", "dma": "nic", "kernel": "k"},
           "verdict": verdict, "reason": "fake", "evidence": [], "expected": "PASS",
           "timings_s": {"total": float(sleep)}}, open(os.path.join(out, "report.json"), "w"))
'''


class FakeMatrix(Matrix):
    verdicts: dict = {}
    sleep: float = 0.2

    def argv(self, e):
        return [sys.executable, "-c", FAKE_RUN, e.scenario.name, str(e.outdir),
                self.verdicts.get(e.scenario.name, "PASS"), str(self.sleep)]


def scenarios(*names):
    return [Scenario(name=n, expect="PASS") for n in names]


def test_parallel_runs_and_combined_reports(tmp_path):
    out = tmp_path / "m"
    stream = io.StringIO()
    m = FakeMatrix(plan(scenarios("a", "b", "c"), out), out, jobs=2, stream=stream)
    m.verdicts = {"c": "CORRUPTION"}
    assert m.execute() is False  # c is not as expected
    assert [e.verdict for e in m.entries] == ["PASS", "PASS", "CORRUPTION"]
    log = stream.getvalue()
    assert "start  a" in log and "done   c: CORRUPTION (expected PASS, UNEXPECTED" in log
    suite = ET.parse(out / "junit.xml").getroot()
    cases = suite.iter("testcase")
    assert [c.get("name") for c in cases] == ["a", "b", "c"]
    assert len(list(suite.iter("failure"))) == 1
    assert (out / "matrix.html").read_text().count('href="runs/') >= 3  # a link to each run
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["jobs"] == 2 and [r["matched"] for r in doc["runs"]] == [True, True, False]
    table = m.summary_table()
    assert "2/3 as expected" in table and "CORRUPTION !" in table


def test_a_run_that_writes_no_report_is_an_error(tmp_path):
    out = tmp_path / "m"
    m = FakeMatrix(plan(scenarios("x"), out), out, stream=io.StringIO())
    m.argv = lambda e: [sys.executable, "-c", "import sys; print('kdump-harness: broken'); sys.exit(3)"]
    assert m.execute() is False
    assert m.entries[0].verdict == "ERROR" and "broken" in m.entries[0].error


def test_stop_terminates_running_scenarios(tmp_path):
    out = tmp_path / "m"
    m = FakeMatrix(plan(scenarios("slow1", "slow2"), out), out, jobs=2, stream=io.StringIO())
    m.sleep = 60
    t = threading.Thread(target=m.execute)
    t.start()
    for _ in range(200):
        if all((e.outdir / "started").exists() for e in m.entries):
            break
        time.sleep(0.05)
    m.stop()
    t.join(30)
    assert not t.is_alive()
    assert all((e.outdir / "terminated").exists() for e in m.entries)  # SIGTERM reached each run
    assert all(e.verdict == "ERROR" for e in m.entries)


def test_empty_matrix_is_bad_input(tmp_path):
    from harness.errors import UsageError
    with pytest.raises(UsageError, match="matrix is empty"):
        plan([], tmp_path)
