"""Triton CUDA kernels vs the reference kernel.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes, CI);
on the GPU machine `-m accelerator` adds Llama-sized shapes run natively.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platforms.cuda.kernels import CUDA_LINEAR_KERNELS, TritonW8A8Kernel, TritonWNA16Kernel
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn


def make_int_weight(n: int, k: int, bits: int, group: int, asym: bool, act_order: bool,
                    gen: torch.Generator) -> IntWeight:
    """Random IntWeight on DEV: signed codes (sym) or unsigned codes + integer zero (asym)."""
    g = k // group
    scale = torch.rand(n, g, generator=gen) * 0.02 + 0.005
    if asym:
        codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
        zero = torch.randint(0, 2**bits, (n, g), generator=gen).to(torch.int32)
    else:
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=gen).to(torch.int8)
        zero = None
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=gen) // group).to(torch.int32)
    return IntWeight(codes.to(DEV), scale.to(DEV), bits, group, zero=None if zero is None else zero.to(DEV),
                     g_idx=None if g_idx is None else g_idx.to(DEV))


def offset_int_weight(n: int, k: int, bits: int, group: int, act_order: bool, gen: torch.Generator) -> IntWeight:
    """Random IntWeight on DEV with unsigned codes and a float offset per group (GGUF Q4_1/K-quant mins,
    torchao's float zero point): w = q * s + o."""
    g = k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scale = torch.rand(n, g, generator=gen) * 0.02 + 0.005
    offset = -(torch.rand(n, g, generator=gen) * 2 ** (bits - 1) + 0.5) * scale      # about -z * s, z fractional
    g_idx = (torch.randperm(k, generator=gen) // group).to(torch.int32).to(DEV) if act_order else None
    return IntWeight(codes.to(DEV), scale.to(DEV), bits, group, offset=offset.to(DEV), g_idx=g_idx)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def check(spec: LinearSpec, kernel_cls: type, m: int, gen: torch.Generator, tol: float,
          bias: bool = False) -> None:
    ok, why = kernel_cls.can_implement(spec, PLATFORM)
    assert ok, why
    kern = kernel_cls.prepare(spec, PLATFORM)
    k = spec.in_features
    x = torch.randn(m, k, generator=gen).to(DEV, spec.compute_dtype)
    b = torch.randn(spec.out_features, generator=gen).to(DEV, spec.compute_dtype) if bias else None
    y = kern.apply(x, b)
    ref = ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, b)
    assert y.shape == ref.shape and y.dtype == spec.compute_dtype
    assert rel_err(y, ref) < tol


WNA16_CASES = [  # bits, group (0 = per-channel), asym, act_order
    (4, 32, False, False), (4, 64, True, False), (4, 0, False, False), (8, 128, False, False),
    (8, 0, True, False), (4, 32, False, True), (3, 64, True, False),
]


@pytest.mark.parametrize("bits,group,asym,act_order", WNA16_CASES)
@pytest.mark.parametrize("m", [1, 5, 40, 130])
def test_wna16_matches_reference(bits, group, asym, act_order, m):
    gen = torch.Generator().manual_seed(bits * 100 + group + m)
    k = 256
    w = make_int_weight(48, k, bits, group or k, asym, act_order, gen)
    dtype = torch.float16 if m == 5 else torch.bfloat16
    check(LinearSpec(w, ActScheme(), dtype), TritonWNA16Kernel, m, gen, 1e-2, bias=m == 5)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 128, True), (5, 32, False), (8, 0, False)])
@pytest.mark.parametrize("m", [1, 5, 40, 130, 300])
def test_wna16_float_offsets_match_reference(bits, group, act_order, m):
    """Weights with float offsets (w = q * s + o) run the W4A16/W8A16 kernels on every path (GEMV, tensor-core
    tiles, dequantize + GEMM) instead of the reference kernel: with the offsets in the unpack (q s + o) where the
    ring kernel never runs (here: no Hopper), else (act-order) an integer zero plus the (x summed per group) @ r
    term."""
    gen = torch.Generator().manual_seed(bits * 100 + group + m)
    k = 256
    w = offset_int_weight(48, k, bits, group or k, act_order, gen)
    check(LinearSpec(w, ActScheme(), torch.bfloat16), TritonWNA16Kernel, m, gen, 1e-2, bias=m == 5)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    assert kern.raw_offset == (not act_order) and (kern.offset is None) == kern.raw_offset


