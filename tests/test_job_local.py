"""The distributed job on a real local Ray: same bytes as one process, any worker count, resume."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_safetensors

from cluster.driver import run_job
from cluster.settings import JobSettings
from qvlm.batches import CalibrationSettings, calibration_batches
from qvlm.config import QuantConfig
from qvlm.driver import quantize
from qvlm.quant import ActScheme
from tests.conftest import load_llava
from workers.block_task import record_key

pytestmark = pytest.mark.timeout(600)

CAL = CalibrationSettings(samples=8, eval_samples=0, max_length=64, batch_size=4)


def _settings(model_dir, out, workers=2, quant=None, **kw):
    quant = quant or QuantConfig(epochs=2, iters=30, activations=ActScheme(4, "channel", False), propagation="quantized")
    return JobSettings(name="t", spec_hash="h" * 64, model_uri=str(model_dir), output_uri=str(out), calibration=CAL,
                       quant=quant, workers=workers, **kw)


def _shard_tensors(out):
    plan = json.loads((out / "qvlm_plan.json").read_text())
    tensors = {}
    for block in plan["blocks"]:
        tensors.update(load_safetensors((out / block["shard"]).read_bytes()))
    return plan, tensors


@pytest.fixture(scope="module")
def two_worker_run(local_ray, tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "job"
    outcome = run_job(_settings(tiny_llava_dir, out))
    return out, outcome


@pytest.mark.smoke
def test_distributed_equals_one_process(two_worker_run, tiny_llava_dir):
    out, outcome = two_worker_run
    plan, tensors = _shard_tensors(out)
    model, _ = load_llava(tiny_llava_dir)
    settings = _settings(tiny_llava_dir, out)
    _, result = quantize(model, calibration_batches(tiny_llava_dir, CAL), settings.quant)
    expected = result.tensors()
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert [b["units"] for b in plan["blocks"]] == [list(b.units) for b in result.blocks]
    assert outcome.blocks == len(result.blocks) and outcome.blocks_resumed == 0


def test_one_worker_gives_the_same_bytes(two_worker_run, tiny_llava_dir, tmp_path):
    out2, _ = two_worker_run
    out1 = tmp_path / "one"
    run_job(_settings(tiny_llava_dir, out1, workers=1))
    plan1, t1 = _shard_tensors(out1)
    plan2, t2 = _shard_tensors(out2)
    assert len(plan1["stages"]) == 1 and len(plan2["stages"]) == 2
    for b1, b2 in zip(plan1["blocks"], plan2["blocks"]):
        assert b1["sha256"] == b2["sha256"]
    assert t1.keys() == t2.keys()


def test_each_stage_loads_only_its_units(two_worker_run):
    out, _ = two_worker_run
    plan = json.loads((out / "qvlm_plan.json").read_text())
    units = {u["index"]: u["name"] for u in plan["units"]}
    loaded = plan["stage_tensors"]
    assert len(loaded) == 2
    second = loaded[1]
    own = [units[i] for i in plan["stages"][1]]
    assert second and all(any(t.startswith(u + ".") for u in own) for t in second)
    others = [units[i] for i in plan["stages"][0]]
    assert not any(t.startswith(u + ".") for t in second for u in others)
    assert any("embed_tokens" in t for t in loaded[0])  # only the first stage holds the glue
    assert not any("embed_tokens" in t for t in second)


def test_manifest_lists_every_file_with_checksums(two_worker_run):
    import hashlib

    out, _ = two_worker_run
    manifest = json.loads((out / "qvlm_manifest.json").read_text())
    assert manifest["files"]
    for key, entry in manifest["files"].items():
        data = (out / key).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    state = json.loads((out / "_qvlm/state.json").read_text())
    shards = [k for k in manifest["files"] if k.startswith("_qvlm/blocks/")]
    assert state["phase"] == "finished" and state["blocks_done"] == state["blocks_total"] == len(shards)
    assert {"config.json", "model.safetensors.index.json", "qvlm_plan.json", "report.html"} <= set(manifest["files"])


def test_resume_redoes_only_missing_blocks(two_worker_run, tiny_llava_dir, tmp_path):
    import shutil

    src, _ = two_worker_run
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    plan = json.loads((out / "qvlm_plan.json").read_text())
    (out / "qvlm_manifest.json").unlink()
    (out / "qvlm_plan.json").unlink()
    state = json.loads((out / "_qvlm/state.json").read_text())
    (out / "_qvlm/state.json").write_text(json.dumps({**state, "phase": "searching"}))
    gone = [b["index"] for b in plan["blocks"][1::2]]
    for i in gone:
        (out / record_key(i)).unlink()
    corrupt = plan["blocks"][0]
    shard = out / corrupt["shard"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    outcome = run_job(_settings(tiny_llava_dir, out))
    assert outcome.blocks_resumed == len(plan["blocks"]) - len(gone) - 1  # the corrupt shard is redone
    _, again = _shard_tensors(out)
    _, original = _shard_tensors(src)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_output_holding_another_job_is_refused(two_worker_run, tiny_llava_dir):
    from cluster.driver import JobError

    out, _ = two_worker_run
    with pytest.raises(JobError, match="overwrite"):
        run_job(replace(_settings(tiny_llava_dir, out), spec_hash="0" * 64))
