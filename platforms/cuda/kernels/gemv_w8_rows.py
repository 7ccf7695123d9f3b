"""`gemv_w8_rows`: `gemv_w8`'s structure for 2..ROWS_MAX batch rows of 8-bit W8A8 (fp8 e4m3 / int8 weights,
per-token or static activations, tensor / channel weight scales). Imported lazily (needs Triton).

Why (docs/PERFORMANCE.md, thirteenth session): at one row `gemv_w8` streams the codes at ~92% of copy with plain
16-byte loads; the tensor-core paths at 2-16 rows (`frag_w8`, `swap_fp8`) reach ~80%. Here each program loads a
[BN, BK] tile of codes once per K step and multiplies it with every row's activation codes:
  fp8:  widened once per code (2 SASS instructions), then one FFMA per code and row;
  int8: the weight words go straight into `dp4a` with the row's packed activation codes (one instruction per 4
        codes and row, exact int32 sums).
Each program finds its rows' per-token scales itself (x is L2-resident: BM x K reads, no extra launch), quantizes
its K slice of every row as `fake_quantize_act` does (`gemv_w8._codes32`), and sums products per thread's 16
consecutive codes (fp32) or 4-code words (int32) across the K steps; one cross-thread sum at the end.
Measured on the H100 it wins at 2 rows (fp8 1.67-1.73x bf16 at three Llama shapes, int8 1.79-1.99x at four) and
for int8 up to 4 rows at 4096x6144; fp8 at 3-8 rows costs ~13 instructions a code (per-row activation work) and
loses to `frag_w8`, so the dispatch (`tile_for`) takes it only where `_TILES` says.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import (
    cdiv,
    interpret_mode,
    num_sms,
    pdl_trigger,
    split_counters,
    stream_pdl,
)
from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split
from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config, _codes32, _dp4a, _widen
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_release, pdl_wait
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k

ROWS_MAX = 16       # rows one launch takes with int8 dp4a (BM = the next power of two; rows past M are masked)
FLOAT_ROWS_MAX = 8  # ... with the codes widened to fp32 (fp8; int8 off CUDA): one unrolled accumulator per row


@triton.jit
def _rows_scale(x_ptr, sa_ptr, rows_m, stride_xm, K, ACT: tl.constexpr, KT: tl.constexpr, BKA: tl.constexpr,
                QMAX: tl.constexpr, BM: tl.constexpr):
    """[BM] activation scales of rows rows_m: per token max(|x_m|, 1e-12) / QMAX (ACT 0) or the static one (2)."""
    if ACT == 2:
        return tl.zeros([BM], dtype=tl.float32) + tl.load(sa_ptr)
    offs = tl.arange(0, BKA)
    amax = tl.zeros([BM, BKA], dtype=tl.float32)
    for k0 in range(0, KT, BKA):
        a = tl.load(x_ptr + rows_m[:, None] * stride_xm + k0 + offs[None, :], mask=(k0 + offs < K)[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    return tl.maximum(tl.max(amax, axis=1), 1e-12) / QMAX


@triton.jit
def _row_step(w, x_ptr, k0, offs_k, inv, QMAX: tl.constexpr, IS_INT: tl.constexpr, SAT: tl.constexpr,
              W_DTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One row's products with the step's widened codes w [BN, BK], summed per thread's 16 codes -> [BN, BK / 16].
    A 1-D activation load per row: Triton quantizes it in a compact layout and moves the 1-byte codes through
    shared memory into the weight tile's slice layout (as `gemv_w8` at M = 1); a [BM, BK] activation tile made it
    move the whole widened weight tile through shared memory instead."""
    a = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
    p = w * _codes32(a, inv, QMAX, IS_INT, SAT, W_DTYPE)[None, :]
    return tl.sum(tl.reshape(p, [BN, BK // 16, 16]), axis=2)


@triton.jit
def _row_of(acc, y, offs_m, m: tl.constexpr):
    """y [BM, BN] with row m replaced by the sum of acc [BN, BK / 16]."""
    return tl.where((offs_m == m)[:, None], tl.sum(acc, axis=1)[None, :], y)


@triton.jit
def _rows_float(w0, wt, x_ptr, stride_xm, M, sx, offs_m, k_start, K_PER_SPLIT: tl.constexpr, QMAX: tl.constexpr,
                IS_INT: tl.constexpr, SAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                WIDEN: tl.constexpr):
    """sum_k w[n, k] * codes(x[m, k]) over the K slice for BM <= 8 rows -> [BM, BN] fp32 (rows past M repeat row
    M - 1). One accumulator per row, unrolled: the codes are widened once per step for all rows."""
    W_DTYPE = wt.dtype.element_ty
    offs_k = tl.arange(0, BK)
    inv = 1.0 / sx
    x0 = x_ptr
    x1 = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(3, M - 1) * stride_xm
    x4 = x_ptr + tl.minimum(4, M - 1) * stride_xm
    x5 = x_ptr + tl.minimum(5, M - 1) * stride_xm
    x6 = x_ptr + tl.minimum(6, M - 1) * stride_xm
    x7 = x_ptr + tl.minimum(7, M - 1) * stride_xm
    i0 = tl.sum(tl.where(offs_m == 0, inv, 0.0))
    i1 = tl.sum(tl.where(offs_m == 1, inv, 0.0))
    i2 = tl.sum(tl.where(offs_m == 2, inv, 0.0))
    i3 = tl.sum(tl.where(offs_m == 3, inv, 0.0))
    i4 = tl.sum(tl.where(offs_m == 4, inv, 0.0))
    i5 = tl.sum(tl.where(offs_m == 5, inv, 0.0))
    i6 = tl.sum(tl.where(offs_m == 6, inv, 0.0))
    i7 = tl.sum(tl.where(offs_m == 7, inv, 0.0))
    w = _widen(w0, WIDEN, IS_INT)
    a0 = _row_step(w, x0, k_start, offs_k, i0, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
    a1 = _row_step(w, x1, k_start, offs_k, i1, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    if BM > 2:
        a2 = _row_step(w, x2, k_start, offs_k, i2, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        a3 = _row_step(w, x3, k_start, offs_k, i3, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
    if BM > 4:
        a4 = _row_step(w, x4, k_start, offs_k, i4, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        a5 = _row_step(w, x5, k_start, offs_k, i5, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        a6 = _row_step(w, x6, k_start, offs_k, i6, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        a7 = _row_step(w, x7, k_start, offs_k, i7, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
    for kt in range(BK, K_PER_SPLIT, BK):
        k0 = k_start + kt
        w = _widen(tl.load(wt + kt), WIDEN, IS_INT)
        a0 += _row_step(w, x0, k0, offs_k, i0, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        a1 += _row_step(w, x1, k0, offs_k, i1, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        if BM > 2:
            a2 += _row_step(w, x2, k0, offs_k, i2, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
            a3 += _row_step(w, x3, k0, offs_k, i3, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
        if BM > 4:
            a4 += _row_step(w, x4, k0, offs_k, i4, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
            a5 += _row_step(w, x5, k0, offs_k, i5, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
            a6 += _row_step(w, x6, k0, offs_k, i6, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
            a7 += _row_step(w, x7, k0, offs_k, i7, QMAX, IS_INT, SAT, W_DTYPE, BN, BK)
    y = tl.zeros([BM, BN], dtype=tl.float32)
    y = _row_of(a1, _row_of(a0, y, offs_m, 0), offs_m, 1)
    if BM > 2:
        y = _row_of(a3, _row_of(a2, y, offs_m, 2), offs_m, 3)
    if BM > 4:
        y = _row_of(a5, _row_of(a4, y, offs_m, 4), offs_m, 5)
        y = _row_of(a7, _row_of(a6, y, offs_m, 6), offs_m, 7)
    return y


@triton.jit
def _rows_words(xrow, k0, inv3, QMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, 1, BK / 4] int32 words of the rows' int8 activation codes at k0 .. k0 + BK (`gemv_w8._x_words`)."""
    a = tl.load(xrow + k0 + tl.arange(0, BK)[None, None, :]).to(tl.float32)
    q = tl.minimum(tl.maximum(a * inv3, -QMAX), QMAX) + 12582912.0
    b = tl.reshape(q.to(tl.int32, bitcast=True) & 0xFF, [BM, 1, BK // 4, 4])
    return tl.sum(b << tl.arange(0, 4)[None, None, None, :] * 8, axis=3)       # disjoint bytes: sum == or


@triton.jit
def _gemv_w8_rows_kernel(x_ptr, w_ptr, sw_ptr, sa_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm,
                         K_PER_SPLIT: tl.constexpr, ACT: tl.constexpr, WSCALE: tl.constexpr, QMAX: tl.constexpr,
                         IS_INT: tl.constexpr, SAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, BKA: tl.constexpr, KT: tl.constexpr, WIDEN: tl.constexpr,
                         DP4A: tl.constexpr, SPLIT: tl.constexpr, TRIGGER: tl.constexpr = False,
                         PDL: tl.constexpr = False):
    # x [M, K] (row stride stride_xm, K contiguous); w [N, K] codes (DP4A: [N, K / 4] int32 words); y [M, N];
    # ws [SPLIT, M, N] fp32. K is a multiple of K_PER_SPLIT (itself of BK); rows past N are clamped, not stored.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_m = tl.arange(0, BM)
    mrow = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    if DP4A:
        wt = w_ptr + rows[None, :, None] * (K // 4) + k_start // 4 + tl.arange(0, BK // 4)[None, None, :]
    else:
        wt = w_ptr + rows[:, None] * K + k_start + tl.arange(0, BK)[None, :]  # [BN, BK] codes of step 0
    w0 = tl.load(wt)
    pdl_wait(PDL)  # step 0's weights are requested; x and the split-K buffers only after the kernel before ends
    rows_m = tl.minimum(offs_m, M - 1)                                         # rows past M repeat row M - 1
    sx = _rows_scale(x_ptr, sa_ptr, rows_m, stride_xm, K, ACT, KT, BKA, QMAX, BM)      # [BM]
    if DP4A:  # [1, BN, BK / 4] words of step 0 x [BM, 1, BK / 4] activation words
        xrow = x_ptr + rows_m[:, None, None] * stride_xm
        inv3 = (1.0 / sx)[:, None, None]
        xw = _rows_words(xrow, k_start, inv3, QMAX, BM, BK)
        iacc = _dp4a(tl.broadcast_to(w0, [BM, BN, BK // 4]), tl.broadcast_to(xw, [BM, BN, BK // 4]),
                     tl.zeros([BM, BN, BK // 4], dtype=tl.int32))
        for kt in range(BK, K_PER_SPLIT, BK):
            xw = _rows_words(xrow, k_start + kt, inv3, QMAX, BM, BK)
            iacc = _dp4a(tl.broadcast_to(tl.load(wt + kt // 4), [BM, BN, BK // 4]),
                         tl.broadcast_to(xw, [BM, BN, BK // 4]), iacc)
        y = tl.sum(iacc, axis=2).to(tl.float32)                               # [BM, BN]
    else:
        y = _rows_float(w0, wt, x_ptr, stride_xm, M, sx, offs_m, k_start, K_PER_SPLIT, QMAX, IS_INT, SAT, BM, BN, BK,
                        WIDEN)
    pdl_release(TRIGGER)  # weights streamed: the next PDL op may be scheduled
    y = y * sx[:, None]
    if WSCALE == 0:
        y = y * tl.load(sw_ptr)
    else:
        y = y * tl.load(sw_ptr + rows)[None, :]
    ym = offs_m[:, None] * N + offs_n[None, :]
    store_split_k(y, y_ptr, ws_ptr, cnt_ptr, ym, mrow[:, None] & (offs_n < N)[None, :], 0, pid_n, pid_k, M, N,
                  SPLIT)


def gemv_w8_rows_why_not(m: int, n: int, k: int, act: int, wscale: int, is_int: bool, cfg: GemvW8Config) -> str:
    """'' when `gemv_w8_rows` computes M rows of this shape and mode, else the reason."""
    top = ROWS_MAX if is_int and cfg.widen == 1 else FLOAT_ROWS_MAX
    if not 2 <= m <= top:
        return f"M={m} is outside 2..{top} (" + ("int8 codes through dp4a" if top == ROWS_MAX else
                                                 "codes widened to fp32; int8 through dp4a takes 16") + ")"
    if act not in (0, 2) or wscale not in (0, 1):
        return "the row GEMV takes per-token or static activations and tensor or channel weight scales"
    if k % cfg.block_k or cfg.block_k % 64:
        return f"K={k} is not a multiple of block_k={cfg.block_k} (itself a multiple of 64)"
    return ""


# H100 sweep (docs/PERFORMANCE.md, thirteenth session, `bench/_gemv_rows_sweep.py`): per (K, N) and scheme
# (fp8 / i8), (up to M rows, (block_n, block_k, warps)) in increasing M, where it beat the path before.
# Kept where the kernel table (the path before with its activation-code launch) was >= 3% faster and the linear
# behind its producer (the path before on the producer's codes, the row GEMV on the default tile) was not slower;
# µs rows / before in the kernel table at M = 2 in the comments. At 3-8 rows fp8 costs 1.2-2.5x `frag_w8` (one
# FFMA per code and row plus per-row activation work: ~13 instructions per code at 4 rows).
_TILES: dict[tuple[int, int], dict[str, tuple]] = {
    (4096, 4096): {"fp8": ((2, (8, 1024, 4)),),                        # 9.73 / 11.10
                   "i8": ((2, (16, 1024, 8)),)},                       # 8.30 / 9.51
    (4096, 6144): {"fp8": ((2, (8, 1024, 4)),),                        # 11.98 / 13.73
                   "i8": ((4, (32, 512, 8)),)},                        # 11.01 / 13.86; M = 4 11.60 / 14.00
    (8192, 8192): {"fp8": ((2, (16, 512, 8)),),                        # 28.18 / 28.97
                   "i8": ((2, (32, 512, 8)),)},                        # 25.17 / 28.93
    (14336, 4096): {"i8": ((2, (16, 1024, 8)),)},                      # 24.96 / 27.24
}
DEFAULT_TILE = (16, 512, 8)


def _forced() -> dict[str, int] | None:
    """QUANTRT_CUDA_GEMV_ROWS: unset or "": the tile table; "0": never; "fp8:4,i8:16": every shape up to those rows
    on the default tile (A/B and sweeps)."""
    spec = os.environ.get("QUANTRT_CUDA_GEMV_ROWS", "").strip()
    if spec == "":
        return None
    if spec == "0":
        return {}
    try:
        out = {kind.strip(): int(top) for kind, top in (part.split(":") for part in spec.split(","))}
    except ValueError:
        out = None
    if out is None or not set(out) <= {"fp8", "i8"}:
        raise ValueError(f"QUANTRT_CUDA_GEMV_ROWS={spec!r}: expected '' (the tile table), '0' (off) or e.g. "
                         "'fp8:4,i8:16' (kinds fp8, i8; rows)")
    return out


def config(tile: tuple[int, int, int], k: int) -> GemvW8Config:
    """GemvW8Config of (block_n, block_k, warps), K steps shortened to divide K."""
    bn, bk, warps = tile
    while k % bk and bk > 64:
        bk //= 2
    return GemvW8Config(bn, bk, 2, warps, 0 if interpret_mode() or torch.version.hip else 1, 4096, 1)


def tile_for(m: int, k: int, n: int, is_int: bool) -> GemvW8Config | None:
    """The row GEMV's tile for M rows of (K, N), or None where the sweep found it no faster than the path before
    (`_TILES`; `QUANTRT_CUDA_GEMV_ROWS` overrides)."""
    kind = "i8" if is_int else "fp8"
    forced = _forced()
    if forced is None:
        tile = next((t for top, t in _TILES.get((k, n), {}).get(kind, ()) if m <= top), None)
    else:
        tile = DEFAULT_TILE if m <= forced.get(kind, 0) else None
    return None if tile is None else config(tile, k)


def gemv_w8_rows(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int, qmax: float,
                 act_scale: torch.Tensor | None = None, cfg: GemvW8Config | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16 (2 <= M <= ROWS_MAX); w: [N, K] fp8 e4m3 / int8 (K contiguous); act 0 (per token) or
    2 (static, `act_scale` [1]); wscale 0 (tensor, `w_scale` [1]) or 1 (channel, [N]) -> [M, N] x.dtype."""
    m, k = x.shape
    n = w.shape[0]
    is_int = w.dtype == torch.int8
    cfg = cfg or tile_for(m, k, n, is_int) or config(DEFAULT_TILE, k)
    why = gemv_w8_rows_why_not(m, n, k, act, wscale, is_int, cfg)
    if why:
        raise ValueError(f"gemv_w8_rows cannot take this call: {why}")
    if act == 2 and act_scale is None:
        raise ValueError("gemv_w8_rows: static activations (act 2) need act_scale")
    if x.stride(1) != 1:
        x = x.contiguous()
    bm = max(2, triton.next_power_of_2(m))
    bk = cfg.block_k
    n_tiles = cdiv(n, cfg.block_n)
    split = plan_split(k, bk, n_tiles, cfg.waves * num_sms(x.device.index or 0))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else y
    bka = max(64, min(cfg.amax_block // bm, triton.next_power_of_2(k)))
    sat = w.dtype == torch.float8_e4m3fn and qmax == 448.0 and not interpret_mode()  # the cast saturates to 448
    dp4a = is_int and cfg.widen == 1
    pdl = stream_pdl(x, "w8")
    _gemv_w8_rows_kernel[(n_tiles, split)](
        x, w.view(torch.int32) if dp4a else w, w_scale, act_scale if act_scale is not None else w_scale, y, ws, cnt,
        m, n, k, x.stride(0), k // split, ACT=act, WSCALE=wscale, QMAX=qmax, IS_INT=is_int, SAT=sat, BM=bm,
        BN=cfg.block_n, BK=bk, BKA=bka, KT=cdiv(k, bka) * bka, WIDEN=cfg.widen, DP4A=dp4a, SPLIT=split,
        TRIGGER=pdl_trigger(x), PDL=pdl, num_warps=cfg.num_warps, num_stages=1,
        **({"launch_pdl": True} if pdl else {}))
    return y
