"""report.json -> report.html: one self-contained page a kernel engineer acts on.

The page is a single file: inline CSS, the pictures as inline SVG drawn with
matplotlib (no network, no JavaScript), links relative to the run directory.

    verdict      coloured, with the reason and the evidence lines
    memory map   guest-physical addresses: RAM, the crash kernel's reservation,
                 where the DMA was meant to go, where its markers were found,
                 canary pages; zoomed panels around whatever went wrong
    timeline     phase marks, DMA sent and landed per time bin, the moment the
                 crash kernel switched translation off
    tables       timings, IOMMU facts, DMA summary, misdirected markers, QEMU
                 ground truth, files

A report may be partial (a run that hung, failed to boot or hit a host error):
every section renders what exists and says what is missing. A picture that
cannot be drawn becomes a note; the tables are never lost to a plotting bug.
`write_matrix_html` writes the summary page of several runs.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

log = logging.getLogger(__name__)

MiB = 1 << 20
PAGE = 4096

# -- colours: one table, shared by the pictures, the tables and the legend ---------------

VERDICT_COLOURS = {
    "PASS": "#1a7f37",
    "CORRUPTION": "#c62828",
    "UNSAFE_HANDOVER": "#d84315",
    "INCONCLUSIVE": "#8a6d00",
    "FIRST_BOOT_FAILED": "#6a1b9a",
    "NO_KDUMP": "#6a1b9a",
    "KDUMP_PANIC": "#ad1457",
    "KDUMP_HANG": "#ad1457",
    "NO_VMCORE": "#ad1457",
    "ERROR": "#455a64",
}
UNKNOWN_VERDICT_COLOUR = "#455a64"

# marker classes (harness.analysis.CLASSES): where a found record landed
CLASS_STYLE = {
    "old_memory_expected": ("#2ca02c", "landed where mapped"),
    "old_memory_elsewhere": ("#ff7f0e", "landed elsewhere in old memory"),
    "crash_kernel_region": ("#d62728", "landed in the crash kernel's memory"),
}
MISDIRECTED = ("old_memory_elsewhere", "crash_kernel_region")
CANARY_STYLE = {  # state -> (colour, marker, label)
    "intact": ("#2ca02c", "o", "canary intact"),
    "changed": ("#d62728", "X", "canary changed"),
    "missing": ("#7f7f7f", "s", "canary missing from the vmcore"),
    "unchecked": ("#7f7f7f", "o", "canary not checked"),
}
TARGET_STYLE = {  # kind -> (colour, label)
    "buffer": ("#1f77b4", "mapped buffer (phys)"),
    "old-memory": ("#9467bd", "unmapped IOVA in old memory"),
    "crash-region": ("#8c564b", "unmapped IOVA in the crash region"),
    "nic-buffers": ("#1f77b4", "NIC buffers (pages per MiB)"),
}
RAM_COLOUR = "#c6dbef"
KERNEL_COLOUR = "#6baed6"
OTHER_COLOUR = "#e0e0e0"
CRASH_FACE = "#fff4cc"
CRASH_EDGE = "#c99a00"
DROPPED_COLOUR = "#b71c1c"

PHASE_BANDS = (  # (from mark, to marks tried in order, label, colour)
    ("first_userspace", ("panic",), "first kernel", "#e3f2fd"),
    ("panic", ("crash_kernel_start",), "panic -> kexec", "#ffe0b2"),
    ("crash_kernel_start", ("crash_kernel_exit", "captured", "dma_stopped", "crash_userspace"),
     "crash kernel", "#ede7f6"),
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1f24;
background:#fff}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:6px 0 8px;word-break:break-all}
h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
h3{font-size:14px;margin:16px 0 6px}
.verdict{display:inline-block;color:#fff;font-weight:700;font-size:18px;padding:4px 12px;border-radius:4px;
letter-spacing:.5px}
.match{display:inline-block;font-weight:600;padding:2px 8px;border-radius:4px;margin-left:8px}
.yes{background:#dafbe1;color:#1a7f37}.no{background:#ffebe9;color:#c62828}
.reason{font-size:16px;margin:10px 0 6px}
ul.evidence{margin:4px 0 0;padding-left:20px;font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
ul.evidence li{white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.mono,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
.kv th{width:260px}
figure{margin:8px 0 4px}
figure svg{width:100%;height:auto;display:block}
figcaption{color:#57606a;font-size:12.5px;margin-top:4px}
.note{color:#57606a;font-style:italic}
.bad{color:#c62828;font-weight:600}.good{color:#1a7f37}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap;
word-break:break-all}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.sub{color:#57606a}
td .verdict{font-size:12.5px;padding:1px 8px}
.row{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# -- small helpers ---------------------------------------------------------------------------

def esc(value: Any) -> str:
    """Any value as HTML text: escaped, control characters (console escapes) made visible."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return html.escape(text, quote=True)


def _d(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def hexaddr(value: Any) -> str:
    v = _int(value)
    return f"0x{v:x}" if v is not None else "-"


def mib_label(addr: int) -> str:
    if addr % MiB == 0:
        return f"{addr // MiB} MiB"
    return f"{addr / MiB:.2f} MiB"


def fmt_s(value: Any) -> str:
    v = _num(value)
    return f"{v:.2f}" if v is not None else "-"


def fmt(value: Any) -> str:
    """A fact for a table cell (already escaped)."""
    if value is None:
        return '<span class="note">-</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return esc(f"{value:.3f}".rstrip("0").rstrip("."))
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value)) if value else '<span class="note">none</span>'
    if isinstance(value, dict):
        return esc(", ".join(f"{k}={v}" for k, v in value.items())) if value else '<span class="note">none</span>'
    return esc(value)


def kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """Rows of (label, already escaped cell)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>' if body else '<p class="note">nothing recorded</p>'


def table(head: list[str], rows: list[list[str]], num: Iterable[int] = ()) -> str:
    """A table from escaped cells; `num` are the right-aligned columns."""
    num = set(num)
    th = "".join(f'<th class="num">{esc(h)}</th>' if i in num else f"<th>{esc(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def verdict_badge(verdict: Any) -> str:
    v = str(verdict) if verdict else "UNKNOWN"
    colour = VERDICT_COLOURS.get(v, UNKNOWN_VERDICT_COLOUR)
    return f'<span class="verdict" style="background:{colour}">{esc(v)}</span>'


def href(target: str | os.PathLike, base: Path) -> str:
    """A relative, percent-encoded link from directory `base` to `target`."""
    target = Path(target)
    rel = os.path.relpath(target, base) if target.is_absolute() else str(target)
    return quote(rel.replace(os.sep, "/"), safe="/")


def scenario_name(report: dict) -> str:
    return str(_d(report.get("scenario")).get("name") or "unnamed scenario")


def expected_of(report: dict) -> str:
    return str(report.get("expected") or _d(report.get("scenario")).get("expect") or "")


# -- picture 1: the guest-physical memory map ------------------------------------------------

LANES = ("memory", "DMA targets", "landed: mapped", "landed: elsewhere", "landed: crash region", "canaries")
LANE_Y = {name: len(LANES) - 1 - i for i, name in enumerate(LANES)}
CLASS_LANE = {"old_memory_expected": "landed: mapped", "old_memory_elsewhere": "landed: elsewhere",
              "crash_kernel_region": "landed: crash region"}


def _ram_top(report: dict) -> int | None:
    """The axis end: the last System RAM byte (+1), else what the scenario asked for."""
    ends = [_int(r.get("end")) for r in _l(report.get("memory_map"))
            if isinstance(r, dict) and r.get("name") == "System RAM" and _int(r.get("depth")) == 0]
    ends = [e for e in ends if e is not None]
    if ends:
        return max(ends) + 1
    crash = _crash_range(report)
    mem = _int(_d(report.get("scenario")).get("memory_mb"))
    top = (mem << 20) if mem else None
    if crash and (top is None or crash[1] >= top):
        top = crash[1] + 1
    return top


def _crash_range(report: dict) -> tuple[int, int] | None:
    r = _l(_d(report.get("kdump")).get("crash_kernel_range"))
    if len(r) == 2 and _int(r[0]) is not None and _int(r[1]) is not None:
        return _int(r[0]), _int(r[1])
    return None


def _hits(report: dict) -> dict[str, dict[int, int]]:
    """class -> {MiB: records}, from dma.memory.hits_by_mib."""
    out: dict[str, dict[int, int]] = {}
    for cls, per in _d(_d(_d(report.get("dma")).get("memory")).get("hits_by_mib")).items():
        for mib, n in _d(per).items():
            m, c = _int(mib), _int(n)
            if m is not None and c:
                out.setdefault(str(cls), {})[m] = c
    return out


def _zoom_windows(report: dict, top: int) -> list[tuple[int, int, int]]:
    """Up to three (lo, hi, weight) windows around misdirected markers and changed canaries."""
    dma = _d(report.get("dma"))
    spans: list[tuple[int, int, int]] = []  # (lo, hi, weight)
    for f in _l(dma.get("misdirected")):
        p = _int(_d(f).get("phys"))
        if p is not None:
            spans.append((p, p + 64, 1))
    for c in _l(_d(dma.get("canaries")).get("changed")):
        p = _int(_d(c).get("phys"))
        if p is not None:
            spans.append((p, p + PAGE, 1))
    listed = {s[0] >> 20 for s in spans}
    for cls, per in _hits(report).items():
        if cls in MISDIRECTED:
            for mib, n in per.items():
                if mib not in listed:  # a MiB known only by its count: show the whole MiB
                    spans.append((mib << 20, (mib + 1) << 20, n))
    if not spans:
        return []
    spans.sort()
    clusters: list[list[int]] = []
    for lo, hi, w in spans:
        if clusters and lo - clusters[-1][1] <= 4 * MiB:
            clusters[-1][1] = max(clusters[-1][1], hi)
            clusters[-1][2] += w
        else:
            clusters.append([lo, hi, w])
    best = sorted(clusters, key=lambda c: -c[2])[:3]
    out = []
    for lo, hi, w in sorted(best):
        pad = max(128 * 1024, (hi - lo) // 10)
        lo, hi = max(0, lo - pad), min(top, hi + pad) if top else hi + pad
        lo -= lo % PAGE
        out.append((lo, max(hi, lo + PAGE), w))
    return out


def _draw_lanes(ax, report: dict, lo: int, hi: int, zoom: bool) -> set[str]:
    """Draw every lane of the map between lo and hi on `ax`; return the legend keys used."""
    used: set[str] = set()
    y = LANE_Y
    span = max(hi - lo, 1)
    min_w = span / 500  # the narrowest thing still drawn as at least ~2 px
    crash = _crash_range(report)
    if crash and crash[1] >= lo and crash[0] <= hi:
        ax.axvspan(max(crash[0], lo), min(crash[1] + 1, hi), color=CRASH_FACE, zorder=0)
        ax.axvspan(max(crash[0], lo), min(crash[1] + 1, hi), facecolor="none", edgecolor=CRASH_EDGE,
                   hatch="//", linewidth=0.8, zorder=0.5)
        used.add("crash")
    # memory lane: /proc/iomem, depth 0 (RAM, reserved), kernel image rows (depth 1)
    for r in _l(report.get("memory_map")):
        if not isinstance(r, dict):
            continue
        s, e, depth, name = _int(r.get("start")), _int(r.get("end")), _int(r.get("depth")), str(r.get("name", ""))
        if s is None or e is None or e < lo or s > hi:
            continue
        s, e = max(s, lo), min(e + 1, hi)
        if depth == 0:
            colour = RAM_COLOUR if name == "System RAM" else OTHER_COLOUR
            ax.barh(y["memory"], e - s, left=s, height=0.6, color=colour, edgecolor="#9e9e9e", linewidth=0.4,
                    zorder=1)
            used.add("ram" if name == "System RAM" else "other")
        elif depth == 1 and name.startswith("Kernel "):
            ax.barh(y["memory"], max(e - s, min_w), left=s, height=0.3, color=KERNEL_COLOUR, zorder=2)
            used.add("kernel")
    # expected targets
    for t in _l(_d(_d(report.get("dma")).get("memory")).get("targets")):
        t = _d(t)
        p, kind = _int(t.get("phys")), str(t.get("kind", ""))
        if p is None or p < lo or p > hi:
            continue
        colour = TARGET_STYLE.get(kind, ("#1f77b4", kind))[0]
        if kind == "nic-buffers":
            pages = _int(t.get("pages")) or 1
            ax.barh(y["DMA targets"], max(MiB, min_w), left=p, height=0.55, color=colour,
                    alpha=min(1.0, 0.25 + pages / 256), linewidth=0, zorder=2)
        else:
            ax.barh(y["DMA targets"], max(PAGE, min_w), left=p, height=0.55, color=colour, linewidth=0, zorder=2)
        used.add(f"target:{kind}")
    # markers found, per class: whole MiB buckets with their record counts
    hits = _hits(report)
    for cls, per in hits.items():
        lane = CLASS_LANE.get(cls)
        if lane is None:
            continue
        colour = CLASS_STYLE[cls][0]
        for mib, n in sorted(per.items()):
            a, b = mib << 20, (mib + 1) << 20
            if b < lo or a > hi:
                continue
            if zoom:
                ax.barh(y[lane], min(b, hi) - max(a, lo), left=max(a, lo), height=0.55, color=colour, alpha=0.3,
                        linewidth=0, zorder=1)
                ax.annotate(f"{n} records in MiB {mib}", xy=(max(a, lo), y[lane]), xytext=(3, 6),
                            textcoords="offset points", fontsize=7, color=colour, zorder=5)
            else:
                ax.barh(y[lane], max(b - a, min_w), left=a, height=0.55, color=colour, linewidth=0, zorder=2)
                if cls in MISDIRECTED:
                    ax.plot([a + (b - a) / 2], [y[lane]], marker="v", markersize=9, color=colour,
                            markeredgecolor="#5d0000", zorder=4)
            used.add(cls)
        if not zoom and cls in MISDIRECTED and per:
            total = sum(per.values())
            first = min(per)
            ax.annotate(f"{total} records", xy=((first << 20), y[lane]), xytext=(4, 7), textcoords="offset points",
                        fontsize=8, color=colour, zorder=5)
    # exact misdirected records (the listed ones)
    for f in _l(_d(report.get("dma")).get("misdirected")):
        f = _d(f)
        p, cls = _int(f.get("phys")), str(f.get("where", ""))
        if p is None or p < lo or p > hi or cls not in CLASS_LANE:
            continue
        ax.plot([p], [y[CLASS_LANE[cls]]], marker="|", markersize=14, markeredgewidth=2,
                color=CLASS_STYLE.get(cls, ("#d62728",))[0], zorder=4)
        used.add(cls)
    # canary pages; pages too close to tell apart get a count
    groups: list[list] = []  # [first phys, last phys, count]
    for c in sorted((_d(c) for c in _l(_d(_d(report.get("dma")).get("memory")).get("canaries"))),
                    key=lambda c: _int(c.get("phys")) or 0):
        p, state = _int(c.get("phys")), str(c.get("state", "unchecked"))
        if p is None or p < lo or p > hi:
            continue
        if groups and p - groups[-1][1] <= min_w * 4:
            groups[-1][1], groups[-1][2] = p, groups[-1][2] + 1
        else:
            groups.append([p, p, 1])
        colour, marker, _ = CANARY_STYLE.get(state, CANARY_STYLE["unchecked"])
        big = state == "changed"
        ax.plot([p + PAGE / 2], [y["canaries"]], marker=marker, markersize=11 if big else 6,
                color=colour, markerfacecolor=colour if state != "unchecked" else "none",
                markeredgecolor="#5d0000" if big else colour, zorder=5 if big else 3)
        used.add(f"canary:{state}")
    for first, _, count in groups:
        if count > 1:
            ax.annotate(f"{count} pages", xy=(first, y["canaries"]), xytext=(-4, 7), textcoords="offset points",
                        fontsize=7, color="#444444", ha="right", zorder=6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.7, len(LANES) - 0.3)
    ax.set_yticks([y[n] for n in LANES])
    ax.set_yticklabels(LANES, fontsize=8.5)
    for n in LANES:
        ax.axhline(y[n] - 0.5, color="#eeeeee", linewidth=0.6, zorder=0.2)
    ax.tick_params(axis="x", labelsize=7.5)
    return used


def _address_ticks(ax, lo: int, hi: int, zoom: bool) -> None:
    span = hi - lo
    if zoom:
        step = PAGE
        for s in (PAGE * k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)):
            step = s
            if span / s <= 6:
                break
    else:
        step = MiB
        for s in (MiB * k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)):
            step = s
            if span / s <= 8:
                break
    first = (lo + step - 1) // step * step
    ticks = list(range(first, hi + 1, step))
    ax.set_xticks(ticks)
    if zoom:
        ax.set_xticklabels([f"0x{t:x}" for t in ticks], rotation=20, ha="right")
    else:
        ax.set_xticklabels([f"0x{t:x}\n{mib_label(t)}" for t in ticks])


def _legend_handles(used: set[str]):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    h = []
    if "ram" in used:
        h.append(Patch(color=RAM_COLOUR, label="System RAM"))
    if "kernel" in used:
        h.append(Patch(color=KERNEL_COLOUR, label="first kernel image"))
    if "other" in used:
        h.append(Patch(color=OTHER_COLOUR, label="reserved / not RAM"))
    if "crash" in used:
        h.append(Patch(facecolor=CRASH_FACE, edgecolor=CRASH_EDGE, hatch="//", label="crash kernel reservation"))
    for kind, (colour, label) in TARGET_STYLE.items():
        if f"target:{kind}" in used:
            h.append(Patch(color=colour, label=label))
    for cls, (colour, label) in CLASS_STYLE.items():
        if cls in used:
            h.append(Patch(color=colour, label=label))
    for state, (colour, marker, label) in CANARY_STYLE.items():
        if f"canary:{state}" in used:
            h.append(Line2D([], [], linestyle="none", marker=marker, color=colour, label=label,
                            markerfacecolor=colour if state != "unchecked" else "none"))
    return h


def memory_map_svg(report: dict) -> str | None:
    """The memory map as an SVG document, or None when the report has nothing to place."""
    top = _ram_top(report)
    if not top:
        return None
    from matplotlib.figure import Figure

    zooms = _zoom_windows(report, top)
    height = 3.4 + (2.9 if zooms else 0)
    fig = Figure(figsize=(13, height), dpi=100)
    # the overview leaves room on its right for the legend; zoom panels use the whole width
    inch = 1 / height
    top_gs = fig.add_gridspec(1, 1, left=0.105, right=0.80, top=1 - 0.3 * inch, bottom=(2.9 + 0.55) * inch
                              if zooms else 0.6 * inch)
    overview = fig.add_subplot(top_gs[0, 0])
    used = _draw_lanes(overview, report, 0, top, zoom=False)
    _address_ticks(overview, 0, top, zoom=False)
    overview.set_title(f"guest-physical memory, 0 - {hexaddr(top - 1)} ({top / MiB:.0f} MiB)", fontsize=10,
                       loc="left")
    if zooms:
        zoom_gs = fig.add_gridspec(1, len(zooms), left=0.105, right=0.99, top=2.5 * inch, bottom=0.55 * inch,
                                   wspace=0.06)
    for i, (lo, hi, _) in enumerate(zooms):
        ax = fig.add_subplot(zoom_gs[0, i])
        used |= _draw_lanes(ax, report, lo, hi, zoom=True)
        _address_ticks(ax, lo, hi, zoom=True)
        if i:
            ax.set_yticklabels([])
        ax.set_title(f"zoom {i + 1}: {hexaddr(lo)} - {hexaddr(hi)} ({(hi - lo) / 1024:.0f} KiB)", fontsize=9,
                     loc="left")
        for edge in (lo, hi):  # mark the zoomed window on the overview
            overview.axvline(edge, color="#555555", linewidth=0.6, linestyle=":", zorder=6)
        overview.annotate(f"zoom {i + 1}", xy=(hi, -0.62), xytext=(2, 0), textcoords="offset points",
                          fontsize=7.5, color="#333333", va="bottom")
    handles = _legend_handles(used)
    if handles:
        overview.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.02), fontsize=7.5,
                        frameon=False, borderaxespad=0)
    return _svg(fig, "memory-map")


# -- picture 2: the timeline -------------------------------------------------------------------

def _marks(report: dict) -> list[tuple[str, float]]:
    out = [(str(k), _num(v)) for k, v in _d(report.get("marks_s")).items()]
    return sorted(((k, v) for k, v in out if v is not None), key=lambda kv: kv[1])


def timeline_svg(report: dict) -> str | None:
    marks = _marks(report)
    dma = _d(report.get("dma"))
    tl = _d(dma.get("timeline"))
    bins = [b for b in (_d(x) for x in _l(tl.get("bins"))) if _num(b.get("t")) is not None]
    dropped = _num(dma.get("translation_dropped_s"))
    total = _num(_d(report.get("timings_s")).get("total"))
    if not marks and not bins:
        return None
    from matplotlib.figure import Figure

    step = _num(tl.get("step_s")) or 0.25
    ends = [v for _, v in marks] + [_num(b["t"]) + step for b in bins] + ([total] if total else []) + \
        ([dropped] if dropped is not None else [])
    end = max(ends) if ends else 1.0
    end = end * 1.02 + 0.5
    fig = Figure(figsize=(13, 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    mk = dict(marks)
    for start, stops, label, colour in PHASE_BANDS:
        a = mk.get(start)
        b = next((mk[s] for s in stops if s in mk), None)
        if a is None:
            continue
        if b is None:
            b = total if total is not None and total > a else end
        ax.axvspan(a, b, color=colour, zorder=0, label=label)
    if bins:
        t = [_num(b["t"]) for b in bins]
        sent = [_num(b.get("sent")) or 0 for b in bins]
        landed = [_num(b.get("landed")) or 0 for b in bins]
        ax.bar(t, sent, width=step * 0.9, align="edge", color="#9e9e9e", label="DMA transfers sent", zorder=2)
        ax.bar(t, landed, width=step * 0.9, align="edge", color="#2ca02c", label="... of which found in memory",
               zorder=3)
        ax.set_ylabel(f"transfers per {step:g} s", fontsize=8.5)
        ymax = max(sent + [1])
    else:
        ax.text(0.5, 0.5, "no DMA in this report", transform=ax.transAxes, ha="center", va="center",
                color="#777777", fontsize=11)
        ax.set_yticks([])
        ymax = 1
    ax.set_ylim(0, ymax * 1.55)
    # phase marks: close ones share one label
    groups: list[tuple[float, list[str]]] = []
    for name, v in marks:
        if groups and v - groups[-1][0] <= end * 0.012:
            groups[-1][1].append(name)
        else:
            groups.append((v, [name]))
    for v, names in groups:
        ax.axvline(v, color="#37474f", linewidth=0.9, zorder=4)
        label = " / ".join(names).replace("$", r"\$")  # plain text, never mathtext
        ax.annotate(label, xy=(v, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -3),
                    textcoords="offset points", rotation=90, va="top", ha="left", fontsize=7.5, color="#263238",
                    zorder=6)
    if total is not None and (not marks or total - marks[-1][1] > end * 0.03):
        verdict = str(report.get("verdict") or "")
        ax.axvline(total, color="#37474f", linewidth=0.9, linestyle=":", zorder=4)
        ax.annotate("run ended" + (f": {verdict}" if verdict in VERDICT_COLOURS else ""), xy=(total, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(-2, -3), textcoords="offset points", rotation=90,
                    va="top", ha="right", fontsize=7.5, color="#263238", zorder=6)
    if dropped is not None:
        active = bool(dma.get("translation_dropped_while_active"))
        ax.axvline(dropped, color=DROPPED_COLOUR, linewidth=2, linestyle="--", zorder=5,
                   label="IOMMU translation switched off" + (" (DMA still active)" if active else ""))
    ax.set_xlim(0, end)
    ax.set_xlabel("seconds since the run started", fontsize=8.5)
    ax.tick_params(labelsize=8)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7.5, ncol=min(6, len(handles)), frameon=False,
                   bbox_to_anchor=(0.995, 0.999))
    fig.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.17)
    return _svg(fig, "timeline")


def _svg(fig, salt: str) -> str:
    """A figure as inline SVG: no XML prolog, no DOCTYPE, glyphs as paths (no fonts, no text
    from the report executed or interpreted), stable ids."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt, "text.usetex": False}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    start = text.find("<svg")
    svg = text[start:] if start >= 0 else text
    return svg.replace("<svg ", f'<svg role="img" aria-label="{esc(salt)}" ', 1)


