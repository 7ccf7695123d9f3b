"""RMSNorm in the two flavours our architectures use."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * w  (Llama/Qwen), or  * (1 + w) with `offset=True` (Gemma). Computed in fp32."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.offset = offset
        self._scale: torch.Tensor | None = None  # precomputed (1 + w) or w, fp32 (Gemma) / dtype (Llama)

    def finish_loading(self, dtype: torch.dtype) -> None:
        if self.offset:
            self._scale = 1.0 + self.weight.data.float()
        else:
            self._scale = self.weight.data.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D] same dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32, then casts
            return (xf * self._scale).to(x.dtype)
        return self._scale * xf.to(x.dtype)
