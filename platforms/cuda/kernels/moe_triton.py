"""Triton fused-MoE grouped GEMM: one launch per projection over tokens sorted and aligned by expert.

Imported lazily (needs triton). `moe_align` (device-side torch ops, no host sync, graph-capturable)
sorts the P = T*k (token, slot) pairs by expert and pads each expert's run to a multiple of BM:
  sorted_ids [NB*BM] pair index (P = padding), expert_ids [NB] expert of each BM-row block (-1 = none);
NB = min(P, ceil((P + E*(BM-1)) / BM)) bounds the blocks any routing needs, so the grid is fixed.
Program (block b, column tile n) reads rows A[sorted_ids // A_DIV] (A_DIV = k for the gate/up
projection reading x [T, K], 1 for down reading h [P, K]) and writes C[pair, n] (plus the expert's bias
[E, N] when HAS_BIAS, then times the routing weight when MUL_W), fp32 accumulation. With ACT (1 silu-mul,
2 gpt-oss's clamped SwiGLU) the N weight columns interleave gate and up (g0, u0, g1, u1, ...: the
kernel's `prepare` permutes them once) and the epilogue splits the [BM, BN] tile into gate / up halves
[BM, BN/2], applies the activation in fp32 and writes H[pair, N/2]: no [P, N] intermediate, no torch ops
between the two launches. Weights per WKIND:
  0 dense  W [E, N, K] compute dtype;
  1 fp8    W [E, N, K] fp8 with CHANNEL scales [E, N] (applied to the accumulator) or BLOCK scales
           [E, N/bn, K/bk] (applied to the tile per K step; BK divides bk; kept in gate-then-up row order,
           so with PAIRED columns a scale row is mapped back from the interleaved index);
  2 int    packed [E, K/PACK, N] int32, scale [E, G, N] fp32 / fp16 / bf16, zero [E, G, N] uint8 z or fp32
           2**23 + z, or none (one zero point for all) (`pack_int_weight` layout): code planes dequantized in
           registers, PACK tl.dot calls per K step;
  3 fp4    NVFP4 / MXFP4: packed e2m1 [E, K/8, N] int32 and block scales [E, K/FB, N] (`pack_micro_weight`
           layout, SCALE_KIND e8m0 / e4m3 / fp32), per-column global scales [E, N] on the accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode
from quantrt.platforms.cuda.kernels.fp4_triton import _e2m1_pair
from quantrt.platforms.cuda.kernels.fp4_triton import _scale as _fp4_scale
from quantrt.platforms.cuda.kernels.wna16_triton import load_scale_zero


@dataclass(frozen=True)
class MoeConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def moe_align(ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_ids [NB*BM] int32, expert_ids [NB] int32) as described above."""
    flat = ids.flatten().to(torch.int64)                                   # [P]
    p = flat.numel()
    nb = max(1, min(p, cdiv(p + num_experts * (bm - 1), bm)))
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))                                    # [E] (bincount would sync)
    padded = (counts + bm - 1) // bm * bm
    ends = padded.cumsum(0)
    starts = ends - padded
    order = flat.argsort(stable=True)                                      # pairs sorted by expert
    seg = flat[order]
    rank = torch.arange(p, device=flat.device) - (counts.cumsum(0) - counts)[seg]
    sorted_ids = torch.full((nb * bm,), p, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[seg] + rank] = order.to(torch.int32)
    blk = torch.searchsorted(ends, torch.arange(nb, device=flat.device) * bm, right=True)
    expert_ids = torch.where(blk < num_experts, blk, -1).to(torch.int32)
    return sorted_ids, expert_ids


def _act_args(act: str | tuple) -> tuple[int, float, float]:
    """(ACT code, alpha, limit) of an activation descriptor (quantrt.quant.moe_kernel.Activation) or ""."""
    if act == "":
        return 0, 1.0, 0.0
    if act == "silu":
        return 1, 1.0, 0.0
    if isinstance(act, tuple) and len(act) == 3 and act[0] == "swiglu_clamped":
        return 2, float(act[1]), float(act[2])
    raise ValueError(f"MoE epilogue activation {act!r}: expected \"\", \"silu\" or (\"swiglu_clamped\", alpha, limit)")


