"""Skinny-M (M <= 4; dispatched at M == 1) W4A16/W8A16 GEMV in Triton: streams packed int codes once, no tensor cores.

Imported lazily (needs triton). Same weight layout as `wna16_triton` (made by `pack_int_weight`):
packed [K/PACK, N] int32 with k = PACK*j + i in bits [BITS*i, BITS*i + BITS) of row j, scale [G, N]
fp32, zero [G, N] fp32 holding 2**23 + zero. Rows along N are contiguous, so each thread loads 16 B
(4 columns) per packed row and the warp reads 512 contiguous bytes.

Per element the kernel spends one LOP3, one FADD and one FFMA per activation row:
  - the word and the word >> 16 hold PACK/2 codes each in their low 16 bits; code i stays in place:
    (src & (MASK << BITS*j)) | 0x4B000000 read as fp32 is exactly 2**23 + q * 2**(BITS*j), j = i % (PACK/2);
  - subtracting 2**23 + z * 2**(BITS*j) (one [BN] vector per group and j) leaves (q - z) * 2**(BITS*j) exactly;
  - the activation is pre-scaled by 2**-(BITS*j) (exact) once per program and row, shared by the columns;
  - products are summed over a scale group in fp32, then multiplied by the group's scale (once per group
    and column, not per element).
A program owns BN columns and a K slice of NG*GT (GT = rows of one tile group, <= group size) per loop
step; tile [NG, GR, BN] with GR = GT / PACK packed rows. Split-K partials are combined by REDUCE:
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

MAX_M = 4


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 128
    block_k: int = 512        # K per loop step (NG * GT)
    split_k: int = 0          # 0 = choose from the grid size
    num_warps: int = 4
    num_stages: int = 1
    reduce: int = 2           # split-K combine: 1 atomics (+memset, cast), 2 last-program fixup


@triton.jit
def _dq(src, cj, J: tl.constexpr, BITS: tl.constexpr):
    """(q - z) * 2**(BITS*J) as fp32 for the code at bits [BITS*J, BITS*J+BITS) of src."""
    mask: tl.constexpr = ((1 << BITS) - 1) << (BITS * J)
    q = (src & mask) | 0x4B000000
    return q.to(tl.float32, bitcast=True) - cj


@triton.jit
def _xrow(x_ptr, kx, kmask, J: tl.constexpr, BITS: tl.constexpr):
    inv: tl.constexpr = 1.0 / (1 << (BITS * J))
    return (tl.load(x_ptr + kx, mask=kmask, other=0.0).to(tl.float32) * inv)[:, :, None]


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
    """Last-arriving split sums the fp32 partials of this column tile and resets the counter."""
    tl.debug_barrier()                                          # every thread's partial is stored
    cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if cnt == SPLIT - 1:
        for m in tl.static_range(M):
            tot = tl.zeros([BN], dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + m * N + offs_n, tot.to(y_ptr.dtype.element_ty), mask=mask_n)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _skinny_wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, G,
                         K_PER_SPLIT: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
                         GT: tl.constexpr, NG: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                         REDUCE: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    GR: tl.constexpr = GT // PACK                             # packed rows per tile group
    BK: tl.constexpr = NG * GT
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
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        prow = k0 // PACK + rows                               # [NG, GR]
        kmask = prow * PACK < K
        p = tl.load(p_ptr + prow[:, :, None] * N + n2[None, :, :],
                    mask=kmask[:, :, None] & mask_n[None, None, :], other=0)  # [NG, GR, BN]
        gofs = ((k0 + offs_g * GT) // G)[:, None] * N + n2     # [NG, BN]
        gmask = ((k0 + offs_g * GT) < K)[:, None] & mask_n[None, :]
        s = tl.load(s_ptr + gofs, mask=gmask, other=0.0)
        if HAS_ZERO:
            zc = tl.load(z_ptr + gofs, mask=gmask, other=8388608.0) - 8388608.0
        else:
            zc = tl.full([NG, BN], ZC, tl.float32)
        t0 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t1 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t2 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        t3 = tl.zeros([NG, GR, BN], dtype=tl.float32)
        for h in tl.static_range(2):                           # low, then high 16 bits of each word
            if h == 0:
                src = p
            else:
                src = p >> 16
            for j in tl.static_range(HALF):
                v = _dq(src, (8388608.0 + zc * (1 << (BITS * j)))[:, None, :], j, BITS)
                kx = prow * PACK + (h * HALF + j)                # [NG, GR] k of this code
                t0 += v * _xrow(x_ptr, kx, kmask, j, BITS)
                if M > 1:
                    t1 += v * _xrow(x_ptr + stride_xm, kx, kmask, j, BITS)
                if M > 2:
                    t2 += v * _xrow(x_ptr + 2 * stride_xm, kx, kmask, j, BITS)
                if M > 3:
                    t3 += v * _xrow(x_ptr + 3 * stride_xm, kx, kmask, j, BITS)
        acc0 += tl.sum(tl.sum(t0, axis=1) * s, axis=0)
        if M > 1:
            acc1 += tl.sum(tl.sum(t1, axis=1) * s, axis=0)
        if M > 2:
            acc2 += tl.sum(tl.sum(t2, axis=1) * s, axis=0)
        if M > 3:
            acc3 += tl.sum(tl.sum(t3, axis=1) * s, axis=0)
    _finish(acc0, 0, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 1:
        _finish(acc1, 1, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 2:
        _finish(acc2, 2, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 3:
        _finish(acc3, 3, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if REDUCE == 2:
        _fixup(pid_n, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, N, M, SPLIT, BN)


def default_config(m: int, n: int, k: int, bits: int) -> SkinnyConfig:
    """Tiles from the H100 sweep (`bench/kernels.py --skinny-sweep`, docs/PERFORMANCE.md): BN 128, BK 256,
    4 warps, split-K for ~8 programs per SM (8192² 25.2 us, 4096x28672 38.5 us, 14336x4096 22.4 us)."""
    return SkinnyConfig(128, 256, 0, 4, 1, 2)


def _tile_group(group: int, block_k: int) -> tuple[int, int]:
    """(GT, NG): K rows of one tile group (a power of two <= group that divides it) and groups per step."""
    gt = 1
    while gt * 2 <= min(group, block_k) and group % (gt * 2) == 0:
        gt *= 2
    return gt, max(1, block_k // gt)


def skinny_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int, bits: int, cfg: SkinnyConfig | None = None, zero_const: int = 0) -> torch.Tensor:
    """x: [M <= 4, K] fp16/bf16; packed [K/PACK, N] int32; scale [G, N]; zero [G, N] (2**23 + z), or None
    when every zero point is `zero_const` -> [M, N] x.dtype. bits is the container width (4 or 8)."""
    m, k = x.shape
    assert 1 <= m <= MAX_M
    n = packed.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits)
    gt, ng = _tile_group(group, cfg.block_k)
    bk = gt * ng
    n_tiles = cdiv(n, cfg.block_n)
    k_steps = cdiv(k, bk)
    split = cfg.split_k
    if split == 0:  # about eight programs per SM
        split = max(1, min(k_steps, cdiv(8 * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    reduce = 0 if split == 1 else cfg.reduce
    y, ws, cnt = split_k_buffers(x, n, split, reduce, n_tiles)
    _skinny_wna16_kernel[(n_tiles, split)](
        x, packed, scale, zero if zero is not None else scale, y, ws if ws is not None else y,
        cnt if cnt is not None else packed, n, k, x.stride(0), group,
        k_per_split, M=m, BITS=bits, BN=cfg.block_n, GT=gt, NG=ng, HAS_ZERO=zero is not None,
        ZC=float(zero_const), REDUCE=reduce, SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype) if reduce == 1 else y


__all__ = ["MAX_M", "SkinnyConfig", "default_config", "skinny_wna16"]
