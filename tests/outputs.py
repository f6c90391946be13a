"""Reading a job's output in tests: the quantized tensors of its blocks, decoded from the checkpoint files
through the blocks' records (the same integers and scales the search found)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qvlm.search import linear_tensors
from workers.shard import read_block, read_record
from workers.storage import LocalStorage


def plan_of(out: Path) -> dict:
    return json.loads((Path(out) / "qvlm_plan.json").read_text())


def block_tensors(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(plan document, every block's quantized tensors by module name) of a finished output."""
    plan, storage = plan_of(out), LocalStorage(out)
    tensors: dict[str, torch.Tensor] = {}
    for block in plan["blocks"]:
        tensors.update(linear_tensors(read_block(storage, read_record(storage, block["index"])).linears))
    return plan, tensors
