"""Triton W8A8 GEMM (fp8 or int8) with activation quantization fused in (imported lazily).

weight: [N, K] fp8/int8 (K contiguous, also the column-major operand `torch._scaled_mm` wants).
ACT: 0 dynamic per token (a first pass over K finds each row's amax), 1 dynamic per 128-group
(weights block-scaled 128x128; BLOCK_K == 128 == group), 2 static per tensor, 3 none (weight-only:
the weight is widened to the activation dtype). WSCALE: 0 tensor [1], 1 channel [N], 2 block [N/128, K/128].
Activation codes are computed exactly like `fake_quantize_act`: x / (amax / QMAX), clamped, then
cast (fp8) or rounded half-to-even (int8; the 1.5 * 2**23 trick).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, pick_split_k


@triton.jit
def _quant(a, sx, QMAX: tl.constexpr, IS_INT: tl.constexpr, W_DTYPE: tl.constexpr):
    y = tl.minimum(tl.maximum(a / sx[:, None], -QMAX), QMAX)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0
    return y.to(W_DTYPE)


@triton.jit
def _dot(a, w, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter multiplies bf16/fp8 as raw bits in tl.dot
        return tl.dot(a.to(tl.float32), w.to(tl.float32))
    return tl.dot(a, w)


@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, sw_ptr, sa_ptr, c_ptr, M, N, K: tl.constexpr, stride_xm, stride_cm, KB,
                 K_PER_SPLIT: tl.constexpr,
                 ACT: tl.constexpr, WSCALE: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
                 DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    W_DTYPE = w_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    sx = tl.full([BLOCK_M], 1.0, tl.float32)
    if ACT == 0:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=mask_m[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        sx = tl.maximum(amax, 1e-12) / QMAX
    if ACT == 2:
        sx = tl.full([BLOCK_M], 1.0, tl.float32) * tl.load(sa_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for kt in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kt
        kk = k0 + offs_k
        mk = kk < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & mk[None, :], other=0.0)                  # [BM, BK]
        w = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None],
                    mask=mk[:, None] & mask_n[None, :], other=0.0)                  # [BK, BN]
        if ACT == 3:
            d = _dot(a, w.to(a.dtype), DOT_F32)
            if WSCALE == 2:
                swb = tl.load(sw_ptr + (offs_n // 128) * KB + k0 // 128, mask=mask_n, other=0.0)
                d = d * swb[None, :]
            acc += d
        elif ACT == 1:
            a32 = a.to(tl.float32)
            sg = tl.maximum(tl.max(tl.abs(a32), axis=1), 1e-12) / QMAX               # [BM]
            swb = tl.load(sw_ptr + (offs_n // 128) * KB + k0 // 128, mask=mask_n, other=0.0)
            d = _dot(_quant(a32, sg, QMAX, IS_INT, W_DTYPE), w, DOT_F32)
            acc += d.to(tl.float32) * sg[:, None] * swb[None, :]
        else:
            d = _dot(_quant(a.to(tl.float32), sx, QMAX, IS_INT, W_DTYPE), w, DOT_F32)
            acc += d.to(tl.float32)
    if ACT != 1 and ACT != 3:
        acc = acc * sx[:, None]
    if ACT != 1 and WSCALE != 2:
        if WSCALE == 0:
            acc = acc * tl.load(sw_ptr)
        else:
            acc = acc * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    c_off = offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptr + c_off, acc, mask=c_mask)
    else:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def w8a8_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int,
                qmax: float, act_scale: torch.Tensor | None = None,
                block: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16; w: [N, K] fp8/int8; w_scale fp32 (see module doc) -> [M, N] x.dtype.

    block = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, split_k or 0) overrides the default tiles.
    """
    m, k = x.shape
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if block is None:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        bn = 64 if m <= 64 else 128
        narrow = m <= 16 and act == 3 and n <= 16384  # weight-only: 27.9 vs 32.5 us at 8192², M=16 (H100);
        if narrow:                                    # at N=28672, M=2-8 it was 61.5 vs 49.5 us: kept 64x256
            bn = 32
        bk = 512 if narrow else 256 if m <= 16 else 128
        block = (bm, bn, bk, 4 if m <= 64 else 8, 0 if m <= 64 else 1)
    bm, bn, bk, warps, split = block
    if act == 1 or wscale == 2:
        bk = 128
    tiles = cdiv(n, bn) * cdiv(m, bm)
    k_steps = cdiv(k, bk)
    split = split or pick_split_k(tiles, k_steps, num_sms(x.device.index or 0))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    atomic = split > 1
    out = (torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic
           else torch.empty((m, n), device=x.device, dtype=x.dtype))
    sa = act_scale if act_scale is not None else w_scale
    grid = (cdiv(n, bn), split, cdiv(m, bm))
    _w8a8_kernel[grid](x, w, w_scale, sa, out, m, n, k, x.stride(0), out.stride(0), cdiv(k, 128),
                       k_per_split, ACT=act, WSCALE=wscale, QMAX=qmax, IS_INT=w.dtype == torch.int8,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=atomic, DOT_F32=interpret_mode(),
                       num_warps=warps, num_stages=3)
    return out.to(x.dtype) if atomic else out
