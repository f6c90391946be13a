import pytest
import torch

from qvlm.capture import capture_units
from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import BlockData, SearchConfig, search_block
from qvlm.structure import find_units, segments_of

W4 = WeightScheme(4, 128, True)
A4 = ActScheme(4, "channel", symmetric=False)


def _block(model, batches, segment, act, depth=2):
    units = find_units(model)
    run = next(r for r in segments_of(units) if r[0].segment == segment)[:depth]
    caps = capture_units(model, run, batches)
    schemes = {u.linear_name(n): W4 for u in run for n in u.linears}
    return BlockData(
        [model.get_submodule(u.name) for u in run], [u.name for u in run], [u.linears for u in run],
        [c.calls for c in caps], caps[-1].outputs, schemes, act,
    )


@pytest.mark.parametrize("segment", ["language", "vision"])
@pytest.mark.parametrize("act", [ActScheme(), A4], ids=["W4A16", "W4A4"])
@pytest.mark.parametrize("method", ["clip", "learned"])
def test_block_search_beats_rtn(llava, llava_batches, segment, act, method):
    model, _ = llava
    data = _block(model, llava_batches, segment, act)
    rtn = search_block(data, SearchConfig("rtn"))
    found = search_block(data, SearchConfig(method, epochs=2, iters=60))
    assert found.error_before == pytest.approx(rtn.error_after)
    assert found.error_after < rtn.error_after
    assert {r.name for r in found.linears} == set(data.schemes)
    if act.enabled:
        assert all(r.act_range is not None for r in found.linears)


@pytest.mark.smoke
def test_search_result_reproduces_its_error(llava, llava_batches):
    """The reported error is the error of the returned integers and ranges, re-evaluated independently."""
    from qvlm.search import block_error, quantized_block_outputs

    model, _ = llava
    data = _block(model, llava_batches, "language", A4)
    result = search_block(data, SearchConfig("clip", epochs=1))
    outs = quantized_block_outputs(data, result)
    assert block_error(outs, data.targets, data.calls[-1]) == pytest.approx(result.error_after, rel=1e-9)


def test_the_search_workspace_reads_the_blocks_own_weights_and_holds_integers(llava, llava_batches):
    """A block search adds no dense copy of the block's weights (605 MiB for a 13B layer in float16): the
    workspace's fake-quant linears read the model's own weight tensors and run with int8 weights put in them."""
    from qvlm.search import _start

    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme())
    ws = _start(data, SearchConfig("rtn"))[0]
    for name, fq in ws.fq.items():
        own = model.get_submodule(name).weight
        assert fq.weight.untyped_storage().data_ptr() == own.untyped_storage().data_ptr(), name
        assert fq.quantized is not None and fq.quantized.qweight.dtype == torch.int8, name


@pytest.mark.parametrize("method", ["rtn", "clip", "gptq", "learned", "best"])
def test_search_is_deterministic_and_leaves_the_model_alone(llava, llava_batches, method):
    """The workspace's fake-quant linears read the model's own weights: no search, nor the output it hands on,
    writes them (nor their requires_grad)."""
    from qvlm.search import search_block_with_outputs

    model, _ = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    data = _block(model, llava_batches, "language", A4)
    a, _ = search_block_with_outputs(data, SearchConfig(method, iters=30, seed=3))
    b = search_block(data, SearchConfig(method, iters=30, seed=3))
    for x, y in zip(a.linears, b.linears):
        assert torch.equal(x.weight.qweight, y.weight.qweight) and torch.equal(x.weight.scale, y.weight.scale)
    assert a.error_after == b.error_after
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert grads == {k: p.requires_grad for k, p in model.named_parameters()}


def test_gptq_block_beats_rtn(llava, llava_batches):
    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme(), depth=1)
    assert search_block(data, SearchConfig("gptq")).error_after < search_block(data, SearchConfig("rtn")).error_after


def test_gptq_block_quantizes_linears_that_read_one_input_as_each_would_be_alone(llava, llava_batches):
    """q/k/v (and gate/up) go through one GPTQ column loop when they share a scheme; q at another scheme is apart.
    Either way each linear's integers and qparams are those of GPTQ on it alone with the unit's Hessian."""
    from qvlm.gptq import gptq_quantize
    from qvlm.search import unit_hessians

    model, _ = llava
    model.to(torch.bfloat16)
    data = _block(model, llava_batches, "language", ActScheme(), depth=1)
    q_proj = next(n for n in data.schemes if n.endswith("q_proj"))
    data.schemes[q_proj] = WeightScheme(8, 32, False)
    found = {r.name: r.weight for r in search_block(data, SearchConfig("gptq")).linears}
    groups = unit_hessians(data.units[0], data.linears[0], data.calls[0])
    assert max(len(names) for names, _ in groups) == 3
    for names, h in groups:
        for n in (f"{data.unit_names[0]}.{r}" for r in names):
            alone = gptq_quantize(model.get_submodule(n).weight, h, data.schemes[n], act_order=True)
            assert torch.equal(found[n].qweight, alone.qweight) and torch.equal(found[n].scale, alone.scale), n


