"""The float-offset term of W4A16/W8A16 weights with float offsets, added to the kernel's output in one launch
(imported lazily): out [M, N] = y + (x summed over each group) @ r, in fp32, rounded once to y's dtype.

y [M, N] comes from the zero-point kernel (`wna16._offset_split`: w = (q - z) * s + r); r [G, N] fp32 is the
residual offset per group. A program owns BN columns of BM rows and walks the groups BG at a time: it sums its
rows of x over each group (x is read from L2 by every column program: BN = 256 keeps that to N / 256 reads of x)
and accumulates the rank-BG update. Replaces four torch launches (group sum, matmul, add, cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv
from quantrt.platforms.cuda.layer_ops import rne

BN = 256


@triton.jit
def _offset_term_kernel(x_ptr, r_ptr, y_ptr, o_ptr, M, N, stride_xm, G: tl.constexpr, GS: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BG: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    mask_m, mask_n = offs_m < M, offs_n < N
    j = tl.arange(0, GS)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for g0 in range(0, G, BG):
        gg = g0 + tl.arange(0, BG)                                                   # [BG]
        kk = gg[None, :, None] * GS + j[None, None, :]                               # [1, BG, GS]
        xs = tl.load(x_ptr + offs_m[:, None, None].to(tl.int64) * stride_xm + kk,
                     mask=mask_m[:, None, None] & (gg < G)[None, :, None], other=0.0)
        xg = tl.sum(xs.to(tl.float32), axis=2)                                       # [BM, BG]
        r = tl.load(r_ptr + gg[:, None] * N + offs_n[None, :], mask=(gg < G)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(xg[:, :, None] * r[None, :, :], axis=1)                      # [BM, BN]
    ym = offs_m[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptr + ym, mask=ymask, other=0.0)
    tl.store(o_ptr + ym, rne(y.to(tl.float32) + acc, o_ptr.dtype.element_ty), mask=ymask)   # one rounding


def add_offset_term(y: torch.Tensor, x: torch.Tensor, r: torch.Tensor, group: int) -> torch.Tensor:
    """y [M, N] (the zero-point kernel's output), x [M, K] (K = G * group, K-contiguous), r [G, N] fp32 ->
    y + (x summed per group) @ r in y's dtype."""
    m, k = x.shape
    g, n = r.shape
    if k != g * group or y.shape != (m, n) or x.stride(1) != 1 or r.dtype != torch.float32 or group & (group - 1):
        raise ValueError(f"add_offset_term needs x [M, G * group] K-contiguous, y [M, N], r [G, N] fp32 and a "
                         f"power-of-two group; got x {tuple(x.shape)}, y {tuple(y.shape)}, r {tuple(r.shape)} "
                         f"{r.dtype}, group {group}")
    bm = min(16, triton.next_power_of_2(max(m, 1)))
    bg = max(1, min(triton.next_power_of_2(g), 2048 // (bm * group)))
    out = torch.empty_like(y)
    _offset_term_kernel[(cdiv(n, BN), cdiv(m, bm))](x, r, y.contiguous(), out, m, n, x.stride(0), G=g, GS=group, BM=bm,
                                                   BN=BN, BG=bg, num_warps=4)
    return out


__all__ = ["add_offset_term"]
