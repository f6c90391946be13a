"""qvlm.report: the JSON report from a real plan document, and the self-contained HTML page."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qvlm.report import build_report, render_html, servable

PLAN = json.loads((Path(__file__).parent / "data" / "sample_qvlm_plan.json").read_text())
CHART_IDS = ("chart-entropy", "chart-blocks", "chart-sensitivity", "chart-bits", "chart-errors", "chart-time")
EVALUATION = {"tokens": 179, "kl_mean": 0.0123, "top1_agreement": 0.91, "questions": 8,
              "fp_accuracy": 0.5, "q_accuracy": 0.375}


def _plan_with_script() -> dict:
    plan = copy.deepcopy(PLAN)
    plan["units"][2]["name"] = "<script>alert('x')</script>"
    plan["boosted"] = ["model.language_model.layers.0.self_attn.q_proj"]
    plan["schemes"]["model.language_model.layers.0.self_attn.q_proj"]["bits"] = 8
    return plan


def test_report_sections_from_the_sample_plan():
    report = build_report(PLAN, EVALUATION)
    assert {"summary", "units", "blocks", "dependency", "seconds", "evaluation", "servable"} <= set(report)
    s = report["summary"]
    assert (s["units"], s["blocks"], s["streams"], s["linears"]) == (6, 5, 3, 35)
    assert s["model_class"] == "LlavaForConditionalGeneration"
    assert s["mean_bits"] == 4.0 and s["mean_bits_with_scales"] == pytest.approx(4 + 16 / 128)
    assert s["seconds_total"] == pytest.approx(sum(PLAN["seconds"].values()))
    unit3 = report["units"][3]
    assert unit3["block"] == 3 and unit3["stream"] == 2
    assert unit3["entropy"] == PLAN["dependency"][2]["entropy"][0]
    assert unit3["dependency_next"] == PLAN["dependency"][2]["dependency"][0]
    assert report["units"][5]["dependency_next"] is None  # the last unit of its stream has no successor
    assert report["evaluation"] == EVALUATION
    json.dumps(report)  # it is the qvlm_report.json document


def test_boosted_linears_raise_the_unit_bits():
    report = build_report(_plan_with_script(), None)
    unit3 = report["units"][3]
    assert unit3["boosted"] == ["model.language_model.layers.0.self_attn.q_proj"]
    assert unit3["bits"] == pytest.approx((6 * 4 + 8) / 7)
    assert report["summary"]["boosted"] == 1


@pytest.mark.parametrize("activations, ok", [
    (None, True),
    ({"bits": 16, "granularity": "token", "symmetric": True}, True),
    ({"bits": 4, "granularity": "channel", "symmetric": False}, False),
    ({"bits": 8, "granularity": "token", "symmetric": True}, False),  # W4A8: no int kernel path
])
def test_servable_decision(activations, ok):
    assert build_report(PLAN, None, activations)["servable"]["servable"] is ok


def test_servable_w8a8_dynamic_and_odd_weight_bits():
    w8 = {"a": {"bits": 8, "group_size": -1, "symmetric": True}}
    assert servable(w8, {"bits": 8, "granularity": "token", "symmetric": True})["servable"]
    assert not servable(w8, {"bits": 8, "granularity": "tensor", "symmetric": True})["servable"]
    assert not servable({"a": {"bits": 3, "group_size": 128, "symmetric": True}}, None)["servable"]
    plan = dict(PLAN, activations={"bits": 6, "granularity": "channel", "symmetric": True})
    assert "sidecar" in build_report(plan, None)["servable"]["note"]


def test_html_is_self_contained_and_escaped():
    page = render_html(build_report(_plan_with_script(), EVALUATION))
    for chart_id in CHART_IDS:
        assert f'<svg id="{chart_id}"' in page
    assert page.count("<title>") >= len(CHART_IDS) + 1
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "0.375" in page and "LlavaForConditionalGeneration" in page


def test_html_without_evaluation_or_optional_keys():
    plan = {k: v for k, v in PLAN.items() if k not in ("unit_stats", "boosted", "stage_memory")}
    page = render_html(build_report(plan, None))
    assert "No evaluation was run" in page
    assert all(f'id="{c}"' in page for c in CHART_IDS)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(render_html(build_report(_plan_with_script(), EVALUATION)), encoding="utf-8")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2400",
                    page.as_uri()], check=False, capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.size == (1200, 2400)
        colours = im.convert("RGB").resize((120, 240)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # not a blank page