def test_unknown_method_is_refused(llava, llava_batches):
    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme(), depth=1)
    with pytest.raises(ValueError, match="unknown search method"):
        search_block(data, SearchConfig("adaround"))


def test_best_keeps_the_lowest_of_its_candidates(llava, llava_batches):
    from qvlm.search import block_error, quantized_block_outputs

    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme())
    best = search_block(data, SearchConfig("best", iters=40))
    assert set(best.candidates) == {"rtn", "gptq", "learned"}
    assert best.chosen == min(best.candidates, key=best.candidates.get)
    assert best.error_after == pytest.approx(min(best.candidates.values()), rel=1e-9)
    assert best.error_after < best.error_before and best.quarantine is None
    outs = quantized_block_outputs(data, best)
    assert block_error(outs, data.targets, data.calls[-1]) == pytest.approx(best.error_after, rel=1e-9)


@pytest.mark.parametrize("act,depth", [(ActScheme(), 2), (A4, 1)], ids=["W4A16", "W4A4-static"])
@pytest.mark.parametrize("method,iters", [("rtn", 0), ("clip", 0), ("gptq", 0), ("learned", 12), ("best", 12)])
def test_every_forward_a_search_runs_is_counted_or_declared(llava, llava_batches, method, iters, act, depth):
    """Each whole-calibration-set forward of a block is an evaluation or one of the method's declared uncounted
    passes (bench/projection.py models a 13B job's time from these counts). Learned rounding adds one call a step;
    each uncounted pass is a hooked one, which first runs one batch to see which linears share an input. A static
    activation scheme adds the pass that collects the linears' input rows (one unit: the coordinate passes over a
    later unit's ranges do not run the first)."""
    from qvlm.search import UNCOUNTED_FORWARDS

    model, _ = llava
    data = _block(model, llava_batches, "language", act, depth=depth)
    calls = []
    data.units[0].register_forward_hook(lambda *_: calls.append(1))  # the workspace's copies carry it along
    result = search_block(data, SearchConfig(method, iters=iters))
    batches = len(data.targets)
    uncounted, rows_pass = UNCOUNTED_FORWARDS[method], int(act.static and act.enabled)
    assert len(calls) == batches * (result.evaluations + uncounted + rows_pass) + uncounted + iters


def _with_nan_input(data):
    """``data`` with NaN in one valid token of its first captured input."""
    call = data.calls[0][0]
    hidden = call.hidden.clone()
    b, t = (call.mask.nonzero()[0].tolist() if call.mask is not None else (0, 0))
    hidden[b, t, 0] = float("nan")
    data.calls[0][0] = call.with_hidden(hidden)
    return data


@pytest.mark.parametrize("method", ["gptq", "best", "learned", "rtn"])
def test_a_block_with_nan_inputs_is_quarantined_at_the_fallback(llava, llava_batches, method):
    """NaN in one captured input token: GPTQ's Hessian is non-finite, the other searches' errors are NaN; the
    block is kept at RTN with the data-free clipping search, marked, and nothing raises."""
    from qvlm.quant import quantize_clipped

    model, _ = llava
    data = _with_nan_input(_block(model, llava_batches, "language", ActScheme(), depth=1))
    result = search_block(data, SearchConfig(method, iters=5))
    assert result.quarantine is not None and result.chosen == "fallback"
    assert ("Hessian" in result.quarantine) == (method in ("gptq", "best"))
    assert {r.name for r in result.linears} == set(data.schemes)
    for r in result.linears:
        expected = quantize_clipped(model.get_submodule(r.name).weight, data.schemes[r.name])
        assert torch.equal(r.weight.qweight, expected.qweight) and torch.equal(r.weight.scale, expected.scale)


@pytest.mark.parametrize("act", [ActScheme(), A4], ids=["W4A16", "W4A4"])
@pytest.mark.parametrize("method,iters", [("rtn", 5), ("clip", 5), ("gptq", 5), ("learned", 20), ("best", 20),
                                          ("best", 0)])
