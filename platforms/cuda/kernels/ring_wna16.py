"""W4A16 at M <= 32 on Hopper: packed words streamed by TMA through a shared-memory ring (Gluon; sm_90).

Same weights as `tc_wna16` / `skinny_wna16` (packed [K/8, N] int32, code i of row j is k = 8j + i at bits 4i;
scale [G, N] fp32, or fp16 / bf16 (half the scale bytes; `pack_int_weight`'s compact form); zero [G, N] uint8
z (compact) or fp32 2**23 + z, or one constant for symmetric checkpoints).
The register-prefetch kernels were limited by the weight bytes in flight per SM (PERFORMANCE.md, seventh pass):
here the next STAGES K steps of words, scales and zeros are in flight as TMA copies into shared memory, which
costs no registers, and each step waits on its own mbarrier.

Per program: BN = 64 (one warpgroup) or 128 columns (in one warpgroup, or in two that share the activations),
a K slice of K_PER_SPLIT rows in BK-row steps (BK divides the scale group):
- the words are read through a 3-D view [N/32 column boxes, K/8 rows, 32 columns] with the 128-byte swizzle
  (16-byte chunk ^= row & 7); each thread takes rows j0, j1 and columns c0, c1, c4 from its lane, so the
  32 lanes of every ld.shared hit 32 different banks (`_p_layout`);
- one LOP3 per code pair gives (code i, code i + 4) as bf16/fp16 MAGIC + q, one packed FMA makes q - z
  exactly; the K axis of a step is permuted (`_frag_k`, applied to the activations too, so the sum over k is
  unchanged) and the columns of a box are permuted (`_col_of_row`, undone at the store) so that these
  registers already are the wgmma m64nBMk16 A operand (the `convert_layout` moves no data);
- the step's MMA starts from zero and its [BN, BM] fp32 result is scaled by the group scale once per column
  (s * sum (q - z) x): no per-code scale multiply and no rounding of the dequantized weight; with float
  offsets (OFFSET: w = q s + o, zero 0) it adds o times the step's sum of x per row (a register reduction);
- the activations [BK, BM] (permuted, zero columns past M) are loaded into registers one step ahead and
  stored to a small shared buffer, the wgmma B operand (BM = 8 for M <= 8, 16 for M <= 16, else 32).
Split-K partials are summed by the last program per column tile (the `split_k_triton` protocol); at M <= 2 by
the last split from tagged words, with no fence or counter (`ring_common.store_split_k_row`, 1.0-1.5 us less at
M = 1).
H100, M = 1 (bf16 cuBLAS in the same run): 8192² 16.4 us (47.0), 4096 x 28672 24.6 us (81.5, 85% of copy).
Gluon does not run under TRITON_INTERPRET: the CPU tests check `ring_common.ring_reference` (the same
scale-after-MMA product with torch ops), the index algebra of the layouts, and that the kernel compiles for sm_90;
the kernel itself is tested natively (-m accelerator).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma

from quantrt.platforms.cuda.kernels._common import env_tiles, pdl_release_at, pdl_supported, stream_pdl
from quantrt.platforms.cuda.kernels.ring_common import (
    TAGGED_MAX_M,
    g_done,
    g_rec,
    g_stamp,
    gdc_launch_dependents,
    gdc_wait,
    gsum,
    split_count,
    split_k_plan,
    store_split_k,
    store_split_k_row,
    tma_desc,
)
from quantrt.platforms.cuda.kernels.ring_prologue import (
    PRO_NORM,
    PRO_NORM_PARTS,
    RingPrologue,
    norm_rstd,
    parts_rstd,
    pro_load,
    pro_tile,
)
from quantrt.platforms.cuda.kernels.trace import trace_slot

MAX_M = 32
PDL_MAX_M = 8   # PDL launch (`_common.stream_pdl`) to here: H100 e2e int4 batch 2/4/8/16 -5/-4/-2.5/+2% (12th session)


def _asm_qz(magic: str, one: str, fma: str) -> str:
    """PTX: one packed word ($8) -> (code i, code i + 4) as two 16-bit (q - z) values $i / $(i + 4), i = 0..3;
    $9 holds -(MAGIC + z). Per pair: LOP3 (w >> 4i) & 0x000F000F | MAGIC (= MAGIC + q, exact), one packed FMA."""
    lines = [".reg .b32 t, one, nz2;", f"mov.b32 one, {one};", "mov.b32 nz2, {$9, $9};"]
    for i in range(4):
        if i:
            lines.append(f"shr.u32 t, $8, {4 * i};")
        lines += [f"lop3.b32 t, {'t' if i else '$8'}, 0x000F000F, {magic}, 0xEA;", f"{fma} t, t, one, nz2;",
                  f"mov.b32 {{${i}, ${i + 4}}}, t;"]
    return "{\n" + "\n".join(lines) + "\n}\n"


_ASM_QZ_BF16 = _asm_qz("0x43004300", "0x3F803F80", "fma.rn.bf16x2")
_ASM_QZ_F16 = _asm_qz("0x64006400", "0x3C003C00", "fma.rn.f16x2")
_ASM_QZ_BF16_C = gl.constexpr(_ASM_QZ_BF16)
_ASM_QZ_F16_C = gl.constexpr(_ASM_QZ_F16)


@dataclass(frozen=True)
class RingConfig:
    block_n: int = 64        # 64 (one warpgroup) or 128 (one or two warpgroups: `warps`)
    block_k: int = 128       # 32..128, divides the scale group
    stages: int = 2          # K steps of words in flight per program
    waves: int = 4           # split K to about this many programs per SM
    split_k: int = 0         # fixed split (0: from waves)
    block_m: int = 8         # wgmma N: 8 (M <= 8), 16 or 32
    pdl: bool = False        # PDL launch; also on with "ring" in QUANTRT_CUDA_STREAM_PDL (`_common.stream_pdl`)
    x_vec: bool = True       # activations loaded as 16-byte vectors in k order, permuted in registers
    warps: int = 4           # 4, or 8 with block_n 128: one warpgroup per 64 columns, sharing the activations


@gluon.jit
def _frag_k(offs_k):
    """Position in a BK step -> the k it holds: the A fragment of one thread covers whole packed words."""
    jh = offs_k >> 5
    i1 = (offs_k >> 4) & 1
    i0 = (offs_k >> 3) & 1
    j1 = (offs_k >> 2) & 1
    j0 = (offs_k >> 1) & 1
    i2 = offs_k & 1
    return 32 * jh + 16 * j1 + 8 * j0 + 4 * i2 + 2 * i1 + i0


@gluon.jit
def _issue(p_desc, s_desc, z_desc, bar, p_buf, s_buf, z_buf, step, k_start, n0, N, G,
           BK: gl.constexpr, HAS_ZERO: gl.constexpr, pred):
    """Step `step` of the program's K slice into one ring slot: words, scales (and zeros), one mbarrier."""
    k0 = k_start + step * BK
    g = k0 // G
    nbytes: gl.constexpr = (p_desc.block_type.nbytes + s_desc.block_type.nbytes
                            + (z_desc.block_type.nbytes if HAS_ZERO else 0))
    mbarrier.expect(bar, nbytes, pred=pred)
    tma.async_copy_global_to_shared(p_desc, [n0 // 32, k0 // 8, 0], bar, p_buf, pred=pred)
    tma.async_copy_global_to_shared(s_desc, [g * N + n0], bar, s_buf, pred=pred)
    if HAS_ZERO:
        tma.async_copy_global_to_shared(z_desc, [g * N + n0], bar, z_buf, pred=pred)


@gluon.jit
def _col_of_row(r):
    """MMA row r -> the tile column it holds: row bits (r0, r1, r2, r3, r4) are box columns (c0, c1, c4, c2, c3)."""
    return (r & ~31) | (((r >> 2) & 1) << 4) | (((r >> 4) & 1) << 3) | (((r >> 3) & 1) << 2) | (r & 3)


@gluon.jit
def _by_row(v, NB: gl.constexpr, BN: gl.constexpr, MMA: gl.constexpr):
    """[BN] per column [box, c4, c3, c2, c1, c0] -> MMA row order, in the MMA's row slice layout."""
    v = gl.reshape(gl.permute(gl.reshape(v, [NB, 2, 2, 2, 2, 2]), (0, 2, 3, 1, 4, 5)), [BN])
    return gl.convert_layout(v, gl.SliceLayout(1, MMA))


@gluon.jit
def _ring_step(acc, p, s, nz, o, x, x_smem, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
               NB: gl.constexpr, RK: gl.constexpr, IS_BF16: gl.constexpr, X_VEC: gl.constexpr,
               P_LAYOUT: gl.constexpr, MMA: gl.constexpr, OFFSET: gl.constexpr):
    """One K step: unpack the words to q - z, the MMA with the activations, scale per column into acc; OFFSET
    (z = 0, float offsets o [BN] by column): + o times the step's sum of x per row (a register reduction)."""
    dt: gl.constexpr = x.dtype
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    nzb = gl.zeros([NB, RK, 32], dt, P_LAYOUT) + gl.expand_dims(nz, 1)
    if IS_BF16:
        c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
            _ASM_QZ_BF16_C, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [p, nzb], dtype=(gl.bfloat16,) * 8, is_pure=True,
            pack=1)
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
            _ASM_QZ_F16_C, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [p, nzb], dtype=(gl.float16,) * 8, is_pure=True,
            pack=1)
    w = gl.join(gl.join(gl.join(c0, c4), gl.join(c2, c6)), gl.join(gl.join(c1, c5), gl.join(c3, c7)))
    # the unpacked tile [box, jh, j1, j0, c4, c3, c2, c1, c0, i2, i1, i0] in MMA order
    # [(box, c3, c2, c4, c1, c0), (jh, i1, i0, j1, j0, i2)]
    w = gl.reshape(w, [NB, RK // 4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    wt = gl.reshape(gl.permute(w, (0, 5, 6, 4, 7, 8, 1, 10, 11, 2, 3, 9)), [BN, BK])
    a = gl.convert_layout(wt, A_LAYOUT)
    s = _by_row(s, NB, BN, MMA)
    if OFFSET:  # [BM] sums of the step's x (k order does not matter)
        xs = gl.convert_layout(gsum(x.to(gl.float32), 1 if X_VEC else 0), gl.SliceLayout(0, MMA))
    if X_VEC:   # [m, (jh, j1, j0, i2, i1, i0)] -> [(jh, i1, i0, j1, j0, i2), m]
        x = gl.reshape(gl.permute(gl.reshape(x, [BM, BK // 32, 2, 2, 2, 2, 2]), (1, 5, 6, 2, 3, 4, 0)), [BK, BM])
    x_smem.store(x)
    fence_async_shared()
    gl.thread_barrier()
    part = warpgroup_mma(a, x_smem, gl.zeros_like(acc), use_acc=False)
    if OFFSET:
        return acc + part * s[:, None] + _by_row(o, NB, BN, MMA)[:, None] * xs[None, :]
    return acc + part * s[:, None]


@gluon.jit
def _ring_w4_kernel(x_ptr, p_desc, s_desc, z_desc, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, G: gl.constexpr, ZC,
                    d_ptr, nw_ptr, r_ptr, stride_dm, stride_rm, eps, n_parts, e_res_ptr, e_parts_ptr,
                    K_PER_SPLIT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, BM: gl.constexpr,
                    STAGES: gl.constexpr, SPLIT: gl.constexpr, IS_BF16: gl.constexpr, HAS_ZERO: gl.constexpr,
                    PDL: gl.constexpr, X_VEC: gl.constexpr, P_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr,
                    X_LAYOUT: gl.constexpr,
                    MMA: gl.constexpr, X_SMEM: gl.constexpr, TRIGGER: gl.constexpr = False,
                    OFFSET: gl.constexpr = False, TAGGED: gl.constexpr = False, PRO: gl.constexpr = 0,
                    NR: gl.constexpr = 1, KP: gl.constexpr = 1024, ROW: gl.constexpr = None,
                    RES: gl.constexpr = False, tr_ptr=None, tr_id=0, TRACE: gl.constexpr = False,
                    EARLY_RELEASE: gl.constexpr = False):
    tr_rec = g_rec(tr_ptr, gl.program_id(1) * gl.num_programs(0) + gl.program_id(0), TRACE)   # `trace` timelines
    g_stamp(tr_rec, 0, TRACE)
    RK: gl.constexpr = BK // 8
    NB: gl.constexpr = BN // 32                              # words tile [NB, RK, 32]: boxes x rows x columns
    MAG: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    Z_LAYOUT: gl.constexpr = gl.SliceLayout(1, P_LAYOUT)                   # [NB, 32]
    dt: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    k_start = pid_k * K_PER_SPLIT
    n_steps = gl.minimum(K_PER_SPLIT, K - k_start) // BK

    p_ring = gl.allocate_shared_memory(gl.int32, [STAGES, NB, RK, 32], p_desc.layout)
    s_ring = gl.allocate_shared_memory(s_desc.dtype, [STAGES, BN], s_desc.layout)      # fp32, or fp16 / bf16
    if HAS_ZERO:
        # uint8 z or fp32; a TMA destination must be 128-byte aligned: 64 uint8 zeros take every other row
        ZS: gl.constexpr = 2 if BN * z_desc.dtype.primitive_bitwidth < 1024 else 1
        z_ring = gl.allocate_shared_memory(z_desc.dtype, [STAGES * ZS, BN], z_desc.layout)
    else:
        z_ring = s_ring
        ZS: gl.constexpr = 1
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES):
        _issue(p_desc, s_desc, z_desc, bars.index(i), p_ring.index(i), s_ring.index(i), z_ring.index(i * ZS), i,
               k_start, n0, N, G, BK, HAS_ZERO, i < n_steps)
    if EARLY_RELEASE:  # the next op is small and reads before its own wait (`_common.pdl_release_at`)
        gdc_launch_dependents()
    if PDL:  # weights are not written by the previous kernel; x (and the split-K buffers) are
        gdc_wait()
    g_stamp(tr_rec, 1, TRACE)

    if X_VEC:   # [BM, BK] in k order (16-byte loads), permuted to _frag_k order in registers
        offs_kx = gl.arange(0, BK, layout=gl.SliceLayout(0, X_LAYOUT))
        offs_mx = gl.arange(0, BM, layout=gl.SliceLayout(1, X_LAYOUT))
        x_ptrs = x_ptr + offs_mx[:, None] * stride_xm + (k_start + offs_kx)[None, :]
        x_mask = (offs_mx < M)[:, None]
    else:       # [BK, BM] gathered in _frag_k order
        offs_kx = _frag_k(gl.arange(0, BK, layout=gl.SliceLayout(1, X_LAYOUT)))
        offs_mx = gl.arange(0, BM, layout=gl.SliceLayout(0, X_LAYOUT))
        x_ptrs = x_ptr + offs_mx[None, :] * stride_xm + (k_start + offs_kx)[:, None]
        x_mask = (offs_mx < M)[None, :]
    x_smem = gl.allocate_shared_memory(dt, [BK, BM], X_SMEM)
    if PRO == 0:
        x = gl.load(x_ptrs, mask=x_mask & (n_steps > 0), other=0.0)
        b = x
        x1 = x
        b1 = x
        w = x
        r0 = 0.0
        r1 = 0.0
    else:       # `ring_prologue`: rows 0..NR-1 as [BK] vectors in _frag_k order (layout without x_vec)
        kk = k_start + offs_kx
        res_mask = (offs_kx >= 0) & (pid_n == 0)            # column tile 0 writes the new residual rows
        if PRO == 1:
            b_ptr = d_ptr
            stride_bm = stride_dm
        elif PRO == 4:  # d_ptr: the partial sums of squares [M, n_parts]; x already holds the delta
            b_ptr = x_ptr
            stride_bm = stride_xm
        else:   # gate_up [M, 2K]: up at column K + k
            b_ptr = x_ptr + K
            stride_bm = stride_xm
        # the first step's loads go out before the norm's row reads and reduction (one L2 round trip for both)
        x, b, x1, b1, w = pro_load(x_ptr, b_ptr, nw_ptr, stride_xm, stride_bm, kk, n_steps > 0, NR, PRO)
        r0 = 0.0
        r1 = 0.0
        if PRO == 1:
            r0, r1 = norm_rstd(x_ptr, d_ptr, stride_xm, stride_dm, K, eps, NR, KP, ROW)
        elif PRO == 4:
            r0, r1 = parts_rstd(d_ptr, stride_dm, n_parts, K, eps, NR, KP, ROW)
    nz = (gl.zeros([NB, 32], gl.float32, Z_LAYOUT) - (MAG + ZC)).to(dt)
    acc = gl.zeros([BN, BM], gl.float32, MMA)
    for t in range(n_steps):
        slot = t % STAGES
        if PRO == 0:
            xn = gl.load(x_ptrs + (t + 1) * BK, mask=x_mask & (t + 1 < n_steps), other=0.0)
            bn = b
            x1n = x1
            b1n = b1
            wn = w
        else:
            xn, bn, x1n, b1n, wn = pro_load(x_ptr, b_ptr, nw_ptr, stride_xm, stride_bm, kk + (t + 1) * BK,
                                            t + 1 < n_steps, NR, PRO)
        mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
        p = p_ring.index(slot).load(P_LAYOUT)                               # [NB, RK, 32] int32
        s = s_ring.index(slot).load(S_LAYOUT).to(gl.float32)                # [BN] fp32, by column
        if OFFSET:    # z_ring holds the float offsets; the zero point is 0 (nz from ZC = 0)
            o = z_ring.index(slot * ZS).load(S_LAYOUT)                      # [BN] fp32, by column
        elif HAS_ZERO:
            z = z_ring.index(slot * ZS).reshape([NB, 32]).load(Z_LAYOUT)
            if z_desc.dtype == gl.uint8:      # compact zero points: z itself
                nz = (-(z.to(gl.float32) + MAG)).to(dt)
            else:                             # fp32 2**23 + z
                nz = (-((z - 8388608.0) + MAG)).to(dt)
            o = s
        else:
            o = s
        gl.thread_barrier()                 # every warp holds its words: the slot can be refilled
        fence_async_shared()
        _issue(p_desc, s_desc, z_desc, bars.index(slot), p_ring.index(slot), s_ring.index(slot),
               z_ring.index(slot * ZS), t + STAGES, k_start, n0, N, G, BK, HAS_ZERO, t + STAGES < n_steps)
        if PRO == 0:
            xin = x
        else:
            xin = pro_tile(x, b, x1, b1, w, r0, r1, offs_mx, r_ptr + kk + t * BK, stride_rm, res_mask, NR, PRO)
        acc = _ring_step(acc, p, s, nz, o, xin, x_smem, BN, BK, BM, NB, RK, IS_BF16, X_VEC, P_LAYOUT, MMA, OFFSET)
        x = xn
        b = bn
        x1 = x1n
        b1 = b1n
        w = wn
    g_stamp(tr_rec, 2, TRACE)
    if TRIGGER:  # main loop done: the next PDL op may be scheduled (it waits for this grid's end)
        gdc_launch_dependents()
    offs_n2 = n0 + _col_of_row(gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)))
    offs_m2 = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    ym = offs_m2[None, :] * N + offs_n2[:, None]
    ymask = (offs_m2 < M)[None, :] & (offs_n2 < N)[:, None]
    if TAGGED:   # M <= TAGGED_MAX_M: tagged partials, no arrival counter (`store_split_k_row`)
        store_split_k_row(acc, y_ptr, ws_ptr, offs_n2, offs_m2, pid_k, M, N, SPLIT, RES, e_res_ptr, e_parts_ptr,
                          gl.num_programs(0), pid_n)
    else:
        store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_n, pid_k, M, N, SPLIT)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    g_done(tr_rec, tr_id, TRACE)


def _p_layout(rk: int, bn: int, warps: int = 4) -> gl.DistributedLinearLayout:
    """The words tile [NB, RK, 32] (n = 32 box + c) in the wgmma A-fragment order (after `_frag_k`): lanes
    (j0, j1, c0, c1, c4), registers (c2, j2.., box1), warps (c3, box0; box1 with 8 warps). With the 128-byte
    swizzle (16-byte chunk ^= row & 7) the 32 lanes of every ld.shared hit 32 different banks."""
    box1 = [[2, 0, 0]] if bn == 128 else []   # in registers, or (8 warps) on the second warpgroup
    regs = [[0, 0, 4]] + [[0, 1 << b, 0] for b in range(2, rk.bit_length() - 1)] + (box1 if warps == 4 else [])
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2],
                                                                  [0, 0, 16]],
                                      warp_bases=[[0, 0, 8], [1, 0, 0]] + (box1 if warps == 8 else []),
                                      block_bases=[], shape=[bn // 32, rk, 32])


def _s_layout(bn: int, warps: int = 4) -> gl.DistributedLinearLayout:
    """The [BN] scales by column, held by the threads whose MMA rows hold those columns (quad lanes broadcast)."""
    box1 = [[64]] if bn == 128 else []
    return gl.DistributedLinearLayout(reg_bases=[[4]] + (box1 if warps == 4 else []),
                                      lane_bases=[[0], [0], [1], [2], [16]],
                                      warp_bases=[[8], [32]] + (box1 if warps == 8 else []), block_bases=[], shape=[bn])


def can_run(m: int, n: int, k: int, group: int, bits: int, dtype: torch.dtype, cfg: RingConfig | None = None
            ) -> tuple[bool, str]:
    """(True, '') or (False, why): 4-bit container, 1 <= M <= block_m (<= 32), bf16/fp16 x, K and group
    multiples of block_k, N a multiple of 32 (the [N/32, K/8, 32] TMA view)."""
    if bits != 4:
        return False, f"{bits}-bit container (ring_wna16 reads 4-bit words)"
    if not 1 <= m <= (cfg.block_m if cfg else MAX_M):
        return False, f"M={m} is outside 1..{cfg.block_m if cfg else MAX_M}"
    cfg = cfg or default_config(m, n, k)
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"activations are {dtype}, not bf16/fp16"
    if k % cfg.block_k or group % cfg.block_k:
        return False, f"K={k} and group {group} must be multiples of block_k {cfg.block_k}"
    if n % 32:
        return False, f"N={n} is not a multiple of 32"
    return True, ""


# (M bucket 1 / 8 / 16 / 32, K, N) -> RingConfig fields; H100 sweep (bench/_ring_sweep.py, docs/PERFORMANCE.md)
_TILES: dict[tuple[int, int, int], tuple] = {
    (1, 4096, 4096): (128, 128, 2, 2, 0, 8),      # 7.7-8.0 us; 7.2 launched with PDL
    (1, 8192, 8192): (128, 128, 2, 2, 0, 8),      # with PDL (twelfth session): 15.7 us vs 16.0-16.5 for the default
    (1, 4096, 6144): (128, 128, 2, 2, 0, 8),      # with PDL: 8.5 us vs 8.7
    (1, 4096, 28672): (128, 128, 2, 2, 0, 8),     # with PDL (thirteenth session): 24.9 us vs 26.5 for 4 stages, 1 wave
    (1, 14336, 4096): (128, 128, 2, 2, 0, 8),     # with PDL: 14.9 us vs 15.1 for the default
    (8, 4096, 28672): (128, 128, 2, 2, 0, 8),     # 28.1 us at M = 8
    (8, 4096, 4096): (64, 128, 2, 2, 0, 8),       # with PDL, M = 2 / 8: 7.7 / 8.2 us vs 8.0 / 8.4 (thirteenth session)
    (8, 4096, 6144): (128, 128, 2, 2, 0, 8),      # with PDL, M = 2 / 8: 9.4 / 10.3 us vs 10.1 / 10.6
    (8, 8192, 8192): (128, 128, 2, 2, 0, 8),      # M = 8: 18.5 us with PDL vs 19.2 for the default (thirteenth session)
    (16, 4096, 4096): (64, 128, 3, 2, 0, 16),     # 9.4 us
    (32, 4096, 28672): (128, 128, 2, 1, 0, 32, False, True, 8),   # 36.0 us (4 warps: 46+)
}
_DEFAULT = {1: (64, 128, 2, 4, 0, 8), 8: (64, 128, 2, 4, 0, 8), 16: (64, 128, 2, 3, 0, 16), 32: (64, 128, 2, 2, 0, 32)}


def default_config(m: int, n: int, k: int) -> RingConfig:
    """The swept tile for (M bucket, K, N), else the bucket's default (8192² / 14336 x 4096 took it too).
    QUANTRT_CUDA_RING_TILES="b:K:N=field:...+..." overrides entries (RingConfig fields in order; A/B runs)."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"ring_wna16 runs 1 <= M <= {MAX_M}; got M={m}")
    b = 1 if m == 1 else 8 if m <= 8 else 16 if m <= 16 else 32
    env = env_tiles("QUANTRT_CUDA_RING_TILES", "b:K:N",
                    lambda key: len(key) == 3 and all(isinstance(v, int) for v in key))
    return RingConfig(*env.get((b, k, n)) or _TILES.get((b, k, n), _DEFAULT[b]))


def tagged_launch(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether a launch at M rows over [K, N] ends in the tagged split-K epilogue (M <= 2, K split), the one with
    the residual epilogue (`ring_common.residual_out`)."""
    cfg = default_config(m, n, k)
    split, _ = split_count(k, -(-n // cfg.block_n), cfg.block_k, cfg.split_k, cfg.waves, device.index or 0)
    return m <= TAGGED_MAX_M and split > 1


def ring_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
               zero_const: float = 8.0, cfg: RingConfig | None = None, offset: bool = False,
               pro: RingPrologue | None = None, residual: torch.Tensor | None = None, release_early: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M <= 32, K] bf16/fp16; packed [K/8, N] int32; scale [G, N] fp32/fp16/bf16; zero [G, N] uint8 z or fp32
    2**23 + z, or None with every zero point `zero_const`, or with `offset` the float offsets o [G, N] fp32
    (w = q s + o) -> [M, N]. With `pro` the input is made from x in the activation load (`ring_prologue`):
    RMSNorm(x + delta) (x the residual [M, K]; writes pro.residual), or act(gate) * up (x the gate_up output
    [M, 2K]). With `residual` r [M, N]: (r + y, its column tiles' sums of squares [M, N / block_n] fp32), the
    residual epilogue (`ring_common.residual_out`; M <= 2 with K split, the tagged path) for a next ring's
    PRO_NORM_PARTS. `release_early`: the next PDL op is released at the start (`_common.pdl_release_at`; to
    PDL_MAX_M rows, where the decode attention after q/k/v reads early: measured at 1-2 rows)."""
    if offset and zero is None:
        raise ValueError("ring_wna16 with offset=True needs the offsets [G, N] as `zero`")
    n, k = packed.shape[1], packed.shape[0] * 8
    m = x.shape[0]
    if pro is not None:
        pro.check(x, k)
    elif x.shape[1] != k:
        raise ValueError(f"ring_wna16: x {tuple(x.shape)} does not match the packed weight's K={k}")
    cfg = cfg or default_config(m, n, k)
    if pro is not None:     # rows as [BK] vectors: the gathered activation layout
        cfg = replace(cfg, x_vec=False)
    ok, why = can_run(m, n, k, group, 4, x.dtype, cfg)
    if (not ok or cfg.block_n not in (64, 128) or cfg.block_m not in (8, 16, 32) or not 32 <= cfg.block_k <= 128
            or cfg.warps not in (4, 8) or cfg.warps == 8 and cfg.block_n != 128):
        raise ValueError(f"ring_wna16 cannot run this call: {why or cfg} (needs block_n 64/128, block_m 8/16/32, "
                         f"block_k 32..128, warps 4, or 8 with block_n 128)")
    if x.stride(1) != 1:
        x = x.contiguous()
    bk, bn, bm = cfg.block_k, cfg.block_n, cfg.block_m
    n_tiles, split, k_per_split, y, ws, cnt = split_k_plan(x[:, :k], n, bn, bk, cfg.split_k, cfg.waves,
                                                           TAGGED_MAX_M)
    g = scale.shape[0]
    p_desc = tma_desc(packed, [n // 32, k // 8, 32], [32, n, 1], [bn // 32, bk // 8, 32], swizzle=128)
    s_desc = tma_desc(scale, [g * n], [1], [bn])
    z_desc = tma_desc(zero, [g * n], [1], [bn]) if zero is not None else s_desc
    pdl = (cfg.pdl and pdl_supported(x)) or (m <= PDL_MAX_M and stream_pdl(x, "ring"))
    tagged = m <= TAGGED_MAX_M and split > 1      # ws / cnt: the tagged partial words (split_k_plan)
    parts = None
    if residual is not None:
        if not tagged or tuple(residual.shape) != (m, n) or residual.dtype != x.dtype or not residual.is_contiguous():
            raise ValueError(f"the ring's residual epilogue needs M <= {TAGGED_MAX_M} rows with K split (got M={m}, "
                             f"{split} split(s)) and a contiguous residual [{m}, {n}] {x.dtype} (got "
                             f"{tuple(residual.shape)} {residual.dtype})")
        parts = torch.empty((m, n_tiles), device=x.device, dtype=torch.float32)
    norm = pro is not None and pro.kind in (PRO_NORM, PRO_NORM_PARTS)
    tr, tr_id = trace_slot(x, "ring", n_tiles * split, m=m, n=n, k=k, pro=pro.kind if pro else 0, tiles=n_tiles,
                           split=split)
    d = pro.parts if norm and pro.kind == PRO_NORM_PARTS else pro.delta if norm else x
    nw, r = (pro.weight, pro.residual if pro.residual is not None else x) if norm else (x, x)
    _ring_w4_kernel[(n_tiles, split)](
        x, p_desc, s_desc, z_desc, y, ws, cnt, m, n, k, x.stride(0), group, 0.0 if offset else float(zero_const),
        d, nw, r, d.stride(0), r.stride(0), float(pro.eps) if norm else 0.0, d.shape[1] if norm else 0,
        residual if parts is not None else x, parts if parts is not None else x,
        k_per_split, bn, bk, bm, cfg.stages, split, x.dtype == torch.bfloat16, zero is not None, pdl, cfg.x_vec,
        *launch_layouts(cfg), **pdl_release_at(x, release_early and m <= PDL_MAX_M), OFFSET=offset, TAGGED=tagged,
        **(_prologue_opts(pro, m, k, cfg.warps) if pro is not None else {}), RES=parts is not None,
        tr_ptr=tr, tr_id=tr_id, TRACE=tr is not None, num_warps=cfg.warps, **({"launch_pdl": True} if pdl else {}))
    return (y, parts) if parts is not None else y


def _prologue_opts(pro: RingPrologue, rows: int, k: int, warps: int) -> dict:
    """The kernel's prologue constexprs: PRO, the rows, and for the norm the padded row length and its layout."""
    if pro.kind == PRO_NORM_PARTS:     # KP: the partials' padded count
        row = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[warps], order=[0])
        return {"PRO": PRO_NORM_PARTS, "NR": rows, "KP": 1 << max(0, (pro.parts.shape[1] - 1).bit_length()),
                "ROW": row}
    if pro.kind != PRO_NORM:
        return {"PRO": pro.kind, "NR": rows}
    row = gl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[warps], order=[0])
    return {"PRO": PRO_NORM, "NR": rows, "KP": max(1 << (k - 1).bit_length(), 8 * 32 * warps), "ROW": row}


def launch_layouts(cfg: RingConfig) -> tuple:
    """The kernel's layout constexprs for `cfg`, in argument order: words, scales, activation loads, MMA, B buffer."""
    nw, bk = cfg.warps, cfg.block_k
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, cfg.block_m, 16])
    if cfg.x_vec:   # [BM, BK]: 8 contiguous k per thread (one 16-byte load), 16 threads along k
        x_layout = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[nw, 1],
                                    order=[1, 0])
    else:
        x_layout = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1], warps_per_cta=[nw, 1],
                                    order=[0, 1])
    x_smem = gl.NVMMASharedLayout(swizzle_byte_width=128 if bk >= 64 else 64, element_bitwidth=16, rank=2,
                                  transposed=True)
    return _p_layout(bk // 8, cfg.block_n, nw), _s_layout(cfg.block_n, nw), x_layout, mma, x_smem


__all__ = ["MAX_M", "RingConfig", "can_run", "default_config", "launch_layouts", "ring_wna16", "tagged_launch"]
