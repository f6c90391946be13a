import pytest
import torch

from qvlm.gptq import HessianAccumulator, _gptq, gptq_quantize
from qvlm.quant import WeightScheme, quantize_weight

OUT, IN, TOKENS = 64, 256, 2048


def _data(seed=0, out=OUT, inp=IN, tokens=TOKENS):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    z = torch.randn(tokens, inp, generator=g)
    a = torch.randn(inp, inp, generator=g) / inp**0.5
    x = z @ a + 0.1 * torch.randn(tokens, inp, generator=g)  # correlated input channels
    return w, x


def _hessian(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def _out_err(x, w, w_hat):
    return float(((x @ w.t() - x @ w_hat.float().t()) ** 2).sum())


@pytest.mark.parametrize(
    "scheme", [WeightScheme(4, 128, True), WeightScheme(3, -1, True), WeightScheme(4, 64, False)], ids=str
)
def test_gptq_beats_rtn_on_output_error(scheme):
    w, x = _data()
    qw = gptq_quantize(w, _hessian(x), scheme)
    gptq_err = _out_err(x, w, qw.dequantize())
    rtn_err = _out_err(x, w, quantize_weight(w, scheme).dequantize())
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize(
    "scheme", [WeightScheme(4, 128, True), WeightScheme(3, -1, True), WeightScheme(4, 64, False), WeightScheme(2, 32, False)],
    ids=str,
)
def test_ints_in_range_shape_and_deterministic(scheme):
    w, x = _data(1)
    h = _hessian(x)
    a = gptq_quantize(w, h, scheme)
    b = gptq_quantize(w, h, scheme)
    assert a.qweight.dtype == torch.int8 and a.qweight.shape == w.shape
    assert int(a.qweight.min()) >= scheme.qmin and int(a.qweight.max()) <= scheme.qmax
    assert a.scale.shape == (OUT, scheme.groups(IN)) and a.scale.dtype == w.dtype
    assert (a.zero is None) == scheme.symmetric
    assert a.dequantize().shape == w.shape
    assert torch.isfinite(a.dequantize()).all()
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale, b.scale)
    if a.zero is not None:
        assert torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, False), WeightScheme(3, -1, True)], ids=str)
def test_dequantize_is_exactly_what_the_algorithm_used(dtype, scheme):
    w, x = _data(2)
    qw, used = _gptq(w.to(dtype), _hessian(x), scheme, damp=0.01, block_size=128, keep_used=True)
    assert qw.scale.dtype == dtype
    assert torch.equal(qw.dequantize().float(), used)


@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, True), WeightScheme(3, -1, False)], ids=str)
def test_dead_input_columns(scheme):
    w, x = _data(3)
    dead = [0, 5, 100, 255]
    x[:, dead] = 0.0
    qw = gptq_quantize(w, _hessian(x), scheme)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scale.float()).all()
    assert torch.all(deq[:, dead] == 0)
    assert _out_err(x, w, deq) < _out_err(x, w, quantize_weight(w, scheme).dequantize())


def test_whole_dead_group_is_finite_and_zero():
    w, x = _data(4)
    x[:, 64:128] = 0.0
    qw = gptq_quantize(w, _hessian(x), WeightScheme(4, 64, False))
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 64:128] == 0)


@pytest.mark.parametrize("block_size", [16, 48, 100, 256])
def test_block_size_does_not_change_the_result(block_size):
    """Lazy batching is exact: group ranges straddling blocks see the pending updates of the block."""
    w, x = _data(5)
    h = _hessian(x)
    scheme = WeightScheme(4, 64, False)
    ref = gptq_quantize(w, h, scheme, block_size=IN)  # one block: every update applied eagerly
    got = gptq_quantize(w, h, scheme, block_size=block_size)
    assert torch.allclose(got.scale, ref.scale, rtol=1e-4, atol=0)
    assert torch.equal(got.zero, ref.zero)
    assert (got.qweight != ref.qweight).float().mean() < 1e-3


