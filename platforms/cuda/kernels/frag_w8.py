"""8-bit W8A8 for 2..32 rows on the GEMV's weight stream: mma.sync on fragments loaded straight from memory
(Gluon; sm_89+ for fp8 e4m3, sm_80+ for int8; imported lazily).

y [M, N] = (a [M, K] codes * sa [M] per-token / static scales) @ (w [N, K] codes * sw [1] or [N])^T, with a
and w of one 8-bit dtype (e4m3 or int8), fp32 (fp8) or exact int32 (int8) sums.

H100 (`bench/_frag_sweep.py`, both sides with their activation launch): fp8 M = 2 / 8 at 8192² 28.3 / 29.2 us
(1.67x bf16; the dispatch before 29.7 / 30.0), 4096x28672 43.3 / 44.0 (1.89x; before 52.9 / 54.2), 4096² 10.6 /
11.4 (before 12.3); int8 M = 2-16 1.04-1.29x the path before at every Llama shape.

Why: at 2-16 rows the tensor-core paths (`swap_fp8`, `codes_mm`, the TMA ring) stream an fp8 weight at
~75% of copy (8192²: 29-30 us), while the M = 1 GEMV (`gemv_w8`, plain 16-byte loads, many programs in flight)
reaches ~87%, but widens every code and spends one FFMA per code and row, so it cannot take 8 or 16 rows.
Here each thread loads the same 16 contiguous bytes of a weight row per K step as the GEMV does, and those
registers *are* the A operand of `mma.sync.m16n8k32` (`_PTX_*`): no widening, no shared memory, and one
MMA per 16 x 32 x 8 products, so the step costs the same for 1 or 16 rows (two MMAs per 8 rows per 32 bytes).

Why the registers line up (PTX ISA, "Matrix fragments for mma.m16n8k32", 8-bit types): lane = 4 g + t
(g = groupID, t = thread in group); A register 0 holds row g, k 4t..4t+3; register 1 row g+8, the same k;
registers 2 / 3 the same rows at k 4t+16..4t+19; B registers 0 / 1 hold column g at those k; D holds rows g /
g+8, columns 2t, 2t+1. The weight tile of a step is [REPS, 8 W, 16] int32 words (64 codes per row) in the
layout size [1, 1, 4] x lanes [1, 8, 4] x warps [1, W, 1]: lane 4 g + t of warp v holds the words 4t..4t+3
(bytes 16t..16t+15) of row 8 v + g of each rep. The sum over k does not depend on which k an MMA "slot"
stands for, as long as A and B agree: the MMA on words (0, 1) of rep 2q (as row g) and rep 2q + 1 (as row
g + 8) takes slot 4t + i = byte 16t + i and slot 4t + 16 + i = byte 16t + 4 + i, words (2, 3) the next 8
bytes. The activation tile [1, 8 W, 16] in the same layout holds token (row % 8) at the same words, so lane
4 g + t holds token g's bytes 16t..16t+15: B of the same two MMAs. Two token groups (rows 0-7, 8-15) share
the weight registers; with 17-32 rows (GROUPS 3-4) a second accumulator takes rows 16-31.

A step takes U such 64-code chunks of every row (`FragConfig.unroll`): the tile is [U, REPS, 8 W, 16] words,
so a thread's U loads of one row are requested together. With U = 1 each warp load touched 8 rows x 64 bytes
and the kernel streamed at ~55% of copy whatever the tile (8192² M = 2: 40.7 us); U = 4 took it to 30 us.
The kernel launches with programmatic dependent launch: step 0's weight words are requested before
`griddepcontrol.wait`, i.e. while the activation-code launch before it (`quant_rows`) still runs (8192² M = 2:
28.3 vs 30.0 us; the L2::256B load hint gained < 2%).

Accumulators are [REPS, 8 W, 16] in the weight tile's layout (the U chunks' MMA results are summed in
registers): for each rep and lane, word j of the 4 holds token (j >> 1) * 8 + 2t + (j & 1) of that rep's row.
fp8 MMAs start from zero and are added in fp32 (Hopper's fp8 MMA accumulates with a short mantissa; here it
sums only 32 products); int8 MMAs chain their exact int32 sum.
Split-K partials go through the shared last-arriver epilogue (`ring_common.store_split_k`).
Gluon does not run under TRITON_INTERPRET: the CPU tests emulate a warp's MMAs from the PTX fragment tables
with the registers each lane holds (`A_WORDS`, `B_WORDS`, `D_OUT`, `fragment_token`) against x @ w^T, check the
sm_90 PTX (mma.sync count, 16-byte loads, no shared memory, no shuffles, PDL order) and the dispatch; the
kernel itself is tested natively (-m accelerator) against `frag_reference` (float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, pdl_supported, pdl_trigger, split_counters
from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split
from quantrt.platforms.cuda.kernels.ring_common import gdc_launch_dependents, gdc_wait, gsum, store_split_k

MAX_M = 32
STEP_K = 64          # codes per weight row per K step (16 int32 words: 4 lanes x 16 bytes)


@dataclass(frozen=True)
class FragConfig:
    reps: int = 2            # rows of a program = reps * 8 * warps (reps even: an MMA pairs two reps)
    warps: int = 4
    waves: int = 4           # split K so that about this many programs run per SM
    prefetch: int = 0        # 1: the next step's weight words are loaded before this step's MMAs
    unroll: int = 4          # 64-code chunks of a row per step (U): 64 U bytes of a row requested together
    hint: int = 1            # 1: weight loads carry the L2::256B prefetch hint (a miss fills 256 bytes of L2)
    pdl: int = 1             # 1: programmatic dependent launch on sm_90 (step 0's weights load before the wait)

    @property
    def block_n(self) -> int:
        return self.reps * 8 * self.warps


# One `inline_asm_elementwise` call (pack 8) gets a lane's 8 weight words of reps 2q (words 0-3) and 2q + 1
# (4-7), the 4 words of token group 0 and of group 1 (each broadcast over the reps: 8 registers, the first 4
# read), and the 8 accumulator words. Per token group, two MMAs (the PTX fragments in the module docstring):
A_WORDS = ((0, 4, 1, 5), (2, 6, 3, 7))   # A registers a0..a3 of MMA 0 / 1: the call's weight words
B_WORDS = ((0, 1), (2, 3))               # B registers b0, b1 of MMA 0 / 1: the token group's words
D_OUT = (0, 1, 4, 5)                     # D registers d0..d3 -> accumulator word of the call (+ 2 for group 1)


def _mma_ptx(kind: str, two: bool) -> str:
    """PTX of one call: $0-$7 accumulators out, $8-$15 weight words, $16-$23 group 0 ($24-$31 group 1),
    $32-$39 accumulators in. fp8: each MMA starts from zero, both are added to the fp32 accumulator; int8: the
    two MMAs chain on the int32 accumulator. `two` False: group 1 is not computed, its words pass through."""
    groups = [0, 1] if two else [0]
    regs = lambda base, idx: ", ".join(f"${base + i}" for i in idx)             # noqa: E731
    outs: dict[int, str] = {}
    if kind == "i8":
        mma = "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"
        lines = [".reg .b32 d<8>;"]
        for gi in groups:
            d = ", ".join(f"d{4 * gi + e}" for e in range(4))
            c = regs(32, [o + 2 * gi for o in D_OUT])
            for j in range(2):
                lines.append(f"{mma} {{{d}}}, {{{regs(8, A_WORDS[j])}}}, {{{regs(16 + 8 * gi, B_WORDS[j])}}}, "
                             f"{{{c if j == 0 else d}}};")
            outs.update({o + 2 * gi: f"d{4 * gi + e}" for e, o in enumerate(D_OUT)})
    else:
        mma = "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"
        lines = [".reg .f32 z, p<16>, r<8>;", "mov.f32 z, 0f00000000;"]
        for gi in groups:
            for j in range(2):
                d = ", ".join(f"p{8 * gi + 4 * j + e}" for e in range(4))
                lines.append(f"{mma} {{{d}}}, {{{regs(8, A_WORDS[j])}}}, {{{regs(16 + 8 * gi, B_WORDS[j])}}}, "
                             "{z, z, z, z};")
            for e, o in enumerate(D_OUT):
                o += 2 * gi
                lines += [f"add.f32 r{o}, p{8 * gi + e}, p{8 * gi + 4 + e};", f"add.f32 r{o}, r{o}, ${32 + o};"]
                outs[o] = f"r{o}"
    lines += [f"mov.b32 ${o}, {outs.get(o, '$' + str(32 + o))};" for o in range(8)]
    return "{\n" + "\n".join(lines) + "\n}\n"


_CONS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 32))   # pack 8: 8 outputs, 4 args x 8 inputs
_PTX_F8_1 = gl.constexpr(_mma_ptx("f8", False))
_PTX_F8_2 = gl.constexpr(_mma_ptx("f8", True))
_PTX_I8_1 = gl.constexpr(_mma_ptx("i8", False))
_PTX_I8_2 = gl.constexpr(_mma_ptx("i8", True))


@gluon.jit
def _mma(w, x0, x1, acc, IS_INT: gl.constexpr, TWO: gl.constexpr):
    """acc += the products of the weight words w with token groups x0 (rows 0-7 of the pair) and x1 (8-15)."""
    if IS_INT:
        out = gl.inline_asm_elementwise(_PTX_I8_2 if TWO else _PTX_I8_1, _CONS, [w, x0, x1, acc], dtype=gl.int32,
                                        is_pure=True, pack=8)
    else:
        out = gl.inline_asm_elementwise(_PTX_F8_2 if TWO else _PTX_F8_1, _CONS, [w, x0, x1, acc],
                                        dtype=gl.float32, is_pure=True, pack=8)
    return out


@gluon.jit
def _x_group(a_ptr, tok, kw, M, KW, offs_w, w):
    """Token group words, broadcast to w's [U, REPS, 8 W, 16]: row r holds token `tok` (= base + r % 8) at
    words kw + offs_w (0 past M)."""
    x = gl.load(a_ptr + tok * KW + kw + offs_w, mask=(tok < M) & (offs_w >= 0), other=0)  # mask: full shape
    xb, _ = gl.broadcast(x, w)
    return xb


@gluon.jit
def _load_w(ptrs, HINT: gl.constexpr):
    """The weight words at `ptrs` (16-byte vectors); HINT: with the L2::256B prefetch-size qualifier."""
    if HINT:
        w = gl.inline_asm_elementwise("ld.global.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l,l,l,l",
                                      [ptrs], dtype=gl.int32, is_pure=True, pack=4)
    else:
        w = gl.load(ptrs)
    return w


@gluon.jit
def _load_x(a_ptr, g8, kw, M, KW, offs_w, w, GROUPS: gl.constexpr):
    """The token groups of the step at word kw (unused groups: the weight words, never read)."""
    x0 = _x_group(a_ptr, g8, kw, M, KW, offs_w, w)
    x1 = w
    x2 = w
    x3 = w
    if GROUPS >= 2:
        x1 = _x_group(a_ptr, g8 + 8, kw, M, KW, offs_w, w)
    if GROUPS >= 3:
        x2 = _x_group(a_ptr, g8 + 16, kw, M, KW, offs_w, w)
    if GROUPS >= 4:
        x3 = _x_group(a_ptr, g8 + 24, kw, M, KW, offs_w, w)
    return x0, x1, x2, x3



@gluon.jit
def _step(w, x0, x1, x2, x3, zero, acc0, acc1, IS_INT: gl.constexpr, GROUPS: gl.constexpr):
    """acc0 (token groups 0, 1) and acc1 (2, 3) [REPS, 8 W, 16] += the step's MMAs, summed over its U chunks."""
    if GROUPS >= 2:
        acc0 += gsum(_mma(w, x0, x1, zero, IS_INT, True), 0)
    else:
        acc0 += gsum(_mma(w, x0, x0, zero, IS_INT, False), 0)
    if GROUPS == 4:
        acc1 += gsum(_mma(w, x2, x3, zero, IS_INT, True), 0)
    elif GROUPS == 3:
        acc1 += gsum(_mma(w, x2, x2, zero, IS_INT, False), 0)
    return acc0, acc1


