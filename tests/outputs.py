"""Reading a job's output in tests: the quantized tensors of its blocks, decoded from the checkpoint files
through the blocks' records (the same integers and scales the search found)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qvlm.search import linear_tensors
from workers.shard import read_block, read_record
from workers.storage import LocalStorage
from workers.veo_record import VEO_RECORD_KEY, VeoRecord


def plan_of(out: Path) -> dict:
    return json.loads((Path(out) / "qvlm_plan.json").read_text())


def block_tensors(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(plan document, every block's quantized tensors by module name) of a finished output."""
    plan, storage = plan_of(out), LocalStorage(out)
    tensors: dict[str, torch.Tensor] = {}
    for block in plan["blocks"]:
        tensors.update(linear_tensors(read_block(storage, read_record(storage, block["index"])).linears))
    return plan, tensors


def veo_tower(out: Path) -> dict[str, torch.Tensor]:
    """The VEO-tuned vision tower's tensors, from the output's VEO record and its verified file."""
    storage = LocalStorage(out)
    record = VeoRecord.from_json(storage.get_bytes(VEO_RECORD_KEY))
    return linear_tensors(read_block(storage, record.block).linears)


def assert_same_up_to_summation_order(got: dict, expected: dict, rtol: float = 1e-3) -> None:
    """Bit-equality between a Ray worker and this process holds on some CPUs only: the BLAS kernels a CPU picks
    may sum in an order that depends on the buffers' alignment, and VEO trains through thousands of them. Scales
    agree to float noise (``rtol``); an integer code may move one step where its value sits on a rounding
    boundary."""
    for name, want in expected.items():
        have = got[name]
        assert (have.dtype, have.shape) == (want.dtype, want.shape), name
        if want.is_floating_point():  # a value on a rounding boundary of the dtype may move one step of it
            torch.testing.assert_close(have, want, rtol=max(rtol, torch.finfo(want.dtype).eps), atol=1e-6,
                                       msg=lambda detail, name=name: f"{name}: {detail}")
        else:
            moved = (have.long() - want.long()).abs()
            assert int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= 0.01, name
