"""FP8 W8A8 at M <= 16 on Hopper: fp8 weight tiles streamed by TMA through a shared-memory ring (Gluon; sm_90).

Same operands and numerics as `swap_fp8` with ACT 0 (per-token scales from `skinny_fp8.row_scales`) or ACT 2
(one static activation scale), WSCALE 0 (tensor) or 1 (channel): weight [N, K] e4m3 (K contiguous), activation
codes clamp(x / s_m, +-448) (IEEE division) cast to e4m3 exactly like `fake_quantize_act`, code x code products
with fp32 accumulation, y = acc * s_w * s_m. What differs is the weight stream: the next STAGES [BN, BK] tiles are TMA
copies into 128-byte-swizzled shared memory, each on its own mbarrier, and the wgmma reads the tile there as
its A operand (no registers, no cp.async). Per program: BN = 64 (one warpgroup) or 128 rows, a K slice in BK =
128-column steps; the step's activations [BM, BK] are loaded as 16-byte vectors, quantized in registers and
stored K-major to one of two shared buffers (the B operand), so one barrier per step orders both the
activation buffer and the refill of the slot the previous step's MMA read.
Split-K partials are summed by the last program per row tile (the `split_k_triton` protocol).
Gluon does not run under TRITON_INTERPRET: the CPU tests compile it for sm_90 and check the dispatch; the
kernel is tested natively against the float64 product of the fake-quantized activations (-m accelerator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma

from quantrt.platforms.cuda.kernels.ring_common import split_k_plan, store_split_k, tma_desc
from quantrt.platforms.cuda.kernels.skinny_fp8 import row_scales

MAX_M = 16
FP8_MAX = 448.0


@dataclass(frozen=True)
class RingFp8Config:
    block_n: int = 64        # 64 (one warpgroup) or 128
    block_k: int = 128       # 64 or 128 (one 128-byte swizzled row of fp8 at 128)
    stages: int = 3          # weight tiles in flight per program
    waves: int = 2           # split K to about this many programs per SM
    split_k: int = 0         # fixed split (0: from waves)
    block_m: int = 16        # wgmma N: 8 (M <= 8) or 16


@gluon.jit
def _issue_w(w_desc, bar, buf, k0, n0, pred):
    mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(w_desc, [n0, k0], bar, buf, pred=pred)


@gluon.jit
def _ring_fp8_kernel(x_ptr, w_desc, sw_ptr, sa_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm,
                     K_PER_SPLIT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                     STAGES: gl.constexpr, SPLIT: gl.constexpr, ACT: gl.constexpr, WSCALE: gl.constexpr,
                     X_LAYOUT: gl.constexpr, MMA: gl.constexpr, X_SMEM: gl.constexpr):
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    k_start = pid_k * K_PER_SPLIT
    n_steps = gl.minimum(K_PER_SPLIT, K - k_start) // BK

    w_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES):
        _issue_w(w_desc, bars.index(i), w_ring.index(i), k_start + i * BK, n0, i < n_steps)

    offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, X_LAYOUT))
    offs_m = gl.arange(0, BM, layout=gl.SliceLayout(1, X_LAYOUT))
    mask_m = offs_m < M
    if ACT == 0:
        sx = gl.load(sa_ptr + offs_m, mask=mask_m, other=1.0)                  # [BM] per-token scales
    else:
        sx = gl.full([BM], 1.0, gl.float32, gl.SliceLayout(1, X_LAYOUT)) * gl.load(sa_ptr)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]    # [BM, BK]
    x_mask = mask_m[:, None]
    x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, BM, BK], X_SMEM)
    x = gl.load(x_ptrs, mask=x_mask & (n_steps > 0), other=0.0)
    acc = gl.zeros([BN, BM], gl.float32, MMA)
    for t in range(n_steps):
        slot = t % STAGES
        xn = gl.load(x_ptrs + (t + 1) * BK, mask=x_mask & (t + 1 < n_steps), other=0.0)
        q = gl.minimum(gl.maximum(gl.div_rn(x.to(gl.float32), sx[:, None]), -448.0), 448.0).to(gl.float8e4nv)
        xb = x_bufs.index(t % 2)
        xb.store(q)
        fence_async_shared()
        gl.thread_barrier()     # codes visible; every warp finished step t - 1's MMA (its slot and x buffer)
        if t > 0:
            prev = t - 1 + STAGES
            _issue_w(w_desc, bars.index((t - 1) % STAGES), w_ring.index((t - 1) % STAGES), k_start + prev * BK, n0,
                     prev < n_steps)
        mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
        acc = warpgroup_mma(w_ring.index(slot), xb.permute((1, 0)), acc)
        x = xn
    offs_n2 = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    offs_m2 = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    mask_n2 = offs_n2 < N
    mask_m2 = offs_m2 < M
    if ACT == 0:
        acc = acc * gl.load(sa_ptr + offs_m2, mask=mask_m2, other=1.0)[None, :]
    else:
        acc = acc * gl.load(sa_ptr)
    if WSCALE == 0:
        acc = acc * gl.load(sw_ptr)
    else:
        acc = acc * gl.load(sw_ptr + offs_n2, mask=mask_n2, other=0.0)[:, None]
    ym = offs_m2[None, :] * N + offs_n2[:, None]
    ymask = mask_m2[None, :] & mask_n2[:, None]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_n, pid_k, M, N, SPLIT)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def can_run(m: int, n: int, k: int, w_dtype: torch.dtype, x_dtype: torch.dtype, act: int, wscale: int,
            cfg: RingFp8Config | None = None) -> tuple[bool, str]:
    """(True, '') or (False, why): e4m3 weights, per-token (0) or static (2) activation scales, tensor (0) or
    channel (1) weight scales, bf16/fp16 x, 1 <= M <= block_m, K a multiple of block_k."""
    if w_dtype != torch.float8_e4m3fn:
        return False, f"weights are {w_dtype}, not float8_e4m3fn"
    if act not in (0, 2) or wscale not in (0, 1):
        return False, f"activation mode {act} / weight scale {wscale} (runs per-token or static x tensor or channel)"
    if x_dtype not in (torch.bfloat16, torch.float16):
        return False, f"activations are {x_dtype}, not bf16/fp16"
    if not 1 <= m <= (cfg.block_m if cfg else MAX_M):
        return False, f"M={m} is outside 1..{cfg.block_m if cfg else MAX_M}"
    cfg = cfg or default_config(m, n, k)
    if k % cfg.block_k:
        return False, f"K={k} is not a multiple of block_k {cfg.block_k}"
    return True, ""


_TILES: dict[tuple[int, int, int], tuple] = {}
_DEFAULT = {8: (64, 128, 3, 2, 0, 8), 16: (64, 128, 3, 2, 0, 16)}


def default_config(m: int, n: int, k: int) -> RingFp8Config:
    if not 1 <= m <= MAX_M:
        raise ValueError(f"ring_fp8 runs 1 <= M <= {MAX_M}; got M={m}")
    b = 8 if m <= 8 else 16
    return RingFp8Config(*_TILES.get((b, k, n), _DEFAULT[b]))


def _w_desc(w: torch.Tensor, bn: int, bk: int):
    """TMA descriptor of the [N, K] e4m3 weight in [BN, BK] boxes, 128-byte swizzled rows (64 at BK = 64)."""
    return tma_desc(w, list(w.shape), [w.shape[1], 1], [bn, bk], swizzle=min(128, bk))


def ring_fp8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act: int, wscale: int,
             act_scale: torch.Tensor | None = None, cfg: RingFp8Config | None = None) -> torch.Tensor:
    """x [M <= 16, K] bf16/fp16; w [N, K] e4m3; w_scale [1] or [N] fp32; act 0 (per-token, computed here) or 2
    (static `act_scale` [1]) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    ok, why = can_run(m, n, k, w.dtype, x.dtype, act, wscale, cfg)
    cfg = cfg or default_config(m, n, k)
    if not ok or cfg.block_n not in (64, 128) or cfg.block_m not in (8, 16) or cfg.block_k not in (64, 128):
        raise ValueError(f"ring_fp8 cannot run this call: {why or cfg} (needs block_n 64/128, block_m 8/16, "
                         f"block_k 64/128)")
    if act == 2 and act_scale is None:
        raise ValueError("ring_fp8 with static activation scales (act 2) needs act_scale")
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1 or (w.stride(0) * w.element_size()) % 16:
        raise ValueError(f"ring_fp8 needs a K-contiguous weight with 16-byte aligned rows; strides {w.stride()}")
    bk, bn, bm = cfg.block_k, cfg.block_n, cfg.block_m
    n_tiles, split, k_per_split, y, ws, cnt = split_k_plan(x, n, bn, bk, cfg.split_k, cfg.waves)
    sa = row_scales(x, FP8_MAX) if act == 0 else act_scale
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, bm, 32])
    x_layout = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                order=[1, 0])
    x_smem = gl.NVMMASharedLayout(swizzle_byte_width=min(128, bk), element_bitwidth=8, rank=2)
    _ring_fp8_kernel[(n_tiles, split)](
        x, _w_desc(w, bn, bk), w_scale, sa, y, ws, cnt, m, n, k, x.stride(0), k_per_split, bn, bk, bm, cfg.stages,
        split, act, wscale, x_layout, mma, x_smem, num_warps=4)
    return y


__all__ = ["MAX_M", "RingFp8Config", "can_run", "default_config", "ring_fp8"]