@gluon.jit
def _frag_w8_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KW,
                    KW_PER_SPLIT: gl.constexpr, SPLIT: gl.constexpr, WSCALE: gl.constexpr, REPS: gl.constexpr,
                    WARPS: gl.constexpr, U: gl.constexpr, GROUPS: gl.constexpr, IS_INT: gl.constexpr,
                    PREFETCH: gl.constexpr, HINT: gl.constexpr, PDL: gl.constexpr, TRIGGER: gl.constexpr = False):
    # a [M, K] codes and w [N, K] codes viewed as int32 words [M, KW] / [N, KW]; GROUPS token groups of 8
    # (1..4: M <= 8 GROUPS). A step is U chunks of 16 words per row (a thread's U 16-byte loads of one row are
    # 64 bytes apart: the row's 64 U bytes are requested together). KW is a multiple of KW_PER_SPLIT, itself of
    # 16 U words (no K masks).
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 8, 4], [1, 1, WARPS, 1], [3, 2, 1, 0])
    S: gl.constexpr = gl.SliceLayout(0, L)                                     # [REPS, R, 16] accumulators
    R: gl.constexpr = 8 * WARPS
    BN: gl.constexpr = REPS * R
    STEP: gl.constexpr = 16 * U
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    u = gl.arange(0, U, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
    c4 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
    offs_w = (u * 16)[:, None, None, None] + c4[None, None, None, :]           # [U, 1, 1, 16] word in the step
    rep = gl.arange(0, REPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, S)))
    r = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, S)))
    c = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, S)))
    n3 = pid_n * BN + rep[:, None, None] * R + r[None, :, None]              # [REPS, R, 1] weight row
    rows = gl.minimum(n3, N - 1).to(gl.int64)
    kw0 = pid_k * KW_PER_SPLIT
    w_ptrs = w_ptr + gl.expand_dims(rows * KW + kw0, 0) + offs_w               # [U, REPS, R, 16]
    g8 = gl.expand_dims((r % 8)[None, :, None], 0)                             # [1, 1, R, 1] token in its group
    acc_t: gl.constexpr = gl.int32 if IS_INT else gl.float32
    zero = gl.zeros([U, REPS, R, 16], acc_t, L)
    acc0 = gl.zeros([REPS, R, 16], acc_t, S)
    acc1 = gl.zeros([REPS, R, 16], acc_t, S)
    w = _load_w(w_ptrs, HINT)                                                  # step 0's weight words
    if PDL:  # launched while the activation-code launch before runs: its codes are read only after this wait
        gdc_wait()
    x0, x1, x2, x3 = _load_x(a_ptr, g8, kw0, M, KW, offs_w, w, GROUPS)
    for kt in range(0, KW_PER_SPLIT, STEP):
        if PREFETCH:  # the next step's words are in flight while this step's MMAs run (the last reloads itself)
            kn = gl.minimum(kt + STEP, KW_PER_SPLIT - STEP)
            wn = _load_w(w_ptrs + kn, HINT)
            xn0, xn1, xn2, xn3 = _load_x(a_ptr, g8, kw0 + kn, M, KW, offs_w, w, GROUPS)
            acc0, acc1 = _step(w, x0, x1, x2, x3, zero, acc0, acc1, IS_INT, GROUPS)
            w, x0, x1, x2, x3 = wn, xn0, xn1, xn2, xn3
        else:
            acc0, acc1 = _step(w, x0, x1, x2, x3, zero, acc0, acc1, IS_INT, GROUPS)
            kn = gl.minimum(kt + STEP, KW_PER_SPLIT - STEP)
            w = _load_w(w_ptrs + kn, HINT)
            x0, x1, x2, x3 = _load_x(a_ptr, g8, kw0 + kn, M, KW, offs_w, w, GROUPS)
    if TRIGGER:  # weights streamed: the next PDL op may be scheduled (it waits for this grid's end)
        gdc_launch_dependents()
    # word j of lane t: token (j >> 1) * 8 + 2t + (j & 1) (+ 16 for the second pair)
    tok = ((c & 3) >> 1) * 8 + 2 * (c >> 2) + (c & 1)
    tok3 = tok[None, None, :]                                                  # [1, 1, 16]
    nmask = n3 < N
    if WSCALE == 0:
        sw = gl.load(sw_ptr + n3 * 0)
    else:
        sw = gl.load(sw_ptr + rows)
    y0 = acc0.to(gl.float32) * sw * gl.load(sa_ptr + tok3, mask=tok3 < M, other=0.0)
    store_split_k(y0, y_ptr, ws_ptr, cnt_ptr, tok3 * N + n3, (tok3 < M) & nmask, pid_n, pid_k, M, N, SPLIT)
    if GROUPS >= 3:  # rows 16-31: a second column-tile counter range (pid_n + n_tiles) for its own arrivals
        t1 = tok3 + 16
        y1 = acc1.to(gl.float32) * sw * gl.load(sa_ptr + t1, mask=t1 < M, other=0.0)
        store_split_k(y1, y_ptr, ws_ptr, cnt_ptr, t1 * N + n3, (t1 < M) & nmask, pid_n + gl.num_programs(0),
                      pid_k, M, N, SPLIT)


