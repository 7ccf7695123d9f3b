"""Skinny-M (M <= 4) fp16/bf16 dense GEMV in Triton: the weight [N, K] streamed once in its natural layout.

Imported lazily (needs triton). A program owns BN output columns (weight rows) and a K slice of K_PER_SPLIT;
each thread loads 8 consecutive k of one row (16 bytes), the products with the activation rows are summed in
fp32 once per K step. With PREFETCH the next step's weight tile is loaded before the current one is used
(two tiles in registers: the loads of step i+1 are in flight while step i multiplies); on the H100 more
programs per SM without it measured faster. Split-K partials are combined in the same launch
(`split_k_triton.store_split_k`: fp32 partials, the last split of a column tile sums them in split order), so
there is no reduce kernel and the result is deterministic.

PDL (Hopper+, programmatic dependent launch): the kernel is launched with the programmatic-serialization
attribute and loads its first weight tile before `griddepcontrol.wait`, so that while the kernel before it
(which produced x) finishes, the weight reads have started; x, the workspace and the split counters are only
touched after the wait. The weight is never written by a kernel, so reading it early is safe. Like every
weight streamer, it lets the next PDL kernel launch (`griddepcontrol.launch_dependents`) only after its main
loop: released at the start, the next kernel took SM slots during the stream (PERFORMANCE.md, twelfth session).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, pdl_release_at, split_counters
from quantrt.platforms.cuda.kernels.pdl_triton import pdl_release, pdl_wait
from quantrt.platforms.cuda.kernels.split_k_triton import store_split_k
from quantrt.platforms.cuda.kernels.trace import t_done, t_rec, t_stamp, trace_slot

MAX_M = 4


@dataclass(frozen=True)
class DenseGemvConfig:
    block_n: int = 8
    block_k: int = 1024
    waves: int = 2            # split K until about waves * SMs programs run (a divisor of the K steps)
    num_warps: int = 8
    num_stages: int = 1
    prefetch: bool = False    # load step i+1's weight tile before multiplying step i's
    pdl: bool = False         # programmatic dependent launch (sm_90+, not the interpreter, not ROCm)


@triton.jit
def _row_dot(x_ptr, kk, w):
    """sum_k w[n, k] * x[k] in fp32 for the step's slice kk [BK] -> [BN]."""
    a = tl.load(x_ptr + kk).to(tl.float32)
    return tl.sum(w.to(tl.float32) * a[None, :], axis=1)


@triton.jit
def _dots(x_ptr, stride_xm, kk, w, acc0, acc1, acc2, acc3, M: tl.constexpr):
    """The step's products of the weight tile w [BN, BK] with each activation row's slice kk, added to the
    rows' accumulators [BN]."""
    acc0 += _row_dot(x_ptr, kk, w)
    if M > 1:
        acc1 += _row_dot(x_ptr + stride_xm, kk, w)
    if M > 2:
        acc2 += _row_dot(x_ptr + 2 * stride_xm, kk, w)
    if M > 3:
        acc3 += _row_dot(x_ptr + 3 * stride_xm, kk, w)
    return acc0, acc1, acc2, acc3


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, K_PER_SPLIT: tl.constexpr,
                       M: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PREFETCH: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr, TRIGGER: tl.constexpr = False,
                       tr_ptr=None, tr_id=0, TRACE: tl.constexpr = False, EARLY_RELEASE: tl.constexpr = False):
    tr_rec = t_rec(tr_ptr, tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), TRACE)   # `trace` timelines
    t_stamp(tr_rec, 0, TRACE)
    # x [M, K] (rows stride_xm, k contiguous); w [N, K] k contiguous; y [M, N]; ws [SPLIT, M, N] fp32.
    # K is a multiple of K_PER_SPLIT (itself of BK): no K masks; rows past N are clamped, not stored.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BK)
    k_start = pid_k * K_PER_SPLIT
    w_tile = w_ptr + rows[:, None] * K + (k_start + offs_k)[None, :]          # [BN, BK] pointers of step 0
    acc0 = tl.zeros([BN], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)
    acc2 = tl.zeros([BN], dtype=tl.float32)
    acc3 = tl.zeros([BN], dtype=tl.float32)
    if PREFETCH:
        w = tl.load(w_tile)                                                    # before the wait (PDL)
        pdl_release(EARLY_RELEASE)  # a small next op that reads before its own wait (`_common.pdl_release_at`)
        pdl_wait(PDL)
        t_stamp(tr_rec, 1, TRACE)
        for kt in range(0, K_PER_SPLIT, BK):
            nxt = tl.load(w_tile + (kt + BK), mask=kt + BK < K_PER_SPLIT, other=0.0)  # scalar mask
            acc0, acc1, acc2, acc3 = _dots(x_ptr, stride_xm, k_start + kt + offs_k, w, acc0, acc1, acc2, acc3, M)
            w = nxt
    else:  # step 0 peeled: its weight tile is loaded before the wait (PDL), the others as they come
        w = tl.load(w_tile)
        pdl_release(EARLY_RELEASE)
        pdl_wait(PDL)
        t_stamp(tr_rec, 1, TRACE)
        acc0, acc1, acc2, acc3 = _dots(x_ptr, stride_xm, k_start + offs_k, w, acc0, acc1, acc2, acc3, M)
        for kt in range(BK, K_PER_SPLIT, BK):
            w = tl.load(w_tile + kt)
            acc0, acc1, acc2, acc3 = _dots(x_ptr, stride_xm, k_start + kt + offs_k, w, acc0, acc1, acc2, acc3, M)
    t_stamp(tr_rec, 2, TRACE)
    pdl_release(TRIGGER)  # weights streamed: the next PDL op may be scheduled
    rm = tl.arange(0, MP)[:, None]                                             # [MP, 1] output row
    acc = tl.where(rm == 0, acc0[None, :], 0.0)                                # [MP, BN]
    if M > 1:
        acc = tl.where(rm == 1, acc1[None, :], acc)
    if M > 2:
        acc = tl.where(rm == 2, acc2[None, :], acc)
    if M > 3:
        acc = tl.where(rm == 3, acc3[None, :], acc)
    ym = rm * N + offs_n[None, :]
    ymask = (rm < M) & (offs_n < N)[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, 0, pid_n, pid_k, M, N, SPLIT)
    t_done(tr_rec, tr_id, TRACE)


