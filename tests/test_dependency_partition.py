import math

import pytest
import torch

from qvlm.dependency import ChannelGrid, conditional_entropy, dependency_series, entropy, soft_assign
from qvlm.partition import partition


def test_entropy_of_known_distributions():
    assert entropy(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)) == 0.0
    assert entropy(torch.full((8,), 1 / 8, dtype=torch.float64)) == pytest.approx(math.log(8))


def test_conditional_entropy_known_answers():
    independent = torch.outer(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])).double()
    h_next = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert conditional_entropy(independent) == pytest.approx(h_next)  # H(Y|X) = H(Y) when independent
    determined = torch.diag(torch.tensor([0.3, 0.7])).double()
    assert conditional_entropy(determined) == pytest.approx(0.0)  # Y is a function of X


def test_soft_assignment_concentrates_on_the_nearest_level():
    grid = ChannelGrid(torch.tensor([0.0]), torch.tensor([3.0]), 4)  # levels at 0, 1, 2, 3
    p = soft_assign(torch.tensor([[1.0], [2.5]]), grid)
    assert p.shape == (2, 4)
    assert torch.allclose(p.sum(-1), torch.ones(2))
    assert int(p[0].argmax()) == 1
    assert p[1, 2] == pytest.approx(float(p[1, 3]))  # half-way between two levels


def _stream(n_units=4, tokens=256, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, channels, generator=g)] for _ in range(n_units)]


def test_dependency_is_low_when_next_output_copies_this_one():
    outs = _stream(2)
    copy_stream = [outs[0], [outs[0][0].clone()]]
    masks = [[None], [None]]
    copied = dependency_series(copy_stream, masks, [4, 4]).dependency[0]
    independent = dependency_series(outs, masks, [4, 4]).dependency[0]
    assert 0.0 <= copied < independent <= 1.0
    assert independent > 0.8  # independent outputs: conditional entropy close to the full entropy


def test_dependency_series_shapes_and_mask():
    outs = _stream(3)
    mask = torch.zeros(1, 256, dtype=torch.bool)
    mask[:, :128] = True
    series = dependency_series(outs, [[mask]] * 3, [4, 8, 4])
    assert len(series.entropy) == 3 and len(series.dependency) == 2
    assert all(0.0 <= v <= 1.0 for v in series.entropy + series.dependency)
    changed = [[o[0].clone()] for o in outs]
    changed[1][0][:, 128:] = 1e3  # masked-out tokens must not matter
    assert dependency_series(changed, [[mask]] * 3, [4, 8, 4]) == series


def test_partition_respects_max_depth_and_threshold():
    deps = [0.9, 0.9, 0.9, 0.1, 0.9, 0.1, 0.1]
    part = partition(deps, 8, max_depth=3, h0=0.5)
    assert part.blocks == ((0, 1, 2), (3,), (4, 5), (6,), (7,))
    assert all(len(b) <= 3 for b in part.blocks)
    assert [u for b in part.blocks for u in b] == list(range(8))
    assert partition(deps, 8, max_depth=1, h0=0.5).blocks == tuple((i,) for i in range(8))


def test_partition_auto_threshold_is_the_mean_and_deterministic():
    deps = [0.2, 0.8, 0.6, 0.1, 0.7]
    a, b = partition(deps, 6, 3), partition(list(deps), 6, 3)
    assert a == b
    assert a.h0 == pytest.approx(sum(deps) / len(deps))
    assert [u for blk in a.blocks for u in blk] == list(range(6))


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_block_depth"):
        partition([0.5], 2, 0)
    with pytest.raises(ValueError, match="need 2 dependency values"):
        partition([0.5], 3, 3)


@pytest.mark.parametrize("bits", [4, 8])
def test_dependency_on_quantized_levels_compares_across_bit_widths(bits):
    """Identical consecutive outputs: unit k+1's levels are a function of unit k's, D = 0 at any width (the
    soft assignment over log M gave 0.50 at 4 bits and 0.26 at 8). Independent outputs: D near 1 at any width;
    a noisy copy in between."""
    (x,), (y,) = _stream(2, tokens=8192)
    masks = [[None], [None]]
    same = dependency_series([[x], [x.clone()]], masks, [bits, bits]).dependency[0]
    noisy = dependency_series([[x], [x + 0.05 * y]], masks, [bits, bits]).dependency[0]
    independent = dependency_series([[x], [y]], masks, [bits, bits]).dependency[0]
    assert same == 0.0
    assert 0.0 < noisy < independent
    assert independent > 0.9