@triton.jit
def _moe_kernel(a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, sid_ptr, eid_ptr, tw_ptr, b_ptr, N, K: tl.constexpr, P, stride_am, G,
                SN, SK, SBN, SBK, A_DIV: tl.constexpr, WKIND: tl.constexpr, BLOCK_SCALE: tl.constexpr, BITS: tl.constexpr,
                MUL_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                DOT_F32: tl.constexpr, EARLY_EXIT: tl.constexpr, FB: tl.constexpr = 16,
                SCALE_KIND: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False, ACT: tl.constexpr = 0,
                PAIRED: tl.constexpr = False, alpha=1.0, limit=0.0, ZC=0.0, HAS_ZERO: tl.constexpr = True):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(eid_ptr + pid_b)
    if EARLY_EXIT:  # padding blocks past the last expert's run (the interpreter lacks early returns)
        if e < 0:
            return
    rows = tl.load(sid_ptr + pid_b * BM + tl.arange(0, BM))               # [BM] pair index
    mask_m = (rows < P) & (e >= 0)
    e64 = tl.maximum(e, 0).to(tl.int64)
    arow = (rows // A_DIV).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    dt = a_ptr.dtype.element_ty
    if WKIND == 2:
        PACK: tl.constexpr = 32 // BITS
        RK: tl.constexpr = BK // PACK
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_j = tl.arange(0, RK)
        for k0 in range(0, K, BK):
            kj = k0 + offs_j * PACK                                        # [RK] first k of each packed row
            mw = (kj < K)[:, None] & mask_n[None, :]
            p = tl.load(w_ptr + e64 * (K // PACK) * N + (kj // PACK)[:, None] * N + offs_n[None, :],
                        mask=mw, other=0)
            g = e64 * G * N + (kj // (K // G))[:, None] * N + offs_n[None, :]
            s, z = load_scale_zero(s_ptr, z_ptr, g, mw, ZC, HAS_ZERO, False)
            z = z + 8388608.0                                              # 2**23 + zero, once per step
            for i in tl.static_range(PACK):
                q = ((p >> (BITS * i)) & MASK) | 0x4B000000
                w = ((q.to(tl.float32, bitcast=True) - z) * s).to(dt)     # [RK, BN]
                a = tl.load(a_ptr + arow[:, None] * stride_am + (kj + i)[None, :],
                            mask=mask_m[:, None] & (kj < K)[None, :], other=0.0)   # [BM, RK]
                if DOT_F32:  # the interpreter multiplies bf16 as raw bits in tl.dot
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
                else:
                    acc += tl.dot(a, w)
    elif WKIND == 3:
        RK4: tl.constexpr = BK // 8
        offs_j4 = tl.arange(0, RK4)
        for k0 in range(0, K, BK):
            kj = k0 + offs_j4 * 8                                          # [RK] first k of each packed row
            mw = (kj < K)[:, None] & mask_n[None, :]
            p = tl.load(w_ptr + e64 * (K // 8) * N + (kj // 8)[:, None] * N + offs_n[None, :], mask=mw, other=0)
            s = _fp4_scale(s_ptr + e64 * (K // FB) * N, (kj // FB)[:, None] * N + offs_n[None, :], mw, SCALE_KIND)
            for i in tl.static_range(4):
                c_lo, c_hi = _e2m1_pair(p, i)                              # codes i and i + 4
                w = (c_lo * s).to(dt)                                      # exact for e8m0 / e4m3 scales
                w2 = (c_hi * s).to(dt)
                a = tl.load(a_ptr + arow[:, None] * stride_am + (kj + i)[None, :],
                            mask=mask_m[:, None] & (kj < K)[None, :], other=0.0)   # [BM, RK]
                a2 = tl.load(a_ptr + arow[:, None] * stride_am + (kj + i + 4)[None, :],
                             mask=mask_m[:, None] & (kj < K)[None, :], other=0.0)
                if DOT_F32:
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
                    acc += tl.dot(a2.to(tl.float32), w2.to(tl.float32))
                else:
                    acc += tl.dot(a, w)
                    acc += tl.dot(a2, w2)
        acc = acc * tl.load(z_ptr + e64 * N + offs_n, mask=mask_n, other=0.0)[None, :]   # global scales
    else:
        offs_k = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            mk = kk < K
            a = tl.load(a_ptr + arow[:, None] * stride_am + kk[None, :], mask=mask_m[:, None] & mk[None, :],
                        other=0.0)                                          # [BM, BK]
            w = tl.load(w_ptr + e64 * N * K + offs_n[None, :] * K + kk[:, None],
                        mask=mk[:, None] & mask_n[None, :], other=0.0)      # [BK, BN]
            if WKIND == 1:
                wf = w.to(tl.float32)
                if BLOCK_SCALE:
                    srow = offs_n
                    if PAIRED:  # interleaved column -> its gate / up row in the scale layout
                        srow = (offs_n % 2) * (N // 2) + offs_n // 2
                    sb = tl.load(s_ptr + e64 * SN * SK + (srow // SBN) * SK + k0 // SBK, mask=mask_n, other=0.0)
                    wf = wf * sb[None, :]
                w = wf.to(dt)
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(a, w)
        if WKIND == 1 and not BLOCK_SCALE:
            acc = acc * tl.load(s_ptr + e64 * N + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:  # per-expert bias [E, N] fp32, before the routing weight
        acc = acc + tl.load(b_ptr + e64 * N + offs_n, mask=mask_n, other=0.0)[None, :]
    if MUL_W:
        acc = acc * tl.load(tw_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if ACT != 0:  # columns (gate j, up j) pairs -> h[:, j]
        HN: tl.constexpr = BN // 2
        g, u = tl.split(tl.reshape(acc, [BM, HN, 2]))                     # [BM, BN/2] each, fp32
        if ACT == 2:  # gpt-oss: (clamp(u, +-limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit)
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            hh = (u + 1.0) * (g * tl.sigmoid(g * alpha))
        else:         # silu(g) * u
            hh = g * tl.sigmoid(g) * u
        offs_h = pid_n * HN + tl.arange(0, HN)
        cptr = c_ptr + rows.to(tl.int64)[:, None] * (N // 2) + offs_h[None, :]
        tl.store(cptr, hh.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_h < N // 2)[None, :])
    else:
        cptr = c_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(cptr, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def moe_gemm(a: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor, expert_ids: torch.Tensor, n: int,
             num_pairs: int, a_div: int, wkind: int, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None, block: tuple[int, int] | None = None, bits: int = 4,
             topk_weights: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
             cfg: MoeConfig | None = None, fp4: tuple[int, int] = (16, 0), bias: torch.Tensor | None = None,
             act: str | tuple = "", paired: bool | None = None, zero_const: float = 0.0) -> torch.Tensor:
    """a [rows, K] compute dtype -> C [P, N] (out_dtype, default a.dtype); see the module docstring.
    bias: per-expert [E, N] fp32 added to the accumulator in the epilogue (before the routing weight).
    act: "" (none), "silu" or ("swiglu_clamped", alpha, limit) on interleaved gate/up columns -> H [P, N/2].
    paired: the N columns interleave gate and up (default: when act is set; needed for fp8 block scales).

    block: the fp8 BLOCK scale shape (bn, bk) or None (channel scales [E, N]); int: scale [E, G, N] (fp32 / fp16 /
    bf16) and zero [E, G, N] (uint8 z or fp32 2**23 + z), or None with every zero point `zero_const`;
    fp4: (micro block, scale kind) with scale [E, K/B, N] and zero = the global scales [E, N]."""
    cfg = cfg or MoeConfig()
    k = a.shape[1]
    if a.stride(1) != 1:
        a = a.contiguous()
    code, alpha, limit = _act_args(act)
    paired = bool(code) if paired is None else paired
    if code and not paired:
        raise ValueError("a fused activation reads interleaved gate/up columns (paired=True)")
    if paired and (n % 2 or cfg.block_n % 2 or topk_weights is not None):
        raise ValueError(f"paired gate/up columns need an even N (got {n}) and BN (got {cfg.block_n}) and no routing weight")
    c = torch.empty((num_pairs, n // 2 if code else n), device=a.device, dtype=out_dtype or a.dtype)
    sn = sk = g = 0
    bn_, bk_ = block or (1, 1)
    bk = cfg.block_k
    if wkind == 1 and block is not None:
        sn, sk = scale.shape[1], scale.shape[2]
        bk = min(bk, bk_)
        assert bk_ % bk == 0, "the K step must lie inside one fp8 scale block"
    if wkind == 2:
        g = scale.shape[1]
        bk = max(bk, 32 // bits * 16)                                      # >= 16 rows per plane for tl.dot
    if wkind == 3:
        bk = max(bk, 128)
    grid = (expert_ids.numel(), cdiv(n, cfg.block_n))
    dummy = scale if scale is not None else w
    _moe_kernel[grid](a, w, dummy, zero if zero is not None else dummy, c, sorted_ids, expert_ids,
                      topk_weights if topk_weights is not None else dummy,
                      bias if bias is not None else dummy, n, k, num_pairs, a.stride(0), g,
                      sn, sk, bn_, bk_, A_DIV=a_div, WKIND=wkind, BLOCK_SCALE=block is not None, BITS=bits,
                      MUL_W=topk_weights is not None, BM=sorted_ids.numel() // expert_ids.numel(),
                      BN=cfg.block_n, BK=bk, DOT_F32=interpret_mode(), EARLY_EXIT=not interpret_mode(), FB=fp4[0], SCALE_KIND=fp4[1],
                      HAS_BIAS=bias is not None, ACT=code, PAIRED=paired, alpha=alpha, limit=limit,
                      ZC=float(zero_const), HAS_ZERO=zero is not None or wkind != 2, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
    return c


__all__ = ["MoeConfig", "moe_align", "moe_gemm"]
