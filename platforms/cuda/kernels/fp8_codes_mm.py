"""fp8 W8A8 GEMM on activation codes quantized beforehand, split-K, for M = 9..64 (imported lazily).

y [M, N] = (a [M, K] fp8 codes * sa [M] per-token scales) @ (w [N, K] fp8 * sw per tensor [1] or per
channel [N])^T, fp32 accumulation. Both operands are K-major, as Hopper's 8-bit wgmma wants them: a program
owns a [BM, BN] tile and a K slice, streams [BM, BK] code tiles and [BK, BN] weight tiles through the
pipeliner's shared-memory stages into `tl.dot`, adds each step's product to an fp32 tile (an fp8 wgmma chain
that carried the accumulator over all of K = 8192 drifted ~1% from cuBLASLt on the H100), scales it once at
the end, and the split-K partials are summed in-launch by the last program of a tile (`store_split_k`).

Why it exists: at decode batch 64 cuBLASLt's rowwise `torch._scaled_mm` leaves SMs idle on the narrow-N layer
shapes (Llama-3.1-8B down projection, K 14336 x N 4096: 43.6 us where this kernel takes 31.1), and at 16-32
rows `swap_fp8` quantizes its [BK, BM] activation slice in every program at every K step; here the codes are
made once (`quant_rows`) and split-K keeps every SM streaming weights. Tiles per (M bucket, K, N) come from
offline H100 sweeps (`bench/_fp8_mm_sweep.py`); shapes without a measured win keep the path before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k


@dataclass(frozen=True)
class Fp8CodesConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    waves: int = 2            # split K to about this many programs per SM (0: no split)
    num_warps: int = 4
    num_stages: int = 4


MIN_M, MAX_M = 9, 64   # row buckets 16 / 32 / 64 (the padded decode batches of 9-64 requests); at M = 128 /
                       # 256 cuBLASLt was faster (round one), at M <= 8 `swap_fp8` / the GEMV were not compared

# (block_m, block_n, block_k, waves, num_warps, num_stages) per (M bucket, K, N), each measured faster on the H100
# (2026-11-23, `bench/_fp8_mm_sweep.py`, both sides with their activation-scale launch; µs ours vs before) than
# what the W8A8 dispatch ran there before: cuBLASLt `_scaled_mm` at M = 64 (best of three rounds, `--round3`),
# `swap_fp8` at M = 16 / 32 (`--vs-dispatch`). One program per SM over 32-column tiles won wherever the N tiles
# alone do not fill the GPU. Missing (bucket, K, N): the path before (M = 16 cells within 2% stayed swap_fp8).
_TILES: dict[tuple[int, int, int], tuple[int, int, int, int, int, int]] = {
    (16, 4096, 6144): (64, 32, 256, 1, 4, 4),       # 14.5 vs 16.6
    (16, 4096, 28672): (16, 32, 256, 2, 4, 3),      # 46.4 vs 55.3
    (16, 14336, 4096): (16, 32, 512, 1, 4, 3),      # 28.8 vs 29.9
    (32, 8192, 8192): (64, 32, 256, 1, 4, 4),       # 30.0 vs 40.4
    (32, 4096, 6144): (64, 32, 256, 1, 4, 4),       # 14.6 vs 21.7
    (32, 4096, 4096): (32, 16, 256, 1, 4, 4),       # 12.7 vs 14.8
    (32, 4096, 28672): (64, 64, 256, 2, 4, 3),      # 47.2 vs 58.0
    (32, 14336, 4096): (64, 32, 256, 1, 4, 4),      # 29.5 vs 35.5
    (64, 8192, 8192): (64, 32, 256, 1, 4, 4),       # 30.6 vs 35.7
    (64, 4096, 6144): (64, 32, 256, 1, 4, 4),       # 14.9 vs 18.0
    (64, 4096, 4096): (64, 32, 256, 1, 4, 4),       # 13.5 vs 16.4
    (64, 4096, 28672): (64, 64, 256, 2, 4, 3),      # 48.5 vs 50.9
    (64, 14336, 4096): (64, 32, 256, 1, 4, 4),      # 31.1 vs 43.6
}


def tile_for(m: int, k: int, n: int) -> Fp8CodesConfig | None:
    """The measured tile when this kernel beats the path before at [M, K] x [K, N], else None."""
    if not MIN_M <= m <= MAX_M:
        return None
    bucket = 16 if m <= 16 else 32 if m <= 32 else 64
    t = _TILES.get((bucket, k, n))
    return None if t is None else Fp8CodesConfig(*t)


@triton.jit
def _fp8_codes_mm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                         K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, WSCALE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        kk = k_start + kt + offs_k
        mk = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * K + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None], mask=mask_n[None, :] & mk[:, None], other=0.0)
        if DOT_F32:  # the interpreter multiplies fp8 as raw bits in tl.dot
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:  # a fresh fp32 sum per K step: Hopper's fp8 wgmma accumulates with a short mantissa, so the
            acc += tl.dot(a, w)  # step's [BM, BK] x [BK, BN] is promoted once per step, not chained over K
    acc = acc * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if WSCALE == 0:
        acc = acc * tl.load(sw_ptr)
    else:
        acc = acc * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    ym = offs_m[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT)


def fp8_codes_mm(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
                 cfg: Fp8CodesConfig | None = None) -> torch.Tensor:
    """a [M, K] fp8 codes, sa [M] or [M, 1] fp32, w [N, K] fp8 (same dtype), sw [1] or [N] fp32 -> [M, N]."""
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k or w.dtype != a.dtype or a.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"fp8_codes_mm needs K-contiguous a [M, K] and w [N, K] of one fp8 dtype; got a "
                         f"{tuple(a.shape)} {a.dtype}, w {tuple(w.shape)} {w.dtype}")
    if a.stride(0) != k:
        a = a.contiguous()
    cfg = cfg or Fp8CodesConfig()
    n_tiles, m_tiles, k_steps = cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), cdiv(k, cfg.block_k)
    split = 1 if cfg.waves == 0 else max(1, min(k_steps, cdiv(cfg.waves * num_sms(a.device.index or 0),
                                                               n_tiles * m_tiles)))
    k_per_split = cdiv(k_steps, split) * cfg.block_k
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    ws = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(a.device, n_tiles * m_tiles) if split > 1 else y
    _fp8_codes_mm_kernel[(n_tiles, split, m_tiles)](
        a, sa.reshape(-1), w, sw.reshape(-1), y, ws, cnt, m, n, k, k_per_split, split,
        WSCALE=0 if sw.numel() == 1 else 1, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
        DOT_F32=interpret_mode(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "MIN_M", "Fp8CodesConfig", "fp8_codes_mm", "tile_for"]
