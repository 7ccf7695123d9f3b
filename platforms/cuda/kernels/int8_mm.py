"""INT8 W8A8 (per-channel weights x per-token or static activations) for M >= 64 through cuBLASLt's
int8 tensor cores (`torch._int_mm`, imported lazily).

x [M, K] -> int8 codes exactly as `fake_quantize_act` (one Triton launch, `act_quant_triton.quant_rows`;
static: x / scale, clamped, rounded half to even) -> int32 [M, N] = codes @ W^T (exact integer sums) ->
one Triton epilogue launch y = acc * s_x[m] * s_w[n] in the compute dtype. At M >= 64 this is ~2x the
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


def int8_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, qmax: float,
            act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M >= 17, K] fp16/bf16; w [N, K] int8 (K contiguous); w_scale [N] fp32; act_scale None (dynamic
    per token) or [1] fp32 (static) -> [M, N] in x.dtype."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    m, k = x.shape
    n = w.shape[0]
    if m < MIN_M or k % 8 or n % 8 or w.dtype != torch.int8:
        raise ValueError(f"int8_mm needs int8 weights, M >= {MIN_M} and K, N multiples of 8; "
                         f"got M={m}, K={k}, N={n}, weight {w.dtype}")
    if act_scale is None:
        xq, sa = quant_rows(x, torch.int8, qmax)                              # [M, K] int8, [M, 1]
    else:
        sa = act_scale.reshape(1, 1).expand(m, 1).contiguous()
        y = (x.float() / sa).clamp(-qmax, qmax)
        xq = ((y + 12582912.0) - 12582912.0).to(torch.int8)                  # round half to even
    acc = torch._int_mm(xq, w.t())                                            # [M, N] int32
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _scale_rows_cols_kernel[(cdiv(m, 32), cdiv(n, 128))](acc, sa, w_scale, y, m, n, BM=32, BN=128, num_warps=4)
    return y


__all__ = ["MIN_M", "int8_mm"]