def test_wna16_split_k():
    from quantrt.platforms.cuda.kernels.wna16_triton import WNA16Config, wna16_matmul

    gen = torch.Generator().manual_seed(7)
    w = make_int_weight(64, 512, 4, 64, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    x = torch.randn(3, 512, generator=gen).to(DEV, torch.bfloat16)
    ref = x.float() @ w.dequantize().t()
    for cfg in (WNA16Config(1, 32, 128, 4), WNA16Config(16, 32, 128, 2)):
        xs = x[:1] if cfg.block_m == 1 else x
        y = wna16_matmul(xs, kern.packed, kern.scale, kern.zero, 64, 4, cfg, zero_const=kern.zero_const)
        assert rel_err(y, ref[: xs.shape[0]]) < 1e-2


SKINNY_CASES = [  # bits, group, asym, m, (block_n, block_k, split_k, num_warps, num_stages, reduce)
    (4, 128, False, 1, (32, 128, 2, 4, 1, 2)), (4, 64, True, 3, (16, 256, 3, 4, 1, 2)),
    (4, 32, False, 2, (32, 64, 1, 4, 1, 0)), (8, 256, True, 4, (16, 64, 4, 4, 1, 1)),
    (3, 64, False, 1, (32, 64, 0, 4, 1, 2)),
]


@pytest.mark.parametrize("bits,group,asym,m,cfg", SKINNY_CASES)
def test_skinny_wna16(bits, group, asym, m, cfg):
    """The M <= 4 GEMV (every split-K combine mode) against the dequantized weight."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import SkinnyConfig, skinny_wna16

    gen = torch.Generator().manual_seed(bits * 10 + m)
    w = make_int_weight(40, 256, bits, group, asym, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.float16), PLATFORM)
    assert kern.skinny_why == ""
    x = torch.randn(m, 256, generator=gen).to(DEV, torch.float16)
    ref = x.float() @ w.dequantize().t()
    for _ in range(2):  # the second call reuses the split-K counters the first one reset
        y = skinny_wna16(x, kern.packed, kern.scale, kern.zero, group, kern.container,
                         SkinnyConfig(*cfg), zero_const=kern.zero_const)
        assert y.dtype == torch.float16 and rel_err(y, ref) < 2e-3


def test_skinny_wna16_dispatch():
    gen = torch.Generator().manual_seed(2)
    spec = LinearSpec(make_int_weight(16, 64, 4, 8, False, False, gen), ActScheme(), torch.bfloat16)
    kern = TritonWNA16Kernel.prepare(spec, PLATFORM)  # keeps no canonical weight: the reference takes spec
    assert "smaller than 16" in kern.skinny_why  # g8 stays on the tiled kernel, still correct
    x = torch.randn(1, 64, generator=gen).to(DEV, torch.bfloat16)
    ref = ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, None)
    assert rel_err(kern.apply(x, None), ref) < 1e-2


@pytest.mark.parametrize("gran", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m,cfg", [(1, (32, 64, 0, 4, 1, 2)), (3, (16, 128, 2, 4, 1, 1)), (4, (32, 64, 1, 4, 1, 0))])
def test_skinny_fp8_weight_only(gran, m, cfg):
    from quantrt.platforms.cuda.kernels.skinny_fp8 import SkinnyFp8Config, skinny_fp8

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(160, 320, generator=gen), gran, (128, 128) if gran == "block" else None)
    kern = TritonW8A8Kernel.prepare(LinearSpec(type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block),
                                               ActScheme(), torch.float16), PLATFORM)
    x = torch.randn(m, 320, generator=gen).to(DEV, torch.float16)
    ref = x.float() @ w.dequantize().to(DEV).t()
    y = skinny_fp8(x, kern.data, kern.w_scale, kern.act, kern.wscale, kern.qmax, None, SkinnyFp8Config(*cfg))
    assert rel_err(y, ref) < 2e-3


def test_wna16_rejections():
    gen = torch.Generator().manual_seed(1)
    w = make_int_weight(16, 64, 4, 32, False, False, gen)
    ok, why = TritonWNA16Kernel.can_implement(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8),
                                                         torch.bfloat16), PLATFORM)
    assert not ok and "weight-only" in why
    ok, why = TritonWNA16Kernel.can_implement(LinearSpec(w, ActScheme(), torch.float32), PLATFORM)
    assert not ok and "float32" in why
    bad = IntWeight(w.codes, w.scale, 4, 32, g_idx=torch.zeros(64, dtype=torch.int32, device=DEV))
    ok, why = TritonWNA16Kernel.can_implement(LinearSpec(bad, ActScheme(), torch.bfloat16), PLATFORM)
    assert not ok and "uniform" in why
    fp8 = quantize_fp8(torch.randn(16, 64), "channel").data
    assert not TritonWNA16Kernel.can_implement(LinearSpec(quantize_fp8(fp8.float(), "tensor"), ActScheme(),
                                                          torch.bfloat16), PLATFORM)[0]


FP8_CASES = [  # granularity, act kind
    ("tensor", ActKind.DYNAMIC_TOKEN), ("channel", ActKind.DYNAMIC_TOKEN), ("block", ActKind.DYNAMIC_GROUP),
    ("tensor", ActKind.STATIC_TENSOR), ("channel", ActKind.NONE), ("block", ActKind.NONE),
]


def _act(kind: ActKind, dtype: torch.dtype) -> ActScheme:
    if kind is ActKind.NONE:
        return ActScheme()
    if kind is ActKind.DYNAMIC_GROUP:
        return ActScheme(kind, dtype, group=128)
    if kind is ActKind.STATIC_TENSOR:
        return ActScheme(kind, dtype, scale=torch.tensor(0.02))
    return ActScheme(kind, dtype)


@pytest.mark.parametrize("gran,kind", FP8_CASES)
@pytest.mark.parametrize("m", [1, 20])
def test_fp8_w8a8_matches_reference(gran, kind, m):
    if DEV == "cpu" and kind is not ActKind.NONE:
        pytest.skip("Triton 3.6's interpreter rounds fp32->fp8 without carrying into the exponent "
                    "(31.56 -> 16.0); these cases run natively with -m accelerator")
    gen = torch.Generator().manual_seed(m)
    n, k = 160, 320  # partial 128-blocks along both N and K
    w = quantize_fp8(torch.randn(n, k, generator=gen), gran, (128, 128) if gran == "block" else None)
    w = type(w)(w.data.to(DEV), w.scale.to(DEV), w.granularity, w.block)
    check(LinearSpec(w, _act(kind, FP8), torch.bfloat16), TritonW8A8Kernel, m, gen, 2e-2)


@pytest.mark.parametrize("m", [1, 20])
def test_int8_w8a8_matches_reference(m):
    gen = torch.Generator().manual_seed(3 + m)
    n, k = 96, 256
    codes = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    w = IntWeight(codes.to(DEV), (torch.rand(n, 1, generator=gen) * 0.01).to(DEV), 8, k)
    check(LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.float16), TritonW8A8Kernel, m,
          gen, 2e-2)


def test_w8a8_rejections():
    w = quantize_fp8(torch.randn(128, 256), "block", (128, 128))
    ok, why = TritonW8A8Kernel.can_implement(LinearSpec(w, _act(ActKind.DYNAMIC_TOKEN, FP8), torch.bfloat16),
                                             PLATFORM)
    assert not ok and "block" in why
    ok, why = TritonW8A8Kernel.can_implement(
        LinearSpec(w, _act(ActKind.DYNAMIC_GROUP, torch.float8_e5m2), torch.bfloat16), PLATFORM)
    assert not ok and "differs" in why


def test_cuda_kernel_list():
    assert CUDA_LINEAR_KERNELS[0] is TritonWNA16Kernel
    assert PLATFORM.linear_kernels() == CUDA_LINEAR_KERNELS


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("bits,group,asym,act_order", [(4, 128, False, False), (4, 128, True, True),
                                                       (8, 0, False, False), (4, 32, False, False),
                                                       (4, 64, True, False)])
def test_wna16_native_llama_shape(m, bits, group, asym, act_order):
    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(4096, 4096, bits, group or 4096, asym, act_order, gen)
    check(LinearSpec(w, ActScheme(), torch.bfloat16), TritonWNA16Kernel, m, gen, 1e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 8, 16, 40, 200, 300])
@pytest.mark.parametrize("group,act_order", [(32, False), (128, False), (128, True)])
def test_wna16_float_offsets_native_llama_shape(m, group, act_order):
    """GGUF-style g32 and torchao-style g128 float offsets at a Llama shape: the ring (g128, M <= 32: o times
    each step's sum of x), GEMV / tensor-core tiles / dequantize kernels with the offsets in their unpack; with
    act-order an integer zero plus the offset term; vs the reference kernel."""
    gen = torch.Generator().manual_seed(m + group)
    w = offset_int_weight(4096, 4096, 4, group, act_order, gen)
    check(LinearSpec(w, ActScheme(), torch.bfloat16), TritonWNA16Kernel, m, gen, 1e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("gran,kind", FP8_CASES)
def test_fp8_native_llama_shape(m, gran, kind):
    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(4096, 4096, generator=gen).to(DEV), gran,
                     (128, 128) if gran == "block" else None)
    check(LinearSpec(w, _act(kind, FP8), torch.bfloat16), TritonW8A8Kernel, m, gen, 2e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("gran,kind", FP8_CASES)
def test_skinny_fp8_native(m, gran, kind):
    """The GEMV for every fp8 mode at M <= 4 (dispatch uses it at M == 1) vs the reference kernel."""
    from quantrt.platforms.cuda.kernels.skinny_fp8 import skinny_fp8

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8(torch.randn(4096, 4096, generator=gen).to(DEV), gran, (128, 128) if gran == "block" else None)
    spec = LinearSpec(w, _act(kind, FP8), torch.bfloat16)
    kern = TritonW8A8Kernel.prepare(spec, PLATFORM)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.bfloat16)
    y = skinny_fp8(x, kern.data, kern.w_scale, kern.act, kern.wscale, kern.qmax, kern.act_scale)
    assert rel_err(y, ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, None)) < 2e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 3, 4])
def test_skinny_wna16_native(m):
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(4096, 4096, 4, 128, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.bfloat16)
    y = skinny_wna16(x, kern.packed, kern.scale, kern.zero, 128, 4, zero_const=kern.zero_const)
    assert rel_err(y, x.float() @ w.dequantize().t()) < 1e-2


@pytest.mark.parametrize("m,group,asym,dtype,cfg", [
    (1, 128, False, torch.float16, (64, 128, 0, 4, 1, 4, True)), (5, 256, True, torch.bfloat16, (64, 128, 2, 4, 1, 4, True)),
    (16, 64, True, torch.float16, (64, 64, 0, 4, 1, 4, False))])
def test_tc_wna16(m, group, asym, dtype, cfg):
    """Tensor-core small-M W4A16 (plain-Triton unpack under the interpreter) vs the dequantized weight."""
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    gen = torch.Generator().manual_seed(m + group)
    w = make_int_weight(128, 512, 4, group, asym, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, 512, generator=gen).to(DEV, dtype)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, group, TcConfig(*cfg), zero_const=kern.zero_const)
    # bf16 casts in the interpreter truncate (no round-to-nearest): looser there
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("m,cfg", [
    (40, (64, 128, 2, 4, 1, 4, True, 32)),    # 2 BM tiles (one ragged), split-K with per-(m, n) counters
    (33, (64, 64, 0, 4, 1, 4, False, 16)),    # 3 BM tiles, unswapped dot
    (100, (128, 128, 1, 4, 1, 4, False, 64)),  # BN > N tail, no split
])
def test_tc_wna16_row_tiles(m, cfg):
    """M = 17..256 tiles (grid axis over BM rows) vs the dequantized weight."""
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(96, 512, 4, 128, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.float16), PLATFORM)
    x = torch.randn(m, 512, generator=gen).to(DEV, torch.float16)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, 128, TcConfig(*cfg), zero_const=kern.zero_const)
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < 2e-3


@pytest.mark.parametrize("m,group,asym", [(3, 128, True), (40, 512, False)])
def test_tc_wna16_8bit(m, group, asym):
    """8-bit container (W8A16, 4 codes per word; per-channel when group == K) vs the dequantized weight."""
    from quantrt.platforms.cuda.kernels.tc_wna16 import TcConfig, tc_wna16

    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(96, 512, 8, group, asym, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.float16), PLATFORM)
    assert kern.container == 8
    x = torch.randn(m, 512, generator=gen).to(DEV, torch.float16)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, group, TcConfig(64, 128, 2, 4, 1, 4, m < 16, 32), bits=8,
                 zero_const=kern.zero_const)
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < 2e-3


def test_tc_wna16_buckets_and_errors():
    from quantrt.platforms.cuda.kernels.tc_wna16 import MAX_M, can_run, default_config, m_bucket, tc_wna16

    assert [m_bucket(m) for m in (2, 16, 17, 64, 65, 256)] == [16, 16, 32, 64, 128, 256]
    assert MAX_M == 256 and can_run(256, 4096, 128, 4) and not can_run(257, 4096, 128, 4)
    assert not can_run(64, 4096, 48, 4) and can_run(64, 4096, 128, 8) and not can_run(8, 4096, 128, 2)
    assert default_config(200, 4096, 4096).block_m >= 64
    # GGUF-size groups: K steps spanning 4 / 2 groups (a scale per packed row), or one group per step
    assert can_run(64, 4096, 64, 4) and default_config(64, 0, 4096, 4, 64).block_k == 128
    assert can_run(16, 4096, 32, 4) and default_config(16, 0, 4096, 4, 32).block_k == 128
    assert can_run(16, 4096, 32, 8) and not can_run(16, 4096, 2, 8)   # a group must hold whole packed words
    # measured slower (one group per step kept): the 8-bit container, M > 64
    assert default_config(16, 0, 4096, 8, 32).block_k == 32 and default_config(128, 0, 4096, 4, 32).block_k == 32
    import quantrt.platforms.cuda.kernels.tc_wna16 as T
    T.MULTI_GROUP_STEPS = False
    try:
        assert default_config(64, 0, 4096, 4, 64).block_k == 64 and default_config(16, 0, 4096, 4, 32).block_k == 32
    finally:
        T.MULTI_GROUP_STEPS = True
    with pytest.raises(ValueError, match="MAX_M=256"):
        m_bucket(300)
    x = torch.zeros(8, 512, dtype=torch.float16, device=DEV)
    p = torch.zeros(64, 96, dtype=torch.int32, device=DEV)
    s = torch.zeros(8, 96, device=DEV)
    with pytest.raises(ValueError, match="group=48"):
        tc_wna16(x, p, s, s, 48)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [2, 9, 16, 17, 32, 50, 64, 100, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_tc_wna16_native(m, dtype, bits):
    from quantrt.platforms.cuda.kernels.tc_wna16 import tc_wna16

    gen = torch.Generator().manual_seed(m)
    w = make_int_weight(4096, 4096, bits, 128, True, False, gen)
    kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), dtype), PLATFORM)
    x = torch.randn(m, 4096, generator=gen).to(DEV, dtype)
    y = tc_wna16(x, kern.packed, kern.scale, kern.zero, 128, bits=bits, zero_const=kern.zero_const)
    assert rel_err(y, x.float() @ w.dequantize().float().t()) < 1e-2



def test_two_rows_take_the_gemv_where_it_measured_faster():
    """M = 2 off the ring: the GEMV for N <= 8192 with 8-bit codes, or 4-bit codes at K >= 8192; else the tiles.
    Both paths agree with the reference (the GEMV's result is what the dispatch returns)."""
    from quantrt.platforms.cuda.kernels.skinny_wna16 import skinny_wna16

    gen = torch.Generator().manual_seed(11)
    for bits, n, k, want in ((8, 64, 256, True), (4, 64, 256, False), (4, 64, 8192, True), (8, 8256, 256, False)):
        w = make_int_weight(n, k, bits, 32, False, False, gen)
        kern = TritonWNA16Kernel.prepare(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM)
        assert kern._skinny_m2(k) is want, (bits, n, k)
    kern = TritonWNA16Kernel.prepare(LinearSpec(make_int_weight(64, 256, 8, 32, True, False, gen), ActScheme(),
                                                torch.bfloat16), PLATFORM)
    x = torch.randn(2, 256, generator=gen).to(DEV, torch.bfloat16)
    y = kern.apply(x, None)
    assert torch.equal(y, skinny_wna16(x, kern.packed, kern.scale, kern.zero, 32, 8, zero_const=kern.zero_const))
