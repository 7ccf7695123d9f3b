"""W4A16 at M <= 16 on Hopper tensor cores with the dequantized words in wgmma A-fragment order (Gluon; sm_90).

Same inputs as `tc_wna16` (packed [K/8, N] int32, code i of row j is k = 8j + i at bits 4i; scale [G, N]
fp32; zero [G, N] fp32 holding 2**23 + zero; a K step of BK rows inside one scale group). What differs is
where the unpacked weights live: Triton's `tl.dot` path builds the [BN, BK] tile in a layout of its own and
sends it through shared memory to reach the wgmma A-operand registers (16 KB stored and loaded per step and
program). Here the K axis of a step is permuted (`_frag_k`, applied identically to the activations, so the
sum over k is unchanged) such that the A fragment of wgmma m64n16k16 (bf16/fp16, k_width 2: the lanes of a
quad own kappa bits 1-2, registers kappa bit 0 and bits 3..) holds whole packed words of the thread's own
rows: each thread loads words j = 4 jh + 2 j1 + j0 with (j0, j1) its lane in the quad, unpacks them with
one LOP3 per code pair (code i, i + 4 = low / high half-word) and two packed FMAs, and the result is
already the A operand (`convert_layout(..., assert_trivial=True)`: no data movement).

Per program: BN = 64 columns (one warpgroup, 4 warps) or 128, BM = 16 activation rows (the MMA's N), a
K slice of K_PER_SPLIT; the next step's words, scales and activations are loaded into registers before the
current step is unpacked (register prefetch), the activations go through a 4 KB shared buffer (the B operand).
Split-K partials are summed by the last program per tile (the `split_k_triton` protocol).
Gluon does not run under TRITON_INTERPRET; `tc_wna16`'s `frag` option computes the same permuted product in
plain Triton and is what the CPU tests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_counters
from quantrt.platforms.cuda.kernels.tc_wna16 import _ASM_WORD_BF16, _ASM_WORD_F16

MAX_M = 16
_ASM_BF16_C = gl.constexpr(_ASM_WORD_BF16)
_ASM_F16_C = gl.constexpr(_ASM_WORD_F16)


@dataclass(frozen=True)
class GluonTcConfig:
    block_n: int = 64         # 64 (one warpgroup) or 128 (the MMA repeats along rows)
    block_k: int = 128        # 32..128, inside one scale group
    waves: int = 4            # split K to about this many programs per SM
    split_k: int = 0          # fixed split (0: from waves)


@gluon.jit
def _frag_k(offs_k):
    jh = offs_k >> 5
    i1 = (offs_k >> 4) & 1
    i0 = (offs_k >> 3) & 1
    j1 = (offs_k >> 2) & 1
    j0 = (offs_k >> 1) & 1
    i2 = offs_k & 1
    return 32 * jh + 16 * j1 + 8 * j0 + 4 * i2 + 2 * i1 + i0


@gluon.jit
def _load_step(p_ptr, s_ptr, z_ptr, x_ptr, k0, ok, N, G, stride_xm, offs_r, offs_n, mask_n, offs_kx, offs_mx,
               mask_mx, PACK: gl.constexpr):
    p = gl.load(p_ptr + (k0 // PACK + offs_r)[:, None] * N + offs_n[None, :], mask=ok & mask_n[None, :], other=0)
    g = k0 // G
    s = gl.load(s_ptr + g * N + offs_n, mask=ok & mask_n, other=0.0)
    z = gl.load(z_ptr + g * N + offs_n, mask=ok & mask_n, other=8388608.0)
    kk = k0 + offs_kx
    x = gl.load(x_ptr + offs_mx[None, :] * stride_xm + kk[:, None], mask=ok & mask_mx[None, :], other=0.0)
    return p, s, z, x


@gluon.jit
def _gluon_w4_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, G,
                     K_PER_SPLIT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                     SPLIT: gl.constexpr, IS_BF16: gl.constexpr,
                     P_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr, MMA: gl.constexpr, X_SMEM: gl.constexpr):
    PACK: gl.constexpr = 8
    RK: gl.constexpr = BK // PACK
    MAG: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    dt: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    offs_r = gl.arange(0, RK, layout=gl.SliceLayout(1, P_LAYOUT))
    offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, P_LAYOUT))
    mask_n = offs_n < N
    offs_kx = _frag_k(gl.arange(0, BK, layout=gl.SliceLayout(1, X_LAYOUT)))
    offs_mx = gl.arange(0, BM, layout=gl.SliceLayout(0, X_LAYOUT))
    mask_mx = offs_mx < M
    x_smem = gl.allocate_shared_memory(dt, [BK, BM], X_SMEM)
    acc = gl.zeros([BN, BM], gl.float32, MMA)
    k_start = pid_k * K_PER_SPLIT
    p, s, z, x = _load_step(p_ptr, s_ptr, z_ptr, x_ptr, k_start, k_start < K, N, G, stride_xm, offs_r, offs_n,
                            mask_n, offs_kx, offs_mx, mask_mx, PACK)
    for kt in range(0, K_PER_SPLIT, BK):
        k1 = k_start + kt + BK
        pn, sn, zn, xn = _load_step(p_ptr, s_ptr, z_ptr, x_ptr, k1, (k1 < K) & (kt + BK < K_PER_SPLIT), N, G,
                                    stride_xm, offs_r, offs_n, mask_n, offs_kx, offs_mx, mask_mx, PACK)
        nz = gl.zeros([RK, BN], dt, P_LAYOUT) + (-((z - 8388608.0) + MAG)).to(dt)[None, :]
        sb = gl.zeros([RK, BN], dt, P_LAYOUT) + s.to(dt)[None, :]
        if IS_BF16:
            c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
                _ASM_BF16_C, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [p, nz, sb], dtype=(gl.bfloat16,) * 8, is_pure=True,
                pack=1)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
                _ASM_F16_C, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [p, nz, sb], dtype=(gl.float16,) * 8, is_pure=True,
                pack=1)
        w = gl.join(gl.join(gl.join(c0, c4), gl.join(c2, c6)), gl.join(gl.join(c1, c5), gl.join(c3, c7)))
        w = gl.reshape(w, [RK // 4, 2, 2, BN, 2, 2, 2])              # [jh, j1, j0, n, i2, i1, i0]
        wt = gl.reshape(gl.permute(w, (3, 0, 5, 6, 1, 2, 4)), [BN, BK])  # [n, (jh, i1, i0, j1, j0, i2)]
        a = gl.convert_layout(wt, A_LAYOUT)
        gl.thread_barrier()                        # the previous step's MMA has read x_smem in every warp
        x_smem.store(x)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(a, x_smem, acc)
        p = pn
        s = sn
        z = zn
        x = xn
    offs_n2 = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    offs_m2 = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    ym = offs_m2[None, :] * N + offs_n2[:, None]
    ymask = (offs_m2 < M)[None, :] & (offs_n2 < N)[:, None]
    if SPLIT == 1:
        gl.store(y_ptr + ym, acc.to(dt), mask=ymask)
    else:
        gl.store(ws_ptr + pid_k * M * N + ym, acc, mask=ymask)
        gl.thread_barrier()
        cnt = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tot = gl.zeros([BN, BM], gl.float32, MMA)
            for sp in range(SPLIT):
                tot += gl.load(ws_ptr + sp * M * N + ym, mask=ymask, other=0.0, cache_modifier=".cg")
            gl.store(y_ptr + ym, tot.to(dt), mask=ymask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)


def _p_layout(rk: int, bn: int) -> gl.DistributedLinearLayout:
    """[RK, BN] words: lanes (j0, j1, n0, n1, n2), registers (n3, j2.., n6), warps (n4, n5)."""
    regs = [[0, 8]] + [[1 << b, 0] for b in range(2, rk.bit_length() - 1)] + ([[0, 64]] if bn == 128 else [])
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
                                      warp_bases=[[0, 16], [0, 32]], block_bases=[], shape=[rk, bn])


def can_run(m: int, k: int, group: int, bits: int, dtype: torch.dtype, cfg: GluonTcConfig | None = None) -> bool:
    """4-bit container, 1 <= M <= 16, bf16/fp16 activations, K and group multiples of block_k."""
    bk = (cfg or GluonTcConfig()).block_k
    return (bits == 4 and 1 <= m <= MAX_M and dtype in (torch.bfloat16, torch.float16) and group % bk == 0
            and k % bk == 0)


def tc_wna16_gluon(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                   cfg: GluonTcConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] bf16/fp16; packed [K/8, N] int32; scale, zero (2**23 + z) [G, N] fp32 -> [M, N]."""
    cfg = cfg or GluonTcConfig()
    m, k = x.shape
    n = packed.shape[1]
    if not can_run(m, k, group, 4, x.dtype, cfg) or cfg.block_n not in (64, 128) or not 32 <= cfg.block_k <= 128:
        raise ValueError(f"tc_wna16_gluon needs 4-bit words, 1 <= M <= {MAX_M}, bf16/fp16 x, block_n 64/128, "
                         f"block_k 32..128 dividing K and the group; got M={m}, K={k}, group={group}, "
                         f"dtype={x.dtype}, {cfg}")
    if x.stride(1) != 1:
        x = x.contiguous()
    bk, bn, bm = cfg.block_k, cfg.block_n, 16
    n_tiles = cdiv(n, bn)
    k_steps = k // bk
    split = cfg.split_k or max(1, min(k_steps, cdiv(cfg.waves * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else packed
    is_bf16 = x.dtype == torch.bfloat16
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, bm, 16])
    x_layout = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1], warps_per_cta=[4, 1],
                                order=[0, 1])
    x_smem = gl.NVMMASharedLayout(swizzle_byte_width=128 if bk >= 64 else 64, element_bitwidth=16, rank=2,
                                  transposed=True)
    _gluon_w4_kernel[(n_tiles, split)](
        x, packed, scale, zero, y, ws, cnt, m, n, k, x.stride(0), group, k_per_split, bn, bk, bm, split, is_bf16,
        _p_layout(bk // 8, bn), x_layout, mma, x_smem,
        num_warps=4)
    return y


__all__ = ["GluonTcConfig", "MAX_M", "can_run", "tc_wna16_gluon"]