def _picture(kind: str, fn, report: dict, missing: str) -> str:
    try:
        svg = fn(report)
    except Exception as e:  # a picture is never worth losing the report's tables
        log.warning("could not draw the %s: %s", kind, e, exc_info=True)
        return f'<p class="note">the {esc(kind)} could not be drawn: {esc(type(e).__name__)}: {esc(e)}</p>'
    if svg is None:
        return f'<p class="note">{esc(missing)}</p>'
    return f"<figure>{svg}</figure>"


# -- sections --------------------------------------------------------------------------------

def _header(report: dict, run_dir: Path) -> str:
    verdict = report.get("verdict")
    expected = expected_of(report)
    match = ""
    if expected:
        ok = expected == verdict
        match = (f'<span class="match {"yes" if ok else "no"}">'
                 f'{"as expected" if ok else "UNEXPECTED"}: expected {esc(expected)}</span>')
    ev = "".join(f"<li>{esc(e)}</li>" for e in _l(report.get("evidence")))
    sc = _d(report.get("scenario"))
    kernel = _d(report.get("kernel"))
    kd = _d(report.get("kdump"))
    facts = [
        ("IOMMU", fmt(sc.get("iommu"))),
        ("DMA source", fmt(sc.get("dma"))),
        ("kernel", fmt(kernel.get("release") or sc.get("kernel"))),
        ("accelerator", fmt(report.get("accel"))),
        ("crash kernel command line", f'<span class="mono">{fmt(kd.get("crash_cmdline"))}</span>'),
        ("run directory", f'<span class="mono">{esc(run_dir)}</span>'),
    ]
    if sc.get("reason"):
        facts.insert(0, ("why this scenario", fmt(sc.get("reason"))))
    return (f"<header><div class=\"sub\">kdump-harness run report</div>"
            f"<h1>{esc(scenario_name(report))}</h1>"
            f"<div>{verdict_badge(verdict)}{match}</div>"
            f'<p class="reason">{esc(report.get("reason") or "no reason recorded")}</p>'
            + (f'<h3>evidence</h3><ul class="evidence">{ev}</ul>' if ev else "")
            + kv_table(facts) + "</header>")


