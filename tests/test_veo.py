"""Visual-encoder optimisation: what it trains, what it leaves alone, and the same result in one process and on Ray."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster.driver import run_job
from cluster.job import Job, Resources
from workers.locations import Locations
from qvlm.config import CalibrationSettings, QuantConfig, VeoConfig
from qvlm.batches import answer_masks, batches_for, calibration_answer_masks, calibration_batches, records_for
from qvlm.dependency import channel_grid, conditional_entropy, conditional_entropy_tensor, joint_distribution
from qvlm.driver import optimize_vision_encoder, quantize
from qvlm.method import select_units, unit_bits
from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import linear_tensors
from qvlm.records import CalibrationRecord
from qvlm.veo import dependency_gradients, next_token_loss, vision_linear_names
from tests.conftest import load_llava
from tests.outputs import assert_same_up_to_summation_order, block_tensors, veo_tower

pytestmark = pytest.mark.timeout(600)

CAL = CalibrationSettings(samples=8, eval_samples=0, max_length=64, batch_size=4)
W4A4 = dict(weights=WeightScheme(4, 128), activations=ActScheme(4, "tensor", False), epochs=1)


def _config(**veo) -> QuantConfig:
    return QuantConfig(**W4A4, veo=VeoConfig(enabled=True, **{"epochs": 3, **veo}))


def _tune(model, batches, config, stages=None):
    units = select_units(model, config)
    schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
    bits = {u.index: unit_bits(u, schemes, config) for u in units}
    return units, optimize_vision_encoder(model, batches, config, schemes, bits, stages=stages)


def test_differentiable_dependency_equals_the_measured_one():
    torch.manual_seed(0)
    a = torch.randn(300, 8)
    b = (a + 0.3 * torch.randn(300, 8)).requires_grad_(True)
    joint = joint_distribution(a, b, channel_grid(a, 4), channel_grid(b.detach(), 4))
    d = conditional_entropy_tensor(joint)
    assert float(d.detach()) == pytest.approx(conditional_entropy(joint.detach()))
    d.backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0


def test_dependency_gradients_chunk_by_chunk_equal_the_whole_graphs():
    """VEO's dependency term differentiated pair by pair, chunk by chunk (never holding the graph of a layer's soft
    levels) gives the gradient, the value and the mean D of the whole term differentiated at once."""
    torch.manual_seed(0)
    base = torch.randn(1100, 2048)
    rows = [base, base + 0.3 * torch.randn_like(base), torch.randn_like(base)]
    grids = [channel_grid(r, b) for r, b in zip(rows, (4, 4, 3))]
    weights = torch.tensor([1.3, 0.7], dtype=torch.float64)
    leaves = [r.clone().requires_grad_(True) for r in rows]
    terms = torch.stack([conditional_entropy_tensor(joint_distribution(leaves[k], leaves[k + 1], grids[k], grids[k + 1]))
                         / math.log(grids[k + 1].levels) for k in range(2)])
    whole = 0.5 * (weights * terms).sum()
    expected = torch.autograd.grad(whole, leaves)
    grads, value, mean_d = dependency_gradients(rows, grids, weights, 0.5)  # chunks of 512 rows here
    # float32 chunks summed in another grouping (512 rows against joint_distribution's 256), over about 2e6 rows x
    # levels: 1e-6 held on Intel CPUs, an AMD EPYC with the same torch gives 1.9e-6 (MKL's own summation order)
    assert value == pytest.approx(float(whole.detach()), rel=1e-5)
    assert mean_d == pytest.approx(float(terms.detach().mean()), rel=1e-5)
    for got, want in zip(grads, expected, strict=True):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_answer_masks_mark_the_positions_that_predict_each_answer(llava, tiny_llava_dir):
    model, processor = llava
    records = records_for(CAL)[0]
    records[1] = CalibrationRecord(records[1].text, records[1].image, None)  # a question without an answer
    batches = batches_for(tiny_llava_dir, records, CAL)
    masks = answer_masks(tiny_llava_dir, records, CAL)
    assert [m.shape for m in masks] == [b["input_ids"].shape for b in batches]
    rows = [(b, m, r) for b, m in zip(batches, masks) for r in range(b["input_ids"].shape[0])]
    for (batch, mask, row), record in zip(rows, records, strict=True):
        predicted = batch["input_ids"][row][1:][mask[row][:-1]]
        expected = [] if record.answer is None else processor.tokenizer(record.answer, add_special_tokens=False)["input_ids"]
        assert predicted.tolist() == expected, record
    # VEO's next-token loss is the cross-entropy of exactly those positions.
    with torch.no_grad():
        logits = model(**batches[0]).logits
    ids, mask = batches[0]["input_ids"], masks[0]
    picked = [(r, p) for r in range(ids.shape[0]) for p in range(ids.shape[1] - 1) if mask[r, p]]
    manual = torch.stack([torch.nn.functional.cross_entropy(logits[r, p], ids[r, p + 1]) for r, p in picked]).mean()
    assert float(next_token_loss(model, logits, batches[0], mask)) == pytest.approx(float(manual), rel=1e-5)
    assert float(next_token_loss(model, logits, batches[0], torch.zeros_like(mask))) == 0.0
    # Records without answers leave nothing to supervise: the loss falls back to every token.
    plain = [CalibrationRecord(r.text, r.image, None) for r in records]
    assert answer_masks(tiny_llava_dir, plain, CAL) is None
    assert calibration_answer_masks(tiny_llava_dir, CAL) is not None


def test_veo_trains_only_the_vision_quantizers(llava, llava_batches):
    model, _ = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units, result = _tune(model, llava_batches, _config())
    # The model comes back as it went in: same modules, same tensors, same requires_grad flags.
    assert all(type(model.get_submodule(n)) is nn.Linear for n in vision_linear_names(units))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # The result covers exactly the vision tower's linears, with static input ranges at W4A4.
    vision = [u for u in units if u.segment == "vision"]
    assert result.block.unit_names == tuple(u.name for u in vision)
    assert [r.name for r in result.block.linears] == vision_linear_names(units)
    assert all(r.act_range is not None for r in result.block.linears)
    assert len(result.history) == 3
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_a_veo_that_fails_midway_leaves_the_model_as_it_was(llava, llava_batches):
    """A step that raises (here: no answer positions for the batches) ends VEO in every stage: the tower's own
    linears are back and nothing stays frozen; the step's own error is the one raised."""
    model, _ = llava
    config = _config(epochs=1)
    units = select_units(model, config)
    schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
    bits = {u.index: unit_bits(u, schemes, config) for u in units}
    with pytest.raises(IndexError):
        optimize_vision_encoder(model, llava_batches, config, schemes, bits, answers=[])
    assert all(type(model.get_submodule(n)) is nn.Linear for n in vision_linear_names(units))
    assert all(p.requires_grad for p in model.parameters())


