"""`frag_w4`: W4A16 at 1..16 rows through mma.sync on int4 words loaded straight from memory (Gluon).

CPU: the MMA plan and the accumulator slots against the PTX ISA's m16n8k16 16-bit fragment tables (a whole-warp
emulation fed by the registers each lane holds in the kernel's layout), the sm_90 PTX and the errors. GPU
(-m accelerator): the kernel against `ring_reference` (float64), and the W4A16 dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON, compile_gluon_sm90

pytestmark = NEEDS_TRITON


def _mma16(a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """m16n8k16, 16-bit A (row) / B (col), per the PTX ISA: a_regs [32 lanes, 4 regs, 2 halves] (lo, hi),
    b_regs [32, 2, 2] -> d [32, 4]."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r in range(4):                                 # a0..a7: reg r holds a_(2r), a_(2r+1)
            for h in range(2):
                row = g + 8 * (r & 1)
                col = 2 * t + h + 8 * (r >> 1)
                a[row, col] = a_regs[lane, r, h]
        for r in range(2):
            for h in range(2):
                b[2 * t + h + 8 * r, g] = b_regs[lane, r, h]
    d = a @ b
    return np.array([[d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]]
                     for g, t in (divmod(lane, 4) for lane in range(32))])


@pytest.mark.parametrize("tokens", [1, 8, 13])
def test_plan_and_slots_give_the_product(tokens):
    """One step (16 packed rows = 128 k) of one warp (32 columns): the pairs (code i, code i + 4) of the words a
    lane loads, the activations paired the same way, `PLAN`'s MMAs, `D_SLOT`'s scales and `fragment_slot`'s
    (column, token) of every accumulator register give exactly x @ ((q - z) * s)."""
    from quantrt.platforms.cuda.kernels.frag_w4 import D_SLOT, PLAN, fragment_slot

    rng = np.random.default_rng(tokens)
    q = rng.integers(0, 16, (128, 32))                         # [k, column]
    z = rng.integers(0, 16, 32)
    s = rng.integers(1, 5, 32).astype(float)
    x = rng.integers(-3, 4, (16, 128)).astype(float)
    x[tokens:] = 0
    acc = np.zeros((32, 4, 4))                                 # [lane, u, c]
    for gi in range(2):
        for p in range(2):
            d = np.zeros((32, 4))
            for aa, bb in PLAN[p]:
                ar = np.zeros((32, 4, 2))
                br = np.zeros((32, 2, 2))
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for r, (u, c, i) in enumerate(aa):         # word of column 4g + c at packed row t + 4u
                        k = 8 * (t + 4 * u)
                        ar[lane, r] = [q[k + i, 4 * g + c] - z[4 * g + c], q[k + i + 4, 4 * g + c] - z[4 * g + c]]
                    for r, (u, i) in enumerate(bb):
                        k = 8 * (t + 4 * u)
                        br[lane, r] = [x[8 * gi + g, k + i], x[8 * gi + g, k + i + 4]]
                d += _mma16(ar, br)
            for lane in range(32):
                g = lane // 4
                for pp, e, col in D_SLOT:
                    if pp == p:
                        slot = 8 * gi + 4 * p + e
                        acc[lane, slot // 4, slot % 4] += d[lane, e] * s[4 * g + col]
    y = np.full((16, 32), np.nan)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for u in range(4):
            for c in range(4):
                col, tok = fragment_slot(u, t, c)
                assert np.isnan(y[tok, 4 * g + col])           # every (token, column) exactly once
                y[tok, 4 * g + col] = acc[lane, u, c]
    np.testing.assert_array_equal(y, x @ ((q - z) * s))


def _compile(two: bool, bf16: bool, asym: bool, warps: int = 4, reps: int = 2) -> str:
    import quantrt.platforms.cuda.kernels.frag_w4 as F

    cfg = F.FragW4Config(warps=warps, reps=reps)
    k, n, split = 4096, 4096, 2
    s = torch.zeros(k // 128, n)
    return compile_gluon_sm90(F._frag_w4_kernel, [
        torch.zeros(16, k // 2, dtype=torch.int32), torch.zeros(k // 8, n, dtype=torch.int32), s, s,
        torch.zeros(16, n, dtype=torch.bfloat16), s, torch.zeros(16, dtype=torch.int32), 16, n, k, 128, 8.0,
        k // 8 // split, split, cfg.block_n, two, bf16, asym, 1, 1, F.layout(cfg)], num_warps=warps, div16=True)


@pytest.mark.parametrize("two,bf16,asym,reps", [(False, True, False, 2), (True, True, True, 1), (True, False, False, 2)])
def test_kernel_compiles_for_sm90_to_vector_loads_and_mma_sync(two, bf16, asym, reps):
    ptx = _compile(two, bf16, asym, reps=reps)
    ty = "bf16" if bf16 else "f16"
    assert ptx.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32") == reps * 16 * (2 if two else 1)
    loop = ptx[ptx.index("Loop Header"):]
    loop = loop[:loop.index("bra")]
    assert "ld.global.b32" not in loop and "ld.global.v4.b32" in loop        # every load 16 bytes
    assert "shfl" not in ptx and "ld.shared" not in loop and "ld.local" not in ptx
    assert loop.count("lop3.b32") == reps * 64                                 # one LOP3 per code pair


def test_errors_name_the_problem():
    from quantrt.platforms.cuda.kernels.frag_w4 import FragW4Config, frag_w4, frag_w4_why_not

    cpu = torch.device("cpu")
    assert "M=17" in frag_w4_why_not(17, 4096, 4096, 128, torch.bfloat16, cpu)
    assert "group size 64" in frag_w4_why_not(1, 4096, 4096, 64, torch.bfloat16, cpu)
    assert "N=202" in frag_w4_why_not(1, 4096, 202, 128, torch.bfloat16, cpu)
    assert "bf16 or fp16" in frag_w4_why_not(1, 4096, 4096, 128, torch.float32, cpu)
    assert "reps in 1, 2, 4" in frag_w4_why_not(1, 4096, 4096, 128, torch.bfloat16, cpu, FragW4Config(reps=3))
    assert "CUDA GPU" in frag_w4_why_not(1, 4096, 4096, 128, torch.bfloat16, cpu)
    with pytest.raises(ValueError, match=r"frag_w4 cannot compute .*M=17"):
        frag_w4(torch.zeros(17, 256, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.int32),
                torch.zeros(2, 64), None, 128)


def _packed(n: int, k: int, group: int, asym: bool, gen: torch.Generator):
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    packed = torch.zeros(k // 8, n, dtype=torch.int32)
    for i in range(8):
        packed |= q[i::8] << (4 * i)
    scale = torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3
    zero = (torch.randint(0, 16, (k // group, n), generator=gen).float() + 2.0 ** 23) if asym else None
    return packed.to(DEV), scale.to(DEV), None if zero is None else zero.to(DEV)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype,asym", [(torch.bfloat16, False), (torch.float16, True), (torch.bfloat16, True)])
@pytest.mark.parametrize("n,k,group,cfg", [(4096, 4096, 128, None), (200, 1024, 1024, (2, 1, 4)),
                                           (384, 14336, 128, (4, 2, 2)), (1000, 512, 256, (8, 1, 1))])
def test_frag_w4_native(m, dtype, asym, n, k, group, cfg):
    from quantrt.platforms.cuda.kernels.frag_w4 import FragW4Config, frag_w4
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_reference

    gen = torch.Generator().manual_seed(m * 31 + n)
    packed, scale, zero = _packed(n, k, group, asym, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    y = frag_w4(x, packed, scale, zero, group, 8.0, FragW4Config(*cfg) if cfg else None)
    ref = ring_reference(x, packed, scale, zero, group, 8.0)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3


@pytest.mark.accelerator
def test_frag_w4_replays_in_a_cuda_graph():
    from quantrt.platforms.cuda.kernels.frag_w4 import frag_w4
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_reference

    gen = torch.Generator().manual_seed(5)
    packed, scale, _ = _packed(4096, 4096, 128, False, gen)
    x = torch.randn(4, 4096, generator=gen).to(DEV, torch.bfloat16)
    frag_w4(x, packed, scale, None, 128)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = frag_w4(x, packed, scale, None, 128)
    for _ in range(3):
        x.copy_(torch.randn(4, 4096, generator=gen).to(DEV, torch.bfloat16))
        g.replay()
        ref = ring_reference(x, packed, scale, None, 128, 8.0)
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 4e-3
