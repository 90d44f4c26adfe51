"""report.html as a browser draws it: headless Chromium screenshots of real reports.

The memory map's place on the page is found by a second screenshot of the same
page with everything but the map hidden (`visibility: hidden` keeps the layout),
so the colour check looks at the map and not at, say, the red verdict badge.
The CORRUPTION screenshot is kept in $KH_ARTIFACTS (default <repo>/test-artifacts).
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.report_html import write_run_html

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "tests" / "data"
WINDOW = (1400, 2400)
DEADLINE_S = 120
ISOLATE_MAP = ("<style>body *{visibility:hidden !important}"
               "#memory-map figure, #memory-map figure *{visibility:visible !important}</style></head>")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                          "(Debian package: chromium)")


def artifacts_dir() -> Path:
    d = Path(os.environ.get("KH_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(html: Path, png: Path) -> None:
    """Chromium draws `html` into `png`, within DEADLINE_S; its whole process group dies after."""
    with tempfile.TemporaryDirectory(prefix="kh-chromium-") as profile:
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", html.as_uri()]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"chromium did not write a screenshot of {html} within {DEADLINE_S} s")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind by the browser
            except ProcessLookupError:
                pass
    assert png.exists() and png.stat().st_size > 0, \
        f"chromium exited {proc.returncode} without a screenshot:\n{out.decode(errors='replace')[-2000:]}"


def pixels(png: Path):
    import matplotlib.image
    img = matplotlib.image.imread(str(png))  # floats 0..1, RGB(A)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    return img[:, :, :3]


def reddish(rgb):
    return (rgb[:, :, 0] > 0.7) & (rgb[:, :, 1] < 0.35) & (rgb[:, :, 2] < 0.35)


def render(kind: str, tmp_path: Path):
    """(full screenshot, screenshot of the map alone) of one sample report, as RGB arrays."""
    run_dir = tmp_path / kind
    run_dir.mkdir()
    report = json.loads((DATA / f"report-{kind}.json").read_text())
    html = write_run_html(report, run_dir)
    isolated = run_dir / "map-only.html"
    isolated.write_text(html.read_text().replace("</head>", ISOLATE_MAP, 1))
    screenshot(html, run_dir / "page.png")
    screenshot(isolated, run_dir / "map.png")
    return run_dir, pixels(run_dir / "page.png"), pixels(run_dir / "map.png")


def map_box(map_only):
    """Bounding box (top, bottom, left, right) of what the map-only screenshot draws."""
    import numpy as np
    ink = (map_only < 0.97).any(axis=2)
    rows, cols = np.nonzero(ink)
    assert rows.size, "the memory map drew nothing"
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_corruption_report_shows_red_in_the_memory_map(tmp_path):
    run_dir, page, map_only = render("corruption-edu", tmp_path)
    shutil.copy(run_dir / "page.png", artifacts_dir() / "report-corruption-edu.png")
    shutil.copy(run_dir / "report.html", artifacts_dir() / "report-corruption-edu.html")
    assert page.reshape(-1, 3).std(axis=0).max() > 0.05, "the page is one flat colour"
    top, bottom, left, right = map_box(map_only)
    assert right - left > WINDOW[0] // 2 and bottom - top > 300, f"map box {top, bottom, left, right} too small"
    assert top < WINDOW[1] - 300, "the memory map is not on the first screen"
    region = page[top:bottom, left:right]
    assert (region == map_only[top:bottom, left:right]).mean() > 0.9, "the page and the map-only page disagree"
    assert reddish(region).sum() >= 40, "no misdirected (red) marks drawn in the memory map"


def test_pass_report_has_no_red_in_the_memory_map(tmp_path):
    _, page, map_only = render("pass-nic", tmp_path)
    top, bottom, left, right = map_box(map_only)
    assert right - left > WINDOW[0] // 2 and bottom - top > 300
    assert reddish(page[top:bottom, left:right]).sum() == 0
