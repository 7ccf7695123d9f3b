"""INT8 W8A8 (per-channel weights x per-token or static activations) for M >= 64 through cuBLASLt's
int8 tensor cores (`torch._int_mm`, imported lazily).

int8 activation codes [M, K] with their scales [M, 1] (`TritonW8A8Kernel._codes` or the producing op) ->
int32 [M, N] = codes @ W^T (exact integer sums) -> one Triton epilogue launch y = acc * s_x[m] * s_w[n] in the
compute dtype. Where `codes_mm` measured faster the W8A8 dispatch takes that instead. At M >= 64 this is ~2x the
bf16 tensor-core rate on half the weight bytes, where the Triton tiles fall behind bf16 cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv

MIN_M = 17  # torch._int_mm needs M > 16 on CUDA


@triton.jit
def _scale_rows_cols_kernel(acc_ptr, sa_ptr, sw_ptr, y_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc * sa[:, None] * sw[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def int8_mm(xq: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M >= 17, K] int8 codes, sa [M, 1] fp32; w [N, K] int8 (K contiguous); w_scale [N] fp32 -> [M, N]."""
    m, k = xq.shape
    n = w.shape[0]
    if m < MIN_M or k % 8 or n % 8 or w.dtype != torch.int8 or xq.dtype != torch.int8:
        raise ValueError(f"int8_mm needs int8 codes and weights, M >= {MIN_M} and K, N multiples of 8; "
                         f"got M={m}, K={k}, N={n}, codes {xq.dtype}, weight {w.dtype}")
    acc = torch._int_mm(xq, w.t())                                            # [M, N] int32
    y = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    _scale_rows_cols_kernel[(cdiv(m, 32), cdiv(n, 128))](acc, sa, w_scale, y, m, n, BM=32, BN=128, num_warps=4)
    return y


__all__ = ["MIN_M", "int8_mm"]
