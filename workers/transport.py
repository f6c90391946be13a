"""Tensors between stage actors through Ray's object store without pickling their bytes.

A torch tensor in the object store is pickled: the reader gets a heap copy, and the writer's peak is several
times the tensor. A numpy array is stored out of band and a reader on the same node maps it without a copy
(read-only). So what crosses a stage boundary is packed as numpy arrays (bfloat16 travels as its 16-bit
pattern) and unpacked on arrival; the receiving stage then copies it once, to its device or its own memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch

_CARRIERS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, sent as a same-width integer view


@dataclass(frozen=True)
class Packed:
    array: np.ndarray
    dtype: torch.dtype


def _pack_tensor(t: torch.Tensor) -> Packed:
    t = t.detach().to("cpu").contiguous()
    carrier = _CARRIERS.get(t.dtype)
    return Packed((t.view(carrier) if carrier else t).numpy(), t.dtype)


def _unpack_tensor(p: Packed, owned: bool) -> torch.Tensor:
    array = np.array(p.array) if owned else p.array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    return t.view(p.dtype) if p.dtype in _CARRIERS else t


def pack(value: Any) -> Any:
    """``value`` with every tensor inside it (dataclasses, tuples, lists, dicts) as a :class:`Packed` array."""
    return _map(value, lambda t: _pack_tensor(t) if isinstance(t, torch.Tensor) else t)


def unpack(value: Any, owned: bool = False) -> Any:
    """The inverse of :func:`pack`. With ``owned`` every tensor gets its own writable memory; otherwise tensors
    read the object store's memory in place and must never be written."""
    return _map(value, lambda p: _unpack_tensor(p, owned) if isinstance(p, Packed) else p)


def nbytes(value: Any) -> int:
    """Bytes of the arrays in a packed value (what crossed the object store)."""
    total = [0]

    def count(p):
        if isinstance(p, Packed):
            total[0] += p.array.nbytes
        return p

    _map(value, count)
    return total[0]


def _map(value: Any, leaf) -> Any:
    if isinstance(value, (torch.Tensor, Packed)):
        return leaf(value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _map(getattr(value, f.name), leaf) for f in fields(value) if f.init})
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, leaf) for k, v in value.items()}
    return leaf(value)
