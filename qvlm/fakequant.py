"""A drop-in ``nn.Linear`` that runs with a quantized weight and fake-quantized inputs, for search and evaluation."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.quant import ActRange, ActScheme, QuantizedWeight, fake_quantize_activation


class FakeQuantLinear(nn.Linear):
    """Same parameters and state-dict keys as the linear it replaces. The weight it runs with is, first that is
    set: ``weight_fn()`` (learned rounding trains through it), ``quantized`` dequantized at each call (a search's
    workspace holds its candidates so, one byte a weight, instead of a dense copy of each), else ``weight``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.act_scheme = ActScheme()
        self.act_range: ActRange | None = None
        self.weight_fn: Callable[[], torch.Tensor] | None = None
        self.quantized: QuantizedWeight | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, share: bool = False) -> "FakeQuantLinear":
        """A fake-quant linear with a clone of ``linear``'s weight and bias, or with ``share`` the same storage
        (for a caller that never writes ``weight``: it runs with ``quantized`` or ``weight_fn``)."""
        fq = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        own = (lambda t: t.detach()) if share else (lambda t: t.detach().clone())
        fq.weight = nn.Parameter(own(linear.weight), requires_grad=False)
        if linear.bias is not None:
            fq.bias = nn.Parameter(own(linear.bias), requires_grad=False)
        return fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize_activation(x, self.act_scheme, self.act_range)
        if self.weight_fn is not None:
            weight = self.weight_fn()
        elif self.quantized is not None:
            weight = self.quantized.dequantize()
        else:
            weight = self.weight
        return F.linear(x, weight, self.bias)


def swap_in_fake_quant(root: nn.Module, names: list[str]) -> dict[str, FakeQuantLinear]:
    """Replace the named linears under ``root`` by FakeQuantLinear copies (in place); returns them by name."""
    swapped = {}
    for name in names:
        linear = root.get_submodule(name)
        swapped[name] = linear if isinstance(linear, FakeQuantLinear) else FakeQuantLinear.from_linear(linear)
    put_modules(root, swapped)
    return swapped


def put_modules(root: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Set each named submodule of ``root`` to the given module (in place); returns the ones replaced, by name."""
    replaced = {}
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        replaced[name] = getattr(parent, child)
        setattr(parent, child, module)
    return replaced
