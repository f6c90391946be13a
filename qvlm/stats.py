"""Per-unit statistics from captured inputs: KurtBoost kurtosis per linear, SensiBoost sensitivity per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from qvlm.capture import UnitCall, capture_linear_inputs, shared_input_groups
from qvlm.mixed_precision import group_sensitivity, kurtosis, sensitivity_terms
from qvlm.quant import WeightScheme
from qvlm.structure import Unit


@dataclass(frozen=True)
class UnitStats:
    unit: str
    kurtosis: dict[str, float]  # relative linear name -> kurtosis of its weight
    groups: tuple[tuple[str, ...], ...]  # linears sharing one input (q/k/v, gate/up, ...)
    sensitivity: dict[str, float]  # group key ("a+b+c") -> normalised output error at the base scheme

    def group_of(self, linear: str) -> str:
        return next(group_key(g) for g in self.groups if linear in g)


def group_key(group: Sequence[str]) -> str:
    return "+".join(group)


def unit_statistics(
    module: nn.Module, unit: Unit, linears: Sequence[str], calls: Sequence[UnitCall], base: WeightScheme,
    max_rows: int = 4096,
) -> UnitStats:
    kurt = {n: kurtosis(module.get_submodule(n).weight) for n in linears}
    groups = tuple(g for g in shared_input_groups(module, list(linears), calls[0]))
    inputs = capture_linear_inputs(module, list(linears), calls, max_rows)
    sens = {
        group_key(g): group_sensitivity([sensitivity_terms(module.get_submodule(n).weight, inputs[n], base) for n in g])
        for g in groups
    }
    return UnitStats(unit.name, kurt, groups, sens)
