"""The job report: ``qvlm_report.json`` from the plan document (and an evaluation), and a self-contained
``report.html`` with inline SVG charts (no scripts, fonts or images from anywhere else).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

SERVABLE_WEIGHT_BITS = (4, 8)  # pack-quantized int4/int8 have vLLM and transformers kernels
PHASE_ORDER = ("plan", "load", "capture", "statistics", "veo", "dependency", "partition", "blocks", "search", "export",
               "evaluate", "commit", "total")
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")


# --- the JSON report -------------------------------------------------------------------------------

def _unit_positions(plan: dict) -> dict[int, tuple[int, int]]:
    """unit index -> (stream, position in the stream)."""
    return {u: (s, i) for s, stream in enumerate(plan.get("streams", [])) for i, u in enumerate(stream)}


def _series_at(plan: dict, stream: int, pos: int, key: str) -> float | None:
    deps = plan.get("dependency", [])
    values = deps[stream].get(key, []) if stream < len(deps) else []
    return values[pos] if pos < len(values) else None


def _unit_row(plan: dict, unit: dict, where: tuple[int, int] | None, block: int | None) -> dict:
    stats = next((s for s in plan.get("unit_stats", []) if s.get("unit") == unit["name"]), {})
    full = [f"{unit['name']}.{linear}" for linear in unit.get("linears", [])]
    schemes = plan.get("schemes", {})
    bits = [schemes[n]["bits"] for n in full if n in schemes]
    stream, pos = where if where is not None else (None, None)
    return {
        "index": unit["index"], "name": unit["name"], "segment": unit.get("segment"), "stream": stream,
        "block": block,
        "entropy": _series_at(plan, stream, pos, "entropy") if where else None,
        "dependency_next": _series_at(plan, stream, pos, "dependency") if where else None,
        "kurtosis": stats.get("kurtosis", {}), "sensitivity": stats.get("sensitivity", {}),
        "bits": sum(bits) / len(bits) if bits else None,
        "linears": list(unit.get("linears", [])), "quantized_linears": len(bits),
        "boosted": [n for n in full if n in set(plan.get("boosted", []))],
    }


def unit_table(plan: dict) -> list[dict]:
    """One row per unit: its stream, block, entropy, D(k, k+1), statistics, bits and boosted linears."""
    where = _unit_positions(plan)
    block_of = {u: b["index"] for b in plan.get("blocks", []) for u in b.get("units", [])}
    units = sorted(plan.get("units", []), key=lambda u: u["index"])
    return [_unit_row(plan, u, where.get(u["index"]), block_of.get(u["index"])) for u in units]


def _scheme_label(scheme: dict) -> str:
    group = "per-channel" if scheme.get("group_size", -1) == -1 else f"g{scheme['group_size']}"
    return f"W{scheme['bits']} {group} {'sym' if scheme.get('symmetric', True) else 'asym'}"


def _act_label(acts: dict | None) -> str:
    if not acts or acts.get("bits", 16) >= 16:
        return "A16"
    return f"A{acts['bits']} per-{acts.get('granularity', 'token')} {'sym' if acts.get('symmetric', True) else 'asym'}"


def weight_bits(schemes: dict) -> dict:
    """Mean weight bits over quantized linears, without and with the fp16 scales (and zero points).

    Unweighted by layer size: the plan document does not carry weight shapes.
    """
    if not schemes:
        return {"mean_bits": None, "mean_bits_with_scales": None, "linears": 0}
    bits = [s["bits"] for s in schemes.values()]
    overhead = [(16 + (0 if s.get("symmetric", True) else s["bits"])) / s["group_size"]
                for s in schemes.values() if s.get("group_size", -1) > 0]
    return {"mean_bits": sum(bits) / len(bits), "mean_bits_with_scales": (sum(bits) + sum(overhead)) / len(bits),
            "linears": len(bits)}


def servable(schemes: dict, activations: dict | None) -> dict:
    """Whether the checkpoint runs in vLLM / transformers, or only with qvlm's sidecar of activation ranges."""
    bits = sorted({s["bits"] for s in schemes.values()})
    acts = activations if activations and activations.get("bits", 16) < 16 else None
    if acts is None:
        ok = all(b in SERVABLE_WEIGHT_BITS for b in bits)
        why = ("weight-only int4/int8, pack-quantized: servable by vLLM and transformers" if ok else
               f"weight-only with {[b for b in bits if b not in SERVABLE_WEIGHT_BITS]}-bit layers: "
               f"no vLLM/transformers kernel for them; research-only")
        return {"servable": ok, "format": "pack-quantized" if ok else "qvlm", "note": why}
    dynamic8 = acts.get("granularity") == "token" and acts["bits"] == 8 and bits == [8]
    if dynamic8:
        return {"servable": True, "format": "int-quantized",
                "note": "W8A8 with dynamic per-token activations: servable by vLLM and transformers"}
    return {"servable": False, "format": "qvlm",
            "note": f"{_act_label(acts)} activations with W{'/'.join(map(str, bits))} weights (Q-VLM static or "
                    f"low-bit activation ranges): research-only, the ranges are kept in a qvlm sidecar file"}


