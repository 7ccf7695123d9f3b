"""`gemv_w8`: the M = 1 W8A8 / fp8 weight-only GEMV on the dense-GEMV structure (sixth pass, docs/PERFORMANCE.md),
dispatched at M = 1 by `w8a8.py`; `skinny_fp8.py` holds the older M <= 4 kernel it falls back to where
`gemv_w8_why_not` says no (e.g. K not a multiple of 64). Imported lazily (needs Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import (
    cdiv,
    env_tiles,
    interpret_mode,
    num_sms,
    pdl_release_at,
    split_counters,
    stream_pdl,
)
from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_release, pdl_wait
from quantrt.platforms.cuda.kernels.skinny_fp8 import _amax_scale
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k
from quantrt.platforms.cuda.kernels.trace import t_done, t_rec, t_stamp, trace_slot

# The M = 1 GEMV on the dense-GEMV structure (sixth pass, docs/PERFORMANCE.md): `gemv_w8`.
#
# A program owns BN weight rows (output columns) and a K slice; each thread loads 16 consecutive codes of one row
# (16 bytes) per step, widens them to fp32 and multiplies them by the step's activation slice into a [BN, BK]
# fp32 accumulator (one FFMA per code, no per-step cross-thread sum), reduced once at the end. Few programs (no
# split-K at the Llama shapes), long contiguous K strips. Serves fp8 and int8 weights:
#   ACT 0 per token (amax of the row found by every program, in BKA-wide steps; x is L2-resident),
#   ACT 1 per 128-group (128x128 block weights): the step's group amax; the group's activation scale and weight
#         block scale are folded into the activation slice (a_k = code_k * sx_g * sw_g), so the dot stays plain,
#   ACT 2 static per tensor, ACT 3 weight-only (x as is, block scales folded into x like ACT 1).
# Codes are computed as `fake_quantize_act` does but with x * (1 / scale) for x / scale (Triton's fp32 division
# is the approximate `div.full` anyway), clamped (fp8 e4m3fn: by the saturating cvt), cast (int8: rounded half to
# even). The products are summed in fp32 per thread's 16 consecutive codes across all steps (ACC 1) and across
# threads once at the end, so a step is loads + widening + one FFMA per code (3.5 SASS instructions per fp8
# code at 16 x 512, 62-64 registers: 4-8 programs per SM in flight; the [BN, BK] accumulator of the first
# round needed 246 registers, one program per SM, and reached only ~82% of copy).
# WIDEN 1 (CUDA, not the interpreter): fp8 codes widen through inline PTX (`cvt.rn.f16x2.e4m3x2` per pair, then
# `cvt.f32.f16`; the same instructions as Triton's cast, which measured equal); int8 W8A8 (ACT 0/2) reads the
# weight as int32 words and multiplies them with the packed int8 activation codes by `dp4a` (4 code products per
# instruction, exact int32 sums; 1.1 SASS instructions per code). WIDEN 0: Triton's casts (interpreter, ROCm).
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvW8Config:
    block_n: int = 16
    block_k: int = 1024
    waves: int = 2            # split K only below about waves * SMs programs (a divisor of the K steps)
    num_warps: int = 8
    widen: int = 1            # 1: inline-PTX widening of the codes; 0: Triton's casts
    amax_block: int = 4096    # x elements per load step of the per-token amax pass
    acc: int = 1              # products summed per step (0), per thread's 16 codes (1, summed at the end), never (2)


@triton.jit
def _widen(w, WIDEN: tl.constexpr, IS_INT: tl.constexpr):
    """Codes [BN, BK] (fp8 e4m3 / int8) -> exact fp32."""
    if WIDEN == 0:
        return w.to(tl.float32)
    if IS_INT:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7540;
            prmt.b32 $1, t, 0x4B000000, 0x7541;
            prmt.b32 $2, t, 0x4B000000, 0x7542;
            prmt.b32 $3, t, 0x4B000000, 0x7543;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""", "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 lo, hi, h0, h1, h2, h3;
        .reg .b32 p01, p23;
        mov.b32 {lo, hi}, $4;
        cvt.rn.f16x2.e4m3x2 p01, lo;
        cvt.rn.f16x2.e4m3x2 p23, hi;
        mov.b32 {h0, h1}, p01;
        mov.b32 {h2, h3}, p23;
        cvt.f32.f16 $0, h0;
        cvt.f32.f16 $1, h1;
        cvt.f32.f16 $2, h2;
        cvt.f32.f16 $3, h3;
        }""", "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _codes32(a, inv, QMAX: tl.constexpr, IS_INT: tl.constexpr, SAT: tl.constexpr, W_DTYPE: tl.constexpr):
    """fp32 values of the activation codes of a * inv (inv = 1 / scale): clamped to +-QMAX (SAT: by the
    saturating fp8 cast itself), cast to fp8 or rounded half to even (int8)."""
    q = a * inv
    if not SAT:
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    if IS_INT:
        return (q + 12582912.0) - 12582912.0                                    # 1.5 * 2**23
    return q.to(W_DTYPE).to(tl.float32)


@triton.jit
def _act_slice(x_ptr, sw_ptr, k0, offs_k, inv, rb, KB, ACT: tl.constexpr, WSCALE: tl.constexpr,
               QMAX: tl.constexpr, IS_INT: tl.constexpr, SAT: tl.constexpr, W_DTYPE: tl.constexpr,
               BK: tl.constexpr):
    """The step's activation slice k0 + offs_k [BK] as fp32 multipliers of the weight codes (section comment)."""
    kk = k0 + offs_k
    a = tl.load(x_ptr + kk).to(tl.float32)
    if ACT == 1:
        g = tl.reshape(a, [BK // 128, 128])
        sg = tl.maximum(tl.max(tl.abs(g), axis=1), 1e-12) / QMAX                # [BK / 128]
        swg = tl.load(sw_ptr + rb * KB + k0 // 128 + tl.arange(0, BK // 128))  # block row rb's scales
        q = _codes32(g, (1.0 / sg)[:, None], QMAX, IS_INT, SAT, W_DTYPE) * (sg * swg)[:, None]
        return tl.reshape(q, [BK])
    if ACT == 3:
        if WSCALE == 2:
            return a * tl.load(sw_ptr + rb * KB + kk // 128)
        return a
    return _codes32(a, inv, QMAX, IS_INT, SAT, W_DTYPE)


@triton.jit
def _step(codes, x_ptr, sw_ptr, k0, offs_k, inv, rb, KB, ACT: tl.constexpr, WSCALE: tl.constexpr,
          QMAX: tl.constexpr, IS_INT: tl.constexpr, SAT: tl.constexpr, W_DTYPE: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr, WIDEN: tl.constexpr, ACC: tl.constexpr):
    """One K step: the products of the step's [BN, BK] codes with the activation slice, summed per ACC: over the
    whole step ([BN]; 0), per thread's 16 consecutive codes ([BN, BK / 16], no cross-thread sum; 1), or not."""
    w = _widen(codes, WIDEN, IS_INT)
    a = _act_slice(x_ptr, sw_ptr, k0, offs_k, inv, rb, KB, ACT, WSCALE, QMAX, IS_INT, SAT, W_DTYPE, BK)
    p = w * a[None, :]
    if ACC == 0:
        r = tl.sum(p, axis=1)
    elif ACC == 1:
        r = tl.sum(tl.reshape(p, [BN, BK // 16, 16]), axis=2)
    else:
        r = p
    return r


@triton.jit
def _x_words(x_ptr, k0, inv, QMAX: tl.constexpr, BK: tl.constexpr):
    """int8 codes of the activation slice k0 .. k0 + BK (x * inv clamped, rounded half to even), 4 per int32
    word in memory order [BK / 4]: the low byte of the float bits of q + 1.5 * 2**23 is q as int8."""
    a = tl.load(x_ptr + k0 + tl.arange(0, BK)).to(tl.float32)
    q = tl.minimum(tl.maximum(a * inv, -QMAX), QMAX) + 12582912.0
    b = tl.reshape(q.to(tl.int32, bitcast=True) & 0xFF, [BK // 4, 4])
    return tl.sum(b << (tl.arange(0, 4) * 8)[None, :], axis=1)                # disjoint bytes: sum == or


@triton.jit
def _dp4a(w, x, acc):
    """acc + the dot of the 4 signed bytes of w and of x, per int32 element."""
    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _codes_dot(w0, w_tile, x_ptr, sw_ptr, k_start, offs_k, inv, rb, KB, K_PER_SPLIT: tl.constexpr,
               ACT: tl.constexpr, WSCALE: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, SAT: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, WIDEN: tl.constexpr, ACC: tl.constexpr):
    """sum_k w[n, k] * a[k] over the program's K slice in fp32 -> [BN] (codes widened to fp32, one FFMA each);
    w0: step 0's codes, loaded by the caller."""
    W_DTYPE = w_tile.dtype.element_ty
    acc = _step(w0, x_ptr, sw_ptr, k_start, offs_k, inv, rb, KB, ACT, WSCALE, QMAX, IS_INT, SAT, W_DTYPE,
                BN, BK, WIDEN, ACC)
    for kt in range(BK, K_PER_SPLIT, BK):
        acc += _step(tl.load(w_tile + kt), x_ptr, sw_ptr, k_start + kt, offs_k, inv, rb, KB, ACT, WSCALE, QMAX,
                     IS_INT, SAT, W_DTYPE, BN, BK, WIDEN, ACC)
    if ACC == 0:
        y = acc
    else:
        y = tl.sum(acc, axis=1)                                                # [BN]
    return y


@triton.jit
def _gemv_w8_kernel(x_ptr, w_ptr, sw_ptr, sa_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KB, K_PER_SPLIT: tl.constexpr,
                    ACT: tl.constexpr, WSCALE: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                    SAT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKA: tl.constexpr, KT: tl.constexpr,
                    WIDEN: tl.constexpr, ACC: tl.constexpr, DP4A: tl.constexpr, SPLIT: tl.constexpr,
                    TRIGGER: tl.constexpr = False, PDL: tl.constexpr = False, tr_ptr=None,
                    tr_id=0, TRACE: tl.constexpr = False, EARLY_RELEASE: tl.constexpr = False):
    tr_rec = t_rec(tr_ptr, tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), TRACE)   # `trace` timelines
    t_stamp(tr_rec, 0, TRACE)
    # x [1, K]; w [N, K] codes, K contiguous; y [1, N]; ws [SPLIT, 1, N] fp32. K is a multiple of K_PER_SPLIT
    # (itself of BK): no K masks; rows past N are clamped, not stored. WSCALE 2: BN divides 128.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    rb = (pid_n * BN) // 128                                                   # block row (WSCALE 2)
    offs_k = tl.arange(0, BK)
    k_start = pid_k * K_PER_SPLIT
    w_tile = w_ptr + rows[:, None] * K + (k_start + offs_k)[None, :]           # [BN, BK] pointers of step 0
    if DP4A:  # int8 x int8: w holds 4 codes per int32 word [N, K / 4]; exact int32 sums of dp4a
        offs_w = tl.arange(0, BK // 4)
        wt = w_ptr + rows[:, None] * (K // 4) + (k_start // 4 + offs_w)[None, :]  # [BN, BK / 4] words of step 0
        w0 = tl.load(wt)
    else:
        w0 = tl.load(w_tile)
    pdl_release(EARLY_RELEASE)  # a small next op that reads before its own wait (`_common.pdl_release_at`)
    pdl_wait(PDL)  # step 0's weights are requested; x and the split-K buffers only after the kernel before ends
    t_stamp(tr_rec, 1, TRACE)
    sx = 1.0
    if ACT == 0:
        sx = _amax_scale(x_ptr, K, KT, BKA, QMAX)
    elif ACT == 2:
        sx = tl.load(sa_ptr)
    inv = 1.0 / sx
    if DP4A:
        xw = _x_words(x_ptr, k_start, inv, QMAX, BK)
        iacc = _dp4a(w0, tl.broadcast_to(xw[None, :], [BN, BK // 4]), tl.zeros([BN, BK // 4], dtype=tl.int32))
        for kt in range(BK, K_PER_SPLIT, BK):
            xw = _x_words(x_ptr, k_start + kt, inv, QMAX, BK)
            iacc = _dp4a(tl.load(wt + kt // 4), tl.broadcast_to(xw[None, :], [BN, BK // 4]), iacc)
        y = tl.sum(iacc, axis=1).to(tl.float32) * sx
    else:
        y = _codes_dot(w0, w_tile, x_ptr, sw_ptr, k_start, offs_k, inv, rb, KB, K_PER_SPLIT, ACT, WSCALE, QMAX, IS_INT,
                       SAT, BN, BK, WIDEN, ACC)
        if ACT == 0 or ACT == 2:
            y = y * sx
    t_stamp(tr_rec, 2, TRACE)
    pdl_release(TRIGGER)  # weights streamed: the next PDL op may be scheduled
    if WSCALE == 0:
        y = y * tl.load(sw_ptr)
    elif WSCALE == 1:
        y = y * tl.load(sw_ptr + rows)
    y2 = y[None, :]                                                            # [1, BN]
    ym = tl.arange(0, 1)[:, None] * N + offs_n[None, :]
    store_split_k(y2, y_ptr, ws_ptr, cnt_ptr, ym, (offs_n < N)[None, :], 0, pid_n, pid_k, 1, N, SPLIT)
    t_done(tr_rec, tr_id, TRACE)


def gemv_w8_why_not(n: int, k: int, act: int, wscale: int, is_int: bool = False,
                    cfg: GemvW8Config | None = None) -> str:
    """'' when `gemv_w8` computes this shape and mode, else the reason (the caller then uses `skinny_fp8`)."""
    cfg = cfg or gemv_w8_config(n, k, act, wscale, is_int)
    if k % 64:
        return f"K={k} is not a multiple of 64"
    if (act == 1 or wscale == 2) and (k % 128 or cfg.block_k % 128 or 128 % cfg.block_n):
        return f"128-blocks need K (={k}) and block_k (={cfg.block_k}) multiples of 128 and block_n dividing 128"
    if k % cfg.block_k:
        return f"K={k} is not a multiple of block_k={cfg.block_k}"
    return ""


# The H100 sweep's best tile per (K, N, scheme) (docs/PERFORMANCE.md, "Sixth pass"): (block_n, block_k, warps).
# scheme: tok = fp8 x fp8 per token or static, blk = 128-group activations, wo = weight-only, i8 = int8 W8A8.
_S = {"a": (16, 1024, 8), "b": (8, 1024, 4), "c": (8, 2048, 8), "d": (16, 512, 4)}
_TILES = {
    (8192, 8192): {"tok": _S["c"], "blk": _S["b"], "wo": _S["c"], "i8": _S["a"]},   # tok: 23.6 vs 24.3 us (PDL)
    (4096, 6144): {"tok": _S["b"], "blk": _S["b"], "wo": _S["b"], "i8": _S["b"]},
    (4096, 4096): {"tok": _S["c"], "blk": _S["c"], "wo": _S["c"], "i8": _S["c"]},
    (4096, 28672): {"tok": _S["d"], "blk": _S["b"], "wo": _S["d"], "i8": _S["d"]},
    (14336, 4096): {"tok": _S["c"], "blk": _S["c"], "wo": _S["c"], "i8": _S["c"]},
    # Qwen3-8B / Qwen2.5-7B down projections (24th session, fp8 per token; the other schemes keep the default):
    (12288, 4096): {"tok": _S["c"]},     # 18.96 vs 20.32 us
    (18944, 3584): {"tok": _S["d"]},     # 35.28 vs 37.17 us; 8 x 2048 (K in whole steps + a tail) took 26.65 alone
}                                        # but lost end to end (25th session, docs/PERFORMANCE.md)


def gemv_scheme(act: int, is_int: bool) -> str:
    """The `_TILES` column of a mode: i8, blk (ACT 1), wo (ACT 3) or tok (fp8 per token / static)."""
    return "i8" if is_int else "blk" if act == 1 else "wo" if act == 3 else "tok"


def gemv_w8_config(n: int, k: int, act: int, wscale: int, is_int: bool = False) -> GemvW8Config:
    """The tile for (N, K) and the mode from `_TILES`; other shapes 16 rows x 1024 codes, 8 warps (every scheme
    >= 1.8x bf16 at the Llama shapes in the sweep), K steps shortened to divide K.
    QUANTRT_CUDA_GEMV_W8_TILES="scheme:K:N=block_n:block_k:warps+..." overrides entries (A/B runs)."""
    scheme = gemv_scheme(act, is_int)
    env = env_tiles("QUANTRT_CUDA_GEMV_W8_TILES", "tok|blk|wo|i8:K:N",
                    lambda key: len(key) == 3 and key[0] in ("tok", "blk", "wo", "i8") and all(
                        isinstance(v, int) for v in key[1:]), "block_n:block_k:warps", (3,))
    bn, bk, warps = env.get((scheme, k, n)) or _TILES.get((k, n), {}).get(scheme, _S["a"])
    while k % bk and bk > 64:
        bk //= 2
    return GemvW8Config(bn, bk, 2, warps, 0 if interpret_mode() or torch.version.hip else 1, 4096, 1)


def gemv_w8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int, qmax: float,
            act_scale: torch.Tensor | None = None, cfg: GemvW8Config | None = None, release_early: bool = False
            ) -> torch.Tensor:
    """x: [1, K] fp16/bf16; w: [N, K] fp8/int8 (K contiguous); modes and scales as in `w8a8_triton`
    (`gemv_w8_why_not` must be '') -> [1, N] x.dtype. `release_early`: `_common.pdl_release_at`."""
    m, k = x.shape
    n = w.shape[0]
    is_int = w.dtype == torch.int8
    cfg = cfg or gemv_w8_config(n, k, act, wscale, is_int)
    why = gemv_w8_why_not(n, k, act, wscale, is_int, cfg)
    if m != 1 or why:
        raise ValueError(f"gemv_w8 takes one row with a supported shape, got M={m}" + (f": {why}" if why else ""))
    if x.stride(1) != 1:
        x = x.contiguous()
    bk = cfg.block_k
    n_tiles = cdiv(n, cfg.block_n)
    split = plan_split(k, bk, n_tiles, cfg.waves * num_sms(x.device.index or 0))
    y = torch.empty((1, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, 1, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else y
    sa = act_scale if act_scale is not None else w_scale
    bka = min(cfg.amax_block, triton.next_power_of_2(k))
    sat = w.dtype == torch.float8_e4m3fn and qmax == 448.0 and not interpret_mode()  # the cast saturates to 448
    dp4a = w.dtype == torch.int8 and act in (0, 2) and cfg.widen == 1
    pdl = stream_pdl(x, "w8")
    tr, tr_id = trace_slot(x, "gemv_w8", n_tiles * split, n=n, k=k, tiles=n_tiles, split=split)
    _gemv_w8_kernel[(n_tiles, split)](
        x, w.view(torch.int32) if dp4a else w, w_scale, sa, y, ws, cnt, n, k, cdiv(k, 128), k // split, ACT=act,
        WSCALE=wscale, QMAX=qmax,
        IS_INT=w.dtype == torch.int8, SAT=sat, BN=cfg.block_n, BK=bk, BKA=bka, KT=cdiv(k, bka) * bka, WIDEN=cfg.widen,
        ACC=cfg.acc, DP4A=dp4a, SPLIT=split, **pdl_release_at(x, release_early), PDL=pdl, tr_ptr=tr, tr_id=tr_id,
        TRACE=tr is not None, num_warps=cfg.num_warps, num_stages=1, **({"launch_pdl": True} if pdl else {}))
    return y
