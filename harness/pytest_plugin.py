"""pytest plugin: real kdump runs as fixtures.

Installed with the package (entry point `pytest11`). Fixtures:

* `kdump_run(scenario) -> KdumpRun`: runs a whole scenario and returns the
  finished run (`.outcome`, `.report()`, `.vmcore`, `.outdir`).
* `armed_run`: a booted, kdump-armed guest (`KdumpRun` after `boot()`); the test
  drives the rest (`panic()`, `follow_crash()`, `collect()`, `analyze()`).
  Parametrize it indirectly with a Scenario, or get the default one.

Options: `--run-slow` (tests marked slow), `--kh-kernel` (kernel for the default
scenario), `--kh-accel` (auto/kvm/tcg), `--kh-out DIR` (keep run directories
there instead of pytest's tmp_path), `--kh-keep-vmcores` (keep vmcores of passing
tests; by default they are deleted, failing tests keep theirs).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .scenario import Scenario


def pytest_addoption(parser):
    g = parser.getgroup("kdump-harness")
    g.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    g.addoption("--kh-kernel", default=None, help="kernel for tests that use the default scenario")
    g.addoption("--kh-accel", default=os.environ.get("KDUMP_HARNESS_ACCEL", "auto"), help="auto, kvm or tcg")
    g.addoption("--kh-out", default=None, help="directory for run outputs (default: pytest tmp_path)")
    g.addoption("--kh-keep-vmcores", action="store_true", help="keep the vmcores of passing tests")


MARKERS = {
    "boot": "boots real kernels in QEMU (integration tier)",
    "slow": "too slow for the default CI job; run with --run-slow",
    "intel": "catalog entries with the Intel IOMMU", "amd": "catalog entries with the AMD IOMMU",
    "noiommu": "catalog entries without an IOMMU", "virtio": "catalog entries with virtio-iommu",
    "smmuv3": "catalog entries with the Arm SMMUv3", "arm64": "arm64 guests (qemu-system-aarch64)", "k61": "Debian 6.1 kernel", "k612": "Debian 6.12 kernel",
    "control": "positive controls: the harness must detect a failure",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (the nightly/opt-in job)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"kh_rep_{rep.when}", rep)


def _qemu_ready() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run ci/setup.sh)"
    return None


@pytest.fixture
def kh_outdir(request, tmp_path_factory) -> Path:
    base = request.config.getoption("--kh-out")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    if base:
        d = Path(base) / name
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists():
            shutil.rmtree(d)
        return d
    return tmp_path_factory.mktemp("kh") / name


@pytest.fixture
def default_scenario(request) -> Scenario:
    kernel = request.config.getoption("--kh-kernel")
    return Scenario(kernel=kernel) if kernel else Scenario()


def _cleanup(request, runs) -> None:
    rep = getattr(request.node, "kh_rep_call", None)
    failed = rep is None or rep.failed
    for run in runs:
        run.finish()
        if not failed and not request.config.getoption("--kh-keep-vmcores"):
            for p in list(run.outdir.glob("vmcore*")) + list(run.outdir.glob("*.img")) + list(run.outdir.glob("guest-ram*")):
                p.unlink(missing_ok=True)
        elif failed:
            print(f"\nkdump-harness run kept in {run.outdir}")


@pytest.fixture
def kdump_run(request, kh_outdir):
    """Call with a Scenario; returns the finished KdumpRun."""
    from .run import KdumpRun

    reason = _qemu_ready()
    if reason:
        pytest.skip(reason)
    runs = []

    def _run(scenario: Scenario, name: str | None = None, **kw):
        outdir = kh_outdir if not runs and name is None else kh_outdir.parent / f"{kh_outdir.name}-{name or len(runs)}"
        run = KdumpRun(scenario, outdir, accel=request.config.getoption("--kh-accel"), **kw)
        runs.append(run)
        run.execute()
        return run

    yield _run
    _cleanup(request, runs)


@pytest.fixture
def armed_run(request, kh_outdir, default_scenario):
    """A first kernel with kdump armed, waiting for the panic."""
    from .run import KdumpRun

    reason = _qemu_ready()
    if reason:
        pytest.skip(reason)
    scenario = getattr(request, "param", None) or default_scenario
    run = KdumpRun(scenario, kh_outdir, accel=request.config.getoption("--kh-accel"))
    try:
        run.prepare()
        run.boot()
        yield run
    finally:
        _cleanup(request, [run])
