"""M <= 16 W8A8 (fp8/int8) and fp8 weight-only on tensor cores with swapped operands (imported lazily).

weight [N, K] fp8/int8 (K contiguous). A program owns BN rows and a K slice and streams them front to
back (16 B per thread along K); per K step it computes the [BN, BK] x [BK, 16] product y^T = W^T x^T,
so the weight tile is loaded straight into the A operand and the batch rows pad only the narrow side.
Modes as in `w8a8_triton`: ACT 0 dynamic per token (row scales from `skinny_fp8.row_scales`, one
small launch, instead of every program re-reading x for the amax), 1 dynamic per 128-group (the step's
own amax, BK == 128), 2 static per tensor, 3 weight-only (weights widened to the activation dtype).
WSCALE 0 tensor [1], 1 channel [N], 2 block [N/128, K/128]. Activation codes are computed exactly like
`fake_quantize_act` (x / scale, clamped, cast; int8 rounds half to even) and multiplied code x code on
the tensor cores with fp32 (int32) accumulation. Split-K partials: the last program per tile sums them.
M = 17..256 (third pass): a third grid axis over BM-row tiles; tiles per (M bucket, K, N) in `_ROW_TILES`
from one offline sweep (`bench/_tc_sweep.py`).
TMA weight tiles were measured on the H100 at 8192² M = 2-16 and were not faster than the cp.async path
(28.9-34.8 vs 28.8-29.7 us, seventh pass in docs/PERFORMANCE.md); that variant is in git history (16c8ff1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.skinny_fp8 import row_scales
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k

MAX_M = 256


@dataclass(frozen=True)
class SwapFp8Config:
    block_n: int = 64
    block_k: int = 256
    waves: int = 4            # split-K to about this many programs per SM (0: no split)
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 16         # rows of x per program; a grid axis covers M in BM tiles


@triton.jit
def _codes(a, sx, QMAX: tl.constexpr, IS_INT: tl.constexpr, W_DTYPE: tl.constexpr):
    """a [BK, BM] fp32, sx [BM] -> codes of a / sx in the weight dtype."""
    y = tl.minimum(tl.maximum(a / sx[None, :], -QMAX), QMAX)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0                # round half to even (1.5 * 2**23)
    return y.to(W_DTYPE)


@triton.jit
def _mm(w, a, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter multiplies bf16/fp8 as raw bits in tl.dot
        return tl.dot(w.to(tl.float32), a.to(tl.float32))
    return tl.dot(w, a).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _swap_fp8_kernel(x_ptr, w_ptr, sw_ptr, sa_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, KB,
                     K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr, WSCALE: tl.constexpr,
                     QMAX: tl.constexpr, IS_INT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    W_DTYPE = w_ptr.dtype.element_ty
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BK)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    if ACT == 0:
        sx = tl.load(sa_ptr + offs_m, mask=mask_m, other=1.0)                 # [BM] per-token scales
    else:
        sx = tl.full([BM], 1.0, tl.float32) * tl.load(sa_ptr)                # static (or unused)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        kk = k0 + offs_k
        mk = kk < K
        w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        a = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None], mask=mask_m[None, :] & mk[:, None],
                    other=0.0)                                                 # [BK, BM]
        if WSCALE == 2:  # BK == 128: one block column per step
            swb = tl.load(sw_ptr + (offs_n // 128) * KB + k0 // 128, mask=mask_n, other=0.0)
        if ACT == 3:
            d = _mm(w.to(a.dtype), a, DOT_F32)
            if WSCALE == 2:
                d = d * swb[:, None]
        elif ACT == 1:
            a32 = a.to(tl.float32)
            sg = tl.maximum(tl.max(tl.abs(a32), axis=0), 1e-12) / QMAX        # [BM] this group's scale
            d = _mm(w, _codes(a32, sg, QMAX, IS_INT, W_DTYPE), DOT_F32) * sg[None, :] * swb[:, None]
        else:
            d = _mm(w, _codes(a.to(tl.float32), sx, QMAX, IS_INT, W_DTYPE), DOT_F32)
        acc += d
    if ACT == 0 or ACT == 2:
        acc = acc * sx[None, :]
    if WSCALE == 0:
        acc = acc * tl.load(sw_ptr)
    elif WSCALE == 1:
        acc = acc * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    ym = offs_m[None, :] * N + offs_n[:, None]                              # [BN, BM] -> y[m, n]
    ymask = mask_m[None, :] & mask_n[:, None]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT)


# Best tiles per (K, N) from the H100 sweep (bench/kernels.py --km-sweep / --gemv-sweep, 2026-11-23; the
# same config won at every M = 1..16 of a shape): per-token / static activations, and 128-group activations.
# 8192²: ~1 program per SM (waves 1, 256 programs) beat 2 (384): M = 1 / 16 28.7 / 29.8 vs 29.9 / 31.0 us
# (bench/_fp8_sweep.py, 2026-11-23; waves 1 was not in the earlier sweep).
_TOKEN_TILES = {(4096, 6144): SwapFp8Config(64, 128, 4, 4, 3), (4096, 28672): SwapFp8Config(64, 256, 8, 4, 3),
                (8192, 8192): SwapFp8Config(64, 256, 1, 4, 3)}
_TOKEN_DEFAULT = SwapFp8Config(64, 256, 2, 4, 3)     # 4096², 14336x4096: 11.6 / 27.4-29.1 us
_GROUP_TILES = {(4096, 28672): SwapFp8Config(128, 128, 4, 4, 3)}
_GROUP_DEFAULT = SwapFp8Config(64, 128, 4, 4, 3)     # 8192² 29.4-31.5 us at M = 1-16


# M = 17..256: (block_n, block_k, waves, warps, stages, block_m) per (M bucket, act, int8 weights, K, N),
# from the H100 sweep of 2026-11-23 (`python bench/kernels.py --rows-sweep`); a missing entry uses the
# bucket default.
_ROW_DEFAULT: dict[int, tuple] = {32: (64, 128, 4, 4, 3, 32), 64: (64, 128, 4, 4, 3, 64),
                                  128: (128, 128, 2, 8, 3, 64), 256: (128, 128, 2, 8, 3, 128)}
_ROW_TILES: dict[tuple[int, int, bool, int, int], tuple] = {
    (32, 1, False, 4096, 4096): (128, 256, 2, 8, 3, 32),  # 14.0 us
    (32, 1, False, 4096, 6144): (128, 128, 2, 4, 3, 32),  # 19.3 us
    (32, 1, False, 4096, 28672): (64, 128, 4, 4, 3, 32),  # 63.2 us
    (32, 1, False, 8192, 8192): (64, 256, 4, 4, 3, 32),  # 36.1 us
    (32, 1, False, 14336, 4096): (128, 256, 2, 8, 3, 32),  # 35.8 us
    (64, 1, False, 4096, 4096): (128, 128, 2, 4, 3, 64),  # 20.1 us
    (64, 1, False, 4096, 6144): (128, 128, 2, 4, 3, 64),  # 31.2 us
    (64, 1, False, 4096, 28672): (128, 128, 2, 4, 3, 64),  # 71.7 us
    (64, 1, False, 8192, 8192): (128, 128, 2, 4, 3, 64),  # 51.6 us
    (64, 1, False, 14336, 4096): (128, 128, 2, 4, 3, 64),  # 54.1 us
    (128, 1, False, 4096, 4096): (128, 128, 2, 8, 3, 64),  # 38.1 us
    (128, 1, False, 4096, 6144): (128, 128, 2, 8, 3, 64),  # 52.8 us
    (128, 1, False, 4096, 28672): (128, 256, 1, 8, 3, 128),  # 125.6 us
    (128, 1, False, 8192, 8192): (128, 128, 2, 8, 3, 128),  # 94.5 us
    (128, 1, False, 14336, 4096): (128, 128, 2, 8, 3, 64),  # 93.4 us
    (256, 1, False, 4096, 4096): (128, 128, 2, 4, 3, 64),  # 49.6 us
    (256, 1, False, 4096, 6144): (128, 128, 2, 4, 3, 64),  # 60.2 us
    (256, 1, False, 4096, 28672): (128, 128, 2, 4, 3, 64),  # 215.4 us
    (256, 1, False, 8192, 8192): (128, 128, 2, 4, 3, 64),  # 127.5 us
    (256, 1, False, 14336, 4096): (128, 128, 2, 4, 3, 64),  # 119.2 us
    (32, 0, False, 4096, 4096): (64, 128, 4, 4, 3, 32),  # 14.0 us
    (32, 0, False, 4096, 6144): (128, 128, 2, 4, 3, 32),  # 21.0 us
    (32, 0, False, 4096, 28672): (64, 128, 4, 4, 3, 32),  # 57.8 us
    (32, 0, False, 8192, 8192): (128, 128, 2, 4, 3, 32),  # 39.6 us
    (32, 0, False, 14336, 4096): (128, 256, 2, 8, 3, 32),  # 34.9 us
    (32, 3, False, 4096, 4096): (64, 128, 4, 4, 3, 32),  # 15.6 us
    (32, 3, False, 4096, 6144): (64, 128, 4, 4, 3, 32),  # 19.4 us
    (32, 3, False, 4096, 28672): (64, 128, 4, 4, 3, 32),  # 55.4 us
    (32, 3, False, 8192, 8192): (64, 128, 4, 4, 3, 32),  # 38.9 us
    (32, 3, False, 14336, 4096): (64, 256, 4, 4, 3, 32),  # 38.1 us
    (64, 3, False, 4096, 4096): (128, 128, 2, 4, 3, 64),  # 19.2 us
    (64, 3, False, 4096, 6144): (64, 128, 4, 4, 3, 64),  # 25.2 us
    (64, 3, False, 4096, 28672): (64, 128, 4, 4, 3, 64),  # 74.8 us
    (64, 3, False, 8192, 8192): (64, 128, 4, 4, 3, 64),  # 44.2 us
    (64, 3, False, 14336, 4096): (64, 128, 4, 4, 3, 64),  # 43.8 us
    (128, 3, False, 4096, 4096): (64, 128, 2, 4, 3, 128),  # 30.6 us
    (128, 3, False, 4096, 6144): (64, 128, 2, 4, 3, 128),  # 35.4 us
    (128, 3, False, 4096, 28672): (64, 128, 2, 4, 3, 128),  # 92.9 us
    (128, 3, False, 8192, 8192): (64, 128, 2, 4, 3, 128),  # 67.9 us
    (128, 3, False, 14336, 4096): (64, 128, 2, 4, 3, 128),  # 69.0 us
    (256, 3, False, 4096, 4096): (64, 128, 2, 4, 3, 128),  # 38.5 us
    (256, 3, False, 4096, 6144): (64, 128, 2, 4, 3, 128),  # 53.1 us
    (256, 3, False, 4096, 28672): (128, 128, 2, 8, 3, 256),  # 186.9 us
    (256, 3, False, 8192, 8192): (128, 128, 1, 8, 4, 128),  # 101.0 us
    (256, 3, False, 14336, 4096): (64, 128, 2, 4, 3, 128),  # 107.1 us
    (32, 0, True, 4096, 4096): (64, 128, 4, 4, 3, 32),  # 15.0 us
    (32, 0, True, 4096, 6144): (128, 128, 2, 4, 3, 32),  # 21.3 us
    (32, 0, True, 4096, 28672): (64, 128, 4, 4, 3, 32),  # 59.6 us
    (32, 0, True, 8192, 8192): (128, 128, 2, 4, 3, 32),  # 40.3 us
    (32, 0, True, 14336, 4096): (128, 256, 2, 8, 3, 32),  # 36.1 us
    (64, 0, True, 4096, 4096): (128, 128, 2, 4, 3, 64),  # 23.7 us
    (64, 0, True, 4096, 6144): (128, 128, 2, 4, 3, 64),  # 33.3 us
    (64, 0, True, 4096, 28672): (128, 128, 2, 4, 3, 64),  # 73.0 us
    (64, 0, True, 8192, 8192): (128, 128, 2, 4, 3, 64),  # 57.3 us
    (64, 0, True, 14336, 4096): (128, 256, 2, 8, 3, 64),  # 47.6 us
    (128, 0, True, 4096, 4096): (128, 128, 2, 8, 3, 64),  # 34.7 us
    (128, 0, True, 4096, 6144): (128, 128, 2, 8, 3, 64),  # 43.3 us
    (128, 0, True, 4096, 28672): (128, 128, 2, 8, 3, 64),  # 125.8 us
    (128, 0, True, 8192, 8192): (128, 128, 2, 8, 3, 64),  # 77.4 us
    (128, 0, True, 14336, 4096): (128, 128, 2, 8, 3, 64),  # 82.3 us
    (256, 0, True, 4096, 4096): (128, 128, 2, 4, 3, 64),  # 52.7 us
    (256, 0, True, 4096, 6144): (128, 128, 2, 4, 3, 64),  # 72.1 us
    (256, 0, True, 4096, 28672): (128, 128, 2, 4, 3, 64),  # 231.8 us
    (256, 0, True, 8192, 8192): (128, 128, 2, 4, 3, 64),  # 130.0 us
    (256, 0, True, 14336, 4096): (128, 128, 2, 4, 3, 64),  # 149.8 us
}


def m_bucket(m: int) -> int:
    """16 for M <= 16, else the smallest of 32/64/128/256 holding m."""
    for b in (16, 32, 64, 128, 256):
        if m <= b:
            return b
    raise ValueError(f"M={m} is above swap_fp8's MAX_M={MAX_M}")


def default_config(m: int, n: int, k: int, act: int, is_int: bool = False) -> SwapFp8Config:
    """Tiles per (M bucket, K, N) chosen offline on the H100 (no autotuning at run time)."""
    b = m_bucket(m)
    if b > 16:
        return SwapFp8Config(*_ROW_TILES.get((b, act, is_int, k, n), _ROW_DEFAULT[b]))
    if act == 1:
        return _GROUP_TILES.get((k, n), _GROUP_DEFAULT)
    return _TOKEN_TILES.get((k, n), _TOKEN_DEFAULT)


def swap_fp8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int, qmax: float,
             act_scale: torch.Tensor | None = None, cfg: SwapFp8Config | None = None) -> torch.Tensor:
    """x: [M <= 256, K] fp16/bf16; w: [N, K] fp8/int8; modes and scales as in `w8a8_triton` -> [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"swap_fp8 takes 1 <= M <= {MAX_M} rows, got M={m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, act, w.dtype == torch.int8)
    bk = 128 if (act == 1 or wscale == 2) else cfg.block_k
    n_tiles = cdiv(n, cfg.block_n)
    m_tiles = cdiv(m, cfg.block_m)
    k_steps = cdiv(k, bk)
    split = 1 if cfg.waves == 0 else max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0),
                                                               n_tiles * m_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    if act == 0:
        sa = row_scales(x, qmax)
    else:
        sa = act_scale if act_scale is not None else w_scale
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles * m_tiles) if split > 1 else sa
    _swap_fp8_kernel[(n_tiles, split, m_tiles)](
        x, w, w_scale, sa, y, ws, cnt, m, n, k, x.stride(0), cdiv(k, 128), k_per_split, split,
        ACT=act, WSCALE=wscale, QMAX=qmax, IS_INT=w.dtype == torch.int8, BN=cfg.block_n, BK=bk, BM=cfg.block_m,
        DOT_F32=interpret_mode(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "SwapFp8Config", "default_config", "m_bucket", "swap_fp8"]