def _timings(report: dict) -> str:
    t = _d(report.get("timings_s"))
    rows = [[esc(k), esc(fmt_s(v))] for k, v in t.items() if k != "total"]
    if "total" in t:
        rows.append(["<b>total</b>", f"<b>{esc(fmt_s(t['total']))}</b>"])
    marks = _marks(report)
    phases = "<div><h3>phases (seconds)</h3>" + (table(["phase", "s"], rows, num=[1]) if rows
                                                  else '<p class="note">no phase timings recorded</p>') + "</div>"
    marks_html = "<div><h3>marks (seconds since the start)</h3>" + (
        table(["mark", "t (s)"], [[esc(k), esc(fmt_s(v))] for k, v in marks], num=[1]) if marks
        else '<p class="note">no marks recorded</p>') + "</div>"
    return f'<div class="row">{phases}{marks_html}</div>'



def _iommu(report: dict) -> str:
    io_ = _d(report.get("iommu"))
    gt = _d(_d(report.get("dma")).get("ground_truth"))
    rows = [
        ("IOMMU", fmt(io_.get("type"))),
        ("crash kernel copied the old tables", fmt(io_.get("crash_kernel_copied_tables"))),
        ("crash kernel disabled the IOMMU", fmt(io_.get("crash_kernel_disabled"))),
        ("faults in the crash kernel's console", fmt(io_.get("faults"))),
    ]
    if gt:
        rows += [
            ("QEMU: trace lines read", fmt(gt.get("trace_lines"))),
            ("QEMU: faults (after the panic)", f"{fmt(gt.get('faults'))} ({fmt(gt.get('faults_after_panic'))})"),
            ("QEMU: translation switched off at (s)", esc(fmt_s(gt.get("translation_off_s")))),
        ]
    out = kv_table(rows)
    devs = _d(gt.get("devices"))
    if devs:
        drows = []
        for bdf, d in devs.items():
            d = _d(d)
            drows.append([f'<span class="mono">{esc(bdf)}</span>', fmt(d.get("translations")),
                          fmt(d.get("translations_after_panic")), fmt(d.get("failed_after_panic")),
                          fmt(d.get("target_pages")), fmt(d.get("translated_at_panic")),
                          esc(fmt_s(d.get("last_translation_s"))), esc(fmt_s(d.get("switched_off_s")))])
        out += "<h3>per device (QEMU's view)</h3>" + table(
            ["device", "translations", "after panic", "failed after panic", "target pages",
             "translated at panic", "last translation (s)", "switched off (s)"], drows, num=[1, 2, 3, 4, 6, 7])
    smmu = _d(io_.get("smmu"))
    if smmu:
        story = smmu.get("story") or []
        out += "<h3>what the crash kernel did with the SMMU (QEMU smmuv3 register writes)</h3>" + (
            "<pre>" + esc("\n".join(str(x) for x in story)) + "</pre>" if story
            else '<p class="note">no SMMU register writes after the panic</p>')
        out += kv_table([
            ("aborted after the panic, per device", fmt(smmu.get("aborted_after_panic"))),
            ("passed untranslated after the panic, per device", fmt(smmu.get("passed_untranslated_after_panic"))),
        ])
    return out