def test_veo_is_deterministic(llava_batches, tiny_llava_dir):
    runs = [_tune(load_llava(tiny_llava_dir)[0], llava_batches, _config(epochs=2))[1] for _ in range(2)]
    for r1, r2 in zip(runs[0].block.linears, runs[1].block.linears):
        assert torch.equal(r1.weight.qweight, r2.weight.qweight) and torch.equal(r1.weight.scale, r2.weight.scale)
        assert torch.equal(r1.act_range.lo, r2.act_range.lo)


def test_lr_zero_keeps_round_to_nearest(llava, llava_batches):
    from qvlm.quant import quantize_weight

    model, _ = llava
    _, result = _tune(model, llava_batches, _config(lr=1e-12, epochs=1))
    for r in result.block.linears:
        rtn = quantize_weight(model.get_submodule(r.name).weight.detach(), r.weight.scheme)
        assert torch.equal(r.weight.qweight, rtn.qweight), r.name


def test_static_input_ranges_come_from_the_strided_rows_of_all_inputs(llava, llava_batches, monkeypatch):
    """A vision linear's static input range is calibrated on the evenly strided rows of all its inputs, as if they
    were concatenated, though only the picked rows are ever held (here 50 rows of each linear's 136)."""
    from qvlm import veo_stage
    from qvlm.capture import _strided
    from qvlm.quant import calibrate_act_range

    model, _ = llava
    config = _config(epochs=1, lr=1e-12)  # the trained range scale stays 1: the result is the calibrated range
    names = vision_linear_names(select_units(model, config))
    inputs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for batch in llava_batches:
            model(**batch)
    for h in hooks:
        h.remove()
    monkeypatch.setattr(veo_stage, "ACT_ROWS", 50)
    result = _tune(model, llava_batches, config)[1]
    for r in result.block.linears:
        assert sum(x.shape[0] for x in inputs[r.name]) > 50
        want = calibrate_act_range(_strided(torch.cat(inputs[r.name]), 50), config.activations)
        torch.testing.assert_close(r.act_range.lo, want.lo, rtol=1e-6, atol=0)
        torch.testing.assert_close(r.act_range.hi, want.hi, rtol=1e-6, atol=0)


