"""FP8 128x128-block weights x 128-group activations for M >= 64 through cuBLASLt blockwise scaling
(`torch._scaled_mm` with 1x128 activation scales and 128x128 weight scales; imported lazily).

x [M, K] -> fp8 codes and per-(row, 128-group) scales exactly as `quantize_act_per_token_group` (one Triton
launch; scales written K-group-major, the "outer-dim-major" [M, K/128] layout cuBLASLt wants) -> one
`_scaled_mm`. The weight scales [N/128, K/128] go in as their [K/128, N/128] transpose view. Probed on the
H100 (torch 2.11, 2026-11-23): other scale layouts are refused ("Invalid scaling configuration").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_M = 64


@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, K: tl.constexpr, QMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    offs = grp * 128 + tl.arange(0, 128)
    mk = offs < K
    a = tl.load(x_ptr + row * stride_xm + offs, mask=mk, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(a), axis=0), 1e-12) / QMAX
    tl.store(s_ptr + grp * M + row, s)                                   # [K/128, M]: M contiguous
    y = tl.minimum(tl.maximum(tl.math.div_rn(a, s), -QMAX), QMAX)
    tl.store(q_ptr + row * K + offs, y.to(q_ptr.dtype.element_ty), mask=mk)


def quant_groups(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16 -> (codes [M, K] dtype, scales [M, K/128] fp32 with stride (1, M))."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    g = -(-k // 128)
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    s = torch.empty((g, m), device=x.device, dtype=torch.float32)
    _quant_groups_kernel[(m, g)](x, q, s, m, x.stride(0), K=k, QMAX=qmax, num_warps=1)
    return q, s.t()


def block_fp8_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, qmax: float) -> torch.Tensor:
    """x [M, K] fp16/bf16; w [N, K] fp8 (K contiguous); w_scale [N/128, K/128] fp32 -> [M, N] in x.dtype."""
    m, k = x.shape
    n = w.shape[0]
    if k % 128 or n % 128 or w_scale.shape != (n // 128, k // 128):
        raise ValueError(f"block_fp8_mm needs K and N multiples of 128 and [N/128, K/128] weight scales; "
                         f"got K={k}, N={n}, scales {tuple(w_scale.shape)}")
    q, sa = quant_groups(x, w.dtype, qmax)
    return torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=w_scale.t(), out_dtype=x.dtype)


__all__ = ["MIN_M", "block_fp8_mm", "quant_groups"]
