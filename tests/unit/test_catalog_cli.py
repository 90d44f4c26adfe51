import json
from pathlib import Path

import pytest

from harness import catalog
from harness.cli import build_parser, scenario_from_args
from harness.errors import UsageError
from harness.machine import Sockets
from harness.repro import scenario_from_report
from harness.rerun import manual_argv
from harness.scenario import Scenario


def args(*argv):
    return build_parser().parse_args(["run", *argv])


def test_catalog_is_big_enough_and_consistent():
    names = [sc.name for sc in catalog.CATALOG]
    assert len(names) >= 12 and len(set(names)) == len(names)
    for sc in catalog.CATALOG:
        assert sc.expect and sc.reason, sc.name
        assert sc.iommu in sc.tags and sc.dma in sc.tags
    # the history the catalog must cover
    assert {"intel", "amd", "none"} <= {sc.iommu for sc in catalog.CATALOG}
    assert any("x-scalable-mode=on" in sc.iommu_options for sc in catalog.CATALOG)
    assert any(sc.expect != "PASS" and "intel_iommu=off" in sc.crash_append for sc in catalog.CATALOG)
    assert any(sc.expect != "PASS" and "amd_iommu=off" in sc.crash_append for sc in catalog.CATALOG)
    assert any("iommu=pt" in sc.first_append for sc in catalog.CATALOG)
    assert any("iommu.passthrough=1" in sc.first_append for sc in catalog.CATALOG)
    assert {"iommu.strict=1", "iommu.strict=0"} <= {o for sc in catalog.CATALOG for o in sc.first_append}
    assert any("reset_devices" not in sc.crash_base for sc in catalog.CATALOG)
    assert any(sc.crash_load_driver for sc in catalog.CATALOG)
    assert any("swiotlb=force" in sc.crash_append for sc in catalog.CATALOG)
    assert {"debian-6.1", "debian-6.12"} <= {sc.kernel for sc in catalog.CATALOG}


def test_select_by_tag_negation_and_glob():
    amd = catalog.select(["amd"])
    assert amd and all(sc.iommu == "amd" for sc in amd)
    assert all("slow" not in sc.tags for sc in catalog.select(["!slow"]))
    assert [sc.name for sc in catalog.select(["intel-off-*+6.12"])] == ["intel-off-edu-6.12"]
    # several terms: any of them
    assert {sc.name for sc in catalog.select(["intel-copy-edu", "amd-copy-edu"])} == {"intel-copy-edu", "amd-copy-edu"}
    assert {sc.name for sc in catalog.select(["amd+control", "none-edu"])} == {"amd-off-nic", "none-edu"}


def test_run_without_name_is_the_default_scenario():
    assert scenario_from_args(args()) == catalog.by_name(catalog.DEFAULT)


def test_options_override_a_named_scenario_and_drop_its_expectation():
    sc = scenario_from_args(args("intel-off-edu", "--kernel", "debian-6.12", "--crash-append", "foo=1"))
    assert sc.kernel == "debian-6.12"
    assert sc.crash_append == ("intel_iommu=off", "foo=1")  # appended after the entry's own
    assert sc.expect == "" and sc.name == "intel-off-edu+custom"


def test_unknown_name():
    with pytest.raises(UsageError, match="no scenario named 'intel-of'.*did you mean intel-"):
        catalog.by_name("intel-of")


def write_report(tmp_path, **over):
    rep = {"report_version": 1, "scenario": Scenario(name="x", iommu="amd", dma="edu").to_json(),
           "verdict": "PASS", "kernel": {"package": "linux-image-6.1.0-56-amd64", "version": "6.1.192-2"}}
    rep.update(over)
    p = tmp_path / "report.json"
    p.write_text(json.dumps(rep))
    return p


def test_repro_pins_the_exact_kernel(tmp_path):
    sc, verdict = scenario_from_report(write_report(tmp_path))
    assert verdict == "PASS" and sc.iommu == "amd" and sc.dma == "edu"
    assert sc.kernel == "debian:linux-image-6.1.0-56-amd64=6.1.192-2"


@pytest.mark.parametrize("content, msg", [(None, "does not exist"), ("{", "not a readable"),
                                          ('{"a": 1}', "not a kdump-harness report")])
