from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"


@pytest.fixture
def fake_qemu() -> str:
    return str(FAKES / "fake_qemu.py")


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path, monkeypatch):
    """Unit tests get their own artifact cache; tests that boot use the real one."""
    if "boot" not in request.keywords:
        monkeypatch.setenv("KDUMP_HARNESS_CACHE", str(tmp_path / "cache"))
