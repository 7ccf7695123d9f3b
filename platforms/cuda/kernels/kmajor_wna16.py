"""M <= 16 W4A16/W8A16 on a K-major packed layout: each program streams whole rows of codes (imported lazily).

Layout (made by `pack_kmajor` from the [K/PACK, N] words of `pack_int_weight`): packed [N, K/PACK]
int32, word j of row n holds k = PACK*j + i at bits [BITS*i, BITS*i + BITS) — the same words, transposed,
so a program owning BN rows reads BN runs of K/2 (4-bit) bytes front to back, the access pattern of a
bf16 GEMV, instead of 256-512 B pieces 32 KB apart (the [K/8, N] layout: ~1.4 TB/s at best on the H100).
scale [G, N] fp32, zero [G, N] fp32 holding 2**23 + zero (as `pack_int_weight`).

Per K step a program loads p [BN, BK/PACK] (16 B per thread along K), dequantizes it to the compute
dtype, and with operands swapped (y^T = W^T x^T) multiplies the [BN, BK] tile by x^T [BK, 16] on the
tensor cores (DOT) or, for M == 1, by fp32 FMA into a [BN, BK] accumulator reduced once at the end.
Unpack: 4-bit on the GPU goes through `tc_wna16._unpack8` (PRMT + LOP3 + 2 FMA2 per pair of codes);
8-bit and the interpreter use plain Triton ops. The PACK code planes are joined so that the [BN, RK, PACK]
tile flattens to k = PACK*j + i along its rows: no permute, nothing through shared memory.
Scales: one [BN] vector per step when the step lies in one group (G % BK == 0), else one per word.
Split-K partials: each split stores fp32, the last program on a per-tile counter sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.tc_wna16 import _unpack8

MAX_M = 16


@dataclass(frozen=True)
class KmConfig:
    block_n: int = 64
    block_k: int = 256
    waves: int = 4            # split-K to about this many programs per SM (0: no split)
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = True          # tensor cores; False: fp32 FMA GEMV (M == 1 only)


@triton.jit
def _planes8(p, z, s, DT: tl.constexpr):
    """Plain-Triton 8-bit unpack: p [BN, RK] int32, z/s broadcastable fp32 -> 4 planes of (q - z) * s."""
    c0 = ((((p >> 0) & 255).to(tl.float32) - z) * s).to(DT)
    c1 = ((((p >> 8) & 255).to(tl.float32) - z) * s).to(DT)
    c2 = ((((p >> 16) & 255).to(tl.float32) - z) * s).to(DT)
    c3 = ((((p >> 24) & 255).to(tl.float32) - z) * s).to(DT)
    return c0, c1, c2, c3


@triton.jit(do_not_specialize=["M"])
def _km_wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, G,
                     K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                     ROW_SCALE: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr, IS_BF16: tl.constexpr,
                     DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    RK: tl.constexpr = BK // PACK
    MAG: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    DT = x_ptr.dtype.element_ty
    KW = K // PACK
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_r = tl.arange(0, RK)
    offs_k = tl.arange(0, BK)
    offs_m = tl.arange(0, BM)
    mask_m = offs_m < M
    if DOT:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kt
        kw = k0 // PACK + offs_r                                            # [RK] word index along K
        wmask = mask_n[:, None] & (kw < KW)[None, :]
        p = tl.load(p_ptr + offs_n[:, None] * KW + kw[None, :], mask=wmask, other=0)  # [BN, RK]
        if ROW_SCALE:  # the whole step lies in group k0 // G
            g = (k0 // G) * N + offs_n
            s = tl.load(s_ptr + g, mask=mask_n & (k0 < K), other=0.0)[:, None]
            z = tl.load(z_ptr + g, mask=mask_n & (k0 < K), other=8388608.0)[:, None] - 8388608.0
        else:          # one group per word (G % PACK == 0)
            g = ((kw * PACK) // G)[None, :] * N + offs_n[:, None]
            s = tl.load(s_ptr + g, mask=wmask, other=0.0)
            z = tl.load(z_ptr + g, mask=wmask, other=8388608.0) - 8388608.0
        if BITS == 4:
            nz = tl.broadcast_to((-(z + MAG)).to(DT), [BN, RK])
            sb = tl.broadcast_to(s.to(DT), [BN, RK])
            c0, c1, c2, c3, c4, c5, c6, c7 = _unpack8(p, nz, sb, ASM, IS_BF16)
            w = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
        else:
            c0, c1, c2, c3 = _planes8(p, z, s, DT)
            w = tl.join(tl.join(c0, c2), tl.join(c1, c3))
        w = tl.reshape(w, [BN, BK])                                         # column PACK*j + i = k - k0
        kk = k0 + offs_k
        if DOT:
            a = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                        mask=mask_m[None, :] & (kk < K)[:, None], other=0.0)  # [BK, BM]
            if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
                acc += tl.dot(w.to(tl.float32), a.to(tl.float32))
            else:
                acc += tl.dot(w, a)
        else:
            a1 = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)  # [BK] (M == 1)
            acc += w.to(tl.float32) * a1[None, :]
    if DOT:
        out = acc
    else:
        out = tl.broadcast_to(tl.sum(acc, axis=1)[:, None], [BN, BM])
    ym = offs_m[None, :] * N + offs_n[:, None]                              # [BN, BM] -> y[m, n]
    ymask = mask_m[None, :] & mask_n[:, None]
    if SPLIT == 1:
        tl.store(y_ptr + ym, out.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(ws_ptr + pid_k * M * N + ym, out, mask=ymask)
        tl.debug_barrier()                                                  # every thread's partial is stored
        cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tot = tl.zeros([BN, BM], dtype=tl.float32)
            for sp in range(SPLIT):
                tot += tl.load(ws_ptr + sp * M * N + ym, mask=ymask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + ym, tot.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


def pack_kmajor(packed: torch.Tensor) -> torch.Tensor:
    """[K/PACK, N] int32 words (`pack_int_weight`) -> [N, K/PACK] int32, K-major (same words)."""
    return packed.t().contiguous()


def default_config(m: int, n: int, k: int, bits: int) -> KmConfig:
    """Tiles per (M, N, K) from the H100 sweep (bench/_wna16_sweep.py; docs/PERFORMANCE.md)."""
    return KmConfig()


def km_block_k(cfg: KmConfig, group: int) -> int:
    """The step's K rows: the config's, halved until it divides a group or a group divides it."""
    bk = cfg.block_k
    while bk > 64 and group % bk and bk % group:
        bk //= 2
    return bk


def km_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
             bits: int, cfg: KmConfig | None = None, asm: bool | None = None) -> torch.Tensor:
    """x [M <= 16, K] fp16/bf16; packed [N, K/PACK] int32 (`pack_kmajor`); scale, zero (2**23 + z) [G, N]
    fp32 -> [M, N] x.dtype. bits is the container width (4 or 8); group % PACK == 0."""
    m, k = x.shape
    n = packed.shape[0]
    assert 1 <= m <= MAX_M and bits in (4, 8) and group % (32 // bits) == 0
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits)
    if m > 1 and not cfg.dot:
        raise ValueError("the FMA GEMV (dot=False) takes one row; use dot=True for M > 1")
    interp = interpret_mode()
    if asm is None:
        asm = not interp
    bk = km_block_k(cfg, group)
    n_tiles = cdiv(n, cfg.block_n)
    k_steps = cdiv(k, bk)
    split = 1 if cfg.waves == 0 else max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else packed
    _km_wna16_kernel[(n_tiles, split)](
        x, packed, scale, zero, y, ws, cnt, m, n, k, x.stride(0), group, k_per_split, split,
        BITS=bits, BN=cfg.block_n, BK=bk, BM=16, ROW_SCALE=group % bk == 0, DOT=cfg.dot, ASM=asm and bits == 4,
        IS_BF16=x.dtype == torch.bfloat16, DOT_F32=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "KmConfig", "default_config", "km_block_k", "km_wna16", "pack_kmajor"]
