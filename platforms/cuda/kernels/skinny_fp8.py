"""`skinny_fp8`: the older M <= 4 W8A8 / fp8 weight-only GEMV in Triton (imported lazily). The M = 1 dispatch uses
`gemv_w8.gemv_w8` first; this kernel serves where `gemv_w8_why_not` says no (e.g. K not a multiple of 64).

Weight [N, K] fp8 (K contiguous): a thread loads 16 consecutive k of one
column, converts them to fp32 (exact) and multiplies by the activations in fp32; partial sums over the
K step are reduced once per step. Serves weight-only fp8 (ACT 3) and W8A8 with fp8 activations:
ACT 0 dynamic per token (row scales from `row_scales`, one small launch; or ACT 4, each program
finds the row amax itself in a few wide loads, `inline_amax`), 1 dynamic per
128-group (128x128 block weights; the group amax comes from the step's own activation tile, BK = 128),
2 static per tensor. Quantized activations are computed exactly like `fake_quantize_act` (x / scale,
clamped, cast to fp8) and multiplied as fp32, which equals an fp8 x fp8 product with fp32 accumulation.
WSCALE: 0 tensor [1], 1 channel [N], 2 block [N/128, K/128]. Split-K partials are combined like
`skinny_wna16` (REDUCE 0 / 1 atomics / 2 last-program fixup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import (
    cdiv,
    num_sms,
    split_k_buffers,
)
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_enter, pdl_launch_opts
from quantrt.platforms.cuda.kernels.skinny_wna16 import _finish, _fixup

MAX_M = 4


@dataclass(frozen=True)
class SkinnyFp8Config:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 1
    reduce: int = 2
    inline_amax: bool = False  # per token (ACT 0): each program finds the row amax itself (ACT 4), no launch
    amax_block: int = 4096     # x elements per load step of that amax pass (was BK: 16-28 dependent steps)


@triton.jit
def _row_scale_kernel(x_ptr, s_ptr, K: tl.constexpr, stride_xm, QMAX: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        a = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    tl.store(s_ptr + row, tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX)


@triton.jit
def _amax_scale(x_ptr, K, KT: tl.constexpr, BKA: tl.constexpr, QMAX: tl.constexpr):
    """max(|x[:K]|, 1e-12) / QMAX for one row (KT >= K), BKA elements per step (few, wide, independent loads)."""
    offs = tl.arange(0, BKA)
    amax = tl.zeros([BKA], dtype=tl.float32)
    for k0 in range(0, KT, BKA):
        a = tl.load(x_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    return tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX


def row_scales(x: torch.Tensor, qmax: float, block: int | None = None, warps: int | None = None) -> torch.Tensor:
    """Per-token scales max(amax, 1e-12) / qmax of x [M, K] -> [M] fp32, one launch of M programs. By default
    one program reads its whole row in one step (BLOCK >= K up to 16384), not K / 1024 dependent steps.
    Launched with PDL on sm_90+ (`pdl_triton`): scheduled while the kernel that wrote x drains."""
    m, k = x.shape
    block = block or min(16384, max(1024, triton.next_power_of_2(k)))
    warps = warps or (8 if block >= 8192 else 4)
    sa = torch.empty(m, device=x.device, dtype=torch.float32)
    _row_scale_kernel[(m,)](x, sa, k, x.stride(0), QMAX=qmax, BLOCK=block, num_warps=warps,
                            **pdl_launch_opts(x))
    return sa


@triton.jit
def _xq(x_ptr, kk, mk, sx, ACT: tl.constexpr, QMAX: tl.constexpr, W_DTYPE: tl.constexpr):
    """Activation slice [BK] as fp32: as is (weight-only) or fp8 codes of x / sx (ACT 0/2) or of the
    step's own group scale (ACT 1, returned as the second value)."""
    a = tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)
    if ACT == 3:
        return a, 1.0
    if ACT == 1:
        sx = tl.maximum(tl.max(tl.abs(a), axis=0), 1e-12) / QMAX
    q = tl.minimum(tl.maximum(a / sx, -QMAX), QMAX).to(W_DTYPE).to(tl.float32)
    return q, sx


