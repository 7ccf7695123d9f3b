"""Triton W4A16/W8A16 grouped-int GEMM (imported lazily: needs triton).

Layout made by `pack_int_weight` (in `wna16.py`): codes, made unsigned, are packed PACK per int32
along K — packed: [K/PACK, N] int32, value of k = PACK*j + i in bits [BITS*i, BITS*i + BITS) of row j.
scale: [G, N] fp32, or fp16 / bf16 where that holds the scales exactly (`pack_int_weight`'s compact form: read
as fp32); zero: [G, N] uint8 zero points (compact), or fp32 holding 2**23 + zero, or None when every zero
point is one constant (symmetric checkpoints: the kernels take it as a number, no [G, N] array is held or read).

Dequantization avoids int->float conversion instructions: (q | 0x4B000000) reinterpreted as fp32 is
exactly 2**23 + q, so w = (bits_as_f32 - (2**23 + zero)) * scale is two float ops per element.
Each program handles BLOCK_N outputs over a K slice (split-K when there are too few tiles); the PACK
sub-rows of a packed tile are handled one at a time so no reshape/interleave is needed:
  M == 1 (USE_DOT False): fp32 FMA into a [BLOCK_K/PACK, BLOCK_N] accumulator, reduced once at the end;
  M > 1  (USE_DOT True):  PACK tl.dot calls of [BLOCK_M, BLOCK_K/PACK] x [BLOCK_K/PACK, BLOCK_N].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, pick_split_k


@dataclass(frozen=True)
class WNA16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0          # 0 = choose from the grid size
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def load_scale_zero(s_ptr, z_ptr, offs, mask, ZC, HAS_ZERO: tl.constexpr, OFFSET: tl.constexpr):
    """The scales (fp32, from an fp32 / fp16 / bf16 array) and the zero points (fp32: from uint8 z, or fp32 2**23 + z;
    with OFFSET the float offsets) at offs; without HAS_ZERO every zero point is ZC and z_ptr is not read."""
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO and z_ptr.dtype.element_ty == tl.uint8:     # the compact zero points: z itself
        z = tl.load(z_ptr + offs, mask=mask, other=0).to(tl.float32)
    elif HAS_ZERO:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0 if OFFSET else 8388608.0) - (0.0 if OFFSET else 8388608.0)
    else:
        z = tl.zeros(s.shape, tl.float32) + ZC
    return s, z


@triton.jit
def _dequant(q, s, z, OFFSET: tl.constexpr):
    """q = 2**23 + code as int32 bits, s, z (2**23 + zero, `_magic_zero`; OFFSET: the float offset o) -> fp32
    (code - zero) * s, or code * s + o."""
    if OFFSET:
        return (q.to(tl.float32, bitcast=True) - 8388608.0) * s + z
    return (q.to(tl.float32, bitcast=True) - z) * s


@triton.jit
def _magic_zero(z, OFFSET: tl.constexpr):
    """`load_scale_zero`'s zero point -> 2**23 + zero for `_dequant`, once per load (offsets unchanged)."""
    if OFFSET:
        return z
    return z + 8388608.0


