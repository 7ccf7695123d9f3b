"""The M <= 4 W4A16/W8A16 GEMV (`skinny_wna16`: subnormal-code FFMA, per-group zero/scale) vs float64.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes); on the GPU
machine `-m accelerator` adds Llama-sized shapes run natively and the dispatch through `apply`.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platforms.cuda.kernels import TritonWNA16Kernel
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import ActScheme, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON


def _weight(n: int, k: int, bits: int, group: int, asym: bool, act_order: bool, seed: int) -> IntWeight:
    """Random IntWeight on DEV: signed codes (sym) or unsigned codes + integer zero points (asym)."""
    gen = torch.Generator().manual_seed(seed)
    g = k // group
    scale = torch.rand(n, g, generator=gen) * 0.02 + 0.005
    if asym:
        codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
        zero = torch.randint(0, 2**bits, (n, g), generator=gen).to(torch.int32).to(DEV)
    else:
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=gen).to(torch.int8)
        zero = None
    g_idx = (torch.randperm(k, generator=gen) // group).to(torch.int32).to(DEV) if act_order else None
    return IntWeight(codes.to(DEV), scale.to(DEV), bits, group, zero=zero, g_idx=g_idx)


def _ref64(x: torch.Tensor, w: IntWeight) -> torch.Tensor:
    """float64 x @ W^T from the codes, scales and zero points (independent of the packed layout)."""
    n, k = w.shape
    codes = w.codes.double()
    zero = w.zero.double() if w.zero is not None else torch.zeros(n, k // w.group_size, dtype=torch.float64,
                                                                  device=codes.device)
    gi = w.g_idx.long() if w.g_idx is not None else torch.arange(k, device=codes.device) // w.group_size
    wd = (codes - zero[:, gi]) * w.scale.double()[:, gi]
    return x.double() @ wd.t()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


# output rounding: bf16 keeps 8 bits (relative error ~2**-9 per element), fp16 11 bits
TOL = {torch.bfloat16: 4e-3, torch.float16: 6e-4}

CASES = [  # bits, group (0 = per-channel), asym, act_order, m, dtype, (BN, BK, split, warps, stages, reduce, waves, pf)
    (4, 128, False, False, 1, torch.bfloat16, (64, 64, 2, 1, 1, 2, 2, True)),
    (4, 64, True, False, 3, torch.float16, (128, 32, 0, 1, 1, 2, 2, True)),
    (4, 32, False, True, 2, torch.bfloat16, (32, 64, 1, 1, 1, 0, 2, False)),
    (4, 0, True, False, 4, torch.float16, (64, 128, 3, 2, 1, 1, 2, True)),
    (8, 128, True, False, 1, torch.float16, (64, 32, 0, 1, 1, 2, 2, True)),
    (8, 0, False, False, 2, torch.bfloat16, (128, 64, 2, 1, 1, 2, 2, False)),
    (3, 64, True, True, 1, torch.bfloat16, (64, 64, 0, 1, 1, 2, 4, True)),
    (4, 128, True, False, 2, torch.bfloat16, (64, 32, 2, 1, 1, 2, 2, 2)),
    (4, 32, False, False, 1, torch.float16, (32, 32, 0, 1, 1, 2, 2, 2)),
]


@pytest.mark.parametrize("bits,group,asym,act_order,m,dtype,cfg", CASES)
def test_w4_gemv_matches_float64(bits, group, asym, act_order, m, dtype, cfg):
    """Every split-K combine mode, prefetch on/off, uneven K slices (K = 320) and a ragged N (N = 72)."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import SkinnyConfig, skinny_wna16

    n, k = 72, 320 if group in (32, 64, 0) else 256
    w = _weight(n, k, bits, group or k, asym, act_order, seed=bits * 100 + m)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV, dtype)
    xp = x[:, kern.perm] if kern.perm is not None else x
    ref = _ref64(x, w)
    for _ in range(2):  # the second call reuses the split-K counters the first one reset
        y = skinny_wna16(xp, kern.packed, kern.scale, kern.zero, kern.group, kern.container,
                         SkinnyConfig(*cfg), zero_const=kern.zero_const)
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel(y, ref) < TOL[dtype]


def test_w4_gemv_activation_range():
    """Activations from 2**-40 to 2**40 (the pre-scale by up to 2**85 must neither overflow nor flush)."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import SkinnyConfig, skinny_wna16

    w = _weight(64, 256, 4, 128, True, False, seed=5)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    for e in (-40, -12, 0, 20, 40):
        x = (torch.randn(1, 256, generator=torch.Generator().manual_seed(e + 50)) * 2.0**e).to(DEV, torch.bfloat16)
        y = skinny_wna16(x, kern.packed, kern.scale, kern.zero, 128, 4, SkinnyConfig(64, 64, 2, 1),
                         zero_const=kern.zero_const)
        assert _rel(y, _ref64(x, w)) < TOL[torch.bfloat16], e


def test_w4_gemv_rejects_bad_inputs():
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

    w = _weight(16, 64, 4, 32, False, False, seed=1)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    x = torch.randn(5, 64).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="1 <= M <= 4"):
        skinny_wna16(x, kern.packed, kern.scale, None, 32, 4)
    with pytest.raises(ValueError, match="4- or 8-bit container"):
        skinny_wna16(x[:1], kern.packed, kern.scale, None, 32, 2)


@pytest.mark.accelerator
@pytest.mark.parametrize("m,bits,group,asym,act_order", [
    (1, 4, 128, False, False), (1, 4, 128, True, True), (1, 4, 32, True, False), (1, 8, 0, True, False),
    (1, 8, 128, False, True), (2, 4, 128, True, False), (3, 4, 128, False, False), (4, 4, 64, False, False),
    (4, 4, 0, False, False), (4, 8, 0, True, False)])
def test_w4_gemv_native(m, bits, group, asym, act_order):
    """Llama-sized (4096 x 6144) through the default config and through `apply` (whatever it dispatches)."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

    k, n = 4096, 6144
    w = _weight(n, k, bits, group or k, asym, act_order, seed=m * 7 + bits)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV, torch.bfloat16)
    xp = x[:, kern.perm] if kern.perm is not None else x
    ref = _ref64(x, w)
    y = skinny_wna16(xp, kern.packed, kern.scale, kern.zero, kern.group, kern.container,
                     zero_const=kern.zero_const)
    assert _rel(y, ref) < TOL[torch.bfloat16]
    assert _rel(kern.apply(x, None), ref) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("k,n", [(8192, 8192), (14336, 4096), (4096, 28672)])
def test_w4_gemv_native_shapes(k, n):
    """The Llama-3.1-8B shapes of the benchmark at M = 1 in fp16, asymmetric g128."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

    w = _weight(n, k, 4, 128, True, False, seed=k + n)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.float16), PLATFORM)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).to(DEV, torch.float16)
    y = skinny_wna16(x, kern.packed, kern.scale, kern.zero, 128, 4, zero_const=kern.zero_const)
    assert _rel(y, _ref64(x, w)) < TOL[torch.float16]
