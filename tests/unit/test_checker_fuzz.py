"""A short libFuzzer + ASan + UBSan run over the checker's open/parse/scan path.

Skipped only when clang is missing. The longer run is ci/fuzz-checker.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ_DIR = os.path.join(ROOT, "csrc", "checker", "fuzz")
SECONDS = int(os.environ.get("KH_FUZZ_SECONDS", "20"))

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "clang")) is None,
    reason="clang is not installed (apt-get install clang libclang-rt-14-dev): "
           "the libFuzzer+ASan target needs it")


def test_fuzz_checker_briefly(tmp_path):
    out = tmp_path / "out"
    build = subprocess.run([os.path.join(FUZZ_DIR, "build.sh"), str(out)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, f"fuzz target did not build:\n{build.stdout}{build.stderr}"
    seeds, corpus = tmp_path / "seeds", tmp_path / "corpus"
    subprocess.run([sys.executable, os.path.join(FUZZ_DIR, "make_seeds.py"), str(seeds)], check=True, timeout=60)
    corpus.mkdir()
    env = dict(os.environ, KH_FUZZ_TMPDIR=str(tmp_path),
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    p = subprocess.run([str(out / "fuzz_khscan"), f"-max_total_time={SECONDS}", "-max_len=65536",
                        "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
                        f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds)],
                       capture_output=True, text=True, timeout=SECONDS + 120, env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "ERROR:" not in log and "runtime error" not in log, log[-4000:]
    assert "Done " in log