def test_the_output_a_search_hands_on_is_its_result_run_again(llava, llava_batches, act, method, iters):
    """Eq. 3 propagation takes the searched block's quantized output from the search itself: it must equal, bit for
    bit, the block run afresh with the result (``best`` with no learning steps keeps a candidate it measured before
    its last one, so it puts that one back in place first)."""
    from qvlm.search import quantized_block_outputs, search_block_with_outputs

    model, _ = llava
    data = _block(model, llava_batches, "language", act)
    result, outputs = search_block_with_outputs(data, SearchConfig(method, epochs=1, iters=iters))
    if method == "best" and iters == 0:
        assert result.chosen != "learned"
    again = quantized_block_outputs(data, result)
    assert len(outputs) == len(again) and all(torch.equal(a, b) for a, b in zip(outputs, again))


def test_learned_that_keeps_an_earlier_checkpoint_hands_on_that_ones_output(llava, llava_batches):
    """A step far too large makes every checkpoint worse than the start (RTN with the searched act ranges): the
    start is kept though the block last ran with the last checkpoint, so its output is run again before it is
    handed on."""
    from qvlm.search import quantized_block_outputs, search_block_with_outputs

    model, _ = llava
    data = _block(model, llava_batches, "language", A4)
    start = search_block(data, SearchConfig("learned", epochs=1, iters=0))
    result, outputs = search_block_with_outputs(data, SearchConfig("learned", epochs=1, iters=20, lr=1.0))
    assert result.error_after == start.error_after < result.error_before
    again = quantized_block_outputs(data, result)
    assert all(torch.equal(a, b) for a, b in zip(outputs, again))


def test_a_quarantined_block_hands_on_the_output_of_its_fallback(llava, llava_batches):
    from qvlm.search import quantized_block_outputs, search_block_with_outputs

    model, _ = llava
    data = _with_nan_input(_block(model, llava_batches, "language", ActScheme(), depth=1))
    result, outputs = search_block_with_outputs(data, SearchConfig("gptq"))
    assert result.chosen == "fallback"
    for a, b in zip(outputs, quantized_block_outputs(data, result)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def bfloat16_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama saved as a bfloat16 checkpoint (what most released LLMs are)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-bf16")
    LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("checkpoint", ["float32", "bfloat16"])
@pytest.mark.parametrize("method,search", [("rtn", None), ("gptq", None), ("qvlm", "clip"), ("qvlm", "learned"),
                                           ("qvlm", "best")])
def test_the_plan_counts_at_least_what_a_block_search_holds(tmp_path, tiny_llama_dir, bfloat16_llama_dir, checkpoint,
                                                            method, search):
    """cluster/memory.py's workspace of one block against the peak of live tensors while a stage searches that
    block (beside its weights and captures, which the plan counts apart), at the plan's calibration size."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from bench.gpu import live_peak_bytes
    from cluster.memory import block_workspace_bytes, calibration_size, search_cost
    from cluster.plan import inspect_model
    from jobs.spec import load_job
    from qvlm.batches import calibration_batches
    from qvlm.method import Block, Layout, block_jobs
    from qvlm.stage import Stage
    from tests.job_files import write_job

    model_dir = {"float32": tiny_llama_dir, "bfloat16": bfloat16_llama_dir}[checkpoint]
    quant = {"quantization.method": method, "quantization.qvlm.iters": 5}
    if search:
        quant["quantization.qvlm.search"] = search
    job = load_job(write_job(tmp_path / "job.yaml", "count", str(model_dir), str(tmp_path / "out"), **quant)).compile()
    plan = inspect_model(job)[0]
    stage = Stage(LlamaForCausalLM.from_pretrained(model_dir), plan.units, first=True)
    for batch in calibration_batches(model_dir, job.calibration):
        stage.capture(batch, hand_over=False)
    unit = next(u for u in plan.units if u.segment == "language")
    schemes = {unit.linear_name(n): job.quant.weights for n in unit.linears}
    every = tuple(u.index for u in plan.units)
    block = block_jobs([Block(0, 0, (unit.index,))], Layout(tuple(plan.units), (every,), (every,)), schemes)[0]

    _, held = live_peak_bytes(lambda: stage.search_block(block, job.quant))
    counted = block_workspace_bytes(plan, [unit], calibration_size(plan, job.calibration),
                                    replace(search_cost(job.quant), depth=1))
    assert 0 < held <= counted, (held, counted)
