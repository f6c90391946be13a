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


def test_search_is_deterministic_and_leaves_the_model_alone(llava, llava_batches):
    model, _ = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _block(model, llava_batches, "language", A4)
    a = search_block(data, SearchConfig("learned", iters=30, seed=3))
    b = search_block(data, SearchConfig("learned", iters=30, seed=3))
    for x, y in zip(a.linears, b.linears):
        assert torch.equal(x.weight.qweight, y.weight.qweight) and torch.equal(x.weight.scale, y.weight.scale)
    assert a.error_after == b.error_after
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_gptq_block_beats_rtn(llava, llava_batches):
    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme(), depth=1)
    assert search_block(data, SearchConfig("gptq")).error_after < search_block(data, SearchConfig("rtn")).error_after


def test_unknown_method_is_refused(llava, llava_batches):
    model, _ = llava
    data = _block(model, llava_batches, "language", ActScheme(), depth=1)
    with pytest.raises(ValueError, match="unknown search method"):
        search_block(data, SearchConfig("adaround"))
