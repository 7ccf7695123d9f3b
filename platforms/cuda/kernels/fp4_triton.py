"""Triton NVFP4 / MXFP4 weight-only GEMM for Hopper (no FP4 tensor cores): e2m1 dequantized in registers.

Imported lazily (needs triton). Layout made by `pack_micro_weight` (in `fp4.py`):
  packed [K/8, N] int32: code of k = 8*j + i (4 bits, e2m1, sign in bit 3) in bits [4i, 4i+4) of row j;
  scale  [K/B, N]: uint8 e8m0 bytes (SCALE_KIND 0, 2**(b-127)), uint8 e4m3 bytes (1) or fp32 (2);
  post: the global scale, one fp32 constant multiplied into the fp32 accumulator.
Decoding needs no table and no int->float convert of the code: the three e2m1 magnitude bits placed at
fp16 bits [9, 12) and the sign at bit 15 read as fp16 exactly e2m1 * 2**-14 (subnormal 0.5 included);
codes i and i + 4 (bits 4i and 4i + 16) are placed by the same 32-bit ops as an fp16 pair;
e4m3 scale bytes placed the same way at bits [7, 15) read as e4m3 * 2**-8; e8m0 is (b << 23) as fp32.
The decoded scale carries the compensating powers of two, so a dequantized weight is its true value.
B % 8 == 0, so a packed row lies in one scale block.
  M == 1 (USE_DOT False): the 8 codes of a packed row are summed against x in fp32, then multiplied by
    their block scale once (one FMA per weight); split-K partials reduced by the last program to arrive.
  1 < M < DEQUANT_MIN_M (USE_DOT True): per plane i a [BM, BK/8] x [BK/8, BN] tl.dot with the weight
    tile dequantized to the compute dtype (e2m1 x e4m3/e8m0 products are exact in bf16/fp16); for
    M <= 16 with swapped operands (SWAP: [BN, BK/8] x [BK/8, 16], the weight plane as the A operand).
  M >= DEQUANT_MIN_M: `fp4_dequantize` to [K, N] then cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k


@dataclass(frozen=True)
class Fp4Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0          # 0 = about `waves` programs per SM
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 4
    swap: bool = False        # M > 1: y^T = W^T x^T (dequantized weight as the register A operand)


@triton.jit
def _e2m1(p, IDX: tl.constexpr):
    """Code i (bits [4i, 4i+4)) of int32 words p -> fp32 e2m1 value * 2**-14."""
    n = p >> (4 * IDX)
    h = ((n & 7) << 9) | ((n & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_pair(p, IDX: tl.constexpr):
    """Codes IDX and IDX + 4 (IDX < 4) of int32 words p -> two fp32 tensors (e2m1 * 2**-14). Both codes
    are decoded by the same 32-bit integer ops as an fp16 pair (half the instructions of two `_e2m1`)."""
    x = p >> (4 * IDX)
    h2 = ((x & 0x00070007) << 9) | ((x & 0x00080008) << 12)
    lo = h2.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h2 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _scale(s_ptr, offs, mask, SCALE_KIND: tl.constexpr):
    """Block scales as fp32 times 2**14 (cancelling `_e2m1`'s 2**-14 exactly)."""
    if SCALE_KIND == 2:
        return tl.load(s_ptr + offs, mask=mask, other=0.0) * 16384.0
    b = tl.load(s_ptr + offs, mask=mask, other=0).to(tl.int32)
    if SCALE_KIND == 0:
        return (b << 23).to(tl.float32, bitcast=True) * 16384.0
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)                 # fp16 = e4m3 * 2**-8
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0


