"""A searched block's candidates and quarantine survive its record: written, read back, in the plan document."""

import math

import torch

from cluster.commit import _record_fields
from qvlm.capture import capture_units
from qvlm.quant import ActScheme, WeightScheme
from qvlm.search import BlockData, SearchConfig, search_block
from qvlm.structure import find_units, segments_of
from workers.shard import read_block, read_record, write_block
from workers.storage import LocalStorage


def _language_block(model, batches, nan: bool) -> BlockData:
    units = find_units(model)
    run = next(r for r in segments_of(units) if r[0].segment == "language")[:1]
    caps = capture_units(model, run, batches)
    calls = list(caps[0].calls)
    if nan:  # a NaN in one valid token of the block's captured input
        hidden = calls[0].hidden.clone()
        b, t = calls[0].mask.nonzero()[0].tolist() if calls[0].mask is not None else (0, 0)
        hidden[b, t, 0] = float("nan")
        calls[0] = calls[0].with_hidden(hidden)
    schemes = {u.linear_name(n): WeightScheme(4, 128, True) for u in run for n in u.linears}
    return BlockData([model.get_submodule(u.name) for u in run], [u.name for u in run], [u.linears for u in run],
                     [calls], caps[-1].outputs, schemes, ActScheme())


def _round_trip(result, tmp_path, index):
    storage = LocalStorage(tmp_path)
    prefixes = {r.name: r.name for r in result.linears}
    write_block(storage, index, f"model-{index}.safetensors", result, prefixes, ActScheme())
    record = read_record(storage, index)
    return record, read_block(storage, record)


def test_candidates_reach_the_record_and_the_plan_document(llava, llava_batches, tmp_path):
    model, _ = llava
    result = search_block(_language_block(model, llava_batches, nan=False), SearchConfig("best", iters=10))
    record, back = _round_trip(result, tmp_path, 0)
    assert record.candidates == result.candidates and set(record.candidates) == {"rtn", "gptq", "learned"}
    assert record.chosen == result.chosen and record.quarantine is None
    assert (back.candidates, back.chosen, back.quarantine) == (result.candidates, result.chosen, None)
    fields = _record_fields(record)
    assert fields["candidates"] == result.candidates and fields["chosen"] == result.chosen
    assert fields["quarantine"] is None


def test_a_planted_nan_block_is_marked_quarantined_in_its_record(llava, llava_batches, tmp_path):
    model, _ = llava
    result = search_block(_language_block(model, llava_batches, nan=True), SearchConfig("best", iters=10))
    assert result.quarantine and "Hessian" in result.quarantine
    record, back = _round_trip(result, tmp_path, 1)
    assert record.quarantine == result.quarantine and record.chosen == "fallback"
    assert math.isnan(record.error_after)  # measured as it is, on the NaN input
    assert _record_fields(record)["quarantine"] == result.quarantine
    for a, b in zip(back.linears, result.linears):  # the fallback's integers are what the shard holds
        assert torch.equal(a.weight.qweight, b.weight.qweight) and torch.equal(a.weight.scale, b.weight.scale)
