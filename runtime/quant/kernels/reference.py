"""The portable reference kernel: fake-quantize activations, dequantize the weight, matmul in fp32.

Slow on purpose (it dequantizes on every call) and faithful: every fast kernel is tested against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.quantize import fake_quantize_act

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform


class ReferenceLinearKernel(LinearKernel):
    """Serves every canonical weight type and activation scheme on any device torch runs on."""

    name = "reference"

    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> ReferenceLinearKernel:
        return cls(spec)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.spec.weight.shape
        lead = x.shape[:-1]
        xq = fake_quantize_act(x.reshape(-1, k), self.spec.act)               # [M, K] fp32
        w = self.spec.weight.dequantize(torch.float32)                        # [N, K] fp32
        b = bias.to(torch.float32) if bias is not None else None
        y = F.linear(xq, w, b)                                                # [M, N] fp32
        return y.to(self.spec.compute_dtype).reshape(*lead, n)
