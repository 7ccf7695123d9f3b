"""M <= 4 W4A16/W8A16 GEMV on a plane-interleaved K-major layout: all element-wise, no dot (imported lazily).

Layout (`pack_planar`): packed [N, K/PACK] int32; the words of a row come in blocks of P; within block b,
code slot i (bits [BITS*i, BITS*i + BITS)) of word j holds k = b*PACK*P + i*P + j. So slot i of a
[BN, P] tile is a contiguous K segment: its activations are one contiguous [P] load, and the tile is
used as loaded — no join / reshape / permute that would send it through shared memory (which held the
K-major tensor-core kernel at ~31 µs for 8192²). A program owns BN rows and streams them front to back.

Per code: LOP3 ((w & MASK << BITS*j) | 0x4B000000 read as fp32 is 2**23 + q * 2**(BITS*j), codes kept
in place in each 16-bit half), FADD (- (2**23 + z * 2**(BITS*j))), FMUL (* s * 2**-(BITS*j), exact) and
one FFMA per activation row into a [BN, P] fp32 accumulator, reduced once at the end. Scale and zero:
one [BN] vector per slot and step when a group holds whole P-segments (G % P == 0), else per element.
Split-K partials are combined in-launch by the last program per column tile (`skinny_wna16._fixup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_k_buffers
from quantrt.platforms.cuda.kernels.skinny_wna16 import _finish, _fixup

MAX_M = 4
PLANE_WORDS = (128, 64, 32, 16, 8)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    waves: int = 8            # split-K to about this many programs per SM (0: no split)
    num_warps: int = 4
    num_stages: int = 2


def plane_words(k: int, bits: int, most: int = 128) -> int:
    """P: the largest of 128..8 (at most `most`) with K a multiple of PACK * P; 0 if none."""
    pack = 32 // bits
    return next((p for p in PLANE_WORDS if p <= most and k % (pack * p) == 0), 0)


def pack_planar(packed: torch.Tensor, bits: int, p: int) -> torch.Tensor:
    """[K/PACK, N] int32 (`pack_int_weight`, code i of word j is k = PACK*j + i) -> [N, K/PACK] int32
    with code slot i of word j in block b holding k = b*PACK*P + i*P + j."""
    pack = 32 // bits
    kw, n = packed.shape
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)   # [K/PACK, PACK, N]
    codes = codes.reshape(kw * pack, n).t()                                     # [N, K] (k = PACK*j + i)
    blocks = codes.reshape(n, kw // p, pack, p).permute(0, 1, 3, 2)             # [N, B, j, i]
    out = (blocks << shifts).sum(-1).reshape(n, kw)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).contiguous()


@triton.jit
def _xrow(x_ptr, kk, mk):
    return tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _slot(src, s, z, J: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr):
    """(q - z) * s in fp32 for the code at bits [BITS*J, BITS*J + BITS) of src (z unused without HAS_ZERO)."""
    SH: tl.constexpr = 1 << (BITS * J)
    MSK: tl.constexpr = ((1 << BITS) - 1) << (BITS * J)
    v = ((src & MSK) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q * SH, exact
    if HAS_ZERO:
        c = 8388608.0 + z * SH
    else:
        c = 8388608.0 + ZC * SH
    return (v - c) * (s * (1.0 / SH))


@triton.jit
def _gemv_wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, G,
                       K_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
                       P: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                       SEG_GROUP: tl.constexpr, REDUCE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    SB: tl.constexpr = PACK * P                                   # codes per step (one block)
    KW = K // PACK
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_j = tl.arange(0, P)
    acc0 = tl.zeros([BN, P], dtype=tl.float32)
    acc1 = tl.zeros([BN, P], dtype=tl.float32)
    acc2 = tl.zeros([BN, P], dtype=tl.float32)
    acc3 = tl.zeros([BN, P], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, SB):
        k0 = k_start + kt
        kin = k0 < K                                              # K % SB == 0: a step is all in or all out
        wmask = mask_n[:, None] & kin
        p = tl.load(p_ptr + offs_n[:, None] * KW + (k0 // PACK + offs_j)[None, :], mask=wmask, other=0)
        for h in tl.static_range(2):                              # low, then high 16 bits of each word
            if h == 0:
                src = p
            else:
                src = p >> 16
            for jj in tl.static_range(HALF):
                kp = k0 + (h * HALF + jj) * P                     # first k of this slot's segment
                if SEG_GROUP:                                     # the segment lies in one group
                    g = (kp // G) * N + offs_n
                    s = tl.load(s_ptr + g, mask=mask_n & kin, other=0.0)[:, None]
                    z = s
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g, mask=mask_n & kin, other=8388608.0)[:, None] - 8388608.0
                else:
                    g = ((kp + offs_j) // G)[None, :] * N + offs_n[:, None]
                    s = tl.load(s_ptr + g, mask=wmask, other=0.0)
                    z = s
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g, mask=wmask, other=8388608.0) - 8388608.0
                wv = _slot(src, s, z, jj, BITS, HAS_ZERO, ZC)              # [BN, P] (q - z) * s, fp32
                kk = kp + offs_j
                mk = kk < K
                acc0 += wv * _xrow(x_ptr, kk, mk)
                if M > 1:
                    acc1 += wv * _xrow(x_ptr + stride_xm, kk, mk)
                if M > 2:
                    acc2 += wv * _xrow(x_ptr + 2 * stride_xm, kk, mk)
                if M > 3:
                    acc3 += wv * _xrow(x_ptr + 3 * stride_xm, kk, mk)
    _finish(tl.sum(acc0, axis=1), 0, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 1:
        _finish(tl.sum(acc1, axis=1), 1, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 2:
        _finish(tl.sum(acc2, axis=1), 2, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if M > 3:
        _finish(tl.sum(acc3, axis=1), 3, pid_n, pid_k, y_ptr, ws_ptr, offs_n, mask_n, N, REDUCE, M)
    if REDUCE == 2:
        _fixup(pid_n, y_ptr, ws_ptr, cnt_ptr, offs_n, mask_n, N, M, SPLIT, BN)


def default_config(m: int, n: int, k: int, bits: int) -> GemvConfig:
    """Tiles per (M, N, K) from the H100 sweep (bench/_skinny_sweep.py; docs/PERFORMANCE.md)."""
    return GemvConfig()


def gemv_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group: int, bits: int, p: int, cfg: GemvConfig | None = None, zero_const: int = 0) -> torch.Tensor:
    """x [M <= 4, K] fp16/bf16; packed [N, K/PACK] int32 (`pack_planar` with block P); scale [G, N] fp32;
    zero [G, N] (2**23 + z) or None when every zero point is `zero_const` -> [M, N] x.dtype."""
    m, k = x.shape
    n = packed.shape[0]
    pack = 32 // bits
    assert 1 <= m <= MAX_M and k % (pack * p) == 0
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits)
    sb = pack * p
    n_tiles = cdiv(n, cfg.block_n)
    k_steps = k // sb
    split = 1 if cfg.waves == 0 else max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * sb
    split = cdiv(k, k_per_split)
    reduce = 0 if split == 1 else 2
    y, ws, cnt = split_k_buffers(x, n, split, reduce, n_tiles)
    _gemv_wna16_kernel[(n_tiles, split)](
        x, packed, scale, zero if zero is not None else scale, y, ws if ws is not None else y,
        cnt if cnt is not None else packed, n, k, x.stride(0), group, k_per_split, split,
        M=m, BITS=bits, P=p, BN=cfg.block_n, HAS_ZERO=zero is not None, ZC=float(zero_const),
        SEG_GROUP=group % p == 0, REDUCE=reduce, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "GemvConfig", "default_config", "gemv_wna16", "pack_planar", "plane_words"]
