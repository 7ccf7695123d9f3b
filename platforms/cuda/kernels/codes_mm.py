"""8-bit W8A8 GEMM on activation codes quantized beforehand (fp8 e4m3 or int8), split-K, for M = 9..256
(imported lazily).

y [M, N] = (a [M, K] codes * sa [M] per-token / static scales) @ (w [N, K] codes * sw per tensor [1] or per
channel [N])^T. Both operands are K-major, as Hopper's 8-bit wgmma wants them: a program owns a [BM, BN] tile and
a K slice, streams [BM, BK] code tiles and [BK, BN] weight tiles through the pipeliner's shared-memory stages into
`tl.dot`, and scales its sum once at the end; the split-K partials are summed in-launch by the last program of a
tile (`store_split_k`). fp8: each step's product is added to an fp32 tile (an fp8 wgmma chain that carried the
accumulator over all of K = 8192 drifted ~1% from cuBLASLt on the H100). int8: the int32 dot chains over the
whole K slice, exact (|sum| <= 127^2 K < 2^31 for K < 133000).

Why it exists: at decode batch 64 cuBLASLt's rowwise fp8 `torch._scaled_mm` leaves SMs idle on the narrow-N layer
shapes (Llama-3.1-8B down projection, K 14336 x N 4096: 43.6 us where this kernel takes 31.1), at 16-32 rows
`swap_fp8` quantizes its [BK, BM] activation slice in every program at every K step, and cuBLASLt's int8
(`torch._int_mm`, `int8_mm`) is slower than fp8 on the same tensor cores and needs a separate scaling launch;
here the codes are made once (`quant_rows`, or the producing norm / activation op) and split-K keeps every SM
streaming weights. Tiles per (codes, M bucket, K, N) come from offline H100 sweeps (`bench/_codes_mm_sweep.py`);
shapes without a measured win keep the path before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k


@dataclass(frozen=True)
class CodesConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    waves: int = 2            # split K to about this many programs per SM (0: no split)
    num_warps: int = 4
    num_stages: int = 4


MIN_M, MAX_M = 9, 256  # row buckets 16 / 32 / 64 / 128 / 256 (padded decode batches and short prefills)

# (block_m, block_n, block_k, waves, num_warps, num_stages) per (codes, M bucket, K, N), each measured faster on
# the H100 than what the W8A8 dispatch ran there before. fp8 (2026-11-23, `bench/_codes_mm_sweep.py`, both sides
# with their activation-scale launch; µs ours vs before): cuBLASLt `_scaled_mm` at M = 64 (best of three rounds,
# `--round3`), `swap_fp8` at M = 16 / 32 (`--vs-dispatch`); at M = 128 / 256 cuBLASLt was faster. One program per
# SM over 32-column tiles won wherever the N tiles alone do not fill the GPU. Missing (codes, bucket, K, N): the
# path before (fp8 M = 16 cells within 2% stayed swap_fp8).
_TILES: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int]] = {
    ("f8", 16, 4096, 6144): (64, 32, 256, 1, 4, 4),          # 14.5 vs 16.6
    ("f8", 16, 4096, 28672): (16, 32, 256, 2, 4, 3),         # 46.4 vs 55.3
    ("f8", 16, 14336, 4096): (16, 32, 512, 1, 4, 3),         # 28.8 vs 29.9
    ("f8", 32, 8192, 8192): (64, 32, 256, 1, 4, 4),          # 30.0 vs 40.4
    ("f8", 32, 4096, 6144): (64, 32, 256, 1, 4, 4),          # 14.6 vs 21.7
    ("f8", 32, 4096, 4096): (32, 16, 256, 1, 4, 4),          # 12.7 vs 14.8
    ("f8", 32, 4096, 28672): (64, 64, 256, 2, 4, 3),         # 47.2 vs 58.0
    ("f8", 32, 14336, 4096): (64, 32, 256, 1, 4, 4),         # 29.5 vs 35.5
    ("f8", 64, 8192, 8192): (64, 32, 256, 1, 4, 4),          # 30.6 vs 35.7
    ("f8", 64, 4096, 6144): (64, 32, 256, 1, 4, 4),          # 14.9 vs 18.0
    ("f8", 64, 4096, 4096): (64, 32, 256, 1, 4, 4),          # 13.5 vs 16.4
    ("f8", 64, 4096, 28672): (64, 64, 256, 2, 4, 3),         # 48.5 vs 50.9
    ("f8", 64, 14336, 4096): (64, 32, 256, 1, 4, 4),         # 31.1 vs 43.6
    # int8 (2026-11-24, `--int8`, vs the dispatch before: `swap_fp8` row tiles at 17-63 rows, cuBLASLt int8
    # `torch._int_mm` + its scaling launch from 64; taken where >= 3% faster; cuBLASLt int8 stays at 8192², 4096²
    # and 14336x4096 at 128 rows, 8192² and 4096² at 256)
    ("i8", 32, 8192, 8192): (64, 32, 256, 1, 4, 4),          # 30.5 vs 40.2
    ("i8", 32, 4096, 6144): (32, 32, 256, 1, 4, 4),          # 14.8 vs 22.7
    ("i8", 32, 4096, 4096): (32, 32, 256, 1, 4, 4),          # 12.8 vs 15.8
    ("i8", 32, 4096, 28672): (64, 64, 256, 2, 4, 3),         # 47.5 vs 61.7
    ("i8", 32, 14336, 4096): (32, 32, 256, 1, 4, 4),         # 30.0 vs 36.3
    ("i8", 64, 8192, 8192): (64, 32, 256, 1, 4, 4),          # 30.9 vs 35.2
    ("i8", 64, 4096, 6144): (64, 32, 256, 1, 4, 4),          # 15.0 vs 17.5
    ("i8", 64, 4096, 4096): (64, 32, 256, 1, 4, 4),          # 13.5 vs 15.9
    ("i8", 64, 4096, 28672): (64, 64, 256, 2, 4, 3),         # 48.7 vs 56.9
    ("i8", 64, 14336, 4096): (64, 32, 256, 1, 4, 4),         # 31.4 vs 39.8
    ("i8", 128, 4096, 6144): (64, 64, 256, 1, 4, 4),         # 23.3 vs 25.3
    ("i8", 128, 4096, 28672): (128, 64, 128, 2, 4, 4),       # 55.3 vs 78.6
    ("i8", 256, 4096, 6144): (128, 64, 256, 1, 4, 3),        # 31.6 vs 33.4
    ("i8", 256, 4096, 28672): (128, 256, 128, 1, 8, 3),      # 97.1 vs 113.7
    ("i8", 256, 14336, 4096): (128, 64, 256, 1, 4, 3),       # 73.1 vs 75.4
}


def bucket_of(m: int) -> int:
    """The row bucket of M (9..256): the next of 16, 32, 64, 128, 256."""
    return next(b for b in (16, 32, 64, 128, 256) if m <= b)


def tile_for(m: int, k: int, n: int, is_int: bool = False) -> CodesConfig | None:
    """The measured tile when this kernel beats the path before at [M, K] x [K, N], else None."""
    if not MIN_M <= m <= MAX_M:
        return None
    t = _TILES.get(("i8" if is_int else "f8", bucket_of(m), k, n))
    return None if t is None else CodesConfig(*t)


@triton.jit
def _codes_mm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                     K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, WSCALE: tl.constexpr, IS_INT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if IS_INT:
        acc_i = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        kk = k_start + kt + offs_k
        mk = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * K + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None], mask=mask_n[None, :] & mk[:, None], other=0.0)
        if DOT_F32:  # the interpreter multiplies 8-bit codes as raw bits in tl.dot; fp32 products are exact
            if IS_INT:
                acc_i += tl.dot(a.to(tl.float32), w.to(tl.float32)).to(tl.int32)
            else:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        elif IS_INT:  # exact int32 chain
            acc_i = tl.dot(a, w, acc_i, out_dtype=tl.int32)
        else:  # a fresh fp32 sum per K step: Hopper's fp8 wgmma accumulates with a short mantissa, so the
            acc += tl.dot(a, w)  # step's [BM, BK] x [BK, BN] is promoted once per step, not chained over K
    if IS_INT:
        acc = acc_i.to(tl.float32)
    acc = acc * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if WSCALE == 0:
        acc = acc * tl.load(sw_ptr)
    else:
        acc = acc * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    ym = offs_m[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT)


def codes_mm(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
             cfg: CodesConfig | None = None) -> torch.Tensor:
    """a [M, K] e4m3 / int8 codes, sa [M] or [M, 1] fp32, w [N, K] (the same dtype), sw [1] or [N] fp32 ->
    [M, N] out_dtype."""
    m, k = a.shape
    n = w.shape[0]
    if (w.shape[1] != k or w.dtype != a.dtype or a.stride(1) != 1 or w.stride(1) != 1
            or w.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)):
        raise ValueError(f"codes_mm needs K-contiguous a [M, K] and w [N, K] of one 8-bit dtype (fp8 or int8); "
                         f"got a {tuple(a.shape)} {a.dtype}, w {tuple(w.shape)} {w.dtype}")
    if sa.numel() != m or sw.numel() not in (1, n):
        raise ValueError(f"codes_mm needs sa with M={m} scales and sw with 1 or N={n}; got sa "
                         f"{tuple(sa.shape)}, sw {tuple(sw.shape)}")
    if a.stride(0) != k:
        a = a.contiguous()
    cfg = cfg or CodesConfig()
    n_tiles, m_tiles, k_steps = cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), cdiv(k, cfg.block_k)
    split = 1 if cfg.waves == 0 else max(1, min(k_steps, cdiv(cfg.waves * num_sms(a.device.index or 0),
                                                               n_tiles * m_tiles)))
    k_per_split = cdiv(k_steps, split) * cfg.block_k
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    ws = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(a.device, n_tiles * m_tiles) if split > 1 else y
    _codes_mm_kernel[(n_tiles, split, m_tiles)](
        a, sa.reshape(-1), w, sw.reshape(-1), y, ws, cnt, m, n, k, k_per_split, split,
        WSCALE=0 if sw.numel() == 1 else 1, IS_INT=w.dtype == torch.int8, BM=cfg.block_m, BN=cfg.block_n,
        BK=cfg.block_k, DOT_F32=interpret_mode(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "MIN_M", "CodesConfig", "bucket_of", "codes_mm", "tile_for"]
