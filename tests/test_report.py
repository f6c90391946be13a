"""cluster.report: the typed report from a real plan document, qvlm_report.json and the self-contained HTML page.

``data/sample_qvlm_plan.json`` is the plan document of a real job on the tiny LLaVA (W4 g32, VEO on, two epochs).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.report import render_html, report_document, report_from_plan
from qvlm.evaluate import EvalResult, EvalSkipped

PLAN = json.loads((Path(__file__).parent / "data" / "sample_qvlm_plan.json").read_text())
CHART_IDS = ("chart-entropy", "chart-blocks", "chart-sensitivity", "chart-bits", "chart-errors", "chart-time",
             "chart-veo")
EVALUATION = {"tokens": 179, "kl_mean": 0.0123, "top1_agreement": 0.91, "questions": 8,
              "fp_accuracy": 0.5, "q_accuracy": 0.375}
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"
FC1 = "model.vision_tower.encoder.layers.1.mlp.fc1"


def _plan(**changes) -> dict:
    return {**copy.deepcopy(PLAN), **changes}


def _boosted_plan() -> dict:
    """q_proj of the first decoder layer boosted to W8 g16, a vision fc1 boosted, the projector's second
    linear left in full precision, and a unit name that is HTML."""
    plan = _plan(boosted=[Q_PROJ, FC1])
    plan["units"][5]["name"] = "<script>alert('x')</script>"
    plan["schemes"][Q_PROJ] = {"bits": 8, "group_size": 16, "symmetric": True}
    del plan["schemes"]["model.multi_modal_projector.linear_2"]
    return plan


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(report_from_plan(_boosted_plan(), EvalResult(**EVALUATION)))


def test_report_from_the_sample_plan():
    report = report_from_plan(PLAN, EvalResult(**EVALUATION))
    assert (len(report.units), len(report.blocks), len(report.streams), report.bits.linears) == (6, 4, 3, 35)
    assert report.model_class == "LlavaForConditionalGeneration" and report.job == "sample-report"
    assert report.bits.mean_bits == 4.0 and report.bits.bits_per_weight == pytest.approx(4 + 16 / 32)
    unit3 = report.units[3]
    assert (unit3.block, unit3.stream, unit3.position) == (2, 2, 0)
    assert unit3.entropy == PLAN["dependency"][2]["entropy"][0]
    assert unit3.dependency_next == PLAN["dependency"][2]["dependency"][0]
    assert report.units[5].dependency_next is None  # the last unit of its stream has no successor
    assert unit3.kurtosis == PLAN["unit_stats"][3]["kurtosis"]
    assert report.evaluation == EvalResult(**EVALUATION)
    assert [b.units for b in report.veo.blocks_before] == [tuple(b["units"]) for b in PLAN["veo"]["blocks_before"]]
    assert [h.epoch for h in report.veo.history] == [0, 1]
    assert "VEO does not always help" in render_html(report)  # where it did not help, on the page beside its figures


def test_report_json_carries_every_section():
    doc = json.loads(json.dumps(report_document(report_from_plan(PLAN, EvalResult(**EVALUATION)))))
    assert {"summary", "units", "streams", "blocks", "seconds", "bits", "evaluation", "servable", "veo"} <= set(doc)
    assert doc["summary"]["scheme"] == "W4 g32 sym, A16"
    assert doc["summary"]["seconds_total"] == PLAN["seconds"]["total"]
    assert doc["evaluation"] == EVALUATION and doc["evaluation_skipped"] is None
    assert doc["units"][3]["linears"][0] == {"name": "self_attn.q_proj", "boosted": False, "shape": [128, 128],
                                            "scheme": {"bits": 4, "group_size": 32, "symmetric": True}}
    assert doc["blocks"][1]["seconds"] == PLAN["blocks"][1]["seconds"]


def test_bits_per_weight_count_scales_of_each_linear_by_its_size():
    report = report_from_plan(_boosted_plan(), None)
    shapes = PLAN["linear_shapes"]
    numel = {n: shapes[n][0] * shapes[n][1] for n in report.schemes}
    by_hand = {n: s.bits + 16 / s.group_size for n, s in report.schemes.items()}  # symmetric: no zero points
    assert report.bits.bits_per_weight == pytest.approx(sum(by_hand[n] * numel[n] for n in numel) / sum(numel.values()))
    assert report.bits.linears == 34 and report.boosted == (FC1, Q_PROJ)
    unit3 = report.units[3]
    assert unit3.boosted == (Q_PROJ,)
    layer = {n: k for n, k in numel.items() if n.startswith(unit3.name + ".")}
    assert unit3.mean_bits == pytest.approx((4 * sum(layer.values()) + 4 * layer[Q_PROJ]) / sum(layer.values()))
    projector = report.units[2]
    assert [x.scheme is None for x in projector.linears] == [False, True]


@pytest.mark.smoke  # the format compressed-tensors picks for each scheme
@pytest.mark.parametrize("weights, activations, ok, fmt, sidecar", [
    (4, {"bits": 16, "granularity": "token", "symmetric": True}, True, "pack-quantized", False),
    (3, {"bits": 16, "granularity": "token", "symmetric": True}, False, "pack-quantized", False),
    (4, {"bits": 4, "granularity": "channel", "symmetric": False}, False, "pack-quantized", True),
    (4, {"bits": 8, "granularity": "token", "symmetric": True}, False, "int-quantized", False),  # W4A8: no kernel
    (8, {"bits": 8, "granularity": "token", "symmetric": True}, True, "int-quantized", False),  # W8A8 dynamic
    (8, {"bits": 8, "granularity": "tensor", "symmetric": True}, False, "pack-quantized", True),  # static
])
def test_servability_follows_the_export(weights, activations, ok, fmt, sidecar):
    plan = _plan(activations=activations)
    plan["schemes"] = {n: {**s, "bits": weights} for n, s in plan["schemes"].items()}
    servable = report_from_plan(plan).servable
    assert (servable.servable, servable.format, servable.sidecar) == (ok, fmt, sidecar)
    assert ("sidecar" in servable.note) is sidecar and ("research-only" in servable.note) is not ok


def test_html_is_self_contained_and_escaped(page):
    for chart_id in CHART_IDS:
        assert page.count(f'<svg id="{chart_id}"') == 1
    assert page.count("<title>") == len(CHART_IDS) + 1
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "0.375" in page and "LlavaForConditionalGeneration" in page
    assert "block output MSE (log)" in page  # the block errors span more than two decades
    assert "self_attn.q_proj" in page and "mlp.fc1" in page  # boosted linears are named on the chart


def test_html_has_no_external_reference_and_unique_ids(page):
    assert "http" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page) and not re.search(r"\bsrc=", page)
    assert not re.search(r"url\((?!#)", page) and not re.search(r'href="(?!#)', page)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)) > 100
    assert set(re.findall(r'(?:url\(#|href="#)([^)"]+)', page)) <= set(ids)  # every reference resolves


def test_html_is_byte_identical_for_the_same_input(page):
    assert render_html(report_from_plan(_boosted_plan(), EvalResult(**EVALUATION))) == page
    plan = _boosted_plan()
    plan["blocks"][2]["error_after"] /= 2
    assert render_html(report_from_plan(plan, EvalResult(**EVALUATION))) != page


def test_html_without_evaluation_or_optional_keys():
    plan = {k: v for k, v in PLAN.items() if k not in ("unit_stats", "boosted", "stage_memory", "veo")}
    page = render_html(report_from_plan(plan, None))
    assert "No evaluation was run" in page and "VEO was off" in page
    assert all(f'<svg id="{c}"' in page for c in CHART_IDS if c != "chart-veo") and "chart-veo" not in page


def test_a_skipped_evaluation_says_why():
    report = report_from_plan(PLAN, EvalSkipped("calibration.eval_samples is 0"))
    assert report.evaluation is None and report.evaluation_skipped == "calibration.eval_samples is 0"
    assert "Evaluation skipped: calibration.eval_samples is 0" in render_html(report)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(tmp_path, page):
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    path, png = tmp_path / "report.html", tmp_path / "report.png"
    path.write_text(page, encoding="utf-8")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2400",
                    path.as_uri()], check=False, capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.size == (1200, 2400)
        rgb = im.convert("RGB")
        colours = rgb.resize((120, 240)).getcolors(maxcolors=1 << 16)
        chart_blue = sum(n for n, px in rgb.getcolors(maxcolors=1 << 24) if px == (0x4E, 0x79, 0xA7))
    assert colours is None or len(colours) > 20  # not a blank page
    assert chart_blue > 2_000  # the charts' lines and bars are drawn (the page's CSS has no such colour)


def test_candidates_and_quarantine_reach_the_json_and_the_page():
    plan = _plan()
    plan["blocks"][0].update(candidates={"rtn": 0.25, "gptq": 0.125, "learned": 0.0625}, chosen="learned")
    plan["blocks"][2].update(candidates={}, chosen="fallback", quarantine="gptq: the Hessian has non-finite entries")
    report = report_from_plan(plan, EVALUATION)
    assert report.blocks[0].chosen == "learned" and report.blocks[0].candidates["gptq"] == 0.125
    assert report.blocks[2].quarantine.startswith("gptq:") and report.blocks[1].quarantine is None
    doc = json.loads(json.dumps(report_document(report)))
    assert doc["summary"]["quarantined"] == 1 and doc["blocks"][0]["candidates"]["rtn"] == 0.25
    html = render_html(report)
    assert "Quarantined" in html and "the Hessian has non-finite entries" in html and "gptq 0.125" in html
    assert "Quarantined" not in render_html(report_from_plan(PLAN, EVALUATION))
