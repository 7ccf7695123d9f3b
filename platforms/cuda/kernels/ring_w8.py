"""8-bit W8A8 at 2..32 rows on Hopper: weight and activation codes streamed by TMA through a shared-memory ring,
wgmma reading both operands there (Gluon; sm_90).

y [M, N] = (a [M, K] codes * sa [M] per-token / static scales) @ (w [N, K] codes * sw [1] or [N])^T, with a and w
of one 8-bit dtype (e4m3 or int8), as `frag_w8` computes it, on codes made beforehand (`quant_rows`, or the op
that produced x: `row_codes`).

Why: `frag_w8` (mma.sync on fragments loaded straight from memory) streams an fp8 weight at ~80% of copy at 2-16
rows, the GEMV `gemv_w8` reaches 92-95% at one row but pays per code and row. The sixth session's `ring_fp8`
quantized the activations inside every K step (IEEE division, a shared-memory store and a barrier per step,
3 x 8 KB in flight per program) and ran at ~70%. Here a step is only: wait for the slot's mbarrier, one wgmma
per box over the [BN, BK] weight box and the [BM, BK] code box (both K-major, 128-byte swizzled, TMA-written), a
barrier, and the slot's refill STAGES steps ahead, so STAGES x boxes x (BN + BM) x BK bytes per program are in
flight and cost no registers. H100 (PERFORMANCE.md, sixteenth session), fp8 8192² at 4-16 rows on codes made
beforehand: 25.3-25.7 us, 89% of copy, 1.86-1.89x bf16 cuBLAS (`frag_w8` 28.4-30.4).

- Per program: BN = 64 or 128 weight rows (one warpgroup; two m64 MMAs at 128), a K slice of K_PER_SPLIT codes
  in steps of `boxes` x BK codes (a row's 256-512 contiguous bytes requested together: 3-5% faster than one box);
  grid (N / BN, splits), split_k fixed or about `waves` programs per SM. The measured tiles are mostly one split
  with a deep ring: the split-K arrival counter costs more than the SMs that leaves idle.
- The code tile's rows past M are zeros (TMA fills out-of-bounds rows), so there is no mask in the loop.
- Each slot has one mbarrier that expects both tiles' bytes: with PDL the weight tiles of the first STAGES steps
  are requested before `griddepcontrol.wait` (the codes are written by the launch before), the code tiles after.
- fp8: each step's wgmma starts from zero and is added to the fp32 accumulator (Hopper's fp8 MMA accumulates
  with a short mantissa: it sums only 128 products here); int8: exact int32 sums, chained.
- Epilogue: times sw per weight row and sa per token; split-K partials through `ring_common` (tagged words at
  1-2 rows, the last arriver's sum above).
Gluon does not run under TRITON_INTERPRET: the CPU tests compile the kernel for sm_90 (PTX: TMA, wgmma on e4m3 /
s8 from shared memory, the PDL order) and check the dispatch; the kernel is tested natively against the float64
product of the codes (-m accelerator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma

from quantrt.platforms.cuda.kernels._common import env_tiles, pdl_supported, pdl_trigger, ring_device_why
from quantrt.platforms.cuda.kernels.ring_common import (
    TAGGED_MAX_M,
    gdc_launch_dependents,
    gdc_wait,
    split_k_plan,
    store_split_k,
    store_split_k_row,
    tma_desc,
)

MAX_M = 32


@dataclass(frozen=True)
class RingW8Config:
    block_n: int = 128       # weight rows per program: 64 or 128 (one warpgroup)
    block_k: int = 128       # codes per K step: 64 or 128 (one 128-byte swizzled row)
    stages: int = 4          # K steps in flight per program
    waves: int = 2           # split K to about this many programs per SM
    split_k: int = 0         # fixed split (0: from waves)
    block_m: int = 16        # wgmma N: 8, 16 or 32 (>= M)
    pdl: int = 1             # 1: programmatic dependent launch on sm_90 (weights requested before the wait)
    boxes: int = 1           # [BN, BK] boxes per K step and slot (1, 2, 4): boxes x BK contiguous bytes of a row
                             # requested together


@gluon.jit
def _issue_w(w_desc, a_desc, bar, w_ring, slot, k0, n0, pred, BK: gl.constexpr, KB: gl.constexpr):
    """A slot's KB weight boxes (ring entries KB slot + j, k0 + j BK); its mbarrier expects the code boxes' bytes
    too (`_issue_a`)."""
    mbarrier.expect(bar, KB * (w_desc.block_type.nbytes + a_desc.block_type.nbytes), pred=pred)
    for j in gl.static_range(KB):
        tma.async_copy_global_to_shared(w_desc, [n0, k0 + j * BK], bar, w_ring.index(slot * KB + j), pred=pred)


@gluon.jit
def _issue_a(a_desc, bar, a_ring, slot, k0, pred, BK: gl.constexpr, KB: gl.constexpr):
    for j in gl.static_range(KB):
        tma.async_copy_global_to_shared(a_desc, [0, k0 + j * BK], bar, a_ring.index(slot * KB + j), pred=pred)


@gluon.jit
def _ring_w8_kernel(a_desc, w_desc, sa_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                    K_PER_SPLIT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                    STAGES: gl.constexpr, SPLIT: gl.constexpr, WSCALE: gl.constexpr, IS_INT: gl.constexpr,
                    PDL: gl.constexpr, TAGGED: gl.constexpr, MMA: gl.constexpr, TRIGGER: gl.constexpr = False,
                    KB: gl.constexpr = 1):
    SK: gl.constexpr = KB * BK                               # codes per K step
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    k_start = pid_k * K_PER_SPLIT
    n_steps = gl.minimum(K_PER_SPLIT, K - k_start) // SK

    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES * KB, BN, BK], w_desc.layout)     # weight rows x k
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES * KB, BM, BK], a_desc.layout)     # tokens x k
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES):
        _issue_w(w_desc, a_desc, bars.index(i), w_ring, i, k_start + i * SK, n0, i < n_steps, BK, KB)
    if PDL:  # the weights are not written by the launch before; the codes (and split-K buffers) are
        gdc_wait()
    for i in gl.static_range(STAGES):
        _issue_a(a_desc, bars.index(i), a_ring, i, k_start + i * SK, i < n_steps, BK, KB)

    acc_t: gl.constexpr = gl.int32 if IS_INT else gl.float32
    acc = gl.zeros([BN, BM], acc_t, MMA)
    zero = gl.zeros([BN, BM], acc_t, MMA)
    for t in range(n_steps):
        slot = t % STAGES
        mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
        for j in gl.static_range(KB):
            wb = w_ring.index(slot * KB + j)
            ab = a_ring.index(slot * KB + j).permute((1, 0))
            if IS_INT:     # exact int32 sums: chained
                acc = warpgroup_mma(wb, ab, acc)
            else:          # BK products per MMA, added in fp32
                acc += warpgroup_mma(wb, ab, zero, use_acc=False)
        gl.thread_barrier()             # every warp's MMAs have read the slot: refill it STAGES steps ahead
        nxt = t + STAGES
        _issue_w(w_desc, a_desc, bars.index(slot), w_ring, slot, k_start + nxt * SK, n0, nxt < n_steps, BK, KB)
        _issue_a(a_desc, bars.index(slot), a_ring, slot, k_start + nxt * SK, nxt < n_steps, BK, KB)
    if TRIGGER:  # weights streamed: the next PDL op may be scheduled (it waits for this grid's end)
        gdc_launch_dependents()
    offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    offs_m = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    nmask = offs_n < N
    mmask = offs_m < M
    if WSCALE == 0:
        sw = gl.load(sw_ptr + offs_n * 0)
    else:
        sw = gl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    y = acc.to(gl.float32) * sw[:, None] * gl.load(sa_ptr + offs_m, mask=mmask, other=0.0)[None, :]
    if TAGGED:   # M <= TAGGED_MAX_M with K split: tagged partials, no arrival counter
        store_split_k_row(y, y_ptr, ws_ptr, offs_n, offs_m, pid_k, M, N, SPLIT)
    else:
        store_split_k(y, y_ptr, ws_ptr, cnt_ptr, offs_m[None, :] * N + offs_n[:, None],
                      mmask[None, :] & nmask[:, None], pid_n, pid_k, M, N, SPLIT)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def ring_w8_why_not(m: int, n: int, k: int, a_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device,
                    cfg: RingW8Config | None = None) -> str:
    """'' when `ring_w8` computes this call, else the reason."""
    cfg = cfg or _default(m)
    if cfg.block_n not in (64, 128) or cfg.block_k not in (64, 128) or cfg.block_m not in (8, 16, 32) \
            or not 1 <= cfg.stages <= 12 or cfg.boxes not in (1, 2, 4):
        return (f"RingW8Config needs block_n 64/128, block_k 64/128, block_m 8/16/32, 1-12 stages and 1, 2 or 4 "
                f"boxes; got {cfg}")
    if not 1 <= m <= cfg.block_m:
        return f"M={m} is outside 1..{cfg.block_m} (block_m)"
    if a_dtype != w_dtype or w_dtype not in (torch.float8_e4m3fn, torch.int8):
        return f"needs e4m3 or int8 codes of one dtype for both operands, got {a_dtype} x {w_dtype}"
    if k % (cfg.block_k * cfg.boxes):
        return f"K={k} is not a multiple of block_k {cfg.block_k} x boxes {cfg.boxes}"
    return ring_device_why(device)


def _bucket(m: int) -> int:
    return 8 if m <= 8 else 16 if m <= 16 else 32


def _default(m: int) -> RingW8Config:
    """The default tile with wgmma N for M rows (16 outside 1..MAX_M: `ring_w8_why_not` then names M)."""
    return RingW8Config(block_m=_bucket(m) if 1 <= m <= MAX_M else 16)


# (codes, row bucket 8 / 16 / 32, K, N) -> RingW8Config fields (block_n, block_k, stages, waves, split_k, block_m,
# pdl, boxes), each measured on the H100 against what the W8A8 dispatch ran there before, both on codes made
# beforehand as the norm makes them in the model (`bench/_frag_sweep.py --kernel ring --given`, sixteenth session;
# us at M = 4 / 8 or 16, ring vs before). Most are one split (split_k 1: no split-K epilogue) with a deep ring:
# the arrival counter's three L2 round trips cost more than the SMs left idle (128 or 64 column tiles).
# A missing entry keeps the path before: 4096 x 28672 (equal), int8 4096² at 3-8 rows (the path before is faster),
# int8 at 9-16 rows (faster here, 8192² 25.5 vs 27.6, but the batch-16 step was 4.08 vs 3.93 ms with them, and
# 4.12 vs 3.95-4.02 with the fp8 tiles of those shapes: `frag_w8` holds up better there in the model than alone).
_TILES: dict[tuple[str, int, int, int], tuple] = {
    ("f8", 8, 8192, 8192): (128, 128, 4, 1, 1, 8, 1, 2),      # 25.3 / 25.3 vs 28.4 / 29.0 (89% of copy)
    ("f8", 16, 8192, 8192): (128, 128, 4, 1, 1, 16, 1, 2),    # 25.7 vs 30.4
    ("f8", 8, 4096, 6144): (128, 128, 4, 1, 1, 8, 1, 2),      # 11.4 / 11.2 vs 12.7 / 13.0
    ("f8", 16, 4096, 6144): (128, 128, 4, 1, 1, 16, 1, 2),    # 11.2 vs 12.2
    ("f8", 8, 4096, 4096): (64, 128, 3, 2, 0, 8, 1, 4),       # 8.9 / 8.6 vs 10.1 / 10.0
    ("f8", 16, 4096, 4096): (64, 128, 6, 1, 2, 16, 1, 2),     # 8.4 vs 12.3
    ("f8", 8, 14336, 4096): (64, 128, 5, 1, 1, 8, 1, 4),      # 23.6 / 23.5 vs 25.3 / 26.0
    ("f8", 16, 14336, 4096): (64, 128, 6, 1, 2, 16, 1, 2),    # 23.5 vs 25.4
    ("i8", 8, 8192, 8192): (64, 128, 5, 1, 1, 8, 1, 4),       # 25.2 / 25.3 vs 28.1 / 28.8
    ("i8", 8, 4096, 6144): (128, 128, 4, 1, 1, 8, 1, 2),      # 11.1 / 11.3 vs 11.6 / 12.9
    ("i8", 8, 14336, 4096): (64, 128, 5, 1, 1, 8, 1, 4),      # 23.3 / 23.3 vs 25.0 / 25.8
}


# from here the tile table (H100 e2e at 2 rows, W8A8 taking the row GEMV where x comes as bf16 rows: fp8 3.46 vs
# 3.56 ms a step without the ring, int8 3.43 vs 3.38: its dp4a row GEMV is as fast as the ring at 2 rows)
MIN_M = {"f8": 2, "i8": 3}


def _env_tiles() -> dict[tuple, tuple]:
    """QUANTRT_CUDA_RING_W8_TILES="f8|i8:bucket:K:N=block_n:block_k:...+...": entries that replace or add to
    `_TILES` (A/B runs; RingW8Config fields in order)."""
    return env_tiles("QUANTRT_CUDA_RING_W8_TILES", "f8|i8:bucket:K:N",
                     lambda key: len(key) == 4 and key[0] in ("f8", "i8") and all(isinstance(v, int) for v in key[1:]))


def tile_for(m: int, k: int, n: int, is_int: bool) -> RingW8Config | None:
    """The measured tile when this kernel beat the dispatch before at [M, K] x [K, N] (MIN_M..MAX_M rows), else
    None. QUANTRT_CUDA_RING_W8=all: the default tile at every shape from 2 rows (A/B runs, sweeps); =0: never."""
    if not 2 <= m <= MAX_M:
        return None
    mode = os.environ.get("QUANTRT_CUDA_RING_W8", "")
    if mode == "0":
        return None
    if mode == "all":
        return _default(m)
    key = ("i8" if is_int else "f8", _bucket(m), k, n)
    t = (_env_tiles().get(key) or _TILES.get(key)) if m >= MIN_M[key[0]] else None
    return None if t is None else RingW8Config(*t)


def ring_w8(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
            cfg: RingW8Config | None = None) -> torch.Tensor:
    """a [M <= 32, K] e4m3/int8 codes, sa [M] or [M, 1] fp32; w [N, K] same dtype, sw [1] or [N] fp32 -> [M, N]."""
    m, k = a.shape
    n = w.shape[0]
    cfg = cfg or _default(m)
    why = ("K differs between the operands" if w.shape[1] != k
           else f"{sa.numel()} activation scales for {m} rows" if sa.numel() != m
           else f"{sw.numel()} weight scales for {n} weight rows (needs 1 or {n})" if sw.numel() not in (1, n)
           else ring_w8_why_not(m, n, k, a.dtype, w.dtype, a.device, cfg))
    if why:
        raise ValueError(f"ring_w8 cannot compute a {tuple(a.shape)} x w {tuple(w.shape)}: {why}")
    a = a.contiguous()
    w = w.contiguous()
    bn, bk, bm = cfg.block_n, cfg.block_k, cfg.block_m
    n_tiles, split, k_per_split, y, ws, cnt = split_k_plan(a, n, bn, bk * cfg.boxes, cfg.split_k, cfg.waves,
                                                           TAGGED_MAX_M, out_dtype)
    pdl = bool(cfg.pdl) and pdl_supported(a)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, bm, 32])
    a_desc = tma_desc(a, [m, k], [k, 1], [bm, bk], swizzle=bk, cache=False)     # codes: new each call
    _ring_w8_kernel[(n_tiles, split)](
        a_desc, tma_desc(w, [n, k], [k, 1], [bn, bk], swizzle=bk), sa.reshape(-1).contiguous(),
        sw.reshape(-1).contiguous(), y, ws, cnt, m, n, k, k_per_split, bn, bk, bm,
        cfg.stages, split, 0 if sw.numel() == 1 else 1, w.dtype == torch.int8, pdl, m <= TAGGED_MAX_M and split > 1,
        mma, TRIGGER=pdl_trigger(a), KB=cfg.boxes, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["MAX_M", "MIN_M", "RingW8Config", "ring_w8", "ring_w8_why_not", "tile_for"]
