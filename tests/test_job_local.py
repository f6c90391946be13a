"""The distributed job on a real local Ray: same bytes as one process, any worker count, resume."""

import json
from dataclasses import replace

import pytest
import torch

from cluster.driver import run_job
from cluster.job import Job, Resources
from workers.locations import Locations
from qvlm.config import CalibrationSettings, QuantConfig
from qvlm.batches import calibration_batches
from qvlm.driver import layout_of, quantize
from qvlm.stage import Stage
from workers.transport import nbytes, pack
from qvlm.quant import ActScheme
from tests.conftest import load_llava
from tests.outputs import block_tensors, plan_of
from workers.shard import record_key

pytestmark = pytest.mark.timeout(600)

CAL = CalibrationSettings(samples=8, eval_samples=0, max_length=64, batch_size=4)


def _settings(model_dir, out, workers=2, quant=None, **kw):
    quant = quant or QuantConfig(epochs=2, iters=30, activations=ActScheme(4, "channel", False), propagation="quantized")
    return Job("t", "h" * 64, Locations(str(model_dir), str(out)), CAL, quant, Resources(workers=workers, **kw))


_shard_tensors = block_tensors


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
    _, result = quantize(model, calibration_batches(tiny_llava_dir, CAL), settings.quant, stages=plan["stages"])
    expected = result.tensors()
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert [b["units"] for b in plan["blocks"]] == [list(b.units) for b in result.blocks]
    assert outcome.blocks == len(result.blocks) and outcome.blocks_resumed == 0


def test_only_boundary_states_cross_the_object_store(two_worker_run, tiny_llava_dir):
    """The plan document counts the bytes each stage put into the object store: on two stages, stage 0 hands
    over its last unit's call per batch (hidden state + the layer list's extra arguments) during the capture and,
    under quantized propagation, the quantized hidden states its last block feeds the next stage's first block;
    the last stage sends nothing. No block's inputs travel."""
    out, _ = two_worker_run
    plan = plan_of(out)
    model, _ = load_llava(tiny_llava_dir)
    settings = _settings(tiny_llava_dir, out)
    layout = layout_of(model, settings.quant, plan["stages"])
    first = Stage(model, [layout.units[i] for i in layout.stages[0]], first=True)
    handoffs = [first.capture(b) for b in calibration_batches(tiny_llava_dir, CAL)]
    boundary = sum(nbytes(pack(h)) for h in handoffs)
    carried = sum(h.hidden.numel() * h.hidden.element_size() for h in handoffs)
    assert plan["transfer_bytes"] == [boundary + carried, 0]
    block_inputs = sum(nbytes(pack(first.captures[b["units"][0]].calls)) for b in plan["blocks"] if b["units"][0] in first.captures)
    assert boundary + carried < block_inputs


def test_stage_propagation_job_equals_one_process_and_carries_nothing_between_stages(local_ray, tiny_llava_dir,
                                                                                       tmp_path):
    """With `propagation: stage` the stages search at once: no quantized hidden state goes from one stage to
    the next (the object store carries the capture's boundary states only), and the checkpoint is the one
    `quantize` gives for the same cut."""
    quant = QuantConfig(epochs=2, iters=30, activations=ActScheme(4, "channel", False), propagation="stage")
    out = tmp_path / "job"
    run_job(_settings(tiny_llava_dir, out, quant=quant))
    plan, tensors = _shard_tensors(out)
    batches = calibration_batches(tiny_llava_dir, CAL)
    model, _ = load_llava(tiny_llava_dir)
    layout = layout_of(model, quant, plan["stages"])
    first = Stage(model, [layout.units[i] for i in layout.stages[0]], first=True)
    boundary = sum(nbytes(pack(first.capture(b))) for b in batches)  # before quantize swaps in fake-quant linears
    _, result = quantize(load_llava(tiny_llava_dir)[0], batches, quant, stages=plan["stages"])
    expected = result.tensors()
    assert set(tensors) == set(expected) and all(torch.equal(tensors[k], v) for k, v in expected.items())
    assert plan["transfer_bytes"] == [boundary, 0]


def test_blocks_never_cross_a_stage_boundary(two_worker_run):
    out, _ = two_worker_run
    plan = plan_of(out)
    owner = {i: s for s, stage in enumerate(plan["stages"]) for i in stage}
    assert len(plan["stages"]) == 2
    assert all(len({owner[i] for i in b["units"]}) == 1 for b in plan["blocks"])


@pytest.mark.parametrize("workers", [1, 3])
def test_unit_blocks_give_the_same_bytes_with_any_number_of_workers(two_worker_gptq, tiny_llava_dir, tmp_path, workers):
    """Blocks of one unit (gptq, rtn) are cut the same way whatever the stages, so the bytes do not depend on
    the number of workers; the entropy-guided blocks of qvlm stop at stage boundaries, so theirs do."""
    out2, quant = two_worker_gptq
    out = tmp_path / f"w{workers}"
    run_job(_settings(tiny_llava_dir, out, workers=workers, quant=quant, cpus_per_worker=0.5))  # 2 CPUs here
    plan, tensors = _shard_tensors(out)
    plan2, tensors2 = _shard_tensors(out2)
    assert len(plan["stages"]) == workers
    assert tensors.keys() == tensors2.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)


@pytest.fixture(scope="module")
def two_worker_gptq(local_ray, tiny_llava_dir, tmp_path_factory):
    quant = QuantConfig(method="gptq", propagation="quantized")
    out = tmp_path_factory.mktemp("gptq") / "job"
    run_job(_settings(tiny_llava_dir, out, quant=quant))
    return out, quant


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
    shards = [b["shard"] for b in plan_of(out)["blocks"]]
    assert set(shards) <= set(manifest["files"])
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
    from cluster.output import OutputRefused

    out, _ = two_worker_run
    with pytest.raises(OutputRefused, match="overwrite"):
        run_job(replace(_settings(tiny_llava_dir, out), spec_hash="0" * 64))
