"""`frag_w8`: 8-bit W8A8 at 2..32 rows through mma.sync on fragments loaded straight from memory (Gluon).

CPU: the fragment algebra against the PTX ISA's m16n8k32 8-bit fragment layout (a whole-warp emulation of the
MMA from the spec's index formulas, fed by the registers the kernel's layout gives each lane), the sm_90 PTX
(16-byte loads, the MMA count, no shuffles) and the errors. GPU (-m accelerator): the kernel against the float64
product of the same codes, and the W8A8 dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM, compile_gluon_sm90

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def _ptx_mma(a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """m16n8k32 with 8-bit A (row) / B (col), per the PTX ISA fragment tables. a_regs [32 lanes, 4 regs, 4 bytes],
    b_regs [32, 2, 4] -> d [32 lanes, 4]. Lane = 4 groupID + threadID_in_group."""
    a = np.zeros((16, 32), np.int64)
    b = np.zeros((32, 8), np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(16):                        # a_i: reg i // 4, byte i % 4
            row = g if i < 4 or 8 <= i < 12 else g + 8
            col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
            a[row, col] = a_regs[lane, i // 4, i % 4]
        for i in range(8):                         # b_i: reg i // 4
            b[t * 4 + (i & 3) + (16 if i >= 4 else 0), g] = b_regs[lane, i // 4, i % 4]
    d = a @ b
    out = np.zeros((32, 4), np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        out[lane] = [d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]]
    return out


@pytest.mark.parametrize("reps,warps,tokens", [(2, 1, 8), (2, 1, 16), (4, 2, 13)])
def test_fragment_algebra_is_the_product(reps, warps, tokens):
    """The registers a lane loads (words 4t..4t+3 of row 8v + g of each rep), the call's A/B/D register choice and
    the epilogue's token of each accumulator word give exactly x @ w^T over one 64-code step."""
    from quantrt.platforms.cuda.kernels.frag_w8 import A_WORDS, B_WORDS, D_OUT, fragment_token

    rng = np.random.default_rng(reps * 100 + tokens)
    rr = 8 * warps
    w = rng.integers(-127, 128, (reps * rr, 64))                       # [BN, 64 codes]
    x = rng.integers(-127, 128, (16, 64))                              # token groups 0 and 1
    x[tokens:] = 0
    wb = w.reshape(reps, rr, 16, 4)                                    # [rep, row, word, byte]
    xb = x.reshape(16, 16, 4)
    acc = np.zeros((reps, rr, 16), np.int64)
    for v in range(warps):
        for q in range(reps // 2):
            for gi in range(2):
                # per lane: the call's 8 weight words and the group's 4 words
                words = np.zeros((32, 8, 4), np.int64)
                xw = np.zeros((32, 4, 4), np.int64)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    words[lane, :4] = wb[2 * q, 8 * v + g, 4 * t:4 * t + 4]
                    words[lane, 4:] = wb[2 * q + 1, 8 * v + g, 4 * t:4 * t + 4]
                    xw[lane] = xb[8 * gi + g, 4 * t:4 * t + 4]
                d = sum(_ptx_mma(words[:, list(A_WORDS[j])], xw[:, list(B_WORDS[j])]) for j in range(2))
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for e, o in enumerate(D_OUT):
                        o += 2 * gi
                        rep = 2 * q + o // 4                           # words 0-3: rep 2q, 4-7: rep 2q + 1
                        acc[rep, 8 * v + g, 4 * t + o % 4] += d[lane, e]
    y = np.zeros((16, reps * rr), np.int64)
    seen = np.zeros_like(y)
    for rep in range(reps):
        for r in range(rr):
            for c in range(16):
                tok = fragment_token(c & 3, c >> 2)
                y[tok, rep * rr + r] += acc[rep, r, c]
                seen[tok, rep * rr + r] += 1
    assert (seen == 1).all()                                           # every (token, row) exactly once
    np.testing.assert_array_equal(y, x @ w.T)


def _compile(groups: int, is_int: bool, reps: int = 4, warps: int = 4, prefetch: int = 1, unroll: int = 2,
             hint: int = 0, pdl: int = 0, trigger: bool = False) -> str:
    import quantrt.platforms.cuda.kernels.frag_w8 as F

    k, n, split = 4096, 4096, 2
    a = torch.zeros(16, k // 4, dtype=torch.int32)
    f = torch.zeros(16)
    return compile_gluon_sm90(F._frag_w8_kernel, [
        a, f, a, f, torch.zeros(16, n, dtype=torch.bfloat16), f, torch.zeros(16, dtype=torch.int32), 16, n, k // 4,
        k // 4 // split, split, 1, reps, warps, unroll, groups, is_int, prefetch, hint, pdl, trigger], num_warps=warps,
        div16=True)


@pytest.mark.parametrize("groups,is_int,reps,unroll,hint,pdl", [(1, False, 4, 1, 0, 1), (2, False, 2, 2, 1, 0),
                                                                (4, False, 4, 1, 0, 0), (2, True, 4, 2, 1, 1)])
@pytest.mark.gluon_compile
def test_kernel_compiles_for_sm90_to_vector_loads_and_mma_sync(groups, is_int, reps, unroll, hint, pdl):
    ptx = _compile(groups, is_int, reps, unroll=unroll, hint=hint, pdl=pdl, trigger=bool(pdl))
    typ = "s32.s8.s8.s32" if is_int else "f32.e4m3.e4m3.f32"
    calls = unroll * reps // 2 * (2 if groups > 2 else 1)             # per step: one call per chunk, rep pair, pair
    mmas = calls * 2 * min(2, groups)                                  # per call: 2 MMAs per token group
    assert ptx.count(f"mma.sync.aligned.m16n8k32.row.col.{typ}") == mmas
    loop = ptx[ptx.index("Loop Header"):]
    loop = loop[:loop.index("bra")]
    hinted = loop.count("ld.global.L2::256B.v4.b32")
    assert hinted == hint * unroll * reps                             # weight words, 16 B each
    assert loop.count("ld.global.v4.b32") + hinted == unroll * (reps + groups)  # + token groups
    assert "shfl" not in ptx and "ld.shared" not in loop and "cvt" not in loop
    if pdl:  # step 0's weight words are requested before the wait for the activation codes; the next PDL op is
        # released once the loop is done (`pdl_trigger`)
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("Loop Header")
        assert ptx.rindex("mma.sync") < ptx.index("griddepcontrol.launch_dependents") < ptx.index("atom.")
    else:
        assert "griddepcontrol" not in ptx


def test_errors_name_the_problem():
    from quantrt.platforms.cuda.kernels.frag_w8 import FragConfig, frag_w8, frag_why_not

    cpu = torch.device("cpu")
    assert "M=33" in frag_why_not(33, 4096, FP8, FP8, cpu)
    assert "K=100" in frag_why_not(2, 100, FP8, FP8, cpu)
    assert "K=320 is not a multiple of 256" in frag_why_not(2, 320, FP8, FP8, cpu, FragConfig(unroll=4))
    assert "e4m3 or int8" in frag_why_not(2, 256, torch.int8, FP8, cpu)
    assert "even reps" in frag_why_not(2, 256, FP8, FP8, cpu, FragConfig(reps=3))
    assert "CUDA GPU" in frag_why_not(2, 256, FP8, FP8, cpu)
    a = torch.zeros(2, 100, dtype=FP8)
    with pytest.raises(ValueError, match=r"frag_w8 cannot compute .*K=100 is not a multiple of 256"):
        frag_w8(a, torch.ones(2), a, torch.ones(1), torch.bfloat16)


def _codes(m: int, k: int, dt: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dt == torch.int8:
        return torch.randint(-127, 128, (m, k), device=DEV, generator=gen, dtype=torch.int8)
    return (torch.randn(m, k, device=DEV, generator=gen) * 60).clamp(-448, 448).to(dt)


@pytest.mark.accelerator
@pytest.mark.parametrize("dt", [FP8, torch.int8])
@pytest.mark.parametrize("m", [2, 5, 8, 9, 16, 17, 24, 32])
@pytest.mark.parametrize("n,k,cfg", [(4096, 4096, None), (200, 1024, (2, 4, 4, 0, 1)), (384, 14336, (4, 8, 2, 1, 2, 1)),
                                     (1000, 512, (8, 4, 1, 1, 8))])
def test_frag_w8_native(dt, m, n, k, cfg):
    from quantrt.platforms.cuda.kernels.frag_w8 import FragConfig, frag_reference, frag_w8

    gen = torch.Generator(device=DEV).manual_seed(m * 7 + n)
    a, w = _codes(m, k, dt, gen), _codes(n, k, dt, gen)
    sa = torch.rand(m, 1, device=DEV, generator=gen) * 0.01 + 1e-3
    for sw in (torch.rand(n, device=DEV, generator=gen) * 0.01 + 1e-3, torch.full((1,), 0.003, device=DEV)):
        y = frag_w8(a, sa, w, sw, torch.bfloat16, FragConfig(*cfg) if cfg else None)
        ref = frag_reference(a, sa, w, sw)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 4e-3, (m, n, k, err)


@pytest.mark.accelerator
@pytest.mark.parametrize("dt", [FP8, torch.int8])
@pytest.mark.parametrize("m", [2, 8, 16])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_dispatch_runs_frag_w8_and_matches_the_reference(dt, m, static):
    """Per-token (quant_rows codes) and static per-tensor activations (the checkpoint's scale) through the W8A8
    dispatch at a shape of the tile table, against x quantized by quantrt.quant.quantize in float64."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.platforms.cuda.kernels.frag_w8 import tile_for
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.quantize import quantize_act_per_token, quantize_act_static
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, IntWeight, ScaleGranularity

    n, k = (28672, 4096) if dt == FP8 and m > 8 else (4096, 4096)      # fp8 at 9-16 rows: gate_up only
    gen = torch.Generator(device=DEV).manual_seed(m)
    w = _codes(n, k, dt, gen)
    sw = torch.rand(n, device=DEV, generator=gen) * 0.01 + 1e-3
    wt = IntWeight(w, sw.reshape(-1, 1), 8, k) if dt == torch.int8 else FloatWeight(w, sw, ScaleGranularity.CHANNEL)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, generator=gen)
    if static:
        s_act = torch.tensor(float(x.abs().max()) / (127.0 if dt == torch.int8 else 448.0) * 0.8, device=DEV)
        act = ActScheme(ActKind.STATIC_TENSOR, dt, scale=s_act)
        q, s = quantize_act_static(x, s_act, dt), s_act.reshape(1, 1)
    else:
        act = ActScheme(ActKind.DYNAMIC_TOKEN, dt)
        q, s = quantize_act_per_token(x, dt)
    kern = TritonW8A8Kernel.prepare(LinearSpec(wt, act, torch.bfloat16), PLATFORM)
    assert kern.frag_why(m) == "" and tile_for(m, k, n, dt == torch.int8) is not None
    ref = (q.double() * s.double()) @ (w.double() * sw.double()[:, None]).t()
    y = kern.apply(x, None)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3


def test_frag_dispatch_says_why_not():
    """Block-scaled / weight-only fp8 and the interpreter keep the paths before, with a reason."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

    w = torch.zeros(256, 256, dtype=FP8, device=DEV)
    tok = TritonW8A8Kernel.prepare(LinearSpec(FloatWeight(w, torch.ones(256, device=DEV), ScaleGranularity.CHANNEL),
                                              ActScheme(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16), PLATFORM)
    assert "outside 2..32" in tok.frag_why(1) and "outside 2..32" in tok.frag_why(33)
    wonly = TritonW8A8Kernel.prepare(LinearSpec(FloatWeight(w, torch.ones(256, device=DEV), ScaleGranularity.CHANNEL),
                                                ActScheme(), torch.bfloat16), PLATFORM)
    assert "per-token/static activations" in wonly.frag_why(4)
    if DEV == "cpu":
        assert "Gluon kernel" in tok.frag_why(4)


def test_w8a8_refuses_asymmetric_static_int8_activations():
    """An input zero point (msModelSlim asymmetric static int8) is not computed by any CUDA W8A8 path: the kernel
    says so, and the platform's selection goes on to the reference kernel, which computes it."""
    from quantrt.platforms.cuda.kernels import TritonW8A8Kernel
    from quantrt.quant.kernel import LinearSpec, select_linear_kernel
    from quantrt.quant.kernels.reference import ReferenceLinearKernel
    from quantrt.quant.weights import ActKind, ActScheme, IntWeight

    w = IntWeight(torch.ones(256, 256, dtype=torch.int8, device=DEV), torch.ones(256, 1, device=DEV), 8, 256)
    act = ActScheme(ActKind.STATIC_TENSOR, torch.int8, scale=torch.tensor(0.1), zero=torch.tensor(3.0))
    spec = LinearSpec(w, act, torch.bfloat16)
    ok, why = TritonW8A8Kernel.can_implement(spec, PLATFORM)
    assert not ok and "input zero point" in why
    assert select_linear_kernel(spec, PLATFORM).kernel is ReferenceLinearKernel


@pytest.mark.accelerator
def test_frag_w8_replays_in_a_cuda_graph():
    from quantrt.platforms.cuda.kernels.frag_w8 import frag_reference, frag_w8

    gen = torch.Generator(device=DEV).manual_seed(3)
    a, w = _codes(8, 4096, FP8, gen), _codes(4096, 4096, FP8, gen)
    sa, sw = torch.full((8, 1), 0.01, device=DEV), torch.full((4096,), 0.002, device=DEV)
    frag_w8(a, sa, w, sw, torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = frag_w8(a, sa, w, sw, torch.bfloat16)
    for _ in range(3):
        a.copy_(_codes(8, 4096, FP8, gen))
        g.replay()
        ref = frag_reference(a, sa, w, sw)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3
