"""Skinny-M (M <= 4) W4A16/W8A16 GEMV in Triton: streams packed int codes once, no tensor cores.

Imported lazily (needs triton). Same weight layout as `wna16_triton` (made by `pack_int_weight`):
packed [K/PACK, N] int32 with k = PACK*j + i in bits [BITS*i, BITS*i + BITS) of row j, scale [G, N]
fp32 (or fp16 / bf16), zero [G, N] uint8 z or fp32 2**23 + z, or one constant. Rows along N are contiguous:
each thread loads 16 B (4 columns) per packed row and a warp reads 512 contiguous bytes; with BN >= 128 * num_warps
every warp owns its own columns and each thread holds all rows of a step, so no sum crosses threads in the loop.

Per code the kernel spends one LOP3 and one FFMA per activation row (plus one shift per word):
  - codes in bits 0..23 (6 of 8 4-bit codes, 3 of 4 8-bit ones) stay in place, the rest after one shift
    (>> 24) of the word; `src & (MASK << pos)` read as fp32 is q * 2**(pos - 149), exact: any bit pattern
    below 2**24 reads as itself times 2**-149 (subnormal below bit 23; exponent field 1 continues the
    same scale), and the FFMA keeps subnormal inputs (Triton emits no .ftz);
  - the activation is pre-scaled by 2**(85 - pos) (exact), so the FFMA adds q * x * 2**-64 exactly
    rounded; no magic-number FADD and no cancellation (the products are q * x, q >= 0);
  - per tile group and column, s * (2**64 * sum q x - z * sum x) applies the zero point and the scale
    once (sum x: one FFMA per activation, shared by the thread's columns).
Each extra activation row costs one more FFMA per code, so from M = 2 `tc_wna16` wins on the H100 and
dispatch (`wna16.SKINNY_MAX_M`) sends only M = 1 here; M <= 4 stays supported and tested.
A program owns BN columns and a K slice of NG*GT rows per step (GT = rows of one tile group, <= group
size); tile [NG, GR, BN] with GR = GT / PACK packed rows. PREFETCH = 1 (2) loads the tile of step t+1
(t+2) before step t is unpacked, so DRAM reads overlap the arithmetic (without it a program waits for
every step's load, and load and compute times add up). Split-K partials are combined by REDUCE:
  0 no split (direct store); 1 fp32 atomic add into a zeroed buffer; 2 each split stores its fp32 partial,
  the last program to arrive on a per-column-tile counter (acq_rel atomic) sums them, stores the output
  and resets the counter to 0 (one launch, no memset, no cast kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_k_buffers
from quantrt.platforms.cuda.kernels.wna16_triton import load_scale_zero

MAX_M = 4


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 1024
    block_k: int = 32         # K per loop step (NG * GT)
    split_k: int = 0          # 0 = about `waves` programs per SM
    num_warps: int = 8
    num_stages: int = 1
    reduce: int = 2           # split-K combine: 1 atomics (+memset, cast), 2 last-program fixup
    waves: int = 2            # programs per SM when split_k == 0
    prefetch: int = 1         # steps loaded ahead of the one being unpacked (0, 1 or 2)


@triton.jit
def _xcol(x_ptr, kx, kmask, pos, EVEN: tl.constexpr, IS_BF16: tl.constexpr):
    """x[kx] * 2**(85 - pos) as fp32 [NG, GR]. bf16: one IMAD adds 85 - pos to the exponent of the widened
    bits (exact; x = 0 becomes 2**(-42 - pos), i.e. x ~ 2**-127, and |x| must stay below 2**42)."""
    if EVEN:
        xv = tl.load(x_ptr + kx)
    else:
        xv = tl.load(x_ptr + kx, mask=kmask, other=0.0)
    if IS_BF16:
        xb = xv.to(tl.uint16, bitcast=True).to(tl.int32)
        return (xb * 65536 + ((85 - pos) << 23)).to(tl.float32, bitcast=True)
    return xv.to(tl.float32) * (3.8685626227668134e+25 / (1 << pos))


@triton.jit
def _tile(p_ptr, s_ptr, z_ptr, k0, k_end, rows, offs_g, n2, mask_n, N, K, G, PACK: tl.constexpr,
          GT: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr, EVEN: tl.constexpr, OFFSET: tl.constexpr):
    """Packed words [NG, GR, BN], scale [NG, BN] and zero point [NG, BN] (OFFSET: the float offset) of the step
    at k0 (zeros past k_end)."""
    prow = k0 // PACK + rows                                   # [NG, GR]
    kg = k0 + offs_g * GT                                      # [NG] first k of each tile group
    gofs = (kg // G)[:, None] * N + n2                         # [NG, BN]
    if EVEN:
        live = k0 < k_end
        p = tl.load(p_ptr + prow[:, :, None] * N + n2[None, :, :], mask=live, other=0)
        s, zc = load_scale_zero(s_ptr, z_ptr, gofs, live, ZC, HAS_ZERO, OFFSET)
    else:
        kmask = (prow * PACK < K) & (prow * PACK < k_end)
        p = tl.load(p_ptr + prow[:, :, None] * N + n2[None, :, :],
                    mask=kmask[:, :, None] & mask_n[None, None, :], other=0)
        gmask = ((kg < K) & (kg < k_end))[:, None] & mask_n[None, :]
        s, zc = load_scale_zero(s_ptr, z_ptr, gofs, gmask, ZC, HAS_ZERO, OFFSET)
    return p, s, zc


@triton.jit
def _finish(acc, m, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE: tl.constexpr, M: tl.constexpr):
    if REDUCE == 0:
        tl.store(y_ptr + m * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
    elif REDUCE == 1:
        tl.atomic_add(ws_ptr + m * N + offs_n, acc, mask=mask_n)
    else:
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, acc, mask=mask_n)


@triton.jit
def _fixup(pid_n, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, N, M: tl.constexpr, SPLIT: tl.constexpr,
           BN: tl.constexpr):
    """Last-arriving split sums the fp32 partials of this column tile and resets the counter. The partials
    are read CH splits per load ([CH, BN], independent loads in flight) instead of one dependent load per
    split: at 30-60 splits the serial chain of L2 round trips was microseconds at the tail."""
    tl.debug_barrier()                                          # every thread's partial is stored
    cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if cnt == SPLIT - 1:
        CH: tl.constexpr = 8
        offs_s = tl.arange(0, CH)
        for m in tl.static_range(M):
            tot = tl.zeros([BN], dtype=tl.float32)
            for s0 in range(0, SPLIT, CH):
                sp = s0 + offs_s
                part = tl.load(ws_ptr + ((sp * M + m) * N)[:, None] + offs_n[None, :],
                               mask=(sp < SPLIT)[:, None] & mask_n[None, :], other=0.0, cache_modifier=".cg")
                tot += tl.sum(part, axis=0)
            tl.store(y_ptr + m * N + offs_n, tot.to(y_ptr.dtype.element_ty), mask=mask_n)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _group_sum(t, sx, zc, s, OFFSET: tl.constexpr):
    """[NG, GR, BN] sums of q x * 2**-64 and [NG, GR] sums of x -> [BN] sum over groups of s * (q - z) . x, or
    (OFFSET: zc holds the float offsets o) of (q s + o) . x."""
    if OFFSET:
        return tl.sum(tl.sum(t, axis=1) * 18446744073709551616.0 * s + zc * tl.sum(sx, axis=1)[:, None], axis=0)
    return tl.sum((tl.sum(t, axis=1) * 18446744073709551616.0 - zc * tl.sum(sx, axis=1)[:, None]) * s, axis=0)


@triton.jit
def _skinny_wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, G,
                         K_PER_SPLIT: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
                         GT: tl.constexpr, NG: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                         REDUCE: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr,
                         IS_BF16: tl.constexpr, OFFSET: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    NIN: tl.constexpr = 24 // BITS                             # codes in bits 0..23 (read linearly)
    GR: tl.constexpr = GT // PACK                              # packed rows per tile group
    BK: tl.constexpr = NG * GT
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_g = tl.arange(0, NG)
    rows = offs_g[:, None] * GR + tl.arange(0, GR)[None, :]  # [NG, GR] packed row within the step
    n2 = offs_n[None, :]
    acc0 = tl.zeros([BN], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)
    acc2 = tl.zeros([BN], dtype=tl.float32)
    acc3 = tl.zeros([BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = k_start + K_PER_SPLIT
    if PREFETCH >= 1:
        p_nx, s_nx, z_nx = _tile(p_ptr, s_ptr, z_ptr, k_start, k_end, rows, offs_g, n2, mask_n, N, K, G,
                                 PACK, GT, HAS_ZERO, ZC, EVEN, OFFSET)
    if PREFETCH >= 2:
        p_n2, s_n2, z_n2 = _tile(p_ptr, s_ptr, z_ptr, k_start + BK, k_end, rows, offs_g, n2, mask_n, N, K, G,
                                 PACK, GT, HAS_ZERO, ZC, EVEN, OFFSET)
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        if PREFETCH >= 2:  # two steps ahead
            p, s, zc = p_nx, s_nx, z_nx
            p_nx, s_nx, z_nx = p_n2, s_n2, z_n2
            p_n2, s_n2, z_n2 = _tile(p_ptr, s_ptr, z_ptr, k0 + 2 * BK, k_end, rows, offs_g, n2, mask_n, N, K, G,
                                     PACK, GT, HAS_ZERO, ZC, EVEN, OFFSET)
        elif PREFETCH == 1:  # issue the next step's loads first; they are not waited on until the next iteration
            p, s, zc = p_nx, s_nx, z_nx
            p_nx, s_nx, z_nx = _tile(p_ptr, s_ptr, z_ptr, k0 + BK, k_end, rows, offs_g, n2, mask_n, N, K, G,
                                     PACK, GT, HAS_ZERO, ZC, EVEN, OFFSET)
        else:
            p, s, zc = _tile(p_ptr, s_ptr, z_ptr, k0, k_end, rows, offs_g, n2, mask_n, N, K, G,
                             PACK, GT, HAS_ZERO, ZC, EVEN, OFFSET)
        prow = k0 // PACK + rows                               # [NG, GR]
        kmask = (prow * PACK < K) & (prow * PACK < k_end)
        t0 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t1 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t2 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t3 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        sx0 = tl.zeros([NG, GR], dtype=tl.float32)
        sx1 = tl.zeros([NG, GR], dtype=tl.float32)
        sx2 = tl.zeros([NG, GR], dtype=tl.float32)
        sx3 = tl.zeros([NG, GR], dtype=tl.float32)
        pu = p.to(tl.uint32, bitcast=True)
        for i in tl.static_range(PACK):
            # codes 0..NIN-1 in place (bits [BITS*i, BITS*i + BITS)), the rest after one logical shift
            if i < NIN:
                src = pu
            else:
                src = pu >> (BITS * NIN)
            pos = BITS * (i % NIN)
            # the masked bits (< 2**24) read as fp32 are q * 2**(pos - 149), exact: subnormal below bit 23,
            # and with bit 23 set the exponent field 1 continues the same linear scale
            v = (src & (MASK << pos)).to(tl.float32, bitcast=True)
            kx = prow * PACK + i
            xs = _xcol(x_ptr, kx, kmask, pos, EVEN, IS_BF16)     # v * xs = q * x * 2**-64
            inv = (1 << pos) * 2.5849394142282115e-26          # 2**(pos - 85): the sums of x
            t0 += v * xs[:, :, None]
            sx0 += xs * inv
            if M > 1:
                xs = _xcol(x_ptr + stride_xm, kx, kmask, pos, EVEN, IS_BF16)
                t1 += v * xs[:, :, None]
                sx1 += xs * inv
            if M > 2:
                xs = _xcol(x_ptr + 2 * stride_xm, kx, kmask, pos, EVEN, IS_BF16)
                t2 += v * xs[:, :, None]
                sx2 += xs * inv
            if M > 3:
                xs = _xcol(x_ptr + 3 * stride_xm, kx, kmask, pos, EVEN, IS_BF16)
                t3 += v * xs[:, :, None]
                sx3 += xs * inv
        acc0 += _group_sum(t0, sx0, zc, s, OFFSET)
        if M > 1:
            acc1 += _group_sum(t1, sx1, zc, s, OFFSET)
        if M > 2:
            acc2 += _group_sum(t2, sx2, zc, s, OFFSET)
        if M > 3:
            acc3 += _group_sum(t3, sx3, zc, s, OFFSET)
    _finish(acc0, 0, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 1:
        _finish(acc1, 1, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 2:
        _finish(acc2, 2, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 3:
        _finish(acc3, 3, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if REDUCE == 2:
        _fixup(pid_n, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, N, M, SPLIT, BN)


# M = 1, 4-bit, (K, N) -> (block_n, block_k, split_k, num_warps, num_stages, reduce, waves, prefetch), from the
# H100 sweeps of 2026-11-23 (`python bench/_skinny_sweep.py --w4`, docs/PERFORMANCE.md); CUDA-graph replay.
_TILES: dict[tuple[int, int], tuple] = {
    (8192, 8192): (1024, 32, 0, 8, 1, 2, 2, 1),      # 19.0-19.5 us (tinygemm 19.8)
    (14336, 4096): (1024, 32, 0, 8, 1, 2, 2, 1),     # 18.8 us (tinygemm 17.9)
    (4096, 28672): (512, 32, 0, 4, 1, 2, 6, 1),      # 32.8-36.5 us (tinygemm 32.1-32.3)
    (4096, 6144): (512, 128, 0, 4, 1, 2, 4, 0),      # 9.95 us (tinygemm 9.55)
    (4096, 4096): (512, 128, 0, 4, 1, 2, 4, 0),      # 8.83 us (tinygemm 6.67)
}


def default_config(m: int, n: int, k: int, bits: int) -> SkinnyConfig:
    """The swept tile of (K, N) at M = 1 with 4-bit codes; otherwise 8 warps x 1024 columns (4 per thread,
    ~2 programs per SM, one step prefetched) for weights of 2**25 codes and more, else 4 warps x 512
    columns and 128-row steps without prefetch (small weights: all loads issued at once wins)."""
    if bits == 4 and (k, n) in _TILES:
        return SkinnyConfig(*_TILES[(k, n)])
    if n * k >= 2**25:
        return SkinnyConfig(1024, 32, 0, 8, 1, 2, 2, 1)
    return SkinnyConfig(512, 128, 0, 4, 1, 2, 4, 0)


def _tile_group(group: int, block_k: int) -> tuple[int, int]:
    """(GT, NG): K rows of one tile group (a power of two <= group that divides it) and groups per step."""
    gt = 1
    while gt * 2 <= min(group, block_k) and group % (gt * 2) == 0:
        gt *= 2
    return gt, max(1, block_k // gt)


def skinny_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int, bits: int, cfg: SkinnyConfig | None = None, zero_const: int = 0, offset: bool = False
                 ) -> torch.Tensor:
    """x: [M <= 4, K] fp16/bf16; packed [K/PACK, N] int32; scale [G, N]; zero [G, N] (2**23 + z), or None
    when every zero point is `zero_const`, or with `offset` the float offsets o [G, N] fp32 (w = q s + o) -> [M, N]
    x.dtype. bits is the container width (4 or 8)."""
    if offset and zero is None:
        raise ValueError("skinny_wna16 with offset=True needs the offsets [G, N] as `zero`")
    m, k = x.shape
    if not 1 <= m <= MAX_M or bits not in (4, 8):
        raise ValueError(f"skinny_wna16 needs 1 <= M <= {MAX_M} rows and a 4- or 8-bit container; "
                         f"got M={m}, bits={bits}")
    n = packed.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits)
    gt, ng = _tile_group(group, cfg.block_k)
    bk = gt * ng
    n_tiles = cdiv(n, cfg.block_n)
    k_steps = cdiv(k, bk)
    split = cfg.split_k
    if split == 0:  # about `waves` programs per SM
        split = max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    even = k % k_per_split == 0 and n % cfg.block_n == 0
    reduce = 0 if split == 1 else cfg.reduce
    y, ws, cnt = split_k_buffers(x, n, split, reduce, n_tiles)
    _skinny_wna16_kernel[(n_tiles, split)](
        x, packed, scale, zero if zero is not None else scale, y, ws if ws is not None else y,
        cnt if cnt is not None else packed, n, k, x.stride(0), group,
        k_per_split, M=m, BITS=bits, BN=cfg.block_n, GT=gt, NG=ng, HAS_ZERO=zero is not None,
        ZC=float(zero_const), REDUCE=reduce, SPLIT=split, EVEN=even, PREFETCH=int(cfg.prefetch),
        IS_BF16=x.dtype == torch.bfloat16, OFFSET=offset,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype) if reduce == 1 else y


__all__ = ["MAX_M", "SkinnyConfig", "default_config", "skinny_wna16"]