def plan_split(k: int, block_k: int, n_tiles: int, target_programs: int) -> int:
    """Splits of K: the divisor of the K steps whose program count n_tiles * split is closest to the target
    (ties: fewer splits). K must be a multiple of block_k."""
    steps = k // block_k
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(n_tiles * d - target_programs), d))


def default_config(m: int, n: int, k: int, pdl: bool = False) -> DenseGemvConfig:
    """The H100 sweep's best tile for every Llama-3.1-8B shape (docs/PERFORMANCE.md, "bf16 dense GEMV"): 8 rows
    x 1024 k, 8 warps, no register prefetch, split K only below ~2 programs per SM (so none for those shapes).
    K not a multiple of 1024: the largest power of two that divides it."""
    bk = 1024
    while k % bk:
        bk //= 2
    return DenseGemvConfig(8, bk, 2, 8, 1, False, pdl)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, cfg: DenseGemvConfig | None = None, release_early: bool = False
               ) -> torch.Tensor:
    """x: [M <= 4, K] fp16/bf16; w: [N, K] x.dtype, K contiguous, K a multiple of cfg.block_k -> [M, N] x.dtype.
    `release_early`: `_common.pdl_release_at`."""
    m, k = x.shape
    n = w.shape[0]
    assert 1 <= m <= MAX_M and w.shape[1] == k and w.dtype == x.dtype and w.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = cfg or default_config(m, n, k)
    bk = cfg.block_k
    if k % bk:
        raise ValueError(f"dense GEMV: K={k} is not a multiple of block_k={bk}")
    n_tiles = cdiv(n, cfg.block_n)
    split = plan_split(k, bk, n_tiles, cfg.waves * num_sms(x.device.index or 0))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else y
    extra = {"launch_pdl": True} if cfg.pdl else {}
    tr, tr_id = trace_slot(x, "dense_gemv", n_tiles * split, n=n, k=k, tiles=n_tiles, split=split)
    _dense_gemv_kernel[(n_tiles, split)](
        x, w, y, ws, cnt, n, k, x.stride(0), k // split, M=m, MP=triton.next_power_of_2(m), BN=cfg.block_n,
        BK=bk, PREFETCH=cfg.prefetch, PDL=cfg.pdl, SPLIT=split, **pdl_release_at(x, release_early), tr_ptr=tr,
        tr_id=tr_id, TRACE=tr is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **extra)
    return y


__all__ = ["MAX_M", "DenseGemvConfig", "default_config", "dense_gemv", "plan_split"]
