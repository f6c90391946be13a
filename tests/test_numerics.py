"""Quantizer numerics on the dtypes checkpoints come in: float32 arithmetic, the stored scale, exact export."""

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from transformers import LlamaConfig, LlamaForCausalLM

import qvlm.export
from qvlm.capture import capture_units
from qvlm.export import compressed_tensors, decode_linear, linear_group
from qvlm.learned import LearnedWeightQuantizer
from qvlm.quant import ActScheme, QuantizedWeight, WeightScheme, grouped, quantize_clipped, quantize_weight
from qvlm.search import BlockData, SearchConfig, search_block
from qvlm.structure import find_units

DTYPES = [torch.float16, torch.bfloat16]
SCHEMES = [WeightScheme(8, 128, True), WeightScheme(8, -1, False), WeightScheme(4, 64, False), WeightScheme(3, 128, True)]


def _weight(dtype, seed=0, shape=(64, 256)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02 * torch.logspace(-1, 1, shape[1])  # magnitudes across 2 decades
    return w.to(dtype)


def _nearest(w, qw):
    """The nearest integers of ``w`` on ``qw``'s stored grid, computed in float64."""
    s = qw.scheme
    x = grouped(w.double(), s.group_size) / qw.scale.double().unsqueeze(-1)
    if qw.zero is not None:
        x = x + qw.zero.double().unsqueeze(-1)
    return torch.clamp(torch.round(x), s.qmin, s.qmax).to(torch.int8).reshape(w.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_is_the_nearest_integer_on_the_stored_scale(dtype, scheme):
    w = _weight(dtype)
    for qw in (quantize_weight(w, scheme), quantize_clipped(w, scheme)):
        assert qw.scale.dtype == dtype
        assert torch.equal(qw.qweight, _nearest(w, qw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,act", [(WeightScheme(4, 128, True), ActScheme()), (WeightScheme(8, 64, False), ActScheme()),
                                        (WeightScheme(8, -1, True), ActScheme(8, "token", True))], ids=str)
def test_compressed_tensors_decompresses_our_weight_exactly(dtype, scheme, act):
    """What we write decodes to our integers, and compressed-tensors' own decompression gives back our
    dequantized weight bit for bit (pack-quantized and int-quantized)."""
    qw = quantize_weight(_weight(dtype, 1), scheme)
    group = linear_group(scheme, act)
    tensors = compressed_tensors(qw, group)
    back = decode_linear(tensors, scheme)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scale, qw.scale)
    assert back.scale.dtype == dtype
    if qw.zero is not None:
        assert torch.equal(back.zero, qw.zero)
    theirs = BaseCompressor.get_value_from_registry(group.format).decompress(dict(tensors), group)["weight"]
    assert theirs.dtype == dtype and torch.equal(theirs, qw.dequantize())


def _trained(quantizer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        quantizer.v.copy_(torch.rand(quantizer.v.shape, generator=g) - 0.5)
        quantizer.alpha.copy_(0.5 + 0.5 * torch.rand(quantizer.alpha.shape, generator=g))
        quantizer.beta.copy_(0.5 + 0.5 * torch.rand(quantizer.beta.shape, generator=g))
    return quantizer


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_learned_rounding_exports_what_it_trained(dtype, scheme):
    w = _weight(dtype, 2)
    quantizer = _trained(LearnedWeightQuantizer.init(w, scheme), 3)
    soft = quantizer.soft_weight()  # what the block loss saw
    soft.float().square().sum().backward()
    assert quantizer.v.grad.abs().sum() > 0  # trainable through the stored-dtype scale and the rounding
    final = quantizer.finalize()
    assert final.scale.dtype == dtype
    assert torch.equal(final.dequantize(), soft.detach())
    back = decode_linear(compressed_tensors(final, linear_group(scheme, ActScheme())), scheme)
    assert torch.equal(back.qweight, final.qweight) and torch.equal(back.dequantize(), soft.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_learned_rounding_starts_exactly_at_its_start(dtype, scheme):
    """Started from another search's integers and qparams, the untrained quantizer reproduces them."""
    w = _weight(dtype, 4)
    start = quantize_clipped(w, scheme, torch.rand(w.shape[1], generator=torch.Generator().manual_seed(5)))
    again = LearnedWeightQuantizer.init(w, scheme, start).finalize()
    assert torch.equal(again.qweight, start.qweight) and torch.equal(again.scale, start.scale)
    assert torch.equal(LearnedWeightQuantizer.init(w, scheme).finalize().qweight, quantize_weight(w, scheme).qweight)


def test_learned_rounding_starts_at_a_starts_odd_integer_on_an_exact_halfway_point():
    """``w / scale`` = 2.5 and -1.5 exactly (scale 0.25): rounding half to even gives 2 and -2 whatever the integer
    shift, so a start (GPTQ's, say) that chose 3 and -1 is reached only by the offset starting off 0."""
    scheme = WeightScheme(bits=4, group_size=8, symmetric=True)
    w = torch.tensor([[1.875, 0.625, -0.375, 0.1, 0.0, -1.0, 0.3, 0.2]])  # scale = 1.875 / 7.5 = 0.25
    rtn = quantize_weight(w, scheme)
    assert rtn.scale.item() == 0.25 and rtn.qweight[0, 1:3].tolist() == [2, -2]
    odd = rtn.qweight.clone()
    odd[0, 1:3] = torch.tensor([3, -1], dtype=torch.int8)
    start = QuantizedWeight.of(odd, rtn.scale, None, scheme)
    assert torch.equal(LearnedWeightQuantizer.init(w, scheme, start).finalize().qweight, odd)


def _their_tensors(weight: QuantizedWeight, group) -> dict[str, torch.Tensor]:
    """What compressed-tensors' registered compressor makes of the weight: given the float32 dequantized weight and
    qparams, it requantizes and packs it (the stored scale is the checkpoint dtype's)."""
    scale = weight.scale.float()
    ints = grouped(weight.integers(torch.float32), weight.scheme.group_size)
    if weight.zero is not None:
        ints = ints - weight.zero.float().unsqueeze(-1)
    state = {"weight": (ints * scale.unsqueeze(-1)).reshape(weight.shape), "weight_scale": scale}
    if weight.zero is not None:
        state["weight_zero_point"] = weight.zero
    out = BaseCompressor.get_value_from_registry(group.format).compress(state, group)
    return {**out, "weight_scale": weight.scale}


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("in_features,group_size,symmetric", [(64, 32, True), (64, 16, False), (64, -1, False),
                                                               (100, -1, True), (100, 20, False), (36, -1, False)])
def test_the_tensors_written_are_what_compressed_tensors_compressor_makes(dtype, bits, in_features, group_size,
                                                                          symmetric, monkeypatch):
    """Our integers packed directly give the library compressor's tensors, to the bit, for every width (whole
    int32 words to a row at 64; 100 and 36 leave a word part-filled) and when the packer is given 7 rows at a time
    (100 rows: the last slice short). At 4 bits and 64 wide ``weight_packed`` is the held integers' own bytes, and
    what is read back holds the bytes that were read."""
    monkeypatch.setattr(qvlm.export, "PACK_ELEMENTS", 7 * in_features)
    w = torch.randn(100, in_features, generator=torch.Generator().manual_seed(bits)).to(dtype)
    scheme = WeightScheme(bits, group_size, symmetric)
    q = quantize_weight(w, scheme)
    for act in [ActScheme()] + ([ActScheme(8, "token")] if bits == 8 else []):
        group = linear_group(scheme, act)
        ours, theirs = compressed_tensors(q, group), _their_tensors(q, group)
        assert sorted(ours) == sorted(theirs), group.format
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (group.format, k)
            assert ours[k].is_contiguous()
        if bits == 4 and in_features == 64:
            assert ours["weight_packed"].data_ptr() == q.codes.data_ptr()
        back = decode_linear(ours, scheme)
        if bits == 4 and in_features % 8 == 0 and group.format == "pack-quantized":
            assert back.codes.data_ptr() == ours["weight_packed"].data_ptr()
        assert back.codes.dtype == q.codes.dtype and torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
        assert (back.zero is None) == symmetric and (symmetric or torch.equal(back.zero, q.zero))


def test_a_format_qvlm_does_not_write_is_refused_by_name():
    group = linear_group(WeightScheme(4, 32, True), ActScheme())
    group.format = "float-quantized"
    with pytest.raises(NotImplementedError, match="not 'float-quantized'"):
        compressed_tensors(quantize_weight(_weight(torch.float16), WeightScheme(4, 32, True)), group)


def _float16_block(bits=4, hidden=256, tokens=256, batch=8):
    """One Llama decoder layer in float16 with small weights: its output (5e5 elements per batch, errors
    ~2e-5) makes every gradient of a mean loss underflow to zero in float16 (learned rounding then
    returned RTN)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=tokens, initializer_range=0.002)
    model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(1))
    units = find_units(model)[:1]
    caps = capture_units(model, units, [{"input_ids": ids}])
    schemes = {u.linear_name(n): WeightScheme(bits, 128, True) for u in units for n in u.linears}
    return BlockData([model.get_submodule(u.name) for u in units], [u.name for u in units], [u.linears for u in units],
                     [c.calls for c in caps], caps[-1].outputs, schemes, ActScheme())


def test_learned_rounding_trains_on_a_float16_block():
    data = _float16_block()
    assert data.targets[0].dtype == torch.float16
    rtn = search_block(data, SearchConfig("rtn"))
    learned = search_block(data, SearchConfig("learned", iters=10))
    assert learned.error_after < 0.8 * learned.error_before
    changed = sum(int((a.weight.qweight != b.weight.qweight).sum()) for a, b in zip(learned.linears, rtn.linears))
    assert changed > 0