@triton.jit
def _wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, c_ptr, M, N, K, stride_xm, stride_cm, G, ZC,
                  K_PER_SPLIT: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, ATOMIC: tl.constexpr,
                  DOT_F32: tl.constexpr, OFFSET: tl.constexpr = False, HAS_ZERO: tl.constexpr = True):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    RK: tl.constexpr = BLOCK_K // PACK                        # packed rows per K tile
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BN]
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # [BM]
    mask_m = offs_m < M
    offs_j = tl.arange(0, RK)                                 # [RK]
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc2 = tl.zeros([RK, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for kt in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kt
        kj = k0 + offs_j * PACK                               # [RK] first k of each packed row
        mask_w = (kj < k_end)[:, None] & mask_n[None, :]
        p = tl.load(p_ptr + (kj // PACK)[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        g = (kj // G)[:, None] * N + offs_n[None, :]          # group row of each packed row
        s, z = load_scale_zero(s_ptr, z_ptr, g, mask_w, ZC, HAS_ZERO, OFFSET)
        z = _magic_zero(z, OFFSET)
        for i in tl.static_range(PACK):
            q = ((p >> (BITS * i)) & MASK) | 0x4B000000
            w = _dequant(q, s, z, OFFSET)                      # [RK, BN] fp32
            kk = kj + i
            if USE_DOT:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                            mask=mask_m[:, None] & (kk < k_end)[None, :], other=0.0)  # [BM, RK]
                if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
                    acc += tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32))
                else:
                    acc += tl.dot(a, w.to(a.dtype))
            else:
                a1 = tl.load(x_ptr + kk, mask=kk < k_end, other=0.0).to(tl.float32)  # [RK]
                acc2 += w * a1[:, None]
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc2, axis=0)[None, :]                   # [1, BN] (M == 1, BLOCK_M == 1)
    c_off = offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptr + c_off, out, mask=c_mask)
    else:
        tl.store(c_ptr + c_off, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def zero_args(scale: torch.Tensor, zero: torch.Tensor | None, zero_const: float | None, offset: bool,
              fn: str) -> tuple[torch.Tensor, float]:
    """(the zero pointer the kernel gets, ZC): a kernel without a zero array needs the constant zero point."""
    if zero is None and (zero_const is None or offset):
        raise ValueError(f"{fn}: zero is None, so pass zero_const (the zero point every code shares: 2**(bits-1) for "
                         f"symmetric signed codes, 0 for unsigned ones); offsets (offset=True) need the [G, N] array")
    return (scale if zero is None else zero), float(zero_const or 0.0)


def default_config(m: int, n: int, k: int, bits: int) -> WNA16Config:
    """Tile shapes by batch size (tuned on the H100, see docs/PERFORMANCE.md)."""
    if m == 1:  # 27.5 us at 8192x8192 (64 int4 + 128 scale rows per packed tile)
        return WNA16Config(1, 32, 1024 if bits == 4 else 512, 0, 8, 1)
    if m <= 16:
        return WNA16Config(16, 128, 256 if bits == 4 else 128, 0, 4, 2)
    if m <= 32:
        return WNA16Config(32, 128, 256 if bits == 4 else 128, 0, 4, 2)
    if m <= 64:
        return WNA16Config(64, 128, 128 if bits == 4 else 64, 0, 4, 3)
    return WNA16Config(128, 128, 128 if bits == 4 else 64, 1, 8, 3)


def wna16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int, bits: int, cfg: WNA16Config | None = None, offset: bool = False,
                 zero_const: float | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16; packed: [K/PACK, N] int32; scale [G, N] fp32/fp16/bf16; zero [G, N] fp32 (2**23 + z;
    `offset`: the float offsets o, w = q s + o), or None with every zero point `zero_const` -> [M, N] x.dtype.

    bits is the container width (4 or 8).
    """
    m, k = x.shape
    pack = 32 // bits
    n = packed.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits)
    use_dot = m > 1
    bm = cfg.block_m if use_dot else 1
    tiles = cdiv(n, cfg.block_n) * cdiv(m, bm)
    k_steps = cdiv(k, cfg.block_k)
    split = cfg.split_k or pick_split_k(tiles, k_steps, num_sms(x.device.index or 0))
    k_per_split = cdiv(k_steps, split) * cfg.block_k
    split = cdiv(k, k_per_split)
    atomic = split > 1
    out = (torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic
           else torch.empty((m, n), device=x.device, dtype=x.dtype))
    grid = (cdiv(n, cfg.block_n), split, cdiv(m, bm))
    zp, zc = zero_args(scale, zero, zero_const, offset, "wna16_matmul")
    _wna16_kernel[grid](x, packed, scale, zp, out, m, n, k, x.stride(0), out.stride(0), group, zc, k_per_split,
                        BITS=bits, PACK=pack, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=use_dot,
                        ATOMIC=atomic, DOT_F32=interpret_mode(), OFFSET=offset, HAS_ZERO=zero is not None,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype) if atomic else out


@triton.jit
def _wna16_dequant_kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, G, ZC, BITS: tl.constexpr, PACK: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr = False,
                          HAS_ZERO: tl.constexpr = True):
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)     # packed rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_j < K // PACK)[:, None] & (offs_n < N)[None, :]
    p = tl.load(p_ptr + offs_j[:, None] * N + offs_n[None, :], mask=mask, other=0)
    g = (offs_j * PACK // G)[:, None] * N + offs_n[None, :]
    s, z = load_scale_zero(s_ptr, z_ptr, g, mask, ZC, HAS_ZERO, OFFSET)
    z = _magic_zero(z, OFFSET)
    for i in tl.static_range(PACK):
        q = ((p >> (BITS * i)) & ((1 << BITS) - 1)) | 0x4B000000
        w = _dequant(q, s, z, OFFSET)
        kk = offs_j * PACK + i
        tl.store(w_ptr + kk[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def wna16_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, bits: int,
                     dtype: torch.dtype, offset: bool = False, zero_const: float | None = None) -> torch.Tensor:
    """packed [K/PACK, N] int32 -> w [K, N] dtype (row-major; use as F.linear(x, w.t())); scale / zero as in
    `wna16_matmul` (`offset`: zero holds the float offsets o, w = q s + o; None: every zero point `zero_const`)."""
    pack = 32 // bits
    kp, n = packed.shape
    w = torch.empty((kp * pack, n), device=packed.device, dtype=dtype)
    grid = (cdiv(kp, 16), cdiv(n, 128))
    zp, zc = zero_args(scale, zero, zero_const, offset, "wna16_dequantize")
    _wna16_dequant_kernel[grid](packed, scale, zp, w, n, kp * pack, group, zc, BITS=bits, PACK=pack, BLOCK_J=16,
                                BLOCK_N=128, OFFSET=offset, HAS_ZERO=zero is not None, num_warps=4)
    return w