def test_quantize_with_veo_keeps_the_tuned_tower_as_one_block(llava, llava_batches):
    model, _ = llava
    _, result = quantize(model, llava_batches, _config())
    vision = [u.index for u in result.units if u.segment == "vision"]
    first = result.blocks[0]
    assert list(first.units) == vision
    assert result.veo is not None and len(result.veo.history) == 3
    assert result.veo.error_after < result.veo.error_before
    # The series without VEO is kept next to the one the partition used, for the report.
    assert len(result.veo.dependency_before) == len(result.dependency)
    assert result.veo.blocks_before[0].units == (vision[0],)  # without VEO the tower is partitioned like the rest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_veo_through_three_stages_equals_one_stage(tiny_llava_dir, llava_batches, dtype):
    """VEO's forward and backward run through the stages (each keeps its graph; rows, hidden states and their
    gradients cross the boundaries): cut into three stages it trains the tower one stage holding every unit
    trains, up to the order of float sums, and leaves every stage's model as it was."""
    config = _config(epochs=3)
    runs = {}
    for name, stages in (("one", None), ("three", "cut")):
        model = load_llava(tiny_llava_dir)[0].to(dtype)
        if stages:
            units = select_units(model, config)
            language = [u.index for u in units if u.segment == "language"]
            stages = [[u.index for u in units if u.segment != "language"] + language[:1], language[1:2], language[2:]]
            assert all(stages)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        runs[name] = _tune(model, llava_batches, config, stages)[1]
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())
    one, three = runs["one"], runs["three"]
    assert_same_up_to_summation_order(linear_tensors(three.block.linears), linear_tensors(one.block.linears))
    for got, want in zip(three.history, one.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
        assert got["jacobian_weights"] == pytest.approx(want["jacobian_weights"], rel=1e-2)
    assert one.block.error_after < one.block.error_before
    assert three.block.error_after == pytest.approx(one.block.error_after, rel=1e-2)


def test_veo_sends_gradients_back_through_handed_over_cross_attention_states(tmp_path):
    """Mllama's vision features reach its decoder only as the cross-attention states of its cross-attention layers,
    which a later stage gets as hand-over arguments: cut before its cross-attention layer (so the hidden state
    handed over does not depend on the tower at all), VEO trains the tower one stage holding every unit trains."""
    from qvlm.loading import model_class
    from qvlm.tiny_families import build_tiny_family
    from transformers import AutoConfig

    path = build_tiny_family("mllama", tmp_path / "mllama")
    cal = CalibrationSettings(samples=4, eval_samples=0, max_length=64, batch_size=2)
    batches, answers = calibration_batches(path, cal), calibration_answer_masks(path, cal)
    config = _config(epochs=2)
    runs = {}
    for name in ("one", "two"):
        model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path).eval()
        units = select_units(model, config)
        language = [u for u in units if u.segment == "language"]
        assert [u.name.endswith(".0") for u in language] == [True, False]  # layer 1 is the cross-attention layer
        stages = [[u.index for u in units[:-1]], [units[-1].index]] if name == "two" else None
        schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
        bits = {u.index: unit_bits(u, schemes, config) for u in units}
        runs[name] = optimize_vision_encoder(model, batches, config, schemes, bits, answers, stages=stages)
    one, two = runs["one"], runs["two"]
    assert one.block.error_after != one.block.error_before  # the tower did train
    assert_same_up_to_summation_order(linear_tensors(two.block.linears), linear_tensors(one.block.linears))
    assert two.history[-1]["loss"] == pytest.approx(one.history[-1]["loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_veo_through_two_stages_on_the_gpu_matches_the_cpu(tiny_llava_dir, llava_batches):
    """Every tensor of VEO's steps (grids, Jacobian weights, rows, gradients) on the stages' device: the same tower
    as on the CPU, up to the devices' float sums: Adam's steps turn them into relative changes of about 1e-2
    in the trained floats (bench/float_noise.py: the weights moved by one float32 ulp move them by 7.9e-3 on the
    CPU alone, and 0.05% of the codes by one step; an H200 moved a scale by 3.9e-3)."""
    config = _config(epochs=2)
    runs = {}
    for device in ("cpu", "cuda"):
        model = load_llava(tiny_llava_dir)[0].to(device)
        units = select_units(model, config)
        language = [u.index for u in units if u.segment == "language"]
        stages = [[u.index for u in units if u.segment != "language"] + language[:1], language[1:]]
        runs[device] = linear_tensors(_tune(model, llava_batches, config, stages)[1].block.linears)
    assert_same_up_to_summation_order({k: v.cpu() for k, v in runs["cuda"].items()}, runs["cpu"], rtol=2e-2)


def test_veo_needs_qvlm_and_a_vision_tower(tmp_path):
    from jobs.spec import JobSpecError
    from jobs.spec import load_job

    def job(quantization: str) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(f"name: j\nmodel: {{path: /m}}\noutput: {{uri: /o}}\nquantization: {quantization}\n")
        return path

    with pytest.raises(JobSpecError, match=r"quantization\.qvlm\.veo\.enabled: VEO is part of method qvlm"):
        load_job(job("{method: rtn, qvlm: {veo: {enabled: true}}}"))
    with pytest.raises(JobSpecError, match=r"quantization\.qvlm\.veo\.enabled: .*targets must include vision"):
        load_job(job("{targets: [language], qvlm: {veo: {enabled: true}}}"))
    spec = load_job(job("{qvlm: {veo: {enabled: true, epochs: 2, eta: 0.5}}}"))
    assert spec.to_quant_config().veo == VeoConfig(enabled=True, epochs=2, eta=0.5)


def test_distributed_veo_equals_one_process(local_ray, tiny_llava_dir, tmp_path, capsys):
    """The job tunes the tower through its two stage actors; the one-process run cut into the same stages gives
    the same checkpoint, and one stage holding the whole model (one worker) the same tower."""
    config = _config(epochs=2)
    out = tmp_path / "job"
    run_job(Job("t", "v" * 64, Locations(str(tiny_llava_dir), str(out)), CAL, config, Resources(workers=2)))
    plan, tensors = block_tensors(out)
    assert len(plan["stages"]) == 2
    lines = capsys.readouterr().out.splitlines()
    tuning = [line for line in lines if line.startswith("[t] tuning: steps ")]  # 2 epochs x 2 batches, counted
    assert tuning[0] == "[t] tuning: steps 0/4" and tuning[-1].startswith("[t] tuning: steps 4/4"), lines
    batches, answers = calibration_batches(tiny_llava_dir, CAL), calibration_answer_masks(tiny_llava_dir, CAL)
    # VEO trains through matmuls whose float sums depend on the intra-op thread count: compare with the
    # one-process run at the thread count of the job's workers (resources.cpus_per_worker = 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, result = quantize(load_llava(tiny_llava_dir)[0], batches, config, answers, stages=plan["stages"])
        model = load_llava(tiny_llava_dir)[0]
        units = select_units(model, config)
        schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
        whole = optimize_vision_encoder(model, batches, config, schemes, {u.index: unit_bits(u, schemes, config) for u in units},
                                        answers)
    finally:
        torch.set_num_threads(threads)
    tower = linear_tensors(whole.block.linears)
    assert_same_up_to_summation_order({name: tensors[name] for name in tower}, tower)
    expected = result.tensors()
    assert set(tensors) == set(expected)
    assert_same_up_to_summation_order(tensors, expected)
    assert [b["units"] for b in plan["blocks"]] == [list(b.units) for b in result.blocks]
    assert all(torch.equal(tensors[k], v) for k, v in veo_tower(out).items())  # the vision block is the tuned tower
    veo = plan["veo"]
    assert len(veo["history"]) == 2 and not veo["reused"]
    for got, want in zip(veo["history"], result.veo.history, strict=True):  # same data, order and seed
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert [d["dependency"] for d in veo["dependency_before"]] == [list(d.dependency) for d in result.veo.dependency_before]
    assert "chart-veo" in (out / "report.html").read_text()


def test_veo_on_a_bfloat16_checkpoint_through_two_stage_workers(local_ray, tiny_llava_dir, tmp_path):
    """A bfloat16 checkpoint (what users have): hidden states, rows and gradients cross the stage boundary as
    bfloat16 and float32 arrays, and the job's tower is the one the same cut gives in this process."""
    from transformers import AutoProcessor

    source = tmp_path / "bf16"
    load_llava(tiny_llava_dir)[0].to(torch.bfloat16).save_pretrained(source)
    AutoProcessor.from_pretrained(tiny_llava_dir).save_pretrained(source)
    config = _config(epochs=2)
    out = tmp_path / "job"
    run_job(Job("t", "v" * 64, Locations(str(source), str(out)), CAL, config, Resources(workers=2)), echo=lambda *a, **k: None)
    plan, tensors = block_tensors(out)
    model = load_llava(source)[0]
    assert next(model.parameters()).dtype == torch.bfloat16
    units = select_units(model, config)
    schemes = {u.linear_name(n): config.weights for u in units for n in u.linears}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage workers run
    try:
        tuned = optimize_vision_encoder(model, calibration_batches(source, CAL), config, schemes,
                                        {u.index: unit_bits(u, schemes, config) for u in units},
                                        calibration_answer_masks(source, CAL), stages=plan["stages"])
    finally:
        torch.set_num_threads(threads)
    tower = linear_tensors(tuned.block.linears)
    assert all(t.dtype == torch.bfloat16 for k, t in tower.items() if k.endswith(".scale"))
    assert_same_up_to_summation_order({name: tensors[name] for name in tower}, tower)


def test_submit_refuses_veo_on_a_model_without_vision_tower(tiny_llama_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from jobs.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "veo-text", "model": {"path": str(tiny_llama_dir)}, "output": {"uri": str(tmp_path / "out")},
        "calibration": {"samples": 4, "eval_samples": 0, "max_length": 32, "batch_size": 4},
        "quantization": {"qvlm": {"veo": {"enabled": True}}}}))
    result = CliRunner().invoke(app, ["submit", str(job)])
    assert result.exit_code == 2
    assert "quantization.qvlm.veo.enabled: the model (LlamaForCausalLM) has no vision tower" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