def build_report(plan: dict, evaluation: dict | None = None, activations: dict | None = None) -> dict:
    """The JSON report: summary, per-unit table, blocks, timings, evaluation and servability.

    ``activations`` (``{"bits", "granularity", "symmetric"}``) defaults to ``plan["activations"]``;
    absent means weight-only.
    """
    acts = activations if activations is not None else plan.get("activations")
    schemes = plan.get("schemes", {})
    common = Counter(_scheme_label(s) for s in schemes.values()).most_common(1)
    seconds = plan.get("seconds", {})
    summary = {
        "job": plan.get("job"), "model_class": plan.get("model_class"), "method": plan.get("method"),
        "scheme": f"{common[0][0] if common else 'FP'}, {_act_label(acts)}",
        "blocks": len(plan.get("blocks", [])), "units": len(plan.get("units", [])),
        "streams": len(plan.get("streams", [])), "boosted": len(plan.get("boosted", [])),
        **weight_bits(schemes), "seconds_total": seconds.get("total", sum(seconds.values())),
    }
    return {
        "job": plan.get("job"), "spec_hash": plan.get("spec_hash"), "summary": summary,
        "units": unit_table(plan),
        "dependency": [{"units": list(s), **d} for s, d in zip(plan.get("streams", []), plan.get("dependency", []))],
        "blocks": [{k: b.get(k) for k in ("index", "stream", "units", "error_before", "error_after", "evaluations")}
                   for b in plan.get("blocks", [])],
        "schemes": schemes, "boosted": list(plan.get("boosted", [])), "activations": acts,
        "seconds": seconds, "stage_memory": plan.get("stage_memory", []),
        "evaluation": evaluation, "servable": servable(schemes, acts), "veo": _veo_section(plan),
    }


def _veo_section(plan: dict) -> dict | None:
    """VEO's cost and the dependency series / partition without it, next to the ones the job used."""
    veo = plan.get("veo")
    if not veo:
        return None
    streams = plan.get("streams", [])
    return {**{k: veo.get(k) for k in ("history", "seconds", "tuning_seconds", "reused", "error_before", "error_after")},
            "dependency_before": [{"units": list(s), **d} for s, d in zip(streams, veo.get("dependency_before", []))],
            "blocks_before": veo.get("blocks_before", [])}


# --- SVG primitives --------------------------------------------------------------------------------

