"""The portable dense kernel: an unquantized weight multiplied with F.linear in the compute dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import DenseWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform


class DenseLinearKernel(LinearKernel):
    name = "dense"

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [N, K] compute dtype

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        if not isinstance(spec.weight, DenseWeight):
            return False, f"weight is {type(spec.weight).__name__}, not DenseWeight"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> DenseLinearKernel:
        return cls(spec.weight.data.to(device=platform.device(), dtype=spec.compute_dtype).contiguous())

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)
