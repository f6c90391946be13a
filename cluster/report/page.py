"""``report.html``: one self-contained page (inline CSS and SVG; no scripts, fonts, images or links to
anywhere else), from a ``Report``."""

from __future__ import annotations

import html
from typing import Any, Sequence

from cluster.report.charts import CHARTS, VEO_CHART
from cluster.report.model import Report, scheme_label

CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1120px; color: #222; padding: 0 12px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg { display: block; max-width: 100%; height: auto; margin: 6px 0 18px; background: #fff; }
.note { padding: 8px 12px; border-left: 4px solid #59a14f; background: #f4faf3; }
.note.research { border-color: #e15759; background: #fdf3f3; }
summary { cursor: pointer; margin: 8px 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""

    def cell(v: Any) -> str:
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f'<td class="num">{_e(_fmt(v))}</td>' if numeric else f"<td>{_e(_fmt(v))}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _summary_rows(r: Report) -> list[tuple[str, Any]]:
    method = f"{r.method} · {scheme_label(r)}" if r.method else scheme_label(r)
    return [("job", r.job), ("model class", r.model_class), ("method / scheme", method),
            ("units", len(r.units)), ("streams", len(r.streams)), ("blocks", len(r.blocks)),
            ("quantized linears", r.bits.linears), ("boosted linears", len(r.boosted)),
            ("weight bits (mean, weighted by layer size)", r.bits.mean_bits),
            ("bits per weight incl. scales and zero points", r.bits.bits_per_weight),
            ("checkpoint format", r.servable.format),
            ("time (s)", r.seconds.get("total", sum(r.seconds.values()))),
            ("servable", "yes" if r.servable.servable else "no")]


def _evaluation_html(r: Report) -> str:
    if r.evaluation_skipped:
        return f"<p>Evaluation skipped: {_e(r.evaluation_skipped)}.</p>"
    e = r.evaluation
    if e is None:
        return "<p>No evaluation was run.</p>"
    rows = [("next-token positions", e.tokens), ("mean KL(FP ‖ quantized), nats", e.kl_mean),
            ("top-1 agreement", e.top1_agreement), ("questions", e.questions)]
    accuracy = _table(["", "full precision", "quantized"], [("answer accuracy", e.fp_accuracy, e.q_accuracy)])
    return _table(None, rows) + accuracy


VEO_CAVEAT = ("VEO does not always help: on qvlm's trained tiny LLaVA it lowered the KL to full precision at W4A4 "
              "and raised it at W6A6 (BENCHMARKS.md, \"VEO\"); compare this evaluation with a run without it.")


def _veo_html(r: Report) -> str:
    veo = r.veo
    if veo is None:
        return "<p>VEO was off (quantization.qvlm.veo.enabled: false).</p>"
    cost = (f"VEO took {_fmt(veo.seconds)} s (tuning {_fmt(veo.tuning_seconds)} s"
            f"{', reused from an earlier run' if veo.reused else ''}); vision-output MSE "
            f"{_fmt(veo.error_before)} with round-to-nearest, {_fmt(veo.error_after)} tuned.")
    rows = [(h.epoch, h.loss, h.next_token, h.dependency, h.error) for h in veo.history]
    return (VEO_CHART.svg(r) + f"<p>{_e(cost)} {_e(VEO_CAVEAT)}</p>"
            + _table(["epoch", "loss", "next-token CE", "mean D", "error term"], rows))


def _unit_rows(r: Report) -> list[tuple]:
    def top(d) -> float | None:
        return max(d.values()) if d else None
    return [(u.index, u.name, u.segment, u.stream, u.block, u.entropy, u.dependency_next, top(u.kurtosis),
             top(u.sensitivity), u.mean_bits, ", ".join(x.name for x in u.linears if x.boosted) or "–")
            for u in r.units]


def _linear_rows(r: Report) -> list[tuple]:
    rows = []
    for u in r.units:
        for x in u.linears:
            s = x.scheme
            group = None if s is None else "per-channel" if s.group_size == -1 else s.group_size
            rows.append((u.index, f"{u.name}.{x.name}", "x".join(map(str, x.shape)) if x.shape else None,
                         s.bits if s else "FP", group, u.kurtosis.get(x.name), "yes" if x.boosted else ""))
    return rows


def _units_html(r: Report) -> str:
    units = _table(["#", "unit", "segment", "stream", "block", "entropy", "D(k,k+1)", "max kurtosis",
                    "max sensitivity", "bits", "boosted"], _unit_rows(r))
    linears = _table(["unit", "linear", "shape", "bits", "group", "kurtosis", "boosted"], _linear_rows(r))
    return f"{units}<details><summary>Every linear layer</summary>{linears}</details>"


def _block_rows(r: Report) -> list[tuple]:
    def candidates(b) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in b.candidates.items()) or "–"
    return [(b.index, b.stream, " ".join(map(str, b.units)), b.error_before, b.error_after, b.chosen or "–",
             candidates(b), b.quarantine or "") for b in r.blocks]


def _blocks_html(r: Report) -> str:
    quarantined = [b.index for b in r.blocks if b.quarantine]
    note = (f'<p class="note research">Quarantined (kept at RTN with clipping after a numerical failure): blocks '
            f'{_e(", ".join(map(str, quarantined)))}.</p>') if quarantined else ""
    return note + _table(["block", "stream", "units", "error before", "error after", "chosen", "candidates",
                          "quarantine"], _block_rows(r))


def render_html(report: Report) -> str:
    """The page: summary, servability, evaluation, the charts, VEO and the per-unit and per-linear tables."""
    title = f"qvlm report: {report.job or 'job'}"
    note_class = "note" if report.servable.servable else "note research"
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>',
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
             "<h2>Summary</h2>", _table(None, _summary_rows(report)),
             f'<p class="{note_class}">{_e(report.servable.note)}</p>',
             "<h2>Evaluation on held-out records</h2>", _evaluation_html(report)]
    parts += [f"<h2>{_e(chart.heading)}</h2>{chart.svg(report)}" for chart in CHARTS]
    parts += [f"<h2>{_e(VEO_CHART.heading)}</h2>", _veo_html(report),
              "<h2>Blocks</h2>", _blocks_html(report),
              "<h2>Units</h2>", _units_html(report), "</body></html>"]
    return "\n".join(parts)