WIDTH = 1100
MARGIN = (70, 40, 20, 56)  # left, top, right, bottom


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class _Frame:
    """A plot area of ``n`` equal x slots and a y range, linear or log."""

    left: float
    top: float
    width: float
    height: float
    n: int
    lo: float
    hi: float
    log: bool = False

    def slot(self) -> float:
        return self.width / max(self.n, 1)

    def x(self, i: float) -> float:
        return self.left + (i + 0.5) * self.slot()

    def y(self, v: float) -> float:
        f = math.log10 if self.log else (lambda t: t)
        lo, hi = f(self.lo), f(self.hi)
        frac = (f(min(max(v, self.lo), self.hi)) - lo) / ((hi - lo) or 1.0)
        return self.top + self.height * (1.0 - frac)


def _frame(height: int, n: int, values: Sequence[float], log: bool = False, top: int = MARGIN[1]) -> _Frame:
    left, _, right, bottom = MARGIN
    vals = [v for v in values if v is not None and (v > 0 or not log)] or [1.0]
    if log:
        lo, hi = 10 ** math.floor(math.log10(min(vals))), 10 ** math.ceil(math.log10(max(vals)))
        hi = hi * 10 if hi == lo else hi
    else:
        lo, hi = min(0.0, min(vals)), _nice_ceiling(max(vals))
    return _Frame(left, top, WIDTH - left - right, height - top - bottom, n, lo, hi, log)


def _nice_ceiling(v: float) -> float:
    if v <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(v))
    return next(m * step for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * step >= v * 0.999)


def _ticks(fr: _Frame) -> list[float]:
    if fr.log:
        return [10.0 ** k for k in range(round(math.log10(fr.lo)), round(math.log10(fr.hi)) + 1)]
    return [fr.lo + (fr.hi - fr.lo) * k / 4 for k in range(5)]


def _text(x: float, y: float, s: Any, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" {extra}>'
            f'{_e(s)}</text>')


def _y_axis(fr: _Frame, label: str) -> str:
    parts = []
    for t in _ticks(fr):
        y = fr.y(t)
        parts.append(f'<line x1="{fr.left}" x2="{fr.left + fr.width}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(_text(fr.left - 6, y + 4, f"{t:.3g}", "end"))
    parts.append(_text(16, fr.top + fr.height / 2, label, "middle", 12,
                       f'transform="rotate(-90 16 {fr.top + fr.height / 2:.1f})"'))
    return "".join(parts)


def _x_labels(fr: _Frame, labels: Sequence[Any], caption: str) -> str:
    every = max(1, math.ceil(len(labels) / 40))  # at most ~40 labels, however many units
    base = fr.top + fr.height
    parts = [_text(fr.x(i), base + 14, lab) for i, lab in enumerate(labels) if i % every == 0]
    parts.append(_text(fr.left + fr.width / 2, base + 40, caption, "middle", 12))
    return "".join(parts)


def _legend(items: Sequence[tuple[str, str]], x: float = MARGIN[0], y: float = 20) -> str:
    parts = []
    for label, color in items:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="12" height="12" fill="{color}"/>')
        parts.append(_text(x + 16, y + 1, label, "start"))
        x += 28 + 7 * len(label)
    return "".join(parts)


def _svg(chart_id: str, title: str, height: int, body: str) -> str:
    return (f'<svg id="{_e(chart_id)}" role="img" width="{WIDTH}" '
            f'height="{height}" viewBox="0 0 {WIDTH} {height}"><title>{_e(title)}</title>{body}</svg>')


def _polyline(points: Sequence[tuple[float, float]], color: str, dash: str = "") -> str:
    if not points:
        return ""
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in points)
    style = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{style}/>{dots}'


# --- charts ----------------------------------------------------------------------------------------

def _slots(report: dict) -> dict[int, int]:
    """unit index -> x slot (units in index order)."""
    return {u["index"]: i for i, u in enumerate(report["units"])}


