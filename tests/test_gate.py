"""The publish gate (output.gate) and the manifest's provenance, end to end on S3 (moto_server) through the real
qvlm-submit: a failing gate holds the output (no manifest, exit 1, status says so), a re-submit with a looser gate
publishes it without searching again, and qvlm verify checks and prints the provenance."""

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.gate import gate_verdict
from cluster.job import Gate
from cluster.provenance import seal
from jobs.cli import app
from jobs.spec import load_job
from qvlm.batches import records_for
from qvlm.evaluate import EvalResult, EvalSkipped
from qvlm.records import records_sha256
from tests.job_files import write_job

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
BUCKET = "gate-bucket"
STRICT = {"max_kl": 1e-9, "min_top1": 0.5}  # the tiny model's KL is ~1e-5: held
LOOSE = {"max_kl": 1.0, "min_top1": 0.5}


def _submit(job: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin/qvlm-submit"
    return subprocess.run([str(exe), str(job), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def _objects(s3, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under ``prefix`` (relative keys)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _get(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def gated(s3_server, tiny_llava_dir, tmp_path_factory):
    """One job held by a strict gate, then re-submitted with a looser one; what each step showed is recorded
    before the next step changes the output."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/out/gated"
    job = write_job(tmp_path_factory.mktemp("gate") / "job.yaml", "gated", str(tiny_llava_dir), uri,
                    **{"calibration.eval_samples": 4, "output.endpoint_url": s3_server, "output.gate": STRICT})
    at = ["--endpoint-url", s3_server]
    held = {"proc": _submit(job), "objects": _objects(s3, "out/gated/"),
            "state": json.loads(_get(s3, "out/gated/_qvlm/state.json")),
            "status": runner.invoke(app, ["status", uri, *at]), "verify": runner.invoke(app, ["verify", uri, *at])}
    published = {"proc": _submit(job, "--set", f"output.gate.max_kl={LOOSE['max_kl']}"),
                 "objects": _objects(s3, "out/gated/"), "state": json.loads(_get(s3, "out/gated/_qvlm/state.json")),
                 "status": runner.invoke(app, ["status", uri, *at]),
                 "verify": runner.invoke(app, ["verify", uri, *at, "--layers"])}
    local = tmp_path_factory.mktemp("copy") / "gated"
    for key in published["objects"]:
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(_get(s3, f"out/gated/{key}"))
    return {"held": held, "published": published, "job": job, "local": local}


@pytest.mark.slow
def test_a_failing_gate_holds_the_output_exit_1_no_manifest(gated):
    held = gated["held"]
    proc = held["proc"]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "held by the gate: KL" in proc.stderr and "(max_kl 1e-09): FAIL" in proc.stderr
    assert "top-1 agreement" in proc.stderr and "(min_top1 0.5): pass" in proc.stderr
    assert "Traceback" not in proc.stderr
    objects = held["objects"]
    assert "qvlm_manifest.json" not in objects
    # the evidence and what a resume needs stay: report, plan, checkpoint files, block records
    assert {"qvlm_report.json", "report.html", "qvlm_plan.json", "config.json", "_qvlm/held.json"} <= set(objects)
    assert held["state"]["blocks_total"] > 0
    records = [k for k in objects if re.fullmatch(r"_qvlm/blocks/block-\d+\.json", k)]
    assert len(records) == held["state"]["blocks_total"]
    assert held["state"]["phase"] == "held"
    assert held["status"].exit_code == 1 and "held by the gate" in held["status"].output
    assert held["verify"].exit_code == 1 and "has no qvlm_manifest.json" in held["verify"].output


@pytest.mark.slow
def test_a_looser_gate_publishes_without_searching_again(gated):
    held, published = gated["held"], gated["published"]
    proc = published["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    total = held["state"]["blocks_total"]
    assert f"done: {total} blocks ({total} resumed)" in proc.stdout
    assert "the gate passed: KL" in proc.stdout
    assert "searching" not in proc.stdout and "capturing" not in proc.stdout  # nothing run again
    state = published["state"]
    assert state["phase"] == "finished" and state["blocks_resumed"] == state["blocks_done"] == total
    before, after = held["objects"], published["objects"]
    for key, etag in before.items():  # every block and checkpoint file is the one the held run wrote
        if key.startswith("model-") or key.startswith("_qvlm/blocks/") or key in ("qvlm_plan.json", "qvlm_report.json"):
            assert after[key] == etag, key
    assert "qvlm_manifest.json" in after and "_qvlm/held.json" not in after
    assert published["status"].exit_code == 0 and f"finished: blocks {total}/{total}" in published["status"].output


@pytest.mark.slow
def test_the_manifest_holds_the_provenance_and_verify_prints_it(gated, tiny_llava_dir):
    manifest = json.loads((gated["local"] / "qvlm_manifest.json").read_text())
    prov = manifest["provenance"]
    spec = load_job(gated["job"], ["output.gate.max_kl=1.0"])
    assert prov["job_file"] == spec.model_dump(mode="json")  # the job file that passed the gate, as run
    assert prov["job_file"]["output"]["gate"]["max_kl"] == LOOSE["max_kl"]
    calibration, held_out = records_for(spec.compile().calibration)
    assert prov["calibration"]["records_sha256"] == records_sha256([*calibration, *held_out])
    assert prov["versions"] == {name: metadata.version(name) for name in ("torch", "transformers", "compressed-tensors", "ray")}
    assert prov["qvlm"]["version"] == metadata.version("qvlm")
    assert prov["seeds"] == {"calibration": spec.calibration.seed, "method": spec.calibration.seed}
    assert prov["devices"]["count"] == 1 and [s["device"] for s in prov["devices"]["stages"]] == ["cpu", "cpu"]
    plan = json.loads((gated["local"] / "qvlm_plan.json").read_text())
    assert set(prov["layers"]) == set(plan["schemes"])
    errors = {b["index"]: (b["chosen"], b["error_after"]) for b in plan["blocks"]}
    for name, layer in prov["layers"].items():
        assert (layer["bits"], layer["group_size"]) == (plan["schemes"][name]["bits"], plan["schemes"][name]["group_size"])
        assert (layer["method"], layer["block_error"]) == errors[layer["block"]]
    assert prov["gate"].startswith("KL ") and "(max_kl 1): pass" in prov["gate"]
    assert manifest["provenance_sha256"] == seal(prov)
    verify = gated["published"]["verify"]
    assert verify.exit_code == 0, verify.output
    assert f"qvlm {prov['qvlm']['version']}" in verify.output and f"torch {prov['versions']['torch']}" in verify.output
    assert prov["calibration"]["records_sha256"] in verify.output and f"publish gate: {prov['gate']}" in verify.output
    some_layer = sorted(prov["layers"])[0]
    assert f"  {some_layer}: 4 bits, group 128, block" in verify.output


def _tampered(local: Path, tmp_path: Path, edit) -> CliRunner:
    copy = tmp_path / "copy"
    shutil.copytree(local, copy)
    path = copy / "qvlm_manifest.json"
    manifest = json.loads(path.read_text())
    edit(copy, manifest)
    path.write_text(json.dumps(manifest))
    return runner.invoke(app, ["verify", str(copy)])


def _reseal(manifest: dict) -> None:
    manifest["provenance_sha256"] = seal(manifest["provenance"])


def _other_bits(copy, manifest):
    layer = next(iter(manifest["provenance"]["layers"].values()))
    layer["bits"] = 8


def _other_bits_resealed(copy, manifest):
    _other_bits(copy, manifest)
    _reseal(manifest)


def _other_job_resealed(copy, manifest):
    manifest["provenance"]["job_file"]["calibration"]["seed"] += 1
    _reseal(manifest)


def _other_versions(copy, manifest):
    manifest["provenance"]["versions"]["torch"] = "0.0.1"


def _corrupt_file(copy, manifest):
    path = next(copy.glob("model-*.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"!")


@pytest.mark.slow
@pytest.mark.parametrize("edit,expected", [
    (_other_versions, "provenance: its sha256 does not match provenance_sha256"),
    (_other_bits, "provenance: its sha256 does not match provenance_sha256"),
    (_other_bits_resealed, "provenance.layers: differ from qvlm_plan.json"),
    (_other_job_resealed, "provenance.job_file: does not hash to the manifest's spec_hash"),
    (_corrupt_file, "sha256 mismatch"),
])
def test_verify_fails_a_tampered_provenance_or_file(gated, tmp_path, edit, expected):
    intact = runner.invoke(app, ["verify", str(gated["local"])])
    assert intact.exit_code == 0, intact.output
    result = _tampered(gated["local"], tmp_path, edit)
    assert result.exit_code == 1 and expected in result.output, result.output


# ---- at submission, and the verdict itself (no Ray) ---------------------------------------------------

def test_a_gate_without_an_evaluation_is_refused_at_submission(tmp_path, tiny_llava_dir):
    job = write_job(tmp_path / "job.yaml", "gate-no-eval", str(tiny_llava_dir), str(tmp_path / "out"),
                    **{"calibration.eval_samples": 0, "output.gate": {"max_kl": 0.1}})
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2 and "output.gate: the gate checks the held-out evaluation" in result.output
    assert not (tmp_path / "out").exists()


def test_an_accuracy_gate_without_answers_is_refused_at_submission(tmp_path, tiny_llava_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": f"Say something about {i}."}) + "\n" for i in range(12)))
    job = write_job(tmp_path / "job.yaml", "gate-no-answers", str(tiny_llava_dir), str(tmp_path / "out"),
                    **{"calibration.eval_samples": 4, "calibration.data": str(data),
                       "quantization.targets": ["language"], "output.gate": {"max_accuracy_drop": 0.1}})
    result = runner.invoke(app, ["submit", str(job)])
    assert result.exit_code == 2 and "output.gate.max_accuracy_drop: none of the 4 held-out records" in result.output
    assert not (tmp_path / "out").exists()


def test_the_gate_is_not_part_of_the_job_but_names_its_own_submission(tmp_path, tiny_llava_dir):
    job = write_job(tmp_path / "job.yaml", "gate-hash", str(tiny_llava_dir), str(tmp_path / "out"),
                    **{"calibration.eval_samples": 4, "output.gate": STRICT})
    strict, loose = load_job(job).compile(), load_job(job, ["output.gate.max_kl=1.0"]).compile()
    ungated = load_job(job, ["output.gate={}"]).compile()
    assert strict.spec_hash == loose.spec_hash == ungated.spec_hash
    assert len({strict.submission_id, loose.submission_id, ungated.submission_id}) == 3
    assert ungated.submission_id == f"qvlm-gate-hash-{ungated.spec_hash[:8]}"


FIGURES = EvalResult(tokens=100, kl_mean=0.02, top1_agreement=0.9, questions=10, fp_accuracy=0.8, q_accuracy=0.7)


@pytest.mark.parametrize("gate,passed,shown", [
    (Gate(), True, "no gate"),
    (Gate(max_kl=0.05), True, "KL 0.02 nats (max_kl 0.05): pass"),
    (Gate(max_kl=0.01), False, "KL 0.02 nats (max_kl 0.01): FAIL"),
    (Gate(min_top1=0.95), False, "top-1 agreement 0.9000 (min_top1 0.95): FAIL"),
    (Gate(max_accuracy_drop=0.1 + 1e-9), True, "answer accuracy drop 0.1000 (FP 0.8000, quantized 0.7000"),
    (Gate(max_accuracy_drop=0.05), False, "max_accuracy_drop 0.05): FAIL"),
])
def test_the_verdict_puts_each_figure_against_its_threshold(gate, passed, shown):
    ok, verdict = gate_verdict(gate, FIGURES)
    assert ok is passed and shown in verdict


def test_a_gate_fails_without_figures_to_check():
    ok, verdict = gate_verdict(Gate(max_kl=1.0), EvalSkipped("calibration.eval_samples is 0"))
    assert not ok and "no figures to check (calibration.eval_samples is 0)" in verdict
    no_answers = replace(FIGURES, questions=0, fp_accuracy=None, q_accuracy=None)
    ok, verdict = gate_verdict(Gate(max_accuracy_drop=0.5), no_answers)
    assert not ok and "no held-out record has an answer" in verdict


@pytest.mark.slow
def test_a_held_output_whose_files_changed_is_resumed_not_published_blind(tmp_path, tiny_llava_dir, local_ray):
    """The held record vouches for the held files only while they match: a block file changed since is searched
    again (the others are resumed) before the looser gate publishes."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", "gate-changed", str(tiny_llava_dir), str(out),
                    **{"calibration.eval_samples": 4, "quantization.method": "rtn", "output.gate": STRICT})
    held = runner.invoke(app, ["submit", str(job)])
    assert held.exit_code == 1 and "held by the gate" in held.output, held.output
    total = json.loads((out / "_qvlm/state.json").read_text())["blocks_total"]
    block = sorted(out.glob("model-*.safetensors"))[0]
    block.write_bytes(block.read_bytes()[:-1] + b"!")
    again = runner.invoke(app, ["submit", str(job), "--set", "output.gate.max_kl=1.0"])
    assert again.exit_code == 0, again.output
    assert f"held by the gate, but {block.name}: sha256 mismatch" in again.output
    assert f"done: {total} blocks ({total - 1} resumed)" in again.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
