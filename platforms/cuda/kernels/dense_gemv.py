"""`TritonDenseGemvKernel`: unquantized fp16/bf16 linears whose decode rows (M <= GEMV_MAX_M) run the Triton
GEMV in `dense_gemv_triton` instead of cuBLAS; every other M (prefill, large batches) runs F.linear.

The weight stays in its natural [N, K] layout (one copy, shared with F.linear). Why a GEMV of our own: at
batch 1 cuBLAS launches a split-K GEMV plus a separate reduce kernel for most Llama shapes, and its small
projections read well below the copy ceiling (docs/PERFORMANCE.md, "bf16 dense GEMV").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantrt.platforms.cuda.kernels._common import check_runtime, stream_pdl
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import DenseWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

GEMV_MAX_M = 1   # up to here the Triton GEMV; above, cuBLAS (F.linear)
K_MULTIPLE = 64  # K must be a multiple of this (16-byte row loads, K steps of at least 64)


class TritonDenseGemvKernel(LinearKernel):
    """Dense fp16/bf16 weight: Triton GEMV for M <= GEMV_MAX_M, F.linear otherwise."""

    name = "triton_dense_gemv"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [N, K] compute dtype, K contiguous

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, DenseWeight):
            return False, f"weight is {type(w).__name__}, not DenseWeight"
        k = w.shape[1]
        if k % K_MULTIPLE:
            return False, f"K={k} is not a multiple of {K_MULTIPLE} (F.linear serves it)"
        return check_runtime(w.data, spec.compute_dtype)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> TritonDenseGemvKernel:
        return cls(spec.weight.data.to(spec.compute_dtype).contiguous())    # on the device already (QuantLinear)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)                                                   # [M, K]
        if not 1 <= x2.shape[0] <= GEMV_MAX_M or x2.dtype != self.weight.dtype:
            return F.linear(x, self.weight, bias)
        from quantrt.platforms.cuda.kernels.dense_gemv_triton import default_config, dense_gemv

        y = dense_gemv(x2, self.weight, default_config(x2.shape[0], n, k, pdl=stream_pdl(x2, "dense")),
                       release_early=self.release_early)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, n)
