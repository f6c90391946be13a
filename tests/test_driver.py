import pytest
import torch
from safetensors.torch import save

from qvlm.config import MixedPrecisionConfig, QuantConfig
from qvlm.driver import quantize
from qvlm.fakequant import FakeQuantLinear
from qvlm.quant import ActScheme, WeightScheme
from tests.conftest import load_llava

FAST = dict(epochs=2, iters=20)


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


@pytest.mark.smoke
def test_quantize_llava_end_to_end(llava, llava_batches):
    model, _ = llava
    fp = _logits(model, llava_batches)
    qmodel, result = quantize(model, llava_batches, QuantConfig(**FAST))
    assert [u.segment for u in result.units].count("projector") == 1
    assert len(result.dependency) == 3  # vision, projector, language streams
    covered = [u for b in result.blocks for u in b.units]
    assert covered == list(range(len(result.units)))
    assert all(len(b.units) <= 3 for b in result.blocks)
    assert all(r.error_after <= r.error_before for r in result.block_results)
    names = {r.name for r in result.linear_results()}
    assert names == set(result.schemes)
    assert all(isinstance(qmodel.get_submodule(n), FakeQuantLinear) for n in names)
    assert "lm_head" not in " ".join(names)
    q = _logits(qmodel, llava_batches)
    assert q.shape == fp.shape and not torch.equal(q, fp)


def test_quantize_gives_the_same_bytes_twice(tiny_llava_dir, llava_batches):
    config = QuantConfig(activations=ActScheme(4, "channel", False), propagation="quantized", **FAST)
    blobs = []
    for _ in range(2):
        model, _ = load_llava(tiny_llava_dir)
        _, result = quantize(model, llava_batches, config)
        blobs.append(save(result.tensors()))
    assert blobs[0] == blobs[1]


def test_quantized_propagation_changes_block_inputs(tiny_llava_dir, llava_batches):
    errs = {}
    for prop in ("fp", "quantized"):
        model, _ = load_llava(tiny_llava_dir)
        _, result = quantize(model, llava_batches, QuantConfig(method="rtn", propagation=prop, max_block_depth=1))
        errs[prop] = [r.error_after for r in result.block_results]
    # the first block of every stream sees FP inputs either way; later ones accumulate upstream error
    assert errs["fp"][0] == errs["quantized"][0]
    assert errs["quantized"][-1] > errs["fp"][-1]


def test_stage_propagation_chains_blocks_inside_a_stage_only(tiny_llava_dir, llava_batches):
    """`stage`: inside a stage a block is calibrated on the quantized output of the block before it, as with
    `quantized`; a stage's first block on its full-precision captured inputs, as with `fp`, so that stages can
    search at once. Stages here: the tower, the projector and the first decoder layer; the two others."""
    errors = {}
    for prop in ("fp", "stage", "quantized"):
        model, _ = load_llava(tiny_llava_dir)
        _, result = quantize(model, llava_batches, QuantConfig(method="rtn", propagation=prop, max_block_depth=1),
                             stages=[[0, 1, 2, 3], [4, 5]])
        errors[prop] = {b.units[0]: r.error_after for b, r in zip(result.blocks, result.block_results)}
    assert all(errors["stage"][u] == errors["quantized"][u] for u in (0, 1, 2, 3))
    assert errors["quantized"][1] != errors["fp"][1]  # the vision stream's chain inside stage 0
    assert errors["stage"][4] == errors["fp"][4] != errors["quantized"][4]  # the second stage starts from FP
    assert errors["stage"][5] != errors["fp"][5]  # and chains from there


@pytest.mark.parametrize("metric", ["sensitivity", "kurtosis"])
def test_mixed_precision_stays_within_budget(llava, llava_batches, metric):
    model, _ = llava
    mp = MixedPrecisionConfig(metric=metric, extra_budget=0.5, stop=2)
    _, result = quantize(model, llava_batches, QuantConfig(method="rtn", mixed_precision=mp))
    plan = result.precision
    assert plan is not None and plan.total_bits <= plan.budget_bits
    for a in plan.assignments:
        assert result.schemes[a.name] == a.scheme
        weight = next(r.weight for r in result.linear_results() if r.name == a.name)
        assert weight.scheme == a.scheme


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_baseline_methods_run(llava, llava_batches, method):
    model, _ = llava
    _, result = quantize(model, llava_batches, QuantConfig(method=method, weights=WeightScheme(4, 64, False)))
    assert all(len(b.units) == 1 for b in result.blocks)
    assert all(r.weight.zero is not None for r in result.linear_results())


def test_targets_and_ignore(llava, llava_batches):
    model, _ = llava
    config = QuantConfig(method="rtn", targets=("language",), ignore=("lm_head", "re:.*mlp\\.down_proj"))
    _, result = quantize(model, llava_batches, config)
    names = [r.name for r in result.linear_results()]
    assert names and all(".language_model." in n for n in names)
    assert not any(n.endswith("mlp.down_proj") for n in names)
