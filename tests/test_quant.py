import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from qvlm.export import compressed_tensors, decode_linear, linear_group
from qvlm.quant import (
    ActScheme,
    QuantizedWeight,
    WeightScheme,
    calibrate_act_range,
    fake_quantize_activation,
    percentile_bounds,
    quantize_clipped,
    quantize_weight,
)

SCHEMES = [
    WeightScheme(bits, group, sym)
    for bits in range(2, 9)
    for group in (32, 64, 128, -1)
    for sym in (True, False)
]


def _weight(seed=0, shape=(48, 256)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_error_is_at_most_half_a_step(scheme):
    w = _weight()
    qw = quantize_weight(w, scheme)
    assert qw.qweight.dtype == torch.int8
    assert int(qw.qweight.min()) >= scheme.qmin and int(qw.qweight.max()) <= scheme.qmax
    err = (qw.dequantize() - w).abs()
    step = qw.scale.repeat_interleave(w.shape[1] // qw.scale.shape[1], dim=1)
    assert torch.all(err <= step / 2 + 1e-7)


W8A8 = ActScheme(8, "token", True)  # int8 weights then go int-quantized instead of pack-quantized


@pytest.mark.parametrize("scheme,act", [(s, ActScheme()) for s in SCHEMES] + [(s, W8A8) for s in SCHEMES if s.bits == 8],
                         ids=str)
def test_checkpoint_round_trip_is_exact(scheme, act):
    """What the export writes for one linear decodes to the same integers, scales and zero points."""
    qw = quantize_weight(_weight(1), scheme)
    group = linear_group(scheme, act)
    assert group.format == ("int-quantized" if act.enabled else "pack-quantized")
    back = decode_linear(compressed_tensors(qw, group), scheme)
    assert torch.equal(back.qweight, qw.qweight)
    assert torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == scheme.symmetric
    if not scheme.symmetric:
        assert torch.equal(back.zero, qw.zero)


@pytest.mark.parametrize("bits,sym,group", [(4, True, 128), (4, False, 64), (8, True, -1), (8, False, 32)])
def test_dequantize_matches_compressed_tensors(bits, sym, group):
    """Our integers and qparams dequantize to exactly what compressed-tensors computes from them."""
    w = _weight(2)
    scheme = WeightScheme(bits, group, sym)
    qw = quantize_weight(w, scheme)
    strategy = "channel" if group == -1 else "group"
    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=None if group == -1 else group)
    zero = qw.zero if qw.zero is not None else torch.zeros_like(qw.scale, dtype=torch.int8)
    theirs = fake_quantize(w, qw.scale, zero, args)
    assert torch.equal(theirs, qw.dequantize())


def test_more_bits_less_error():
    w = _weight(3)
    errs = [float((quantize_weight(w, WeightScheme(b, 64)).dequantize() - w).pow(2).mean()) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_group_must_divide_width():
    with pytest.raises(ValueError, match="does not divide the input width 100"):
        quantize_weight(torch.randn(4, 100), WeightScheme(4, 64))


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bit_widths_are_refused(bits):
    with pytest.raises(ValueError, match="weight bits"):
        WeightScheme(bits)


def test_clipping_percentile_narrows_the_range():
    w = _weight(4)
    w[0, 0] = 1.0  # one outlier
    full = quantize_weight(w, WeightScheme(4, 128), 1.0)
    clipped = quantize_weight(w, WeightScheme(4, 128), 0.98)
    assert clipped.scale[0, 0] < full.scale[0, 0]
    lo, hi = percentile_bounds(torch.arange(101.0).reshape(1, -1), 0.99, symmetric=False)
    assert float(lo) == 1.0 and float(hi) == 99.0


def test_dynamic_token_activation_error_bound():
    x = torch.randn(3, 7, 64)
    y = fake_quantize_activation(x, ActScheme(8, "token", True))
    step = x.abs().amax(-1, keepdim=True) / 127.5
    assert torch.all((y - x).abs() <= step / 2 + 1e-6)
    assert torch.equal(fake_quantize_activation(x, ActScheme(16)), x)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_static_activation_ranges(granularity):
    x = torch.randn(4, 16, 32) * torch.linspace(0.1, 3, 32)
    scheme = ActScheme(4, granularity, symmetric=False)
    rng = calibrate_act_range(x, scheme)
    assert rng.lo.shape == ((32,) if granularity == "channel" else ())
    y = fake_quantize_activation(x, scheme, rng)
    assert y.shape == x.shape
    err = (y - x).abs().amax()
    width = (rng.hi - rng.lo).max()
    assert err <= width / 15 / 2 + 1e-6
    with pytest.raises(ValueError, match="needs a calibrated range"):
        fake_quantize_activation(x, scheme, None)


def test_storage_bits_counts_scales_and_zeros():
    assert WeightScheme(4, 128, True).storage_bits(8, 256) == 8 * 256 * 4 + 16 * 16
    assert WeightScheme(4, 128, False).storage_bits(8, 256) == 8 * 256 * 4 + 16 * 16 + 16 * 4
    assert WeightScheme(8, -1, True).storage_bits(8, 256) == 8 * 256 * 8 + 8 * 16


@pytest.mark.parametrize("scheme", [WeightScheme(4, 128, True), WeightScheme(3, 64, False), WeightScheme(4, -1, True)], ids=str)
def test_mse_clipping_never_loses_to_rtn_per_group(scheme):
    """Each group picks its shrink by the importance-weighted error; 1.0 (RTN) is on the grid, so no group is
    worse than RTN, and the heavy-tailed weight makes most better."""
    from qvlm.quant import grouped

    g = torch.Generator().manual_seed(6)
    w = torch.distributions.StudentT(3.0).sample((32, 256)) * 0.02
    importance = torch.rand(256, generator=g) + 0.1
    rtn, clipped = quantize_weight(w, scheme), quantize_clipped(w, scheme, importance)
    assert torch.equal(quantize_clipped(w, scheme, importance, shrinks=(1.0,)).qweight, rtn.qweight)

    def group_err(qw):
        return grouped(((qw.dequantize() - w) ** 2) * importance, scheme.group_size).sum(-1)

    assert torch.all(group_err(clipped) <= group_err(rtn) * (1 + 1e-6))
    assert float(group_err(clipped).sum()) < 0.95 * float(group_err(rtn).sum())
    assert torch.all(clipped.scale <= rtn.scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_a_weight_quantized_a_slice_of_rows_at_a_time_is_the_whole_weight_quantized(monkeypatch, symmetric, group_size):
    import qvlm.quant

    w = (torch.randn(50, 128, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.float16)
    scheme = WeightScheme(4, group_size, symmetric)
    importance = torch.rand(128, generator=torch.Generator().manual_seed(6))
    whole = [quantize_weight(w, scheme, 0.99), quantize_clipped(w, scheme, importance)]
    monkeypatch.setattr(qvlm.quant, "ROW_SLICE_ELEMENTS", 128 * 7)  # 8 slices, the last of one row
    sliced = [quantize_weight(w, scheme, 0.99), quantize_clipped(w, scheme, importance)]
    for a, b in zip(whole, sliced):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)
        assert (a.zero is None) == symmetric and (symmetric or torch.equal(a.zero, b.zero))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("columns", [64, 63])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_of_four_bits_or_fewer_are_held_two_a_byte_and_give_back_their_integers(bits, columns, dtype):
    torch.manual_seed(bits)
    scheme = WeightScheme(bits, -1, symmetric=bits % 2 == 0)
    weight = (torch.randn(6, columns) * 0.05).to(dtype)
    integers = torch.randint(scheme.qmin, scheme.qmax + 1, (6, columns), dtype=torch.int8)
    integers[0, :2] = torch.tensor([scheme.qmin, scheme.qmax])  # both ends of the range
    held = QuantizedWeight.of(integers, quantize_weight(weight, scheme).scale, None, scheme)
    packs = bits <= 4 and columns % 2 == 0
    assert held.packed == packs
    assert held.codes.element_size() * held.codes.numel() == (6 * columns // 2 if packs else 6 * columns)
    assert held.shape == (6, columns) and torch.equal(held.qweight, integers)
    assert torch.equal(held.integers(torch.float32), integers.float())
    assert torch.equal(held.dequantize(), (integers.to(dtype) * held.scale).to(dtype))
    assert torch.equal(held.rows(2, 5).qweight, integers[2:5])
