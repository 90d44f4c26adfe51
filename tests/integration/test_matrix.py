"""The nightly job's shell part, for real: two scenarios at once, each in its own process."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.boot
ROOT = Path(__file__).resolve().parents[2]


def test_nightly_matrix_two_workers_at_once_both_pass(tmp_path, request):
    out = tmp_path / "out"
    env = dict(os.environ, KH_JOBS="2", KDUMP_HARNESS_ACCEL=request.config.getoption("--kh-accel"))
    r = subprocess.run([str(ROOT / "ci" / "nightly.sh"), "run", str(out), "intel-copy-edu", "amd-copy-edu"],
                       capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2/2 as expected" in r.stdout
    doc = json.loads((out / "matrix.json").read_text())
    runs = {x["scenario"]: x for x in doc["runs"]}
    assert set(runs) == {"intel-copy-edu", "amd-copy-edu"} and all(x["matched"] for x in runs.values())
    suite = ET.parse(out / "junit.xml").getroot()
    assert len(list(suite.iter("testcase"))) == 2 and not list(suite.iter("failure"))
    # they really overlapped: each started before the other finished
    log = r.stderr
    first_done = min(log.index("done   intel-copy-edu"), log.index("done   amd-copy-edu"))
    assert log.index("start  intel-copy-edu") < first_done and log.index("start  amd-copy-edu") < first_done
    for name in runs:
        rep = json.loads((out / "runs" / name / "report.json").read_text())
        assert rep["dma"]["landed_after_panic"] > 0
        assert (out / "artifacts" / name / "report.html").exists()
        assert not list((out / "artifacts" / name).glob("vmcore*"))  # expected verdicts keep no vmcore
        for v in (out / "runs" / name).glob("vmcore*"):
            v.unlink()
