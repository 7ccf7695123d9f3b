"""`gemv_f8_rows`: fp8 W8A8 (e4m3 weights, per-token activations, tensor / channel weight scales) at 2-8 rows on
the GEMV structure, in Gluon so that the activations need no layout conversion. Imported lazily (needs Gluon).

Why (docs/PERFORMANCE.md, thirteenth session): `gemv_w8_rows` (Triton) spends ~13 instructions per weight code
at 4 rows, most of them on the activation side: Triton quantizes each row's K slice in a compact layout and moves
it through shared memory (a barrier per row and step) into the weight tile's slice layout, then widens it. Here
the rows arrive as fp32 code values (one `quant_rows(..., values=True)` launch before: the e4m3 code of x / s as
fp32, and s), and each thread loads exactly its 16 values per row in the weight tile's slice layout (four 16-byte
loads, L1 hits after the first warp): per step a thread widens its 2 x 16 weight codes once (inline PTX, as
`gemv_w8`) and spends 16 FFMA per weight row and activation row.

Layout: the weight tile [BN, BK / 16, 16] has 16 consecutive codes per thread (one 16-byte load), lanes along K,
warps along N; the activation slice [BK / 16, 16] is that layout's slice over N, so every warp holds the same
values (replicated) and the product needs no data movement. One unrolled fp32 accumulator [BN, BK / 16] per row
(sums of 16 products per thread and step); one cross-thread sum per row at the end. PDL as `gemv_w8`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, pdl_trigger, split_counters, stream_pdl
from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split
from quantrt.platforms.cuda.kernels.ring_common import gdc_launch_dependents, gdc_wait, gsum, store_split_k

MAX_ROWS = 8

_WIDEN = gl.constexpr("""{
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
        }""")


@dataclass(frozen=True)
class F8RowsConfig:
    block_n: int = 16
    block_k: int = 512
    warps: int = 8
    waves: int = 2          # split K only below about waves * SMs programs


@gluon.jit
def _widen(w):
    """e4m3 codes (any layout) -> exact fp32."""
    return gl.inline_asm_elementwise(_WIDEN, "=r,=r,=r,=r,r", [w], dtype=gl.float32, is_pure=True, pack=4)


@gluon.jit
def _row(wf, xrow, k0, offs_a):
    """One row's step: widened codes wf [BN, BK / 16, 16] x its fp32 code values at k0 -> [BN, BK / 16] sums."""
    a = gl.load(xrow + k0 + offs_a)                                            # [BK / 16, 16], the slice layout
    return gsum(wf * gl.expand_dims(a, 0), 2)


@gluon.jit
def _xrow(xv_ptr, M, K, m: gl.constexpr):
    """Row m's values (rows past M repeat row M - 1; never stored)."""
    return xv_ptr + gl.minimum(M - 1, m).to(gl.int64) * K


@gluon.jit
def _put(tile, acc, mcol, m: gl.constexpr):
    """tile [BN, BMP] with column m replaced by the row sums of acc [BN, BK / 16]."""
    return gl.where(gl.expand_dims(mcol, 0) == m, gl.expand_dims(gsum(acc, 1), 1), tile)


