"""The report's charts, drawn with matplotlib's object API (no pyplot state) and inlined as SVG.

Text stays text (``svg.fonttype: none``): small, searchable, crisp at any zoom; the browser draws it in
DejaVu Sans or the next sans-serif font it has. Names from the model go through ``_plain`` so that a
``$`` in them is not read as mathtext (log axes keep mathtext for their 10^k labels). Each chart saves
with its own ``svg.hashsalt`` and no metadata, so the same report gives the same bytes, and its ids are
prefixed with the chart's id so that charts sharing one page never share an id.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cluster.report.model import BlockRow, Report, Stream

WIDTH_IN = 11.0  # 792 pt: the page's width
PHASE_ORDER = ("plan", "load", "capture", "statistics", "veo", "dependency", "partition", "blocks", "search",
               "export", "evaluate", "commit", "total")
BLUE, ORANGE, GREEN, RED, GREY = "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#bab0ac"
BLOCK_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
SEGMENT_COLOURS = {"vision": "#eef3fa", "projector": "#fdf3e7", "language": "#eef7ec"}
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "axes.axisbelow": True,
    "grid.color": "#e4e4e4", "grid.linewidth": 0.8, "legend.frameon": False, "figure.dpi": 72,
}
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
LOG_SPAN = 50  # a log axis when the largest positive value is this many times the smallest


# --- figure to inline SVG --------------------------------------------------------------------------

def chart_svg(chart_id: str, title: str, height_in: float, draw: Callable[[Figure], None]) -> str:
    """``draw`` fills a fresh figure; the SVG comes back ready to inline under ``chart_id``."""
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": chart_id}):
        fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=NO_METADATA)
    return inline_svg(buf.getvalue(), chart_id, title)


def inline_svg(svg: str, chart_id: str, title: str) -> str:
    """An SVG document as an element of an HTML page: no XML prolog or doctype, no namespace URLs (the
    HTML parser supplies them), ids prefixed with ``chart_id``, and a ``<title>`` for screen readers."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2)
    svg = re.sub(r'(\bid="|url\(#|href="#)', lambda m: f"{m.group(1)}{chart_id}-", svg)
    head, rest = svg.split(">", 1)
    return (f'<svg id="{chart_id}" role="img" aria-label="{html.escape(title)}"{head[4:]}>'
            f"<title>{html.escape(title)}</title>{rest}")


# --- shared pieces ---------------------------------------------------------------------------------

def _slot(report: Report) -> dict[int, int]:
    """unit index -> x position (units in index order)."""
    return {u.index: i for i, u in enumerate(report.units)}


