"""The whole scenario catalog, each entry against its expected verdict (slow: the opt-in job)."""
import pytest

from harness.catalog import CATALOG

pytestmark = pytest.mark.boot

MARKS = {"intel": "intel", "amd": "amd", "none": "noiommu", "virtio": "virtio", "smmuv3": "smmuv3", "arm64": "arm64",
         "6.1": "k61", "6.12": "k612", "control": "control"}


def params():
    for sc in CATALOG:
        marks = [getattr(pytest.mark, MARKS[t]) for t in sc.tags if t in MARKS] + [pytest.mark.slow]
        yield pytest.param(sc, id=sc.name, marks=marks)


@pytest.mark.parametrize("scenario", params())
def test_catalog_entry(kdump_run, scenario):
    run = kdump_run(scenario)
    assert run.outcome.verdict.value == scenario.expect, (
        f"{scenario.name}: {run.outcome.verdict.value} ({run.outcome.reason}), expected {scenario.expect}: "
        f"{scenario.reason}")
