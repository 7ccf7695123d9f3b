"""Small-M (M <= 16) W4A16 GEMM on tensor cores: one [16, BK] x [BK, BN] dot per K step (imported lazily).

Same weight layout as `wna16_triton` (packed [K/8, N] int32, code i of row j is k = 8*j + i at bits 4i;
scale [G, N] fp32 or fp16 / bf16; zero [G, N] uint8 z or fp32 2**23 + z, or one constant). A K step of BK rows
lies inside one scale group (G % BK == 0), so scale and zero are one [BN] vector per step, or (MULTI, GGUF's
g32 / g64) spans BK / G whole groups: scale and zero are then loaded per packed row, [BK/8, BN], and go into the
same unpack.

Unpack (ASM True, GPU only): one `inline_asm_elementwise` call takes the packed words of two adjacent
columns, gathers their low (high) 16 bits into one register with PRMT, and per pair of codes does
  LOP3 (r >> 4i) & 0x000F000F | MAGIC      -> two fp16/bf16 values MAGIC + q (exact)
  FMA  v * 1 + (-(MAGIC + z))              -> q - z (exact)
  FMA  v * s + (-0)                        -> (q - z) * s rounded once to the compute dtype
(OFFSET, float offsets o in the zero array: z = 0 and the last FMA adds o, giving q * s + o rounded once)
i.e. about 2 instructions per 4-bit value instead of the fp32 path's 4-5. The 8 code planes are
interleaved with tl.join into [BK/8, BN, 8]; with SWAP (default) the [BN, BK] tile is the A operand of
tl.dot(W^T, x^T) and x^T [BK, 16] the B operand; unswapped, the [BK, BN] permute ran ~2.3x slower on the
H100. (The swapped tile still reaches the wgmma A registers through shared memory: the TTGIR holds a
local_alloc / local_load of it per step.)
H100 8192², BN 64 / BK 128 / 4 warps / 3 stages / ~4 programs per SM: 26.3 us at M = 2-16 (bf16 47 us);
with the next step's words prefetched into registers (`prefetch=1`, the M <= 16 default for 4-bit words)
24.4-25.1 us. Variants measured slower and removed (seventh pass, docs/PERFORMANCE.md; in git history):
TMA word tiles (26.8-36 us) at commit 16c8ff1, a Gluon kernel with the words unpacked in wgmma A-fragment
order (25.8-26.7 us) and its plain-Triton `frag` twin at 6c310fc, two steps prefetched (41-49 us) at 19d465a.
ASM False (interpreter, CPU tests) computes the same values with plain Triton ops.
Split-K partials: each split stores fp32 [M, BN], the last program on a per-tile counter sums them.
M = 17..256 (third pass): a third grid axis over BM-row tiles (BM 16..128); tiles per (M bucket, K, N)
are stored in `_TILES` from one offline sweep (`bench/_tc_sweep.py`), no autotuning at serving time. At
M = 33..64 a third round (`bench/kernels.py --rows-sweep out.json --rows-round3`) found the register prefetch
with 4 stages and ~2 programs per SM 9-17% faster (8192² M = 64: 35.6 vs 41.1 us).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode, num_sms, split_counters
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k
from quantrt.platforms.cuda.kernels.wna16_triton import load_scale_zero, zero_args

MAX_M = 256


@dataclass(frozen=True)
class TcConfig:
    block_n: int = 64
    block_k: int = 128
    split_k: int = 0          # 0 = about `waves` programs per SM
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4
    swap: bool = True         # dequantized weights as the register A operand (y^T = W^T x^T)
    block_m: int = 16         # rows of x per program; a grid axis covers M in BM tiles
    prefetch: int = 0         # 1: load the next K step's words/scales into registers before this step's unpack


def _unpack_asm(bf16: bool, offset: bool) -> str:
    """PTX for 8 packed registers (code pairs of two columns' words $8, $9): LOP3 into MAGIC + q, FMA by 1 with
    $10 = -(MAGIC + z) -> q - z (exact), FMA by the scale $11 plus -0 -> (q - z) * s, or (`offset`, z = 0)
    plus the float offset $12 -> q * s + o, rounded once."""
    ty, one, magic = ("bf16x2", "0x3F803F80", "0x43004300") if bf16 else ("f16x2", "0x3C003C00", "0x64006400")
    add = "$12" if offset else "nzr"
    lines = ["{", ".reg .b32 lo, hi, t, one, nzr;", f"mov.b32 one, {one};", "mov.b32 nzr, 0x80008000;",
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for i in range(8):
        r = "lo" if i < 4 else "hi"
        if i % 4:
            lines.append(f"shr.u32 {r}, {r}, 4;")
        lines += [f"lop3.b32 t, {r}, 0x000F000F, {magic}, 0xEA;", f"fma.rn.{ty} t, t, one, $10;",
                  f"fma.rn.{ty} ${i}, t, $11, {add};"]
    return "\n".join(lines + ["}"]) + "\n"


@triton.jit
def _unpack8(p, nz, s, o, ASM: tl.constexpr, IS_BF16: tl.constexpr, OFFSET: tl.constexpr):
    """p [R, BN] int32, nz = -(MAGIC + zero), s (and with OFFSET the float offsets o, zero 0) broadcast to [R, BN]
    in the compute dtype -> 8 tensors [R, BN] (code 0..7) of (q - z) * s, or q * s + o, in the compute dtype."""
    if ASM:  # (constexpr branches each end in a return: Triton types every path that can fall through)
        if OFFSET:
            if IS_BF16:
                return tl.inline_asm_elementwise(
                    _ASM_BF16_O, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [p, nz, s, o],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(
                    _ASM_F16_O, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [p, nz, s, o],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            if IS_BF16:
                return tl.inline_asm_elementwise(
                    _ASM_BF16_C, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [p, nz, s],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(
                    _ASM_F16_C, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [p, nz, s],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        MAG: tl.constexpr = 128.0 if IS_BF16 else 1024.0
        zf = nz.to(tl.float32) + MAG                         # -zero
        sf = s.to(tl.float32)
        of = o.to(tl.float32) if OFFSET else 0.0
        dt = s.dtype
        c0 = ((((p >> 0) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c1 = ((((p >> 4) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c2 = ((((p >> 8) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c3 = ((((p >> 12) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c4 = ((((p >> 16) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c5 = ((((p >> 20) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c6 = ((((p >> 24) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        c7 = ((((p >> 28) & 15).to(tl.float32) + zf) * sf + of).to(dt)
        return c0, c1, c2, c3, c4, c5, c6, c7


_ASM_BF16_C = tl.constexpr(_unpack_asm(True, False))
_ASM_F16_C = tl.constexpr(_unpack_asm(False, False))
_ASM_BF16_O = tl.constexpr(_unpack_asm(True, True))
_ASM_F16_O = tl.constexpr(_unpack_asm(False, True))

@triton.jit
def _load_step(p_ptr, s_ptr, z_ptr, k0, ok, N, G, offs_r, offs_n, mask_n, ZC, PACK: tl.constexpr,
               MULTI: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr):
    """The packed words [BK/PACK, BN] int32 and the scale (fp32) / zero of the K step at k0 (`ok` False: nothing is
    read from memory): the group's [BN] vectors, or (MULTI: BK spans several groups of G >= PACK rows) the [BK/PACK,
    BN] scale / zero of each packed row's group. OFFSET: z_ptr holds float offsets; no HAS_ZERO: every zero is ZC."""
    p = tl.load(p_ptr + (k0 // PACK + offs_r)[:, None] * N + offs_n[None, :], mask=ok & mask_n[None, :], other=0)
    if MULTI:
        g = (k0 + offs_r * PACK) // G                                           # [RK] group of each packed row
        s, z = load_scale_zero(s_ptr, z_ptr, g[:, None] * N + offs_n[None, :], ok & mask_n[None, :], ZC, HAS_ZERO,
                               OFFSET)
    else:
        s, z = load_scale_zero(s_ptr, z_ptr, k0 // G * N + offs_n, ok & mask_n, ZC, HAS_ZERO, OFFSET)
    return p, s, z


@triton.jit
def _mma_step(acc, p, s, z, x_ptr, k0, K, stride_xm, offs_m, mask_m, offs_k,
              RK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PACK: tl.constexpr, ASM: tl.constexpr,
              IS_BF16: tl.constexpr, DOT_F32: tl.constexpr, SWAP: tl.constexpr, MULTI: tl.constexpr,
              OFFSET: tl.constexpr):
    """acc ([BN, BM] swapped, else [BM, BN]) += the dequantized step (p, s, z) times x[:, k0:k0 + BK]; s, z are
    [BN] (one group per step) or [RK, BN] (MULTI: per packed row); OFFSET: z is the float offset o (w = q s + o)."""
    MAG: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    dt = x_ptr.dtype.element_ty
    if MULTI:
        zb = z
        sf = s
    else:
        zb = z[None, :]
        sf = s[None, :]
    if PACK == 8:
        if OFFSET:
            nz = tl.full([RK, BN], -MAG, tl.float32).to(dt)
            ob = tl.broadcast_to(zb.to(dt), [RK, BN])
        else:
            nz = tl.broadcast_to((-(zb + MAG)).to(dt), [RK, BN])
            ob = nz
        sb = tl.broadcast_to(sf.to(dt), [RK, BN])
        c0, c1, c2, c3, c4, c5, c6, c7 = _unpack8(p, nz, sb, ob, ASM, IS_BF16, OFFSET)
        w = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    elif OFFSET:  # 8-bit container, 4 codes per word: fp32 q * s + o rounded once
        d0 = (((p >> 0) & 255).to(tl.float32) * sf + zb).to(dt)
        d1 = (((p >> 8) & 255).to(tl.float32) * sf + zb).to(dt)
        d2 = (((p >> 16) & 255).to(tl.float32) * sf + zb).to(dt)
        d3 = (((p >> 24) & 255).to(tl.float32) * sf + zb).to(dt)
        w = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    else:  # 8-bit container, 4 codes per word: fp32 (q - z) * s rounded once (MAGIC + q is not exact in bf16)
        d0 = ((((p >> 0) & 255).to(tl.float32) - zb) * sf).to(dt)
        d1 = ((((p >> 8) & 255).to(tl.float32) - zb) * sf).to(dt)
        d2 = ((((p >> 16) & 255).to(tl.float32) - zb) * sf).to(dt)
        d3 = ((((p >> 24) & 255).to(tl.float32) - zb) * sf).to(dt)
        w = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    w = tl.reshape(w, [RK, BN, PACK])                     # [j, n, i]: code i of packed row j
    kk = k0 + offs_k
    if SWAP:  # y^T = W^T x^T: the dequantized tile is the register A operand, k = PACK j + i along its rows
        wt = tl.reshape(tl.permute(w, (1, 0, 2)), [BN, BK])
        a = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                    mask=mask_m[None, :] & (kk < K)[:, None], other=0.0)  # [BK, BM]
        if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
            acc += tl.dot(wt.to(tl.float32), a.to(tl.float32))
        else:
            acc += tl.dot(wt, a)
    else:
        w = tl.reshape(tl.permute(w, (0, 2, 1)), [BK, BN])  # row PACK j + i = k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(a, w)
    return acc


@triton.jit
def _tc_wna16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, G, ZC,
                     K_PER_SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     SPLIT: tl.constexpr, ASM: tl.constexpr, IS_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                     SWAP: tl.constexpr, PACK: tl.constexpr, PREFETCH: tl.constexpr, MULTI: tl.constexpr,
                     OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr = True):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    RK: tl.constexpr = BK // PACK
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_r = tl.arange(0, RK)
    offs_k = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    if PREFETCH:  # registers hold the next step's words while this step is unpacked and multiplied
        p, s, z = _load_step(p_ptr, s_ptr, z_ptr, k_start, k_start < K, N, G, offs_r, offs_n, mask_n, ZC, PACK,
                             MULTI, OFFSET, HAS_ZERO)
        for kt in range(0, K_PER_SPLIT, BK):
            k0 = k_start + kt
            k1 = k0 + BK
            pn, sn, zn = _load_step(p_ptr, s_ptr, z_ptr, k1, (k1 < K) & (kt + BK < K_PER_SPLIT), N, G,
                                    offs_r, offs_n, mask_n, ZC, PACK, MULTI, OFFSET, HAS_ZERO)
            acc = _mma_step(acc, p, s, z, x_ptr, k0, K, stride_xm, offs_m, mask_m, offs_k, RK, BN, BK, PACK, ASM,
                            IS_BF16, DOT_F32, SWAP, MULTI, OFFSET)
            p = pn
            s = sn
            z = zn
    else:
        for kt in range(0, K_PER_SPLIT, BK):
            k0 = k_start + kt
            p, s, z = _load_step(p_ptr, s_ptr, z_ptr, k0, k0 < K, N, G, offs_r, offs_n, mask_n, ZC, PACK, MULTI,
                                 OFFSET, HAS_ZERO)
            acc = _mma_step(acc, p, s, z, x_ptr, k0, K, stride_xm, offs_m, mask_m, offs_k, RK, BN, BK, PACK, ASM,
                            IS_BF16, DOT_F32, SWAP, MULTI, OFFSET)
    if SWAP:
        ym = offs_m[None, :] * N + offs_n[:, None]
        ymask = mask_m[None, :] & mask_n[:, None]
    else:
        ym = offs_m[:, None] * N + offs_n[None, :]
        ymask = mask_m[:, None] & mask_n[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_m, pid_n, pid_k, M, N, SPLIT)


def _steps_ok(bk: int, k: int, group: int, bits: int) -> bool:
    """A K step of bk rows lies inside one scale group, or spans whole groups of at least one packed word."""
    return k % bk == 0 and (group % bk == 0 or bk % group == 0 and group % (32 // bits) == 0)


def can_run(m: int, k: int, group: int, bits: int, cfg: TcConfig | None = None) -> bool:
    """True when this kernel applies: 4- or 8-bit container, M <= MAX_M, K steps inside one scale group or
    spanning whole groups (GGUF's 32)."""
    if bits not in (4, 8) or not 1 <= m <= MAX_M:
        return False
    return _steps_ok((cfg or default_config(m, 0, k, bits, group)).block_k, k, group, bits)


# (block_m, block_n, block_k, split_k, num_warps, num_stages, waves, swap[, prefetch]) per M bucket (upper bound),
# container bits and (K, N); a missing entry uses the bucket's `_DEFAULT_TILES` entry.
_DEFAULT_TILES: dict[int, tuple] = {
    16: (16, 64, 128, 0, 4, 3, 4, True, 1),   # next step prefetched: 8192² 26.2-26.6 -> 24.4-24.7 us at M = 2-16
    32: (32, 64, 128, 0, 4, 3, 4, True),
    64: (64, 64, 128, 0, 4, 4, 2, True, 1),   # third round (--rows-round3): 4 of 5 Llama shapes 9-17% faster
    128: (64, 128, 128, 0, 4, 3, 2, True),
    256: (128, 128, 128, 0, 8, 3, 2, False),
}
# H100 sweep 2026-11-23 (`python bench/kernels.py --rows-sweep`), CUDA-graph replay over weight copies
_TILES: dict[tuple[int, int, int, int], tuple] = {
    (32, 4, 4096, 4096): (32, 64, 128, 0, 4, 3, 4, True),  # 13.1 us
    (32, 4, 4096, 6144): (32, 64, 128, 0, 4, 4, 2, True),  # 17.9 us
    (32, 4, 4096, 28672): (32, 64, 128, 0, 4, 4, 2, True),  # 48.3 us
    (32, 4, 8192, 8192): (32, 64, 128, 0, 4, 3, 4, True),  # 29.5 us
    (32, 4, 14336, 4096): (32, 64, 128, 0, 4, 3, 4, True),  # 30.6 us
    (64, 4, 4096, 4096): (64, 64, 128, 0, 4, 4, 2, True, 1),  # 16.7 us (round 3; was 18.4)
    (64, 4, 4096, 6144): (64, 64, 128, 0, 4, 4, 2, True, 1),  # 21.3 us (round 3; was 25.4)
    (64, 4, 4096, 28672): (64, 128, 128, 0, 4, 4, 1, True, 1),  # 55.7 us (round 3 probe; was 64.2-65.2)
    (64, 4, 8192, 8192): (64, 64, 128, 0, 4, 4, 2, True, 1),  # 35.6 us (round 3; was 41.1)
    (64, 4, 14336, 4096): (64, 64, 128, 0, 4, 4, 2, True, 1),  # 37.3 us (round 3; was 41.1)
    (128, 4, 4096, 4096): (128, 64, 128, 0, 4, 3, 2, True),  # 28.8 us
    (128, 4, 4096, 6144): (128, 64, 128, 0, 4, 3, 2, True),  # 32.8 us
    (128, 4, 4096, 28672): (128, 64, 128, 0, 4, 3, 2, True),  # 83.7 us
    (128, 4, 8192, 8192): (128, 64, 128, 0, 4, 3, 2, True),  # 65.4 us
    (128, 4, 14336, 4096): (128, 64, 128, 0, 4, 3, 2, True),  # 63.9 us
    (256, 4, 4096, 4096): (128, 64, 128, 0, 4, 3, 2, True),  # 37.3 us
    (256, 4, 4096, 6144): (128, 64, 128, 0, 4, 3, 2, True),  # 49.2 us
    (256, 4, 4096, 28672): (256, 128, 128, 0, 8, 3, 1, True),  # 130.0 us
    (256, 4, 8192, 8192): (128, 64, 128, 0, 4, 3, 2, True),  # 98.1 us
    (256, 4, 14336, 4096): (128, 64, 128, 0, 4, 3, 2, True),  # 105.4 us
    (32, 8, 4096, 4096): (32, 128, 128, 0, 4, 3, 2, True),  # 17.0 us
    (32, 8, 4096, 6144): (32, 64, 128, 0, 4, 4, 2, True),  # 23.2 us
    (32, 8, 4096, 28672): (32, 64, 128, 0, 4, 3, 4, True),  # 70.0 us
    (32, 8, 8192, 8192): (32, 64, 128, 0, 4, 4, 2, True),  # 39.7 us
    (32, 8, 14336, 4096): (32, 64, 128, 0, 4, 4, 2, True),  # 40.3 us
    (64, 8, 4096, 4096): (64, 64, 128, 0, 4, 3, 4, True),  # 21.9 us
    (64, 8, 4096, 6144): (64, 64, 128, 0, 4, 3, 4, True),  # 35.8 us
    (64, 8, 4096, 28672): (64, 128, 128, 0, 4, 3, 2, True),  # 84.8 us
    (64, 8, 8192, 8192): (64, 64, 128, 0, 4, 3, 4, True),  # 64.8 us
    (64, 8, 14336, 4096): (64, 64, 128, 0, 4, 3, 4, True),  # 68.1 us
    (128, 8, 4096, 4096): (128, 64, 64, 0, 4, 4, 2, True),  # 34.3 us
    (128, 8, 4096, 6144): (128, 64, 64, 0, 4, 4, 2, True),  # 46.1 us
    (128, 8, 4096, 28672): (128, 64, 64, 0, 4, 4, 2, True),  # 119.0 us
    (128, 8, 8192, 8192): (128, 64, 128, 0, 8, 3, 2, True),  # 88.6 us
    (128, 8, 14336, 4096): (128, 64, 128, 0, 4, 4, 2, True),  # 92.8 us
    (256, 8, 4096, 4096): (64, 128, 128, 0, 4, 3, 2, True),  # 59.7 us
    (256, 8, 4096, 6144): (64, 128, 128, 0, 4, 3, 2, True),  # 82.9 us
    (256, 8, 4096, 28672): (64, 128, 128, 0, 4, 3, 2, True),  # 276.3 us
    (256, 8, 8192, 8192): (64, 128, 128, 0, 4, 3, 2, True),  # 156.2 us
    (256, 8, 14336, 4096): (64, 128, 128, 0, 4, 3, 2, True),  # 175.2 us
}
_BUCKETS = sorted(_DEFAULT_TILES)
# Groups below block_k (GGUF's 32), 4-bit words, M <= MULTI_GROUP_MAX_M: K steps of block_k span several groups
# (`QUANTRT_CUDA_TC_MULTI_GROUP=0`: block_k = the group, the path before). H100 g32 8192² M = 2 / 16 / 64:
# 33.3 / 34.0 / 41.8 us vs 40.2 / 41.1 / 66.8 (bf16 47-49); slower at M = 256 (134.5 vs 119.2) and for the
# 8-bit container (Q8_0 layout, M = 2-64: 58-73 vs 48-58), which keep one group per step.
MULTI_GROUP_STEPS = os.environ.get("QUANTRT_CUDA_TC_MULTI_GROUP", "1") != "0"
MULTI_GROUP_MAX_M = 64


def m_bucket(m: int) -> int:
    """Smallest stored M bucket holding m (16, 32, 64, 128 or 256)."""
    for b in _BUCKETS:
        if m <= b:
            return b
    raise ValueError(f"M={m} is above tc_wna16's MAX_M={MAX_M}; use the dequantize + cuBLAS path")


def default_config(m: int, n: int, k: int, bits: int = 4, group: int | None = None) -> TcConfig:
    """The swept tile of (M bucket, bits, K, N), else the bucket's default. With `group` below the tile's block_k
    (GGUF's 32, 64): 4-bit words at M <= MULTI_GROUP_MAX_M take K steps spanning block_k / group groups (a scale
    and zero per packed row); otherwise block_k drops to the largest power of two dividing the group (>= 32): a
    K step stays inside one scale group."""
    b = m_bucket(m)
    bm, *rest = _TILES.get((b, bits, k, n), _DEFAULT_TILES[b])
    prefetch = rest[7] if len(rest) > 7 and bits == 4 else 0   # measured for 4-bit words only
    cfg = TcConfig(*rest[:7], block_m=bm, prefetch=prefetch)
    if group is not None and group % cfg.block_k:
        if MULTI_GROUP_STEPS and bits == 4 and b <= MULTI_GROUP_MAX_M and _steps_ok(cfg.block_k, k, group, bits):
            return cfg
        bk = group & -group                                      # the largest power of two dividing the group
        if bk >= 32:
            cfg = replace(cfg, block_k=min(bk, cfg.block_k))
    return cfg


def tc_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
             cfg: TcConfig | None = None, asm: bool | None = None, bits: int = 4, offset: bool = False,
             zero_const: float | None = None) -> torch.Tensor:
    """x [M <= 256, K] fp16/bf16; packed [K/(32/bits), N] int32 (bits = container 4 or 8); scale [G, N]
    fp32/fp16/bf16; zero (2**23 + z) [G, N] fp32, or with `offset` the float offsets o [G, N] fp32 (w = q * s + o),
    or None with every zero point `zero_const` -> [M, N]."""
    m, k = x.shape
    n = packed.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k, bits, group)
    if not can_run(m, k, group, bits, cfg):
        raise ValueError(f"tc_wna16 needs a 4- or 8-bit container, 1 <= M <= {MAX_M}, K a multiple of block_k "
                         f"{cfg.block_k} and the group a multiple or a divisor of it (of at least {32 // bits} "
                         f"rows); got bits={bits}, M={m}, K={k}, group={group}")
    if cfg.prefetch not in (0, 1):
        raise ValueError(f"TcConfig.prefetch must be 0 (load each K step's words when it is used) or 1 (prefetch "
                         f"the next step's words into registers); got {cfg.prefetch!r}")
    zp, zc = zero_args(scale, zero, zero_const, offset, "tc_wna16")
    interp = interpret_mode()
    if asm is None:
        asm = not interp
    bk = cfg.block_k
    n_tiles = cdiv(n, cfg.block_n)
    m_tiles = cdiv(m, cfg.block_m)
    k_steps = k // bk
    split = cfg.split_k or max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0), n_tiles * m_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles * m_tiles) if split > 1 else packed
    _tc_wna16_kernel[(n_tiles, split, m_tiles)](
        x, packed, scale, zp, y, ws, cnt, m, n, k, x.stride(0), group, zc, k_per_split,
        BM=cfg.block_m, BN=cfg.block_n, BK=bk, SPLIT=split, ASM=asm, IS_BF16=x.dtype == torch.bfloat16,
        DOT_F32=interp, SWAP=cfg.swap, PACK=32 // bits, PREFETCH=bool(cfg.prefetch),
        MULTI=group < bk, OFFSET=offset, HAS_ZERO=zero is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["MAX_M", "TcConfig", "can_run", "default_config", "m_bucket", "tc_wna16"]