@triton.jit
def _fp4_kernel(x_ptr, p_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, post, M, N, K, stride_xm,
                K_PER_SPLIT: tl.constexpr, B: tl.constexpr, SCALE_KIND: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                DOT_F32: tl.constexpr, SWAP: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    RK: tl.constexpr = BK // 8
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_j = tl.arange(0, RK)
    if SWAP:  # y^T = W^T x^T: the dequantized [BN, BK/8] planes are the A operand (tc_wna16's lesson)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        acc2 = tl.zeros([RK, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kt in range(0, K_PER_SPLIT, BK):
        kj = k_start + kt + offs_j * 8                        # [RK] first k of each packed row
        mrow = kj < K
        if SWAP:
            mask_t = mask_n[:, None] & mrow[None, :]
            p = tl.load(p_ptr + (kj // 8)[None, :] * N + offs_n[:, None], mask=mask_t, other=0)   # [BN, RK]
            s = _scale(s_ptr, (kj // B)[None, :] * N + offs_n[:, None], mask_t, SCALE_KIND)
            for i in tl.static_range(4):
                c_lo, c_hi = _e2m1_pair(p, i)
                a = tl.load(x_ptr + offs_m[None, :] * stride_xm + (kj + i)[:, None],
                            mask=mask_m[None, :] & mrow[:, None], other=0.0)  # [RK, BM]
                b = tl.load(x_ptr + offs_m[None, :] * stride_xm + (kj + i + 4)[:, None],
                            mask=mask_m[None, :] & mrow[:, None], other=0.0)
                w = (c_lo * s).to(a.dtype)
                w2 = (c_hi * s).to(a.dtype)
                if DOT_F32:
                    acc += tl.dot(w.to(tl.float32), a.to(tl.float32))
                    acc += tl.dot(w2.to(tl.float32), b.to(tl.float32))
                else:
                    acc += tl.dot(w, a)
                    acc += tl.dot(w2, b)
        else:
            mask_w = mrow[:, None] & mask_n[None, :]
            p = tl.load(p_ptr + (kj // 8)[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
            s = _scale(s_ptr, (kj // B)[:, None] * N + offs_n[None, :], mask_w, SCALE_KIND)   # [RK, BN]
            if USE_DOT:
                for i in tl.static_range(4):
                    c_lo, c_hi = _e2m1_pair(p, i)
                    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kj + i)[None, :],
                                mask=mask_m[:, None] & mrow[None, :], other=0.0)  # [BM, RK]
                    b = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kj + i + 4)[None, :],
                                mask=mask_m[:, None] & mrow[None, :], other=0.0)
                    w = (c_lo * s).to(a.dtype)                    # exact for e4m3 / e8m0 scales
                    w2 = (c_hi * s).to(a.dtype)
                    if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
                        acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
                        acc += tl.dot(b.to(tl.float32), w2.to(tl.float32))
                    else:
                        acc += tl.dot(a, w)
                        acc += tl.dot(b, w2)
            else:
                t = tl.zeros([RK, BN], dtype=tl.float32)
                for i in tl.static_range(4):
                    c_lo, c_hi = _e2m1_pair(p, i)
                    a1 = tl.load(x_ptr + kj + i, mask=mrow, other=0.0).to(tl.float32)      # [RK]
                    a2 = tl.load(x_ptr + kj + i + 4, mask=mrow, other=0.0).to(tl.float32)
                    t += c_lo * a1[:, None] + c_hi * a2[:, None]
                acc2 += t * s
    if USE_DOT:
        out = acc * post
    else:
        out = (tl.sum(acc2, axis=0) * post)[None, :]          # [1, BN] (M == 1, BM == 1)
    if SWAP:
        ym = offs_m[None, :] * N + offs_n[:, None]            # acc is [BN, BM]
        ymask = mask_m[None, :] & mask_n[:, None]
    else:
        ym = offs_m[:, None] * N + offs_n[None, :]
        ymask = mask_m[:, None] & mask_n[None, :]
    store_split_k(out, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT)


def default_config(m: int, n: int, k: int) -> Fp4Config:
    """From the H100 sweep at 8192² (`bench/kernels.py --fp4-moe-attn`, docs/PERFORMANCE.md): M = 1 GEMV
    BN 128 / BK 256 (nvfp4 30.4, mxfp4 29.2 us eager); 2 <= M <= 16 swapped operands BN 128 / BK 128,
    4 warps, 3 stages (35-39 us; unswapped 41-51 us at its best tile, 68 us before)."""
    if m == 1:
        return Fp4Config(1, 128, 256, 0, 4, 2, 4)
    if m <= 16:
        return Fp4Config(16, 128, 128, 0, 4, 3, 4, True)
    return Fp4Config(32, 128, 256, 0, 4, 3, 2)


def fp4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, block: int, scale_kind: int,
               post: float, cfg: Fp4Config | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16; packed [K/8, N] int32; scale [K/B, N] (uint8 e8m0/e4m3 or fp32) -> [M, N]."""
    m, k = x.shape
    n = packed.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k)
    use_dot = m > 1
    bm = cfg.block_m if use_dot else 1
    n_tiles, m_tiles = cdiv(n, cfg.block_n), cdiv(m, bm)
    k_steps = cdiv(k, cfg.block_k)
    split = cfg.split_k or max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0),
                                                    n_tiles * m_tiles)))
    k_per_split = cdiv(k_steps, split) * cfg.block_k
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles * m_tiles) if split > 1 else packed
    _fp4_kernel[(n_tiles, split, m_tiles)](
        x, packed, scale, y, ws, cnt, post, m, n, k, x.stride(0), k_per_split, B=block, SCALE_KIND=scale_kind,
        BM=bm, BN=cfg.block_n, BK=cfg.block_k, SPLIT=split, USE_DOT=use_dot, DOT_F32=interpret_mode(),
        SWAP=use_dot and cfg.swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


@triton.jit
def _fp4_dequant_kernel(p_ptr, s_ptr, w_ptr, post, N, K, B: tl.constexpr, SCALE_KIND: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)     # packed rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_j < K // 8)[:, None] & (offs_n < N)[None, :]
    p = tl.load(p_ptr + offs_j[:, None] * N + offs_n[None, :], mask=mask, other=0)
    s = _scale(s_ptr, (offs_j * 8 // B)[:, None] * N + offs_n[None, :], mask, SCALE_KIND) * post
    for i in tl.static_range(4):
        c_lo, c_hi = _e2m1_pair(p, i)
        kk = offs_j * 8 + i
        tl.store(w_ptr + kk[:, None] * N + offs_n[None, :], (c_lo * s).to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(w_ptr + (kk + 4)[:, None] * N + offs_n[None, :], (c_hi * s).to(w_ptr.dtype.element_ty), mask=mask)


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block: int, scale_kind: int, post: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """packed [K/8, N] int32 -> w [K, N] dtype (use as F.linear(x, w.t()))."""
    kp, n = packed.shape
    w = torch.empty((kp * 8, n), device=packed.device, dtype=dtype)
    _fp4_dequant_kernel[(cdiv(kp, 16), cdiv(n, 128))](packed, scale, w, post, n, kp * 8, B=block,
                                                      SCALE_KIND=scale_kind, BLOCK_J=16, BLOCK_N=128,
                                                      num_warps=4)
    return w


__all__ = ["Fp4Config", "default_config", "fp4_dequantize", "fp4_matmul"]