def test_repro_bad_reports(tmp_path, content, msg):
    p = tmp_path / "r.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UsageError, match=msg):
        scenario_from_report(p)


def test_repro_refuses_other_versions(tmp_path):
    with pytest.raises(UsageError, match="report_version 9"):
        scenario_from_report(write_report(tmp_path, report_version=9))


def test_manual_argv_swaps_the_harness_sockets(tmp_path):
    s = Sockets(Path("/tmp/kh-a/qmp"), Path("/tmp/kh-a/con"), Path("/tmp/kh-a/res"), Path("/tmp/kh-a/qtest"))
    out = tmp_path / "run"
    argv = ["qemu-system-x86_64", "-chardev", "socket,id=qmp0,path=/tmp/kh-a/qmp",
            "-chardev", "socket,id=con0,path=/tmp/kh-a/con", "-chardev", "socket,id=res0,path=/tmp/kh-a/res",
            "-qtest", "unix:/tmp/kh-a/qtest", "-initrd", f"{out}/initrd.img",
            "-drive", f"if=none,id=dump,file={out}/dump.img", "-netdev", "dgram,local.path=/tmp/kh-run-1/nic-q",
            "-D", f"{out}/guest.trace.log"]
    m = manual_argv(argv, s, out, Path("/tmp/kh-run-1"), None)
    assert "socket,id=qmp0,path=$D/qmp,server=on,wait=off" in m
    assert "stdio,id=con0,signal=off" in m
    assert "file,id=res0,path=results-rerun.log" in m
    assert "unix:$D/qtest,server=on,wait=off" in m
    assert "$D/initrd" in m and "if=none,id=dump,file=dump-rerun.img" in m
    assert "dgram,local.path=$D/nic-q" in m and "guest.trace.log" in m
    assert not any("/tmp/kh-a" in a for a in m)


def test_arch_alone_runs_that_architectures_default():
    sc = scenario_from_args(args("--arch", "arm64"))
    assert sc == catalog.by_name("smmuv3-edu") and sc.arch == "aarch64" and sc.panic_method == "sysrq"
    assert {"arm64", "slow", "smmuv3"} <= set(sc.tags)
    # restating what the entry says changes nothing; a real change makes it custom
    assert scenario_from_args(args("--arch", "aarch64", "--iommu", "smmuv3")) == sc
    custom = scenario_from_args(args("--arch", "aarch64", "--iommu", "none"))
    assert custom.name == "smmuv3-edu+custom" and custom.iommu == "none" and custom.expect == ""
    # an x86 entry moved to arm64 keeps its IOMMU, which virt does not have
    with pytest.raises(UsageError, match=r"--iommu intel does not exist on Arm64"):
        scenario_from_args(args("intel-copy-nic", "--arch", "aarch64"))
    with pytest.raises(UsageError, match="unknown architecture 'sparc'"):
        scenario_from_args(args("--arch", "sparc"))


def test_scenario_per_architecture():
    arm = Scenario(arch="arm64", iommu="smmuv3", dma="edu")
    assert arm.arch == "aarch64" and arm.panic_method == "sysrq"
    assert arm.first_cmdline()[0] == "console=ttyAMA0" and "unknown_nmi_panic" not in arm.first_cmdline()
    assert arm.crash_cmdline()[:2] == ("console=ttyAMA0", "panic=-1")
    x86 = Scenario()
    assert x86.arch == "x86_64" and x86.panic_method == "nmi" and "unknown_nmi_panic" in x86.first_cmdline()
    # moving a scenario to another architecture takes that architecture's panic method
    assert x86.replace(arch="aarch64", iommu="none").panic_method == "sysrq"
    with pytest.raises(UsageError, match="--panic nmi does not work on Arm64"):
        Scenario(arch="aarch64", iommu="none", panic_method="nmi")
    with pytest.raises(UsageError, match="--guest debian is built for x86_64 only"):
        Scenario(arch="aarch64", iommu="none", guest="debian")
    # a report written before the arch field existed replays as x86_64
    d = x86.to_json()
    del d["arch"]
    assert Scenario.from_json(d) == x86
    assert Scenario.from_json(arm.to_json()) == arm