@triton.jit
def _skinny_fp8_kernel(x_ptr, w_ptr, sw_ptr, sa_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, KB,
                       K_PER_SPLIT: tl.constexpr, M: tl.constexpr, ACT: tl.constexpr, WSCALE: tl.constexpr,
                       QMAX: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, REDUCE: tl.constexpr,
                       SPLIT: tl.constexpr, BKA: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    W_DTYPE = w_ptr.dtype.element_ty
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BK)
    sx0 = 1.0
    sx1 = 1.0
    sx2 = 1.0
    sx3 = 1.0
    if ACT == 0:
        sx0 = tl.load(sa_ptr)
        if M > 1:
            sx1 = tl.load(sa_ptr + 1)
        if M > 2:
            sx2 = tl.load(sa_ptr + 2)
        if M > 3:
            sx3 = tl.load(sa_ptr + 3)
    if ACT == 4:  # per token, amax found here (x is re-read from L2 by every program)
        sx0 = _amax_scale(x_ptr, K, K_PER_SPLIT * SPLIT, BKA, QMAX)
        if M > 1:
            sx1 = _amax_scale(x_ptr + stride_xm, K, K_PER_SPLIT * SPLIT, BKA, QMAX)
        if M > 2:
            sx2 = _amax_scale(x_ptr + 2 * stride_xm, K, K_PER_SPLIT * SPLIT, BKA, QMAX)
        if M > 3:
            sx3 = _amax_scale(x_ptr + 3 * stride_xm, K, K_PER_SPLIT * SPLIT, BKA, QMAX)
    if ACT == 2:
        sx0 = tl.load(sa_ptr)
        sx1 = sx0
        sx2 = sx0
        sx3 = sx0
    acc0 = tl.zeros([BN], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)
    acc2 = tl.zeros([BN], dtype=tl.float32)
    acc3 = tl.zeros([BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        kk = k0 + offs_k
        mk = kk < K
        w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=mask_n[:, None] & mk[None, :],
                    other=0.0).to(tl.float32)                                    # [BN, BK]
        if WSCALE == 2:  # BK == 128: one block column per step
            swb = tl.load(sw_ptr + (offs_n // 128) * KB + k0 // 128, mask=mask_n, other=0.0)
        a, g = _xq(x_ptr, kk, mk, sx0, ACT, QMAX, W_DTYPE)
        d = tl.sum(w * a[None, :], axis=1)
        if ACT == 1:
            d = d * g
        if WSCALE == 2:
            d = d * swb
        acc0 += d
        if M > 1:
            a, g = _xq(x_ptr + stride_xm, kk, mk, sx1, ACT, QMAX, W_DTYPE)
            d = tl.sum(w * a[None, :], axis=1)
            if ACT == 1:
                d = d * g
            if WSCALE == 2:
                d = d * swb
            acc1 += d
        if M > 2:
            a, g = _xq(x_ptr + 2 * stride_xm, kk, mk, sx2, ACT, QMAX, W_DTYPE)
            d = tl.sum(w * a[None, :], axis=1)
            if ACT == 1:
                d = d * g
            if WSCALE == 2:
                d = d * swb
            acc2 += d
        if M > 3:
            a, g = _xq(x_ptr + 3 * stride_xm, kk, mk, sx3, ACT, QMAX, W_DTYPE)
            d = tl.sum(w * a[None, :], axis=1)
            if ACT == 1:
                d = d * g
            if WSCALE == 2:
                d = d * swb
            acc3 += d
    if WSCALE == 0:
        sw = tl.load(sw_ptr)
    elif WSCALE == 1:
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        sw = 1.0
    if ACT == 0 or ACT == 2 or ACT == 4:
        _finish(acc0 * sw * sx0, 0, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 1:
            _finish(acc1 * sw * sx1, 1, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 2:
            _finish(acc2 * sw * sx2, 2, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 3:
            _finish(acc3 * sw * sx3, 3, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    else:
        _finish(acc0 * sw, 0, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 1:
            _finish(acc1 * sw, 1, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 2:
            _finish(acc2 * sw, 2, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
        if M > 3:
            _finish(acc3 * sw, 3, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if REDUCE == 2:
        _fixup(pid_n, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, N, M, SPLIT, BN)


def default_config(m: int, n: int, k: int, act: int = 3) -> SkinnyFp8Config:
    """Tiles from the H100 sweeps (docs/PERFORMANCE.md): weight-only 8192² 26.5 us, 4096x28672 40.8,
    14336x4096 24.0. Per token: BN 16 / BK 512 with the amax found in every program, in 4096-wide steps
    (8192² 27.2 vs 28.7 us with the separate scale launch; 14336x4096 26.3 vs 26.6, where the old BK-wide
    amax steps took 33.7 us and the launch had been kept), so no per-token scale launch at M = 1."""
    if act == 0:
        return SkinnyFp8Config(16, 512, 0, 4, 1, 2, True)
    return SkinnyFp8Config(32, 256, 0, 4, 1, 2)


def skinny_fp8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int, qmax: float,
               act_scale: torch.Tensor | None = None, cfg: SkinnyFp8Config | None = None) -> torch.Tensor:
    """x: [M <= 4, K] fp16/bf16; w: [N, K] fp8; modes as in `w8a8_triton` -> [M, N] x.dtype."""
    m, k = x.shape
    assert 1 <= m <= MAX_M
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, act)
    bk = 128 if (act == 1 or wscale == 2) else cfg.block_k
    n_tiles = cdiv(n, cfg.block_n)
    k_steps = cdiv(k, bk)
    split = cfg.split_k
    if split == 0:
        split = max(1, min(k_steps, cdiv(4 * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    reduce = 0 if split == 1 else cfg.reduce
    if act == 0 and cfg.inline_amax:
        act, sa = 4, w_scale
    elif act == 0:
        sa = row_scales(x, qmax)
    else:
        sa = act_scale if act_scale is not None else w_scale
    y, ws, cnt = split_k_buffers(x, n, split, reduce, n_tiles)
    _skinny_fp8_kernel[(n_tiles, split)](
        x, w, w_scale, sa, y, ws if ws is not None else y, cnt if cnt is not None else sa, n, k, x.stride(0),
        cdiv(k, 128), k_per_split, M=m, ACT=act, WSCALE=wscale, QMAX=qmax, BN=cfg.block_n, BK=bk,
        REDUCE=reduce, SPLIT=split, BKA=cfg.amax_block, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype) if reduce == 1 else y