def _dma(report: dict) -> str:
    dma = _d(report.get("dma"))
    if "sent" not in dma:
        src = dma.get("source") or _d(report.get("scenario")).get("dma")
        why = ("this scenario has no DMA source" if src == "none"
               else "the run stopped before the DMA was analysed")
        return f'<p class="note">no DMA analysis in this report ({esc(why)}; source: {esc(src or "-")}).</p>'
    can = _d(dma.get("canaries"))
    changed = _l(can.get("changed"))
    missing = _l(can.get("missing"))
    rows = [
        ("source", fmt(dma.get("source"))),
        ("nonce", f'<span class="mono">{esc(dma.get("nonce"))}</span>'),
        ("transfers sent (after the panic)", f"{fmt(dma.get('sent'))} ({fmt(dma.get('sent_after_panic'))})"),
        ("transfers not fired", fmt(dma.get("not_fired"))),
        ("transfers seen / never seen", f"{fmt(dma.get('seen'))} / {fmt(dma.get('never_seen'))}"),
        ("records landed after the panic (transfers)",
         f"{fmt(dma.get('landed_after_panic'))} ({fmt(dma.get('landed_after_panic_transfers'))})"),
        ("IOMMU faults after the panic (QEMU)", fmt(dma.get("faulted"))),
        ("translation switched off at (s)", esc(fmt_s(dma.get("translation_dropped_s")))),
        ("... while DMA was still arriving",
         '<span class="bad">yes</span>' if dma.get("translation_dropped_while_active") else "no"),
        ("canary pages intact", f"{fmt(can.get('intact'))} of {fmt(can.get('count'))}"
         + (f', <span class="bad">{len(changed)} changed</span>' if changed else "")
         + (f', <span class="bad">{len(missing)} missing</span>' if missing else "")),
    ]
    out = '<div class="row"><div>' + kv_table(rows) + "</div><div>"
    landed = _d(dma.get("landed"))
    if landed:
        lrows = []
        for cls, n in landed.items():
            colour, label = CLASS_STYLE.get(cls, ("#999999", cls))
            bad = cls in MISDIRECTED and n
            lrows.append([f'<span class="swatch" style="background:{colour}"></span>{esc(cls)}', esc(label),
                          f'<span class="bad">{esc(n)}</span>' if bad else esc(n)])
        out += "<h3>marker records found, by where they landed</h3>" + table(["class", "meaning", "records"],
                                                                             lrows, num=[2])
    per = _d(dma.get("per_phase"))
    if per:
        prow = [[esc(ph), fmt(_d(v).get("sent")), fmt(_d(v).get("seen")), fmt(_d(v).get("not_fired"))]
                for ph, v in per.items()]
        out += "<h3>per phase of the handover</h3>" + table(["phase", "sent", "seen", "not fired"], prow,
                                                            num=[1, 2, 3])
    out += "</div></div>"
    if changed:
        crow = []
        for c in changed:
            c = _d(c)
            d = _d(c.get("first_diff"))
            crow.append([fmt(c.get("index")), f'<span class="mono">{esc(hexaddr(c.get("phys")))}</span>',
                         fmt(c.get("changed_bytes")),
                         f'<span class="mono">+{esc(hexaddr(d.get("offset")))}: {esc(d.get("expected_hex"))} -> '
                         f'{esc(d.get("found_hex"))}</span>' if d else "-"])
        out += "<h3>changed canary pages</h3>" + table(["canary", "phys", "bytes changed", "first difference"],
                                                       crow, num=[0, 2])
    if missing:
        out += f"<p>canaries missing from the vmcore: {fmt(missing)}</p>"
    scans = _d(dma.get("scans"))
    if scans:
        srow = []
        for view, s in scans.items():
            s = _d(s)
            srow.append([esc(view), fmt(s.get("bytes")), fmt(s.get("markers")), fmt(s.get("stale")),
                         fmt(s.get("torn")), fmt(s.get("seconds"))])
        out += "<h3>memory scanned</h3>" + table(["view", "bytes", "markers", "stale", "torn", "seconds"], srow,
                                                 num=[1, 2, 3, 4, 5])
    return out