# (reps, warps, waves, prefetch, unroll, hint, pdl) per (codes, row bucket 8 / 16, K, N), each measured faster on
# the H100 than what the W8A8 dispatch ran there before (`bench/_frag_sweep.py`, 2026-11-23; bucket 8: the tile
# with the best worse-of M = 2 / M = 8 ratio). A missing entry keeps the path before (us ours vs before).
_TILES: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int, int]] = {
    ("f8", 8, 4096, 4096): (2, 4, 4, 0, 16, 1, 1),      # 11.3 / 11.4 vs 12.3 / 12.3 (M = 2 / 8)
    ("f8", 8, 4096, 6144): (2, 4, 4, 1, 4, 1, 1),       # 13.8 / 14.4 vs 15.3 / 15.6
    ("f8", 8, 4096, 28672): (2, 2, 8, 1, 4, 1, 1),      # 43.3 / 44.0 vs 52.9 / 54.2
    ("f8", 8, 8192, 8192): (2, 4, 4, 0, 4, 1, 1),       # 28.3 / 29.2 vs 29.7 / 30.0
    ("f8", 8, 14336, 4096): (2, 4, 2, 1, 8, 1, 1),      # 26.1 / 27.1 vs 28.0 / 28.6
    ("f8", 16, 4096, 28672): (2, 2, 8, 1, 4, 1, 1),     # 45.1 vs 46.7 (codes_mm)
    ("i8", 8, 4096, 4096): (2, 4, 2, 1, 8, 1, 1),       # 10.6 / 10.7 vs 12.5 / 12.5
    ("i8", 8, 4096, 6144): (2, 4, 4, 0, 4, 1, 1),       # 13.8 / 14.2 vs 15.9 / 16.0
    ("i8", 8, 4096, 28672): (2, 4, 4, 0, 4, 1, 1),      # 42.4 / 43.3 vs 54.4 / 55.6
    ("i8", 8, 8192, 8192): (2, 4, 2, 0, 8, 1, 1),       # 27.8 / 28.6 vs 29.1 / 30.1
    ("i8", 8, 14336, 4096): (2, 4, 2, 0, 8, 1, 1),      # 25.2 / 25.7 vs 28.9 / 29.3
    ("i8", 16, 4096, 4096): (2, 4, 4, 0, 16, 1, 1),     # 12.0 vs 12.6 (swap_fp8)
    ("i8", 16, 4096, 6144): (2, 4, 2, 0, 8, 1, 1),      # 15.1 vs 16.7
    ("i8", 16, 4096, 28672): (2, 2, 8, 1, 4, 1, 1),     # 44.2 vs 57.0
    ("i8", 16, 8192, 8192): (2, 4, 2, 1, 8, 1, 1),      # 30.0 vs 30.9
    ("i8", 16, 14336, 4096): (2, 4, 2, 1, 8, 1, 1),     # 27.9 vs 30.4
}


