import math

import pytest
import torch

from qvlm.mixed_precision import (
    LADDER,
    LinearInfo,
    allocate,
    detect_outliers,
    group_sensitivity,
    kurtosis,
    ladder_for,
    outlier_scores,
    sensitivity_terms,
)
from qvlm.quant import WeightScheme, fake_quantize_weight


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _smooth(n=40, seed=0, noise=0.01):
    """A slowly rising positive series with small seeded noise."""
    g = _gen(seed)
    return [1.0 + 0.01 * i + noise * float(torch.randn(1, generator=g)) for i in range(n)]


# ------------------------------------------------------------------------------------------ kurtosis


def test_kurtosis_gaussian_uniform_heavy_tailed():
    g = _gen(1)
    assert kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.1)
    assert kurtosis(torch.rand(200_000, generator=g)) == pytest.approx(1.8, abs=0.05)
    heavy = torch.randn(10_000, generator=g)
    heavy[:5] = 50.0
    assert kurtosis(heavy) > 10.0


def test_kurtosis_matches_formula_on_small_input_and_is_shape_free():
    w = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    x = w.reshape(-1).double() - w.mean().double()
    expected = float((x**4).mean() / (x**2).mean() ** 2)
    assert kurtosis(w) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(kurtosis(torch.ones(4, 4)))


# ------------------------------------------------------------------------------------------ detector


@pytest.mark.parametrize("method", ["divide", "subtract"])
def test_detect_outliers_finds_planted_spike(method):
    s = _smooth()
    s[17] = 3.0
    found = detect_outliers(s, method)
    assert 17 in found
    assert 0 not in found
    assert found == sorted(found)


@pytest.mark.parametrize("method", ["divide", "subtract"])
def test_detect_outliers_smooth_and_flat_series_are_empty(method):
    assert detect_outliers([1.0 + 0.01 * i for i in range(40)], method) == []
    assert detect_outliers([2.0] * 40, method) == []
    assert detect_outliers([1.0, 5.0], method) == []


def test_detect_outliers_ignores_rounding_noise():
    # the jumps of 1 + 0.1 i differ only by float rounding; a plain trimmed z flags several of them
    assert detect_outliers([1.0 + 0.1 * i for i in range(100)], "subtract") == []
    assert detect_outliers([3.0 * 1.1**i for i in range(100)], "divide") == []


def test_detect_outliers_top_m_keeps_largest_z():
    s = _smooth()
    s[10], s[25] = 2.0, 4.0
    all_found = detect_outliers(s, "subtract")
    assert {10, 25} <= set(all_found)
    scores = dict(outlier_scores(s, "subtract"))
    best = max(all_found, key=lambda i: (scores[i], -i))
    assert detect_outliers(s, "subtract", top_m=1) == [best]
    assert len(detect_outliers(s, "subtract", top_m=2)) == 2


def test_detect_outliers_first_position_never_returned_and_zero_guard():
    s = _smooth()
    s[0] = 50.0  # huge drop between 0 and 1 flags position 1, never 0
    found = detect_outliers(s, "divide")
    assert 0 not in found and 1 in found
    z = [0.0] + _smooth(39)  # division by zero at the first jump must not raise
    assert 1 in detect_outliers(z, "divide")


def test_detect_outliers_rejects_bad_method():
    with pytest.raises(ValueError):
        detect_outliers(_smooth(), "multiply")


# ------------------------------------------------------------------------------------------ sensitivity


def test_sensitivity_zero_error_on_grid_weight():
    scheme = WeightScheme(8, 32, symmetric=False)
    g = _gen(2)
    q = torch.randint(-128, 128, (16, 64), generator=g).float()
    q[:, ::32] = -128.0  # every group spans the full integer range, so scale = step exactly
    q[:, 1::32] = 127.0
    w = q * 2.0**-7
    x = torch.randn(3, 5, 64, generator=g)
    err, out = sensitivity_terms(w, x, scheme)
    assert err == 0.0
    assert out == pytest.approx(float((x @ w.t()).double().square().sum()), rel=1e-5)


def test_sensitivity_ratio_decreases_with_bits():
    g = _gen(3)
    w = torch.randn(32, 128, generator=g) * 0.02
    x = torch.randn(64, 128, generator=g)
    ratios = [group_sensitivity([sensitivity_terms(w, x, WeightScheme(b, 32))]) for b in (2, 4, 8)]
    assert ratios[0] > ratios[1] > ratios[2] > 0.0