@gluon.jit
def _gemv_f8_rows_kernel(xv_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                         K_PER_SPLIT: gl.constexpr, SPLIT: gl.constexpr, WSCALE: gl.constexpr, BM: gl.constexpr,
                         BN: gl.constexpr, BK: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr,
                         TRIGGER: gl.constexpr = False):
    # xv [M, K] fp32 code values, sx [M] fp32; w [N, K] e4m3 codes, sw [1] or [N]; y [M, N]; BM in 2, 4, 8 (>= M).
    # K is a multiple of K_PER_SPLIT, itself of BK (no K masks); rows past N are clamped, not stored.
    L: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 32, 1], [WARPS, 1, 1], [2, 1, 0])
    S2: gl.constexpr = gl.SliceLayout(2, L)                                    # [BN, BK / 16] sums
    SA: gl.constexpr = gl.SliceLayout(0, L)                                    # [BK / 16, 16] activations
    BK16: gl.constexpr = BK // 16
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S2))
    rows = gl.minimum(n, N - 1).to(gl.int64)
    c = gl.arange(0, BK16, layout=gl.SliceLayout(0, S2))
    e = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    k_start = pid_k * K_PER_SPLIT
    w_ptrs = w_ptr + gl.expand_dims(gl.expand_dims(rows * K + k_start, 1) + gl.expand_dims(c * 16, 0), 2) \
        + gl.expand_dims(gl.expand_dims(e, 0), 1)                              # [BN, BK / 16, 16]
    offs_a = gl.expand_dims(gl.arange(0, BK16, layout=gl.SliceLayout(1, SA)) * 16, 1) \
        + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, SA)), 0)   # [BK / 16, 16]
    w = gl.load(w_ptrs)                                                        # step 0's codes
    if PDL:  # the code launch before writes xv / sx: read only after it completes
        gdc_wait()
    x0 = _xrow(xv_ptr, M, K, 0)
    x1 = _xrow(xv_ptr, M, K, 1)
    x2 = _xrow(xv_ptr, M, K, 2)
    x3 = _xrow(xv_ptr, M, K, 3)
    x4 = _xrow(xv_ptr, M, K, 4)
    x5 = _xrow(xv_ptr, M, K, 5)
    x6 = _xrow(xv_ptr, M, K, 6)
    x7 = _xrow(xv_ptr, M, K, 7)
    wf = _widen(w)
    a0 = _row(wf, x0, k_start, offs_a)
    a1 = _row(wf, x1, k_start, offs_a)
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    if BM > 2:
        a2 = _row(wf, x2, k_start, offs_a)
        a3 = _row(wf, x3, k_start, offs_a)
    if BM > 4:
        a4 = _row(wf, x4, k_start, offs_a)
        a5 = _row(wf, x5, k_start, offs_a)
        a6 = _row(wf, x6, k_start, offs_a)
        a7 = _row(wf, x7, k_start, offs_a)
    for kt in range(BK, K_PER_SPLIT, BK):
        k0 = k_start + kt
        wf = _widen(gl.load(w_ptrs + kt))
        a0 += _row(wf, x0, k0, offs_a)
        a1 += _row(wf, x1, k0, offs_a)
        if BM > 2:
            a2 += _row(wf, x2, k0, offs_a)
            a3 += _row(wf, x3, k0, offs_a)
        if BM > 4:
            a4 += _row(wf, x4, k0, offs_a)
            a5 += _row(wf, x5, k0, offs_a)
            a6 += _row(wf, x6, k0, offs_a)
            a7 += _row(wf, x7, k0, offs_a)
    if TRIGGER:  # weights streamed: the next PDL op may be scheduled (it waits for this grid's end)
        gdc_launch_dependents()
    mcol = gl.arange(0, BM, layout=gl.SliceLayout(0, S2))
    tile = gl.zeros([BN, BM], gl.float32, S2)
    tile = _put(_put(tile, a0, mcol, 0), a1, mcol, 1)
    if BM > 2:
        tile = _put(_put(tile, a2, mcol, 2), a3, mcol, 3)
    if BM > 4:
        tile = _put(_put(tile, a4, mcol, 4), a5, mcol, 5)
        tile = _put(_put(tile, a6, mcol, 6), a7, mcol, 7)
    if WSCALE == 0:
        sw = gl.load(sw_ptr + n * 0)
    else:
        sw = gl.load(sw_ptr + rows)
    sx = gl.load(sx_ptr + gl.minimum(mcol, M - 1))
    tile = tile * gl.expand_dims(sw, 1) * gl.expand_dims(sx, 0)
    ym = gl.expand_dims(mcol, 0) * N + gl.expand_dims(n, 1)
    mask = gl.expand_dims(mcol < M, 0) & gl.expand_dims(n < N, 1)
    store_split_k(tile, y_ptr, ws_ptr, cnt_ptr, ym, mask, pid_n, pid_k, M, N, SPLIT)


def gemv_f8_rows_why_not(m: int, n: int, k: int, w_dtype: torch.dtype, act: int, wscale: int,
                         cfg: F8RowsConfig) -> str:
    """'' when `gemv_f8_rows` computes this call, else the reason."""
    if not 2 <= m <= MAX_ROWS:
        return f"M={m} is outside 2..{MAX_ROWS}"
    if w_dtype != torch.float8_e4m3fn or act != 0 or wscale not in (0, 1):
        return "the Gluon row GEMV takes e4m3 weights, per-token activations and tensor or channel weight scales"
    if k % cfg.block_k or cfg.block_k % 512 or cfg.block_n % cfg.warps:
        return (f"K={k} must be a multiple of block_k={cfg.block_k} (a multiple of 512), block_n={cfg.block_n} "
                f"of warps={cfg.warps}")
    return ""


def gemv_f8_rows(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, wscale: int, qmax: float,
                 cfg: F8RowsConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (2 <= M <= 8), quantized per token to e4m3 by one `quant_rows` launch; w [N, K] e4m3,
    w_scale [1] (wscale 0) or [N] (1) -> [M, N] x.dtype."""
    from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

    m, k = x.shape
    n = w.shape[0]
    cfg = cfg or F8RowsConfig()
    why = gemv_f8_rows_why_not(m, n, k, w.dtype, 0, wscale, cfg)
    if why:
        raise ValueError(f"gemv_f8_rows cannot take this call: {why}")
    xv, sx = quant_rows(x, w.dtype, qmax, values=True)                         # [M, K] fp32 codes, [M, 1]
    bm = 2 if m <= 2 else 4 if m <= 4 else 8
    n_tiles = cdiv(n, cfg.block_n)
    split = plan_split(k, cfg.block_k, n_tiles, cfg.waves * num_sms(x.device.index or 0))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else y
    pdl = stream_pdl(x, "w8")
    _gemv_f8_rows_kernel[(n_tiles, split)](
        xv, sx.reshape(-1), w, w_scale.reshape(-1).contiguous(), y, ws, cnt, m, n, k, K_PER_SPLIT=k // split,
        SPLIT=split, WSCALE=wscale, BM=bm, BN=cfg.block_n, BK=cfg.block_k, WARPS=cfg.warps, PDL=pdl,
        TRIGGER=pdl_trigger(x), num_warps=cfg.warps, **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["MAX_ROWS", "F8RowsConfig", "gemv_f8_rows", "gemv_f8_rows_why_not"]