def _misdirected(report: dict) -> str:
    dma = _d(report.get("dma"))
    items = [_d(f) for f in _l(dma.get("misdirected"))]
    if not items:
        if "sent" in dma:
            return '<p class="good">no misdirected marker records.</p>'
        return '<p class="note">no DMA analysis in this report.</p>'
    landed = _d(dma.get("landed"))
    total = sum(n for c, n in landed.items() if c in MISDIRECTED and isinstance(n, int))
    canary_pages = {}
    for c in _l(_d(dma.get("memory")).get("canaries")) + _l(_d(dma.get("canaries")).get("changed")):
        p, i = _int(_d(c).get("phys")), _d(c).get("index")
        if p is not None:
            canary_pages[p // PAGE] = i
    rows = []
    for f in items:
        colour = CLASS_STYLE.get(str(f.get("where")), ("#999999", ""))[0]
        phys = _int(f.get("phys"))
        on_canary = canary_pages.get(phys // PAGE, "-") if phys is not None else "-"
        rows.append([f'<span class="swatch" style="background:{colour}"></span>{esc(f.get("where"))}',
                     esc(f.get("source")), fmt(f.get("seq")), fmt(f.get("slot")),
                     f'<span class="mono">{esc(hexaddr(f.get("iova")) if f.get("iova") else "-")}</span>',
                     f'<span class="mono bad">{esc(hexaddr(f.get("phys")))}</span>',
                     f'<span class="mono">{esc(hexaddr(f.get("expected_phys")))}</span>',
                     esc(fmt_s(f.get("t"))), esc(f.get("view")), esc(on_canary)])
    note = (f'<p class="sub">{len(items)} listed of {total} misdirected records.</p>'
            if total > len(items) else "")
    return note + table(["where", "source", "transfer", "record", "iova", "found at phys", "meant for phys",
                         "sent at (s)", "view", "on canary page"], rows, num=[2, 3, 7])


def _ground_truth(report: dict) -> str:
    gt = _d(report.get("dma")).get("ground_truth")
    if not isinstance(gt, dict):
        return '<p class="note">no QEMU trace in this report (no IOMMU, or the run stopped before the analysis).</p>'
    ev = _l(gt.get("evidence"))
    if not ev:
        return '<p class="note">the QEMU trace held nothing notable.</p>'
    return "<pre>" + "\n".join(esc(line) for line in ev) + "</pre>"


def _files(report: dict, run_dir: Path) -> str:
    entries: list[tuple[str, str]] = [("report", "report.json")]
    vmcore = _d(report.get("kdump")).get("vmcore")
    entries.append(("vmcore", str(vmcore) if vmcore else "vmcore"))
    if not vmcore and (run_dir / "vmcore.kdump").exists():
        entries[-1] = ("vmcore", "vmcore.kdump")
    for key, name in _d(report.get("files")).items():
        if isinstance(name, str) and name:
            entries.append((str(key), name))
    for key, name in (("qemu_cmdline", "qemu-cmdline.txt"), ("rerun", "rerun.sh"),
                      ("rerun_settings", "rerun-settings.cpio"), ("trace", "guest.trace.log"),
                      ("initrd", "initrd.img"), ("guest_ram", "guest-ram.raw")):
        entries.append((key, name))
    seen: set[str] = set()
    rows = []
    for key, name in entries:
        p = Path(name) if Path(name).is_absolute() else run_dir / name
        if str(p) in seen:
            continue
        seen.add(str(p))
        if p.exists():
            size = p.stat().st_size
            rows.append([esc(key), f'<a href="{esc(href(p, run_dir))}">{esc(os.path.relpath(p, run_dir))}</a>',
                         esc(f"{size:,}")])
        elif key in ("report", "vmcore") or key in _d(report.get("files")):
            rows.append([esc(key), f'{esc(name)} <span class="note">(absent)</span>', "-"])
    return table(["what", "file", "bytes"], rows, num=[2])


def _scenario(report: dict) -> str:
    sc = _d(report.get("scenario"))
    rows = [(k, f'<span class="mono">{fmt(v)}</span>') for k, v in sc.items()]
    k = _d(report.get("kernel"))
    rows += [(f"kernel.{key}", f'<span class="mono">{fmt(v)}</span>') for key, v in k.items()]
    rows += [("harness version", fmt(report.get("harness_version"))),
             ("report version", fmt(report.get("report_version"))),
             ("accelerator reason", fmt(report.get("accel_reason")))]
    return kv_table(rows)


MAP_CAPTION = ("Overview: guest-physical addresses 0 to the end of RAM; lanes from top: the first kernel's "
               "/proc/iomem, where the DMA was meant to go, the marker records found per MiB by class, canary "
               "pages. Triangles mark MiB that hold misdirected records. Zoom panels (if any) show the exact "
               "listed addresses around what went wrong; shaded bands there are whole MiB with found records.")
TIMELINE_CAPTION = ("Phase marks (vertical lines), DMA transfers sent per time bin (grey) and how many of them were "
                    "found in memory (green); the red dashed line is the moment QEMU saw the crash kernel switch "
                    "IOMMU translation off.")


def render_run_html(report: dict, run_dir: Path) -> str:
    """The whole page for one run, as a string."""
    report = report if isinstance(report, dict) else {}
    run_dir = Path(run_dir)
    title = f"{scenario_name(report)}: {report.get('verdict') or 'no verdict'}"
    crash = _crash_range(report)
    crash_line = (f'<p class="sub">crash kernel reservation: <span class="mono">{esc(hexaddr(crash[0]))} - '
                  f'{esc(hexaddr(crash[1]))}</span> ({(crash[1] + 1 - crash[0]) / MiB:.0f} MiB)</p>'
                  if crash else '<p class="note">crash kernel reservation unknown</p>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        _header(report, run_dir),
        '<section id="memory-map"><h2>Memory map</h2>' + crash_line,
        _picture("memory map", memory_map_svg, report,
                 "no memory map: the run stopped before the first kernel reported its memory"),
        f"<figcaption>{esc(MAP_CAPTION)}</figcaption></section>",
        '<section id="timeline"><h2>Timeline</h2>',
        _picture("timeline", timeline_svg, report, "no timeline: the run recorded no phase marks"),
        f"<figcaption>{esc(TIMELINE_CAPTION)}</figcaption></section>",
        '<section id="timings"><h2>Phase timings</h2>' + _timings(report) + "</section>",
        '<section id="iommu"><h2>IOMMU</h2>' + _iommu(report) + "</section>",
        '<section id="dma"><h2>DMA</h2>' + _dma(report) + "</section>",
        '<section id="misdirected"><h2>Misdirected markers</h2>' + _misdirected(report) + "</section>",
        '<section id="ground-truth"><h2>QEMU ground truth</h2>' + _ground_truth(report) + "</section>",
        '<section id="files"><h2>Files</h2>' + _files(report, run_dir) + "</section>",
        '<section id="scenario"><h2>Scenario</h2>' + _scenario(report) + "</section>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_run_html(report: dict, run_dir: Path) -> Path:
    """Write `run_dir/report.html` for one run's report.json contents; return its path."""
    run_dir = Path(run_dir)
    return _write(run_dir / "report.html", render_run_html(report, run_dir))


# -- the matrix page ----------------------------------------------------------------------------

def render_matrix_html(reports: list[tuple[dict, Path]], path: Path) -> str:
    base = Path(path).resolve().parent
    rows = []
    counts: dict[str, int] = {}
    matched = mismatched = 0
    seconds = 0.0
    for i, (report, run_dir) in enumerate(reports, 1):
        report = report if isinstance(report, dict) else {}
        run_dir = Path(run_dir).resolve()
        sc = _d(report.get("scenario"))
        verdict = str(report.get("verdict") or "")
        expected = expected_of(report)
        counts[verdict or "none"] = counts.get(verdict or "none", 0) + 1
        if expected:
            ok = verdict == expected
            matched += ok
            mismatched += not ok
            match = f'<span class="match {"yes" if ok else "no"}">{"yes" if ok else "no"}</span>'
        else:
            match = '<span class="note">no expectation</span>'
        total = _num(_d(report.get("timings_s")).get("total"))
        seconds += total or 0.0
        link = next((run_dir / n for n in ("report.html", "report.json") if (run_dir / n).exists()), None)
        link_html = (f'<a href="{esc(href(link, base))}">{esc(run_dir.name)}/{esc(link.name)}</a>' if link
                     else '<span class="note">no report file</span>')
        rows.append([esc(i), esc(scenario_name(report)), esc(sc.get("iommu") or "-"),
                     esc(_d(report.get("kernel")).get("release") or sc.get("kernel") or "-"),
                     esc(sc.get("dma") or "-"), esc(expected or "-"), verdict_badge(verdict or None), match,
                     esc(fmt_s(total)), link_html])
    summary = ", ".join(f"{esc(v)} {n}" for v, n in sorted(counts.items()))
    totals = kv_table([
        ("runs", esc(len(reports))),
        ("verdict as expected", f'<span class="good">{matched}</span>'),
        ("verdict not as expected", f'<span class="{"bad" if mismatched else "good"}">{mismatched}</span>'),
        ("verdicts", summary or "-"),
        ("total run time (s)", esc(f"{seconds:.1f}")),
    ])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kdump-harness matrix: {len(reports)} runs, {mismatched} unexpected</title>"
        f"<style>{CSS}</style></head><body><main>",
        "<h1>kdump-harness scenario matrix</h1>",
        totals,
        table(["#", "scenario", "iommu", "kernel", "dma", "expected", "verdict", "match", "total (s)", "report"],
              rows, num=[0, 8]),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_matrix_html(reports: list[tuple[dict, Path]], path: Path) -> Path:
    """Write the summary page of several runs, (report, run directory) each; return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, render_matrix_html(reports, path))