def test_sensitivity_of_a_weight_wider_than_one_slice_is_that_of_the_whole(monkeypatch):
    import qvlm.quant

    g = _gen(4)
    w = (torch.randn(40, 256, generator=g) * 0.02).to(torch.float16)
    x = torch.randn(2, 7, 256, generator=g)
    scheme = WeightScheme(4, 64)
    flat = x.reshape(-1, 256)
    want_err = float((flat @ (w.float() - fake_quantize_weight(w, scheme).float()).t()).double().square().sum())
    want_out = float((flat @ w.float().t()).double().square().sum())
    monkeypatch.setattr(qvlm.quant, "ROW_SLICE_ELEMENTS", 256 * 3)  # 3 rows a slice: 14 slices, the last one short
    err, out = sensitivity_terms(w, x, scheme)
    assert err == pytest.approx(want_err, rel=1e-5) and out == pytest.approx(want_out, rel=1e-5)
    assert err > 0.0


def test_group_sensitivity_sums_then_divides():
    assert group_sensitivity([(1.0, 10.0), (3.0, 30.0)]) == pytest.approx(0.1)
    assert group_sensitivity([(0.0, 0.0)]) == 0.0


# ------------------------------------------------------------------------------------------ ladder


def test_ladder_is_ordered_by_cost_and_keeps_symmetry():
    ladder = ladder_for(WeightScheme(4, 64, symmetric=False))
    assert len(ladder) == len(LADDER) == 12
    assert all(not s.symmetric for s in ladder)
    costs = [s.storage_bits(4096, 4096) for s in ladder]
    assert costs == sorted(costs)
    assert (ladder[0].bits, ladder[0].group_size) == (2, 128)
    assert (ladder[-1].bits, ladder[-1].group_size) == (8, 32)


def test_ladder_inserts_off_ladder_base():
    base = WeightScheme(6, -1)
    ladder = ladder_for(base)
    assert len(ladder) == 13 and base in ladder
    i = ladder.index(base)
    assert ladder[i - 1] == WeightScheme(4, 32) and ladder[i + 1] == WeightScheme(8, 128)
    per_channel4 = ladder_for(WeightScheme(4, -1))
    j = per_channel4.index(WeightScheme(4, -1))
    assert per_channel4[j - 1] == WeightScheme(3, 32) and per_channel4[j + 1] == WeightScheme(4, 128)


# ------------------------------------------------------------------------------------------ allocation


def _layers(series, type_key="mlp.down_proj", out=256, inp=512, members=("x",)):
    return [
        LinearInfo(f"layers.{p}.{type_key}.{m}", type_key, p, out, inp, v)
        for p, v in enumerate(series)
        for m in members
    ]


def test_allocate_boosts_planted_spike():
    s = _smooth()
    s[17] = 3.0
    base = WeightScheme(4, 128)
    plan = allocate(_layers(s), base, "divide", extra_budget=0.02, stop=2)
    assert "layers.17.mlp.down_proj.x" in plan.boosted
    assert plan.scheme_for("layers.17.mlp.down_proj.x") == WeightScheme(4, 32)  # two rungs up
    assert plan.scheme_for("layers.3.mlp.down_proj.x") == base
    a17 = next(a for a in plan.assignments if a.name == "layers.17.mlp.down_proj.x")
    assert a17.z is not None and a17.z > 3.0
    assert plan.assignments[3].z is None
    assert plan.base_bits < plan.total_bits <= plan.budget_bits
    assert plan.bits_per_weight > 4.125


def test_allocate_falls_back_to_smaller_boost_when_budget_is_tight():
    s = _smooth()
    s[17] = 3.0
    base = WeightScheme(4, 128)
    # g128 -> g64 costs 0.125 bit/weight extra on 1 of 40 layers: 0.125 / 4.125 / 40 ~ 0.076 %
    plan = allocate(_layers(s), base, "divide", extra_budget=0.001, stop=3)
    assert plan.scheme_for("layers.17.mlp.down_proj.x") == WeightScheme(4, 64)


def test_allocate_zero_budget_boosts_nothing():
    s = _smooth()
    s[17] = 3.0
    plan = allocate(_layers(s), WeightScheme(4, 128), "subtract", extra_budget=0.0, stop=2)
    assert plan.boosted == ()
    assert plan.total_bits == plan.base_bits
    assert plan.assignments[17].z is not None  # flagged, but not boosted