def chart_entropy(report: dict) -> str:
    """(a) entropy per unit and D(k, k+1) between consecutive units, with each stream's h0."""
    slots, streams = _slots(report), report["dependency"]
    values = [v for d in streams for v in (*d.get("entropy", []), *d.get("dependency", []), d.get("h0") or 0)]
    fr = _frame(320, len(slots), values)
    body = [_y_axis(fr, "normalised entropy"), _legend([("entropy H(k)", PALETTE[0]), ("D(k, k+1)", PALETTE[1]),
                                                        ("h0 threshold", PALETTE[3])])]
    for d in streams:
        xs = [slots[u] for u in d["units"]]
        body.append(_polyline([(fr.x(x), fr.y(v)) for x, v in zip(xs, d.get("entropy", []))], PALETTE[0]))
        mids = [(a + b) / 2 for a, b in zip(xs, xs[1:])]
        body.append(_polyline([(fr.x(x), fr.y(v)) for x, v in zip(mids, d.get("dependency", []))], PALETTE[1]))
        if d.get("dependency") and d.get("h0") is not None:
            y = fr.y(d["h0"])
            body.append(f'<line x1="{fr.x(xs[0]):.1f}" x2="{fr.x(xs[-1]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                        f'stroke="{PALETTE[3]}" stroke-width="2" stroke-dasharray="6 4"/>')
    body.append(_x_labels(fr, [u["index"] for u in report["units"]], "unit"))
    return _svg("chart-entropy", "Entropy per unit and dependency D(k, k+1) with the h0 threshold", 320, "".join(body))


def chart_veo(report: dict) -> str:
    """D(k, k+1) with the full-precision vision tower (dashed) and with the VEO-tuned one (solid), and both
    partitions as spans."""
    veo = report.get("veo")
    if not veo:
        return "<p>VEO was off (quantization.qvlm.veo.enabled: false).</p>"
    slots = _slots(report)
    pairs = list(zip(veo["dependency_before"], report["dependency"]))
    values = [v for before, after in pairs for v in (*before.get("dependency", []), *after.get("dependency", []))]
    fr = _frame(300, len(slots), values or [1.0], top=60)
    if values:  # zoom in: VEO moves D by hundredths
        fr = replace(fr, lo=math.floor(min(values) * 20) / 20, hi=math.ceil(max(values) * 20) / 20 + 1e-9)
    body = [_y_axis(fr, "D(k, k+1)"), _legend([("without VEO", PALETTE[3]), ("with VEO", PALETTE[1])])]
    for before, after in pairs:
        xs = [slots[u] for u in after["units"]]
        mids = [(a + b) / 2 for a, b in zip(xs, xs[1:])]
        body.append(_polyline([(fr.x(x), fr.y(v)) for x, v in zip(mids, before.get("dependency", []))], PALETTE[3], "6 4"))
        body.append(_polyline([(fr.x(x), fr.y(v)) for x, v in zip(mids, after.get("dependency", []))], PALETTE[1]))
    for y, label, blocks in ((26, "without", veo["blocks_before"]), (44, "with", report["blocks"])):
        body.append(_text(MARGIN[0] - 6, y + 12, label, "end"))
        for b in blocks:
            xs = [slots[u] for u in b["units"] if u in slots]
            if xs:
                body.append(_span(fr, min(xs), max(xs), y, 16, PALETTE[b["index"] % len(PALETTE)], f"B{b['index']}"))
    body.append(_x_labels(fr, [u["index"] for u in report["units"]], "unit"))
    return _svg("chart-veo", "Visual-encoder optimisation: dependency and blocks without and with it", 300, "".join(body))


def _veo_html(report: dict) -> str:
    veo = report.get("veo")
    if not veo:
        return ""
    rows = [(h["epoch"], h["loss"], h["next_token"], h["dependency"], h["error"]) for h in veo.get("history", [])]
    cost = (f"VEO took {_fmt(veo['seconds'])} s (tuning {_fmt(veo['tuning_seconds'])} s"
            f"{', reused from an earlier run' if veo.get('reused') else ''}); vision-output MSE "
            f"{_fmt(veo['error_before'])} with round-to-nearest, {_fmt(veo['error_after'])} tuned.")
    return f"<p>{_e(cost)}</p>" + _table(["epoch", "loss", "next-token CE", "mean D", "error term"], rows)


def _span(fr: _Frame, first: int, last: int, y: float, h: float, fill: str, label: str) -> str:
    x0, x1 = fr.x(first) - fr.slot() / 2 + 1, fr.x(last) + fr.slot() / 2 - 1
    return (f'<rect x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" height="{h}" fill="{fill}" rx="3">'
            f'<title>{_e(label)}</title></rect>' + _text((x0 + x1) / 2, y + h / 2 + 4, label, extra='style="fill:#fff"'))


def chart_blocks(report: dict) -> str:
    """(b) streams and the block partition as coloured spans over the units."""
    slots, units = _slots(report), report["units"]
    fr = _Frame(MARGIN[0], 20, WIDTH - MARGIN[0] - MARGIN[2], 120, len(units), 0, 1)
    body = [_text(MARGIN[0] - 6, 44, "stream", "end"), _text(MARGIN[0] - 6, 88, "block", "end"),
            _text(MARGIN[0] - 6, 128, "segment", "end")]
    for s, d in enumerate(report["dependency"]):
        xs = [slots[u] for u in d["units"]]
        body.append(_span(fr, min(xs), max(xs), 28, 26, "#888", f"stream {s}"))
    for b in report["blocks"]:
        xs = [slots[u] for u in b["units"] if u in slots]
        if xs:
            body.append(_span(fr, min(xs), max(xs), 66, 36, PALETTE[b["index"] % len(PALETTE)], f"B{b['index']}"))
    for i, u in enumerate(units):
        body.append(_text(fr.x(i), 128, (u.get("segment") or "?")[:4]))
    body.append(_x_labels(_Frame(fr.left, 0, fr.width, 130, fr.n, 0, 1), [u["index"] for u in units], "unit"))
    return _svg("chart-blocks", "Block partition over the units", 190, "".join(body))


def _stat_points(report: dict, key: str) -> list[tuple[int, float, bool, str]]:
    """(slot, value, boosted, name) for every linear (kurtosis) or group (sensitivity) of every unit."""
    points = []
    for i, u in enumerate(report["units"]):
        boosted = {b.removeprefix(u["name"] + ".") for b in u["boosted"]}
        for name, v in u[key].items():
            points.append((i, v, bool(boosted & set(name.split("+"))), f"{u['name']}.{name}"))
    return points


def _scatter(report: dict, key: str, top: int, height: int) -> str:
    points = _stat_points(report, key)
    vals = [v for _, v, _, _ in points if v is not None]
    positive = bool(vals) and min(vals) > 0
    log = positive and max(vals) / min(vals) > 50
    fr = _frame(top + height, len(report["units"]), vals, log, top)
    body = [_y_axis(fr, key + (" (log)" if log else ""))]
    for i, v, boosted, name in points:
        color, r = (PALETTE[3], 6) if boosted else (PALETTE[0], 3.5)
        body.append(f'<circle cx="{fr.x(i):.1f}" cy="{fr.y(v):.1f}" r="{r}" fill="{color}" fill-opacity="0.75">'
                    f'<title>{_e(name)}: {_fmt(v)}</title></circle>')
    return "".join(body) + _x_labels(fr, [u["index"] for u in report["units"]], "unit")


def chart_sensitivity(report: dict) -> str:
    """(c) KurtBoost kurtosis per linear and SensiBoost sensitivity per group, boosted layers in red."""
    body = _legend([("linear / group", PALETTE[0]), ("boosted", PALETTE[3])])
    body += _scatter(report, "kurtosis", 40, 240) + _scatter(report, "sensitivity", 320, 240)
    return _svg("chart-sensitivity", "Kurtosis and sensitivity per unit, boosted layers marked", 560, body)


def _linear_bars(report: dict) -> list[tuple[int, str, int | None, bool]]:
    """(unit slot, full linear name, bits or None if left in full precision, boosted) in unit order."""
    rows = []
    for i, u in enumerate(report["units"]):
        for linear in u["linears"]:
            name = f"{u['name']}.{linear}"
            rows.append((i, name, report["schemes"].get(name, {}).get("bits"), name in u["boosted"]))
    return rows


def chart_bits(report: dict) -> str:
    """(d) weight bits of every linear, grouped by unit (grey: left in full precision)."""
    bars = _linear_bars(report)
    top = max([b if b is not None else 16 for _, _, b, _ in bars] or [8])
    fr = dataclasses.replace(_frame(300, len(bars), [0]), hi=top)  # ticks at quarters of the top bits
    body = [_y_axis(fr, "weight bits"), _legend([("quantized", PALETTE[0]), ("boosted", PALETTE[3]),
                                                 ("full precision", "#bbb")])]
    for k, (slot, name, bits, boosted) in enumerate(bars):
        color = "#bbb" if bits is None else PALETTE[3] if boosted else PALETTE[0]
        value = 16 if bits is None else bits
        y, w = fr.y(value), max(fr.slot() - 1, 1)
        body.append(f'<rect x="{fr.x(k) - w / 2:.1f}" y="{y:.1f}" width="{w:.1f}" height="{fr.y(fr.lo) - y:.1f}" '
                    f'fill="{color}"><title>{_e(name)}: {_e(_fmt(bits) if bits else "FP")}</title></rect>')
    for slot in sorted({s for s, _, _, _ in bars}):
        ks = [k for k, bar in enumerate(bars) if bar[0] == slot]
        edge = fr.x(ks[0]) - fr.slot() / 2
        body.append(f'<line x1="{edge:.1f}" x2="{edge:.1f}" y1="{fr.top}" y2="{fr.top + fr.height + 4}" stroke="#999"/>')
        body.append(_text((fr.x(ks[0]) + fr.x(ks[-1])) / 2, fr.top + fr.height + 14, report["units"][slot]["index"]))
    body.append(_text(fr.left + fr.width / 2, fr.top + fr.height + 40, "linear layers, grouped by unit", size=12))
    return _svg("chart-bits", "Weight bits per linear layer", 300, "".join(body))


def chart_errors(report: dict) -> str:
    """(e) each block's output error before and after the search (log scale)."""
    blocks = report["blocks"]
    vals = [b.get(k) for b in blocks for k in ("error_before", "error_after")]
    fr = _frame(300, len(blocks), [v for v in vals if v], log=True)
    body = [_y_axis(fr, "block output MSE (log)"), _legend([("before search", "#bbb"), ("after search", PALETTE[2])])]
    w = fr.slot() * 0.38
    for i, b in enumerate(blocks):
        for dx, key, color in ((-w, "error_before", "#bbb"), (0, "error_after", PALETTE[2])):
            v = b.get(key)
            if v:
                y = fr.y(v)
                body.append(f'<rect x="{fr.x(i) + dx:.1f}" y="{y:.1f}" width="{w:.1f}" height="{fr.y(fr.lo) - y:.1f}" '
                            f'fill="{color}"><title>block {b["index"]} {key}: {_fmt(v)}</title></rect>')
    body.append(_x_labels(fr, [f"B{b['index']}" for b in blocks], "block"))
    return _svg("chart-errors", "Per-block error before and after search", 300, "".join(body))


def chart_time(report: dict) -> str:
    """(f) wall time per phase, as horizontal bars."""
    order = {p: i for i, p in enumerate(PHASE_ORDER)}
    phases = sorted(report["seconds"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    height, row = 40 + 28 * max(len(phases), 1) + 20, 28
    scale = (WIDTH - 300) / max([v for _, v in phases] + [1e-9])
    body = []
    for i, (phase, secs) in enumerate(phases):
        y = 30 + i * row
        body.append(_text(150, y + 15, phase, "end", 12))
        body.append(f'<rect x="160" y="{y}" width="{max(secs * scale, 1):.1f}" height="20" fill="{PALETTE[i % len(PALETTE)]}"/>')
        body.append(_text(166 + secs * scale, y + 15, f"{secs:.2f} s", "start", 12))
    return _svg("chart-time", "Wall time per phase", height, "".join(body))


# --- the page --------------------------------------------------------------------------------------

CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1120px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg { display: block; margin: 6px 0 18px; background: #fff; border: 1px solid #eee; }
svg text { fill: #333; font-family: sans-serif; } .grid { stroke: #e4e4e4; }
.note { padding: 8px 12px; border-left: 4px solid #59a14f; background: #f4faf3; }
.note.research { border-color: #e15759; background: #fdf3f3; }
"""


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    def cell(v: Any) -> str:
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f'<td class="num">{_e(_fmt(v))}</td>' if num else f"<td>{_e(_fmt(v))}</td>"
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _summary_rows(report: dict) -> list[tuple[str, Any]]:
    s = report["summary"]
    method = f"{s['method']} · {s['scheme']}" if s.get("method") else s["scheme"]
    return [("job", s.get("job")), ("model class", s.get("model_class")), ("method / scheme", method),
            ("units", s["units"]), ("streams", s["streams"]), ("blocks", s["blocks"]),
            ("quantized linears", s["linears"]), ("boosted linears", s["boosted"]),
            ("weight bits (mean over linears)", s["mean_bits"]),
            ("bits per weight incl. scales", s["mean_bits_with_scales"]),
            ("time (s)", s["seconds_total"]), ("servable", "yes" if report["servable"]["servable"] else "no")]


def _evaluation_html(evaluation: dict | None) -> str:
    if not evaluation:
        return "<p>No evaluation was run.</p>"
    e = evaluation
    rows = [("next-token positions", e.get("tokens")), ("mean KL(FP ‖ quantized), nats", e.get("kl_mean")),
            ("top-1 agreement", e.get("top1_agreement")), ("questions", e.get("questions"))]
    acc = _table(["", "full precision", "quantized"], [("answer accuracy", e.get("fp_accuracy"), e.get("q_accuracy"))])
    return _table(None, rows) + acc


def _unit_rows(report: dict) -> list[tuple]:
    def top(d: dict) -> float | None:
        return max(d.values()) if d else None
    return [(u["index"], u["name"], u["segment"], u["stream"], u["block"], u["entropy"], u["dependency_next"],
             top(u["kurtosis"]), top(u["sensitivity"]), u["bits"], ", ".join(u["boosted"]) or "–")
            for u in report["units"]]


CHARTS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("Entropy and dependency", chart_entropy), ("Block partition", chart_blocks),
    ("Kurtosis and sensitivity", chart_sensitivity), ("Bits per layer", chart_bits),
    ("Block error before and after search", chart_errors), ("Time per phase", chart_time))


def render_html(report: dict) -> str:
    """A self-contained page: summary, servability, evaluation, the six charts and the per-unit table."""
    title = f"qvlm report: {report.get('job') or 'job'}"
    servable_note = report["servable"]
    cls = "note" if servable_note["servable"] else "note research"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
             "<h2>Summary</h2>", _table(None, _summary_rows(report)),
             f'<p class="{cls}">{_e(servable_note["note"])}</p>',
             "<h2>Evaluation on held-out records</h2>", _evaluation_html(report.get("evaluation"))]
    parts += [f"<h2>{_e(name)}</h2>{chart(report)}" for name, chart in CHARTS]
    parts += ["<h2>Visual-encoder optimisation</h2>", chart_veo(report), _veo_html(report)]
    parts += ["<h2>Units</h2>", _table(["#", "unit", "segment", "stream", "block", "entropy", "D(k,k+1)",
                                        "max kurtosis", "max sensitivity", "bits", "boosted"], _unit_rows(report)),
              "</body></html>"]
    return "\n".join(parts)