def test_group_qparams_come_from_updated_columns():
    """With groups, scales differ from RTN's (computed on the original weight) beyond the first group."""
    w, x = _data(6)
    scheme = WeightScheme(4, 64, True)
    qw = gptq_quantize(w, _hessian(x), scheme)
    rtn = quantize_weight(w, scheme)
    assert torch.equal(qw.scale[:, 0], rtn.scale[:, 0])  # first group: nothing has been updated yet
    assert not torch.allclose(qw.scale[:, 1:], rtn.scale[:, 1:])


def test_per_channel_qparams_come_from_original_rows():
    w, x = _data(7)
    scheme = WeightScheme(3, -1, False)
    qw = gptq_quantize(w, _hessian(x), scheme)
    rtn = quantize_weight(w, scheme)
    assert torch.equal(qw.scale, rtn.scale) and torch.equal(qw.zero, rtn.zero)


def test_not_positive_definite_raises():
    w, _ = _data(8, inp=64)
    h = -torch.eye(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, h, WeightScheme(4, 64, True), damp=0.0)


def test_a_hessian_that_is_not_positive_definite_is_damped_more_before_giving_up():
    w, _ = _data(8, inp=64)
    eigen = torch.ones(64, dtype=torch.float64)
    eigen[-1] = -0.05  # damping 0.01 * mean(diag) leaves it negative; 0.1 makes it positive
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    h = q @ torch.diag(eigen) @ q.T
    scheme = WeightScheme(4, 64, True)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, h, scheme, damp=0.01, retries=0)
    retried = gptq_quantize(w, h, scheme, damp=0.01)
    direct = gptq_quantize(w, h, scheme, damp=0.1, retries=0)
    assert torch.equal(retried.qweight, direct.qweight) and torch.equal(retried.scale, direct.scale)


def test_bad_shapes_raise():
    w, x = _data(9)
    with pytest.raises(ValueError):
        gptq_quantize(w, _hessian(x)[:128, :128], WeightScheme(4, 128, True))
    with pytest.raises(ValueError):
        gptq_quantize(w, _hessian(x), WeightScheme(4, 100, True))


def test_hessian_accumulator_chunks_equal_whole_and_formula():
    _, x = _data(10)
    x3 = x.reshape(4, TOKENS // 4, IN)  # leading dims are flattened into tokens
    assert HessianAccumulator(IN).dtype == torch.float32  # the default: float64 only where Cholesky needs it
    whole = HessianAccumulator(IN, dtype=torch.float64)
    whole.add(x3)
    chunked = HessianAccumulator(IN, dtype=torch.float64)
    chunked.add(x[:700])
    chunked.add(x[700:])
    assert whole.tokens == chunked.tokens == TOKENS
    assert whole.hessian.dtype == torch.float64
    assert torch.allclose(whole.hessian, chunked.hessian, rtol=1e-10, atol=1e-12)
    x64 = x.double()
    assert torch.allclose(whole.hessian, 2.0 / TOKENS * x64.t() @ x64, rtol=1e-10, atol=1e-12)
    # deterministic: same chunks in the same order give identical bytes
    again = HessianAccumulator(IN, dtype=torch.float64)
    again.add(x[:700])
    again.add(x[700:])
    assert torch.equal(again.hessian, chunked.hessian)


def test_hessian_accumulator_float32_and_errors():
    _, x = _data(11)
    acc = HessianAccumulator(IN, dtype=torch.float32)
    with pytest.raises(ValueError):
        acc.hessian
    acc.add(x[:0])  # empty chunk is a no-op
    assert acc.tokens == 0
    acc.add(x)
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian.double(), 2.0 / TOKENS * x.double().t() @ x.double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        acc.add(x[:, :10])


def _uneven(seed):
    """Inputs whose channel scales span two decades (shuffled), where the column order matters."""
    w, x = _data(seed)
    spread = torch.logspace(-1, 1, IN)[torch.randperm(IN, generator=torch.Generator().manual_seed(seed))]
    return w, x * spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, True), WeightScheme(4, 128, False), WeightScheme(3, -1, True)], ids=str)
