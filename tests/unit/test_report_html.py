"""report.html from real reports (tests/data/report-*.json, kept as the runs wrote them)."""
import copy
import json
import re
from pathlib import Path

import pytest

from harness import report_html
from harness.report_html import render_run_html, write_matrix_html, write_run_html

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = {"pass": "report-pass-nic.json", "corruption": "report-corruption-edu.json", "hang": "report-hang-amd.json"}
RED = report_html.CLASS_STYLE["crash_kernel_region"][0]
ORANGE = report_html.CLASS_STYLE["old_memory_elsewhere"][0]


def sample(kind: str) -> dict:
    return json.loads((DATA / SAMPLES[kind]).read_text())


def section(page: str, ident: str) -> str:
    m = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert m, f"no section {ident}"
    return m.group(1)


def links(page: str) -> list[str]:
    return re.findall(r'(?:href|src)\s*=\s*["\']([^"\']*)["\']', page, re.I)


def assert_self_contained(page: str) -> None:
    for value in links(page):
        assert not re.match(r"\s*[a-z][a-z0-9+.-]*:", value, re.I), f"link with a scheme: {value}"
        assert not value.startswith("//"), value
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    for value in re.findall(r"url\(\s*['\"]?([^)'\"]*)", page, re.I):
        assert value.startswith("#"), f"url() that is not local: {value}"
    assert "@import" not in page.lower()


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_samples_render_self_contained(kind, tmp_path):
    report = sample(kind)
    path = write_run_html(report, tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert_self_contained(page)
    assert f">{report['verdict']}</span>" in page
    assert report["scenario"]["name"] in page
    assert report_html.VERDICT_COLOURS[report["verdict"]] in page
    assert page.count("<svg") == 2, "a memory map and a timeline"
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    # every phase and mark shows up in the tables
    for name in [k for k in report["timings_s"] if k != "total"] + list(report["marks_s"]):
        assert f"<td>{name}</td>" in page
    assert f"<b>{report['timings_s']['total']:.2f}</b></td>" in page
    assert not list(tmp_path.glob("*.tmp"))


def test_corruption_shows_the_misdirected_markers(tmp_path):
    report = sample("corruption")
    page = render_run_html(report, tmp_path)
    assert "as expected: expected CORRUPTION" in page
    mis = section(page, "misdirected")
    for f in report["dma"]["misdirected"]:
        assert f"0x{f['phys']:x}" in mis
    for c in report["dma"]["canaries"]["changed"]:
        assert f"0x{c['phys']:x}" in page
    memory = section(page, "memory-map")
    # misdirected classes and changed canaries are drawn in their colours
    assert RED in memory and ORANGE in memory
    lo, hi = report["kdump"]["crash_kernel_range"]
    assert f"0x{lo:x}" in memory and f"0x{hi:x}" in memory
    timeline = section(page, "timeline")
    assert report_html.DROPPED_COLOUR in timeline  # translation switched off, marked
    assert "63" in section(page, "dma")
    assert "vmcore</td><td>7</td>" in mis  # found on canary page 7


def test_pass_map_has_no_misdirected_colours(tmp_path):
    page = render_run_html(sample("pass"), tmp_path)
    memory = section(page, "memory-map")
    assert RED not in memory and ORANGE not in memory
    assert report_html.CLASS_STYLE["old_memory_expected"][0] in memory
    assert "no misdirected marker records" in section(page, "misdirected")


def test_zoom_windows_cover_what_went_wrong():
    report = sample("corruption")
    top = report_html._ram_top(report)
    assert top == 0x3FFDD000
    windows = report_html._zoom_windows(report, top)
    assert 1 <= len(windows) <= 3
    for f in report["dma"]["misdirected"]:
        assert any(lo <= f["phys"] < hi for lo, hi, _ in windows)
    for mib in report["dma"]["memory"]["hits_by_mib"]["crash_kernel_region"]:
        assert any(lo <= int(mib) << 20 < hi for lo, hi, _ in windows)
    assert report_html._zoom_windows(sample("pass"), top) == []


def test_partial_report_renders_what_exists(tmp_path):
    report = sample("hang")
    page = render_run_html(report, tmp_path)
    assert "KDUMP_HANG" in page and "timed out after 90 s" in page
    assert "no DMA analysis in this report" in section(page, "dma")
    assert "vmcore" in section(page, "files") and "(absent)" in section(page, "files")
    assert "<svg" in section(page, "memory-map")  # the first kernel's memory was known
    assert "crash_kernel_start" in section(page, "timeline")


@pytest.mark.parametrize("report", [
    {},
    {"verdict": "ERROR", "reason": "QEMU is not installed"},
    {"verdict": "FIRST_BOOT_FAILED", "scenario": {"name": "x", "memory_mb": 1024}, "marks_s": {"qemu_started": 1.2},
     "timings_s": {"prepare": 1.0, "boot": 180.0, "total": 181.2}, "kdump": {"crash_kernel_range": None}},
    {"verdict": "PASS", "memory_map": "garbage", "marks_s": {"a": "soon", "b": float("nan")}, "timings_s": [],
     "dma": {"sent": 3, "memory": {"hits_by_mib": {"old_memory_elsewhere": {"x": "y", "7": 2}},
                                   "targets": [{"phys": "0x1000", "kind": None}, 5],
                                   "canaries": [{"phys": None}, {"phys": 8192, "state": "weird"}]},
             "timeline": {"bins": [{"t": 1, "sent": "many"}, {}, None]}, "misdirected": [{"phys": "zz"}],
             "canaries": {"changed": [{"phys": 4096}]}, "landed": {"old_memory_elsewhere": 2},
             "ground_truth": {"evidence": ["one", 2], "devices": {"00:05.0": None}}},
     "kdump": {"crash_kernel_range": [1 << 20, (2 << 20) - 1]}, "evidence": "not a list", "files": {"a": 3}},
], ids=["empty", "error", "first-boot-failed", "malformed"])
def test_any_report_renders(report, tmp_path):
    page = write_run_html(report, tmp_path).read_text()
    assert page.rstrip().endswith("</html>")
    assert "could not be drawn" not in page
    assert_self_contained(page)


def test_report_from_before_the_memory_picture_renders(tmp_path):
    report = sample("pass")
    del report["dma"]["memory"], report["dma"]["timeline"]
    page = render_run_html(report, tmp_path)
    assert page.count("<svg") == 2
    assert "PASS" in page


def test_a_failing_picture_leaves_the_tables(tmp_path, monkeypatch):
    def boom(report):
        raise ValueError("bad <data>")
    monkeypatch.setattr(report_html, "memory_map_svg", boom)
    page = render_run_html(sample("corruption"), tmp_path)
    assert "the memory map could not be drawn: ValueError: bad &lt;data&gt;" in page
    assert "0x39dd000" in section(page, "misdirected")
    assert page.count("<svg") == 1


def test_hostile_strings_are_escaped(tmp_path):
    report = copy.deepcopy(sample("corruption"))
    report["scenario"]["name"] = "<script>alert(1)</script>"
    report["reason"] = '"><img src=http://evil.example/x.png onerror=alert(1)>'
    report["evidence"] = ["console: \x1b[31m<b>red</b>\x00", "<iframe src=//evil>"]
    report["memory_map"][1]["name"] = "<svg onload=alert(1)>"
    report["dma"]["misdirected"][0]["where"] = "<i>where</i>"
    report["dma"]["ground_truth"]["evidence"].append("</pre><script>x()</script>")
    report["files"]["evil"] = 'javascript:alert(1)" onclick="x'
    report["kernel"]["release"] = "6.1 & <friends>"
    report["marks_s"]["<script>$\\frac{x$"] = 20.0  # drawn on the timeline: no mathtext, no markup
    page = render_run_html(report, tmp_path)
    assert page.count("<svg") == 2 and "could not be drawn" not in page
    assert_self_contained(page)
    assert "<script>" not in page and "<img" not in page and "<iframe" not in page and "<b>red" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=http://evil.example/x.png" in page
    assert "\\x1b[31m" in page and "\x00" not in page
    assert "6.1 &amp; &lt;friends&gt;" in page
    assert "<svg onload" not in page
    assert "&lt;i&gt;where&lt;/i&gt;" in page


def test_files_are_linked_relative(tmp_path):
    report = sample("corruption")
    for name in ("vmcore", "qemu-cmdline.txt", "rerun.sh", "console-first.log", "report.json"):
        (tmp_path / name).write_text("x")
    report["kdump"]["vmcore"] = str(tmp_path / "vmcore")
    files = section(render_run_html(report, tmp_path), "files")
    hrefs = links(files)
    for name in ("vmcore", "qemu-cmdline.txt", "rerun.sh", "console-first.log", "report.json"):
        assert name in hrefs
    assert all(not h.startswith("/") for h in hrefs)
    assert "console-crash.log <span class=\"note\">(absent)</span>" in files


def test_matrix_page(tmp_path):
    runs = []
    for kind in ("pass", "corruption", "hang"):
        d = tmp_path / "runs" / kind
        d.mkdir(parents=True)
        report = sample(kind)
        write_run_html(report, d)
        runs.append((report, d))
    wrong = copy.deepcopy(sample("corruption"))
    wrong["expected"] = "PASS"
    wrong["scenario"]["name"] = "<b>bold</b>"
    (tmp_path / "runs" / "wrong").mkdir()
    runs.append((wrong, tmp_path / "runs" / "wrong"))  # no report file at all
    path = write_matrix_html(runs, tmp_path / "out" / "matrix.html")  # makes its directory
    page = path.read_text()
    assert_self_contained(page)
    hrefs = links(page)
    assert hrefs == ["../runs/pass/report.html", "../runs/corruption/report.html", "../runs/hang/report.html"]
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<tbody>")[-1], re.S)
    assert len(rows) == 4
    assert '<span class="match yes">yes</span>' in rows[1]
    assert '<span class="match no">no</span>' in rows[3] and "&lt;b&gt;bold&lt;/b&gt;" in rows[3]
    assert "<b>bold" not in page
    assert "<th>runs</th><td>4</td>" in page
    assert '<th>verdict as expected</th><td><span class="good">3</span>' in page
    assert '<th>verdict not as expected</th><td><span class="bad">1</span>' in page
    assert "CORRUPTION 2" in page and "KDUMP_HANG 1" in page and "PASS 1" in page
    total = sum(r["timings_s"]["total"] for r, _ in runs)
    assert f"{total:.1f}" in page


def test_smmu_story_is_shown(tmp_path):
    rep = copy.deepcopy(sample("pass"))
    rep["iommu"]["smmu"] = {"story": ["40.944s GBPA <- 0x80100000 (abort while disabled)",
                                      "40.949s CR0 <- 0x9 (SMMUEN|CMDQEN)"],
                            "aborted_after_panic": {"00:05.0": 8064}, "passed_untranslated_after_panic": {}}
    iommu = section(render_run_html(rep, tmp_path), "iommu")
    assert "what the crash kernel did with the SMMU" in iommu
    assert "GBPA &lt;- 0x80100000" in iommu and "SMMUEN|CMDQEN" in iommu and "8064" in iommu
    assert "SMMU" not in section(render_run_html(sample("pass"), tmp_path), "iommu")
