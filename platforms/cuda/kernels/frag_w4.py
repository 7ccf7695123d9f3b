"""W4A16 for 1..16 rows on the GEMV's weight stream: mma.sync on int4 words loaded straight from memory and
unpacked in registers (Gluon; sm_80+; imported lazily).

Same weights as `tc_wna16` / `ring_wna16` (packed [K/8, N] int32, code i of row j is k = 8j + i at bits 4i;
scale [G, N] fp32; zero [G, N] fp32 holding 2**23 + z, or one constant for symmetric checkpoints), bf16/fp16
activations as they come (no quantization), fp32 sums.

Why: `ring_wna16` (TMA ring + wgmma) streams 8192² at M = 1 at 73% of copy and is limited by its own TMA
round trips; `frag_w8` showed that plain 16-byte loads straight into mma.sync fragments stream an 8-bit weight
at 79-90%. Here the same idea for 4-bit words, in the packed layout the other W4A16 kernels use.

Fragments (PTX ISA, mma.m16n8k16 with 16-bit A/B): lane = 4 g + t; A register 0 holds row g, k 2t, 2t+1;
register 1 row g + 8, the same k; registers 2 / 3 the same rows at k 2t+8, 2t+9; B registers 0 / 1 hold column
g at those k; D holds rows g / g+8 x columns 2t, 2t+1. A step is 16 packed rows (128 k, one scale group) x NB
columns; lane 4 g + t loads the words of columns 4g..4g+3 (16 bytes) at packed rows j0 + t + 4u, u = 0..3
(`_layout`: a linear layout, since the 4 lanes of an MMA group must hold the same columns at different k
while the 16 bytes they load run along N). One word is 8 codes of one column; LOP3 pairs (code i, code i + 4)
into a 16-bit pair MAGIC + q, one packed FMA makes q - z exactly. The MMA's rows g / g + 8 are the lane
group's columns (2p, 2p + 1), p = 0, 1, and its k slots are any order that A and B share: slots (2t, 2t+1) of
step (u, s) take codes (2s, 2s + 4) of the lane's word at packed row j0 + t + 4u, slots (2t+8, 2t+9) codes
(2s + 1, 2s + 5); the activations of token g at the same k are paired with one PRMT per register (`PLAN`).
Per token group and column pair the 8 MMAs of a step chain in fp32 from zero, and the step's sum is scaled
by its group scale once per column before it is added to the accumulator: no per-code scale multiply and no
rounding of the dequantized weight (as `ring_wna16`).

Accumulator word (u, c) of a lane (the register order of the weight words) holds column 4g + 2(u & 1) +
(c >> 1), token 8 (u >> 1) + 2t + (c & 1) (`fragment_slot`). Split-K partials: `ring_common.store_split_k`.
Gluon does not run under TRITON_INTERPRET: the CPU tests emulate `PLAN` against the PTX fragment tables,
check the sm_90 PTX and the errors; the kernel is tested natively (-m accelerator) against `ring_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, pdl_supported, split_counters
from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split
from quantrt.platforms.cuda.kernels.ring_common import store_split_k

MAX_M = 16
STEP_K = 128          # k per step: 16 packed rows, one scale group of 128


@dataclass(frozen=True)
class FragW4Config:
    warps: int = 4
    reps: int = 2            # columns of a program = 32 * warps * reps
    waves: int = 4           # split K so that about this many programs run per SM
    prefetch: int = 1        # 1: the next step's loads are issued before this step's MMAs
    pdl: int = 1             # 1: programmatic dependent launch (step 0's words load before the wait), sm_90

    @property
    def block_n(self) -> int:
        return 32 * self.warps * self.reps


def _log2(v: int) -> int:
    return v.bit_length() - 1


def layout(cfg: FragW4Config) -> gl.DistributedLinearLayout:
    """[16 packed rows, NB columns]: registers (c: 4 columns, u: rows + 4u, then reps of 32 W columns), lanes
    (t: rows + t, g: columns 4g), warps (32 columns each)."""
    nb = cfg.block_n
    regs = [[0, 1], [0, 2], [4, 0], [8, 0]] + [[0, 32 * cfg.warps << i] for i in range(_log2(cfg.reps))]
    lanes = [[1, 0], [2, 0], [0, 4], [0, 8], [0, 16]]
    warps = [[0, 32 << i] for i in range(_log2(cfg.warps))]
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [16, nb])


# One call (pack 16: the 16 words of one rep, register (u, c) = word of column c at packed row + 4u):
# inputs $16-$31 words, $32-$47 / $48-$63 activation words of token groups 0 / 1 (register (u, c): bf16 pair
# (2c, 2c + 1) of the 8 at packed row j, i.e. k = 8j + 2c, +1), $64-$79 scales ((u, c): column c's),
# $80-$95 -(MAGIC + z) per column as fp32, $96-$111 the accumulators; outputs $0-$15.
# PLAN: per token group gi and column pair p, 8 chained MMAs; each entry is (A, B) with A = 4 (u, column, pair)
# and B = 2 (u, pair), pair i = codes (i, i + 4) of the word / activations (x_i, x_(i+4)) of the chunk.
PLAN = {p: [([(u, 2 * p, 2 * s), (u, 2 * p + 1, 2 * s), (u, 2 * p, 2 * s + 1), (u, 2 * p + 1, 2 * s + 1)],
             [(u, 2 * s), (u, 2 * s + 1)]) for u in range(4) for s in range(2)] for p in range(2)}
D_SLOT = [(p, e, 2 * p + (e >> 1)) for p in range(2) for e in range(4)]   # output slot 8 gi + 4p + e: its column


def _ptx(two: bool, bf16: bool) -> str:
    mag, one, fma, ty = (("0x43004300", "0x3F803F80", "fma.rn.bf16x2", "bf16") if bf16 else
                         ("0x64006400", "0x3C003C00", "fma.rn.f16x2", "f16"))
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    groups = [0, 1] if two else [0]
    lines = [".reg .b32 t, one, nz<4>, a<64>, b<32>;", ".reg .f32 z, d<16>, h<16>, r<16>;", "mov.f32 z, 0f00000000;",
             f"mov.b32 one, {one};"]
    lines += [f"cvt.rn.{ty}x2.f32 nz{c}, ${80 + c}, ${80 + c};" for c in range(4)]
    for u in range(4):
        for c in range(4):
            w = f"${16 + 4 * u + c}"
            for i in range(4):
                a = f"a{16 * u + 4 * c + i}"
                if i:
                    lines.append(f"shr.u32 t, {w}, {4 * i};")
                lines += [f"lop3.b32 {a}, {'t' if i else w}, 0x000F000F, {mag}, 0xEA;", f"{fma} {a}, {a}, one, nz{c};"]
    for gi in groups:
        xb = 32 + 16 * gi
        for u in range(4):
            for i in range(4):
                lo, hi = f"${xb + 4 * u + i // 2}", f"${xb + 4 * u + i // 2 + 2}"
                lines.append(f"prmt.b32 b{16 * gi + 4 * u + i}, {lo}, {hi}, {'0x5410' if i % 2 == 0 else '0x7632'};")
        for p in range(2):  # two independent chains per column pair (entries of even / odd s), added at the end
            for half in range(2):
                d = ", ".join(f"{'d' if half == 0 else 'h'}{8 * gi + 4 * p + e}" for e in range(4))
                entries = PLAN[p][half::2]
                for n, (aa, bb) in enumerate(entries):
                    a = ", ".join(f"a{16 * u + 4 * c + i}" for u, c, i in aa)
                    b = ", ".join(f"b{16 * gi + 4 * u + i}" for u, i in bb)
                    lines.append(f"{mma} {{{d}}}, {{{a}}}, {{{b}}}, {{{'z, z, z, z' if n == 0 else d}}};")
        for p, e, col in D_SLOT:
            q = 8 * gi + 4 * p + e
            lines += [f"fma.rn.f32 r{q}, d{q}, ${64 + col}, ${96 + q};", f"fma.rn.f32 r{q}, h{q}, ${64 + col}, r{q};"]
    done = {8 * gi + k for gi in groups for k in range(8)}
    lines += [f"mov.b32 ${q}, {'r' + str(q) if q in done else '$' + str(96 + q)};" for q in range(16)]
    return "{\n" + "\n".join(lines) + "\n}\n"


_CONS = gl.constexpr(",".join(["=r"] * 16 + ["r"] * 96))
_PTX = {(two, bf): gl.constexpr(_ptx(two, bf)) for two in (False, True) for bf in (False, True)}
_PTX_1_F16, _PTX_1_BF16, _PTX_2_F16, _PTX_2_BF16 = (_PTX[(False, False)], _PTX[(False, True)],
                                                    _PTX[(True, False)], _PTX[(True, True)])


# (warps, reps, waves, prefetch, pdl) at M = 1 per (K, N): the best tile of the H100 sweep (`bench/_frag_w4_sweep.py`);
# other shapes the default.
_TILES = {(8192, 8192): (2, 1, 8, 1, 1), (4096, 6144): (4, 1, 4, 1, 1), (4096, 4096): (4, 1, 4, 1, 1),
          (4096, 28672): (2, 1, 8, 1, 1), (14336, 4096): (4, 1, 4, 1, 1)}


def default_config(k: int, n: int) -> FragW4Config:
    return FragW4Config(*_TILES.get((k, n), (4, 1, 4, 1, 1)))


def fragment_slot(u: int, t: int, c: int) -> tuple[int, int]:
    """(column offset from the lane group's 4g, token) of accumulator register (u, c) in lane 4g + t."""
    return 2 * (u & 1) + (c >> 1), 8 * (u >> 1) + 2 * t + (c & 1)


@gluon.jit
def _mma_call(w, x0, x1, s, nz, acc, TWO: gl.constexpr, IS_BF16: gl.constexpr):
    if TWO:
        if IS_BF16:
            out = gl.inline_asm_elementwise(_PTX_2_BF16, _CONS, [w, x0, x1, s, nz, acc], dtype=gl.float32,
                                            is_pure=True, pack=16)
        else:
            out = gl.inline_asm_elementwise(_PTX_2_F16, _CONS, [w, x0, x1, s, nz, acc], dtype=gl.float32,
                                            is_pure=True, pack=16)
    else:
        if IS_BF16:
            out = gl.inline_asm_elementwise(_PTX_1_BF16, _CONS, [w, x0, x1, s, nz, acc], dtype=gl.float32,
                                            is_pure=True, pack=16)
        else:
            out = gl.inline_asm_elementwise(_PTX_1_F16, _CONS, [w, x0, x1, s, nz, acc], dtype=gl.float32,
                                            is_pure=True, pack=16)
    return out


@gluon.jit
def _load_weights(p_ptrs, s_ptr, z_ptr, col2, nmask, j0, js, N, G, ZC, ASYM: gl.constexpr, MAG: gl.constexpr,
                  LW: gl.constexpr, NB: gl.constexpr):
    """The step at packed row j0 + js: words, scales and -(MAGIC + z) per column."""
    w = gl.load(p_ptrs + js * N, mask=nmask, other=0)
    grp = ((j0 + js) * 8) // G
    sc = gl.load(s_ptr + grp * N + col2, mask=nmask, other=0.0)
    if ASYM:
        nz = -(gl.load(z_ptr + grp * N + col2, mask=nmask, other=0.0) - 8388608.0 + MAG)
    else:
        nz = gl.zeros([16, NB], gl.float32, LW) - (ZC + MAG)
    return w, sc, nz


@gluon.jit
def _load_x(x_ptr, tok, x_off, js, M, KX, TWO: gl.constexpr):
    """The token groups' activation words of the step at packed row j0 + js (x_off holds j0)."""
    x0 = gl.load(x_ptr + tok * KX + x_off + 4 * js, mask=tok < M, other=0)
    if TWO:
        x1 = gl.load(x_ptr + (tok + 8) * KX + x_off + 4 * js, mask=tok + 8 < M, other=0)
    else:
        x1 = x0
    return x0, x1


@gluon.jit
def _frag_w4_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, G, ZC,
                    J_PER_SPLIT: gl.constexpr, SPLIT: gl.constexpr, NB: gl.constexpr, TWO: gl.constexpr,
                    IS_BF16: gl.constexpr, ASYM: gl.constexpr, PREFETCH: gl.constexpr, PDL: gl.constexpr,
                    LW: gl.constexpr):
    # x [M, K] viewed as int32 [M, K / 2]; p [K / 8, N] int32. J_PER_SPLIT packed rows per program (a multiple of
    # 16); K a multiple of SPLIT * J_PER_SPLIT * 8 (no K masks); columns past N are clamped, not stored.
    MAG: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    jj = gl.arange(0, 16, layout=gl.SliceLayout(1, LW))
    nn = gl.arange(0, NB, layout=gl.SliceLayout(0, LW))
    n = pid_n * NB + nn
    j0 = pid_k * J_PER_SPLIT
    zero2 = jj[:, None] * 0                                                    # [16, 1]
    col2 = n[None, :] + zero2                                                  # [16, NB] column
    nmask = col2 < N                                  # whole 4-column groups when N % 4 == 0: loads stay 16-byte
    p_ptrs = p_ptr + (j0 + jj)[:, None] * N + n[None, :]                       # [16, NB] words
    tok = ((nn // 4) % 8)[None, :] + zero2                                     # [16, NB] token of the lane group
    KX = K // 2
    x_off = (4 * (j0 + jj))[:, None] + (nn % 4)[None, :]                       # [16, NB] activation word
    acc = gl.zeros([16, NB], gl.float32, LW)
    w, sc, nz = _load_weights(p_ptrs, s_ptr, z_ptr, col2, nmask, j0, 0, N, G, ZC, ASYM, MAG, LW, NB)
    if PDL:  # launched while the kernel before drains: only the activations wait for it
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    x0, x1 = _load_x(x_ptr, tok, x_off, 0, M, KX, TWO)
    for js in range(0, J_PER_SPLIT, 16):
        jn = gl.minimum(js + 16, J_PER_SPLIT - 16)   # the last step reloads itself
        if PREFETCH:  # the next step's loads are in flight while this step's MMAs run
            wn, scn, nzn = _load_weights(p_ptrs, s_ptr, z_ptr, col2, nmask, j0, jn, N, G, ZC, ASYM, MAG, LW, NB)
            xn0, xn1 = _load_x(x_ptr, tok, x_off, jn, M, KX, TWO)
            acc = _mma_call(w, x0, x1, sc, nz, acc, TWO, IS_BF16)
            w, sc, nz, x0, x1 = wn, scn, nzn, xn0, xn1
        else:
            acc = _mma_call(w, x0, x1, sc, nz, acc, TWO, IS_BF16)
            w, sc, nz = _load_weights(p_ptrs, s_ptr, z_ptr, col2, nmask, j0, jn, N, G, ZC, ASYM, MAG, LW, NB)
            x0, x1 = _load_x(x_ptr, tok, x_off, jn, M, KX, TWO)
    u = jj >> 2
    t = jj & 3
    c = nn & 3
    col = (n - c)[None, :] + (2 * (u & 1))[:, None] + (c >> 1)[None, :]       # fragment_slot
    token = (8 * (u >> 1) + 2 * t)[:, None] + (c & 1)[None, :]
    store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, token * N + col, (token < M) & (col < N), pid_n, pid_k, M, N, SPLIT)


def frag_w4_why_not(m: int, k: int, n: int, group: int, x_dtype: torch.dtype, device: torch.device,
                    cfg: FragW4Config | None = None) -> str:
    """'' when `frag_w4` computes this call, else the reason."""
    cfg = cfg or FragW4Config()
    if not 1 <= m <= MAX_M:
        return f"M={m} is outside 1..{MAX_M}"
    if k % STEP_K or group % STEP_K:
        return f"K={k} and the group size {group} must be multiples of {STEP_K}"
    if n % 4:
        return f"N={n} is not a multiple of 4"
    if x_dtype not in (torch.bfloat16, torch.float16):
        return f"activations must be bf16 or fp16, not {x_dtype}"
    if cfg.warps not in (1, 2, 4, 8) or cfg.reps not in (1, 2, 4):
        return f"FragW4Config needs warps in 1, 2, 4, 8 and reps in 1, 2, 4; got {cfg}"
    if device.type != "cuda" or torch.version.hip is not None:
        return "needs a CUDA GPU (PTX mma.sync)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"bf16 mma.sync needs sm_80+, this GPU is sm_{major}{minor}"
    return ""


def frag_w4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
            zero_const: float = 8.0, cfg: FragW4Config | None = None) -> torch.Tensor:
    """x [M <= 16, K] bf16/fp16; packed [K/8, N] int32; scale [G, N] fp32; zero [G, N] fp32 (2**23 + z) or None
    with every zero point `zero_const` -> [M, N] x.dtype."""
    m, k = x.shape
    n = packed.shape[1]
    cfg = cfg or default_config(k, n)
    why = frag_w4_why_not(m, k, n, group, x.dtype, x.device, cfg)
    if why or packed.shape[0] * 8 != k:
        raise ValueError(f"frag_w4 cannot compute x {tuple(x.shape)} x packed {tuple(packed.shape)}: "
                         f"{why or 'packed rows * 8 != K'}")
    x = x.contiguous()
    nb = cfg.block_n
    n_tiles = cdiv(n, nb)
    split = plan_split(k, STEP_K, n_tiles, cfg.waves * num_sms(x.device.index or 0))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = split_counters(x.device, n_tiles) if split > 1 else y
    pdl = bool(cfg.pdl) and pdl_supported(x)
    _frag_w4_kernel[(n_tiles, split)](
        x.view(torch.int32), packed, scale, zero if zero is not None else scale, y, ws, cnt, m, n, k, group,
        float(zero_const), J_PER_SPLIT=k // 8 // split, SPLIT=split, NB=nb, TWO=m > 8,
        IS_BF16=x.dtype == torch.bfloat16, ASYM=zero is not None, PREFETCH=cfg.prefetch, PDL=pdl, LW=layout(cfg),
        num_warps=cfg.warps, **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["MAX_M", "PLAN", "default_config", "STEP_K", "D_SLOT", "FragW4Config", "frag_w4", "frag_w4_why_not", "fragment_slot",
           "layout"]