def test_act_order_keeps_static_groups(dtype, scheme):
    """Act-order with static groups: each group's qparams come from the original weight (RTN's), columns keep
    their groups (no g_idx), and the dequantized weight is still exactly what the algorithm used."""
    w, x = _uneven(12)
    w = w.to(dtype)
    qw, used = _gptq(w, _hessian(x), scheme, damp=0.01, block_size=48, act_order=True, keep_used=True)
    rtn = quantize_weight(w, scheme)
    assert torch.equal(qw.scale, rtn.scale)
    if not scheme.symmetric:
        assert torch.equal(qw.zero, rtn.zero)
    assert torch.equal(qw.dequantize().float(), used)
    assert int(qw.qweight.min()) >= scheme.qmin and int(qw.qweight.max()) <= scheme.qmax


@pytest.mark.parametrize("scheme", [WeightScheme(4, 128, True), WeightScheme(3, -1, True), WeightScheme(4, 64, False)], ids=str)
def test_act_order_and_clipping_lower_the_output_error(scheme):
    from qvlm.quant import SHRINK_GRID

    w, x = _uneven(13)
    h = _hessian(x)
    err = {(a, s): _out_err(x, w, gptq_quantize(w, h, scheme, act_order=a, shrinks=s).dequantize())
           for a in (False, True) for s in ((1.0,), SHRINK_GRID)}
    assert err[True, (1.0,)] < 0.85 * err[False, (1.0,)]
    assert err[False, SHRINK_GRID] < 0.9 * err[False, (1.0,)]
    assert err[True, SHRINK_GRID] < 0.9 * err[True, (1.0,)]


def test_a_singular_hessian_with_no_damping_fails_after_the_retries():
    """Two identical input channels with H[0, 0] = 4: the Cholesky pivot of the second is exactly 0, and
    damping 0 stays 0 however many times it is raised."""
    from qvlm.gptq import NotPositiveDefinite

    g = torch.Generator().manual_seed(14)
    x = torch.randn(64, 16, generator=g)
    x[:, 0] = 0.0
    x[:32, 0] = 2.0  # 2/64 * 32 * 2^2 = 4, a square: sqrt, the division and the subtraction are all exact
    x[:, 1] = x[:, 0]
    w = torch.randn(8, 16, generator=g)
    with pytest.raises(NotPositiveDefinite):
        gptq_quantize(w, _hessian(x), WeightScheme(4, 16, True), damp=0.0)
    assert torch.isfinite(gptq_quantize(w, _hessian(x), WeightScheme(4, 16, True)).dequantize()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, True), WeightScheme(4, 128, False), WeightScheme(3, -1, True)],
                         ids=str)
def test_linears_that_read_one_input_get_in_one_loop_what_each_gets_alone(dtype, act_order, scheme):
    """q/k/v share their Hessian: quantized in one column loop over their rows, each gets the integers and qparams
    it gets alone (every step of GPTQ is per row given the Hessian), and a dead input stays dead in all three."""
    from qvlm.gptq import gptq_quantize_shared
    from qvlm.quant import SHRINK_GRID

    g = torch.Generator().manual_seed(15)
    _, x = _data(15)
    x[:, 3] = 0.0
    weights = [(torch.randn(rows, IN, generator=g) * 0.02).to(dtype) for rows in (64, 32, 32)]
    h = _hessian(x)
    together = gptq_quantize_shared(weights, h, scheme, act_order=act_order, shrinks=SHRINK_GRID)
    for w, got in zip(weights, together):
        alone = gptq_quantize(w, h, scheme, act_order=act_order, shrinks=SHRINK_GRID)
        assert torch.equal(got.qweight, alone.qweight) and torch.equal(got.scale, alone.scale)
        assert (got.zero is None) == scheme.symmetric and (got.zero is None or torch.equal(got.zero, alone.zero))
        assert got.qweight.shape == w.shape and not got.dequantize()[:, 3].any()


def test_linears_of_different_input_widths_or_dtypes_are_not_joined():
    from qvlm.gptq import gptq_quantize_shared

    w, x = _data(16)
    h = _hessian(x)
    with pytest.raises(ValueError, match="one dtype and one input width"):
        gptq_quantize_shared([w, w.to(torch.float16)], h, WeightScheme(4, 128, True))
    with pytest.raises(ValueError, match="one dtype and one input width"):
        gptq_quantize_shared([w, w[:, :128]], h, WeightScheme(4, 128, True))