def tile_for(m: int, k: int, n: int, is_int: bool) -> FragConfig | None:
    """The measured tile when this kernel beat the dispatch before at [M, K] x [K, N], else None."""
    if not 2 <= m <= MAX_M:
        return None
    t = _TILES.get(("i8" if is_int else "f8", 8 if m <= 8 else 16 if m <= 16 else 32, k, n))  # 32: none measured
    return None if t is None else FragConfig(*t)


def fragment_token(word: int, lane_t: int) -> int:
    """Token of accumulator word `word` (0..3 of a lane's 4) in lane 4 g + `lane_t` (first pair)."""
    return (word >> 1) * 8 + 2 * lane_t + (word & 1)


def frag_why_not(m: int, k: int, a_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device,
                 cfg: FragConfig | None = None) -> str:
    """'' when `frag_w8` computes this call, else the reason."""
    cfg = cfg or FragConfig()
    if not 1 <= m <= MAX_M:
        return f"M={m} is outside 1..{MAX_M}"
    if k % (STEP_K * cfg.unroll):
        return f"K={k} is not a multiple of {STEP_K * cfg.unroll} ({STEP_K} codes x unroll {cfg.unroll})"
    if a_dtype != w_dtype or w_dtype not in (torch.float8_e4m3fn, torch.int8):
        return f"needs e4m3 or int8 codes of one dtype for both operands, got {a_dtype} x {w_dtype}"
    if cfg.reps % 2 or cfg.reps < 2 or cfg.warps not in (1, 2, 4, 8) or cfg.unroll not in (1, 2, 4, 8, 16):
        return f"FragConfig needs an even reps >= 2, warps in 1, 2, 4, 8 and unroll in 1, 2, 4, 8, 16; got {cfg}"
    if device.type != "cuda" or torch.version.hip is not None:
        return "needs a CUDA GPU (PTX mma.sync)"
    major, minor = torch.cuda.get_device_capability(device)
    need = 80 if w_dtype == torch.int8 else 89
    if major * 10 + minor < need:
        return f"{'int8' if need == 80 else 'fp8'} mma.sync needs sm_{need}+, this GPU is sm_{major}{minor}"
    return ""


