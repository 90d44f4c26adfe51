"""Many scenarios, N at a time, one combined JUnit + HTML report.

Each scenario runs in its own `kdump-harness run` process (its own QEMU, sockets,
scratch directories and RAM file; the artifact cache is shared under file
locks), so parallel runs share nothing but the cache. The matrix shows progress
as scenarios start and finish, ends with a summary table, and passes when every
verdict is the one its scenario expects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from .deadline import Deadline
from .errors import UsageError
from .scenario import Scenario

# A scenario's own phases have deadlines; this bounds a whole `run` process in case
# the process itself wedges. Scaled like every other deadline.
RUN_BUDGET_S = 1800.0


@dataclass
class MatrixEntry:
    scenario: Scenario
    outdir: Path
    status: str = "queued"          # queued, running, done
    verdict: str | None = None
    seconds: float | None = None
    returncode: int | None = None
    report: dict | None = None
    error: str = ""

    @property
    def matched(self) -> bool:
        return self.verdict is not None and self.verdict == (self.scenario.expect or "PASS")


@dataclass
class Matrix:
    entries: list[MatrixEntry]
    outdir: Path
    jobs: int = 1
    accel: str = "auto"
    extra_args: Sequence[str] = ()          # passed to every `kdump-harness run`
    stream: TextIO = sys.stderr
    started: float = field(default_factory=time.monotonic)
    _procs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def say(self, line: str) -> None:
        with self._lock:
            print(f"[{time.monotonic() - self.started:6.0f}s] {line}", file=self.stream, flush=True)

    def argv(self, e: MatrixEntry) -> list[str]:
        return [sys.executable, "-m", "harness.cli", "run", e.scenario.name, "--out", str(e.outdir),
                "--accel", self.accel, *self.extra_args]

    def run_one(self, e: MatrixEntry) -> None:
        e.status = "running"
        done = sum(1 for x in self.entries if x.status == "done")
        self.say(f"start  {e.scenario.name}  ({done}/{len(self.entries)} done)")
        log = open(e.outdir.parent / f"{e.scenario.name}.log", "w")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(self.argv(e), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            with self._lock:
                self._procs[e.scenario.name] = proc
            deadline = Deadline(RUN_BUDGET_S, f"the {e.scenario.name} run to finish")
            try:
                e.returncode = proc.wait(timeout=deadline.remaining())
            except subprocess.TimeoutExpired:
                e.error = f"{deadline.exceeded()}; stopped it"
                self._stop_proc(proc)
                e.returncode = proc.returncode
        finally:
            log.close()
            with self._lock:
                self._procs.pop(e.scenario.name, None)
        e.seconds = round(time.monotonic() - t0, 1)
        report = e.outdir / "report.json"
        try:
            e.report = json.loads(report.read_text())
            e.verdict = e.report.get("verdict")
        except (OSError, ValueError):
            tail = (e.outdir.parent / f"{e.scenario.name}.log").read_text(errors="replace").strip().splitlines()
            e.error = e.error or (tail[-1] if tail else f"exit status {e.returncode}, no report")
            e.verdict = "ERROR"
        e.status = "done"
        mark = "ok" if e.matched else "UNEXPECTED"
        self.say(f"done   {e.scenario.name}: {e.verdict} (expected {e.scenario.expect or 'PASS'}, {mark}, "
                 f"{e.seconds:.0f} s){' ' + e.error if e.error else ''}")

    def _stop_proc(self, proc: subprocess.Popen) -> None:
        """SIGTERM: the run cleans up (QEMU reaped, report written); SIGKILL if it does not."""
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            self._stop_proc(p)

    def execute(self) -> bool:
        self.outdir.mkdir(parents=True, exist_ok=True)
        for e in self.entries:
            e.outdir.parent.mkdir(parents=True, exist_ok=True)
        queue = list(self.entries)
        qlock = threading.Lock()

        def worker() -> None:
            while not self._stopping.is_set():
                with qlock:
                    if not queue:
                        return
                    e = queue.pop(0)
                self.run_one(e)

        threads = [threading.Thread(target=worker, name=f"matrix-{i}", daemon=True) for i in range(self.jobs)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            self.say("interrupted: stopping the running scenarios (their partial output is kept)")
            self.stop()
            for t in threads:
                t.join(timeout=120)
            raise
        finally:
            self.write_reports()
        return all(e.matched for e in self.entries)

    def results(self) -> list[tuple[dict, Path]]:
        out = []
        for e in self.entries:
            rep = e.report or {"report_version": 1, "scenario": e.scenario.to_json(), "verdict": e.verdict or "ERROR",
                               "reason": e.error or "the run wrote no report", "expected": e.scenario.expect,
                               "evidence": [], "timings_s": {"total": e.seconds or 0.0}}
            out.append((rep, e.outdir))
        return out

    def write_reports(self) -> None:
        from .junit import write_junit
        from .report_html import write_matrix_html

        results = self.results()
        write_junit(results, self.outdir / "junit.xml")
        write_matrix_html(results, self.outdir / "matrix.html")
        summary = [{"scenario": e.scenario.name, "expected": e.scenario.expect, "verdict": e.verdict,
                    "matched": e.matched, "seconds": e.seconds, "run_dir": str(e.outdir)} for e in self.entries]
        (self.outdir / "matrix.json").write_text(json.dumps({
            "jobs": self.jobs, "wall_s": round(time.monotonic() - self.started, 1), "runs": summary}, indent=1) + "\n")

    def summary_table(self) -> str:
        w = max([len(e.scenario.name) for e in self.entries] + [8])
        lines = [f"{'SCENARIO':<{w}}  {'EXPECTED':<15}  {'VERDICT':<17}  {'SECONDS':>7}"]
        for e in self.entries:
            lines.append(f"{e.scenario.name:<{w}}  {e.scenario.expect or 'PASS':<15}  "
                         f"{(e.verdict or '-') + ('' if e.matched else ' !'):<17}  "
                         f"{e.seconds if e.seconds is not None else '-':>7}")
        ok = sum(e.matched for e in self.entries)
        lines.append(f"\n{ok}/{len(self.entries)} as expected; wall time "
                     f"{time.monotonic() - self.started:.0f} s with {self.jobs} job(s); "
                     f"reports: {self.outdir / 'matrix.html'}  {self.outdir / 'junit.xml'}")
        return "\n".join(lines)


def plan(scenarios: Sequence[Scenario], outdir: Path) -> list[MatrixEntry]:
    if not scenarios:
        raise UsageError("the matrix is empty: no scenario matches the filters (kdump-harness list shows them)")
    return [MatrixEntry(sc, outdir / "runs" / sc.name) for sc in scenarios]
