import pytest

from harness.errors import UsageError
from harness.scenario import Scenario, split_options


def test_roundtrip_through_json():
    s = Scenario(name="t", iommu="amd", crash_append=("amd_iommu=off",), memory_mb=2048)
    assert Scenario.from_json(s.to_json()) == s


def test_command_lines():
    s = Scenario(iommu="intel", crash_append=("intel_iommu=off",))
    first = s.first_cmdline()
    assert "crashkernel=256M" in first and "intel_iommu=on" in first and "unknown_nmi_panic" in first
    crash = s.crash_cmdline()
    # the scenario's own options come last, so they override the defaults
    assert crash[-1] == "intel_iommu=off"
    assert crash.index("intel_iommu=on") < crash.index("intel_iommu=off")
    assert {"irqpoll", "nr_cpus=1", "reset_devices"} <= set(crash)


def test_bad_values_are_usage_errors():
    with pytest.raises(UsageError, match="unknown IOMMU"):
        Scenario(iommu="sparc")
    with pytest.raises(UsageError, match="panic method"):
        Scenario(panic_method="kick")
    with pytest.raises(UsageError, match="does not know"):
        Scenario.from_json({"name": "x", "frobs": 1})


def test_split_options():
    assert split_options('a=1 "b c"') == ("a=1", "b c")
    assert split_options("") == ()
    with pytest.raises(UsageError):
        split_options('"unterminated')