def test_allocate_boosts_group_members_together():
    s = _smooth()
    s[9] = 4.0
    layers = _layers(s, type_key="self_attn.q_proj+k_proj+v_proj", members=("q", "k", "v"))
    plan = allocate(layers, WeightScheme(4, 64), "divide", extra_budget=0.05, stop=1)
    boosted = set(plan.boosted)
    assert {f"layers.9.self_attn.q_proj+k_proj+v_proj.{m}" for m in "qkv"} <= boosted
    assert len(boosted) % 3 == 0
    assert all(plan.scheme_for(n) == WeightScheme(4, 32) for n in boosted)


def test_allocate_skips_rungs_that_do_not_divide_in_features():
    s = _smooth()
    s[5] = 3.0
    base = WeightScheme(4, 64)
    # in_features 192 = 3 * 64: g128 never fits; ladder above (4, 64) is (4, 32), [(8, 128)], (8, 64), (8, 32)
    plan = allocate(_layers(s, inp=192), base, "divide", extra_budget=1.0, stop=1)
    assert plan.scheme_for("layers.5.mlp.down_proj.x") == WeightScheme(4, 32)
    plan = allocate(_layers(s, inp=192), base, "divide", extra_budget=1.0, stop=2)
    assert plan.scheme_for("layers.5.mlp.down_proj.x") == WeightScheme(8, 64)  # (8, 128) invalid -> next valid
    plan = allocate(_layers(s, inp=192), base, "divide", extra_budget=1.0, stop=4)
    assert plan.scheme_for("layers.5.mlp.down_proj.x") == WeightScheme(8, 32)


def test_allocate_rejects_base_not_dividing_in_features():
    layers = _layers(_smooth(5)) + [LinearInfo("odd.proj", "odd", 0, 8, 100, 1.0)]
    with pytest.raises(ValueError, match="odd.proj"):
        allocate(layers, WeightScheme(4, 128), "divide", extra_budget=0.02, stop=1)


def test_allocate_rejects_group_members_with_different_metrics():
    layers = [LinearInfo("a", "t", 0, 8, 128, 1.0), LinearInfo("b", "t", 0, 8, 128, 2.0)]
    with pytest.raises(ValueError, match="share a group"):
        allocate(layers, WeightScheme(4, 128), "divide", extra_budget=0.02, stop=1)


def test_allocate_caps_at_top_rung():
    s = _smooth()
    s[30] = 5.0
    plan = allocate(_layers(s), WeightScheme(8, 64), "divide", extra_budget=1.0, stop=3)
    assert plan.scheme_for("layers.30.mlp.down_proj.x") == WeightScheme(8, 32)


@pytest.mark.parametrize("seed", range(6))
def test_allocate_never_exceeds_budget(seed):
    g = _gen(100 + seed)
    types = {"self_attn.q_proj+k_proj+v_proj": (3, 512, 512), "self_attn.o_proj": (1, 512, 512),
             "mlp.down_proj": (1, 512, 1536)}  # fmt: skip
    layers = []
    for key, (n_members, out, inp) in types.items():
        series = (1.0 + torch.rand(24, generator=g) * 0.05).tolist()
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            series[int(torch.randint(1, 24, (1,), generator=g))] *= 1.5 + 3 * float(torch.rand(1, generator=g))
        for p, v in enumerate(series):
            layers += [LinearInfo(f"l{p}.{key}.{m}", key, p, out, inp, v) for m in range(n_members)]
    for base in (WeightScheme(4, 128), WeightScheme(3, 64, symmetric=False), WeightScheme(4, -1)):
        for extra in (0.0, 0.005, 0.02, 0.1):
            for stop in (1, 2, 3):
                for method in ("divide", "subtract"):
                    plan = allocate(layers, base, method, extra, stop)
                    assert plan.total_bits <= plan.budget_bits == math.floor(plan.base_bits * (1 + extra))
                    recomputed = sum(
                        plan.scheme_for(x.name).storage_bits(x.out_features, x.in_features) for x in layers
                    )
                    assert recomputed == plan.total_bits
                    assert len(plan.assignments) == len(layers)
                    if extra == 0.0:
                        assert plan.boosted == ()
    assert allocate(layers, WeightScheme(4, 128), "divide", 0.1, 3).boosted  # the loop saw real boosts