def _step(n: int, most: int = 40) -> int:
    """Label every step-th item so that at most ``most`` labels show, however many items."""
    return max(1, -(-n // most))


def _unit_axis(ax: Axes, report: Report, label: str = "unit") -> None:
    n = len(report.units)
    step = _step(n)
    ax.set_xticks(range(0, n, step), [str(u.index) for u in report.units][::step])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(label)
    ax.grid(False, axis="x")


def _segment_runs(report: Report) -> list[list]:
    """[segment, first x, last x] for each run of consecutive units of one segment."""
    runs: list[list] = []
    for i, u in enumerate(report.units):
        if runs and runs[-1][0] == u.segment:
            runs[-1][2] = i
        else:
            runs.append([u.segment, i, i])
    return runs


def _segment_bands(ax: Axes, report: Report) -> None:
    """Light background per segment (vision / projector / language), named at the top."""
    for segment, first, last in _segment_runs(report):
        ax.axvspan(first - 0.5, last + 0.5, color=SEGMENT_COLOURS.get(segment, "#f4f4f4"), zorder=0, lw=0)
        ax.text((first + last) / 2, 1.0, _plain(segment), transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", color="#777", fontsize=8)


def _plain(text: str) -> str:
    return text.replace("$", r"\$")


def _log_if_wide(ax: Axes, values: Sequence[float]) -> bool:
    """A log y axis when every value is positive and they span more than LOG_SPAN."""
    positive = [v for v in values if v is not None and v > 0]
    wide = bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > LOG_SPAN
    if wide:
        ax.set_yscale("log")
    return wide


def _spans(ax: Axes, report: Report, blocks: Sequence[BlockRow], y: float, height: float = 0.7) -> None:
    slot = _slot(report)
    for b in blocks:
        xs = [slot[u] for u in b.units if u in slot]
        if xs:
            _span(ax, min(xs), max(xs), y, height, BLOCK_COLOURS[b.index % len(BLOCK_COLOURS)], f"B{b.index}")


def _span(ax: Axes, first: int, last: int, y: float, height: float, colour: str, label: str,
          text: str = "white") -> None:
    ax.broken_barh([(first - 0.45, last - first + 0.9)], (y - height / 2, height), facecolors=colour)
    ax.text((first + last) / 2, y, label, ha="center", va="center", color=text, fontsize=8, fontweight="bold",
            clip_on=True)


def _stream_x(report: Report, stream: Stream) -> tuple[list[int], list[float]]:
    """x of each unit of the stream, and x halfway between consecutive units (where D(k, k+1) sits)."""
    slot = _slot(report)
    xs = [slot[u] for u in stream.units]
    return xs, [(a + b) / 2 for a, b in zip(xs, xs[1:])]


# --- the charts ------------------------------------------------------------------------------------

def draw_entropy(fig: Figure, report: Report) -> None:
    """Entropy per unit and D(k, k+1) between consecutive units, each stream's h0, and the block cuts."""
    ax = fig.subplots()
    _segment_bands(ax, report)
    slot, h0_label = _slot(report), "h0 (cut where D < h0)"
    for s in report.streams:
        xs, mids = _stream_x(report, s)
        first = s.index == 0
        ax.plot(xs, s.entropy, "o-", color=BLUE, lw=1.8, ms=4, label="entropy H(k)" if first else None)
        ax.plot(mids, s.dependency, "s-", color=ORANGE, lw=1.8, ms=4, label="D(k, k+1)" if first else None)
        if s.dependency and s.h0 is not None:
            ax.hlines(s.h0, xs[0] - 0.3, xs[-1] + 0.3, colors=RED, linestyles="--", lw=1.5, label=h0_label)
            h0_label = None  # one legend entry for all streams
    for b in report.blocks[1:]:
        ax.axvline(slot[b.units[0]] - 0.5, color="#999", lw=0.8, ls=":")
    ax.set_ylabel("entropy / log M")
    fig.legend(loc="outside upper right", ncol=3)
    _unit_axis(ax, report, "unit (dotted lines: block boundaries)")


def draw_blocks(fig: Figure, report: Report) -> None:
    """Streams, the block partition and the segments as spans over the units."""
    ax = fig.subplots()
    slot = _slot(report)
    for s in report.streams:
        xs = [slot[u] for u in s.units]
        _span(ax, min(xs), max(xs), 2, 0.7, "#888", f"stream {s.index}")
    _spans(ax, report, report.blocks, 1)
    for segment, first, last in _segment_runs(report):
        _span(ax, first, last, 0, 0.7, SEGMENT_COLOURS.get(segment, "#f4f4f4"), _plain(segment), "#555")
    ax.set_yticks([0, 1, 2], ["segment", "block", "stream"])
    ax.set_ylim(-0.6, 2.6)
    ax.grid(False)
    _unit_axis(ax, report)


def _stat_points(report: Report, key: str) -> list[tuple[int, float, bool, str]]:
    """(x, value, boosted, short name) per linear (kurtosis) or per group "a+b" (sensitivity)."""
    points = []
    for i, u in enumerate(report.units):
        boosted = {x.name for x in u.linears if x.boosted}
        for name, v in sorted(getattr(u, key).items()):
            points.append((i, v, bool(boosted & set(name.split("+"))), name))
    return points


def _scatter(ax: Axes, report: Report, key: str, label: str) -> None:
    points = _stat_points(report, key)
    _segment_bands(ax, report)
    log = _log_if_wide(ax, [v for _, v, _, _ in points])
    plain = [(x, v) for x, v, boosted, _ in points if not boosted]
    marked = [(x, v, n) for x, v, boosted, n in points if boosted]
    ax.scatter([x for x, _ in plain], [v for _, v in plain], s=18, color=BLUE, alpha=0.75, label="not boosted")
    ax.scatter([x for x, _, _ in marked], [v for _, v, _ in marked], s=60, color=RED, marker="D", label="boosted")
    for x, v, name in marked:
        ax.annotate(_plain(name), (x, v), xytext=(6, 4), textcoords="offset points", fontsize=7, color=RED)
    ax.set_ylabel(label + (" (log)" if log else ""))
    _unit_axis(ax, report)


def draw_sensitivity(fig: Figure, report: Report) -> None:
    """KurtBoost kurtosis per linear and SensiBoost sensitivity per group, boosted layers marked."""
    top, bottom = fig.subplots(2, 1, sharex=True)
    _scatter(top, report, "kurtosis", "kurtosis per linear")
    _scatter(bottom, report, "sensitivity", "sensitivity per group")
    top.set_xlabel("")
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncol=2)


def _linear_bars(report: Report) -> list[tuple[int, float, float, str]]:
    """(unit x, integer bits, scale and zero-point bits per weight, colour) per linear, in unit order."""
    bars = []
    for i, u in enumerate(report.units):
        for x in u.linears:
            if x.scheme is None:
                bars.append((i, 16.0, 0.0, GREY))
                continue
            out, inp = x.shape
            overhead = x.scheme.storage_bits(out, inp) / (out * inp) - x.scheme.bits
            bars.append((i, float(x.scheme.bits), overhead, RED if x.boosted else BLUE))
    return bars


def draw_bits(fig: Figure, report: Report) -> None:
    """Bits per weight of every linear, grouped by unit: integer bits, then scales and zero points."""
    ax = fig.subplots()
    bars = _linear_bars(report)
    xs = range(len(bars))
    width = 0.85 if len(bars) <= 120 else 1.0  # gaps between bars only while they stay visible
    ax.bar(xs, [b[1] for b in bars], width=width, color=[b[3] for b in bars], lw=0)
    ax.bar(xs, [b[2] for b in bars], bottom=[b[1] for b in bars], width=width, color="#cfcfcf", hatch="///",
           edgecolor="#999", lw=0)
    edges = [k for k in xs if k == 0 or bars[k][0] != bars[k - 1][0]]
    for k in edges[1:]:
        ax.axvline(k - 0.5, color="#999" if width < 1 else "white", lw=0.8)
    centres = [(a + b - 1) / 2 for a, b in zip(edges, edges[1:] + [len(bars)])]
    step = _step(len(edges), 30)
    ax.set_xticks(centres[::step], [str(report.units[bars[k][0]].index) for k in edges][::step])
    if report.bits.bits_per_weight is not None:
        ax.axhline(report.bits.bits_per_weight, color=GREEN, ls="--", lw=1.5)
    ax.set_xlim(-0.6, max(len(bars), 1) - 0.4)
    ax.set_ylabel("bits per weight")
    ax.set_xlabel("linear layers, grouped by unit")
    ax.grid(False, axis="x")
    _bits_legend(ax, report)


def _bits_legend(ax: Axes, report: Report) -> None:
    handles = [Patch(color=BLUE, label="quantized"), Patch(color=RED, label="boosted"),
               Patch(color=GREY, label="full precision (16)"),
               Patch(facecolor="#cfcfcf", edgecolor="#999", hatch="///", label="scales and zero points")]
    if report.bits.bits_per_weight is not None:
        handles.append(Line2D([], [], color=GREEN, ls="--",
                              label=f"mean over quantized linears: {report.bits.bits_per_weight:.3f}"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(handles))


def draw_errors(fig: Figure, report: Report) -> None:
    """Each block's output error before and after its search."""
    ax = fig.subplots()
    blocks = [b for b in report.blocks if b.error_before is not None and b.error_after is not None]
    xs = range(len(blocks))
    ax.bar([x - 0.2 for x in xs], [b.error_before for b in blocks], width=0.4, color=GREY, label="before search")
    ax.bar([x + 0.2 for x in xs], [b.error_after for b in blocks], width=0.4, color=GREEN, label="after search")
    log = _log_if_wide(ax, [v for b in blocks for v in (b.error_before, b.error_after)])
    step = _step(len(blocks), 30)
    ax.set_xticks(list(xs)[::step], [_block_label(b, len(blocks) <= 12) for b in blocks][::step])
    ax.set_ylabel("block output MSE" + (" (log)" if log else ""))
    ax.set_xlabel("block")
    ax.grid(False, axis="x")
    fig.legend(loc="outside upper right", ncol=2)


def _block_label(b: BlockRow, with_units: bool) -> str:
    if not with_units:
        return f"B{b.index}"
    units = f"units {b.units[0]}–{b.units[-1]}" if len(b.units) > 1 else f"unit {b.units[0]}"
    return f"B{b.index}\n{units}"


def _phases(report: Report) -> list[tuple[str, float]]:
    order = {p: i for i, p in enumerate(PHASE_ORDER)}
    return sorted(report.seconds.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def draw_time(fig: Figure, report: Report) -> None:
    """Wall time per phase, in the order the job runs them, the total last."""
    ax = fig.subplots()
    rows = _phases(report)
    ys = range(len(rows))
    colours = ["#555" if name == "total" else BLOCK_COLOURS[i % len(BLOCK_COLOURS)] for i, (name, _) in enumerate(rows)]
    bars = ax.barh(list(ys), [s for _, s in rows], color=colours, height=0.7)
    ax.bar_label(bars, labels=[f"{s:.2f} s" for _, s in rows], padding=4)
    ax.set_yticks(list(ys), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds")
    ax.margins(x=0.12)
    ax.grid(False, axis="y")


def draw_veo(fig: Figure, report: Report) -> None:
    """D(k, k+1) with the full-precision vision tower (dashed) and the VEO-tuned one (solid), and both
    partitions as spans over the units."""
    spans, lines = fig.subplots(2, 1, sharex=True, height_ratios=(1, 3))
    _spans(spans, report, report.veo.blocks_before, 1)
    _spans(spans, report, report.blocks, 0)
    spans.set_yticks([0, 1], ["with VEO", "without"])
    spans.set_ylim(-0.6, 1.6)
    spans.grid(False)
    for before, after in zip(report.veo.streams_before, report.streams):
        _, mids = _stream_x(report, after)
        first = after.index == 0
        lines.plot(mids, before.dependency, "o--", color=RED, ms=9, mfc="none", label="without VEO" if first else None)
        lines.plot(mids, after.dependency, "s-", color=ORANGE, label="with VEO" if first else None)
    lines.set_ylabel("D(k, k+1)")
    fig.legend(loc="outside upper right", ncol=2)
    _unit_axis(lines, report)


def _time_height(report: Report) -> float:
    return 0.6 + 0.3 * max(len(report.seconds), 1)


@dataclass(frozen=True)
class Chart:
    id: str  # the <svg> element's id; tests and users look for it
    heading: str
    title: str
    height_in: float | Callable[[Report], float]
    draw: Callable[[Figure, Report], None]

    def svg(self, report: Report) -> str:
        height = self.height_in(report) if callable(self.height_in) else self.height_in
        return chart_svg(self.id, self.title, height, lambda fig: self.draw(fig, report))


CHARTS = (
    Chart("chart-entropy", "Entropy and dependency",
          "Entropy per unit and dependency D(k, k+1), with the h0 threshold of each stream", 4.0, draw_entropy),
    Chart("chart-blocks", "Block partition", "Streams, blocks and segments over the units", 2.2, draw_blocks),
    Chart("chart-sensitivity", "Kurtosis and sensitivity", "Kurtosis and sensitivity per unit, boosted layers marked",
          6.0, draw_sensitivity),
    Chart("chart-bits", "Bits per layer", "Bits per weight of every linear layer", 4.0, draw_bits),
    Chart("chart-errors", "Block error before and after search", "Per-block output error before and after the search",
          3.6, draw_errors),
    Chart("chart-time", "Time per phase", "Wall time per phase", _time_height, draw_time),
)
VEO_CHART = Chart("chart-veo", "Visual-encoder optimisation",
                  "Visual-encoder optimisation: dependency and blocks without and with it", 4.0, draw_veo)