def frag_w8(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
            cfg: FragConfig | None = None) -> torch.Tensor:
    """a [M <= 32, K] e4m3/int8 codes, sa [M] or [M, 1] fp32; w [N, K] same dtype, sw [1] or [N] fp32 -> [M, N]."""
    m, k = a.shape
    n = w.shape[0]
    cfg = cfg or FragConfig()
    why = frag_why_not(m, k, a.dtype, w.dtype, a.device, cfg)
    if why or w.shape[1] != k:
        raise ValueError(f"frag_w8 cannot compute a {tuple(a.shape)} x w {tuple(w.shape)}: "
                         f"{why or 'K differs between the operands'}")
    a = a.contiguous()
    w = w.contiguous()
    bn = cfg.block_n
    n_tiles = cdiv(n, bn)
    step = STEP_K * cfg.unroll
    split = plan_split(k, step, n_tiles, cfg.waves * num_sms(a.device.index or 0))
    groups = cdiv(m, 8)
    pdl = bool(cfg.pdl) and pdl_supported(a)
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    ws = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(a.device, 2 * n_tiles) if split > 1 else y          # pairs 0 / 1: own counters
    _frag_w8_kernel[(n_tiles, split)](
        a.view(torch.int32), sa.reshape(-1).contiguous(), w.view(torch.int32), sw.reshape(-1).contiguous(), y, ws,
        cnt, m, n, k // 4, KW_PER_SPLIT=k // 4 // split, SPLIT=split, WSCALE=0 if sw.numel() == 1 else 1,
        REPS=cfg.reps, WARPS=cfg.warps, U=cfg.unroll, GROUPS=groups, IS_INT=w.dtype == torch.int8,
        PREFETCH=cfg.prefetch, HINT=cfg.hint, PDL=pdl, TRIGGER=pdl_trigger(a), num_warps=cfg.warps,
        **({"launch_pdl": True} if pdl else {}))
    return y


def frag_reference(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """What `frag_w8` computes, in float64: (a * sa) @ (w * sw)^T."""
    return (a.double() * sa.reshape(-1, 1).double()) @ (w.double() * sw.reshape(-1, 1).double()).t()


__all__ = ["MAX_M", "STEP_K", "FragConfig", "frag_reference", "frag_w8", "frag_why_not", "fragment_token", "tile_for"]
